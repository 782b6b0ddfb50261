//! Recorded event sequences -> the exact verdicts they must produce.
use std::{
    net::SocketAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::json;

use super::{Diagnoser, DiagnoserConfig};
use crate::model::{
    Cause::{self, *},
    Confidence::{self, *},
    Endpoint, Errno, Event, EventKind, IdentityLevel, PeerFin, PodRef, Role, Severity, SockPtr,
    StormId, TcpDetail, TcpFlags, TcpState, Verdict,
    facts::{ConntrackFacts, DropRule, NetnsFacts, NodeFacts},
};

const NODE: u32 = 1;
const CLIENT: u32 = 10;
const SERVER: u32 = 11;
// Client pod, server pod, a ClusterIP and the node's address.
const P: &str = "10.244.1.5:40000";
const B: &str = "10.244.2.9:8080";
const SVC: &str = "10.96.0.10:80";

fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_700_000_000) + Duration::from_millis(ms)
}

fn ep(s: &str) -> Endpoint {
    match s.parse::<SocketAddr>() {
        Ok(a) => Endpoint::new(a.ip(), a.port()),
        Err(e) => panic!("bad endpoint {s}: {e}"),
    }
}

/// Builder for recorded events.
struct E(Box<Event>);

fn ev(ms: u64, kind: EventKind, netns: u32, src: &str, dst: &str) -> E {
    let mut e = Event::new(at(ms), kind, ep(src), ep(dst), netns);
    if netns == CLIENT || netns == SERVER {
        let name = if netns == CLIENT { "client" } else { "server" };
        e.pod = Some(PodRef {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            container: None,
        });
        e.identity_level = IdentityLevel::Pod;
        e.comm = Some(name.into());
        e.pid = Some(1000 + netns);
    }
    E(Box::new(e))
}

impl E {
    fn sock(mut self, s: u64) -> Self {
        self.0.sock = Some(SockPtr(s));
        self
    }
    fn state(mut self, s: TcpState) -> Self {
        self.0.state = Some(s);
        self
    }
    fn from(mut self, s: TcpState) -> Self {
        self.0.old_state = Some(s);
        self
    }
    fn errno(mut self, e: Errno) -> Self {
        self.0.errno = Some(e);
        self
    }
    fn reason(mut self, s: &str) -> Self {
        self.0.reason = Some(s.into());
        self
    }
    fn flags(mut self, f: TcpFlags) -> Self {
        self.0.tcp_flags = Some(f);
        self
    }
    fn role(mut self, r: Role) -> Self {
        self.0.role = Some(r);
        self
    }
    fn peer_fin(mut self, ago_ms: u64, idle_before_ms: u64) -> Self {
        self.0.peer_fin = Some(PeerFin {
            ago_ms,
            idle_before_ms,
        });
        self
    }
    fn location(mut self, l: &str) -> Self {
        self.0.location = Some(l.into());
        self
    }
    fn tcp(mut self, idle_ms: u64, keepalive: bool, keepalive_time_ms: u64) -> Self {
        self.0.tcp = Some(TcpDetail {
            idle_ms,
            since_send_ms: 0,
            keepalive,
            keepalive_time_ms,
            srtt_us: 300,
            total_retrans: 0,
        });
        self
    }
}

enum Step {
    Ev(E),
    /// Changes the facts (counters) before the next step.
    Facts(fn(&mut NodeFacts)),
    Tick(u64),
}
use Step::*;

use crate::model::EventKind::{
    BindError, ConnectError, Drop, ResetReceived, ResetSent, Retransmit, SocketError, StateChange,
};

/// Node netns 1 (routes and NATs, conntrack on), client pod 10, server pod 11.
fn facts() -> NodeFacts {
    let ct = |count| {
        Some(ConntrackFacts {
            established_timeout_s: 432000,
            count,
            max: 1000,
            ..ConntrackFacts::default()
        })
    };
    let mut f = NodeFacts {
        node_netns: Some(NODE),
        ipvs_tcp_timeout_s: Some(900),
        ..NodeFacts::default()
    };
    f.nodeports.insert(31000, "default/web:80".into());
    f.netns.insert(
        NODE,
        NetnsFacts {
            port_range: (1024, 65535),
            ct: ct(100),
            ..NetnsFacts::default()
        },
    );
    f.netns.insert(
        CLIENT,
        NetnsFacts {
            port_range: (40000, 40009),
            ..NetnsFacts::default()
        },
    );
    f.netns.insert(SERVER, NetnsFacts::default());
    f
}

fn node_ct(f: &mut NodeFacts) -> &mut ConntrackFacts {
    match f.netns.get_mut(&NODE).and_then(|n| n.ct.as_mut()) {
        Some(ct) => ct,
        None => panic!("node conntrack missing"),
    }
}

fn run(mut f: NodeFacts, steps: Vec<Step>) -> Vec<Verdict> {
    let mut d = Diagnoser::new(DiagnoserConfig::default());
    let mut out = Vec::new();
    for step in steps {
        match step {
            Ev(e) => out.extend(d.observe(&e.0, &f).verdicts),
            Facts(change) => change(&mut f),
            Tick(ms) => out.extend(d.tick(at(ms), &f, &mut |_| {}).verdicts),
        }
    }
    out
}

fn causes(v: &[Verdict]) -> Vec<(Cause, Confidence, u64)> {
    v.iter().map(|v| (v.cause, v.confidence, v.count)).collect()
}

/// A client connection to the Service that got established.
fn connected(sock: u64) -> Vec<Step> {
    vec![
        Ev(ev(0, StateChange, CLIENT, P, SVC)
            .sock(sock)
            .from(TcpState::Close)
            .state(TcpState::SynSent)),
        Ev(ev(1, StateChange, CLIENT, P, SVC)
            .sock(sock)
            .from(TcpState::SynSent)
            .state(TcpState::Established)),
    ]
}

#[test]
fn idle_timeout_reset_after_ipvs_forgot_the_connection() {
    let mut steps = connected(0x1000);
    steps.extend([
        Ev(ev(1_200_000, ResetReceived, CLIENT, P, SVC)
            .sock(0x1000)
            .state(TcpState::Established)
            .tcp(1_200_000, false, 7_200_000)),
        Ev(ev(1_200_001, StateChange, CLIENT, P, SVC)
            .sock(0x1000)
            .from(TcpState::Established)
            .state(TcpState::Close)),
        Ev(ev(1_200_001, SocketError, CLIENT, P, SVC)
            .sock(0x1000)
            .state(TcpState::Close)
            .errno(Errno::ECONNRESET)),
        Tick(1_230_000),
    ]);
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(IdleTimeout, Certain, 1)]);
    let e = &v[0].evidence;
    assert_eq!(e["idle_ms"], json!(1_200_000));
    assert_eq!(e["keepalive"], json!(false));
    assert_eq!(e["keepalive_time_ms"], json!(7_200_000));
    assert_eq!(e["timeout_s"], json!(900));
    assert_eq!(e["timeout_source"], json!("ipvs"));
    assert_eq!(e["shape"], json!("reset"));
    assert_eq!(
        v[0].fix,
        "enable SO_KEEPALIVE and set net.ipv4.tcp_keepalive_time=450 (below the 900 s IPVS timeout) in the network namespace of pod default/client"
    );
    assert_eq!(
        v[0].summary,
        "pod default/client: connection to 10.96.0.10:80 was idle 1200 s, longer than the 900 s IPVS timeout, and was reset"
    );
    assert_eq!(v[0].pod.as_ref().map(|p| p.name.as_str()), Some("client"));
    assert_eq!(
        (v[0].netns, v[0].pid, v[0].comm.as_deref()),
        (CLIENT, Some(1010), Some("client"))
    );
}

fn black_hole(keepalive: bool) -> Vec<Step> {
    let mut steps = connected(0x1001);
    // RTO doubling after a 61 s quiet period; the peer is never heard again.
    for (i, ms) in [61_200u64, 61_600, 62_400, 64_000, 67_200]
        .into_iter()
        .enumerate()
    {
        let idle = 61_000 + 200 * (1 << i);
        steps.push(Ev(ev(ms, Retransmit, CLIENT, P, SVC)
            .sock(0x1001)
            .state(TcpState::Established)
            .tcp(idle, keepalive, 30_000)));
    }
    steps.push(Ev(ev(80_000, StateChange, CLIENT, P, SVC)
        .sock(0x1001)
        .from(TcpState::Established)
        .state(TcpState::Close)));
    steps.push(Ev(ev(80_000, SocketError, CLIENT, P, SVC)
        .sock(0x1001)
        .state(TcpState::Close)
        .errno(Errno::ETIMEDOUT)));
    steps.push(Tick(95_000));
    steps
}

#[test]
fn idle_timeout_black_hole_is_likely_then_certain() {
    let mut f = facts();
    f.middlebox_timeout_s = Some(60);
    let v = run(f, black_hole(false));
    assert_eq!(
        causes(&v),
        vec![(IdleTimeout, Likely, 1), (IdleTimeout, Certain, 1)]
    );
    let e = &v[1].evidence;
    assert_eq!(e["idle_ms"], json!(61_200));
    assert_eq!(e["timeout_s"], json!(60));
    assert_eq!(e["timeout_source"], json!("middlebox"));
    assert_eq!(e["shape"], json!("black_hole"));
    assert_eq!(e["retransmits"], json!(5));
    assert_eq!(
        v[1].fix,
        "enable SO_KEEPALIVE and set net.ipv4.tcp_keepalive_time=30 (below the 60 s middlebox timeout) in the network namespace of pod default/client"
    );
}

#[test]
fn timeout_without_retransmit_history_is_only_possible() {
    let mut f = facts();
    f.middlebox_timeout_s = Some(60);
    let mut steps = connected(0x1001);
    steps.push(Ev(ev(900_000, SocketError, CLIENT, P, SVC)
        .sock(0x1001)
        .state(TcpState::Established)
        .errno(Errno::ETIMEDOUT)
        .tcp(900_000, false, 7_200_000)));
    let v = run(f, steps);
    assert_eq!(causes(&v), vec![(IdleTimeout, Possible, 1)]);
    assert_eq!(v[0].evidence["retransmits"], json!(0));
}

#[test]
fn node_conntrack_timeout_is_a_path_timeout() {
    let mut f = facts();
    f.ipvs_tcp_timeout_s = None;
    node_ct(&mut f).established_timeout_s = 5;
    let mut steps = connected(0x1000);
    steps.push(Ev(ev(9_000, ResetReceived, CLIENT, P, SVC)
        .sock(0x1000)
        .state(TcpState::Established)
        .tcp(8_000, false, 7_200_000)));
    let v = run(f, steps);
    assert_eq!(causes(&v), vec![(IdleTimeout, Certain, 1)]);
    assert_eq!(v[0].evidence["timeout_source"], json!("conntrack:node"));
    assert_eq!(
        v[0].fix,
        "enable SO_KEEPALIVE and set net.ipv4.tcp_keepalive_time=4 (below the 5 s node conntrack established timeout) in the network namespace of pod default/client"
    );
}

#[test]
fn keepalive_client_on_the_same_path_is_not_an_idle_timeout() {
    let mut f = facts();
    f.middlebox_timeout_s = Some(60);
    // The same retransmits and reset, but a 30 s keepalive keeps the 60 s
    // path alive: no idle_timeout (and three retransmits are no storm).
    // The reset is still accounted for: unexplained, with what was seen.
    let mut steps = black_hole(true);
    steps.truncate(5);
    steps.push(Ev(ev(70_000, ResetReceived, CLIENT, P, SVC)
        .sock(0x1001)
        .state(TcpState::Established)
        .tcp(70_000, true, 30_000)));
    steps.push(Tick(90_000));
    let v = run(f, steps);
    assert_eq!(causes(&v), vec![(Unexplained, Possible, 1)]);
    assert_eq!(v[0].resets, 1);
    assert_eq!(v[0].evidence["kind"], json!("reset_received"));
    assert_eq!(v[0].evidence["idle_ms"], json!(70_000));
    assert_eq!(
        (v[0].src.to_string(), v[0].dst.to_string()),
        (P.to_string(), SVC.to_string())
    );
}

/// The server's connection is killed by a reset the client sent for a
/// segment that escaped reverse NAT (kubernetes #74839).
fn invalid_pair(received_first: bool) -> Vec<Step> {
    let sent = Ev(ev(1_000, ResetSent, CLIENT, P, B)
        .reason("NO_SOCKET")
        .flags(TcpFlags::RST));
    let received = Ev(ev(1_001, ResetReceived, SERVER, B, P)
        .sock(0x1002)
        .state(TcpState::Established)
        .tcp(40, false, 7_200_000));
    if received_first {
        vec![received, sent]
    } else {
        vec![sent, received]
    }
}

#[test]
fn conntrack_invalid_reset_pair_confirmed_by_the_counter() {
    let mut steps = vec![Tick(0)];
    steps.extend(invalid_pair(false));
    steps.extend([
        Facts(|f| node_ct(f).stats.invalid += 2),
        Tick(2_000),
        Tick(12_000),
        Tick(13_000),
    ]);
    let v = run(facts(), steps);
    assert_eq!(
        causes(&v),
        vec![
            (ConntrackInvalid, Possible, 1),
            (ConntrackInvalid, Certain, 1)
        ]
    );
    let e = &v[1].evidence;
    assert_eq!(e["invalid_delta"], json!(2));
    assert_eq!(e["be_liberal"], json!(false));
    assert_eq!(e["invalid_drop_rule"], json!(false));
    assert_eq!(e["reset_pair"], json!(true));
    assert_eq!(e["tuple"], json!("10.244.2.9:8080 <-> 10.244.1.5:40000"));
    assert_eq!(v[0].evidence["invalid_delta"], json!(null));
    assert_eq!(v[1].pod.as_ref().map(|p| p.name.as_str()), Some("server"));
    assert_eq!(
        v[1].fix,
        "sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=1 on the node, or iptables -t filter -I INPUT -m conntrack --ctstate INVALID -j DROP"
    );
}

#[test]
fn conntrack_invalid_certain_at_once_when_the_counter_rose_first() {
    let mut steps = vec![Tick(0), Facts(|f| node_ct(f).stats.invalid += 1), Tick(900)];
    steps.extend(invalid_pair(false));
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(ConntrackInvalid, Certain, 1)]);
    assert_eq!(v[0].evidence["invalid_delta"], json!(1));
}

#[test]
fn conntrack_invalid_reset_reported_before_its_cause() {
    // The server's reset arrives first: likely on the counter alone, then
    // the client's RST confirms the same occurrence.
    let mut steps = vec![Tick(0), Facts(|f| node_ct(f).stats.invalid += 1), Tick(900)];
    steps.extend(invalid_pair(true));
    steps.extend([Tick(5_000), Tick(12_000)]);
    let v = run(facts(), steps);
    assert_eq!(
        causes(&v),
        vec![
            (ConntrackInvalid, Likely, 1),
            (ConntrackInvalid, Certain, 1)
        ]
    );
    assert_eq!(v[1].evidence["reset_pair"], json!(true));
    // Without the counter, the pair alone is only possible: a peer that
    // lost the connection resets it the same way.
    let v = run(facts(), invalid_pair(true));
    assert_eq!(causes(&v), vec![(ConntrackInvalid, Possible, 1)]);
    assert_eq!(
        v[0].evidence["reset_sent_by"],
        json!("10.244.1.5:40000 (netns 10)")
    );
}

/// The direct hook saw conntrack mark the escaped segment INVALID (server
/// to client, in the node's namespace): the pair is certain at once, with
/// no counter.
fn marked(ms: u64) -> Step {
    Ev(ev(ms, EventKind::ConntrackInvalid, NODE, B, P)
        .reason("SEQ_OVER")
        .flags(TcpFlags::PSH | TcpFlags::ACK))
}

#[test]
fn conntrack_invalid_certain_at_once_when_the_segment_was_marked() {
    let mut steps = vec![Tick(0), marked(999)];
    steps.extend(invalid_pair(false));
    steps.push(Tick(12_000));
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(ConntrackInvalid, Certain, 1)]);
    let e = &v[0].evidence;
    assert_eq!(e["invalid_class"], json!("SEQ_OVER"));
    assert_eq!(e["invalid_netns"], json!(NODE));
    assert_eq!(e["invalid_delta"], json!(null));
    assert!(
        v[0].summary
            .ends_with("and conntrack marked its segment INVALID (SEQ_OVER)"),
        "{}",
        v[0].summary
    );

    // Reported after the pair: it confirms the same occurrence.
    let mut steps = vec![Tick(0)];
    steps.extend(invalid_pair(false));
    steps.extend([marked(1_002), Tick(12_000)]);
    let v = run(facts(), steps);
    assert_eq!(
        causes(&v),
        vec![
            (ConntrackInvalid, Possible, 1),
            (ConntrackInvalid, Certain, 1)
        ]
    );

    // A mark on another connection explains nothing.
    let mut steps = vec![
        Tick(0),
        Ev(ev(
            999,
            EventKind::ConntrackInvalid,
            NODE,
            B,
            "10.244.1.5:40001",
        )
        .reason("SEQ_OVER")),
    ];
    steps.extend(invalid_pair(false));
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(ConntrackInvalid, Possible, 1)]);
}

#[test]
fn conntrack_invalid_counter_and_unpaired_reset_is_likely() {
    let steps = vec![
        Tick(0),
        Ev(ev(500, ResetReceived, SERVER, B, P)
            .sock(0x1002)
            .state(TcpState::Established)
            .tcp(40, false, 7_200_000)),
        Facts(|f| node_ct(f).stats.invalid += 3),
        Tick(1_000),
    ];
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(ConntrackInvalid, Likely, 1)]);
    assert_eq!(v[0].evidence["reset_pair"], json!(false));
    assert_eq!(v[0].evidence["invalid_delta"], json!(3));
}

#[test]
fn below_window_segment_without_reset_is_nothing() {
    // conntrack may count it, but nothing was reset.
    let mut steps = vec![
        Tick(0),
        Facts(|f| node_ct(f).stats.invalid += 1),
        Tick(1_000),
    ];
    steps.extend(connected(0x1000));
    steps.push(Tick(12_000));
    assert_eq!(causes(&run(facts(), steps)), vec![]);
    // A reset with no pair and no counter rise is no conntrack_invalid:
    // it is unexplained, about the server's port (not the client's).
    let steps = vec![
        Ev(ev(500, ResetReceived, SERVER, B, P)
            .sock(0x1002)
            .state(TcpState::Established)
            .tcp(40, false, 7_200_000)),
        Tick(40_000),
    ];
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(Unexplained, Possible, 1)]);
    assert_eq!((v[0].dst.to_string(), v[0].resets), (B.to_string(), 1));
}

#[test]
fn idle_timeout_takes_priority_over_a_reset_pair() {
    let steps = vec![
        Ev(ev(1_000, ResetSent, NODE, SVC, P)
            .reason("NO_SOCKET")
            .flags(TcpFlags::RST)),
        Ev(ev(1_001, ResetReceived, CLIENT, P, SVC)
            .sock(0x1000)
            .state(TcpState::Established)
            .tcp(1_000_000, false, 7_200_000)),
    ];
    assert_eq!(
        causes(&run(facts(), steps)),
        vec![(IdleTimeout, Certain, 1)]
    );
}

#[test]
fn conntrack_table_full_drops_syns_and_the_client_times_out() {
    let mut f = facts();
    node_ct(&mut f).count = 995;
    let s = "10.244.1.5:40001";
    let steps = vec![
        Tick(0),
        Ev(ev(0, StateChange, CLIENT, s, SVC)
            .sock(0x1003)
            .from(TcpState::Close)
            .state(TcpState::SynSent)),
        Ev(ev(1, Drop, NODE, s, SVC)
            .reason("NETFILTER_DROP")
            .flags(TcpFlags::SYN)),
        Ev(ev(1_000, Retransmit, CLIENT, s, SVC)
            .sock(0x1003)
            .state(TcpState::SynSent)),
        Ev(ev(1_001, Drop, NODE, s, SVC)
            .reason("NETFILTER_DROP")
            .flags(TcpFlags::SYN)),
        Facts(|f| node_ct(f).stats.drop += 2),
        Tick(2_000),
        Ev(ev(3_000, Retransmit, CLIENT, s, SVC)
            .sock(0x1003)
            .state(TcpState::SynSent)),
        Ev(ev(7_000, StateChange, CLIENT, s, SVC)
            .sock(0x1003)
            .from(TcpState::SynSent)
            .state(TcpState::Close)),
        Ev(ev(7_000, SocketError, CLIENT, s, SVC)
            .sock(0x1003)
            .state(TcpState::Close)
            .errno(Errno::ETIMEDOUT)),
        Tick(12_000),
    ];
    let v = run(f, steps);
    let who: Vec<(Cause, Confidence, u64, u32, String)> = v
        .iter()
        .map(|v| (v.cause, v.confidence, v.count, v.netns, v.dst.to_string()))
        .collect();
    assert_eq!(
        who,
        // 995 of 1000 is near the max; the drop counter confirms it.
        vec![
            (ConntrackTableFull, Likely, 1, NODE, SVC.to_string()),
            (
                ConntrackTableFull,
                Certain,
                1,
                NODE,
                "0.0.0.0:0".to_string()
            ),
            (ConntrackTableFull, Likely, 1, CLIENT, SVC.to_string()),
            (ConntrackTableFull, Likely, 2, NODE, SVC.to_string()),
        ]
    );
    let e = &v[2].evidence;
    assert_eq!(
        (e["count"].clone(), e["max"].clone()),
        (json!(995), json!(1000))
    );
    assert_eq!(e["syn_retransmits"], json!(2));
    assert_eq!(v[1].evidence["drop_delta"], json!(2));
    assert_eq!(v[1].evidence["early_drop_delta"], json!(0));
    assert_eq!(v[1].evidence["insert_failed_delta"], json!(0));
    never_sure_of(&v, NetfilterDrop);
    assert!(
        v.iter().all(|v| v.cause != NetfilterDrop),
        "{:?}",
        causes(&v)
    );
    assert_eq!(
        v[0].fix,
        "sysctl -w net.netfilter.nf_conntrack_max=2000 on the node; shorten net.netfilter.nf_conntrack_tcp_timeout_established (now 432000 s); find the top talkers with conntrack -L"
    );
    assert!(v.iter().all(|v| v.cause != SynTimeout));
}

#[test]
fn syn_drop_without_table_pressure_is_not_table_full() {
    let steps = vec![
        Tick(0),
        Ev(ev(1, Drop, NODE, P, SVC)
            .reason("NETFILTER_DROP")
            .flags(TcpFlags::SYN)),
        Ev(ev(2, Drop, NODE, P, SVC)
            .reason("NETFILTER_DROP")
            .flags(TcpFlags::ACK | TcpFlags::PSH)),
        Tick(2_000),
    ];
    assert_eq!(causes(&run(facts(), steps)), vec![]);
}

#[test]
fn early_drop_alone_makes_table_full_likely() {
    let steps = vec![
        Tick(0),
        Facts(|f| node_ct(f).stats.early_drop += 4),
        Tick(1_000),
        Ev(ev(1_500, Drop, NODE, P, SVC)
            .reason("NETFILTER_DROP")
            .flags(TcpFlags::SYN)),
    ];
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(ConntrackTableFull, Likely, 1)]);
    assert_eq!(v[0].evidence["early_drop_delta"], json!(4));
}

#[test]
fn port_exhaustion_aggregates_repeats() {
    let mut steps: Vec<Step> =
        (0..3)
            .map(|i| {
                Ev(ev(i * 1_000, ConnectError, CLIENT, "10.244.1.5:0", SVC)
                    .errno(Errno::EADDRNOTAVAIL))
            })
            .collect();
    steps.push(Tick(5_000));
    steps.push(Tick(11_000));
    steps.push(Tick(30_000));
    let v = run(facts(), steps);
    assert_eq!(
        causes(&v),
        vec![(PortExhaustion, Certain, 1), (PortExhaustion, Certain, 3)]
    );
    let e = &v[1].evidence;
    assert_eq!(e["dst"], json!(SVC));
    assert_eq!(e["port_range"], json!("40000-40009"));
    assert_eq!(e["port_range_size"], json!(10));
    assert_eq!(e["reserved_in_range"], json!(0));
    assert_eq!(e["tw_reuse"], json!(2));
    assert_eq!((v[1].first_seen, v[1].last_seen), (at(0), at(2_000)));
    assert_eq!(
        v[1].fix,
        "widen net.ipv4.ip_local_port_range to \"32768 65535\" (32768 ports, clear of the NodePort range 30000-32767; now 40000-40009 = 10 ports) in the network namespace of pod default/client; reuse connections to 10.96.0.10:80 (connection pooling, HTTP keep-alive); set net.ipv4.tcp_tw_reuse=1"
    );
}

#[test]
fn bind_failures() {
    // nc binds port 0 first and reports "Address in use" when the range is exhausted.
    let v = run(
        facts(),
        vec![Ev(
            ev(0, BindError, CLIENT, "0.0.0.0:0", "0.0.0.0:0").errno(Errno::EADDRINUSE)
        )],
    );
    assert_eq!(causes(&v), vec![(PortExhaustion, Likely, 1)]);

    let v = run(
        facts(),
        vec![Ev(
            ev(0, BindError, SERVER, "0.0.0.0:45000", "0.0.0.0:0").errno(Errno::EADDRINUSE)
        )],
    );
    assert_eq!(causes(&v), vec![(BindConflict, Certain, 1)]);
    assert_eq!(v[0].evidence["port"], json!(45000));
    assert_eq!(v[0].evidence["in_ephemeral_range"], json!(true));
    assert_eq!(
        v[0].fix,
        "another socket holds 0.0.0.0:45000: find it with ss -tanp 'sport = :45000', pick another port, or set SO_REUSEADDR if a closing connection (TIME_WAIT) holds it; port 45000 is inside ip_local_port_range 32768-60999, so outgoing connections can take it: sysctl -w net.ipv4.ip_local_reserved_ports=45000 in the network namespace of pod default/server"
    );
}

/// kubelet on the node (host network) health-checking a pod.
fn kubelet_connect(sport: u16, netns: u32) -> Vec<Step> {
    let src = format!("192.168.66.27:{sport}");
    let src = src.as_str();
    let dst = "10.244.1.7:80";
    vec![
        Ev(ev(0, StateChange, netns, src, dst)
            .sock(0x1004)
            .from(TcpState::Close)
            .state(TcpState::SynSent)),
        Ev(ev(1_000, Retransmit, netns, src, dst)
            .sock(0x1004)
            .state(TcpState::SynSent)
            .flags(TcpFlags::SYN)),
        Ev(ev(3_000, Retransmit, netns, src, dst)
            .sock(0x1004)
            .state(TcpState::SynSent)
            .flags(TcpFlags::SYN)),
        Ev(ev(7_000, StateChange, netns, src, dst)
            .sock(0x1004)
            .from(TcpState::SynSent)
            .state(TcpState::Close)),
        Ev(ev(7_000, SocketError, netns, src, dst)
            .sock(0x1004)
            .state(TcpState::Close)
            .errno(Errno::ETIMEDOUT)),
        Tick(20_000),
    ]
}

#[test]
fn nodeport_collision_when_the_source_port_is_a_nodeport() {
    let v = run(facts(), kubelet_connect(31000, NODE));
    assert_eq!(causes(&v), vec![(NodeportCollision, Certain, 1)]);
    assert_eq!(v[0].evidence["src_port"], json!(31000));
    assert_eq!(v[0].evidence["nodeport"], json!("default/web:80"));
    assert_eq!(v[0].evidence["port_range"], json!("1024-65535"));
    assert_eq!(
        v[0].fix,
        "sysctl -w net.ipv4.ip_local_reserved_ports=31000 on the node (or reserve the whole NodePort range 30000-32767)"
    );
}

#[test]
fn nodeport_collision_possible_inside_an_overlapping_range() {
    let mut f = facts();
    if let Some(n) = f.netns.get_mut(&NODE) {
        n.reserved_ports = vec![(8080, 8080)];
    }
    let v = run(f, kubelet_connect(30500, NODE));
    assert_eq!(causes(&v), vec![(NodeportCollision, Possible, 1)]);
    assert_eq!(
        v[0].fix,
        "sysctl -w net.ipv4.ip_local_reserved_ports=8080,30000-32767 on the node"
    );
}

#[test]
fn syn_timeout_never_nodeport_collision_without_overlap() {
    let mut f = facts();
    if let Some(n) = f.netns.get_mut(&NODE) {
        n.port_range = (32768, 60999);
    }
    // Retransmits that then connect: nothing.
    let mut steps = kubelet_connect(30500, NODE);
    steps.truncate(3);
    steps.push(Ev(ev(
        4_000,
        StateChange,
        NODE,
        "192.168.66.27:30500",
        "10.244.1.7:80",
    )
    .sock(0x1004)
    .from(TcpState::SynSent)
    .state(TcpState::Established)));
    steps.push(Tick(20_000));
    assert_eq!(causes(&run(f.clone(), steps)), vec![]);
    // Retransmits that time out: syn_timeout only.
    let v = run(f, kubelet_connect(30500, NODE));
    assert_eq!(causes(&v), vec![(SynTimeout, Certain, 1)]);
    assert_eq!(v[0].evidence["syn_retransmits"], json!(2));
    assert_eq!(v[0].evidence["dst"], json!("10.244.1.7:80"));
    // A pod's source port cannot hit a NodePort rule: syn_timeout, not a collision.
    let v = run(facts(), kubelet_connect(31000, CLIENT));
    assert_eq!(causes(&v), vec![(SynTimeout, Certain, 1)]);
}

#[test]
fn refused_connect_is_only_connection_refused() {
    let s = "10.244.1.5:40001";
    let steps = vec![
        Ev(ev(0, StateChange, CLIENT, s, SVC)
            .sock(0x1005)
            .from(TcpState::Close)
            .state(TcpState::SynSent)),
        Ev(ev(1_000, Retransmit, CLIENT, s, SVC)
            .sock(0x1005)
            .state(TcpState::SynSent)
            .flags(TcpFlags::SYN)),
        // The server's kernel found no listener for the SYN.
        Ev(ev(1_001, ResetSent, SERVER, B, s)
            .reason("NO_SOCKET")
            .flags(TcpFlags::SYN)),
        Ev(ev(1_001, ResetReceived, CLIENT, s, SVC)
            .sock(0x1005)
            .state(TcpState::SynSent)
            .tcp(5_000_000, false, 7_200_000)),
        Ev(ev(1_001, StateChange, CLIENT, s, SVC)
            .sock(0x1005)
            .from(TcpState::SynSent)
            .state(TcpState::Close)),
        Ev(ev(1_001, SocketError, CLIENT, s, SVC)
            .sock(0x1005)
            .state(TcpState::Close)
            .errno(Errno::ECONNREFUSED)),
        Tick(30_000),
    ];
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(ConnectionRefused, Certain, 1)]);
    assert_eq!(v[0].evidence["via"], json!("reset"));
    assert_eq!(
        v[0].fix,
        "nothing accepts connections on 10.96.0.10:80: check that the server listens on port 80"
    );
    // Without the listener's reset (the server is not on this node) a
    // firewall beyond it may have reset the connect: only possible.
    let v = run(
        facts(),
        vec![Ev(ev(0, ResetReceived, CLIENT, s, SVC)
            .sock(0x1006)
            .state(TcpState::SynSent))],
    );
    assert_eq!(causes(&v), vec![(ConnectionRefused, Possible, 1)]);
    assert_eq!(
        v[0].evidence["checks"]["alternatives"],
        json!(["firewall_reject"])
    );
    // ECONNREFUSED without a reset came from an ICMP port unreachable: a
    // REJECT rule beyond this node, not a listener; what rejected is not
    // known here.
    let v = run(
        facts(),
        vec![Ev(ev(0, SocketError, CLIENT, s, SVC)
            .sock(0x1007)
            .state(TcpState::SynSent)
            .errno(Errno::ECONNREFUSED))],
    );
    assert_eq!(causes(&v), vec![(Unreachable, Possible, 1)]);
}

#[test]
fn refused_connects_never_flood() {
    let mut steps = Vec::new();
    for i in 0..100u64 {
        let sock = 0x2000 + i;
        steps.push(Ev(ev(i * 50, ResetReceived, CLIENT, P, SVC)
            .sock(sock)
            .state(TcpState::SynSent)));
        steps.push(Ev(ev(i * 50, SocketError, CLIENT, P, SVC)
            .sock(sock)
            .errno(Errno::ECONNREFUSED)));
    }
    steps.extend([Tick(6_000), Tick(11_000), Tick(12_000), Tick(25_000)]);
    let v = run(facts(), steps);
    assert_eq!(
        causes(&v),
        vec![
            (ConnectionRefused, Possible, 1),
            (ConnectionRefused, Possible, 100)
        ]
    );
}

/// Occurrences counted since the last emission are reported when tracing
/// stops, not lost with the process.
#[test]
fn finish_reports_counts_not_yet_emitted() {
    let mut d = Diagnoser::new(DiagnoserConfig::default());
    let f = facts();
    let mut emitted = Vec::new();
    for i in 0..5u64 {
        let src = format!("10.244.1.5:{}", 40000 + i);
        let e = ev(i * 10, ResetReceived, CLIENT, &src, SVC)
            .sock(0xffff_0000 + i)
            .state(TcpState::SynSent);
        emitted.extend(d.observe(&e.0, &f).verdicts);
    }
    assert_eq!(causes(&emitted), vec![(ConnectionRefused, Possible, 1)]);
    let last = d.finish(at(100), &facts());
    assert_eq!(causes(&last), vec![(ConnectionRefused, Possible, 5)]);
    assert_eq!((last[0].first_seen, last[0].last_seen), (at(0), at(40)));
    // The first occurrence stays the example: summary and source agree.
    assert_eq!(last[0].src, ep("10.244.1.5:40000"));
    assert_eq!(last[0].summary, emitted[0].summary);
    assert!(d.finish(at(200), &facts()).is_empty(), "reported once");
}

/// The kernel reuses a freed sock address for the next socket: a second
/// refused connect on the same address is a new connection, not a repeat.
#[test]
fn reused_sock_address_starts_a_new_connection() {
    let mut steps = Vec::new();
    for (i, (src, dst)) in [
        ("10.244.1.5:40001", "10.244.2.9:91"),
        ("10.244.1.5:40002", "10.244.2.9:92"),
    ]
    .into_iter()
    .enumerate()
    {
        let t = i as u64 * 100;
        steps.push(Ev(ev(t, ResetSent, SERVER, dst, src)
            .reason("NO_SOCKET")
            .flags(TcpFlags::SYN)));
        steps.push(Ev(ev(t, ResetReceived, CLIENT, src, dst)
            .sock(0xffff0001)
            .state(TcpState::SynSent)));
        steps.push(Ev(ev(t, SocketError, CLIENT, src, dst)
            .sock(0xffff0001)
            .errno(Errno::ECONNREFUSED)));
    }
    let v = run(facts(), steps);
    assert_eq!(
        causes(&v),
        vec![
            (ConnectionRefused, Certain, 1),
            (ConnectionRefused, Certain, 1)
        ]
    );
    assert_eq!((v[0].dst.port, v[1].dst.port), (91, 92));
}

#[test]
fn retransmit_storm_on_a_busy_connection() {
    // The peer answers in between (its idle time restarts): a lossy path.
    let mut steps = connected(0x1007);
    for i in 0..6u64 {
        steps.push(Ev(ev(10_000 + i * 500, Retransmit, CLIENT, P, SVC)
            .sock(0x1007)
            .state(TcpState::Established)
            .tcp(if i % 2 == 0 { 30 } else { 5 }, false, 7_200_000)));
    }
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(RetransmitStorm, Likely, 1)]);
    // A peer silent since the first retransmit may be gone: only possible.
    let mut silent = connected(0x1008);
    for i in 0..6u64 {
        silent.push(Ev(ev(10_000 + i * 500, Retransmit, CLIENT, P, SVC)
            .sock(0x1008)
            .state(TcpState::Established)
            .tcp(30 + i * 500, false, 7_200_000)));
    }
    assert_eq!(
        causes(&run(facts(), silent)),
        vec![(RetransmitStorm, Possible, 1)]
    );
    assert_eq!(v[0].evidence["retransmits"], json!(5));
    assert_eq!(v[0].evidence["window_s"], json!(10));
    // Four retransmits, or five spread over more than 10 s, are not a storm.
    let mut steps = connected(0x1007);
    for i in 0..5u64 {
        steps.push(Ev(ev(10_000 + i * 3_000, Retransmit, CLIENT, P, SVC)
            .sock(0x1007)
            .state(TcpState::Established)
            .tcp(30, false, 7_200_000)));
    }
    assert_eq!(causes(&run(facts(), steps)), vec![]);
}

#[test]
fn verdicts_serialize_with_stable_names() {
    let v = run(
        facts(),
        vec![Ev(
            ev(0, ConnectError, CLIENT, "10.244.1.5:0", SVC).errno(Errno::EADDRNOTAVAIL)
        )],
    );
    let j = serde_json::to_value(&v[0]).expect("serialize");
    assert_eq!(j["cause"], json!("port_exhaustion"));
    assert_eq!(j["confidence"], json!("certain"));
    assert_eq!(j["identity_level"], json!("pod"));
    assert_eq!(j["time"], json!("2023-11-14T22:13:20.000000Z"));
    for c in Cause::all() {
        assert_eq!(
            serde_json::to_value(c).expect("serialize"),
            json!(c.as_str())
        );
    }
    for c in [Possible, Likely, Certain] {
        assert_eq!(
            serde_json::to_value(c).expect("serialize"),
            json!(c.as_str())
        );
    }
}

/// The last record of each verdict key: its final counts.
fn last_of_each(v: &[Verdict]) -> Vec<&Verdict> {
    let mut last: Vec<&Verdict> = Vec::new();
    for x in v {
        let same = |y: &&Verdict| {
            (y.cause, y.netns, &y.dst, y.first_seen) == (x.cause, x.netns, &x.dst, x.first_seen)
        };
        match last.iter().position(same) {
            Some(i) => last[i] = x,
            None => last.push(x),
        }
    }
    last
}

/// nginx closed an idle keep-alive connection (FIN after 2 s idle); the
/// client wrote to it 1 s later: the server's TIME_WAIT socket resets it.
fn keepalive_race_pair() -> Vec<Step> {
    vec![
        Ev(ev(10_000, ResetSent, SERVER, B, P)
            .state(TcpState::TimeWait)
            .reason("TCP_TIMEWAIT_SOCKET")
            .flags(TcpFlags::PSH | TcpFlags::ACK)),
        Ev(ev(10_001, ResetReceived, CLIENT, P, SVC)
            .sock(0x3000)
            .role(Role::Client)
            .state(TcpState::CloseWait)
            .peer_fin(1_000, 2_000)
            .tcp(1_000, false, 7_200_000)),
        Tick(30_000),
    ]
}

#[test]
fn keepalive_race_names_the_peer_s_idle_timeout_and_takes_both_resets() {
    let v = run(facts(), keepalive_race_pair());
    assert_eq!(causes(&v), vec![(KeepaliveRace, Certain, 1)]);
    let k = &v[0];
    assert_eq!(k.resets, 2, "the server's reset and the client's");
    assert_eq!(k.severity, Severity::Failure);
    assert_eq!(k.pod.as_ref().map(|p| p.name.as_str()), Some("client"));
    assert_eq!(k.evidence["peer_idle_timeout_ms"], json!(2_000));
    assert_eq!(k.evidence["fin_to_write_ms"], json!(1_000));
    assert_eq!(k.evidence["state"], json!("CLOSE_WAIT"));
    assert_eq!(
        k.summary,
        "pod default/client: 10.96.0.10:80 closed the connection after 2.0 s idle; it was used 1.0 s later and reset"
    );
    assert_eq!(
        k.fix,
        "the server closes idle connections after about 2.0 s: close pooled connections to 10.96.0.10:80 after 1 s idle (below the server's timeout), and retry idempotent requests once on a reset"
    );
    assert!(!k.fix.contains("KEEPALIVE"));
}

#[test]
fn keepalive_race_seen_only_by_the_server_is_named_after_the_settle_time() {
    let mut steps = keepalive_race_pair();
    steps.remove(1);
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(KeepaliveRace, Likely, 1)]);
    assert_eq!(v[0].resets, 1);
    assert_eq!(v[0].pod.as_ref().map(|p| p.name.as_str()), Some("server"));
    assert_eq!(v[0].evidence["client"], json!(P));
}

#[test]
fn netfilter_drop_through_a_cluster_ip_names_the_namespace_and_the_rule() {
    let mut f = facts();
    let rule = "-A INPUT -s 10.244.1.5/32 -p tcp -m tcp --dport 8080 -j DROP";
    f.netns.get_mut(&SERVER).expect("server facts").drop_rules = Some(vec![
        DropRule {
            text: "-A INPUT -p tcp --dport 22 -j DROP".into(),
            packets: Some(0),
        },
        DropRule {
            text: rule.into(),
            packets: Some(2),
        },
    ]);
    let syn = |ms, netns, src, dst| {
        Ev(ev(ms, Drop, netns, src, dst)
            .reason("NETFILTER_DROP")
            .location("nf_hook_slow+0x4c")
            .flags(TcpFlags::SYN))
    };
    let steps = vec![
        Ev(ev(0, StateChange, CLIENT, P, SVC)
            .sock(0x3100)
            .from(TcpState::Close)
            .state(TcpState::SynSent)),
        // The SYN after DNAT (ClusterIP -> pod), dropped in the server pod.
        syn(1, SERVER, P, B),
        Ev(ev(1_000, Retransmit, CLIENT, P, SVC)
            .sock(0x3100)
            .state(TcpState::SynSent)
            .flags(TcpFlags::SYN)),
        syn(1_001, SERVER, P, B),
        Ev(ev(3_000, StateChange, CLIENT, P, SVC)
            .sock(0x3100)
            .from(TcpState::SynSent)
            .state(TcpState::Close)),
        Tick(20_000),
    ];
    let v = run(f, steps);
    assert_eq!(causes(&v), vec![(NetfilterDrop, Certain, 1)]);
    let e = &v[0].evidence;
    assert_eq!(e["dropped_in_netns"], json!(SERVER));
    assert_eq!(e["dropped_in"], json!("pod default/server"));
    assert_eq!(e["dropped_dst"], json!(B));
    assert_eq!(e["location"], json!("nf_hook_slow+0x4c"));
    assert_eq!(e["rule"], json!(rule));
    assert_eq!(e["rule_packets"], json!(2));
    assert_eq!(v[0].pod.as_ref().map(|p| p.name.as_str()), Some("client"));
    assert!(v[0].fix.contains(rule), "{}", v[0].fix);
    // Without the drop, the same connect is a plain SYN timeout.
    let steps = vec![
        Ev(ev(1_000, Retransmit, CLIENT, P, SVC)
            .sock(0x3101)
            .state(TcpState::SynSent)
            .flags(TcpFlags::SYN)),
        Ev(ev(3_000, StateChange, CLIENT, P, SVC)
            .sock(0x3101)
            .from(TcpState::SynSent)
            .state(TcpState::Close)),
    ];
    assert_eq!(causes(&run(facts(), steps)), vec![(SynTimeout, Certain, 1)]);
}

#[test]
fn an_application_abort_is_benign_and_takes_the_peer_s_reset() {
    let steps = vec![
        Ev(ev(500, ResetSent, CLIENT, P, SVC)
            .sock(0x3200)
            .role(Role::Client)
            .state(TcpState::Established)
            .reason("TCP_ABORT_ON_CLOSE")),
        Ev(ev(501, ResetReceived, SERVER, B, P)
            .sock(0x3201)
            .role(Role::Server)
            .state(TcpState::Established)
            .tcp(1, false, 7_200_000)),
        Tick(30_000),
    ];
    let v = run(facts(), steps);
    // The peer's reset joins the verdict: re-emitted with it, one occurrence.
    assert_eq!(
        causes(&v),
        vec![
            (ApplicationAbort, Certain, 1),
            (ApplicationAbort, Certain, 1)
        ]
    );
    assert_eq!((v[0].resets, v[1].resets), (1, 2));
    assert_eq!(v[1].severity, Severity::Benign);
    assert_eq!(v[1].evidence["reason"], json!("TCP_ABORT_ON_CLOSE"));
}

#[test]
fn a_refused_connect_seen_only_by_the_server_is_named() {
    let steps = vec![
        Ev(ev(500, ResetSent, SERVER, B, P)
            .reason("NO_SOCKET")
            .flags(TcpFlags::SYN)),
        Tick(30_000),
    ];
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(ConnectionRefused, Certain, 1)]);
    assert_eq!(
        (v[0].resets, v[0].evidence["port"].clone()),
        (1, json!(8080))
    );
}

#[test]
fn counts_reach_the_live_sinks_at_once() {
    let mut d = Diagnoser::new(DiagnoserConfig {
        live_interval: Duration::ZERO,
        ..DiagnoserConfig::default()
    });
    let f = facts();
    let mut live_counts = Vec::new();
    let mut records = Vec::new();
    for i in 0..3u64 {
        let src = format!("10.244.1.5:{}", 40001 + i);
        let out = d.observe(
            &ev(i * 10, ResetReceived, CLIENT, &src, SVC)
                .sock(0x3300 + i)
                .state(TcpState::SynSent)
                .0,
            &f,
        );
        records.extend(out.verdicts);
        live_counts.extend(out.live.iter().map(|v| v.count));
    }
    // One record (the re-emission waits 10 s), the counts live at once.
    assert_eq!(causes(&records), vec![(ConnectionRefused, Possible, 1)]);
    assert_eq!(live_counts, vec![2, 3]);
}

#[test]
fn every_reset_is_accounted_for_once() {
    let mut steps = keepalive_race_pair();
    steps.pop();
    // A refused connect (both sides), an abort (both sides), a reset no
    // rule explains, and an idle-timeout reset.
    steps.extend([
        Ev(ev(11_000, ResetSent, SERVER, B, "10.244.1.5:40002")
            .reason("NO_SOCKET")
            .flags(TcpFlags::SYN)),
        Ev(ev(11_001, ResetReceived, CLIENT, "10.244.1.5:40002", SVC)
            .sock(0x3400)
            .role(Role::Client)
            .state(TcpState::SynSent)),
        Ev(ev(12_000, ResetSent, CLIENT, "10.244.1.5:40003", SVC)
            .sock(0x3401)
            .role(Role::Client)
            .state(TcpState::Established)
            .reason("TCP_ABORT_ON_CLOSE")),
        Ev(ev(12_001, ResetReceived, SERVER, B, "10.244.1.5:40003")
            .sock(0x3402)
            .role(Role::Server)
            .state(TcpState::Established)),
        Ev(ev(13_000, ResetReceived, CLIENT, "10.244.1.5:40004", SVC)
            .sock(0x3403)
            .role(Role::Client)
            .state(TcpState::Established)
            .tcp(50, false, 7_200_000)),
        Ev(ev(14_000, ResetReceived, CLIENT, "10.244.1.5:40005", SVC)
            .sock(0x3404)
            .role(Role::Client)
            .state(TcpState::Established)
            .tcp(1_000_000, false, 7_200_000)),
        Tick(40_000),
    ]);
    let resets = steps
        .iter()
        .filter(|s| matches!(s, Ev(e) if matches!(e.0.kind, ResetSent | ResetReceived)))
        .count() as u64;
    let v = run(facts(), steps);
    let last = last_of_each(&v);
    let mut got: Vec<(Cause, u64)> = last.iter().map(|v| (v.cause, v.resets)).collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            (IdleTimeout, 1),
            (ConnectionRefused, 2),
            (KeepaliveRace, 2),
            (ApplicationAbort, 2),
            (Unexplained, 1),
        ]
    );
    assert_eq!(last.iter().map(|v| v.resets).sum::<u64>(), resets);
}

#[test]
fn segments_the_tcp_stack_drops_degrade_one_connection_once() {
    // The Service's segments below the client's window (#74839 where
    // conntrack accepts them): one verdict, the count in its evidence.
    let mut steps = connected(0x1000);
    for ms in [5_000, 5_200, 5_600] {
        steps.push(Ev(ev(ms, Drop, CLIENT, SVC, P)
            .sock(0x1000)
            .reason("TCP_OLD_SEQUENCE")
            .location("tcp_validate_incoming+0x16b")
            .flags(TcpFlags::PSH | TcpFlags::ACK)));
    }
    // A keepalive probe (a bare ACK below the window) and a retransmitted
    // SYN-ACK are dropped by design: no verdict of their own.
    steps.push(Ev(ev(5_700, Drop, CLIENT, SVC, P)
        .sock(0x1000)
        .reason("TCP_OLD_SEQUENCE")
        .flags(TcpFlags::ACK)));
    steps.push(Ev(ev(5_800, Drop, CLIENT, SVC, P)
        .sock(0x1000)
        .reason("TCP_INVALID_SYN")
        .flags(TcpFlags::SYN | TcpFlags::ACK)));
    steps.push(Tick(20_000));
    let v = run(facts(), steps);
    // At once, then once more with the final count (one occurrence).
    assert_eq!(
        causes(&v),
        vec![(TcpStackDrop, Certain, 1), (TcpStackDrop, Certain, 1)]
    );
    assert_eq!(v[0].severity, Severity::Degraded);
    assert_eq!((&v[0].src, &v[0].dst), (&ep(P), &ep(SVC)));
    assert_eq!(
        v[0].summary,
        "pod default/client: 1 segment from 10.96.0.10:80 dropped by the TCP stack (TCP_OLD_SEQUENCE)"
    );
    assert_eq!(v[1].evidence["drops"], json!(3));
    assert_eq!(
        v[1].summary,
        "pod default/client: 3 segments from 10.96.0.10:80 dropped by the TCP stack (TCP_OLD_SEQUENCE)"
    );
    assert!(
        v[0].fix.contains("outside the receive window"),
        "{}",
        v[0].fix
    );
    // A PAWS drop says what PAWS means behind NAT.
    let mut steps = connected(0x2000);
    steps.push(Ev(ev(5_000, Drop, CLIENT, SVC, P)
        .sock(0x2000)
        .reason("TCP_RFC7323_PAWS")));
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(TcpStackDrop, Certain, 1)]);
    assert!(v[0].fix.contains("timestamps"), "{}", v[0].fix);
}

#[test]
fn a_rising_listen_overflow_counter_names_the_full_listener() {
    use crate::model::facts::{ListenStats, QueuedListener};
    let mut f = facts();
    f.netns.get_mut(&SERVER).expect("server").listen = Some(ListenStats {
        overflows: 3,
        drops: 3,
    });
    let v = run(
        f,
        vec![
            // The first reading is the baseline; no rise, no verdict.
            Tick(1_000),
            Tick(2_000),
            Facts(|f| {
                let s = f.netns.get_mut(&SERVER).expect("server");
                s.listen = Some(ListenStats {
                    overflows: 13,
                    drops: 14,
                });
                s.queued_listeners = vec![QueuedListener {
                    ip: "0.0.0.0".parse().expect("ip"),
                    port: 8080,
                    queued: 2,
                    pid: Some(4242),
                    comm: Some("web".into()),
                }];
            }),
            Tick(3_000),
            Tick(4_000),
        ],
    );
    assert_eq!(causes(&v), vec![(ListenOverflow, Certain, 1)]);
    assert_eq!(v[0].netns, SERVER);
    assert_eq!(v[0].src, ep("0.0.0.0:8080"));
    assert_eq!(v[0].evidence["listen_overflows"], json!(10));
    assert_eq!(v[0].evidence["listen_drops"], json!(11));
    assert_eq!(v[0].evidence["listeners"][0]["comm"], json!("web"));
    assert_eq!(
        v[0].summary,
        "netns 11: 10 connection attempts dropped because a listen queue was full (port 8080 of web (4242), 2 waiting to be accepted)"
    );
}

#[test]
fn a_connect_that_needed_syn_retransmits_is_slow_with_where_the_syns_died() {
    let mut steps = vec![Ev(ev(0, StateChange, CLIENT, P, SVC)
        .sock(0x4000)
        .from(TcpState::Close)
        .state(TcpState::SynSent))];
    for ms in [1_000, 2_000, 3_000] {
        steps.push(Ev(ev(ms, Retransmit, CLIENT, P, SVC)
            .sock(0x4000)
            .state(TcpState::SynSent)
            .flags(TcpFlags::SYN)));
        // Each SYN dies in the server's namespace after DNAT.
        steps.push(Ev(ev(ms + 1, Drop, SERVER, P, B)
            .reason("IP_INADDRERRORS")
            .location("ip_error+0x94")
            .flags(TcpFlags::SYN)));
    }
    let mut est = ev(7_000, StateChange, CLIENT, P, SVC)
        .sock(0x4000)
        .role(Role::Client)
        .from(TcpState::SynSent)
        .state(TcpState::Established);
    est.0.handshake = Some(crate::model::Handshake {
        retransmits: 3,
        connect_ms: Some(7_000),
    });
    steps.push(Ev(est));
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(SlowConnect, Certain, 1)]);
    let s = &v[0];
    assert_eq!(s.severity, Severity::Degraded);
    assert_eq!(s.evidence["syn_retransmits"], json!(3));
    assert_eq!(s.evidence["connect_ms"], json!(7_000));
    assert_eq!(s.evidence["dropped"]["reason"], json!("IP_INADDRERRORS"));
    assert_eq!(s.evidence["dropped"]["drops"], json!(3));
    assert_eq!(s.evidence["dropped"]["netns"], json!(SERVER));
    assert_eq!(
        s.summary,
        "pod default/client: connected to 10.96.0.10:80 only after 3 SYN retransmits (7.0 s): 3 packets dropped in pod default/server (IP_INADDRERRORS at ip_error+0x94)"
    );
}

#[test]
fn a_reset_after_the_peer_closed_a_busy_connection_is_the_peer_s_abort() {
    // The peer closed right after the last data (no idle time): not an idle
    // timeout, the peer application stopped early.
    let v = run(
        facts(),
        vec![
            Ev(ev(10_001, ResetReceived, CLIENT, P, SVC)
                .sock(0x3000)
                .role(Role::Client)
                .state(TcpState::CloseWait)
                .peer_fin(0, 0)),
            Tick(30_000),
        ],
    );
    assert_eq!(causes(&v), vec![(ApplicationAbort, Likely, 1)]);
    assert_eq!(v[0].severity, Severity::Benign);
    assert_eq!(v[0].evidence["peer_idle_before_fin_ms"], json!(0));
}

#[test]
fn without_reset_reasons_data_after_close_is_the_application_s_abort() {
    // 6.1: the client closed (FIN_WAIT1), nginx's data arrived, the kernel
    // reset the socket (tcp_reset) and answered the data with a reset; no
    // reason names it.
    let v = run(
        facts(),
        vec![
            Ev(ev(5_000, ResetReceived, CLIENT, P, SVC)
                .sock(0x5000)
                .role(Role::Client)
                .state(TcpState::FinWait1)),
            Ev(ev(5_000, ResetSent, CLIENT, P, SVC)
                .sock(0x5000)
                .role(Role::Client)
                .state(TcpState::Close)
                .flags(TcpFlags::PSH | TcpFlags::ACK)),
            Tick(30_000),
        ],
    );
    assert_eq!(causes(&v), vec![(ApplicationAbort, Certain, 1)]);
    assert_eq!(v[0].severity, Severity::Benign);
    assert_eq!(
        v[0].resets, 2,
        "the kernel's reset of the socket and the one it sent"
    );
    assert!(
        v[0].summary
            .contains("had closed it when more data arrived"),
        "{}",
        v[0].summary
    );
}

/// A refused connect seen from both sides: the server's reset (no
/// socket) and the client's.
fn refused_pair(ms: u64, port: u16, sock: u64) -> Vec<Step> {
    let client = format!("10.244.1.5:{port}");
    vec![
        Ev(ev(ms, ResetSent, SERVER, B, &client)
            .reason("NO_SOCKET")
            .flags(TcpFlags::SYN)),
        Ev(ev(ms, ResetReceived, CLIENT, &client, B)
            .sock(sock)
            .role(Role::Client)
            .state(TcpState::SynSent)),
    ]
}

#[test]
fn a_storm_counted_in_the_kernel_gives_the_verdicts_of_every_record() {
    // Record by record.
    let mut steps = Vec::new();
    for i in 0..50u16 {
        steps.extend(refused_pair(
            1_000 + u64::from(i),
            40_000 + i,
            0x7000 + u64::from(i),
        ));
    }
    steps.push(Tick(30_000));
    let one_by_one = run(facts(), steps);

    // The first pair as records, the 49 others as the kernel's counts.
    let mut d = Diagnoser::new(DiagnoserConfig::default());
    let f = facts();
    let mut counted = Vec::new();
    let first = refused_pair(1_000, 40_000, 0x7000);
    let mut firsts = Vec::new();
    for (generation, step) in (0..).zip(first) {
        if let Ev(mut e) = step {
            // The kernel's mark: this record starts a storm it counts.
            e.0.storm = Some(StormId {
                generation,
                first_ns: 1_000_000_000,
                cpu: 0,
            });
            counted.extend(d.observe(&e.0, &f).verdicts);
            firsts.push(e.0);
        }
    }
    for e in &firsts {
        counted.extend(d.repeats(e, 49, at(1_500)).verdicts);
    }
    counted.extend(d.tick(at(30_000), &f, &mut |_| {}).verdicts);
    counted.extend(d.finish(at(31_000), &facts()));

    let last = |v: &[Verdict]| {
        v.iter()
            .rfind(|v| v.cause == ConnectionRefused)
            .map(|v| (v.count, v.resets))
    };
    assert_eq!(last(&one_by_one), Some((50, 100)));
    assert_eq!(last(&counted), last(&one_by_one));
}

#[test]
fn a_refusal_storm_seen_only_by_the_server_counts_each_reset_once() {
    // Clients elsewhere: the server's resets alone, settled as refused.
    let mut d = Diagnoser::new(DiagnoserConfig::default());
    let f = facts();
    let mut out = Vec::new();
    let mut first = ev(1_000, ResetSent, SERVER, B, "10.244.9.9:40000")
        .reason("NO_SOCKET")
        .flags(TcpFlags::SYN);
    first.0.storm = Some(StormId {
        generation: 0,
        first_ns: 1_000_000_000,
        cpu: 0,
    });
    out.extend(d.observe(&first.0, &f).verdicts);
    // The counts arrive before the reset settled: they wait for it.
    out.extend(d.repeats(&first.0, 9, at(2_000)).verdicts);
    out.extend(d.tick(at(20_000), &f, &mut |_| {}).verdicts);
    out.extend(d.finish(at(21_000), &facts()));
    let v = out
        .iter()
        .rfind(|v| v.cause == ConnectionRefused)
        .expect("refused");
    assert_eq!((v.count, v.resets), (10, 10));
    assert_eq!(v.netns, SERVER);
}

/// kube-proxy's iptables-mode rule for `default/web:http` (ClusterIP
/// 10.96.0.10:80) while the Service has no endpoints, as it writes it.
const NO_ENDPOINTS_RULE: &str = "-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment \"default/web:http has no endpoints\" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable";

fn node_rules(f: &mut NodeFacts, rules: &[(&str, u64)]) {
    f.netns.get_mut(&NODE).expect("node facts").drop_rules = Some(
        rules
            .iter()
            .map(|(text, packets)| DropRule {
                text: (*text).into(),
                packets: Some(*packets),
            })
            .collect(),
    );
}

/// The client's SYN to `dst`, dropped by netfilter in the node.
fn syn_dropped(ms: u64, src: &str, dst: &str, location: &str) -> Step {
    Ev(ev(ms, Drop, NODE, src, dst)
        .reason("NETFILTER_DROP")
        .location(location)
        .flags(TcpFlags::SYN))
}

fn connecting(ms: u64, sock: u64, src: &str, dst: &str) -> Step {
    Ev(ev(ms, StateChange, CLIENT, src, dst)
        .sock(sock)
        .from(TcpState::Close)
        .state(TcpState::SynSent))
}

fn syn_retransmit(ms: u64, sock: u64, src: &str, dst: &str) -> Step {
    Ev(ev(ms, Retransmit, CLIENT, src, dst)
        .sock(sock)
        .state(TcpState::SynSent)
        .flags(TcpFlags::SYN))
}

/// No verdict of `cause` at likely or certain.
fn never_sure_of(v: &[Verdict], cause: Cause) {
    assert!(
        !v.iter().any(|v| v.cause == cause && v.confidence >= Likely),
        "{cause:?} taken: {:#?}",
        causes(v)
    );
}

#[test]
fn a_service_without_endpoints_is_named_from_kube_proxy_s_rule() {
    let mut f = facts();
    node_rules(&mut f, &[(NO_ENDPOINTS_RULE, 3)]);
    // The ICMP port unreachable is soft in SYN_SENT: the client retries.
    let steps = vec![
        connecting(0, 0x5000, P, SVC),
        syn_dropped(1, P, SVC, "nft_do_chain+0x46f"),
        syn_retransmit(1_000, 0x5000, P, SVC),
        syn_dropped(1_001, P, SVC, "nft_do_chain+0x46f"),
        Tick(20_000),
    ];
    let v = run(f.clone(), steps);
    assert_eq!(causes(&v), vec![(ServiceNoEndpoints, Certain, 1)]);
    assert_eq!(v[0].evidence["service"], json!("default/web:http"));
    assert_eq!(v[0].evidence["rule"], json!(NO_ENDPOINTS_RULE));
    assert_eq!(
        v[0].fix,
        "Service default/web:http (10.96.0.10:80) has no ready endpoints, so kube-proxy rejects its connections: check its pods' readiness and its selector (kubectl get endpointslices -n default -l kubernetes.io/service-name=web)"
    );
    // The hard error (ECONNREFUSED, no reset anywhere) is the same cause.
    let steps = vec![
        connecting(0, 0x5001, P, SVC),
        syn_dropped(1, P, SVC, "nft_do_chain+0x46f"),
        Ev(ev(2, SocketError, CLIENT, P, SVC)
            .sock(0x5001)
            .state(TcpState::SynSent)
            .errno(Errno::ECONNREFUSED)),
        Tick(20_000),
    ];
    assert_eq!(
        causes(&run(f.clone(), steps)),
        vec![(ServiceNoEndpoints, Certain, 1)]
    );
    // nftables mode: an element of kube-proxy's no-endpoint-services map.
    node_rules(
        &mut f,
        &[(
            "ip kube-proxy no-endpoint-services: 10.96.0.10 . tcp . 80 comment \"default/web:http\" : goto reject-chain",
            0,
        )],
    );
    let steps = vec![
        connecting(0, 0x5002, P, SVC),
        syn_dropped(1, P, SVC, "nft_do_chain+0x46f"),
        syn_retransmit(1_000, 0x5002, P, SVC),
    ];
    let v = run(f, steps);
    assert_eq!(causes(&v), vec![(ServiceNoEndpoints, Certain, 1)]);
    assert_eq!(v[0].evidence["service"], json!("default/web:http"));
}

#[test]
fn a_firewall_s_reset_is_a_rejection_not_a_refusal() {
    let mut f = facts();
    let rule =
        "-A FORWARD -d 10.244.2.9/32 -p tcp -m tcp --dport 8080 -j REJECT --reject-with tcp-reset";
    // The rules of the node are read only after its first drop.
    let steps = vec![
        connecting(0, 0x5100, P, B),
        syn_dropped(1, P, B, "nft_do_chain+0x46f"),
        Ev(ev(2, ResetReceived, CLIENT, P, B)
            .sock(0x5100)
            .state(TcpState::SynSent)),
        Facts(|f| {
            node_rules(
                f,
                &[(
                    "-A FORWARD -d 10.244.2.9/32 -p tcp -m tcp --dport 8080 -j REJECT --reject-with tcp-reset",
                    1,
                )],
            );
        }),
        Tick(1_000),
        Tick(20_000),
    ];
    let v = run(f.clone(), steps);
    assert_eq!(causes(&v), vec![(FirewallReject, Certain, 1)]);
    assert_eq!(v[0].evidence["rule"], json!(rule));
    assert_eq!(v[0].evidence["rejected_in_netns"], json!(NODE));
    assert_eq!(v[0].resets, 1, "its reset is accounted for");
    never_sure_of(&v, ConnectionRefused);
    // Look-alike: a listener's refusal (the server's kernel found no
    // socket for the SYN; no netfilter drop) is not a rejection.
    node_rules(&mut f, &[(rule, 1)]);
    let steps = vec![
        connecting(0, 0x5101, P, B),
        Ev(ev(1, ResetSent, SERVER, B, P)
            .reason("NO_SOCKET")
            .flags(TcpFlags::SYN)),
        Ev(ev(2, ResetReceived, CLIENT, P, B)
            .sock(0x5101)
            .state(TcpState::SynSent)),
        Tick(20_000),
    ];
    let v = run(f, steps);
    assert_eq!(causes(&v), vec![(ConnectionRefused, Certain, 1)]);
    never_sure_of(&v, FirewallReject);
}

#[test]
fn a_peer_that_lost_the_connection_is_not_conntrack_invalid() {
    // No NAT: the client talks to the pod's address, whose new kernel
    // (the pod was replaced, its IP reused) has no socket for it.
    let steps = vec![
        connecting(0, 0x5200, P, B),
        Ev(ev(1, StateChange, CLIENT, P, B)
            .sock(0x5200)
            .from(TcpState::SynSent)
            .state(TcpState::Established)),
        Ev(ev(60_000, ResetSent, SERVER, B, P)
            .reason("NO_SOCKET")
            .flags(TcpFlags::ACK | TcpFlags::PSH)),
        Ev(ev(60_001, ResetReceived, CLIENT, P, B)
            .sock(0x5200)
            .state(TcpState::Established)
            .role(Role::Client)
            .tcp(59_000, false, 7_200_000)),
        Tick(80_000),
    ];
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(PeerLostConnection, Certain, 1)]);
    assert_eq!(v[0].evidence["reset_sent_by"], json!("pod default/server"));
    never_sure_of(&v, ConntrackInvalid);
    // Look-alike: seed 001's pair (the client's kernel resets a segment
    // that escaped reverse NAT; the server receives it) stays
    // conntrack_invalid, and not a lost peer.
    let mut steps = vec![Tick(0), Facts(|f| node_ct(f).stats.invalid += 1), Tick(900)];
    steps.extend(invalid_pair(false));
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(ConntrackInvalid, Certain, 1)]);
}

const MASQUERADE: &str =
    "-A POSTROUTING -s 10.244.0.0/16 -d 10.89.0.9/32 -p tcp -j MASQUERADE --to-ports 1000-1001";

/// SYNs from the client to 10.89.0.9:80 dropped at the node's NAT, with
/// the node's conntrack `count` entries.
fn snat_steps(count: u64) -> Vec<Step> {
    let dst = "10.89.0.9:80";
    // Dropped after the NAT rewrote the source: only the time ties a drop
    // to the client's SYN.
    let nat = "10.89.0.1:1000";
    let mut steps = vec![
        Tick(0),
        connecting(0, 0x5300, P, dst),
        syn_dropped(1, nat, dst, "nf_hook_slow+0x9a"),
    ];
    steps.push(match count {
        995 => Facts(|f| {
            let ct = node_ct(f);
            ct.count = 995;
            ct.stats.drop += 1;
        }),
        _ => Facts(|f| {
            let ct = node_ct(f);
            ct.count = 4;
            ct.stats.insert_failed += 1;
            ct.stats.drop += 1;
        }),
    });
    steps.extend([
        Facts(|f| node_rules(f, &[(MASQUERADE, 40)])),
        Tick(900),
        syn_retransmit(1_000, 0x5300, P, dst),
        syn_dropped(1_001, nat, dst, "nf_hook_slow+0x9a"),
        syn_retransmit(3_000, 0x5300, P, dst),
        syn_dropped(3_001, nat, dst, "nf_hook_slow+0x9a"),
        Tick(20_000),
    ]);
    steps
}

#[test]
fn a_source_nat_out_of_ports_is_not_a_full_table() {
    let v = run(facts(), snat_steps(4));
    assert_eq!(causes(&v), vec![(SnatPortExhaustion, Certain, 1)]);
    let e = &v[0].evidence;
    assert_eq!(e["snat_rule"], json!(MASQUERADE));
    assert_eq!(e["snat_ports"], json!("1000-1001"));
    assert_eq!(e["insert_failed_delta"], json!(1));
    assert_eq!(
        (e["ct_count"].clone(), e["ct_max"].clone()),
        (json!(4), json!(1000))
    );
    assert!(v[0].fix.contains("--random-fully"), "{}", v[0].fix);
    never_sure_of(&v, ConntrackTableFull);
    never_sure_of(&v, NetfilterDrop);
    // Look-alike: a table at its max drops SYNs through the same hook.
    let v = run(facts(), snat_steps(995));
    assert!(
        v.iter()
            .any(|v| v.cause == ConntrackTableFull && v.confidence == Certain),
        "{:?}",
        causes(&v)
    );
    never_sure_of(&v, SnatPortExhaustion);
}

#[test]
fn a_path_mtu_black_hole_is_named_from_too_big_drops() {
    let too_big = |ms| {
        Ev(ev(ms, Drop, NODE, P, SVC)
            .reason("PKT_TOO_BIG")
            .location("ip_forward+0x1f2")
            .flags(TcpFlags::ACK | TcpFlags::PSH))
    };
    // Each retransmit is dropped again: the ICMP never shrank them.
    let mut steps = connected(0x5400);
    steps.push(too_big(500));
    for (i, ms) in [1_000u64, 1_400, 2_200].into_iter().enumerate() {
        steps.push(Ev(ev(ms, Retransmit, CLIENT, P, SVC)
            .sock(0x5400)
            .state(TcpState::Established)
            .tcp(200 * (i as u64 + 1), false, 7_200_000)));
        steps.push(too_big(ms + 1));
    }
    steps.push(Tick(20_000));
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(PmtuBlackHole, Certain, 1)]);
    assert_eq!(v[0].evidence["dropped"]["reason"], json!("PKT_TOO_BIG"));
    assert!(v[0].fix.contains("MTU"), "{}", v[0].fix);
    never_sure_of(&v, RetransmitStorm);
    // Look-alike: the same retransmits without too-big drops are no
    // path-MTU verdict.
    let mut steps = connected(0x5401);
    for ms in [1_000u64, 1_400, 2_200, 3_800, 7_000] {
        steps.push(Ev(ev(ms, Retransmit, CLIENT, P, SVC)
            .sock(0x5401)
            .state(TcpState::Established)
            .tcp(100, false, 7_200_000)));
    }
    let v = run(facts(), steps);
    never_sure_of(&v, PmtuBlackHole);
    // Look-alike: path MTU discovery working. The first burst is dropped,
    // the ICMP shrinks the segments, their retransmits pass.
    let mut steps = connected(0x5402);
    steps.push(too_big(500));
    for ms in [501u64, 502] {
        steps.push(Ev(ev(ms, Retransmit, CLIENT, P, SVC)
            .sock(0x5402)
            .state(TcpState::Established)
            .tcp(100, false, 7_200_000)));
    }
    steps.push(Tick(20_000));
    let v = run(facts(), steps);
    never_sure_of(&v, PmtuBlackHole);
}

#[test]
fn an_icmp_error_on_a_connect_is_unreachable_not_a_timeout() {
    let steps = vec![
        connecting(0, 0x5500, P, SVC),
        Ev(ev(1, Drop, NODE, P, SVC)
            .reason("IP_INNOROUTES")
            .location("ip_error+0x94")
            .flags(TcpFlags::SYN)),
        syn_retransmit(1_000, 0x5500, P, SVC),
        Ev(ev(1_001, SocketError, CLIENT, P, SVC)
            .sock(0x5500)
            .state(TcpState::SynSent)
            .errno(Errno::ENETUNREACH)),
        Ev(ev(1_001, StateChange, CLIENT, P, SVC)
            .sock(0x5500)
            .from(TcpState::SynSent)
            .state(TcpState::Close)),
        Tick(20_000),
    ];
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(Unreachable, Certain, 1)]);
    assert_eq!(v[0].evidence["errno"], json!("ENETUNREACH"));
    assert!(v[0].fix.contains("no route to 10.96.0.10"), "{}", v[0].fix);
    never_sure_of(&v, SynTimeout);
}

#[test]
fn unexplained_lists_what_its_own_evidence_ruled_out() {
    let mut steps = connected(0x5600);
    steps.extend([
        Ev(ev(5_000, ResetReceived, CLIENT, P, SVC)
            .sock(0x5600)
            .state(TcpState::Established)
            .tcp(3_000, false, 7_200_000)),
        Tick(30_000),
    ]);
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(Unexplained, Possible, 1)]);
    let ruled = &v[0].evidence["ruled_out"];
    assert_eq!(
        ruled["idle_timeout"],
        json!("idle 3000 ms, within the 900 s IPVS timeout")
    );
    assert_eq!(
        ruled["keepalive_race"],
        json!("the peer sent no FIN before it")
    );
    assert_eq!(
        ruled["netfilter_drop"],
        json!("no packet of this connection was seen dropped")
    );
    assert_eq!(v[0].evidence["not_checked"], json!([]));
}

/// A connect that got no answer at all: retransmitted SYNs, then closed.
fn unanswered(src: &str, dst: &str) -> Vec<Step> {
    vec![
        connecting(0, 0x5700, src, dst),
        syn_retransmit(1_000, 0x5700, src, dst),
        syn_retransmit(3_000, 0x5700, src, dst),
        Ev(ev(7_000, StateChange, CLIENT, src, dst)
            .sock(0x5700)
            .from(TcpState::SynSent)
            .state(TcpState::Close)),
        Tick(20_000),
    ]
}

/// A listener's refusal: the server's kernel found no socket for the SYN.
fn listener_refusal() -> Vec<Step> {
    vec![
        connecting(0, 0x5701, P, B),
        Ev(ev(1, ResetSent, SERVER, B, P)
            .reason("NO_SOCKET")
            .flags(TcpFlags::SYN)),
        Ev(ev(2, ResetReceived, CLIENT, P, B)
            .sock(0x5701)
            .state(TcpState::SynSent)),
        Tick(20_000),
    ]
}

/// A firewall on the node rejected the SYN with a reset.
fn firewall_reset(rule: fn(&mut NodeFacts)) -> Vec<Step> {
    vec![
        connecting(0, 0x5702, P, B),
        syn_dropped(1, P, B, "nft_do_chain+0x46f"),
        Ev(ev(2, ResetReceived, CLIENT, P, B)
            .sock(0x5702)
            .state(TcpState::SynSent)),
        Facts(rule),
        Tick(1_000),
        Tick(20_000),
    ]
}

fn plain_reject_rule(f: &mut NodeFacts) {
    node_rules(
        f,
        &[(
            "-A FORWARD -d 10.244.2.9/32 -p tcp -m tcp --dport 8080 -j REJECT --reject-with tcp-reset",
            1,
        )],
    );
}

/// The pod's address given to a new pod: its kernel resets the old
/// connection's next segment.
fn replaced_peer() -> Vec<Step> {
    vec![
        connecting(0, 0x5703, P, B),
        Ev(ev(1, StateChange, CLIENT, P, B)
            .sock(0x5703)
            .from(TcpState::SynSent)
            .state(TcpState::Established)),
        Ev(ev(60_000, ResetSent, SERVER, B, P)
            .reason("NO_SOCKET")
            .flags(TcpFlags::ACK | TcpFlags::PSH)),
        Ev(ev(60_001, ResetReceived, CLIENT, P, B)
            .sock(0x5703)
            .state(TcpState::Established)
            .role(Role::Client)
            .tcp(59_000, false, 7_200_000)),
        Tick(80_000),
    ]
}

/// Retransmits of an established connection whose segments are dropped
/// again and again as too big.
fn too_big_retransmits() -> Vec<Step> {
    let mut steps = connected(0x5704);
    for ms in [500u64, 1_000, 1_400, 2_200, 3_800, 7_000] {
        steps.push(Ev(ev(ms + 1, Drop, NODE, P, SVC)
            .reason("PKT_TOO_BIG")
            .flags(TcpFlags::ACK | TcpFlags::PSH)));
        if ms > 500 {
            steps.push(Ev(ev(ms, Retransmit, CLIENT, P, SVC)
                .sock(0x5704)
                .state(TcpState::Established)
                .tcp(100, false, 7_200_000)));
        }
    }
    steps.push(Tick(20_000));
    steps
}

/// Each cause with the signals of its nearest neighbour, which must not
/// produce it at `likely` or `certain`: the look-alike table.
#[test]
fn every_cause_has_a_look_alike_that_does_not_take_it() {
    let ip_reuse_with_invalid_counter = || {
        let mut s = vec![Tick(0), Facts(|f| node_ct(f).stats.invalid += 1), Tick(900)];
        s.extend(invalid_pair(false));
        s
    };
    let icmp_unreachable = || {
        vec![
            connecting(0, 0x5705, P, SVC),
            Ev(ev(1, Drop, NODE, P, SVC)
                .reason("IP_INNOROUTES")
                .flags(TcpFlags::SYN)),
            Ev(ev(2, SocketError, CLIENT, P, SVC)
                .sock(0x5705)
                .state(TcpState::SynSent)
                .errno(Errno::EHOSTUNREACH)),
            Tick(20_000),
        ]
    };
    let quick_connect = || {
        vec![
            connecting(0, 0x5706, P, SVC),
            Ev(ev(2, StateChange, CLIENT, P, SVC)
                .sock(0x5706)
                .from(TcpState::SynSent)
                .state(TcpState::Established)),
            Tick(20_000),
        ]
    };
    let data_drop = || {
        let mut s = connected(0x5707);
        s.push(Ev(ev(50, Drop, NODE, P, SVC)
            .reason("NETFILTER_DROP")
            .flags(TcpFlags::ACK | TcpFlags::PSH)));
        s.push(Tick(20_000));
        s
    };
    let bind = |port: &str| {
        vec![Ev(
            ev(0, BindError, CLIENT, port, "0.0.0.0:0").errno(Errno::EADDRINUSE)
        )]
    };
    let peer_busy_close = || {
        vec![
            Ev(ev(10_001, ResetReceived, CLIENT, P, SVC)
                .sock(0x3000)
                .role(Role::Client)
                .state(TcpState::CloseWait)
                .peer_fin(0, 0)),
            Tick(30_000),
        ]
    };
    let table: Vec<(Cause, &str, Vec<Step>)> = vec![
        (
            IdleTimeout,
            "a client kept alive below the path's timeout",
            black_hole(true),
        ),
        (
            ConntrackInvalid,
            "a replaced peer's reset, no INVALID counted",
            replaced_peer(),
        ),
        (
            ConntrackTableFull,
            "a source NAT out of ports",
            snat_steps(4),
        ),
        (
            PortExhaustion,
            "bind() to a port another socket holds",
            bind("0.0.0.0:45000"),
        ),
        (
            BindConflict,
            "bind() to port 0 with no ephemeral port left",
            bind("0.0.0.0:0"),
        ),
        (
            NodeportCollision,
            "a pod's connect that nothing answers",
            unanswered(P, B),
        ),
        (
            ConnectionRefused,
            "a firewall's reset",
            firewall_reset(plain_reject_rule),
        ),
        (
            ServiceNoEndpoints,
            "a firewall's plain REJECT",
            firewall_reset(plain_reject_rule),
        ),
        (FirewallReject, "a listener's refusal", listener_refusal()),
        (Unreachable, "a connect nothing answers", unanswered(P, B)),
        (
            SnatPortExhaustion,
            "a full conntrack table",
            snat_steps(995),
        ),
        (PmtuBlackHole, "data retransmits with no drop", {
            let mut s = connected(0x5708);
            for ms in [1_000u64, 1_400, 2_200, 3_800, 7_000] {
                s.push(Ev(ev(ms, Retransmit, CLIENT, P, SVC)
                    .sock(0x5708)
                    .state(TcpState::Established)
                    .tcp(100, false, 7_200_000)));
            }
            s
        }),
        (
            PeerLostConnection,
            "seed 001's escaped-NAT reset pair",
            ip_reuse_with_invalid_counter(),
        ),
        (SynTimeout, "an ICMP host unreachable", icmp_unreachable()),
        (
            RetransmitStorm,
            "a path-MTU black hole",
            too_big_retransmits(),
        ),
        (
            KeepaliveRace,
            "a peer that closed a busy connection",
            peer_busy_close(),
        ),
        (NetfilterDrop, "a source NAT out of ports", snat_steps(4)),
        (
            ApplicationAbort,
            "the keepalive race",
            keepalive_race_pair(),
        ),
        (TcpStackDrop, "a netfilter drop of data", data_drop()),
        (
            ListenOverflow,
            "a connect nothing answers",
            unanswered(P, B),
        ),
        (
            SlowConnect,
            "a connect without retransmits",
            quick_connect(),
        ),
        (Unexplained, "a listener's refusal", listener_refusal()),
    ];
    let covered: std::collections::BTreeSet<Cause> = table.iter().map(|(c, _, _)| *c).collect();
    assert_eq!(
        covered,
        Cause::all().collect(),
        "every cause has a look-alike"
    );
    for (cause, what, steps) in table {
        let v = run(facts(), steps);
        assert!(
            !v.iter().any(|v| v.cause == cause && v.confidence >= Likely),
            "{what} taken as {cause:?}: {:?}",
            causes(&v)
        );
    }
}

#[test]
fn connects_a_full_accept_queue_starved_are_its_overflow_not_a_syn_timeout() {
    use crate::model::facts::{ListenStats, QueuedListener};
    let mut f = facts();
    f.netns.get_mut(&SERVER).expect("server").listen = Some(ListenStats {
        overflows: 3,
        drops: 3,
    });
    let overflowing = |f: &mut NodeFacts| {
        let s = f.netns.get_mut(&SERVER).expect("server");
        s.listen = Some(ListenStats {
            overflows: 13,
            drops: 13,
        });
        s.queued_listeners = vec![QueuedListener {
            ip: "0.0.0.0".parse().expect("ip"),
            port: 8080,
            queued: 129,
            pid: Some(4242),
            comm: Some("web".into()),
        }];
    };
    let mut steps = vec![Tick(0), Facts(overflowing), Tick(900)];
    steps.extend(unanswered(P, B));
    let v = run(f.clone(), steps);
    let client: Vec<_> = v.iter().filter(|v| v.netns == CLIENT).collect();
    assert_eq!(client.len(), 1, "{:?}", causes(&v));
    // The listener is on 0.0.0.0: that it is this destination's is likely.
    assert_eq!(
        (client[0].cause, client[0].confidence),
        (ListenOverflow, Likely)
    );
    assert_eq!(client[0].evidence["listener_netns"], json!(SERVER));
    never_sure_of(&v, SynTimeout);
    // A listener on another port overflowed: only a possible timeout.
    let mut steps = vec![Tick(0), Facts(overflowing), Tick(900)];
    steps.extend(unanswered(P, "10.244.2.9:9090"));
    let v = run(f, steps);
    assert!(
        v.iter()
            .any(|v| v.cause == SynTimeout && v.confidence == Possible),
        "{:?}",
        causes(&v)
    );
}

#[test]
fn a_connect_ended_by_an_icmp_error_without_its_error_report_is_named() {
    // The error reached the socket; only the state change reported it.
    let steps = vec![
        connecting(0, 0x5800, P, B),
        Ev(ev(2, StateChange, CLIENT, P, B)
            .sock(0x5800)
            .from(TcpState::SynSent)
            .state(TcpState::Close)
            .errno(Errno::ENETUNREACH)),
        Tick(20_000),
    ];
    let v = run(facts(), steps);
    assert_eq!(causes(&v), vec![(Unreachable, Likely, 1)]);
}

#[test]
fn dropped_replies_are_named_as_replies() {
    let mut f = facts();
    node_rules(&mut f, &[("-A FORWARD -s 10.244.2.9/32 -p tcp -j DROP", 4)]);
    let steps = vec![
        connecting(0, 0x5801, P, B),
        // The server's SYN-ACK, dropped on its way back.
        Ev(ev(1, Drop, NODE, B, P)
            .reason("NETFILTER_DROP")
            .location("nft_do_chain+0x46f")
            .flags(TcpFlags::SYN | TcpFlags::ACK)),
        syn_retransmit(1_000, 0x5801, P, B),
        Tick(20_000),
    ];
    let v = run(f, steps);
    assert_eq!(causes(&v), vec![(NetfilterDrop, Certain, 1)]);
    assert!(
        v[0].fix
            .contains("allow 10.244.2.9 to reach 10.244.1.5:40000 (the replies)"),
        "{}",
        v[0].fix
    );
}

#[test]
fn a_rule_rejecting_an_established_connection_does_not_say_connect() {
    let mut f = facts();
    node_rules(
        &mut f,
        &[(
            "-A FORWARD -d 10.244.2.9/32 -p tcp -m tcp --dport 8080 -j REJECT --reject-with icmp-port-unreachable",
            3,
        )],
    );
    let mut steps = connected(0x5802);
    steps.extend([
        Ev(ev(5_000, Drop, NODE, P, B)
            .reason("NETFILTER_DROP")
            .location("nft_do_chain+0x46f")
            .flags(TcpFlags::PSH | TcpFlags::ACK)),
        Ev(ev(5_200, Retransmit, CLIENT, P, SVC)
            .sock(0x5802)
            .state(TcpState::Established)
            .tcp(200, false, 7_200_000)),
        Tick(20_000),
    ]);
    let v = run(f, steps);
    assert_eq!(causes(&v), vec![(FirewallReject, Certain, 1)]);
    assert!(
        v[0].summary.contains("established connection"),
        "{}",
        v[0].summary
    );
    assert!(!v[0].fix.contains("never reached"), "{}", v[0].fix);
    assert_eq!(
        v[0].evidence["checks"]["seen"][0],
        json!("segments_dropped_by_netfilter")
    );
}

#[test]
fn answers_the_client_reset_make_a_syn_timeout_only_possible() {
    // The SYN-ACKs come back from the pod's address, not the ClusterIP the
    // client connected to: its kernel resets them.
    let mut steps = vec![connecting(0, 0x5803, P, SVC)];
    for ms in [1, 1_001, 3_001] {
        steps.push(Ev(ev(ms, ResetSent, CLIENT, P, B)
            .reason("NO_SOCKET")
            .flags(TcpFlags::SYN | TcpFlags::ACK)));
    }
    steps.extend([
        syn_retransmit(1_000, 0x5803, P, SVC),
        syn_retransmit(3_000, 0x5803, P, SVC),
        Ev(ev(7_000, StateChange, CLIENT, P, SVC)
            .sock(0x5803)
            .from(TcpState::SynSent)
            .state(TcpState::Close)
            .errno(Errno::ETIMEDOUT)),
        Tick(30_000),
    ]);
    let v = run(facts(), steps);
    assert!(
        v.iter()
            .any(|v| v.cause == SynTimeout && v.confidence == Possible),
        "{:?}",
        causes(&v)
    );
    never_sure_of(&v, SynTimeout);
    let t = v.iter().find(|v| v.cause == SynTimeout).expect("timeout");
    assert_eq!(t.evidence["answered_from"], json!(B));
}

#[test]
fn a_storming_connection_that_then_times_out_is_a_failure() {
    let mut steps = connected(0x5804);
    for ms in [1_000u64, 1_400, 2_200, 3_800, 7_000] {
        steps.push(Ev(ev(ms, Retransmit, CLIENT, P, SVC)
            .sock(0x5804)
            .state(TcpState::Established)
            .tcp(100, false, 7_200_000)));
    }
    steps.extend([
        Ev(ev(20_000, SocketError, CLIENT, P, SVC)
            .sock(0x5804)
            .state(TcpState::Close)
            .errno(Errno::ETIMEDOUT)),
        Tick(40_000),
    ]);
    let v = run(facts(), steps);
    assert!(
        v.iter()
            .any(|v| v.severity == Severity::Failure && v.cause == Unexplained),
        "{:?}",
        causes(&v)
    );
}
