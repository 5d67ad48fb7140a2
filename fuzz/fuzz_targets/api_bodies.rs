//! cargo-fuzz target: see `vmgrid_fuzz::api_bodies`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmgrid_fuzz::api_bodies(data));
