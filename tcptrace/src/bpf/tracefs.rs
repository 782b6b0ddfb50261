//! tracefs, which attaching a classic tracepoint needs (the tracepoint's id
//! is only published there). Only the syscall hooks are classic
//! tracepoints; raw tracepoints, fexit, kprobes and BTF work without it.
use std::path::{Path, PathBuf};

use nix::{errno::Errno, mount::MsFlags};

/// Where tracefs is usually found; the first is where it is mounted.
const ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// How tracefs was found.
#[derive(Debug, PartialEq, Eq)]
pub enum Tracefs {
    Found(PathBuf),
    /// It was not mounted; tcptrace mounted it here.
    Mounted(PathBuf),
}

/// A mounted tracefs, the way aya looks for it.
pub fn find() -> Option<PathBuf> {
    ROOTS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

/// Finds tracefs, or mounts it at /sys/kernel/tracing when it is not
/// mounted (needs CAP_SYS_ADMIN). The error says what to do.
pub fn ensure() -> Result<Tracefs, String> {
    if let Some(root) = find() {
        return Ok(Tracefs::Found(root));
    }
    let target = Path::new(ROOTS[0]);
    let how = format!(
        "mount it with `mount -t tracefs nodev {}`",
        target.display()
    );
    match nix::mount::mount(
        Some("nodev"),
        target,
        Some("tracefs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    ) {
        Ok(()) if target.join("events").is_dir() => Ok(Tracefs::Mounted(target.to_path_buf())),
        Ok(()) => Err(format!(
            "tracefs mounted at {} has no events: this kernel has no tracepoints (CONFIG_FTRACE)",
            target.display()
        )),
        Err(Errno::EPERM) => Err(format!(
            "tracefs not found at {} and tcptrace may not mount it (needs CAP_SYS_ADMIN): {how}",
            target.display()
        )),
        Err(e) => Err(format!(
            "tracefs not found at {} and mounting it failed ({e}): {how}",
            target.display()
        )),
    }
}
