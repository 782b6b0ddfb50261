//! Socket state changes (owner bookkeeping, failed connects) and socket
//! errors.
use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use tcptrace_common::{ConnSock, Event, ListenKey, NO_ARG, Owner, direct, flag, hook, kind, role};

use crate::{
    kernel,
    maps::{CONN_SOCKS, LISTENERS, OWNERS, config, direct_live, mark_fin, reset_consequence},
};

const IPPROTO_TCP: u8 = 6;
const EADDRNOTAVAIL: i32 = 99;

/// Raw tracepoint: its arguments are read directly, without the record the
/// classic tracepoint builds on every state change of every socket.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn inet_sock_set_state(ctx: RawTracePointContext) -> u32 {
    let cfg = config();
    let states = &cfg.states;
    let k = &cfg.kernel;
    // TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)
    let sk: u64 = ctx.arg(0);
    let old = ctx.arg::<u64>(1) as u32;
    let new = ctx.arg::<u64>(2) as u32;
    // Other users of this tracepoint (SCTP, MPTCP subflows' parents) are not
    // TCP sockets; without the offset every socket counts as TCP. One byte:
    // the protocol is a u16 since 5.6, a byte-aligned 8-bit field before.
    if kernel::read::<u8>(sk, k.sock_protocol).is_some_and(|p| p != IPPROTO_TCP) {
        return 0;
    }
    let sport = || u16::from_be(kernel::read::<u16>(sk, k.inet_sport).unwrap_or(0));

    // connect() and listen() run in the owner's process context.
    if new == states.syn_sent || new == states.listen {
        let netns = kernel::net_inum(kernel::sock_net(sk, k), k);
        let role = if new == states.listen {
            role::SERVER
        } else {
            role::CLIENT
        };
        let owner = kernel::current_owner(netns, role);
        let _ = OWNERS.insert(sk, owner, 0);
        if new == states.listen {
            let key = ListenKey {
                netns,
                port: sport(),
                _pad: 0,
            };
            let _ = LISTENERS.insert(key, owner, 0);
        }
    } else if old == states.established && new == states.close_wait {
        // The peer closed its side: how long the connection had been idle
        // tells its idle timeout, when the socket is used again later.
        if let Some(idle) = kernel::data_idle_jiffies(sk, k) {
            // SAFETY: a helper without preconditions.
            let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns() };
            mark_fin(sk, now, idle);
        }
    } else if old == states.syn_recv && new == states.established {
        // Passive open in softirq: inherit the listener's owner.
        let netns = kernel::net_inum(kernel::sock_net(sk, k), k);
        let key = ListenKey {
            netns,
            port: sport(),
            _pad: 0,
        };
        // SAFETY: copied out before the insert.
        let mut owner = match unsafe { LISTENERS.get(key) } {
            Some(listener) => *listener,
            // The listener predates tracing: the process is unknown (softirq
            // runs on behalf of anyone), the role is not. Also replaces
            // what a freed socket at this address left.
            None => Owner {
                netns,
                role: role::SERVER,
                ..Owner::UNKNOWN
            },
        };
        // SAFETY: a helper without preconditions.
        owner.start_ns = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns() };
        let _ = OWNERS.insert(sk, owner, 0);
    }

    // Where kfree_skb names no socket, established connections are indexed
    // so that segments the TCP stack drops find theirs: also after the
    // close (the reset that closes it is dropped afterwards); a new
    // connection with the same ends replaces the entry.
    if cfg.args.kfree_skb_rx_sk == NO_ARG && new == states.established {
        let conn = ConnSock {
            sk,
            netns: kernel::net_inum(kernel::sock_net(sk, k), k),
            _pad: 0,
        };
        let _ = CONN_SOCKS.insert(kernel::conn_key_of_sock(sk, k), conn, 0);
    }

    // Failed connect (timed out, or no source port) is always reported;
    // other transitions only on request. A refused one was reported as the
    // reset that refused it.
    let failed_connect = old == states.syn_sent && new == states.close;
    // A handshake that needed retransmits: connected, but late.
    let handshake = new == states.established && (old == states.syn_sent || old == states.syn_recv);
    let slow_handshake =
        handshake && kernel::read::<u32>(sk, k.tcp_total_retrans).is_some_and(|n| n > 0);
    // Without a source port the direct hook, when live, reported it already.
    let reported_already = failed_connect
        && (reset_consequence(sk).is_some() || (direct_live(direct::HASH_CONNECT) && sport() == 0));
    if (failed_connect && !reported_already) || slow_handshake || cfg.all_states != 0 {
        emit_state_change(sk, old, new, failed_connect, slow_handshake);
    }

    // The owner stays in the LRU map past CLOSE: resets and errors are
    // reported after the state change. A reused sock pointer is recorded
    // afresh at its own connect/listen/accept.
    if new == states.close && old == states.listen {
        let netns = kernel::net_inum(kernel::sock_net(sk, k), k);
        let _ = LISTENERS.remove(ListenKey {
            netns,
            port: sport(),
            _pad: 0,
        });
    }
    0
}

#[inline(always)]
fn emit_state_change(sk: u64, old: u32, new: u32, failed_connect: bool, slow_handshake: bool) {
    let k = &config().kernel;
    let Some(mut entry) = kernel::reserve(hook::SET_STATE, kind::STATE_CHANGE) else {
        return;
    };
    // SAFETY: reserve() initialised the entry.
    let ev: &mut Event = unsafe { entry.assume_init_mut() };
    kernel::tuple_from_sock(sk, k, ev);
    ev.state = new as u8;
    ev.old_state = old as u8;
    ev.sk = sk;
    ev.netns = kernel::net_inum(kernel::sock_net(sk, k), k);
    // inet_hash_connect() found no source port: connect() returns
    // EADDRNOTAVAIL without sending anything.
    if failed_connect && ev.sport == 0 {
        ev.kind = kind::CONNECT_ERROR;
        ev.errno = -EADDRNOTAVAIL;
        kernel::port_range(kernel::sock_net(sk, k), k, ev);
    } else if failed_connect {
        // The error that ends the connect is set before the state changes
        // (an ICMP error, or a timeout that kept the last soft ICMP error):
        // its error report may not follow.
        let err = kernel::read::<i32>(sk, k.sock_err).unwrap_or(0);
        if err > 0 {
            ev.errno = -err;
        }
    }
    if !kernel::attach_owner(ev, sk) {
        entry.discard(0);
        return;
    }
    if slow_handshake {
        ev.flags |= flag::SLOW_HANDSHAKE;
        ev.total_retrans = kernel::read::<u32>(sk, k.tcp_total_retrans).unwrap_or(0);
        // SAFETY: copied out at once.
        let start = unsafe { OWNERS.get(sk) }.map_or(0, |o| o.start_ns);
        if ev.flags & flag::ROLE_CLIENT != 0 && start != 0 {
            ev.connect_ms = (ev.ts_ns.saturating_sub(start) / 1_000_000) as u32;
        }
    }
    if ev.kind == kind::CONNECT_ERROR {
        let key = kernel::dst_key(ev);
        kernel::submit_or_count(hook::SET_STATE, entry, &key);
    } else {
        kernel::submit(hook::SET_STATE, entry);
    }
}

/// Raw tracepoint: its first argument is the socket, which the classic
/// tracepoint does not record.
#[raw_tracepoint(tracepoint = "inet_sk_error_report")]
pub fn inet_sk_error_report(ctx: RawTracePointContext) -> u32 {
    let cfg = config();
    let k = &cfg.kernel;
    // args[0] of inet_sk_error_report is `const struct sock *`.
    let sk: u64 = ctx.arg(0);
    // Reports without a pending error (e.g. from tcp_disconnect) carry no news.
    let err = kernel::read::<i32>(sk, k.sock_err).unwrap_or(0);
    // The error a received reset raises is implied by its record.
    if err == 0 || reset_consequence(sk) == Some(err.unsigned_abs()) {
        return 0;
    }
    let Some(mut entry) = kernel::reserve(hook::ERROR_REPORT, kind::SOCKET_ERROR) else {
        return 0;
    };
    // SAFETY: reserve() initialised the entry.
    let ev: &mut Event = unsafe { entry.assume_init_mut() };
    kernel::tuple_from_sock(sk, k, ev);
    ev.errno = -err;
    ev.sk = sk;
    ev.netns = kernel::net_inum(kernel::sock_net(sk, k), k);
    if !kernel::attach_owner(ev, sk) {
        entry.discard(0);
        return 0;
    }
    if kernel::has_tcp_detail(ev.state as u32) {
        kernel::tcp_detail(sk, k, ev);
    }
    kernel::submit(hook::ERROR_REPORT, entry);
    0
}
