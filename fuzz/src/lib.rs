//! What the fuzz targets check, as plain functions (the targets in fuzz_targets/ call them):
//! - [`job_file`]: any text given to the job-file parser ends in a job or a clear error, and a job
//!   the parser accepts is one the pool's API accepts too (the parser and the one validator agree);
//! - [`api_bodies`]: any body sent to an API call is refused with a reason or applied, as the
//!   handler does it (its validator, then the engine), and the engine's invariants hold after; a
//!   workflow is run by the pool (and rescued when it fails), a user's settings only by an admin;
//! - [`engine_submit`]: any submitted spec, its requirements and rank evaluated against varied
//!   nodes, runs through the job lifecycle (leases, reports, losses, ticks) with the invariants
//!   holding at every step, and no job held without a reason.

use std::path::Path;

use vmgrid_coordinator::engine::{Engine, Principal, Timing, hash_token};
use vmgrid_proto::*;

const BLOB: &str = "ab";

fn blob(path: String) -> FileRef {
    FileRef { path, blob: BLOB.repeat(32), size: 1, inline: None }
}

fn invariants(e: &Engine, what: &str) {
    if let Err(why) = e.check_invariants() {
        panic!("engine invariant broken after {what}: {why}");
    }
}

/// The job-file parser against the API's validator.
pub fn job_file(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let job = match vmgrid_job::parse_job(Path::new("fuzz/job.toml"), text) {
        Ok(job) => job,
        Err(e) => {
            assert!(!e.to_string().trim().is_empty(), "an empty error for {text:?}");
            return;
        }
    };
    // The files as the client names them when it uploads them.
    let name_of = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "file".into());
    let files = SpecFiles {
        image: job.vm.image.as_deref().map(|p| blob(name_of(p))),
        kernel: job.vm.kernel.as_deref().map(|p| blob(name_of(p))),
        initrd: job.vm.initrd.as_deref().map(|p| blob(name_of(p))),
        inputs: job.files.inputs.iter().map(|i| blob(i.dest.to_string_lossy().into_owned())).collect(),
    };
    let spec = JobSpec::from_job(&job, files);
    if let Err(e) = spec.check() {
        panic!("the job file parser accepted what the API refuses ({e}):\n{text}");
    }
    if let Err(e) = vmgrid_scheduler::Cluster::compile(
        spec.vm_type,
        spec.cpus,
        spec.memory_mb,
        spec.requirements.as_deref(),
        spec.rank.as_deref(),
    ) {
        panic!("the job file parser accepted expressions the pool cannot compile ({e}):\n{text}");
    }
    let wire = serde_json::to_string(&spec).expect("a spec serializes");
    let back: JobSpec = serde_json::from_str(&wire).expect("a spec reads back");
    assert_eq!(back, spec, "a spec changed on the wire");
}

const T: Timing = Timing { lease_ttl_ms: 1000, node_ttl_ms: 1000, heartbeat_ms: 200 };
const NOW: u64 = 10_000;

fn ad(name: &str, cpus: u32) -> NodeAd {
    NodeAd {
        name: name.into(),
        arch: "x86_64".into(),
        os: "linux".into(),
        cpus,
        memory_mb: 4096,
        disk_mb: 4096,
        vm_types: vec![VmType::Wasm, VmType::Qemu],
        accelerators: vec!["tcg".into()],
        labels: [("site".to_string(), "lab".to_string())].into(),
        appliance: false,
        qemu: None,
        peer: None,
        overlay: None,
    }
}

fn trivial() -> JobSpec {
    let text = "name = \"t\"\n[vm]\ntype = \"wasm\"\nimage = \"a.wasm\"\n";
    let job = vmgrid_job::parse_job(Path::new("t.toml"), text).expect("the trivial job parses");
    JobSpec::from_job(&job, SpecFiles { image: Some(blob("a.wasm".into())), ..SpecFiles::default() })
}

/// A pool with a node `n1` running job 1 under lease epoch 1, and idle job 2, as bodies find it.
fn pool() -> Engine {
    let mut e = Engine::new(T);
    e.register(ad("n1", 2), None, false, hash_token("n1"), NOW).expect("register n1");
    let alice = Principal::User("alice".into());
    e.submit(&alice, trivial(), 3, NOW).expect("submit");
    e.schedule(NOW);
    e.take_leases("n1", 1, 1, NOW);
    e.take_effects();
    e
}

/// One API body, chosen by the first byte, parsed as the API parses it and applied as its handler
/// applies it.
pub fn api_bodies(data: &[u8]) {
    let Some((&which, body)) = data.split_first() else { return };
    let mut e = pool();
    let alice = Principal::User("alice".into());
    let what = match which % 11 {
        0 => serde_json::from_slice::<SubmitRequest>(body).ok().map(|r| {
            let count = r.count.min(1000);
            if let Ok(ids) = e.submit(&alice, r.spec, count, NOW) {
                assert_eq!(ids.len() as u64, count);
            }
            e.schedule(NOW);
            "submit"
        }),
        1 => serde_json::from_slice::<RegisterRequest>(body).ok().map(|r| {
            if r.ad.check().is_ok() {
                let _ = e.register(r.ad, r.previous_credential.as_deref(), false, hash_token("new"), NOW);
                e.schedule(NOW);
            }
            "register"
        }),
        2 => serde_json::from_slice::<LeaseRequest>(body).ok().map(|r| {
            e.set_ahead("n1", r.ahead, NOW);
            let _ = e.report("n1", confined(r.reports), NOW).expect("n1 is live");
            e.schedule(NOW);
            e.take_leases("n1", r.max_jobs.max(1), r.max_cpus, NOW);
            "lease"
        }),
        3 => serde_json::from_slice::<HeartbeatRequest>(body).ok().map(|r| {
            e.heartbeat("n1", &r.leases, r.draining, NOW).expect("n1 is live");
            e.hand_back("n1", &r.returned, NOW);
            "heartbeat"
        }),
        4 => serde_json::from_slice::<ReportRequest>(body).ok().map(|r| {
            let n = r.reports.len();
            let good = confined(r.reports);
            let resp = e.report("n1", good, NOW).expect("n1 is live");
            assert!(resp.accepted.len() + resp.refused.len() <= n);
            "report"
        }),
        5 => serde_json::from_slice::<ActionRequest>(body).ok().map(|r| {
            let resp = e.action(&alice, r.action, &r.ids, NOW);
            assert_eq!(resp.changed.len() + resp.refused.len(), r.ids.len());
            "action"
        }),
        6 => serde_json::from_slice::<TokenRequest>(body).ok().map(|r| {
            if r.check().is_ok() {
                assert!(!r.owner().is_empty() && r.owner().len() <= 64);
            }
            "token"
        }),
        7 => serde_json::from_slice::<RevokeRequest>(body).ok().map(|r| {
            let _ = e.revoke(&r.id, NOW);
            "revoke"
        }),
        8 => serde_json::from_slice::<ConsoleRequest>(body).ok().map(|_| "console"),
        9 => serde_json::from_slice::<DagSubmitRequest>(body).ok().map(|r| {
            workflow(&mut e, r);
            "workflow"
        }),
        _ => serde_json::from_slice::<UserSettingsRequest>(body).ok().map(|r| {
            let admin = Principal::Admin("root".into());
            if e.set_user(&admin, &r, NOW).is_ok() {
                assert!(r.check().is_ok(), "the engine took settings its validator refuses: {r:?}");
            }
            assert!(e.set_user(&alice, &r, NOW).is_err(), "a user set a quota or factor");
            e.schedule(NOW);
            "user settings"
        }),
    };
    if let Some(what) = what {
        e.tick(NOW + 1);
        invariants(&e, what);
    }
}

/// A workflow as submitted, run by the pool: its jobs succeed or fail by their ids, each writes
/// `out/a.txt`; if it fails, its rescue runs too. The invariants hold after every round.
fn workflow(e: &mut Engine, r: DagSubmitRequest) {
    let alice = Principal::User("alice".into());
    let Ok(id) = e.submit_dag(&alice, r.dag.clone(), r.rescue, NOW) else { return };
    let mut now = NOW;
    rounds(e, &mut now, true);
    let view = e.dag_view(&alice, id).expect("the owner sees the workflow");
    if view.state == DagState::Failed {
        if let Ok(again) = e.submit_dag(&alice, r.dag, Some(id), now) {
            rounds(e, &mut now, false);
            let _ = e.dag_view(&alice, again).expect("the owner sees the rescue");
        }
    }
    let bob = Principal::User("bob".into());
    assert!(e.dag_view(&bob, id).is_err(), "another user saw the workflow");
}

/// Eight rounds of the pool on node `n1`: a pass, its leases, their reports (odd job ids exit 1
/// when `fail_odd`), a tick.
fn rounds(e: &mut Engine, now: &mut u64, fail_odd: bool) {
    for _ in 0..8 {
        *now += 300;
        e.schedule(*now);
        let _ = e.live_node("n1", *now);
        let leases = e.take_leases("n1", 8, 8, *now);
        let reports = leases
            .iter()
            .map(|l| {
                let code = i32::from(fail_odd && l.job_id % 2 == 1);
                let lease = LeaseId { job_id: l.job_id, epoch: l.epoch };
                let run = RunReport::Exited { code };
                let outputs = vec![blob("out/a.txt".into())];
                Report { lease, run, stdout: None, stderr: None, stdout_dropped: 0, stderr_dropped: 0, outputs }
            })
            .collect();
        let _ = e.report("n1", reports, *now);
        e.tick(*now);
        invariants(e, "a workflow round");
    }
}

/// A submitted spec through the whole job lifecycle. The first bytes choose the nodes and what
/// happens to each run; the rest is the submit body.
pub fn engine_submit(data: &[u8]) {
    let [a, b, c, rest @ ..] = data else { return };
    let Ok(req) = serde_json::from_slice::<SubmitRequest>(rest) else { return };
    let mut e = Engine::new(T);
    for i in 0..(a % 3 + 1) {
        let mut node = ad(&format!("n{i}"), u32::from(b >> (2 * i) & 3) + 1);
        node.labels.insert("rack".into(), i.to_string());
        node.appliance = i == 1;
        e.register(node, None, false, hash_token(&format!("n{i}")), NOW).expect("register");
    }
    let alice = Principal::User("alice".into());
    let Ok(ids) = e.submit(&alice, req.spec, req.count.min(64), NOW) else { return };
    invariants(&e, "submit");
    let mut now = NOW;
    for round in 0..12u32 {
        now += 300;
        e.schedule(now);
        for i in 0..(a % 3 + 1) {
            let name = format!("n{i}");
            if e.live_node(&name, now).is_err() {
                continue;
            }
            let leases = e.take_leases(&name, 8, 8, now);
            let reports: Vec<Report> = leases.iter().enumerate().map(|(k, l)| run(l, *c, round, k)).collect();
            // One node in three goes silent in its second round and never reports.
            if !(round == 1 && i == 2) {
                let _ = e.report(&name, reports, now);
            }
        }
        e.tick(now);
        invariants(&e, "a round");
    }
    let admin = Principal::Admin("root".into());
    for id in ids {
        let j = e.job_result(&admin, id).expect("the job is kept").job;
        // Held is where a job stops for good until someone acts: it always says why. (An idle
        // job may just be waiting its turn.)
        if j.state == JobState::Held {
            assert!(j.reason.is_some(), "job {id} is held with no reason");
        }
    }
}

/// What happens to one run, from the control byte `c`.
fn run(l: &Lease, c: u8, round: u32, k: usize) -> Report {
    let bits = c.rotate_left(round + k as u32);
    let run = match bits & 7 {
        0 => RunReport::HostFailed { reason: "no room".into() },
        1 => RunReport::GuestFailed { failure: FailureKind::GuestError, reason: "panic".into() },
        2 => RunReport::BadJob { reason: "not a module".into() },
        n => RunReport::Exited { code: i32::from(n) - 3 },
    };
    let lease = LeaseId { job_id: l.job_id, epoch: l.epoch };
    let out = blob(format!("out/{}.txt", l.index));
    Report { lease, run, stdout: None, stderr: None, stdout_dropped: 0, stderr_dropped: 0, outputs: vec![out] }
}

/// The reports the API's handler passes on: it refuses alone each one with a file outside the
/// job directory.
fn confined(reports: Vec<Report>) -> Vec<Report> {
    reports
        .into_iter()
        .filter(|r| r.stdout.iter().chain(&r.stderr).chain(&r.outputs).all(|f| is_confined_path(&f.path)))
        .collect()
}
