#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tcptrace::fuzzing::kube_proxy(data));
