//! Bad input gets a clear error naming the object and the cause, a non-zero exit, and no panic; never wrong
//! bytes written silently.

mod common;

use common::*;

/// A repository with one snapshot of a 6 MiB random image; returns the image.
fn setup(e: &Env) -> Vec<u8> {
    let img = random_bytes(7, 6 * MIB);
    write(&e.path("img"), &img);
    e.backup(&[e.path("img").to_str().unwrap(), "--name", "vm"]);
    img
}

/// The data packs (the larger ones; metadata packs hold one small segment here).
fn data_packs(e: &Env) -> Vec<String> {
    e.objects("packs").into_iter().filter(|p| e.object_size(p) > MIB as u64).collect()
}

/// The file name of an object (its id).
fn id_of(name: &str) -> &str {
    name.rsplit('/').next().unwrap()
}

fn restore_fails(e: &Env) -> String {
    let t = e.path("out");
    let _ = std::fs::remove_file(&t);
    let r = e.fails(&["restore", "latest", "--target", t.to_str().unwrap()]);
    r.stderr
}

#[test]
fn bit_flipped_pack_is_reported_by_name() {
    let e = Env::with_repo();
    let img = setup(&e);
    let pack = &data_packs(&e)[0];
    e.flip(pack, MIB + 1000);
    let err = restore_fails(&e);
    let pack_name = id_of(pack);
    assert!(err.contains(pack_name), "error does not name the pack: {err}");
    assert!(err.contains("authentication failed"), "{err}");
    // The error names the block (workers pack blocks in any order, so which one is found from the message)…
    let after = err.split("block ").nth(1).unwrap_or_else(|| panic!("no block named: {err}"));
    let block: usize = after.split_whitespace().next().unwrap().parse().unwrap();
    assert!(after.contains(&format!("(bytes {}..{})", block * MIB, (block + 1) * MIB)), "{err}");
    // …and it is exactly the block that is damaged: a partial restore loses that block and nothing else.
    let t = e.path("partial");
    let r = e.run(&["restore", "latest", "--target", t.to_str().unwrap(), "--allow-partial"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains(&format!("damaged: bytes {}..{}", block * MIB, (block + 1) * MIB)), "{}", r.stderr);
    let out = std::fs::read(&t).unwrap();
    for b in 0..img.len() / MIB {
        let range = b * MIB..(b + 1) * MIB;
        if b == block {
            assert!(out[range].iter().all(|&x| x == 0));
        } else {
            assert!(out[range.clone()] == img[range], "block {b} differs");
        }
    }
}

#[test]
fn truncated_pack_is_reported() {
    let e = Env::with_repo();
    setup(&e);
    let pack = &data_packs(&e)[0];
    let bytes = e.read_object(pack);
    e.write_object(pack, &bytes[..bytes.len() / 2]);
    let err = restore_fails(&e);
    assert!(err.contains(id_of(pack)), "{err}");
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn missing_pack_is_reported() {
    let e = Env::with_repo();
    setup(&e);
    let pack = &data_packs(&e)[0];
    e.delete_object(pack);
    let err = restore_fails(&e);
    assert!(err.contains(id_of(pack)), "{err}");
    assert!(err.contains("not found"), "{err}");
}

#[test]
fn a_damaged_snapshot_object_is_named_left_out_and_can_be_forgotten() {
    let e = Env::with_repo();
    let day1 = setup(&e);
    let first = e.ok(&["snapshots", "--json"]).json()[0]["id"].as_str().unwrap().to_string();
    let db = random_bytes(8, 3 * MIB);
    write(&e.path("db"), &db);
    e.backup(&[e.path("db").to_str().unwrap(), "--name", "db"]);
    write(&e.path("img"), &random_bytes(9, 6 * MIB));
    let day2 = e.backup(&[e.path("img").to_str().unwrap(), "--name", "vm"])["snapshot"].as_str().unwrap().to_string();
    e.ok(&["protect", &day2[..8]]);
    let object = format!("snapshots/{day2}");
    let n = e.object_size(&object) as usize;
    e.flip(&object, n - 20);

    // Named, left out, and the listing ends with exit code 3.
    let r = e.run(&["snapshots", "--json"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains(&object) && r.stderr.contains("does not match its name"), "{}", r.stderr);
    assert_eq!(r.json().as_array().unwrap().len(), 2);
    // The others restore; the latest readable one of its source is `latest`, and the parent of the next backup.
    assert_eq!(e.restore("latest", &["--name", "vm"]), day1);
    assert_eq!(e.restore("latest", &["--name", "db"]), db);
    write(&e.path("img"), &day1);
    let day3 = e.backup(&[e.path("img").to_str().unwrap(), "--name", "vm"]);
    assert_eq!(day3["parent"].as_str(), Some(first.as_str()), "{day3}");
    // Prune deletes nothing while it cannot tell what the snapshot uses; check says how to heal.
    let packs = e.objects("packs");
    let r = e.fails(&["prune"]);
    assert!(r.stderr.contains(&object) && r.stderr.contains(&format!("forget {day2}")), "{}", r.stderr);
    assert_eq!(e.objects("packs"), packs);
    let r = e.fails(&["check"]);
    assert!(
        r.stderr.contains("damaged snapshot object") && r.stderr.contains(&format!("forget {day2}")),
        "{}",
        r.stderr
    );
    // Forgotten by id like any other, once unprotected.
    assert!(e.fails(&["forget", &day2[..8]]).stderr.contains("is protected"));
    assert!(e.ok(&["unprotect", &day2[..8]]).stdout.contains("no longer protected"));
    let out = e.ok(&["forget", &day2[..8]]).stdout;
    assert!(out.contains("damaged snapshots:") && out.contains("removed 1 snapshot"), "{out}");
    e.ok(&["prune"]);
    assert!(e.ok(&["check", "--read-data"]).stdout.contains("no errors found"));
    assert_eq!(e.ok(&["snapshots", "--json"]).json().as_array().unwrap().len(), 3);
}

#[test]
fn corrupt_config_is_reported() {
    let e = Env::with_repo();
    setup(&e);
    let n = e.object_size("config") as usize;
    e.flip("config", n - 5);
    let r = e.fails(&["snapshots"]);
    assert!(r.stderr.contains("config:"), "{}", r.stderr);
    e.write_object("config", b"DVLT\x01\x09\x00\x00");
    let r = e.fails(&["snapshots"]);
    assert!(r.stderr.contains("format version 9 is not supported"), "{}", r.stderr);
    e.write_object("config", b"hello");
    let r = e.fails(&["snapshots"]);
    assert!(r.stderr.contains("config:"), "{}", r.stderr);
}

#[test]
fn corrupt_key_file_is_reported() {
    let e = Env::with_repo();
    let key = &e.objects("keys")[0];
    e.write_object(key, b"DVLT\x04\x01\x00\x00garbage");
    let r = e.fails(&["snapshots"]);
    assert!(r.stderr.contains("keys/"), "{}", r.stderr);
}

#[test]
fn bad_changed_areas_files() {
    let e = Env::with_repo();
    setup(&e);
    let img = e.path("img");
    let cf = e.path("c.json");
    std::fs::write(&cf, b"{ not json").unwrap();
    let r = e.fails(&["backup", img.to_str().unwrap(), "--name", "vm", "--changed-areas", cf.to_str().unwrap()]);
    assert!(r.stderr.contains("c.json") && r.stderr.contains("not a changed-areas file"), "{}", r.stderr);
    write_changes(&cf, &[(5 * MIB as u64, 2 * MIB as u64)]);
    let r = e.fails(&["backup", img.to_str().unwrap(), "--name", "vm", "--changed-areas", cf.to_str().unwrap()]);
    assert!(r.stderr.contains("outside the disk"), "{}", r.stderr);
    assert_eq!(e.objects("snapshots").len(), 1, "a failed backup must not commit a snapshot");
}

#[test]
fn source_smaller_than_parent_is_refused() {
    let e = Env::with_repo();
    let img = setup(&e);
    let p = e.path("img");
    write(&p, &img[..4 * MIB]);
    let cf = e.path("c.json");
    write_changes(&cf, &[(0, 10)]);
    let r = e.fails(&["backup", p.to_str().unwrap(), "--name", "vm", "--changed-areas", cf.to_str().unwrap()]);
    assert!(r.stderr.contains("smaller than disk"), "{}", r.stderr);
}

#[test]
fn unreadable_source_is_reported() {
    let e = Env::with_repo();
    let r = e.fails(&["backup", e.path("does-not-exist").to_str().unwrap()]);
    assert!(r.stderr.contains("does-not-exist") && r.stderr.contains("cannot open"), "{}", r.stderr);
}

#[test]
fn restore_never_overwrites_without_asking() {
    let e = Env::with_repo();
    let img = setup(&e);
    let t = e.path("existing");
    std::fs::write(&t, b"precious").unwrap();
    let r = e.fails(&["restore", "latest", "--target", t.to_str().unwrap()]);
    assert!(r.stderr.contains("--overwrite"), "{}", r.stderr);
    assert_eq!(std::fs::read(&t).unwrap(), b"precious");
    e.ok(&["restore", "latest", "--target", t.to_str().unwrap(), "--overwrite"]);
    assert_eq!(std::fs::read(&t).unwrap(), img);
}

#[test]
fn a_pack_swapped_for_another_is_reported_by_check_with_and_without_read_data() {
    let e = Env::with_repo();
    // Two data packs: a second image of other data.
    setup(&e);
    write(&e.path("img2"), &random_bytes(8, 6 * MIB));
    e.backup(&[e.path("img2").to_str().unwrap(), "--name", "vm2"]);
    let packs = data_packs(&e);
    assert!(packs.len() >= 2, "{packs:?}");
    // Pack B's name now holds pack A's (valid, authentic) bytes.
    e.write_object(&packs[1], &e.read_object(&packs[0]));
    for args in [&["check"][..], &["check", "--read-data"][..]] {
        let r = e.fails(args);
        let line = r.stderr.lines().find(|l| l.contains(id_of(&packs[1])) && l.contains("does not match the index"));
        assert!(line.is_some(), "{args:?}: {}", r.stderr);
    }
}

/// A snapshot whose block names a blob of another length than the block (a writer's bug, or a forged manifest):
/// check, restore (to a file and to standard output) and copy report it by blob and block; none cuts or pads the
/// block, none panics.
#[test]
fn a_blob_of_another_length_than_its_block_is_reported_not_cut() {
    use diskvault::format::index::IndexFile;
    use diskvault::format::pack::{BlobSealer, PackWriter};
    use diskvault::format::snapshot::SegmentRef;
    use diskvault::format::BlobType;
    let e = Env::with_repo();
    let img = random_bytes(8, 2 * MIB);
    write(&e.path("img"), &img);
    e.backup(&[e.path("img").to_str().unwrap(), "--name", "vm"]);
    assert!(e.ok(&["check"]).stdout.contains("no errors found"));

    // A later snapshot of the same disk whose second block is a 64-byte blob.
    let repo = e.open_repo();
    let (_, mut snap) = repo.list_snapshots().unwrap().remove(0);
    let short = [5u8; 64];
    let short_id = repo.keys().blob_id(&short);
    let ids = [repo.keys().blob_id(&img[..MIB]), short_id];
    let segment: Vec<u8> = ids.iter().flat_map(|id| id.0).collect();
    let segment_id = repo.keys().blob_id(&segment);
    let mut sealer = BlobSealer::new(3);
    let mut index = IndexFile::default();
    for (t, id, plain) in [(BlobType::Data, short_id, &short[..]), (BlobType::Segment, segment_id, &segment[..])] {
        let mut w = PackWriter::new(t, 1 << 20);
        w.add(sealer.seal(repo.keys(), t, id, plain));
        index.packs.push(repo.save_pack(w.finish(repo.keys())).unwrap());
    }
    repo.save_index(&index).unwrap();
    snap.disks[0].segments = vec![SegmentRef { id: segment_id, blocks: 2 }];
    snap.time_secs += 60;
    repo.save_snapshot(&snap).unwrap();

    let short_hex = short_id.hex();
    let r = e.fails(&["check"]);
    assert!(r.stderr.contains("block 1 ") && r.stderr.contains("not the block's length"), "{}", r.stderr);
    // `snapshots --verified` counts that block as damaged in the forged snapshot only.
    let listed = e.ok(&["snapshots", "--verified", "--json"]).json();
    let damaged: Vec<u64> =
        listed.as_array().unwrap().iter().map(|s| s["verification"]["damaged_blocks"].as_u64().unwrap()).collect();
    assert_eq!(damaged, [0, 1], "{listed:#}");
    let target = e.path("out");
    let r = e.fails(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert!(r.stderr.contains(&short_hex) && r.stderr.contains("holds 64 bytes"), "{}", r.stderr);
    let r = e.fails(&["restore", "latest", "--target", "-"]);
    assert!(r.stderr.contains(&short_hex) && r.stderr.contains("holds 64 bytes"), "{}", r.stderr);
    let dest = Env::with_repo();
    let mut copy = dest.command(&["copy", "--from-repo", &e.location()]);
    copy.env("DISKVAULT_FROM_PASSWORD", &e.password);
    let r = Run::of(copy);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains(&short_hex) && r.stderr.contains("holds 64 bytes"), "{}", r.stderr);
    // The first snapshot is whole: it was copied, and restores from the copy.
    assert!(r.stdout.contains("1 snapshot copied"), "{}", r.stdout);
    assert_eq!(dest.restore("latest", &[]), img);
}
