//! What a test does when it cannot run.
use std::io::Write as _;

/// A test that cannot run (no root, a missing tool): under CI (`CI=true`)
/// it fails with `reason`; elsewhere it says so on the terminal, past the
/// test harness's output capture, and the caller returns.
pub(crate) fn cannot_run(reason: &str) {
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

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    const NAME: &str = "testing::tests::fails_under_ci_and_says_skipped_elsewhere";

    /// Runs this test again, in a session without a terminal, as one that
    /// cannot run.
    fn again(ci: Option<&str>) -> (Option<i32>, String, String) {
        let mut cmd = Command::new("setsid");
        cmd.arg("--wait")
            .arg(std::env::current_exe().expect("this test binary"))
            .args(["--exact", NAME, "--test-threads=1"])
            .env("TCPTRACE_CANNOT_RUN", "a missing tool")
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
    }

    #[test]
    fn fails_under_ci_and_says_skipped_elsewhere() {
        if let Ok(reason) = std::env::var("TCPTRACE_CANNOT_RUN") {
            return cannot_run(&reason);
        }
        let (code, stdout, _) = again(Some("true"));
        assert_eq!(code, Some(101), "{stdout}");
        assert!(
            stdout.contains(
                "this test cannot run here, and under CI nothing passes by not running: \
                 a missing tool"
            ),
            "{stdout}"
        );
        let (code, stdout, stderr) = again(None);
        assert_eq!(code, Some(0), "{stdout}");
        assert_eq!(stderr, "skipped: a missing tool\n");
    }
}
