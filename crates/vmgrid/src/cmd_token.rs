//! `vmgrid token`: an admin makes a user's token (printed once; the pool keeps only its hash),
//! lists the pool's tokens by id, or revokes one.

use vmgrid_proto::Role;

use crate::CliError;
use crate::pool_config::PoolArgs;
use crate::term::field;

#[derive(clap::Args, Debug)]
#[command(after_help = "Examples:\n  \
vmgrid token alice                 a token for user alice (printed once; keep it private)\n  \
vmgrid token alice --ttl 30d       one that stops working after 30 days\n  \
vmgrid token alice --out alice.token   written to a new file only you can read (0600)\n  \
vmgrid token --list                every token: id, role, owner, created, expires\n  \
vmgrid token --revoke 3f9a1c0b2e47 that token stops working at once")]
pub struct TokenArgs {
    /// The user the new token acts for.
    #[arg(required_unless_present_any = ["revoke", "list"])]
    user: Option<String>,
    /// Make an admin token instead of a user token.
    #[arg(long)]
    admin: bool,
    /// The token stops working after this long: 90s, 45m, 12h, 30d, 1y (default: until revoked).
    #[arg(long, value_name = "DURATION")]
    ttl: Option<String>,
    /// Write the new token to this file (created, mode 0600; an existing file is not replaced)
    /// instead of printing it.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["revoke", "list"])]
    out: Option<std::path::PathBuf>,
    /// Revoke the token with this id (from `--list` or from when it was made).
    #[arg(long, value_name = "ID", conflicts_with_all = ["user", "list", "ttl", "admin"])]
    revoke: Option<String>,
    /// List the pool's tokens (never their secrets).
    #[arg(long, conflicts_with_all = ["user", "ttl", "admin"])]
    list: bool,
    /// With --list: JSON.
    #[arg(long, requires = "list")]
    json: bool,
    #[command(flatten)]
    pool: PoolArgs,
}

/// Seconds in `90s`, `45m`, `12h`, `30d`, `1y` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = num.parse().map_err(|_| format!("`{s}` is not a duration like 90s, 45m, 12h, 30d or 1y"))?;
    let per = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        "y" => 365 * 86_400,
        other => return Err(format!("unknown unit `{other}` in `{s}`: use s, m, h, d, w or y")),
    };
    n.checked_mul(per).filter(|&t| t > 0).ok_or_else(|| format!("`{s}` is not a duration of at least one second"))
}

fn when(ms: u64) -> String {
    let secs = ms / 1000;
    let days = secs / 86_400;
    // Days since the epoch to a civil date (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}Z", (secs % 86_400) / 3600, (secs % 3600) / 60)
}

pub fn token(args: TokenArgs) -> Result<i32, CliError> {
    let client = args.pool.client()?;
    if let Some(id) = &args.revoke {
        client.revoke_token(id)?;
        eprintln!("vmgrid: token {id} is revoked");
        return Ok(0);
    }
    if args.list {
        let tokens = client.tokens()?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&tokens).map_err(|e| CliError::Failed(e.to_string()))?);
            return Ok(0);
        }
        println!("{:<20} {:<8} {:<20} {:<18} EXPIRES", "ID", "ROLE", "OWNER", "CREATED");
        for t in &tokens {
            let expires = t.expires_ms.map(when).unwrap_or_else(|| "never".into());
            println!("{:<20} {:<8} {:<20} {:<18} {expires}", t.id, t.role, field(&t.owner), when(t.created_ms));
        }
        return Ok(0);
    }
    let user = args.user.expect("clap requires a user without --revoke or --list");
    let ttl = args.ttl.as_deref().map(parse_duration).transpose().map_err(CliError::BadInput)?;
    let role = if args.admin { Role::Admin } else { Role::User };
    // The file is made before the token, so a path that cannot be written costs no token.
    let file = args.out.as_deref().map(new_private_file).transpose()?;
    let t = match client.add_token(role, &user, ttl) {
        Ok(t) => t,
        Err(e) => {
            if let Some(path) = &args.out {
                let _ = std::fs::remove_file(path);
            }
            return Err(e.into());
        }
    };
    match (file, &args.out) {
        (Some(mut f), Some(path)) => {
            use std::io::Write;
            f.write_all(format!("{}\n", t.token).as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| CliError::Failed(format!("cannot write {}: {e}", path.display())))?;
        }
        _ => println!("{}", t.token),
    }
    let expires = t.expires_ms.map(|e| format!(", expires {}", when(e))).unwrap_or_default();
    eprintln!("vmgrid: token {} for {user}{expires}; revoke it with `vmgrid token --revoke {}`", t.id, t.id);
    Ok(0)
}

/// A new file only its owner can read or write.
fn new_private_file(path: &std::path::Path) -> Result<std::fs::File, CliError> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(|e| {
        let hint = if e.kind() == std::io::ErrorKind::AlreadyExists {
            ": it exists; remove it or pick another name"
        } else {
            ""
        };
        CliError::BadInput(format!("cannot create {}: {e}{hint}", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_dates() {
        assert_eq!(parse_duration("90s"), Ok(90));
        assert_eq!(parse_duration("30d"), Ok(30 * 86_400));
        assert_eq!(parse_duration("45"), Ok(45));
        assert!(parse_duration("0d").is_err());
        assert!(parse_duration("3 fortnights").is_err());
        assert_eq!(when(0), "1970-01-01 00:00Z");
        assert_eq!(when(1_796_169_600_000), "2026-12-02 00:00Z");
    }
}
