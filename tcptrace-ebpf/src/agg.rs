//! Storms of one failure counted in the kernel: the first occurrence of an
//! [`AggKey`] in a generation goes out as a full record (flag `AGG_FIRST`),
//! its repeats only add to the key's count; userspace reads the counts of
//! a finished generation and delivers them as exact repeat counts.
use tcptrace_common::{AggCount, AggKey, COUNTER_AGG_FULL, COUNTER_FOLDED, Event, flag};

use crate::maps::{AGG, AGG_GEN, config, count};

/// bpf_map_update_elem's "the key exists" (-EEXIST).
const EEXIST: i32 = -17;
/// BPF_NOEXIST.
const NOEXIST: u64 = 1;

/// A key for a failure with these ends in the current generation.
#[inline(always)]
pub fn key(
    kind: u8,
    netns: u32,
    cgroup_id: u64,
    family: u8,
    addr: [u8; 16],
    port: u16,
    peer: [u8; 16],
) -> AggKey {
    AggKey {
        addr,
        peer,
        cgroup_id,
        netns,
        generation: AGG_GEN.get(0).copied().unwrap_or(0),
        port,
        kind,
        family,
        errno: 0,
    }
}

/// Counts a repeat of `key`'s failure when its first record went out in
/// this generation; `false` when a record is needed.
#[inline(always)]
pub fn count_repeat(hook: u32, key: &AggKey) -> bool {
    if config().aggregate == 0 {
        return false;
    }
    let Some(v) = AGG.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: this CPU's slot of the value, which only this program run
    // writes now (a program does not nest with itself on a CPU).
    unsafe { (*v).count += 1 };
    count(hook, COUNTER_FOLDED);
    true
}

/// Opens `key`'s aggregation with `ev`, the record about to go out. Returns
/// `false` when another CPU opened it meanwhile: this occurrence was
/// counted and the record must be discarded. A full map sends the record
/// as it is (counted).
#[inline(always)]
pub fn open(hook: u32, key: &AggKey, ev: &mut Event) -> bool {
    if config().aggregate == 0 {
        return true;
    }
    let first = AggCount {
        count: 0,
        first_ns: ev.ts_ns,
    };
    match AGG.insert(key, first, NOEXIST) {
        Ok(()) => {
            ev.flags |= flag::AGG_FIRST;
            ev.agg_generation = key.generation;
            // SAFETY: a helper without preconditions.
            ev.agg_cpu = unsafe { aya_ebpf::helpers::generated::bpf_get_smp_processor_id() } as u16;
            true
        }
        Err(e) if e == EEXIST => !count_repeat(hook, key),
        Err(_) => {
            count(hook, COUNTER_AGG_FULL);
            true
        }
    }
}
