#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| shardline::fuzz::client_messages(data));
