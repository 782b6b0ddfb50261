//! Project tasks: `cargo xtask setup | build | run | test`.
use std::{
    env,
    path::{Path, PathBuf},
    process::{Command, ExitCode},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

mod apt;
mod bench;
mod docker;
mod elf;
mod fuzz;
mod kind;
mod kind_cluster;
mod kselftest;
mod setup;
mod vm;

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
        /// A release build linked statically (glibc static-pie), which runs on
        /// any x86-64 Linux node: target/x86_64-unknown-linux-gnu/release/tcptrace.
        #[arg(long = "static", conflicts_with = "release")]
        static_: bool,
    },
    /// Set up if needed, build in release mode and run tcptrace as root.
    Run {
        /// Arguments for tcptrace.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Set up if needed, then fmt, clippy, unit tests, the BPF artifact test,
    /// 10 s of each fuzz target, the root integration tests, and the direct tier on Debian's 6.1
    /// kernel in a VM (`vm-test --kernel 6.1 --suite vm --suite capture`).
    Test {
        /// Skip the root integration tests (and the VM).
        #[arg(long)]
        no_root: bool,
        /// Skip the VM (about 3 minutes without KVM).
        #[arg(long)]
        no_vm: bool,
    },
    /// Benchmarks (root): workload overhead vs bpftrace, losses, BPF program
    /// cost, pipeline and startup; writes BENCHMARKS.md and
    /// bench/results-<date>.json.
    Bench {
        /// Seconds-long check that every phase runs (numbers mean nothing);
        /// writes to target/bench-smoke.
        #[arg(long, conflicts_with = "soak")]
        smoke: bool,
        /// Instead: tcptrace for this many minutes under healthy churn and
        /// failure bursts (RSS, CPU and map fill every 5 minutes, into
        /// BENCHMARKS.md), then 5 minutes of each fuzz target.
        #[arg(long, value_name = "MINUTES", num_args = 0..=1, default_missing_value = "30")]
        soak: Option<u64>,
    },
    /// The cargo fuzz targets (tcptrace/fuzz: the ring-buffer decoder, the
    /// NDJSON replay reader, the cgroup, kube-proxy and IPVS parsers), each
    /// for a while, from the project's fixtures; installs cargo-fuzz.
    Fuzz {
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        seconds: u32,
        /// Only these targets.
        targets: Vec<String>,
    },
    /// The Docker engine and the agent image (root).
    Docker {
        #[command(subcommand)]
        action: DockerAction,
    },
    /// A kind-shaped cluster on this machine's Docker engine (root): node
    /// containers labelled as kind labels them, pods inside, no registry.
    KindCluster {
        #[command(subcommand)]
        action: ClusterAction,
    },
    /// The kernel's own network selftests (Debian's linux-source-6.1) under
    /// tcptrace (root): the `kselftest` suite, writing docs/kselftests.md.
    Kselftest,
    /// Boot Debian's 6.1 / 6.12 kernels in qemu and run the root integration
    /// tests inside; `--kernel all` also runs them on the host and writes
    /// docs/kernel-matrix.md.
    VmTest(vm::VmTestArgs),
    /// Run the static tcptrace on every node of a kind cluster (docker exec),
    /// scoped to each node, with their NDJSON merged and tagged by "node".
    Kind(KindArgs),
}

#[derive(clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
struct KindArgs {
    #[command(subcommand)]
    action: Option<KindAction>,
    /// The kind cluster.
    #[arg(long, default_value = "kind", global = true)]
    name: String,
    /// Only these nodes (default: every node).
    #[arg(long, value_delimiter = ',', value_name = "NODE,...", global = true)]
    nodes: Vec<String>,
    /// Open the live TUI of this node on this terminal.
    #[arg(long, value_name = "NODE", conflicts_with_all = ["nodes", "detach"])]
    tui: Option<String>,
    /// Start background agents (NDJSON in each node's /var/log/tcptrace.ndjson).
    #[arg(long)]
    detach: bool,
    /// Arguments for tcptrace.
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(Subcommand)]
enum DockerAction {
    /// Build deploy/Containerfile as tcptrace:0.1.0 (on a Debian 12 base
    /// made here: no registry), starting dockerd when none runs.
    AgentImage,
    /// Remove the agent image and its base, stop the dockerd xtask started.
    Down,
}

#[derive(Subcommand)]
enum ClusterAction {
    /// Start the nodes (and dockerd, when none runs).
    Up {
        #[arg(long, default_value = "kind")]
        name: String,
        #[arg(long, default_value_t = 2)]
        nodes: u8,
    },
    /// Remove the nodes, their network, the image and the dockerd `up`
    /// started.
    Down {
        #[arg(long, default_value = "kind")]
        name: String,
    },
}

#[derive(Subcommand)]
enum KindAction {
    /// Stop the agents started with --detach.
    Stop,
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
        Task::Setup => setup::setup(),
        Task::Build { release, static_ } => {
            if static_ {
                build_static().map(|_| ())
            } else {
                build(release)
            }
        }
        Task::Run { args } => {
            setup::ensure()?;
            build(true)?;
            let bin = target_dir().join("release/tcptrace");
            let status = Command::new(&bin)
                .args(&args)
                .status()
                .with_context(|| format!("running {}", bin.display()))?;
            if !status.success() {
                bail!("tcptrace exited with {status}");
            }
            Ok(())
        }
        Task::Test { no_root, no_vm } => test(no_root, no_vm),
        Task::Bench { smoke, soak: None } => bench::bench(smoke),
        Task::Bench {
            soak: Some(minutes),
            ..
        } => bench::soak(minutes),
        Task::Kselftest => kselftest_suite(),
        Task::Fuzz { seconds, targets } => fuzz::fuzz(seconds, &targets),
        Task::Docker { action } => match action {
            DockerAction::AgentImage => {
                setup::ensure()?;
                docker::agent_image(&build_static()?)
            }
            DockerAction::Down => docker::down(),
        },
        Task::KindCluster { action } => match action {
            ClusterAction::Up { name, nodes } => {
                setup::ensure()?;
                kind_cluster::up(&kind_cluster::Options { name, nodes })
            }
            ClusterAction::Down { name } => kind_cluster::down(&name),
        },
        Task::VmTest(args) => vm::vm_test(&args),
        Task::Kind(k) => match k.action {
            Some(KindAction::Stop) => kind::stop(&k.name, &k.nodes),
            None => kind::run(
                &kind::Options {
                    cluster: k.name,
                    nodes: k.nodes,
                    tui: k.tui,
                    detach: k.detach,
                    args: k.args,
                },
                || {
                    setup::ensure()?;
                    build_static()
                },
            ),
        },
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where cargo puts build output ($CARGO_TARGET_DIR, else <workspace>/target).
fn target_dir() -> PathBuf {
    env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
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

fn build(release: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.args(["build", "--package", "tcptrace-cli"]);
    if release {
        cmd.arg("--release");
    }
    step("cargo build", &mut cmd)
}

/// Builds the statically linked tcptrace and checks it has no loader and no
/// shared-library dependency. glibc static-pie (`+crt-static` on the gnu
/// target): rustup cannot download the musl std here and Debian ships none.
/// tcptrace does no name lookups, so glibc's NSS caveat does not apply.
/// `--target` keeps the flag off build scripts and the BPF build.
fn build_static() -> Result<PathBuf> {
    let target = "x86_64-unknown-linux-gnu";
    step(
        "cargo build --static",
        cargo()
            .env(
                "CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS",
                "-C target-feature=+crt-static",
            )
            .args([
                "build",
                "--release",
                "--package",
                "tcptrace-cli",
                "--target",
                target,
            ]),
    )?;
    let bin = target_dir().join(format!("{target}/release/tcptrace"));
    check_static(&bin)?;
    eprintln!("xtask: static binary: {}", bin.display());
    Ok(bin)
}

fn check_static(bin: &Path) -> Result<()> {
    let bytes = std::fs::read(bin).with_context(|| format!("reading {}", bin.display()))?;
    let linkage = elf::linkage(&bytes).with_context(|| format!("reading {}", bin.display()))?;
    if !linkage.is_static() {
        bail!(
            "{} is not static (loader {:?}, {} shared libraries)",
            bin.display(),
            linkage.interpreter,
            linkage.needed
        );
    }
    Ok(())
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
            setup::BPF_TOOLCHAIN,
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

/// Seconds per fuzz target in `cargo xtask test`.
const CI_FUZZ_SECONDS: u32 = 10;

fn test(no_root: bool, no_vm: bool) -> Result<()> {
    setup::ensure()?;
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
    // The readers of outside input, briefly: a crash found fails the run.
    fuzz::fuzz(CI_FUZZ_SECONDS, &[])?;
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
    // The kind test runs `cargo xtask kind`, which ships the static binary.
    build_static()?;
    let selftests = kselftest::prepare()?;
    // What the tests and tcptrace mount (tracefs, network namespaces) stays
    // in a mount namespace of this run's own and is gone with it.
    private_mounts()?;
    step(
        "root integration tests",
        cargo()
            .env("TCPTRACE_BIN", target_dir().join("debug/tcptrace"))
            .env("TCPTRACE_XTASK", env::current_exe()?)
            .env("TCPTRACE_KSELFTESTS", selftests.env_value())
            .args([
                "test",
                "--package",
                "tcptrace-tests",
                "--",
                "--test-threads=1",
            ]),
    )?;
    bench::bench(true)?;
    static_smoke_test()?;
    if no_vm {
        eprintln!("xtask: VM test skipped (--no-vm)");
        return Ok(());
    }
    vm::vm_test(&vm::VmTestArgs::ci())
}

/// Runs the kernel's selftests under tcptrace and writes their table to
/// docs/kselftests.md.
fn kselftest_suite() -> Result<()> {
    if !is_root() {
        bail!("the kernel selftests make network namespaces and load BPF programs: run as root");
    }
    setup::ensure()?;
    build(false)?;
    let selftests = kselftest::prepare()?;
    if let kselftest::Selftests::Unavailable(why) = &selftests {
        bail!("the kernel selftests are unavailable: {why}");
    }
    private_mounts()?;
    step(
        "kernel selftests under tcptrace",
        cargo()
            .env("TCPTRACE_BIN", target_dir().join("debug/tcptrace"))
            .env("TCPTRACE_KSELFTESTS", selftests.env_value())
            .env(
                "TCPTRACE_KSELFTEST_REPORT",
                workspace_root().join("docs/kselftests.md"),
            )
            .args([
                "test",
                "--package",
                "tcptrace-tests",
                "--test",
                "kselftest",
                "--",
                "--test-threads=1",
            ]),
    )
}

/// Moves this process (and what it starts) into a mount namespace of its
/// own: its mounts do not propagate to the host's, the host's (network
/// namespaces made outside) still reach it.
pub(crate) fn private_mounts() -> Result<()> {
    use nix::{mount::MsFlags, sched::CloneFlags};
    nix::sched::unshare(CloneFlags::CLONE_NEWNS).context("unshare(CLONE_NEWNS)")?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )
    .context("making / a slave in the test mount namespace")
}

/// tracefs in this process's (private) mount namespace, for tools that do
/// not mount it themselves (bpftrace).
pub(crate) fn mount_tracefs() -> Result<()> {
    let root = Path::new("/sys/kernel/tracing");
    if root.join("events").is_dir() {
        return Ok(());
    }
    nix::mount::mount(
        Some("nodev"),
        root,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .context("mounting tracefs at /sys/kernel/tracing")
}

/// The binary shipped to nodes (`build --static`, also used by `kind` and
/// deploy/Containerfile): static, and it loads and attaches from a clean
/// directory. A second release build (about 2 minutes cold).
fn static_smoke_test() -> Result<()> {
    let bin = build_static()?;
    let dir = env::temp_dir().join(format!("tcptrace-static-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let copy = dir.join("tcptrace");
    std::fs::copy(&bin, &copy).with_context(|| format!("copying {}", bin.display()))?;
    let out = Command::new(&copy)
        .args(["probes", "--format", "json"])
        .current_dir(&dir)
        .env_clear()
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out.context("running the static tcptrace")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("\"attached\"") {
        bail!(
            "the static tcptrace failed from a clean directory ({}): {}{}",
            out.status,
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    eprintln!("xtask: static tcptrace runs from a clean directory");
    Ok(())
}
