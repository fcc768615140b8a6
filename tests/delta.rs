//! Delta blobs: a new block that shares most of its pages with a stored block is stored as a zstd delta against
//! it (format version 2). Restores, check, prune and damage reports must treat them as exactly as whole blocks.

mod common;

use common::*;
use diskvault::format::{names, BlobId};

const PAGE: usize = 4096;

/// Where a blob is stored: (pack object name, offset of the blob in it).
fn blob_place(e: &Env, blob: &BlobId) -> (String, usize) {
    let repo = e.open_repo();
    for id in repo.list_index_ids().unwrap() {
        for p in repo.load_index(&id).unwrap().packs {
            if let Some(en) = p.entries.iter().find(|en| en.id == *blob) {
                return (names::pack(&p.id), en.offset as usize);
            }
        }
    }
    panic!("blob {blob} is not indexed");
}

/// `img` with one 4 KiB page of new data in each of blocks 2..8: what a day of small writes does to a disk.
fn small_writes(img: &[u8], seed: u64) -> Vec<u8> {
    let mut out = img.to_vec();
    for b in 2..8 {
        let at = b * MIB + (b + seed as usize) % 200 * PAGE;
        out[at..at + PAGE].copy_from_slice(&random_bytes(seed * 100 + b as u64, PAGE));
    }
    out
}

/// `img` with 100 new bytes in every block, one page apart from block to block: a delta for each block, each
/// against its own base.
fn a_write_in_every_block(img: &[u8], seed: u64) -> Vec<u8> {
    let mut out = img.to_vec();
    for b in 0..img.len() / MIB {
        let at = b * MIB + (b * 7 + seed as usize) % 250 * PAGE;
        out[at..at + 100].copy_from_slice(&random_bytes(seed * 1000 + b as u64, 100));
    }
    out
}

/// Day 0 of a test disk: `mib` MiB of random data backed up from `disk.raw` as source `vm`.
/// Returns (the image path, day 0's content, its snapshot id).
fn first_day(e: &Env, seed: u64, mib: usize) -> (std::path::PathBuf, Vec<u8>, String) {
    let path = e.path("disk.raw");
    let day0 = random_bytes(seed, mib * MIB);
    let s0 = backup_day(e, &path, &day0, &[]);
    (path, day0, s0)
}

fn backup_day(e: &Env, path: &std::path::Path, img: &[u8], extra: &[&str]) -> String {
    write(path, img);
    let mut args = vec![path.to_str().unwrap(), "--name", "vm"];
    args.extend_from_slice(extra);
    e.backup(&args)["snapshot"].as_str().unwrap().to_string()
}

#[test]
fn similar_blocks_are_stored_as_deltas_and_restore_bit_exact() {
    let e = Env::with_repo();
    let (path, day0, s0) = first_day(&e, 1, 16);
    assert!(e.delta_blobs().is_empty(), "nothing similar was stored before the first backup");

    // Day 1: small writes in six blocks, and half a block of block 0's data copied into block 12 three pages
    // off its old alignment (a file copied to another place).
    let mut day1 = small_writes(&day0, 1);
    day1[12 * MIB + 3 * PAGE..12 * MIB + 3 * PAGE + MIB / 2].copy_from_slice(&day0[..MIB / 2]);
    let before = e.pack_bytes();
    let s1 = backup_day(&e, &path, &day1, &[]);
    let added = e.pack_bytes() - before;
    let d = e.delta_blobs();
    assert_eq!(d.len(), 7, "the seven changed blocks are deltas: {d:?}");
    // Stored whole, the seven incompressible blocks would take 7 MiB.
    assert!(added < MIB as u64, "{added} bytes stored for seven slightly changed blocks");
    let repo = e.open_repo();
    let day0_ids: Vec<BlobId> = day0.chunks(MIB).map(|b| repo.keys().blob_id(b)).collect();
    assert!(d.iter().all(|(_, base)| day0_ids.contains(base)), "bases are day 0's blocks");
    // `cat index` shows which blobs are deltas and their bases.
    let listed: String =
        e.objects("index").iter().map(|n| e.ok(&["cat", "index", n.rsplit('/').next().unwrap()]).stdout).collect();
    assert!(d.iter().all(|(_, base)| listed.contains(&format!("\"delta_base\": \"{}\"", base.hex()))), "{listed}");
    // The library's blob read (what a restore into VMware uses) resolves a delta through the index cache.
    let (cache, _) = diskvault::cache::IndexCache::open(&repo, &e.cache()).unwrap();
    let block2 = &day1[2 * MIB..3 * MIB];
    let loc = cache.lookup(&repo.keys().blob_id(block2)).unwrap().unwrap();
    assert!(loc.entry.base.is_some());
    assert_eq!(repo.read_blob(&loc, &cache).unwrap(), block2);
    drop(cache);

    assert_eq!(e.restore(&s0, &[]), day0);
    assert_eq!(e.restore(&s1, &[]), day1);
    let check = e.ok(&["check", "--read-data"]);
    assert!(check.stdout.contains("no errors found"), "{}", check.stdout);

    // --no-delta stores changed blocks whole.
    let day2 = small_writes(&day1, 2);
    let before = e.pack_bytes();
    let s2 = backup_day(&e, &path, &day2, &["--no-delta"]);
    assert!(e.pack_bytes() - before >= 6 * MIB as u64, "--no-delta stored {} bytes", e.pack_bytes() - before);
    assert_eq!(e.delta_blobs().len(), 7);
    assert_eq!(e.restore(&s2, &[]), day2);

    // An incremental from a change list (the path on which backup reads the likely bases ahead).
    let day3 = small_writes(&day2, 3);
    let areas: Vec<(u64, u64)> = (2..8u64).map(|b| (b * MIB as u64, MIB as u64)).collect();
    let cf = e.path("changes.json");
    write_changes(&cf, &areas);
    let before = e.pack_bytes();
    let s3 = backup_day(&e, &path, &day3, &["--changed-areas", cf.to_str().unwrap()]);
    assert!(e.pack_bytes() - before < MIB as u64, "{} bytes for six slightly changed blocks", e.pack_bytes() - before);
    assert_eq!(e.delta_blobs().len(), 13);
    assert_eq!(e.restore(&s3, &[]), day3);
    assert_eq!(e.restore(&s1, &[]), day1);
}

#[test]
fn an_incremental_from_a_change_list_finds_its_bases_without_the_cache_that_stored_them() {
    // Features of stored blocks exist only in the local cache of the process that stored them: a new backup
    // host, a wiped cache, or a second backup job on the host has none. The parent's block at the offset is
    // the base to try then.
    let e = Env::with_repo();
    let (path, day0, _) = first_day(&e, 5, 12);
    std::fs::remove_dir_all(e.cache()).unwrap();
    let mut day1 = small_writes(&day0, 5);
    // Block 10 rewritten with unrelated data: no delta for it.
    day1[10 * MIB..11 * MIB].copy_from_slice(&random_bytes(55, MIB));
    let areas: Vec<(u64, u64)> = (2..8u64).chain([10]).map(|b| (b * MIB as u64, MIB as u64)).collect();
    let cf = e.path("changes.json");
    write_changes(&cf, &areas);
    let before = e.pack_bytes();
    let s1 = backup_day(&e, &path, &day1, &["--changed-areas", cf.to_str().unwrap()]);
    let added = e.pack_bytes() - before;
    let d = e.delta_blobs();
    let repo = e.open_repo();
    let day0_ids: Vec<BlobId> = day0.chunks(MIB).map(|b| repo.keys().blob_id(b)).collect();
    let mut expected: Vec<(BlobId, BlobId)> =
        (2..8).map(|b| (repo.keys().blob_id(&day1[b * MIB..(b + 1) * MIB]), day0_ids[b])).collect();
    expected.sort();
    assert_eq!(d, expected, "each changed block is a delta against its day-0 block at the same offset");
    // Six small deltas and one incompressible block stored whole.
    assert!(added < 2 * MIB as u64 && added > MIB as u64, "{added} bytes stored");
    assert_eq!(e.restore(&s1, &[]), day1);
}

#[test]
fn a_restore_of_deltas_with_more_bases_than_one_read_ahead_batch_is_bit_exact() {
    // More distinct bases than restore reads ahead at once (16).
    let e = Env::with_repo();
    let (path, day0, s0) = first_day(&e, 5, 48);
    let day1 = a_write_in_every_block(&day0, 9);
    let s1 = backup_day(&e, &path, &day1, &[]);
    assert!(e.delta_blobs().len() >= 48, "{} deltas", e.delta_blobs().len());
    assert_eq!(e.restore(&s1, &[]), day1);
    assert_eq!(e.restore(&s0, &[]), day0);
}

#[test]
fn check_opens_every_delta_with_its_base_and_names_a_damaged_one() {
    // More distinct bases than check reads ahead at once after its data pass (16), for deltas it leaves there.
    let e = Env::with_repo();
    let (path, day0, _) = first_day(&e, 6, 40);
    let day1 = a_write_in_every_block(&day0, 7);
    let s1 = backup_day(&e, &path, &day1, &[]);
    let deltas = e.delta_blobs();
    assert!(deltas.len() >= 40, "{} deltas", deltas.len());
    let check = e.ok(&["check", "--read-data"]);
    assert!(check.stdout.contains("no errors found"), "{}", check.stdout);

    // One delta's own bytes damaged (its base intact): check names that blob, and the block of day 1 that
    // needs it, and no other blob.
    let (delta, _) = deltas[deltas.len() / 2];
    let (pack, offset) = blob_place(&e, &delta);
    e.flip(&pack, offset + 10);
    let c = e.run(&["check", "--read-data"]);
    assert_ne!(c.code, 0, "{}", c.stdout);
    let all = format!("{}{}", c.stdout, c.stderr);
    assert!(all.contains(&format!("{pack}: data blob {delta} at offset {offset}")), "{all}");
    let blobs_named = c.stderr.lines().filter(|l| l.starts_with("damaged: ")).map(|l| l.matches(" blob ").count());
    assert_eq!(blobs_named.sum::<usize>(), 1, "only the damaged delta is reported: {all}");
    assert!(c.stdout.contains("damage recorded: 1 blob copy"), "{all}");
    assert!(all.contains(&format!("snapshot {} (vm)", &s1[..8])), "{all}");
}

#[test]
fn prune_keeps_the_base_of_a_live_delta_and_frees_it_later() {
    let e = Env::new();
    e.ok(&["init", "--pack-size", "1"]);
    let (path, day0, _) = first_day(&e, 2, 10);
    let day1 = small_writes(&day0, 1);
    let s1 = backup_day(&e, &path, &day1, &[]);
    assert_eq!(e.delta_blobs().len(), 6);

    // Day 0 is forgotten: its changed blocks are no snapshot's any more, but day 1's deltas need them.
    e.ok(&["forget", "--keep-last", "1"]);
    e.ok(&["prune", "--max-unused", "0"]);
    assert_eq!(e.restore(&s1, &[]), day1);
    let check = e.ok(&["check", "--read-data"]);
    assert!(check.stdout.contains("no errors found"), "{}", check.stdout);

    // A new disk replaces everything; once day 1 is forgotten too, its deltas go, and their bases with the
    // prune after that.
    let other = random_bytes(3, 4 * MIB);
    let s2 = backup_day(&e, &path, &other, &["--no-parent"]);
    e.ok(&["forget", "--keep-last", "1"]);
    e.ok(&["prune", "--max-unused", "0"]);
    e.ok(&["prune", "--max-unused", "0"]);
    let left = e.pack_bytes();
    assert!(left < 4 * MIB as u64 + 256 * 1024, "{left} bytes of packs left for a 4 MiB snapshot");
    assert!(e.delta_blobs().is_empty());
    assert_eq!(e.restore(&s2, &[]), other);
}

#[test]
fn a_damaged_base_is_reported_for_the_blocks_of_its_deltas() {
    let e = Env::with_repo();
    let (path, day0, s0) = first_day(&e, 4, 12);
    let day1 = small_writes(&day0, 1);
    let s1 = backup_day(&e, &path, &day1, &[]);
    let (delta, base) = e.delta_blobs()[0];
    let (pack, offset) = blob_place(&e, &base);
    e.flip(&pack, offset + 100);

    // Day 0 holds the base, day 1 its deltas: `snapshots --verified` counts those blocks in each, once the
    // damage is recorded: by a check of day 0 alone (which reads the base's pack, not the deltas'), by a restore
    // of day 1, by a check of everything.
    let deltas_of_base = e.delta_blobs().iter().filter(|(_, b)| *b == base).count() as u64;
    let damaged_blocks_shown = || {
        let listed = e.ok(&["snapshots", "--verified", "--json"]).json();
        let damaged: Vec<(String, u64)> = listed
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s["id"].as_str().unwrap().to_string(), s["verification"]["damaged_blocks"].as_u64().unwrap()))
            .collect();
        assert_eq!(damaged.iter().find(|(id, _)| *id == s1).unwrap().1, deltas_of_base, "{damaged:?}");
        assert_eq!(damaged.iter().find(|(id, _)| *id != s1).unwrap().1, 1, "{damaged:?}");
    };
    e.fails(&["check", "--read-data", "--snapshot", &s0]);
    damaged_blocks_shown();

    // Restore stops with an error naming the delta and its base; nothing silently wrong.
    let t = e.path("out.raw");
    let r = e.fails(&["restore", &s1, "--target", t.to_str().unwrap()]);
    assert!(r.stderr.contains(&delta.to_string()[..8]) || r.stderr.contains(&base.to_string()[..8]), "{}", r.stderr);
    damaged_blocks_shown();
    // Check names the damaged base, and the snapshot block that needs it through the delta.
    let c = e.run(&["check", "--read-data"]);
    assert_ne!(c.code, 0, "{}", c.stdout);
    let all = format!("{}{}", c.stdout, c.stderr);
    assert!(all.contains(&format!("blob {delta}")) && all.contains(&format!("its delta base: {pack}")), "{all}");
    assert!(all.contains(&format!("snapshot {} (vm)", &s1[..8])), "day 1's changed block is reported: {all}");
    damaged_blocks_shown();

    // Day 0's pack lost: the structure check alone counts day 1's deltas (stored in day 1's pack) as lost too.
    e.delete_object(&pack);
    let c = e.run(&["check"]);
    assert_ne!(c.code, 0, "{}", c.stdout);
    let all = format!("{}{}", c.stdout, c.stderr);
    let day1 = all.lines().find(|l| l.contains(&format!("snapshot {} (vm)", &s1[..8]))).unwrap_or_default();
    assert!(day1.contains("12 block(s) in blocks 0..12 are unreadable"), "{all}");
}

#[test]
fn a_base_the_storage_fails_to_return_is_not_recorded_as_damage() {
    let e = Env::local();
    e.ok(&["init"]);
    let (path, day0, _) = first_day(&e, 5, 12);
    let day1 = small_writes(&day0, 1);
    let s1 = backup_day(&e, &path, &day1, &[]);
    let (_, base) = e.delta_blobs()[0];
    let (pack, _) = blob_place(&e, &base);
    // The storage fails to return day 0's pack: a directory where its file was reads with EISDIR, a storage
    // error as an unreachable server's is, not damage.
    let file = e.repo().join(&pack);
    let bytes = std::fs::read(&file).unwrap();
    std::fs::remove_file(&file).unwrap();
    std::fs::create_dir(&file).unwrap();
    let t = e.path("out.raw");
    let r = e.run(&["restore", &s1, "--allow-partial", "--target", t.to_str().unwrap()]);
    assert_ne!(r.code, 0, "{}", r.stdout);
    assert!(r.stderr.contains("its delta base"), "the deltas' blocks are named: {}", r.stderr);
    assert_eq!(e.objects("damaged"), Vec::<String>::new(), "nothing is known damaged: {}", r.stderr);
    // The pack back, day 1 restores whole.
    std::fs::remove_dir(&file).unwrap();
    std::fs::write(&file, bytes).unwrap();
    assert!(e.restore(&s1, &[]) == day1, "day 1 restores bit-exact");
}

#[test]
fn a_restore_of_deltas_and_whole_blocks_onto_a_file_system_that_fills_up_fails_cleanly() {
    let e = Env::with_repo();
    let (path, day0, _) = first_day(&e, 8, 40);
    // Deltas in the last 20 blocks, new whole blocks in the first 20: restore writes both kinds at once.
    let mut day1 = a_write_in_every_block(&day0, 3);
    day1[..20 * MIB].copy_from_slice(&random_bytes(99, 20 * MIB));
    let s1 = backup_day(&e, &path, &day1, &[]);
    assert!(e.delta_blobs().len() >= 20, "{} deltas", e.delta_blobs().len());

    // The target on a 24 MiB tmpfs in a private mount namespace.
    let mnt = e.path("small");
    std::fs::create_dir_all(&mnt).unwrap();
    let target = mnt.join("out.raw");
    let restore = e.command(&["restore", &s1, "--target", target.to_str().unwrap()]);
    let mut c = std::process::Command::new("unshare");
    let script = format!("mount -t tmpfs -o size=24m tmpfs {} || exit 99; exec \"$@\"", mnt.display());
    c.args(["-rm", "sh", "-c", &script, "sh"]).arg(restore.get_program()).args(restore.get_args());
    for (k, v) in restore.get_envs() {
        match v {
            Some(v) => c.env(k, v),
            None => c.env_remove(k),
        };
    }
    let out = c.output().expect("unshare (util-linux) runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("out.raw") && stderr.contains("No space left on device"),
        "names the target and why: {stderr}"
    );
}
