//! `vmgrid ssi`: the single-system image over a 3-node pool on loopback, driven through piped
//! console sessions. Processes are real wasm guests (guests/fanout, guests/ssi-probe, guests/probe,
//! guests/wasi-probe) on real node agents. (tests/all/wasi.rs runs one WASI script in both modes.)

use std::io::Write;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};

use crate::util::*;

fn pool_of_three() -> Pool {
    let mut pool = Pool::start();
    for n in ["n1", "n2", "n3"] {
        pool.start_node(n, 1);
    }
    pool
}

/// An SSI root holding the test programs.
fn root_with_programs() -> tempfile::TempDir {
    let root = tempfile::tempdir().unwrap();
    for g in ["fanout", "ssi-probe", "probe", "wasi-probe"] {
        std::fs::copy(guest_wasm(g), root.path().join(format!("{g}.wasm"))).unwrap();
    }
    root
}

/// A console whose stdin is a pipe; its stdout and stderr are collected as they come.
pub(crate) struct Session {
    root: std::path::PathBuf,
    marks: u64,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

impl Session {
    pub(crate) fn start(pool: &Pool, root: &std::path::Path) -> Session {
        let mut child = Command::new(assert_cmd::cargo::cargo_bin("vmgrid"))
            .arg("ssi")
            .arg("--root")
            .arg(root)
            .env("VMGRID_CONFIG", pool.data_dir().join("client.toml"))
            .env_remove("VMGRID_POOL")
            .env_remove("VMGRID_TOKEN")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let collect = |mut r: Box<dyn std::io::Read + Send>| {
            let buf = Arc::new(Mutex::new(String::new()));
            let b = buf.clone();
            std::thread::spawn(move || {
                let mut chunk = [0u8; 4096];
                while let Ok(n) = r.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    b.lock().unwrap().push_str(&String::from_utf8_lossy(&chunk[..n]));
                }
            });
            buf
        };
        let stdout = collect(Box::new(child.stdout.take().unwrap()));
        let stderr = collect(Box::new(child.stderr.take().unwrap()));
        Session { root: root.to_path_buf(), marks: 0, stdin: child.stdin.take(), child, stdout, stderr }
    }

    pub(crate) fn send(&mut self, line: &str) {
        writeln!(self.stdin.as_mut().unwrap(), "{line}").unwrap();
    }

    pub(crate) fn out(&self) -> String {
        self.stdout.lock().unwrap().clone()
    }

    pub(crate) fn err(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    pub(crate) fn wait_out(&self, what: &str, cond: impl Fn(&str) -> bool) {
        wait_until(what, || cond(&self.out()));
    }

    pub(crate) fn wait_err(&self, what: &str, cond: impl Fn(&str) -> bool) {
        wait_until(what, || cond(&self.err()));
    }

    /// Rows of a fresh `ps -a`: (pid, ppid, node, state).
    pub(crate) fn ps(&mut self) -> Vec<(u64, u64, String, String)> {
        // Commands run in order: a `cat` of a marker file after `ps` marks the end of its output
        // on the same stream.
        self.marks += 1;
        let marker = format!("ps-end-{}", self.marks);
        std::fs::write(self.root.join(".ps-marker"), format!("{marker}\n")).unwrap();
        self.send("ps -a");
        self.send("cat /.ps-marker");
        self.wait_out("ps to answer", |o| o.contains(&marker));
        let out = self.out();
        let end = out.find(&marker).unwrap();
        let last = out[..end].rfind("   PID   PPID").expect("a ps header");
        out[last..end]
            .lines()
            .skip(1)
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                if f.len() < 5 {
                    return None;
                }
                Some((f[0].parse().ok()?, f[1].parse().ok()?, f[2].to_string(), f[3].to_string()))
            })
            .collect()
    }

    pub(crate) fn finish(mut self) -> (i32, String, String) {
        drop(self.stdin.take());
        let status = self.child.wait().unwrap();
        // The readers end with the pipes.
        wait_until("the console's output to close", || Arc::strong_count(&self.stdout) == 1);
        wait_until("the console's errors to close", || Arc::strong_count(&self.stderr) == 1);
        (status.code().unwrap_or(-1), self.out(), self.err())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_fan_out_spreads_over_the_nodes_and_gets_the_right_answer() {
    let pool = pool_of_three();
    let root = root_with_programs();
    let mut s = Session::start(&pool, root.path());
    // π(5,000,000) = 348,513, by six child processes.
    s.send("run /fanout.wasm 6 5000000 &");
    s.wait_out("the background pid", |o| o.contains("[1]"));
    let mut nodes_seen = std::collections::BTreeSet::new();
    wait_until("the children running on two nodes at once", || {
        let rows = s.ps();
        let running: std::collections::BTreeSet<String> =
            rows.iter().filter(|r| r.1 == 1 && r.3 == "running").map(|r| r.2.clone()).collect();
        if running.len() > nodes_seen.len() {
            nodes_seen = running;
        }
        nodes_seen.len() >= 2 || s.out().contains("primes below")
    });
    assert!(nodes_seen.len() >= 2, "children ran on {nodes_seen:?}");
    s.send("wait");
    s.wait_err("the fan-out to end", |e| e.contains("[1] done"));
    let rows = s.ps();
    assert_eq!(rows.iter().filter(|r| r.1 == 1).count(), 6, "six children in the table: {rows:?}");
    s.send("info");
    let (code, out, err) = s.finish();
    assert!(out.contains("primes below 5000000: 348513 (6 processes)"), "{out}\n{err}");
    assert!(err.contains("[1] done, exit 0"), "{err}");
    assert_eq!(code, 0, "{err}");
    // In the pool, each process was one job that completed once, with its exit code.
    let jobs = pool.admin().jobs().unwrap();
    assert_eq!(jobs.len(), 7);
    for j in &jobs {
        assert_eq!((j.state, j.exit_code, j.attempts), (vmgrid_proto::JobState::Completed, Some(0), 1), "{j:?}");
    }
}

#[test]
fn a_file_written_on_one_node_is_read_on_another() {
    let pool = pool_of_three();
    let root = root_with_programs();
    let mut s = Session::start(&pool, root.path());
    // The parent writes, then its child (placed on a less loaded node) reads it and answers.
    s.send("run /ssi-probe.wasm write:/note.txt:from-parent spawn:/ssi-probe.wasm,read:/note.txt,write:/reply.txt:from-child wait read:/reply.txt");
    s.wait_out("the parent to read the reply", |o| o.contains("status 0") && o.matches("from-").count() >= 2);
    let rows = s.ps();
    let parent = rows.iter().find(|r| r.1 == 0).expect("the parent");
    let child = rows.iter().find(|r| r.1 == parent.0).expect("the child");
    assert_ne!(parent.2, child.2, "parent and child on different nodes: {rows:?}");
    // The console sees the same files.
    s.send("cat /reply.txt");
    s.send("ls /");
    let local = root.path().join("got.txt");
    s.send(&format!("get /note.txt {}", local.display()));
    let (code, out, err) = s.finish();
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.contains(&"from-parent"), "the child read the parent's file: {out}\n{err}");
    assert!(out.matches("from-child").count() >= 2, "parent and console read it: {out}");
    assert!(lines.contains(&"note.txt") && lines.contains(&"reply.txt"), "{out}");
    assert_eq!(std::fs::read_to_string(local).unwrap(), "from-parent");
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_file_in_a_home_directory_is_rewritten_from_a_node_whose_mirror_never_saw_it() {
    let pool = pool_of_three();
    let root = root_with_programs();
    std::fs::create_dir(root.path().join("out")).unwrap();
    std::fs::write(root.path().join("out/part-0"), "old").unwrap();
    let mut s = Session::start(&pool, root.path());
    // A truncating open (std::fs::write) of a file the home has, in a directory the node's mirror
    // has not looked at: the fan-out's second run failed so (ENOENT).
    s.send("run /ssi-probe.wasm write:/out/part-0:new write:/out/part-1:more read:/out/part-0 ls:/out");
    s.send("wait");
    let (code, out, err) = s.finish();
    assert!(!out.contains("error"), "{out}\n{err}");
    assert_eq!(std::fs::read_to_string(root.path().join("out/part-0")).unwrap(), "new", "{out}\n{err}");
    assert_eq!(std::fs::read_to_string(root.path().join("out/part-1")).unwrap(), "more");
    assert_eq!(code, 0, "{err}");
}

/// CPU seconds a process has used (user + system).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / 100.0
}

#[test]
fn kill_stops_processes_on_their_nodes_and_parents_see_it() {
    let pool = pool_of_three();
    let root = root_with_programs();
    let mut s = Session::start(&pool, root.path());
    s.send("run /ssi-probe.wasm spin &");
    s.send("run /ssi-probe.wasm spin &");
    let mut rows = Vec::new();
    wait_until("two spinners running", || {
        rows = s.ps();
        rows.iter().filter(|r| r.3 == "running").count() == 2
    });
    let nodes: Vec<String> = rows.iter().map(|r| r.2.clone()).collect();
    assert_ne!(nodes[0], nodes[1], "spread over two nodes: {rows:?}");
    s.send("kill 1 2");
    wait_until("both killed", || s.ps().iter().filter(|r| r.3 == "killed").count() == 2);
    // Stopped on their nodes: the node agents stop burning cpu.
    let pids: Vec<u32> = nodes.iter().map(|n| pool.node_pid(n)).collect();
    // Idle: under 0.2 s of cpu over the last half second or more of polling.
    let mut since = (std::time::Instant::now(), pids.iter().map(|p| cpu_seconds(*p)).collect::<Vec<f64>>());
    wait_until("the nodes to go idle", || {
        if since.0.elapsed() < std::time::Duration::from_millis(500) {
            return false;
        }
        let now: Vec<f64> = pids.iter().map(|p| cpu_seconds(*p)).collect();
        let idle = now.iter().zip(&since.1).all(|(n, b)| n - b < 0.2);
        since = (std::time::Instant::now(), now);
        idle
    });
    // A parent waiting for a child that is killed gets 137 and lives on.
    s.send("run /ssi-probe.wasm spawn:/ssi-probe.wasm,spin wait getpid &");
    s.wait_out("the child to be spawned", |o| o.contains("spawned 4"));
    wait_until("the child running", || s.ps().iter().any(|r| r.0 == 4 && r.3 == "running"));
    s.send("kill 4");
    s.wait_out("the parent to see the kill", |o| o.contains("child 4 status 137") && o.contains("pid 3"));
    s.send("wait");
    let (code, _out, err) = s.finish();
    assert!(err.contains("[3] done, exit 0"), "{err}");
    assert_eq!(code, 0, "{err}");
}

#[test]
fn a_process_on_a_lost_node_fails_and_its_parent_is_told() {
    let mut pool = pool_of_three();
    let root = root_with_programs();
    let mut s = Session::start(&pool, root.path());
    s.send("run /ssi-probe.wasm spawn:/ssi-probe.wasm,spin wait &");
    s.wait_out("the child to be spawned", |o| o.contains("spawned 2"));
    let mut rows = Vec::new();
    wait_until("the child running", || {
        rows = s.ps();
        rows.iter().any(|r| r.0 == 2 && r.3 == "running")
    });
    let child_node = rows.iter().find(|r| r.0 == 2).unwrap().2.clone();
    let parent_node = rows.iter().find(|r| r.0 == 1).unwrap().2.clone();
    assert_ne!(child_node, parent_node, "{rows:?}");
    pool.kill_node(&child_node);
    s.wait_out("the parent to hear of the loss", |o| o.contains("child 2 status 134"));
    s.wait_err("the console to tell why", |e| e.contains(&format!("was lost with its node {child_node}")));
    s.send("wait");
    let rows = s.ps();
    assert_eq!(rows.iter().find(|r| r.0 == 2).unwrap().3, "failed", "{rows:?}");
    let (_, _out, err) = s.finish();
    assert!(err.contains("process 2 (/ssi-probe.wasm spin), child of 1, failed on"), "{err}");
    assert!(err.contains("[1] done, exit 0"), "the parent lived on: {err}");
}

#[test]
fn spawn_errors_are_errnos_and_crashing_children_report_a_status() {
    let pool = pool_of_three();
    let root = root_with_programs();
    std::fs::write(root.path().join("bad.wasm"), "this is not a module").unwrap();
    let mut s = Session::start(&pool, root.path());
    s.send("run /ssi-probe.wasm spawn:/missing.wasm spawn:/bad.wasm spawn:/ssi-probe.wasm,panic wait spawn:/ssi-probe.wasm,exit:7 wait getpid");
    s.wait_out("the parent to finish", |o| o.contains("pid 1"));
    // From the console too: clear errors, and $? as the last command's status.
    s.send("run /missing.wasm");
    s.send("run /ssi-probe.wasm exit:5");
    s.send("frobnicate");
    let local = root.path().join("local.txt");
    std::fs::write(&local, "put in").unwrap();
    s.send(&format!("put {} /dir-missing/x", local.display()));
    s.send("info");
    s.send("run /ssi-probe.wasm exit:3");
    let (code, out, err) = s.finish();
    assert!(out.contains("spawn /missing.wasm: errno 44"), "{out}");
    assert!(out.contains("spawn /bad.wasm: errno 45"), "{out}");
    assert!(out.contains("child 2 status 134"), "a crashed child: {out}");
    assert!(out.contains("child 3 status 7"), "{out}");
    assert!(err.contains("the ssi probe was asked to panic"), "its stderr reached the console: {err}");
    assert!(err.contains("/missing.wasm: no such file or directory"), "{err}");
    assert!(err.contains("[4] done, exit 5"), "{err}");
    assert!(err.contains("frobnicate: unknown command"), "{err}");
    assert!(err.contains("put: /dir-missing/x: no such file or directory"), "{err}");
    assert!(out.contains("machine: 3 node(s), 3 cpu(s)"), "{out}");
    assert_eq!(code, 3, "the status of the last process");
}

#[test]
fn files_keep_unix_semantics_across_processes_and_links_out_of_the_root_are_refused() {
    let pool = pool_of_three();
    let root = root_with_programs();
    let mut s = Session::start(&pool, root.path());
    s.send(concat!(
        "run /ssi-probe.wasm write:/a.txt:one mv:/a.txt:/b.txt exists:/a.txt read:/b.txt excl:/lock excl:/lock ",
        "symlink:/etc/passwd:/link leak:/leaked.txt:kept renameopen:/tmp1:/final.txt write:/gone.txt:x rm:/gone.txt ",
        "spawn:/ssi-probe.wasm,excl:/lock,read:/final.txt,exists:/gone.txt wait"
    ));
    s.send("cat /leaked.txt");
    s.send("ls /");
    let (code, out, err) = s.finish();
    let lines: Vec<&str> = out.lines().collect();
    // mv, then the old name is gone and the new one has the content.
    assert_eq!(&lines[..2], ["no", "one"], "{out}\n{err}");
    // O_EXCL holds across the machine: once here, then refused here and in a child elsewhere.
    assert_eq!(lines[2], "created", "{out}");
    assert!(lines[3].starts_with("error:") && lines[3].contains("exists"), "{out}");
    assert!(lines[4].contains("errno 63"), "a link to an absolute path would leave the root: {out}");
    assert!(lines.iter().filter(|l| l.contains("exists")).count() >= 2, "the child's excl failed too: {out}");
    assert!(lines.contains(&"first second"), "a file renamed while open keeps what was written after: {out}");
    assert!(lines.contains(&"no"), "{out}");
    assert!(out.contains("kept"), "written back at exit without a close: {out}");
    assert!(!root.path().join("link").exists() && std::fs::symlink_metadata(root.path().join("link")).is_err());
    assert!(
        !root.path().join("a.txt").exists()
            && !root.path().join("gone.txt").exists()
            && !root.path().join("tmp1").exists()
    );
    assert_eq!(std::fs::read_to_string(root.path().join("final.txt")).unwrap(), "first second");
    assert_eq!(code, 0, "{err}");
}

/// Every symbolic link under `dir`, and every regular file named `name`.
fn walk(dir: &std::path::Path, name: &str, links: &mut Vec<std::path::PathBuf>, named: &mut Vec<std::path::PathBuf>) {
    let Ok(rd) = std::fs::read_dir(dir) else { return };
    for e in rd.flatten() {
        let p = e.path();
        let Ok(m) = std::fs::symlink_metadata(&p) else { continue };
        if m.file_type().is_symlink() {
            links.push(p);
        } else if m.is_dir() {
            walk(&p, name, links, named);
        } else if e.file_name() == name {
            named.push(p);
        }
    }
}

#[test]
fn a_link_made_on_one_node_works_on_another_and_no_mirror_holds_a_symlink() {
    let pool = pool_of_three();
    let root = root_with_programs();
    let mut s = Session::start(&pool, root.path());
    // The parent makes a link and reads through it; its child, on another node, reads through
    // it, makes a link, a hard link and a link to a directory, and writes through them; the
    // parent reads all of that back through the child's links.
    s.send(concat!(
        "run /ssi-probe.wasm write:/f.txt:from-parent symlink:f.txt:/l read:/l ",
        "spawn:/wasi-probe.wasm,readlink:l,read:l,lstat:l,symlink:f.txt:l2,link:f.txt:h,write:h:via-hard,",
        "symlink:sub:ls,mkdir:sub,write:ls/in:deep ",
        "wait read:/l2 read:/h read:/f.txt read:/ls/in spin &"
    ));
    // (The child's own line `write:ls/in:deep => ok` must not count: the parent's read is a line
    // of its own.)
    s.wait_out("the parent to read the child's links", |o| o.lines().any(|l| l == "deep"));
    let rows = s.ps();
    let parent = rows.iter().find(|r| r.0 == 1).expect("the parent").clone();
    let child = rows.iter().find(|r| r.1 == 1).expect("the child").clone();
    assert_ne!(parent.2, child.2, "parent and child on different nodes: {rows:?}");
    // While the parent still runs, its mirror holds the link it made as a placeholder file;
    // no node's directories hold a single symbolic link.
    let (mut links, mut named) = (Vec::new(), Vec::new());
    walk(pool.dir.path(), "l", &mut links, &mut named);
    assert!(links.is_empty(), "symlinks on the nodes: {links:?}");
    assert!(named.iter().any(|p| std::fs::metadata(p).unwrap().len() == 0), "a placeholder for /l: {named:?}");
    s.send("kill 1");
    s.send("ls /");
    let (_, out, err) = s.finish();
    let lines: Vec<&str> = out.lines().collect();
    for want in [
        "from-parent",
        "readlink:l => f.txt",
        "read:l => from-parent",
        "lstat:l => link 5",
        "symlink:f.txt:l2 => ok",
        "link:f.txt:h => ok",
        "write:h:via-hard => ok",
        "write:ls/in:deep => ok",
        "child 2 status 0",
        "l -> f.txt",
        "l2 -> f.txt",
        "ls -> sub",
    ] {
        assert!(lines.contains(&want), "{want:?} in:\n{out}\n{err}");
    }
    // The parent read the child's writes through the links and the hard link.
    assert_eq!(lines.iter().filter(|l| **l == "via-hard").count(), 3, "{out}");
    // At the home they are real links, and a hard link shares the file.
    assert_eq!(std::fs::read_link(root.path().join("l2")).unwrap(), std::path::Path::new("f.txt"));
    assert_eq!(std::os::unix::fs::MetadataExt::nlink(&std::fs::metadata(root.path().join("h")).unwrap()), 2);
    assert_eq!(std::fs::read_to_string(root.path().join("sub/in")).unwrap(), "deep");
}

#[test]
fn a_link_swapped_to_leave_the_root_is_refused_on_every_node() {
    let pool = pool_of_three();
    let top = tempfile::tempdir().unwrap();
    let root = top.path().join("root");
    std::fs::create_dir(&root).unwrap();
    for g in ["ssi-probe", "wasi-probe"] {
        std::fs::copy(guest_wasm(g), root.join(format!("{g}.wasm"))).unwrap();
    }
    std::fs::write(top.path().join("outside.txt"), "secret-file").unwrap();
    std::fs::create_dir(top.path().join("outside")).unwrap();
    std::fs::write(top.path().join("outside/x"), "secret-dir").unwrap();
    let mut s = Session::start(&pool, &root);
    // The parent reads a link and a directory that are inside; children on other nodes swap
    // each for one that leaves the root; the parent, which holds both in its mirror, and
    // another child are refused.
    s.send(concat!(
        "run /ssi-probe.wasm write:/f.txt:inside symlink:f.txt:/l read:/l ",
        "spawn:/wasi-probe.wasm,mkdir:d,write:d/x:inside-dir wait read:/d/x ",
        "spawn:/wasi-probe.wasm,read:l,unlink:l,symlink:../outside.txt:l,read:l,write:l:pwned,",
        "rename:d:d0,symlink:../outside:d,read:d/x,write:d/y:pwned wait ",
        "read:/l read:/d/x write:/d/z:pwned ",
        "spawn:/wasi-probe.wasm,read:l,stat:l,readlink:l,read:d/x,lstat:d wait"
    ));
    s.wait_out("the last child", |o| o.contains("child 4 status"));
    let local = top.path().join("local.txt");
    std::fs::write(&local, "pwned").unwrap();
    s.send("cat /d/x");
    s.send(&format!("put {} /l", local.display()));
    let (_, out, err) = s.finish();
    let lines: Vec<&str> = out.lines().collect();
    for want in [
        "inside",
        "inside-dir",
        "read:l => inside",
        "symlink:../outside.txt:l => ok",
        "read:l => EPERM",
        "write:l:pwned => EPERM",
        "symlink:../outside:d => ok",
        "read:d/x => EPERM",
        "write:d/y:pwned => EPERM",
        "stat:l => EPERM",
        "readlink:l => ../outside.txt",
        "lstat:d => link 10",
    ] {
        assert!(lines.contains(&want), "{want:?} in:\n{out}\n{err}");
    }
    // The parent's std calls: refused with EPERM (os error 63), for reads and the write.
    assert_eq!(lines.iter().filter(|l| l.starts_with("error:") && l.contains("os error 63")).count(), 3, "{out}");
    assert!(!out.contains("secret"), "nothing outside was read: {out}");
    assert!(err.contains("cat: /d/x: operation not permitted"), "{err}");
    assert!(err.contains("put: /l: operation not permitted"), "{err}");
    // Nothing outside the root was written or created.
    assert_eq!(std::fs::read_to_string(top.path().join("outside.txt")).unwrap(), "secret-file");
    let outside: Vec<_> =
        std::fs::read_dir(top.path().join("outside")).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(outside, ["x"]);
    assert_eq!(std::fs::read_to_string(root.join("d0/x")).unwrap(), "inside-dir");
}

#[test]
fn run_gives_a_process_its_environment_and_its_children_inherit_it() {
    let pool = pool_of_three();
    let root = root_with_programs();
    let mut s = Session::start(&pool, root.path());
    s.send("run MODE=fast 'GREETING=hello world' EMPTY= /probe.wasm env:MODE env:GREETING env:EMPTY env:HOME");
    s.send("run MODE=inherited /ssi-probe.wasm spawn:/probe.wasm,env:MODE wait");
    s.send("run MODE=alone");
    s.send("run 1X=y /probe.wasm");
    s.send("run /probe.wasm env:MODE");
    let (code, out, err) = s.finish();
    assert!(out.starts_with("fast\nhello world\n\n<unset>\n"), "{out}\n{err}");
    assert!(out.contains("inherited\n") && out.contains("child 3 status 0"), "{out}\n{err}");
    assert!(err.contains("run: no program after the environment"), "{err}");
    assert!(err.contains("1X=y: no such file or directory"), "a word that is not an assignment is the program: {err}");
    assert!(out.ends_with("<unset>\n"), "a process without them has none: {out}");
    assert_eq!(code, 0, "{err}");
}
