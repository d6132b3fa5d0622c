//! libFuzzer entry of the `spec_parse` target; the checks live in `flotilla_fuzz::spec_parse`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::spec_parse(data));
