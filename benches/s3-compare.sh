#!/usr/bin/env bash
# Backup and restore throughput against a local SeaweedFS S3 server: diskvault next to restic's S3 backend,
# in one run, on the ../shared/bench workload image (vm1-day0, default 4 GiB).
#   benches/s3-compare.sh [SIZE_GIB]
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-4}
data=${DISKVAULT_BENCH_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/diskvault-bench}
img=$data/${size}g/vm1-day0.raw
[ -f "$img" ] || { echo "missing $img: run ../shared/bench/make-workload.sh $size"; exit 1; }
scripts/setup.sh
cargo build --release --locked
dv=$PWD/target/release/diskvault
work=$(mktemp -d)
. benches/s3-server.sh
start_s3 "$work"
ep=http://127.0.0.1:$port
export RESTIC_PASSWORD=bench DISKVAULT_PASSWORD=bench DISKVAULT_CACHE_DIR=$work/dvcache
imgsz=$(stat -c %s "$img")
printf '| tool | step | wall s | MB/s (image) | CPU s | peak RSS MiB |\n|---|---|---|---|---|---|\n' > "$work/table.md"
run() { # tool step cmd...
  local tool=$1 step=$2; shift 2
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  /usr/bin/time -f "%e %U %S %M" -o "$work/t" bash -c "$*" > "$work/$tool-$step.log" 2>&1 || { echo "$tool $step failed:"; tail -5 "$work/$tool-$step.log"; }
  read -r wall user sys rss < "$work/t"
  awk -v t="$tool" -v s="$step" -v w="$wall" -v u="$user" -v y="$sys" -v r="$rss" -v b="$imgsz" \
    'BEGIN{printf "| %s | %s | %.2f | %.0f | %.1f | %.0f |\n", t, s, w, b/1048576/w, u+y, r/1024}' >> "$work/table.md"
}
run restic init "restic -r s3:$ep/restic-bench init --repository-version 2"
run restic backup "restic -r s3:$ep/restic-bench --cache-dir $work/rcache backup $img"
run restic restore "restic -r s3:$ep/restic-bench --cache-dir $work/rcache restore latest --target $work/r"
cmp "$work/r$img" "$img" && echo "restic restore: cmp ok" || echo "restic restore: CMP FAILED"
rm -rf "$work/r"
run diskvault init "$dv -q -r s3:$ep/diskvault-bench/repo init"
run diskvault backup "$dv -q -r s3:$ep/diskvault-bench/repo backup --upload-concurrency 4 disk0=$img"
run diskvault restore "$dv -q -r s3:$ep/diskvault-bench/repo restore latest --fetchers 8 --target $work/d.raw"
cmp "$work/d.raw" "$img" && echo "diskvault restore: cmp ok" || echo "diskvault restore: CMP FAILED"
cat "$work/table.md"
