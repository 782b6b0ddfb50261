//! Resolves what the BPF programs need to know about the running kernel:
//! tracepoint record layouts from tracefs format files, struct member
//! offsets and enum values from BTF.
use std::{
    collections::HashMap,
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::util::KernelVersion;
use btf_rs::{Btf, Type};
use tcptrace_common::{ABSENT, KERNEL_ABSENT, KernelOffsets, TcpStates, TracepointOffsets};

pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";
const TRACEFS_ROOTS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// One field of a tracepoint format file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TpField {
    pub offset: u16,
    pub size: u16,
}

/// Parses a tracefs `format` file into field name -> offset/size.
pub fn parse_format(text: &str) -> HashMap<String, TpField> {
    let mut fields = HashMap::new();
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = None;
        let mut offset = None;
        let mut size = None;
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse::<u16>().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse::<u16>().ok();
            } else if decl.is_none() && !part.is_empty() {
                decl = Some(part);
            }
        }
        let (Some(decl), Some(offset), Some(size)) = (decl, offset, size) else {
            continue;
        };
        // "const void * skaddr", "__u8 saddr[4]" -> last word without array suffix
        let name = decl.rsplit([' ', '*']).next().unwrap_or(decl);
        let name = name.split('[').next().unwrap_or(name);
        fields.insert(name.to_string(), TpField { offset, size });
    }
    fields
}

pub fn tracefs_root() -> Option<PathBuf> {
    TRACEFS_ROOTS
        .iter()
        .map(PathBuf::from)
        .find(|p| p.join("events").is_dir())
}

pub fn read_format(root: &Path, category: &str, name: &str) -> Result<HashMap<String, TpField>> {
    let path = root.join("events").join(category).join(name).join("format");
    let text = fs::read_to_string(&path)
        .with_context(|| format!("reading tracepoint format {}", path.display()))?;
    Ok(parse_format(&text))
}

/// Maps a tracepoint's fields onto [`TracepointOffsets`]; `extras` name the
/// fields that go into `extra`, `extra2` and `extra3`.
pub fn tracepoint_offsets(
    fields: &HashMap<String, TpField>,
    extras: [&str; 3],
) -> TracepointOffsets {
    let at = |name: &str| fields.get(name).map_or(ABSENT, |f| f.offset);
    let mut t = TracepointOffsets {
        skaddr: at("skaddr"),
        skbaddr: at("skbaddr"),
        state: at("state"),
        sport: at("sport"),
        dport: at("dport"),
        family: at("family"),
        saddr: at("saddr"),
        daddr: at("daddr"),
        saddr_v6: at("saddr_v6"),
        daddr_v6: at("daddr_v6"),
        extra: at(extras[0]),
        extra2: at(extras[1]),
        extra3: at(extras[2]),
        ..TracepointOffsets::NONE
    };
    // Newer tcp_send_reset records carry whole sockaddrs.
    if fields.get("saddr").is_some_and(|f| f.size == 28) {
        t.saddr_sockaddr = t.saddr;
        t.daddr_sockaddr = t.daddr;
        t.saddr = ABSENT;
        t.daddr = ABSENT;
    }
    t
}

/// Enum members whose enums tcptrace reads; enums are found by a member
/// because several of them (TCP states) are anonymous.
const ENUM_ANCHORS: [&str; 4] = [
    "TCP_ESTABLISHED",
    "SKB_DROP_REASON_NOT_SPECIFIED",
    "SK_RST_REASON_NOT_SPECIFIED",
    "SOCK_KEEPOPEN",
];

/// Kernel type information from BTF.
pub struct KernelBtf {
    btf: Btf,
    /// Members of the enums named by [`ENUM_ANCHORS`].
    enums: Vec<HashMap<String, u64>>,
}

impl KernelBtf {
    pub fn load(path: &Path) -> Result<Self> {
        if !path.exists() {
            bail!(
                "BTF not found at {}: tcptrace needs a kernel built with CONFIG_DEBUG_INFO_BTF",
                path.display()
            );
        }
        let btf = Btf::from_file(path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("reading kernel BTF from {}", path.display()))?;
        let enums = anchored_enums(&btf);
        Ok(Self { btf, enums })
    }

    fn struct_named(&self, name: &str) -> Option<btf_rs::Struct> {
        self.btf
            .resolve_types_by_name(name)
            .ok()?
            .into_iter()
            .find_map(|t| match t {
                Type::Struct(s) if !s.members.is_empty() => Some(s),
                _ => None,
            })
    }

    /// Follows typedefs and qualifiers to a struct or union.
    fn to_struct(&self, mut t: Type) -> Option<btf_rs::Struct> {
        for _ in 0..16 {
            match t {
                Type::Struct(s) | Type::Union(s) => return Some(s),
                Type::Typedef(ref x) => t = self.btf.resolve_chained_type(x).ok()?,
                Type::Const(ref x) | Type::Volatile(ref x) | Type::Restrict(ref x) => {
                    t = self.btf.resolve_chained_type(x).ok()?
                }
                Type::TypeTag(ref x) => t = self.btf.resolve_chained_type(x).ok()?,
                _ => return None,
            }
        }
        None
    }

    /// Bit offset of member `name` inside `s`, looking through anonymous
    /// structs and unions; returns the member's type too.
    fn find_member(&self, s: &btf_rs::Struct, name: &str, depth: u32) -> Option<(u32, Type)> {
        if depth > 8 {
            return None;
        }
        for m in &s.members {
            let mname = self.btf.resolve_name(m).unwrap_or_default();
            let ty = self.btf.resolve_chained_type(m).ok()?;
            if mname == name {
                return Some((m.bit_offset(), ty));
            }
            if mname.is_empty()
                && let Some(inner) = self.to_struct(ty)
                && let Some((off, t)) = self.find_member(&inner, name, depth + 1)
            {
                return Some((m.bit_offset() + off, t));
            }
        }
        None
    }

    /// Byte offset of `path` (e.g. `["icsk_ack", "lrcvtime"]`) in struct
    /// `root`, or `None` when this kernel lacks it.
    pub fn offset(&self, root: &str, path: &[&str]) -> Option<u32> {
        let mut s = self.struct_named(root)?;
        let mut bits = 0u32;
        for (i, name) in path.iter().enumerate() {
            let (off, ty) = self.find_member(&s, name, 0)?;
            bits += off;
            if i + 1 < path.len() {
                s = self.to_struct(ty)?;
            }
        }
        bits.is_multiple_of(8).then_some(bits / 8)
    }

    /// Name -> value of every member of the enum that has `member` (one of
    /// [`ENUM_ANCHORS`]); empty when this kernel has no such enum.
    pub fn enum_with_member(&self, member: &str) -> HashMap<String, u64> {
        self.enums
            .iter()
            .find(|e| e.contains_key(member))
            .cloned()
            .unwrap_or_default()
    }
}

/// One pass over all types, keeping the enums that contain an anchor.
fn anchored_enums(btf: &Btf) -> Vec<HashMap<String, u64>> {
    use fallible_iterator::FallibleIterator as _;
    let mut found = Vec::new();
    let mut types = btf.type_iter();
    while let Ok(Some(t)) = types.next() {
        let members: HashMap<String, u64> = match &t {
            Type::Enum(e) => e
                .members
                .iter()
                .filter_map(|m| Some((btf.resolve_name(m).ok()?, u64::from(m.val()))))
                .collect(),
            Type::Enum64(e) => e
                .members
                .iter()
                .filter_map(|m| Some((btf.resolve_name(m).ok()?, m.val())))
                .collect(),
            _ => continue,
        };
        if ENUM_ANCHORS.iter().any(|a| members.contains_key(*a)) {
            found.push(members);
        }
    }
    found
}

fn opt(v: Option<u32>) -> u32 {
    v.unwrap_or(KERNEL_ABSENT)
}

/// Which argument of nf_ct_l4proto_log_invalid is its format on `kernel`:
/// 5.16 added the hook state before it (unknown kernel: the current layout).
fn ct_invalid_fmt_arg(kernel: Option<KernelVersion>) -> u32 {
    match kernel {
        Some(v) if v < KernelVersion::new(5, 16, 0) => 2,
        _ => 3,
    }
}

/// Struct member offsets the programs read.
pub fn kernel_offsets(btf: &KernelBtf) -> KernelOffsets {
    let sock = |p: &[&str]| opt(btf.offset("sock", p));
    let tcp = |p: &[&str]| opt(btf.offset("tcp_sock", p));
    let keepopen = btf.enum_with_member("SOCK_KEEPOPEN");
    KernelOffsets {
        sock_net: sock(&["__sk_common", "skc_net"]),
        net_inum: opt(btf.offset("net", &["ns", "inum"])),
        net_keepalive_time: opt(btf.offset("net", &["ipv4", "sysctl_tcp_keepalive_time"])),
        // sk_flags became a define for __sk_common.skc_flags in 6.x.
        sock_flags: opt(btf
            .offset("sock", &["sk_flags"])
            .or_else(|| btf.offset("sock", &["__sk_common", "skc_flags"]))),
        tcp_lsndtime: tcp(&["lsndtime"]),
        tcp_rcv_tstamp: tcp(&["rcv_tstamp"]),
        icsk_lrcvtime: opt(btf.offset("inet_connection_sock", &["icsk_ack", "lrcvtime"])),
        tcp_keepalive_time: tcp(&["keepalive_time"]),
        tcp_srtt_us: tcp(&["srtt_us"]),
        tcp_total_retrans: tcp(&["total_retrans"]),
        skb_tcp_flags: match (
            btf.offset("sk_buff", &["cb"]),
            btf.offset("tcp_skb_cb", &["tcp_flags"]),
        ) {
            (Some(cb), Some(f)) => cb + f,
            _ => KERNEL_ABSENT,
        },
        skb_head: opt(btf.offset("sk_buff", &["head"])),
        skb_network_header: opt(btf.offset("sk_buff", &["network_header"])),
        skb_dev: opt(btf.offset("sk_buff", &["dev"])),
        dev_net: opt(btf.offset("net_device", &["nd_net"])),
        skb_sk: opt(btf.offset("sk_buff", &["sk"])),
        sock_state: sock(&["__sk_common", "skc_state"]),
        sock_family: sock(&["__sk_common", "skc_family"]),
        inet_sport: opt(btf.offset("inet_sock", &["inet_sport"])),
        sock_dport: sock(&["__sk_common", "skc_dport"]),
        sock_rcv_saddr: sock(&["__sk_common", "skc_rcv_saddr"]),
        sock_daddr: sock(&["__sk_common", "skc_daddr"]),
        sock_v6_rcv_saddr: sock(&["__sk_common", "skc_v6_rcv_saddr"]),
        sock_v6_daddr: sock(&["__sk_common", "skc_v6_daddr"]),
        sock_err: sock(&["sk_err"]),
        sock_protocol: sock(&["sk_protocol"]),
        ct_net: opt(btf.offset("nf_conn", &["ct_net"])),
        ct_invalid_fmt_arg: ct_invalid_fmt_arg(KernelVersion::current().ok()),
        _pad: 0,
        task_nsproxy: opt(btf.offset("task_struct", &["nsproxy"])),
        nsproxy_net: opt(btf.offset("nsproxy", &["net_ns"])),
        ct_src_addr: opt(btf.offset("nf_conntrack_tuple", &["src", "u3"])),
        ct_src_port: opt(btf.offset("nf_conntrack_tuple", &["src", "u"])),
        ct_l3num: opt(btf.offset("nf_conntrack_tuple", &["src", "l3num"])),
        ct_dst_addr: opt(btf.offset("nf_conntrack_tuple", &["dst", "u3"])),
        ct_dst_port: opt(btf.offset("nf_conntrack_tuple", &["dst", "u"])),
        ct_protonum: opt(btf.offset("nf_conntrack_tuple", &["dst", "protonum"])),
        keepopen_bit: keepopen
            .get("SOCK_KEEPOPEN")
            .map_or(KERNEL_ABSENT, |v| *v as u32),
    }
}

/// TCP state numbers and names of the running kernel.
#[derive(Clone, Debug, Default)]
pub struct TcpStateNames {
    names: HashMap<u32, String>,
}

impl TcpStateNames {
    pub fn from_btf(btf: &KernelBtf) -> Self {
        let names = btf
            .enum_with_member("TCP_ESTABLISHED")
            .into_iter()
            .filter_map(|(n, v)| {
                let short = n.strip_prefix("TCP_")?;
                (short != "MAX_STATES").then(|| (v as u32, short.to_string()))
            })
            .collect();
        Self { names }
    }

    #[cfg(test)]
    pub fn from_map(names: HashMap<u32, String>) -> Self {
        Self { names }
    }

    pub fn name(&self, value: u32) -> Option<&str> {
        self.names.get(&value).map(String::as_str)
    }

    pub fn value(&self, name: &str) -> Option<u32> {
        self.names.iter().find(|(_, n)| *n == name).map(|(v, _)| *v)
    }

    pub fn numbers(&self) -> Result<TcpStates> {
        let v = |n: &str| {
            self.value(n)
                .ok_or_else(|| anyhow!("kernel BTF has no TCP_{n} state"))
        };
        Ok(TcpStates {
            established: v("ESTABLISHED")?,
            syn_sent: v("SYN_SENT")?,
            syn_recv: v("SYN_RECV")?,
            fin_wait1: v("FIN_WAIT1")?,
            close: v("CLOSE")?,
            listen: v("LISTEN")?,
            time_wait: v("TIME_WAIT")?,
            new_syn_recv: v("NEW_SYN_RECV")?,
            close_wait: v("CLOSE_WAIT")?,
            _pad: 0,
        })
    }
}

/// Value -> name of an enum's members, without a common prefix.
pub fn enum_names(btf: &KernelBtf, member: &str, prefix: &str) -> HashMap<u32, String> {
    btf.enum_with_member(member)
        .into_iter()
        .filter_map(|(n, v)| Some((v as u32, n.strip_prefix(prefix)?.to_string())))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RETRANSMIT_FORMAT: &str = "name: tcp_retransmit_skb
ID: 2281
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:const void * skbaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:const void * skaddr;\toffset:16;\tsize:8;\tsigned:0;
\tfield:int state;\toffset:24;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:28;\tsize:2;\tsigned:0;
\tfield:__u16 dport;\toffset:30;\tsize:2;\tsigned:0;
\tfield:__u16 family;\toffset:32;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:34;\tsize:4;\tsigned:0;
\tfield:__u8 daddr[4];\toffset:38;\tsize:4;\tsigned:0;
\tfield:__u8 saddr_v6[16];\toffset:42;\tsize:16;\tsigned:0;
\tfield:__u8 daddr_v6[16];\toffset:58;\tsize:16;\tsigned:0;
\tfield:int err;\toffset:76;\tsize:4;\tsigned:1;

print fmt: \"skbaddr=%p\", REC->skbaddr
";

    #[test]
    fn picks_the_format_argument_by_kernel() {
        let v = |a, b, c| Some(KernelVersion::new(a, b, c));
        assert_eq!(ct_invalid_fmt_arg(v(6, 1, 0)), 3);
        assert_eq!(ct_invalid_fmt_arg(v(5, 16, 0)), 3);
        assert_eq!(ct_invalid_fmt_arg(v(5, 15, 91)), 2);
        assert_eq!(ct_invalid_fmt_arg(v(4, 19, 0)), 2);
        assert_eq!(ct_invalid_fmt_arg(None), 3, "unknown: the current layout");
    }

    #[test]
    fn parses_tracefs_format() {
        let f = parse_format(RETRANSMIT_FORMAT);
        assert_eq!(
            f["skaddr"],
            TpField {
                offset: 16,
                size: 8
            }
        );
        assert_eq!(
            f["saddr_v6"],
            TpField {
                offset: 42,
                size: 16
            }
        );
        assert_eq!(
            f["err"],
            TpField {
                offset: 76,
                size: 4
            }
        );
        let t = tracepoint_offsets(&f, ["err", "", ""]);
        assert_eq!((t.state, t.sport, t.daddr, t.extra), (24, 28, 38, 76));
        assert_eq!(t.extra2, ABSENT);
        assert_eq!(t.saddr_sockaddr, ABSENT);
    }

    #[test]
    fn send_reset_sockaddr_layout_is_recognised() {
        let f = parse_format(
            "\tfield:__u8 saddr[28];\toffset:32;\tsize:28;\tsigned:0;\n\
             \tfield:__u8 daddr[28];\toffset:60;\tsize:28;\tsigned:0;\n",
        );
        let t = tracepoint_offsets(&f, ["reason", "", ""]);
        assert_eq!((t.saddr_sockaddr, t.daddr_sockaddr), (32, 60));
        assert_eq!((t.saddr, t.daddr), (ABSENT, ABSENT));
    }
}
