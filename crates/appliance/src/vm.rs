//! `vmgrid appliance start`: boots the appliance image under QEMU, from the disk through the BIOS
//! (no `-kernel`), with its config disk, user-mode networking, and the serial console on a socket
//! that vmgrid logs (and, with `--console`, joins to stdin and stdout).
//!
//! QEMU is started as job VMs are (`vmgrid_runtime::qemu::Launcher`: under its seccomp sandbox,
//! dropping root when vmgrid is root, in a PID namespace that dies with vmgrid) and supervised by
//! the runtime's `Supervised`, in its own session (a terminal's Ctrl-C reaches vmgrid, not QEMU).
//! SIGTERM, SIGINT or SIGHUP to vmgrid become an ACPI power-button press (QMP
//! `system_powerdown`): the appliance drains, deregisters and powers off. If it has not within the
//! drain time and a margin, QEMU is told to quit, then killed.

use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use vmgrid_runtime::capture::CaptureSink;
use vmgrid_runtime::process::{Supervised, Waited};
use vmgrid_runtime::qemu::launch::opt_path;
use vmgrid_runtime::qemu::{Accel, Launcher, qmp::Qmp};

use crate::Error;
use crate::config::{self, ApplianceConfig};
use crate::{MARKER, tools};

pub struct StartOptions {
    pub config: ApplianceConfig,
    pub image: PathBuf,
    pub memory_mb: u64,
    pub cpus: u32,
    pub state_dir: PathBuf,
    pub console: bool,
}

/// How often the power button is pressed again while the appliance has not powered off (an
/// early press, before the guest listens for it, is lost).
const PRESS_AGAIN: Duration = Duration::from_secs(5);
/// Beyond the drain time, how long the appliance gets to deregister and power off.
const POWER_OFF_MARGIN: Duration = Duration::from_secs(30);

pub fn start(opts: StartOptions) -> Result<i32, Error> {
    let name = opts.config.name.clone().expect("start always names the appliance");
    let launcher = Launcher::new()?;
    std::fs::create_dir_all(&opts.state_dir)
        .map_err(tools::io(format!("cannot create {}", opts.state_dir.display())))?;
    // Sockets need short paths (108 bytes), so the scratch directory is in /tmp.
    let scratch = vmgrid_runtime::scratch::dir("appliance").map_err(tools::io("cannot create a scratch directory"))?;
    let image = std::fs::canonicalize(&opts.image)
        .map_err(|e| Error::BadInput(format!("the appliance image `{}` cannot be read: {e}", opts.image.display())))?;
    let overlay = vmgrid_runtime::qemu::image::overlay(&image, scratch.path())?;
    let config_disk = opts.state_dir.join("config.img");
    config::write_disk(&opts.config, &config_disk)?;
    let accel =
        vmgrid_runtime::qemu::accel::choose(&launcher.qemu, &vmgrid_runtime::RuntimeConfig::default_cache_dir());
    let paths = Paths {
        overlay,
        config_disk,
        console: scratch.path().join("console.sock"),
        qmp: scratch.path().join("qmp.sock"),
        log: opts.state_dir.join("console.log"),
    };
    let args = qemu_args(&launcher, &name, &opts, accel, &paths, &random_mac());
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT, signal_hook::consts::SIGHUP] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| Error::Failed(format!("cannot handle signals: {e}")))?;
    }
    eprintln!(
        "vmgrid: booting appliance {name} ({} MiB, {} cpu(s), {}) from {} for the pool at {}",
        opts.memory_mb,
        opts.cpus,
        accel.as_str(),
        image.display(),
        opts.config.pool
    );
    let log = std::fs::File::create(&paths.log).map_err(tools::io(format!("cannot create {}", paths.log.display())))?;
    let started = Instant::now();
    let stderr = CaptureSink::bounded(64 << 10);
    // QEMU runs in its own session (a terminal's Ctrl-C reaches vmgrid, not QEMU) and dies with
    // vmgrid; as root it drops to an unprivileged user in a PID namespace of its own.
    let mut vm =
        Supervised::spawn_with(&mut launcher.command(&args), CaptureSink::bounded(64 << 10), stderr.clone(), true)
            .map_err(|e| Error::Failed(format!("cannot start {}: {e}", launcher.qemu.display())))?;
    let (tx, markers) = mpsc::channel();
    let console = match connect_console(&paths.console, &mut vm) {
        Ok(c) => c,
        Err(e) => {
            vm.kill_and_reap();
            return Err(qemu_failed(&stderr, &e));
        }
    };
    let _terminal = if opts.console { Some(attach_stdin(&console)?) } else { None };
    pump_console(console, log, opts.console, tx);
    if !opts.console {
        eprintln!("vmgrid: the console is logged to {} (`--console` shows it here)", paths.log.display());
    }
    let drain = Duration::from_secs(opts.config.drain_timeout_s.unwrap_or(30));
    let Some(status) = supervise(&mut vm, &name, &paths.qmp, &stop, &markers, started, drain)? else {
        return Ok(1);
    };
    vm.join_readers();
    while let Ok(m) = markers.try_recv() {
        report(&name, &m, started);
    }
    if !status.success() {
        return Err(qemu_failed(&stderr, &format!("QEMU exited with {status}")));
    }
    eprintln!("vmgrid: appliance {name} powered off after {:.1} s", started.elapsed().as_secs_f64());
    Ok(0)
}

/// The files and sockets of one appliance VM.
struct Paths {
    overlay: PathBuf,
    config_disk: PathBuf,
    console: PathBuf,
    qmp: PathBuf,
    log: PathBuf,
}

/// QEMU's arguments for the appliance: BIOS boot from the overlay, the config disk read-only,
/// user networking with a random MAC, the console and QMP on sockets, the seccomp sandbox.
fn qemu_args(
    launcher: &Launcher,
    name: &str,
    opts: &StartOptions,
    accel: Accel,
    p: &Paths,
    mac: &str,
) -> Vec<OsString> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |xs: &[&str]| a.extend(xs.iter().map(|x| x.to_string()));
    push(&["-name", &format!("vmgrid-appliance-{}", name.replace(',', ",,"))]);
    push(&["-machine", "pc", "-accel", accel.as_str()]);
    push(&["-cpu", if accel == Accel::Kvm { "host" } else { "max" }]);
    push(&["-m", &opts.memory_mb.to_string(), "-smp", &opts.cpus.to_string()]);
    push(&["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"]);
    push(&["-chardev", &format!("socket,id=console,path={},server=on,wait=off", opt_path(&p.console))]);
    push(&["-serial", "chardev:console"]);
    push(&["-qmp", &format!("unix:{},server=on,wait=off", opt_path(&p.qmp))]);
    push(&["-drive", &format!("file={},format=qcow2,if=none,id=boot", opt_path(&p.overlay))]);
    push(&["-device", "virtio-blk-pci,drive=boot,bootindex=0"]);
    push(&["-drive", &format!("file={},format=raw,if=none,id=config,readonly=on", opt_path(&p.config_disk))]);
    push(&["-device", "virtio-blk-pci,drive=config"]);
    push(&["-netdev", "user,id=net0"]);
    push(&["-device", &format!("virtio-net-pci,netdev=net0,mac={mac}")]);
    a.extend(launcher.sandbox_args());
    a.extend(launcher.drop_root_args());
    a.into_iter().map(OsString::from).collect()
}

/// Waits for QEMU to end, reporting the console's markers; a stop signal presses the power button
/// (again every few seconds), and an appliance that does not power off in time is stopped.
/// `None` when it had to be stopped.
fn supervise(
    vm: &mut Supervised,
    name: &str,
    qmp: &Path,
    stop: &AtomicBool,
    markers: &mpsc::Receiver<String>,
    started: Instant,
    drain: Duration,
) -> Result<Option<ExitStatus>, Error> {
    let mut powering_off: Option<(Instant, Instant)> = None; // (deadline, last press)
    loop {
        if let Some(st) = vm.try_wait().map_err(tools::io("waiting for QEMU"))? {
            return Ok(Some(st));
        }
        while let Ok(m) = markers.try_recv() {
            report(name, &m, started);
        }
        let now = Instant::now();
        match powering_off {
            None if stop.load(Ordering::Relaxed) => {
                eprintln!("vmgrid: powering appliance {name} off: it drains, leaves the pool, then stops");
                press_power_button(qmp);
                powering_off = Some((now + drain + POWER_OFF_MARGIN, now));
            }
            Some((deadline, _)) if now >= deadline => {
                eprintln!(
                    "vmgrid: appliance {name} did not power off within {} s; stopping it (its jobs go back to the pool when their leases expire)",
                    (drain + POWER_OFF_MARGIN).as_secs()
                );
                quit(qmp, vm);
                return Ok(None);
            }
            Some((deadline, last)) if now - last >= PRESS_AGAIN => {
                press_power_button(qmp);
                powering_off = Some((deadline, now));
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A locally administered unicast MAC in QEMU's 52:54:00 range, random so that appliances on one
/// network differ.
fn random_mac() -> String {
    let b = tools::random_bytes::<3>();
    format!("52:54:00:{:02x}:{:02x}:{:02x}", b[0], b[1], b[2])
}

fn report(name: &str, marker: &str, started: Instant) {
    if let Some(rest) = marker.strip_prefix("joined ") {
        eprintln!("vmgrid: appliance {name} joined {rest} ({:.1} s after boot)", started.elapsed().as_secs_f64());
    } else {
        eprintln!("vmgrid: appliance {name}: {marker}");
    }
}

/// QEMU's own words on stderr, once it has ended (its stderr then closes), or `fallback`.
fn qemu_failed(stderr: &CaptureSink, fallback: &str) -> Error {
    let msg = String::from_utf8_lossy(&stderr.snapshot().bytes).trim().to_string();
    Error::Failed(format!("QEMU failed: {}", if msg.is_empty() { fallback } else { &msg }))
}

fn connect_console(path: &Path, vm: &mut Supervised) -> Result<UnixStream, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if let Ok(Some(st)) = vm.try_wait() {
                    vm.join_readers();
                    return Err(format!("QEMU exited with {st} before it opened the console"));
                }
                if Instant::now() >= deadline {
                    return Err(format!("cannot connect to the appliance's console {}: {e}", path.display()));
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// Copies the console to the log (and stdout), and sends each `vmgrid-appliance:` line's text.
fn pump_console(mut from: UnixStream, mut log: std::fs::File, echo: bool, markers: mpsc::Sender<String>) {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        let mut line = Vec::new();
        let mut stdout = std::io::stdout();
        while let Ok(n) = from.read(&mut chunk) {
            if n == 0 {
                break;
            }
            let _ = log.write_all(&chunk[..n]);
            if echo {
                let _ = stdout.write_all(&chunk[..n]);
                let _ = stdout.flush();
            }
            for &b in &chunk[..n] {
                if b != b'\n' {
                    if line.len() < 4096 {
                        line.push(b);
                    }
                    continue;
                }
                let text = String::from_utf8_lossy(&line);
                if let Some(i) = text.find(MARKER) {
                    let _ = markers.send(text[i + MARKER.len()..].trim_end().to_string());
                }
                line.clear();
            }
        }
    });
}

/// Forwards stdin to the console. On a terminal, keystrokes go through one by one and the
/// appliance echoes them; Ctrl-C still signals vmgrid (and so powers the appliance off).
fn attach_stdin(console: &UnixStream) -> Result<Terminal, Error> {
    let mut to = console.try_clone().map_err(tools::io("cannot share the console"))?;
    let terminal = Terminal::raw();
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut chunk = [0u8; 1024];
        while let Ok(n) = stdin.read(&mut chunk) {
            if n == 0 || to.write_all(&chunk[..n]).is_err() {
                break;
            }
        }
    });
    Ok(terminal)
}

/// The terminal's settings, restored when vmgrid is done with the console.
struct Terminal(Option<libc::termios>);

impl Terminal {
    fn raw() -> Terminal {
        // SAFETY: tcgetattr/tcsetattr on fd 0 with a zeroed termios that tcgetattr fills.
        unsafe {
            if libc::isatty(0) != 1 {
                return Terminal(None);
            }
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut t) != 0 {
                return Terminal(None);
            }
            let saved = t;
            t.c_lflag &= !(libc::ECHO | libc::ICANON);
            t.c_iflag &= !libc::ICRNL;
            t.c_cc[libc::VMIN] = 1;
            t.c_cc[libc::VTIME] = 0;
            libc::tcsetattr(0, libc::TCSANOW, &t);
            Terminal(Some(saved))
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Some(t) = &self.0 {
            // SAFETY: restores the settings read from fd 0 in `raw`.
            unsafe {
                libc::tcsetattr(0, libc::TCSANOW, t);
            }
        }
    }
}

fn press_power_button(qmp: &Path) {
    let pressed = Qmp::connect(qmp, Duration::from_secs(2))
        .and_then(|mut q| q.execute("system_powerdown", serde_json::json!({})));
    if let Err(e) = pressed {
        tracing::warn!("QMP system_powerdown: {e}");
    }
}

/// Asks QEMU to quit, then kills it if it has not within a few seconds.
fn quit(qmp: &Path, vm: &mut Supervised) {
    let asked = Qmp::connect(qmp, Duration::from_secs(1)).and_then(|mut q| q.execute("quit", serde_json::json!({})));
    if asked.is_ok() && matches!(vm.wait_until(Instant::now() + Duration::from_secs(3)), Ok(Waited::Exited(_))) {
        return;
    }
    vm.kill_and_reap();
}
