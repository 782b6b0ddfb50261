use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

// Builds tcptrace-ebpf for the BPF target with Debian's rustc (which ships a
// precompiled core for bpfel-unknown-none), registered with rustup as
// `debian-rust` by `cargo xtask setup`.
fn main() -> anyhow::Result<()> {
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .into_iter()
        .find(|p| p.name.as_str() == "tcptrace-ebpf")
        .ok_or_else(|| anyhow!("tcptrace-ebpf package not found"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("tcptrace-ebpf manifest has no parent"))?;
    // aya-ebpf needs one unstable feature on the bpf target; allow it for that
    // crate only (RUSTC_BOOTSTRAP=1 would make aya-build use -Z build-std).
    if std::env::var_os("RUSTC_BOOTSTRAP").is_none() {
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { std::env::set_var("RUSTC_BOOTSTRAP", "aya_ebpf") };
    }
    let package = Package {
        name: "tcptrace-ebpf",
        root_dir: root_dir.as_str(),
        ..Default::default()
    };
    aya_build::build_ebpf([package], Toolchain::Custom("debian-rust"))
}
