//! Filling and flushing a lab namespace's conntrack table over ctnetlink,
//! to reproduce "nf_conntrack: table full, dropping packet".
//!
//! `nf_conntrack_max` is host-wide (read-only in a child namespace) but the
//! entry count is per namespace, so a lab namespace's table can be filled
//! to the host's maximum without touching the root namespace. The entries
//! are TCP ESTABLISHED, ASSURED and long-lived, which conntrack's
//! early_drop never evicts; they are not traffic (tuples in 10.244.240.0/24
//! to 10.96.250.1:443, which no lab pod or Service uses) and die with the
//! namespace.
//!
//! The messages are built by hand (IPCTNL_MSG_CT_NEW, as `conntrack -I`
//! sends them, one batch of many per `sendmsg`): about 260,000 entries take
//! a few seconds and about 64 MB of kernel memory.
use std::{
    fs,
    os::{
        fd::{AsRawFd as _, OwnedFd},
        unix::fs::MetadataExt as _,
    },
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use nix::{
    errno::Errno,
    sys::{
        socket::{
            AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv,
            sendto, setsockopt, socket, sockopt,
        },
        time::TimeVal,
    },
};

use super::Lab;
use tcptrace::node::sysctl::parse_conntrack_stats;

use crate::netns::{in_netns, read_sysctl};

/// Refuse to fill tables larger than this (the loops stay bounded).
pub const MAX_ENTRIES: u64 = 4 << 20;
/// A fill or flush gives up after this long.
const DEADLINE: Duration = Duration::from_secs(60);
/// Source ports per source address of the filler tuples.
const PORTS_PER_ADDR: u64 = 50_000;

// linux/netlink.h
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLA_F_NESTED: u16 = 1 << 15;
const NLMSG_HDRLEN: usize = 16;
// linux/netfilter/nfnetlink.h, nfnetlink_conntrack.h
const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_STATUS: u16 = 3;
const CTA_PROTOINFO: u16 = 4;
const CTA_TIMEOUT: u16 = 7;
const CTA_TUPLE_IP: u16 = 1;
const CTA_TUPLE_PROTO: u16 = 2;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
const CTA_PROTO_NUM: u16 = 1;
const CTA_PROTO_SRC_PORT: u16 = 2;
const CTA_PROTO_DST_PORT: u16 = 3;
const CTA_PROTOINFO_TCP: u16 = 1;
const CTA_PROTOINFO_TCP_STATE: u16 = 1;
// linux/netfilter/nf_conntrack_common.h, nf_conntrack_tcp.h
const IPS_SEEN_REPLY: u32 = 1 << 1;
const IPS_ASSURED: u32 = 1 << 2;
const IPS_CONFIRMED: u32 = 1 << 3;
const TCP_CONNTRACK_ESTABLISHED: u8 = 3;
const IPPROTO_TCP: u8 = 6;
const AF_INET: u8 = libc::AF_INET as u8;

/// The filler entries' timeout: far longer than any lab lives.
const ENTRY_TIMEOUT_S: u32 = 3600;
/// Entries per `sendmsg` (156 bytes each).
const BATCH: usize = 1024;

/// What a fill did.
#[derive(Clone, Copy, Debug)]
pub struct Fill {
    /// Entries this fill created.
    pub inserted: u64,
    /// The namespace's entry count afterwards.
    pub count: u64,
    /// nf_conntrack_max (host-wide).
    pub max: u64,
    pub elapsed: Duration,
}

/// Why a fill cannot run here (no conntrack, no ctnetlink): the scenario
/// is skipped rather than failed.
#[derive(Debug)]
pub struct Unsupported(pub String);

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unsupported {}

/// The namespace's conntrack entry count and the host's maximum.
pub fn count_and_max(netns: &str) -> Result<(u64, u64)> {
    let read = |key: &str| -> Result<u64> {
        let text = read_sysctl(netns, key).map_err(|e| {
            anyhow!(Unsupported(format!(
                "conntrack is not available in {netns}: {e:#}"
            )))
        })?;
        text.parse()
            .with_context(|| format!("parsing {key} in {netns}: {text:?}"))
    };
    Ok((
        read("net.netfilter.nf_conntrack_count")?,
        read("net.netfilter.nf_conntrack_max")?,
    ))
}

/// The lab node's `/proc/net/stat/nf_conntrack` drop counter (summed over
/// CPUs).
pub fn node_drops(lab: &Lab) -> Result<u64> {
    let text = in_netns(&lab.node_netns_name, "lab-ct-stat", || {
        fs::read_to_string("/proc/thread-self/net/stat/nf_conntrack")
    })?
    .context("reading the lab node's /proc/net/stat/nf_conntrack")?;
    Ok(parse_conntrack_stats(&text)
        .context("parsing the lab node's /proc/net/stat/nf_conntrack")?
        .drop)
}

/// Fills the lab node's conntrack table up to nf_conntrack_max.
pub fn fill_node(lab: &Lab) -> Result<Fill> {
    let start = Instant::now();
    let netns = lab.node_netns_name.clone();
    let (count, max) = count_and_max(&netns)?;
    if max == 0 || max > MAX_ENTRIES {
        return Err(Unsupported(format!(
            "nf_conntrack_max is {max}: the lab fills tables of 1 to {MAX_ENTRIES} entries"
        ))
        .into());
    }
    let want = max.saturating_sub(count);
    let inode = lab.node_netns;
    let inserted = in_netns(&netns, "lab-ct-fill", move || -> Result<u64> {
        let s = CtSocket::open(inode)?;
        s.insert(want)
    })??;
    let (count, max) = count_and_max(&netns)?;
    Ok(Fill {
        inserted,
        count,
        max,
        elapsed: start.elapsed(),
    })
}

/// Deletes every conntrack entry of the lab node (`conntrack -F` there).
/// Returns the entry count afterwards.
pub fn flush_node(lab: &Lab) -> Result<u64> {
    let netns = lab.node_netns_name.clone();
    let inode = lab.node_netns;
    in_netns(&netns, "lab-ct-flush", move || -> Result<()> {
        CtSocket::open(inode)?.flush()
    })??;
    Ok(count_and_max(&netns)?.0)
}

/// A NETLINK_NETFILTER socket of the calling thread's namespace.
struct CtSocket {
    fd: OwnedFd,
    seq: u32,
}

impl CtSocket {
    /// Opens the socket after checking that the calling thread is in the
    /// namespace `inode` (never the root namespace by mistake).
    fn open(inode: u32) -> Result<Self> {
        let here = fs::metadata("/proc/thread-self/ns/net")
            .context("stat /proc/thread-self/ns/net")?
            .ino();
        if here != u64::from(inode) {
            bail!("refusing to change conntrack: this thread is in netns {here}, not {inode}");
        }
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkNetFilter,
        )
        .map_err(|e| anyhow!(Unsupported(format!("NETLINK_NETFILTER socket: {e}"))))?;
        bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).context("binding a netlink socket")?;
        // Big buffers (root may force them past the wmem/rmem limits); a
        // batch must fit in the send buffer.
        let _ = setsockopt(&fd, sockopt::SndBufForce, &(4 << 20));
        let _ = setsockopt(&fd, sockopt::RcvBufForce, &(4 << 20));
        setsockopt(&fd, sockopt::ReceiveTimeout, &TimeVal::new(5, 0))
            .context("setting SO_RCVTIMEO")?;
        Ok(Self { fd, seq: 1 })
    }

    fn send(&self, buf: &[u8]) -> Result<()> {
        let n = sendto(
            self.fd.as_raw_fd(),
            buf,
            &NetlinkAddr::new(0, 0),
            MsgFlags::empty(),
        )
        .context("sending to ctnetlink")?;
        if n != buf.len() {
            bail!("ctnetlink took {n} of {} bytes", buf.len());
        }
        Ok(())
    }

    /// Reads the answers to one batch up to the ack of `last`; returns the
    /// errors (negative errno) of the messages before it, by count.
    fn acks(&self, last: u32, errors: &mut Vec<Errno>) -> Result<()> {
        let mut buf = vec![0u8; 1 << 16];
        // One error per message at most, plus the ack.
        for _ in 0..=BATCH + 1 {
            let n = recv(self.fd.as_raw_fd(), &mut buf, MsgFlags::empty())
                .context("reading ctnetlink's answers")?;
            let mut off = 0;
            while off + NLMSG_HDRLEN <= n {
                let len = u32::from_ne_bytes(buf[off..off + 4].try_into()?) as usize;
                let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into()?);
                let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into()?);
                if len < NLMSG_HDRLEN || off + len > n {
                    bail!("malformed netlink answer ({len} bytes at {off} of {n})");
                }
                if ty == NLMSG_ERROR && len >= NLMSG_HDRLEN + 4 {
                    let code = i32::from_ne_bytes(buf[off + 16..off + 20].try_into()?);
                    if code != 0 {
                        errors.push(Errno::from_raw(-code));
                    }
                    if seq == last {
                        return Ok(());
                    }
                }
                off += align(len);
            }
        }
        bail!("ctnetlink never acknowledged message {last}")
    }

    /// Creates `n` filler entries; stops early when the table is full.
    fn insert(mut self, n: u64) -> Result<u64> {
        let start = Instant::now();
        let mut done = 0u64;
        let mut buf = Vec::with_capacity(BATCH * 192);
        while done < n {
            if start.elapsed() > DEADLINE {
                bail!("filling conntrack: {done} of {n} entries after {DEADLINE:?}");
            }
            buf.clear();
            let batch = (n - done).min(BATCH as u64);
            let mut last = 0;
            for k in 0..batch {
                self.seq = self.seq.wrapping_add(1);
                last = self.seq;
                let flags = if k + 1 == batch { NLM_F_ACK } else { 0 };
                new_entry(&mut buf, done + k, last, flags);
            }
            self.send(&buf)?;
            let mut errors = Vec::new();
            self.acks(last, &mut errors)?;
            let failed = errors.len() as u64;
            done += batch - failed;
            if let Some(&e) = errors.first() {
                // The table is full: what else made entries took the room.
                if errors.iter().all(|&e| e == Errno::ENOMEM) && done > 0 {
                    return Ok(done);
                }
                let msg = format!(
                    "ctnetlink refused {failed} of {batch} new entries: {e} ({})",
                    e.desc()
                );
                if done == 0 && matches!(e, Errno::EOPNOTSUPP | Errno::ENOENT | Errno::EPERM) {
                    return Err(Unsupported(msg).into());
                }
                bail!(msg);
            }
        }
        Ok(done)
    }

    /// IPCTNL_MSG_CT_DELETE without a tuple: flush the namespace's table.
    fn flush(mut self) -> Result<()> {
        let mut buf = Vec::new();
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let at = begin_msg(&mut buf, IPCTNL_MSG_CT_DELETE, NLM_F_ACK, seq);
        end_msg(&mut buf, at);
        self.send(&buf)?;
        let mut errors = Vec::new();
        self.acks(seq, &mut errors)?;
        match errors.first() {
            None => Ok(()),
            Some(e) => bail!("flushing conntrack: {e} ({})", e.desc()),
        }
    }
}

const fn align(n: usize) -> usize {
    (n + 3) & !3
}

/// Starts a ctnetlink message; returns where it starts.
fn begin_msg(buf: &mut Vec<u8>, msg: u16, flags: u16, seq: u32) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by end_msg
    buf.extend_from_slice(&((NFNL_SUBSYS_CTNETLINK << 8) | msg).to_ne_bytes());
    buf.extend_from_slice(&(NLM_F_REQUEST | flags).to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel's
    // struct nfgenmsg: family, NFNETLINK_V0, res_id (big endian).
    buf.extend_from_slice(&[AF_INET, 0, 0, 0]);
    at
}

fn end_msg(buf: &mut [u8], at: usize) {
    let len = (buf.len() - at) as u32;
    buf[at..at + 4].copy_from_slice(&len.to_ne_bytes());
}

fn attr(buf: &mut Vec<u8>, ty: u16, payload: &[u8]) {
    let len = 4 + payload.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(payload);
    buf.resize(buf.len() + (align(len) - len), 0);
}

fn nest(buf: &mut Vec<u8>, ty: u16, inner: impl FnOnce(&mut Vec<u8>)) {
    let at = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    inner(buf);
    let len = (buf.len() - at) as u16;
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

fn tuple(buf: &mut Vec<u8>, ty: u16, src: ([u8; 4], u16), dst: ([u8; 4], u16)) {
    nest(buf, ty, |b| {
        nest(b, CTA_TUPLE_IP, |b| {
            attr(b, CTA_IP_V4_SRC, &src.0);
            attr(b, CTA_IP_V4_DST, &dst.0);
        });
        nest(b, CTA_TUPLE_PROTO, |b| {
            attr(b, CTA_PROTO_NUM, &[IPPROTO_TCP]);
            attr(b, CTA_PROTO_SRC_PORT, &src.1.to_be_bytes());
            attr(b, CTA_PROTO_DST_PORT, &dst.1.to_be_bytes());
        });
    });
}

/// The `i`th filler connection: 10.244.240.(1 + i / 50000):(1024 + i %
/// 50000) -> 10.96.250.1:443.
fn filler(i: u64) -> (([u8; 4], u16), ([u8; 4], u16)) {
    let base = u32::from_be_bytes([10, 244, 240, 1]);
    let src = base + (i / PORTS_PER_ADDR) as u32;
    let port = 1024 + (i % PORTS_PER_ADDR) as u16;
    ((src.to_be_bytes(), port), ([10, 96, 250, 1], 443))
}

/// One IPCTNL_MSG_CT_NEW: an ASSURED TCP ESTABLISHED entry.
fn new_entry(buf: &mut Vec<u8>, i: u64, seq: u32, flags: u16) {
    let (src, dst) = filler(i);
    let at = begin_msg(
        buf,
        IPCTNL_MSG_CT_NEW,
        NLM_F_CREATE | NLM_F_EXCL | flags,
        seq,
    );
    tuple(buf, CTA_TUPLE_ORIG, src, dst);
    tuple(buf, CTA_TUPLE_REPLY, dst, src);
    let status = IPS_SEEN_REPLY | IPS_ASSURED | IPS_CONFIRMED;
    attr(buf, CTA_STATUS, &status.to_be_bytes());
    attr(buf, CTA_TIMEOUT, &ENTRY_TIMEOUT_S.to_be_bytes());
    nest(buf, CTA_PROTOINFO, |b| {
        nest(b, CTA_PROTOINFO_TCP, |b| {
            attr(b, CTA_PROTOINFO_TCP_STATE, &[TCP_CONNTRACK_ESTABLISHED]);
        });
    });
    end_msg(buf, at);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_entry_is_laid_out_as_conntrack_sends_it() {
        let mut buf = Vec::new();
        new_entry(&mut buf, 0, 7, NLM_F_ACK);
        let len = u32::from_ne_bytes(buf[0..4].try_into().unwrap()) as usize;
        assert_eq!(len, buf.len());
        assert_eq!(len % 4, 0);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), 0x100);
        assert_eq!(
            u16::from_ne_bytes([buf[6], buf[7]]),
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
        );
        assert_eq!(u32::from_ne_bytes(buf[8..12].try_into().unwrap()), 7);
        assert_eq!(&buf[16..20], &[AF_INET, 0, 0, 0]);
        // CTA_TUPLE_ORIG > CTA_TUPLE_IP > CTA_IP_V4_SRC
        assert_eq!(
            u16::from_ne_bytes([buf[22], buf[23]]),
            CTA_TUPLE_ORIG | NLA_F_NESTED
        );
        assert_eq!(&buf[28..36], &[8, 0, 1, 0, 10, 244, 240, 1]);
        assert_eq!(&buf[36..44], &[8, 0, 2, 0, 10, 96, 250, 1]);
        // The port of entry 0 is 1024, big endian.
        assert!(buf.windows(6).any(|w| w == [6, 0, 2, 0, 4, 0]));
        assert_eq!(len, 156);
    }

    #[test]
    fn filler_tuples_are_unique_and_stay_in_the_lab_ranges() {
        let mut seen = std::collections::HashSet::new();
        for i in (0..MAX_ENTRIES).step_by(997).chain([MAX_ENTRIES - 1]) {
            let ((src, sport), (dst, _)) = filler(i);
            assert_eq!(&src[..3], &[10, 244, 240], "{i}");
            assert_eq!(&dst[..2], &[10, 96]);
            assert!(sport >= 1024);
            assert!(seen.insert((src, sport)));
        }
    }

    #[test]
    fn a_flush_is_a_bare_delete() {
        let mut buf = Vec::new();
        let at = begin_msg(&mut buf, IPCTNL_MSG_CT_DELETE, NLM_F_ACK, 3);
        end_msg(&mut buf, at);
        assert_eq!(buf.len(), 20);
        assert_eq!(u16::from_ne_bytes([buf[4], buf[5]]), 0x102);
    }
}
