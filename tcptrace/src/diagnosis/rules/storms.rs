//! Storms the kernel counts: a first record, then counts of its repeats,
//! added to the verdict the first record went to.

use super::*;

impl Diagnoser {
    /// Remembers where storms' first resets went once their connections
    /// are accounted: the storm's repeats go there too, even when the
    /// client's end is accounted anew later.
    pub(super) fn note_storm_accounts(&mut self) {
        if self.storm_resets.is_empty() {
            return;
        }
        let mut waiting = std::mem::take(&mut self.storm_resets);
        waiting.retain(
            |(storm, client, netns)| match self.ledger.accounted(*client, *netns) {
                Some(account) => {
                    if self.storm_accounts.len() < self.cfg.max_keys {
                        self.storm_accounts.insert(*storm, account);
                    }
                    false
                }
                None => true,
            },
        );
        self.storm_resets = waiting;
    }

    /// `n` repeats of `first`'s failure, counted by the kernel in a storm:
    /// each adds to the verdict `first` went to, as it would have one by
    /// one (a refused connect counts and brings its reset; the reset that
    /// refused it goes where the first one's went). Repeats of a reset whose
    /// connection is not accounted for yet wait for its account.
    pub fn repeats(&mut self, first: &Event, n: u64, now: SystemTime) -> Diagnosed {
        if !self.add_repeats(first, n, now) {
            if self.repeats_waiting.len() >= self.cfg.max_keys {
                // The oldest waited longest: the least likely to find a verdict.
                if let Some((_, lost, _)) = self.repeats_waiting.pop_front() {
                    self.repeats_unattributed += lost;
                }
            }
            self.repeats_waiting.push_back((first.clone(), n, now));
        }
        let out = std::mem::take(&mut self.due);
        self.take_output(out)
    }

    /// A storm whose first record had no repeats: nothing will ask where
    /// it went.
    pub fn storm_done(&mut self, storm: &StormId) {
        self.storm_accounts.remove(storm);
        self.storm_resets.retain(|(f, _, _)| f != storm);
    }

    /// Adds `first`'s repeats to its verdict; false when that is not known
    /// yet.
    pub(super) fn add_repeats(&mut self, first: &Event, n: u64, now: SystemTime) -> bool {
        let of = |cause| VerdictKey::new(first.pod.as_ref(), first.netns, cause, &first.dst);
        let (key, count, resets) = match first.kind {
            EventKind::ResetReceived => {
                // Where the first went; without its account (the bound was
                // reached), the turned-away connect's verdict there is.
                let went = first
                    .storm
                    .and_then(|f| self.storm_accounts.get(&f))
                    .map(|(key, _)| key.clone())
                    .or_else(|| {
                        [
                            Cause::ConnectionRefused,
                            Cause::FirewallReject,
                            Cause::ServiceNoEndpoints,
                        ]
                        .into_iter()
                        .map(of)
                        .find(|k| self.aggs.contains_key(k))
                    });
                (went.unwrap_or_else(|| of(Cause::ConnectionRefused)), n, n)
            }
            EventKind::ConnectError => (of(Cause::PortExhaustion), n, 0),
            EventKind::BindError if first.src.port == 0 => (of(Cause::PortExhaustion), n, 0),
            EventKind::BindError => (of(Cause::BindConflict), n, 0),
            EventKind::ResetSent => {
                let Some((key, from_this_reset)) = first
                    .storm
                    .and_then(|f| self.storm_accounts.get(&f).cloned())
                else {
                    return false;
                };
                // A verdict made from the reset itself (its client is not
                // traced here): each reset is one more refused connect.
                (key, if from_this_reset { n } else { 0 }, n)
            }
            // The kernel counts no other kind: nothing would take them.
            _ => {
                self.repeats_unattributed += n;
                return true;
            }
        };
        let live_interval = self.cfg.live_interval;
        let reemit = self.cfg.reemit_interval;
        let Some(a) = self.aggs.get_mut(&key) else {
            return false;
        };
        if let Some(storm) = first.storm {
            self.storm_accounts.remove(&storm);
        }
        a.v.count += count;
        a.v.resets += resets;
        a.v.last_seen = a.v.last_seen.max(now);
        a.v.time = now;
        if let Some(v) = a.occurred(now, reemit, live_interval, &mut self.live) {
            self.due.push(v);
        }
        true
    }

    /// Where a storm's first record went, for its repeats.
    pub(super) fn note_storm_first(&mut self, ev: &Event, c: &Candidate) {
        if let Some(storm) = ev.storm
            && self.storm_accounts.len() < self.cfg.max_keys
        {
            self.storm_accounts.insert(storm, (c.v.key(), true));
        }
    }
}
