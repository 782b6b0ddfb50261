//! Command line.
use std::{fmt::Display, path::PathBuf, time::Duration};

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
        /// Playback speed relative to the recording, up to 1000000
        /// (default, or 0: as fast as possible).
        #[arg(long, value_parser = parse_speed, allow_negative_numbers = true)]
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
        /// connection_refused, service_no_endpoints, firewall_reject,
        /// snat_port_exhaustion, pmtu_black_hole, syn_timeout,
        /// keepalive_race, application_abort, netfilter_drop, idle_timeout,
        /// nodeport_collision, conntrack_invalid, tcp_stack_drop,
        /// listen_overflow, conntrack_table_full.
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
    /// that forgets idle connections: 1 to 31536000 (a year).
    #[arg(long, value_name = "SECS", value_parser = parse_middlebox_timeout, allow_negative_numbers = true)]
    pub middlebox_timeout: Option<u64>,
    /// A NodePort of this node, as PORT or PORT=namespace/name:port (repeat).
    #[arg(long = "nodeport", value_name = "PORT[=SERVICE]", value_parser = parse_nodeport, allow_negative_numbers = true)]
    pub nodeports: Vec<(u16, String)>,
}

impl NodeArgs {
    pub fn node_netns(&self) -> PathBuf {
        self.node_netns
            .clone()
            .unwrap_or_else(|| PathBuf::from("/proc/self/ns/net"))
    }
}

/// The longest time a seconds flag accepts: a year.
const MAX_SECS: u64 = 365 * 24 * 3600;

/// A number in `range`, or a sentence saying what to give instead.
fn number<T>(s: &str, range: std::ops::RangeInclusive<T>, what: &str) -> Result<T, String>
where
    T: std::str::FromStr + PartialOrd + Display,
{
    let not_a_number = || {
        format!(
            "{s:?} is not a number: use {what} from {} to {}",
            range.start(),
            range.end()
        )
    };
    let n: T = s.parse().map_err(|_| {
        // A whole number too long for its type is out of range, not garbage.
        let digits = s.strip_prefix('-').unwrap_or(s);
        if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
            out_of_range(s, &range, what)
        } else {
            not_a_number()
        }
    })?;
    // NaN parses as a float but is no number.
    if n.partial_cmp(&n).is_none() {
        return Err(not_a_number());
    }
    if !range.contains(&n) {
        return Err(out_of_range(s, &range, what));
    }
    Ok(n)
}

fn out_of_range<T: Display>(s: &str, range: &std::ops::RangeInclusive<T>, what: &str) -> String {
    format!(
        "{s} is out of range: use {what} from {} to {}",
        range.start(),
        range.end()
    )
}

/// Seconds from `min` to [`MAX_SECS`].
fn seconds(s: &str, min: f64) -> Result<Duration, String> {
    number(s, min..=MAX_SECS as f64, "a number of seconds").map(Duration::from_secs_f64)
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    seconds(s, 0.1)
}

fn parse_stats_interval(s: &str) -> Result<Duration, String> {
    seconds(s, 0.1)
}

fn parse_facts_interval(s: &str) -> Result<Duration, String> {
    seconds(s, 0.5)
}

fn parse_middlebox_timeout(s: &str) -> Result<u64, String> {
    number(s, 1..=MAX_SECS, "a number of seconds")
}

fn parse_speed(s: &str) -> Result<f64, String> {
    number(s, 0.0..=1e6, "a speed")
}

fn parse_nodeport(s: &str) -> Result<(u16, String), String> {
    let (port, service) = s.split_once('=').unwrap_or((s, ""));
    let port = number(port, 1..=u16::MAX, "a port")?;
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
    /// Stop after this many seconds, 0.1 to 31536000 (default: until Ctrl-C
    /// or SIGTERM).
    #[arg(long, value_name = "SECS", value_parser = parse_duration, allow_negative_numbers = true)]
    pub duration: Option<Duration>,
    /// Ring buffer size in bytes: a power of two from 4096 to 1073741824.
    #[arg(long, value_name = "BYTES", default_value_t = 1 << 22, value_parser = parse_ring_size, allow_negative_numbers = true)]
    pub ring_buffer_size: u32,
    /// Seconds between `stats` records, 0.1 to 31536000.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_stats_interval, allow_negative_numbers = true)]
    pub stats_interval: Duration,
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
    /// Seconds between reads of the node facts (sysctls, conntrack), 0.5 to
    /// 31536000.
    #[arg(long, value_name = "SECS", default_value = "5", value_parser = parse_facts_interval, allow_negative_numbers = true)]
    pub facts_interval: Duration,
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
    let n: u32 = number(s, 4096..=1 << 30, "a size in bytes")?;
    if !n.is_power_of_two() {
        return Err(format!(
            "{n} is not a power of two: use 4096, 8192, ... up to 1073741824"
        ));
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
    fn accepts_the_ends_of_every_range() {
        let cli = Cli::try_parse_from([
            "tcptrace",
            "--duration",
            "0.1",
            "--stats-interval",
            "31536000",
            "--facts-interval",
            "0.5",
            "--ring-buffer-size",
            "1073741824",
            "--middlebox-timeout",
            "1",
            "--nodeport",
            "65535",
        ])
        .unwrap();
        let t = &cli.trace;
        assert_eq!(t.duration, Some(Duration::from_millis(100)));
        assert_eq!(t.stats_interval, Duration::from_secs(31_536_000));
        assert_eq!(t.facts_interval, Duration::from_millis(500));
        assert_eq!(t.ring_buffer_size, 1 << 30);
        assert_eq!(t.node.middlebox_timeout, Some(1));
        assert_eq!(t.node.nodeports, vec![(65535, String::new())]);
        let defaults = Cli::try_parse_from(["tcptrace"]).unwrap().trace;
        assert_eq!(defaults.stats_interval, Duration::from_secs(5));
        assert_eq!(defaults.facts_interval, Duration::from_secs(5));
        let replay = Cli::try_parse_from(["tcptrace", "replay", "-", "--speed", "0"]).unwrap();
        assert!(matches!(
            replay.command,
            Some(Command::Replay {
                speed: Some(0.0),
                ..
            })
        ));
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
