//! From [`RawJob`] to [`Job`]: the file's values, checked by the one set of rules ([`check`]), each
//! error with the place in the file.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Component, Path, PathBuf};

use toml::Spanned;

use crate::check::{self, Field, Shape};
use crate::raw::RawJob;
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

/// A job written inline in another file (a workflow's `[jobs.NAME]` table): errors point into
/// that file and relative paths resolve against its directory.
pub(crate) fn job_from_raw(path: &Path, text: &str, raw: RawJob) -> Result<Job, JobFileError> {
    Cx { path, text }.job(raw)
}

/// An error at byte offset `at` of `text`, the contents of `path`.
pub(crate) fn error_at(path: &Path, text: &str, at: Range<usize>, message: impl Into<String>) -> JobFileError {
    Cx { path, text }.err(at, message)
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

    /// A job without a `name` is named after its file, made to fit the rules for names.
    fn default_name(&self) -> String {
        let stem = self.path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let name: String = stem
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
            .take(limits::MAX_NAME_LEN)
            .collect();
        if name.is_empty() { "job".into() } else { name }
    }

    fn job(&self, raw: RawJob) -> Result<Job, JobFileError> {
        let vm_span = raw.vm.span();
        let rv = raw.vm.get_ref();
        let vm_type: VmType = rv.vm_type.get_ref().parse().map_err(|m: String| self.err(rv.vm_type.span(), m))?;
        let network = rv
            .network
            .as_ref()
            .map(|n| n.get_ref().parse::<Network>().map_err(|m| self.err(n.span(), m)))
            .transpose()?;
        let name = raw.name.as_ref().map_or_else(|| self.default_name(), |n| n.get_ref().clone());
        let args: Vec<String> = rv.args.iter().map(|a| a.get_ref().clone()).collect();
        let env: BTreeMap<String, String> = rv.env.iter().map(|(k, v)| (k.clone(), v.get_ref().clone())).collect();
        let mut inputs = Vec::new();
        for i in &raw.files.inputs {
            let p = Path::new(i.get_ref());
            let dest = input_dest(p)
                .ok_or_else(|| self.err(i.span(), format!("input `{}` does not name a file", i.get_ref())))?;
            inputs.push(Input { source: self.base_dir().join(p), dest });
        }
        let dests: Vec<String> = inputs.iter().map(|i| i.dest.to_string_lossy().into_owned()).collect();
        let outputs: Vec<String> = raw.files.outputs.iter().map(|o| o.get_ref().clone()).collect();
        let d = Resources::default();
        let int = |v: &Option<Spanned<i64>>, default: u64| v.as_ref().map_or(default as i64, |v| *v.get_ref());
        let (r, p) = (&raw.resources, &raw.policy);
        let shape = Shape {
            name: &name,
            vm_type,
            image: rv.image.is_some(),
            args: &args,
            env: &env,
            kernel: rv.kernel.is_some(),
            initrd: rv.initrd.is_some(),
            append: rv.append.as_ref().map(|a| a.get_ref().as_str()),
            network,
            cpus: int(&r.cpus, d.cpus as u64),
            min_cpus: 1,
            memory_mb: int(&r.memory_mb, d.memory_mb),
            timeout_s: int(&r.timeout_s, d.timeout_s),
            disk_mb: int(&r.disk_mb, d.disk_mb),
            inputs: dests.iter().map(String::as_str).collect(),
            outputs: &outputs,
            requirements: p.requirements.as_ref().map(|s| s.get_ref().as_str()),
            rank: p.rank.as_ref().map(|s| s.get_ref().as_str()),
            max_retries: int(&p.max_retries, 0),
            priority: p.priority.as_ref().map_or(0, |v| *v.get_ref()),
            checkpoint_s: p.checkpoint_s.as_ref().map(|v| *v.get_ref()),
            replicas: p.replicas.as_ref().map(|v| *v.get_ref()),
            quorum: p.quorum.as_ref().map(|v| *v.get_ref()),
            deterministic: p.deterministic.as_ref().is_some_and(|v| *v.get_ref()),
        };
        check::check(&shape).map_err(|inv| self.err(self.span_of(&raw, &inv.field, vm_span.clone()), inv.message))?;
        let (resources, policy) = checked(&shape);
        let base = self.base_dir();
        let resolve = |s: &Option<Spanned<String>>| -> Result<Option<PathBuf>, JobFileError> {
            match s {
                Some(s) if s.get_ref().is_empty() => Err(self.err(s.span(), "path is empty")),
                // No file has such a name, and the API refuses the spec it would make.
                Some(s) if s.get_ref().contains('\0') => Err(self.err(s.span(), "a path may not contain a NUL byte")),
                Some(s) => Ok(Some(base.join(s.get_ref()))),
                None => Ok(None),
            }
        };
        let vm = Vm {
            vm_type,
            image: resolve(&rv.image)?,
            args,
            env,
            kernel: resolve(&rv.kernel)?,
            initrd: resolve(&rv.initrd)?,
            append: rv.append.as_ref().map(|a| a.get_ref().clone()),
            network: network.unwrap_or_default(),
        };
        Ok(Job { source: self.path.to_path_buf(), name, vm, resources, files: Files { inputs, outputs }, policy })
    }

    /// Where in the file a refused field was written (the `[vm]` table when it was not).
    fn span_of(&self, raw: &RawJob, field: &Field, vm_span: Range<usize>) -> Range<usize> {
        let rv = raw.vm.get_ref();
        let (r, f, p) = (&raw.resources, &raw.files, &raw.policy);
        let span = |s: Option<Range<usize>>| s.unwrap_or_else(|| vm_span.clone());
        match field {
            Field::Name => span(raw.name.as_ref().map(|n| n.span())),
            Field::Vm => vm_span.clone(),
            Field::Arg(i) => span(rv.args.get(*i).map(|a| a.span())),
            Field::Env(k) => span(rv.env.get(k).map(|v| v.span())),
            Field::Kernel => span(rv.kernel.as_ref().map(|v| v.span())),
            Field::Initrd => span(rv.initrd.as_ref().map(|v| v.span())),
            Field::Append => span(rv.append.as_ref().map(|v| v.span())),
            Field::Network => span(rv.network.as_ref().map(|v| v.span())),
            Field::Cpus => span(r.cpus.as_ref().map(|v| v.span())),
            Field::MemoryMb => span(r.memory_mb.as_ref().map(|v| v.span())),
            Field::TimeoutS => span(r.timeout_s.as_ref().map(|v| v.span())),
            Field::DiskMb => span(r.disk_mb.as_ref().map(|v| v.span())),
            Field::Input(i) => span(f.inputs.get(*i).map(|v| v.span())),
            Field::Output(i) => span(f.outputs.get(*i).map(|v| v.span())),
            Field::Requirements => span(p.requirements.as_ref().map(|v| v.span())),
            Field::Rank => span(p.rank.as_ref().map(|v| v.span())),
            Field::MaxRetries => span(p.max_retries.as_ref().map(|v| v.span())),
            Field::Priority => span(p.priority.as_ref().map(|v| v.span())),
            Field::CheckpointS => span(p.checkpoint_s.as_ref().map(|v| v.span())),
            Field::Replicas => span(p.replicas.as_ref().map(|v| v.span())),
            Field::Quorum => span(p.quorum.as_ref().map(|v| v.span())),
            Field::Deterministic => span(p.deterministic.as_ref().map(|v| v.span())),
        }
    }
}

/// A checked job's resources and policy.
fn checked(shape: &Shape<'_>) -> (Resources, Policy) {
    let resources = Resources {
        cpus: shape.cpus as u32,
        memory_mb: shape.memory_mb as u64,
        timeout_s: shape.timeout_s as u64,
        disk_mb: shape.disk_mb as u64,
    };
    let policy = Policy {
        requirements: shape.requirements.map(str::to_string),
        rank: shape.rank.map(str::to_string),
        max_retries: shape.max_retries as u32,
        priority: shape.priority as i32,
        checkpoint_s: shape.checkpoint_s.map(|n| n as u64),
        // One replica is one run, as without the key.
        replicas: shape.replicas.map(|n| n as u32).filter(|&n| n > 1),
        quorum: shape.replicas.filter(|&n| n > 1).map(|n| shape.quorum.unwrap_or(n / 2 + 1) as u32),
        deterministic: shape.deterministic,
    };
    (resources, policy)
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
