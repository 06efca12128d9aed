#![no_main]
// The property is `ferry_model::fuzzing::export_file`; see there.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_model::fuzzing::export_file(data));
