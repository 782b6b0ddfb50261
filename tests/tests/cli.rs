//! The tcptrace binary as a user runs it: NDJSON for a caused failure,
//! clean stops, a closed pipe, and one clear sentence when it cannot run.
use std::{
    net::{SocketAddr, TcpStream},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde_json::Value;
use tcptrace_tests::{Netns, Running, records, start_tcptrace, tcptrace_bin};

/// Lets in-flight records arrive, stops tracing with SIGINT (exit 0) and
/// returns its lines and their schema-checked records.
fn interrupt(tracer: Running) -> (Vec<String>, Vec<Value>) {
    thread::sleep(Duration::from_millis(300));
    tracer.signal(Signal::SIGINT);
    let (code, lines) = tracer.finish();
    assert_eq!(code, 0);
    let records = records(&lines);
    (lines, records)
}

#[test]
fn ndjson_names_a_caused_retransmit_and_sigint_exits_zero() {
    let ns = Netns::new("cli").unwrap();
    ns.exec(&[
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "81", "-j", "DROP",
    ])
    .unwrap();
    let tracer = start_tcptrace(&["--format", "json", "--stats-interval", "0.5"]);
    ns.run("tt-cli-client", || {
        let addr = SocketAddr::from(([127, 0, 0, 1], 81));
        TcpStream::connect_timeout(&addr, Duration::from_millis(1500)).unwrap_err()
    })
    .unwrap();
    let (lines, records) = interrupt(tracer);

    let netns = u64::from(ns.inode());
    let retransmit = records
        .iter()
        .find(|r| r["type"] == "event" && r["kind"] == "retransmit" && r["netns"] == netns)
        .unwrap_or_else(|| panic!("no retransmit record in:\n{}", lines.join("\n")));
    assert_eq!(
        retransmit["dst"],
        serde_json::json!({"ip": "127.0.0.1", "port": 81})
    );
    assert_eq!(retransmit["state"], "SYN_SENT");
    assert_eq!(retransmit["tcp_flags"], "SYN");
    assert_eq!(retransmit["comm"], "tt-cli-client");
    assert_eq!(retransmit["netns_name"], ns.name.as_str());
    // The rule dropped the SYNs: the verdict names it, with its counter.
    let verdict = records
        .iter()
        .find(|r| r["type"] == "verdict" && r["cause"] == "netfilter_drop" && r["netns"] == netns)
        .unwrap_or_else(|| panic!("no netfilter_drop verdict:\n{}", lines.join("\n")));
    assert_eq!(
        verdict["evidence"]["rule"],
        "-A INPUT -p tcp -m tcp --dport 81 -j DROP"
    );
    assert_eq!(verdict["comm"], "tt-cli-client");
    let last = records.last().unwrap();
    assert_eq!(
        (last["type"].as_str(), last["final"].as_bool()),
        (Some("stats"), Some(true))
    );
    assert!(last["seen"].as_u64().unwrap() >= 2);
}

/// Repeats of a verdict are aggregated for 10 s; stopping before then still
/// reports every occurrence, once, before the final stats.
#[test]
fn stopping_reports_the_aggregated_count() {
    let ns = Netns::new("cli-count").unwrap();
    let tracer = start_tcptrace(&["--format", "json"]);
    let refused = ns
        .run("tt-cli-refused", || {
            let addr = SocketAddr::from(([127, 0, 0, 1], 84));
            (0..5)
                .filter(|_| {
                    TcpStream::connect(addr).err().map(|e| e.kind())
                        == Some(std::io::ErrorKind::ConnectionRefused)
                })
                .count()
        })
        .unwrap();
    assert_eq!(refused, 5);
    let (lines, records) = interrupt(tracer);
    let netns = u64::from(ns.inode());
    let counts: Vec<u64> = records
        .iter()
        .filter(|r| r["type"] == "verdict" && r["netns"] == netns)
        .map(|r| {
            assert_eq!(r["cause"], "connection_refused", "{r}");
            r["count"].as_u64().unwrap()
        })
        .collect();
    // The first occurrence at once, the other four at the stop.
    assert_eq!(counts, vec![1, 5], "{}", lines.join("\n"));
    assert_eq!(records.last().unwrap()["final"], true);
}

#[test]
fn duration_and_sigterm_stop_cleanly_with_final_stats() {
    let started = Instant::now();
    let (code, lines) = start_tcptrace(&["--duration", "1"]).finish();
    assert_eq!(code, 0);
    assert!(started.elapsed() < Duration::from_secs(25));
    let last = records(&lines).pop().unwrap();
    assert_eq!(last["final"], true);
    // Stats name the machine, for a replay's header.
    let read = |path| std::fs::read_to_string(path).unwrap().trim().to_string();
    assert_eq!(last["node"], read("/proc/sys/kernel/hostname"));
    assert_eq!(last["kernel"], read("/proc/sys/kernel/osrelease"));

    let tracer = start_tcptrace(&[]);
    tracer.signal(Signal::SIGTERM);
    let (code, lines) = tracer.finish();
    assert_eq!(code, 0);
    assert_eq!(records(&lines).last().unwrap()["final"], true);
}

#[test]
fn closed_pipe_ends_quietly() {
    let mut tracer = start_tcptrace(&["--stats-interval", "0.2"]);
    drop(tracer.child.stdout.take());
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = tracer.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "tcptrace kept running with no reader"
        );
        thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(0));
    let complaints: Vec<String> = tracer.stderr.try_iter().collect();
    assert!(complaints.is_empty(), "{complaints:?}");
}

fn one_sentence(args: &[&str], as_nobody: bool) -> (i32, String) {
    let bin = tcptrace_bin();
    let out = if as_nobody {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&bin)
            .args(args)
            .output()
    } else {
        Command::new(&bin).args(args).output()
    }
    .expect("running tcptrace");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn without_root_it_says_what_is_missing() {
    let (code, stderr) = one_sentence(&["--duration", "1"], true);
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        "tcptrace: tcptrace needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN) to load its BPF programs\n"
    );
}

#[test]
fn without_btf_it_says_what_is_missing() {
    let (code, stderr) = one_sentence(&["--btf", "/nonexistent/vmlinux", "--duration", "1"], false);
    assert_eq!(code, 1);
    assert_eq!(
        stderr,
        "tcptrace: BTF not found at /nonexistent/vmlinux: tcptrace needs a kernel built with CONFIG_DEBUG_INFO_BTF\n"
    );
}

#[test]
fn usage_errors_exit_2() {
    let (code, stderr) = one_sentence(&["--ring-buffer-size", "5000"], false);
    assert_eq!(code, 2);
    assert!(stderr.contains("not a power of two"), "{stderr}");
}
