//! skb:kfree_skb: packets dropped for a reason worth reporting (netfilter,
//! TCP), TCP over IPv4/IPv6 only.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use tcptrace_common::{Event, flag, hook, kind};

use crate::{
    kernel::{self, Segment, field, read},
    maps::config,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const TCP_RST: u8 = 0x04;

#[tracepoint(category = "skb", name = "kfree_skb")]
pub fn kfree_skb(ctx: TracePointContext) -> u32 {
    let cfg = config();
    let tp = &cfg.kfree_skb;
    let Some(reason) = field::<_, u32>(&ctx, tp.extra) else {
        return 0;
    };
    // Cheap filters first: this tracepoint fires for every dropped packet.
    let reset = cfg.reset_from_drop != 0 && reason == cfg.no_socket_reason;
    let word = (reason / 64) as usize;
    let wanted =
        word < cfg.drop_reasons.len() && cfg.drop_reasons[word] & (1u64 << (reason % 64)) != 0;
    if !wanted && !reset {
        return 0;
    }
    // The tracepoint stores ntohs(skb->protocol).
    let protocol = field::<_, u16>(&ctx, tp.extra2).unwrap_or(0);
    if protocol != ETH_P_IP && protocol != ETH_P_IPV6 {
        return 0;
    }
    let skb: u64 = field(&ctx, tp.skbaddr).unwrap_or(0);
    let k = &cfg.kernel;
    let Some(seg) = kernel::skb_segment(skb, k) else {
        return 0;
    };
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
    ev.location = field(&ctx, tp.extra3).unwrap_or(0);
    // Namespace of the device the packet was on, else of its socket.
    let dev: u64 = read(skb, k.skb_dev).unwrap_or(0);
    ev.netns = kernel::net_inum(read(dev, k.dev_net).unwrap_or(0), k);
    let sk: u64 = read(skb, k.skb_sk).unwrap_or(0);
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
    let Some(mut entry) = kernel::reserve(hook::KFREE_SKB, kind::RESET_SENT) else {
        return;
    };
    // SAFETY: reserve() initialised the entry.
    let ev: &mut Event = unsafe { entry.assume_init_mut() };
    ev.family = seg.family;
    ev.saddr = seg.daddr;
    ev.daddr = seg.saddr;
    ev.sport = seg.dport;
    ev.dport = seg.sport;
    ev.flags |= flag::RESET_FROM_DROP;
    let dev: u64 = read(skb, k.skb_dev).unwrap_or(0);
    ev.netns = kernel::net_inum(read(dev, k.dev_net).unwrap_or(0), k);
    kernel::submit(hook::KFREE_SKB, entry);
}
