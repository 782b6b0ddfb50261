//! The kernel's own network selftests, from Debian's `linux-source-6.1`:
//! fetched once (cached under target/kselftest), the needed directories
//! unpacked, the C programs built with gcc. The `kselftest` suite of the
//! root tests runs them, unmodified, under the tcptrace binary.
use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::target_dir;

/// Debian 12's kernel source package.
const PACKAGE: &str = "linux-source-6.1";
/// What the suite needs from the tree: the two test directories and the
/// kselftest harness they include.
const WANTED: &[&str] = &[
    "tools/testing/selftests/net/*",
    "tools/testing/selftests/netfilter/*",
    "tools/testing/selftests/kselftest*",
    "tools/testing/selftests/lib.mk",
];
/// The C programs the selected tests run, by directory.
const PROGRAMS: &[(&str, &str)] = &[
    ("net", "reuseaddr_ports_exhausted"),
    ("net", "reuseaddr_conflict"),
];

/// Where the suite finds the selftests, or why it cannot.
pub enum Selftests {
    Ready(PathBuf),
    Unavailable(String),
}

impl Selftests {
    /// The value of TCPTRACE_KSELFTESTS for the test suite.
    pub fn env_value(&self) -> String {
        match self {
            Selftests::Ready(dir) => dir.display().to_string(),
            Selftests::Unavailable(why) => format!("unavailable: {why}"),
        }
    }
}

/// The built `tools/testing/selftests` directory. Only fetching may fail
/// softly (no network, no such package), and only outside CI: under CI
/// (`CI=true`) a suite that cannot run fails the run. Unpacking and
/// building must work.
pub fn prepare() -> Result<Selftests> {
    let cache = target_dir().join("kselftest");
    fs::create_dir_all(&cache).with_context(|| format!("creating {}", cache.display()))?;
    let deb = match cached_deb(&cache)? {
        Some(deb) => deb,
        None => match download(&cache) {
            Ok(deb) => deb,
            Err(e) if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => {
                bail!("cannot fetch {PACKAGE}, and under CI the kernel selftests must run: {e:#}")
            }
            Err(e) => {
                eprintln!(
                    "xtask: cannot fetch {PACKAGE}: the kernel selftests will be skipped ({e:#})"
                );
                return Ok(Selftests::Unavailable(format!("{e:#}")));
            }
        },
    };
    let version = deb
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("unknown")
        .to_string();
    let tree = cache.join(&version);
    let selftests = tree.join(format!("{PACKAGE}/tools/testing/selftests"));
    if !selftests.join("net/Makefile").is_file() {
        unpack(&deb, &tree)?;
    }
    for (dir, program) in PROGRAMS {
        let dir = selftests.join(dir);
        if !dir.join(program).is_file() {
            build(&dir, program)?;
        }
    }
    eprintln!("xtask: kernel selftests ready in {}", selftests.display());
    Ok(Selftests::Ready(selftests))
}

fn cached_deb(cache: &Path) -> Result<Option<PathBuf>> {
    let mut debs: Vec<PathBuf> = fs::read_dir(cache)
        .with_context(|| format!("reading {}", cache.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(PACKAGE) && n.ends_with(".deb"))
        })
        .collect();
    debs.sort();
    Ok(debs.pop())
}

fn download(cache: &Path) -> Result<PathBuf> {
    eprintln!("xtask: apt-get download {PACKAGE} (about 140 MB, cached)");
    let out = Command::new("apt-get")
        .args(["download", PACKAGE])
        .current_dir(cache)
        .stdin(Stdio::null())
        .output()
        .context("running apt-get download")?;
    if !out.status.success() {
        bail!(
            "apt-get download {PACKAGE} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    cached_deb(cache)?.with_context(|| format!("apt-get download left no {PACKAGE} package"))
}

/// The package holds the tree as one .tar.xz: only the wanted directories
/// are taken out of it (about 10 s).
fn unpack(deb: &Path, tree: &Path) -> Result<()> {
    let _ = fs::remove_dir_all(tree);
    fs::create_dir_all(tree).with_context(|| format!("creating {}", tree.display()))?;
    let inner = format!("*/usr/src/{PACKAGE}.tar.xz");
    let shell = format!(
        "dpkg-deb --fsys-tarfile \"$0\" | tar -xO --wildcards \"$1\" | tar -xJ --wildcards {}",
        WANTED
            .iter()
            .map(|w| format!("'{PACKAGE}/{w}'"))
            .collect::<Vec<_>>()
            .join(" ")
    );
    let status = Command::new("sh")
        .args(["-c", &shell])
        .arg(deb)
        .arg(&inner)
        .current_dir(tree)
        .status()
        .context("unpacking the selftests")?;
    if !status.success() {
        let _ = fs::remove_dir_all(tree);
        bail!(
            "unpacking the selftests from {} failed ({status})",
            deb.display()
        );
    }
    Ok(())
}

fn build(dir: &Path, program: &str) -> Result<()> {
    let out = Command::new("make")
        .arg(program)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running make")?;
    if !out.status.success() {
        bail!(
            "building {program} in {} failed ({}): {}",
            dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
