//! Static audit of node facts: the settings that will cause a failure
//! cause, flagged before any connection fails. Pure.
use std::collections::HashMap;

use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::model::{Cause, Confidence};

use super::causes::suggested_keepalive_s;
use crate::model::facts::{NetnsFacts, NodeFacts, format_port_list, wider_range};

/// Ranges smaller than this run out under modest connection churn.
const SMALL_PORT_RANGE: u32 = 1024;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Finding {
    pub netns: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub netns_name: Option<String>,
    pub cause: Cause,
    pub confidence: Confidence,
    pub detail: String,
    pub fix: String,
    pub evidence: Map<String, Value>,
}

/// Findings for every namespace in `facts`, ordered by namespace and cause.
/// `names` gives display names of namespaces (pod or /run/netns name).
pub fn audit(facts: &NodeFacts, names: &HashMap<u32, String>) -> Vec<Finding> {
    let mut nss: Vec<(&u32, &NetnsFacts)> = facts.netns.iter().collect();
    nss.sort_by_key(|(ns, _)| **ns);
    let mut out = Vec::new();
    for (&ns, f) in nss {
        let name = names.get(&ns).cloned();
        let place = if facts.node_netns == Some(ns) {
            "on the node".to_string()
        } else {
            format!(
                "in network namespace {}",
                name.clone().unwrap_or_else(|| ns.to_string())
            )
        };
        let mut push = |cause, confidence, detail: String, fix: String, evidence: Value| {
            out.push(Finding {
                netns: ns,
                netns_name: name.clone(),
                cause,
                confidence,
                detail,
                fix,
                evidence: match evidence {
                    Value::Object(m) => m,
                    _ => Map::new(),
                },
            });
        };

        if let Some(t) = facts.path_timeout(ns)
            && f.keepalive_time_s >= t.secs
        {
            let ka = suggested_keepalive_s(t.secs);
            push(
                Cause::IdleTimeout,
                Confidence::Possible,
                format!(
                    "tcp_keepalive_time is {} s, not below the {}: idle connections are forgotten before the first keepalive",
                    f.keepalive_time_s,
                    t.describe()
                ),
                format!(
                    "sysctl -w net.ipv4.tcp_keepalive_time={ka} {place}, and enable SO_KEEPALIVE on long-lived connections"
                ),
                json!({"keepalive_time_s": f.keepalive_time_s, "timeout_s": t.secs, "timeout_source": t.source}),
            );
        }

        let owns_nodeports = facts.node_netns.is_none_or(|n| n == ns);
        let exposed = f.unreserved_overlap(facts.nodeport_range);
        if owns_nodeports && exposed > 0 {
            let (lo, hi) = facts.nodeport_range;
            let known: Vec<u16> = facts
                .nodeports
                .keys()
                .copied()
                .filter(|&p| (f.port_range.0..=f.port_range.1).contains(&p) && !f.is_reserved(p))
                .collect();
            let mut list = f.reserved_ports.clone();
            list.push(facts.nodeport_range);
            push(
                Cause::NodeportCollision,
                if known.is_empty() {
                    Confidence::Possible
                } else {
                    Confidence::Likely
                },
                format!(
                    "ip_local_port_range {}-{} overlaps the NodePort range {lo}-{hi}: {exposed} NodePort-range ports are not reserved ({} known NodePorts exposed)",
                    f.port_range.0,
                    f.port_range.1,
                    known.len()
                ),
                format!(
                    "sysctl -w net.ipv4.ip_local_reserved_ports={} {place}",
                    format_port_list(&list)
                ),
                json!({
                    "port_range": format!("{}-{}", f.port_range.0, f.port_range.1),
                    "nodeport_range": format!("{lo}-{hi}"),
                    "unreserved_overlap": exposed,
                    "exposed_nodeports": known,
                }),
            );
        }

        if let Some(ct) = &f.ct {
            if ct.max > 0 && ct.count.saturating_mul(100) > ct.max.saturating_mul(80) {
                let full = ct.count.saturating_mul(100) >= ct.max.saturating_mul(95);
                push(
                    Cause::ConntrackTableFull,
                    if full {
                        Confidence::Likely
                    } else {
                        Confidence::Possible
                    },
                    format!(
                        "conntrack table holds {} of {} entries ({}%)",
                        ct.count,
                        ct.max,
                        ct.count.saturating_mul(100) / ct.max
                    ),
                    format!(
                        "sysctl -w net.netfilter.nf_conntrack_max={} {place}, or shorten conntrack timeouts; find the top talkers with conntrack -L",
                        ct.max.saturating_mul(2)
                    ),
                    json!({"count": ct.count, "max": ct.max}),
                );
            }
            if facts.node_netns == Some(ns) && !ct.be_liberal && !ct.invalid_drop_rule {
                push(
                    Cause::ConntrackInvalid,
                    Confidence::Possible,
                    "nf_conntrack_tcp_be_liberal is 0 and no rule drops ctstate INVALID: an out-of-window segment can escape reverse NAT and reset a Service connection".into(),
                    "sysctl -w net.netfilter.nf_conntrack_tcp_be_liberal=1 on the node, or iptables -t filter -I INPUT -m conntrack --ctstate INVALID -j DROP".into(),
                    json!({"be_liberal": ct.be_liberal, "invalid_drop_rule": ct.invalid_drop_rule}),
                );
            }
        }

        let usable = f.port_range_size().saturating_sub(f.reserved_in_range());
        if usable < SMALL_PORT_RANGE {
            let fix = match wider_range(f.port_range, facts.nodeport_range) {
                Some((a, b)) => {
                    format!("sysctl -w net.ipv4.ip_local_port_range=\"{a} {b}\" {place}")
                }
                None => format!("widen net.ipv4.ip_local_port_range {place}"),
            };
            push(
                Cause::PortExhaustion,
                Confidence::Possible,
                format!(
                    "only {usable} ephemeral ports ({}-{}): connections to one destination run out at {usable}",
                    f.port_range.0, f.port_range.1
                ),
                fix,
                json!({
                    "port_range": format!("{}-{}", f.port_range.0, f.port_range.1),
                    "port_range_size": f.port_range_size(),
                    "reserved_in_range": f.reserved_in_range(),
                }),
            );
        }
    }
    out.sort_by_key(|f| (f.netns, f.cause));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::facts::ConntrackFacts;

    fn node() -> NetnsFacts {
        NetnsFacts {
            port_range: (1024, 65535),
            ct: Some(ConntrackFacts {
                established_timeout_s: 432000,
                count: 900,
                max: 1000,
                ..ConntrackFacts::default()
            }),
            ..NetnsFacts::default()
        }
    }

    fn facts() -> NodeFacts {
        let mut f = NodeFacts {
            node_netns: Some(1),
            ipvs_tcp_timeout_s: Some(900),
            ..NodeFacts::default()
        };
        f.nodeports.insert(31000, "default/web:80".into());
        f.netns.insert(1, node());
        // A pod with a short keepalive and a tiny port range.
        f.netns.insert(
            2,
            NetnsFacts {
                keepalive_time_s: 600,
                port_range: (40000, 40099),
                ..NetnsFacts::default()
            },
        );
        f
    }

    #[test]
    fn flags_each_risk_once_with_computed_fixes() {
        let names = HashMap::from([(2, "default/client".to_string())]);
        let got = audit(&facts(), &names);
        let summary: Vec<(u32, Cause, Confidence)> = got
            .iter()
            .map(|f| (f.netns, f.cause, f.confidence))
            .collect();
        assert_eq!(
            summary,
            vec![
                (1, Cause::IdleTimeout, Confidence::Possible),
                (1, Cause::ConntrackInvalid, Confidence::Possible),
                (1, Cause::ConntrackTableFull, Confidence::Possible),
                (1, Cause::NodeportCollision, Confidence::Likely),
                (2, Cause::PortExhaustion, Confidence::Possible),
            ]
        );
        assert_eq!(
            got[0].fix,
            "sysctl -w net.ipv4.tcp_keepalive_time=450 on the node, and enable SO_KEEPALIVE on long-lived connections"
        );
        assert_eq!(
            got[2].fix,
            "sysctl -w net.netfilter.nf_conntrack_max=2000 on the node, or shorten conntrack timeouts; find the top talkers with conntrack -L"
        );
        assert_eq!(
            got[3].fix,
            "sysctl -w net.ipv4.ip_local_reserved_ports=30000-32767 on the node"
        );
        assert_eq!(got[3].evidence["unreserved_overlap"], json!(2768));
        assert_eq!(got[3].evidence["exposed_nodeports"], json!([31000]));
        assert_eq!(got[4].netns_name.as_deref(), Some("default/client"));
        assert_eq!(
            got[4].fix,
            "sysctl -w net.ipv4.ip_local_port_range=\"32768 65535\" in network namespace default/client"
        );
        assert_eq!(
            got[4].detail,
            "only 100 ephemeral ports (40000-40099): connections to one destination run out at 100"
        );
    }

    #[test]
    fn a_healthy_node_has_no_findings() {
        let mut f = facts();
        f.ipvs_tcp_timeout_s = None;
        f.nodeports.clear();
        let n = f.netns.get_mut(&1).expect("node");
        n.port_range = (32768, 60999);
        if let Some(ct) = n.ct.as_mut() {
            ct.count = 10;
            ct.be_liberal = true;
        }
        f.netns.get_mut(&2).expect("pod").port_range = (32768, 60999);
        assert_eq!(audit(&f, &HashMap::new()), vec![]);
        // Reserving the NodePort range or dropping INVALID removes those findings.
        let mut f = facts();
        let n = f.netns.get_mut(&1).expect("node");
        n.reserved_ports = vec![(30000, 32767)];
        if let Some(ct) = n.ct.as_mut() {
            ct.invalid_drop_rule = true;
        }
        let causes: Vec<Cause> = audit(&f, &HashMap::new())
            .iter()
            .filter(|x| x.netns == 1)
            .map(|x| x.cause)
            .collect();
        assert_eq!(causes, vec![Cause::IdleTimeout, Cause::ConntrackTableFull]);
    }
}
