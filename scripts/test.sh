#!/usr/bin/env bash
# The whole test suite: setup, formatting, lints, unit and integration tests.
# This is what CI runs (.ci/run) and what README.md tells developers to run.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Space matters: the S3 server refuses writes on a filesystem with little space left (see tests/common/s3.rs).
df -h . "${TMPDIR:-/tmp}" /dev/shm 2>/dev/null || true

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --locked --all-targets -- -D warnings

echo "== cargo doc (the crate docs' links resolve)"
RUSTDOCFLAGS="-D warnings" cargo doc --locked --no-deps

echo "== tests (local-directory repositories)"
if cargo nextest --version >/dev/null 2>&1; then
  # tests/s3.rs starts its own S3 server; it runs in the S3 pass below, one server per binary.
  cargo nextest run --locked --no-fail-fast -E 'not binary(s3)'
  cargo test --locked --doc
else
  cargo test --locked --no-fail-fast
fi

echo "== tests again, with repositories on S3 (a SeaweedFS server per test binary)"
# cargo test runs one test binary at a time, each sharing one server among its tests.
DISKVAULT_TEST_BACKEND=s3 cargo test --locked --no-fail-fast \
  --test engine --test bad_input --test check --test crash --test integrity --test locks --test forget --test prune --test nbd --test s3 \
  --test delta --test copy --test bandwidth

echo "== fuzz (every parser of stored bytes, the NBD and vSphere clients' answers; bounded time each)"
scripts/fuzz.sh "${FUZZ_SECONDS:-10}"
