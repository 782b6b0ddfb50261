//! skb:kfree_skb (raw): packets dropped for a reason worth reporting
//! (netfilter, TCP), TCP over IPv4/IPv6 only.
use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use tcptrace_common::{Event, NO_ARG, flag, hook, kind};

use crate::{
    kernel::{self, Segment, read},
    maps::{self, CONN_SOCKS, config},
    storm,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// TP_PROTO(struct sk_buff *skb, void *location, enum skb_drop_reason
/// reason[, struct sock *rx_sk])
#[raw_tracepoint(tracepoint = "kfree_skb")]
pub fn kfree_skb(ctx: RawTracePointContext) -> u32 {
    let cfg = config();
    let Some(reason) = kernel::raw_arg(&ctx, cfg.args.kfree_skb_reason) else {
        return 0;
    };
    let reason = reason as u32;
    // Cheap filters first: this tracepoint fires for every dropped packet.
    let reset = cfg.reset_from_drop != 0 && reason == cfg.no_socket_reason;
    let word = (reason / 64) as usize;
    let wanted =
        word < cfg.drop_reasons.len() && cfg.drop_reasons[word] & (1u64 << (reason % 64)) != 0;
    // Other reasons only for flows watched (after a handshake retransmit);
    // a closed port's drop is its reset's.
    let quiet =
        word < cfg.quiet_reasons.len() && cfg.quiet_reasons[word] & (1u64 << (reason % 64)) != 0;
    let maybe_watched =
        !wanted && !reset && !quiet && reason != cfg.no_socket_reason && maps::watching_lately();
    if !wanted && !reset && !maybe_watched {
        return 0;
    }
    let skb: u64 = ctx.arg(0);
    let k = &cfg.kernel;
    let protocol = u16::from_be(read::<u16>(skb, k.skb_protocol).unwrap_or(0));
    if protocol != ETH_P_IP && protocol != ETH_P_IPV6 {
        return 0;
    }
    let Some(seg) = kernel::skb_segment(skb, k) else {
        return 0;
    };
    if maybe_watched {
        let (src, dst) = seg.ends();
        if !maps::watched(&src, &dst) {
            return 0;
        }
    }
    if reset {
        // The kernel answers a segment without a socket with a reset, unless
        // the segment is a reset itself.
        if seg.flags & TCP_RST == 0 {
            report_reset(skb, &seg);
        }
        return 0;
    }
    let Some(mut entry) = kernel::reserve(hook::KFREE_SKB, kind::DROP) else {
        return 0;
    };
    // SAFETY: reserve() initialised the entry.
    let ev: &mut Event = unsafe { entry.assume_init_mut() };
    seg.fill(ev);
    ev.reason = reason;
    ev.location = kernel::raw_arg(&ctx, cfg.args.kfree_skb_location).unwrap_or(0);
    // Namespace of the device the packet was on, else of its socket: the
    // one the kernel found for it (rx_sk), else the skb's own; TCP input
    // has cleared the device by then, but its route's device remains.
    // Before rx_sk existed, the connection's socket is looked up too.
    let dev: u64 = read(skb, k.skb_dev).unwrap_or(0);
    ev.netns = kernel::net_inum(read(dev, k.dev_net).unwrap_or(0), k);
    let mut sk = match kernel::raw_arg(&ctx, cfg.args.kfree_skb_rx_sk) {
        Some(rx_sk) if rx_sk != 0 => rx_sk,
        _ => read(skb, k.skb_sk).unwrap_or(0),
    };
    if sk == 0 && cfg.args.kfree_skb_rx_sk == NO_ARG {
        // SAFETY: copied out at once.
        if let Some(conn) = unsafe { CONN_SOCKS.get(seg.receiver()) }.copied()
            && (ev.netns == 0 || ev.netns == conn.netns)
        {
            sk = conn.sk;
            ev.netns = conn.netns;
        }
    }
    if ev.netns == 0 && sk == 0 {
        let dst = read::<u64>(skb, k.skb_refdst).unwrap_or(0) & !1;
        let dst_dev: u64 = read(dst, k.dst_dev).unwrap_or(0);
        ev.netns = kernel::net_inum(read(dst_dev, k.dev_net).unwrap_or(0), k);
    }
    if sk != 0 {
        if ev.netns == 0 {
            ev.netns = kernel::net_inum(kernel::sock_net(sk, k), k);
        }
        ev.sk = sk;
        if !kernel::attach_owner(ev, sk) {
            entry.discard(0);
            return 0;
        }
    }
    kernel::submit(hook::KFREE_SKB, entry);
    0
}

/// The reset answering a segment that found no socket, as tcp_send_reset
/// reports it on newer kernels: from the local end to the sender.
#[inline(always)]
fn report_reset(skb: u64, seg: &Segment) {
    let k = &config().kernel;
    let dev: u64 = read(skb, k.skb_dev).unwrap_or(0);
    let netns = kernel::net_inum(read(dev, k.dev_net).unwrap_or(0), k);
    // A SYN refused: a storm of refusals is counted.
    let key = (seg.flags & TCP_SYN != 0 && seg.flags & TCP_ACK == 0)
        .then(|| seg.refused_key(netns, kind::RESET_SENT));
    if let Some(key) = &key
        && storm::count_repeat(hook::KFREE_SKB, key)
    {
        return;
    }
    let Some(mut entry) = kernel::reserve(hook::KFREE_SKB, kind::RESET_SENT) else {
        return;
    };
    // SAFETY: reserve() initialised the entry.
    let ev: &mut Event = unsafe { entry.assume_init_mut() };
    seg.fill_reply(ev);
    ev.tcp_flags = seg.flags;
    ev.flags |= flag::TCP_FLAGS_KNOWN;
    ev.flags |= flag::RESET_FROM_DROP;
    ev.netns = netns;
    match &key {
        Some(key) => kernel::submit_or_count(hook::KFREE_SKB, entry, key),
        None => kernel::submit(hook::KFREE_SKB, entry),
    }
}
