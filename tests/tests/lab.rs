//! Every seed failure reproduced in the lab and diagnosed end to end by the
//! live pipeline, with its controls; and the selftest cleaning up when
//! interrupted.
use std::{
    fs,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{Mutex, MutexGuard, OnceLock},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use tcptrace::model::{Cause, Event, EventKind, Reason, Severity, Verdict};
use tcptrace_lab::{
    self as lab,
    observer::Observer,
    scenarios::{self, CT_TIMEOUT_S, CaseResult, NODEPORTS},
};
use tcptrace_tests::cannot_run;

static OBSERVER: OnceLock<Mutex<Observer>> = OnceLock::new();

/// The tracer, loaded once; tests hold it while they run (one at a time).
fn observer() -> MutexGuard<'static, Observer> {
    OBSERVER
        .get_or_init(|| {
            Mutex::new(Observer::load().expect("loading tcptrace's BPF programs (tests need root)"))
        })
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn run(scenario: &str) -> Vec<CaseResult> {
    let mut obs = observer();
    let results = scenarios::run_scenario(&mut obs, scenario);
    assert!(!results.is_empty(), "no cases for {scenario}");
    results
}

fn case<'a>(results: &'a [CaseResult], name: &str) -> &'a CaseResult {
    let r = results
        .iter()
        .find(|r| r.case == name)
        .unwrap_or_else(|| panic!("no case {name}"));
    assert_eq!(
        r.status(),
        "pass",
        "{} {}: got {}; {}",
        r.scenario,
        r.case,
        r.got,
        r.detail
    );
    r
}

/// The one verdict of the expected cause for the case's subject, checked
/// for its pod (or the node's namespace name).
fn verdict(r: &CaseResult) -> &Verdict {
    let m = r.matching();
    assert!(!m.is_empty(), "{} {}: no verdict", r.scenario, r.case);
    let v = m[0];
    eprintln!(
        "{} {}: {}",
        r.scenario,
        r.case,
        serde_json::to_string(v).unwrap_or_default()
    );
    let subject = &r.outcome.as_ref().expect("outcome").subject;
    match &subject.pod {
        Some(pod) => {
            let got = v
                .pod
                .as_ref()
                .map(|p| (p.namespace.as_str(), p.name.as_str(), p.uid.as_str()));
            assert_eq!(
                got,
                Some((pod.namespace.as_str(), pod.name.as_str(), pod.uid.as_str())),
                "{} {}: the verdict names the pod: {v:#?}",
                r.scenario,
                r.case
            );
        }
        None => {
            assert_eq!(v.pod, None);
            assert_eq!(v.netns_name.as_deref(), Some(subject.netns_name.as_str()));
        }
    }
    if let Some(dst) = &subject.dst {
        assert_eq!(&v.dst.to_string(), dst, "{v:#?}");
    }
    if let Some(svc) = &subject.service {
        let got = v
            .dst
            .service
            .as_ref()
            .map(|s| format!("{}/{}", s.namespace, s.name));
        assert_eq!(got.as_ref(), Some(svc), "the destination's Service: {v:#?}");
    }
    v
}

fn ev<'a>(v: &'a Verdict, key: &str) -> &'a Value {
    v.evidence
        .get(key)
        .unwrap_or_else(|| panic!("no {key} in {:#?}", v.evidence))
}

/// Whether the running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").expect("kernel release");
    let mut parts = release
        .trim()
        .split(['.', '-'])
        .map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    found >= (major, minor)
}

fn number(r: &CaseResult, key: &str) -> i64 {
    r.outcome.as_ref().expect("outcome").subject.numbers[key]
}

fn assert_control(r: &CaseResult, cause: Cause) {
    assert_eq!(
        r.status(),
        "pass",
        "{} {}: {}",
        r.scenario,
        r.case,
        r.detail
    );
    let o = r.outcome.as_ref().expect("outcome");
    assert!(
        !o.verdicts.iter().any(|v| v.cause == cause),
        "{} {}: {:#?}",
        r.scenario,
        r.case,
        o.verdicts
    );
}

#[test]
fn port_exhaustion_connect_bind_time_wait_and_control() {
    let rs = run("port_exhaustion");
    let r = case(&rs, "connect");
    assert_eq!(number(r, "errno"), 99, "EADDRNOTAVAIL");
    let v = verdict(r);
    assert_eq!(v.cause, Cause::PortExhaustion);
    assert_eq!(ev(v, "errno"), "EADDRNOTAVAIL");
    assert_eq!(ev(v, "port_range_size"), 2);
    assert_eq!(ev(v, "port_range"), "40000-40001");

    let r = case(&rs, "bind");
    assert_eq!(number(r, "errno"), 98, "EADDRINUSE");
    let v = verdict(r);
    assert_eq!(ev(v, "errno"), "EADDRINUSE");
    assert_eq!(v.src.port, 0, "bind to port 0");

    let r = case(&rs, "time_wait");
    assert_eq!(number(r, "errno"), 99);
    let v = verdict(r);
    assert_eq!(ev(v, "tw_reuse"), 0);

    assert_control(case(&rs, "control_other_dst"), Cause::PortExhaustion);
}

#[test]
fn connection_refused_through_a_service() {
    let rs = run("connection_refused");
    let r = case(&rs, "refused");
    assert_eq!(number(r, "errno"), 111, "ECONNREFUSED");
    let v = verdict(r);
    assert_eq!(v.cause, Cause::ConnectionRefused);
    assert_control(case(&rs, "control_listening"), Cause::ConnectionRefused);
}

#[test]
fn a_service_without_endpoints_is_named_from_kube_proxy_s_reject_rule() {
    let rs = run("service_no_endpoints");
    let r = case(&rs, "rejected");
    let v = verdict(r);
    assert_eq!(v.cause, Cause::ServiceNoEndpoints);
    assert_eq!(v.confidence, tcptrace::model::Confidence::Certain);
    assert_eq!(ev(v, "service"), "lab/empty:http");
    assert_eq!(v.dst.to_string(), "10.96.0.31:80");
    assert!(
        ev(v, "rule")
            .as_str()
            .is_some_and(|r| r.contains("has no endpoints") && r.contains("REJECT")),
        "{v:#?}"
    );
    let o = r.outcome.as_ref().expect("outcome");
    assert!(
        !o.verdicts.iter().any(|v| matches!(
            v.cause,
            Cause::ConnectionRefused | Cause::NetfilterDrop | Cause::SynTimeout
        )),
        "{:#?}",
        o.verdicts
    );
    assert_control(
        case(&rs, "control_with_endpoints"),
        Cause::ServiceNoEndpoints,
    );
}

#[test]
fn a_firewall_s_rejection_is_not_a_refusal() {
    let rs = run("firewall_reject");
    for name in ["tcp_reset", "icmp_prohibited"] {
        let r = case(&rs, name);
        let v = verdict(r);
        assert_eq!(v.cause, Cause::FirewallReject, "{name}");
        assert_eq!(v.confidence, tcptrace::model::Confidence::Certain, "{v:#?}");
        let rule = ev(v, "rule").as_str().expect("the rule");
        assert!(rule.contains("REJECT") && rule.contains("8080"), "{rule}");
        let o = r.outcome.as_ref().expect("outcome");
        assert!(
            !o.verdicts
                .iter()
                .any(|v| v.cause == Cause::ConnectionRefused),
            "{name}: {:#?}",
            o.verdicts
        );
    }
    assert_control(case(&rs, "control_other_source"), Cause::FirewallReject);
}

#[test]
fn a_source_nat_out_of_ports_is_not_a_full_conntrack_table() {
    let rs = run("snat_port_exhaustion");
    let r = case(&rs, "two_ports");
    let v = verdict(r);
    assert_eq!(v.cause, Cause::SnatPortExhaustion);
    assert_eq!(ev(v, "snat_ports"), "1000-1001");
    assert!(
        ev(v, "snat_rule")
            .as_str()
            .is_some_and(|r| r.contains("MASQUERADE")),
        "{v:#?}"
    );
    let o = r.outcome.as_ref().expect("outcome");
    assert!(
        !o.verdicts.iter().any(|v| matches!(
            v.cause,
            Cause::ConntrackTableFull | Cause::NetfilterDrop | Cause::SynTimeout
        )),
        "{:#?}",
        o.verdicts
    );
    assert_control(case(&rs, "control_wide_range"), Cause::SnatPortExhaustion);
}

#[test]
fn a_path_mtu_black_hole_and_working_path_mtu_discovery() {
    let rs = run("pmtu_black_hole");
    let r = case(&rs, "icmp_dropped");
    let v = verdict(r);
    assert_eq!(v.cause, Cause::PmtuBlackHole);
    assert_eq!(v.confidence, tcptrace::model::Confidence::Certain);
    assert_eq!(v.evidence["dropped"]["reason"], "PKT_TOO_BIG");
    assert!(v.fix.contains("MTU"), "{}", v.fix);
    assert_control(case(&rs, "control_icmp_passes"), Cause::PmtuBlackHole);
}

#[test]
fn syn_timeout_when_nothing_answers_and_no_rule_drops() {
    let rs = run("syn_timeout");
    let v = verdict(case(&rs, "unanswered"));
    assert_eq!(v.cause, Cause::SynTimeout);
    assert!(ev(v, "syn_retransmits").as_u64() >= Some(1), "{v:#?}");
    assert_control(case(&rs, "control_reachable"), Cause::SynTimeout);
}

#[test]
fn netfilter_drop_on_the_node_and_in_the_server_pod_through_a_service() {
    let rs = run("netfilter_drop");
    let v = verdict(case(&rs, "node_policy"));
    assert_eq!(v.cause, Cause::NetfilterDrop);
    let node = ev(v, "dropped_in").as_str().expect("where it dropped");
    assert!(node.starts_with("netns tcptrace-lab-"), "{node}");
    assert!(
        ev(v, "rule")
            .as_str()
            .is_some_and(|r| r.contains("--dport 8080") && r.contains("DROP")),
        "{v:#?}"
    );

    let r = case(&rs, "pod_policy");
    let v = verdict(r);
    assert_eq!(v.cause, Cause::NetfilterDrop);
    let server = r
        .outcome
        .as_ref()
        .expect("outcome")
        .verdicts
        .iter()
        .find(|x| x.cause == Cause::NetfilterDrop)
        .expect("verdict");
    assert_eq!(ev(server, "dropped_in"), "pod lab/server");
    // After the Service's DNAT: the pod's address, the target port.
    assert_eq!(ev(v, "dropped_dst"), "10.244.2.2:8080");
    assert_eq!(v.dst.to_string(), "10.96.0.30:80");
    let rule = ev(v, "rule").as_str().expect("the rule");
    assert!(rule.contains("lab policy: deny client"), "{rule}");
    assert!(ev(v, "rule_packets").as_u64() >= Some(1), "{v:#?}");
    assert!(ev(v, "location").as_str().is_some_and(|l| !l.is_empty()));
    assert!(v.fix.contains("lab policy: deny client"), "{}", v.fix);
    let o = r.outcome.as_ref().expect("outcome");
    assert!(
        !o.verdicts.iter().any(|v| v.cause == Cause::SynTimeout),
        "a seen drop is not a plain timeout: {:#?}",
        o.verdicts
    );
    assert_control(case(&rs, "control_other_source"), Cause::NetfilterDrop);
}

#[test]
fn keepalive_race_with_nginx_and_a_pooled_client() {
    let rs = run("keepalive_race");
    let r = case(&rs, "idle_reuse");
    let v = verdict(r);
    assert_eq!(v.cause, Cause::KeepaliveRace);
    assert_eq!(v.confidence, tcptrace::model::Confidence::Certain);
    // nginx's keepalive_timeout, as the client saw it from nginx's FIN.
    let timeout_ms = number(r, "peer_idle_timeout_s") as u64 * 1000;
    let seen = ev(v, "peer_idle_timeout_ms")
        .as_u64()
        .expect("the peer's timeout");
    assert!(
        seen >= timeout_ms.saturating_sub(100) && seen <= timeout_ms + 600,
        "nginx closes after {timeout_ms} ms, seen {seen} ms"
    );
    assert!(ev(v, "fin_to_write_ms").as_u64() >= Some(500), "{v:#?}");
    // Before 6.10 the kernel traces resets of full sockets only
    // (tcp_v4_send_reset), not the server's TIME_WAIT socket's.
    let resets = if kernel_at_least(6, 10) { 2 } else { 1 };
    assert_eq!(
        v.resets, resets,
        "the server's reset and the client's: {v:#?}"
    );
    assert!(!v.fix.contains("SO_KEEPALIVE"), "{}", v.fix);
    assert!(v.fix.contains("after 1 s idle"), "{}", v.fix);
    assert_control(case(&rs, "control_fresh"), Cause::KeepaliveRace);
}

#[test]
fn an_application_abort_is_benign() {
    let rs = run("application_abort");
    let r = case(&rs, "unread_close");
    let v = verdict(r);
    assert_eq!(v.cause, Cause::ApplicationAbort);
    assert_eq!(v.severity, Severity::Benign);
    let o = r.outcome.as_ref().expect("outcome");
    let failures: Vec<&Verdict> = o
        .verdicts
        .iter()
        .filter(|v| v.severity != Severity::Benign)
        .collect();
    assert!(failures.is_empty(), "no failure verdict: {failures:#?}");
    assert_control(case(&rs, "control_read_all"), Cause::ApplicationAbort);
}

#[test]
fn idle_timeout_black_hole_reset_and_keepalive_control() {
    let rs = run("idle_timeout");
    for (name, shape) in [("black_hole", "black_hole"), ("reset", "reset")] {
        let r = case(&rs, name);
        let v = verdict(r);
        assert_eq!(v.cause, Cause::IdleTimeout);
        assert_eq!(ev(v, "shape"), shape);
        assert_eq!(ev(v, "timeout_s"), CT_TIMEOUT_S);
        assert_eq!(ev(v, "timeout_source"), "conntrack:node");
        assert_eq!(ev(v, "keepalive"), false);
        let idle = ev(v, "idle_ms").as_u64().expect("idle_ms");
        assert!(idle > CT_TIMEOUT_S * 1000, "{name}: idle {idle} ms");
        assert!(
            idle >= number(r, "idle_min_ms") as u64,
            "{name}: idle {idle} ms"
        );
        assert!(idle < 10_000, "{name}: idle {idle} ms");
    }
    assert_control(case(&rs, "control_keepalive"), Cause::IdleTimeout);
}

#[test]
fn nodeport_collision_with_ipvs_and_its_controls() {
    let rs = run("nodeport_collision");
    let v = verdict(case(&rs, "ipvs"));
    assert_eq!(v.cause, Cause::NodeportCollision);
    let port = ev(v, "src_port").as_u64().expect("src_port") as u16;
    assert!(NODEPORTS.contains(&port), "colliding port {port}");
    assert_eq!(v.src.port, port);
    let svc = ev(v, "nodeport").as_str().expect("the NodePort's Service");
    assert!(svc.starts_with("lab/web"), "{svc}");
    assert!(v.fix.contains("ip_local_reserved_ports"), "{}", v.fix);

    for name in ["control_iptables", "control_reserved"] {
        let r = case(&rs, name);
        assert_control(r, Cause::NodeportCollision);
        let port = number(r, "src_port") as u16;
        assert_ne!(port, 0);
        if name == "control_reserved" {
            assert!(!NODEPORTS.contains(&port), "reserved, yet used {port}");
        }
    }
}

#[test]
fn conntrack_invalid_beyond_window_and_controls() {
    let rs = run("conntrack_invalid");
    let r = &rs[0];
    if let Some(why) = &r.skipped {
        return cannot_run(why);
    }
    let v = verdict(case(&rs, "beyond_window"));
    assert_eq!(v.cause, Cause::ConntrackInvalid);
    assert_eq!(ev(v, "reset_pair"), true);
    assert_control(case(&rs, "control_be_liberal"), Cause::ConntrackInvalid);
    assert_control(case(&rs, "control_below_window"), Cause::ConntrackInvalid);
}

#[test]
fn a_segment_below_the_window_is_a_tcp_stack_drop_of_the_client_pod() {
    let rs = run("tcp_stack_drop");
    let r = case(&rs, "below_window");
    let v = verdict(r);
    assert_eq!(v.cause, Cause::TcpStackDrop);
    assert_eq!(v.severity, Severity::Degraded);
    // Below rcv_wup: TCP_OLD_SEQUENCE where the kernel names it (6.3+),
    // TCP_INVALID_SEQUENCE before.
    let reason = ev(v, "reason").as_str().expect("reason").to_string();
    assert!(
        ["TCP_OLD_SEQUENCE", "TCP_INVALID_SEQUENCE"].contains(&reason.as_str()),
        "{reason}"
    );
    assert_eq!(ev(v, "drops"), 1);
    assert_eq!(ev(v, "peer"), "10.96.0.10:80");
    // The drop record itself: the client pod's namespace, its socket's
    // owner (this process's connecting thread), the Service it came from.
    let o = r.outcome.as_ref().expect("outcome");
    let drops: Vec<&Event> = o
        .events
        .iter()
        .filter(|e| e.kind == EventKind::Drop)
        .collect();
    assert_eq!(drops.len(), 1, "{drops:#?}");
    let d = drops[0];
    assert_eq!(d.netns, o.subject.netns);
    assert_eq!(d.reason.as_ref().map(Reason::as_str), Some(reason.as_str()));
    assert_eq!(d.pid, Some(std::process::id()));
    assert_eq!(d.comm.as_deref(), Some("lab-client"));
    assert_eq!(d.src.to_string(), "10.96.0.10:80");
    assert_eq!(d.src.service.as_ref().map(|s| s.name.as_str()), Some("web"));
    let pod = o.subject.pod.as_ref().expect("the client pod");
    assert_eq!(
        d.pod.as_ref().map(|p| p.uid.as_str()),
        Some(pod.uid.as_str())
    );
    assert_control(case(&rs, "control_no_segment"), Cause::TcpStackDrop);
}

#[test]
fn a_stalled_redis_with_a_small_backlog_overflows_its_listen_queue() {
    let rs = run("listen_overflow");
    let r = case(&rs, "stalled_small_backlog");
    eprintln!("{}", r.outcome.as_ref().expect("outcome").note);
    let v = verdict(r);
    assert_eq!(v.cause, Cause::ListenOverflow);
    assert_eq!(v.src.port, 6379);
    assert!(ev(v, "listen_overflows").as_u64().unwrap() > 0, "{v:#?}");
    let listener = &ev(v, "listeners")[0];
    assert_eq!(listener["port"], 6379);
    assert_eq!(listener["comm"], "redis-server");
    assert_eq!(listener["pid"], number(r, "redis_pid"));
    // backlog 1: the accept queue holds two.
    assert_eq!(listener["queued"], 2, "{v:#?}");
    assert!(v.fix.contains("backlog"), "{}", v.fix);
    assert_control(case(&rs, "control_large_backlog"), Cause::ListenOverflow);
}

#[test]
fn conntrack_table_full_drops_new_syns_and_a_flush_fixes_it() {
    let rs = run("conntrack_table_full");
    let r = case(&rs, "full");
    eprintln!("full: {}", r.outcome.as_ref().expect("outcome").note);
    // What the lab itself measured in the node namespace.
    let (count, max) = (number(r, "count"), number(r, "max"));
    assert!(max > 0 && count >= max, "count {count} of max {max}");
    assert!(number(r, "drop_delta") > 0, "the node's drop counter rose");
    assert_ne!(number(r, "errno"), 0, "the connection failed (timed out)");
    // The client pod's verdict, to the Service, with the node's numbers.
    let v = verdict(r);
    assert_eq!(v.cause, Cause::ConntrackTableFull);
    let n = |key: &str| {
        ev(v, key)
            .as_u64()
            .unwrap_or_else(|| panic!("{key} in {:#?}", v.evidence))
    };
    let (count, max) = (n("count"), n("max"));
    assert!(
        max > 0 && count * 100 >= max * 95,
        "count {count} of max {max}"
    );
    assert_eq!(max as i64, number(r, "max"));
    assert!(n("drop_delta") > 0, "{:#?}", v.evidence);
    assert!(n("syn_retransmits") >= 1, "{:#?}", v.evidence);
    let o = r.outcome.as_ref().expect("outcome");
    let node = o
        .verdicts
        .iter()
        .find(|v| v.cause == Cause::ConntrackTableFull && v.pod.is_none())
        .expect("a verdict for the node namespace too");
    assert!(
        node.netns_name
            .as_deref()
            .is_some_and(|n| n.ends_with("-node"))
    );
    assert!(!o.verdicts.iter().any(|v| v.cause == Cause::SynTimeout));

    let r = case(&rs, "control_flushed");
    eprintln!("control: {}", r.outcome.as_ref().expect("outcome").note);
    assert_control(r, Cause::ConntrackTableFull);
    assert_eq!(number(r, "errno"), 0, "the connection succeeded");
    assert_eq!(number(r, "drop_delta"), 0);
    assert!(number(r, "count") < number(r, "max") / 2);
    let o = r.outcome.as_ref().expect("outcome");
    assert!(o.verdicts.is_empty(), "{:#?}", o.verdicts);
}

fn tcptrace_bin() -> PathBuf {
    std::env::var_os("TCPTRACE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/debug/tcptrace")
        })
}

/// Rules of the root namespace, without counters and comments.
fn root_rules() -> String {
    let out = Command::new("iptables-save")
        .output()
        .map(|o| o.stdout)
        .unwrap_or_default();
    String::from_utf8_lossy(&out)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(" [").next().unwrap_or(l).to_string())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Processes still in a cgroup of the lab of `pid`.
fn lab_processes(pid: u32) -> Vec<String> {
    let needle = format!("{}{pid}-", lab::PREFIX);
    let mut found = Vec::new();
    if let Ok(rd) = fs::read_dir("/proc") {
        for e in rd.flatten() {
            let cg = fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
            if cg.contains(&needle) {
                found.push(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    found
}

#[test]
fn selftest_interrupted_leaves_nothing_behind() {
    let bin = tcptrace_bin();
    assert!(
        bin.is_file(),
        "{} missing: cargo build -p tcptrace first (or set TCPTRACE_BIN)",
        bin.display()
    );
    let rules_before = root_rules();
    let mut child = Command::new(&bin)
        .args(["selftest", "idle_timeout", "nodeport_collision"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting tcptrace selftest");
    let pid = child.id();
    // Halfway: a lab exists with its pods' processes running (a slow
    // machine takes seconds to get there).
    let start = Instant::now();
    let mut busy = false;
    while start.elapsed() < Duration::from_secs(60) {
        busy = start.elapsed() > Duration::from_secs(6)
            && !lab::leftovers(pid).is_empty()
            && !lab_processes(pid).is_empty();
        if busy {
            break;
        }
        thread::sleep(Duration::from_millis(100));
    }
    assert!(busy, "the selftest never ran a lab with processes");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    // Cleaning up takes seconds on a slow machine (a VM without KVM).
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "selftest did not exit after SIGTERM"
        );
        thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read as _;
        let _ = e.read_to_string(&mut err);
    }
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(lab::leftovers(pid), Vec::<String>::new());
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip netns list");
    let listed = String::from_utf8_lossy(&netns.stdout);
    assert!(
        !listed.contains(&format!("{}{pid}-", lab::PREFIX)),
        "{listed}"
    );
    assert_eq!(lab_processes(pid), Vec::<String>::new());
    assert_eq!(
        root_rules(),
        rules_before,
        "the root namespace's rules changed"
    );
}

/// Allocated conntrack entries on the whole host (every namespace).
fn conntrack_objects() -> u64 {
    fs::read_to_string("/proc/slabinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("nf_conntrack "))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// Entries in the node's table that show the fill is under way.
const FILLING: u64 = 20_000;

#[test]
fn selftest_interrupted_while_filling_conntrack_frees_the_table() {
    let bin = tcptrace_bin();
    assert!(
        bin.is_file(),
        "{} missing: cargo build -p tcptrace first (or set TCPTRACE_BIN)",
        bin.display()
    );
    let rules_before = root_rules();
    let root_count = || {
        fs::read_to_string("/proc/sys/net/netfilter/nf_conntrack_count")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    let mut child = Command::new(&bin)
        .args(["selftest", "conntrack_table_full"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting tcptrace selftest");
    let pid = child.id();
    let node = format!("{}{pid}-0-node", lab::PREFIX);
    // Wait until the node's table is filling (or full): slow machines (a
    // VM without KVM) fill it at a few thousand entries a second.
    let start = Instant::now();
    let mut filling = 0;
    while start.elapsed() < Duration::from_secs(60) {
        let out = Command::new("ip")
            .args(["netns", "exec", &node, "cat"])
            .arg("/proc/sys/net/netfilter/nf_conntrack_count")
            .stderr(Stdio::null())
            .output();
        filling = out
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(0u64);
        if filling > FILLING {
            break;
        }
        thread::sleep(Duration::from_millis(20));
    }
    assert!(filling > FILLING, "the node's table never filled");
    let during = conntrack_objects();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("SIGTERM");
    // Cleaning up takes seconds on a slow machine (a VM without KVM).
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "selftest did not exit after SIGTERM"
        );
        thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read as _;
        let _ = e.read_to_string(&mut err);
    }
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(lab::leftovers(pid), Vec::<String>::new());
    // The entries die with the namespace (freed by the kernel shortly after).
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut now = conntrack_objects();
    let freed = |now: u64| during.saturating_sub(now) + 5_000 >= filling;
    while !freed(now) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        now = conntrack_objects();
    }
    eprintln!("conntrack objects: {during} while filling ({filling} in the lab), {now} after");
    assert!(freed(now), "{now} conntrack entries still allocated");
    assert!(
        root_count().unwrap_or(0) < 10_000,
        "the root table was not filled"
    );
    assert_eq!(
        root_rules(),
        rules_before,
        "the root namespace's rules changed"
    );
}
