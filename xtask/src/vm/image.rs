//! The initramfs: a tree of nodes written as a newc cpio archive. The base
//! image of a kernel (busybox, host tools and their libraries, Python,
//! kernel modules, /init) is cached under target/vm; the test payload is
//! built on every run.
use std::{
    borrow::Cow,
    collections::BTreeMap,
    fs::{self, File},
    hash::{DefaultHasher, Hash as _, Hasher as _},
    io::{self, BufWriter, Write as _},
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use cpio::{NewcBuilder, newc::ModeFileType};

use super::{
    Binaries,
    kernels::Kernel,
    modules::{self, MODULE_DIRS, OPTIONAL_MODULES, REQUIRED_MODULES},
};

/// Bump when the base image's layout or contents change.
const IMAGE_VERSION: u32 = 3;
const GUEST_TCPTRACE: &str = "/usr/local/bin/tcptrace";
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
    // kube-proxy's IPVS mode, as its tools see it.
    "/usr/sbin/ipvsadm",
    "/usr/sbin/ipset",
    "/usr/sbin/sysctl",
    "/usr/bin/setpriv",
    "/usr/bin/python3",
    "/usr/bin/bash",
    // The lab's real servers and clients.
    "/usr/sbin/nginx",
    "/usr/bin/redis-server",
    "/usr/bin/redis-cli",
    "/usr/bin/redis-benchmark",
    "/usr/bin/wrk",
    "/usr/bin/curl",
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

/// The base image of `kernel`, rebuilt when asked or when what goes into it
/// changed.
pub(super) fn cached_base(
    kernel: &Kernel,
    vm_dir: &Path,
    busybox: &Path,
    rebuild: bool,
) -> Result<PathBuf> {
    let release = &kernel.release;
    let base = vm_dir.join(format!("base-{release}.cpio"));
    let fingerprint = fingerprint(busybox);
    let stamp = base.with_extension("stamp");
    let fresh = fs::read_to_string(&stamp).is_ok_and(|s| s == fingerprint);
    if rebuild || !fresh || !base.exists() {
        let t = Instant::now();
        write_base(&kernel.dir, release, busybox, &base)?;
        fs::write(&stamp, &fingerprint)?;
        eprintln!(
            "xtask: base image for {release} built in {:.1} s",
            t.elapsed().as_secs_f64()
        );
    }
    Ok(base)
}

/// What the base image is made of: it is rebuilt when this changes.
pub(crate) fn fingerprint(busybox: &Path) -> String {
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

/// Tools, libraries, busybox and modules of one kernel.
fn write_base(kdir: &Path, release: &str, busybox: &Path, out: &Path) -> Result<()> {
    let mut img = userland(busybox)?;
    img.bytes("/init", INIT.as_bytes().to_vec(), 0o755);
    modules::add_modules(&mut img, kdir, release)?;
    img.write(out)
}

/// What the VM and the kind-shaped nodes run on: the host's network tools,
/// their libraries, Python, and busybox for every other command.
pub(crate) fn userland(busybox: &Path) -> Result<Image> {
    let mut img = Image::with_layout();
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
    Ok(img)
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

/// The test binaries and tcptrace (debug info stripped), as a second cpio.
pub(super) fn write_payload(bins: &Binaries, strip_dir: &Path, out: &Path) -> Result<Binaries> {
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

/// An initramfs tree, written as a newc cpio archive (or as a directory,
/// for `docker import`).
#[derive(Default)]
pub(crate) struct Image {
    nodes: BTreeMap<String, Node>,
}

/// Debian merged /usr: /lib, /bin... are symlinks to /usr/...
pub(super) fn merged(path: &str) -> String {
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

    pub(crate) fn bytes(&mut self, path: &str, data: Vec<u8>, mode: u32) {
        self.parent(path);
        self.nodes.insert(
            Self::key(path),
            Node::File {
                data: Data::Bytes(data),
                mode,
            },
        );
    }

    pub(super) fn file(&mut self, path: &str, host: &Path, mode: u32) {
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
        let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
        self.archive(BufWriter::new(file))?.flush()?;
        Ok(())
    }

    /// The tree under directory `root` (device nodes left to the runtime).
    pub(crate) fn write_dir(&self, root: &Path) -> Result<()> {
        use std::os::unix::fs::{PermissionsExt as _, symlink};
        for (name, node) in &self.nodes {
            let path = root.join(name);
            match node {
                Node::Dir => fs::create_dir_all(&path)?,
                Node::Symlink(target) => symlink(target, &path)?,
                Node::CharDev(..) => {}
                Node::File { data, mode } => {
                    match data {
                        Data::Bytes(b) => fs::write(&path, b)?,
                        Data::Host(p) => {
                            fs::copy(p, &path)
                                .with_context(|| format!("copying {}", p.display()))?;
                        }
                    }
                    fs::set_permissions(&path, fs::Permissions::from_mode(*mode))?;
                }
            }
        }
        Ok(())
    }

    /// The newc archive: every node in path order (parents first), owned by
    /// root, then the trailer.
    fn archive<W: io::Write>(&self, mut w: W) -> Result<W> {
        for (ino, (name, node)) in (2..).zip(&self.nodes) {
            let entry = NewcBuilder::new(name).ino(ino);
            let (entry, data): (_, Cow<'_, [u8]>) = match node {
                Node::Dir => (
                    entry
                        .mode(0o755)
                        .set_mode_file_type(ModeFileType::Directory)
                        .nlink(2),
                    Cow::Borrowed(&[]),
                ),
                Node::Symlink(target) => (
                    entry.mode(0o777).set_mode_file_type(ModeFileType::Symlink),
                    Cow::Borrowed(target.as_bytes()),
                ),
                Node::CharDev(major, minor) => (
                    entry
                        .mode(0o600)
                        .set_mode_file_type(ModeFileType::Char)
                        .rdev_major(*major)
                        .rdev_minor(*minor),
                    Cow::Borrowed(&[]),
                ),
                Node::File { data, mode } => (
                    entry.mode(*mode).set_mode_file_type(ModeFileType::Regular),
                    match data {
                        Data::Bytes(b) => Cow::Borrowed(b.as_slice()),
                        Data::Host(p) => Cow::Owned(
                            fs::read(p).with_context(|| format!("reading {}", p.display()))?,
                        ),
                    },
                ),
            };
            let size = u32::try_from(data.len())
                .with_context(|| format!("{name} is too large for cpio"))?;
            let mut record = entry.write(w, size);
            record.write_all(&data)?;
            w = record.finish()?;
        }
        Ok(cpio::newc::trailer(w)?)
    }
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

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use cpio::NewcReader;

    use super::*;

    #[test]
    fn cpio_records_are_aligned() {
        let mut img = Image::default();
        img.bytes("/init", b"abc".to_vec(), 0o755);
        img.symlink("/usr/bin/sh", "busybox");
        img.nodes.insert("dev/null".into(), Node::CharDev(1, 3));
        let archive = img.archive(Vec::new()).unwrap();
        assert!(archive.starts_with(b"070701"));
        assert_eq!(archive.len() % 4, 0);
        // Read back the way the kernel's unpacker does: every record starts
        // 4-aligned with the newc magic, up to the trailer.
        let mut rest = archive.as_slice();
        let mut records = Vec::new();
        loop {
            let offset = archive.len() - rest.len();
            assert_eq!(offset % 4, 0, "record at {offset}");
            assert!(rest.starts_with(b"070701"), "record at {offset}");
            let mut record = NewcReader::new(rest).unwrap();
            let entry = record.entry();
            if entry.is_trailer() {
                break;
            }
            let meta = (
                entry.name().to_string(),
                entry.mode(),
                entry.nlink(),
                (entry.rdev_major(), entry.rdev_minor()),
            );
            let mut data = Vec::new();
            record.read_to_end(&mut data).unwrap();
            records.push((meta, String::from_utf8(data).unwrap()));
            rest = record.finish().unwrap();
        }
        let record = |name: &str, mode, nlink, rdev, data: &str| {
            ((name.to_string(), mode, nlink, rdev), data.to_string())
        };
        assert_eq!(
            records,
            [
                record("dev/null", 0o020_600, 1, (1, 3), ""),
                record("init", 0o100_755, 1, (0, 0), "abc"),
                record("usr", 0o040_755, 2, (0, 0), ""),
                record("usr/bin", 0o040_755, 2, (0, 0), ""),
                record("usr/bin/sh", 0o120_777, 1, (0, 0), "busybox"),
            ]
        );
    }
}
