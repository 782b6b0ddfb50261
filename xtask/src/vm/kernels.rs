//! Debian's kernel packages (downloaded and unpacked once under target/vm)
//! and whether qemu can use KVM to boot them.
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};

use super::{Accel, run_bounded};
use crate::{output_of, step};

/// A Debian kernel flavour, resolved through its meta-package.
pub(super) struct KernelSpec {
    pub(super) label: &'static str,
    pub(super) meta: &'static str,
}

pub(super) const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        label: "6.1",
        meta: "linux-image-cloud-amd64",
    },
    KernelSpec {
        label: "6.12",
        meta: "linux-image-6.12-cloud-amd64",
    },
];

/// An unpacked kernel package.
pub(super) struct Kernel {
    /// The concrete package, e.g. linux-image-6.1.0-56-cloud-amd64-unsigned.
    pub(super) package: String,
    /// Where it is unpacked.
    pub(super) dir: PathBuf,
    /// `uname -r` of the kernel.
    pub(super) release: String,
    pub(super) vmlinuz: PathBuf,
}

/// Resolves, downloads and unpacks the kernel of `spec` (cached).
pub(super) fn fetch(spec: &KernelSpec, vm_dir: &Path) -> Result<Kernel> {
    let package = resolve_kernel_package(spec.meta)?;
    let dir = vm_dir.join("kernels").join(&package);
    fetch_unpacked(&package, &dir)?;
    let release = kernel_release(&dir)?;
    let vmlinuz = dir.join(format!("boot/vmlinuz-{release}"));
    Ok(Kernel {
        package,
        dir,
        release,
        vmlinuz,
    })
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

pub(crate) fn fetch_busybox(vm_dir: &Path) -> Result<PathBuf> {
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

fn kernel_release(kdir: &Path) -> Result<String> {
    let boot = kdir.join("boot");
    fs::read_dir(&boot)
        .with_context(|| format!("reading {}", boot.display()))?
        .filter_map(std::result::Result::ok)
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .find_map(|n| n.strip_prefix("vmlinuz-").map(str::to_string))
        .ok_or_else(|| anyhow!("no vmlinuz in {}", boot.display()))
}

/// Whether to use KVM. /dev/kvm can accept KVM_CREATE_VM and still never
/// run a guest kernel (nested virtualization): `auto` boots the kernel
/// without an initrd once and wants its banner within 15 s. The answer is
/// cached per host kernel.
pub(super) fn kvm_works(accel: Accel, vmlinuz: &Path, vm_dir: &Path) -> Result<bool> {
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
