//! The trace pipeline: ring buffer -> decode -> sinks, with periodic stats,
//! a clean stop on Ctrl-C, SIGTERM or --duration, and a final drain.
use std::{
    collections::{BTreeSet, HashMap},
    io::{self, IsTerminal as _},
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Context as _, Result};
use tokio::signal::unix::{SignalKind, signal};

use crate::{
    attribution::{AttributionConfig, Attributor, NodeScope, ServiceMap},
    bpf::{Tracer, TracerOptions},
    cli::{Cli, Command, NodeArgs, OutputFormat, TableFormat, TraceArgs},
    diagnosis::{DiagnoserConfig, audit},
    metrics::MeteredSink,
    model::{ProbeState, ProbeStatus, Record, Stats, Tier},
    node::{self, FactsConfig, Refresher},
    output::{ChannelSink, NdjsonWriter, Sink, findings_table},
    pipeline::Pipeline,
};

/// How often time-based diagnosis runs (re-emission, counter deltas).
const TICK: Duration = Duration::from_secs(1);

/// Records handled per wake-up before timers and signals get a turn.
const DRAIN_BATCH: usize = 4096;

/// Pause after a drain that found records, so that under a flood records
/// are read in batches: the kernel wakes the reader only when it has caught
/// up, so each wake-up would otherwise carry one record.
const LINGER: Duration = Duration::from_millis(2);

pub async fn main(cli: Cli) -> Result<()> {
    match cli.command {
        Some(Command::Probes { format }) => probes(&cli.trace, format),
        Some(Command::Audit { format, node }) => audit_node(&node, format),
        Some(Command::Replay { file, speed }) => {
            crate::tui::run_replay(&file, speed, crate::tui::Header::default()).await
        }
        Some(Command::Selftest { .. }) => {
            anyhow::bail!("`tcptrace selftest` is the lab's: run it from the tcptrace binary")
        }
        None => trace(cli.trace).await,
    }
}

fn options(args: &TraceArgs) -> TracerOptions {
    let defaults = TracerOptions::default();
    TracerOptions {
        ring_buffer_bytes: args.ring_buffer_size,
        all_states: args.all_states,
        syscall_hooks: !args.no_syscall_hooks,
        ignore_self: true,
        btf_path: args.btf.clone().unwrap_or(defaults.btf_path),
        count_storms: !args.no_kernel_aggregation,
    }
}

fn facts_config(node: &NodeArgs) -> FactsConfig {
    FactsConfig {
        host_root: node.host_root.clone(),
        node_netns: node.node_netns(),
        middlebox_timeout_s: node.middlebox_timeout,
        nodeports: node.nodeports.iter().cloned().collect(),
    }
}

fn audit_node(node: &NodeArgs, format: TableFormat) -> Result<()> {
    crate::bpf::require_privileges()?;
    let cfg = facts_config(node);
    let (mut facts, names) = node::collect(&cfg, &BTreeSet::new(), &HashMap::new());
    facts.add_nodeports(ServiceMap::from_dumps(&node::rules(&cfg)).nodeport_names());
    let findings = audit(&facts, &names);
    match format {
        TableFormat::Json => {
            let mut out = NdjsonWriter::new(io::stdout().lock());
            for f in &findings {
                out.write(f)?;
            }
            out.flush()
        }
        TableFormat::Table => crate::output::print(&findings_table(&findings)),
    }
}

fn probes(args: &TraceArgs, format: TableFormat) -> Result<()> {
    let tracer = Tracer::load(&options(args))?;
    match format {
        TableFormat::Json => {
            let text = serde_json::to_string_pretty(&serde_json::json!({
                "hooks": tracer.probes,
                "tick": tracer.tick,
            }))?;
            crate::output::print(&format!("{text}\n"))
        }
        TableFormat::Table => crate::output::print(&format!(
            "{}\ntick rate: {}\n",
            probe_table(&tracer.probes),
            tracer.tick.describe()
        )),
    }
}

pub fn probe_table(probes: &[ProbeStatus]) -> String {
    crate::output::table(
        &["HOOK", "KERNEL HOOK", "TIER", "STATE"],
        probes.iter().map(|p| {
            let state = match &p.state {
                ProbeState::Attached => "attached".to_string(),
                ProbeState::Disabled(why) => format!("disabled ({why})"),
                ProbeState::Unavailable(why) => format!("unavailable: {why}"),
            };
            [
                p.hook.to_string(),
                p.tracepoint.clone(),
                p.tier.as_str().to_string(),
                state,
            ]
        }),
    )
}

/// Counts of what this process handled, and where it runs, for stats
/// records.
#[derive(Default)]
struct Tally {
    malformed: u64,
    node: Option<String>,
    kernel: Option<String>,
}

/// Records the TUI may lag behind before new ones are counted as dropped.
const TUI_QUEUE: usize = 65_536;

async fn trace(args: TraceArgs) -> Result<()> {
    // Handlers first: a stop requested while loading is honoured cleanly.
    let mut signals = Signals {
        term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
    };
    let tui = match args.format {
        OutputFormat::Tui => true,
        OutputFormat::Json => false,
        OutputFormat::Auto => io::stdout().is_terminal(),
    };
    // Bound before loading BPF: a refused or busy address fails fast.
    let metrics = crate::metrics::start(args.metrics_addr, args.metrics_allow_remote)?;
    let mut session = Session::start(&args)?;
    if let Some(m) = &metrics {
        m.set_probes(&session.stages.tracer.probes);
    }
    if !tui {
        session.announce();
        let mut sink = MeteredSink::new(NdjsonWriter::new(io::stdout().lock()), metrics);
        return session.run(&args, &mut sink, &mut signals).await;
    }
    let header = crate::tui::Header::local(session.probe_tiers());
    let (tx, rx) = tokio::sync::mpsc::channel(TUI_QUEUE);
    let mut sink = MeteredSink::new(ChannelSink::new(tx), metrics);
    // Whichever ends first ends both: quitting the UI stops tracing; a
    // tracing error closes the UI (restoring the terminal) and is reported.
    // Messages would scribble over the TUI: they are printed after it.
    session.stages.notices.hold = true;
    let result = tokio::select! {
        traced = session.run(&args, &mut sink, &mut signals) => traced,
        shown = crate::tui::run_live(rx, header) => shown,
    };
    for message in session.stages.notices.held.drain(..) {
        eprintln!("tcptrace: {message}");
    }
    result
}

/// Warnings for the user: printed at once, or held while the TUI owns the
/// terminal.
#[derive(Default)]
struct Notices {
    hold: bool,
    held: Vec<String>,
}

/// At most this many messages wait for the TUI to close.
const MAX_HELD_NOTICES: usize = 100;

impl Notices {
    fn warn(&mut self, message: String) {
        if !self.hold {
            eprintln!("tcptrace: {message}");
        } else if self.held.len() < MAX_HELD_NOTICES {
            self.held.push(message);
        }
    }
}

/// Unavailable hooks on stderr; the direct tier, whose absence is expected on
/// many kernels, in one line.
fn report_unavailable(probes: &[ProbeStatus]) {
    let direct = |p: &&ProbeStatus| matches!(p.tier, Tier::Fexit | Tier::Kprobe);
    for p in probes.iter().filter(|p| !direct(p)) {
        if let ProbeState::Unavailable(why) = &p.state {
            eprintln!("tcptrace: {} ({}) unavailable: {why}", p.hook, p.tracepoint);
        }
    }
    let mut direct_hooks = probes.iter().filter(direct).peekable();
    if direct_hooks.peek().is_some()
        && !probes
            .iter()
            .filter(direct)
            .any(|p| p.state == ProbeState::Attached)
    {
        eprintln!(
            "tcptrace: no direct hooks (fexit, kprobe) on this kernel: using tracepoint fallbacks (see `tcptrace probes`)"
        );
    }
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

/// A loaded tracer and the stages its records pass through.
struct Session {
    stages: Stages,
}

impl Session {
    fn start(args: &TraceArgs) -> Result<Self> {
        let mut tracer = Tracer::load(&options(args))?;
        report_unavailable(&tracer.probes);
        let (node, kernel) = node::host_and_kernel();
        tracer.use_runtime()?;
        let attributor = Attributor::new(AttributionConfig {
            host_root: args.node.host_root.clone(),
            node_scope: args.node_scope.clone().map(NodeScope::CgroupPrefix),
            ..AttributionConfig::default()
        });
        let mut pipeline = Pipeline::new(attributor, DiagnoserConfig::default());
        // The first facts are read before tracing is announced, so the first
        // events are already named and diagnosed with them.
        let facts_cfg = facts_config(&args.node);
        pipeline.set_services(ServiceMap::from_dumps(&node::rules(&facts_cfg)));
        let (facts, _) = node::collect(&facts_cfg, &BTreeSet::new(), &HashMap::new());
        pipeline.set_facts(facts);
        let refresher = Refresher::start(facts_cfg, args.facts_interval)
            .context("starting the node facts reader")?;
        Ok(Self {
            stages: Stages {
                tracer,
                pipeline,
                refresher,
                tally: Tally {
                    node,
                    kernel,
                    ..Tally::default()
                },
                notices: Notices::default(),
                nodes: Vec::new(),
            },
        })
    }

    /// (hook, tier) of every attached hook, for the TUI header.
    fn probe_tiers(&self) -> Vec<(String, String)> {
        self.stages
            .tracer
            .probes
            .iter()
            .filter(|p| p.state == ProbeState::Attached)
            .map(|p| (p.hook.to_string(), p.tier.as_str().to_string()))
            .collect()
    }

    /// Tells a person (or a test) on stderr that tracing is live.
    fn announce(&self) {
        let attached = self
            .stages
            .tracer
            .probes
            .iter()
            .filter(|p| p.state == ProbeState::Attached)
            .count();
        eprintln!(
            "tcptrace: tracing, {attached} of {} hooks attached",
            self.stages.tracer.probes.len()
        );
    }

    async fn run(
        &mut self,
        args: &TraceArgs,
        sink: &mut impl Sink,
        signals: &mut Signals,
    ) -> Result<()> {
        let mut tick = tokio::time::interval(TICK);
        let started = Instant::now();
        let deadline = args
            .duration
            .map(|d| tokio::time::Instant::from_std(started + d));
        let mut stats_tick = tokio::time::interval(args.stats_interval);
        stats_tick.tick().await;
        loop {
            tokio::select! {
                ready = self.stages.tracer.wait() => {
                    ready?;
                    let drained = self.stages.drain(sink)?;
                    sink.flush()?;
                    if drained > 0 && drained < DRAIN_BATCH {
                        tokio::time::sleep(LINGER).await;
                    }
                }
                _ = tick.tick() => {
                    self.stages.take_repeats(sink)?;
                    apply_updates(
                        &self.stages.refresher,
                        &mut self.stages.pipeline,
                        &mut self.stages.nodes,
                    );
                    for warning in self.stages.pipeline.take_warnings() {
                        self.stages.notices.warn(format!("warning: {warning}"));
                    }
                    let (records, live) = self.stages.pipeline.tick(SystemTime::now());
                    for record in &records {
                        sink.write(record)?;
                    }
                    for verdict in &live {
                        sink.live(verdict)?;
                    }
                    sink.flush()?;
                }
                _ = stats_tick.tick() => {
                    let record = stats(
                        &self.stages.tracer,
                        &self.stages.tally,
                        sink.dropped(),
                        self.stages.pipeline.unaccounted(),
                        started,
                        false,
                    )?;
                    sink.write(&record)?;
                    sink.flush()?;
                }
                _ = sleep_until(deadline) => break,
                _ = signals.term.recv() => break,
                _ = signals.int.recv() => break,
            }
        }
        // Whatever the kernel produced before we stopped is still delivered,
        // the last storm counts too.
        while self.stages.drain(sink)? == DRAIN_BATCH {}
        self.stages.take_repeats(sink)?;
        for record in self.stages.pipeline.finish(SystemTime::now()) {
            sink.write(&record)?;
        }
        let record = stats(
            &self.stages.tracer,
            &self.stages.tally,
            sink.dropped(),
            self.stages.pipeline.unaccounted(),
            started,
            true,
        )?;
        sink.write(&record)?;
        sink.flush()
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn apply_updates(refresher: &Refresher, pipeline: &mut Pipeline, nodes: &mut Vec<(u32, PathBuf)>) {
    for update in refresher.updates() {
        if let Some(rules) = &update.rules {
            let others = update
                .node_rules
                .iter()
                .map(|(ns, r)| (*ns, ServiceMap::from_dumps(r)))
                .collect();
            pipeline.set_all_services(ServiceMap::from_dumps(rules), others);
        }
        pipeline.set_facts(update.facts);
    }
    // Other nodes on this kernel (kind): their rules are read too.
    let found = pipeline.other_nodes();
    if found != *nodes {
        refresher.watch_nodes(found.clone());
        *nodes = found;
    }
}

/// The stages a ring-buffer record passes through.
struct Stages {
    tracer: Tracer,
    pipeline: Pipeline,
    refresher: Refresher,
    tally: Tally,
    notices: Notices,
    /// The other nodes whose rules the refresher reads.
    nodes: Vec<(u32, PathBuf)>,
}

impl Stages {
    /// Delivers the kernel's storm counts of the generation that just
    /// ended, after the first records it sent.
    fn take_repeats(&mut self, sink: &mut impl Sink) -> Result<()> {
        let repeats = self.tracer.take_repeats()?;
        if repeats.is_empty() {
            return Ok(());
        }
        while self.drain(sink)? == DRAIN_BATCH {}
        let (records, live) = self.pipeline.repeats(&repeats, SystemTime::now());
        for record in &records {
            sink.write(record)?;
        }
        for verdict in &live {
            sink.live(verdict)?;
        }
        Ok(())
    }

    /// Decodes, names, diagnoses and writes at most [`DRAIN_BATCH`] records.
    fn drain(&mut self, sink: &mut impl Sink) -> Result<usize> {
        let Self {
            tracer,
            pipeline,
            refresher,
            tally,
            notices,
            nodes,
        } = self;
        apply_updates(refresher, pipeline, nodes);
        let mut written = Ok(());
        let n = tracer.drain(DRAIN_BATCH, |decoded| match decoded {
            Ok(ev) => {
                let processed = pipeline.event(ev);
                if processed.needs_facts {
                    refresher.wake();
                }
                if let Some(netns) = processed.watch_firewall {
                    refresher.watch_firewall(netns);
                }
                for record in &processed.records {
                    if written.is_ok() {
                        written = sink.write(record);
                    }
                }
                for verdict in &processed.live {
                    if written.is_ok() {
                        written = sink.live(verdict);
                    }
                }
            }
            Err(e) => {
                tally.malformed += 1;
                if tally.malformed == 1 {
                    notices.warn(format!("skipping malformed record: {e}"));
                }
            }
        });
        written.map(|()| n)
    }
}

fn stats(
    tracer: &Tracer,
    tally: &Tally,
    sink_dropped: u64,
    unaccounted: crate::model::Unaccounted,
    started: Instant,
    last: bool,
) -> Result<Record> {
    let hooks = tracer.hook_stats()?;
    Ok(Record::Stats(Stats {
        node: tally.node.clone(),
        kernel: tally.kernel.clone(),
        time: SystemTime::now(),
        uptime_s: started.elapsed().as_secs_f64(),
        seen: hooks.iter().map(|h| h.seen).sum(),
        lost: hooks.iter().map(|h| h.lost).sum(),
        malformed: tally.malformed,
        sink_dropped,
        hooks,
        unaccounted,
        r#final: last,
        tick: Some(tracer.tick.clone()),
    }))
}
