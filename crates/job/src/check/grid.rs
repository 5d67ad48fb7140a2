//! The rules of the pool's virtual network (`network = "grid"`): job groups, and what a grid job
//! cannot also be.

use super::{Field, Invalid, Shape, invalid};
use crate::{Network, VmType, limits};

/// What a grid job cannot also be: checkpointed, replicated.
pub(super) fn rules(s: &Shape<'_>) -> Result<(), Invalid> {
    not_checkpointed(s)?;
    not_replicated(s)
}

/// A grid VM's NIC is a socket of the node it runs on, which a checkpoint cannot carry.
fn not_checkpointed(s: &Shape<'_>) -> Result<(), Invalid> {
    if s.network == Some(Network::Grid) && s.checkpoint_s.is_some() {
        return Err(invalid(
            Field::CheckpointS,
            "a job on the grid network cannot be checkpointed: its NIC is a socket of the node it runs on, which a checkpoint cannot carry to another; remove `checkpoint_s` or use `network = \"none\"`",
        ));
    }
    Ok(())
}

/// A grid VM talks with its group's VMs while they run; replicas run one after another, each
/// after the others ended, so a replica would wait for peers that are gone.
fn not_replicated(s: &Shape<'_>) -> Result<(), Invalid> {
    if s.network == Some(Network::Grid) && s.replicas.is_some_and(|n| n > 1) {
        return Err(invalid(
            Field::Replicas,
            "a job on the grid network cannot have `replicas`: replicas run one after another, so a replica's group would have ended before it starts; remove `replicas` or use `network = \"none\"`",
        ));
    }
    Ok(())
}

/// A job group (`vmgrid submit --count N --group`): `n` instances of one submit whose VMs reach
/// each other on the pool's overlay, so they must be QEMU jobs with `network = "grid"`.
pub fn group(vm_type: VmType, network: Network, n: u32) -> Result<(), String> {
    if vm_type != VmType::Qemu || network != Network::Grid {
        let network = match network {
            Network::None => "none",
            Network::User => "user",
            Network::Grid => "grid",
        };
        return Err(format!(
            "a job group's VMs reach each other on the pool's network, so its jobs must be qemu jobs with `network = \"grid\"` in [vm] (this one is {vm_type} with network `{network}`)"
        ));
    }
    if !(1..=limits::MAX_GROUP).contains(&n) {
        return Err(format!("a job group has 1 to {} VMs, not {n}", limits::MAX_GROUP));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_group_is_of_grid_qemu_jobs_and_a_grid_job_is_not_checkpointed() {
        assert!(group(VmType::Qemu, Network::Grid, 2).is_ok());
        assert!(group(VmType::Qemu, Network::User, 2).unwrap_err().contains("network = \"grid\""));
        assert!(group(VmType::Wasm, Network::Grid, 2).is_err());
        assert!(group(VmType::Qemu, Network::Grid, 257).is_err());
    }

    #[test]
    fn a_grid_job_has_no_replicas() {
        let text = "[vm]\ntype = \"qemu\"\nimage = \"d.img\"\nnetwork = \"grid\"\n[policy]\nreplicas = 3\n";
        let err = crate::validate::parse_job(std::path::Path::new("/tmp/job.toml"), text).unwrap_err().to_string();
        assert!(err.contains("cannot have `replicas`") && err.contains("replicas"), "{err}");
    }
}
