//! The TUI in a real terminal: tmux runs `tcptrace replay` on the committed
//! incident, keys go in with send-keys, and the test reads the screen a
//! person would see (printed into the test output).
use std::{
    io::Write as _,
    process::{Command, Output},
    thread,
    time::{Duration, Instant},
};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/incident.ndjson"
);

/// A private tmux server with one 120x40 window, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(name: &str, command: &str) -> Self {
        let tmux = Self {
            socket: format!("tcptrace-test-{name}-{}", std::process::id()),
        };
        let out = tmux.run(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "tui",
            "-x",
            "120",
            "-y",
            "40",
            command,
        ]);
        assert!(out.status.success(), "tmux new-session: {out:?}");
        tmux
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("run tmux")
    }

    fn keys(&self, keys: &[&str]) {
        for key in keys {
            let out = self.run(&["send-keys", "-t", "tui", key]);
            assert!(out.status.success(), "tmux send-keys {key}: {out:?}");
        }
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "tui"]).stdout).into_owned()
    }

    /// Polls the screen until `ready` holds (the program runs on its own
    /// clock), then prints and returns it.
    fn wait_for(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let screen = self.screen();
            if ready(&screen) {
                println!("--- screen: {what} ---\n{screen}");
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; screen:\n{screen}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

/// Whether tmux is installed. Without it the test cannot run: under CI
/// (`CI=true`) that fails it; elsewhere the skip is said on the terminal,
/// past the test harness's output capture.
fn have_tmux() -> bool {
    if Command::new("tmux").arg("-V").output().is_ok() {
        return true;
    }
    let reason = "tmux is not installed (apt-get install -y tmux)";
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
    false
}

#[test]
fn replay_in_a_real_terminal() {
    if !have_tmux() {
        return;
    }
    let bin = env!("CARGO_BIN_EXE_tcptrace");
    // After the TUI exits, show its status and whether the tty is cooked again.
    let tmux = Tmux::start(
        "keys",
        &format!(
            "'{bin}' replay '{FIXTURE}'; echo \"tcptrace exited with $?\"; \
         stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon; sleep 60"
        ),
    );

    let board = tmux.wait_for("board", |s| s.contains("replay finished"));
    for cause in [
        "idle_timeout",
        "port_exhaustion",
        "conntrack_invalid",
        "nodeport_collision",
    ] {
        assert!(board.contains(cause), "{cause} on the board");
    }
    assert!(board.contains("shop/checkout-7d9f8b6c5-x2k4q"));
    assert!(board.contains("LOST 17"));
    assert!(board.contains("invalid 1"));

    // Third row by recency: port exhaustion of the exporter pod.
    tmux.keys(&["j", "j", "Enter"]);
    let detail = tmux.wait_for("details", |s| s.contains("details: port_exhaustion"));
    assert!(detail.contains("batch/report-exporter-58f6c9d7b-9wq7t"));
    assert!(detail.contains("fix: reuse connections (HTTP keep-alive pool)"));
    assert!(detail.contains("ip_local_port_range: 32768 32867"));

    tmux.keys(&["Escape"]);
    tmux.wait_for("details closed", |s| s.contains("events (last"));
    tmux.keys(&["/", "p", "a", "y", "m", "e", "n", "t", "s", "Enter"]);
    let filtered = tmux.wait_for("filter", |s| s.contains("filter: payments"));
    assert!(filtered.contains("conntrack_invalid"));
    assert!(filtered.contains("payments/api-gateway"));
    assert!(
        !filtered.contains("idle_timeout"),
        "other pods are filtered out"
    );

    tmux.keys(&["q"]);
    let after = tmux.wait_for("after quit", |s| {
        s.lines()
            .any(|l| l.trim() == "icanon" || l.trim() == "-icanon")
    });
    assert!(after.contains("tcptrace exited with 0"));
    assert!(
        after.lines().any(|l| l.trim() == "icanon"),
        "raw mode is off again"
    );
    assert!(
        !after.contains("conntrack_invalid"),
        "the alternate screen is gone"
    );
}

#[test]
fn sigterm_restores_the_terminal() {
    if !have_tmux() {
        return;
    }
    let bin = env!("CARGO_BIN_EXE_tcptrace");
    // Paced at real time, so the replay is still running when the signal comes.
    let tmux = Tmux::start(
        "sigterm",
        &format!(
            "'{bin}' replay '{FIXTURE}' --speed 1; echo \"tcptrace exited with $?\"; \
             stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon; sleep 60"
        ),
    );
    tmux.wait_for("running", |s| s.contains("causes"));
    let shell = String::from_utf8_lossy(
        &tmux
            .run(&["display", "-p", "-t", "tui", "#{pane_pid}"])
            .stdout,
    )
    .trim()
    .to_string();
    let child = Command::new("pgrep")
        .args(["-P", &shell])
        .output()
        .expect("run pgrep");
    let pid = String::from_utf8_lossy(&child.stdout).trim().to_string();
    assert!(
        !pid.is_empty(),
        "tcptrace runs under the pane's shell {shell}"
    );
    let killed = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("run kill");
    assert!(killed.success());
    let after = tmux.wait_for("after SIGTERM", |s| {
        s.lines()
            .any(|l| l.trim() == "icanon" || l.trim() == "-icanon")
    });
    assert!(after.contains("tcptrace exited with 0"));
    assert!(
        after.lines().any(|l| l.trim() == "icanon"),
        "raw mode is off again"
    );
}

/// Without tmux the tests cannot run: they fail under CI and elsewhere pass
/// saying "skipped" (here: on stderr, run again without a terminal and
/// without tmux on PATH).
#[test]
fn without_tmux_fails_under_ci_and_says_skipped_elsewhere() {
    let again = |ci: &str| {
        let out = Command::new("setsid")
            .args(["--wait", "env", "PATH=/nonexistent"])
            .arg(format!("CI={ci}"))
            .arg(std::env::current_exe().expect("this test binary"))
            .args(["--exact", "replay_in_a_real_terminal", "--test-threads=1"])
            .stdin(std::process::Stdio::null())
            .output()
            .expect("running this test binary again");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, _) = again("true");
    assert_eq!(code, Some(101), "{stdout}");
    assert!(
        stdout.contains(
            "this test cannot run here, and under CI nothing passes by not running: \
             tmux is not installed (apt-get install -y tmux)"
        ),
        "{stdout}"
    );
    let (code, stdout, stderr) = again("");
    assert_eq!(code, Some(0), "{stdout}");
    assert_eq!(
        stderr,
        "skipped: tmux is not installed (apt-get install -y tmux)\n"
    );
}
