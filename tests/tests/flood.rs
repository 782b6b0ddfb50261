//! A flood into a tiny ring buffer: the storm is never slowed, what does
//! not fit is counted as lost, and delivered + lost adds up exactly.
use std::{
    net::{SocketAddr, TcpStream},
    thread,
    time::{Duration, Instant},
};

use tcptrace::{
    bpf::{Tracer, TracerOptions},
    model::EventKind,
};
use tcptrace_tests::Netns;

const CONNECTS: usize = 400;

fn counters(tracer: &Tracer, hook: &str) -> (u64, u64) {
    let stats = tracer.hook_stats().unwrap();
    let h = stats.iter().find(|h| h.hook == hook).unwrap();
    (h.seen, h.lost)
}

#[test]
fn losses_are_counted_exactly_and_nothing_blocks() {
    let mut tracer = Tracer::load(&TracerOptions {
        ring_buffer_bytes: 4096,
        ignore_self: false,
        ..TracerOptions::default()
    })
    .unwrap();
    tracer.drain(usize::MAX, |_| {});
    let ns = Netns::new("flood").unwrap();
    let (seen0, lost0) = counters(&tracer, "tcp_receive_reset");

    // Every refused connect resets once; nobody reads the ring meanwhile.
    let started = Instant::now();
    let refused = ns
        .run("tt-flood", || {
            let addr = SocketAddr::from(([127, 0, 0, 1], 9));
            (0..CONNECTS)
                .filter(|_| TcpStream::connect(addr).is_err())
                .count()
        })
        .unwrap();
    let storm = started.elapsed();
    assert_eq!(refused, CONNECTS);
    assert!(
        storm < Duration::from_secs(20),
        "the storm was slowed: {storm:?}"
    );

    // Softirq may still be finishing the last segments (slowly on an
    // emulated CPU): let the counters settle before the ring is read, or
    // records made while reading would overflow the count below.
    let total = |t: &Tracer| -> u64 {
        let stats = t.hook_stats().unwrap();
        stats.iter().map(|h| h.seen + h.lost).sum()
    };
    let settle = Instant::now();
    let mut last = total(&tracer);
    while settle.elapsed() < Duration::from_secs(5) {
        thread::sleep(Duration::from_millis(200));
        let now = total(&tracer);
        if now == last {
            break;
        }
        last = now;
    }

    let mut delivered_here = 0u64;
    let mut delivered_elsewhere = 0u64;
    let mut records = 0usize;
    let inode = ns.inode();
    tracer.drain(usize::MAX, |decoded| {
        records += 1;
        let ev = decoded.unwrap();
        if ev.kind == EventKind::ResetReceived {
            if ev.netns == inode {
                delivered_here += 1;
            } else {
                delivered_elsewhere += 1;
            }
        }
    });
    let (seen1, lost1) = counters(&tracer, "tcp_receive_reset");
    let (seen, lost) = (seen1 - seen0, lost1 - lost0);

    // 4096 bytes hold at most 28 records of 144 bytes (with headers).
    assert!(records <= 28, "{records} records in a 4 KiB ring");
    assert!(lost > 0, "a 4 KiB ring cannot hold {CONNECTS} resets");
    assert_eq!(
        seen,
        delivered_here + delivered_elsewhere,
        "seen counts what was delivered"
    );
    // Our storm is the only source of resets on a quiet machine (CI); other
    // namespaces' resets would also be counted in `lost`.
    assert_eq!(
        delivered_elsewhere, 0,
        "another process reset connections meanwhile"
    );
    assert_eq!(delivered_here + lost, CONNECTS as u64);
}

/// Events about tcptrace's own sockets are dropped in the kernel; the
/// socketless reset the kernel answers with is not tcptrace's and stays.
#[test]
fn own_sockets_are_ignored() {
    let mut tracer = Tracer::load(&TracerOptions::default()).unwrap();
    let ns = Netns::new("self").unwrap();
    ns.run("tt-self", || {
        let addr = SocketAddr::from(([127, 0, 0, 1], 9));
        TcpStream::connect(addr).unwrap_err()
    })
    .unwrap();
    thread::sleep(Duration::from_millis(200));
    let mut kinds = Vec::new();
    let inode = ns.inode();
    tracer.drain(usize::MAX, |decoded| {
        let ev = decoded.unwrap();
        if ev.netns == inode {
            kinds.push((ev.kind, ev.reason.clone()));
        }
    });
    assert_eq!(
        kinds,
        vec![(EventKind::ResetSent, Some("NO_SOCKET".to_string()))]
    );
}
