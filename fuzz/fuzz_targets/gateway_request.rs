//! libFuzzer entry of the `gateway_request` target; the checks live in `flotilla_fuzz::gateway_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::gateway_request(data));
