//! `vmgrid users`: each user's fair share of the pool, and what an admin sets for a user (a
//! priority factor, a quota of running cpus).

use vmgrid_proto::{UserSettingsRequest, UserView};

use crate::CliError;
use crate::pool_config::PoolArgs;
use crate::term::field;

#[derive(clap::Args, Debug)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "Fair share: the next free slot goes to the user with the lowest effective priority,
  PRIORITY = FACTOR × (recent usage in cpus + the cpus they run now),
where recent usage is their cpu-seconds decayed with the pool's half-life (`vmgrid coordinator
--usage-half-life`, 1 day by default) and divided by half-life/ln 2. Users with equal factors tend
to equal shares of the cpus; a factor twice as large gets half as many. Within one user, jobs go by
their `[policy] priority` (higher first), then oldest first.

Examples:
  vmgrid users                          each user: priority, factor, usage, running, idle, quota
  vmgrid users --json                   the same as JSON (a user sees only themself)
  vmgrid users set alice --max-cpus 8   alice's jobs hold at most 8 cpus at once (admin only)
  vmgrid users set alice --factor 2     alice gets half the share of a factor-1 user
  vmgrid users set alice --no-max-cpus  alice's quota is removed"
)]
pub struct UsersArgs {
    #[command(subcommand)]
    action: Option<UsersAction>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pool: PoolArgs,
}

#[derive(clap::Subcommand, Debug)]
enum UsersAction {
    /// Set a user's priority factor or quota of running cpus (admin only); prints the user.
    Set(SetArgs),
}

#[derive(clap::Args, Debug)]
struct SetArgs {
    /// The user (as their tokens name them; they need not have submitted yet).
    user: String,
    /// The user's priority factor, 0.01 to 1000000 (default 1): their effective priority is
    /// multiplied by it, so 2 gets half the share of 1 and 0.5 twice.
    #[arg(long, value_name = "F")]
    factor: Option<f64>,
    /// The most cpus the user's running jobs may hold at once; their other jobs stay idle, with
    /// the reason in `vmgrid q`.
    #[arg(long, value_name = "N", conflicts_with = "no_max_cpus")]
    max_cpus: Option<u64>,
    /// Remove the user's quota of cpus.
    #[arg(long)]
    no_max_cpus: bool,
    /// Print the user as JSON.
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    pool: PoolArgs,
}

pub fn users(args: UsersArgs) -> Result<i32, CliError> {
    if let Some(UsersAction::Set(set)) = args.action {
        return set_user(set);
    }
    let users = args.pool.client()?.users()?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&users).map_err(|e| CliError::Failed(e.to_string()))?);
        return Ok(0);
    }
    print_table(&users);
    Ok(0)
}

fn set_user(args: SetArgs) -> Result<i32, CliError> {
    let req = UserSettingsRequest {
        user: args.user,
        factor: args.factor,
        max_cpus: args.max_cpus,
        no_max_cpus: args.no_max_cpus,
    };
    // The one validator, before anything is sent.
    req.check().map_err(CliError::BadInput)?;
    let view = args.pool.client()?.set_user(&req)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&view).map_err(|e| CliError::Failed(e.to_string()))?);
    } else {
        print_table(std::slice::from_ref(&view));
    }
    Ok(0)
}

fn print_table(users: &[UserView]) {
    println!(
        "{:<20} {:>9} {:>7} {:>12} {:>7} {:>7} {:>5} {:>6}",
        "USER", "PRIORITY", "FACTOR", "USAGE_CPU_S", "RUNNING", "IDLE", "CPUS", "QUOTA"
    );
    for u in users {
        println!(
            "{:<20} {:>9.2} {:>7} {:>12.1} {:>7} {:>7} {:>5} {:>6}",
            field(&u.user),
            u.priority,
            u.factor,
            u.usage_cpu_s,
            u.running_jobs,
            u.idle_jobs,
            u.running_cpus,
            u.max_cpus.map_or_else(|| "-".to_string(), |m| m.to_string())
        );
    }
}
