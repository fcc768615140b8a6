//! Blob ids by the million in memory, for the commands that gather or look up every block of a repository
//! (`check`, `stats`, `snapshots --verified`) without a hash map's overhead:
//! - [`Distinct`] gathers the distinct ids of a stream with many repeats (the blocks of incremental snapshots),
//!   sorted, in about 1.25 times the memory of the result;
//! - [`HeadBuckets`] finds an id in a sorted list in about two cache misses.
//!
//! Both rely on ids being hashes: sorted by [`BlobId::head`] they spread evenly.

use crate::format::BlobId;

/// An item of a [`Distinct`]: keyed by a blob id, and combined with the repeats of its id.
pub trait Keyed: Copy {
    fn id(&self) -> &BlobId;

    /// Takes in an item with the same id (the set keeps one per id).
    fn absorb(&mut self, _repeat: &Self) {}
}

impl Keyed for BlobId {
    fn id(&self) -> &BlobId {
        self
    }
}

/// One item per id, sorted by id. Items wait in a tail of at most an eighth of the sorted ones (at least 2^18),
/// which is sorted and merged into them when full (the merge holds the tail twice): memory stays about 1.25
/// times the result's, where a vector sorted whenever it doubled held up to 2.7 times it (256 MB of ids for
/// `snapshots --verified` of 3 million blocks), and each merge sorts only the tail.
pub struct Distinct<T> {
    sorted: Vec<T>,
    tail: Vec<T>,
}

impl<T> Default for Distinct<T> {
    fn default() -> Self {
        Distinct { sorted: Vec::new(), tail: Vec::new() }
    }
}

impl<T: Keyed> Distinct<T> {
    pub fn push(&mut self, item: T) {
        if self.tail.len() >= (self.sorted.len() / 8).max(1 << 18) {
            self.merge();
        }
        self.tail.push(item);
    }

    pub fn extend(&mut self, items: impl IntoIterator<Item = T>) {
        items.into_iter().for_each(|item| self.push(item));
    }

    fn merge(&mut self) {
        let tail = &mut self.tail;
        tail.sort_unstable_by(|a, b| a.id().cmp(b.id()));
        // `dedup_by` hands the later item first and keeps the earlier one.
        tail.dedup_by(|later, kept| {
            let same = later.id() == kept.id();
            if same {
                kept.absorb(later);
            }
            same
        });
        // Merged from the back into room for the whole tail; ids found in both become one item, which leaves a
        // gap before the merged part, closed at the end.
        let sorted = &mut self.sorted;
        let old = sorted.len();
        sorted.reserve_exact(tail.len());
        sorted.extend_from_slice(tail);
        let (mut i, mut j, mut k) = (old, tail.len(), sorted.len());
        while j > 0 {
            k -= 1;
            match (i > 0).then(|| sorted[i - 1].id().cmp(tail[j - 1].id())) {
                Some(std::cmp::Ordering::Greater) => {
                    sorted[k] = sorted[i - 1];
                    i -= 1;
                }
                Some(std::cmp::Ordering::Equal) => {
                    let mut item = sorted[i - 1];
                    item.absorb(&tail[j - 1]);
                    sorted[k] = item;
                    i -= 1;
                    j -= 1;
                }
                _ => {
                    sorted[k] = tail[j - 1];
                    j -= 1;
                }
            }
        }
        if k > i {
            let len = sorted.len();
            sorted.copy_within(k.., i);
            sorted.truncate(len - (k - i));
        }
        tail.clear();
    }

    /// The items, one per id, sorted by id.
    pub fn into_sorted(mut self) -> Vec<T> {
        self.merge();
        self.sorted.shrink_to_fit();
        self.sorted
    }
}

/// Where, in a list of ids sorted by [`BlobId::head`], the ids sharing each value of the head's first bits
/// begin: about four share each value, and a lookup searches those instead of bisecting millions of ids (which
/// missed the CPU's caches about twenty times per lookup; this, about twice).
pub struct HeadBuckets {
    /// Where each value's ids begin, and where the last ones end.
    starts: Vec<u32>,
    shift: u32,
}

impl HeadBuckets {
    /// For the `heads`, ascending, of `len` ids (fewer than 2^32).
    pub fn new(heads: impl Iterator<Item = u64>, len: usize) -> HeadBuckets {
        let len = u32::try_from(len).expect("fewer than 2^32 ids");
        let bits = (u32::BITS - (len / 4).max(1).leading_zeros()).min(32);
        let shift = 64 - bits;
        let mut starts = Vec::with_capacity((1 << bits) + 1);
        for (i, head) in (0..len).zip(heads) {
            let value = (head >> shift) as usize;
            while starts.len() <= value {
                starts.push(i);
            }
        }
        starts.resize((1 << bits) + 1, len);
        HeadBuckets { starts, shift }
    }

    /// Where the ids whose head is `head` are, if any.
    pub fn range(&self, head: u64) -> std::ops::Range<usize> {
        let value = (head >> self.shift) as usize;
        self.starts[value] as usize..self.starts[value + 1] as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Counts its repeats.
    #[derive(Clone, Copy, Debug, PartialEq)]
    struct Counted(BlobId, u32);

    impl Keyed for Counted {
        fn id(&self) -> &BlobId {
            &self.0
        }
        fn absorb(&mut self, repeat: &Self) {
            self.1 += repeat.1;
        }
    }

    fn id(n: u32) -> BlobId {
        BlobId(*blake3::hash(&n.to_le_bytes()).as_bytes())
    }

    #[test]
    fn distinct_keeps_one_item_per_id_with_its_repeats_absorbed() {
        let mut set = Distinct::default();
        // Several merges on the way, with repeats within the tail, across tails, and of ids already merged.
        for round in 0..3u32 {
            for n in 0..(1u32 << 20) + 7 {
                if n % 3 != round % 3 || n < 1000 {
                    set.push(Counted(id(n), 1));
                }
            }
        }
        let sorted = set.into_sorted();
        assert_eq!(sorted.len(), (1 << 20) + 7);
        assert!(sorted.windows(2).all(|w| w[0].0 < w[1].0));
        let mut expected: Vec<(BlobId, u32)> =
            (0..(1u32 << 20) + 7).map(|n| (id(n), if n < 1000 { 3 } else { 2 })).collect();
        expected.sort_unstable();
        assert!(sorted.iter().zip(&expected).all(|(a, e)| (a.0, a.1) == *e));
    }

    #[test]
    fn head_buckets_find_every_id_of_a_sorted_list() {
        let mut ids: Vec<BlobId> = (0..10_000).map(id).chain([BlobId([0; 32]), BlobId([0xff; 32])]).collect();
        ids.sort_unstable();
        let buckets = HeadBuckets::new(ids.iter().map(BlobId::head), ids.len());
        for (i, x) in ids.iter().enumerate() {
            assert!(buckets.range(x.head()).contains(&i), "{x}");
        }
        assert!((10_000..11_000).map(id).all(|x| ids[buckets.range(x.head())].binary_search(&x).is_err()));
    }
}
