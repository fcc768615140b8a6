//! `check`: a healthy repository passes; damage is reported by name with a non-zero exit.

mod common;

use common::*;

fn setup(e: &Env) {
    // Small packs so that the repository has many of them.
    e.ok(&["init", "--pack-size", "1"]);
    for (i, seed) in [1u64, 2, 3].iter().enumerate() {
        let p = e.path(&format!("d{i}"));
        write(&p, &random_bytes(*seed, 5 * MIB));
        e.backup(&[p.to_str().unwrap(), "--name", &format!("vm{i}")]);
    }
}

/// The number after the first `marker` in check's output.
fn number_after(stdout: &str, marker: &str) -> usize {
    let i = stdout.find(marker).unwrap_or_else(|| panic!("no {marker:?} in the output: {stdout}"));
    stdout[i + marker.len()..].split_whitespace().next().unwrap().parse().unwrap()
}

/// "read N packs".
fn packs_read(stdout: &str) -> usize {
    number_after(stdout, "read ")
}

#[test]
fn healthy_repository_passes() {
    let e = Env::new();
    setup(&e);
    let r = e.ok(&["check", "--read-data"]);
    assert!(r.stdout.contains("no errors found"), "{}", r.stdout);
    assert_eq!(packs_read(&r.stdout), e.objects("packs").len());
    assert!(e.ok(&["check"]).stdout.contains("no errors found"));
}

#[test]
fn subsets_read_the_requested_fraction() {
    let e = Env::new();
    setup(&e);
    let total = e.objects("packs").len();
    assert!(total >= 12, "only {total} packs");
    for (spec, expected) in
        [("1/4", total.div_ceil(4)), ("2/4", total.div_ceil(2)), ("50%", total.div_ceil(2)), ("4/4", total)]
    {
        assert_eq!(packs_read(&e.ok(&["check", "--read-data-subset", spec]).stdout), expected, "{spec}");
    }
    for bad in ["5/4", "0/3", "0%", "x"] {
        assert_eq!(e.run(&["check", "--read-data-subset", bad]).code, 2, "{bad} must be refused");
    }
}

/// "verification: N of M packs never verified".
fn never_verified(stdout: &str) -> usize {
    number_after(stdout, "verification: ")
}

#[test]
fn a_time_budget_reads_the_least_recently_verified_first_and_coverage_is_reported() {
    let e = Env::new();
    setup(&e);
    let total = e.objects("packs").len();
    let quarter = total.div_ceil(4);
    let r = e.ok(&["check", "--read-data-subset", "1/4"]);
    assert_eq!(never_verified(&r.stdout), total - quarter, "{}", r.stdout);

    // At 2 MiB/s the readers get through a few 1 MiB packs before a 1 s budget is spent; the rest waits.
    let r = e.ok(&["check", "--read-data", "--max-duration", "1s", "--limit-download", "2M"]);
    let k = packs_read(&r.stdout);
    assert!(k >= 1 && k <= total - quarter, "a 1 s budget read {k} of {total} packs: {}", r.stdout);
    // Those were packs never verified before, not the quarter verified a moment ago.
    assert_eq!(never_verified(&r.stdout), total - quarter - k, "{}", r.stdout);

    // Without a tight budget everything is read, and the coverage is complete.
    let metrics = e.path("check.prom");
    let r = e.ok(&["check", "--read-data", "--max-duration", "1h", "--metrics-file", metrics.to_str().unwrap()]);
    assert_eq!(packs_read(&r.stdout), total);
    assert_eq!(never_verified(&r.stdout), 0, "{}", r.stdout);
    let prom = std::fs::read_to_string(&metrics).unwrap();
    assert!(
        prom.lines().any(|l| l.starts_with("diskvault_check_packs_never_verified{") && l.ends_with(" 0")),
        "{prom}"
    );
    assert!(prom.contains("diskvault_check_oldest_verification_timestamp_seconds"), "{prom}");

    let r = e.run(&["check", "--max-duration", "1h"]);
    assert_ne!(r.code, 0, "a budget without data to read was accepted");
    assert!(r.stderr.contains("--read-data"), "{}", r.stderr);
}

#[test]
fn flipped_byte_in_data_pack_is_found_by_read_data_only() {
    let e = Env::new();
    setup(&e);
    let pack = e.objects("packs").into_iter().max_by_key(|p| e.object_size(p)).unwrap();
    e.flip(&pack, 100);
    let name = pack.rsplit('/').next().unwrap().to_string();
    // The structure check reads headers only and does not see a damaged blob body.
    e.ok(&["check"]);
    let r = e.fails(&["check", "--read-data"]);
    assert!(r.stderr.contains(&name) && r.stderr.contains("data blob"), "{}", r.stderr);
    assert!(r.stderr.contains("authentication failed"), "{}", r.stderr);
}

#[test]
fn missing_and_truncated_packs_are_found_by_structure_check() {
    let e = Env::new();
    setup(&e);
    let packs = e.objects("packs");
    e.delete_object(&packs[0]);
    let b = e.read_object(&packs[1]);
    e.write_object(&packs[1], &b[..b.len() - 7]);
    let r = e.fails(&["check"]);
    let n0 = packs[0].rsplit('/').next().unwrap();
    let n1 = packs[1].rsplit('/').next().unwrap();
    assert!(r.stderr.contains(n0) && r.stderr.contains("missing"), "{}", r.stderr);
    assert!(r.stderr.contains(n1), "{}", r.stderr);
    assert!(r.stderr.contains("snapshot "), "lost blocks must name the snapshot: {}", r.stderr);
}

#[test]
fn a_damaged_index_file_is_reported_and_stops_no_backup() {
    let e = Env::new();
    setup(&e);
    let idx = &e.objects("index")[0];
    let idx_id = idx.rsplit('/').next().unwrap();
    e.flip(idx, 30);
    let r = e.fails(&["check"]);
    assert!(r.stderr.contains(idx_id) && r.stderr.contains("`repair index`"), "{}", r.stderr);
    let packs = e.objects("packs");
    let r = e.fails(&["prune"]);
    assert!(r.stderr.contains(idx_id) && r.stderr.contains("`repair index`"), "{}", r.stderr);
    assert_eq!(e.objects("packs"), packs, "prune deleted nothing");

    // A host with a new cache. The blobs listed only by the damaged file are not found: a restore that needs
    // them says why.
    std::fs::remove_dir_all(e.cache()).unwrap();
    let target = e.path("out");
    let mut failed = 0;
    for i in 0..3 {
        let _ = std::fs::remove_file(&target);
        let r = e.run(&["restore", "latest", "--name", &format!("vm{i}"), "--target", target.to_str().unwrap()]);
        if r.code != 0 {
            failed += 1;
            assert!(r.stderr.contains("an index file that lists it is damaged"), "{}", r.stderr);
        }
    }
    assert!(failed > 0, "some source's blocks are listed only by the damaged index file");
    // Backups still run, naming the file they leave out (the blocks it alone lists are stored again).
    write(&e.path("d3"), &random_bytes(4, 2 * MIB));
    let r = e.run(&["backup", e.path("d3").to_str().unwrap(), "--name", "vm3"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains(idx_id), "{}", r.stderr);
    write(&e.path("d0"), &random_bytes(1, 5 * MIB));
    assert_eq!(e.run(&["backup", e.path("d0").to_str().unwrap(), "--name", "vm0"]).code, 0);
    // Healed as check said: then every source restores, and prune runs.
    e.ok(&["repair", "index"]);
    for (i, seed) in [1u64, 2, 3].iter().enumerate() {
        assert_eq!(e.restore("latest", &["--name", &format!("vm{i}")]), random_bytes(*seed, 5 * MIB));
    }
    e.ok(&["prune"]);
    assert!(e.ok(&["check", "--read-data"]).stdout.contains("no errors found"));
}

/// "pack headers: N read" and ", M unchanged since an earlier check on this host" (0 without).
fn headers_read_and_known(stdout: &str) -> (usize, usize) {
    let read = number_after(stdout, "pack headers: ");
    let known = stdout.find(" read, ").map_or(0, |_| number_after(stdout, " read, "));
    (read, known)
}

#[test]
fn pack_headers_are_read_once_per_host_unless_a_pack_changes() {
    let e = Env::new();
    setup(&e);
    let packs = e.objects("packs");
    let n = packs.len();
    assert_eq!(headers_read_and_known(&e.ok(&["check"]).stdout), (n, 0));
    assert_eq!(headers_read_and_known(&e.ok(&["check"]).stdout), (0, n));

    // A header altered in place (same size) is what reading the data finds; after that, the structure check
    // reads that header again and reports it too.
    let altered = &packs[0];
    let size = e.object_size(altered) as usize;
    e.flip(altered, size - 20);
    let altered_id = altered.rsplit('/').next().unwrap();
    let r = e.fails(&["check", "--read-data"]);
    assert!(r.stderr.contains(altered_id), "{}", r.stderr);
    let r = e.fails(&["check"]);
    assert!(r.stderr.contains(altered_id), "{}", r.stderr);
    assert_eq!(headers_read_and_known(&r.stdout), (1, n - 1), "{}", r.stdout);

    // A pack whose size changed is read again, whatever the record says.
    let truncated = &packs[1];
    let b = e.read_object(truncated);
    e.write_object(truncated, &b[..b.len() - 7]);
    let r = e.fails(&["check"]);
    assert!(r.stderr.contains(truncated.rsplit('/').next().unwrap()), "{}", r.stderr);
    assert_eq!(headers_read_and_known(&r.stdout), (2, n - 2), "{}", r.stdout);

    // A damaged record is not believed, and neither is another host's absence of one.
    let record = files_below(&e.cache()).into_iter().find(|p| p.ends_with("checked-headers")).unwrap();
    let mut bytes = std::fs::read(&record).unwrap();
    bytes[40] ^= 1;
    std::fs::write(&record, bytes).unwrap();
    assert_eq!(headers_read_and_known(&e.fails(&["check"]).stdout), (n, 0));
    std::fs::remove_dir_all(e.cache()).unwrap();
    assert_eq!(headers_read_and_known(&e.fails(&["check"]).stdout), (n, 0));
}

#[test]
fn a_snapshot_is_verified_alone_reading_only_the_packs_it_needs() {
    let e = Env::new();
    setup(&e);
    let total = e.objects("packs").len();
    let check_vm =
        |i: usize| Run::of(e.command(&["check", "--read-data", "--snapshot", "latest", "--name", &format!("vm{i}")]));
    // vm0's 5 MiB of incompressible data: five 1 MiB data packs, and the pack of its manifest segment.
    let r = check_vm(0);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.starts_with("checked 1 snapshot,"), "{}", r.stdout);
    let read = packs_read(&r.stdout);
    assert!((6..total / 2).contains(&read), "read {read} of {total} packs: {}", r.stdout);

    // A damaged data pack, recorded by a full check, is found by the check of the one snapshot that needs it and
    // spoils no other's; the damage stays recorded (the other checks read less than the whole repository and
    // forget nothing).
    let pack = e.objects("packs").into_iter().max_by_key(|p| e.object_size(p)).unwrap();
    e.flip(&pack, 100);
    e.fails(&["check", "--read-data"]);
    let failed: Vec<usize> = (0..3).filter(|&i| check_vm(i).code != 0).collect();
    assert_eq!(failed.len(), 1, "exactly one snapshot holds that pack's block");
    let r = check_vm(failed[0]);
    assert!(r.stderr.contains(pack.rsplit('/').next().unwrap()), "{}", r.stderr);
    let r = e.fails(&["check"]);
    assert!(r.stderr.contains("found damaged by an earlier check"), "{}", r.stderr);
    // Unknown snapshots are refused, as restore refuses them.
    assert!(e.fails(&["check", "--snapshot", "0000dead"]).stderr.contains("no snapshot with id 0000dead"));
    let r = e.fails(&["check", "--snapshot", "latest", "--name", "no-such-vm"]);
    assert!(r.stderr.contains("no snapshot of source \"no-such-vm\""), "{}", r.stderr);
}

#[test]
fn snapshots_show_how_recently_every_pack_a_restore_reads_was_verified() {
    let e = Env::new();
    setup(&e);
    // Per source: (verified, verified_since_secs, unverified packs, packs, damaged blocks).
    let states = || -> Vec<(String, bool, Option<i64>, u64, u64, u64)> {
        let v = e.ok(&["snapshots", "--verified", "--json"]).json();
        let mut states: Vec<_> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                let st = &s["verification"];
                (
                    s["source"].as_str().unwrap().to_string(),
                    st["verified"].as_bool().unwrap(),
                    st["verified_since_secs"].as_i64(),
                    st["unverified_packs"].as_u64().unwrap(),
                    st["packs"].as_u64().unwrap(),
                    st["damaged_blocks"].as_u64().unwrap(),
                )
            })
            .collect();
        states.sort();
        states
    };
    // Nothing verified yet: each snapshot needs its own packs (5 MiB of its own data, its manifest segment).
    for (source, verified, since, unverified, packs, damaged) in states() {
        assert!(!verified && since.is_none() && damaged == 0, "{source}");
        assert!(packs >= 6 && unverified == packs, "{source}: {unverified} of {packs} packs unverified");
    }
    // Verifying one VM's snapshot verifies it and no other.
    let now = || std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    let before = now();
    e.ok(&["check", "--read-data", "--snapshot", "latest", "--name", "vm1"]);
    let after = now();
    let s = states();
    assert!(s[1].1 && (before..=after).contains(&s[1].2.unwrap()) && s[1].3 == 0, "{s:?}");
    assert!(!s[0].1 && !s[2].1 && s[0].3 == s[0].4, "{s:?}");
    let table = e.ok(&["snapshots", "--verified"]).stdout;
    assert!(table.contains("unverified (") && table.contains("verified (UTC)"), "{table}");

    // A damaged data pack, found by a full check: the snapshot that needs it is damaged, as its restore is, and
    // the others are verified by that check.
    let pack = e.objects("packs").into_iter().max_by_key(|p| e.object_size(p)).unwrap();
    e.flip(&pack, 100);
    e.fails(&["check", "--read-data"]);
    let metrics = e.path("metrics.prom");
    e.ok(&["snapshots", "--verified", "--metrics-file", metrics.to_str().unwrap()]);
    let metrics = std::fs::read_to_string(&metrics).unwrap();
    for (source, verified, _, unverified, _, damaged) in states() {
        let out = e.path(&format!("{source}.out"));
        let restored = e.run(&["restore", "latest", "--name", &source, "--target", out.to_str().unwrap()]).code == 0;
        assert_eq!(restored, damaged == 0, "{source}: damaged blocks {damaged}, restore succeeded: {restored}");
        assert_eq!(verified, restored, "{source}");
        // (The damaged snapshot's damaged pack keeps the time an earlier check verified it, if one did.)
        assert!(!restored || unverified == 0, "{source}: {unverified} packs unverified");
        let (label, value) = (format!("source=\"{source}\"}}"), format!(" {}", !restored as u8));
        let damaged_gauge =
            metrics.lines().find(|l| l.starts_with("diskvault_snapshots_damaged{") && l.contains(&label));
        assert!(damaged_gauge.is_some_and(|l| l.ends_with(&value)), "{source}: {metrics}");
    }
    assert!(e.ok(&["snapshots", "--verified"]).stdout.contains("DAMAGED (1 block)"));
}

#[test]
fn backup_verify_reads_back_what_no_check_verified_and_fails_on_damage_the_snapshot_needs() {
    let e = Env::new();
    e.ok(&["init", "--pack-size", "1"]);
    let d = e.path("d0");
    let mut data = random_bytes(7, 5 * MIB);
    write(&d, &data);
    let backup = |extra: &[&str]| {
        let mut args = vec!["backup", d.to_str().unwrap(), "--name", "vm0"];
        args.extend_from_slice(extra);
        e.run(&args)
    };
    // The first backup's verification reads all it stored; an incremental's, only the packs it added.
    let first = backup(&["--verify"]);
    assert_eq!(first.code, 0, "{}", first.stderr);
    // "verified snapshot ID: read the N of the M packs a restore reads that no check had verified".
    let first_read = number_after(&first.stdout, ": read the ");
    assert!(first_read >= 6 && first_read == number_after(&first.stdout, " of the "), "{}", first.stdout);
    data[MIB..MIB + 4096].copy_from_slice(&random_bytes(8, 4096));
    write(&d, &data);
    let second = backup(&["--verify"]);
    assert_eq!(second.code, 0, "{}", second.stderr);
    let second_read = number_after(&second.stdout, ": read the ");
    assert!((1..first_read).contains(&second_read), "read {second_read} packs, the first {first_read}");
    assert!(number_after(&second.stdout, " of the ") > second_read, "{}", second.stdout);
    let v = e.ok(&["snapshots", "--verified", "--json"]).json();
    assert!(v.as_array().unwrap().iter().all(|s| s["verification"]["verified"] == true), "{v:#}");

    // A backup not verified, its packs damaged: a verified backup that reuses its blocks reads those packs (never
    // verified), fails naming them, and its snapshot is saved all the same.
    let other = e.path("d1");
    let mut other_data = random_bytes(9, 3 * MIB);
    write(&other, &other_data);
    let before = e.objects("packs");
    e.backup(&[other.to_str().unwrap(), "--name", "vm1"]);
    let added: Vec<String> = e.objects("packs").into_iter().filter(|p| !before.contains(p)).collect();
    for pack in &added {
        e.flip(pack, 100);
    }
    other_data[..4096].copy_from_slice(&random_bytes(10, 4096));
    write(&other, &other_data);
    let r = e.run(&["backup", other.to_str().unwrap(), "--name", "vm2", "--verify"]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(added.iter().any(|p| r.stderr.contains(p.rsplit('/').next().unwrap())), "{}", r.stderr);
    assert!(r.stdout.contains("snapshot ") && r.stdout.contains("saved"), "{}", r.stdout);
    let v = e.ok(&["snapshots", "--verified", "--json", "--name", "vm2"]).json();
    assert!(v[0]["verification"]["damaged_blocks"].as_u64().unwrap() > 0, "{v:#}");

    // A pack lost as a whole: the verified backup that reuses its blocks fails naming it and records what the
    // index lists in it, so the next backup of the source stores those blocks again, without a check between.
    let third = e.path("d3");
    let third_data = random_bytes(11, 3 * MIB);
    write(&third, &third_data);
    let before = e.objects("packs");
    e.backup(&[third.to_str().unwrap(), "--name", "vm3"]);
    let lost = e.objects("packs").into_iter().filter(|p| !before.contains(p)).max_by_key(|p| e.object_size(p)).unwrap();
    e.delete_object(&lost);
    let damage_records = e.objects("damaged").len();
    let verified = ["backup", third.to_str().unwrap(), "--name", "vm4", "--verify", "--json"];
    let r = e.run(&verified);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(r.stderr.contains(&format!("{}: missing", lost)), "{}", r.stderr);
    assert_eq!(e.objects("damaged").len(), damage_records + 1, "the lost blobs are recorded");
    let r = e.run(&verified);
    assert_eq!(r.code, 0, "the next backup stores the lost blocks again: {}", r.stderr);
    assert!(r.json()["disks"][0]["new_blocks"].as_u64().unwrap() > 0, "{}", r.stdout);
    assert!(e.restore(r.json()["snapshot"].as_str().unwrap(), &[]) == third_data);
}
