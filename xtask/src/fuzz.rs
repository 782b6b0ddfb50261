//! `cargo xtask fuzz`: the cargo fuzz targets of tcptrace/fuzz (libFuzzer,
//! nightly, AddressSanitizer), each started from the project's fixtures and
//! run for a while; their corpora grow in target/fuzz-corpus across runs.
use std::{fs, path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{step, target_dir, workspace_root};

/// The nightly toolchain cargo fuzz builds with (the machine's own).
const NIGHTLY: &str = "nightly";

/// Each target and the fixtures it starts from (relative to the workspace).
const TARGETS: &[(&str, &[&str])] = &[
    ("decode", &["tcptrace/fuzz/seeds/decode-record"]),
    (
        "replay",
        &[
            "tcptrace/tests/fixtures/records.ndjson",
            "tcptrace/tests/fixtures/incident.ndjson",
        ],
    ),
    (
        "cgroup",
        &[
            "tcptrace/src/attribution/fixtures/proc-cgroup-v1-hybrid",
            "tcptrace/src/attribution/fixtures/proc-cgroup-v2",
        ],
    ),
    (
        "kube_proxy",
        &[
            "tcptrace/src/attribution/fixtures/iptables-save-nat",
            "tcptrace/src/attribution/fixtures/nft-ruleset.json",
        ],
    ),
    ("ipvs", &["tcptrace/src/attribution/fixtures/ip_vs"]),
];

/// Runs every target (or those named) for `seconds` each.
pub fn fuzz(seconds: u32, only: &[String]) -> Result<()> {
    if let Some(unknown) = only
        .iter()
        .find(|t| !TARGETS.iter().any(|(name, _)| name == t))
    {
        let names: Vec<_> = TARGETS.iter().map(|(n, _)| *n).collect();
        bail!(
            "no fuzz target {unknown}: the targets are {}",
            names.join(", ")
        );
    }
    ensure_cargo_fuzz()?;
    let root = workspace_root();
    for (name, seeds) in TARGETS {
        if !only.is_empty() && !only.iter().any(|t| t == name) {
            continue;
        }
        let corpus = target_dir().join("fuzz-corpus").join(name);
        fs::create_dir_all(&corpus).with_context(|| format!("creating {}", corpus.display()))?;
        for seed in *seeds {
            let from = root.join(seed);
            let file = Path::new(seed).file_name().context("a seed names a file")?;
            fs::copy(&from, corpus.join(file))
                .with_context(|| format!("copying the seed {}", from.display()))?;
        }
        let artifacts = target_dir().join("fuzz-artifacts").join(name);
        fs::create_dir_all(&artifacts)
            .with_context(|| format!("creating {}", artifacts.display()))?;
        let result = step(
            &format!("cargo fuzz run {name} ({seconds} s)"),
            cargo_fuzz()
                .args(["run", "--fuzz-dir", "tcptrace/fuzz", "--target-dir"])
                .arg(target_dir().join("fuzz"))
                .arg(name)
                .arg(&corpus)
                .arg("--")
                .arg(format!("-max_total_time={seconds}"))
                .arg(format!("-artifact_prefix={}/", artifacts.display()))
                .args(["-rss_limit_mb=2048", "-timeout=10", "-print_final_stats=1"]),
        );
        if let Err(e) = result {
            bail!(
                "{e:#}: the input that failed is in {} (run it again with \
                 `cargo +{NIGHTLY} fuzz run --fuzz-dir tcptrace/fuzz {name} FILE`)",
                artifacts.display()
            );
        }
    }
    Ok(())
}

/// `cargo +nightly fuzz` (the stable rustc cargo xtask runs under left
/// out).
fn cargo_fuzz() -> Command {
    let mut cmd = Command::new("cargo");
    cmd.current_dir(workspace_root())
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .arg(format!("+{NIGHTLY}"))
        .arg("fuzz");
    cmd
}

/// Installs cargo-fuzz from crates.io when it is missing.
fn ensure_cargo_fuzz() -> Result<()> {
    let have = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if have {
        return Ok(());
    }
    step(
        "cargo install cargo-fuzz",
        Command::new("cargo").args(["install", "--locked", "cargo-fuzz"]),
    )
}
