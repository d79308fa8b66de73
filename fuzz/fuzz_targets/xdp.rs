#![no_main]
//! libFuzzer entry point; the target and its properties are in `myconet_fuzz::xdp`.

libfuzzer_sys::fuzz_target!(|data: &[u8]| myconet_fuzz::xdp::run(data));
