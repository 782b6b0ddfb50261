//! Time windows and bounded queues shared by the rules and the ledger.
use std::{
    collections::VecDeque,
    time::{Duration, SystemTime},
};

use foldhash::HashMap;

use crate::model::{Endpoint, Event, TcpFlags};

/// Bounds of the short correlation queues.
pub(in crate::diagnosis) const MAX_RECENT: usize = 1024;

/// Both events concern the same pair of endpoints, in either direction.
pub(in crate::diagnosis) fn same_conn(a: &Event, b: &Event) -> bool {
    let ep = |e: &Endpoint| (e.ip, e.port);
    (ep(&a.src) == ep(&b.src) && ep(&a.dst) == ep(&b.dst))
        || (ep(&a.src) == ep(&b.dst) && ep(&a.dst) == ep(&b.src))
}

pub(in crate::diagnosis) fn is_bare_syn(flags: Option<TcpFlags>) -> bool {
    flags.is_some_and(|f| f.contains(TcpFlags::SYN) && !f.contains(TcpFlags::ACK))
}

pub(in crate::diagnosis) fn elapsed(from: SystemTime, to: SystemTime) -> Duration {
    to.duration_since(from).unwrap_or(Duration::ZERO)
}

pub(in crate::diagnosis) fn within(a: SystemTime, b: SystemTime, window: Duration) -> bool {
    elapsed(a, b).max(elapsed(b, a)) <= window
}

pub(in crate::diagnosis) fn prune(q: &mut VecDeque<Event>, now: SystemTime, window: Duration) {
    q.retain(|e| within(e.time, now, window));
}

pub(in crate::diagnosis) fn push_bounded<T>(q: &mut VecDeque<T>, item: T) {
    if q.len() >= MAX_RECENT {
        q.pop_front();
    }
    q.push_back(item);
}

/// Removes the least recently seen eighth of a full map and returns it.
pub(in crate::diagnosis) fn evict_oldest<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    last: impl Fn(&V) -> Option<SystemTime>,
) -> Vec<V> {
    let mut by_age: Vec<(Option<SystemTime>, K)> =
        map.iter().map(|(k, v)| (last(v), k.clone())).collect();
    let n = (map.len() / 8).max(1);
    if n < by_age.len() {
        by_age.select_nth_unstable_by_key(n, |(t, _)| *t);
    }
    by_age
        .into_iter()
        .take(n)
        .filter_map(|(_, k)| map.remove(&k))
        .collect()
}
