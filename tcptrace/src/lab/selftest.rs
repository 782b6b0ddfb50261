//! `tcptrace selftest`: loads the tracer in this process, reproduces every
//! scenario in a lab and checks the live pipeline's verdicts.
use std::{
    collections::HashSet,
    io,
    time::{Duration, Instant, SystemTime},
};

use anyhow::{Result, bail};
use serde::Serialize;

use super::{
    Lab,
    scenarios::{self, Case, CaseResult, Expect},
};
use crate::{
    attribution::{AttributionConfig, Attributor, ServiceMap, collect_services},
    bpf::{Tracer, TracerOptions},
    cli::TableFormat,
    diagnosis::DiagnoserConfig,
    model::Verdict,
    model::{Event, Record},
    node::{self, FactsConfig},
    output::NdjsonWriter,
    pipeline::Pipeline,
};

/// How often facts are re-read and time-based rules run while watching.
const TICK: Duration = Duration::from_millis(500);
/// Records decoded per pump, so one busy moment cannot stall a case.
const MAX_DRAIN: usize = 65_536;

/// The tracer, loaded once, watching this process's sockets too.
pub struct Observer {
    tracer: Tracer,
}

impl Observer {
    pub fn load() -> Result<Self> {
        let opts = TracerOptions {
            // The scenarios' sockets belong to this process's threads.
            ignore_self: false,
            // Room for the whole machine's failures between two pumps.
            ring_buffer_bytes: 1 << 24,
            ..TracerOptions::default()
        };
        Ok(Self {
            tracer: Tracer::load(&opts)?,
        })
    }

    /// Events lost so far because the ring buffer was full.
    fn lost(&self) -> u64 {
        self.tracer
            .hook_stats()
            .map(|h| h.iter().map(|h| h.lost).sum())
            .unwrap_or(0)
    }

    /// Decodes what the kernel produced, keeping events of `netns`.
    fn drain(&mut self, netns: &HashSet<u32>, out: &mut Vec<Event>) {
        self.tracer.drain(MAX_DRAIN, |decoded| {
            if let Ok(ev) = decoded
                && netns.contains(&ev.netns)
            {
                out.push(ev);
            }
        });
    }

    /// Starts watching a lab: a fresh pipeline with the lab as the node.
    pub fn watch(&mut self, lab: &Lab) -> Watch<'_> {
        // Whatever came before belongs to earlier cases.
        let mut discard = Vec::new();
        self.drain(&HashSet::new(), &mut discard);
        let attributor = Attributor::new(AttributionConfig {
            host_root: lab.host_root.clone(),
            refresh_interval: Duration::from_secs(1),
            ..AttributionConfig::default()
        });
        let services = collect_services(Some(&lab.node_netns_path())).unwrap_or_default();
        let mut pipeline = Pipeline::new(attributor, DiagnoserConfig::default());
        pipeline.set_services(services.clone());
        let mut w = Watch {
            netns: lab.netns_inodes().into_iter().collect(),
            obs: self,
            pipeline,
            services,
            facts_cfg: lab.facts_config(),
            events: Vec::new(),
            verdicts: Vec::new(),
            last_tick: Instant::now(),
        };
        w.tick();
        w
    }
}

/// One case's view of the live pipeline.
pub struct Watch<'a> {
    obs: &'a mut Observer,
    netns: HashSet<u32>,
    pipeline: Pipeline,
    services: ServiceMap,
    facts_cfg: FactsConfig,
    /// Events of the lab's namespaces, attributed, in arrival order.
    pub events: Vec<Event>,
    /// Every verdict the pipeline produced for them.
    pub verdicts: Vec<Verdict>,
    last_tick: Instant,
}

impl Watch<'_> {
    /// Re-reads the node facts and runs the time-based rules.
    pub fn tick(&mut self) {
        let (facts, _names) = node::collect(&self.facts_cfg, &self.services);
        self.pipeline.set_facts(facts);
        let records = self.pipeline.tick(SystemTime::now());
        self.take(records);
        self.last_tick = Instant::now();
    }

    fn take(&mut self, records: Vec<Record>) {
        for r in records {
            match r {
                Record::Event(ev) => self.events.push(*ev),
                Record::Verdict(v) => self.verdicts.push(*v),
                Record::Stats(_) => {}
            }
        }
    }

    /// Feeds everything the kernel produced so far through the pipeline.
    pub fn pump(&mut self) {
        let mut evs = Vec::new();
        self.obs.drain(&self.netns, &mut evs);
        let mut needs_facts = false;
        for ev in evs {
            let p = self.pipeline.event(ev);
            needs_facts |= p.needs_facts;
            self.take(p.records);
        }
        if needs_facts || self.last_tick.elapsed() >= TICK {
            self.tick();
        }
    }

    /// Pumps until `done` holds or `timeout` passes; returns whether it held.
    pub fn wait(&mut self, timeout: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let start = Instant::now();
        loop {
            self.pump();
            if done(self) {
                return true;
            }
            if start.elapsed() >= timeout {
                return false;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Pumps for `d`: the quiet period of a control.
    pub fn settle(&mut self, d: Duration) {
        self.wait(d, |_| false);
    }

    /// Whether some verdict has this cause and namespace.
    pub fn has(&self, cause: crate::model::Cause, netns: u32) -> bool {
        self.verdicts
            .iter()
            .any(|v| v.cause == cause && v.netns == netns)
    }
}

/// One row of the report.
#[derive(Debug, Serialize)]
struct Row<'a> {
    scenario: &'a str,
    case: &'a str,
    expected: String,
    got: String,
    result: &'a str,
    seconds: f64,
    #[serde(skip_serializing_if = "String::is_empty")]
    detail: String,
}

fn row(r: &CaseResult) -> Row<'_> {
    Row {
        scenario: r.scenario,
        case: r.case,
        expected: match r.expect {
            Expect::Verdict(c) => c.as_str().to_string(),
            Expect::NoVerdict(c) => format!("no {}", c.as_str()),
        },
        got: r.got.clone(),
        result: r.status(),
        seconds: (r.elapsed.as_secs_f64() * 10.0).round() / 10.0,
        detail: r.detail.clone(),
    }
}

/// The report as a table.
pub fn render(results: &[CaseResult]) -> String {
    let rows: Vec<Row<'_>> = results.iter().map(row).collect();
    let w =
        |f: &dyn Fn(&Row<'_>) -> usize, min: usize| rows.iter().map(f).max().unwrap_or(0).max(min);
    let (ws, wc, we, wg) = (
        w(&|r| r.scenario.len(), 8),
        w(&|r| r.case.len(), 4),
        w(&|r| r.expected.len(), 8),
        w(&|r| r.got.len(), 3),
    );
    let mut out = format!(
        "{:<ws$}  {:<wc$}  {:<we$}  {:<wg$}  {:<7}  {:>5}\n",
        "SCENARIO", "CASE", "EXPECTED", "GOT", "RESULT", "SECS"
    );
    for r in &rows {
        out.push_str(&format!(
            "{:<ws$}  {:<wc$}  {:<we$}  {:<wg$}  {:<7}  {:>5.1}\n",
            r.scenario, r.case, r.expected, r.got, r.result, r.seconds
        ));
    }
    let notes: Vec<String> = rows
        .iter()
        .filter(|r| !r.detail.is_empty())
        .map(|r| format!("{} {}: {}", r.scenario, r.case, r.detail))
        .collect();
    if !notes.is_empty() {
        out.push('\n');
        for n in notes {
            out.push_str(&n);
            out.push('\n');
        }
    }
    out
}

/// Runs the named scenarios (all when empty) and prints the report.
/// Fails when a case that was not skipped failed.
pub fn main(names: &[String], format: TableFormat) -> Result<()> {
    crate::bpf::require_privileges()?;
    let all = scenarios::all();
    let known: Vec<&str> = scenarios::names();
    for n in names {
        if !known.contains(&n.as_str()) {
            bail!("unknown scenario {n:?}: choose from {}", known.join(", "));
        }
    }
    let cases: Vec<&Case> = all
        .iter()
        .filter(|c| names.is_empty() || names.iter().any(|n| n == c.scenario))
        .collect();
    super::install_signal_cleanup()?;
    for gone in super::sweep_stale() {
        eprintln!("tcptrace: removed a stale lab resource: {gone}");
    }
    let started = Instant::now();
    let mut obs = Observer::load()?;
    let mut results = Vec::new();
    for case in cases {
        eprintln!("tcptrace: selftest {} {} ...", case.scenario, case.name);
        let r = case.run(&mut obs);
        eprintln!(
            "tcptrace: selftest {} {}: {}",
            case.scenario,
            case.name,
            r.status()
        );
        results.push(r);
    }
    match format {
        TableFormat::Table => {
            crate::output::print(&format!(
                "{}\n{} passed, {} failed, {} skipped in {:.1} s\n",
                render(&results),
                results.iter().filter(|r| r.status() == "pass").count(),
                results.iter().filter(|r| r.status() == "FAIL").count(),
                results.iter().filter(|r| r.status() == "skipped").count(),
                started.elapsed().as_secs_f64()
            ))?;
        }
        TableFormat::Json => {
            let mut out = NdjsonWriter::new(io::stdout().lock());
            for r in &results {
                out.write(&row(r))?;
            }
            out.flush()?;
        }
    }
    let lost = obs.lost();
    if lost > 0 {
        eprintln!(
            "tcptrace: {lost} kernel events were lost (ring buffer full): other activity on this \
             machine was heavy, and missing events can fail a case"
        );
    }
    let failed = results.iter().filter(|r| r.status() == "FAIL").count();
    if failed > 0 {
        bail!("selftest: {failed} of {} cases failed", results.len());
    }
    Ok(())
}
