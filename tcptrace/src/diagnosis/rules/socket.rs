//! Per-connection history: what a socket did and whether a cause
//! explained it.

use super::*;

#[derive(Default)]
pub(super) struct SockState {
    pub(super) last: Option<SystemTime>,
    pub(super) syn_retrans: u32,
    pub(super) syn_sent: bool,
    pub(super) established: bool,
    /// Data retransmits of the current streak, and the socket detail at its
    /// first one (the idle time before the failure).
    pub(super) streak: u32,
    pub(super) streak_start: Option<TcpDetail>,
    /// When the current streak's first retransmit was.
    pub(super) streak_first_at: Option<SystemTime>,
    /// When its last SYN retransmit left.
    pub(super) last_syn_at: Option<SystemTime>,
    pub(super) recent_retrans: VecDeque<SystemTime>,
    pub(super) storm_flagged: bool,
    /// Set once a cause explained this connection; later events of it only
    /// confirm (or add nothing).
    pub(super) concluded: Option<(Cause, Confidence)>,
    /// Segments of it the TCP stack dropped.
    pub(super) stack_drops: u32,
    /// When the kernel reset it after the application had closed it
    /// (FIN_WAIT): data arrived that nobody would read.
    pub(super) closed_then_reset: Option<SystemTime>,
}

/// One connection: the kernel reuses freed sock addresses, so the sock
/// address and the 4-tuple (in either direction), or the namespace and the
/// 4-tuple for events without a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) struct SockKey {
    pub(super) sock: Option<u64>,
    pub(super) netns: u32,
    pub(super) lo: (IpAddr, u16),
    pub(super) hi: (IpAddr, u16),
}

impl SockKey {
    pub(super) fn of(ev: &Event) -> Self {
        let (a, b) = ((ev.src.ip, ev.src.port), (ev.dst.ip, ev.dst.port));
        let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
        let sock = ev.sock.map(|s| s.0);
        Self {
            sock,
            netns: if sock.is_some() { 0 } else { ev.netns },
            lo,
            hi,
        }
    }
}

impl Diagnoser {
    /// History of a socket; `fresh` starts a new connection's history.
    pub(super) fn sock(&mut self, key: &SockKey, time: SystemTime, fresh: bool) -> &mut SockState {
        if !self.socks.contains_key(key) && self.socks.len() >= self.cfg.max_socks {
            evict_oldest(&mut self.socks, |s| s.last);
        }
        let s = self.socks.entry(*key).or_default();
        if fresh {
            *s = SockState::default();
        }
        s.last = Some(time);
        s
    }

    pub(super) fn conclude(&mut self, key: &SockKey, c: &Candidate) {
        if let Some(s) = self.socks.get_mut(key) {
            s.concluded = Some((c.v.cause, c.v.confidence));
        }
    }

    /// Whether the socket of `ev` is still connecting.
    pub(super) fn connecting(&self, key: &SockKey, ev: &Event) -> bool {
        state_is(ev, TcpState::SynSent)
            || self
                .socks
                .get(key)
                .is_some_and(|s| s.syn_sent && !s.established)
    }

    /// Blocks other verdicts for a connection whose verdict waits.
    pub(super) fn placeholder(&mut self, key: &SockKey) {
        if let Some(s) = self.socks.get_mut(key) {
            s.concluded = Some((Cause::FirewallReject, Confidence::Possible));
        }
    }
}
