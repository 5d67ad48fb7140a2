//! Standard WASI behaviour, what a program written and tested against wasmtime expects, in both
//! modes: one program of raw preview-1 calls (guests/wasi-probe) runs one script as a job
//! (`vmgrid run` and a pool job) and as an SSI process (`vmgrid ssi` over a real pool), and each
//! must answer line for line as Linux does, with escapes from the root refused with `EPERM` as
//! wasmtime refuses them, and nothing outside the root ever read or written.

use std::path::Path;

use crate::ssi::Session;
use crate::util::*;

/// Links inside the directory, trailing slashes, `O_NOFOLLOW`, hard links, and links out of it
/// (absolute, `..`, and one swapped for an escaping one after it was read), with the answers
/// Linux gives (escapes: wasmtime's `EPERM`; `path_link` with follow: wasmtime's `EINVAL`).
const SCRIPT: &[(&str, &str)] = &[
    ("mkdir:d", "ok"),
    ("write:d/f:hello", "ok"),
    ("symlink:d/f:l", "ok"),
    ("symlink:d:ld", "ok"),
    ("readlink:l", "d/f"),
    ("lstat:l", "link 3"),
    ("stat:l", "file 5"),
    ("read:l", "hello"),
    ("readnf:l", "ELOOP"),
    ("opendirnf:ld", "ENOTDIR"),
    ("opendir:ld", "ok"),
    ("ls:ld", "f"),
    ("read:ld/f", "hello"),
    ("lstat:ld/", "dir"),
    ("write:l:through", "ok"),
    ("read:d/f", "through"),
    ("symlink:f:d/rel", "ok"),
    ("read:d/rel", "through"),
    ("ls:d", "f rel@"),
    ("symlink:nothing:dangling", "ok"),
    ("lstat:dangling", "link 7"),
    ("read:dangling", "ENOENT"),
    ("write:dangling:made", "ok"),
    ("read:nothing", "made"),
    ("excl:dangling", "EEXIST"),
    ("link:d/f:hard", "ok"),
    ("stat:hard", "file 7 nlink 2"),
    ("write:hard:both", "ok"),
    ("read:d/f", "both"),
    ("link:ld:hl", "ok"),
    ("lstat:hl", "link 1"),
    ("linkf:l:x", "EINVAL"),
    ("link:d:x", "EPERM"),
    ("rename:l:l2", "ok"),
    ("read:l2", "both"),
    ("lstat:l", "ENOENT"),
    ("unlink:l2", "ok"),
    ("lstat:l2", "ENOENT"),
    ("read:d/f", "both"),
    ("unlink:d/f/", "ENOTDIR"),
    ("unlink:d/", "EISDIR"),
    ("unlink:ld/", "ENOTDIR"),
    ("unlink:missing/", "ENOENT"),
    ("rmdir:ld/", "ENOTDIR"),
    ("rmdir:ld", "ENOTDIR"),
    ("mkdir:m/", "ok"),
    ("rmdir:m/", "ok"),
    ("symlink:x:new/", "ENOENT"),
    ("symlink:x:d/f/", "EEXIST"),
    ("symlink:x:d/", "EEXIST"),
    ("rename:d/f/:g", "ENOTDIR"),
    ("write:new/:x", "EISDIR"),
    ("read:d/f/", "ENOTDIR"),
    ("stat:d/f/", "ENOTDIR"),
    ("lstat:ld", "link 1"),
    ("readlink:ld/", "EINVAL"),
    ("readlink:d/f", "EINVAL"),
    ("symlink:loop1:loop2", "ok"),
    ("symlink:loop2:loop1", "ok"),
    ("read:loop1", "ELOOP"),
    ("symlink:/etc/hostname:abs", "EPERM"),
    ("read:/etc/hostname", "EPERM"),
    ("read:../outside.txt", "EPERM"),
    ("read:d/../../outside.txt", "EPERM"),
    ("symlink:../outside.txt:up", "ok"),
    ("readlink:up", "../outside.txt"),
    ("read:up", "EPERM"),
    ("stat:up", "EPERM"),
    ("write:up:pwned", "EPERM"),
    ("symlink:d/../../outside.txt:up2", "ok"),
    ("read:up2", "EPERM"),
    ("read:ld/../../outside.txt", "EPERM"),
    ("symlink:d/f:swap", "ok"),
    ("read:swap", "both"),
    ("unlink:swap", "ok"),
    ("symlink:../outside.txt:swap", "ok"),
    ("read:swap", "EPERM"),
    ("write:swap:pwned", "EPERM"),
    ("shutdown:420", "EBADF"),
    ("shutdown:1", "ENOTSOCK"),
];

fn script_args() -> Vec<&'static str> {
    SCRIPT.iter().map(|(a, _)| *a).collect()
}

fn transcript() -> String {
    SCRIPT.iter().map(|(a, r)| format!("{a} => {r}\n")).collect()
}

/// Lines of `out` that differ from the expected transcript, for a readable failure.
fn differences(out: &str) -> String {
    let want = transcript();
    let mut diff = String::new();
    for (i, (w, g)) in want.lines().zip(out.lines()).enumerate() {
        if w != g {
            diff.push_str(&format!("line {}: want `{w}`, got `{g}`\n", i + 1));
        }
    }
    if want.lines().count() != out.lines().count() {
        diff.push_str(&format!("{} lines wanted, {} printed\n", want.lines().count(), out.lines().count()));
    }
    diff
}

fn wasi_job(d: &JobDir, args: &[&str]) -> std::path::PathBuf {
    let args = args.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ");
    d.job(&format!(
        "name = \"wasi\"\n[vm]\ntype = \"wasm\"\nimage = {}\nargs = [{args}]\n",
        toml_path(&guest_wasm("wasi-probe"))
    ))
}

/// A file next to the directory a guest sees: the target of the escapes, which must stay as is.
fn outside_file(dir: &Path) -> std::path::PathBuf {
    let p = dir.parent().unwrap().join("outside.txt");
    std::fs::write(&p, "secret").unwrap();
    p
}

#[test]
fn a_job_sees_the_job_directory_as_slash_too() {
    let d = JobDir::new();
    d.write("data/in.txt", "input");
    let job = d.job(&format!(
        "[vm]\ntype = \"wasm\"\nimage = {}\nargs = [\"preopens\", \"read:data/in.txt\", \"base:/job\", \"read:data/in.txt\", \"base:.\", \"write:w.txt:via-dot\", \"base:/\", \"read:w.txt\", \"base:/tmp\"]\n[files]\ninputs = [\"data/in.txt\"]\noutputs = [\"w.txt\"]\n",
        toml_path(&guest_wasm("wasi-probe"))
    ));
    let out = vmgrid().arg("run").arg(&job).arg("--out").arg(d.out()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    // The preopen scan ends at the first descriptor that is not one, so a program looking for
    // `/` finds it and stops.
    assert_eq!(
        stdout_of(&out),
        "preopens => 3=/job 4=. 5=/\nread:data/in.txt => input\nbase:/job => 3\nread:data/in.txt => input\n\
         base:. => 4\nwrite:w.txt:via-dot => ok\nbase:/ => 5\nread:w.txt => via-dot\nbase:/tmp => EBADF\n"
    );
    assert_eq!(std::fs::read_to_string(d.out().join("w.txt")).unwrap(), "via-dot");
    // The probe's own libc finds `/` too: absolute paths land in the job directory.
    let job = probe_job_file(d.path(), "abs", &["write:/abs.txt:x", "read:/abs.txt", "ls:/"], "");
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(stdout_of(&out), "x\nabs.txt\n", "{}", stderr_of(&out));
}

#[test]
fn links_trailing_slashes_and_nofollow_in_a_job_answer_as_linux_does() {
    let d = JobDir::new();
    let job = wasi_job(&d, &script_args());
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let stdout = stdout_of(&out);
    assert_eq!(differences(&stdout), "", "{stdout}");
    assert!(!stderr_of(&out).contains("not implemented"), "no warning per socket call: {}", stderr_of(&out));
}

#[test]
fn a_pool_job_gets_the_same_wasi_as_vmgrid_run() {
    let mut pool = Pool::start();
    pool.start_node("n1", 1);
    let d = JobDir::new();
    let mut args = vec!["preopens"];
    args.extend(script_args());
    let job = wasi_job(&d, &args);
    let out = pool.cli().arg("submit").arg(&job).arg("--wait").output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let id = ids_of(&out)[0];
    let out = pool.cli().args(["logs", &id.to_string()]).output().unwrap();
    let logs = stdout_of(&out);
    let (first, rest) = logs.split_once('\n').unwrap();
    assert_eq!(first, "preopens => 3=/job 4=. 5=/");
    assert_eq!(differences(rest), "", "{logs}");
}

#[test]
fn an_ssi_process_answers_as_a_job_does_and_the_home_never_follows_a_link_out() {
    let mut pool = Pool::start();
    pool.start_node("n1", 1);
    let root = tempfile::tempdir().unwrap();
    let ssi_root = root.path().join("root");
    std::fs::create_dir(&ssi_root).unwrap();
    std::fs::copy(guest_wasm("wasi-probe"), ssi_root.join("wasi-probe.wasm")).unwrap();
    let outside = outside_file(&ssi_root);
    let mut s = Session::start(&pool, &ssi_root);
    s.send(&format!("run /wasi-probe.wasm preopens {}", script_args().join(" ")));
    // The console shows links for what they are, and refuses to follow one out.
    s.send("ls /d");
    s.send("cat /up");
    let (code, out, err) = s.finish();
    let (first, rest) = out.split_once('\n').unwrap();
    assert_eq!(first, "preopens => 3=/", "{err}");
    let (script_out, console) = rest.split_at(rest.find("f\nrel -> f\n").unwrap_or(rest.len()));
    assert_eq!(differences(script_out), "", "{out}\n{err}");
    assert_eq!(console, "f\nrel -> f\n", "{out}");
    assert!(err.contains("cat: /up: operation not permitted"), "{err}");
    assert_eq!(code, 1, "the last command failed: {err}");
    // The links are real ones at the home, made as the process asked; the escaping ones were
    // never followed: the file outside is as it was, and nothing appeared next to it.
    assert_eq!(std::fs::read_link(ssi_root.join("swap")).unwrap(), Path::new("../outside.txt"));
    assert_eq!(std::fs::read_link(ssi_root.join("d/rel")).unwrap(), Path::new("f"));
    assert!(std::fs::symlink_metadata(ssi_root.join("abs")).is_err());
    assert_eq!(std::fs::read_to_string(&outside).unwrap(), "secret");
    assert_eq!(std::fs::read_dir(root.path()).unwrap().count(), 2, "only the root and outside.txt");
    assert_eq!(std::fs::read_to_string(ssi_root.join("hard")).unwrap(), "both");
}
