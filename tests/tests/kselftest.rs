//! The kernel's own network selftests (Debian's linux-source-6.1, prepared
//! by `cargo xtask test` / `cargo xtask kselftest`), run unmodified under
//! the tcptrace binary: failures written by people who never saw tcptrace.
//! Each test asserts the verdicts its selftest must produce, and none where
//! it is healthy. With TCPTRACE_KSELFTEST_REPORT set, the results are
//! written there as a table.
use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Mutex,
    thread,
    time::{Duration, Instant},
};

use nix::sys::signal::Signal;
use serde_json::Value;
use tcptrace_tests::{Netns, cannot_run, records, start_tcptrace};

/// Longest a selftest may run.
const SELFTEST_LIMIT: Duration = Duration::from_secs(120);

/// The selftests the suite runs and what each does: the first two columns
/// of docs/kselftests.md.
const SELFTESTS: [(&str, &str); 4] = [
    (
        "net/reuseaddr_conflict",
        "wildcard binds of a port a 127.0.0.1 listener holds",
    ),
    (
        "net/reuseaddr_ports_exhausted.sh",
        "binds to port 0 in a namespace whose ephemeral range is one port",
    ),
    (
        "netfilter/conntrack_tcp_unreplied.sh",
        "a stale unreplied conntrack entry swallows a client's SYNs until it expires, then NAT applies",
    ),
    (
        "netfilter/nf_nat_edemux.sh",
        "a DNAT'd connect whose source port (the only one) clashes; NAT must pick another",
    ),
];

/// Rows of the report, by selftest.
static REPORT: Mutex<BTreeMap<&'static str, String>> = Mutex::new(BTreeMap::new());

/// tools/testing/selftests, or `None` when the package could not be
/// fetched (a failure under CI).
fn selftests() -> Option<PathBuf> {
    let value = std::env::var("TCPTRACE_KSELFTESTS").unwrap_or_else(|_| {
        panic!(
            "TCPTRACE_KSELFTESTS is not set: run these through `cargo xtask test` or `cargo xtask kselftest`, which fetch and build the kernel's selftests"
        )
    });
    if let Some(why) = value.strip_prefix("unavailable: ") {
        cannot_run(&format!("the kernel selftests could not be fetched: {why}"));
        return None;
    }
    Some(PathBuf::from(value))
}

/// One selftest run under tcptrace.
struct Run {
    exit: Option<i32>,
    output: String,
    seconds: f64,
    /// tcptrace's records about the namespaces the selftest made.
    records: Vec<Value>,
}

impl Run {
    fn events(&self, kind: &str) -> Vec<&Value> {
        self.records
            .iter()
            .filter(|r| r["type"] == "event" && r["kind"] == kind)
            .collect()
    }

    /// How many failures of `kind` were recorded: a record with a `count`
    /// stands for that many (repeats counted in the kernel).
    fn occurrences(&self, kind: &str) -> u64 {
        self.events(kind)
            .iter()
            .map(|r| r["count"].as_u64().unwrap_or(1))
            .sum()
    }

    /// The last record of each verdict (pod or namespace, cause and
    /// destination): its final count and evidence.
    fn verdicts(&self) -> Vec<&Value> {
        let mut last: BTreeMap<String, &Value> = BTreeMap::new();
        for v in self.records.iter().filter(|r| r["type"] == "verdict") {
            let key = format!("{}|{}|{}", v["netns"], v["cause"], v["dst"]);
            last.insert(key, v);
        }
        last.into_values().collect()
    }

    fn causes(&self) -> Vec<String> {
        let mut c: Vec<String> = self
            .verdicts()
            .iter()
            .map(|v| v["cause"].as_str().unwrap_or_default().to_string())
            .collect();
        c.sort();
        c
    }

    fn describe(&self) -> String {
        self.records
            .iter()
            .map(Value::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// Runs `cmd` (in `dir`) while tcptrace traces, and keeps the records of
/// the namespaces `mine` selects (by name, as the selftest names them).
fn under_tcptrace(dir: &Path, cmd: &[&str], mine: impl Fn(&Value) -> bool) -> Run {
    let tracer = start_tcptrace(&["--format", "json", "--facts-interval", "1"]);
    let started = Instant::now();
    let mut child = Command::new(cmd[0])
        .args(&cmd[1..])
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let exit = loop {
        if let Some(status) = child.try_wait().expect("waiting for the selftest") {
            break status.code();
        }
        if started.elapsed() > SELFTEST_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        thread::sleep(Duration::from_millis(50));
    };
    let seconds = started.elapsed().as_secs_f64();
    let out = child.wait_with_output().expect("selftest output");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Late records (the settle of the last resets), then a clean stop.
    thread::sleep(Duration::from_millis(500));
    tracer.signal(Signal::SIGINT);
    let (code, lines) = tracer.finish();
    assert_eq!(code, 0, "tcptrace exit");
    let records = records(&lines).into_iter().filter(|r| mine(r)).collect();
    Run {
        exit,
        output,
        seconds,
        records,
    }
}

/// Records of namespaces whose name starts with one of `prefixes`.
fn named(prefixes: &'static [&'static str]) -> impl Fn(&Value) -> bool {
    move |r| {
        r["netns_name"]
            .as_str()
            .is_some_and(|n| prefixes.iter().any(|p| n.starts_with(p)))
    }
}

/// A JSON value as table text (strings without quotes).
fn text(v: &Value) -> String {
    v.as_str().map_or_else(|| v.to_string(), str::to_string)
}

/// Records of namespace `netns`.
fn of_netns(netns: u32) -> impl Fn(&Value) -> bool {
    move |r| r["netns"] == u64::from(netns)
}

fn assert_passed(name: &str, run: &Run) {
    assert_eq!(
        run.exit,
        Some(0),
        "{name} failed by itself (it must pass on this kernel):\n{}",
        run.output
    );
}

/// A report row: the selftest, what it does, and tcptrace's verdicts with
/// their numbers.
fn report(name: &'static str, run: &Run, numbers: &str) {
    let makes = SELFTESTS
        .iter()
        .find_map(|(n, makes)| (*n == name).then_some(*makes))
        .unwrap_or_else(|| panic!("{name} is not in SELFTESTS"));
    let verdicts = match run.causes().as_slice() {
        [] => "none".to_string(),
        causes => causes.join(", "),
    };
    REPORT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(
            name,
            format!(
                "| `{name}` | {makes} | {:.0} s | {verdicts} | {numbers} |",
                run.seconds
            ),
        );
    write_report();
}

/// docs/kselftests.md up to its rows.
const DOC_HEAD: &str = "# The kernel's own selftests under tcptrace\n\n\
    Generated by `cargo xtask kselftest` (the `kselftest` suite of the root tests,\n\
    which `cargo xtask test` runs too); do not edit by hand.\n\n\
    Debian's `linux-source-6.1` package supplies the kernel's network selftests;\n\
    they run unmodified while the tcptrace binary traces the whole machine, and\n\
    each row shows what tcptrace said about the namespaces the selftest made.\n\n\
    | selftest | what it does | ran | tcptrace's verdicts | evidence |\n\
    |---|---|---|---|---|\n";

fn write_report() {
    let Some(path) = std::env::var_os("TCPTRACE_KSELFTEST_REPORT") else {
        return;
    };
    let rows = REPORT
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .values()
        .cloned()
        .collect::<Vec<_>>()
        .join("\n");
    let mut doc = String::from(DOC_HEAD);
    let _ = writeln!(doc, "{rows}");
    let _ = writeln!(
        doc,
        "\nKernel: `{}`.",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
    );
    std::fs::write(&path, doc)
        .unwrap_or_else(|e| panic!("writing {}: {e}", path.to_string_lossy()));
}

/// A namespace with a one-port ephemeral range binds to port 0 until no
/// port is left: 13 binds fail with EADDRINUSE by design.
#[test]
fn reuseaddr_ports_exhausted_is_port_exhaustion_with_a_one_port_range() {
    let Some(dir) = selftests() else { return };
    let run = under_tcptrace(
        &dir.join("net"),
        &["bash", "./reuseaddr_ports_exhausted.sh"],
        named(&["ns-"]),
    );
    assert_passed("reuseaddr_ports_exhausted.sh", &run);
    let errors = run.events("bind_error");
    assert!(
        !errors.is_empty(),
        "no bind_error recorded:\n{}",
        run.describe()
    );
    for e in &errors {
        assert_eq!(e["errno"], "EADDRINUSE");
        // The kernel read the range at the failure: the namespace is gone
        // by the time anything could look.
        assert_eq!(e["port_range"], "32768-32768");
        assert!(e.get("dst").is_none(), "a bind has no destination: {e}");
    }
    let verdicts = run.verdicts();
    assert_eq!(run.causes(), ["port_exhaustion"], "{}", run.describe());
    let v = verdicts[0];
    let failed = run.occurrences("bind_error");
    assert_eq!(v["count"].as_u64(), Some(failed));
    assert_eq!(v["evidence"]["port_range_size"], 1);
    assert_eq!(v["evidence"]["port_range"], "32768-32768");
    let summary = v["summary"].as_str().unwrap_or_default();
    assert!(!summary.contains("0.0.0.0:0"), "{summary}");
    assert!(summary.contains("1 ephemeral port)"), "{summary}");
    assert!(v.get("dst").is_none(), "{v}");
    let name = v["netns_name"].as_str().unwrap_or_default();
    assert!(v["fix"].as_str().unwrap_or_default().contains(name), "{v}");
    report(
        "net/reuseaddr_ports_exhausted.sh",
        &run,
        &format!(
            "{failed} bind_error EADDRINUSE ({} records); `port_range` {}, `port_range_size` {}, count {}",
            errors.len(),
            text(&v["evidence"]["port_range"]),
            v["evidence"]["port_range_size"],
            v["count"]
        ),
    );
}

/// A stale, unreplied conntrack entry without NAT swallows the SYNs of a
/// client with a fixed source port until it expires; then NAT applies and
/// the connect succeeds, 10 s late.
#[test]
fn conntrack_tcp_unreplied_is_a_slow_connect_with_where_the_syns_died() {
    let Some(dir) = selftests() else { return };
    let run = under_tcptrace(
        &dir.join("netfilter"),
        &["bash", "./conntrack_tcp_unreplied.sh"],
        named(&["ns1-", "ns2-"]),
    );
    assert_passed("conntrack_tcp_unreplied.sh", &run);
    assert_eq!(run.causes(), ["slow_connect"], "{}", run.describe());
    let v = run.verdicts()[0];
    let e = &v["evidence"];
    assert_eq!(v["severity"], "degraded");
    assert_eq!(e["dst"], "10.99.99.99:80");
    assert!(e["syn_retransmits"].as_u64().unwrap_or(0) >= 3, "{v}");
    // The entry expires after nf_conntrack_tcp_timeout_syn_sent=10 s.
    let ms = e["connect_ms"].as_u64().unwrap_or(0);
    assert!((9_000..30_000).contains(&ms), "{v}");
    // Where the SYNs died, whatever the reason (not netfilter's here).
    let dropped = &e["dropped"];
    assert!(dropped["drops"].as_u64().unwrap_or(0) >= 1, "{v}");
    assert!(dropped["reason"].is_string(), "{v}");
    assert_ne!(dropped["reason"], "NETFILTER_DROP", "{v}");
    report(
        "netfilter/conntrack_tcp_unreplied.sh",
        &run,
        &format!(
            "`syn_retransmits` {}, `connect_ms` {ms}, SYNs dropped: {} × {} in {}",
            e["syn_retransmits"],
            dropped["drops"],
            text(&dropped["reason"]),
            text(&dropped["place"])
        ),
    );
}

/// A listener bound to 127.0.0.1 with SO_REUSEADDR blocks wildcard binds
/// of the same port: three binds fail with EADDRINUSE by design.
#[test]
fn reuseaddr_conflict_is_a_bind_conflict_on_its_port() {
    let Some(dir) = selftests() else { return };
    let ns = Netns::new("ks-conflict").expect("netns");
    let run = under_tcptrace(
        &dir.join("net"),
        &["ip", "netns", "exec", &ns.name, "./reuseaddr_conflict"],
        of_netns(ns.inode()),
    );
    assert_passed("reuseaddr_conflict", &run);
    let failed = run.occurrences("bind_error");
    assert_eq!(failed, 3, "{}", run.describe());
    assert_eq!(run.causes(), ["bind_conflict"], "{}", run.describe());
    let v = run.verdicts()[0];
    assert_eq!(v["count"], 3);
    assert_eq!(v["evidence"]["addr"], "0.0.0.0:9999");
    assert_eq!(v["evidence"]["in_ephemeral_range"], false);
    report(
        "net/reuseaddr_conflict",
        &run,
        &format!(
            "{failed} bind_error EADDRINUSE ({} records) on {}; count {}",
            run.events("bind_error").len(),
            text(&v["evidence"]["addr"]),
            v["count"]
        ),
    );
}

/// NAT must reallocate the source port of a connection whose DNAT'd
/// 4-tuple clashes with an existing one (one local port only): the kernel
/// does, so the connect succeeds and tcptrace has nothing to say.
#[test]
fn nf_nat_edemux_resolves_the_clash_and_gets_no_failure_verdict() {
    let Some(dir) = selftests() else { return };
    let run = under_tcptrace(
        &dir.join("netfilter"),
        &["bash", "./nf_nat_edemux.sh"],
        named(&["ns1-", "ns2-"]),
    );
    assert_passed("nf_nat_edemux.sh", &run);
    let bad: Vec<&Value> = run
        .verdicts()
        .into_iter()
        .filter(|v| v["severity"] != "benign")
        .collect();
    assert!(
        bad.is_empty(),
        "a healthy run got verdicts:\n{}",
        run.describe()
    );
    let benign: Vec<String> = run.verdicts().iter().map(|v| text(&v["summary"])).collect();
    report(
        "netfilter/nf_nat_edemux.sh",
        &run,
        &format!(
            "no failure or degraded verdict; benign: {}",
            if benign.is_empty() {
                "none".to_string()
            } else {
                benign.join("; ")
            }
        ),
    );
}

/// Nothing passes by not running: with the selftests unavailable, a suite
/// test fails under CI, and elsewhere passes saying "skipped" on the
/// terminal (here: stderr, as the test runs without one).
#[test]
fn unavailable_selftests_fail_under_ci_and_say_skipped_elsewhere() {
    const WHY: &str = "no network here";
    let run = |ci: Option<&str>| {
        let mut cmd = Command::new("setsid");
        cmd.arg("--wait")
            .arg(std::env::current_exe().expect("this test binary"))
            .args([
                "--exact",
                "reuseaddr_conflict_is_a_bind_conflict_on_its_port",
                "--test-threads=1",
            ])
            .env("TCPTRACE_KSELFTESTS", format!("unavailable: {WHY}"))
            .env_remove("TCPTRACE_KSELFTEST_REPORT")
            .stdin(Stdio::null());
        match ci {
            Some(v) => cmd.env("CI", v),
            None => cmd.env_remove("CI"),
        };
        let out = cmd.output().expect("running this test binary again");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The failure is reported by the test harness, on stdout.
    let (code, stdout, _) = run(Some("true"));
    assert_eq!(code, Some(101), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "this test cannot run here, and under CI nothing passes by not running: \
             the kernel selftests could not be fetched: {WHY}"
        )),
        "{stdout}"
    );
    let (code, _, stderr) = run(None);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        stderr,
        format!("skipped: the kernel selftests could not be fetched: {WHY}\n")
    );
}

/// docs/kselftests.md needs the selftests to regenerate; what it says
/// without them (its text, its selftests and what each does) must be what
/// this suite would write.
#[test]
fn committed_report_lists_what_this_suite_runs() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/kselftests.md");
    let doc = std::fs::read_to_string(&path).expect("docs/kselftests.md");
    let stale = "docs/kselftests.md is stale: regenerate it with `cargo xtask kselftest`";
    let rows = doc
        .strip_prefix(DOC_HEAD)
        .unwrap_or_else(|| panic!("{stale}"));
    let listed: Vec<(String, String)> = rows
        .lines()
        .take_while(|l| l.starts_with('|'))
        .map(|l| {
            let cells: Vec<&str> = l.split(" | ").collect();
            (
                cells[0]
                    .trim_start_matches("| `")
                    .trim_end_matches('`')
                    .to_string(),
                cells[1].to_string(),
            )
        })
        .collect();
    let runs: Vec<(String, String)> = SELFTESTS
        .iter()
        .map(|(n, m)| (n.to_string(), m.to_string()))
        .collect();
    assert_eq!(listed, runs, "{stale}");
}
