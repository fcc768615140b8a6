#!/usr/bin/env bash
# The whole test suite: setup, formatting, lints, unit and integration tests.
# This is what CI runs (.ci/run) and what README.md tells developers to run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --locked --no-fail-fast
  cargo test --locked --doc
else
  cargo test --locked --no-fail-fast
fi

echo "== fuzz (every parser of stored bytes, bounded time each)"
scripts/fuzz.sh "${FUZZ_SECONDS:-10}"
