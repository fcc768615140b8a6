//! The repository's index as `check` holds it: every indexed pack's listing once, and where each blob is listed.
//!
//! A blob's copy is named by the positions of its pack and of its entry (8 bytes) rather than by a copy of the
//! pack id and the entry (116 bytes): a check of 3 million blobs peaked at 1.26 GB, most of it that map while
//! it grew. Those positions are kept sorted by blob id with each id's first 8 bytes beside them (16 bytes a
//! blob) rather than in a hash map of ids (57 bytes a blob at its load: 172 MB at 3 million blobs), and the
//! listings without a delta base in every entry ([`Listing`]: 48 bytes an entry instead of 84).

use std::collections::HashMap;

use crate::crypto::KeyEpoch;
use crate::error::Result;
use crate::format::index::{BlobLocation, IndexedPack};
use crate::format::pack::PackEntry;
use crate::format::{BlobId, BlobType, ObjectId};
use crate::idset::HeadBuckets;
use crate::repository::BlobLocator;

/// Where a copy of a blob is listed: `packs[pack].entries[entry]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct At {
    pack: u32,
    entry: u32,
}

/// A listing's entry without its delta base: a [`PackEntry`] holds an `Option<BlobId>` for the few delta blobs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Entry {
    blob_type: BlobType,
    flags: u8,
    key_epoch: KeyEpoch,
    offset: u32,
    stored_len: u32,
    raw_len: u32,
    id: BlobId,
}

/// A pack's listing as check holds it: its entries, and the bases of its delta entries apart.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Listing {
    id: ObjectId,
    pack_type: BlobType,
    entries: Vec<Entry>,
    /// (entry number, base), by entry number.
    bases: Vec<(u32, BlobId)>,
}

impl Listing {
    pub fn new(pack: IndexedPack) -> Listing {
        let mut bases = Vec::new();
        let entries = (0u32..)
            .zip(&pack.entries)
            .map(|(i, e)| {
                bases.extend(e.base.map(|b| (i, b)));
                let PackEntry { blob_type, flags, key_epoch, offset, stored_len, raw_len, id, base: _ } = *e;
                Entry { blob_type, flags, key_epoch, offset, stored_len, raw_len, id }
            })
            .collect();
        Listing { id: pack.id, pack_type: pack.pack_type, entries, bases }
    }

    pub fn id(&self) -> ObjectId {
        self.id
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it lists delta blobs.
    pub fn holds_deltas(&self) -> bool {
        !self.bases.is_empty()
    }

    fn entry(&self, i: u32) -> PackEntry {
        let Entry { blob_type, flags, key_epoch, offset, stored_len, raw_len, id } = self.entries[i as usize];
        let base = self.bases.binary_search_by_key(&i, |(n, _)| *n).ok().map(|k| self.bases[k].1);
        PackEntry { blob_type, flags, key_epoch, offset, stored_len, raw_len, id, base }
    }

    /// The listing as index files and pack headers give it.
    pub fn to_indexed(&self) -> IndexedPack {
        let entries = (0..self.entries.len() as u32).map(|i| self.entry(i)).collect();
        IndexedPack { id: self.id, pack_type: self.pack_type, entries }
    }
}

/// The listings as they are added; [`IndexBuilder::finish`] sorts where each blob is listed, by the blobs' ids
/// with their heads ([`BlobId::head`]) beside them, so that a search compares in that array rather than in the
/// listings.
#[derive(Default)]
pub(super) struct IndexBuilder {
    packs: Vec<Listing>,
    by_id: HashMap<ObjectId, u32>,
    /// Every entry of every listing, in the order added.
    listed: Vec<(u64, At)>,
}

impl IndexBuilder {
    /// Room for this many packs and blobs.
    pub fn with_capacity(packs: usize, blobs: usize) -> IndexBuilder {
        IndexBuilder {
            packs: Vec::with_capacity(packs),
            by_id: HashMap::with_capacity(packs),
            listed: Vec::with_capacity(blobs),
        }
    }

    /// Adds the listing of a pack. A pack already listed is one copy: its first listing stays.
    pub fn add(&mut self, listing: Listing) {
        if self.by_id.contains_key(&listing.id) {
            return;
        }
        let pack = u32::try_from(self.packs.len()).expect("fewer than 2^32 packs");
        for (i, e) in listing.entries.iter().enumerate() {
            let entry = u32::try_from(i).expect("fewer than 2^32 entries in a pack");
            self.listed.push((e.id.head(), At { pack, entry }));
        }
        self.by_id.insert(listing.id, pack);
        self.packs.push(listing);
    }

    pub fn pack(&self, id: &ObjectId) -> Option<&Listing> {
        self.by_id.get(id).map(|&n| &self.packs[n as usize])
    }

    /// Sorts the entries by blob id and, for each blob, by the order its listings were added: the first is its
    /// first copy, the others (in other packs) its further copies.
    pub fn finish(self) -> Index {
        let IndexBuilder { packs, by_id, mut listed } = self;
        let id = |at: &At| packs[at.pack as usize].entries[at.entry as usize].id;
        // Only equal heads (the same blob listed again, or a rare head shared by two ids) look further.
        listed.sort_unstable_by(|(pa, a), (pb, b)| {
            pa.cmp(pb).then_with(|| id(a).cmp(&id(b))).then((a.pack, a.entry).cmp(&(b.pack, b.entry)))
        });
        let mut more: HashMap<BlobId, Vec<At>> = HashMap::new();
        let mut kept = 0usize;
        for i in 0..listed.len() {
            let at = listed[i].1;
            match kept.checked_sub(1).map(|k| listed[k].1) {
                Some(first) if id(&first) == id(&at) => {
                    // A listing naming one blob twice still holds one copy of it.
                    let copies = more.entry(id(&at)).or_default();
                    if first.pack != at.pack && copies.last().is_none_or(|c| c.pack != at.pack) {
                        copies.push(at);
                    }
                }
                _ => {
                    listed[kept] = listed[i];
                    kept += 1;
                }
            }
        }
        listed.truncate(kept);
        listed.shrink_to_fit();
        let buckets = HeadBuckets::new(listed.iter().map(|(head, _)| *head), listed.len());
        Index { packs, by_id, first: listed, buckets, more }
    }
}

pub(super) struct Index {
    packs: Vec<Listing>,
    by_id: HashMap<ObjectId, u32>,
    /// Each blob's first copy (in the first listing added that names it), sorted by blob id.
    first: Vec<(u64, At)>,
    /// Where the blobs of each value of their heads' first bits are in `first`: a search of a bisected
    /// `first` made `check` of 3 million blobs 40% slower than the hash map did.
    buckets: HeadBuckets,
    /// Further copies of blobs listed in more than one pack (two hosts stored them, or a backup stored a damaged
    /// one again), in the order listed.
    more: HashMap<BlobId, Vec<At>>,
}

impl Index {
    pub fn listing(&self, id: &ObjectId) -> Option<&Listing> {
        self.by_id.get(id).map(|&n| &self.packs[n as usize])
    }

    /// The listing of pack `id` as index files give it.
    pub fn pack(&self, id: &ObjectId) -> Option<IndexedPack> {
        self.listing(id).map(Listing::to_indexed)
    }

    pub fn contains_pack(&self, id: &ObjectId) -> bool {
        self.by_id.contains_key(id)
    }

    pub fn listings(&self) -> &[Listing] {
        &self.packs
    }

    /// Distinct blobs listed.
    pub fn blob_count(&self) -> usize {
        self.first.len()
    }

    fn id_at(&self, at: At) -> &BlobId {
        &self.packs[at.pack as usize].entries[at.entry as usize].id
    }

    fn copy(&self, at: At) -> (ObjectId, PackEntry) {
        let listing = &self.packs[at.pack as usize];
        (listing.id, listing.entry(at.entry))
    }

    fn find(&self, blob: &BlobId) -> Option<At> {
        let head = blob.head();
        let candidates = &self.first[self.buckets.range(head)];
        let start = candidates.partition_point(|(h, _)| *h < head);
        candidates[start..].iter().take_while(|(h, _)| *h == head).map(|(_, at)| *at).find(|at| self.id_at(*at) == blob)
    }

    /// The first copy of `blob` listed.
    pub fn first_copy(&self, blob: &BlobId) -> Option<(ObjectId, PackEntry)> {
        self.find(blob).map(|at| self.copy(at))
    }

    /// Every copy of `blob` listed, the first first.
    pub fn copies<'a>(&'a self, blob: &BlobId) -> impl Iterator<Item = (ObjectId, PackEntry)> + 'a {
        let first = self.find(blob);
        let more = first.and_then(|_| self.more.get(blob)).map(|m| m.as_slice()).unwrap_or_default();
        first.into_iter().chain(more.iter().copied()).map(|at| self.copy(at))
    }

    /// The first copy of every blob, in the order of the blobs' ids.
    pub fn first_copies(&self) -> impl Iterator<Item = (ObjectId, PackEntry)> + '_ {
        self.first.iter().map(|(_, at)| self.copy(*at))
    }

    /// Whether the listing of `pack` names `blob`.
    pub fn lists(&self, pack: &ObjectId, blob: &BlobId) -> bool {
        self.listing(pack).is_some_and(|p| p.entries.iter().any(|e| e.id == *blob))
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
        let mut builder = IndexBuilder::with_capacity(0, 0);
        builder.add(Listing::new(listing(1, &[10, 11])));
        builder.add(Listing::new(listing(2, &[11, 12, 12])));
        // Listed again, differently: the first listing stays.
        builder.add(Listing::new(listing(1, &[13])));
        let index = builder.finish();
        assert_eq!(index.pack(&BlobId([1; 32])), Some(listing(1, &[10, 11])));
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

    #[test]
    fn ids_sharing_their_first_bytes_are_told_apart() {
        let id = |tail: u8| {
            let mut b = [7u8; 32];
            b[31] = tail;
            BlobId(b)
        };
        let entries = |ids: &[BlobId]| {
            ids.iter().enumerate().map(|(i, &id)| PackEntry { id, offset: i as u32, ..PackEntry::example() }).collect()
        };
        let mut builder = IndexBuilder::with_capacity(0, 0);
        let pack = |n: u8, ids: &[BlobId]| IndexedPack {
            id: BlobId([n; 32]),
            pack_type: crate::format::BlobType::Data,
            entries: entries(ids),
        };
        builder.add(Listing::new(pack(1, &[id(3), id(1)])));
        builder.add(Listing::new(pack(2, &[id(2), id(3), id(1)])));
        let index = builder.finish();
        assert_eq!(index.blob_count(), 3);
        let copies = |t: u8| index.copies(&id(t)).map(|(p, e)| (p.0[0], e.offset)).collect::<Vec<_>>();
        assert_eq!(copies(1), [(1, 1), (2, 2)]);
        assert_eq!(copies(2), [(2, 0)]);
        assert_eq!(copies(3), [(1, 0), (2, 1)]);
        assert_eq!(copies(4), []);
        let ids: Vec<BlobId> = index.first_copies().map(|(_, e)| e.id).collect();
        assert_eq!(ids, [id(1), id(2), id(3)]);
    }

    #[test]
    fn every_blob_of_a_large_index_is_found_in_its_pack() {
        let id = |n: u32| BlobId(*blake3::hash(&n.to_le_bytes()).as_bytes());
        let mut builder = IndexBuilder::with_capacity(0, 0);
        // The extremes of the id space too: the first and the last range of prefixes.
        let ends = [BlobId([0; 32]), BlobId([0xff; 32])];
        for pack in 0..20u32 {
            let ids: Vec<BlobId> =
                (pack * 500..pack * 500 + 500).map(id).chain(ends.iter().copied().filter(|_| pack == 7)).collect();
            let entries = ids.iter().map(|&id| PackEntry { id, offset: pack, ..PackEntry::example() }).collect();
            let listed = IndexedPack { id: BlobId([pack as u8; 32]), pack_type: BlobType::Data, entries };
            builder.add(Listing::new(listed));
        }
        let index = builder.finish();
        assert_eq!(index.blob_count(), 10_002);
        for n in 0..10_000u32 {
            assert_eq!(index.first_copy(&id(n)).map(|(p, e)| (p.0[0] as u32, e.offset)), Some((n / 500, n / 500)));
        }
        for end in ends {
            assert_eq!(index.first_copy(&end).map(|(_, e)| e.offset), Some(7));
        }
        assert!((10_000..11_000).all(|n| index.first_copy(&id(n)).is_none()));
    }

    #[test]
    fn delta_entries_keep_their_bases() {
        let mut pack = listing(1, &[10, 11, 12, 13]);
        for (i, base) in [(1, 20u8), (3, 21)] {
            pack.entries[i].flags |= crate::format::pack::FLAG_DELTA;
            pack.entries[i].base = Some(BlobId([base; 32]));
        }
        let held = Listing::new(pack.clone());
        assert!(held.holds_deltas() && !Listing::new(listing(2, &[10])).holds_deltas());
        assert_eq!(held.to_indexed(), pack);
        let mut builder = IndexBuilder::with_capacity(0, 0);
        builder.add(held);
        let index = builder.finish();
        let base_of = |b: u8| index.first_copy(&BlobId([b; 32])).and_then(|(_, e)| e.base).map(|b| b.0[0]);
        assert_eq!([base_of(10), base_of(11), base_of(12), base_of(13)], [None, Some(20), None, Some(21)]);
        assert!(index.first_copies().all(|(_, e)| e.base.is_some() == e.is_delta()));
    }
}
