//! The job directory: inputs staged in, outputs collected out, and nothing else.
//!
//! Every path that comes from a job is confined here: input destinations are relative paths with
//! only normal components (checked by `vmgrid-job`), and output collection walks the job directory
//! without following symlinks, so a guest cannot make us copy a file from outside it.

use std::fs;
use std::path::{Path, PathBuf};

use globset::{GlobBuilder, GlobSetBuilder};
use vmgrid_job::Job;

use crate::RunError;

/// Files that vmgrid itself puts in the job directory; never collected as outputs.
pub const RESERVED_PREFIX: &str = ".vmgrid-";

/// Copies the job's inputs into `job_dir` (files, or directories recursively).
pub fn stage_inputs(job: &Job, job_dir: &Path) -> Result<(), RunError> {
    for input in &job.files.inputs {
        let meta = fs::metadata(&input.source)
            .map_err(|e| RunError::BadJob(format!("input `{}` cannot be read: {e}", input.source.display())))?;
        let dest = job_dir.join(&input.dest);
        if meta.is_dir() {
            copy_tree(&input.source, &dest)?;
        } else {
            copy_file(&input.source, &dest)?;
        }
    }
    Ok(())
}

fn copy_file(from: &Path, to: &Path) -> Result<(), RunError> {
    if let Some(parent) = to.parent() {
        fs::create_dir_all(parent).map_err(|e| RunError::host(format!("cannot create {}", parent.display()), e))?;
    }
    fs::copy(from, to).map_err(|e| RunError::BadJob(format!("cannot copy input `{}`: {e}", from.display())))?;
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> Result<(), RunError> {
    for entry in walkdir::WalkDir::new(from) {
        let entry = entry.map_err(|e| RunError::BadJob(format!("cannot read input `{}`: {e}", from.display())))?;
        let rel = entry.path().strip_prefix(from).expect("walkdir yields paths under its root");
        let dest = to.join(rel);
        if entry.file_type().is_dir() {
            fs::create_dir_all(&dest).map_err(|e| RunError::host(format!("cannot create {}", dest.display()), e))?;
        } else if entry.file_type().is_file() {
            copy_file(entry.path(), &dest)?;
        }
    }
    Ok(())
}

/// What output collection did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Collected {
    /// Relative paths of the files copied.
    pub files: Vec<PathBuf>,
    /// Matches that were not copied, with the reason (symlinks, special files).
    pub skipped: Vec<(PathBuf, String)>,
}

/// Copies the files in `job_dir` that match the job's output globs into `out_dir`, keeping their
/// relative paths. `*` does not cross `/`; `**` does.
pub fn collect_outputs(job: &Job, job_dir: &Path, out_dir: &Path) -> Result<Collected, RunError> {
    let mut collected = Collected::default();
    if job.files.outputs.is_empty() {
        return Ok(collected);
    }
    let mut set = GlobSetBuilder::new();
    for pat in &job.files.outputs {
        let pat = pat.strip_prefix("./").unwrap_or(pat);
        let glob = GlobBuilder::new(pat)
            .literal_separator(true)
            .build()
            .map_err(|e| RunError::BadJob(format!("output pattern `{pat}`: {e}")))?;
        set.add(glob);
    }
    let set = set.build().map_err(|e| RunError::BadJob(format!("output patterns: {e}")))?;
    for entry in walkdir::WalkDir::new(job_dir).min_depth(1).sort_by_file_name() {
        let entry = entry.map_err(|e| RunError::host("cannot read the job directory", e))?;
        let rel = entry.path().strip_prefix(job_dir).expect("walkdir yields paths under its root").to_path_buf();
        if rel.to_string_lossy().starts_with(RESERVED_PREFIX) || !set.is_match(&rel) {
            continue;
        }
        let ft = entry.file_type();
        if ft.is_file() {
            let dest = out_dir.join(&rel);
            if let Some(parent) = dest.parent() {
                fs::create_dir_all(parent)
                    .map_err(|e| RunError::host(format!("cannot create {}", parent.display()), e))?;
            }
            fs::copy(entry.path(), &dest).map_err(|e| RunError::host(format!("cannot write {}", dest.display()), e))?;
            collected.files.push(rel);
        } else if ft.is_symlink() {
            collected.skipped.push((rel, "a symlink; outputs must be regular files".into()));
        } else if !ft.is_dir() {
            collected.skipped.push((rel, "not a regular file".into()));
        }
    }
    Ok(collected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job_with_outputs(outputs: &[&str]) -> Job {
        let list = outputs.iter().map(|o| format!("\"{o}\"")).collect::<Vec<_>>().join(", ");
        let text = format!("[vm]\ntype = \"wasm\"\nimage = \"a.wat\"\n[files]\noutputs = [{list}]\n");
        vmgrid_job::parse_job(Path::new("job.toml"), &text).unwrap()
    }

    #[test]
    fn collects_matching_files_with_subdirectories_and_skips_symlinks() {
        let job_dir = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        let j = job_dir.path();
        fs::create_dir_all(j.join("out/deep")).unwrap();
        fs::write(j.join("result.txt"), "r").unwrap();
        fs::write(j.join("out/a.csv"), "a").unwrap();
        fs::write(j.join("out/deep/b.csv"), "b").unwrap();
        fs::write(j.join("out/c.txt"), "c").unwrap();
        fs::write(j.join(".vmgrid-exit"), "0").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", j.join("out/evil.csv")).unwrap();
        let job = job_with_outputs(&["result.txt", "out/*.csv", "**/b.csv", "*"]);
        let c = collect_outputs(&job, j, out.path()).unwrap();
        assert_eq!(c.files, vec![PathBuf::from("out/a.csv"), "out/deep/b.csv".into(), "result.txt".into()]);
        assert_eq!(c.skipped.len(), 1);
        assert_eq!(c.skipped[0].0, PathBuf::from("out/evil.csv"));
        assert_eq!(fs::read_to_string(out.path().join("out/deep/b.csv")).unwrap(), "b");
        assert!(!out.path().join(".vmgrid-exit").exists());
        assert!(!out.path().join("out/evil.csv").exists());
    }
}
