//! `vmgrid net`: the pool's virtual network (`network = "grid"`) as the nodes last said: each
//! node's WireGuard key and UDP endpoint (as the pool's reflector saw it), and how it reaches each
//! node it has a tunnel with: `direct` (UDP through both NATs), `relay` (through the pool) or
//! `connecting`.

use crate::CliError;
use crate::cmd_jobs::print_json;
use crate::pool_config::PoolArgs;
use crate::term::field;

#[derive(clap::Args, Debug)]
pub struct NetArgs {
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pool: PoolArgs,
}

pub fn net(args: NetArgs) -> Result<i32, CliError> {
    let views = args.pool.client()?.net()?;
    if args.json {
        print_json(&views)?;
        return Ok(0);
    }
    println!("{:<16} {:<22} {:<10} NODE KEY", "NODE", "ENDPOINT", "");
    for v in &views {
        let endpoint = v.endpoint.as_deref().unwrap_or("-");
        println!(
            "{:<16} {:<22} {:<10} {}…",
            field(&v.node),
            field(endpoint),
            "",
            &field(&v.key)[..12.min(v.key.len())]
        );
    }
    println!();
    println!("{:<16} {:<16} {:<10} {:>12} {:>12}", "FROM", "TO", "PATH", "TX_BYTES", "RX_BYTES");
    for v in &views {
        for p in &v.paths {
            println!(
                "{:<16} {:<16} {:<10} {:>12} {:>12}",
                field(&v.node),
                field(&p.node),
                p.path.as_str(),
                p.tx_bytes,
                p.rx_bytes
            );
        }
    }
    Ok(0)
}
