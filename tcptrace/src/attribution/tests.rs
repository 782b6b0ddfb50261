//! The resolver on a fake host root: `/proc/<pid>/ns/net` links are plain
//! symlinks to `net:[N]`, named namespaces and cgroups are plain files and
//! directories whose inodes stand in for the kernel's.
use std::{
    fs,
    net::IpAddr,
    os::unix::fs::{MetadataExt as _, symlink},
    path::{Path, PathBuf},
    thread,
    time::{Duration, Instant, SystemTime},
};

use super::*;
use crate::model::{EventKind, ServiceRef};

const WEB_UID: &str = "5f3c1a2b-7d4e-4c8f-9a6b-0e1d2c3b4a59";
const NGINX: &str = "8a3f5e0c9b7d4e2f1a6c8b0d3e5f7a9c1b2d4e6f8a0c2e4b6d8f0a1c3e5b7d9f";
const SIDECAR: &str = "1b2c3d4e5f60718293a4b5c6d7e8f90112233445566778899aabbccddeeff001";
const PROXY_UID: &str = "0d1e2f3a-4b5c-4d6e-8f70-8192a3b4c5d6";
const PROXY: &str = "feedfacecafebeef0123456789abcdef0123456789abcdef0123456789abcdef";
const GONE_UID: &str = "99999999-8888-4777-8666-555555555555";
const GONE: &str = "abcdefabcdefabcdefabcdefabcdefabcdefabcdefabcdefabcdefabcdefabcd";
const WEB_NETNS: u32 = 4026532100;
const HOST_NETNS: u32 = 4026531840;
const GONE_NETNS: u32 = 4026532500;

fn container_cgroup(qos: &str, uid: &str, cid: &str) -> String {
    let uid_ = uid.replace('-', "_");
    format!(
        "/kubepods.slice/kubepods-{qos}.slice/kubepods-{qos}-pod{uid_}.slice/cri-containerd-{cid}.scope"
    )
}

/// A fake host with a two-container pod (`default/web`), a hostNetwork pod
/// (`kube-system/kube-proxy`), a pod without a log dir, init in the host
/// namespace and a process in the named namespace `lab`.
struct FakeHost {
    dir: tempfile::TempDir,
    lab_netns: u32,
}

impl FakeHost {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let cg = root.join("sys/fs/cgroup");
        fs::create_dir_all(&cg).expect("mkdir cgroup");
        fs::write(cg.join("cgroup.controllers"), "cpu memory pids\n").expect("write");

        let pods = root.join("var/log/pods");
        let web_dir = pods.join(format!("default_web-5d8f7_{WEB_UID}"));
        let proxy_dir = pods.join(format!("kube-system_kube-proxy-x7k2p_{PROXY_UID}"));
        for d in [
            web_dir.join("nginx"),
            web_dir.join("sidecar"),
            proxy_dir.join("kube-proxy"),
        ] {
            fs::create_dir_all(&d).expect("mkdir pod log");
            fs::write(d.join("0.log"), "").expect("write log");
        }
        let links = root.join("var/log/containers");
        fs::create_dir_all(&links).expect("mkdir containers");
        symlink(
            web_dir.join("nginx/0.log"),
            links.join(format!("web-5d8f7_default_nginx-{NGINX}.log")),
        )
        .expect("symlink");

        fs::create_dir_all(root.join("run/netns")).expect("mkdir netns");
        fs::write(root.join("run/netns/lab"), "").expect("write netns");
        let lab_netns = u32::try_from(
            fs::metadata(root.join("run/netns/lab"))
                .expect("stat")
                .ino(),
        )
        .expect("small inode");

        let host = Self { dir, lab_netns };
        host.add_proc(1, HOST_NETNS, "/init.scope");
        fs::write(host.root().join("proc/1/net/fib_trie"), FIB_NODE).expect("write");
        host.add_proc(
            100,
            WEB_NETNS,
            &container_cgroup("besteffort", WEB_UID, NGINX),
        );
        host.add_proc(
            101,
            WEB_NETNS,
            &container_cgroup("besteffort", WEB_UID, SIDECAR),
        );
        fs::write(
            host.root().join("proc/100/net/fib_trie"),
            include_str!("fixtures/fib_trie"),
        )
        .expect("write");
        fs::write(
            host.root().join("proc/100/net/if_inet6"),
            include_str!("fixtures/if_inet6"),
        )
        .expect("write");
        host.add_proc(
            200,
            HOST_NETNS,
            &container_cgroup("burstable", PROXY_UID, PROXY),
        );
        // Every process of a namespace sees the same tables.
        fs::write(host.root().join("proc/200/net/fib_trie"), FIB_NODE).expect("write");
        host.add_proc(300, lab_netns, "/user.slice/user-0.slice/session-1.scope");
        host.add_proc(
            400,
            GONE_NETNS,
            &container_cgroup("besteffort", GONE_UID, GONE),
        );
        host
    }

    fn root(&self) -> &Path {
        self.dir.path()
    }

    fn cgroup_dir(&self, path: &str) -> PathBuf {
        self.root()
            .join("sys/fs/cgroup")
            .join(path.trim_start_matches('/'))
    }

    fn cgroup_id(&self, path: &str) -> u64 {
        fs::metadata(self.cgroup_dir(path))
            .expect("stat cgroup")
            .ino()
    }

    fn add_proc(&self, pid: u32, netns: u32, cgroup: &str) {
        let p = self.root().join(format!("proc/{pid}"));
        fs::create_dir_all(p.join("ns")).expect("mkdir ns");
        fs::create_dir_all(p.join("net")).expect("mkdir net");
        symlink(format!("net:[{netns}]"), p.join("ns/net")).expect("symlink ns");
        fs::write(p.join("cgroup"), format!("0::{cgroup}\n")).expect("write cgroup");
        fs::create_dir_all(self.cgroup_dir(cgroup)).expect("mkdir cgroup");
    }

    fn attributor(&self, scope: Option<NodeScope>) -> Attributor {
        Attributor::new(AttributionConfig {
            host_root: self.root().to_path_buf(),
            node_scope: scope,
            ..AttributionConfig::default()
        })
    }
}

const FIB_NODE: &str =
    "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 172.18.0.2\n        /32 host LOCAL\n";

fn ip(s: &str) -> IpAddr {
    s.parse().expect("test address")
}

fn event(netns: u32, cgroup_id: Option<u64>) -> Event {
    let mut ev = Event::new(
        SystemTime::UNIX_EPOCH,
        EventKind::Retransmit,
        Endpoint::new(ip("10.244.0.7"), 41234),
        Endpoint::new(ip("10.96.112.40"), 80),
        netns,
    );
    ev.cgroup_id = cgroup_id;
    ev
}

fn web(container: Option<&str>) -> PodRef {
    PodRef {
        namespace: "default".into(),
        name: "web-5d8f7".into(),
        uid: WEB_UID.into(),
        container: container.map(str::to_string),
    }
}

#[test]
fn cgroup_names_the_container_and_netns_names_the_pod() {
    let host = FakeHost::new();
    let mut a = host.attributor(None);

    let nginx = host.cgroup_id(&container_cgroup("besteffort", WEB_UID, NGINX));
    let mut ev = event(WEB_NETNS, Some(nginx));
    a.attribute(&mut ev);
    assert_eq!(
        ev.pod,
        Some(web(Some("nginx"))),
        "container named by its /var/log/containers link"
    );
    assert_eq!(ev.identity_level, IdentityLevel::Pod);

    // The sidecar has no link and the pod has two containers: name unknown.
    let sidecar = host.cgroup_id(&container_cgroup("besteffort", WEB_UID, SIDECAR));
    let mut ev = event(WEB_NETNS, Some(sidecar));
    a.attribute(&mut ev);
    assert_eq!(ev.pod, Some(web(None)));

    // Softirq events carry only the namespace.
    let mut ev = event(WEB_NETNS, None);
    a.attribute(&mut ev);
    assert_eq!(ev.pod, Some(web(None)));
    assert_eq!(ev.identity_level, IdentityLevel::Pod);
    assert_eq!(ev.netns_name, None);
}

#[test]
fn host_network_pods_are_told_apart_by_cgroup() {
    let host = FakeHost::new();
    let mut a = host.attributor(None);
    let proxy = host.cgroup_id(&container_cgroup("burstable", PROXY_UID, PROXY));
    let mut ev = event(HOST_NETNS, Some(proxy));
    a.attribute(&mut ev);
    let pod = ev.pod.expect("kube-proxy named");
    assert_eq!(
        (pod.namespace.as_str(), pod.name.as_str()),
        ("kube-system", "kube-proxy-x7k2p")
    );
    assert_eq!(
        pod.container.as_deref(),
        Some("kube-proxy"),
        "single-container pod"
    );

    // The node namespace alone names no pod; the process is the best we have.
    let mut ev = event(HOST_NETNS, Some(host.cgroup_id("/init.scope")));
    ev.pid = Some(1);
    ev.comm = Some("systemd".into());
    a.attribute(&mut ev);
    assert_eq!(ev.pod, None);
    assert_eq!(ev.identity_level, IdentityLevel::Process);
    let mut ev = event(HOST_NETNS, None);
    a.attribute(&mut ev);
    assert_eq!(ev.identity_level, IdentityLevel::Netns);
}

#[test]
fn named_netns_and_container_levels() {
    let host = FakeHost::new();
    let mut a = host.attributor(None);
    let mut ev = event(host.lab_netns, None);
    ev.pid = Some(300);
    a.attribute(&mut ev);
    assert_eq!(ev.netns_name.as_deref(), Some("lab"));
    assert_eq!(ev.identity_level, IdentityLevel::NetnsName);
    assert_eq!(ev.pod, None);

    // No log dir for this pod: uid and container id only.
    let mut ev = event(
        GONE_NETNS,
        Some(host.cgroup_id(&container_cgroup("besteffort", GONE_UID, GONE))),
    );
    a.attribute(&mut ev);
    assert_eq!(ev.identity_level, IdentityLevel::Container);
    let pod = ev.pod.expect("uid known");
    assert_eq!(
        (
            pod.uid.as_str(),
            pod.container.as_deref(),
            pod.name.as_str()
        ),
        (GONE_UID, Some(GONE), "")
    );
    assert!(a.take_warnings().is_empty(), "the fake host is complete");
}

#[test]
fn endpoints_name_pods_and_services() {
    let host = FakeHost::new();
    let mut a = host.attributor(None);
    a.set_services(ServiceMap::from_iptables_save(include_str!(
        "fixtures/iptables-save-nat"
    )));
    let web_svc = ServiceRef {
        namespace: "default".into(),
        name: "web".into(),
        port_name: Some("http".into()),
    };

    let mut ev = event(WEB_NETNS, None);
    a.attribute(&mut ev);
    assert_eq!(
        ev.src.pod,
        Some(web(None)),
        "pod IP from the namespace's fib_trie"
    );
    assert_eq!(ev.dst.service, Some(web_svc.clone()));
    assert_eq!(ev.dst.pod, None);

    // Node to a pod's IPv6 address; node to its own NodePort.
    let mut ev = event(HOST_NETNS, None);
    ev.src = Endpoint::new(ip("172.18.0.2"), 40000);
    ev.dst = Endpoint::new(ip("fd00:10:244::7"), 8080);
    a.attribute(&mut ev);
    assert_eq!((ev.src.pod, ev.dst.pod), (None, Some(web(None))));
    let mut ev = event(HOST_NETNS, None);
    ev.dst = Endpoint::new(ip("172.18.0.2"), 30080);
    a.attribute(&mut ev);
    assert_eq!(ev.dst.service, Some(web_svc));
    // A NodePort number on a foreign address is not the Service.
    let mut ev = event(HOST_NETNS, None);
    ev.dst = Endpoint::new(ip("198.51.100.9"), 30080);
    a.attribute(&mut ev);
    assert_eq!(ev.dst.service, None);
    assert_eq!(
        a.services().nodeport(30080).map(|s| s.name.as_str()),
        Some("web")
    );

    let mut with_warning = ServiceMap::default();
    with_warning.warnings.push("nft missing".into());
    a.set_services(with_warning);
    assert_eq!(a.take_warnings(), ["nft missing"]);
    assert!(a.take_warnings().is_empty());
}

#[test]
fn miss_rescans_at_most_once_a_second() {
    let host = FakeHost::new();
    let mut a = host.attributor(None);
    let mut ev = event(WEB_NETNS, None);
    a.attribute(&mut ev);
    assert!(ev.pod.is_some(), "first miss scans at once");

    host.add_proc(
        500,
        4026532600,
        &container_cgroup("besteffort", WEB_UID, NGINX),
    );
    let mut ev = event(4026532600, None);
    a.attribute(&mut ev);
    assert_eq!(ev.pod, None, "rate limited");
    assert!(
        a.missed_netns.is_empty(),
        "a rate-limited miss is not remembered"
    );
    thread::sleep(MISS_RESCAN_INTERVAL + Duration::from_millis(50));
    a.attribute(&mut ev);
    assert_eq!(ev.pod, Some(web(None)));

    // A key still unknown after a scan does not rescan again.
    let mut ev = event(4026539999, None);
    thread::sleep(MISS_RESCAN_INTERVAL + Duration::from_millis(50));
    a.attribute(&mut ev);
    let scanned = a.last_scan;
    assert!(a.missed_netns.contains(&4026539999));
    thread::sleep(MISS_RESCAN_INTERVAL + Duration::from_millis(50));
    a.attribute(&mut ev);
    assert_eq!(a.last_scan, scanned);
}

#[test]
fn vanished_pods_keep_their_name_for_the_grace_period() {
    let host = FakeHost::new();
    let mut a = host.attributor(None);
    let t0 = Instant::now();
    a.refresh(t0);
    let nginx_path = container_cgroup("besteffort", WEB_UID, NGINX);
    let nginx = host.cgroup_id(&nginx_path);

    for pid in [100, 101] {
        fs::remove_dir_all(host.root().join(format!("proc/{pid}"))).expect("rm proc");
    }
    let pod_slice = host
        .cgroup_dir(&nginx_path)
        .parent()
        .expect("pod slice")
        .to_path_buf();
    fs::remove_dir_all(pod_slice).expect("rm cgroup");
    fs::remove_dir_all(
        host.root()
            .join(format!("var/log/pods/default_web-5d8f7_{WEB_UID}")),
    )
    .expect("rm logs");

    let interval = AttributionConfig::default().refresh_interval;
    a.refresh(t0 + interval);
    assert_eq!(a.last_scan, Some(t0 + interval));
    let mut ev = event(WEB_NETNS, Some(nginx));
    a.attribute(&mut ev);
    assert_eq!(
        ev.pod,
        Some(web(Some("nginx"))),
        "still named within the grace period"
    );
    assert_eq!(ev.dst.service, None);
    let mut late = event(HOST_NETNS, None);
    late.dst = Endpoint::new(ip("10.244.0.7"), 8080);
    a.attribute(&mut late);
    assert_eq!(late.dst.pod, Some(web(None)));

    let after = t0 + AttributionConfig::default().grace_period + 2 * interval;
    a.refresh(after);
    assert!(!a.netns.contains_key(&WEB_NETNS));
    assert!(!a.cgroups.contains_key(&nginx));
    assert!(!a.pod_ips.contains_key(&ip("10.244.0.7")));
    // Not due yet: no scan.
    a.refresh(after + Duration::from_secs(1));
    assert_eq!(a.last_scan, Some(after));
}

#[test]
fn tables_are_bounded() {
    let host = FakeHost::new();
    let mut a = Attributor::new(AttributionConfig {
        host_root: host.root().to_path_buf(),
        max_entries: 3,
        ..AttributionConfig::default()
    });
    a.refresh(Instant::now());
    assert!(a.netns.len() <= 3 && a.cgroups.len() <= 3 && a.pod_ips.len() <= 3);
    let mut set = HashSet::new();
    for k in 0..10 {
        bounded_insert(&mut set, k, 3);
    }
    assert!(set.len() <= 3);
}

#[test]
fn node_scope_by_cgroup_subtree() {
    let host = FakeHost::new();
    let mut a = host.attributor(Some(NodeScope::CgroupPrefix("/kubepods.slice/".into())));
    let nginx = host.cgroup_id(&container_cgroup("besteffort", WEB_UID, NGINX));
    let mut ev = event(WEB_NETNS, Some(nginx));
    a.attribute(&mut ev);
    assert!(a.in_scope(&ev));
    assert!(
        a.in_scope(&event(WEB_NETNS, None)),
        "netns of an in-scope process"
    );
    assert!(!a.in_scope(&event(host.lab_netns, None)));
    assert!(!a.in_scope(&event(0, Some(host.cgroup_id("/init.scope")))));
    assert!(!a.in_scope(&event(4026539999, None)), "unknown");
    assert!(host.attributor(None).in_scope(&event(4026539999, None)));

    let scope = NodeScope::CgroupPrefix("/system.slice/docker-abc.scope".into());
    assert!(scope.contains_cgroup("/system.slice/docker-abc.scope"));
    assert!(scope.contains_cgroup("/system.slice/docker-abc.scope/kubelet.slice"));
    assert!(!scope.contains_cgroup("/system.slice/docker-abcd.scope"));
}

/// Cache-hit cost; run with
/// `cargo test --release -p tcptrace --lib attribution::tests::hit_cost -- --ignored --nocapture`.
#[test]
#[ignore = "timing; run in release"]
fn hit_cost() {
    let host = FakeHost::new();
    let mut a = host.attributor(None);
    a.set_services(ServiceMap::from_iptables_save(include_str!(
        "fixtures/iptables-save-nat"
    )));
    a.refresh(Instant::now());
    let nginx = host.cgroup_id(&container_cgroup("besteffort", WEB_UID, NGINX));
    let mut events = [
        event(WEB_NETNS, Some(nginx)),
        event(WEB_NETNS, None),
        event(HOST_NETNS, None),
    ];
    let n = 1_000_000u32;
    let start = Instant::now();
    for i in 0..n {
        let ev = &mut events[(i % 3) as usize];
        a.attribute(std::hint::black_box(ev));
    }
    let per_event = start.elapsed() / n;
    println!(
        "attribute(): {} ns/event on cache hits",
        per_event.as_nanos()
    );
    assert!(events[0].pod.is_some());
    if !cfg!(debug_assertions) {
        assert!(
            per_event < Duration::from_micros(1),
            "{per_event:?} per event"
        );
    }
}
