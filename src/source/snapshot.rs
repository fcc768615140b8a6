//! A disk of a snapshot in another repository, as a backup source (`copy`): reads go through serve's
//! [`SnapshotDisk`], which fetches, decrypts and decompresses blobs with read-ahead.
//!
//! Once the backup says which blocks it will read, fetching threads fetch them a little ahead of the reader, so
//! fetching and decompressing overlap with the reading thread and the pipeline behind it. They fetch the plan's
//! blocks in batches, wherever they lie on the disk: the changed blocks of an incremental copy are scattered
//! over the disk but mostly neighbours in the source's packs, so a batch is usually one ranged read (one GET
//! on S3) rather than one per block.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::nbd::server::Device;
use crate::serve::SnapshotDisk;

use super::{BlockRanges, DiskSource, Extent};

/// How many blocks a fetching thread fetches at a time. Together the fetching threads run at most one batch
/// each, plus one, ahead of the reader (in blocks of the plan): the next batch is claimed before the reader is
/// through the last one (else the reader would fetch blocks itself, one request each), and what was fetched
/// must still be in the blob cache (32 MiB for `copy` and `restore --target -`) when the reader gets there.
const FETCH_BATCH: usize = 8;

pub struct SnapshotSource {
    disk: Arc<SnapshotDisk>,
    allocated: Option<Vec<Extent>>,
    fetchers: usize,
    /// The block the reader is at, and whether the fetching threads should stop.
    position: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl SnapshotSource {
    /// `allocated` are the blocks of `disk` that are not all-zero (from the manifest's block ids), the only ones
    /// a full copy reads (`None`: unknown, read all). `fetchers` threads (at least one) fetch, decrypt and
    /// decompress the planned blocks ahead of the reader, in batches, each taking the next batch of the plan.
    pub fn new(disk: SnapshotDisk, allocated: Option<Vec<Extent>>, fetchers: usize) -> Self {
        SnapshotSource {
            disk: Arc::new(disk),
            allocated,
            fetchers: fetchers.max(1),
            position: Arc::default(),
            stop: Arc::default(),
            threads: Vec::new(),
        }
    }
}

impl DiskSource for SnapshotSource {
    /// The original's kind: a copy records what the disk was first read from.
    fn kind(&self) -> &'static str {
        match self.disk.manifest().source_kind.as_str() {
            "file" => "file",
            "vddk" => "vddk",
            "nbd" => "nbd",
            _ => "snapshot",
        }
    }

    fn describe(&self) -> String {
        self.disk.manifest().source_path.clone()
    }

    fn capacity(&self) -> u64 {
        self.disk.manifest().capacity
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.position.store(offset / self.disk.manifest().block_size as u64, Ordering::Relaxed);
        self.disk.read(offset, buf)
    }

    fn allocated(&mut self) -> Result<Option<Vec<Extent>>> {
        Ok(self.allocated.clone())
    }

    fn stored_form(&mut self, offset: u64) -> Option<crate::format::pack::StoredForm> {
        self.disk.stored_form(offset / self.disk.manifest().block_size as u64)
    }

    fn will_read(&mut self, blocks: &BlockRanges, _block_size: u64) {
        let ranks = Arc::new(Ranks::new(blocks));
        let planned = blocks.block_count();
        let lead = (self.fetchers as u64 + 1) * FETCH_BATCH as u64;
        // The rank (position in the plan) of the next batch to fetch.
        let next = Arc::new(AtomicU64::new(0));
        for i in 0..self.fetchers {
            let (disk, position, stop) = (self.disk.clone(), self.position.clone(), self.stop.clone());
            let (ranks, next) = (ranks.clone(), next.clone());
            let fetch = move || loop {
                let first = next.fetch_add(FETCH_BATCH as u64, Ordering::Relaxed);
                if first >= planned {
                    return;
                }
                // Polling: a block takes a millisecond or more to fetch and decompress.
                while first >= ranks.of(position.load(Ordering::Relaxed)) + lead && !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let end = (first + FETCH_BATCH as u64).min(planned);
                disk.prefetch_blocks((first..end).map(|rank| ranks.block_at(rank)));
            };
            match std::thread::Builder::new().name(format!("snapshot-fetch-{i}")).spawn(fetch) {
                Ok(t) => self.threads.push(t),
                // Fewer fetchers only cost speed: the reader fetches what none fetched.
                Err(e) => tracing::debug!("fetching thread: {e}"),
            }
        }
    }
}

/// The number of planned blocks before a block: how far along the plan the reader is.
struct Ranks(Vec<(std::ops::Range<u64>, u64)>);

impl Ranks {
    fn new(plan: &BlockRanges) -> Self {
        let mut before = 0;
        Ranks(
            plan.ranges()
                .iter()
                .map(|r| {
                    before += r.end - r.start;
                    (r.clone(), before - (r.end - r.start))
                })
                .collect(),
        )
    }

    /// The planned block of rank `rank` (which must be below the plan's block count).
    fn block_at(&self, rank: u64) -> u64 {
        let i = self.0.partition_point(|(_, before)| *before <= rank) - 1;
        let (r, before) = &self.0[i];
        r.start + (rank - before)
    }

    fn of(&self, block: u64) -> u64 {
        match self.0.partition_point(|(r, _)| r.start <= block) {
            0 => 0,
            i => {
                let (r, before) = &self.0[i - 1];
                before + block.min(r.end) - r.start
            }
        }
    }
}

impl Drop for SnapshotSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_count_the_planned_blocks_before_a_block_and_name_the_block_of_a_rank() {
        let mut plan = BlockRanges::default();
        plan.add_all([2..5, 10..11, 20..24]);
        let ranks = Ranks::new(&plan);
        let expected = [(0, 0), (2, 0), (3, 1), (5, 3), (9, 3), (10, 3), (11, 4), (20, 4), (23, 7), (24, 8), (99, 8)];
        for (block, rank) in expected {
            assert_eq!(ranks.of(block), rank, "block {block}");
        }
        assert_eq!(Ranks::new(&BlockRanges::default()).of(7), 0);
        let blocks: Vec<u64> = plan.iter().collect();
        for (rank, block) in blocks.iter().enumerate() {
            assert_eq!(ranks.block_at(rank as u64), *block, "rank {rank}");
        }
    }
}
