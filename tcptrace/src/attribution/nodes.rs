//! Nodes on one kernel. A kind cluster runs every node as a container of
//! one host: each node's pods have kubelet cgroups under the node's own
//! cgroup, and its network namespace routes them. A node is found where
//! pod cgroups hang (the path above the kubelet's cgroup root: kind's
//! kubelet has `cgroupRoot: /kubelet` and the systemd driver, so its pods
//! are under `<node>/kubelet.slice/kubelet-kubepods.slice`);
//! the processes in that cgroup subtree that are not pods are the node's
//! own: their network namespace is the node's, and through one of them
//! the node's files (`/var/log/pods`, `/etc/hostname`) are read.
use std::collections::{BTreeMap, HashMap};

/// One node and how to reach it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// The node's cgroup ("" when the pods hang at the root: the host is
    /// the node).
    pub cgroup: String,
    /// The node's network namespace.
    pub netns: u32,
    /// A process of the node's own (its lowest pid).
    pub pid: u32,
}

/// A process as the scan saw it: its pid, network namespace and unified
/// cgroup path.
pub struct Proc<'a> {
    pub pid: u32,
    pub netns: u32,
    pub cgroup: &'a str,
}

/// The cgroup a pod cgroup path hangs from, if it is one: the path above
/// the kubelet's cgroup root (kind: `<node>/kubelet.slice/kubelet-kubepods.slice/...`).
pub fn pod_parent(path: &str) -> Option<&str> {
    let (end, _) = super::cgroup::kubepods_root(path)?;
    Some(&path[..end])
}

/// The nodes of these processes by cgroup, and each pod namespace's node
/// namespace.
pub fn find(procs: &[Proc<'_>]) -> (BTreeMap<String, Node>, HashMap<u32, u32>) {
    let mut pod_netns: HashMap<u32, &str> = HashMap::new();
    let mut parents: Vec<&str> = Vec::new();
    for p in procs {
        if let Some(parent) = pod_parent(p.cgroup) {
            pod_netns.insert(p.netns, parent);
            if !parents.contains(&parent) {
                parents.push(parent);
            }
        }
    }
    // The deepest node cgroup containing each non-pod process.
    parents.sort_by_key(|p| std::cmp::Reverse(p.len()));
    let mut nodes: BTreeMap<String, Node> = BTreeMap::new();
    for p in procs.iter().filter(|p| pod_parent(p.cgroup).is_none()) {
        let Some(parent) = parents.iter().find(|parent| {
            parent.is_empty()
                || p.cgroup == **parent
                || p.cgroup
                    .strip_prefix(**parent)
                    .is_some_and(|r| r.starts_with('/'))
        }) else {
            continue;
        };
        // A pod namespace is no node's own, whatever its cgroup.
        if pod_netns.contains_key(&p.netns) {
            continue;
        }
        let node = nodes.entry((*parent).to_string()).or_insert(Node {
            cgroup: (*parent).to_string(),
            netns: p.netns,
            pid: p.pid,
        });
        if p.pid < node.pid {
            node.netns = p.netns;
            node.pid = p.pid;
        }
    }
    let node_of = pod_netns
        .into_iter()
        .filter_map(|(ns, parent)| Some((ns, nodes.get(parent)?.netns)))
        .collect();
    (nodes, node_of)
}

#[cfg(test)]
mod tests {
    use super::*;

    const POD: &str = "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1_2.slice/cri-containerd-ab.scope";
    /// A pod as kind's kubelet places it (systemd driver, cgroupRoot /kubelet).
    const KIND_POD: &str = "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod1_2.slice/cri-containerd-ab.scope";

    #[test]
    fn kind_nodes_are_found_by_their_pods_cgroups() {
        let a = format!("/docker/aaa{KIND_POD}");
        let b = format!("/system.slice/docker-bbb.scope{KIND_POD}");
        let c = format!("/docker/ccc{POD}");
        let procs = [
            // The host and its own processes.
            Proc {
                pid: 1,
                netns: 100,
                cgroup: "/init.scope",
            },
            Proc {
                pid: 50,
                netns: 100,
                cgroup: "/system.slice/docker.service",
            },
            // Node a (cgroupfs docker): systemd, the kubelet, a docker
            // exec, a pod.
            Proc {
                pid: 200,
                netns: 201,
                cgroup: "/docker/aaa/init.scope",
            },
            Proc {
                pid: 205,
                netns: 201,
                cgroup: "/docker/aaa/kubelet.slice/kubelet.service",
            },
            Proc {
                pid: 210,
                netns: 201,
                cgroup: "/docker/aaa",
            },
            Proc {
                pid: 220,
                netns: 202,
                cgroup: &a,
            },
            // Node b (systemd docker).
            Proc {
                pid: 300,
                netns: 301,
                cgroup: "/system.slice/docker-bbb.scope/init.scope",
            },
            Proc {
                pid: 320,
                netns: 302,
                cgroup: &b,
            },
            // Node c: a kubelet with its default cgroup root.
            Proc {
                pid: 400,
                netns: 401,
                cgroup: "/docker/ccc",
            },
            Proc {
                pid: 420,
                netns: 402,
                cgroup: &c,
            },
        ];
        let (nodes, node_of) = find(&procs);
        assert_eq!(nodes.len(), 3, "{nodes:?}");
        assert_eq!(
            nodes["/docker/aaa"],
            Node {
                cgroup: "/docker/aaa".into(),
                netns: 201,
                pid: 200
            }
        );
        assert_eq!(nodes["/system.slice/docker-bbb.scope"].netns, 301);
        assert_eq!(nodes["/docker/ccc"].netns, 401);
        assert_eq!(node_of.get(&202), Some(&201));
        assert_eq!(node_of.get(&302), Some(&301));
        assert_eq!(node_of.get(&402), Some(&401));
        assert_eq!(node_of.get(&100), None, "the host runs no pods here");
    }

    #[test]
    fn a_plain_node_is_the_host() {
        let procs = [
            Proc {
                pid: 1,
                netns: 100,
                cgroup: "/init.scope",
            },
            Proc {
                pid: 900,
                netns: 102,
                cgroup: POD,
            },
        ];
        let (nodes, node_of) = find(&procs);
        assert_eq!(nodes[""].netns, 100);
        assert_eq!(node_of.get(&102), Some(&100));
        assert_eq!(pod_parent(POD), Some(""));
        assert_eq!(pod_parent("/system.slice/kubelet.service"), None);
    }
}
