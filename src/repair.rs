//! Rebuilding the index from the packs themselves.
//!
//! Every pack carries its own encrypted header, so the index is never the only copy of where blobs are.
//! - [`rebuild_index`] (`repair index`) reads every pack header and replaces all index files.
//! - [`adopt_unindexed_packs`] (at the start of every backup) indexes packs that a killed backup stored but
//!   did not get to list in an index file, so that the rerun deduplicates against them instead of uploading
//!   their blocks again.

use rayon::prelude::*;

use crate::backend::ObjectInfo;
use crate::cache::IndexCache;
use crate::error::Result;
use crate::format::index::{IndexFile, IndexedPack};
use crate::format::{names, BlobId, ObjectId};
use crate::repository::Repository;

/// Packs per index file written by repair and adoption.
const PACKS_PER_INDEX_FILE: usize = 512;

#[derive(Debug, Default)]
pub struct RepairReport {
    pub packs_indexed: usize,
    pub blobs_indexed: usize,
    pub index_files_written: usize,
    pub index_files_removed: usize,
    /// Packs whose header could not be read: name and cause. They are left in place, not indexed.
    pub unreadable: Vec<String>,
}

fn list_packs(repo: &Repository) -> Result<Vec<(ObjectId, u64)>> {
    Ok(repo
        .backend()
        .list(names::PACKS)?
        .into_iter()
        .filter_map(|ObjectInfo { name, size }| {
            let id = name.rsplit('/').next().and_then(BlobId::from_hex)?;
            (names::pack(&id) == name).then_some((id, size))
        })
        .collect())
}

/// Reads the headers of `packs` in parallel; returns the readable ones and the problems.
fn read_headers(repo: &Repository, packs: &[(ObjectId, u64)], report: &mut RepairReport) -> Vec<IndexedPack> {
    let results: Vec<std::result::Result<IndexedPack, String>> = packs
        .par_iter()
        .map(|(id, size)| {
            repo.read_pack_header(id, *size)
                .map(|h| IndexedPack { id: *id, pack_type: h.pack_type, entries: h.entries })
                .map_err(|e| e.to_string())
        })
        .collect();
    let mut good = Vec::new();
    for r in results {
        match r {
            Ok(p) => good.push(p),
            Err(e) => report.unreadable.push(e),
        }
    }
    good
}

/// Writes index files for `packs`, each superseding `supersedes`; records them in the cache if given.
fn write_index_files(
    repo: &Repository,
    cache: Option<&IndexCache>,
    packs: Vec<IndexedPack>,
    supersedes: &[ObjectId],
    report: &mut RepairReport,
) -> Result<Vec<ObjectId>> {
    let mut written = Vec::new();
    let mut packs = packs;
    while !packs.is_empty() {
        let rest = packs.split_off(packs.len().min(PACKS_PER_INDEX_FILE));
        let file = IndexFile { supersedes: supersedes.to_vec(), packs };
        report.packs_indexed += file.packs.len();
        report.blobs_indexed += file.blob_count();
        let id = repo.save_index(&file)?;
        if let Some(c) = cache {
            c.insert_index_file(&id, &file)?;
        }
        written.push(id);
        report.index_files_written += 1;
        packs = rest;
    }
    Ok(written)
}

/// Replaces every index file by index files rebuilt from the pack headers.
///
/// Order makes it safe to interrupt and safe next to running backups: the new index files are all written
/// before any old one is deleted, and only the index files that existed when the repair started are deleted
/// (a backup's index file written meanwhile stays).
pub fn rebuild_index(repo: &Repository) -> Result<RepairReport> {
    let mut report = RepairReport::default();
    let old = repo.list_index_ids()?;
    let packs = list_packs(repo)?;
    let good = read_headers(repo, &packs, &mut report);
    let new = write_index_files(repo, None, good, &old, &mut report)?;
    for id in old.iter().filter(|id| !new.contains(id)) {
        repo.backend().delete(&names::index(id))?;
        report.index_files_removed += 1;
    }
    Ok(report)
}

/// Indexes packs that no index file lists yet (left by an interrupted backup), and records them in the cache.
pub fn adopt_unindexed_packs(repo: &Repository, cache: &IndexCache) -> Result<RepairReport> {
    let mut report = RepairReport::default();
    let mut orphans = Vec::new();
    for (id, size) in list_packs(repo)? {
        if !cache.knows_pack(&id)? {
            orphans.push((id, size));
        }
    }
    if orphans.is_empty() {
        return Ok(report);
    }
    let good = read_headers(repo, &orphans, &mut report);
    write_index_files(repo, Some(cache), good, &[], &mut report)?;
    for u in &report.unreadable {
        tracing::warn!("not adopting a pack: {u}");
    }
    Ok(report)
}
