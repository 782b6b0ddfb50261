//! Debian packages: installed, downloaded and queried in one place. A fresh
//! machine may have no package lists, and installing a server must not
//! start it (nginx, redis, dockerd would listen or rewrite the firewall in
//! the root namespace).
use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, anyhow, bail};

use crate::{is_root, output_of, step};

/// Whether `package` is installed.
pub fn installed(package: &str) -> bool {
    output_of("dpkg-query", &["-W", "-f=${Status}", package])
        .is_some_and(|s| s.contains("install ok installed"))
}

/// The installed version of `package`.
pub fn version(package: &str) -> Option<String> {
    output_of("dpkg-query", &["-W", "-f=${Version}", package])
}

/// Which of `packages` (names, optionally `name=version`) are missing.
pub fn missing<'a>(packages: &[&'a str]) -> Vec<&'a str> {
    packages
        .iter()
        .copied()
        .filter(|p| !installed(p.split('=').next().unwrap_or(p)))
        .collect()
}

/// Installs `packages` (root), fetching the package lists first when the
/// machine has none or the install fails for want of them. Services the
/// packages bring are not started.
pub fn install(packages: &[&str]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "installing {} needs root: rerun as root",
            packages.join(" ")
        );
    }
    if output_of("apt-get", &["--version"]).is_none() {
        bail!(
            "apt-get not found: install {} with your package manager (Debian 12 names)",
            packages.join(" ")
        );
    }
    if !has_lists() {
        update()?;
    }
    let _no_services = NoServiceStarts::new()?;
    let attempt = || {
        step(
            &format!("apt-get install {}", packages.join(" ")),
            Command::new("apt-get")
                .env("DEBIAN_FRONTEND", "noninteractive")
                .args(["install", "-y", "-q", "--no-install-recommends"])
                .args(packages),
        )
    };
    if attempt().is_err() {
        // Stale lists name versions the mirror no longer has.
        update()?;
        attempt()?;
    }
    Ok(())
}

pub fn update() -> Result<()> {
    step(
        "apt-get update",
        Command::new("apt-get").args(["update", "-q"]),
    )
}

/// Whether apt has package lists (a fresh machine may have none).
fn has_lists() -> bool {
    fs::read_dir("/var/lib/apt/lists").is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().contains("_Packages"))
    })
}

/// `apt-get download` into `dir`; returns the .deb.
pub fn download(package: &str, dir: &Path) -> Result<PathBuf> {
    fs::create_dir_all(dir)?;
    let attempt = || {
        Command::new("apt-get")
            .current_dir(dir)
            .args(["-q", "-o", "APT::Sandbox::User=root", "download", package])
            .output()
    };
    let mut out = attempt().context("starting apt-get download")?;
    if !out.status.success() && is_root() {
        update()?;
        out = attempt().context("starting apt-get download")?;
    }
    if !out.status.success() {
        bail!(
            "apt-get download {package} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let prefix = format!("{package}_");
    fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .ok_or_else(|| {
            anyhow!(
                "apt-get download {package} left no .deb in {}",
                dir.display()
            )
        })
}

/// `apt-cache depends` of `package`, fetching the lists when apt knows
/// nothing of it yet.
pub fn depends(package: &str) -> Result<String> {
    let query = || output_of("apt-cache", &["depends", "--no-recommends", package]);
    let mut text = query().unwrap_or_default();
    if !text.contains("Depends:") && is_root() {
        update()?;
        text = query().unwrap_or_default();
    }
    Ok(text)
}

/// Debian's way to keep maintainer scripts from starting services: a
/// policy-rc.d that refuses, in place while packages are installed.
struct NoServiceStarts(Option<PathBuf>);

const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";

impl NoServiceStarts {
    fn new() -> Result<Self> {
        let path = PathBuf::from(POLICY_RC_D);
        if path.exists() {
            // The machine has its own policy; leave it.
            return Ok(Self(None));
        }
        fs::write(
            &path,
            "#!/bin/sh\n# tcptrace xtask: no service starts while installing\nexit 101\n",
        )
        .with_context(|| format!("writing {POLICY_RC_D}"))?;
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .with_context(|| format!("making {POLICY_RC_D} executable"))?;
        Ok(Self(Some(path)))
    }
}

impl Drop for NoServiceStarts {
    fn drop(&mut self) {
        if let Some(path) = &self.0 {
            let _ = fs::remove_file(path);
        }
    }
}
