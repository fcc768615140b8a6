//! A disk of a snapshot in another repository, as a backup source (`copy`): reads go through serve's
//! [`SnapshotDisk`], which fetches, decrypts and decompresses blobs with read-ahead.

use crate::error::Result;
use crate::format::snapshot::DiskManifest;
use crate::nbd::server::Device;
use crate::serve::SnapshotDisk;

use super::{DiskSource, Extent};

pub struct SnapshotSource {
    disk: SnapshotDisk,
    manifest: DiskManifest,
    allocated: Option<Vec<Extent>>,
}

impl SnapshotSource {
    /// `disk` reads `manifest`'s disk; `allocated` are its blocks that are not all-zero (from the manifest's
    /// block ids), the only ones a full copy reads (`None`: unknown, read all).
    pub fn new(disk: SnapshotDisk, manifest: DiskManifest, allocated: Option<Vec<Extent>>) -> Self {
        SnapshotSource { disk, manifest, allocated }
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
        self.disk.read(offset, buf)
    }

    fn allocated(&mut self) -> Result<Option<Vec<Extent>>> {
        Ok(self.allocated.clone())
    }
}
