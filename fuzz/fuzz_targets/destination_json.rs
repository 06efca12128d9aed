#![no_main]
// The property is `ferry_model::fuzzing::destination_json`; see there.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_model::fuzzing::destination_json(data));
