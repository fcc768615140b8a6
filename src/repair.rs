//! Rebuilding the index from the packs themselves.
//!
//! Every pack carries its own encrypted header, so the index is never the only copy of where blobs are.
//! - [`rebuild_index`] (`repair index`) reads every pack header and replaces all index files.
//! - [`adopt_unindexed_packs`] (at the start of every backup) indexes packs that a killed backup stored but
//!   did not get to list in an index file, so that the rerun deduplicates against them instead of uploading
//!   their blocks again.
//! - [`repair_packs`] (`repair packs`) takes damaged packs out of the repository, keeping their intact blobs in
//!   new packs. A damaged blob then no longer counts as stored: the next backup of a disk that still holds
//!   the block stores it again, and every older snapshot that references it becomes restorable again (blobs
//!   are found by id). As long as a damaged blob stays indexed, backups deduplicate against it and new
//!   snapshots inherit the damage.

use rayon::prelude::*;

use crate::backend::ObjectInfo;
use crate::cache::IndexCache;
use crate::error::{Error, Result};
use crate::format::index::{IndexFile, IndexedPack};
use crate::format::pack::{PackWriters, SealedBlob};
use crate::format::{names, BlobId, BlobType, ObjectId};
use crate::repository::Repository;

/// Temporary objects older than this belong to dead writers (a live one finishes a pack in seconds).
pub const STALE_TEMPORARY_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

#[derive(Debug, Default)]
pub struct RepairReport {
    pub packs_indexed: usize,
    pub blobs_indexed: usize,
    pub index_files_written: usize,
    pub index_files_removed: usize,
    /// Temporary objects of unfinished writes removed.
    pub temporaries_removed: usize,
    /// Packs whose header could not be read: name and cause. They are left in place, not indexed.
    pub unreadable: Vec<String>,
}

pub(crate) fn list_packs(repo: &Repository) -> Result<Vec<(ObjectId, u64)>> {
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
pub(crate) fn read_headers(
    repo: &Repository,
    packs: &[(ObjectId, u64)],
    report: &mut RepairReport,
) -> Result<Vec<IndexedPack>> {
    let results: Vec<std::result::Result<IndexedPack, String>> = crate::util::with_request_threads(|| {
        packs
            .par_iter()
            .map(|(id, size)| {
                repo.read_pack_header(id, *size)
                    .map(|h| IndexedPack { id: *id, pack_type: h.pack_type, entries: h.entries })
                    .map_err(|e| e.to_string())
            })
            .collect()
    })?;
    let mut good = Vec::new();
    for r in results {
        match r {
            Ok(p) => good.push(p),
            Err(e) => report.unreadable.push(e),
        }
    }
    Ok(good)
}

/// Writes index files for `packs`, each superseding `supersedes`; records them in the cache if given.
pub(crate) fn write_index_files(
    repo: &Repository,
    cache: Option<&IndexCache>,
    packs: Vec<IndexedPack>,
    supersedes: &[ObjectId],
    report: &mut RepairReport,
) -> Result<Vec<ObjectId>> {
    let mut written = Vec::new();
    for packs in crate::format::index::file_groups(packs) {
        let file = IndexFile { supersedes: supersedes.to_vec(), packs };
        report.packs_indexed += file.packs.len();
        report.blobs_indexed += file.blob_count();
        let id = repo.save_index(&file)?;
        if let Some(c) = cache {
            c.insert_index_file(&id, &file)?;
        }
        written.push(id);
        report.index_files_written += 1;
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
    // Packs a prune dropped from the index stay out of it (format-spec §9b).
    let doomed = repo.doomed_packs()?;
    let packs: Vec<(ObjectId, u64)> =
        list_packs(repo)?.into_iter().filter(|(id, _)| doomed.binary_search(id).is_err()).collect();
    let good = read_headers(repo, &packs, &mut report)?;
    let new = write_index_files(repo, None, good, &old, &mut report)?;
    for id in old.iter().filter(|id| !new.contains(id)) {
        repo.backend().delete(&names::index(id))?;
        report.index_files_removed += 1;
    }
    report.temporaries_removed = repo.backend().remove_stale_temporaries(STALE_TEMPORARY_AGE)?;
    Ok(report)
}

/// Indexes packs that no index file lists yet (left by an interrupted backup), and records them in the cache.
pub fn adopt_unindexed_packs(repo: &Repository, cache: &IndexCache) -> Result<RepairReport> {
    let mut report = RepairReport::default();
    let mut orphans = Vec::new();
    let packs = list_packs(repo)?;
    if packs.iter().all(|(id, _)| cache.knows_pack(id).unwrap_or(false)) {
        return Ok(report);
    }
    // Packs a prune dropped from the index are not orphans (format-spec §9b).
    let doomed = repo.doomed_packs()?;
    for (id, size) in packs {
        if !cache.knows_pack(&id)? && doomed.binary_search(&id).is_err() {
            orphans.push((id, size));
        }
    }
    if orphans.is_empty() {
        return Ok(report);
    }
    let good = read_headers(repo, &orphans, &mut report)?;
    write_index_files(repo, Some(cache), good, &[], &mut report)?;
    for u in &report.unreadable {
        tracing::warn!("not adopting a pack: {u}");
    }
    Ok(report)
}

/// What [`repair_packs`] found in one pack.
#[derive(Debug)]
pub struct PackRepair {
    pub pack: ObjectId,
    /// Blobs copied into new packs.
    pub salvaged: usize,
    /// Blobs that could not be verified, with the cause; they are no longer in the index.
    pub lost: Vec<(BlobId, String)>,
    /// Every blob verified, the header and the pack's name agree with its bytes: the pack was left as it is.
    pub intact: bool,
    /// What else was wrong with the pack (its header, its name), if anything.
    pub damage: Option<String>,
}

/// Takes the damaged blobs of `packs` out of the repository: every blob of each pack is verified (as prune
/// does before copying), the intact ones are copied into new packs, and index files listing the pack are
/// replaced by ones listing the new packs instead; then the pack is deleted. A pack whose blobs all verify is
/// left as it is. A pack that is no longer stored loses all its blobs; one that cannot be read for another
/// reason (a storage error) stops the repair.
///
/// Call with the exclusive lock held. Refused while sessions run: they may read the packs being deleted (prune
/// waits for them instead; a damaged pack must not wait to be rescued by its own damaged blobs). Order makes
/// an interrupted run safe to repeat: new packs, new index files, then the old index files are deleted, then
/// the packs. A pack no index file lists but still stored is accepted too (read by its header).
pub fn repair_packs(repo: &Repository, packs: &[ObjectId]) -> Result<Vec<PackRepair>> {
    let mut packs = packs.to_vec();
    packs.sort();
    packs.dedup();
    let live = crate::lock::live_sessions(repo)?;
    if !live.is_empty() {
        let who: Vec<String> = live.iter().map(|s| s.describe()).collect();
        return Err(Error::invalid(format!(
            "{} running: repair packs deletes packs they may be reading; run it when they have ended ({})",
            crate::util::count(live.len(), "session"),
            who.join("; ")
        )));
    }
    // The index files that list the packs, and each pack's entries as indexed (its own header may be damaged).
    let mut listing: Vec<(ObjectId, IndexFile)> = Vec::new();
    let mut entries: std::collections::HashMap<ObjectId, IndexedPack> = std::collections::HashMap::new();
    for iid in repo.list_index_ids()? {
        let file = repo.load_index(&iid)?;
        let mut lists = false;
        for p in &file.packs {
            if packs.contains(&p.id) {
                lists = true;
                entries.entry(p.id).or_insert_with(|| p.clone());
            }
        }
        if lists {
            listing.push((iid, file));
        }
    }
    let mut results = Vec::new();
    let mut dropped = Vec::new();
    let mut writers = PackWriters::new(repo.config().pack_target_size as usize);
    let mut new_packs = Vec::new();
    for id in &packs {
        let name = names::pack(id);
        // A stored pack no index file lists (left by an interrupted run, or not adopted yet) is read by its
        // own header; without one, nothing in it can be salvaged.
        let unindexed;
        let indexed = match entries.get(id) {
            Some(p) => p,
            None => {
                let Some(size) = repo.backend().size(&name)? else {
                    return Err(Error::invalid(format!("{name} is neither in the index nor stored")));
                };
                unindexed = match repo.read_pack_header(id, size) {
                    Ok(h) => IndexedPack { id: *id, pack_type: h.pack_type, entries: h.entries },
                    Err(_) => IndexedPack { id: *id, pack_type: BlobType::Data, entries: Vec::new() },
                };
                &unindexed
            }
        };
        if let Some(left) = repo.backend().retention_left(&name)? {
            return Err(Error::invalid(format!(
                "{name} is under object-lock retention for {} s more and cannot be deleted yet",
                left.as_secs()
            )));
        }
        let mut report = PackRepair { pack: *id, salvaged: 0, lost: Vec::new(), intact: false, damage: None };
        match repo.backend().get(&name) {
            // Gone: its blobs are lost. Any other failure (a storage error) stops the repair: a pack that could
            // not be read this time is not damaged for that.
            Err(e @ Error::Missing { .. }) => {
                report.lost = indexed.entries.iter().map(|en| (en.id, e.to_string())).collect()
            }
            Err(e) => return Err(e),
            Ok(bytes) => {
                let mut intact = Vec::new();
                for e in &indexed.entries {
                    let verified = match bytes.get(e.offset as usize..e.end() as usize) {
                        None => Err("beyond the end of the pack".to_string()),
                        Some(stored) => crate::format::pack::verify_for_copy(repo.keys(), e, stored).map(|()| stored),
                    };
                    match verified {
                        Ok(stored) => intact.push(SealedBlob::copy_of(e, stored)),
                        Err(cause) => report.lost.push((e.id, cause)),
                    }
                }
                // Intact blobs in a pack whose header or name no longer fits its bytes are moved too: `repair
                // index` rebuilds the index from headers, and check would keep reporting the pack.
                report.damage = match crate::format::pack::read_header(repo.keys(), &bytes) {
                    Err(e) => Some(format!("header: {e}")),
                    Ok(h) if h.entries != indexed.entries => Some("header does not match the index".into()),
                    Ok(_) if ObjectId::of_file(&bytes) != *id => Some("content does not match its name".into()),
                    Ok(_) => None,
                };
                if report.lost.is_empty() && report.damage.is_none() {
                    report.intact = true;
                    results.push(report);
                    continue;
                }
                report.salvaged = intact.len();
                for blob in intact {
                    if let Some(full) = writers.add(blob) {
                        new_packs.push(repo.save_pack(full.finish(repo.keys()))?);
                    }
                }
            }
        }
        dropped.push(*id);
        results.push(report);
    }
    if dropped.is_empty() {
        return Ok(results);
    }
    // The lost blobs are recorded (format-spec §8d) before their packs go, so that a changed-areas incremental
    // whose change list leaves such a block out still reads it again rather than reuse the lost id.
    let lost: Vec<(ObjectId, BlobId)> =
        results.iter().flat_map(|r| r.lost.iter().map(|(blob, _)| (r.pack, *blob))).collect();
    crate::damage::record_found(repo, &crate::damage::load(repo)?.damage, lost);
    for w in writers.finish() {
        new_packs.push(repo.save_pack(w.finish(repo.keys()))?);
    }
    let replaced: Vec<ObjectId> = listing.iter().map(|(iid, _)| *iid).collect();
    let mut kept: Vec<IndexedPack> =
        listing.into_iter().flat_map(|(_, f)| f.packs).filter(|p| !dropped.contains(&p.id)).collect();
    kept.sort_by_key(|p| p.id);
    kept.dedup_by_key(|p| p.id);
    kept.extend(new_packs);
    write_index_files(repo, None, kept, &replaced, &mut RepairReport::default())?;
    // Index files first: a reader that still loaded one naming a deleted pack could look a salvaged blob up
    // there. A pack left stored by an interruption here is unindexed; a second run removes it.
    for iid in &replaced {
        repo.backend().delete(&names::index(iid))?;
    }
    for id in &dropped {
        repo.backend().delete(&names::pack(id))?;
    }
    Ok(results)
}

/// One repaired snapshot: the damaged one, its replacement, and what was lost per disk.
#[derive(Debug)]
pub struct RepairedSnapshot {
    pub old: ObjectId,
    pub new: ObjectId,
    pub lost: Vec<(String, Vec<(u64, u64)>)>,
}

/// Writes, for every snapshot with unreadable blocks, a new snapshot whose manifest marks those blocks as
/// lost: they restore as zeros, and the snapshot says so (tag `repaired`, annotations
/// `repaired.from` and `repaired.damaged.<disk>` with the byte ranges). With `forget`, the damaged snapshots
/// are then removed. Nothing is changed silently: the caller lists `affected` before asking for this.
pub fn repair_snapshots(
    repo: &Repository,
    cache: &IndexCache,
    affected: &[crate::check::AffectedDisk],
    forget: bool,
) -> Result<Vec<RepairedSnapshot>> {
    use crate::format::pack::{BlobSealer, PackWriter};
    use crate::format::snapshot::SegmentRef;
    use crate::format::{BlobType, SEGMENT_BLOCKS};
    use std::collections::{BTreeMap, HashSet};

    let mut by_snapshot: BTreeMap<ObjectId, Vec<&crate::check::AffectedDisk>> = BTreeMap::new();
    for a in affected {
        by_snapshot.entry(a.snapshot).or_default().push(a);
    }
    let mut sealer = BlobSealer::new(repo.config().zstd_level);
    let mut writer = PackWriter::new(BlobType::Segment, 1 << 20);
    let mut new_segments: HashSet<BlobId> = HashSet::new();
    let mut planned = Vec::new();
    for (sid, disks) in by_snapshot {
        let mut snap = repo.load_snapshot(&sid)?;
        let mut lost = Vec::new();
        for a in disks {
            let Some(disk) = snap.disks.iter_mut().find(|d| d.name == a.disk) else { continue };
            let bs = disk.block_size as u64;
            for (k, seg) in disk.segments.iter_mut().enumerate() {
                let first = k as u64 * SEGMENT_BLOCKS as u64;
                if !a.blocks.overlaps(first..first + seg.blocks as u64) {
                    continue;
                }
                // A lost segment: all its ids are gone, every block of it is marked lost.
                let mut ids = crate::backup::load_segment(repo, cache, seg)
                    .unwrap_or_else(|_| vec![BlobId::ZERO; seg.blocks as usize]);
                for (j, id) in ids.iter_mut().enumerate() {
                    if a.blocks.contains(first + j as u64) {
                        *id = BlobId::ZERO;
                    }
                }
                let plain: Vec<u8> = ids.iter().flat_map(|id| id.0).collect();
                let new_id = repo.keys().blob_id(&plain);
                if !cache.contains(&new_id)? && new_segments.insert(new_id) {
                    writer.add(sealer.seal(repo.keys(), BlobType::Segment, new_id, &plain));
                }
                *seg = SegmentRef { id: new_id, blocks: seg.blocks };
            }
            let ranges = a.blocks.byte_ranges(bs, disk.capacity);
            let text: Vec<String> = ranges.iter().map(|(s, e)| format!("{s}-{e}")).collect();
            snap.annotations.insert(format!("repaired.damaged.{}", disk.name), text.join(","));
            lost.push((disk.name.clone(), ranges));
        }
        snap.annotations.insert("repaired.from".into(), sid.hex());
        if !snap.tags.iter().any(|t| t == "repaired") {
            snap.tags.push("repaired".into());
        }
        planned.push((sid, snap, lost));
    }
    // Commit order: the segment pack, its index file, then the snapshots, then (optionally) the removals.
    if !writer.is_empty() {
        let pack = writer.finish(repo.keys());
        let file = IndexFile { supersedes: Vec::new(), packs: vec![repo.save_pack(pack)?] };
        let index_id = repo.save_index(&file)?;
        cache.insert_index_file(&index_id, &file)?;
    }
    let mut out = Vec::new();
    for (old, snap, lost) in planned {
        let new = repo.save_snapshot(&snap)?;
        out.push(RepairedSnapshot { old, new, lost });
    }
    if forget {
        for r in &out {
            repo.backend().delete(&names::snapshot(&r.old))?;
        }
    }
    Ok(out)
}
