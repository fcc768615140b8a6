//! A disk of a snapshot in another repository, as a backup source (`copy`): reads go through serve's
//! [`SnapshotDisk`], which fetches, decrypts and decompresses blobs with read-ahead.
//!
//! Once the backup says which blocks it will read, a thread fetches them a little ahead of the reader, so
//! fetching and decompressing overlap with the reading thread and the pipeline behind it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::Result;
use crate::format::snapshot::DiskManifest;
use crate::nbd::server::Device;
use crate::serve::SnapshotDisk;

use super::{BlockRanges, DiskSource, Extent};

/// How far (in blocks) the fetching thread may run ahead of the reader: with the disk's read-ahead on top,
/// what it fetched must still be in the blob cache when the reader gets there.
const LEAD_BLOCKS: u64 = 8;

pub struct SnapshotSource {
    disk: Arc<SnapshotDisk>,
    manifest: DiskManifest,
    allocated: Option<Vec<Extent>>,
    /// Blocks fetched per request (the disk's read-ahead), the step of the fetching thread.
    fetch_blocks: u64,
    /// The block the reader is at, and whether the fetching thread should stop.
    position: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    fetcher: Option<std::thread::JoinHandle<()>>,
}

impl SnapshotSource {
    /// `disk` reads `manifest`'s disk, fetching `fetch_blocks` blocks per request; `allocated` are its blocks
    /// that are not all-zero (from the manifest's block ids), the only ones a full copy reads (`None`: unknown,
    /// read all).
    pub fn new(disk: SnapshotDisk, manifest: DiskManifest, allocated: Option<Vec<Extent>>, fetch_blocks: u64) -> Self {
        SnapshotSource {
            disk: Arc::new(disk),
            manifest,
            allocated,
            fetch_blocks: fetch_blocks.max(1),
            position: Arc::default(),
            stop: Arc::default(),
            fetcher: None,
        }
    }
}

impl DiskSource for SnapshotSource {
    /// The original's kind: a copy records what the disk was first read from.
    fn kind(&self) -> &'static str {
        match self.manifest.source_kind.as_str() {
            "file" => "file",
            "vddk" => "vddk",
            "nbd" => "nbd",
            _ => "snapshot",
        }
    }

    fn describe(&self) -> String {
        self.manifest.source_path.clone()
    }

    fn capacity(&self) -> u64 {
        self.manifest.capacity
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.position.store(offset / self.manifest.block_size as u64, Ordering::Relaxed);
        self.disk.read(offset, buf)
    }

    fn allocated(&mut self) -> Result<Option<Vec<Extent>>> {
        Ok(self.allocated.clone())
    }

    fn will_read(&mut self, blocks: &BlockRanges, block_size: u64) {
        let ranges = blocks.ranges().to_vec();
        let (disk, position, stop) = (self.disk.clone(), self.position.clone(), self.stop.clone());
        let (step, capacity) = (self.fetch_blocks, self.manifest.capacity);
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
