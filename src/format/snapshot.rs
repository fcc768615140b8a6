//! Snapshots: the immutable manifest of one backup of a source (a VM, or a set of image files), one entry per
//! disk. A disk's blocks are listed in segments: metadata blobs of up to [`SEGMENT_BLOCKS`] block ids, stored
//! content-addressed like data, so an incremental writes only the segments whose blocks changed.
//!
//! The payload is the bincode encoding (format-spec/encoding.md) of [`Snapshot`] inside the envelope (kind 3).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{bincode_decode, bincode_encode, BlobId, ObjectId, BLOCK_SIZE, SEGMENT_BLOCKS};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    /// Seconds since the Unix epoch, and the nanoseconds within that second.
    pub time_secs: i64,
    pub time_nanos: u32,
    pub hostname: String,
    pub username: String,
    /// The group this snapshot belongs to: the VM's name, or the `--name` given to the backup.
    pub source: String,
    pub tags: Vec<String>,
    /// The snapshot this one was built on (its unchanged blocks were inherited from it).
    pub parent: Option<ObjectId>,
    pub disks: Vec<DiskManifest>,
    /// Free-form facts about the source (for example the VM configuration as JSON under `vm.config`).
    pub annotations: BTreeMap<String, String>,
    pub summary: Summary,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskManifest {
    /// The disk's name inside the snapshot (unique there), e.g. `disk0` or a file name.
    pub name: String,
    /// What was read: `file`, `vddk`, `nbd`.
    pub source_kind: String,
    /// Path, URL or datastore path of the source.
    pub source_path: String,
    pub capacity: u64,
    pub block_size: u32,
    /// Change-tracking token the next incremental starts from (VMware changeId, dirty bitmap name).
    pub change_token: Option<String>,
    pub segments: Vec<SegmentRef>,
    pub stats: DiskStats,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SegmentRef {
    pub id: BlobId,
    pub blocks: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Blocks read from the source.
    pub blocks_read: u64,
    /// Blocks taken unchanged from the parent without reading them.
    pub blocks_inherited: u64,
    /// All-zero blocks (read or skipped as unallocated).
    pub zero_blocks: u64,
    /// Blocks that were new to the repository.
    pub new_blocks: u64,
    /// Stored (compressed, encrypted) bytes of those new blocks.
    pub new_bytes_stored: u64,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub duration_ms: u64,
    pub bytes_read: u64,
    pub new_blobs: u64,
    /// Bytes of packs written by this backup (data and metadata).
    pub bytes_added: u64,
}

impl DiskManifest {
    pub fn block_count(&self) -> u64 {
        self.capacity.div_ceil(self.block_size as u64)
    }

    /// Structural checks a decoded manifest must pass before anything relies on it.
    pub fn validate(&self) -> Result<(), String> {
        if self.block_size != BLOCK_SIZE {
            return Err(format!("disk {}: block size {} is not supported", self.name, self.block_size));
        }
        let listed: u64 = self.segments.iter().map(|s| s.blocks as u64).sum();
        if listed != self.block_count() {
            return Err(format!(
                "disk {}: segments list {listed} blocks but a capacity of {} needs {}",
                self.name,
                self.capacity,
                self.block_count()
            ));
        }
        if self.segments.iter().any(|s| s.blocks == 0 || s.blocks as usize > SEGMENT_BLOCKS) {
            return Err(format!("disk {}: a segment has an invalid block count", self.name));
        }
        if self.segments.iter().rev().skip(1).any(|s| s.blocks as usize != SEGMENT_BLOCKS) {
            return Err(format!("disk {}: only the last segment may be partial", self.name));
        }
        Ok(())
    }
}

/// The annotation of a snapshot whose tags `tag` changed: the id (hex) the snapshot was first written under.
pub const ORIGINAL: &str = "original";

impl Snapshot {
    /// What stays the same of snapshot `id` when `tag` rewrites it under a new id: the id it was first written
    /// under (`copy` knows its copies by this).
    pub fn identity(&self, id: &ObjectId) -> ObjectId {
        self.annotations.get(ORIGINAL).and_then(|h| BlobId::from_hex(h)).unwrap_or(*id)
    }

    /// The snapshot's time in seconds since the Unix epoch, with its fraction.
    pub fn unix_time(&self) -> f64 {
        self.time_secs as f64 + self.time_nanos as f64 / 1e9
    }

    pub fn encode(&self) -> Vec<u8> {
        bincode_encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Snapshot, String> {
        let s: Snapshot = bincode_decode(bytes)?;
        for d in &s.disks {
            d.validate()?;
        }
        check_disks_and_time(s.disks.iter().map(|d| d.name.as_str()), s.time_nanos)?;
        Ok(s)
    }

    pub fn disk(&self, name: &str) -> Option<&DiskManifest> {
        self.disks.iter().find(|d| d.name == name)
    }
}

/// Rules a snapshot and a checkpoint share: disk names are unique, the nanoseconds below one second.
pub(crate) fn check_disks_and_time<'a>(names: impl Iterator<Item = &'a str>, time_nanos: u32) -> Result<(), String> {
    let mut names: Vec<&str> = names.collect();
    names.sort_unstable();
    if names.windows(2).any(|w| w[0] == w[1]) {
        return Err("two disks have the same name".into());
    }
    if time_nanos >= 1_000_000_000 {
        return Err("invalid time".into());
    }
    Ok(())
}

/// The block ids a segment blob holds, 32 bytes each (callers check the blob's length against the manifest).
pub fn segment_ids(plain: &[u8]) -> Vec<BlobId> {
    plain.chunks_exact(32).map(|c| BlobId(c.try_into().expect("32-byte chunk"))).collect()
}
