//! From [`RawJob`] to [`Job`]: types, limits, paths and per-VM-type rules, each error with a place.

use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use toml::Spanned;

use crate::raw::{RawJob, RawVm};
use crate::{Files, Input, Job, JobFileError, Network, Policy, Resources, Vm, VmType, limits};

/// Parses and validates job-file text. `path` names the file in errors and anchors relative paths.
pub fn parse_job(path: &Path, text: &str) -> Result<Job, JobFileError> {
    let cx = Cx { path, text };
    let raw: RawJob = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        let message = e.message().trim_end().replace("expected i64", "expected an integer");
        cx.err(span, message)
    })?;
    cx.job(raw)
}

struct Cx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Cx<'_> {
    fn err(&self, span: Range<usize>, message: impl Into<String>) -> JobFileError {
        let (line, column) = line_col(self.text, span.start);
        JobFileError::Invalid { path: self.path.to_path_buf(), line, column, message: message.into() }
    }

    fn base_dir(&self) -> PathBuf {
        match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        }
    }

    fn job(&self, raw: RawJob) -> Result<Job, JobFileError> {
        let name = match raw.name {
            Some(n) => {
                let v = n.get_ref();
                if v.is_empty() || v.len() > limits::MAX_NAME_LEN {
                    return Err(self.err(n.span(), format!("`name` must be 1 to {} characters", limits::MAX_NAME_LEN)));
                }
                if !v.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                    return Err(self.err(n.span(), "`name` may use only letters, digits, `-`, `_` and `.`"));
                }
                v.clone()
            }
            None => {
                self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "job".to_string())
            }
        };
        let vm_span = raw.vm.span();
        let vm = self.vm(raw.vm.into_inner(), vm_span)?;
        let resources = self.resources(&raw.resources, vm.vm_type)?;
        let files = self.files(&raw.files)?;
        let policy = Policy {
            requirements: raw.policy.requirements.map(|s| s.into_inner()),
            rank: raw.policy.rank.map(|s| s.into_inner()),
            max_retries: match raw.policy.max_retries {
                Some(m) => self.int_in(&m, "max_retries", 0, limits::MAX_RETRIES as i64)? as u32,
                None => 0,
            },
        };
        Ok(Job { source: self.path.to_path_buf(), name, vm, resources, files, policy })
    }

    fn vm(&self, raw: RawVm, vm_span: Range<usize>) -> Result<Vm, JobFileError> {
        let vm_type = match raw.vm_type.get_ref().as_str() {
            "wasm" => VmType::Wasm,
            "qemu" => VmType::Qemu,
            "jvm" => VmType::Jvm,
            other => {
                return Err(self.err(
                    raw.vm_type.span(),
                    format!("unknown vm type `{other}`, expected one of `wasm`, `qemu`, `jvm`"),
                ));
            }
        };
        let base = self.base_dir();
        let resolve = |s: &Spanned<String>| -> Result<PathBuf, JobFileError> {
            if s.get_ref().is_empty() {
                return Err(self.err(s.span(), "path is empty"));
            }
            Ok(base.join(s.get_ref()))
        };
        if vm_type != VmType::Qemu {
            for (key, v) in
                [("kernel", &raw.kernel), ("initrd", &raw.initrd), ("append", &raw.append), ("network", &raw.network)]
            {
                if let Some(v) = v {
                    return Err(self.err(
                        v.span(),
                        format!("`{key}` applies only to qemu jobs, and this job's vm type is `{}`", vm_type),
                    ));
                }
            }
            if raw.image.is_none() {
                return Err(self.err(vm_span, format!("a {vm_type} job needs `image` in [vm]")));
            }
        } else {
            if raw.image.is_none() && raw.kernel.is_none() {
                return Err(self
                    .err(vm_span, "a qemu job needs `image` (a disk image), `kernel` (direct kernel boot), or both"));
            }
            if raw.kernel.is_none() {
                for (key, v) in [("initrd", &raw.initrd), ("append", &raw.append)] {
                    if let Some(v) = v {
                        return Err(self
                            .err(v.span(), format!("`{key}` needs `kernel`: it is used only for direct kernel boot")));
                    }
                }
                if let Some(a) = raw.args.first() {
                    return Err(self.err(
                        a.span(),
                        "qemu `args` need `kernel`: they are passed to the guest's init on the kernel command line",
                    ));
                }
                if let Some((_, v)) = raw.env.iter().next() {
                    return Err(self.err(
                        v.span(),
                        "qemu `env` needs `kernel`: it is passed to the guest's init on the kernel command line",
                    ));
                }
            }
        }
        if raw.args.len() > limits::MAX_ARGS {
            return Err(self.err(raw.args[limits::MAX_ARGS].span(), format!("at most {} args", limits::MAX_ARGS)));
        }
        for a in &raw.args {
            if a.get_ref().contains('\0') {
                return Err(self.err(a.span(), "an argument may not contain a NUL byte"));
            }
        }
        for (k, v) in &raw.env {
            let ok = !k.is_empty()
                && !k.starts_with(|c: char| c.is_ascii_digit())
                && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(self.err(
                    v.span(),
                    format!(
                        "environment variable name `{k}` must be letters, digits and `_`, not starting with a digit"
                    ),
                ));
            }
            if v.get_ref().contains('\0') {
                return Err(self.err(v.span(), "an environment value may not contain a NUL byte"));
            }
        }
        let network = match &raw.network {
            None => Network::None,
            Some(n) => match n.get_ref().as_str() {
                "none" => Network::None,
                "user" => Network::User,
                other => {
                    return Err(self.err(n.span(), format!("unknown network `{other}`, expected `none` or `user`")));
                }
            },
        };
        if vm_type == VmType::Qemu && raw.kernel.is_some() {
            self.check_kernel_cmdline(&raw)?;
        }
        Ok(Vm {
            vm_type,
            image: raw.image.as_ref().map(resolve).transpose()?,
            args: raw.args.into_iter().map(|a| a.into_inner()).collect(),
            env: raw.env.into_iter().map(|(k, v)| (k, v.into_inner())).collect(),
            kernel: raw.kernel.as_ref().map(resolve).transpose()?,
            initrd: raw.initrd.as_ref().map(resolve).transpose()?,
            append: raw.append.map(|a| a.into_inner()),
            network,
        })
    }

    /// Direct-kernel-boot jobs carry args and env on the kernel command line, whose syntax allows
    /// double quotes around spaces but no quote inside a value, and whose length is bounded.
    fn check_kernel_cmdline(&self, raw: &RawVm) -> Result<(), JobFileError> {
        // Linux gives init at most 32 argv and 32 envp entries, and uses some of each itself.
        if raw.args.len() > limits::MAX_KERNEL_INIT_ARGS {
            return Err(self.err(
                raw.args[limits::MAX_KERNEL_INIT_ARGS].span(),
                format!("a qemu job passes at most {} args to the guest's init", limits::MAX_KERNEL_INIT_ARGS),
            ));
        }
        if let Some((_, v)) = raw.env.iter().nth(limits::MAX_KERNEL_INIT_ENV) {
            return Err(self.err(
                v.span(),
                format!("a qemu job passes at most {} env variables to the guest's init", limits::MAX_KERNEL_INIT_ENV),
            ));
        }
        let mut len = raw.append.as_ref().map_or(0, |a| a.get_ref().len());
        for a in &raw.args {
            if a.get_ref().contains(['"', '\n']) {
                return Err(self.err(
                    a.span(),
                    "qemu args travel on the kernel command line and may not contain `\"` or a newline",
                ));
            }
            len += a.get_ref().len() + 3;
        }
        for (k, v) in &raw.env {
            if v.get_ref().contains(['"', '\n']) {
                return Err(self.err(
                    v.span(),
                    "qemu env values travel on the kernel command line and may not contain `\"` or a newline",
                ));
            }
            len += k.len() + v.get_ref().len() + 4;
        }
        if len > limits::MAX_KERNEL_CMDLINE {
            let span = raw.append.as_ref().map(|a| a.span()).unwrap_or(raw.vm_type.span());
            return Err(self.err(
                span,
                format!(
                    "append, args and env make a kernel command line of {len} bytes; the limit is {}",
                    limits::MAX_KERNEL_CMDLINE
                ),
            ));
        }
        Ok(())
    }

    fn resources(&self, raw: &crate::raw::RawResources, vm_type: VmType) -> Result<Resources, JobFileError> {
        let d = Resources::default();
        let max_mem = if vm_type == VmType::Wasm { limits::MAX_WASM_MEMORY_MB } else { limits::MAX_MEMORY_MB };
        Ok(Resources {
            cpus: match &raw.cpus {
                Some(v) => self.int_in(v, "cpus", 1, limits::MAX_CPUS as i64)? as u32,
                None => d.cpus,
            },
            memory_mb: match &raw.memory_mb {
                Some(v) => self.int_in(v, "memory_mb", 1, max_mem as i64)? as u64,
                None => d.memory_mb,
            },
            timeout_s: match &raw.timeout_s {
                Some(v) => self.int_in(v, "timeout_s", 1, limits::MAX_TIMEOUT_S as i64)? as u64,
                None => d.timeout_s,
            },
            disk_mb: match &raw.disk_mb {
                Some(v) => self.int_in(v, "disk_mb", 1, limits::MAX_DISK_MB as i64)? as u64,
                None => d.disk_mb,
            },
        })
    }

    fn int_in(&self, v: &Spanned<i64>, key: &str, min: i64, max: i64) -> Result<i64, JobFileError> {
        let x = *v.get_ref();
        if x < min || x > max {
            return Err(self.err(v.span(), format!("`{key}` is {x}, but must be between {min} and {max}")));
        }
        Ok(x)
    }

    fn files(&self, raw: &crate::raw::RawFiles) -> Result<Files, JobFileError> {
        let base = self.base_dir();
        let mut inputs = Vec::new();
        for i in &raw.inputs {
            let p = Path::new(i.get_ref());
            let dest = input_dest(p)
                .ok_or_else(|| self.err(i.span(), format!("input `{}` does not name a file", i.get_ref())))?;
            inputs.push(Input { source: base.join(p), dest });
        }
        let mut outputs = Vec::new();
        for o in &raw.outputs {
            let pat = o.get_ref();
            let p = Path::new(pat);
            if pat.is_empty()
                || p.is_absolute()
                || p.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
            {
                return Err(self.err(
                    o.span(),
                    format!("output pattern `{pat}` must be relative to the job directory, without `..`"),
                ));
            }
            if let Err(e) = globset::Glob::new(pat) {
                return Err(self.err(o.span(), format!("output pattern `{pat}` is not a valid glob: {}", e.kind())));
            }
            outputs.push(pat.clone());
        }
        Ok(Files { inputs, outputs })
    }
}

/// Where an input lands in the job directory: its relative path as written, or, for a path that
/// is absolute or climbs with `..`, its file name. Never anything that leaves the job directory.
fn input_dest(p: &Path) -> Option<PathBuf> {
    let plain = !p.is_absolute() && p.components().all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    let dest: PathBuf = if plain {
        p.components().filter(|c| matches!(c, Component::Normal(_))).collect()
    } else {
        PathBuf::from(p.file_name()?)
    };
    if dest.as_os_str().is_empty() { None } else { Some(dest) }
}

/// 1-based line and column (in characters) of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    (line, text[line_start..offset].chars().count() + 1)
}

#[cfg(test)]
mod tests;
