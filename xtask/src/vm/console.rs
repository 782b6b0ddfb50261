//! What a kernel run reported: the guest's console (or the host run's
//! output in the same shape) parsed between `@@vm` markers.
use std::time::Duration;

use serde_json::Value;

use super::MARK;

/// What one kernel run produced.
#[derive(Default)]
pub(super) struct KernelReport {
    pub(super) label: String,
    pub(super) release: String,
    pub(super) package: String,
    pub(super) accel: String,
    pub(super) prepare: Duration,
    pub(super) run: Duration,
    pub(super) suites: Vec<Suite>,
    pub(super) probes: Vec<Probe>,
    pub(super) selftest: Vec<SelftestCase>,
    /// Why the run could not complete (timeout, boot failure...).
    pub(super) error: Option<String>,
}

/// One case of `tcptrace selftest --format json`.
pub(super) struct SelftestCase {
    pub(super) scenario: String,
    pub(super) case: String,
    pub(super) result: String,
}

/// One integration-test binary's libtest results.
#[derive(Default)]
pub(super) struct Suite {
    pub(super) name: String,
    pub(super) passed: u32,
    pub(super) failed: u32,
    pub(super) ignored: u32,
    pub(super) failures: Vec<String>,
    pub(super) exit: Option<i32>,
}

/// One hook of `tcptrace probes --format json`.
pub(super) struct Probe {
    pub(super) hook: String,
    pub(super) tier: String,
    pub(super) state: String,
}

impl KernelReport {
    pub(super) fn ok(&self) -> bool {
        self.error.is_none()
            && !self.suites.is_empty()
            && self
                .suites
                .iter()
                .all(|s| s.failed == 0 && s.exit == Some(0))
            && !self.selftest.is_empty()
            && self.selftest.iter().all(|c| c.result == "pass")
    }

    /// "7 of 7 pass" (or which cases did not).
    pub(super) fn selftest_summary(&self) -> String {
        if self.selftest.is_empty() {
            return "no selftest report".into();
        }
        let bad: Vec<String> = self
            .selftest
            .iter()
            .filter(|c| c.result != "pass")
            .map(|c| format!("{}/{}: {}", c.scenario, c.case, c.result))
            .collect();
        let n = self.selftest.len();
        if bad.is_empty() {
            format!("{n} of {n} cases pass")
        } else {
            format!("{} of {n} cases pass ({})", n - bad.len(), bad.join(", "))
        }
    }

    pub(super) fn result(&self) -> String {
        if let Some(e) = &self.error {
            return format!("error: {e}");
        }
        let passed: u32 = self.suites.iter().map(|s| s.passed).sum();
        let failed: u32 = self.suites.iter().map(|s| s.failed).sum();
        let status = if self.ok() { "pass" } else { "FAIL" };
        format!("{status} ({passed} passed, {failed} failed)")
    }
}

pub(super) fn parse_console(console: &str) -> KernelReport {
    let mut report = KernelReport::default();
    let mut probes_json: Option<String> = None;
    let mut in_selftest = false;
    let mut current: Option<Suite> = None;
    for line in console.lines() {
        if let Some(json) = probes_json.as_mut() {
            if line.starts_with(MARK) {
                report.probes = parse_probes(json);
                probes_json = None;
            } else {
                json.push_str(line);
                json.push('\n');
                continue;
            }
        }
        if let Some(rest) = line.strip_prefix(MARK) {
            let (word, arg) = rest.split_once(' ').unwrap_or((rest, ""));
            match word {
                "selftest-begin" => in_selftest = true,
                "selftest-end" => in_selftest = false,
                "release" => report.release = arg.to_string(),
                "accel" => report.accel = arg.to_string(),
                "probes-begin" => probes_json = Some(String::new()),
                "suite-begin" => {
                    current = Some(Suite {
                        name: arg.to_string(),
                        ..Suite::default()
                    });
                }
                "suite-end" => {
                    if let Some(mut s) = current.take() {
                        s.exit = arg.rsplit(' ').next().and_then(|c| c.parse().ok());
                        report.suites.push(s);
                    }
                }
                _ => {}
            }
        } else if in_selftest {
            report.selftest.extend(parse_selftest_line(line));
        } else if let Some(s) = current.as_mut() {
            parse_test_line(s, line);
        }
    }
    if let Some(s) = current.take() {
        report.suites.push(s);
    }
    report
}

/// A `tcptrace selftest --format json` line; other console lines are not.
fn parse_selftest_line(line: &str) -> Option<SelftestCase> {
    let v: Value = serde_json::from_str(line.trim()).ok()?;
    let text = |k: &str| v[k].as_str().map(str::to_string);
    Some(SelftestCase {
        scenario: text("scenario")?,
        case: text("case")?,
        result: text("result")?,
    })
}

/// libtest lines: "test name ... FAILED" and "test result: ok. 3 passed; ...".
fn parse_test_line(suite: &mut Suite, line: &str) {
    if let Some(name) = line
        .strip_prefix("test ")
        .and_then(|l| l.strip_suffix(" ... FAILED"))
    {
        suite.failures.push(name.to_string());
    }
    if let Some(rest) = line.strip_prefix("test result: ") {
        for part in rest.split(['.', ';']) {
            let mut words = part.split_whitespace();
            if let (Some(n), Some(what)) = (words.next(), words.next())
                && let Ok(n) = n.parse::<u32>()
            {
                match what {
                    "passed" => suite.passed += n,
                    "failed" => suite.failed += n,
                    "ignored" => suite.ignored += n,
                    _ => {}
                }
            }
        }
    }
}

/// `tcptrace probes --format json`: `{"hooks": [...], "tick": {...}}`,
/// each hook an object with at least `hook`, `tier` and `status` (and
/// `reason` when not attached).
fn parse_probes(json: &str) -> Vec<Probe> {
    let start = json.find('{').unwrap_or(0);
    let parsed = serde_json::from_str::<Value>(&json[start..]).ok();
    let Some(Value::Array(items)) = parsed.as_ref().map(|v| &v["hooks"]) else {
        return vec![Probe {
            hook: "(probes output)".into(),
            tier: "-".into(),
            state: format!(
                "unparsable: {}",
                json.trim().chars().take(200).collect::<String>()
            ),
        }];
    };
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    items
        .iter()
        .map(|p| {
            let status = text(&p["status"]);
            let reason = text(&p["reason"]);
            Probe {
                hook: text(&p["hook"]),
                tier: text(&p["tier"]),
                // A table cell: no column separator, one line.
                state: if reason.is_empty() {
                    status
                } else {
                    format!("{status}: {}", reason.replace('|', "/").replace('\n', " "))
                },
            }
        })
        // The tick rate as a row of its own: its value and its source.
        .chain(parsed.as_ref().and_then(|v| {
            let tick = &v["tick"];
            tick["hz"].as_u64().map(|hz| Probe {
                hook: "(tick rate)".into(),
                tier: text(&tick["source"]["kind"]),
                state: format!("{hz} Hz"),
            })
        }))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_summary_is_counted() {
        let mut s = Suite {
            name: "capture".into(),
            passed: 0,
            failed: 0,
            ignored: 0,
            failures: Vec::new(),
            exit: None,
        };
        parse_test_line(&mut s, "test a::b ... FAILED");
        parse_test_line(
            &mut s,
            "test result: FAILED. 6 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 9.01s",
        );
        assert_eq!((s.passed, s.failed, s.ignored), (6, 1, 2));
        assert_eq!(s.failures, ["a::b"]);
    }

    #[test]
    fn console_markers_are_parsed() {
        let console = "noise\n@@vm release 6.1.0-56-cloud-amd64\n@@vm probes-begin\n{\"hooks\":[{\"hook\":\"h\",\"tier\":\"kprobe\",\"status\":\"unavailable\",\"reason\":\"no\"}],\"tick\":{\"hz\":250,\"source\":{\"kind\":\"measured\"}}}\n@@vm probes-end 0\n@@vm selftest-begin\n{\"scenario\":\"syn_timeout\",\"case\":\"dropped\",\"expected\":\"syn_timeout\",\"got\":\"syn_timeout\",\"result\":\"pass\",\"seconds\":1.8}\nnot json\n{\"scenario\":\"syn_timeout\",\"case\":\"control\",\"result\":\"FAIL\"}\n@@vm selftest-end 1\n@@vm suite-begin capture\ntest result: ok. 7 passed; 0 failed; 0 ignored\n@@vm suite-end capture 0\n@@vm done\n";
        let r = parse_console(console);
        assert_eq!(r.release, "6.1.0-56-cloud-amd64");
        assert_eq!(r.probes.len(), 2);
        assert_eq!(r.probes[0].state, "unavailable: no");
        assert_eq!(
            (r.probes[1].hook.as_str(), r.probes[1].tier.as_str()),
            ("(tick rate)", "measured")
        );
        assert_eq!(r.probes[1].state, "250 Hz");
        assert_eq!(r.suites[0].passed, 7);
        assert_eq!(r.suites[0].exit, Some(0));
        assert_eq!(r.selftest.len(), 2);
        assert_eq!(
            r.selftest_summary(),
            "1 of 2 cases pass (syn_timeout/control: FAIL)"
        );
        assert!(!r.ok(), "a failed selftest case fails the kernel");
    }
}
