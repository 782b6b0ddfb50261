use std::path::PathBuf;

// bpf-linker is a separate binary; make cargo rebuild when it changes.
fn main() {
    let linker = which::which("bpf-linker").unwrap_or_else(|_| PathBuf::from("bpf-linker"));
    println!("cargo:rerun-if-changed={}", linker.display());
}
