//! End-to-end tests of the engine through the built binary: backup, incrementals, dedup, restore, keys.

mod common;

use common::*;

/// An image with every kind of content: random, zeros, repeated data, a sparse hole, and a tail that is not
/// a multiple of 1 MiB.
fn mixed_image() -> Vec<u8> {
    let mut img = Vec::new();
    img.extend(random_bytes(1, 3 * MIB));
    img.extend(vec![0u8; 2 * MIB]);
    img.extend(b"repeated pattern ".repeat(3 * MIB / 17));
    img.extend(random_bytes(2, MIB)); // this block appears twice: dedup inside one disk
    img.extend(random_bytes(2, MIB));
    img.extend(random_bytes(3, 12_345));
    img
}

#[test]
fn full_backup_restores_bit_exact() {
    let e = Env::with_repo();
    let img = mixed_image();
    let path = e.path("mixed.raw");
    write(&path, &img);
    let r = e.backup(&[path.to_str().unwrap(), "--name", "vm1"]);
    let disk = &r["disks"][0];
    assert_eq!(disk["capacity"], img.len() as u64);
    assert_eq!(disk["zero_blocks"], 2);
    // 3 random + 3 pattern-ish (the pattern blocks differ by phase) + 1 random twice (stored once) + tail.
    let distinct: std::collections::HashSet<&[u8]> = img.chunks(MIB).filter(|c| c.iter().any(|&b| b != 0)).collect();
    assert_eq!(disk["new_blocks"], distinct.len() as u64);
    assert_eq!(e.restore("latest", &[]), img);
}

#[test]
fn restore_to_standard_output_streams_the_disk_in_order() {
    let e = Env::with_repo();
    let img = mixed_image();
    let path = e.path("mixed.raw");
    write(&path, &img);
    e.backup(&[path.to_str().unwrap(), "--name", "vm1"]);
    let out = e.command(&["restore", "latest", "--target", "-"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(out.stdout == img, "the stream differs from the disk ({} bytes for {})", out.stdout.len(), img.len());
    assert!(stderr.contains("to standard output"), "the report goes to standard error: {stderr}");

    // What cannot work on a pipe is refused before anything is written.
    for extra in [&["--verify"][..], &["--format", "qcow2"], &["--allow-partial"]] {
        let mut args = vec!["restore", "latest", "--target", "-"];
        args.extend_from_slice(extra);
        let r = e.command(&args).output().unwrap();
        assert!(!r.status.success() && r.stdout.is_empty(), "{extra:?} was accepted");
    }

    // A reader that goes away: the restore stops with an error, without a panic.
    let mut child = e
        .command(&["restore", "latest", "--target", "-"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut head = vec![0u8; 1000];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut head).unwrap();
    assert!(head[..] == img[..1000]);
    // The pipe was given a 1 MiB buffer (Linux's 64 KiB made a stream into `cat` three times slower).
    let fd = std::os::fd::AsRawFd::as_raw_fd(child.stdout.as_ref().unwrap());
    // SAFETY: F_GETPIPE_SZ on our end of the child's stdout pipe.
    let pipe_size = unsafe { libc::fcntl(fd, libc::F_GETPIPE_SZ) };
    assert!(pipe_size >= 1 << 20, "the stream's pipe holds {pipe_size} bytes");
    drop(child.stdout.take());
    let done = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&done.stderr);
    assert!(!done.status.success(), "a restore into a closed pipe succeeded");
    assert!(stderr.contains("standard output") && !stderr.contains("panicked"), "{stderr}");

    // A damaged pack: the stream stops at the block, naming it; what came before is the disk's beginning.
    let pack = e.objects("packs").into_iter().max_by_key(|p| e.object_size(p)).unwrap();
    e.flip(&pack, 100);
    let out = e.command(&["restore", "latest", "--target", "-"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a damaged disk streamed successfully");
    assert!(stderr.contains("cannot be restored") && !stderr.contains("panicked"), "{stderr}");
    assert!(out.stdout.len() < img.len() && out.stdout[..] == img[..out.stdout.len()], "a wrong prefix was written");
}

#[test]
fn diff_lists_the_byte_ranges_that_changed_between_snapshots() {
    let e = Env::with_repo();
    let mut day0 = random_bytes(90, 8 * MIB);
    day0[6 * MIB..7 * MIB].fill(0);
    let mut day1 = day0.clone();
    day1[MIB + 5..MIB + 15].copy_from_slice(b"ten bytes!"); // rewritten
    day1[6 * MIB..7 * MIB].copy_from_slice(&random_bytes(91, MIB)); // allocated
    day1[7 * MIB..8 * MIB].fill(0); // zeroed
    day1.extend(random_bytes(92, MIB + 100)); // grown by a block and 100 bytes, both allocated
    let snap = |data: &[u8], disks: &[&str]| -> String {
        write(&e.path("d.raw"), data);
        let mut args = vec!["--name".to_string(), "vm".to_string()];
        args.extend(disks.iter().map(|d| format!("{d}={}", e.path("d.raw").display())));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        e.backup(&args)["snapshot"].as_str().unwrap().to_string()
    };
    let s0 = snap(&day0, &["d0"]);
    let s1 = snap(&day1, &["d0"]);
    let s2 = snap(&day1, &["d0", "d1"]);

    let j = e.ok(&["diff", &s0[..8], &s1, "--json"]).json();
    let d = &j["disks"][0];
    assert_eq!((d["name"].as_str(), d["status"].as_str()), (Some("d0"), Some("changed")), "{j}");
    assert_eq!(
        (d["old_capacity"].as_u64(), d["new_capacity"].as_u64()),
        (Some(8 * MIB as u64), Some(9 * MIB as u64 + 100))
    );
    assert_eq!(
        (d["allocated_blocks"].as_u64(), d["zeroed_blocks"].as_u64(), d["rewritten_blocks"].as_u64()),
        (Some(3), Some(1), Some(1)),
        "{j}"
    );
    let mib = MIB as u64;
    assert_eq!(
        d["extents"],
        serde_json::json!([{"start": mib, "length": mib}, {"start": 6 * mib, "length": 3 * mib + 100}])
    );
    assert_eq!(d["changed_bytes"], 4 * mib + 100);
    let text = e.ok(&["diff", &s0, &s1]).stdout;
    assert!(text.contains("d0: resized from") && text.contains("in 5 blocks and 2 ranges"), "{text}");
    assert!(text.contains(&format!("bytes {}..{}", 6 * mib, 9 * mib + 100)), "{text}");

    // A disk added; the same disk unchanged; the order of the arguments is the direction.
    let j = e.ok(&["diff", &s1, &s2, "--json"]).json();
    let status: Vec<(&str, &str)> = j["disks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["name"].as_str().unwrap(), d["status"].as_str().unwrap()))
        .collect();
    assert_eq!(status, [("d0", "unchanged"), ("d1", "added")]);
    let j = e.ok(&["diff", &s2, &s1, "--disk", "d1", "--json"]).json();
    assert_eq!(j["disks"][0]["status"], "removed");
    let j = e.ok(&["diff", &s1, &s0, "--json"]).json();
    assert_eq!(
        (j["disks"][0]["allocated_blocks"].as_u64(), j["disks"][0]["zeroed_blocks"].as_u64()),
        (Some(1), Some(3))
    );
    let r = e.fails(&["diff", &s0, &s1, "--disk", "nosuch"]);
    assert!(r.stderr.contains("a disk \"nosuch\""), "{}", r.stderr);
}

#[test]
fn sparse_source_is_skipped_and_restored_sparse() {
    let e = Env::with_repo();
    let path = e.path("sparse.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 * MIB as u64).unwrap();
        f.write_all_at(&random_bytes(9, MIB), 10 * MIB as u64).unwrap();
        f.write_all_at(b"end", 64 * MIB as u64 - 3).unwrap();
    }
    let r = e.backup(&[path.to_str().unwrap()]);
    let read = r["disks"][0]["blocks_read"].as_u64().unwrap();
    assert!(read <= 4, "holes must not be read, read {read} blocks");
    let target = e.path("sparse.out");
    e.ok(&["restore", "latest", "--target", target.to_str().unwrap(), "--verify"]);
    assert_eq!(std::fs::read(&target).unwrap(), std::fs::read(&path).unwrap());
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&target).unwrap().blocks() * 512;
    assert!(allocated < 8 * MIB as u64, "restored file is not sparse: {allocated} bytes allocated");
}

#[test]
fn incremental_chain_from_changed_areas() {
    let e = Env::with_repo();
    let path = e.path("disk.raw");
    let mut img = random_bytes(10, 40 * MIB + 777);
    write(&path, &img);
    let full = e.backup(&[path.to_str().unwrap(), "--name", "vm"]);
    let mut points = vec![(full["snapshot"].as_str().unwrap().to_string(), img.clone())];

    let changes: [&[(u64, u64)]; 3] = [
        &[(5 * MIB as u64 + 100, 4096), (20 * MIB as u64, 2 * MIB as u64)],
        &[(0, 1), (39 * MIB as u64, MIB as u64 + 777)],
        &[(7 * MIB as u64 - 10, 20), (30 * MIB as u64 + 5, 65536)],
    ];
    for (step, areas) in changes.iter().enumerate() {
        for (k, &(s, l)) in areas.iter().enumerate() {
            let new = random_bytes(100 + step as u64 * 10 + k as u64, l as usize);
            img[s as usize..(s + l) as usize].copy_from_slice(&new);
        }
        write(&path, &img);
        let cf = e.path(&format!("changes-{step}.json"));
        write_changes(&cf, areas);
        let r = e.backup(&[path.to_str().unwrap(), "--name", "vm", "--changed-areas", cf.to_str().unwrap()]);
        assert_eq!(r["parent"].as_str().unwrap(), points.last().unwrap().0, "step {step} builds on the previous");
        let d = &r["disks"][0];
        assert_eq!(
            d["blocks_read"].as_u64().unwrap(),
            blocks_touched(areas),
            "step {step}: only changed blocks are read"
        );
        assert_eq!(d["blocks_inherited"].as_u64().unwrap() + blocks_touched(areas), 41);
        points.push((r["snapshot"].as_str().unwrap().to_string(), img.clone()));
    }
    for (id, expected) in &points {
        assert!(e.restore(id, &[]) == *expected, "snapshot {id} does not restore its point in time");
    }
}

#[test]
fn unchanged_segments_are_reused_not_rewritten() {
    // 5 GiB sparse disk = 2 segments; an incremental touching only the first rewrites one segment blob.
    let e = Env::with_repo();
    let path = e.path("big.raw");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(5 << 30).unwrap();
        f.write_all_at(&random_bytes(1, MIB), 0).unwrap();
        f.write_all_at(&random_bytes(2, MIB), 4500 << 20).unwrap();
    }
    let p = path.to_str().unwrap();
    e.backup(&[p, "--name", "big"]);
    let cf = e.path("c.json");
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&random_bytes(3, 100), 0).unwrap();
    }
    write_changes(&cf, &[(0, 100)]);
    let before = e.objects("packs").len();
    let r = e.backup(&[p, "--name", "big", "--changed-areas", cf.to_str().unwrap()]);
    assert_eq!(r["disks"][0]["blocks_read"], 1);
    assert_eq!(r["disks"][0]["new_blocks"], 1);
    // One data pack and one metadata pack with exactly one segment (the second is reused).
    assert_eq!(e.objects("packs").len(), before + 2);
    let snaps = e.ok(&["snapshots", "--json"]).json();
    let id = snaps[1]["id"].as_str().unwrap();
    let cat = e.ok(&["cat", "snapshot", id]).json();
    let cat0 = e.ok(&["cat", "snapshot", snaps[0]["id"].as_str().unwrap()]).json();
    let segs = &cat["disks"][0]["segments"];
    let segs0 = &cat0["disks"][0]["segments"];
    assert_ne!(segs[0], segs0[0]);
    assert_eq!(segs[1], segs0[1]);
}

#[test]
fn second_disk_stores_only_its_new_blocks() {
    let e = Env::with_repo();
    let base = random_bytes(20, 30 * MIB);
    let a = e.path("a.raw");
    write(&a, &base);
    e.backup(&[a.to_str().unwrap(), "--name", "vm-a"]);
    let mut other = base.clone();
    other[3 * MIB..5 * MIB].copy_from_slice(&random_bytes(21, 2 * MIB));
    other.extend(random_bytes(22, MIB));
    let b = e.path("b.raw");
    write(&b, &other);
    let before = e.repo_bytes();
    let r = e.backup(&[b.to_str().unwrap(), "--name", "vm-b"]);
    assert_eq!(r["disks"][0]["new_blocks"], 3, "only the 3 blocks not in disk a are new");
    let added = e.repo_bytes() - before;
    // 3 MiB of incompressible data plus pack headers, index file, segment and snapshot.
    assert!(added >= 3 * MIB as u64 && added < 3 * MIB as u64 + 64 * 1024, "added {added} bytes");
    assert_eq!(e.restore("latest", &["--name", "vm-b"]), other);
    assert_eq!(e.restore("latest", &["--name", "vm-a"]), base);
}

#[test]
fn several_disks_in_one_snapshot() {
    let e = Env::with_repo();
    let d0 = random_bytes(30, 3 * MIB + 5);
    let d1 = random_bytes(31, 2 * MIB);
    write(&e.path("d0"), &d0);
    write(&e.path("d1"), &d1);
    let s0 = format!("disk0={}", e.path("d0").display());
    let s1 = format!("disk1={}", e.path("d1").display());
    let r = e.backup(&["--name", "vm", &s0, &s1]);
    let id = r["snapshot"].as_str().unwrap();
    assert_eq!(e.restore(id, &["--disk", "disk0"]), d0);
    assert_eq!(e.restore(&format!("{}:disk1", &id[..8]), &[]), d1);
    let t = e.path("x");
    let err = e.fails(&["restore", id, "--target", t.to_str().unwrap()]);
    assert!(err.stderr.contains("several disks"), "{}", err.stderr);
}

#[test]
fn deleted_cache_is_rebuilt_and_still_dedups() {
    let e = Env::with_repo();
    let img = random_bytes(40, 8 * MIB);
    let p = e.path("img");
    write(&p, &img);
    e.backup(&[p.to_str().unwrap()]);
    std::fs::remove_dir_all(e.cache()).unwrap();
    let before = e.repo_bytes();
    let r = e.backup(&[p.to_str().unwrap(), "--no-parent"]);
    assert_eq!(r["disks"][0]["new_blocks"], 0);
    assert_eq!(r["disks"][0]["blocks_read"], 8);
    // Only the snapshot object is new (the segment is known too).
    assert!(e.repo_bytes() - before < 4096);
    // A damaged cache is rebuilt as well.
    for f in walk(&e.cache()) {
        if f.extension().is_some_and(|x| x == "sst") || f.file_name().unwrap().to_string_lossy().starts_with("CURRENT")
        {
            std::fs::write(&f, b"garbage").unwrap();
        }
    }
    let r = e.backup(&[p.to_str().unwrap(), "--no-parent"]);
    assert_eq!(r["disks"][0]["new_blocks"], 0);
    assert_eq!(e.restore("latest", &[]), img);
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if e.path().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn wrong_password_is_refused() {
    let mut e = Env::with_repo();
    e.password = "not the password".into();
    let r = e.fails(&["snapshots"]);
    assert_eq!(r.code, 12);
    assert!(r.stderr.contains("wrong password"), "{}", r.stderr);
}

#[test]
fn missing_repository_is_reported() {
    let e = Env::new();
    let r = e.fails(&["snapshots"]);
    assert_eq!(r.code, 10);
    assert!(r.stderr.contains("no repository"), "{}", r.stderr);
    e.ok(&["init"]);
    let r = e.fails(&["init"]);
    assert!(r.stderr.contains("already exists"), "{}", r.stderr);
}

#[test]
fn keys_add_list_remove_passwd() {
    let mut e = Env::with_repo();
    let img = random_bytes(50, MIB);
    write(&e.path("i"), &img);
    e.backup(&[e.path("i").to_str().unwrap()]);
    let add = e.command(&["key", "add"]).env("DISKVAULT_NEW_PASSWORD", "second").output().unwrap();
    assert!(add.status.success());
    let list = e.ok(&["key", "list"]).stdout;
    assert_eq!(list.lines().filter(|l| l.contains("20")).count(), 2, "{list}");
    let first = e.password.clone();
    e.password = "second".into();
    assert_eq!(e.restore("latest", &[]), img);
    // Remove the first key (opened with the second one).
    let list = e.ok(&["key", "list"]).stdout;
    let other = list
        .lines()
        .find(|l| l.starts_with("  ") && !l.contains("created"))
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    e.ok(&["key", "remove", &other]);
    e.password = first;
    e.fails(&["snapshots"]);
    e.password = "second".into();
    let pw = e.command(&["key", "passwd"]).env("DISKVAULT_NEW_PASSWORD", "third").output().unwrap();
    assert!(pw.status.success());
    e.fails(&["snapshots"]);
    e.password = "third".into();
    assert_eq!(e.restore("latest", &[]), img);
    // The key in use cannot be removed.
    let list = e.ok(&["key", "list"]).stdout;
    let cur = list.lines().find(|l| l.starts_with('*')).unwrap().split_whitespace().nth(1).unwrap().to_string();
    let r = e.fails(&["key", "remove", &cur]);
    assert!(r.stderr.contains("refusing"), "{}", r.stderr);
}

#[test]
fn the_recovery_key_opens_a_repository_whose_key_files_are_all_gone() {
    let mut e = Env::with_repo();
    let img = random_bytes(51, 3 * MIB);
    write(&e.path("i"), &img);
    e.backup(&[e.path("i").to_str().unwrap()]);
    let printed = e.ok(&["key", "export"]).stdout;
    assert!(printed.starts_with("diskvault recovery key v1\n") && printed.lines().count() == 4, "{printed}");
    let file = e.path("recovery.txt");
    e.ok(&["key", "export", "--output", file.to_str().unwrap()]);
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    assert_eq!(std::fs::read_to_string(&file).unwrap(), printed);
    let r = e.fails(&["key", "export", "--output", file.to_str().unwrap()]);
    assert!(r.stderr.contains("cannot create"), "{}", r.stderr);

    // A recovery key with a mistyped digit, and one of another repository, are refused; nothing is added.
    let secret_line = printed.lines().find(|l| l.starts_with("secret")).unwrap();
    let digit = secret_line.chars().nth(8).unwrap();
    let typo = format!("{}{}{}", &secret_line[..8], if digit == '0' { '1' } else { '0' }, &secret_line[9..]);
    std::fs::write(e.path("typo.txt"), printed.replace(secret_line, &typo)).unwrap();
    let other = Env::with_repo();
    let other_key = other.ok(&["key", "export"]).stdout;
    std::fs::write(e.path("other.txt"), other_key).unwrap();
    for (f, says) in [("typo.txt", "check digits"), ("other.txt", "does not open this repository")] {
        let out = e
            .command(&["key", "recover", "--recovery-key-file", e.path(f).to_str().unwrap()])
            .env("DISKVAULT_NEW_PASSWORD", "new")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(says), "{f}: {stderr}");
    }
    assert_eq!(e.objects("keys").len(), 1);

    // Every key file lost: no password opens the repository, the recovery key adds one that does.
    for k in e.objects("keys") {
        e.delete_object(&k);
    }
    e.fails(&["snapshots"]);
    let recover = ["key", "recover", "--recovery-key-file", file.to_str().unwrap()];
    let out = e.command(&recover).stdin(std::process::Stdio::null()).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no new password given: set DISKVAULT_NEW_PASSWORD"), "{stderr}");
    let out = e
        .command(&recover)
        .env_remove("DISKVAULT_PASSWORD")
        .env("DISKVAULT_NEW_PASSWORD", "recovered")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    e.password = "recovered".into();
    assert_eq!(e.restore("latest", &[]), img);
    e.ok(&["check", "--read-data"]);
}

/// What the key-rotation test's revoked holder can still open with the secrets it kept: whether every pack
/// header and snapshot opens under `keys`, by object name.
fn opens_with(e: &Env, keys: &diskvault::crypto::Keys) -> Vec<(String, bool)> {
    use diskvault::format::envelope::{self, Kind};
    let mut out = Vec::new();
    for name in e.objects("packs") {
        let opened = diskvault::format::pack::read_header(keys, &e.read_object(&name)).is_ok();
        out.push((name, opened));
    }
    for name in e.objects("snapshots") {
        out.push((name.clone(), envelope::open(keys, Kind::Snapshot, &e.read_object(&name)).is_ok()));
    }
    out
}

#[test]
fn key_rotation_revokes_every_older_key_and_keeps_the_data() {
    use diskvault::format::recovery_key::RecoveryKey;
    let mut e = Env::new();
    e.ok(&["init", "--pack-size", "1"]);
    let disk = e.path("disk.raw");
    // Blocks that compress to a quarter, so that a 1 MiB pack holds several and prune has some to repack.
    let block = |seed: u64| [random_bytes(seed, MIB / 4), vec![0u8; 3 * MIB / 4]].concat();
    let day0: Vec<u8> = (0..6).flat_map(|i| block(60 + i)).collect();
    write(&disk, &day0);
    let d = disk.to_str().unwrap();
    e.backup(&["--name", "vm", d]);
    // A second password (a colleague who leaves), the recovery key and the colleague's key file as they were
    // before the rotation: what a revoked holder may have kept.
    let add = e.command(&["key", "add"]).env("DISKVAULT_NEW_PASSWORD", "colleague").output().unwrap();
    assert!(add.status.success());
    let old_recovery = e.ok(&["key", "export"]).stdout;
    let old_key_files: Vec<(String, Vec<u8>)> =
        e.objects("keys").into_iter().map(|k| (k.clone(), e.read_object(&k))).collect();
    let before_rotation = e.objects("packs");

    let rotate = e.command(&["key", "rotate"]).env("DISKVAULT_NEW_PASSWORD", "rotated").output().unwrap();
    let said = String::from_utf8_lossy(&rotate.stdout);
    assert!(rotate.status.success(), "{}", String::from_utf8_lossy(&rotate.stderr));
    assert!(said.contains("key epoch 1") && said.contains("removed 2 key file(s)"), "{said}");
    assert_eq!(e.objects("keys").len(), 1, "only the new password's key file is left");
    for old in ["colleague", &e.password.clone()] {
        e.password = old.into();
        let r = e.fails(&["snapshots"]);
        assert!(r.stderr.contains("wrong password"), "{old}: {}", r.stderr);
    }
    e.password = "rotated".into();

    // Day 1 changes two blocks: only they are stored (ids did not change), sealed with the new key.
    let mut day1 = day0.clone();
    day1[MIB..3 * MIB].copy_from_slice(&[block(70), block(71)].concat());
    write(&disk, &day1);
    let r = e.backup(&["--name", "vm", d]);
    assert_eq!(r["disks"][0]["new_blocks"], 2, "{r}");
    let snaps = e.ok(&["snapshots", "--json"]).json();
    let (s0, s1) = (snaps[0]["id"].as_str().unwrap().to_string(), snaps[1]["id"].as_str().unwrap().to_string());
    assert_eq!(e.restore(&s0, &[]), day0);
    assert_eq!(e.restore(&s1, &[]), day1);

    // The revoked secrets open what was there before the rotation and nothing written since.
    let old = RecoveryKey::decode(&old_recovery).unwrap();
    let old_keys = diskvault::crypto::Keys::from_keyring(&old.secrets);
    for (name, opened) in opens_with(&e, &old_keys) {
        let before = before_rotation.contains(&name) || name.ends_with(&s0);
        assert_eq!(opened, before, "{name}: the revoked key {} it", if opened { "opens" } else { "does not open" });
    }
    // A key file put back from before the rotation, and the old recovery key, are refused by name.
    for (name, bytes) in &old_key_files {
        e.write_object(name, bytes);
    }
    let list = e.ok(&["key", "list"]).stdout;
    assert_eq!(list.matches("from before a key rotation").count(), 2, "{list}");
    e.password = "colleague".into();
    let r = e.fails(&["snapshots"]);
    assert!(r.stderr.contains("from before a key rotation"), "{}", r.stderr);
    e.password = "rotated".into();
    std::fs::write(e.path("old-recovery.txt"), &old_recovery).unwrap();
    let out = e
        .command(&["key", "recover", "--recovery-key-file", e.path("old-recovery.txt").to_str().unwrap()])
        .env("DISKVAULT_NEW_PASSWORD", "thief")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("from before a key rotation"), "{stderr}");
    for (name, _) in &old_key_files {
        e.delete_object(name);
    }

    // Prune copies day 0's blocks that day 1 still uses (sealed with epoch 0) into packs of the new epoch.
    e.ok(&["forget", "--keep-last", "1"]);
    e.ok(&["prune", "--max-unused", "0"]);
    assert_eq!(e.ok(&["cat", "config"]).json()["key_epoch"], 1);
    let repacked_old_blobs = e.objects("packs").iter().filter(|p| !before_rotation.contains(p)).any(|p| {
        let pack = e.ok(&["cat", "pack", p.rsplit('/').next().unwrap()]).json();
        pack["blobs"].as_array().unwrap().iter().any(|b| b["key_epoch"] == 0)
    });
    assert!(repacked_old_blobs, "prune copied day 0's blocks into a pack written after the rotation");
    assert_eq!(e.restore(&s1, &[]), day1);
    let check = e.ok(&["check", "--read-data"]);
    assert!(check.stdout.contains("no errors found"), "{}", check.stdout);

    // prune --reencrypt seals those blocks (and the index) again with the new key: the revoked secrets then open
    // no pack at all. A dry run only counts them.
    let before = e.ok(&["check"]).stderr;
    assert!(before.contains("sealed with a key from before the last key rotation"), "{before}");
    let packs = e.objects("packs");
    let dry = e.ok(&["prune", "--reencrypt", "--dry-run"]).stdout;
    assert!(dry.contains("blobs would be sealed again with the current key: "), "{dry}");
    assert_eq!(e.objects("packs"), packs, "a dry run changed the packs");
    let out = e.ok(&["prune", "--reencrypt"]).stdout;
    assert!(
        out.contains("blobs sealed again with the current key: ") && out.contains("left (beyond --max-repack): 0"),
        "{out}"
    );
    for (name, opened) in opens_with(&e, &old_keys) {
        assert!(!opened || name.contains("snapshots/"), "{name}: the revoked key still opens it after --reencrypt");
    }
    for index in e.objects("index") {
        assert_eq!(e.read_object(&index)[5..8], [3, 1, 0], "{index} is sealed with key epoch 1");
    }
    for p in e.objects("packs") {
        let pack = e.ok(&["cat", "pack", p.rsplit('/').next().unwrap()]).json();
        assert!(pack["blobs"].as_array().unwrap().iter().all(|b| b["key_epoch"] == 1), "{p}: {pack}");
    }
    let again = e.ok(&["prune", "--reencrypt"]).stdout;
    assert!(!again.contains("sealed again"), "nothing is left to re-encrypt: {again}");
    assert_eq!(e.restore(&s1, &[]), day1);
    let check = e.ok(&["check", "--read-data"]);
    assert!(check.stdout.contains("no errors found"), "{}", check.stdout);
    assert!(!check.stderr.contains("key from before"), "{}", check.stderr);

    // The new recovery key holds both secrets and opens the repository without any key file.
    let new_recovery = e.ok(&["key", "export"]).stdout;
    assert!(new_recovery.starts_with("diskvault recovery key v2\n"), "{new_recovery}");
    std::fs::write(e.path("recovery.txt"), &new_recovery).unwrap();
    for k in e.objects("keys") {
        e.delete_object(&k);
    }
    let out = e
        .command(&["key", "recover", "--recovery-key-file", e.path("recovery.txt").to_str().unwrap()])
        .env("DISKVAULT_NEW_PASSWORD", "recovered")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    e.password = "recovered".into();
    assert_eq!(e.restore(&s1, &[]), day1);
}

#[test]
fn password_file_and_command() {
    let e = Env::with_repo();
    let pf = e.path("pw");
    std::fs::write(&pf, format!("{}\n", e.password)).unwrap();
    let out = e
        .command(&["snapshots", "--password-file", pf.to_str().unwrap()])
        .env_remove("DISKVAULT_PASSWORD")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let cmd = format!("cat {}", pf.display());
    let out = e.command(&["snapshots", "--password-command", &cmd]).env_remove("DISKVAULT_PASSWORD").output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out =
        e.command(&["snapshots"]).env_remove("DISKVAULT_PASSWORD").stdin(std::process::Stdio::null()).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no repository password given: set DISKVAULT_PASSWORD"), "{stderr}");
}

/// `name{labels}` → value of a Prometheus text file, after checking every line is a comment or a sample.
fn prometheus_samples(text: &str) -> std::collections::HashMap<String, f64> {
    let mut samples = std::collections::HashMap::new();
    for line in text.lines() {
        if line.starts_with("# HELP ") || line.starts_with("# TYPE ") {
            continue;
        }
        let (series, value) = line.rsplit_once(' ').unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let (name, labels) = series.split_once('{').unwrap_or_else(|| panic!("no labels: {line:?}"));
        assert!(name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "metric name {name:?}");
        assert!(labels.ends_with('}') && labels.contains("command=\""), "labels of {line:?}");
        let value: f64 = value.parse().unwrap_or_else(|_| panic!("value of {line:?}"));
        assert!(samples.insert(series.to_string(), value).is_none(), "{series} twice");
    }
    samples
}

#[test]
fn metrics_file_reports_each_run_for_prometheus() {
    let e = Env::with_repo();
    let mut img = random_bytes(31, 3 * MIB);
    img.extend(vec![0u8; MIB]);
    write(&e.path("vm.raw"), &img);
    let metrics = e.path("diskvault.prom");
    let m = metrics.to_str().unwrap();
    let read = || prometheus_samples(&std::fs::read_to_string(&metrics).unwrap());
    let repo = e.location();
    let common = |command: &str| format!("command=\"{command}\",repository=\"{repo}\"");
    let started = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();

    e.ok(&["backup", "--metrics-file", m, "--name", "web01", e.path("vm.raw").to_str().unwrap()]);
    let s = read();
    let b = common("backup");
    assert_eq!(s[&format!("diskvault_run_success{{{b}}}")], 1.0);
    assert_eq!(s[&format!("diskvault_run_exit_code{{{b}}}")], 0.0);
    let succeeded = s[&format!("diskvault_last_success_timestamp_seconds{{{b}}}")];
    assert!(succeeded >= started.floor() && succeeded < started + 600.0, "{succeeded} vs {started}");
    assert_eq!(s[&format!("diskvault_backup_bytes_read{{{b},source=\"web01\"}}")], img.len() as f64);
    let disk = format!("{b},source=\"web01\",disk=\"vm.raw\"");
    assert_eq!(s[&format!("diskvault_backup_disk_capacity_bytes{{{disk}}}")], img.len() as f64);
    assert_eq!(s[&format!("diskvault_backup_disk_new_blocks{{{disk}}}")], 3.0);
    assert_eq!(s[&format!("diskvault_backup_disk_zero_blocks{{{disk}}}")], 1.0);
    assert!(s[&format!("diskvault_backup_bytes_added{{{b},source=\"web01\"}}")] > (3 * MIB) as f64);

    // From a monitoring host: the newest snapshot of each source, whichever proxy made it.
    let taken = s[&format!("diskvault_backup_snapshot_timestamp_seconds{{{b},source=\"web01\"}}")];
    let listed = e.path("snapshots.prom");
    e.ok(&["snapshots", "--metrics-file", listed.to_str().unwrap()]);
    let l = prometheus_samples(&std::fs::read_to_string(&listed).unwrap());
    let src = format!("{},source=\"web01\"", common("snapshots"));
    assert_eq!(l[&format!("diskvault_snapshots{{{src}}}")], 1.0);
    assert_eq!(l[&format!("diskvault_snapshot_newest_timestamp_seconds{{{src}}}")], taken);

    // A failed run says so and keeps the time of the last success, for "no good backup for a day" alerts.
    let r = e.run(&["backup", "--metrics-file", m, "--name", "web01", e.path("gone.raw").to_str().unwrap()]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let s = read();
    assert_eq!(s[&format!("diskvault_run_success{{{b}}}")], 0.0);
    assert_eq!(s[&format!("diskvault_run_exit_code{{{b}}}")], 1.0);
    assert_eq!(s[&format!("diskvault_last_success_timestamp_seconds{{{b}}}")], succeeded);
    assert!(!s.keys().any(|k| k.starts_with("diskvault_backup_")), "no numbers of a backup that did not happen");
    let mut wrong = e.command(&["backup", "--metrics-file", m, "--name", "web01", e.path("vm.raw").to_str().unwrap()]);
    wrong.env("DISKVAULT_PASSWORD", "not the password");
    assert_eq!(Run::of(wrong).code, 12);
    assert_eq!(read()[&format!("diskvault_run_exit_code{{{b}}}")], 12.0);

    // check: the damage it finds is a number an alert can watch.
    let check = e.path("check.prom");
    let c = check.to_str().unwrap();
    e.ok(&["check", "--read-data", "--metrics-file", c]);
    let s = prometheus_samples(&std::fs::read_to_string(&check).unwrap());
    let k = common("check");
    assert_eq!((s[&format!("diskvault_run_success{{{k}}}")], s[&format!("diskvault_check_errors{{{k}}}")]), (1.0, 0.0));
    assert!(s[&format!("diskvault_check_bytes_read{{{k}}}")] > (3 * MIB) as f64);
    let pack = e.objects("packs").into_iter().max_by_key(|p| e.object_size(p)).unwrap();
    e.flip(&pack, 1000);
    assert_eq!(e.run(&["check", "--read-data", "--metrics-file", c]).code, 1);
    let s = prometheus_samples(&std::fs::read_to_string(&check).unwrap());
    assert_eq!(s[&format!("diskvault_run_success{{{k}}}")], 0.0);
    assert!(s[&format!("diskvault_check_errors{{{k}}}")] >= 1.0);
    let leftovers: Vec<_> = std::fs::read_dir(e.path(""))
        .unwrap()
        .flatten()
        .filter(|f| f.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary metrics files left: {leftovers:?}");
}

#[test]
fn manual_pages_are_written_for_every_command() {
    let e = Env::new();
    let dir = e.path("man/man1");
    assert!(e.ok(&["man", dir.to_str().unwrap()]).stdout.contains("manual pages written"));
    // A page for each command `--help` lists (and for subcommands such as `key rotate`), with its own title.
    let help = e.ok(&["--help"]).stdout;
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter(|l| l.starts_with("  ") && !l.starts_with("   "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() > 20 && commands.contains(&"backup"), "{commands:?}");
    let pages = commands.iter().map(|c| format!("diskvault-{c}"));
    for page in pages.chain(["diskvault".into(), "diskvault-key-rotate".into(), "diskvault-vm-list".into()]) {
        let roff = std::fs::read_to_string(dir.join(format!("{page}.1"))).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(roff.contains(&format!(".TH {page} 1")), "{page} is its manual page: {roff}");
    }
    let forget = std::fs::read_to_string(dir.join("diskvault-forget.1")).unwrap();
    assert!(forget.contains(r"\-\-keep\-within\-daily") && forget.contains("retention policy"), "{forget}");
}

#[test]
fn bash_completes_commands_and_their_options() {
    let e = Env::new();
    let script = e.ok(&["completions", "bash"]).stdout;
    std::fs::write(e.path("diskvault.bash"), &script).unwrap();
    // What bash offers after `diskvault fi<TAB>` and `diskvault forget --keep-d<TAB>`.
    let complete = |words: &str| -> String {
        let cmd = format!(
            "source {}; COMP_WORDS=({words}); COMP_CWORD=$((${{#COMP_WORDS[@]}} - 1)); \
             _diskvault diskvault \"${{COMP_WORDS[-1]}}\" \"${{COMP_WORDS[-2]}}\"; echo \"${{COMPREPLY[@]}}\"",
            e.path("diskvault.bash").display()
        );
        let out = std::process::Command::new("bash").arg("-c").arg(&cmd).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    assert_eq!(complete("diskvault fi"), "find");
    assert_eq!(complete("diskvault forget --keep-d"), "--keep-daily");
    assert!(e.fails(&["completions", "nosh"]).stderr.contains("possible values: bash"));

    // `| head`: the reader goes away long before the script (over 64 KiB, a pipe's buffer) is written. The
    // command ends as Unix tools do, by SIGPIPE, not with a panic about standard output.
    assert!(script.len() > 1 << 16);
    let mut child = e
        .command(&["completions", "bash"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 100];
    std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&out.status), Some(libc::SIGPIPE), "{stderr}");
}

/// An incremental of a disk of several manifest segments, changed in the first and the third: the unchanged
/// blocks of each come from the parent's segment at the same place (read ahead, several at a time), the second
/// segment is reused whole, and the snapshot restores to the disk as it is now.
#[test]
fn an_incremental_takes_each_unchanged_block_from_the_matching_parent_segment() {
    use std::os::unix::fs::FileExt;
    let e = Env::with_repo();
    const SEGMENT: u64 = 4096 * MIB as u64;
    let capacity = 3 * SEGMENT + MIB as u64;
    let path = e.path("img");
    let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path).unwrap();
    file.set_len(capacity).unwrap();
    // Two blocks of data at the start of each segment, and the last block.
    let places: Vec<u64> = vec![0, SEGMENT, 2 * SEGMENT, 3 * SEGMENT];
    let len_at = |at: u64| (2 * MIB as u64).min(capacity - at) as usize;
    for (i, &at) in places.iter().enumerate() {
        file.write_all_at(&random_bytes(60 + i as u64, len_at(at)), at).unwrap();
    }
    e.backup(&[path.to_str().unwrap(), "--name", "vm"]);
    // The second block of the first and third segments changes (one page each).
    let changed = [(MIB as u64, 4096u64), (2 * SEGMENT + MIB as u64, 4096)];
    for (i, &(at, len)) in changed.iter().enumerate() {
        file.write_all_at(&random_bytes(70 + i as u64, len as usize), at).unwrap();
    }
    let r = e.backup_changed("vm", &path, &changed);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["disks"][0]["blocks_read"], 2, "{}", r.stdout);

    let target = e.path("restored");
    e.ok(&["restore", "latest", "--target", target.to_str().unwrap(), "--verify"]);
    let out = std::fs::File::open(&target).unwrap();
    assert_eq!(out.metadata().unwrap().len(), capacity);
    for &at in &places {
        let (mut want, mut got) = (vec![0u8; len_at(at)], vec![0u8; len_at(at)]);
        file.read_exact_at(&mut want, at).unwrap();
        out.read_exact_at(&mut got, at).unwrap();
        assert!(want == got, "the data at offset {at} differs");
    }
}

#[test]
fn the_cache_directory_is_tagged_so_that_backup_tools_leave_it_out() {
    let e = Env::with_repo();
    let p = e.path("d");
    write(&p, &random_bytes(1, MIB));
    e.backup(&[p.to_str().unwrap()]);
    // The tag's first line is fixed by the specification (bford.info/cachedir).
    let tag = std::fs::read_to_string(e.cache().join("CACHEDIR.TAG")).unwrap();
    assert!(tag.starts_with("Signature: 8a477f597d28d172789f06886806bc55\n"), "{tag:?}");
}

/// As `restic cache --cleanup`: the caches of repositories a host no longer uses are listed with their last use,
/// named in a note, and removed; a cache a process holds (a writer's database lock, or a `serve` that reads it
/// read-only and marks it used) is kept; a removed cache costs nothing but its rebuild.
#[test]
fn caches_unused_for_a_month_are_removed_unless_a_process_holds_them() {
    use std::os::fd::AsRawFd;
    use std::path::PathBuf;
    let (a, b) = (Env::local(), Env::local());
    let root = a.cache();
    let root_arg = root.to_str().unwrap().to_string();
    // Both repositories' caches under one cache root, as on one backup host.
    let in_root = |e: &Env, args: &[&str]| -> Run {
        let mut full = vec!["--cache-dir", root_arg.as_str()];
        full.extend_from_slice(args);
        e.run(&full)
    };
    let mut images = Vec::new();
    for (i, e) in [&a, &b].into_iter().enumerate() {
        assert_eq!(in_root(e, &["init"]).code, 0);
        let img = random_bytes(70 + i as u64, 3 * MIB);
        write(&e.path("img"), &img);
        let r = in_root(e, &["backup", "--json", "--name", "vm", e.path("img").to_str().unwrap()]);
        assert_eq!(r.code, 0, "{}", r.stderr);
        images.push((r.json()["snapshot"].as_str().unwrap().to_string(), img));
    }
    let listed = in_root(&a, &["cache", "--json"]).json();
    let caches = listed["caches"].as_array().unwrap().clone();
    assert_eq!(caches.len(), 2, "{listed}");
    let dir_of = |e: &Env| -> PathBuf {
        let c = caches.iter().find(|c| c["location"] == e.location().as_str()).expect("cache of each repository");
        assert!(c["bytes"].as_u64().unwrap() > 0 && c["old"] == false && c["in_use"] == false, "{c}");
        PathBuf::from(c["path"].as_str().unwrap())
    };
    let (dir_a, dir_b) = (dir_of(&a), dir_of(&b));
    // As if unused for 40 days: the times a last use is judged by.
    let age = |dir: &PathBuf| {
        let then = std::time::SystemTime::now() - std::time::Duration::from_secs(40 * 86400);
        for p in [dir.join("last-used"), dir.join("index"), dir.clone()] {
            std::fs::File::open(&p).unwrap().set_modified(then).unwrap();
        }
    };

    age(&dir_a);
    age(&dir_b);
    // A command on one repository notes the other's old cache (not its own, which it is using), unless quiet.
    let r = Run::of(a.command_with_progress(&["--cache-dir", root_arg.as_str(), "stats"], true));
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(
        r.stderr.contains("note: 1 local cache in") && r.stderr.contains("diskvault cache --cleanup"),
        "{}",
        r.stderr
    );
    assert!(!in_root(&a, &["stats"]).stderr.contains("note:"), "--quiet leaves the note out");

    // A `serve` on a reads its cache read-only (no database lock) for as long as it runs: weeks, say (its cache
    // aged while it runs). b's database is held the way RocksDB holds it.
    let serve = a.serve_on_socket(&["--cache-dir", root_arg.as_str()]);
    age(&dir_a);
    let lock = std::fs::OpenOptions::new().read(true).write(true).open(dir_b.join("index/LOCK")).unwrap();
    // SAFETY: a zeroed flock is a valid argument; F_SETLK takes a write lock on the whole file.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    assert_eq!(unsafe { libc::fcntl(lock.as_raw_fd(), libc::F_SETLK, &fl) }, 0);

    let r = in_root(&a, &["cache", "--cleanup"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(r.stdout.contains("removed 0 old caches"), "{}", r.stdout);
    assert!(dir_a.exists() && dir_b.exists());
    let states = in_root(&a, &["cache", "--json"]).json();
    let state = |dir: &PathBuf| {
        states["caches"].as_array().unwrap().iter().find(|c| c["path"] == dir.to_str().unwrap()).cloned().unwrap()
    };
    assert_eq!(state(&dir_b)["in_use"], true, "{states}");
    assert_eq!(state(&dir_a)["in_use"], true, "{states}");

    // Released: b's cache goes, a's stays while serve runs.
    drop(lock);
    let r = in_root(&a, &["cache", "--cleanup", "--json"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    drop(serve);
    assert!(!dir_b.exists(), "{}", r.stdout);
    assert!(dir_a.exists());
    let removed: Vec<_> =
        r.json()["caches"].as_array().unwrap().iter().filter(|c| c["removed"] == true).cloned().collect();
    assert_eq!(removed.len(), 1, "{}", r.stdout);

    // Nothing lost: b restores bit-exact through a rebuilt cache.
    let (snap, img) = &images[1];
    assert!(b.restore(snap, &["--cache-dir", root_arg.as_str()]) == *img);
    assert!(dir_b.join("index").exists());

    // As restic's --cleanup-cache: a command on b removes a's cache, unused for 40 days and no longer held.
    age(&dir_a);
    let r = in_root(&b, &["--cleanup-cache", "stats"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!dir_a.exists() && dir_b.exists());
}
