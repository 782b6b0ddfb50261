//! Plain data that flows from the decoder through attribution and diagnosis
//! to the sinks. Serialized as the NDJSON contract (`schema/tcptrace.schema.json`).
use std::{
    net::{IpAddr, Ipv4Addr},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

/// One NDJSON line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Event(Box<Event>),
    Verdict(Box<crate::diagnosis::Verdict>),
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
    #[serde(serialize_with = "ip_text::serialize")]
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
    pub dst: Endpoint,
    /// Network namespace inode (0 when unknown).
    pub netns: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comm: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup_id: Option<u64>,
    /// Kernel socket address, to group events of one connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sock: Option<String>,
    /// TCP state name ("ESTABLISHED", "SYN_SENT", ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub old_state: Option<String>,
    /// errno name ("ECONNREFUSED").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub errno: Option<String>,
    /// Drop reason (drop) or reset reason (reset_sent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Kernel function that dropped the packet ("nf_hook_slow+0x4c").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// Flags of the segment ("SYN", "SYN|ACK").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp_flags: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<TcpDetail>,
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
}

/// IP addresses as text; IPv4 without the formatting machinery (two per
/// record).
mod ip_text {
    use std::net::IpAddr;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(ip: &IpAddr, s: S) -> Result<S::Ok, S::Error> {
        let IpAddr::V4(v4) = ip else {
            return s.collect_str(ip);
        };
        let mut buf = [0u8; 15];
        let mut len = 0;
        for (i, octet) in v4.octets().into_iter().enumerate() {
            if i > 0 {
                buf[len] = b'.';
                len += 1;
            }
            let mut digits = itoa::Buffer::new();
            let text = digits.format(octet).as_bytes();
            buf[len..len + text.len()].copy_from_slice(text);
            len += text.len();
        }
        // Only ASCII digits and dots were written.
        s.serialize_str(std::str::from_utf8(&buf[..len]).unwrap_or_default())
    }

    #[cfg(test)]
    mod tests {
        use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

        #[test]
        fn writes_addresses_as_display_does() {
            for ip in [
                IpAddr::V4(Ipv4Addr::new(0, 0, 0, 0)),
                IpAddr::V4(Ipv4Addr::new(10, 244, 1, 255)),
                IpAddr::V4(Ipv4Addr::new(255, 255, 255, 255)),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ] {
                let mut out = Vec::new();
                super::serialize(&ip, &mut serde_json::Serializer::new(&mut out)).unwrap();
                assert_eq!(String::from_utf8(out).unwrap(), format!("\"{ip}\""));
            }
        }
    }
}

/// RFC 3339 UTC timestamps with microseconds.
pub mod rfc3339 {
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer, de::Error};
    use time::{OffsetDateTime, format_description::well_known::Rfc3339};

    /// Bytes of "YYYY-MM-DDTHH:MM:SS.ffffffZ".
    const LEN: usize = 27;

    pub fn format(t: SystemTime) -> String {
        let mut buf = [0u8; LEN];
        write(t, &mut buf).to_string()
    }

    /// Formats into `buf` without allocating (serialization runs per record).
    fn write(t: SystemTime, buf: &mut [u8; LEN]) -> &str {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let micros = since.as_micros();
        let secs = (micros / 1_000_000) as i64;
        let dt = OffsetDateTime::from_unix_timestamp(secs).unwrap_or(OffsetDateTime::UNIX_EPOCH);
        // 1970..=9999: earlier times count from the epoch, later ones fail
        // from_unix_timestamp and fall back to it.
        let year = dt.year() as u32;
        let fields: [(usize, u32, usize); 7] = [
            (0, year, 4),
            (5, u32::from(dt.month() as u8), 2),
            (8, u32::from(dt.day()), 2),
            (11, u32::from(dt.hour()), 2),
            (14, u32::from(dt.minute()), 2),
            (17, u32::from(dt.second()), 2),
            (20, (micros % 1_000_000) as u32, 6),
        ];
        for (at, mut value, width) in fields {
            for i in (at..at + width).rev() {
                buf[i] = b'0' + (value % 10) as u8;
                value /= 10;
            }
        }
        for (at, sep) in [
            (4, b'-'),
            (7, b'-'),
            (10, b'T'),
            (13, b':'),
            (16, b':'),
            (19, b'.'),
            (26, b'Z'),
        ] {
            buf[at] = sep;
        }
        // Only ASCII digits and separators were written.
        std::str::from_utf8(buf).unwrap_or("1970-01-01T00:00:00.000000Z")
    }

    pub fn parse(s: &str) -> Option<SystemTime> {
        let dt = OffsetDateTime::parse(s, &Rfc3339).ok()?;
        let nanos = dt.unix_timestamp_nanos();
        if nanos < 0 {
            return None;
        }
        Some(UNIX_EPOCH + Duration::from_nanos(nanos as u64))
    }

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        let mut buf = [0u8; LEN];
        s.serialize_str(write(*t, &mut buf))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        parse(&s).ok_or_else(|| D::Error::custom(format!("not an RFC 3339 time: {s}")))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn formats_utc_with_micros_and_parses_back() {
            let t = UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
            let s = format(t);
            assert_eq!(s, "2023-11-14T22:13:20.123456Z");
            assert_eq!(parse(&s), Some(t));
            assert_eq!(
                format(UNIX_EPOCH + Duration::from_micros(7)),
                "1970-01-01T00:00:00.000007Z"
            );
        }
    }
}
