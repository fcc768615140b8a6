#!/usr/bin/env bash
# Prune's scale benchmark: synthetic repositories of 100k, 1M and 3M tiny blocks (examples/synthetic_repo.rs);
# first the commands that hold per-block state in memory (check, stats, snapshots --verified) through the
# `diskvault` command, then forget the older half of the snapshots and prune; report time and peak RSS. Prune's
# peak must not grow with the block count. Usage: benches/prune-scale.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d)}"
cargo build --release --example synthetic_repo --bin diskvault
bin=target/release/examples/synthetic_repo
# The synthetic blocks are 64 bytes where manifests say 1 MiB: check reports every block unreadable (exit code 1),
# which it keeps as runs.
timed() {
  local what=$1; shift
  /usr/bin/time -f "$what: %e s, peak RSS %M KiB" env DISKVAULT_PASSWORD=synthetic DISKVAULT_CACHE_DIR="$cache" \
    target/release/diskvault -q -r "$repo" "$@" 2>&1 >/dev/null | tail -1
}
out=benches/results/prune-scale.txt
{
  echo "# prune scale benchmark, $(date -u +%F), $(nproc) cores"
  for n in 100000 1000000 3000000; do
    rm -rf "$work/r$n" "$work/c$n"
    "$bin" generate "$work/r$n" "$n"
    echo "$n blocks, $(du -sh "$work/r$n" | cut -f1) repository:"
    repo="$work/r$n" cache="$work/c$n-cli"
    timed "first command, building the index cache (snapshots --verified)" snapshots --verified
    timed "check" check || true
    timed "stats" stats
    timed "snapshots --verified" snapshots --verified
    rm -rf "$cache"
    "$bin" prune "$work/r$n" "$work/c$n"
    rm -rf "$work/r$n" "$work/c$n"
  done
} | tee "$out"
