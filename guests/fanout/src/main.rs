//! Counts the primes below LIMIT by fanning out over a vmgrid single-system image:
//!
//!   vmgrid ssi> run /fanout.wasm 8 2000000
//!   primes below 2000000: 148933 (8 processes)
//!
//! The parent splits [2, LIMIT) into PARTS ranges of about equal work and spawns one child per
//! range (the same module, with `--child`). The pool's matchmaker places the children across the
//! nodes. Each child writes its count to /fanout-out/part-K; the parent waits for every child, then
//! reads the files its children wrote on other nodes and adds them up. A child that fails makes the
//! parent exit 1.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("--child") {
        return child(&args[2..]);
    }
    let parts: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(4);
    let limit: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    if parts == 0 || limit < 2 {
        eprintln!("usage: fanout [PARTS >= 1] [LIMIT >= 2]");
        return ExitCode::from(2);
    }
    let me = &args[0];
    if let Err(e) = std::fs::create_dir_all("/fanout-out") {
        eprintln!("fanout: cannot create /fanout-out: {e}");
        return ExitCode::FAILURE;
    }
    let mut children = Vec::new();
    for k in 0..parts {
        let (lo, hi) = (bound(k, parts, limit), bound(k + 1, parts, limit));
        let argv = [me.clone(), "--child".into(), lo.to_string(), hi.to_string(), format!("/fanout-out/part-{k}")];
        match vmgrid_ssi::spawn(&argv) {
            Ok(pid) => children.push((pid, k)),
            Err(e) => {
                eprintln!("fanout: cannot spawn part {k}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut total = 0u64;
    for (pid, k) in children {
        match vmgrid_ssi::wait(pid) {
            Ok(0) => {}
            Ok(status) => {
                eprintln!("fanout: part {k} (pid {pid}) exited with {status}");
                return ExitCode::FAILURE;
            }
            Err(e) => {
                eprintln!("fanout: wait for pid {pid}: {e}");
                return ExitCode::FAILURE;
            }
        }
        let path = format!("/fanout-out/part-{k}");
        match std::fs::read_to_string(&path).map(|s| s.trim().parse::<u64>()) {
            Ok(Ok(n)) => total += n,
            other => {
                eprintln!("fanout: cannot read {path}: {other:?}");
                return ExitCode::FAILURE;
            }
        }
    }
    println!("primes below {limit}: {total} ({parts} processes)");
    ExitCode::SUCCESS
}

fn child(args: &[String]) -> ExitCode {
    let (Some(lo), Some(hi), Some(out)) =
        (args.first().and_then(|a| a.parse::<u64>().ok()), args.get(1).and_then(|a| a.parse::<u64>().ok()), args.get(2))
    else {
        eprintln!("usage: fanout --child LO HI OUT");
        return ExitCode::from(2);
    };
    let count = (lo..hi).filter(|&n| is_prime(n)).count();
    match std::fs::write(out, format!("{count}\n")) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanout: cannot write {out}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The start of part `k`: trial division costs about sqrt(n) per prime, so the work below x grows
/// as x^1.5; parts of equal work split at LIMIT * (k/PARTS)^(2/3).
fn bound(k: u64, parts: u64, limit: u64) -> u64 {
    if k >= parts {
        return limit;
    }
    2 + ((limit - 2) as f64 * (k as f64 / parts as f64).powf(2.0 / 3.0)) as u64
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n % d == 0 {
            return false;
        }
        d += 1;
    }
    true
}
