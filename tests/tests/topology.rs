//! The node of a pod from the kernel's topology: a pod namespace whose
//! default route leaves through a veth into a node namespace, which NATs a
//! ClusterIP kube-proxy-style and forgets idle connections after 2 s. No
//! kubelet cgroup, no `--node-netns`: tcptrace finds the node through the
//! veth's peer and diagnoses seed 003's idle_timeout with the node's own
//! conntrack timeout; a client with a short keepalive is not flagged.
use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    thread,
    time::Duration,
};

use nix::sys::{
    signal::Signal,
    socket::{setsockopt, sockopt},
};
use serde_json::Value;
use tcptrace_tests::{Netns, records, start_tcptrace};

/// The node's conntrack established timeout.
const CT_TIMEOUT_S: &str = "2";
/// Quiet time of the connections: longer than the timeout.
const IDLE: Duration = Duration::from_millis(3200);

/// A pod: its own namespace, `eth0` a veth to `v<index>` in the node,
/// `10.244.<index>.2/24` behind the node's `10.244.<index>.1`.
fn pod(node: &Netns, name: &str, index: u8) -> Netns {
    let pod = Netns::new(name).unwrap();
    let host_if = format!("vtopo{index}");
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

/// kube-proxy's iptables NAT for one ClusterIP (its chains and comments).
const RULES: &str = "*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:KUBE-SERVICES - [0:0]
:KUBE-SVC-TOPO00000000001 - [0:0]
:KUBE-SEP-TOPO00000000001 - [0:0]
-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES
-A KUBE-SERVICES -d 10.96.0.70/32 -p tcp -m comment --comment \"default/web:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-TOPO00000000001
-A KUBE-SVC-TOPO00000000001 -m comment --comment \"default/web:http -> 10.244.2.2:8080\" -j KUBE-SEP-TOPO00000000001
-A KUBE-SEP-TOPO00000000001 -p tcp -m comment --comment \"default/web:http\" -m tcp -j DNAT --to-destination 10.244.2.2:8080
COMMIT
";

/// Connects from the client pod to the ClusterIP (with a 1 s keepalive
/// when `keepalive`), accepts, exchanges a few bytes.
fn connect(client: &Netns, listener: &TcpListener, keepalive: bool) -> (TcpStream, TcpStream) {
    let dst = SocketAddr::from(([10, 96, 0, 70], 80));
    let c = client
        .run("tt-topo-client", move || -> std::io::Result<TcpStream> {
            let s = TcpStream::connect_timeout(&dst, Duration::from_secs(2))?;
            if keepalive {
                setsockopt(&s.as_fd(), sockopt::KeepAlive, &true)?;
                setsockopt(&s.as_fd(), sockopt::TcpKeepIdle, &1)?;
                setsockopt(&s.as_fd(), sockopt::TcpKeepInterval, &1)?;
            }
            Ok(s)
        })
        .unwrap()
        .expect("connecting to the ClusterIP");
    let (s, _) = listener.accept().unwrap();
    (&c).write_all(b"hello").unwrap();
    let mut buf = [0u8; 5];
    (&s).read_exact(&mut buf).unwrap();
    (c, s)
}

#[test]
fn a_pod_s_node_is_the_peer_of_its_default_route_veth() {
    let node = Netns::new("topo-node").unwrap();
    node.sysctl("net.ipv4.ip_forward", "1").unwrap();
    node.sysctl(
        "net.netfilter.nf_conntrack_tcp_timeout_established",
        CT_TIMEOUT_S,
    )
    .unwrap();
    node.sysctl("net.netfilter.nf_conntrack_tcp_loose", "0")
        .unwrap();
    // ClusterIPs are local to the node (an IPVS node's kube-ipvs0): a
    // segment that misses its DNAT meets the node's stack, which resets it.
    node.exec(&["ip", "route", "add", "local", "10.96.0.0/16", "dev", "lo"])
        .unwrap();
    let client = pod(&node, "topo-client", 1);
    let server = pod(&node, "topo-server", 2);
    let mut restore = std::process::Command::new("ip")
        .args(["netns", "exec", &node.name, "iptables-restore"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    restore
        .stdin
        .take()
        .unwrap()
        .write_all(RULES.as_bytes())
        .unwrap();
    assert!(restore.wait().unwrap().success(), "iptables-restore");
    let listener = server
        .run("tt-topo-server", || TcpListener::bind("10.244.2.2:8080"))
        .unwrap()
        .unwrap();

    let tracer = start_tcptrace(&["--format", "json", "--facts-interval", "1"]);
    let (idle_c, _idle_s) = connect(&client, &listener, false);
    let (ka_c, ka_s) = connect(&client, &listener, true);
    thread::sleep(IDLE);
    // The idle one meets a node that forgot it: a reset from the ClusterIP.
    let _ = (&idle_c).write_all(b"again");
    (&ka_c).write_all(b"again").unwrap();
    let mut buf = [0u8; 5];
    ka_s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    (&ka_s)
        .read_exact(&mut buf)
        .expect("the keepalive connection survives the same node");
    thread::sleep(Duration::from_millis(1500));
    tracer.signal(Signal::SIGINT);
    let (code, lines) = tracer.finish();
    assert_eq!(code, 0);

    let netns = u64::from(client.inode());
    let verdicts: Vec<Value> = records(&lines)
        .into_iter()
        .filter(|r| r["type"] == "verdict" && r["netns"] == netns)
        .collect();
    let idle: Vec<&Value> = verdicts
        .iter()
        .filter(|v| v["cause"] == "idle_timeout")
        .collect();
    assert!(!idle.is_empty(), "no idle_timeout verdict: {verdicts:#?}");
    let port = |s: &TcpStream| s.local_addr().unwrap().port();
    for v in &idle {
        assert_eq!(v["src"]["port"], port(&idle_c), "{v:#}");
        assert_eq!(v["dst"]["ip"], "10.96.0.70", "{v:#}");
        assert_eq!(v["evidence"]["timeout_s"], 2, "{v:#}");
        assert_eq!(v["evidence"]["timeout_source"], "conntrack:node", "{v:#}");
        assert_eq!(v["evidence"]["shape"], "reset", "{v:#}");
        assert_eq!(v["evidence"]["keepalive"], false, "{v:#}");
    }
    assert!(
        !verdicts
            .iter()
            .any(|v| v["src"]["port"] == port(&ka_c) && v["severity"] != "benign"),
        "the keepalive client is not flagged: {verdicts:#?}"
    );
}
