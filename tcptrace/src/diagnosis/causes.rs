//! Verdict builders per cause: the evidence, summary and computed fix for
//! one occurrence. Pure.
use std::time::SystemTime;

use serde_json::{Map, Value, json};

use super::judge::Checks;
use crate::model::facts::{
    ConntrackFacts, NetnsFacts, NodeFacts, PathTimeout, RuleTarget, format_port_list, wider_range,
};
use crate::model::{
    Cause, Confidence, Endpoint, Errno, Event, EventKind, Handshake, PeerFin, PortRange, Reason,
    Role, TcpDetail, TcpFlags, Verdict,
    facts::{DropRule, QueuedListener},
};

/// A verdict for one occurrence, or a confirmation of an earlier one.
pub(super) struct Candidate {
    pub(super) v: Verdict,
    pub(super) occurrence: bool,
}

/// Conntrack counter rises between two ticks, and when they were seen.
#[derive(Clone, Copy, Debug)]
pub(super) struct CtTrend {
    pub(super) at: SystemTime,
    pub(super) invalid: u64,
    pub(super) drop: u64,
    pub(super) early_drop: u64,
    pub(super) insert_failed: u64,
}

pub(super) fn obj(v: Value) -> Map<String, Value> {
    match v {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Whether a netfilter drop happened in a rule's table walk (nftables or
/// iptables-legacy), not in conntrack or a NAT.
fn dropped_by_a_rule(location: Option<&str>) -> bool {
    location.is_some_and(|l| l.starts_with("nft_do_chain") || l.starts_with("ipt_do_table"))
}

/// Who suffered, for summaries.
/// "1 segment", "3 segments".
fn counted(n: impl Into<u64>, noun: &str) -> String {
    match n.into() {
        1 => format!("1 {noun}"),
        n => format!("{n} {noun}s"),
    }
}

pub(super) fn who(ev: &Event) -> String {
    if let Some(p) = &ev.pod {
        return format!("pod {p}");
    }
    match (&ev.comm, ev.pid, &ev.netns_name) {
        (Some(c), Some(p), _) => format!("{c} ({p})"),
        (Some(c), None, _) => c.clone(),
        (None, _, Some(n)) => format!("netns {n}"),
        _ => format!("netns {}", ev.netns),
    }
}

/// Where a sysctl must be set for the event's namespace.
pub(super) fn where_set(ns: u32, ev: &Event, facts: &NodeFacts) -> String {
    if facts.is_node(ns) {
        "on the node".into()
    } else if let Some(p) = ev.pod.as_ref().filter(|_| ns == ev.netns) {
        format!("in the network namespace of pod {p}")
    } else if let Some(n) = ev.netns_name.as_ref().filter(|_| ns == ev.netns) {
        format!("in network namespace {n}")
    } else {
        format!("in network namespace {ns}")
    }
}

pub(super) fn verdict(
    ev: &Event,
    cause: Cause,
    confidence: Confidence,
    summary: String,
    evidence: Map<String, Value>,
    fix: String,
) -> Verdict {
    Verdict {
        time: ev.time,
        cause,
        confidence,
        pod: ev.pod.clone(),
        identity_level: ev.identity_level,
        netns: ev.netns,
        netns_name: ev.netns_name.clone(),
        node: ev.node.clone(),
        pid: ev.pid,
        comm: ev.comm.clone(),
        src: ev.src.clone(),
        dst: ev.dst.clone(),
        summary,
        evidence,
        fix,
        count: 1,
        resets: 0,
        first_seen: ev.time,
        last_seen: ev.time,
        severity: cause.severity(),
    }
}

/// The connection was idle longer than the path keeps state, and no
/// keepalive shorter than that timeout protected it.
pub(super) fn idle_cause(
    tcp: &TcpDetail,
    netns: u32,
    facts: &NodeFacts,
) -> Option<(TcpDetail, PathTimeout)> {
    let timeout = facts.path_timeout(netns)?;
    let limit_ms = timeout.secs.saturating_mul(1000);
    let protected = tcp.keepalive && tcp.keepalive_time_ms > 0 && tcp.keepalive_time_ms < limit_ms;
    (tcp.idle_ms > limit_ms && !protected).then(|| (tcp.clone(), timeout))
}

/// A keepalive time safely below `timeout_s`: half of it, at least 10 s
/// unless the timeout itself is that short.
pub(crate) fn suggested_keepalive_s(timeout_s: u64) -> u64 {
    timeout_s
        .div_ceil(2)
        .max(10)
        .min(timeout_s.saturating_sub(1).max(1))
}

pub(super) fn idle_timeout(
    ev: &Event,
    tcp: &TcpDetail,
    timeout: PathTimeout,
    facts: &NodeFacts,
    shape: &str,
    confidence: Confidence,
    retransmits: u32,
) -> Candidate {
    let idle_s = tcp.idle_ms / 1000;
    let ka = suggested_keepalive_s(timeout.secs);
    let place = where_set(ev.netns, ev, facts);
    let fix = if tcp.keepalive {
        format!(
            "lower the keepalive time to {ka} s (TCP_KEEPIDLE on the socket, or net.ipv4.tcp_keepalive_time={ka} {place}); it is {} s, not below the {}",
            tcp.keepalive_time_ms / 1000,
            timeout.describe()
        )
    } else {
        format!(
            "enable SO_KEEPALIVE and set net.ipv4.tcp_keepalive_time={ka} (below the {}) {place}",
            timeout.describe()
        )
    };
    let what = if shape == "reset" {
        "and was reset"
    } else {
        "and its packets are black-holed"
    };
    let mut evidence = obj(json!({
        "idle_ms": tcp.idle_ms,
        "keepalive": tcp.keepalive,
        "keepalive_time_ms": tcp.keepalive_time_ms,
        "timeout_s": timeout.secs,
        "timeout_source": timeout.source,
        "shape": shape,
    }));
    if shape != "reset" {
        evidence.insert("retransmits".into(), json!(retransmits));
    }
    Candidate {
        v: verdict(
            ev,
            Cause::IdleTimeout,
            confidence,
            format!(
                "{}: connection to {} was idle {idle_s} s, longer than the {}, {what}",
                who(ev),
                ev.dst,
                timeout.describe()
            ),
            evidence,
            fix,
        ),
        occurrence: true,
    }
}

/// What says conntrack found a connection's segment INVALID.
#[derive(Clone, Debug, Default)]
pub(super) struct InvalidEvidence {
    /// The node's `invalid` counter delta near the reset.
    pub delta: Option<u64>,
    /// The direct hook's record of the segment: (class, netns).
    pub marked: Option<(String, u32)>,
}

impl InvalidEvidence {
    pub fn known(&self) -> bool {
        self.delta.is_some() || self.marked.is_some()
    }
}

pub(super) fn conntrack_invalid(
    rr: &Event,
    sent: Option<&Event>,
    invalid: &InvalidEvidence,
    facts: &NodeFacts,
) -> Candidate {
    let node_ct = facts
        .node_for(rr.netns)
        .and_then(|ns| facts.netns.get(&ns))
        .and_then(|f| f.ct.as_ref());
    let checks = Checks::new()
        .require("invalid_counted_or_marked", invalid.known())
        .corroborate("reset_pair_on_this_node", sent.is_some())
        .or(&[Cause::PeerLostConnection]);
    let mut evidence = obj(json!({
        "invalid_delta": invalid.delta,
        "be_liberal": node_ct.map(|c| c.be_liberal),
        "invalid_drop_rule": node_ct.map(|c| c.invalid_drop_rule),
        "reset_pair": sent.is_some(),
        "tuple": format!("{} <-> {}", rr.src, rr.dst),
    }));
    if let Some(s) = sent {
        evidence.insert(
            "reset_sent_by".into(),
            json!(format!("{} (netns {})", s.src, s.netns)),
        );
    }
    if let Some((class, netns)) = &invalid.marked {
        evidence.insert("invalid_class".into(), json!(class));
        evidence.insert("invalid_netns".into(), json!(netns));
    }
    checks.record(&mut evidence);
    let counted = match (&invalid.marked, invalid.delta) {
        (Some((class, _)), _) => format!("conntrack marked its segment INVALID ({class})"),
        (None, Some(n)) => format!("node conntrack counted {n} invalid packets"),
        (None, None) => String::new(),
    };
    let why = match sent {
        Some(s) if counted.is_empty() => format!(
            "{} answered a segment that escaped reverse NAT with a reset",
            s.src
        ),
        Some(s) => format!(
            "{} answered a segment that escaped reverse NAT with a reset, and {counted}",
            s.src
        ),
        None => counted,
    };
    Candidate {
        v: verdict(
            rr,
            Cause::ConntrackInvalid,
            checks.confidence(),
            format!("{}: established connection with {} reset: {why}", who(rr), rr.dst),
            evidence,
            "sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=1 on the node, or iptables -t filter -I INPUT -m conntrack --ctstate INVALID -j DROP".into(),
        ),
        occurrence: true,
    }
}

pub(super) fn table_full(
    ev: &Event,
    ct: &ConntrackFacts,
    trend: Option<CtTrend>,
    facts: &NodeFacts,
    ns: u32,
) -> Option<Verdict> {
    let full = ct.max > 0 && ct.count.saturating_mul(100) >= ct.max.saturating_mul(95);
    let t = trend.unwrap_or(CtTrend {
        at: ev.time,
        invalid: 0,
        drop: 0,
        early_drop: 0,
        insert_failed: 0,
    });
    // early_drop happens only when the table is full; drop and
    // insert_failed also rise when a NAT finds no free tuple.
    if !full && t.early_drop == 0 {
        return None;
    }
    // A rule's drop (nft_do_chain, ipt_do_table) is the rule's, not the
    // table's, however full the table is.
    let by_a_rule = dropped_by_a_rule(ev.location.as_deref());
    if by_a_rule {
        return None;
    }
    let checks = Checks::new()
        .require("count_near_max_or_early_drop", true)
        .corroborate(
            "drop_counter_rising_or_count_at_max",
            t.drop > 0 || ct.count >= ct.max,
        );
    let target = ct.max.max(ct.count).saturating_mul(2);
    let place = if facts.is_node(ns) {
        "on the node".to_string()
    } else {
        format!("in network namespace {ns}")
    };
    let summary = if ev.dst.port == 0 {
        format!(
            "conntrack table of netns {ns} is full ({}/{}): {} new connections dropped",
            ct.count, ct.max, t.drop
        )
    } else {
        format!(
            "{}: SYN to {} dropped by netfilter: conntrack table {}/{} entries",
            who(ev),
            ev.dst,
            ct.count,
            ct.max
        )
    };
    let mut evidence = obj(json!({
        "count": ct.count,
        "max": ct.max,
        "drop_delta": t.drop,
        "early_drop_delta": t.early_drop,
        "insert_failed_delta": t.insert_failed,
        "ct_netns": ns,
    }));
    checks.record(&mut evidence);
    Some(verdict(
        ev,
        Cause::ConntrackTableFull,
        checks.confidence(),
        summary,
        evidence,
        format!(
            "sysctl -w net.netfilter.nf_conntrack_max={target} {place}; shorten net.netfilter.nf_conntrack_tcp_timeout_established (now {} s); find the top talkers with conntrack -L",
            ct.established_timeout_s
        ),
    ))
}

/// A failed connect whose source port is a NodePort (certain) or may be one.
pub(super) fn nodeport_collision(
    ev: &Event,
    facts: &NodeFacts,
    syn_retrans: u32,
) -> Option<Candidate> {
    // NodePort rules match packets addressed to the node itself, so only
    // sockets of the node's namespace (host network) can collide.
    if facts.node_netns.is_some() && !facts.is_node(ev.netns) && ev.netns != 0 {
        return None;
    }
    let port = ev.src.port;
    let ns = facts.netns.get(&ev.netns);
    let reserved = ns.map_or(Vec::new(), |f| f.reserved_ports.clone());
    let nodeports = facts.nodeports_of(ev.netns);
    let service = nodeports.get(&port);
    let (confidence, list) = if service.is_some() {
        let mut l = reserved.clone();
        l.extend(nodeports.keys().map(|&p| (p, p)));
        (Confidence::Certain, l)
    } else {
        let f: &NetnsFacts = ns?;
        let overlaps = f.unreserved_overlap(facts.nodeport_range) > 0;
        if !(facts.in_nodeport_range(port) && overlaps && !f.is_reserved(port)) {
            return None;
        }
        let mut l = reserved.clone();
        l.push(facts.nodeport_range);
        (Confidence::Possible, l)
    };
    let (lo, hi) = facts.nodeport_range;
    let place = where_set(ev.netns, ev, facts);
    let mut fix = format!(
        "sysctl -w net.ipv4.ip_local_reserved_ports={} {place}",
        format_port_list(&list)
    );
    if service.is_some() {
        fix.push_str(&format!(" (or reserve the whole NodePort range {lo}-{hi})"));
    }
    let summary = match service {
        Some(s) => format!(
            "{}: connect to {} used source port {port}, the NodePort of {s}: replies go to the Service",
            who(ev),
            ev.dst
        ),
        None => format!(
            "{}: connect to {} from source port {port}, inside the NodePort range {lo}-{hi}, got no answer",
            who(ev),
            ev.dst
        ),
    };
    Some(Candidate {
        v: verdict(
            ev,
            Cause::NodeportCollision,
            confidence,
            summary,
            obj(json!({
                "src_port": port,
                "nodeport": service,
                "nodeport_range": format!("{lo}-{hi}"),
                "port_range": ns.map(|f| format!("{}-{}", f.port_range.0, f.port_range.1)),
                "syn_retransmits": syn_retrans,
            })),
            fix,
        ),
        occurrence: true,
    })
}

pub(super) fn port_exhaustion(ev: &Event, facts: &NodeFacts, confidence: Confidence) -> Candidate {
    let ns = facts.netns.get(&ev.netns);
    let (np_lo, np_hi) = facts.nodeport_range;
    let place = where_set(ev.netns, ev, facts);
    let mut fixes = Vec::new();
    // The range the kernel read at the failure, else the facts' reading.
    let range = ev.port_range.or_else(|| {
        ns.map(|f| PortRange {
            lo: f.port_range.0,
            hi: f.port_range.1,
        })
    });
    match range {
        Some(r) => {
            let (lo, hi) = (r.lo, r.hi);
            match wider_range((lo, hi), facts.nodeport_range) {
                Some((a, b)) => fixes.push(format!(
                    "widen net.ipv4.ip_local_port_range to \"{a} {b}\" ({}, clear of the NodePort range {np_lo}-{np_hi}; now {lo}-{hi} = {}) {place}",
                    counted(u32::from(b) - u32::from(a) + 1, "port"),
                    counted(r.size(), "port")
                )),
                None => fixes.push(format!(
                    "the port range {lo}-{hi} ({}) cannot grow without overlapping the NodePort range {np_lo}-{np_hi}",
                    counted(r.size(), "port")
                )),
            }
        }
        None => fixes.push(format!(
            "widen net.ipv4.ip_local_port_range {place}, keeping it clear of the NodePort range {np_lo}-{np_hi}"
        )),
    }
    // bind() to port 0 takes an ephemeral port for no destination yet.
    let bind = ev.kind == EventKind::BindError;
    if bind {
        fixes.push(
            "bind to port 0 less often (reuse the sockets, or let connect() pick the port)".into(),
        );
    } else {
        fixes.push(format!(
            "reuse connections to {} (connection pooling, HTTP keep-alive)",
            ev.dst
        ));
        if ns.is_none_or(|f| f.tw_reuse != 1) {
            fixes.push("set net.ipv4.tcp_tw_reuse=1".into());
        }
    }
    let size = range.map(PortRange::size);
    let ports = size.map_or("an unknown number of ephemeral ports".to_string(), |n| {
        counted(n, "ephemeral port")
    });
    let (summary, target) = if bind {
        (
            format!(
                "{}: bind() to {} found no free ephemeral port ({ports})",
                who(ev),
                ev.src
            ),
            ("bind_addr", ev.src.to_string()),
        )
    } else {
        (
            format!(
                "{}: no free source port to connect to {} ({ports})",
                who(ev),
                ev.dst
            ),
            ("dst", ev.dst.to_string()),
        )
    };
    let mut evidence = obj(json!({
        "errno": ev.errno,
        "port_range": range.map(|r| r.to_string()),
        "port_range_size": size,
    }));
    evidence.insert(target.0.into(), json!(target.1));
    // Known only from the namespace's facts (gone with a short-lived one).
    if let Some(f) = ns {
        evidence.insert("reserved_in_range".into(), json!(f.reserved_in_range()));
        if !bind {
            evidence.insert("tw_reuse".into(), json!(f.tw_reuse));
        }
    }
    Candidate {
        v: verdict(
            ev,
            Cause::PortExhaustion,
            confidence,
            summary,
            evidence,
            fixes.join("; "),
        ),
        occurrence: true,
    }
}

pub(super) fn bind_conflict(ev: &Event, facts: &NodeFacts) -> Candidate {
    let port = ev.src.port;
    let ns = facts.netns.get(&ev.netns);
    let ephemeral =
        ns.map(|f| (f.port_range.0..=f.port_range.1).contains(&port) && !f.is_reserved(port));
    let mut fix = format!(
        "another socket holds {}: find it with ss -tanp 'sport = :{port}', pick another port, or set SO_REUSEADDR if a closing connection (TIME_WAIT) holds it",
        ev.src
    );
    if let (Some(true), Some(f)) = (ephemeral, ns) {
        let mut list = f.reserved_ports.clone();
        list.push((port, port));
        fix.push_str(&format!(
            "; port {port} is inside ip_local_port_range {}-{}, so outgoing connections can take it: sysctl -w net.ipv4.ip_local_reserved_ports={} {}",
            f.port_range.0,
            f.port_range.1,
            format_port_list(&list),
            where_set(ev.netns, ev, facts)
        ));
    }
    Candidate {
        v: verdict(
            ev,
            Cause::BindConflict,
            Confidence::Certain,
            format!("{}: bind to {} failed: address in use", who(ev), ev.src),
            obj(json!({
                "addr": ev.src.to_string(),
                "port": port,
                "in_ephemeral_range": ephemeral,
            })),
            fix,
        ),
        occurrence: true,
    }
}

/// A reset answered the SYN. Certain only when this node saw the socket
/// lookup that found no listener answer it (`listener_reset`); a reset
/// from beyond this node may also be a firewall's.
pub(super) fn connection_refused(ev: &Event, listener_reset: bool) -> Candidate {
    let svc = ev
        .dst
        .service
        .as_ref()
        .map(|s| {
            format!(
                " (Service {}/{}: check its endpoints and targetPort)",
                s.namespace, s.name
            )
        })
        .unwrap_or_default();
    let checks = Checks::new()
        .require("reset_answering_the_syn", true)
        .require("listener_reset_for_this_syn", listener_reset)
        .or(&[Cause::FirewallReject]);
    let mut evidence = obj(json!({ "dst": ev.dst.to_string(), "via": "reset" }));
    checks.record(&mut evidence);
    let fix = if listener_reset {
        format!(
            "nothing accepts connections on {}: check that the server listens on port {}{svc}",
            ev.dst, ev.dst.port
        )
    } else {
        format!(
            "{} answered the SYN with a reset: nothing listens on port {}{svc}, or a firewall beyond this node rejects the connection",
            ev.dst, ev.dst.port
        )
    };
    Candidate {
        v: verdict(
            ev,
            Cause::ConnectionRefused,
            checks.confidence(),
            format!("{}: connection to {} refused", who(ev), ev.dst),
            evidence,
            fix,
        ),
        occurrence: true,
    }
}

/// A connect whose SYN a full conntrack table on the path dropped: the
/// table-full verdict `full`, told about this connection.
pub(super) fn table_full_syn(ev: &Event, full: &Verdict, retrans: u32) -> Candidate {
    let mut v = verdict(
        ev,
        Cause::ConntrackTableFull,
        full.confidence,
        format!(
            "{}: connect to {} timed out because the conntrack table on the path is full and dropped its SYN",
            who(ev),
            ev.dst
        ),
        full.evidence.clone(),
        full.fix.clone(),
    );
    v.evidence.insert("syn_retransmits".into(), json!(retrans));
    Candidate {
        v,
        occurrence: true,
    }
}

/// A connect that timed out; `drop` is where its SYNs were seen dying.
/// `overflow_near`: a listener on this node overflowed meanwhile (its
/// port unknown to match), which starves connects the same way.
pub(super) fn syn_timeout(
    ev: &Event,
    retrans: u32,
    drop: Option<&PathDrop>,
    overflow_near: bool,
    answer_reset: Option<&Event>,
) -> Candidate {
    let mut evidence = obj(json!({ "dst": ev.dst.to_string(), "syn_retransmits": retrans }));
    let checks = Checks::new()
        .require("syns_retransmitted", true)
        .rule_out("a_listen_queue_overflowed_meanwhile", overflow_near)
        .rule_out("an_answer_was_reset_by_this_node", answer_reset.is_some())
        .or(&[Cause::ListenOverflow]);
    checks.record(&mut evidence);
    if let Some(r) = answer_reset {
        evidence.insert("answered_from".into(), json!(r.dst.to_string()));
        evidence.insert("answer_reset_in_netns".into(), json!(r.netns));
        let fix = format!(
            "the SYN-ACKs came back from {}, an address {} did not connect to, and its kernel reset them: the replies escaped the NAT that translated the SYNs (asymmetric routing, or a missing SNAT on the way back); make replies return through the node that translated the request",
            r.dst,
            who(ev)
        );
        return Candidate {
            v: verdict(
                ev,
                Cause::SynTimeout,
                checks.confidence(),
                format!(
                    "{}: connect to {} timed out after {retrans} SYN retransmits: its answers came from {} and were reset",
                    who(ev),
                    ev.dst,
                    r.dst
                ),
                evidence,
                fix,
            ),
            occurrence: true,
        };
    }
    let (lost, fix) = match drop {
        Some(d) => {
            evidence.insert("dropped".into(), d.evidence());
            (
                format!(": {}", d.describe()),
                format!(
                    "the SYNs to {} die on the way: {}; fix that hop",
                    ev.dst,
                    d.describe()
                ),
            )
        }
        None => (
            String::new(),
            format!(
                "nothing answered the SYNs to {}: check that it is reachable and up, that its listen queue is not full, and that no NetworkPolicy or firewall drops the traffic",
                ev.dst
            ),
        ),
    };
    Candidate {
        v: verdict(
            ev,
            Cause::SynTimeout,
            checks.confidence(),
            format!(
                "{}: connect to {} timed out after {retrans} SYN retransmits{lost}",
                who(ev),
                ev.dst
            ),
            evidence,
            fix,
        ),
        occurrence: true,
    }
}

/// A connect that timed out while the listener on its port overflowed:
/// the server's full accept queue dropped its SYNs (`overflow` is that
/// namespace's verdict).
pub(super) fn listen_overflow_seen_by_client(
    ev: &Event,
    retrans: u32,
    overflow: &Verdict,
    same_address: bool,
) -> Candidate {
    // A listener on that port overflowed; that it is this destination's
    // is known when it listens on the very address (not on 0.0.0.0).
    let checks = Checks::new()
        .require("syns_unanswered", true)
        .require("a_listener_on_its_port_overflowed_meanwhile", true)
        .corroborate("that_listener_has_its_address", same_address)
        .or(&[Cause::SynTimeout]);
    let mut evidence = overflow.evidence.clone();
    evidence.insert("syn_retransmits".into(), json!(retrans));
    evidence.insert("listener_netns".into(), json!(overflow.netns));
    checks.record(&mut evidence);
    Candidate {
        v: verdict(
            ev,
            Cause::ListenOverflow,
            checks.confidence(),
            format!(
                "{}: connect to {} timed out after {retrans} SYN retransmits: the server's accept queue was full and dropped them",
                who(ev),
                ev.dst
            ),
            evidence,
            overflow.fix.clone(),
        ),
        occurrence: true,
    }
}

/// `n` data retransmits within `window` on one established connection.
/// `heard`: the peer answered between them.
pub(super) fn retransmit_storm(
    ev: &Event,
    n: usize,
    window: std::time::Duration,
    heard: bool,
) -> Candidate {
    let tcp = ev.tcp.as_ref();
    let checks = Checks::new()
        .require("retransmits_within_the_window", true)
        .require("the_peer_answered_between_them", heard)
        .or(&[Cause::Unexplained]);
    let mut evidence = obj(json!({
        "dst": ev.dst.to_string(),
        "retransmits": n,
        "window_s": window.as_secs(),
        "srtt_us": tcp.map(|t| t.srtt_us),
        "total_retrans": tcp.map(|t| t.total_retrans),
    }));
    checks.record(&mut evidence);
    // A lossy path is at most likely: nothing here saw the losses.
    let confidence = checks.confidence().min(Confidence::Likely);
    Candidate {
        v: verdict(
            ev,
            Cause::RetransmitStorm,
            confidence,
            format!(
                "{}: {n} retransmits within {} s on the connection to {}",
                who(ev),
                window.as_secs(),
                ev.dst
            ),
            evidence,
            format!(
                "packets to or from {} are being lost: check interface drops and errors (ip -s link), MTU mismatches and congestion on the path",
                ev.dst
            ),
        ),
        occurrence: true,
    }
}

/// A client idle timeout safely below the peer's `peer_idle_ms`: three
/// quarters of it, in whole seconds, at least one.
pub(crate) fn suggested_pool_idle_s(peer_idle_ms: u64) -> u64 {
    (peer_idle_ms * 3 / 4 / 1000).max(1)
}

/// The peer closed an idle connection (its FIN) and this side wrote to it
/// afterwards: the reset answers the write. `peer` is the FIN's detail
/// when the socket recorded it.
pub(super) fn keepalive_race(ev: &Event, peer: Option<&PeerFin>) -> Candidate {
    let Some(fin) = peer else {
        // A reset in CLOSE_WAIT without the FIN's times.
        return Candidate {
            v: verdict(
                ev,
                Cause::KeepaliveRace,
                Confidence::Likely,
                format!(
                    "{}: {} closed the connection and then reset it when it was used again",
                    who(ev),
                    ev.dst
                ),
                obj(json!({ "dst": ev.dst.to_string(), "state": ev.state })),
                format!(
                    "close pooled connections to {} before the server's idle timeout and retry idempotent requests once on a reset",
                    ev.dst
                ),
            ),
            occurrence: true,
        };
    };
    let peer_s = fin.idle_before_ms as f64 / 1000.0;
    let pool_s = suggested_pool_idle_s(fin.idle_before_ms);
    Candidate {
        v: verdict(
            ev,
            Cause::KeepaliveRace,
            Confidence::Certain,
            format!(
                "{}: {} closed the connection after {peer_s:.1} s idle; it was used {:.1} s later and reset",
                who(ev),
                ev.dst,
                fin.ago_ms as f64 / 1000.0
            ),
            obj(json!({
                "dst": ev.dst.to_string(),
                "peer_idle_timeout_ms": fin.idle_before_ms,
                "fin_to_write_ms": fin.ago_ms,
                "state": ev.state,
            })),
            format!(
                "the server closes idle connections after about {peer_s:.1} s: close pooled connections to {} after {pool_s} s idle (below the server's timeout), and retry idempotent requests once on a reset",
                ev.dst
            ),
        ),
        occurrence: true,
    }
}

/// A client's late segment on a connection this server had already closed
/// (its TIME_WAIT socket answered with a reset), without the client's side
/// on this node.
pub(super) fn keepalive_race_server_side(ev: &Event) -> Candidate {
    Candidate {
        v: verdict(
            ev,
            Cause::KeepaliveRace,
            Confidence::Likely,
            format!(
                "{}: {} sent data on a connection this side had closed (TIME_WAIT) and was reset",
                who(ev),
                ev.dst
            ),
            obj(json!({
                "client": ev.dst.to_string(),
                "server": ev.src.to_string(),
                "state": ev.state,
                "reason": ev.reason,
            })),
            format!(
                "clients of {} reuse connections this server closed as idle: have them close pooled connections before this server's idle timeout, or raise it",
                ev.src
            ),
        ),
        occurrence: true,
    }
}

/// What a netfilter rule dropped of one connection, in which namespace.
#[derive(Clone, Debug)]
pub(super) struct PathDrop {
    /// The kernel's drop reason (NETFILTER_DROP, IP_INNOROUTES, ...).
    pub(super) reason: Reason,
    pub(super) netns: u32,
    /// The namespace's pod (`namespace/name`) or `ip netns` name.
    pub(super) place: Option<String>,
    pub(super) location: Option<String>,
    pub(super) drops: u32,
    /// The dropped segments' source and destination (after NAT), and the
    /// last one's flags.
    pub(super) src: Endpoint,
    pub(super) dst: Endpoint,
    pub(super) flags: Option<TcpFlags>,
    pub(super) rule: Option<DropRule>,
}

/// The connection's segments were retransmitted because a netfilter rule
/// dropped them in `drop.netns`.
pub(super) fn netfilter_drop(ev: &Event, drop: &PathDrop, retransmits: u32) -> Candidate {
    let place = drop
        .place
        .clone()
        .unwrap_or_else(|| format!("network namespace {}", drop.netns));
    let rule = drop.rule.as_ref().map(|r| r.text.clone());
    // The connection's replies were dropped, not its requests.
    let replies = if drop.dst.ip == ev.src.ip && drop.dst.port == ev.src.port {
        " (the replies)"
    } else {
        ""
    };
    let fix = match &rule {
        Some(r) => format!(
            "the rule `{r}` in {place} drops these packets: allow {} to reach {}{replies} (a NetworkPolicy of that pod, or that namespace's firewall)",
            drop.src.ip, drop.dst
        ),
        None => format!(
            "netfilter in {place} drops packets from {} to {}{replies} and no dropping rule of it was read: look at `iptables-save -c` / `nft list ruleset` there, and at `conntrack -S` (a full table or a NAT out of ports drops too)",
            drop.src.ip, drop.dst
        ),
    };
    let checks = Checks::new()
        .require("dropped_by_netfilter", true)
        .require("drop_rule_in_that_namespace", rule.is_some())
        .or(&[Cause::SnatPortExhaustion, Cause::ConntrackTableFull]);
    let mut evidence = obj(json!({
        "dst": ev.dst.to_string(),
        "dropped_dst": drop.dst.to_string(),
        "dropped_in_netns": drop.netns,
        "dropped_in": drop.place,
        "location": drop.location,
        "drops": drop.drops,
        "retransmits": retransmits,
        "rule": rule,
        "rule_packets": drop.rule.as_ref().and_then(|r| r.packets),
    }));
    checks.record(&mut evidence);
    Candidate {
        v: verdict(
            ev,
            Cause::NetfilterDrop,
            checks.confidence(),
            format!(
                "{}: packets to {} are dropped by a netfilter rule in {place}",
                who(ev),
                ev.dst
            ),
            evidence,
            fix,
        ),
        occurrence: true,
    }
}

impl PathDrop {
    /// A netfilter drop known only from its consequence.
    pub(super) fn unknown(ev: &Event) -> Self {
        Self {
            reason: Reason::NetfilterDrop,
            netns: 0,
            place: None,
            location: None,
            drops: 0,
            src: ev.src.clone(),
            dst: ev.dst.clone(),
            flags: None,
            rule: None,
        }
    }

    /// Where, why and how often, for a verdict's evidence.
    fn evidence(&self) -> Value {
        json!({
            "reason": self.reason,
            "netns": self.netns,
            "place": self.place,
            "location": self.location,
            "drops": self.drops,
            "dst": self.dst.to_string(),
        })
    }

    /// The pod or namespace the packets were dropped in.
    pub(super) fn place_or_netns(&self) -> String {
        self.place
            .clone()
            .unwrap_or_else(|| format!("network namespace {}", self.netns))
    }

    fn describe(&self) -> String {
        let place = self.place_or_netns();
        let at = self
            .location
            .as_deref()
            .map(|l| format!(" at {l}"))
            .unwrap_or_default();
        format!(
            "{} dropped in {place} ({}{at})",
            counted(self.drops, "packet"),
            self.reason
        )
    }
}

/// A connection that was established only after its handshake was
/// retransmitted: it worked, late (degraded). `drop` is where its packets
/// were seen dying, if they were.
pub(super) fn slow_connect(ev: &Event, h: &Handshake, drop: Option<&PathDrop>) -> Candidate {
    let accepted = ev.role == Some(Role::Server);
    let secs = h
        .connect_ms
        .map(|ms| format!(" ({:.1} s)", ms as f64 / 1000.0));
    let mut evidence = if accepted {
        obj(json!({ "peer": ev.dst.to_string(), "synack_retransmits": h.retransmits }))
    } else {
        obj(json!({
            "dst": ev.dst.to_string(),
            "syn_retransmits": h.retransmits,
            "connect_ms": h.connect_ms,
        }))
    };
    if let Some(d) = drop {
        evidence.insert("dropped".into(), d.evidence());
    }
    let lost = drop.map_or_else(String::new, |d| format!(": {}", d.describe()));
    let (summary, fix) = if accepted {
        (
            format!(
                "{}: accepted {} only after {} SYN-ACK retransmits{lost}",
                who(ev),
                ev.dst,
                h.retransmits
            ),
            format!(
                "SYN-ACKs to {}, or its ACKs, were lost: check the path back to that client",
                ev.dst.ip
            ),
        )
    } else {
        (
            format!(
                "{}: connected to {} only after {} SYN retransmits{}{lost}",
                who(ev),
                ev.dst,
                h.retransmits,
                secs.unwrap_or_default()
            ),
            match drop {
                Some(d) => format!(
                    "the SYNs died on the way: {}; fix that hop, then connects take one round trip again",
                    d.describe()
                ),
                None => format!(
                    "the first SYNs to {} went unanswered and tcptrace saw none of them dropped before it connected: a lossy path, a full listen queue at the server, or a stale conntrack entry for this source port",
                    ev.dst
                ),
            },
        )
    };
    let mut v = verdict(
        ev,
        Cause::SlowConnect,
        Confidence::Certain,
        summary,
        evidence,
        fix,
    );
    if accepted {
        // The destination of an accepted connection is this server.
        std::mem::swap(&mut v.src, &mut v.dst);
    }
    Candidate {
        v,
        occurrence: true,
    }
}

/// The application closed its connection abortively (unread data, or
/// SO_LINGER 0): a reset by design, not a network failure.
pub(super) fn application_abort(ev: &Event) -> Candidate {
    let why = match &ev.reason {
        Some(Reason::TcpAbortOnClose) => "closed it with unread data",
        Some(Reason::TcpAbortOnLinger) => "closed it with SO_LINGER 0",
        Some(Reason::TcpAbortOnData) => "had closed it when more data arrived",
        Some(Reason::TcpDisconnectWithData) => "disconnected it with data pending",
        Some(Reason::TcpState) => "disconnected it (or closed its listener before accepting it)",
        // Without a reason (before 6.10), a reset answering a segment.
        None if ev.tcp_flags.is_some() => "had closed it when more data arrived",
        _ => "aborted it",
    };
    Candidate {
        v: verdict(
            ev,
            Cause::ApplicationAbort,
            Confidence::Certain,
            format!("{}: {why}; the peer {} got a reset", who(ev), ev.dst),
            obj(json!({
                "peer": ev.dst.to_string(),
                "reason": ev.reason,
                "state": ev.state,
            })),
            "nothing to fix if the application meant to stop early; otherwise have it read the whole response before closing".to_string(),
        ),
        occurrence: true,
    }
}

/// The peer closed its side right after the connection was used (no idle
/// time before its FIN) and reset what this side sent next: the peer
/// application stopped early, as application_abort is on the peer's node.
pub(super) fn peer_abort(ev: &Event, fin: &PeerFin) -> Candidate {
    Candidate {
        v: verdict(
            ev,
            Cause::ApplicationAbort,
            Confidence::Likely,
            format!(
                "{}: {} closed the connection while it was in use ({} ms after the last data) and reset what followed: the peer application stopped early",
                who(ev),
                ev.dst,
                fin.idle_before_ms
            ),
            obj(json!({
                "peer": ev.dst.to_string(),
                "peer_idle_before_fin_ms": fin.idle_before_ms,
                "fin_to_reset_ms": fin.ago_ms,
                "state": ev.state,
            })),
            format!(
                "nothing to fix if {} meant to stop early; otherwise it should read the whole exchange before closing",
                ev.dst
            ),
        ),
        occurrence: true,
    }
}

/// A connection refused on this side (a SYN to a port nothing listens on)
/// whose client is not on this node.
pub(super) fn refused_server_side(ev: &Event) -> Candidate {
    Candidate {
        v: verdict(
            ev,
            Cause::ConnectionRefused,
            Confidence::Certain,
            format!(
                "{}: a connection from {} to {} was refused: nothing listens there",
                who(ev),
                ev.dst,
                ev.src
            ),
            obj(json!({ "client": ev.dst.to_string(), "port": ev.src.port, "via": "reset_sent" })),
            format!(
                "start the server on port {} or point its clients (a Service's targetPort) elsewhere",
                ev.src.port
            ),
        ),
        occurrence: true,
    }
}

/// A reset or error no rule explains, with what this occurrence's
/// evidence ruled out (`ruled_out`: cause -> why) and what could not be
/// checked (`not_checked`).
pub(super) fn unexplained(
    ev: &Event,
    server: &Endpoint,
    resets: u32,
    ruled_out: &Map<String, Value>,
    not_checked: &[&'static str],
) -> Candidate {
    let tcp = ev.tcp.as_ref();
    let mut v = verdict(
        ev,
        Cause::Unexplained,
        Confidence::Possible,
        format!(
            "{}: {} ({}) on the connection with {} that no rule explains",
            who(ev),
            ev.kind.as_str(),
            ev.reason
                .as_ref()
                .map(Reason::to_string)
                .or_else(|| ev.errno.map(|e| e.to_string()))
                .or_else(|| ev.state.map(|s| s.as_str().to_string()))
                .unwrap_or_else(|| "no detail".into()),
            server
        ),
        obj(json!({
            "kind": ev.kind.as_str(),
            "state": ev.state,
            "reason": ev.reason,
            "errno": ev.errno,
            "role": ev.role,
            "idle_ms": tcp.map(|t| t.idle_ms),
            "since_send_ms": tcp.map(|t| t.since_send_ms),
            "srtt_us": tcp.map(|t| t.srtt_us),
            "total_retrans": tcp.map(|t| t.total_retrans),
            "ruled_out": ruled_out,
            "not_checked": not_checked,
        })),
        format!(
            "no known cause: look at {server}'s logs at this time, and run `tcptrace --all-states` to see the connection's states"
        ),
    );
    v.dst = server.clone();
    v.resets = u64::from(resets);
    Candidate {
        v,
        occurrence: true,
    }
}

/// Segments of a live connection the TCP stack dropped (`drops` so far),
/// as `reason`: the connection is degraded, and the reason says why.
pub(super) fn tcp_stack_drop(ev: &Event, reason: &Reason, drops: u32, first: bool) -> Candidate {
    // The dropped segment came from the peer to this socket.
    let (local, peer) = (&ev.dst, &ev.src);
    let fix = match reason.as_str() {
        r if r.starts_with("TCP_RFC7323") => format!(
            "segments from {peer} carry TCP timestamps older than earlier ones (PAWS): hosts behind one NAT address with different timestamp clocks; give them separate source addresses (no shared SNAT or masquerade address) or turn net.ipv4.tcp_timestamps off on them"
        ),
        "TCP_OLD_SEQUENCE"
        | "TCP_INVALID_SEQUENCE"
        | "TCP_INVALID_END_SEQUENCE"
        | "TCP_OVERWINDOW" => format!(
            "segments from {peer} fall outside the receive window: a NAT or middlebox on the path rewrites or replays them, or {peer} kept sending after a reset; check conntrack's INVALID handling on the node (nf_conntrack_tcp_be_liberal) and the peer"
        ),
        "TCP_INVALID_ACK_SEQUENCE" => format!(
            "{peer} acknowledges data this side never sent: another connection's segments reach this socket (NAT port reuse); check the NAT in between"
        ),
        "TCP_ZEROWINDOW"
        | "SOCKET_RCVBUFF"
        | "SOCKET_BACKLOG"
        | "TCP_OFO_DROP"
        | "TCP_OFO_QUEUE_PRUNE" => format!(
            "the application on {local} reads too slowly: its receive buffer is full and segments from {peer} are dropped; read faster or raise its buffer (SO_RCVBUF, net.ipv4.tcp_rmem)"
        ),
        _ => format!(
            "the TCP stack drops segments from {peer} ({reason}): look at the peer and the path for malformed or stale segments"
        ),
    };
    let mut v = verdict(
        ev,
        Cause::TcpStackDrop,
        Confidence::Certain,
        format!(
            "{}: {} from {peer} dropped by the TCP stack ({reason})",
            who(ev),
            counted(drops, "segment")
        ),
        obj(json!({
            "reason": reason,
            "drops": drops,
            "location": ev.location,
            "peer": peer.to_string(),
        })),
        fix,
    );
    v.src = local.clone();
    v.dst = peer.clone();
    Candidate {
        v,
        occurrence: first,
    }
}

/// A namespace's listeners dropped `overflows` connections (their SYNs)
/// because their accept queues were full.
pub(super) fn listen_overflow(
    ev: &Event,
    overflows: u64,
    drops: u64,
    full: &[QueuedListener],
) -> Candidate {
    let listeners: Vec<String> = full
        .iter()
        .map(|l| {
            let who = match (&l.comm, l.pid) {
                (Some(c), Some(p)) => format!("{c} ({p})"),
                _ => "an unknown process".into(),
            };
            format!(
                "port {} of {who}, {} waiting to be accepted",
                l.port, l.queued
            )
        })
        .collect();
    let fix = match full.first() {
        Some(l) => format!(
            "the server on port {} accepts connections too slowly for its listen backlog: accept faster (more workers) or raise the listen() backlog and net.core.somaxconn",
            l.port
        ),
        None => "a server here accepts connections too slowly for its listen backlog: accept faster or raise the backlog and net.core.somaxconn".into(),
    };
    let mut v = verdict(
        ev,
        Cause::ListenOverflow,
        Confidence::Certain,
        format!(
            "{}: {} dropped because a listen queue was full{}",
            who(ev),
            counted(overflows, "connection attempt"),
            listeners
                .first()
                .map(|l| format!(" ({l})"))
                .unwrap_or_default()
        ),
        obj(json!({
            "listen_overflows": overflows,
            "listen_drops": drops,
            "listeners": full,
        })),
        fix,
    );
    if let Some(l) = full.first() {
        v.src = Endpoint::new(l.ip, l.port);
    }
    Candidate {
        v,
        occurrence: true,
    }
}

/// How a connect was turned away: a reset in SYN_SENT, or an ICMP error's
/// errno.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Refusal {
    Reset,
    Icmp(Errno),
    /// The client did not report the answer (an ICMP error in SYN_SENT
    /// can be soft: it retransmitted, or its connect ended otherwise).
    Unseen,
}

impl Refusal {
    /// " with a reset", or nothing when the client did not see the answer.
    fn describe(self) -> String {
        match self {
            Refusal::Reset => " with a reset".into(),
            Refusal::Icmp(e) => format!(" with an ICMP error ({e})"),
            Refusal::Unseen => String::new(),
        }
    }
}

/// A connect turned away by a netfilter rule that dropped its SYN in
/// `drop.netns` and answered for the server: kube-proxy's rule for a
/// Service without endpoints, or a firewall's or policy's REJECT.
/// `listener_reset`: a socket lookup on this node found no listener for
/// this SYN (that is a refusal, not a rejection).
pub(super) fn rejected(
    ev: &Event,
    drop: &PathDrop,
    how: Refusal,
    listener_reset: bool,
) -> Candidate {
    let place = drop.place_or_netns();
    let no_endpoints = drop
        .rule
        .as_ref()
        .and_then(DropRule::no_endpoints)
        .filter(|n| {
            (n.ip, n.port) == (drop.dst.ip, drop.dst.port)
                || (n.ip, n.port) == (ev.dst.ip, ev.dst.port)
        });
    let mut evidence = obj(json!({
        "dst": ev.dst.to_string(),
        "dropped_dst": drop.dst.to_string(),
        "rejected_in": drop.place,
        "rejected_in_netns": drop.netns,
        "location": drop.location,
        "answer": match how {
            Refusal::Reset => "reset".to_string(),
            Refusal::Icmp(e) => e.to_string(),
            Refusal::Unseen => "none seen by the client".to_string(),
        },
        "rule": drop.rule.as_ref().map(|r| r.text.clone()),
        "rule_packets": drop.rule.as_ref().and_then(|r| r.packets),
    }));
    let reject_rule = drop
        .rule
        .as_ref()
        .is_some_and(|r| r.target() == Some(RuleTarget::Reject));
    if let Some(n) = no_endpoints {
        let checks = Checks::new()
            .require("syn_dropped_by_netfilter", true)
            .require("kube_proxy_no_endpoints_rule_for_dst", true)
            .rule_out("listener_reset_for_this_syn", listener_reset)
            .or(&[Cause::ConnectionRefused]);
        checks.record(&mut evidence);
        evidence.insert("service".into(), json!(n.service));
        let (ns, name) = n
            .service
            .split_once('/')
            .map(|(ns, rest)| (ns, rest.split(':').next().unwrap_or(rest)))
            .unwrap_or(("default", n.service.as_str()));
        return Candidate {
            v: verdict(
                ev,
                Cause::ServiceNoEndpoints,
                checks.confidence(),
                format!(
                    "{}: connect to {} rejected{}: Service {} has no endpoints (kube-proxy's rule in {place})",
                    who(ev),
                    ev.dst,
                    how.describe(),
                    n.service
                ),
                evidence,
                format!(
                    "Service {} ({}:{}) has no ready endpoints, so kube-proxy rejects its connections: check its pods' readiness and its selector (kubectl get endpointslices -n {ns} -l kubernetes.io/service-name={name})",
                    n.service, n.ip, n.port
                ),
            ),
            occurrence: true,
        };
    }
    // A rule may reject an established connection's segments too.
    let connecting = drop.flags.is_none_or(|f| f.contains(TcpFlags::SYN))
        && ev.state != Some(crate::model::TcpState::Established);
    let checks = Checks::new()
        .require(
            if connecting {
                "syn_dropped_by_netfilter"
            } else {
                "segments_dropped_by_netfilter"
            },
            true,
        )
        .corroborate("reject_rule_in_that_namespace", reject_rule)
        .rule_out("listener_reset_for_this_syn", listener_reset)
        .or(&[Cause::ConnectionRefused]);
    checks.record(&mut evidence);
    let reached = if connecting {
        "; the server was never reached"
    } else {
        ""
    };
    let fix = match drop.rule.as_ref().filter(|_| reject_rule) {
        Some(r) => format!(
            "the rule `{}` in {place} rejects packets from {} to {}: allow that traffic (a NetworkPolicy of that pod, or that namespace's firewall){reached}",
            r.text, drop.src.ip, drop.dst
        ),
        None => format!(
            "a netfilter rule in {place} rejects packets from {} to {}: find it with `iptables-save -c` or `nft list ruleset` there and allow that traffic{reached}",
            drop.src.ip, drop.dst
        ),
    };
    let what = if connecting {
        format!("connect to {} rejected{}", ev.dst, how.describe())
    } else {
        format!("established connection to {} rejected", ev.dst)
    };
    Candidate {
        v: verdict(
            ev,
            Cause::FirewallReject,
            checks.confidence(),
            format!("{}: {what} by a netfilter rule in {place}", who(ev)),
            evidence,
            fix,
        ),
        occurrence: true,
    }
}

/// A connect that failed with an ICMP or routing error (host or network
/// unreachable, prohibited) that no rejecting rule on this node explains;
/// `drop` is where its SYN was seen dropped, if it was.
pub(super) fn unreachable(ev: &Event, errno: Errno, drop: Option<&PathDrop>) -> Candidate {
    let mut evidence = obj(json!({ "dst": ev.dst.to_string(), "errno": errno, "state": ev.state }));
    if let Some(d) = drop {
        evidence.insert("dropped".into(), d.evidence());
    }
    // A port unreachable comes from a REJECT rule beyond this node (a
    // firewall's, or kube-proxy's for a Service without endpoints): what
    // rejected is not known here.
    let port_unreachable = errno == Errno::ECONNREFUSED;
    let checks = Checks::new()
        .require("icmp_or_route_error", true)
        .require("a_host_or_network_error", !port_unreachable)
        .corroborate("where_its_syn_died", drop.is_some())
        .or(&[Cause::FirewallReject, Cause::ServiceNoEndpoints]);
    checks.record(&mut evidence);
    let no_route =
        drop.filter(|d| d.reason == Reason::IpInnoroutes || d.reason.as_str().contains("NO_ROUTE"));
    let fix = match (no_route, drop) {
        (Some(d), _) => format!(
            "{} has no route to {}: add the route (the node's routes to the pod and Service ranges, or the CNI's)",
            d.place_or_netns(),
            ev.dst.ip
        ),
        (None, Some(d)) => format!(
            "the SYNs to {} die on the way ({}) and an ICMP error ({errno}) came back: fix that hop",
            ev.dst,
            d.describe()
        ),
        (None, None) if port_unreachable => format!(
            "an ICMP port unreachable came back for {}: a REJECT rule beyond this node turned it away (a firewall, or kube-proxy's rule for a Service without endpoints on the node that forwarded it); look at that hop's rules",
            ev.dst
        ),
        (None, None) => format!(
            "an ICMP error ({errno}) came back for {}: the host or its network is unreachable from here, or a router prohibits it; check the routes to {} and whether the pod or host behind it still exists",
            ev.dst, ev.dst.ip
        ),
    };
    Candidate {
        v: verdict(
            ev,
            Cause::Unreachable,
            checks.confidence(),
            format!(
                "{}: connection to {} failed: {errno}{}",
                who(ev),
                ev.dst,
                drop.map_or_else(String::new, |d| format!(" ({})", d.describe()))
            ),
            evidence,
            fix,
        ),
        occurrence: true,
    }
}

/// SYNs dropped by netfilter in `drop.netns` outside any rule, where a
/// MASQUERADE/SNAT rule maps connections to a source port range that is
/// used up (the NAT finds no free tuple: conntrack's insert fails) while
/// the table itself is far from full.
pub(super) fn snat_port_exhaustion(
    ev: &Event,
    drop: &PathDrop,
    rule: Option<&DropRule>,
    ct: Option<&ConntrackFacts>,
    trend: Option<CtTrend>,
    retransmits: u32,
) -> Candidate {
    let place = drop.place_or_netns();
    let near_full = ct.is_some_and(|c| c.max > 0 && c.count * 100 >= c.max * 95);
    // The NAT found no free tuple: conntrack's insert failed.
    let rising = trend.is_some_and(|t| t.insert_failed > 0);
    let by_a_rule = dropped_by_a_rule(drop.location.as_deref());
    let checks = Checks::new()
        .require("syn_dropped_by_netfilter_outside_a_rule", !by_a_rule)
        .require("snat_rule_in_that_namespace", rule.is_some())
        .require("insert_failed_rising", rising)
        .rule_out("conntrack_table_near_full", near_full)
        .or(&[Cause::ConntrackTableFull, Cause::NetfilterDrop]);
    let ports = rule.and_then(|r| r.snat_ports());
    let mut evidence = obj(json!({
        "dst": ev.dst.to_string(),
        "dropped_dst": drop.dst.to_string(),
        "dropped_in": drop.place,
        "dropped_in_netns": drop.netns,
        "location": drop.location,
        "drops": drop.drops,
        "syn_retransmits": retransmits,
        "snat_rule": rule.map(|r| r.text.clone()),
        "snat_ports": ports,
        "random_fully": rule.map(DropRule::random_fully),
        "ct_count": ct.map(|c| c.count),
        "ct_max": ct.map(|c| c.max),
        "insert_failed_delta": trend.map(|t| t.insert_failed),
        "drop_delta": trend.map(|t| t.drop),
    }));
    checks.record(&mut evidence);
    let range = ports.map_or_else(String::new, |p| format!(" maps to source ports {p}, and"));
    let mut fixes = vec![format!(
        "widen the rule's port range (--to-ports) or SNAT to more source addresses"
    )];
    if rule.is_some_and(|r| !r.random_fully()) {
        fixes.push("add --random-fully to the MASQUERADE/SNAT rule".into());
    }
    fixes.push(format!(
        "reuse connections to {} (pooling, keep-alive)",
        drop.dst
    ));
    Candidate {
        v: verdict(
            ev,
            Cause::SnatPortExhaustion,
            checks.confidence(),
            format!(
                "{}: connect to {} timed out: the SNAT in {place}{range} found no free source port towards {} (conntrack {} of {})",
                who(ev),
                ev.dst,
                drop.dst,
                ct.map_or(0, |c| c.count),
                ct.map_or(0, |c| c.max)
            ),
            evidence,
            format!(
                "the source NAT in {place} is out of ports: {}",
                fixes.join("; ")
            ),
        ),
        occurrence: true,
    }
}

/// Segments of an established connection dropped on the way as too big
/// for a link (PKT_TOO_BIG) and retransmitted at the same size: the ICMP
/// "fragmentation needed" that would shrink them does not get back.
pub(super) fn pmtu_black_hole(ev: &Event, drop: &PathDrop, retransmits: u32) -> Candidate {
    let place = drop.place_or_netns();
    let checks = Checks::new()
        .require("segments_dropped_as_too_big", true)
        .require("dropped_again_after_a_retransmit", retransmits >= 1);
    let mut evidence = obj(json!({
        "dst": ev.dst.to_string(),
        "dropped": drop.evidence(),
        "retransmits": retransmits,
    }));
    checks.record(&mut evidence);
    Candidate {
        v: verdict(
            ev,
            Cause::PmtuBlackHole,
            checks.confidence(),
            format!(
                "{}: segments to {} are too big for a link in {place} ({}); they are retransmitted at the same size, so the ICMP 'fragmentation needed' does not get back",
                who(ev),
                ev.dst,
                counted(drop.drops, "drop")
            ),
            evidence,
            format!(
                "lower the MTU of the pod network (the CNI's MTU: every veth and tunnel) to the smallest MTU on the path through {place}, or let ICMP 'fragmentation needed' (type 3 code 4) reach {}; clamping the MSS to the path MTU (TCPMSS --clamp-mss-to-pmtu) works around it",
                ev.src.ip
            ),
        ),
        occurrence: true,
    }
}

/// An established connection reset by its peer's kernel, which had no
/// socket for it (NO_SOCKET): the peer restarted, or its address now
/// belongs to another pod. `sent` is that reset, seen on this node.
pub(super) fn peer_lost_connection(
    rr: &Event,
    sent: &Event,
    invalid: &InvalidEvidence,
) -> Candidate {
    let checks = Checks::new()
        .require("reset_without_socket_from_the_peer_address", true)
        .require("received_by_the_connection_s_client", true)
        .rule_out("conntrack_marked_invalid", invalid.known())
        .or(&[Cause::ConntrackInvalid]);
    let mut evidence = obj(json!({
        "peer": rr.dst.to_string(),
        "reset_sent_in_netns": sent.netns,
        "reset_sent_by": sent.pod.as_ref().map(|p| format!("pod {p}")).or_else(|| sent.netns_name.clone()),
        "state": rr.state,
        "idle_ms": rr.tcp.as_ref().map(|t| t.idle_ms),
    }));
    checks.record(&mut evidence);
    Candidate {
        v: verdict(
            rr,
            Cause::PeerLostConnection,
            checks.confidence(),
            format!(
                "{}: established connection with {} reset by the peer's kernel, which has no socket for it any more",
                who(rr),
                rr.dst
            ),
            evidence,
            format!(
                "{} lost this connection (the server restarted, or its pod was replaced and the address reused): reconnect and retry idempotent requests on a reset, and drain connections before pods stop (preStop hook, terminationGracePeriodSeconds)",
                rr.dst
            ),
        ),
        occurrence: true,
    }
}
