//! Malformed and misspelled job files: exit 2, naming the file, the line, the column and the key.

use crate::util::*;

#[test]
fn misspelled_key_exits_2_naming_line_and_valid_keys() {
    let d = JobDir::new();
    let job = d.job("name = \"x\"\n[vm]\ntype = \"wasm\"\nimgae = \"a.wasm\"\n");
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_of(&out);
    assert!(err.contains("job.toml:4:1"), "{err}");
    assert!(err.contains("imgae") && err.contains("`image`"), "{err}");
}

#[test]
fn malformed_toml_exits_2_with_line() {
    let d = JobDir::new();
    let job = d.job("[vm]\ntype = \"wasm\"\nimage = \"a.wasm\n");
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("job.toml:3:"), "{}", stderr_of(&out));
}

#[test]
fn limit_out_of_range_exits_2_before_running() {
    let d = JobDir::new();
    let job = d.job("[vm]\ntype = \"wasm\"\nimage = \"missing.wasm\"\n[resources]\ntimeout_s = -5\n");
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_of(&out);
    assert!(err.contains("job.toml:5:13") && err.contains("timeout_s"), "{err}");
}

#[test]
fn missing_job_file_exits_2() {
    let out = vmgrid().args(["run", "/nonexistent/job.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("cannot read the job file"), "{}", stderr_of(&out));
}

#[test]
fn missing_input_exits_2() {
    let d = JobDir::new();
    let job = d.job(&format!(
        "[vm]\ntype = \"wasm\"\nimage = {}\n[files]\ninputs = [\"nope.txt\"]\n",
        toml_path(&guest_wasm("probe"))
    ));
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("nope.txt"), "{}", stderr_of(&out));
}

#[test]
fn help_teaches_with_examples() {
    let out = vmgrid().args(["run", "--help"]).output().unwrap();
    assert!(out.status.success());
    let text = stdout_of(&out);
    assert!(text.contains("Examples:") && text.contains("--out"), "{text}");
}

#[test]
fn an_unknown_network_names_its_line_and_the_three_networks() {
    let d = JobDir::new();
    let job = d.job("[vm]\ntype = \"qemu\"\nkernel = \"k\"\nnetwork = \"grids\"\n");
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_of(&out);
    assert!(err.contains("job.toml:4:11") && err.contains("`grid`") && err.contains("`user`"), "{err}");
}

#[test]
fn a_group_of_jobs_not_on_the_grid_network_is_refused_before_anything_is_sent() {
    let d = JobDir::new();
    let job = d.job(&format!("[vm]\ntype = \"wasm\"\nimage = {}\n", toml_path(&guest_wasm("probe"))));
    // No pool is named: the refusal comes first.
    let out =
        vmgrid().args(["submit", "--count", "2", "--group"]).arg(&job).env_remove("VMGRID_CONFIG").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr_of(&out);
    assert!(err.contains("--group") && err.contains("network = \"grid\""), "{err}");
    let help = stdout_of(&vmgrid().args(["submit", "--help"]).output().unwrap());
    assert!(help.contains("--group") && help.contains("VMGRID_PEERS") && help.contains(".vmgrid-peers"), "{help}");
}
