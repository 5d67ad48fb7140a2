//! Builds the appliance's disk image from Debian packages on this host, with no loop devices and
//! no root-only tricks:
//!
//! ```text
//! sector 0        syslinux's mbr.bin, then an MBR partition table with one active FAT16 partition
//! sector 2048     the FAT16 partition (1 MiB aligned), made by mkfs.fat in an image file, with
//!                   ldlinux.sys + ldlinux.c32   syslinux, installed by the mtools-based `syslinux`
//!                   syslinux.cfg                boot vmlinuz with initrd.gz, console on screen and serial
//!                   vmlinuz                     the newest kernel in /boot that has its modules
//!                   initrd.gz                   busybox, appliance/init, the NIC, disk and ACPI
//!                                               modules, and this vmgrid binary with its libraries
//! ```
//!
//! The appliance runs entirely from the initramfs, so the disk is only ever read by the BIOS and
//! the boot loader: any firmware that boots an MBR disk boots it, as VMware and VirtualBox do.
//! The raw disk is then converted with `qemu-img` to qcow2, vmdk and vdi.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::UNIX_EPOCH;

use crate::Error;
use crate::cpio::Tree;
use crate::tools::{self, io};

const INIT: &str = include_str!("../../../appliance/init");
const UDHCPC_SCRIPT: &str = include_str!("../../../appliance/udhcpc.script");
const POWER_BUTTON: &str = include_str!("../../../appliance/power-button");

/// The file name of the image, without its extension.
pub const IMAGE_NAME: &str = "vmgrid-appliance";

/// Kernel modules the appliance loads (appliance/init), resolved with their dependencies.
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "tun",
    "e1000",
    "vmxnet3",
    "virtio_blk",
    "ata_piix",
    "ahci",
    "sd_mod",
    "mptspi",
    "vmw_pvscsi",
    "floppy",
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "nls_ascii",
    "button",
    "evdev",
    "af_packet",
];

/// Where the FAT partition starts, in 512-byte sectors (1 MiB, as partitioning tools align).
const PART_START: u64 = 2048;
/// A fixed time for the files on the FAT partition, so two builds are alike (2000-01-01).
const FIXED_MTIME: u64 = 946_684_800;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Format {
    Raw,
    Qcow2,
    Vmdk,
    Vdi,
}

impl Format {
    pub const ALL: [Format; 4] = [Format::Raw, Format::Qcow2, Format::Vmdk, Format::Vdi];

    pub fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::Vmdk => "vmdk",
            Format::Vdi => "vdi",
        }
    }

    pub fn extension(self) -> &'static str {
        match self {
            Format::Raw => "img",
            f => f.name(),
        }
    }

    /// Parses `raw,qcow2,vmdk,vdi` (any subset, any order).
    pub fn parse_list(list: &str) -> Result<Vec<Format>, Error> {
        let mut out = BTreeSet::new();
        for f in list.split(',').map(str::trim).filter(|f| !f.is_empty()) {
            let format = Format::ALL.into_iter().find(|x| x.name() == f).ok_or_else(|| {
                Error::BadInput(format!("unknown image format `{f}`: choose from raw, qcow2, vmdk, vdi"))
            })?;
            out.insert(format);
        }
        if out.is_empty() {
            return Err(Error::BadInput("--format needs at least one of raw, qcow2, vmdk, vdi".into()));
        }
        Ok(out.into_iter().collect())
    }
}

/// The image's path in `dir` for `format`.
pub fn image_path(dir: &Path, format: Format) -> PathBuf {
    dir.join(format!("{IMAGE_NAME}.{}", format.extension()))
}

fn step(quiet: bool, msg: impl std::fmt::Display) {
    if !quiet {
        eprintln!("vmgrid: appliance: {msg}");
    }
}

/// Builds the image in `out` in each of `formats`; returns the files written.
pub fn build(out: &Path, formats: &[Format], quiet: bool) -> Result<Vec<(Format, PathBuf)>, Error> {
    // Every tool is looked up first, so a missing one is reported before any work is done.
    let mkfs = tools::find("mkfs.fat", "dosfstools")?;
    let mcopy = tools::find("mcopy", "mtools")?;
    let syslinux = tools::find("syslinux", "syslinux")?;
    let gzip = tools::find("gzip", "gzip")?;
    let mbr = mbr_bin()?;
    let qemu_img =
        if formats.iter().any(|f| *f != Format::Raw) { Some(tools::find("qemu-img", "qemu-utils")?) } else { None };
    let kernel = Kernel::find()?;
    let busybox = find_busybox()?;
    let exe = std::env::current_exe().map_err(io("cannot find the running vmgrid binary"))?;

    std::fs::create_dir_all(out).map_err(io(format!("cannot create {}", out.display())))?;
    let work = tempfile::Builder::new()
        .prefix(".vmgrid-appliance-")
        .tempdir_in(out)
        .map_err(io(format!("cannot create a work directory in {}", out.display())))?;
    let work = work.path();

    step(quiet, format!("initramfs: busybox, kernel {} modules, {}", kernel.version, exe.display()));
    let mut tree = Tree::default();
    add_base(&mut tree, &busybox)?;
    add_modules(&mut tree, &kernel)?;
    add_vmgrid(&mut tree, &exe, work)?;
    let initrd = work.join("initrd.gz");
    write_initrd(&tree, &gzip, &initrd)?;

    step(quiet, "boot partition: FAT16 with syslinux, the kernel and the initramfs");
    let vmlinuz = work.join("vmlinuz");
    std::fs::copy(&kernel.image, &vmlinuz).map_err(io(format!("cannot copy {}", kernel.image.display())))?;
    let (fat, part_mib) = boot_partition(work, &mkfs, &syslinux, &mcopy, &vmlinuz, &initrd)?;

    step(quiet, "disk: MBR, syslinux boot code, one active partition");
    let raw = work.join("disk.img");
    write_disk(&raw, &mbr, &fat, part_mib << 20)?;
    let _ = std::fs::remove_file(&fat);
    convert(quiet, out, work, &raw, formats, qemu_img.as_deref())
}

/// The FAT16 boot partition as an image file: syslinux's boot code, its config, the kernel and
/// the initramfs, with fixed file times. Returns the file and its size in MiB.
fn boot_partition(
    work: &Path,
    mkfs: &Path,
    syslinux: &Path,
    mcopy: &Path,
    vmlinuz: &Path,
    initrd: &Path,
) -> Result<(PathBuf, u64), Error> {
    let cfg = work.join("syslinux.cfg");
    std::fs::write(&cfg, SYSLINUX_CFG).map_err(io("cannot write syslinux.cfg"))?;
    let payload: u64 = [&vmlinuz, &initrd]
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()))
        .sum::<std::io::Result<u64>>()
        .map_err(io("cannot size the boot files"))?;
    // The files, syslinux and FAT overhead, with room to spare; whole MiB, at least 16 (FAT16).
    let part_mib = (payload / (1 << 20) + 1) * 105 / 100 + 4;
    let part_mib = part_mib.max(16);
    let fat = work.join("boot.fat");
    tools::run(
        Command::new(mkfs)
            .args(["-C", "-F", "16", "-n", "VMGRID", "-i", "766d6772", "--invariant", "-h"])
            .arg(PART_START.to_string())
            .arg(&fat)
            .arg((part_mib * 1024).to_string()),
    )?;
    // syslinux installs through mtools, which dates the files SOURCE_DATE_EPOCH when it is set.
    tools::run(Command::new(syslinux).env("SOURCE_DATE_EPOCH", FIXED_MTIME.to_string()).arg("--install").arg(&fat))?;
    for p in [vmlinuz, initrd, &cfg] {
        let f = std::fs::File::options().write(true).open(p).map_err(io(format!("cannot open {}", p.display())))?;
        f.set_modified(UNIX_EPOCH + std::time::Duration::from_secs(FIXED_MTIME))
            .map_err(io(format!("cannot set the time of {}", p.display())))?;
    }
    tools::run(
        Command::new(mcopy)
            .env("MTOOLS_SKIP_CHECK", "1")
            .env("SOURCE_DATE_EPOCH", FIXED_MTIME.to_string())
            .arg("-i")
            .arg(&fat)
            .args(["-m", "-o"])
            .args([vmlinuz, initrd, cfg.as_path()])
            .arg("::/"),
    )?;
    Ok((fat, part_mib))
}

/// The raw disk converted to each format asked for, moved into `out`.
fn convert(
    quiet: bool,
    out: &Path,
    work: &Path,
    raw: &Path,
    formats: &[Format],
    qemu_img: Option<&Path>,
) -> Result<Vec<(Format, PathBuf)>, Error> {
    let mut written = Vec::new();
    for &format in formats {
        let dest = image_path(out, format);
        if format == Format::Raw {
            continue;
        }
        step(quiet, format!("converting to {} -> {}", format.name(), dest.display()));
        let tmp = work.join(format!("disk.{}", format.extension()));
        let mut cmd = Command::new(qemu_img.expect("found when a format needs it"));
        cmd.args(["convert", "-q", "-f", "raw", "-O", format.name()]);
        if format == Format::Vmdk {
            // One sparse file, which VMware Workstation and VirtualBox both open.
            cmd.args(["-o", "subformat=monolithicSparse"]);
        }
        tools::run(cmd.arg(raw).arg(&tmp))?;
        std::fs::rename(&tmp, &dest).map_err(io(format!("cannot write {}", dest.display())))?;
        written.push((format, dest));
    }
    if formats.contains(&Format::Raw) {
        let dest = image_path(out, Format::Raw);
        std::fs::rename(raw, &dest).map_err(io(format!("cannot write {}", dest.display())))?;
        written.insert(0, (Format::Raw, dest));
    }
    Ok(written)
}

const SYSLINUX_CFG: &str = "\
# The vmgrid grid appliance: boots the kernel with the appliance's initramfs, no prompt.
SERIAL 0 115200
DEFAULT vmgrid
PROMPT 0
TIMEOUT 0
LABEL vmgrid
  LINUX /vmlinuz
  INITRD /initrd.gz
  APPEND console=tty0 console=ttyS0,115200 quiet loglevel=3 panic=10
";

fn mbr_bin() -> Result<PathBuf, Error> {
    ["/usr/lib/syslinux/mbr/mbr.bin", "/usr/share/syslinux/mbr.bin", "/usr/lib/syslinux/bios/mbr.bin"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .ok_or_else(|| {
            Error::Failed(
                "syslinux's mbr.bin was not found; install it (Debian: `apt-get install syslinux-common`)".into(),
            )
        })
}

struct Kernel {
    version: String,
    image: PathBuf,
    modules: PathBuf,
}

impl Kernel {
    /// The newest kernel in /boot whose modules are installed, as guest-kit/build.sh picks it.
    fn find() -> Result<Kernel, Error> {
        let mut versions: Vec<String> = std::fs::read_dir("/boot")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| e.file_name().to_str().and_then(|n| n.strip_prefix("vmlinuz-")).map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        versions.sort_by_key(|v| std::cmp::Reverse(version_key(v)));
        versions
            .into_iter()
            .map(|v| Kernel {
                image: PathBuf::from(format!("/boot/vmlinuz-{v}")),
                modules: PathBuf::from(format!("/lib/modules/{v}")),
                version: v,
            })
            .find(|k| k.modules.join("modules.dep").is_file())
            .ok_or_else(|| {
                Error::Failed(
                    "no Linux kernel with its modules in /boot; install one (Debian: `apt-get install linux-image-amd64`)"
                        .into(),
                )
            })
    }
}

/// Orders "6.1.0-56-amd64" after "6.1.0-9-amd64": numbers compare as numbers.
fn version_key(v: &str) -> Vec<(u64, String)> {
    v.split(|c: char| !c.is_ascii_alphanumeric())
        .map(|p| match p.parse::<u64>() {
            Ok(n) => (n, String::new()),
            Err(_) => (0, p.to_string()),
        })
        .collect()
}

fn find_busybox() -> Result<PathBuf, Error> {
    let bb = tools::find("busybox", "busybox-static")?;
    let bytes = std::fs::read(&bb).map_err(io(format!("cannot read {}", bb.display())))?;
    if has_interpreter(&bytes) {
        return Err(Error::Failed(format!(
            "{} is linked dynamically; the appliance needs a static busybox (Debian: `apt-get install busybox-static`)",
            bb.display()
        )));
    }
    Ok(bb)
}

/// Whether an ELF64 file asks for a dynamic loader (has a PT_INTERP program header).
fn has_interpreter(elf: &[u8]) -> bool {
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" || elf[4] != 2 {
        return false;
    }
    let u16_at = |o: usize| u16::from_le_bytes([elf[o], elf[o + 1]]) as usize;
    let phoff = u64::from_le_bytes(elf[0x20..0x28].try_into().expect("8 bytes")) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).any(|i| {
        let at = phoff + i * phentsize;
        elf.get(at..at + 4).is_some_and(|t| u32::from_le_bytes(t.try_into().expect("4 bytes")) == 3)
    })
}

/// busybox and its applets, the init, and the few files under /etc a small Linux wants.
fn add_base(tree: &mut Tree, busybox: &Path) -> Result<(), Error> {
    for d in ["dev", "proc", "sys", "tmp", "run", "root", "mnt/config", "var/lib/vmgrid", "var/log", "etc/vmgrid"] {
        tree.dir(d);
    }
    tree.char_dev("dev/console", 5, 1);
    tree.char_dev("dev/null", 1, 3);
    tree.file_from("bin/busybox", 0o755, busybox.to_path_buf());
    let out = tools::run(Command::new(busybox).arg("--list"))?;
    for applet in String::from_utf8_lossy(&out.stdout).lines().map(str::trim) {
        if !applet.is_empty() && applet != "busybox" && !applet.contains('/') {
            tree.symlink(&format!("bin/{applet}"), "busybox");
        }
    }
    tree.file("init", 0o755, INIT);
    tree.file("etc/udhcpc.script", 0o755, UDHCPC_SCRIPT);
    tree.file("etc/acpi/PWRF/00000080", 0o755, POWER_BUTTON);
    tree.file(
        "etc/passwd",
        0o644,
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    );
    tree.file("etc/group", 0o644, "root:x:0:\nnogroup:x:65534:\n");
    tree.file("etc/hosts", 0o644, "127.0.0.1 localhost\n::1 localhost\n");
    tree.file("etc/nsswitch.conf", 0o644, "passwd: files\ngroup: files\nhosts: files dns\n");
    tree.file("etc/vmgrid-appliance", 0o644, format!("vmgrid appliance, vmgrid {}\n", env!("CARGO_PKG_VERSION")));
    Ok(())
}

/// The wanted modules and their dependencies, uncompressed, with a matching modules.dep.
fn add_modules(tree: &mut Tree, kernel: &Kernel) -> Result<(), Error> {
    let dep_path = kernel.modules.join("modules.dep");
    let dep_text = std::fs::read_to_string(&dep_path).map_err(io(format!("cannot read {}", dep_path.display())))?;
    let builtin = std::fs::read_to_string(kernel.modules.join("modules.builtin")).unwrap_or_default();
    let name_of = |path: &str| -> String {
        let file = path.rsplit('/').next().unwrap_or(path);
        let stem = file.split(".ko").next().unwrap_or(file);
        stem.replace('-', "_")
    };
    let mut deps: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    for line in dep_text.lines() {
        if let Some((path, rest)) = line.split_once(':') {
            deps.insert(name_of(path), (path.to_string(), rest.split_whitespace().map(String::from).collect()));
        }
    }
    let builtin: BTreeSet<String> = builtin.lines().map(name_of).collect();
    let mut chosen: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    let mut todo: Vec<String> = MODULES.iter().map(|m| m.to_string()).collect();
    while let Some(m) = todo.pop() {
        if chosen.contains_key(&m) || builtin.contains(&m) {
            continue;
        }
        let (path, d) = deps.get(&m).cloned().ok_or_else(|| {
            Error::Failed(format!(
                "the kernel {} has no module `{m}`; the appliance needs it (is linux-image-amd64 installed?)",
                kernel.version
            ))
        })?;
        todo.extend(d.iter().map(|p| name_of(p)));
        chosen.insert(m, (path, d));
    }
    let plain = |p: &str| p.trim_end_matches(".xz").trim_end_matches(".zst").trim_end_matches(".gz").to_string();
    let mut dep_out = String::new();
    for (path, d) in chosen.values() {
        let src = kernel.modules.join(path);
        let bytes = match path.rsplit_once(".ko.") {
            None => std::fs::read(&src).map_err(io(format!("cannot read {}", src.display())))?,
            Some((_, ext)) => {
                let (tool, pkg) = match ext {
                    "xz" => ("xz", "xz-utils"),
                    "zst" => ("zstd", "zstd"),
                    _ => ("gzip", "gzip"),
                };
                tools::run(Command::new(tools::find(tool, pkg)?).arg("-dc").arg(&src))?.stdout
            }
        };
        tree.file(&format!("lib/modules/{}/{}", kernel.version, plain(path)), 0o644, bytes);
        let d: Vec<String> = d.iter().map(|x| plain(x)).collect();
        dep_out.push_str(&format!("{}: {}\n", plain(path), d.join(" ")));
    }
    tree.file(&format!("lib/modules/{}/modules.dep", kernel.version), 0o644, dep_out);
    Ok(())
}

/// This vmgrid binary, stripped, and the shared libraries `ldd` says it needs.
fn add_vmgrid(tree: &mut Tree, exe: &Path, work: &Path) -> Result<(), Error> {
    let stripped = work.join("vmgrid");
    match tools::find("strip", "binutils") {
        Ok(strip) => {
            tools::run(Command::new(strip).arg("--strip-all").arg("-o").arg(&stripped).arg(exe))?;
        }
        Err(e) => {
            eprintln!("vmgrid: appliance: {e}; the image gets the unstripped binary, which is larger");
            std::fs::copy(exe, &stripped).map_err(io(format!("cannot copy {}", exe.display())))?;
        }
    }
    tree.file_from("usr/bin/vmgrid", 0o755, stripped);
    for lib in shared_libraries(exe)? {
        let real = std::fs::canonicalize(&lib).map_err(io(format!("cannot find {}", lib.display())))?;
        tree.file_from(&lib.to_string_lossy(), 0o755, real);
    }
    Ok(())
}

/// The absolute paths of the libraries and loader that `ldd` lists for `exe`.
fn shared_libraries(exe: &Path) -> Result<Vec<PathBuf>, Error> {
    let ldd = tools::find("ldd", "libc-bin")?;
    let out = Command::new(&ldd).arg(exe).output().map_err(io("cannot run ldd"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        if text.contains("not a dynamic executable") || String::from_utf8_lossy(&out.stderr).contains("not a dynamic") {
            return Ok(Vec::new());
        }
        return Err(Error::Failed(format!(
            "ldd {} failed: {}",
            exe.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(parse_ldd(&text))
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next().unwrap_or(""),
            None => line.split_whitespace().next().unwrap_or(""),
        };
        if path.starts_with('/') {
            libs.push(PathBuf::from(path));
        }
    }
    libs
}

fn write_initrd(tree: &Tree, gzip: &Path, dest: &Path) -> Result<(), Error> {
    let file = std::fs::File::create(dest).map_err(io(format!("cannot create {}", dest.display())))?;
    let mut child = Command::new(gzip)
        .arg("-9n")
        .stdin(Stdio::piped())
        .stdout(file)
        .stderr(Stdio::piped())
        .spawn()
        .map_err(io("cannot run gzip"))?;
    let stdin = child.stdin.take().expect("stdin was piped");
    let written = tree.write(&mut BufWriter::with_capacity(1 << 20, stdin));
    let out = child.wait_with_output().map_err(io("waiting for gzip"))?;
    written.map_err(io("cannot write the initramfs"))?;
    if !out.status.success() {
        return Err(Error::Failed(format!("gzip failed: {}", String::from_utf8_lossy(&out.stderr).trim())));
    }
    Ok(())
}

/// The MBR: boot code, a fixed disk signature, one active FAT16 (LBA) partition, the signature.
fn mbr_sector(boot_code: &[u8], part_sectors: u64) -> [u8; 512] {
    let mut s = [0u8; 512];
    let n = boot_code.len().min(440);
    s[..n].copy_from_slice(&boot_code[..n]);
    s[440..444].copy_from_slice(b"vmgr");
    let e = &mut s[446..462];
    e[0] = 0x80;
    e[1..4].copy_from_slice(&chs(PART_START));
    e[4] = 0x0e;
    e[5..8].copy_from_slice(&chs(PART_START + part_sectors - 1));
    e[8..12].copy_from_slice(&(PART_START as u32).to_le_bytes());
    e[12..16].copy_from_slice(&(part_sectors as u32).to_le_bytes());
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// A sector's cylinder/head/sector address in the 255-head, 63-sector geometry, capped as BIOSes
/// expect for disks beyond 8 GiB (they then use LBA).
fn chs(lba: u64) -> [u8; 3] {
    let (heads, sectors) = (255u64, 63u64);
    let c = lba / (heads * sectors);
    if c > 1023 {
        return [254, 0xff, 0xff];
    }
    let h = (lba / sectors) % heads;
    let s = lba % sectors + 1;
    [h as u8, (s as u8) | (((c >> 2) & 0xc0) as u8), (c & 0xff) as u8]
}

fn write_disk(dest: &Path, mbr: &Path, fat: &Path, part_bytes: u64) -> Result<(), Error> {
    let code = std::fs::read(mbr).map_err(io(format!("cannot read {}", mbr.display())))?;
    let mut out = BufWriter::new(std::fs::File::create(dest).map_err(io(format!("cannot create {}", dest.display())))?);
    let header = {
        let mut h = vec![0u8; (PART_START * 512) as usize];
        h[..512].copy_from_slice(&mbr_sector(&code, part_bytes / 512));
        h
    };
    out.write_all(&header).map_err(io("cannot write the disk"))?;
    let mut f = std::fs::File::open(fat).map_err(io("cannot read the boot partition"))?;
    let copied = std::io::copy(&mut f, &mut out).map_err(io("cannot write the disk"))?;
    if copied != part_bytes {
        return Err(Error::Failed(format!(
            "mkfs.fat made a {copied}-byte partition, not the {part_bytes} bytes asked for"
        )));
    }
    out.flush().map_err(io("cannot write the disk"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_parse_and_reject_unknown_names() {
        assert_eq!(Format::parse_list("vdi,raw").unwrap(), vec![Format::Raw, Format::Vdi]);
        assert!(matches!(Format::parse_list("qcow3"), Err(Error::BadInput(m)) if m.contains("raw, qcow2, vmdk, vdi")));
        assert!(Format::parse_list(",").is_err());
    }

    #[test]
    fn the_partition_table_has_one_active_lba_partition() {
        let s = mbr_sector(&[0xfa; 440], 40960);
        assert_eq!(&s[510..], &[0x55, 0xaa]);
        assert_eq!(s[446], 0x80);
        assert_eq!(s[450], 0x0e);
        assert_eq!(u32::from_le_bytes(s[454..458].try_into().unwrap()), 2048);
        assert_eq!(u32::from_le_bytes(s[458..462].try_into().unwrap()), 40960);
        // LBA 2048 is cylinder 0, head 32, sector 33 in the 255/63 geometry.
        assert_eq!(&s[447..450], &[32, 33, 0]);
        assert!(s[462..510].iter().all(|&b| b == 0), "the other three entries are empty");
    }

    #[test]
    fn ldd_output_gives_library_and_loader_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x1)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x2)\n\t/lib64/ld-linux-x86-64.so.2 (0x3)\n";
        assert_eq!(
            parse_ldd(text),
            ["/lib/x86_64-linux-gnu/libgcc_s.so.1", "/lib/x86_64-linux-gnu/libc.so.6", "/lib64/ld-linux-x86-64.so.2"]
                .map(PathBuf::from)
        );
    }

    #[test]
    fn kernel_versions_sort_numerically() {
        let mut v = vec!["6.1.0-9-amd64", "6.1.0-56-amd64", "5.10.0-30-amd64"];
        v.sort_by_key(|x| std::cmp::Reverse(version_key(x)));
        assert_eq!(v, ["6.1.0-56-amd64", "6.1.0-9-amd64", "5.10.0-30-amd64"]);
    }

    #[test]
    fn a_static_binary_has_no_interpreter() {
        let busybox = std::fs::read("/bin/busybox").or_else(|_| std::fs::read("/usr/bin/busybox"));
        if let Ok(b) = busybox {
            assert!(!has_interpreter(&b), "Debian's busybox-static is static");
        }
        let ls = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(has_interpreter(&ls), "the test binary is dynamically linked");
    }
}
