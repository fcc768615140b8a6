//! Deletion records (`deletions/<id>`): packs a prune has taken out of the index and will delete once every
//! reader that might still use them has finished. See `format-spec/README.md` §9b for the protocol.
//!
//! Envelope kind 8, payload bincode of [`DeletionRecord`].

use serde::{Deserialize, Serialize};

use super::{bincode_decode, bincode_encode, ObjectId};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeletionRecord {
    /// The prune's clock when it wrote the record (informational only).
    pub created_secs: i64,
    pub hostname: String,
    /// Packs to delete, sorted.
    pub packs: Vec<ObjectId>,
    /// Snapshots that existed when the prune marked what is in use, sorted. Snapshots not listed here are
    /// newer and are searched for references to the packs before they are deleted.
    pub snapshots: Vec<ObjectId>,
    /// Index files whose content the prune accounted for (written by it, or left as they were), sorted.
    /// Segment blobs listed by other index files are newer and are searched for references too.
    pub index_files: Vec<ObjectId>,
    /// Session markers (`locks/session-…`) that existed after the index was rewritten: the packs are deleted
    /// only once all of them have ended.
    pub sessions: Vec<String>,
    /// True once every session has ended and nothing newer references the packs: only object-lock retention
    /// can still hold them back.
    pub released: bool,
}

impl DeletionRecord {
    pub fn encode(&self) -> Vec<u8> {
        bincode_encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<DeletionRecord, String> {
        let r: DeletionRecord = bincode_decode(bytes)?;
        if !r.packs.windows(2).all(|w| w[0] < w[1]) {
            return Err("pack ids are not sorted and unique".into());
        }
        Ok(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::BlobId;

    #[test]
    fn bytes_are_as_the_spec_says() {
        let r = DeletionRecord {
            created_secs: 5,
            hostname: "h".into(),
            packs: vec![BlobId([1; 32]), BlobId([2; 32])],
            snapshots: vec![],
            index_files: vec![BlobId([3; 32])],
            sessions: vec!["s".into()],
            released: true,
        };
        let mut want = Vec::new();
        want.extend_from_slice(&5i64.to_le_bytes());
        want.extend_from_slice(&1u64.to_le_bytes());
        want.push(b'h');
        want.extend_from_slice(&2u64.to_le_bytes());
        want.extend_from_slice(&[1; 32]);
        want.extend_from_slice(&[2; 32]);
        want.extend_from_slice(&0u64.to_le_bytes());
        want.extend_from_slice(&1u64.to_le_bytes());
        want.extend_from_slice(&[3; 32]);
        want.extend_from_slice(&1u64.to_le_bytes());
        want.extend_from_slice(&1u64.to_le_bytes());
        want.push(b's');
        want.push(1);
        assert_eq!(r.encode(), want);
        assert_eq!(DeletionRecord::decode(&want).unwrap(), r);
        // Unsorted pack ids are refused.
        let bad = DeletionRecord { packs: vec![BlobId([2; 32]), BlobId([1; 32])], ..r };
        assert!(DeletionRecord::decode(&bad.encode()).is_err());
    }
}
