//! This host's record of the pack headers that `check` found to list exactly what the index lists
//! (`checked-headers` in the repository's cache directory, format-spec §12a).
//!
//! A pack's bytes never change under its name (the name is their hash), so a header once found to agree with
//! the index is not read again while the pack keeps its listed size and the index lists it the same way. On S3
//! every header read is a request (two for a header beyond the pack's last 16 KiB): a repository of a million
//! packs took a million round trips per check, for an answer that only a change of size or listing can alter. Bytes altered in place are what reading the
//! data finds (`--read-data`, or a subset, least recently verified first), as with restic, whose `check` reads
//! no headers at all.
//!
//! The record is a cache: a missing, damaged or foreign one only means every header is read.

use std::path::{Path, PathBuf};

use crate::format::index::IndexedPack;
use crate::format::pack::PackHeader;
use crate::format::{BlobId, ObjectId};

/// The record's file name in the repository's cache directory ([`crate::cache::repository_dir`]).
pub const FILE_NAME: &str = "checked-headers";
const MAGIC: &[u8; 16] = b"diskvault-hdrs-1";
/// Pack id, size, listing digest.
const RECORD_LEN: usize = 32 + 8 + 32;

/// What one pack's header was found to agree with: the pack's size and the digest of the index's listing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CheckedHeader {
    pub pack: ObjectId,
    pub size: u64,
    pub listing: [u8; 32],
}

/// The BLAKE3 hash of the header plaintext that the index's listing of `pack` describes (format-spec §6): equal
/// for a header that lists the same blobs in the same places, and different otherwise.
pub fn listing_digest(pack: &IndexedPack) -> [u8; 32] {
    let header = PackHeader { pack_type: pack.pack_type, entries: pack.entries.clone() };
    *blake3::hash(&header.encode()).as_bytes()
}

/// The packs whose headers an earlier check on this host found to agree with the index, sorted by pack id.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HeaderRecord {
    checked: Vec<CheckedHeader>,
}

impl HeaderRecord {
    /// Sorts `checked` by pack id; of two entries for one pack the later one given is kept.
    pub fn new(mut checked: Vec<CheckedHeader>) -> HeaderRecord {
        checked.reverse();
        checked.sort_by_key(|c| c.pack);
        checked.dedup_by_key(|c| c.pack);
        HeaderRecord { checked }
    }

    pub fn len(&self) -> usize {
        self.checked.len()
    }

    pub fn is_empty(&self) -> bool {
        self.checked.is_empty()
    }

    /// Whether the header of `pack` was found to agree with a listing of this digest while the pack had this
    /// size: then it still does.
    pub fn vouches_for(&self, pack: &ObjectId, size: u64, listing: &[u8; 32]) -> bool {
        match self.checked.binary_search_by_key(pack, |c| c.pack) {
            Ok(i) => self.checked[i].size == size && &self.checked[i].listing == listing,
            Err(_) => false,
        }
    }

    /// `MAGIC ‖ count (u64) ‖ count × (pack id ‖ size (u64) ‖ listing digest)`, by pack id ascending, then the
    /// BLAKE3 hash of all that (a torn or damaged file is not believed).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAGIC.len() + 8 + self.checked.len() * RECORD_LEN + 32);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&(self.checked.len() as u64).to_le_bytes());
        for c in &self.checked {
            out.extend_from_slice(&c.pack.0);
            out.extend_from_slice(&c.size.to_le_bytes());
            out.extend_from_slice(&c.listing);
        }
        let sum = blake3::hash(&out);
        out.extend_from_slice(sum.as_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<HeaderRecord, String> {
        let body_len = bytes.len().checked_sub(32).ok_or("shorter than its checksum")?;
        let (body, sum) = bytes.split_at(body_len);
        if blake3::hash(body).as_bytes() != sum {
            return Err("its checksum does not match (torn or damaged)".into());
        }
        let rest = body.strip_prefix(MAGIC.as_slice()).ok_or("not a record of checked pack headers")?;
        let (count, records) = rest.split_at_checked(8).ok_or("no record count")?;
        let count = u64::from_le_bytes(count.try_into().expect("8 bytes"));
        if Some(records.len()) != usize::try_from(count).ok().and_then(|n| n.checked_mul(RECORD_LEN)) {
            return Err(format!("claims {count} records in {} bytes", records.len()));
        }
        let checked: Vec<CheckedHeader> = records
            .chunks_exact(RECORD_LEN)
            .map(|r| CheckedHeader {
                pack: BlobId(r[..32].try_into().expect("32 bytes")),
                size: u64::from_le_bytes(r[32..40].try_into().expect("8 bytes")),
                listing: r[40..].try_into().expect("32 bytes"),
            })
            .collect();
        if !checked.windows(2).all(|w| w[0].pack < w[1].pack) {
            return Err("records not in pack id order".into());
        }
        Ok(HeaderRecord { checked })
    }

    /// Reads the record at `path`. Missing (no check ran here yet) or unreadable: empty, so that every header is
    /// read.
    pub fn load(path: &Path) -> HeaderRecord {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return HeaderRecord::default(),
            Err(e) => {
                tracing::warn!("{}: {e}; reading every pack header", path.display());
                return HeaderRecord::default();
            }
        };
        HeaderRecord::decode(&bytes).unwrap_or_else(|e| {
            tracing::warn!("{}: {e}; reading every pack header", path.display());
            HeaderRecord::default()
        })
    }

    /// Replaces the record at `path` (created with its directory), atomically: a concurrent check or a crash
    /// leaves one whole record. Not synced: losing it costs only reading headers again.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = PathBuf::from(format!("{}.{}.tmp", path.display(), std::process::id()));
        crate::util::replace_file(path, &tmp, &self.encode(), false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pack::PackEntry;
    use crate::format::BlobType;

    fn checked(n: u8, size: u64) -> CheckedHeader {
        CheckedHeader { pack: BlobId([n; 32]), size, listing: [n ^ 0x55; 32] }
    }

    #[test]
    fn round_trips_and_vouches_only_for_the_same_size_and_listing() {
        let record = HeaderRecord::new(vec![checked(9, 100), checked(3, 50), checked(9, 200)]);
        assert_eq!(record.len(), 2);
        let decoded = HeaderRecord::decode(&record.encode()).unwrap();
        assert_eq!(decoded, record);
        let nine = checked(9, 200);
        // The later of two entries for one pack wins.
        assert!(decoded.vouches_for(&nine.pack, 200, &nine.listing));
        assert!(!decoded.vouches_for(&nine.pack, 100, &nine.listing));
        assert!(!decoded.vouches_for(&nine.pack, 200, &[0; 32]));
        assert!(!decoded.vouches_for(&BlobId([4; 32]), 50, &checked(4, 50).listing));
    }

    #[test]
    fn a_torn_or_altered_record_is_not_believed() {
        let bytes = HeaderRecord::new(vec![checked(1, 10), checked(2, 20)]).encode();
        assert!(HeaderRecord::decode(&bytes[..bytes.len() - 1]).is_err());
        let mut altered = bytes.clone();
        altered[MAGIC.len() + 8 + 33] ^= 1;
        assert!(HeaderRecord::decode(&altered).unwrap_err().contains("checksum"));
        assert!(HeaderRecord::decode(&[]).is_err());
    }

    #[test]
    fn saved_and_loaded_through_a_file_and_missing_or_damaged_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("repo-id").join(FILE_NAME);
        assert!(HeaderRecord::load(&path).is_empty());
        let record = HeaderRecord::new(vec![checked(1, 10), checked(2, 20)]);
        record.save(&path).unwrap();
        assert_eq!(HeaderRecord::load(&path), record);
        std::fs::write(&path, b"diskvault-hdrs-1 and then nonsense").unwrap();
        assert!(HeaderRecord::load(&path).is_empty());
        // Nothing but the record is left in the directory (the temporary file was renamed).
        assert_eq!(std::fs::read_dir(path.parent().unwrap()).unwrap().count(), 1);
    }

    #[test]
    fn the_listing_digest_tells_listings_apart() {
        let entry = PackEntry::example();
        let pack = IndexedPack { id: BlobId([1; 32]), pack_type: BlobType::Data, entries: vec![entry] };
        let mut moved = pack.clone();
        moved.entries[0].stored_len += 1;
        let mut segment = pack.clone();
        segment.pack_type = BlobType::Segment;
        assert_eq!(listing_digest(&pack), listing_digest(&pack.clone()));
        assert_ne!(listing_digest(&pack), listing_digest(&moved));
        assert_ne!(listing_digest(&pack), listing_digest(&segment));
    }
}
