//! Prune's scale benchmark (`benches/prune-scale.sh`): builds a synthetic repository with millions of tiny
//! blocks, then forgets the older half of its snapshots and prunes, reporting time and peak RSS.
//!
//! ```text
//! synthetic_repo generate DIR BLOCKS     # BLOCKS distinct 64-byte blocks, 10 overlapping snapshots
//! synthetic_repo prune DIR CACHE [N]     # forget the N (default 5) oldest snapshots, prune; print time and peak
//!                                        # RSS, and what catching up with the prune costs a host's index cache
//! synthetic_repo cache DIR CACHE         # bring the local index cache at CACHE up to date; time and peak RSS
//! ```
//! Snapshot g references blocks [g·B/10, (g+2)·B/10): every block is used by one or two snapshots, and
//! forgetting the five oldest leaves about half of the blocks unreferenced.

use std::collections::{BTreeMap, HashSet};
use std::time::Instant;

use diskvault::cache::IndexCache;
use diskvault::format::index::{IndexFile, IndexedPack};
use diskvault::format::keyfile::KdfParams;
use diskvault::format::pack::{BlobSealer, PackWriter};
use diskvault::format::snapshot::{DiskManifest, DiskStats, SegmentRef, Snapshot, Summary};
use diskvault::format::{BlobId, BlobType, SEGMENT_BLOCKS};
use diskvault::repository::{InitOptions, Repository};

const PASSWORD: &[u8] = b"synthetic";
const BLOBS_PER_PACK: usize = 4096;
/// Like a backup's checkpoints: an index file every 16 packs.
const PACKS_PER_INDEX: usize = 16;

fn main() {
    // As the `diskvault` command does for every command: the peaks measured are the command's.
    diskvault::util::limit_allocator_arenas();
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("generate") if args.len() == 4 => generate(&args[2], args[3].parse().expect("BLOCKS")),
        Some("cache") if args.len() == 4 => sync_cache(&args[2], &args[3]),
        Some("prune") if args.len() == 4 => prune(&args[2], &args[3], None),
        Some("prune") if args.len() == 5 => prune(&args[2], &args[3], Some(args[4].parse().expect("FORGET"))),
        _ => {
            eprintln!("usage: synthetic_repo generate DIR BLOCKS | prune DIR CACHE [FORGET] | cache DIR CACHE");
            std::process::exit(2);
        }
    }
}

/// Stores packs and index files as a backup would.
struct Packer<'a> {
    repo: &'a Repository,
    sealer: BlobSealer,
    writer: Option<PackWriter>,
    pack_type: BlobType,
    indexed: Vec<IndexedPack>,
}

impl Packer<'_> {
    fn add(&mut self, id: BlobId, plain: &[u8]) {
        let sealed = self.sealer.seal(self.repo.keys(), self.pack_type, id, plain);
        let w = self.writer.get_or_insert_with(|| PackWriter::new(self.pack_type, 1 << 20));
        w.add(sealed);
        if self.pack_type == BlobType::Segment || w_len(w) >= BLOBS_PER_PACK {
            self.flush();
        }
    }
    fn flush(&mut self) {
        if let Some(w) = self.writer.take().filter(|w| !w.is_empty()) {
            let pack = w.finish(self.repo.keys());
            self.indexed.push(self.repo.save_pack(pack).unwrap());
        }
        if self.indexed.len() >= PACKS_PER_INDEX {
            self.write_index();
        }
    }
    fn write_index(&mut self) {
        if !self.indexed.is_empty() {
            let file = IndexFile { supersedes: Vec::new(), packs: std::mem::take(&mut self.indexed) };
            self.repo.save_index(&file).unwrap();
        }
    }
}

/// Blobs in an open pack writer (sealed 64-byte blocks are 92 bytes).
fn w_len(w: &PackWriter) -> usize {
    w.len() / 92
}

fn generate(dir: &str, blocks: usize) {
    let started = Instant::now();
    let backend = diskvault::backend::open(dir).unwrap();
    backend.create_container().unwrap();
    let opts = InitOptions {
        zstd_level: 0,
        kdf: KdfParams { memory_kib: 8 * 1024, iterations: 1, parallelism: 1 },
        ..InitOptions::default()
    };
    let repo = Repository::init(backend, PASSWORD, &opts).unwrap();
    let mut data = Packer {
        repo: &repo,
        sealer: BlobSealer::new(0),
        writer: None,
        pack_type: BlobType::Data,
        indexed: Vec::new(),
    };
    let mut ids = Vec::with_capacity(blocks);
    for i in 0..blocks as u64 {
        let plain: Vec<u8> = (0..8u64).flat_map(|k| (i ^ (k << 56)).to_le_bytes()).collect();
        let id = repo.keys().blob_id(&plain);
        data.add(id, &plain);
        ids.push(id);
    }
    data.flush();
    data.write_index();

    let mut meta = Packer {
        repo: &repo,
        sealer: BlobSealer::new(0),
        writer: None,
        pack_type: BlobType::Segment,
        indexed: Vec::new(),
    };
    let mut seen = HashSet::new();
    for g in 0..10usize {
        let window = &ids[g * blocks / 10..((g + 2) * blocks / 10).min(blocks)];
        let mut segments = Vec::new();
        for chunk in window.chunks(SEGMENT_BLOCKS) {
            let plain: Vec<u8> = chunk.iter().flat_map(|id| id.0).collect();
            let id = repo.keys().blob_id(&plain);
            if seen.insert(id) {
                meta.add(id, &plain);
            }
            segments.push(SegmentRef { id, blocks: chunk.len() as u32 });
        }
        meta.flush();
        meta.write_index();
        let snap = Snapshot {
            time_secs: 1_700_000_000 + g as i64 * 86400,
            time_nanos: 0,
            hostname: "bench".into(),
            username: "bench".into(),
            source: "synthetic".into(),
            tags: Vec::new(),
            parent: None,
            disks: vec![DiskManifest {
                name: "disk0".into(),
                source_kind: "file".into(),
                source_path: "synthetic".into(),
                capacity: window.len() as u64 * diskvault::format::BLOCK_SIZE as u64,
                block_size: diskvault::format::BLOCK_SIZE,
                change_token: None,
                segments,
                stats: DiskStats::default(),
            }],
            annotations: BTreeMap::new(),
            summary: Summary::default(),
        };
        repo.save_snapshot(&snap).unwrap();
    }
    println!("generated {blocks} blocks in 10 snapshots in {:.1} s", started.elapsed().as_secs_f64());
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn prune(dir: &str, cache: &str, forget: Option<usize>) {
    let repo = Repository::open(diskvault::backend::open(dir).unwrap(), PASSWORD).unwrap();
    let mut snaps = repo.list_snapshots().unwrap();
    snaps.sort_by_key(|(_, s)| s.time_secs);
    for (id, _) in snaps.iter().take(forget.unwrap_or(snaps.len() / 2)) {
        repo.backend().delete(&diskvault::format::names::snapshot(id)).unwrap();
    }
    // A host's local index cache, up to date before the prune: what catching up with the prune costs it. In
    // processes of their own, so that each peak RSS is its own.
    let host = std::path::Path::new(cache).join("host");
    let built = cache_in_child(dir, &host);
    let rss_before = peak_rss_kib();
    let started = Instant::now();
    let r = diskvault::prune::run(&repo, std::path::Path::new(cache), &Default::default()).unwrap();
    println!(
        "prune: {:.2} s, peak RSS {} MiB (before prune {} MiB); {} blocks in use, {} packs examined, {} dropped, {} repacked, {} deleted",
        started.elapsed().as_secs_f64(),
        peak_rss_kib() / 1024,
        rss_before / 1024,
        r.blobs_in_use,
        r.packs,
        r.packs_unused,
        r.packs_repacked,
        r.packs_deleted
    );
    for (name, secs) in &r.phases {
        println!("  {name}: {secs:.2} s");
    }
    let caught_up = cache_in_child(dir, &host);
    let rebuilt = cache_in_child(dir, &std::path::Path::new(cache).join("fresh"));
    println!("local index cache: built before the prune: {built}");
    println!("  caught up with the prune: {caught_up}");
    println!("  built from scratch after it: {rebuilt}");
}

/// Runs `synthetic_repo cache` in a child process; returns what it printed.
fn cache_in_child(dir: &str, cache: &std::path::Path) -> String {
    let exe = std::env::current_exe().unwrap();
    let out = std::process::Command::new(exe).args(["cache", dir, cache.to_str().unwrap()]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn sync_cache(dir: &str, cache: &str) {
    let repo = Repository::open(diskvault::backend::open(dir).unwrap(), PASSWORD).unwrap();
    let started = Instant::now();
    let (_, synced) = IndexCache::open(&repo, std::path::Path::new(cache)).unwrap();
    println!("{:.2} s, peak RSS {} MiB ({synced})", started.elapsed().as_secs_f64(), peak_rss_kib() / 1024);
}
