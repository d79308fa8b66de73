#![no_main]
//! libFuzzer entry point; the target and its properties are in `myconet_fuzz::link`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| myconet_fuzz::link::run(data));
