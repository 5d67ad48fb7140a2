//! Checks a submitted [`JobSpec`] the way `vmgrid-job` checks a job file: a coordinator takes
//! nothing from the network on trust.

use vmgrid_job::limits;
use vmgrid_proto::{FileRef, JobSpec, is_blob_ref, is_confined_path};

pub fn spec(s: &JobSpec) -> Result<(), String> {
    if s.name.is_empty() || s.name.len() > limits::MAX_NAME_LEN {
        return Err(format!("name must be 1 to {} characters", limits::MAX_NAME_LEN));
    }
    let max_mem = match s.vm_type.as_str() {
        "wasm" => limits::MAX_WASM_MEMORY_MB,
        "qemu" | "jvm" => limits::MAX_MEMORY_MB,
        other => return Err(format!("unknown vm type `{other}`, expected wasm, qemu or jvm")),
    };
    if !["none", "user"].contains(&s.network.as_str()) {
        return Err(format!("unknown network `{}`", s.network));
    }
    let range = |what: &str, v: u64, lo: u64, hi: u64| {
        if v < lo || v > hi { Err(format!("{what} is {v}, but must be between {lo} and {hi}")) } else { Ok(()) }
    };
    // An SSI process shares its node's cpus by time slicing, as a process on one machine does, so
    // it may ask for none; the matchmaker then spreads such jobs over the least loaded nodes.
    let min_cpus = if s.ssi.is_some() { 0 } else { 1 };
    range("cpus", s.cpus as u64, min_cpus, limits::MAX_CPUS as u64)?;
    range("memory_mb", s.memory_mb, 1, max_mem)?;
    range("timeout_s", s.timeout_s, 1, limits::MAX_TIMEOUT_S)?;
    range("disk_mb", s.disk_mb, 1, limits::MAX_DISK_MB)?;
    range("max_retries", s.max_retries as u64, 0, limits::MAX_RETRIES as u64)?;
    if s.args.len() > limits::MAX_ARGS {
        return Err(format!("at most {} args", limits::MAX_ARGS));
    }
    if s.vm_type != "qemu" && (s.kernel.is_some() || s.initrd.is_some() || s.append.is_some()) {
        return Err("kernel, initrd and append apply only to qemu jobs".into());
    }
    if s.vm_type == "qemu" && s.image.is_none() && s.kernel.is_none() {
        return Err("a qemu job needs an image, a kernel, or both".into());
    }
    if s.vm_type != "qemu" && s.image.is_none() {
        return Err(format!("a {} job needs an image", s.vm_type));
    }
    if let Some(ssi) = &s.ssi {
        if s.vm_type != "wasm" {
            return Err("an SSI process must be a wasm job".into());
        }
        if !(ssi.home.starts_with("http://") || ssi.home.starts_with("https://")) || ssi.home.len() > 2048 {
            return Err(format!("the SSI home `{}` is not an http(s) URL", ssi.home));
        }
        if ssi.token.is_empty() || ssi.token.len() > 256 {
            return Err("the SSI process token must be 1 to 256 characters".into());
        }
    }
    let files = s.image.iter().chain(&s.kernel).chain(&s.initrd).chain(&s.inputs);
    for f in files {
        file(f)?;
    }
    for o in &s.outputs {
        let p = o.strip_prefix("./").unwrap_or(o);
        if !is_confined_path(p) {
            return Err(format!("output pattern `{o}` must be relative to the job directory, without `..`"));
        }
    }
    Ok(())
}

fn file(f: &FileRef) -> Result<(), String> {
    if !is_blob_ref(&f.blob) {
        return Err(format!("`{}` is not a blob reference (64 hex digits of blake3)", f.blob));
    }
    if !is_confined_path(&f.path) {
        return Err(format!("file path `{}` must be relative, without `..`", f.path));
    }
    Ok(())
}
