//! The tidy checks, in rust-analyzer's manner: what ARCHITECTURE.md promises about the code,
//! checked by reading the workspace under `cargo test` (`tests/tidy.rs` runs them on this
//! repository; the unit tests below show each check failing on a workspace that breaks it).
//!
//! A [`Workspace`] is read from disk once: each member crate's manifest and its Rust sources.
//! Every check returns the problems it found as sentences that name the file; none changes
//! anything.

pub mod rules;
pub mod source;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One member crate: its package name, its library name, its dependencies and its sources.
#[derive(Debug, Clone)]
pub struct Crate {
    pub name: String,
    pub dir: PathBuf,
    /// The name its code is imported by (`[lib] name`, else the package name with `_`).
    pub lib_name: String,
    /// Normal dependencies, by package name.
    pub deps: Vec<String>,
    pub dev_deps: Vec<String>,
    /// Rust files: under `src/` (code), and under `tests/`, `benches/` and `examples/` (tests).
    pub code: Vec<SourceFile>,
    pub tests: Vec<SourceFile>,
}

#[derive(Debug, Clone)]
pub struct SourceFile {
    pub path: PathBuf,
    pub text: String,
}

#[derive(Debug, Clone)]
pub struct Workspace {
    pub root: PathBuf,
    pub crates: Vec<Crate>,
    /// The library name of every member, by package name.
    pub lib_names: BTreeMap<String, String>,
}

/// Reads the workspace whose root manifest is in `root`: its members and, for each, its manifest
/// and the `.rs` files under it.
pub fn read_workspace(root: &Path) -> Result<Workspace, String> {
    let manifest = read_toml(&root.join("Cargo.toml"))?;
    let members = manifest
        .get("workspace")
        .and_then(|w| w.get("members"))
        .and_then(|m| m.as_array())
        .ok_or("the root Cargo.toml has no [workspace] members")?;
    let mut crates = Vec::new();
    for m in members {
        let dir = root.join(m.as_str().ok_or("a workspace member is not a string")?);
        crates.push(read_crate(&dir)?);
    }
    let lib_names = crates.iter().map(|c| (c.name.clone(), c.lib_name.clone())).collect();
    Ok(Workspace { root: root.to_path_buf(), crates, lib_names })
}

fn read_toml(path: &Path) -> Result<toml::Table, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    text.parse::<toml::Table>().map_err(|e| format!("{}: {e}", path.display()))
}

fn dep_names(t: &toml::Table, key: &str) -> Vec<String> {
    t.get(key).and_then(|d| d.as_table()).map(|d| d.keys().cloned().collect()).unwrap_or_default()
}

fn read_crate(dir: &Path) -> Result<Crate, String> {
    let t = read_toml(&dir.join("Cargo.toml"))?;
    let name = t
        .get("package")
        .and_then(|p| p.get("name"))
        .and_then(|n| n.as_str())
        .ok_or_else(|| format!("{}: no package name", dir.display()))?
        .to_string();
    let lib_name = t
        .get("lib")
        .and_then(|l| l.get("name"))
        .and_then(|n| n.as_str())
        .map(str::to_string)
        .unwrap_or_else(|| name.replace('-', "_"));
    let mut code = Vec::new();
    let mut tests = Vec::new();
    for entry in walkdir::WalkDir::new(dir).sort_by_file_name().into_iter().filter_entry(|e| e.file_name() != "target")
    {
        let entry = entry.map_err(|e| e.to_string())?;
        let path = entry.path();
        if path.extension().is_none_or(|x| x != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let rel = path.strip_prefix(dir).unwrap_or(path);
        let file = SourceFile { path: path.to_path_buf(), text };
        match rel.components().next().and_then(|c| c.as_os_str().to_str()) {
            Some("src") => code.push(file),
            Some("tests" | "benches" | "examples") => tests.push(file),
            _ => {}
        }
    }
    Ok(Crate {
        name,
        dir: dir.to_path_buf(),
        lib_name,
        deps: dep_names(&t, "dependencies"),
        dev_deps: dep_names(&t, "dev-dependencies"),
        code,
        tests,
    })
}

impl Workspace {
    /// The name a dependency is imported by in Rust code.
    pub fn ident_of(&self, dep: &str) -> String {
        self.lib_names.get(dep).cloned().unwrap_or_else(|| dep.replace('-', "_"))
    }

    pub fn krate(&self, name: &str) -> Option<&Crate> {
        self.crates.iter().find(|c| c.name == name)
    }
}
