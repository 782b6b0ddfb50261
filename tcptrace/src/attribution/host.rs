//! Reads the host's process, namespace and cgroup tables under a host root
//! (`/` normally, a mounted host filesystem when tcptrace runs in a pod).
use std::{
    collections::HashMap,
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
};

/// `net:[4026532289]` -> 4026532289.
pub fn parse_netns_link(link: &str) -> Option<u32> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// Named network namespaces (`ip netns add`): inode of each bind mount -> name.
pub fn read_netns_names(dir: &Path) -> io::Result<HashMap<u32, String>> {
    let mut names = HashMap::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        // stat follows the bind mount to the nsfs inode; a plain file left by
        // a failed `ip netns add` has a small inode that matches no event.
        let Ok(meta) = fs::metadata(entry.path()) else {
            continue;
        };
        if let (Ok(ino), Ok(name)) = (u32::try_from(meta.ino()), entry.file_name().into_string()) {
            names.insert(ino, name);
        }
    }
    Ok(names)
}

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

/// One process: its network namespace and `/proc/<pid>/cgroup` text.
pub struct ProcEntry {
    pub pid: u32,
    pub netns: u32,
    pub cgroup: String,
}

/// All processes under `<root>/proc` whose namespace and cgroup are readable.
pub fn read_procs(proc_dir: &Path) -> io::Result<Vec<ProcEntry>> {
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
        // Kernel threads have no readable namespace link; exited ones vanish.
        let netns = fs::read_link(entry.path().join("ns/net"))
            .ok()
            .and_then(|l| l.to_str().and_then(parse_netns_link));
        let (Some(netns), Ok(cgroup)) = (netns, fs::read_to_string(entry.path().join("cgroup")))
        else {
            continue;
        };
        procs.push(ProcEntry { pid, netns, cgroup });
    }
    Ok(procs)
}

/// Local unicast addresses of a namespace, from `/proc/<pid>/net/fib_trie`
/// (`/32 host LOCAL` leaves) and `/proc/<pid>/net/if_inet6` (global scope).
pub fn read_local_addrs(proc_pid: &Path) -> Vec<IpAddr> {
    let mut addrs: Vec<IpAddr> = fs::read_to_string(proc_pid.join("net/fib_trie"))
        .map(|t| {
            parse_fib_trie_local(&t)
                .into_iter()
                .map(IpAddr::V4)
                .collect()
        })
        .unwrap_or_default();
    if let Ok(t) = fs::read_to_string(proc_pid.join("net/if_inet6")) {
        addrs.extend(parse_if_inet6(&t).into_iter().map(IpAddr::V6));
    }
    addrs
}

/// Addresses of `/32 host LOCAL` leaves, loopback excluded, each once.
pub fn parse_fib_trie_local(text: &str) -> Vec<Ipv4Addr> {
    let mut out = Vec::new();
    let mut leaf = None;
    for line in text.lines() {
        let line = line.trim_start_matches([' ', '|', '+', '-']);
        if let Ok(ip) = line.trim().parse::<Ipv4Addr>() {
            leaf = Some(ip);
        } else if line.trim() == "/32 host LOCAL"
            && let Some(ip) = leaf
            && !ip.is_loopback()
            && !out.contains(&ip)
        {
            out.push(ip);
        }
    }
    out
}

/// Global-scope addresses of `if_inet6` lines (`<32 hex> <idx> <plen> <scope> <flags> <dev>`).
pub fn parse_if_inet6(text: &str) -> Vec<Ipv6Addr> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (hex, scope) = (f.next()?, f.nth(2)?);
            if scope != "00" || hex.len() != 32 {
                return None;
            }
            Some(Ipv6Addr::from(u128::from_str_radix(hex, 16).ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netns_links() {
        assert_eq!(parse_netns_link("net:[4026532289]"), Some(4026532289));
        assert_eq!(parse_netns_link("mnt:[4026532289]"), None);
        assert_eq!(parse_netns_link("net:[x]"), None);
    }

    #[test]
    fn pod_addresses_from_fib_trie_and_if_inet6() {
        let v4 = parse_fib_trie_local(include_str!("fixtures/fib_trie"));
        assert_eq!(v4, [Ipv4Addr::new(10, 244, 0, 7)]);
        let v6 = parse_if_inet6(include_str!("fixtures/if_inet6"));
        assert_eq!(v6, ["fd00:10:244::7".parse::<Ipv6Addr>().expect("addr")]);
    }

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
