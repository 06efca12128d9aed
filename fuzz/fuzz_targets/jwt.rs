#![no_main]
// The property is `ferry_auth::fuzzing::jwt`; see there.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_auth::fuzzing::jwt(data));
