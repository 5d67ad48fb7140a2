//! The workflow file (`vmgrid dag submit FLOW.toml`): `[jobs.NAME]` tables, each a job file
//! (`file = "job.toml"`, relative to the flow file) or a job written inline (the keys of a job
//! file), with `after`, `count`, `inputs_from`, `retries` and `final`. The jobs pass the one set
//! of job rules and the flow its shape rules ([`check::check_dag`]); every error names the file,
//! the line, the column and the job. Reads the flow file and the job files it names, nothing else.

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use toml::Spanned;

use crate::check::{self, DagField};
use crate::raw::{RawFiles, RawJob, RawPolicy, RawResources, RawVm};
use crate::validate::{error_at, job_from_raw};
use crate::{Job, JobFileError};

/// A validated workflow.
#[derive(Debug, Clone, PartialEq)]
pub struct Flow {
    pub source: PathBuf,
    /// The flow file's name, made to fit the rules for names.
    pub name: String,
    /// In the order the file lists them.
    pub nodes: Vec<FlowNode>,
}

/// One job of a workflow.
#[derive(Debug, Clone, PartialEq)]
pub struct FlowNode {
    pub name: String,
    pub job: Job,
    pub after: Vec<String>,
    /// Instances 0..count-1, `{index}` as in a `--count` sweep.
    pub count: u64,
    /// Parent → globs over its outputs, which become this job's inputs.
    pub inputs_from: BTreeMap<String, Vec<String>>,
    /// How often the node is run again, as a whole, after it failed.
    pub retries: u32,
    /// Runs once every other node has ended, whether they succeeded or not.
    pub final_node: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlow {
    jobs: BTreeMap<String, Spanned<RawNode>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    file: Option<Spanned<String>>,
    #[serde(default)]
    after: Vec<Spanned<String>>,
    count: Option<Spanned<i64>>,
    #[serde(default)]
    inputs_from: BTreeMap<String, Spanned<Vec<String>>>,
    retries: Option<Spanned<i64>>,
    #[serde(rename = "final")]
    final_node: Option<Spanned<bool>>,
    // An inline job: the keys of a job file.
    name: Option<Spanned<String>>,
    vm: Option<Spanned<RawVm>>,
    resources: Option<RawResources>,
    files: Option<RawFiles>,
    policy: Option<RawPolicy>,
}

/// Reads and validates a workflow file and the job files it names.
pub fn load_flow(path: &Path) -> Result<Flow, JobFileError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| JobFileError::Read { path: path.to_path_buf(), message: e.to_string() })?;
    parse_flow(path, &text)
}

/// Parses and validates workflow text; `path` names the file in errors and anchors the job files.
pub fn parse_flow(path: &Path, text: &str) -> Result<Flow, JobFileError> {
    let raw: RawFlow = toml::from_str(text).map_err(|e| {
        let span = e.span().unwrap_or(0..0);
        error_at(path, text, span, e.message().trim_end().replace("expected i64", "expected an integer"))
    })?;
    let base = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut nodes = Vec::new();
    let mut spans = Vec::new();
    // In the order the file lists them.
    let mut listed: Vec<(String, Spanned<RawNode>)> = raw.jobs.into_iter().collect();
    listed.sort_by_key(|(_, n)| n.span().start);
    for (name, node) in listed {
        let at = node.span();
        let node = node.into_inner();
        let job = node_job(path, text, &base, &name, at.clone(), &node)?;
        let int = |v: &Option<Spanned<i64>>, d: i64| v.as_ref().map_or(d, |v| *v.get_ref());
        let (count, retries) = (int(&node.count, 1), int(&node.retries, 0));
        spans.push((at, node.after.iter().map(|a| a.span()).collect::<Vec<_>>(), node_spans(&node)));
        nodes.push((name, job, node, count, retries));
    }
    let afters: Vec<Vec<String>> =
        nodes.iter().map(|(_, _, n, _, _)| n.after.iter().map(|a| a.get_ref().clone()).collect()).collect();
    let inputs: Vec<BTreeMap<String, Vec<String>>> = nodes
        .iter()
        .map(|(_, _, n, _, _)| n.inputs_from.iter().map(|(k, v)| (k.clone(), v.get_ref().clone())).collect())
        .collect();
    let dests: Vec<Vec<String>> = nodes
        .iter()
        .map(|(_, job, _, _, _)| job.files.inputs.iter().map(|i| i.dest.to_string_lossy().into_owned()).collect())
        .collect();
    let shapes: Vec<check::DagNode<'_>> = nodes
        .iter()
        .enumerate()
        .map(|(i, (name, _, n, count, retries))| check::DagNode {
            name,
            after: &afters[i],
            count: *count,
            inputs_from: &inputs[i],
            retries: *retries,
            final_node: n.final_node.as_ref().is_some_and(|f| *f.get_ref()),
            inputs: dests[i].iter().map(String::as_str).collect(),
        })
        .collect();
    if let Err(inv) = check::check_dag(&shapes) {
        let (at, after, keys) = &spans[inv.node.min(spans.len().saturating_sub(1))];
        let span = match &inv.field {
            DagField::After(k) => after.get(*k).cloned(),
            DagField::Count => keys.count.clone(),
            DagField::Retries => keys.retries.clone(),
            DagField::Final => keys.final_node.clone(),
            DagField::InputsFrom(p) => keys.inputs_from.get(p).cloned(),
            DagField::Name => None,
        };
        return Err(error_at(path, text, span.unwrap_or_else(|| at.clone()), inv.message));
    }
    let final_flags: Vec<bool> = shapes.iter().map(|s| s.final_node).collect();
    let nodes = nodes
        .into_iter()
        .zip(afters.into_iter().zip(inputs))
        .zip(final_flags)
        .map(|(((name, job, _, count, retries), (after, inputs_from)), final_node)| FlowNode {
            name,
            job,
            after,
            count: count as u64,
            inputs_from,
            retries: retries as u32,
            final_node,
        })
        .collect();
    Ok(Flow { source: path.to_path_buf(), name: flow_name(path), nodes })
}

/// Where a node's keys were written, for the shape rules' errors.
struct KeySpans {
    count: Option<Range<usize>>,
    retries: Option<Range<usize>>,
    final_node: Option<Range<usize>>,
    inputs_from: BTreeMap<String, Range<usize>>,
}

fn node_spans(n: &RawNode) -> KeySpans {
    KeySpans {
        count: n.count.as_ref().map(|c| c.span()),
        retries: n.retries.as_ref().map(|c| c.span()),
        final_node: n.final_node.as_ref().map(|c| c.span()),
        inputs_from: n.inputs_from.iter().map(|(k, v)| (k.clone(), v.span())).collect(),
    }
}

/// The node's job: its job file, or the job written inline.
fn node_job(
    path: &Path,
    text: &str,
    base: &Path,
    name: &str,
    at: Range<usize>,
    n: &RawNode,
) -> Result<Job, JobFileError> {
    let inline = n.vm.is_some() || n.name.is_some() || n.resources.is_some() || n.files.is_some() || n.policy.is_some();
    match (&n.file, inline) {
        (Some(f), false) => match crate::load_job(&base.join(f.get_ref())) {
            Err(JobFileError::Read { path: file, message }) => {
                let m = format!("job `{name}`: cannot read its job file `{}`: {message}", file.display());
                Err(error_at(path, text, f.span(), m))
            }
            other => other,
        },
        (Some(f), true) => Err(error_at(
            path,
            text,
            f.span(),
            format!("job `{name}` has both `file` and an inline job ([jobs.{name}.vm] …): keep one"),
        )),
        (None, _) => {
            let Some(vm) = &n.vm else {
                let m =
                    format!("job `{name}` needs `file = \"job.toml\"` or an inline job with a [jobs.{name}.vm] table");
                return Err(error_at(path, text, at, m));
            };
            let raw = RawJob {
                name: n.name.clone(),
                vm: vm.clone(),
                resources: n.resources.clone().unwrap_or_default(),
                files: n.files.clone().unwrap_or_default(),
                policy: n.policy.clone().unwrap_or_default(),
            };
            let mut job = job_from_raw(path, text, raw)?;
            if n.name.is_none() {
                // Named after its node (whose name passed the same rules), not after the flow file.
                job.name = name.to_string();
            }
            Ok(job)
        }
    }
}

/// The flow file's stem, made to fit the rules for names.
fn flow_name(path: &Path) -> String {
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    let name: String = stem
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' })
        .take(crate::limits::MAX_NAME_LEN)
        .collect();
    if name.is_empty() { "flow".into() } else { name }
}

#[cfg(test)]
mod tests;
