//! The repository's index as `check` holds it: every indexed pack's listing once, and where each blob is listed.
//!
//! A blob's copy is named by the positions of its pack and of its entry (8 bytes) rather than by a copy of the
//! pack id and the entry (116 bytes): a check of 3 million blobs peaked at 1.26 GB, most of it that map while
//! it grew.

use std::collections::HashMap;

use crate::error::Result;
use crate::format::index::{BlobLocation, IndexedPack};
use crate::format::pack::PackEntry;
use crate::format::{BlobId, ObjectId};
use crate::repository::BlobLocator;

/// Where a copy of a blob is listed: `packs[pack].entries[entry]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct At {
    pack: u32,
    entry: u32,
}

#[derive(Default)]
pub(super) struct Index {
    packs: Vec<IndexedPack>,
    by_id: HashMap<ObjectId, u32>,
    /// Each blob's first copy, in the order the listings were added.
    first: HashMap<BlobId, At>,
    /// Further copies of blobs listed in more than one pack (two hosts stored them, or a backup stored a damaged
    /// one again).
    more: HashMap<BlobId, Vec<At>>,
}

impl Index {
    /// Room for this many packs and blobs: the blob map grows to its size once instead of doubling (and holding
    /// the old table beside the new one each time).
    pub fn with_capacity(packs: usize, blobs: usize) -> Index {
        Index {
            packs: Vec::with_capacity(packs),
            by_id: HashMap::with_capacity(packs),
            first: HashMap::with_capacity(blobs),
            more: HashMap::new(),
        }
    }

    /// Adds the listing of a pack. A pack already listed is one copy: its first listing stays.
    pub fn add(&mut self, listing: IndexedPack) {
        if self.by_id.contains_key(&listing.id) {
            return;
        }
        let pack = u32::try_from(self.packs.len()).expect("fewer than 2^32 packs");
        for (i, e) in listing.entries.iter().enumerate() {
            let at = At { pack, entry: u32::try_from(i).expect("fewer than 2^32 entries in a pack") };
            match self.first.entry(e.id) {
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(at);
                }
                // A listing naming one blob twice still holds one copy of it.
                std::collections::hash_map::Entry::Occupied(o) if o.get().pack == pack => {}
                std::collections::hash_map::Entry::Occupied(_) => {
                    let copies = self.more.entry(e.id).or_default();
                    if !copies.iter().any(|c| c.pack == pack) {
                        copies.push(at);
                    }
                }
            }
        }
        self.by_id.insert(listing.id, pack);
        self.packs.push(listing);
    }

    pub fn pack(&self, id: &ObjectId) -> Option<&IndexedPack> {
        self.by_id.get(id).map(|&n| &self.packs[n as usize])
    }

    pub fn contains_pack(&self, id: &ObjectId) -> bool {
        self.by_id.contains_key(id)
    }

    pub fn packs(&self) -> &[IndexedPack] {
        &self.packs
    }

    /// Distinct blobs listed.
    pub fn blob_count(&self) -> usize {
        self.first.len()
    }

    fn copy(&self, at: At) -> (ObjectId, PackEntry) {
        let p = &self.packs[at.pack as usize];
        (p.id, p.entries[at.entry as usize])
    }

    /// The first copy of `blob` listed.
    pub fn first_copy(&self, blob: &BlobId) -> Option<(ObjectId, PackEntry)> {
        self.first.get(blob).map(|&at| self.copy(at))
    }

    /// Every copy of `blob` listed, the first first.
    pub fn copies<'a>(&'a self, blob: &BlobId) -> impl Iterator<Item = (ObjectId, PackEntry)> + 'a {
        let first = self.first.get(blob).copied();
        let more = self.more.get(blob).map(|m| m.as_slice()).unwrap_or_default();
        first.into_iter().chain(more.iter().copied()).map(|at| self.copy(at))
    }

    /// The first copy of every blob.
    pub fn first_copies(&self) -> impl Iterator<Item = (ObjectId, &PackEntry)> + '_ {
        self.first.values().map(|at| {
            let p = &self.packs[at.pack as usize];
            (p.id, &p.entries[at.entry as usize])
        })
    }

    /// Whether the listing of `pack` names `blob`.
    pub fn lists(&self, pack: &ObjectId, blob: &BlobId) -> bool {
        self.pack(pack).is_some_and(|p| p.entries.iter().any(|e| e.id == *blob))
    }
}

/// Delta blobs' bases are read from their first copy.
impl BlobLocator for Index {
    fn locate(&self, id: &BlobId) -> Result<Option<BlobLocation>> {
        Ok(self.first_copy(id).map(|(pack, entry)| BlobLocation { pack, entry }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::BlobType;

    fn listing(pack: u8, blobs: &[u8]) -> IndexedPack {
        let entries = blobs
            .iter()
            .enumerate()
            .map(|(i, &b)| PackEntry { id: BlobId([b; 32]), offset: i as u32 * 100, ..PackEntry::example() })
            .collect();
        IndexedPack { id: BlobId([pack; 32]), pack_type: BlobType::Data, entries }
    }

    #[test]
    fn copies_are_found_in_the_order_listed_and_a_pack_listed_twice_is_one_copy() {
        let mut index = Index::with_capacity(0, 0);
        index.add(listing(1, &[10, 11]));
        index.add(listing(2, &[11, 12, 12]));
        // Listed again, differently: the first listing stays.
        index.add(listing(1, &[13]));
        assert_eq!(index.pack(&BlobId([1; 32])), Some(&listing(1, &[10, 11])));
        assert_eq!(index.blob_count(), 3);
        let packs_of = |b: u8| index.copies(&BlobId([b; 32])).map(|(p, e)| (p.0[0], e.offset)).collect::<Vec<_>>();
        assert_eq!(packs_of(11), [(1, 100), (2, 0)]);
        assert_eq!(packs_of(12), [(2, 100)]);
        assert_eq!(packs_of(13), []);
        assert_eq!(
            index.first_copy(&BlobId([10; 32])).map(|(p, e)| (p, e.id)),
            Some((BlobId([1; 32]), BlobId([10; 32])))
        );
        assert!(index.lists(&BlobId([2; 32]), &BlobId([12; 32])));
        assert!(!index.lists(&BlobId([1; 32]), &BlobId([12; 32])));
        assert!(!index.contains_pack(&BlobId([3; 32])));
        let mut firsts: Vec<(u8, u8)> = index.first_copies().map(|(p, e)| (p.0[0], e.id.0[0])).collect();
        firsts.sort();
        assert_eq!(firsts, [(1, 10), (1, 11), (2, 12)]);
    }
}
