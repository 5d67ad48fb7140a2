//! Where wasm's time goes against native, one factor at a time: the compute guest run in this
//! process under wasmtime configurations that each differ from vmgrid's in one setting (binaryen's
//! optimizer before Cranelift, epoch interruption, bounds checks elided by the memory reservation
//! or explicit, the pooling allocator, NaN canonicalization, Cranelift's optimization), against
//! its native build. vmgrid's configuration is a worker process's
//! (`vmgrid_runtime::wasm::worker`): the module optimized by `wasm-opt` (as
//! `vmgrid_runtime::wasm::optimize` runs it), no epoch checks, the time limit kept by the parent
//! killing the worker.

use std::path::Path;
use std::time::{Duration, Instant};

use wasmtime::{Config, Engine, Linker, Module, OptLevel, Store};
use wasmtime_wasi::WasiCtxBuilder;
use wasmtime_wasi::p1::WasiP1Ctx;

/// The compute guest's arguments: the same work as the wasm row of the suite.
const ARGS: [&str; 3] = ["compute", "20000000", "5"];

/// A wasmtime configuration to time, described by how it differs from vmgrid's.
struct Variant {
    what: &'static str,
    /// Whether the module is first optimized by binaryen, as vmgrid does.
    binaryen: bool,
    epoch: bool,
    tune: fn(&mut Config),
}

fn vmgrid_config(c: &mut Config) {
    c.cranelift_opt_level(OptLevel::Speed);
}

const VARIANTS: &[Variant] = &[
    Variant {
        what: "vmgrid's configuration (a worker process: binaryen -O2, then Cranelift speed, no epoch checks)",
        binaryen: true,
        epoch: false,
        tune: vmgrid_config,
    },
    Variant {
        what: "Cranelift alone (the module as submitted, without binaryen)",
        binaryen: false,
        epoch: false,
        tune: vmgrid_config,
    },
    Variant {
        what: "with epoch interruption (the time limit in process, as an SSI process runs)",
        binaryen: true,
        epoch: true,
        tune: vmgrid_config,
    },
    Variant {
        what: "explicit bounds checks (no memory reservation or guard)",
        binaryen: true,
        epoch: false,
        tune: |c| {
            vmgrid_config(c);
            c.memory_reservation(0).memory_guard_size(0).memory_reservation_for_growth(1 << 20);
        },
    },
    Variant {
        what: "pooling allocator (as a node runs it)",
        binaryen: true,
        epoch: false,
        tune: |c| {
            vmgrid_config(c);
            let mut pool = wasmtime::PoolingAllocationConfig::default();
            pool.total_core_instances(16).total_memories(16).total_tables(16).total_stacks(16);
            c.allocation_strategy(wasmtime::InstanceAllocationStrategy::Pooling(pool));
        },
    },
    Variant {
        what: "NaN canonicalization (a deterministic mode's cost; deterministic jobs also skip binaryen)",
        binaryen: true,
        epoch: false,
        tune: |c| {
            vmgrid_config(c);
            c.cranelift_nan_canonicalization(true);
        },
    },
    Variant {
        what: "Cranelift without optimization",
        binaryen: true,
        epoch: false,
        tune: |c| {
            c.cranelift_opt_level(OptLevel::None);
        },
    },
];

/// Runs the guest once on `engine` (epoch ticks every 10 ms with a callback, as vmgrid's runtime
/// does, when `epoch`); the seconds from instantiation to exit.
fn run_once(engine: &Engine, module: &Module, epoch: bool) -> Result<f64, String> {
    let mut linker: Linker<WasiP1Ctx> = Linker::new(engine);
    wasmtime_wasi::p1::add_to_linker_sync(&mut linker, |s| s).map_err(|e| e.to_string())?;
    let wasi = WasiCtxBuilder::new().args(&ARGS).build_p1();
    let mut store = Store::new(engine, wasi);
    if epoch {
        store.epoch_deadline_callback(|_| Ok(wasmtime::UpdateDeadline::Continue(1)));
        store.set_epoch_deadline(1);
    }
    let start = Instant::now();
    let instance = linker.instantiate(&mut store, module).map_err(|e| e.to_string())?;
    let main = instance.get_typed_func::<(), ()>(&mut store, "_start").map_err(|e| e.to_string())?;
    match main.call(&mut store, ()) {
        Ok(()) => {}
        Err(e) if e.downcast_ref::<wasmtime_wasi::I32Exit>().is_some_and(|x| x.0 == 0) => {}
        Err(e) => return Err(format!("the compute guest failed: {e:?}")),
    }
    Ok(start.elapsed().as_secs_f64())
}

/// The native build's seconds, and each variant's: (what, seconds).
type Timings = (f64, Vec<(&'static str, f64)>);

/// Each variant's best of five runs, and the native build's best over the whole measure. The runs
/// go in rounds, each round one run of the native build and of every variant in turn, so that a
/// spell of this machine's noise (runs here vary by 30%) falls on every side of the ratios, not on
/// one variant's runs alone.
pub fn measure(root: &Path) -> Result<Timings, String> {
    let native = root.join("guests/target/release/compute");
    let wasm = crate::pool::guest(root, "compute");
    if !native.exists() || !wasm.exists() {
        return Err("the compute guest is missing (native and wasm); run scripts/bench".into());
    }
    let mut native_s = f64::MAX;
    let mut native_once = || {
        native_s = native_s.min(crate::compute::time_cmd(std::process::Command::new(&native).args(&ARGS[1..])));
    };
    let optimizer = vmgrid_runtime::wasm::optimize::Optimizer::find()
        .map_err(|e| format!("binaryen's optimizer is not usable here ({e}); scripts/bench installs it"))?;
    let submitted = std::fs::read(&wasm).map_err(|e| e.to_string())?;
    let optimized =
        optimizer.optimize(&submitted).map_err(|e| format!("binaryen did not optimize the guest: {}", e.why))?;
    let mut ready = Vec::new();
    for v in VARIANTS {
        let mut cfg = Config::new();
        cfg.epoch_interruption(v.epoch);
        (v.tune)(&mut cfg);
        let engine = Engine::new(&cfg).map_err(|e| e.to_string())?;
        let weak = engine.weak();
        std::thread::spawn(move || {
            while let Some(e) = weak.upgrade() {
                e.increment_epoch();
                drop(e);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let bytes = if v.binaryen { &optimized } else { &submitted };
        let module = Module::new(&engine, bytes).map_err(|e| e.to_string())?;
        ready.push((v, engine, module));
    }
    let mut best = vec![f64::MAX; ready.len()];
    for _ in 0..5 {
        for (i, (v, engine, module)) in ready.iter().enumerate() {
            native_once();
            best[i] = best[i].min(run_once(engine, module, v.epoch)?);
        }
    }
    Ok((native_s, ready.iter().zip(best).map(|((v, ..), s)| (v.what, s)).collect()))
}
