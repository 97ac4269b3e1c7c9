#![no_main]

libfuzzer_sys::fuzz_target!(
    init: qpai::fuzzing::token_count_tables(),
    |data: &[u8]| qpai::fuzzing::token_count(data)
);
