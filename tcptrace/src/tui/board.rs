//! The cause board's rows, in a slab indexed by a hash of their key, so a
//! lookup allocates nothing and eviction touches only the evicted rows.
use std::{
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    net::IpAddr,
    time::SystemTime,
};

use crate::{
    model::{Cause, Confidence, Verdict},
    model::{Endpoint, EventKind, PodRef},
};

/// Board rows kept at most; the least recently updated tenth goes first.
pub const BOARD_CAP: usize = 10_000;
/// Per-second buckets of a sparkline.
pub const SPARK_SECS: usize = 60;

/// What a board row counts: a cause's verdicts; for `unexplained`, those
/// about one kind of event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Label {
    pub cause: Cause,
    pub kind: Option<EventKind>,
}

impl Label {
    pub fn of(v: &Verdict) -> Self {
        Self {
            cause: v.cause,
            kind: v.unexplained_kind(),
        }
    }

    /// The cause; for `unexplained`, with the kind of event in short
    /// ("unexplained rst in"), to fit the board's column.
    pub fn name(self) -> String {
        let short = match self.kind {
            Some(EventKind::ResetReceived) => "rst in",
            Some(EventKind::ResetSent) => "rst out",
            Some(EventKind::SocketError) => "error",
            Some(other) => other.as_str(),
            None => return self.cause.as_str().to_string(),
        };
        format!("{} {short}", self.cause.as_str())
    }
}

/// Who suffered: the pod when attribution found it, else the netns. A pod
/// is keyed by its uid too: without the host's pod logs attribution names
/// pods by uid only, with an empty namespace and name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Subject<'a> {
    Pod {
        namespace: &'a str,
        name: &'a str,
        uid: &'a str,
    },
    Netns(u32),
}

impl<'a> Subject<'a> {
    pub fn of(pod: Option<&'a PodRef>, netns: u32) -> Self {
        match pod {
            Some(p) => Subject::Pod {
                namespace: &p.namespace,
                name: &p.name,
                uid: &p.uid,
            },
            None => Subject::Netns(netns),
        }
    }
}

/// A subject and a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Pair<'a> {
    pub subject: Subject<'a>,
    pub dst: (IpAddr, u16),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Key<'a> {
    pub pair: Pair<'a>,
    pub label: Label,
}

fn hash_of(value: impl Hash) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// Occurrences per second over the last `SPARK_SECS` seconds, in a ring.
#[derive(Clone, Debug)]
pub struct Spark {
    buckets: [u32; SPARK_SECS],
    /// Newest second written (UNIX seconds).
    last: u64,
}

impl Spark {
    pub fn new() -> Self {
        Self {
            buckets: [0; SPARK_SECS],
            last: 0,
        }
    }

    pub fn add(&mut self, sec: u64, n: u64) {
        let span = SPARK_SECS as u64;
        if sec > self.last {
            // Zero the seconds skipped since the last write.
            if sec - self.last >= span {
                self.buckets = [0; SPARK_SECS];
            } else {
                for s in self.last + 1..=sec {
                    self.buckets[(s % span) as usize] = 0;
                }
            }
            self.last = sec;
        } else if self.last - sec >= span {
            return;
        }
        let b = &mut self.buckets[(sec % span) as usize];
        *b = b.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
    }

    pub fn at(&self, sec: u64) -> u32 {
        if sec <= self.last && self.last - sec < SPARK_SECS as u64 {
            self.buckets[(sec % SPARK_SECS as u64) as usize]
        } else {
            0
        }
    }

    /// Counts of the `SPARK_SECS` seconds ending at `now`, oldest first.
    pub fn series(&self, now: u64) -> [u32; SPARK_SECS] {
        let mut out = [0; SPARK_SECS];
        let first = (now + 1).saturating_sub(SPARK_SECS as u64);
        for (i, slot) in out.iter_mut().enumerate() {
            *slot = self.at(first + i as u64);
        }
        out
    }
}

/// Sums verdict counts: a verdict re-emitted for the same aggregate (same
/// `first_seen`) updates it, a new `first_seen` starts another.
#[derive(Clone, Debug, Default)]
pub struct VerdictCount {
    closed: u64,
    first_seen: Option<SystemTime>,
    current: u64,
}

impl VerdictCount {
    pub fn update(&mut self, first_seen: SystemTime, count: u64) -> u64 {
        if self.first_seen == Some(first_seen) {
            self.current = self.current.max(count);
        } else {
            self.closed += self.current;
            self.first_seen = Some(first_seen);
            self.current = count;
        }
        self.closed + self.current
    }
}

/// The owned form of `Subject`, kept in the row.
#[derive(Clone, Debug)]
enum OwnedSubject {
    Pod {
        namespace: String,
        name: String,
        uid: String,
    },
    Netns(u32),
}

#[derive(Clone, Debug)]
pub struct Row {
    pub id: u64,
    subject_key: OwnedSubject,
    pub label: Label,
    /// "namespace/pod", "uid <uid> container <id>", "netns <name>" or "netns <inode>".
    pub subject: String,
    pub src: Endpoint,
    pub dst: Endpoint,
    /// What the board shows as the destination: the service or address, or
    /// what a verdict without one is about ("conntrack table of netns x").
    pub target: String,
    pub count: u64,
    pub first_seen: SystemTime,
    pub last_seen: SystemTime,
    pub confidence: Option<Confidence>,
    /// The newest verdict of a cause row.
    pub verdict: Option<Box<Verdict>>,
    /// Occurrences per second, from the verdict's counts.
    pub spark: Spark,
    pub verdict_count: VerdictCount,
    /// Lowercase text the filter matches against.
    pub haystack: String,
    /// Ingestion sequence of the last update, for eviction.
    touched: u64,
}

impl Row {
    pub fn key(&self) -> Key<'_> {
        let subject = match &self.subject_key {
            OwnedSubject::Pod {
                namespace,
                name,
                uid,
            } => Subject::Pod {
                namespace,
                name,
                uid,
            },
            OwnedSubject::Netns(n) => Subject::Netns(*n),
        };
        Key {
            pair: Pair {
                subject,
                dst: (self.dst.ip, self.dst.port),
            },
            label: self.label,
        }
    }
}

/// Who and where, as a new row shows them.
pub struct RowEnds {
    pub subject: String,
    pub src: Endpoint,
    pub dst: Endpoint,
    pub target: String,
}

#[derive(Default)]
pub struct Board {
    slots: Vec<Option<Row>>,
    free: Vec<usize>,
    len: usize,
    /// Key hash -> slots (more than one only on a hash collision).
    index: HashMap<u64, Vec<usize>>,
    next_id: u64,
    touch: u64,
}

impl Board {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn rows(&self) -> impl Iterator<Item = &Row> {
        self.slots.iter().flatten()
    }

    pub fn row_mut(&mut self, slot: usize) -> Option<&mut Row> {
        self.slots.get_mut(slot).and_then(Option::as_mut)
    }

    fn row(&self, slot: usize) -> Option<&Row> {
        self.slots.get(slot).and_then(Option::as_ref)
    }

    pub fn find(&self, key: Key) -> Option<usize> {
        self.index
            .get(&hash_of(key))?
            .iter()
            .copied()
            .find(|&s| self.row(s).is_some_and(|r| r.key() == key))
    }

    /// Marks the row as just updated.
    pub fn touch(&mut self, slot: usize) {
        self.touch += 1;
        let touch = self.touch;
        if let Some(r) = self.row_mut(slot) {
            r.touched = touch;
        }
    }

    /// Adds a row for `key` (not on the board yet) and returns its slot.
    pub fn insert(&mut self, key: Key, ends: RowEnds, time: SystemTime) -> usize {
        if self.len >= BOARD_CAP {
            self.evict();
        }
        let RowEnds {
            subject,
            src,
            dst,
            target,
        } = ends;
        let mut haystack = format!("{subject} {} {dst} {target}", key.label.name());
        if let Some(s) = &dst.service {
            haystack.push_str(&format!(" {}/{}", s.namespace, s.name));
        }
        self.next_id += 1;
        let row = Row {
            id: self.next_id,
            subject_key: match key.pair.subject {
                Subject::Pod {
                    namespace,
                    name,
                    uid,
                } => OwnedSubject::Pod {
                    namespace: namespace.into(),
                    name: name.into(),
                    uid: uid.into(),
                },
                Subject::Netns(n) => OwnedSubject::Netns(n),
            },
            label: key.label,
            subject,
            src,
            dst,
            target,
            count: 0,
            first_seen: time,
            last_seen: time,
            confidence: None,
            verdict: None,
            spark: Spark::new(),
            verdict_count: VerdictCount::default(),
            haystack: haystack.to_lowercase(),
            touched: 0,
        };
        let slot = match self.free.pop() {
            Some(s) => {
                self.slots[s] = Some(row);
                s
            }
            None => {
                self.slots.push(Some(row));
                self.slots.len() - 1
            }
        };
        self.len += 1;
        self.index.entry(hash_of(key)).or_default().push(slot);
        self.touch(slot);
        slot
    }

    /// Drops the least recently updated tenth in one pass: O(1) amortized
    /// per inserted row.
    fn evict(&mut self) {
        let mut touched: Vec<u64> = self.rows().map(|r| r.touched).collect();
        let (_, &mut keep_from, _) = touched.select_nth_unstable(BOARD_CAP / 10);
        for slot in 0..self.slots.len() {
            if self.row(slot).is_none_or(|r| r.touched >= keep_from) {
                continue;
            }
            let Some(row) = self.slots[slot].take() else {
                continue;
            };
            self.len -= 1;
            self.free.push(slot);
            remove_slot(&mut self.index, hash_of(row.key()), slot);
        }
    }
}

fn remove_slot(map: &mut HashMap<u64, Vec<usize>>, hash: u64, slot: usize) {
    if let Some(slots) = map.get_mut(&hash) {
        slots.retain(|&s| s != slot);
        if slots.is_empty() {
            map.remove(&hash);
        }
    }
}

/// Who a verdict is about: its pod, else its network namespace.
pub fn subject_label(v: &Verdict) -> String {
    match (&v.pod, &v.netns_name) {
        (Some(p), _) => p.to_string(),
        (None, Some(name)) => format!("netns {name}"),
        (None, None) => format!("netns {}", v.netns),
    }
}

/// Where a verdict's connections went: the service when known (it says
/// more than a ClusterIP), else the address. A verdict without a
/// destination says what it is about instead.
pub fn target_label(v: &Verdict) -> String {
    let dst = &v.dst;
    if !dst.is_unspecified() {
        return match &dst.service {
            Some(s) => format!("{}/{}:{}", s.namespace, s.name, dst.port),
            None => dst.to_string(),
        };
    }
    let netns = |inode: u32| match &v.netns_name {
        Some(name) if inode == v.netns => format!("netns {name}"),
        _ => format!("netns {inode}"),
    };
    let evidence = |key: &str| v.evidence.get(key);
    if v.cause == Cause::ConntrackTableFull {
        let inode = evidence("ct_netns")
            .and_then(serde_json::Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(v.netns);
        return format!("conntrack table of {}", netns(inode));
    }
    if v.cause == Cause::ListenOverflow {
        return if v.src.port == 0 {
            format!("listen queues of {}", netns(v.netns))
        } else {
            format!("listen queue of port {}", v.src.port)
        };
    }
    if let Some(addr) = evidence("bind_addr").and_then(serde_json::Value::as_str) {
        return format!("bind() to {addr}");
    }
    if !v.src.is_unspecified() {
        return format!("from {}", v.src);
    }
    format!("{} (no connection)", netns(v.netns))
}
