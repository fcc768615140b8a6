//! `prune`: deletes the packs no snapshot needs and repacks the partly used ones, next to running backups
//! from any number of hosts, in bounded memory.
//!
//! One run:
//! 1. **Finish earlier prunes.** A deletion record (`deletions/<id>`) names packs an earlier prune took out of
//!    the index. Once every session it waits for has ended, the packs are searched for anything written since
//!    (newer snapshots, newer segment blobs, index files listing the pack again); what is referenced is
//!    *rescued* (indexed again), the rest is deleted, except objects still under Object Lock retention.
//! 2. **Mark** (only if no record still waits for sessions: one generation at a time): every block and
//!    segment id the snapshots reference goes into a scratch RocksDB, never into an in-memory map.
//! 3. **Sweep and rewrite**: which copy of each marked blob is in use is decided first, in one ordered pass over
//!    the scratch database (`claim_copies`); then the index files are streamed one at a time; each pack is
//!    kept, repacked (its used blobs copied into new packs) or dropped; the kept and new packs go into new index
//!    files, then the old index files are deleted.
//! 4. **Record**: the dropped packs, the snapshots and index files of this run and the live sessions go into a
//!    deletion record. With no session alive, step 1 runs on it at once.
//!
//! Why this is safe without synchronised clocks (`format-spec/README.md` §9b): a backup, restore or check
//! holds a session marker from before it reads the index until it is done. A process whose session started
//! after the rewrite never sees the dropped packs (its index cache takes out what vanished index files listed,
//! adoption skips recorded packs, and backups re-read parent segments that are no longer indexed). A process
//! whose session started before is listed in the record, and the packs wait for it; what it committed
//! meanwhile is found by the rescue search before anything is deleted.

use std::collections::HashMap;
use std::path::Path;

use rayon::prelude::*;

use crate::cache::ScratchDb;
use crate::crypto::KeyEpoch;
use crate::damage::KnownDamage;
use crate::error::{Error, Result};
use crate::format::checkpoint::Checkpoint;
use crate::format::deletion::DeletionRecord;
use crate::format::index::{self, BlobLocation, IndexFile, IndexedPack};
use crate::format::pack::{PackWriter, PackWriters, SealedBlob};
use crate::format::snapshot::{segment_ids, SegmentRef};
use crate::format::{names, BlobId, BlobType, ObjectId};
use crate::repository::{NoDeltas, Repository};

/// Scratch tables (first key byte).
const MARKED: u8 = b'm';
const INDEXED_PACK: u8 = b'i';
const SEGMENT_AT: u8 = b'l';
const SEEN_PACK: u8 = b's';
const PACK_SIZE: u8 = b'z';
const DOOMED_BLOB: u8 = b'd';
const RESCUED: u8 = b'r';
/// `m ‖ blob id ‖ file ‖ pack ‖ entry` (u32 BE each: the index file's place in the sweep's list, the pack's in
/// the file, the entry's in the pack) → the pack's id: a copy of the blob that the sweep decides on. These keys
/// sort right after the blob's mark (`m ‖ blob id`), so one ordered pass meets each blob's mark and then its copies
/// in the order the sweep meets them ([`claim_copies`]).
const COPY: u8 = MARKED;
/// Packs listed by an index file [`claim_copies`] has gone through.
const FIRST_LISTING: u8 = b'f';
/// `u ‖ file ‖ pack ‖ entry` → empty: that copy is in use.
const USED: u8 = b'u';
/// Values of `SEEN_PACK`.
const KEEP: u8 = 1;
const DROPPED: u8 = 0;

/// Segments loaded and marked per parallel batch.
const MARK_BATCH: usize = 64;
/// Keys written to the scratch database at once (a few MiB), in key order ([`ScratchDb::put_all_keyed`]): the
/// longer the sorted runs, the less each key costs its memtable.
const SCRATCH_WRITE: usize = 1 << 16;
/// An index file listing under a quarter of what a full one does ([`index::is_full`]; each backup writes one or
/// a few such) is merged into full ones when the prune replaces another index file anyway, since every host's
/// local cache then catches up with the prune (§12), to which the merged files add little...
const SMALL_INDEX_FILE_FRACTION: usize = 4;
/// ...or on its own once this many small ones have piled up ([`PruneOptions::small_index_files_to_merge`]).
pub const SMALL_INDEX_FILES_TO_MERGE: usize = 256;

#[derive(Clone, Debug)]
pub struct PruneOptions {
    /// Repack a data pack when more than this fraction of its bytes is unused (0.0 to 1.0).
    pub max_unused: f64,
    /// Copy at most this many bytes while repacking (`None`: no limit).
    pub max_repack: Option<u64>,
    /// Report what would be done; change nothing.
    pub dry_run: bool,
    /// After a `key rotate`: repack every pack holding a blob sealed with an older key epoch (within
    /// `max_repack`), sealing those blobs again with the current one, and rewrite index files sealed with an
    /// older epoch, so that a revoked key no longer opens the disk data even where it can reach the storage.
    pub reencrypt: bool,
    /// Small index files are merged even when no other index file is replaced once this many exist.
    pub small_index_files_to_merge: usize,
}

impl Default for PruneOptions {
    fn default() -> Self {
        PruneOptions {
            max_unused: 0.1,
            max_repack: None,
            dry_run: false,
            reencrypt: false,
            small_index_files_to_merge: SMALL_INDEX_FILES_TO_MERGE,
        }
    }
}

#[derive(Debug, Default)]
pub struct PruneReport {
    pub snapshots: usize,
    pub blobs_in_use: u64,
    pub packs: u64,
    pub pack_bytes: u64,
    /// Packs no snapshot needs (dropped whole).
    pub packs_unused: u64,
    pub bytes_unused: u64,
    /// Packs whose used blobs were copied into new packs.
    pub packs_repacked: u64,
    pub bytes_repacked: u64,
    pub bytes_copied: u64,
    /// With `reencrypt`: blobs sealed again with the current key epoch.
    pub blobs_resealed: u64,
    /// With `reencrypt`: blobs of an older key epoch left as they are (beyond `max_repack`).
    pub blobs_of_older_epochs_left: u64,
    /// Unused bytes left in kept packs (below `--max-unused` or beyond `--max-repack`).
    pub unused_bytes_kept: u64,
    /// Indexed packs that are missing from storage (left listed: `check` reports them).
    pub packs_missing: u64,
    /// Packs no index file listed, indexed before the sweep.
    pub packs_adopted: u64,
    pub index_files_written: usize,
    pub index_files_removed: usize,
    /// Of those removed, small index files whose packs all stayed, merged into the new ones.
    pub index_files_compacted: usize,
    /// Of earlier records and this run's: packs deleted, rescued, held back by retention, still waiting.
    pub packs_deleted: u64,
    pub bytes_deleted: u64,
    pub packs_rescued: u64,
    pub packs_retained: u64,
    pub packs_waiting: u64,
    /// The sessions deletion waits for, described.
    pub waiting_for: Vec<String>,
    /// False if no new plan was made because an earlier record still waits for sessions.
    pub planned: bool,
    pub temporaries_removed: usize,
    /// Checkpoints of interrupted backups that can no longer be continued, deleted (§8c).
    pub checkpoints_removed: usize,
    pub warnings: Vec<String>,
    /// Seconds spent per phase, in order.
    pub phases: Vec<(&'static str, f64)>,
}

/// Runs a prune. Holds the exclusive lock throughout; backups, restores and checks keep running.
pub fn run(repo: &Repository, cache_root: &Path, opts: &PruneOptions) -> Result<PruneReport> {
    let _lock = crate::lock::acquire_exclusive(repo, "prune")?;
    let mut report = PruneReport::default();
    let mut clock = std::time::Instant::now();
    let mut phase = |report: &mut PruneReport, name: &'static str| {
        let secs = clock.elapsed().as_secs_f64();
        tracing::info!("prune: {name}: {secs:.2} s");
        report.phases.push((name, secs));
        clock = std::time::Instant::now();
    };
    let scratch = ScratchDb::create(repo, cache_root, "prune-work")?;
    for info in repo.backend().list(names::PACKS)? {
        if let Some(id) = info.name.rsplit('/').next().and_then(BlobId::from_hex) {
            scratch.put(PACK_SIZE, &id, &info.size.to_le_bytes())?;
        }
    }
    let live = crate::lock::live_sessions(repo)?;

    // 1. Earlier records. One that cannot be read is set aside: its packs, out of the index, are adopted in
    // step 2 as unindexed ones and swept again, instead of being deleted on its word.
    let (records, unreadable) = repo.list_deletions_checked()?;
    for (rid, e) in unreadable {
        // A newer format's record is that version's to finish.
        if !matches!(e, Error::Corrupt { .. }) {
            return Err(e);
        }
        tracing::warn!("{e}; its packs are indexed again and swept anew");
        if !opts.dry_run {
            repo.backend().delete(&names::deletion(&rid))?;
        }
    }
    let mut waiting = false;
    for (rid, rec) in records {
        if opts.dry_run {
            report.packs_waiting += rec.packs.len() as u64;
            continue;
        }
        waiting |= finish_record(repo, &scratch, rid, rec, &live, &mut report)?;
    }
    if waiting {
        return Ok(report);
    }

    phase(&mut report, "finish earlier records");

    // 2. Mark. Where the segment blobs are comes from the index files themselves (not the local index cache,
    // which would hold every blob).
    let mut noted = std::collections::HashSet::new();
    each_index_file(
        &repo.list_index_files()?,
        |id| repo.load_index(id),
        |id, file| {
            let file = file.map_err(|e| {
                e.with_remedy(
                    "prune deletes nothing while an index file is damaged: `repair index` rebuilds it from the packs' \
                 own headers",
                )
            })?;
            note_index_file(&scratch, &file)?;
            noted.insert(*id);
            Ok(())
        },
    )?;
    // Packs no index file lists (an interrupted backup's or prune's) are indexed first, so that they are swept
    // like any other. One that a running backup is about to index is dropped here, waits for that backup's
    // session, and is then rescued by its snapshot.
    report.packs_adopted = adopt_unindexed(repo, &scratch, &mut report)?;
    phase(&mut report, "read the index, adopt unindexed packs");
    let (snapshots, unreadable) = repo.list_snapshots_checked()?;
    // What an unreadable snapshot references is unknown: deleting anything could take its data.
    if let Some((id, e)) = unreadable.first() {
        let remedy = match e {
            Error::Corrupt { .. } => format!(
                "put the object back from elsewhere (an older version in the bucket), or remove the snapshot: \
                 `diskvault forget {}`",
                id.hex()
            ),
            _ => "prune with the diskvault that wrote it".into(),
        };
        return Err(Error::invalid(format!(
            "{e}; prune cannot tell which data this snapshot uses, so it deletes nothing: {remedy}"
        )));
    }
    report.snapshots = snapshots.len();
    // A backup may have committed since the index was read: its snapshot is listed, its index file (written
    // before the snapshot) is not noted yet. Note the index files that appeared, so its segments are found.
    for id in repo.list_index_ids()? {
        if !noted.contains(&id) {
            note_index_file(&scratch, &repo.load_index(&id)?)?;
        }
    }
    mark(repo, &scratch, &snapshots)?;
    let checkpoints = current_checkpoints(repo, &snapshots, opts.dry_run, &mut report)?;
    mark_checkpoints(repo, &scratch, &checkpoints, &mut report)?;
    let mut snapshot_ids: Vec<ObjectId> = snapshots.iter().map(|(id, _)| *id).collect();
    snapshot_ids.sort();
    drop(snapshots);
    phase(&mut report, "mark");

    // 3. Sweep and rewrite, the copies in use decided first.
    let damage = crate::damage::load(repo)?;
    for e in &damage.unreadable {
        report.warnings.push(format!("{e}: a damage record, left out"));
    }
    // One listing for both: the sweep meets the packs in the order the copies in use were decided for.
    let index_files = repo.list_index_files()?;
    claim_copies(repo, &scratch, &index_files, &damage.damage)?;
    phase(&mut report, "find the copies in use");
    let mut sweep = Sweep::new(repo, &scratch, opts);
    each_index_file(
        &index_files,
        |id| repo.load_index_with_epoch(id),
        |id, loaded| {
            let (file, epoch) = loaded?;
            sweep.file(*id, file, epoch, &mut report)
        },
    )?;
    let SweepResult { doomed, accounted, replaced } = sweep.finish(&mut report)?;
    phase(&mut report, "sweep and write the index");
    report.planned = true;
    if opts.dry_run {
        return Ok(report);
    }
    let deleted: Vec<Result<()>> = crate::util::with_request_threads(|| {
        replaced.par_iter().map(|id| repo.backend().delete(&names::index(id))).collect()
    })?;
    for r in deleted {
        r?;
        report.index_files_removed += 1;
    }
    report.temporaries_removed = repo.backend().remove_stale_temporaries(crate::repair::STALE_TEMPORARY_AGE)?;
    if doomed.is_empty() {
        return Ok(report);
    }

    // 4. Record, then finish it at once if nobody is to be waited for.
    let sessions: Vec<String> = crate::lock::live_sessions(repo)?.into_iter().map(|s| s.name).collect();
    let rec = DeletionRecord {
        created_secs: crate::util::now_secs(),
        hostname: crate::util::hostname(),
        packs: doomed,
        snapshots: snapshot_ids,
        index_files: accounted,
        sessions,
        released: false,
    };
    let rid = repo.save_deletion(&rec)?;
    let live = crate::lock::live_sessions(repo)?;
    finish_record(repo, &scratch, rid, rec, &live, &mut report)?;
    phase(&mut report, "record, rescue search, delete");
    Ok(report)
}

/// Marks every segment and block the snapshots reference. Returns how many distinct ids were marked.
fn mark(
    repo: &Repository,
    scratch: &ScratchDb,
    snapshots: &[(ObjectId, crate::format::snapshot::Snapshot)],
) -> Result<()> {
    let flush = |batch: &mut Vec<(ObjectId, String, SegmentRef)>| -> Result<()> {
        let loaded: Vec<Vec<BlobId>> = batch
            .par_iter()
            .map(|(sid, disk, seg)| {
                load_segment(repo, scratch, seg).map_err(|e| {
                    Error::invalid(format!(
                        "snapshot {} disk {disk}: {e}; prune stops without deleting anything (run `check`)",
                        sid.short()
                    ))
                })
            })
            .collect::<Result<_>>()?;
        mark_segments(scratch, batch.iter().map(|(_, _, seg)| seg).zip(&loaded))?;
        batch.clear();
        Ok(())
    };
    crate::util::with_request_threads(|| {
        let mut batch: Vec<(ObjectId, String, SegmentRef)> = Vec::new();
        for (sid, snap) in snapshots {
            for disk in &snap.disks {
                for seg in &disk.segments {
                    if scratch.contains(MARKED, &seg.id)? || batch.iter().any(|(_, _, s)| s.id == seg.id) {
                        continue;
                    }
                    batch.push((*sid, disk.name.clone(), *seg));
                    if batch.len() >= MARK_BATCH {
                        flush(&mut batch)?;
                    }
                }
            }
        }
        flush(&mut batch)
    })?
}

/// Decides, before the sweep, which copies of the marked blobs are in use (table [`USED`]). A blob is in use in the
/// first pack the sweep meets that holds it; later copies are duplicates. A copy known to be damaged is kept while
/// the blob is marked, but leaves the mark to the copies after it, so that an intact one stored since is kept too.
/// Copies in packs the sweep does not decide on (a pack listed again by a later index file, a pack missing from
/// storage) claim nothing, so that a copy elsewhere counts as used.
///
/// One ordered pass over the scratch database, where the sweep used to look every blob up in it (a random read
/// per blob: at 3 million blobs, 26 s of the sweep's 37 s, and 11 s more taking the claimed marks away).
fn claim_copies(
    repo: &Repository,
    scratch: &ScratchDb,
    index_files: &[(ObjectId, u64)],
    damage: &KnownDamage,
) -> Result<()> {
    let mut file_no = 0u32;
    // Written [`SCRATCH_WRITE`] at a time, whatever the packs' sizes.
    let mut copies: Vec<([u8; 44], ObjectId)> = Vec::new();
    let write = |copies: &mut Vec<([u8; 44], ObjectId)>| -> Result<()> {
        scratch.put_all_keyed(COPY, copies.iter().map(|(k, pack)| (&k[..], &pack.0[..])))?;
        copies.clear();
        Ok(())
    };
    each_index_file(
        index_files,
        |id| repo.load_index(id),
        |_, file| {
            for (pack_no, pack) in (0u32..).zip(&file?.packs) {
                if scratch.contains(FIRST_LISTING, &pack.id)? {
                    continue;
                }
                scratch.put(FIRST_LISTING, &pack.id, &[])?;
                if pack_size(repo, scratch, &pack.id)?.is_none() {
                    continue;
                }
                let at = pack_place(file_no, pack_no);
                for (entry_no, e) in (0u32..).zip(&pack.entries) {
                    let mut k = [0u8; 44];
                    k[..32].copy_from_slice(&e.id.0);
                    k[32..40].copy_from_slice(&at);
                    k[40..].copy_from_slice(&entry_no.to_be_bytes());
                    copies.push((k, pack.id));
                }
                if copies.len() >= SCRATCH_WRITE {
                    write(&mut copies)?;
                }
            }
            file_no += 1;
            Ok(())
        },
    )?;
    write(&mut copies)?;
    // The blob the pass is at, whether it is marked, and the pack (file and place in it) that claimed it.
    let mut blob: Option<BlobId> = None;
    let mut marked = false;
    let mut claimed_by: Option<[u8; 8]> = None;
    let mut used: Vec<[u8; 12]> = Vec::new();
    let flush = |used: &mut Vec<[u8; 12]>| -> Result<()> {
        scratch.put_all_keyed(USED, used.iter().map(|p| (&p[..], &[][..])))?;
        used.clear();
        Ok(())
    };
    scratch.for_each_in(MARKED, &[], |k, v| {
        let malformed = || scratch_err(format!("malformed key of {} bytes", k.len() + 1));
        let id = BlobId(k.get(..32).ok_or_else(malformed)?.try_into().expect("32 bytes"));
        if k.len() == 32 {
            (blob, marked, claimed_by) = (Some(id), true, None);
            return Ok(());
        }
        if blob != Some(id) {
            (blob, marked, claimed_by) = (Some(id), false, None);
        }
        let at: [u8; 12] = k.get(32..).and_then(|p| p.try_into().ok()).ok_or_else(malformed)?;
        let pack: ObjectId = BlobId(v.try_into().map_err(|_| malformed())?);
        // A claim takes the mark away after the pack that made it: the pack's other entries of the blob see it.
        if !marked || claimed_by.is_some_and(|by| by[..] != at[..8]) {
            return Ok(());
        }
        used.push(at);
        if !damage.at(&pack, &id) {
            claimed_by = Some(at[..8].try_into().expect("8 bytes"));
        }
        if used.len() >= SCRATCH_WRITE {
            flush(&mut used)?;
        }
        Ok(())
    })?;
    flush(&mut used)
}

/// Where a pack is, as [`COPY`] and [`USED`] keys say: the index file's number in the sweep's list, the pack's in
/// the file. A copy's place adds the entry's number in the pack.
fn pack_place(file_no: u32, pack_no: u32) -> [u8; 8] {
    let mut p = [0u8; 8];
    p[..4].copy_from_slice(&file_no.to_be_bytes());
    p[4..].copy_from_slice(&pack_no.to_be_bytes());
    p
}

/// Marks segment blobs and the blocks each lists. Marking twice is harmless: no lookup before the write. The keys
/// are sorted together and written in runs of [`SCRATCH_WRITE`]: the scratch database takes sorted runs fastest,
/// and each write stays a few MiB.
fn mark_segments<'a>(
    scratch: &ScratchDb,
    segments: impl IntoIterator<Item = (&'a SegmentRef, &'a Vec<BlobId>)>,
) -> Result<()> {
    let mut used: Vec<&BlobId> = Vec::new();
    for (seg, ids) in segments {
        used.push(&seg.id);
        used.extend(ids.iter().filter(|id| !id.is_zero_block()));
    }
    used.sort_unstable_by_key(|id| id.0);
    for run in used.chunks(SCRATCH_WRITE) {
        scratch.put_all(MARKED, run.iter().map(|id| (*id, &[][..])))?;
    }
    Ok(())
}

/// A checkpoint is not kept longer than this (its VM was perhaps removed after the interrupted backup).
pub const CHECKPOINT_MAX_AGE_SECS: i64 = 30 * 24 * 3600;

/// The checkpoints a backup can still continue; the others are deleted (counted only with `dry_run`). A backup
/// continues only a checkpoint made on its parent, the latest snapshot of the source, so one whose parent is not
/// that any more, or that is damaged, can never be continued; one older than [`CHECKPOINT_MAX_AGE_SECS`] is
/// given up.
fn current_checkpoints(
    repo: &Repository,
    snapshots: &[(ObjectId, crate::format::snapshot::Snapshot)],
    dry_run: bool,
    report: &mut PruneReport,
) -> Result<Vec<(ObjectId, Checkpoint)>> {
    // `snapshots` is sorted oldest first: the last one of a source is its latest.
    let latest: HashMap<&str, (&ObjectId, &crate::format::snapshot::Snapshot)> =
        snapshots.iter().map(|(id, s)| (s.source.as_str(), (id, s))).collect();
    let now = crate::util::now_secs();
    let mut kept = Vec::new();
    for id in crate::repository::list_ids(&**repo.backend(), names::CHECKPOINTS)? {
        let c = match repo.load_checkpoint(&id) {
            Ok(c) => c,
            Err(Error::Missing { .. }) => continue,
            // Backups skip a damaged checkpoint, so it can never be continued. (One of a newer format version, or
            // one that could not be read this time, stays.)
            Err(e @ Error::Corrupt { .. }) => {
                report.warnings.push(format!("removing a damaged checkpoint: {e}"));
                report.checkpoints_removed += 1;
                if !dry_run {
                    repo.delete_checkpoint(&id);
                }
                continue;
            }
            Err(e) => {
                report.warnings.push(format!("keeping a checkpoint that could not be read: {e}"));
                continue;
            }
        };
        let continuable = c.continues_from(latest.get(c.source.as_str()).copied());
        if continuable && now - c.time_secs < CHECKPOINT_MAX_AGE_SECS {
            kept.push((id, c));
            continue;
        }
        report.checkpoints_removed += 1;
        if !dry_run {
            repo.delete_checkpoint(&id);
        }
    }
    Ok(kept)
}

/// Marks what the checkpoints of interrupted backups name (format-spec §8c), so that a prune between an
/// interrupted backup and its retry does not undo the progress. Unlike a snapshot's, a checkpoint's segments
/// and blocks need not all be stored (it is a shortcut, checked block by block when used): a segment that
/// cannot be read is left out with a warning, and the retry reads its blocks again.
fn mark_checkpoints(
    repo: &Repository,
    scratch: &ScratchDb,
    checkpoints: &[(ObjectId, Checkpoint)],
    report: &mut PruneReport,
) -> Result<()> {
    for (cid, c) in checkpoints {
        for disk in &c.disks {
            for seg in &disk.segments {
                if scratch.contains(MARKED, &seg.id)? {
                    continue;
                }
                match load_segment(repo, scratch, seg) {
                    Ok(ids) => mark_segments(scratch, [(seg, &ids)])?,
                    Err(Error::Missing { .. }) => {}
                    Err(e) => report.warnings.push(format!("checkpoint {} disk {}: {e}", cid.short(), disk.name)),
                }
            }
        }
    }
    Ok(())
}

/// Records which packs an index file lists, and where its segment blobs are. The bases of its delta blobs are
/// marked: a base stays while any indexed delta names it, live or not (a dead delta's base is freed by the
/// prune after the one that drops the delta), so a kept or re-used delta never loses its base.
fn note_index_file(scratch: &ScratchDb, file: &IndexFile) -> Result<()> {
    for p in &file.packs {
        scratch.put(INDEXED_PACK, &p.id, &[])?;
        let bases: Vec<BlobId> = p.entries.iter().filter_map(|e| e.base).collect();
        scratch.put_all(MARKED, bases.iter().map(|b| (b, &[][..])))?;
        if p.pack_type == BlobType::Segment {
            let locs: Vec<(BlobId, Vec<u8>)> =
                p.entries.iter().map(|e| (e.id, BlobLocation { pack: p.id, entry: *e }.encode())).collect();
            scratch.put_all(SEGMENT_AT, locs.iter().map(|(b, l)| (b, &l[..])))?;
        }
    }
    Ok(())
}

/// Indexes the packs no index file lists and no deletion record names. Returns how many.
fn adopt_unindexed(repo: &Repository, scratch: &ScratchDb, report: &mut PruneReport) -> Result<u64> {
    let doomed = repo.doomed_packs()?;
    let mut orphans = Vec::new();
    for (id, size) in crate::repair::list_packs(repo)? {
        if !scratch.contains(INDEXED_PACK, &id)? && doomed.binary_search(&id).is_err() {
            orphans.push((id, size));
        }
    }
    if orphans.is_empty() {
        return Ok(0);
    }
    let mut rr = crate::repair::RepairReport::default();
    let good = crate::repair::read_headers(repo, &orphans, &mut rr)?;
    for p in &good {
        note_index_file(scratch, &IndexFile { supersedes: Vec::new(), packs: vec![p.clone()] })?;
    }
    crate::repair::write_index_files(repo, None, good, &[], &mut rr)?;
    report.warnings.extend(rr.unreadable.into_iter().map(|u| format!("not adopting a pack: {u}")));
    Ok(rr.packs_indexed as u64)
}

/// The block ids of a manifest segment, located through the index files.
fn load_segment(repo: &Repository, scratch: &ScratchDb, seg: &SegmentRef) -> Result<Vec<BlobId>> {
    let loc = match scratch.get(SEGMENT_AT, &seg.id)? {
        Some(v) => Some(BlobLocation::decode(&v).map_err(scratch_err)?),
        None => None,
    };
    crate::backup::read_segment(repo, loc, seg)
}

/// The streaming sweep: decides per pack, copies blobs of repacked packs, writes the new index files.
struct Sweep<'a> {
    repo: &'a Repository,
    scratch: &'a ScratchDb,
    opts: &'a PruneOptions,
    doomed: Vec<ObjectId>,
    kept: Vec<IndexedPack>,
    kept_entries: usize,
    own_index: Vec<ObjectId>,
    /// Old index files left as they were (nothing in them changed), and those to delete.
    untouched: Vec<ObjectId>,
    replaced: Vec<ObjectId>,
    /// Small index files nothing in which changed: left as they are, or merged into the new ones at the end.
    small: Vec<ObjectId>,
    writers: PackWriters,
    repack_budget: u64,
    /// Blobs and index files sealed with a key epoch below this are sealed again: the current epoch with
    /// `reencrypt`, else 0 (nothing is).
    reseal_below: KeyEpoch,
    /// The number of the index file being swept, as [`claim_copies`] numbered them.
    file_no: u32,
}

impl<'a> Sweep<'a> {
    fn new(repo: &'a Repository, scratch: &'a ScratchDb, opts: &'a PruneOptions) -> Self {
        Sweep {
            repo,
            scratch,
            opts,
            doomed: Vec::new(),
            kept: Vec::new(),
            kept_entries: 0,
            own_index: Vec::new(),
            untouched: Vec::new(),
            replaced: Vec::new(),
            small: Vec::new(),
            writers: PackWriters::new(repo.config().pack_target_size as usize),
            repack_budget: opts.max_repack.unwrap_or(u64::MAX),
            reseal_below: if opts.reencrypt { repo.keys().current_epoch() } else { 0 },
            file_no: 0,
        }
    }

    /// One old index file: it is left as it is if all its packs stay (and, re-encrypting, it was sealed with the
    /// current key epoch), else replaced.
    fn file(&mut self, id: ObjectId, file: IndexFile, epoch: KeyEpoch, report: &mut PruneReport) -> Result<()> {
        let mut kept = Vec::new();
        let mut changed = epoch < self.reseal_below;
        let small = file.packs.len() < index::MAX_PACKS_PER_FILE / SMALL_INDEX_FILE_FRACTION
            && file.blob_count() < index::MAX_ENTRIES_PER_FILE / SMALL_INDEX_FILE_FRACTION;
        let file_no = self.file_no;
        self.file_no += 1;
        for (pack_no, pack) in (0u32..).zip(file.packs) {
            // Listed before (a duplicate listing): this file changes if that pack does not stay.
            if let Some(fate) = self.scratch.get(SEEN_PACK, &pack.id)? {
                changed |= fate != [KEEP];
                continue;
            }
            match self.pack(pack, pack_place(file_no, pack_no), report)? {
                Some(p) => kept.push(p),
                None => changed = true,
            }
        }
        if changed {
            self.replaced.push(id);
            for p in kept {
                self.keep(p)?;
            }
        } else if small {
            self.small.push(id);
        } else {
            self.untouched.push(id);
        }
        Ok(())
    }

    /// Merges the small index files into the new ones where that is worth it ([`SMALL_INDEX_FILE_FRACTION`]),
    /// else leaves them as they are. Their packs all stay: they are listed again as they were.
    fn compact_small_files(&mut self, report: &mut PruneReport) -> Result<()> {
        let small = std::mem::take(&mut self.small);
        let worth_it =
            small.len() > 1 && (!self.replaced.is_empty() || small.len() >= self.opts.small_index_files_to_merge);
        if !worth_it {
            self.untouched.extend(small);
            return Ok(());
        }
        if self.opts.dry_run {
            report.index_files_compacted += small.len();
            return Ok(());
        }
        // Read again rather than kept from the sweep: memory then holds one file, however many small ones exist.
        for id in small {
            for pack in self.repo.load_index(&id)?.packs {
                self.keep(pack)?;
            }
            self.replaced.push(id);
            report.index_files_compacted += 1;
        }
        Ok(())
    }

    /// Decides one pack's fate; returns it if it stays in the index. `at`: its [`pack_place`].
    fn pack(&mut self, pack: IndexedPack, at: [u8; 8], report: &mut PruneReport) -> Result<Option<IndexedPack>> {
        let id = pack.id;
        let fate = self.decide(pack, at, report)?;
        self.scratch.put(SEEN_PACK, &id, &[if fate.is_some() { KEEP } else { DROPPED }])?;
        Ok(fate)
    }

    fn decide(&mut self, pack: IndexedPack, at: [u8; 8], report: &mut PruneReport) -> Result<Option<IndexedPack>> {
        let Some(size) = pack_size(self.repo, self.scratch, &pack.id)? else {
            // Indexed but missing: leave it listed so that `check` keeps reporting it, and let it claim nothing,
            // so that a surviving copy of its blobs elsewhere counts as used.
            report.packs_missing += 1;
            report.warnings.push(format!("{}: indexed but missing (run `check`)", names::pack(&pack.id)));
            return Ok(Some(pack));
        };
        report.packs += 1;
        report.pack_bytes += size;
        // Which copies are in use was decided before the sweep.
        let mut used = vec![false; pack.entries.len()];
        self.scratch.for_each_in(USED, &at, |k, _| {
            let entry_no = k.get(8..12).and_then(|n| n.try_into().ok()).map(u32::from_be_bytes);
            match entry_no.and_then(|n| used.get_mut(n as usize)) {
                Some(u) => *u = true,
                None => return Err(scratch_err(format!("copy in use beyond pack {}'s entries", pack.id))),
            }
            Ok(())
        })?;
        let used_count = used.iter().filter(|u| **u).count();
        report.blobs_in_use += used_count as u64;
        let unused_bytes: u64 =
            pack.entries.iter().zip(&used).filter(|(_, u)| !**u).map(|(e, _)| e.stored_len as u64).sum();
        let used_bytes: u64 =
            pack.entries.iter().zip(&used).filter(|(_, u)| **u).map(|(e, _)| e.stored_len as u64).sum();
        if used_count == 0 {
            report.packs_unused += 1;
            report.bytes_unused += size;
            self.doomed.push(pack.id);
            return Ok(None);
        }
        let to_reseal = |e: &crate::format::pack::PackEntry| e.key_epoch < self.reseal_below;
        let stale = pack.entries.iter().any(to_reseal);
        if unused_bytes == 0 && !stale {
            return Ok(Some(pack));
        }
        // Segment packs are always repacked: an indexed segment blob must be a referenced one, so that a backup
        // that reuses an indexed segment by id never relies on blocks a prune has dropped (§9b).
        let repack = match pack.pack_type {
            BlobType::Segment => true,
            BlobType::Data => {
                (stale || unused_bytes as f64 > self.opts.max_unused * size as f64) && used_bytes <= self.repack_budget
            }
        };
        if !repack {
            report.unused_bytes_kept += unused_bytes;
            if stale {
                report.blobs_of_older_epochs_left += pack.entries.iter().filter(|e| to_reseal(e)).count() as u64;
            }
            return Ok(Some(pack));
        }
        if self.opts.dry_run {
            report.packs_repacked += 1;
            report.bytes_repacked += size;
            report.bytes_copied += used_bytes;
            let resealed = pack.entries.iter().zip(&used).filter(|(e, u)| **u && to_reseal(e)).count();
            report.blobs_resealed += resealed as u64;
            self.repack_budget = self.repack_budget.saturating_sub(used_bytes);
            return Ok(None);
        }
        match self.copy_used(&pack, &used, report) {
            Ok(copied) => {
                report.packs_repacked += 1;
                report.bytes_repacked += size;
                report.bytes_copied += copied;
                self.repack_budget = self.repack_budget.saturating_sub(copied);
                self.doomed.push(pack.id);
                Ok(None)
            }
            Err(e) => {
                // A pack that cannot be read whole is left as it is (and listed); `check` tells the rest.
                report.warnings.push(format!("not repacking: {e}"));
                report.unused_bytes_kept += unused_bytes;
                Ok(Some(pack))
            }
        }
    }

    fn keep(&mut self, pack: IndexedPack) -> Result<()> {
        self.kept_entries += pack.entries.len();
        self.kept.push(pack);
        if index::is_full(self.kept.len(), self.kept_entries) {
            self.flush_index()?;
        }
        Ok(())
    }

    fn flush_index(&mut self) -> Result<()> {
        if self.kept.is_empty() || self.opts.dry_run {
            self.kept.clear();
            self.kept_entries = 0;
            return Ok(());
        }
        self.kept_entries = 0;
        let file = IndexFile { supersedes: Vec::new(), packs: std::mem::take(&mut self.kept) };
        self.own_index.push(self.repo.save_index(&file)?);
        Ok(())
    }

    /// Copies the used blobs of `pack` (verified: decrypted and re-hashed) into the open new pack of its type.
    /// The sealed bytes are copied as they are (their associated data does not depend on the pack), or,
    /// re-encrypting, sealed again with the current key epoch if an older one sealed them.
    fn copy_used(&mut self, pack: &IndexedPack, used: &[bool], report: &mut PruneReport) -> Result<u64> {
        let name = names::pack(&pack.id);
        let bytes = self.repo.backend().get(&name)?;
        let mut copied = 0u64;
        let mut blobs = Vec::new();
        for (e, _) in pack.entries.iter().zip(used).filter(|(_, u)| **u) {
            let stored = bytes
                .get(e.offset as usize..e.end() as usize)
                .ok_or_else(|| Error::corrupt(&name, format!("blob {} lies beyond the end of the pack", e.id)))?;
            let keys = self.repo.keys();
            let damaged = |c: String| Error::corrupt(&name, format!("blob {}: {c}", e.id));
            // Verified before either (a damaged blob is not carried into a new pack), with one decryption.
            if e.key_epoch < self.reseal_below {
                blobs.push(crate::format::pack::reseal_blob(keys, e, stored).map_err(damaged)?);
                report.blobs_resealed += 1;
            } else {
                crate::format::pack::verify_for_copy(keys, e, stored).map_err(damaged)?;
                blobs.push(SealedBlob::copy_of(e, stored));
            }
        }
        for blob in blobs {
            copied += blob.bytes.len() as u64;
            if let Some(full) = self.writers.add(blob) {
                self.store_new_pack(full)?;
            }
        }
        Ok(copied)
    }

    fn store_new_pack(&mut self, w: PackWriter) -> Result<()> {
        let pack = w.finish(self.repo.keys());
        let indexed = self.repo.save_pack(pack)?;
        self.keep(indexed)
    }

    /// Stores the last new packs and index file.
    fn finish(mut self, report: &mut PruneReport) -> Result<SweepResult> {
        for w in self.writers.finish() {
            self.store_new_pack(w)?;
        }
        self.compact_small_files(report)?;
        self.flush_index()?;
        report.index_files_written += self.own_index.len();
        self.doomed.sort();
        self.doomed.dedup();
        let mut accounted = self.own_index;
        accounted.extend(self.untouched);
        accounted.sort();
        Ok(SweepResult { doomed: self.doomed, accounted, replaced: self.replaced })
    }
}

struct SweepResult {
    /// Packs to delete (sorted).
    doomed: Vec<ObjectId>,
    /// Index files whose content this prune accounted for: written by it, or left untouched (sorted).
    accounted: Vec<ObjectId>,
    /// Old index files replaced by the new ones, to delete.
    replaced: Vec<ObjectId>,
}

/// Finishes a deletion record if every session it waits for has ended: rescues what newer objects reference,
/// deletes the rest (except what retention holds). Returns true if it still waits.
fn finish_record(
    repo: &Repository,
    scratch: &ScratchDb,
    rid: ObjectId,
    mut rec: DeletionRecord,
    live: &[crate::lock::LockState],
    report: &mut PruneReport,
) -> Result<bool> {
    if !rec.released {
        let pending: Vec<&crate::lock::LockState> = live.iter().filter(|s| rec.sessions.contains(&s.name)).collect();
        if !pending.is_empty() {
            report.packs_waiting += rec.packs.len() as u64;
            report.waiting_for.extend(pending.iter().map(|s| s.describe()));
            return Ok(true);
        }
        let rescued = rescue(repo, scratch, &rec)?;
        if !rescued.is_empty() {
            let mut headers = Vec::new();
            for id in &rescued {
                let size = pack_size(repo, scratch, id)?.ok_or_else(|| Error::Missing { object: names::pack(id) })?;
                let h = repo.read_pack_header(id, size)?;
                headers.push(IndexedPack { id: *id, pack_type: h.pack_type, entries: h.entries });
            }
            for packs in index::file_groups(headers) {
                repo.save_index(&IndexFile { supersedes: Vec::new(), packs })?;
            }
            report.packs_rescued += rescued.len() as u64;
            rec.packs.retain(|p| rescued.binary_search(p).is_err());
        }
        rec.released = true;
    }
    // Delete, unless retention still holds the object.
    let outcome: Vec<(ObjectId, Result<Option<u64>>)> = crate::util::with_request_threads(|| {
        rec.packs
            .par_iter()
            .map(|id| {
                let name = names::pack(id);
                let r = (|| {
                    if let Some(left) = repo.backend().retention_left(&name)? {
                        tracing::info!("{name}: under retention for {} s more; not deleted", left.as_secs());
                        return Ok(None);
                    }
                    let size = repo.backend().size(&name)?.unwrap_or(0);
                    repo.backend().delete(&name)?;
                    Ok(Some(size))
                })();
                (*id, r)
            })
            .collect()
    })?;
    let mut retained = Vec::new();
    for (id, r) in outcome {
        match r? {
            Some(size) => {
                report.packs_deleted += 1;
                report.bytes_deleted += size;
            }
            None => retained.push(id),
        }
    }
    if !retained.is_empty() {
        report.packs_retained += retained.len() as u64;
        repo.save_deletion(&DeletionRecord { packs: retained, ..rec })?;
    }
    repo.backend().delete(&names::deletion(&rid))?;
    Ok(false)
}

/// Packs of `rec` that something written since its prune references, sorted. Searches the snapshots the prune
/// did not see, the segment blobs of index files it did not write, and index files listing the pack again.
fn rescue(repo: &Repository, scratch: &ScratchDb, rec: &DeletionRecord) -> Result<Vec<ObjectId>> {
    scratch.clear_table(DOOMED_BLOB)?;
    scratch.clear_table(RESCUED)?;
    // Which blobs the packs hold (the packs still exist: nothing of a record is deleted before this).
    let header = |id: &ObjectId| match pack_size(repo, scratch, id)? {
        Some(size) => repo.read_pack_header(id, size).map(Some),
        // Gone already: an earlier run was stopped while deleting.
        None => Ok(None),
    };
    crate::util::fetch_in_order(&rec.packs, header, |id, header| {
        let Some(header) = header? else { return Ok(()) };
        let locs: Vec<(BlobId, Vec<u8>)> =
            header.entries.iter().map(|e| (e.id, BlobLocation { pack: *id, entry: *e }.encode())).collect();
        scratch.put_all(DOOMED_BLOB, locs.iter().map(|(b, l)| (b, &l[..])))
    })?;
    let mut rescued: Vec<ObjectId> = Vec::new();
    // Block ids referenced by a segment: rescue the packs of any doomed ones.
    let check_ids = |ids: &[BlobId], rescued: &mut Vec<ObjectId>| -> Result<()> {
        let hits = scratch.contains_many(DOOMED_BLOB, ids)?;
        for (id, hit) in ids.iter().zip(hits) {
            if hit {
                if let Some(v) = scratch.get(DOOMED_BLOB, id)? {
                    let loc = BlobLocation::decode(&v).map_err(scratch_err)?;
                    rescued.push(loc.pack);
                }
            }
        }
        Ok(())
    };
    // Index files: a recorded pack listed again (adopted by a backup) is in use; segments written since are
    // searched, and so are the bases of delta blobs written since.
    each_index_file(
        &repo.list_index_files()?,
        |iid| repo.load_index(iid),
        |iid, file| {
            let file = file?;
            let newer = rec.index_files.binary_search(iid).is_err();
            for p in &file.packs {
                if rec.packs.binary_search(&p.id).is_ok() {
                    rescued.push(p.id);
                }
                if newer {
                    let bases: Vec<BlobId> = p.entries.iter().filter_map(|e| e.base).collect();
                    check_ids(&bases, &mut rescued)?;
                }
                if newer && p.pack_type == BlobType::Segment {
                    let segments: Vec<Vec<u8>> = p
                        .entries
                        .par_iter()
                        .map(|e| repo.read_blob(&BlobLocation { pack: p.id, entry: *e }, &NoDeltas))
                        .collect::<Result<_>>()?;
                    for plain in segments {
                        check_ids(&segment_ids(&plain), &mut rescued)?;
                    }
                }
            }
            Ok(())
        },
    )?;
    // Snapshots written since: their segments, if they are in recorded packs, and those segments' blocks.
    let mut newer_snapshots = crate::repository::list_ids(&**repo.backend(), names::SNAPSHOTS)?;
    newer_snapshots.retain(|sid| rec.snapshots.binary_search(sid).is_err());
    crate::util::fetch_in_order(
        &newer_snapshots,
        |sid| repo.load_snapshot(sid),
        |_, snap| {
            let snap = snap?;
            for disk in &snap.disks {
                for seg in &disk.segments {
                    let Some(v) = scratch.get(DOOMED_BLOB, &seg.id)? else { continue };
                    let loc = BlobLocation::decode(&v).map_err(scratch_err)?;
                    rescued.push(loc.pack);
                    if scratch.contains(RESCUED, &seg.id)? {
                        continue;
                    }
                    scratch.put(RESCUED, &seg.id, &[])?;
                    check_ids(&segment_ids(&repo.read_blob(&loc, &NoDeltas)?), &mut rescued)?;
                }
            }
            Ok(())
        },
    )?;
    rescued.sort();
    rescued.dedup();
    Ok(rescued)
}

/// Loads the index files `listed` ([`Repository::list_index_files`]) and hands each to `each`, in order. Many small
/// ones are loaded at once (S3's round trips), but only a few of the full ones prune writes (each decodes to some
/// 7 MB): 16 of those at once took a 3-million-blob prune to a 298 MiB peak, against 248 MiB in batches bounded in
/// bytes.
fn each_index_file<R: Send>(
    listed: &[(ObjectId, u64)],
    load: impl Fn(&ObjectId) -> R + Sync + Send,
    each: impl FnMut(&ObjectId, R) -> Result<()>,
) -> Result<()> {
    let ids: Vec<ObjectId> = listed.iter().map(|(id, _)| *id).collect();
    crate::util::fetch_batches_in_order(crate::repository::index_load_batches(&ids, listed), load, each)
}

fn scratch_err(e: String) -> Error {
    Error::invalid(format!("prune scratch database: {e}"))
}

/// A pack's size: as listed when the run started, else asked from the storage (a pack stored since).
fn pack_size(repo: &Repository, scratch: &ScratchDb, id: &ObjectId) -> Result<Option<u64>> {
    match scratch.get(PACK_SIZE, id)? {
        Some(v) => Ok(Some(u64::from_le_bytes(v.as_slice().try_into().map_err(|_| scratch_err("bad size".into()))?))),
        None => repo.backend().size(&names::pack(id)),
    }
}
