#!/usr/bin/env bash
# diskvault next to restic, rustic (default and fixed 1 MiB chunks, if installed) and borg on the realistic VM images of
# ../shared/bench, in one run, so that the ratios are fair on a noisy machine (diskvault_nodelta: the same binary
# with backup --no-delta; diskvault_zstd1: a repository made with init --compression 1). Prints one table.
#   benches/compare.sh [SIZE_GIB]        (default 4)
#   (then the floor of the CBT incremental: examples/cbt_floor.rs, the unique blocks of each image:
#   ../shared/bench/analyze-workload.py, and issue 8's targets: benches/targets.py)
#   env TOOLS="limits restic borg diskvault" to pick tools; ROUNDS=3 to run every tool three times in turn (the
#   targets table then gives each round's ratios and their median); SHARED_BENCH=path/to/shared/bench
set -euo pipefail
cd "$(dirname "$0")/.."
size=${1:-4}
bench=${SHARED_BENCH:-../shared/bench}
data=${DISKVAULT_BENCH_DATA:-${XDG_CACHE_HOME:-$HOME/.cache}/diskvault-bench}
cargo build --release --locked --bin diskvault --example cbt_floor
command -v restic >/dev/null && command -v borg >/dev/null || NO_CARGO=${NO_CARGO:-1} "$bench/install-peers.sh"
[ -f "$data/${size}g/vm2-day0.raw" ] || "$bench/make-workload.sh" "$size"
# rustic (a 30-50 min build) is measured when install-peers.sh has built it into $data/tools/bin.
export PATH="$data/tools/bin:$PATH"
default_tools="limits restic borg diskvault diskvault_nodelta diskvault_zstd1"
command -v rustic >/dev/null &&
  default_tools="limits restic rustic rustic_fixed1m borg diskvault diskvault_nodelta diskvault_zstd1"
img=$data/${size}g
work=$data/bench
floor=$(mktemp)
durable=$(mktemp)
trap 'rm -f "$floor" "$durable"' EXIT
rounds=()
for round in $(seq 1 "${ROUNDS:-1}"); do
  res=$data/results/${size}g-$(date +%Y%m%d-%H%M%S)-round$round
  rounds+=("$res")
  # The repositories are kept (each round starts its own afresh) for the restore-until-on-disk runs below.
  DISKVAULT_BIN=$PWD/target/release/diskvault TOOL_DEFS_DIR=$PWD/benches/peers RES=$res WORK=$work KEEP_REPOS=1 \
    TOOLS=${TOOLS:-$default_tools} "$bench/bench-peers.sh" "$size"
done

# Restore until the data is on disk. bench-peers.sh stops the clock when the restore command exits: restic then
# leaves its 4 GiB in the page cache, written back during the next step's `sync`, while diskvault writes through
# O_DIRECT and fsyncs before it exits (a restore that says done is on disk). Here each restore of vm1-day1 from
# the last round's repositories is timed up to `sync -f` of its output, which flushes what it left dirty
# (alternating tools, cold page cache, three runs each).
restored() { awk -F, -v t="$1" '$1 == t && $2 == "e-restore-vm1-day1" && $11 == 0 {ok = 1} END {exit !ok}' \
  "${rounds[-1]}/results.csv"; }
if restored restic && restored diskvault && sync && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then
  out=$work/restore-durable
  export BENCH_PASSWORD=${BENCH_PASSWORD:-bench-password-not-secret}
  restore_cmd() {
    case $1 in
      restic) echo "RESTIC_PASSWORD=\$BENCH_PASSWORD restic -r $work/repo-restic --cache-dir $out/cache-restic \
        restore latest --host vm1 --target $out/t && mv $out/t$work/stage/vm1/disk.raw $out/vm1-day1.raw" ;;
      diskvault) echo "DISKVAULT_PASSWORD=\$BENCH_PASSWORD DISKVAULT_CACHE_DIR=$out/cache-diskvault \
        $PWD/target/release/diskvault -q -r $work/repo-diskvault restore latest --name vm1 --target $out/vm1-day1.raw" ;;
    esac
  }
  declare -A durable_times=()
  for _ in 1 2 3; do
    for tool in restic diskvault; do
      rm -rf "$out/t" "$out/vm1-day1.raw"; mkdir -p "$out"
      sync; echo 3 > /proc/sys/vm/drop_caches
      start=$(date +%s.%N)
      bash -c "$(restore_cmd $tool) && sync -f $out/vm1-day1.raw" > /dev/null 2>&1 || { echo "$tool restore failed"; exit 1; }
      t=$(echo "$(date +%s.%N) - $start" | bc)
      cmp -s "$out/vm1-day1.raw" "$img/vm1-day1.raw" || { echo "$tool restored vm1-day1 differs"; exit 1; }
      durable_times[$tool]="${durable_times[$tool]:-} $(printf %.2f "$t")"
    done
  done
  # The disk's own floor for that restore: reading diskvault's packs (4 readers) while writing as many bytes
  # as the restore writes (vm1-day1's non-zero blocks) with O_DIRECT, as the restore does; no CPU work at all.
  mib=$(awk -F, '$1 == "diskvault" && $2 == "e-verify-cmp" {print $12}' "${rounds[-1]}/results.csv" |
    sed -n 's/.*alloc=\([0-9]*\).*/\1/p' | awk '{print int($1 / 1048576)}')
  for _ in 1 2 3; do
    rm -f "$out/floor.raw"
    sync; echo 3 > /proc/sys/vm/drop_caches
    start=$(date +%s.%N)
    dd if=/dev/zero of="$out/floor.raw" bs=8M count=$((${mib:-0} / 8)) oflag=direct status=none &
    find "$work/repo-diskvault/packs" -type f -print0 | xargs -0 -P4 -n8 cat > /dev/null
    wait
    sync -f "$out/floor.raw"
    durable_times[io-floor]="${durable_times[io-floor]:-} $(printf %.2f "$(echo "$(date +%s.%N) - $start" | bc)")"
  done
  rm -rf "$out"
  echo
  echo "| restore of vm1-day1 until on disk (restore, then sync -f) | run 1 s | run 2 s | run 3 s |"
  echo "|---|---|---|---|"
  for tool in restic diskvault io-floor; do
    echo "| $tool | $(echo ${durable_times[$tool]} | sed 's/ / | /g') |"
    echo "$tool ${durable_times[$tool]}" >> "$durable"
  done
  echo "(io-floor: the disk alone, reading diskvault's packs while writing vm1-day1's ${mib:-?} MiB of non-zero blocks)"
fi
[ "${KEEP_REPOS:-0}" = 1 ] || rm -rf "$work"/repo-*

# The floor of the CBT incremental (b-backup-vm1-day1 above), measured after the peers in the same run: just
# reading the blocks the changed-areas file names and hashing them, then also compressing and encrypting them
# whole (examples/cbt_floor.rs; cold page cache, all cores, three runs each).
if [ -f "$img/vm1-day1.changed.json" ] && sync && echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; then
  echo
  echo "| floor of the CBT incremental of vm1-day1 | run 1 s | run 2 s | run 3 s |"
  echo "|---|---|---|---|"
  for mode in read+hash read+hash+seal; do
    flag=""; [ $mode = read+hash+seal ] && flag=--seal
    times=""
    for _ in 1 2 3; do
      sync; echo 3 > /proc/sys/vm/drop_caches
      t=$(target/release/examples/cbt_floor "$img/vm1-day1.raw" "$img/vm1-day1.changed.json" $flag | awk '{print $NF}')
      times="$times | $t"
    done
    echo "| $mode$times |"
    echo "$mode ${times//|/}" >> "$floor"
  done
fi
# What each image adds that no earlier one holds, as a fixed 1 MiB block engine without deltas would store it
# (unique blocks, each compressed alone with zstd -3): the second VM's target compares with this.
ideal=$img/ideal-fixed-1024k-zstd3.json
[ "$ideal" -nt "$img/vm2-day0.raw" ] || python3 "$bench/analyze-workload.py" "$img" > /dev/null
echo
python3 benches/targets.py --ideal "$ideal" --durable "$durable" "$floor" "${rounds[@]}"
