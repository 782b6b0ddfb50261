//! Kubelet cgroup names -> pod uid and container id.
//!
//! Both cgroup drivers and the three common runtimes name cgroups the same
//! way wherever the subtree is mounted (a kind node nests it under its own
//! container's cgroup):
//! - systemd: `.../kubepods-burstable-pod<uid, _ for ->.slice/cri-containerd-<id>.scope`
//!   (`crio-<id>.scope`, `docker-<id>.scope`)
//! - cgroupfs: `.../kubepods/burstable/pod<uid>/<id>` (`crio-<id>` for CRI-O)
//!
//! The subtree's root comes from the kubelet's `cgroupRoot` plus
//! `kubepods`: with the systemd driver the joined name is expanded into
//! its parent slices (kubelet's `CgroupName.ToSystemd`), so kind's
//! `cgroupRoot: /kubelet` gives `/kubelet.slice/kubelet-kubepods.slice/
//! kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod<uid_>.slice`;
//! with cgroupfs, `/kubelet/kubepods/...` (kind before Kubernetes 1.24).

/// The pod (and container, for a container cgroup) a cgroup belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupOwner {
    /// Pod uid with dashes, as the API server writes it.
    pub pod_uid: String,
    /// Runtime container id (64 hex digits), absent for the pod-level cgroup.
    pub container_id: Option<String>,
}

/// The pod and container named by a cgroup path, if it is a kubelet one.
pub fn parse_cgroup_path(path: &str) -> Option<CgroupOwner> {
    let (_, root) = kubepods_root(path)?;
    let mut parts = path[root..].split('/').filter(|p| !p.is_empty());
    while let Some(part) = parts.next() {
        if let Some(pod_uid) = pod_uid(part) {
            let container_id = parts.next().and_then(container_id);
            return Some(CgroupOwner {
                pod_uid,
                container_id,
            });
        }
    }
    None
}

/// Where the kubelet's pod subtree hangs in `path`: (the end of the cgroup
/// it hangs from, i.e. the node's cgroup, the start of the `kubepods`
/// component), as byte offsets. The node's cgroup excludes the cgroup root
/// the kubelet was given (`/kubelet.slice`, or kind's `/kubelet` with
/// cgroupfs).
pub fn kubepods_root(path: &str) -> Option<(usize, usize)> {
    // (start of the component, the component)
    let mut parts: Vec<(usize, &str)> = Vec::new();
    let mut at = 0;
    for part in path.split('/') {
        parts.push((at, part));
        at += part.len() + 1;
    }
    let k = parts.iter().position(|(_, p)| {
        *p == "kubepods" || *p == "kubepods.slice" || p.ends_with("-kubepods.slice")
    })?;
    let (root, part) = parts[k];
    let mut first = k;
    if let Some(stem) = part.strip_suffix("-kubepods.slice") {
        // systemd: `a-b-kubepods.slice` sits in `/a.slice/a-b.slice`.
        let chain: Vec<String> = stem
            .match_indices('-')
            .map(|(i, _)| &stem[..i])
            .chain([stem])
            .map(|s| format!("{s}.slice"))
            .collect();
        let above = &parts[..k];
        if above.len() >= chain.len()
            && above[above.len() - chain.len()..]
                .iter()
                .zip(&chain)
                .all(|((_, p), c)| p == c)
        {
            first = k - chain.len();
        }
    } else if part == "kubepods" && k > 0 && parts[k - 1].1 == "kubelet" {
        first = k - 1;
    }
    // The node's cgroup ends before the '/' that starts its first component.
    Some((parts[first].0.saturating_sub(1), root))
}

/// `kubepods-besteffort-pod<uid_>.slice` (systemd) or `pod<uid>` (cgroupfs).
fn pod_uid(part: &str) -> Option<String> {
    let uid = match part.strip_suffix(".slice") {
        Some(stem) => {
            let (prefix, uid) = stem.rsplit_once("-pod")?;
            if !prefix.contains("kubepods") {
                return None;
            }
            // systemd escapes '-' in unit names, so the kubelet writes '_'.
            uid.replace('_', "-")
        }
        None => part.strip_prefix("pod")?.to_string(),
    };
    let valid = uid.len() >= 8 && uid.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
    valid.then_some(uid)
}

/// Runtime prefixes of systemd scopes; `crio-conmon-<id>` is CRI-O's monitor, not the container.
const SCOPE_PREFIXES: [&str; 4] = ["cri-containerd", "crio", "docker", "libpod"];

/// `cri-containerd-<id>.scope` (systemd) or `<id>` / `crio-<id>` (cgroupfs).
fn container_id(part: &str) -> Option<String> {
    let id = match part.strip_suffix(".scope") {
        Some(stem) => {
            let (prefix, id) = stem.rsplit_once('-')?;
            if !SCOPE_PREFIXES.contains(&prefix) {
                return None;
            }
            id
        }
        None => part.strip_prefix("crio-").unwrap_or(part),
    };
    let valid = id.len() >= 12 && id.bytes().all(|b| b.is_ascii_hexdigit());
    valid.then(|| id.to_ascii_lowercase())
}

/// What `/proc/<pid>/cgroup` says about a process.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcCgroup<'a> {
    /// Path in the cgroup v2 (unified) hierarchy, the one whose inode is the
    /// BPF cgroup id.
    pub unified: Option<&'a str>,
    /// The kubelet owner: from the unified path, else from any v1 hierarchy
    /// (hybrid nodes whose kubelet only manages v1 controllers).
    pub owner: Option<CgroupOwner>,
}

/// Parses `0::/path` (v2) and `N:controllers:/path` (v1) lines.
pub fn parse_proc_cgroup(content: &str) -> ProcCgroup<'_> {
    let mut unified = None;
    let mut v1_owner = None;
    for line in content.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) =
            (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            unified = Some(path);
        } else if v1_owner.is_none() {
            v1_owner = parse_cgroup_path(path);
        }
    }
    let owner = unified.and_then(parse_cgroup_path).or(v1_owner);
    ProcCgroup { unified, owner }
}

#[cfg(test)]
mod tests {
    use super::*;

    const UID: &str = "5f3c1a2b-7d4e-4c8f-9a6b-0e1d2c3b4a59";
    const CID: &str = "8a3f5e0c9b7d4e2f1a6c8b0d3e5f7a9c1b2d4e6f8a0c2e4b6d8f0a1c3e5b7d9f";

    fn owner(container: Option<&str>) -> Option<CgroupOwner> {
        Some(CgroupOwner {
            pod_uid: UID.to_string(),
            container_id: container.map(str::to_string),
        })
    }

    #[test]
    fn systemd_driver_three_runtimes_and_qos_classes() {
        let uid_ = UID.replace('-', "_");
        let cases = [
            format!(
                "/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice/cri-containerd-{CID}.scope"
            ),
            format!(
                "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{uid_}.slice/crio-{CID}.scope"
            ),
            format!("/kubepods.slice/kubepods-pod{uid_}.slice/docker-{CID}.scope"),
        ];
        for path in cases {
            assert_eq!(parse_cgroup_path(&path), owner(Some(CID)), "{path}");
        }
        let pod_level =
            format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{uid_}.slice");
        assert_eq!(parse_cgroup_path(&pod_level), owner(None));
    }

    #[test]
    fn cgroupfs_driver() {
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/burstable/pod{UID}/{CID}")),
            owner(Some(CID))
        );
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/pod{UID}/crio-{CID}")),
            owner(Some(CID))
        );
        assert_eq!(
            parse_cgroup_path(&format!("/kubepods/besteffort/pod{UID}")),
            owner(None)
        );
    }

    #[test]
    fn kind_node_nests_the_kubelet_subtree() {
        let uid_ = UID.replace('-', "_");
        let node = "/system.slice/docker-0c5e2d9a7b1f3e6d8c4a2b0f9e7d5c3a1b8f6e4d2c0a9b7f5e3d1c8a6b4f2e0d.scope";
        let inner = format!(
            "/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{uid_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(
            parse_cgroup_path(&format!("{node}{inner}")),
            owner(Some(CID))
        );
        assert_eq!(parse_cgroup_path(&inner), owner(Some(CID)));
    }

    #[test]
    fn the_node_cgroup_is_above_the_kubelet_cgroup_root() {
        let uid_ = UID.replace('-', "_");
        fn node(path: &str) -> Option<&str> {
            kubepods_root(path).map(|(end, _)| &path[..end])
        }
        fn root(path: &str) -> Option<&str> {
            kubepods_root(path).map(|(_, at)| &path[at..])
        }
        // kind: systemd driver, cgroupRoot /kubelet, in the node container.
        let kind = format!(
            "/system.slice/docker-ab.scope/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/kubelet-kubepods-besteffort-pod{uid_}.slice/cri-containerd-{CID}.scope"
        );
        assert_eq!(node(&kind), Some("/system.slice/docker-ab.scope"));
        assert!(root(&kind).unwrap().starts_with("kubelet-kubepods.slice/"));
        // Seen from the node's own cgroup namespace.
        assert_eq!(node("/kubelet.slice/kubelet-kubepods.slice"), Some(""));
        // A cgroupRoot of two components, /a/b-c: `b-c` escaped to `b_c`.
        assert_eq!(
            node("/n/a.slice/a-b_c.slice/a-b_c-kubepods.slice/a-b_c-kubepods-pod1.slice"),
            Some("/n")
        );
        // The kubelet defaults and kind's cgroupfs layout.
        assert_eq!(node("/kubepods.slice/kubepods-pod1.slice"), Some(""));
        assert_eq!(
            node("/docker/ab/kubepods/besteffort/pod1"),
            Some("/docker/ab")
        );
        assert_eq!(node("/docker/ab/kubelet/kubepods/pod1"), Some("/docker/ab"));
        // Not a kubelet subtree: no kubepods component of the kubelet's.
        assert_eq!(node("/kubelet.slice/kubelet.service"), None);
        assert_eq!(node("/my-kubepods-test/pod12345678"), None);
    }

    #[test]
    fn not_kubelet_cgroups() {
        for path in [
            "/",
            "/system.slice/containerd.service",
            "/user.slice/user-1000.slice/session-3.scope",
            // The kind node container itself: docker scope but no pod.
            "/system.slice/docker-0c5e2d9a7b1f3e6d8c4a2b0f9e7d5c3a1b8f6e4d2c0a9b7f5e3d1c8a6b4f2e0d.scope",
            "/kubelet.slice/kubelet.service",
            "/kubepods.slice/kubepods-burstable.slice",
            "/podman/pod-not-a-kubelet",
            "/my-kubepods-test/pod5f3c1a2b-7d4e-4c8f-9a6b-0e1d2c3b4a59",
        ] {
            assert_eq!(parse_cgroup_path(path), None, "{path}");
        }
        // CRI-O's conmon scope names the pod, not a container.
        let uid_ = UID.replace('-', "_");
        let conmon = format!("/kubepods.slice/kubepods-pod{uid_}.slice/crio-conmon-{CID}.scope");
        assert_eq!(parse_cgroup_path(&conmon), owner(None));
    }

    #[test]
    fn proc_cgroup_v2_and_hybrid_v1() {
        let v2 = include_str!("fixtures/proc-cgroup-v2");
        let parsed = parse_proc_cgroup(v2);
        assert!(
            parsed
                .unified
                .is_some_and(|p| p.ends_with(&format!("cri-containerd-{CID}.scope")))
        );
        assert_eq!(parsed.owner, owner(Some(CID)));

        // Hybrid: systemd put the process in a service in the unified tree,
        // the kubelet (cgroupfs driver) placed it in the v1 controllers.
        let hybrid = include_str!("fixtures/proc-cgroup-v1-hybrid");
        let parsed = parse_proc_cgroup(hybrid);
        assert_eq!(parsed.unified, Some("/system.slice/containerd.service"));
        assert_eq!(parsed.owner, owner(Some(CID)));

        let host = parse_proc_cgroup("0::/init.scope\n");
        assert_eq!(
            host,
            ProcCgroup {
                unified: Some("/init.scope"),
                owner: None
            }
        );
        assert_eq!(parse_proc_cgroup("garbage\n\n").unified, None);
    }
}
