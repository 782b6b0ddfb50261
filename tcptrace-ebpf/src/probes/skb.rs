//! skb:kfree_skb: packets dropped for a reason worth reporting (netfilter,
//! TCP), TCP over IPv4/IPv6 only.
use aya_ebpf::{macros::tracepoint, programs::TracePointContext};
use tcptrace_common::{AF_INET, AF_INET6, Event, flag, hook, kind};

use crate::{
    kernel::{self, field, read},
    maps::config,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const IPPROTO_TCP: u8 = 6;
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
    let Some(head) = read::<u64>(skb, k.skb_head) else {
        return 0;
    };
    let Some(nh) = read::<u16>(skb, k.skb_network_header) else {
        return 0;
    };
    let ip = head + nh as u64;
    let mut saddr = [0u8; 16];
    let mut daddr = [0u8; 16];
    let tcp = if protocol == ETH_P_IP {
        let Some(hdr) = read::<[u8; 20]>(ip, 0) else {
            return 0;
        };
        if hdr[9] != IPPROTO_TCP {
            return 0;
        }
        saddr[..4].copy_from_slice(&hdr[12..16]);
        daddr[..4].copy_from_slice(&hdr[16..20]);
        ip + ((hdr[0] & 0x0f) as u64) * 4
    } else {
        let Some(hdr) = read::<[u8; 40]>(ip, 0) else {
            return 0;
        };
        // Extension headers are not followed.
        if hdr[6] != IPPROTO_TCP {
            return 0;
        }
        saddr.copy_from_slice(&hdr[8..24]);
        daddr.copy_from_slice(&hdr[24..40]);
        ip + 40
    };
    let Some(th) = read::<[u8; 14]>(tcp, 0) else {
        return 0;
    };

    let (sport, dport) = (
        u16::from_be_bytes([th[0], th[1]]),
        u16::from_be_bytes([th[2], th[3]]),
    );
    if reset {
        // The kernel answers a segment without a socket with a reset, unless
        // the segment is a reset itself.
        if th[13] & TCP_RST == 0 {
            report_reset(skb, saddr, daddr, sport, dport, protocol);
        }
        return 0;
    }
    let Some(mut entry) = kernel::reserve(hook::KFREE_SKB, kind::DROP) else {
        return 0;
    };
    // SAFETY: reserve() initialised the entry.
    let ev: &mut Event = unsafe { entry.assume_init_mut() };
    ev.family = if protocol == ETH_P_IP {
        AF_INET
    } else {
        AF_INET6
    };
    ev.saddr = saddr;
    ev.daddr = daddr;
    ev.sport = sport;
    ev.dport = dport;
    ev.tcp_flags = th[13];
    ev.flags |= flag::TCP_FLAGS_KNOWN;
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
fn report_reset(skb: u64, saddr: [u8; 16], daddr: [u8; 16], sport: u16, dport: u16, protocol: u16) {
    let k = &config().kernel;
    let Some(mut entry) = kernel::reserve(hook::KFREE_SKB, kind::RESET_SENT) else {
        return;
    };
    // SAFETY: reserve() initialised the entry.
    let ev: &mut Event = unsafe { entry.assume_init_mut() };
    ev.family = if protocol == ETH_P_IP {
        AF_INET
    } else {
        AF_INET6
    };
    ev.saddr = daddr;
    ev.daddr = saddr;
    ev.sport = dport;
    ev.dport = sport;
    ev.flags |= flag::RESET_FROM_DROP;
    let dev: u64 = read(skb, k.skb_dev).unwrap_or(0);
    ev.netns = kernel::net_inum(read(dev, k.dev_net).unwrap_or(0), k);
    kernel::submit(hook::KFREE_SKB, entry);
}
