//! Pod names from the kubelet's log tree, which every node has:
//! - `/var/log/pods/<namespace>_<pod>_<uid>/<container>/<restart>.log`
//! - `/var/log/containers/<pod>_<namespace>_<container>-<container id>.log`,
//!   a symlink into the first tree; the only place that maps a container id
//!   to its name without asking the runtime.
use std::{collections::HashMap, io, path::Path};

use crate::node;

/// A pod as its log directory names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodMeta {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// Container names (one directory each; the sandbox has none), sorted.
    pub containers: Vec<String>,
}

/// A container as its `/var/log/containers` link names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerLog {
    pub namespace: String,
    pub pod: String,
    pub container: String,
    /// From the link target; absent when the link cannot be read.
    pub pod_uid: Option<String>,
}

/// `<namespace>_<pod>_<uid>` -> (namespace, pod, uid). Neither Kubernetes
/// names nor uids may contain '_'.
pub fn parse_pod_dir_name(dir: &str) -> Option<(&str, &str, &str)> {
    let mut it = dir.splitn(3, '_');
    let (ns, name, uid) = (it.next()?, it.next()?, it.next()?);
    if ns.is_empty() || name.is_empty() || uid.is_empty() || uid.contains('_') {
        return None;
    }
    Some((ns, name, uid))
}

/// `<pod>_<namespace>_<container>-<id>.log` -> (pod, namespace, container, id).
pub fn parse_container_log_name(file: &str) -> Option<(&str, &str, &str, &str)> {
    let stem = file.strip_suffix(".log")?;
    let (rest, id) = stem.rsplit_once('-')?;
    let mut it = rest.splitn(3, '_');
    let (pod, ns, container) = (it.next()?, it.next()?, it.next()?);
    let valid = id.len() >= 12
        && id.bytes().all(|b| b.is_ascii_hexdigit())
        && ![pod, ns, container]
            .iter()
            .any(|s| s.is_empty() || s.contains('_'));
    valid.then_some((pod, ns, container, id))
}

/// Pods under `dir` (`<root>/var/log/pods`), keyed by uid.
pub fn read_pod_logs(dir: &Path) -> io::Result<HashMap<String, PodMeta>> {
    let mut pods = HashMap::new();
    for (dir_name, mut containers) in node::host::read_subdirs(dir)? {
        let Some((namespace, name, uid)) = parse_pod_dir_name(&dir_name) else {
            continue;
        };
        containers.sort();
        pods.insert(
            uid.to_string(),
            PodMeta {
                namespace: namespace.to_string(),
                name: name.to_string(),
                uid: uid.to_string(),
                containers,
            },
        );
    }
    Ok(pods)
}

/// Containers under `dir` (`<root>/var/log/containers`), keyed by container id.
pub fn read_container_logs(dir: &Path) -> io::Result<HashMap<String, ContainerLog>> {
    let mut containers = HashMap::new();
    for (file_name, target) in node::host::read_links(dir)? {
        let Some((pod, namespace, container, id)) = parse_container_log_name(&file_name) else {
            continue;
        };
        // Target: /var/log/pods/<ns>_<pod>_<uid>/<container>/<n>.log
        let pod_uid = target.and_then(|target| {
            let pod_dir = target.parent()?.parent()?.file_name()?.to_str()?;
            let (_, _, uid) = parse_pod_dir_name(pod_dir)?;
            Some(uid.to_string())
        });
        containers.insert(
            id.to_ascii_lowercase(),
            ContainerLog {
                namespace: namespace.to_string(),
                pod: pod.to_string(),
                container: container.to_string(),
                pod_uid,
            },
        );
    }
    Ok(containers)
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::symlink};

    use super::*;

    const UID: &str = "5f3c1a2b-7d4e-4c8f-9a6b-0e1d2c3b4a59";
    const CID: &str = "8a3f5e0c9b7d4e2f1a6c8b0d3e5f7a9c1b2d4e6f8a0c2e4b6d8f0a1c3e5b7d9f";

    #[test]
    fn names() {
        assert_eq!(
            parse_pod_dir_name(&format!("kube-system_coredns-7db6d8ff4d-x2x8q_{UID}")),
            Some(("kube-system", "coredns-7db6d8ff4d-x2x8q", UID))
        );
        assert_eq!(parse_pod_dir_name("no-underscores"), None);
        assert_eq!(parse_pod_dir_name("a__uid"), None);
        assert_eq!(
            parse_container_log_name(&format!("web-5d8f7_default_nginx-proxy-{CID}.log")),
            Some(("web-5d8f7", "default", "nginx-proxy", CID))
        );
        assert_eq!(
            parse_container_log_name("web_default_nginx-notanid.log"),
            None
        );
        assert_eq!(
            parse_container_log_name(&format!("web_default_nginx-{CID}")),
            None
        );
    }

    #[test]
    fn reads_a_kubelet_log_tree() {
        let root = tempfile::tempdir().expect("tempdir");
        let pods = root.path().join("var/log/pods");
        let pod_dir = pods.join(format!("default_web-5d8f7_{UID}"));
        for c in ["nginx", "sidecar"] {
            fs::create_dir_all(pod_dir.join(c)).expect("mkdir");
            fs::write(pod_dir.join(c).join("0.log"), "").expect("write");
        }
        fs::create_dir_all(pods.join("not-a-pod")).expect("mkdir");
        let static_uid = "9c2e5d1b7a3f4e6c8d0b2a4f6e8c0d2b";
        fs::create_dir_all(pods.join(format!(
            "kube-system_etcd-kind-control-plane_{static_uid}/etcd"
        )))
        .expect("mkdir");

        let read = read_pod_logs(&pods).expect("read pods");
        assert_eq!(read.len(), 2);
        assert_eq!(
            read[UID],
            PodMeta {
                namespace: "default".into(),
                name: "web-5d8f7".into(),
                uid: UID.into(),
                containers: vec!["nginx".into(), "sidecar".into()],
            }
        );
        assert_eq!(read[static_uid].containers, vec!["etcd".to_string()]);

        let links = root.path().join("var/log/containers");
        fs::create_dir_all(&links).expect("mkdir");
        symlink(
            pod_dir.join("sidecar/0.log"),
            links.join(format!("web-5d8f7_default_sidecar-{CID}.log")),
        )
        .expect("symlink");
        let other = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        symlink("/nowhere", links.join(format!("api_prod_app-{other}.log"))).expect("symlink");
        let read = read_container_logs(&links).expect("read containers");
        assert_eq!(
            read[CID],
            ContainerLog {
                namespace: "default".into(),
                pod: "web-5d8f7".into(),
                container: "sidecar".into(),
                pod_uid: Some(UID.into()),
            }
        );
        assert_eq!(read[other].pod_uid, None);
        assert!(read_pod_logs(&root.path().join("missing")).is_err());
    }
}
