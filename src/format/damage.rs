//! Damage records (`damaged/<id>`): blobs found damaged or lost (by `check`, a restore, `serve`, a backup), each
//! in the pack where it was found.
//! Backups do not deduplicate against such a copy (they store the block again) and readers take another copy of
//! the blob where the index lists one. See `format-spec/README.md` §8d.
//!
//! Payload (inside the envelope, kind 10): `count u32 ‖ count × (pack id ‖ blob id)`, sorted, unique.

use super::{BlobId, ObjectId, Reader};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DamageRecord {
    /// (pack, blob): the copy of `blob` stored in `pack` is damaged or lost. Sorted, unique.
    pub entries: Vec<(ObjectId, BlobId)>,
}

impl DamageRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.entries.len() * 64);
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (pack, blob) in &self.entries {
            out.extend_from_slice(&pack.0);
            out.extend_from_slice(&blob.0);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<DamageRecord, String> {
        let mut r = Reader::new(bytes);
        let n = r.u32()? as usize;
        if n.saturating_mul(64) != r.remaining() {
            return Err(format!("claims {n} entries but holds {} bytes of entries", r.remaining()));
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            entries.push((r.id()?, r.id()?));
        }
        if !entries.windows(2).all(|w| w[0] < w[1]) {
            return Err("entries are not sorted and unique".into());
        }
        Ok(DamageRecord { entries })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_unsorted_entries_are_refused() {
        let a = (BlobId([1; 32]), BlobId([2; 32]));
        let b = (BlobId([1; 32]), BlobId([3; 32]));
        let rec = DamageRecord { entries: vec![a, b] };
        let bytes = rec.encode();
        assert_eq!(bytes.len(), 4 + 128);
        assert_eq!(DamageRecord::decode(&bytes).unwrap(), rec);
        let swapped = DamageRecord { entries: vec![b, a] }.encode();
        assert!(DamageRecord::decode(&swapped).unwrap_err().contains("sorted"));
        assert!(DamageRecord::decode(&bytes[..bytes.len() - 1]).is_err());
    }
}
