//! kind for real: a 2-node kind-shaped cluster on this machine's Docker
//! engine (`cargo xtask kind-cluster`), failures caused in pods on both
//! nodes, `cargo xtask kind` reporting each once from the right node with
//! the right pod, and one tcptrace on the host, without flags, diagnosing
//! the same set.
use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use serde_json::Value;
use tcptrace_tests::{records, start_tcptrace, xtask_bin};

const CLUSTER: &str = "tt-e2e";
const CP: &str = "tt-e2e-control-plane";
const WORKER: &str = "tt-e2e-worker";
/// How long the agents and the failures may take, each.
const WAIT: Duration = Duration::from_secs(180);

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `kind-node ARGS` in a node.
fn node(node: &str, args: &[&str]) -> String {
    run(Command::new("docker")
        .args(["exec", node, "kind-node"])
        .args(args))
}

/// Python in a pod of a node; prints what the script prints.
fn in_pod(node_name: &str, pod: &str, script: &str) -> String {
    node(node_name, &["exec", pod, "python3", "-c", script])
}

/// The cluster, removed (with the dockerd it started) also on failure.
struct Cluster;

impl Cluster {
    fn up() -> Self {
        let _ = Command::new(xtask_bin())
            .args(["kind-cluster", "down", "--name", CLUSTER])
            .status();
        run(Command::new(xtask_bin()).args([
            "kind-cluster",
            "up",
            "--name",
            CLUSTER,
            "--nodes",
            "2",
        ]));
        Self
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = Command::new(xtask_bin())
            .args(["kind-cluster", "down", "--name", CLUSTER])
            .status();
    }
}

/// `cargo xtask kind` on the cluster: merged NDJSON on stdout.
struct Agents {
    child: Child,
    lines: mpsc::Receiver<String>,
}

impl Agents {
    fn start() -> Self {
        let mut child = Command::new(xtask_bin())
            .args(["kind", "--name", CLUSTER, "--", "--facts-interval", "1"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting cargo xtask kind");
        let (tx, lines) = mpsc::channel();
        let out = child.stdout.take().expect("stdout");
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        // Both agents report that they trace.
        let err = child.stderr.take().expect("stderr");
        let (ready_tx, ready) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("kind: {line}");
                if line.contains("tcptrace: tracing,") {
                    let _ = ready_tx.send(line);
                }
            }
        });
        let deadline = Instant::now() + WAIT;
        let mut nodes = BTreeSet::new();
        while nodes.len() < 2 {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = ready
                .recv_timeout(left)
                .expect("both kind agents report tracing in time");
            nodes.insert(line.split(']').next().unwrap_or_default().to_string());
        }
        Self { child, lines }
    }

    /// Stops the agents (SIGINT to xtask, which stops them) and returns
    /// every line.
    fn finish(mut self) -> Vec<String> {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait().ok().flatten().is_none() {
            assert!(Instant::now() < deadline, "cargo xtask kind did not stop");
            thread::sleep(Duration::from_millis(100));
        }
        self.lines.try_iter().collect()
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGINT);
        let _ = self.child.wait();
    }
}

/// An echo server that holds every connection.
const SERVER: &str = r#"
import socket, threading
l = socket.socket(); l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 8080)); l.listen(64)
def serve(c):
    while True:
        d = c.recv(100)
        if not d: return
        c.sendall(d)
while True:
    c, _ = l.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;

const REFUSED: &str = r#"
import socket
s = socket.socket(); s.settimeout(3)
try:
    s.connect(("10.244.34.2", 9)); print("connected")
except OSError as e:
    print("errno", e.errno)
"#;

/// Three connects with a two-port range: the third finds no port.
const EXHAUST: &str = r#"
import socket
held = []
for i in range(3):
    s = socket.socket(); s.settimeout(3)
    try:
        s.connect(("10.244.18.2", 8080)); held.append(s)
    except OSError as e:
        print("errno", e.errno)
print("held", len(held))
"#;

/// A connection through the web-b Service, idle past the node's conntrack
/// timeout, then used: the node drops it as INVALID (a black hole).
const IDLE: &str = r#"
import socket, time
s = socket.create_connection(("10.96.0.80", 80), timeout=3)
s.sendall(b"hello"); s.recv(5)
time.sleep(3.2)
s.sendall(b"again")
s.settimeout(8)
try:
    print("read", s.recv(5))
except OSError as e:
    print("failed", e)
"#;

/// A probe from the node itself: its only source ports are NodePorts.
const PROBE: &str = r#"
import socket
s = socket.socket(); s.settimeout(3)
try:
    s.connect(("10.244.18.2", 8080)); print("connected", s.getsockname())
except OSError as e:
    print("failed", e)
"#;

/// Each failure as (cause, node, pod): the pod is None for the node's own.
const EXPECTED: [(&str, &str, Option<&str>); 4] = [
    ("connection_refused", CP, Some("client-a")),
    ("port_exhaustion", WORKER, Some("client-b")),
    ("idle_timeout", CP, Some("client-a")),
    ("nodeport_collision", WORKER, None),
];

fn found(verdicts: &[&Value], cause: &str, pod: Option<&str>) -> Vec<String> {
    verdicts
        .iter()
        .filter(|v| v["cause"] == cause && v["pod"]["name"].as_str() == pod)
        .map(|v| v["node"].as_str().unwrap_or("(none)").to_string())
        .collect()
}

fn all_found(verdicts: &[&Value]) -> bool {
    EXPECTED
        .iter()
        .all(|(cause, _, pod)| !found(verdicts, cause, *pod).is_empty())
}

#[test]
fn a_two_node_kind_cluster_is_diagnosed_per_node_and_from_the_host() {
    let started = Instant::now();
    let _cluster = Cluster::up();
    for (n, pods) in [(CP, ["client-a", "web-a"]), (WORKER, ["client-b", "web-b"])] {
        for pod in pods {
            node(n, &["pod", pod]);
        }
    }
    for (n, pod) in [(CP, "web-a"), (WORKER, "web-b")] {
        run(Command::new("docker").args([
            "exec",
            "-d",
            n,
            "kind-node",
            "exec",
            pod,
            "python3",
            "-c",
            SERVER,
        ]));
    }
    // kube-proxy runs on every node: the same Services everywhere.
    for n in [CP, WORKER] {
        node(
            n,
            &[
                "service",
                "default/web-b:http",
                "10.96.0.80",
                "80",
                "10.244.34.2",
                "8080",
            ],
        );
        node(
            n,
            &[
                "service",
                "default/web-a:http",
                "10.96.0.81",
                "80",
                "10.244.18.2",
                "8080",
                "30080",
            ],
        );
        node(
            n,
            &[
                "service",
                "default/web-a2:http",
                "10.96.0.82",
                "80",
                "10.244.18.2",
                "8080",
                "30081",
            ],
        );
    }
    // The control plane forgets idle connections after 2 s and drops what
    // it no longer tracks; the worker runs IPVS with a port range made of
    // its NodePorts.
    node(
        CP,
        &[
            "filter",
            "-A",
            "FORWARD",
            "-m",
            "conntrack",
            "--ctstate",
            "INVALID",
            "-j",
            "DROP",
        ],
    );
    run(Command::new("docker").args([
        "exec",
        CP,
        "sysctl",
        "-w",
        "net.netfilter.nf_conntrack_tcp_timeout_established=2",
        "net.netfilter.nf_conntrack_tcp_loose=0",
    ]));
    run(Command::new("docker").args([
        "exec",
        WORKER,
        "sysctl",
        "-w",
        "net.ipv4.ip_local_port_range=30080 30081",
    ]));
    node(
        WORKER,
        &["ipvs-nodeports", "10.244.34.2", "8080", "30080", "30081"],
    );
    node(
        WORKER,
        &[
            "exec",
            "client-b",
            "sysctl",
            "-qw",
            "net.ipv4.ip_local_port_range=40000 40001",
        ],
    );
    eprintln!("cluster ready in {:.0} s", started.elapsed().as_secs_f64());

    let agents = Agents::start();
    let host = start_tcptrace(&["--format", "json", "--facts-interval", "1"]);
    // The host tracer finds the nodes at its first scan and reads their
    // rules: give it a few of its facts rounds.
    thread::sleep(Duration::from_secs(4));

    let refused = in_pod(CP, "client-a", REFUSED);
    assert_eq!(refused, "errno 111", "the refused connect");
    let exhausted = in_pod(WORKER, "client-b", EXHAUST);
    assert_eq!(
        exhausted, "errno 99\nheld 2",
        "the third connect found no port"
    );
    let probe = run(Command::new("docker").args(["exec", WORKER, "python3", "-c", PROBE]));
    assert!(
        probe.starts_with("failed"),
        "the node's probe was hijacked: {probe}"
    );
    let idle = in_pod(CP, "client-a", IDLE);
    assert!(
        idle.starts_with("failed"),
        "the idle connection is dead: {idle}"
    );

    thread::sleep(Duration::from_secs(3));
    let kind_lines = agents.finish();
    host.signal(Signal::SIGINT);
    let (code, host_lines) = host.finish();
    assert_eq!(code, 0);

    // The merged stream: every record schema-valid and named by its node.
    let kind = records(&kind_lines);
    assert!(
        kind.iter().all(|r| r["node"].is_string()),
        "every record has its node"
    );
    let kind_verdicts: Vec<&Value> = kind.iter().filter(|r| r["type"] == "verdict").collect();
    let host_records = records(&host_lines);
    let host_verdicts: Vec<&Value> = host_records
        .iter()
        .filter(|r| r["type"] == "verdict")
        .collect();
    let show = |vs: &[&Value]| {
        vs.iter()
            .map(|v| {
                format!(
                    "{} {} {} {}",
                    v["node"], v["cause"], v["pod"]["name"], v["summary"]
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    };
    assert!(
        all_found(&kind_verdicts),
        "kind verdicts:\n{}",
        show(&kind_verdicts)
    );
    assert!(
        all_found(&host_verdicts),
        "host verdicts:\n{}",
        show(&host_verdicts)
    );
    for (cause, node, pod) in EXPECTED {
        // Once, from the node of the pod (every record of one verdict).
        let by_kind: BTreeSet<String> = found(&kind_verdicts, cause, pod).into_iter().collect();
        assert_eq!(
            by_kind,
            BTreeSet::from([node.to_string()]),
            "{cause} {pod:?}"
        );
        let by_host: BTreeSet<String> = found(&host_verdicts, cause, pod).into_iter().collect();
        assert_eq!(
            by_host,
            BTreeSet::from([node.to_string()]),
            "{cause} {pod:?} from the host"
        );
    }
    // The host used each node's own facts: the control plane's conntrack
    // timeout, the worker's NodePort.
    let idle_v = host_verdicts
        .iter()
        .find(|v| v["cause"] == "idle_timeout")
        .expect("idle_timeout");
    assert_eq!(idle_v["evidence"]["timeout_s"], 2, "{idle_v}");
    let np = host_verdicts
        .iter()
        .find(|v| v["cause"] == "nodeport_collision")
        .expect("nodeport_collision");
    assert!(
        np["evidence"]["nodeport"]
            .as_str()
            .is_some_and(|s| s.starts_with("default/web-a")),
        "{np}"
    );
    eprintln!("cargo xtask kind:\n{}", show(&kind_verdicts));
    eprintln!("host tcptrace:\n{}", show(&host_verdicts));
    eprintln!("kind test took {:.0} s", started.elapsed().as_secs_f64());
}
