#!/usr/bin/env bash
# Peak RSS of backup and restore against disk size: sparse 1 GiB and 16 GiB images with the same density of
# real data (one 1 MiB block in every 8 taken from ../shared/bench's vm1-day0 non-zero blocks, each made
# unique), backed up into a fresh local repository and restored. Peak RSS must not grow with the disk.
# Usage: [SIZES="1 16 64"] benches/rss-scale.sh [WORKDIR]    Results: benches/results/rss-scale.txt
set -euo pipefail
cd "$(dirname "$0")/.."
data=${DISKVAULT_BENCH_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/diskvault-bench}
src="$data/4g/vm1-day0.nonzero.bin"
[ -f "$src" ] || { echo "run benches/compare.sh first (it builds $src)"; exit 1; }
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
cargo build --release --locked
dv=$PWD/target/release/diskvault
export DISKVAULT_PASSWORD=bench DISKVAULT_CACHE_DIR="$work/cache"
out=benches/results/rss-scale.txt
{
  echo "# backup/restore peak RSS by disk size, $(date -u +%F), $(nproc) cores"
  for gib in ${SIZES:-1 16}; do
    img="$work/disk-$gib.raw"
    python3 - "$src" "$img" "$gib" <<'PY'
import sys
src, dst, gib = sys.argv[1], sys.argv[2], int(sys.argv[3])
mib = 1 << 20
with open(src, "rb") as s, open(dst, "wb") as d:
    d.truncate(gib << 30)
    blocks = (gib << 30) // mib
    for i in range(0, blocks, 8):
        b = s.read(mib)
        if len(b) < mib:
            s.seek(0)
            b = s.read(mib)
        d.seek(i * mib)
        d.write(i.to_bytes(8, "little") + b[8:])
PY
    rm -rf "$work/repo" "$work/cache" "$work/out.raw"
    "$dv" -q -r "$work/repo" init >/dev/null
    /usr/bin/time -f "$gib GiB backup:  %e s wall, %M KiB peak RSS" "$dv" -q -r "$work/repo" backup --name d "$img" >/dev/null
    /usr/bin/time -f "$gib GiB restore: %e s wall, %M KiB peak RSS" "$dv" -q -r "$work/repo" restore latest --target "$work/out.raw" >/dev/null
    cmp "$img" "$work/out.raw" && echo "$gib GiB restore identical ($(du -sh "$work/repo" | cut -f1) repository)"
    rm -rf "$img" "$work/repo" "$work/cache" "$work/out.raw"
  done
} 2>&1 | tee "$out"
