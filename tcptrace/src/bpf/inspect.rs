//! What the kernel has loaded, by object id, for the root tests and the
//! benchmarks that watch a tracer process from outside.
use std::{
    collections::{BTreeMap, BTreeSet},
    os::fd::OwnedFd,
};

use anyhow::{Context as _, Result};
use tcptrace_common::hook;

/// BPF programs, maps and links loaded now, by any process.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Programs by id, named as in tcptrace's program table where the
    /// kernel's name (15 characters) tells which (see [`full_names`]).
    pub programs: BTreeMap<u32, String>,
    /// Maps by id, with the kernel's name.
    pub maps: BTreeMap<u32, String>,
    pub links: BTreeSet<u32>,
}

/// Lists every loaded program, map and link. Objects that go away while
/// they are listed are left out.
pub fn loaded() -> Loaded {
    let mut by_name: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for p in aya::programs::loaded_programs().flatten() {
        let name = p.name_as_str().unwrap_or("?").to_string();
        by_name.entry(name).or_default().push(p.id());
    }
    Loaded {
        programs: full_names(by_name),
        maps: aya::maps::loaded_maps()
            .flatten()
            .map(|m| (m.id(), m.name_as_str().unwrap_or("?").to_string()))
            .collect(),
        links: aya::programs::loaded_links()
            .flatten()
            .map(|l| l.id())
            .collect(),
    }
}

/// Program names by id. The kernel keeps 15 characters; the full name is
/// found in tcptrace's program table when as many of its names share that
/// prefix as programs carry it, by load order (tcptrace loads them in
/// table order, ids ascend); else the kernel's name stays.
fn full_names(by_name: BTreeMap<String, Vec<u32>>) -> BTreeMap<u32, String> {
    let mut names = BTreeMap::new();
    for (short, mut ids) in by_name {
        ids.sort_unstable();
        let full: Vec<&str> = hook::PROGRAMS
            .iter()
            .map(|(name, _, _)| *name)
            .filter(|name| name.starts_with(short.as_str()))
            .collect();
        for (i, id) in ids.iter().enumerate() {
            let name = if full.len() == ids.len() {
                full[i].to_string()
            } else {
                short.clone()
            };
            names.insert(*id, name);
        }
    }
    names
}

/// Keeps the kernel's per-program run counts and run times (`run_cnt`,
/// `run_time_ns` in a program's fdinfo) counting while held.
pub struct RunTimeStats {
    _fd: OwnedFd,
}

/// Turns on the kernel's BPF run-time statistics (BPF_ENABLE_STATS) until
/// the returned guard is dropped.
pub fn run_time_stats() -> Result<RunTimeStats> {
    let fd = aya::sys::enable_stats(aya::sys::Stats::RunTime)
        .context("enabling BPF run-time statistics (BPF_ENABLE_STATS): run as root")?;
    Ok(RunTimeStats { _fd: fd })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_names_come_from_the_program_table_when_unambiguous() {
        let by_name = BTreeMap::from([
            // The fexit, kprobe and kretprobe of inet_hash_connect, loaded
            // in table order.
            ("inet_hash_conne".to_string(), vec![13, 11, 12]),
            ("tcp_send_reset".to_string(), vec![3]),
            // Fewer programs than names with that prefix: which is which
            // is not known.
            ("nf_conntrack_al".to_string(), vec![20, 21]),
            ("other".to_string(), vec![50]),
        ]);
        assert_eq!(
            full_names(by_name),
            BTreeMap::from([
                (3, "tcp_send_reset".to_string()),
                (11, "inet_hash_connect_fexit".to_string()),
                (12, "inet_hash_connect_entry".to_string()),
                (13, "inet_hash_connect_return".to_string()),
                (20, "nf_conntrack_al".to_string()),
                (21, "nf_conntrack_al".to_string()),
                (50, "other".to_string()),
            ])
        );
    }
}
