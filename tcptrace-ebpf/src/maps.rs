use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf},
};
use tcptrace_common::{
    BindArgs, COUNTERS_LEN, Config, ConnKey, ConnSock, CtAllocArgs, EndKey, ListenKey, Owner,
    StormCount, StormKey,
};

/// Failure events for userspace. Its size is set at load time.
#[map(name = "EVENTS")]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(1 << 20, 0);

/// Per-hook emitted/lost counters.
#[map(name = "COUNTERS")]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTERS_LEN, 0);

/// sock pointer -> owner captured in process context.
#[map(name = "OWNERS")]
pub static OWNERS: LruHashMap<u64, Owner> = LruHashMap::with_max_entries(65536, 0);

/// Established connection -> its sock pointer, kept only on kernels whose
/// kfree_skb has no `rx_sk` (see `ConnKey`).
#[map(name = "CONN_SOCKS")]
pub static CONN_SOCKS: LruHashMap<ConnKey, ConnSock> =
    LruHashMap::with_max_entries(tcptrace_common::CONN_SOCKS_ENTRIES, 0);

/// Repeats of storm-prone failures, counted instead of sent (`StormKey`),
/// per CPU: a key's kind is counted by one program, which does not nest
/// with itself on a CPU, so no increment races. Sized by userspace to the
/// number of CPUs.
#[map(name = "STORMS")]
pub static STORMS: PerCpuHashMap<StormKey, StormCount> =
    PerCpuHashMap::with_max_entries(tcptrace_common::STORM_ENTRIES, 0);

/// The generation new storm keys are counted in (one u32).
#[map(name = "STORM_GEN")]
pub static STORM_GEN: Array<u32> = Array::with_max_entries(1, 0);

/// Client ends of flows whose handshake needed retransmits -> when they
/// were last watched (boot ns): drops of their packets are reported
/// whatever the reason.
#[map(name = "WATCHED")]
pub static WATCHED: LruHashMap<EndKey, u64> = LruHashMap::with_max_entries(4096, 0);

/// When a flow was last watched (boot ns): drops of other reasons are
/// looked up only while some flow was watched lately.
#[map(name = "WATCH_LAST")]
pub static WATCH_LAST: Array<u64> = Array::with_max_entries(1, 0);

/// How long a watched flow's drops are looked up after it was watched.
const WATCH_NS: u64 = 300_000_000_000;

/// Watches the flow of client end `key` (a handshake retransmit).
#[inline(always)]
pub fn watch(key: &EndKey) {
    // SAFETY: a helper without preconditions.
    let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns() };
    let _ = WATCHED.insert(key, now, 0);
    if let Some(last) = WATCH_LAST.get_ptr_mut(0) {
        // SAFETY: an array slot of the right type; racing writers store
        // times a moment apart.
        unsafe { *last = now };
    }
}

/// Whether `t` (boot ns) is within the watch period.
#[inline(always)]
fn watch_recent(t: u64) -> bool {
    // SAFETY: a helper without preconditions.
    let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns() };
    t != 0 && now.wrapping_sub(t) < WATCH_NS
}

/// Whether some flow was watched lately: the cheap test before a dropped
/// packet is parsed.
#[inline(always)]
pub fn watching_lately() -> bool {
    WATCH_LAST.get(0).is_some_and(|t| watch_recent(*t))
}

/// Whether the packet between ends `a` and `b` belongs to a flow watched
/// lately (either end may be the client).
#[inline(always)]
pub fn watched(a: &EndKey, b: &EndKey) -> bool {
    // SAFETY: copied out at once.
    unsafe { WATCHED.get(a).or_else(|| WATCHED.get(b)) }.is_some_and(|t| watch_recent(*t))
}

/// listening (netns, port) -> owner, inherited by accepted sockets.
#[map(name = "LISTENERS")]
pub static LISTENERS: LruHashMap<ListenKey, Owner> = LruHashMap::with_max_entries(8192, 0);

/// pid_tgid -> sockaddr given to bind(), until it returns.
#[map(name = "BIND_ARGS")]
pub static BIND_ARGS: HashMap<u64, BindArgs> = HashMap::with_max_entries(4096, 0);

/// pid_tgid -> sock pointer, from inet_hash_connect's kprobe to its kretprobe.
#[map(name = "HASH_CONNECT_ARGS")]
pub static HASH_CONNECT_ARGS: HashMap<u64, u64> = HashMap::with_max_entries(4096, 0);

/// __nf_conntrack_alloc's arguments, from its kprobe to its kretprobe.
#[map(name = "CT_ALLOC_ARGS")]
pub static CT_ALLOC_ARGS: PerCpuArray<CtAllocArgs> = PerCpuArray::with_max_entries(1, 0);

/// How long after a reset its consequences are recognised: tcp_reset()
/// moves the socket to CLOSE and raises its error right after the reset
/// tracepoint (within microseconds; hundreds of them on an emulated CPU).
const RESET_CONSEQUENCE_NS: u64 = 10_000_000;

/// Records on `sk`'s owner that it received a reset raising `errno`.
#[inline(always)]
pub fn mark_reset(sk: u64, at_ns: u64, errno: u32) {
    if let Some(owner) = OWNERS.get_ptr_mut(sk) {
        mark_owner_reset(owner, at_ns, errno);
    }
}

/// [`mark_reset`] on an owner record already looked up.
#[inline(always)]
pub fn mark_owner_reset(owner: *mut Owner, at_ns: u64, errno: u32) {
    // SAFETY: a map value of the right type; racing writers could only
    // leave the other reset's mark, which suppresses nothing extra.
    unsafe {
        (*owner).reset_ns = at_ns;
        (*owner).reset_errno = errno;
    }
}

/// Records on `sk`'s owner that the peer's FIN arrived now, after the
/// connection had been idle for `idle_jiffies`.
#[inline(always)]
pub fn mark_fin(sk: u64, at_ns: u64, idle_jiffies: u32) {
    if let Some(owner) = OWNERS.get_ptr_mut(sk) {
        // SAFETY: a map value of the right type; the socket's own softirq
        // is the only writer of these fields.
        unsafe {
            (*owner).fin_ns = at_ns;
            (*owner).fin_idle_jiffies = idle_jiffies;
        }
    }
}

/// The error (positive errno) of the reset `sk` received just now, if it
/// did: its move to CLOSE and that error repeat the reset's record.
#[inline(always)]
pub fn reset_consequence(sk: u64) -> Option<u32> {
    // SAFETY: copied out at once.
    let owner = unsafe { OWNERS.get(sk) }?;
    let (at, errno) = (owner.reset_ns, owner.reset_errno);
    // SAFETY: a helper without preconditions.
    let now = unsafe { aya_ebpf::helpers::generated::bpf_ktime_get_boot_ns() };
    (at != 0 && now.wrapping_sub(at) < RESET_CONSEQUENCE_NS).then_some(errno)
}

/// Direct-tier hooks that are live (`tcptrace_common::direct` bits).
#[map(name = "DIRECT")]
pub static DIRECT: Array<u32> = Array::with_max_entries(1, 0);

/// Whether a direct-tier hook reports `bit` already.
#[inline(always)]
pub fn direct_live(bit: u32) -> bool {
    DIRECT.get(0).is_some_and(|v| v & bit != 0)
}

/// Set by userspace before load (`EbpfLoader::set_global`).
#[unsafe(no_mangle)]
pub static CONFIG: Config = Config::ZERO;

#[inline(always)]
pub fn config() -> &'static Config {
    // SAFETY: read through a volatile pointer so the compiler cannot fold the
    // zeroed initializer; the loader patches the value in .rodata.
    unsafe { core::ptr::read_volatile(&&CONFIG) }
}

#[inline(always)]
pub fn count(hook: u32, slot: u32) {
    if let Some(counter) = COUNTERS.get_ptr_mut(tcptrace_common::counter_index(hook, slot)) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *counter += 1 };
    }
}

/// CLOCK_MONOTONIC (ns) at the last run of the clock program.
#[map(name = "CLOCK")]
pub static CLOCK: Array<u64> = Array::with_max_entries(1, 0);
