//! The trace pipeline: ring buffer -> decode -> sinks, with periodic stats,
//! a clean stop on Ctrl-C, SIGTERM or --duration, and a final drain.
use std::{
    io,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    bpf::{ProbeState, ProbeStatus, Tracer, TracerOptions},
    cli::{Cli, Command, TableFormat, TraceArgs},
    model::{Record, Stats},
    output::NdjsonWriter,
};

/// Records handled per wake-up before timers and signals get a turn.
const DRAIN_BATCH: usize = 4096;

pub async fn main(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::Probes { format }) => probes(&cli.trace, format),
        None => trace(cli.trace).await,
    }
}

fn options(args: &TraceArgs) -> TracerOptions {
    TracerOptions {
        ring_buffer_bytes: args.ring_buffer_size,
        all_states: args.all_states,
        syscall_hooks: !args.no_syscall_hooks,
        ignore_self: true,
    }
}

fn probes(args: &TraceArgs, format: TableFormat) -> Result<()> {
    let tracer = Tracer::load(&options(args))?;
    match format {
        TableFormat::Json => {
            let text = serde_json::to_string_pretty(&tracer.probes)?;
            println!("{text}");
        }
        TableFormat::Table => print!("{}", probe_table(&tracer.probes)),
    }
    Ok(())
}

pub fn probe_table(probes: &[ProbeStatus]) -> String {
    let mut out = format!(
        "{:<22} {:<32} {:<15} {}\n",
        "HOOK", "KERNEL HOOK", "TIER", "STATE"
    );
    for p in probes {
        let tier = match p.tier {
            crate::bpf::Tier::Tracepoint => "tracepoint",
            crate::bpf::Tier::RawTracepoint => "raw_tracepoint",
        };
        let state = match &p.state {
            ProbeState::Attached => "attached".to_string(),
            ProbeState::Disabled(why) => format!("disabled ({why})"),
            ProbeState::Unavailable(why) => format!("unavailable: {why}"),
        };
        out.push_str(&format!(
            "{:<22} {:<32} {:<15} {}\n",
            p.hook, p.tracepoint, tier, state
        ));
    }
    out
}

/// Counts of what this process handled, for stats records.
#[derive(Default)]
struct Tally {
    malformed: u64,
}

async fn trace(args: TraceArgs) -> Result<()> {
    let mut tracer = Tracer::load(&options(&args))?;
    for p in &tracer.probes {
        if let ProbeState::Unavailable(why) = &p.state {
            eprintln!("tcptrace: {} ({}) unavailable: {why}", p.hook, p.tracepoint);
        }
    }
    let mut ring = tracer.events()?;
    let mut sink = NdjsonWriter::new(io::stdout().lock());
    let mut tally = Tally::default();
    let started = Instant::now();
    let deadline = args
        .duration
        .map(|s| tokio::time::Instant::from_std(started + Duration::from_secs_f64(s.max(0.0))));
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut stats_tick =
        tokio::time::interval(Duration::from_secs_f64(args.stats_interval.max(0.1)));
    stats_tick.tick().await;

    loop {
        tokio::select! {
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting for events")?;
                let drained = drain(guard.get_inner_mut(), &mut tracer, &mut sink, &mut tally)?;
                if drained < DRAIN_BATCH {
                    guard.clear_ready();
                }
                sink.flush()?;
            }
            _ = stats_tick.tick() => {
                sink.write(&stats(&tracer, &tally, started, false)?)?;
                sink.flush()?;
            }
            _ = sleep_until(deadline) => break,
            _ = sigterm.recv() => break,
            _ = sigint.recv() => break,
        }
    }
    // Whatever the kernel produced before we stopped is still delivered.
    while drain(ring.get_mut(), &mut tracer, &mut sink, &mut tally)? == DRAIN_BATCH {}
    sink.write(&stats(&tracer, &tally, started, true)?)?;
    sink.flush()
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn drain(
    ring: &mut RingBuf<MapData>,
    tracer: &mut Tracer,
    sink: &mut NdjsonWriter<impl io::Write>,
    tally: &mut Tally,
) -> Result<usize> {
    let mut n = 0;
    while n < DRAIN_BATCH {
        let Some(item) = ring.next() else { break };
        n += 1;
        match tracer.decode(&item) {
            Ok(ev) => sink.write(&Record::Event(Box::new(ev)))?,
            Err(e) => {
                tally.malformed += 1;
                if tally.malformed == 1 {
                    eprintln!("tcptrace: skipping malformed record: {e}");
                }
            }
        }
    }
    Ok(n)
}

fn stats(tracer: &Tracer, tally: &Tally, started: Instant, last: bool) -> Result<Record> {
    let hooks = tracer.hook_stats()?;
    Ok(Record::Stats(Stats {
        time: SystemTime::now(),
        uptime_s: started.elapsed().as_secs_f64(),
        seen: hooks.iter().map(|h| h.seen).sum(),
        lost: hooks.iter().map(|h| h.lost).sum(),
        malformed: tally.malformed,
        hooks,
        r#final: last,
    }))
}
