//! What diagnosis concludes: a cause, how sure, the evidence and the fix.
use std::{net::IpAddr, time::SystemTime};

use serde::{Deserialize, Serialize};

use super::{Endpoint, EventKind, IdentityLevel, PodRef};

/// Stable cause codes (documented in the schema and the README), in the
/// order of the README's table.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    strum::EnumIter,
    strum::IntoStaticStr,
    strum::EnumString,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Cause {
    IdleTimeout,
    ConntrackInvalid,
    ConntrackTableFull,
    PortExhaustion,
    BindConflict,
    NodeportCollision,
    ConnectionRefused,
    ServiceNoEndpoints,
    FirewallReject,
    Unreachable,
    SnatPortExhaustion,
    PmtuBlackHole,
    PeerLostConnection,
    SynTimeout,
    RetransmitStorm,
    KeepaliveRace,
    NetfilterDrop,
    ApplicationAbort,
    TcpStackDrop,
    ListenOverflow,
    SlowConnect,
    Unexplained,
}

impl Cause {
    /// Every cause, in the order of the README's table.
    pub fn all() -> impl Iterator<Item = Cause> {
        <Cause as strum::IntoEnumIterator>::iter()
    }

    /// The serialized cause code.
    pub fn as_str(self) -> &'static str {
        self.into()
    }

    /// How bad an occurrence is: an application's own abort is not a
    /// failure of the network.
    pub fn severity(self) -> Severity {
        match self {
            Cause::ApplicationAbort => Severity::Benign,
            Cause::RetransmitStorm | Cause::TcpStackDrop | Cause::SlowConnect => Severity::Degraded,
            _ => Severity::Failure,
        }
    }
}

/// What a verdict means for the connections it counts.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::EnumString,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Severity {
    /// Connections failed (reset, refused, timed out).
    Failure,
    /// Connections worked, slowly or with losses.
    Degraded,
    /// Expected behaviour (an application's abortive close), counted.
    Benign,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    strum::IntoStaticStr,
    strum::EnumString,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum Confidence {
    Possible,
    Likely,
    Certain,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Verdict {
    #[serde(with = "super::text::rfc3339")]
    pub time: SystemTime,
    pub cause: Cause,
    pub confidence: Confidence,
    /// The cause's severity (`failure`, `degraded`, `benign`).
    pub severity: Severity,
    pub pod: Option<PodRef>,
    pub identity_level: IdentityLevel,
    pub netns: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_name: Option<String>,
    /// As on events: the node, when several share the kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    pub src: Endpoint,
    /// Absent when the verdict has no destination (a bind, a namespace's
    /// counters).
    #[serde(
        default = "Endpoint::unspecified",
        skip_serializing_if = "Endpoint::is_unspecified"
    )]
    pub dst: Endpoint,
    /// One-line explanation for people.
    pub summary: String,
    /// The numbers that prove the cause (idle_ms, keepalive_time_ms, ...).
    pub evidence: serde_json::Map<String, serde_json::Value>,
    /// A concrete action with values computed from the evidence.
    pub fix: String,
    /// Occurrences aggregated into this verdict (same pod, cause, destination).
    pub count: u64,
    /// Reset segments (sent and received, on this node) these occurrences
    /// account for.
    #[serde(default)]
    pub resets: u64,
    #[serde(with = "super::text::rfc3339")]
    pub first_seen: SystemTime,
    #[serde(with = "super::text::rfc3339")]
    pub last_seen: SystemTime,
}

impl Confidence {
    /// The serialized confidence name.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// Who an aggregated verdict is about: the pod (by uid: attribution may
/// know no more of it), else the network namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Owner {
    Pod(String),
    Netns(u32),
}

/// What makes two verdicts the same verdict: owner, cause, destination
/// and, for `unexplained`, the kind of event. The diagnosis aggregates by
/// it and every sink counts by it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VerdictKey {
    pub owner: Owner,
    pub cause: Cause,
    pub dst: (IpAddr, u16),
    pub kind: Option<EventKind>,
}

impl VerdictKey {
    /// The key of a verdict about a subject (`pod`, else `netns`).
    pub fn new(pod: Option<&PodRef>, netns: u32, cause: Cause, dst: &Endpoint) -> Self {
        Self {
            owner: match pod {
                Some(p) => Owner::Pod(p.uid.clone()),
                None => Owner::Netns(netns),
            },
            cause,
            dst: (dst.ip, dst.port),
            kind: None,
        }
    }
}

impl Verdict {
    /// The kind of event an `unexplained` verdict is about (its evidence's
    /// `kind`, the only place it is read back).
    pub fn unexplained_kind(&self) -> Option<EventKind> {
        (self.cause == Cause::Unexplained)
            .then(|| self.evidence.get("kind")?.as_str()?.parse().ok())
            .flatten()
    }

    pub fn key(&self) -> VerdictKey {
        VerdictKey {
            kind: self.unexplained_kind(),
            ..VerdictKey::new(self.pod.as_ref(), self.netns, self.cause, &self.dst)
        }
    }
}
