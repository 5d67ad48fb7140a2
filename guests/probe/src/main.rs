//! The contract test guest. Each argument is one action, run in order:
//!   args                print the args after it, stop   env:NAME    print $NAME
//!   write:PATH:TEXT     write a file (parents made)     read:PATH   print a file, or "denied: …"
//!   ls:PATH             print the entries of a dir      cwd         print the working directory
//!   alloc:MB            allocate and touch MB MiB       flood:MB    write MB MiB to stdout
//!   spin                loop forever                    stderr:TEXT print TEXT to stderr
//!   sleep:MS            sleep MS milliseconds
//!   exit:N              exit with N                      panic       panic (a trap under wasm)

use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    for action in &args[1..] {
        let (verb, rest) = action.split_once(':').unwrap_or((action.as_str(), ""));
        match verb {
            "args" => {
                // Prints the arguments after this one and stops.
                let at = args.iter().position(|a| a == "args").unwrap();
                for a in &args[at + 1..] {
                    println!("{a}");
                }
                return;
            }
            "env" => println!("{}", std::env::var(rest).unwrap_or_else(|_| "<unset>".into())),
            "write" => {
                let (path, text) = rest.split_once(':').expect("write:PATH:TEXT");
                if let Some(dir) = std::path::Path::new(path).parent() {
                    std::fs::create_dir_all(dir).unwrap();
                }
                std::fs::write(path, text).unwrap();
            }
            "read" => match std::fs::read_to_string(rest) {
                Ok(t) => println!("{t}"),
                Err(e) => println!("denied: {e}"),
            },
            "ls" => match std::fs::read_dir(rest) {
                Ok(entries) => {
                    let mut names: Vec<String> = entries.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
                    names.sort();
                    println!("{}", names.join(" "));
                }
                Err(e) => println!("denied: {e}"),
            },
            "cwd" => println!("{}", std::env::current_dir().map(|d| d.display().to_string()).unwrap_or_else(|e| e.to_string())),
            "alloc" => {
                let mb: usize = rest.parse().unwrap();
                let mut v: Vec<u8> = Vec::new();
                if v.try_reserve_exact(mb << 20).is_err() {
                    eprintln!("alloc: out of memory");
                    std::process::exit(99);
                }
                v.resize(mb << 20, 1);
                println!("allocated {}", v.iter().map(|&b| b as usize).sum::<usize>() >> 20);
            }
            "flood" => {
                let mb: usize = rest.parse().unwrap();
                let chunk = vec![b'x'; 64 * 1024];
                let mut out = std::io::stdout().lock();
                for _ in 0..mb * 16 {
                    out.write_all(&chunk).unwrap();
                }
            }
            "fill" => {
                // Writes to the file until the VM is stopped or the write fails.
                let chunk = vec![b'f'; 1 << 20];
                let mut f = std::fs::File::create(rest).unwrap();
                while f.write_all(&chunk).and_then(|_| f.flush()).is_ok() {}
                eprintln!("fill: a write failed");
            }
            "spin" => {
                let mut x: u64 = 0;
                loop {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
            }
            "stderr" => eprintln!("{rest}"),
            "sleep" => std::thread::sleep(std::time::Duration::from_millis(rest.parse().unwrap())),
            "exit" => std::process::exit(rest.parse().unwrap()),
            "panic" => panic!("the probe was asked to panic"),
            other => {
                eprintln!("probe: unknown action {other}");
                std::process::exit(64);
            }
        }
    }
}
