//! `cargo xtask setup`: installs what the build and the tests need and
//! reports what the machine has that a run relies on. Idempotent; a fresh
//! machine (no packages, nothing mounted) ends up ready.
use std::{fs, path::Path, process::Command};

use anyhow::Result;

use crate::{apt, cargo, is_root, output_of, step, workspace_root};

/// Debian's rustc-web ships a precompiled `core` for bpfel-unknown-none
/// (no nightly, no build-std).
const RUST_WEB_VERSION: &str = "1.96.0+dfsg1-1~deb12u2";
const PINNED: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "rust-web-clippy",
];
/// Packages the build and the tests need (the pinned ones first).
const PACKAGES: &[&str] = &[
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "rust-web-clippy",
    "llvm-22-dev",
    "libpolly-22-dev",
    "zlib1g-dev",
    "libzstd-dev",
    "bpftool",
    "iptables",
    "nftables",
    "iproute2",
    "conntrack",
    "ipvsadm",
    "ipset",
    "util-linux",
    "tmux",
    "python3",
    "qemu-system-x86",
    "nginx-light",
    "redis-server",
    "redis-tools",
    "wrk",
    "curl",
    // The kernel's own network selftests: built with gcc, run with these.
    "gcc",
    "make",
    "netcat-openbsd",
    "iperf3",
    "socat",
    "iputils-ping",
    "xz-utils",
    // kind-shaped clusters and the agent image, on a real Docker engine.
    "docker.io",
    "debootstrap",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Debian's rustc, registered with rustup; aya-build runs it by this name.
pub const BPF_TOOLCHAIN: &str = "debian-rust";

/// One line of the report: what was looked at, what was found, what was
/// done about it.
struct Finding {
    what: &'static str,
    found: String,
    did: String,
}

fn toolchain_linked() -> bool {
    output_of("rustup", &["toolchain", "list"])
        .is_some_and(|s| s.lines().any(|l| l.starts_with(BPF_TOOLCHAIN)))
}

fn bpf_linker_ok() -> bool {
    output_of("bpf-linker", &["--version"]).is_some_and(|s| s.contains(BPF_LINKER_VERSION))
}

/// Whether the build tools are all in place (checked before every task).
pub fn complete() -> bool {
    apt::missing(PACKAGES).is_empty() && toolchain_linked() && bpf_linker_ok()
}

/// Sets up only when something is missing, then says what it did.
pub fn ensure() -> Result<()> {
    if complete() { Ok(()) } else { setup() }
}

pub fn setup() -> Result<()> {
    let mut report = Vec::new();
    install_tools(&mut report)?;
    inspect_machine(&mut report);
    print(&report);
    Ok(())
}

fn install_tools(report: &mut Vec<Finding>) -> Result<()> {
    let missing = apt::missing(PACKAGES);
    let specs: Vec<String> = missing
        .iter()
        .map(|p| {
            if PINNED.contains(p) {
                format!("{p}={RUST_WEB_VERSION}")
            } else {
                (*p).to_string()
            }
        })
        .collect();
    apt::install(&specs.iter().map(String::as_str).collect::<Vec<_>>())?;
    report.push(Finding {
        what: "Debian packages",
        found: format!(
            "{} of {} installed",
            PACKAGES.len() - missing.len(),
            PACKAGES.len()
        ),
        did: if missing.is_empty() {
            "nothing".into()
        } else {
            format!("installed {}", missing.join(" "))
        },
    });

    let linked = toolchain_linked();
    if !linked {
        step(
            "rustup toolchain link",
            Command::new("rustup").args(["toolchain", "link", BPF_TOOLCHAIN, "/usr"]),
        )?;
    }
    report.push(Finding {
        what: "BPF toolchain",
        found: format!(
            "rustc {} ({BPF_TOOLCHAIN}) {}",
            apt::version("rustc-web").unwrap_or_default(),
            if linked { "linked" } else { "not linked" }
        ),
        did: if linked {
            "nothing".into()
        } else {
            format!("rustup toolchain link {BPF_TOOLCHAIN} /usr")
        },
    });

    let linker = bpf_linker_ok();
    if !linker {
        // Debian's /usr/bin/llvm-config is LLVM 14; bpf-linker needs 22.
        step(
            "cargo install bpf-linker",
            cargo()
                .env("LLVM_PREFIX", "/usr/lib/llvm-22")
                .args(["install", "bpf-linker", "--version", BPF_LINKER_VERSION])
                .args(["--locked", "--no-default-features", "--features", "llvm-22"]),
        )?;
    }
    report.push(Finding {
        what: "bpf-linker",
        found: if linker {
            format!("{BPF_LINKER_VERSION} present")
        } else {
            "missing".into()
        },
        did: if linker {
            "nothing".into()
        } else {
            format!("cargo install bpf-linker {BPF_LINKER_VERSION} (LLVM 22)")
        },
    });
    Ok(())
}

/// What the kernel and the machine offer that runs rely on.
fn inspect_machine(report: &mut Vec<Finding>) {
    let btf = Path::new("/sys/kernel/btf/vmlinux");
    report.push(Finding {
        what: "kernel BTF",
        found: fs::metadata(btf).map_or_else(
            |_| "missing: tcptrace needs CONFIG_DEBUG_INFO_BTF".into(),
            |m| format!("{} ({} KiB)", btf.display(), m.len() / 1024),
        ),
        did: "nothing (required)".into(),
    });
    let tracefs = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"]
        .into_iter()
        .find(|p| Path::new(p).join("events").is_dir());
    report.push(Finding {
        what: "tracefs",
        found: tracefs.map_or_else(|| "not mounted".into(), |p| format!("mounted at {p}")),
        did: "nothing: tcptrace mounts it at start when missing (only its bind() hooks need it); \
              the tests and benchmarks run in private mount namespaces"
            .into(),
    });
    report.push(Finding {
        what: "bpffs",
        found: if mounted_fs("bpf") {
            "mounted".into()
        } else {
            "not mounted".into()
        },
        did: "nothing: tcptrace pins no BPF object".into(),
    });
    report.push(Finding {
        what: "cgroups",
        found: cgroup_layout(),
        did: "nothing: pods are named from /proc/<pid>/cgroup in both layouts".into(),
    });
    report.push(conntrack_module());
    report.push(Finding {
        what: "kernel.kptr_restrict",
        found: fs::read_to_string("/proc/sys/kernel/kptr_restrict")
            .map_or_else(|_| "unknown".into(), |v| v.trim().to_string()),
        did: "nothing: drop locations are named from /proc/kallsyms (root sees them below 2)"
            .into(),
    });
    report.push(Finding {
        what: "VM kernels",
        found: vm_cache(),
        did: "nothing: `cargo xtask vm-test` downloads Debian's kernels into target/vm once".into(),
    });
}

fn mounted_fs(fstype: &str) -> bool {
    fs::read_to_string("/proc/self/mounts").is_ok_and(|m| {
        m.lines()
            .any(|l| l.split_whitespace().nth(2) == Some(fstype))
    })
}

fn cgroup_layout() -> String {
    if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
        "v2 (unified at /sys/fs/cgroup)".into()
    } else if Path::new("/sys/fs/cgroup/unified/cgroup.controllers").exists() {
        "v1 hybrid (unified hierarchy at /sys/fs/cgroup/unified)".into()
    } else {
        "v1 only (no unified hierarchy: BPF cgroup ids are all the root's)".into()
    }
}

/// conntrack's counters and sysctls exist only once nf_conntrack is in
/// the kernel: built in, or loaded here when it is a module.
fn conntrack_module() -> Finding {
    let what = "nf_conntrack";
    if Path::new("/sys/module/nf_conntrack").exists()
        && !Path::new("/sys/module/nf_conntrack/refcnt").exists()
    {
        return Finding {
            what,
            found: "built into the kernel".into(),
            did: "nothing".into(),
        };
    }
    if Path::new("/sys/module/nf_conntrack/refcnt").exists() {
        return Finding {
            what,
            found: "module loaded".into(),
            did: "nothing".into(),
        };
    }
    let did = if !is_root() {
        "nothing (not root)".into()
    } else {
        match Command::new("modprobe").arg("nf_conntrack").status() {
            Ok(s) if s.success() => "modprobe nf_conntrack".into(),
            Ok(s) => format!("modprobe nf_conntrack failed ({s})"),
            Err(e) => format!("modprobe not available ({e})"),
        }
    };
    Finding {
        what,
        found: "not in the kernel".into(),
        did,
    }
}

fn vm_cache() -> String {
    let dir = workspace_root().join("target/vm/kernels");
    let kernels: Vec<String> = fs::read_dir(&dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with("linux-image-"))
                .collect()
        })
        .unwrap_or_default();
    if kernels.is_empty() {
        format!("none cached in {}", dir.display())
    } else {
        kernels.join(", ")
    }
}

fn print(report: &[Finding]) {
    let width = report.iter().map(|f| f.what.len()).max().unwrap_or(0);
    eprintln!("xtask: setup found and did:");
    for f in report {
        eprintln!("  {:width$}  {}; {}", f.what, f.found, f.did);
    }
}
