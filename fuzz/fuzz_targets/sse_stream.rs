//! libFuzzer entry of the `sse_stream` target; the checks live in `flotilla_fuzz::sse_stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| flotilla_fuzz::sse_stream(data));
