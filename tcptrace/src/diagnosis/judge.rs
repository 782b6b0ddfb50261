//! Confidence is earned. Each cause's builder states, in one place, the
//! evidence the cause requires, the evidence that corroborates it and the
//! evidence that rules it out, checked on one occurrence: `certain` when
//! all of it was seen and nothing ruled it out, `likely` when only a
//! corroboration is still missing, `possible` (with the look-alikes named)
//! when required evidence is missing. What was checked goes into the
//! verdict's evidence, so a reader sees why it is as sure as it says.
use serde_json::{Map, Value, json};

use crate::model::{Cause, Confidence};

#[derive(Debug, Default)]
pub(super) struct Checks {
    seen: Vec<&'static str>,
    missing: Vec<&'static str>,
    pending: Vec<&'static str>,
    against: Vec<&'static str>,
    alternatives: Vec<Cause>,
}

impl Checks {
    pub(super) fn new() -> Self {
        Self::default()
    }

    /// Evidence the cause cannot be certain without.
    pub(super) fn require(mut self, what: &'static str, seen: bool) -> Self {
        if seen {
            self.seen.push(what);
        } else {
            self.missing.push(what);
        }
        self
    }

    /// Evidence that confirms the cause; without it the cause is likely.
    pub(super) fn corroborate(mut self, what: &'static str, seen: bool) -> Self {
        if seen {
            self.seen.push(what);
        } else {
            self.pending.push(what);
        }
        self
    }

    /// Evidence that, when seen, means this is not the cause.
    pub(super) fn rule_out(mut self, what: &'static str, seen: bool) -> Self {
        if seen {
            self.against.push(what);
        }
        self
    }

    /// The look-alikes that fit too while the cause is not certain.
    pub(super) fn or(mut self, alternatives: &[Cause]) -> Self {
        self.alternatives.extend_from_slice(alternatives);
        self
    }

    /// Whether evidence against the cause was seen.
    pub(super) fn ruled_out(&self) -> bool {
        !self.against.is_empty()
    }

    pub(super) fn confidence(&self) -> Confidence {
        if !self.missing.is_empty() || self.ruled_out() {
            Confidence::Possible
        } else if !self.pending.is_empty() {
            Confidence::Likely
        } else {
            Confidence::Certain
        }
    }

    /// Records what was checked in a verdict's evidence (`checks`).
    pub(super) fn record(&self, evidence: &mut Map<String, Value>) {
        let mut c = json!({ "seen": self.seen });
        if !self.missing.is_empty() {
            c["missing"] = json!(self.missing);
        }
        if !self.pending.is_empty() {
            c["not_yet_seen"] = json!(self.pending);
        }
        if !self.against.is_empty() {
            c["against"] = json!(self.against);
        }
        if self.confidence() != Confidence::Certain && !self.alternatives.is_empty() {
            c["alternatives"] = json!(
                self.alternatives
                    .iter()
                    .map(|c| c.as_str())
                    .collect::<Vec<_>>()
            );
        }
        evidence.insert("checks".into(), c);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn certain_only_with_everything_seen_and_nothing_against() {
        let all = Checks::new()
            .require("a", true)
            .corroborate("b", true)
            .rule_out("c", false);
        assert_eq!(all.confidence(), Confidence::Certain);
        let pending = Checks::new().require("a", true).corroborate("b", false);
        assert_eq!(pending.confidence(), Confidence::Likely);
        let missing = Checks::new()
            .require("a", false)
            .corroborate("b", true)
            .or(&[Cause::FirewallReject]);
        assert_eq!(missing.confidence(), Confidence::Possible);
        let mut e = Map::new();
        missing.record(&mut e);
        assert_eq!(
            Value::Object(e),
            json!({"checks": {"seen": ["b"], "missing": ["a"], "alternatives": ["firewall_reject"]}})
        );
        let against = Checks::new().require("a", true).rule_out("c", true);
        assert!(against.ruled_out());
        assert_eq!(against.confidence(), Confidence::Possible);
    }
}
