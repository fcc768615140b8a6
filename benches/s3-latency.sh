#!/usr/bin/env bash
# The CBT incremental of ../shared/bench's vm1-day1 against S3 with latency: a local SeaweedFS behind
# benches/lagproxy.py (DELAY_MS per burst each way), with and without delta blobs, each on a repository that
# holds vm1-day0 (stored without the proxy). Delta blobs read their bases back from the repository: this shows
# what that costs when every read is a round trip.
#   benches/s3-latency.sh [DELAY_MS]      (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
delay=${1:-10}
data=${DISKVAULT_BENCH_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/diskvault-bench}
img=$data/4g
[ -f "$img/vm1-day1.changed.json" ] || { echo "missing $img: run ../shared/bench/make-workload.sh 4"; exit 1; }
scripts/setup.sh
cargo build --release --locked
dv=$PWD/target/release/diskvault
work=$(mktemp -d)
. benches/s3-server.sh
export DISKVAULT_PASSWORD=bench
start_s3 "$work" "$delay"
for round in 1 2; do
  for mode in delta no-delta; do
    name=$mode-$round; flag=""; [ $mode = no-delta ] && flag=--no-delta
    export DISKVAULT_CACHE_DIR=$work/cache-$name
    "$dv" -q -r "s3:http://127.0.0.1:$port/bench/$name" init > /dev/null
    "$dv" -q -r "s3:http://127.0.0.1:$port/bench/$name" backup $flag --name vm1 "disk0=$img/vm1-day0.raw" > /dev/null
    sync; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
    /usr/bin/time -f "incremental, $mode, ${delay} ms proxy: %e s wall" \
      "$dv" -q -r "s3:http://127.0.0.1:$lag/bench/$name" backup $flag --name vm1 \
      --changed-areas "disk0=$img/vm1-day1.changed.json" "disk0=$img/vm1-day1.raw" | tail -1
  done
done
