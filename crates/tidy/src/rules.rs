//! The rules, each a function from the workspace to the problems found. The lists below are the
//! architecture's promises (ARCHITECTURE.md, "Invariants"); changing one is changing the
//! architecture, and the doc with it.

use crate::source::{blank, code_lines, functions, unjustified_unsafe, uses_crate};
use crate::{Crate, SourceFile, Workspace};

/// Each crate's layer: a crate may depend only on crates of a lower layer.
pub const LAYERS: &[(&str, u8)] = &[
    ("vmgrid-job", 0),
    ("vmgrid-testkit", 0),
    ("vmgrid-proto", 1),
    ("vmgrid-tls", 1),
    ("vmgrid-scheduler", 2),
    ("vmgrid-runtime", 2),
    ("vmgrid-client", 2),
    ("vmgrid-slurm", 2),
    ("vmgrid-coordinator", 3),
    ("vmgrid-node", 3),
    ("vmgrid-ssi", 3),
    ("vmgrid-appliance", 4),
    ("vmgrid-bench", 5),
    ("vmgrid", 5),
    ("vmgrid-tidy", 5),
];

/// Crates that serve HTTP: the coordinator (the pool's API) and the SSI home (its processes' API).
pub const HTTP_SERVERS: &[&str] = &["vmgrid-coordinator", "vmgrid-ssi"];
const SERVER_DEPS: &[&str] = &["axum", "hyper", "hyper-util", "axum-server", "tower-http"];

/// The only crate that touches a database.
pub const DATABASE_USERS: &[&str] = &["vmgrid-coordinator"];
const DATABASE_DEPS: &[&str] = &["rusqlite", "libsqlite3-sys", "postgres", "tokio-postgres", "sqlx"];

/// Crates whose shipped code starts processes: the runtime (VMs and their tools), the appliance
/// (its image tools, through the runtime's lookup), the benchmark driver, the testkit (the
/// private services tests start; only tests depend on it), and the Slurm glide-in's `sbatch` and
/// `squeue`.
pub const PROCESS_STARTERS: &[&str] =
    &["vmgrid-runtime", "vmgrid-appliance", "vmgrid-bench", "vmgrid-testkit", "vmgrid-slurm"];

/// Crates that do no IO at all: no async runtime, network, database or process.
pub const NO_IO: &[&str] = &["vmgrid-job", "vmgrid-proto", "vmgrid-scheduler"];
const IO_DEPS: &[&str] = &["tokio", "axum", "hyper", "ureq", "rusqlite", "reqwest", "mio"];

pub const MAX_FILE_LINES: usize = 600;
pub const MAX_FN_LINES: usize = 80;

fn layer(name: &str) -> Option<u8> {
    LAYERS.iter().find(|(n, _)| *n == name).map(|(_, l)| *l)
}

/// Every member has a layer, and depends only on members of lower layers.
pub fn layering(ws: &Workspace) -> Vec<String> {
    let mut out = Vec::new();
    for c in &ws.crates {
        let Some(mine) = layer(&c.name) else {
            out.push(format!("{}: has no layer in tidy's LAYERS (and ARCHITECTURE.md's code map)", c.name));
            continue;
        };
        for d in c.deps.iter().filter(|d| ws.lib_names.contains_key(*d)) {
            match layer(d) {
                Some(theirs) if theirs < mine => {}
                _ => out.push(format!("{} depends on {d}, which is not in a lower layer", c.name)),
            }
        }
    }
    out
}

fn dep_rule(ws: &Workspace, deps: &[&str], allowed: &[&str], what: &str) -> Vec<String> {
    let mut out = Vec::new();
    for c in ws.crates.iter().filter(|c| !allowed.contains(&c.name.as_str())) {
        for d in c.deps.iter().filter(|d| deps.contains(&d.as_str())) {
            out.push(format!("{} depends on {d}, but only {} may {what}", c.name, allowed.join(", ")));
        }
    }
    out
}

/// Only the coordinator and the SSI home serve HTTP.
pub fn http_servers(ws: &Workspace) -> Vec<String> {
    dep_rule(ws, SERVER_DEPS, HTTP_SERVERS, "serve HTTP")
}

/// Only the coordinator touches a database.
pub fn database(ws: &Workspace) -> Vec<String> {
    dep_rule(ws, DATABASE_DEPS, DATABASE_USERS, "touch a database")
}

/// The pure crates do no IO.
pub fn no_io(ws: &Workspace) -> Vec<String> {
    let mut out = Vec::new();
    for c in ws.crates.iter().filter(|c| NO_IO.contains(&c.name.as_str())) {
        for d in c.deps.iter().filter(|d| IO_DEPS.contains(&d.as_str())) {
            out.push(format!("{} depends on {d}, but it does no IO", c.name));
        }
        out.extend(processes_in(c));
    }
    out
}

fn processes_in(c: &Crate) -> Vec<String> {
    let mut out = Vec::new();
    for f in &c.code {
        let b = blank(&f.text);
        for (i, l) in code_lines(&b).iter().enumerate() {
            if l.contains("Command::new(") || l.contains("process::Command") {
                out.push(format!("{}:{}: {} starts a process", f.path.display(), i + 1, c.name));
            }
        }
    }
    out
}

/// Only the runtime, the appliance and the benchmark driver start processes (tests may).
pub fn process_starters(ws: &Workspace) -> Vec<String> {
    ws.crates
        .iter()
        .filter(|c| !PROCESS_STARTERS.contains(&c.name.as_str()))
        .flat_map(|c| {
            processes_in(c)
                .into_iter()
                .map(|p| format!("{p}, but only {} may", PROCESS_STARTERS.join(", ")))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Every `unsafe` carries its `// SAFETY:` argument (tests included).
pub fn safety_comments(ws: &Workspace) -> Vec<String> {
    let mut out = Vec::new();
    for c in ws.crates.iter().filter(|c| c.name != "vmgrid-tidy") {
        for f in c.code.iter().chain(&c.tests) {
            for line in unjustified_unsafe(&f.text) {
                out.push(format!("{}:{line}: `unsafe` without a `// SAFETY:` comment above it", f.path.display()));
            }
        }
    }
    out
}

fn used_in(ws: &Workspace, files: &[&SourceFile], dep: &str) -> bool {
    let ident = ws.ident_of(dep);
    files.iter().any(|f| uses_crate(&blank(&f.text), &ident))
}

/// Every dependency is used by the code (and every dev-dependency by the code or its tests).
pub fn unused_dependencies(ws: &Workspace) -> Vec<String> {
    let mut out = Vec::new();
    for c in &ws.crates {
        let code: Vec<&SourceFile> = c.code.iter().collect();
        let all: Vec<&SourceFile> = c.code.iter().chain(&c.tests).collect();
        for d in &c.deps {
            if !used_in(ws, &code, d) {
                out.push(format!("{}: the dependency {d} is not used by its code", c.name));
            }
        }
        for d in &c.dev_deps {
            if !used_in(ws, &all, d) {
                out.push(format!("{}: the dev-dependency {d} is not used", c.name));
            }
        }
    }
    out
}

/// No file of shipped code over [`MAX_FILE_LINES`], no function over [`MAX_FN_LINES`].
pub fn sizes(ws: &Workspace) -> Vec<String> {
    let mut out = Vec::new();
    for c in &ws.crates {
        for f in c.code.iter().filter(|f| !f.path.ends_with("tests.rs") && !in_tests_dir(f)) {
            let b = blank(&f.text);
            let lines = code_lines(&b);
            if lines.len() > MAX_FILE_LINES {
                out.push(format!(
                    "{}: {} lines of code (the limit is {MAX_FILE_LINES})",
                    f.path.display(),
                    lines.len()
                ));
            }
            for func in functions(&lines).into_iter().filter(|func| func.len > MAX_FN_LINES) {
                out.push(format!(
                    "{}:{}: fn {} is {} lines (the limit is {MAX_FN_LINES})",
                    f.path.display(),
                    func.line,
                    func.name,
                    func.len
                ));
            }
        }
    }
    out
}

fn in_tests_dir(f: &SourceFile) -> bool {
    f.path.components().any(|c| c.as_os_str() == "tests")
}

/// Every source file says what it is for (`//!`), and ARCHITECTURE.md's code map names every
/// crate.
pub fn documented(ws: &Workspace, architecture: &str) -> Vec<String> {
    let mut out = Vec::new();
    for c in &ws.crates {
        let dir = c.dir.strip_prefix(&ws.root).unwrap_or(&c.dir).display().to_string();
        if !architecture.contains(&format!("`{dir}")) {
            out.push(format!("ARCHITECTURE.md's code map does not name {dir} ({})", c.name));
        }
        for f in c.code.iter().filter(|f| !f.path.ends_with("tests.rs") && !in_tests_dir(f)) {
            if !f.text.trim_start().starts_with("//!") {
                out.push(format!("{}: does not open with a `//!` saying what it is for", f.path.display()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    fn krate(name: &str, deps: &[&str], code: &str) -> Crate {
        Crate {
            name: name.into(),
            dir: PathBuf::from(format!("/ws/crates/{name}")),
            lib_name: name.replace('-', "_"),
            deps: deps.iter().map(|d| d.to_string()).collect(),
            dev_deps: vec![],
            code: vec![SourceFile { path: PathBuf::from(format!("/ws/crates/{name}/src/lib.rs")), text: code.into() }],
            tests: vec![],
        }
    }

    fn ws(crates: Vec<Crate>) -> Workspace {
        let lib_names: BTreeMap<String, String> = crates.iter().map(|c| (c.name.clone(), c.lib_name.clone())).collect();
        Workspace { root: PathBuf::from("/ws"), crates, lib_names }
    }

    #[test]
    fn each_rule_catches_what_it_forbids() {
        let w = ws(vec![
            krate("vmgrid-job", &["vmgrid-proto", "tokio"], "//! j\nuse vmgrid_proto::X; fn f() { tokio::spawn(); }\n"),
            krate("vmgrid-proto", &[], "//! p\n"),
            krate(
                "vmgrid-node",
                &["axum", "rusqlite", "serde"],
                "//! n\nfn g() { axum::x(); rusqlite::y(); std::process::Command::new(\"x\"); }\n",
            ),
            krate("vmgrid-runtime", &[], "fn h() { unsafe { x() } }\n"),
        ]);
        assert_eq!(layering(&w), vec!["vmgrid-job depends on vmgrid-proto, which is not in a lower layer"]);
        assert_eq!(http_servers(&w).len(), 1);
        assert_eq!(database(&w).len(), 1);
        assert_eq!(no_io(&w), vec!["vmgrid-job depends on tokio, but it does no IO"]);
        assert_eq!(process_starters(&w).len(), 1);
        assert_eq!(safety_comments(&w).len(), 1);
        assert_eq!(unused_dependencies(&w), vec!["vmgrid-node: the dependency serde is not used by its code"]);
        let docs = documented(&w, "| `crates/vmgrid-job` |");
        assert!(docs.iter().any(|d| d.contains("does not name crates/vmgrid-node")), "{docs:?}");
        assert!(docs.iter().any(|d| d.contains("runtime/src/lib.rs: does not open")), "{docs:?}");
    }

    #[test]
    fn long_functions_and_files_are_caught() {
        let long_fn = format!("//! x\nfn big() {{\n{}}}\n", "    a();\n".repeat(MAX_FN_LINES));
        let long_file = format!("//! x\n{}", "const A: u8 = 1;\n".repeat(MAX_FILE_LINES + 1));
        let w = ws(vec![krate("vmgrid-job", &[], &long_fn), krate("vmgrid-proto", &[], &long_file)]);
        let s = sizes(&w);
        assert_eq!(s.len(), 2, "{s:?}");
        assert!(s[0].contains("fn big is 82 lines"), "{s:?}");
    }
}
