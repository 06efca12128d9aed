#![no_main]
// The property is `ferry_connector::fuzzing::audit_lines`; see there.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_connector::fuzzing::audit_lines(data));
