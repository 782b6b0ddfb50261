//! Cost of `Attributor::attribute` on cache hits (target: < 1 µs per event).
//! The host is a fake root: `/proc/<pid>/ns/net` links are plain symlinks to
//! `net:[N]`, cgroups are plain directories whose inodes act as cgroup ids.
use std::{
    fs,
    hint::black_box,
    net::IpAddr,
    os::unix::fs::{MetadataExt as _, symlink},
    path::Path,
    time::{Instant, SystemTime},
};

use criterion::{Criterion, criterion_group, criterion_main};
use tcptrace::{
    attribution::{AttributionConfig, Attributor, ServiceMap},
    model::{Endpoint, Event, EventKind},
};

const UID: &str = "5f3c1a2b-7d4e-4c8f-9a6b-0e1d2c3b4a59";
const CID: &str = "8a3f5e0c9b7d4e2f1a6c8b0d3e5f7a9c1b2d4e6f8a0c2e4b6d8f0a1c3e5b7d9f";
const POD_NETNS: u32 = 4026532100;
const NAT: &str = "-A KUBE-SERVICES -d 10.96.112.40/32 -p tcp -m comment --comment \"default/web:http cluster IP\" -m tcp --dport 80 -j KUBE-SVC-ULMVA6XWUIZQRCPD\n";

/// Writes a one-pod host under `root`; returns the container's cgroup id.
fn fake_host(root: &Path) -> u64 {
    let cgroup = format!(
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{CID}.scope",
        UID.replace('-', "_")
    );
    let cg_root = root.join("sys/fs/cgroup");
    fs::create_dir_all(cg_root.join(&cgroup)).expect("mkdir cgroup");
    fs::write(cg_root.join("cgroup.controllers"), "").expect("write");
    let logs = root.join(format!("var/log/pods/default_web-5d8f7_{UID}/nginx"));
    fs::create_dir_all(&logs).expect("mkdir logs");
    let proc = root.join("proc/100");
    fs::create_dir_all(proc.join("ns")).expect("mkdir proc");
    fs::create_dir_all(proc.join("net")).expect("mkdir proc net");
    symlink(format!("net:[{POD_NETNS}]"), proc.join("ns/net")).expect("symlink");
    fs::write(proc.join("cgroup"), format!("0::/{cgroup}\n")).expect("write");
    fs::write(
        proc.join("net/fib_trie"),
        "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- 10.244.0.7\n        /32 host LOCAL\n",
    )
    .expect("write");
    fs::metadata(cg_root.join(&cgroup)).expect("stat").ino()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("tempdir");
    let cgroup_id = fake_host(dir.path());
    let mut a = Attributor::new(AttributionConfig {
        host_root: dir.path().to_path_buf(),
        ..AttributionConfig::default()
    });
    a.set_services(ServiceMap::from_iptables_save(NAT));
    a.refresh(Instant::now());

    let ip = |s: &str| s.parse::<IpAddr>().expect("address");
    let mut by_cgroup = Event::new(
        SystemTime::now(),
        EventKind::Retransmit,
        Endpoint::new(ip("10.244.0.7"), 41234),
        Endpoint::new(ip("10.96.112.40"), 80),
        POD_NETNS,
    );
    by_cgroup.cgroup_id = Some(cgroup_id);
    let mut by_netns = by_cgroup.clone();
    by_netns.cgroup_id = None;
    a.attribute(&mut by_cgroup);
    assert!(
        by_cgroup.pod.is_some() && by_cgroup.dst.service.is_some(),
        "fake host resolves"
    );

    c.bench_function("attribute/cgroup_hit", |b| {
        b.iter(|| a.attribute(black_box(&mut by_cgroup)));
    });
    c.bench_function("attribute/netns_hit", |b| {
        b.iter(|| a.attribute(black_box(&mut by_netns)));
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
