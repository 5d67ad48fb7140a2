#!/usr/bin/env bash
# Builds the vmgrid guest kit: a Debian kernel plus a busybox initramfs that follows the vmgrid
# guest contract (mount the job directory over 9p at /job, run the job, write /job/.vmgrid-exit,
# power off). Everything comes from Debian packages installed on this host:
#   linux-image-amd64 (kernel and modules), busybox-static (userland), cpio, gzip.
# Nothing binary is committed; the output is reproducible for a given set of package versions.
#
# Usage: guest-kit/build.sh [OUT_DIR]     (default: guest-kit/out)
# Output: OUT_DIR/vmlinuz, OUT_DIR/initrd.gz, OUT_DIR/kernel-version
set -euo pipefail

here="$(cd "$(dirname "$0")" && pwd)"
out="${1:-$here/out}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

die() { echo "guest-kit: $*" >&2; exit 1; }

busybox="$(command -v busybox || true)"
[ -n "$busybox" ] || die "busybox not found; install it: apt-get install busybox-static"
file -L "$busybox" 2>/dev/null | grep -q "statically linked" || ldd "$busybox" 2>&1 | grep -q "not a dynamic" \
  || die "$busybox is not static; install busybox-static"

# The newest installed kernel that has its modules.
kver=""
for k in $(ls /boot/vmlinuz-* 2>/dev/null | sed 's|/boot/vmlinuz-||' | sort -V -r); do
  if [ -f "/lib/modules/$k/modules.dep" ]; then kver="$k"; break; fi
done
[ -n "$kver" ] || die "no kernel with modules in /boot; install one: apt-get install linux-image-amd64"
moddir="/lib/modules/$kver"

# Skip the work when the inputs have not changed.
stamp="$(cat "$here/build.sh" "$here/init" | sha256sum | cut -c1-16)-$kver-$(stat -c %s-%Y "$busybox" "/boot/vmlinuz-$kver" | tr '\n' '-')"
if [ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/initrd.gz" ] && [ -f "$out/vmlinuz" ]; then
  echo "guest-kit: up to date in $out ($kver)"
  exit 0
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
root="$work/root"
mkdir -p "$root"/{bin,sbin,dev,proc,sys,tmp,job,etc,root,usr/bin,usr/sbin,"lib/modules/$kver"}
cp "$busybox" "$root/bin/busybox"
# busybox --install needs /proc at run time; make the applet links now instead.
for applet in $("$busybox" --list); do
  [ "$applet" = busybox ] || ln -s busybox "$root/bin/$applet"
done
install -m 0755 "$here/init" "$root/init"

# The modules the contract needs (virtio, 9p, virtio_blk, ext4) and the appliance's NICs, with
# their dependencies from modules.dep.
wanted="virtio_pci virtio_blk 9pnet_virtio 9p ext4 crc32c_generic virtio_net e1000 af_packet qemu_fw_cfg"
declare -A seen=()
resolve() {
  local name="$1" line path deps
  line="$(grep -E "(^|/)${name//_/[_-]}\.ko(\.[a-z]+)?:" "$moddir/modules.dep" | head -1 || true)"
  [ -n "$line" ] || { grep -qE "/${name//_/[_-]}\.ko" "$moddir/modules.builtin" 2>/dev/null && return 0; die "module $name not found for $kver"; }
  path="${line%%:*}"
  [ -n "${seen[$path]:-}" ] && return 0
  seen[$path]=1
  deps="${line#*:}"
  for d in $deps; do resolve "$(basename "$d" | sed -E 's/\.ko(\.[a-z]+)?$//')"; done
}
for m in $wanted; do resolve "$m"; done
: > "$root/lib/modules/$kver/modules.dep"
for path in "${!seen[@]}"; do
  plain="${path%.xz}"; plain="${plain%.zst}"; plain="${plain%.gz}"
  mkdir -p "$root/lib/modules/$kver/$(dirname "$plain")"
  case "$path" in
    *.xz) xz -dc "$moddir/$path" > "$root/lib/modules/$kver/$plain" ;;
    *.zst) zstd -dqc "$moddir/$path" > "$root/lib/modules/$kver/$plain" ;;
    *.gz) gzip -dc "$moddir/$path" > "$root/lib/modules/$kver/$plain" ;;
    *) cp "$moddir/$path" "$root/lib/modules/$kver/$plain" ;;
  esac
done
grep -E "^[^:]+:" "$moddir/modules.dep" | while IFS= read -r line; do
  path="${line%%:*}"
  [ -n "${seen[$path]:-}" ] || continue
  echo "$line" | sed -E 's/\.ko\.(xz|zst|gz)/.ko/g'
done > "$root/lib/modules/$kver/modules.dep"

# A reproducible archive: sorted names, fixed times, no gzip timestamp.
find "$root" -exec touch -h -d @0 {} +
(cd "$root" && find . -print0 | LC_ALL=C sort -z | cpio --null --create --format=newc --quiet --reproducible --owner=0:0) \
  | gzip -9n > "$work/initrd.gz"
cp "/boot/vmlinuz-$kver" "$work/vmlinuz"
mv "$work/initrd.gz" "$out/initrd.gz"
mv "$work/vmlinuz" "$out/vmlinuz"
echo "$kver" > "$out/kernel-version"
echo "$stamp" > "$out/stamp"
echo "guest-kit: built $out/vmlinuz and $out/initrd.gz ($kver, $(du -h "$out/initrd.gz" | cut -f1) initramfs)"
