//! Throughput of the block pipeline's stages on 1 MiB blocks, and of a whole backup and restore.
//! `cargo bench --bench pipeline`. Absolute numbers depend on the machine; compare runs on one machine.

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use diskvault::backup::{self, BackupOptions, DiskJob};
use diskvault::cache::IndexCache;
use diskvault::crypto::Keys;
use diskvault::format::keyfile::KdfParams;
use diskvault::format::pack::BlobSealer;
use diskvault::format::BlobType;
use diskvault::progress::Counters;
use diskvault::repository::{InitOptions, Repository};
use diskvault::restore::{self, RestoreOptions};
use diskvault::source::file::FileSource;

const MIB: usize = 1 << 20;

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

/// A block like those of a VM disk: half text-like (compressible), half random.
fn typical_block() -> Vec<u8> {
    let mut b = b"Nov 22 04:38:03 web-01 nginx[812]: 10.0.0.7 GET /api/v1/items 200 ".repeat(MIB / 2 / 66 + 1);
    b.truncate(MIB / 2);
    b.extend(noise(3, MIB / 2));
    b
}

fn stages(c: &mut Criterion) {
    let keys = Keys::from_master_secret(&[1; 32]);
    let block = typical_block();
    let random = noise(5, MIB);
    let zeros = vec![0u8; MIB];
    let mut g = c.benchmark_group("stage");
    g.throughput(Throughput::Bytes(MIB as u64));
    g.bench_function("zero-check", |b| b.iter(|| backup::is_zero(&zeros)));
    g.bench_function("keyed-blake3", |b| b.iter(|| keys.blob_id(&block)));
    g.bench_function("aes-256-gcm", |b| b.iter(|| keys.seal(b"aad", &random)));
    for (name, level) in [("seal-zstd1-typical", 1), ("seal-zstd3-typical", 3)] {
        let mut sealer = BlobSealer::new(level);
        let id = keys.blob_id(&block);
        g.bench_function(name, |b| b.iter(|| sealer.seal(&keys, BlobType::Data, id, &block)));
    }
    let mut sealer = BlobSealer::new(3);
    let id = keys.blob_id(&random);
    g.bench_function("seal-zstd3-random", |b| b.iter(|| sealer.seal(&keys, BlobType::Data, id, &random)));
    // Deltas against yesterday's block at the same offset: three 4 KiB pages rewritten (coded from the places
    // where the two are equal), a quarter rewritten (zstd's search over the base).
    let base = typical_block();
    let base_id = keys.blob_id(&base);
    let pages = |p: &[usize]| p.iter().map(|&p| p * 4096..(p + 1) * 4096).collect::<Vec<_>>();
    for (name, rewritten) in [
        ("seal-delta-3-pages", pages(&[7, 100, 201])),
        ("seal-delta-quarter", std::iter::once(MIB / 4..MIB / 2).collect()),
    ] {
        let mut block = base.clone();
        for (i, r) in rewritten.into_iter().enumerate() {
            block[r.clone()].copy_from_slice(&noise(i as u64 + 9, r.len()));
        }
        let id = keys.blob_id(&block);
        assert!(sealer.seal_delta(&keys, id, &block, base_id, &base).is_some(), "{name} is a delta");
        g.bench_function(name, |b| b.iter(|| sealer.seal_delta(&keys, id, &block, base_id, &base)));
    }
    g.finish();
}

fn whole_backup(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    let mut data = Vec::new();
    for i in 0..128u64 {
        match i % 4 {
            0 => data.extend(vec![0u8; MIB]),
            1 => data.extend(noise(i, MIB)),
            _ => data.extend(typical_block().iter().map(|b| b.wrapping_add(i as u8))),
        }
    }
    std::fs::write(&image, &data).unwrap();
    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Bytes(data.len() as u64));
    g.sample_size(10);
    let fast_kdf =
        InitOptions { kdf: KdfParams { memory_kib: 1024, iterations: 1, parallelism: 1 }, ..Default::default() };
    g.bench_function("backup-128MiB-new-data", |b| {
        b.iter_with_setup(
            || {
                let repo_dir = tempfile::tempdir().unwrap();
                let backend = diskvault::backend::open(repo_dir.path().to_str().unwrap()).unwrap();
                let repo = Repository::init(backend, b"pw", &fast_kdf).unwrap();
                let (cache, _) = IndexCache::open(&repo, &repo_dir.path().join("cache")).unwrap();
                (repo_dir, repo, Arc::new(cache))
            },
            |(_dir, repo, cache)| {
                let job = DiskJob {
                    name: "d".into(),
                    source: Box::new(FileSource::open(&image).unwrap()),
                    changed: None,
                    change_token: None,
                    resume: None,
                };
                backup::run(&repo, cache, vec![job], &BackupOptions::new("bench"), &Counters::default()).unwrap()
            },
        )
    });
    // Restore from one repository, many times.
    let repo_dir = tempfile::tempdir().unwrap();
    let backend = diskvault::backend::open(repo_dir.path().to_str().unwrap()).unwrap();
    let repo = Repository::init(backend, b"pw", &fast_kdf).unwrap();
    let (cache, _) = IndexCache::open(&repo, &repo_dir.path().join("cache")).unwrap();
    let cache = Arc::new(cache);
    let job = DiskJob {
        name: "d".into(),
        source: Box::new(FileSource::open(&image).unwrap()),
        changed: None,
        change_token: None,
        resume: None,
    };
    let (_, snap) =
        backup::run(&repo, cache.clone(), vec![job], &BackupOptions::new("bench"), &Counters::default()).unwrap();
    g.bench_function("backup-128MiB-all-known", |b| {
        b.iter(|| {
            let job = DiskJob {
                name: "d".into(),
                source: Box::new(FileSource::open(&image).unwrap()),
                changed: None,
                change_token: None,
                resume: None,
            };
            backup::run(&repo, cache.clone(), vec![job], &BackupOptions::new("bench"), &Counters::default()).unwrap()
        })
    });
    let target = dir.path().join("restored.raw");
    g.bench_function("restore-128MiB", |b| {
        b.iter(|| {
            let _ = std::fs::remove_file(&target);
            restore::restore_disk(
                &repo,
                &cache,
                &snap.disks[0],
                &target,
                &RestoreOptions::default(),
                &Counters::default(),
            )
            .unwrap()
        })
    });
    g.finish();
}

criterion_group!(benches, stages, whole_backup);
criterion_main!(benches);
