#!/usr/bin/env bash
# diskvault next to restic and borg (and rustic if installed) on the realistic VM images of
# ../shared/bench, in one run, so that the ratios are fair on a noisy machine. Prints one table.
#   benches/compare.sh [SIZE_GIB]        (default 4)
#   env TOOLS="limits restic borg diskvault" to pick tools; SHARED_BENCH=path/to/shared/bench
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-4}
bench=${SHARED_BENCH:-../shared/bench}
data=${DISKVAULT_BENCH_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/diskvault-bench}
cargo build --release --locked
command -v restic >/dev/null && command -v borg >/dev/null || NO_CARGO=${NO_CARGO:-1} "$bench/install-peers.sh"
[ -f "$data/${size}g/vm2-day0.raw" ] || "$bench/make-workload.sh" "$size"
DISKVAULT_BIN=$PWD/target/release/diskvault TOOL_DEFS_DIR=$PWD/benches/peers \
  TOOLS=${TOOLS:-"limits restic borg diskvault"} "$bench/bench-peers.sh" "$size"
