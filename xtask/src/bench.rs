//! `cargo xtask bench [--smoke]`: criterion benches of the userspace
//! pipeline, then `tcptrace-bench` (root: workload overhead against
//! bpftrace, losses, BPF program cost, startup), which writes
//! BENCHMARKS.md and bench/results-<UTC date>.json. `--soak [MINUTES]`:
//! the endurance run instead, and longer fuzzing.
use std::{path::Path, process::Command};

use anyhow::{Result, bail};

use super::{cargo, is_root, output_of, step, workspace_root};

/// Where a smoke run writes (never over the committed results).
const SMOKE_OUT: &str = "target/bench-smoke";

/// The criterion benches of the userspace pipeline.
const CRITERION_BENCHES: [&str; 4] = ["--bench", "pipeline", "--bench", "attribution"];

pub fn bench(smoke: bool) -> Result<()> {
    crate::setup::ensure()?;
    if !is_root() {
        bail!("the benchmarks load BPF programs and create network namespaces: rerun as root");
    }
    // bpftrace needs tracefs; it is mounted where only this run sees it.
    crate::private_mounts()?;
    crate::mount_tracefs()?;
    let root = workspace_root();
    let profile = if smoke {
        // Numbers from a smoke run mean nothing: a debug build is enough
        // to show every phase runs, and CI has one already.
        step(
            "cargo build (bench, debug)",
            cargo().args(["build", "-p", "tcptrace-cli", "-p", "tcptrace-bench"]),
        )?;
        step(
            "criterion benches (test mode)",
            cargo()
                .args(["test", "-p", "tcptrace"])
                .args(CRITERION_BENCHES),
        )?;
        "debug"
    } else {
        ensure_bpftrace()?;
        build_release()?;
        step(
            "criterion benches",
            cargo()
                .args(["bench", "-p", "tcptrace"])
                .args(CRITERION_BENCHES),
        )?;
        "release"
    };
    let target = crate::target_dir().join(profile);
    let mut cmd = Command::new(target.join("tcptrace-bench"));
    cmd.current_dir(&root)
        .arg("--tcptrace")
        .arg(target.join("tcptrace"));
    if smoke {
        cmd.arg("--smoke")
            .arg("--out-dir")
            .arg(root.join(SMOKE_OUT));
    } else {
        cmd.arg("--out-dir")
            .arg(root.join("bench"))
            .arg("--markdown")
            .arg(root.join("BENCHMARKS.md"))
            .arg("--criterion-dir")
            .arg(root.join("target/criterion"));
    }
    if smoke {
        // A stale results file must not pass the check below.
        let _ = std::fs::remove_dir_all(root.join(SMOKE_OUT));
    }
    step("tcptrace-bench", &mut cmd)?;
    if smoke {
        check_smoke_output(&root.join(SMOKE_OUT))?;
    }
    Ok(())
}

/// Seconds per fuzz target after a soak.
const SOAK_FUZZ_SECONDS: u32 = 300;

/// `tcptrace-bench --soak`: a release tcptrace for `minutes` under churn
/// and bursts, added to BENCHMARKS.md; then each fuzz target for longer
/// than CI runs it.
pub fn soak(minutes: u64) -> Result<()> {
    crate::setup::ensure()?;
    if !is_root() {
        bail!("the soak loads BPF programs and creates network namespaces: rerun as root");
    }
    crate::private_mounts()?;
    build_release()?;
    let root = workspace_root();
    let target = crate::target_dir().join("release");
    step(
        &format!("tcptrace-bench --soak {minutes}"),
        Command::new(target.join("tcptrace-bench"))
            .current_dir(&root)
            .arg("--tcptrace")
            .arg(target.join("tcptrace"))
            .args(["--soak", &minutes.to_string()])
            .arg("--out-dir")
            .arg(root.join("bench"))
            .arg("--markdown")
            .arg(root.join("BENCHMARKS.md")),
    )?;
    crate::fuzz::fuzz(SOAK_FUZZ_SECONDS, &[])
}

/// bpftrace is the comparison of a full run (Debian package `bpftrace`).
fn ensure_bpftrace() -> Result<()> {
    if output_of("bpftrace", &["--version"]).is_some() {
        return Ok(());
    }
    crate::apt::install(&["bpftrace"])
}

/// The smoke run must leave a results file and a report behind.
fn check_smoke_output(dir: &Path) -> Result<()> {
    let results = std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with("results-") && name.ends_with(".json")
        })
        .filter(|e| e.metadata().is_ok_and(|m| m.len() > 0))
        .count();
    if results == 0 || !dir.join("BENCHMARKS.md").is_file() {
        bail!(
            "tcptrace-bench --smoke wrote no results-*.json or BENCHMARKS.md in {}",
            dir.display()
        );
    }
    eprintln!("xtask: bench smoke results in {}", dir.display());
    Ok(())
}

/// The release binaries the measurements run.
fn build_release() -> Result<()> {
    step(
        "cargo build --release (tcptrace, tcptrace-bench)",
        cargo().args([
            "build",
            "--release",
            "-p",
            "tcptrace-cli",
            "-p",
            "tcptrace-bench",
        ]),
    )
}
