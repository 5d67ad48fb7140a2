//! The grid appliance: a bootable VM image with the node agent inside. Boot it on a hypervisor
//! and it joins the pool named on its config disk; power it off and it leaves. The `vmgrid`
//! binary's `appliance` commands are the CLI glue; this crate does the work. It starts processes
//! (the image tools, QEMU) only through the runtime's supervision and tool lookup.
//!
//! - [`image`] builds the disk image (MBR, syslinux, a FAT partition with the kernel and an
//!   initramfs holding busybox, the appliance init and this very `vmgrid` binary);
//! - [`config`] is the config disk: a FAT floppy image holding `vmgrid.toml`;
//! - [`vm`] boots the image under QEMU for `vmgrid appliance start`;
//! - [`agent`] is what runs inside the appliance: the node agent, configured from the config disk.

pub mod agent;
pub mod config;
mod cpio;
pub mod image;
mod netdev;
pub mod tools;
pub mod vm;

/// The prefix of the lines the appliance prints on its console for `vmgrid appliance start`.
pub const MARKER: &str = "vmgrid-appliance: ";

/// Why an appliance command failed: the caller's input (exit 2), or anything else (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    BadInput(String),
    #[error("{0}")]
    Failed(String),
}

impl From<vmgrid_runtime::RunError> for Error {
    fn from(e: vmgrid_runtime::RunError) -> Self {
        match e {
            vmgrid_runtime::RunError::BadJob(m) => Error::BadInput(m),
            vmgrid_runtime::RunError::Host(m) | vmgrid_runtime::RunError::BadCheckpoint(m) => Error::Failed(m),
        }
    }
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::BadInput(_) => 2,
            Error::Failed(_) => 1,
        }
    }
}
