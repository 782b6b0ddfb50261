//! Raw ring-buffer records -> model events, validated field by field.
use std::{
    collections::HashMap,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    time::{Duration, SystemTime},
};

use tcptrace_common::{AF_INET, AF_INET6, Event as RawEvent, StormKey, ct_invalid, flag, kind};
use thiserror::Error;

use super::offsets::{KernelBtf, TcpStateNames, enum_names};
use crate::model::{
    Endpoint, Errno, Event, EventKind, Handshake, PeerFin, PortRange, Reason, Role, SockPtr,
    StormId, TcpDetail, TcpFlags, TcpState,
};

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("record of {0} bytes, expected {1}")]
    Size(usize, usize),
    #[error("unknown event kind {0}")]
    Kind(u8),
    #[error("unknown address family {0}")]
    Family(u8),
}

/// Names the kernel gives its numbers, read once at startup.
#[derive(Clone, Debug, Default)]
pub struct KernelNames {
    pub states: TcpStateNames,
    pub drop_reasons: HashMap<u32, String>,
    pub reset_reasons: HashMap<u32, String>,
    /// Kernel tick rate, to turn jiffies into milliseconds ([`super::clock`]).
    pub hz: u32,
}

impl KernelNames {
    pub fn from_btf(btf: &KernelBtf, hz: u32) -> Self {
        Self {
            states: TcpStateNames::from_btf(btf),
            drop_reasons: enum_names(btf, "SKB_DROP_REASON_NOT_SPECIFIED", "SKB_DROP_REASON_"),
            reset_reasons: enum_names(btf, "SK_RST_REASON_NOT_SPECIFIED", "SK_RST_REASON_"),
            hz,
        }
    }

    pub fn drop_reason_value(&self, name: &str) -> Option<u32> {
        self.drop_reasons
            .iter()
            .find(|(_, n)| *n == name)
            .map(|(v, _)| *v)
    }
}

/// Kernel text symbols for drop locations.
#[derive(Debug, Default)]
pub struct Symbolizer {
    symbols: Vec<(u64, String)>,
}

impl Symbolizer {
    /// Reads /proc/kallsyms; empty when addresses are hidden (kptr_restrict).
    pub fn load() -> Self {
        let text = fs::read_to_string("/proc/kallsyms").unwrap_or_default();
        Self::parse(&text)
    }

    fn parse(text: &str) -> Self {
        let mut symbols: Vec<(u64, String)> = text
            .lines()
            .filter_map(|l| {
                let mut parts = l.split_whitespace();
                let addr = u64::from_str_radix(parts.next()?, 16).ok()?;
                let ty = parts.next()?;
                let name = parts.next()?;
                (addr != 0 && matches!(ty, "t" | "T")).then(|| (addr, name.to_string()))
            })
            .collect();
        symbols.sort_unstable_by_key(|(a, _)| *a);
        Self { symbols }
    }

    /// "nf_hook_slow+0x4c", or the hex address when unknown.
    pub fn name(&self, addr: u64) -> String {
        let i = self.symbols.partition_point(|(a, _)| *a <= addr);
        match i.checked_sub(1).map(|i| &self.symbols[i]) {
            Some((base, name)) if addr - base < 0x10_0000 => format!("{name}+{:#x}", addr - base),
            _ => format!("{addr:#x}"),
        }
    }
}

/// Decodes records using the kernel's names and a boot->wall clock offset.
pub struct Decoder {
    pub names: KernelNames,
    symbolizer: Option<Symbolizer>,
    /// Wall-clock time at boot (realtime - boottime).
    boot_wall: SystemTime,
}

impl Decoder {
    pub fn new(names: KernelNames, boot_wall: SystemTime) -> Self {
        Self {
            names,
            symbolizer: None,
            boot_wall,
        }
    }

    fn jiffies_ms(&self, j: u32) -> u64 {
        u64::from(j) * 1000 / u64::from(self.names.hz.max(1))
    }

    fn state(&self, s: u8) -> Option<TcpState> {
        self.names.states.state(u32::from(s))
    }

    pub fn decode(&mut self, bytes: &[u8]) -> Result<Event, DecodeError> {
        let size = size_of::<RawEvent>();
        if bytes.len() != size {
            return Err(DecodeError::Size(bytes.len(), size));
        }
        // Unaligned copy out of the ring buffer.
        let raw: RawEvent = bytemuck_read(bytes);
        let kind = event_kind(raw.kind)?;
        let src = endpoint(raw.family, raw.saddr, raw.sport)?;
        let dst = endpoint(raw.family, raw.daddr, raw.dport)?;
        let time = self.boot_wall + Duration::from_nanos(raw.ts_ns);
        let mut ev = Event::new(time, kind, src, dst, raw.netns);
        if raw.flags & flag::OWNER_KNOWN != 0 {
            ev.pid = Some(raw.tgid);
            ev.comm = Some(comm(&raw.comm));
            ev.cgroup_id = Some(raw.cgroup_id);
        }
        if raw.sk != 0 {
            ev.sock = Some(SockPtr(raw.sk));
        }
        let has_state = !matches!(
            kind,
            EventKind::Drop | EventKind::BindError | EventKind::ConntrackInvalid
        );
        if has_state && raw.state != 0 {
            ev.state = self.state(raw.state);
        }
        if matches!(kind, EventKind::StateChange | EventKind::ConnectError) {
            ev.old_state = self.state(raw.old_state);
        }
        if raw.errno != 0 {
            ev.errno = Some(Errno::from_raw(raw.errno));
        }
        match kind {
            EventKind::Drop if raw.flags & flag::CT_ALLOC_FAILED != 0 => {
                ev.reason = Some(Reason::ConntrackTableFull);
                ev.location = Some("__nf_conntrack_alloc".into());
            }
            EventKind::Drop => {
                ev.reason = Some(match self.names.drop_reasons.get(&raw.reason) {
                    Some(name) => Reason::from_name(name),
                    None => Reason::Other(format!("REASON_{}", raw.reason)),
                });
                let sym = self.symbolizer.get_or_insert_with(Symbolizer::load);
                ev.location = Some(sym.name(raw.location));
            }
            EventKind::ConntrackInvalid => {
                ev.reason = Some(Reason::Other(
                    ct_invalid::name(raw.reason)
                        .map_or_else(|| format!("CLASS_{}", raw.reason), str::to_string),
                ));
                ev.location = Some("nf_ct_l4proto_log_invalid".into());
            }
            EventKind::ResetSent if raw.flags & flag::RESET_FROM_DROP != 0 => {
                ev.reason = Some(Reason::NoSocket);
            }
            EventKind::ResetSent if raw.flags & flag::REASON_KNOWN != 0 => {
                ev.reason = Some(match self.names.reset_reasons.get(&raw.reason) {
                    Some(name) => Reason::from_name(name),
                    None => Reason::Other(format!("REASON_{}", raw.reason)),
                });
            }
            _ => {}
        }
        if raw.flags & flag::TCP_FLAGS_KNOWN != 0 {
            ev.tcp_flags = Some(TcpFlags::from_bits_retain(raw.tcp_flags));
        }
        if raw.flags & flag::ROLE_CLIENT != 0 {
            ev.role = Some(Role::Client);
        } else if raw.flags & flag::ROLE_SERVER != 0 {
            ev.role = Some(Role::Server);
        }
        if raw.flags & flag::PEER_FIN != 0 {
            ev.peer_fin = Some(PeerFin {
                ago_ms: raw.ts_ns.saturating_sub(raw.fin_ns) / 1_000_000,
                idle_before_ms: self.jiffies_ms(raw.fin_idle_jiffies),
            });
        }
        if raw.flags & flag::STORM_FIRST != 0 {
            ev.storm = Some(StormId {
                generation: raw.storm_generation,
                first_ns: raw.ts_ns,
                cpu: raw.storm_cpu,
            });
        }
        if raw.flags & flag::PORT_RANGE != 0 {
            ev.port_range = Some(PortRange {
                lo: raw.port_lo,
                hi: raw.port_hi,
            });
        }
        if raw.flags & flag::SLOW_HANDSHAKE != 0 {
            ev.handshake = Some(Handshake {
                retransmits: raw.total_retrans,
                connect_ms: (raw.connect_ms != 0).then_some(u64::from(raw.connect_ms)),
            });
        }
        if raw.flags & flag::TCP_DETAIL != 0 {
            ev.tcp = Some(TcpDetail {
                idle_ms: self.jiffies_ms(raw.idle_jiffies),
                since_send_ms: self.jiffies_ms(raw.since_send_jiffies),
                keepalive: raw.flags & flag::KEEPALIVE_ON != 0,
                keepalive_time_ms: self.jiffies_ms(raw.keepalive_jiffies),
                srtt_us: raw.srtt_us,
                total_retrans: raw.total_retrans,
            });
        }
        Ok(ev)
    }

    /// A storm's failure as the kernel's count key names it, at the time of
    /// its first record: kind, errno, namespace, cgroup and the stable end
    /// (a reset's closed port and the refused client's address, a bind's
    /// address, else the destination); ephemeral ports are not kept.
    pub fn decode_storm_key(&self, key: &StormKey, first_ns: u64) -> Result<Event, DecodeError> {
        let kind = event_kind(key.kind)?;
        let end = endpoint(key.family, key.addr, key.port)?;
        let (src, dst) = match kind {
            EventKind::ResetSent => (end, endpoint(key.family, key.peer, 0)?),
            EventKind::BindError => (end, Endpoint::unspecified()),
            _ => (Endpoint::unspecified(), end),
        };
        let time = self.boot_wall + Duration::from_nanos(first_ns);
        let mut ev = Event::new(time, kind, src, dst, key.netns);
        ev.cgroup_id = (key.cgroup_id != 0).then_some(key.cgroup_id);
        ev.errno = (key.errno != 0).then(|| Errno::from_raw(key.errno));
        Ok(ev)
    }
}

fn event_kind(raw: u8) -> Result<EventKind, DecodeError> {
    Ok(match raw {
        kind::RETRANSMIT => EventKind::Retransmit,
        kind::SYNACK_RETRANSMIT => EventKind::SynackRetransmit,
        kind::RESET_SENT => EventKind::ResetSent,
        kind::RESET_RECEIVED => EventKind::ResetReceived,
        kind::STATE_CHANGE => EventKind::StateChange,
        kind::DROP => EventKind::Drop,
        kind::CONNECT_ERROR => EventKind::ConnectError,
        kind::BIND_ERROR => EventKind::BindError,
        kind::SOCKET_ERROR => EventKind::SocketError,
        kind::CONNTRACK_INVALID => EventKind::ConntrackInvalid,
        other => return Err(DecodeError::Kind(other)),
    })
}

fn endpoint(family: u8, addr: [u8; 16], port: u16) -> Result<Endpoint, DecodeError> {
    match family {
        AF_INET => Ok(ip4(&addr, port)),
        AF_INET6 => Ok(ip6(addr, port)),
        other => Err(DecodeError::Family(other)),
    }
}

/// An IPv6 socket's address; IPv4 peers of a dual-stack socket
/// (::ffff:a.b.c.d) as the IPv4 address they are.
fn ip6(addr: [u8; 16], port: u16) -> Endpoint {
    let v6 = Ipv6Addr::from(addr);
    let ip = v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4);
    Endpoint::new(ip, port)
}

fn ip4(addr: &[u8; 16], port: u16) -> Endpoint {
    Endpoint::new(
        IpAddr::V4(Ipv4Addr::new(addr[0], addr[1], addr[2], addr[3])),
        port,
    )
}

fn comm(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}

/// Copies a Pod record out of a byte slice of exactly its size.
fn bytemuck_read<T: aya::Pod>(bytes: &[u8]) -> T {
    debug_assert_eq!(bytes.len(), size_of::<T>());
    // SAFETY: T is Pod (any bit pattern is valid) and the length was checked
    // by the caller; read_unaligned tolerates the ring buffer's alignment.
    #[allow(unsafe_code)]
    unsafe {
        std::ptr::read_unaligned(bytes.as_ptr().cast::<T>())
    }
}

#[cfg(test)]
mod tests {
    use std::time::UNIX_EPOCH;

    use super::*;

    fn names() -> KernelNames {
        let states =
            [(1, "ESTABLISHED"), (2, "SYN_SENT"), (7, "CLOSE")].map(|(v, n)| (v, n.to_string()));
        KernelNames {
            states: TcpStateNames::from_names(states),
            drop_reasons: HashMap::from([(12, "NETFILTER_DROP".to_string())]),
            reset_reasons: HashMap::from([(1, "NO_SOCKET".to_string())]),
            hz: 250,
        }
    }

    fn raw() -> RawEvent {
        RawEvent {
            ts_ns: 1_500_000_000,
            sk: 0xffff_8880_1234_5678,
            cgroup_id: 42,
            location: 0,
            saddr: [10, 244, 1, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            daddr: [10, 96, 0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            netns: 4026532000,
            tgid: 1234,
            sport: 40000,
            dport: 80,
            kind: kind::RETRANSMIT,
            family: AF_INET,
            state: 2,
            old_state: 0,
            errno: 0,
            reason: 0,
            flags: flag::OWNER_KNOWN
                | flag::TCP_FLAGS_KNOWN
                | flag::TCP_DETAIL
                | flag::KEEPALIVE_ON,
            idle_jiffies: 2500,
            since_send_jiffies: 50,
            keepalive_jiffies: 7200 * 250,
            srtt_us: 120,
            total_retrans: 3,
            tcp_flags: 0x02,
            _pad: 0,
            storm_cpu: 0,
            comm: *b"curl\0\0\0\0\0\0\0\0\0\0\0\0",
            fin_ns: 0,
            fin_idle_jiffies: 0,
            connect_ms: 0,
            port_lo: 0,
            port_hi: 0,
            storm_generation: 0,
        }
    }

    fn bytes(r: &RawEvent) -> Vec<u8> {
        // SAFETY: RawEvent is repr(C) without padding.
        #[allow(unsafe_code)]
        unsafe {
            std::slice::from_raw_parts((r as *const RawEvent).cast::<u8>(), size_of::<RawEvent>())
        }
        .to_vec()
    }

    /// The decode fuzz target starts from this record (tcptrace/fuzz):
    /// kept in the layout of the day.
    #[test]
    fn the_fuzz_seed_is_a_record_of_this_layout() {
        let path =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/decode-record");
        let record = bytes(&raw());
        if std::env::var_os("UPDATE_SEEDS").is_some() {
            fs::write(&path, &record).expect("writing the seed");
        }
        let seed = fs::read(&path).expect("the seed is committed");
        assert!(
            seed == record,
            "the record layout changed: UPDATE_SEEDS=1 cargo test -p tcptrace the_fuzz_seed"
        );
    }

    #[test]
    fn decodes_a_syn_retransmit_exactly() {
        let mut d = Decoder::new(names(), UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let ev = d.decode(&bytes(&raw())).unwrap();
        let json = serde_json::to_value(&ev).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "time": "2023-11-14T22:13:21.500000Z",
                "kind": "retransmit",
                "src": {"ip": "10.244.1.2", "port": 40000},
                "dst": {"ip": "10.96.0.10", "port": 80},
                "netns": 4026532000u32,
                "pid": 1234, "comm": "curl", "cgroup_id": 42,
                "sock": "0xffff888012345678",
                "state": "SYN_SENT",
                "tcp_flags": "SYN",
                "tcp": {"idle_ms": 10000, "since_send_ms": 200, "keepalive": true,
                        "keepalive_time_ms": 7_200_000, "srtt_us": 120, "total_retrans": 3},
                "pod": null,
                "identity_level": "netns"
            })
        );
    }

    #[test]
    fn rejects_bad_records() {
        let mut d = Decoder::new(names(), UNIX_EPOCH);
        assert_eq!(d.decode(&[0u8; 10]), Err(DecodeError::Size(10, 160)));
        let mut r = raw();
        r.kind = 99;
        assert_eq!(d.decode(&bytes(&r)), Err(DecodeError::Kind(99)));
        let mut r = raw();
        r.family = 7;
        assert_eq!(d.decode(&bytes(&r)), Err(DecodeError::Family(7)));
    }

    #[test]
    fn names_drop_reason_errno_and_connect_error() {
        let mut d = Decoder::new(names(), UNIX_EPOCH);
        let mut r = raw();
        r.kind = kind::CONNECT_ERROR;
        r.flags = flag::OWNER_KNOWN;
        r.state = 7;
        r.old_state = 2;
        r.sport = 0;
        r.errno = -99;
        let ev = d.decode(&bytes(&r)).unwrap();
        assert_eq!(ev.kind, EventKind::ConnectError);
        assert_eq!(ev.errno, Some(Errno::EADDRNOTAVAIL));
        assert_eq!(ev.old_state, Some(TcpState::SynSent));
        assert_eq!(ev.state, Some(TcpState::Close));
        assert_eq!(ev.tcp, None);

        let mut r = raw();
        r.kind = kind::DROP;
        r.reason = 12;
        r.location = 0;
        let ev = d.decode(&bytes(&r)).unwrap();
        assert_eq!(ev.reason, Some(Reason::NetfilterDrop));
        assert_eq!(ev.state, None);
    }

    #[test]
    fn decodes_the_port_range_a_slow_handshake_and_mapped_addresses() {
        let mut d = Decoder::new(names(), UNIX_EPOCH);
        let mut r = raw();
        r.kind = kind::BIND_ERROR;
        r.flags = flag::PORT_RANGE;
        r.errno = -98;
        (r.port_lo, r.port_hi) = (32768, 32768);
        let ev = d.decode(&bytes(&r)).unwrap();
        assert_eq!(
            ev.port_range,
            Some(PortRange {
                lo: 32768,
                hi: 32768
            })
        );
        assert_eq!(ev.port_range.map(PortRange::size), Some(1));

        let mut r = raw();
        r.kind = kind::STATE_CHANGE;
        r.flags = flag::SLOW_HANDSHAKE;
        (r.old_state, r.state) = (2, 1);
        r.total_retrans = 7;
        r.connect_ms = 11_340;
        let ev = d.decode(&bytes(&r)).unwrap();
        assert_eq!(
            ev.handshake,
            Some(Handshake {
                retransmits: 7,
                connect_ms: Some(11_340)
            })
        );
        assert_eq!(ev.tcp, None, "no TCP detail without its flag");

        // A dual-stack socket's IPv4 peer is the IPv4 address it is.
        let mut r = raw();
        r.family = AF_INET6;
        r.saddr = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 192, 168, 1, 1];
        r.daddr = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
        let ev = d.decode(&bytes(&r)).unwrap();
        assert_eq!(ev.src.ip.to_string(), "192.168.1.1");
        assert_eq!(ev.dst.ip.to_string(), "fd00::1");
    }

    #[test]
    fn names_a_conntrack_allocation_failure() {
        let mut d = Decoder::new(names(), UNIX_EPOCH);
        let mut r = raw();
        r.kind = kind::DROP;
        r.flags = flag::CT_ALLOC_FAILED;
        r.errno = -12;
        let ev = d.decode(&bytes(&r)).unwrap();
        assert_eq!(ev.reason, Some(Reason::ConntrackTableFull));
        assert_eq!(ev.location.as_deref(), Some("__nf_conntrack_alloc"));
        assert_eq!(ev.errno, Some(Errno::ENOMEM));
    }

    #[test]
    fn names_a_segment_conntrack_marked_invalid() {
        let mut d = Decoder::new(names(), UNIX_EPOCH);
        let mut r = raw();
        r.kind = kind::CONNTRACK_INVALID;
        r.flags = flag::TCP_FLAGS_KNOWN;
        r.tcp_flags = 0x18;
        r.reason = ct_invalid::SEQ_OVER;
        let ev = d.decode(&bytes(&r)).unwrap();
        assert_eq!(ev.kind, EventKind::ConntrackInvalid);
        assert_eq!(ev.reason, Some(Reason::Other("SEQ_OVER".into())));
        assert_eq!(ev.location.as_deref(), Some("nf_ct_l4proto_log_invalid"));
        assert_eq!(ev.tcp_flags, Some(TcpFlags::PSH | TcpFlags::ACK));
        assert_eq!(ev.state, None);
        r.reason = 77;
        assert_eq!(
            d.decode(&bytes(&r))
                .unwrap()
                .reason
                .as_ref()
                .map(Reason::as_str),
            Some("CLASS_77")
        );
    }

    #[test]
    fn a_storm_key_names_its_failure_by_its_stable_end() {
        let d = Decoder::new(names(), UNIX_EPOCH + Duration::from_secs(1_700_000_000));
        let mapped = |v4: [u8; 4]| {
            let mut a = [0u8; 16];
            a[10..12].copy_from_slice(&[0xff, 0xff]);
            a[12..].copy_from_slice(&v4);
            a
        };
        let reset = StormKey {
            addr: mapped([10, 244, 1, 2]),
            peer: mapped([10, 244, 3, 4]),
            cgroup_id: 0,
            netns: 7,
            generation: 1,
            port: 8080,
            kind: kind::RESET_SENT,
            family: AF_INET6,
            errno: 0,
        };
        let ev = d.decode_storm_key(&reset, 2_000_000_000).unwrap();
        assert_eq!(
            serde_json::to_value(&ev).unwrap(),
            serde_json::json!({
                "time": "2023-11-14T22:13:22.000000Z",
                "kind": "reset_sent",
                "src": {"ip": "10.244.1.2", "port": 8080},
                "dst": {"ip": "10.244.3.4", "port": 0},
                "netns": 7,
                "pod": null,
                "identity_level": "netns"
            })
        );
        let connect = StormKey {
            kind: kind::CONNECT_ERROR,
            family: AF_INET,
            addr: [10, 96, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            errno: -99,
            cgroup_id: 42,
            ..reset
        };
        let ev = d.decode_storm_key(&connect, 0).unwrap();
        assert_eq!(ev.kind, EventKind::ConnectError);
        assert_eq!(ev.src, Endpoint::unspecified());
        assert_eq!(ev.dst.to_string(), "10.96.0.1:8080");
        assert_eq!(ev.errno, Some(Errno::EADDRNOTAVAIL));
        assert_eq!(ev.cgroup_id, Some(42));
        let bind = StormKey {
            kind: kind::BIND_ERROR,
            errno: -98,
            ..connect
        };
        let ev = d.decode_storm_key(&bind, 0).unwrap();
        assert_eq!(ev.src.to_string(), "10.96.0.1:8080");
        assert_eq!(ev.dst, Endpoint::unspecified());
        let received = StormKey {
            kind: kind::RESET_RECEIVED,
            errno: 0,
            ..connect
        };
        let ev = d.decode_storm_key(&received, 0).unwrap();
        assert_eq!(ev.kind, EventKind::ResetReceived);
        assert_eq!(ev.dst.to_string(), "10.96.0.1:8080");
        assert_eq!(ev.errno, None);
    }

    #[test]
    fn rejects_storm_keys_it_cannot_name() {
        let d = Decoder::new(names(), UNIX_EPOCH);
        let key = StormKey {
            addr: [0; 16],
            peer: [0; 16],
            cgroup_id: 0,
            netns: 1,
            generation: 0,
            port: 80,
            kind: 99,
            family: AF_INET,
            errno: 0,
        };
        assert_eq!(d.decode_storm_key(&key, 0), Err(DecodeError::Kind(99)));
        let key = StormKey {
            kind: kind::RESET_SENT,
            family: 7,
            ..key
        };
        assert_eq!(d.decode_storm_key(&key, 0), Err(DecodeError::Family(7)));
    }

    #[test]
    fn symbolizes_addresses() {
        let s = Symbolizer::parse(
            "ffffffff81000000 T _stext\nffffffff81a00000 t nf_hook_slow\n0000000000000000 T hidden\n",
        );
        assert_eq!(s.name(0xffffffff81a0004c), "nf_hook_slow+0x4c");
        assert_eq!(s.name(0x10), "0x10");
    }
}
