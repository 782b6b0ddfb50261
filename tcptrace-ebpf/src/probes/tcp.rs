//! tcp:* tracepoints, raw (no tracefs, no record built first):
//! retransmits and resets, all in softirq or timer context, so the owner
//! comes from the socket, never from `current`.
use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use tcptrace_common::{Event, flag, hook, kind};

use crate::{
    kernel::{self, read},
    maps::{self, config, mark_owner_reset, mark_reset},
    storm,
};

/// Netns, owner and TCP detail of an event about socket `sk`; false when
/// the socket is tcptrace's own.
#[inline(always)]
fn describe_sock(ev: &mut Event, sk: u64, with_detail: bool) -> bool {
    let cfg = config();
    let k = &cfg.kernel;
    if sk == 0 {
        return true;
    }
    ev.sk = sk;
    ev.netns = kernel::net_inum(kernel::sock_net(sk, k), k);
    if !kernel::attach_owner(ev, sk) {
        return false;
    }
    if with_detail && kernel::has_tcp_detail(ev.state as u32) {
        kernel::tcp_detail(sk, k, ev);
    }
    true
}

/// TP_PROTO(const struct sock *sk, const struct sk_buff *skb, ...)
#[raw_tracepoint(tracepoint = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: RawTracePointContext) -> u32 {
    let k = &config().kernel;
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    let Some(mut entry) = kernel::reserve(hook::RETRANSMIT_SKB, kind::RETRANSMIT) else {
        return 0;
    };
    // SAFETY: reserve() initialised the entry.
    let ev = unsafe { entry.assume_init_mut() };
    kernel::tuple_from_sock(sk, k, ev);
    if let Some(flags) = read::<u8>(skb, k.skb_tcp_flags) {
        ev.tcp_flags = flags;
        ev.flags |= flag::TCP_FLAGS_KNOWN;
    }
    if !describe_sock(ev, sk, true) {
        entry.discard(0);
        return 0;
    }
    // A SYN retransmit: where this flow's packets die is worth knowing.
    if ev.state as u32 == config().states.syn_sent {
        maps::watch(&kernel::end_key(ev.saddr, ev.sport, ev.family));
    }
    kernel::submit(hook::RETRANSMIT_SKB, entry);
    0
}

/// TP_PROTO(const struct sock *sk, const struct request_sock *req)
#[raw_tracepoint(tracepoint = "tcp_retransmit_synack")]
pub fn tcp_retransmit_synack(ctx: RawTracePointContext) -> u32 {
    let cfg = config();
    let sk: u64 = ctx.arg(0);
    let req: u64 = ctx.arg(1);
    let Some(mut entry) = kernel::reserve(hook::RETRANSMIT_SYNACK, kind::SYNACK_RETRANSMIT) else {
        return 0;
    };
    // SAFETY: reserve() initialised the entry.
    let ev = unsafe { entry.assume_init_mut() };
    kernel::tuple_from_request(req, &cfg.kernel, ev);
    ev.state = cfg.states.syn_recv as u8;
    // sk is the listener; its owner is the server process.
    if !describe_sock(ev, sk, false) {
        entry.discard(0);
        return 0;
    }
    // The client's end: where this flow's packets die is worth knowing.
    maps::watch(&kernel::end_key(ev.daddr, ev.dport, ev.family));
    kernel::submit(hook::RETRANSMIT_SYNACK, entry);
    0
}

/// TP_PROTO(const struct sock *sk, const struct sk_buff *skb[, enum
/// sk_rst_reason reason]): `skb` is the segment answered (none for an
/// active reset), `sk` may be a full, request or time-wait socket, or none.
#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: RawTracePointContext) -> u32 {
    let cfg = config();
    let k = &cfg.kernel;
    let sk: u64 = ctx.arg(0);
    let skb: u64 = ctx.arg(1);
    let segment = kernel::skb_segment(skb, k);
    // A SYN to a closed port (no socket): a storm of refusals is counted.
    let dev_netns = || {
        let dev: u64 = read(skb, k.skb_dev).unwrap_or(0);
        kernel::net_inum(read(dev, k.dev_net).unwrap_or(0), k)
    };
    let key = segment
        .as_ref()
        .filter(|s| sk == 0 && s.flags & TCP_SYN != 0 && s.flags & TCP_ACK == 0)
        .map(|s| s.refused_key(dev_netns(), kind::RESET_SENT));
    if let Some(key) = &key
        && storm::count_repeat(hook::SEND_RESET, key)
    {
        return 0;
    }
    let Some(mut entry) = kernel::reserve(hook::SEND_RESET, kind::RESET_SENT) else {
        return 0;
    };
    // SAFETY: reserve() initialised the entry.
    let ev = unsafe { entry.assume_init_mut() };
    if let Some(reason) = kernel::raw_arg(&ctx, cfg.args.send_reset_reason) {
        ev.reason = reason as u32;
        ev.flags |= flag::REASON_KNOWN;
    }
    // A reset answering a segment goes from its destination back to its
    // source (also when the socket is a listener or a time-wait socket,
    // which have no inet_sock with both ends); an active reset has only the
    // socket.
    if let Some(seg) = segment {
        seg.fill_reply(ev);
        // The flags of the segment answered (a SYN: a refused connect).
        ev.tcp_flags = seg.flags;
        ev.flags |= flag::TCP_FLAGS_KNOWN;
    } else {
        kernel::tuple_from_sock(sk, k, ev);
    }
    let state = read::<u8>(sk, k.sock_state).unwrap_or(0);
    let full_sock = sk != 0 && kernel::is_full_sock(state as u32);
    ev.state = state;
    // An active reset (close with unread data, SO_LINGER 0, an abort)
    // closes its own socket: that move to CLOSE repeats this record.
    let active = skb == 0 && full_sock;
    if sk == 0 {
        // No socket: the namespace is the receiving device's.
        ev.netns = dev_netns();
    } else if !describe_sock(ev, sk, full_sock) {
        entry.discard(0);
        return 0;
    }
    let at_ns = ev.ts_ns;
    match &key {
        Some(key) => kernel::submit_or_count(hook::SEND_RESET, entry, key),
        None => kernel::submit(hook::SEND_RESET, entry),
    }
    if active {
        mark_reset(sk, at_ns, ECONNRESET);
    }
    0
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// Raw tracepoint: the classic one builds a record (with a socket cookie)
/// that the socket itself provides.
#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: RawTracePointContext) -> u32 {
    let k = &config().kernel;
    // TP_PROTO(struct sock *sk)
    let sk: u64 = ctx.arg(0);
    // A refused connect: a storm of them is counted, not sent.
    let head = kernel::sock_head(sk, k);
    let key = if head.state as u32 == config().states.syn_sent {
        let (key, owner) = kernel::refused_key(sk, &head, k, kind::RESET_RECEIVED);
        // SAFETY: a map value of the right type, read at once.
        let own = owner.is_some_and(|o| kernel::is_self(unsafe { (*o).tgid }));
        // tcptrace's own sockets are not counted (describe_sock drops them).
        if !own && storm::count_repeat(hook::RECEIVE_RESET, &key) {
            if let Some(owner) = owner {
                // SAFETY: a helper without preconditions.
                let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns() };
                mark_owner_reset(owner, now, ECONNREFUSED);
            }
            return 0;
        }
        Some(key)
    } else {
        None
    };
    let Some(mut entry) = kernel::reserve(hook::RECEIVE_RESET, kind::RESET_RECEIVED) else {
        return 0;
    };
    // SAFETY: reserve() initialised the entry.
    let ev = unsafe { entry.assume_init_mut() };
    kernel::tuple_from_sock(sk, k, ev);
    if !describe_sock(ev, sk, true) {
        entry.discard(0);
        return 0;
    }
    // What tcp_reset() sets as the socket's error.
    let states = &config().states;
    let errno = if ev.state as u32 == states.syn_sent {
        ECONNREFUSED
    } else if ev.state as u32 == states.close_wait {
        EPIPE
    } else {
        ECONNRESET
    };
    let at_ns = ev.ts_ns;
    match &key {
        Some(key) => kernel::submit_or_count(hook::RECEIVE_RESET, entry, key),
        None => kernel::submit(hook::RECEIVE_RESET, entry),
    }
    mark_reset(sk, at_ns, errno);
    0
}

const ECONNREFUSED: u32 = 111;
const EPIPE: u32 = 32;
const ECONNRESET: u32 = 104;
