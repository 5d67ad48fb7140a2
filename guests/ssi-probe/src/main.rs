//! The SSI test guest. Each argument is one action, run in order:
//!   spawn:PROG[,ARG…]   spawn a child; print "spawned PID" or "spawn PROG: errno …"
//!   wait                wait for the last child; print "child PID status S"
//!   waitall             wait for every child, in order, printing as `wait` does
//!   getpid              print "pid N"
//!   write:PATH:TEXT     write a file          read:PATH   print a file, or "error: …"
//!   exists:PATH         print "yes" or "no"   rm:PATH     remove a file
//!   mv:FROM:TO          rename                ls:PATH     print the sorted entries of a dir
//!   opens:PATH:N        open and close PATH for reading N times; print the mean µs per pair
//!   writes:PATH:N       write and close PATH N times; print the mean µs per pair
//!   excl:PATH           create PATH exclusively; print "created" or "error: …"
//!   symlink:TARGET:LINK make a symbolic link; print "linked" or "error: …"
//!   leak:PATH:TEXT      write PATH and exit without closing it
//!   renameopen:TMP:DST  write TMP, rename it to DST while open, write more, then close
//!   spin                loop forever          exit:N      exit with N
//!   panic               trap

use std::io::Read;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mut children = Vec::new();
    for action in &args[1..] {
        let (verb, rest) = action.split_once(':').unwrap_or((action.as_str(), ""));
        match verb {
            "spawn" => {
                let argv: Vec<&str> = rest.split(',').collect();
                match vmgrid_ssi::spawn(&argv) {
                    Ok(pid) => {
                        println!("spawned {pid}");
                        children.push(pid);
                    }
                    Err(e) => println!("spawn {}: {e}", argv[0]),
                }
            }
            "wait" => match children.pop() {
                Some(pid) => wait(pid),
                None => println!("no child to wait for"),
            },
            "waitall" => {
                for pid in children.drain(..) {
                    wait(pid);
                }
            }
            "getpid" => println!("pid {}", vmgrid_ssi::getpid()),
            "write" => {
                let (path, text) = rest.split_once(':').expect("write:PATH:TEXT");
                if let Err(e) = std::fs::write(path, text) {
                    println!("error: {e}");
                }
            }
            "read" => match std::fs::read_to_string(rest) {
                Ok(t) => println!("{t}"),
                Err(e) => println!("error: {e}"),
            },
            "exists" => println!("{}", if std::path::Path::new(rest).exists() { "yes" } else { "no" }),
            "rm" => {
                if let Err(e) = std::fs::remove_file(rest) {
                    println!("error: {e}");
                }
            }
            "mv" => {
                let (from, to) = rest.split_once(':').expect("mv:FROM:TO");
                if let Err(e) = std::fs::rename(from, to) {
                    println!("error: {e}");
                }
            }
            "ls" => match std::fs::read_dir(rest) {
                Ok(entries) => {
                    let mut names: Vec<String> =
                        entries.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned())).collect();
                    names.sort();
                    println!("{}", names.join(" "));
                }
                Err(e) => println!("error: {e}"),
            },
            "opens" => {
                let (path, n) = rest.rsplit_once(':').expect("opens:PATH:N");
                let n: u32 = n.parse().expect("a count");
                let start = std::time::Instant::now();
                let mut buf = Vec::new();
                for _ in 0..n {
                    buf.clear();
                    std::fs::File::open(path).and_then(|mut f| f.read_to_end(&mut buf)).expect("open");
                }
                println!("open+close {:.1} us", start.elapsed().as_secs_f64() * 1e6 / n as f64);
            }
            "writes" => {
                let (path, n) = rest.rsplit_once(':').expect("writes:PATH:N");
                let n: u32 = n.parse().expect("a count");
                let start = std::time::Instant::now();
                for i in 0..n {
                    std::fs::write(path, format!("{i}\n")).expect("write");
                }
                println!("write+close {:.1} us", start.elapsed().as_secs_f64() * 1e6 / n as f64);
            }
            "excl" => match std::fs::OpenOptions::new().write(true).create_new(true).open(rest) {
                Ok(_) => println!("created"),
                Err(e) => println!("error: {e}"),
            },
            "symlink" => {
                let (target, link) = rest.split_once(':').expect("symlink:TARGET:LINK");
                match symlink(target, link.trim_start_matches('/')) {
                    0 => println!("linked"),
                    e => println!("error: errno {e}"),
                }
            }
            "leak" => {
                let (path, text) = rest.split_once(':').expect("leak:PATH:TEXT");
                let mut f = std::fs::File::create(path).expect("create");
                std::io::Write::write_all(&mut f, text.as_bytes()).expect("write");
                std::mem::forget(f);
            }
            "renameopen" => {
                let (tmp, dst) = rest.split_once(':').expect("renameopen:TMP:DST");
                let mut f = std::fs::File::create(tmp).expect("create");
                std::io::Write::write_all(&mut f, b"first ").expect("write");
                if let Err(e) = std::fs::rename(tmp, dst) {
                    println!("error: {e}");
                }
                std::io::Write::write_all(&mut f, b"second").expect("write");
                drop(f);
            }
            "spin" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "exit" => std::process::exit(rest.parse().expect("an exit code")),
            "panic" => panic!("the ssi probe was asked to panic"),
            other => {
                eprintln!("ssi-probe: unknown action {other}");
                std::process::exit(64);
            }
        }
    }
}

fn wait(pid: vmgrid_ssi::Pid) {
    match vmgrid_ssi::wait(pid) {
        Ok(s) => println!("child {pid} status {s}"),
        Err(e) => println!("wait {pid}: {e}"),
    }
}

#[cfg(target_arch = "wasm32")]
fn symlink(target: &str, link: &str) -> u16 {
    #[link(wasm_import_module = "wasi_snapshot_preview1")]
    unsafe extern "C" {
        fn path_symlink(old: *const u8, old_len: usize, fd: u32, new: *const u8, new_len: usize) -> u16;
    }
    // SAFETY: both strings are live for the call; descriptor 3 is the preopened root.
    unsafe { path_symlink(target.as_ptr(), target.len(), 3, link.as_ptr(), link.len()) }
}

#[cfg(not(target_arch = "wasm32"))]
fn symlink(_target: &str, _link: &str) -> u16 {
    52
}
