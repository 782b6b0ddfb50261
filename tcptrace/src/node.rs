//! Node facts for diagnosis: finds the node's network namespaces and reads
//! each one's sysctls and conntrack state, on a background thread.
use std::{
    collections::{BTreeMap, HashMap},
    fs,
    os::unix::fs::MetadataExt as _,
    path::{Path, PathBuf},
    sync::mpsc,
    thread,
    time::Duration,
};

use crate::{
    attribution::{ServiceMap, collect_services, run_in_netns},
    diagnosis::{NodeFacts, collect_netns},
};

/// At most this many namespaces are read per refresh.
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

/// Named namespaces first (their names are useful), then one process per
/// remaining namespace. Unreadable entries are skipped: processes come and go.
pub fn discover_namespaces(host_root: &Path) -> Vec<Namespace> {
    let mut found: BTreeMap<u32, Namespace> = BTreeMap::new();
    if let Ok(dir) = fs::read_dir(host_root.join("run/netns")) {
        for entry in dir.flatten() {
            let path = entry.path();
            if let Ok(meta) = fs::metadata(&path) {
                let name = entry.file_name().to_string_lossy().into_owned();
                found.entry(meta.ino() as u32).or_insert(Namespace {
                    inode: meta.ino() as u32,
                    path,
                    name: Some(name),
                });
            }
        }
    }
    if let Ok(dir) = fs::read_dir(host_root.join("proc")) {
        for entry in dir.flatten() {
            if found.len() >= MAX_NAMESPACES {
                break;
            }
            let file_name = entry.file_name();
            if !file_name
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
            {
                continue;
            }
            let path = entry.path().join("ns/net");
            if let Ok(meta) = fs::metadata(&path) {
                found.entry(meta.ino() as u32).or_insert(Namespace {
                    inode: meta.ino() as u32,
                    path,
                    name: None,
                });
            }
        }
    }
    found.into_values().collect()
}

/// What the refresher needs to know besides the namespaces themselves.
#[derive(Clone, Debug)]
pub struct FactsConfig {
    pub host_root: PathBuf,
    /// The namespace that routes and NATs pod traffic (default: the host's).
    pub node_netns: PathBuf,
    pub middlebox_timeout_s: Option<u64>,
    /// NodePorts given on the command line; kube-proxy's are added.
    pub nodeports: BTreeMap<u16, String>,
}

/// Reads every namespace's facts once. Errors for single namespaces (a pod
/// that just exited) are skipped. `services` adds kube-proxy's NodePorts.
pub fn collect(cfg: &FactsConfig, services: &ServiceMap) -> (NodeFacts, HashMap<u32, String>) {
    let mut nodeports = cfg.nodeports.clone();
    for (port, svc) in services.nodeports() {
        nodeports.entry(port).or_insert_with(|| service_name(svc));
    }
    let mut facts = NodeFacts {
        middlebox_timeout_s: cfg.middlebox_timeout_s,
        nodeports,
        ..NodeFacts::default()
    };
    if let Ok((inode, mut node)) = collect_netns(&cfg.node_netns) {
        if let Some(ct) = node.ct.as_mut() {
            ct.invalid_drop_rule = drops_invalid(&cfg.node_netns);
        }
        facts.node_netns = Some(inode);
        facts.netns.insert(inode, node);
    }
    let mut names = HashMap::new();
    for ns in discover_namespaces(&cfg.host_root) {
        if let Some(name) = &ns.name {
            names.insert(ns.inode, name.clone());
        }
        if facts.netns.contains_key(&ns.inode) {
            continue;
        }
        if let Ok((inode, f)) = collect_netns(&ns.path) {
            facts.netns.insert(inode, f);
        }
    }
    facts.ipvs_tcp_timeout_s = ipvs_tcp_timeout(&cfg.host_root);
    (facts, names)
}

/// Whether the namespace's firewall drops packets conntrack marks INVALID
/// (the other fix for kubernetes #74839), in iptables or nftables rules.
fn drops_invalid(netns_file: &Path) -> bool {
    let iptables = run_in_netns(Some(netns_file), "iptables-save", &["-t", "filter"]);
    let nft = run_in_netns(Some(netns_file), "nft", &["list", "ruleset"]);
    [iptables, nft]
        .into_iter()
        .flatten()
        .any(|rules| rules.lines().any(is_invalid_drop_rule))
}

/// `-A FORWARD -m conntrack --ctstate INVALID -j DROP` (iptables-save) or
/// `ct state invalid drop` (nft list ruleset).
fn is_invalid_drop_rule(line: &str) -> bool {
    let line = line.trim();
    let iptables = line.contains("--ctstate INVALID") && line.ends_with("-j DROP");
    let nft = line.starts_with("ct state invalid") && line.ends_with("drop");
    iptables || nft
}

fn service_name(svc: &crate::model::ServiceRef) -> String {
    match &svc.port_name {
        Some(port) => format!("{}/{}:{port}", svc.namespace, svc.name),
        None => format!("{}/{}", svc.namespace, svc.name),
    }
}

/// kube-proxy's Services in the node namespace. A failure (the namespace
/// file is gone) yields an empty map with the reason as a warning.
pub fn services(cfg: &FactsConfig) -> ServiceMap {
    collect_services(Some(&cfg.node_netns)).unwrap_or_else(|e| {
        let mut empty = ServiceMap::default();
        empty
            .warnings
            .push(format!("reading kube-proxy rules: {e:#}"));
        empty
    })
}

/// IPVS's TCP established timeout, when IPVS is loaded.
fn ipvs_tcp_timeout(host_root: &Path) -> Option<u64> {
    let text =
        fs::read_to_string(host_root.join("proc/sys/net/ipv4/vs/timeout_established")).ok()?;
    text.trim().parse().ok()
}

/// Service rules change rarely and cost a few process runs to read.
const SERVICES_EVERY: u32 = 6;

/// One refresh: the facts, and the Services when they were re-read.
pub struct Update {
    pub facts: NodeFacts,
    pub services: Option<ServiceMap>,
}

/// A background refresher: collects every `interval`, or at once when woken
/// (an event came from a namespace it has not read yet).
pub struct Refresher {
    updates: mpsc::Receiver<Update>,
    wake: mpsc::Sender<()>,
}

impl Refresher {
    /// Starts refreshing; the first collection happens after `interval`
    /// (or a wake-up), the caller having collected once itself.
    pub fn start(
        cfg: FactsConfig,
        interval: Duration,
        services: ServiceMap,
    ) -> std::io::Result<Self> {
        let (tx, updates) = mpsc::channel();
        let (wake, woken) = mpsc::channel::<()>();
        thread::Builder::new()
            .name("tcptrace-facts".into())
            .spawn(move || {
                let mut services = services;
                let mut round = 0u32;
                loop {
                    match woken.recv_timeout(interval) {
                        Ok(()) | Err(mpsc::RecvTimeoutError::Timeout) => {
                            // Several wake-ups coalesce into one refresh.
                            while woken.try_recv().is_ok() {}
                        }
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    round += 1;
                    let fresh = round
                        .is_multiple_of(SERVICES_EVERY)
                        .then(|| self::services(&cfg));
                    if let Some(fresh) = &fresh {
                        services = fresh.clone();
                    }
                    let (facts, _) = collect(&cfg, &services);
                    if tx
                        .send(Update {
                            facts,
                            services: fresh,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            })?;
        Ok(Self { updates, wake })
    }

    pub fn wake(&self) {
        let _ = self.wake.send(());
    }

    /// Updates collected since the last call, oldest first.
    pub fn updates(&self) -> impl Iterator<Item = Update> + '_ {
        self.updates.try_iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_invalid_drop_rules_of_both_firewalls() {
        assert!(is_invalid_drop_rule(
            "-A FORWARD -m conntrack --ctstate INVALID -j DROP"
        ));
        assert!(is_invalid_drop_rule("\t\tct state invalid drop"));
        assert!(!is_invalid_drop_rule(
            "-A FORWARD -m conntrack --ctstate INVALID -j ACCEPT"
        ));
        assert!(!is_invalid_drop_rule(
            "-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        ));
        assert!(!is_invalid_drop_rule("ct state established,related accept"));
    }

    #[test]
    fn discovers_named_and_process_namespaces_under_a_host_root() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("run/netns")).unwrap();
        fs::create_dir_all(root.path().join("proc/42/ns")).unwrap();
        fs::create_dir_all(root.path().join("proc/self/ns")).unwrap();
        fs::write(root.path().join("run/netns/blue"), b"").unwrap();
        fs::write(root.path().join("proc/42/ns/net"), b"").unwrap();
        fs::write(root.path().join("proc/self/ns/net"), b"").unwrap();
        let found = discover_namespaces(root.path());
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
