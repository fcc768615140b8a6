//! What a restore of snapshots reads: the packs of the copies it takes (`check --snapshot` reads those), and
//! how recently each snapshot was verified byte for byte (`snapshots --verified`, as Proxmox Backup Server
//! shows a verify state per snapshot).
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
use crate::format::snapshot::{SegmentRef, Snapshot};
use crate::format::{BlobId, ObjectId};
use crate::repository::Repository;

use super::index::Index;

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

/// The packs a restore of `snapshots` reads (damaged copies' too: a check reading them judges them again).
pub(super) fn packs_needed(
    repo: &Repository,
    copies: &dyn Copies,
    snapshots: &[&Snapshot],
) -> Result<HashSet<ObjectId>> {
    let SegmentWalk { packs, needs } = segment_needs(repo, copies, snapshots)?;
    let used: HashSet<u32> = needs.values().flat_map(|n| n.packs.iter().copied()).collect();
    Ok(used.into_iter().map(|p| packs.ids[p as usize]).collect())
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
            (self.ids.len() - 1) as u32
        })
    }
}

/// What each distinct segment of some snapshots needs, by (id, block count).
struct SegmentWalk {
    packs: PackNumbers,
    needs: HashMap<(BlobId, u32), SegmentNeeds>,
}

/// What each distinct segment of `snapshots` needs. Incrementals share the segments of unchanged ranges: each
/// is read once.
fn segment_needs(repo: &Repository, copies: &dyn Copies, snapshots: &[&Snapshot]) -> Result<SegmentWalk> {
    let mut distinct: Vec<SegmentRef> =
        snapshots.iter().flat_map(|s| s.disks.iter().flat_map(|d| d.segments.iter().copied())).collect();
    distinct.sort_unstable_by_key(|seg| (seg.id, seg.blocks));
    distinct.dedup();
    let mut packs = PackNumbers::default();
    let mut needs = HashMap::with_capacity(distinct.len());
    crate::util::fetch_in_order(
        &distinct,
        |seg| -> Result<(ChosenCopy, Result<Vec<BlobId>>)> {
            let mut copy = None;
            copies.copies_sorted(std::slice::from_ref(&seg.id), &mut |_, c| copy = c)?;
            Ok((copy, read_segment(repo, copy.map(|(loc, _)| loc), seg)))
        },
        |seg, read| {
            let (copy, ids) = read?;
            let segment_pack = copy.map(|(loc, _)| loc.pack);
            let need = match ids {
                Ok(ids) => blocks_needs(copies, &ids, &mut packs, segment_pack)?,
                // What restore could not read either: every block of the segment is lost to it.
                Err(Error::Missing { .. } | Error::Corrupt { .. }) => SegmentNeeds {
                    packs: segment_pack.into_iter().map(|p| packs.number(p)).collect(),
                    damaged_blocks: seg.blocks as u64,
                },
                Err(e) => return Err(e),
            };
            needs.insert((seg.id, seg.blocks), need);
            Ok(())
        },
    )?;
    Ok(SegmentWalk { packs, needs })
}

/// What a segment (stored in `segment_pack`) holding block ids `ids` needs.
fn blocks_needs(
    copies: &dyn Copies,
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
    copies.copies_sorted(&sorted, &mut |id, copy| {
        let Some((loc, intact)) = copy else { return lost.push(*id) };
        found.push(loc.pack);
        if !intact {
            lost.push(*id);
        }
        if let Some(base) = loc.entry.base {
            bases.push((base, *id));
        }
    })?;
    bases.sort_unstable();
    let mut base_ids: Vec<BlobId> = bases.iter().map(|(b, _)| *b).collect();
    base_ids.dedup();
    let mut lost_bases: Vec<BlobId> = Vec::new();
    copies.copies_sorted(&base_ids, &mut |id, copy| {
        let Some((loc, intact)) = copy else { return lost_bases.push(*id) };
        found.push(loc.pack);
        if !intact {
            lost_bases.push(*id);
        }
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
