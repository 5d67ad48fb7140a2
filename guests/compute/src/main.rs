//! The compute benchmark: a prime sieve and an FNV hash over its result, repeated. The same source
//! is built native and for wasm32-wasip1, so the two timings compare the VM, not the program.
//! `compute [LIMIT] [ROUNDS]`; prints the prime count and a checksum.

fn sieve(limit: usize) -> Vec<bool> {
    let mut is = vec![true; limit + 1];
    is[0] = false;
    if limit >= 1 {
        is[1] = false;
    }
    let mut i = 2;
    while i * i <= limit {
        if is[i] {
            let mut j = i * i;
            while j <= limit {
                is[j] = false;
                j += i;
            }
        }
        i += 1;
    }
    is
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let limit: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(20_000_000);
    let rounds: u32 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(5);
    let mut checksum: u64 = 0xcbf29ce484222325;
    let mut count = 0;
    for _ in 0..rounds {
        let is = sieve(limit);
        count = 0;
        for (n, p) in is.iter().enumerate() {
            if *p {
                count += 1;
                checksum = (checksum ^ n as u64).wrapping_mul(0x100000001b3);
            }
        }
    }
    println!("{count} primes up to {limit}; checksum {checksum:016x}");
}
