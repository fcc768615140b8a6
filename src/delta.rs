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
//! Bases are never deltas, so restore reads at most one extra blob per delta. Only blocks whose index file is
//! written can be bases, so a base is always in the repository before any delta that names it.

use crate::cache::IndexCache;
use crate::error::Result;
use crate::format::pack::{BlobSealer, SealedBlob};
use crate::format::{BlobId, BlobType};
use crate::repository::{NoDeltas, Repository};

/// Features are hashes of whole pages of this size (the file systems' block size).
pub const PAGE: usize = 4096;
/// A page is a feature when its hash has these bits zero: 1 page in 32, 8 features per full 1 MiB block.
const SAMPLE_MASK: u64 = 31;
/// Bases kept in memory per worker: neighbouring blocks of a clone often share one.
const KEPT_BASES: usize = 4;

/// The sampled page features of a block (zero pages are never features).
pub fn features(block: &[u8]) -> Vec<u64> {
    block
        .chunks_exact(PAGE)
        .filter(|p| !crate::backup::is_zero(p))
        .map(xxhash_rust::xxh3::xxh3_64)
        .filter(|h| h & SAMPLE_MASK == 0)
        .collect()
}

/// Seals new data blocks, as deltas where a similar stored block makes that pay. One per backup worker.
pub struct DeltaSealer<'a> {
    repo: &'a Repository,
    cache: &'a IndexCache,
    sealer: BlobSealer,
    enabled: bool,
    bases: Vec<(BlobId, Vec<u8>)>,
}

impl<'a> DeltaSealer<'a> {
    /// `enabled` false seals every block on its own (and records no features).
    pub fn new(repo: &'a Repository, cache: &'a IndexCache, enabled: bool) -> Self {
        let level = repo.config().zstd_level;
        DeltaSealer { repo, cache, sealer: BlobSealer::new(level), enabled: enabled && level != 0, bases: Vec::new() }
    }

    pub fn seal(&mut self, id: BlobId, data: &[u8]) -> Result<SealedBlob> {
        if !self.enabled {
            return Ok(self.sealer.seal(self.repo.keys(), BlobType::Data, id, data));
        }
        let features = features(data);
        if let Some((base, votes)) = self.candidate(&features)? {
            if let Some(base_plain) = self.base(&base) {
                let keys = self.repo.keys();
                // Most sampled pages are in the base: the delta wins, no need to compress the block twice.
                if votes * 2 >= features.len() {
                    if let Some(d) = self.sealer.seal_delta(keys, id, data, base, &base_plain) {
                        self.keep_base(base, base_plain);
                        return Ok(d);
                    }
                } else {
                    let whole = self.sealer.seal(keys, BlobType::Data, id, data);
                    let delta = self.sealer.seal_delta(keys, id, data, base, &base_plain);
                    self.keep_base(base, base_plain);
                    match delta {
                        Some(d) if d.bytes.len() < whole.bytes.len() - whole.bytes.len() / 8 => return Ok(d),
                        _ => {
                            self.cache.add_features(&id, &features)?;
                            return Ok(whole);
                        }
                    }
                }
                self.keep_base(base, base_plain);
            }
        }
        let whole = self.sealer.seal(self.repo.keys(), BlobType::Data, id, data);
        self.cache.add_features(&id, &features)?;
        Ok(whole)
    }

    /// The stored block most of `features` point to, with its number of votes.
    fn candidate(&self, features: &[u64]) -> Result<Option<(BlobId, usize)>> {
        if features.is_empty() {
            return Ok(None);
        }
        let mut votes: Vec<(BlobId, usize)> = Vec::new();
        for b in self.cache.blocks_with_features(features)? {
            match votes.iter_mut().find(|(id, _)| *id == b) {
                Some((_, n)) => *n += 1,
                None => votes.push((b, 1)),
            }
        }
        Ok(votes.into_iter().max_by_key(|(_, n)| *n))
    }

    /// The plaintext of a candidate base, if the index lists it as a plain data blob and it reads back intact.
    /// A base that cannot be used only costs the delta: the block is then stored whole.
    fn base(&mut self, id: &BlobId) -> Option<Vec<u8>> {
        if let Some(i) = self.bases.iter().position(|(b, _)| b == id) {
            return Some(self.bases.remove(i).1);
        }
        let loc = match self.cache.lookup(id) {
            Ok(Some(loc)) if !loc.entry.is_delta() && loc.entry.blob_type == BlobType::Data => loc,
            // Not indexed (yet, or any more): features are hints.
            Ok(_) => return None,
            Err(e) => {
                tracing::warn!("delta base {id}: {e}");
                return None;
            }
        };
        match self.repo.read_blob(&loc, &NoDeltas) {
            Ok(plain) => Some(plain),
            Err(e) => {
                tracing::warn!("delta base {id} unreadable, storing the block whole: {e}");
                None
            }
        }
    }

    fn keep_base(&mut self, id: BlobId, plain: Vec<u8>) {
        if self.bases.len() == KEPT_BASES {
            self.bases.remove(0);
        }
        self.bases.push((id, plain));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
