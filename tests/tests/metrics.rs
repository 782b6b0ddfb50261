//! `--metrics-addr`: the Prometheus endpoint, scraped over loopback with a
//! real HTTP client while tcptrace sees a real failure (a refused connect in
//! a private network namespace). The failing process runs in its own cgroup
//! and tcptrace is scoped to it (`--node-scope`), so other traffic on the
//! machine cannot change the counts.
use std::{
    collections::BTreeMap,
    fs,
    path::PathBuf,
    process::Command,
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde_json::Value;
use tcptrace_tests::{Netns, Running, start_tcptrace, tcptrace_bin};

/// A child of the cgroup v2 root, removed when dropped.
struct Cgroup {
    /// The cgroup2 mount (/sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts).
    mount: PathBuf,
    name: String,
}

/// Where cgroup v2 is mounted, from /proc/self/mounts.
fn cgroup2_mount() -> PathBuf {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap();
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"cgroup2")).then(|| PathBuf::from(f[1]))
        })
        .expect("a cgroup v2 mount")
}

impl Cgroup {
    fn new(name: &str) -> Self {
        let name = format!("{name}-{}", std::process::id());
        let cg = Self {
            mount: cgroup2_mount(),
            name,
        };
        let _ = fs::remove_dir(cg.path());
        fs::create_dir(cg.path()).expect("creating a cgroup");
        assert!(cg.path().join("cgroup.procs").is_file(), "not a cgroup v2");
        cg
    }

    fn path(&self) -> PathBuf {
        self.mount.join(&self.name)
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        let _ = fs::remove_dir(self.path());
    }
}

struct Tracing {
    running: Running,
    metrics_url: String,
}

/// Starts tcptrace scoped to `scope`; the metrics URL comes from its stderr
/// (port 0: the kernel picks a free one).
fn start(scope: &str) -> Tracing {
    let running = start_tcptrace(&[
        "--format",
        "json",
        "--node-scope",
        scope,
        "--metrics-addr",
        "127.0.0.1:0",
        "--stats-interval",
        "1",
    ]);
    let metrics_url = running
        .before_ready
        .iter()
        .find_map(|l| l.strip_prefix("tcptrace: metrics on "))
        .expect("tcptrace announces its metrics URL")
        .to_string();
    Tracing {
        running,
        metrics_url,
    }
}

fn scrape(url: &str) -> (String, String) {
    let mut resp = ureq::get(url).call().expect("GET /metrics");
    assert_eq!(resp.status(), 200);
    let content_type = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    let body = resp.body_mut().read_to_string().expect("metrics body");
    (content_type, body)
}

#[test]
fn metrics_count_a_refused_connect_exactly() {
    let ns = Netns::new("metrics").unwrap();
    let cg = Cgroup::new("tt-metrics");
    let scope = format!("/{}", cg.name);
    let tracing = start(&scope);

    // Nothing listens on port 81: the connect is refused (111). The shell
    // moves itself into the cgroup first (`ip netns exec` remounts /sys), so
    // the socket's owner is in scope. bash, not sh: busybox's sh would run
    // its own `ip` applet, which has no `netns`.
    let out = Command::new("bash")
        .args([
            "-c",
            r#"echo $$ > "$1/cgroup.procs" && exec ip netns exec "$2" python3 -c 'import socket; print(socket.socket().connect_ex(("127.0.0.1", 81)))'"#,
            "bash",
        ])
        .arg(cg.path())
        .arg(&ns.name)
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "111",
        "the connect must be refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let want = r#"tcptrace_verdicts_total{cause="connection_refused",pod=""} 1"#;
    let deadline = Instant::now() + Duration::from_secs(15);
    let content_type = loop {
        let (ct, body) = scrape(&tracing.metrics_url);
        if body.lines().any(|l| l == want) {
            break ct;
        }
        assert!(
            Instant::now() < deadline,
            "no {want:?} within 15 s in:\n{body}"
        );
        thread::sleep(Duration::from_millis(200));
    };
    // Stats records (every second) carry the kernel counters; let one pass.
    thread::sleep(Duration::from_millis(1500));
    let (_, body) = scrape(&tracing.metrics_url);

    assert_eq!(
        content_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let lines: Vec<&str> = body.lines().collect();
    for line in [
        want,
        r#"tcptrace_verdict_occurrences_total{cause="connection_refused",pod=""} 1"#,
        r#"tcptrace_probe_attached{hook="inet_sock_set_state",tracepoint="inet_sock_set_state",tier="raw_tracepoint"} 1"#,
        "tcptrace_malformed_records_total 0",
        "# EOF",
    ] {
        assert!(lines.contains(&line), "missing {line:?} in:\n{body}");
    }
    // Only this one failure is in scope: no other cause was counted.
    let verdict_lines: Vec<&&str> = lines
        .iter()
        .filter(|l| l.starts_with("tcptrace_verdicts_total{"))
        .collect();
    assert_eq!(verdict_lines, vec![&want], "{body}");
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("tcptrace_lost_events_total{hook=")),
        "lost events per hook are exported:\n{body}"
    );

    // The event counters agree with the NDJSON tcptrace printed.
    tracing.running.signal(Signal::SIGTERM);
    let (code, printed) = tracing.running.finish();
    assert_eq!(code, 0);
    let mut kinds: BTreeMap<String, u64> = BTreeMap::new();
    for line in &printed {
        let v: Value = serde_json::from_str(line).unwrap();
        if v["type"] == "event" {
            *kinds
                .entry(v["kind"].as_str().unwrap().to_string())
                .or_default() += 1;
        }
    }
    assert!(!kinds.is_empty(), "events printed:\n{}", printed.join("\n"));
    for (kind, n) in &kinds {
        let line = format!(r#"tcptrace_events_total{{kind="{kind}",pod=""}} {n}"#);
        assert!(
            lines.contains(&line.as_str()),
            "missing {line:?} in:\n{body}"
        );
    }
    let event_series = lines
        .iter()
        .filter(|l| l.starts_with("tcptrace_events_total{"))
        .count();
    assert_eq!(event_series, kinds.len(), "{body}");
}

#[test]
fn metrics_refuse_a_remote_address_without_consent() {
    let out = Command::new(tcptrace_bin())
        .args(["--format", "json", "--metrics-addr", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not a loopback address: pass --metrics-allow-remote"),
        "{err}"
    );
}
