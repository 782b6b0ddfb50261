//! `tcptrace-bench --soak MINUTES`: tcptrace for a long while under healthy
//! connection churn with a burst of failures every minute, each burst in a
//! namespace made for it and deleted after (pods come and go); its RSS, CPU
//! and the fill of its BPF hash maps sampled every few minutes, to show
//! that they stay flat. It checks what it shows: every failure it made was
//! recorded, and RSS stayed flat after warm-up.
use std::{
    collections::{BTreeMap, HashSet},
    io::{BufRead as _, BufReader, Read as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use nix::sys::signal::Signal;
use serde_json::{Value, json};

use crate::{
    report,
    sys::{self, Spawn, Traced, bench_netns},
};

/// What a soak run does.
pub struct SoakPlan {
    pub duration: Duration,
    pub sample_every: Duration,
    /// Healthy connections per second (connect, accept, close).
    pub churn_per_s: u32,
    pub burst_every: Duration,
    /// Refused connects per burst; connect and bind errors are a tenth each.
    pub burst_refused: u32,
}

/// Port of the churn's listener, and the first of the ports bursts are
/// refused on (one more each burst, so their keys are new).
const CHURN_PORT: u16 = 5000;
const REFUSED_BASE: u16 = 6000;

/// bpf_map_type values of the hash maps (plain, per-CPU, LRU, LRU per-CPU):
/// the maps that fill.
const HASH_MAP_TYPES: [u64; 4] = [1, 5, 9, 10];

/// RSS after warm-up (the first sample interval) may move this much.
pub const RSS_TOLERANCE_BYTES: u64 = 2 << 20;

/// Counts of what tcptrace wrote, by record type, and its last stats.
#[derive(Default)]
struct Written {
    records: BTreeMap<String, u64>,
    /// Failures per event kind: a record with a `count` stands for that many.
    failures: BTreeMap<String, u64>,
    /// The same, of the bursts' namespaces only.
    burst_failures: BTreeMap<String, u64>,
    lost: u64,
}

/// Failures one or more bursts made, by the event kind each must produce:
/// a refused connect is a reset received (and one sent by the kernel), a
/// connect with no source port a connect error, a bind to a port in use a
/// bind error.
#[derive(Clone, Copy, Default)]
struct Made {
    refused: u64,
    no_port: u64,
    in_use: u64,
}

impl Made {
    fn total(&self) -> u64 {
        self.refused + self.no_port + self.in_use
    }

    fn add(&mut self, other: Made) {
        self.refused += other.refused;
        self.no_port += other.no_port;
        self.in_use += other.in_use;
    }

    fn by_kind(&self) -> BTreeMap<String, u64> {
        [
            ("bind_error", self.in_use),
            ("connect_error", self.no_port),
            ("reset_received", self.refused),
            ("reset_sent", self.refused),
        ]
        .into_iter()
        .filter(|(_, n)| *n > 0)
        .map(|(k, n)| (k.to_string(), n))
        .collect()
    }
}

/// Every failure made is recorded, once, in the bursts' namespaces: the
/// kinds the bursts make are counted exactly; what else was recorded there
/// is listed.
fn failures_check(
    made: &BTreeMap<String, u64>,
    recorded: &BTreeMap<String, u64>,
    lost: u64,
) -> Value {
    let (mine, other): (BTreeMap<String, u64>, BTreeMap<String, u64>) = recorded
        .iter()
        .map(|(k, n)| (k.clone(), *n))
        .partition(|(k, _)| made.contains_key(k));
    json!({
        "made": made,
        "recorded": mine,
        "other_recorded": other,
        "lost": lost,
        "pass": *made == mine,
    })
}

/// RSS after the first sample (warm-up) stays within
/// [`RSS_TOLERANCE_BYTES`]; two samples after warm-up are needed to judge.
fn rss_check(samples: &[Value]) -> Value {
    let rss: Vec<u64> = samples
        .iter()
        .skip(1)
        .filter_map(|s| s["rss_bytes"].as_u64())
        .collect();
    let (min, max) = (rss.iter().min(), rss.iter().max());
    json!({
        "after_warm_up_samples": rss.len(),
        "min_bytes": min,
        "max_bytes": max,
        "tolerance_bytes": RSS_TOLERANCE_BYTES,
        "pass": rss.len() >= 2 && max.zip(min).is_some_and(|(a, b)| a - b <= RSS_TOLERANCE_BYTES),
    })
}

/// The checks that failed, in words (none: the run passed).
pub fn failed_checks(run: &Value) -> Vec<String> {
    let c = &run["checks"];
    let mut failed = Vec::new();
    if c["failures"]["pass"] != true {
        failed.push(format!(
            "failures made {} != recorded in the bursts' namespaces {} ({} lost)",
            c["failures"]["made"], c["failures"]["recorded"], c["failures"]["lost"]
        ));
    }
    if c["rss"]["pass"] != true {
        failed.push(format!(
            "RSS after warm-up not flat within {} bytes: {} to {} over {} samples (2 needed)",
            c["rss"]["tolerance_bytes"],
            c["rss"]["min_bytes"],
            c["rss"]["max_bytes"],
            c["rss"]["after_warm_up_samples"]
        ));
    }
    failed
}

pub fn soak(tcptrace: &Path, plan: &SoakPlan, stop: &'static AtomicBool) -> Result<Value> {
    let churn_ns = bench_netns("soak")?;
    let (mut t, _) = Traced::start(
        Spawn {
            program: tcptrace,
            args: ["--format", "json", "--stats-interval", "60"]
                .map(String::from)
                .to_vec(),
            stdout: Stdio::piped(),
            ready_line: Some("tcptrace: tracing,"),
            perf_events: 0,
        },
        Duration::from_secs(30),
    )?;
    let written = Arc::new(Mutex::new(Written::default()));
    // The bursts' namespaces, by inode: their records are the ones counted
    // against what the bursts made (the machine's other traffic is traced too).
    let burst_netns: Arc<Mutex<HashSet<u64>>> = Arc::default();
    let reader = {
        let stdout = t.take_stdout().context("tcptrace's stdout")?;
        let written = Arc::clone(&written);
        let burst_netns = Arc::clone(&burst_netns);
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let Ok(v) = serde_json::from_str::<Value>(&line) else {
                    continue;
                };
                let mut w = written
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let kind = v["type"].as_str().unwrap_or("?").to_string();
                *w.records.entry(kind).or_default() += 1;
                if let Some(event) = v["kind"].as_str() {
                    let n = v["count"].as_u64().unwrap_or(1);
                    *w.failures.entry(event.to_string()).or_default() += n;
                    let in_burst = v["netns"].as_u64().is_some_and(|ns| {
                        burst_netns
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .contains(&ns)
                    });
                    if in_burst {
                        *w.burst_failures.entry(event.to_string()).or_default() += n;
                    }
                }
                if v["type"] == "stats" {
                    w.lost = v["lost"].as_u64().unwrap_or(w.lost);
                }
            }
        })
    };
    let done = Arc::new(AtomicBool::new(false));
    let churned = Arc::new(AtomicU64::new(0));
    let churn = start_churn(&churn_ns, plan.churn_per_s, &done, &churned)?;

    let started = Instant::now();
    let mut samples = Vec::new();
    let mut made = Made::default();
    let mut bursts = 0u32;
    let mut next_burst = started;
    let mut next_sample = started;
    let mut last_cpu = (sys::cpu_time(t.pid)?, started);
    let result = loop {
        if stop.load(Ordering::Relaxed) {
            break Err(anyhow::anyhow!("interrupted"));
        }
        let now = Instant::now();
        if now >= next_sample {
            let cpu = sys::cpu_time(t.pid)?;
            let busy = cpu.saturating_sub(last_cpu.0).as_secs_f64()
                / now.duration_since(last_cpu.1).as_secs_f64().max(1e-9);
            last_cpu = (cpu, now);
            let w = written
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let sample = json!({
                "minute": started.elapsed().as_secs_f64() / 60.0,
                "rss_bytes": sys::status_bytes(t.pid, "VmRSS")?,
                "hwm_bytes": sys::status_bytes(t.pid, "VmHWM")?,
                "cpu_percent_of_a_core": busy * 100.0,
                "maps": map_fill(t.pid)?,
                "connections_churned": churned.load(Ordering::Relaxed),
                "failures_made": made.total(),
                "records": w.records,
                "failures_recorded": w.failures,
                "lost": w.lost,
            });
            drop(w);
            eprintln!("tcptrace-bench: soak {}", summary(&sample));
            samples.push(sample);
            next_sample += plan.sample_every;
        }
        if now.duration_since(started) >= plan.duration {
            break Ok(());
        }
        if now >= next_burst {
            made.add(burst(bursts, plan.burst_refused, &burst_netns)?);
            bursts += 1;
            next_burst += plan.burst_every;
        }
        thread::sleep(Duration::from_millis(200));
    };
    done.store(true, Ordering::Relaxed);
    let _ = churn.join();
    let stopped = t.stop(Signal::SIGTERM, Duration::from_secs(30));
    let _ = reader.join();
    drop(churn_ns);
    result?;
    stopped?;
    let w = written
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let checks = json!({
        "failures": failures_check(&made.by_kind(), &w.burst_failures, w.lost),
        "rss": rss_check(&samples),
    });
    Ok(json!({
        "schema": 1,
        "date": report::utc_now(),
        "machine": report::machine(None),
        "plan": {
            "minutes": plan.duration.as_secs_f64() / 60.0,
            "sample_every_s": plan.sample_every.as_secs(),
            "churn_per_s": plan.churn_per_s,
            "burst_every_s": plan.burst_every.as_secs(),
            "burst_refused": plan.burst_refused,
        },
        "bursts": bursts,
        "samples": samples,
        "checks": checks,
    }))
}

fn summary(sample: &Value) -> String {
    let mib = |k: &str| sample[k].as_f64().unwrap_or(0.0) / 1048576.0;
    format!(
        "min {:.1}: RSS {:.1} MiB (peak {:.1}), CPU {:.1}%, {} connections, {} failures made, recorded {}, records {}, maps {}",
        sample["minute"].as_f64().unwrap_or(0.0),
        mib("rss_bytes"),
        mib("hwm_bytes"),
        sample["cpu_percent_of_a_core"].as_f64().unwrap_or(0.0),
        sample["connections_churned"],
        sample["failures_made"],
        sample["failures_recorded"],
        sample["records"],
        sample["maps"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|m| format!(
                "{}={}/{}",
                m["map"].as_str().unwrap_or("?"),
                m["entries"],
                m["max_entries"]
            ))
            .collect::<Vec<_>>()
            .join(" ")
    )
}

/// Healthy connections at `per_s` until `done`: connect, accept, the
/// server closes first.
fn start_churn(
    ns: &tcptrace_lab::netns::Netns,
    per_s: u32,
    done: &Arc<AtomicBool>,
    churned: &Arc<AtomicU64>,
) -> Result<thread::JoinHandle<()>> {
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, CHURN_PORT));
    let listener = ns
        .run("soak-listen", move || TcpListener::bind(addr))?
        .context("listening in the soak namespace")?;
    let (done_server, done_client) = (Arc::clone(done), Arc::clone(done));
    thread::spawn(move || {
        for s in listener.incoming() {
            if done_server.load(Ordering::Relaxed) {
                break;
            }
            drop(s);
        }
    });
    let churned = Arc::clone(churned);
    let name = ns.name.clone();
    let gap = Duration::from_secs(1) / per_s.max(1);
    Ok(thread::spawn(move || {
        let _ = tcptrace_lab::netns::in_netns(&name, "soak-churn", move || {
            let mut next = Instant::now();
            while !done_client.load(Ordering::Relaxed) {
                if TcpStream::connect(addr)
                    .and_then(|mut s| s.read(&mut [0u8; 1]))
                    .is_ok()
                {
                    churned.fetch_add(1, Ordering::Relaxed);
                }
                next += gap;
                thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            // Wake the acceptor for its last check.
            let _ = TcpStream::connect(addr);
        });
    }))
}

/// One burst in a namespace of its own (its inode added to `namespaces`),
/// deleted after: refused connects to a port new to this burst, connects
/// with no source port left (a two-port range, both held) and binds to a
/// port in use. Returns the failures made, each by the error it must give.
fn burst(n: u32, refused: u32, namespaces: &Mutex<HashSet<u64>>) -> Result<Made> {
    let ns = bench_netns(&format!("burst{n}"))?;
    namespaces
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .insert(u64::from(ns.inode()?));
    ns.sysctl("net.ipv4.ip_local_port_range", "40000 40001")?;
    let port = REFUSED_BASE + (n % 1000) as u16;
    let made = ns.run("soak-burst", move || {
        use std::io::ErrorKind::{AddrInUse, AddrNotAvailable, ConnectionRefused};
        let local = |p| SocketAddr::from((Ipv4Addr::LOCALHOST, p));
        let failed =
            |r: std::io::Result<_>, kind| u64::from(r.err().map(|e| e.kind()) == Some(kind));
        let mut made = Made::default();
        for _ in 0..refused {
            made.refused += failed(TcpStream::connect(local(port)).map(drop), ConnectionRefused);
        }
        let Ok(l) = TcpListener::bind(local(CHURN_PORT)) else {
            return made;
        };
        let held: Vec<TcpStream> = (0..2)
            .filter_map(|_| TcpStream::connect(local(CHURN_PORT)).ok())
            .collect();
        for _ in 0..refused / 10 {
            made.no_port += failed(
                TcpStream::connect(local(CHURN_PORT)).map(drop),
                AddrNotAvailable,
            );
            made.in_use += failed(TcpListener::bind(local(CHURN_PORT)).map(drop), AddrInUse);
        }
        // A clean close of the held connections: accepted, then closed by
        // the server first (a listener closed over a full queue would reset
        // them, failures nobody counted).
        let accepted: Vec<TcpStream> = held
            .iter()
            .filter_map(|_| l.accept().ok())
            .map(|(s, _)| s)
            .collect();
        drop(accepted);
        drop((held, l));
        made
    })?;
    Ok(made)
}

/// Entries and capacity of each hash map tcptrace holds (`bpftool map
/// dump`), by name.
fn map_fill(pid: u32) -> Result<Vec<Value>> {
    let names = tcptrace::bpf::inspect::loaded().maps;
    let mut rows = Vec::new();
    for (id, fields) in sys::bpf_fds(pid)?.maps {
        let num = |k: &str| fields.get(k).and_then(|v| v.parse::<u64>().ok());
        if !num("map_type").is_some_and(|t| HASH_MAP_TYPES.contains(&t)) {
            continue;
        }
        let out = Command::new("bpftool")
            .args(["--json", "map", "dump", "id", &id.to_string()])
            .output()
            .context("running bpftool (apt install bpftool)")?;
        if !out.status.success() {
            bail!(
                "bpftool map dump id {id}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let entries = serde_json::from_slice::<Value>(&out.stdout)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .context("bpftool printed no JSON array")?;
        rows.push(json!({
            "map": names.get(&id).cloned().unwrap_or_else(|| format!("id {id}")),
            "entries": entries,
            "max_entries": num("max_entries"),
        }));
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(rss_mib: &[u64]) -> Vec<Value> {
        rss_mib
            .iter()
            .map(|m| json!({ "rss_bytes": m << 20 }))
            .collect()
    }

    #[test]
    fn rss_is_judged_after_warm_up_within_the_tolerance() {
        // Warm-up (the first sample) may differ; after it, 2 MiB of play.
        assert_eq!(rss_check(&samples(&[40, 16, 17, 18]))["pass"], true);
        let grew = rss_check(&samples(&[16, 16, 17, 19]));
        assert_eq!(
            grew,
            json!({
                "after_warm_up_samples": 3,
                "min_bytes": 16 << 20,
                "max_bytes": 19 << 20,
                "tolerance_bytes": 2 << 20,
                "pass": false,
            })
        );
        // One sample after warm-up shows no trend: not enough to pass.
        assert_eq!(rss_check(&samples(&[16, 16]))["pass"], false);
    }

    #[test]
    fn every_failure_made_must_be_recorded_by_kind() {
        let made = Made {
            refused: 5000,
            no_port: 500,
            in_use: 500,
        };
        assert_eq!(made.total(), 6000);
        let mut recorded = made.by_kind();
        assert_eq!(failures_check(&made.by_kind(), &recorded, 0)["pass"], true);
        *recorded.get_mut("reset_received").unwrap() -= 1;
        let run = json!({
            "checks": {
                "failures": failures_check(&made.by_kind(), &recorded, 1),
                "rss": rss_check(&samples(&[16, 16, 16])),
            }
        });
        assert_eq!(
            failed_checks(&run),
            [
                "failures made {\"bind_error\":500,\"connect_error\":500,\"reset_received\":5000,\"reset_sent\":5000} \
                 != recorded in the bursts' namespaces {\"bind_error\":500,\"connect_error\":500,\"reset_received\":4999,\"reset_sent\":5000} (1 lost)"
            ]
        );
    }
}
