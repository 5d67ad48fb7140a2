//! QEMU jobs that survive their node, end to end with real QEMU (TCG) and real node agents: a
//! checkpoint every few seconds; a node killed with SIGKILL mid-run, and its job resumed on
//! another node from its latest checkpoint; a job moved by `vmgrid vacate` and by a node that
//! drains; and a checkpoint cut off mid-upload, which is never resumed from.
//!
//! The guest counts through a loop; each step appends its number and the checkpoint its VM last
//! resumed from (fw_cfg `opt/vmgrid/resumed`, set by each QEMU, so it changes where the VM
//! moved) to `/job/progress.log`. The log shows the resume points; the final sum shows the right
//! answer.

use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use vmgrid_proto::{JobResult, JobState};

use crate::util::*;

const STEPS: u32 = 100;
const CHECKPOINT_S: u64 = 2;

/// The counting job: a 16 MiB base image it writes a mark to (through its overlay) and reads
/// back at the end, and `STEPS` steps of about 0.1 s.
fn counting_job(d: &JobDir) -> (PathBuf, PathBuf) {
    let (kernel, initrd) = guest_kit();
    let image = d.write("base.img", vec![0u8; 16 << 20]);
    d.write(
        "count.sh",
        format!(
            "printf 'disk-mark' | dd of=/dev/vda conv=notrunc 2>/dev/null\n\
             i=0; sum=0\n\
             while [ $i -lt {STEPS} ]; do\n\
               i=$((i+1)); sum=$((sum+i))\n\
               echo \"$i $(cat /sys/firmware/qemu_fw_cfg/by_name/opt/vmgrid/resumed/raw)\" >> /job/progress.log\n\
               echo \"step $i\"\n\
               sleep 0.1\n\
             done\n\
             echo \"answer $sum\"\n\
             echo \"disk $(dd if=/dev/vda bs=9 count=1 2>/dev/null)\"\n"
        ),
    );
    let job = d.job(&format!(
        "name = \"counter\"\n[vm]\ntype = \"qemu\"\nkernel = {}\ninitrd = {}\nimage = \"base.img\"\nappend = \"console=ttyS0 quiet\"\nargs = [\"sh\", \"count.sh\"]\n\
         [resources]\nmemory_mb = 128\ntimeout_s = 600\ndisk_mb = 8\n[files]\ninputs = [\"count.sh\"]\noutputs = [\"progress.log\"]\n\
         [policy]\ncheckpoint_s = {CHECKPOINT_S}\n",
        toml_path(&kernel),
        toml_path(&initrd)
    ));
    (job, image)
}

fn submit(pool: &Pool, job: &std::path::Path) -> u64 {
    let out = pool.cli().arg("submit").arg(job).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    ids_of(&out)[0]
}

fn result(pool: &Pool, id: u64) -> JobResult {
    pool.admin().job(id).unwrap()
}

/// Waits until job `id` has a checkpoint numbered above `seq` whose console shows the guest
/// past step `step`; returns its number.
fn wait_checkpoint(pool: &Pool, d: &JobDir, id: u64, seq: u64, step: u32) -> u64 {
    let mut got = 0;
    let console = d.path().join("checkpoint-console");
    wait_until(&format!("job {id} to pass checkpoint {seq} and step {step}"), || {
        let Some(ck) = result(pool, id).checkpoint.filter(|c| c.seq > seq) else { return false };
        got = ck.seq;
        let Some(f) = ck.console else { return false };
        pool.admin().fetch_file(&f, &console).unwrap();
        std::fs::read_to_string(&console).unwrap().contains(&format!("step {step}\n"))
    });
    got
}

fn wait_completed(pool: &Pool, id: u64) -> JobResult {
    wait_until("the job to end", || {
        result(pool, id).job.state.is_final() || result(pool, id).job.state == JobState::Held
    });
    let r = result(pool, id);
    assert_eq!((r.job.state, r.job.exit_code), (JobState::Completed, Some(0)), "{:#?}", r);
    r
}

fn now_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

/// The job's console and progress log: the right answer, the disk mark kept across moves, and
/// each step exactly once. Returns the log's (step, rtc) pairs.
fn check_output(pool: &Pool, d: &JobDir, r: &JobResult) -> Vec<(u32, u64)> {
    let admin = pool.admin();
    let stdout = d.path().join("stdout");
    admin.fetch_file(r.stdout.as_ref().expect("stdout"), &stdout).unwrap();
    let console = std::fs::read_to_string(&stdout).unwrap();
    let sum = STEPS * (STEPS + 1) / 2;
    assert!(console.contains(&format!("answer {sum}\n")), "{console}");
    assert!(console.contains("disk disk-mark"), "the image overlay moved with the job:\n{console}");
    let steps: Vec<&str> = console.lines().filter(|l| l.starts_with("step ")).collect();
    let want: Vec<String> = (1..=STEPS).map(|i| format!("step {i}")).collect();
    assert_eq!(steps, want, "the console continues across the moves, each step once");
    let log = r.outputs.iter().find(|f| f.path == "progress.log").expect("progress.log is an output");
    let path = d.path().join("progress.log.out");
    admin.fetch_file(log, &path).unwrap();
    let entries: Vec<(u32, u64)> = std::fs::read_to_string(&path)
        .unwrap()
        .lines()
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            (a.parse().unwrap(), b.parse().unwrap())
        })
        .collect();
    assert_eq!(entries.iter().map(|e| e.0).collect::<Vec<_>>(), (1..=STEPS).collect::<Vec<_>>(), "each step once");
    entries
}

/// Where the guest's log says it resumed: (first step after the resume, checkpoint), in order.
fn resume_points(entries: &[(u32, u64)]) -> Vec<(u32, u64)> {
    entries.windows(2).filter(|w| w[0].1 != w[1].1).map(|w| (w[1].0, w[1].1)).collect()
}

#[test]
fn a_killed_nodes_vm_job_resumes_elsewhere_from_its_latest_checkpoint() {
    let mut pool = Pool::start();
    pool.start_node("n1", 1);
    let d = JobDir::new();
    let (job, image) = counting_job(&d);
    let base = std::fs::read(&image).unwrap();
    let id = submit(&pool, &job);
    let seq = wait_checkpoint(&pool, &d, id, 0, 20);
    let n1 = pool.node_pid("n1");
    assert!(!scratch_of(n1).is_empty(), "n1's QEMU has its scratch directory in the temp directory");
    pool.kill_node("n1");
    let killed_at = now_s();
    let ck = result(&pool, id).checkpoint.unwrap();
    let latest = ck.seq;
    pool.start_node("n2", 1);
    let r = wait_completed(&pool, id);
    assert!(latest >= seq);
    let entries = check_output(&pool, &d, &r);
    let h = &r.history;
    // The guest's own log: it ran from the start, and resumed once, from the latest checkpoint.
    assert_eq!(entries[0].1, 0, "{entries:?}");
    let points = resume_points(&entries);
    assert_eq!(points.iter().map(|p| p.1).collect::<Vec<_>>(), [latest], "{entries:?}");
    // The work redone: what n1 ran after its latest checkpoint, at most one interval (plus the
    // upload that records it, and the test's polling). n1's run is counted from its placement,
    // which is before QEMU started, so this overestimates it.
    let guest_s = ck.guest_s;
    let ran = killed_at - h[0].started_ms.unwrap() as f64 / 1000.0;
    let redone = ran - guest_s;
    assert!(
        redone <= (CHECKPOINT_S + 3) as f64,
        "n1 ran {ran:.1} s, its latest checkpoint was at {guest_s:.1} s: {redone:.1} s redone, more than one interval"
    );
    eprintln!("resumed at step {} from checkpoint {latest}; {redone:.1} s of work redone", points[0].0);
    assert_eq!(h.len(), 2, "{h:#?}");
    assert_eq!((h[0].node.as_str(), h[0].resumed_from), ("n1", None));
    assert!(h[0].outcome.contains("lost") || h[0].outcome.contains("lease on node n1 expired"), "{h:#?}");
    assert_eq!((h[1].node.as_str(), h[1].resumed_from), ("n2", Some(latest)));
    assert_eq!(std::fs::read(&image).unwrap(), base, "the base image is untouched");
    // n1 could not remove its scratch; n2's first scratch directory removed it.
    assert_eq!(scratch_of(n1), Vec::<String>::new(), "what the killed node left in the temp directory");
}

/// The scratch directories (`vmgrid_runtime::scratch`: `vmgrid-KIND-HOST-PID-…`) that the
/// process `pid` made.
fn scratch_of(pid: u32) -> Vec<String> {
    let pid = pid.to_string();
    std::fs::read_dir(std::env::temp_dir())
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| {
            let p: Vec<&str> = n.split('-').collect();
            p.len() == 5 && p[0] == "vmgrid" && ["qemu", "ckpt"].contains(&p[1]) && p[3] == pid
        })
        .collect()
}

#[test]
fn vacate_and_drain_move_a_running_vm_job_which_completes_where_it_lands() {
    let mut pool = Pool::start();
    pool.start_node("n1", 1);
    let d = JobDir::new();
    let (job, _) = counting_job(&d);
    let id = submit(&pool, &job);
    wait_checkpoint(&pool, &d, id, 0, 10);
    pool.start_node("n2", 1);
    // `vmgrid vacate`: a last checkpoint on n1, and the job goes on n2.
    let out = pool.cli().arg("vacate").arg(id.to_string()).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert!(stdout_of(&out).contains("vacating"), "{}", stdout_of(&out));
    pool.wait_for("the job to run on n2", |p| {
        p.job(id).node.as_deref() == Some("n2") && p.job(id).state == JobState::Running
    });
    let moved = result(&pool, id).checkpoint.unwrap().seq;
    wait_checkpoint(&pool, &d, id, moved, 30);
    // SIGTERM drains n2: its checkpointed job moves at once instead of waiting.
    let pid = pool.node_pid("n2");
    assert!(std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().unwrap().success());
    let r = wait_completed(&pool, id);
    let entries = check_output(&pool, &d, &r);
    let h = &r.history;
    let points: Vec<u64> = resume_points(&entries).iter().map(|p| p.1).collect();
    assert_eq!(points, [h[1].resumed_from.unwrap(), h[2].resumed_from.unwrap()], "the guest's log: {entries:?}");
    assert_eq!(h.iter().map(|a| a.node.as_str()).collect::<Vec<_>>(), ["n1", "n2", "n1"], "{h:#?}");
    assert!(h[0].outcome.contains("moved off node n1"), "{h:#?}");
    assert!(h[1].outcome.contains("moved off node n2"), "{h:#?}");
    assert_eq!(h[1].resumed_from, Some(moved));
    assert!(h[2].resumed_from.unwrap() > moved, "{h:#?}");
    assert_eq!(r.job.attempts, 3);
}

#[test]
fn a_checkpoint_cut_off_mid_upload_is_never_resumed_from() {
    let mut pool = Pool::start();
    // Once the stall file exists, n1 uploads a checkpoint's parts and stalls before the pool
    // records it; it is killed then.
    let d = JobDir::new();
    let stall = d.path().join("stall");
    pool.start_node_env("n1", 1, &[], &[("VMGRID_TEST_ONLY_STALL_CHECKPOINT", stall.to_str().unwrap())]);
    let (job, _) = counting_job(&d);
    let id = submit(&pool, &job);
    let before = wait_checkpoint(&pool, &d, id, 0, 15);
    std::fs::write(&stall, "").unwrap();
    let mut cut = 0;
    wait_until("n1 to stall in a checkpoint", || {
        cut = (before + 1..before + 10).find(|n| d.path().join(format!("stall.stalled-{n}")).exists()).unwrap_or(0);
        cut > 0
    });
    let recorded = result(&pool, id).checkpoint.unwrap().seq;
    assert_eq!(recorded, cut - 1, "checkpoint {cut}, uploaded but cut off, is not recorded");
    pool.kill_node("n1");
    pool.start_node("n2", 1);
    let r = wait_completed(&pool, id);
    let entries = check_output(&pool, &d, &r);
    assert_eq!(resume_points(&entries).iter().map(|p| p.1).collect::<Vec<_>>(), [recorded], "{entries:?}");
    assert_eq!(r.history.len(), 2, "{:#?}", r.history);
    assert_eq!(r.history[1].resumed_from, Some(recorded), "resumed from the last complete checkpoint");
}
