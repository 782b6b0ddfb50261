//! Reads of kernel memory at offsets resolved from BTF in userspace.
use aya_ebpf::{
    EbpfContext,
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_probe_read_kernel, generated::bpf_jiffies64,
        generated::bpf_ktime_get_boot_ns,
    },
    maps::ring_buf::RingBufEntry,
    programs::RawTracePointContext,
};
use tcptrace_common::{
    ABSENT, AF_INET, AF_INET6, ArgIndex, ConnKey, EndKey, Event, FieldOffset, KERNEL_ABSENT,
    KernelOffsets, Owner, StormKey, flag, role,
};

use crate::{
    maps::{self, EVENTS, OWNERS},
    storm,
};

/// Reads a `T` at `base + offset`, or `None` when the offset is unknown or
/// the read faults.
#[inline(always)]
pub fn read<T>(base: u64, offset: u32) -> Option<T> {
    if base == 0 || offset == KERNEL_ABSENT {
        return None;
    }
    // SAFETY: bpf_probe_read_kernel checks the address and fails cleanly.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

/// Reads a tracepoint field, or `None` when this kernel's record lacks it.
#[inline(always)]
pub fn field<C: EbpfContext, T>(ctx: &C, offset: FieldOffset) -> Option<T> {
    if offset == ABSENT {
        return None;
    }
    // SAFETY: the offset comes from the tracepoint's own format description.
    unsafe {
        bpf_probe_read_kernel((ctx.as_ptr() as *const u8).add(offset as usize) as *const T).ok()
    }
}

/// Network namespace inode of a `struct net *`.
#[inline(always)]
pub fn net_inum(net: u64, k: &KernelOffsets) -> u32 {
    read::<u32>(net, k.net_inum).unwrap_or(0)
}

#[inline(always)]
pub fn sock_net(sk: u64, k: &KernelOffsets) -> u64 {
    read::<u64>(sk, k.sock_net).unwrap_or(0)
}

/// Records namespace `net`'s ephemeral port range on `ev`.
#[inline(always)]
pub fn port_range(net: u64, k: &KernelOffsets, ev: &mut Event) {
    let range = if k.port_range_packed != 0 {
        read::<u32>(net, k.net_port_range).map(|r| (r as u16, (r >> 16) as u16))
    } else {
        read::<[i32; 2]>(net, k.net_port_range).map(|r| (r[0] as u16, r[1] as u16))
    };
    if let Some((lo, hi)) = range {
        ev.port_lo = lo;
        ev.port_hi = hi;
        ev.flags |= flag::PORT_RANGE;
    }
}

/// The current task's network namespace (`struct net *`).
#[inline(always)]
pub fn current_net() -> u64 {
    let k = &maps::config().kernel;
    // SAFETY: helper without preconditions; the pointer is only read through
    // bpf_probe_read_kernel.
    let task = unsafe { bpf_get_current_task() };
    let nsproxy: u64 = read(task, k.task_nsproxy).unwrap_or(0);
    read(nsproxy, k.nsproxy_net).unwrap_or(0)
}

/// The current task as the owner of a socket in `role`.
#[inline(always)]
pub fn current_owner(netns: u32, role: u32) -> Owner {
    Owner {
        // SAFETY: helper without preconditions.
        cgroup_id: unsafe { bpf_get_current_cgroup_id() },
        tgid: (bpf_get_current_pid_tgid() >> 32) as u32,
        netns,
        comm: bpf_get_current_comm().unwrap_or([0; 16]),
        reset_ns: 0,
        fin_ns: 0,
        reset_errno: 0,
        fin_idle_jiffies: 0,
        role,
        _pad: 0,
        // SAFETY: a helper without preconditions.
        start_ns: unsafe { bpf_ktime_get_boot_ns() },
    }
}

/// Whether an event concerns tcptrace itself.
#[inline(always)]
pub fn is_self(tgid: u32) -> bool {
    tgid != 0 && tgid == maps::config().self_tgid
}

/// A zeroed event of `kind` with its timestamp, reserved on the ring buffer.
/// Counts a lost event for `hook` when the buffer is full.
#[inline(always)]
pub fn reserve(hook: u32, kind: u8) -> Option<RingBufEntry<Event>> {
    let Some(mut entry) = EVENTS.reserve::<Event>(0) else {
        maps::count(hook, tcptrace_common::COUNTER_LOST);
        return None;
    };
    let ptr = entry.as_mut_ptr();
    // SAFETY: the entry is exclusively ours and sized for an Event.
    unsafe {
        core::ptr::write_bytes(ptr, 0, 1);
        (*ptr).kind = kind;
        (*ptr).ts_ns = bpf_ktime_get_boot_ns();
    }
    Some(entry)
}

#[inline(always)]
pub fn submit(hook: u32, entry: RingBufEntry<Event>) {
    entry.submit(0);
    maps::count(hook, tcptrace_common::COUNTER_SEEN);
}

/// Submits `entry`, or counts it as a repeat of `key`'s failure.
#[inline(always)]
pub fn submit_or_count(hook: u32, mut entry: RingBufEntry<Event>, key: &StormKey) {
    if storm::count_repeat(hook, key) {
        entry.discard(0);
        return;
    }
    // SAFETY: reserve() initialised the entry.
    let ev = unsafe { entry.assume_init_mut() };
    if storm::open(hook, key, ev) {
        submit(hook, entry);
    } else {
        entry.discard(0);
    }
}

/// The storm key of a filled record: its destination (a bind's address)
/// and its error.
#[inline(always)]
pub fn dst_key(ev: &Event) -> StormKey {
    let (addr, port) = if ev.kind == tcptrace_common::kind::BIND_ERROR {
        (ev.saddr, ev.sport)
    } else {
        (ev.daddr, ev.dport)
    };
    StormKey {
        errno: ev.errno,
        ..storm::key(
            ev.kind,
            ev.netns,
            ev.cgroup_id,
            ev.family,
            addr,
            port,
            [0; 16],
        )
    }
}

/// What `struct sock_common` says of a socket's far end and state.
pub struct SockHead {
    pub daddr: [u8; 4],
    /// Host order.
    pub dport: u16,
    pub family: u16,
    pub state: u8,
}

/// Reads [`SockHead`]: one read where the layout allows.
#[inline(always)]
pub fn sock_head(sk: u64, k: &KernelOffsets) -> SockHead {
    if k.sock_head_packed != 0
        && let Some(b) = read::<[u8; 20]>(sk, 0)
    {
        return SockHead {
            daddr: [b[0], b[1], b[2], b[3]],
            dport: u16::from_be_bytes([b[12], b[13]]),
            family: u16::from_ne_bytes([b[16], b[17]]),
            state: b[18],
        };
    }
    SockHead {
        daddr: read(sk, k.sock_daddr).unwrap_or([0; 4]),
        dport: u16::from_be(read::<u16>(sk, k.sock_dport).unwrap_or(0)),
        family: read::<u16>(sk, k.sock_family).unwrap_or(0),
        state: read::<u8>(sk, k.sock_state).unwrap_or(0),
    }
}

/// The storm key of a refused connect on the client (its server end), and
/// the socket's owner record. The owner of a socket in SYN_SENT was
/// recorded at its connect() in this run, with its namespace; only the
/// server end is read from the socket.
#[inline(always)]
pub fn refused_key(
    sk: u64,
    head: &SockHead,
    k: &KernelOffsets,
    kind: u8,
) -> (StormKey, Option<*mut Owner>) {
    let owner = OWNERS.get_ptr_mut(sk);
    let (cgroup, netns) = match owner {
        // SAFETY: a map value of the right type, read at once.
        Some(o) => unsafe { ((*o).cgroup_id, (*o).netns) },
        None => (0, net_inum(sock_net(sk, k), k)),
    };
    let family = head.family as u8;
    let mut addr = [0u8; 16];
    if family == AF_INET6 {
        addr = read(sk, k.sock_v6_daddr).unwrap_or([0; 16]);
    } else {
        addr[..4].copy_from_slice(&head.daddr);
    }
    (
        storm::key(kind, netns, cgroup, family, addr, head.dport, [0; 16]),
        owner,
    )
}

/// Copies an owner (and what it recorded of the peer's FIN) into the event;
/// the process only when it is known.
#[inline(always)]
pub fn set_owner(ev: &mut Event, owner: &Owner) {
    if ev.netns == 0 {
        ev.netns = owner.netns;
    }
    if owner.tgid != 0 {
        ev.tgid = owner.tgid;
        ev.cgroup_id = owner.cgroup_id;
        ev.comm = owner.comm;
        ev.flags |= flag::OWNER_KNOWN;
    }
    if owner.role == role::CLIENT {
        ev.flags |= flag::ROLE_CLIENT;
    } else if owner.role == role::SERVER {
        ev.flags |= flag::ROLE_SERVER;
    }
    if owner.fin_ns != 0 {
        ev.fin_ns = owner.fin_ns;
        ev.fin_idle_jiffies = owner.fin_idle_jiffies;
        ev.flags |= flag::PEER_FIN;
    }
}

/// Jiffies since data last went either way on a full TCP socket.
#[inline(always)]
pub fn data_idle_jiffies(sk: u64, k: &KernelOffsets) -> Option<u32> {
    let lsnd = read::<u32>(sk, k.tcp_lsndtime)?;
    let lrcv = read::<u32>(sk, k.icsk_lrcvtime)?;
    // Jiffies wrap: the later of the two by signed distance.
    let last = if (lrcv.wrapping_sub(lsnd) as i32) > 0 {
        lrcv
    } else {
        lsnd
    };
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_jiffies64() } as u32;
    Some(now.wrapping_sub(last))
}

/// Looks up the recorded owner of `sk`. Returns false when the socket is
/// tcptrace's own and the event must be dropped.
#[inline(always)]
pub fn attach_owner(ev: &mut Event, sk: u64) -> bool {
    if sk == 0 {
        return true;
    }
    // SAFETY: the value is copied out before any map update.
    if let Some(owner) = unsafe { OWNERS.get(sk) } {
        if is_self(owner.tgid) {
            return false;
        }
        let owner = *owner;
        set_owner(ev, &owner);
    }
    true
}

/// A raw tracepoint argument whose position this kernel's BTF gave, or
/// `None` when the tracepoint lacks it. Read through the helper: a
/// context load needs an offset the compiler keeps constant, and reading
/// past a tracepoint's last argument would refuse the attach.
#[inline(always)]
pub fn raw_arg(ctx: &RawTracePointContext, index: ArgIndex) -> Option<u64> {
    if index >= MAX_RAW_ARGS {
        return None;
    }
    // SAFETY: the index is below the tracepoint's argument count (BTF), so
    // the read stays inside the argument array; the helper checks anyway.
    unsafe { bpf_probe_read_kernel((ctx.as_ptr() as *const u64).add(index as usize)).ok() }
}

/// Raw tracepoints pass at most 12 arguments.
const MAX_RAW_ARGS: ArgIndex = 12;

/// Reads the 4-tuple and state straight from a `struct sock`.
#[inline(always)]
pub fn tuple_from_sock(sk: u64, k: &KernelOffsets, ev: &mut Event) {
    ev.family = read::<u16>(sk, k.sock_family).unwrap_or(0) as u8;
    ev.sport = u16::from_be(read::<u16>(sk, k.inet_sport).unwrap_or(0));
    ev.dport = u16::from_be(read::<u16>(sk, k.sock_dport).unwrap_or(0));
    ev.state = read::<u8>(sk, k.sock_state).unwrap_or(0);
    if ev.family == AF_INET6 {
        ev.saddr = read(sk, k.sock_v6_rcv_saddr).unwrap_or([0; 16]);
        ev.daddr = read(sk, k.sock_v6_daddr).unwrap_or([0; 16]);
    } else {
        let s: [u8; 4] = read(sk, k.sock_rcv_saddr).unwrap_or([0; 4]);
        let d: [u8; 4] = read(sk, k.sock_daddr).unwrap_or([0; 4]);
        ev.saddr[..4].copy_from_slice(&s);
        ev.daddr[..4].copy_from_slice(&d);
    }
}

/// The connection of a full socket, as the socket sees it.
#[inline(always)]
pub fn conn_key_of_sock(sk: u64, k: &KernelOffsets) -> ConnKey {
    let mut key = ConnKey {
        local: [0; 16],
        remote: [0; 16],
        local_port: u16::from_be(read::<u16>(sk, k.inet_sport).unwrap_or(0)),
        remote_port: u16::from_be(read::<u16>(sk, k.sock_dport).unwrap_or(0)),
        family: read::<u16>(sk, k.sock_family).unwrap_or(0) as u8,
        _pad: [0; 3],
    };
    if key.family == AF_INET6 {
        key.local = read(sk, k.sock_v6_rcv_saddr).unwrap_or([0; 16]);
        key.remote = read(sk, k.sock_v6_daddr).unwrap_or([0; 16]);
    } else {
        let s: [u8; 4] = read(sk, k.sock_rcv_saddr).unwrap_or([0; 4]);
        let d: [u8; 4] = read(sk, k.sock_daddr).unwrap_or([0; 4]);
        key.local[..4].copy_from_slice(&s);
        key.remote[..4].copy_from_slice(&d);
    }
    key
}

#[inline(always)]
pub fn end_key(addr: [u8; 16], port: u16, family: u8) -> EndKey {
    EndKey {
        addr,
        port,
        family,
        _pad: [0; 5],
    }
}

/// Reads the 4-tuple of a request socket (a connection still in its
/// handshake): its local port is `skc_num`, it has no `inet_sock`.
#[inline(always)]
pub fn tuple_from_request(req: u64, k: &KernelOffsets, ev: &mut Event) {
    ev.family = read::<u16>(req, k.sock_family).unwrap_or(0) as u8;
    ev.sport = read::<u16>(req, k.sock_num).unwrap_or(0);
    ev.dport = u16::from_be(read::<u16>(req, k.sock_dport).unwrap_or(0));
    if ev.family == AF_INET6 {
        ev.saddr = read(req, k.sock_v6_rcv_saddr).unwrap_or([0; 16]);
        ev.daddr = read(req, k.sock_v6_daddr).unwrap_or([0; 16]);
    } else {
        let s: [u8; 4] = read(req, k.sock_rcv_saddr).unwrap_or([0; 4]);
        let d: [u8; 4] = read(req, k.sock_daddr).unwrap_or([0; 4]);
        ev.saddr[..4].copy_from_slice(&s);
        ev.daddr[..4].copy_from_slice(&d);
    }
}

/// A TCP segment's addresses (network order), ports and flags.
pub struct Segment {
    pub family: u8,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub sport: u16,
    pub dport: u16,
    pub flags: u8,
}

impl Segment {
    /// Copies the segment into a record, as it travelled.
    #[inline(always)]
    pub fn fill(&self, ev: &mut Event) {
        ev.family = self.family;
        ev.saddr = self.saddr;
        ev.daddr = self.daddr;
        ev.sport = self.sport;
        ev.dport = self.dport;
        ev.tcp_flags = self.flags;
        ev.flags |= flag::TCP_FLAGS_KNOWN;
    }

    /// The segment's two ends: (source, destination).
    #[inline(always)]
    pub fn ends(&self) -> (EndKey, EndKey) {
        (
            end_key(self.saddr, self.sport, self.family),
            end_key(self.daddr, self.dport, self.family),
        )
    }

    /// The storm key of the reset refusing this segment: the closed end,
    /// and the address of the client refused.
    #[inline(always)]
    pub fn refused_key(&self, netns: u32, kind: u8) -> StormKey {
        storm::key(
            kind,
            netns,
            0,
            self.family,
            self.daddr,
            self.dport,
            self.saddr,
        )
    }

    /// The connection of the socket receiving this segment.
    #[inline(always)]
    pub fn receiver(&self) -> ConnKey {
        ConnKey {
            local: self.daddr,
            remote: self.saddr,
            local_port: self.dport,
            remote_port: self.sport,
            family: self.family,
            _pad: [0; 3],
        }
    }

    /// Copies the addresses of a reply to the segment (a reset answering
    /// it): from its destination back to its source. The flags stay the
    /// segment's.
    #[inline(always)]
    pub fn fill_reply(&self, ev: &mut Event) {
        ev.family = self.family;
        ev.saddr = self.daddr;
        ev.daddr = self.saddr;
        ev.sport = self.dport;
        ev.dport = self.sport;
    }
}

const IPPROTO_TCP: u8 = 6;

/// The IPv4/IPv6 and TCP headers at the skb's network header; `None` when
/// the packet is not TCP or unreadable. IPv6 extension headers are not
/// followed.
#[inline(always)]
pub fn skb_segment(skb: u64, k: &KernelOffsets) -> Option<Segment> {
    let head = read::<u64>(skb, k.skb_head)?;
    let nh = read::<u16>(skb, k.skb_network_header)?;
    let ip = head + nh as u64;
    let mut seg = Segment {
        family: AF_INET,
        saddr: [0; 16],
        daddr: [0; 16],
        sport: 0,
        dport: 0,
        flags: 0,
    };
    // An IPv4 header without options and the TCP ports and flags after
    // it, in one read (the common case).
    let v4 = read::<[u8; 34]>(ip, 0)?;
    let tcp = if v4[0] >> 4 == 4 {
        if v4[9] != IPPROTO_TCP {
            return None;
        }
        seg.saddr[..4].copy_from_slice(&v4[12..16]);
        seg.daddr[..4].copy_from_slice(&v4[16..20]);
        if v4[0] & 0x0f == 5 {
            seg.sport = u16::from_be_bytes([v4[20], v4[21]]);
            seg.dport = u16::from_be_bytes([v4[22], v4[23]]);
            seg.flags = v4[33];
            return Some(seg);
        }
        ip + ((v4[0] & 0x0f) as u64) * 4
    } else {
        let v6 = read::<[u8; 40]>(ip, 0)?;
        if v6[0] >> 4 != 6 || v6[6] != IPPROTO_TCP {
            return None;
        }
        seg.family = AF_INET6;
        seg.saddr.copy_from_slice(&v6[8..24]);
        seg.daddr.copy_from_slice(&v6[24..40]);
        ip + 40
    };
    let th = read::<[u8; 14]>(tcp, 0)?;
    seg.sport = u16::from_be_bytes([th[0], th[1]]);
    seg.dport = u16::from_be_bytes([th[2], th[3]]);
    seg.flags = th[13];
    Some(seg)
}

/// Whether a socket in `state` is a full `struct sock` (not a time-wait
/// or request socket, which end after `struct sock_common`).
#[inline(always)]
pub fn is_full_sock(state: u32) -> bool {
    let s = &maps::config().states;
    state != s.time_wait && state != s.new_syn_recv
}

/// Whether `state` is one of a full, synchronized TCP socket, whose
/// timestamps and keepalive settings mean something.
#[inline(always)]
pub fn has_tcp_detail(state: u32) -> bool {
    let s = &maps::config().states;
    state != s.syn_sent
        && state != s.syn_recv
        && state != s.listen
        && state != s.time_wait
        && state != s.new_syn_recv
}

/// Idle time, keepalive, srtt and retransmits of a full TCP socket.
#[inline(always)]
pub fn tcp_detail(sk: u64, k: &KernelOffsets, ev: &mut Event) {
    let (Some(lsnd), Some(rcv)) = (
        read::<u32>(sk, k.tcp_lsndtime),
        read::<u32>(sk, k.tcp_rcv_tstamp),
    ) else {
        return;
    };
    // No RTT sample yet: the handshake never completed, timestamps are unset.
    let srtt = read::<u32>(sk, k.tcp_srtt_us).unwrap_or(0);
    if srtt == 0 {
        return;
    }
    let lrcv = read::<u32>(sk, k.icsk_lrcvtime).unwrap_or(rcv);
    // SAFETY: helper without preconditions.
    let now = unsafe { bpf_jiffies64() } as u32;
    // Jiffies wrap: compare as signed distances.
    let last_heard = if (lrcv.wrapping_sub(rcv) as i32) > 0 {
        lrcv
    } else {
        rcv
    };
    ev.idle_jiffies = now.wrapping_sub(last_heard);
    ev.since_send_jiffies = now.wrapping_sub(lsnd);
    if let Some(flags) = read::<u64>(sk, k.sock_flags)
        && k.keepopen_bit < 64
        && flags & (1u64 << k.keepopen_bit) != 0
    {
        ev.flags |= flag::KEEPALIVE_ON;
    }
    let mut keepalive = read::<u32>(sk, k.tcp_keepalive_time).unwrap_or(0);
    if keepalive == 0 {
        let net = sock_net(sk, k);
        keepalive = read::<u32>(net, k.net_keepalive_time).unwrap_or(0);
    }
    ev.keepalive_jiffies = keepalive;
    ev.srtt_us = srtt >> 3;
    ev.total_retrans = read::<u32>(sk, k.tcp_total_retrans).unwrap_or(0);
    ev.flags |= flag::TCP_DETAIL;
}
