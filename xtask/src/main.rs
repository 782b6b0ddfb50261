//! Project tasks: `cargo xtask setup | build | run | test`.
use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// Debian packages the build and the tests need. rustc-web ships a
/// precompiled `core` for bpfel-unknown-none (no nightly, no build-std).
const RUST_WEB_VERSION: &str = "1.96.0+dfsg1-1~deb12u2";
const APT_PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "rust-web-clippy",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "bpftool",
    "iptables",
    "nftables",
    "iproute2",
    "conntrack",
    "tmux",
    "python3",
];
const PINNED: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "rust-web-clippy",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian's rustc, registered with rustup; aya-build runs it by this name.
const BPF_TOOLCHAIN: &str = "debian-rust";

#[derive(Parser)]
#[command(name = "xtask", about = "tcptrace project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install everything the build and the tests need (root, apt).
    Setup,
    /// Build tcptrace (userspace and BPF).
    Build {
        #[arg(long)]
        release: bool,
    },
    /// Set up if needed, build in release mode and run tcptrace as root.
    Run {
        /// Arguments for tcptrace.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up if needed, then fmt, clippy, unit tests, the BPF artifact test
    /// and the root integration tests.
    Test {
        /// Skip the root integration tests.
        #[arg(long)]
        no_root: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().task) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(task: Task) -> Result<()> {
    match task {
        Task::Setup => setup(),
        Task::Build { release } => build(release),
        Task::Run { args } => {
            ensure_setup()?;
            build(true)?;
            let bin = workspace_root().join("target/release/tcptrace");
            let status = Command::new(&bin)
                .args(&args)
                .status()
                .with_context(|| format!("running {}", bin.display()))?;
            if !status.success() {
                bail!("tcptrace exited with {status}");
            }
            Ok(())
        }
        Task::Test { no_root } => test(no_root),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

fn cargo() -> Command {
    let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn step(name: &str, cmd: &mut Command) -> Result<()> {
    eprintln!("xtask: {name}");
    let status = cmd
        .status()
        .with_context(|| format!("starting {name} ({cmd:?})"))?;
    if !status.success() {
        bail!("{name} failed ({status})");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn output_of(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn missing_packages() -> Vec<&'static str> {
    APT_PACKAGES
        .iter()
        .copied()
        .filter(|p| {
            output_of("dpkg-query", &["-W", "-f=${Status}", p])
                .is_none_or(|s| !s.contains("install ok installed"))
        })
        .collect()
}

fn toolchain_linked() -> bool {
    output_of("rustup", &["toolchain", "list"])
        .is_some_and(|s| s.lines().any(|l| l.starts_with(BPF_TOOLCHAIN)))
}

fn bpf_linker_ok() -> bool {
    output_of("bpf-linker", &["--version"]).is_some_and(|s| s.contains(BPF_LINKER_VERSION))
}

fn setup_complete() -> bool {
    missing_packages().is_empty() && toolchain_linked() && bpf_linker_ok()
}

fn ensure_setup() -> Result<()> {
    if setup_complete() { Ok(()) } else { setup() }
}

fn setup() -> Result<()> {
    let missing = missing_packages();
    if !missing.is_empty() {
        if !is_root() {
            bail!(
                "setup must run as root to install {}: rerun as root",
                missing.join(" ")
            );
        }
        if output_of("apt-get", &["--version"]).is_none() {
            bail!(
                "apt-get not found: install {} with your package manager (Debian 12 names)",
                missing.join(" ")
            );
        }
        step(
            "apt-get update",
            Command::new("apt-get").args(["update", "-q"]),
        )?;
        let specs: Vec<String> = missing
            .iter()
            .map(|p| {
                if PINNED.contains(p) {
                    format!("{p}={RUST_WEB_VERSION}")
                } else {
                    (*p).to_string()
                }
            })
            .collect();
        step(
            "apt-get install",
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(&specs),
        )?;
    }
    if !toolchain_linked() {
        step(
            "rustup toolchain link",
            Command::new("rustup").args(["toolchain", "link", BPF_TOOLCHAIN, "/usr"]),
        )?;
    }
    if !bpf_linker_ok() {
        // Debian's /usr/bin/llvm-config is LLVM 14; bpf-linker needs 22.
        step(
            "cargo install bpf-linker",
            cargo()
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--locked", "--no-default-features", "--features", "llvm-22"]),
        )?;
    }
    eprintln!("xtask: setup complete");
    Ok(())
}

fn build(release: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "tcptrace"]);
    if release {
        cmd.arg("--release");
    }
    step("cargo build", &mut cmd)
}

/// Clippy for the BPF crate runs with Debian's toolchain on the BPF target,
/// the way aya-build compiles it.
fn bpf_clippy() -> Command {
    let mut cmd = Command::new("rustup");
    cmd.current_dir(workspace_root())
        .env_remove("RUSTC")
        .env_remove("RUSTC_WORKSPACE_WRAPPER")
        .env("RUSTC_BOOTSTRAP", "aya_ebpf")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "--cfg=bpf_target_arch=\"x86_64\"",
        )
        .args([
            "run",
            BPF_TOOLCHAIN,
            "cargo",
            "clippy",
            "--package",
            "tcptrace-ebpf",
        ])
        .args([
            "--target",
            "bpfel-unknown-none",
            "--target-dir",
            "target/bpf-clippy",
        ])
        .args(["--", "-D", "warnings"]);
    cmd
}

fn test(no_root: bool) -> Result<()> {
    ensure_setup()?;
    step(
        "cargo fmt --check",
        cargo().args(["fmt", "--all", "--", "--check"]),
    )?;
    step(
        "cargo clippy",
        cargo()
            .args([
                "clippy",
                "--workspace",
                "--exclude",
                "tcptrace-ebpf",
                "--all-targets",
            ])
            .args(["--", "-D", "warnings"]),
    )?;
    step("cargo clippy (BPF target)", &mut bpf_clippy())?;
    // Unit tests, golden decoding, schema and the BPF ELF artifact test.
    step(
        "unit tests",
        cargo().args(["test", "--workspace"]).args([
            "--exclude",
            "tcptrace-tests",
            "--exclude",
            "tcptrace-ebpf",
        ]),
    )?;
    if no_root {
        eprintln!("xtask: root integration tests skipped (--no-root)");
        return Ok(());
    }
    if !is_root() {
        bail!(
            "the integration tests load BPF programs and need root: rerun as root or pass --no-root"
        );
    }
    build(false)?;
    step(
        "root integration tests",
        cargo()
            .env(
                "TCPTRACE_BIN",
                workspace_root().join("target/debug/tcptrace"),
            )
            .args([
                "test",
                "--package",
                "tcptrace-tests",
                "--",
                "--test-threads=1",
            ]),
    )
}
