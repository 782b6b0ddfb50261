//! The host's tables under a host root (`/` normally, the host's
//! filesystem mounted in the agent's container otherwise), read as they
//! are: cgroups, processes, their network files, the kubelet's log tree.
//! Attribution parses them.
use std::{
    collections::HashMap,
    fs, io,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// The cgroup v2 mount: `sys/fs/cgroup` (unified) or `sys/fs/cgroup/unified` (hybrid).
pub fn cgroup2_mount(root: &Path) -> Option<PathBuf> {
    ["sys/fs/cgroup", "sys/fs/cgroup/unified"]
        .into_iter()
        .map(|p| root.join(p))
        .find(|p| p.join("cgroup.controllers").is_file())
}

/// Every cgroup directory under `mount` as (cgroup id, path from the mount
/// root), at most `cap` of them. On cgroup v2 the id BPF reports
/// (`bpf_get_current_cgroup_id`) is the directory's inode number.
pub fn walk_cgroups(mount: &Path, cap: usize) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let Ok(meta) = fs::metadata(mount) else {
        return out;
    };
    out.push((meta.ino(), "/".to_string()));
    let mut stack = vec![(mount.to_path_buf(), String::new())];
    while let Some((dir, rel)) = stack.pop() {
        // Cgroups come and go during the walk: skip what vanished.
        let Ok(rd) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in rd.filter_map(Result::ok) {
            if out.len() >= cap {
                return out;
            }
            if !entry.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let (Ok(meta), Ok(name)) = (entry.metadata(), entry.file_name().into_string()) else {
                continue;
            };
            let path = format!("{rel}/{name}");
            out.push((meta.ino(), path.clone()));
            stack.push((entry.path(), path));
        }
    }
    out
}

/// One process as `/proc/<pid>` shows it.
pub struct RawProc {
    pub pid: u32,
    /// The `ns/net` link ("net:[4026532289]").
    pub netns_link: String,
    /// `/proc/<pid>/cgroup`.
    pub cgroup: String,
}

/// Processes under `proc_dir` whose namespace link and cgroup are readable
/// (kernel threads have no namespace link; exited processes vanish).
pub fn read_procs(proc_dir: &Path) -> io::Result<Vec<RawProc>> {
    let mut procs = Vec::new();
    for entry in fs::read_dir(proc_dir)? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let link = fs::read_link(entry.path().join("ns/net"));
        let cgroup = fs::read_to_string(entry.path().join("cgroup"));
        if let (Ok(link), Ok(cgroup)) = (link, cgroup)
            && let Ok(netns_link) = link.into_os_string().into_string()
        {
            procs.push(RawProc {
                pid,
                netns_link,
                cgroup,
            });
        }
    }
    Ok(procs)
}

/// The processes holding the sockets with these inodes: inode -> (pid,
/// comm), from the `socket:[inode]` links under `/proc/<pid>/fd`.
pub fn socket_owners(proc_root: &Path, inodes: &[u64]) -> HashMap<u64, (u32, String)> {
    let mut found = HashMap::new();
    let Ok(dir) = fs::read_dir(proc_root) else {
        return found;
    };
    for entry in dir.flatten() {
        if found.len() == inodes.len() {
            break;
        }
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(link) = fs::read_link(fd.path()) else {
                continue;
            };
            let inode = link
                .to_str()
                .and_then(|l| l.strip_prefix("socket:["))
                .and_then(|l| l.strip_suffix(']'))
                .and_then(|l| l.parse::<u64>().ok());
            if let Some(inode) = inode.filter(|i| inodes.contains(i)) {
                let comm = fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                found.insert(inode, (pid, comm.trim().to_string()));
            }
        }
    }
    found
}

/// A namespace's address tables, through one of its processes.
pub struct NetFiles {
    pub fib_trie: Option<String>,
    pub if_inet6: Option<String>,
}

pub fn read_net_files(proc_pid: &Path) -> NetFiles {
    NetFiles {
        fib_trie: fs::read_to_string(proc_pid.join("net/fib_trie")).ok(),
        if_inet6: fs::read_to_string(proc_pid.join("net/if_inet6")).ok(),
    }
}

/// The entries of `dir` that are directories, each with the names of its
/// own subdirectories (empty when it vanished meanwhile).
pub fn read_subdirs(dir: &Path) -> io::Result<Vec<(String, Vec<String>)>> {
    let subdirs = |path: &Path| -> Vec<String> {
        fs::read_dir(path)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Ok(name) = entry.file_name().into_string() {
            out.push((name, subdirs(&entry.path())));
        }
    }
    Ok(out)
}

/// The entries of `dir` with their symlink targets (`None` for anything
/// that is not a readable link).
pub fn read_links(dir: &Path) -> io::Result<Vec<(String, Option<PathBuf>)>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        if let Ok(name) = entry.file_name().into_string() {
            out.push((name, fs::read_link(entry.path()).ok()));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walks_a_cgroup_tree_with_a_cap() {
        let root = tempfile::tempdir().expect("tempdir");
        let mount = root.path().join("sys/fs/cgroup/unified");
        fs::create_dir_all(mount.join("kubepods.slice/kubepods-besteffort.slice")).expect("mkdir");
        fs::create_dir_all(mount.join("system.slice")).expect("mkdir");
        fs::write(mount.join("cgroup.controllers"), "").expect("write");
        assert_eq!(cgroup2_mount(root.path()), Some(mount.clone()));

        let all = walk_cgroups(&mount, 100);
        let mut paths: Vec<&str> = all.iter().map(|(_, p)| p.as_str()).collect();
        paths.sort();
        assert_eq!(
            paths,
            [
                "/",
                "/kubepods.slice",
                "/kubepods.slice/kubepods-besteffort.slice",
                "/system.slice"
            ]
        );
        let ino = fs::metadata(mount.join("kubepods.slice"))
            .expect("stat")
            .ino();
        assert!(all.contains(&(ino, "/kubepods.slice".to_string())));
        assert_eq!(walk_cgroups(&mount, 2).len(), 2);
        assert_eq!(cgroup2_mount(&root.path().join("none")), None);
    }
}
