//! How recently each snapshot was verified byte for byte (`snapshots --verified`), as Proxmox Backup Server
//! shows a verify state per snapshot.
//!
//! Derived, not stored: data checks record when they verified each pack (format-spec §8a), whichever way they
//! chose it (`--read-data`, a subset run, `--snapshot`). A snapshot is verified as of the least recent of those
//! times among the packs a restore of it reads: the copies the index cache picks for its manifest segments and
//! blocks (as restore picks them: not one a damage record names, where there is another) and the packs of
//! their delta bases. A block whose every copy is damaged, that no index lists, or whose segment cannot be read
//! makes the snapshot damaged, whatever the times say.

use std::collections::HashMap;

use crate::backup::read_segment;
use crate::cache::IndexCache;
use crate::error::{Error, Result};
use crate::format::index::BlobLocation;
use crate::format::snapshot::{SegmentRef, Snapshot};
use crate::format::{BlobId, ObjectId};
use crate::repository::Repository;

/// One snapshot's verification state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotState {
    /// Packs a restore of the snapshot reads.
    pub packs: usize,
    /// Of those, the packs no data check has verified.
    pub unverified: usize,
    /// When the least recently verified of them was verified (seconds since the epoch, the checking host's
    /// clock); `None` when one never was.
    pub verified_since: Option<i64>,
    /// Blocks a restore cannot read (manifest segments that cannot be read count all their blocks).
    pub damaged_blocks: u64,
}

impl SnapshotState {
    /// Every byte a restore reads was verified, and nothing is known damaged.
    pub fn is_verified(&self) -> bool {
        self.unverified == 0 && self.damaged_blocks == 0
    }
}

/// What one manifest segment needs: the packs of its copy, its blocks' and their delta bases', as indexes into
/// the interned pack list, and how many of its blocks cannot be read.
struct SegmentNeeds {
    packs: Vec<u32>,
    damaged_blocks: u64,
}

/// The state of each of `snapshots` (in the same order), given when each pack was last verified.
pub fn snapshot_states(
    repo: &Repository,
    cache: &IndexCache,
    snapshots: &[&Snapshot],
    last_verified: &HashMap<ObjectId, i64>,
) -> Result<Vec<SnapshotState>> {
    // Incrementals share the segments of unchanged ranges: each distinct segment is read once.
    let mut distinct: Vec<SegmentRef> =
        snapshots.iter().flat_map(|s| s.disks.iter().flat_map(|d| d.segments.iter().copied())).collect();
    distinct.sort_unstable_by_key(|seg| (seg.id, seg.blocks));
    distinct.dedup();
    let mut packs = PackNumbers::default();
    let mut needs: HashMap<(BlobId, u32), SegmentNeeds> = HashMap::with_capacity(distinct.len());
    crate::util::fetch_in_order(
        &distinct,
        |seg| -> Result<(Option<BlobLocation>, Result<Vec<BlobId>>)> {
            let loc = cache.lookup_intact(&seg.id)?;
            Ok((loc, read_segment(repo, loc, seg)))
        },
        |seg, read| {
            let (loc, ids) = read?;
            let need = match ids {
                Ok(ids) => blocks_needs(cache, &ids, &mut packs, loc.map(|l| l.pack))?,
                // What restore could not read either: every block of the segment is lost to it.
                Err(Error::Missing { .. } | Error::Corrupt { .. }) => {
                    SegmentNeeds { packs: Vec::new(), damaged_blocks: seg.blocks as u64 }
                }
                Err(e) => return Err(e),
            };
            needs.insert((seg.id, seg.blocks), need);
            Ok(())
        },
    )?;
    let mut wanted = vec![false; packs.ids.len()];
    let states = snapshots
        .iter()
        .map(|snap| {
            wanted.iter_mut().for_each(|w| *w = false);
            let mut state = SnapshotState::default();
            for seg in snap.disks.iter().flat_map(|d| &d.segments) {
                let need = &needs[&(seg.id, seg.blocks)];
                state.damaged_blocks += need.damaged_blocks;
                need.packs.iter().for_each(|&p| wanted[p as usize] = true);
            }
            let times: Vec<Option<i64>> = packs
                .ids
                .iter()
                .zip(&wanted)
                .filter(|(_, w)| **w)
                .map(|(id, _)| last_verified.get(id).copied())
                .collect();
            state.packs = times.len();
            state.unverified = times.iter().filter(|t| t.is_none()).count();
            if state.unverified == 0 {
                state.verified_since = times.into_iter().flatten().min();
            }
            state
        })
        .collect();
    Ok(states)
}

/// Packs numbered in the order met, so that a snapshot's set of packs is a vector of flags.
#[derive(Default)]
struct PackNumbers {
    ids: Vec<ObjectId>,
    numbers: HashMap<ObjectId, u32>,
}

impl PackNumbers {
    fn number(&mut self, id: ObjectId) -> u32 {
        *self.numbers.entry(id).or_insert_with(|| {
            self.ids.push(id);
            (self.ids.len() - 1) as u32
        })
    }
}

/// The packs a restore reads for a segment (stored in `segment_pack`) holding `ids`, and its blocks that it
/// cannot read.
fn blocks_needs(
    cache: &IndexCache,
    ids: &[BlobId],
    packs: &mut PackNumbers,
    segment_pack: Option<ObjectId>,
) -> Result<SegmentNeeds> {
    let mut sorted: Vec<BlobId> = ids.iter().filter(|id| !id.is_zero_block()).copied().collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut found: Vec<ObjectId> = segment_pack.into_iter().collect();
    let mut lost: Vec<BlobId> = Vec::new();
    // Delta blobs, by base: a delta whose base cannot be read cannot be either.
    let mut bases: Vec<(BlobId, BlobId)> = Vec::new();
    cache.lookup_sorted(&sorted, |id, copy| match copy {
        Some((loc, true)) => {
            found.push(loc.pack);
            if let Some(base) = loc.entry.base {
                bases.push((base, *id));
            }
        }
        _ => lost.push(*id),
    })?;
    bases.sort_unstable();
    let mut base_ids: Vec<BlobId> = bases.iter().map(|(b, _)| *b).collect();
    base_ids.dedup();
    let mut lost_bases: Vec<BlobId> = Vec::new();
    cache.lookup_sorted(&base_ids, |id, copy| match copy {
        Some((loc, true)) => found.push(loc.pack),
        _ => lost_bases.push(*id),
    })?;
    for base in lost_bases {
        let from = bases.partition_point(|(b, _)| *b < base);
        lost.extend(bases[from..].iter().take_while(|(b, _)| *b == base).map(|(_, delta)| *delta));
    }
    lost.sort_unstable();
    let damaged_blocks = ids.iter().filter(|id| lost.binary_search(id).is_ok()).count() as u64;
    let mut numbers: Vec<u32> = found.into_iter().map(|p| packs.number(p)).collect();
    numbers.sort_unstable();
    numbers.dedup();
    Ok(SegmentNeeds { packs: numbers, damaged_blocks })
}
