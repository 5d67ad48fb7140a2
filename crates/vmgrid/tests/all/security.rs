//! Hostile users, jobs and local accounts against a real pool: one test per defence of the threat
//! model in ARCHITECTURE.md (the API's one validator, expression bounds, private files, quotas,
//! the disk reserve, disk limits, retention, paging, token expiry and revocation, terminal output).

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use serde_json::{Value, json};
use vmgrid_client::Client;

use crate::util::*;

/// POSTs `body` (raw bytes) to `path` with `token`; the status and the body of the answer.
fn post_raw(pool: &Pool, token: &str, path: &str, body: &[u8]) -> (u16, String) {
    let client = pool.client_with(token);
    let mut resp = client
        .trust()
        .agent(Duration::from_secs(30))
        .post(format!("{}{path}", pool.url))
        .header("Authorization", &format!("Bearer {token}"))
        .header("Content-Type", "application/json")
        .send(body)
        .unwrap();
    (resp.status().as_u16(), resp.body_mut().read_to_string().unwrap_or_default())
}

/// A user's token, made by the admin.
fn user_token(pool: &Pool, user: &str) -> String {
    pool.admin().add_token(vmgrid_proto::Role::User, user, None).unwrap().token
}

/// A spec that would run the probe guest, as JSON, with its image uploaded by `client`.
fn probe_spec(client: &Client) -> Value {
    let image = client.upload_file(&guest_wasm("probe"), "probe.wasm").unwrap();
    json!({
        "name": "probe", "vm_type": "wasm", "image": image, "args": ["exit:0"],
        "cpus": 1, "memory_mb": 64, "timeout_s": 60, "disk_mb": 16,
    })
}

fn mode(p: &std::path::Path) -> u32 {
    std::fs::metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())).permissions().mode() & 0o777
}

#[test]
fn api_bodies_are_checked_by_the_one_validator_and_refusals_queue_nothing() {
    let pool = Pool::start();
    let token = user_token(&pool, "mallory");
    let spec = probe_spec(&pool.client_with(&token));
    let deep = format!("{}true{}", "(".repeat(40), ")".repeat(40));
    let wide = format!("{} > 0", vec!["node.cpus"; 300].join(" + "));
    // The review's own expressions: 2,000 terms in 4 KB (overflowed the parser's stack), and
    // seven nested comprehensions in 285 bytes (froze the API for minutes).
    let terms = format!("{}1 == 0", "1+".repeat(1999));
    let nested7 =
        (0..7).fold("v0 > 100".to_string(), |inner, i| format!("[0,1,2,3,4,5,6,7,8,9,10].exists(v{i}, {inner})"));
    let cases: Vec<(&str, Value, &str)> = vec![
        ("2000 terms", json!({"requirements": terms}), "operators"),
        ("7 nested", json!({"requirements": nested7}), "inside another"),
        ("name injection", json!({"name": "x,process=evil"}), "name"),
        ("env key", json!({"env": {"A B": "x"}}), "env"),
        ("append", json!({"append": "x".repeat(3000)}), "append"),
        ("ssi", json!({"ssi": {"home": "https://evil:1", "token": "t", "pid": 1}}), "`ssi` is set by the pool"),
        ("cpus", json!({"cpus": 0}), "cpus"),
        ("name", json!({"name": "a\u{1b}[2Jb"}), "name"),
        ("env", json!({"env": {"A=B": "x"}}), "env"),
        ("wide", json!({"requirements": wide}), "operators"),
        ("deep", json!({"requirements": deep}), "deep"),
        ("nested", json!({"rank": "[1,2].all(x, [3].exists(y, y > x)) ? 1 : 0"}), "inside another"),
        ("outputs", json!({"outputs": ["../../etc/passwd"]}), "output pattern"),
    ];
    for (what, patch, expect) in cases {
        let mut s = spec.clone();
        for (k, v) in patch.as_object().unwrap() {
            s[k] = v.clone();
        }
        let body = serde_json::to_vec(&json!({"spec": s, "count": 1})).unwrap();
        let (status, text) = post_raw(&pool, &token, "/v1/jobs", &body);
        assert_eq!(status, 400, "{what}: {text}");
        assert!(text.contains(expect), "{what}: the refusal does not say `{expect}`: {text}");
    }
    for (what, body) in [
        ("not json", &b"{\"spec\": "[..]),
        ("unknown field", &br#"{"spec": {}, "count": 1, "evil": true}"#[..]),
        ("count", &br#"{"count": -1}"#[..]),
    ] {
        let (status, text) = post_raw(&pool, &token, "/v1/jobs", body);
        assert!(status == 400 || status == 422, "{what}: {status} {text}");
    }
    assert!(pool.admin().jobs().unwrap().is_empty(), "a refused submission queued a job");
    // The same spec, unpatched, is accepted: the refusals were for the patches alone.
    let (status, text) = post_raw(&pool, &token, "/v1/jobs", &serde_json::to_vec(&json!({"spec": spec})).unwrap());
    assert_eq!(status, 200, "{text}");
}

#[test]
fn the_cli_refuses_an_expression_too_big_to_evaluate_before_sending_it() {
    let pool = Pool::start();
    let d = JobDir::new();
    let wide = format!("{} > 0", vec!["node.cpus"; 300].join(" + "));
    let job = probe_job_file(d.path(), "wide", &["exit:0"], &format!("[policy]\nrequirements = '{wide}'\n"));
    let out = pool.cli().arg("submit").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("requirements") && stderr_of(&out).contains("operators"), "{}", stderr_of(&out));
    assert!(pool.admin().jobs().unwrap().is_empty());
}

#[test]
fn secrets_and_the_store_are_private_and_a_readable_key_is_refused() {
    let mut pool = Pool::start_on_sqlite_in(tempfile::tempdir().unwrap(), &[]);
    pool.start_node("n1", 1);
    let d = JobDir::new();
    let job = probe_job_file(d.path(), "one", &["write:r.txt:x"], "[files]\noutputs = [\"r.txt\"]\n");
    let out = pool.cli().arg("submit").arg(&job).output().unwrap();
    let id = ids_of(&out)[0];
    pool.cli().args(["wait", &id.to_string()]).assert().success();

    let data = pool.data_dir();
    assert_eq!(mode(&data), 0o700);
    for f in ["admin.token", "pool.token", "ca.key", "client.toml", "pool.sqlite", "pool.sqlite-wal", "pool.sqlite-shm"]
    {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&data.join("blobs")), 0o700);
    let node = pool.dir.path().join("node-n1");
    assert_eq!(mode(&node), 0o700, "the node's cache");
    assert_eq!(mode(&node.join("credential")), 0o600, "the node's credential");

    // A user's token file that others can read still works, with a warning that says what to do.
    let shared = d.path().join("alice.token");
    std::fs::write(&shared, user_token(&pool, "alice")).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = vmgrid()
        .args(["q", "--pool", &pool.url, "--ca-file"])
        .arg(data.join("ca.pem"))
        .arg("--token-file")
        .arg(&shared)
        .env_remove("VMGRID_CONFIG")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("can be read by other accounts (mode 0644)"), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("chmod 600"), "{}", stderr_of(&out));

    // `vmgrid token --out` writes a new file of mode 0600, and will not replace one.
    let made = d.path().join("bob.token");
    pool.cli().args(["token", "bob", "--out"]).arg(&made).assert().success();
    assert_eq!(mode(&made), 0o600);
    let out = pool.cli().args(["token", "bob", "--out"]).arg(&made).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("it exists"), "{}", stderr_of(&out));

    // Another account able to read the CA's key could mint any identity: the coordinator
    // refuses to start on it, and says how to fix it.
    pool.kill_coordinator();
    std::fs::set_permissions(data.join("ca.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = vmgrid().args(["coordinator", "--listen", "127.0.0.1:0", "--data-dir"]).arg(&data).output().unwrap();
    assert_ne!(out.status.code(), Some(0));
    let err = stderr_of(&out);
    assert!(err.contains("ca.key") && err.contains("chmod"), "{err}");
}

#[test]
fn queue_and_file_quotas_are_per_user_and_say_what_to_do() {
    let pool = Pool::start_with(&["--max-queued-per-user", "3", "--max-blob-mb", "1", "--max-blob-mb-per-user", "2"]);
    let alice = pool.client_with(&user_token(&pool, "alice"));
    let bob = pool.client_with(&user_token(&pool, "bob"));

    let big = vec![7u8; (1 << 20) + 1];
    let e = alice.upload_bytes(&big, "big").unwrap_err();
    assert_eq!(e.status(), Some(413), "{e}");
    assert!(e.to_string().contains("at most 1 MiB"), "{e}");

    let part = |i: u8| vec![i; 900 << 10];
    alice.upload_bytes(&part(1), "a").unwrap();
    alice.upload_bytes(&part(2), "b").unwrap();
    let e = alice.upload_bytes(&part(3), "c").unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    assert!(e.to_string().contains("more than 2 MiB"), "{e}");
    // Bob has a quota of his own, and sending what alice already stored costs him nothing.
    bob.upload_bytes(&part(3), "c").unwrap();
    bob.upload_bytes(&part(1), "a").unwrap();

    let spec = probe_spec(&bob);
    let submit = |c: &Client, n: u64| {
        let spec: vmgrid_proto::JobSpec = serde_json::from_value(spec.clone()).unwrap();
        c.submit(&vmgrid_proto::SubmitRequest { spec, count: n })
    };
    let e = submit(&bob, 4).unwrap_err();
    assert_eq!(e.status(), Some(403), "{e}");
    assert!(e.to_string().contains("at most 3"), "{e}");
    submit(&bob, 3).unwrap();
    assert!(submit(&bob, 1).is_err(), "a fourth job was queued");
    submit(&alice, 3).unwrap();
    assert_eq!(pool.admin().jobs().unwrap().len(), 6);
}

#[test]
fn a_coordinator_whose_disk_is_nearly_full_refuses_uploads_with_507_and_keeps_working() {
    assert!(unsafe_is_root(), "this test mounts a small file system for the data directory and must run as root");
    let mount = Mount::tmpfs(96);
    let pool = Pool::start_in(tempfile::tempdir_in(mount.path()).unwrap(), &[]);
    let client = pool.admin();
    let e = client.upload_bytes(&vec![1u8; 60 << 20], "fill").unwrap_err();
    assert_eq!(e.status(), Some(507), "{e}");
    assert!(e.to_string().contains("disk"), "{e}");
    // Small files still fit above the reserve, and the store still takes jobs.
    client.upload_bytes(b"small", "small").unwrap();
    let spec: vmgrid_proto::JobSpec = serde_json::from_value(probe_spec(&client)).unwrap();
    client.submit(&vmgrid_proto::SubmitRequest { spec, count: 1 }).unwrap();
    drop(pool);
    drop(mount);
}

#[test]
fn a_full_disk_under_the_store_stops_no_coordinator_and_loses_or_doubles_no_job() {
    assert!(unsafe_is_root(), "this test mounts a small file system for the data directory and must run as root");
    let mount = Mount::tmpfs(96);
    let mut pool = Pool::start_on_sqlite_in(tempfile::tempdir_in(mount.path()).unwrap(), &[]);
    let client = pool.admin();
    let spec: vmgrid_proto::JobSpec = serde_json::from_value(probe_spec(&client)).unwrap();
    // Another process fills the disk.
    let filler = mount.path().join("filler");
    fill(&filler);
    // A submission already queued when the store failed waits, then is told it is not yet
    // acknowledged; one that comes while the store is failing is refused at once.
    let first = std::thread::spawn({
        let (client, spec) = (client.clone(), spec.clone());
        move || client.submit(&vmgrid_proto::SubmitRequest { spec, count: 1 })
    });
    std::thread::sleep(Duration::from_secs(3));
    let e = client.submit(&vmgrid_proto::SubmitRequest { spec, count: 1 }).unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    assert!(e.to_string().contains("nothing was submitted"), "{e}");
    let e = first.join().unwrap().unwrap_err();
    assert_eq!(e.status(), Some(503), "{e}");
    assert!(e.to_string().contains("not acknowledged"), "{e}");
    assert!(pool.coordinator.as_mut().unwrap().try_wait().unwrap().is_none(), "the coordinator exited");
    // Room again: the first submission is saved, the second never was, and the job runs once.
    std::fs::remove_file(&filler).unwrap();
    let jobs = pool.admin().jobs().unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    pool.start_node("n1", 1);
    pool.wait_for("the job to complete", |p| p.job(jobs[0].id).state == vmgrid_proto::JobState::Completed);
    assert_eq!(pool.job(jobs[0].id).attempts, 1);
    drop(pool);
    drop(mount);
}

/// Writes to `path` until the file system is full.
fn fill(path: &std::path::Path) {
    use std::io::Write;
    let mut f = std::fs::File::create(path).unwrap();
    for size in [1 << 20, 4096, 1] {
        let chunk = vec![0u8; size];
        while f.write_all(&chunk).is_ok() {}
    }
    let _ = f.sync_all();
}

#[test]
fn a_job_over_its_disk_limit_is_stopped_by_its_node_and_uploads_no_outputs() {
    let mut pool = Pool::start();
    pool.start_node("n1", 1);
    let d = JobDir::new();
    let job = probe_job_file(
        d.path(),
        "filler",
        &["fill:big.bin"],
        "[resources]\ndisk_mb = 4\ntimeout_s = 300\n[files]\noutputs = [\"big.bin\"]\n",
    );
    let id = ids_of(&pool.cli().arg("submit").arg(&job).output().unwrap())[0];
    let out = pool.cli().args(["wait", &id.to_string()]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    // Held, as every guest failure is, with the reason.
    let r = pool.admin().job(id).unwrap();
    assert_eq!(r.job.state, vmgrid_proto::JobState::Held);
    let reason = r.job.reason.unwrap_or_default();
    assert!(reason.contains("disk limit exceeded") && reason.contains("disk_mb limit of 4 MiB"), "{reason}");
    assert!(r.outputs.is_empty(), "outputs past the disk limit were uploaded: {:?}", r.outputs);
}

#[test]
fn finished_jobs_and_their_files_are_forgotten_after_the_retention_period() {
    let mut pool = Pool::start_with(&["--retain-days", "0"]);
    pool.start_node("n1", 1);
    let d = JobDir::new();
    let job = probe_job_file(d.path(), "brief", &["write:r.txt:kept briefly"], "[files]\noutputs = [\"r.txt\"]\n");
    let id = ids_of(&pool.cli().arg("submit").arg(&job).output().unwrap())[0];
    wait_until("the job to be forgotten", || pool.admin().job(id).is_err_and(|e| e.status() == Some(404)));
    let out = pool.cli().args(["q", "--json"]).output().unwrap();
    assert_eq!(serde_json::from_slice::<Vec<Value>>(&out.stdout).unwrap().len(), 0);
}

#[test]
fn listings_are_paged_so_a_big_queue_is_listed_whole() {
    let pool = Pool::start();
    let client = pool.admin();
    let spec: vmgrid_proto::JobSpec = serde_json::from_value(probe_spec(&client)).unwrap();
    let n = vmgrid_proto::MAX_PAGE + 500;
    client.submit(&vmgrid_proto::SubmitRequest { spec, count: n as u64 }).unwrap();
    let page = client.jobs_page(0, 100_000, None).unwrap();
    assert_eq!(page.jobs.len(), vmgrid_proto::MAX_PAGE, "a page is at most MAX_PAGE jobs");
    assert!(page.next_after.is_some());
    let out = pool.cli().args(["q", "--json"]).output().unwrap();
    let all: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(all.len(), n);
    let mut ids: Vec<u64> = all.iter().map(|j| j["id"].as_u64().unwrap()).collect();
    ids.dedup();
    assert_eq!(ids.len(), n, "a job was listed twice");
}

#[test]
fn tokens_expire_and_revoked_tokens_stop_working_at_once() {
    let pool = Pool::start();
    let admin = pool.admin();
    let brief = admin.add_token(vmgrid_proto::Role::User, "carol", Some(1)).unwrap();
    let kept = admin.add_token(vmgrid_proto::Role::User, "carol", None).unwrap();
    pool.client_with(&brief.token).jobs().unwrap();
    // Its one second runs out: from then on it is refused (401), not sometimes accepted.
    wait_until("the 1 s token to expire", || pool.client_with(&brief.token).jobs().is_err());
    assert_eq!(pool.client_with(&brief.token).jobs().unwrap_err().status(), Some(401));
    pool.client_with(&kept.token).jobs().unwrap();
    let out = pool.cli().args(["token", "--revoke", &kept.id]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert_eq!(pool.client_with(&kept.token).jobs().unwrap_err().status(), Some(401));
    let out = pool.cli().args(["token", "--list", "--json"]).output().unwrap();
    let list: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert!(list.iter().all(|t| t["id"] != kept.id.as_str()), "a revoked token is still listed");
}

#[test]
fn a_jobs_escape_sequences_are_shown_not_obeyed_on_a_terminal() {
    let mut pool = Pool::start();
    pool.start_node("n1", 1);
    let d = JobDir::new();
    let evil = "\u{1b}]0;pwned\u{7}\u{1b}[2Jrm -rf ~\rls";
    d.write("evil.txt", evil);
    let job = probe_job_file(d.path(), "evil", &["read:evil.txt"], "[files]\ninputs = [\"evil.txt\"]\n");
    let out = pool.cli().arg("submit").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    let id = ids_of(&out)[0];
    pool.cli().args(["wait", &id.to_string()]).assert().success();
    // Through a pipe the output is byte for byte what the job wrote.
    let out = pool.cli().args(["logs", &id.to_string()]).output().unwrap();
    assert_eq!(stdout_of(&out), format!("{evil}\n"));
    // On a terminal (script(1) gives the CLI one) no control character reaches it.
    let vmgrid = assert_cmd::cargo::cargo_bin("vmgrid");
    let out = std::process::Command::new("script")
        .args(["-qec", &format!("{} logs {id}", vmgrid.display()), "/dev/null"])
        .env("VMGRID_CONFIG", pool.data_dir().join("client.toml"))
        .output()
        .expect("script(1), from util-linux, runs the CLI on a terminal");
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("^[]0;pwned^G^[[2Jrm -rf ~^Mls"), "{shown:?}");
    assert!(!shown.contains('\u{1b}'), "an escape reached the terminal: {shown:?}");
}

fn unsafe_is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// A tmpfs of `mb` MiB, mounted on a directory of its own for as long as this lives.
struct Mount(Option<tempfile::TempDir>);

impl Mount {
    fn tmpfs(mb: u64) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let st = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m,mode=0700"), "vmgrid-test"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "cannot mount a tmpfs on {}", dir.path().display());
        Mount(Some(dir))
    }

    fn path(&self) -> &std::path::Path {
        self.0.as_ref().expect("set until dropped").path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(self.path()).status();
        drop(self.0.take());
    }
}

/// A node's short stdout comes inline in its report; a hostile node cannot make the pool keep
/// inline text that is not what its hash says, nor send an output inline (workflows hand outputs
/// on as blobs), and an honest report's inline stdout is what `vmgrid logs` prints.
#[test]
fn a_nodes_inline_output_is_checked_against_its_hash_and_outputs_are_never_inline() {
    use vmgrid_proto::{FileRef, LeaseId, LeaseRequest, Report, ReportRequest, RunReport};
    let pool = Pool::start();
    let d = JobDir::new();
    let job = probe_job_file(d.path(), "inline", &["exit:0"], "");
    let id = ids_of(&pool.cli().arg("submit").arg(&job).output().unwrap())[0];
    // A hand-made node (real HTTP, the pool token) takes the job.
    let pool_token = std::fs::read_to_string(pool.data_dir().join("pool.token")).unwrap();
    let ad = hand_made_ad("hostile", None);
    let cred = pool.client_with(pool_token.trim()).register(&ad, None).unwrap().credential;
    let node = pool.client_with(&cred);
    let leases = node
        .lease(&LeaseRequest { max_jobs: 1, max_cpus: 1, wait_ms: 5000, ahead: 0, reports: vec![] })
        .unwrap()
        .leases;
    assert_eq!(leases[0].job_id, id);
    let lease = LeaseId { job_id: id, epoch: leases[0].epoch };
    let report = |stdout: FileRef, outputs: Vec<FileRef>| {
        let r = Report {
            lease,
            run: RunReport::Exited { code: 0 },
            stdout: Some(stdout),
            stderr: None,
            stdout_dropped: 0,
            stderr_dropped: 0,
            outputs,
        };
        node.report(&ReportRequest { reports: vec![r] }).unwrap()
    };
    let mut forged = FileRef::inline_text("stdout", "the honest text\n");
    forged.inline = Some("something else\n".into());
    let r = report(forged, vec![]);
    assert!(r.accepted.is_empty() && r.refused[0].1.contains("does not match"), "{r:?}");
    let long = FileRef::inline_text("stdout", &"x".repeat(vmgrid_proto::MAX_INLINE_BYTES + 1));
    let r = report(long, vec![]);
    assert!(r.accepted.is_empty() && r.refused[0].1.contains("at most"), "{r:?}");
    let honest = FileRef::inline_text("stdout", "the honest text\n");
    let r = report(honest.clone(), vec![FileRef::inline_text("out/a.txt", "a")]);
    assert!(r.accepted.is_empty() && r.refused[0].1.contains("outputs are uploaded"), "{r:?}");
    assert_eq!(pool.job(id).state, vmgrid_proto::JobState::Running, "every refusal changed nothing");
    let r = report(honest, vec![]);
    assert_eq!(r.accepted, vec![lease], "{r:?}");
    let out = pool.cli().args(["logs", &id.to_string()]).output().unwrap();
    assert_eq!(stdout_of(&out), "the honest text\n");
}

/// A node ad as a hand-made node (real HTTP, the pool token) says it, with an overlay key.
fn hand_made_ad(name: &str, key: Option<[u8; 32]>) -> vmgrid_proto::NodeAd {
    use vmgrid_proto::overlay::{NodeOverlay, key_hex};
    vmgrid_proto::NodeAd {
        name: name.into(),
        arch: std::env::consts::ARCH.into(),
        os: "linux".into(),
        cpus: 1,
        memory_mb: 1024,
        disk_mb: 1024,
        vm_types: vec![vmgrid_proto::VmType::Wasm],
        accelerators: vec![],
        labels: Default::default(),
        appliance: false,
        qemu: None,
        peer: None,
        overlay: key.map(|k| NodeOverlay { key: key_hex(&k), host: false, addr: None }),
    }
}

/// A node's overlay key is registered with its credential: a hello with another node's key (or
/// with any key, from a node that registered none) is refused, so a node cannot take another's
/// WireGuard handshakes; a node's map carries its peers' registered keys only; a malformed key does
/// not register.
#[test]
fn a_node_cannot_say_another_nodes_overlay_key() {
    use vmgrid_client::ClientError;
    use vmgrid_proto::overlay::{OverlayHello, key_hex};
    let pool = Pool::start();
    let pool_token = std::fs::read_to_string(pool.data_dir().join("pool.token")).unwrap();
    let joiner = pool.client_with(pool_token.trim());
    let (k1, k2) = ([1u8; 32], [2u8; 32]);
    let cred1 = joiner.register(&hand_made_ad("n1", Some(k1)), None).unwrap().credential;
    let cred2 = joiner.register(&hand_made_ad("n2", Some(k2)), None).unwrap().credential;
    let cred3 = joiner.register(&hand_made_ad("n3", None), None).unwrap().credential;
    let hello =
        |key: [u8; 32]| OverlayHello { key: key_hex(&key), endpoint: None, endpoint_token: None, paths: vec![] };
    for (cred, key, who) in [(&cred2, k1, "n2 saying n1's key"), (&cred3, [3u8; 32], "n3, which registered none")] {
        match pool.client_with(cred).overlay_hello(&hello(key)) {
            Err(ClientError::Refused { status: 409, message }) => {
                assert!(message.contains("not the overlay key it registered with"), "{who}: {message}")
            }
            other => panic!("{who}: {other:?}"),
        }
    }
    assert!(pool.client_with(&cred1).overlay_hello(&hello(k1)).is_ok(), "n1 with its own key");
    assert!(pool.client_with(&cred2).overlay_hello(&hello(k2)).is_ok(), "n2 with its own key");
    // Two nodes on the overlay themselves see each other's registered keys only: after n6
    // registers again, n5's map leaves it out until n6 says hello with its new key.
    let host = |name: &str, key: [u8; 32], previous: Option<String>| {
        let mut ad = hand_made_ad(name, Some(key));
        let o = ad.overlay.as_mut().unwrap();
        o.host = true;
        o.addr = Some("100.127.9.9".parse().unwrap());
        joiner.register(&ad, previous).unwrap().credential
    };
    let (cred5, cred6) = (host("n5", [5; 32], None), host("n6", [6; 32], None));
    pool.client_with(&cred6).overlay_hello(&hello([6; 32])).unwrap();
    let map = pool.client_with(&cred5).overlay_hello(&hello([5; 32])).unwrap();
    let peer_keys = |m: &vmgrid_proto::overlay::OverlayMap| m.peers.iter().map(|p| p.key.clone()).collect::<Vec<_>>();
    assert_eq!(peer_keys(&map), [key_hex(&[6; 32])]);
    let addrs = map.host.unwrap().members.into_iter().map(|m| m.addr.to_string()).collect::<Vec<_>>();
    assert_eq!(addrs, ["100.127.0.1", "100.127.0.2"], "the pool gives the addresses; a claim is ignored");
    let cred6b = host("n6", [66; 32], Some(cred6.clone()));
    match pool.client_with(&cred6b).overlay_hello(&hello([6; 32])) {
        Err(ClientError::Refused { status: 409, .. }) => {}
        other => panic!("n6's old key after it registered again: {other:?}"),
    }
    assert!(peer_keys(&pool.client_with(&cred5).overlay_hello(&hello([5; 32])).unwrap()).is_empty());
    pool.client_with(&cred6b).overlay_hello(&hello([66; 32])).unwrap();
    let map = pool.client_with(&cred5).overlay_hello(&hello([5; 32])).unwrap();
    assert_eq!(peer_keys(&map), [key_hex(&[66; 32])]);
    let mut bad = hand_made_ad("n4", None);
    bad.overlay = Some(vmgrid_proto::overlay::NodeOverlay { key: "not a key".into(), host: false, addr: None });
    match joiner.register(&bad, None) {
        Err(ClientError::Refused { status: 400, message }) => assert!(message.contains("overlay.key"), "{message}"),
        other => panic!("a malformed key registered: {other:?}"),
    }
}
