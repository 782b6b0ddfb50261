//! Userspace cost per event of each pipeline stage (target: the whole
//! pipeline at >= 1,000,000 events/s per core). Throughput is one element
//! per iteration, so criterion reports events/s directly; `cargo xtask
//! bench` reads the estimates back into BENCHMARKS.md.
//!
//! The input is a refused-connect storm as the kernel reports it (reset
//! sent, reset received, failed connect, socket error) plus SYN
//! retransmits, over 4096 distinct sockets so the diagnoser's per-socket
//! state is exercised and evicted as on a busy node.
use std::{
    hint::black_box,
    io,
    path::Path,
    time::{Duration, UNIX_EPOCH},
};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use tcptrace::{
    attribution::{AttributionConfig, Attributor},
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

/// The running kernel's names (as tcptrace uses them); placeholders
/// ("UNKNOWN(n)") where the kernel has no BTF, which costs the same.
fn names() -> KernelNames {
    KernelBtf::load(Path::new(BTF_PATH))
        .map(|btf| KernelNames::from_btf(&btf, tcptrace::bpf::clock::DEFAULT_HZ))
        .unwrap_or_default()
}

/// Ring-buffer records of a refused-connect storm and SYN retransmits.
fn raw_records() -> Vec<Vec<u8>> {
    let mut out = Vec::with_capacity(SOCKETS * 5);
    for i in 0..SOCKETS {
        let port = 20_000 + i as u16;
        let base = RawEvent {
            ts_ns: 1_000_000_000 + i as u64 * 10_000,
            sk: 0xffff_8880_1000_0000 + (i as u64) * 0x800,
            cgroup_id: 7,
            location: 0,
            saddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [127, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            netns: NETNS,
            tgid: 4242,
            sport: port,
            dport: 9,
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
            agg_cpu: 0,
            comm: *b"storm\0\0\0\0\0\0\0\0\0\0\0",
            fin_ns: 0,
            fin_idle_jiffies: 0,
            connect_ms: 0,
            port_lo: 0,
            port_hi: 0,
            agg_generation: 0,
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
    let raw = raw_records();
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
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
