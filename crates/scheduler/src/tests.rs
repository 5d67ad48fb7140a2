use std::collections::{BTreeMap, HashMap};

use super::*;
use vmgrid_proto::NodeAd;

fn node(name: &str, cpus: u32, memory_mb: u64, vm_types: &[&str]) -> NodeSlot {
    NodeSlot {
        ad: MatchAd::new(NodeAd {
            name: name.into(),
            arch: "x86_64".into(),
            os: "linux".into(),
            cpus,
            memory_mb,
            disk_mb: 10_000,
            vm_types: vm_types.iter().map(|s| s.parse().unwrap()).collect(),
            accelerators: vec!["tcg".into()],
            labels: BTreeMap::from([("site".to_string(), name.chars().next().unwrap().to_string())]),
            appliance: name.starts_with("app"),
            qemu: vm_types.contains(&"qemu").then(|| "10.0.2".into()),
            peer: None,
            overlay: None,
        })
        .into(),
        free_cpus: cpus,
        free_memory_mb: memory_mb,
        running_jobs: 0,
        reputation: if name.starts_with("bad") { 0.2 } else { 0.9 },
    }
}

fn one() -> Vec<UserShare> {
    vec![UserShare::new("u")]
}

fn clusters(list: &[(u64, Cluster)]) -> HashMap<u64, Cluster> {
    list.iter().cloned().collect()
}

fn jobs(cluster: u64, ids: std::ops::Range<u64>) -> Vec<IdleJob> {
    ids.map(|id| IdleJob::new(id, cluster)).collect()
}

#[test]
fn fills_nodes_by_cpus_oldest_job_first() {
    let mut nodes = vec![node("a", 2, 1024, &["wasm"]), node("b", 1, 1024, &["wasm"])];
    let c = clusters(&[(1, Cluster::compile(VmType::Wasm, 1, 64, None, None).unwrap())]);
    let d = place(&mut nodes, &c, &one(), jobs(1, 10..15));
    let placed: Vec<(u64, usize)> = d.placements.iter().map(|p| (p.job, p.node)).collect();
    assert_eq!(placed, vec![(10, 0), (11, 0), (12, 1)]);
    // The pool is full: the pass stopped; the jobs left wait.
    let d = place(&mut nodes, &c, &one(), jobs(1, 13..15));
    assert!(d.placements.is_empty());
    let mut big = vec![node("a", 2, 100, &["wasm"])];
    let d = place(&mut big, &c, &one(), jobs(1, 0..3));
    assert_eq!(d.placements.len(), 1);
    assert!(d.waiting[&1].contains("waiting for 1 cpu(s) and 64 MiB"), "{:?}", d.waiting);
    assert_eq!(nodes[0].free_cpus, 0);
    assert_eq!(nodes[0].running_jobs, 2);
}

#[test]
fn requirements_filter_and_rank_orders() {
    let mut nodes =
        vec![node("a", 2, 512, &["wasm"]), node("b", 8, 4096, &["wasm", "qemu"]), node("c", 4, 4096, &["wasm"])];
    let c = clusters(&[(
        1,
        Cluster::compile(
            VmType::Wasm,
            1,
            64,
            Some("node.memory_mb >= 1024 && \"wasm\" in node.vm_types"),
            Some("node.cpus"),
        )
        .unwrap(),
    )]);
    let d = place(&mut nodes, &c, &one(), jobs(1, 0..1));
    assert_eq!(d.placements, vec![Placement { job: 0, node: 1 }]);
}

#[test]
fn labels_and_appliance_are_visible() {
    let mut nodes = vec![node("a1", 2, 512, &["wasm"]), node("appliance1", 2, 512, &["wasm"])];
    let c = clusters(&[
        (1, Cluster::compile(VmType::Wasm, 1, 64, Some("node.appliance"), None).unwrap()),
        (2, Cluster::compile(VmType::Wasm, 1, 64, Some("node.labels.site == 'a' && !node.appliance"), None).unwrap()),
    ]);
    let d = place(&mut nodes, &c, &one(), [IdleJob::new(1, 1), IdleJob::new(2, 2)]);
    assert_eq!(d.placements, vec![Placement { job: 1, node: 1 }, Placement { job: 2, node: 0 }]);
}

/// A job's own exclusions skip nodes for it alone: the jobs after it still get the node it may
/// not have.
#[test]
fn a_jobs_exclusions_skip_nodes_for_it_alone() {
    let mut nodes = vec![node("a1", 1, 512, &["wasm"]), node("a2", 1, 512, &["wasm"])];
    let c = clusters(&[(1, Cluster::compile(VmType::Wasm, 1, 64, None, None).unwrap())]);
    let picky = IdleJob { exclude: Some(vec![0].into()), ..IdleJob::new(1, 1) };
    let d = place(&mut nodes, &c, &one(), [picky, IdleJob::new(2, 1)]);
    assert_eq!(d.placements, vec![Placement { job: 1, node: 1 }, Placement { job: 2, node: 0 }]);
    let mut nodes = vec![node("a1", 1, 512, &["wasm"])];
    let picky = IdleJob { exclude: Some(vec![0].into()), ..IdleJob::new(1, 1) };
    let d = place(&mut nodes, &c, &one(), [picky]);
    assert!(d.placements.is_empty(), "its only node is excluded");
}

#[test]
fn reputation_is_visible() {
    let mut nodes = vec![node("bad1", 2, 512, &["wasm"]), node("good1", 2, 512, &["wasm"])];
    let c = clusters(&[(1, Cluster::compile(VmType::Wasm, 1, 64, Some("node.reputation > 0.5"), None).unwrap())]);
    let d = place(&mut nodes, &c, &one(), [IdleJob::new(1, 1), IdleJob::new(2, 1), IdleJob::new(3, 1)]);
    assert!(d.placements.iter().all(|p| p.node == 1), "{:?}", d.placements);
}

#[test]
fn the_qemu_version_is_visible() {
    let mut nodes = vec![node("a", 2, 512, &["wasm"]), node("b", 2, 512, &["wasm", "qemu"])];
    let c = clusters(&[(1, Cluster::compile(VmType::Wasm, 1, 64, Some("node.qemu.startsWith('10.')"), None).unwrap())]);
    let d = place(&mut nodes, &c, &one(), [IdleJob::new(1, 1)]);
    assert_eq!(d.placements, vec![Placement { job: 1, node: 1 }]);
}

#[test]
fn unmatchable_jobs_stay_idle_with_a_reason() {
    let mut nodes = vec![node("a", 2, 512, &["wasm"]), node("b", 2, 512, &["wasm"])];
    let c = clusters(&[
        (1, Cluster::compile(VmType::Qemu, 1, 64, None, None).unwrap()),
        (2, Cluster::compile(VmType::Wasm, 4, 64, None, None).unwrap()),
        (3, Cluster::compile(VmType::Wasm, 1, 64, Some("node.cpus > 100"), None).unwrap()),
        (4, Cluster::compile(VmType::Wasm, 1, 64, Some("node.nonexistent == 1"), None).unwrap()),
    ]);
    let js = [IdleJob::new(1, 1), IdleJob::new(2, 2), IdleJob::new(3, 3), IdleJob::new(4, 4)];
    let d = place(&mut nodes, &c, &one(), js.clone());
    assert!(d.placements.is_empty());
    assert!(d.waiting[&1].contains("2 do not run qemu jobs"), "{}", d.waiting[&1]);
    assert!(d.waiting[&2].contains("fewer than 4 cpu(s)"), "{}", d.waiting[&2]);
    assert!(d.waiting[&3].contains("2 fail the requirements"), "{}", d.waiting[&3]);
    assert!(d.waiting[&4].contains("requirements failed"), "{}", d.waiting[&4]);
    let d = place(&mut [], &c, &one(), js);
    assert_eq!(d.waiting[&1], "no ready nodes in the pool");
}

#[test]
fn bad_expressions_are_refused_at_compile_time() {
    let e = Cluster::compile(VmType::Wasm, 1, 64, Some("node.cpus >>> 2"), None).unwrap_err();
    assert_eq!(e.which, "requirements");
    assert!(Cluster::compile(VmType::Wasm, 1, 64, None, Some("(")).is_err());
}

#[test]
fn many_cases_per_second() {
    // 10,000 jobs in 100 clusters on 100 nodes: a plain synchronous call.
    let mut nodes: Vec<NodeSlot> = (0..100).map(|i| node(&format!("n{i}"), 64, 1 << 20, &["wasm"])).collect();
    let c: HashMap<u64, Cluster> = (0..100)
        .map(|k| {
            (
                k,
                Cluster::compile(VmType::Wasm, 1, 16, Some(&format!("node.cpus >= {}", k % 8)), Some("node.free_cpus"))
                    .unwrap(),
            )
        })
        .collect();
    let js: Vec<IdleJob> = (0..10_000).map(|id| IdleJob::new(id, id % 100)).collect();
    let d = place(&mut nodes, &c, &one(), &js);
    assert_eq!(d.placements.len(), 6400);
    assert!(nodes.iter().all(|n| n.free_cpus == 0));
}

#[test]
fn expressions_know_which_attributes_they_read() {
    assert_eq!(reads_of("node.cpus >= 2 && \"wasm\" in node.vm_types"), Some(vec![3, 6]));
    assert_eq!(reads_of("node.labels.site == 'node.os'"), Some(vec![8]));
    assert_eq!(reads_of("true"), Some(vec![]));
    // Anything but node.NAME: evaluate per node.
    assert_eq!(reads_of("node['cpus'] > 1"), None);
    assert_eq!(reads_of("size(node) > 1"), None);
    assert_eq!(reads_of("node.nosuch > 1"), None);
    assert_eq!(reads_of("mynode.x || node_count > 1"), Some(vec![]));
    assert_eq!(reads_of("node.labels.x == \"it's\" && node.cpus > 1"), Some(vec![3, 8]));
    assert_eq!(reads_of("node.os == 'a\\'b' || node.arch == \"x\""), Some(vec![1, 2]));
    assert_eq!(reads_of("node.os == \"\"\"x\"\"\""), None);
}

#[test]
fn expressions_see_the_nodes_as_the_pass_found_them() {
    // Job 0 takes 2 of a's 4 cpus; job 1's rank still sees a with 4 free (b has 3), so it goes to a.
    let mut nodes = vec![node("a", 4, 1024, &["wasm"]), node("b", 3, 1024, &["wasm"])];
    let c = clusters(&[
        (1, Cluster::compile(VmType::Wasm, 2, 64, None, None).unwrap()),
        (2, Cluster::compile(VmType::Wasm, 1, 64, None, Some("node.free_cpus")).unwrap()),
    ]);
    let d = place(&mut nodes, &c, &one(), [IdleJob::new(0, 1), IdleJob::new(1, 2)]);
    assert_eq!(d.placements, vec![Placement { job: 0, node: 0 }, Placement { job: 1, node: 0 }]);
    assert_eq!((nodes[0].free_cpus, nodes[1].free_cpus), (1, 3));
}

#[test]
fn alike_nodes_share_evaluations_but_rank_still_tells_them_apart() {
    let mut nodes: Vec<NodeSlot> = (0..50).map(|i| node(&format!("a{i}"), 4, 1024, &["wasm"])).collect();
    nodes[37].free_cpus = 4;
    // An ad changes only as a whole (a node registers again), and its CEL with it.
    nodes[37].ad = MatchAd::new(NodeAd { cpus: 8, ..nodes[37].ad.ad().clone() }).into();
    let c = clusters(&[(
        1,
        Cluster::compile(VmType::Wasm, 1, 64, Some("node.memory_mb >= 1024"), Some("node.cpus")).unwrap(),
    )]);
    let d = place(&mut nodes, &c, &one(), jobs(1, 0..1));
    assert_eq!(d.placements, vec![Placement { job: 0, node: 37 }]);
    let c = clusters(&[(2, Cluster::compile(VmType::Wasm, 1, 64, Some("node.name == 'a12'"), None).unwrap())]);
    let d = place(&mut nodes, &c, &one(), [IdleJob::new(5, 2)]);
    assert_eq!(d.placements, vec![Placement { job: 5, node: 12 }]);
}

#[test]
fn time_shared_jobs_spread_over_the_least_loaded_nodes() {
    let mut nodes = vec![node("a", 1, 1024, &["wasm"]), node("b", 1, 1024, &["wasm"]), node("c", 1, 200, &["wasm"])];
    nodes[0].running_jobs = 1;
    let c = clusters(&[(1, Cluster::compile(VmType::Wasm, 0, 256, None, None).unwrap())]);
    let d = place(&mut nodes, &c, &one(), jobs(1, 0..6));
    let placed: Vec<usize> = d.placements.iter().map(|p| p.node).collect();
    // c has too little memory for any; b is emptiest first, then a and b alternate.
    assert_eq!(placed, vec![1, 0, 1, 0, 1, 0]);
    assert_eq!(nodes[0].free_memory_mb, 1024 - 3 * 256);
    assert_eq!(nodes[1].free_memory_mb, 1024 - 3 * 256);
    // They used no cpu slots; memory bounds them: two more fit, then the next waits, with a reason.
    assert_eq!(nodes[0].free_cpus, 1);
    assert_eq!(place(&mut nodes, &c, &one(), jobs(1, 6..8)).placements.len(), 2);
    let d = place(&mut nodes, &c, &one(), jobs(1, 8..9));
    assert!(d.placements.is_empty());
    assert!(d.waiting[&1].contains("256 MiB"), "{:?}", d.waiting);
}

fn user(name: &str, running_cpus: u64, recent_cpus: f64, factor: f64, max_cpus: Option<u64>) -> UserShare {
    UserShare { name: name.into(), running_cpus, recent_cpus, factor, max_cpus }
}

/// Jobs `ids` of user `user` in cluster 1, with `priority`.
fn of(user: u32, priority: i32, ids: std::ops::Range<u64>) -> Vec<IdleJob> {
    ids.map(|id| IdleJob { id, cluster: 1, user, priority, exclude: None }).collect()
}

/// How many of the placements went to jobs of each id range's owner (ids below 100 are alice's).
fn split(d: &Decision) -> (usize, usize) {
    let alice = d.placements.iter().filter(|p| p.job < 100).count();
    (alice, d.placements.len() - alice)
}

fn one_cluster() -> HashMap<u64, Cluster> {
    clusters(&[(1, Cluster::compile(VmType::Wasm, 1, 64, None, None).unwrap())])
}

#[test]
fn users_alike_take_turns_whoever_submitted_first() {
    let mut nodes = vec![node("a", 4, 4096, &["wasm"])];
    let users = [user("alice", 0, 0.0, 1.0, None), user("bob", 0, 0.0, 1.0, None)];
    // Alice's sweep came first, and is long; bob's came after it. They alternate.
    let js: Vec<IdleJob> = of(0, 0, 1..50).into_iter().chain(of(1, 0, 100..110)).collect();
    let d = place(&mut nodes, &one_cluster(), &users, &js);
    let order: Vec<u64> = d.placements.iter().map(|p| p.job).collect();
    assert_eq!(order, vec![1, 100, 2, 101]);
}

#[test]
fn the_next_slot_goes_to_whoever_runs_least() {
    // Alice already runs 4 cpus; bob none: of 6 free, bob gets 5 before they are level.
    let mut nodes = vec![node("a", 6, 4096, &["wasm"])];
    let users = [user("alice", 4, 0.0, 1.0, None), user("bob", 0, 0.0, 1.0, None)];
    let js: Vec<IdleJob> = of(0, 0, 1..50).into_iter().chain(of(1, 0, 100..110)).collect();
    let d = place(&mut nodes, &one_cluster(), &users, &js);
    assert_eq!(split(&d), (1, 5));
}

#[test]
fn recent_usage_and_factors_weigh_on_the_share() {
    // Alice used the pool heavily of late (10 cpus on average): bob gets all 4 free cpus.
    let mut nodes = vec![node("a", 4, 4096, &["wasm"])];
    let users = [user("alice", 0, 10.0, 1.0, None), user("bob", 0, 0.0, 1.0, None)];
    let js: Vec<IdleJob> = of(0, 0, 1..50).into_iter().chain(of(1, 0, 100..110)).collect();
    assert_eq!(split(&place(&mut nodes, &one_cluster(), &users, &js)), (0, 4));
    // A factor of 2 gets half the share of a factor of 1.
    let mut nodes = vec![node("a", 6, 4096, &["wasm"])];
    let users = [user("alice", 0, 0.0, 2.0, None), user("bob", 0, 0.0, 1.0, None)];
    assert_eq!(split(&place(&mut nodes, &one_cluster(), &users, &js)), (2, 4));
}

#[test]
fn a_user_at_their_quota_waits_with_the_reason_and_others_go_on() {
    let mut nodes = vec![node("a", 8, 4096, &["wasm"])];
    let c = clusters(&[
        (1, Cluster::compile(VmType::Wasm, 1, 64, None, None).unwrap()),
        (2, Cluster::compile(VmType::Wasm, 1, 64, None, None).unwrap()),
    ]);
    let users = [user("alice", 1, 0.0, 1.0, Some(3)), user("bob", 0, 0.0, 1.0, None)];
    let mut js = of(0, 0, 1..10);
    js.extend((100..110).map(|id| IdleJob { id, cluster: 2, user: 1, priority: 0, exclude: None }));
    let d = place(&mut nodes, &c, &users, &js);
    assert_eq!(split(&d), (2, 6), "alice gets 2 more (3 in all), bob the rest");
    assert_eq!(
        d.waiting[&1],
        "alice runs 3 cpu(s), and 3 is the user's quota (`vmgrid users`): waiting until some of alice's jobs end"
    );
    assert!(!d.waiting.contains_key(&2), "{:?}", d.waiting);
    // A user with jobs of many cpus is held to the quota too.
    let mut nodes = vec![node("a", 8, 4096, &["wasm"])];
    let c = clusters(&[(1, Cluster::compile(VmType::Wasm, 4, 64, None, None).unwrap())]);
    let users = [user("alice", 0, 0.0, 1.0, Some(6))];
    let d = place(&mut nodes, &c, &users, of(0, 0, 1..4));
    assert_eq!(d.placements.len(), 1);
    assert!(d.waiting[&1].starts_with("alice runs 4 cpu(s), and 6 is"), "{:?}", d.waiting);
}

#[test]
fn a_jobs_own_priority_orders_it_among_its_users_jobs_only() {
    let mut nodes = vec![node("a", 4, 4096, &["wasm"])];
    let users = [user("alice", 0, 0.0, 1.0, None), user("bob", 0, 0.0, 1.0, None)];
    // Alice's later jobs have priority 5; bob's 0 jobs still get their turns.
    let mut js = of(0, 0, 1..4);
    js.extend(of(0, 5, 4..7));
    js.extend(of(1, 0, 100..103));
    let d = place(&mut nodes, &one_cluster(), &users, &js);
    let order: Vec<u64> = d.placements.iter().map(|p| p.job).collect();
    assert_eq!(order, vec![4, 100, 5, 101]);
    let mut nodes = vec![node("a", 4, 4096, &["wasm"])];
    let js = [of(0, -1, 1..2), of(0, 3, 2..3), of(0, 0, 3..4), of(0, 3, 4..5)].concat();
    let order: Vec<u64> = place(&mut nodes, &one_cluster(), &users, &js).placements.iter().map(|p| p.job).collect();
    assert_eq!(order, vec![2, 4, 3, 1]);
}

#[test]
fn a_job_of_a_user_the_pass_does_not_know_waits_with_a_reason() {
    let mut nodes = vec![node("a", 4, 4096, &["wasm"])];
    let d =
        place(&mut nodes, &one_cluster(), &one(), [IdleJob { id: 1, cluster: 1, user: 7, priority: 0, exclude: None }]);
    assert!(d.placements.is_empty());
    assert_eq!(d.waiting[&1], "the job's user is unknown to the matchmaker");
}
