//! The state machine under random sequences of calls (proptest): nodes register, drain, leave and
//! go silent; users submit jobs and workflows, hold, release and remove; an admin sets users'
//! factors and quotas; nodes take leases and report under current and stale leases; the clock
//! moves; and the coordinator restarts from its real SQLite store at any step. After every step the engine's invariants hold ([`Engine::check_invariants`]), and:
//! - a lease is accepted at most once, and only while it is the job's current lease (fencing);
//! - a completed job stays completed with the same result until retention drops it, and a job
//!   that is gone never comes back (no lost, doubled or changed result);
//! - a restart from the store gives back exactly the acknowledged state (durability).

use std::collections::{BTreeMap, HashMap, HashSet};

use proptest::prelude::*;

use super::tests::{ad, spec};
use super::*;
use crate::store::Store;
use crate::store::sqlite::SqliteStore;

const TIMING: Timing = Timing { lease_ttl_ms: 1000, node_ttl_ms: 3000, heartbeat_ms: 200 };
const LIMITS: Limits = Limits { max_queued_per_user: 12, max_blob_bytes_per_user: 1 << 20, retain_finished_ms: 2000 };
const NODES: [&str; 3] = ["n0", "n1", "n2"];
const USERS: [&str; 2] = ["alice", "bob"];

#[derive(Debug, Clone)]
enum Outcome {
    Exit(i32),
    HostFailed,
    GuestFailed,
    BadJob,
}

#[derive(Debug, Clone)]
enum Step {
    Register {
        node: usize,
        cpus: u32,
    },
    Submit {
        user: usize,
        cpus: u32,
        count: u64,
        retries: u32,
    },
    Schedule,
    /// A lease call, asking for lease-ahead `ahead`.
    Take {
        node: usize,
        max: u32,
        max_cpus: u32,
        ahead: u32,
    },
    /// A node hands back a lease it holds (or held: `pick` as for [`Step::Report`]) unstarted.
    HandBack {
        pick: usize,
    },
    /// A report under a lease granted (`pick` < 48: one of the last three; else any, current or
    /// long stale), from the node that holds it or from `from`.
    Report {
        pick: usize,
        outcome: Outcome,
        from: Option<usize>,
    },
    Heartbeat {
        node: usize,
        draining: bool,
    },
    Tick {
        ms: u64,
    },
    Deregister {
        node: usize,
    },
    Act {
        admin: bool,
        user: usize,
        action: JobAction,
        job: u64,
    },
    Restart,
    SetUser {
        admin: bool,
        user: usize,
        factor: Option<u8>,
        max_cpus: Option<u64>,
        no_max_cpus: bool,
    },
    /// A workflow: `a` (a sweep of `count`), then `b` with `a`'s outputs, and a final node.
    Dag {
        user: usize,
        count: u64,
        retries: u32,
    },
    DagRm {
        admin: bool,
        user: usize,
        dag: u64,
    },
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        4 => (0..3i32).prop_map(Outcome::Exit),
        1 => Just(Outcome::HostFailed),
        1 => Just(Outcome::GuestFailed),
        1 => Just(Outcome::BadJob),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    let action = prop_oneof![Just(JobAction::Rm), Just(JobAction::Hold), Just(JobAction::Release)];
    prop_oneof![
        3 => (0..3usize, 1..4u32).prop_map(|(node, cpus)| Step::Register { node, cpus }),
        3 => (0..2usize, 0..3u32, 1..4u64, 0..2u32)
            .prop_map(|(user, cpus, count, retries)| Step::Submit { user, cpus, count, retries }),
        3 => Just(Step::Schedule),
        4 => (0..3usize, 1..8u32, prop_oneof![1 => Just(0u32), 4 => 1..8u32], prop_oneof![2 => Just(0u32), 1 => 1..6u32])
            .prop_map(|(node, max, max_cpus, ahead)| Step::Take { node, max, max_cpus, ahead }),
        1 => (0..64usize).prop_map(|pick| Step::HandBack { pick }),
        5 => (0..64usize, outcome(), proptest::option::weighted(0.2, 0..3usize))
            .prop_map(|(pick, outcome, from)| Step::Report { pick, outcome, from }),
        2 => (0..3usize, proptest::bool::weighted(0.1)).prop_map(|(node, draining)| Step::Heartbeat { node, draining }),
        // Mostly a heartbeat's worth of time; sometimes enough for leases, nodes and retention to
        // run out.
        2 => prop_oneof![4 => 0..300u64, 1 => 300..3000u64].prop_map(|ms| Step::Tick { ms }),
        1 => (0..3usize).prop_map(|node| Step::Deregister { node }),
        2 => (any::<bool>(), 0..2usize, action, 1..16u64)
            .prop_map(|(admin, user, action, job)| Step::Act { admin, user, action, job }),
        1 => Just(Step::Restart),
        1 => (any::<bool>(), 0..2usize, proptest::option::of(1..4u8), proptest::option::of(0..4u64), any::<bool>())
            .prop_map(|(admin, user, factor, max_cpus, no_max_cpus)| Step::SetUser { admin, user, factor, max_cpus, no_max_cpus }),
        2 => (0..2usize, 1..3u64, 0..2u32).prop_map(|(user, count, retries)| Step::Dag { user, count, retries }),
        1 => (any::<bool>(), 0..2usize, 1..4u64).prop_map(|(admin, user, dag)| Step::DagRm { admin, user, dag }),
    ]
}

/// The workflow of [`Step::Dag`].
fn flow(count: u64, retries: u32) -> DagSpec {
    let node = |name: &str, after: &[&str], count: u64, final_node: bool| {
        let mut job = spec(0);
        job.name = name.into();
        job.memory_mb = 300;
        let inputs_from = if after.is_empty() {
            Default::default()
        } else {
            BTreeMap::from([("a".to_string(), vec!["out-*".to_string()])])
        };
        DagNodeSpec {
            name: name.into(),
            job,
            count,
            after: after.iter().map(|a| a.to_string()).collect(),
            inputs_from,
            retries,
            final_node,
        }
    };
    DagSpec {
        name: "flow".into(),
        nodes: vec![node("a", &[], count, false), node("b", &["a"], 1, false), node("z", &[], 1, true)],
    }
}

/// The engine with its store: every step's changes are committed before the next, as the
/// runtime acknowledges nothing before its commit.
struct Pool {
    engine: Engine,
    store: SqliteStore,
    now: u64,
    /// Every lease granted, with the node it went to.
    leases: Vec<(String, LeaseId)>,
    accepted: HashSet<LeaseId>,
    completed: HashMap<u64, (Option<i32>, Vec<FileRef>)>,
    gone: HashSet<u64>,
}

fn report(l: LeaseId, outcome: &Outcome) -> Report {
    let run = match outcome {
        Outcome::Exit(code) => RunReport::Exited { code: *code },
        Outcome::HostFailed => RunReport::HostFailed { reason: "no room".into() },
        Outcome::GuestFailed => RunReport::GuestFailed { failure: FailureKind::GuestError, reason: "panic".into() },
        Outcome::BadJob => RunReport::BadJob { reason: "not a module".into() },
    };
    // Each run's output names its lease, so a changed result would show.
    let out = FileRef { path: format!("out-{}-{}", l.job_id, l.epoch), blob: "cd".repeat(32), size: 1, inline: None };
    Report { lease: l, run, stdout: None, stderr: None, stdout_dropped: 0, stderr_dropped: 0, outputs: vec![out] }
}

impl Pool {
    fn new(path: &std::path::Path) -> Pool {
        let mut engine = Engine::new(TIMING);
        engine.set_limits(LIMITS);
        let store = SqliteStore::open(path).expect("open the store");
        let mut pool = Pool {
            engine,
            store,
            now: 1_000,
            leases: Vec::new(),
            accepted: HashSet::new(),
            completed: HashMap::new(),
            gone: HashSet::new(),
        };
        pool.commit();
        pool
    }

    fn commit(&mut self) {
        let ops = self.engine.take_effects().ops;
        self.store.commit(&ops).expect("commit");
    }

    fn principal(admin: bool, user: usize) -> Principal {
        if admin { Principal::Admin("root".into()) } else { Principal::User(USERS[user].into()) }
    }

    fn apply(&mut self, s: &Step) {
        let now = self.now;
        let e = &mut self.engine;
        match s {
            Step::Register { node, cpus } => {
                let name = NODES[*node];
                let _ = e.register(ad(name, *cpus), Some(name), false, hash_token(name), now);
            }
            Step::Submit { user, cpus, count, retries } => {
                let mut sp = spec(*retries);
                sp.cpus = *cpus;
                sp.memory_mb = 300;
                let p = Principal::User(USERS[*user].into());
                if *cpus == 0 {
                    // Only a console's processes may ask for no cpu: the API's refusal stands.
                    assert!(e.submit(&p, sp, *count, now).is_err());
                } else {
                    let _ = e.submit(&p, sp, *count, now);
                }
            }
            Step::Schedule => {
                e.schedule(now);
            }
            Step::Take { node, max, max_cpus, ahead } => {
                // As the lease call does: a scheduling pass, then what is placed on the node.
                let name = NODES[*node];
                e.set_ahead(name, *ahead, now);
                e.schedule(now);
                if e.live_node(name, now).is_ok() {
                    for l in e.take_leases(name, *max, *max_cpus, now) {
                        self.leases.push((name.into(), LeaseId { job_id: l.job_id, epoch: l.epoch }));
                    }
                }
            }
            Step::Report { pick, outcome, from } => self.report(*pick, outcome, *from),
            Step::HandBack { pick } => self.hand_back(*pick),
            Step::Heartbeat { node, draining } => {
                let name = NODES[*node];
                let held: Vec<LeaseId> = self.leases.iter().filter(|(n, _)| n == name).map(|(_, l)| *l).collect();
                if let Ok(resp) = e.heartbeat(name, &held, *draining, now) {
                    for l in resp.revoked {
                        assert!(e.stale_lease(name, l).is_some(), "heartbeat revoked the current lease {l:?}");
                    }
                }
            }
            Step::Tick { ms } => {
                self.now += ms;
                self.engine.tick(self.now);
            }
            Step::Deregister { node } => e.deregister(NODES[*node], now),
            Step::Act { admin, user, action, job } => {
                e.action(&Pool::principal(*admin, *user), *action, &[*job], now);
            }
            Step::Restart => self.restart(),
            Step::SetUser { admin, user, factor, max_cpus, no_max_cpus } => {
                let req = UserSettingsRequest {
                    user: USERS[*user].into(),
                    factor: factor.map(f64::from),
                    max_cpus: *max_cpus,
                    no_max_cpus: *no_max_cpus,
                };
                let r = e.set_user(&Pool::principal(*admin, *user), &req, now);
                assert_eq!(r.is_ok(), *admin && req.check().is_ok(), "{req:?} by admin {admin}: {r:?}");
            }
            Step::Dag { user, count, retries } => {
                let _ = e.submit_dag(&Principal::User(USERS[*user].into()), flow(*count, *retries), None, now);
            }
            Step::DagRm { admin, user, dag } => {
                let _ = e.dag_rm(&Pool::principal(*admin, *user), *dag, now);
            }
        }
        self.commit();
    }

    /// Mostly one of the last few leases granted (likely current); else any (likely stale).
    fn pick(&self, pick: usize) -> Option<(String, LeaseId)> {
        let n = self.leases.len();
        let at = if pick < 48 { n.saturating_sub(1 + pick % 3) } else { pick % n.max(1) };
        self.leases.get(at).cloned()
    }

    fn hand_back(&mut self, pick: usize) {
        let Some((holder, l)) = self.pick(pick) else { return };
        let current = self.engine.stale_lease(&holder, l).is_none();
        self.engine.hand_back(&holder, &[l], self.now);
        if current {
            let j = self.engine.job_result(&Principal::Admin("root".into()), l.job_id).expect("a current lease's job");
            assert_eq!(j.job.state, JobState::Idle, "a job handed back is idle again");
        }
    }

    fn report(&mut self, pick: usize, outcome: &Outcome, from: Option<usize>) {
        let Some((holder, l)) = self.pick(pick) else { return };
        let node = from.map_or(holder, |n| NODES[n].to_string());
        let current = self.engine.stale_lease(&node, l).is_none();
        let live = self.engine.nodes.get(&node).is_some_and(|n| n.state != NodeState::Lost);
        match self.engine.report(&node, vec![report(l, outcome)], self.now) {
            Ok(r) => {
                assert_eq!(r.accepted.len() + r.refused.len(), 1);
                if r.accepted.contains(&l) {
                    assert!(current && live, "accepted a report under {l:?} from {node}, not its current lease");
                    assert!(self.accepted.insert(l), "accepted the report under {l:?} twice");
                } else {
                    assert!(!current, "refused the current lease {l:?} of {node}");
                }
            }
            Err(_) => assert!(!live, "a live node's report was refused whole"),
        }
    }

    fn restart(&mut self) {
        let before = self.snapshot();
        let loaded = self.store.load().expect("load");
        let mut engine = Engine::load(loaded, TIMING, self.now);
        engine.set_limits(LIMITS);
        self.engine = engine;
        assert_eq!(self.snapshot(), before, "the store gave back another state than was acknowledged");
    }

    /// What a restart must keep: each job's durable fields and past attempts, each node's state and load, users'
    /// settings, and workflows with their nodes.
    #[allow(clippy::type_complexity)]
    fn snapshot(&self) -> (BTreeMap<u64, String>, BTreeMap<String, (NodeState, u32, u64, u32)>, Vec<String>) {
        let admin = Principal::Admin("root".into());
        let jobs = self
            .engine
            .job_views(&admin)
            .into_iter()
            .map(|v| {
                let r = self.engine.job_result(&admin, v.id).expect("visible");
                // An idle job's reason is the last pass's, which a restart recomputes.
                let reason = if v.state == JobState::Idle { None } else { v.reason.clone() };
                let node = if v.state == JobState::Running { v.node.clone() } else { None };
                let durable = (v.state, node, v.exit_code, v.attempts, reason, v.owner.clone(), v.index, r.outputs);
                let times = (v.submitted_ms, v.started_ms, v.finished_ms);
                let j = &self.engine.jobs[&v.id];
                (v.id, format!("{durable:?} {times:?} epoch {} past attempts {:?}", j.epoch, j.history))
            })
            .collect();
        let nodes = self
            .engine
            .node_views()
            .into_iter()
            .map(|n| (n.ad.name.clone(), (n.state, n.free_cpus, n.free_memory_mb, n.running_jobs)))
            .collect();
        let mut rest: Vec<String> = self
            .engine
            .user_views(&admin, self.now)
            .into_iter()
            .filter(|u| u.factor != 1.0 || u.max_cpus.is_some())
            .map(|u| format!("{} {} {:?}", u.user, u.factor, u.max_cpus))
            .collect();
        rest.sort();
        for d in self.engine.dag_list(&admin) {
            let v = self.engine.dag_view(&admin, d.id).expect("visible");
            let nodes: Vec<_> = v.nodes.iter().map(|n| (n.state, n.tries, n.jobs.clone(), n.reason.clone())).collect();
            rest.push(format!("dag {} {:?} {:?} {:?} {nodes:?}", v.id, v.state, v.reason, v.finished_ms));
        }
        (jobs, nodes, rest)
    }

    /// The properties that span steps: completed jobs keep their result, gone jobs stay gone.
    fn check_history(&mut self) {
        let admin = Principal::Admin("root".into());
        for (&id, kept) in &self.completed {
            if self.gone.contains(&id) {
                continue;
            }
            match self.engine.job_result(&admin, id) {
                Ok(r) => {
                    assert_eq!(r.job.state, JobState::Completed, "completed job {id} became {:?}", r.job.state);
                    assert_eq!((r.job.exit_code, r.outputs.clone()), *kept, "job {id}'s result changed");
                }
                Err(_) => {
                    self.gone.insert(id);
                }
            }
        }
        for v in self.engine.job_views(&admin) {
            assert!(!self.gone.contains(&v.id), "job {} came back after retention dropped it", v.id);
            if v.state == JobState::Completed && !self.completed.contains_key(&v.id) {
                let r = self.engine.job_result(&admin, v.id).expect("visible");
                self.completed.insert(v.id, (v.exit_code, r.outputs));
            }
        }
    }
}

fn dir() -> tempfile::TempDir {
    // Commits fsync: on a RAM disk where there is one, so that many cases run quickly.
    let shm = std::path::Path::new("/dev/shm");
    if shm.is_dir() { tempfile::tempdir_in(shm) } else { tempfile::tempdir() }.expect("temp dir")
}

proptest! {
    // 1,000 cases by default (about 6 s); PROPTEST_CASES=N for a longer hunt.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|n| n.parse().ok()).unwrap_or(1000),
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_sequence_of_calls_keeps_the_invariants_fencing_and_durability(
        steps in proptest::collection::vec(step(), 1..100)
    ) {
        let d = dir();
        let mut pool = Pool::new(&d.path().join("jobs.db"));
        for (i, s) in steps.iter().enumerate() {
            pool.apply(s);
            if let Err(why) = pool.engine.check_invariants() {
                panic!("after step {i} ({s:?}): {why}");
            }
            pool.check_history();
        }
        pool.restart();
        prop_assert!(pool.engine.check_invariants().is_ok());
    }
}
