#!/usr/bin/env python3
"""Issue 8's targets, checked against the rounds of one `benches/compare.sh` run.

    benches/targets.py [--ideal IDEAL_JSON] [--durable DURABLE_FILE] FLOOR_FILE RESULT_DIR...

Each RESULT_DIR is one round of ../shared/bench/bench-peers.sh (results.csv, logs/). FLOOR_FILE holds the floor
of the CBT incremental as compare.sh measures it ("read+hash 0.10 0.11 0.10", one line per mode). IDEAL_JSON is
../shared/bench/analyze-workload.py's account of the blocks each image adds that no earlier one holds, and what
they take compressed one by one: the second VM must add no more than its own. DURABLE_FILE holds compare.sh's
restores of vm1-day1 timed until the output is on disk ("restic 3.1 3.2 3.0", "diskvault 1.4 1.5 1.4"): the
restore target is then also given with restic's write-back counted (medians; one value, not per round). Prints
one table: each target's ratio in every round, the median over the rounds, and in how many rounds it was met.
"""
import csv
import json
import os
import re
import statistics
import sys

MIB = 1 << 20


def load(result_dir):
    rows = {}
    with open(os.path.join(result_dir, "results.csv")) as f:
        for r in csv.DictReader(f):
            rows[(r["tool"], r["step"])] = r
    return rows


def num(rows, tool, step, field="wall_s"):
    r = rows.get((tool, step))
    if r is None or r.get(field) in (None, "") or r.get("rc") not in ("0", None):
        return None
    return float(r[field])


def aes_rate(result_dir):
    """AES-256-GCM bytes/s at 1 MiB, from the openssl speed log of the limits step."""
    try:
        with open(os.path.join(result_dir, "logs", "limits-openssl-aes256gcm-1m.log")) as f:
            m = re.search(r"AES-256-GCM\s+([0-9.]+)k", f.read())
    except OSError:
        return None
    return float(m.group(1)) * 1000 if m else None


def machine_limit(rows, result_dir):
    """The issue's limit: keyed BLAKE3 + zstd + AES-256-GCM over the non-zero blocks, spread over two cores."""
    b3 = num(rows, "limits", "b3sum-1thread-nonzero")
    zstd = num(rows, "limits", "zstd-3-T1-nonzero")
    nonzero = num(rows, "limits", "b3sum-1thread-nonzero", "input_bytes")
    aes = aes_rate(result_dir)
    if None in (b3, zstd, nonzero, aes):
        return None
    return (b3 + zstd + nonzero / aes) / 2


def ratio(a, b):
    return a / b if a is not None and b else None


def unique_blocks(ideal_file, image):
    """(unique blocks, their zstd-compressed MiB) that `image` adds to the images before it, or (None, None)."""
    if not ideal_file:
        return None, None
    with open(ideal_file) as f:
        for step in json.load(f)["steps"]:
            if step["image"] == image:
                return step["new_unique_blocks"], step["new_zstd_mib"]
    return None, None


def round_values(rows, result_dir, floor, ideal):
    dv = lambda step, field="wall_s": num(rows, "diskvault", step, field)  # noqa: E731
    restic = lambda step, field="wall_s": num(rows, "restic", step, field)  # noqa: E731
    limit = machine_limit(rows, result_dir)
    steps = ("a-backup-vm1-day0", "b-backup-vm1-day1", "c-backup-vm2-day0", "e-restore-vm1-day1")
    rss = [dv(step, "maxrss_mib") for step in steps]
    # The restore counts only if its output compared equal and is sparse (fewer bytes allocated than the disk).
    verify = rows.get(("diskvault", "e-verify-cmp"), {}).get("verify", "")
    allocated = re.search(r"alloc=(\d+)", verify)
    disk_bytes = dv("e-restore-vm1-day1", "input_bytes")
    sparse = verify.startswith("cmp-ok") and allocated and disk_bytes and int(allocated.group(1)) < disk_bytes
    added = dv("c-backup-vm2-day0", "repo_bytes"), dv("b-backup-vm1-day1", "repo_bytes")
    vm2_added = (added[0] - added[1]) / MIB if None not in added else None
    stored = dv("c-backup-vm2-day0", "repo_bytes"), restic("c-backup-vm2-day0", "repo_bytes")
    vm2_unique, vm2_unique_mib = ideal
    return {
        "full backup >= 4x restic": (ratio(restic("a-backup-vm1-day0"), dv("a-backup-vm1-day0")), 4, "x"),
        "full backup >= 2x rustic, fixed 1 MiB": (
            ratio(num(rows, "rustic_fixed1m", "a-backup-vm1-day0"), dv("a-backup-vm1-day0")), 2, "x"),
        "full backup >= 70% of the machine limit": (
            ratio(limit, dv("a-backup-vm1-day0")) and 100 * ratio(limit, dv("a-backup-vm1-day0")), 70, "%"),
        "CBT incremental >= 20x restic": (ratio(restic("b-backup-vm1-day1"), dv("b-backup-vm1-day1")), 20, "x"),
        "CBT incremental <= 1.5x read+hash": (ratio(dv("b-backup-vm1-day1"), floor), -1.5, "x"),
        "restore >= 3x restic (and sparse, cmp-identical)": (
            ratio(restic("e-restore-vm1-day1"), dv("e-restore-vm1-day1")) if sparse else 0, 3, "x"),
        "check --read-data >= 3x restic": (ratio(restic("f-check-read-data"), dv("f-check-read-data")), 3, "x"),
        "peak RSS < 256 MiB (4 GiB; 1 and 16 GiB: rss-scale.sh)": (max(rss) if None not in rss else None, -256, " MiB"),
        "stored after the three backups <= restic's": (
            stored[0] / MIB if stored[0] is not None else None,
            -stored[1] / MIB if stored[1] else None,
            " MiB",
        ),
        f"second VM adds <= its {vm2_unique or '?'} unique blocks, compressed alone": (
            vm2_added, -vm2_unique_mib if vm2_unique_mib else None, " MiB"),
    }


def met(value, target):
    """A positive target is a minimum, a negative one a maximum."""
    if value is None or target is None:
        return None
    return value >= target if target > 0 else value <= -target


def fmt(value, unit):
    if value is None:
        return "-"
    return f"{value:.0f}{unit}" if unit in ("%", " MiB") else f"{value:.2f}{unit}"


def main():
    args = sys.argv[1:]
    ideal_file = durable_file = None
    while args[:1] in (["--ideal"], ["--durable"]):
        if args[0] == "--ideal":
            ideal_file = args[1]
        else:
            durable_file = args[1]
        args = args[2:]
    if len(args) < 2:
        sys.exit(__doc__)
    ideal = unique_blocks(ideal_file, "vm2-day0")
    floor = None
    with open(args[0]) as f:
        for line in f:
            parts = line.split()
            if parts and parts[0] == "read+hash":
                floor = statistics.median(float(t) for t in parts[1:])
    rounds = [round_values(load(d), d, floor, ideal) for d in args[1:]]
    n = len(rounds)
    print(f"| issue 8 target | {' | '.join(f'round {i + 1}' for i in range(n))} | median | met |")
    print(f"|---|{'---|' * n}---|---|")
    for name in rounds[0]:
        values = [r[name][0] for r in rounds]
        # The stored-size bound is restic's size in the same round.
        targets = [r[name][1] for r in rounds]
        unit = rounds[0][name][2]
        known = [v for v in values if v is not None]
        median = statistics.median(known) if known else None
        verdicts = [met(v, t) for v, t in zip(values, targets)]
        judged = [v for v in verdicts if v is not None]
        verdict = f"{sum(judged)} of {len(judged)}" if judged else "(reported)" if known else "(not run)"
        cells = " | ".join(
            fmt(v, unit) + (f" (restic {fmt(-t, unit)})" if name.startswith("stored") and t else "")
            + (f" (unique {fmt(-t, unit)})" if name.startswith("second VM") and t else "")
            for v, t in zip(values, targets)
        )
        print(f"| {name} | {cells} | {fmt(median, unit)} | {verdict} |")
    medians = durable_medians(durable_file)
    durable = ratio(medians.get("restic"), medians.get("diskvault"))
    if durable is not None:
        cells = " | ".join("" for _ in range(n))
        print(f"| restore >= 3x restic, both until on disk (restore, then sync -f; 3 runs) | {cells} | "
              f"{fmt(durable, 'x')} | {int(met(durable, 3))} of 1 |")
    if "io-floor" in medians and "restic" in medians:
        # How fast restic's restore divided by 3 is, against the disk alone doing diskvault's restore I/O.
        print(f"| restore: the disk's floor for it is {medians['io-floor']:.2f} s (3x restic until on disk needs "
              f"{medians['restic'] / 3:.2f} s; diskvault {medians.get('diskvault', float('nan')):.2f} s) "
              f"| {' | '.join('' for _ in range(n))} | {fmt(ratio(medians.get('diskvault'), medians['io-floor']), 'x')} "
              f"of the floor | (reported) |")


def durable_medians(durable_file):
    """Median restore-until-on-disk time per tool (and the disk's floor, io-floor), empty without the file."""
    medians = {}
    if not durable_file:
        return medians
    with open(durable_file) as f:
        for line in f:
            parts = line.split()
            if len(parts) > 1:
                medians[parts[0]] = statistics.median(float(t) for t in parts[1:])
    return medians


if __name__ == "__main__":
    main()
