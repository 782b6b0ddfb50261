//! The rules: events + per-socket history + node facts -> verdicts.
//! Pure: time comes from events and `tick(now)`, facts are passed in.
use std::{
    collections::VecDeque,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use foldhash::HashMap;

use super::{
    causes::{
        Candidate, CtTrend, InvalidEvidence, PathDrop, Refusal, application_abort, bind_conflict,
        connection_refused, conntrack_invalid, idle_cause, idle_timeout, keepalive_race,
        keepalive_race_server_side, listen_overflow, netfilter_drop, nodeport_collision,
        peer_abort, peer_lost_connection, pmtu_black_hole, port_exhaustion, refused_server_side,
        rejected, retransmit_storm, slow_connect, snat_port_exhaustion, syn_timeout, table_full,
        table_full_syn, tcp_stack_drop, unexplained, unreachable,
    },
    ledger::{End, Ends, Ledger, Open, Origin, is_reset, is_terminal},
};
use crate::model::{
    Cause, Confidence, Endpoint, Errno, Event, EventKind, Fold, IdentityLevel, PodRef, TcpDetail,
    TcpFlags, TcpState, Verdict,
    facts::{
        ConntrackFacts, ConntrackStats, DropRule, ListenStats, NetnsFacts, NodeFacts, RuleTarget,
    },
};

#[derive(Clone, Debug)]
pub struct DiagnoserConfig {
    /// A verdict key is emitted at most once per interval.
    pub reemit_interval: Duration,
    /// Sockets with history kept; the least recently seen are evicted.
    pub max_socks: usize,
    /// Aggregated verdict keys kept; the least recently seen are evicted.
    pub max_keys: usize,
    /// Data retransmits of one connection within `storm_window` that make a storm.
    pub storm_retransmits: usize,
    pub storm_window: Duration,
    /// How far apart a reset pair, a packet drop and a counter rise may be.
    pub correlation_window: Duration,
    /// Socket history and verdict keys unseen for this long are forgotten.
    pub state_ttl: Duration,
    /// How long a reset or error may wait for a cause before it is
    /// reported as unexplained (the other side's reset, a counter rise).
    pub settle: Duration,
    /// Aggregated counts go to the live sinks (board, metrics) at most
    /// this often per verdict key.
    pub live_interval: Duration,
}

impl Default for DiagnoserConfig {
    fn default() -> Self {
        Self {
            reemit_interval: Duration::from_secs(10),
            max_socks: 16384,
            max_keys: 4096,
            storm_retransmits: 5,
            storm_window: Duration::from_secs(10),
            correlation_window: Duration::from_secs(30),
            state_ttl: Duration::from_secs(15 * 60),
            settle: Duration::from_secs(10),
            live_interval: Duration::from_millis(250),
        }
    }
}

/// Data retransmits of an ESTABLISHED socket this many times in a row with
/// an idle path make a black hole "likely" before the socket times out.
const BLACK_HOLE_RETRANSMITS: u32 = 3;
/// Bounds of the short correlation queues.
const MAX_RECENT: usize = 1024;

#[derive(Default)]
pub struct Diagnoser {
    cfg: DiagnoserConfig,
    socks: HashMap<SockKey, SockState>,
    aggs: HashMap<AggKey, Agg>,
    /// RSTs sent for segments that had no socket (NO_SOCKET).
    resets_sent: VecDeque<Event>,
    /// RSTs received on ESTABLISHED sockets, not explained by an idle path,
    /// waiting for the RST that caused them.
    resets_awaiting_pair: VecDeque<Event>,
    /// conntrack_invalid verdicts from a reset pair, waiting for the invalid
    /// counter to confirm them.
    pairs_awaiting_counter: VecDeque<(Event, Event)>,
    /// Segments the direct hook saw conntrack mark INVALID.
    invalid_marks: VecDeque<Event>,
    /// SYNs dropped by a full conntrack table: (the drop, its verdict).
    full_table_drops: VecDeque<(Event, Verdict)>,
    prev_ct: HashMap<u32, ConntrackStats>,
    prev_listen: HashMap<u32, ListenStats>,
    /// Latest non-zero conntrack counter deltas per netns.
    trends: HashMap<u32, CtTrend>,
    /// Storm repeats whose first record's connection has no account yet.
    /// Repeats whose first record's verdict is not known yet, since when.
    repeats_waiting: VecDeque<(Event, u64, SystemTime)>,
    /// Storms' first resets sent (their client end and namespace), until
    /// their connection is accounted.
    storm_resets: Vec<(Fold, End, u32)>,
    /// Where each storm's first reset sent went: the verdict, and whether
    /// it was made from that reset (an occurrence) or took it as a reset.
    storm_accounts: HashMap<Fold, (AggKey, bool)>,
    /// Re-emissions of repeated verdicts counted by [`Self::repeat`].
    due: Vec<Verdict>,
    /// Aggregated verdicts whose counts changed, for the live sinks.
    live: Vec<Verdict>,
    /// Resets and errors waiting for a cause.
    ledger: Ledger<AggKey>,
    /// Packets of a connection (by its client's end) a netfilter rule
    /// dropped, and where.
    path_drops: HashMap<End, (SystemTime, PathDrop)>,
    /// Connects a netfilter rule rejected, waiting for the rules of the
    /// namespace that dropped their SYN to be read.
    rejections: VecDeque<(Event, Refusal, SystemTime)>,
    /// SYNs netfilter dropped, by time: a source NAT rewrote some of them
    /// before they died, so only the time ties them to their connection.
    syn_drops: VecDeque<Event>,
}

/// What feeding the diagnoser produced.
#[derive(Debug, Default)]
pub struct Diagnosed {
    /// Verdicts for the record stream (NDJSON), at most one per key per
    /// re-emission interval.
    pub verdicts: Vec<Verdict>,
    /// Aggregated verdicts whose counts moved since they were last shown,
    /// for sinks that show counts as they change (board, metrics).
    pub live: Vec<Verdict>,
}

#[derive(Default)]
struct SockState {
    last: Option<SystemTime>,
    syn_retrans: u32,
    syn_sent: bool,
    established: bool,
    /// Data retransmits of the current streak, and the socket detail at its
    /// first one (the idle time before the failure).
    streak: u32,
    streak_start: Option<TcpDetail>,
    /// When the current streak's first retransmit was.
    streak_first_at: Option<SystemTime>,
    /// When its last SYN retransmit left.
    last_syn_at: Option<SystemTime>,
    recent_retrans: VecDeque<SystemTime>,
    storm_flagged: bool,
    /// Set once a cause explained this connection; later events of it only
    /// confirm (or add nothing).
    concluded: Option<(Cause, Confidence)>,
    /// Segments of it the TCP stack dropped.
    stack_drops: u32,
    /// When the kernel reset it after the application had closed it
    /// (FIN_WAIT): data arrived that nobody would read.
    closed_then_reset: Option<SystemTime>,
}

/// One connection: the kernel reuses freed sock addresses, so the sock
/// address and the 4-tuple (in either direction), or the namespace and the
/// 4-tuple for events without a socket.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct SockKey {
    sock: Option<u64>,
    netns: u32,
    lo: (IpAddr, u16),
    hi: (IpAddr, u16),
}

impl SockKey {
    fn of(ev: &Event) -> Self {
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

/// Who a verdict is about: the pod when known, else the namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
enum AggOwner {
    Pod(String),
    Netns(u32),
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct AggKey {
    owner: AggOwner,
    cause: Cause,
    dst: (IpAddr, u16),
    /// For `unexplained`: the kind of event no rule explained.
    kind: Option<EventKind>,
}

impl AggKey {
    /// The key of a verdict about `ev` (verdicts copy these fields from it).
    fn of(ev_pod: Option<&PodRef>, netns: u32, cause: Cause, dst: &Endpoint) -> Self {
        Self {
            owner: match ev_pod {
                Some(p) => AggOwner::Pod(p.uid.clone()),
                None => AggOwner::Netns(netns),
            },
            cause,
            dst: (dst.ip, dst.port),
            kind: None,
        }
    }

    fn of_verdict(v: &Verdict) -> Self {
        let mut key = Self::of(v.pod.as_ref(), v.netns, v.cause, &v.dst);
        if v.cause == Cause::Unexplained {
            key.kind = v
                .evidence
                .get("kind")
                .and_then(|k| k.as_str())
                .and_then(|k| EventKind::ALL.into_iter().find(|e| e.as_str() == k));
        }
        key
    }
}

struct Agg {
    v: Verdict,
    last_emitted: SystemTime,
    pending: bool,
    /// When the live sinks last saw it, and whether they are behind.
    live_shown: SystemTime,
    live_behind: bool,
}

impl Diagnoser {
    pub fn new(cfg: DiagnoserConfig) -> Self {
        Self {
            ledger: Ledger::new(cfg.correlation_window, cfg.max_socks.saturating_mul(4)),
            cfg,
            ..Self::default()
        }
    }

    /// Feeds one event; returns the verdicts due now.
    pub fn observe(&mut self, ev: &Event, facts: &NodeFacts) -> Diagnosed {
        let ends = Ends::of(ev, Some(facts));
        let origin = Origin::of(ev, ends);
        // A connection accounted for already (by the other side's reset, or
        // by an earlier event of this socket) takes the event; the rules
        // may still confirm that verdict, not add another cause.
        let joined = if is_terminal(ev) {
            self.ledger.note(ev, ends)
        } else {
            None
        };
        if let Some(key) = &joined
            && is_reset(ev)
        {
            self.add_resets(key, 1, ev.time);
        }
        let candidates = self.rules(ev, facts, ends);
        let mut out = std::mem::take(&mut self.due);
        for c in candidates {
            if joined.as_ref().is_some_and(|k| k.cause != c.v.cause) {
                continue;
            }
            out.extend(self.submit(c, Some(origin)));
        }
        if let Some(fold) = ev.fold
            && ev.kind == EventKind::ResetSent
            && self.storm_resets.len() < self.cfg.max_keys
        {
            self.storm_resets.push((fold, ends.client, ev.netns));
        }
        self.note_storm_accounts();
        self.take_output(out)
    }

    /// Remembers where storms' first resets went once their connections
    /// are accounted: the storm's repeats go there too, even when the
    /// client's end is accounted anew later.
    fn note_storm_accounts(&mut self) {
        if self.storm_resets.is_empty() {
            return;
        }
        let mut waiting = std::mem::take(&mut self.storm_resets);
        waiting.retain(
            |(fold, client, netns)| match self.ledger.accounted(*client, *netns) {
                Some(account) => {
                    if self.storm_accounts.len() < self.cfg.max_keys {
                        self.storm_accounts.insert(*fold, account);
                    }
                    false
                }
                None => true,
            },
        );
        self.storm_resets = waiting;
    }

    /// `n` repeats of `first`'s failure, counted by the kernel in a storm:
    /// each adds to the verdict `first` went to, as it would have one by
    /// one (a refused connect counts and brings its reset; the reset that
    /// refused it goes where the first one's went). Repeats of a reset whose
    /// connection is not accounted for yet wait for its account.
    pub fn repeats(&mut self, first: &Event, n: u64, now: SystemTime) -> Diagnosed {
        if !self.add_repeats(first, n, now) {
            if self.repeats_waiting.len() >= self.cfg.max_keys {
                // The oldest waited longest: the least likely to find a verdict.
                self.repeats_waiting.pop_front();
            }
            self.repeats_waiting.push_back((first.clone(), n, now));
        }
        let out = std::mem::take(&mut self.due);
        self.take_output(out)
    }

    /// A storm whose first record had no repeats: nothing will ask where
    /// it went.
    pub fn storm_done(&mut self, fold: &Fold) {
        self.storm_accounts.remove(fold);
        self.storm_resets.retain(|(f, _, _)| f != fold);
    }

    /// Adds `first`'s repeats to its verdict; false when that is not known
    /// yet.
    fn add_repeats(&mut self, first: &Event, n: u64, now: SystemTime) -> bool {
        let of = |cause| AggKey::of(first.pod.as_ref(), first.netns, cause, &first.dst);
        let (key, count, resets) = match first.kind {
            EventKind::ResetReceived => {
                let went = first
                    .fold
                    .and_then(|f| self.storm_accounts.get(&f))
                    .map(|(key, _)| key.clone());
                (went.unwrap_or_else(|| of(Cause::ConnectionRefused)), n, n)
            }
            EventKind::ConnectError => (of(Cause::PortExhaustion), n, 0),
            EventKind::BindError if first.src.port == 0 => (of(Cause::PortExhaustion), n, 0),
            EventKind::BindError => (of(Cause::BindConflict), n, 0),
            EventKind::ResetSent => {
                let Some((key, from_this_reset)) = first
                    .fold
                    .and_then(|f| self.storm_accounts.get(&f).cloned())
                else {
                    return false;
                };
                // A verdict made from the reset itself (its client is not
                // traced here): each reset is one more refused connect.
                (key, if from_this_reset { n } else { 0 }, n)
            }
            _ => return true,
        };
        let live_interval = self.cfg.live_interval;
        let reemit = self.cfg.reemit_interval;
        let Some(a) = self.aggs.get_mut(&key) else {
            return false;
        };
        if let Some(fold) = first.fold {
            self.storm_accounts.remove(&fold);
        }
        a.v.count += count;
        a.v.resets += resets;
        a.v.last_seen = a.v.last_seen.max(now);
        a.v.time = now;
        a.pending = true;
        if elapsed(a.last_emitted, now) >= reemit {
            a.pending = false;
            a.last_emitted = now;
            a.live_shown = now;
            a.live_behind = false;
            self.due.push(a.v.clone());
        } else {
            note_live(a, now, live_interval, &mut self.live);
        }
        true
    }

    /// Reads counter-based causes from the facts, accounts for resets that
    /// waited long enough, and re-emits aggregated verdicts whose interval
    /// passed. Call every second or two.
    /// `name` attributes the stand-in events of verdicts made from a
    /// namespace's counters (no event of a socket names their pod).
    pub fn tick(
        &mut self,
        now: SystemTime,
        facts: &NodeFacts,
        name: &mut dyn FnMut(&mut Event),
    ) -> Diagnosed {
        let mut out = Vec::new();
        for c in self.counter_rules(now, facts, name) {
            let ev = event_of(&c.v);
            let origin = Origin::of(&ev, Ends::of(&ev, Some(facts)));
            out.extend(self.submit(c, Some(origin)));
        }
        for (ev, how, since) in std::mem::take(&mut self.rejections) {
            let key = SockKey::of(&ev);
            let read = self
                .rejecting_drop(Ends::of(&ev, Some(facts)), ev.time)
                .is_none_or(|d| {
                    facts
                        .netns
                        .get(&d.netns)
                        .is_some_and(|f| f.drop_rules.is_some())
                });
            if !read && elapsed(since, now) < REJECT_RULES_WAIT {
                self.rejections.push_back((ev, how, since));
                continue;
            }
            let c = self.rejection(&ev, how, facts);
            self.conclude(&key, &c);
            let origin = Origin::of(&ev, Ends::of(&ev, Some(facts)));
            out.extend(self.submit(c, Some(origin)));
        }
        for waited in self.ledger.due(now, self.cfg.settle) {
            out.extend(self.settle(&waited, facts));
        }
        self.note_storm_accounts();
        // A first record that made no verdict by the time its connection
        // settled and its verdict was due never will: nor will its repeats
        // (they are in the stream as its count record).
        let give_up = self.cfg.settle + self.cfg.reemit_interval;
        for (first, n, since) in std::mem::take(&mut self.repeats_waiting) {
            if !self.add_repeats(&first, n, now) && elapsed(since, now) < give_up {
                self.repeats_waiting.push_back((first, n, since));
            }
        }
        let interval = self.cfg.reemit_interval;
        for a in self.aggs.values_mut() {
            if a.pending && elapsed(a.last_emitted, now) >= interval {
                a.pending = false;
                a.last_emitted = now;
                a.v.time = now;
                out.push(a.v.clone());
            }
            if a.live_behind {
                a.live_behind = false;
                a.live_shown = now;
                self.live.push(a.v.clone());
            }
        }
        self.expire(now);
        self.take_output(out)
    }

    /// Accounts for everything still waiting and emits every aggregated
    /// verdict with occurrences not yet reported, so that stopping loses
    /// no counts. Call once, at the end.
    pub fn finish(&mut self, now: SystemTime, facts: &NodeFacts) -> Vec<Verdict> {
        let mut out = std::mem::take(&mut self.due);
        for (ev, how, _) in std::mem::take(&mut self.rejections) {
            let c = self.rejection(&ev, how, facts);
            let origin = Origin::of(&ev, Ends::of(&ev, Some(facts)));
            out.extend(self.submit(c, Some(origin)));
        }
        for waited in self.ledger.drain() {
            out.extend(self.settle(&waited, facts));
        }
        self.note_storm_accounts();
        // Every first record is accounted for now: so are its repeats.
        for (first, n, _) in std::mem::take(&mut self.repeats_waiting) {
            self.add_repeats(&first, n, now);
        }
        out.append(&mut self.due);
        for a in self.aggs.values_mut().filter(|a| a.pending) {
            a.pending = false;
            a.last_emitted = now;
            a.v.time = now;
            out.push(a.v.clone());
        }
        out.sort_by_key(|v| v.first_seen);
        out.dedup_by(|a, b| AggKey::of_verdict(a) == AggKey::of_verdict(b) && a.count <= b.count);
        out
    }

    fn take_output(&mut self, verdicts: Vec<Verdict>) -> Diagnosed {
        Diagnosed {
            verdicts,
            live: std::mem::take(&mut self.live),
        }
    }

    /// One connection's resets and errors that no rule explained in time:
    /// a client's late segment on a closed connection or a connect to a
    /// closed port seen from the server's side, else unexplained.
    fn settle(&mut self, waited: &[Open], facts: &NodeFacts) -> Option<Verdict> {
        let first = waited.first()?;
        let resets = waited.iter().filter(|o| is_reset(&o.ev)).count() as u32;
        let sent = |pred: &dyn Fn(&Event) -> bool| {
            waited
                .iter()
                .map(|o| &o.ev)
                .find(|e| e.kind == EventKind::ResetSent && pred(e))
        };
        let mut c = if let Some(tw) = sent(&|e| {
            e.state == Some(TcpState::TimeWait)
                || e.reason.as_deref() == Some("TCP_TIMEWAIT_SOCKET")
        }) {
            keepalive_race_server_side(tw)
        } else if let Some(no_socket) =
            sent(&|e| e.reason.as_deref() == Some("NO_SOCKET") && is_bare_syn(e.tcp_flags))
        {
            refused_server_side(no_socket)
        } else {
            let server = Endpoint::new(first.ends.server.0, first.ends.server.1);
            let (ruled_out, not_checked) = self.ruled_out(&first.ev, first.ends, facts);
            let mut c = unexplained(&first.ev, &server, 0, &ruled_out, &not_checked);
            c.v.src = Endpoint::new(first.ends.client.0, first.ends.client.1);
            c
        };
        c.v.resets = u64::from(resets);
        self.submit(c, Some(Origin::of(&first.ev, first.ends)))
    }

    /// What the evidence of an unexplained event rules out, and why; and
    /// the causes it could not check.
    fn ruled_out(
        &self,
        ev: &Event,
        ends: Ends,
        facts: &NodeFacts,
    ) -> (
        serde_json::Map<String, serde_json::Value>,
        Vec<&'static str>,
    ) {
        let mut out = serde_json::Map::new();
        let mut not_checked = Vec::new();
        let mut why = |cause: Cause, text: String| {
            out.insert(cause.as_str().into(), serde_json::Value::String(text));
        };
        match (ev.tcp.as_ref(), facts.path_timeout(ev.netns)) {
            (Some(t), Some(timeout)) if t.idle_ms <= timeout.secs.saturating_mul(1000) => why(
                Cause::IdleTimeout,
                format!("idle {} ms, within the {}", t.idle_ms, timeout.describe()),
            ),
            (Some(t), Some(_)) if t.keepalive => why(
                Cause::IdleTimeout,
                "kept alive below the path's timeout".into(),
            ),
            _ => not_checked.push(Cause::IdleTimeout.as_str()),
        }
        if ev.peer_fin.is_none()
            && !matches!(ev.state, Some(TcpState::CloseWait | TcpState::LastAck))
        {
            why(
                Cause::KeepaliveRace,
                "the peer sent no FIN before it".into(),
            );
        }
        if !self.invalid_evidence(facts, ev).known() {
            why(
                Cause::ConntrackInvalid,
                "conntrack counted or marked nothing INVALID near it".into(),
            );
        }
        if self.path_drop(ends, ev.time).is_none() {
            why(
                Cause::NetfilterDrop,
                "no packet of this connection was seen dropped".into(),
            );
        }
        if is_reset(ev) {
            why(
                Cause::ApplicationAbort,
                format!(
                    "the reset's reason ({}) is not an abortive close",
                    ev.reason.as_deref().unwrap_or("none")
                ),
            );
        }
        (out, not_checked)
    }

    /// Adds resets that belong to an accounted connection to its verdict.
    fn add_resets(&mut self, key: &AggKey, n: u64, time: SystemTime) {
        let live_interval = self.cfg.live_interval;
        if let Some(a) = self.aggs.get_mut(key) {
            a.v.resets += n;
            a.pending = true;
            note_live(a, time, live_interval, &mut self.live);
        }
    }

    fn rules(&mut self, ev: &Event, facts: &NodeFacts, ends: Ends) -> Vec<Candidate> {
        let key = SockKey::of(ev);
        let state = ev.state;
        let errno = ev.errno;
        match ev.kind {
            EventKind::StateChange => {
                if matches!(state, Some(TcpState::SynSent | TcpState::SynRecv)) {
                    // A new connection, possibly on a reused sock address.
                    let s = self.sock(&key, ev.time, true);
                    s.syn_sent = state == Some(TcpState::SynSent);
                    return vec![];
                }
                let s = self.sock(&key, ev.time, false);
                if state == Some(TcpState::Established) {
                    s.established = true;
                    s.syn_sent = false;
                    if let Some(h) = &ev.handshake
                        && s.concluded.is_none()
                    {
                        let c = slow_connect(ev, h, self.path_drop(ends, ev.time));
                        self.conclude(&key, &c);
                        return vec![c];
                    }
                }
                if ev.old_state == Some(TcpState::SynSent)
                    && state == Some(TcpState::Close)
                    && s.concluded.is_none()
                {
                    if s.syn_retrans > 0 {
                        return self.syn_failed(&key, ev, facts);
                    }
                    // Closed at once, its SYN dropped by netfilter: an
                    // answer the client did not report (a hard ICMP error
                    // without its error report, or its own quick timeout).
                    if self.rejecting_drop(ends, ev.time).is_some() {
                        return self.refused(&key, ev, facts, Refusal::Unseen);
                    }
                }
                vec![]
            }
            EventKind::Retransmit if state == Some(TcpState::SynSent) => {
                let s = self.sock(&key, ev.time, false);
                s.syn_sent = true;
                s.syn_retrans += 1;
                let retrans = s.syn_retrans;
                let prev_syn = s.last_syn_at.replace(ev.time);
                if s.concluded.is_some() {
                    return vec![];
                }
                if let Some(c) = self.dropped_by_firewall(ev, ends, retrans, facts, prev_syn) {
                    self.conclude(&key, &c);
                    return vec![c];
                }
                if retrans == 1
                    && let Some(c) = nodeport_collision(ev, facts, 1)
                {
                    self.conclude(&key, &c);
                    return vec![c];
                }
                vec![]
            }
            EventKind::Retransmit if state == Some(TcpState::Established) => {
                let s = self.sock(&key, ev.time, false);
                let streak = s.streak + 1;
                let concluded = s.concluded.is_some();
                // A path that forgot an idle connection drops its segments
                // too (as INVALID): the idle timeout is the cause then.
                let idle_path = s
                    .streak_start
                    .as_ref()
                    .or(ev.tcp.as_ref())
                    .and_then(|t| idle_cause(t, ev.netns, facts))
                    .is_some();
                if !concluded
                    && !idle_path
                    && let Some(c) = self
                        .too_big(&key, ends, ev, streak)
                        .or_else(|| self.dropped_by_firewall(ev, ends, streak, facts, None))
                {
                    self.conclude(&key, &c);
                    return vec![c];
                }
                self.data_retransmit(&key, ev, facts)
            }
            EventKind::ResetReceived if state == Some(TcpState::SynSent) => {
                self.refused(&key, ev, facts, Refusal::Reset)
            }
            EventKind::ResetReceived if state == Some(TcpState::Established) => {
                self.reset_established(&key, ev, facts)
            }
            // The peer had closed the connection (its FIN: CLOSE_WAIT, or
            // LAST_ACK once this side closed too) and reset it when this side
            // wrote to it again.
            EventKind::ResetReceived
                if matches!(state, Some(TcpState::CloseWait | TcpState::LastAck)) =>
            {
                // A peer that closed a busy connection did not time it out.
                let c = match ev.peer_fin.as_ref() {
                    Some(fin) if fin.idle_before_ms < MIN_PEER_IDLE_MS => peer_abort(ev, fin),
                    fin => keepalive_race(ev, fin),
                };
                self.conclude(&key, &c);
                vec![c]
            }
            // tcp_reset() without a reset from the peer: data arrived at a
            // socket the application had closed (its reset follows).
            EventKind::ResetReceived
                if matches!(state, Some(TcpState::FinWait1 | TcpState::FinWait2)) =>
            {
                self.sock(&key, ev.time, false).closed_then_reset = Some(ev.time);
                vec![]
            }
            EventKind::ResetSent if is_application_abort(ev) || self.aborted_on_data(&key, ev) => {
                vec![application_abort(ev)]
            }
            EventKind::ResetSent if ev.reason.as_deref() == Some("NO_SOCKET") => {
                self.reset_sent(ev, facts)
            }
            // A received reset's error is implied by its record: an error
            // like these on a connect came from an ICMP message or a route.
            EventKind::SocketError
                if errno.is_some_and(is_icmp_error) && self.connecting(&key, ev) =>
            {
                let errno = errno.unwrap_or(Errno::ECONNREFUSED);
                self.refused(&key, ev, facts, Refusal::Icmp(errno))
            }
            EventKind::SocketError
                if matches!(errno, Some(Errno::EHOSTUNREACH | Errno::ENETUNREACH)) =>
            {
                if self.sock(&key, ev.time, false).concluded.is_some() {
                    return vec![];
                }
                let c = unreachable(ev, errno.unwrap_or(Errno::EHOSTUNREACH), None);
                self.conclude(&key, &c);
                vec![c]
            }
            EventKind::SocketError if errno == Some(Errno::ETIMEDOUT) => {
                self.timed_out(&key, ev, facts)
            }
            EventKind::Drop if ev.reason.as_deref().is_some_and(is_tcp_stack_drop) => {
                self.tcp_stack_drop(&key, ev)
            }
            EventKind::Drop => {
                if ev.reason.as_deref() == Some("NETFILTER_DROP") && is_bare_syn(ev.tcp_flags) {
                    prune(&mut self.syn_drops, ev.time, self.cfg.correlation_window);
                    push_bounded(&mut self.syn_drops, ev.clone());
                }
                let full = self.netfilter_drop(ev, facts);
                // A full conntrack table drops through netfilter too.
                if full.is_empty() {
                    self.note_path_drop(ev, ends);
                }
                full
            }
            EventKind::ConntrackInvalid => self.invalid_marked(ev, facts),
            EventKind::ConnectError if errno == Some(Errno::EADDRNOTAVAIL) => {
                vec![port_exhaustion(ev, facts, Confidence::Certain)]
            }
            EventKind::ConnectError
                if matches!(errno, Some(Errno::ENETUNREACH | Errno::EHOSTUNREACH)) =>
            {
                vec![unreachable(ev, errno.unwrap_or(Errno::ENETUNREACH), None)]
            }
            EventKind::BindError if errno == Some(Errno::EADDRINUSE) => {
                // bind() to port 0 fails with EADDRINUSE when no ephemeral
                // port is left (what nc reports), not on a conflict.
                if ev.src.port == 0 {
                    vec![port_exhaustion(ev, facts, Confidence::Likely)]
                } else {
                    vec![bind_conflict(ev, facts)]
                }
            }
            _ => vec![],
        }
    }

    /// History of a socket; `fresh` starts a new connection's history.
    fn sock(&mut self, key: &SockKey, time: SystemTime, fresh: bool) -> &mut SockState {
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

    fn conclude(&mut self, key: &SockKey, c: &Candidate) {
        if let Some(s) = self.socks.get_mut(key) {
            s.concluded = Some((c.v.cause, c.v.confidence));
        }
    }

    /// Whether the socket of `ev` is still connecting.
    fn connecting(&self, key: &SockKey, ev: &Event) -> bool {
        state_is(ev, TcpState::SynSent)
            || self
                .socks
                .get(key)
                .is_some_and(|s| s.syn_sent && !s.established)
    }

    /// A connect turned away (a reset, or an ICMP error): rejected by a
    /// netfilter rule that dropped its SYN, refused by the server, or
    /// unreachable.
    fn refused(
        &mut self,
        key: &SockKey,
        ev: &Event,
        facts: &NodeFacts,
        how: Refusal,
    ) -> Vec<Candidate> {
        // A reset in SYN_SENT ends a connect: what this socket address
        // concluded before was another connection (the kernel reuses both
        // socket memory and, in a small port range, the client's port).
        let s = self.sock(key, ev.time, how == Refusal::Reset);
        if s.concluded.is_some() {
            return vec![];
        }
        let ends = Ends::of(ev, Some(facts));
        if let Some(drop) = self.rejecting_drop(ends, ev.time) {
            // The rule that rejected it is read right after its namespace's
            // first drop: wait for it (at most REJECT_RULES_WAIT).
            if facts
                .netns
                .get(&drop.netns)
                .is_none_or(|f| f.drop_rules.is_none())
                && self.rejections.len() < MAX_RECENT
            {
                self.placeholder(key);
                self.rejections.push_back((ev.clone(), how, ev.time));
                return vec![];
            }
            let c = self.rejection(ev, how, facts);
            self.conclude(key, &c);
            return vec![c];
        }
        let c = match how {
            Refusal::Reset => {
                let listener = self.listener_reset(ends, ev.time);
                let confidence = if listener {
                    Confidence::Certain
                } else {
                    Confidence::Possible
                };
                // A refused storm repeats one verdict: count it without rebuilding.
                let origin = Origin::of(ev, ends);
                if self.repeat(ev, origin, Cause::ConnectionRefused, confidence) {
                    if let Some(s) = self.socks.get_mut(key) {
                        s.concluded = Some((Cause::ConnectionRefused, confidence));
                    }
                    return vec![];
                }
                connection_refused(ev, listener)
            }
            Refusal::Icmp(errno) => unreachable(ev, errno, self.path_drop(ends, ev.time)),
            Refusal::Unseen => return vec![],
        };
        self.note_storm_first(ev, &c);
        self.conclude(key, &c);
        vec![c]
    }

    /// The rejection verdict of a connect whose SYN a netfilter rule
    /// dropped, with that namespace's rule when it was read.
    fn rejection(&mut self, ev: &Event, how: Refusal, facts: &NodeFacts) -> Candidate {
        let ends = Ends::of(ev, Some(facts));
        let listener = self.listener_reset(ends, ev.time);
        let mut drop = self
            .rejecting_drop(ends, ev.time)
            .cloned()
            .unwrap_or_else(|| PathDrop::unknown(ev));
        let rules = facts
            .netns
            .get(&drop.netns)
            .and_then(|f| f.drop_rules.as_deref())
            .unwrap_or_default();
        drop.rule = matching_reject_rule(rules, &drop.dst, &ev.dst);
        let c = if drop.rule.is_none() && how == Refusal::Unseen {
            // Nothing came back that the client reported, and no rule
            // rejects: its SYN was dropped.
            drop.rule = matching_rule(rules, &drop.dst);
            netfilter_drop(ev, &drop, 0)
        } else {
            rejected(ev, &drop, how, listener)
        };
        self.note_storm_first(ev, &c);
        c
    }

    /// The first SYN netfilter dropped in the node of `ev`'s namespace
    /// within moments of `sent` (the same softirq carries a SYN from the
    /// pod to its drop), whatever its addresses after NAT.
    fn syn_drop_after(&self, sent: SystemTime, ev: &Event, facts: &NodeFacts) -> Option<PathDrop> {
        let node = facts.node_for(ev.netns);
        let d = self.syn_drops.iter().find(|d| {
            d.time >= sent
                && elapsed(sent, d.time) <= NAT_DROP_LATENCY
                && node.is_none_or(|n| n == d.netns)
                && d.netns != ev.netns
        })?;
        Some(PathDrop {
            reason: "NETFILTER_DROP".into(),
            netns: d.netns,
            place: d
                .pod
                .as_ref()
                .map(|p| format!("pod {}/{}", p.namespace, p.name))
                .or_else(|| d.netns_name.as_ref().map(|n| format!("netns {n}"))),
            location: d.location.clone(),
            drops: 1,
            dst: d.dst.clone(),
            rule: None,
        })
    }

    /// A netfilter drop of this connection's packets near `time`.
    fn rejecting_drop(&self, ends: Ends, time: SystemTime) -> Option<&PathDrop> {
        self.path_drop(ends, time)
            .filter(|d| d.reason == "NETFILTER_DROP")
    }

    /// Blocks other verdicts for a connection whose verdict waits.
    fn placeholder(&mut self, key: &SockKey) {
        if let Some(s) = self.socks.get_mut(key) {
            s.concluded = Some((Cause::FirewallReject, Confidence::Possible));
        }
    }

    /// Whether a socket lookup on this node found no listener for this
    /// connection's SYN (its reset, NO_SOCKET, answering a bare SYN).
    fn listener_reset(&self, ends: Ends, time: SystemTime) -> bool {
        let window = self.cfg.correlation_window;
        self.resets_sent.iter().rev().any(|r| {
            is_bare_syn(r.tcp_flags)
                && within(r.time, time, window)
                && Ends::of(r, None).client == ends.client
        })
    }

    /// Where a storm's first record went, for its repeats.
    fn note_storm_first(&mut self, ev: &Event, c: &Candidate) {
        if let Some(fold) = ev.fold
            && self.storm_accounts.len() < self.cfg.max_keys
        {
            self.storm_accounts
                .insert(fold, (AggKey::of_verdict(&c.v), true));
        }
    }

    /// Segments of this connection dropped on the path as too big for a
    /// link, also after its streak's first retransmit: the retransmits
    /// kept the size (an ICMP "fragmentation needed" that arrived would
    /// have shrunk them, and no drop would follow).
    fn too_big(
        &self,
        key: &SockKey,
        ends: Ends,
        ev: &Event,
        retransmits: u32,
    ) -> Option<Candidate> {
        let first = self.socks.get(key)?.streak_first_at?;
        let (at, drop) = self.path_drops.get(&ends.client)?;
        if drop.reason != "PKT_TOO_BIG"
            || *at <= first
            || !within(*at, ev.time, self.cfg.correlation_window)
        {
            return None;
        }
        Some(pmtu_black_hole(ev, drop, retransmits))
    }

    /// A connect that got no answer: a NodePort collision, a full conntrack
    /// table on the path, or a plain SYN timeout.
    fn syn_failed(&mut self, key: &SockKey, ev: &Event, facts: &NodeFacts) -> Vec<Candidate> {
        let retrans = self.socks.get(key).map_or(0, |s| s.syn_retrans);
        let window = self.cfg.correlation_window;
        let c = if let Some(c) = nodeport_collision(ev, facts, retrans) {
            c
        } else if let Some((_, full)) = self
            .full_table_drops
            .iter()
            .rev()
            .find(|(d, _)| same_conn(d, ev) && within(d.time, ev.time, window))
        {
            table_full_syn(ev, full, retrans)
        } else {
            let ends = Ends::of(ev, Some(facts));
            let prev_syn = self.socks.get(key).and_then(|s| s.last_syn_at);
            match self.dropped_by_firewall(
                ev,
                ends,
                retrans.max(RULES_WAIT_RETRANSMITS),
                facts,
                prev_syn,
            ) {
                Some(c) => c,
                None => syn_timeout(ev, retrans, self.path_drop(ends, ev.time)),
            }
        };
        self.conclude(key, &c);
        vec![c]
    }

    fn data_retransmit(&mut self, key: &SockKey, ev: &Event, facts: &NodeFacts) -> Vec<Candidate> {
        let window = self.cfg.storm_window;
        let storm_n = self.cfg.storm_retransmits;
        let s = self.sock(key, ev.time, false);
        s.established = true;
        // The peer was heard from since the streak began: a new streak.
        let restart = match (&s.streak_start, &ev.tcp) {
            (Some(first), Some(now)) => now.idle_ms < first.idle_ms,
            (None, _) => true,
            (Some(_), None) => false,
        };
        if restart {
            s.streak = 0;
            s.streak_start = ev.tcp.clone();
            s.streak_first_at = Some(ev.time);
        }
        s.streak += 1;
        s.recent_retrans.push_back(ev.time);
        while s.recent_retrans.len() > storm_n.max(1) * 4
            || s.recent_retrans
                .front()
                .is_some_and(|&t| elapsed(t, ev.time) > window)
        {
            s.recent_retrans.pop_front();
        }
        let idle = s
            .streak_start
            .as_ref()
            .and_then(|t| idle_cause(t, ev.netns, facts));
        if let Some((tcp, timeout)) = idle {
            if s.streak == BLACK_HOLE_RETRANSMITS && s.concluded.is_none() {
                let c = idle_timeout(
                    ev,
                    &tcp,
                    timeout,
                    facts,
                    "black_hole",
                    Confidence::Likely,
                    s.streak,
                );
                s.concluded = Some((c.v.cause, c.v.confidence));
                return vec![c];
            }
            return vec![];
        }
        if s.recent_retrans.len() >= storm_n && !s.storm_flagged {
            s.storm_flagged = true;
            let n = s.recent_retrans.len();
            return vec![retransmit_storm(ev, n, window)];
        }
        vec![]
    }

    fn timed_out(&mut self, key: &SockKey, ev: &Event, facts: &NodeFacts) -> Vec<Candidate> {
        let s = self.sock(key, ev.time, false);
        match s.concluded {
            // The black hole "likely" is now certain: same occurrence.
            Some((Cause::IdleTimeout, Confidence::Likely)) => {
                let Some((tcp, timeout)) = s
                    .streak_start
                    .as_ref()
                    .and_then(|t| idle_cause(t, ev.netns, facts))
                else {
                    return vec![];
                };
                let n = s.streak;
                s.concluded = Some((Cause::IdleTimeout, Confidence::Certain));
                let mut c = idle_timeout(
                    ev,
                    &tcp,
                    timeout,
                    facts,
                    "black_hole",
                    Confidence::Certain,
                    n,
                );
                c.occurrence = false;
                vec![c]
            }
            Some(_) => vec![],
            None if (s.syn_sent && !s.established) || state_is(ev, TcpState::SynSent) => {
                self.syn_failed(key, ev, facts)
            }
            None if !s.established && !state_is(ev, TcpState::Established) => vec![],
            None => {
                // Without the retransmits, the idle time at the error also
                // counts the retransmission period: only possible.
                let (start, confidence) = match &s.streak_start {
                    Some(t) => (Some(t.clone()), Confidence::Certain),
                    None => (ev.tcp.clone(), Confidence::Possible),
                };
                let n = s.streak;
                match start.as_ref().and_then(|t| idle_cause(t, ev.netns, facts)) {
                    Some((tcp, timeout)) => {
                        let c = idle_timeout(ev, &tcp, timeout, facts, "black_hole", confidence, n);
                        self.conclude(key, &c);
                        vec![c]
                    }
                    None => vec![],
                }
            }
        }
    }

    fn reset_established(
        &mut self,
        key: &SockKey,
        ev: &Event,
        facts: &NodeFacts,
    ) -> Vec<Candidate> {
        if self.sock(key, ev.time, false).concluded.is_some() {
            return vec![];
        }
        // An idle path that forgot the connection explains the reset first.
        if let Some((tcp, timeout)) = ev.tcp.as_ref().and_then(|t| idle_cause(t, ev.netns, facts)) {
            let c = idle_timeout(ev, &tcp, timeout, facts, "reset", Confidence::Certain, 0);
            self.conclude(key, &c);
            return vec![c];
        }
        let window = self.cfg.correlation_window;
        prune(&mut self.resets_sent, ev.time, window);
        let pair = self
            .resets_sent
            .iter()
            .rev()
            .find(|s| same_conn(s, ev))
            .cloned();
        let invalid = self.invalid_evidence(facts, ev);
        let c = match pair {
            Some(sent) => {
                if let Some(c) = lost_by_peer(ev, &sent, &invalid, facts) {
                    self.conclude(key, &c);
                    return vec![c];
                }
                if !invalid.known() {
                    push_bounded(&mut self.pairs_awaiting_counter, (ev.clone(), sent.clone()));
                }
                conntrack_invalid(ev, Some(&sent), &invalid, facts)
            }
            None => {
                push_bounded(&mut self.resets_awaiting_pair, ev.clone());
                if !invalid.known() {
                    return vec![];
                }
                conntrack_invalid(ev, None, &invalid, facts)
            }
        };
        self.conclude(key, &c);
        vec![c]
    }

    fn reset_sent(&mut self, ev: &Event, facts: &NodeFacts) -> Vec<Candidate> {
        let window = self.cfg.correlation_window;
        prune(&mut self.resets_awaiting_pair, ev.time, window);
        push_bounded(&mut self.resets_sent, ev.clone());
        // The reset may be reported after the one it caused.
        let Some(i) = self
            .resets_awaiting_pair
            .iter()
            .position(|r| same_conn(r, ev))
        else {
            return vec![];
        };
        let Some(received) = self.resets_awaiting_pair.remove(i) else {
            return vec![];
        };
        let invalid = self.invalid_evidence(facts, &received);
        let key = SockKey::of(&received);
        if let Some(c) = lost_by_peer(&received, ev, &invalid, facts) {
            self.conclude(&key, &c);
            return vec![c];
        }
        if !invalid.known() {
            push_bounded(
                &mut self.pairs_awaiting_counter,
                (received.clone(), ev.clone()),
            );
        }
        // Already reported on the counter alone: this confirms it.
        let known = self.socks.get(&key).is_some_and(|s| s.concluded.is_some());
        let mut c = conntrack_invalid(&received, Some(ev), &invalid, facts);
        c.occurrence = !known;
        self.conclude(&key, &c);
        vec![c]
    }

    /// The node's invalid counter near the reset `rr`, and the direct
    /// hook's record of its connection's INVALID segment.
    fn invalid_evidence(&self, facts: &NodeFacts, rr: &Event) -> InvalidEvidence {
        let window = self.cfg.correlation_window;
        InvalidEvidence {
            delta: self.invalid_rise(facts, rr.netns, rr.time),
            marked: self
                .invalid_marks
                .iter()
                .rev()
                .find(|m| same_conn(m, rr) && within(m.time, rr.time, window))
                .map(|m| (m.reason.clone().unwrap_or_default(), m.netns)),
        }
    }

    /// A segment marked INVALID: remembered for the reset it may cause, and
    /// confirms a reset pair already waiting for the counter.
    fn invalid_marked(&mut self, ev: &Event, facts: &NodeFacts) -> Vec<Candidate> {
        let window = self.cfg.correlation_window;
        prune(&mut self.invalid_marks, ev.time, window);
        push_bounded(&mut self.invalid_marks, ev.clone());
        let Some(i) = self
            .pairs_awaiting_counter
            .iter()
            .position(|(rr, _)| same_conn(rr, ev) && within(rr.time, ev.time, window))
        else {
            return vec![];
        };
        let Some((rr, sent)) = self.pairs_awaiting_counter.remove(i) else {
            return vec![];
        };
        let invalid = self.invalid_evidence(facts, &rr);
        let mut c = conntrack_invalid(&rr, Some(&sent), &invalid, facts);
        c.occurrence = false;
        vec![c]
    }

    /// The invalid counter of the node routing `netns` rose near `time`.
    fn invalid_rise(&self, facts: &NodeFacts, netns: u32, time: SystemTime) -> Option<u64> {
        let t = self.trends.get(&facts.node_for(netns)?)?;
        (t.invalid > 0 && within(t.at, time, self.cfg.correlation_window)).then_some(t.invalid)
    }

    /// A segment of a live connection the TCP stack dropped: one occurrence
    /// per connection, the drops counted in its evidence.
    fn tcp_stack_drop(&mut self, key: &SockKey, ev: &Event) -> Vec<Candidate> {
        let reason = ev.reason.clone().unwrap_or_default();
        let s = self.sock(key, ev.time, false);
        s.stack_drops += 1;
        let n = s.stack_drops;
        vec![tcp_stack_drop(ev, &reason, n, n == 1)]
    }

    /// Before 6.10 resets carry no reason: a reset answering data at a
    /// socket the kernel just reset in FIN_WAIT is the abort on data.
    fn aborted_on_data(&self, key: &SockKey, ev: &Event) -> bool {
        ev.reason.is_none()
            && ev
                .tcp_flags
                .is_some_and(|f| !f.intersects(TcpFlags::SYN | TcpFlags::RST))
            && self
                .socks
                .get(key)
                .and_then(|s| s.closed_then_reset)
                .is_some_and(|t| within(t, ev.time, RESET_CONSEQUENCE))
    }

    /// Remembers a segment dropped on its connection's path, by the
    /// connection's client end (the same before and after NAT), with where
    /// and why.
    fn note_path_drop(&mut self, ev: &Event, ends: Ends) {
        let reason = ev.reason.clone().unwrap_or_default();
        if self.path_drops.len() >= self.cfg.max_socks {
            let window = self.cfg.correlation_window;
            let now = ev.time;
            self.path_drops.retain(|_, (t, _)| within(*t, now, window));
            if self.path_drops.len() >= self.cfg.max_socks {
                return;
            }
        }
        let place = ev
            .pod
            .as_ref()
            .map(|p| format!("pod {}/{}", p.namespace, p.name))
            .or_else(|| ev.netns_name.as_ref().map(|n| format!("netns {n}")));
        // A drop elsewhere, or for another reason, replaces what was noted.
        if self
            .path_drops
            .get(&ends.client)
            .is_some_and(|(_, d)| d.reason != reason || d.netns != ev.netns)
        {
            self.path_drops.remove(&ends.client);
        }
        let entry = self.path_drops.entry(ends.client).or_insert_with(|| {
            (
                ev.time,
                PathDrop {
                    reason,
                    netns: ev.netns,
                    place,
                    location: ev.location.clone(),
                    drops: 0,
                    dst: ev.dst.clone(),
                    rule: None,
                },
            )
        });
        entry.0 = ev.time;
        entry.1.drops += 1;
    }

    /// A retransmit of a connection whose segments netfilter dropped: by
    /// a dropping rule, by a rejecting one whose answer did not end the
    /// connect, or (no rule) by a source NAT out of ports. Waits for the
    /// namespace's rules for a few retransmits.
    /// `syn_at`: when the connection's last SYN left, to find its drop by
    /// time when a source NAT rewrote it.
    fn dropped_by_firewall(
        &mut self,
        ev: &Event,
        ends: Ends,
        retransmits: u32,
        facts: &NodeFacts,
        syn_at: Option<SystemTime>,
    ) -> Option<Candidate> {
        let mut drop = match self.rejecting_drop(ends, ev.time) {
            Some(d) => d.clone(),
            None => self.syn_drop_after(syn_at?, ev, facts)?,
        };
        let ns = facts.netns.get(&drop.netns);
        let rules = ns.and_then(|f| f.drop_rules.as_deref());
        if rules.is_none() && retransmits < RULES_WAIT_RETRANSMITS {
            return None;
        }
        let rules = rules.unwrap_or_default();
        if let Some(reject) = matching_reject_rule(rules, &drop.dst, &ev.dst)
            .filter(|r| r.target() == Some(RuleTarget::Reject))
        {
            drop.rule = Some(reject);
            let listener = self.listener_reset(ends, ev.time);
            return Some(rejected(ev, &drop, Refusal::Unseen, listener));
        }
        drop.rule = matching_rule(rules, &drop.dst);
        let snat = rules.iter().find(|r| r.target() == Some(RuleTarget::Snat));
        if drop.rule.is_none()
            && let Some(snat) = snat
        {
            let trend = self
                .trends
                .get(&drop.netns)
                .filter(|t| within(t.at, ev.time, self.cfg.correlation_window))
                .copied();
            let ct = ns.and_then(|f| f.ct.as_ref());
            return Some(snat_port_exhaustion(
                ev,
                &drop,
                Some(snat),
                ct,
                trend,
                retransmits,
            ));
        }
        Some(netfilter_drop(ev, &drop, retransmits))
    }

    /// Where the packets of the connection with these ends were last seen
    /// dropped, if that was within the correlation window of `time`.
    fn path_drop(&self, ends: Ends, time: SystemTime) -> Option<&PathDrop> {
        self.path_drops
            .get(&ends.client)
            .filter(|(at, _)| within(*at, time, self.cfg.correlation_window))
            .map(|(_, d)| d)
    }

    fn netfilter_drop(&mut self, ev: &Event, facts: &NodeFacts) -> Vec<Candidate> {
        if ev.reason.as_deref() != Some("NETFILTER_DROP") || !is_bare_syn(ev.tcp_flags) {
            return vec![];
        }
        let netns = if facts.netns.get(&ev.netns).is_some_and(|f| f.ct.is_some()) {
            Some(ev.netns)
        } else {
            facts.node_for(ev.netns)
        };
        let Some((ns, ct)) = netns.and_then(|ns| Some((ns, facts.netns.get(&ns)?.ct.as_ref()?)))
        else {
            return vec![];
        };
        let trend = self
            .trends
            .get(&ns)
            .filter(|t| within(t.at, ev.time, self.cfg.correlation_window))
            .copied();
        let Some(c) = table_full(ev, ct, trend, facts, ns) else {
            return vec![];
        };
        if self.full_table_drops.len() >= MAX_RECENT {
            self.full_table_drops.pop_front();
        }
        self.full_table_drops.push_back((ev.clone(), c.clone()));
        vec![Candidate {
            v: c,
            occurrence: true,
        }]
    }

    /// Counter deltas between ticks: table-full drops on their own, the
    /// invalid counter confirming reset pairs, listen queue overflows.
    fn counter_rules(
        &mut self,
        now: SystemTime,
        facts: &NodeFacts,
        name: &mut dyn FnMut(&mut Event),
    ) -> Vec<Candidate> {
        self.prev_ct.retain(|ns, _| facts.netns.contains_key(ns));
        let mut out = self.listen_rules(now, facts, name);
        let mut nss: Vec<(&u32, &ConntrackFacts)> = facts
            .netns
            .iter()
            .filter_map(|(ns, f)| Some((ns, f.ct.as_ref()?)))
            .collect();
        nss.sort_by_key(|(ns, _)| **ns);
        for (&ns, ct) in nss {
            let Some(prev) = self.prev_ct.insert(ns, ct.stats) else {
                continue;
            };
            let t = CtTrend {
                at: now,
                invalid: ct.stats.invalid.saturating_sub(prev.invalid),
                drop: ct.stats.drop.saturating_sub(prev.drop),
                early_drop: ct.stats.early_drop.saturating_sub(prev.early_drop),
                insert_failed: ct.stats.insert_failed.saturating_sub(prev.insert_failed),
            };
            if t.invalid + t.drop + t.early_drop + t.insert_failed == 0 {
                continue;
            }
            self.trends.insert(ns, t);
            if t.drop > 0 {
                let mut ev = namespace_event(now, ns);
                name(&mut ev);
                if let Some(v) = table_full(&ev, ct, Some(t), facts, ns) {
                    out.push(Candidate {
                        v,
                        occurrence: true,
                    });
                }
            }
        }
        // Each waiting reset is confirmed by the counter of its own node.
        let window = self.cfg.correlation_window;
        let pairs = std::mem::take(&mut self.pairs_awaiting_counter);
        for (rr, sent) in pairs {
            if !within(rr.time, now, window) {
                continue;
            }
            match self.invalid_rise(facts, rr.netns, now) {
                Some(delta) => {
                    let mut invalid = self.invalid_evidence(facts, &rr);
                    invalid.delta = Some(delta);
                    let mut c = conntrack_invalid(&rr, Some(&sent), &invalid, facts);
                    c.occurrence = false;
                    out.push(c);
                }
                None => self.pairs_awaiting_counter.push_back((rr, sent)),
            }
        }
        let waiting: Vec<Event> = self.resets_awaiting_pair.iter().cloned().collect();
        for rr in waiting {
            let Some(delta) = self.invalid_rise(facts, rr.netns, now) else {
                continue;
            };
            let key = SockKey::of(&rr);
            let known = self.socks.get(&key).is_some_and(|s| s.concluded.is_some());
            if !known && within(rr.time, now, window) {
                let mut invalid = self.invalid_evidence(facts, &rr);
                invalid.delta = Some(delta);
                let c = conntrack_invalid(&rr, None, &invalid, facts);
                self.conclude(&key, &c);
                out.push(c);
            }
        }
        out
    }

    /// Listen queue overflows between ticks, per namespace: connections its
    /// listeners dropped (the kernel counts them; no packet is reported).
    fn listen_rules(
        &mut self,
        now: SystemTime,
        facts: &NodeFacts,
        name: &mut dyn FnMut(&mut Event),
    ) -> Vec<Candidate> {
        self.prev_listen
            .retain(|ns, _| facts.netns.contains_key(ns));
        let mut out = Vec::new();
        let mut nss: Vec<(&u32, &NetnsFacts)> = facts.netns.iter().collect();
        nss.sort_by_key(|(ns, _)| **ns);
        for (&ns, f) in nss {
            let Some(stats) = f.listen else { continue };
            let Some(prev) = self.prev_listen.insert(ns, stats) else {
                continue;
            };
            let overflows = stats.overflows.saturating_sub(prev.overflows);
            if overflows == 0 {
                continue;
            }
            let drops = stats.drops.saturating_sub(prev.drops);
            let mut ev = namespace_event(now, ns);
            name(&mut ev);
            out.push(listen_overflow(&ev, overflows, drops, &f.queued_listeners));
        }
        out
    }

    /// Counts another occurrence of an aggregated verdict about `ev` that
    /// already has `confidence`, without building it again: the verdict
    /// keeps its first occurrence as the example (its summary, source and
    /// process agree). False when there is no such verdict.
    fn repeat(&mut self, ev: &Event, origin: Origin, cause: Cause, confidence: Confidence) -> bool {
        let key = AggKey::of(ev.pod.as_ref(), ev.netns, cause, &ev.dst);
        if self
            .aggs
            .get(&key)
            .is_none_or(|a| a.v.confidence != confidence)
        {
            return false;
        }
        let resets = self.ledger.account(origin, key.clone(), ev.time);
        let live_interval = self.cfg.live_interval;
        let Some(a) = self.aggs.get_mut(&key) else {
            return false;
        };
        a.v.resets += resets;
        a.v.count += 1;
        a.v.last_seen = a.v.last_seen.max(ev.time);
        a.v.first_seen = a.v.first_seen.min(ev.time);
        a.v.time = ev.time;
        a.pending = true;
        if elapsed(a.last_emitted, ev.time) >= self.cfg.reemit_interval {
            a.pending = false;
            a.last_emitted = ev.time;
            a.live_shown = ev.time;
            a.live_behind = false;
            self.due.push(a.v.clone());
        } else {
            note_live(a, ev.time, live_interval, &mut self.live);
        }
        true
    }

    /// Aggregates a candidate, which accounts for the connection of
    /// `origin`; returns it when its key is due.
    fn submit(&mut self, c: Candidate, origin: Option<Origin>) -> Option<Verdict> {
        let Candidate { mut v, occurrence } = c;
        let now = v.time;
        let key = AggKey::of_verdict(&v);
        if let Some(origin) = origin {
            v.resets += self.ledger.account(origin, key.clone(), now);
        }
        if !self.aggs.contains_key(&key) {
            if self.aggs.len() >= self.cfg.max_keys {
                evict_oldest(&mut self.aggs, |a| Some(a.v.last_seen));
            }
            self.aggs.insert(
                key,
                Agg {
                    v: v.clone(),
                    last_emitted: v.time,
                    pending: false,
                    live_shown: v.time,
                    live_behind: false,
                },
            );
            return Some(v);
        }
        let live_interval = self.cfg.live_interval;
        let a = self.aggs.get_mut(&key)?;
        if occurrence {
            a.v.count += 1;
        }
        a.v.resets += v.resets;
        a.v.last_seen = a.v.last_seen.max(v.last_seen);
        a.v.first_seen = a.v.first_seen.min(v.first_seen);
        if v.confidence >= a.v.confidence {
            let (count, resets, first, last) =
                (a.v.count, a.v.resets, a.v.first_seen, a.v.last_seen);
            a.v = Verdict {
                count,
                resets,
                first_seen: first,
                last_seen: last,
                ..v
            };
        }
        a.pending = true;
        if elapsed(a.last_emitted, now) >= self.cfg.reemit_interval {
            a.pending = false;
            a.last_emitted = now;
            a.live_shown = now;
            a.live_behind = false;
            a.v.time = now;
            return Some(a.v.clone());
        }
        note_live(a, now, live_interval, &mut self.live);
        None
    }

    fn expire(&mut self, now: SystemTime) {
        let ttl = self.cfg.state_ttl;
        self.socks
            .retain(|_, s| s.last.is_some_and(|t| elapsed(t, now) <= ttl));
        self.aggs
            .retain(|_, a| a.pending || elapsed(a.v.last_seen, now) <= ttl);
        let window = self.cfg.correlation_window;
        prune(&mut self.resets_sent, now, window);
        prune(&mut self.resets_awaiting_pair, now, window);
        prune(&mut self.invalid_marks, now, window);
        prune(&mut self.syn_drops, now, window);
        self.pairs_awaiting_counter
            .retain(|(rr, _)| within(rr.time, now, window));
        self.full_table_drops
            .retain(|(d, _)| within(d.time, now, window));
        self.trends.retain(|_, t| within(t.at, now, window));
    }
}

/// Shows an aggregate's new count to the live sinks now, or at the next
/// tick when it was shown less than `interval` ago.
fn note_live(a: &mut Agg, now: SystemTime, interval: Duration, live: &mut Vec<Verdict>) {
    if elapsed(a.live_shown, now) >= interval {
        a.live_shown = now;
        a.live_behind = false;
        live.push(a.v.clone());
    } else {
        a.live_behind = true;
    }
}

/// A stand-in event for a namespace's counters (attribution names it).
fn namespace_event(now: SystemTime, netns: u32) -> Event {
    let mut ev = Event::new(
        now,
        EventKind::Drop,
        Endpoint::unspecified(),
        Endpoint::unspecified(),
        netns,
    );
    ev.identity_level = IdentityLevel::Netns;
    ev
}

/// A stand-in event with a verdict's ends and namespace, to tell which
/// end is the client.
fn event_of(v: &Verdict) -> Event {
    Event::new(
        v.time,
        EventKind::StateChange,
        v.src.clone(),
        v.dst.clone(),
        v.netns,
    )
}

fn state_is(ev: &Event, state: TcpState) -> bool {
    ev.state == Some(state) || ev.old_state == Some(state)
}

/// A reset the connection's client received from a kernel that had no
/// socket for it, sent from a namespace other than the node's (where a
/// middlebox or conntrack would answer): the peer itself lost it.
fn lost_by_peer(
    rr: &Event,
    sent: &Event,
    invalid: &InvalidEvidence,
    facts: &NodeFacts,
) -> Option<Candidate> {
    let receiver_is_client = Ends::of(rr, Some(facts)).client == (rr.src.ip, rr.src.port);
    let from_node = facts.is_node(sent.netns) || facts.node_for(rr.netns) == Some(sent.netns);
    (receiver_is_client && !from_node && sent.netns != rr.netns)
        .then(|| peer_lost_connection(rr, sent, invalid))
}

/// Both events concern the same pair of endpoints, in either direction.
fn same_conn(a: &Event, b: &Event) -> bool {
    let ep = |e: &Endpoint| (e.ip, e.port);
    (ep(&a.src) == ep(&b.src) && ep(&a.dst) == ep(&b.dst))
        || (ep(&a.src) == ep(&b.dst) && ep(&a.dst) == ep(&b.src))
}

/// A reset the application caused by closing abortively: the kernel says
/// so (6.10+), or, without a reason, an active reset (no segment answered)
/// from a synchronized socket.
fn is_application_abort(ev: &Event) -> bool {
    match ev.reason.as_deref() {
        // tcp_disconnect(), or a listener closed with connections it never
        // accepted: the application's doing, no segment answered.
        Some("TCP_STATE") => ev.tcp_flags.is_none(),
        Some(r) => APPLICATION_ABORTS.contains(&r),
        // Before 6.10 resets carry no reason: an active one (no segment
        // answered) from a synchronized socket, or one closing it (close()
        // with unread data moves it to CLOSE first).
        None => {
            ev.tcp_flags.is_none()
                && matches!(
                    ev.state,
                    Some(
                        TcpState::Close
                            | TcpState::Established
                            | TcpState::CloseWait
                            | TcpState::FinWait1
                            | TcpState::FinWait2
                            | TcpState::LastAck
                            | TcpState::Closing
                    )
                )
        }
    }
}

/// Drops by the TCP stack itself (not netfilter's, not a closed port's).
fn is_tcp_stack_drop(reason: &str) -> bool {
    (reason.starts_with("TCP_") && reason != "TCP_LISTEN_OVERFLOW")
        || matches!(reason, "SOCKET_BACKLOG" | "SOCKET_RCVBUFF")
}

/// How close the kernel's own tcp_reset() and the reset it sends are.
const RESET_CONSEQUENCE: Duration = Duration::from_secs(1);

/// Idle time before a peer's FIN below which its close was no idle timeout
/// (servers time idle connections out after seconds).
const MIN_PEER_IDLE_MS: u64 = 500;

/// Reset reasons that mean the application closed abortively.
const APPLICATION_ABORTS: [&str; 4] = [
    "TCP_ABORT_ON_CLOSE",
    "TCP_ABORT_ON_LINGER",
    "TCP_ABORT_ON_DATA",
    "TCP_DISCONNECT_WITH_DATA",
];

/// The drop rule most likely to have dropped a segment to `dst`: the
/// first that names its address and port, its port, or (counters may be
/// from before the drop) whose counter moved; ties go to a moved counter.
fn matching_rule(rules: &[DropRule], dst: &Endpoint) -> Option<DropRule> {
    let words = |r: &DropRule| -> Vec<String> {
        r.text
            .split(|c: char| !c.is_ascii_digit() && c != '.' && c != ':')
            .map(|w| w.trim_matches(['.', ':']).to_string())
            .collect()
    };
    let (ip, port) = (dst.ip.to_string(), dst.port.to_string());
    let score = |r: &DropRule| {
        let w = words(r);
        let names_ip = w.contains(&ip);
        let names_port = r
            .text
            .split(|c: char| !c.is_ascii_digit())
            .any(|w| w == port);
        let counted = r.packets.is_some_and(|n| n > 0);
        (u8::from(names_ip && names_port) * 4) + u8::from(names_port) * 2 + u8::from(counted)
    };
    rules
        .iter()
        .filter(|r| matches!(r.target(), Some(RuleTarget::Drop | RuleTarget::Reject)))
        .map(|r| (score(r), r))
        .filter(|(score, _)| *score > 0)
        .rev()
        .max_by_key(|(score, _)| *score)
        .map(|(_, r)| r.clone())
}

/// The rule that rejected a connect to `dst` (`dropped_dst` after NAT):
/// kube-proxy's rule for that Service port without endpoints, else a
/// rejecting rule as [`matching_rule`] finds one.
fn matching_reject_rule(
    rules: &[DropRule],
    dropped_dst: &Endpoint,
    dst: &Endpoint,
) -> Option<DropRule> {
    let same = |e: &Endpoint, ip, port| e.ip == ip && e.port == port;
    rules
        .iter()
        .find(|r| {
            r.no_endpoints()
                .is_some_and(|n| same(dropped_dst, n.ip, n.port) || same(dst, n.ip, n.port))
        })
        .cloned()
        .or_else(|| {
            let rejects: Vec<DropRule> = rules
                .iter()
                .filter(|r| r.target() == Some(RuleTarget::Reject) && r.no_endpoints().is_none())
                .cloned()
                .collect();
            matching_rule(&rejects, dropped_dst)
        })
}

/// Errors an ICMP message (or a missing route) raises on a connecting
/// socket; a received reset's ECONNREFUSED is not reported as an error.
fn is_icmp_error(e: Errno) -> bool {
    matches!(
        e,
        Errno::ECONNREFUSED
            | Errno::EHOSTUNREACH
            | Errno::ENETUNREACH
            | Errno::EACCES
            | Errno::EPERM
    )
}

/// SYN retransmits a netfilter drop's verdict waits for the rules of the
/// namespace that dropped (read right after its first drop).
const RULES_WAIT_RETRANSMITS: u32 = 3;

/// How long after a SYN leaves its pod a NAT drop of it is seen.
const NAT_DROP_LATENCY: Duration = Duration::from_millis(50);

/// How long a rejected connect's verdict waits for those rules.
const REJECT_RULES_WAIT: Duration = Duration::from_secs(3);

fn is_bare_syn(flags: Option<TcpFlags>) -> bool {
    flags.is_some_and(|f| f.contains(TcpFlags::SYN) && !f.contains(TcpFlags::ACK))
}

fn elapsed(from: SystemTime, to: SystemTime) -> Duration {
    to.duration_since(from).unwrap_or(Duration::ZERO)
}

fn within(a: SystemTime, b: SystemTime, window: Duration) -> bool {
    elapsed(a, b).max(elapsed(b, a)) <= window
}

fn prune(q: &mut VecDeque<Event>, now: SystemTime, window: Duration) {
    q.retain(|e| within(e.time, now, window));
}

fn push_bounded<T>(q: &mut VecDeque<T>, item: T) {
    if q.len() >= MAX_RECENT {
        q.pop_front();
    }
    q.push_back(item);
}

/// Drops the least recently seen eighth of a full map.
fn evict_oldest<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    last: impl Fn(&V) -> Option<SystemTime>,
) {
    let mut by_age: Vec<(Option<SystemTime>, K)> =
        map.iter().map(|(k, v)| (last(v), k.clone())).collect();
    let n = (map.len() / 8).max(1);
    if n < by_age.len() {
        by_age.select_nth_unstable_by_key(n, |(t, _)| *t);
    }
    for (_, k) in by_age.into_iter().take(n) {
        map.remove(&k);
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::model::SockPtr;

    #[test]
    fn memory_stays_bounded() {
        let mut d = Diagnoser::new(DiagnoserConfig {
            max_socks: 64,
            max_keys: 16,
            ..DiagnoserConfig::default()
        });
        let facts = NodeFacts::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut emitted = 0;
        for i in 0..10_000u32 {
            let ip = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + i));
            let time = t0 + Duration::from_millis(u64::from(i));
            let mut ev = Event::new(
                time,
                EventKind::SocketError,
                Endpoint::new(ip, 1),
                Endpoint::new(ip, 80),
                7,
            );
            ev.sock = Some(SockPtr(u64::from(i)));
            ev.state = Some(TcpState::SynSent);
            ev.errno = Some(Errno::EHOSTUNREACH);
            emitted += d.observe(&ev, &facts).verdicts.len();
            assert!(d.socks.len() <= 64 && d.aggs.len() <= 16, "at {i}");
        }
        // Every destination is new, so each is reported once.
        assert_eq!(emitted, 10_000);
        d.tick(t0 + Duration::from_secs(3600), &facts, &mut |_| {});
        assert!(d.socks.is_empty() && d.aggs.is_empty());
    }
}
