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
/// A stream recorded with `tcptrace --format json` while the lab caused
/// failures (see `tui::testdata::LAB_NDJSON`).
const RECORDED: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../tests/fixtures/lab-incident.ndjson"
);

/// After the TUI exits: its status and whether the tty is cooked again.
const AFTER_EXIT: &str = "echo \"tcptrace exited with $?\"; \
    stty -a | tr ' ;' '\\n\\n' | grep -x -e icanon -e -icanon; sleep 60";

/// A private tmux server with one window, killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn start(name: &str, (width, height): (u16, u16), command: &str) -> Self {
        let tmux = Self {
            socket: format!("tcptrace-test-{name}-{}", std::process::id()),
        };
        let (width, height) = (width.to_string(), height.to_string());
        let out = tmux.run(&[
            "-f",
            "/dev/null",
            "new-session",
            "-d",
            "-s",
            "tui",
            "-x",
            &width,
            "-y",
            &height,
            command,
        ]);
        assert!(out.status.success(), "tmux new-session: {out:?}");
        tmux
    }

    /// The screen with its attributes as escape sequences.
    fn screen_with_attributes(&self) -> String {
        let out = self.run(&["capture-pane", "-e", "-p", "-t", "tui"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A tmux format (`#{alternate_on}`) of the pane.
    fn pane(&self, format: &str) -> String {
        let out = self.run(&["display", "-p", "-t", "tui", format]);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Waits for the shell's lines after the TUI exits, and checks that
    /// the terminal is as it was: cooked, main screen, no mouse reports.
    fn assert_restored(&self) -> String {
        let after = self.wait_for("after quit", |s| {
            s.lines()
                .any(|l| l.trim() == "icanon" || l.trim() == "-icanon")
        });
        assert!(after.contains("tcptrace exited with 0"));
        assert!(
            after.lines().any(|l| l.trim() == "icanon"),
            "raw mode is off again"
        );
        assert_eq!(self.pane("#{alternate_on}"), "0", "main screen again");
        assert_eq!(self.pane("#{mouse_any_flag}"), "0", "mouse reports off");
        after
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
    /// clock) on two captures in a row that are the same (a capture may
    /// catch a frame half drawn), then prints and returns it.
    fn wait_for(&self, what: &str, ready: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = String::new();
        loop {
            let screen = self.screen();
            if ready(&screen) && screen == last {
                println!("--- screen: {what} ---\n{screen}");
                return screen;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; screen:\n{screen}"
            );
            last = screen;
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
    let tmux = Tmux::start(
        "keys",
        (120, 40),
        &format!("'{bin}' replay '{FIXTURE}'; {AFTER_EXIT}"),
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
    let after = tmux.assert_restored();
    assert!(
        !after.contains("conntrack_invalid"),
        "the alternate screen is gone"
    );
}

/// The details' scroll indicator, "lines 1-10 of 19", as numbers.
fn shown_lines(screen: &str) -> Option<(u32, u32, u32)> {
    let rest = &screen[screen.find(" lines ")? + 7..];
    let (first, rest) = rest.split_once('-')?;
    let (last, rest) = rest.split_once(" of ")?;
    let (total, _) = rest.split_once(',')?;
    Some((first.parse().ok()?, last.parse().ok()?, total.parse().ok()?))
}

/// The terminal most people have: a recorded incident at 80x24, the
/// details of a verdict without a destination scrolled to their end, the
/// verdict written to a file and its fix copied, then quit.
#[test]
fn recorded_incident_at_80x24() {
    if !have_tmux() {
        return;
    }
    let bin = env!("CARGO_BIN_EXE_tcptrace");
    let dir = tempfile::tempdir().expect("temp dir");
    let cwd = dir.path().display().to_string();
    let tmux = Tmux::start(
        "small",
        (80, 24),
        &format!("cd '{cwd}' && '{bin}' replay '{RECORDED}'; {AFTER_EXIT}"),
    );
    // tmux takes OSC 52 from the program into a paste buffer.
    let out = tmux.run(&["set-option", "-g", "set-clipboard", "on"]);
    assert!(out.status.success(), "tmux set-option: {out:?}");

    let board = tmux.wait_for("board", |s| s.contains("replay finished"));
    // Below 100 columns the board has the feed's height.
    assert!(!board.contains("events (last"), "no feed at 80x24");
    // 24 lines less the header (5), footer (1), borders and column names.
    let rows = board
        .lines()
        .filter(|l| l.starts_with("│  ") || l.starts_with("│> "))
        .filter(|l| l.contains(" ! ") || l.contains(" - "))
        .count();
    assert_eq!(rows, 15, "board rows with a severity mark");
    let third = board
        .lines()
        .find(|l| l.contains("conntrack table"))
        .expect("the counters' verdict names the table");
    assert!(third.contains("netns tcptrace-l"), "{third}");
    assert!(third.contains("! conntrack_table_full"), "{third}");
    assert!(third.contains('…'), "cut with a visible ellipsis: {third}");
    // Failures in red (tmux writes colour 1 as 38;5;1), benign in grey.
    let styled = tmux.screen_with_attributes();
    assert!(styled.contains("\x1b[38;5;1m! conntrack_table_full"));
    assert!(styled.contains("\x1b[38;5;8m- application_abort"));

    tmux.keys(&["j", "j", "Enter"]);
    let top = tmux.wait_for("details", |s| s.contains("lines 1-"));
    assert!(top.contains("details: conntrack_table_full"));
    assert!(top.contains("about: conntrack table of netns tcptrace-lab-15542-11-node"));
    assert!(top.contains("severity: ! failure"));
    assert!(!top.contains("fix: sysctl"), "the fix is below the fold");

    let (first, last, total) = shown_lines(&top).expect("a scroll indicator");
    assert_eq!((first, last), (1, 10), "10 lines of {total}");
    assert!(total > 10);
    tmux.keys(&["NPage"]);
    let bottom = tmux.wait_for("details scrolled", |s| {
        shown_lines(s).is_some_and(|(first, _, _)| first > 1)
    });
    assert_eq!(
        shown_lines(&bottom),
        Some((total - 9, total, total)),
        "a page down shows the last lines"
    );
    assert!(bottom.contains("fix: sysctl -w net.netfilter.nf_conntrack_max=524288"));
    assert!(bottom.contains("last events like it in this namespace"));

    tmux.keys(&["w"]);
    let name =
        "tcptrace-conntrack_table_full-netns-tcptrace-lab-15542-11-node-20261205T132910Z.json";
    let wrote = tmux.wait_for("verdict written", |s| s.contains("wrote"));
    let path = dir.path().join(name);
    // The footer wraps the path; joined, it is all there.
    let said: String = wrote
        .lines()
        .skip_while(|l| !l.starts_with("wrote"))
        .map(str::trim_end)
        .collect();
    assert_eq!(said, format!("wrote{}", path.display()));
    let text = std::fs::read_to_string(&path).expect("the verdict file");
    let doc: serde_json::Value = serde_json::from_str(&text).expect("JSON");
    let verdict = &doc["verdict"];
    assert_eq!(verdict["cause"], "conntrack_table_full");
    assert_eq!(verdict["confidence"], "certain");
    assert_eq!(verdict["netns_name"], "tcptrace-lab-15542-11-node");
    assert_eq!(verdict["evidence"]["count"], 262_144);
    assert_eq!(verdict["evidence"]["max"], 262_144);
    assert_eq!(verdict["evidence"]["drop_delta"], 1);
    assert_eq!(verdict.get("dst"), None, "no destination, as recorded");
    assert_eq!(doc["events"], serde_json::json!([]), "and no connection");

    tmux.keys(&["c"]);
    tmux.wait_for("fix copied", |s| s.contains("fix copied"));
    let buffer = tmux.run(&["show-buffer"]);
    assert_eq!(
        String::from_utf8_lossy(&buffer.stdout),
        verdict["fix"].as_str().expect("a fix")
    );

    tmux.keys(&["q"]);
    let after = tmux.assert_restored();
    assert!(!after.contains("conntrack_table_full"), "the board is gone");
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
        (120, 40),
        &format!("'{bin}' replay '{FIXTURE}' --speed 1; {AFTER_EXIT}"),
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
    tmux.assert_restored();
}

/// NO_COLOR: no colour at all, the same marks and text.
#[test]
fn no_color_keeps_the_marks() {
    if !have_tmux() {
        return;
    }
    let bin = env!("CARGO_BIN_EXE_tcptrace");
    let tmux = Tmux::start(
        "nocolor",
        (80, 24),
        &format!("NO_COLOR=1 '{bin}' replay '{RECORDED}'; {AFTER_EXIT}"),
    );
    let board = tmux.wait_for("board", |s| s.contains("replay finished"));
    assert!(board.contains("! conntrack_table_full"));
    assert!(board.contains("- application_abort"));
    let styled = tmux.screen_with_attributes();
    assert!(
        !styled.contains("38;") && !styled.contains("48;"),
        "no foreground or background colour:\n{styled}"
    );
    // Bold and reverse video stay: the selection still shows.
    assert!(styled.contains("\x1b[7m> "));
    tmux.keys(&["q"]);
    tmux.assert_restored();
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
