//! Resolves what the BPF programs need to know about the running kernel
//! from its BTF: struct member offsets, enum values and the arguments of
//! raw tracepoints. No tracefs: its format files are not needed.
use std::{collections::HashMap, path::Path};

use anyhow::{Context as _, Result, anyhow, bail};
use aya::util::KernelVersion;
use btf_rs::{Btf, Type};

use crate::model::TcpState;
use tcptrace_common::{
    ABSENT, ArgIndex, KERNEL_ABSENT, KernelOffsets, NO_ARG, RawTpArgs, SyscallOffsets, TcpStates,
};

pub const BTF_PATH: &str = "/sys/kernel/btf/vmlinux";

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
                    t = self.btf.resolve_chained_type(x).ok()?;
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

    /// The C types of a tracepoint's arguments as its raw tracepoint passes
    /// them (`btf_trace_<name>` without its leading `void *__data`), e.g.
    /// `["struct sk_buff *", "void *", "enum skb_drop_reason"]`; `None` when
    /// this kernel has no such tracepoint.
    pub fn raw_tracepoint_args(&self, name: &str) -> Option<Vec<String>> {
        let typedef = self
            .btf
            .resolve_types_by_name(&format!("btf_trace_{name}"))
            .ok()?
            .into_iter()
            .find_map(|t| match t {
                Type::Typedef(t) => Some(t),
                _ => None,
            })?;
        let Type::Ptr(ptr) = self.btf.resolve_chained_type(&typedef).ok()? else {
            return None;
        };
        let Type::FuncProto(proto) = self.btf.resolve_chained_type(&ptr).ok()? else {
            return None;
        };
        let params = proto
            .parameters
            .iter()
            .map(|p| {
                self.btf
                    .resolve_chained_type(p)
                    .map_or_else(|_| "?".to_string(), |t| self.c_type(&t, 0))
            })
            .collect::<Vec<_>>();
        Some(params.into_iter().skip(1).collect())
    }

    /// A type as C spells it, without qualifiers: "struct sock *", "int".
    fn c_type(&self, t: &Type, depth: u32) -> String {
        if depth > 8 {
            return "?".into();
        }
        let named = |kind: &str, t: &dyn btf_rs::BtfType| {
            let name = self.btf.resolve_name(t).unwrap_or_default();
            if kind.is_empty() {
                name
            } else {
                format!("{kind} {name}")
            }
        };
        let inner = |x: &dyn btf_rs::BtfType| {
            self.btf
                .resolve_chained_type(x)
                .map_or_else(|_| "?".to_string(), |t| self.c_type(&t, depth + 1))
        };
        match t {
            Type::Void => "void".into(),
            Type::Int(x) => named("", x),
            Type::Float(x) => named("", x),
            Type::Typedef(x) => named("", x),
            Type::Struct(x) => named("struct", x),
            Type::Union(x) => named("union", x),
            Type::Enum(x) => named("enum", x),
            Type::Enum64(x) => named("enum", x),
            Type::Fwd(x) => named("struct", x),
            Type::Ptr(x) => format!("{} *", inner(x)),
            Type::Const(x) => inner(x),
            Type::Volatile(x) => inner(x),
            Type::Restrict(x) => inner(x),
            Type::TypeTag(x) => inner(x),
            _ => "?".into(),
        }
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

/// The position of the first argument of C type `ty` in `args`.
fn arg_of_type(args: &[String], ty: &str) -> ArgIndex {
    args.iter()
        .position(|a| a == ty)
        .map_or(NO_ARG, |i| i as ArgIndex)
}

/// Positions of the raw tracepoint arguments that moved between kernels.
pub fn raw_tp_args(btf: &KernelBtf) -> RawTpArgs {
    let send_reset = btf
        .raw_tracepoint_args("tcp_send_reset")
        .unwrap_or_default();
    let kfree_skb = btf.raw_tracepoint_args("kfree_skb").unwrap_or_default();
    RawTpArgs {
        send_reset_reason: arg_of_type(&send_reset, "enum sk_rst_reason"),
        kfree_skb_reason: arg_of_type(&kfree_skb, "enum skb_drop_reason"),
        kfree_skb_location: arg_of_type(&kfree_skb, "void *"),
        kfree_skb_rx_sk: arg_of_type(&kfree_skb, "struct sock *"),
    }
}

/// Where the syscall tracepoints keep the arguments and the return value.
pub fn syscall_offsets(btf: &KernelBtf) -> SyscallOffsets {
    let at = |s: &str, m: &str| {
        btf.offset(s, &[m])
            .and_then(|o| u16::try_from(o).ok())
            .unwrap_or(ABSENT)
    };
    SyscallOffsets {
        args: at("syscall_trace_enter", "args"),
        ret: at("syscall_trace_exit", "ret"),
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
        net_port_range: opt(btf.offset("net", &["ipv4", "ip_local_ports", "range"])),
        // Before 6.6 a seqlock guarded two ints.
        port_range_packed: u32::from(btf.offset("local_ports", &["lock"]).is_none()),
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
        skb_refdst: opt(btf.offset("sk_buff", &["_skb_refdst"])),
        dst_dev: opt(btf.offset("dst_entry", &["dev"])),
        dev_net: opt(btf.offset("net_device", &["nd_net"])),
        skb_sk: opt(btf.offset("sk_buff", &["sk"])),
        sock_state: sock(&["__sk_common", "skc_state"]),
        sock_family: sock(&["__sk_common", "skc_family"]),
        inet_sport: opt(btf.offset("inet_sock", &["inet_sport"])),
        sock_dport: sock(&["__sk_common", "skc_dport"]),
        sock_num: sock(&["__sk_common", "skc_num"]),
        skb_protocol: opt(btf.offset("sk_buff", &["protocol"])),
        sock_rcv_saddr: sock(&["__sk_common", "skc_rcv_saddr"]),
        sock_daddr: sock(&["__sk_common", "skc_daddr"]),
        sock_v6_rcv_saddr: sock(&["__sk_common", "skc_v6_rcv_saddr"]),
        sock_v6_daddr: sock(&["__sk_common", "skc_v6_daddr"]),
        sock_err: sock(&["sk_err"]),
        sock_protocol: sock(&["sk_protocol"]),
        ct_net: opt(btf.offset("nf_conn", &["ct_net"])),
        ct_invalid_fmt_arg: ct_invalid_fmt_arg(KernelVersion::current().ok()),
        sock_head_packed: u32::from(
            [
                sock(&["__sk_common", "skc_daddr"]),
                sock(&["__sk_common", "skc_dport"]),
                sock(&["__sk_common", "skc_family"]),
                sock(&["__sk_common", "skc_state"]),
            ] == [0, 12, 16, 18],
        ),
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

/// The running kernel's TCP state numbers, by the names its BTF gives them.
#[derive(Clone, Debug, Default)]
pub struct TcpStateNames {
    states: HashMap<u32, TcpState>,
}

impl TcpStateNames {
    pub fn from_btf(btf: &KernelBtf) -> Self {
        Self::from_names(
            btf.enum_with_member("TCP_ESTABLISHED")
                .into_iter()
                .filter_map(|(n, v)| Some((v as u32, n.strip_prefix("TCP_")?.to_string()))),
        )
    }

    /// Names this tcptrace does not know (TCP_MAX_STATES, or a state
    /// newer than it) are left out.
    pub fn from_names(names: impl IntoIterator<Item = (u32, String)>) -> Self {
        let states = names
            .into_iter()
            .filter_map(|(v, n)| Some((v, n.parse::<TcpState>().ok()?)))
            .collect();
        Self { states }
    }

    pub fn state(&self, value: u32) -> Option<TcpState> {
        self.states.get(&value).copied()
    }

    pub fn value(&self, state: TcpState) -> Option<u32> {
        self.states
            .iter()
            .find(|(_, s)| **s == state)
            .map(|(v, _)| *v)
    }

    pub fn numbers(&self) -> Result<TcpStates> {
        let v = |s: TcpState| {
            self.value(s)
                .ok_or_else(|| anyhow!("kernel BTF has no TCP_{s} state"))
        };
        Ok(TcpStates {
            established: v(TcpState::Established)?,
            syn_sent: v(TcpState::SynSent)?,
            syn_recv: v(TcpState::SynRecv)?,
            fin_wait1: v(TcpState::FinWait1)?,
            close: v(TcpState::Close)?,
            listen: v(TcpState::Listen)?,
            time_wait: v(TcpState::TimeWait)?,
            new_syn_recv: v(TcpState::NewSynRecv)?,
            close_wait: v(TcpState::CloseWait)?,
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

    #[test]
    fn picks_the_format_argument_by_kernel() {
        let v = |a, b, c| Some(KernelVersion::new(a, b, c));
        assert_eq!(ct_invalid_fmt_arg(v(6, 1, 0)), 3);
        assert_eq!(ct_invalid_fmt_arg(v(5, 16, 0)), 3);
        assert_eq!(ct_invalid_fmt_arg(v(5, 15, 91)), 2);
        assert_eq!(ct_invalid_fmt_arg(v(4, 19, 0)), 2);
        assert_eq!(ct_invalid_fmt_arg(None), 3, "unknown: the current layout");
    }

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn finds_raw_tracepoint_arguments_by_type() {
        // kfree_skb on 6.1 and on 6.12+ (rx_sk added).
        let v61 = args(&["struct sk_buff *", "void *", "enum skb_drop_reason"]);
        let v612 = args(&[
            "struct sk_buff *",
            "void *",
            "enum skb_drop_reason",
            "struct sock *",
        ]);
        assert_eq!(arg_of_type(&v61, "enum skb_drop_reason"), 2);
        assert_eq!(arg_of_type(&v61, "void *"), 1);
        assert_eq!(arg_of_type(&v61, "struct sock *"), NO_ARG);
        assert_eq!(arg_of_type(&v612, "struct sock *"), 3);
        // tcp_send_reset before 6.10 has no reason.
        let old = args(&["struct sock *", "struct sk_buff *"]);
        assert_eq!(arg_of_type(&old, "enum sk_rst_reason"), NO_ARG);
    }
}
