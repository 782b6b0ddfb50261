//! `cargo xtask kind`: run the static tcptrace on every node of a kind
//! cluster, scoped to that node, and merge their NDJSON.
//!
//! Everything that decides what to run is a pure "plan" function returning
//! exact command lines (`Vec<String>`), tested without Docker; `run` and
//! `stop` are thin executors over those plans.
//!
//! How a kind node is traced:
//! - kind nodes are privileged containers sharing the host kernel, so the
//!   host's static tcptrace runs inside them with `docker exec` and sees
//!   the node's own /proc (its PID namespace), /sys/fs/cgroup, /run/netns
//!   and /var/log/pods: `--host-root /` (the default) is the node's root.
//! - Tracepoints are system-wide, so every node would see every node's
//!   events; `--node-scope` keeps this node's. Its value is the node's
//!   cgroup as tcptrace sees it, and tcptrace (joined to the node's cgroup
//!   namespace by `docker exec`) sees cgroup paths relative to that
//!   namespace's root. PID 1 of a kind node is systemd, which sits in
//!   `<node cgroup>/init.scope`; so the node's cgroup is PID 1's unified
//!   (`0::`) path without the trailing `/init.scope`:
//!   - private cgroup namespace (Docker's default on cgroup v2): `0::/init.scope`
//!     -> `/`, every cgroup tcptrace can see is this node's;
//!   - host cgroup namespace: `0::/system.slice/docker-<id>.scope/init.scope`
//!     -> `/system.slice/docker-<id>.scope`.
//! - tcptrace mounts tracefs itself where a node lacks it (its bind
//!   hooks need it): nothing is prepared in the node but the binary.
//! - `docker exec` does not pass signals on to the process it started, so
//!   each agent is started through `sh` writing its pid to [`PID_FILE`];
//!   stopping sends SIGTERM to that pid (tcptrace then flushes and exits 0).
use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    sync::{Arc, Mutex, mpsc},
    thread,
};

use anyhow::{Context as _, Result, bail};
use indexmap::IndexMap;
use serde_json::value::RawValue;

/// kind labels every node container with its cluster name and role.
pub const CLUSTER_LABEL: &str = "io.x-k8s.kind.cluster";
pub const ROLE_LABEL: &str = "io.x-k8s.kind.role";
/// Where the binary goes in a node.
pub const NODE_BIN: &str = "/usr/local/bin/tcptrace";
/// The running agent's pid, in the node.
pub const PID_FILE: &str = "/run/tcptrace.pid";
/// Detached agents' NDJSON and log, in the node.
pub const NDJSON_FILE: &str = "/var/log/tcptrace.ndjson";
pub const LOG_FILE: &str = "/var/log/tcptrace.log";

/// How the agents run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every node, NDJSON merged on stdout, until Ctrl-C.
    Merge,
    /// The live TUI of one node, on this terminal.
    Tui,
    /// Background agents writing to [`NDJSON_FILE`] in each node.
    Detach,
}

fn strings(parts: &[&str]) -> Vec<String> {
    parts.iter().map(|s| (*s).to_string()).collect()
}

/// Lists the cluster's containers with their kind role.
pub fn discover_cmd(cluster: &str) -> Vec<String> {
    strings(&[
        "docker",
        "ps",
        "--filter",
        &format!("label={CLUSTER_LABEL}={cluster}"),
        "--format",
        &format!("{{{{.Names}}}}\t{{{{.Label \"{ROLE_LABEL}\"}}}}"),
    ])
}

/// Node names from `discover_cmd`'s output, sorted. The load balancer of
/// an HA cluster carries the cluster label too but is not a node.
pub fn parse_nodes(out: &str) -> Vec<String> {
    let mut nodes: Vec<String> = out
        .lines()
        .filter_map(|l| {
            let mut f = l.split('\t');
            let name = f.next()?.trim();
            let role = f.next().unwrap_or("").trim();
            (!name.is_empty() && role != "external-load-balancer").then(|| name.to_string())
        })
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

/// The nodes to trace: all found, or those asked for (which must exist).
pub fn select_nodes(found: &[String], wanted: &[String], cluster: &str) -> Result<Vec<String>> {
    if found.is_empty() {
        bail!(
            "no kind cluster named {cluster}: no running container has the label {CLUSTER_LABEL}={cluster} \
             (`kind get clusters` lists clusters; create one with `kind create cluster --name {cluster}`)"
        );
    }
    if wanted.is_empty() {
        return Ok(found.to_vec());
    }
    let unknown: Vec<&str> = wanted
        .iter()
        .filter(|w| !found.contains(w))
        .map(String::as_str)
        .collect();
    if !unknown.is_empty() {
        bail!(
            "no node {} in kind cluster {cluster} (its nodes: {})",
            unknown.join(", "),
            found.join(", ")
        );
    }
    Ok(wanted.to_vec())
}

/// Reads the cgroup of the node's PID 1 (see the module docs).
pub fn scope_cmd(node: &str) -> Vec<String> {
    strings(&["docker", "exec", node, "cat", "/proc/1/cgroup"])
}

/// `--node-scope` for a node, from its PID 1's `/proc/1/cgroup`.
pub fn parse_scope(proc1_cgroup: &str) -> Result<String> {
    let unified = proc1_cgroup
        .lines()
        .find_map(|l| l.strip_prefix("0::"))
        .map(str::trim)
        .context(
            "the node has no cgroup v2 path (0::) in /proc/1/cgroup: --node-scope needs cgroup v2 on the host",
        )?;
    let node = unified.strip_suffix("/init.scope").unwrap_or(unified);
    Ok(if node.is_empty() { "/" } else { node }.to_string())
}

/// Copies the binary into the node.
pub fn prepare_plan(node: &str, bin: &Path) -> Vec<Vec<String>> {
    vec![strings(&[
        "docker",
        "cp",
        &bin.display().to_string(),
        &format!("{node}:{NODE_BIN}"),
    ])]
}

/// Quotes one word for `sh -c`.
pub fn sh_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=,@+%".contains(&b));
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

fn has_flag(args: &[String], flag: &str) -> bool {
    args.iter()
        .any(|a| a == flag || a.starts_with(&format!("{flag}=")))
}

/// tcptrace's own command line in the node: the user's arguments plus the
/// output format and node scope, unless the user set them.
pub fn tcptrace_args(mode: &Mode, scope: &str, args: &[String]) -> Vec<String> {
    let mut out = vec![NODE_BIN.to_string()];
    if !has_flag(args, "--format") {
        let format = if *mode == Mode::Tui { "tui" } else { "json" };
        out.extend(strings(&["--format", format]));
    }
    if !has_flag(args, "--node-scope") {
        out.extend(strings(&["--node-scope", scope]));
    }
    out.extend(args.iter().cloned());
    out
}

/// Starts tcptrace in a node. The `sh` wrapper refuses to start a second
/// agent, records the pid and `exec`s tcptrace (so the pid is tcptrace's).
pub fn run_cmd(node: &str, mode: &Mode, scope: &str, args: &[String]) -> Vec<String> {
    let command = tcptrace_args(mode, scope, args)
        .iter()
        .map(|w| sh_quote(w))
        .collect::<Vec<_>>()
        .join(" ");
    let redirect = match mode {
        Mode::Detach => format!(" >>{NDJSON_FILE} 2>>{LOG_FILE}"),
        Mode::Merge | Mode::Tui => String::new(),
    };
    let script = format!(
        "if [ -s {PID_FILE} ] && [ \"$(cat /proc/$(cat {PID_FILE})/comm 2>/dev/null)\" = tcptrace ]; then \
         echo \"tcptrace already runs on this node (pid $(cat {PID_FILE})): cargo xtask kind stop\" >&2; exit 1; fi; \
         echo $$ >{PID_FILE}; exec {command}{redirect}"
    );
    let flags: &[&str] = match mode {
        Mode::Merge => &[],
        Mode::Tui => &["-it"],
        Mode::Detach => &["-d"],
    };
    let mut cmd = strings(&["docker", "exec"]);
    cmd.extend(strings(flags));
    cmd.extend(strings(&[node, "sh", "-c", &script]));
    cmd
}

/// Sends SIGTERM to the node's agent; exits 3 when none runs.
pub fn stop_cmd(node: &str) -> Vec<String> {
    let script = format!(
        "p=$(cat {PID_FILE} 2>/dev/null) && [ \"$(cat /proc/$p/comm 2>/dev/null)\" = tcptrace ] || {{ rm -f {PID_FILE}; exit 3; }}; \
         kill -TERM \"$p\" && rm -f {PID_FILE}"
    );
    strings(&["docker", "exec", node, "sh", "-c", &script])
}

/// Exit code of `stop_cmd` when the node runs no agent.
pub const NO_AGENT: i32 = 3;

/// Tags one NDJSON line with its node: `{"node":"kind-worker",...}`, the
/// record's own fields after it as they were. Lines that are not JSON
/// objects are not records and are left out (`None`).
pub fn tag_line(node: &str, line: &str) -> Option<String> {
    let mut record: IndexMap<String, Box<RawValue>> = serde_json::from_str(line).ok()?;
    record.shift_insert(
        0,
        "node".into(),
        serde_json::value::to_raw_value(node).ok()?,
    );
    serde_json::to_string(&record).ok()
}

/// What `cargo xtask kind` was asked.
pub struct Options {
    pub cluster: String,
    pub nodes: Vec<String>,
    pub tui: Option<String>,
    pub detach: bool,
    pub args: Vec<String>,
}

/// Runs a plan step, failing with its stderr.
fn output(cmd: &[String]) -> Result<String> {
    let (program, args) = cmd.split_first().context("empty command")?;
    let out = Command::new(program).args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound && program == "docker" {
            anyhow::anyhow!(
                "docker not found: install Docker and create a cluster with `kind create cluster`"
            )
        } else {
            anyhow::Error::new(e).context(format!("starting {program}"))
        }
    })?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        if err.contains("Cannot connect to the Docker daemon") {
            bail!(
                "docker cannot reach its daemon ({}): start Docker, then create a cluster with `kind create cluster`",
                err.trim()
            );
        }
        bail!(
            "`{}` failed ({}): {}",
            cmd.join(" "),
            out.status,
            err.trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn nodes(cluster: &str, wanted: &[String]) -> Result<Vec<String>> {
    let found = parse_nodes(&output(&discover_cmd(cluster))?);
    select_nodes(&found, wanted, cluster)
}

/// Finds the nodes, then builds the binary (`build`), copies it into them
/// and runs it there. Docker and the cluster are checked before building.
pub fn run(opts: &Options, build: impl FnOnce() -> Result<std::path::PathBuf>) -> Result<()> {
    let mode = match (&opts.tui, opts.detach) {
        (Some(_), true) => bail!("--tui and --detach cannot be used together"),
        (Some(_), false) => Mode::Tui,
        (None, true) => Mode::Detach,
        (None, false) => Mode::Merge,
    };
    let wanted = match &opts.tui {
        Some(node) => vec![node.clone()],
        None => opts.nodes.clone(),
    };
    let nodes = nodes(&opts.cluster, &wanted)?;
    let bin = build()?;
    let mut started = Vec::new();
    for node in &nodes {
        for step in prepare_plan(node, &bin) {
            output(&step).with_context(|| format!("preparing node {node}"))?;
        }
        let scope = parse_scope(&output(&scope_cmd(node))?)
            .with_context(|| format!("finding the cgroup of node {node}"))?;
        started.push((node.clone(), run_cmd(node, &mode, &scope, &opts.args)));
    }
    match mode {
        Mode::Tui => {
            let (node, cmd) = &started[0];
            let status = Command::new(&cmd[0])
                .args(&cmd[1..])
                .status()
                .context("starting docker exec")?;
            if !status.success() {
                bail!("tcptrace on {node} exited with {status}");
            }
            Ok(())
        }
        Mode::Detach => {
            for (node, cmd) in &started {
                output(cmd).with_context(|| format!("starting tcptrace on {node}"))?;
                eprintln!(
                    "xtask: tcptrace runs on {node}: `docker exec {node} tail -f {NDJSON_FILE}`"
                );
            }
            eprintln!(
                "xtask: stop them with `cargo xtask kind stop --name {}`",
                opts.cluster
            );
            Ok(())
        }
        Mode::Merge => merge(&started),
    }
}

/// Runs the agents, writing their tagged NDJSON to stdout as it comes, until
/// they end or Ctrl-C (which stops them through their pid files, so their
/// last records still arrive).
fn merge(started: &[(String, Vec<String>)]) -> Result<()> {
    use std::os::unix::process::CommandExt as _;

    let (tx, rx) = mpsc::channel::<()>();
    let stop_tx = tx.clone();
    ctrlc::set_handler(move || {
        let _ = stop_tx.send(());
    })
    .context("installing the Ctrl-C handler")?;
    let stdout = Arc::new(Mutex::new(std::io::stdout()));
    let mut children = Vec::new();
    let mut readers = Vec::new();
    for (node, cmd) in started {
        let mut child = Command::new(&cmd[0])
            .args(&cmd[1..])
            // Own process group: Ctrl-C reaches xtask only, which then
            // stops the agents cleanly instead of killing the docker clients.
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting tcptrace on {node}"))?;
        let out = child.stdout.take().context("agent stdout")?;
        let err = child.stderr.take().context("agent stderr")?;
        let (n1, n2) = (node.clone(), node.clone());
        let sink = Arc::clone(&stdout);
        let done = tx.clone();
        readers.push(thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(tagged) = tag_line(&n1, &line) {
                    let mut w = sink
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    if writeln!(w, "{tagged}").and_then(|()| w.flush()).is_err() {
                        break;
                    }
                }
            }
            let _ = done.send(());
        }));
        readers.push(thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                eprintln!("[{n2}] {line}");
            }
        }));
        children.push((node.clone(), child));
    }
    // Ctrl-C, or one agent's output ended (--duration, an error): stop them
    // all, then collect their last records.
    let _ = rx.recv();
    for (node, _) in &children {
        let cmd = stop_cmd(node);
        let status = Command::new(&cmd[0]).args(&cmd[1..]).status();
        if !matches!(status.map(|s| s.code()), Ok(Some(0 | NO_AGENT))) {
            eprintln!(
                "xtask: could not stop tcptrace on {node}: `{}`",
                cmd.join(" ")
            );
        }
    }
    let mut failed = Vec::new();
    for (node, mut child) in children {
        let status = child.wait().context("waiting for docker exec")?;
        if !status.success() {
            failed.push(format!("{node} ({status})"));
        }
    }
    for r in readers {
        let _ = r.join();
    }
    if !failed.is_empty() {
        bail!("tcptrace failed on {}", failed.join(", "));
    }
    Ok(())
}

/// `cargo xtask kind stop`: stops the agents of the chosen nodes.
pub fn stop(cluster: &str, wanted: &[String]) -> Result<()> {
    for node in nodes(cluster, wanted)? {
        let cmd = stop_cmd(&node);
        let status = Command::new(&cmd[0])
            .args(&cmd[1..])
            .status()
            .context("starting docker exec")?;
        match status.code() {
            Some(0) => eprintln!("xtask: stopped tcptrace on {node}"),
            Some(NO_AGENT) => eprintln!("xtask: no tcptrace running on {node}"),
            _ => bail!("stopping tcptrace on {node} failed ({status})"),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        strings(v)
    }

    #[test]
    fn discovers_nodes_by_label_without_the_load_balancer() {
        assert_eq!(
            discover_cmd("dev"),
            s(&[
                "docker",
                "ps",
                "--filter",
                "label=io.x-k8s.kind.cluster=dev",
                "--format",
                "{{.Names}}\t{{.Label \"io.x-k8s.kind.role\"}}",
            ])
        );
        let out = "dev-worker2\tworker\ndev-control-plane\tcontrol-plane\n\
                   dev-external-load-balancer\texternal-load-balancer\ndev-worker\tworker\n\n";
        assert_eq!(
            parse_nodes(out),
            s(&["dev-control-plane", "dev-worker", "dev-worker2"])
        );
        // Older docker prints an empty label column: still nodes.
        assert_eq!(
            parse_nodes("kind-control-plane\t\n"),
            s(&["kind-control-plane"])
        );
        assert!(parse_nodes("").is_empty());
    }

    #[test]
    fn selects_nodes_or_says_what_is_missing() {
        let found = s(&["kind-control-plane", "kind-worker"]);
        assert_eq!(select_nodes(&found, &[], "kind").unwrap(), found);
        assert_eq!(
            select_nodes(&found, &s(&["kind-worker"]), "kind").unwrap(),
            s(&["kind-worker"])
        );
        let e = select_nodes(&found, &s(&["kind-worker9"]), "kind").unwrap_err();
        assert_eq!(
            e.to_string(),
            "no node kind-worker9 in kind cluster kind (its nodes: kind-control-plane, kind-worker)"
        );
        let e = select_nodes(&[], &[], "dev").unwrap_err().to_string();
        assert!(e.starts_with("no kind cluster named dev: "), "{e}");
        assert!(e.contains("kind create cluster --name dev"), "{e}");
    }

    #[test]
    fn node_scope_is_the_cgroup_above_systemd() {
        // Private cgroup namespace (Docker's default on cgroup v2).
        assert_eq!(parse_scope("0::/init.scope\n").unwrap(), "/");
        // Host cgroup namespace.
        assert_eq!(
            parse_scope("0::/system.slice/docker-0123abcd.scope/init.scope\n").unwrap(),
            "/system.slice/docker-0123abcd.scope"
        );
        // Before systemd moved itself (or no systemd): the path as it is.
        assert_eq!(parse_scope("0::/\n").unwrap(), "/");
        assert_eq!(
            parse_scope("1:name=systemd:/x\n0::/docker/abc\n").unwrap(),
            "/docker/abc"
        );
        assert!(parse_scope("1:cpu:/docker/abc\n").is_err());
    }

    #[test]
    fn prepares_a_node_with_the_binary() {
        assert_eq!(
            prepare_plan("kind-worker", Path::new("/w/target/static/tcptrace")),
            vec![s(&[
                "docker",
                "cp",
                "/w/target/static/tcptrace",
                "kind-worker:/usr/local/bin/tcptrace"
            ])]
        );
        assert_eq!(
            scope_cmd("kind-worker"),
            s(&["docker", "exec", "kind-worker", "cat", "/proc/1/cgroup"])
        );
    }

    const GUARD: &str = "if [ -s /run/tcptrace.pid ] && [ \"$(cat /proc/$(cat /run/tcptrace.pid)/comm 2>/dev/null)\" = tcptrace ]; then \
         echo \"tcptrace already runs on this node (pid $(cat /run/tcptrace.pid)): cargo xtask kind stop\" >&2; exit 1; fi; \
         echo $$ >/run/tcptrace.pid; exec ";

    #[test]
    fn exact_run_commands_per_mode() {
        let args = s(&["--duration", "60", "--middlebox-timeout", "350"]);
        assert_eq!(
            run_cmd("kind-worker", &Mode::Merge, "/", &args),
            s(&[
                "docker",
                "exec",
                "kind-worker",
                "sh",
                "-c",
                &format!(
                    "{GUARD}/usr/local/bin/tcptrace --format json --node-scope / --duration 60 --middlebox-timeout 350"
                ),
            ])
        );
        assert_eq!(
            run_cmd("kind-control-plane", &Mode::Tui, "/", &[]),
            s(&[
                "docker",
                "exec",
                "-it",
                "kind-control-plane",
                "sh",
                "-c",
                &format!("{GUARD}/usr/local/bin/tcptrace --format tui --node-scope /"),
            ])
        );
        assert_eq!(
            run_cmd(
                "kind-worker",
                &Mode::Detach,
                "/system.slice/docker-ab.scope",
                &[]
            ),
            s(&[
                "docker",
                "exec",
                "-d",
                "kind-worker",
                "sh",
                "-c",
                &format!(
                    "{GUARD}/usr/local/bin/tcptrace --format json --node-scope /system.slice/docker-ab.scope \
                     >>/var/log/tcptrace.ndjson 2>>/var/log/tcptrace.log"
                ),
            ])
        );
    }

    #[test]
    fn user_flags_win_and_are_quoted() {
        let args = s(&[
            "--format=json",
            "--node-scope",
            "/x",
            "--nodeport",
            "30080=a b/c's",
        ]);
        assert_eq!(
            tcptrace_args(&Mode::Merge, "/", &args),
            s(&[
                "/usr/local/bin/tcptrace",
                "--format=json",
                "--node-scope",
                "/x",
                "--nodeport",
                "30080=a b/c's"
            ])
        );
        assert_eq!(sh_quote("30080=a b/c's"), r"'30080=a b/c'\''s'");
        assert_eq!(sh_quote(""), "''");
        assert_eq!(sh_quote("$(reboot)"), "'$(reboot)'");
        assert_eq!(
            sh_quote("/system.slice/docker-ab.scope"),
            "/system.slice/docker-ab.scope"
        );
    }

    #[test]
    fn stop_signals_the_recorded_tcptrace_only() {
        assert_eq!(
            stop_cmd("kind-worker"),
            s(&[
                "docker",
                "exec",
                "kind-worker",
                "sh",
                "-c",
                "p=$(cat /run/tcptrace.pid 2>/dev/null) && [ \"$(cat /proc/$p/comm 2>/dev/null)\" = tcptrace ] || { rm -f /run/tcptrace.pid; exit 3; }; \
                 kill -TERM \"$p\" && rm -f /run/tcptrace.pid",
            ])
        );
    }

    #[test]
    fn tagged_lines_stay_json_objects() {
        assert_eq!(
            tag_line("kind-worker", r#"{"type":"stats","seen":1}"#).unwrap(),
            r#"{"node":"kind-worker","type":"stats","seen":1}"#
        );
        assert_eq!(tag_line("n\"1", "{}").unwrap(), r#"{"node":"n\"1"}"#);
        assert_eq!(tag_line("n", "{ }\r").unwrap(), r#"{"node":"n"}"#);
        assert_eq!(tag_line("n", "tcptrace: tracing"), None);
        // Nested values are kept as they were; a record's own "node" gives way.
        assert_eq!(
            tag_line("n\n", r#"{"a":{"b": [1.50]},"node":"x"}"#).unwrap(),
            r#"{"node":"n\n","a":{"b": [1.50]}}"#
        );
        assert_eq!(tag_line("n", "[1]"), None);
        assert_eq!(tag_line("n", "{truncated"), None);
    }
}
