//! Large blobs between nodes, end to end with real node agents: six nodes that need one 512 MiB
//! input fetch its pieces mostly from each other, and the coordinator sends it about once or
//! twice, not six times; a download cut by killing its node resumes from the pieces it had.

use std::io::Write;

use vmgrid_proto::JobState;

use crate::util::*;

const MIB: u64 = 1 << 20;

/// Bytes of blobs the coordinator has sent.
fn served(pool: &Pool) -> u64 {
    let m = pool.admin().metrics().unwrap();
    m.lines().find_map(|l| l.strip_prefix("vmgrid_blob_bytes_served_total ")).unwrap().trim().parse().unwrap()
}

/// A file of `mib` MiB of bytes that do not repeat, in `d`.
fn big_file(d: &JobDir, mib: u64) -> std::path::PathBuf {
    big_file_named(d, "big.bin", mib)
}

fn big_file_named(d: &JobDir, name: &str, mib: u64) -> std::path::PathBuf {
    let path = d.path().join(name);
    let mut f = std::io::BufWriter::new(std::fs::File::create(&path).unwrap());
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut buf = vec![0u8; MIB as usize];
    for _ in 0..mib {
        for b in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        f.write_all(&buf).unwrap();
    }
    f.flush().unwrap();
    path
}

/// A job on node `node` that needs `big.bin` as its input.
fn job_on(d: &JobDir, node: &str) -> std::path::PathBuf {
    job_needing(d, node, "big.bin")
}

/// A job on node `node` that needs `input` as its input.
fn job_needing(d: &JobDir, node: &str, input: &str) -> std::path::PathBuf {
    probe_job_file(
        d.path(),
        &format!("needs-{node}-{}", input.replace('.', "-")),
        &["exit:0"],
        &format!(
            "[resources]\ndisk_mb = 1024\n[files]\ninputs = [\"{input}\"]\n[policy]\nrequirements = 'node.name == \"{node}\"'\n"
        ),
    )
}

#[test]
fn six_nodes_fetch_a_large_input_mostly_from_each_other() {
    let mut pool = Pool::start();
    let names: Vec<String> = (1..=6).map(|i| format!("p{i}")).collect();
    for n in &names {
        pool.start_node(n, 1);
    }
    let d = JobDir::new();
    big_file(&d, 512);
    let mut ids = Vec::new();
    let before = served(&pool);
    // The first submit uploads the input; the rest find it in the pool.
    for n in &names {
        let out = pool.cli().arg("submit").arg(job_on(&d, n)).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
        ids.extend(ids_of(&out));
    }
    pool.wait_for("the jobs to end", |p| ids.iter().all(|&id| p.job(id).state.is_final()));
    for &id in &ids {
        assert_eq!(pool.job(id).state, JobState::Completed, "{:?}", pool.job(id));
    }
    let sent = served(&pool) - before;
    eprintln!("the coordinator sent {:.0} MiB for six nodes of a 512 MiB input", sent as f64 / MIB as f64);
    assert!(sent < 3 * 512 * MIB, "the coordinator sent {} MiB", sent / MIB);
}

/// A node killed while it fetches a large input, and started again, goes on from the pieces it
/// had: the coordinator does not send the whole input again.
#[test]
fn a_cut_download_resumes_from_the_pieces_it_had() {
    let mut pool = Pool::start();
    pool.start_node("r1", 1);
    let d = JobDir::new();
    big_file(&d, 512);
    let out = pool.cli().arg("submit").arg(job_on(&d, "r1")).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let id = ids_of(&out)[0];
    // The upload is not counted (it is sent to the coordinator); the fetch is.
    let before = served(&pool);
    let mut at_kill = 0;
    let cut = poll_until(std::time::Duration::from_secs(60), || {
        at_kill = served(&pool) - before;
        at_kill >= 96 * MIB
    });
    assert!(cut, "the node did not start fetching");
    pool.kill_node("r1");
    let at_kill = served(&pool) - before;
    assert!(at_kill < 512 * MIB, "killed too late: {} MiB already sent", at_kill / MIB);
    pool.start_node("r1", 1);
    pool.wait_for("the job to end", |p| p.job(id).state.is_final());
    assert_eq!(pool.job(id).state, JobState::Completed);
    let after = served(&pool) - before - at_kill;
    eprintln!("sent {} MiB before the cut and {} MiB after", at_kill / MIB, after / MIB);
    assert!(
        after + at_kill < 512 * MIB + 64 * MIB,
        "sent {} MiB before the cut and {} after",
        at_kill / MIB,
        after / MIB
    );
}

/// A changed image (a part rewritten in place, bytes inserted near its start) shares most of its
/// pieces with the old one: a node that has the old one takes them from its own cache, and the
/// coordinator sends only what changed.
#[test]
fn a_changed_input_sends_only_what_changed() {
    let mut pool = Pool::start();
    pool.start_node("c1", 1);
    let d = JobDir::new();
    let old = big_file_named(&d, "v1.bin", 128);
    let mut bytes = std::fs::read(&old).unwrap();
    bytes[(64 * MIB) as usize..(65 * MIB) as usize].fill(7);
    bytes.splice(4096..4096, [1u8; 1000]);
    std::fs::write(d.path().join("v2.bin"), &bytes).unwrap();
    let run = |input: &str| {
        let before = served(&pool);
        let out = pool.cli().arg("submit").arg(job_needing(&d, "c1", input)).output().unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
        let id = ids_of(&out)[0];
        pool.wait_for("the job to end", |p| p.job(id).state.is_final());
        assert_eq!(pool.job(id).state, JobState::Completed);
        served(&pool) - before
    };
    let first = run("v1.bin");
    let second = run("v2.bin");
    eprintln!("the first version took {} MiB from the coordinator, the second {} MiB", first / MIB, second / MIB);
    assert!(first >= 128 * MIB);
    assert!(second < 24 * MIB, "the changed input took {} MiB", second / MIB);
}
