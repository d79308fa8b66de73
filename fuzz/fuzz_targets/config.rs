#![no_main]
//! libFuzzer entry point; the target and its properties are in `myconet_fuzz::config`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| myconet_fuzz::config::run(data));
