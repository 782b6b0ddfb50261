//! The host's process and address tables, as `node::host` reads them
//! under a host root, parsed.
use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
};

use crate::node;

/// `net:[4026532289]` -> 4026532289.
pub fn parse_netns_link(link: &str) -> Option<u32> {
    link.strip_prefix("net:[")?.strip_suffix(']')?.parse().ok()
}

/// One process: its network namespace and `/proc/<pid>/cgroup` text.
pub struct ProcEntry {
    pub pid: u32,
    pub netns: u32,
    pub cgroup: String,
}

/// All processes under `<root>/proc` whose namespace and cgroup are readable.
pub fn read_procs(proc_dir: &Path) -> io::Result<Vec<ProcEntry>> {
    Ok(node::host::read_procs(proc_dir)?
        .into_iter()
        .filter_map(|p| {
            Some(ProcEntry {
                pid: p.pid,
                netns: parse_netns_link(&p.netns_link)?,
                cgroup: p.cgroup,
            })
        })
        .collect())
}

/// Local unicast addresses of a namespace: `/32 host LOCAL` leaves of its
/// fib_trie and global-scope if_inet6 addresses.
pub fn read_local_addrs(proc_pid: &Path) -> Vec<IpAddr> {
    let files = node::host::read_net_files(proc_pid);
    let v4 = files.fib_trie.as_deref().map(parse_fib_trie_local);
    let v6 = files.if_inet6.as_deref().map(parse_if_inet6);
    v4.into_iter()
        .flatten()
        .map(IpAddr::V4)
        .chain(v6.into_iter().flatten().map(IpAddr::V6))
        .collect()
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
}
