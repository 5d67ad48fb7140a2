//! One leased job on this node: its files fetched through the cache, its inputs staged, the run
//! (against its home, for an SSI process), its outputs collected and uploaded, and the report
//! that says what happened. The coordinator, not the node, decides what the report means.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use vmgrid_client::Client;
use vmgrid_proto::*;
use vmgrid_runtime::jobdir::{self, Collected};
use vmgrid_runtime::{FailureKind, Outcome, RunError, RunRequest, RunResult};

use crate::{Agent, checkpoint, ssi};

fn report(id: LeaseId, run: RunReport) -> Report {
    Report { lease: id, run, stdout: None, stderr: None, stdout_dropped: 0, stderr_dropped: 0, outputs: Vec::new() }
}

/// The report of a job this node could not start, for a reason of its own.
pub(crate) fn host_failed(id: LeaseId, reason: String) -> Report {
    report(id, RunReport::HostFailed { reason })
}

impl Agent {
    /// Runs one leased job in `dir` (empty, with an empty `job` directory) and builds its report;
    /// says too whether `dir` is known to be as it was (nothing staged, made or collected in it).
    pub(crate) fn run_job(
        &self,
        lease: &Lease,
        dir: &Path,
        cancel: Arc<AtomicBool>,
        vacate: Arc<AtomicBool>,
    ) -> (Report, bool) {
        let id = LeaseId { job_id: lease.job_id, epoch: lease.epoch };
        let (mut home_gone, mut untouched) = (false, false);
        let result = self.attempt(lease, &cancel, vacate, dir, (&mut home_gone, &mut untouched));
        let stopped = cancel.load(Ordering::Relaxed);
        if stopped {
            // Still reported: the coordinator, not the node, decides what a result is worth, and
            // it refuses one whose lease is gone.
            tracing::info!(job = lease.job_id, epoch = lease.epoch, "stopped: the lease was revoked");
        }
        let report = match result {
            // An SSI process whose console went away is over: nothing would take its output.
            Ok(r) if home_gone => Report {
                run: RunReport::GuestFailed {
                    failure: FailureKind::Cancelled,
                    reason: "the process's home (its `vmgrid ssi` console) is gone".into(),
                },
                ..r
            },
            // A run this node stopped (drain timeout, revoked lease) says nothing about the job:
            // it goes back to the pool, which refuses it anyway if the lease is gone.
            Ok(r) if stopped => Report { run: RunReport::HostFailed { reason: "stopped by its node".into() }, ..r },
            Ok(r) => r,
            Err(RunError::BadJob(reason)) => report(id, RunReport::BadJob { reason }),
            Err(RunError::Host(reason)) => report(id, RunReport::HostFailed { reason }),
            Err(RunError::BadCheckpoint(reason)) => report(id, RunReport::BadCheckpoint { reason }),
        };
        (report, untouched)
    }

    fn attempt(
        &self,
        lease: &Lease,
        cancel: &Arc<AtomicBool>,
        vacate: Arc<AtomicBool>,
        dir: &Path,
        (home_gone, untouched): (&mut bool, &mut bool),
    ) -> Result<Report, RunError> {
        let client = self.client();
        let mut job = self.localize(&client, lease)?;
        let plan = checkpoint::plan(&client, &self.cache, lease, vacate, dir)?;
        let job_dir = dir.join("job");
        jobdir::stage_inputs(&job, &job_dir)?;
        let net = self.join_overlay(lease, &mut job, &job_dir)?;
        let empty_dir = job.files.inputs.is_empty() && net.is_none() && lease.spec.ssi.is_none() && plan.is_none();
        // An SSI process runs against its home: its job directory is the mirror of the home's
        // files, and the home hears of its start, output and end first.
        let home = lease.spec.ssi.clone().map(|spec| ssi::HomeLink::start(spec, cancel.clone(), &self.config.trust));
        if let Some(h) = &home {
            h.started(&self.ad.name);
        }
        let host = home.clone().map(|h| h as Arc<dyn vmgrid_runtime::ssi::SsiHost>);
        let run = self.runtime.run(&RunRequest {
            job: &job,
            job_dir: &job_dir,
            cancel: Some(cancel.clone()),
            ssi: host,
            checkpoint: plan.as_ref().map(|(p, _)| p),
            seed: lease.job_id,
            net: net.as_ref().map(|a| &a.net),
            empty_dir,
        });
        drop(net);
        if let Some((_, sink)) = &plan {
            sink.end();
        }
        if let Some(h) = &home {
            match &run {
                Ok(r) => h.finish(Some(&r.outcome), None),
                Err(e) => h.finish(None, Some(&e.to_string())),
            }
        }
        *home_gone = home.as_ref().is_some_and(|h| h.home_gone());
        let result = run?;
        // Nothing is collected beside the job directory either: no outputs are asked for.
        *untouched = empty_dir && !result.created && job.files.outputs.is_empty();
        let id = LeaseId { job_id: lease.job_id, epoch: lease.epoch };
        if let Outcome::Vacated { seq } = result.outcome {
            // It goes on elsewhere: nothing of this run is kept.
            return Ok(report(id, RunReport::Vacated { seq }));
        }
        let out_dir = dir.join("out");
        let collected = match result.keeps_outputs() {
            true => jobdir::collect_outputs(&job, &job_dir, &out_dir)?,
            false => jobdir::Collected::default(),
        };
        upload(&client, id, &result, &collected, &out_dir)
    }

    /// A grid job's VM on the overlay's switch: its address and its group's go in its
    /// environment (`VMGRID_ADDR`, `VMGRID_PEERS` when the kernel command line has room) and in
    /// `/job/.vmgrid-peers` (`ADDRESS peer-INDEX` a line, in instance order).
    fn join_overlay(
        &self,
        lease: &Lease,
        job: &mut vmgrid_job::Job,
        job_dir: &Path,
    ) -> Result<Option<crate::overlay::Attached>, RunError> {
        if job.vm.network != vmgrid_job::Network::Grid {
            return Ok(None);
        }
        let att = self
            .overlay
            .as_ref()
            .ok_or_else(|| RunError::host("cannot attach the VM to the overlay", "this node runs no QEMU jobs"))?
            .attach(lease.job_id, lease.index, lease.spec.group)
            .map_err(|e| RunError::host("cannot attach the VM to the overlay", e))?;
        let hosts: String = att.members.iter().enumerate().map(|(i, a)| format!("{a} peer-{i}\n")).collect();
        std::fs::write(job_dir.join(".vmgrid-peers"), hosts)
            .map_err(|e| RunError::host("cannot write the job's peers", e))?;
        let prefix = vmgrid_proto::overlay::PREFIX;
        job.vm.env.insert("VMGRID_ADDR".into(), format!("{}/{prefix}", att.addr));
        let peers = att.members.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
        // The kernel's command line is 2 KiB at most; a large group's guest reads the file.
        if peers.len() <= 512 {
            job.vm.env.insert("VMGRID_PEERS".into(), peers);
        }
        Ok(Some(att))
    }

    /// The lease's job, with its files fetched into the cache (once per hash).
    fn localize(&self, client: &Client, lease: &Lease) -> Result<vmgrid_job::Job, RunError> {
        let spec = &lease.spec;
        let mut located: HashMap<BlobRef, PathBuf> = HashMap::new();
        for f in spec.image.iter().chain(&spec.kernel).chain(&spec.initrd).chain(&spec.inputs) {
            let p = self
                .cache
                .get_file(client, f)
                .map_err(|e| RunError::Host(format!("cannot fetch `{}`: {e}", f.path)))?;
            located.insert(f.blob.clone(), p);
        }
        spec.to_job(Path::new(&format!("job-{}", lease.job_id)), |f| located[&f.blob].clone()).map_err(RunError::BadJob)
    }
}

/// Test-only: set, the node adds a line to every job's stdout before it reports it, as a node
/// that cheats would. Never set outside tests.
const TEST_ONLY_TAMPER: &str = "VMGRID_TEST_ONLY_TAMPER_RESULTS";

/// The report of a run that ended: its outcome, its stdout and stderr and its outputs uploaded.
fn upload(
    client: &Client,
    id: LeaseId,
    result: &RunResult,
    collected: &Collected,
    out_dir: &Path,
) -> Result<Report, RunError> {
    // Short text goes inline in the report: no upload, no blob file, durable with the result.
    let upload = |bytes: &[u8], name: &str| match std::str::from_utf8(bytes) {
        Ok(text) if bytes.len() <= MAX_INLINE_BYTES => Ok(FileRef::inline_text(name, text)),
        _ => client.upload_bytes(bytes, name).map_err(|e| RunError::Host(format!("cannot upload {name}: {e}"))),
    };
    let mut r = report(
        id,
        match &result.outcome {
            Outcome::Exited(code) => RunReport::Exited { code: *code },
            Outcome::Failed(f) => RunReport::GuestFailed { failure: f.kind, reason: f.reason.clone() },
            Outcome::Vacated { seq } => RunReport::Vacated { seq: *seq },
        },
    );
    // Test-only: a dishonest node, which returns a stdout of its own making (to test results
    // checked by replicas). Never set outside tests.
    let tampered;
    let stdout = match std::env::var_os(TEST_ONLY_TAMPER).is_some() {
        true => {
            tampered = [result.stdout.bytes.as_slice(), b"tampered\n"].concat();
            tracing::warn!(job = id.job_id, "test-only: tampering with this job's stdout");
            &tampered
        }
        false => &result.stdout.bytes,
    };
    if !stdout.is_empty() {
        r.stdout = Some(upload(stdout, "stdout")?);
    }
    if !result.stderr.bytes.is_empty() {
        r.stderr = Some(upload(&result.stderr.bytes, "stderr")?);
    }
    r.stdout_dropped = result.stdout.dropped;
    r.stderr_dropped = result.stderr.dropped;
    for rel in &collected.files {
        let name = rel.to_string_lossy().into_owned();
        let f = client
            .upload_file(&out_dir.join(rel), &name)
            .map_err(|e| RunError::Host(format!("cannot upload output {name}: {e}")))?;
        r.outputs.push(f);
    }
    Ok(r)
}
