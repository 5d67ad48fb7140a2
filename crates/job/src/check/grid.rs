//! The rules of the pool's virtual network (`network = "grid"`): job groups, and what a grid job
//! cannot also be.

use super::{Field, Invalid, Shape, invalid};
use crate::{Network, VmType, limits};

/// A grid VM's NIC is a socket of the node it runs on, which a checkpoint cannot carry.
pub(super) fn not_checkpointed(s: &Shape<'_>) -> Result<(), Invalid> {
    if s.network == Some(Network::Grid) && s.checkpoint_s.is_some() {
        return Err(invalid(
            Field::CheckpointS,
            "a job on the grid network cannot be checkpointed: its NIC is a socket of the node it runs on, which a checkpoint cannot carry to another; remove `checkpoint_s` or use `network = \"none\"`",
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
}
