//! Kubernetes Services from kube-proxy's rules on the node: iptables mode
//! (`iptables-save -t nat`), nftables mode (`nft -j list ruleset`, table
//! `kube-proxy`) and IPVS virtual servers (`/proc/net/ip_vs`, which carry no
//! names). TCP only: tcptrace traces TCP.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use anyhow::Context as _;
use serde_json::Value;

use crate::{model::ServiceRef, node::kube_proxy::RuleDumps};

/// What kube-proxy exposes on this node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceMap {
    /// ClusterIP, external and load-balancer IPs.
    virtual_ips: HashMap<(IpAddr, u16), ServiceRef>,
    nodeports: HashMap<u16, ServiceRef>,
    ipvs: HashSet<(IpAddr, u16)>,
    /// Why some source could not be read (missing tool, unreadable output).
    pub warnings: Vec<String>,
}

impl ServiceMap {
    /// The Services in what kube-proxy's tools printed; what could not be
    /// read or parsed becomes a warning.
    pub fn from_dumps(dumps: &RuleDumps) -> Self {
        let mut map = ServiceMap::default();
        for dump in &dumps.iptables {
            match dump {
                Ok(out) => map.merge(ServiceMap::from_iptables_save(out)),
                Err(w) => map.warnings.push(w.clone()),
            }
        }
        match &dumps.nft_json {
            Some(Ok(out)) => match ServiceMap::from_nft_json(out) {
                Ok(nft) => map.merge(nft),
                Err(e) => map.warnings.push(format!("{e:#}")),
            },
            Some(Err(w)) => map.warnings.push(w.clone()),
            None => {}
        }
        if let Some(text) = &dumps.ip_vs {
            map.merge(ServiceMap::from_ip_vs(text));
        }
        map
    }

    /// NodePort -> "namespace/name[:port]", as the facts name them.
    pub fn nodeport_names(&self) -> impl Iterator<Item = (u16, String)> + '_ {
        self.nodeports.iter().map(|(port, svc)| {
            let name = match &svc.port_name {
                Some(p) => format!("{}/{}:{p}", svc.namespace, svc.name),
                None => format!("{}/{}", svc.namespace, svc.name),
            };
            (*port, name)
        })
    }

    /// The Service behind a ClusterIP / external IP and port.
    pub fn virtual_ip(&self, ip: IpAddr, port: u16) -> Option<&ServiceRef> {
        self.virtual_ips.get(&(ip, port))
    }

    pub fn nodeport(&self, port: u16) -> Option<&ServiceRef> {
        self.nodeports.get(&port)
    }

    /// All TCP NodePorts, for the NodePort / ephemeral range collision audit.
    pub fn nodeports(&self) -> impl Iterator<Item = (u16, &ServiceRef)> {
        self.nodeports.iter().map(|(port, svc)| (*port, svc))
    }

    /// An IPVS TCP virtual server (kube-proxy ipvs mode; 900 s idle timeout).
    pub fn is_ipvs_virtual(&self, ip: IpAddr, port: u16) -> bool {
        self.ipvs.contains(&(ip, port))
    }

    pub fn is_empty(&self) -> bool {
        self.virtual_ips.is_empty() && self.nodeports.is_empty() && self.ipvs.is_empty()
    }

    /// Adds `other`'s entries; existing entries win.
    pub fn merge(&mut self, other: ServiceMap) {
        for (k, v) in other.virtual_ips {
            self.virtual_ips.entry(k).or_insert(v);
        }
        for (k, v) in other.nodeports {
            self.nodeports.entry(k).or_insert(v);
        }
        self.ipvs.extend(other.ipvs);
        self.warnings.extend(other.warnings);
    }

    /// Parses `iptables-save -t nat` (or `ip6tables-save`) output.
    pub fn from_iptables_save(text: &str) -> Self {
        let mut map = Self::default();
        for line in text.lines() {
            let Some(rule) = line.strip_prefix("-A ") else {
                continue;
            };
            let tokens = tokenize(rule);
            let Some(chain) = tokens.first() else {
                continue;
            };
            let rule = Rule::parse(&tokens[1..]);
            if rule.proto != Some("tcp") {
                continue;
            }
            let (Some(port), Some(svc)) = (rule.dport, rule.comment.and_then(service_from_comment))
            else {
                continue;
            };
            match chain.as_str() {
                "KUBE-SERVICES" => {
                    if let Some(ip) = rule.dst.and_then(host_addr) {
                        map.virtual_ips.entry((ip, port)).or_insert(svc);
                    }
                }
                "KUBE-NODEPORTS" => {
                    map.nodeports.entry(port).or_insert(svc);
                }
                _ => {}
            }
        }
        map
    }

    /// Parses `nft -j list ruleset`: the verdict maps of kube-proxy's tables.
    pub fn from_nft_json(text: &str) -> anyhow::Result<Self> {
        let doc: Value = serde_json::from_str(text).context("nft -j output is not JSON")?;
        let items = doc
            .get("nftables")
            .and_then(Value::as_array)
            .context("nft -j output has no \"nftables\" array")?;
        let mut map = Self::default();
        for m in items.iter().filter_map(|i| i.get("map")) {
            if m.get("table").and_then(Value::as_str) != Some("kube-proxy") {
                continue;
            }
            let nodeports = match m.get("name").and_then(Value::as_str) {
                Some("service-ips" | "no-endpoint-services") => false,
                Some("service-nodeports" | "no-endpoint-nodeports") => true,
                _ => continue,
            };
            let elems = m.get("elem").and_then(Value::as_array).map(Vec::as_slice);
            for elem in elems.unwrap_or_default() {
                let Some((key, svc)) = nft_element(elem) else {
                    continue;
                };
                match (nodeports, key.as_slice()) {
                    (false, [ip, proto, port]) if is_tcp(proto) => {
                        if let (Some(ip), Some(port)) =
                            (ip.as_str().and_then(|s| s.parse().ok()), nft_port(port))
                        {
                            map.virtual_ips.entry((ip, port)).or_insert(svc);
                        }
                    }
                    (true, [proto, port]) if is_tcp(proto) => {
                        if let Some(port) = nft_port(port) {
                            map.nodeports.entry(port).or_insert(svc);
                        }
                    }
                    _ => {}
                }
            }
        }
        Ok(map)
    }

    /// Parses `/proc/net/ip_vs`: TCP virtual servers, without names.
    pub fn from_ip_vs(text: &str) -> Self {
        let mut map = Self::default();
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            if fields.next() != Some("TCP") {
                continue;
            }
            if let Some(vs) = fields.next().and_then(parse_ip_vs_addr) {
                map.ipvs.insert(vs);
            }
        }
        map
    }
}

/// Options of one iptables rule that name a Service.
#[derive(Default)]
struct Rule<'a> {
    dst: Option<&'a str>,
    proto: Option<&'a str>,
    dport: Option<u16>,
    comment: Option<&'a str>,
}

impl<'a> Rule<'a> {
    fn parse(tokens: &'a [String]) -> Self {
        let mut rule = Rule::default();
        let mut negated = false;
        let mut it = tokens.iter();
        while let Some(tok) = it.next() {
            if tok == "!" {
                negated = true;
                continue;
            }
            let value = match tok.as_str() {
                "-d" | "-p" | "--dport" | "--comment" => it.next().map(String::as_str),
                _ => None,
            };
            // A negated match ("! -d x") does not name the destination.
            if !std::mem::take(&mut negated) {
                match tok.as_str() {
                    "-d" => rule.dst = value,
                    "-p" => rule.proto = value,
                    "--dport" => rule.dport = value.and_then(|v| v.parse().ok()),
                    "--comment" => rule.comment = value,
                    _ => {}
                }
            }
        }
        rule
    }
}

/// Splits an iptables-save rule on spaces, keeping "quoted strings" whole.
fn tokenize(rule: &str) -> Vec<String> {
    let mut tokens = Vec::new();
    let mut cur = String::new();
    let (mut quoted, mut escaped, mut in_token) = (false, false, false);
    for c in rule.chars() {
        match c {
            _ if escaped => {
                cur.push(c);
                escaped = false;
            }
            '\\' if quoted => escaped = true,
            '"' => {
                quoted = !quoted;
                in_token = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_token {
                    tokens.push(std::mem::take(&mut cur));
                    in_token = false;
                }
            }
            c => {
                cur.push(c);
                in_token = true;
            }
        }
    }
    if in_token {
        tokens.push(cur);
    }
    tokens
}

/// `10.96.0.10/32` -> the address; wider prefixes are not one Service.
fn host_addr(cidr: &str) -> Option<IpAddr> {
    let (addr, len) = cidr.split_once('/').unwrap_or((cidr, ""));
    let ip: IpAddr = addr.parse().ok()?;
    let host = matches!(
        (ip, len),
        (_, "") | (IpAddr::V4(_), "32") | (IpAddr::V6(_), "128")
    );
    host.then_some(ip)
}

/// `kube-system/kube-dns:dns-tcp cluster IP` or `default/metrics` -> ServiceRef.
fn service_from_comment(comment: &str) -> Option<ServiceRef> {
    let word = comment.split_whitespace().next()?;
    let (namespace, rest) = word.split_once('/')?;
    let (name, port_name) = match rest.split_once(':') {
        Some((name, port)) => (name, (!port.is_empty()).then(|| port.to_string())),
        None => (rest, None),
    };
    (!namespace.is_empty() && !name.is_empty()).then(|| ServiceRef {
        namespace: namespace.to_string(),
        name: name.to_string(),
        port_name,
    })
}

/// `service-ULMVA6XW-default/web/tcp/http` (or `external-...`) -> ServiceRef.
fn service_from_chain(chain: &str) -> Option<ServiceRef> {
    let base = chain
        .strip_prefix("service-")
        .or_else(|| chain.strip_prefix("external-"))?;
    let (_hash, rest) = base.split_once('-')?;
    let mut it = rest.splitn(4, '/');
    let (namespace, name, _proto, port) = (it.next()?, it.next()?, it.next()?, it.next()?);
    (!namespace.is_empty() && !name.is_empty()).then(|| ServiceRef {
        namespace: namespace.to_string(),
        name: name.to_string(),
        port_name: (!port.is_empty()).then(|| port.to_string()),
    })
}

/// One `[key, verdict]` map element: the key's parts and the Service, named
/// by the goto target chain or else by the element comment.
fn nft_element(elem: &Value) -> Option<(Vec<Value>, ServiceRef)> {
    let [key, verdict] = elem.as_array()?.as_slice() else {
        return None;
    };
    // Elements with a comment are wrapped: {"elem": {"val": key, "comment": ".."}}.
    let (key, comment) = match key.get("elem") {
        Some(wrapped) => (
            wrapped.get("val")?,
            wrapped.get("comment").and_then(Value::as_str),
        ),
        None => (key, None),
    };
    let parts = key.get("concat")?.as_array()?.clone();
    let target = ["goto", "jump"]
        .iter()
        .find_map(|v| verdict.get(v)?.get("target")?.as_str());
    let svc = target
        .and_then(service_from_chain)
        .or_else(|| comment.and_then(service_from_comment))?;
    Some((parts, svc))
}

fn is_tcp(proto: &Value) -> bool {
    proto.as_str() == Some("tcp") || proto.as_u64() == Some(6)
}

fn nft_port(port: &Value) -> Option<u16> {
    match port {
        Value::Number(n) => n.as_u64().and_then(|p| u16::try_from(p).ok()),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
}

/// `0A60000A:0035` or `[fd00:0010:...:000a]:0035` (hex port).
fn parse_ip_vs_addr(s: &str) -> Option<(IpAddr, u16)> {
    let (addr, port) = s.rsplit_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let ip = match addr.strip_prefix('[').and_then(|a| a.strip_suffix(']')) {
        Some(v6) => IpAddr::V6(v6.parse::<Ipv6Addr>().ok()?),
        None if addr.len() == 8 => IpAddr::V4(Ipv4Addr::from(u32::from_str_radix(addr, 16).ok()?)),
        None => return None,
    };
    Some((ip, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn svc(ns: &str, name: &str, port: Option<&str>) -> ServiceRef {
        ServiceRef {
            namespace: ns.into(),
            name: name.into(),
            port_name: port.map(str::to_string),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn iptables_save_cluster_ips_and_nodeports() {
        let map = ServiceMap::from_iptables_save(include_str!("fixtures/iptables-save-nat"));
        assert_eq!(
            map.virtual_ip(ip("10.96.0.10"), 53),
            Some(&svc("kube-system", "kube-dns", Some("dns-tcp")))
        );
        assert_eq!(
            map.virtual_ip(ip("10.96.0.1"), 443),
            Some(&svc("default", "kubernetes", Some("https")))
        );
        assert_eq!(
            map.virtual_ip(ip("192.0.2.50"), 80),
            Some(&svc("default", "web", Some("http")))
        );
        // Unnamed port.
        assert_eq!(
            map.virtual_ip(ip("10.96.7.7"), 9090),
            Some(&svc("default", "metrics", None))
        );
        assert_eq!(map.virtual_ip(ip("10.96.0.10"), 80), None);
        assert_eq!(
            map.virtual_ips.len(),
            5,
            "udp and non-service rules are skipped"
        );
        assert_eq!(
            map.nodeport(30080),
            Some(&svc("default", "web", Some("http")))
        );
        assert_eq!(map.nodeport(31090), Some(&svc("default", "metrics", None)));
        assert_eq!(map.nodeport(30514), None, "udp nodeport");
        let mut ports: Vec<u16> = map.nodeports().map(|(p, _)| p).collect();
        ports.sort();
        assert_eq!(ports, [30080, 31090]);
    }

    #[test]
    fn nft_kube_proxy_maps() {
        let map =
            ServiceMap::from_nft_json(include_str!("fixtures/nft-ruleset.json")).expect("parse");
        assert_eq!(
            map.virtual_ip(ip("10.96.0.10"), 53),
            Some(&svc("kube-system", "kube-dns", Some("dns-tcp")))
        );
        assert_eq!(
            map.virtual_ip(ip("192.0.2.50"), 80),
            Some(&svc("default", "web", Some("http")))
        );
        assert_eq!(
            map.virtual_ip(ip("10.96.7.7"), 9090),
            Some(&svc("default", "metrics", None))
        );
        assert_eq!(
            map.virtual_ip(ip("fd00:10:96::a"), 53),
            Some(&svc("kube-system", "kube-dns", Some("dns-tcp")))
        );
        // Named by the element comment (no-endpoint map).
        assert_eq!(
            map.virtual_ip(ip("10.96.50.5"), 8080),
            Some(&svc("default", "empty", Some("http")))
        );
        assert_eq!(
            map.virtual_ip(ip("10.99.99.99"), 80),
            None,
            "not the kube-proxy table"
        );
        assert_eq!(
            map.nodeport(30080),
            Some(&svc("default", "web", Some("http")))
        );
        assert_eq!(
            map.nodeport(31500),
            Some(&svc("default", "empty", Some("http")))
        );
        assert_eq!(map.nodeport(30514), None, "udp");
        assert!(
            ServiceMap::from_nft_json("{\"nftables\": []}")
                .expect("empty")
                .is_empty()
        );
        assert!(ServiceMap::from_nft_json("not json").is_err());
        assert!(ServiceMap::from_nft_json("{}").is_err());
    }

    #[test]
    fn ip_vs_virtual_servers() {
        let map = ServiceMap::from_ip_vs(include_str!("fixtures/ip_vs"));
        assert!(map.is_ipvs_virtual(ip("10.96.0.10"), 53));
        assert!(map.is_ipvs_virtual(ip("10.96.112.40"), 80));
        assert!(map.is_ipvs_virtual(ip("fd00:10:96::a"), 53));
        assert!(
            !map.is_ipvs_virtual(ip("10.244.0.4"), 53),
            "real servers are not virtual"
        );
        assert_eq!(map.ipvs.len(), 3, "udp and fwmark services are skipped");
    }

    #[test]
    fn merge_keeps_first_and_tokenizer_handles_quotes() {
        let mut a = ServiceMap::from_iptables_save(include_str!("fixtures/iptables-save-nat"));
        a.merge(ServiceMap::from_ip_vs(include_str!("fixtures/ip_vs")));
        assert!(
            a.virtual_ip(ip("10.96.0.10"), 53).is_some() && a.is_ipvs_virtual(ip("10.96.0.10"), 53)
        );
        assert_eq!(
            tokenize(r#"X -m comment --comment "a \"b\" c" -j Y"#),
            ["X", "-m", "comment", "--comment", "a \"b\" c", "-j", "Y"]
        );
        assert_eq!(host_addr("10.0.0.0/8"), None);
        assert_eq!(
            service_from_chain("endpoint-2LHZ6OQD-default/web/tcp/http__10.244.0.7/8080"),
            None
        );
    }
}
