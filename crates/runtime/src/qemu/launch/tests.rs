//! The command line of a job VM for both QEMU generations, built without running QEMU.

use super::*;
use crate::qemu::caps::tests::{QEMU_7_2_HELP, QEMU_7_2_VERSION, QEMU_10_HELP, QEMU_10_VERSION};

fn kit_job(name: &str, network: &str) -> Job {
    let text = format!(
        "name = \"{name}\"\n[vm]\ntype = \"qemu\"\nkernel = \"vmlinuz\"\ninitrd = \"initrd.gz\"\nnetwork = \"{network}\"\nargs = [\"sh\", \"-c\", \"echo hi\"]\n[resources]\nmemory_mb = 128\ncpus = 2\n"
    );
    vmgrid_job::parse_job(Path::new("/jobs/j.toml"), &text).unwrap()
}

fn launcher(version: &str, help: &str, as_root: bool) -> Launcher {
    let caps = Caps::parse(version, help).unwrap();
    let run_as = as_root.then(|| (UNPRIVILEGED_USER, caps.drop_root.unwrap()));
    Launcher { qemu: PathBuf::from("/usr/bin/qemu-system-x86_64"), caps, run_as }
}

fn line(job: &Job, launcher: &Launcher) -> Vec<String> {
    let launch = Launch {
        job,
        job_dir: Path::new("/work/job,dir"),
        overlay: Some(Path::new("/tmp/s/overlay.qcow2")),
        job_disk: None,
        incoming: false,
        resumed: 0,
        qmp: Path::new("/tmp/s/qmp.sock"),
        accel: Accel::Tcg,
        launcher,
        net: None,
    };
    args(&launch).into_iter().map(|a| a.into_string().unwrap()).collect()
}

/// The value that follows `opt`, which must appear exactly once.
fn value<'a>(line: &'a [String], opt: &str) -> &'a str {
    let at: Vec<usize> = line.iter().enumerate().filter(|(_, a)| *a == opt).map(|(i, _)| i).collect();
    assert_eq!(at.len(), 1, "{opt} in {line:?}");
    &line[at[0] + 1]
}

#[test]
fn as_root_qemu_7_2_drops_to_nobody_with_runas() {
    let l = line(&kit_job("k", "none"), &launcher(QEMU_7_2_VERSION, QEMU_7_2_HELP, true));
    assert_eq!(value(&l, "-runas"), "nobody");
    assert!(!l.iter().any(|a| a == "-run-with"), "{l:?}");
    assert!(value(&l, "-sandbox").contains("elevateprivileges=allow"), "{l:?}");
}

#[test]
fn as_root_qemu_10_drops_to_nobody_with_run_with_user() {
    let l = line(&kit_job("k", "none"), &launcher(QEMU_10_VERSION, QEMU_10_HELP, true));
    assert_eq!(value(&l, "-run-with"), "user=nobody");
    assert!(!l.iter().any(|a| a == "-runas"), "{l:?}");
    assert!(value(&l, "-sandbox").contains("elevateprivileges=allow"), "{l:?}");
}

#[test]
fn the_rest_of_the_line_is_the_same_for_both_generations() {
    let old = launcher(QEMU_7_2_VERSION, QEMU_7_2_HELP, false);
    let new = launcher(QEMU_10_VERSION, QEMU_10_HELP, false);
    for network in ["none", "user"] {
        let job = kit_job("k", network);
        assert_eq!(line(&job, &old), line(&job, &new));
    }
    let l = line(&kit_job("k", "none"), &new);
    #[rustfmt::skip]
    let expected: Vec<String> = [
        "-name", "vmgrid-k", "-machine", "pc", "-accel", "tcg", "-m", "128", "-smp", "2",
        "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
        "-chardev", "stdio,id=console,signal=off", "-serial", "chardev:console",
        "-qmp", "unix:/tmp/s/qmp.sock,server=on,wait=off",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-fsdev", "local,id=job,path=/work/job,,dir,security_model=mapped-xattr,multidevs=remap",
        "-device", "virtio-9p-pci,fsdev=job,mount_tag=vmgrid",
        "-drive", "file=/tmp/s/overlay.qcow2,format=qcow2,if=virtio",
        "-kernel", "/jobs/vmlinuz", "-initrd", "/jobs/initrd.gz",
        "-append", "console=ttyS0 panic=-1 -- sh -c \"echo hi\"",
        "-nic", "none",
    ]
    .map(String::from)
    .into();
    assert_eq!(l, expected);
    assert_eq!(value(&line(&kit_job("k", "user"), &new), "-nic"), "user,model=virtio-net-pci");
}

#[test]
fn without_seccomp_there_is_no_sandbox_option_and_a_name_cannot_add_options() {
    let mut l = launcher(QEMU_10_VERSION, QEMU_10_HELP, false);
    l.caps.sandbox = false;
    let mut job = kit_job("k", "none");
    job.name = "x,process=evil".into();
    let line = line(&job, &l);
    assert!(!line.iter().any(|a| a == "-sandbox"), "{line:?}");
    assert_eq!(value(&line, "-name"), "vmgrid-x,,process=evil");
}

#[test]
fn qemu_as_root_runs_under_a_shell_init_in_its_own_pid_namespace() {
    let a: Vec<String> = in_own_pid_namespace(Path::new("/usr/bin/qemu"), &["-m".into(), "64".into()])
        .into_iter()
        .map(|a| a.into_string().unwrap())
        .collect();
    assert_eq!(
        a,
        [
            "--pid",
            "--fork",
            "--kill-child=SIGKILL",
            "--",
            "/bin/sh",
            "-c",
            "\"$@\"; exit $?",
            "sh",
            "/usr/bin/qemu",
            "-m",
            "64"
        ]
    );
    let l = launcher(QEMU_10_VERSION, QEMU_10_HELP, true);
    let cmd = l.command(&["-m".into(), "64".into()]);
    assert!(cmd.get_program().to_string_lossy().ends_with("unshare"), "{cmd:?}");
    let l = launcher(QEMU_10_VERSION, QEMU_10_HELP, false);
    assert_eq!(l.command(&[]).get_program(), "/usr/bin/qemu-system-x86_64");
}

#[test]
fn nobody_is_found_in_the_user_database() {
    let (uid, _) = user_ids("nobody").unwrap().expect("Debian has nobody");
    assert_eq!(uid, 65534);
    assert_eq!(user_ids("no-such-user-vmgrid").unwrap(), None);
}

#[test]
fn a_checkpointed_job_gets_its_directory_as_a_disk_a_portable_cpu_and_may_wait_for_a_state() {
    let job = kit_job("k", "none");
    let launcher = launcher(QEMU_10_VERSION, QEMU_10_HELP, true);
    let launch = Launch {
        job: &job,
        job_dir: Path::new("/work/job"),
        overlay: Some(Path::new("/tmp/s/overlay.qcow2")),
        job_disk: Some(Path::new("/tmp/s/job,disk.qcow2")),
        incoming: true,
        resumed: 7,
        qmp: Path::new("/tmp/s/qmp.sock"),
        accel: Accel::Kvm,
        launcher: &launcher,
        net: None,
    };
    let l: Vec<String> = args(&launch).into_iter().map(|a| a.into_string().unwrap()).collect();
    assert!(!l.iter().any(|a| a == "-fsdev" || a.contains("virtio-9p")), "no 9p share: QEMU cannot migrate one: {l:?}");
    assert_eq!(value(&l, "-cpu"), "qemu64");
    assert_eq!(value(&l, "-machine"), "pc-i440fx-8.2");
    assert_eq!(value(&l, "-incoming"), "defer");
    assert_eq!(value(&l, "-fw_cfg"), "name=opt/vmgrid/resumed,string=0000000007");
    let drives: Vec<&String> = l.iter().filter(|a| a.starts_with("file=")).collect();
    assert_eq!(
        drives,
        [
            "file=/tmp/s/overlay.qcow2,format=qcow2,if=virtio",
            "file=/tmp/s/job,,disk.qcow2,format=qcow2,if=none,id=jobdisk"
        ]
    );
    assert!(l.iter().any(|a| a == "virtio-blk-pci,drive=jobdisk,serial=vmgrid-job"), "{l:?}");
}
