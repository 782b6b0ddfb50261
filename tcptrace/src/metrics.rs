//! Prometheus metrics sink: counts the records the other sinks see and
//! serves them on `GET /metrics` (`--metrics-addr`, off by default).
//!
//! Encoding is `prometheus-client` (OpenMetrics text, which Prometheus
//! scrapes natively); the HTTP side is `tiny_http` on its own threads, so a
//! slow scraper never stalls tracing. Only loopback addresses are served
//! unless `--metrics-allow-remote` is given.
//!
//! Series (all counters are `_total`):
//! - `tcptrace_verdicts_total{cause,pod}`: verdict records emitted (a cause
//!   is re-reported at most every 10 s per pod and destination).
//! - `tcptrace_verdict_occurrences_total{cause,pod}`: occurrences aggregated
//!   into those verdicts.
//! - `tcptrace_events_total{kind,pod}`: failures the event records stand
//!   for (a storm's record with `count` n counts n).
//! - `tcptrace_kernel_events_total{hook}` / `tcptrace_lost_events_total{hook}`:
//!   events the kernel delivered (as records, or counted in a storm) / lost
//!   (ring buffer full), from stats records.
//! - `tcptrace_malformed_records_total`: records that could not be decoded.
//! - `tcptrace_unaccounted_failures_total{bound}`: failures in the stream no
//!   verdict accounts for because a bound was reached (`ledger_full`,
//!   `repeats`, `evicted_resets`), from stats records.
//! - `tcptrace_probe_attached{hook,tracepoint,tier}`: 1 when live, else 0.
//!
//! `pod` is `namespace/name`, or what is known of a pod whose name is not
//! (`uid <uid> container <id>`), empty for sockets outside any pod. At most [`MAX_POD_LABELS`] distinct pods get
//! their own series; the rest are counted under `pod="_other"`.
use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    thread,
};

use anyhow::{Context as _, Result, bail};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{
    model::{PodRef, ProbeState, ProbeStatus, Record, Verdict, VerdictKey},
    output::Sink,
};

/// Distinct `pod` label values before new pods fold into `_other`.
pub const MAX_POD_LABELS: usize = 500;
/// The `pod` label of pods past the cap.
pub const OTHER_POD: &str = "_other";
/// Verdict keys remembered to turn cumulative counts into occurrences.
const MAX_VERDICT_KEYS: usize = 8192;
/// What the endpoint answers with.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CauseLabels {
    cause: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
    pod: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HookLabels {
    hook: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BoundLabels {
    bound: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProbeLabels {
    hook: String,
    tracepoint: String,
    tier: String,
}

/// The counters, fed from the record stream. Cheap to update: the registry
/// shares the same atomics with the HTTP thread.
pub struct Metrics {
    registry: Arc<Registry>,
    verdicts: Family<CauseLabels, Counter>,
    occurrences: Family<CauseLabels, Counter>,
    events: Family<KindLabels, Counter>,
    kernel_events: Family<HookLabels, Counter>,
    lost: Family<HookLabels, Counter>,
    malformed: Counter,
    unaccounted: Family<BoundLabels, Counter>,
    probes: Family<ProbeLabels, Gauge>,
    pods: HashSet<String>,
    resets: Family<CauseLabels, Counter>,
    /// Last cumulative (count, resets) per verdict key (cause, pod, netns,
    /// destination, unexplained kind).
    verdict_counts: HashMap<VerdictKey, (u64, u64)>,
    /// Last cumulative kernel counters per hook, from stats records.
    hook_seen: HashMap<String, (u64, u64)>,
    last_malformed: u64,
    last_unaccounted: crate::model::Unaccounted,
    /// The endpoint serving these counters, stopped when dropped.
    server: Option<MetricsServer>,
}

/// `--metrics-addr` and `--metrics-allow-remote`: counters served on `addr`,
/// or `None` when metrics are off. Binds before tracing starts, so a refused
/// or busy address fails fast.
pub fn start(addr: Option<SocketAddr>, allow_remote: bool) -> Result<Option<Metrics>> {
    let Some(addr) = addr else { return Ok(None) };
    let mut metrics = Metrics::new();
    let server = metrics.serve(addr, allow_remote)?;
    eprintln!("tcptrace: metrics on http://{}/metrics", server.addr());
    metrics.server = Some(server);
    Ok(Some(metrics))
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let verdicts = Family::<CauseLabels, Counter>::default();
        let occurrences = Family::<CauseLabels, Counter>::default();
        let resets = Family::<CauseLabels, Counter>::default();
        let events = Family::<KindLabels, Counter>::default();
        let kernel_events = Family::<HookLabels, Counter>::default();
        let lost = Family::<HookLabels, Counter>::default();
        let malformed = Counter::default();
        let unaccounted = Family::<BoundLabels, Counter>::default();
        let probes = Family::<ProbeLabels, Gauge>::default();
        registry.register(
            "tcptrace_verdicts",
            "Verdict records emitted, by cause and pod",
            verdicts.clone(),
        );
        registry.register(
            "tcptrace_verdict_occurrences",
            "Failure occurrences aggregated into verdicts, by cause and pod",
            occurrences.clone(),
        );
        registry.register(
            "tcptrace_verdict_resets",
            "Reset segments accounted for by verdicts, by cause and pod",
            resets.clone(),
        );
        registry.register(
            "tcptrace_events",
            "Event records emitted, by kind and pod",
            events.clone(),
        );
        registry.register(
            "tcptrace_kernel_events",
            "Events the kernel hooks delivered, by hook",
            kernel_events.clone(),
        );
        registry.register(
            "tcptrace_lost_events",
            "Events lost in the kernel (ring buffer full), by hook",
            lost.clone(),
        );
        registry.register(
            "tcptrace_malformed_records",
            "Kernel records tcptrace could not decode",
            malformed.clone(),
        );
        registry.register(
            "tcptrace_unaccounted_failures",
            "Failures in the stream no verdict accounts for, by the bound that was reached",
            unaccounted.clone(),
        );
        registry.register(
            "tcptrace_probe_attached",
            "1 when the kernel hook is attached, 0 when disabled or unavailable",
            probes.clone(),
        );
        Self {
            registry: Arc::new(registry),
            verdicts,
            occurrences,
            resets,
            events,
            kernel_events,
            lost,
            malformed,
            unaccounted,
            probes,
            pods: HashSet::new(),
            verdict_counts: HashMap::new(),
            hook_seen: HashMap::new(),
            last_malformed: 0,
            last_unaccounted: crate::model::Unaccounted::default(),
            server: None,
        }
    }

    /// Where the counters are served, when they are.
    pub fn addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().map(MetricsServer::addr)
    }

    /// Records which hooks are live and through which tier.
    pub fn set_probes(&self, probes: &[ProbeStatus]) {
        for p in probes {
            let labels = ProbeLabels {
                hook: p.hook.to_string(),
                tracepoint: p.tracepoint.clone(),
                tier: p.tier.as_str().to_string(),
            };
            let live = i64::from(p.state == ProbeState::Attached);
            self.probes.get_or_create(&labels).set(live);
        }
    }

    /// Counts one record, as every sink sees it.
    /// Adds the occurrences and resets a verdict's cumulative counts hold
    /// beyond what its key reported before (a live count or a record).
    pub fn count_occurrences(&mut self, v: &Verdict) {
        let labels = CauseLabels {
            cause: v.cause.as_str().to_string(),
            pod: self.pod_label(v.pod.as_ref()),
        };
        let key = v.key();
        if self.verdict_counts.len() >= MAX_VERDICT_KEYS && !self.verdict_counts.contains_key(&key)
        {
            self.verdict_counts.clear();
        }
        let (last, last_resets) = self
            .verdict_counts
            .insert(key, (v.count, v.resets))
            .unwrap_or((0, 0));
        // Smaller counts mean the diagnoser forgot the key and started over.
        let new = |now: u64, before: u64| if now >= before { now - before } else { now };
        let (occurrences, resets) = (new(v.count, last), new(v.resets, last_resets));
        if occurrences > 0 {
            self.occurrences.get_or_create(&labels).inc_by(occurrences);
        }
        if resets > 0 {
            self.resets.get_or_create(&labels).inc_by(resets);
        }
    }

    pub fn observe(&mut self, record: &Record) {
        match record {
            Record::Event(ev) => {
                let labels = KindLabels {
                    kind: ev.kind.as_str().to_string(),
                    pod: self.pod_label(ev.pod.as_ref()),
                };
                self.events
                    .get_or_create(&labels)
                    .inc_by(ev.count.unwrap_or(1));
            }
            Record::Verdict(v) => {
                let labels = CauseLabels {
                    cause: v.cause.as_str().to_string(),
                    pod: self.pod_label(v.pod.as_ref()),
                };
                self.verdicts.get_or_create(&labels).inc();
                self.count_occurrences(v);
            }
            Record::Stats(s) => {
                for h in &s.hooks {
                    let (seen, lost) = self.hook_seen.get(&h.hook).copied().unwrap_or((0, 0));
                    let delivered = h.seen + h.folded;
                    let labels = HookLabels {
                        hook: h.hook.clone(),
                    };
                    // Counters only grow; kernel counters do too.
                    self.kernel_events
                        .get_or_create(&labels)
                        .inc_by(delivered.saturating_sub(seen));
                    self.lost
                        .get_or_create(&labels)
                        .inc_by(h.lost.saturating_sub(lost));
                    self.hook_seen
                        .insert(h.hook.clone(), (delivered.max(seen), h.lost.max(lost)));
                }
                self.malformed
                    .inc_by(s.malformed.saturating_sub(self.last_malformed));
                self.last_malformed = self.last_malformed.max(s.malformed);
                let (now, last) = (s.unaccounted, self.last_unaccounted);
                for (bound, now, last) in [
                    ("ledger_full", now.ledger_full, last.ledger_full),
                    ("repeats", now.repeats, last.repeats),
                    ("evicted_resets", now.evicted_resets, last.evicted_resets),
                ] {
                    self.unaccounted
                        .get_or_create(&BoundLabels { bound })
                        .inc_by(now.saturating_sub(last));
                }
                self.last_unaccounted = crate::model::Unaccounted {
                    ledger_full: now.ledger_full.max(last.ledger_full),
                    repeats: now.repeats.max(last.repeats),
                    evicted_resets: now.evicted_resets.max(last.evicted_resets),
                };
            }
        }
    }

    /// The bounded `pod` label of a record.
    fn pod_label(&mut self, pod: Option<&PodRef>) -> String {
        let Some(p) = pod else {
            return String::new();
        };
        let label = p.to_string();
        if self.pods.contains(&label) {
            label
        } else if self.pods.len() < MAX_POD_LABELS {
            self.pods.insert(label.clone());
            label
        } else {
            OTHER_POD.to_string()
        }
    }

    /// The exposition text, as served.
    pub fn encode(&self) -> String {
        encode_registry(&self.registry)
    }

    /// Starts serving `GET /metrics` on `addr`; the server stops when the
    /// returned handle is dropped.
    pub fn serve(&self, addr: SocketAddr, allow_remote: bool) -> Result<MetricsServer> {
        check_addr(addr, allow_remote)?;
        MetricsServer::start(addr, Arc::clone(&self.registry))
    }
}

fn encode_registry(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut text, registry);
    text
}

/// "Loopback unless told otherwise": metrics name pods and services, so they
/// are not offered to the network by accident.
pub fn check_addr(addr: SocketAddr, allow_remote: bool) -> Result<()> {
    if !addr.ip().is_loopback() && !allow_remote {
        bail!(
            "--metrics-addr {addr} is not a loopback address: pass --metrics-allow-remote to serve metrics to the network (e.g. for a Prometheus scraping the node), or use 127.0.0.1:{}",
            addr.port()
        );
    }
    Ok(())
}

/// A running metrics endpoint.
pub struct MetricsServer {
    server: Arc<tiny_http::Server>,
    thread: Option<thread::JoinHandle<()>>,
    addr: SocketAddr,
}

impl MetricsServer {
    fn start(addr: SocketAddr, registry: Arc<Registry>) -> Result<Self> {
        let server = tiny_http::Server::http(addr)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .with_context(|| format!("serving metrics on {addr}"))?;
        let bound = server.server_addr().to_ip().unwrap_or(addr);
        let server = Arc::new(server);
        let worker = Arc::clone(&server);
        let thread = thread::Builder::new()
            .name("tcptrace-metrics".into())
            .spawn(move || {
                // Ends when `unblock` is called on drop.
                for request in worker.incoming_requests() {
                    let response = respond(&request, &registry);
                    let _ = request.respond(response);
                }
            })
            .context("starting the metrics thread")?;
        Ok(Self {
            server,
            thread: Some(thread),
            addr: bound,
        })
    }

    /// The bound address (with the real port when 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.server.unblock();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn respond(
    request: &tiny_http::Request,
    registry: &Registry,
) -> tiny_http::Response<std::io::Cursor<Vec<u8>>> {
    let path = request.url().split('?').next().unwrap_or("");
    let (status, body, content_type) = match (request.method(), path) {
        (tiny_http::Method::Get, "/metrics") => (200, encode_registry(registry), CONTENT_TYPE),
        (tiny_http::Method::Get, _) => (
            404,
            "not found: metrics are at /metrics\n".to_string(),
            "text/plain; charset=utf-8",
        ),
        _ => (
            405,
            "method not allowed: use GET\n".to_string(),
            "text/plain; charset=utf-8",
        ),
    };
    let header = tiny_http::Header::from_bytes("Content-Type", content_type)
        .expect("static header is valid");
    tiny_http::Response::from_string(body)
        .with_status_code(status)
        .with_header(header)
}

/// A sink that counts what passes through it (when metrics are on) and
/// forwards everything to `inner`.
pub struct MeteredSink<S> {
    pub inner: S,
    pub metrics: Option<Metrics>,
}

impl<S> MeteredSink<S> {
    pub fn new(inner: S, metrics: Option<Metrics>) -> Self {
        Self { inner, metrics }
    }
}

impl<S: Sink> Sink for MeteredSink<S> {
    fn write(&mut self, record: &Record) -> Result<()> {
        if let Some(m) = &mut self.metrics {
            m.observe(record);
        }
        self.inner.write(record)
    }

    fn live(&mut self, verdict: &Verdict) -> Result<()> {
        if let Some(m) = &mut self.metrics {
            m.count_occurrences(verdict);
        }
        self.inner.live(verdict)
    }

    fn flush(&mut self) -> Result<()> {
        self.inner.flush()
    }

    fn dropped(&self) -> u64 {
        self.inner.dropped()
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::{Read as _, Write as _},
        net::{IpAddr, Ipv4Addr, TcpStream},
        time::{Duration, Instant, UNIX_EPOCH},
    };

    use super::*;
    use crate::{
        model::{Cause, Confidence, ProbeState, ProbeStatus, Tier, Verdict},
        model::{Endpoint, Event, EventKind, HookStats, IdentityLevel, Stats},
    };

    fn pod(name: &str) -> PodRef {
        PodRef {
            namespace: "default".into(),
            name: name.into(),
            uid: format!("uid-{name}"),
            container: None,
        }
    }

    fn event(p: Option<PodRef>) -> Record {
        let mut ev = Event::new(
            UNIX_EPOCH,
            EventKind::ConnectError,
            Endpoint::unspecified(),
            Endpoint::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 80),
            7,
        );
        ev.pod = p;
        Record::Event(Box::new(ev))
    }

    fn verdict(count: u64) -> Record {
        Record::Verdict(Box::new(Verdict {
            time: UNIX_EPOCH,
            cause: Cause::ConnectionRefused,
            confidence: Confidence::Certain,
            pod: Some(pod("web")),
            identity_level: IdentityLevel::Pod,
            netns: 7,
            netns_name: None,
            node: None,
            pid: None,
            comm: None,
            src: Endpoint::unspecified(),
            dst: Endpoint::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 80),
            summary: String::new(),
            evidence: Default::default(),
            fix: String::new(),
            count,
            resets: 0,
            first_seen: UNIX_EPOCH,
            last_seen: UNIX_EPOCH,
            severity: Cause::ConnectionRefused.severity(),
        }))
    }

    fn stats(seen: u64, lost: u64) -> Record {
        Record::Stats(Stats {
            node: None,
            kernel: None,
            time: UNIX_EPOCH,
            uptime_s: 1.0,
            seen,
            lost,
            malformed: 2,
            sink_dropped: 0,
            hooks: vec![HookStats {
                hook: "retransmit".into(),
                seen,
                lost,
                folded: 0,
                fold_full: 0,
            }],
            unaccounted: crate::model::Unaccounted {
                ledger_full: lost,
                repeats: seen / 5,
                evicted_resets: 0,
            },
            r#final: false,
            tick: None,
        })
    }

    fn lines(m: &Metrics) -> Vec<String> {
        m.encode().lines().map(str::to_string).collect()
    }

    #[test]
    fn counts_verdicts_occurrences_events_and_losses() {
        let mut m = Metrics::new();
        m.set_probes(&[
            ProbeStatus {
                hook: "retransmit",
                tracepoint: "tcp/tcp_retransmit_skb".into(),
                tier: Tier::Tracepoint,
                state: ProbeState::Attached,
            },
            ProbeStatus {
                hook: "bind_error",
                tracepoint: "syscalls/sys_exit_bind".into(),
                tier: Tier::Tracepoint,
                state: ProbeState::Disabled("--no-syscall-hooks".into()),
            },
        ]);
        m.observe(&event(None));
        m.observe(&event(Some(pod("web"))));
        let unnamed = PodRef {
            namespace: String::new(),
            name: String::new(),
            uid: "3f2a".into(),
            container: Some("c0ffee".into()),
        };
        m.observe(&event(Some(unnamed)));
        m.observe(&verdict(1));
        // Re-emitted with the cumulative count: 4 more occurrences.
        m.observe(&verdict(5));
        m.observe(&stats(10, 1));
        m.observe(&stats(15, 3));
        let l = lines(&m);
        for want in [
            r#"tcptrace_verdicts_total{cause="connection_refused",pod="default/web"} 2"#,
            r#"tcptrace_verdict_occurrences_total{cause="connection_refused",pod="default/web"} 5"#,
            r#"tcptrace_events_total{kind="connect_error",pod=""} 1"#,
            r#"tcptrace_events_total{kind="connect_error",pod="default/web"} 1"#,
            r#"tcptrace_events_total{kind="connect_error",pod="uid 3f2a container c0ffee"} 1"#,
            r#"tcptrace_kernel_events_total{hook="retransmit"} 15"#,
            r#"tcptrace_lost_events_total{hook="retransmit"} 3"#,
            "tcptrace_malformed_records_total 2",
            r#"tcptrace_unaccounted_failures_total{bound="ledger_full"} 3"#,
            r#"tcptrace_unaccounted_failures_total{bound="repeats"} 3"#,
            r#"tcptrace_probe_attached{hook="retransmit",tracepoint="tcp/tcp_retransmit_skb",tier="tracepoint"} 1"#,
            r#"tcptrace_probe_attached{hook="bind_error",tracepoint="syscalls/sys_exit_bind",tier="tracepoint"} 0"#,
            "# EOF",
        ] {
            assert!(l.iter().any(|x| x == want), "missing {want:?} in\n{l:#?}");
        }
    }

    #[test]
    fn pod_labels_are_capped() {
        let mut m = Metrics::new();
        for i in 0..MAX_POD_LABELS + 20 {
            m.observe(&event(Some(pod(&format!("p{i}")))));
        }
        let l = lines(&m);
        let series = l
            .iter()
            .filter(|x| x.starts_with("tcptrace_events_total{"))
            .count();
        assert_eq!(series, MAX_POD_LABELS + 1);
        assert!(
            l.contains(&r#"tcptrace_events_total{kind="connect_error",pod="_other"} 20"#.into())
        );
        // A pod that already has a label keeps it.
        m.observe(&event(Some(pod("p0"))));
        assert!(
            lines(&m).contains(
                &r#"tcptrace_events_total{kind="connect_error",pod="default/p0"} 2"#.into()
            )
        );
    }

    #[test]
    fn refuses_remote_addresses_unless_allowed() {
        let remote: SocketAddr = "0.0.0.0:9464".parse().unwrap();
        let err = check_addr(remote, false).unwrap_err().to_string();
        assert!(err.contains("--metrics-allow-remote"), "{err}");
        check_addr(remote, true).unwrap();
        check_addr("127.0.0.1:9464".parse().unwrap(), false).unwrap();
        check_addr("[::1]:9464".parse().unwrap(), false).unwrap();
    }

    /// A raw request, to check status codes without a client's opinions.
    fn get(addr: SocketAddr, request: &str) -> String {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }

    #[test]
    fn serves_metrics_on_loopback_and_stops_on_drop() {
        let mut m = Metrics::new();
        m.observe(&verdict(1));
        let server = m.serve("127.0.0.1:0".parse().unwrap(), false).unwrap();
        let addr = server.addr();
        let ok = get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
        assert!(ok.contains(CONTENT_TYPE), "{ok}");
        assert!(
            ok.contains(
                r#"tcptrace_verdicts_total{cause="connection_refused",pod="default/web"} 1"#
            ),
            "{ok}"
        );
        // Updates after start are visible: the counters are shared.
        m.observe(&verdict(1));
        let again = get(
            addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(
            again.contains(
                r#"tcptrace_verdicts_total{cause="connection_refused",pod="default/web"} 2"#
            ),
            "{again}"
        );
        let missing = get(
            addr,
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        drop(server);
        // tiny_http's acceptor thread lets go of the listener shortly after.
        let deadline = Instant::now() + Duration::from_secs(5);
        while TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "still listening 5 s after the server was dropped"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}
