//! Every reset and socket error, until a verdict accounts for it: a named
//! cause, an application's abort, or, once nothing explained it in time,
//! an `unexplained` verdict. A reset pair (one side's reset sent, the
//! other's received) is one connection: both are accounted together.
use std::{
    net::IpAddr,
    time::{Duration, SystemTime},
};

use foldhash::HashMap;

use super::window::{elapsed, evict_oldest, within};
use crate::model::{Event, EventKind, Role, SockPtr, TcpFlags, facts::NodeFacts};

/// The ephemeral range assumed for a namespace whose facts are unknown.
const DEFAULT_EPHEMERAL: (u16, u16) = (32768, 60999);

/// An address and port.
pub(super) type End = (IpAddr, u16);

/// A connection's ends as its client sees them. NAT in between may change
/// the server's end (a ClusterIP becomes a pod's address), never the
/// client's: the client's end names the connection on both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Ends {
    pub(super) client: End,
    pub(super) server: End,
}

impl Ends {
    /// Which end is the client: the one that connected, when the socket's
    /// owner is known; the sender of a SYN (also of the SYN a reset
    /// answers); else the end whose port is in the namespace's ephemeral
    /// range.
    pub(super) fn of(ev: &Event, facts: Option<&NodeFacts>) -> Self {
        let src = (ev.src.ip, ev.src.port);
        let dst = (ev.dst.ip, ev.dst.port);
        let local_is_client = match ev.role {
            Some(Role::Client) => Some(true),
            Some(Role::Server) => Some(false),
            None => syn_sender(ev),
        };
        let src_is_client = local_is_client.unwrap_or_else(|| {
            let range = facts
                .and_then(|f| f.netns.get(&ev.netns))
                .map_or(DEFAULT_EPHEMERAL, |f| f.port_range);
            let ephemeral = |p: u16| p >= range.0 && p <= range.1;
            match (ephemeral(src.1), ephemeral(dst.1)) {
                (true, false) => true,
                (false, true) => false,
                _ => src.1 >= dst.1,
            }
        });
        if src_is_client {
            Self {
                client: src,
                server: dst,
            }
        } else {
            Self {
                client: dst,
                server: src,
            }
        }
    }
}

/// Whether the event's source is the client, told by a SYN: a segment's
/// own (its sender connects), or the one a reset answers (its sender, the
/// reset's destination, connects).
fn syn_sender(ev: &Event) -> Option<bool> {
    let f = ev.tcp_flags?;
    if !f.contains(TcpFlags::SYN) || f.contains(TcpFlags::RST) {
        return None;
    }
    let sender_is_src = ev.kind != EventKind::ResetSent;
    let sender_is_client = !f.contains(TcpFlags::ACK);
    Some(sender_is_src == sender_is_client)
}

/// An event waiting for an account.
#[derive(Clone, Debug)]
pub(super) struct Open {
    pub(super) ev: Event,
    pub(super) ends: Ends,
}

/// The event a verdict was made from: its connection's client end, and
/// the side (namespace, socket) it was seen on.
#[derive(Clone, Copy, Debug)]
pub(super) struct Origin {
    pub(super) client: End,
    pub(super) netns: u32,
    pub(super) sock: Option<SockPtr>,
}

impl Origin {
    pub(super) fn of(ev: &Event, ends: Ends) -> Self {
        Self {
            client: ends.client,
            netns: ev.netns,
            sock: ev.sock,
        }
    }
}

/// Where an accounted connection's later resets go: the same socket's, or
/// the other side's (another namespace). A new connection from the same
/// client end on the same side is a connection of its own.
#[derive(Clone, Debug)]
struct Accounted<K> {
    key: K,
    at: SystemTime,
    netns: u32,
    sock: Option<SockPtr>,
}

pub(super) struct Ledger<K> {
    open: HashMap<End, Vec<Open>>,
    open_len: usize,
    accounted: HashMap<End, Accounted<K>>,
    /// How long an accounted connection takes its late resets.
    window: Duration,
    cap: usize,
    /// Events left unaccounted because `cap` events were waiting.
    pub(super) overflowed: u64,
}

impl<K> Default for Ledger<K> {
    fn default() -> Self {
        Self {
            open: HashMap::default(),
            open_len: 0,
            accounted: HashMap::default(),
            window: Duration::from_secs(30),
            cap: 65_536,
            overflowed: 0,
        }
    }
}

/// Whether an event ends or breaks a connection and must be accounted for.
pub(super) fn is_terminal(ev: &Event) -> bool {
    matches!(
        ev.kind,
        EventKind::ResetSent | EventKind::ResetReceived | EventKind::SocketError
    )
}

pub(super) fn is_reset(ev: &Event) -> bool {
    matches!(ev.kind, EventKind::ResetSent | EventKind::ResetReceived)
}

impl<K: Clone> Ledger<K> {
    pub(super) fn new(window: Duration, cap: usize) -> Self {
        Self {
            window,
            cap,
            ..Self::default()
        }
    }

    /// Takes a terminal event. When its connection was accounted for
    /// already (the other side's reset came first), returns that account's
    /// key: the event belongs to it. Otherwise it waits for an account.
    pub(super) fn note(&mut self, ev: &Event, ends: Ends) -> Option<K> {
        if let Some(a) = self.accounted.get(&ends.client)
            && within(a.at, ev.time, self.window)
            && (ev.netns != a.netns || (ev.sock.is_some() && ev.sock == a.sock))
        {
            return Some(a.key.clone());
        }
        if self.open_len >= self.cap {
            // Bounded: the event stays in the stream but no verdict will
            // account for it; the stats count it (`unaccounted`).
            self.overflowed += 1;
            return None;
        }
        self.open.entry(ends.client).or_default().push(Open {
            ev: ev.clone(),
            ends,
        });
        self.open_len += 1;
        None
    }

    /// A verdict under `key`, made from `origin`, accounts for its
    /// connection: returns how many resets of it were waiting. Its later
    /// resets join the same account.
    pub(super) fn account(&mut self, origin: Origin, key: K, now: SystemTime) -> u64 {
        if self.accounted.len() >= self.cap {
            let window = self.window;
            self.accounted.retain(|_, a| within(a.at, now, window));
            // Still full within the window: the oldest accounts go (their
            // late resets will wait for a cause of their own).
            if self.accounted.len() >= self.cap {
                evict_oldest(&mut self.accounted, |a| Some(a.at));
            }
        }
        self.accounted.insert(
            origin.client,
            Accounted {
                key,
                at: now,
                netns: origin.netns,
                sock: origin.sock,
            },
        );
        let Some(waiting) = self.open.remove(&origin.client) else {
            return 0;
        };
        self.open_len -= waiting.len();
        waiting.iter().filter(|o| is_reset(&o.ev)).count() as u64
    }

    /// The account of the connection with client end `client`, if it has
    /// one: its verdict's key, and whether that verdict was made from a
    /// socketless event of namespace `netns` (a reset without a socket).
    pub(super) fn accounted(&self, client: End, netns: u32) -> Option<(K, bool)> {
        self.accounted
            .get(&client)
            .map(|a| (a.key.clone(), a.netns == netns && a.sock.is_none()))
    }

    /// Connections whose events waited `settle` without an account, each
    /// with its events, oldest first; forgets old accounts.
    pub(super) fn due(&mut self, now: SystemTime, settle: Duration) -> Vec<Vec<Open>> {
        let ripe: Vec<End> = self
            .open
            .iter()
            .filter(|(_, evs)| evs.iter().all(|o| elapsed(o.ev.time, now) >= settle))
            .map(|(client, _)| *client)
            .collect();
        let mut out: Vec<Vec<Open>> = ripe
            .into_iter()
            .filter_map(|client| self.open.remove(&client))
            .collect();
        self.open_len -= out.iter().map(Vec::len).sum::<usize>();
        out.sort_by_key(|evs| evs.first().map(|o| o.ev.time));
        let window = self.window;
        self.accounted.retain(|_, a| within(a.at, now, window));
        out
    }

    /// Everything still waiting, at the end of tracing.
    pub(super) fn drain(&mut self) -> Vec<Vec<Open>> {
        self.open_len = 0;
        let mut out: Vec<Vec<Open>> = self.open.drain().map(|(_, evs)| evs).collect();
        out.sort_by_key(|evs| evs.first().map(|o| o.ev.time));
        out
    }
}
