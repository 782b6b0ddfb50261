//! Causes read from a namespace's counters between ticks (conntrack,
//! listen queues), and a full table seen at a dropped SYN.

use super::*;

impl Diagnoser {
    pub(super) fn netfilter_drop(&mut self, ev: &Event, facts: &NodeFacts) -> Vec<Candidate> {
        if ev.reason != Some(Reason::NetfilterDrop) || !is_bare_syn(ev.tcp_flags) {
            return vec![];
        }
        let netns = if facts.netns.get(&ev.netns).is_some_and(|f| f.ct.is_some()) {
            Some(ev.netns)
        } else {
            facts.node_for(ev.netns)
        };
        let Some((ns, ct)) = netns.and_then(|ns| Some((ns, facts.netns.get(&ns)?.ct.as_ref()?)))
        else {
            return vec![];
        };
        let trend = self
            .trends
            .get(&ns)
            .filter(|t| within(t.at, ev.time, self.cfg.correlation_window))
            .copied();
        let Some(c) = table_full(ev, ct, trend, facts, ns) else {
            return vec![];
        };
        if self.full_table_drops.len() >= MAX_RECENT {
            self.full_table_drops.pop_front();
        }
        self.full_table_drops.push_back((ev.clone(), c.clone()));
        vec![Candidate {
            v: c,
            occurrence: true,
        }]
    }

    /// Counter deltas between ticks: table-full drops on their own, the
    /// invalid counter confirming reset pairs, listen queue overflows.
    pub(super) fn counter_rules(
        &mut self,
        now: SystemTime,
        facts: &NodeFacts,
        name: &mut dyn FnMut(&mut Event),
    ) -> Vec<Candidate> {
        self.prev_ct.retain(|ns, _| facts.netns.contains_key(ns));
        let mut out = self.listen_rules(now, facts, name);
        let mut nss: Vec<(&u32, &ConntrackFacts)> = facts
            .netns
            .iter()
            .filter_map(|(ns, f)| Some((ns, f.ct.as_ref()?)))
            .collect();
        nss.sort_by_key(|(ns, _)| **ns);
        for (&ns, ct) in nss {
            let Some(prev) = self.prev_ct.insert(ns, ct.stats) else {
                continue;
            };
            let t = CtTrend {
                at: now,
                invalid: ct.stats.invalid.saturating_sub(prev.invalid),
                drop: ct.stats.drop.saturating_sub(prev.drop),
                early_drop: ct.stats.early_drop.saturating_sub(prev.early_drop),
                insert_failed: ct.stats.insert_failed.saturating_sub(prev.insert_failed),
            };
            if t.invalid + t.drop + t.early_drop + t.insert_failed == 0 {
                continue;
            }
            self.trends.insert(ns, t);
            if t.drop > 0 {
                let mut ev = namespace_event(now, ns);
                name(&mut ev);
                if let Some(v) = table_full(&ev, ct, Some(t), facts, ns) {
                    out.push(Candidate {
                        v,
                        occurrence: true,
                    });
                }
            }
        }
        // Each waiting reset is confirmed by the counter of its own node.
        let window = self.cfg.correlation_window;
        let pairs = std::mem::take(&mut self.pairs_awaiting_counter);
        for (rr, sent) in pairs {
            if !within(rr.time, now, window) {
                continue;
            }
            match self.invalid_rise(facts, rr.netns, now) {
                Some(delta) => {
                    let mut invalid = self.invalid_evidence(facts, &rr);
                    invalid.delta = Some(delta);
                    let mut c = conntrack_invalid(&rr, Some(&sent), &invalid, facts);
                    c.occurrence = false;
                    out.push(c);
                }
                None => self.pairs_awaiting_counter.push_back((rr, sent)),
            }
        }
        let waiting: Vec<Event> = self.resets_awaiting_pair.iter().cloned().collect();
        for rr in waiting {
            let Some(delta) = self.invalid_rise(facts, rr.netns, now) else {
                continue;
            };
            let key = SockKey::of(&rr);
            let known = self.socks.get(&key).is_some_and(|s| s.concluded.is_some());
            if !known && within(rr.time, now, window) {
                let mut invalid = self.invalid_evidence(facts, &rr);
                invalid.delta = Some(delta);
                let c = conntrack_invalid(&rr, None, &invalid, facts);
                self.conclude(&key, &c);
                out.push(c);
            }
        }
        out
    }

    /// Listen queue overflows between ticks, per namespace: connections its
    /// listeners dropped (the kernel counts them; no packet is reported).
    pub(super) fn listen_rules(
        &mut self,
        now: SystemTime,
        facts: &NodeFacts,
        name: &mut dyn FnMut(&mut Event),
    ) -> Vec<Candidate> {
        self.prev_listen
            .retain(|ns, _| facts.netns.contains_key(ns));
        let mut out = Vec::new();
        let mut nss: Vec<(&u32, &NetnsFacts)> = facts.netns.iter().collect();
        nss.sort_by_key(|(ns, _)| **ns);
        for (&ns, f) in nss {
            let Some(stats) = f.listen else { continue };
            let Some(prev) = self.prev_listen.insert(ns, stats) else {
                continue;
            };
            let overflows = stats.overflows.saturating_sub(prev.overflows);
            if overflows == 0 {
                continue;
            }
            let drops = stats.drops.saturating_sub(prev.drops);
            let mut ev = namespace_event(now, ns);
            name(&mut ev);
            let c = listen_overflow(&ev, overflows, drops, &f.queued_listeners);
            push_bounded(
                &mut self.overflows,
                Overflow {
                    at: now,
                    verdict: c.v.clone(),
                    listeners: f.queued_listeners.iter().map(|l| (l.ip, l.port)).collect(),
                },
            );
            out.push(c);
        }
        out
    }
}

/// A namespace's listeners overflowed: when it was seen, its verdict and
/// the addresses of the listeners that had connections waiting.
pub(super) struct Overflow {
    pub(super) at: SystemTime,
    pub(super) verdict: Verdict,
    pub(super) listeners: Vec<(IpAddr, u16)>,
}

/// A stand-in event for a namespace's counters (attribution names it).
pub(super) fn namespace_event(now: SystemTime, netns: u32) -> Event {
    let mut ev = Event::new(
        now,
        EventKind::Drop,
        Endpoint::unspecified(),
        Endpoint::unspecified(),
        netns,
    );
    ev.identity_level = IdentityLevel::Netns;
    ev
}
