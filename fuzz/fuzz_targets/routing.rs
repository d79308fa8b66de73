#![no_main]
//! libFuzzer entry point; the target and its properties are in `myconet_fuzz::routing`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| myconet_fuzz::routing::run(data));
