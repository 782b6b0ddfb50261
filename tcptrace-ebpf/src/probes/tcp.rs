//! tcp:* tracepoints: retransmits and resets, all in softirq or timer
//! context, so the owner comes from the socket, never from `current`.
use aya_ebpf::{
    macros::{raw_tracepoint, tracepoint},
    programs::{RawTracePointContext, TracePointContext},
};
use tcptrace_common::{Event, flag, hook, kind};

use crate::{
    kernel::{self, field, read},
    maps::{config, mark_reset},
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

#[tracepoint(category = "tcp", name = "tcp_retransmit_skb")]
pub fn tcp_retransmit_skb(ctx: TracePointContext) -> u32 {
    let tp = &config().retransmit_skb;
    let Some(mut entry) = kernel::reserve(hook::RETRANSMIT_SKB, kind::RETRANSMIT) else {
        return 0;
    };
    // SAFETY: reserve() initialised the entry.
    let ev = unsafe { entry.assume_init_mut() };
    kernel::tuple_from_tp(&ctx, tp, ev);
    ev.state = field::<_, i32>(&ctx, tp.state).unwrap_or(0) as u8;
    let skb: u64 = field(&ctx, tp.skbaddr).unwrap_or(0);
    if let Some(flags) = read::<u8>(skb, config().kernel.skb_tcp_flags) {
        ev.tcp_flags = flags;
        ev.flags |= flag::TCP_FLAGS_KNOWN;
    }
    let sk: u64 = field(&ctx, tp.skaddr).unwrap_or(0);
    if !describe_sock(ev, sk, true) {
        entry.discard(0);
        return 0;
    }
    kernel::submit(hook::RETRANSMIT_SKB, entry);
    0
}

#[tracepoint(category = "tcp", name = "tcp_retransmit_synack")]
pub fn tcp_retransmit_synack(ctx: TracePointContext) -> u32 {
    let tp = &config().retransmit_synack;
    let Some(mut entry) = kernel::reserve(hook::RETRANSMIT_SYNACK, kind::SYNACK_RETRANSMIT) else {
        return 0;
    };
    // SAFETY: reserve() initialised the entry.
    let ev = unsafe { entry.assume_init_mut() };
    kernel::tuple_from_tp(&ctx, tp, ev);
    ev.state = config().states.syn_recv as u8;
    // skaddr is the listener; its owner is the server process.
    let sk: u64 = field(&ctx, tp.skaddr).unwrap_or(0);
    if !describe_sock(ev, sk, false) {
        entry.discard(0);
        return 0;
    }
    kernel::submit(hook::RETRANSMIT_SYNACK, entry);
    0
}

#[tracepoint(category = "tcp", name = "tcp_send_reset")]
pub fn tcp_send_reset(ctx: TracePointContext) -> u32 {
    let cfg = config();
    let tp = &cfg.send_reset;
    let Some(mut entry) = kernel::reserve(hook::SEND_RESET, kind::RESET_SENT) else {
        return 0;
    };
    // SAFETY: reserve() initialised the entry.
    let ev = unsafe { entry.assume_init_mut() };
    kernel::tuple_from_tp(&ctx, tp, ev);
    ev.state = field::<_, i32>(&ctx, tp.state).unwrap_or(0) as u8;
    if let Some(reason) = field::<_, u32>(&ctx, tp.extra) {
        ev.reason = reason;
        ev.flags |= flag::REASON_KNOWN;
    }
    let sk: u64 = field(&ctx, tp.skaddr).unwrap_or(0);
    if sk == 0 {
        // No socket: the namespace is the receiving device's.
        let skb: u64 = field(&ctx, tp.skbaddr).unwrap_or(0);
        let dev: u64 = read(skb, cfg.kernel.skb_dev).unwrap_or(0);
        let net: u64 = read(dev, cfg.kernel.dev_net).unwrap_or(0);
        ev.netns = kernel::net_inum(net, &cfg.kernel);
    } else if !describe_sock(ev, sk, true) {
        entry.discard(0);
        return 0;
    }
    kernel::submit(hook::SEND_RESET, entry);
    0
}

/// Raw tracepoint: the classic one builds a record (with a socket cookie)
/// that the socket itself provides.
#[raw_tracepoint(tracepoint = "tcp_receive_reset")]
pub fn tcp_receive_reset(ctx: RawTracePointContext) -> u32 {
    let k = &config().kernel;
    // TP_PROTO(struct sock *sk)
    let sk: u64 = ctx.arg(0);
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
    kernel::submit(hook::RECEIVE_RESET, entry);
    mark_reset(sk, at_ns, errno);
    0
}

const ECONNREFUSED: u32 = 111;
const EPIPE: u32 = 32;
const ECONNRESET: u32 = 104;
