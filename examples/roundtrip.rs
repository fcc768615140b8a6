//! The main job end to end, through the library API: make a sample disk image, back it up, change it, back it
//! up incrementally from a changed-areas list, and restore both points in time bit-exact.
//!
//! `cargo run --release --example roundtrip [WORK_DIR]` (default: a temporary directory, removed afterwards).

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use diskvault::backup::{self, BackupOptions, DiskJob};
use diskvault::cache::IndexCache;
use diskvault::progress::Counters;
use diskvault::repository::{InitOptions, Repository};
use diskvault::restore::{self, RestoreOptions};
use diskvault::source::{file::FileSource, Extent};
use diskvault::util::human_bytes;

const MIB: u64 = 1 << 20;

/// Pseudo-random bytes (xorshift), so the sample is incompressible where it should be.
fn noise(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A 256 MiB sparse "VM disk": an OS-like area of text, a database-like area of noise, free space (holes).
fn make_image(path: &Path) -> std::io::Result<()> {
    let f = std::fs::File::create(path)?;
    f.set_len(256 * MIB + 4096)?; // not a multiple of the block size
    let text = b"Lorem ipsum dolor sit amet, consectetur adipiscing elit. ".repeat(20_000);
    f.write_all_at(&text, MIB)?;
    f.write_all_at(&noise(1, 24 * MIB as usize), 64 * MIB)?;
    f.write_all_at(&noise(2, 4096), 256 * MIB)?;
    Ok(())
}

fn same_file(a: &Path, b: &Path) -> std::io::Result<bool> {
    Ok(std::fs::read(a)? == std::fs::read(b)?)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let tmp;
    let work = match std::env::args().nth(1) {
        Some(d) => std::path::PathBuf::from(d),
        None => {
            tmp = std::env::temp_dir().join(format!("diskvault-roundtrip-{}", std::process::id()));
            tmp
        }
    };
    std::fs::create_dir_all(&work)?;
    let image = work.join("vm-disk0.raw");
    make_image(&image)?;
    let day0 = work.join("day0.copy");
    std::fs::copy(&image, &day0)?;

    let backend = diskvault::backend::open(work.join("repo").to_str().unwrap())?;
    let repo = Repository::init(backend, b"example password", &InitOptions::default())?;
    let (cache, _) = IndexCache::open(&repo, &work.join("cache"))?;
    let cache = Arc::new(cache);

    // Day 0: full backup (holes are skipped).
    let t = Instant::now();
    let job = DiskJob {
        name: "disk0".into(),
        source: Box::new(FileSource::open(&image)?),
        changed: None,
        change_token: None,
        resume: None,
    };
    let (id0, snap0) =
        backup::run(&repo, cache.clone(), vec![job], &BackupOptions::new("sample-vm"), &Counters::default())?;
    let d = &snap0.disks[0];
    println!(
        "full backup {}: read {} of a {} disk in {:.2} s, stored {}",
        id0.short(),
        human_bytes(d.stats.bytes_read),
        human_bytes(d.capacity),
        t.elapsed().as_secs_f64(),
        human_bytes(d.stats.new_bytes_stored)
    );

    // Day 1: the "guest" writes into two places; the change tracker reports them.
    let f = std::fs::OpenOptions::new().write(true).open(&image)?;
    let changes = [Extent { start: 70 * MIB + 12_345, length: 8192 }, Extent { start: 200 * MIB, length: 3 * MIB }];
    for (i, c) in changes.iter().enumerate() {
        f.write_all_at(&noise(10 + i as u64, c.length as usize), c.start)?;
    }
    drop(f);
    let t = Instant::now();
    let job = DiskJob {
        name: "disk0".into(),
        source: Box::new(FileSource::open(&image)?),
        changed: Some(changes.to_vec()),
        change_token: None,
        resume: None,
    };
    let mut opts = BackupOptions::new("sample-vm");
    opts.parent = Some((id0, snap0.clone()));
    let (id1, snap1) = backup::run(&repo, cache.clone(), vec![job], &opts, &Counters::default())?;
    let d = &snap1.disks[0];
    println!(
        "incremental {}: read {} ({} blocks), inherited {} blocks, stored {} in {:.2} s",
        id1.short(),
        human_bytes(d.stats.bytes_read),
        d.stats.blocks_read,
        d.stats.blocks_inherited,
        human_bytes(d.stats.new_bytes_stored),
        t.elapsed().as_secs_f64()
    );

    // Restore both points in time and compare.
    for (name, snap, expected) in [("day0", &snap0, &day0), ("day1", &snap1, &image)] {
        let target = work.join(format!("restored-{name}.raw"));
        let _ = std::fs::remove_file(&target);
        let ropts = RestoreOptions { verify: true, ..Default::default() };
        restore::restore_disk(&repo, &cache, &snap.disks[0], &target, &ropts, &Counters::default())?;
        let ok = same_file(&target, expected)?;
        println!("restore {name}: {}", if ok { "bit-exact" } else { "DIFFERENT" });
        if !ok {
            return Err(format!("restore of {name} differs from the original").into());
        }
    }
    if std::env::args().nth(1).is_none() {
        drop(cache);
        std::fs::remove_dir_all(&work)?;
    }
    Ok(())
}
