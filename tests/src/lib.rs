//! Harness for the root integration tests: private network namespaces that
//! clean up after themselves, code run inside them, and a tracer shared by
//! the tests of one binary whose events are filtered by namespace.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{Mutex, MutexGuard, OnceLock, mpsc},
    thread,
    time::{Duration, Instant},
};

use anyhow::Result;
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tcptrace::{
    bpf::{Tracer, TracerOptions},
    model::{Event, EventKind, HookStats},
};

/// A network namespace `tt-<name>-<pid>`, deleted (with every process in
/// it) when dropped, also when a test panics.
pub struct Netns(tcptrace_lab::netns::Netns);

impl Netns {
    pub fn new(name: &str) -> Result<Self> {
        tcptrace_lab::netns::Netns::create(format!("tt-{name}-{}", std::process::id())).map(Self)
    }

    /// The namespace inode, as tcptrace reports it (0 when it is gone).
    pub fn inode(&self) -> u32 {
        self.0.inode().unwrap_or(0)
    }
}

impl std::ops::Deref for Netns {
    type Target = tcptrace_lab::netns::Netns;

    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

/// The tracer, shared by the tests of one binary.
pub struct Capture {
    pub tracer: Tracer,
    /// Events drained but not yet claimed by a test, by namespace.
    pending: Vec<Event>,
    /// Drop records without a namespace, of any traffic: none may exist.
    unplaced: Vec<Event>,
}

static CAPTURE: OnceLock<Mutex<Capture>> = OnceLock::new();

/// Loads the tracer on first use. Tests hold the guard while they run, so
/// they run one at a time even without --test-threads=1.
pub fn capture() -> MutexGuard<'static, Capture> {
    let cell = CAPTURE.get_or_init(|| {
        let opts = TracerOptions {
            ring_buffer_bytes: 1 << 22,
            // The tests' sockets belong to this process.
            ignore_self: false,
            ..TracerOptions::default()
        };
        let tracer =
            Tracer::load(&opts).expect("loading tcptrace's BPF programs (tests need root)");
        Mutex::new(Capture {
            tracer,
            pending: Vec::new(),
            unplaced: Vec::new(),
        })
    });
    let mut guard = cell
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    guard.drain();
    guard.pending.clear();
    guard
}

impl Capture {
    fn drain(&mut self) {
        let (pending, unplaced) = (&mut self.pending, &mut self.unplaced);
        self.tracer.drain(usize::MAX, |decoded| {
            let Ok(ev) = decoded else { return };
            if ev.netns == 0 && ev.kind == EventKind::Drop {
                unplaced.push(ev);
            } else {
                pending.push(ev);
            }
        });
    }

    /// Collects events of namespace `netns` until `done` holds for them or
    /// `timeout` passes; returns what was collected either way.
    pub fn wait_for(
        &mut self,
        netns: u32,
        timeout: Duration,
        done: impl Fn(&[Event]) -> bool,
    ) -> Vec<Event> {
        let start = Instant::now();
        loop {
            self.drain();
            let mine: Vec<Event> = self
                .pending
                .iter()
                .filter(|e| e.netns == netns)
                .cloned()
                .collect();
            assert!(
                self.unplaced.is_empty(),
                "drop records without a network namespace:\n{}",
                show(&self.unplaced)
            );
            if done(&mine) || start.elapsed() > timeout {
                return mine;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn hook_stats(&self) -> Vec<HookStats> {
        self.tracer.hook_stats().expect("reading counters")
    }
}

/// A test that cannot run (a tool, a package or a kernel feature is
/// missing): under CI (`CI=true`) it fails with `reason`; elsewhere it says
/// so on the terminal, past the test harness's output capture, and the
/// caller returns.
pub fn cannot_run(reason: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("this test cannot run here, and under CI nothing passes by not running: {reason}");
    }
    let line = format!("skipped: {reason}\n");
    let shown = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/tty")
        .and_then(|mut tty| tty.write_all(line.as_bytes()));
    if shown.is_err() {
        let _ = std::io::stderr().write_all(line.as_bytes());
    }
}

/// Describes events compactly for assertion messages.
pub fn show(events: &[Event]) -> String {
    events
        .iter()
        .map(|e| serde_json::to_string(e).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The tcptrace binary under test: $TCPTRACE_BIN (set by `cargo xtask
/// test`), else the workspace's debug build.
pub fn tcptrace_bin() -> PathBuf {
    built_binary("TCPTRACE_BIN", "tcptrace")
}

/// The xtask binary: $TCPTRACE_XTASK (set by `cargo xtask test`), else
/// the workspace's debug build.
pub fn xtask_bin() -> PathBuf {
    built_binary("TCPTRACE_XTASK", "xtask")
}

fn built_binary(var: &str, name: &str) -> PathBuf {
    std::env::var_os(var).map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/debug")
                .join(name)
        },
        PathBuf::from,
    )
}

/// tcptrace's NDJSON lines as records, each checked against the schema;
/// no drop record may lack its namespace (no pod could be named for it).
pub fn records(lines: &[String]) -> Vec<serde_json::Value> {
    let validator = schema_validator();
    let records: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
            if let Err(e) = validator.validate(&v) {
                panic!("record violates the schema: {e}\n{l}");
            }
            v
        })
        .collect();
    let unplaced: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r["kind"] == "drop" && r["netns"] == 0)
        .collect();
    assert!(
        unplaced.is_empty(),
        "drop records without a network namespace: {unplaced:#?}"
    );
    records
}

/// Validator for the committed NDJSON schema.
pub fn schema_validator() -> jsonschema::Validator {
    let text = include_str!("../../tcptrace/schema/tcptrace.schema.json");
    let schema: serde_json::Value = serde_json::from_str(text).expect("schema is JSON");
    jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("schema compiles")
}

/// A running tcptrace whose stderr is watched for the readiness line.
pub struct Running {
    pub child: Child,
    /// stderr lines after the readiness line.
    pub stderr: mpsc::Receiver<String>,
    /// stderr lines before it (warnings, the metrics address).
    pub before_ready: Vec<String>,
}

/// Starts the tcptrace binary and waits (bounded) until it reports that
/// tracing is live.
pub fn start_tcptrace(args: &[&str]) -> Running {
    let mut cmd = Command::new(tcptrace_bin());
    cmd.args(args);
    start_traced(cmd)
}

/// Starts `cmd`, a command that ends up exec'ing tcptrace, and waits
/// (bounded) until tcptrace reports that tracing is live.
pub fn start_traced(mut cmd: Command) -> Running {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting tcptrace");
    let (tx, stderr) = mpsc::channel();
    let pipe = child.stderr.take().unwrap();
    thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut running = Running {
        child,
        stderr,
        before_ready: Vec::new(),
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match running.stderr.recv_timeout(left) {
            Ok(line) if line.starts_with("tcptrace: tracing,") => return running,
            Ok(line) => running.before_ready.push(line),
            Err(_) => {
                let status = running.child.try_wait().ok().flatten();
                panic!(
                    "tcptrace did not report readiness within 30 s (exit: {status:?}); stderr:\n{}",
                    running.before_ready.join("\n")
                )
            }
        }
    }
}

impl Running {
    pub fn signal(&self, sig: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }

    /// Waits (bounded) for exit; returns the exit code and stdout lines.
    pub fn finish(self) -> (i32, Vec<String>) {
        self.finish_within(Duration::from_secs(20))
    }

    /// Reads stdout to its end and waits for exit, both within `limit`;
    /// past it, kills tcptrace and fails with what it printed.
    pub fn finish_within(mut self, limit: Duration) -> (i32, Vec<String>) {
        let deadline = Instant::now() + limit;
        let stdout = self.child.stdout.take().expect("stdout not yet taken");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => lines.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    self.give_up(limit, "kept its stdout open", &lines)
                }
            }
        }
        loop {
            if let Some(status) = self.child.try_wait().expect("waiting for tcptrace") {
                return (status.code().unwrap_or(-1), lines);
            }
            if Instant::now() >= deadline {
                self.give_up(limit, "closed its stdout but did not exit", &lines)
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    fn give_up(&mut self, limit: Duration, what: &str, stdout: &[String]) -> ! {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let stderr: Vec<String> = self.stderr.try_iter().collect();
        panic!(
            "tcptrace {what} for {limit:?}: killed it.\nstdout:\n{}\nstderr:\n{}",
            stdout.join("\n"),
            stderr.join("\n")
        )
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
