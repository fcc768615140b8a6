//! Index files: which blobs each pack holds, so a reader finds a blob without opening every pack header.
//!
//! Payload (inside the encrypted envelope, kind 2):
//! ```text
//! supersedes_count u32 | supersedes_count × index file id[32]
//! pack_count u32       | per pack: pack id[32] | pack type u8 | 3 reserved | entry_count u32 | entries (48 B each)
//! ```
//! `supersedes` lists index files this one replaces (written by prune and `repair index`); readers ignore a
//! superseded file once the superseding one exists.

use super::pack::{PackEntry, ENTRY_LEN};
use super::{BlobId, BlobType, ObjectId, Reader};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IndexFile {
    pub supersedes: Vec<ObjectId>,
    pub packs: Vec<IndexedPack>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IndexedPack {
    pub id: ObjectId,
    pub pack_type: BlobType,
    pub entries: Vec<PackEntry>,
}

impl IndexFile {
    pub fn encode(&self) -> Vec<u8> {
        let n: usize = self.packs.iter().map(|p| 40 + p.entries.len() * ENTRY_LEN).sum();
        let mut out = Vec::with_capacity(8 + self.supersedes.len() * 32 + n);
        out.extend_from_slice(&(self.supersedes.len() as u32).to_le_bytes());
        for s in &self.supersedes {
            out.extend_from_slice(&s.0);
        }
        out.extend_from_slice(&(self.packs.len() as u32).to_le_bytes());
        for p in &self.packs {
            out.extend_from_slice(&p.id.0);
            out.push(p.pack_type as u8);
            out.extend_from_slice(&[0, 0, 0]);
            out.extend_from_slice(&(p.entries.len() as u32).to_le_bytes());
            for e in &p.entries {
                e.encode_into(&mut out);
            }
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<IndexFile, String> {
        let mut r = Reader::new(bytes);
        let ns = r.u32()? as usize;
        // Every count is checked against the bytes left before anything is allocated for it.
        if ns.saturating_mul(32) > r.remaining() {
            return Err(format!("claims {ns} superseded files, more than the file holds"));
        }
        let supersedes = (0..ns).map(|_| r.id()).collect::<Result<Vec<_>, _>>()?;
        let np = r.u32()? as usize;
        if np.saturating_mul(40) > r.remaining() {
            return Err(format!("claims {np} packs, more than the file holds"));
        }
        let mut packs = Vec::with_capacity(np);
        for _ in 0..np {
            let id = r.id()?;
            let t = r.u8()?;
            let pack_type = BlobType::from_u8(t).ok_or_else(|| format!("pack {}: unknown type {t}", id.short()))?;
            if r.take(3)? != [0, 0, 0] {
                return Err(format!("pack {}: reserved bytes are not zero", id.short()));
            }
            let ne = r.u32()? as usize;
            if ne.saturating_mul(ENTRY_LEN) > r.remaining() {
                return Err(format!("pack {}: claims {ne} blobs, more than the file holds", id.short()));
            }
            let mut entries = Vec::with_capacity(ne);
            for _ in 0..ne {
                let e = PackEntry::decode(&mut r).map_err(|e| format!("pack {}: {e}", id.short()))?;
                if e.blob_type != pack_type {
                    return Err(format!(
                        "pack {}: {} blob in a {} pack",
                        id.short(),
                        e.blob_type.name(),
                        pack_type.name()
                    ));
                }
                entries.push(e);
            }
            packs.push(IndexedPack { id, pack_type, entries });
        }
        if r.remaining() != 0 {
            return Err(format!("{} trailing bytes", r.remaining()));
        }
        Ok(IndexFile { supersedes, packs })
    }

    pub fn blob_count(&self) -> usize {
        self.packs.iter().map(|p| p.entries.len()).sum()
    }
}

/// Where a blob is stored: what the local index cache and restore need to fetch it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlobLocation {
    pub pack: ObjectId,
    pub entry: PackEntry,
}

impl BlobLocation {
    pub const ENCODED_LEN: usize = 32 + ENTRY_LEN;

    pub fn encode(&self) -> [u8; Self::ENCODED_LEN] {
        let mut out = [0u8; Self::ENCODED_LEN];
        out[..32].copy_from_slice(&self.pack.0);
        let mut v = Vec::with_capacity(ENTRY_LEN);
        self.entry.encode_into(&mut v);
        out[32..].copy_from_slice(&v);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<BlobLocation, String> {
        let mut r = Reader::new(bytes);
        let pack = r.id()?;
        let entry = PackEntry::decode(&mut r)?;
        if r.remaining() != 0 {
            return Err("trailing bytes".into());
        }
        Ok(BlobLocation { pack, entry })
    }

    pub fn id(&self) -> BlobId {
        self.entry.id
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_bounds() {
        let e = PackEntry {
            blob_type: BlobType::Data,
            flags: 1,
            offset: 0,
            stored_len: 100,
            raw_len: 1 << 20,
            id: BlobId([5; 32]),
        };
        let f = IndexFile {
            supersedes: vec![BlobId([1; 32])],
            packs: vec![IndexedPack { id: BlobId([2; 32]), pack_type: BlobType::Data, entries: vec![e, e] }],
        };
        let b = f.encode();
        assert_eq!(IndexFile::decode(&b).unwrap(), f);
        for cut in 0..b.len() {
            assert!(IndexFile::decode(&b[..cut]).is_err(), "prefix of {cut} bytes decoded");
        }
        let mut huge = b.clone();
        huge[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(IndexFile::decode(&huge).is_err());
        let loc = BlobLocation { pack: BlobId([2; 32]), entry: e };
        assert_eq!(BlobLocation::decode(&loc.encode()).unwrap(), loc);
    }
}
