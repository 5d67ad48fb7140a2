//! The Slurm side of `vmgrid glidein`: the pilot's batch script, `sbatch` to submit pilots and
//! `squeue` to list them. The CLI (`crates/vmgrid`, `cmd_glidein.rs`) decides what to submit; this
//! crate is where those Slurm commands are started.

use std::path::Path;
use std::process::Command;

/// Slurm's time formats, in seconds: MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
pub fn parse_slurm_time(s: &str) -> Result<u64, String> {
    let bad = || format!("--time `{s}` is not a Slurm time (MM, MM:SS, HH:MM:SS or D-HH:MM:SS)");
    let num = |p: &str| p.parse::<u64>().map_err(|_| bad());
    let (days, rest) = match s.split_once('-') {
        Some((d, r)) => (Some(num(d)?), r),
        None => (None, s),
    };
    let parts: Vec<u64> = rest.split(':').map(num).collect::<Result<_, _>>()?;
    let secs = match (days, parts.as_slice()) {
        (None, [m]) => m * 60,
        (None, [m, s]) => m * 60 + s,
        (None, [h, m, s]) => h * 3600 + m * 60 + s,
        (Some(d), [h]) => d * 86400 + h * 3600,
        (Some(d), [h, m]) => d * 86400 + h * 3600 + m * 60,
        (Some(d), [h, m, s]) => d * 86400 + h * 3600 + m * 60 + s,
        _ => return Err(bad()),
    };
    if secs == 0 {
        return Err(format!("--time `{s}` is zero"));
    }
    Ok(secs)
}

/// Single-quotes a string for sh.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

pub struct Pilot<'a> {
    pub vmgrid: &'a str,
    pub pool: &'a str,
    pub token_file: &'a str,
    pub ca_file: &'a str,
    pub lifetime_s: u64,
    pub drain_timeout_s: u64,
}

/// The pilot's batch script (sbatch options are given on sbatch's command line).
pub fn pilot_script(p: &Pilot) -> String {
    let (vm, pool, tok, ca) = (sh_quote(p.vmgrid), sh_quote(p.pool), sh_quote(p.token_file), sh_quote(p.ca_file));
    format!(
        r#"#!/bin/sh
# A vmgrid pilot, written by `vmgrid glidein slurm`: a node agent that joins the pool, takes jobs
# for {life} s, then drains and exits. SIGTERM (scancel, or sbatch --signal) drains at once.
echo "vmgrid pilot: Slurm job $SLURM_JOB_ID on $(hostname), partition $SLURM_JOB_PARTITION"
{vm} glidein preflight --pool {pool} --token-file {tok} --ca-file {ca} || exit 1
timeout --signal=TERM --kill-after={kill} {life} {vm} node --pool {pool} --token-file {tok} --ca-file {ca} \
  --name "slurm-$SLURM_JOB_ID" --label "slurm.job_id=$SLURM_JOB_ID" \
  --label "slurm.partition=$SLURM_JOB_PARTITION" --drain-timeout-s {drain} &
pid=$!
trap 'kill -TERM $pid 2>/dev/null' TERM INT
wait $pid; rc=$?
while kill -0 $pid 2>/dev/null; do wait $pid; rc=$?; done
[ "$rc" = 124 ] && rc=0
echo "vmgrid pilot: node agent exited ($rc)"
exit $rc
"#,
        life = p.lifetime_s,
        drain = p.drain_timeout_s,
        kill = p.drain_timeout_s + 30,
    )
}

/// One sbatch submission of a pilot.
pub struct Submit<'a> {
    pub job_name: &'a str,
    /// Slurm's time limit, as given (`--time`).
    pub time: &'a str,
    /// Seconds before the limit at which Slurm sends the batch shell SIGTERM.
    pub signal_s: u64,
    /// Where `pilot-JOBID.out` goes.
    pub output_dir: &'a Path,
    pub partition: Option<&'a str>,
    /// More sbatch options.
    pub extra: &'a [String],
    pub script: &'a Path,
}

/// Submits one pilot; returns its Slurm job id.
pub fn sbatch(s: &Submit) -> Result<String, String> {
    let mut cmd = Command::new("sbatch");
    cmd.arg("--parsable")
        .arg(format!("--job-name={}", s.job_name))
        .arg(format!("--time={}", s.time))
        .arg(format!("--signal=B:TERM@{}", s.signal_s))
        .arg("--nodes=1")
        .arg(format!("--output={}/pilot-%j.out", s.output_dir.display()));
    if let Some(p) = s.partition {
        cmd.arg(format!("--partition={p}"));
    }
    cmd.args(s.extra).arg(s.script);
    let out = cmd.output().map_err(|e| format!("cannot run sbatch: {e} (is Slurm installed here?)"))?;
    if !out.status.success() {
        return Err(format!("sbatch failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim()));
    }
    let id = String::from_utf8_lossy(&out.stdout);
    Ok(id.trim().split(';').next().unwrap_or("").to_string())
}

pub struct SlurmJob {
    pub id: String,
    pub state: String,
    pub partition: String,
    pub host: String,
    pub time_left: String,
}

/// The jobs named `job_name` that Slurm still lists.
pub fn squeue(job_name: &str) -> Result<Vec<SlurmJob>, String> {
    let out = Command::new("squeue")
        .args(["--noheader", "--name", job_name, "--format", "%i|%T|%P|%N|%L"])
        .output()
        .map_err(|e| format!("cannot run squeue: {e} (is Slurm installed here?)"))?;
    if !out.status.success() {
        return Err(format!("squeue failed: {}", String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.trim().split('|').collect();
            (f.len() == 5).then(|| SlurmJob {
                id: f[0].into(),
                state: f[1].into(),
                partition: f[2].into(),
                host: f[3].into(),
                time_left: f[4].into(),
            })
        })
        .collect())
}
