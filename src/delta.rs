//! Delta compression of new blocks against similar stored blocks (delta blobs, `format-spec/` §6a).
//!
//! A block that differs from every stored block often still shares most of its 4 KiB pages with one: the same
//! disk offset before the day's writes, or a clone's copy of a template file that the file system placed at
//! another offset. Fixed 1 MiB blocks alone store such a block whole; content-defined chunkers find part of it.
//!
//! Every block stored whole leaves a few **features** in the local cache ([`IndexCache::add_features`]):
//! hashes of its non-zero pages, sampled by content (a page whose hash has its low 5 bits zero, about 1 page in
//! 32), so the same page yields the same feature wherever it lies. A new block's features vote for stored
//! blocks; the winner, if the index lists it as a plain data blob, is read back (a ranged read, verified like
//! any blob) and given to zstd as a prefix ([`BlobSealer::seal_delta`]). The delta is kept when it is clearly
//! smaller than the block compressed on its own.
//!
//! Features exist only in the local cache of the process that stored a block. An incremental from a change
//! list therefore also tries the parent's block at the same offset when no features point anywhere (a new
//! backup host, a wiped cache, a block another backup job stored), if it holds much of the new block in the
//! same places.
//!
//! Bases are never deltas, so restore reads at most one extra blob per delta. Only blocks whose index file is
//! written can be bases, so a base is always in the repository before any delta that names it.
//!
//! Reading a base back costs a round trip to the repository. For an incremental from a change list, the likely
//! base of each changed block is the parent's block at the same offset: [`BasePrefetch`] reads those with a few
//! threads, a bounded window ahead of the disk reader, so that on remote storage the round trips overlap
//! instead of stalling the workers one by one (measured through a 10 ms proxy to S3: 2.46 s without, see
//! `benches/results/2026-11-30-4g-session6.md`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};

use crate::cache::IndexCache;
use crate::error::Result;
use crate::format::index::BlobLocation;
use crate::format::pack::{BlobSealer, SealedBlob, StoredForm};
use crate::format::{BlobId, BlobType};
use crate::repository::{NoDeltas, Repository};
use crate::util::{AlignedBuf, BufferPool};

/// Features are hashes of whole pages of this size (the file systems' block size).
pub const PAGE: usize = 4096;
/// A page is a feature when its hash has these bits zero: 1 page in 32, 8 features per full 1 MiB block.
const SAMPLE_MASK: u64 = 31;
/// Bases kept in memory per worker: neighbouring blocks of a clone often share one.
const KEPT_BASES: usize = 4;
/// How many blocks ahead of the disk reader bases are read; one read a window ago and not taken is dropped (the
/// workers trail the reader by fewer blocks than that). At most two windows of bases are held per disk.
const PREFETCH_WINDOW: u64 = 16;
/// Concurrent base reads of [`BasePrefetch`].
pub const PREFETCH_THREADS: usize = 8;

/// The pool of base plaintext buffers of a backup with `workers` workers: room for what the workers keep and
/// what the prefetch threads read. Bases are read into reused buffers: a fresh megabyte per base cost a page
/// fault and a page clearing per 4 KiB (a tenth of the CPU of the benchmark's CBT incremental, measured).
pub fn base_buffers(workers: usize) -> BufferPool {
    BufferPool::new(PREFETCH_THREADS + workers * (KEPT_BASES + 1))
}

/// The sampled page features of a block (zero pages are never features).
pub fn features(block: &[u8]) -> Vec<u64> {
    block
        .chunks_exact(PAGE)
        .filter(|p| !crate::backup::is_zero(p))
        .map(xxhash_rust::xxh3::xxh3_64)
        .filter(|h| h & SAMPLE_MASK == 0)
        .collect()
}

/// [`same_places`] compares blocks in pieces of this size.
const SAME_PLACE_PIECE: usize = 256;

/// The share of `block` that `base` holds at the same place, as (equal pieces, pieces) of [`SAME_PLACE_PIECE`]
/// bytes: an in-place rewrite of a few bytes per page keeps most pieces, unrelated data none.
fn same_places(block: &[u8], base: &[u8]) -> (usize, usize) {
    let pieces = block.len().div_ceil(SAME_PLACE_PIECE);
    let same = block.chunks(SAME_PLACE_PIECE).zip(base.chunks(SAME_PLACE_PIECE)).filter(|(a, b)| a == b).count();
    (same, pieces)
}

/// What [`DeltaSealer::try_delta`] did.
enum Tried {
    Delta(SealedBlob),
    /// No delta; the block sealed whole if that was done to compare.
    Whole(Option<SealedBlob>),
}

/// Seals new data blocks, as deltas where a similar stored block makes that pay. One per backup worker.
pub struct DeltaSealer<'a> {
    repo: &'a Repository,
    cache: &'a IndexCache,
    prefetch: Option<&'a BasePrefetch>,
    sealer: BlobSealer,
    enabled: bool,
    bases: Vec<(BlobId, Arc<AlignedBuf>)>,
    buffers: BufferPool,
    /// The last base read by this worker itself, as stored: the buffer is reused for the next.
    stored: Vec<u8>,
    /// Deltas written, and bases read by this worker itself (not kept, not prefetched): logged at the end.
    deltas: u64,
    bases_read: u64,
}

impl Drop for DeltaSealer<'_> {
    fn drop(&mut self) {
        for (_, b) in self.bases.drain(..) {
            self.buffers.give_shared(b);
        }
        if self.deltas > 0 {
            tracing::debug!(
                "delta blobs: {} written, {} bases read by the worker itself",
                self.deltas,
                self.bases_read
            );
        }
    }
}

impl<'a> DeltaSealer<'a> {
    /// `enabled` false seals every block on its own (and records no features). `buffers`: the backup's
    /// [`base_buffers`].
    pub fn new(
        repo: &'a Repository,
        cache: &'a IndexCache,
        prefetch: Option<&'a BasePrefetch>,
        buffers: BufferPool,
        enabled: bool,
    ) -> Self {
        let level = repo.config().zstd_level;
        let enabled = enabled && level != 0;
        let sealer = BlobSealer::new(level);
        let (bases, stored) = (Vec::new(), Vec::new());
        DeltaSealer { repo, cache, prefetch, sealer, enabled, bases, buffers, stored, deltas: 0, bases_read: 0 }
    }

    /// Seals a new data block. `likely_base`: the parent's block at the same offset (an incremental from a change
    /// list, [`BasePrefetch::likely_base`]), tried when no stored block shares sampled pages with this one.
    /// `form`: how the source repository of a copy stored the block, sealed as it is when the block is stored
    /// whole.
    pub fn seal(
        &mut self,
        id: BlobId,
        data: &[u8],
        likely_base: Option<BlobId>,
        form: Option<&StoredForm>,
    ) -> Result<SealedBlob> {
        if !self.enabled {
            return Ok(self.seal_whole(id, data, form));
        }
        let features = features(data);
        let whole = match self.try_delta(id, data, &features, likely_base, form) {
            Tried::Delta(d) => {
                self.deltas += 1;
                return Ok(d);
            }
            Tried::Whole(Some(w)) => w,
            Tried::Whole(None) => self.seal_whole(id, data, form),
        };
        // Stored whole: a possible base for later blocks.
        self.cache.add_features(&id, &features)?;
        Ok(whole)
    }

    /// The block sealed on its own: in its stored form if it has one, else compressed here.
    fn seal_whole(&mut self, id: BlobId, data: &[u8], form: Option<&StoredForm>) -> SealedBlob {
        match form {
            Some(form) => self.sealer.seal_stored(self.repo.keys(), id, data, form),
            None => self.sealer.seal(self.repo.keys(), BlobType::Data, id, data),
        }
    }

    /// Seals the block as a delta if a similar stored block makes that pay; otherwise hands back the block
    /// sealed whole if that was needed to decide.
    ///
    /// The base is the stored block most sampled pages point to. Failing that, the likely base: features exist
    /// only in the local cache of the host and process that stored a block whole, so after a new or wiped
    /// cache, or for blocks a second backup job on the host stored, the parent's own block at the offset has
    /// none (measured on the benchmark's day-1 incremental with a fresh cache: 83 MiB stored instead of 48).
    /// A likely base is used only if it holds much of the block at the same places.
    fn try_delta(
        &mut self,
        id: BlobId,
        data: &[u8],
        features: &[u64],
        likely_base: Option<BlobId>,
        form: Option<&StoredForm>,
    ) -> Tried {
        let (base, voted_similar) = match self.candidate(features) {
            // Most sampled pages are in the base.
            Some((base, votes)) => (base, Some(votes * 2 >= features.len())),
            None => match likely_base.filter(|b| *b != id) {
                Some(base) => (base, None),
                None => return Tried::Whole(None),
            },
        };
        let Some(base_plain) = self.base(&base) else { return Tried::Whole(None) };
        let similar = match voted_similar {
            Some(similar) => similar,
            None => match same_places(data, &base_plain) {
                (same, pieces) if same * 2 >= pieces => true,
                (same, pieces) if same * 8 >= pieces => false,
                // Unrelated data (the offset was reused): not worth a delta attempt.
                _ => {
                    self.keep_base(base, base_plain);
                    return Tried::Whole(None);
                }
            },
        };
        let keys = self.repo.keys();
        let delta = self.sealer.seal_delta(keys, id, data, base, &base_plain);
        self.keep_base(base, base_plain);
        let Some(delta) = delta else { return Tried::Whole(None) };
        // The base holds most of the block: the delta wins, no need to compress the block on its own too.
        if similar {
            return Tried::Delta(delta);
        }
        let whole = self.seal_whole(id, data, form);
        if delta.bytes.len() < whole.bytes.len() - whole.bytes.len() / 8 {
            Tried::Delta(delta)
        } else {
            Tried::Whole(Some(whole))
        }
    }

    /// The stored block most of `features` point to, with its number of votes. A cache that cannot be read
    /// only costs the delta.
    fn candidate(&self, features: &[u64]) -> Option<(BlobId, usize)> {
        if features.is_empty() {
            return None;
        }
        let found = match self.cache.blocks_with_features(features) {
            Ok(f) => f,
            Err(e) => {
                tracing::warn!("looking for a delta base: {e}");
                return None;
            }
        };
        let mut votes: Vec<(BlobId, usize)> = Vec::new();
        for b in found {
            match votes.iter_mut().find(|(id, _)| *id == b) {
                Some((_, n)) => *n += 1,
                None => votes.push((b, 1)),
            }
        }
        votes.into_iter().max_by_key(|(_, n)| *n)
    }

    /// The plaintext of a candidate base, if the index lists it as a plain data blob and it reads back intact.
    /// A base that cannot be used only costs the delta: the block is then stored whole.
    fn base(&mut self, id: &BlobId) -> Option<Arc<AlignedBuf>> {
        if let Some(i) = self.bases.iter().position(|(b, _)| b == id) {
            return Some(self.bases.remove(i).1);
        }
        if let Some(b) = self.prefetch.and_then(|p| p.take(id)) {
            return Some(b);
        }
        let loc = match self.cache.lookup_intact(id) {
            Ok(Some(loc)) if loc.entry.can_be_base() => loc,
            // Not indexed (yet, or any more): features are hints.
            Ok(_) => return None,
            Err(e) => {
                tracing::warn!("delta base {id}: {e}");
                return None;
            }
        };
        self.bases_read += 1;
        let mut plain = self.buffers.take();
        match self.repo.read_blob_into(&loc, &NoDeltas, &mut self.stored, &mut plain) {
            Ok(()) => Some(Arc::new(plain)),
            Err(e) => {
                tracing::warn!("delta base {id} unreadable, storing the block whole: {e}");
                self.buffers.give(plain);
                None
            }
        }
    }

    fn keep_base(&mut self, id: BlobId, plain: Arc<AlignedBuf>) {
        if self.bases.len() == KEPT_BASES {
            let (_, oldest) = self.bases.remove(0);
            self.buffers.give_shared(oldest);
        }
        self.bases.push((id, plain));
    }
}

/// Likely bases read ahead of the backup's workers (see the module docs). Each disk has a queue of candidates
/// in the order its reader reads the blocks; a candidate is read once the reader is within `PREFETCH_WINDOW`
/// blocks of it, and dropped if no worker took it by the time the reader is a window past. Every failure only
/// costs the prefetch: the worker then reads the base itself or stores the block whole.
pub struct BasePrefetch {
    state: Mutex<PrefetchState>,
    changed: Condvar,
    /// Per disk: (position in the disk's read order, the candidate's id), by position.
    likely: Vec<Vec<(u64, BlobId)>>,
    /// Where bases are read into, and where those nobody took go back.
    buffers: BufferPool,
}

#[derive(Default)]
struct PrefetchState {
    /// Per disk: (position in the disk's read order, where the candidate base is stored).
    queues: Vec<VecDeque<(u64, BlobLocation)>>,
    /// Per disk: how many blocks its reader has read.
    read: Vec<u64>,
    /// Candidates being read (a worker that needs one waits for it).
    in_flight: HashMap<BlobId, (usize, u64)>,
    /// Candidates read: (disk, position, plaintext).
    ready: HashMap<BlobId, (usize, u64, Arc<AlignedBuf>)>,
    stopped: bool,
}

impl BasePrefetch {
    /// `candidates[d]`: the likely base of each block disk `d` will read, by position in its read order.
    /// `buffers`: the backup's [`base_buffers`].
    pub fn new(candidates: Vec<Vec<(u64, BlobLocation)>>, buffers: BufferPool) -> Self {
        let disks = candidates.len();
        let likely = candidates.iter().map(|c| c.iter().map(|(pos, loc)| (*pos, loc.entry.id)).collect()).collect();
        let state = PrefetchState {
            queues: candidates.into_iter().map(VecDeque::from).collect(),
            read: vec![0; disks],
            ..Default::default()
        };
        BasePrefetch { state: Mutex::new(state), changed: Condvar::new(), likely, buffers }
    }

    /// The candidate base of the block disk `disk` reads at position `pos` of its read order.
    pub fn likely_base(&self, disk: usize, pos: u64) -> Option<BlobId> {
        let likely = self.likely.get(disk)?;
        likely.binary_search_by_key(&pos, |(p, _)| *p).ok().map(|i| likely[i].1)
    }

    pub fn is_empty(&self) -> bool {
        self.lock().queues.iter().all(|q| q.is_empty())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PrefetchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Disk `disk`'s reader has read `count` blocks.
    pub fn advance(&self, disk: usize, count: u64) {
        let mut st = self.lock();
        let PrefetchState { read, ready, .. } = &mut *st;
        read[disk] = count;
        // Read long ago and taken by no worker: not the base chosen (or the block was known).
        for (_, (_, _, base)) in ready.extract_if(|_, (d, pos, _)| *pos + PREFETCH_WINDOW < read[*d]) {
            self.buffers.give_shared(base);
        }
        self.changed.notify_all();
    }

    /// Stops the prefetch threads (the readers are done, or the backup stopped).
    pub fn stop(&self) {
        self.lock().stopped = true;
        self.changed.notify_all();
    }

    /// Runs one prefetch thread until [`BasePrefetch::stop`] or no candidate is left.
    pub fn run(&self, repo: &Repository) {
        let mut stored = Vec::new();
        loop {
            let (disk, pos, loc) = {
                let mut st = self.lock();
                loop {
                    if st.stopped || st.queues.iter().all(|q| q.is_empty()) {
                        return;
                    }
                    let next = (0..st.queues.len())
                        .find(|&d| st.queues[d].front().is_some_and(|(pos, _)| *pos < st.read[d] + PREFETCH_WINDOW));
                    if let Some(d) = next {
                        let (pos, loc) = st.queues[d].pop_front().expect("front exists");
                        // Behind the reader already, or asked for twice: skip.
                        if pos + PREFETCH_WINDOW < st.read[d]
                            || st.in_flight.contains_key(&loc.entry.id)
                            || st.ready.contains_key(&loc.entry.id)
                        {
                            continue;
                        }
                        st.in_flight.insert(loc.entry.id, (d, pos));
                        break (d, pos, loc);
                    }
                    st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                }
            };
            let mut plain = self.buffers.take();
            let read = repo.read_blob_into(&loc, &NoDeltas, &mut stored, &mut plain);
            let mut st = self.lock();
            st.in_flight.remove(&loc.entry.id);
            match read {
                Ok(()) => {
                    st.ready.insert(loc.entry.id, (disk, pos, Arc::new(plain)));
                }
                Err(e) => {
                    tracing::debug!("prefetch of delta base {}: {e}", loc.entry.id);
                    self.buffers.give(plain);
                }
            }
            self.changed.notify_all();
        }
    }

    /// The base `id` if it was read ahead (waiting for it if it is being read).
    fn take(&self, id: &BlobId) -> Option<Arc<AlignedBuf>> {
        let mut st = self.lock();
        while st.in_flight.contains_key(id) {
            st = self.changed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        st.ready.remove(id).map(|(_, _, b)| b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pack::PackWriter;

    /// A local repository holding `blocks` in one pack, and where each is.
    fn repo_with(dir: &std::path::Path, blocks: &[Vec<u8>]) -> (Repository, Vec<BlobLocation>) {
        let repo = crate::repository::test_repository(dir);
        let mut sealer = BlobSealer::new(3);
        let mut w = PackWriter::new(BlobType::Data, 8 << 20);
        for b in blocks {
            w.add(sealer.seal(repo.keys(), BlobType::Data, repo.keys().blob_id(b), b));
        }
        let pack = w.finish(repo.keys());
        let indexed = repo.save_pack(pack).unwrap();
        let locs = indexed.entries.iter().map(|e| BlobLocation { pack: indexed.id, entry: *e }).collect();
        (repo, locs)
    }

    /// Takes `id`, waiting up to a second for the prefetch threads to get to it.
    fn take_within_a_second(p: &BasePrefetch, id: &BlobId) -> Option<Arc<AlignedBuf>> {
        for _ in 0..200 {
            if let Some(b) = p.take(id) {
                return Some(b);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        None
    }

    #[test]
    fn prefetch_reads_ahead_of_the_reader_and_drops_what_nobody_took() {
        let dir = tempfile::tempdir().unwrap();
        let blocks: Vec<Vec<u8>> = (0..40u8).map(|i| vec![i; 4096]).collect();
        let (repo, locs) = repo_with(dir.path(), &blocks);
        // Disk 0 reads 40 blocks; each has a candidate base.
        let candidates = vec![locs.iter().enumerate().map(|(k, l)| (k as u64, *l)).collect()];
        let p = BasePrefetch::new(candidates, base_buffers(2));
        struct StopOnDrop<'a>(&'a BasePrefetch);
        impl Drop for StopOnDrop<'_> {
            fn drop(&mut self) {
                self.0.stop();
            }
        }
        std::thread::scope(|s| {
            for _ in 0..3 {
                s.spawn(|| p.run(&repo));
            }
            let _stop = StopOnDrop(&p);
            p.advance(0, 0);
            // Within the window: read ahead, and handed over once.
            assert_eq!(take_within_a_second(&p, &locs[3].entry.id).as_deref().map(|b| &b[..]), Some(&blocks[3][..]));
            assert!(p.take(&locs[3].entry.id).is_none());
            // Beyond the window: never read while the reader stays put.
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(p.take(&locs[PREFETCH_WINDOW as usize + 5].entry.id).is_none());
            // The reader moves on: what is ahead gets read, what is a window behind it is dropped.
            p.advance(0, 30);
            assert_eq!(take_within_a_second(&p, &locs[35].entry.id).as_deref().map(|b| &b[..]), Some(&blocks[35][..]));
            assert!(p.take(&locs[5].entry.id).is_none(), "read long ago and never taken: dropped");
        });
    }

    #[test]
    fn same_places_counts_the_pieces_a_base_holds_unchanged() {
        let block: Vec<u8> = (0..1u32 << 20).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        assert_eq!(same_places(&block, &block), (4096, 4096));
        // A few bytes rewritten in every 4 KiB page: 15 of every 16 pieces are unchanged.
        let mut rewritten = block.clone();
        for page in rewritten.chunks_mut(PAGE) {
            page[100..110].fill(0xee);
        }
        assert_eq!(same_places(&rewritten, &block), (3840, 4096));
        // The same data a page further on is not in the same places.
        let mut shifted = vec![0u8; PAGE];
        shifted.extend_from_slice(&block[..block.len() - PAGE]);
        assert_eq!(same_places(&shifted, &block), (0, 4096));
        // A short last block (and its base, as short) compares what it has.
        assert_eq!(same_places(&block[..5000], &block[..5000]), (20, 20));
    }

    #[test]
    fn features_are_content_sampled_and_position_independent() {
        let mut block = vec![0u8; 1 << 20];
        blake3::Hasher::new().update(b"pages").finalize_xof().fill(&mut block[..512 * 1024]);
        let f = features(&block);
        // About 1 in 32 of the 128 non-zero pages; zero pages never.
        assert!(!f.is_empty() && f.len() < 20, "{}", f.len());
        // The same pages three pages further on give the same features.
        let mut shifted = vec![0u8; 1 << 20];
        shifted[3 * PAGE..3 * PAGE + 512 * 1024].copy_from_slice(&block[..512 * 1024]);
        assert_eq!(features(&shifted), f);
    }
}
