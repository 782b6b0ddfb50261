//! Why the kernel dropped a packet, sent a reset or judged a segment
//! INVALID, by the names the running kernel gives them (read from BTF, so
//! their numbers may move): those the rules act on are variants, any other
//! keeps its name.
use std::fmt;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Clone, Debug, PartialEq, Eq, Hash, strum::EnumString, strum::IntoStaticStr)]
#[strum(serialize_all = "SCREAMING_SNAKE_CASE")]
pub enum Reason {
    /// A netfilter rule, conntrack or a NAT dropped it.
    NetfilterDrop,
    /// Too big for the next link and not to be fragmented (ip_forward).
    PktTooBig,
    /// No route for it in that namespace.
    IpInnoroutes,
    /// No socket for the segment: the kernel answers with a reset.
    NoSocket,
    /// A TIME_WAIT socket answered.
    TcpTimewaitSocket,
    /// tcp_disconnect(), or a listener closed with connections it never
    /// accepted.
    TcpState,
    TcpAbortOnClose,
    TcpAbortOnLinger,
    TcpAbortOnData,
    TcpDisconnectWithData,
    TcpListenOverflow,
    TcpOldSequence,
    TcpInvalidSyn,
    SocketBacklog,
    SocketRcvbuff,
    /// The direct conntrack hook: the table was full.
    ConntrackTableFull,
    #[strum(default)]
    Other(String),
}

impl Reason {
    pub fn from_name(name: &str) -> Self {
        name.parse()
            .unwrap_or_else(|_| Reason::Other(name.to_string()))
    }

    pub fn as_str(&self) -> &str {
        match self {
            Reason::Other(name) => name,
            known => known.into(),
        }
    }

    /// A drop by the TCP stack itself (not netfilter's, not a closed
    /// port's, not a full listen queue's).
    pub fn is_tcp_stack(&self) -> bool {
        let name = self.as_str();
        (name.starts_with("TCP_") && *self != Reason::TcpListenOverflow)
            || matches!(self, Reason::SocketBacklog | Reason::SocketRcvbuff)
    }

    /// A reset the application caused by closing abortively.
    pub fn is_application_abort(&self) -> bool {
        matches!(
            self,
            Reason::TcpAbortOnClose
                | Reason::TcpAbortOnLinger
                | Reason::TcpAbortOnData
                | Reason::TcpDisconnectWithData
        )
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Reason {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = <std::borrow::Cow<'_, str>>::deserialize(d)?;
        Ok(Reason::from_name(&name))
    }
}

#[cfg(test)]
mod tests {
    use super::Reason;

    #[test]
    fn names_round_trip_and_unknown_ones_are_kept() {
        for name in [
            "NETFILTER_DROP",
            "PKT_TOO_BIG",
            "TCP_TIMEWAIT_SOCKET",
            "NO_SOCKET",
        ] {
            assert_eq!(Reason::from_name(name).as_str(), name);
            assert!(!matches!(Reason::from_name(name), Reason::Other(_)));
        }
        let other = Reason::from_name("TCP_RFC7323_PAWS");
        assert_eq!(other, Reason::Other("TCP_RFC7323_PAWS".into()));
        assert!(other.is_tcp_stack());
        assert!(!Reason::TcpListenOverflow.is_tcp_stack());
        assert!(Reason::SocketBacklog.is_tcp_stack());
        assert_eq!(
            serde_json::to_string(&Reason::IpInnoroutes).unwrap(),
            "\"IP_INNOROUTES\""
        );
        assert_eq!(
            serde_json::from_str::<Reason>("\"SEQ_OVER\"").unwrap(),
            Reason::Other("SEQ_OVER".into())
        );
    }
}
