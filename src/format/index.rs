//! Index files: which blobs each pack holds, so a reader finds a blob without opening every pack header.
//!
//! Payload (inside the encrypted envelope, kind 2):
//! ```text
//! supersedes_count u32 | supersedes_count × index file id[32]
//! pack_count u32       | per pack: pack id[32] | pack type u8 | 3 reserved | entry_count u32 | entries (48 B each)
//!                        | base ids of its delta entries (32 B each, in entry order; format version 2)
//! ```
//! `supersedes` lists index files this one replaces (written by prune and `repair index`); readers ignore a
//! superseded file once the superseding one exists.

use super::pack::{decode_bases, encode_bases, PackEntry, ENTRY_LEN};
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

/// At most this many packs, and about this many blob entries, in an index file that prune, repair and adoption
/// write, whichever limit comes first: readers load an index file whole, so its size bounds their memory.
pub const MAX_PACKS_PER_FILE: usize = 512;
pub const MAX_ENTRIES_PER_FILE: usize = 65536;

/// Whether an index file of `packs` packs and `entries` entries is full ([`MAX_PACKS_PER_FILE`],
/// [`MAX_ENTRIES_PER_FILE`]).
pub fn is_full(packs: usize, entries: usize) -> bool {
    packs >= MAX_PACKS_PER_FILE || entries >= MAX_ENTRIES_PER_FILE
}

/// `packs` in order, grouped into index files that are each closed once [`is_full`] (a pack with more entries
/// than the limit is a file of its own).
pub fn file_groups(packs: Vec<IndexedPack>) -> Vec<Vec<IndexedPack>> {
    let (mut groups, mut group, mut entries) = (Vec::new(), Vec::new(), 0);
    for pack in packs {
        entries += pack.entries.len();
        group.push(pack);
        if is_full(group.len(), entries) {
            groups.push(std::mem::take(&mut group));
            entries = 0;
        }
    }
    if !group.is_empty() {
        groups.push(group);
    }
    groups
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
            encode_bases(&p.entries, &mut out);
        }
        out
    }

    /// The format version of this index file: 2 if it lists a delta blob.
    pub fn version(&self) -> u8 {
        self.packs.iter().map(|p| super::pack::version_for(&p.entries)).max().unwrap_or(1)
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
            decode_bases(&mut r, &mut entries).map_err(|e| format!("pack {}: {e}", id.short()))?;
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
    /// `pack id ‖ entry`, and `‖ base id` for a delta blob: 80 or 112 bytes (the local cache's value).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(32 + ENTRY_LEN + 32);
        out.extend_from_slice(&self.pack.0);
        self.entry.encode_into(&mut out);
        encode_bases(std::slice::from_ref(&self.entry), &mut out);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<BlobLocation, String> {
        let mut r = Reader::new(bytes);
        let pack = r.id()?;
        let mut entry = PackEntry::decode(&mut r)?;
        decode_bases(&mut r, std::slice::from_mut(&mut entry))?;
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
    fn packs_are_grouped_into_files_by_pack_count_and_by_entries() {
        let pack = |entries: usize| IndexedPack {
            id: BlobId([1; 32]),
            pack_type: BlobType::Data,
            entries: vec![PackEntry::example(); entries],
        };
        let sizes = |packs: Vec<IndexedPack>| file_groups(packs).iter().map(Vec::len).collect::<Vec<_>>();
        assert_eq!(sizes((0..1100).map(|_| pack(1)).collect()), [512, 512, 76]);
        // 4096 entries a pack: 16 packs reach the entry limit.
        assert_eq!(sizes((0..40).map(|_| pack(4096)).collect()), [16, 16, 8]);
        assert_eq!(sizes(vec![pack(1), pack(100_000), pack(1)]), [2, 1]);
        assert!(file_groups(Vec::new()).is_empty());
    }

    #[test]
    fn roundtrip_and_bounds() {
        let e = PackEntry::example();
        let d = PackEntry { flags: 3, id: BlobId([6; 32]), base: Some(BlobId([5; 32])), ..e };
        let f = IndexFile {
            supersedes: vec![BlobId([1; 32])],
            packs: vec![IndexedPack { id: BlobId([2; 32]), pack_type: BlobType::Data, entries: vec![e, d, e] }],
        };
        assert_eq!(f.version(), 2);
        let b = f.encode();
        assert_eq!(IndexFile::decode(&b).unwrap(), f);
        for cut in 0..b.len() {
            assert!(IndexFile::decode(&b[..cut]).is_err(), "prefix of {cut} bytes decoded");
        }
        let mut huge = b.clone();
        huge[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(IndexFile::decode(&huge).is_err());
        for entry in [e, d] {
            let loc = BlobLocation { pack: BlobId([2; 32]), entry };
            assert_eq!(BlobLocation::decode(&loc.encode()).unwrap(), loc);
        }
        // A delta blob without its base, or a compressed flag missing on a delta: refused.
        let mut no_base = f.clone();
        no_base.packs[0].entries[1].flags = 1;
        no_base.packs[0].entries[1].base = None;
        let mut b2 = no_base.encode();
        b2[40 + 4 + 36 + 48 + 1] = 3;
        assert!(IndexFile::decode(&b2).is_err());
        let mut b3 = b.clone();
        b3[40 + 4 + 36 + 48 + 1] = 2;
        assert!(IndexFile::decode(&b3).is_err());
    }
}
