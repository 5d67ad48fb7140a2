//! The node's side of an SSI process: [`HomeLink`] reaches the process's home over HTTP (the node
//! connects outward, as it does to the pool) and gives the runtime what [`SsiHost`] asks for.
//!
//! Output is buffered and sent in the background, so a chatty process does not wait on the
//! network per line; a control thread long-polls the home for a kill, and stops the process if
//! the home goes away, so no process outlives its console.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde::de::DeserializeOwned;
use vmgrid_proto::SsiSpec;
use vmgrid_proto::ssi::*;
use vmgrid_runtime::ssi::{DirEntry, Errno, Found, FsOp, Kind, Lookup, Moved, Payload, SsiHost, errno};
use vmgrid_runtime::{FailureKind, Outcome};

/// Output held for the home at most; past it, output is dropped and counted.
const MAX_BUFFERED: usize = 8 << 20;
/// How often buffered output is sent.
const FLUSH_EVERY: Duration = Duration::from_millis(20);
/// A home unreachable this long is gone: its processes stop.
const HOME_GONE_AFTER: Duration = Duration::from_secs(20);

pub struct HomeLink {
    spec: SsiSpec,
    auth: String,
    agent: ureq::Agent,
    cancel: Arc<AtomicBool>,
    out: Mutex<Pending>,
    out_ready: Condvar,
    dropped: AtomicU64,
    done: AtomicBool,
    /// The home stopped answering, or no longer knows this process: it was stopped for that.
    gone: AtomicBool,
}

#[derive(Default)]
struct Pending {
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// A sender is mid-call; `flush` waits for it.
    sending: bool,
}

enum Call {
    Ok(ureq::http::Response<ureq::Body>),
    Errno(Errno),
    /// The home refused the token: the process is over as far as the home is concerned.
    Refused,
    Unreachable,
}

impl HomeLink {
    /// Connects a process to its home; `cancel` is the process's stop flag.
    /// A link to the home in `spec`, whose certificate `trust` (the pool's CA) must have signed.
    pub fn start(spec: SsiSpec, cancel: Arc<AtomicBool>, trust: &vmgrid_client::Trust) -> Arc<HomeLink> {
        let agent = trust.agent(Duration::from_secs(60));
        let link = Arc::new(HomeLink {
            auth: format!("Bearer {}", spec.token),
            spec,
            agent,
            cancel,
            out: Mutex::new(Pending::default()),
            out_ready: Condvar::new(),
            dropped: AtomicU64::new(0),
            done: AtomicBool::new(false),
            gone: AtomicBool::new(false),
        });
        let l = link.clone();
        let _ = std::thread::Builder::new().name("vmgrid-ssi-out".into()).spawn(move || l.send_loop());
        let l = link.clone();
        let _ = std::thread::Builder::new().name("vmgrid-ssi-ctl".into()).spawn(move || l.control_loop());
        link
    }

    /// The output waiting to be sent. A poisoned lock still holds good bytes: a panic elsewhere
    /// must not take the node's other processes down with it.
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.out.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn url(&self, path: &str) -> String {
        format!("{}/ssi/v1/{path}", self.spec.home.trim_end_matches('/'))
    }

    fn classify(&self, r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Call {
        match r {
            Err(_) => Call::Unreachable,
            Ok(resp) => {
                let status = resp.status().as_u16();
                if status == 401 {
                    Call::Refused
                } else if status == 422 {
                    let e = resp.headers().get(ERRNO_HEADER).and_then(|v| v.to_str().ok()?.parse().ok());
                    Call::Errno(e.unwrap_or(errno::IO))
                } else if status >= 400 {
                    Call::Errno(errno::IO)
                } else {
                    Call::Ok(resp)
                }
            }
        }
    }

    fn post<B: Serialize>(&self, path: &str, body: &B) -> Call {
        self.classify(self.agent.post(self.url(path)).header("Authorization", &self.auth).send_json(body))
    }

    fn post_json<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, Errno> {
        match self.post(path, body) {
            Call::Ok(mut r) => r.body_mut().read_json().map_err(|_| errno::IO),
            other => Err(self.failed(other)),
        }
    }

    /// The errno for a call that did not succeed; a refused token also stops the process.
    fn failed(&self, c: Call) -> Errno {
        match c {
            Call::Errno(e) => e,
            Call::Refused => {
                self.lost_home();
                errno::INTR
            }
            _ => errno::IO,
        }
    }

    /// Whether the process was stopped because its home is gone (not killed, not finished).
    pub fn home_gone(&self) -> bool {
        self.gone.load(Ordering::Relaxed)
    }

    fn lost_home(&self) {
        if !self.done.load(Ordering::Relaxed) {
            self.gone.store(true, Ordering::Relaxed);
            self.stop();
        }
    }

    /// Stops the running process (not one that has already finished).
    fn stop(&self) {
        if !self.done.load(Ordering::Relaxed) {
            self.cancel.store(true, Ordering::Relaxed);
        }
    }

    /// Tells the home the process is running here.
    pub fn started(&self, node: &str) {
        let _ = self.post("started", &StartedRequest { node: node.to_string() });
    }

    /// Sends what is left of the output, then the exit status, and stops the link's threads.
    pub fn finish(&self, outcome: Option<&Outcome>, error: Option<&str>) {
        self.flush();
        // From here on the home may refuse this process's token: that is the end we report, not
        // a reason to stop it.
        self.done.store(true, Ordering::Relaxed);
        let (status, reason) = match (outcome, error) {
            (Some(Outcome::Exited(c)), _) => (*c, None),
            (Some(Outcome::Failed(f)), _) if f.kind == FailureKind::Cancelled => {
                (STATUS_KILLED, Some(f.reason.clone()))
            }
            (Some(Outcome::Failed(f)), _) => (STATUS_FAILED, Some(f.reason.clone())),
            (Some(Outcome::Vacated { .. }), _) => (STATUS_FAILED, Some("the process was moved".into())),
            (None, e) => (STATUS_FAILED, Some(e.unwrap_or("the process could not start").to_string())),
        };
        let dropped = self.dropped.load(Ordering::Relaxed);
        let _ = self.post("exit", &ExitRequest { status, reason, dropped });
        self.out_ready.notify_all();
    }

    fn send_loop(&self) {
        loop {
            let (out, err) = {
                let mut p = self.pending();
                while p.stdout.is_empty() && p.stderr.is_empty() && !self.done.load(Ordering::Relaxed) {
                    p = self.out_ready.wait_timeout(p, Duration::from_millis(200)).unwrap_or_else(|e| e.into_inner()).0;
                }
                if self.done.load(Ordering::Relaxed) && p.stdout.is_empty() && p.stderr.is_empty() {
                    return;
                }
                p.sending = true;
                (std::mem::take(&mut p.stdout), std::mem::take(&mut p.stderr))
            };
            self.send_output(1, out);
            self.send_output(2, err);
            self.pending().sending = false;
            self.out_ready.notify_all();
            std::thread::sleep(FLUSH_EVERY);
        }
    }

    fn send_output(&self, fd: u32, bytes: Vec<u8>) {
        if bytes.is_empty() {
            return;
        }
        let n = bytes.len() as u64;
        let r = self
            .agent
            .post(format!("{}?fd={fd}", self.url("output")))
            .header("Authorization", &self.auth)
            .send(&bytes[..]);
        if !matches!(self.classify(r), Call::Ok(_)) {
            self.dropped.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Waits until everything written so far has been sent (or dropped).
    fn flush(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut p = self.pending();
        while (p.sending || !p.stdout.is_empty() || !p.stderr.is_empty()) && Instant::now() < deadline {
            self.out_ready.notify_all();
            p = self.out_ready.wait_timeout(p, Duration::from_millis(50)).unwrap_or_else(|e| e.into_inner()).0;
        }
    }

    /// Long-polls the home for a kill; a home that refuses the process or is gone stops it.
    fn control_loop(&self) {
        let mut unreachable_since: Option<Instant> = None;
        while !self.done.load(Ordering::Relaxed) && !self.cancel.load(Ordering::Relaxed) {
            let r = self
                .agent
                .get(format!("{}?wait_ms=10000", self.url("signal")))
                .header("Authorization", &self.auth)
                .call();
            match self.classify(r) {
                Call::Ok(mut resp) => {
                    unreachable_since = None;
                    if resp.body_mut().read_json::<SignalResponse>().is_ok_and(|s| s.kill) {
                        self.stop();
                    }
                }
                Call::Refused => self.lost_home(),
                Call::Errno(_) | Call::Unreachable => {
                    let since = *unreachable_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > HOME_GONE_AFTER {
                        tracing::warn!(pid = self.spec.pid, home = %self.spec.home, "the process's home is gone; stopping it");
                        self.lost_home();
                    }
                    std::thread::sleep(Duration::from_millis(500));
                }
            }
        }
    }
}

impl SsiHost for HomeLink {
    fn pid(&self) -> u64 {
        self.spec.pid
    }

    fn spawn(&self, argv: Vec<String>) -> Result<u64, Errno> {
        self.post_json::<_, SpawnResponse>("spawn", &SpawnRequest { argv }).map(|r| r.pid)
    }

    fn wait(&self, pid: i64) -> Result<i32, Errno> {
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(errno::INTR);
            }
            let r: WaitResponse = self.post_json("wait", &WaitRequest { pid, wait_ms: 1000 })?;
            if let Some(status) = r.status {
                return Ok(status);
            }
        }
    }

    fn output(&self, fd: u32, bytes: &[u8]) {
        let mut p = self.pending();
        let buf = if fd == 2 { &mut p.stderr } else { &mut p.stdout };
        let room = MAX_BUFFERED.saturating_sub(buf.len());
        let take = bytes.len().min(room);
        buf.extend_from_slice(&bytes[..take]);
        if take < bytes.len() {
            self.dropped.fetch_add((bytes.len() - take) as u64, Ordering::Relaxed);
        }
        drop(p);
        self.out_ready.notify_all();
    }

    fn fetch(&self, lookup: &Lookup, have: Option<&str>) -> Result<Found, Errno> {
        let flag = |b: bool| if b { "true" } else { "false" };
        let mut req = self
            .agent
            .get(self.url("fs"))
            .query("path", &lookup.at.path)
            .query("base", &lookup.at.base)
            .query("follow", flag(lookup.follow))
            .query("content", flag(lookup.content))
            .header("Authorization", &self.auth);
        if let Some(v) = have {
            req = req.header("If-None-Match", v);
        }
        let mut resp = match self.classify(req.call()) {
            Call::Ok(resp) => resp,
            other => return Err(self.failed(other)),
        };
        let header = |name: &str| resp.headers().get(name).and_then(|v| v.to_str().ok()).map(str::to_string);
        let path = header(PATH_HEADER).as_deref().and_then(decode_path).ok_or(errno::IO)?;
        let kind = header(KIND_HEADER).unwrap_or_default();
        let version = header("etag").unwrap_or_default();
        let unchanged = resp.status().as_u16() == 304;
        let body = resp.body_mut();
        let (kind, payload) = match (kind.as_str(), unchanged) {
            ("none", _) => (Kind::Missing, Payload::None),
            ("link", _) => {
                let target = body.read_to_string().map_err(|_| errno::IO)?;
                (Kind::Link(target), Payload::None)
            }
            ("dir", _) => match body.read_json::<Vec<DirEntry>>() {
                Ok(entries) => (Kind::Dir, Payload::Dir(entries)),
                Err(_) => (Kind::Dir, Payload::None),
            },
            ("file", true) => (Kind::File, Payload::None),
            ("file", false) => {
                let bytes = body.with_config().limit(1 << 30).read_to_vec().map_err(|_| errno::IO)?;
                (Kind::File, Payload::File { bytes, version })
            }
            _ => return Err(errno::IO),
        };
        Ok(Found { path, kind, payload })
    }

    fn store(&self, path: &str, bytes: Vec<u8>) -> Result<String, Errno> {
        let r = self.agent.put(self.url("fs")).query("path", path).header("Authorization", &self.auth).send(&bytes[..]);
        match self.classify(r) {
            Call::Ok(resp) => {
                Ok(resp.headers().get("etag").and_then(|v| v.to_str().ok()).unwrap_or_default().to_string())
            }
            other => Err(self.failed(other)),
        }
    }

    fn fs_op(&self, op: &FsOp) -> Result<Moved, Errno> {
        self.post_json("fsop", op)
    }
}
