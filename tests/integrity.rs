//! Integrity on the bad day: damaged data and metadata, partial restores, `repair snapshots`, verification
//! that covers the whole repository over repeated subset checks, and faults (full disk, unusable cache,
//! concurrent backups).

mod common;

use std::collections::HashSet;

use common::*;

/// A repository with 1 MiB packs (one block per data pack) and one 8 MiB snapshot; returns the image.
fn setup(e: &Env) -> Vec<u8> {
    e.ok(&["init", "--pack-size", "1"]);
    let img = random_bytes(11, 8 * MIB);
    write(&e.path("img"), &img);
    e.backup(&[e.path("img").to_str().unwrap(), "--name", "vm"]);
    img
}

/// One of the data packs (with 1 MiB packs each holds one block).
fn a_data_pack(e: &Env) -> String {
    e.objects("packs").into_iter().find(|p| e.object_size(p) > MIB as u64).unwrap()
}

fn id_of(name: &str) -> &str {
    name.rsplit('/').next().unwrap()
}

#[test]
fn partial_restore_restores_the_rest_and_names_the_damaged_range() {
    let e = Env::new();
    let img = setup(&e);
    let first = e.ok(&["snapshots", "--json"]).json()[0]["id"].as_str().unwrap().to_string();
    let pack = a_data_pack(&e);
    e.flip(&pack, 5000);
    let t = e.path("out");
    let r = e.fails(&["restore", "latest", "--target", t.to_str().unwrap()]);
    assert!(r.stderr.contains("cannot be restored") && r.stderr.contains("bytes "), "{}", r.stderr);
    assert!(r.stderr.contains("recorded 1 damaged blob copy"), "{}", r.stderr);

    let _ = std::fs::remove_file(&t);
    let r = e.run(&["restore", "latest", "--target", t.to_str().unwrap(), "--allow-partial", "--verify"]);
    assert_eq!(r.code, 3, "partial restore exits with 3: {}", r.stderr);
    let line = r.stderr.lines().find(|l| l.starts_with("damaged: bytes ")).unwrap_or_else(|| panic!("{}", r.stderr));
    let range = line["damaged: bytes ".len()..].split_whitespace().next().unwrap();
    let (s, end) = range.split_once("..").unwrap();
    let (s, end): (usize, usize) = (s.parse().unwrap(), end.parse().unwrap());
    assert_eq!(end - s, MIB, "exactly one block is damaged");
    assert!(line.contains(id_of(&pack)), "{line}");
    let out = std::fs::read(&t).unwrap();
    assert_eq!(out.len(), img.len());
    assert!(out[s..end].iter().all(|&b| b == 0), "the damaged range is zeros, never wrong bytes");
    assert_eq!(&out[..s], &img[..s]);
    assert_eq!(&out[end..], &img[end..]);

    // The restore recorded what it found: the next backup of the source stores the block again, with no check
    // run, and the snapshot restores whole.
    assert_eq!(e.objects("damaged").len(), 1, "recorded once: {}", r.stderr);
    let again = e.backup(&[e.path("img").to_str().unwrap(), "--name", "vm"]);
    assert_eq!(again["disks"][0]["new_blocks"], 1);
    assert_eq!(e.restore(&first, &[]), img);
}

#[test]
fn damaged_segment_is_reported_and_repair_snapshots_marks_it() {
    let e = Env::new();
    let img = setup(&e);
    let meta = e.objects("packs").into_iter().find(|p| e.object_size(p) < 4096).unwrap();
    e.flip(&meta, 20);
    let r = e.fails(&["check"]);
    assert!(r.stderr.contains("segment"), "{}", r.stderr);
    let t = e.path("out");
    let r = e.fails(&["restore", "latest", "--target", t.to_str().unwrap()]);
    assert!(r.stderr.contains("segment"), "{}", r.stderr);

    // Listing changes nothing.
    let snaps_before = e.objects("snapshots");
    let out = e.ok(&["repair", "snapshots"]).stdout;
    assert!(out.contains("disk img") && out.contains(&format!("bytes 0..{}", img.len())), "{out}");
    assert_eq!(e.objects("snapshots"), snaps_before);

    let out = e.ok(&["repair", "snapshots", "--write", "--forget"]).stdout;
    assert!(out.contains("repaired as"), "{out}");
    let snaps = e.ok(&["snapshots", "--json"]).json();
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    assert!(snaps[0]["tags"].as_array().unwrap().iter().any(|t| t == "repaired"));
    let _ = std::fs::remove_file(&t);
    let r = e.ok(&["restore", "latest", "--target", t.to_str().unwrap()]);
    assert!(r.stderr.contains("was repaired"), "restore must warn about lost ranges: {}", r.stderr);
    assert!(std::fs::read(&t).unwrap().iter().all(|&b| b == 0));
    // The restore recorded the damaged segment, which check reports until prune takes it (no snapshot needs it)
    // out of its pack.
    assert!(e.fails(&["check"]).stderr.contains("found damaged by an earlier check"));
    e.ok(&["prune"]);
    assert!(e.ok(&["check"]).stdout.contains("no errors found"));
    assert!(e.objects("damaged").is_empty());
}

/// Two snapshots of an unchanged disk share its manifest segment, which check reads once: a damaged block, then
/// the damaged segment itself, are still reported in each snapshot.
#[test]
fn check_reports_damage_in_every_snapshot_sharing_a_segment() {
    let e = Env::new();
    setup(&e);
    e.backup(&[e.path("img").to_str().unwrap(), "--name", "vm"]);
    let snaps = e.ok(&["snapshots", "--json"]).json();
    let ids: Vec<String> =
        snaps.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()[..8].to_string()).collect();
    assert_eq!(ids.len(), 2);
    let in_each = |stderr: &str, what: &str| {
        for id in &ids {
            assert!(
                stderr.lines().any(|l| l.contains(&format!("snapshot {id}")) && l.contains(what)),
                "{id}: {stderr}"
            );
        }
    };

    e.flip(&a_data_pack(&e), 5000);
    let r = e.fails(&["check", "--read-data"]);
    in_each(&r.stderr, "1 block(s) in blocks 0..8 are unreadable");

    let meta = e.objects("packs").into_iter().find(|p| e.object_size(p) < 4096).unwrap();
    e.flip(&meta, 20);
    let r = e.fails(&["check"]);
    in_each(&r.stderr, "segment blob");
}

#[test]
fn repair_snapshots_keeps_intact_blocks() {
    let e = Env::new();
    let img = setup(&e);
    let pack = a_data_pack(&e);
    e.delete_object(&pack);
    let out = e.ok(&["repair", "snapshots", "--write"]).stdout;
    assert!(out.contains("1.00 MiB lost in 1 ranges"), "{out}");
    let snaps = e.ok(&["snapshots", "--json"]).json();
    let repaired = snaps
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["tags"].as_array().unwrap().iter().any(|t| t == "repaired"))
        .unwrap();
    let id = repaired["id"].as_str().unwrap().to_string();
    let t = e.path("out");
    e.ok(&["restore", &id, "--target", t.to_str().unwrap(), "--verify"]);
    let out = std::fs::read(&t).unwrap();
    let lost: Vec<usize> = (0..8).filter(|b| out[b * MIB..(b + 1) * MIB] != img[b * MIB..(b + 1) * MIB]).collect();
    assert_eq!(lost.len(), 1);
    assert!(out[lost[0] * MIB..(lost[0] + 1) * MIB].iter().all(|&b| b == 0));
}

/// Packs listed in the verification records.
fn verified_entries(e: &Env) -> Vec<String> {
    e.objects("verified")
        .iter()
        .flat_map(|p| {
            let v = e.ok(&["cat", "verified", id_of(p)]).json();
            v["packs"].as_array().unwrap().iter().map(|x| x["pack"].as_str().unwrap().to_string()).collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn four_quarter_checks_verify_every_pack_once() {
    let e = Env::new();
    e.ok(&["init", "--pack-size", "1"]);
    for i in 0..3u64 {
        let p = e.path(&format!("d{i}"));
        write(&p, &random_bytes(40 + i, 5 * MIB));
        e.backup(&[p.to_str().unwrap(), "--name", &format!("vm{i}")]);
    }
    let packs: HashSet<String> = e.objects("packs").iter().map(|p| id_of(p).to_string()).collect();
    for _ in 0..4 {
        e.ok(&["check", "--read-data-subset", "1/4"]);
    }
    let verified = verified_entries(&e);
    let unique: HashSet<String> = verified.iter().cloned().collect();
    assert_eq!(unique, packs, "four quarter checks cover every pack");
    // Each run reads ceil(P/4) packs, never-verified ones first: only the rounding is read twice.
    let quarter = packs.len().div_ceil(4);
    assert_eq!(verified.len(), 4 * quarter, "each run reads its quarter");
    assert_eq!(verified.len() - unique.len(), 4 * quarter - packs.len(), "no pack is read twice before all are read");
    // One VM's backup forgotten and its packs pruned: the fifth run starts over with the least recently verified
    // packs, and records are merged eventually, without the pruned packs.
    e.ok(&["forget", "latest", "--name", "vm0", "--prune"]);
    let packs: HashSet<String> = e.objects("packs").iter().map(|p| id_of(p).to_string()).collect();
    assert!(packs.len() < unique.len(), "prune deleted vm0's packs");
    for _ in 0..6 {
        e.ok(&["check", "--read-data-subset", "25%"]);
    }
    assert!(e.objects("verified").len() <= 8, "records are merged");
    let unique: HashSet<String> = verified_entries(&e).into_iter().collect();
    assert_eq!(unique, packs);
}

#[test]
fn full_repository_disk_fails_cleanly_and_loses_nothing() {
    // A local file system that fills up, whatever backend the suite tests.
    let e = Env::local();
    let mnt = e.path("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let small = random_bytes(3, 2 * MIB);
    let big = random_bytes(4, 24 * MIB);
    write(&e.path("small.raw"), &small);
    write(&e.path("big.raw"), &big);
    let dv = env!("CARGO_BIN_EXE_diskvault");
    // A private mount namespace with a 12 MiB tmpfs as the repository's file system.
    let script = format!(
        r#"set -u
mount -t tmpfs -o size=12m tmpfs {mnt} || exit 99
R={mnt}/repo
{dv} -q -r $R init || exit 90
{dv} -q -r $R backup --name small {small} || exit 91
{dv} -q -r $R backup --name big {big}; echo "big-backup-rc=$?"
{dv} -q -r $R check; echo "check-rc=$?"
{dv} -q -r $R restore latest --name small --target {out} --verify; echo "restore-rc=$?"
ls $R/snapshots | wc -l | sed 's/^/snapshots=/'
"#,
        mnt = mnt.display(),
        small = e.path("small.raw").display(),
        big = e.path("big.raw").display(),
        out = e.path("small.out").display(),
    );
    let out = std::process::Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .env("DISKVAULT_PASSWORD", &e.password)
        .env("DISKVAULT_CACHE_DIR", e.cache())
        .output()
        .expect("unshare (util-linux) runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "setup failed: {stdout}{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(stdout.contains("big-backup-rc=1"), "the backup that does not fit fails: {stdout}{stderr}");
    assert!(stderr.contains("file system is full"), "the error says why: {stderr}");
    assert!(stdout.contains("check-rc=0"), "the repository stays consistent: {stdout}{stderr}");
    assert!(stdout.contains("restore-rc=0"), "{stdout}{stderr}");
    assert!(stdout.contains("snapshots=1"), "no snapshot of the failed backup: {stdout}");
    assert_eq!(std::fs::read(e.path("small.out")).unwrap(), small);
}

#[test]
fn repair_packs_lets_the_next_backup_heal_older_snapshots() {
    let e = Env::with_repo();
    let img = random_bytes(41, 4 * MIB);
    write(&e.path("img"), &img);
    let path = e.path("img");
    let first = e.backup(&[path.to_str().unwrap(), "--name", "vm"])["snapshot"].as_str().unwrap().to_string();
    // The four blocks share one data pack: damage the second.
    let pack = e.objects("packs").into_iter().max_by_key(|p| e.object_size(p)).unwrap();
    e.flip(&pack, MIB + MIB / 2);
    // Without a check having recorded the damage, a backup of the intact source deduplicates against it.
    let again = e.backup(&[path.to_str().unwrap(), "--name", "vm", "--no-parent"]);
    assert_eq!(again["disks"][0]["new_blocks"], 0);
    // The pack goes at once, before any backup could store the block again (as after a check that was not
    // allowed to record what it found: the damage record is deleted here).
    let r = e.run(&["check", "--read-data"]);
    assert_eq!(r.code, 1);
    assert!(r.stderr.contains(id_of(&pack)), "check names the pack: {}", r.stderr);
    for record in e.objects("damaged") {
        e.delete_object(&record);
    }

    let damaged_pack = e.read_object(&pack);
    let r = e.ok(&["repair", "packs", &pack]);
    assert!(r.stdout.contains("3 blobs kept in new packs, 1 lost; removed"), "{}", r.stdout);
    assert!(!e.objects("packs").contains(&pack), "the damaged pack is deleted");
    // Interrupted before the pack was deleted: stored without an index entry. A second run removes it.
    e.write_object(&pack, &damaged_pack);
    let r = e.ok(&["repair", "packs", &pack]);
    assert!(r.stdout.contains("1 lost; removed"), "{}", r.stdout);
    assert!(!e.objects("packs").contains(&pack));
    // The lost block is now missing rather than damaged; the three others restore from their new pack.
    let r = e.run(&["check"]);
    assert_eq!(r.code, 1, "{}", r.stdout);
    let t = e.path("partial");
    let r = e.run(&["restore", &first, "--target", t.to_str().unwrap(), "--allow-partial"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let damaged: Vec<&str> = r.stderr.lines().filter(|l| l.starts_with("damaged: ")).collect();
    assert_eq!(damaged.len(), 1, "{}", r.stderr);
    // Blobs go into a pack in the order the workers finish them: which block the flip hit varies.
    let range = damaged[0]["damaged: bytes ".len()..].split_whitespace().next().unwrap();
    let (start, end) = range.split_once("..").unwrap();
    let (start, end): (usize, usize) = (start.parse().unwrap(), end.parse().unwrap());
    assert!(end - start == MIB && start % MIB == 0, "{}", damaged[0]);
    let out = std::fs::read(&t).unwrap();
    assert_eq!((&out[..start], &out[end..]), (&img[..start], &img[end..]));
    // The next backup stores the lost block again, and only it.
    let healing = e.backup(&[path.to_str().unwrap(), "--name", "vm", "--no-parent"]);
    assert_eq!(healing["disks"][0]["new_blocks"], 1, "only the lost block is stored again");
    e.ok(&["check", "--read-data"]);
    assert_eq!(e.restore(&first, &[]), img, "the first snapshot restores again");
    assert_eq!(e.restore(again["snapshot"].as_str().unwrap(), &[]), img);

    // Damage to a pack's header alone loses nothing, but the pack is rewritten: `repair index` reads headers.
    let pack = e.objects("packs").into_iter().max_by_key(|p| e.object_size(p)).unwrap();
    e.flip(&pack, e.object_size(&pack) as usize - 100);
    // Without ids, every pack is read first and the damaged ones repaired.
    let r = e.ok(&["repair", "packs"]);
    assert!(r.stdout.contains("1 pack with damage found"), "{}", r.stdout);
    assert!(r.stdout.contains(&format!("{pack} (header: ")) && r.stdout.contains(", 0 lost; removed"), "{}", r.stdout);
    e.ok(&["check", "--read-data"]);
    let r = e.ok(&["repair", "packs"]);
    assert!(r.stdout.contains("nothing to repair"), "{}", r.stdout);
    e.ok(&["repair", "index"]);
    assert_eq!(e.restore(&first, &[]), img);

    // A pack with nothing wrong is left alone; an unknown pack is refused.
    let intact = e.objects("packs").into_iter().max_by_key(|p| e.object_size(p)).unwrap();
    let r = e.ok(&["repair", "packs", id_of(&intact)]);
    assert!(r.stdout.contains("left as it is"), "{}", r.stdout);
    assert!(e.objects("packs").contains(&intact));
    let r = e.fails(&["repair", "packs", &"ab".repeat(32)]);
    assert!(r.stderr.contains("neither in the index nor stored"), "{}", r.stderr);
    e.ok(&["check", "--read-data"]);

    // An indexed pack that is gone: its blobs are lost, it leaves the index (the same id twice is one pack).
    let before = e.objects("packs");
    write(&e.path("extra"), &random_bytes(42, MIB));
    e.backup(&[e.path("extra").to_str().unwrap(), "--name", "extra"]);
    let gone = e.objects("packs").into_iter().filter(|p| !before.contains(p)).max_by_key(|p| e.object_size(p)).unwrap();
    e.delete_object(&gone);
    let r = e.ok(&["repair", "packs", id_of(&gone), &gone]);
    assert!(r.stdout.contains("0 blobs kept in new packs, 1 lost; removed"), "{}", r.stdout);
    assert!(!e.run(&["check"]).stderr.contains(id_of(&gone)), "no index file lists the lost pack any more");
    let r = e.backup(&[e.path("extra").to_str().unwrap(), "--name", "extra", "--no-parent"]);
    assert_eq!(r["disks"][0]["new_blocks"], 1);
    e.ok(&["check", "--read-data"]);

    // Not while others may read the packs: a running `serve` holds a session.
    let serve = e.serve_on_socket(&[]);
    let r = e.fails(&["repair", "packs", id_of(&intact)]);
    drop(serve);
    assert!(r.stderr.contains("1 session running"), "{}", r.stderr);
}

/// PBS-style healing without `repair packs`: damage `check` finds is recorded in the repository, the next
/// backups store those blocks again (a changed-areas incremental too, whose change list leaves them out), and
/// every snapshot restores from the new copies on any host; prune keeps the intact copy, `repair packs` then
/// removes the damaged one and the next check forgets the damage.
#[test]
fn damage_found_by_check_heals_with_the_next_backup_before_any_repair() {
    let e = Env::with_repo();
    let img = random_bytes(43, 4 * MIB);
    let path = e.path("img");
    write(&path, &img);
    let first = e.backup(&[path.to_str().unwrap(), "--name", "vm"])["snapshot"].as_str().unwrap().to_string();
    let unchanged = e.path("unchanged.json");
    write_changes(&unchanged, &[]);
    let incremental =
        ["backup", "--name", "vm", "--changed-areas", unchanged.to_str().unwrap(), path.to_str().unwrap()];
    // The four blocks share one data pack: damage one of them.
    let pack = e.objects("packs").into_iter().max_by_key(|p| e.object_size(p)).unwrap();
    e.flip(&pack, MIB + MIB / 2);
    // Nobody knows yet: an incremental reuses the damaged block by id.
    let before_check: serde_json::Value = e.ok(&[&incremental[..], &["--json"]].concat()).json();
    assert_eq!(before_check["disks"][0]["new_blocks"], 0);

    let r = e.run(&["check", "--read-data"]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert!(r.stderr.contains(id_of(&pack)), "{}", r.stderr);
    assert!(r.stdout.contains("damage recorded: 1 blob copy damaged or lost"), "{}", r.stdout);
    let record = e.objects("damaged");
    assert_eq!(record.len(), 1);
    let shown = e.ok(&["cat", "damaged", id_of(&record[0])]).json();
    assert_eq!(shown["copies"][0]["pack"], id_of(&pack), "{shown}");

    // The next incremental's change list says nothing changed; it reads the damaged block again anyway.
    let r = e.ok(&[&incremental[..], &["--json"]].concat());
    assert_eq!(r.json()["disks"][0]["new_blocks"], 1, "{}", r.stderr);
    assert!(r.stderr.contains("were found damaged (damage records name them); reading them again"), "{}", r.stderr);
    // Every snapshot restores, here and on a host whose cache is built from scratch; the damaged pack is still
    // there.
    for snap in [first.as_str(), before_check["snapshot"].as_str().unwrap(), "latest"] {
        assert_eq!(e.restore(snap, &[]), img, "{snap}");
        assert_eq!(restore_with_a_new_cache(&e, snap), img, "{snap} with a new cache");
    }
    assert!(e.objects("packs").contains(&pack));
    // check still names the damaged pack (from the record, or reading it again), but no snapshot as damaged.
    for args in [&["check"][..], &["check", "--read-data"][..]] {
        let r = e.run(args);
        assert_eq!(r.code, 1, "{args:?}: {}", r.stderr);
        assert!(r.stderr.contains(id_of(&pack)), "{args:?}: {}", r.stderr);
        assert!(
            !r.stderr.contains("unreadable") && r.stderr.contains("every snapshot restores from intact copies"),
            "{args:?}: no snapshot is damaged now: {}",
            r.stderr
        );
    }
    assert!(e.run(&["check"]).stderr.contains("found damaged by an earlier check"));
    // A later backup deduplicates against the new copy.
    let r = e.ok(&[&incremental[..], &["--json"]].concat());
    assert_eq!(r.json()["disks"][0]["new_blocks"], 0, "{}", r.stderr);

    // Prune keeps the intact copy whichever pack it meets first. Met after the intact copy, the damaged one is
    // unused and its pack repacked without it; met before, it stays (it cannot be copied) for `repair packs`.
    e.ok(&["prune", "--max-unused", "0%"]);
    assert_eq!(restore_with_a_new_cache(&e, &first), img);
    if e.objects("packs").contains(&pack) {
        let r = e.ok(&["repair", "packs", id_of(&pack)]);
        assert!(r.stdout.contains("1 lost; removed"), "{}", r.stdout);
    }
    let r = e.ok(&["check", "--read-data"]);
    assert!(r.stdout.contains("no errors found") && !r.stdout.contains("damage recorded"), "{}", r.stdout);
    assert!(e.objects("damaged").is_empty());
    for snap in [first.as_str(), "latest"] {
        assert_eq!(e.restore(snap, &[]), img, "{snap}");
    }
}

/// Prune meets a blob's damaged copy and the intact one a backup stored since in the order of their index files'
/// ids: six sources, each with its own pair, so that some damaged copy comes first. It must never be the one kept
/// as used.
#[test]
fn prune_keeps_the_intact_copy_of_a_damaged_blob_whichever_it_meets_first() {
    let e = Env::new();
    // One block per data pack.
    e.ok(&["init", "--pack-size", "1"]);
    let mut sources = Vec::new();
    for k in 0..6u64 {
        let img = random_bytes(50 + k, 2 * MIB);
        let path = e.path(&format!("img{k}"));
        write(&path, &img);
        let before = e.objects("packs");
        e.backup(&[path.to_str().unwrap(), "--name", &format!("vm{k}")]);
        let data = e.objects("packs").into_iter().filter(|p| !before.contains(p)).max_by_key(|p| e.object_size(p));
        e.flip(&data.unwrap(), 5000);
        sources.push((k, path, img));
    }
    assert_eq!(e.run(&["check", "--read-data"]).code, 1);
    let mut healed = Vec::new();
    for (k, path, img) in &sources {
        let r = e.backup(&[path.to_str().unwrap(), "--name", &format!("vm{k}")]);
        assert_eq!(r["disks"][0]["new_blocks"], 1);
        healed.push((r["snapshot"].as_str().unwrap().to_string(), img));
    }
    e.ok(&["prune", "--max-unused", "0%"]);
    for (snapshot, img) in healed {
        assert_eq!(restore_with_a_new_cache(&e, &snapshot), *img);
    }
}

/// Restores `snapshot` as a host that never used the repository would: with a cache built from `index/`.
fn restore_with_a_new_cache(e: &Env, snapshot: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().join("disk");
    let mut c = e.command(&["restore", snapshot, "--target", target.to_str().unwrap(), "--verify"]);
    c.env("DISKVAULT_CACHE_DIR", dir.path().join("cache"));
    let r = Run::of(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    std::fs::read(&target).unwrap()
}

/// A block lost with its pack (`repair packs` removed it, and recorded it): a changed-areas incremental whose
/// change list leaves it out reads it again, so that its snapshot does not reuse a lost block by id.
#[test]
fn an_incremental_reads_again_a_block_whose_pack_was_removed() {
    let e = Env::with_repo();
    let img = random_bytes(44, 3 * MIB);
    let path = e.path("img");
    write(&path, &img);
    e.backup(&[path.to_str().unwrap(), "--name", "vm"]);
    let pack = e.objects("packs").into_iter().max_by_key(|p| e.object_size(p)).unwrap();
    e.flip(&pack, MIB / 2);
    // No check has run: `repair packs` finds the damage itself, and records the lost blob.
    let r = e.ok(&["repair", "packs", id_of(&pack)]);
    assert!(r.stdout.contains("1 lost; removed"), "{}", r.stdout);
    // The record outlives the pack while the blob has no other copy.
    assert_eq!(e.run(&["check"]).code, 1);
    assert_eq!(e.objects("damaged").len(), 1);
    let unchanged = e.path("unchanged.json");
    write_changes(&unchanged, &[]);
    let r = e.ok(&[
        "backup",
        "--name",
        "vm",
        "--changed-areas",
        unchanged.to_str().unwrap(),
        path.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!(r.json()["disks"][0]["new_blocks"], 1, "{}", r.stderr);
    assert_eq!(e.restore("latest", &[]), img);
    assert!(e.ok(&["check", "--read-data"]).stdout.contains("no errors found"));
    assert!(e.objects("damaged").is_empty(), "the lost blob is stored again: the record goes");

    // A lost block that no snapshot references any more is forgotten too.
    let other = e.path("other");
    write(&other, &random_bytes(45, MIB));
    let before = e.objects("packs");
    let snap = e.backup(&[other.to_str().unwrap(), "--name", "other"])["snapshot"].as_str().unwrap().to_string();
    let pack = e.objects("packs").into_iter().filter(|p| !before.contains(p)).max_by_key(|p| e.object_size(p));
    let pack = pack.unwrap();
    e.flip(&pack, MIB / 2);
    assert_eq!(e.run(&["check", "--read-data"]).code, 1);
    e.ok(&["repair", "packs", id_of(&pack)]);
    assert_eq!(e.run(&["check"]).code, 1);
    assert_eq!(e.objects("damaged").len(), 1);
    e.ok(&["forget", &snap]);
    assert!(e.ok(&["check"]).stdout.contains("no errors found"));
    assert!(e.objects("damaged").is_empty(), "no snapshot needs the lost block: the record goes");
}

#[test]
fn a_superseded_index_file_is_ignored() {
    use diskvault::format::index::IndexFile;
    let e = Env::with_repo();
    let img = random_bytes(50, 3 * MIB);
    write(&e.path("img"), &img);
    e.backup(&[e.path("img").to_str().unwrap(), "--name", "vm"]);
    let repo = e.open_repo();
    let original = e.objects("index");
    let good: Vec<IndexFile> = original.iter().map(|f| repo.load_index(&id_hex(f)).unwrap()).collect();
    let packs: Vec<_> = good.iter().flat_map(|f| f.packs.clone()).collect();
    // What an interrupted `repair index` leaves: an old, wrong index file (here its blobs' offsets rotated)
    // next to the file rebuilt from the headers, which supersedes it. The cache loads files in name order and
    // a later entry wins: make the wrong file come last, so that only honouring `supersedes` gets it right.
    let mut attempt = 0u32;
    loop {
        let mut wrong = packs.clone();
        for p in &mut wrong {
            let offsets: Vec<u32> = p.entries.iter().map(|en| en.offset).collect();
            for (i, en) in p.entries.iter_mut().enumerate() {
                en.offset = offsets[(i + 1) % offsets.len()];
            }
        }
        // Index files may list a pack twice; a copy of one makes each attempt's file different.
        wrong.extend(packs.iter().take(attempt as usize % 2).cloned());
        attempt += 1;
        let wrong_id = repo.save_index(&IndexFile { supersedes: Vec::new(), packs: wrong }).unwrap();
        let rebuilt_id = repo.save_index(&IndexFile { supersedes: vec![wrong_id], packs: packs.clone() }).unwrap();
        if wrong_id > rebuilt_id {
            break;
        }
        for id in [wrong_id, rebuilt_id] {
            e.delete_object(&diskvault::format::names::index(&id));
        }
        assert!(attempt < 64, "no ordering found");
    }
    for f in &original {
        e.delete_object(f);
    }
    assert_eq!(e.restore("latest", &[]), img, "the superseded file's locations are not used");
}

fn id_hex(name: &str) -> diskvault::format::BlobId {
    diskvault::format::BlobId::from_hex(id_of(name)).unwrap()
}

#[test]
fn unusable_cache_directory_falls_back_to_a_private_cache() {
    let e = Env::with_repo();
    let img = random_bytes(12, 3 * MIB);
    write(&e.path("img"), &img);
    // The cache "directory" is a regular file: nothing can be created in it.
    std::fs::write(e.cache(), b"not a directory").unwrap();
    let r = e.run(&["backup", "--json", e.path("img").to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("private temporary index cache"), "{}", r.stderr);
    let r = e.run(&["backup", "--json", "--no-parent", e.path("img").to_str().unwrap()]);
    assert_eq!(r.json()["disks"][0]["new_blocks"], 0, "the private cache is built from the repository: still dedups");
    assert_eq!(e.restore("latest", &[]), img);
}

/// `backup --json` of source `vm` from `path`, its change list naming the first 4 KiB.
fn incremental_changing_the_first_page(e: &Env, path: &std::path::Path) -> Run {
    e.backup_changed("vm", path, &[(0, 4096)])
}

/// An incremental whose parent's manifest segment turns out damaged (no check recorded it yet) records the damage
/// and goes through the disk again, reading that segment's blocks from the source: the backup succeeds, and its
/// snapshot restores bit-exact. `repair packs` then takes the damaged pack out.
#[test]
fn an_incremental_on_a_damaged_parent_segment_reads_the_segments_blocks_instead() {
    let e = Env::with_repo();
    let img = random_bytes(42, 3 * MIB);
    let path = e.path("img");
    write(&path, &img);
    e.backup(&[path.to_str().unwrap(), "--name", "vm"]);
    // The metadata pack starts with the snapshot's one segment blob.
    let meta = e.objects("packs").into_iter().min_by_key(|p| e.object_size(p)).unwrap();
    e.flip(&meta, 10);
    let r = incremental_changing_the_first_page(&e, &path);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains(id_of(&meta))
            && r.stderr.contains("now recorded as damaged")
            && r.stderr.contains("backing up again, reading the blocks of the damaged segment from the source"),
        "{}",
        r.stderr
    );
    assert_eq!(e.objects("damaged").len(), 1, "the damage is recorded");
    // The changed block in the first pass; all three blocks (the lost segment's) in the second.
    assert_eq!(r.json()["disks"][0]["blocks_read"], 3, "{}", r.stdout);
    assert_eq!(e.restore("latest", &[]), img);
    e.ok(&["repair", "packs"]);
    assert_eq!(incremental_changing_the_first_page(&e, &path).code, 0);
    assert!(e.ok(&["check", "--read-data"]).stdout.contains("no errors found"));
    assert_eq!(e.restore("latest", &[]), img);
}

/// Both manifest segments of a two-segment parent damaged: the incremental meets the first (its change is there)
/// and finds the second before its second pass, which reads both segments' blocks: the new snapshot does not
/// inherit the damaged second segment whole, so that it, and the parent through the segment stored again, restore.
#[test]
fn an_incremental_finds_every_damaged_parent_segment_before_its_second_pass() {
    use diskvault::format::BlobType;
    let e = Env::with_repo();
    // 4 GiB + 3 MiB: segment 0 holds blocks 0-4095, segment 1 the last three; data in both, holes between.
    let capacity = (4096 + 3) * MIB as u64;
    let path = e.path("img");
    let file = std::fs::File::create(&path).unwrap();
    file.set_len(capacity).unwrap();
    let (head, tail) = (random_bytes(51, 2 * MIB), random_bytes(52, 3 * MIB));
    std::os::unix::fs::FileExt::write_all_at(&file, &head, 0).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&file, &tail, 4096 * MIB as u64).unwrap();
    e.backup(&[path.to_str().unwrap(), "--name", "vm"]);
    // Damage both segment blobs where they are stored.
    let repo = e.open_repo();
    let mut segments = Vec::new();
    for id in repo.list_index_ids().unwrap() {
        for p in repo.load_index(&id).unwrap().packs {
            let name = diskvault::format::names::pack(&p.id);
            for en in p.entries.iter().filter(|en| en.blob_type == BlobType::Segment) {
                segments.push((name.clone(), en.offset as usize + 20));
            }
        }
    }
    assert_eq!(segments.len(), 2, "{segments:?}");
    for (pack, at) in &segments {
        e.flip(pack, *at);
    }
    let r = incremental_changing_the_first_page(&e, &path);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("1 more damaged manifest segment(s) of the parent snapshot"), "{}", r.stderr);
    // The second pass reads both segments' blocks whole (holes included): 4096 + 3.
    assert_eq!(r.json()["disks"][0]["blocks_read"], 4099, "{}", r.stdout);
    // Restored (and verified against the manifest): the data where it was, the rest holes.
    let restores = |snapshot: &str| {
        let target = e.path("restored");
        let _ = std::fs::remove_file(&target);
        e.ok(&["restore", snapshot, "--target", target.to_str().unwrap(), "--verify"]);
        let out = std::fs::File::open(&target).unwrap();
        assert_eq!(out.metadata().unwrap().len(), capacity);
        let (mut h, mut t) = (vec![0u8; head.len()], vec![0u8; tail.len()]);
        std::os::unix::fs::FileExt::read_exact_at(&out, &mut h, 0).unwrap();
        std::os::unix::fs::FileExt::read_exact_at(&out, &mut t, 4096 * MIB as u64).unwrap();
        h == head && t == tail
    };
    assert!(restores("latest"), "the new snapshot restores");
    let parent = e.ok(&["snapshots", "--json"]).json()[0]["id"].as_str().unwrap().to_string();
    assert!(restores(&parent), "the parent restores through the segments stored again");
}

#[test]
fn a_cache_with_a_damaged_table_file_is_rebuilt_in_place() {
    let e = Env::with_repo();
    let img = random_bytes(13, 3 * MIB);
    write(&e.path("img"), &img);
    e.backup(&[e.path("img").to_str().unwrap()]);
    let tables: Vec<std::path::PathBuf> =
        files_below(&e.cache()).into_iter().filter(|p| p.extension().is_some_and(|x| x == "sst")).collect();
    assert!(!tables.is_empty(), "the cache has table files");
    for t in &tables {
        let mut bytes = std::fs::read(t).unwrap();
        let n = bytes.len().min(64);
        bytes[..n].iter_mut().for_each(|b| *b ^= 0x5a);
        std::fs::write(t, bytes).unwrap();
    }
    let r = e.run(&["backup", "--json", "--no-parent", e.path("img").to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("is damaged") && r.stderr.contains("rebuilding it"), "{}", r.stderr);
    assert_eq!(r.json()["disks"][0]["new_blocks"], 0, "rebuilt from the repository: still dedups");
    // Rebuilt where it was, not a private cache at every run from now on.
    let r = e.run(&["backup", "--json", "--no-parent", e.path("img").to_str().unwrap()]);
    assert!(!r.stderr.contains("WARN"), "{}", r.stderr);
    assert_eq!(e.restore("latest", &[]), img);
}

/// A second process on the host while another holds the cache (a backup while `serve` runs, two backup jobs at
/// once) reads the shared cache as the other left it: it finds its delta bases there (page features are kept
/// only in the local cache; a private cache rebuilt from the repository has none) and adds what it stores to
/// a private cache of its own.
#[test]
fn a_cache_held_by_another_process_is_read_below_a_private_one() {
    let e = Env::with_repo();
    let img = e.path("img");
    let day0 = random_bytes(21, 8 * MIB);
    let mut day1 = day0.clone();
    for b in 0..8 {
        day1[b * MIB + 8192..b * MIB + 12288].copy_from_slice(&random_bytes(30 + b as u64, 4096));
    }
    write(&img, &day0);
    e.backup(&[img.to_str().unwrap()]);
    assert!(e.delta_blobs().is_empty());

    // This test process holds the shared cache, as `serve` would.
    let repo = e.open_repo();
    let held = diskvault::cache::IndexCache::open(&repo, &e.cache()).unwrap().0;
    write(&img, &day1);
    let r = e.run(&["-v", "backup", "--json", img.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(e.delta_blobs().len(), 8, "the changed blocks found no delta base in the held cache");
    assert!(r.stderr.contains("as another process left it"), "{}", r.stderr);
    drop(held);
    assert!(e.restore("latest", &[]) == day1);
}

/// The page features of blocks a second process stored (kept in its private cache) reach the shared cache: a
/// later backup of another disk finds such a block as the delta base of a block holding most of its pages at
/// another offset, which only features can point to.
#[test]
fn features_recorded_by_a_second_process_reach_the_shared_cache() {
    let e = Env::with_repo();
    let first = e.path("first");
    write(&first, &random_bytes(60, 2 * MIB));
    e.backup(&["--name", "a", first.to_str().unwrap()]);

    let repo = e.open_repo();
    let held = diskvault::cache::IndexCache::open(&repo, &e.cache()).unwrap().0;
    let second = e.path("second");
    let vm2 = random_bytes(61, 4 * MIB);
    write(&second, &vm2);
    let r = e.run(&["-v", "backup", "--json", "--name", "b", second.to_str().unwrap()]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stderr.contains("as another process left it"), "{}", r.stderr);
    drop(held);

    // Block 0 of a third disk: three new pages, then 253 pages of the second disk's block 1.
    let third = e.path("third");
    let mut vm3 = random_bytes(62, 3 * 4096);
    vm3.extend_from_slice(&vm2[MIB..2 * MIB - 3 * 4096]);
    vm3.extend_from_slice(&random_bytes(63, MIB));
    write(&third, &vm3);
    e.backup(&["--name", "c", third.to_str().unwrap()]);
    let ids =
        |img: &[u8]| -> Vec<diskvault::format::BlobId> { img.chunks(MIB).map(|b| repo.keys().blob_id(b)).collect() };
    assert_eq!(
        e.delta_blobs(),
        vec![(ids(&vm3)[0], ids(&vm2)[1])],
        "block 0 of the third disk is a delta against the second's block 1"
    );
    let pending = e.cache().join(repo.config().id_hex()).join("features-pending");
    assert_eq!(std::fs::read_dir(&pending).map(|d| d.count()).unwrap_or(0), 0, "features left in {pending:?}");
    assert!(e.restore("latest", &["--name", "c"]) == vm3);
}

/// A held cache that a prune has since made out of date (it still lists blocks the prune deleted, in packs it
/// repacked) is not read: a backup by another process stores such blocks again instead of deduplicating
/// against what is gone, and restores find every block where it is now.
#[test]
fn a_held_cache_made_out_of_date_by_a_prune_is_not_read() {
    let e = Env::new();
    e.ok(&["init", "--pack-size", "4"]);
    let img = e.path("img");
    let day0 = random_bytes(41, 8 * MIB);
    let mut day1 = day0.clone();
    // Blocks 2-5 change: the packs of day 0 (blocks 0-3, 4-7) are each half used by day 1 alone.
    day1[2 * MIB..6 * MIB].copy_from_slice(&random_bytes(42, 4 * MIB));
    write(&img, &day0);
    e.backup(&["--name", "vm", img.to_str().unwrap()]);
    write(&img, &day1);
    let s2 = e.backup(&["--name", "vm", "--no-delta", img.to_str().unwrap()])["snapshot"].as_str().unwrap().to_string();

    let repo = e.open_repo();
    let held = diskvault::cache::IndexCache::open(&repo, &e.cache()).unwrap().0;
    let packs_before = e.objects("packs");
    e.ok(&["forget", "--keep-last", "1"]);
    e.ok(&["prune", "--max-unused", "0"]);
    let packs_after = e.objects("packs");
    assert!(packs_before.iter().any(|p| !packs_after.contains(p)), "the prune repacked nothing");
    assert!(e.restore(&s2, &[]) == day1, "day 1 restores other bytes");
    // Day 0's own blocks are gone from the repository; the held cache still lists them.
    write(&img, &day0);
    let r = e.backup(&["--name", "vm", "--no-delta", "--no-parent", img.to_str().unwrap()]);
    assert_eq!(r["disks"][0]["new_blocks"], 4, "blocks the prune deleted were taken as stored: {r}");
    assert!(e.restore(r["snapshot"].as_str().unwrap(), &[]) == day0, "day 0 backed up again restores other bytes");
    drop(held);
}

#[test]
fn private_caches_left_by_killed_processes_are_removed() {
    use std::os::fd::AsRawFd;
    let e = Env::with_repo();
    write(&e.path("img"), &random_bytes(14, MIB));
    let tmp = e.path("tmp");
    let made_by = |pid: u32, random: &str| {
        let d = tmp.join(format!("diskvault-cache-{pid}-{random}"));
        std::fs::create_dir_all(d.join("index")).unwrap();
        std::fs::write(d.join("index/LOCK"), b"").unwrap();
        std::fs::write(d.join("index/000009.sst"), vec![7u8; 4096]).unwrap();
        d
    };
    // A process that has ended (pids are handed out in increasing order: not reused within the test).
    let mut ended = std::process::Command::new("true").spawn().unwrap();
    let dead = ended.id();
    ended.wait().unwrap();
    let abandoned = made_by(dead, "0123456789ab");
    let of_a_running_process = made_by(std::process::id(), "0123456789ab");
    // Named after a process that is gone here, but its database is open: a process in another PID namespace.
    let open_elsewhere = made_by(dead, "ba9876543210");
    let lock = std::fs::OpenOptions::new().write(true).open(open_elsewhere.join("index/LOCK")).unwrap();
    // SAFETY: plain record-lock call on an open descriptor with a zero-initialised flock.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    assert_eq!(unsafe { libc::fcntl(lock.as_raw_fd(), libc::F_SETLK, &fl) }, 0);
    let not_ours = tmp.join(format!("diskvault-cache-{dead}-notes"));
    std::fs::create_dir_all(&not_ours).unwrap();

    let mut c = e.command(&["backup", e.path("img").to_str().unwrap()]);
    c.env("TMPDIR", &tmp);
    let r = Run::of(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!abandoned.exists(), "the private cache of a process that was killed is removed");
    assert!(of_a_running_process.exists() && open_elsewhere.exists(), "caches in use are kept");
    assert!(not_ours.exists(), "only directories named as diskvault names them are touched");
    drop(lock);
}

#[test]
fn concurrent_backups_into_one_repository() {
    let e = Env::with_repo();
    let shared = random_bytes(13, 6 * MIB);
    let mut images = Vec::new();
    for i in 0..3u64 {
        let mut img = shared.clone();
        img.extend(random_bytes(100 + i, 2 * MIB));
        write(&e.path(&format!("vm{i}.raw")), &img);
        images.push(img);
    }
    // Three processes at once, sharing the repository and the local cache directory.
    Env::run_at_once(
        (0..3)
            .map(|i| {
                e.command(&["backup", "--name", &format!("vm{i}"), e.path(&format!("vm{i}.raw")).to_str().unwrap()])
            })
            .collect(),
    );
    for (i, img) in images.iter().enumerate() {
        assert_eq!(&e.restore("latest", &["--name", &format!("vm{i}")]), img);
    }
    assert!(e.ok(&["check", "--read-data"]).stdout.contains("no errors found"));
}

#[test]
fn stale_temporary_files_are_removed_by_repair() {
    // Temporary files are the local backend's; S3's are incomplete multipart uploads.
    let e = Env::local();
    e.ok(&["init"]);
    let dir = e.repo().join("packs/ab");
    std::fs::create_dir_all(&dir).unwrap();
    let stale = dir.join(".tmp-0123456789abcdef");
    let fresh = dir.join(".tmp-fedcba9876543210");
    std::fs::write(&stale, b"half a pack").unwrap();
    std::fs::write(&fresh, b"a pack being written").unwrap();
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    std::fs::File::options().write(true).open(&stale).unwrap().set_modified(two_hours_ago).unwrap();
    assert!(e.ok(&["check"]).stdout.contains("no errors found"), "temporary files are not objects");
    let out = e.ok(&["repair", "index"]).stdout;
    assert!(out.contains("1 stale temporary files"), "{out}");
    assert!(!stale.exists() && fresh.exists());
}

/// A disk whose reads fail at one offset, like a bad sector.
struct FailingSource {
    data: Vec<u8>,
    bad_offset: u64,
}

impl diskvault::source::DiskSource for FailingSource {
    fn kind(&self) -> &'static str {
        "file"
    }
    fn describe(&self) -> String {
        "failing-disk".into()
    }
    fn capacity(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> diskvault::Result<()> {
        if (offset..offset + buf.len() as u64).contains(&self.bad_offset) {
            return Err(diskvault::Error::source(
                self.describe(),
                format!("read at offset {offset}: Input/output error"),
            ));
        }
        buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn allocated(&mut self) -> diskvault::Result<Option<Vec<diskvault::source::Extent>>> {
        Ok(None)
    }
}

#[test]
fn source_read_error_fails_the_backup_without_a_snapshot() {
    use diskvault::backup::{self, BackupOptions, DiskJob};
    use diskvault::format::keyfile::KdfParams;
    use diskvault::repository::{InitOptions, Repository};
    let dir = tempfile::tempdir().unwrap();
    let backend = diskvault::backend::open(dir.path().join("repo").to_str().unwrap()).unwrap();
    let opts = InitOptions { kdf: KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 }, ..Default::default() };
    let repo = Repository::init(backend, b"pw", &opts).unwrap();
    let (cache, _) = diskvault::cache::IndexCache::open(&repo, &dir.path().join("cache")).unwrap();
    let cache = std::sync::Arc::new(cache);
    let data = random_bytes(21, 12 * MIB);
    let job = |bad| DiskJob {
        name: "d".into(),
        source: Box::new(FailingSource { data: data.clone(), bad_offset: bad }),
        changed: None,
        change_token: None,
        resume: None,
    };
    let counters = diskvault::progress::Counters::default();
    let err = backup::run(&repo, cache.clone(), vec![job(7 * MIB as u64 + 5)], &BackupOptions::new("vm"), &counters)
        .unwrap_err()
        .to_string();
    assert!(err.contains("failing-disk") && err.contains("offset 7340032"), "{err}");
    assert!(repo.list_snapshots().unwrap().is_empty());
    // The blocks read before the error are stored and indexed: the rerun stores only the rest.
    let (_, snap) = backup::run(&repo, cache, vec![job(u64::MAX)], &BackupOptions::new("vm"), &counters).unwrap();
    assert!(snap.disks[0].stats.new_blocks < 12, "new blocks on rerun: {}", snap.disks[0].stats.new_blocks);
    assert_eq!(repo.list_snapshots().unwrap().len(), 1);
}
