#!/usr/bin/env bash
# Offsite copies: `diskvault copy` next to `restic copy` in one run, each copying the three backups of the
# ../shared/bench workload (vm1-day0, vm1-day1 from its changed-areas file for diskvault, vm2-day0) from one
# local repository into a new one with its own password, then restoring vm1-day1 from the copy (cmp).
# ROUNDS copies per tool, alternating, each into a fresh destination with a cold page cache.
#   benches/copy-compare.sh [SIZE_GIB]        env ROUNDS=3
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-4}
rounds=${ROUNDS:-3}
data=${DISKVAULT_BENCH_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/diskvault-bench}
img=$data/${size}g
for f in vm1-day0.raw vm1-day1.raw vm1-day1.changed.json vm2-day0.raw; do
  [ -f "$img/$f" ] || { echo "missing $img/$f: run ../shared/bench/make-workload.sh $size"; exit 1; }
done
cargo build --release --locked
dv=$PWD/target/release/diskvault
work=$(mktemp -d -p "$data")
trap 'rm -rf "$work"' EXIT
export RESTIC_PASSWORD=source-pw RESTIC_FROM_PASSWORD=source-pw DISKVAULT_PASSWORD=source-pw
export DISKVAULT_FROM_PASSWORD=source-pw DISKVAULT_CACHE_DIR=$work/dvcache
# Both tools back up a VM's disk from one path, as a backup job would: stage/<vm>/disk.raw.
stage() { mkdir -p "$work/stage/$1"; cp --sparse=always "$img/$2.raw" "$work/stage/$1/disk.raw"; }
stage vm1 vm1-day0
restic -q -r "$work/restic-src" init >/dev/null
restic -q -r "$work/restic-src" --cache-dir "$work/rcache" backup "$work/stage/vm1/disk.raw" >/dev/null
$dv -q -r "$work/dv-src" init >/dev/null
$dv -q -r "$work/dv-src" backup --name vm1 disk0="$work/stage/vm1/disk.raw" >/dev/null
stage vm1 vm1-day1
restic -q -r "$work/restic-src" --cache-dir "$work/rcache" backup "$work/stage/vm1/disk.raw" >/dev/null
$dv -q -r "$work/dv-src" backup --name vm1 --changed-areas disk0="$img/vm1-day1.changed.json" \
  disk0="$work/stage/vm1/disk.raw" >/dev/null
stage vm2 vm2-day0
restic -q -r "$work/restic-src" --cache-dir "$work/rcache" backup "$work/stage/vm2/disk.raw" >/dev/null
$dv -q -r "$work/dv-src" backup --name vm2 disk0="$work/stage/vm2/disk.raw" >/dev/null
rm -rf "$work/stage"

printf '| tool | round | copy wall s | CPU s | peak RSS MiB | destination MiB | restore of vm1-day1 from the copy |\n' > "$work/table.md"
printf '|---|---|---|---|---|---|---|\n' >> "$work/table.md"
copy_once() { # tool round
  local tool=$1 round=$2 dest=$work/dest-$1 cmd restore
  rm -rf "$dest" "$work/r" "$work/rcache-dest"
  if [ "$tool" = restic ]; then
    RESTIC_PASSWORD=dest-pw restic -q -r "$dest" init --from-repo "$work/restic-src" --copy-chunker-params >/dev/null
    cmd="RESTIC_PASSWORD=dest-pw restic -q -r $dest --cache-dir $work/rcache-dest copy --from-repo $work/restic-src"
    restore="RESTIC_PASSWORD=dest-pw restic -q -r $dest --cache-dir $work/rcache-dest restore latest --path $work/stage/vm1/disk.raw --target $work/r && cmp $work/r$work/stage/vm1/disk.raw $img/vm1-day1.raw"
  else
    DISKVAULT_PASSWORD=dest-pw $dv -q -r "$dest" init >/dev/null
    cmd="DISKVAULT_PASSWORD=dest-pw $dv -q -r $dest copy --from-repo $work/dv-src"
    restore="DISKVAULT_PASSWORD=dest-pw $dv -q -r $dest restore latest --name vm1 --target $work/r.raw && cmp $work/r.raw $img/vm1-day1.raw"
  fi
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  /usr/bin/time -f "%e %U %S %M" -o "$work/t" bash -c "$cmd" > "$work/$tool.log" 2>&1 || { echo "$tool copy failed:"; tail -5 "$work/$tool.log"; }
  read -r wall user sys rss < "$work/t"
  local verdict=cmp-ok
  bash -c "$restore" > "$work/$tool-restore.log" 2>&1 || verdict="FAILED: $(tail -1 "$work/$tool-restore.log")"
  rm -rf "$work/r" "$work/r.raw"
  local mib; mib=$(du -sm "$dest" | cut -f1)
  awk -v t="$tool" -v n="$round" -v w="$wall" -v u="$user" -v y="$sys" -v r="$rss" -v m="$mib" -v v="$verdict" \
    'BEGIN{printf "| %s | %d | %.2f | %.1f | %.0f | %d | %s |\n", t, n, w, u+y, r/1024, m, v}' >> "$work/table.md"
}
for round in $(seq 1 "$rounds"); do
  copy_once restic "$round"
  copy_once diskvault "$round"
done
cat "$work/table.md"
