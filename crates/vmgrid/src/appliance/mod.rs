//! The grid appliance (issue #5): a bootable VM image with the node agent inside. Boot it on a
//! hypervisor and it joins the pool named on its config disk; power it off and it leaves.
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
pub mod tools;
pub mod vm;

/// The prefix of the lines the appliance prints on its console for `vmgrid appliance start`.
pub const MARKER: &str = "vmgrid-appliance: ";
