//! kube-proxy's and IPVS's state in a namespace, read as their tools print
//! it (attribution parses it into Services) and the firewall rules that
//! matter to diagnosis.
use std::{fs, path::Path};

use super::netns::run_in;

/// What kube-proxy's rules look like in one namespace: each tool's output,
/// or why it could not be read.
#[derive(Clone, Debug, Default)]
pub struct RuleDumps {
    /// `iptables-save -t nat` and `ip6tables-save -t nat`.
    pub iptables: Vec<Result<String, String>>,
    /// `nft -j list ruleset`.
    pub nft_json: Option<Result<String, String>>,
    /// `/proc/net/ip_vs`, when IPVS is loaded.
    pub ip_vs: Option<String>,
}

/// Reads kube-proxy's rules, in the network namespace of `netns_file`
/// (`/proc/<pid>/ns/net`, `/run/netns/<name>`) when given. A missing tool
/// or namespace becomes a reason in the dump, not an error.
pub fn read_rules(netns_file: Option<&Path>) -> RuleDumps {
    if let Some(f) = netns_file
        && !f.exists()
    {
        let why = format!(
            "network namespace file {} not found: pass /proc/<pid>/ns/net or /run/netns/<name>",
            f.display()
        );
        return RuleDumps {
            iptables: vec![Err(why)],
            ..RuleDumps::default()
        };
    }
    let iptables = ["iptables-save", "ip6tables-save"]
        .into_iter()
        .map(|tool| run(netns_file, tool, &["-t", "nat"]))
        .collect();
    let nft_json = Some(run(netns_file, "nft", &["-j", "list", "ruleset"]));
    // No ip_vs file means IPVS is not loaded: nothing to report.
    let ip_vs = match netns_file {
        Some(_) => run_in(netns_file, "cat", &["/proc/net/ip_vs"]).ok(),
        None => fs::read_to_string("/proc/net/ip_vs").ok(),
    };
    RuleDumps {
        iptables,
        nft_json,
        ip_vs,
    }
}

/// What a rule tool printed, or a warning that Services from it are unnamed.
fn run(netns_file: Option<&Path>, tool: &str, args: &[&str]) -> Result<String, String> {
    run_in(netns_file, tool, args)
        .map_err(|e| format!("{e}; Services from {tool} will not be named"))
}

/// Whether the namespace's firewall drops packets conntrack marks INVALID
/// (the other fix for kubernetes #74839), in iptables or nftables rules.
pub fn drops_invalid(netns_file: &Path) -> bool {
    let iptables = run_in(Some(netns_file), "iptables-save", &["-t", "filter"]);
    let nft = run_in(Some(netns_file), "nft", &["list", "ruleset"]);
    [iptables, nft]
        .into_iter()
        .flatten()
        .any(|rules| rules.lines().any(is_invalid_drop_rule))
}

/// `-A FORWARD -m conntrack --ctstate INVALID -j DROP` (iptables-save) or
/// `ct state invalid drop` (nft list ruleset).
fn is_invalid_drop_rule(line: &str) -> bool {
    let line = line.trim();
    let iptables = line.contains("--ctstate INVALID") && line.ends_with("-j DROP");
    let nft = line.starts_with("ct state invalid") && line.ends_with("drop");
    iptables || nft
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_invalid_drop_rules_of_both_firewalls() {
        assert!(is_invalid_drop_rule(
            "-A FORWARD -m conntrack --ctstate INVALID -j DROP"
        ));
        assert!(is_invalid_drop_rule("\t\tct state invalid drop"));
        assert!(!is_invalid_drop_rule(
            "-A FORWARD -m conntrack --ctstate INVALID -j ACCEPT"
        ));
        assert!(!is_invalid_drop_rule(
            "-A KUBE-FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"
        ));
        assert!(!is_invalid_drop_rule("ct state established,related accept"));
    }

    #[test]
    fn a_missing_namespace_or_tool_is_a_reason_not_an_error() {
        let dumps = read_rules(Some(Path::new("/nonexistent/netns")));
        assert!(
            matches!(&dumps.iptables[..], [Err(w)] if w.contains("not found")),
            "{dumps:?}"
        );
        let w = run(None, "tcptrace-no-such-tool", &[]).expect_err("missing tool");
        assert!(w.contains("cannot run tcptrace-no-such-tool"), "{w}");
    }
}
