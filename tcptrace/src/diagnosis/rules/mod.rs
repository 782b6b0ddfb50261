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
        keepalive_race_server_side, listen_overflow, listen_overflow_seen_by_client,
        netfilter_drop, nodeport_collision, peer_abort, peer_lost_connection, pmtu_black_hole,
        port_exhaustion, refused_server_side, rejected, retransmit_storm, slow_connect,
        snat_port_exhaustion, syn_timeout, table_full, table_full_syn, tcp_stack_drop, unexplained,
        unreachable,
    },
    ledger::{End, Ends, Ledger, Open, Origin, is_reset, is_terminal},
};
use crate::model::{
    Cause, Confidence, Endpoint, Errno, Event, EventKind, IdentityLevel, Reason, Severity, StormId,
    TcpDetail, TcpFlags, TcpState, Unaccounted, Verdict, VerdictKey,
    facts::{
        ConntrackFacts, ConntrackStats, DropRule, ListenStats, NetnsFacts, NodeFacts, RuleTarget,
    },
};

mod aggregate;
mod config;
mod counters;
mod paths;
mod socket;
mod storms;

use super::window::{
    MAX_RECENT, elapsed, evict_oldest, is_bare_syn, prune, push_bounded, same_conn, within,
};
use aggregate::{Agg, event_of};
pub use config::DiagnoserConfig;
use paths::{REJECT_RULES_WAIT, RULES_WAIT_RETRANSMITS, is_icmp_error};
use socket::{SockKey, SockState};

/// Data retransmits of an ESTABLISHED socket this many times in a row with
/// an idle path make a black hole "likely" before the socket times out.
const BLACK_HOLE_RETRANSMITS: u32 = 3;

#[derive(Default)]
pub struct Diagnoser {
    cfg: DiagnoserConfig,
    socks: HashMap<SockKey, SockState>,
    aggs: HashMap<VerdictKey, Agg>,
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
    /// Repeats whose first record's verdict is not known yet, since when.
    repeats_waiting: VecDeque<(Event, u64, SystemTime)>,
    /// Storms' first resets sent (their client end and namespace), until
    /// their connection is accounted.
    storm_resets: Vec<(StormId, End, u32)>,
    /// Where each storm's first reset sent went: the verdict, and whether
    /// it was made from that reset (an occurrence) or took it as a reset.
    storm_accounts: HashMap<StormId, (VerdictKey, bool)>,
    /// Re-emissions of repeated verdicts counted by [`Self::repeat`].
    due: Vec<Verdict>,
    /// Aggregated verdicts whose counts changed, for the live sinks.
    live: Vec<Verdict>,
    /// Resets and errors waiting for a cause.
    ledger: Ledger<VerdictKey>,
    /// Packets of a connection (by its client's end) a netfilter rule
    /// dropped, and where.
    path_drops: HashMap<End, (SystemTime, PathDrop)>,
    /// Connects a netfilter rule rejected, waiting for the rules of the
    /// namespace that dropped their SYN to be read.
    rejections: VecDeque<(Event, Refusal, SystemTime)>,
    /// SYNs netfilter dropped, by time: a source NAT rewrote some of them
    /// before they died, so only the time ties them to their connection.
    syn_drops: VecDeque<Event>,
    /// Listen queue overflows seen lately, for the connects they starved.
    overflows: VecDeque<counters::Overflow>,
    /// Failures the kernel counted whose first record's verdict never
    /// came (or that waited past the bound): in the stream, in no verdict.
    repeats_unattributed: u64,
    /// Resets that came after their connection's verdict was evicted.
    resets_unaccounted: u64,
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

impl Diagnoser {
    pub fn new(cfg: DiagnoserConfig) -> Self {
        Self {
            ledger: Ledger::new(cfg.correlation_window, cfg.max_socks.saturating_mul(4)),
            cfg,
            ..Self::default()
        }
    }

    /// Failures left out of every verdict by the bounds, so far.
    pub fn unaccounted(&self) -> Unaccounted {
        Unaccounted {
            ledger_full: self.ledger.overflowed,
            repeats: self.repeats_unattributed,
            evicted_resets: self.resets_unaccounted,
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
        if let Some(storm) = ev.storm
            && ev.kind == EventKind::ResetSent
            && self.storm_resets.len() < self.cfg.max_keys
        {
            self.storm_resets.push((storm, ends.client, ev.netns));
        }
        self.note_storm_accounts();
        self.take_output(out)
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
        let mut out = std::mem::take(&mut self.due);
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
            if self.add_repeats(&first, n, now) {
                continue;
            }
            if elapsed(since, now) < give_up {
                self.repeats_waiting.push_back((first, n, since));
            } else {
                self.repeats_unattributed += n;
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
            if !self.add_repeats(&first, n, now) {
                self.repeats_unattributed += n;
            }
        }
        out.append(&mut self.due);
        for a in self.aggs.values_mut().filter(|a| a.pending) {
            a.pending = false;
            a.last_emitted = now;
            a.v.time = now;
            out.push(a.v.clone());
        }
        out.sort_by_key(|v| v.first_seen);
        out.dedup_by(|a, b| a.key() == b.key() && a.count <= b.count);
        out
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
            e.state == Some(TcpState::TimeWait) || e.reason == Some(Reason::TcpTimewaitSocket)
        }) {
            keepalive_race_server_side(tw)
        } else if let Some(no_socket) =
            sent(&|e| e.reason == Some(Reason::NoSocket) && is_bare_syn(e.tcp_flags))
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
                    ev.reason.as_ref().map_or("none", Reason::as_str)
                ),
            );
        }
        (out, not_checked)
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
                        // Only drops of its SYNs say where they died.
                        let drop = self
                            .path_drop(ends, ev.time)
                            .filter(|d| is_bare_syn(d.flags));
                        let c = slow_connect(ev, h, drop);
                        self.conclude(&key, &c);
                        return vec![c];
                    }
                }
                if ev.old_state == Some(TcpState::SynSent)
                    && state == Some(TcpState::Close)
                    && s.concluded.is_none()
                {
                    // The error that ended it (an ICMP error, reported
                    // with the state change when its error report is not).
                    if let Some(errno) = ev.errno.filter(|e| is_icmp_error(*e)) {
                        return self.refused(&key, ev, facts, Refusal::Icmp(errno));
                    }
                    if s.syn_retrans > 0 {
                        return self.syn_failed(&key, ev, facts);
                    }
                    // Closed at once, its SYN dropped by netfilter: an
                    // answer the client did not report (a hard ICMP error
                    // without its error report, or its own quick timeout).
                    if self.rejecting_drop(ends, ev.time).is_some() {
                        return self.refused(&key, ev, facts, Refusal::Unseen);
                    }
                    // Ended before any retransmit, without a reset, an error
                    // or a drop seen: what ended it is unknown here (an ICMP
                    // error handled where no hook sees it, or its own close).
                    let (ruled_out, mut not_checked) = self.ruled_out(ev, ends, facts);
                    not_checked.push(Cause::Unreachable.as_str());
                    let server = ev.dst.clone();
                    let c = unexplained(ev, &server, 0, &ruled_out, &not_checked);
                    self.conclude(&key, &c);
                    return vec![c];
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
            EventKind::ResetSent if ev.reason == Some(Reason::NoSocket) => {
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
            EventKind::Drop if ev.reason.as_ref().is_some_and(Reason::is_tcp_stack) => {
                if is_harmless_stack_drop(ev) {
                    return vec![];
                }
                self.tcp_stack_drop(&key, ev)
            }
            EventKind::Drop => {
                if ev.reason == Some(Reason::NetfilterDrop) && is_bare_syn(ev.tcp_flags) {
                    prune(&mut self.syn_drops, ev.time, self.cfg.correlation_window);
                    push_bounded(&mut self.syn_drops, ev.clone());
                }
                // Noted also when a full table explains it: a rule may
                // have dropped it all the same.
                self.note_path_drop(ev, ends);
                self.netfilter_drop(ev, facts)
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
            let window = self.cfg.correlation_window;
            let overflow = self
                .overflows
                .iter()
                .rev()
                .filter(|o| within(o.at, ev.time, window))
                .max_by_key(|o| o.listeners.iter().any(|l| l.1 == ev.dst.port))
                .map(|o| {
                    let port = o.listeners.iter().any(|l| l.1 == ev.dst.port);
                    let exact = o
                        .listeners
                        .iter()
                        .any(|l| (l.0, l.1) == (ev.dst.ip, ev.dst.port));
                    (port, exact, o.verdict.clone())
                });
            match self.dropped_by_firewall(
                ev,
                ends,
                retrans.max(RULES_WAIT_RETRANSMITS),
                facts,
                prev_syn,
            ) {
                Some(c) => c,
                None => match overflow {
                    Some((true, exact, v)) => {
                        listen_overflow_seen_by_client(ev, retrans, &v, exact)
                    }
                    o => {
                        // Only drops of its SYNs say where they died.
                        let drop = self
                            .path_drop(ends, ev.time)
                            .filter(|d| is_bare_syn(d.flags));
                        let answered = self.answer_reset_here(ends, ev.time);
                        syn_timeout(ev, retrans, drop, o.is_some(), answered.as_ref())
                    }
                },
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
            // The peer answered in between (the streak restarted): a lossy
            // path; a peer silent since the first of them may be gone.
            let heard = (s.streak as usize) < n;
            return vec![retransmit_storm(ev, n, window, heard)];
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
            // A degraded connection that now failed is a failure of its own.
            Some((cause, _)) if cause.severity() != Severity::Degraded => vec![],
            _ if (s.syn_sent && !s.established) || state_is(ev, TcpState::SynSent) => {
                self.syn_failed(key, ev, facts)
            }
            _ if !s.established && !state_is(ev, TcpState::Established) => vec![],
            _ => {
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
                .map(|m| {
                    (
                        m.reason.as_ref().map(Reason::to_string).unwrap_or_default(),
                        m.netns,
                    )
                }),
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
        let reason = ev.reason.clone().unwrap_or(Reason::Other(String::new()));
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
        self.overflows.retain(|o| within(o.at, now, window));
    }
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

/// A reset the application caused by closing abortively: the kernel says
/// so (6.10+), or, without a reason, an active reset (no segment answered)
/// from a synchronized socket.
fn is_application_abort(ev: &Event) -> bool {
    match &ev.reason {
        // tcp_disconnect(), or a listener closed with connections it never
        // accepted: the application's doing, no segment answered.
        Some(Reason::TcpState) => ev.tcp_flags.is_none(),
        Some(r) => r.is_application_abort(),
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

/// Drops the TCP stack makes by design: a keepalive or window probe (a
/// bare ACK below the window, answered all the same), and a retransmitted
/// SYN-ACK reaching a client that is connected already (its server's
/// handshake retransmits, named by their own cause).
fn is_harmless_stack_drop(ev: &Event) -> bool {
    let Some(flags) = ev.tcp_flags else {
        return false;
    };
    match ev.reason {
        Some(Reason::TcpOldSequence) => flags == TcpFlags::ACK,
        Some(Reason::TcpInvalidSyn) => flags.contains(TcpFlags::SYN | TcpFlags::ACK),
        _ => false,
    }
}

/// How close the kernel's own tcp_reset() and the reset it sends are.
const RESET_CONSEQUENCE: Duration = Duration::from_secs(1);

/// Idle time before a peer's FIN below which its close was no idle timeout
/// (servers time idle connections out after seconds).
const MIN_PEER_IDLE_MS: u64 = 500;

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::model::SockPtr;

    #[test]
    fn what_the_bounds_leave_out_is_counted() {
        let facts = NodeFacts::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut d = Diagnoser::new(DiagnoserConfig {
            max_socks: 2,
            max_keys: 2,
            ..DiagnoserConfig::default()
        });
        // The ledger holds max_socks * 4 waiting events: the ninth and
        // tenth find it full.
        for i in 0..10u16 {
            let mut ev = Event::new(
                t0,
                EventKind::ResetReceived,
                Endpoint::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 40_000 + i),
                Endpoint::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), 80),
                7,
            );
            ev.state = Some(TcpState::FinWait1);
            d.observe(&ev, &facts);
        }
        assert_eq!(d.unaccounted().ledger_full, 2);
        // Repeats whose first record never got a verdict: counted when
        // they give up, and when the waiting queue is full.
        let mut first = Event::new(
            t0,
            EventKind::ResetReceived,
            Endpoint::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), 0),
            Endpoint::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 3)), 81),
            8,
        );
        first.state = Some(TcpState::SynSent);
        for n in [5, 6, 7] {
            d.repeats(&first, n, t0);
        }
        assert_eq!(d.unaccounted().repeats, 5, "the oldest left the full queue");
        d.tick(t0 + Duration::from_secs(60), &facts, &mut |_| {});
        assert_eq!(d.unaccounted().repeats, 18);
    }

    #[test]
    fn evicted_verdicts_leave_with_their_counts() {
        let facts = NodeFacts::default();
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let mut d = Diagnoser::new(DiagnoserConfig {
            max_keys: 2,
            ..DiagnoserConfig::default()
        });
        let refused = |port: u16, src: u16, ms: u64| {
            let mut ev = Event::new(
                t0 + Duration::from_millis(ms),
                EventKind::SocketError,
                Endpoint::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)), src),
                Endpoint::new(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)), port),
                7,
            );
            ev.sock = Some(SockPtr(u64::from(src)));
            ev.state = Some(TcpState::SynSent);
            ev.errno = Some(Errno::EHOSTUNREACH);
            ev
        };
        let mut out = Vec::new();
        // Two occurrences to port 1 (the second only counted), then two
        // new keys push it out: its count leaves with it.
        out.extend(d.observe(&refused(1, 1, 0), &facts).verdicts);
        out.extend(d.observe(&refused(1, 2, 1), &facts).verdicts);
        out.extend(d.observe(&refused(2, 3, 2), &facts).verdicts);
        out.extend(d.observe(&refused(3, 4, 3), &facts).verdicts);
        out.extend(
            d.tick(t0 + Duration::from_millis(4), &facts, &mut |_| {})
                .verdicts,
        );
        let port1: Vec<u64> = out
            .iter()
            .filter(|v| v.dst.port == 1)
            .map(|v| v.count)
            .collect();
        assert_eq!(port1, vec![1, 2]);
    }

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
        assert_eq!(d.unaccounted(), Unaccounted::default());
        d.tick(t0 + Duration::from_secs(3600), &facts, &mut |_| {});
        assert!(d.socks.is_empty() && d.aggs.is_empty());
    }
}
