#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardline::fuzz::route(data));
