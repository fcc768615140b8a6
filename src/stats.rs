//! `stats`: what the repository holds and what deduplication and compression save.
//!
//! Logical size is what a full restore of every snapshot would write (disk capacities); data size leaves out
//! the all-zero blocks; stored size is what the blobs occupy in packs. A snapshot's unique size is what only
//! it references: roughly what forgetting it (and pruning) would free.

use std::collections::{BTreeMap, HashMap};

use crate::backup::load_segment;
use crate::cache::IndexCache;
use crate::error::Result;
use crate::format::{BlobId, BlobType, ObjectId};
use crate::repository::Repository;

#[derive(Debug, Default, Clone)]
pub struct Totals {
    /// Sum of disk capacities.
    pub logical: u64,
    /// Bytes of non-zero blocks.
    pub data: u64,
}

#[derive(Debug, Default)]
pub struct Stats {
    pub snapshots: usize,
    pub all: Totals,
    /// Distinct blobs referenced, their plaintext and stored (compressed, encrypted) bytes.
    pub blobs: u64,
    pub blobs_raw: u64,
    pub blobs_stored: u64,
    /// Per source, then disk.
    pub per_disk: BTreeMap<(String, String), Totals>,
    /// Per snapshot: (id, source, time, stored bytes only it references).
    pub unique: Vec<(ObjectId, String, i64, u64)>,
}

pub fn compute(repo: &Repository, cache: &IndexCache) -> Result<Stats> {
    let snaps = repo.list_snapshots()?;
    let mut stats = Stats { snapshots: snaps.len(), ..Default::default() };
    // Blob -> (snapshots referencing it, the last one): a blob is unique to a snapshot if the count is 1.
    let mut refs: HashMap<BlobId, (u32, usize)> = HashMap::new();
    let mut segments: HashMap<BlobId, Vec<BlobId>> = HashMap::new();
    for (i, (_, snap)) in snaps.iter().enumerate() {
        for disk in &snap.disks {
            let t = stats.per_disk.entry((snap.source.clone(), disk.name.clone())).or_default();
            t.logical += disk.capacity;
            stats.all.logical += disk.capacity;
            let bs = disk.block_size as u64;
            let mut blocks = 0u64;
            for seg in &disk.segments {
                if let std::collections::hash_map::Entry::Vacant(v) = segments.entry(seg.id) {
                    v.insert(load_segment(repo, cache, seg)?);
                }
                for id in std::iter::once(&seg.id).chain(segments[&seg.id].iter()) {
                    if id.is_zero_block() {
                        continue;
                    }
                    let r = refs.entry(*id).or_insert((0, i));
                    if r.1 != i || r.0 == 0 {
                        r.0 += 1;
                        r.1 = i;
                    }
                }
                for id in &segments[&seg.id] {
                    if !id.is_zero_block() {
                        let len = bs.min(disk.capacity - blocks * bs);
                        t.data += len;
                        stats.all.data += len;
                    }
                    blocks += 1;
                }
            }
        }
    }
    let mut unique = vec![0u64; snaps.len()];
    for (id, (count, owner)) in &refs {
        let Some(loc) = cache.lookup(id)? else { continue };
        stats.blobs += 1;
        stats.blobs_raw += loc.entry.raw_len as u64;
        stats.blobs_stored += loc.entry.stored_len as u64;
        if *count == 1 && loc.entry.blob_type == BlobType::Data {
            unique[*owner] += loc.entry.stored_len as u64;
        }
    }
    stats.unique = snaps.iter().zip(unique).map(|((id, s), u)| (*id, s.source.clone(), s.time_secs, u)).collect();
    Ok(stats)
}
