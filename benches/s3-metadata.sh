#!/usr/bin/env bash
# The commands that read many small objects (snapshots, index files, manifest segments, pack headers) against S3
# with latency: a local SeaweedFS behind benches/lagproxy.py (DELAY_MS per burst each way: a 10 ms delay is a
# ~20 ms round trip). The repository holds SNAPSHOTS snapshots of one sparse 16 GiB disk (256 MiB of data): a
# full backup, then incrementals that each change one block, as daily backups of a quiet VM do; they share most
# manifest segments. Times check, snapshots, stats, diff (first against last) and, after forgetting all but the
# last 10, prune. Then the CBT incremental of a thin 256 GiB disk (64 segments, 512 MiB of data) changed in one
# block of each segment, which reads the parent's segments. Then check, twice, of a repository of PACKS packs.
#   benches/s3-metadata.sh [DELAY_MS]      (default 10; env SNAPSHOTS, default 60; PACKS, default 2048; DV: another
#                                           diskvault binary, e.g. an older one, timed instead of this tree's)
# Results: benches/results/s3-metadata.txt (appended)
set -euo pipefail
cd "$(dirname "$0")/.."
delay=${1:-10}
snapshots=${SNAPSHOTS:-60}
PACKS=${PACKS:-2048}
scripts/setup.sh
[ -n "${DV:-}" ] || cargo build --release --locked
dv=${DV:-$PWD/target/release/diskvault}
work=$(mktemp -d)
. benches/s3-server.sh
export DISKVAULT_PASSWORD=bench DISKVAULT_CACHE_DIR=$work/cache
start_s3 "$work" "$delay"

# The repository, written without the proxy.
direct="s3:http://127.0.0.1:$port/bench/meta"
python3 - "$work/disk.raw" <<'PY'
import os, sys
with open(sys.argv[1], "wb") as d:
    d.truncate(16 << 30)
    for i in range(0, 16 << 10, 64):
        d.seek(i << 20)
        d.write(os.urandom(1 << 20))
PY
"$dv" -q -r "$direct" init > /dev/null
"$dv" -q -r "$direct" backup --name vm "d=$work/disk.raw" > /dev/null
for i in $(seq 2 "$snapshots"); do
  block=$(( (i * 2654435761) % (16 << 10) ))
  head -c 4096 /dev/urandom | dd of="$work/disk.raw" bs=4096 seek=$((block * 256)) conv=notrunc status=none
  echo "{\"changed\":[{\"offset\":$((block << 20)),\"length\":4096}]}" > "$work/changed.json"
  "$dv" -q -r "$direct" backup --name vm --changed-areas "d=$work/changed.json" "d=$work/disk.raw" > /dev/null
done

repo="s3:http://127.0.0.1:$lag/bench/meta"
first=$("$dv" -q -r "$direct" snapshots --json | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["id"])')
out=benches/results/s3-metadata.txt
{
  echo "# $snapshots snapshots of a 16 GiB disk on S3 behind a ${delay} ms proxy, $(date -u +%F), $(nproc) cores, $("$dv" --version)${DV:+ ($DV)}"
  timed() { /usr/bin/time -f "$1: %e s wall, %M KiB peak RSS" "${@:2}" > /dev/null; }
  timed "check" "$dv" -q -r "$repo" check
  timed "snapshots" "$dv" -q -r "$repo" snapshots
  timed "stats" "$dv" -q -r "$repo" stats
  timed "diff first..last" "$dv" -q -r "$repo" diff "$first" latest
  "$dv" -q -r "$direct" forget --keep-last 10 > /dev/null
  timed "prune (after forget --keep-last 10)" "$dv" -q -r "$repo" prune
  timed "check after prune" "$dv" -q -r "$repo" check
  python3 - "$work/big.raw" "$work/big.json" <<'PY'
import json, os, sys
with open(sys.argv[1], "wb") as d:
    d.truncate(256 << 30)
    for i in range(0, 256 << 10, 512):
        d.seek(i << 20)
        d.write(os.urandom(1 << 20))
json.dump({"changed": [{"offset": (s * 4096) << 20, "length": 4096} for s in range(64)]}, open(sys.argv[2], "w"))
PY
  "$dv" -q -r "$direct" backup --name big "d=$work/big.raw" > /dev/null
  for s in $(seq 0 63); do
    head -c 4096 /dev/urandom | dd of="$work/big.raw" bs=4096 seek=$((s * 4096 * 256)) conv=notrunc status=none
  done
  timed "CBT incremental of a 256 GiB disk, a block changed in each of its 64 segments" \
    "$dv" -q -r "$repo" backup --name big --changed-areas "d=$work/big.json" "d=$work/big.raw"
  # A repository of many packs (1 MiB packs, one incompressible block each): check reads every pack's header;
  # a second check only those this host has not found in agreement with the index before.
  head -c $((PACKS << 20)) /dev/urandom > "$work/many.raw"
  "$dv" -q -r "$direct-many" init --pack-size 1 > /dev/null
  "$dv" -q -r "$direct-many" backup --name many "d=$work/many.raw" > /dev/null
  timed "check of $PACKS packs" "$dv" -q -r "$repo-many" check
  timed "check of $PACKS packs again" "$dv" -q -r "$repo-many" check
} 2>&1 | tee -a "$out"
