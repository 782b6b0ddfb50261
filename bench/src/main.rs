//! `tcptrace-bench`: measures what tracing costs the traced workload, how
//! many events tcptrace delivers and loses, what each BPF program costs per
//! run, and how long loading takes. Run through `cargo xtask bench`, as
//! root; every storm runs on loopback inside a private network namespace.
mod report;
mod soak;
mod storm;
mod sys;

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{ExitCode, Stdio},
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use nix::sys::signal::{SaFlags, SigAction, SigHandler, SigSet, Signal, sigaction};
use serde_json::{Value, json};

use crate::{
    storm::{Outcome, Storm},
    sys::{Spawn, Traced, bench_netns},
};

#[derive(Parser)]
#[command(name = "tcptrace-bench", about = "tcptrace benchmarks (root)")]
struct Args {
    /// A few seconds: checks that every phase runs; numbers mean nothing.
    #[arg(long)]
    smoke: bool,
    /// The tcptrace binary to measure (a release build).
    #[arg(long)]
    tcptrace: PathBuf,
    /// Where results-<date>.json and BENCHMARKS.md are written.
    #[arg(long)]
    out_dir: PathBuf,
    /// Write BENCHMARKS.md here instead of <out-dir>/BENCHMARKS.md.
    #[arg(long)]
    markdown: Option<PathBuf>,
    /// criterion's output directory (target/criterion), for the pipeline table.
    #[arg(long)]
    criterion_dir: Option<PathBuf>,
    /// Interleaved rounds of every variant (default 7, smoke 1).
    #[arg(long)]
    rounds: Option<usize>,
    /// Only rewrite the report from an existing results file.
    #[arg(long, value_name = "JSON")]
    render: Option<PathBuf>,
    /// Instead of the benchmarks: tcptrace for this many minutes under
    /// healthy churn and failure bursts, sampled; writes soak-<date>.json
    /// and adds it to the report of the newest results file.
    #[arg(long, value_name = "MINUTES")]
    soak: Option<u64>,
    /// Run one phase only and print its numbers (no files written): while
    /// working on one cost.
    #[arg(long, value_enum)]
    phase: Option<Phase>,
    /// Minutes between soak samples.
    #[arg(long, default_value_t = 5, value_name = "MINUTES")]
    sample_every: u64,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Phase {
    Workload,
    Flood,
    BpfCost,
}

/// Set by SIGINT/SIGTERM: storms stop, guards clean up, the run fails.
static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("tcptrace-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Sizes of one benchmark run.
struct Plan {
    rounds: usize,
    accept_count: u64,
    refused_count: u64,
    flood_count: u64,
    loss_count: u64,
    clients: usize,
    /// Upper bound on any one storm.
    limit: Duration,
    printf_variant: bool,
}

impl Plan {
    fn new(args: &Args) -> Self {
        let clients = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
        if args.smoke {
            Self {
                rounds: args.rounds.unwrap_or(1),
                accept_count: 500,
                refused_count: 500,
                flood_count: 2_000,
                loss_count: 2_000,
                clients,
                limit: Duration::from_secs(10),
                printf_variant: false,
            }
        } else {
            Self {
                rounds: args.rounds.unwrap_or(7),
                accept_count: 20_000,
                refused_count: 30_000,
                flood_count: 100_000,
                loss_count: 30_000,
                clients,
                limit: Duration::from_secs(60),
                printf_variant: true,
            }
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Variant {
    Off,
    Tcptrace,
    TcptraceNoSyscall,
    BpftraceCount,
    BpftracePrintf,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Off => "off",
            Variant::Tcptrace => "tcptrace",
            Variant::TcptraceNoSyscall => "tcptrace --no-syscall-hooks",
            Variant::BpftraceCount => "bpftrace (count in map)",
            Variant::BpftracePrintf => "bpftrace (printf per event)",
        }
    }
}

/// The kernel events tcptrace hooks, as bpftrace names them. bpftrace 0.17
/// has no raw tracepoints: it attaches the classic tracepoints of the events
/// tcptrace hooks raw, and leaves out inet_sk_error_report (a small
/// advantage to bpftrace).
const BPFTRACE_PROBES: &str = "tracepoint:tcp:tcp_retransmit_skb,tracepoint:tcp:tcp_retransmit_synack,\
tracepoint:tcp:tcp_send_reset,tracepoint:tcp:tcp_receive_reset,tracepoint:sock:inet_sock_set_state,\
tracepoint:skb:kfree_skb,tracepoint:syscalls:sys_enter_bind,tracepoint:syscalls:sys_exit_bind";
const BPFTRACE_TRACEPOINTS: usize = 8;

struct Ctx {
    args: Args,
    plan: Plan,
    bpftrace: Option<PathBuf>,
    /// Spawn-to-"tracing" times of every tcptrace start.
    tcptrace_ready: Vec<Duration>,
    scratch: PathBuf,
}

fn run(args: Args) -> Result<()> {
    if let Some(path) = &args.render {
        return render(&args, path);
    }
    if !nix::unistd::geteuid().is_root() {
        bail!("the benchmarks load BPF programs and create network namespaces: run as root");
    }
    if !args.tcptrace.is_file() {
        bail!(
            "{} not found: build it with `cargo build --release -p tcptrace`",
            args.tcptrace.display()
        );
    }
    let handler = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::empty(),
        SigSet::empty(),
    );
    // SAFETY: the handler only stores to an atomic.
    #[allow(unsafe_code)]
    unsafe {
        sigaction(Signal::SIGINT, &handler).context("installing SIGINT handler")?;
        sigaction(Signal::SIGTERM, &handler).context("installing SIGTERM handler")?;
    }
    sys::remove_stale_netns();
    if let Some(minutes) = args.soak {
        return soak(&args, minutes);
    }
    let plan = Plan::new(&args);
    let scratch = std::env::temp_dir().join(format!("tcptrace-bench-{}", std::process::id()));
    fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let bpftrace = which("bpftrace");
    if bpftrace.is_none() {
        eprintln!(
            "tcptrace-bench: bpftrace not found; the comparison is skipped (`cargo xtask bench` installs it)"
        );
    }
    let mut ctx = Ctx {
        args,
        plan,
        bpftrace,
        tcptrace_ready: Vec::new(),
        scratch,
    };
    if let Some(phase) = ctx.args.phase {
        let result = one_phase(&mut ctx, phase);
        let _ = fs::remove_dir_all(&ctx.scratch);
        println!("{}", serde_json::to_string_pretty(&result?)?);
        return Ok(());
    }
    let result = measure(&mut ctx);
    let _ = fs::remove_dir_all(&ctx.scratch);
    let results = result?;
    write_results(&ctx, &results)
}

fn one_phase(ctx: &mut Ctx, phase: Phase) -> Result<Value> {
    Ok(match phase {
        Phase::Workload => json!([
            workload_overhead(ctx, Storm::Accept)?,
            workload_overhead(ctx, Storm::Refused)?
        ]),
        Phase::Flood => json!({
            "flood": flood(ctx, 1 << 22, ctx.plan.flood_count, "flood", &[])?,
            "flood_records": flood(
                ctx,
                1 << 22,
                ctx.plan.flood_count,
                "flood_records",
                &["--no-kernel-aggregation"],
            )?,
        }),
        Phase::BpfCost => bpf_cost(ctx)?,
    })
}

fn measure(ctx: &mut Ctx) -> Result<Value> {
    let started = Instant::now();
    eprintln!("tcptrace-bench: startup");
    let startup = startup(ctx)?;
    let mut overhead = Vec::new();
    for s in [Storm::Accept, Storm::Refused] {
        eprintln!("tcptrace-bench: workload overhead, {} storm", s.name());
        overhead.push(workload_overhead(ctx, s)?);
    }
    eprintln!("tcptrace-bench: lossless throughput");
    let lossless = flood(ctx, 1 << 22, ctx.plan.flood_count, "flood", &[])?;
    eprintln!("tcptrace-bench: the same flood with every failure a record");
    let records = flood(
        ctx,
        1 << 22,
        ctx.plan.flood_count,
        "flood_records",
        &["--no-kernel-aggregation"],
    )?;
    eprintln!("tcptrace-bench: forced losses (4096-byte ring buffer, every failure a record)");
    let forced = flood(
        ctx,
        4096,
        ctx.plan.loss_count,
        "forced_loss",
        &["--no-kernel-aggregation"],
    )?;
    eprintln!("tcptrace-bench: BPF program cost");
    let bpf_cost = bpf_cost(ctx)?;
    let ready = median(
        ctx.tcptrace_ready
            .iter()
            .map(Duration::as_secs_f64)
            .collect(),
    );
    let mut startup = startup;
    startup["spawn_to_tracing_s_median"] = json!(ready);
    startup["spawn_to_tracing_samples"] = json!(ctx.tcptrace_ready.len());
    let pipeline = ctx
        .args
        .criterion_dir
        .as_deref()
        .map(report::criterion_results)
        .unwrap_or(Value::Null);
    Ok(json!({
        "schema": 1,
        "date": report::utc_now(),
        "smoke": ctx.args.smoke,
        "machine": report::machine(ctx.bpftrace.as_deref()),
        "plan": {
            "rounds": ctx.plan.rounds,
            "clients": ctx.plan.clients,
            "accept_count": ctx.plan.accept_count,
            "refused_count": ctx.plan.refused_count,
            "flood_count": ctx.plan.flood_count,
            "loss_count": ctx.plan.loss_count,
        },
        "workload": overhead,
        "flood": lossless,
        "flood_records": records,
        "forced_loss": forced,
        "bpf_programs": bpf_cost,
        "pipeline": pipeline,
        "startup": startup,
        "elapsed_s": started.elapsed().as_secs_f64(),
    }))
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn check_stop() -> Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

pub fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Starts tcptrace (NDJSON to `stdout`) and waits until it traces.
fn start_tcptrace(ctx: &mut Ctx, extra: &[&str], stdout: Stdio) -> Result<Traced> {
    let mut args: Vec<String> = ["--format", "json", "--stats-interval", "3600"]
        .iter()
        .map(ToString::to_string)
        .collect();
    args.extend(extra.iter().map(ToString::to_string));
    let (t, ready) = Traced::start(
        Spawn {
            program: &ctx.args.tcptrace,
            args,
            stdout,
            ready_line: Some("tcptrace: tracing,"),
            perf_events: 0,
        },
        Duration::from_secs(30),
    )?;
    ctx.tcptrace_ready.push(ready);
    Ok(t)
}

fn start_variant(ctx: &mut Ctx, v: Variant) -> Result<Option<Traced>> {
    let devnull = || Stdio::null();
    Ok(match v {
        Variant::Off => None,
        Variant::Tcptrace => Some(start_tcptrace(ctx, &[], devnull())?),
        Variant::TcptraceNoSyscall => {
            Some(start_tcptrace(ctx, &["--no-syscall-hooks"], devnull())?)
        }
        Variant::BpftraceCount | Variant::BpftracePrintf => {
            let Some(bt) = ctx.bpftrace.clone() else {
                return Ok(None);
            };
            let action = if v == Variant::BpftraceCount {
                "{ @[probe] = count(); }"
            } else {
                "{ printf(\"%s %d %s\\n\", probe, pid, comm); }"
            };
            let (t, _) = Traced::start(
                Spawn {
                    program: &bt,
                    args: vec!["-e".into(), format!("{BPFTRACE_PROBES} {action}")],
                    stdout: devnull(),
                    ready_line: None,
                    perf_events: BPFTRACE_TRACEPOINTS,
                },
                Duration::from_secs(60),
            )?;
            Some(t)
        }
    })
}

fn stop_variant(t: Option<Traced>, v: Variant) -> Result<()> {
    let Some(t) = t else { return Ok(()) };
    match v {
        // bpftrace sometimes takes long to detach under load: it is killed
        // after the timeout, which does not affect the measured storm.
        Variant::BpftraceCount | Variant::BpftracePrintf => {
            if let Err(e) = t.stop(Signal::SIGINT, Duration::from_secs(10)) {
                eprintln!("tcptrace-bench: warning: bpftrace: {e:#}");
            }
            Ok(())
        }
        _ => t.stop(Signal::SIGTERM, Duration::from_secs(30)),
    }
}

fn storm_count(plan: &Plan, s: Storm) -> u64 {
    match s {
        Storm::Accept => plan.accept_count,
        Storm::Refused => plan.refused_count,
    }
}

fn one_storm(
    ctx: &Ctx,
    s: Storm,
    count: u64,
    tag: &str,
) -> Result<(Outcome, tcptrace_lab::netns::Netns)> {
    let ns = bench_netns(tag)?;
    let out = storm::run(&ns, s, count, ctx.plan.clients, ctx.plan.limit, &STOP)?;
    check_stop()?;
    Ok((out, ns))
}

/// Interleaved rounds of every variant; medians and ratios to untraced.
fn workload_overhead(ctx: &mut Ctx, s: Storm) -> Result<Value> {
    let mut variants = vec![Variant::Off, Variant::Tcptrace, Variant::TcptraceNoSyscall];
    if ctx.bpftrace.is_some() {
        variants.push(Variant::BpftraceCount);
        if ctx.plan.printf_variant {
            variants.push(Variant::BpftracePrintf);
        }
    }
    let mut rates: BTreeMap<Variant, Vec<f64>> = BTreeMap::new();
    let mut errors = 0;
    let mut cut_short = false;
    for round in 0..ctx.plan.rounds {
        // Rotate the order so no variant always runs first.
        let n = variants.len();
        for i in 0..n {
            let v = variants[(i + round) % n];
            let tracer = start_variant(ctx, v)?;
            let (out, ns) = one_storm(ctx, s, storm_count(&ctx.plan, s), s.name())?;
            stop_variant(tracer, v)?;
            drop(ns);
            errors += out.errors;
            cut_short |= out.cut_short;
            rates.entry(v).or_default().push(out.rate());
            eprintln!(
                "tcptrace-bench:   round {} {:<28} {:>9.0} conn/s",
                round + 1,
                v.name(),
                out.rate()
            );
        }
    }
    let off = median(rates.get(&Variant::Off).cloned().unwrap_or_default());
    let rows: Vec<Value> = variants
        .iter()
        .map(|v| {
            let r = rates.get(v).cloned().unwrap_or_default();
            let m = median(r.clone());
            json!({
                "variant": v.name(),
                "median_conn_per_s": m,
                "ratio_to_off": m / off,
                "runs_conn_per_s": r,
            })
        })
        .collect();
    Ok(json!({
        "storm": s.name(),
        "connections_per_run": storm_count(&ctx.plan, s),
        "other_errors": errors,
        "cut_short": cut_short,
        "variants": rows,
    }))
}

/// Kinds and hooks the refused storm makes per connection: the SYN meets
/// no socket and is answered by a reset (reset_sent), which the client
/// receives (reset_received: it implies the failed connect and its
/// ECONNREFUSED, which inet_sock_set_state and inet_sk_error_report see but
/// do not report). The SYN's NO_SOCKET drop is not reported (the reset
/// already says it), so kfree_skb runs but emits nothing; any other kind in
/// the bench namespace is listed as unexpected.
const REFUSED_EVENTS: &[(&str, &str)] = &[
    ("reset_sent", "tcp_send_reset"),
    ("reset_received", "tcp_receive_reset"),
];

/// The refused storm at full speed with tcptrace writing NDJSON to a file:
/// every event of the bench namespace (a record with a `count` stands for
/// that many) is counted against what the storm must have produced, with
/// tcptrace's CPU time and peak RSS.
fn flood(ctx: &mut Ctx, ring: u32, count: u64, tag: &str, extra: &[&str]) -> Result<Value> {
    let out_path = ctx.scratch.join(format!("{tag}.ndjson"));
    let file = fs::File::create(&out_path).context("creating the NDJSON file")?;
    let ring_s = ring.to_string();
    let mut args = vec!["--ring-buffer-size", &ring_s];
    args.extend_from_slice(extra);
    let t = start_tcptrace(ctx, &args, file.into())?;
    let pid = t.pid;
    let cpu0 = sys::cpu_time(pid)?;
    let (out, ns) = one_storm(ctx, Storm::Refused, count, tag)?;
    let inode = ns.inode()?;
    // Let tcptrace catch up, bounded: until its CPU time stops rising.
    let settle = Instant::now();
    let mut last = sys::cpu_time(pid)?;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = sys::cpu_time(pid)?;
        if now == last || settle.elapsed() > Duration::from_secs(20) {
            break;
        }
        last = now;
    }
    let cpu = sys::cpu_time(pid)?.saturating_sub(cpu0);
    let hwm = sys::status_bytes(pid, "VmHWM")?;
    let rss = sys::status_bytes(pid, "VmRSS")?;
    t.stop(Signal::SIGTERM, Duration::from_secs(30))?;
    drop(ns);

    // Failures per kind, and the records that carried them.
    let mut mine: BTreeMap<String, u64> = BTreeMap::new();
    let mut mine_records: BTreeMap<String, u64> = BTreeMap::new();
    let mut foreign: BTreeMap<String, u64> = BTreeMap::new();
    let mut hooks: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut lines = 0u64;
    for line in BufReader::new(fs::File::open(&out_path)?).lines() {
        let line = line?;
        lines += 1;
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        match v["type"].as_str() {
            Some("event") => {
                let kind = v["kind"].as_str().unwrap_or("?").to_string();
                let failures = v["count"].as_u64().unwrap_or(1);
                if v["netns"].as_u64() == Some(u64::from(inode)) {
                    *mine_records.entry(kind.clone()).or_default() += 1;
                    *mine.entry(kind).or_default() += failures;
                } else {
                    *foreign.entry(kind).or_default() += failures;
                }
            }
            Some("stats") if v["final"].as_bool() == Some(true) => {
                for h in v["hooks"].as_array().into_iter().flatten() {
                    hooks.insert(
                        h["hook"].as_str().unwrap_or("?").to_string(),
                        (
                            // Failures the hook saw: records and repeats counted.
                            h["seen"].as_u64().unwrap_or(0) + h["folded"].as_u64().unwrap_or(0),
                            h["lost"].as_u64().unwrap_or(0),
                        ),
                    );
                }
            }
            _ => {}
        }
    }
    if hooks.is_empty() {
        bail!("tcptrace wrote no final stats record");
    }
    let rows: Vec<Value> = REFUSED_EVENTS
        .iter()
        .map(|(kind, hook)| {
            let delivered = mine.get(*kind).copied().unwrap_or(0);
            let (seen, lost) = hooks.get(*hook).copied().unwrap_or((0, 0));
            let others = foreign.get(*kind).copied().unwrap_or(0);
            json!({
                "kind": kind,
                "hook": hook,
                "expected": out.ok,
                "delivered": delivered,
                "records": mine_records.get(*kind).copied().unwrap_or(0),
                "hook_seen": seen,
                "hook_lost": lost,
                "foreign_delivered": others,
                "delivered_plus_lost_equals_expected": delivered + lost == out.ok,
            })
        })
        .collect();
    let expected_total = out.ok * REFUSED_EVENTS.len() as u64;
    let delivered_total: u64 = REFUSED_EVENTS
        .iter()
        .map(|(k, _)| mine.get(*k).copied().unwrap_or(0))
        .sum();
    let lost_total: u64 = hooks.values().map(|(_, l)| l).sum();
    let unexpected: BTreeMap<&String, &u64> = mine
        .iter()
        .filter(|(k, _)| !REFUSED_EVENTS.iter().any(|(e, _)| e == k))
        .collect();
    let records_total: u64 = mine_records.values().sum();
    let secs = out.elapsed.as_secs_f64();
    Ok(json!({
        "ring_buffer_bytes": ring,
        "kernel_aggregation": !extra.contains(&"--no-kernel-aggregation"),
        "records_delivered": records_total,
        "connections": out.ok,
        "other_errors": out.errors,
        "cut_short": out.cut_short,
        "storm_s": secs,
        "connections_per_s": out.rate(),
        "events_per_s": expected_total as f64 / secs.max(1e-9),
        "events_expected": expected_total,
        "events_delivered": delivered_total,
        "events_lost_all_hooks": lost_total,
        "ndjson_lines": lines,
        "by_kind": rows,
        "unexpected_kinds_in_bench_netns": unexpected,
        "tcptrace_cpu_s": cpu.as_secs_f64(),
        "tcptrace_cpu_us_per_event": cpu.as_secs_f64() * 1e6 / (delivered_total.max(1) as f64),
        "tcptrace_vm_hwm_bytes": hwm,
        "tcptrace_vm_rss_bytes": rss,
    }))
}

/// Per-program run counts and average run time from the kernel's BPF
/// statistics, enabled only while this process holds the fd.
fn bpf_cost(ctx: &mut Ctx) -> Result<Value> {
    let t = start_tcptrace(ctx, &[], Stdio::null())?;
    let stats = tcptrace::bpf::inspect::run_time_stats()?;
    let before = sys::bpf_fds(t.pid)?;
    let mut storms = Vec::new();
    for s in [Storm::Accept, Storm::Refused] {
        let (out, _ns) = one_storm(ctx, s, storm_count(&ctx.plan, s), "stats")?;
        storms.push(json!({"storm": s.name(), "connections": out.ok}));
    }
    let after = sys::bpf_fds(t.pid)?;
    drop(stats);
    let loaded = tcptrace::bpf::inspect::loaded();
    let maps = map_memory(&after, &loaded.maps);
    let names = loaded.programs;
    t.stop(Signal::SIGTERM, Duration::from_secs(30))?;
    let mut rows = Vec::new();
    let (mut total_ns, mut total_cnt) = (0u64, 0u64);
    for (id, (ns1, c1)) in &after.progs {
        let (ns0, c0) = before.progs.get(id).copied().unwrap_or((0, 0));
        let (dns, dc) = (ns1.saturating_sub(ns0), c1.saturating_sub(c0));
        total_ns += dns;
        total_cnt += dc;
        rows.push(json!({
            "program": names.get(id).cloned().unwrap_or_else(|| format!("id {id}")),
            "run_count": dc,
            "run_time_ns": dns,
            "avg_ns": if dc > 0 { json!(dns as f64 / dc as f64) } else { Value::Null },
        }));
    }
    Ok(json!({
        "storms": storms,
        "programs": rows,
        "all_programs_avg_ns": if total_cnt > 0 { json!(total_ns as f64 / total_cnt as f64) } else { Value::Null },
        "maps": maps,
    }))
}

/// Memory the kernel charges for each of tcptrace's maps (fdinfo memlock).
fn map_memory(fds: &sys::BpfFds, names: &BTreeMap<u32, String>) -> Value {
    let mut total = 0u64;
    let rows: Vec<Value> = fds
        .maps
        .iter()
        .map(|(id, f)| {
            let num = |k: &str| f.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            total += num("memlock");
            json!({
                "map": names.get(id).cloned().unwrap_or_else(|| format!("id {id}")),
                "type": num("map_type"),
                "max_entries": num("max_entries"),
                "key_size": num("key_size"),
                "value_size": num("value_size"),
                "memlock_bytes": num("memlock"),
            })
        })
        .collect();
    json!({"total_memlock_bytes": total, "maps": rows})
}

/// Load + attach time of `Tracer::load` in this process.
fn startup(ctx: &Ctx) -> Result<Value> {
    let n = if ctx.args.smoke { 1 } else { 5 };
    let mut times = Vec::new();
    let mut attached = 0;
    for _ in 0..n {
        let t0 = Instant::now();
        let tracer = tcptrace::bpf::Tracer::load(&tcptrace::bpf::TracerOptions::default())?;
        times.push(t0.elapsed().as_secs_f64());
        attached = tracer
            .probes
            .iter()
            .filter(|p| p.state == tcptrace::model::ProbeState::Attached)
            .count();
        drop(tracer);
        check_stop()?;
    }
    Ok(json!({
        "tracer_load_s_median": median(times.clone()),
        "tracer_load_s_runs": times,
        "hooks_attached": attached,
    }))
}

fn write_results(ctx: &Ctx, results: &Value) -> Result<()> {
    fs::create_dir_all(&ctx.args.out_dir)
        .with_context(|| format!("creating {}", ctx.args.out_dir.display()))?;
    let date = results["date"].as_str().unwrap_or("unknown");
    let day = date.get(..10).unwrap_or(date);
    let json_path = ctx.args.out_dir.join(format!("results-{day}.json"));
    fs::write(&json_path, serde_json::to_string_pretty(results)? + "\n")
        .with_context(|| format!("writing {}", json_path.display()))?;
    render(&ctx.args, &json_path)?;
    eprintln!("tcptrace-bench: wrote {}", json_path.display());
    Ok(())
}

/// The soak run, written as soak-<date>.json and added to the report of
/// the newest results file.
fn soak(args: &Args, minutes: u64) -> Result<()> {
    let plan = soak::SoakPlan {
        duration: Duration::from_secs(minutes * 60),
        sample_every: Duration::from_secs(args.sample_every.max(1) * 60),
        churn_per_s: 200,
        burst_every: Duration::from_secs(60),
        burst_refused: 5_000,
    };
    let results = soak::soak(&args.tcptrace, &plan, &STOP)?;
    fs::create_dir_all(&args.out_dir)
        .with_context(|| format!("creating {}", args.out_dir.display()))?;
    let date = results["date"].as_str().unwrap_or("unknown");
    let path = args
        .out_dir
        .join(format!("soak-{}.json", date.get(..10).unwrap_or(date)));
    fs::write(&path, serde_json::to_string_pretty(&results)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    eprintln!("tcptrace-bench: wrote {}", path.display());
    if let Some(latest) = newest(&args.out_dir, "results-") {
        render(args, &latest)?;
    }
    let failed = soak::failed_checks(&results);
    if !failed.is_empty() {
        bail!("the soak failed its checks: {}", failed.join("; "));
    }
    Ok(())
}

/// Writes the report of the results file `path`, with the analysis and the
/// newest soak run of the output directory when there are.
fn render(args: &Args, path: &Path) -> Result<()> {
    let md = args
        .markdown
        .clone()
        .unwrap_or_else(|| args.out_dir.join("BENCHMARKS.md"));
    let text = report_text(&args.out_dir, path)?;
    fs::write(&md, text).with_context(|| format!("writing {}", md.display()))?;
    eprintln!("tcptrace-bench: wrote {}", md.display());
    Ok(())
}

/// The report of the results file `path` and the analysis and newest soak
/// run of `out_dir`.
fn report_text(out_dir: &Path, path: &Path) -> Result<String> {
    let read = |p: &Path| -> Result<Value> {
        let text = fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("parsing {}", p.display()))
    };
    let rel = |p: &Path| {
        p.file_name()
            .map(|n| format!("bench/{}", n.to_string_lossy()))
            .unwrap_or_default()
    };
    let results = read(path)?;
    let analysis = fs::read_to_string(out_dir.join("analysis.md")).ok();
    let soak = match newest(out_dir, "soak-") {
        Some(p) => Some((read(&p)?, rel(&p))),
        None => None,
    };
    Ok(report::markdown(
        &results,
        &rel(path),
        analysis.as_deref(),
        soak.as_ref().map(|(v, r)| (v, r.as_str())),
    ))
}

/// The newest `<prefix><date>.json` in `dir` (dates sort as text).
fn newest(dir: &Path, prefix: &str) -> Option<PathBuf> {
    let entries = fs::read_dir(dir).ok()?;
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".json"))
        })
        .collect();
    found.sort();
    found.pop()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BENCHMARKS.md is generated: the committed copy must be what the
    /// committed results, analysis and soak run render to.
    #[test]
    fn committed_benchmarks_md_is_rendered_from_the_committed_results() {
        let bench = Path::new(env!("CARGO_MANIFEST_DIR"));
        let results = newest(bench, "results-").expect("a committed results-<date>.json");
        let fresh = report_text(bench, &results).expect("rendering the report");
        let committed = fs::read_to_string(bench.join("../BENCHMARKS.md")).expect("BENCHMARKS.md");
        assert!(
            committed == fresh,
            "BENCHMARKS.md is stale: regenerate it with `cargo run -p tcptrace-bench -- \
             --tcptrace /bin/true --out-dir bench --markdown BENCHMARKS.md --render {}`",
            results.display()
        );
    }
}
