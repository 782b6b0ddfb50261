//! Real failures in private namespaces, asserted record by record.
use std::{
    io::{ErrorKind, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    thread,
    time::Duration,
};

use nix::sys::socket::{setsockopt, sockopt};
use tcptrace::model::{Errno, Event, EventKind, Reason, TcpFlags, TcpState};
use tcptrace_tests::{Netns, capture, show};

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn of_kind(events: &[Event], kind: EventKind) -> Vec<&Event> {
    events.iter().filter(|e| e.kind == kind).collect()
}

const WAIT: Duration = Duration::from_secs(5);

#[test]
fn syn_retransmit_and_netfilter_drop_are_recorded_exactly() {
    let mut cap = capture();
    let ns = Netns::new("syn").unwrap();
    ns.exec(&[
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "81", "-j", "DROP",
    ])
    .unwrap();
    let err = ns
        .run("tt-syn-client", || {
            TcpStream::connect_timeout(&addr(81), Duration::from_millis(1500)).unwrap_err()
        })
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::TimedOut);

    let events = cap.wait_for(ns.inode(), WAIT, |ev| {
        !of_kind(ev, EventKind::StateChange).is_empty() && !of_kind(ev, EventKind::Drop).is_empty()
    });
    let rtx = of_kind(&events, EventKind::Retransmit);
    assert_eq!(
        rtx.len(),
        1,
        "one SYN retransmit within 1.5 s:\n{}",
        show(&events)
    );
    let r = rtx[0];
    assert_eq!(r.state, Some(TcpState::SynSent));
    assert_eq!(r.tcp_flags, Some(TcpFlags::SYN));
    assert_eq!(r.dst, tcptrace::model::Endpoint::new(addr(81).ip(), 81));
    assert_eq!(r.src.ip, addr(81).ip());
    assert_ne!(r.src.port, 0);
    assert_eq!(r.netns, ns.inode());
    assert_eq!(r.pid, Some(std::process::id()));
    assert_eq!(r.comm.as_deref(), Some("tt-syn-client"));
    assert_eq!(r.tcp, None, "no idle/keepalive detail before the handshake");

    let closed = of_kind(&events, EventKind::StateChange);
    assert_eq!(closed.len(), 1, "{}", show(&events));
    assert_eq!(closed[0].old_state, Some(TcpState::SynSent));
    assert_eq!(closed[0].state, Some(TcpState::Close));
    assert_eq!((closed[0].src.port, closed[0].dst.port), (r.src.port, 81));
    assert_eq!(closed[0].sock, r.sock);

    // The SYN and its retransmit, dropped by the DROP rule.
    let drops = of_kind(&events, EventKind::Drop);
    assert_eq!(drops.len(), 2, "{}", show(&events));
    for d in drops {
        assert_eq!(d.reason, Some(Reason::NetfilterDrop));
        assert_eq!(d.tcp_flags, Some(TcpFlags::SYN));
        assert_eq!((d.src.port, d.dst.port), (r.src.port, 81));
        // iptables-legacy drops in nf_hook_slow, iptables-nft in nft_do_chain.
        let location = d.location.as_deref().unwrap_or_default();
        assert!(
            location.starts_with("nf_hook_slow+") || location.starts_with("nft_do_chain+"),
            "{location}"
        );
    }
}

#[test]
fn refused_connect_gives_exactly_the_reset_pair() {
    let mut cap = capture();
    let ns = Netns::new("refused").unwrap();
    let err = ns
        .run("tt-refused", || TcpStream::connect(addr(82)).unwrap_err())
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::ConnectionRefused);

    cap.wait_for(ns.inode(), WAIT, |ev| {
        !of_kind(ev, EventKind::ResetReceived).is_empty()
            && !of_kind(ev, EventKind::ResetSent).is_empty()
    });
    // Anything else about this connect would follow within microseconds.
    let events = cap.wait_for(ns.inode(), Duration::from_millis(300), |_| false);
    let received = of_kind(&events, EventKind::ResetReceived);
    assert_eq!(received.len(), 1, "{}", show(&events));
    let rr = received[0];
    assert_eq!(rr.state, Some(TcpState::SynSent));
    assert_eq!(rr.dst.port, 82);
    assert_eq!(rr.comm.as_deref(), Some("tt-refused"));
    let client_port = rr.src.port;

    let sent = of_kind(&events, EventKind::ResetSent);
    assert_eq!(sent.len(), 1, "{}", show(&events));
    assert_eq!(sent[0].reason, Some(Reason::NoSocket));
    assert_eq!(sent[0].sock, None, "no listening socket answered");
    let ports = [sent[0].src.port, sent[0].dst.port];
    assert!(
        ports.contains(&82) && ports.contains(&client_port),
        "{}",
        show(&events)
    );

    assert_eq!(rr.pid, Some(std::process::id()));

    // The reset implies the failed connect and its ECONNREFUSED: the
    // state change and the socket error it causes are not repeated.
    assert_eq!(events.len(), 2, "{}", show(&events));
}

#[test]
fn data_retransmit_on_established() {
    let mut cap = capture();
    let ns = Netns::new("data").unwrap();
    let (client, _server) = ns
        .run("tt-data", || {
            let l = TcpListener::bind(addr(83)).unwrap();
            let c = TcpStream::connect(addr(83)).unwrap();
            let (s, _) = l.accept().unwrap();
            (c, s)
        })
        .unwrap();
    let client_port = client.local_addr().unwrap().port();
    ns.exec(&[
        "iptables", "-A", "INPUT", "-p", "tcp", "--dport", "83", "-j", "DROP",
    ])
    .unwrap();
    (&client).write_all(b"hello").unwrap();

    let events = cap.wait_for(ns.inode(), WAIT, |ev| {
        !of_kind(ev, EventKind::Retransmit).is_empty()
    });
    let rtx = of_kind(&events, EventKind::Retransmit);
    assert!(!rtx.is_empty(), "{}", show(&events));
    let r = rtx[0];
    assert_eq!(r.state, Some(TcpState::Established));
    assert_eq!((r.src.port, r.dst.port), (client_port, 83));
    assert_eq!(r.tcp_flags, Some(TcpFlags::PSH | TcpFlags::ACK));
    assert_eq!(r.comm.as_deref(), Some("tt-data"));
    let tcp = r.tcp.as_ref().expect("tcp detail on an established socket");
    assert!(!tcp.keepalive);
    assert_eq!(tcp.keepalive_time_ms, 7_200_000, "netns default keepalive");
    assert!(tcp.since_send_ms < 1000, "{tcp:?}");
}

#[test]
fn synack_retransmit_is_attributed_to_the_listener() {
    let mut cap = capture();
    let ns = Netns::new("synack").unwrap();
    // Drop the handshake's final ACK: the server resends its SYN-ACK.
    ns.exec(&[
        "iptables",
        "-A",
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        "84",
        "--tcp-flags",
        "SYN,ACK,FIN,RST",
        "ACK",
        "-j",
        "DROP",
    ])
    .unwrap();
    let listener = ns
        .run("tt-listener", || TcpListener::bind(addr(84)).unwrap())
        .unwrap();
    let client = ns
        .run("tt-synack-cli", || TcpStream::connect(addr(84)).unwrap())
        .unwrap();
    let client_port = client.local_addr().unwrap().port();

    let events = cap.wait_for(ns.inode(), WAIT, |ev| {
        !of_kind(ev, EventKind::SynackRetransmit).is_empty()
    });
    let sa = of_kind(&events, EventKind::SynackRetransmit);
    assert!(!sa.is_empty(), "{}", show(&events));
    assert_eq!((sa[0].src.port, sa[0].dst.port), (84, client_port));
    assert_eq!(sa[0].state, Some(TcpState::SynRecv));
    assert_eq!(sa[0].comm.as_deref(), Some("tt-listener"));
    drop((listener, client));
}

#[test]
fn port_exhaustion_gives_eaddrnotavail_with_destination() {
    let mut cap = capture();
    let ns = Netns::new("ports").unwrap();
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40001")
        .unwrap();
    let (result, _held) = ns
        .run("tt-exhaust", || {
            let l = TcpListener::bind(addr(85)).unwrap();
            let held: Vec<TcpStream> = (0..2)
                .map(|_| TcpStream::connect(addr(85)).unwrap())
                .collect();
            (TcpStream::connect(addr(85)).map(|_| ()), (l, held))
        })
        .unwrap();
    assert_eq!(result.unwrap_err().raw_os_error(), Some(99));

    let events = cap.wait_for(ns.inode(), WAIT, |ev| {
        !of_kind(ev, EventKind::ConnectError).is_empty()
    });
    let ce = of_kind(&events, EventKind::ConnectError);
    assert_eq!(ce.len(), 1, "{}", show(&events));
    assert_eq!(ce[0].errno, Some(Errno::EADDRNOTAVAIL));
    assert_eq!(ce[0].dst, tcptrace::model::Endpoint::new(addr(85).ip(), 85));
    assert_eq!(ce[0].src.port, 0);
    assert_eq!(ce[0].old_state, Some(TcpState::SynSent));
    assert_eq!(ce[0].comm.as_deref(), Some("tt-exhaust"));
    assert_eq!(ce[0].pid, Some(std::process::id()));
}

#[test]
fn bind_conflict_gives_eaddrinuse() {
    let mut cap = capture();
    let ns = Netns::new("bind").unwrap();
    let err = ns
        .run("tt-binder", || {
            let _first = TcpListener::bind(addr(86)).unwrap();
            TcpListener::bind(addr(86)).unwrap_err()
        })
        .unwrap();
    assert_eq!(err.raw_os_error(), Some(98));

    let events = cap.wait_for(ns.inode(), WAIT, |ev| {
        !of_kind(ev, EventKind::BindError).is_empty()
    });
    let be = of_kind(&events, EventKind::BindError);
    assert_eq!(be.len(), 1, "{}", show(&events));
    assert_eq!(be[0].errno, Some(Errno::EADDRINUSE));
    assert_eq!(be[0].src, tcptrace::model::Endpoint::new(addr(86).ip(), 86));
    assert_eq!(be[0].comm.as_deref(), Some("tt-binder"));
    assert_eq!(be[0].netns, ns.inode());
}

/// A reset after a known idle period carries idle time and keepalive state.
#[test]
fn reset_after_idle_reports_idle_ms_and_keepalive() {
    let mut cap = capture();
    let ns = Netns::new("idle").unwrap();
    ns.sysctl("net.ipv4.tcp_keepalive_time", "77").unwrap();
    let (with_ka, without_ka, servers) = ns
        .run("tt-idle", || {
            let l = TcpListener::bind(addr(87)).unwrap();
            let a = TcpStream::connect(addr(87)).unwrap();
            setsockopt(&a.as_fd(), sockopt::KeepAlive, &true).unwrap();
            setsockopt(&a.as_fd(), sockopt::TcpKeepIdle, &30).unwrap();
            let (sa, _) = l.accept().unwrap();
            let b = TcpStream::connect(addr(87)).unwrap();
            let (sb, _) = l.accept().unwrap();
            (a, b, [sa, sb])
        })
        .unwrap();
    // One exchange, then silence.
    for (client, server) in [(&with_ka, &servers[0]), (&without_ka, &servers[1])] {
        (&*client).write_all(b"ping").unwrap();
        let mut buf = [0u8; 4];
        (&*server).read_exact(&mut buf).unwrap();
        (&*server).write_all(b"pong").unwrap();
        (&*client).read_exact(&mut buf).unwrap();
    }
    thread::sleep(Duration::from_millis(1500));
    // The servers abort: SO_LINGER 0 makes close() send a reset.
    for s in servers {
        setsockopt(
            &s.as_fd(),
            sockopt::Linger,
            &nix::libc::linger {
                l_onoff: 1,
                l_linger: 0,
            },
        )
        .unwrap();
    }
    let ports = [
        with_ka.local_addr().unwrap().port(),
        without_ka.local_addr().unwrap().port(),
    ];

    let events = cap.wait_for(ns.inode(), WAIT, |ev| {
        of_kind(ev, EventKind::ResetReceived).len() >= 2
    });
    let resets = of_kind(&events, EventKind::ResetReceived);
    assert_eq!(resets.len(), 2, "{}", show(&events));
    for r in &resets {
        assert_eq!(r.state, Some(TcpState::Established));
        let tcp = r.tcp.as_ref().expect("tcp detail");
        assert!((1400..3000).contains(&tcp.idle_ms), "idle {tcp:?}");
        if r.src.port == ports[0] {
            assert!(tcp.keepalive);
            assert_eq!(tcp.keepalive_time_ms, 30_000);
        } else {
            assert_eq!(r.src.port, ports[1]);
            assert!(!tcp.keepalive);
            assert_eq!(tcp.keepalive_time_ms, 77_000, "the namespace's sysctl");
        }
    }
}
