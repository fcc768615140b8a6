//! `prune`: forgotten data is deleted, kept data survives, and prune is safe next to running backups and
//! when killed.

mod common;

use std::collections::HashSet;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use diskvault::backup::{BackupOptions, DiskJob};
use diskvault::cache::IndexCache;
use diskvault::progress::Counters;
use diskvault::prune::{self, PruneOptions};
use diskvault::source::{DiskSource, Extent};

/// Stored bytes a set of images needs at least: their distinct non-zero 1 MiB blocks (incompressible data).
fn distinct_block_bytes(images: &[&[u8]]) -> u64 {
    let mut seen = HashSet::new();
    let mut total = 0;
    for img in images {
        for b in img.chunks(MIB) {
            if b.iter().any(|&x| x != 0) && seen.insert(blake3::hash(b)) {
                total += b.len() as u64;
            }
        }
    }
    total
}

/// Four backups of source `name` from `disk`, a 12 MiB disk of which each round rewrites 3 blocks with new
/// data; returns the four images.
fn back_up_four_rounds(e: &Env, disk: &std::path::Path, name: &str) -> Vec<Vec<u8>> {
    let mut img = random_bytes(1, 12 * MIB);
    let mut images = Vec::new();
    for round in 0..4u64 {
        let at = (round as usize * 3 % 12) * MIB;
        img[at..at + 3 * MIB].copy_from_slice(&random_bytes(100 + round, 3 * MIB));
        write(disk, &img);
        e.backup(&["--name", name, disk.to_str().unwrap()]);
        images.push(img.clone());
    }
    images
}

#[test]
fn prune_deletes_what_forgotten_snapshots_alone_used() {
    let e = Env::new();
    e.ok(&["init", "--pack-size", "4"]);
    let disk = e.path("disk.raw");
    let images = back_up_four_rounds(&e, &disk, "vm");
    let before = e.pack_bytes();
    let all: Vec<&[u8]> = images.iter().map(|v| v.as_slice()).collect();
    assert!(before >= distinct_block_bytes(&all));

    e.ok(&["forget", "--keep-last", "2"]);
    let dry = e.ok(&["prune", "--dry-run", "--max-unused", "0"]);
    assert!(dry.stdout.contains("would be removed"), "{}", dry.stdout);
    assert_eq!(e.pack_bytes(), before, "a dry run changed the repository");

    let out = e.ok(&["prune", "--max-unused", "0"]);
    let after = e.pack_bytes();
    let kept: Vec<&[u8]> = images[2..].iter().map(|v| v.as_slice()).collect();
    let needed = distinct_block_bytes(&kept);
    // Everything the kept snapshots need is there, and little else: the forgotten rounds' data is gone.
    assert!(after >= needed, "{after} < {needed}\n{}", out.stdout);
    assert!(
        after <= needed + needed / 50 + 64 * 1024,
        "{after} bytes of packs for {needed} bytes of data\n{}",
        out.stdout
    );
    assert!(
        before - after >= distinct_block_bytes(&all) - needed,
        "freed {} of {}",
        before - after,
        distinct_block_bytes(&all) - needed
    );
    assert!(e.objects("deletions").is_empty(), "no backup ran, so nothing waits: {:?}", e.objects("deletions"));

    for (i, img) in images.iter().enumerate().skip(2) {
        let id = &e.ok(&["snapshots", "--json"]).json()[i - 2]["id"].as_str().unwrap().to_string();
        assert_eq!(&e.restore(id, &[]), img, "round {i}");
    }
    let check = e.ok(&["check", "--read-data"]);
    assert!(check.stdout.contains("no errors found"), "{}", check.stdout);
    // A second prune finds nothing to do and leaves the index alone.
    let index_before = e.objects("index");
    let again = e.ok(&["prune", "--max-unused", "0"]);
    assert!(again.stdout.contains("unused packs removed: 0"), "{}", again.stdout);
    assert_eq!(e.objects("index"), index_before);
    // An incremental on top of the pruned repository still works.
    let mut img = images[3].clone();
    img[0..MIB].copy_from_slice(&random_bytes(999, MIB));
    write(&disk, &img);
    e.backup(&["--name", "vm", disk.to_str().unwrap()]);
    assert_eq!(e.restore("latest", &[]), img);
}

/// Every blob id the repository's index files list now.
fn indexed_blobs(repo: &diskvault::repository::Repository) -> HashSet<diskvault::format::BlobId> {
    let mut ids = HashSet::new();
    for index in repo.list_index_ids().unwrap() {
        for pack in repo.load_index(&index).unwrap().packs {
            ids.extend(pack.entries.iter().map(|e| e.id));
        }
    }
    ids
}

/// A host's local index cache catches up with a prune by taking out what the replaced index files listed, not
/// by rebuilding itself from the whole index: after it, it answers every lookup as a cache built from scratch
/// does (the dropped blocks gone, the repacked ones at their new place), and backups and restores through it
/// are right.
#[test]
fn a_host_cache_catches_up_with_a_prune_without_rebuilding() {
    let e = Env::new();
    e.ok(&["init", "--pack-size", "4"]);
    let (disk_a, disk_b) = (e.path("a.raw"), e.path("b.raw"));
    let images = back_up_four_rounds(&e, &disk_a, "vm-a");
    // Another VM, whose index file the prune leaves alone.
    let other = random_bytes(7, 6 * MIB);
    write(&disk_b, &other);
    e.backup(&["--name", "vm-b", disk_b.to_str().unwrap()]);
    let repo = e.open_repo();
    let before = indexed_blobs(&repo);
    drop(IndexCache::open(&repo, &e.cache()).unwrap());

    e.ok(&["forget", "--name", "vm-a", "--keep-last", "2"]);
    let out = e.ok(&["prune", "--max-unused", "0"]);
    assert!(out.stdout.contains("index:"), "{}", out.stdout);
    let after = indexed_blobs(&repo);
    assert!(before.difference(&after).count() >= 3, "the prune dropped blocks\n{}", out.stdout);

    let (cache, synced) = IndexCache::open(&repo, &e.cache()).unwrap();
    assert!(!synced.rebuilt && synced.index_files_removed > 0, "{synced}");
    let (fresh, _) = IndexCache::open(&repo, &e.path("fresh-cache")).unwrap();
    for id in before.union(&after) {
        assert_eq!(cache.lookup(id).unwrap(), fresh.lookup(id).unwrap(), "blob {id}");
        assert_eq!(cache.lookup(id).unwrap().is_some(), after.contains(id), "blob {id}");
    }
    drop((cache, fresh));

    // Through that cache: the kept snapshots restore, and a backup stores again what the prune dropped.
    let snapshots = e.ok(&["snapshots", "--name", "vm-a", "--json"]).json();
    for (i, img) in images.iter().enumerate().skip(2) {
        let id = snapshots[i - 2]["id"].as_str().unwrap().to_string();
        assert_eq!(&e.restore(&id, &[]), img, "round {i}");
    }
    write(&disk_a, &images[0]);
    let stats = e.backup(&["--name", "vm-a", "--no-parent", disk_a.to_str().unwrap()]);
    assert!(stats["disks"][0]["new_blocks"].as_u64().unwrap() >= 3, "{stats}");
    assert_eq!(e.restore("latest", &["--name", "vm-a"]), images[0]);
    let check = e.ok(&["check", "--read-data"]);
    assert!(check.stdout.contains("no errors found"), "{}", check.stdout);
}

#[test]
fn small_index_files_are_merged_when_prune_rewrites_the_index() {
    let e = Env::new();
    e.ok(&["init", "--pack-size", "4"]);
    let disk = e.path("disk.raw");
    let mut img = random_bytes(1, 8 * MIB);
    let mut images = Vec::new();
    // Each backup writes its own small index file.
    for round in 0..10u64 {
        let at = (round as usize % 8) * MIB;
        img[at..at + MIB].copy_from_slice(&random_bytes(100 + round, MIB));
        write(&disk, &img);
        e.backup(&["--name", "vm", disk.to_str().unwrap()]);
        images.push(img.clone());
    }
    let before = e.objects("index");
    assert!(before.len() >= 10, "{before:?}");

    // A prune with nothing to drop leaves them as they are: replacing an index file makes every host's local
    // cache take its entries out and load them again, which merging small files alone is not worth.
    let idle = e.ok(&["prune"]);
    assert_eq!(e.objects("index"), before, "{}", idle.stdout);
    assert!(!idle.stdout.contains("merged"), "{}", idle.stdout);

    // One that replaces index files anyway merges the small ones too.
    e.ok(&["forget", "--keep-last", "7"]);
    let out = e.ok(&["prune", "--max-unused", "0"]);
    assert!(out.stdout.contains("small ones merged"), "{}", out.stdout);
    let after = e.objects("index");
    assert!(after.len() <= 2, "{} index files after the prune: {after:?}\n{}", after.len(), out.stdout);
    assert!(after.iter().all(|f| !before.contains(f)), "{after:?}");
    let check = e.ok(&["check", "--read-data"]);
    assert!(check.stdout.contains("no errors found"), "{}", check.stdout);
    let snapshots = e.ok(&["snapshots", "--json"]).json();
    for (i, img) in images.iter().enumerate().skip(3) {
        let id = snapshots[i - 3]["id"].as_str().unwrap().to_string();
        assert_eq!(&e.restore(&id, &[]), img, "round {i}");
    }
    // Deduplication goes on against the merged index: a backup read whole stores nothing again.
    let packs = e.objects("packs");
    e.backup(&["--name", "vm", "--no-parent", disk.to_str().unwrap()]);
    assert_eq!(e.objects("packs"), packs);

    // Enough small files merge on their own, with nothing else to rewrite (256 of them by default; 3 here).
    for round in 0..3u64 {
        img[round as usize * MIB..(round as usize + 1) * MIB].copy_from_slice(&random_bytes(200 + round, MIB));
        write(&disk, &img);
        e.backup(&["--name", "vm", disk.to_str().unwrap()]);
    }
    let small = e.objects("index");
    assert!(small.len() >= 4, "{small:?}");
    let repo = e.open_repo();
    let opts = PruneOptions { small_index_files_to_merge: 3, ..PruneOptions::default() };
    let r = prune::run(&repo, &e.path("prune-cache"), &opts).unwrap();
    assert_eq!((r.packs_unused, r.index_files_compacted), (0, small.len()), "{r:?}");
    assert_eq!(e.objects("index").len(), 1, "{:?}", e.objects("index"));
    let check = e.ok(&["check", "--read-data"]);
    assert!(check.stdout.contains("no errors found"), "{}", check.stdout);
    assert_eq!(e.restore("latest", &[]), img);
}

/// A disk source that stops before one block until the test lets it go on.
struct GatedSource {
    data: Vec<u8>,
    gate_at: u64,
    reached: mpsc::Sender<()>,
    release: mpsc::Receiver<()>,
}

impl DiskSource for GatedSource {
    fn kind(&self) -> &'static str {
        "file"
    }
    fn describe(&self) -> String {
        "gated test source".into()
    }
    fn capacity(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> diskvault::Result<()> {
        if offset == self.gate_at {
            self.reached.send(()).unwrap();
            self.release.recv().unwrap();
        }
        buf.copy_from_slice(&self.data[offset as usize..offset as usize + buf.len()]);
        Ok(())
    }
    fn allocated(&mut self) -> diskvault::Result<Option<Vec<Extent>>> {
        Ok(None)
    }
}

#[test]
fn prune_waits_for_a_backup_that_deduplicated_against_what_it_drops() {
    let e = Env::with_repo();
    let old = random_bytes(7, 4 * MIB);
    write(&e.path("old.raw"), &old);
    let first = e.backup(&["--name", "vm", e.path("old.raw").to_str().unwrap()]);

    // A second backup of a disk that shares blocks 0 and 1 with the first: it deduplicates against them, then
    // stalls before block 2.
    let mut new = old[..2 * MIB].to_vec();
    new.extend_from_slice(&random_bytes(8, 2 * MIB));
    let (reached_tx, reached_rx) = mpsc::channel();
    let (release_tx, release_rx) = mpsc::channel();
    let source = GatedSource { data: new.clone(), gate_at: 2 * MIB as u64, reached: reached_tx, release: release_rx };
    let repo = e.open_repo();
    let cache_root = e.cache();
    let backup = std::thread::spawn(move || {
        let (cache, _) = IndexCache::open(&repo, &cache_root).unwrap();
        let job =
            DiskJob { name: "disk0".into(), source: Box::new(source), changed: None, change_token: None, resume: None };
        let mut opts = BackupOptions::new("vm2");
        opts.workers = 1;
        diskvault::backup::run(&repo, Arc::new(cache), vec![job], &opts, &Counters::default()).unwrap()
    });
    reached_rx.recv_timeout(Duration::from_secs(60)).expect("the backup reached its gate");

    // Meanwhile the first snapshot is forgotten and pruned: its blocks are unused as far as prune can see.
    e.delete_object(&format!("snapshots/{}", first["snapshot"].as_str().unwrap()));
    let packs_before = e.objects("packs");
    let repo = e.open_repo();
    let opts = PruneOptions { max_unused: 0.0, ..PruneOptions::default() };
    let r = prune::run(&repo, &e.path("prune-cache"), &opts).unwrap();
    assert!(r.packs_unused >= 1, "{r:?}");
    assert!(r.packs_waiting >= 1 && r.waiting_for.iter().any(|s| s.contains("backup")), "{r:?}");
    assert_eq!(r.packs_deleted, 0, "deleted packs a running backup may use: {r:?}");
    assert_eq!(e.objects("packs"), packs_before);
    assert_eq!(e.objects("deletions").len(), 1);
    // A second prune while the backup runs plans nothing new and deletes nothing.
    let r = prune::run(&repo, &e.path("prune-cache"), &opts).unwrap();
    assert!(!r.planned && r.packs_deleted == 0, "{r:?}");

    release_tx.send(()).unwrap();
    let (sid, _) = backup.join().unwrap();

    // Now the record is finished: the blocks the new snapshot shares are rescued, not deleted.
    let r = prune::run(&repo, &e.path("prune-cache"), &opts).unwrap();
    assert!(r.packs_rescued >= 1, "{r:?}");
    assert!(e.objects("deletions").is_empty());
    assert_eq!(e.restore(&sid.hex(), &[]), new);
    let check = e.ok(&["check", "--read-data"]);
    assert!(check.stdout.contains("no errors found"), "{}", check.stdout);
    // And what only the forgotten snapshot used is gone after one more prune.
    prune::run(&repo, &e.path("prune-cache"), &opts).unwrap();
    let needed = distinct_block_bytes(&[&new]);
    assert!(e.pack_bytes() <= needed + needed / 50 + 64 * 1024, "{} bytes of packs for {needed}", e.pack_bytes());
    assert_eq!(e.restore(&sid.hex(), &[]), new);
}

#[test]
fn a_killed_prune_leaves_a_consistent_repository() {
    let e = Env::new();
    e.ok(&["init", "--pack-size", "1"]);
    let disk = e.path("disk.raw");
    let mut img = random_bytes(20, 24 * MIB);
    for round in 0..3u64 {
        let at = (round as usize * 8) * MIB;
        img[at..at + 6 * MIB].copy_from_slice(&random_bytes(200 + round, 6 * MIB));
        write(&disk, &img);
        e.backup(&["--name", "vm", disk.to_str().unwrap()]);
    }
    e.ok(&["forget", "--keep-last", "1"]);
    // Kill each prune right after it has made its first, second, fourth visible change to the repository.
    let state = |e: &Env| [e.objects("packs"), e.objects("index"), e.objects("deletions")];
    let mut killed_midway = 0;
    for changes in [1, 2, 4] {
        let mut last = state(&e);
        let mut child = e.command(&["prune", "--max-unused", "0"]).spawn().unwrap();
        let mut seen = 0;
        while seen < changes && child.try_wait().unwrap().is_none() {
            let now = state(&e);
            if now != last {
                seen += 1;
                last = now;
            }
        }
        if child.try_wait().unwrap().is_none() {
            killed_midway += 1;
        }
        let _ = child.kill();
        child.wait().unwrap();
        // Whatever the prune got to, the kept snapshot is whole.
        assert_eq!(e.restore("latest", &[]), img, "after a prune killed after {changes} changes");
        // The killed prune's lock is left behind; the next prune on this host sees its process gone and takes it.
    }
    assert!(killed_midway >= 1, "no prune was killed while it was changing the repository");
    let out = e.ok(&["prune", "--max-unused", "0"]);
    let check = e.ok(&["check", "--read-data"]);
    assert!(check.stdout.contains("no errors found"), "{}\n{}", out.stdout, check.stdout);
    assert_eq!(e.restore("latest", &[]), img);
    let needed = distinct_block_bytes(&[&img]);
    assert!(e.pack_bytes() <= needed + needed / 50 + 64 * 1024, "{} bytes of packs for {needed}", e.pack_bytes());
}

/// Disk `k` after backup round `round`: a base image with one more block rewritten per round.
fn stress_image(k: u64, round: u64) -> Vec<u8> {
    let mut img = random_bytes(1000 + k, 6 * MIB);
    for r in 0..=round {
        let at = (r as usize % 6) * MIB;
        img[at..at + MIB].copy_from_slice(&random_bytes(k * 100 + r, MIB));
    }
    img
}

#[test]
fn backups_forget_and_prune_running_at_the_same_time() {
    let e = Env::new();
    e.ok(&["init", "--pack-size", "1"]);
    let rounds = 8u64;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    std::thread::scope(|s| {
        let backups: Vec<_> = (0..3u64)
            .map(|k| {
                let e = &e;
                s.spawn(move || {
                    let disk = e.path(&format!("disk{k}.raw"));
                    for round in 0..rounds {
                        write(&disk, &stress_image(k, round));
                        let tag = format!("round-{round}");
                        e.backup(&["--name", &format!("vm{k}"), "--tag", &tag, disk.to_str().unwrap()]);
                    }
                })
            })
            .collect();
        let pruner = {
            let (e, done) = (&e, done.clone());
            s.spawn(move || {
                let mut prunes = 0;
                while !done.load(std::sync::atomic::Ordering::SeqCst) || prunes < 2 {
                    e.ok(&["forget", "--keep-last", "2"]);
                    let out = e.ok(&["prune", "--max-unused", "0"]);
                    eprintln!("prune {prunes}:\n{}", out.stdout);
                    prunes += 1;
                }
                prunes
            })
        };
        let results: Vec<_> = backups.into_iter().map(|b| b.join()).collect();
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        for r in results {
            r.unwrap();
        }
        assert!(pruner.join().unwrap() >= 2);
    });
    // With no backup running, the last prune finishes every record.
    e.ok(&["forget", "--keep-last", "2"]);
    e.ok(&["prune", "--max-unused", "0"]);
    e.ok(&["prune", "--max-unused", "0"]);
    assert!(e.objects("deletions").is_empty(), "{:?}", e.objects("deletions"));

    let snaps = e.ok(&["snapshots", "--json"]).json();
    let snaps = snaps.as_array().unwrap();
    assert_eq!(snaps.len(), 6, "two kept per disk");
    let mut kept = Vec::new();
    for s in snaps {
        let k: u64 = s["source"].as_str().unwrap().trim_start_matches("vm").parse().unwrap();
        let round: u64 = s["tags"][0].as_str().unwrap().trim_start_matches("round-").parse().unwrap();
        assert!(round >= rounds - 2, "vm{k} kept round {round}");
        let img = stress_image(k, round);
        assert_eq!(e.restore(s["id"].as_str().unwrap(), &[]), img, "vm{k} round {round}");
        kept.push(img);
    }
    let check = e.ok(&["check", "--read-data"]);
    assert!(check.stdout.contains("no errors found"), "{}", check.stdout);
    // The forgotten rounds' blocks are gone.
    let kept: Vec<&[u8]> = kept.iter().map(|v| v.as_slice()).collect();
    let needed = distinct_block_bytes(&kept);
    assert!(e.pack_bytes() <= needed + needed / 50 + 64 * 1024, "{} bytes of packs for {needed}", e.pack_bytes());
}

#[test]
fn prune_keeps_what_checkpoints_name_until_they_can_no_longer_be_continued() {
    use diskvault::format::checkpoint::{Checkpoint, CheckpointDisk};
    let e = Env::with_repo();
    let (one, two) = (random_bytes(31, 4 * MIB), random_bytes(32, 4 * MIB));
    let disk = e.path("disk0");
    write(&disk, &one);
    let a = e.backup(&["--name", "vm", disk.to_str().unwrap()]);
    write(&disk, &two);
    let b = e.backup(&["--name", "vm", disk.to_str().unwrap()]);
    let repo = e.open_repo();
    let id = |v: &serde_json::Value| diskvault::format::BlobId::from_hex(v["snapshot"].as_str().unwrap()).unwrap();
    let (a_id, b) = (id(&a), id(&b));
    let a = repo.load_snapshot(&a_id).unwrap();
    // An interrupted backup on top of B had read `one` again when it stopped; others are beyond use.
    let checkpoint = |source: &str, parent, age_secs: i64| Checkpoint {
        time_secs: diskvault::util::now_secs() - age_secs,
        time_nanos: 0,
        hostname: "proxy-2".into(),
        username: "backup".into(),
        source: source.into(),
        parent,
        disks: vec![CheckpointDisk {
            name: a.disks[0].name.clone(),
            capacity: a.disks[0].capacity,
            block_size: a.disks[0].block_size,
            change_token: Some("52 aa/3".into()),
            segments: a.disks[0].segments.clone(),
        }],
    };
    let current = repo.save_checkpoint(&checkpoint("vm", Some(b), 60)).unwrap();
    let mut elsewhere = checkpoint("vm-without-snapshots", None, 60);
    elsewhere.disks[0].segments.clear();
    let other_vm = repo.save_checkpoint(&elsewhere).unwrap();
    repo.save_checkpoint(&checkpoint("vm", Some(b), 31 * 24 * 3600)).unwrap();
    repo.save_checkpoint(&checkpoint("vm", a.parent, 60)).unwrap();
    let remaining = |e: &Env| -> HashSet<String> { e.objects("checkpoints").into_iter().collect() };
    assert_eq!(remaining(&e).len(), 4);
    // A damaged checkpoint is a warning for check (the data is elsewhere), and skipped by everyone else.
    let damaged = format!("checkpoints/{}", "ab".repeat(32));
    e.backend().put(&damaged, b"DVLT\x09\x01\0\0 not a checkpoint").unwrap();
    let check = e.ok(&["check"]);
    let out = format!("{}{}", check.stdout, check.stderr);
    assert!(out.contains(&damaged) && out.contains("no errors found"), "{out}");

    // The snapshot that stored `one` is forgotten: the checkpoint keeps its blocks.
    e.delete_object(&format!("snapshots/{}", a_id.hex()));
    let opts = PruneOptions { max_unused: 0.0, ..PruneOptions::default() };
    let dry = prune::run(&repo, &e.path("prune-cache"), &PruneOptions { dry_run: true, ..opts.clone() }).unwrap();
    assert_eq!(dry.checkpoints_removed, 3, "two that cannot be continued, one damaged: {dry:?}");
    assert_eq!(remaining(&e).len(), 5, "a dry run deleted checkpoints");
    let r = prune::run(&repo, &e.path("prune-cache"), &opts).unwrap();
    assert_eq!(r.checkpoints_removed, 3, "{r:?}");
    assert!(r.warnings.iter().any(|w| w.contains(&damaged)), "{r:?}");
    let want: HashSet<String> = [current, other_vm].iter().map(|c| format!("checkpoints/{}", c.hex())).collect();
    assert_eq!(remaining(&e), want);
    let both = distinct_block_bytes(&[&one, &two]);
    assert!(e.pack_bytes() >= both, "blocks only a checkpoint names were deleted");

    // A later backup of the VM completes: the checkpoint can no longer be continued and its blocks go.
    e.backup(&["--name", "vm", disk.to_str().unwrap()]);
    let r = prune::run(&repo, &e.path("prune-cache"), &opts).unwrap();
    assert_eq!(r.checkpoints_removed, 1, "{r:?}");
    let r = prune::run(&repo, &e.path("prune-cache"), &opts).unwrap();
    assert_eq!(r.checkpoints_removed, 0, "{r:?}");
    let needed = distinct_block_bytes(&[&two]);
    assert!(e.pack_bytes() < both, "{} bytes of packs, {needed} needed: {r:?}", e.pack_bytes());
    assert_eq!(e.restore("latest", &[]), two);
}

#[test]
fn a_damaged_deletion_record_is_set_aside_and_its_packs_swept_again() {
    let e = Env::with_repo();
    let (a, b) = (random_bytes(1, 4 * MIB), random_bytes(2, 3 * MIB));
    write(&e.path("a"), &a);
    let a_id = e.backup(&["--name", "a", e.path("a").to_str().unwrap()])["snapshot"].as_str().unwrap().to_string();
    write(&e.path("b"), &b);
    e.backup(&["--name", "b", e.path("b").to_str().unwrap()]);
    e.ok(&["forget", &a_id[..8]]);
    // A reader's session keeps the dropped packs waiting under a deletion record.
    let repo = e.open_repo();
    let session = diskvault::lock::start_session(&repo, "test reader").unwrap();
    e.ok(&["prune"]);
    drop(session);
    let records = e.objects("deletions");
    assert_eq!(records.len(), 1);
    e.flip(&records[0], 20);
    let before = e.pack_bytes();

    // Neither backups (on a new cache, which adopts unindexed packs), nor check, nor repair index stop at it.
    std::fs::remove_dir_all(e.cache()).unwrap();
    write(&e.path("c"), &random_bytes(3, MIB));
    e.backup(&["--name", "c", e.path("c").to_str().unwrap()]);
    let r = e.ok(&["check"]);
    assert!(r.stderr.contains("a deletion record of prune"), "{}", r.stderr);
    e.ok(&["repair", "index"]);
    // Prune sets it aside, and its packs, indexed again, are swept anew: a's data goes, the rest stays.
    e.ok(&["prune"]);
    assert!(e.objects("deletions").is_empty());
    assert!(e.pack_bytes() + 4 * MIB as u64 <= before + MIB as u64, "{} -> {}", before, e.pack_bytes());
    assert_eq!(e.restore("latest", &["--name", "b"]), b);
    assert!(e.ok(&["check", "--read-data"]).stdout.contains("no errors found"));
}

/// Two copies of a block (two hosts that stored it at once): prune keeps the one it meets first and lets the
/// other go (its pack repacked or dropped), whichever pack holds which; every snapshot still restores.
#[test]
fn prune_keeps_one_copy_of_a_block_stored_twice() {
    use diskvault::format::index::IndexFile;
    use diskvault::format::pack::{BlobSealer, PackWriter};
    use diskvault::format::BlobType;
    let e = Env::with_repo();
    let disk = e.path("disk");
    let img = random_bytes(90, 2 * MIB);
    write(&disk, &img);
    e.backup(&["--name", "vm", disk.to_str().unwrap()]);
    let repo = e.open_repo();
    // The first block again, in a pack of its own, listed by an index file of its own.
    let first = &img[..MIB];
    let id = repo.keys().blob_id(first);
    let mut w = PackWriter::new(BlobType::Data, 2 * MIB);
    w.add(BlobSealer::new(3).seal(repo.keys(), BlobType::Data, id, first));
    let duplicate = repo.save_pack(w.finish(repo.keys())).unwrap();
    repo.save_index(&IndexFile { supersedes: Vec::new(), packs: vec![duplicate.clone()] }).unwrap();
    let copies = |repo: &diskvault::repository::Repository| -> usize {
        let mut n = 0;
        for index in repo.list_index_ids().unwrap() {
            for pack in repo.load_index(&index).unwrap().packs {
                n += pack.entries.iter().filter(|e| e.id == id).count();
            }
        }
        n
    };
    assert_eq!(copies(&repo), 2);

    e.ok(&["prune"]);
    assert_eq!(copies(&e.open_repo()), 1, "one copy left indexed");
    e.ok(&["check", "--read-data"]);
    assert_eq!(e.restore("latest", &[]), img);
}
