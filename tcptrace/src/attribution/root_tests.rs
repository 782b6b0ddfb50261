//! Root only: real network namespaces, a real cgroup v2 directory named the
//! kubelet way and real processes in them, seen through a host root whose
//! `proc`, `sys` and `run/netns` link to the live ones. Touches nothing in
//! the root network namespace and sends no traffic.
use std::{
    fs,
    io::Write as _,
    os::unix::fs::{MetadataExt as _, symlink},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant, SystemTime},
};

use super::*;
use crate::model::{EventKind, ServiceRef};
use crate::node::{self, host::cgroup2_mount};
use crate::testing::cannot_run;

/// Undoes everything the test set up, also when it panics.
struct Cleanup {
    children: Vec<Child>,
    cgroup_root: PathBuf,
    /// Leaf first.
    cgroup_dirs: Vec<PathBuf>,
    netns: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
        // A cgroup with processes cannot be removed: move any left out first.
        for dir in &self.cgroup_dirs {
            if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
                for pid in procs.lines() {
                    let _ = fs::write(self.cgroup_root.join("cgroup.procs"), pid);
                }
            }
        }
        for dir in &self.cgroup_dirs {
            let _ = fs::remove_dir(dir);
        }
        for ns in &self.netns {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("run ip");
    assert!(status.success(), "ip {args:?} failed");
}

fn netns_inode(path: &Path) -> u32 {
    u32::try_from(fs::metadata(path).expect("stat netns").ino()).expect("netns inode fits u32")
}

/// Starts `sleep 30` in the named namespace and waits until it is there.
fn sleep_in(name: &str, cleanup: &mut Cleanup) -> u32 {
    let file = format!("/run/netns/{name}");
    let want = format!("net:[{}]", netns_inode(Path::new(&file)));
    let child = Command::new("nsenter")
        .arg(format!("--net={file}"))
        .args(["sleep", "30"])
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn nsenter sleep");
    let pid = child.id();
    cleanup.children.push(child);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !fs::read_link(format!("/proc/{pid}/ns/net"))
        .is_ok_and(|l| l.to_string_lossy() == want.as_str())
    {
        assert!(Instant::now() < deadline, "sleep never entered {name}");
        thread::sleep(Duration::from_millis(10));
    }
    pid
}

#[test]
fn names_a_real_pod_netns_cgroup_and_named_netns() {
    if !nix::unistd::geteuid().is_root() {
        return cannot_run("needs root (network namespaces and cgroups)");
    }
    let Some(cgroup_root) = cgroup2_mount(Path::new("/")) else {
        panic!("no writable cgroup v2 hierarchy at /sys/fs/cgroup or /sys/fs/cgroup/unified");
    };
    let me = std::process::id();
    let uid = format!("7e1d2c3b-4a59-4f3c-8a2b-{me:012x}");
    let cid = format!("{:064x}", u128::from(me) * 0x1234_5678_9abc_def1);
    let mut cleanup = Cleanup {
        children: Vec::new(),
        cgroup_root: cgroup_root.clone(),
        cgroup_dirs: Vec::new(),
        netns: Vec::new(),
    };

    // Cgroup named the kubelet way (systemd driver), under a test slice.
    let slice = format!("/tcptrace-test-{me}.slice");
    let parts = [
        slice.trim_start_matches('/').to_string(),
        "kubepods.slice".into(),
        "kubepods-besteffort.slice".into(),
        format!("kubepods-besteffort-pod{}.slice", uid.replace('-', "_")),
        format!("cri-containerd-{cid}.scope"),
    ];
    let mut dir = cgroup_root.clone();
    for part in parts {
        dir.push(part);
        fs::create_dir(&dir)
            .unwrap_or_else(|e| panic!("cgroup fs not writable at {}: {e}", dir.display()));
        cleanup.cgroup_dirs.insert(0, dir.clone());
    }
    let container_cgroup_id = fs::metadata(&dir).expect("stat cgroup").ino();

    let pod_ns = format!("tcptrace-attr-{me}");
    let plain_ns = format!("tcptrace-attr-{me}-plain");
    for ns in [&pod_ns, &plain_ns] {
        ip(&["netns", "add", ns]);
        cleanup.netns.push(ns.clone());
    }
    ip(&["-n", &pod_ns, "link", "set", "lo", "up"]);
    ip(&["-n", &pod_ns, "addr", "add", "10.244.77.5/32", "dev", "lo"]);

    let pod_pid = sleep_in(&pod_ns, &mut cleanup);
    fs::File::options()
        .write(true)
        .open(dir.join("cgroup.procs"))
        .and_then(|mut f| f.write_all(pod_pid.to_string().as_bytes()))
        .expect("move sleep into the pod cgroup");
    sleep_in(&plain_ns, &mut cleanup);

    // Host root: live proc/sys/run/netns, fixture pod logs.
    let root = tempfile::tempdir().expect("tempdir");
    symlink("/proc", root.path().join("proc")).expect("symlink proc");
    symlink("/sys", root.path().join("sys")).expect("symlink sys");
    fs::create_dir_all(root.path().join("run")).expect("mkdir run");
    symlink("/run/netns", root.path().join("run/netns")).expect("symlink netns");
    let pod_dir = root
        .path()
        .join(format!("var/log/pods/shop_cart-6b9f4_{uid}"));
    for c in ["cart", "envoy"] {
        fs::create_dir_all(pod_dir.join(c)).expect("mkdir pod log");
    }
    fs::create_dir_all(root.path().join("var/log/containers")).expect("mkdir containers");
    symlink(
        pod_dir.join("cart/0.log"),
        root.path()
            .join(format!("var/log/containers/cart-6b9f4_shop_cart-{cid}.log")),
    )
    .expect("symlink container log");

    let mut a = Attributor::new(AttributionConfig {
        host_root: root.path().to_path_buf(),
        node_scope: Some(NodeScope::CgroupPrefix(slice.clone())),
        ..AttributionConfig::default()
    });
    let pod_netns = netns_inode(Path::new(&format!("/run/netns/{pod_ns}")));
    let plain_netns = netns_inode(Path::new(&format!("/run/netns/{plain_ns}")));
    let new_event = |netns, cgroup_id| {
        let mut ev = Event::new(
            SystemTime::now(),
            EventKind::ResetReceived,
            Endpoint::new("10.244.77.5".parse().expect("addr"), 40000),
            Endpoint::new("10.96.0.10".parse().expect("addr"), 53),
            netns,
        );
        ev.cgroup_id = cgroup_id;
        ev
    };

    // By cgroup id: names the exact container.
    let mut ev = new_event(pod_netns, Some(container_cgroup_id));
    a.attribute(&mut ev);
    let cart = PodRef {
        namespace: "shop".into(),
        name: "cart-6b9f4".into(),
        uid: uid.clone(),
        container: Some("cart".into()),
    };
    assert_eq!(ev.pod, Some(cart.clone()));
    assert_eq!(ev.identity_level, IdentityLevel::Pod);
    assert_eq!(ev.netns_name.as_deref(), Some(pod_ns.as_str()));
    assert!(a.in_scope(&ev));

    // By netns inode only (softirq): the pod, container unknown (two containers).
    let mut ev = new_event(pod_netns, None);
    a.attribute(&mut ev);
    let pod_only = PodRef {
        container: None,
        ..cart
    };
    assert_eq!(ev.pod, Some(pod_only.clone()));
    assert_eq!(ev.identity_level, IdentityLevel::Pod);
    assert_eq!(
        ev.src.pod,
        Some(pod_only),
        "pod IP read from the namespace's fib_trie"
    );
    assert!(a.in_scope(&ev));

    // A plain named namespace.
    let mut ev = new_event(plain_netns, None);
    a.attribute(&mut ev);
    assert_eq!(ev.pod, None);
    assert_eq!(ev.netns_name.as_deref(), Some(plain_ns.as_str()));
    assert_eq!(ev.identity_level, IdentityLevel::NetnsName);
    assert!(!a.in_scope(&ev), "outside the node's cgroup subtree");

    // kube-proxy-style rules inside the pod namespace, read back by the real tools.
    let iptables = |args: &[&str]| {
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{pod_ns}"))
            .arg("iptables")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    };
    let rules_added = iptables(&["-t", "nat", "-N", "KUBE-SERVICES"])
        && iptables(&[
            "-t",
            "nat",
            "-A",
            "KUBE-SERVICES",
            "-d",
            "10.96.0.10/32",
            "-p",
            "tcp",
            "-m",
            "comment",
            "--comment",
            "kube-system/kube-dns:dns-tcp cluster IP",
            "-m",
            "tcp",
            "--dport",
            "53",
            "-j",
            "RETURN",
        ]);
    let nft_rules = "table ip kube-proxy {\n\
        chain service-ULMVA6XW-default/web/tcp/http { }\n\
        map service-nodeports { type inet_proto . inet_service : verdict; \
        elements = { tcp . 30080 : goto service-ULMVA6XW-default/web/tcp/http } }\n}\n";
    let nft_added = Command::new("nsenter")
        .arg(format!("--net=/run/netns/{pod_ns}"))
        .args(["nft", "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            c.stdin
                .take()
                .expect("piped stdin")
                .write_all(nft_rules.as_bytes())?;
            c.wait()
        })
        .is_ok_and(|s| s.success());
    let services = ServiceMap::from_dumps(&node::kube_proxy::read_rules(Some(Path::new(
        &format!("/run/netns/{pod_ns}"),
    ))));
    if rules_added {
        let dns = ServiceRef {
            namespace: "kube-system".into(),
            name: "kube-dns".into(),
            port_name: Some("dns-tcp".into()),
        };
        assert_eq!(
            services.virtual_ip("10.96.0.10".parse().expect("addr"), 53),
            Some(&dns)
        );
        a.set_services(services.clone());
        let mut ev = new_event(pod_netns, None);
        a.attribute(&mut ev);
        assert_eq!(ev.dst.service, Some(dns));
    } else {
        cannot_run(
            "iptables rules could not be added in the test namespace: no iptables-save check",
        );
    }
    if nft_added {
        assert_eq!(
            services.nodeport(30080).map(|s| s.name.as_str()),
            Some("web")
        );
    } else {
        cannot_run("nft rules could not be added in the test namespace: no nft check");
    }
    eprintln!("service collection warnings: {:?}", services.warnings);
    drop(cleanup);
    assert!(
        !cgroup_root.join(slice.trim_start_matches('/')).exists(),
        "cgroups removed"
    );
    assert!(
        !Path::new(&format!("/run/netns/{pod_ns}")).exists(),
        "namespace removed"
    );
}

/// The kernel gives a new namespace the inode of a freed one: events of the
/// new namespace must not be named after the old one the cache still holds.
#[test]
fn a_reused_netns_inode_names_the_new_namespace() {
    if !nix::unistd::geteuid().is_root() {
        return cannot_run("needs root (network namespaces)");
    }
    let me = std::process::id();
    let mut cleanup = Cleanup {
        children: Vec::new(),
        cgroup_root: PathBuf::new(),
        cgroup_dirs: Vec::new(),
        netns: Vec::new(),
    };
    let old_ns = format!("tcptrace-reuse-{me}-old");
    ip(&["netns", "add", &old_ns]);
    cleanup.netns.push(old_ns.clone());
    sleep_in(&old_ns, &mut cleanup);
    let root = tempfile::tempdir().expect("tempdir");
    symlink("/proc", root.path().join("proc")).expect("symlink proc");
    fs::create_dir_all(root.path().join("run")).expect("mkdir run");
    symlink("/run/netns", root.path().join("run/netns")).expect("symlink netns");
    let mut a = Attributor::new(AttributionConfig {
        host_root: root.path().to_path_buf(),
        ..AttributionConfig::default()
    });
    let inode = netns_inode(Path::new(&format!("/run/netns/{old_ns}")));
    let event = || {
        Event::new(
            SystemTime::now(),
            EventKind::ResetReceived,
            Endpoint::new("10.244.78.5".parse().expect("addr"), 40000),
            Endpoint::new("10.244.78.6".parse().expect("addr"), 80),
            inode,
        )
    };
    let mut ev = event();
    a.attribute(&mut ev);
    assert_eq!(ev.netns_name.as_deref(), Some(old_ns.as_str()));

    // Free the namespace (its last process and its name), then create
    // namespaces until one gets its inode (the kernel frees it shortly after).
    for mut child in cleanup.children.drain(..) {
        let _ = child.kill();
        let _ = child.wait();
    }
    ip(&["netns", "del", &old_ns]);
    cleanup.netns.clear();
    let new_ns = format!("tcptrace-reuse-{me}-new");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        ip(&["netns", "add", &new_ns]);
        if netns_inode(Path::new(&format!("/run/netns/{new_ns}"))) == inode {
            cleanup.netns.push(new_ns.clone());
            break;
        }
        ip(&["netns", "del", &new_ns]);
        assert!(
            Instant::now() < deadline,
            "no new namespace got the freed inode {inode} within 10 s"
        );
        thread::sleep(Duration::from_millis(50));
    }
    // Past the check interval, the cached entry is checked and replaced.
    thread::sleep(MISS_RESCAN_INTERVAL);
    let mut ev = event();
    a.attribute(&mut ev);
    assert_eq!(ev.netns_name.as_deref(), Some(new_ns.as_str()));
}
