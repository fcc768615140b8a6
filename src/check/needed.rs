//! What a restore of snapshots reads: the packs of the copies it takes (`check --snapshot` reads those, and
//! `backup --verify` those of them no check has verified), and how recently each snapshot was verified byte for
//! byte (`snapshots --verified`, as Proxmox Backup Server shows a verify state per snapshot).
//!
//! A restore takes, for each manifest segment and block, a copy no damage record names where the index lists
//! one, else a damaged one (whose read then names the damage); a delta blob also needs its base's copy. Both
//! questions are answered from the same walk over the snapshots' segments ([`segment_needs`]), through either
//! the index cache (what restore itself looks blobs up in) or check's own index ([`Copies`]).
//!
//! The verification state is derived, not stored: data checks record when they verified each pack
//! (format-spec §8a), whichever way they chose it (`--read-data`, a subset run, `--snapshot`, `backup
//! --verify`). A snapshot is verified as of the least recent of those times among the packs it needs; a block
//! whose copy is damaged, that no index lists, or whose segment cannot be read makes it damaged, whatever the
//! times say.

use std::collections::{HashMap, HashSet};

use crate::backup::read_segment;
use crate::cache::IndexCache;
use crate::damage::KnownDamage;
use crate::error::{Error, Result};
use crate::format::index::BlobLocation;
use crate::format::snapshot::Snapshot;
use crate::format::{BlobId, ObjectId};
use crate::idset::{Distinct, HeadBuckets};
use crate::repository::Repository;

use super::index::Index;
use super::{segment_uses, SegmentUse};

/// The copy of a blob a restore takes, and whether it is intact (no damage record names it); `None`: no index
/// lists the blob.
type ChosenCopy = Option<(BlobLocation, bool)>;

/// Where a reader finds blobs.
pub(crate) trait Copies: Sync {
    /// Calls `each` with every id of `ids` (ascending) and its chosen copy.
    fn copies_sorted(&self, ids: &[BlobId], each: &mut dyn FnMut(&BlobId, ChosenCopy)) -> Result<()>;
}

impl Copies for IndexCache {
    fn copies_sorted(&self, ids: &[BlobId], each: &mut dyn FnMut(&BlobId, ChosenCopy)) -> Result<()> {
        self.lookup_sorted(ids, each)
    }
}

/// Check's index read from the index files, with the damage known at the check's start.
pub(super) struct IndexCopies<'a> {
    pub index: &'a Index,
    pub damage: &'a KnownDamage,
}

impl Copies for IndexCopies<'_> {
    fn copies_sorted(&self, ids: &[BlobId], each: &mut dyn FnMut(&BlobId, ChosenCopy)) -> Result<()> {
        for id in ids {
            let intact = self.index.copies(id).find(|(pack, _)| !self.damage.at(pack, id)).map(|c| (c, true));
            let copy = intact.or_else(|| self.index.first_copy(id).map(|c| (c, false)));
            each(id, copy.map(|((pack, entry), intact)| (BlobLocation { pack, entry }, intact)));
        }
        Ok(())
    }
}

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

/// The state of each of `snapshots` (in the same order), given when each pack was last verified.
pub fn snapshot_states(
    repo: &Repository,
    cache: &IndexCache,
    snapshots: &[&Snapshot],
    last_verified: &HashMap<ObjectId, i64>,
) -> Result<Vec<SnapshotState>> {
    let SegmentWalk { packs, needs } = segment_needs(repo, cache, snapshots)?;
    let mut wanted = vec![false; packs.ids.len()];
    let states = snapshots
        .iter()
        .map(|snap| {
            wanted.iter_mut().for_each(|w| *w = false);
            let mut state = SnapshotState::default();
            for seg in snap.disks.iter().flat_map(segment_uses) {
                let need = &needs[&seg];
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

/// The packs a restore of `snapshots` reads (damaged copies' too: a check reading them judges them again), and
/// how many blocks of each snapshot it cannot read.
pub(super) fn packs_needed(
    repo: &Repository,
    copies: &dyn Copies,
    snapshots: &[&Snapshot],
) -> Result<(HashSet<ObjectId>, Vec<u64>)> {
    let SegmentWalk { packs, needs } = segment_needs(repo, copies, snapshots)?;
    let used: HashSet<u32> = needs.values().flat_map(|n| n.packs.iter().copied()).collect();
    let damaged = snapshots
        .iter()
        .map(|s| s.disks.iter().flat_map(segment_uses).map(|seg| needs[&seg].damaged_blocks).sum())
        .collect();
    Ok((used.into_iter().map(|p| packs.ids[p as usize]).collect(), damaged))
}

/// What one manifest segment needs: the packs a restore reads for it (its own copy's, its blocks' and their
/// delta bases'), as numbers of [`PackNumbers`], and how many of its blocks cannot be read.
struct SegmentNeeds {
    packs: Vec<u32>,
    damaged_blocks: u64,
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
            u32::try_from(self.ids.len() - 1).ok().filter(|&n| n != NO_PACK).expect("fewer than 2^32 - 1 packs")
        })
    }
}

/// What each distinct use of a segment by some snapshots' disks needs.
struct SegmentWalk {
    packs: PackNumbers,
    needs: HashMap<SegmentUse, SegmentNeeds>,
}

/// What each distinct segment of `snapshots` needs. Incrementals share the segments of unchanged ranges: each
/// is read once to gather the blocks, whose copies are then looked up in one pass in id order, and once more to
/// attribute them. (Looked up segment by segment, each id took a seek of the cache: 61 s for the 10 snapshots of
/// a 3-million-block repository; in batches of segments, each batch walked the whole cache: 8 s; so, 3 s.)
fn segment_needs(repo: &Repository, copies: &dyn Copies, snapshots: &[&Snapshot]) -> Result<SegmentWalk> {
    let mut distinct: Vec<SegmentUse> = snapshots.iter().flat_map(|s| s.disks.iter().flat_map(segment_uses)).collect();
    distinct.sort_unstable();
    distinct.dedup();
    let read = |seg: &SegmentUse| -> Result<(ChosenCopy, Result<Vec<BlobId>>)> {
        let mut copy = None;
        copies.copies_sorted(std::slice::from_ref(&seg.id), &mut |_, c| copy = c)?;
        Ok((copy, read_segment(repo, copy.map(|(loc, _)| loc), &seg.segment())))
    };
    // The distinct blocks (incrementals repeat most of them). The first segments read are kept for the second
    // pass, up to a bound: those of a few large disks (a 2 TiB disk has 512, of 128 KiB each) are then read once.
    let mut ids: Distinct<BlobId> = Distinct::default();
    let mut kept = Vec::new();
    let mut kept_blocks = 0;
    crate::util::fetch_in_order(&distinct, read, |seg, r| {
        let (copy, seg_ids) = r?;
        if let Ok(seg_ids) = &seg_ids {
            ids.extend(seg_ids.iter().filter(|id| !id.is_zero_block()).copied());
        }
        // A prefix of `distinct`: from the first segment beyond the bound, none is kept.
        kept_blocks += seg.blocks as usize;
        if kept_blocks <= KEPT_SEGMENT_BLOCKS {
            kept.push((copy, seg_ids));
        }
        Ok(())
    })?;
    let mut packs = PackNumbers::default();
    let blocks = BlockCopies::look_up(copies, ids.into_sorted(), &mut packs)?;
    let mut needs = HashMap::with_capacity(distinct.len());
    let mut attribute = |seg: &SegmentUse, (copy, ids): (ChosenCopy, Result<Vec<BlobId>>)| -> Result<()> {
        let segment_pack = copy.map(|(loc, _)| packs.number(loc.pack));
        let need = match ids {
            Ok(ids) => blocks.needs(&ids, seg, segment_pack),
            // What restore could not read either: every block of the segment is lost to it.
            Err(Error::Missing { .. } | Error::Corrupt { .. }) => {
                SegmentNeeds { packs: segment_pack.into_iter().collect(), damaged_blocks: seg.blocks as u64 }
            }
            Err(e) => return Err(e),
        };
        needs.insert(*seg, need);
        Ok(())
    };
    let (first, rest) = distinct.split_at(kept.len());
    for (seg, read) in first.iter().zip(kept) {
        attribute(seg, read)?;
    }
    crate::util::fetch_in_order(rest, read, |seg, r| attribute(seg, r?))?;
    Ok(SegmentWalk { packs, needs })
}

/// The block ids of segments kept between the passes of [`segment_needs`] (32 bytes each: 64 MiB).
const KEPT_SEGMENT_BLOCKS: usize = 2 << 20;

/// The copies a restore reads for each of some distinct blocks: their packs' numbers (and their delta bases'),
/// and whether the block can be read.
struct BlockCopies {
    /// Sorted.
    ids: Vec<BlobId>,
    copies: Vec<BlockCopy>,
    /// Where the ids of each value of their heads' first bits are.
    buckets: HeadBuckets,
}

/// A block's copy: 16 bytes, where `Option`s for the pack numbers took 24 (72 MB at 3 million blocks).
#[derive(Clone, Copy)]
struct BlockCopy {
    /// The numbers of the packs of its copy and of its delta base's copy, [`NO_PACK`] where no index lists one.
    pack: u32,
    base_pack: u32,
    readable: bool,
    /// The blob's length, which must be its block's: restores refuse to cut or pad a block.
    len: u32,
}

/// No pack: [`PackNumbers`] numbers fewer packs than this.
const NO_PACK: u32 = u32::MAX;

impl BlockCopies {
    /// Looks up `ids` (sorted, distinct) and their delta bases.
    fn look_up(copies: &dyn Copies, ids: Vec<BlobId>, packs: &mut PackNumbers) -> Result<BlockCopies> {
        let mut found = vec![BlockCopy { pack: NO_PACK, base_pack: NO_PACK, readable: false, len: 0 }; ids.len()];
        // Delta blobs, by base: a delta whose base cannot be read cannot be either.
        let mut bases: Vec<(BlobId, usize)> = Vec::new();
        let mut at = 0;
        copies.copies_sorted(&ids, &mut |_, copy| {
            if let Some((loc, intact)) = copy {
                let pack = packs.number(loc.pack);
                found[at] = BlockCopy { pack, base_pack: NO_PACK, readable: intact, len: loc.entry.raw_len };
                bases.extend(loc.entry.base.map(|b| (b, at)));
            }
            at += 1;
        })?;
        bases.sort_unstable();
        let mut base_ids: Vec<BlobId> = bases.iter().map(|(b, _)| *b).collect();
        base_ids.dedup();
        let mut next = 0;
        copies.copies_sorted(&base_ids, &mut |id, copy| {
            while let Some(&(_, delta)) = bases.get(next).filter(|(b, _)| b == id) {
                let f = &mut found[delta];
                f.base_pack = copy.map_or(NO_PACK, |(loc, _)| packs.number(loc.pack));
                f.readable &= copy.is_some_and(|(_, intact)| intact);
                next += 1;
            }
        })?;
        Ok(BlockCopies::new(ids, found))
    }

    fn new(ids: Vec<BlobId>, copies: Vec<BlockCopy>) -> BlockCopies {
        let buckets = HeadBuckets::new(ids.iter().map(BlobId::head), ids.len());
        BlockCopies { ids, copies, buckets }
    }

    /// Where `id` is among the sorted ids.
    fn position(&self, id: &BlobId) -> Option<usize> {
        let range = self.buckets.range(id.head());
        self.ids[range.clone()].binary_search(id).ok().map(|i| range.start + i)
    }

    /// What segment `seg` (stored in the pack numbered `segment_pack`) holding block ids `ids` needs.
    fn needs(&self, ids: &[BlobId], seg: &SegmentUse, segment_pack: Option<u32>) -> SegmentNeeds {
        let mut packs: Vec<u32> = segment_pack.into_iter().collect();
        let mut damaged_blocks = 0;
        for (j, id) in ids.iter().enumerate().filter(|(_, id)| !id.is_zero_block()) {
            let Some(copy) = self.position(id).map(|i| self.copies[i]) else {
                damaged_blocks += 1;
                continue;
            };
            packs.extend([copy.pack, copy.base_pack].into_iter().filter(|&p| p != NO_PACK));
            damaged_blocks += (!copy.readable || copy.len != seg.block_len(j)) as u64;
        }
        packs.sort_unstable();
        packs.dedup();
        SegmentNeeds { packs, damaged_blocks }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copies_of(ids: &[BlobId]) -> BlockCopies {
        let mut ids = ids.to_vec();
        ids.sort_unstable();
        ids.dedup();
        let copies = vec![BlockCopy { pack: NO_PACK, base_pack: NO_PACK, readable: true, len: 0 }; ids.len()];
        BlockCopies::new(ids, copies)
    }

    #[test]
    fn positions_are_found_whether_ids_are_spread_evenly_or_not() {
        let hash = |i: u32| BlobId(*blake3::hash(&i.to_le_bytes()).as_bytes());
        // Hashes (evenly spread), and ids crowded at the start, at the end and in one place.
        let even: Vec<BlobId> = (0..5000).map(hash).collect();
        let crowded: Vec<BlobId> = (0..3000u32)
            .map(|i| {
                let mut id = hash(i);
                id.0[..7].fill([0x00, 0xff, 0x80][i as usize % 3]);
                id
            })
            .collect();
        for ids in [even, crowded] {
            let (present, absent) = ids.split_at(ids.len() / 2);
            let c = copies_of(present);
            for id in present {
                assert_eq!(c.position(id).map(|i| c.ids[i]), Some(*id));
            }
            assert!(absent.iter().all(|id| c.position(id).is_none()));
        }
        assert_eq!(copies_of(&[]).position(&hash(1)), None);
    }
}
