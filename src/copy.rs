//! `copy`: snapshots of one repository stored in another (an offsite copy; restic's `copy`, Proxmox Backup
//! Server's sync jobs).
//!
//! The repositories have their own keys, so block ids differ between them: every disk is read back as data
//! from the source (serve's [`SnapshotDisk`](crate::serve::SnapshotDisk): coalesced ranged reads, decrypted,
//! decompressed) and stored by the ordinary backup pipeline in the destination, where it deduplicates against
//! everything there. A copy keeps the original's time, host, user, source, tags and annotations, and records
//! the original's id under the annotation `copy.from`: snapshots copied before are skipped, so running `copy`
//! again continues where it stopped.
//!
//! A block the source stored whole is not compressed again when both repositories compress at the same level:
//! the source's blob was opened (decrypted, decompressed, id checked) anyway, and its zstd frame, or its raw
//! bytes, is sealed with the destination's key under the block's id there
//! ([`StoredForm`](crate::format::pack::StoredForm)). The copy stores what a backup would, for about 40% less
//! CPU (the benchmark's three snapshots: 9.5-11.2 -> 5.7-7.2 CPU-s). Blocks the source holds as deltas are
//! compressed (or made deltas) in the destination.
//!
//! Copies are incremental. Snapshots go oldest first; when the destination holds a copy of an older snapshot
//! of the same source, only the blocks whose ids differ between the two originals are read (segments with
//! equal ids are not even loaded), and the rest is inherited from that copy, as a CBT incremental inherits
//! from its parent. That is exact: equal ids in the source mean equal bytes, and the earlier copy holds the
//! bytes of its original.
//!
//! One copy from a given source runs into a destination at a time (`locks/copy-<source id>`, see
//! [`crate::lock::acquire_copy`]): two at once would both find the same snapshots not yet copied.

use std::collections::HashMap;
use std::sync::Arc;

use crate::backup::{BackupOptions, DiskJob};
use crate::cache::IndexCache;
use crate::diff::{block_extent, push_extent};
use crate::error::{Error, Result};
use crate::format::snapshot::{DiskManifest, Snapshot};
use crate::format::{BlobId, ObjectId};
use crate::progress::Counters;
use crate::repository::Repository;
use crate::serve::{RepositoryExports, ServeOptions};
use crate::source::snapshot::SnapshotSource;
use crate::source::Extent;

/// Threads that fetch and decompress the source's blocks for the backup pipeline. When blocks were compressed
/// again, a copy of the benchmark's vm1-day0 took 3.3-3.8 s with one and 3.8-4.2 s with two (and ~15% more CPU);
/// sealed as stored, the benchmark's three snapshots took 4.82-4.95 s with one and 4.47-4.80 s with two, at a
/// peak RSS of 223-230 against 230-246 MiB (three alternating pairs): one.
const COPY_FETCHERS: usize = 1;

/// The annotation of a copied snapshot that holds the original's id (hex).
pub const COPIED_FROM: &str = "copy.from";

/// Blocks fetched per request in a full copy (read in coalesced ranged requests).
const FULL_COPY_READAHEAD: u64 = 8;

pub struct CopyOptions {
    /// Concurrent pack uploads to the destination.
    pub uploaders: usize,
    /// Store new blocks as deltas where that pays (as backup).
    pub delta: bool,
    /// Memory for decrypted source blobs.
    pub cache_bytes: u64,
}

impl Default for CopyOptions {
    fn default() -> Self {
        CopyOptions { uploaders: 2, delta: true, cache_bytes: 32 << 20 }
    }
}

/// One snapshot copied.
pub struct Copied {
    /// The original, in the source repository.
    pub from: ObjectId,
    /// The copy, in the destination.
    pub id: ObjectId,
    pub snapshot: Snapshot,
    /// Ranged reads of the source's packs it took (one request each on S3; delta bases not counted).
    pub source_reads: u64,
    /// New blocks stored as the source stored them, not compressed again (both repositories compress at the
    /// same level; a block the source holds as a delta is compressed here).
    pub blocks_sealed_as_stored: u64,
}

/// Copies by the identity of their originals ([`Snapshot::identity`]: the id, unless `tag` rewrote it): (the
/// copy's id, the copy).
pub type Copies = HashMap<ObjectId, (ObjectId, Snapshot)>;

/// The destination's copies by the identity of their originals.
pub fn copies_in(dest: &Repository) -> Result<Copies> {
    let mut out = HashMap::new();
    for (id, snap) in dest.list_snapshots()? {
        if let Some(from) = snap.annotations.get(COPIED_FROM).and_then(|h| BlobId::from_hex(h)) {
            out.insert(from, (id, snap));
        }
    }
    Ok(out)
}

/// What a copy would do with one snapshot (`copy --dry-run`).
pub struct PlannedCopy {
    /// The original, in the source repository.
    pub from: ObjectId,
    pub snapshot: Snapshot,
    /// The original of the earlier copy it would build on (read only the blocks that differ from it).
    pub parent: Option<ObjectId>,
    /// Bytes of disk data it would read from the source.
    pub bytes_to_read: u64,
}

/// The snapshots of `wanted` that `dest` has no copies of, oldest first, and the copies it has.
fn pending(dest: &Repository, mut wanted: Vec<(ObjectId, Snapshot)>) -> Result<(Copies, Vec<(ObjectId, Snapshot)>)> {
    let done = copies_in(dest)?;
    wanted.retain(|(id, s)| !done.contains_key(&s.identity(id)));
    wanted.sort_by_key(|(_, s)| (s.time_secs, s.time_nanos));
    Ok((done, wanted))
}

/// The latest earlier snapshot of the same source as `snap` (`from`) that the destination has a copy of:
/// (its original id, the original, the copy).
fn earlier_copy(
    originals: &[(ObjectId, Snapshot)],
    done: &Copies,
    from: &ObjectId,
    snap: &Snapshot,
) -> Option<(ObjectId, Snapshot, (ObjectId, Snapshot))> {
    originals
        .iter()
        .rfind(|(id, s)| {
            s.source == snap.source
                && (s.time_secs, s.time_nanos) <= (snap.time_secs, snap.time_nanos)
                && id != from
                && done.contains_key(&s.identity(id))
        })
        .map(|(id, s)| (*id, s.clone(), done[&s.identity(id)].clone()))
}

/// The disk of `original` that a copy of `disk` may build on: where the earlier copy holds it as its original
/// did.
fn earlier_disk<'a>(
    parent: Option<&'a (ObjectId, Snapshot, (ObjectId, Snapshot))>,
    disk: &DiskManifest,
) -> Option<&'a DiskManifest> {
    parent.and_then(|(_, original, (_, copy))| {
        original.disk(&disk.name).filter(|o| copy.disk(&disk.name).is_some_and(|c| c.capacity == o.capacity))
    })
}

/// What [`copy`] would do with `wanted`: which snapshots it would copy, on which earlier copies, reading how
/// much. Nothing is written to either repository but the source's session marker while it reads manifests.
pub fn plan(
    src: &Repository,
    src_cache: &IndexCache,
    dest: &Repository,
    wanted: Vec<(ObjectId, Snapshot)>,
) -> Result<Vec<PlannedCopy>> {
    let (mut done, wanted) = pending(dest, wanted)?;
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let originals = src.list_snapshots()?;
    let _session = crate::lock::start_session(src, "copy --dry-run")?;
    src_cache.sync(src)?;
    let mut out = Vec::new();
    for (from, snap) in wanted {
        let parent = earlier_copy(&originals, &done, &from, &snap);
        let mut bytes_to_read = 0;
        for disk in &snap.disks {
            let extents = match plan_disk(src, src_cache, disk, earlier_disk(parent.as_ref(), disk))? {
                DiskRead::Allocated(e) | DiskRead::Changed(e) => e,
            };
            bytes_to_read += extents.iter().map(|e| e.length).sum::<u64>();
        }
        // Later snapshots of the run build on this one, as they would on its copy.
        done.insert(snap.identity(&from), (from, snap.clone()));
        out.push(PlannedCopy { from, parent: parent.map(|(id, _, _)| id), snapshot: snap, bytes_to_read });
    }
    Ok(out)
}

/// A snapshot a copy left out because something it needs is damaged.
pub struct NotCopied {
    pub from: ObjectId,
    pub source: String,
    pub cause: String,
}

/// Copies `wanted` (snapshots of the source repository that `src_cache` indexes) into `dest`, oldest first,
/// skipping those `dest` has copies of; `copied` is told of each copy as it is committed. A snapshot whose data
/// is damaged ([`Error::Corrupt`]: a pack, blob or segment there) is left out and returned as [`NotCopied`], and
/// the others are copied (building on the earlier copies); any other failure stops the copy: the snapshots
/// committed before it stay, and a rerun goes on from there.
#[allow(clippy::too_many_arguments)]
pub fn copy(
    src: Repository,
    src_cache: Arc<IndexCache>,
    dest: &Repository,
    dest_cache: Arc<IndexCache>,
    wanted: Vec<(ObjectId, Snapshot)>,
    opts: &CopyOptions,
    counters: &Counters,
    mut copied: impl FnMut(&Copied),
) -> Result<(Vec<Copied>, Vec<NotCopied>)> {
    // Taken before deciding what is not copied yet: a second copy from this source decides only once the
    // first is done (it fails now; a rerun then finds its snapshots copied).
    let copy_lock = crate::lock::acquire_copy(dest, &src.config().id, "copy")?;
    let (mut done, wanted) = pending(dest, wanted)?;
    if wanted.is_empty() {
        return Ok((Vec::new(), Vec::new()));
    }
    // Every snapshot of the source, for finding the originals of earlier copies (the parents).
    let originals = src.list_snapshots()?;
    // The source's packs stay where they are while we read them: a prune there waits for this session.
    let session = crate::lock::start_session(&src, "copy")?;
    src_cache.sync(&src)?;
    // Blocks the source compressed at the level the destination uses are sealed as they are stored there.
    let keep_stored_forms = src.config().zstd_level == dest.config().zstd_level;
    let exports = RepositoryExports::new(
        src,
        src_cache.clone(),
        ServeOptions {
            cache_bytes: opts.cache_bytes,
            session_lost: Some(session.lost_flag()),
            keep_stored_forms,
            ..Default::default()
        },
    );
    let (mut out, mut not_copied) = (Vec::new(), Vec::new());
    for (from, snap) in wanted {
        if crate::util::interrupted() {
            return Err(Error::Interrupted);
        }
        let parent = earlier_copy(&originals, &done, &from, &snap);
        let reads_before = exports.pack_reads();
        let as_stored_before = counters.sealed_as_stored.load(std::sync::atomic::Ordering::Relaxed);
        let attempt = || -> Result<(ObjectId, Snapshot)> {
            let mut jobs = Vec::new();
            for disk in &snap.disks {
                // Incremental only where the earlier copy holds the disk as its original did.
                let earlier = earlier_disk(parent.as_ref(), disk);
                // Read-ahead fetches the blocks after a miss, which an incremental copy mostly does not want.
                let (allocated, changed, readahead) = match plan_disk(exports.repository(), &src_cache, disk, earlier)?
                {
                    DiskRead::Allocated(extents) => (Some(extents), None, FULL_COPY_READAHEAD),
                    DiskRead::Changed(extents) => (None, Some(extents), 1),
                };
                let reader = exports.disk(&from, disk, readahead)?;
                jobs.push(DiskJob {
                    name: disk.name.clone(),
                    source: Box::new(SnapshotSource::new(reader, allocated, COPY_FETCHERS)),
                    changed,
                    change_token: disk.change_token.clone(),
                    resume: None,
                });
            }
            let mut o = BackupOptions::new(snap.source.clone());
            o.tags = snap.tags.clone();
            o.hostname = snap.hostname.clone();
            o.username = snap.username.clone();
            o.time_override = Some((snap.time_secs, snap.time_nanos));
            o.annotations = snap.annotations.clone();
            // The copy is known by its original's identity; its own is its id here, whatever tags did there.
            o.annotations.insert(COPIED_FROM.into(), snap.identity(&from).hex());
            o.annotations.remove(crate::format::snapshot::ORIGINAL);
            o.parent = parent.map(|(_, _, copy)| copy);
            o.uploaders = opts.uploaders;
            o.delta = opts.delta;
            tracing::info!("copying snapshot {} of {}", from.short(), snap.source);
            crate::backup::run(dest, dest_cache.clone(), jobs, &o, counters)
        };
        let (id, snapshot) = match attempt() {
            Ok(done) => done,
            Err(e @ Error::Corrupt { .. }) => {
                tracing::error!("snapshot {} of {} not copied: {e}", from.short(), snap.source);
                not_copied.push(NotCopied { from, source: snap.source.clone(), cause: e.to_string() });
                continue;
            }
            Err(e) => return Err(e),
        };
        session.ensure_held()?;
        // Lost (not refreshed for the stale time): another copy may have started; stop rather than race it.
        copy_lock.ensure_held()?;
        let c = Copied {
            from,
            id,
            snapshot,
            source_reads: exports.pack_reads() - reads_before,
            blocks_sealed_as_stored: counters.sealed_as_stored.load(std::sync::atomic::Ordering::Relaxed)
                - as_stored_before,
        };
        copied(&c);
        done.insert(snap.identity(&from), (c.id, c.snapshot.clone()));
        out.push(c);
    }
    drop(session);
    drop(copy_lock);
    Ok((out, not_copied))
}

/// What a copy reads of one disk.
enum DiskRead {
    /// The allocated (non-zero) extents: a full copy.
    Allocated(Vec<Extent>),
    /// The extents whose blocks differ from the same disk in an earlier snapshot that the destination has a
    /// copy of; the rest is inherited from that copy.
    Changed(Vec<Extent>),
}

/// What to read of `disk`: its changes against `earlier` if given, else everything allocated.
fn plan_disk(
    repo: &Repository,
    cache: &IndexCache,
    disk: &DiskManifest,
    earlier: Option<&DiskManifest>,
) -> Result<DiskRead> {
    let bs = disk.block_size as u64;
    if let Some(e) = earlier.filter(|e| e.capacity == disk.capacity && e.block_size == disk.block_size) {
        let mut changed = Vec::new();
        crate::diff::for_changed_blocks(repo, cache, e, disk, |block, _, _| {
            push_extent(&mut changed, block_extent(block, bs, disk.capacity))
        })?;
        return Ok(DiskRead::Changed(changed));
    }
    Ok(DiskRead::Allocated(crate::diff::allocated_extents(repo, cache, disk)?))
}
