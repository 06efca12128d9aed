#![no_main]
// The property is `ferry_proxy::fuzzing::http_request_head`; see there.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_proxy::fuzzing::http_request_head(data));
