//! Node facts as plain data (sysctls per netns, conntrack counters,
//! NodePorts, middlebox timeouts), read by `node` and used by diagnosis.
use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use serde::Serialize;

/// Kubernetes' default `--service-node-port-range`.
pub const DEFAULT_NODEPORT_RANGE: (u16, u16) = (30000, 32767);

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NodeFacts {
    /// Facts per network namespace, keyed by netns inode.
    pub netns: HashMap<u32, NetnsFacts>,
    /// The namespace that routes/NATs pod traffic: its conntrack is on every
    /// pod's path.
    pub node_netns: Option<u32>,
    /// Known NodePorts -> "namespace/name:port".
    pub nodeports: BTreeMap<u16, String>,
    pub nodeport_range: (u16, u16),
    /// kube-proxy IPVS TCP timeout (`ipvsadm -l --timeout`).
    pub ipvs_tcp_timeout_s: Option<u64>,
    /// Idle timeout of an SDN / load balancer on the path (`--middlebox-timeout`).
    pub middlebox_timeout_s: Option<u64>,
    /// Where several nodes share the kernel (kind): each pod namespace's
    /// node namespace. A namespace missing here is routed by `node_netns`.
    pub node_of: HashMap<u32, u32>,
    /// The NodePorts of those other nodes, by their namespace.
    pub node_nodeports: HashMap<u32, BTreeMap<u16, String>>,
}

impl Default for NodeFacts {
    fn default() -> Self {
        Self {
            netns: HashMap::new(),
            node_netns: None,
            nodeports: BTreeMap::new(),
            nodeport_range: DEFAULT_NODEPORT_RANGE,
            ipvs_tcp_timeout_s: None,
            middlebox_timeout_s: None,
            node_of: HashMap::new(),
            node_nodeports: HashMap::new(),
        }
    }
}

/// The shortest idle timeout on a namespace's path and where it comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathTimeout {
    pub secs: u64,
    /// "conntrack:node", "conntrack:netns", "ipvs" or "middlebox".
    pub source: &'static str,
}

impl PathTimeout {
    /// How people call it in a sentence.
    pub fn describe(&self) -> String {
        let what = match self.source {
            "conntrack:node" => "node conntrack established",
            "conntrack:netns" => "conntrack established",
            "ipvs" => "IPVS",
            _ => "middlebox",
        };
        format!("{} s {what} timeout", self.secs)
    }
}

impl NodeFacts {
    /// Whether `netns` is a node's own namespace.
    pub fn is_node(&self, netns: u32) -> bool {
        self.node_netns == Some(netns) || self.node_nodeports.contains_key(&netns)
    }

    /// The namespace of the node that routes `netns` (itself for a node).
    pub fn node_for(&self, netns: u32) -> Option<u32> {
        if self.is_node(netns) {
            return Some(netns);
        }
        self.node_of.get(&netns).copied().or(self.node_netns)
    }

    /// The NodePorts of node `node`.
    pub fn nodeports_of(&self, node: u32) -> &BTreeMap<u16, String> {
        self.node_nodeports.get(&node).unwrap_or(&self.nodeports)
    }

    /// Each namespace's listen counters, to compare the next reading with.
    pub fn listen_stats(&self) -> HashMap<u32, ListenStats> {
        self.netns
            .iter()
            .filter_map(|(ns, f)| Some((*ns, f.listen?)))
            .collect()
    }

    /// Adds NodePorts (kube-proxy's); ports already known (given on the
    /// command line) keep their name.
    pub fn add_nodeports(&mut self, ports: impl IntoIterator<Item = (u16, String)>) {
        for (port, name) in ports {
            self.nodeports.entry(port).or_insert(name);
        }
    }

    /// Minimum over the conntrack established timeouts of the node namespace
    /// and of `netns`, the IPVS timeout and the middlebox timeout.
    pub fn path_timeout(&self, netns: u32) -> Option<PathTimeout> {
        let ct_timeout = |ns: u32| {
            self.netns
                .get(&ns)
                .and_then(|f| f.ct.as_ref())
                .map(|ct| ct.established_timeout_s)
        };
        let mut candidates = Vec::new();
        let node = self.node_for(netns);
        if let Some(s) = node.and_then(ct_timeout) {
            candidates.push(PathTimeout {
                secs: s,
                source: "conntrack:node",
            });
        }
        if Some(netns) != node
            && let Some(s) = ct_timeout(netns)
        {
            candidates.push(PathTimeout {
                secs: s,
                source: "conntrack:netns",
            });
        }
        // The node's own IPVS where it has virtual services, else the one
        // read for the host's routing namespace.
        let node_ipvs = node
            .and_then(|n| self.netns.get(&n))
            .and_then(|f| f.ipvs.as_ref())
            .and_then(IpvsTimeouts::in_use_tcp_s);
        if let Some(s) = node_ipvs.or(self.ipvs_tcp_timeout_s) {
            candidates.push(PathTimeout {
                secs: s,
                source: "ipvs",
            });
        }
        if let Some(s) = self.middlebox_timeout_s {
            candidates.push(PathTimeout {
                secs: s,
                source: "middlebox",
            });
        }
        // A zero timeout is a misread, not a path that forgets instantly.
        candidates
            .into_iter()
            .filter(|c| c.secs > 0)
            .min_by_key(|c| c.secs)
    }

    pub fn in_nodeport_range(&self, port: u16) -> bool {
        (self.nodeport_range.0..=self.nodeport_range.1).contains(&port)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NetnsFacts {
    pub keepalive_time_s: u64,
    pub keepalive_intvl_s: u64,
    pub keepalive_probes: u64,
    pub port_range: (u16, u16),
    pub reserved_ports: Vec<(u16, u16)>,
    pub tw_reuse: u8,
    /// None when the conntrack module is not loaded.
    pub ct: Option<ConntrackFacts>,
    /// The rules that drop or reject, read only for namespaces where
    /// netfilter dropped a traced connection's packets (None: not read).
    pub drop_rules: Option<Vec<DropRule>>,
    /// TcpExt ListenOverflows / ListenDrops (None: unreadable).
    pub listen: Option<ListenStats>,
    /// Listeners with connections waiting in their accept queue when read,
    /// with their process.
    pub queued_listeners: Vec<QueuedListener>,
    /// IPVS's timeouts in this namespace (None: IPVS not loaded), read over
    /// its generic netlink family.
    pub ipvs: Option<IpvsTimeouts>,
}

/// IPVS's connection timeouts in one namespace, in seconds (0: that
/// protocol is not compiled in), and its virtual services.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct IpvsTimeouts {
    pub tcp_s: u32,
    pub tcp_fin_s: u32,
    pub udp_s: u32,
    /// Virtual services: the timeouts apply only to traffic they schedule.
    pub services: u32,
}

impl IpvsTimeouts {
    /// The TCP established timeout, where IPVS schedules traffic.
    pub fn in_use_tcp_s(&self) -> Option<u64> {
        (self.services > 0 && self.tcp_s > 0).then_some(u64::from(self.tcp_s))
    }
}

/// Connections a namespace's listeners could not take (its SYNs dropped
/// silently: the kernel counts them, it reports no dropped packet).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ListenStats {
    pub overflows: u64,
    pub drops: u64,
}

/// A listener with connections waiting to be accepted (/proc/net/tcp
/// shows the queue's length, not its limit).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct QueuedListener {
    #[serde(serialize_with = "super::text::ip_text::serialize")]
    pub ip: IpAddr,
    pub port: u16,
    /// Connections waiting to be accepted.
    pub queued: u32,
    /// The process holding the listening socket, when found.
    pub pid: Option<u32>,
    pub comm: Option<String>,
}

/// A netfilter rule that drops, rejects or source-NATs packets, as
/// `iptables-save -c` or `nft list ruleset` prints it, with its packet
/// counter when it has one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DropRule {
    pub text: String,
    pub packets: Option<u64>,
}

/// What a rule does to the packets it matches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleTarget {
    Drop,
    /// Drops and answers (an ICMP error or a TCP reset).
    Reject,
    /// Rewrites the source address (MASQUERADE, SNAT).
    Snat,
}

/// A Service port kube-proxy rejects because it has no endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoEndpoints {
    pub ip: IpAddr,
    pub port: u16,
    /// `namespace/name:port`, as kube-proxy names it.
    pub service: String,
}

impl DropRule {
    pub fn target(&self) -> Option<RuleTarget> {
        let t = &self.text;
        let words: Vec<&str> = t.split_whitespace().collect();
        let has = |w: &str| words.contains(&w);
        if t.contains("-j MASQUERADE") || t.contains("-j SNAT") || has("masquerade") || has("snat")
        {
            Some(RuleTarget::Snat)
        } else if t.contains("-j REJECT") || has("reject") || t.contains(": goto reject-chain") {
            Some(RuleTarget::Reject)
        } else if t.contains("-j DROP") || has("drop") {
            Some(RuleTarget::Drop)
        } else {
            None
        }
    }

    /// kube-proxy's rule for a Service port without endpoints: iptables
    /// mode's `-d IP/32 ... --comment "ns/svc:port has no endpoints" ...
    /// --dport PORT -j REJECT`, or an element of nftables mode's
    /// `no-endpoint-services` map, `IP . tcp . PORT comment "ns/svc:port" :
    /// goto reject-chain`.
    pub fn no_endpoints(&self) -> Option<NoEndpoints> {
        let t = &self.text;
        if let Some(element) = t.split_once("no-endpoint-services: ").map(|(_, e)| e) {
            let mut parts = element.split(" . ");
            let ip = parts.next()?.trim().parse().ok()?;
            if parts.next()?.trim() != "tcp" {
                return None;
            }
            let rest = parts.next()?;
            let port = rest.split_whitespace().next()?.parse().ok()?;
            let service = quoted_after(rest, "comment ")?.to_string();
            return Some(NoEndpoints { ip, port, service });
        }
        let comment = quoted_after(t, "--comment ")?;
        let service = comment.strip_suffix(" has no endpoints")?.to_string();
        if !t.contains("-j REJECT") || !t.contains("-p tcp") {
            return None;
        }
        let ip = word_after(t, "-d ")?.trim_end_matches("/32").parse().ok()?;
        let port = word_after(t, "--dport ")?.parse().ok()?;
        Some(NoEndpoints { ip, port, service })
    }

    /// The source ports a MASQUERADE or SNAT rule maps to, when it names
    /// them ("1000-1001").
    pub fn snat_ports(&self) -> Option<&str> {
        let t = &self.text;
        if let Some(p) = word_after(t, "--to-ports ") {
            return Some(p);
        }
        let to = word_after(t, "--to-source ").or_else(|| word_after(t, " to "))?;
        to.rsplit_once(':')
            .map(|(_, ports)| ports)
            .filter(|p| !p.is_empty())
    }

    /// Whether the NAT picks ports at random (`--random-fully`, `fully-random`).
    pub fn random_fully(&self) -> bool {
        self.text.contains("--random-fully") || self.text.contains("fully-random")
    }
}

/// The word after `key` in `text`.
fn word_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.split_once(key)?.1.split_whitespace().next()
}

/// The double-quoted text after `key` in `text`.
fn quoted_after<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    let rest = text.split_once(key)?.1.strip_prefix('"')?;
    rest.split_once('"').map(|(q, _)| q)
}

impl Default for NetnsFacts {
    /// Linux defaults.
    fn default() -> Self {
        Self {
            keepalive_time_s: 7200,
            keepalive_intvl_s: 75,
            keepalive_probes: 9,
            port_range: (32768, 60999),
            reserved_ports: Vec::new(),
            tw_reuse: 2,
            ct: None,
            drop_rules: None,
            listen: None,
            queued_listeners: Vec::new(),
            ipvs: None,
        }
    }
}

impl NetnsFacts {
    /// Ephemeral ports in `ip_local_port_range`.
    pub fn port_range_size(&self) -> u32 {
        range_len(self.port_range)
    }

    pub fn is_reserved(&self, port: u16) -> bool {
        self.reserved_ports
            .iter()
            .any(|&(lo, hi)| (lo..=hi).contains(&port))
    }

    /// Reserved ports that fall inside the ephemeral range.
    pub fn reserved_in_range(&self) -> u32 {
        count_uncovered(self.port_range, &[])
            - count_uncovered(self.port_range, &self.reserved_ports)
    }

    /// Ephemeral ports inside `range` that are not reserved: the ports
    /// `connect()` may pick there.
    pub fn unreserved_overlap(&self, range: (u16, u16)) -> u32 {
        match intersect(self.port_range, range) {
            Some(r) => count_uncovered(r, &self.reserved_ports),
            None => 0,
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConntrackFacts {
    pub established_timeout_s: u64,
    pub be_liberal: bool,
    pub loose: bool,
    pub count: u64,
    pub max: u64,
    pub stats: ConntrackStats,
    /// A rule drops `ctstate INVALID` (from the node's iptables/nft rules;
    /// the /proc collector cannot see rules and leaves it false).
    pub invalid_drop_rule: bool,
}

/// /proc/net/stat/nf_conntrack, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ConntrackStats {
    pub found: u64,
    pub invalid: u64,
    pub insert_failed: u64,
    pub drop: u64,
    pub early_drop: u64,
}

/// Formats ranges the way `ip_local_reserved_ports` takes them.
pub fn format_port_list(ranges: &[(u16, u16)]) -> String {
    merge_ranges(ranges)
        .iter()
        .map(|&(lo, hi)| {
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            }
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// Sorted, with overlapping and adjacent ranges joined.
pub fn merge_ranges(ranges: &[(u16, u16)]) -> Vec<(u16, u16)> {
    let mut v: Vec<(u16, u16)> = ranges.iter().copied().filter(|r| r.0 <= r.1).collect();
    v.sort_unstable();
    let mut out: Vec<(u16, u16)> = Vec::with_capacity(v.len());
    for (lo, hi) in v {
        match out.last_mut() {
            Some(last) if u32::from(lo) <= u32::from(last.1) + 1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// The ephemeral range to suggest: the larger side clear of the NodePort
/// range (ports >= 1024), if it holds more ports than `current`.
pub fn wider_range(current: (u16, u16), nodeports: (u16, u16)) -> Option<(u16, u16)> {
    let above = (nodeports.1 < u16::MAX).then(|| (nodeports.1 + 1, u16::MAX));
    let below = (nodeports.0 > 1025).then(|| (1024, nodeports.0 - 1));
    [above, below]
        .into_iter()
        .flatten()
        .max_by_key(|r| range_len(*r))
        .filter(|r| range_len(*r) > range_len(current))
}

pub fn intersect(a: (u16, u16), b: (u16, u16)) -> Option<(u16, u16)> {
    let lo = a.0.max(b.0);
    let hi = a.1.min(b.1);
    (lo <= hi).then_some((lo, hi))
}

fn range_len((lo, hi): (u16, u16)) -> u32 {
    if lo > hi {
        0
    } else {
        u32::from(hi) - u32::from(lo) + 1
    }
}

/// Ports of `range` not covered by any of `holes`.
fn count_uncovered(range: (u16, u16), holes: &[(u16, u16)]) -> u32 {
    let covered: u32 = merge_ranges(holes)
        .iter()
        .filter_map(|&h| intersect(range, h))
        .map(range_len)
        .sum();
    range_len(range) - covered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_arithmetic() {
        let ns = NetnsFacts {
            port_range: (1024, 65535),
            reserved_ports: vec![(30000, 30999), (8080, 8080), (31000, 31009)],
            ..NetnsFacts::default()
        };
        assert_eq!(ns.port_range_size(), 64512);
        assert_eq!(ns.reserved_in_range(), 1011);
        assert!(ns.is_reserved(31005) && !ns.is_reserved(31010));
        assert_eq!(ns.unreserved_overlap((30000, 32767)), 2768 - 1010);
        assert_eq!(NetnsFacts::default().unreserved_overlap((30000, 32767)), 0);
        assert_eq!(
            wider_range((40000, 40999), (30000, 32767)),
            Some((32768, 65535))
        );
        assert_eq!(wider_range((32768, 65535), (30000, 32767)), None);
        assert_eq!(wider_range((1024, 65535), (30000, 32767)), None);
        assert_eq!(
            wider_range((50000, 50100), (40000, 65000)),
            Some((1024, 39999))
        );
        assert_eq!(
            format_port_list(&[(31000, 31009), (8080, 8080), (30000, 30999)]),
            "8080,30000-31009"
        );
    }

    #[test]
    fn path_timeout_is_the_minimum_with_its_source() {
        let ct = |secs| NetnsFacts {
            ct: Some(ConntrackFacts {
                established_timeout_s: secs,
                ..ConntrackFacts::default()
            }),
            ..NetnsFacts::default()
        };
        let mut f = NodeFacts {
            node_netns: Some(1),
            ipvs_tcp_timeout_s: Some(900),
            ..NodeFacts::default()
        };
        f.netns.insert(1, ct(432000));
        f.netns.insert(2, ct(600));
        assert_eq!(
            f.path_timeout(2),
            Some(PathTimeout {
                secs: 600,
                source: "conntrack:netns"
            })
        );
        assert_eq!(f.path_timeout(3).map(|t| t.source), Some("ipvs"));
        f.middlebox_timeout_s = Some(60);
        assert_eq!(
            f.path_timeout(2).map(|t| t.describe()).as_deref(),
            Some("60 s middlebox timeout")
        );
        f.netns.insert(1, ct(5));
        assert_eq!(
            f.path_timeout(2).map(|t| (t.secs, t.source)),
            Some((5, "conntrack:node"))
        );
        assert_eq!(NodeFacts::default().path_timeout(1), None);
    }

    #[test]
    fn a_node_s_own_ipvs_counts_only_where_it_has_virtual_services() {
        let ipvs = |services| NetnsFacts {
            ipvs: Some(IpvsTimeouts {
                tcp_s: 20,
                tcp_fin_s: 120,
                udp_s: 300,
                services,
            }),
            ..NetnsFacts::default()
        };
        let mut f = NodeFacts {
            node_netns: Some(1),
            ..NodeFacts::default()
        };
        // Pod 3 is routed by node 2, whose IPVS schedules traffic.
        f.node_of.insert(3, 2);
        f.netns.insert(2, ipvs(2));
        assert_eq!(
            f.path_timeout(3),
            Some(PathTimeout {
                secs: 20,
                source: "ipvs"
            })
        );
        // IPVS loaded but no virtual service: its timeout is no path's.
        f.netns.insert(2, ipvs(0));
        assert_eq!(f.path_timeout(3), None);
    }
}
