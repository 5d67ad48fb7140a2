use std::collections::{BTreeMap, HashMap};

use super::*;

fn node(name: &str, cpus: u32, memory_mb: u64, vm_types: &[&str]) -> NodeSlot {
    NodeSlot {
        ad: NodeAd {
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
        },
        free_cpus: cpus,
        free_memory_mb: memory_mb,
        running_jobs: 0,
    }
}

fn clusters(list: &[(u64, Cluster)]) -> HashMap<u64, Cluster> {
    list.iter().cloned().collect()
}

fn jobs(cluster: u64, ids: std::ops::Range<u64>) -> Vec<IdleJob> {
    ids.map(|id| IdleJob { id, cluster }).collect()
}

#[test]
fn fills_nodes_by_cpus_oldest_job_first() {
    let mut nodes = vec![node("a", 2, 1024, &["wasm"]), node("b", 1, 1024, &["wasm"])];
    let c = clusters(&[(1, Cluster::compile(VmType::Wasm, 1, 64, None, None).unwrap())]);
    let d = place(&mut nodes, &c, jobs(1, 10..15));
    let placed: Vec<(u64, usize)> = d.placements.iter().map(|p| (p.job, p.node)).collect();
    assert_eq!(placed, vec![(10, 0), (11, 0), (12, 1)]);
    // The pool is full: the pass stopped; the jobs left wait.
    let d = place(&mut nodes, &c, jobs(1, 13..15));
    assert!(d.placements.is_empty());
    let mut big = vec![node("a", 2, 100, &["wasm"])];
    let d = place(&mut big, &c, jobs(1, 0..3));
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
    let d = place(&mut nodes, &c, jobs(1, 0..1));
    assert_eq!(d.placements, vec![Placement { job: 0, node: 1 }]);
}

#[test]
fn labels_and_appliance_are_visible() {
    let mut nodes = vec![node("a1", 2, 512, &["wasm"]), node("appliance1", 2, 512, &["wasm"])];
    let c = clusters(&[
        (1, Cluster::compile(VmType::Wasm, 1, 64, Some("node.appliance"), None).unwrap()),
        (2, Cluster::compile(VmType::Wasm, 1, 64, Some("node.labels.site == 'a' && !node.appliance"), None).unwrap()),
    ]);
    let d = place(&mut nodes, &c, [IdleJob { id: 1, cluster: 1 }, IdleJob { id: 2, cluster: 2 }]);
    assert_eq!(d.placements, vec![Placement { job: 1, node: 1 }, Placement { job: 2, node: 0 }]);
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
    let js = [
        IdleJob { id: 1, cluster: 1 },
        IdleJob { id: 2, cluster: 2 },
        IdleJob { id: 3, cluster: 3 },
        IdleJob { id: 4, cluster: 4 },
    ];
    let d = place(&mut nodes, &c, js);
    assert!(d.placements.is_empty());
    assert!(d.waiting[&1].contains("2 do not run qemu jobs"), "{}", d.waiting[&1]);
    assert!(d.waiting[&2].contains("fewer than 4 cpu(s)"), "{}", d.waiting[&2]);
    assert!(d.waiting[&3].contains("2 fail the requirements"), "{}", d.waiting[&3]);
    assert!(d.waiting[&4].contains("requirements failed"), "{}", d.waiting[&4]);
    let d = place(&mut [], &c, js);
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
    let js: Vec<IdleJob> = (0..10_000).map(|id| IdleJob { id, cluster: id % 100 }).collect();
    let d = place(&mut nodes, &c, &js);
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
fn alike_nodes_share_evaluations_but_rank_still_tells_them_apart() {
    let mut nodes: Vec<NodeSlot> = (0..50).map(|i| node(&format!("a{i}"), 4, 1024, &["wasm"])).collect();
    nodes[37].free_cpus = 4;
    nodes[37].ad.cpus = 8;
    let c = clusters(&[(
        1,
        Cluster::compile(VmType::Wasm, 1, 64, Some("node.memory_mb >= 1024"), Some("node.cpus")).unwrap(),
    )]);
    let d = place(&mut nodes, &c, jobs(1, 0..1));
    assert_eq!(d.placements, vec![Placement { job: 0, node: 37 }]);
    let c = clusters(&[(2, Cluster::compile(VmType::Wasm, 1, 64, Some("node.name == 'a12'"), None).unwrap())]);
    let d = place(&mut nodes, &c, [IdleJob { id: 5, cluster: 2 }]);
    assert_eq!(d.placements, vec![Placement { job: 5, node: 12 }]);
}

#[test]
fn time_shared_jobs_spread_over_the_least_loaded_nodes() {
    let mut nodes = vec![node("a", 1, 1024, &["wasm"]), node("b", 1, 1024, &["wasm"]), node("c", 1, 200, &["wasm"])];
    nodes[0].running_jobs = 1;
    let c = clusters(&[(1, Cluster::compile(VmType::Wasm, 0, 256, None, None).unwrap())]);
    let d = place(&mut nodes, &c, jobs(1, 0..6));
    let placed: Vec<usize> = d.placements.iter().map(|p| p.node).collect();
    // c has too little memory for any; b is emptiest first, then a and b alternate.
    assert_eq!(placed, vec![1, 0, 1, 0, 1, 0]);
    assert_eq!(nodes[0].free_memory_mb, 1024 - 3 * 256);
    assert_eq!(nodes[1].free_memory_mb, 1024 - 3 * 256);
    // They used no cpu slots; memory bounds them: two more fit, then the next waits, with a reason.
    assert_eq!(nodes[0].free_cpus, 1);
    assert_eq!(place(&mut nodes, &c, jobs(1, 6..8)).placements.len(), 2);
    let d = place(&mut nodes, &c, jobs(1, 8..9));
    assert!(d.placements.is_empty());
    assert!(d.waiting[&1].contains("256 MiB"), "{:?}", d.waiting);
}
