//! cargo-fuzz target: see `vmgrid_fuzz::engine_submit`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmgrid_fuzz::engine_submit(data));
