//! Network namespaces on the node: finding them, their inodes, and doing
//! something inside one (a closure on a thread that joined it, or a
//! command under nsenter). The caller's threads never change namespace.
use std::{
    collections::{BTreeMap, HashMap},
    fs::{self, File},
    io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    process::Command,
    thread,
};

use anyhow::{Context as _, Result, anyhow};
use nix::sched::{CloneFlags, setns};

/// At most this many namespaces are found per scan.
const MAX_NAMESPACES: usize = 1024;

/// A network namespace found on the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    pub inode: u32,
    /// A file that refers to it (/run/netns/NAME or /proc/PID/ns/net).
    pub path: PathBuf,
    /// Its `ip netns` name, if it has one.
    pub name: Option<String>,
}

/// The inode of the namespace behind `path`, as events report it.
pub fn inode(path: &Path) -> Result<u32> {
    let ino = fs::metadata(path)
        .with_context(|| format!("stat {}", path.display()))?
        .ino();
    u32::try_from(ino).map_err(|_| anyhow!("netns inode {ino} does not fit in 32 bits"))
}

/// Named namespaces (`ip netns add`) under `<host_root>/run/netns`. A plain
/// file left by a failed `ip netns add` has a small inode that matches no
/// event; unreadable entries are skipped.
pub fn named(host_root: &Path) -> io::Result<Vec<Namespace>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(host_root.join("run/netns"))? {
        let entry = entry?;
        let path = entry.path();
        if let (Ok(inode), Ok(name)) = (inode(&path), entry.file_name().into_string()) {
            found.push(Namespace {
                inode,
                path,
                name: Some(name),
            });
        }
    }
    Ok(found)
}

/// Inode -> `ip netns` name of the named namespaces.
pub fn names(host_root: &Path) -> io::Result<HashMap<u32, String>> {
    Ok(named(host_root)?
        .into_iter()
        .filter_map(|ns| Some((ns.inode, ns.name?)))
        .collect())
}

/// Every namespace: named ones first (their names are useful), then one
/// process per remaining namespace. Processes come and go: unreadable
/// entries are skipped.
pub fn discover(host_root: &Path) -> Vec<Namespace> {
    let mut found: BTreeMap<u32, Namespace> = BTreeMap::new();
    for ns in named(host_root).unwrap_or_default() {
        found.entry(ns.inode).or_insert(ns);
    }
    if let Ok(dir) = fs::read_dir(host_root.join("proc")) {
        for entry in dir.flatten() {
            if found.len() >= MAX_NAMESPACES {
                break;
            }
            if !entry
                .file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                continue;
            }
            let path = entry.path().join("ns/net");
            if let Ok(inode) = inode(&path) {
                found.entry(inode).or_insert(Namespace {
                    inode,
                    path,
                    name: None,
                });
            }
        }
    }
    found.into_values().collect()
}

/// Runs `f` on a thread named `thread_name` that joined the namespace
/// behind `path`; sockets it creates live there.
pub fn enter<T: Send + 'static>(
    path: &Path,
    thread_name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T> {
    let ctx = || format!("entering netns {}", path.display());
    let file = File::open(path).with_context(ctx)?;
    thread::Builder::new()
        .name(thread_name.to_string())
        .spawn(move || setns(file, CloneFlags::CLONE_NEWNET).map(|()| f()))
        .context("spawning a namespace thread")?
        .join()
        .map_err(|_| anyhow!("namespace thread {thread_name} panicked"))?
        .with_context(ctx)
}

/// Runs `tool args` (under `nsenter --net=FILE` when given) and returns its
/// output, or why it could not.
pub fn run_in(netns_file: Option<&Path>, tool: &str, args: &[&str]) -> Result<String, String> {
    let mut cmd = match netns_file {
        Some(f) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", f.display())).arg("--").arg(tool);
            c
        }
        None => Command::new(tool),
    };
    let out = cmd.args(args).output().map_err(|e| {
        let exe = if netns_file.is_some() {
            "nsenter"
        } else {
            tool
        };
        format!("cannot run {exe}: {e}")
    })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        return Err(format!(
            "{tool} {} failed ({}): {}",
            args.join(" "),
            out.status,
            stderr.trim()
        ));
    }
    String::from_utf8(out.stdout).map_err(|_| format!("{tool} printed non-UTF-8 output"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn discovers_named_and_process_namespaces_under_a_host_root() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("run/netns")).unwrap();
        fs::create_dir_all(root.path().join("proc/42/ns")).unwrap();
        fs::create_dir_all(root.path().join("proc/self/ns")).unwrap();
        fs::write(root.path().join("run/netns/blue"), b"").unwrap();
        fs::write(root.path().join("proc/42/ns/net"), b"").unwrap();
        fs::write(root.path().join("proc/self/ns/net"), b"").unwrap();
        let found = discover(root.path());
        assert_eq!(found.len(), 2, "{found:?}");
        let blue = found
            .iter()
            .find(|n| n.name.as_deref() == Some("blue"))
            .unwrap();
        assert_eq!(blue.path, root.path().join("run/netns/blue"));
        let proc42 = found.iter().find(|n| n.name.is_none()).unwrap();
        assert_eq!(proc42.path, root.path().join("proc/42/ns/net"));
    }
}
