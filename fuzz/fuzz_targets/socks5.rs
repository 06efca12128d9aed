#![no_main]
// The property is `ferry_proto::fuzzing::socks5`; see there.
libfuzzer_sys::fuzz_target!(|data: &[u8]| ferry_proto::fuzzing::socks5(data));
