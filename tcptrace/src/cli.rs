//! Command line.
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "tcptrace",
    version,
    about = "Explains TCP connection failures on Kubernetes nodes",
    long_about = "Traces TCP failure signals in the kernel (retransmits, resets, drops, \
                  failed connects and binds), names the pod that suffered them and \
                  explains the cause. Without a subcommand it traces."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub trace: TraceArgs,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Show every kernel hook and whether it is live on this kernel.
    Probes {
        #[arg(long, value_enum, default_value_t = TableFormat::Table)]
        format: TableFormat,
    },
    /// Drive the TUI from a recorded NDJSON stream ("-" reads stdin).
    Replay {
        file: PathBuf,
        /// Playback speed relative to the recording (default: as fast as possible).
        #[arg(long, value_parser = parse_speed)]
        speed: Option<f64>,
    },
    /// Check every network namespace on the node for the risks tcptrace
    /// diagnoses, before they fail.
    Audit {
        #[arg(long, value_enum, default_value_t = TableFormat::Table)]
        format: TableFormat,
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Reproduce every failure tcptrace explains in throwaway network
    /// namespaces and check the verdicts on this kernel (needs root).
    Selftest {
        /// Scenarios to run (default: all): port_exhaustion,
        /// connection_refused, syn_timeout, keepalive_race,
        /// application_abort, netfilter_drop, idle_timeout,
        /// nodeport_collision, conntrack_invalid, conntrack_table_full.
        #[arg(value_name = "SCENARIO")]
        scenarios: Vec<String>,
        #[arg(long, value_enum, default_value_t = TableFormat::Table)]
        format: TableFormat,
    },
}

/// Where node facts come from.
#[derive(Debug, Args)]
pub struct NodeArgs {
    /// Where the host's /proc, /sys, /var/log/pods and /run/netns are mounted.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub host_root: PathBuf,
    /// The network namespace that routes and NATs pod traffic, as a file
    /// (default: tcptrace's own; an agent runs with the host's network).
    #[arg(long, value_name = "FILE")]
    pub node_netns: Option<PathBuf>,
    /// Idle timeout of a middlebox on the path (an SDN or load balancer)
    /// that forgets idle connections.
    #[arg(long, value_name = "SECS")]
    pub middlebox_timeout: Option<u64>,
    /// A NodePort of this node, as PORT or PORT=namespace/name:port (repeat).
    #[arg(long = "nodeport", value_name = "PORT[=SERVICE]", value_parser = parse_nodeport)]
    pub nodeports: Vec<(u16, String)>,
}

impl NodeArgs {
    pub fn node_netns(&self) -> PathBuf {
        self.node_netns
            .clone()
            .unwrap_or_else(|| PathBuf::from("/proc/self/ns/net"))
    }
}

fn parse_speed(s: &str) -> Result<f64, String> {
    let speed: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if !speed.is_finite() || speed < 0.0 {
        return Err(format!("{s} is not a speed (use a positive number)"));
    }
    Ok(speed)
}

fn parse_nodeport(s: &str) -> Result<(u16, String), String> {
    let (port, service) = s.split_once('=').unwrap_or((s, ""));
    let port: u16 = port
        .parse()
        .map_err(|_| format!("{port:?} is not a port number"))?;
    Ok((port, service.to_string()))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// The live TUI when stdout is a terminal, NDJSON otherwise.
    Auto,
    /// The live TUI.
    Tui,
    /// NDJSON: one JSON object per line.
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum TableFormat {
    Table,
    Json,
}

#[derive(Debug, Args)]
pub struct TraceArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Auto)]
    pub format: OutputFormat,
    /// Stop after this many seconds (default: until Ctrl-C or SIGTERM).
    #[arg(long, value_name = "SECS")]
    pub duration: Option<f64>,
    /// Ring buffer size in bytes: a power of two, at least 4096.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 22, value_parser = parse_ring_size)]
    pub ring_buffer_size: u32,
    /// Seconds between `stats` records.
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub stats_interval: f64,
    /// Report every TCP state change, not only failed connects.
    #[arg(long)]
    pub all_states: bool,
    /// Do not trace bind() through syscall tracepoints (no bind_error events).
    #[arg(long)]
    pub no_syscall_hooks: bool,
    /// Send every failure as its own record. By default a storm's repeats
    /// (refused connects, resets refusing them, connect and bind errors of
    /// one pod and endpoint) are counted in the kernel and arrive as one
    /// record with a `count` each second.
    #[arg(long)]
    pub no_kernel_aggregation: bool,
    /// Kernel BTF file, for kernels that ship it outside /sys/kernel/btf
    /// [default: /sys/kernel/btf/vmlinux].
    #[arg(long, value_name = "FILE")]
    pub btf: Option<PathBuf>,
    /// Seconds between reads of the node facts (sysctls, conntrack).
    #[arg(long, value_name = "SECS", default_value_t = 5.0)]
    pub facts_interval: f64,
    /// Report only this node's pods: the cgroup v2 path of the node (e.g. a
    /// kind node container's `/system.slice/docker-<id>.scope`).
    #[arg(long, value_name = "CGROUP")]
    pub node_scope: Option<String>,
    /// Serve Prometheus metrics on GET /metrics at this address
    /// (e.g. 127.0.0.1:9464). Off by default.
    #[arg(long, value_name = "ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Allow --metrics-addr to be a non-loopback address (e.g. 0.0.0.0:9464
    /// for a Prometheus that scrapes the node).
    #[arg(long, requires = "metrics_addr")]
    pub metrics_allow_remote: bool,
    #[command(flatten)]
    pub node: NodeArgs,
}

fn parse_ring_size(s: &str) -> Result<u32, String> {
    let n: u32 = s.parse().map_err(|e| format!("{e}"))?;
    if n < 4096 || !n.is_power_of_two() {
        return Err(format!("{n} is not a power of two of at least 4096"));
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn rejects_bad_ring_buffer_sizes() {
        assert!(Cli::try_parse_from(["tcptrace", "--ring-buffer-size", "5000"]).is_err());
        assert!(Cli::try_parse_from(["tcptrace", "--ring-buffer-size", "1024"]).is_err());
        let cli = Cli::try_parse_from(["tcptrace", "--ring-buffer-size", "8192"]).unwrap();
        assert_eq!(cli.trace.ring_buffer_size, 8192);
    }

    #[test]
    fn parses_nodeports_with_and_without_service() {
        let cli = Cli::try_parse_from([
            "tcptrace",
            "--nodeport",
            "30080=default/web:http",
            "--nodeport",
            "31000",
        ])
        .unwrap();
        assert_eq!(
            cli.trace.node.nodeports,
            vec![(30080, "default/web:http".into()), (31000, String::new())]
        );
        assert!(Cli::try_parse_from(["tcptrace", "--nodeport", "http"]).is_err());
        assert_eq!(
            cli.trace.node.node_netns(),
            PathBuf::from("/proc/self/ns/net")
        );
    }
}
