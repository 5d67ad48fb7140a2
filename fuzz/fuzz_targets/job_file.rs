//! cargo-fuzz target: see `vmgrid_fuzz::job_file`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmgrid_fuzz::job_file(data));
