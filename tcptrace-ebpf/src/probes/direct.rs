//! Direct tier, where the kernel allows fexit or kprobes: inet_hash_connect's
//! result names EADDRNOTAVAIL exactly instead of inferring it from a state
//! change; __nf_conntrack_alloc's failure names a full conntrack table
//! instead of a generic netfilter drop; nf_ct_l4proto_log_invalid names the
//! segment conntrack marked INVALID instead of a counter rising.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes},
    macros::{fexit, kprobe, kretprobe},
    programs::{FExitContext, ProbeContext, RetProbeContext},
};
use tcptrace_common::{AF_INET6, CtAllocArgs, Event, ct_invalid, flag, hook, kind, role};

use crate::{
    kernel,
    maps::{CT_ALLOC_ARGS, HASH_CONNECT_ARGS, config},
};

/// int inet_hash_connect(struct inet_timewait_death_row *, struct sock *sk)
#[fexit(function = "inet_hash_connect")]
pub fn inet_hash_connect_fexit(ctx: FExitContext) -> u32 {
    let sk: u64 = ctx.arg(1);
    // fexit arguments are followed by the return value.
    let ret: i64 = ctx.arg(2);
    report(hook::HASH_CONNECT_FEXIT, sk, ret as i32);
    0
}

#[kprobe(function = "inet_hash_connect")]
pub fn inet_hash_connect_entry(ctx: ProbeContext) -> u32 {
    if let Some(sk) = ctx.arg::<u64>(1) {
        let _ = HASH_CONNECT_ARGS.insert(bpf_get_current_pid_tgid(), sk, 0);
    }
    0
}

#[kretprobe(function = "inet_hash_connect")]
pub fn inet_hash_connect_return(ctx: RetProbeContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: copied out before the entry is removed.
    let Some(sk) = (unsafe { HASH_CONNECT_ARGS.get(id) }).copied() else {
        return 0;
    };
    let _ = HASH_CONNECT_ARGS.remove(id);
    let ret: i64 = ctx.ret();
    report(hook::HASH_CONNECT_KRETPROBE, sk, ret as i32);
    0
}

/// A failed inet_hash_connect, in the connect() caller's context.
#[inline(always)]
fn report(hook: u32, sk: u64, ret: i32) {
    if ret >= 0 {
        return;
    }
    let tgid = (bpf_get_current_pid_tgid() >> 32) as u32;
    if kernel::is_self(tgid) {
        return;
    }
    let cfg = config();
    let Some(mut entry) = kernel::reserve(hook, kind::CONNECT_ERROR) else {
        return;
    };
    // SAFETY: reserve() initialised the entry.
    let ev: &mut Event = unsafe { entry.assume_init_mut() };
    kernel::tuple_from_sock(sk, &cfg.kernel, ev);
    // connect() closes the socket right after this failure.
    ev.old_state = cfg.states.syn_sent as u8;
    ev.state = cfg.states.close as u8;
    ev.errno = ret;
    ev.sk = sk;
    let net = kernel::sock_net(sk, &cfg.kernel);
    ev.netns = kernel::net_inum(net, &cfg.kernel);
    kernel::port_range(net, &cfg.kernel, ev);
    let owner = kernel::current_owner(ev.netns, role::CLIENT);
    kernel::set_owner(ev, &owner);
    let key = kernel::dst_key(ev);
    kernel::submit_or_count(hook, entry, &key);
}

/// struct nf_conn *__nf_conntrack_alloc(struct net *, zone, orig, repl, gfp, ...)
/// returns ERR_PTR(-ENOMEM) when the table is full and nothing could be
/// evicted. Runs in softirq: the packet's tuple names the connection.
#[fexit(function = "__nf_conntrack_alloc")]
pub fn nf_conntrack_alloc_fexit(ctx: FExitContext) -> u32 {
    // The argument count varies between kernels: read the return value
    // with bpf_get_func_ret.
    if let Ok(ret) = ctx.ret::<u64>() {
        report_ct_alloc(hook::CT_ALLOC_FEXIT, ctx.arg(0), ctx.arg(2), ret);
    }
    0
}

#[kprobe(function = "__nf_conntrack_alloc")]
pub fn nf_conntrack_alloc_entry(ctx: ProbeContext) -> u32 {
    if let (Some(net), Some(orig), Some(slot)) = (
        ctx.arg::<u64>(0),
        ctx.arg::<u64>(2),
        CT_ALLOC_ARGS.get_ptr_mut(0),
    ) {
        // SAFETY: per-CPU slot; softirq processing does not nest on a CPU.
        unsafe { *slot = CtAllocArgs { net, orig } };
    }
    0
}

#[kretprobe(function = "__nf_conntrack_alloc")]
pub fn nf_conntrack_alloc_return(ctx: RetProbeContext) -> u32 {
    let Some(slot) = CT_ALLOC_ARGS.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU slot written by the matching kprobe on this CPU.
    let args = unsafe { core::ptr::replace(slot, CtAllocArgs { net: 0, orig: 0 }) };
    if args.net != 0 {
        report_ct_alloc(hook::CT_ALLOC_KRETPROBE, args.net, args.orig, ctx.ret());
    }
    0
}

const IPPROTO_TCP: u8 = 6;
/// ERR_PTR values are the last page of the address space.
const MAX_ERRNO: u64 = 4095;

#[inline(always)]
fn report_ct_alloc(hook: u32, net: u64, orig: u64, ret: u64) {
    if ret < u64::MAX - MAX_ERRNO {
        return;
    }
    let k = &config().kernel;
    if kernel::read::<u8>(orig, k.ct_protonum) != Some(IPPROTO_TCP) {
        return;
    }
    let Some(mut entry) = kernel::reserve(hook, kind::DROP) else {
        return;
    };
    // SAFETY: reserve() initialised the entry.
    let ev: &mut Event = unsafe { entry.assume_init_mut() };
    let family = kernel::read::<u16>(orig, k.ct_l3num).unwrap_or(0);
    ev.family = family as u8;
    if ev.family == AF_INET6 {
        ev.saddr = kernel::read(orig, k.ct_src_addr).unwrap_or([0; 16]);
        ev.daddr = kernel::read(orig, k.ct_dst_addr).unwrap_or([0; 16]);
    } else {
        let s: [u8; 4] = kernel::read(orig, k.ct_src_addr).unwrap_or([0; 4]);
        let d: [u8; 4] = kernel::read(orig, k.ct_dst_addr).unwrap_or([0; 4]);
        ev.saddr[..4].copy_from_slice(&s);
        ev.daddr[..4].copy_from_slice(&d);
    }
    ev.sport = u16::from_be(kernel::read::<u16>(orig, k.ct_src_port).unwrap_or(0));
    ev.dport = u16::from_be(kernel::read::<u16>(orig, k.ct_dst_port).unwrap_or(0));
    ev.errno = ret as i32;
    ev.netns = kernel::net_inum(net, k);
    ev.flags |= flag::CT_ALLOC_FAILED;
    kernel::submit(hook, entry);
}

/// void nf_ct_l4proto_log_invalid(const struct sk_buff *skb,
///     const struct nf_conn *ct, [const struct nf_hook_state *state,]
///     const char *fmt, ...)   (`state` since 5.16)
/// conntrack's TCP window and state tracking calls it for the segments it
/// judges INVALID (and for some it ignores but accepts), before checking
/// whether logging is on; the message says which.
#[kprobe(function = "nf_ct_l4proto_log_invalid")]
pub fn ct_invalid_entry(ctx: ProbeContext) -> u32 {
    let k = &config().kernel;
    // Registers are read at fixed positions (the verifier refuses a
    // computed context offset), then chosen by the kernel's layout.
    let (Some(skb), Some(ct), Some(a2), Some(a3), Some(a4)) = (
        ctx.arg::<u64>(0),
        ctx.arg::<u64>(1),
        ctx.arg::<u64>(2),
        ctx.arg::<u64>(3),
        ctx.arg::<u64>(4),
    ) else {
        return 0;
    };
    let (fmt, after_fmt) = if k.ct_invalid_fmt_arg == 2 {
        (a2, a3)
    } else {
        (a3, a4)
    };
    let mut msg = [0u8; 40];
    // SAFETY: a NUL-bounded read into our buffer; faults fail cleanly.
    if unsafe { bpf_probe_read_kernel_str_bytes(fmt as *const u8, &mut msg) }.is_err() {
        return 0;
    }
    // Some kernels pass the message as an argument: "%s" (5.15 stable) or
    // "%pV" with a struct va_format { const char *fmt; va_list *va; }
    // (6.1 before 6.1.187, 6.12 before 6.12.102).
    let inner = match (msg[0], msg[1], msg[2], msg[3]) {
        (b'%', b's', 0, _) => Some(after_fmt),
        (b'%', b'p', b'V', 0) => kernel::read::<u64>(after_fmt, 0),
        _ => Some(0),
    };
    match inner {
        None => return 0,
        Some(0) => {}
        Some(text) => {
            msg = [0u8; 40];
            // SAFETY: as above.
            if unsafe { bpf_probe_read_kernel_str_bytes(text as *const u8, &mut msg) }.is_err() {
                return 0;
            }
        }
    }
    let class = ct_invalid::classify(&msg);
    if class == 0 {
        return 0;
    }
    let Some(seg) = kernel::skb_segment(skb, k) else {
        return 0;
    };
    let Some(mut entry) = kernel::reserve(hook::CT_INVALID_KPROBE, kind::CONNTRACK_INVALID) else {
        return 0;
    };
    // SAFETY: reserve() initialised the entry.
    let ev: &mut Event = unsafe { entry.assume_init_mut() };
    seg.fill(ev);
    ev.reason = class;
    // The namespace whose conntrack table holds the entry.
    let net = kernel::read::<u64>(ct, k.ct_net).unwrap_or(0);
    ev.netns = kernel::net_inum(net, k);
    kernel::submit(hook::CT_INVALID_KPROBE, entry);
    0
}
