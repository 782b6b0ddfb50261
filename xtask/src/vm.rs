//! `cargo xtask vm-test`: boots Debian's distribution kernels in qemu with a
//! minimal initramfs, runs the root integration tests inside, and writes the
//! kernel x hook x tier matrix to docs/kernel-matrix.md.
//!
//! Everything downloaded or built is cached under target/vm/: the kernel
//! packages (unpacked), and per kernel the base image (busybox, the test
//! tools and their libraries, kernel modules). The test binaries go into a
//! second cpio archive built on every run and appended to the base one (the
//! kernel unpacks concatenated archives in order).
use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    fs::{self, File},
    hash::{DefaultHasher, Hash as _, Hasher as _},
    io::{self, BufRead as _, BufReader, BufWriter, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use clap::{Args, ValueEnum};
use serde_json::Value;

use super::{cargo, output_of, step, workspace_root};

/// Bump when the base image's layout or contents change.
const IMAGE_VERSION: u32 = 2;
/// Marker the guest prints before its reports; the rest is console noise.
const MARK: &str = "@@vm ";
const GUEST_TCPTRACE: &str = "/usr/local/bin/tcptrace";
const DOC: &str = "docs/kernel-matrix.md";

/// Modules loaded at boot; a missing required one (neither built in nor
/// shipped) fails the image build.
const REQUIRED_MODULES: &[&str] = &[
    "veth",
    "nf_conntrack",
    "nf_conntrack_netlink",
    "nf_tables",
    "nft_compat",
    "nft_ct",
    "x_tables",
    "xt_tcpudp",
    "xt_conntrack",
    "ip_tables",
    "iptable_filter",
];
/// Loaded at boot when the kernel ships them (kube-proxy style rules).
const OPTIONAL_MODULES: &[&str] = &[
    "iptable_raw",
    "iptable_nat",
    "iptable_mangle",
    "nf_nat",
    "nft_chain_nat",
    "nft_reject_inet",
    "nft_reject_ipv4",
    "nft_masq",
    "nft_nat",
    "xt_CT",
    "xt_state",
    "xt_comment",
    "xt_multiport",
    "xt_mark",
    "xt_nat",
    "xt_MASQUERADE",
    "xt_addrtype",
    "ipt_REJECT",
    "ip6_tables",
    "ip6table_filter",
    "sch_netem",
    "ip_vs",
    "ip_vs_rr",
    "bridge",
    "br_netfilter",
    "inet_diag",
    "tcp_diag",
    "nft_fib",
    "nft_fib_inet",
    "nft_fib_ipv4",
    "nft_redir",
    "nft_limit",
    "nft_hash",
    "nft_numgen",
    "nft_log",
];
/// Module directories shipped whole (so the kernel can autoload by alias).
const MODULE_DIRS: &[&str] = &[
    "kernel/net/netfilter",
    "kernel/net/ipv4/netfilter",
    "kernel/net/ipv6/netfilter",
];
/// Host programs copied into the image with their libraries. iptables and
/// friends keep the host's alternative (nft or legacy).
const HOST_TOOLS: &[&str] = &[
    "/usr/bin/ip",
    "/usr/sbin/iptables",
    "/usr/sbin/iptables-save",
    "/usr/sbin/iptables-restore",
    "/usr/sbin/ip6tables",
    "/usr/sbin/ip6tables-save",
    "/usr/sbin/ip6tables-restore",
    "/usr/sbin/iptables-legacy",
    "/usr/sbin/iptables-nft",
    "/usr/sbin/nft",
    "/usr/sbin/conntrack",
    "/usr/sbin/sysctl",
    "/usr/bin/setpriv",
    "/usr/bin/python3",
    "/usr/bin/bash",
];
/// Plugin directories (dlopen'ed, so ldd does not see them).
const HOST_LIB_DIRS: &[&str] = &["/usr/lib/x86_64-linux-gnu/xtables"];
const HOST_ETC: &[&str] = &["/etc/protocols", "/etc/services", "/etc/ethertypes"];
/// Python's standard library, without what a test cannot need.
const PYTHON_LIB: &str = "/usr/lib/python3.11";
const PYTHON_SKIP: &[&str] = &[
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "lib2to3",
    "pydoc_data",
    "__pycache__",
    "config-3.11-x86_64-linux-gnu",
    "site-packages",
    "dist-packages",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum KernelChoice {
    /// Debian 12's kernel (linux-image-cloud-amd64).
    #[value(name = "6.1")]
    V6_1,
    /// Debian 12's newer kernel (linux-image-6.12-cloud-amd64).
    #[value(name = "6.12")]
    V6_12,
    /// Both, plus the same test binaries on the host's kernel; writes
    /// docs/kernel-matrix.md.
    All,
}

#[derive(Args, Debug)]
pub struct VmTestArgs {
    /// Which kernel(s) to boot.
    #[arg(long, value_enum, default_value = "6.1")]
    pub kernel: KernelChoice,
    /// Upper bound for one boot (seconds), tests included.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// Rebuild the cached base images.
    #[arg(long)]
    pub rebuild: bool,
    /// qemu accelerator; `auto` uses KVM when a probe boot shows it works.
    #[arg(long, value_enum, default_value = "auto")]
    pub accel: Accel,
    /// Run only these integration-test suites (repeatable; default: all).
    /// `tcptrace probes` and `tcptrace selftest` always run.
    #[arg(long = "suite", value_name = "NAME")]
    pub suites: Vec<String>,
}

impl VmTestArgs {
    /// What `cargo xtask test` runs: the direct tier (`vm`) and the exact
    /// records (`capture`) on Debian 12's default kernel, plus selftest.
    pub fn ci() -> Self {
        Self {
            kernel: KernelChoice::V6_1,
            timeout: 600,
            rebuild: false,
            accel: Accel::Auto,
            suites: vec!["vm".into(), "capture".into()],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    Auto,
    Kvm,
    Tcg,
}

/// Whether to use KVM. /dev/kvm can accept KVM_CREATE_VM and still never
/// run a guest kernel (nested virtualization): `auto` boots the kernel
/// without an initrd once and wants its banner within 15 s. The answer is
/// cached per host kernel.
fn kvm_works(accel: Accel, vmlinuz: &Path, vm_dir: &Path) -> Result<bool> {
    match accel {
        Accel::Kvm => return Ok(true),
        Accel::Tcg => return Ok(false),
        Accel::Auto => {}
    }
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Ok(false);
    }
    let host = output_of("uname", &["-rv"]).unwrap_or_default();
    let cache = vm_dir.join("kvm-probe");
    if let Ok(text) = fs::read_to_string(&cache)
        && let Some((answer, key)) = text.split_once('\n')
        && key == host
    {
        return Ok(answer == "kvm");
    }
    eprintln!("xtask: probing KVM (a guest kernel must print its banner within 15 s)");
    let (_, out) = run_bounded(
        Command::new("qemu-system-x86_64")
            .args(["-machine", "q35,accel=kvm", "-cpu", "host", "-m", "256"])
            .arg("-kernel")
            .arg(vmlinuz)
            .args(["-append", "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1"])
            .args(["-nic", "none", "-display", "none", "-monitor", "none"])
            .args(["-serial", "stdio", "-no-reboot"]),
        Duration::from_secs(15),
        false,
    )?;
    let works = out.contains("Linux version");
    if !works {
        let why = out
            .lines()
            .find(|l| l.contains("error"))
            .unwrap_or("no output");
        eprintln!("xtask: KVM does not run a guest here ({why}): using TCG");
    }
    fs::write(
        &cache,
        format!("{}\n{host}", if works { "kvm" } else { "tcg" }),
    )?;
    Ok(works)
}

/// A Debian kernel flavour, resolved through its meta-package.
struct KernelSpec {
    label: &'static str,
    meta: &'static str,
}

const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        label: "6.1",
        meta: "linux-image-cloud-amd64",
    },
    KernelSpec {
        label: "6.12",
        meta: "linux-image-6.12-cloud-amd64",
    },
];

/// What one kernel run produced.
struct KernelReport {
    label: String,
    release: String,
    package: String,
    accel: String,
    prepare: Duration,
    run: Duration,
    suites: Vec<Suite>,
    probes: Vec<Probe>,
    selftest: Vec<SelftestCase>,
    /// Why the run could not complete (timeout, boot failure...).
    error: Option<String>,
}

/// One case of `tcptrace selftest --format json`.
struct SelftestCase {
    scenario: String,
    case: String,
    result: String,
}

struct Suite {
    name: String,
    passed: u32,
    failed: u32,
    ignored: u32,
    failures: Vec<String>,
    exit: Option<i32>,
}

struct Probe {
    hook: String,
    tier: String,
    state: String,
}

impl KernelReport {
    fn ok(&self) -> bool {
        self.error.is_none()
            && !self.suites.is_empty()
            && self
                .suites
                .iter()
                .all(|s| s.failed == 0 && s.exit == Some(0))
            && !self.selftest.is_empty()
            && self.selftest.iter().all(|c| c.result == "pass")
    }

    /// "7 of 7 pass" (or which cases did not).
    fn selftest_summary(&self) -> String {
        if self.selftest.is_empty() {
            return "no selftest report".into();
        }
        let bad: Vec<String> = self
            .selftest
            .iter()
            .filter(|c| c.result != "pass")
            .map(|c| format!("{}/{}: {}", c.scenario, c.case, c.result))
            .collect();
        let n = self.selftest.len();
        if bad.is_empty() {
            format!("{n} of {n} cases pass")
        } else {
            format!("{} of {n} cases pass ({})", n - bad.len(), bad.join(", "))
        }
    }

    fn result(&self) -> String {
        if let Some(e) = &self.error {
            return format!("error: {e}");
        }
        let passed: u32 = self.suites.iter().map(|s| s.passed).sum();
        let failed: u32 = self.suites.iter().map(|s| s.failed).sum();
        let status = if self.ok() { "pass" } else { "FAIL" };
        format!("{status} ({passed} passed, {failed} failed)")
    }
}

pub fn vm_test(args: &VmTestArgs) -> Result<()> {
    let started = Instant::now();
    let mut bins = build_binaries()?;
    if !args.suites.is_empty() {
        for wanted in &args.suites {
            if !bins.tests.iter().any(|(name, _)| name == wanted) {
                let known: Vec<&str> = bins.tests.iter().map(|(n, _)| n.as_str()).collect();
                bail!("no test suite {wanted:?} (suites: {})", known.join(", "));
            }
        }
        bins.tests.retain(|(name, _)| args.suites.contains(name));
    }
    let vm_dir = workspace_root().join("target/vm");
    fs::create_dir_all(&vm_dir).with_context(|| format!("creating {}", vm_dir.display()))?;
    let busybox = fetch_busybox(&vm_dir)?;
    let payload = vm_dir.join("payload.cpio");
    let t = Instant::now();
    // From here on, the snapshot the VM runs (the shared target dir may be
    // rebuilt meanwhile): the host row runs the very same files.
    let bins = write_payload(&bins, &vm_dir.join("stripped"), &payload)?;
    eprintln!(
        "xtask: test payload built in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let specs: Vec<&KernelSpec> = match args.kernel {
        KernelChoice::V6_1 => vec![&KERNELS[0]],
        KernelChoice::V6_12 => vec![&KERNELS[1]],
        KernelChoice::All => KERNELS.iter().collect(),
    };
    let mut reports = Vec::new();
    for spec in specs {
        let report = match run_kernel(spec, &vm_dir, &busybox, &payload, args) {
            Ok(r) => r,
            Err(e) => KernelReport {
                label: spec.label.into(),
                release: String::new(),
                package: spec.meta.into(),
                accel: String::new(),
                prepare: Duration::ZERO,
                run: Duration::ZERO,
                suites: Vec::new(),
                probes: Vec::new(),
                selftest: Vec::new(),
                error: Some(format!("{e:#}")),
            },
        };
        reports.push(report);
    }
    if args.kernel == KernelChoice::All {
        reports.push(run_host(&bins, args.timeout)?);
    }
    let _ = fs::remove_file(&payload);

    let summary = summary_table(&reports);
    let matrix = matrix_table(&reports);
    let selftest = selftest_table(&reports);
    eprintln!("\n{summary}\n{selftest}\n{matrix}");
    if args.kernel == KernelChoice::All {
        let doc = workspace_root().join(DOC);
        if let Some(dir) = doc.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        fs::write(&doc, render_doc(&summary, &selftest, &matrix))
            .with_context(|| format!("writing {}", doc.display()))?;
        eprintln!("xtask: wrote {DOC}");
    }
    eprintln!(
        "xtask: vm-test finished in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    let failed: Vec<&str> = reports
        .iter()
        .filter(|r| !r.ok())
        .map(|r| r.label.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("vm-test failed on kernel(s) {}", failed.join(", "));
    }
    Ok(())
}

/// The binaries that run in the guest.
struct Binaries {
    tcptrace: PathBuf,
    tests: Vec<(String, PathBuf)>,
}

fn build_binaries() -> Result<Binaries> {
    crate::setup::ensure()?;
    super::build(false)?;
    eprintln!("xtask: cargo test --no-run (tcptrace-tests)");
    let out = cargo()
        .args(["test", "--package", "tcptrace-tests", "--no-run"])
        .args(["--message-format=json-render-diagnostics"])
        .stderr(Stdio::inherit())
        .output()
        .context("starting cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the integration tests failed ({})", out.status);
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        if let (Some(exe), Some(name)) =
            (msg["executable"].as_str(), msg["target"]["name"].as_str())
        {
            tests.push((name.to_string(), PathBuf::from(exe)));
        }
    }
    if tests.is_empty() {
        bail!("cargo test --no-run reported no test executables for tcptrace-tests");
    }
    tests.sort();
    Ok(Binaries {
        tcptrace: crate::target_dir().join("debug/tcptrace"),
        tests,
    })
}

/// Runs `cmd` with a deadline, echoing its output lines to stderr as they
/// come; kills it on timeout (and when the guard is dropped on error).
fn run_bounded(cmd: &mut Command, timeout: Duration, echo: bool) -> Result<(Option<i32>, String)> {
    struct Guard(Child);
    impl Drop for Guard {
        fn drop(&mut self) {
            if let Ok(None) = self.0.try_wait() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {cmd:?}"))?;
    let mut guard = Guard(child);
    let (tx, rx) = mpsc::channel::<String>();
    let mut readers = Vec::new();
    let pipes: [Box<dyn io::Read + Send>; 2] = [
        Box::new(guard.0.stdout.take().context("child stdout")?),
        Box::new(guard.0.stderr.take().context("child stderr")?),
    ];
    for pipe in pipes {
        let tx = tx.clone();
        readers.push(thread::spawn(move || {
            let mut reader = BufReader::new(pipe);
            let mut buf = Vec::new();
            while reader.read_until(b'\n', &mut buf).is_ok_and(|n| n > 0) {
                let line = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\n', '\r'])
                    .replace('\r', "");
                if tx.send(line).is_err() {
                    break;
                }
                buf.clear();
            }
        }));
    }
    drop(tx);
    let deadline = Instant::now() + timeout;
    let mut text = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left.min(Duration::from_secs(1))) {
            Ok(line) => {
                if echo {
                    eprintln!("  | {line}");
                }
                text.push_str(&line);
                text.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) if left.is_zero() => {
                return Ok((None, text));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
    }
    let status = loop {
        if let Some(s) = guard.0.try_wait().context("waiting for the child")? {
            break s;
        }
        if Instant::now() > deadline {
            return Ok((None, text));
        }
        thread::sleep(Duration::from_millis(50));
    };
    for r in readers {
        let _ = r.join();
    }
    Ok((Some(status.code().unwrap_or(-1)), text))
}

/// Unpacks `package` once into `dir` (cached by a marker file).
fn fetch_unpacked(package: &str, dir: &Path) -> Result<()> {
    let marker = dir.join(".unpacked");
    if marker.exists() {
        return Ok(());
    }
    let _ = fs::remove_dir_all(dir);
    let dl = dir.with_extension("download");
    let _ = fs::remove_dir_all(&dl);
    let t = Instant::now();
    let deb = crate::apt::download(package, &dl)?;
    step(
        &format!("dpkg -x {package}"),
        Command::new("dpkg").arg("-x").arg(&deb).arg(dir),
    )?;
    let _ = fs::remove_dir_all(&dl);
    fs::write(&marker, package)?;
    eprintln!(
        "xtask: {package} downloaded and unpacked in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn fetch_busybox(vm_dir: &Path) -> Result<PathBuf> {
    let dir = vm_dir.join("busybox-static");
    fetch_unpacked("busybox-static", &dir)?;
    let bin = dir.join("bin/busybox");
    if !bin.exists() {
        bail!("busybox-static has no bin/busybox");
    }
    Ok(bin)
}

/// The concrete image package behind a meta-package, e.g.
/// linux-image-6.1.0-56-cloud-amd64-unsigned.
fn resolve_kernel_package(meta: &str) -> Result<String> {
    let text = crate::apt::depends(meta)?;
    let dep = text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends: "))
        .find(|d| d.starts_with("linux-image-"))
        .ok_or_else(|| {
            anyhow!("apt-cache depends {meta}: no linux-image dependency (apt-get update?)")
        })?;
    Ok(format!("{}-unsigned", dep.trim()))
}

fn run_kernel(
    spec: &KernelSpec,
    vm_dir: &Path,
    busybox: &Path,
    payload: &Path,
    args: &VmTestArgs,
) -> Result<KernelReport> {
    eprintln!("xtask: === kernel {} ===", spec.label);
    let t = Instant::now();
    let package = resolve_kernel_package(spec.meta)?;
    let kdir = vm_dir.join("kernels").join(&package);
    fetch_unpacked(&package, &kdir)?;
    let release = kernel_release(&kdir)?;
    let vmlinuz = kdir.join(format!("boot/vmlinuz-{release}"));
    let base = vm_dir.join(format!("base-{release}.cpio"));
    let fingerprint = base_fingerprint(busybox);
    let stamp = base.with_extension("stamp");
    let fresh = fs::read_to_string(&stamp).is_ok_and(|s| s == fingerprint);
    if args.rebuild || !fresh || !base.exists() {
        let tb = Instant::now();
        write_base(&kdir, &release, busybox, &base)?;
        fs::write(&stamp, &fingerprint)?;
        eprintln!(
            "xtask: base image for {release} built in {:.1} s",
            tb.elapsed().as_secs_f64()
        );
    }
    // Base + payload in one file: the kernel unpacks both archives.
    let image = vm_dir.join(format!("initrd-{release}.cpio"));
    {
        let mut out = BufWriter::new(File::create(&image)?);
        io::copy(&mut File::open(&base)?, &mut out)?;
        io::copy(&mut File::open(payload)?, &mut out)?;
        out.flush()?;
    }
    let prepare = t.elapsed();

    let t = Instant::now();
    let kvm = kvm_works(args.accel, &vmlinuz, vm_dir)?;
    let mut qemu = Command::new("qemu-system-x86_64");
    if kvm {
        qemu.args(["-machine", "q35,accel=kvm", "-cpu", "host"]);
    } else {
        qemu.args(["-machine", "q35,accel=tcg", "-cpu", "max"]);
    }
    qemu.args(["-smp", "2", "-m", "4096"])
        .arg("-kernel")
        .arg(&vmlinuz)
        .arg("-initrd")
        .arg(&image)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 rdinit=/init panic=-1 quiet loglevel=3 tcptrace.timeout={}",
            args.timeout + 30
        ))
        // No network device at all: the guest has loopback only.
        .args(["-nic", "none", "-display", "none", "-monitor", "none"])
        .args(["-serial", "stdio", "-no-reboot"]);
    eprintln!(
        "xtask: booting {release} ({}), timeout {} s",
        if kvm { "kvm" } else { "tcg" },
        args.timeout
    );
    let result = run_bounded(&mut qemu, Duration::from_secs(args.timeout), true);
    let _ = fs::remove_file(&image);
    let (code, console) = result?;
    let run = t.elapsed();
    let mut report = parse_console(&console);
    report.label = spec.label.into();
    report.package = package;
    report.prepare = prepare;
    report.run = run;
    if report.release.is_empty() {
        report.release = release;
    }
    if code.is_none() {
        report.error = Some(format!("timed out after {} s", args.timeout));
    } else if !console.contains(&format!("{MARK}done")) {
        report.error = Some(format!(
            "the guest stopped before finishing (qemu exit {code:?}); see the console above"
        ));
    }
    Ok(report)
}

fn kernel_release(kdir: &Path) -> Result<String> {
    let boot = kdir.join("boot");
    fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .find_map(|n| n.strip_prefix("vmlinuz-").map(str::to_string))
        .ok_or_else(|| anyhow!("no vmlinuz in {}", boot.display()))
}

fn base_fingerprint(busybox: &Path) -> String {
    let mut h = DefaultHasher::new();
    IMAGE_VERSION.hash(&mut h);
    REQUIRED_MODULES.hash(&mut h);
    OPTIONAL_MODULES.hash(&mut h);
    MODULE_DIRS.hash(&mut h);
    HOST_TOOLS.hash(&mut h);
    busybox.hash(&mut h);
    INIT.hash(&mut h);
    for tool in HOST_TOOLS {
        if let Ok(m) = fs::metadata(tool) {
            m.len().hash(&mut h);
        }
    }
    format!("{:016x}", h.finish())
}

// ---------------------------------------------------------------- initramfs

enum Node {
    Dir,
    File { data: Data, mode: u32 },
    Symlink(String),
    CharDev(u32, u32),
}

enum Data {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

/// An initramfs tree, written as a newc cpio archive.
#[derive(Default)]
struct Image {
    nodes: BTreeMap<String, Node>,
}

/// Debian merged /usr: /lib, /bin... are symlinks to /usr/...
fn merged(path: &str) -> String {
    for dir in ["bin", "sbin", "lib", "lib64"] {
        if let Some(rest) = path.strip_prefix(&format!("/{dir}/")) {
            return format!("/usr/{dir}/{rest}");
        }
    }
    path.to_string()
}

impl Image {
    fn with_layout() -> Self {
        let mut img = Self::default();
        for dir in ["bin", "sbin", "lib", "lib64"] {
            img.dir(&format!("/usr/{dir}"));
            img.nodes
                .insert(dir.to_string(), Node::Symlink(format!("usr/{dir}")));
        }
        for dir in [
            "/dev",
            "/proc",
            "/sys",
            "/run",
            "/tmp",
            "/root",
            "/etc",
            "/usr/local/bin",
        ] {
            img.dir(dir);
        }
        img.nodes.insert("dev/console".into(), Node::CharDev(5, 1));
        img.nodes.insert("dev/null".into(), Node::CharDev(1, 3));
        img
    }

    fn key(path: &str) -> String {
        path.trim_start_matches('/').to_string()
    }

    fn dir(&mut self, path: &str) {
        let key = Self::key(path);
        let mut acc = String::new();
        for part in key.split('/') {
            if !acc.is_empty() {
                acc.push('/');
            }
            acc.push_str(part);
            self.nodes.entry(acc.clone()).or_insert(Node::Dir);
        }
    }

    fn parent(&mut self, path: &str) {
        if let Some((parent, _)) = Self::key(path).rsplit_once('/') {
            self.dir(parent);
        }
    }

    fn bytes(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.parent(path);
        self.nodes.insert(
            Self::key(path),
            Node::File {
                data: Data::Bytes(data),
                mode,
            },
        );
    }

    fn file(&mut self, path: &str, host: &Path, mode: u32) {
        self.parent(path);
        self.nodes.insert(
            Self::key(path),
            Node::File {
                data: Data::Host(host.to_path_buf()),
                mode,
            },
        );
    }

    fn symlink(&mut self, path: &str, target: &str) {
        self.parent(path);
        self.nodes
            .entry(Self::key(path))
            .or_insert_with(|| Node::Symlink(target.to_string()));
    }

    fn has(&self, path: &str) -> bool {
        self.nodes.contains_key(&Self::key(path))
    }

    /// Copies a host file at its canonical (merged-/usr) path; the path
    /// asked for becomes a symlink to it when they differ.
    fn host_file(&mut self, path: &Path) -> Result<String> {
        let real =
            fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
        let real_s = merged(&real.to_string_lossy());
        let asked = merged(&path.to_string_lossy());
        let mode = fs::metadata(&real)?.permissions();
        let mode = std::os::unix::fs::PermissionsExt::mode(&mode) & 0o7777;
        self.file(&real_s, &real, mode);
        if asked != real_s {
            self.symlink(&asked, &real_s);
        }
        Ok(real_s)
    }

    /// A host executable or library plus every shared library ldd lists.
    fn host_binary(&mut self, path: &Path) -> Result<()> {
        self.host_file(path)?;
        for lib in ldd(path)? {
            self.host_file(&lib)?;
        }
        Ok(())
    }

    fn write(&self, out: &Path) -> Result<()> {
        let mut w = BufWriter::new(
            File::create(out).with_context(|| format!("creating {}", out.display()))?,
        );
        let mut ino = 1u32;
        for (name, node) in &self.nodes {
            ino += 1;
            match node {
                Node::Dir => cpio_entry(&mut w, ino, name, 0o040_755, 0, 0, None)?,
                Node::Symlink(t) => {
                    cpio_entry(&mut w, ino, name, 0o120_777, 0, 0, Some(t.as_bytes()))?
                }
                Node::CharDev(maj, min) => {
                    cpio_entry(&mut w, ino, name, 0o020_600, *maj, *min, None)?
                }
                Node::File { data, mode } => {
                    let mode = 0o100_000 | mode;
                    match data {
                        Data::Bytes(b) => cpio_entry(&mut w, ino, name, mode, 0, 0, Some(b))?,
                        Data::Host(p) => {
                            let b =
                                fs::read(p).with_context(|| format!("reading {}", p.display()))?;
                            cpio_entry(&mut w, ino, name, mode, 0, 0, Some(&b))?
                        }
                    }
                }
            }
        }
        cpio_entry(&mut w, 0, "TRAILER!!!", 0, 0, 0, None)?;
        w.flush()?;
        Ok(())
    }
}

/// One newc ("070701") cpio record.
fn cpio_entry(
    w: &mut impl io::Write,
    ino: u32,
    name: &str,
    mode: u32,
    rdev_major: u32,
    rdev_minor: u32,
    data: Option<&[u8]>,
) -> Result<()> {
    let data = data.unwrap_or_default();
    let nlink = if mode & 0o170_000 == 0o040_000 { 2 } else { 1 };
    let fields = [
        ino,
        mode,
        0,
        0,
        nlink,
        0,
        u32::try_from(data.len()).context("file too large for cpio")?,
        0,
        0,
        rdev_major,
        rdev_minor,
        u32::try_from(name.len() + 1)?,
        0,
    ];
    let mut header = String::from("070701");
    for f in fields {
        header.push_str(&format!("{f:08x}"));
    }
    w.write_all(header.as_bytes())?;
    w.write_all(name.as_bytes())?;
    w.write_all(&[0])?;
    let pad = |n: usize| (4 - n % 4) % 4;
    w.write_all(&[0; 3][..pad(110 + name.len() + 1)])?;
    w.write_all(data)?;
    w.write_all(&[0; 3][..pad(data.len())])?;
    Ok(())
}

fn ldd(path: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(path)
        .output()
        .with_context(|| format!("running ldd {}", path.display()))?;
    // "not a dynamic executable" (static) exits non-zero: no libraries.
    let text = String::from_utf8_lossy(&out.stdout);
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        } else if line.contains("not found") {
            bail!("ldd {}: {line}", path.unwrap_or_default());
        }
    }
    Ok(libs)
}

/// The guest's /init: mounts, modules, then the reports between markers.
const INIT: &str = r#"#!/bin/sh
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tracefs tracefs /sys/kernel/tracing
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
mount -t bpf bpf /sys/fs/bpf 2>/dev/null
mount -t cgroup2 cgroup2 /sys/fs/cgroup
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
mkdir -p /run/netns /dev/pts /dev/shm
mount -t devpts devpts /dev/pts 2>/dev/null
mount -t tmpfs tmpfs /dev/shm
echo 1 > /proc/sys/kernel/printk
# Guest-side bound: powers off even if the host side is gone.
limit=$(sed -n 's/.*tcptrace.timeout=\([0-9]*\).*/\1/p' /proc/cmdline)
(sleep ${limit:-900}; echo "@@vm guest-timeout"; poweroff -f) &
# Autoloading (nft expressions...) through busybox modprobe.
echo /usr/bin/modprobe > /proc/sys/kernel/modprobe
ip link set lo up
hostname tcptrace-vm
echo "@@vm release $(uname -r)"
if dmesg | grep -q "Hypervisor detected: KVM"; then echo "@@vm accel kvm"; else echo "@@vm accel tcg"; fi
for m in $(cat /etc/modules.load); do
  insmod /lib/modules/$(uname -r)/$m.ko 2>/tmp/insmod.err || grep -q "File exists" /tmp/insmod.err || echo "@@vm insmod-failed $m $(cat /tmp/insmod.err)"
done
echo "@@vm probes-begin"
tcptrace probes --format json
echo "@@vm probes-end $?"
echo "@@vm selftest-begin"
tcptrace selftest --format json 2>/dev/null
echo "@@vm selftest-end $?"
# TCPTRACE_VM lets the tests that change global settings run (vm.rs).
export TCPTRACE_BIN=/usr/local/bin/tcptrace RUST_BACKTRACE=1 TCPTRACE_VM=1
cd /tmp
for t in $(cat /etc/tests.list); do
  echo "@@vm suite-begin $t"
  /t/$t --test-threads=1 --include-ignored 2>&1
  echo "@@vm suite-end $t $?"
done
echo "@@vm oops $(dmesg | grep -c -E 'BUG:|Oops|WARNING:|Call Trace')"
echo "@@vm done"
poweroff -f
"#;

/// Tools, libraries, busybox and modules of one kernel.
fn write_base(kdir: &Path, release: &str, busybox: &Path, out: &Path) -> Result<()> {
    let mut img = Image::with_layout();
    img.bytes("/init", INIT.as_bytes().to_vec(), 0o755);
    img.bytes(
        "/etc/passwd",
        b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
            .to_vec(),
        0o644,
    );
    img.bytes(
        "/etc/group",
        b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
        0o644,
    );
    img.bytes(
        "/etc/nsswitch.conf",
        b"passwd: files\ngroup: files\nhosts: files\nprotocols: files\nservices: files\n".to_vec(),
        0o644,
    );
    img.bytes("/etc/hosts", b"127.0.0.1 localhost\n".to_vec(), 0o644);
    for etc in HOST_ETC {
        if Path::new(etc).exists() {
            img.host_file(Path::new(etc))?;
        }
    }
    for tool in HOST_TOOLS {
        let path = Path::new(tool);
        if path.exists() {
            img.host_binary(path)?;
        } else {
            eprintln!("xtask: {tool} not on this machine: left out of the VM image");
        }
    }
    for dir in HOST_LIB_DIRS {
        for entry in fs::read_dir(dir).with_context(|| format!("reading {dir}"))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "so") {
                img.host_binary(&path)?;
            }
        }
    }
    if Path::new("/usr/bin/python3").exists() {
        add_tree(&mut img, Path::new(PYTHON_LIB), PYTHON_SKIP)?;
    }
    // Busybox fills in every command the host tools did not provide.
    img.file("/usr/bin/busybox", busybox, 0o755);
    let applets = Command::new(busybox)
        .arg("--list")
        .output()
        .context("running busybox --list")?;
    for applet in String::from_utf8_lossy(&applets.stdout).split_whitespace() {
        if applet == "busybox" || applet == "init" || applet == "linuxrc" {
            continue;
        }
        if !img.has(&format!("/usr/bin/{applet}")) && !img.has(&format!("/usr/sbin/{applet}")) {
            img.symlink(&format!("/usr/bin/{applet}"), "busybox");
        }
    }
    add_modules(&mut img, kdir, release)?;
    img.write(out)
}

/// Copies a directory tree (regular files and symlinks), skipping names.
fn add_tree(img: &mut Image, root: &Path, skip: &[&str]) -> Result<()> {
    for entry in fs::read_dir(root).with_context(|| format!("reading {}", root.display()))? {
        let entry = entry?;
        let name = entry.file_name();
        if skip.iter().any(|s| name == *s) {
            continue;
        }
        let path = entry.path();
        let kind = entry.file_type()?;
        let key = path.to_string_lossy().into_owned();
        if kind.is_symlink() {
            img.symlink(&key, &fs::read_link(&path)?.to_string_lossy());
        } else if kind.is_dir() {
            img.dir(&key);
            add_tree(img, &path, skip)?;
        } else if kind.is_file() {
            if path.extension().is_some_and(|e| e == "so") {
                img.host_binary(&path)?;
            } else {
                img.file(&key, &path, 0o644);
            }
        }
    }
    Ok(())
}

/// A kernel module: its bytes (decompressed) and modinfo fields.
struct Module {
    data: Vec<u8>,
    depends: Vec<String>,
    aliases: Vec<String>,
}

fn module_name(file: &str) -> Option<String> {
    let stem = file
        .strip_suffix(".ko")
        .or_else(|| file.strip_suffix(".ko.xz"))
        .or_else(|| file.strip_suffix(".ko.zst"))
        .or_else(|| file.strip_suffix(".ko.gz"))?;
    Some(stem.replace('-', "_"))
}

fn read_module(path: &Path) -> Result<Module> {
    let name = path.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some("xz")
    } else if name.ends_with(".zst") {
        Some("zstd")
    } else if name.ends_with(".gz") {
        Some("gzip")
    } else {
        None
    };
    let data = match tool {
        None => fs::read(path)?,
        Some(tool) => {
            let out = Command::new(tool)
                .arg("-dc")
                .arg(path)
                .output()
                .with_context(|| format!("running {tool} -dc"))?;
            if !out.status.success() {
                bail!("{tool} -dc {name} failed");
            }
            out.stdout
        }
    };
    // .modinfo is a list of NUL-terminated key=value strings.
    let field = |key: &[u8]| -> Vec<String> {
        let mut values = Vec::new();
        for (i, w) in data.windows(key.len() + 1).enumerate() {
            if w[0] == 0 && &w[1..] == key {
                let start = i + 1 + key.len();
                let end = data[start..]
                    .iter()
                    .position(|&b| b == 0)
                    .map_or(data.len(), |p| start + p);
                values.push(String::from_utf8_lossy(&data[start..end]).into_owned());
            }
        }
        values
    };
    let depends = field(b"depends=")
        .first()
        .map(|d| {
            d.split(',')
                .filter(|s| !s.is_empty())
                .map(|s| s.replace('-', "_"))
                .collect()
        })
        .unwrap_or_default();
    let aliases = field(b"alias=");
    Ok(Module {
        data,
        depends,
        aliases,
    })
}

fn add_modules(img: &mut Image, kdir: &Path, release: &str) -> Result<()> {
    let root = kdir.join("lib/modules").join(release);
    let builtin: BTreeSet<String> = fs::read_to_string(root.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.rsplit('/').next().and_then(module_name))
        .collect();
    // Every shipped module by name.
    let mut index: HashMap<String, PathBuf> = HashMap::new();
    let mut stack = vec![root.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(module_name)
            {
                index.insert(name, path);
            }
        }
    }
    let mut wanted: Vec<String> = Vec::new();
    for m in REQUIRED_MODULES {
        let m = m.replace('-', "_");
        if index.contains_key(&m) {
            wanted.push(m);
        } else if !builtin.contains(&m) {
            bail!("kernel {release} has module {m} neither built in nor shipped");
        }
    }
    for m in OPTIONAL_MODULES {
        let m = m.replace('-', "_");
        if index.contains_key(&m) {
            wanted.push(m);
        }
    }
    // Whole directories too, for autoloading; only `wanted` load at boot.
    let mut shipped: Vec<String> = index
        .iter()
        .filter(|(_, p)| {
            MODULE_DIRS
                .iter()
                .any(|d| p.parent().is_some_and(|parent| parent.ends_with(d)))
        })
        .map(|(n, _)| n.clone())
        .collect();
    shipped.sort();
    // Dependency closure; load order is post-order.
    let mut modules: BTreeMap<String, Module> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    fn visit(
        name: &str,
        index: &HashMap<String, PathBuf>,
        builtin: &BTreeSet<String>,
        modules: &mut BTreeMap<String, Module>,
        order: &mut Vec<String>,
        loading: bool,
    ) -> Result<()> {
        if modules.contains_key(name) {
            if loading && !order.iter().any(|o| o == name) {
                let deps = modules[name].depends.clone();
                for d in &deps {
                    visit(d, index, builtin, modules, order, true)?;
                }
                order.push(name.to_string());
            }
            return Ok(());
        }
        let Some(path) = index.get(name) else {
            if builtin.contains(name) {
                return Ok(());
            }
            bail!("module {name} not found");
        };
        let module = read_module(path)?;
        let deps = module.depends.clone();
        modules.insert(name.to_string(), module);
        for d in &deps {
            visit(d, index, builtin, modules, order, loading)?;
        }
        if loading {
            order.push(name.to_string());
        }
        Ok(())
    }
    for m in &wanted {
        visit(m, &index, &builtin, &mut modules, &mut order, true)?;
    }
    for m in &shipped {
        visit(m, &index, &builtin, &mut modules, &mut order, false)?;
    }
    let dir = format!("/lib/modules/{release}");
    let mut dep = String::new();
    let mut alias = String::new();
    for (name, m) in &modules {
        dep.push_str(&format!("{name}.ko:"));
        for d in &m.depends {
            if modules.contains_key(d) {
                dep.push_str(&format!(" {d}.ko"));
            }
        }
        dep.push('\n');
        for a in &m.aliases {
            alias.push_str(&format!("alias {a} {name}\n"));
        }
    }
    for (name, m) in modules {
        img.bytes(&merged(&format!("{dir}/{name}.ko")), m.data, 0o644);
    }
    img.bytes(
        &merged(&format!("{dir}/modules.dep")),
        dep.into_bytes(),
        0o644,
    );
    img.bytes(
        &merged(&format!("{dir}/modules.alias")),
        alias.into_bytes(),
        0o644,
    );
    for f in ["modules.builtin", "modules.order"] {
        let p = root.join(f);
        if p.exists() {
            img.file(&merged(&format!("{dir}/{f}")), &p, 0o644);
        }
    }
    img.bytes(
        "/etc/modules.load",
        format!("{}\n", order.join("\n")).into_bytes(),
        0o644,
    );
    Ok(())
}

/// The test binaries and tcptrace (debug info stripped), as a second cpio.
fn write_payload(bins: &Binaries, strip_dir: &Path, out: &Path) -> Result<Binaries> {
    fs::create_dir_all(strip_dir)?;
    let stripped = |src: &Path, name: &str| -> Result<PathBuf> {
        let dst = strip_dir.join(name);
        let ok = Command::new("strip")
            .args(["--strip-debug", "-o"])
            .arg(&dst)
            .arg(src)
            .status()
            .is_ok_and(|s| s.success());
        Ok(if ok { dst } else { src.to_path_buf() })
    };
    let mut img = Image::default();
    img.dir("/usr/local/bin");
    img.dir("/t");
    img.dir("/etc");
    let snapshot = Binaries {
        tcptrace: stripped(&bins.tcptrace, "tcptrace")?,
        tests: bins
            .tests
            .iter()
            .map(|(name, exe)| Ok((name.clone(), stripped(exe, name)?)))
            .collect::<Result<_>>()?,
    };
    img.file(GUEST_TCPTRACE, &snapshot.tcptrace, 0o755);
    let mut list = String::new();
    for (name, exe) in &snapshot.tests {
        img.file(&format!("/t/{name}"), exe, 0o755);
        list.push_str(name);
        list.push('\n');
    }
    img.bytes("/etc/tests.list", list.into_bytes(), 0o644);
    // The same loader and libraries as the base image (host glibc).
    for exe in std::iter::once(&bins.tcptrace).chain(bins.tests.iter().map(|(_, p)| p)) {
        for lib in ldd(exe)? {
            img.host_file(&lib)?;
        }
    }
    img.write(out)?;
    Ok(snapshot)
}

// ------------------------------------------------------------------ results

fn parse_console(console: &str) -> KernelReport {
    let mut report = KernelReport {
        label: String::new(),
        release: String::new(),
        package: String::new(),
        accel: String::new(),
        prepare: Duration::ZERO,
        run: Duration::ZERO,
        suites: Vec::new(),
        probes: Vec::new(),
        selftest: Vec::new(),
        error: None,
    };
    let mut probes_json: Option<String> = None;
    let mut in_selftest = false;
    let mut current: Option<Suite> = None;
    for line in console.lines() {
        if let Some(json) = probes_json.as_mut() {
            if line.starts_with(MARK) {
                report.probes = parse_probes(json);
                probes_json = None;
            } else {
                json.push_str(line);
                json.push('\n');
                continue;
            }
        }
        if let Some(rest) = line.strip_prefix(MARK) {
            let (word, arg) = rest.split_once(' ').unwrap_or((rest, ""));
            match word {
                "selftest-begin" => in_selftest = true,
                "selftest-end" => in_selftest = false,
                "release" => report.release = arg.to_string(),
                "accel" => report.accel = arg.to_string(),
                "probes-begin" => probes_json = Some(String::new()),
                "suite-begin" => {
                    current = Some(Suite {
                        name: arg.to_string(),
                        passed: 0,
                        failed: 0,
                        ignored: 0,
                        failures: Vec::new(),
                        exit: None,
                    });
                }
                "suite-end" => {
                    if let Some(mut s) = current.take() {
                        s.exit = arg.rsplit(' ').next().and_then(|c| c.parse().ok());
                        report.suites.push(s);
                    }
                }
                _ => {}
            }
        } else if in_selftest {
            report.selftest.extend(parse_selftest_line(line));
        } else if let Some(s) = current.as_mut() {
            parse_test_line(s, line);
        }
    }
    if let Some(s) = current.take() {
        report.suites.push(s);
    }
    report
}

/// A `tcptrace selftest --format json` line; other console lines are not.
fn parse_selftest_line(line: &str) -> Option<SelftestCase> {
    let v: Value = serde_json::from_str(line.trim()).ok()?;
    let text = |k: &str| v[k].as_str().map(str::to_string);
    Some(SelftestCase {
        scenario: text("scenario")?,
        case: text("case")?,
        result: text("result")?,
    })
}

/// libtest lines: "test name ... FAILED" and "test result: ok. 3 passed; ...".
fn parse_test_line(suite: &mut Suite, line: &str) {
    if let Some(name) = line
        .strip_prefix("test ")
        .and_then(|l| l.strip_suffix(" ... FAILED"))
    {
        suite.failures.push(name.to_string());
    }
    if let Some(rest) = line.strip_prefix("test result: ") {
        for part in rest.split(['.', ';']) {
            let mut words = part.split_whitespace();
            if let (Some(n), Some(what)) = (words.next(), words.next())
                && let Ok(n) = n.parse::<u32>()
            {
                match what {
                    "passed" => suite.passed += n,
                    "failed" => suite.failed += n,
                    "ignored" => suite.ignored += n,
                    _ => {}
                }
            }
        }
    }
}

/// `tcptrace probes --format json`: an array of objects with at least
/// `hook`, `tier` and `status` (and `reason` when not attached).
fn parse_probes(json: &str) -> Vec<Probe> {
    let start = json.find('[').unwrap_or(0);
    let Ok(Value::Array(items)) = serde_json::from_str::<Value>(&json[start..]) else {
        return vec![Probe {
            hook: "(probes output)".into(),
            tier: "-".into(),
            state: format!(
                "unparsable: {}",
                json.trim().chars().take(200).collect::<String>()
            ),
        }];
    };
    let text = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    items
        .iter()
        .map(|p| {
            let status = text(&p["status"]);
            let reason = text(&p["reason"]);
            Probe {
                hook: text(&p["hook"]),
                tier: text(&p["tier"]),
                state: if reason.is_empty() {
                    status
                } else {
                    format!("{status}: {}", reason.replace('|', "/").replace('\n', " "))
                },
            }
        })
        .collect()
}

/// The same test binaries on the host's own kernel.
fn run_host(bins: &Binaries, timeout: u64) -> Result<KernelReport> {
    eprintln!("xtask: === host kernel ===");
    let t = Instant::now();
    let release = output_of("uname", &["-r"])
        .unwrap_or_default()
        .trim()
        .to_string();
    let mut console = String::new();
    let (_, probes) = run_bounded(
        Command::new(&bins.tcptrace).args(["probes", "--format", "json"]),
        Duration::from_secs(60),
        false,
    )?;
    console.push_str(&format!("{MARK}probes-begin\n{probes}{MARK}probes-end\n"));
    let (_, selftest) = run_bounded(
        Command::new(&bins.tcptrace).args(["selftest", "--format", "json"]),
        Duration::from_secs(timeout),
        false,
    )?;
    console.push_str(&format!(
        "{MARK}selftest-begin\n{selftest}{MARK}selftest-end\n"
    ));
    for (name, exe) in &bins.tests {
        let (code, out) = run_bounded(
            Command::new(exe)
                .arg("--test-threads=1")
                .env("TCPTRACE_BIN", &bins.tcptrace)
                .current_dir(workspace_root().join("tests")),
            Duration::from_secs(timeout),
            true,
        )?;
        let code = code.map_or("timeout".to_string(), |c| c.to_string());
        console.push_str(&format!(
            "{MARK}suite-begin {name}\n{out}{MARK}suite-end {name} {code}\n"
        ));
    }
    let mut report = parse_console(&console);
    report.label = "host".into();
    report.release = release;
    report.package = "(running kernel)".into();
    report.accel = "none".into();
    report.run = t.elapsed();
    Ok(report)
}

fn summary_table(reports: &[KernelReport]) -> String {
    let mut suites: Vec<&str> = reports
        .iter()
        .flat_map(|r| r.suites.iter().map(|s| s.name.as_str()))
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    suites.sort_unstable();
    let mut t = String::from("| kernel | release | package | accel | prepare | boot + tests |");
    for s in &suites {
        t.push_str(&format!(" {s} |"));
    }
    t.push_str(" selftest | result |\n|---|---|---|---|---|---|");
    t.push_str(&"---|".repeat(suites.len() + 2));
    t.push('\n');
    for r in reports {
        t.push_str(&format!(
            "| {} | {} | {} | {} | {:.0} s | {:.0} s |",
            r.label,
            r.release,
            r.package,
            r.accel,
            r.prepare.as_secs_f64(),
            r.run.as_secs_f64()
        ));
        for name in &suites {
            let cell = match r.suites.iter().find(|s| s.name == *name) {
                None => "-".to_string(),
                Some(s) => {
                    let mut c = format!("{} passed, {} failed", s.passed, s.failed);
                    if s.ignored > 0 {
                        c.push_str(&format!(", {} ignored", s.ignored));
                    }
                    if !s.failures.is_empty() {
                        c.push_str(&format!(" ({})", s.failures.join(", ")));
                    } else if s.exit != Some(0) {
                        c.push_str(&format!(" (exit {:?})", s.exit));
                    }
                    c
                }
            };
            t.push_str(&format!(" {cell} |"));
        }
        t.push_str(&format!(" {} | {} |\n", r.selftest_summary(), r.result()));
    }
    t
}

fn matrix_table(reports: &[KernelReport]) -> String {
    let mut t = String::from(
        "| kernel | hook | tier | state | selftest | tests |\n|---|---|---|---|---|---|\n",
    );
    for r in reports {
        let result = if r.ok() { "pass" } else { "FAIL" };
        let selftest = r.selftest_summary();
        if r.probes.is_empty() {
            t.push_str(&format!(
                "| {} | (no probe report) | - | - | {selftest} | {result} |\n",
                r.release
            ));
        }
        for p in &r.probes {
            t.push_str(&format!(
                "| {} | {} | {} | {} | {selftest} | {result} |\n",
                r.release, p.hook, p.tier, p.state
            ));
        }
    }
    t
}

/// Every selftest case on every kernel.
fn selftest_table(reports: &[KernelReport]) -> String {
    let mut t = String::from("| scenario | case |");
    for r in reports {
        t.push_str(&format!(" {} |", r.label));
    }
    t.push_str("\n|---|---|");
    t.push_str(&"---|".repeat(reports.len()));
    t.push('\n');
    let mut cases: Vec<(&str, &str)> = Vec::new();
    for c in reports.iter().flat_map(|r| &r.selftest) {
        if !cases.contains(&(c.scenario.as_str(), c.case.as_str())) {
            cases.push((&c.scenario, &c.case));
        }
    }
    for (scenario, case) in cases {
        t.push_str(&format!("| {scenario} | {case} |"));
        for r in reports {
            let got = r
                .selftest
                .iter()
                .find(|c| c.scenario == scenario && c.case == case)
                .map_or("-", |c| c.result.as_str());
            t.push_str(&format!(" {got} |"));
        }
        t.push('\n');
    }
    t
}

fn render_doc(summary: &str, selftest: &str, matrix: &str) -> String {
    let date = output_of("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    let commit = output_of(
        "git",
        &[
            "-C",
            &workspace_root().to_string_lossy(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    )
    .unwrap_or_default();
    let dirty = output_of(
        "git",
        &[
            "-C",
            &workspace_root().to_string_lossy(),
            "status",
            "--porcelain",
        ],
    )
    .is_some_and(|s| !s.trim().is_empty());
    format!(
        "# Kernel matrix\n\n\
         Generated by `cargo xtask vm-test --kernel all` on {} from commit {}{}; do not edit by hand.\n\n\
         Each Debian kernel boots in qemu (no network device, loopback only) from a\n\
         minimal initramfs and runs the same tcptrace and integration-test binaries\n\
         (`--test-threads=1`, in the VMs with `--include-ignored`: the `vm` suite\n\
         proves the direct tier and changes global settings, so it runs only there)\n\
         and `tcptrace selftest`; the host row runs them on the build machine's kernel.\n\
         `prepare` is download + image build (cached after the first run).\n\n\
         ## Test suites\n\n{summary}\n\
         ## Selftest (`tcptrace selftest --format json`)\n\n{selftest}\n\
         ## Hooks (`tcptrace probes --format json`)\n\n{matrix}",
        date.trim(),
        commit.trim(),
        if dirty {
            " (with uncommitted changes)"
        } else {
            ""
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libtest_summary_is_counted() {
        let mut s = Suite {
            name: "capture".into(),
            passed: 0,
            failed: 0,
            ignored: 0,
            failures: Vec::new(),
            exit: None,
        };
        parse_test_line(&mut s, "test a::b ... FAILED");
        parse_test_line(
            &mut s,
            "test result: FAILED. 6 passed; 1 failed; 2 ignored; 0 measured; 0 filtered out; finished in 9.01s",
        );
        assert_eq!((s.passed, s.failed, s.ignored), (6, 1, 2));
        assert_eq!(s.failures, ["a::b"]);
    }

    #[test]
    fn console_markers_are_parsed() {
        let console = "noise\n@@vm release 6.1.0-56-cloud-amd64\n@@vm probes-begin\n[{\"hook\":\"h\",\"tier\":\"kprobe\",\"status\":\"unavailable\",\"reason\":\"no\"}]\n@@vm probes-end 0\n@@vm selftest-begin\n{\"scenario\":\"syn_timeout\",\"case\":\"dropped\",\"expected\":\"syn_timeout\",\"got\":\"syn_timeout\",\"result\":\"pass\",\"seconds\":1.8}\nnot json\n{\"scenario\":\"syn_timeout\",\"case\":\"control\",\"result\":\"FAIL\"}\n@@vm selftest-end 1\n@@vm suite-begin capture\ntest result: ok. 7 passed; 0 failed; 0 ignored\n@@vm suite-end capture 0\n@@vm done\n";
        let r = parse_console(console);
        assert_eq!(r.release, "6.1.0-56-cloud-amd64");
        assert_eq!(r.probes.len(), 1);
        assert_eq!(r.probes[0].state, "unavailable: no");
        assert_eq!(r.suites[0].passed, 7);
        assert_eq!(r.suites[0].exit, Some(0));
        assert_eq!(r.selftest.len(), 2);
        assert_eq!(
            r.selftest_summary(),
            "1 of 2 cases pass (syn_timeout/control: FAIL)"
        );
        assert!(!r.ok(), "a failed selftest case fails the kernel");
    }

    #[test]
    fn cpio_records_are_aligned() {
        let mut buf = Vec::new();
        cpio_entry(&mut buf, 1, "init", 0o100_755, 0, 0, Some(b"abc")).unwrap();
        assert_eq!(buf.len() % 4, 0);
        assert!(buf.starts_with(b"070701"));
    }
}
