//! The example wasm job: reads a text file from the job directory, counts its words, and writes
//! the most frequent ones to an output file. `wordcount INPUT OUTPUT [TOP]`; `$CASE=fold` folds
//! case before counting.

use std::collections::HashMap;
use std::io::Write;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: wordcount INPUT OUTPUT [TOP]");
        std::process::exit(2);
    }
    let top: usize = args.get(3).and_then(|t| t.parse().ok()).unwrap_or(10);
    let fold = std::env::var("CASE").as_deref() == Ok("fold");
    let text = match std::fs::read_to_string(&args[1]) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("wordcount: cannot read {}: {e}", args[1]);
            std::process::exit(1);
        }
    };
    let mut counts: HashMap<String, u64> = HashMap::new();
    let mut total = 0u64;
    for word in text.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty()) {
        let w = if fold { word.to_lowercase() } else { word.to_string() };
        *counts.entry(w).or_default() += 1;
        total += 1;
    }
    let mut ranked: Vec<(String, u64)> = counts.into_iter().collect();
    ranked.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    if let Some(dir) = std::path::Path::new(&args[2]).parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).expect("create the output directory");
        }
    }
    let mut out = std::fs::File::create(&args[2]).expect("create the output file");
    writeln!(out, "words\t{total}").unwrap();
    writeln!(out, "distinct\t{}", ranked.len()).unwrap();
    for (w, n) in ranked.iter().take(top) {
        writeln!(out, "{w}\t{n}").unwrap();
    }
    println!("{total} words, {} distinct; top {} written to {}", ranked.len(), top.min(ranked.len()), args[2]);
}
