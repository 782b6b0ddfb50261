//! The scenarios: each seed failure in a lab, with its fixed controls.
//! A failing case expects a verdict of its cause for the namespace that
//! suffered; a control expects no verdict of that cause at all.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::fd::AsFd as _,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use nix::sys::socket::{setsockopt, sockopt};

use crate::{Lab, LabSpec, Pod, conntrack, observer::Observer, which};
use tcptrace::model::{Cause, Event, PodRef, TcpState, Verdict};

use crate::netns::{in_netns, sysctl};

/// What a case must produce.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// A verdict of this cause for the subject's namespace.
    Verdict(Cause),
    /// No verdict of this cause in any namespace of the lab.
    NoVerdict(Cause),
}

/// The case cannot run here (a missing tool or kernel feature).
#[derive(Debug)]
pub struct Skip(pub String);

impl std::fmt::Display for Skip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Skip {}

/// Who should be named, and the numbers the evidence should carry.
#[derive(Clone, Debug, Default)]
pub struct Subject {
    /// `ip netns` name and inode of the namespace that suffered.
    pub netns_name: String,
    pub netns: u32,
    /// The pod, when the namespace is a pod's (not the node's).
    pub pod: Option<PodRef>,
    /// The destination the application used ("10.96.0.10:80").
    pub dst: Option<String>,
    /// Its Service as `namespace/name`, when it is a ClusterIP.
    pub service: Option<String>,
    /// Scenario numbers to compare with the evidence (timeout_s, errno...).
    pub numbers: BTreeMap<String, i64>,
}

impl Subject {
    fn pod(p: &Pod) -> Self {
        Self {
            netns_name: p.netns_name.clone(),
            netns: p.netns,
            pod: Some(p.pod_ref()),
            ..Self::default()
        }
    }

    fn node(lab: &Lab) -> Self {
        Self {
            netns_name: lab.node_netns_name.clone(),
            netns: lab.node_netns,
            ..Self::default()
        }
    }

    fn to(mut self, dst: SocketAddr, service: Option<&str>) -> Self {
        self.dst = Some(dst.to_string());
        self.service = service.map(|s| format!("{}/{s}", super::POD_NAMESPACE));
        self
    }

    fn num(mut self, key: &str, v: i64) -> Self {
        self.numbers.insert(key.into(), v);
        self
    }
}

/// What a case observed.
#[derive(Clone, Debug)]
pub struct Outcome {
    pub subject: Subject,
    pub verdicts: Vec<Verdict>,
    pub events: Vec<Event>,
    /// What the application saw ("connect: os error 99").
    pub note: String,
}

pub struct Case {
    pub scenario: &'static str,
    pub name: &'static str,
    pub expect: Expect,
    f: fn(&mut Observer) -> Result<Outcome>,
}

/// A case's result for the report and the tests.
#[derive(Debug)]
pub struct CaseResult {
    pub scenario: &'static str,
    pub case: &'static str,
    pub expect: Expect,
    pub outcome: Option<Outcome>,
    pub skipped: Option<String>,
    pub error: Option<String>,
    pub pass: bool,
    /// Causes seen, or "no verdict".
    pub got: String,
    pub detail: String,
    pub elapsed: Duration,
}

impl CaseResult {
    pub fn status(&self) -> &'static str {
        match (&self.skipped, self.pass) {
            (Some(_), _) => "skipped",
            (None, true) => "pass",
            (None, false) => "FAIL",
        }
    }

    /// The verdicts of the expected cause for the subject.
    pub fn matching(&self) -> Vec<&Verdict> {
        let (Some(o), Expect::Verdict(c)) = (&self.outcome, self.expect) else {
            return Vec::new();
        };
        o.verdicts
            .iter()
            .filter(|v| v.cause == c && v.netns == o.subject.netns)
            .collect()
    }
}

impl Case {
    pub fn run(&self, obs: &mut Observer) -> CaseResult {
        let start = Instant::now();
        let res = (self.f)(obs);
        let unplaced = obs.take_unplaced();
        let mut r = CaseResult {
            scenario: self.scenario,
            case: self.name,
            expect: self.expect,
            outcome: None,
            skipped: None,
            error: None,
            pass: false,
            got: String::new(),
            detail: String::new(),
            elapsed: start.elapsed(),
        };
        match res {
            Err(e) if e.is::<Skip>() => {
                r.got = "-".into();
                r.detail = format!("skipped: {e}");
                r.skipped = Some(e.to_string());
            }
            Err(e) => {
                r.got = "error".into();
                r.detail = format!("{e:#}");
                r.error = Some(format!("{e:#}"));
            }
            Ok(_) if !unplaced.is_empty() => {
                r.got = "error".into();
                let first = serde_json::to_string(&unplaced[0]).unwrap_or_default();
                r.detail = format!(
                    "{} drop records without a network namespace, the first: {first}",
                    unplaced.len()
                );
                r.error = Some(r.detail.clone());
            }
            Ok(o) => {
                let mut causes: Vec<&str> = o.verdicts.iter().map(|v| v.cause.as_str()).collect();
                causes.sort_unstable();
                causes.dedup();
                r.got = if causes.is_empty() {
                    "no verdict".into()
                } else {
                    causes.join(",")
                };
                r.pass = match self.expect {
                    Expect::Verdict(c) => o
                        .verdicts
                        .iter()
                        .any(|v| v.cause == c && v.netns == o.subject.netns),
                    Expect::NoVerdict(c) => !o.verdicts.iter().any(|v| v.cause == c),
                };
                if !r.pass {
                    r.detail = format!("{}; {}", o.note, explain(&o));
                }
                r.outcome = Some(o);
            }
        }
        r
    }
}

/// A short account of the events, for a failed case.
fn explain(o: &Outcome) -> String {
    let evs: Vec<String> = o
        .events
        .iter()
        .take(12)
        .map(|e| {
            format!(
                "{}[{}{}]{}->{}",
                e.kind.as_str(),
                e.state.map(TcpState::as_str).unwrap_or(""),
                e.errno.map(|x| format!(" {x}")).unwrap_or_default(),
                e.src,
                e.dst
            )
        })
        .collect();
    format!("events: {}", evs.join(" "))
}

/// Every case, in run order.
pub fn all() -> Vec<Case> {
    use Cause::*;
    use Expect::{NoVerdict as No, Verdict as Yes};
    let c = |scenario, name, expect, f| Case {
        scenario,
        name,
        expect,
        f,
    };
    vec![
        c(
            "port_exhaustion",
            "connect",
            Yes(PortExhaustion),
            port_connect,
        ),
        c("port_exhaustion", "bind", Yes(PortExhaustion), port_bind),
        c(
            "port_exhaustion",
            "time_wait",
            Yes(PortExhaustion),
            port_time_wait,
        ),
        c(
            "port_exhaustion",
            "control_other_dst",
            No(PortExhaustion),
            port_control,
        ),
        c(
            "connection_refused",
            "refused",
            Yes(ConnectionRefused),
            refused,
        ),
        c(
            "connection_refused",
            "control_listening",
            No(ConnectionRefused),
            refused_control,
        ),
        c(
            "service_no_endpoints",
            "rejected",
            Yes(ServiceNoEndpoints),
            no_endpoints,
        ),
        c(
            "service_no_endpoints",
            "control_with_endpoints",
            No(ServiceNoEndpoints),
            no_endpoints_control,
        ),
        c(
            "firewall_reject",
            "tcp_reset",
            Yes(FirewallReject),
            reject_tcp_reset,
        ),
        c(
            "firewall_reject",
            "icmp_prohibited",
            Yes(FirewallReject),
            reject_icmp,
        ),
        c(
            "firewall_reject",
            "control_other_source",
            No(FirewallReject),
            reject_control,
        ),
        c(
            "snat_port_exhaustion",
            "two_ports",
            Yes(SnatPortExhaustion),
            snat_two_ports,
        ),
        c(
            "snat_port_exhaustion",
            "control_wide_range",
            No(SnatPortExhaustion),
            snat_control,
        ),
        c(
            "pmtu_black_hole",
            "icmp_dropped",
            Yes(PmtuBlackHole),
            pmtu_icmp_dropped,
        ),
        c(
            "pmtu_black_hole",
            "control_icmp_passes",
            No(PmtuBlackHole),
            pmtu_control,
        ),
        c("syn_timeout", "unanswered", Yes(SynTimeout), syn_timeout),
        c(
            "syn_timeout",
            "control_reachable",
            No(SynTimeout),
            syn_control,
        ),
        c(
            "keepalive_race",
            "idle_reuse",
            Yes(KeepaliveRace),
            keepalive_race,
        ),
        c(
            "keepalive_race",
            "control_fresh",
            No(KeepaliveRace),
            keepalive_fresh,
        ),
        c(
            "application_abort",
            "unread_close",
            Yes(ApplicationAbort),
            abort_unread,
        ),
        c(
            "application_abort",
            "control_read_all",
            No(ApplicationAbort),
            abort_control,
        ),
        c(
            "netfilter_drop",
            "node_policy",
            Yes(NetfilterDrop),
            node_policy_drop,
        ),
        c(
            "netfilter_drop",
            "pod_policy",
            Yes(NetfilterDrop),
            pod_policy_drop,
        ),
        c(
            "netfilter_drop",
            "control_other_source",
            No(NetfilterDrop),
            pod_policy_control,
        ),
        c(
            "idle_timeout",
            "black_hole",
            Yes(IdleTimeout),
            idle_black_hole,
        ),
        c("idle_timeout", "reset", Yes(IdleTimeout), idle_reset),
        c(
            "idle_timeout",
            "control_keepalive",
            No(IdleTimeout),
            idle_control,
        ),
        c(
            "nodeport_collision",
            "ipvs",
            Yes(NodeportCollision),
            nodeport_ipvs,
        ),
        c(
            "nodeport_collision",
            "control_iptables",
            No(NodeportCollision),
            nodeport_iptables,
        ),
        c(
            "nodeport_collision",
            "control_reserved",
            No(NodeportCollision),
            nodeport_reserved,
        ),
        c(
            "conntrack_invalid",
            "beyond_window",
            Yes(ConntrackInvalid),
            invalid_beyond,
        ),
        c(
            "conntrack_invalid",
            "control_be_liberal",
            No(ConntrackInvalid),
            invalid_liberal,
        ),
        c(
            "conntrack_invalid",
            "control_below_window",
            No(ConntrackInvalid),
            invalid_below,
        ),
        c(
            "tcp_stack_drop",
            "below_window",
            Yes(TcpStackDrop),
            stack_drop_below,
        ),
        c(
            "tcp_stack_drop",
            "control_no_segment",
            No(TcpStackDrop),
            stack_drop_control,
        ),
        c(
            "listen_overflow",
            "stalled_small_backlog",
            Yes(ListenOverflow),
            listen_small_backlog,
        ),
        c(
            "listen_overflow",
            "control_large_backlog",
            No(ListenOverflow),
            listen_large_backlog,
        ),
        c(
            "conntrack_table_full",
            "full",
            Yes(ConntrackTableFull),
            table_full,
        ),
        c(
            "conntrack_table_full",
            "control_flushed",
            No(ConntrackTableFull),
            table_full_control,
        ),
    ]
}

/// Scenario names, in run order.
pub fn names() -> Vec<&'static str> {
    let mut v: Vec<&'static str> = Vec::new();
    for c in all() {
        if !v.contains(&c.scenario) {
            v.push(c.scenario);
        }
    }
    v
}

/// Runs the cases of one scenario (for tests).
pub fn run_scenario(obs: &mut Observer, scenario: &str) -> Vec<CaseResult> {
    all()
        .iter()
        .filter(|c| c.scenario == scenario)
        .map(|c| c.run(obs))
        .collect()
}

// ---- helpers ----------------------------------------------------------

const CLIENT: &str = "client";
const SERVER: &str = "server";
const IO_TIMEOUT: Duration = Duration::from_secs(3);

fn cluster_ip(last: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 96, 0, last)
}

/// A listener on 0.0.0.0:`port` inside pod `pod`.
fn listen(lab: &Lab, pod: &str, port: u16) -> Result<TcpListener> {
    let p = lab.get(pod)?;
    in_netns(&p.netns_name, "lab-server", move || {
        TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], port)))
    })?
    .with_context(|| format!("listening on port {port} in pod {pod}"))
}

/// Connects from inside namespace `netns`; the outer error is the lab's,
/// the inner one what the application saw.
fn connect_from(
    netns: &str,
    thread: &str,
    dst: SocketAddr,
    timeout: Duration,
) -> Result<std::io::Result<TcpStream>> {
    in_netns(netns, thread, move || {
        TcpStream::connect_timeout(&dst, timeout)
    })
}

fn accept(l: &TcpListener) -> Result<TcpStream> {
    l.set_nonblocking(true)?;
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match l.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_read_timeout(Some(IO_TIMEOUT))?;
                return Ok(s);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(e).context("accepting a lab connection"),
        }
    }
}

/// One request and its answer, so both ends saw traffic.
fn exchange(client: &TcpStream, server: &TcpStream) -> Result<()> {
    client.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut buf = [0u8; 4];
    (&*client).write_all(b"ping")?;
    (&*server).read_exact(&mut buf)?;
    (&*server).write_all(b"pong")?;
    (&*client).read_exact(&mut buf)?;
    Ok(())
}

/// Closing with a reset frees the socket at once (no FIN_WAIT retransmits
/// after the lab is gone).
fn abort(s: TcpStream) {
    let _ = setsockopt(
        &s.as_fd(),
        sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    );
    drop(s);
}

fn outcome(w: &crate::observer::Watch<'_>, subject: Subject, note: String) -> Outcome {
    Outcome {
        subject,
        verdicts: w.verdicts.clone(),
        events: w.events.clone(),
        note,
    }
}

fn errno_of(r: &std::io::Result<TcpStream>) -> i64 {
    match r {
        Ok(_) => 0,
        Err(e) => i64::from(e.raw_os_error().unwrap_or(-1)),
    }
}

fn describe(r: &std::io::Result<impl Sized>) -> String {
    match r {
        Ok(_) => "succeeded".into(),
        Err(e) => e.to_string(),
    }
}

/// How long a failing case waits for its verdict.
const VERDICT_WAIT: Duration = Duration::from_secs(5);
/// How long a control is watched for a wrong verdict.
const QUIET: Duration = Duration::from_millis(1500);

// ---- port_exhaustion --------------------------------------------------

/// Two ephemeral ports (an even range), both held to the `api` Service.
fn exhausted_lab() -> Result<(Lab, TcpListener, TcpListener)> {
    let lab = Lab::new(
        &LabSpec::pods(&[CLIENT, SERVER])
            .service("api", cluster_ip(20), 80, SERVER, 8080, None)
            .service("other", cluster_ip(21), 80, SERVER, 8081, None),
    )?;
    let client = lab.get(CLIENT)?;
    sysctl(
        &client.netns_name,
        "net.ipv4.ip_local_port_range",
        "40000 40001",
    )?;
    sysctl(&client.netns_name, "net.ipv4.tcp_tw_reuse", "0")?;
    let api = listen(&lab, SERVER, 8080)?;
    let other = listen(&lab, SERVER, 8081)?;
    Ok((lab, api, other))
}

fn hold(lab: &Lab, n: usize) -> Result<Vec<TcpStream>> {
    let client = lab.get(CLIENT)?;
    let dst = SocketAddr::from((cluster_ip(20), 80));
    (0..n)
        .map(|_| {
            connect_from(&client.netns_name, "lab-holder", dst, IO_TIMEOUT)?
                .context("holding a connection to the api Service")
        })
        .collect()
}

fn port_connect(obs: &mut Observer) -> Result<Outcome> {
    let (lab, _api, _other) = exhausted_lab()?;
    let _held = hold(&lab, 2)?;
    let client = lab.get(CLIENT)?;
    let dst = SocketAddr::from((cluster_ip(20), 80));
    let mut w = obs.watch(&lab);
    let r = connect_from(&client.netns_name, "lab-exhaust", dst, IO_TIMEOUT)?;
    let subject = Subject::pod(client)
        .to(dst, Some("api"))
        .num("errno", errno_of(&r))
        .num("port_range_size", 2);
    w.wait(VERDICT_WAIT, |w| w.has(Cause::PortExhaustion, client.netns));
    Ok(outcome(&w, subject, format!("connect {}", describe(&r))))
}

fn port_bind(obs: &mut Observer) -> Result<Outcome> {
    let (lab, _api, _other) = exhausted_lab()?;
    let _held = hold(&lab, 2)?;
    let client = lab.get(CLIENT)?;
    let mut w = obs.watch(&lab);
    // What nc does: bind to port 0 first.
    let r = in_netns(&client.netns_name, "lab-binder", || {
        TcpListener::bind(SocketAddr::from(([0, 0, 0, 0], 0)))
    })?;
    let errno = match &r {
        Ok(_) => 0,
        Err(e) => i64::from(e.raw_os_error().unwrap_or(-1)),
    };
    let subject = Subject::pod(client)
        .num("errno", errno)
        .num("port_range_size", 2);
    w.wait(VERDICT_WAIT, |w| w.has(Cause::PortExhaustion, client.netns));
    Ok(outcome(&w, subject, format!("bind :0 {}", describe(&r))))
}

fn port_time_wait(obs: &mut Observer) -> Result<Outcome> {
    let (lab, api, _other) = exhausted_lab()?;
    let held = hold(&lab, 2)?;
    // The client closes first: both ports sit in TIME_WAIT.
    let servers: Vec<TcpStream> = (0..2).map(|_| accept(&api)).collect::<Result<_>>()?;
    drop(held);
    for s in &servers {
        let mut buf = [0u8; 1];
        let _ = (&*s).read(&mut buf);
    }
    drop(servers);
    thread::sleep(Duration::from_millis(100));
    let client = lab.get(CLIENT)?;
    let dst = SocketAddr::from((cluster_ip(20), 80));
    let mut w = obs.watch(&lab);
    let r = connect_from(&client.netns_name, "lab-exhaust", dst, IO_TIMEOUT)?;
    let subject = Subject::pod(client)
        .to(dst, Some("api"))
        .num("errno", errno_of(&r))
        .num("time_wait", 2)
        .num("port_range_size", 2);
    w.wait(VERDICT_WAIT, |w| w.has(Cause::PortExhaustion, client.netns));
    Ok(outcome(&w, subject, format!("connect {}", describe(&r))))
}

fn port_control(obs: &mut Observer) -> Result<Outcome> {
    let (lab, _api, _other) = exhausted_lab()?;
    let _held = hold(&lab, 2)?;
    let client = lab.get(CLIENT)?;
    let dst = SocketAddr::from((cluster_ip(21), 80));
    let mut w = obs.watch(&lab);
    // Another destination: the same two source ports are free for it.
    let r = connect_from(&client.netns_name, "lab-other", dst, IO_TIMEOUT)?;
    let subject = Subject::pod(client)
        .to(dst, Some("other"))
        .num("errno", errno_of(&r));
    w.settle(QUIET);
    let note = format!("connect to a second destination {}", describe(&r));
    if r.is_err() {
        bail!("{note}: the control itself failed");
    }
    Ok(outcome(&w, subject, note))
}

// ---- connection_refused / syn_timeout ----------------------------------

fn service_lab(
    target_port: u16,
    filter: &[&str],
    setup: &dyn Fn(&Lab) -> Result<()>,
) -> Result<(Lab, TcpListener)> {
    let lab = Lab::new(&LabSpec::pods(&[CLIENT, SERVER]).service(
        "web",
        cluster_ip(30),
        80,
        SERVER,
        target_port,
        None,
    ))?;
    // Fail fast: one SYN retransmit, then ETIMEDOUT.
    sysctl(
        &lab.get(CLIENT)?.netns_name,
        "net.ipv4.tcp_syn_retries",
        "1",
    )?;
    if !filter.is_empty() {
        lab.apply_kube_proxy_rules(filter)?;
    }
    setup(&lab)?;
    let l = listen(&lab, SERVER, 8080)?;
    Ok((lab, l))
}

/// No change beyond the Service.
fn nothing(_: &Lab) -> Result<()> {
    Ok(())
}

fn connect_case(
    obs: &mut Observer,
    target_port: u16,
    filter: &[&str],
    setup: &dyn Fn(&Lab) -> Result<()>,
    expect: Option<Cause>,
) -> Result<Outcome> {
    let dst = SocketAddr::from((cluster_ip(30), 80));
    connect_to_case(obs, dst, Some("web"), target_port, filter, setup, expect)
}

/// A connect from the client pod to `dst` (a Service named `service`)
/// through the node, whose kube-proxy-style rules are `filter`.
fn connect_to_case(
    obs: &mut Observer,
    dst: SocketAddr,
    service: Option<&str>,
    target_port: u16,
    filter: &[&str],
    setup: &dyn Fn(&Lab) -> Result<()>,
    expect: Option<Cause>,
) -> Result<Outcome> {
    let (lab, _l) = service_lab(target_port, filter, setup)?;
    let client = lab.get(CLIENT)?;
    let mut w = obs.watch(&lab);
    // Long enough for the first SYN retransmit (1 s) even on a busy machine.
    let r = connect_from(
        &client.netns_name,
        "lab-connect",
        dst,
        Duration::from_millis(2500),
    )?;
    let subject = Subject::pod(client)
        .to(dst, service)
        .num("errno", errno_of(&r));
    let note = format!("connect {}", describe(&r));
    match expect {
        Some(c) => {
            w.wait(VERDICT_WAIT, |w| w.has(c, client.netns));
        }
        None => {
            if r.is_err() {
                bail!("{note}: the control itself failed");
            }
            w.settle(QUIET);
        }
    }
    Ok(outcome(&w, subject, note))
}

fn refused(obs: &mut Observer) -> Result<Outcome> {
    // The Service points at a port nothing listens on.
    connect_case(obs, 9090, &[], &nothing, Some(Cause::ConnectionRefused))
}

fn refused_control(obs: &mut Observer) -> Result<Outcome> {
    connect_case(obs, 8080, &[], &nothing, None)
}

// ---- service_no_endpoints and firewall_reject ---------------------------

/// kube-proxy's iptables-mode filter rules for `lab/empty:http`, a Service
/// without endpoints at ClusterIP .31 (as pkg/proxy/iptables writes them:
/// KUBE-SERVICES jumped to for new connections, a REJECT per port).
const NO_ENDPOINTS_RULES: [&str; 3] = [
    ":KUBE-SERVICES - [0:0]",
    "-A FORWARD -m conntrack --ctstate NEW -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES",
    "-A KUBE-SERVICES -d 10.96.0.31/32 -p tcp -m comment --comment \"lab/empty:http has no endpoints\" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable",
];

/// The node's device towards a pod's address.
fn node_device_to(lab: &Lab, ip: Ipv4Addr) -> Result<String> {
    let route = lab.node_exec(&["ip", "route", "get", &ip.to_string()])?;
    route
        .split_whitespace()
        .skip_while(|w| *w != "dev")
        .nth(1)
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no device in {route:?}"))
}

/// Routes the ClusterIP range through the node as iptables mode does (a
/// node has a default route; the lab's node has them local, as IPVS mode).
fn route_cluster_ips(lab: &Lab) -> Result<()> {
    let dev = node_device_to(lab, lab.get(CLIENT)?.ip)?;
    // Not local to the node as on an IPVS node: forwarded, as iptables
    // mode's ClusterIPs are.
    lab.node_exec(&[
        "ip",
        "route",
        "del",
        "local",
        "10.96.0.0/16",
        "dev",
        "lo",
        "table",
        "local",
    ])?;
    lab.node_exec(&["ip", "route", "add", "10.96.0.0/16", "dev", &dev])
        .map(|_| ())
}

fn no_endpoints(obs: &mut Observer) -> Result<Outcome> {
    connect_to_case(
        obs,
        SocketAddr::from((cluster_ip(31), 80)),
        None,
        8080,
        &NO_ENDPOINTS_RULES,
        &route_cluster_ips,
        Some(Cause::ServiceNoEndpoints),
    )
}

fn no_endpoints_control(obs: &mut Observer) -> Result<Outcome> {
    // The same rules; the Service connected to has its endpoint.
    connect_case(obs, 8080, &NO_ENDPOINTS_RULES, &route_cluster_ips, None)
}

fn reject_tcp_reset(obs: &mut Observer) -> Result<Outcome> {
    // A policy on the node rejects the backend's port with a reset while
    // the server listens.
    connect_case(
        obs,
        8080,
        &[
            "-A FORWARD -d 10.244.2.2/32 -p tcp -m tcp --dport 8080 -m comment --comment \"lab policy: reject\" -j REJECT --reject-with tcp-reset",
        ],
        &nothing,
        Some(Cause::FirewallReject),
    )
}

fn reject_icmp(obs: &mut Observer) -> Result<Outcome> {
    connect_case(
        obs,
        8080,
        &[
            "-A FORWARD -d 10.244.2.2/32 -p tcp -m tcp --dport 8080 -j REJECT --reject-with icmp-host-prohibited",
        ],
        &nothing,
        Some(Cause::FirewallReject),
    )
}

fn reject_control(obs: &mut Observer) -> Result<Outcome> {
    // The rule names another source: the client gets through.
    connect_case(
        obs,
        8080,
        &[
            "-A FORWARD -s 10.244.9.9/32 -d 10.244.2.2/32 -p tcp -m tcp --dport 8080 -j REJECT --reject-with tcp-reset",
        ],
        &nothing,
        None,
    )
}

// ---- snat_port_exhaustion ---------------------------------------------

/// Connections the client holds to the Service before the one that needs
/// a third source port.
const SNAT_HELD: usize = 2;

/// The node masquerades connections to the backend to `ports` source
/// ports; the client holds two connections and opens a third.
fn snat_case(obs: &mut Observer, ports: &'static str, expect: Option<Cause>) -> Result<Outcome> {
    let (lab, l) = service_lab(8080, &[], &move |lab| {
        lab.node_exec(&[
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-d",
            "10.244.2.2/32",
            "-p",
            "tcp",
            "-j",
            "MASQUERADE",
            "--to-ports",
            ports,
        ])
        .map(|_| ())
    })?;
    let client = lab.get(CLIENT)?;
    let dst = SocketAddr::from((cluster_ip(30), 80));
    let mut held = Vec::new();
    for _ in 0..SNAT_HELD {
        let c = connect_from(&client.netns_name, "lab-snat", dst, IO_TIMEOUT)?
            .context("holding a connection through the NAT")?;
        held.push((c, accept(&l)?));
    }
    let mut w = obs.watch(&lab);
    let r = connect_from(
        &client.netns_name,
        "lab-snat",
        dst,
        Duration::from_millis(2500),
    )?;
    let subject = Subject::pod(client)
        .to(dst, Some("web"))
        .num("errno", errno_of(&r));
    let note = format!("third connect {}", describe(&r));
    match expect {
        Some(c) => {
            w.wait(VERDICT_WAIT, |w| w.has(c, client.netns));
        }
        None => {
            if r.is_err() {
                bail!("{note}: the control itself failed");
            }
            w.settle(QUIET);
        }
    }
    for (c, s) in held {
        abort(c);
        abort(s);
    }
    Ok(outcome(&w, subject, note))
}

fn snat_two_ports(obs: &mut Observer) -> Result<Outcome> {
    snat_case(obs, "1000-1001", Some(Cause::SnatPortExhaustion))
}

fn snat_control(obs: &mut Observer) -> Result<Outcome> {
    snat_case(obs, "1000-1009", None)
}

// ---- pmtu_black_hole --------------------------------------------------

/// The MTU of the node's link to the server, below the pods' 1500.
const SMALL_MTU: &str = "1200";
/// What the client sends: many full-size segments.
const BULK: usize = 64 * 1024;

/// The node's link to the server has a smaller MTU; with `icmp_dropped`
/// the node's "fragmentation needed" never leaves it.
fn pmtu_case(obs: &mut Observer, icmp_dropped: bool) -> Result<Outcome> {
    let (lab, l) = service_lab(8080, &[], &nothing)?;
    let dev = node_device_to(&lab, lab.get(SERVER)?.ip)?;
    lab.node_exec(&["ip", "link", "set", "dev", &dev, "mtu", SMALL_MTU])?;
    if icmp_dropped {
        lab.node_exec(&[
            "iptables",
            "-A",
            "OUTPUT",
            "-p",
            "icmp",
            "--icmp-type",
            "fragmentation-needed",
            "-j",
            "DROP",
        ])?;
    }
    let client = lab.get(CLIENT)?;
    let dst = SocketAddr::from((cluster_ip(30), 80));
    let c = connect_from(&client.netns_name, "lab-pmtu", dst, IO_TIMEOUT)?
        .context("connecting through the small link")?;
    let s = accept(&l)?;
    let mut w = obs.watch(&lab);
    c.set_write_timeout(Some(IO_TIMEOUT))?;
    let sent = (&c).write_all(&[b'x'; BULK]);
    let mut got = vec![0u8; BULK];
    s.set_read_timeout(Some(Duration::from_millis(if icmp_dropped {
        300
    } else {
        3000
    })))?;
    let read = (&s).read_exact(&mut got);
    let subject = Subject::pod(client).to(dst, Some("web"));
    let note = format!(
        "write {}; the server's read {}",
        describe(&sent),
        describe(&read)
    );
    if icmp_dropped {
        w.wait(VERDICT_WAIT, |w| w.has(Cause::PmtuBlackHole, client.netns));
    } else {
        if read.is_err() {
            bail!("{note}: the control itself failed");
        }
        w.settle(QUIET);
    }
    abort(c);
    abort(s);
    Ok(outcome(&w, subject, note))
}

fn pmtu_icmp_dropped(obs: &mut Observer) -> Result<Outcome> {
    pmtu_case(obs, true)
}

fn pmtu_control(obs: &mut Observer) -> Result<Outcome> {
    pmtu_case(obs, false)
}

fn syn_timeout(obs: &mut Observer) -> Result<Outcome> {
    // The backend's host is gone: the node routes its network nowhere,
    // silently, and no rule drops anything.
    connect_case(
        obs,
        8080,
        &[],
        &|lab| {
            lab.node_exec(&["ip", "route", "replace", "blackhole", "10.244.2.0/24"])
                .map(|_| ())
        },
        Some(Cause::SynTimeout),
    )
}

fn syn_control(obs: &mut Observer) -> Result<Outcome> {
    connect_case(obs, 8080, &[], &nothing, None)
}

// ---- netfilter_drop ------------------------------------------------------

fn node_policy_drop(obs: &mut Observer) -> Result<Outcome> {
    // A policy on the node drops the traffic to the backend.
    connect_case(
        obs,
        8080,
        &["-A FORWARD -d 10.244.2.2/32 -p tcp -m tcp --dport 8080 -j DROP"],
        &nothing,
        Some(Cause::NetfilterDrop),
    )
}

/// A NetworkPolicy-style rule in the server pod's own namespace, after the
/// Service's DNAT: it drops SYNs from `source` to the backend port.
fn pod_policy(source: &'static str) -> impl Fn(&Lab) -> Result<()> {
    move |lab| {
        let server = lab.get(SERVER)?;
        crate::run(
            "ip",
            &[
                "netns",
                "exec",
                &server.netns_name,
                "iptables",
                "-A",
                "INPUT",
                "-s",
                source,
                "-p",
                "tcp",
                "--dport",
                "8080",
                "-m",
                "comment",
                "--comment",
                "lab policy: deny client",
                "-j",
                "DROP",
            ],
        )
        .map(|_| ())
    }
}

fn pod_policy_drop(obs: &mut Observer) -> Result<Outcome> {
    connect_case(
        obs,
        8080,
        &[],
        &pod_policy("10.244.1.2/32"),
        Some(Cause::NetfilterDrop),
    )
}

fn pod_policy_control(obs: &mut Observer) -> Result<Outcome> {
    // The rule names another source: the client gets through.
    connect_case(obs, 8080, &[], &pod_policy("10.244.9.9/32"), None)
}

// ---- idle_timeout ------------------------------------------------------

/// The node's conntrack forgets established connections after this long.
pub const CT_TIMEOUT_S: u64 = 2;
/// How long the connections stay quiet.
const IDLE: Duration = Duration::from_millis(3200);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Idle {
    BlackHole,
    Reset,
    Keepalive,
}

fn idle_case(obs: &mut Observer, shape: Idle) -> Result<Outcome> {
    let lab = Lab::new(&LabSpec::pods(&[CLIENT, SERVER]).service(
        "web",
        cluster_ip(10),
        80,
        SERVER,
        8080,
        None,
    ))?;
    let node = lab.node_netns_name.clone();
    sysctl(
        &node,
        "net.netfilter.nf_conntrack_tcp_timeout_established",
        &CT_TIMEOUT_S.to_string(),
    )?;
    sysctl(&node, "net.netfilter.nf_conntrack_tcp_loose", "0")?;
    if shape == Idle::BlackHole {
        lab.apply_kube_proxy_rules(&[
            "-A INPUT -m conntrack --ctstate INVALID -j DROP",
            "-A FORWARD -m conntrack --ctstate INVALID -j DROP",
        ])?;
    }
    let l = listen(&lab, SERVER, 8080)?;
    let client = lab.get(CLIENT)?;
    let dst = SocketAddr::from((cluster_ip(10), 80));
    let keepalive = shape == Idle::Keepalive;
    let c = in_netns(
        &client.netns_name,
        "lab-idle",
        move || -> std::io::Result<TcpStream> {
            let s = TcpStream::connect_timeout(&dst, IO_TIMEOUT)?;
            if keepalive {
                let fd = s.as_fd();
                setsockopt(&fd, sockopt::KeepAlive, &true)?;
                setsockopt(&fd, sockopt::TcpKeepIdle, &1)?;
                setsockopt(&fd, sockopt::TcpKeepInterval, &1)?;
            }
            Ok(s)
        },
    )?
    .context("connecting to the web Service")?;
    let s = accept(&l)?;
    let mut w = obs.watch(&lab);
    exchange(&c, &s)?;
    w.settle(IDLE);
    let sent = (&c).write_all(b"again");
    let subject = Subject::pod(client)
        .to(dst, Some("web"))
        .num("timeout_s", CT_TIMEOUT_S as i64)
        .num("idle_min_ms", IDLE.as_millis() as i64);
    let note = match shape {
        Idle::Keepalive => {
            let mut buf = [0u8; 5];
            let got = (&s).read_exact(&mut buf);
            w.settle(QUIET);
            if got.is_err() {
                bail!(
                    "the keepalive connection did not survive: {}",
                    describe(&got)
                );
            }
            "the keepalive connection survived".to_string()
        }
        _ => {
            w.wait(VERDICT_WAIT, |w| w.has(Cause::IdleTimeout, client.netns));
            let mut buf = [0u8; 4];
            c.set_read_timeout(Some(Duration::from_millis(100)))?;
            let read = (&c).read(&mut buf);
            format!("write {}; then read {}", describe(&sent), describe(&read))
        }
    };
    abort(c);
    Ok(outcome(&w, subject, note))
}

fn idle_black_hole(obs: &mut Observer) -> Result<Outcome> {
    idle_case(obs, Idle::BlackHole)
}

fn idle_reset(obs: &mut Observer) -> Result<Outcome> {
    idle_case(obs, Idle::Reset)
}

fn idle_control(obs: &mut Observer) -> Result<Outcome> {
    idle_case(obs, Idle::Keepalive)
}

// ---- nodeport_collision ------------------------------------------------

/// The NodePorts of the lab; the node's ephemeral range starts on them.
pub const NODEPORTS: [u16; 2] = [30080, 30081];

#[derive(Clone, Copy, PartialEq, Eq)]
enum NodePort {
    /// IPVS-like: any SYN-bearing packet to a NodePort goes to the backend.
    Ipvs,
    /// iptables kube-proxy only: replies match their own conntrack entry.
    Iptables,
    /// IPVS-like, but the NodePorts are reserved.
    Reserved,
}

/// IPVS schedules every SYN-bearing packet to a NodePort of a local address
/// to a backend; emulated statelessly before conntrack (no IPVS here).
fn ipvs_ruleset(backend: Ipv4Addr, target_port: u16) -> String {
    let ports = NODEPORTS.map(|p| p.to_string()).join(", ");
    format!(
        "table ip tcptrace_lab_ipvs {{\n  chain prerouting {{\n    type filter hook prerouting priority raw; policy accept;\n    fib daddr type local tcp dport {{ {ports} }} tcp flags & syn == syn notrack ip daddr set {backend} tcp dport set {target_port}\n  }}\n}}\n"
    )
}

fn nodeport_case(obs: &mut Observer, mode: NodePort) -> Result<Outcome> {
    // "web" backs the NodePort Services; "app" is what the node's own
    // client (a kubelet probe) talks to.
    let lab = Lab::new(
        &LabSpec::pods(&["web", "app"])
            .service("web", cluster_ip(50), 80, "web", 8080, Some(NODEPORTS[0]))
            .service(
                "web-alt",
                cluster_ip(51),
                80,
                "web",
                8080,
                Some(NODEPORTS[1]),
            ),
    )?;
    let node = lab.node_netns_name.clone();
    let (lo, hi) = (NODEPORTS[0], NODEPORTS[1]);
    match mode {
        NodePort::Reserved => {
            sysctl(
                &node,
                "net.ipv4.ip_local_port_range",
                &format!("{lo} {}", hi + 2),
            )?;
            sysctl(
                &node,
                "net.ipv4.ip_local_reserved_ports",
                &format!("{lo}-{hi}"),
            )?;
        }
        _ => sysctl(&node, "net.ipv4.ip_local_port_range", &format!("{lo} {hi}"))?,
    }
    if mode != NodePort::Iptables {
        if which("nft").is_err() {
            return Err(Skip("nft not found on PATH: needed to emulate IPVS".into()).into());
        }
        lab.node_nft(&ipvs_ruleset(lab.get("web")?.ip, 8080))?;
    }
    let _web = listen(&lab, "web", 8080)?;
    let _app = listen(&lab, "app", 8080)?;
    let app = lab.get("app")?;
    let dst = SocketAddr::from((app.ip, 8080));
    let mut w = obs.watch(&lab);
    let r = connect_from(&node, "lab-probe", dst, Duration::from_millis(1500))?;
    let port = r
        .as_ref()
        .ok()
        .and_then(|s| s.local_addr().ok())
        .map_or(0, |a| i64::from(a.port()));
    let subject = Subject::node(&lab)
        .to(dst, None)
        .num("nodeport_lo", i64::from(lo))
        .num("nodeport_hi", i64::from(hi))
        .num("src_port", port);
    let note = format!("probe from the node {}", describe(&r));
    if mode == NodePort::Ipvs {
        w.wait(VERDICT_WAIT, |w| {
            w.has(Cause::NodeportCollision, lab.node_netns)
        });
    } else {
        if r.is_err() {
            bail!("{note}: the control itself failed");
        }
        w.settle(QUIET);
    }
    Ok(outcome(&w, subject, note))
}

fn nodeport_ipvs(obs: &mut Observer) -> Result<Outcome> {
    nodeport_case(obs, NodePort::Ipvs)
}

fn nodeport_iptables(obs: &mut Observer) -> Result<Outcome> {
    nodeport_case(obs, NodePort::Iptables)
}

fn nodeport_reserved(obs: &mut Observer) -> Result<Outcome> {
    nodeport_case(obs, NodePort::Reserved)
}

// ---- conntrack_invalid -------------------------------------------------

/// The server of kubernetes #74839: answers one request, then reads its
/// own sequence numbers (TCP_REPAIR) and sends one data segment on the
/// connection from outside the socket, `beyond` or `below` the client's
/// window (or, with `none`, sends nothing), and reports what happened to
/// its socket.
const INVALID_SERVER: &str = r#"
import socket, struct, sys, time
mode = sys.argv[1]
l = socket.socket()
l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
l.bind(("0.0.0.0", 8080))
l.listen(8)
print("ready", flush=True)
l.settimeout(10)
c, peer = l.accept()
c.settimeout(10)
c.recv(4)
c.sendall(b"pong")
time.sleep(0.3)
T = socket.IPPROTO_TCP
c.setsockopt(T, 19, 1)   # TCP_REPAIR on
c.setsockopt(T, 20, 2)   # TCP_REPAIR_QUEUE = TCP_SEND_QUEUE
snd = struct.unpack("I", c.getsockopt(T, 21, 4))[0]
c.setsockopt(T, 20, 1)   # TCP_RECV_QUEUE
rcv = struct.unpack("I", c.getsockopt(T, 21, 4))[0]
c.setsockopt(T, 19, -1)  # TCP_REPAIR_OFF_NO_WP
src = c.getsockname()
if mode == "beyond":
    seq = (snd + (1 << 30)) % (1 << 32)
else:
    seq = (snd - (1 << 20)) % (1 << 32)
payload = b"x" * 16
def csum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    while s >> 16:
        s = (s & 0xffff) + (s >> 16)
    return (~s) & 0xffff
hdr = struct.pack("!HHIIBBHHH", src[1], peer[1], seq, rcv, 5 << 4, 0x18, 65535, 0, 0)
pseudo = socket.inet_aton(src[0]) + socket.inet_aton(peer[0]) + struct.pack("!BBH", 0, 6, len(hdr) + len(payload))
hdr = hdr[:16] + struct.pack("!H", csum(pseudo + hdr + payload)) + hdr[18:]
if mode != "none":
    r = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    r.sendto(hdr + payload, (peer[0], 0))
print("sent", flush=True)
c.settimeout(1.5)
try:
    d = c.recv(100)
    print("closed" if d == b"" else "data", flush=True)
except socket.timeout:
    print("alive", flush=True)
except ConnectionResetError:
    print("reset", flush=True)
time.sleep(8)
"#;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Invalid {
    Beyond,
    BeLiberal,
    /// Conntrack lets it through; the client's TCP stack drops it.
    Below,
    /// No segment: the connection stays healthy.
    Nothing,
}

/// The crafted segment's case; `expect` is the verdict it must give (else
/// the connection must survive and nothing be said about `Subject`'s side).
fn invalid_case(obs: &mut Observer, mode: Invalid, expect: Option<Cause>) -> Result<Outcome> {
    let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.is_file())
        .or_else(|| which("python3").ok())
        .ok_or_else(|| Skip("python3 not found: it crafts the out-of-window segment".into()))?;
    let lab = Lab::new(&LabSpec::pods(&[CLIENT, SERVER]).service(
        "web",
        cluster_ip(10),
        80,
        SERVER,
        8080,
        None,
    ))?;
    if mode == Invalid::BeLiberal {
        sysctl(
            &lab.node_netns_name,
            "net.netfilter.nf_conntrack_tcp_be_liberal",
            "1",
        )?;
    }
    let server = lab.get(SERVER)?;
    let arg = match mode {
        Invalid::Below => "below",
        Invalid::Nothing => "none",
        Invalid::Beyond | Invalid::BeLiberal => "beyond",
    };
    let python = python.to_string_lossy().into_owned();
    let mut child = lab.spawn_in_pod(server, &python, &["-c", INVALID_SERVER, arg])?;
    let stdout = child
        .child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout from the python server"))?;
    let (tx, lines) = mpsc::channel();
    thread::Builder::new()
        .name("lab-py-out".into())
        .spawn(move || {
            for line in BufReader::new(stdout).lines().take(16) {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        })?;
    let expect_line = |want: &[&str]| -> Result<String> {
        let line = lines
            .recv_timeout(Duration::from_secs(5))
            .map_err(|_| anyhow!("the python server did not say {want:?}"))?;
        if !want.contains(&line.as_str()) {
            bail!("the python server said {line:?}, expected {want:?}");
        }
        Ok(line)
    };
    expect_line(&["ready"])?;
    let client = lab.get(CLIENT)?;
    let dst = SocketAddr::from((cluster_ip(10), 80));
    let mut w = obs.watch(&lab);
    let c = connect_from(&client.netns_name, "lab-client", dst, IO_TIMEOUT)?
        .context("connecting to the web Service")?;
    c.set_read_timeout(Some(IO_TIMEOUT))?;
    (&c).write_all(b"ping")?;
    let mut buf = [0u8; 4];
    (&c).read_exact(&mut buf)?;
    expect_line(&["sent"])?;
    let fate = expect_line(&["reset", "alive", "closed", "data"])?;
    // Conntrack's verdict is about the server (its connection is reset);
    // the TCP stack's about the client, whose stack drops the segment.
    let subject = match expect {
        Some(Cause::ConntrackInvalid) => Subject::pod(server),
        _ => Subject::pod(client).to(dst, Some("web")),
    };
    match expect {
        Some(cause) => {
            w.wait(VERDICT_WAIT, |w| w.has(cause, subject.netns));
        }
        None => w.settle(QUIET),
    }
    if mode != Invalid::Beyond && fate != "alive" {
        bail!("the server's connection did not survive: {fate}");
    }
    let note = format!("the server's connection: {fate}");
    abort(c);
    let out = outcome(&w, subject, note);
    child.kill();
    Ok(out)
}

fn invalid_beyond(obs: &mut Observer) -> Result<Outcome> {
    invalid_case(obs, Invalid::Beyond, Some(Cause::ConntrackInvalid))
}

fn invalid_liberal(obs: &mut Observer) -> Result<Outcome> {
    invalid_case(obs, Invalid::BeLiberal, None)
}

fn invalid_below(obs: &mut Observer) -> Result<Outcome> {
    invalid_case(obs, Invalid::Below, None)
}

// ---- tcp_stack_drop ------------------------------------------------------

/// The segment below the window (#74839 on kernels whose conntrack accepts
/// it): the client's TCP stack drops it, in the client pod's namespace.
fn stack_drop_below(obs: &mut Observer) -> Result<Outcome> {
    invalid_case(obs, Invalid::Below, Some(Cause::TcpStackDrop))
}

fn stack_drop_control(obs: &mut Observer) -> Result<Outcome> {
    invalid_case(obs, Invalid::Nothing, None)
}

// ---- listen_overflow -----------------------------------------------------

/// How long redis stalls (DEBUG SLEEP, a slow command): clients connecting
/// meanwhile wait in its accept queue, or are dropped when it is full.
const REDIS_STALL_S: u32 = 3;
/// Clients connecting during the stall.
const BURST_CLIENTS: usize = 12;

/// `BURST_CLIENTS` redis-cli PINGs at once; prints one PONG per answer.
const BURST: &str = r#"for i in $(seq "$3"); do redis-cli -h "$1" -p "$2" PING & done; wait"#;

/// redis behind a Service, with listen backlog `backlog`, stalls while a
/// burst of clients connects from another pod.
fn listen_case(obs: &mut Observer, backlog: u32, expect: Option<Cause>) -> Result<Outcome> {
    let lab = Lab::new(&LabSpec::pods(&[CLIENT, SERVER]).service(
        "cache",
        cluster_ip(70),
        6379,
        SERVER,
        6379,
        None,
    ))?;
    let server = lab.get(SERVER)?.clone();
    let backlog_arg = backlog.to_string();
    let redis = lab.redis(
        &server,
        6379,
        &[
            "--tcp-backlog",
            &backlog_arg,
            "--enable-debug-command",
            "yes",
        ],
    )?;
    let client = lab.get(CLIENT)?;
    let dst = SocketAddr::from((cluster_ip(70), 6379));
    let mut w = obs.watch(&lab);
    let server_ip = server.ip.to_string();
    let stall_s = REDIS_STALL_S.to_string();
    let stall = lab.spawn_in_pod(
        &server,
        "redis-cli",
        &["-h", &server_ip, "-p", "6379", "DEBUG", "SLEEP", &stall_s],
    )?;
    // redis takes the command within milliseconds, then sleeps.
    thread::sleep(Duration::from_millis(500));
    let started = Instant::now();
    let burst = lab.spawn_in_pod(
        client,
        "sh",
        &[
            "-c",
            BURST,
            "burst",
            &dst.ip().to_string(),
            &dst.port().to_string(),
            &BURST_CLIENTS.to_string(),
        ],
    )?;
    // The pipeline keeps reading the facts while the clients wait, as the
    // tracer's background reader does: the full queue is seen while full.
    let limit = Duration::from_secs(u64::from(REDIS_STALL_S) + 12);
    let clients = thread::Builder::new()
        .name("lab-burst".into())
        .spawn(move || burst.wait_output(limit))?;
    w.wait(limit, |_| clients.is_finished());
    let out = clients
        .join()
        .map_err(|_| anyhow!("the burst thread panicked"))??;
    let pongs = String::from_utf8_lossy(&out.stdout).matches("PONG").count();
    let took = started.elapsed();
    stall.kill();
    let note = format!(
        "{pongs} of {BURST_CLIENTS} PINGs answered in {:.1} s (redis stalled {REDIS_STALL_S} s, backlog {backlog})",
        took.as_secs_f64()
    );
    if pongs != BURST_CLIENTS {
        bail!("{note}: every client must get its answer once redis is back");
    }
    let subject = Subject::pod(&server)
        .num("redis_pid", i64::from(redis.pid))
        .num("backlog", i64::from(backlog));
    match expect {
        Some(cause) => {
            w.wait(VERDICT_WAIT, |w| w.has(cause, server.netns));
        }
        None => w.settle(QUIET),
    }
    Ok(outcome(&w, subject, note))
}

fn listen_small_backlog(obs: &mut Observer) -> Result<Outcome> {
    listen_case(obs, 1, Some(Cause::ListenOverflow))
}

fn listen_large_backlog(obs: &mut Observer) -> Result<Outcome> {
    listen_case(obs, 511, None)
}

// ---- conntrack_table_full ----------------------------------------------

/// How long the table-full client waits for its connection (one SYN
/// retransmit, then it gives up).
const FULL_CONNECT: Duration = Duration::from_millis(1500);

/// Fills the lab node's conntrack table to nf_conntrack_max with entries
/// early_drop cannot evict, then connects from a pod to a Service through
/// the node. With `flush`, the table is flushed first (the control).
fn table_full_case(obs: &mut Observer, flush: bool) -> Result<Outcome> {
    let lab = Lab::new(&LabSpec::pods(&[CLIENT, SERVER]).service(
        "web",
        cluster_ip(60),
        80,
        SERVER,
        8080,
        None,
    ))?;
    let client = lab.get(CLIENT)?;
    sysctl(&client.netns_name, "net.ipv4.tcp_syn_retries", "1")?;
    let _l = listen(&lab, SERVER, 8080)?;
    let fill =
        conntrack::fill_node(&lab).map_err(|e| match e.downcast::<conntrack::Unsupported>() {
            Ok(u) => Skip(format!("cannot fill the node's conntrack table: {u}")).into(),
            Err(e) => e.context("filling the lab node's conntrack table"),
        })?;
    if fill.count < fill.max {
        bail!(
            "the node's conntrack table holds {} of {} entries after the fill",
            fill.count,
            fill.max
        );
    }
    let mut note = format!(
        "filled {} entries in {:.1} s ({}/{})",
        fill.inserted,
        fill.elapsed.as_secs_f64(),
        fill.count,
        fill.max
    );
    if flush {
        let t = Instant::now();
        let left = conntrack::flush_node(&lab)?;
        note.push_str(&format!(
            "; flushed in {:.1} s, {left} left",
            t.elapsed().as_secs_f64()
        ));
    }
    let stat_before = conntrack::node_drops(&lab)?;
    let dst = SocketAddr::from((cluster_ip(60), 80));
    let mut w = obs.watch(&lab);
    // Connect on another thread while the pipeline is pumped, so the facts
    // tick between the SYN and its retransmit sees the drop counter rise.
    let netns = client.netns_name.clone();
    let connecting = thread::Builder::new()
        .name("lab-ct-client".into())
        .spawn(move || connect_from(&netns, "lab-ct-connect", dst, FULL_CONNECT))?;
    let wait = FULL_CONNECT + VERDICT_WAIT;
    if flush {
        w.wait(wait, |_| connecting.is_finished());
    } else {
        w.wait(wait, |w| {
            connecting.is_finished() && w.has(Cause::ConntrackTableFull, client.netns)
        });
    }
    let r = connecting
        .join()
        .map_err(|_| anyhow!("the connecting thread panicked"))??;
    let drops = conntrack::node_drops(&lab)?.saturating_sub(stat_before);
    let (count, max) = conntrack::count_and_max(&lab.node_netns_name)?;
    note = format!("connect {}; {note}; node drop +{drops}", describe(&r));
    let subject = Subject::pod(client)
        .to(dst, Some("web"))
        .num("errno", errno_of(&r))
        .num("count", count as i64)
        .num("max", max as i64)
        .num("drop_delta", drops as i64);
    if flush {
        if r.is_err() {
            bail!("{note}: the control itself failed");
        }
        w.settle(QUIET);
    }
    if let Ok(s) = r {
        abort(s);
    }
    Ok(outcome(&w, subject, note))
}

fn table_full(obs: &mut Observer) -> Result<Outcome> {
    table_full_case(obs, false)
}

fn table_full_control(obs: &mut Observer) -> Result<Outcome> {
    table_full_case(obs, true)
}

// ---- keepalive_race / application_abort -------------------------------

/// nginx closes idle keep-alive connections after this many seconds.
pub const NGINX_KEEPALIVE_S: u32 = 2;

/// A lab whose `web` Service is nginx in the server pod.
fn http_lab() -> Result<(Lab, crate::SpawnedChild)> {
    let lab = Lab::new(&LabSpec::pods(&[CLIENT, SERVER]).service(
        "web",
        cluster_ip(40),
        80,
        SERVER,
        8080,
        None,
    ))?;
    let server = lab.get(SERVER)?.clone();
    let nginx = lab.nginx(&server, 8080, NGINX_KEEPALIVE_S)?;
    Ok((lab, nginx))
}

/// A pooled HTTP client, as applications use one (Python's http.client,
/// one kept-alive connection): a request, a quiet period, and a second
/// request on the same connection. Prints "reused" or what failed.
const POOLED_CLIENT: &str = r#"
import http.client, sys, time
c = http.client.HTTPConnection(sys.argv[1], int(sys.argv[2]), timeout=3)
c.request("GET", "/"); c.getresponse().read()
time.sleep(float(sys.argv[3]))
try:
    c.request("GET", "/"); c.getresponse().read(); print("reused")
except Exception as e:
    print("failed", type(e).__name__, e)
"#;

fn keepalive_case(obs: &mut Observer, idle: Duration, expect: Option<Cause>) -> Result<Outcome> {
    let (lab, _nginx) = http_lab()?;
    let client = lab.get(CLIENT)?;
    let dst = SocketAddr::from((cluster_ip(40), 80));
    let mut w = obs.watch(&lab);
    let out = lab.run_in_pod(
        client,
        "python3",
        &[
            "-c",
            POOLED_CLIENT,
            &dst.ip().to_string(),
            &dst.port().to_string(),
            &format!("{:.1}", idle.as_secs_f64()),
        ],
        idle + Duration::from_secs(10),
    )?;
    let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let subject = Subject::pod(client)
        .to(dst, Some("web"))
        .num("peer_idle_timeout_s", i64::from(NGINX_KEEPALIVE_S));
    let note = format!("second request after {idle:?} idle: {said}");
    match expect {
        Some(c) => {
            w.wait(VERDICT_WAIT, |w| w.has(c, client.netns));
        }
        None => {
            if said != "reused" {
                bail!("{note}: the control itself failed");
            }
            w.settle(QUIET);
        }
    }
    Ok(outcome(&w, subject, note))
}

fn keepalive_race(obs: &mut Observer) -> Result<Outcome> {
    // Idle past nginx's timeout: nginx has closed, the client writes.
    keepalive_case(
        obs,
        Duration::from_millis(u64::from(NGINX_KEEPALIVE_S) * 1000 + 1000),
        Some(Cause::KeepaliveRace),
    )
}

fn keepalive_fresh(obs: &mut Observer) -> Result<Outcome> {
    keepalive_case(obs, Duration::from_millis(500), None)
}

/// A client fetches nginx's large file and closes: after reading a
/// little (unread data left: the kernel resets) or all of it.
fn abort_case(obs: &mut Observer, read_all: bool) -> Result<Outcome> {
    let (lab, _nginx) = http_lab()?;
    let client = lab.get(CLIENT)?;
    let dst = SocketAddr::from((cluster_ip(40), 80));
    let mut w = obs.watch(&lab);
    let read = in_netns(
        &client.netns_name,
        "lab-download",
        move || -> Result<usize> {
            let mut s = TcpStream::connect_timeout(&dst, IO_TIMEOUT)?;
            s.set_read_timeout(Some(IO_TIMEOUT))?;
            s.write_all(b"GET /big HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")?;
            let mut buf = vec![0u8; 64 * 1024];
            let mut total = 0;
            loop {
                let n = s.read(&mut buf)?;
                total += n;
                if n == 0 || (!read_all && total >= 1024) {
                    return Ok(total);
                }
            }
        },
    )??;
    let subject = Subject::pod(client).to(dst, Some("web"));
    let note = format!(
        "read {read} of about {} bytes, then closed",
        crate::BIG_BYTES
    );
    if read_all {
        if read < crate::BIG_BYTES {
            bail!("{note}: the control did not get the whole file");
        }
        w.settle(QUIET);
    } else {
        w.wait(VERDICT_WAIT, |w| {
            w.has(Cause::ApplicationAbort, client.netns)
        });
    }
    Ok(outcome(&w, subject, note))
}

fn abort_unread(obs: &mut Observer) -> Result<Outcome> {
    abort_case(obs, false)
}

fn abort_control(obs: &mut Observer) -> Result<Outcome> {
    abort_case(obs, true)
}
