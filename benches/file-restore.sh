#!/usr/bin/env bash
# File-level restore on a real guest disk: the benchmark's Debian image backed up, its whole tree listed
# (`ls -R`), then /usr, /var and /etc extracted cold, each compared with what the kernel sees of the same image
# mounted read-only (contents with `diff -r`; path, permissions, modification time, owner and group of every
# entry with `find -printf`), and /usr once more as `dump`'s tar stream unpacked by GNU tar; then /usr and /etc
# copied onto XFS and read back the same way. Needs root (loop mounts), fdisk and xfsprogs. Results go to
# benches/results/file-restore.txt.
# Usage: benches/file-restore.sh IMAGE [PARTITION_OFFSET_BYTES] [WORKDIR] (IMAGE: a raw disk image with a
# partition table, e.g. ../shared/bench's vm1-day0.raw, whose root file system starts at 1 MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
image=$(realpath "$1")
offset=${2:-1048576}
work="${3:-$(mktemp -d)}"
[ -n "${DISKVAULT_BIN:-}" ] || cargo build --release --bin diskvault >/dev/null
dv=${DISKVAULT_BIN:-$PWD/target/release/diskvault}
export DISKVAULT_PASSWORD=bench DISKVAULT_REPOSITORY="$work/repo" DISKVAULT_CACHE_DIR="$work/cache"
rm -rf "$work/repo" "$work/cache" "$work/out"
mkdir -p "$work/mnt"
trap 'mountpoint -q "$work/mnt" && umount "$work/mnt"; mountpoint -q "$work/xmnt" && umount "$work/xmnt"; [ -n "${loop:-}" ] && losetup -d "$loop"; true' EXIT
"$dv" -q init >/dev/null
"$dv" -q backup --name bench "disk=$image" >/dev/null
volume=$("$dv" -q ls latest --json | python3 -c "import json,sys; print(next(v['name'] for v in json.load(sys.stdin)['volumes'] if v['start'] == $offset))")
mount -o ro,loop,offset="$offset",noload "$image" "$work/mnt"
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
timed() { /usr/bin/time -f "%e s, %U s user, %M KiB peak RSS" "$@" 2>&1 >/dev/null | tail -1; }
out=benches/results/file-restore.txt
{
  echo "# file-level restore, $(date -u +%F), $(nproc) cores, image $(basename "$image"), volume /$volume"
  cold
  echo "ls -R of the whole file system: $("$dv" -q ls latest "/$volume" -R | wc -l) entries in $(timed "$dv" -q ls latest "/$volume" -R)"
  for dir in usr var etc; do
    cold
    t=$(timed "$dv" -q extract latest "/$volume/$dir" --target "$work/out")
    bytes=$(du -sb --apparent-size "$work/out/$dir" | cut -f1)
    files=$(find "$work/out/$dir" -type f | wc -l)
    diff -r --no-dereference "$work/mnt/$dir" "$work/out/$dir" >/dev/null || { echo "/$dir differs from the kernel's view"; exit 1; }
    a=$(cd "$work/mnt" && find "$dir" -printf '%p %m %T@ %U %G\n' | sort | sha256sum)
    b=$(cd "$work/out" && find "$dir" -printf '%p %m %T@ %U %G\n' | sort | sha256sum)
    [ "$a" = "$b" ] || { echo "/$dir: metadata differs from the kernel's view"; exit 1; }
    echo "extract /$dir: $files files, $((bytes >> 20)) MiB in $t; identical to the kernel's view (contents, modes, times, owners)"
  done
  # dump of a directory as a tar stream, unpacked by GNU tar: tar keeps whole seconds of the times.
  cold
  rm -rf "$work/untar" && mkdir -p "$work/untar"
  t=$( { /usr/bin/time -f "%e s, %U s user, %M KiB peak RSS" "$dv" -q dump latest "/$volume/usr" | tar -x -C "$work/untar"; } 2>&1 | tail -1)
  diff -r --no-dereference "$work/mnt/usr" "$work/untar/usr" >/dev/null || { echo "dump /usr | tar -x differs from the kernel's view"; exit 1; }
  seconds() { (cd "$1" && find usr -printf '%p %m %U %G %T@\n' | sed 's/\.[0-9]*$//' | sort | sha256sum); }
  [ "$(seconds "$work/mnt")" = "$(seconds "$work/untar")" ] || { echo "dump /usr | tar -x: metadata differs"; exit 1; }
  echo "dump /usr | tar -x: $t (diskvault's side); identical to the kernel's view (contents, modes, times to the second, owners)"

  # The same /usr and /etc on XFS, as a RHEL-family guest has them (needs xfsprogs): copied by the kernel into a
  # fresh 2 GiB XFS partition, backed up, read back and compared as above.
  xfs=$work/xfs.raw
  rm -f "$xfs" && truncate -s 2G "$xfs"
  printf 'label: gpt\nstart=2048, type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\n' | sfdisk -q "$xfs"
  mkdir -p "$work/xmnt"
  loop=$(losetup --find --show --offset 1048576 "$xfs")
  mkfs.xfs -q -f -L bench "$loop"
  mount "$loop" "$work/xmnt"
  cp -a "$work/mnt/usr" "$work/mnt/etc" "$work/xmnt/"
  umount "$work/xmnt"
  "$dv" -q backup --name bench-xfs "disk=$xfs" >/dev/null
  mount -o ro "$loop" "$work/xmnt"
  cold
  echo "XFS: ls -R: $("$dv" -q ls latest --name bench-xfs /part1 -R | wc -l) entries in $(timed "$dv" -q ls latest --name bench-xfs /part1 -R)"
  cold
  rm -rf "$work/xout"
  t=$(timed "$dv" -q extract latest --name bench-xfs /part1/usr --target "$work/xout")
  diff -r --no-dereference "$work/xmnt/usr" "$work/xout/usr" >/dev/null || { echo "XFS /usr differs from the kernel's view"; exit 1; }
  a=$(cd "$work/xmnt" && find usr -printf '%p %m %T@ %U %G\n' | sort | sha256sum)
  b=$(cd "$work/xout" && find usr -printf '%p %m %T@ %U %G\n' | sort | sha256sum)
  [ "$a" = "$b" ] || { echo "XFS /usr: metadata differs from the kernel's view"; exit 1; }
  umount "$work/xmnt"
  losetup -d "$loop" && loop=""
  echo "XFS: extract /usr: $(find "$work/xout/usr" -type f | wc -l) files in $t; identical to the kernel's view (contents, modes, times, owners)"
} | tee "$out"
