#![no_main]
//! The `ferry up` config file: parsing and its checks never panic or hang, whatever the text.

#[allow(dead_code, clippy::all)]
#[path = "../../crates/ferry/src/config.rs"]
mod config;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = config::FileConfig::parse(text);
    }
});
