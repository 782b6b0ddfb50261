//! The Kubernetes manifests under deploy/ agree with what tcptrace reads:
//! the capabilities it uses (not privileged), read-only host mounts at the
//! paths its flags point to, arguments tcptrace accepts, and log pipeline
//! examples that parse its NDJSON.
use std::{
    collections::BTreeSet,
    fs,
    path::{Path, PathBuf},
};

use clap::Parser as _;
use serde_yaml::Value;
use tcptrace::cli::{Cli, OutputFormat};

fn deploy(file: &str) -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../deploy")
        .join(file);
    fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn daemonset() -> Value {
    serde_yaml::from_str(&deploy("daemonset.yaml")).expect("daemonset.yaml is YAML")
}

fn strs(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap_or_else(|| panic!("not a list: {v:?}"))
        .iter()
        .map(|s| s.as_str().expect("a string").to_string())
        .collect()
}

#[test]
fn daemonset_runs_on_every_node_with_the_host_view() {
    let ds = daemonset();
    assert_eq!(ds["kind"], "DaemonSet");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true);
    assert_eq!(pod["hostNetwork"], true);
    let tolerations = pod["tolerations"].as_sequence().unwrap();
    assert!(
        tolerations.iter().any(|t| t["operator"] == "Exists"
            && t.get("key").is_none()
            && t.get("effect").is_none()),
        "must tolerate every taint: {tolerations:?}"
    );
    let c = &pod["containers"][0];
    let res = &c["resources"];
    for (kind, key) in [
        ("requests", "cpu"),
        ("requests", "memory"),
        ("limits", "memory"),
    ] {
        assert!(res[kind][key].is_string(), "resources.{kind}.{key} missing");
    }
}

#[test]
fn daemonset_asks_for_capabilities_not_privilege() {
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    let text = deploy("daemonset.yaml");
    assert!(!text.contains("privileged: true"));
    let sc = &pod["containers"][0]["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(strs(&sc["capabilities"]["drop"]), vec!["ALL"]);
    let add: BTreeSet<String> = strs(&sc["capabilities"]["add"]).into_iter().collect();
    for cap in ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"] {
        assert!(add.contains(cap), "missing CAP_{cap}: {add:?}");
    }
    // Kubernetes rejects allowPrivilegeEscalation: false with CAP_SYS_ADMIN.
    assert!(sc.get("allowPrivilegeEscalation").is_none());
}

#[test]
fn host_mounts_are_read_only_and_match_the_flags() {
    let ds = daemonset();
    let pod = &ds["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    let args = strs(&c["args"]);
    let cli = Cli::try_parse_from(std::iter::once("tcptrace".to_string()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("tcptrace rejects the manifest's args {args:?}: {e}"));
    assert!(cli.command.is_none(), "the agent traces");
    assert_eq!(cli.trace.format, OutputFormat::Json, "NDJSON on stdout");
    let host_root = cli.trace.node.host_root.clone();
    assert_eq!(host_root, PathBuf::from("/host"));
    let metrics = cli.trace.metrics_addr.expect("metrics on");
    assert!(
        metrics.ip().is_loopback() || cli.trace.metrics_allow_remote,
        "remote metrics need --metrics-allow-remote"
    );

    let host_paths: Vec<(String, String)> = pod["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|v| {
            let path = v["hostPath"]["path"]
                .as_str()
                .expect("only hostPath volumes");
            (v["name"].as_str().unwrap().to_string(), path.to_string())
        })
        .collect();
    let mut mounted = BTreeSet::new();
    for m in c["volumeMounts"].as_sequence().unwrap() {
        let name = m["name"].as_str().unwrap();
        assert_eq!(m["readOnly"], true, "{name} must be read-only");
        let target = PathBuf::from(m["mountPath"].as_str().unwrap());
        let (_, host) = host_paths
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("no volume {name}"));
        // Either under --host-root at the host's own path, or at the host's
        // own path for what tcptrace reads at fixed paths.
        let under_root = host_root.join(host.trim_start_matches('/'));
        assert!(
            target == under_root || target == Path::new(host),
            "{name}: {host} is mounted at {}, not {} or its own path",
            target.display(),
            under_root.display()
        );
        mounted.insert(target);
    }
    // What tcptrace reads: BTF and tracefs at fixed paths, the rest under the root.
    let btf = cli
        .trace
        .btf
        .as_deref()
        .expect("the manifest names the BTF file")
        .parent()
        .unwrap()
        .to_path_buf();
    assert!(
        mounted.contains(&btf),
        "BTF dir {} not mounted",
        btf.display()
    );
    assert!(mounted.contains(&PathBuf::from("/sys/kernel/tracing")));
    for under in [
        "proc",
        "sys/fs/cgroup",
        "var/log/pods",
        "var/log/containers",
        "run/netns",
    ] {
        assert!(
            mounted.contains(&host_root.join(under)),
            "{under} not mounted under {}",
            host_root.display()
        );
    }
}

#[test]
fn image_ships_the_static_binary_the_manifest_runs() {
    let file = deploy("Containerfile");
    let copy = file
        .lines()
        .find(|l| l.starts_with("COPY "))
        .expect("a COPY line");
    // What `cargo xtask build --static` produces.
    assert_eq!(
        copy,
        "COPY target/x86_64-unknown-linux-gnu/release/tcptrace /usr/local/bin/tcptrace"
    );
    assert!(file.contains(r#"ENTRYPOINT ["/usr/local/bin/tcptrace"]"#));
    let ds = daemonset();
    let c = &ds["spec"]["template"]["spec"]["containers"][0];
    assert!(c.get("command").is_none(), "the image's entrypoint runs");
}

#[test]
fn log_pipelines_parse_the_ndjson() {
    let vector: Value = serde_yaml::from_str(&deploy("vector.yaml")).expect("vector.yaml is YAML");
    let src = &vector["sources"]["tcptrace_logs"];
    assert_eq!(src["type"], "kubernetes_logs");
    assert_eq!(
        src["extra_label_selector"], "app.kubernetes.io/name=tcptrace",
        "selects the DaemonSet's pods"
    );
    let remap = &vector["transforms"]["tcptrace"];
    assert_eq!(remap["type"], "remap");
    assert!(remap["source"].as_str().unwrap().contains("parse_json!"));
    assert_eq!(
        remap["drop_on_error"], true,
        "non-JSON stderr lines dropped"
    );

    let ds = daemonset();
    let labels = &ds["spec"]["template"]["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/name"], "tcptrace");
    let ns = ds["metadata"]["namespace"].as_str().unwrap();

    let fb = deploy("fluent-bit.conf");
    let parsers = deploy("parsers.conf");
    let path = fb
        .lines()
        .find_map(|l| l.trim().strip_prefix("Path"))
        .unwrap()
        .trim();
    assert_eq!(
        path,
        format!("/var/log/containers/tcptrace-*_{ns}_tcptrace-*.log")
    );
    assert!(fb.contains("Parsers_File  parsers.conf"));
    assert!(fb.contains("Parser        tcptrace_json"));
    assert!(parsers.contains("Name         tcptrace_json"));
    assert!(parsers.contains("Format       json"));
    // The time format matches what tcptrace writes.
    assert!(parsers.contains("Time_Key     time"));
    let sample = tcptrace::model::rfc3339::format(std::time::UNIX_EPOCH);
    assert_eq!(
        sample, "1970-01-01T00:00:00.000000Z",
        "%Y-%m-%dT%H:%M:%S.%LZ"
    );
}
