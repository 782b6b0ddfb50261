//! Checks that a built tcptrace runs on any node: an x86-64 ELF executable
//! with no program interpreter (PT_INTERP) and no shared-library
//! dependencies (DT_NEEDED). A static-pie keeps a PT_DYNAMIC for its own
//! relocations, so only DT_NEEDED entries count as dependencies.
use anyhow::{Result, bail};

const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;

/// What makes an ELF file depend on the machine it runs on.
#[derive(Debug, PartialEq, Eq)]
pub struct Linkage {
    /// The dynamic loader it asks for, if any.
    pub interpreter: Option<String>,
    /// Number of shared libraries it needs.
    pub needed: usize,
}

impl Linkage {
    pub fn is_static(&self) -> bool {
        self.interpreter.is_none() && self.needed == 0
    }
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(off..off + 8)?.try_into().ok()?))
}

/// Reads the linkage of a little-endian ELF64 file.
pub fn linkage(bytes: &[u8]) -> Result<Linkage> {
    if bytes.get(..4) != Some(b"\x7fELF".as_slice()) {
        bail!("not an ELF file");
    }
    if bytes.get(4) != Some(&2) || bytes.get(5) != Some(&1) {
        bail!("not a little-endian 64-bit ELF file");
    }
    let bad = || anyhow::anyhow!("truncated ELF header");
    let phoff = u64_at(bytes, 0x20).ok_or_else(bad)? as usize;
    let phentsize = u16_at(bytes, 0x36).ok_or_else(bad)? as usize;
    let phnum = u16_at(bytes, 0x38).ok_or_else(bad)? as usize;
    let mut out = Linkage {
        interpreter: None,
        needed: 0,
    };
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let p_type = u32_at(bytes, ph).ok_or_else(bad)?;
        let offset = u64_at(bytes, ph + 8).ok_or_else(bad)? as usize;
        let filesz = u64_at(bytes, ph + 32).ok_or_else(bad)? as usize;
        let seg = bytes
            .get(offset..offset.saturating_add(filesz))
            .ok_or_else(|| anyhow::anyhow!("segment {i} lies outside the file"))?;
        match p_type {
            PT_INTERP => {
                let path = seg.split(|b| *b == 0).next().unwrap_or_default();
                out.interpreter = Some(String::from_utf8_lossy(path).into_owned());
            }
            PT_DYNAMIC => {
                for entry in seg.chunks_exact(16) {
                    let tag = u64_at(entry, 0).ok_or_else(bad)?;
                    match tag {
                        DT_NULL => break,
                        DT_NEEDED => out.needed += 1,
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_executable_names_its_loader() {
        // This test binary is linked against the system's glibc.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        let l = linkage(&me).unwrap();
        assert!(!l.is_static(), "{l:?}");
        assert!(
            l.interpreter.as_deref().unwrap().contains("ld-linux"),
            "{l:?}"
        );
        assert!(l.needed > 0);
    }

    /// A minimal ELF64 with one PT_DYNAMIC segment holding `tags`.
    fn elf_with_dynamic(tags: &[u64]) -> Vec<u8> {
        let mut b = vec![0u8; 64 + 56];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        b[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let dyn_off = b.len() as u64;
        b[64..68].copy_from_slice(&PT_DYNAMIC.to_le_bytes());
        b[64 + 8..64 + 16].copy_from_slice(&dyn_off.to_le_bytes());
        b[64 + 32..64 + 40].copy_from_slice(&(tags.len() as u64 * 16).to_le_bytes());
        for t in tags {
            b.extend_from_slice(&t.to_le_bytes());
            b.extend_from_slice(&0u64.to_le_bytes());
        }
        b
    }

    #[test]
    fn static_pie_dynamic_section_without_needed_is_static() {
        // DT_RELA (7), DT_FLAGS_1 (0x6ffffffb), DT_NULL: a static-pie.
        let l = linkage(&elf_with_dynamic(&[7, 0x6fff_fffb, DT_NULL])).unwrap();
        assert!(l.is_static(), "{l:?}");
        let l = linkage(&elf_with_dynamic(&[DT_NEEDED, DT_NEEDED, DT_NULL])).unwrap();
        assert_eq!(l.needed, 2);
        assert!(!l.is_static());
    }

    #[test]
    fn rejects_what_is_not_elf64() {
        assert!(linkage(b"#!/bin/sh\n").is_err());
        assert!(linkage(b"\x7fELF\x01\x01").is_err());
    }
}
