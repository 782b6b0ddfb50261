//! Pod attribution: netns / cgroup / socket owner -> pod, Service.
//!
//! The [`Attributor`] keeps tables built from the host (under a host root):
//! network namespace inode -> pod or `ip netns` name, cgroup id -> pod and
//! container, pod IP -> pod, plus kube-proxy's Services. Events look them up
//! by the socket owner's netns inode and cgroup id; a miss rescans, at most
//! once a second. Entries of vanished pods live on for a grace period so late
//! events are still named. The kernel reuses the inodes of freed namespaces:
//! a namespace entry is checked (at most once a second) against the path it
//! was found through, and a rescan replaces it when that no longer leads to it.
//!
//! Identity levels, best first: `pod` (a named pod), `container` (pod uid and
//! container id from the cgroup, no pod name: the `PodRef` then has empty
//! namespace and name and the container id as `container`), `netns_name`,
//! `process` (pid / comm from the event), `netns` (inode only).
mod cgroup;
mod host;
mod kubelet;
pub mod nodes;
mod services;

#[cfg(test)]
mod root_tests;
#[cfg(test)]
mod tests;

use std::{
    collections::{HashMap, HashSet},
    fs,
    hash::Hash,
    io,
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

pub use self::services::ServiceMap;
/// The parsers of cgroup and kubelet names, for the fuzz targets.
#[cfg(fuzzing)]
pub mod fuzzed {
    pub use super::{
        cgroup::{parse_cgroup_path, parse_proc_cgroup},
        kubelet::{parse_container_log_name, parse_pod_dir_name},
    };
}
use self::{
    cgroup::{CgroupOwner, parse_cgroup_path, parse_proc_cgroup},
    kubelet::{ContainerLog, PodMeta},
};
use crate::{
    model::{Endpoint, Event, IdentityLevel, PodRef},
    node,
};

/// A miss rescans the host at most this often.
const MISS_RESCAN_INTERVAL: Duration = Duration::from_secs(1);
/// Namespaces whose local addresses are read as node addresses, per scan.
const MAX_NODE_NETNS: usize = 64;

/// Which events belong to this node (`--node-scope`), for hosts that run
/// several nodes, such as kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeScope {
    /// Cgroup v2 subtree of the node, e.g. a kind node container's
    /// `/system.slice/docker-<id>.scope`: its cgroups and the network
    /// namespaces of its processes are in scope.
    CgroupPrefix(String),
}

impl NodeScope {
    fn contains_cgroup(&self, path: &str) -> bool {
        match self {
            NodeScope::CgroupPrefix(prefix) => path
                .strip_prefix(prefix.trim_end_matches('/'))
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
        }
    }
}

#[derive(Clone, Debug)]
pub struct AttributionConfig {
    /// Where the host's `/proc`, `/sys`, `/run/netns` and `/var/log` are.
    pub host_root: PathBuf,
    pub node_scope: Option<NodeScope>,
    /// How often `refresh` rescans the host.
    pub refresh_interval: Duration,
    /// How long a vanished pod, cgroup or namespace keeps its name.
    pub grace_period: Duration,
    /// Bound on each table (namespaces, cgroups, pod IPs).
    pub max_entries: usize,
}

impl Default for AttributionConfig {
    fn default() -> Self {
        Self {
            host_root: PathBuf::from("/"),
            node_scope: None,
            refresh_interval: Duration::from_secs(10),
            grace_period: Duration::from_secs(300),
            max_entries: 65_536,
        }
    }
}

/// A resolved owner: the pod (level `Pod`) or only its uid (level `Container`).
#[derive(Clone, Debug, PartialEq)]
struct Identity {
    pod: PodRef,
    level: IdentityLevel,
}

#[derive(Debug)]
struct Seen<T> {
    value: T,
    last_seen: Instant,
}

#[derive(Debug)]
struct NetnsInfo {
    name: Option<String>,
    /// Set when every process in the namespace belongs to one pod.
    pod: Option<Identity>,
    in_scope: bool,
    /// What the namespace was found through (`proc/<pid>/ns/net`,
    /// `run/netns/<name>`), to tell it from a later one with its inode.
    via: PathBuf,
    /// When `via` was last checked.
    checked: Instant,
}

/// A node of this kernel other than tcptrace's own (a kind node).
#[derive(Clone, Debug)]
pub struct OtherNode {
    /// Its hostname (the node's name).
    pub name: Option<String>,
    /// Its network namespace, through one of its processes.
    pub netns_file: PathBuf,
}

#[derive(Debug)]
struct CgroupInfo {
    owner: Option<Identity>,
    in_scope: bool,
}

/// Names events by pod, container, Service and namespace.
pub struct Attributor {
    cfg: AttributionConfig,
    netns: HashMap<u32, Seen<NetnsInfo>>,
    cgroups: HashMap<u64, Seen<CgroupInfo>>,
    pod_ips: HashMap<IpAddr, Seen<PodRef>>,
    /// Local addresses of node namespaces, where NodePorts answer.
    node_addrs: HashSet<IpAddr>,
    services: ServiceMap,
    /// Keys still unknown after a scan; cleared by the next scan.
    missed_netns: HashSet<u32>,
    missed_cgroups: HashSet<u64>,
    /// Nodes sharing this kernel (kind), other than the one tcptrace runs
    /// in, by network namespace.
    other_nodes: HashMap<u32, OtherNode>,
    /// Each pod namespace's node namespace.
    node_of: HashMap<u32, u32>,
    /// Namespaces looked up by name since the last scan.
    looked_up_netns: HashSet<u32>,
    last_scan: Option<Instant>,
    /// Scans so far, to tell when the nodes may have changed.
    scans: u64,
    warnings: Vec<String>,
    warned: HashSet<String>,
}

impl Attributor {
    /// Builds an empty attributor; the first event or `refresh` scans the host.
    pub fn new(cfg: AttributionConfig) -> Self {
        Self {
            cfg,
            netns: HashMap::new(),
            cgroups: HashMap::new(),
            pod_ips: HashMap::new(),
            node_addrs: HashSet::new(),
            services: ServiceMap::default(),
            missed_netns: HashSet::new(),
            missed_cgroups: HashSet::new(),
            other_nodes: HashMap::new(),
            node_of: HashMap::new(),
            looked_up_netns: HashSet::new(),
            last_scan: None,
            scans: 0,
            warnings: Vec::new(),
            warned: HashSet::new(),
        }
    }

    /// Fills `ev.pod`, `identity_level`, `netns_name` and the endpoints'
    /// `pod` / `service`. Cache hits do no I/O but, once a second per
    /// namespace, a stat of the path it was found through.
    pub fn attribute(&mut self, ev: &mut Event) {
        let now = Instant::now();
        if self.is_miss(ev) || self.netns_replaced(ev.netns, now) {
            if self
                .last_scan
                .is_none_or(|t| now.saturating_duration_since(t) >= MISS_RESCAN_INTERVAL)
            {
                self.scan(now);
                self.remember_misses(ev);
            } else {
                // Too soon for a full scan: a namespace made a moment ago
                // (a test, a pod starting) still gets its `ip netns` name.
                self.name_new_netns(ev.netns, now);
            }
        }

        let by_cgroup = ev
            .cgroup_id
            .and_then(|id| self.cgroups.get(&id))
            .and_then(|c| c.value.owner.as_ref());
        let netns = match ev.netns {
            0 => None,
            ino => self.netns.get(&ino).map(|n| &n.value),
        };
        // The cgroup names the exact container, and is the only way to tell
        // hostNetwork pods (which share the node's namespace) apart.
        let identity = by_cgroup.or_else(|| netns.and_then(|n| n.pod.as_ref()));
        if ev.netns_name.is_none() {
            ev.netns_name = netns.and_then(|n| n.name.clone());
        }
        let node_netns = self.node_of.get(&ev.netns).copied().unwrap_or(ev.netns);
        if ev.node.is_none() {
            ev.node = self
                .other_nodes
                .get(&node_netns)
                .and_then(|n| n.name.clone());
        }
        ev.identity_level = match identity {
            Some(id) => {
                ev.pod = Some(id.pod.clone());
                id.level
            }
            None if ev.netns_name.is_some() => IdentityLevel::NetnsName,
            None if ev.pid.is_some() || ev.comm.is_some() => IdentityLevel::Process,
            None => IdentityLevel::Netns,
        };

        self.name_endpoint(&mut ev.src);
        self.name_endpoint(&mut ev.dst);
        // A segment from a Service (its reply, after the reverse NAT).
        if ev.src.service.is_none() {
            ev.src.service = self.services.virtual_ip(ev.src.ip, ev.src.port).cloned();
        }
        if ev.dst.service.is_none() {
            let (ip, port) = (ev.dst.ip, ev.dst.port);
            let nodeport = || {
                self.node_addrs
                    .contains(&ip)
                    .then(|| self.services.nodeport(port))
                    .flatten()
            };
            ev.dst.service = self
                .services
                .virtual_ip(ip, port)
                .or_else(nodeport)
                .cloned();
        }
    }

    /// Rescans the host when the refresh interval has passed since the last
    /// scan, and forgets entries older than the grace period.
    pub fn refresh(&mut self, now: Instant) {
        let due = self
            .last_scan
            .is_none_or(|t| now.saturating_duration_since(t) >= self.cfg.refresh_interval);
        if due {
            self.scan(now);
        }
    }

    /// Replaces the Services (from [`collect_services`]); its warnings move to
    /// [`Attributor::take_warnings`].
    pub fn set_services(&mut self, mut services: ServiceMap) {
        for w in std::mem::take(&mut services.warnings) {
            self.warn(w);
        }
        self.services = services;
    }

    pub fn services(&self) -> &ServiceMap {
        &self.services
    }

    /// Whether the event belongs to the `--node-scope` node (always without one).
    pub fn in_scope(&self, ev: &Event) -> bool {
        if self.cfg.node_scope.is_none() {
            return true;
        }
        let by_cgroup = ev
            .cgroup_id
            .and_then(|id| self.cgroups.get(&id))
            .is_some_and(|c| c.value.in_scope);
        by_cgroup || self.netns.get(&ev.netns).is_some_and(|n| n.value.in_scope)
    }

    /// Problems met while scanning (each reported once), for the log.
    pub fn take_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.warnings)
    }

    fn warn(&mut self, msg: String) {
        if self.warned.insert(msg.clone()) {
            self.warnings.push(msg);
        }
    }

    /// Looks namespace `ino` up among the named ones only (a directory
    /// read), between full scans.
    fn name_new_netns(&mut self, ino: u32, now: Instant) {
        if ino == 0
            || self.looked_up_netns.len() >= self.cfg.max_entries
            || !self.looked_up_netns.insert(ino)
        {
            return;
        }
        let root = &self.cfg.host_root;
        let Some(ns) = node::netns::named(root)
            .unwrap_or_default()
            .into_iter()
            .find(|ns| ns.inode == ino)
        else {
            return;
        };
        self.netns.insert(
            ino,
            Seen {
                value: NetnsInfo {
                    name: ns.name,
                    pod: None,
                    in_scope: false,
                    via: ns.path,
                    checked: now,
                },
                last_seen: now,
            },
        );
    }

    /// The other nodes of this kernel (kind), by network namespace.
    pub fn other_nodes(&self) -> &HashMap<u32, OtherNode> {
        &self.other_nodes
    }

    /// Each pod namespace's node namespace, as the last scan found them.
    pub fn node_of(&self) -> &HashMap<u32, u32> {
        &self.node_of
    }

    /// How many scans ran (the nodes change only with one).
    pub fn scans(&self) -> u64 {
        self.scans
    }

    /// Files to enter namespace `ino` through, best first: where the last
    /// scan found it, `pid`'s namespace link, the named namespace with
    /// that inode (the caller checks the inode of what it enters).
    pub fn netns_files(&self, ino: u32, pid: Option<u32>) -> Vec<PathBuf> {
        let root = &self.cfg.host_root;
        let mut files: Vec<PathBuf> = self
            .netns
            .get(&ino)
            .map(|e| e.value.via.clone())
            .into_iter()
            .collect();
        files.extend(pid.map(|p| root.join(format!("proc/{p}/ns/net"))));
        files.extend(
            node::netns::named(root)
                .unwrap_or_default()
                .into_iter()
                .filter(|ns| ns.inode == ino)
                .map(|ns| ns.path),
        );
        files
    }

    /// Whether the cached namespace `ino` may be gone, its inode taken by a
    /// new namespace: the path it was found through no longer leads to it.
    /// Checked at most once a second per namespace.
    fn netns_replaced(&mut self, ino: u32, now: Instant) -> bool {
        let Some(e) = self.netns.get_mut(&ino) else {
            return false;
        };
        let n = &mut e.value;
        if now.saturating_duration_since(n.checked) < MISS_RESCAN_INTERVAL {
            return false;
        }
        n.checked = now;
        let same = node::netns::inode(&n.via).is_ok_and(|i| i == ino);
        if same {
            e.last_seen = now;
        }
        !same
    }

    fn is_miss(&self, ev: &Event) -> bool {
        let netns_miss = ev.netns != 0
            && !self.netns.contains_key(&ev.netns)
            && !self.missed_netns.contains(&ev.netns);
        let cgroup_miss = ev.cgroup_id.is_some_and(|id| {
            !self.cgroups.contains_key(&id) && !self.missed_cgroups.contains(&id)
        });
        netns_miss || cgroup_miss
    }

    /// Keys a fresh scan did not find are not rescanned for until the next scan.
    fn remember_misses(&mut self, ev: &Event) {
        let cap = self.cfg.max_entries;
        if ev.netns != 0 && !self.netns.contains_key(&ev.netns) {
            bounded_insert(&mut self.missed_netns, ev.netns, cap);
        }
        if let Some(id) = ev.cgroup_id
            && !self.cgroups.contains_key(&id)
        {
            bounded_insert(&mut self.missed_cgroups, id, cap);
        }
    }

    fn name_endpoint(&self, ep: &mut Endpoint) {
        if ep.pod.is_none()
            && let Some(p) = self.pod_ips.get(&ep.ip)
        {
            ep.pod = Some(p.value.clone());
        }
    }

    fn in_scope_path(&self, cgroup_path: &str) -> bool {
        self.cfg
            .node_scope
            .as_ref()
            .is_some_and(|s| s.contains_cgroup(cgroup_path))
    }

    /// Finds the nodes of this kernel by the processes' cgroups; those that
    /// are not tcptrace's own are named by their hostname.
    fn find_nodes(&mut self, procs: &[host::ProcEntry]) {
        let list: Vec<nodes::Proc<'_>> = procs
            .iter()
            .filter_map(|p| {
                Some(nodes::Proc {
                    pid: p.pid,
                    netns: p.netns,
                    cgroup: parse_proc_cgroup(&p.cgroup).unified?,
                })
            })
            .collect();
        let (found, node_of) = nodes::find(&list);
        let own = node::netns::inode(Path::new("/proc/self/ns/net")).unwrap_or(0);
        let proc_dir = self.cfg.host_root.join("proc");
        self.other_nodes = found
            .into_values()
            .filter(|n| n.netns != own && !n.cgroup.is_empty())
            .map(|n| {
                let dir = proc_dir.join(n.pid.to_string());
                let name = fs::read_to_string(dir.join("root/etc/hostname"))
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty());
                (
                    n.netns,
                    OtherNode {
                        name,
                        netns_file: dir.join("ns/net"),
                    },
                )
            })
            .collect();
        self.node_of = self.routing_nodes(node_of);
    }

    /// Each namespace's node from the kernel's topology (the namespace
    /// holding the peer of its default route's veth), the cgroup parent
    /// (`by_cgroup`) filling in where the topology says nothing; where the
    /// two disagree the topology, which carries the traffic, wins.
    fn routing_nodes(&mut self, by_cgroup: HashMap<u32, u32>) -> HashMap<u32, u32> {
        let namespaces = node::netns::discover(&self.cfg.host_root);
        let mut node_of = node::topology::routers(&namespaces);
        // A node's own namespace is routed by the node network (kind's
        // nodes by their router), yet it is a node, not a pod of one.
        let node_netns: HashSet<u32> = by_cgroup
            .values()
            .copied()
            .chain(self.other_nodes.keys().copied())
            .collect();
        node_of.retain(|ns, _| !node_netns.contains(ns));
        for (pod, node) in by_cgroup {
            match node_of.get(&pod) {
                Some(router) if *router != node => self.warn(format!(
                    "network namespace {pod} is routed by namespace {router}, but its cgroup hangs under the node of namespace {node}: using the router"
                )),
                Some(_) => {}
                None => {
                    node_of.insert(pod, node);
                }
            }
        }
        node_of
    }

    /// Reads the host tables and merges them into the caches.
    fn scan(&mut self, now: Instant) {
        self.last_scan = Some(now);
        self.scans += 1;
        self.missed_netns.clear();
        self.missed_cgroups.clear();
        self.looked_up_netns.clear();
        let root = self.cfg.host_root.clone();
        let cap = self.cfg.max_entries;

        let proc_dir = root.join("proc");
        let procs = host::read_procs(&proc_dir).unwrap_or_else(|e| {
            self.warn(format!("cannot read {}: {e}", proc_dir.display()));
            Vec::new()
        });
        self.find_nodes(&procs);
        let pods_dir = root.join("var/log/pods");
        // On a host of kind nodes the pods are the nodes': no kubelet here.
        let kubelet_here = self.other_nodes.is_empty();
        let mut pods = kubelet::read_pod_logs(&pods_dir).unwrap_or_else(|e| {
            if kubelet_here {
                self.warn(format!(
                    "cannot read {}: {e}; pods are named by uid only (mount the host's /var/log under --host-root)",
                    pods_dir.display()
                ));
            }
            HashMap::new()
        });
        let links_dir = root.join("var/log/containers");
        let mut containers = kubelet::read_container_logs(&links_dir).unwrap_or_else(|e| {
            if kubelet_here {
                self.warn(format!(
                    "cannot read {}: {e}; containers are named only in single-container pods",
                    links_dir.display()
                ));
            }
            HashMap::new()
        });
        // Other nodes' pods are named by their own kubelet's files.
        for node in self.other_nodes.values() {
            let Some(node_root) = node.netns_file.parent().and_then(Path::parent) else {
                continue;
            };
            let node_root = node_root.join("root");
            pods.extend(
                kubelet::read_pod_logs(&node_root.join("var/log/pods")).unwrap_or_default(),
            );
            containers.extend(
                kubelet::read_container_logs(&node_root.join("var/log/containers"))
                    .unwrap_or_default(),
            );
        }
        let kube = Kube {
            pods: &pods,
            containers: &containers,
        };
        let netns_dir = root.join("run/netns");
        let names = match node::netns::names(&root) {
            Ok(names) => names,
            // No named namespace yet: nothing to name.
            Err(e) if e.kind() == io::ErrorKind::NotFound => HashMap::new(),
            Err(e) => {
                self.warn(format!("cannot read {}: {e}", netns_dir.display()));
                HashMap::new()
            }
        };

        match node::host::cgroup2_mount(&root) {
            Some(mount) => {
                for (id, path) in node::host::walk_cgroups(&mount, cap) {
                    let info = CgroupInfo {
                        owner: parse_cgroup_path(&path).map(|o| kube.identify(&o)),
                        in_scope: self.in_scope_path(&path),
                    };
                    self.cgroups.insert(
                        id,
                        Seen {
                            value: info,
                            last_seen: now,
                        },
                    );
                }
            }
            None => self.warn(format!(
                "no cgroup v2 hierarchy under {}: events are attributed by network namespace only",
                root.join("sys/fs/cgroup").display()
            )),
        }

        let mut owners: HashMap<u32, NetnsOwners> = HashMap::new();
        for p in &procs {
            let cg = parse_proc_cgroup(&p.cgroup);
            let in_scope = cg.unified.is_some_and(|u| self.in_scope_path(u));
            let o = owners
                .entry(p.netns)
                .or_insert_with(|| NetnsOwners::new(p.pid));
            o.in_scope |= in_scope;
            match cg.owner {
                Some(owner) if !o.pod_uids.contains(&owner.pod_uid) => {
                    o.pod_uids.push(owner.pod_uid);
                }
                Some(_) => {}
                None => o.other = true,
            }
        }

        let mut node_addrs = HashSet::new();
        let mut node_netns_read = 0;
        for (ino, o) in owners {
            let pod = match o.pod_uids.as_slice() {
                [uid] if !o.other => Some(kube.identify(&CgroupOwner {
                    pod_uid: uid.clone(),
                    container_id: None,
                })),
                _ => None,
            };
            let addrs_of = || host::read_local_addrs(&proc_dir.join(o.pid.to_string()));
            if let Some(id) = &pod {
                for ip in addrs_of() {
                    self.pod_ips.insert(
                        ip,
                        Seen {
                            value: id.pod.clone(),
                            last_seen: now,
                        },
                    );
                }
            } else if (self.cfg.node_scope.is_none() || o.in_scope)
                && node_netns_read < MAX_NODE_NETNS
            {
                node_netns_read += 1;
                node_addrs.extend(addrs_of());
            }
            let info = NetnsInfo {
                name: names.get(&ino).cloned(),
                pod,
                in_scope: o.in_scope,
                via: proc_dir.join(o.pid.to_string()).join("ns/net"),
                checked: now,
            };
            self.netns.insert(
                ino,
                Seen {
                    value: info,
                    last_seen: now,
                },
            );
        }
        // Named namespaces with no process: new ones, and those whose inode
        // an earlier namespace (not seen in this scan) had.
        for (ino, name) in names {
            if self.netns.get(&ino).is_some_and(|e| e.last_seen == now) {
                continue;
            }
            self.netns.insert(
                ino,
                Seen {
                    value: NetnsInfo {
                        via: netns_dir.join(&name),
                        name: Some(name),
                        pod: None,
                        in_scope: false,
                        checked: now,
                    },
                    last_seen: now,
                },
            );
        }
        self.node_addrs = node_addrs;

        let grace = self.cfg.grace_period;
        prune(&mut self.netns, now, grace, cap);
        prune(&mut self.cgroups, now, grace, cap);
        prune(&mut self.pod_ips, now, grace, cap);
    }
}

/// Who lives in one network namespace.
struct NetnsOwners {
    /// A process to read the namespace's addresses through.
    pid: u32,
    pod_uids: Vec<String>,
    /// Some process is not in a pod (the node's own namespace).
    other: bool,
    in_scope: bool,
}

impl NetnsOwners {
    fn new(pid: u32) -> Self {
        Self {
            pid,
            pod_uids: Vec::new(),
            other: false,
            in_scope: false,
        }
    }
}

/// The kubelet's names for one scan.
struct Kube<'a> {
    pods: &'a HashMap<String, PodMeta>,
    containers: &'a HashMap<String, ContainerLog>,
}

impl Kube<'_> {
    fn identify(&self, owner: &CgroupOwner) -> Identity {
        let log = owner
            .container_id
            .as_deref()
            .and_then(|id| self.containers.get(id))
            .filter(|c| c.pod_uid.as_deref().is_none_or(|u| u == owner.pod_uid));
        if let Some(meta) = self.pods.get(&owner.pod_uid) {
            // A pod with one container dir has one container (the sandbox logs nothing).
            let only = match meta.containers.as_slice() {
                [only] => Some(only.clone()),
                _ => None,
            };
            let container = log.map(|c| c.container.clone()).or(only);
            return Identity {
                pod: PodRef {
                    namespace: meta.namespace.clone(),
                    name: meta.name.clone(),
                    uid: meta.uid.clone(),
                    container,
                },
                level: IdentityLevel::Pod,
            };
        }
        match log {
            // The container link names the pod even when its log dir is gone.
            Some(c) => Identity {
                pod: PodRef {
                    namespace: c.namespace.clone(),
                    name: c.pod.clone(),
                    uid: owner.pod_uid.clone(),
                    container: Some(c.container.clone()),
                },
                level: IdentityLevel::Pod,
            },
            None => Identity {
                pod: PodRef {
                    namespace: String::new(),
                    name: String::new(),
                    uid: owner.pod_uid.clone(),
                    container: owner.container_id.clone(),
                },
                level: IdentityLevel::Container,
            },
        }
    }
}

/// Drops entries unseen for longer than `grace`, then the oldest beyond `cap`.
fn prune<K: Copy + Eq + Hash, V>(
    map: &mut HashMap<K, Seen<V>>,
    now: Instant,
    grace: Duration,
    cap: usize,
) {
    map.retain(|_, s| now.saturating_duration_since(s.last_seen) <= grace);
    if map.len() > cap {
        let excess = map.len() - cap;
        let mut by_age: Vec<(Instant, K)> = map.iter().map(|(k, s)| (s.last_seen, *k)).collect();
        by_age.sort_unstable_by_key(|(t, _)| *t);
        for (_, k) in by_age.into_iter().take(excess) {
            map.remove(&k);
        }
    }
}

fn bounded_insert<K: Eq + Hash>(set: &mut HashSet<K>, key: K, cap: usize) {
    if set.len() >= cap {
        set.clear();
    }
    set.insert(key);
}
