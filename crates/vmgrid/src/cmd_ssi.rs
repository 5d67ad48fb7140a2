//! `vmgrid ssi`: the single-system-image console. One shell for the whole pool: its processes
//! (WASI preview-1 modules) run on the pool's nodes, with one process table, one filesystem
//! (`--root`) and this console's stdout and stderr. The console is the processes' home (see
//! vmgrid-ssi); nodes call it, so it must be reachable from them (`--listen`).

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use vmgrid_job::check::is_env_name;
use vmgrid_proto::NodeState;
use vmgrid_ssi::{Home, HomeConfig, ProcState, Root};

use crate::CliError;
use crate::pool_config::{PoolArgs, default_data_dir};

#[derive(clap::Args, Debug)]
#[command(after_help = "Commands at the prompt (or one per line from a pipe):
  run [KEY=VALUE…] PROG.wasm [ARGS…] [&]
                              start a process, with those environment variables (its children
                              inherit them); the pool places it on a node; & runs it in the background
  ps [-a]                     the process table: PID, PPID, NODE, STATE, TIME, COMMAND (-a: ended ones too)
  kill PID…                   stop processes, wherever they run
  wait [PID…]                 wait for background processes (default: all of them)
  ls [PATH] | cat PATH        the single filesystem (the --root directory); links show as NAME -> TARGET
  put LOCAL PATH | get PATH LOCAL
                              copy a file into it / out of it
  info                        the pool as one machine: nodes, total cpus, total memory
  help | exit

PROG is a path in the single filesystem: `put target/wasm32-wasip1/release/fanout.wasm /fanout.wasm`,
then `run /fanout.wasm 8 2000000`. Processes start others with the `vmgrid` import module (spawn,
wait, getpid; see guests/ssi in the source tree). Their `/` is the single filesystem, on every node.

Exit status: that of the last foreground process (or `wait`), 1 if the last command failed.
Leaving the console (exit, or the end of its input) kills the processes still running.

Example:
  printf 'put fanout.wasm /fanout.wasm\\nrun /fanout.wasm 4 1000000\\n' | vmgrid ssi --root /tmp/ssi")]
pub struct SsiArgs {
    #[command(flatten)]
    pub pool: PoolArgs,
    /// The single filesystem: every process sees this directory as `/` [default: DATA_DIR/ssi-root]
    #[arg(long, value_name = "DIR")]
    pub root: Option<PathBuf>,
    /// Where the console listens for its processes' nodes [default: the address that reaches the
    /// pool, on a free port]
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Linear memory each process may use, in MiB.
    #[arg(long, default_value_t = 256, value_name = "MIB")]
    pub process_memory_mb: u64,
}

pub fn ssi(args: SsiArgs) -> Result<i32, CliError> {
    let pool = args.pool.client()?;
    let root_dir = args.root.clone().unwrap_or_else(|| default_data_dir().join("ssi-root"));
    let root = Root::new(&root_dir)
        .map_err(|e| CliError::BadInput(format!("cannot use {} as the SSI root: {e}", root_dir.display())))?;
    let listen = match args.listen {
        Some(a) => a,
        None => facing_address(pool.url()).map_err(CliError::Failed)?,
    };
    let stdout_lock = Arc::new(std::sync::Mutex::new(()));
    let lock = stdout_lock.clone();
    let output: vmgrid_ssi::OutputSink = Box::new(move |_pid, fd, bytes| {
        let _g = lock.lock();
        if fd == 2 {
            let mut e = std::io::stderr().lock();
            let _ = e.write_all(bytes);
            let _ = e.flush();
        } else {
            let mut o = std::io::stdout().lock();
            let _ = o.write_all(bytes);
            let _ = o.flush();
        }
    });
    let home = Home::start(HomeConfig { root, listen, process_memory_mb: args.process_memory_mb, output }, pool)
        .map_err(|e| CliError::Failed(e.to_string()))?;
    // Checks the pool and the token before the first command.
    let nodes = home.pool().nodes().map_err(|e| CliError::Failed(format!("cannot reach the pool: {e}")))?;
    let interactive = std::io::stdin().is_terminal();
    if interactive {
        let ready = nodes.iter().filter(|n| n.state == NodeState::Ready).count();
        eprintln!(
            "vmgrid ssi: one machine of {ready} node(s); files in {}; home at {}. Type `help`.",
            home.root.dir().display(),
            home.url()
        );
    }
    let interrupted = Arc::new(AtomicBool::new(false));
    let waiting = Arc::new(AtomicBool::new(false));
    watch_signals(home.clone(), interrupted.clone(), waiting.clone())?;
    let mut console = Console { home: home.clone(), status: 0, interrupted, waiting, out: stdout_lock };
    let result = if interactive { console.repl_terminal() } else { console.repl_pipe() };
    console.announce();
    let left = home.shutdown();
    if left > 0 {
        eprintln!("vmgrid ssi: the console is closing; killed {left} running process(es)");
    }
    result.map(|()| console.status)
}

/// Ctrl-C while the console waits for a process stops the process; otherwise (and on SIGTERM or
/// SIGHUP) the console ends, killing its processes first, so none is left without its home.
fn watch_signals(home: Arc<Home>, interrupted: Arc<AtomicBool>, waiting: Arc<AtomicBool>) -> Result<(), CliError> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| CliError::Failed(format!("cannot handle signals: {e}")))?;
    std::thread::Builder::new()
        .name("vmgrid-ssi-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                if sig == SIGINT && waiting.load(Ordering::Relaxed) {
                    interrupted.store(true, Ordering::Relaxed);
                    continue;
                }
                let left = home.shutdown();
                eprintln!("\nvmgrid ssi: stopped by a signal; killed {left} running process(es)");
                std::process::exit(128 + sig);
            }
        })
        .map_err(|e| CliError::Failed(format!("cannot handle signals: {e}")))?;
    Ok(())
}

/// The address of this host that faces the pool (loopback for a pool on loopback), port 0.
fn facing_address(pool_url: &str) -> Result<SocketAddr, String> {
    let hostport = pool_url.split("://").nth(1).unwrap_or(pool_url).split('/').next().unwrap_or_default();
    let target = hostport
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve the pool's address {hostport}: {e}"))?
        .next()
        .ok_or_else(|| format!("the pool's address {hostport} resolves to nothing"))?;
    if target.ip().is_loopback() {
        return Ok(SocketAddr::new(target.ip(), 0));
    }
    let bind = if target.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" };
    let sock = UdpSocket::bind(bind).map_err(|e| format!("cannot find this host's address: {e}"))?;
    sock.connect(target).map_err(|e| format!("no route to the pool at {target}: {e}"))?;
    let local = sock.local_addr().map_err(|e| format!("cannot find this host's address: {e}"))?;
    Ok(SocketAddr::new(local.ip(), 0))
}

struct Console {
    home: Arc<Home>,
    /// The status of the last command, as `$?`.
    status: i32,
    interrupted: Arc<AtomicBool>,
    /// The console is waiting for a process: Ctrl-C is for it.
    waiting: Arc<AtomicBool>,
    out: Arc<std::sync::Mutex<()>>,
}

enum Flow {
    Continue,
    Exit,
}

impl Console {
    fn repl_pipe(&mut self) -> Result<(), CliError> {
        for line in std::io::stdin().lock().lines() {
            let line = line.map_err(|e| CliError::Failed(format!("cannot read the console's input: {e}")))?;
            if let Flow::Exit = self.line(&line) {
                break;
            }
        }
        Ok(())
    }

    fn repl_terminal(&mut self) -> Result<(), CliError> {
        let mut editor = rustyline::DefaultEditor::new()
            .map_err(|e| CliError::Failed(format!("cannot set up the terminal: {e}")))?;
        loop {
            self.announce();
            match editor.readline("vmgrid ssi> ") {
                Ok(line) => {
                    let _ = editor.add_history_entry(line.as_str());
                    if let Flow::Exit = self.line(&line) {
                        return Ok(());
                    }
                }
                Err(rustyline::error::ReadlineError::Interrupted) => continue,
                Err(rustyline::error::ReadlineError::Eof) => return Ok(()),
                Err(e) => return Err(CliError::Failed(format!("cannot read the terminal: {e}"))),
            }
        }
    }

    /// Reports background processes of the console that have ended since the last prompt.
    fn announce(&self) {
        for p in self.home.ps(false) {
            if p.ppid == 0 && p.state.ended() {
                self.home.reap(p.pid);
                eprintln!("[{}] {}", p.pid, describe_end(&p.state));
            }
        }
    }

    fn line(&mut self, line: &str) -> Flow {
        self.announce();
        let words = match split_words(line) {
            Ok(w) => w,
            Err(e) => return self.fail(e),
        };
        let Some((cmd, rest)) = words.split_first() else { return Flow::Continue };
        let rest: Vec<&str> = rest.iter().map(String::as_str).collect();
        match (cmd.as_str(), rest.as_slice()) {
            ("run", []) => self.fail("usage: run [KEY=VALUE…] PROG.wasm [ARGS…] [&]".into()),
            ("run", argv) => self.run(argv),
            ("ps", []) => self.ps(false),
            ("ps", ["-a"]) => self.ps(true),
            ("kill", pids) if !pids.is_empty() => self.kill(pids),
            ("wait", pids) => self.wait(pids),
            ("ls", []) => self.ls("/"),
            ("ls", [p]) => self.ls(p),
            ("cat", [p]) => self.cat(p),
            ("put", [local, p]) => self.put(local, p),
            ("get", [p, local]) => self.get(p, local),
            ("info", []) => self.info(),
            ("help", []) => {
                self.print("commands: run [KEY=VALUE…] PROG.wasm [ARGS…] [&] | ps [-a] | kill PID… | wait [PID…] | ls [PATH] | cat PATH | put LOCAL PATH | get PATH LOCAL | info | exit\n");
                self.ok()
            }
            ("exit" | "quit", []) => Flow::Exit,
            (c, _) if c.starts_with('#') => Flow::Continue,
            ("ps" | "kill" | "ls" | "cat" | "put" | "get" | "info" | "help" | "exit", _) => {
                self.fail(format!("{cmd}: wrong arguments; type `help`"))
            }
            _ => self.fail(format!("{cmd}: unknown command; type `help`")),
        }
    }

    fn print(&self, text: &str) {
        let _g = self.out.lock();
        let mut o = std::io::stdout().lock();
        let _ = o.write_all(text.as_bytes());
        let _ = o.flush();
    }

    fn ok(&mut self) -> Flow {
        self.status = 0;
        Flow::Continue
    }

    fn fail(&mut self, message: String) -> Flow {
        eprintln!("vmgrid ssi: {message}");
        self.status = 1;
        Flow::Continue
    }

    fn run(&mut self, argv: &[&str]) -> Flow {
        let (argv, background) = match argv.split_last() {
            Some((&"&", rest)) if !rest.is_empty() => (rest, true),
            _ => (argv, false),
        };
        let (env, argv) = split_env(argv);
        if argv.is_empty() {
            return self
                .fail("run: no program after the environment; usage: run [KEY=VALUE…] PROG.wasm [ARGS…] [&]".into());
        }
        if let Some((k, v)) = env.iter().find(|(_, v)| v.contains('\0')) {
            return self.fail(format!("run: the value of {k} ({v:?}) may not contain a NUL byte"));
        }
        let pid = match self.home.spawn_with_env(0, argv, env) {
            Ok(pid) => pid,
            Err(e) => return self.fail(e.message),
        };
        if background {
            self.print(&format!("[{pid}]\n"));
            return self.ok();
        }
        // Foreground: Ctrl-C kills the process, not the console.
        self.interrupted.store(false, Ordering::Relaxed);
        self.waiting.store(true, Ordering::Relaxed);
        let state = loop {
            if let Some(s) = self.home.wait_ended(pid, Some(Duration::from_millis(100))) {
                break s;
            }
            if self.interrupted.swap(false, Ordering::Relaxed) {
                let _ = self.home.kill(pid);
            }
        };
        self.waiting.store(false, Ordering::Relaxed);
        self.home.reap(pid);
        if !matches!(state, ProcState::Exited(0)) {
            eprintln!("[{pid}] {}", describe_end(&state));
        }
        self.status = state.status().unwrap_or(1);
        Flow::Continue
    }

    fn ps(&mut self, all: bool) -> Flow {
        let mut text =
            format!("{:>6} {:>6} {:<16} {:<10} {:>9}  {}\n", "PID", "PPID", "NODE", "STATE", "TIME", "COMMAND");
        for p in self.home.ps(all) {
            let t = p.cpu_time().as_secs_f64();
            text.push_str(&format!(
                "{:>6} {:>6} {:<16} {:<10} {:>6}:{:04.1}  {}\n",
                p.pid,
                p.ppid,
                p.node.as_deref().unwrap_or("-"),
                p.state.name(),
                (t / 60.0) as u64,
                t % 60.0,
                p.argv.join(" ")
            ));
        }
        self.print(&text);
        self.ok()
    }

    fn kill(&mut self, pids: &[&str]) -> Flow {
        let mut failed = None;
        for p in pids {
            match p.parse::<u64>() {
                Ok(pid) => {
                    if let Err(e) = self.home.kill(pid) {
                        failed = Some(e);
                    }
                }
                Err(_) => failed = Some(format!("kill: `{p}` is not a PID")),
            }
        }
        match failed {
            Some(e) => self.fail(e),
            None => self.ok(),
        }
    }

    fn wait(&mut self, pids: &[&str]) -> Flow {
        let targets: Vec<u64> = if pids.is_empty() {
            self.home.ps(false).iter().filter(|p| p.ppid == 0).map(|p| p.pid).collect()
        } else {
            let mut v = Vec::new();
            for p in pids {
                match p.parse::<u64>() {
                    Ok(pid) if self.home.process(pid).is_some_and(|p| p.ppid == 0) => v.push(pid),
                    _ => return self.fail(format!("wait: {p}: not a process of this console")),
                }
            }
            v
        };
        self.interrupted.store(false, Ordering::Relaxed);
        let mut status = 0;
        for pid in targets {
            self.waiting.store(true, Ordering::Relaxed);
            let state = loop {
                if let Some(s) = self.home.wait_ended(pid, Some(Duration::from_millis(100))) {
                    break s;
                }
                if self.interrupted.swap(false, Ordering::Relaxed) {
                    self.waiting.store(false, Ordering::Relaxed);
                    return self.fail("wait: interrupted".into());
                }
            };
            self.waiting.store(false, Ordering::Relaxed);
            self.home.reap(pid);
            eprintln!("[{pid}] {}", describe_end(&state));
            status = state.status().unwrap_or(1);
        }
        self.status = status;
        Flow::Continue
    }

    fn ls(&mut self, path: &str) -> Flow {
        match self.home.root.fetch(path, None) {
            Ok(vmgrid_ssi::fs::Fetch::Dir(entries)) => {
                let mut text = String::new();
                for e in entries {
                    text.push_str(&e.name);
                    match &e.link {
                        Some(target) => text.push_str(&format!(" -> {target}\n")),
                        None => text.push_str(if e.dir { "/\n" } else { "\n" }),
                    }
                }
                self.print(&text);
                self.ok()
            }
            Ok(_) => {
                self.print(&format!("{path}\n"));
                self.ok()
            }
            Err(e) => self.fail(format!("ls: {path}: {}", vmgrid_ssi::fs::describe(e))),
        }
    }

    fn cat(&mut self, path: &str) -> Flow {
        match self.home.root.fetch(path, None) {
            Ok(vmgrid_ssi::fs::Fetch::File { bytes, .. }) => {
                {
                    let _g = self.out.lock();
                    let mut o = std::io::stdout().lock();
                    let _ = o.write_all(&bytes);
                    let _ = o.flush();
                }
                self.ok()
            }
            Ok(_) => self.fail(format!("cat: {path}: is a directory")),
            Err(e) => self.fail(format!("cat: {path}: {}", vmgrid_ssi::fs::describe(e))),
        }
    }

    fn put(&mut self, local: &str, path: &str) -> Flow {
        let bytes = match std::fs::read(local) {
            Ok(b) => b,
            Err(e) => return self.fail(format!("put: cannot read {local}: {e}")),
        };
        match self.home.root.store(path, &bytes) {
            Ok(_) => self.ok(),
            Err(e) => self.fail(format!("put: {path}: {}", vmgrid_ssi::fs::describe(e))),
        }
    }

    fn get(&mut self, path: &str, local: &str) -> Flow {
        match self.home.root.fetch(path, None) {
            Ok(vmgrid_ssi::fs::Fetch::File { bytes, .. }) => match std::fs::write(local, bytes) {
                Ok(()) => self.ok(),
                Err(e) => self.fail(format!("get: cannot write {local}: {e}")),
            },
            Ok(_) => self.fail(format!("get: {path}: is a directory")),
            Err(e) => self.fail(format!("get: {path}: {}", vmgrid_ssi::fs::describe(e))),
        }
    }

    fn info(&mut self) -> Flow {
        let nodes = match self.home.pool().nodes() {
            Ok(n) => n,
            Err(e) => return self.fail(format!("info: cannot reach the pool: {e}")),
        };
        let ready: Vec<_> = nodes.iter().filter(|n| n.state == NodeState::Ready).collect();
        let cpus: u64 = ready.iter().map(|n| n.ad.cpus as u64).sum();
        let mem: u64 = ready.iter().map(|n| n.ad.memory_mb).sum();
        let live = self.home.ps(false).iter().filter(|p| !p.state.ended()).count();
        let mut text =
            format!("machine: {} node(s), {cpus} cpu(s), {mem} MiB memory; {live} process(es) running\n", ready.len());
        text.push_str(&format!("{:<20} {:>5} {:>10} {:>8}\n", "NODE", "CPUS", "MEMORY_MB", "RUNNING"));
        for n in ready {
            text.push_str(&format!(
                "{:<20} {:>5} {:>10} {:>8}\n",
                n.ad.name, n.ad.cpus, n.ad.memory_mb, n.running_jobs
            ));
        }
        self.print(&text);
        self.ok()
    }
}

fn describe_end(state: &ProcState) -> String {
    match state {
        ProcState::Exited(c) => format!("done, exit {c}"),
        ProcState::Failed(c, why) => format!("failed (status {c}): {why}"),
        ProcState::Killed => "killed".into(),
        other => other.name(),
    }
}

/// The leading `NAME=VALUE` words of a command (its environment, as a shell takes them) and the
/// rest. A word whose part before `=` is not a variable name starts the command.
fn split_env(words: &[&str]) -> (BTreeMap<String, String>, Vec<String>) {
    let n = words.iter().take_while(|w| w.split_once('=').is_some_and(|(k, _)| is_env_name(k))).count();
    let env = words[..n].iter().filter_map(|w| w.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect();
    (env, words[n..].iter().map(|w| w.to_string()).collect())
}

/// Splits a command line into words: whitespace separates, '…' and "…" quote, \ escapes.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            '\'' | '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some(q) if q == c => break,
                        Some('\\') if c == '"' => cur.extend(chars.next()),
                        Some(ch) => cur.push(ch),
                        None => return Err(format!("unterminated {c}quote{c}")),
                    }
                }
            }
            '\\' => {
                in_word = true;
                cur.extend(chars.next());
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

#[cfg(test)]
mod tests {
    use super::{split_env, split_words};

    #[test]
    fn leading_assignments_are_the_environment() {
        let (env, argv) = split_env(&["MODE=fast", "EMPTY=", "/p.wasm", "X=1"]);
        assert_eq!(env.into_iter().collect::<Vec<_>>(), [("EMPTY".into(), "".into()), ("MODE".into(), "fast".into())]);
        assert_eq!(argv, ["/p.wasm", "X=1"]);
        let (env, argv) = split_env(&["1X=y", "/p.wasm"]);
        assert!(env.is_empty());
        assert_eq!(argv, ["1X=y", "/p.wasm"]);
        assert!(split_env(&["A=b"]).1.is_empty());
    }

    #[test]
    fn words_split_like_a_shell() {
        assert_eq!(
            split_words("run /a.wasm  'x y' \"q\\\"z\" b\\ c &").unwrap(),
            ["run", "/a.wasm", "x y", "q\"z", "b c", "&"]
        );
        assert_eq!(split_words("  ").unwrap(), Vec::<String>::new());
        assert!(split_words("cat 'open").is_err());
    }
}
