//! `vmgrid appliance start`: boots the appliance image under QEMU, from the disk through the BIOS
//! (no `-kernel`), with its config disk, user-mode networking, and the serial console on a socket
//! that vmgrid logs (and, with `--console`, joins to stdin and stdout).
//!
//! QEMU runs in its own session (a terminal's Ctrl-C reaches vmgrid, not QEMU) and dies with
//! vmgrid (PR_SET_PDEATHSIG). SIGTERM, SIGINT or SIGHUP to vmgrid become an ACPI power-button
//! press (QMP `system_powerdown`): the appliance drains, deregisters and powers off. If it has not
//! within the drain time and a margin, QEMU is told to quit, then killed.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use vmgrid_runtime::qemu::{Accel, qmp::Qmp};

use super::config::{self, ApplianceConfig};
use super::{MARKER, tools};
use crate::CliError;

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

pub fn start(opts: StartOptions) -> Result<i32, CliError> {
    let name = opts.config.name.clone().expect("start always names the appliance");
    let qemu = vmgrid_runtime::qemu::find_qemu()?;
    std::fs::create_dir_all(&opts.state_dir)
        .map_err(tools::io(format!("cannot create {}", opts.state_dir.display())))?;
    // Sockets need short paths (108 bytes), so the scratch directory is in /tmp.
    let scratch = tempfile::Builder::new()
        .prefix("vmgrid-appliance-")
        .tempdir()
        .map_err(tools::io("cannot create a scratch directory"))?;
    let image = std::fs::canonicalize(&opts.image).map_err(|e| {
        CliError::BadInput(format!("the appliance image `{}` cannot be read: {e}", opts.image.display()))
    })?;
    let format = tools::image_format(&image)?;
    let overlay = scratch.path().join("overlay.qcow2");
    tools::run(
        Command::new(tools::find("qemu-img", "qemu-utils")?)
            .args(["create", "-q", "-f", "qcow2", "-F", &format, "-b"])
            .arg(&image)
            .arg(&overlay),
    )?;
    let config_disk = opts.state_dir.join("config.img");
    config::write_disk(&opts.config, &config_disk)?;
    let accel = vmgrid_runtime::qemu::accel::choose(&qemu, &vmgrid_runtime::RuntimeConfig::default_cache_dir());
    let console_sock = scratch.path().join("console.sock");
    let qmp_sock = scratch.path().join("qmp.sock");
    let log_path = opts.state_dir.join("console.log");

    let mut cmd = Command::new(&qemu);
    cmd.args(["-name", &format!("vmgrid-appliance-{name}")])
        .args(["-machine", "pc", "-accel", accel.as_str()])
        .args(["-cpu", if accel == Accel::Kvm { "host" } else { "max" }])
        .args(["-m", &opts.memory_mb.to_string(), "-smp", &opts.cpus.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-no-reboot"])
        .args(["-chardev", &format!("socket,id=console,path={},server=on,wait=off", opt_path(&console_sock))])
        .args(["-serial", "chardev:console"])
        .args(["-qmp", &format!("unix:{},server=on,wait=off", opt_path(&qmp_sock))])
        .args(["-drive", &format!("file={},format=qcow2,if=none,id=boot", opt_path(&overlay))])
        .args(["-device", "virtio-blk-pci,drive=boot,bootindex=0"])
        .args(["-drive", &format!("file={},format=raw,if=none,id=config,readonly=on", opt_path(&config_disk))])
        .args(["-device", "virtio-blk-pci,drive=config"])
        .args(["-netdev", "user,id=net0"])
        .args(["-device", &format!("virtio-net-pci,netdev=net0,mac={}", random_mac())]);
    // QEMU runs under its seccomp sandbox as the user who started it. It does not drop to
    // `nobody` with -runas as job VMs do: a uid change clears PR_SET_PDEATHSIG, and then a killed
    // vmgrid would leave the appliance running in the pool.
    cmd.args(["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]);
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    // SAFETY: the closure runs in the forked child before exec and calls only prctl, getppid and
    // setsid, all async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() == 1 {
                return Err(std::io::Error::other("vmgrid exited before QEMU started"));
            }
            libc::setsid();
            Ok(())
        });
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT, signal_hook::consts::SIGHUP] {
        signal_hook::flag::register(sig, stop.clone())
            .map_err(|e| CliError::Failed(format!("cannot handle signals: {e}")))?;
    }

    eprintln!(
        "vmgrid: booting appliance {name} ({} MiB, {} cpu(s), {}) from {} for the pool at {}",
        opts.memory_mb,
        opts.cpus,
        accel.as_str(),
        image.display(),
        opts.config.pool
    );
    let log = std::fs::File::create(&log_path).map_err(tools::io(format!("cannot create {}", log_path.display())))?;
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| CliError::Failed(format!("cannot start {}: {e}", qemu.display())))?;
    let stderr = collect(child.stderr.take().expect("stderr was piped"));
    let (tx, markers) = mpsc::channel();
    let console = match connect_console(&console_sock, &mut child) {
        Ok(c) => c,
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            return Err(qemu_failed(&stderr, &e));
        }
    };
    let _terminal = if opts.console { Some(attach_stdin(&console)?) } else { None };
    pump_console(console, log, opts.console, tx);
    if !opts.console {
        eprintln!("vmgrid: the console is logged to {} (`--console` shows it here)", log_path.display());
    }

    let drain = Duration::from_secs(opts.config.drain_timeout_s.unwrap_or(30));
    let mut powering_off: Option<(Instant, Instant)> = None; // (deadline, last press)
    let status: ExitStatus = loop {
        if let Some(st) = child.try_wait().map_err(tools::io("waiting for QEMU"))? {
            break st;
        }
        while let Ok(m) = markers.try_recv() {
            report(&name, &m, started);
        }
        let now = Instant::now();
        match powering_off {
            None if stop.load(Ordering::Relaxed) => {
                eprintln!("vmgrid: powering appliance {name} off: it drains, leaves the pool, then stops");
                press_power_button(&qmp_sock);
                powering_off = Some((now + drain + POWER_OFF_MARGIN, now));
            }
            Some((deadline, _)) if now >= deadline => {
                eprintln!(
                    "vmgrid: appliance {name} did not power off within {} s; stopping it (its jobs go back to the pool when their leases expire)",
                    (drain + POWER_OFF_MARGIN).as_secs()
                );
                quit(&qmp_sock, &mut child);
                return Ok(1);
            }
            Some((deadline, last)) if now - last >= PRESS_AGAIN => {
                press_power_button(&qmp_sock);
                powering_off = Some((deadline, now));
            }
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // The console's last words.
    std::thread::sleep(Duration::from_millis(100));
    while let Ok(m) = markers.try_recv() {
        report(&name, &m, started);
    }
    if !status.success() {
        return Err(qemu_failed(&stderr, &format!("QEMU exited with {status}")));
    }
    eprintln!("vmgrid: appliance {name} powered off after {:.1} s", started.elapsed().as_secs_f64());
    Ok(0)
}

/// QEMU's option syntax doubles commas inside values.
fn opt_path(p: &Path) -> String {
    p.to_string_lossy().replace(',', ",,")
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

fn collect(mut from: impl Read + Send + 'static) -> Arc<Mutex<Vec<u8>>> {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        while let Ok(n) = from.read(&mut chunk) {
            if n == 0 {
                break;
            }
            let mut b = b.lock().unwrap();
            if b.len() < 64 << 10 {
                b.extend_from_slice(&chunk[..n]);
            }
        }
    });
    buf
}

fn qemu_failed(stderr: &Mutex<Vec<u8>>, fallback: &str) -> CliError {
    std::thread::sleep(Duration::from_millis(100));
    let msg = String::from_utf8_lossy(&stderr.lock().unwrap()).trim().to_string();
    CliError::Failed(format!("QEMU failed: {}", if msg.is_empty() { fallback } else { &msg }))
}

fn connect_console(path: &Path, child: &mut Child) -> Result<UnixStream, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match UnixStream::connect(path) {
            Ok(s) => return Ok(s),
            Err(e) => {
                if let Ok(Some(st)) = child.try_wait() {
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
fn attach_stdin(console: &UnixStream) -> Result<Terminal, CliError> {
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
fn quit(qmp: &Path, child: &mut Child) {
    let asked = Qmp::connect(qmp, Duration::from_secs(1)).and_then(|mut q| q.execute("quit", serde_json::json!({})));
    let deadline = Instant::now() + Duration::from_secs(3);
    while asked.is_ok() && Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
