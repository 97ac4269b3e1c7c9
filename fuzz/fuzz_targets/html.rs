#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qpai::fuzzing::html(data));
