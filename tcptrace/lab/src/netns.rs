//! Network namespaces made with `ip netns add`, for the lab, the root tests
//! and the benchmarks: entered per thread, deleted with every process in
//! them by a guard (also when the user of the guard panics).
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};
use tcptrace::node::netns::{enter, inode};

use crate::run;

/// The namespace `/run/netns/<name>`, deleted when dropped with every
/// process in it.
pub struct Netns {
    pub name: String,
}

impl Netns {
    /// Creates the namespace (replacing a leftover of the same name, e.g.
    /// from a killed run) with loopback up.
    pub fn create(name: impl Into<String>) -> Result<Self> {
        let name = name.into();
        delete_netns(&name);
        run("ip", &["netns", "add", &name])?;
        let ns = Self { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        netns_path(&self.name)
    }

    /// The namespace inode, as tcptrace reports it.
    pub fn inode(&self) -> Result<u32> {
        netns_inode(&self.name)
    }

    /// Runs a command inside the namespace; fails with its stderr on a
    /// non-zero exit.
    pub fn exec(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", &self.name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        sysctl(&self.name, key, value)
    }

    /// Runs `f` on a thread named `thread_name` inside the namespace.
    pub fn run<T: Send + 'static>(
        &self,
        thread_name: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T> {
        in_netns(&self.name, thread_name, f)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        delete_netns(&self.name);
    }
}

/// `/run/netns/<name>`.
pub fn netns_path(name: &str) -> PathBuf {
    Path::new("/run/netns").join(name)
}

pub fn netns_inode(name: &str) -> Result<u32> {
    inode(&netns_path(name))
}

/// Kills every process in the namespace and deletes it; quiet when it does
/// not exist.
pub fn delete_netns(name: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", name]).output() {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
    let _ = Command::new("ip")
        .args(["netns", "delete", name])
        .stderr(Stdio::null())
        .status();
}

/// Runs `f` on a thread that entered the network namespace `name`; sockets
/// it creates live there and stay there when returned.
pub fn in_netns<T: Send + 'static>(
    name: &str,
    thread_name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    enter(&netns_path(name), thread_name, f)
}

/// Writes a sysctl inside namespace `name` (`/proc/sys` resolves by the
/// writing thread's namespace; this thread never leaves its own).
pub fn sysctl(name: &str, key: &str, value: &str) -> Result<()> {
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    let value = value.to_string();
    let shown = format!("{key}={value} in {name}");
    in_netns(name, "tcptrace-sysctl", move || fs::write(&path, value))?
        .with_context(|| format!("setting {shown}"))
}

/// Reads a sysctl inside namespace `name`.
pub fn read_sysctl(name: &str, key: &str) -> Result<String> {
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    let shown = format!("{key} in {name}");
    in_netns(name, "tcptrace-sysctl", move || fs::read_to_string(&path))?
        .map(|s| s.trim().to_string())
        .with_context(|| format!("reading {shown}"))
}
