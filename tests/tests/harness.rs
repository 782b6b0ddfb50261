//! The harness itself: a tcptrace that hangs fails the test that waits for
//! it, in bounded time, with what it printed; it never hangs the suite.
//! A shell script stands in for tcptrace (no root needed).
use std::{
    panic::{AssertUnwindSafe, catch_unwind},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use tcptrace_tests::{Running, start_traced};

const READY: &str = "echo 'tcptrace: tracing, 0 of 0 hooks attached' >&2";

fn fake_tcptrace(script: &str) -> Running {
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &format!("{READY}; {script}")]);
    start_traced(cmd)
}

/// Runs `finish_within(1 s)` on a fake that misbehaves; returns the panic
/// message, how long it took and whether the fake is gone.
fn give_up(script: &str) -> (String, Duration, bool) {
    let running = fake_tcptrace(script);
    let pid = running.child.id();
    let started = Instant::now();
    let panicked = catch_unwind(AssertUnwindSafe(|| {
        running.finish_within(Duration::from_secs(1))
    }))
    .expect_err("finish_within returned for a hung tcptrace");
    let took = started.elapsed();
    let message = panicked
        .downcast_ref::<String>()
        .cloned()
        .unwrap_or_default();
    let gone = !Path::new(&format!("/proc/{pid}")).exists();
    (message, took, gone)
}

#[test]
fn a_tcptrace_that_keeps_stdout_open_fails_in_bounded_time() {
    let (message, took, gone) =
        give_up("echo '{\"type\":\"stats\"}'; echo 'tcptrace: stuck' >&2; exec sleep 600");
    assert!(took < Duration::from_secs(5), "gave up after {took:?}");
    assert!(gone, "the hung process is still running");
    assert_eq!(
        message,
        "tcptrace kept its stdout open for 1s: killed it.\n\
         stdout:\n{\"type\":\"stats\"}\nstderr:\ntcptrace: stuck"
    );
}

#[test]
fn a_tcptrace_that_closes_stdout_but_runs_on_fails_in_bounded_time() {
    let (message, took, gone) = give_up("echo done; exec >&-; exec sleep 600");
    assert!(took < Duration::from_secs(5), "gave up after {took:?}");
    assert!(gone, "the hung process is still running");
    assert_eq!(
        message,
        "tcptrace closed its stdout but did not exit for 1s: killed it.\nstdout:\ndone\nstderr:\n"
    );
}

#[test]
fn a_tcptrace_that_exits_gives_its_code_and_every_line() {
    let running = fake_tcptrace("echo one; echo two; exit 3");
    assert_eq!(
        running.finish_within(Duration::from_secs(10)),
        (3, vec!["one".to_string(), "two".to_string()])
    );
}
