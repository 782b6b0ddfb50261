//! The DaemonSet as far as this machine allows: the agent image built from
//! deploy/Containerfile (`cargo xtask docker agent-image`, on a Debian 12
//! base made here: no registry) runs on the real Docker engine with the
//! host settings, capabilities, mounts, arguments and memory limit the
//! test reads from deploy/daemonset.yaml, and names a failure in one of
//! the host's network namespaces.
use std::{
    net::{SocketAddr, TcpStream},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use serde_json::Value;
use serde_yaml::Value as Yaml;
use tcptrace_tests::{Netns, records, xtask_bin};

const MANIFEST: &str = include_str!("../../deploy/daemonset.yaml");
const CONTAINER: &str = "tcptrace-daemonset-test";
/// Capabilities of the manifest this machine's engine cannot grant, and
/// why: this sandbox lacks CAP_SYS_RESOURCE (the agent needs it only to
/// raise RLIMIT_MEMLOCK before 5.11); Debian's Docker 20.10 validates
/// names against a list without CAP_BPF and CAP_PERFMON (Kubernetes'
/// runtimes know them). CAP_SYS_ADMIN, also in the manifest, grants what
/// those two do.
const UNAVAILABLE_HERE: [&str; 3] = ["SYS_RESOURCE", "BPF", "PERFMON"];

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running docker")
}

/// The container, the images and the dockerd removed, also on failure.
struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = docker(&["rm", "--force", CONTAINER]);
        let _ = Command::new(xtask_bin()).args(["docker", "down"]).status();
    }
}

fn str_list(v: &Yaml) -> Vec<String> {
    v.as_sequence()
        .map(|s| {
            s.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// `docker run` arguments for the manifest's pod: what a kubelet would
/// give the container.
fn run_args(manifest: &Yaml) -> (Vec<String>, String, Vec<String>) {
    let pod = &manifest["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let mut args = vec![
        "run".to_string(),
        "--detach".into(),
        "--name".into(),
        CONTAINER.into(),
    ];
    if pod["hostPID"].as_bool() == Some(true) {
        args.extend(["--pid".into(), "host".into()]);
    }
    if pod["hostNetwork"].as_bool() == Some(true) {
        args.extend(["--network".into(), "host".into()]);
    }
    let sc = &c["securityContext"];
    assert_eq!(
        sc["privileged"].as_bool(),
        Some(false),
        "the agent is not privileged"
    );
    if sc["readOnlyRootFilesystem"].as_bool() == Some(true) {
        args.push("--read-only".into());
    }
    if let Some(uid) = sc["runAsUser"].as_u64() {
        args.extend(["--user".into(), uid.to_string()]);
    }
    for cap in str_list(&sc["capabilities"]["drop"]) {
        args.extend(["--cap-drop".into(), cap]);
    }
    for cap in str_list(&sc["capabilities"]["add"]) {
        if !UNAVAILABLE_HERE.contains(&cap.as_str()) {
            args.extend(["--cap-add".into(), cap]);
        }
    }
    // RuntimeDefault is Docker's default profile: nothing to add.
    assert_eq!(
        sc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    if let Some(mem) = c["resources"]["limits"]["memory"].as_str() {
        let mib = mem.strip_suffix("Mi").expect("a limit in Mi");
        args.extend(["--memory".into(), format!("{mib}m")]);
    }
    let volumes = pod["volumes"].as_sequence().expect("volumes");
    for m in c["volumeMounts"].as_sequence().expect("volumeMounts") {
        let name = m["name"].as_str().expect("mount name");
        let volume = volumes
            .iter()
            .find(|v| v["name"].as_str() == Some(name))
            .expect("the mount's volume");
        let host = volume["hostPath"]["path"]
            .as_str()
            .expect("a hostPath volume");
        let mut opts = Vec::new();
        if m["readOnly"].as_bool() == Some(true) {
            opts.push("ro");
        }
        if m["mountPropagation"].as_str() == Some("HostToContainer") {
            opts.push("rslave");
        }
        let target = m["mountPath"].as_str().expect("mountPath");
        args.extend([
            "--volume".into(),
            format!("{host}:{target}:{}", opts.join(",")),
        ]);
    }
    let image = c["image"].as_str().expect("image").to_string();
    (args, image, str_list(&c["args"]))
}

#[test]
fn the_daemonset_s_container_traces_and_names_a_host_namespace_s_failure() {
    let manifest: Yaml = serde_yaml::from_str(MANIFEST).expect("the manifest is YAML");
    let _cleanup = Cleanup;
    let built = Command::new(xtask_bin())
        .args(["docker", "agent-image"])
        .status()
        .expect("running cargo xtask docker agent-image");
    assert!(built.success(), "building the agent image");
    // As on a node, /run/netns is a shared mount before the agent starts
    // (the first `ip netns add` makes it one), so that namespaces made
    // later reach the agent's HostToContainer mount.
    let _first = Netns::new("ds-first").expect("netns");
    let (mut args, image, agent_args) = run_args(&manifest);
    assert_eq!(image, "tcptrace:0.1.0");
    // Stats at once, so the test sees the agent running.
    args.push(image);
    args.extend(agent_args);
    args.extend(["--stats-interval".into(), "1".into()]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = docker(&refs);
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );

    // Tracing: the agent says so on stderr.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let logs = docker(&["logs", CONTAINER]);
        let err = String::from_utf8_lossy(&logs.stderr).to_string();
        if err.contains("tcptrace: tracing,") {
            break;
        }
        let state = docker(&["inspect", "-f", "{{.State.Status}}", CONTAINER]);
        assert!(
            Instant::now() < deadline && String::from_utf8_lossy(&state.stdout).trim() == "running",
            "the agent did not start tracing:\n{err}"
        );
        thread::sleep(Duration::from_millis(300));
    }

    // A refused connect in a namespace made after the agent started.
    let ns = Netns::new("ds").expect("netns");
    let refused = ns
        .run("tt-ds-client", || {
            TcpStream::connect_timeout(
                &SocketAddr::from(([127, 0, 0, 1], 9)),
                Duration::from_secs(2),
            )
            .map(|_| ())
            .map_err(|e| e.raw_os_error())
        })
        .expect("running in the namespace");
    assert_eq!(refused, Err(Some(111)), "connection refused");

    // SIGTERM, as the kubelet stops it: the last records, then exit 0.
    thread::sleep(Duration::from_millis(500));
    let stop = docker(&["stop", "--time", "10", CONTAINER]);
    assert!(stop.status.success());
    let code = docker(&["inspect", "-f", "{{.State.ExitCode}}", CONTAINER]);
    assert_eq!(String::from_utf8_lossy(&code.stdout).trim(), "0");
    let logs = docker(&["logs", CONTAINER]);
    let lines: Vec<String> = String::from_utf8_lossy(&logs.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let recs = records(&lines);
    let netns = u64::from(ns.inode());
    let verdict = recs
        .iter()
        .find(|r| r["type"] == "verdict" && r["netns"] == netns)
        .unwrap_or_else(|| panic!("no verdict for the namespace:\n{}", lines.join("\n")));
    assert_eq!(verdict["cause"], "connection_refused", "{verdict}");
    // Named through the host's /run/netns, mounted with HostToContainer.
    assert_eq!(
        verdict["netns_name"],
        Value::from(ns.name.as_str()),
        "{verdict}"
    );
    assert_eq!(verdict["comm"], "tt-ds-client", "{verdict}");
    let last = recs.last().expect("records");
    assert_eq!(
        (last["type"].as_str(), last["final"].as_bool()),
        (Some("stats"), Some(true))
    );
}
