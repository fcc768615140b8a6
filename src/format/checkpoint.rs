//! Checkpoints (`checkpoints/<id>`): how far a running VMware backup has come, so that a backup interrupted
//! after hours of reading continues where it stopped instead of reading the whole disk again
//! (format-spec §8c). Per disk, the first segments already assembled: their block ids as read from the VM
//! snapshot whose changeId the checkpoint records. The retry asks CBT what changed in that prefix since then.
//!
//! Envelope kind 9, payload the bincode encoding (format-spec §11) of [`Checkpoint`].

use serde::{Deserialize, Serialize};

use super::snapshot::{check_disks_and_time, SegmentRef, Snapshot};
use super::{bincode_decode, bincode_encode, ObjectId, BLOCK_SIZE, SEGMENT_BLOCKS};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// When the interrupted backup started: Unix seconds and the nanoseconds within that second.
    pub time_secs: i64,
    pub time_nanos: u32,
    pub hostname: String,
    pub username: String,
    /// The source (VM name) the backup was of.
    pub source: String,
    /// The interrupted backup's parent snapshot, by its identity ([`Snapshot::identity`]: the id it was first
    /// written under, which `tag` keeps; older checkpoints hold its id): its disks hold what
    /// the checkpoint's prefixes do not cover.
    pub parent: Option<ObjectId>,
    pub disks: Vec<CheckpointDisk>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointDisk {
    pub name: String,
    pub capacity: u64,
    pub block_size: u32,
    /// The change-tracking token of the content the segments describe (the VM snapshot's changeId).
    pub change_token: Option<String>,
    /// The disk's first segments (blocks `0 .. Σ blocks`), each whole except a last one that ends the disk.
    pub segments: Vec<SegmentRef>,
}

impl CheckpointDisk {
    /// How many of the disk's blocks the segments cover.
    pub fn blocks_done(&self) -> u64 {
        self.segments.iter().map(|s| s.blocks as u64).sum()
    }

    fn validate(&self) -> Result<(), String> {
        if self.block_size != BLOCK_SIZE {
            return Err(format!("disk {}: block size {} is not supported", self.name, self.block_size));
        }
        let blocks = self.capacity.div_ceil(self.block_size as u64);
        if self.blocks_done() > blocks {
            return Err(format!("disk {}: segments cover more blocks than the disk has", self.name));
        }
        for (k, s) in self.segments.iter().enumerate() {
            let last_of_disk = (k as u64 + 1) * SEGMENT_BLOCKS as u64 >= blocks;
            let want = if last_of_disk { blocks - k as u64 * SEGMENT_BLOCKS as u64 } else { SEGMENT_BLOCKS as u64 };
            if s.blocks as u64 != want {
                return Err(format!("disk {}: segment {k} holds {} blocks, not {want}", self.name, s.blocks));
            }
        }
        Ok(())
    }
}

impl Checkpoint {
    pub fn encode(&self) -> Vec<u8> {
        bincode_encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, String> {
        let c: Checkpoint = bincode_decode(bytes)?;
        for d in &c.disks {
            d.validate()?;
        }
        check_disks_and_time(c.disks.iter().map(|d| d.name.as_str()), c.time_nanos)?;
        Ok(c)
    }

    /// How many blocks the checkpoint covers, over all its disks.
    pub fn blocks_done(&self) -> u64 {
        self.disks.iter().map(CheckpointDisk::blocks_done).sum()
    }

    pub fn disk(&self, name: &str) -> Option<&CheckpointDisk> {
        self.disks.iter().find(|d| d.name == name)
    }

    /// What a checkpoint records of its backup's parent (`parent` above): its identity, which stays whatever
    /// `tag` does to it before the backup is continued.
    pub fn parent_ref(parent: Option<(&ObjectId, &Snapshot)>) -> Option<ObjectId> {
        parent.map(|(id, snapshot)| snapshot.identity(id))
    }

    /// Whether a backup whose parent would be `latest` (its source's latest snapshot, or none) continues this
    /// checkpoint: its `parent` names that snapshot, by its identity ([`Snapshot::identity`]) or, as older
    /// checkpoints do, by its id.
    pub fn continues_from(&self, latest: Option<(&ObjectId, &Snapshot)>) -> bool {
        match (self.parent, latest) {
            (None, None) => true,
            (Some(parent), Some((id, snapshot))) => parent == *id || parent == snapshot.identity(id),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::BlobId;

    fn disk(capacity: u64, segments: &[u32]) -> CheckpointDisk {
        CheckpointDisk {
            name: "disk1".into(),
            capacity,
            block_size: BLOCK_SIZE,
            change_token: Some("52 de/7".into()),
            segments: segments.iter().map(|&blocks| SegmentRef { id: BlobId([4; 32]), blocks }).collect(),
        }
    }

    fn checkpoint(d: CheckpointDisk) -> Checkpoint {
        Checkpoint {
            time_secs: 9,
            time_nanos: 1,
            hostname: "h".into(),
            username: "u".into(),
            source: "vm".into(),
            parent: None,
            disks: vec![d],
        }
    }

    #[test]
    fn a_checkpoint_continues_from_its_parent_also_after_a_retag() {
        let parent = BlobId([1; 32]);
        let mut c = checkpoint(disk(5 << 20, &[5]));
        assert!(c.continues_from(None));
        c.parent = Some(parent);
        let mut snapshot = crate::format::snapshot::Snapshot {
            time_secs: 1,
            time_nanos: 0,
            hostname: "h".into(),
            username: "u".into(),
            source: "vm".into(),
            tags: vec![],
            parent: None,
            disks: vec![],
            annotations: Default::default(),
            summary: Default::default(),
        };
        assert!(c.continues_from(Some((&parent, &snapshot))));
        assert!(!c.continues_from(None));
        let retagged = BlobId([2; 32]);
        assert!(!c.continues_from(Some((&retagged, &snapshot))), "another snapshot");
        snapshot.annotations.insert(crate::format::snapshot::ORIGINAL.into(), parent.hex());
        assert!(c.continues_from(Some((&retagged, &snapshot))), "the parent, tagged since");
        // A parent tagged before the backup that wrote the checkpoint, and again since: it is known by the id
        // it had first, which neither tag changed.
        c.parent = Checkpoint::parent_ref(Some((&retagged, &snapshot)));
        let again = BlobId([3; 32]);
        assert!(c.continues_from(Some((&again, &snapshot))), "the parent, tagged before and since");
        assert!(c.continues_from(Some((&retagged, &snapshot))), "the parent, tagged before only");
        assert!(!c.continues_from(Some((&again, &Snapshot { annotations: Default::default(), ..snapshot }))));
    }

    #[test]
    fn bytes_are_as_the_spec_says() {
        let c = checkpoint(disk(5 << 20, &[5]));
        let mut want = Vec::new();
        want.extend_from_slice(&9i64.to_le_bytes());
        want.extend_from_slice(&1u32.to_le_bytes());
        for s in ["h", "u", "vm"] {
            want.extend_from_slice(&(s.len() as u64).to_le_bytes());
            want.extend_from_slice(s.as_bytes());
        }
        want.push(0);
        want.extend_from_slice(&1u64.to_le_bytes());
        want.extend_from_slice(&5u64.to_le_bytes());
        want.extend_from_slice(b"disk1");
        want.extend_from_slice(&(5u64 << 20).to_le_bytes());
        want.extend_from_slice(&BLOCK_SIZE.to_le_bytes());
        want.push(1);
        want.extend_from_slice(&7u64.to_le_bytes());
        want.extend_from_slice(b"52 de/7");
        want.extend_from_slice(&1u64.to_le_bytes());
        want.extend_from_slice(&[4; 32]);
        want.extend_from_slice(&5u32.to_le_bytes());
        assert_eq!(c.encode(), want);
        assert_eq!(Checkpoint::decode(&want).unwrap(), c);
    }

    #[test]
    fn only_whole_leading_segments_are_accepted() {
        let four = SEGMENT_BLOCKS as u32;
        let big = 3 * SEGMENT_BLOCKS as u64 * BLOCK_SIZE as u64 - 1;
        for ok in [&[][..], &[four], &[four, four], &[four, four, four]] {
            assert!(Checkpoint::decode(&checkpoint(disk(big, ok)).encode()).is_ok(), "{ok:?}");
        }
        for bad in [&[four - 1][..], &[four, 7], &[four, four, four, 1], &[0]] {
            assert!(Checkpoint::decode(&checkpoint(disk(big, bad)).encode()).is_err(), "{bad:?}");
        }
        // The disk's own short last segment is whole.
        assert!(Checkpoint::decode(&checkpoint(disk(5 << 20, &[5])).encode()).is_ok());
        let mut two = checkpoint(disk(5 << 20, &[]));
        two.disks.push(two.disks[0].clone());
        assert!(Checkpoint::decode(&two.encode()).is_err());
    }
}
