//! Kernel/user ABI of tcptrace: the records the BPF programs write and the
//! configuration userspace hands them. Fixed-width integers only, explicit
//! padding, sizes asserted at compile time.
#![cfg_attr(not(test), no_std)]

/// Name of the ring buffer carrying [`Event`]s.
pub const EVENTS_MAP: &str = "EVENTS";
/// Per-CPU array of `u64` counters, indexed by [`counter_index`].
pub const COUNTERS_MAP: &str = "COUNTERS";
/// LRU map: sock pointer -> [`Owner`] recorded in process context.
pub const OWNERS_MAP: &str = "OWNERS";
/// LRU map: [`ListenKey`] -> [`Owner`] of the listening process.
pub const LISTENERS_MAP: &str = "LISTENERS";
/// Hash map: pid_tgid -> [`BindArgs`] between bind() entry and exit.
pub const BIND_ARGS_MAP: &str = "BIND_ARGS";
/// Hash map: pid_tgid -> sock pointer between the kprobe and kretprobe.
pub const HASH_CONNECT_ARGS_MAP: &str = "HASH_CONNECT_ARGS";
/// Per-CPU array of one [`CtAllocArgs`] between the kprobe and kretprobe
/// of __nf_conntrack_alloc (it runs in softirq, without a sleeping task).
pub const CT_ALLOC_ARGS_MAP: &str = "CT_ALLOC_ARGS";
/// LRU hash of [`ConnKey`] -> sock pointer: established connections, on
/// kernels whose kfree_skb names no socket.
pub const CONN_SOCKS_MAP: &str = "CONN_SOCKS";
/// Its size there: connections indexed at once.
pub const CONN_SOCKS_ENTRIES: u32 = 65_536;

/// Array of one u32: which direct-tier hooks are live ([`direct`] bits),
/// written by userspace after attaching so fallbacks do not double-report.
pub const DIRECT_MAP: &str = "DIRECT";
/// LRU map: [`EndKey`] -> when the flow was last watched (boot ns).
pub const WATCHED_MAP: &str = "WATCHED";
/// Array of one u64: when some flow was last watched (boot ns).
pub const WATCH_LAST_MAP: &str = "WATCH_LAST";

/// Every map of the BPF object, by name.
pub const MAPS: [&str; 14] = [
    EVENTS_MAP,
    COUNTERS_MAP,
    OWNERS_MAP,
    LISTENERS_MAP,
    BIND_ARGS_MAP,
    HASH_CONNECT_ARGS_MAP,
    CT_ALLOC_ARGS_MAP,
    CONN_SOCKS_MAP,
    DIRECT_MAP,
    WATCHED_MAP,
    WATCH_LAST_MAP,
    STORMS_MAP,
    STORM_GEN_MAP,
    CLOCK_MAP,
];

/// Bits of the [`DIRECT_MAP`] value.
pub mod direct {
    /// inet_hash_connect is hooked: the tracepoint signature of a failed
    /// connect without a source port is not reported again.
    pub const HASH_CONNECT: u32 = 1 << 0;
}

/// The arguments of __nf_conntrack_alloc, saved for its kretprobe.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtAllocArgs {
    pub net: u64,
    pub orig: u64,
}
/// Socket filter returning the low 32 bits of jiffies when test-run, with
/// CLOCK_MONOTONIC of the same moment in [`CLOCK_MAP`]: how userspace
/// measures the kernel's tick rate. Loaded, never attached.
pub const CLOCK_PROGRAM: &str = "tick_clock";
/// Array of one u64: CLOCK_MONOTONIC (ns) at the clock program's last run.
pub const CLOCK_MAP: &str = "CLOCK";

/// Name of the read-only global holding [`Config`].
pub const CONFIG_GLOBAL: &str = "CONFIG";

/// One BPF program per hook; the index is also the counter slot.
pub mod hook {
    pub const RETRANSMIT_SKB: u32 = 0;
    pub const RETRANSMIT_SYNACK: u32 = 1;
    pub const SEND_RESET: u32 = 2;
    pub const RECEIVE_RESET: u32 = 3;
    pub const SET_STATE: u32 = 4;
    pub const ERROR_REPORT: u32 = 5;
    pub const KFREE_SKB: u32 = 6;
    pub const ENTER_BIND: u32 = 7;
    pub const EXIT_BIND: u32 = 8;
    /// Direct tier: inet_hash_connect's result (EADDRNOTAVAIL).
    pub const HASH_CONNECT_FEXIT: u32 = 9;
    pub const HASH_CONNECT_KPROBE: u32 = 10;
    pub const HASH_CONNECT_KRETPROBE: u32 = 11;
    /// Direct tier: conntrack entry allocation failing (table full).
    pub const CT_ALLOC_FEXIT: u32 = 12;
    pub const CT_ALLOC_KPROBE: u32 = 13;
    pub const CT_ALLOC_KRETPROBE: u32 = 14;
    /// Direct tier: conntrack judging a TCP segment INVALID (kprobe only:
    /// the function lives in the nf_conntrack module).
    pub const CT_INVALID_KPROBE: u32 = 15;
    pub const COUNT: u32 = 16;

    /// (program name in the ELF, kind, kernel hook). Kinds: a tracepoint
    /// category, `raw_tp`, `fexit`, `kprobe` or `kretprobe`.
    pub const PROGRAMS: [(&str, &str, &str); COUNT as usize] = [
        ("tcp_retransmit_skb", "raw_tp", "tcp_retransmit_skb"),
        ("tcp_retransmit_synack", "raw_tp", "tcp_retransmit_synack"),
        ("tcp_send_reset", "raw_tp", "tcp_send_reset"),
        ("tcp_receive_reset", "raw_tp", "tcp_receive_reset"),
        ("inet_sock_set_state", "raw_tp", "inet_sock_set_state"),
        ("inet_sk_error_report", "raw_tp", "inet_sk_error_report"),
        ("kfree_skb", "raw_tp", "kfree_skb"),
        ("sys_enter_bind", "syscalls", "sys_enter_bind"),
        ("sys_exit_bind", "syscalls", "sys_exit_bind"),
        ("inet_hash_connect_fexit", "fexit", "inet_hash_connect"),
        ("inet_hash_connect_entry", "kprobe", "inet_hash_connect"),
        ("inet_hash_connect_return", "kretprobe", "inet_hash_connect"),
        ("nf_conntrack_alloc_fexit", "fexit", "__nf_conntrack_alloc"),
        ("nf_conntrack_alloc_entry", "kprobe", "__nf_conntrack_alloc"),
        (
            "nf_conntrack_alloc_return",
            "kretprobe",
            "__nf_conntrack_alloc",
        ),
        ("ct_invalid_entry", "kprobe", "nf_ct_l4proto_log_invalid"),
    ];
}

/// Counter slots per hook: events emitted, events lost (ring buffer full).
pub const COUNTER_SEEN: u32 = 0;
pub const COUNTER_LOST: u32 = 1;
/// Repeats counted in [`STORMS_MAP`] instead of sent as records.
pub const COUNTER_REPEATS: u32 = 2;
/// Failures (first ones included) sent as records because [`STORMS_MAP`] was
/// full.
pub const COUNTER_STORMS_FULL: u32 = 3;
pub const COUNTERS_PER_HOOK: u32 = 4;
pub const COUNTERS_LEN: u32 = hook::COUNT * COUNTERS_PER_HOOK;

#[inline(always)]
pub const fn counter_index(hook: u32, slot: u32) -> u32 {
    hook * COUNTERS_PER_HOOK + slot
}

/// Event kinds (`Event::kind`).
pub mod kind {
    pub const RETRANSMIT: u8 = 1;
    pub const SYNACK_RETRANSMIT: u8 = 2;
    pub const RESET_SENT: u8 = 3;
    pub const RESET_RECEIVED: u8 = 4;
    pub const STATE_CHANGE: u8 = 5;
    pub const DROP: u8 = 6;
    pub const CONNECT_ERROR: u8 = 7;
    pub const BIND_ERROR: u8 = 8;
    pub const SOCKET_ERROR: u8 = 9;
    /// conntrack marked a segment INVALID; `reason` is a [`super::ct_invalid`] class.
    pub const CONNTRACK_INVALID: u8 = 10;
}

/// Why conntrack found a TCP segment INVALID, from the message it passes to
/// nf_ct_l4proto_log_invalid (called whether or not logging is on).
pub mod ct_invalid {
    /// Sequence number beyond the receiver's window (tcp_in_window).
    pub const SEQ_OVER: u32 = 1;
    /// Acknowledgment of data never sent (tcp_in_window).
    pub const ACK_OVER: u32 = 2;
    /// A flag combination the TCP state table forbids in this state.
    pub const STATE: u32 = 3;
    /// A reset with an unacceptable sequence number.
    pub const RST: u32 = 4;

    /// Messages that mean INVALID; the function also reports segments it
    /// ignores but accepts ("SEQ is under lower bound", "ignored", ...).
    /// Before 6.1.187 / 6.12.102 the window messages come wrapped in "%pV".
    pub const MESSAGES: [(&[u8], u32); 4] = [
        (b"SEQ is over", SEQ_OVER),
        (b"ACK is over", ACK_OVER),
        (b"packet (index %d) in dir %d invalid", STATE),
        (b"invalid rst", RST),
    ];

    /// The class of a NUL-terminated message, 0 when it is not INVALID.
    #[inline(always)]
    pub fn classify(msg: &[u8; 40]) -> u32 {
        let mut class = 0;
        for (prefix, c) in MESSAGES {
            if starts_with(msg, prefix) {
                class = c;
            }
        }
        class
    }

    #[inline(always)]
    fn starts_with(msg: &[u8; 40], prefix: &[u8]) -> bool {
        let mut i = 0;
        while i < prefix.len() && i < msg.len() {
            if msg[i] != prefix[i] {
                return false;
            }
            i += 1;
        }
        i == prefix.len()
    }

    /// The name userspace reports for a class.
    pub fn name(class: u32) -> Option<&'static str> {
        match class {
            SEQ_OVER => Some("SEQ_OVER"),
            ACK_OVER => Some("ACK_OVER"),
            STATE => Some("STATE"),
            RST => Some("RST"),
            _ => None,
        }
    }
}

/// Bits of `Event::flags`.
pub mod flag {
    /// pid/tgid/comm/cgroup come from the socket's recorded owner.
    pub const OWNER_KNOWN: u32 = 1 << 0;
    /// idle/keepalive/srtt/retrans fields were read from the tcp_sock.
    pub const TCP_DETAIL: u32 = 1 << 1;
    /// SO_KEEPALIVE is set on the socket.
    pub const KEEPALIVE_ON: u32 = 1 << 2;
    /// `tcp_flags` holds the flags of the segment involved.
    pub const TCP_FLAGS_KNOWN: u32 = 1 << 3;
    /// `reason` holds a reset reason (tcp_send_reset on kernels that have it).
    pub const REASON_KNOWN: u32 = 1 << 4;
    /// A drop because conntrack could not allocate an entry (table full).
    pub const CT_ALLOC_FAILED: u32 = 1 << 5;
    /// A reset sent for a segment without a socket, seen through the
    /// segment's NO_SOCKET drop (kernels before 6.10).
    pub const RESET_FROM_DROP: u32 = 1 << 6;
    /// The socket's owner connected it (`connect()`).
    pub const ROLE_CLIENT: u32 = 1 << 7;
    /// The socket's owner accepted it (or it is a listener).
    pub const ROLE_SERVER: u32 = 1 << 8;
    /// `fin_ns` and `fin_idle_jiffies` tell when the peer closed its side.
    pub const PEER_FIN: u32 = 1 << 9;
    /// A handshake that needed retransmits completed: `total_retrans`
    /// holds them, `connect_ms` how long connect() took (0: unknown).
    pub const SLOW_HANDSHAKE: u32 = 1 << 10;
    /// `port_lo`..=`port_hi` is the namespace's ephemeral port range.
    pub const PORT_RANGE: u32 = 1 << 11;
    /// The first record of a storm: its repeats in this generation are
    /// counted in [`crate::STORMS_MAP`] under its key, with this record's
    /// `ts_ns` as the count's `first_ns`.
    pub const STORM_FIRST: u32 = 1 << 12;
}

/// `Owner::role` values.
pub mod role {
    pub const UNKNOWN: u32 = 0;
    pub const CLIENT: u32 = 1;
    pub const SERVER: u32 = 2;
}

pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;

/// One record on the ring buffer. Addresses are in network byte order,
/// ports in host byte order. Times in jiffies are converted in userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// bpf_ktime_get_boot_ns()
    pub ts_ns: u64,
    /// struct sock pointer, 0 when the event has no socket.
    pub sk: u64,
    pub cgroup_id: u64,
    /// kfree_skb: the kernel address that dropped the packet.
    pub location: u64,
    pub saddr: [u8; 16],
    pub daddr: [u8; 16],
    pub netns: u32,
    pub tgid: u32,
    pub sport: u16,
    pub dport: u16,
    pub kind: u8,
    pub family: u8,
    /// TCP state as the kernel numbers it (new state for state changes).
    pub state: u8,
    pub old_state: u8,
    /// Negative errno for errors, 0 otherwise.
    pub errno: i32,
    /// Drop reason (kfree_skb) or reset reason (tcp_send_reset).
    pub reason: u32,
    pub flags: u32,
    /// Jiffies since the peer was last heard from.
    pub idle_jiffies: u32,
    /// Jiffies since new data was last sent.
    pub since_send_jiffies: u32,
    /// Effective keepalive time in jiffies (socket option or netns sysctl).
    pub keepalive_jiffies: u32,
    pub srtt_us: u32,
    pub total_retrans: u32,
    pub tcp_flags: u8,
    pub _pad: u8,
    /// With `flag::STORM_FIRST`: the CPU whose slot of the count holds this
    /// record's `ts_ns` (two storms may start in the same nanosecond).
    pub storm_cpu: u16,
    pub comm: [u8; 16],
    /// When the peer's FIN arrived (boot ns, with `flag::PEER_FIN`).
    pub fin_ns: u64,
    /// How long the connection had been idle when that FIN arrived.
    pub fin_idle_jiffies: u32,
    /// With `flag::SLOW_HANDSHAKE`: milliseconds from connect() to
    /// ESTABLISHED (0 when unknown: an accepted connection).
    pub connect_ms: u32,
    /// With `flag::PORT_RANGE`: the namespace's ip_local_port_range at the
    /// failure (the namespace may be gone by the time userspace looks).
    pub port_lo: u16,
    pub port_hi: u16,
    /// With `flag::STORM_FIRST`: the generation its repeats are counted in.
    pub storm_generation: u32,
}

const _: () = assert!(size_of::<Event>() == 160);

/// Who owns a socket, captured in process context, its role, when the
/// peer closed its side and the reset it received last (recorded afresh at
/// every connect/listen/accept).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Owner {
    pub cgroup_id: u64,
    pub tgid: u32,
    pub netns: u32,
    pub comm: [u8; 16],
    /// When the socket received a reset (boot ns), 0 when it has not.
    pub reset_ns: u64,
    /// When the peer's FIN moved the socket to CLOSE_WAIT (boot ns), 0
    /// when it has not.
    pub fin_ns: u64,
    /// The error that reset raises (positive errno: ECONNREFUSED in
    /// SYN_SENT, EPIPE in CLOSE_WAIT, else ECONNRESET).
    pub reset_errno: u32,
    /// Jiffies since data last went either way, when that FIN arrived.
    pub fin_idle_jiffies: u32,
    /// A [`role`] value.
    pub role: u32,
    pub _pad: u32,
    /// When the owner was recorded (boot ns): connect(), listen(), accept.
    pub start_ns: u64,
}

const _: () = assert!(size_of::<Owner>() == 72);

impl Owner {
    /// No process known (tgid 0).
    pub const UNKNOWN: Self = Self {
        cgroup_id: 0,
        tgid: 0,
        netns: 0,
        comm: [0; 16],
        reset_ns: 0,
        fin_ns: 0,
        reset_errno: 0,
        fin_idle_jiffies: 0,
        role: role::UNKNOWN,
        _pad: 0,
        start_ns: 0,
    };
}

#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ListenKey {
    pub netns: u32,
    pub port: u16,
    pub _pad: u16,
}

const _: () = assert!(size_of::<ListenKey>() == 8);

/// A connection as its own socket sees it. Kernels whose kfree_skb has no
/// `rx_sk` (before 6.12) drop segments inside the TCP stack with neither a
/// device nor a socket on the skb: the socket is found by this key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnKey {
    pub local: [u8; 16],
    pub remote: [u8; 16],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

const _: () = assert!(size_of::<ConnKey>() == 40);

/// Hash of [`StormKey`] -> [`StormCount`]: repeats of one failure counted in the
/// kernel instead of sent as records.
pub const STORMS_MAP: &str = "STORMS";
/// Array of one u32: the generation new keys are counted in. Userspace
/// moves it on, waits until no program can still use the old one, then
/// reads and deletes the old generation's keys: no count is lost.
pub const STORM_GEN_MAP: &str = "STORM_GEN";
pub const STORM_ENTRIES: u32 = 16_384;

/// One failure repeated: the same kind and errno, in the same namespace
/// and cgroup, with the same stable end (the server's for a client; a
/// closed port's and the client's address for a reset that refused), in
/// one generation.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StormKey {
    pub addr: [u8; 16],
    pub peer: [u8; 16],
    pub cgroup_id: u64,
    pub netns: u32,
    pub generation: u32,
    pub port: u16,
    pub kind: u8,
    pub family: u8,
    /// A connect's or bind's error (0 for resets).
    pub errno: i32,
}

const _: () = assert!(size_of::<StormKey>() == 56);

/// Repeats of a [`StormKey`]'s failure, and the `ts_ns` of its first record.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StormCount {
    pub count: u64,
    pub first_ns: u64,
}

/// What [`ConnKey`] finds: the connection's socket and namespace (kept
/// past the socket's close, whose segments may still be dropped).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnSock {
    pub sk: u64,
    pub netns: u32,
    pub _pad: u32,
}

/// A connection's client end (address and port), which NAT on the way to
/// the server does not change: flows whose handshake needed retransmits are
/// watched by it, so that drops of their packets are reported whatever the
/// reason.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EndKey {
    pub addr: [u8; 16],
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}

const _: () = assert!(size_of::<EndKey>() == 24);

/// The sockaddr passed to bind(), saved until the syscall returns.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BindArgs {
    pub addr: [u8; 28],
    pub _pad: u32,
}

const _: () = assert!(size_of::<BindArgs>() == 32);

/// Offset of a field in a tracepoint record; [`ABSENT`] when the running
/// kernel's record has no such field.
pub type FieldOffset = u16;
pub const ABSENT: FieldOffset = u16::MAX;

/// Where the syscall tracepoints keep their values (`struct
/// syscall_trace_enter` / `syscall_trace_exit`, from BTF).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallOffsets {
    /// syscall_trace_enter.args: the syscall's arguments, 8 bytes each.
    pub args: FieldOffset,
    /// syscall_trace_exit.ret
    pub ret: FieldOffset,
}

impl SyscallOffsets {
    pub const NONE: Self = Self {
        args: ABSENT,
        ret: ABSENT,
    };
}

/// Position of a raw tracepoint argument that is not there on every kernel.
pub type ArgIndex = u32;
/// The running kernel's tracepoint has no such argument.
pub const NO_ARG: ArgIndex = u32::MAX;

/// Positions of raw tracepoint arguments that kernels added over time,
/// from the tracepoints' prototypes in BTF (`btf_trace_<name>`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawTpArgs {
    /// tcp_send_reset's `enum sk_rst_reason` (6.10+).
    pub send_reset_reason: ArgIndex,
    /// kfree_skb's `enum skb_drop_reason` (5.17+).
    pub kfree_skb_reason: ArgIndex,
    /// kfree_skb's `void *location`.
    pub kfree_skb_location: ArgIndex,
    /// kfree_skb's `struct sock *rx_sk`, the socket the packet was for (6.12+).
    pub kfree_skb_rx_sk: ArgIndex,
}

impl RawTpArgs {
    pub const NONE: Self = Self {
        send_reset_reason: NO_ARG,
        kfree_skb_reason: NO_ARG,
        kfree_skb_location: NO_ARG,
        kfree_skb_rx_sk: NO_ARG,
    };
}

/// Kernel struct member offsets resolved from BTF at load time. A value of
/// [`KERNEL_ABSENT`] disables what depends on it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KernelOffsets {
    /// sock.__sk_common.skc_net (a possible_net_t holding `struct net *`)
    pub sock_net: u32,
    /// net.ns.inum
    pub net_inum: u32,
    /// net.ipv4.sysctl_tcp_keepalive_time
    pub net_keepalive_time: u32,
    /// net.ipv4.ip_local_ports.range
    pub net_port_range: u32,
    /// 1: `range` is a u32 (low port in bits 0-15, high in 16-31, 6.6+);
    /// 0: an `int[2]`.
    pub port_range_packed: u32,
    /// sock.sk_flags
    pub sock_flags: u32,
    /// tcp_sock.lsndtime
    pub tcp_lsndtime: u32,
    /// tcp_sock.rcv_tstamp
    pub tcp_rcv_tstamp: u32,
    /// inet_connection_sock.icsk_ack.lrcvtime
    pub icsk_lrcvtime: u32,
    /// tcp_sock.keepalive_time
    pub tcp_keepalive_time: u32,
    /// tcp_sock.srtt_us
    pub tcp_srtt_us: u32,
    /// tcp_sock.total_retrans
    pub tcp_total_retrans: u32,
    /// sk_buff.cb + tcp_skb_cb.tcp_flags
    pub skb_tcp_flags: u32,
    /// sk_buff.head
    pub skb_head: u32,
    /// sk_buff.network_header (u16)
    pub skb_network_header: u32,
    /// sk_buff.dev
    pub skb_dev: u32,
    /// sk_buff._skb_refdst (a dst_entry pointer, low bit a flag)
    pub skb_refdst: u32,
    /// dst_entry.dev
    pub dst_dev: u32,
    /// net_device.nd_net
    pub dev_net: u32,
    /// sk_buff.sk
    pub skb_sk: u32,
    /// sock.__sk_common.skc_state (u8)
    pub sock_state: u32,
    /// sock.__sk_common.skc_family (u16)
    pub sock_family: u32,
    /// inet_sock.inet_sport (u16, network order; kept after the port is released)
    pub inet_sport: u32,
    /// sock.__sk_common.skc_dport (u16, network order)
    pub sock_dport: u32,
    /// sock.__sk_common.skc_num (u16, host order; request socks' local port)
    pub sock_num: u32,
    /// sk_buff.protocol (u16, network order)
    pub skb_protocol: u32,
    /// sock.__sk_common.skc_rcv_saddr
    pub sock_rcv_saddr: u32,
    /// sock.__sk_common.skc_daddr
    pub sock_daddr: u32,
    /// sock.__sk_common.skc_v6_rcv_saddr
    pub sock_v6_rcv_saddr: u32,
    /// sock.__sk_common.skc_v6_daddr
    pub sock_v6_daddr: u32,
    /// sock.sk_err (int)
    pub sock_err: u32,
    /// sock.sk_protocol (read as its low byte: a u16 since 5.6, a
    /// byte-aligned 8-bit bitfield before)
    pub sock_protocol: u32,
    /// nf_conn.ct_net (a possible_net_t: `struct net *` first)
    pub ct_net: u32,
    /// Which argument of nf_ct_l4proto_log_invalid is the format: 3 since
    /// 5.16 (skb, ct, state, fmt, ...), 2 before (skb, ct, fmt, ...).
    pub ct_invalid_fmt_arg: u32,
    /// 1: skc_daddr, skc_dport, skc_family and skc_state lie at 0, 12, 16
    /// and 18 of struct sock (every kernel so far), read as one block.
    pub sock_head_packed: u32,
    /// task_struct.nsproxy
    pub task_nsproxy: u32,
    /// nsproxy.net_ns
    pub nsproxy_net: u32,
    /// nf_conntrack_tuple.src.u3 / .src.u.all / .src.l3num
    pub ct_src_addr: u32,
    pub ct_src_port: u32,
    pub ct_l3num: u32,
    /// nf_conntrack_tuple.dst.u3 / .dst.u.all / .dst.protonum
    pub ct_dst_addr: u32,
    pub ct_dst_port: u32,
    pub ct_protonum: u32,
    /// Bit number of SOCK_KEEPOPEN in sk_flags.
    pub keepopen_bit: u32,
}

pub const KERNEL_ABSENT: u32 = u32::MAX;

impl KernelOffsets {
    pub const NONE: Self = Self {
        sock_net: KERNEL_ABSENT,
        net_inum: KERNEL_ABSENT,
        net_keepalive_time: KERNEL_ABSENT,
        net_port_range: KERNEL_ABSENT,
        port_range_packed: 0,
        sock_flags: KERNEL_ABSENT,
        tcp_lsndtime: KERNEL_ABSENT,
        tcp_rcv_tstamp: KERNEL_ABSENT,
        icsk_lrcvtime: KERNEL_ABSENT,
        tcp_keepalive_time: KERNEL_ABSENT,
        tcp_srtt_us: KERNEL_ABSENT,
        tcp_total_retrans: KERNEL_ABSENT,
        skb_tcp_flags: KERNEL_ABSENT,
        skb_head: KERNEL_ABSENT,
        skb_network_header: KERNEL_ABSENT,
        skb_dev: KERNEL_ABSENT,
        skb_refdst: KERNEL_ABSENT,
        dst_dev: KERNEL_ABSENT,
        dev_net: KERNEL_ABSENT,
        skb_sk: KERNEL_ABSENT,
        sock_state: KERNEL_ABSENT,
        sock_family: KERNEL_ABSENT,
        inet_sport: KERNEL_ABSENT,
        sock_dport: KERNEL_ABSENT,
        sock_num: KERNEL_ABSENT,
        skb_protocol: KERNEL_ABSENT,
        sock_rcv_saddr: KERNEL_ABSENT,
        sock_daddr: KERNEL_ABSENT,
        sock_v6_rcv_saddr: KERNEL_ABSENT,
        sock_v6_daddr: KERNEL_ABSENT,
        sock_err: KERNEL_ABSENT,
        sock_protocol: KERNEL_ABSENT,
        ct_net: KERNEL_ABSENT,
        ct_invalid_fmt_arg: 3,
        sock_head_packed: 0,
        task_nsproxy: KERNEL_ABSENT,
        nsproxy_net: KERNEL_ABSENT,
        ct_src_addr: KERNEL_ABSENT,
        ct_src_port: KERNEL_ABSENT,
        ct_l3num: KERNEL_ABSENT,
        ct_dst_addr: KERNEL_ABSENT,
        ct_dst_port: KERNEL_ABSENT,
        ct_protonum: KERNEL_ABSENT,
        keepopen_bit: KERNEL_ABSENT,
    };
}

/// TCP state numbers of the running kernel (from BTF).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpStates {
    pub established: u32,
    pub syn_sent: u32,
    pub syn_recv: u32,
    pub fin_wait1: u32,
    pub close: u32,
    pub listen: u32,
    pub time_wait: u32,
    pub new_syn_recv: u32,
    pub close_wait: u32,
    pub _pad: u32,
}

/// Everything the programs need from userspace; a read-only global.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// tcptrace's own tgid: its sockets are ignored.
    pub self_tgid: u32,
    /// 1: emit every TCP state change, not only failure-relevant ones.
    pub all_states: u32,
    /// 1: this kernel's tcp_send_reset does not fire without a socket
    /// (before 6.10): report the reset from the NO_SOCKET drop instead.
    pub reset_from_drop: u32,
    /// The NO_SOCKET drop reason number (with `reset_from_drop`).
    pub no_socket_reason: u32,
    pub states: TcpStates,
    /// Drop reasons worth reporting, as a bitmap over reason numbers.
    pub drop_reasons: [u64; 4],
    /// Drop reasons that are no loss (a closing socket's queue, a duplicate
    /// segment), not reported even for watched flows.
    pub quiet_reasons: [u64; 4],
    /// 1: count repeats of storm-prone failures in [`STORMS_MAP`].
    pub count_storms: u32,
    pub _pad2: u32,
    pub kernel: KernelOffsets,
    pub args: RawTpArgs,
    pub syscalls: SyscallOffsets,
    pub _pad: u32,
}

impl Config {
    pub const ZERO: Self = Self {
        self_tgid: 0,
        all_states: 0,
        reset_from_drop: 0,
        no_socket_reason: 0,
        states: TcpStates {
            established: 1,
            syn_sent: 2,
            syn_recv: 3,
            fin_wait1: 4,
            close: 7,
            listen: 10,
            time_wait: 6,
            new_syn_recv: 12,
            close_wait: 8,
            _pad: 0,
        },
        drop_reasons: [0; 4],
        quiet_reasons: [0; 4],
        count_storms: 0,
        _pad2: 0,
        kernel: KernelOffsets::NONE,
        args: RawTpArgs::NONE,
        syscalls: SyscallOffsets::NONE,
        _pad: 0,
    };
}

const _: () = assert!(size_of::<KernelOffsets>().is_multiple_of(8));
const _: () = assert!(size_of::<Config>() == 128 + size_of::<KernelOffsets>() + 16 + 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain #[repr(C)] integer records without implicit padding.
    unsafe impl aya::Pod for super::Event {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Owner {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ListenKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Config {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StormKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::StormCount {}
}

#[cfg(test)]
mod tests {
    use super::ct_invalid::{ACK_OVER, RST, SEQ_OVER, STATE, classify};

    fn msg(text: &str) -> [u8; 40] {
        let mut buf = [0u8; 40];
        let n = text.len().min(39);
        buf[..n].copy_from_slice(&text.as_bytes()[..n]);
        buf
    }

    /// The messages of nf_conntrack_proto_tcp.c (6.1 and 6.12).
    #[test]
    fn only_invalid_messages_have_a_class() {
        for (text, class) in [
            (
                "SEQ is over upper bound %u (over the window of the receiver)",
                SEQ_OVER,
            ),
            (
                "ACK is over upper bound %u (ACKed data not seen yet)",
                ACK_OVER,
            ),
            ("packet (index %d) in dir %d invalid, state %s", STATE),
            ("invalid rst", RST),
            (
                "SEQ is under lower bound %u (already ACKed data retransmitted)",
                0,
            ),
            (
                "ignored ACK under lower bound %u (possible overly delayed)",
                0,
            ),
            ("%u bytes more than expected", 0),
            ("packet (index %d) in dir %d ignored, state %s", 0),
            (
                "packet (index %d, dir %d) response for index %d lower timeout to %u",
                0,
            ),
            ("challenge-ack ignored", 0),
            ("%pV", 0),
            ("", 0),
        ] {
            assert_eq!(classify(&msg(text)), class, "{text}");
        }
    }
}
