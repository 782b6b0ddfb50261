//! Decoded events -> naming -> diagnosis -> records for the sinks. No I/O:
//! node facts arrive as data from the refresher.
use std::{
    collections::{HashMap, HashSet},
    time::SystemTime,
};

use crate::{
    diagnosis::{Diagnoser, DiagnoserConfig, NodeFacts},
    model::{Event, IdentityLevel, Record},
};

/// Unknown namespaces remembered to avoid waking the refresher per event.
const MAX_PENDING_NETNS: usize = 4096;

pub struct Pipeline {
    diagnoser: Diagnoser,
    facts: NodeFacts,
    netns_names: HashMap<u32, String>,
    /// Namespaces seen in events but not yet in the facts.
    unknown_netns: HashSet<u32>,
}

/// What processing one event produced.
pub struct Processed {
    pub records: Vec<Record>,
    /// The event came from a namespace the facts do not cover yet.
    pub needs_facts: bool,
}

impl Pipeline {
    pub fn new(cfg: DiagnoserConfig) -> Self {
        Self {
            diagnoser: Diagnoser::new(cfg),
            facts: NodeFacts::default(),
            netns_names: HashMap::new(),
            unknown_netns: HashSet::new(),
        }
    }

    pub fn set_facts(&mut self, facts: NodeFacts, netns_names: HashMap<u32, String>) {
        self.unknown_netns.retain(|n| !facts.netns.contains_key(n));
        self.facts = facts;
        self.netns_names = netns_names;
    }

    pub fn facts(&self) -> &NodeFacts {
        &self.facts
    }

    pub fn event(&mut self, mut ev: Event) -> Processed {
        if let Some(name) = self.netns_names.get(&ev.netns) {
            ev.netns_name = Some(name.clone());
            if ev.identity_level == IdentityLevel::Netns {
                ev.identity_level = IdentityLevel::NetnsName;
            }
        }
        let needs_facts = ev.netns != 0
            && !self.facts.netns.contains_key(&ev.netns)
            && self.unknown_netns.len() < MAX_PENDING_NETNS
            && self.unknown_netns.insert(ev.netns);
        let verdicts = self.diagnoser.observe(&ev, &self.facts);
        let mut records = Vec::with_capacity(1 + verdicts.len());
        records.push(Record::Event(Box::new(ev)));
        records.extend(verdicts.into_iter().map(|v| Record::Verdict(Box::new(v))));
        Processed {
            records,
            needs_facts,
        }
    }

    pub fn tick(&mut self, now: SystemTime) -> Vec<Record> {
        self.diagnoser
            .tick(now, &self.facts)
            .into_iter()
            .map(|v| Record::Verdict(Box::new(v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        net::{IpAddr, Ipv4Addr},
        time::{Duration, UNIX_EPOCH},
    };

    use super::*;
    use crate::{
        diagnosis::{Cause, NetnsFacts},
        model::{Endpoint, EventKind},
    };

    fn connect_error(netns: u32) -> Event {
        let mut ev = Event::new(
            UNIX_EPOCH + Duration::from_secs(100),
            EventKind::ConnectError,
            Endpoint::new(IpAddr::V4(Ipv4Addr::new(10, 244, 0, 2)), 0),
            Endpoint::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80),
            netns,
        );
        ev.errno = Some("EADDRNOTAVAIL".into());
        ev.state = Some("CLOSE".into());
        ev.old_state = Some("SYN_SENT".into());
        ev
    }

    #[test]
    fn names_the_namespace_and_asks_for_facts_once() {
        let mut p = Pipeline::new(DiagnoserConfig::default());
        p.set_facts(
            NodeFacts::default(),
            HashMap::from([(7, "pod-a".to_string())]),
        );
        let first = p.event(connect_error(7));
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
        assert!(!p.event(connect_error(7)).needs_facts, "asked once");

        let mut facts = NodeFacts::default();
        facts.netns.insert(7, NetnsFacts::default());
        p.set_facts(facts, HashMap::new());
        assert!(!p.event(connect_error(7)).needs_facts);
    }
}
