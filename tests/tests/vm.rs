//! The direct tier (fexit or kprobes) on kernels that allow it. These tests
//! change the kernel's global conntrack limit, so they run only inside the
//! throwaway VMs of `cargo xtask vm-test` (which passes `--include-ignored`
//! and sets TCPTRACE_VM=1); elsewhere they are ignored, and refuse to run.
use std::{
    fs,
    net::{TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    time::Duration,
};

use nix::sys::socket::{SockaddrIn, bind, connect, socket};
use tcptrace::model::{Cause, Confidence, Errno, Event, EventKind, ProbeState, Reason, Tier};
use tcptrace_lab::{observer::Observer, scenarios};
use tcptrace_tests::{Netns, capture, show};

const WAIT: Duration = Duration::from_secs(5);

/// Panics unless this is the guest of `cargo xtask vm-test`.
fn in_vm() {
    assert_eq!(
        std::env::var("TCPTRACE_VM").as_deref(),
        Ok("1"),
        "this test changes global kernel settings: it runs in `cargo xtask vm-test`'s VMs only"
    );
}

fn of_kind(events: &[Event], kind: EventKind) -> Vec<&Event> {
    events.iter().filter(|e| e.kind == kind).collect()
}

/// The tier a hook attached with, if it did.
fn attached_tier(hook: &str) -> Option<Tier> {
    let cap = capture();
    cap.tracer
        .probes
        .iter()
        .find(|p| p.hook == hook && p.state == ProbeState::Attached)
        .map(|p| p.tier)
}

fn seen(hook: &str) -> u64 {
    let cap = capture();
    let stats = cap.hook_stats();
    stats.iter().find(|h| h.hook == hook).map_or(0, |h| h.seen)
}

#[test]
#[ignore = "changes global kernel settings: run by `cargo xtask vm-test` in a VM"]
fn port_exhaustion_is_reported_once_by_the_direct_hook() {
    in_vm();
    // fexit where trampolines are allowed, else the kprobe pair.
    let hook = if attached_tier("inet_hash_connect_fexit") == Some(Tier::Fexit) {
        "inet_hash_connect_fexit"
    } else {
        "inet_hash_connect_return"
    };
    assert_eq!(
        attached_tier(hook).map(Tier::as_str),
        Some(if hook.ends_with("fexit") {
            "fexit"
        } else {
            "kprobe"
        }),
        "no direct hook on inet_hash_connect"
    );
    let direct_before = seen(hook);
    let fallback_before = seen("inet_sock_set_state");

    let ns = Netns::new("vm-ports").unwrap();
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40000")
        .unwrap();
    let mut cap = capture();
    let err = ns
        .run("tt-vm-ports", || {
            let l = TcpListener::bind("127.0.0.1:80").unwrap();
            let first = TcpStream::connect("127.0.0.1:80").unwrap();
            let second = TcpStream::connect("127.0.0.1:80").unwrap_err();
            drop((l, first));
            second
        })
        .unwrap();
    assert_eq!(
        err.raw_os_error(),
        Some(nix::errno::Errno::EADDRNOTAVAIL as i32)
    );

    cap.wait_for(ns.inode(), WAIT, |ev| {
        !of_kind(ev, EventKind::ConnectError).is_empty()
    });
    let events = cap.wait_for(ns.inode(), Duration::from_millis(300), |_| false);
    drop(cap);
    let errors = of_kind(&events, EventKind::ConnectError);
    assert_eq!(errors.len(), 1, "exactly one record: {}", show(&events));
    let e = errors[0];
    assert_eq!(e.errno, Some(Errno::EADDRNOTAVAIL));
    assert_eq!(e.dst.to_string(), "127.0.0.1:80");
    assert_eq!(e.src.port, 0, "no source port was found");
    assert_eq!(e.comm.as_deref(), Some("tt-vm-ports"));
    assert_eq!(e.pid, Some(std::process::id()));
    // The direct hook reported it; the state-change fallback stayed quiet.
    assert_eq!(seen(hook), direct_before + 1);
    assert_eq!(seen("inet_sock_set_state"), fallback_before);
}

/// Restores nf_conntrack_max when dropped.
struct ConntrackMax(String);

const CONNTRACK_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";

impl ConntrackMax {
    fn lower_to(max: u32) -> Self {
        let old = fs::read_to_string(CONNTRACK_MAX).expect("nf_conntrack loaded");
        fs::write(CONNTRACK_MAX, max.to_string()).unwrap();
        Self(old.trim().to_string())
    }
}

impl Drop for ConntrackMax {
    fn drop(&mut self) {
        let _ = fs::write(CONNTRACK_MAX, &self.0);
    }
}

#[test]
#[ignore = "changes global kernel settings: run by `cargo xtask vm-test` in a VM"]
fn full_conntrack_table_is_reported_by_the_allocation_hook() {
    in_vm();
    let hook = match attached_tier("nf_conntrack_alloc_fexit") {
        Some(Tier::Fexit) => "nf_conntrack_alloc_fexit",
        _ => "nf_conntrack_alloc_return",
    };
    assert!(
        attached_tier(hook).is_some(),
        "no direct hook on __nf_conntrack_alloc"
    );
    const MAX: u32 = 16;
    let ns = Netns::new("vm-ct").unwrap();
    // Any conntrack rule makes the namespace track its connections.
    ns.exec(&[
        "iptables",
        "-A",
        "OUTPUT",
        "-m",
        "conntrack",
        "--ctstate",
        "NEW",
        "-j",
        "ACCEPT",
    ])
    .unwrap();
    let _max = ConntrackMax::lower_to(MAX);
    let mut cap = capture();
    let err = ns
        .run("tt-vm-ct", || {
            let l = TcpListener::bind("127.0.0.1:8080").unwrap();
            // Established connections are ASSURED: nothing can be evicted.
            let mut held = Vec::new();
            for _ in 0..MAX {
                let c = TcpStream::connect("127.0.0.1:8080").unwrap();
                held.push((c, l.accept().unwrap().0));
            }
            // From a fixed port, so the dropped SYN is known exactly.
            let fd = socket(
                nix::sys::socket::AddressFamily::Inet,
                nix::sys::socket::SockType::Stream,
                nix::sys::socket::SockFlag::SOCK_NONBLOCK,
                None,
            )
            .unwrap();
            bind(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 45000)).unwrap();
            let r = connect(fd.as_raw_fd(), &SockaddrIn::new(127, 0, 0, 1, 8080));
            std::thread::sleep(Duration::from_millis(1500));
            drop(held);
            r
        })
        .unwrap();
    assert_eq!(err, Err(nix::errno::Errno::EINPROGRESS));

    let events = cap.wait_for(ns.inode(), WAIT, |ev| {
        ev.iter()
            .any(|e| e.reason == Some(Reason::ConntrackTableFull))
    });
    let full: Vec<&Event> = events
        .iter()
        .filter(|e| e.reason == Some(Reason::ConntrackTableFull))
        .collect();
    assert!(!full.is_empty(), "no table-full drop: {}", show(&events));
    for d in &full {
        assert_eq!(d.kind, EventKind::Drop);
        assert_eq!(d.location.as_deref(), Some("__nf_conntrack_alloc"));
        assert_eq!(d.src.to_string(), "127.0.0.1:45000");
        assert_eq!(d.dst.to_string(), "127.0.0.1:8080");
        assert_eq!(d.errno, Some(Errno::ENOMEM));
    }
}

/// The lab's kubernetes #74839 reproduction: a segment beyond the window
/// escapes reverse NAT in the node's namespace. The direct hook names it as
/// conntrack judges it, so the reset pair is certain at once; the controls
/// (be_liberal, a segment below the window that conntrack only ignores)
/// produce no record.
#[test]
#[ignore = "changes global kernel settings: run by `cargo xtask vm-test` in a VM"]
fn invalid_segment_is_named_by_the_direct_hook() {
    in_vm();
    assert_eq!(
        attached_tier("ct_invalid_entry").map(Tier::as_str),
        Some("kprobe"),
        "no kprobe on nf_ct_l4proto_log_invalid"
    );
    let mut obs = Observer::load().expect("loading tcptrace's BPF programs");
    let results = scenarios::run_scenario(&mut obs, "conntrack_invalid");
    let marks = |case: &str| -> Vec<Event> {
        let r = results
            .iter()
            .find(|r| r.case == case)
            .unwrap_or_else(|| panic!("no case {case}"));
        assert_eq!(r.status(), "pass", "{case}: {} {}", r.got, r.detail);
        let outcome = r.outcome.as_ref().expect("outcome");
        outcome
            .events
            .iter()
            .filter(|e| e.kind == EventKind::ConntrackInvalid)
            .cloned()
            .collect()
    };
    let beyond = marks("beyond_window");
    let seq_over: Vec<&Event> = beyond
        .iter()
        .filter(|e| e.reason.as_ref().map(Reason::as_str) == Some("SEQ_OVER"))
        .collect();
    assert_eq!(seq_over.len(), 1, "{}", show(&beyond));
    let m = seq_over[0];
    // From the server pod to the client pod, seen in the node's namespace.
    assert_eq!(m.src.to_string(), "10.244.2.2:8080");
    assert_eq!(m.dst.ip.to_string(), "10.244.1.2");
    assert_eq!(m.location.as_deref(), Some("nf_ct_l4proto_log_invalid"));
    assert_eq!(
        m.netns_name.as_deref().map(|n| n.ends_with("-node")),
        Some(true)
    );

    let r = results.iter().find(|r| r.case == "beyond_window").unwrap();
    let v = r
        .matching()
        .into_iter()
        .find(|v| v.cause == Cause::ConntrackInvalid)
        .expect("a conntrack_invalid verdict");
    assert_eq!(v.confidence, Confidence::Certain, "{v:#?}");
    assert_eq!(v.evidence["invalid_class"], "SEQ_OVER");
    assert_eq!(v.evidence["reset_pair"], true);

    assert_eq!(marks("control_be_liberal"), Vec::<Event>::new());
    assert_eq!(marks("control_below_window"), Vec::<Event>::new());
}

/// A pod namespace wired to `node` by a veth, as a CNI does:
/// `10.244.<index>.2/24` behind the node's `10.244.<index>.1`.
fn pod(node: &Netns, name: &str, index: u8) -> Netns {
    let pod = Netns::new(name).unwrap();
    let host_if = format!("vipvs{index}");
    node.exec(&[
        "ip", "link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &pod.name,
    ])
    .unwrap();
    node.exec(&[
        "ip",
        "addr",
        "add",
        &format!("10.244.{index}.1/24"),
        "dev",
        &host_if,
    ])
    .unwrap();
    node.exec(&["ip", "link", "set", &host_if, "up"]).unwrap();
    pod.exec(&[
        "ip",
        "addr",
        "add",
        &format!("10.244.{index}.2/24"),
        "dev",
        "eth0",
    ])
    .unwrap();
    pod.exec(&["ip", "link", "set", "eth0", "up"]).unwrap();
    pod.exec(&[
        "ip",
        "route",
        "add",
        "default",
        "via",
        &format!("10.244.{index}.1"),
    ])
    .unwrap();
    pod
}

/// IPVS's timeouts are read over its generic netlink family, per
/// namespace: a node laid out as kube-proxy's IPVS proxier lays it out
/// (the ClusterIP on the kube-ipvs0 dummy, a virtual service with the pod
/// as its real server in masquerading mode, `net.ipv4.vs.conntrack=1`, the
/// timeouts set over netlink as `--ipvs-tcp-timeout` does) forgets an idle
/// connection after its 2 s TCP timeout: seed 003, diagnosed by the tcptrace
/// binary with the timeout read from the kernel, the pod's node found from
/// its veth; a client with a 1 s keepalive on the same path is not flagged.
#[test]
#[ignore = "needs IPVS (ip_vs) and ipvsadm: run by `cargo xtask vm-test` in a VM"]
fn ipvs_forgets_an_idle_connection_after_its_netlink_timeout() {
    use std::io::{Read as _, Write as _};

    use nix::sys::signal::Signal;
    use serde_json::Value;
    use tcptrace::node::ipvs;
    use tcptrace_tests::{records, start_tcptrace};

    in_vm();
    let node = Netns::new("ipvs-node").unwrap();
    let other = Netns::new("ipvs-other").unwrap();
    node.sysctl("net.ipv4.ip_forward", "1").unwrap();
    node.sysctl("net.ipv4.vs.conntrack", "1").unwrap();
    node.exec(&["ip", "link", "add", "kube-ipvs0", "type", "dummy"])
        .unwrap();
    node.exec(&["ip", "addr", "add", "10.96.0.90/32", "dev", "kube-ipvs0"])
        .unwrap();
    let client = pod(&node, "ipvs-client", 1);
    let server = pod(&node, "ipvs-server", 2);
    node.exec(&["ipvsadm", "-A", "-t", "10.96.0.90:80", "-s", "rr"])
        .unwrap();
    node.exec(&[
        "ipvsadm",
        "-a",
        "-t",
        "10.96.0.90:80",
        "-r",
        "10.244.2.2:8080",
        "-m",
    ])
    .unwrap();
    node.exec(&["ipvsadm", "--set", "2", "120", "300"]).unwrap();

    // What `ipvsadm -L --timeout` prints, read over netlink per namespace.
    let timeouts = ipvs::read(&node.path()).unwrap().expect("IPVS is loaded");
    assert_eq!(
        (
            timeouts.tcp_s,
            timeouts.tcp_fin_s,
            timeouts.udp_s,
            timeouts.services
        ),
        (2, 120, 300, 1)
    );
    let shown = node.exec(&["ipvsadm", "-L", "--timeout"]).unwrap();
    assert!(shown.contains("tcp tcpfin udp): 2 120 300"), "{shown}");
    // Another namespace keeps IPVS's defaults and has no virtual service.
    let defaults = ipvs::read(&other.path()).unwrap().expect("IPVS is loaded");
    assert_eq!((defaults.tcp_s, defaults.services), (900, 0));

    let listener = server
        .run("tt-ipvs-server", || TcpListener::bind("10.244.2.2:8080"))
        .unwrap()
        .unwrap();
    let connect = |keepalive: bool| {
        let c = client
            .run("tt-ipvs-client", move || -> std::io::Result<TcpStream> {
                let s = TcpStream::connect_timeout(
                    &"10.96.0.90:80".parse().unwrap(),
                    Duration::from_secs(2),
                )?;
                if keepalive {
                    use nix::sys::socket::{setsockopt, sockopt};
                    use std::os::fd::AsFd as _;
                    setsockopt(&s.as_fd(), sockopt::KeepAlive, &true)?;
                    setsockopt(&s.as_fd(), sockopt::TcpKeepIdle, &1)?;
                    setsockopt(&s.as_fd(), sockopt::TcpKeepInterval, &1)?;
                }
                Ok(s)
            })
            .unwrap()
            .expect("connecting to the ClusterIP through IPVS");
        let (s, _) = listener.accept().unwrap();
        (&c).write_all(b"hello").unwrap();
        let mut buf = [0u8; 5];
        (&s).read_exact(&mut buf).unwrap();
        (c, s)
    };
    let tracer = start_tcptrace(&["--format", "json", "--facts-interval", "1"]);
    let (idle_c, _idle_s) = connect(false);
    let (ka_c, ka_s) = connect(true);
    std::thread::sleep(Duration::from_millis(3500));
    let _ = (&idle_c).write_all(b"again");
    (&ka_c).write_all(b"again").unwrap();
    let mut buf = [0u8; 5];
    ka_s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    (&ka_s)
        .read_exact(&mut buf)
        .expect("the keepalive connection survives IPVS");
    std::thread::sleep(Duration::from_secs(2));
    tracer.signal(Signal::SIGINT);
    let (code, lines) = tracer.finish();
    assert_eq!(code, 0);

    let netns = u64::from(client.inode());
    let verdicts: Vec<Value> = records(&lines)
        .into_iter()
        .filter(|r| r["type"] == "verdict" && r["netns"] == netns)
        .collect();
    let port = |s: &TcpStream| s.local_addr().unwrap().port();
    let idle: Vec<&Value> = verdicts
        .iter()
        .filter(|v| v["cause"] == "idle_timeout")
        .collect();
    assert!(!idle.is_empty(), "no idle_timeout verdict: {verdicts:#?}");
    for v in &idle {
        assert_eq!(v["src"]["port"], port(&idle_c), "{v:#}");
        assert_eq!(v["evidence"]["timeout_s"], 2, "{v:#}");
        assert_eq!(v["evidence"]["timeout_source"], "ipvs", "{v:#}");
    }
    assert!(
        !verdicts
            .iter()
            .any(|v| v["src"]["port"] == port(&ka_c) && v["severity"] != "benign"),
        "the keepalive client is not flagged: {verdicts:#?}"
    );
}
