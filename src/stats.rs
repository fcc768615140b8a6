//! `stats`: what the repository holds and what deduplication and compression save.
//!
//! Logical size is what a full restore of every snapshot would write (disk capacities); data size leaves out
//! the all-zero blocks; stored size is what the blobs occupy in packs. A snapshot's unique size is what only
//! it references: roughly what forgetting it (and pruning) would free.

use std::collections::{BTreeMap, HashMap};

use crate::backup::load_segment;
use crate::cache::IndexCache;
use crate::error::Result;
use crate::format::snapshot::SegmentRef;
use crate::format::{BlobId, BlobType, ObjectId};
use crate::idset::{Distinct, Keyed};
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

/// What [`compute`] keeps of a manifest segment.
struct SegmentSummary {
    /// Its blocks that are not all zeros.
    data_blocks: u64,
    /// Whether its last block is one of them.
    last_is_data: bool,
}

pub fn compute(repo: &Repository, cache: &IndexCache) -> Result<Stats> {
    let snaps = repo.list_snapshots()?;
    let mut stats = Stats { snapshots: snaps.len(), ..Default::default() };
    // The snapshots referencing each distinct segment (incrementals share the segments of unchanged ranges),
    // oldest first.
    let mut users: HashMap<BlobId, Vec<u32>> = HashMap::new();
    let mut distinct: Vec<SegmentRef> = Vec::new();
    for (i, (_, snap)) in (0u32..).zip(&snaps) {
        for seg in snap.disks.iter().flat_map(|d| &d.segments) {
            let u = users.entry(seg.id).or_default();
            if u.is_empty() {
                distinct.push(*seg);
            }
            if u.last() != Some(&i) {
                u.push(i);
            }
        }
    }
    let mut owners: Distinct<Owned> = Distinct::default();
    let mut note =
        |id: &BlobId, by: &[u32]| owners.push(Owned { id: *id, owner: if by.len() == 1 { by[0] } else { SHARED } });
    // Each segment is read once, many at a time; what is kept of it is its non-zero blocks, not its ids.
    let mut summaries: HashMap<BlobId, SegmentSummary> = HashMap::new();
    crate::util::fetch_in_order(
        &distinct,
        |seg| load_segment(repo, cache, seg),
        |seg, ids| {
            let ids = ids?;
            let by = &users[&seg.id];
            note(&seg.id, by);
            for id in ids.iter().filter(|id| !id.is_zero_block()) {
                note(id, by);
            }
            let summary = SegmentSummary {
                data_blocks: ids.iter().filter(|id| !id.is_zero_block()).count() as u64,
                last_is_data: ids.last().is_some_and(|id| !id.is_zero_block()),
            };
            summaries.insert(seg.id, summary);
            Ok(())
        },
    )?;
    for (_, snap) in &snaps {
        for disk in &snap.disks {
            let t = stats.per_disk.entry((snap.source.clone(), disk.name.clone())).or_default();
            t.logical += disk.capacity;
            stats.all.logical += disk.capacity;
            let bs = disk.block_size as u64;
            let mut data: u64 = disk.segments.iter().map(|seg| summaries[&seg.id].data_blocks * bs).sum();
            // A last block shorter than the others holds only the disk's last bytes.
            if disk.capacity % bs != 0 && disk.segments.last().is_some_and(|seg| summaries[&seg.id].last_is_data) {
                data -= bs - disk.capacity % bs;
            }
            t.data += data;
            stats.all.data += data;
        }
    }
    let mut unique = vec![0u64; snaps.len()];
    // Looked up in id order, as the cache stores them (3 million blobs one by one in hash order took 39 s).
    let refs = owners.into_sorted();
    let mut owner_of = refs.iter().map(|r| r.owner);
    cache.lookup_sorted(refs.iter().map(|r| &r.id), |_, loc| {
        let owner = owner_of.next().expect("one owner per id");
        let Some((loc, _)) = loc else { return };
        stats.blobs += 1;
        stats.blobs_raw += loc.entry.raw_len as u64;
        stats.blobs_stored += loc.entry.stored_len as u64;
        if owner != SHARED && loc.entry.blob_type == BlobType::Data {
            unique[owner as usize] += loc.entry.stored_len as u64;
        }
    })?;
    stats.unique = snaps.iter().zip(unique).map(|((id, s), u)| (*id, s.source.clone(), s.time_secs, u)).collect();
    Ok(stats)
}

/// The owner of a blob more than one snapshot references.
const SHARED: u32 = u32::MAX;

/// A referenced blob with the one snapshot referencing it, or [`SHARED`]: a blob is unique to a snapshot if only
/// it does. Gathered as a [`Distinct`]: 36 bytes per distinct blob, about a third of a hash map's (`stats` of
/// 3 million blobs peaked at 338 MB with one).
#[derive(Clone, Copy)]
struct Owned {
    id: BlobId,
    owner: u32,
}

impl Keyed for Owned {
    fn id(&self) -> &BlobId {
        &self.id
    }
    fn absorb(&mut self, repeat: &Self) {
        if repeat.owner != self.owner {
            self.owner = SHARED;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_blob_has_one_owner_only_if_every_reference_is_by_the_same_snapshot() {
        let id = |n: u8| BlobId([n; 32]);
        let mut owners: Distinct<Owned> = Distinct::default();
        // Enough to merge several times on the way.
        for round in 0..3u32 {
            for n in 0..(1u32 << 20) + 7 {
                let mut b = [0u8; 32];
                b[..4].copy_from_slice(&n.to_le_bytes());
                owners.push(Owned { id: BlobId(b), owner: if n % 2 == 0 { 5 } else { round } });
            }
        }
        owners.push(Owned { id: id(200), owner: 3 });
        owners.push(Owned { id: id(201), owner: 3 });
        owners.push(Owned { id: id(201), owner: 4 });
        let sorted = owners.into_sorted();
        assert_eq!(sorted.len(), (1 << 20) + 7 + 2);
        assert!(sorted.windows(2).all(|w| w[0].id < w[1].id));
        for Owned { id: b, owner } in &sorted {
            let expected = match b {
                b if *b == id(200) => 3,
                b if *b == id(201) => SHARED,
                b if u32::from_le_bytes(b.0[..4].try_into().unwrap()) % 2 == 0 => 5,
                _ => SHARED,
            };
            assert_eq!(*owner, expected, "{b}");
        }
    }
}
