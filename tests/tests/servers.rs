//! Real servers and clients, as users run them, in lab pods behind
//! kube-proxy-style ClusterIPs, traced by the tcptrace binary: nginx,
//! redis, wrk, curl, redis-benchmark and a pooled HTTP client (Python's
//! http.client). Healthy traffic gives no failure verdict; the keep-alive
//! race, a firewall drop through a Service and application aborts are
//! named; and every reset of the run is accounted for by some verdict.
use std::{
    collections::{BTreeMap, HashSet},
    net::Ipv4Addr,
    process::Output,
    thread,
    time::Duration,
};

use nix::sys::signal::Signal;
use serde_json::Value;
use tcptrace_lab::{Lab, LabSpec};
use tcptrace_tests::{records, start_tcptrace};

const WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 50);
const CACHE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 51);
/// nginx's keepalive_timeout.
const KEEPALIVE_S: u32 = 2;

/// client and client2 talk to nginx (web) and redis (cache) in server.
fn lab() -> (Lab, Vec<tcptrace_lab::SpawnedChild>) {
    let lab = Lab::new(
        &LabSpec::pods(&["client", "client2", "server"])
            .service("web", WEB, 80, "server", 8080, None)
            .service("cache", CACHE, 6379, "server", 6379, None),
    )
    .expect("the lab");
    let server = lab.get("server").expect("server pod").clone();
    let servers = vec![
        lab.nginx(&server, 8080, KEEPALIVE_S).expect("nginx"),
        lab.redis(&server, 6379, &[]).expect("redis"),
    ];
    (lab, servers)
}

fn succeeded(what: &str, out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{what} failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// Runs `work` while the tcptrace binary traces the lab; returns the
/// records of the lab's namespaces (schema-checked).
fn traced(lab: &Lab, work: impl FnOnce()) -> Vec<Value> {
    let host_root = lab.host_root.to_string_lossy().into_owned();
    let node = lab.node_netns_path().to_string_lossy().into_owned();
    let tracer = start_tcptrace(&[
        "--format",
        "json",
        "--host-root",
        &host_root,
        "--node-netns",
        &node,
        "--facts-interval",
        "1",
    ]);
    work();
    // Late segments and the settle of the last resets.
    thread::sleep(Duration::from_millis(500));
    tracer.signal(Signal::SIGINT);
    let (code, lines) = tracer.finish();
    assert_eq!(code, 0);
    let mine: HashSet<u64> = lab.netns_inodes().into_iter().map(u64::from).collect();
    records(&lines)
        .into_iter()
        .filter(|r| r["netns"].as_u64().is_some_and(|n| mine.contains(&n)))
        .collect()
}

/// The last record of every verdict: its final counts.
fn final_verdicts(records: &[Value]) -> Vec<&Value> {
    let mut last: BTreeMap<String, &Value> = BTreeMap::new();
    for r in records.iter().filter(|r| r["type"] == "verdict") {
        let key = format!(
            "{}|{}|{}|{}|{}",
            r["cause"], r["netns"], r["dst"], r["first_seen"], r["evidence"]["kind"]
        );
        last.insert(key, r);
    }
    last.into_values().collect()
}

/// Every reset the kernel reported in the lab is accounted for by exactly
/// one verdict: the verdicts' resets add up to the reset events.
fn assert_every_reset_accounted(records: &[Value]) {
    let resets = records
        .iter()
        .filter(|r| {
            r["type"] == "event" && (r["kind"] == "reset_sent" || r["kind"] == "reset_received")
        })
        .count() as u64;
    let verdicts = final_verdicts(records);
    let accounted: u64 = verdicts
        .iter()
        .map(|v| v["resets"].as_u64().unwrap_or(0))
        .sum();
    let summary: Vec<String> = verdicts
        .iter()
        .map(|v| format!("{} {} resets={}", v["cause"], v["count"], v["resets"]))
        .collect();
    assert_eq!(
        accounted, resets,
        "resets seen vs accounted for: {summary:#?}"
    );
}

fn failures(records: &[Value]) -> Vec<&Value> {
    final_verdicts(records)
        .into_iter()
        .filter(|v| v["severity"] != "benign")
        .collect()
}

#[test]
fn healthy_keep_alive_connection_close_and_redis_traffic_give_no_failure_verdict() {
    let (lab, _servers) = lab();
    let client = lab.get("client").expect("client").clone();
    let url = format!("http://{WEB}/");
    let records = traced(&lab, || {
        let wrk = lab
            .run_in_pod(
                &client,
                "wrk",
                &["-t2", "-c8", "-d3s", &url],
                Duration::from_secs(20),
            )
            .expect("wrk");
        let text = succeeded("wrk", &wrk);
        assert!(text.contains("requests in"), "{text}");
        assert!(!text.contains("Socket errors"), "{text}");
        let curls = format!(
            "for i in $(seq 200); do curl -s -o /dev/null -H 'Connection: close' {url} || exit 1; done"
        );
        let curl = lab
            .run_in_pod(&client, "sh", &["-c", &curls], Duration::from_secs(60))
            .expect("curl");
        succeeded("200 curl requests", &curl);
        let bench = lab
            .run_in_pod(
                &client,
                "redis-benchmark",
                &[
                    "-h",
                    &CACHE.to_string(),
                    "-p",
                    "6379",
                    "-n",
                    "20000",
                    "-q",
                    "-t",
                    "set,get",
                ],
                Duration::from_secs(60),
            )
            .expect("redis-benchmark");
        let text = succeeded("redis-benchmark", &bench);
        assert!(text.contains("SET") && text.contains("GET"), "{text}");
    });
    let events = records.iter().filter(|r| r["type"] == "event").count();
    eprintln!("healthy run: {events} events in the lab");
    let bad = failures(&records);
    assert!(
        bad.is_empty(),
        "healthy traffic gave failure verdicts: {bad:#?}"
    );
    assert_every_reset_accounted(&records);
}

/// A pooled client's second request after `idle_s` of quiet.
const POOLED_CLIENT: &str = r#"
import http.client, sys, time
c = http.client.HTTPConnection(sys.argv[1], 80, timeout=3)
c.request("GET", "/"); c.getresponse().read()
time.sleep(float(sys.argv[2]))
try:
    c.request("GET", "/"); c.getresponse().read(); print("reused")
except Exception as e:
    print("failed", type(e).__name__)
"#;

#[test]
fn the_race_the_firewall_drop_and_aborts_are_named_and_every_reset_accounted() {
    let (lab, _servers) = lab();
    let client = lab.get("client").expect("client").clone();
    let client2 = lab.get("client2").expect("client2").clone();
    let server = lab.get("server").expect("server").clone();
    // A NetworkPolicy-style rule in the server pod: client2 may not reach nginx.
    let deny = format!("{}/32", client2.ip);
    tcptrace_lab::run(
        "ip",
        &[
            "netns",
            "exec",
            &server.netns_name,
            "iptables",
            "-A",
            "INPUT",
            "-s",
            &deny,
            "-p",
            "tcp",
            "--dport",
            "8080",
            "-j",
            "DROP",
        ],
    )
    .expect("the drop rule");
    let records = traced(&lab, || {
        let race = lab
            .run_in_pod(
                &client,
                "python3",
                &["-c", POOLED_CLIENT, &WEB.to_string(), "3"],
                Duration::from_secs(20),
            )
            .expect("the pooled client");
        let said = succeeded("the pooled client", &race);
        assert!(
            said.starts_with("failed"),
            "the reused connection was reset: {said}"
        );
        let denied = lab
            .run_in_pod(
                &client2,
                "curl",
                &[
                    "-s",
                    "-o",
                    "/dev/null",
                    "--connect-timeout",
                    "2.5",
                    &format!("http://{WEB}/"),
                ],
                Duration::from_secs(20),
            )
            .expect("curl");
        assert!(!denied.status.success(), "the drop rule let curl through");
        // curl stops reading the large file (head is done): the kernel
        // resets the connection with the unread data.
        let abort = format!("curl -s http://{WEB}/big | head -c 100 > /dev/null");
        let cut = lab
            .run_in_pod(&client, "sh", &["-c", &abort], Duration::from_secs(20))
            .expect("curl | head");
        succeeded("curl | head", &cut);
        // wrk stops with requests under way.
        let wrk = lab
            .run_in_pod(
                &client,
                "wrk",
                &["-t1", "-c8", "-d1s", &format!("http://{WEB}/")],
                Duration::from_secs(20),
            )
            .expect("wrk");
        succeeded("wrk", &wrk);
    });
    let verdicts = final_verdicts(&records);
    let of =
        |cause: &str| -> Vec<&&Value> { verdicts.iter().filter(|v| v["cause"] == cause).collect() };

    let race = of("keepalive_race");
    assert_eq!(race.len(), 1, "{verdicts:#?}");
    let race = race[0];
    assert_eq!(race["pod"]["name"], "client");
    let timeout = race["evidence"]["peer_idle_timeout_ms"]
        .as_u64()
        .expect("the server's timeout");
    let nginx_ms = u64::from(KEEPALIVE_S) * 1000;
    assert!(
        (nginx_ms - 100..=nginx_ms + 600).contains(&timeout),
        "nginx closes idle connections after {nginx_ms} ms; seen {timeout} ms"
    );
    let fix = race["fix"].as_str().expect("fix");
    assert!(!fix.contains("SO_KEEPALIVE"), "{fix}");
    assert!(fix.contains("after 1 s idle"), "{fix}");

    let drop = of("netfilter_drop");
    assert_eq!(drop.len(), 1, "{verdicts:#?}");
    let drop = drop[0];
    assert_eq!(drop["pod"]["name"], "client2");
    assert_eq!(drop["dst"]["service"]["name"], "web");
    assert_eq!(drop["evidence"]["dropped_in"], "pod lab/server");
    assert_eq!(
        drop["evidence"]["dropped_in_netns"],
        u64::from(server.netns)
    );
    assert_eq!(
        drop["evidence"]["dropped_dst"],
        format!("{}:8080", server.ip)
    );

    let aborts = of("application_abort");
    assert!(!aborts.is_empty(), "wrk's aborts: {verdicts:#?}");
    assert!(aborts.iter().all(|a| a["severity"] == "benign"));

    let unexpected: Vec<&Value> = failures(&records)
        .into_iter()
        .filter(|v| v["cause"] != "keepalive_race" && v["cause"] != "netfilter_drop")
        .collect();
    assert!(
        unexpected.is_empty(),
        "other failure verdicts: {unexpected:#?}"
    );
    assert_every_reset_accounted(&records);
}
