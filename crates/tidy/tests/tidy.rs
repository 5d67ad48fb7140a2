//! The tidy checks on this repository: each test is one promise of ARCHITECTURE.md, and fails
//! with the places that break it.

use std::path::{Path, PathBuf};
use std::process::Command;

use vmgrid_tidy::{Workspace, read_workspace, rules};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn workspace() -> Workspace {
    read_workspace(&root()).unwrap()
}

fn clean(what: &str, problems: Vec<String>) {
    assert!(problems.is_empty(), "{what}:\n  {}", problems.join("\n  "));
}

#[test]
fn crates_depend_only_on_lower_layers() {
    clean("layering", rules::layering(&workspace()));
}

#[test]
fn only_the_coordinator_and_the_ssi_home_serve_http() {
    clean("HTTP servers", rules::http_servers(&workspace()));
}

#[test]
fn only_the_coordinator_touches_a_database() {
    clean("databases", rules::database(&workspace()));
}

#[test]
fn the_job_file_the_wire_and_the_matchmaker_do_no_io() {
    clean("IO in pure crates", rules::no_io(&workspace()));
}

#[test]
fn only_the_runtime_the_appliance_and_the_bench_start_processes() {
    clean("process starters", rules::process_starters(&workspace()));
}

#[test]
fn every_unsafe_says_why_it_is_sound() {
    clean("SAFETY comments", rules::safety_comments(&workspace()));
}

#[test]
fn no_dependency_is_unused() {
    clean("unused dependencies", rules::unused_dependencies(&workspace()));
}

#[test]
fn no_file_or_function_is_too_long() {
    clean("sizes", rules::sizes(&workspace()));
}

#[test]
fn every_crate_and_module_is_documented() {
    let architecture = std::fs::read_to_string(root().join("ARCHITECTURE.md")).unwrap();
    clean("documentation", rules::documented(&workspace(), &architecture));
}

fn cargo(args: &[&str]) -> std::process::Output {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args(args)
        .current_dir(root())
        // Its own target directory: the test build holds the lock on the workspace's.
        .env("CARGO_TARGET_DIR", root().join("target/tidy"))
        .output()
        .unwrap()
}

#[test]
fn the_code_is_formatted() {
    let out = cargo(&["fmt", "--all", "--", "--check"]);
    assert!(out.status.success(), "cargo fmt --check:\n{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn clippy_finds_nothing() {
    let out = cargo(&["clippy", "--workspace", "--all-targets", "--locked", "--quiet", "--", "-D", "warnings"]);
    assert!(out.status.success(), "cargo clippy -D warnings:\n{}", String::from_utf8_lossy(&out.stderr));
}
