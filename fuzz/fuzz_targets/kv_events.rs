//! libFuzzer entry of the `kv_events` target; the checks live in `flotilla_fuzz::kv_events`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::kv_events(data));
