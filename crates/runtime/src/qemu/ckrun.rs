//! A QEMU job with checkpoints ([`super::checkpoint`]): its job directory on a disk
//! ([`super::jobdisk`]), a checkpoint every interval while it runs, a last one when it is
//! vacated, and a start from a checkpoint instead of a boot when it resumes.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::checkpoint::{self, Checkpointing, Disks, ResumeFrom};
use super::qmp::Qmp;
use super::{Launcher, accel, image, jobdisk, launch};
use crate::capture::CaptureSink;
use crate::process::{Supervised, Waited};
use crate::{Outcome, RunError, RunRequest, RunResult, RuntimeConfig};

/// The first QEMU that migrates to (and from) a `file:` URI.
const FILE_MIGRATION: super::caps::Version = super::caps::Version(8, 2, 0);

/// How long QEMU gets to open its QMP socket.
const QMP_CONNECT: Duration = Duration::from_secs(10);

/// A run's files, ready for QEMU.
struct Staged {
    scratch: tempfile::TempDir,
    accel: accel::Accel,
    /// The job directory, canonical.
    job_dir: PathBuf,
    overlay: Option<PathBuf>,
    job_disk: PathBuf,
    /// The checkpoint's state, when resuming.
    state: Option<PathBuf>,
}

fn stage_run(
    req: &RunRequest<'_>,
    config: &RuntimeConfig,
    ck: &Checkpointing,
    launcher: &Launcher,
) -> Result<Staged, RunError> {
    if launcher.caps.version < FILE_MIGRATION {
        return Err(RunError::Host(format!(
            "QEMU {} here cannot save a VM to a file (QEMU {FILE_MIGRATION} and later can), so it cannot run a job with checkpoint_s",
            launcher.caps.version
        )));
    }
    let scratch = crate::scratch::dir("qemu").map_err(|e| RunError::host("cannot create a scratch directory", e))?;
    // A checkpoint taken under TCG resumes under TCG, which every node has, even where KVM works.
    let accel = match ck.resume.as_ref() {
        Some(from) if from.accel == accel::Accel::Tcg.as_str() => accel::Accel::Tcg,
        _ => accel::choose(&launcher.qemu, &config.cache_dir),
    };
    let job_dir = std::fs::canonicalize(req.job_dir).map_err(|e| RunError::host("the job directory", e))?;
    let _ = std::fs::remove_file(job_dir.join(super::EXIT_FILE));
    let (overlay, job_disk) = disks(req, ck.resume.as_ref(), scratch.path(), accel)?;
    // QEMU reads a checkpoint's state after it dropped root: from the scratch directory.
    let state = ck.resume.as_ref().map(|from| stage(&from.state, &scratch.path().join("state"))).transpose()?;
    if let Some((user, _)) = launcher.run_as {
        // QEMU opens its disks again, for writing, when it goes on after a checkpoint, and reads
        // the state, as `nobody`: those files are its own, in a directory it can enter but not
        // change (so it cannot swap a file for a link that vmgrid would then follow).
        let files = [overlay.as_deref(), Some(job_disk.as_path()), state.as_deref()];
        for f in files.into_iter().flatten() {
            launch::give(f, user)?;
        }
        launch::traversable(scratch.path())?;
    }
    Ok(Staged { scratch, accel, job_dir, overlay, job_disk, state })
}

pub(crate) fn run(req: &RunRequest<'_>, config: &RuntimeConfig, ck: &Checkpointing) -> Result<RunResult, RunError> {
    let job = req.job;
    let launcher = Launcher::new()?;
    let Staged { scratch, accel, job_dir, overlay, job_disk, state } = stage_run(req, config, ck, &launcher)?;
    let qmp_path = scratch.path().join("qmp.sock");
    let launch = launch::Launch {
        job,
        job_dir: &job_dir,
        overlay: overlay.as_deref(),
        job_disk: Some(&job_disk),
        incoming: ck.resume.is_some(),
        resumed: ck.resume.as_ref().map_or(0, |r| r.seq),
        qmp: &qmp_path,
        accel,
        launcher: &launcher,
        net: None,
    };
    let mut cmd = launcher.command(&launch::args(&launch));
    let (stdout, stderr) = CaptureSink::pair(config);
    let earlier = ck.resume.as_ref().map_or(0.0, |r| r.guest_s);
    if let Some(from) = &ck.resume {
        stdout.write(&from.console);
    }
    let start = Instant::now();
    let mut vm = Supervised::spawn(&mut cmd, stdout.clone(), stderr.clone())
        .map_err(|e| RunError::host(format!("cannot start {}", launcher.qemu.display()), e))?;
    let mut qmp = connect(&qmp_path, ck.resume.as_ref().zip(state.as_deref())).map_err(|(e, bad)| {
        vm.kill_and_reap();
        vm.join_readers();
        let said = String::from_utf8_lossy(&stderr.take().bytes).trim().to_string();
        let e = if said.is_empty() { e } else { format!("{e}; QEMU said: {said}") };
        if bad { RunError::BadCheckpoint(e) } else { RunError::Host(e) }
    })?;
    if let Some(from) = &ck.resume {
        ck.sink.resumed(from.seq, start.elapsed());
    }
    let ran = Duration::try_from_secs_f64(earlier).unwrap_or(Duration::MAX);
    let left = Duration::from_secs(job.resources.timeout_s).saturating_sub(ran);
    let watch = Watch {
        ck,
        disks: Disks { overlay: overlay.as_deref(), job_disk: &job_disk },
        console: &stdout,
        accel,
        run_as: launcher.run_as.map(|(u, _)| u),
        started: start,
        earlier,
        seq: ck.resume.as_ref().map_or(0, |r| r.seq),
    };
    let ended = watch.wait(&mut vm, &mut qmp, start + left, req);
    let ended = match ended {
        Ok(e) => e,
        Err(e) => {
            super::stop(&mut vm, &qmp_path);
            vm.join_readers();
            return Err(e);
        }
    };
    // Ok(how QEMU exited, None when stopped at the time limit), or Err(the last checkpoint).
    let status = match ended {
        Ended::Exited(st) => Ok(Some(st)),
        Ended::TimedOut => {
            super::stop(&mut vm, &qmp_path);
            Ok(None)
        }
        Ended::Vacated(seq) => {
            vm.kill_and_reap();
            Err(seq)
        }
    };
    vm.join_readers();
    let (out, err) = (stdout.take(), stderr.take());
    let outcome = match status {
        Err(seq) => Outcome::Vacated { seq },
        Ok(status) => finished(req, status, (&job_dir, &job_disk, scratch.path()), (&out, &err))?,
    };
    Ok(RunResult { outcome, stdout: out, stderr: err, wall: start.elapsed(), created: true })
}

/// How a checkpointed VM that QEMU is done with ended. Its files come back from its disk (partial
/// ones too, after a time limit); a disk the guest made unreadable is the guest's failure.
fn finished(
    req: &RunRequest<'_>,
    status: Option<std::process::ExitStatus>,
    (job_dir, job_disk, scratch): (&Path, &Path, &Path),
    (out, err): (&crate::Captured, &crate::Captured),
) -> Result<Outcome, RunError> {
    let limit = (req.job.resources.disk_mb << 20) + crate::disk::usage(job_dir);
    Ok(match jobdisk::extract(job_disk, job_dir, scratch, limit)? {
        Some(f) if status.is_some_and(|s| s.success()) => Outcome::Failed(f),
        _ => super::outcome(req, status, out, err)?,
    })
}

/// The image's overlay and the job directory's disk: fresh, or the checkpoint's (its overlay put
/// back on top of this node's copy of the image).
fn disks(
    req: &RunRequest<'_>,
    resume: Option<&ResumeFrom>,
    scratch: &Path,
    accel: accel::Accel,
) -> Result<(Option<PathBuf>, PathBuf), RunError> {
    let job = req.job;
    for (what, p) in [("kernel", &job.vm.kernel), ("initrd", &job.vm.initrd), ("image", &job.vm.image)] {
        if let Some(p) = p
            && !p.is_file()
        {
            return Err(RunError::BadJob(format!("the {what} `{}` is not a readable file", p.display())));
        }
    }
    let Some(from) = resume else {
        let overlay = job.vm.image.as_deref().map(|image| image::overlay(image, scratch)).transpose()?;
        return Ok((overlay, jobdisk::build(req.job_dir, scratch, job.resources.disk_mb)?));
    };
    if from.accel != accel.as_str() {
        return Err(RunError::Host(format!(
            "checkpoint {} was taken under {}, and this node runs QEMU under {}",
            from.seq,
            from.accel,
            accel.as_str()
        )));
    }
    // The checkpoint's disks are as untrusted as the guest and the node that wrote them: checked
    // before QEMU (or qemu-img) opens them as disks.
    let refused = |what: &str, why: String| {
        RunError::BadCheckpoint(format!("checkpoint {}'s {what} is refused: {why}", from.seq))
    };
    let copy = |from: &Path, name: &str| {
        let to = scratch.join(name);
        std::fs::copy(from, &to).map(|_| to).map_err(|e| RunError::host("cannot stage the checkpoint's disks", e))
    };
    let job_disk = copy(&from.job_disk, "job.qcow2")?;
    let most = (jobdisk::size_mb(crate::disk::usage(req.job_dir), job.resources.disk_mb) + 16) << 20;
    let checked = |what: &str, e: image::Untrusted| match e {
        image::Untrusted::Refused(why) => refused(what, why),
        image::Untrusted::Host(e) => RunError::Host(e),
    };
    image::check_untrusted_qcow2(&job_disk, most, false).map_err(|e| checked("job directory's disk", e))?;
    let overlay = match (&job.vm.image, &from.overlay) {
        (Some(image), Some(o)) => {
            let overlay = copy(o, "overlay.qcow2")?;
            image::check_untrusted_qcow2(&overlay, image::virtual_size(image)?, true)
                .map_err(|e| checked("image overlay", e))?;
            Some(image::rebase(&overlay, image)?)
        }
        (None, None) => None,
        _ => return Err(refused("disks", "they do not match the job's image".into())),
    };
    Ok((overlay, job_disk))
}

/// Moves (or copies, across filesystems) a file into the scratch directory.
fn stage(from: &Path, to: &Path) -> Result<PathBuf, RunError> {
    if std::fs::rename(from, to).is_err() {
        std::fs::copy(from, to).map_err(|e| RunError::host("cannot stage the checkpoint's state", e))?;
    }
    Ok(to.to_path_buf())
}

/// QMP, once QEMU opened it, with the checkpoint's state (staged at the path given) loaded when
/// resuming; an error says whether the checkpoint is at fault (QEMU could not load it).
fn connect(qmp_path: &Path, resume: Option<(&ResumeFrom, &Path)>) -> Result<Qmp, (String, bool)> {
    let mut qmp =
        Qmp::connect(qmp_path, QMP_CONNECT).map_err(|e| (format!("cannot reach QEMU's monitor: {e}"), false))?;
    if let Some((from, state)) = resume {
        checkpoint::resume(&mut qmp, from.seq, state).map_err(|e| (e, true))?;
    }
    Ok(qmp)
}

enum Ended {
    Exited(std::process::ExitStatus),
    TimedOut,
    /// Stopped after its last checkpoint, which is stored.
    Vacated(u64),
}

/// A running checkpointed VM: what its checkpoints need.
struct Watch<'a> {
    ck: &'a Checkpointing,
    disks: Disks<'a>,
    console: &'a CaptureSink,
    accel: accel::Accel,
    run_as: Option<&'static str>,
    started: Instant,
    /// Seconds the guest ran in earlier attempts.
    earlier: f64,
    /// The latest checkpoint taken (of this run or the one it resumed from).
    seq: u64,
}

impl Watch<'_> {
    /// Waits for the VM to end, taking a checkpoint every interval, and a last one if vacated.
    fn wait(
        mut self,
        vm: &mut Supervised,
        qmp: &mut Qmp,
        deadline: Instant,
        req: &RunRequest<'_>,
    ) -> Result<Ended, RunError> {
        let mut next = Instant::now() + self.ck.every;
        loop {
            let slice = deadline.min(next).min(Instant::now() + Duration::from_millis(50));
            match vm.wait_until(slice).map_err(|e| RunError::host("waiting for qemu", e))? {
                Waited::Exited(st) => return Ok(Ended::Exited(st)),
                Waited::TimedOut if Instant::now() >= deadline || req.cancelled() => return Ok(Ended::TimedOut),
                Waited::TimedOut => {}
            }
            if self.ck.vacate.load(Ordering::Relaxed) {
                let taken = self.take(qmp, true).map_err(RunError::Host)?;
                let seq = taken.seq;
                self.ck
                    .sink
                    .store(taken)
                    .map_err(|e| RunError::Host(format!("the last checkpoint was not stored: {e}")))?;
                return Ok(Ended::Vacated(seq));
            }
            if Instant::now() >= next {
                next = Instant::now() + self.ck.every;
                if self.ck.sink.busy() {
                    tracing::warn!("the previous checkpoint is still being stored; skipping this one");
                    continue;
                }
                match self.take(qmp, false) {
                    Ok(taken) => {
                        if let Err(e) = self.ck.sink.store(taken) {
                            tracing::warn!("a checkpoint was not stored: {e}");
                        }
                    }
                    Err(e) => tracing::warn!("a checkpoint failed; the VM runs on: {e}"),
                }
            }
        }
    }

    fn take(&mut self, qmp: &mut Qmp, last: bool) -> Result<checkpoint::TakenCheckpoint, String> {
        let guest_s = self.earlier + self.started.elapsed().as_secs_f64();
        let taken = checkpoint::take(
            qmp,
            self.seq.saturating_add(1),
            &self.disks,
            self.console,
            self.accel,
            guest_s,
            last,
            self.run_as,
        )?;
        self.seq = taken.seq;
        tracing::info!(seq = taken.seq, pause_ms = taken.pause.as_millis() as u64, "checkpoint taken");
        Ok(taken)
    }
}
