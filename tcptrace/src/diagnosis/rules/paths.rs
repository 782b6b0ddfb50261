//! What happened to a connection's packets on the way: dropped by
//! netfilter (a rule, a NAT out of ports), rejected, too big for a link.

use super::*;

impl Diagnoser {
    /// A connect turned away (a reset, or an ICMP error): rejected by a
    /// netfilter rule that dropped its SYN, refused by the server, or
    /// unreachable.
    pub(super) fn refused(
        &mut self,
        key: &SockKey,
        ev: &Event,
        facts: &NodeFacts,
        how: Refusal,
    ) -> Vec<Candidate> {
        // A reset in SYN_SENT ends a connect: what this socket address
        // concluded before was another connection (the kernel reuses both
        // socket memory and, in a small port range, the client's port).
        let s = self.sock(key, ev.time, how == Refusal::Reset);
        if s.concluded.is_some() {
            return vec![];
        }
        let ends = Ends::of(ev, Some(facts));
        if let Some(drop) = self.rejecting_drop(ends, ev.time) {
            // The rule that rejected it is read right after its namespace's
            // first drop: wait for it (at most REJECT_RULES_WAIT).
            if facts
                .netns
                .get(&drop.netns)
                .is_none_or(|f| f.drop_rules.is_none())
                && self.rejections.len() < MAX_RECENT
            {
                self.placeholder(key);
                self.rejections.push_back((ev.clone(), how, ev.time));
                return vec![];
            }
            let c = self.rejection(ev, how, facts);
            self.conclude(key, &c);
            return vec![c];
        }
        let c = match how {
            Refusal::Reset => {
                let listener = self.listener_reset(ends, ev.time);
                let confidence = if listener {
                    Confidence::Certain
                } else {
                    Confidence::Possible
                };
                // A refused storm repeats one verdict: count it without rebuilding.
                let origin = Origin::of(ev, ends);
                if self.repeat(ev, origin, Cause::ConnectionRefused, confidence) {
                    if let Some(s) = self.socks.get_mut(key) {
                        s.concluded = Some((Cause::ConnectionRefused, confidence));
                    }
                    return vec![];
                }
                connection_refused(ev, listener)
            }
            Refusal::Icmp(errno) => unreachable(ev, errno, self.path_drop(ends, ev.time)),
            Refusal::Unseen => return vec![],
        };
        self.note_storm_first(ev, &c);
        self.conclude(key, &c);
        vec![c]
    }

    /// The rejection verdict of a connect whose SYN a netfilter rule
    /// dropped, with that namespace's rule when it was read.
    pub(super) fn rejection(&mut self, ev: &Event, how: Refusal, facts: &NodeFacts) -> Candidate {
        let ends = Ends::of(ev, Some(facts));
        let listener = self.listener_reset(ends, ev.time);
        let mut drop = self
            .rejecting_drop(ends, ev.time)
            .cloned()
            .unwrap_or_else(|| PathDrop::unknown(ev));
        let rules = facts
            .netns
            .get(&drop.netns)
            .and_then(|f| f.drop_rules.as_deref())
            .unwrap_or_default();
        drop.rule = matching_reject_rule(rules, &drop.dst, &ev.dst);
        let c = if drop.rule.is_none() && how == Refusal::Unseen {
            // Nothing came back that the client reported, and no rule
            // rejects: its SYN was dropped.
            drop.rule = matching_rule(rules, &drop.dst);
            netfilter_drop(ev, &drop, 0)
        } else {
            rejected(ev, &drop, how, listener)
        };
        self.note_storm_first(ev, &c);
        c
    }

    /// The first SYN netfilter dropped in the node of `ev`'s namespace
    /// within moments of `sent` (the same softirq carries a SYN from the
    /// pod to its drop), whatever its addresses after NAT.
    pub(super) fn syn_drop_after(
        &self,
        sent: SystemTime,
        ev: &Event,
        facts: &NodeFacts,
    ) -> Option<PathDrop> {
        let node = facts.node_for(ev.netns);
        let d = self.syn_drops.iter().find(|d| {
            d.time >= sent
                && elapsed(sent, d.time) <= NAT_DROP_LATENCY
                && node.is_none_or(|n| n == d.netns)
                && d.netns != ev.netns
        })?;
        Some(PathDrop {
            reason: Reason::NetfilterDrop,
            netns: d.netns,
            place: d
                .pod
                .as_ref()
                .map(|p| format!("pod {p}"))
                .or_else(|| d.netns_name.as_ref().map(|n| format!("netns {n}"))),
            location: d.location.clone(),
            drops: 1,
            src: d.src.clone(),
            dst: d.dst.clone(),
            flags: d.tcp_flags,
            rule: None,
        })
    }

    /// A netfilter drop of this connection's packets near `time`.
    pub(super) fn rejecting_drop(&self, ends: Ends, time: SystemTime) -> Option<&PathDrop> {
        self.path_drop(ends, time)
            .filter(|d| d.reason == Reason::NetfilterDrop)
    }

    /// A SYN-ACK for this connection that this node's kernel answered
    /// with a reset (no socket for it): the SYN was answered, but the
    /// answer came from an address the client did not connect to.
    pub(super) fn answer_reset_here(&self, ends: Ends, time: SystemTime) -> Option<Event> {
        let window = self.cfg.correlation_window;
        self.resets_sent
            .iter()
            .rev()
            .find(|r| {
                r.tcp_flags
                    .is_some_and(|f| f.contains(TcpFlags::SYN | TcpFlags::ACK))
                    && within(r.time, time, window)
                    && Ends::of(r, None).client == ends.client
            })
            .cloned()
    }

    /// Whether a socket lookup on this node found no listener for this
    /// connection's SYN (its reset, NO_SOCKET, answering a bare SYN).
    pub(super) fn listener_reset(&self, ends: Ends, time: SystemTime) -> bool {
        let window = self.cfg.correlation_window;
        self.resets_sent.iter().rev().any(|r| {
            is_bare_syn(r.tcp_flags)
                && within(r.time, time, window)
                && Ends::of(r, None).client == ends.client
        })
    }

    /// Segments of this connection dropped on the path as too big for a
    /// link, also after its streak's first retransmit: the retransmits
    /// kept the size (an ICMP "fragmentation needed" that arrived would
    /// have shrunk them, and no drop would follow).
    pub(super) fn too_big(
        &self,
        key: &SockKey,
        ends: Ends,
        ev: &Event,
        retransmits: u32,
    ) -> Option<Candidate> {
        let first = self.socks.get(key)?.streak_first_at?;
        let (at, drop) = self.path_drops.get(&ends.client)?;
        if drop.reason != Reason::PktTooBig
            || *at <= first
            || !within(*at, ev.time, self.cfg.correlation_window)
        {
            return None;
        }
        Some(pmtu_black_hole(ev, drop, retransmits))
    }

    /// Remembers a segment dropped on its connection's path, by the
    /// connection's client end (the same before and after NAT), with where
    /// and why.
    pub(super) fn note_path_drop(&mut self, ev: &Event, ends: Ends) {
        let reason = ev
            .reason
            .clone()
            .unwrap_or_else(|| Reason::Other(String::new()));
        if self.path_drops.len() >= self.cfg.max_socks {
            let window = self.cfg.correlation_window;
            let now = ev.time;
            self.path_drops.retain(|_, (t, _)| within(*t, now, window));
            if self.path_drops.len() >= self.cfg.max_socks {
                return;
            }
        }
        let place = ev
            .pod
            .as_ref()
            .map(|p| format!("pod {p}"))
            .or_else(|| ev.netns_name.as_ref().map(|n| format!("netns {n}")));
        // A drop elsewhere, or for another reason, replaces what was noted.
        if self
            .path_drops
            .get(&ends.client)
            .is_some_and(|(_, d)| d.reason != reason || d.netns != ev.netns)
        {
            self.path_drops.remove(&ends.client);
        }
        let entry = self.path_drops.entry(ends.client).or_insert_with(|| {
            (
                ev.time,
                PathDrop {
                    reason,
                    netns: ev.netns,
                    place,
                    location: ev.location.clone(),
                    drops: 0,
                    src: ev.src.clone(),
                    dst: ev.dst.clone(),
                    flags: ev.tcp_flags,
                    rule: None,
                },
            )
        });
        entry.0 = ev.time;
        entry.1.drops += 1;
        entry.1.flags = ev.tcp_flags;
    }

    /// A retransmit of a connection whose segments netfilter dropped: by
    /// a dropping rule, by a rejecting one whose answer did not end the
    /// connect, or (no rule) by a source NAT out of ports. Waits for the
    /// namespace's rules for a few retransmits.
    /// `syn_at`: when the connection's last SYN left, to find its drop by
    /// time when a source NAT rewrote it.
    pub(super) fn dropped_by_firewall(
        &mut self,
        ev: &Event,
        ends: Ends,
        retransmits: u32,
        facts: &NodeFacts,
        syn_at: Option<SystemTime>,
    ) -> Option<Candidate> {
        // A full conntrack table dropped it: that verdict is the table's.
        let window = self.cfg.correlation_window;
        if self
            .full_table_drops
            .iter()
            .any(|(d, _)| same_conn(d, ev) && within(d.time, ev.time, window))
        {
            return None;
        }
        let mut drop = match self.rejecting_drop(ends, ev.time) {
            Some(d) => d.clone(),
            None => self.syn_drop_after(syn_at?, ev, facts)?,
        };
        let ns = facts.netns.get(&drop.netns);
        let rules = ns.and_then(|f| f.drop_rules.as_deref());
        if rules.is_none() && retransmits < RULES_WAIT_RETRANSMITS {
            return None;
        }
        let rules = rules.unwrap_or_default();
        if let Some(reject) = matching_reject_rule(rules, &drop.dst, &ev.dst)
            .filter(|r| r.target() == Some(RuleTarget::Reject))
        {
            drop.rule = Some(reject);
            let listener = self.listener_reset(ends, ev.time);
            return Some(rejected(ev, &drop, Refusal::Unseen, listener));
        }
        drop.rule = matching_rule(rules, &drop.dst);
        // kube-proxy's own MASQUERADE is on every node: a rule that maps
        // to a port range of its own is the likelier one to run out.
        let snats = || {
            rules
                .iter()
                .filter(|r| r.target() == Some(RuleTarget::Snat))
        };
        let snat = snats()
            .find(|r| r.snat_ports().is_some())
            .or_else(|| snats().next());
        if drop.rule.is_none()
            && let Some(snat) = snat
        {
            let trend = self
                .trends
                .get(&drop.netns)
                .filter(|t| within(t.at, ev.time, self.cfg.correlation_window))
                .copied();
            let ct = ns.and_then(|f| f.ct.as_ref());
            return Some(snat_port_exhaustion(
                ev,
                &drop,
                Some(snat),
                ct,
                trend,
                retransmits,
            ));
        }
        Some(netfilter_drop(ev, &drop, retransmits))
    }

    /// Where the packets of the connection with these ends were last seen
    /// dropped, if that was within the correlation window of `time`.
    pub(super) fn path_drop(&self, ends: Ends, time: SystemTime) -> Option<&PathDrop> {
        self.path_drops
            .get(&ends.client)
            .filter(|(at, _)| within(*at, time, self.cfg.correlation_window))
            .map(|(_, d)| d)
    }
}

/// The drop rule most likely to have dropped a segment to `dst`: the
/// first that names its address and port, its port, or (counters may be
/// from before the drop) whose counter moved; ties go to a moved counter.
pub(super) fn matching_rule(rules: &[DropRule], dst: &Endpoint) -> Option<DropRule> {
    let words = |r: &DropRule| -> Vec<String> {
        r.text
            .split(|c: char| !c.is_ascii_digit() && c != '.' && c != ':')
            .map(|w| w.trim_matches(['.', ':']).to_string())
            .collect()
    };
    let (ip, port) = (dst.ip.to_string(), dst.port.to_string());
    let score = |r: &DropRule| {
        let w = words(r);
        let names_ip = w.contains(&ip);
        let names_port = r
            .text
            .split(|c: char| !c.is_ascii_digit())
            .any(|w| w == port);
        let counted = r.packets.is_some_and(|n| n > 0);
        (u8::from(names_ip && names_port) * 4) + u8::from(names_port) * 2 + u8::from(counted)
    };
    rules
        .iter()
        .filter(|r| matches!(r.target(), Some(RuleTarget::Drop | RuleTarget::Reject)))
        .map(|r| (score(r), r))
        .filter(|(score, _)| *score > 0)
        .rev()
        .max_by_key(|(score, _)| *score)
        .map(|(_, r)| r.clone())
}

/// The rule that rejected a connect to `dst` (`dropped_dst` after NAT):
/// kube-proxy's rule for that Service port without endpoints, else a
/// rejecting rule as [`matching_rule`] finds one.
pub(super) fn matching_reject_rule(
    rules: &[DropRule],
    dropped_dst: &Endpoint,
    dst: &Endpoint,
) -> Option<DropRule> {
    let same = |e: &Endpoint, ip, port| e.ip == ip && e.port == port;
    rules
        .iter()
        .find(|r| {
            r.no_endpoints()
                .is_some_and(|n| same(dropped_dst, n.ip, n.port) || same(dst, n.ip, n.port))
        })
        .cloned()
        .or_else(|| {
            let rejects: Vec<DropRule> = rules
                .iter()
                .filter(|r| r.target() == Some(RuleTarget::Reject) && r.no_endpoints().is_none())
                .cloned()
                .collect();
            matching_rule(&rejects, dropped_dst)
        })
}

/// Errors an ICMP message (or a missing route) raises on a connecting
/// socket; a received reset's ECONNREFUSED is not reported as an error.
pub(super) fn is_icmp_error(e: Errno) -> bool {
    matches!(
        e,
        Errno::ECONNREFUSED | Errno::EHOSTUNREACH | Errno::ENETUNREACH
    )
}

/// SYN retransmits a netfilter drop's verdict waits for the rules of the
/// namespace that dropped (read right after its first drop).
pub(super) const RULES_WAIT_RETRANSMITS: u32 = 3;

/// How long after a SYN leaves its pod a NAT drop of it is seen.
pub(super) const NAT_DROP_LATENCY: Duration = Duration::from_millis(50);

/// How long a rejected connect's verdict waits for those rules.
pub(super) const REJECT_RULES_WAIT: Duration = Duration::from_secs(3);
