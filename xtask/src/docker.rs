//! The Docker engine the kind-shaped clusters and the agent image use:
//! Debian's dockerd, started here when none runs, so that it leaves the
//! host's firewall and forwarding alone (`--iptables=false`,
//! `--ip-forward=false`, no default bridge), and stopped by what started
//! it. Also the agent image of deploy/Containerfile, built without a
//! registry: its Debian 12 base is made here with debootstrap.
use std::{
    fs,
    path::Path,
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{target_dir, workspace_root};

/// The pid of the dockerd this module started.
const DOCKERD_PID: &str = "/run/tcptrace-dockerd.pid";
const DOCKERD_WAIT: Duration = Duration::from_secs(30);
/// deploy/Containerfile's base, made locally under its registry name.
const BASE_IMAGE: &str = "docker.io/library/debian:12-slim";
/// The agent image deploy/daemonset.yaml runs.
pub const AGENT_IMAGE: &str = "tcptrace:0.1.0";

/// Starts Debian's dockerd when no engine answers: without touching the
/// host's firewall or forwarding, without a default bridge.
pub fn ensure_dockerd() -> Result<()> {
    if docker(&["info"]).is_ok() {
        return Ok(());
    }
    if Command::new("dockerd").arg("--version").output().is_err() {
        bail!("no Docker engine: install docker.io (`cargo xtask setup` does)");
    }
    let log_path = target_dir().join("kind/dockerd.log");
    fs::create_dir_all(log_path.parent().unwrap_or(Path::new(".")))?;
    let log = fs::File::create(&log_path)?;
    Command::new("setsid")
        .args([
            "dockerd",
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
            "--ip-forward=false",
            "--ip-masq=false",
            "--pidfile",
            DOCKERD_PID,
        ])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting dockerd")?;
    let deadline = Instant::now() + DOCKERD_WAIT;
    while Instant::now() < deadline {
        if docker(&["info"]).is_ok() {
            eprintln!("xtask: started dockerd (log: {})", log_path.display());
            return Ok(());
        }
        thread::sleep(Duration::from_millis(300));
    }
    bail!(
        "dockerd did not answer within {DOCKERD_WAIT:?}; its log: {}",
        log_path.display()
    )
}

/// Stops the dockerd [`ensure_dockerd`] started (none other).
pub fn stop_dockerd() -> Result<()> {
    let Ok(text) = fs::read_to_string(DOCKERD_PID) else {
        return Ok(());
    };
    let Ok(pid) = text.trim().parse::<i32>() else {
        return Ok(());
    };
    let pid = nix::unistd::Pid::from_raw(pid);
    if nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).is_err() {
        let _ = fs::remove_file(DOCKERD_PID);
        return Ok(());
    }
    let deadline = Instant::now() + DOCKERD_WAIT;
    while Instant::now() < deadline {
        if nix::sys::signal::kill(pid, None).is_err() {
            let _ = fs::remove_file(DOCKERD_PID);
            eprintln!("xtask: stopped dockerd");
            return Ok(());
        }
        thread::sleep(Duration::from_millis(200));
    }
    bail!("dockerd (pid {pid}) did not stop within {DOCKERD_WAIT:?}")
}

pub fn docker(args: &[&str]) -> Result<()> {
    output("docker", args).map(|_| ())
}

pub fn output(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds deploy/Containerfile as [`AGENT_IMAGE`] from the static binary
/// at `bin`, on a Debian 12 base made with debootstrap (no registry).
pub fn agent_image(bin: &Path) -> Result<()> {
    ensure_dockerd()?;
    if docker(&["image", "inspect", BASE_IMAGE]).is_err() {
        let t = Instant::now();
        let root = target_dir().join("kind/debian-12");
        let _ = fs::remove_dir_all(&root);
        let out = Command::new("debootstrap")
            .args(["--variant=minbase", "bookworm"])
            .arg(&root)
            .arg("http://deb.debian.org/debian")
            .stdin(Stdio::null())
            .output()
            .context("running debootstrap")?;
        if !out.status.success() {
            let _ = fs::remove_dir_all(&root);
            bail!(
                "debootstrap of Debian 12 failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let status = Command::new("sh")
            .args([
                "-c",
                "tar -C \"$0\" -c . | docker import - \"$1\" >/dev/null",
            ])
            .arg(&root)
            .arg(BASE_IMAGE)
            .status()
            .context("importing the Debian 12 base")?;
        let _ = fs::remove_dir_all(&root);
        if !status.success() {
            bail!("docker import of the Debian 12 base failed ({status})");
        }
        eprintln!(
            "xtask: {BASE_IMAGE} made with debootstrap in {:.0} s",
            t.elapsed().as_secs_f64()
        );
    }
    // The build context is the static binary only (the Containerfile's
    // COPY path), not the repository.
    let context = target_dir().join("kind/agent-context");
    let _ = fs::remove_dir_all(&context);
    let rel = "target/x86_64-unknown-linux-gnu/release/tcptrace";
    fs::create_dir_all(context.join(rel).parent().unwrap_or(&context))?;
    fs::copy(bin, context.join(rel)).context("copying the static binary")?;
    let containerfile = workspace_root().join("deploy/Containerfile");
    let containerfile = containerfile.to_string_lossy();
    let context_arg = context.to_string_lossy();
    // Its apt-get runs in the host's network namespace: the engine has
    // no bridge to give the build one.
    let built = output(
        "docker",
        &[
            "build",
            "--network",
            "host",
            "-f",
            &containerfile,
            "-t",
            AGENT_IMAGE,
            &context_arg,
        ],
    );
    let _ = fs::remove_dir_all(&context);
    built.map(|_| eprintln!("xtask: built {AGENT_IMAGE} from deploy/Containerfile"))
}

/// Removes the agent image and its base, and stops the dockerd this
/// module started.
pub fn down() -> Result<()> {
    if docker(&["info"]).is_ok() {
        for image in [AGENT_IMAGE, BASE_IMAGE] {
            let _ = docker(&["rmi", "--force", image]);
        }
    }
    stop_dockerd()
}
