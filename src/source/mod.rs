//! Disk sources: what a backup reads. A source knows its capacity, reads at offsets, and may know which
//! ranges are allocated (for full backups) — raw image files and block devices here; VDDK, NBD and the
//! snapshots of another repository (`copy`) implement the same trait.
//!
//! Change information (VMware's changed areas, NBD dirty bitmaps) arrives as [`Extent`] lists and is turned
//! into block ranges by [`BlockRanges`], the one place that maps bytes to 1 MiB blocks.

pub mod changes;
pub mod file;
pub mod nbd;
pub mod snapshot;
pub mod vddk;

use std::ops::Range;

use crate::error::Result;
use crate::util::AlignedBuf;

/// A byte range of a disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Extent {
    pub start: u64,
    pub length: u64,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
}

pub trait DiskSource: Send {
    /// `file`, `vddk`, `nbd`: recorded in the manifest.
    fn kind(&self) -> &'static str;
    /// Path or URL, for the manifest and messages.
    fn describe(&self) -> String;
    fn capacity(&self) -> u64;
    /// Fills `buf` from `offset`: every byte, since `buf` may hold an earlier block (buffers are reused).
    /// `offset + buf.len()` never exceeds the capacity.
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// Makes `buf` the `len` bytes at `offset`: read into it, or exchanged for a buffer the source has already
    /// filled (which saves a copy of every block).
    fn read_block(&mut self, offset: u64, len: usize, buf: &mut AlignedBuf) -> Result<()> {
        buf.resize(len);
        self.read_at(offset, buf)
    }
    /// The allocated (possibly non-zero) ranges, or `None` if the source cannot tell (read everything).
    fn allocated(&mut self) -> Result<Option<Vec<Extent>>>;
    /// The byte ranges changed since the previous backup, when the source tracks them itself (an NBD dirty
    /// bitmap); `None` when it does not.
    fn changed(&mut self) -> Result<Option<Vec<Extent>>> {
        Ok(None)
    }
    /// Told once, before the first [`DiskSource::read_at`], which blocks the backup will read, in order:
    /// sources with latency read ahead.
    fn will_read(&mut self, _blocks: &BlockRanges, _block_size: u64) {}
    /// A likely plan known early (the blocks a change list names, before the repository is unlocked): a
    /// source may start fetching them. [`DiskSource::will_read`] still comes with the real plan.
    fn hint_reads(&mut self, _blocks: &BlockRanges, _block_size: u64) {}
    /// How the block just read at `offset` is stored in the repository this source reads from (`copy`), for the
    /// backup to seal as it is instead of compressing the block again; `None` for other sources.
    fn stored_form(&mut self, _offset: u64) -> Option<crate::format::pack::StoredForm> {
        None
    }
}

/// How to reach network sources.
#[derive(Clone, Default)]
pub struct SourceOptions {
    pub nbd: nbd::NbdOptions,
    pub vddk: vddk::VddkOptions,
}

/// Opens a disk source: an NBD URI (`nbd://`, `nbd+unix://`, `nbds://`, `nbds+unix://`), a VMware disk
/// (`vddk://`), or a raw image file or block device path.
pub fn open(spec: &str, options: &SourceOptions) -> Result<Box<dyn DiskSource>> {
    if is_nbd_uri(spec) {
        Ok(Box::new(nbd::NbdSource::open(spec, &options.nbd)?))
    } else if spec.starts_with("vddk://") {
        Ok(Box::new(vddk::VddkSource::open(spec, &options.vddk)?))
    } else {
        Ok(Box::new(file::FileSource::open(std::path::Path::new(spec))?))
    }
}

pub fn is_nbd_uri(spec: &str) -> bool {
    ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"].iter().any(|p| spec.starts_with(p))
}

/// A backup's planned reads in order, as (sequence number, byte offset, length): what sources that read ahead
/// (NBD, VDDK) walk.
pub(crate) struct PlannedReads {
    ranges: Vec<Range<u64>>,
    range: usize,
    next_block: u64,
    block_size: u64,
    capacity: u64,
    seq: u64,
}

impl PlannedReads {
    pub(crate) fn new(ranges: Vec<Range<u64>>, block_size: u64, capacity: u64) -> Self {
        PlannedReads { ranges, range: 0, next_block: 0, block_size, capacity, seq: 0 }
    }

    pub(crate) fn next(&mut self) -> Option<(u64, u64, u32)> {
        while self.range < self.ranges.len() {
            let r = &self.ranges[self.range];
            let b = self.next_block.max(r.start);
            if b < r.end {
                self.next_block = b + 1;
                let offset = b * self.block_size;
                let len = self.block_size.min(self.capacity - offset) as u32;
                self.seq += 1;
                return Some((self.seq - 1, offset, len));
            }
            self.range += 1;
        }
        None
    }
}

/// Sorted, non-overlapping ranges of block indices.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockRanges(Vec<Range<u64>>);

impl BlockRanges {
    pub fn all(blocks: u64) -> Self {
        let mut r = BlockRanges::default();
        r.add(0..blocks);
        r
    }

    /// The blocks touched by `extents` (which must lie within the disk; see [`changes::validate`]).
    pub fn from_extents(extents: &[Extent], block_size: u64) -> Self {
        let ranges =
            extents.iter().filter(|e| e.length > 0).map(|e| e.start / block_size..(e.end() - 1) / block_size + 1);
        BlockRanges(merge(ranges.collect()))
    }

    /// Adds the blocks `range`.
    pub fn add(&mut self, range: Range<u64>) {
        self.add_all([range]);
    }

    /// Adds the blocks of every range (one merge for all of them).
    pub fn add_all(&mut self, ranges: impl IntoIterator<Item = Range<u64>>) {
        let mut v = std::mem::take(&mut self.0);
        v.extend(ranges.into_iter().filter(|r| !r.is_empty()));
        self.0 = merge(v);
    }

    pub fn ranges(&self) -> &[Range<u64>] {
        &self.0
    }

    pub fn block_count(&self) -> u64 {
        self.0.iter().map(|r| r.end - r.start).sum()
    }

    /// Block indices in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().flat_map(|r| r.clone())
    }

    /// Whether block `i` is in the set.
    pub fn contains(&self, i: u64) -> bool {
        let k = self.0.partition_point(|r| r.end <= i);
        k < self.0.len() && self.0[k].start <= i
    }

    /// A cursor for in-order membership tests (the assembler walks blocks in order).
    pub fn cursor(&self) -> BlockCursor<'_> {
        BlockCursor { ranges: &self.0, pos: 0 }
    }
}

/// Sorts ranges and merges overlapping or touching ones.
fn merge(mut ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    ranges.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match merged.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => merged.push(r),
        }
    }
    merged
}

pub struct BlockCursor<'a> {
    ranges: &'a [Range<u64>],
    pos: usize,
}

impl BlockCursor<'_> {
    /// Whether block `i` is in the set; `i` must not decrease between calls.
    pub fn contains(&mut self, i: u64) -> bool {
        while self.pos < self.ranges.len() && self.ranges[self.pos].end <= i {
            self.pos += 1;
        }
        self.pos < self.ranges.len() && self.ranges[self.pos].start <= i
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_to_blocks() {
        let mb = 1u64 << 20;
        let e = [
            Extent { start: 0, length: 1 },
            Extent { start: mb - 1, length: 2 },
            Extent { start: 5 * mb, length: mb },
            Extent { start: 9 * mb + 7, length: 0 },
        ];
        let r = BlockRanges::from_extents(&e, mb);
        assert_eq!(r.ranges(), &[0..2, 5..6]);
        let mut c = r.cursor();
        let inside: Vec<u64> = (0..8).filter(|&i| c.contains(i)).collect();
        assert_eq!(inside, vec![0, 1, 5]);
        let inside: Vec<u64> = (0..8).rev().filter(|&i| r.contains(i)).collect();
        assert_eq!(inside, vec![5, 1, 0], "in any order");
        let mut r2 = r.clone();
        r2.add(6..8);
        assert_eq!(r2.ranges(), &[0..2, 5..8]);
        assert_eq!(r2.block_count(), 5);
    }
}
