//! The kernel's tick counter against its monotonic clock, sampled in one
//! program run: how userspace measures HZ. Run with BPF_PROG_TEST_RUN at
//! load, never attached.
use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    macros::socket_filter,
    programs::SkBuffContext,
};

use crate::maps::CLOCK;

/// Returns the low 32 bits of jiffies (the test run's return value) and
/// stores CLOCK_MONOTONIC (ns) of the same moment in `CLOCK`.
#[socket_filter]
pub fn tick_clock(_ctx: SkBuffContext) -> i64 {
    // SAFETY: helpers without arguments.
    let (jiffies, now) = unsafe { (bpf_jiffies64(), bpf_ktime_get_ns()) };
    if let Some(slot) = CLOCK.get_ptr_mut(0) {
        // SAFETY: the map's own value slot.
        unsafe { *slot = now };
    }
    i64::from(jiffies as u32)
}
