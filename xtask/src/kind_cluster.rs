//! `cargo xtask kind-cluster up|down`: a kind-shaped cluster on this
//! machine's Docker engine, for `cargo xtask kind` and the tests to run
//! against without a registry or Kubernetes. Like kind: one container per
//! node (labelled as kind labels them) on a Docker network, the node's
//! network namespace routing its pods. Inside, `kind-node` (its header
//! says how) makes pods, kube-proxy-style Services and routes to the other
//! nodes' pods.
//!
//! The engine is the one `crate::docker` starts when none runs, stopped
//! with the last cluster.
//! The node image is imported from a tree built like the VM's initramfs:
//! the host's network tools and Python, busybox for the rest.
use std::{
    fs,
    hash::{DefaultHasher, Hash as _, Hasher as _},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    docker::{docker, ensure_dockerd, output, stop_dockerd},
    kind::{CLUSTER_LABEL, ROLE_LABEL},
    target_dir,
    vm::{fetch_busybox, image},
};

/// The node helper, installed in the image.
const KIND_NODE: &str = include_str!("kind_node.sh");
const IMAGE: &str = "tcptrace-kind-node";
/// Marks what this module made, for `down`.
const MADE_BY: &str = "tcptrace.kind-cluster";
const NODE_WAIT: Duration = Duration::from_secs(15);
/// Node i (1-based) is 10.89.0.(10+i); its pods are 10.244.(16i..16i+15).x.
const NODE_NET: &str = "10.89.0";

#[derive(Clone, Debug)]
pub struct Options {
    pub name: String,
    pub nodes: u8,
}

/// kind's node names: `<cluster>-control-plane`, `<cluster>-worker`,
/// `<cluster>-worker2`...
pub fn node_names(cluster: &str, nodes: u8) -> Vec<(String, &'static str)> {
    (1..=nodes)
        .map(|i| match i {
            1 => (format!("{cluster}-control-plane"), "control-plane"),
            2 => (format!("{cluster}-worker"), "worker"),
            n => (format!("{cluster}-worker{}", n - 1), "worker"),
        })
        .collect()
}

/// The node's address on the node network.
pub fn node_ip(index: u8) -> String {
    format!("{NODE_NET}.{}", 10 + u32::from(index))
}

fn network(cluster: &str) -> String {
    format!("tcptrace-kind-{cluster}")
}

pub fn up(opts: &Options) -> Result<()> {
    if !(1..=8).contains(&opts.nodes) {
        bail!("--nodes must be 1 to 8 (got {})", opts.nodes);
    }
    ensure_dockerd()?;
    let image = ensure_image()?;
    // Whatever a failed start made goes again.
    let made = start(opts, &image);
    if made.is_err() {
        let _ = remove_cluster(&opts.name);
    }
    made?;
    for (i, (name, role)) in node_names(&opts.name, opts.nodes).iter().enumerate() {
        eprintln!("xtask: node {name} ({role}) at {}", node_ip(i as u8 + 1));
    }
    Ok(())
}

fn start(opts: &Options, image: &str) -> Result<()> {
    let net = network(&opts.name);
    docker(&[
        "network",
        "create",
        "--driver",
        "bridge",
        "--subnet",
        &format!("{NODE_NET}.0/24"),
        "--opt",
        "com.docker.network.bridge.enable_ip_masquerade=false",
        "--label",
        &format!("{MADE_BY}={}", opts.name),
        &net,
    ])?;
    let nodes = node_names(&opts.name, opts.nodes);
    for (i, (name, role)) in nodes.iter().enumerate() {
        let index = (i + 1).to_string();
        docker(&[
            "run",
            "--detach",
            "--name",
            name,
            "--hostname",
            name,
            "--label",
            &format!("{CLUSTER_LABEL}={}", opts.name),
            "--label",
            &format!("{ROLE_LABEL}={role}"),
            "--label",
            &format!("{MADE_BY}={}", opts.name),
            // What kind's privileged nodes can do, but SYS_RESOURCE (this
            // sandbox lacks it, so --privileged fails here).
            "--cap-add",
            "ALL",
            "--cap-drop",
            "SYS_RESOURCE",
            "--security-opt",
            "seccomp=unconfined",
            // kind's nodes have their own cgroup namespace
            // (providers/docker/provision.go).
            "--cgroupns=private",
            "--network",
            &net,
            "--ip",
            &node_ip(i as u8 + 1),
            "--tmpfs",
            "/run",
            "--tmpfs",
            "/tmp",
            "--tmpfs",
            "/var/log",
            image,
            "/usr/local/bin/kind-node",
            "init",
            &index,
        ])?;
    }
    for (name, _) in &nodes {
        wait_ready(name)?;
    }
    // Every node routes the others' pods through their node address.
    for (i, (name, _)) in nodes.iter().enumerate() {
        for j in (1..=opts.nodes).filter(|&j| usize::from(j) != i + 1) {
            let cidr = format!("10.244.{}.0/20", 16 * u32::from(j));
            docker(&["exec", name, "kind-node", "route", &cidr, &node_ip(j)])?;
        }
    }
    Ok(())
}

fn wait_ready(node: &str) -> Result<()> {
    let deadline = Instant::now() + NODE_WAIT;
    while Instant::now() < deadline {
        if docker(&["exec", node, "test", "-f", "/run/kind-node/ready"]).is_ok() {
            return Ok(());
        }
        thread::sleep(Duration::from_millis(200));
    }
    let logs = output("docker", &["logs", node]).unwrap_or_default();
    bail!("node {node} did not come up within {NODE_WAIT:?}: {logs}")
}

/// Removes the cluster's containers and network, the image when no
/// cluster uses it any more, and the dockerd `up` started.
pub fn down(name: &str) -> Result<()> {
    let result = remove_cluster(name);
    let clusters_left = output(
        "docker",
        &["ps", "-aq", "--filter", &format!("label={MADE_BY}")],
    )
    .map(|o| !o.trim().is_empty())
    .unwrap_or(false);
    if !clusters_left {
        let images = output(
            "docker",
            &["images", "-q", "--filter", &format!("reference={IMAGE}")],
        )
        .unwrap_or_default();
        for id in images.split_whitespace() {
            let _ = docker(&["rmi", "--force", id]);
        }
        stop_dockerd()?;
    }
    result
}

fn remove_cluster(name: &str) -> Result<()> {
    if docker(&["info"]).is_err() {
        return Ok(());
    }
    let filter = format!("label={MADE_BY}={name}");
    let ids = output("docker", &["ps", "-aq", "--filter", &filter])?;
    for id in ids.split_whitespace() {
        docker(&["rm", "--force", "--volumes", id])?;
    }
    let nets = output("docker", &["network", "ls", "-q", "--filter", &filter])?;
    for id in nets.split_whitespace() {
        docker(&["network", "rm", id])?;
    }
    Ok(())
}

/// The node image, imported when this version of it is not there yet.
fn ensure_image() -> Result<String> {
    let busybox = fetch_busybox(&target_dir().join("vm"))?;
    let mut h = DefaultHasher::new();
    KIND_NODE.hash(&mut h);
    image::fingerprint(&busybox).hash(&mut h);
    let tag = format!("{IMAGE}:{:016x}", h.finish());
    if docker(&["image", "inspect", &tag]).is_ok() {
        return Ok(tag);
    }
    let t = Instant::now();
    let mut img = image::userland(&busybox)?;
    img.bytes(
        "/usr/local/bin/kind-node",
        KIND_NODE.as_bytes().to_vec(),
        0o755,
    );
    let root = target_dir().join("kind/rootfs");
    let _ = fs::remove_dir_all(&root);
    fs::create_dir_all(&root)?;
    img.write_dir(&root)?;
    let status = Command::new("sh")
        .args([
            "-c",
            "tar -C \"$0\" -c . | docker import - \"$1\" >/dev/null",
        ])
        .arg(&root)
        .arg(&tag)
        .status()
        .context("importing the node image")?;
    let _ = fs::remove_dir_all(&root);
    if !status.success() {
        bail!("docker import of the node image failed ({status})");
    }
    eprintln!(
        "xtask: node image {tag} built in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(tag)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_are_named_and_addressed_as_kind_does() {
        let names: Vec<String> = node_names("tt", 3).into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["tt-control-plane", "tt-worker", "tt-worker2"]);
        assert_eq!(node_names("tt", 2)[0].1, "control-plane");
        assert_eq!(node_ip(2), "10.89.0.12");
    }
}
