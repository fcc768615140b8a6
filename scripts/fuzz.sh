#!/usr/bin/env bash
# Builds every cargo-fuzz target and runs each for a bounded time on the committed seed corpus
# (fuzz/corpus/<target>/). New inputs go to a scratch directory, so the committed corpus stays as it is.
# usage: scripts/fuzz.sh [SECONDS_PER_TARGET]   (default 15; env FUZZ_TARGETS to pick targets)
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-${FUZZ_SECONDS:-15}}
if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "fuzz: installing cargo-fuzz"
  cargo install cargo-fuzz --locked --version 0.13.2 >/dev/null
fi
# libFuzzer needs nightly-only rustc flags; the machine has only a stable toolchain.
export RUSTC_BOOTSTRAP=1
targets=${FUZZ_TARGETS:-$(cd fuzz/fuzz_targets && ls *.rs | sed 's/\.rs$//')}
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
cargo fuzz build --fuzz-dir fuzz >/dev/null
for t in $targets; do
  mkdir -p "$scratch/$t"
  echo "== fuzz $t (${secs}s)"
  extra=()
  # The NBD server's worker threads free their thread-locals (crossbeam's channel context) as they exit,
  # just after the connection's thread scope has seen them finish: LeakSanitizer then reports those bytes
  # as leaked now and then, and libFuzzer stops the run there. Allocation limits are still enforced.
  [ "$t" = nbd_server ] && extra=(-detect_leaks=0)
  cargo fuzz run --fuzz-dir fuzz "$t" "$scratch/$t" "fuzz/corpus/$t" -- \
    -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 "${extra[@]}" 2>&1 | grep -E '^(stat::number_of_executed_units|stat::new_units_added|==|SUMMARY|ERROR)' || true
  # cargo fuzz exits non-zero on a crash; pipefail is hidden by grep, so check for artifacts.
  # (Any one kind of artifact: `ls` of the three patterns at once failed unless all three kinds existed.)
  if [ -n "$(find fuzz/artifacts/"$t" -maxdepth 1 \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' \) 2>/dev/null)" ]; then
    echo "fuzz: $t found a failing input in fuzz/artifacts/$t" >&2
    exit 1
  fi
done
echo "fuzz: all targets ran ${secs}s without failures"
