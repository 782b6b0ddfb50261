//! Decoded events -> naming -> diagnosis -> records for the sinks. Node
//! facts arrive as data from the refresher; I/O happens only where a cache
//! falls short: attribution rescans, and a namespace's facts read at its
//! failure when they are missing or older than it.
use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    attribution::{Attributor, ServiceMap},
    diagnosis::{Diagnoser, DiagnoserConfig},
    model::{Event, EventKind, Record, StormId, StormRepeats, Verdict, facts::NodeFacts},
};

/// Unknown namespaces remembered to avoid waking the refresher per event.
const MAX_PENDING_NETNS: usize = 4096;
/// Storm first records kept for their counts: the kernel counts at most
/// [`crate::bpf::MAX_STORMS`], some of a generation being read while the
/// next fills.
const MAX_STORMS: usize = 2 * crate::bpf::MAX_STORMS;
/// Facts older than this when a namespace fails are read again then.
const FACTS_FRESH: Duration = Duration::from_secs(1);
/// Reads at failures per second, at most (each enters a namespace).
const MAX_FAILURE_READS: u32 = 16;
/// The facts of a namespace that disappeared are kept this long, for the
/// verdicts still waiting on its failures.
const VANISHED_KEEP: Duration = Duration::from_secs(300);

pub struct Pipeline {
    attributor: Attributor,
    diagnoser: Diagnoser,
    facts: NodeFacts,
    /// kube-proxy's NodePorts, added to every facts update.
    nodeports: Vec<(u16, String)>,
    /// Namespaces seen in events but not yet in the facts.
    unknown_netns: HashSet<u32>,
    /// Namespaces where netfilter dropped traced packets.
    firewall_netns: BTreeSet<u32>,
    /// When each namespace's facts were read.
    facts_read: HashMap<u32, Instant>,
    /// Reads at failures in the current second: (its start, count).
    failure_reads: (Instant, u32),
    /// The attribution scan whose nodes the facts carry.
    nodes_scan: u64,
    /// Other nodes' NodePorts (kind), by node namespace.
    node_nodeports: HashMap<u32, BTreeMap<u16, String>>,
    /// First records of the storms the kernel counts, as processed, by
    /// their counting generation and stamp.
    storms: HashMap<StormId, Event>,
    /// Storms of other nodes (`--node-scope`): their counts are not ours.
    out_of_scope_storms: HashSet<StormId>,
}

/// What processing one event produced.
pub struct Processed {
    pub records: Vec<Record>,
    /// Aggregated verdicts whose counts moved, for the sinks that show
    /// counts live (board, metrics); not records of the stream.
    pub live: Vec<Verdict>,
    /// The event came from a namespace the facts do not cover yet.
    pub needs_facts: bool,
    /// Netfilter dropped the event's packet in this namespace: its drop
    /// rules are wanted in the facts.
    pub watch_firewall: Option<u32>,
}

impl Pipeline {
    pub fn new(attributor: Attributor, cfg: DiagnoserConfig) -> Self {
        Self {
            attributor,
            diagnoser: Diagnoser::new(cfg),
            facts: NodeFacts::default(),
            nodeports: Vec::new(),
            unknown_netns: HashSet::new(),
            firewall_netns: BTreeSet::new(),
            facts_read: HashMap::new(),
            failure_reads: (Instant::now(), 0),
            nodes_scan: 0,
            node_nodeports: HashMap::new(),
            storms: HashMap::new(),
            out_of_scope_storms: HashSet::new(),
        }
    }

    /// The kernel's counts of a finished generation (after its records
    /// were processed): each storm's repeats as one record with a
    /// `count`, and their share of the verdicts.
    pub fn repeats(
        &mut self,
        counted: &[StormRepeats],
        now: SystemTime,
    ) -> (Vec<Record>, Vec<Verdict>) {
        let mut records = Vec::new();
        let mut live = Vec::new();
        for f in counted {
            let key = f.storm;
            if self.out_of_scope_storms.remove(&key) || f.count == 0 {
                self.storms.remove(&key);
                self.diagnoser.storm_done(&key);
                continue;
            }
            // Its first record was not kept (too many storms at once, or
            // it did not decode): the repeats are still named by their key,
            // unless that does not decode either (like a malformed record).
            let first = match (self.storms.remove(&key), &f.failure) {
                (Some(first), _) => first,
                (None, None) => {
                    self.diagnoser.storm_done(&key);
                    continue;
                }
                (None, Some(failure)) => {
                    let mut ev = failure.clone();
                    ev.time = now;
                    ev.storm = Some(key);
                    self.attributor.attribute(&mut ev);
                    if !self.attributor.in_scope(&ev) {
                        self.diagnoser.storm_done(&key);
                        continue;
                    }
                    ev
                }
            };
            let mut ev = first.clone();
            ev.time = now;
            ev.count = Some(f.count);
            ev.storm = None;
            ev.sock = None;
            ev.tcp = None;
            // The repeats' ephemeral ports are not kept.
            match ev.kind {
                EventKind::ResetReceived => ev.src.port = 0,
                EventKind::ResetSent => ev.dst.port = 0,
                _ => {}
            }
            let diagnosed = self.diagnoser.repeats(&first, f.count, now);
            records.push(Record::Event(Box::new(ev)));
            records.extend(verdict_records(diagnosed.verdicts));
            live.extend(diagnosed.live);
        }
        // First records of the counted generations are done with.
        if let Some(done) = counted.iter().map(|f| f.storm.generation).max() {
            let newer = |k: &StormId| k.generation.wrapping_sub(done) as i32 > 0;
            self.storms.retain(|k, _| newer(k));
            self.out_of_scope_storms.retain(newer);
        }
        (records, live)
    }

    /// The nodes sharing this kernel other than tcptrace's own (kind), as
    /// files to enter their network namespaces through: their kube-proxy
    /// rules are wanted.
    pub fn other_nodes(&self) -> Vec<(u32, PathBuf)> {
        let mut nodes: Vec<(u32, PathBuf)> = self
            .attributor
            .other_nodes()
            .iter()
            .map(|(ns, n)| (*ns, n.netns_file.clone()))
            .collect();
        nodes.sort();
        nodes
    }

    /// Takes the Services of the node tcptrace runs in and of the other
    /// nodes (by namespace): their NodePorts stay each node's own.
    pub fn set_all_services(&mut self, services: ServiceMap, others: Vec<(u32, ServiceMap)>) {
        let mut all = services;
        self.node_nodeports.clear();
        for (ns, map) in others {
            self.node_nodeports
                .insert(ns, map.nodeport_names().collect());
            all.merge(map);
        }
        self.facts.node_nodeports.clone_from(&self.node_nodeports);
        self.set_services(all);
    }

    /// Copies the nodes of the latest attribution scan into the facts.
    fn sync_nodes(&mut self) {
        if self.attributor.scans() != self.nodes_scan {
            self.nodes_scan = self.attributor.scans();
            self.facts.node_of.clone_from(self.attributor.node_of());
        }
    }

    /// Takes a refresh of the facts. Namespaces it no longer has keep their
    /// last facts for [`VANISHED_KEEP`].
    pub fn set_facts(&mut self, mut facts: NodeFacts) {
        let now = Instant::now();
        self.unknown_netns.retain(|n| !facts.netns.contains_key(n));
        facts.add_nodeports(self.nodeports.iter().cloned());
        facts.node_nodeports.clone_from(&self.node_nodeports);
        facts.node_of.clone_from(self.attributor.node_of());
        for ns in facts.netns.keys() {
            self.facts_read.insert(*ns, now);
        }
        for (ns, f) in self.facts.netns.drain() {
            let recent = self
                .facts_read
                .get(&ns)
                .is_some_and(|t| now.saturating_duration_since(*t) < VANISHED_KEEP);
            if recent {
                facts.netns.entry(ns).or_insert(f);
            }
        }
        self.facts_read.retain(|ns, _| facts.netns.contains_key(ns));
        self.facts = facts;
    }

    /// Reads the facts of `ev`'s namespace now when they are missing or
    /// older than [`FACTS_FRESH`] (a namespace that fails right after it
    /// was made, or is about to go): the verdict gets the numbers of the
    /// moment it failed. Bounded to [`MAX_FAILURE_READS`] a second.
    fn facts_at_failure(&mut self, ev: &Event) {
        let now = Instant::now();
        let fresh = self
            .facts_read
            .get(&ev.netns)
            .is_some_and(|t| now.saturating_duration_since(*t) < FACTS_FRESH);
        if ev.netns == 0 || fresh || self.facts.is_node(ev.netns) {
            return;
        }
        if now.saturating_duration_since(self.failure_reads.0) >= Duration::from_secs(1) {
            self.failure_reads = (now, 0);
        }
        if self.failure_reads.1 >= MAX_FAILURE_READS {
            return;
        }
        self.failure_reads.1 += 1;
        // Marked read even when it fails: one attempt a second.
        self.facts_read.insert(ev.netns, now);
        let read = self
            .attributor
            .netns_files(ev.netns, ev.pid)
            .into_iter()
            .find_map(|file| {
                crate::node::sysctl::collect_netns(&file)
                    .ok()
                    .filter(|(inode, _)| *inode == ev.netns)
            });
        if let Some((inode, mut f)) = read {
            if let Some(old) = self.facts.netns.get(&inode) {
                f.drop_rules.clone_from(&old.drop_rules);
                f.queued_listeners.clone_from(&old.queued_listeners);
            }
            self.facts.netns.insert(inode, f);
            self.unknown_netns.remove(&inode);
        }
    }

    pub fn set_services(&mut self, services: ServiceMap) {
        self.nodeports = services.nodeport_names().collect();
        self.facts.add_nodeports(self.nodeports.iter().cloned());
        self.attributor.set_services(services);
    }

    /// Warnings from attribution (missing tools, unreadable rules), once each.
    pub fn take_warnings(&mut self) -> Vec<String> {
        self.attributor.take_warnings()
    }

    pub fn facts(&self) -> &NodeFacts {
        &self.facts
    }

    /// Names, scopes and diagnoses one event. Out-of-scope events (another
    /// node's, with --node-scope) produce no records.
    pub fn event(&mut self, mut ev: Event) -> Processed {
        self.attributor.attribute(&mut ev);
        if !self.attributor.in_scope(&ev) {
            if let Some(storm) = ev.storm
                && self.out_of_scope_storms.len() < MAX_STORMS
            {
                self.out_of_scope_storms.insert(storm);
            }
            return Processed {
                records: Vec::new(),
                live: Vec::new(),
                needs_facts: false,
                watch_firewall: None,
            };
        }
        self.sync_nodes();
        self.facts_at_failure(&ev);
        let needs_facts = ev.netns != 0
            && !self.facts.netns.contains_key(&ev.netns)
            && self.unknown_netns.len() < MAX_PENDING_NETNS
            && self.unknown_netns.insert(ev.netns);
        let watch_firewall = (ev.kind == EventKind::Drop
            && ev.netns != 0
            && ev.reason == Some(crate::model::Reason::NetfilterDrop)
            && self.firewall_netns.len() < crate::node::MAX_FIREWALL_NETNS
            && self.firewall_netns.insert(ev.netns))
        .then_some(ev.netns);
        if let Some(storm) = ev.storm
            && self.storms.len() < MAX_STORMS
        {
            self.storms.insert(storm, ev.clone());
        }
        let diagnosed = self.diagnoser.observe(&ev, &self.facts);
        let mut records = Vec::with_capacity(1 + diagnosed.verdicts.len());
        records.push(Record::Event(Box::new(ev)));
        records.extend(verdict_records(diagnosed.verdicts));
        Processed {
            records,
            live: diagnosed.live,
            needs_facts,
            watch_firewall,
        }
    }

    /// Namespaces whose drop rules the facts should carry.
    pub fn firewall_netns(&self) -> &BTreeSet<u32> {
        &self.firewall_netns
    }

    /// Verdicts still holding unreported occurrences, at shutdown.
    pub fn finish(&mut self, now: SystemTime) -> Vec<Record> {
        verdict_records(self.diagnoser.finish(now, &self.facts)).collect()
    }

    /// Failures in the stream that no verdict accounts for (bounds reached).
    pub fn unaccounted(&self) -> crate::model::Unaccounted {
        self.diagnoser.unaccounted()
    }

    /// Time-based diagnosis: verdicts for the stream, and counts that
    /// moved for the live sinks.
    pub fn tick(&mut self, now: SystemTime) -> (Vec<Record>, Vec<Verdict>) {
        self.attributor.refresh(Instant::now());
        self.sync_nodes();
        let attributor = &mut self.attributor;
        let diagnosed = self
            .diagnoser
            .tick(now, &self.facts, &mut |ev| attributor.attribute(ev));
        (
            verdict_records(diagnosed.verdicts).collect(),
            diagnosed.live,
        )
    }
}

fn verdict_records(verdicts: Vec<Verdict>) -> impl Iterator<Item = Record> {
    verdicts.into_iter().map(|v| Record::Verdict(Box::new(v)))
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr},
        time::{Duration, UNIX_EPOCH},
    };

    use std::{fs, os::unix::fs::MetadataExt as _};

    use super::*;
    use crate::{
        attribution::AttributionConfig,
        model::{Cause, facts::NetnsFacts},
        model::{Endpoint, Errno, EventKind, IdentityLevel, TcpState},
    };

    fn connect_error(netns: u32) -> Event {
        let mut ev = Event::new(
            UNIX_EPOCH + Duration::from_secs(100),
            EventKind::ConnectError,
            Endpoint::new(IpAddr::V4(Ipv4Addr::new(10, 244, 0, 2)), 0),
            Endpoint::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80),
            netns,
        );
        ev.errno = Some(Errno::EADDRNOTAVAIL);
        ev.state = Some(TcpState::Close);
        ev.old_state = Some(TcpState::SynSent);
        ev
    }

    #[test]
    fn names_the_namespace_and_asks_for_facts_once() {
        // A host root whose only namespace is the named netns "pod-a".
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("run/netns")).unwrap();
        fs::write(root.path().join("run/netns/pod-a"), b"").unwrap();
        let inode = fs::metadata(root.path().join("run/netns/pod-a"))
            .unwrap()
            .ino() as u32;
        let attributor = Attributor::new(AttributionConfig {
            host_root: root.path().to_path_buf(),
            ..AttributionConfig::default()
        });
        let mut p = Pipeline::new(attributor, DiagnoserConfig::default());
        let first = p.event(connect_error(inode));
        assert!(first.needs_facts);
        let Record::Event(ev) = &first.records[0] else {
            panic!("event first")
        };
        assert_eq!(ev.netns_name.as_deref(), Some("pod-a"));
        assert_eq!(ev.identity_level, IdentityLevel::NetnsName);
        let verdicts: Vec<Cause> = first.records[1..]
            .iter()
            .filter_map(|r| match r {
                Record::Verdict(v) => Some(v.cause),
                _ => None,
            })
            .collect();
        assert_eq!(verdicts, vec![Cause::PortExhaustion]);
        assert!(!p.event(connect_error(inode)).needs_facts, "asked once");

        let mut facts = NodeFacts::default();
        facts.netns.insert(inode, NetnsFacts::default());
        p.set_facts(facts);
        assert!(!p.event(connect_error(inode)).needs_facts);
    }

    #[test]
    fn a_storm_without_its_first_record_is_named_by_its_key() {
        let mut p = Pipeline::new(
            Attributor::new(AttributionConfig::default()),
            DiagnoserConfig::default(),
        );
        let storm = |generation| StormId {
            generation,
            first_ns: 5,
            cpu: 1,
        };
        let named = StormRepeats {
            storm: storm(1),
            count: 41,
            failure: Some(connect_error(0)),
        };
        let unnamed = StormRepeats {
            storm: storm(2),
            count: 9,
            failure: None,
        };
        let now = UNIX_EPOCH + Duration::from_secs(200);
        let (records, _) = p.repeats(&[named, unnamed], now);
        let [Record::Event(ev)] = records.as_slice() else {
            panic!("one record: {records:?}")
        };
        assert_eq!(ev.kind, EventKind::ConnectError);
        assert_eq!(ev.count, Some(41));
        assert_eq!(ev.time, now);
        assert_eq!(ev.dst.to_string(), "10.96.0.10:80");
        assert_eq!(ev.errno, Some(Errno::EADDRNOTAVAIL));
        assert_eq!(ev.storm, None);
    }
}
