#!/usr/bin/env bash
# Instant access next to restore: the same snapshot read sequentially through `diskvault serve` by
# `qemu-img convert` (an NBD client reading the whole export) and written by `diskvault restore`, in one run.
# Both outputs are compared with the source image. Then what a booting guest does: 300 reads of 64 KiB at
# random places of the data, one at a time (qemu-io), from a freshly started serve.
# Usage: benches/serve-throughput.sh IMAGE [WORKDIR] (IMAGE: a raw disk image, e.g. ../shared/bench's
# vm1-day0.raw)
set -euo pipefail
cd "$(dirname "$0")/.."
image=$(realpath "$1")
work="${2:-$(mktemp -d)}"
# DISKVAULT_BIN: another build to measure (say the previous commit's), else this tree's.
[ -n "${DISKVAULT_BIN:-}" ] || cargo build --release --bin diskvault >/dev/null
dv=${DISKVAULT_BIN:-$PWD/target/release/diskvault}
export DISKVAULT_PASSWORD=bench DISKVAULT_REPOSITORY="$work/repo" DISKVAULT_CACHE_DIR="$work/cache"
rm -rf "$work/repo" "$work/cache" "$work/restored.raw" "$work/served.raw"
"$dv" -q init >/dev/null
"$dv" -q backup --name bench "disk=$image" >/dev/null
sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
timed() { /usr/bin/time -f "%e s, %M KiB peak RSS" "$@" 2>&1 >/dev/null | tail -1; }
size=$(stat -c %s "$image")
rate() { awk -v s="$size" -v t="$1" 'BEGIN { printf "%.0f MiB/s", s / 1048576 / t }'; }
out=benches/results/serve-throughput.txt
{
  echo "# serve vs restore, $(date -u +%F), $(nproc) cores, image $(basename "$image") ($((size >> 20)) MiB)"
  r=$(timed "$dv" -q restore latest --target "$work/restored.raw")
  echo "restore:                       $r ($(rate "${r%% s*}"))"
  "$dv" -q serve --socket "$work/serve.sock" > "$work/serve.out" &
  pid=$!
  for _ in $(seq 100); do [ -S "$work/serve.sock" ] && break; sleep 0.1; done
  export_name=$(sed -n 2p "$work/serve.out" | awk '{print $1}')
  s=$(timed qemu-img convert -f raw -O raw "nbd+unix:///$export_name?socket=$work/serve.sock" "$work/served.raw")
  echo "serve + qemu-img convert:      $s ($(rate "${s%% s*}")); RSS is qemu-img's"
  echo "serve's peak RSS:              $(grep VmHWM /proc/$pid/status | awk '{print $2, $3}')"
  # Random reads: offsets drawn (fixed seed) from the export's data extents, 64 KiB aligned.
  uri="nbd+unix:///$export_name?socket=$work/serve.sock"
  nbdinfo --map "$uri" | awk '$3 == 0 { print $1, $2 }' > "$work/data-extents"
  kill $pid; wait $pid || true
  python3 - "$work/data-extents" > "$work/random-reads" <<'PY'
import random, sys
extents = [tuple(map(int, l.split())) for l in open(sys.argv[1])]
total = sum(n for _, n in extents) // 65536
rng = random.Random(7)
for _ in range(300):
    r = rng.randrange(total) * 65536
    for start, n in extents:
        if r < n:
            print(f"read {start + r} 65536")
            break
        r -= n
PY
  "$dv" -q serve --socket "$work/serve.sock" > "$work/serve.out" &
  pid=$!
  for _ in $(seq 100); do [ -S "$work/serve.sock" ] && break; sleep 0.1; done
  sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  q=$(timed qemu-io -r -f raw "$uri" < "$work/random-reads")
  echo "300 random 64 KiB reads, QD1:  ${q%%,*} ($(awk -v t="${q%% s*}" 'BEGIN { printf "%.1f ms each", t * 1000 / 300 }'))"
  kill $pid; wait $pid || true
  cmp "$image" "$work/restored.raw" && cmp "$image" "$work/served.raw" && echo "both outputs equal the image"
} | tee "$out"
rm -rf "$work/restored.raw" "$work/served.raw"
