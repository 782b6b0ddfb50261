//! Values as the kernel has them, typed until a sink writes them: TCP
//! states (named from BTF at load time), errnos, socket pointers and TCP
//! flags. Text only at the NDJSON boundary, both ways (replay reads it).
use std::{fmt, str::FromStr};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de::Error as _};

/// A TCP state by the kernel's name (`TCP_` prefix dropped). The decoder
/// maps the running kernel's numbers onto these by the names in its BTF.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::EnumIter,
)]
pub enum TcpState {
    #[strum(serialize = "ESTABLISHED")]
    Established,
    #[strum(serialize = "SYN_SENT")]
    SynSent,
    #[strum(serialize = "SYN_RECV")]
    SynRecv,
    #[strum(serialize = "FIN_WAIT1")]
    FinWait1,
    #[strum(serialize = "FIN_WAIT2")]
    FinWait2,
    #[strum(serialize = "TIME_WAIT")]
    TimeWait,
    #[strum(serialize = "CLOSE")]
    Close,
    #[strum(serialize = "CLOSE_WAIT")]
    CloseWait,
    #[strum(serialize = "LAST_ACK")]
    LastAck,
    #[strum(serialize = "LISTEN")]
    Listen,
    #[strum(serialize = "CLOSING")]
    Closing,
    #[strum(serialize = "NEW_SYN_RECV")]
    NewSynRecv,
    #[strum(serialize = "BOUND_INACTIVE")]
    BoundInactive,
}

impl TcpState {
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

impl fmt::Display for TcpState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for TcpState {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for TcpState {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <&str>::deserialize(d)?;
        s.parse()
            .map_err(|_| D::Error::custom(format!("unknown TCP state {s:?}")))
    }
}

/// An error number (positive), written by its name ("ECONNREFUSED").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Errno(pub i32);

impl Errno {
    pub const ECONNREFUSED: Errno = Errno(libc::ECONNREFUSED);
    pub const ECONNRESET: Errno = Errno(libc::ECONNRESET);
    pub const EPIPE: Errno = Errno(libc::EPIPE);
    pub const ETIMEDOUT: Errno = Errno(libc::ETIMEDOUT);
    pub const EADDRINUSE: Errno = Errno(libc::EADDRINUSE);
    pub const EADDRNOTAVAIL: Errno = Errno(libc::EADDRNOTAVAIL);
    pub const ENOMEM: Errno = Errno(libc::ENOMEM);
    pub const EHOSTUNREACH: Errno = Errno(libc::EHOSTUNREACH);
    pub const ENETUNREACH: Errno = Errno(libc::ENETUNREACH);
    pub const EACCES: Errno = Errno(libc::EACCES);
    pub const EPERM: Errno = Errno(libc::EPERM);

    /// From a kernel return value or error field, whatever its sign.
    pub fn from_raw(value: i32) -> Self {
        Errno(value.saturating_abs())
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match nix::errno::Errno::from_raw(self.0) {
            nix::errno::Errno::UnknownErrno => write!(f, "E{}", self.0),
            e => write!(f, "{e:?}"),
        }
    }
}

impl FromStr for Errno {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(n) = s.strip_prefix('E').and_then(|n| n.parse::<i32>().ok()) {
            return Ok(Errno(n));
        }
        // Linux numbers errnos from 1 to 133.
        (1..=133)
            .map(Errno)
            .find(|e| e.to_string() == s)
            .ok_or_else(|| format!("unknown errno {s:?}"))
    }
}

impl Serialize for Errno {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Errno {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&str>::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

/// A kernel `struct sock` address: groups the events of one connection.
/// Written in hex ("0xffff888108ec0000").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SockPtr(pub u64);

impl Serialize for SockPtr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{:#x}", self.0))
    }
}

impl<'de> Deserialize<'de> for SockPtr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <&str>::deserialize(d)?;
        s.strip_prefix("0x")
            .and_then(|h| u64::from_str_radix(h, 16).ok())
            .map(SockPtr)
            .ok_or_else(|| D::Error::custom(format!("not a socket address {s:?}")))
    }
}

/// An inclusive port range, written "lo-hi" as the sysctl is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    pub lo: u16,
    pub hi: u16,
}

impl PortRange {
    pub fn size(self) -> u32 {
        (u32::from(self.hi) + 1).saturating_sub(u32::from(self.lo))
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.lo, self.hi)
    }
}

impl Serialize for PortRange {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <&str>::deserialize(d)?;
        s.split_once('-')
            .and_then(|(lo, hi)| {
                Some(PortRange {
                    lo: lo.parse().ok()?,
                    hi: hi.parse().ok()?,
                })
            })
            .ok_or_else(|| D::Error::custom(format!("not a port range {s:?}")))
    }
}

bitflags::bitflags! {
    /// The flags of a TCP segment, written "SYN|ACK" ("NONE" when empty).
    #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
    pub struct TcpFlags: u8 {
        const FIN = 1 << 0;
        const SYN = 1 << 1;
        const RST = 1 << 2;
        const PSH = 1 << 3;
        const ACK = 1 << 4;
        const URG = 1 << 5;
        const ECE = 1 << 6;
        const CWR = 1 << 7;
    }
}

impl fmt::Display for TcpFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return f.write_str("NONE");
        }
        for (i, (name, _)) in self.iter_names().enumerate() {
            if i > 0 {
                f.write_str("|")?;
            }
            f.write_str(name)?;
        }
        Ok(())
    }
}

impl FromStr for TcpFlags {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "NONE" {
            return Ok(TcpFlags::empty());
        }
        s.split('|').try_fold(TcpFlags::empty(), |acc, name| {
            TcpFlags::from_name(name.trim())
                .map(|f| acc | f)
                .ok_or_else(|| format!("unknown TCP flag {name:?} in {s:?}"))
        })
    }
}

impl Serialize for TcpFlags {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for TcpFlags {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <&str>::deserialize(d)?.parse().map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_their_text() {
        for (state, text) in [
            (TcpState::SynSent, "\"SYN_SENT\""),
            (TcpState::FinWait1, "\"FIN_WAIT1\""),
            (TcpState::NewSynRecv, "\"NEW_SYN_RECV\""),
        ] {
            assert_eq!(serde_json::to_string(&state).unwrap(), text);
            assert_eq!(serde_json::from_str::<TcpState>(text).unwrap(), state);
        }
        assert_eq!(Errno::ECONNREFUSED.to_string(), "ECONNREFUSED");
        assert_eq!("EADDRNOTAVAIL".parse::<Errno>(), Ok(Errno::EADDRNOTAVAIL));
        assert_eq!(Errno::from_raw(-99), Errno::EADDRNOTAVAIL);
        assert_eq!(Errno(4000).to_string(), "E4000");
        assert_eq!("E4000".parse::<Errno>(), Ok(Errno(4000)));
        let sock = SockPtr(0xffff_8881_08ec_0000);
        let text = serde_json::to_string(&sock).unwrap();
        assert_eq!(text, "\"0xffff888108ec0000\"");
        assert_eq!(serde_json::from_str::<SockPtr>(&text).unwrap(), sock);
        let flags = TcpFlags::SYN | TcpFlags::ACK;
        assert_eq!(flags.to_string(), "SYN|ACK");
        assert_eq!("SYN|ACK".parse::<TcpFlags>(), Ok(flags));
        assert_eq!(TcpFlags::empty().to_string(), "NONE");
        assert!("SYN|BOGUS".parse::<TcpFlags>().is_err());
    }
}
