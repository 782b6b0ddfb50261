//! Direct tier: inet_hash_connect's result, where the kernel allows fexit
//! or kprobes. It names the error exactly (EADDRNOTAVAIL when no source
//! port is left) instead of inferring it from a state change.
use aya_ebpf::{
    helpers::bpf_get_current_pid_tgid,
    macros::{fexit, kprobe, kretprobe},
    programs::{FExitContext, ProbeContext, RetProbeContext},
};
use tcptrace_common::{Event, hook, kind};

use crate::{
    kernel,
    maps::{HASH_CONNECT_ARGS, config},
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
    ev.netns = kernel::net_inum(kernel::sock_net(sk, &cfg.kernel), &cfg.kernel);
    let owner = kernel::current_owner(ev.netns);
    kernel::set_owner(ev, &owner);
    kernel::submit(hook, entry);
}
