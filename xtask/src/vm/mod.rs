//! `cargo xtask vm-test`: boots Debian's distribution kernels in qemu with a
//! minimal initramfs, runs the root integration tests inside, and writes the
//! kernel x hook x tier matrix to docs/kernel-matrix.md.
//!
//! Everything downloaded or built is cached under target/vm/: the kernel
//! packages (unpacked), and per kernel the base image (busybox, the test
//! tools and their libraries, kernel modules). The test binaries go into a
//! second cpio archive built on every run and appended to the base one (the
//! kernel unpacks concatenated archives in order).
//!
//! - `kernels`: the kernel packages, their download cache, the KVM probe;
//! - `image`: the initramfs images (base and test payload);
//! - `modules`: which kernel modules go into the base image;
//! - `console`: what the guest reported on its console;
//! - `report`: the tables and docs/kernel-matrix.md.
use std::{
    fs::{self, File},
    io::{self, BufRead as _, BufReader, BufWriter, Write as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::Value;

use super::{cargo, output_of, workspace_root};
use console::KernelReport;
use kernels::{KERNELS, KernelSpec};

mod console;
pub(crate) mod image;
mod kernels;
mod modules;
mod report;

pub(crate) use kernels::fetch_busybox;

/// Marker the guest prints before its reports; the rest is console noise.
const MARK: &str = "@@vm ";
const DOC: &str = "docs/kernel-matrix.md";

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
    let bins = image::write_payload(&bins, &vm_dir.join("stripped"), &payload)?;
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
                package: spec.meta.into(),
                error: Some(format!("{e:#}")),
                ..KernelReport::default()
            },
        };
        reports.push(report);
    }
    if args.kernel == KernelChoice::All {
        reports.push(run_host(&bins, args.timeout)?);
    }
    let _ = fs::remove_file(&payload);

    let summary = report::summary_table(&reports);
    let matrix = report::matrix_table(&reports);
    let selftest = report::selftest_table(&reports);
    eprintln!("\n{summary}\n{selftest}\n{matrix}");
    if args.kernel == KernelChoice::All {
        let doc = workspace_root().join(DOC);
        if let Some(dir) = doc.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        fs::write(&doc, report::render_doc(&summary, &selftest, &matrix))
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

/// Suites that need what only the host has: its Docker engine (kind, the
/// agent image) or the kernel selftests prepared by `cargo xtask test`.
const HOST_ONLY_SUITES: [&str; 3] = ["daemonset", "kind", "kselftest"];

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
    tests.retain(|(name, _)| !HOST_ONLY_SUITES.contains(&name.as_str()));
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

fn run_kernel(
    spec: &KernelSpec,
    vm_dir: &Path,
    busybox: &Path,
    payload: &Path,
    args: &VmTestArgs,
) -> Result<KernelReport> {
    eprintln!("xtask: === kernel {} ===", spec.label);
    let t = Instant::now();
    let kernel = kernels::fetch(spec, vm_dir)?;
    let release = &kernel.release;
    let base = image::cached_base(&kernel, vm_dir, busybox, args.rebuild)?;
    // Base + payload in one file: the kernel unpacks both archives.
    let initrd = vm_dir.join(format!("initrd-{release}.cpio"));
    {
        let mut out = BufWriter::new(File::create(&initrd)?);
        io::copy(&mut File::open(&base)?, &mut out)?;
        io::copy(&mut File::open(payload)?, &mut out)?;
        out.flush()?;
    }
    let prepare = t.elapsed();

    let t = Instant::now();
    let kvm = kernels::kvm_works(args.accel, &kernel.vmlinuz, vm_dir)?;
    let mut qemu = Command::new("qemu-system-x86_64");
    if kvm {
        qemu.args(["-machine", "q35,accel=kvm", "-cpu", "host"]);
    } else {
        qemu.args(["-machine", "q35,accel=tcg", "-cpu", "max"]);
    }
    qemu.args(["-smp", "2", "-m", "4096"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&initrd)
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
    let _ = fs::remove_file(&initrd);
    let (code, console) = result?;
    let run = t.elapsed();
    let mut report = console::parse_console(&console);
    report.label = spec.label.into();
    report.package = kernel.package;
    report.prepare = prepare;
    report.run = run;
    if report.release.is_empty() {
        report.release = kernel.release;
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
    let mut report = console::parse_console(&console);
    report.label = "host".into();
    report.release = release;
    report.package = "(running kernel)".into();
    report.accel = "none".into();
    report.run = t.elapsed();
    Ok(report)
}
