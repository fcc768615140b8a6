#!/usr/bin/env bash
# Prune's scale benchmark: synthetic repositories of 100k, 1M and 3M tiny blocks (examples/synthetic_repo.rs);
# forget the older half of the snapshots, prune; report time and peak RSS. Peak RSS must not grow with the
# block count. Usage: benches/prune-scale.sh [WORKDIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work="${1:-$(mktemp -d)}"
cargo build --release --example synthetic_repo
bin=target/release/examples/synthetic_repo
out=benches/results/prune-scale.txt
{
  echo "# prune scale benchmark, $(date -u +%F), $(nproc) cores"
  for n in 100000 1000000 3000000; do
    rm -rf "$work/r$n" "$work/c$n"
    "$bin" generate "$work/r$n" "$n"
    echo "$n blocks, $(du -sh "$work/r$n" | cut -f1) repository:"
    "$bin" prune "$work/r$n" "$work/c$n"
    rm -rf "$work/r$n" "$work/c$n"
  done
} | tee "$out"
