//! The tracer and a live pipeline watching a lab: what the scenarios
//! check their verdicts against.
use std::{
    collections::HashSet,
    time::{Duration, Instant, SystemTime},
};

use anyhow::Result;
use tcptrace::{
    attribution::{AttributionConfig, Attributor, ServiceMap},
    bpf::{Tracer, TracerOptions},
    diagnosis::DiagnoserConfig,
    model::{Cause, Event, EventKind, Record, Verdict},
    node::{self, FactsConfig},
    pipeline::Pipeline,
};

use crate::Lab;

/// How often facts are re-read and time-based rules run while watching.
const TICK: Duration = Duration::from_millis(500);
/// Records decoded per pump, so one busy moment cannot stall a case.
const MAX_DRAIN: usize = 65_536;

/// The tracer, loaded once, watching this process's sockets too.
pub struct Observer {
    tracer: Tracer,
    /// Drop records without a namespace (of any namespace's traffic): each
    /// is a record no pod could be named for.
    unplaced: Vec<Event>,
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
            unplaced: Vec::new(),
        })
    }

    /// Events lost so far because the ring buffer was full.
    pub fn lost(&self) -> u64 {
        self.tracer
            .hook_stats()
            .map(|h| h.iter().map(|h| h.lost).sum())
            .unwrap_or(0)
    }

    /// Drop records without a namespace seen since the last call.
    pub fn take_unplaced(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.unplaced)
    }

    /// Decodes what the kernel produced, keeping events of `netns`.
    fn drain(&mut self, netns: &HashSet<u32>, out: &mut Vec<Event>) {
        let unplaced = &mut self.unplaced;
        self.tracer.drain(MAX_DRAIN, |decoded| {
            let Ok(ev) = decoded else { return };
            if netns.contains(&ev.netns) {
                out.push(ev);
            } else if ev.netns == 0 && ev.kind == EventKind::Drop {
                unplaced.push(ev);
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
        let rules = node::kube_proxy::read_rules(Some(&lab.node_netns_path()));
        let mut pipeline = Pipeline::new(attributor, DiagnoserConfig::default());
        pipeline.set_services(ServiceMap::from_dumps(&rules));
        let mut w = Watch {
            netns: lab.netns_inodes().into_iter().collect(),
            obs: self,
            pipeline,
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
        let (facts, _names) = node::collect(
            &self.facts_cfg,
            self.pipeline.firewall_netns(),
            &self.pipeline.facts().listen_stats(),
        );
        self.pipeline.set_facts(facts);
        let (records, _live) = self.pipeline.tick(SystemTime::now());
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
            // The rules that dropped are read before the events that follow,
            // as the tracer's background reader does while the case runs.
            if p.watch_firewall.is_some() {
                self.tick();
            }
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
    pub fn has(&self, cause: Cause, netns: u32) -> bool {
        self.verdicts
            .iter()
            .any(|v| v.cause == cause && v.netns == netns)
    }
}
