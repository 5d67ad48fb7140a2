//! The QEMU guest contract, through `vmgrid run`, booting the guest kit in real QEMU (TCG here).
//! Each test boots one VM, so each checks as much of the contract as one boot can show.

use std::path::PathBuf;

use crate::util::*;

/// A job file for the guest kit that runs `args` in the guest.
fn kit_job(d: &JobDir, name: &str, args: &[&str], extra: &str) -> PathBuf {
    let (kernel, initrd) = guest_kit();
    let args = args.iter().map(|a| format!("{a:?}")).collect::<Vec<_>>().join(", ");
    d.job(&format!(
        "name = \"{name}\"\n[vm]\ntype = \"qemu\"\nkernel = {}\ninitrd = {}\nappend = \"console=ttyS0 quiet\"\nargs = [{args}]\n{extra}",
        toml_path(&kernel),
        toml_path(&initrd)
    ))
}

/// Whether a QEMU process whose command line names this job is still running.
fn qemu_running(name: &str) -> bool {
    let needle = format!("vmgrid-{name}");
    std::fs::read_dir("/proc").unwrap().filter_map(Result::ok).any(|e| {
        std::fs::read(e.path().join("cmdline"))
            .map(|c| String::from_utf8_lossy(&c).split('\0').any(|a| a == needle))
            .unwrap_or(false)
    })
}

#[test]
fn args_env_files_console_and_exit_code() {
    let d = JobDir::new();
    d.write("data/in.txt", "from the host");
    d.write(
        "job.sh",
        "echo \"args: $*\"\necho \"mode: $MODE\"\ncat data/in.txt\nmkdir -p out/sub\necho result > out/sub/r.txt\necho top > top.txt\nexit 3\n",
    );
    let job = kit_job(
        &d,
        "qemu-contract",
        &["sh", "job.sh", "one", "two words"],
        "env = { MODE = \"fast\" }\n[resources]\ntimeout_s = 120\n[files]\ninputs = [\"job.sh\", \"data/in.txt\"]\noutputs = [\"out/**/*.txt\", \"*.txt\"]\n",
    );
    let out = vmgrid().arg("run").arg(&job).arg("--out").arg(d.out()).output().unwrap();
    let stdout = stdout_of(&out);
    assert_eq!(out.status.code(), Some(3), "{stdout}\n{}", stderr_of(&out));
    assert!(stdout.contains("args: one two words\n"), "{stdout}");
    assert!(stdout.contains("mode: fast\n"), "{stdout}");
    assert!(stdout.contains("from the host"), "{stdout}");
    assert_eq!(std::fs::read_to_string(d.out().join("out/sub/r.txt")).unwrap(), "result\n");
    assert_eq!(std::fs::read_to_string(d.out().join("top.txt")).unwrap(), "top\n");
    assert!(!d.out().join(".vmgrid-exit").exists());
}

#[test]
fn time_limit_stops_the_vm_and_reaps_qemu() {
    let d = JobDir::new();
    let job = kit_job(&d, "qemu-sleeper", &["sleep", "600"], "[resources]\ntimeout_s = 8\n");
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("time limit of 8 s"), "{}", stderr_of(&out));
    assert!(!qemu_running("qemu-sleeper"), "qemu is still running");
}

#[test]
fn a_guest_filling_its_directory_is_stopped_at_its_disk_limit() {
    let d = JobDir::new();
    let job = kit_job(
        &d,
        "qemu-filler",
        &["sh", "-c", "dd if=/dev/zero of=big.bin bs=1M count=4000; sleep 600"],
        "[resources]\ndisk_mb = 8\ntimeout_s = 300\n[files]\noutputs = [\"big.bin\"]\n",
    );
    let out = vmgrid().arg("run").arg(&job).arg("--out").arg(d.out()).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr_of(&out));
    assert!(stderr_of(&out).contains("over the disk_mb limit of 8 MiB; the VM was stopped"), "{}", stderr_of(&out));
    assert!(!d.out().join("big.bin").exists(), "an output past the disk limit was collected");
    assert!(!qemu_running("qemu-filler"), "qemu is still running");
}

#[test]
fn a_hung_guest_is_stopped_and_reaped() {
    // The guest's init spins forever and never powers off.
    let d = JobDir::new();
    let job = kit_job(&d, "qemu-hung", &["sh", "-c", "while :; do :; done"], "[resources]\ntimeout_s = 8\n");
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr_of(&out).contains("time limit"), "{}", stderr_of(&out));
    assert!(!qemu_running("qemu-hung"), "qemu is still running");
}

#[test]
fn a_guest_that_powers_off_without_an_exit_status_failed() {
    let d = JobDir::new();
    let job = kit_job(&d, "qemu-noexit", &["sh", "-c", "echo going down; poweroff -f"], "");
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("powered off without writing its exit code"), "{err}");
    assert!(stdout_of(&out).contains("going down"));
}

#[test]
fn a_kernel_panic_is_a_failure_with_the_panic_message() {
    let d = JobDir::new();
    let job = kit_job(&d, "qemu-panic", &["sh", "-c", "echo c > /proc/sysrq-trigger"], "");
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("kernel panicked") && err.contains("sysrq"), "{err}");
}

#[test]
fn the_disk_image_is_unchanged_after_the_guest_writes_to_its_disk() {
    let d = JobDir::new();
    let base = d.write("disk.img", vec![0xabu8; 4 << 20]);
    let before = blake3::hash(&std::fs::read(&base).unwrap());
    let job = kit_job(
        &d,
        "qemu-disk",
        &["sh", "-c", "echo overwritten | dd of=/dev/vda conv=notrunc 2>/dev/null && sync && head -c 11 /dev/vda"],
        "image = \"disk.img\"\n",
    );
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}\n{}", stdout_of(&out), stderr_of(&out));
    assert!(stdout_of(&out).contains("overwritten"), "the guest saw its own write: {}", stdout_of(&out));
    assert_eq!(blake3::hash(&std::fs::read(&base).unwrap()), before, "the base image was written");
}

#[test]
fn missing_qemu_is_a_clear_error() {
    let d = JobDir::new();
    let job = kit_job(&d, "qemu-missing", &["true"], "");
    let out = vmgrid().env("PATH", "/nonexistent").env_remove("VMGRID_QEMU").arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = stderr_of(&out);
    assert!(err.contains("was not found on PATH") && err.contains("apt-get install qemu-system-x86"), "{err}");
}

#[test]
fn a_missing_kernel_is_bad_input() {
    let d = JobDir::new();
    let job = d.job("[vm]\ntype = \"qemu\"\nkernel = \"no-such-vmlinuz\"\n");
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("no-such-vmlinuz"), "{}", stderr_of(&out));
}

#[test]
fn an_image_with_a_backing_file_is_refused() {
    let d = JobDir::new();
    let status = std::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b", "/etc/hostname"])
        .arg(d.path().join("sneaky.qcow2"))
        .status()
        .unwrap();
    assert!(status.success());
    let job = d.job("[vm]\ntype = \"qemu\"\nimage = \"sneaky.qcow2\"\n");
    let out = vmgrid().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr_of(&out).contains("has a backing file"), "{}", stderr_of(&out));
}
