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
mod text;
mod verdict;

pub use kernel::{Errno, PortRange, SockPtr, TcpFlags, TcpState};
pub use probe::{ProbeState, ProbeStatus, TickRate, TickSource, Tier};
pub use text::rfc3339;
pub use verdict::{Cause, Confidence, Severity, Verdict};

/// One NDJSON line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Event(Box<Event>),
    Verdict(Box<Verdict>),
    Stats(Stats),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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
    pub const ALL: [EventKind; 10] = [
        EventKind::Retransmit,
        EventKind::SynackRetransmit,
        EventKind::ResetSent,
        EventKind::ResetReceived,
        EventKind::StateChange,
        EventKind::Drop,
        EventKind::ConnectError,
        EventKind::BindError,
        EventKind::SocketError,
        EventKind::ConntrackInvalid,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Retransmit => "retransmit",
            EventKind::SynackRetransmit => "synack_retransmit",
            EventKind::ResetSent => "reset_sent",
            EventKind::ResetReceived => "reset_received",
            EventKind::StateChange => "state_change",
            EventKind::Drop => "drop",
            EventKind::ConnectError => "connect_error",
            EventKind::BindError => "bind_error",
            EventKind::SocketError => "socket_error",
            EventKind::ConntrackInvalid => "conntrack_invalid",
        }
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

/// Where the kernel counts a storm's repeats: the generation of its first
/// record, that record's boot-time stamp and the CPU that took it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Fold {
    pub generation: u32,
    pub first_ns: u64,
    pub cpu: u16,
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
    /// Drop reason (drop) or reset reason (reset_sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
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
    pub fold: Option<Fold>,
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
            fold: None,
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
    /// True on the last stats record, written at exit.
    #[serde(default)]
    pub r#final: bool,
    /// The kernel's tick rate and where it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tick: Option<TickRate>,
}
