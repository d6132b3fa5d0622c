//! libFuzzer entry of the `prometheus_text` target; the checks live in `flotilla_fuzz::prometheus_text`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::prometheus_text(data));
