//! A disk of a snapshot in another repository, as a backup source (`copy`): reads go through serve's
//! [`SnapshotDisk`], which fetches, decrypts and decompresses blobs with read-ahead.
//!
//! Once the backup says which blocks it will read, a thread fetches them a little ahead of the reader, so
//! fetching and decompressing overlap with the reading thread and the pipeline behind it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::nbd::server::Device;
use crate::serve::SnapshotDisk;

use super::{BlockRanges, DiskSource, Extent};

/// How far (in blocks) the fetching thread may run ahead of the reader: with the disk's read-ahead on top,
/// what it fetched must still be in the blob cache when the reader gets there.
const LEAD_BLOCKS: u64 = 8;

pub struct SnapshotSource {
    disk: Arc<SnapshotDisk>,
    allocated: Option<Vec<Extent>>,
    /// The block the reader is at, and whether the fetching thread should stop.
    position: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    fetcher: Option<std::thread::JoinHandle<()>>,
}

impl SnapshotSource {
    /// `allocated` are the blocks of `disk` that are not all-zero (from the manifest's block ids), the only ones
    /// a full copy reads (`None`: unknown, read all). The fetching thread steps by the disk's read-ahead.
    pub fn new(disk: SnapshotDisk, allocated: Option<Vec<Extent>>) -> Self {
        SnapshotSource {
            disk: Arc::new(disk),
            allocated,
            position: Arc::default(),
            stop: Arc::default(),
            fetcher: None,
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

    fn will_read(&mut self, blocks: &BlockRanges, block_size: u64) {
        let ranges = blocks.ranges().to_vec();
        let (disk, position, stop) = (self.disk.clone(), self.position.clone(), self.stop.clone());
        let (step, capacity) = (self.disk.readahead(), self.disk.manifest().capacity);
        let fetch = move || {
            for r in ranges {
                let mut block = r.start;
                while block < r.end {
                    // Polling: a block takes a millisecond or more to fetch and decompress.
                    while block >= position.load(Ordering::Relaxed) + LEAD_BLOCKS && !stop.load(Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let start = block * block_size;
                    let end = ((block + step).min(r.end) * block_size).min(capacity);
                    // Errors are the reader's to report, when it reads the block itself.
                    disk.prefetch(start, end - start);
                    block += step;
                }
            }
        };
        self.fetcher = std::thread::Builder::new().name("copy-fetch".into()).spawn(fetch).ok();
    }
}

impl Drop for SnapshotSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.fetcher.take() {
            let _ = t.join();
        }
    }
}
