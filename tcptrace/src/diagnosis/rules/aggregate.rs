//! One verdict per pod, cause and destination: occurrences counted, the
//! record stream re-emitted at most every interval, the live sinks kept
//! current.

use super::*;

pub(super) struct Agg {
    pub(super) v: Verdict,
    pub(super) last_emitted: SystemTime,
    pub(super) pending: bool,
    /// When the live sinks last saw it, and whether they are behind.
    pub(super) live_shown: SystemTime,
    pub(super) live_behind: bool,
}

impl Agg {
    /// After a new occurrence (or a count) at `now`: the verdict for the
    /// record stream when its re-emission interval passed, else shown to
    /// the live sinks (at once, or at the next tick).
    pub(super) fn occurred(
        &mut self,
        now: SystemTime,
        reemit: Duration,
        live_interval: Duration,
        live: &mut Vec<Verdict>,
    ) -> Option<Verdict> {
        self.pending = true;
        if elapsed(self.last_emitted, now) >= reemit {
            self.pending = false;
            self.last_emitted = now;
            self.live_shown = now;
            self.live_behind = false;
            self.v.time = now;
            return Some(self.v.clone());
        }
        note_live(self, now, live_interval, live);
        None
    }
}

impl Diagnoser {
    pub(super) fn take_output(&mut self, verdicts: Vec<Verdict>) -> Diagnosed {
        Diagnosed {
            verdicts,
            live: std::mem::take(&mut self.live),
        }
    }

    /// Adds resets that belong to an accounted connection to its verdict.
    pub(super) fn add_resets(&mut self, key: &VerdictKey, n: u64, time: SystemTime) {
        let live_interval = self.cfg.live_interval;
        match self.aggs.get_mut(key) {
            Some(a) => {
                a.v.resets += n;
                a.pending = true;
                note_live(a, time, live_interval, &mut self.live);
            }
            // Its verdict was evicted and written already.
            None => self.resets_unaccounted += n,
        }
    }

    /// Counts another occurrence of an aggregated verdict about `ev` that
    /// already has `confidence`, without building it again: the verdict
    /// keeps its first occurrence as the example (its summary, source and
    /// process agree). False when there is no such verdict.
    pub(super) fn repeat(
        &mut self,
        ev: &Event,
        origin: Origin,
        cause: Cause,
        confidence: Confidence,
    ) -> bool {
        let key = VerdictKey::new(ev.pod.as_ref(), ev.netns, cause, &ev.dst);
        if self
            .aggs
            .get(&key)
            .is_none_or(|a| a.v.confidence != confidence)
        {
            return false;
        }
        let resets = self.ledger.account(origin, key.clone(), ev.time);
        let live_interval = self.cfg.live_interval;
        let Some(a) = self.aggs.get_mut(&key) else {
            return false;
        };
        a.v.resets += resets;
        a.v.count += 1;
        a.v.last_seen = a.v.last_seen.max(ev.time);
        a.v.first_seen = a.v.first_seen.min(ev.time);
        a.v.time = ev.time;
        if let Some(v) = a.occurred(
            ev.time,
            self.cfg.reemit_interval,
            live_interval,
            &mut self.live,
        ) {
            self.due.push(v);
        }
        true
    }

    /// Aggregates a candidate, which accounts for the connection of
    /// `origin`; returns it when its key is due.
    pub(super) fn submit(&mut self, c: Candidate, origin: Option<Origin>) -> Option<Verdict> {
        let Candidate { mut v, occurrence } = c;
        let now = v.time;
        let key = v.key();
        // A degraded connection may still fail: its verdict accounts for
        // none of its resets and errors.
        if let Some(origin) = origin
            && v.severity != Severity::Degraded
        {
            v.resets += self.ledger.account(origin, key.clone(), now);
        }
        if !self.aggs.contains_key(&key) {
            if self.aggs.len() >= self.cfg.max_keys {
                // Counts not yet in the stream leave with their verdict.
                for a in evict_oldest(&mut self.aggs, |a| Some(a.v.last_seen)) {
                    if a.pending {
                        self.due.push(Verdict { time: now, ..a.v });
                    }
                }
            }
            self.aggs.insert(
                key,
                Agg {
                    v: v.clone(),
                    last_emitted: v.time,
                    pending: false,
                    live_shown: v.time,
                    live_behind: false,
                },
            );
            return Some(v);
        }
        let live_interval = self.cfg.live_interval;
        let a = self.aggs.get_mut(&key)?;
        if occurrence {
            a.v.count += 1;
        }
        a.v.resets += v.resets;
        a.v.last_seen = a.v.last_seen.max(v.last_seen);
        a.v.first_seen = a.v.first_seen.min(v.first_seen);
        if v.confidence >= a.v.confidence {
            let (count, resets, first, last) =
                (a.v.count, a.v.resets, a.v.first_seen, a.v.last_seen);
            a.v = Verdict {
                count,
                resets,
                first_seen: first,
                last_seen: last,
                ..v
            };
        }
        a.occurred(now, self.cfg.reemit_interval, live_interval, &mut self.live)
    }
}

/// Shows an aggregate's new count to the live sinks now, or at the next
/// tick when it was shown less than `interval` ago.
fn note_live(a: &mut Agg, now: SystemTime, interval: Duration, live: &mut Vec<Verdict>) {
    if elapsed(a.live_shown, now) >= interval {
        a.live_shown = now;
        a.live_behind = false;
        live.push(a.v.clone());
    } else {
        a.live_behind = true;
    }
}

/// A stand-in event with a verdict's ends and namespace, to tell which
/// end is the client.
pub(super) fn event_of(v: &Verdict) -> Event {
    Event::new(
        v.time,
        EventKind::StateChange,
        v.src.clone(),
        v.dst.clone(),
        v.netns,
    )
}
