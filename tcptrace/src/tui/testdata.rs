//! A recorded incident for tests: the committed fixture
//! `tests/fixtures/incident.ndjson` is this, serialized.
use std::{
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde_json::json;

use crate::model::{
    Cause, Confidence, Endpoint, Errno, Event, EventKind, HookStats, IdentityLevel, PodRef, Record,
    ServiceRef, Stats, TcpDetail, TcpFlags, TcpState, Verdict,
};

use super::app::Header;

/// 2025-03-14T09:26:00Z plus `ms` milliseconds.
pub(crate) fn at(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(1_741_944_360_000 + ms)
}

pub(crate) fn header() -> Header {
    Header {
        node: "kind-worker".into(),
        kernel: "6.18.0-cloud-amd64".into(),
        probes: vec![
            ("tcp_retransmit_skb".into(), "tracepoint".into()),
            ("tcp_send_reset".into(), "tracepoint".into()),
            ("kfree_skb".into(), "tracepoint".into()),
            ("inet_hash_connect".into(), "syscall".into()),
        ],
    }
}

pub(crate) fn pod(namespace: &str, name: &str) -> PodRef {
    PodRef {
        namespace: namespace.into(),
        name: name.into(),
        uid: format!("uid-{name}"),
        container: None,
    }
}

pub(crate) fn ep(ip: &str, port: u16) -> Endpoint {
    Endpoint::new(
        ip.parse::<IpAddr>().unwrap_or(IpAddr::from([0, 0, 0, 0])),
        port,
    )
}

fn svc(mut e: Endpoint, namespace: &str, name: &str) -> Endpoint {
    e.service = Some(ServiceRef {
        namespace: namespace.into(),
        name: name.into(),
        port_name: None,
    });
    e
}

fn on_pod(mut e: Endpoint, p: PodRef) -> Endpoint {
    e.pod = Some(p);
    e
}

/// An event of `pod` (or of the host netns when `None`).
pub(crate) fn event(
    ms: u64,
    kind: EventKind,
    pod: Option<PodRef>,
    src: Endpoint,
    dst: Endpoint,
) -> Event {
    let netns = match &pod {
        Some(p) => 4_026_532_000 + p.name.len() as u32,
        None => 4_026_531_840,
    };
    let mut e = Event::new(at(ms), kind, src, dst, netns);
    e.identity_level = if pod.is_some() {
        IdentityLevel::Pod
    } else {
        IdentityLevel::Netns
    };
    e.pod = pod;
    e
}

#[allow(clippy::too_many_arguments)]
fn verdict(
    ms: u64,
    cause: Cause,
    confidence: Confidence,
    pod: Option<PodRef>,
    src: Endpoint,
    dst: Endpoint,
    summary: &str,
    evidence: serde_json::Value,
    fix: &str,
    count: u64,
    first_ms: u64,
) -> Verdict {
    Verdict {
        time: at(ms),
        cause,
        confidence,
        identity_level: if pod.is_some() {
            IdentityLevel::Pod
        } else {
            IdentityLevel::Netns
        },
        netns: match &pod {
            Some(p) => 4_026_532_000 + p.name.len() as u32,
            None => 4_026_531_840,
        },
        pod,
        netns_name: None,
        node: None,
        pid: None,
        comm: None,
        src,
        dst,
        summary: summary.into(),
        evidence: match evidence {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        },
        fix: fix.into(),
        count,
        resets: 0,
        first_seen: at(first_ms),
        last_seen: at(ms),
        severity: cause.severity(),
    }
}

fn stats(ms: u64, seen: u64, lost: u64, last: bool) -> Stats {
    Stats {
        node: Some("kind-worker".into()),
        kernel: Some("6.18.0-cloud-amd64".into()),
        time: at(ms),
        uptime_s: ms as f64 / 1000.0 + 5.0,
        seen,
        lost,
        malformed: 0,
        sink_dropped: 0,
        hooks: vec![
            HookStats {
                hook: "tcp_retransmit_skb".into(),
                seen: seen / 2,
                lost,
                folded: 0,
                fold_full: 0,
            },
            HookStats {
                hook: "kfree_skb".into(),
                seen: seen - seen / 2,
                lost: 0,
                folded: 0,
                fold_full: 0,
            },
        ],
        unaccounted: crate::model::Unaccounted::default(),
        r#final: last,
        tick: None,
    }
}

/// Four diagnosed failures (seeds 000-002 of failure-classes.md), one
/// unexplained, some noise, and stats that end with lost events.
pub(crate) fn incident() -> Vec<Record> {
    use EventKind::*;
    let checkout = pod("shop", "checkout-7d9f8b6c5-x2k4q");
    let gateway = pod("payments", "api-gateway-6b7c8d9e4-h4j5k");
    let ledger = pod("payments", "ledger-5c6d9f7b8-pq2mz");
    let exporter = pod("batch", "report-exporter-58f6c9d7b-9wq7t");
    let frontend = pod("web", "frontend-7f8d9c6b5-lm3np");
    let postgres = svc(ep("10.96.41.7", 5432), "shop", "postgres");
    let ledger_ep = svc(
        on_pod(ep("10.244.2.40", 8080), ledger.clone()),
        "payments",
        "ledger",
    );
    let store = svc(ep("10.96.120.5", 443), "batch", "object-store");
    let ingress = on_pod(
        ep("10.244.3.8", 10254),
        pod("ingress-nginx", "ingress-nginx-controller-7c9b5-zt2rd"),
    );
    let redis = svc(ep("10.96.200.9", 6379), "web", "redis");

    let mut out = vec![Record::Stats(stats(0, 0, 0, false))];
    let mut push = |e: Event| out.push(Record::Event(Box::new(e)));

    // idle_timeout: a quiet connection to postgres, then RTO-doubling
    // retransmits into a black hole and ETIMEDOUT.
    let idle_src = ep("10.244.1.12", 41234);
    for (i, ms) in [10_000, 10_400, 11_200, 12_800, 16_000, 22_400]
        .into_iter()
        .enumerate()
    {
        let mut e = event(
            ms,
            Retransmit,
            Some(checkout.clone()),
            idle_src.clone(),
            postgres.clone(),
        );
        e.state = Some(TcpState::Established);
        e.tcp = Some(TcpDetail {
            idle_ms: 912_000 + ms - 10_000,
            since_send_ms: 912_000,
            keepalive: false,
            keepalive_time_ms: 7_200_000,
            srtt_us: 310,
            total_retrans: i as u32 + 1,
        });
        push(e);
        let mut drop = event(
            ms + 1,
            Drop,
            None,
            idle_src.clone(),
            ep("10.244.2.31", 5432),
        );
        drop.reason = Some("NETFILTER_DROP".into());
        drop.location = Some("nf_hook_slow+0x4c".into());
        push(drop);
    }
    let mut err = event(
        35_200,
        SocketError,
        Some(checkout.clone()),
        idle_src.clone(),
        postgres.clone(),
    );
    err.state = Some(TcpState::Established);
    err.errno = Some(Errno::ETIMEDOUT);
    push(err);

    // port_exhaustion: connect() fails with EADDRNOTAVAIL, more and more often.
    for i in 0..40u64 {
        let mut e = event(
            20_000 + i * 900 - i * i * 10,
            ConnectError,
            Some(exporter.clone()),
            ep("10.244.1.33", 0),
            store.clone(),
        );
        e.errno = Some(Errno::EADDRNOTAVAIL);
        e.comm = Some("exporter".into());
        push(e);
    }

    // conntrack_invalid: an out-of-window segment skips reverse NAT, the
    // client resets it and the ledger's connection dies.
    let gw_src = ep("10.244.1.20", 51544);
    let mut rst = event(
        41_000,
        ResetSent,
        Some(gateway.clone()),
        gw_src.clone(),
        ledger_ep.clone(),
    );
    rst.reason = Some("NO_SOCKET".into());
    push(rst);
    let mut rcv = event(
        41_001,
        ResetReceived,
        Some(ledger.clone()),
        ep("10.244.2.40", 8080),
        gw_src.clone(),
    );
    rcv.state = Some(TcpState::Established);
    push(rcv);

    // nodeport_collision: kubelet's health check picked NodePort 30517 as its
    // source port; its SYN is retransmitted until it fails.
    let kubelet = ep("172.18.0.3", 30517);
    for ms in [44_000, 45_000, 47_000, 51_000] {
        let mut e = event(ms, Retransmit, None, kubelet.clone(), ingress.clone());
        e.state = Some(TcpState::SynSent);
        e.comm = Some("kubelet".into());
        e.tcp_flags = Some(TcpFlags::SYN);
        push(e);
    }

    // Unexplained: redis resets the frontend's connections; no rule knows why.
    for ms in [48_500, 53_700] {
        let mut e = event(
            ms,
            ResetReceived,
            Some(frontend.clone()),
            ep("10.244.1.50", 38800 + ms as u16 % 7),
            redis.clone(),
        );
        e.state = Some(TcpState::Established);
        push(e);
    }
    // Noise: a normal state change is shown in the feed, not on the board.
    let mut sc = event(
        49_000,
        StateChange,
        Some(frontend.clone()),
        ep("10.244.1.50", 38900),
        ep("10.96.0.10", 53),
    );
    sc.old_state = Some(TcpState::SynSent);
    sc.state = Some(TcpState::Established);
    push(sc);

    out.push(Record::Stats(stats(30_000, 120, 0, false)));

    let idle = |ms, count| {
        verdict(
            ms,
            Cause::IdleTimeout,
            Confidence::Likely,
            Some(checkout.clone()),
            idle_src.clone(),
            postgres.clone(),
            "connection to shop/postgres idle for 912 s, past the 900 s IPVS timeout, without keepalive",
            json!({"idle_ms": 912_000, "keepalive": false, "keepalive_time_ms": 7_200_000, "middlebox_timeout_ms": 900_000, "retransmits": 6}),
            "enable SO_KEEPALIVE and set net.ipv4.tcp_keepalive_time=600 in the pod (securityContext.sysctls), below the 900 s middlebox timeout",
            count,
            35_200,
        )
    };
    out.push(Record::Verdict(Box::new(idle(35_300, 1))));
    out.push(Record::Verdict(Box::new(verdict(
        52_000,
        Cause::PortExhaustion,
        Confidence::Certain,
        Some(exporter.clone()),
        ep("10.244.1.33", 0),
        store.clone(),
        "no free source port to 10.96.120.5:443: 100 ports in the range, 100 in use",
        json!({"ip_local_port_range": "32768 32867", "range_size": 100, "in_use_to_destination": 100, "time_wait": 61, "tcp_tw_reuse": 0}),
        "reuse connections (HTTP keep-alive pool) or widen net.ipv4.ip_local_port_range in the pod netns, e.g. 10240 65535",
        40,
        20_000,
    ))));
    out.push(Record::Verdict(Box::new(verdict(
        41_100,
        Cause::ConntrackInvalid,
        Confidence::Certain,
        Some(gateway.clone()),
        gw_src.clone(),
        ledger_ep.clone(),
        "out-of-window segment marked INVALID by conntrack skipped reverse NAT; the client reset the real connection",
        json!({"conntrack_invalid_delta": 2, "reset_reason": "NO_SOCKET", "backend": "10.244.2.40:8080"}),
        "set net.netfilter.nf_conntrack_tcp_be_liberal=1 on the node, or drop ctstate INVALID in FORWARD",
        1,
        41_000,
    ))));
    let mut collision = verdict(
        51_100,
        Cause::NodeportCollision,
        Confidence::Likely,
        None,
        kubelet.clone(),
        ingress.clone(),
        "source port 30517 is NodePort ingress-nginx/ingress-nginx-controller:https; the SYN-ACK went to a backend",
        json!({"source_port": 30517, "nodeport_range": "30000-32767", "ip_local_port_range": "28000 60999", "ip_local_reserved_ports": ""}),
        "reserve the NodePorts on the node: sysctl -w net.ipv4.ip_local_reserved_ports=30000-32767",
        4,
        44_000,
    );
    collision.comm = Some("kubelet".into());
    collision.pid = Some(812);
    out.push(Record::Verdict(Box::new(collision)));
    let mut unexplained = verdict(
        58_500,
        Cause::Unexplained,
        Confidence::Possible,
        Some(frontend.clone()),
        ep("10.244.1.50", 38801),
        redis.clone(),
        "reset_received (ESTABLISHED) on the connection with 10.96.200.9:6379 that no rule explains",
        json!({"kind": "reset_received", "state": "ESTABLISHED", "idle_ms": 40, "ruled_out": ["idle_timeout", "keepalive_race", "conntrack_invalid", "application_abort", "netfilter_drop"]}),
        "no known cause: look at 10.96.200.9:6379's logs at this time",
        2,
        48_500,
    );
    unexplained.resets = 2;
    out.push(Record::Verdict(Box::new(unexplained)));
    // The idle verdict again, same aggregate, more occurrences.
    out.push(Record::Verdict(Box::new(idle(55_000, 3))));
    out.push(Record::Stats(stats(60_000, 262, 17, true)));
    out.sort_by_key(|r| match r {
        Record::Event(e) => e.time,
        Record::Verdict(v) => v.time,
        Record::Stats(s) => s.time,
    });
    out
}

/// The fixture file: the incident, one record per line, plus one line that
/// is not a record.
pub(crate) fn incident_ndjson() -> String {
    let mut s = String::new();
    for r in incident() {
        s.push_str(&serde_json::to_string(&r).unwrap_or_default());
        s.push('\n');
    }
    s.push_str("{\"type\":\"event\",\"truncated\n");
    s
}

/// A real stream: `tcptrace --format json` recorded while `tcptrace
/// selftest port_exhaustion connection_refused syn_timeout netfilter_drop
/// conntrack_table_full` ran on this machine kind (kernel 6.18, the lab's
/// network namespaces; pods named by uid only, as without the host's pod
/// logs).
pub(crate) const LAB_NDJSON: &str = include_str!("../../tests/fixtures/lab-incident.ndjson");
