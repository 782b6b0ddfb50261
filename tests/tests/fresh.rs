//! tcptrace on a fresh machine: nothing mounted (no tracefs, debugfs or
//! bpffs), as on minimal hosts, in containers and on new VMs. Each test
//! runs the real binary in a private mount namespace (`unshare -m`), so
//! the host's mounts are untouched.
use std::{
    fs,
    net::{SocketAddr, TcpStream},
    process::Command,
    thread,
    time::Duration,
};

use nix::sys::signal::Signal;
use serde_json::{Value, json};
use tcptrace_tests::{Netns, Running, records, start_traced, tcptrace_bin};

/// The host's tracing-related mounts, to prove a test left them alone.
fn host_mounts() -> Vec<String> {
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter(|l| {
            [" - tracefs ", " - debugfs ", " - bpf "]
                .iter()
                .any(|t| l.contains(t))
        })
        .map(str::to_string)
        .collect()
}

/// tcptrace in a private mount namespace where tracefs, debugfs and bpffs
/// are unmounted first; `wrapper` goes between the shell and tcptrace.
fn start_unmounted(wrapper: &str) -> Running {
    // Busybox (in the VMs) has no mountpoint(1): /proc/self/mounts says.
    let script = format!(
        "for m in /sys/kernel/debug/tracing /sys/kernel/tracing /sys/kernel/debug /sys/fs/bpf; do \
           for _ in 1 2 3 4; do grep -q \" $m \" /proc/self/mounts || break; umount $m || exit 3; done; \
           ! grep -q \" $m \" /proc/self/mounts || exit 3; \
         done; \
         exec {wrapper} {} --format json --stats-interval 0.5",
        tcptrace_bin().display()
    );
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "sh", "-c", &script]);
    start_traced(cmd)
}

/// Causes one SYN retransmit in `ns` (a DROP rule on port 81), lets its
/// records arrive and stops tcptrace; returns its records and stderr.
fn syn_retransmit_under(ns: &Netns, tracer: Running) -> (Vec<Value>, Vec<String>) {
    ns.exec(&[
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "81", "-j", "DROP",
    ])
    .unwrap();
    ns.run("tt-fresh-client", || {
        let addr = SocketAddr::from(([127, 0, 0, 1], 81));
        TcpStream::connect_timeout(&addr, Duration::from_millis(1500)).unwrap_err()
    })
    .unwrap();
    thread::sleep(Duration::from_millis(300));
    tracer.signal(Signal::SIGINT);
    let before_ready = tracer.before_ready.clone();
    let (code, lines) = tracer.finish();
    assert_eq!(code, 0, "{}", before_ready.join("\n"));
    (records(&lines), before_ready)
}

/// The one retransmit record of `ns`, with the fields every test asserts.
fn assert_syn_retransmit(records: &[Value], ns: &Netns) {
    let netns = u64::from(ns.inode());
    let mine: Vec<&Value> = records
        .iter()
        .filter(|r| r["type"] == "event" && r["kind"] == "retransmit" && r["netns"] == netns)
        .collect();
    assert_eq!(mine.len(), 1, "one SYN retransmit within 1.5 s: {mine:?}");
    let r = mine[0];
    assert_eq!(r["dst"], json!({"ip": "127.0.0.1", "port": 81}));
    assert_eq!(r["src"]["ip"], "127.0.0.1");
    assert_ne!(r["src"]["port"], 0);
    assert_eq!(r["state"], "SYN_SENT");
    assert_eq!(r["tcp_flags"], "SYN");
    assert_eq!(r["comm"], "tt-fresh-client");
    assert_eq!(r["pid"], u64::from(std::process::id()));
    assert_eq!(r["netns_name"], ns.name.as_str());
}

#[test]
fn with_nothing_mounted_tcptrace_mounts_tracefs_and_traces() {
    let host_before = host_mounts();
    let ns = Netns::new("fresh").unwrap();
    let tracer = start_unmounted("");
    let (records, stderr) = syn_retransmit_under(&ns, tracer);
    assert!(
        stderr
            .iter()
            .any(|l| l == "tcptrace: tracefs was not mounted: mounted it at /sys/kernel/tracing"),
        "no mount notice in:\n{}",
        stderr.join("\n")
    );
    assert!(
        !stderr.iter().any(|l| l.contains("unavailable")),
        "every tracepoint hook attached:\n{}",
        stderr.join("\n")
    );
    assert_syn_retransmit(&records, &ns);
    assert_eq!(host_mounts(), host_before, "the host's mounts changed");
}

#[test]
fn without_the_right_to_mount_only_the_syscall_hooks_are_missing() {
    let host_before = host_mounts();
    let ns = Netns::new("fresh-nocap").unwrap();
    // Root without CAP_SYS_ADMIN: BPF loads (CAP_BPF, CAP_PERFMON), mount fails.
    let tracer = start_unmounted("setpriv --bounding-set=-sys_admin");
    let (records, stderr) = syn_retransmit_under(&ns, tracer);
    let why = "tracefs not found at /sys/kernel/tracing and tcptrace may not mount it \
               (needs CAP_SYS_ADMIN): mount it with `mount -t tracefs nodev /sys/kernel/tracing`";
    for hook in ["sys_enter_bind", "sys_exit_bind"] {
        let line = format!("tcptrace: {hook} (syscalls:{hook}) unavailable: {why}");
        assert!(
            stderr.contains(&line),
            "{line}\nnot in:\n{}",
            stderr.join("\n")
        );
    }
    assert!(
        !stderr.iter().any(|l| l.contains("mounted it")),
        "{}",
        stderr.join("\n")
    );
    assert_syn_retransmit(&records, &ns);
    assert_eq!(host_mounts(), host_before, "the host's mounts changed");
}

/// HZ as the kernel states it: CONFIG_HZ from its configuration file when
/// there is one, else jiffies against "now" in /proc/timer_list, 1 s apart.
fn kernel_hz() -> u32 {
    let config = Command::new("sh")
        .args([
            "-c",
            "zcat /proc/config.gz 2>/dev/null || cat /boot/config-$(uname -r) 2>/dev/null",
        ])
        .output()
        .unwrap();
    let config = String::from_utf8_lossy(&config.stdout);
    if let Some(hz) = config.lines().find_map(|l| l.strip_prefix("CONFIG_HZ=")) {
        return hz.trim().parse().unwrap();
    }
    let read = || {
        let text = fs::read_to_string("/proc/timer_list").expect("/proc/timer_list");
        let field = |prefix: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no {prefix:?} in /proc/timer_list"))
        };
        (field("jiffies: "), field("now at "))
    };
    let (j0, t0) = read();
    thread::sleep(Duration::from_secs(1));
    let (j1, t1) = read();
    let hz = (j1 - j0) / ((t1 - t0) / 1e9);
    let known = [
        24, 32, 48, 64, 100, 128, 200, 250, 256, 300, 500, 1000, 1024, 1200,
    ];
    *known
        .iter()
        .min_by(|a, b| {
            (f64::from(**a) - hz)
                .abs()
                .total_cmp(&(f64::from(**b) - hz).abs())
        })
        .unwrap()
}

/// Runs `command` after `tcptrace` in a private mount namespace where the
/// kernel configuration file is hidden (/boot emptied, /proc/config.gz
/// made empty); returns (exit code, stdout, stderr).
fn without_kernel_config(command: &str) -> (i32, String, String) {
    let script = format!(
        "set -e; \
         if [ -d /boot ]; then mount -t tmpfs tmpfs /boot; fi; \
         if [ -e /proc/config.gz ]; then mount -o bind /dev/null /proc/config.gz; fi; \
         ! zcat /proc/config.gz 2>/dev/null | grep -q CONFIG_HZ; \
         ! cat /boot/config-* 2>/dev/null | grep -q CONFIG_HZ; \
         exec timeout 60 {} {command}",
        tcptrace_bin().display()
    );
    let out = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c", &script])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_tick_rate_is_measured_without_the_kernel_config() {
    let host_before = host_mounts();
    let hz = kernel_hz();
    let measured = json!({"hz": hz, "source": {"kind": "measured"}});

    let (code, stdout, stderr) = without_kernel_config("probes --format json");
    assert_eq!(code, 0, "{stderr}");
    let probes: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(probes["tick"], measured, "{stderr}");
    assert!(!stderr.contains("tick rate"), "{stderr}");

    let (code, stdout, stderr) = without_kernel_config("probes");
    assert_eq!(code, 0, "{stderr}");
    let line =
        format!("tick rate: {hz} Hz (measured: the kernel's jiffies against CLOCK_MONOTONIC)");
    assert!(
        stdout.lines().any(|l| l == line),
        "{line}\nnot in:\n{stdout}"
    );

    // Every stats record says where the rate came from.
    let (code, stdout, stderr) =
        without_kernel_config("--format json --duration 1 --stats-interval 0.5");
    assert_eq!(code, 0, "{stderr}");
    let lines: Vec<String> = stdout.lines().map(str::to_string).collect();
    let stats: Vec<Value> = records(&lines)
        .into_iter()
        .filter(|r| r["type"] == "stats")
        .collect();
    assert!(!stats.is_empty(), "no stats record in:\n{stdout}");
    for s in &stats {
        assert_eq!(s["tick"], measured, "{s}");
    }
    assert_eq!(host_mounts(), host_before, "the host's mounts changed");
}
