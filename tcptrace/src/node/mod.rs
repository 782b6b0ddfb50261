//! The node wing: everything tcptrace reads from the node besides the
//! kernel's events. Namespaces and how to enter them (`netns`), their
//! sysctls and conntrack state (`sysctl`), kube-proxy's and IPVS's rules
//! (`kube_proxy`) and the process, cgroup and kubelet tables (`host`).
//! The facts are read on a background thread; diagnosis and attribution
//! get them as data.
pub mod firewall;
pub mod host;
pub mod ipvs;
pub mod kube_proxy;
pub mod netns;
pub mod sysctl;
pub mod topology;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::mpsc,
    thread,
    time::Duration,
};

use self::{kube_proxy::RuleDumps, sysctl::collect_netns};
use crate::model::facts::{ListenStats, NetnsFacts, NodeFacts, QueuedListener};

/// This machine's host name and kernel release (`uname -n`, `uname -r`),
/// each `None` when unreadable.
pub fn host_and_kernel() -> (Option<String>, Option<String>) {
    let read = |path| {
        std::fs::read_to_string(path)
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
    };
    (
        read("/proc/sys/kernel/hostname"),
        read("/proc/sys/kernel/osrelease"),
    )
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
/// that just exited) are skipped. kube-proxy's NodePorts are added by the
/// pipeline, which parses its rules.
/// The drop rules of the namespaces in `firewall` are read too, and the
/// full listeners of namespaces whose listen overflows rose since `prev`.
pub fn collect(
    cfg: &FactsConfig,
    firewall: &BTreeSet<u32>,
    prev: &HashMap<u32, ListenStats>,
) -> (NodeFacts, HashMap<u32, String>) {
    let mut facts = NodeFacts {
        middlebox_timeout_s: cfg.middlebox_timeout_s,
        nodeports: cfg.nodeports.clone(),
        ..NodeFacts::default()
    };
    if let Ok((inode, mut node)) = collect_netns(&cfg.node_netns) {
        if let Some(ct) = node.ct.as_mut() {
            ct.invalid_drop_rule = kube_proxy::drops_invalid(&cfg.node_netns);
        }
        node.queued_listeners = overflowing(&node, prev.get(&inode), &cfg.node_netns);
        facts.node_netns = Some(inode);
        facts.netns.insert(inode, node);
    }
    let mut names = HashMap::new();
    for ns in netns::discover(&cfg.host_root) {
        if let Some(name) = &ns.name {
            names.insert(ns.inode, name.clone());
        }
        if !facts.netns.contains_key(&ns.inode)
            && let Ok((inode, mut f)) = collect_netns(&ns.path)
        {
            f.queued_listeners = overflowing(&f, prev.get(&inode), &ns.path);
            facts.netns.insert(inode, f);
        }
        if firewall.contains(&ns.inode)
            && let Some(f) = facts.netns.get_mut(&ns.inode)
        {
            f.drop_rules = Some(firewall::read_drop_rules(&ns.path));
        }
    }
    facts.ipvs_tcp_timeout_s = facts
        .node_netns
        .and_then(|n| facts.netns.get(&n)?.ipvs.as_ref()?.in_use_tcp_s());
    (facts, names)
}

/// The listeners with queued connections of a namespace whose listen
/// overflow counter rose since `prev`.
fn overflowing(
    f: &NetnsFacts,
    prev: Option<&ListenStats>,
    path: &std::path::Path,
) -> Vec<QueuedListener> {
    match (f.listen, prev) {
        (Some(now), Some(prev)) if now.overflows > prev.overflows => sysctl::queued_listeners(path),
        _ => Vec::new(),
    }
}

/// kube-proxy's rules in the node namespace, as its tools print them.
pub fn rules(cfg: &FactsConfig) -> RuleDumps {
    kube_proxy::read_rules(Some(&cfg.node_netns))
}

/// Service rules change rarely and cost a few process runs to read.
const SERVICES_EVERY: u32 = 6;

/// One refresh: the facts, and kube-proxy's rules when they were re-read:
/// the node's, and the other nodes' by namespace.
pub struct Update {
    pub facts: NodeFacts,
    pub rules: Option<RuleDumps>,
    pub node_rules: Vec<(u32, RuleDumps)>,
}

/// Namespaces whose drop rules are read, at most.
pub const MAX_FIREWALL_NETNS: usize = 64;

/// Why the refresher is woken early.
enum Wake {
    /// An event came from a namespace it has not read yet.
    Facts,
    /// Netfilter dropped a traced connection's packets in this namespace:
    /// read its drop rules from now on.
    Firewall(u32),
    /// Other nodes share the kernel (kind): read their kube-proxy rules
    /// too, through these files.
    Nodes(Vec<(u32, PathBuf)>),
}

/// A background refresher: collects every `interval`, or at once when woken.
pub struct Refresher {
    updates: mpsc::Receiver<Update>,
    wake: mpsc::Sender<Wake>,
}

impl Refresher {
    /// Starts refreshing; the first collection happens after `interval`
    /// (or a wake-up), the caller having collected once itself.
    pub fn start(cfg: FactsConfig, interval: Duration) -> std::io::Result<Self> {
        let (tx, updates) = mpsc::channel();
        let (wake, woken) = mpsc::channel::<Wake>();
        thread::Builder::new()
            .name("tcptrace-facts".into())
            .spawn(move || {
                let mut round = 0u32;
                let mut firewall = BTreeSet::new();
                let mut prev = HashMap::new();
                let mut nodes: Vec<(u32, PathBuf)> = Vec::new();
                loop {
                    // New nodes get their rules read at once.
                    let mut new_nodes = false;
                    let mut take = |w: Wake| match w {
                        Wake::Firewall(ns) if firewall.len() < MAX_FIREWALL_NETNS => {
                            firewall.insert(ns);
                        }
                        Wake::Nodes(list) => {
                            new_nodes = true;
                            nodes = list;
                        }
                        _ => {}
                    };
                    match woken.recv_timeout(interval) {
                        Ok(w) => {
                            take(w);
                            // Several wake-ups coalesce into one refresh.
                            while let Ok(w) = woken.try_recv() {
                                take(w);
                            }
                        }
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        Err(mpsc::RecvTimeoutError::Disconnected) => return,
                    }
                    round += 1;
                    let due = round.is_multiple_of(SERVICES_EVERY) || new_nodes;
                    let rules = due.then(|| rules(&cfg));
                    let node_rules = if due {
                        nodes
                            .iter()
                            .map(|(ns, file)| (*ns, kube_proxy::read_rules(Some(file))))
                            .collect()
                    } else {
                        Vec::new()
                    };
                    let (facts, _) = collect(&cfg, &firewall, &prev);
                    prev = facts.listen_stats();
                    if tx
                        .send(Update {
                            facts,
                            rules,
                            node_rules,
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
        let _ = self.wake.send(Wake::Facts);
    }

    /// Reads these other nodes' kube-proxy rules from now on.
    pub fn watch_nodes(&self, nodes: Vec<(u32, PathBuf)>) {
        let _ = self.wake.send(Wake::Nodes(nodes));
    }

    /// Reads the drop rules of namespace `netns` from now on.
    pub fn watch_firewall(&self, netns: u32) {
        let _ = self.wake.send(Wake::Firewall(netns));
    }

    /// Updates collected since the last call, oldest first.
    pub fn updates(&self) -> impl Iterator<Item = Update> + '_ {
        self.updates.try_iter()
    }
}
