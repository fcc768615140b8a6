//! The format is a contract: canonical encodings of every object are committed in `format-spec/vectors/`, and
//! this test fails if the code's bytes drift from them. A small repository written by format version 1 is
//! committed too, and must keep opening and restoring bit-exact.
//!
//! After a deliberate, specified format change: `DISKVAULT_UPDATE_VECTORS=1 cargo test --test format_vectors`.
//! The vectors also seed the fuzz corpus (`scripts/fuzz.sh`).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use diskvault::format::checkpoint::{Checkpoint, CheckpointDisk};
use diskvault::format::config::Config;
use diskvault::format::damage::DamageRecord;
use diskvault::format::index::{BlobLocation, IndexFile, IndexedPack};
use diskvault::format::keyfile::{KdfParams, KeyFile};
use diskvault::format::lock::LockInfo;
use diskvault::format::pack::{PackEntry, PackHeader};
use diskvault::format::snapshot::{DiskManifest, DiskStats, SegmentRef, Snapshot, Summary};
use diskvault::format::verified::VerificationRecord;
use diskvault::format::{BlobId, BlobType};

fn vectors() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("format-spec/vectors")
}

fn updating() -> bool {
    std::env::var_os("DISKVAULT_UPDATE_VECTORS").is_some()
}

fn check(name: &str, bytes: &[u8]) {
    let path = vectors().join(name);
    if updating() {
        std::fs::create_dir_all(vectors()).unwrap();
        std::fs::write(&path, bytes).unwrap();
        return;
    }
    let expected = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(expected == bytes, "{name}: the encoding differs from the committed vector (format change?)");
}

fn entry(i: u8, offset: u32) -> PackEntry {
    PackEntry {
        blob_type: BlobType::Data,
        flags: i & 1,
        key_epoch: 0,
        offset,
        stored_len: 1000 + i as u32,
        raw_len: 1 << 20,
        id: BlobId([i; 32]),
        base: None,
    }
}

/// A delta entry (format version 2) whose base is blob `base`.
fn delta_entry(i: u8, offset: u32, base: u8) -> PackEntry {
    PackEntry { flags: 3, base: Some(BlobId([base; 32])), ..entry(i, offset) }
}

#[test]
fn config_vector() {
    let c = Config {
        id: [0xAB; 32],
        created_secs: 1_795_322_283,
        block_size: 1 << 20,
        pack_target_size: 16 << 20,
        zstd_level: 3,
    };
    check("config.bin", &c.encode());
    assert_eq!(Config::decode(&c.encode()).unwrap(), c);
}

#[test]
fn pack_header_and_index_vectors() {
    let h = PackHeader { pack_type: BlobType::Data, entries: vec![entry(1, 0), entry(2, 1001)] };
    check("pack_header.bin", &h.encode());
    assert_eq!(PackHeader::decode(&h.encode(), 1001 + 1002).unwrap(), h);
    let idx = IndexFile {
        supersedes: vec![BlobId([9; 32])],
        packs: vec![IndexedPack { id: BlobId([3; 32]), pack_type: BlobType::Data, entries: h.entries.clone() }],
    };
    check("index.bin", &idx.encode());
    assert_eq!(IndexFile::decode(&idx.encode()).unwrap(), idx);
    let loc = BlobLocation { pack: BlobId([3; 32]), entry: entry(1, 0) };
    check("blob_location.bin", &loc.encode());
}

#[test]
fn pack_header_and_index_vectors_v2_with_delta_blobs() {
    let h = PackHeader {
        pack_type: BlobType::Data,
        entries: vec![entry(1, 0), delta_entry(2, 1001, 1), entry(4, 2003), delta_entry(5, 3007, 4)],
    };
    check("pack_header_v2.bin", &h.encode());
    assert_eq!(PackHeader::decode(&h.encode(), 3007 + 1005).unwrap(), h);
    let idx = IndexFile {
        supersedes: Vec::new(),
        packs: vec![IndexedPack { id: BlobId([3; 32]), pack_type: BlobType::Data, entries: h.entries.clone() }],
    };
    assert_eq!(idx.version(), 2);
    check("index_v2.bin", &idx.encode());
    assert_eq!(IndexFile::decode(&idx.encode()).unwrap(), idx);
    let loc = BlobLocation { pack: BlobId([3; 32]), entry: delta_entry(2, 1001, 1) };
    check("blob_location_v2.bin", &loc.encode());
    assert_eq!(BlobLocation::decode(&loc.encode()).unwrap(), loc);
}

#[test]
fn pack_header_and_index_vectors_v3_with_key_epochs() {
    // A pack that prune filled after a key rotation: blobs of epoch 0 copied as they were, and of epoch 1.
    let h = PackHeader {
        pack_type: BlobType::Data,
        entries: vec![entry(1, 0), PackEntry { key_epoch: 1, ..delta_entry(2, 1001, 1) }],
    };
    check("pack_header_v3.bin", &h.encode());
    assert_eq!(PackHeader::decode(&h.encode(), 1001 + 1002).unwrap(), h);
    let idx = IndexFile {
        supersedes: Vec::new(),
        packs: vec![IndexedPack { id: BlobId([3; 32]), pack_type: BlobType::Data, entries: h.entries.clone() }],
    };
    assert_eq!(idx.version(), 3);
    check("index_v3.bin", &idx.encode());
    assert_eq!(IndexFile::decode(&idx.encode()).unwrap(), idx);
    let loc = BlobLocation { pack: BlobId([3; 32]), entry: h.entries[1] };
    check("blob_location_v3.bin", &loc.encode());
    assert_eq!(BlobLocation::decode(&loc.encode()).unwrap(), loc);
}

#[test]
fn snapshot_vector() {
    let disk = |name: &str, capacity: u64| DiskManifest {
        name: name.into(),
        source_kind: "file".into(),
        source_path: format!("/images/{name}.raw"),
        capacity,
        block_size: 1 << 20,
        change_token: Some("52 3c 1a-7/12".into()),
        segments: vec![SegmentRef { id: BlobId([5; 32]), blocks: capacity.div_ceil(1 << 20) as u32 }],
        stats: DiskStats {
            bytes_read: 1,
            blocks_read: 2,
            blocks_inherited: 3,
            zero_blocks: 4,
            new_blocks: 5,
            new_bytes_stored: 6,
        },
    };
    let s = Snapshot {
        time_secs: 1_795_322_283,
        time_nanos: 123_456_789,
        hostname: "proxy-1".into(),
        username: "backup".into(),
        source: "vm-web-01".into(),
        tags: vec!["daily".into()],
        parent: Some(BlobId([7; 32])),
        disks: vec![disk("disk0", 10 << 20), disk("disk1", 3 << 20)],
        annotations: BTreeMap::from([("vm.config".to_string(), "{}".to_string())]),
        summary: Summary { duration_ms: 1500, bytes_read: 7, new_blobs: 8, bytes_added: 9 },
    };
    check("snapshot.bin", &s.encode());
    assert_eq!(Snapshot::decode(&s.encode()).unwrap(), s);
}

#[test]
fn checkpoint_vector() {
    let disk = |name: &str, capacity: u64, segments: Vec<SegmentRef>| CheckpointDisk {
        name: name.into(),
        capacity,
        block_size: 1 << 20,
        change_token: Some("52 3c 1a-7/12".into()),
        segments,
    };
    let c = Checkpoint {
        time_secs: 1_795_322_283,
        time_nanos: 5,
        hostname: "proxy-1".into(),
        username: "backup".into(),
        source: "vm-web-01".into(),
        parent: Some(BlobId([7; 32])),
        disks: vec![
            disk("disk0", 9000 << 20, vec![SegmentRef { id: BlobId([5; 32]), blocks: 4096 }]),
            disk("disk1", 3 << 20, vec![]),
        ],
    };
    check("checkpoint.bin", &c.encode());
    assert_eq!(Checkpoint::decode(&c.encode()).unwrap(), c);
}

#[test]
fn key_file_vector() {
    let k = KeyFile {
        created_secs: 1_795_322_283,
        hostname: "proxy-1".into(),
        username: "backup".into(),
        // Explicit: the vector pins the encoding, not the default parameters of new keys.
        kdf: KdfParams { memory_kib: 64 * 1024, iterations: 3, parallelism: 1 },
        salt: [1; 32],
        wrapped_secret: vec![2; 60],
        epoch: 0,
    };
    check("key_file.bin", &k.encode());
    assert_eq!(KeyFile::decode(&k.encode()).ok(), Some(k.clone()));
    // After two key rotations (format version 3): the keyring of three secrets, the newest epoch in the header.
    let rotated = KeyFile { wrapped_secret: vec![2; 3 * 32 + 28], epoch: 2, ..k };
    check("key_file_v3.bin", &rotated.encode());
    assert_eq!(KeyFile::decode(&rotated.encode()).ok(), Some(rotated));
}

#[test]
fn verification_record_vector() {
    let r = VerificationRecord { entries: vec![(BlobId([4; 32]), 1_795_322_283), (BlobId([6; 32]), -1)] };
    check("verified.bin", &r.encode());
    assert_eq!(VerificationRecord::decode(&r.encode()).unwrap(), r);
}

#[test]
fn damage_record_vector() {
    let r = DamageRecord { entries: vec![(BlobId([4; 32]), BlobId([6; 32])), (BlobId([4; 32]), BlobId([7; 32]))] };
    check("damaged.bin", &r.encode());
    assert_eq!(DamageRecord::decode(&r.encode()).unwrap(), r);
}

#[test]
fn lock_vector() {
    let l = LockInfo {
        purpose: "repair index".into(),
        hostname: "proxy-1".into(),
        username: "backup".into(),
        pid: 4242,
        created_secs: 1_795_322_283,
        holder: [9; 16],
    };
    check("lock.bin", &l.encode());
    assert_eq!(LockInfo::decode(&l.encode()).unwrap(), l);
}

/// The disk image stored in `vectors/repo-v1`: text, a zero block, and a short random tail.
fn repo_v1_image() -> Vec<u8> {
    let mut img = b"diskvault format version 1 test image. ".repeat((1 << 20) / 40 + 1);
    img.truncate(1 << 20);
    img.extend(vec![0u8; 1 << 20]);
    img.extend(common::random_bytes(2026, 300_000));
    img
}

/// A local test environment with a copy of the committed repository `vectors/<name>` (whatever backend the
/// suite tests: the committed repository is a directory). With `DISKVAULT_UPDATE_VECTORS` the repository is
/// first written anew: `init`, then `write` (diskvault commands on the committed directory).
fn committed_repository(name: &str, password: &str, write: impl FnOnce(&common::Env, &dyn Fn(&[&str]))) -> common::Env {
    let dir = vectors().join(name);
    let mut e = common::Env::local();
    e.password = password.into();
    if updating() {
        let _ = std::fs::remove_dir_all(&dir);
        let run = |args: &[&str]| {
            let mut c = e.command(args);
            c.env("DISKVAULT_REPOSITORY", &dir);
            assert!(c.status().unwrap().success(), "{args:?}");
        };
        run(&["init", "--pack-size", "1"]);
        write(&e, &run);
    }
    // Work on a copy: opening must not need to write to the repository.
    copy_dir(&dir, &e.repo());
    e
}

#[test]
fn repository_written_by_v1_stays_readable() {
    let e = committed_repository("repo-v1", "format-v1", |e, run| {
        let img_path = e.path("image.raw");
        common::write(&img_path, &repo_v1_image());
        run(&["backup", "--name", "vector", &format!("disk0={}", img_path.display())]);
    });
    let restored = e.restore("latest", &["--name", "vector"]);
    assert!(restored == repo_v1_image(), "the v1 repository no longer restores its image");
    let snaps = e.ok(&["snapshots", "--json"]).json();
    assert_eq!(snaps[0]["disks"][0]["name"], "disk0");
}

/// The two disk images stored in `vectors/repo-v2`: day 1 changes one page of each of day 0's two random blocks,
/// which format version 2 stores as delta blobs.
fn repo_v2_images() -> [Vec<u8>; 2] {
    // Each block: 256 KiB of random data, then zeros (small to commit, and still no compression can hide a
    // changed page).
    let mut day0 = vec![0u8; 2 << 20];
    day0[..256 << 10].copy_from_slice(&common::random_bytes(2027, 256 << 10));
    day0[1 << 20..(1 << 20) + (256 << 10)].copy_from_slice(&common::random_bytes(2028, 256 << 10));
    let mut day1 = day0.clone();
    for at in [5 * 4096, (1 << 20) + 37 * 4096] {
        day1[at..at + 4096].copy_from_slice(&common::random_bytes(at as u64, 4096));
    }
    [day0, day1]
}

#[test]
fn repository_written_by_v2_with_delta_blobs_stays_readable() {
    let e = committed_repository("repo-v2", "format-v2", |e, run| {
        let img_path = e.path("image.raw");
        for (img, time) in repo_v2_images().iter().zip(["2026-11-30 01:00:00", "2026-11-30 02:00:00"]) {
            common::write(&img_path, img);
            run(&["backup", "--name", "vector", "--time", time, &format!("disk0={}", img_path.display())]);
        }
    });
    let snaps = e.ok(&["snapshots", "--json"]).json();
    let ids: Vec<&str> = snaps.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    assert_eq!(e.delta_blobs().len(), 2, "the committed repository holds day 1's two delta blobs");
    for (id, img) in ids.iter().zip(repo_v2_images()) {
        assert!(e.restore(id, &[]) == img, "the v2 repository no longer restores snapshot {id}");
    }
    let check = e.ok(&["check", "--read-data"]);
    assert!(check.stdout.contains("no errors found"), "{}", check.stdout);
}

/// The disk images stored in `vectors/repo-v3`: those of `repo-v2`, the second backed up after a key rotation.
#[test]
fn repository_written_by_v3_after_a_key_rotation_stays_readable() {
    let e = committed_repository("repo-v3", "format-v3", |e, run| {
        let img_path = e.path("image.raw");
        let [day0, day1] = repo_v2_images();
        common::write(&img_path, &day0);
        run(&["backup", "--name", "vector", "--time", "2026-12-06 01:00:00", &format!("disk0={}", img_path.display())]);
        // The same password again: the vector needs one password for both snapshots.
        let password_file = e.path("new-password");
        common::write(&password_file, b"format-v3\n");
        run(&["key", "rotate", "--new-password-file", password_file.to_str().unwrap()]);
        common::write(&img_path, &day1);
        run(&["backup", "--name", "vector", "--time", "2026-12-06 02:00:00", &format!("disk0={}", img_path.display())]);
    });
    let config = std::fs::read(e.repo().join("config")).unwrap();
    assert_eq!((config[5], config[6]), (3, 1), "the committed config is sealed with key epoch 1");
    let snaps = e.ok(&["snapshots", "--json"]).json();
    let ids: Vec<&str> = snaps.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), 2);
    for (id, img) in ids.iter().zip(repo_v2_images()) {
        assert!(e.restore(id, &[]) == img, "the v3 repository no longer restores snapshot {id}");
    }
    let check = e.ok(&["check", "--read-data"]);
    assert!(check.stdout.contains("no errors found"), "{}", check.stdout);
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap_or_else(|e| panic!("{}: {e}", from.display())) {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
