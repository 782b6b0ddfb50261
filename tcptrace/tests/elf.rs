//! The built BPF object holds every program and map the loader expects,
//! with the program types the loader attaches them as. No root needed.
use std::collections::BTreeSet;

use aya_obj::{Object, ProgramSection};
use object::{Object as _, ObjectSection as _, ObjectSymbol as _};
use tcptrace_common::{CLOCK_PROGRAM, CONFIG_GLOBAL, MAPS, hook};

#[test]
fn bpf_object_has_every_program_and_map() {
    let obj = Object::parse(tcptrace::bpf::BPF_OBJECT).expect("BPF object parses");

    let programs: BTreeSet<&str> = obj.programs.keys().map(String::as_str).collect();
    let expected: BTreeSet<&str> = hook::PROGRAMS
        .iter()
        .map(|(name, _, _)| *name)
        .chain([CLOCK_PROGRAM])
        .collect();
    assert_eq!(programs, expected);
    // Test-run at load to measure HZ, never attached.
    assert!(matches!(
        obj.programs[CLOCK_PROGRAM].section,
        ProgramSection::SocketFilter
    ));
    for (name, kind, _) in hook::PROGRAMS {
        let section = &obj.programs[name].section;
        let expected = match kind {
            "raw_tp" => "raw_tp",
            "fexit" => "fexit",
            "kprobe" => "kprobe",
            "kretprobe" => "kretprobe",
            _ => "tracepoint",
        };
        let actual = match section {
            ProgramSection::TracePoint => "tracepoint",
            ProgramSection::RawTracePoint => "raw_tp",
            ProgramSection::FExit { .. } => "fexit",
            ProgramSection::KProbe => "kprobe",
            ProgramSection::KRetProbe => "kretprobe",
            other => panic!("{name}: unexpected section {other:?}"),
        };
        assert_eq!(actual, expected, "{name}");
    }

    // Exactly the maps named in tcptrace-common (every one the loader
    // opens or sizes is among them), besides the sections of globals.
    let maps: BTreeSet<&str> = obj
        .maps
        .keys()
        .map(String::as_str)
        .filter(|name| !name.starts_with('.'))
        .collect();
    assert_eq!(maps, BTreeSet::from(MAPS));
    // The configuration global lives in .rodata, patched at load time.
    assert!(obj.maps.contains_key(".rodata"), "{:?}", obj.maps.keys());
    let elf = object::File::parse(tcptrace::bpf::BPF_OBJECT).expect("ELF parses");
    let config = elf
        .symbols()
        .find(|s| s.name() == Ok(CONFIG_GLOBAL))
        .expect("CONFIG symbol");
    let section = elf
        .section_by_index(config.section_index().expect("defined"))
        .unwrap();
    assert_eq!(section.name(), Ok(".rodata"));
    assert_eq!(config.size(), size_of::<tcptrace_common::Config>() as u64);
}
