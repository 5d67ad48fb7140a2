//! The web dashboard (`GET /`): served from the binary with a strict Content-Security-Policy on
//! every answer, no inline script, and no data without a token (its data is the API's, under the
//! API's role checks).

use std::process::Command;

use crate::util::*;

/// `curl` against the pool, trusting its CA: the status line and headers, then the body.
fn get(pool: &Pool, path: &str, headers: &[&str]) -> (String, String) {
    let dir = tempfile::tempdir().unwrap();
    let head = dir.path().join("head");
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--cacert"]).arg(pool.data_dir().join("ca.pem")).arg("-D").arg(&head);
    for h in headers {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(format!("{}{path}", pool.url)).output().unwrap();
    assert!(out.status.success(), "curl {path}: {}", stderr_of(&out));
    (std::fs::read_to_string(&head).unwrap().to_ascii_lowercase(), stdout_of(&out))
}

fn assert_strict(path: &str, head: &str) {
    let csp = head
        .lines()
        .find_map(|l| l.strip_prefix("content-security-policy: "))
        .unwrap_or_else(|| panic!("{path}: no Content-Security-Policy in\n{head}"));
    for want in ["default-src 'self'", "script-src 'self'", "frame-ancestors 'none'", "object-src 'none'"] {
        assert!(csp.contains(want), "{path}: the policy lacks {want}: {csp}");
    }
    for banned in ["unsafe-inline", "unsafe-eval", "*", "http:", "https:"] {
        assert!(!csp.contains(banned), "{path}: the policy allows {banned}: {csp}");
    }
    assert!(head.contains("x-content-type-options: nosniff"), "{path}: no nosniff in\n{head}");
}

#[test]
fn the_dashboard_is_served_with_a_strict_policy_and_no_inline_script() {
    let pool = Pool::start();
    let (head, html) = get(&pool, "/", &[]);
    assert!(head.starts_with("http/1.1 200") || head.starts_with("http/2 200"), "{head}");
    assert!(head.contains("content-type: text/html"), "{head}");
    assert_strict("/", &head);
    // Every script is a file of the pool's own, never inline, and the page names only its own assets.
    let scripts: Vec<&str> = html.split("<script").skip(1).collect();
    assert_eq!(scripts.len(), 1, "{html}");
    for s in &scripts {
        let tag = &s[..s.find('>').unwrap()];
        assert!(tag.contains("src=\"/dashboard/"), "an inline or foreign script: <script{tag}>");
        assert!(s[s.find('>').unwrap() + 1..].starts_with("</script>"), "a script with inline code");
    }
    assert!(!html.contains("style=\"") && !html.contains("<style"), "inline style in the page");
    assert!(!html.contains("http://") && !html.contains("https://"), "the page names another site");
    for (path, kind) in [
        ("/dashboard/app.js", "text/javascript"),
        ("/dashboard/app-pages.js", "text/javascript"),
        ("/dashboard/app.css", "text/css"),
    ] {
        let (head, body) = get(&pool, path, &[]);
        assert!(head.contains(&format!("content-type: {kind}")), "{path}: {head}");
        assert_strict(path, &head);
        assert!(!body.is_empty(), "{path} is empty");
    }
    // The script sends the token in the Authorization header and keeps it in the tab's session;
    // it never builds a URL from it.
    let (_, js) = get(&pool, "/dashboard/app.js", &[]);
    assert!(js.contains("Authorization: `Bearer ${token}`") && js.contains("sessionStorage"), "{js}");
    let (_, pages) = get(&pool, "/dashboard/app-pages.js", &[]);
    for js in [&js, &pages] {
        assert!(!js.contains("localStorage") && !js.contains("innerHTML") && !js.contains("eval("), "{js}");
    }
    // The page holds no data: the API it reads answers nothing without a token.
    let (head, body) = get(&pool, "/v1/jobs", &[]);
    assert!(head.starts_with("http/1.1 401"), "{head}{body}");
    // Every other answer (JSON, errors, the API's 404, the document, blobs) may load, run and
    // frame nothing, and is not sniffed.
    let admin = format!("Authorization: Bearer {}", pool_admin(&pool).trim());
    let blob = pool.admin().upload_bytes(b"<script>alert(1)</script>", "page.html").unwrap();
    for (path, auth) in [
        ("/v1/jobs", ""),
        ("/nowhere", ""),
        ("/openapi.json", ""),
        ("/v1/overview", admin.as_str()),
        (&*format!("/v1/blobs/{}", blob.blob), admin.as_str()),
    ] {
        let (head, _) = get(&pool, path, &[auth].into_iter().filter(|a| !a.is_empty()).collect::<Vec<_>>());
        let csp = head.lines().find_map(|l| l.strip_prefix("content-security-policy: "));
        assert_eq!(csp, Some("default-src 'none'; frame-ancestors 'none'; base-uri 'none'"), "{path}: {head}");
        assert!(head.contains("x-content-type-options: nosniff"), "{path}: {head}");
        if path.starts_with("/v1/blobs/") {
            assert!(head.contains("content-type: application/octet-stream"), "{path}: {head}");
        }
    }
}

#[test]
fn a_user_token_reads_only_its_own_jobs_through_the_api_the_dashboard_uses() {
    let pool = Pool::start();
    let dir = JobDir::new();
    let job = probe_job_file(dir.path(), "mine", &["exit:0"], "");
    let made = |user: &str| {
        let out = pool.cli().args(["token", user]).output().unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
        stdout_of(&out).trim().to_string()
    };
    let (alice, bob) = (made("alice"), made("bob"));
    let submit = |token: &str| {
        let out = pool.cli().env("VMGRID_TOKEN", token).args(["submit"]).arg(&job).output().unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
        ids_of(&out)[0]
    };
    let (a, b) = (submit(&alice), submit(&bob));
    let auth = |t: &str| format!("Authorization: Bearer {t}");
    let (_, page) = get(&pool, "/v1/jobs?after=0&limit=50", &[&auth(&alice)]);
    let page: serde_json::Value = serde_json::from_str(&page).unwrap();
    let ids: Vec<u64> = page["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_u64().unwrap()).collect();
    assert_eq!(ids, vec![a], "alice sees only her job: {page}");
    // Bob's job is, to alice, answered as a job that does not exist: its owner is not hers to learn.
    let (head, body) = get(&pool, &format!("/v1/jobs/{b}"), &[&auth(&alice)]);
    let (_, missing) = get(&pool, "/v1/jobs/999999", &[&auth(&alice)]);
    assert!(head.starts_with("http/1.1 404") && body == format!(r#"{{"error":"no job {b}"}}"#), "{head}{body}");
    assert_eq!(missing, r#"{"error":"no job 999999"}"#);
    let (head, body) = get(&pool, &format!("/v1/jobs/{b}/wait?timeout_ms=0"), &[&auth(&alice)]);
    assert!(head.starts_with("http/1.1 404") && !body.contains("bob"), "{head}{body}");
    let (_, all) = get(&pool, "/v1/jobs?after=0&limit=50", &[&auth(pool_admin(&pool).trim())]);
    assert!(all.contains(&format!("\"id\":{a},")) && all.contains(&format!("\"id\":{b},")), "{all}");
}

fn pool_admin(pool: &Pool) -> String {
    std::fs::read_to_string(pool.data_dir().join("admin.token")).unwrap()
}

/// The browser test (`tests/dashboard/e2e.mjs`) in headless Chromium against a real pool: sign in,
/// a sweep moving from idle to completed live (streamed events, no reload, no polling requests),
/// a job's page with its output, hold, release and rm (each confirmed; a dismissed one sends
/// nothing), the state filter, the users' usage, a killed node seen lost, one user's jobs hidden
/// from another. Its screenshots go to the directory in `VMGRID_SCREENSHOTS` (the
/// ones in `docs/` were made with `VMGRID_SCREENSHOTS=docs`), else to a scratch directory.
#[test]
fn the_dashboard_in_a_browser_signs_in_shows_jobs_and_nodes_and_acts() {
    use std::io::{BufRead, BufReader, Write};
    let root = repo_root();
    let dir = root.join("crates/vmgrid/tests/dashboard");
    assert!(
        dir.join("node_modules/playwright-core").is_dir() && std::path::Path::new("/usr/bin/chromium").exists(),
        "the browser test needs chromium and playwright-core: run scripts/setup-web"
    );
    let mut pool = Pool::start();
    let made = |user: &str| {
        let out = pool.cli().args(["token", user]).output().unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
        stdout_of(&out).trim().to_string()
    };
    let (alice, bob) = (made("alice"), made("bob"));
    let jobs = JobDir::new();
    let job = probe_job_file(
        jobs.path(),
        "sweep",
        // 1 MiB of stdout before its last line: the job page reads only the tail (a Range request).
        &[
            "write:out/result.txt:forty-two",
            "stderr:a warning",
            "sleep:1500",
            "flood:1",
            "args",
            "hello from the sweep",
        ],
        "[files]\noutputs = [\"out/*.txt\"]\n",
    );
    // Alice's sweep (jobs 1-3), Bob's job (4), and a job of Alice's that she removes (5).
    let spare = probe_job_file(jobs.path(), "spare", &["args", "never run"], "");
    for (token, count, file) in [(&alice, "3", &job), (&bob, "1", &job), (&alice, "1", &spare)] {
        let out = pool.cli().env("VMGRID_TOKEN", token).args(["submit", "--count", count]).arg(file).output().unwrap();
        assert!(out.status.success(), "{}", stderr_of(&out));
    }
    let scratch = JobDir::new();
    let shots = std::env::var_os("VMGRID_SCREENSHOTS").map_or(scratch.path().to_path_buf(), |d| root.join(d));
    std::fs::create_dir_all(&shots).unwrap();
    let mut child = Command::new("node")
        .arg(dir.join("e2e.mjs"))
        .env("VMGRID_URL", &pool.url)
        .env("ALICE", &alice)
        .env("BOB", &bob)
        .env("ADMIN", pool_admin(&pool).trim())
        .env("SHOTS", &shots)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("run node (scripts/setup-web installs it)");
    let mut stdin = child.stdin.take().unwrap();
    let mut passed = false;
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        match line.unwrap().as_str() {
            "start-node" => pool.start_node("n1", 2),
            "kill-node" => pool.kill_node("n1"),
            "passed" => passed = true,
            other => panic!("the browser test said {other:?}"),
        }
        if !passed {
            writeln!(stdin, "done").unwrap();
        }
    }
    let status = child.wait().unwrap();
    assert!(status.success() && passed, "the browser test failed ({status}); its steps are on stderr above");
}
