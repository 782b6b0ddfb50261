//! Every numeric flag of every subcommand, given a bad value, is a usage
//! error: exit code 2 and one sentence that says what to give instead,
//! before anything is loaded (no root needed).
use std::process::{Command, Output};

fn tcptrace(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tcptrace"))
        .args(args)
        .output()
        .expect("running tcptrace")
}

/// A numeric flag: the arguments before it, its name as clap shows it and
/// the range it accepts.
struct Flag {
    before: &'static [&'static str],
    flag: &'static str,
    value_name: &'static str,
    range: &'static str,
    integer: bool,
}

const FLAGS: &[Flag] = &[
    Flag {
        before: &[],
        flag: "--duration",
        value_name: "<SECS>",
        range: "a number of seconds from 0.1 to 31536000",
        integer: false,
    },
    Flag {
        before: &[],
        flag: "--stats-interval",
        value_name: "<SECS>",
        range: "a number of seconds from 0.1 to 31536000",
        integer: false,
    },
    Flag {
        before: &[],
        flag: "--facts-interval",
        value_name: "<SECS>",
        range: "a number of seconds from 0.5 to 31536000",
        integer: false,
    },
    Flag {
        before: &[],
        flag: "--ring-buffer-size",
        value_name: "<BYTES>",
        range: "a size in bytes from 4096 to 1073741824",
        integer: true,
    },
    Flag {
        before: &[],
        flag: "--middlebox-timeout",
        value_name: "<SECS>",
        range: "a number of seconds from 1 to 31536000",
        integer: true,
    },
    Flag {
        before: &["audit"],
        flag: "--middlebox-timeout",
        value_name: "<SECS>",
        range: "a number of seconds from 1 to 31536000",
        integer: true,
    },
    Flag {
        before: &[],
        flag: "--nodeport",
        value_name: "<PORT[=SERVICE]>",
        range: "a port from 1 to 65535",
        integer: true,
    },
    Flag {
        before: &["audit"],
        flag: "--nodeport",
        value_name: "<PORT[=SERVICE]>",
        range: "a port from 1 to 65535",
        integer: true,
    },
    Flag {
        before: &["replay", "-"],
        flag: "--speed",
        value_name: "<SPEED>",
        range: "a speed from 0 to 1000000",
        integer: false,
    },
];

#[derive(Clone, Copy)]
enum Why {
    OutOfRange,
    NotANumber,
}

#[test]
fn every_bad_numeric_value_is_a_usage_error() {
    const HUGE: &str = "99999999999999999999999";
    let mut tried = 0;
    for f in FLAGS {
        let inf = if f.integer {
            Why::NotANumber
        } else {
            Why::OutOfRange
        };
        let mut cases = vec![
            ("-1", Why::OutOfRange),
            ("inf", inf),
            ("nan", Why::NotANumber),
            (HUGE, Why::OutOfRange),
            ("ten", Why::NotANumber),
            ("", Why::NotANumber),
        ];
        // A replay speed of 0 means "as fast as possible".
        if f.flag != "--speed" {
            cases.push(("0", Why::OutOfRange));
        }
        for (value, why) in cases {
            let mut args = f.before.to_vec();
            args.extend([f.flag, value]);
            let out = tcptrace(&args);
            let reason = match why {
                Why::OutOfRange => format!("{value} is out of range: use {}", f.range),
                Why::NotANumber => format!("{value:?} is not a number: use {}", f.range),
            };
            assert_eq!(
                String::from_utf8_lossy(&out.stderr),
                format!(
                    "error: invalid value '{value}' for '{} {}': {reason}\n\n\
                     For more information, try '--help'.\n",
                    f.flag, f.value_name
                ),
                "tcptrace {args:?}"
            );
            assert_eq!(out.status.code(), Some(2), "tcptrace {args:?}");
            assert!(out.stdout.is_empty(), "tcptrace {args:?}");
            tried += 1;
        }
    }
    assert_eq!(tried, 62);
}

#[test]
fn a_ring_buffer_size_must_be_a_power_of_two() {
    let out = tcptrace(&["--ring-buffer-size", "5000"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "error: invalid value '5000' for '--ring-buffer-size <BYTES>': 5000 is not a power of \
         two: use 4096, 8192, ... up to 1073741824\n\nFor more information, try '--help'.\n"
    );
}

/// The scenarios `tcptrace selftest` knows, as its usage error lists them.
fn known_scenarios() -> Vec<String> {
    let out = tcptrace(&["selftest", "port_exhaustion", "no_such_failure"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let first = stderr.lines().next().unwrap_or_default();
    let list = first
        .strip_prefix("error: unknown scenario \"no_such_failure\": choose from ")
        .unwrap_or_else(|| panic!("unexpected usage error:\n{stderr}"));
    list.split(", ").map(str::to_string).collect()
}

#[test]
fn an_unknown_scenario_is_a_usage_error_that_lists_the_known_ones() {
    assert_eq!(
        known_scenarios(),
        [
            "port_exhaustion",
            "connection_refused",
            "service_no_endpoints",
            "firewall_reject",
            "snat_port_exhaustion",
            "pmtu_black_hole",
            "syn_timeout",
            "keepalive_race",
            "application_abort",
            "netfilter_drop",
            "idle_timeout",
            "nodeport_collision",
            "conntrack_invalid",
            "tcp_stack_drop",
            "listen_overflow",
            "conntrack_table_full",
        ]
    );
}

/// The list in `tcptrace selftest --help` is written by hand: it must be the
/// lab's.
#[test]
fn selftest_help_lists_every_scenario() {
    let out = tcptrace(&["selftest", "--help"]);
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8_lossy(&out.stdout).replace('\n', " ");
    let listed = help
        .split_once("Scenarios to run (default: all): ")
        .and_then(|(_, rest)| rest.split_once("Options:"))
        .map(|(list, _)| {
            list.split(',')
                .map(|s| s.split_whitespace().collect::<String>())
                .collect::<Vec<_>>()
        })
        .unwrap_or_else(|| panic!("no scenario list in:\n{help}"));
    assert_eq!(listed, known_scenarios());
}

/// README.md's usage names every flag the command has.
#[test]
fn readme_names_every_flag() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md"))
        .expect("README.md");
    let mut missing = Vec::new();
    for sub in [
        None,
        Some("probes"),
        Some("audit"),
        Some("replay"),
        Some("selftest"),
    ] {
        let args: Vec<&str> = sub.into_iter().chain(["--help"]).collect();
        let out = tcptrace(&args);
        assert_eq!(out.status.code(), Some(0));
        let help = String::from_utf8_lossy(&out.stdout).into_owned();
        for word in help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-')) {
            let flag = word.trim_end_matches('-');
            if flag.len() > 2
                && flag.starts_with("--")
                && !["--help", "--version"].contains(&flag)
                && !readme.contains(flag)
            {
                missing.push(format!("{} {flag}", sub.unwrap_or("tcptrace")));
            }
        }
    }
    assert_eq!(
        missing,
        Vec::<String>::new(),
        "flags README.md does not name"
    );
}
