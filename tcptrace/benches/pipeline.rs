//! Userspace cost per event of each pipeline stage (target: the whole
//! pipeline at >= 1,000,000 events/s per core). Throughput is one element
//! per iteration, so criterion reports events/s directly; `cargo xtask
//! bench` reads the estimates back into BENCHMARKS.md.
//!
//! The input is a refused-connect storm as the kernel reports it (reset
//! sent, reset received, failed connect, socket error) plus SYN
//! retransmits. The stages and `full` run it over 4096 sockets of one
//! unattributed namespace. `node` runs it on a node as tcptrace meets one:
//! 110 pods (kubelet's default max-pods), each a container cgroup with its
//! log directory and a process in its own network namespace, kube-proxy's
//! rules for 5,000 Services that the failures are addressed to, and more
//! sockets than the diagnoser keeps (`max_socks`), so attribution names a
//! pod and a Service for every event and the diagnoser evicts.
use std::{
    fmt::Write as _,
    fs,
    hint::black_box,
    io,
    os::unix::fs::{MetadataExt as _, symlink},
    path::Path,
    time::{Duration, Instant, UNIX_EPOCH},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tcptrace::{
    attribution::{AttributionConfig, Attributor, ServiceMap},
    bpf::{
        decode::{Decoder, KernelNames},
        offsets::{BTF_PATH, KernelBtf},
    },
    diagnosis::{Diagnoser, DiagnoserConfig},
    model::{Event, Record, facts::NodeFacts},
    output::NdjsonWriter,
    pipeline::Pipeline,
};
use tcptrace_common::{AF_INET, Event as RawEvent, flag, kind};

const SOCKETS: usize = 4096;
const NETNS: u32 = 4026532100;

const PODS: usize = 110;
const SERVICES: usize = 5000;
/// More than `DiagnoserConfig::default().max_socks` (checked).
const NODE_SOCKETS: usize = 20_000;

/// Where one socket's records come from and go to.
#[derive(Clone, Copy)]
struct Addressing {
    cgroup_id: u64,
    netns: u32,
    saddr: [u8; 4],
    daddr: [u8; 4],
    dport: u16,
}

/// Writes `PODS` pods under the host root `root` the way kubelet (systemd
/// cgroup driver, containerd) and the kernel lay them out; returns each
/// pod's (container cgroup id, network namespace inode, pod IP).
fn fake_node(root: &Path) -> Vec<(u64, u32, [u8; 4])> {
    let cg_root = root.join("sys/fs/cgroup");
    fs::create_dir_all(&cg_root).expect("mkdir cgroup root");
    fs::write(cg_root.join("cgroup.controllers"), "").expect("write");
    (0..PODS)
        .map(|i| {
            let uid = format!("5f3c1a2b-7d4e-4c8f-9a6b-{i:012x}");
            let cid = format!("{:064x}", 0x8a3f_5e0c_9b7d_4e2f_u128 * (i as u128 + 1));
            let cgroup = format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{cid}.scope",
                uid.replace('-', "_")
            );
            fs::create_dir_all(cg_root.join(&cgroup)).expect("mkdir cgroup");
            let logs = root.join(format!("var/log/pods/shop_web-{i}-5d8f7_{uid}/web"));
            fs::create_dir_all(&logs).expect("mkdir logs");
            let netns = NETNS + 1 + i as u32;
            let ip = [10, 244, (i / 250) as u8, (2 + i % 250) as u8];
            let proc = root.join(format!("proc/{}", 1000 + i));
            fs::create_dir_all(proc.join("ns")).expect("mkdir proc");
            fs::create_dir_all(proc.join("net")).expect("mkdir proc net");
            symlink(format!("net:[{netns}]"), proc.join("ns/net")).expect("symlink");
            fs::write(proc.join("cgroup"), format!("0::/{cgroup}\n")).expect("write");
            fs::write(
                proc.join("net/fib_trie"),
                format!(
                    "Main:\n  +-- 0.0.0.0/0 3 0 5\n     |-- {}.{}.{}.{}\n        /32 host LOCAL\n",
                    ip[0], ip[1], ip[2], ip[3]
                ),
            )
            .expect("write");
            let id = fs::metadata(cg_root.join(&cgroup)).expect("stat").ino();
            (id, netns, ip)
        })
        .collect()
}

/// The ClusterIP of Service `i`.
fn cluster_ip(i: usize) -> [u8; 4] {
    [10, 96, (i / 250) as u8, (1 + i % 250) as u8]
}

/// kube-proxy's nat table (iptables mode, as `iptables-save` prints it)
/// for `SERVICES` Services of one endpoint each. The chain suffixes stand
/// in for kube-proxy's hashes (base32 of a SHA-256), which tcptrace does
/// not read.
fn kube_proxy_rules() -> String {
    let mut out = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    for i in 0..SERVICES {
        let [a, b, c, d] = cluster_ip(i);
        let name = format!("shop/svc-{i}:http");
        let svc = format!("KUBE-SVC-{i:016X}");
        let sep = format!("KUBE-SEP-{:016X}", i + SERVICES);
        let ep = format!("10.244.{}.{}", i / 250 % 4, 2 + i % 110);
        let _ = write!(
            out,
            "-A KUBE-SERVICES -d {a}.{b}.{c}.{d}/32 -p tcp -m comment --comment \"{name} cluster IP\" -m tcp --dport 80 -j {svc}\n\
             -A {svc} -m comment --comment \"{name} -> {ep}:8080\" -j {sep}\n\
             -A {sep} -s {ep}/32 -m comment --comment \"{name}\" -j KUBE-MARK-MASQ\n\
             -A {sep} -p tcp -m comment --comment \"{name}\" -m tcp -j DNAT --to-destination {ep}:8080\n"
        );
    }
    out.push_str("COMMIT\n");
    out
}

/// The running kernel's names (as tcptrace uses them); placeholders
/// ("UNKNOWN(n)") where the kernel has no BTF, which costs the same.
fn names() -> KernelNames {
    KernelBtf::load(Path::new(BTF_PATH))
        .map(|btf| KernelNames::from_btf(&btf, tcptrace::bpf::clock::DEFAULT_HZ))
        .unwrap_or_default()
}

/// Ring-buffer records of a refused-connect storm and SYN retransmits over
/// `sockets` sockets, each addressed by `addressing`.
fn raw_records(sockets: usize, addressing: impl Fn(usize) -> Addressing) -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(sockets * 5);
    let v4 = |a: [u8; 4]| {
        let mut ip = [0u8; 16];
        ip[..4].copy_from_slice(&a);
        ip
    };
    for i in 0..sockets {
        let port = 20_000 + (i % 40_000) as u16;
        let at = addressing(i);
        let base = RawEvent {
            ts_ns: 1_000_000_000 + i as u64 * 10_000,
            sk: 0xffff_8880_1000_0000 + (i as u64) * 0x800,
            cgroup_id: at.cgroup_id,
            location: 0,
            saddr: v4(at.saddr),
            daddr: v4(at.daddr),
            netns: at.netns,
            tgid: 4242,
            sport: port,
            dport: at.dport,
            kind: kind::RESET_SENT,
            family: AF_INET,
            state: 7,
            old_state: 0,
            errno: 0,
            reason: 1,
            flags: flag::REASON_KNOWN,
            idle_jiffies: 0,
            since_send_jiffies: 0,
            keepalive_jiffies: 0,
            srtt_us: 0,
            total_retrans: 0,
            tcp_flags: 0,
            _pad: 0,
            storm_cpu: 0,
            comm: *b"storm\0\0\0\0\0\0\0\0\0\0\0",
            fin_ns: 0,
            fin_idle_jiffies: 0,
            connect_ms: 0,
            port_lo: 0,
            port_hi: 0,
            storm_generation: 0,
        };
        let owned = RawEvent {
            flags: flag::OWNER_KNOWN | flag::TCP_DETAIL,
            state: 2,
            srtt_us: 20,
            ..base
        };
        let mut sent = base;
        sent.sk = 0;
        out.push(sent);
        out.push(RawEvent {
            kind: kind::RESET_RECEIVED,
            ..owned
        });
        out.push(RawEvent {
            kind: kind::STATE_CHANGE,
            state: 7,
            old_state: 2,
            flags: flag::OWNER_KNOWN,
            ..owned
        });
        out.push(RawEvent {
            kind: kind::SOCKET_ERROR,
            errno: -111,
            state: 7,
            ..owned
        });
        out.push(RawEvent {
            kind: kind::RETRANSMIT,
            tcp_flags: 0x02,
            total_retrans: 1,
            flags: owned.flags | flag::TCP_FLAGS_KNOWN,
            ..owned
        });
    }
    out.iter().map(bytes).collect()
}

fn bytes(r: &RawEvent) -> Vec<u8> {
    // SAFETY: RawEvent is repr(C), Copy and without padding bytes.
    #[allow(unsafe_code)]
    unsafe {
        std::slice::from_raw_parts((r as *const RawEvent).cast::<u8>(), size_of::<RawEvent>())
    }
    .to_vec()
}

fn decoder() -> Decoder {
    Decoder::new(names(), UNIX_EPOCH + Duration::from_secs(1_700_000_000))
}

fn events(raw: &[Vec<u8>]) -> Vec<Event> {
    let mut d = decoder();
    raw.iter()
        .map(|b| d.decode(b).expect("bench records decode"))
        .collect()
}

/// Cycles through `items` one per call.
fn cycle<'a, T>(items: &'a [T]) -> impl FnMut() -> &'a T {
    let mut i = 0;
    move || {
        let item = &items[i];
        i = if i + 1 == items.len() { 0 } else { i + 1 };
        item
    }
}

fn bench(c: &mut Criterion) {
    let raw = raw_records(SOCKETS, |_| Addressing {
        cgroup_id: 7,
        netns: NETNS,
        saddr: [127, 0, 0, 1],
        daddr: [127, 0, 0, 1],
        dport: 9,
    });
    let evs = events(&raw);
    let facts = NodeFacts::default();
    let host = tempfile::tempdir().expect("tempdir");

    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(1));

    let mut d = decoder();
    let mut next = cycle(&raw);
    g.bench_function("decode", |b| b.iter(|| d.decode(black_box(next())).ok()));

    let mut diag = Diagnoser::new(DiagnoserConfig::default());
    let mut next = cycle(&evs);
    g.bench_function("diagnose", |b| {
        b.iter(|| diag.observe(black_box(next()), &facts));
    });

    let records: Vec<Record> = evs
        .iter()
        .map(|e| Record::Event(Box::new(e.clone())))
        .collect();
    let mut sink = NdjsonWriter::new(io::sink());
    let mut next = cycle(&records);
    g.bench_function("ndjson", |b| {
        b.iter(|| sink.write(black_box(next())).expect("sink"));
    });

    // Everything run.rs does per record: decode, attribute, diagnose, write.
    let attributor = Attributor::new(AttributionConfig {
        host_root: host.path().to_path_buf(),
        ..AttributionConfig::default()
    });
    let mut pipeline = Pipeline::new(attributor, DiagnoserConfig::default());
    let mut d = decoder();
    let mut sink = NdjsonWriter::new(io::sink());
    let mut next = cycle(&raw);
    g.bench_function("full", |b| {
        b.iter(|| {
            let ev = d.decode(black_box(next())).expect("decode");
            for r in &pipeline.event(ev).records {
                sink.write(r).expect("sink");
            }
        });
    });

    // The same on a realistic node.
    assert!(NODE_SOCKETS > DiagnoserConfig::default().max_socks);
    let node = tempfile::tempdir().expect("tempdir");
    let pods = fake_node(node.path());
    let raw = raw_records(NODE_SOCKETS, |i| {
        let (cgroup_id, netns, saddr) = pods[i % PODS];
        Addressing {
            cgroup_id,
            netns,
            saddr,
            daddr: cluster_ip(i % SERVICES),
            dport: 80,
        }
    });
    let mut attributor = Attributor::new(AttributionConfig {
        host_root: node.path().to_path_buf(),
        ..AttributionConfig::default()
    });
    attributor.refresh(Instant::now());
    let mut pipeline = Pipeline::new(attributor, DiagnoserConfig::default());
    pipeline.set_services(ServiceMap::from_iptables_save(&kube_proxy_rules()));
    let mut d = decoder();
    // Attribution does its work: every event written names its pod and
    // its Service.
    let mut named = 0;
    for bytes in raw.iter().step_by(97) {
        for r in pipeline.event(d.decode(bytes).expect("decode")).records {
            if let Record::Event(e) = r {
                assert!(
                    e.pod.is_some() && e.dst.service.is_some(),
                    "the node names every event: {e:?}"
                );
                named += 1;
            }
        }
    }
    assert!(named > 0, "the node bench wrote no event");
    let mut sink = NdjsonWriter::new(io::sink());
    let mut next = cycle(&raw);
    g.bench_function("node", |b| {
        b.iter(|| {
            let ev = d.decode(black_box(next())).expect("decode");
            for r in &pipeline.event(ev).records {
                sink.write(r).expect("sink");
            }
        });
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
