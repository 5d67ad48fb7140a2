//! vmgrid's integration tests: one binary, one module per capability. They run the real `vmgrid`
//! binary against real wasmtime and real QEMU.

mod util;

mod ahead;
mod appliance;
mod checkpoint;
mod dag;
mod dashboard;
mod failover;
mod fair;
mod glidein;
mod job_file;
mod jvm;
mod netns;
mod overlay;
mod overlay_nat;
mod peers;
mod pool;
mod replicas;
mod run_qemu;
mod run_wasm;
mod security;
mod ssi;
mod up;
mod wasi;
