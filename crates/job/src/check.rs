//! The one set of rules a job obeys, wherever it comes from: a job file ([`crate::parse_job`]) or a
//! spec sent to a pool's API (`vmgrid-proto`'s `JobSpec::check`, which the coordinator runs). Both
//! describe the job as a [`Shape`] and call [`check`], so a spec cannot pass at the coordinator
//! what a job file would fail. Each refusal names the [`Field`] at fault; the job-file parser turns
//! it into a line and column.

use std::collections::BTreeMap;
use std::path::{Component, Path};

use crate::{Network, VmType, limits};

pub mod grid;

/// The part of a job a rule refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Field {
    Name,
    /// The `[vm]` table as a whole (a key it lacks).
    Vm,
    Arg(usize),
    /// The value of this environment variable.
    Env(String),
    Kernel,
    Initrd,
    Append,
    Network,
    Cpus,
    MemoryMb,
    TimeoutS,
    DiskMb,
    Input(usize),
    Output(usize),
    Requirements,
    Rank,
    MaxRetries,
    Priority,
    CheckpointS,
    Replicas,
    Quorum,
    Deterministic,
}

/// Why a job is refused, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub field: Field,
    pub message: String,
}

fn invalid(field: Field, message: impl Into<String>) -> Invalid {
    Invalid { field, message: message.into() }
}

/// A job as the rules see it. Numbers are `i64` so that a job file's negative or huge values
/// reach the range checks instead of failing to convert.
#[derive(Debug, Clone)]
pub struct Shape<'a> {
    pub name: &'a str,
    pub vm_type: VmType,
    pub image: bool,
    pub args: &'a [String],
    pub env: &'a BTreeMap<String, String>,
    pub kernel: bool,
    pub initrd: bool,
    pub append: Option<&'a str>,
    /// `None` when the job does not say (the default, no network).
    pub network: Option<Network>,
    pub cpus: i64,
    /// 1, or 0 for a time-shared process of a single-system image (it takes no cpu slot).
    pub min_cpus: i64,
    pub memory_mb: i64,
    pub timeout_s: i64,
    pub disk_mb: i64,
    /// Where each input lands in the job directory.
    pub inputs: Vec<&'a str>,
    pub outputs: &'a [String],
    pub requirements: Option<&'a str>,
    pub rank: Option<&'a str>,
    pub max_retries: i64,
    /// `[policy] priority`: orders one user's jobs (higher first); fair share orders users.
    pub priority: i64,
    /// `[policy] checkpoint_s`: seconds between a QEMU job's checkpoints.
    pub checkpoint_s: Option<i64>,
    /// `[policy] replicas`: distinct nodes the job runs on, for results checked by agreement.
    pub replicas: Option<i64>,
    /// `[policy] quorum`: how many of them must agree on the result.
    pub quorum: Option<i64>,
    /// `[policy] deterministic`: a wasm job run the same way on every node.
    pub deterministic: bool,
}

/// Applies every rule; the first one broken is the answer.
pub fn check(s: &Shape<'_>) -> Result<(), Invalid> {
    name(s.name)?;
    vm(s)?;
    resources(s)?;
    for (i, dest) in s.inputs.iter().enumerate() {
        if !is_confined_path(dest) {
            return Err(invalid(Field::Input(i), format!("input `{dest}` must land inside the job directory")));
        }
    }
    for (i, pat) in s.outputs.iter().enumerate() {
        output_pattern(pat).map_err(|m| invalid(Field::Output(i), m))?;
    }
    for (field, which, src) in [(Field::Requirements, "requirements", s.requirements), (Field::Rank, "rank", s.rank)] {
        if let Some(src) = src {
            expression(which, src).map_err(|m| invalid(field, m))?;
        }
    }
    int_in(Field::MaxRetries, "max_retries", s.max_retries, 0, limits::MAX_RETRIES as i64)?;
    int_in(Field::Priority, "priority", s.priority, -limits::MAX_PRIORITY, limits::MAX_PRIORITY)?;
    grid::rules(s)?;
    checkpoint(s)?;
    replicas(s)
}

/// `replicas`, `quorum` and `deterministic`: results checked by agreement between nodes.
fn replicas(s: &Shape<'_>) -> Result<(), Invalid> {
    if s.deterministic && s.vm_type != VmType::Wasm {
        return Err(invalid(
            Field::Deterministic,
            format!(
                "`deterministic` applies only to wasm jobs (the pool cannot make a {} guest's clocks and random numbers the same on every node)",
                s.vm_type
            ),
        ));
    }
    let Some(n) = s.replicas else {
        return match s.quorum {
            Some(_) => Err(invalid(Field::Quorum, "`quorum` needs `replicas`: the number of nodes the job runs on")),
            None => Ok(()),
        };
    };
    int_in(Field::Replicas, "replicas", n, 1, limits::MAX_REPLICAS as i64)?;
    if s.checkpoint_s.is_some() && n > 1 {
        return Err(invalid(
            Field::Replicas,
            "`replicas` cannot be combined with `checkpoint_s`: a replica resumed from another node's checkpoint would not be checked by an independent run",
        ));
    }
    let q = s.quorum.unwrap_or(n / 2 + 1);
    if q <= n / 2 || q > n {
        return Err(invalid(
            Field::Quorum,
            format!("`quorum` is {q}, but must be a majority of the {n} replicas: from {} to {n}", n / 2 + 1),
        ));
    }
    Ok(())
}

/// `checkpoint_s`: only a system VM's whole state can be saved and resumed elsewhere.
fn checkpoint(s: &Shape<'_>) -> Result<(), Invalid> {
    let Some(n) = s.checkpoint_s else { return Ok(()) };
    let why = match s.vm_type {
        VmType::Qemu => None,
        VmType::Wasm => Some(
            "wasm jobs cannot be checkpointed: wasmtime has no API to save and restore a running instance; remove `checkpoint_s`, or run the work in a QEMU job",
        ),
        VmType::Jvm => Some(
            "jvm jobs cannot be checkpointed: the JVM runs as a confined host process, not a system VM whose state QEMU can save; remove `checkpoint_s`, or run the work in a QEMU job",
        ),
    };
    if let Some(why) = why {
        return Err(invalid(Field::CheckpointS, why));
    }
    int_in(Field::CheckpointS, "checkpoint_s", n, limits::MIN_CHECKPOINT_S as i64, limits::MAX_TIMEOUT_S as i64)
}

/// A user's name as the pool keys it (token owners, `vmgrid users set`): 1 to 64 letters,
/// digits, `-`, `_`, `.` or `@`.
pub fn user_name(u: &str) -> Result<(), String> {
    if u.is_empty() || u.len() > 64 || !u.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c)) {
        return Err(format!(
            "a user name is 1 to 64 letters, digits, `-`, `_`, `.` or `@`; {:?} is not",
            u.chars().take(80).collect::<String>()
        ));
    }
    Ok(())
}

/// What an admin sets for a user (`vmgrid users set`): a priority factor, a quota of running
/// cpus, or the quota's removal; at least one, and the quota either set or removed.
pub fn user_settings(user: &str, factor: Option<f64>, max_cpus: Option<u64>, no_max_cpus: bool) -> Result<(), String> {
    user_name(user)?;
    if factor.is_none() && max_cpus.is_none() && !no_max_cpus {
        return Err("nothing to set: give a priority factor, a quota of cpus, or remove the quota".into());
    }
    if max_cpus.is_some() && no_max_cpus {
        return Err("a quota cannot be set and removed at once".into());
    }
    if let Some(f) = factor
        && !(f.is_finite() && (limits::MIN_FACTOR..=limits::MAX_FACTOR).contains(&f))
    {
        return Err(format!(
            "the priority factor is {f}, but must be between {} and {} (1 is the default; larger gets a smaller share)",
            limits::MIN_FACTOR,
            limits::MAX_FACTOR
        ));
    }
    if let Some(m) = max_cpus
        && m > limits::MAX_QUOTA_CPUS
    {
        return Err(format!("the quota is {m} cpus, but must be at most {}", limits::MAX_QUOTA_CPUS));
    }
    Ok(())
}

/// The rules for names (a job's, a workflow's): 1 to 128 letters, digits, `-`, `_` and `.`.
pub fn check_name(n: &str) -> Result<(), String> {
    name(n).map_err(|inv| inv.message)
}

fn name(n: &str) -> Result<(), Invalid> {
    if n.is_empty() || n.len() > limits::MAX_NAME_LEN {
        return Err(invalid(Field::Name, format!("`name` must be 1 to {} characters", limits::MAX_NAME_LEN)));
    }
    if !n.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
        return Err(invalid(Field::Name, "`name` may use only letters, digits, `-`, `_` and `.`"));
    }
    Ok(())
}

fn vm(s: &Shape<'_>) -> Result<(), Invalid> {
    if s.vm_type == VmType::Qemu {
        qemu_files(s)?;
    } else {
        let qemu_only = [
            (Field::Kernel, "kernel", s.kernel),
            (Field::Initrd, "initrd", s.initrd),
            (Field::Append, "append", s.append.is_some()),
            (Field::Network, "network", s.network.is_some()),
        ];
        if let Some((field, key, _)) = qemu_only.into_iter().find(|(_, _, set)| *set) {
            return Err(invalid(
                field,
                format!("`{key}` applies only to qemu jobs, and this job's vm type is `{}`", s.vm_type),
            ));
        }
        if !s.image {
            return Err(invalid(Field::Vm, format!("a {} job needs `image` in [vm]", s.vm_type)));
        }
    }
    if s.args.len() > limits::MAX_ARGS {
        return Err(invalid(Field::Arg(limits::MAX_ARGS), format!("at most {} args", limits::MAX_ARGS)));
    }
    if let Some(i) = s.args.iter().position(|a| a.contains('\0')) {
        return Err(invalid(Field::Arg(i), "an argument may not contain a NUL byte"));
    }
    if s.env.len() > limits::MAX_ENV {
        let key = s.env.keys().nth(limits::MAX_ENV).cloned().unwrap_or_default();
        return Err(invalid(Field::Env(key), format!("at most {} environment variables", limits::MAX_ENV)));
    }
    for (k, v) in s.env {
        if !is_env_name(k) {
            return Err(invalid(
                Field::Env(k.clone()),
                format!("environment variable name `{k}` must be letters, digits and `_`, not starting with a digit"),
            ));
        }
        if v.contains('\0') {
            return Err(invalid(Field::Env(k.clone()), "an environment value may not contain a NUL byte"));
        }
    }
    let arg_bytes: usize = s.args.iter().map(|a| a.len() + 1).sum::<usize>()
        + s.env.iter().map(|(k, v)| k.len() + v.len() + 2).sum::<usize>();
    if arg_bytes > limits::MAX_ARGV_ENV_BYTES {
        return Err(invalid(
            Field::Vm,
            format!("args and env take {arg_bytes} bytes; the limit is {}", limits::MAX_ARGV_ENV_BYTES),
        ));
    }
    if s.vm_type == VmType::Qemu && s.kernel {
        kernel_cmdline(s)?;
    }
    Ok(())
}

fn qemu_files(s: &Shape<'_>) -> Result<(), Invalid> {
    if !s.image && !s.kernel {
        return Err(invalid(
            Field::Vm,
            "a qemu job needs `image` (a disk image), `kernel` (direct kernel boot), or both",
        ));
    }
    if s.kernel {
        return Ok(());
    }
    for (field, key, set) in [(Field::Initrd, "initrd", s.initrd), (Field::Append, "append", s.append.is_some())] {
        if set {
            return Err(invalid(field, format!("`{key}` needs `kernel`: it is used only for direct kernel boot")));
        }
    }
    if !s.args.is_empty() {
        return Err(invalid(
            Field::Arg(0),
            "qemu `args` need `kernel`: they are passed to the guest's init on the kernel command line",
        ));
    }
    if let Some(k) = s.env.keys().next() {
        return Err(invalid(
            Field::Env(k.clone()),
            "qemu `env` needs `kernel`: it is passed to the guest's init on the kernel command line",
        ));
    }
    Ok(())
}

/// Direct-kernel-boot jobs carry args and env on the kernel command line, whose syntax allows
/// double quotes around spaces but no quote inside a value, and whose length is bounded.
fn kernel_cmdline(s: &Shape<'_>) -> Result<(), Invalid> {
    // Linux gives init at most 32 argv and 32 envp entries, and uses some of each itself.
    if s.args.len() > limits::MAX_KERNEL_INIT_ARGS {
        return Err(invalid(
            Field::Arg(limits::MAX_KERNEL_INIT_ARGS),
            format!("a qemu job passes at most {} args to the guest's init", limits::MAX_KERNEL_INIT_ARGS),
        ));
    }
    if let Some(k) = s.env.keys().nth(limits::MAX_KERNEL_INIT_ENV) {
        return Err(invalid(
            Field::Env(k.clone()),
            format!("a qemu job passes at most {} env variables to the guest's init", limits::MAX_KERNEL_INIT_ENV),
        ));
    }
    if let Some(a) = s.append
        && a.contains(['\n', '\0'])
    {
        return Err(invalid(Field::Append, "`append` is one kernel command line: no newline or NUL byte"));
    }
    let mut len = s.append.map_or(0, str::len);
    for (i, a) in s.args.iter().enumerate() {
        if a.contains(['"', '\n']) {
            return Err(invalid(
                Field::Arg(i),
                "qemu args travel on the kernel command line and may not contain `\"` or a newline",
            ));
        }
        len += a.len() + 3;
    }
    for (k, v) in s.env {
        if v.contains(['"', '\n']) {
            return Err(invalid(
                Field::Env(k.clone()),
                "qemu env values travel on the kernel command line and may not contain `\"` or a newline",
            ));
        }
        len += k.len() + v.len() + 4;
    }
    if len > limits::MAX_KERNEL_CMDLINE {
        return Err(invalid(
            Field::Append,
            format!(
                "append, args and env make a kernel command line of {len} bytes; the limit is {}",
                limits::MAX_KERNEL_CMDLINE
            ),
        ));
    }
    Ok(())
}

fn resources(s: &Shape<'_>) -> Result<(), Invalid> {
    let max_mem = if s.vm_type == VmType::Wasm { limits::MAX_WASM_MEMORY_MB } else { limits::MAX_MEMORY_MB };
    int_in(Field::Cpus, "cpus", s.cpus, s.min_cpus, limits::MAX_CPUS as i64)?;
    int_in(Field::MemoryMb, "memory_mb", s.memory_mb, 1, max_mem as i64)?;
    int_in(Field::TimeoutS, "timeout_s", s.timeout_s, 1, limits::MAX_TIMEOUT_S as i64)?;
    int_in(Field::DiskMb, "disk_mb", s.disk_mb, 1, limits::MAX_DISK_MB as i64)
}

fn int_in(field: Field, key: &str, x: i64, min: i64, max: i64) -> Result<(), Invalid> {
    if x < min || x > max {
        return Err(invalid(field, format!("`{key}` is {x}, but must be between {min} and {max}")));
    }
    Ok(())
}

/// Letters, digits and `_`, not starting with a digit.
pub fn is_env_name(k: &str) -> bool {
    !k.is_empty()
        && !k.starts_with(|c: char| c.is_ascii_digit())
        && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// An output glob: relative to the job directory, without `..`, and a valid glob.
pub fn output_pattern(pat: &str) -> Result<(), String> {
    let p = Path::new(pat);
    if pat.is_empty()
        || pat.contains('\0')
        || p.is_absolute()
        || p.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir))
    {
        return Err(format!("output pattern `{pat}` must be relative to the job directory, without `..`"));
    }
    if let Err(e) = globset::Glob::new(pat) {
        return Err(format!("output pattern `{pat}` is not a valid glob: {}", e.kind()));
    }
    Ok(())
}

/// Whether an output's relative `path` matches one of `patterns`, as output collection matches
/// them: `*` does not cross `/`, `**` does, and a leading `./` is ignored. Patterns that do not
/// pass [`output_pattern`] match nothing.
pub fn matches_output(patterns: &[String], path: &str) -> bool {
    patterns.iter().any(|pat| {
        let pat = pat.strip_prefix("./").unwrap_or(pat);
        globset::GlobBuilder::new(pat).literal_separator(true).build().is_ok_and(|g| g.compile_matcher().is_match(path))
    })
}

/// A CEL expression: bounded in size, in cost and in nesting, and one that parses, so that what
/// the matchmaker compiles is small and a job file is refused at its line for what the pool
/// would refuse.
fn expression(which: &'static str, src: &str) -> Result<(), String> {
    if src.len() > limits::MAX_EXPRESSION_LEN {
        return Err(format!("`{which}` is {} bytes long; the limit is {}", src.len(), limits::MAX_EXPRESSION_LEN));
    }
    if src.contains('\0') {
        return Err(format!("`{which}` may not contain a NUL byte"));
    }
    crate::expr::parses(which, src).map_err(|e| e.to_string())
}

/// Whether a relative path from a job is safe to create under a directory: relative, with only
/// normal components, no NUL byte.
pub fn is_confined_path(p: &str) -> bool {
    let path = Path::new(p);
    !p.is_empty()
        && !p.contains('\0')
        && !path.is_absolute()
        && path.components().all(|c| matches!(c, Component::Normal(_)))
}

/// A node of a workflow (a DAG of jobs) as the rules see it; its job is checked by [`check`].
#[derive(Debug, Clone)]
pub struct DagNode<'a> {
    pub name: &'a str,
    pub after: &'a [String],
    pub count: i64,
    /// Parent name → globs over that parent's outputs.
    pub inputs_from: &'a BTreeMap<String, Vec<String>>,
    pub retries: i64,
    pub final_node: bool,
    /// Where the job's own inputs land in its directory.
    pub inputs: Vec<&'a str>,
}

/// The part of a workflow a rule refused: which key of node `node` (an index into the nodes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DagField {
    Name,
    After(usize),
    Count,
    /// The entry for this parent in `inputs_from`.
    InputsFrom(String),
    Retries,
    Final,
}

/// Why a workflow is refused, and where; the message names the nodes concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DagInvalid {
    pub node: usize,
    pub field: DagField,
    pub message: String,
}

fn dag_invalid(node: usize, field: DagField, message: impl Into<String>) -> DagInvalid {
    DagInvalid { node, field, message: message.into() }
}

/// The rules of a workflow's shape: node names, known dependencies, `inputs_from` only from a
/// node in `after` with valid globs, bounds on `count` and `retries`, at most one final node
/// (with no dependencies either way), and no cycle (refused with the nodes on it, in order).
pub fn check_dag(nodes: &[DagNode<'_>]) -> Result<(), DagInvalid> {
    if nodes.is_empty() || nodes.len() > limits::MAX_DAG_NODES {
        return Err(dag_invalid(0, DagField::Name, format!("a flow has 1 to {} jobs", limits::MAX_DAG_NODES)));
    }
    let edges: usize = nodes.iter().map(|n| n.after.len()).sum();
    if edges > limits::MAX_DAG_EDGES {
        let m = format!("the flow's jobs name {edges} jobs in `after` in all; at most {}", limits::MAX_DAG_EDGES);
        return Err(dag_invalid(0, DagField::After(0), m));
    }
    let index: BTreeMap<&str, usize> = nodes.iter().enumerate().map(|(i, n)| (n.name, i)).collect();
    let mut finals = 0;
    for (i, n) in nodes.iter().enumerate() {
        name(n.name).map_err(|inv| dag_invalid(i, DagField::Name, format!("job `{}`: {}", n.name, inv.message)))?;
        // A job's name is the directory its children find its outputs in.
        if n.name == "." || n.name == ".." {
            let m = format!("job `{}`: a job's name names the directory its outputs go to in its children", n.name);
            return Err(dag_invalid(i, DagField::Name, m));
        }
        if index[n.name] != i {
            return Err(dag_invalid(i, DagField::Name, format!("two jobs are named `{}`", n.name)));
        }
        let node_int = |field, key: &str, x: i64, min: i64, max: i64| {
            int_in(Field::Name, key, x, min, max)
                .map_err(|inv| dag_invalid(i, field, format!("job `{}`: {}", n.name, inv.message)))
        };
        node_int(DagField::Count, "count", n.count, 1, limits::MAX_DAG_COUNT as i64)?;
        node_int(DagField::Retries, "retries", n.retries, 0, limits::MAX_RETRIES as i64)?;
        for (k, dep) in n.after.iter().enumerate() {
            if !index.contains_key(dep.as_str()) {
                let m = format!("job `{}` runs after `{dep}`, which is not a job of this flow", n.name);
                return Err(dag_invalid(i, DagField::After(k), m));
            }
            if nodes[index[dep.as_str()]].final_node {
                let m = format!("job `{}` runs after `{dep}`, the final job, which runs last", n.name);
                return Err(dag_invalid(i, DagField::After(k), m));
            }
        }
        dag_inputs_from(i, n)?;
        if n.final_node {
            finals += 1;
            if finals > 1 {
                return Err(dag_invalid(
                    i,
                    DagField::Final,
                    format!("job `{}`: a flow has at most one final job", n.name),
                ));
            }
            if !n.after.is_empty() {
                let m = format!("job `{}` is final: it runs after all the others, so it takes no `after`", n.name);
                return Err(dag_invalid(i, DagField::After(0), m));
            }
        }
    }
    match find_cycle(nodes, &index) {
        Some(cycle) => {
            let names: Vec<&str> = cycle.iter().map(|&i| nodes[i].name).collect();
            let first = cycle[0];
            let m = format!("the flow has a cycle: {} -> {}", names.join(" -> "), names[0]);
            Err(dag_invalid(first, DagField::After(0), m))
        }
        None => Ok(()),
    }
}

/// Node `i`'s `inputs_from`: only from a parent in its `after`, with valid globs, landing where
/// none of its own inputs does.
fn dag_inputs_from(i: usize, n: &DagNode<'_>) -> Result<(), DagInvalid> {
    for (parent, globs) in n.inputs_from {
        let at = DagField::InputsFrom(parent.clone());
        if !n.after.contains(parent) {
            let m = format!("job `{}` takes inputs from `{parent}`, which is not in its `after`", n.name);
            return Err(dag_invalid(i, at, m));
        }
        if globs.is_empty() {
            return Err(dag_invalid(i, at, format!("job `{}`: inputs_from `{parent}` names no pattern", n.name)));
        }
        for g in globs {
            output_pattern(g).map_err(|m| dag_invalid(i, at.clone(), format!("job `{}`: inputs_from {m}", n.name)))?;
        }
        let prefix = format!("{parent}/");
        if let Some(own) = n.inputs.iter().find(|d| **d == parent || d.starts_with(&prefix)) {
            let m = format!(
                "job `{}`: its input `{own}` would land where the inputs from `{parent}` go ({parent}/…)",
                n.name
            );
            return Err(dag_invalid(i, at, m));
        }
    }
    Ok(())
}

/// One cycle of the `after` graph, as the nodes on it in dependency order, if there is one.
fn find_cycle(nodes: &[DagNode<'_>], index: &BTreeMap<&str, usize>) -> Option<Vec<usize>> {
    // 0: unseen, 1: on the current path, 2: done. Iterative, so a long chain cannot overflow.
    let mut mark = vec![0u8; nodes.len()];
    for start in 0..nodes.len() {
        if mark[start] != 0 {
            continue;
        }
        let mut path: Vec<(usize, usize)> = vec![(start, 0)];
        mark[start] = 1;
        while let Some(&mut (n, ref mut next)) = path.last_mut() {
            let Some(dep) = nodes[n].after.get(*next) else {
                mark[n] = 2;
                path.pop();
                continue;
            };
            *next += 1;
            let d = index[dep.as_str()];
            match mark[d] {
                0 => {
                    mark[d] = 1;
                    path.push((d, 0));
                }
                1 => {
                    let at = path.iter().position(|&(p, _)| p == d).expect("on the path");
                    // The path runs child → parent; a cycle reads parent → child, from its first node.
                    let mut cycle: Vec<usize> = path[at..].iter().rev().map(|&(p, _)| p).collect();
                    let first = cycle.iter().enumerate().min_by_key(|&(_, n)| *n).map_or(0, |(i, _)| i);
                    cycle.rotate_left(first);
                    return Some(cycle);
                }
                _ => {}
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wasm<'a>(args: &'a [String], env: &'a BTreeMap<String, String>) -> Shape<'a> {
        Shape {
            name: "j",
            vm_type: VmType::Wasm,
            image: true,
            args,
            env,
            kernel: false,
            initrd: false,
            append: None,
            network: None,
            cpus: 1,
            min_cpus: 1,
            memory_mb: 64,
            timeout_s: 10,
            disk_mb: 10,
            inputs: vec!["in.txt"],
            outputs: &[],
            requirements: None,
            rank: None,
            max_retries: 0,
            priority: 0,
            checkpoint_s: None,
            replicas: None,
            quorum: None,
            deterministic: false,
        }
    }

    #[test]
    fn a_flow_names_at_most_max_dag_edges_dependencies_in_all() {
        let names: Vec<String> = (0..1001).map(|i| format!("n{i}")).collect();
        let from = BTreeMap::new();
        // 200 roots; each of the 801 others runs after the first `k` roots.
        let flow = |k: usize| -> Result<(), DagInvalid> {
            let nodes: Vec<DagNode<'_>> = (0..1001)
                .map(|i| DagNode {
                    name: &names[i],
                    after: if i < 200 { &[] } else { &names[..k] },
                    count: 1,
                    inputs_from: &from,
                    retries: 0,
                    final_node: false,
                    inputs: vec![],
                })
                .collect();
            check_dag(&nodes)
        };
        assert_eq!(flow(124), Ok(()), "801 × 124 = 99,324 dependencies");
        let err = flow(125).unwrap_err();
        assert_eq!(err.message, "the flow's jobs name 100125 jobs in `after` in all; at most 100000");
    }

    #[test]
    fn a_plain_wasm_job_passes() {
        let env = BTreeMap::from([("MODE".to_string(), "fast".to_string())]);
        assert_eq!(check(&wasm(&["a".into()], &env)), Ok(()));
    }

    #[test]
    fn each_rule_names_its_field() {
        let none = BTreeMap::new();
        let args: Vec<String> = vec!["ok".into(), "nul\0".into()];
        assert_eq!(check(&wasm(&args, &none)).unwrap_err().field, Field::Arg(1));
        let bad_key = BTreeMap::from([("A B".to_string(), "x".to_string())]);
        assert_eq!(check(&wasm(&[], &bad_key)).unwrap_err().field, Field::Env("A B".into()));
        let mut s = wasm(&[], &none);
        s.name = "x,process=evil";
        assert_eq!(check(&s).unwrap_err().field, Field::Name);
        let mut s = wasm(&[], &none);
        s.cpus = 0;
        assert_eq!(check(&s).unwrap_err().message, "`cpus` is 0, but must be between 1 and 256");
        s.min_cpus = 0;
        assert_eq!(check(&s), Ok(()), "time-shared jobs may ask for no cpu");
        let mut s = wasm(&[], &none);
        s.inputs = vec!["../escape"];
        assert_eq!(check(&s).unwrap_err().field, Field::Input(0));
        let outs = vec!["out/[".to_string()];
        let mut s = wasm(&[], &none);
        s.outputs = &outs;
        assert!(check(&s).unwrap_err().message.contains("not a valid glob"));
        let big = "1+".repeat(limits::MAX_EXPRESSION_LEN) + "1";
        let mut s = wasm(&[], &none);
        s.requirements = Some(&big);
        assert_eq!(check(&s).unwrap_err().field, Field::Requirements);
        let mut s = wasm(&[], &none);
        s.priority = 1001;
        assert_eq!(check(&s).unwrap_err().message, "`priority` is 1001, but must be between -1000 and 1000");
        s.priority = -1000;
        assert_eq!(check(&s), Ok(()));
    }

    #[test]
    fn user_settings_are_bounded() {
        assert_eq!(user_settings("alice", Some(2.0), Some(8), false), Ok(()));
        assert_eq!(user_settings("alice", None, None, true), Ok(()));
        assert!(user_settings("alice", None, None, false).unwrap_err().starts_with("nothing to set"));
        assert!(user_settings("alice", None, Some(8), true).unwrap_err().contains("set and removed"));
        assert!(user_settings("al ice", Some(1.0), None, false).unwrap_err().starts_with("a user name"));
        assert!(user_settings("", Some(1.0), None, false).is_err());
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e7] {
            let e = user_settings("alice", Some(bad), None, false).unwrap_err();
            assert!(e.contains("must be between 0.01 and 1000000"), "{e}");
        }
        assert!(user_settings("alice", None, Some(u64::MAX), false).unwrap_err().contains("at most 1000000"));
    }

    #[test]
    fn qemu_rules_hold_for_the_kernel_command_line() {
        let none = BTreeMap::new();
        let args: Vec<String> = vec!["sh".into(), "say \"hi\"".into()];
        let mut s = wasm(&args, &none);
        s.vm_type = VmType::Qemu;
        s.image = false;
        s.kernel = true;
        assert_eq!(check(&s).unwrap_err().field, Field::Arg(1));
        let long = "x".repeat(3000);
        let mut s = wasm(&[], &none);
        s.vm_type = VmType::Qemu;
        s.kernel = true;
        s.append = Some(&long);
        assert!(check(&s).unwrap_err().message.contains("kernel command line of 3000 bytes"));
        let mut s = wasm(&[], &none);
        s.network = Some(Network::User);
        assert_eq!(check(&s).unwrap_err().field, Field::Network, "network is for qemu jobs only");
    }

    #[test]
    fn confined_paths_stay_inside() {
        for ok in ["a", "a/b.txt", "out/x/y"] {
            assert!(is_confined_path(ok), "{ok}");
        }
        for bad in ["", "/etc/passwd", "../x", "a/../../b", "./a", "a/./b/..", "a\0b"] {
            assert!(!is_confined_path(bad), "{bad}");
        }
    }
}
