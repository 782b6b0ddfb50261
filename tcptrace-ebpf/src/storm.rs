//! Storms of one failure counted in the kernel: the first occurrence of a
//! [`StormKey`] in a generation goes out as a full record (flag `STORM_FIRST`),
//! its repeats only add to the key's count; userspace reads the counts of
//! a finished generation and delivers them as exact repeat counts.
use tcptrace_common::{COUNTER_REPEATS, COUNTER_STORMS_FULL, Event, StormCount, StormKey, flag};

use crate::maps::{STORM_GEN, STORMS, config, count};

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
) -> StormKey {
    StormKey {
        addr,
        peer,
        cgroup_id,
        netns,
        generation: STORM_GEN.get(0).copied().unwrap_or(0),
        port,
        kind,
        family,
        errno: 0,
    }
}

/// Counts a repeat of `key`'s failure when its first record went out in
/// this generation; `false` when a record is needed.
#[inline(always)]
pub fn count_repeat(hook: u32, key: &StormKey) -> bool {
    if config().count_storms == 0 {
        return false;
    }
    let Some(v) = STORMS.get_ptr_mut(key) else {
        return false;
    };
    // SAFETY: this CPU's slot of the value, which only this program run
    // writes now (a program does not nest with itself on a CPU).
    unsafe { (*v).count += 1 };
    count(hook, COUNTER_REPEATS);
    true
}

/// Opens `key`'s storm with `ev`, the record about to go out. Returns
/// `false` when another CPU opened it meanwhile: this occurrence was
/// counted and the record must be discarded. A full map sends the record
/// as it is (counted).
#[inline(always)]
pub fn open(hook: u32, key: &StormKey, ev: &mut Event) -> bool {
    if config().count_storms == 0 {
        return true;
    }
    let first = StormCount {
        count: 0,
        first_ns: ev.ts_ns,
    };
    match STORMS.insert(key, first, NOEXIST) {
        Ok(()) => {
            ev.flags |= flag::STORM_FIRST;
            ev.storm_generation = key.generation;
            // SAFETY: a helper without preconditions.
            ev.storm_cpu =
                unsafe { aya_ebpf::helpers::generated::bpf_get_smp_processor_id() } as u16;
            true
        }
        Err(e) if e == EEXIST => !count_repeat(hook, key),
        Err(_) => {
            count(hook, COUNTER_STORMS_FULL);
            true
        }
    }
}
