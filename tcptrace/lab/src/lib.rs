//! A throwaway mini-cluster in network namespaces, to reproduce the failures
//! tcptrace explains on the real kernel (`tcptrace selftest`, root tests).
//!
//! One [`Lab`] is a node namespace that routes between pod namespaces over
//! veth pairs (pod `i` is `10.244.i.2/24` behind `10.244.i.1` on the node),
//! with kube-proxy-style iptables NAT rules for its Services (ClusterIPs in
//! `10.96.0.0/16`, local to the node namespace as on an IPVS node) and a
//! kubelet-style host root: `var/log/pods/<ns>_<name>_<uid>/<container>/0.log`,
//! symlinks `proc`, `sys` and `run` to the host's, and one "pause" process
//! per pod in a kubelet-named cgroup v2 directory (when cgroup v2 is
//! writable). [`conntrack`] fills the node namespace's conntrack table to
//! the host's nf_conntrack_max over ctnetlink, and flushes it.
//!
//! Every resource is named `tcptrace-lab-<pid>-...`, registered before use,
//! and removed when the lab is dropped, when [`install_signal_cleanup`]'s
//! thread sees SIGINT/SIGTERM, or by [`sweep_stale`] after a crash. Nothing
//! outside the lab's namespaces is configured: sysctls, routes and rules are
//! only ever written inside them.
pub mod conntrack;
pub mod netns;
pub mod observer;
pub mod scenarios;
pub mod selftest;
mod servers;

pub use servers::BIG_BYTES;

use std::{
    collections::BTreeMap,
    fs::{self, File},
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    os::unix::fs::{MetadataExt as _, symlink},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

use tcptrace::{model::PodRef, node::FactsConfig};

use crate::netns::{delete_netns, netns_inode, netns_path, sysctl};

/// Every lab resource name starts with this, then `<pid>-`.
pub const PREFIX: &str = "tcptrace-lab-";

/// The Kubernetes namespace of the lab's pods.
pub const POD_NAMESPACE: &str = "lab";

/// Upper bound on waiting for a spawned process to enter its namespace.
const SPAWN_WAIT: Duration = Duration::from_secs(3);

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);
static SHUTTING_DOWN: AtomicBool = AtomicBool::new(false);
static REGISTRY: Mutex<Registry> = Mutex::new(Registry::new());

/// What exists and must be removed, in reverse order of creation.
#[derive(Debug)]
enum Resource {
    Netns(String),
    Process(u32),
    /// A cgroup directory (removed after its processes are gone).
    Cgroup(PathBuf),
    Dir(PathBuf),
}

struct Registry {
    items: Vec<(u32, Resource)>,
}

impl Registry {
    const fn new() -> Self {
        Self { items: Vec::new() }
    }
}

fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Creates a resource while holding the registry, so a concurrent signal
/// cleanup either sees it or prevents it.
fn create<T>(lab: u32, make: impl FnOnce() -> Result<(T, Resource)>) -> Result<T> {
    let mut reg = registry();
    if SHUTTING_DOWN.load(Ordering::SeqCst) {
        bail!("the lab is shutting down");
    }
    let (value, res) = make()?;
    reg.items.push((lab, res));
    Ok(value)
}

fn remove(res: &Resource) {
    match res {
        Resource::Process(pid) => {
            let _ = kill(Pid::from_raw(*pid as i32), Signal::SIGKILL);
            // Reap it if it is our child; a zombie keeps a cgroup busy.
            let _ = nix::sys::wait::waitpid(Pid::from_raw(*pid as i32), None);
        }
        Resource::Netns(name) => delete_netns(name),
        Resource::Cgroup(dir) => remove_cgroup_tree(dir),
        Resource::Dir(dir) => {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Removes every resource of lab `lab` (all labs with `None`), newest first.
fn cleanup_ordered(lab: Option<u32>) {
    let taken: Vec<Resource> = {
        let mut reg = registry();
        let (take, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut reg.items)
            .into_iter()
            .partition(|(id, _)| lab.is_none_or(|l| l == *id));
        reg.items = keep;
        take.into_iter().map(|(_, r)| r).collect()
    };
    // Processes first (they keep cgroups busy), then the rest newest first.
    for r in taken.iter().rev() {
        if matches!(r, Resource::Process(_)) {
            remove(r);
        }
    }
    for r in taken.iter().rev() {
        if !matches!(r, Resource::Process(_)) {
            remove(r);
        }
    }
}

/// Blocks SIGINT and SIGTERM in the calling thread (and the threads it
/// starts later) and starts a thread that, on either signal, removes every
/// lab resource of this process and exits with status 1. Call it before
/// starting other threads.
pub fn install_signal_cleanup() -> Result<()> {
    use nix::sys::signal::{SigSet, Signal::*};
    let mut set = SigSet::empty();
    set.add(SIGINT);
    set.add(SIGTERM);
    set.thread_block().context("blocking SIGINT and SIGTERM")?;
    thread::Builder::new()
        .name("tcptrace-lab-sig".into())
        .spawn(move || {
            let sig = set.wait();
            {
                let _reg = registry();
                SHUTTING_DOWN.store(true, Ordering::SeqCst);
            }
            cleanup_ordered(None);
            let name = sig.map(Signal::as_str).unwrap_or("a signal");
            eprintln!("tcptrace: selftest interrupted by {name}: lab removed");
            std::process::exit(1);
        })
        .context("starting the signal thread")?;
    Ok(())
}

/// A pod of the lab.
#[derive(Clone, Debug)]
pub struct Pod {
    pub name: String,
    /// Index `i`: the pod is 10.244.i.2, its gateway 10.244.i.1.
    pub index: u8,
    pub uid: String,
    pub container: String,
    pub container_id: String,
    pub ip: Ipv4Addr,
    pub gateway: Ipv4Addr,
    /// `ip netns` name.
    pub netns_name: String,
    pub netns: u32,
    /// The pod's cgroup v2 directory, when cgroup v2 is writable.
    pub cgroup: Option<PathBuf>,
}

impl Pod {
    pub fn pod_ref(&self) -> PodRef {
        PodRef {
            namespace: POD_NAMESPACE.into(),
            name: self.name.clone(),
            uid: self.uid.clone(),
            container: Some(self.container.clone()),
        }
    }

    pub fn netns_path(&self) -> PathBuf {
        netns_path(&self.netns_name)
    }
}

/// A Service: ClusterIP:port -> backend pod:target_port, optional NodePort.
#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub port_name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub backend: String,
    pub target_port: u16,
    pub nodeport: Option<u16>,
}

impl Service {
    /// kube-proxy's comment: `namespace/name:port`.
    pub fn comment(&self) -> String {
        format!("{POD_NAMESPACE}/{}:{}", self.name, self.port_name)
    }
}

/// What a lab is made of.
#[derive(Clone, Debug, Default)]
pub struct LabSpec {
    pub pods: Vec<String>,
    /// (name, ClusterIP last octet pair, port, backend pod, target port, NodePort)
    pub services: Vec<ServiceSpec>,
}

#[derive(Clone, Debug)]
pub struct ServiceSpec {
    pub name: String,
    pub cluster_ip: Ipv4Addr,
    pub port: u16,
    pub backend: String,
    pub target_port: u16,
    pub nodeport: Option<u16>,
}

impl LabSpec {
    pub fn pods(names: &[&str]) -> Self {
        Self {
            pods: names.iter().map(ToString::to_string).collect(),
            services: Vec::new(),
        }
    }

    pub fn service(
        mut self,
        name: &str,
        cluster_ip: Ipv4Addr,
        port: u16,
        backend: &str,
        target_port: u16,
        nodeport: Option<u16>,
    ) -> Self {
        self.services.push(ServiceSpec {
            name: name.into(),
            cluster_ip,
            port,
            backend: backend.into(),
            target_port,
            nodeport,
        });
        self
    }
}

/// A running lab; dropping it removes everything it created.
pub struct Lab {
    pub id: u32,
    /// `tcptrace-lab-<pid>-<id>`: prefix of every name of this lab.
    pub prefix: String,
    pub node_netns_name: String,
    pub node_netns: u32,
    pub pods: Vec<Pod>,
    pub services: Vec<Service>,
    /// Kubelet-style host root (`proc`, `sys`, `run`, `var/log/pods`).
    pub host_root: PathBuf,
    /// The lab's top cgroup (`tcptrace-lab-<pid>-<id>.slice`), if any.
    pub cgroup_root: Option<PathBuf>,
}

/// Kills what is left in a cgroup tree and removes it, deepest first.
fn remove_cgroup_tree(dir: &Path) {
    let Ok(rd) = fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&e.path());
        }
    }
    if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
        for pid in procs
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    // A killed process leaves its cgroup a moment later.
    let deadline = Instant::now() + Duration::from_secs(2);
    while fs::remove_dir(dir).is_err() && dir.exists() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a command; fails with its stderr on a non-zero exit.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    run_stdin(cmd, args, None)
}

fn run_stdin(cmd: &str, args: &[&str], stdin: Option<&str>) -> Result<String> {
    let mut child = Command::new(cmd)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd}: is it installed?"))?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())
            .with_context(|| format!("writing to {cmd}"))?;
    }
    let out = child
        .wait_with_output()
        .with_context(|| format!("waiting for {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The cgroup v2 mount, if this process may create cgroups in it.
fn cgroup2_root() -> Option<PathBuf> {
    ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.join("cgroup.controllers").is_file())
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut buf = [0u8; N];
    let ok = File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf));
    if ok.is_err() {
        // Unique enough: time and counter.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (t >> ((i % 16) * 8)) as u8 ^ i as u8;
        }
    }
    buf
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A random RFC 4122 version-4 uid, as the API server makes them.
fn new_uid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Lab {
    /// Builds the lab: namespaces, links, routes, NAT rules, pods.
    pub fn new(spec: &LabSpec) -> Result<Self> {
        if !nix::unistd::geteuid().is_root() {
            bail!("the lab needs root: it creates network namespaces");
        }
        for tool in ["ip", "iptables-restore"] {
            which(tool)?;
        }
        if spec.pods.is_empty() || spec.pods.len() > 200 {
            bail!("a lab has 1 to 200 pods");
        }
        let id = LAB_COUNTER.fetch_add(1, Ordering::SeqCst);
        let prefix = format!("{PREFIX}{}-{id}", std::process::id());
        let host_root = create(id, || {
            let dir = std::env::temp_dir().join(&prefix);
            let _ = fs::remove_dir_all(&dir);
            fs::create_dir_all(dir.join("var/log/pods"))
                .and_then(|()| fs::create_dir_all(dir.join("var/log/containers")))
                .with_context(|| format!("creating {}", dir.display()))?;
            Ok((dir.clone(), Resource::Dir(dir)))
        })?;
        let mut lab = Lab {
            id,
            node_netns_name: format!("{prefix}-node"),
            prefix,
            node_netns: 0,
            pods: Vec::new(),
            services: Vec::new(),
            host_root,
            cgroup_root: None,
        };
        lab.build(spec)?;
        Ok(lab)
    }

    fn add_netns(&self, name: &str) -> Result<u32> {
        create(self.id, || {
            run("ip", &["netns", "add", name])?;
            Ok(((), Resource::Netns(name.to_string())))
        })?;
        run("ip", &["-n", name, "link", "set", "lo", "up"])?;
        netns_inode(name)
    }

    fn build(&mut self, spec: &LabSpec) -> Result<()> {
        for (link, target) in [("proc", "/proc"), ("sys", "/sys"), ("run", "/run")] {
            symlink(target, self.host_root.join(link))
                .with_context(|| format!("linking {link} in the lab host root"))?;
        }
        let node = self.node_netns_name.clone();
        self.node_netns = self.add_netns(&node)?;
        sysctl(&node, "net.ipv4.ip_forward", "1")?;
        // ClusterIPs are local addresses of the node namespace (as on an
        // IPVS node's kube-ipvs0): a packet that misses its DNAT meets the
        // node's own stack.
        run(
            "ip",
            &[
                "-n",
                &node,
                "route",
                "add",
                "local",
                "10.96.0.0/16",
                "dev",
                "lo",
            ],
        )?;
        if let Some(cg2) = cgroup2_root() {
            let top = cg2.join(format!("{}.slice", self.prefix));
            let made = create(self.id, || {
                fs::create_dir(&top)
                    .with_context(|| format!("creating cgroup {}", top.display()))?;
                Ok(((), Resource::Cgroup(top.clone())))
            });
            if made.is_ok() {
                self.cgroup_root = Some(top);
            }
        }
        for (i, name) in spec.pods.iter().enumerate() {
            let pod = self.add_pod(name, (i + 1) as u8)?;
            self.pods.push(pod);
        }
        for s in &spec.services {
            if self.pod(&s.backend).is_none() {
                bail!("service {} has no backend pod {}", s.name, s.backend);
            }
            if !(s.cluster_ip.octets()[0] == 10 && s.cluster_ip.octets()[1] == 96) {
                bail!("ClusterIP {} is outside 10.96.0.0/16", s.cluster_ip);
            }
            self.services.push(Service {
                name: s.name.clone(),
                port_name: "http".into(),
                cluster_ip: s.cluster_ip,
                port: s.port,
                backend: s.backend.clone(),
                target_port: s.target_port,
                nodeport: s.nodeport,
            });
        }
        self.apply_kube_proxy_rules(&[])
    }

    fn add_pod(&self, name: &str, index: u8) -> Result<Pod> {
        let netns_name = format!("{}-{name}", self.prefix);
        let netns = self.add_netns(&netns_name)?;
        let node = &self.node_netns_name;
        let host_if = format!("vp{index}");
        let gateway = Ipv4Addr::new(10, 244, index, 1);
        let ip = Ipv4Addr::new(10, 244, index, 2);
        run(
            "ip",
            &[
                "-n",
                node,
                "link",
                "add",
                &host_if,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                &netns_name,
            ],
        )?;
        run(
            "ip",
            &[
                "-n",
                node,
                "addr",
                "add",
                &format!("{gateway}/24"),
                "dev",
                &host_if,
            ],
        )?;
        run("ip", &["-n", node, "link", "set", &host_if, "up"])?;
        run(
            "ip",
            &[
                "-n",
                &netns_name,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                "eth0",
            ],
        )?;
        run("ip", &["-n", &netns_name, "link", "set", "eth0", "up"])?;
        run(
            "ip",
            &[
                "-n",
                &netns_name,
                "route",
                "add",
                "default",
                "via",
                &gateway.to_string(),
            ],
        )?;
        let uid = new_uid();
        let container = "app".to_string();
        let container_id = hex(&random_bytes::<32>());
        // Kubelet's log tree and the containers/ link into it.
        let pod_dir = self
            .host_root
            .join("var/log/pods")
            .join(format!("{POD_NAMESPACE}_{name}_{uid}"));
        fs::create_dir_all(pod_dir.join(&container))?;
        let log = pod_dir.join(&container).join("0.log");
        fs::write(&log, b"")?;
        symlink(
            &log,
            self.host_root.join("var/log/containers").join(format!(
                "{name}_{POD_NAMESPACE}_{container}-{container_id}.log"
            )),
        )?;
        let cgroup = match &self.cgroup_root {
            Some(top) => {
                let dir = top
                    .join("kubepods.slice")
                    .join("kubepods-besteffort.slice")
                    .join(format!(
                        "kubepods-besteffort-pod{}.slice",
                        uid.replace('-', "_")
                    ))
                    .join(format!("cri-containerd-{container_id}.scope"));
                fs::create_dir_all(&dir)
                    .with_context(|| format!("creating cgroup {}", dir.display()))?;
                Some(dir)
            }
            None => None,
        };
        let pod = Pod {
            name: name.to_string(),
            index,
            uid,
            container,
            container_id,
            ip,
            gateway,
            netns_name,
            netns,
            cgroup,
        };
        // The sandbox: a process that keeps the pod's namespace and cgroup
        // populated, as the pause container does.
        let pause = self.spawn_in_pod(&pod, "sleep", &["600"])?;
        drop(pause);
        Ok(pod)
    }

    /// Starts `cmd` inside the pod's network namespace and cgroup; the
    /// process is killed with the lab. Returns its pid once it is inside.
    pub fn spawn_in_pod(&self, pod: &Pod, cmd: &str, args: &[&str]) -> Result<SpawnedChild> {
        self.spawn_in(&pod.netns_name, pod.cgroup.as_deref(), cmd, args)
    }

    fn spawn_in(
        &self,
        netns: &str,
        cgroup: Option<&Path>,
        cmd: &str,
        args: &[&str],
    ) -> Result<SpawnedChild> {
        let want = netns_inode(netns)?;
        let child: Child = create(self.id, || {
            let mut full = vec!["netns", "exec", netns, cmd];
            full.extend_from_slice(args);
            // Into the pod's cgroup before anything runs (a server that
            // forks at once would leave children outside): the shell moves
            // itself, then becomes `ip netns exec`, then the command.
            let procs = cgroup.map(|dir| dir.join("cgroup.procs"));
            let mut command = match &procs {
                Some(procs) => {
                    // iproute2 by path: a busybox sh would run its own `ip`.
                    let ip = which("ip")?;
                    let mut c = Command::new("sh");
                    c.args(["-c", "echo 0 > \"$0\" && exec \"$@\""])
                        .arg(procs)
                        .arg(ip)
                        .args(&full);
                    c
                }
                None => {
                    let mut c = Command::new("ip");
                    c.args(&full);
                    c
                }
            };
            let child = command
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("starting {cmd} in {netns}"))?;
            let pid = child.id();
            Ok((child, Resource::Process(pid)))
        })?;
        let mut child = child;
        let pid = child.id();
        // `ip netns exec` enters the namespace, then execs the command.
        let deadline = Instant::now() + SPAWN_WAIT;
        loop {
            let here = fs::metadata(format!("/proc/{pid}/ns/net")).map(|m| m.ino() as u32);
            let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap_or_default();
            if here.as_ref().is_ok_and(|&i| i == want) && !exe.ends_with("ip") {
                break;
            }
            if Instant::now() > deadline {
                bail!("{cmd} did not start in {netns} within {SPAWN_WAIT:?}");
            }
            if let Ok(Some(status)) = child.try_wait() {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = std::io::Read::read_to_string(&mut e, &mut err);
                }
                bail!(
                    "{cmd} exited ({status}) before it started in {netns}: {}",
                    err.trim()
                );
            }
            thread::sleep(Duration::from_millis(5));
        }
        Ok(SpawnedChild { child, pid })
    }

    pub fn pod(&self, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| p.name == name)
    }

    /// The pod, or an error naming it.
    pub fn get(&self, name: &str) -> Result<&Pod> {
        self.pod(name)
            .ok_or_else(|| anyhow!("the lab has no pod {name}"))
    }

    pub fn service(&self, name: &str) -> Result<&Service> {
        self.services
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| anyhow!("the lab has no service {name}"))
    }

    pub fn node_netns_path(&self) -> PathBuf {
        netns_path(&self.node_netns_name)
    }

    /// Every namespace of the lab: node first, then pods.
    pub fn netns_inodes(&self) -> Vec<u32> {
        let mut v = vec![self.node_netns];
        v.extend(self.pods.iter().map(|p| p.netns));
        v
    }

    /// The NodePorts of the lab's Services, as the facts want them.
    pub fn nodeports(&self) -> BTreeMap<u16, String> {
        self.services
            .iter()
            .filter_map(|s| Some((s.nodeport?, s.comment())))
            .collect()
    }

    /// Node facts configuration that makes the lab the node.
    pub fn facts_config(&self) -> FactsConfig {
        FactsConfig {
            host_root: self.host_root.clone(),
            node_netns: self.node_netns_path(),
            middlebox_timeout_s: None,
            nodeports: self.nodeports(),
        }
    }

    /// Runs a command inside the node namespace.
    pub fn node_exec(&self, args: &[&str]) -> Result<String> {
        let mut full = vec!["netns", "exec", &self.node_netns_name];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Replaces the node's iptables rules: kube-proxy's NAT for the lab's
    /// Services, plus `filter` rules (`-A CHAIN ...` lines) given here.
    pub fn apply_kube_proxy_rules(&self, filter: &[&str]) -> Result<()> {
        let mut nat = String::from(
            "*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n:KUBE-SERVICES - [0:0]\n:KUBE-NODEPORTS - [0:0]\n",
        );
        let mut rules = String::from(
            "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n-A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n",
        );
        for (i, s) in self.services.iter().enumerate() {
            let backend = self.get(&s.backend)?;
            let svc = format!("KUBE-SVC-LAB{i:012}");
            let sep = format!("KUBE-SEP-LAB{i:012}");
            let c = s.comment();
            nat.push_str(&format!(":{svc} - [0:0]\n:{sep} - [0:0]\n"));
            rules.push_str(&format!(
                "-A KUBE-SERVICES -d {}/32 -p tcp -m comment --comment \"{c} cluster IP\" -m tcp --dport {} -j {svc}\n",
                s.cluster_ip, s.port
            ));
            rules.push_str(&format!(
                "-A {svc} -m comment --comment \"{c} -> {}:{}\" -j {sep}\n",
                backend.ip, s.target_port
            ));
            rules.push_str(&format!(
                "-A {sep} -p tcp -m comment --comment \"{c}\" -m tcp -j DNAT --to-destination {}:{}\n",
                backend.ip, s.target_port
            ));
            if let Some(np) = s.nodeport {
                rules.push_str(&format!(
                    "-A KUBE-NODEPORTS -p tcp -m comment --comment \"{c}\" -m tcp --dport {np} -j {svc}\n"
                ));
            }
        }
        rules.push_str("-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n");
        let mut text = format!("{nat}{rules}COMMIT\n");
        text.push_str(
            "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n",
        );
        for r in filter {
            text.push_str(r);
            text.push('\n');
        }
        text.push_str("COMMIT\n");
        let mut full = vec!["netns", "exec", &self.node_netns_name, "iptables-restore"];
        full.push("--noflush");
        // --noflush keeps other tables (nft) intact; flush ours explicitly.
        let _ = self.node_exec(&["iptables", "-t", "nat", "-F"]);
        let _ = self.node_exec(&["iptables", "-t", "filter", "-F"]);
        run_stdin("ip", &full, Some(&text)).context("loading the lab's kube-proxy rules")?;
        Ok(())
    }

    /// Loads an nft ruleset into the node namespace.
    pub fn node_nft(&self, ruleset: &str) -> Result<()> {
        which("nft")?;
        run_stdin(
            "ip",
            &["netns", "exec", &self.node_netns_name, "nft", "-f", "-"],
            Some(ruleset),
        )
        .map(|_| ())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        cleanup_ordered(Some(self.id));
    }
}

/// A process started in a pod; killed with the lab (or earlier with `kill`).
pub struct SpawnedChild {
    pub child: Child,
    pub pid: u32,
}

impl SpawnedChild {
    /// Its output once it exited; forgets it as a resource of the lab.
    fn take_output(self) -> Result<std::process::Output> {
        let pid = self.pid;
        let out = self
            .child
            .wait_with_output()
            .with_context(|| format!("waiting for process {pid}"))?;
        registry()
            .items
            .retain(|(_, r)| !matches!(r, Resource::Process(p) if *p == pid));
        Ok(out)
    }

    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        // Reaped: its pid may be reused, so the lab must not kill it again.
        registry()
            .items
            .retain(|(_, r)| !matches!(r, Resource::Process(p) if *p == self.pid));
    }
}

/// Fails with a clear message when `tool` is not on PATH.
pub fn which(tool: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
        .ok_or_else(|| anyhow!("{tool} not found on PATH"))
}

/// Whether `pid` is alive.
fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid in a lab name `tcptrace-lab-<pid>-...`.
fn owner_pid(name: &str) -> Option<u32> {
    name.strip_prefix(PREFIX)?
        .split(['-', '.'])
        .next()?
        .parse()
        .ok()
}

/// Removes what labs of dead processes left behind (after a SIGKILL):
/// namespaces, cgroups and temp dirs whose owner pid is gone. Returns what
/// was removed.
pub fn sweep_stale() -> Vec<String> {
    let mut removed = Vec::new();
    let stale = |name: &str| owner_pid(name).is_some_and(|p| !alive(p));
    if let Ok(rd) = fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale(&name) {
                delete_netns(&name);
                removed.push(format!("netns {name}"));
            }
        }
    }
    if let Some(cg) = cgroup2_root()
        && let Ok(rd) = fs::read_dir(&cg)
    {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale(&name) {
                remove_cgroup_tree(&e.path());
                removed.push(format!("cgroup {}", e.path().display()));
            }
        }
    }
    if let Ok(rd) = fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if stale(&name) {
                let _ = fs::remove_dir_all(e.path());
                removed.push(format!("dir {}", e.path().display()));
            }
        }
    }
    removed
}

/// What labs of process `pid` left: namespaces, cgroups, temp dirs (for
/// tests that check cleanup).
pub fn leftovers(pid: u32) -> Vec<String> {
    let mine = format!("{PREFIX}{pid}-");
    let mut found = Vec::new();
    if let Ok(rd) = fs::read_dir("/run/netns") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&mine) {
                found.push(format!("netns {name}"));
            }
        }
    }
    if let Some(cg) = cgroup2_root()
        && let Ok(rd) = fs::read_dir(&cg)
    {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&mine) {
                found.push(format!("cgroup {}", e.path().display()));
            }
        }
    }
    if let Ok(rd) = fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&mine) {
                found.push(format!("dir {}", e.path().display()));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_names_carry_their_owner() {
        assert_eq!(owner_pid("tcptrace-lab-123-4-node"), Some(123));
        assert_eq!(owner_pid("tcptrace-lab-77-0.slice"), Some(77));
        assert_eq!(owner_pid("tt-x-1"), None);
        assert_eq!(owner_pid("tcptrace-lab-x-1"), None);
    }

    #[test]
    fn uids_look_like_the_api_servers() {
        let u = new_uid();
        assert_eq!(u.len(), 36, "{u}");
        assert_eq!(&u[14..15], "4");
        assert_ne!(new_uid(), u);
        assert_eq!(hex(&random_bytes::<32>()).len(), 64);
    }
}
