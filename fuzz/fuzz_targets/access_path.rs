#![no_main]
// The property is `ferry_connector::fuzzing::access_path`; see there.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_connector::fuzzing::access_path(data));
