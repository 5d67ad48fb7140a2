//! Workflow files: what is accepted, and each refusal with its place and the jobs it names.

use super::*;

fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for (name, text) in files {
        std::fs::write(d.path().join(name), text).unwrap();
    }
    d
}

const JOB: &str = "[vm]\ntype = \"wasm\"\nimage = \"a.wasm\"\nargs = [\"{index}\"]\n";

fn parse(d: &tempfile::TempDir, flow: &str) -> Result<Flow, JobFileError> {
    parse_flow(&d.path().join("flow.toml"), flow)
}

fn message(r: Result<Flow, JobFileError>) -> String {
    r.unwrap_err().to_string()
}

#[test]
fn a_diamond_with_files_inline_jobs_sweeps_and_a_final_job_parses() {
    let d = dir_with(&[("job.toml", JOB)]);
    let flow = "\
[jobs.a]
file = \"job.toml\"
[jobs.b]
file = \"job.toml\"
after = [\"a\"]
count = 3
retries = 2
inputs_from = { a = [\"out/*.txt\"] }
[jobs.c]
after = [\"a\"]
[jobs.c.vm]
type = \"wasm\"
image = \"c.wasm\"
[jobs.d]
file = \"job.toml\"
after = [\"b\", \"c\"]
[jobs.z]
final = true
vm = { type = \"wasm\", image = \"z.wasm\" }
";
    let f = parse(&d, flow).unwrap();
    let names: Vec<&str> = f.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["a", "b", "c", "d", "z"]);
    assert_eq!(f.name, "flow");
    let b = &f.nodes[1];
    assert_eq!((b.count, b.retries, b.after.clone()), (3, 2, vec!["a".to_string()]));
    assert_eq!(b.inputs_from["a"], ["out/*.txt"]);
    assert_eq!(b.job.source, d.path().join("job.toml"));
    let c = &f.nodes[2];
    assert_eq!(c.job.name, "c", "an inline job is named after its node");
    assert_eq!(c.job.vm.image.as_deref(), Some(d.path().join("c.wasm").as_path()));
    assert!(f.nodes[4].final_node);
}

#[test]
fn a_cycle_is_refused_with_the_jobs_on_it() {
    let d = dir_with(&[("job.toml", JOB)]);
    let flow = "\
[jobs.a]
file = \"job.toml\"
after = [\"c\"]
[jobs.b]
file = \"job.toml\"
after = [\"a\"]
[jobs.c]
file = \"job.toml\"
after = [\"b\"]
[jobs.x]
file = \"job.toml\"
";
    let m = message(parse(&d, flow));
    assert!(m.contains("the flow has a cycle: a -> b -> c -> a"), "{m}");
    assert!(m.contains("flow.toml:"), "{m}");
    let m = message(parse(&d, "[jobs.a]\nfile = \"job.toml\"\nafter = [\"a\"]\n"));
    assert!(m.contains("cycle: a -> a"), "{m}");
}

#[test]
fn each_refusal_names_the_job_and_the_place() {
    let d = dir_with(&[("job.toml", JOB)]);
    let cases = [
        (
            "[jobs.a]\nfile = \"job.toml\"\nafter = [\"nope\"]\n",
            "3:10",
            "job `a` runs after `nope`, which is not a job of this flow",
        ),
        ("[jobs.a]\nfile = \"missing.toml\"\n", "2:8", "job `a`: cannot read its job file"),
        (
            "[jobs.a]\nfile = \"job.toml\"\n[jobs.b]\nfile = \"job.toml\"\ninputs_from = { a = [\"*\"] }\n",
            "5:21",
            "job `b` takes inputs from `a`, which is not in its `after`",
        ),
        (
            "[jobs.a]\nfile = \"job.toml\"\n[jobs.b]\nfile = \"job.toml\"\nafter = [\"a\"]\ninputs_from = { a = [\"../x\"] }\n",
            "6:21",
            "job `b`: inputs_from output pattern `../x`",
        ),
        (
            "[jobs.a]\nfile = \"job.toml\"\n[jobs.b]\nfile = \"job.toml\"\nafter = [\"a\"]\ninputs_from = { a = [\"out/[\"] }\n",
            "6:21",
            "not a valid glob",
        ),
        ("[jobs.a]\nfile = \"job.toml\"\ncount = 0\n", "3:9", "job `a`: `count` is 0"),
        (
            "[jobs.a]\nfile = \"job.toml\"\n[jobs.b]\nafter = [\"a\"]\ninputs_from = { a = [\"*\"] }\nvm = { type = \"wasm\", image = \"x.wasm\" }\nfiles = { inputs = [\"a/x.txt\"] }\n",
            "5:21",
            "job `b`: its input `a/x.txt` would land where the inputs from `a` go",
        ),
        (
            "[jobs.a]\nfile = \"job.toml\"\nafter = [\"f\"]\n[jobs.f]\nfile = \"job.toml\"\nfinal = true\n",
            "3:10",
            "the final job",
        ),
        ("[jobs.a]\n", "1:1", "job `a` needs `file = \"job.toml\"` or an inline job"),
        (
            "[jobs.a]\nfile = \"job.toml\"\nvm = { type = \"wasm\", image = \"x.wasm\" }\n",
            "2:8",
            "has both `file` and an inline job",
        ),
        ("[jobs.a]\nfile = \"job.toml\"\nbogus = 1\n", "3:1", "unknown field `bogus`"),
        ("[jobs.a]\nvm = { type = \"wasm\" }\n", "2:6", "a wasm job needs `image`"),
        ("[jobs.\"a b\"]\nfile = \"job.toml\"\n", "1:1", "job `a b`: `name` may use only"),
        ("[jobs.\"..\"]\nfile = \"job.toml\"\n", "1:1", "job `..`: a job's name names the directory"),
        ("[jobs.\".\"]\nfile = \"job.toml\"\n", "1:1", "job `.`: a job's name names the directory"),
    ];
    for (flow, at, want) in cases {
        let m = message(parse(&d, flow));
        assert!(m.contains(want), "{flow}\n→ {m}");
        assert!(m.contains(&format!("flow.toml:{at}:")), "{flow}\n→ {m}");
    }
}

#[test]
fn a_bad_job_file_is_reported_at_its_own_line() {
    let d = dir_with(&[("bad.toml", "[vm]\ntype = \"wasm\"\nimage = \"a.wasm\"\n[resources]\ncpus = 0\n")]);
    let m = message(parse(&d, "[jobs.a]\nfile = \"bad.toml\"\n"));
    assert!(m.contains("bad.toml:5:8: `cpus` is 0"), "{m}");
}

#[test]
fn outputs_match_as_output_collection_matches_them() {
    let pats = vec!["out/*.txt".to_string(), "./top.csv".to_string()];
    assert!(crate::check::matches_output(&pats, "out/a.txt"));
    assert!(crate::check::matches_output(&pats, "top.csv"));
    assert!(!crate::check::matches_output(&pats, "out/sub/a.txt"), "`*` does not cross `/`");
    assert!(!crate::check::matches_output(&pats, "a.txt"));
}

#[test]
fn the_example_flow_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/wordcount/flow.toml");
    let f = load_flow(&path).unwrap();
    let names: Vec<&str> = f.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["sweep", "recount", "summary"], "in the file's order");
    assert_eq!((f.nodes[0].count, f.nodes[0].retries), (4, 1));
    assert!(f.nodes[2].final_node);
    assert_eq!(f.nodes[1].inputs_from["sweep"], ["out/report-3.txt"]);
}
