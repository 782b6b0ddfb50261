//! tcptrace's kernel side: raw tracepoint, syscall tracepoint, fexit and
//! kprobe programs (see `tcptrace_common::hook::PROGRAMS`) that turn TCP
//! failure signals into `tcptrace_common::Event` records on a ring buffer,
//! and count a storm's repeats instead of sending each.
#![no_std]
#![no_main]
// aya's program macros hand every program its context by value.
#![allow(clippy::needless_pass_by_value)]

mod kernel;
mod maps;
mod probes;
mod storm;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
