//! `diff`: which blocks of a disk differ between two snapshots, from their manifests alone (no data is read).
//!
//! Block ids are content hashes, so equal ids are equal bytes; manifest segments with equal ids are equal
//! runs of 4096 block ids and are not even loaded. `copy` uses the same walk to read only what changed since
//! an earlier copied snapshot.

use crate::cache::IndexCache;
use crate::error::Result;
use crate::format::snapshot::DiskManifest;
use crate::format::{BlobId, SEGMENT_BLOCKS};
use crate::repository::Repository;
use crate::source::Extent;

/// Calls `each(block, old, new)` for every block whose id differs between `earlier` and `disk` (two versions
/// of a disk with the same block size), in block order. A block beyond one version's capacity counts as an
/// all-zero block of that version. Segments with equal ids are skipped unread.
pub fn for_changed_blocks(
    repo: &Repository,
    cache: &IndexCache,
    earlier: &DiskManifest,
    disk: &DiskManifest,
    mut each: impl FnMut(u64, BlobId, BlobId),
) -> Result<()> {
    // Only segments whose ids differ are read, several at a time (on S3 each read is a round trip).
    let differing: Vec<usize> = (0..earlier.segments.len().max(disk.segments.len()))
        .filter(|&k| match (earlier.segments.get(k), disk.segments.get(k)) {
            (Some(o), Some(n)) => o.id != n.id,
            _ => true,
        })
        .collect();
    let load = |seg: Option<&crate::format::snapshot::SegmentRef>| match seg {
        Some(s) => crate::backup::load_segment(repo, cache, s),
        None => Ok(Vec::new()),
    };
    let both = |&k: &usize| Ok::<_, crate::Error>((load(earlier.segments.get(k))?, load(disk.segments.get(k))?));
    crate::util::fetch_in_order(&differing, both, |&k, loaded| {
        let (old, new) = loaded?;
        let first = (k * SEGMENT_BLOCKS) as u64;
        for j in 0..old.len().max(new.len()) {
            let o = old.get(j).copied().unwrap_or(BlobId::ZERO);
            let n = new.get(j).copied().unwrap_or(BlobId::ZERO);
            if o != n {
                each(first + j as u64, o, n);
            }
        }
        Ok(())
    })
}

/// The extents of `disk` whose blocks are not all-zero: where it differs from an empty disk. `copy` reads
/// these of a full copy, `restore --target -` fetches them ahead.
pub fn allocated_extents(repo: &Repository, cache: &IndexCache, disk: &DiskManifest) -> Result<Vec<Extent>> {
    let bs = disk.block_size as u64;
    let mut allocated = Vec::new();
    let segments: Vec<(usize, &crate::format::snapshot::SegmentRef)> = disk.segments.iter().enumerate().collect();
    crate::util::fetch_in_order(
        &segments,
        |(_, seg)| crate::backup::load_segment(repo, cache, seg),
        |&(k, _), ids| {
            let first = (k * SEGMENT_BLOCKS) as u64;
            for (i, id) in ids?.iter().enumerate() {
                if !id.is_zero_block() {
                    let block = first + i as u64;
                    push_extent(&mut allocated, block_extent(block, bs, disk.capacity));
                }
            }
            Ok(())
        },
    )?;
    Ok(allocated)
}

/// How a disk changed between two snapshots.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct DiskDiff {
    pub name: String,
    pub block_size: u64,
    pub old_capacity: u64,
    pub new_capacity: u64,
    /// Blocks that hold data now and were all zeros (or beyond the disk) before.
    pub allocated_blocks: u64,
    /// Blocks that held data and are all zeros (or beyond the disk) now.
    pub zeroed_blocks: u64,
    /// Blocks that held data and hold other data now.
    pub rewritten_blocks: u64,
    /// The changed byte ranges of the newer disk (and beyond it, of the older), merged.
    pub extents: Vec<Extent>,
}

impl DiskDiff {
    pub fn changed_blocks(&self) -> u64 {
        self.allocated_blocks + self.zeroed_blocks + self.rewritten_blocks
    }

    pub fn changed_bytes(&self) -> u64 {
        self.extents.iter().map(|e| e.length).sum()
    }
}

/// Compares two versions of a disk. `None` if their block sizes differ (nothing is comparable then).
pub fn diff_disk(
    repo: &Repository,
    cache: &IndexCache,
    earlier: &DiskManifest,
    disk: &DiskManifest,
) -> Result<Option<DiskDiff>> {
    if earlier.block_size != disk.block_size {
        return Ok(None);
    }
    let bs = disk.block_size as u64;
    let end = earlier.capacity.max(disk.capacity);
    let mut d = DiskDiff {
        name: disk.name.clone(),
        block_size: bs,
        old_capacity: earlier.capacity,
        new_capacity: disk.capacity,
        ..Default::default()
    };
    for_changed_blocks(repo, cache, earlier, disk, |block, old, new| {
        match (old.is_zero_block(), new.is_zero_block()) {
            (true, _) => d.allocated_blocks += 1,
            (_, true) => d.zeroed_blocks += 1,
            _ => d.rewritten_blocks += 1,
        }
        push_extent(&mut d.extents, block_extent(block, bs, end));
    })?;
    Ok(Some(d))
}

/// The bytes of `block` (of `block_size`) on a disk that ends at `end`.
pub(crate) fn block_extent(block: u64, block_size: u64, end: u64) -> Extent {
    Extent { start: block * block_size, length: block_size.min(end - block * block_size) }
}

/// Appends `e` to `extents`, merging it with the last one when they touch.
pub(crate) fn push_extent(extents: &mut Vec<Extent>, e: Extent) {
    match extents.last_mut() {
        Some(last) if last.end() == e.start => last.length += e.length,
        _ => extents.push(e),
    }
}
