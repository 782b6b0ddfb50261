//! The only module that talks to aya: loads the BPF object, attaches the
//! hooks, drains the ring buffer and decodes records into model events;
//! [`inspect`] lists what the kernel has loaded, for tests and benchmarks.
pub mod clock;
pub mod decode;
pub mod inspect;
pub mod offsets;
pub mod tracefs;

use std::{
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, MapData, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::{FExit, KProbe, ProgramError, RawTracePoint, TracePoint},
};
use tcptrace_common::{
    CONFIG_GLOBAL, CONN_SOCKS_ENTRIES, CONN_SOCKS_MAP, COUNTER_LOST, COUNTER_REPEATS, COUNTER_SEEN,
    COUNTER_STORMS_FULL, COUNTERS_MAP, Config, DIRECT_MAP, EVENTS_MAP, NO_ARG, STORM_ENTRIES,
    STORM_GEN_MAP, STORMS_MAP, StormCount, StormKey, counter_index, direct, hook,
};
use tokio::io::unix::AsyncFd;

use self::{
    decode::{Decoder, KernelNames},
    offsets::{BTF_PATH, KernelBtf},
};
use crate::model::{
    Event, HookStats, ProbeState, ProbeStatus, StormId, StormRepeats, TickRate, Tier,
};

/// The compiled BPF object (built by build.rs through aya-build).
pub static BPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/tcptrace"));

/// Drop reasons reported by default: netfilter, too-big and TCP-level drops.
/// NO_SOCKET is left out: the kernel answers those with a reset, which
/// `reset_sent` reports already.
const DROP_REASONS: &[&str] = &[
    "NETFILTER_DROP",
    // ip_forward: too big for the next link and not to be fragmented.
    "PKT_TOO_BIG",
    "TCP_INVALID_SEQUENCE",
    "TCP_INVALID_END_SEQUENCE",
    "TCP_INVALID_ACK_SEQUENCE",
    "TCP_OLD_SEQUENCE",
    "TCP_RESET",
    "TCP_INVALID_SYN",
    "TCP_LISTEN_OVERFLOW",
    "TCP_OVERWINDOW",
    "TCP_FLAGS",
    "TCP_ZEROWINDOW",
    "TCP_OFO_DROP",
    "TCP_OFO_QUEUE_PRUNE",
    "TCP_RFC7323_PAWS",
    "TCP_RFC7323_PAWS_ACK",
    "TCP_RFC7323_TSECR",
    "TCP_RFC7323_TW_PAWS",
    "SOCKET_BACKLOG",
    "SOCKET_RCVBUFF",
];

/// Drops that lose nothing: a closing socket's queues, segments the peer
/// already had (after a retransmit), merged segments.
const QUIET_REASONS: &[&str] = &[
    "SOCKET_CLOSE",
    "QUEUE_PURGE",
    "TCP_CLOSE",
    "TCP_OLD_DATA",
    "TCP_OFOMERGE",
    "TCP_OLD_ACK",
    "DUP_FRAG",
];

#[derive(Clone, Debug)]
pub struct TracerOptions {
    /// Ring buffer size in bytes (a power of two, multiple of the page size).
    pub ring_buffer_bytes: u32,
    /// Emit every TCP state change, not only failed connects.
    pub all_states: bool,
    /// Trace bind() through syscall tracepoints (puts every syscall on the
    /// kernel's slow path while attached).
    pub syscall_hooks: bool,
    /// Drop events about tcptrace's own sockets (off only for in-process tests).
    pub ignore_self: bool,
    /// Kernel BTF to read types from.
    pub btf_path: PathBuf,
    /// Count repeats of storm-prone failures in the kernel instead of
    /// sending each as a record; the caller must then call
    /// [`Tracer::take_repeats`] every second or so. Off by default.
    pub count_storms: bool,
}

impl Default for TracerOptions {
    fn default() -> Self {
        Self {
            ring_buffer_bytes: 1 << 22,
            all_states: false,
            syscall_hooks: true,
            ignore_self: true,
            btf_path: PathBuf::from(BTF_PATH),
            count_storms: false,
        }
    }
}

/// The loaded programs and their ring buffer. Records leave it decoded,
/// through [`Tracer::drain`]; nothing of aya shows outside this module.
pub struct Tracer {
    ebpf: Ebpf,
    pub probes: Vec<ProbeStatus>,
    /// The kernel's tick rate and its source.
    pub tick: TickRate,
    decoder: Decoder,
    ring: Ring,
    /// The last drain stopped at its limit: records are waiting.
    backlog: bool,
    /// The programs count storms' repeats ([`Tracer::take_repeats`]).
    count_storms: bool,
}

/// The ring buffer, polled, or registered with tokio for readiness.
enum Ring {
    Polled(RingBuf<MapData>),
    Async(AsyncFd<RingBuf<MapData>>),
    /// Only while switching from one to the other.
    Switching,
}

/// An error with its causes, e.g. "error reading X: No such file".
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// Lines of a verifier log kept in a message: the refused instruction and
/// the verifier's reason.
const VERIFIER_LINES: usize = 2;

/// The error without the verifier's full trace (thousands of lines): its
/// first line and the verifier's last words before its statistics.
fn shorten_verifier_log(text: &str) -> String {
    let Some((head, log)) = text.split_once(" Verifier output:") else {
        return text.to_string();
    };
    let statistics = ["verification time", "stack depth", "processed ", ":"];
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !statistics.iter().any(|s| l.starts_with(s)))
        .collect();
    let tail = &lines[lines.len().saturating_sub(VERIFIER_LINES)..];
    format!("{head} (verifier: {})", tail.join(" | "))
}

/// Explains why a program could not be loaded, in words a user can act on.
fn explain_load_error(e: &ProgramError) -> String {
    let text = shorten_verifier_log(&chain(e));
    if text.to_lowercase().contains("unknown btf type") {
        return format!(
            "{text} (the function is not in vmlinux BTF, e.g. it lives in a module such as \
             nf_conntrack; the kprobe tier is tried next)"
        );
    }
    let eperm = text.contains("Operation not permitted") || text.contains("EPERM");
    match (eperm, nix::unistd::geteuid().is_root()) {
        (true, false) => {
            "permission denied: run tcptrace as root or with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN"
                .into()
        }
        (true, true) => "refused by the kernel (EPERM) although running as root: BPF trampolines \
                         or this program type are not allowed here (lockdown or kernel config)"
            .into(),
        _ => text,
    }
}

/// Why attaching failed, with the kernel feature behind the common cases.
fn explain_attach_error(kind: &str, e: &ProgramError) -> String {
    let text = chain(e);
    if matches!(kind, "kprobe" | "kretprobe") && text.contains("kprobe/type") {
        format!("this kernel has no kprobes (CONFIG_KPROBES off): {text}")
    } else {
        text
    }
}

pub fn require_privileges() -> Result<()> {
    if nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    bail!(
        "tcptrace needs root (or CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN) to load its BPF programs"
    )
}

/// Wall-clock time of boot, to place bpf_ktime_get_boot_ns() stamps.
fn boot_wall_time() -> Result<SystemTime> {
    let boot = nix::time::clock_gettime(nix::time::ClockId::CLOCK_BOOTTIME)
        .context("reading CLOCK_BOOTTIME")?;
    let since_boot = Duration::new(boot.tv_sec() as u64, boot.tv_nsec() as u32);
    SystemTime::now()
        .checked_sub(since_boot)
        .ok_or_else(|| anyhow!("system clock is before boot time"))
}

/// Builds the program configuration for the running kernel, from BTF only.
pub fn kernel_config(btf: &KernelBtf, names: &KernelNames, opts: &TracerOptions) -> Result<Config> {
    // Drop reasons as a bitmap over this kernel's numbers for them.
    let reason_bits = |wanted: &[&str]| {
        let mut bits = [0u64; 4];
        for v in wanted.iter().filter_map(|n| names.drop_reason_value(n)) {
            if v < 256 {
                bits[(v / 64) as usize] |= 1 << (v % 64);
            }
        }
        bits
    };
    let args = offsets::raw_tp_args(btf);
    // Before 6.10, tcp_send_reset has no reason and is not called for
    // segments without a socket.
    let socketless_resets_traced = args.send_reset_reason != NO_ARG;
    let no_socket = names.drop_reason_value("NO_SOCKET");
    Ok(Config {
        self_tgid: if opts.ignore_self {
            std::process::id()
        } else {
            0
        },
        all_states: u32::from(opts.all_states),
        reset_from_drop: u32::from(!socketless_resets_traced && no_socket.is_some()),
        no_socket_reason: no_socket.unwrap_or(0),
        states: names.states.numbers()?,
        drop_reasons: reason_bits(DROP_REASONS),
        quiet_reasons: reason_bits(QUIET_REASONS),
        // Set by Tracer::load, which knows whether counting can work here.
        count_storms: 0,
        _pad2: 0,
        kernel: offsets::kernel_offsets(btf),
        args,
        syscalls: offsets::syscall_offsets(btf),
        ..Config::ZERO
    })
}

impl Tracer {
    /// Loads and attaches every hook this kernel allows. A refused hook is
    /// reported in `probes`, never fatal; failing to load the object is.
    pub fn load(opts: &TracerOptions) -> Result<Self> {
        require_privileges()?;
        let btf = KernelBtf::load(&opts.btf_path)?;
        // The tick rate is measured once the object is loaded.
        let mut names = KernelNames::from_btf(&btf, 0);
        let mut cfg = kernel_config(&btf, &names, opts)?;
        // Parsed BTF is large, and the loader parses its own: one at a time.
        drop(btf);
        // Counting needs a way to wait for running programs: the global
        // membarrier (not offered on nohz_full kernels; it does not wait on
        // a single CPU, where a program may be preempted). Without it,
        // every failure is a record.
        let cpus = aya::util::nr_cpus().unwrap_or(1).max(1);
        let why_not = if !global_membarrier_available() {
            Some("membarrier(MEMBARRIER_CMD_GLOBAL) is unavailable on this kernel")
        } else if cpus < 2 {
            Some("this machine has a single CPU")
        } else {
            None
        };
        let count_storms = opts.count_storms && why_not.is_none();
        if let (true, Some(why)) = (opts.count_storms, why_not) {
            eprintln!(
                "tcptrace: {why}: storms are sent as one record per failure, not counted in the kernel"
            );
        }
        cfg.count_storms = u32::from(count_storms);
        // Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones
        // to the cgroup. A refusal only matters if loading then fails.
        let memlock = nix::sys::resource::setrlimit(
            nix::sys::resource::Resource::RLIMIT_MEMLOCK,
            nix::sys::resource::RLIM_INFINITY,
            nix::sys::resource::RLIM_INFINITY,
        );
        let mut ebpf = EbpfLoader::new()
            .override_global(CONFIG_GLOBAL, &cfg, true)
            .map_max_entries(EVENTS_MAP, opts.ring_buffer_bytes)
            // The connection index serves kernels whose kfree_skb names no
            // socket; elsewhere it stays unused and takes no memory.
            .map_max_entries(
                CONN_SOCKS_MAP,
                if cfg.args.kfree_skb_rx_sk == NO_ARG {
                    CONN_SOCKS_ENTRIES
                } else {
                    1
                },
            )
            .map_max_entries(STORMS_MAP, storm_keys(count_storms, cpus))
            .load(BPF_OBJECT)
            .map_err(|e| {
                let text = e.to_string();
                if text.contains("Operation not permitted") {
                    anyhow!("loading the BPF object was refused: run tcptrace as root or with CAP_BPF, CAP_PERFMON and CAP_NET_ADMIN ({text})")
                } else if let Err(limit) = memlock {
                    anyhow!("loading the BPF object: {text} (raising RLIMIT_MEMLOCK also failed: {limit})")
                } else {
                    anyhow!("loading the BPF object: {text}")
                }
            })?;
        let tick = clock::tick_rate(&mut ebpf);
        names.hz = tick.hz;
        // Only the syscall tracepoints need tracefs (their ids); every other
        // hook is a raw tracepoint, fexit or kprobe.
        let tracefs = if opts.syscall_hooks {
            tracefs::ensure()
        } else {
            Err(String::new())
        };
        if let Ok(tracefs::Tracefs::Mounted(at)) = &tracefs {
            eprintln!(
                "tcptrace: tracefs was not mounted: mounted it at {}",
                at.display()
            );
        }
        let mut probes: Vec<ProbeStatus> = Vec::new();
        // Parsed for the fexit tier only, on first use.
        let mut aya_btf = None;
        for (idx, (prog, kind, name)) in hook::PROGRAMS.iter().enumerate() {
            let idx = idx as u32;
            let syscall = idx == hook::ENTER_BIND || idx == hook::EXIT_BIND;
            let tier = match *kind {
                "fexit" => Tier::Fexit,
                "kprobe" | "kretprobe" => Tier::Kprobe,
                "raw_tp" => Tier::RawTracepoint,
                _ => Tier::Tracepoint,
            };
            let tracepoint = match tier {
                Tier::RawTracepoint => name.to_string(),
                _ => format!("{kind}:{name}"),
            };
            // The kprobe pair is the fallback of the same function's fexit.
            let fexit_hook = format!("fexit:{name}");
            let fexit_live = probes
                .iter()
                .any(|p| p.tracepoint == fexit_hook && p.state == ProbeState::Attached);
            let state = if syscall && !opts.syscall_hooks {
                ProbeState::Disabled("--no-syscall-hooks".into())
            } else if let (true, Err(why)) = (syscall, &tracefs) {
                ProbeState::Unavailable(why.clone())
            } else if tier == Tier::Kprobe && fexit_live {
                ProbeState::Disabled("the fexit tier is live".into())
            } else {
                match attach(&mut ebpf, prog, kind, name, &opts.btf_path, &mut aya_btf) {
                    Ok(()) => ProbeState::Attached,
                    Err(e) => ProbeState::Unavailable(e),
                }
            };
            probes.push(ProbeStatus {
                hook: prog,
                tracepoint,
                tier,
                state,
            });
        }
        mark_direct_tier(&mut ebpf, &probes)?;
        drop(aya_btf);
        release_freed_memory();
        if !probes.iter().any(|p| p.state == ProbeState::Attached) {
            let why: Vec<String> = probes
                .iter()
                .filter_map(|p| match &p.state {
                    ProbeState::Unavailable(e) => Some(format!("{}: {e}", p.hook)),
                    _ => None,
                })
                .collect();
            bail!("no hook could be attached: {}", why.join("; "));
        }
        let map = ebpf
            .take_map(EVENTS_MAP)
            .ok_or_else(|| anyhow!("BPF object has no {EVENTS_MAP} map"))?;
        let ring = RingBuf::try_from(map).context("opening the event ring buffer")?;
        Ok(Self {
            ebpf,
            probes,
            tick,
            decoder: Decoder::new(names, boot_wall_time()?),
            ring: Ring::Polled(ring),
            backlog: false,
            count_storms,
        })
    }

    /// Registers the ring buffer with the running tokio runtime, for
    /// [`Tracer::wait`].
    pub fn use_runtime(&mut self) -> Result<()> {
        let Ring::Polled(ring) = std::mem::replace(&mut self.ring, Ring::Switching) else {
            bail!("the ring buffer is already registered with the runtime");
        };
        // SAFETY: the ring buffer owns its map fd, which stays open and
        // unchanged until the AsyncFd (and the RingBuf inside it) is dropped.
        #[allow(unsafe_code)]
        let fd = unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
        self.ring = Ring::Async(
            fd.map_err(|e| anyhow!("registering the ring buffer with the event loop: {e}"))?,
        );
        Ok(())
    }

    /// Waits until records are ready (after [`Tracer::use_runtime`]).
    /// Readiness is cleared before the caller drains: a record submitted
    /// after that wakes the next wait.
    pub async fn wait(&mut self) -> Result<()> {
        if self.backlog {
            return Ok(());
        }
        let Ring::Async(fd) = &mut self.ring else {
            bail!("Tracer::wait needs Tracer::use_runtime first");
        };
        let mut guard = fd.readable_mut().await.context("waiting for events")?;
        guard.clear_ready();
        Ok(())
    }

    /// Decodes up to `max` waiting records, in order, into `each`; returns
    /// how many records it read (malformed ones included).
    pub fn drain(
        &mut self,
        max: usize,
        mut each: impl FnMut(Result<Event, decode::DecodeError>),
    ) -> usize {
        let ring = match &mut self.ring {
            Ring::Polled(ring) => ring,
            Ring::Async(fd) => fd.get_mut(),
            Ring::Switching => return 0,
        };
        let mut n = 0;
        while n < max {
            let Some(item) = ring.next() else { break };
            n += 1;
            let decoded = self.decoder.decode(&item);
            // The record's space goes back to the kernel before the event
            // is handled.
            drop(item);
            each(decoded);
        }
        self.backlog = n == max;
        n
    }

    /// Ends the current counting generation and returns its counts: the
    /// repeats of each storm whose first record (see `Event::storm`) went
    /// out in it (and any older one a walk missed). The programs count in
    /// the next generation from now on; this waits until none can still be
    /// counting in the old one (an RCU grace period), so every repeat is in
    /// what it returns, once. Read the ring buffer after this call, before
    /// using the counts: the first records are there.
    pub fn take_repeats(&mut self) -> Result<Vec<StormRepeats>> {
        if !self.count_storms {
            return Ok(Vec::new());
        }
        let mut generation = Array::<_, u32>::try_from(
            self.ebpf
                .map_mut(STORM_GEN_MAP)
                .ok_or_else(|| anyhow!("BPF object has no {STORM_GEN_MAP} map"))?,
        )
        .context("opening the generation")?;
        let current = generation
            .get(&0, 0)
            .context("reading the generation")?
            .wrapping_add(1);
        generation
            .set(0, current, 0)
            .context("moving the generation on")?;
        wait_for_running_programs()?;
        let mut counts = PerCpuHashMap::<_, StormKey, StormCount>::try_from(
            self.ebpf
                .map_mut(STORMS_MAP)
                .ok_or_else(|| anyhow!("BPF object has no {STORMS_MAP} map"))?,
        )
        .context("opening the storm counts")?;
        // Every older generation: a key a walk of the changing map missed
        // is found by the next one.
        let keys: Vec<StormKey> = counts
            .keys()
            .filter_map(Result::ok)
            .filter(|k| k.generation != current)
            .collect();
        let mut repeats = Vec::with_capacity(keys.len());
        for key in keys {
            // A key that cannot be read and deleted now stays for the next
            // fold, which reads it whole.
            let Ok(per_cpu) = counts.get(&key, 0) else {
                continue;
            };
            if counts.remove(&key).is_err() {
                continue;
            }
            // The CPU that opened the key holds the first record's stamp.
            let (cpu, first_ns) = per_cpu
                .iter()
                .enumerate()
                .max_by_key(|(_, c)| c.first_ns)
                .map_or((0, 0), |(cpu, c)| (cpu, c.first_ns));
            repeats.push(StormRepeats {
                storm: StormId {
                    generation: key.generation,
                    first_ns,
                    cpu: u16::try_from(cpu).unwrap_or(u16::MAX),
                },
                count: per_cpu.iter().map(|c| c.count).sum(),
                failure: self.decoder.decode_storm_key(&key, first_ns).ok(),
            });
        }
        Ok(repeats)
    }

    /// Cumulative per-hook counters summed over CPUs.
    pub fn hook_stats(&self) -> Result<Vec<HookStats>> {
        let map = self
            .ebpf
            .map(COUNTERS_MAP)
            .ok_or_else(|| anyhow!("BPF object has no {COUNTERS_MAP} map"))?;
        let counters = PerCpuArray::<_, u64>::try_from(map).context("opening counters")?;
        let read = |i: u32| -> Result<u64> {
            Ok(counters
                .get(&i, 0)
                .context("reading counters")?
                .iter()
                .sum())
        };
        hook::PROGRAMS
            .iter()
            .enumerate()
            .map(|(i, (prog, _, _))| {
                let i = i as u32;
                Ok(HookStats {
                    hook: (*prog).to_string(),
                    seen: read(counter_index(i, COUNTER_SEEN))?,
                    lost: read(counter_index(i, COUNTER_LOST))?,
                    folded: read(counter_index(i, COUNTER_REPEATS))?,
                    fold_full: read(counter_index(i, COUNTER_STORMS_FULL))?,
                })
            })
            .collect()
    }
}

/// Most storms the kernel counts in one generation (its count map's keys).
pub const MAX_STORMS: usize = STORM_ENTRIES as usize;

/// Waits until every BPF program run that started before now has ended:
/// the programs (tracepoints, kprobes, non-sleepable fexit) run under
/// RCU, and a global membarrier waits for an RCU grace period.
fn wait_for_running_programs() -> Result<()> {
    let r = membarrier(MEMBARRIER_CMD_GLOBAL);
    if r != 0 {
        bail!(
            "membarrier(MEMBARRIER_CMD_GLOBAL): {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// Kernel memory the per-CPU storm counts may take, preallocated.
const STORM_MEMORY_BYTES: usize = 8 << 20;

/// Keys of the per-CPU storm map: a value per possible CPU each, so fewer
/// on large machines (16,384 up to 32 CPUs, 2,048 on 256); one when
/// counting is off.
fn storm_keys(count_storms: bool, cpus: usize) -> u32 {
    if !count_storms {
        return 1;
    }
    let per_key = size_of::<StormCount>() * cpus;
    u32::try_from(STORM_MEMORY_BYTES / per_key)
        .unwrap_or(STORM_ENTRIES)
        .clamp(1, STORM_ENTRIES)
}

/// Hands the pages of the parsed BTF, freed by now, back to the system
/// (glibc keeps freed memory for reuse otherwise).
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
}

const MEMBARRIER_CMD_QUERY: libc::c_int = 0;
const MEMBARRIER_CMD_GLOBAL: libc::c_int = 1;

fn membarrier(cmd: libc::c_int) -> libc::c_long {
    // SAFETY: membarrier takes two integers and touches no memory of ours.
    #[allow(unsafe_code)]
    unsafe {
        libc::syscall(libc::SYS_membarrier, cmd, 0)
    }
}

/// Whether this kernel offers the global membarrier (the query answers
/// with a mask of the commands it does).
fn global_membarrier_available() -> bool {
    let commands = membarrier(MEMBARRIER_CMD_QUERY);
    commands > 0 && commands & libc::c_long::from(MEMBARRIER_CMD_GLOBAL) != 0
}

/// Tells the programs which direct-tier hooks are live, so the tracepoint
/// fallbacks do not report the same failure twice.
fn mark_direct_tier(ebpf: &mut Ebpf, probes: &[ProbeStatus]) -> Result<()> {
    let live = |names: &[&str]| {
        names.iter().all(|n| {
            probes
                .iter()
                .any(|p| p.hook == *n && p.state == ProbeState::Attached)
        })
    };
    let hash_connect = live(&["inet_hash_connect_fexit"])
        || live(&["inet_hash_connect_entry", "inet_hash_connect_return"]);
    let bits = if hash_connect {
        direct::HASH_CONNECT
    } else {
        0
    };
    let map = ebpf
        .map_mut(DIRECT_MAP)
        .ok_or_else(|| anyhow!("BPF object has no {DIRECT_MAP} map"))?;
    let mut array = Array::<_, u32>::try_from(map).context("opening the direct-tier map")?;
    array.set(0, bits, 0).context("writing the direct-tier map")
}

fn attach(
    ebpf: &mut Ebpf,
    prog: &str,
    kind: &str,
    name: &str,
    btf_path: &Path,
    aya_btf: &mut Option<Result<aya::Btf, String>>,
) -> Result<(), String> {
    let program = ebpf
        .program_mut(prog)
        .ok_or_else(|| format!("program {prog} missing from the BPF object"))?;
    match kind {
        "fexit" => {
            let btf = aya_btf
                .get_or_insert_with(|| {
                    aya::Btf::parse_file(btf_path, aya::Endianness::default())
                        .map_err(|e| format!("reading {}: {e}", btf_path.display()))
                })
                .as_ref()
                .map_err(Clone::clone)?;
            let p: &mut FExit = program.try_into().map_err(|e: ProgramError| chain(&e))?;
            p.load(name, btf).map_err(|e| explain_load_error(&e))?;
            p.attach().map_err(|e| chain(&e))?;
        }
        "kprobe" | "kretprobe" => {
            let p: &mut KProbe = program.try_into().map_err(|e: ProgramError| chain(&e))?;
            p.load().map_err(|e| explain_load_error(&e))?;
            p.attach(name, 0)
                .map_err(|e| explain_attach_error(kind, &e))?;
        }
        "raw_tp" => {
            let p: &mut RawTracePoint = program.try_into().map_err(|e: ProgramError| chain(&e))?;
            p.load().map_err(|e| explain_load_error(&e))?;
            p.attach(name).map_err(|e| chain(&e))?;
        }
        category => {
            let p: &mut TracePoint = program.try_into().map_err(|e: ProgramError| chain(&e))?;
            p.load().map_err(|e| explain_load_error(&e))?;
            p.attach(category, name).map_err(|e| chain(&e))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::shorten_verifier_log;

    #[test]
    fn a_verifier_log_is_cut_to_its_reason() {
        let log = "the BPF_PROG_LOAD syscall returned Permission denied (os error 13). \
                   Verifier output: 0: R1=ctx() R10=fp0\n1: (bf) r9 = r1\n2: (79) r1 = *(u64 *)(r9 +8)\n\
                   57: (79) r1 = *(u64 *)(r9 +0)\ndereference of modified ctx ptr R9 off=16 disallowed\n\
                   verification time 1379 usec\nstack depth 120\nprocessed 726 insns\n: Permission denied (os error 13)";
        assert_eq!(
            shorten_verifier_log(log),
            "the BPF_PROG_LOAD syscall returned Permission denied (os error 13). (verifier: \
             57: (79) r1 = *(u64 *)(r9 +0) | dereference of modified ctx ptr R9 off=16 disallowed)"
        );
        assert_eq!(shorten_verifier_log("refused"), "refused");
    }
}
