//! Reads the facts of one network namespace from /proc. `/proc/sys/net` and
//! `/proc/thread-self/net` resolve by the calling thread's namespace, so the
//! reads happen on a short-lived thread that joins the target namespace;
//! the caller's threads never change namespace.
use std::{
    fs, io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

use crate::model::facts::{
    ConntrackFacts, ConntrackStats, ListenStats, NetnsFacts, QueuedListener,
};

/// Reads the sysctls and conntrack counters of the namespace behind `path`
/// (`/proc/<pid>/ns/net`, `/run/netns/NAME`). Returns its inode and facts.
pub fn collect_netns(path: &Path) -> Result<(u32, NetnsFacts)> {
    let ctx = || format!("reading sysctls of netns {}", path.display());
    let inode = super::netns::inode(path).with_context(ctx)?;
    let (facts, ipvs) = super::netns::enter(path, "tcptrace-netns", || {
        (
            read_netns_facts(Path::new("/proc")),
            super::ipvs::read_here(),
        )
    })
    .with_context(ctx)?;
    let mut facts = facts.with_context(ctx)?;
    // IPVS unreadable: its timeouts stay unknown, the rest stands.
    facts.ipvs = ipvs.ok().flatten();
    Ok((inode, facts))
}

/// Reads the facts of the calling thread's namespace below `proc_root`.
fn read_netns_facts(proc_root: &Path) -> Result<NetnsFacts> {
    let ipv4 = proc_root.join("sys/net/ipv4");
    let nf = proc_root.join("sys/net/netfilter");
    let read =
        |p: PathBuf| fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()));
    let int = |p: PathBuf| -> Result<u64> {
        let text = read(p.clone())?;
        parse_int(&text).with_context(|| format!("parsing {}", p.display()))
    };
    let keepalive_time_s = int(ipv4.join("tcp_keepalive_time"))?;
    let keepalive_intvl_s = int(ipv4.join("tcp_keepalive_intvl"))?;
    let keepalive_probes = int(ipv4.join("tcp_keepalive_probes"))?;
    let p = ipv4.join("ip_local_port_range");
    let port_range =
        parse_port_range(&read(p.clone())?).with_context(|| format!("parsing {}", p.display()))?;
    let p = ipv4.join("ip_local_reserved_ports");
    let reserved_ports = parse_reserved_ports(&read(p.clone())?)
        .with_context(|| format!("parsing {}", p.display()))?;
    let tw_reuse = u8::try_from(int(ipv4.join("tcp_tw_reuse"))?).unwrap_or(u8::MAX);

    // Without the conntrack module these files do not exist.
    let ct = match fs::read_to_string(nf.join("nf_conntrack_tcp_timeout_established")) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).context("reading nf_conntrack_tcp_timeout_established"),
        Ok(text) => {
            let p = proc_root.join("thread-self/net/stat/nf_conntrack");
            Some(ConntrackFacts {
                established_timeout_s: parse_int(&text)
                    .context("parsing nf_conntrack_tcp_timeout_established")?,
                be_liberal: int(nf.join("nf_conntrack_tcp_be_liberal"))? != 0,
                loose: int(nf.join("nf_conntrack_tcp_loose"))? != 0,
                count: int(nf.join("nf_conntrack_count"))?,
                max: int(nf.join("nf_conntrack_max"))?,
                stats: parse_conntrack_stats(&read(p.clone())?)
                    .with_context(|| format!("parsing {}", p.display()))?,
                invalid_drop_rule: false,
            })
        }
    };
    Ok(NetnsFacts {
        keepalive_time_s,
        keepalive_intvl_s,
        keepalive_probes,
        port_range,
        reserved_ports,
        tw_reuse,
        ct,
        drop_rules: None,
        listen: fs::read_to_string(proc_root.join("thread-self/net/netstat"))
            .ok()
            .and_then(|t| parse_listen_stats(&t)),
        queued_listeners: Vec::new(),
        ipvs: None,
    })
}

/// `ListenOverflows` and `ListenDrops` of the `TcpExt:` lines of
/// /proc/net/netstat (a header line of names, then one of values).
pub fn parse_listen_stats(text: &str) -> Option<ListenStats> {
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let names: Vec<&str> = lines.next()?.split_whitespace().collect();
    let values: Vec<&str> = lines.next()?.split_whitespace().collect();
    let get = |name: &str| -> Option<u64> {
        let i = names.iter().position(|n| *n == name)?;
        values.get(i)?.parse().ok()
    };
    Some(ListenStats {
        overflows: get("ListenOverflows")?,
        drops: get("ListenDrops")?,
    })
}

/// A listening socket of /proc/net/tcp{,6}: its port, accept queue and
/// inode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ListenerRow {
    pub ip: IpAddr,
    pub port: u16,
    pub queued: u32,
    pub inode: u64,
}

/// Listening sockets (state 0A) of a /proc/net/tcp table: for them
/// `rx_queue` is the accept queue's length.
pub fn parse_listeners(text: &str) -> Vec<ListenerRow> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) != Some(&"0A") {
                return None;
            }
            let (ip, port) = f.get(1)?.split_once(':')?;
            let (_, rx) = f.get(4)?.split_once(':')?;
            Some(ListenerRow {
                ip: parse_proc_ip(ip)?,
                port: u16::from_str_radix(port, 16).ok()?,
                queued: u32::from_str_radix(rx, 16).ok()?,
                inode: f.get(9)?.parse().ok()?,
            })
        })
        .collect()
}

/// An address of /proc/net/tcp{,6}: the address's bytes as 32-bit words
/// in the kernel's byte order, each printed as hex.
fn parse_proc_ip(hex: &str) -> Option<IpAddr> {
    let mut bytes = [0u8; 16];
    let words = hex.len() / 8;
    if !hex.len().is_multiple_of(8) || !matches!(words, 1 | 4) {
        return None;
    }
    for (i, chunk) in bytes.chunks_mut(4).take(words).enumerate() {
        let word = u32::from_str_radix(hex.get(i * 8..i * 8 + 8)?, 16).ok()?;
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    Some(if words == 1 {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    } else {
        IpAddr::V6(Ipv6Addr::from(bytes))
    })
}

/// Listeners of the namespace behind `path` with connections waiting to
/// be accepted, with the process holding each. Costs a walk of every
/// process's descriptors: read only when the namespace's listeners overflow.
pub fn queued_listeners(path: &Path) -> Vec<QueuedListener> {
    super::netns::enter(path, "tcptrace-listen", || {
        read_queued_listeners(Path::new("/proc"))
    })
    .unwrap_or_default()
}

/// Listeners of the calling thread's namespace with connections waiting
/// to be accepted, with the process holding each (through its inode).
fn read_queued_listeners(proc_root: &Path) -> Vec<QueuedListener> {
    let full: Vec<ListenerRow> = ["thread-self/net/tcp", "thread-self/net/tcp6"]
        .iter()
        .filter_map(|t| fs::read_to_string(proc_root.join(t)).ok())
        .flat_map(|t| parse_listeners(&t))
        .filter(|l| l.queued > 0)
        .collect();
    if full.is_empty() {
        return Vec::new();
    }
    let owners =
        super::host::socket_owners(proc_root, &full.iter().map(|l| l.inode).collect::<Vec<_>>());
    full.into_iter()
        .map(|l| {
            let owner = owners.get(&l.inode);
            QueuedListener {
                ip: l.ip,
                port: l.port,
                queued: l.queued,
                pid: owner.map(|o| o.0),
                comm: owner.map(|o| o.1.clone()),
            }
        })
        .collect()
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("expected an integer, found {0:?}")]
    Integer(String),
    #[error("expected a port range \"LOW HIGH\", found {0:?}")]
    PortRange(String),
    #[error("expected a port list like \"30000-32767,8080\", found {0:?}")]
    PortList(String),
    #[error("nf_conntrack stat table has no header or a row of the wrong width")]
    ConntrackStat,
}

/// A single-integer sysctl ("7200\n").
pub fn parse_int<T: std::str::FromStr>(text: &str) -> Result<T, ParseError> {
    let t = text.trim();
    t.parse().map_err(|_| ParseError::Integer(t.to_string()))
}

/// `ip_local_port_range` ("32768\t60999\n").
pub fn parse_port_range(text: &str) -> Result<(u16, u16), ParseError> {
    let err = || ParseError::PortRange(text.trim().to_string());
    let mut it = text.split_whitespace();
    let lo: u16 = it.next().and_then(|s| s.parse().ok()).ok_or_else(err)?;
    let hi: u16 = it.next().and_then(|s| s.parse().ok()).ok_or_else(err)?;
    if it.next().is_some() || lo > hi {
        return Err(err());
    }
    Ok((lo, hi))
}

/// `ip_local_reserved_ports` ("30000-32767,8080\n", or empty).
pub fn parse_reserved_ports(text: &str) -> Result<Vec<(u16, u16)>, ParseError> {
    let t = text.trim();
    if t.is_empty() {
        return Ok(Vec::new());
    }
    let err = || ParseError::PortList(t.to_string());
    t.split(',')
        .map(|part| {
            let part = part.trim();
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (part, part),
            };
            let lo: u16 = lo.parse().map_err(|_| err())?;
            let hi: u16 = hi.parse().map_err(|_| err())?;
            if lo > hi {
                return Err(err());
            }
            Ok((lo, hi))
        })
        .collect()
}

/// /proc/net/stat/nf_conntrack: a header naming the columns, then one row of
/// hex numbers per CPU. Columns are found by name because their set changed
/// between kernels.
pub fn parse_conntrack_stats(text: &str) -> Result<ConntrackStats, ParseError> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header: Vec<&str> = lines
        .next()
        .ok_or(ParseError::ConntrackStat)?
        .split_whitespace()
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name);
    let cols = [
        col("found"),
        col("invalid"),
        col("insert_failed"),
        col("drop"),
        col("early_drop"),
    ];
    let mut sums = [0u64; 5];
    for line in lines {
        let row: Vec<&str> = line.split_whitespace().collect();
        if row.len() != header.len() {
            return Err(ParseError::ConntrackStat);
        }
        for (sum, c) in sums.iter_mut().zip(cols) {
            if let Some(i) = c {
                let v = u64::from_str_radix(row[i], 16).map_err(|_| ParseError::ConntrackStat)?;
                *sum = sum.saturating_add(v);
            }
        }
    }
    let [found, invalid, insert_failed, drop, early_drop] = sums;
    Ok(ConntrackStats {
        found,
        invalid,
        insert_failed,
        drop,
        early_drop,
    })
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::MetadataExt as _, process::Command};

    use super::*;

    #[test]
    fn listen_counters_and_full_listeners() {
        let netstat = "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPHPHits\n\
                       TcpExt: 0 7 9 120\n\
                       IpExt: InNoRoutes\nIpExt: 0\n";
        assert_eq!(
            parse_listen_stats(netstat),
            Some(ListenStats {
                overflows: 7,
                drops: 9
            })
        );
        assert_eq!(parse_listen_stats("IpExt: x\nIpExt: 1\n"), None);
        let tcp = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
   0: 0100007F:1B58 00000000:0000 0A 00000001:00000002 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0\n\
   1: 0100007F:1B58 0100007F:9C40 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 20 4 30 10 -1\n";
        assert_eq!(
            parse_listeners(tcp),
            vec![ListenerRow {
                ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
                port: 7000,
                queued: 2,
                inode: 4242
            }]
        );
    }

    #[test]
    fn proc_net_addresses() {
        assert_eq!(
            parse_proc_ip("0100007F"),
            Some("127.0.0.1".parse().unwrap())
        );
        assert_eq!(
            parse_proc_ip("0200F40A"),
            Some("10.244.0.2".parse().unwrap())
        );
        assert_eq!(
            parse_proc_ip("00000000000000000000000001000000"),
            Some("::1".parse().unwrap())
        );
        assert_eq!(parse_proc_ip("0100007"), None);
        assert_eq!(parse_proc_ip("zz00007F"), None);
    }

    // Captured from a 6.18 kernel with two CPUs (values edited to be non-zero).
    const STAT_618: &str = "\
entries  clashres found new invalid ignore delete chainlength insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
00000007  00000000 0000000a 00000000 00000002 00000000 00000000 00000000 00000000 00000001 00000010 00000003 00000000  00000000 00000000 00000000 00000000
00000007  00000001 00000005 00000000 000000ff 00000000 00000000 00000000 00000000 00000000 00000001 00000000 00000000  00000000 00000000 00000000 00000000
";

    // Older layout (4.x/5.x): different column set.
    const STAT_OLD: &str = "\
entries  searched found new invalid ignore delete delete_list insert insert_failed drop early_drop icmp_error  expect_new expect_create expect_delete search_restart
000001b4  00000000 00000000 00000000 00000004 0000125a 00000000 00000000 00000000 00000000 00000000 00000000 00000000  00000000 00000000 00000000 00000031
";

    #[test]
    fn conntrack_stats_sums_cpus_by_column_name() {
        assert_eq!(
            parse_conntrack_stats(STAT_618),
            Ok(ConntrackStats {
                found: 0xf,
                invalid: 0x101,
                insert_failed: 1,
                drop: 0x11,
                early_drop: 3,
            })
        );
        assert_eq!(parse_conntrack_stats(STAT_OLD).map(|s| s.invalid), Ok(4));
    }

    #[test]
    fn conntrack_stats_rejects_garbage() {
        assert_eq!(parse_conntrack_stats(""), Err(ParseError::ConntrackStat));
        assert_eq!(
            parse_conntrack_stats("entries invalid\n0000 zz\n"),
            Err(ParseError::ConntrackStat)
        );
        assert_eq!(
            parse_conntrack_stats("entries invalid\n0000\n"),
            Err(ParseError::ConntrackStat)
        );
    }

    #[test]
    fn sysctl_values() {
        assert_eq!(parse_port_range("32768\t60999\n"), Ok((32768, 60999)));
        assert_eq!(parse_port_range("1024 65535"), Ok((1024, 65535)));
        assert!(parse_port_range("60999 32768").is_err());
        assert!(parse_port_range("32768").is_err());
        assert!(parse_port_range("1 2 3").is_err());
        assert_eq!(
            parse_reserved_ports("30000-32767,8080\n"),
            Ok(vec![(30000, 32767), (8080, 8080)])
        );
        assert_eq!(parse_reserved_ports("\n"), Ok(vec![]));
        assert!(parse_reserved_ports("9-1").is_err());
        assert!(parse_reserved_ports("x").is_err());
        assert_eq!(parse_int::<u64>("7200\n"), Ok(7200));
        assert_eq!(parse_int::<u8>("2\n"), Ok(2));
        assert!(parse_int::<u8>("300").is_err());
    }

    fn write(root: &Path, rel: &str, text: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().expect("has a parent")).expect("mkdir");
        fs::write(p, text).expect("write");
    }

    fn fake_ipv4(root: &Path) {
        write(root, "sys/net/ipv4/tcp_keepalive_time", "600\n");
        write(root, "sys/net/ipv4/tcp_keepalive_intvl", "30\n");
        write(root, "sys/net/ipv4/tcp_keepalive_probes", "10\n");
        write(root, "sys/net/ipv4/ip_local_port_range", "1024\t65535\n");
        write(
            root,
            "sys/net/ipv4/ip_local_reserved_ports",
            "30000-32767\n",
        );
        write(root, "sys/net/ipv4/tcp_tw_reuse", "1\n");
    }

    #[test]
    fn missing_conntrack_is_not_an_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        fake_ipv4(dir.path());
        let f = read_netns_facts(dir.path()).expect("facts");
        assert_eq!(
            f,
            NetnsFacts {
                keepalive_time_s: 600,
                keepalive_intvl_s: 30,
                keepalive_probes: 10,
                port_range: (1024, 65535),
                reserved_ports: vec![(30000, 32767)],
                tw_reuse: 1,
                ct: None,
                drop_rules: None,
                listen: None,
                queued_listeners: Vec::new(),
                ipvs: None,
            }
        );
    }

    #[test]
    fn conntrack_files_are_read() {
        let dir = tempfile::tempdir().expect("tempdir");
        fake_ipv4(dir.path());
        let r = dir.path();
        write(
            r,
            "sys/net/netfilter/nf_conntrack_tcp_timeout_established",
            "432000\n",
        );
        write(r, "sys/net/netfilter/nf_conntrack_tcp_be_liberal", "1\n");
        write(r, "sys/net/netfilter/nf_conntrack_tcp_loose", "0\n");
        write(r, "sys/net/netfilter/nf_conntrack_count", "17\n");
        write(r, "sys/net/netfilter/nf_conntrack_max", "262144\n");
        write(
            r,
            "thread-self/net/stat/nf_conntrack",
            "entries  found invalid insert_failed drop early_drop\n00000011  00000001 00000002 00000000 00000000 00000000\n",
        );
        let ct = read_netns_facts(r).expect("facts").ct.expect("conntrack");
        assert_eq!(
            (ct.established_timeout_s, ct.be_liberal, ct.loose),
            (432000, true, false)
        );
        assert_eq!((ct.count, ct.max, ct.stats.invalid), (17, 262144, 2));
    }

    #[test]
    fn errors_name_the_namespace_and_file() {
        let err = collect_netns(Path::new("/nonexistent/netns/x")).expect_err("must fail");
        assert!(format!("{err:#}").starts_with("reading sysctls of netns /nonexistent/netns/x: "));
        let dir = tempfile::tempdir().expect("tempdir");
        fake_ipv4(dir.path());
        write(dir.path(), "sys/net/ipv4/tcp_keepalive_time", "soon\n");
        let err = read_netns_facts(dir.path()).expect_err("must fail");
        assert!(
            format!("{err:#}").contains("tcp_keepalive_time: expected an integer, found \"soon\"")
        );
    }

    /// Deletes the namespace when dropped, also when the test panics.
    struct NetnsGuard(String);

    impl Drop for NetnsGuard {
        fn drop(&mut self) {
            let _ = Command::new("ip")
                .args(["netns", "delete", &self.0])
                .status();
        }
    }

    fn run(args: &[&str]) {
        let out = Command::new(args[0])
            .args(&args[1..])
            .output()
            .expect("spawn");
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn root_collects_a_private_namespace() {
        if !nix::unistd::geteuid().is_root() {
            return crate::testing::cannot_run("root_collects_a_private_namespace needs root");
        }
        let name = format!("tcptrace-diag-{}", std::process::id());
        run(&["ip", "netns", "add", &name]);
        let _guard = NetnsGuard(name.clone());
        let set = |kv: &str| run(&["ip", "netns", "exec", &name, "sysctl", "-q", "-w", kv]);
        set("net.ipv4.tcp_keepalive_time=77");
        set("net.ipv4.ip_local_port_range=40000 40009");
        set("net.ipv4.ip_local_reserved_ports=40005");

        let path = PathBuf::from(format!("/run/netns/{name}"));
        let (inode, f) = collect_netns(&path).expect("collect");
        assert_eq!(inode as u64, fs::metadata(&path).expect("stat").ino());
        assert_eq!(f.keepalive_time_s, 77);
        assert_eq!(f.port_range, (40000, 40009));
        assert_eq!(f.reserved_ports, vec![(40005, 40005)]);
        assert_eq!(f.port_range_size(), 10);
        // Conntrack sysctls exist in every namespace once the module is loaded.
        let loaded = Path::new("/proc/sys/net/netfilter/nf_conntrack_max").exists();
        assert_eq!(f.ct.is_some(), loaded);

        // The root namespace is untouched and this thread never moved.
        let (root_inode, root) =
            collect_netns(Path::new("/proc/self/ns/net")).expect("collect self");
        assert_ne!(root_inode, inode);
        assert_ne!(root.port_range, (40000, 40009));
        let here = fs::metadata("/proc/thread-self/ns/net")
            .expect("stat")
            .ino();
        assert_eq!(here, u64::from(root_inode));
    }
}
