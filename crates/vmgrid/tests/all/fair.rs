//! Fair share through a real pool: a user who comes late to a busy pool gets their share of the
//! cpus at once, a user at their quota waits with the reason in `vmgrid q`, only an admin sets
//! quotas and factors (and they survive a restart), and a job's own priority orders its user's
//! jobs.

use vmgrid_proto::{JobState, JobView, Role, UserView};

use crate::util::*;

/// The CLI as user `token`'s owner.
fn as_user(pool: &Pool, token: &str) -> assert_cmd::Command {
    let mut c = vmgrid();
    c.env("VMGRID_POOL", &pool.url).env("VMGRID_TOKEN", token).env("VMGRID_CA_FILE", pool.data_dir().join("ca.pem"));
    c.env_remove("VMGRID_CONFIG");
    c
}

fn token(pool: &Pool, user: &str) -> String {
    pool.admin().add_token(Role::User, user, None).unwrap().token
}

fn submit(cmd: &mut assert_cmd::Command, job: &std::path::Path, count: u64) -> Vec<u64> {
    let out = cmd.arg("submit").arg(job).args(["--count", &count.to_string()]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    ids_of(&out)
}

fn users_json(cmd: &mut assert_cmd::Command) -> Vec<UserView> {
    let out = cmd.args(["users", "--json"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Milliseconds of cpu each job held within [from, to], from its start and finish times.
fn cpu_ms_within(jobs: &[&JobView], from: u64, to: u64, now: u64) -> u64 {
    jobs.iter()
        .filter_map(|j| Some((j.started_ms?, j.finished_ms.unwrap_or(now))))
        .map(|(s, f)| f.min(to).saturating_sub(s.max(from)))
        .sum()
}

/// Fair share, measured: alice's sweep of 2,000 jobs fills the pool's 4 cpus, then bob submits
/// 20. The window where the scheduler divides the pool between two users with idle work opens
/// at the first job start after bob submitted (before it, no cpu was free to give) and closes at
/// the start of bob's last job (after it, bob has no idle work). Within it, each user's share of
/// the cpu time (from the jobs' start and finish times) is within 10% of the fair share, an
/// equal half for equal factors; bob's jobs all start long before alice's backlog is done.
#[test]
fn a_late_user_gets_a_fair_share_of_a_busy_pool_at_once() {
    let mut pool = Pool::start();
    pool.start_node("n1", 2);
    pool.start_node("n2", 2);
    let (alice, bob) = (token(&pool, "alice"), token(&pool, "bob"));
    let d = JobDir::new();
    let job = probe_job_file(d.path(), "short", &["sleep:500", "exit:0"], "");
    let a_ids = submit(&mut as_user(&pool, &alice), &job, 2000);
    pool.wait_for("alice to fill the pool", |p| {
        p.admin().jobs_page(0, 10, Some(JobState::Running)).unwrap().jobs.len() == 4
    });
    let b_ids = submit(&mut as_user(&pool, &bob), &job, 20);
    let b_submitted = pool.job(b_ids[0]).submitted_ms;
    pool.wait_for("bob's jobs to complete", |p| b_ids.iter().all(|&id| p.job(id).state == JobState::Completed));
    let jobs = pool.admin().jobs().unwrap();
    let now = vmgrid_proto::now_ms();
    let (a_jobs, b_jobs): (Vec<&JobView>, Vec<&JobView>) =
        jobs.iter().filter(|j| j.started_ms.is_some()).partition(|j| j.owner == "alice");
    assert_eq!(b_jobs.len(), 20);
    let a_done = a_jobs.iter().filter(|j| j.state == JobState::Completed).count();
    assert!(a_done < a_ids.len() / 2, "bob's jobs ran while alice's backlog waited ({a_done} of hers done)");
    let open = jobs.iter().filter_map(|j| j.started_ms).filter(|&s| s > b_submitted).min().unwrap();
    let close = b_jobs.iter().filter_map(|j| j.started_ms).max().unwrap();
    assert!(close > open, "{open} {close}");
    let (a_ms, b_ms) = (cpu_ms_within(&a_jobs, open, close, now), cpu_ms_within(&b_jobs, open, close, now));
    let b_share = b_ms as f64 / (a_ms + b_ms) as f64;
    eprintln!(
        "fair share window {} ms: alice {a_ms} cpu-ms, bob {b_ms} cpu-ms, bob's share {b_share:.3}",
        close - open
    );
    assert!((b_share - 0.5).abs() <= 0.05, "bob's share {b_share:.3}, alice {a_ms} cpu-ms, bob {b_ms} cpu-ms");

    // `vmgrid users`: the admin sees both, with their usage and jobs; bob sees only himself.
    let all = users_json(&mut pool.cli());
    let a = all.iter().find(|u| u.user == "alice").unwrap();
    let b = all.iter().find(|u| u.user == "bob").unwrap();
    assert!(a.usage_cpu_s > b.usage_cpu_s && b.usage_cpu_s > 5.0, "{a:?} {b:?}");
    assert!(a.idle_jobs > 0 && a.running_jobs > 0 && b.idle_jobs == 0 && b.running_jobs == 0, "{a:?} {b:?}");
    assert!(a.priority > b.priority, "{a:?} {b:?}");
    let mine = users_json(&mut as_user(&pool, &bob));
    assert_eq!(mine.iter().map(|u| u.user.as_str()).collect::<Vec<_>>(), vec!["bob"]);
    let out = pool.cli().arg("users").output().unwrap();
    let text = stdout_of(&out);
    assert!(text.starts_with("USER") && text.contains("alice") && text.contains("bob"), "{text}");
    pool.kill_coordinator();
}

/// Quotas: only an admin sets them (bad values refused with the rule), a user at theirs has
/// further jobs idle with the reason in `vmgrid q`, and the quota survives a restart.
#[test]
fn a_user_at_their_quota_waits_with_the_reason_in_q() {
    let mut pool = Pool::start();
    pool.start_node("n1", 4);
    let carol = token(&pool, "carol");
    let out = as_user(&pool, &carol).args(["users", "set", "carol", "--max-cpus", "100"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr_of(&out).contains("a user token cannot set users' quotas or priority factors"),
        "{}",
        stderr_of(&out)
    );
    let out = pool.cli().args(["users", "set", "carol", "--factor", "0"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("must be between 0.01 and 1000000"), "{}", stderr_of(&out));
    let out = pool.cli().args(["users", "set", "carol"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("nothing to set"), "{}", stderr_of(&out));
    // The API applies the same rule to a request the CLI would not send.
    let bad = vmgrid_proto::UserSettingsRequest {
        user: "carol".into(),
        factor: Some(-1.0),
        max_cpus: None,
        no_max_cpus: false,
    };
    assert_eq!(pool.admin().set_user(&bad).unwrap_err().status(), Some(400));
    let out = pool.cli().args(["users", "set", "carol", "--max-cpus", "2"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr_of(&out));
    assert!(stdout_of(&out).lines().nth(1).unwrap().starts_with("carol"), "{}", stdout_of(&out));

    let d = JobDir::new();
    let job = probe_job_file(d.path(), "capped", &["sleep:20000", "exit:0"], "");
    let ids = submit(&mut as_user(&pool, &carol), &job, 5);
    let quota =
        "carol runs 2 cpu(s), and 2 is the user's quota (`vmgrid users`): waiting until some of carol's jobs end";
    pool.wait_for("two running and the rest waiting on the quota", |p| {
        let v: Vec<JobView> = ids.iter().map(|&id| p.job(id)).collect();
        v.iter().filter(|j| j.state == JobState::Running).count() == 2
            && v.iter().filter(|j| j.state == JobState::Idle).all(|j| j.reason.as_deref() == Some(quota))
    });
    let out = as_user(&pool, &carol).arg("q").output().unwrap();
    assert_eq!(stdout_of(&out).matches(quota).count(), 3, "{}", stdout_of(&out));
    let me = users_json(&mut as_user(&pool, &carol));
    assert_eq!(me.len(), 1);
    assert_eq!((me[0].running_jobs, me[0].idle_jobs, me[0].running_cpus, me[0].max_cpus), (2, 3, 2, Some(2)));

    // The quota is durable: a restarted coordinator still holds carol to it.
    pool.kill_coordinator();
    pool.start_coordinator();
    let me = users_json(&mut as_user(&pool, &carol));
    assert_eq!((me[0].running_cpus, me[0].max_cpus), (2, Some(2)), "{me:?}");
    pool.cli().args(["users", "set", "carol", "--no-max-cpus"]).assert().success();
    pool.wait_for("carol's jobs to fill the node", |p| {
        ids.iter().filter(|&&id| p.job(id).state == JobState::Running).count() == 4
    });
}

/// `[policy] priority` orders one user's jobs: higher first, then oldest first; out of range it
/// is refused at its line.
#[test]
fn a_jobs_priority_orders_its_users_jobs() {
    let mut pool = Pool::start();
    let d = JobDir::new();
    let low = probe_job_file(d.path(), "low", &["sleep:50", "exit:0"], "[policy]\npriority = -5\n");
    let mid = probe_job_file(d.path(), "mid", &["sleep:50", "exit:0"], "");
    let high = probe_job_file(d.path(), "high", &["sleep:50", "exit:0"], "[policy]\npriority = 10\n");
    let low_ids = submit(&mut pool.cli(), &low, 3);
    let mid_ids = submit(&mut pool.cli(), &mid, 3);
    let high_ids = submit(&mut pool.cli(), &high, 3);
    // One cpu: the jobs run one at a time, in the order the scheduler picks them.
    pool.start_node("n1", 1);
    let all: Vec<u64> = low_ids.iter().chain(&mid_ids).chain(&high_ids).copied().collect();
    pool.wait_for("all to complete", |p| all.iter().all(|&id| p.job(id).state == JobState::Completed));
    // Placed (`started_ms`) in that order; jobs placed by one pass (the node queues short jobs
    // ahead) share a millisecond, so the order is checked as "never before".
    let started = |id: u64| pool.job(id).started_ms.unwrap();
    let expected: Vec<u64> = high_ids.iter().chain(&mid_ids).chain(&low_ids).copied().collect();
    let times: Vec<u64> = expected.iter().map(|&id| started(id)).collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "placed out of order: {expected:?} at {times:?}");

    let bad = probe_job_file(d.path(), "bad", &["exit:0"], "[policy]\npriority = 5000\n");
    let out = pool.cli().arg("submit").arg(&bad).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr_of(&out).contains(":7:12: `priority` is 5000, but must be between -1000 and 1000"),
        "{}",
        stderr_of(&out)
    );
}
