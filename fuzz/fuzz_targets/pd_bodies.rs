//! libFuzzer entry of the `pd_bodies` target; the checks live in `flotilla_fuzz::pd_bodies`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::pd_bodies(data));
