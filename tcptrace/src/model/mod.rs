//! Plain data that flows from the decoder through attribution and diagnosis
//! to the sinks. Serialized as the NDJSON contract (`schema/tcptrace.schema.json`).
use std::{
    net::{IpAddr, Ipv4Addr},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

pub mod facts;
mod kernel;
mod probe;
mod reason;
mod text;
mod verdict;

pub use kernel::{Errno, PortRange, SockPtr, TcpFlags, TcpState};
pub use probe::{ProbeState, ProbeStatus, TickRate, TickSource, Tier};
pub use reason::Reason;
pub use text::rfc3339;
pub use verdict::{Cause, Confidence, Owner, Severity, Verdict, VerdictKey};

/// One NDJSON line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Event(Box<Event>),
    Verdict(Box<Verdict>),
    Stats(Stats),
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
    strum::EnumIter,
    strum::IntoStaticStr,
    strum::EnumString,
)]
#[serde(rename_all = "snake_case")]
#[strum(serialize_all = "snake_case")]
pub enum EventKind {
    Retransmit,
    SynackRetransmit,
    ResetSent,
    ResetReceived,
    StateChange,
    Drop,
    ConnectError,
    BindError,
    SocketError,
    /// conntrack marked a segment INVALID (`reason`: SEQ_OVER, ACK_OVER,
    /// STATE or RST); the segment is not necessarily dropped.
    ConntrackInvalid,
}

impl EventKind {
    /// Every kind, in the schema's order.
    pub fn all() -> impl Iterator<Item = EventKind> {
        <EventKind as strum::IntoEnumIterator>::iter()
    }

    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// A Kubernetes Service a destination belongs to, from kube-proxy's rules.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
    /// The service port name, if the rule names it ("http").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Endpoint {
    #[serde(serialize_with = "text::ip_text::serialize")]
    pub ip: IpAddr,
    pub port: u16,
    /// Set by attribution when the address is a ClusterIP/NodePort.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceRef>,
    /// Set by attribution when the address is a pod on this node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<PodRef>,
}

impl Endpoint {
    pub fn new(ip: IpAddr, port: u16) -> Self {
        Self {
            ip,
            port,
            service: None,
            pod: None,
        }
    }

    pub fn unspecified() -> Self {
        Self::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), 0)
    }

    /// No address and no port: a record without this end (a bind has no
    /// destination, a namespace's counters have no connection).
    pub fn is_unspecified(&self) -> bool {
        self.ip.is_unspecified() && self.port == 0
    }
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ip {
            IpAddr::V4(ip) => write!(f, "{ip}:{}", self.port),
            IpAddr::V6(ip) => write!(f, "[{ip}]:{}", self.port),
        }
    }
}

/// The pod an event belongs to.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub container: Option<String>,
}

/// What a person reads for a pod: `namespace/name` when the pod is known;
/// else what is (`namespace`, `uid`, `container`, a container ID cut to its
/// first 12 characters as `docker ps` and `crictl ps` show it); never an
/// empty name.
impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.namespace.as_str(), self.name.as_str()) {
            (_, "") => {}
            ("", name) => return f.write_str(name),
            (namespace, name) => return write!(f, "{namespace}/{name}"),
        }
        let mut known = Vec::new();
        if !self.namespace.is_empty() {
            known.push(format!("namespace {}", self.namespace));
        }
        if !self.uid.is_empty() {
            known.push(format!("uid {}", self.uid));
        }
        if let Some(c) = self.container.as_deref().filter(|c| !c.is_empty()) {
            let id = c.len() == 64 && c.bytes().all(|b| b.is_ascii_hexdigit());
            known.push(format!("container {}", if id { &c[..12] } else { c }));
        }
        if known.is_empty() {
            f.write_str("unknown pod")
        } else {
            f.write_str(&known.join(" "))
        }
    }
}

/// How far attribution got, best first.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityLevel {
    Pod,
    Container,
    NetnsName,
    Process,
    #[default]
    Netns,
}

/// Which end of its connection the socket's owner is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// It connected (`connect()`).
    Client,
    /// It accepted the connection (or listens).
    Server,
}

/// The peer closed its side of the connection (its FIN arrived) and the
/// socket was used again afterwards.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerFin {
    /// Time from the peer's FIN to this event.
    pub ago_ms: u64,
    /// How long the connection had been idle when the FIN arrived: the
    /// peer's idle timeout, as far as this side can tell.
    pub idle_before_ms: u64,
}

/// A storm the kernel counts: the counting generation of its first
/// record, that record's boot-time stamp and the CPU that took it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StormId {
    pub generation: u32,
    pub first_ns: u64,
    pub cpu: u16,
}

/// Repeats of one storm the kernel counted in one generation.
#[derive(Clone, Debug, PartialEq)]
pub struct StormRepeats {
    /// The storm, as its first record's `Event::storm` names it.
    pub storm: StormId,
    /// Repeats after the first record.
    pub count: u64,
    /// The failure as the kernel's count key names it, for when the first
    /// record is not at hand; `None` when the key did not decode.
    pub failure: Option<Event>,
}

/// A handshake that completed only after retransmits (of the SYN on the
/// connecting side, of the SYN-ACK on the accepting side).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Handshake {
    pub retransmits: u32,
    /// From connect() to ESTABLISHED (the connecting side only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_ms: Option<u64>,
}

/// TCP socket detail read at the moment of the event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpDetail {
    /// Time since the peer was last heard from.
    pub idle_ms: u64,
    /// Time since new data was last sent.
    pub since_send_ms: u64,
    /// SO_KEEPALIVE set on the socket.
    pub keepalive: bool,
    /// Effective keepalive time (socket option, else the netns sysctl).
    pub keepalive_time_ms: u64,
    pub srtt_us: u32,
    pub total_retrans: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    pub kind: EventKind,
    pub src: Endpoint,
    /// Absent when the event has no destination (a bind).
    #[serde(
        default = "Endpoint::unspecified",
        skip_serializing_if = "Endpoint::is_unspecified"
    )]
    pub dst: Endpoint,
    /// Network namespace inode (0 when unknown).
    pub netns: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_name: Option<String>,
    /// The node whose namespace routes this one, when several nodes share
    /// the kernel (kind) and it is not the one tcptrace runs in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// Kernel socket address, to group events of one connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sock: Option<SockPtr>,
    /// TCP state ("ESTABLISHED", "SYN_SENT", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<TcpState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_state: Option<TcpState>,
    /// errno ("ECONNREFUSED").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<Errno>,
    /// Drop reason (drop), reset reason (reset_sent) or INVALID class
    /// (conntrack_invalid), as the kernel names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// Kernel function that dropped the packet ("nf_hook_slow+0x4c").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Flags of the segment ("SYN", "SYN|ACK").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_flags: Option<TcpFlags>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpDetail>,
    /// Whether the socket's owner connected or accepted it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<Role>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_fin: Option<PeerFin>,
    /// On a move to ESTABLISHED: the handshake needed retransmits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handshake: Option<Handshake>,
    /// On connect/bind errors: the namespace's ip_local_port_range when it
    /// failed, read by the kernel ("32768-60999").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_range: Option<PortRange>,
    /// How many failures this record stands for, when more than one: the
    /// repeats the kernel counted since the first record of the same kind,
    /// pod and endpoint (their ephemeral ports are not kept).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u64>,
    /// The first record of a storm: its repeats arrive as a count.
    #[serde(skip)]
    pub storm: Option<StormId>,
    #[serde(default)]
    pub pod: Option<PodRef>,
    #[serde(default)]
    pub identity_level: IdentityLevel,
}

impl Event {
    /// An event with only the mandatory fields set; handy for tests and
    /// recorded sequences.
    pub fn new(
        time: SystemTime,
        kind: EventKind,
        src: Endpoint,
        dst: Endpoint,
        netns: u32,
    ) -> Self {
        Self {
            time,
            kind,
            src,
            dst,
            netns,
            netns_name: None,
            node: None,
            pid: None,
            comm: None,
            cgroup_id: None,
            sock: None,
            state: None,
            old_state: None,
            errno: None,
            reason: None,
            location: None,
            tcp_flags: None,
            tcp: None,
            role: None,
            peer_fin: None,
            handshake: None,
            port_range: None,
            count: None,
            storm: None,
            pod: None,
            identity_level: IdentityLevel::Netns,
        }
    }
}

/// Per-hook counters, emitted periodically and at exit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookStats {
    pub hook: String,
    pub seen: u64,
    pub lost: u64,
    /// Repeats the kernel counted instead of sending records.
    #[serde(default)]
    pub folded: u64,
    /// Repeats sent as records because the count map was full.
    #[serde(default)]
    pub fold_full: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    /// Host name of the machine tcptrace runs on: with `kernel`, what a
    /// replay's header shows.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Its kernel release.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    #[serde(with = "rfc3339")]
    pub time: SystemTime,
    /// Seconds since tracing started.
    pub uptime_s: f64,
    /// Events delivered by the kernel, all hooks.
    pub seen: u64,
    /// Events lost because the ring buffer was full, all hooks.
    pub lost: u64,
    /// Records this process could not decode.
    pub malformed: u64,
    /// Records a slow reader (the TUI) could not take.
    #[serde(default)]
    pub sink_dropped: u64,
    pub hooks: Vec<HookStats>,
    /// Failures in the stream that no verdict accounts for, because a
    /// bound of the diagnosis was reached.
    #[serde(default)]
    pub unaccounted: Unaccounted,
    /// True on the last stats record, written at exit.
    #[serde(default)]
    pub r#final: bool,
    /// The kernel's tick rate and where it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tick: Option<TickRate>,
}

/// What the diagnosis's memory bounds cost, since tracing started:
/// failures written as records that no verdict accounts for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Unaccounted {
    /// Resets and errors that found the ledger of waiting events full.
    pub ledger_full: u64,
    /// Kernel-counted repeats whose first record's verdict never came, or
    /// that waited past the bound.
    pub repeats: u64,
    /// Resets that came after their connection's verdict was evicted (it
    /// was written with the counts it had).
    #[serde(default)]
    pub evicted_resets: u64,
}

#[cfg(test)]
mod tests {
    use super::PodRef;

    fn pod(namespace: &str, name: &str, uid: &str, container: Option<&str>) -> String {
        PodRef {
            namespace: namespace.into(),
            name: name.into(),
            uid: uid.into(),
            container: container.map(str::to_string),
        }
        .to_string()
    }

    const UID: &str = "7e1d2c3b-4a59-4f3c-8a2b-000000000001";
    const ID: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn a_known_pod_is_namespace_slash_name() {
        assert_eq!(pod("shop", "cart-7d9", UID, Some("cart")), "shop/cart-7d9");
        assert_eq!(pod("", "cart-7d9", UID, None), "cart-7d9");
    }

    #[test]
    fn an_unnamed_pod_says_what_is_known() {
        assert_eq!(
            pod("", "", UID, Some(ID)),
            "uid 7e1d2c3b-4a59-4f3c-8a2b-000000000001 container 0123456789ab"
        );
        assert_eq!(
            pod("shop", "", UID, Some("cart")),
            "namespace shop uid 7e1d2c3b-4a59-4f3c-8a2b-000000000001 container cart"
        );
        assert_eq!(
            pod("", "", UID, None),
            "uid 7e1d2c3b-4a59-4f3c-8a2b-000000000001"
        );
        assert_eq!(pod("", "", "", Some("")), "unknown pod");
    }
}
