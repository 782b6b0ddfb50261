//! bind() failures (EADDRINUSE, EADDRNOTAVAIL): no socket-level signal
//! exists, so the syscall is traced. The address is saved at entry.
use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_probe_read_user_buf},
    macros::tracepoint,
    programs::TracePointContext,
};
use tcptrace_common::{AF_INET, AF_INET6, BindArgs, Event, hook, kind, role};

use crate::{
    kernel::{self, field},
    maps::{BIND_ARGS, config},
};

/// Argument `n` of the syscall whose entry is traced.
#[inline(always)]
fn syscall_arg(ctx: &TracePointContext, n: u16) -> Option<u64> {
    let args = config().syscalls.args;
    if args == tcptrace_common::ABSENT {
        return None;
    }
    field(ctx, args + 8 * n)
}

const EADDRINUSE: i64 = 98;
const EADDRNOTAVAIL: i64 = 99;

#[tracepoint(category = "syscalls", name = "sys_enter_bind")]
pub fn sys_enter_bind(ctx: TracePointContext) -> u32 {
    // bind(int fd, struct sockaddr *umyaddr, int addrlen)
    let Some(uaddr) = syscall_arg(&ctx, 1) else {
        return 0;
    };
    let len = syscall_arg(&ctx, 2).unwrap_or(0);
    let mut args = BindArgs {
        addr: [0; 28],
        _pad: 0,
    };
    let n = if len >= 28 {
        28
    } else if len >= 16 {
        16
    } else {
        return 0;
    };
    // SAFETY: the helper validates the user pointer.
    if unsafe { bpf_probe_read_user_buf(uaddr as *const u8, &mut args.addr[..n]) }.is_err() {
        return 0;
    }
    let family = u16::from_ne_bytes([args.addr[0], args.addr[1]]);
    if family != AF_INET as u16 && family != AF_INET6 as u16 {
        return 0;
    }
    let _ = BIND_ARGS.insert(bpf_get_current_pid_tgid(), args, 0);
    0
}

#[tracepoint(category = "syscalls", name = "sys_exit_bind")]
pub fn sys_exit_bind(ctx: TracePointContext) -> u32 {
    let id = bpf_get_current_pid_tgid();
    // SAFETY: copied out before the entry is removed.
    let Some(args) = (unsafe { BIND_ARGS.get(id) }).copied() else {
        return 0;
    };
    let _ = BIND_ARGS.remove(id);
    let ret = field::<_, i64>(&ctx, config().syscalls.ret).unwrap_or(0);
    if ret != -EADDRINUSE && ret != -EADDRNOTAVAIL {
        return 0;
    }
    let tgid = (id >> 32) as u32;
    if kernel::is_self(tgid) {
        return 0;
    }
    let Some(mut entry) = kernel::reserve(hook::EXIT_BIND, kind::BIND_ERROR) else {
        return 0;
    };
    // SAFETY: reserve() initialised the entry.
    let ev: &mut Event = unsafe { entry.assume_init_mut() };
    let raw = &args.addr;
    let family = u16::from_ne_bytes([raw[0], raw[1]]);
    ev.family = family as u8;
    ev.sport = u16::from_be_bytes([raw[2], raw[3]]);
    if family == AF_INET6 as u16 {
        ev.saddr.copy_from_slice(&raw[8..24]);
    } else {
        ev.saddr[..4].copy_from_slice(&raw[4..8]);
    }
    ev.errno = ret as i32;
    let owner = kernel::current_owner(0, role::UNKNOWN);
    kernel::set_owner(ev, &owner);
    // The netns of the calling task.
    let net = kernel::current_net();
    ev.netns = kernel::net_inum(net, &config().kernel);
    kernel::port_range(net, &config().kernel, ev);
    let key = kernel::dst_key(ev);
    kernel::submit_or_count(hook::EXIT_BIND, entry, &key);
    0
}
