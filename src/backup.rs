//! The backup pipeline.
//!
//! ```text
//!  reader (1 per disk) ──blocks──▶ workers (N) ──sealed blobs──▶ packer ──packs──▶ uploaders (M) ──▶ indexer
//!                                     │                                              ▲
//!                                     └──block ids──▶ assembler (1 per disk) ──segments┘
//! ```
//! - **reader**: reads only the blocks the plan says to read (allocated ones for a full backup, changed ones
//!   for an incremental), 1 MiB at a time, into a bounded channel (backpressure bounds memory).
//! - **workers**: zero check, keyed BLAKE3 id, dedup against the local index cache and this run's new blobs,
//!   zstd, AES-256-GCM.
//! - **packer**: appends sealed blobs to the open data pack; full packs go to the uploaders.
//! - **uploaders**: store packs, then hand their entries to the indexer.
//! - **indexer**: writes an index file every few packs (a checkpoint: a killed backup's packs stay usable) and
//!   records it in the local cache.
//! - **assembler**: walks the disk's blocks in order, takes read blocks' ids from the workers and unchanged
//!   blocks' ids from the parent, and emits manifest segments; a segment with no changed block is reused from
//!   the parent without being read.
//!
//! Commit order: every pack is stored, then every index file, then the snapshot, which is the commit point.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender};
use rayon::prelude::*;

use crate::cache::IndexCache;
use crate::delta::{BasePrefetch, DeltaSealer};
use crate::error::{Error, Result};
use crate::format::checkpoint::{Checkpoint, CheckpointDisk};
use crate::format::index::BlobLocation;
use crate::format::index::{IndexFile, IndexedPack};
use crate::format::pack::{BlobSealer, FinishedPack, PackWriter, SealedBlob, StoredForm};
use crate::format::snapshot::{segment_ids, DiskManifest, DiskStats, SegmentRef, Snapshot, Summary};
use crate::format::{BlobId, BlobType, ObjectId, SEGMENT_BLOCKS};
use crate::progress::Counters;
use crate::repository::Repository;
use crate::source::{BlockRanges, DiskSource, Extent};
use crate::util::{AlignedBuf, BufferPool};

/// One disk to back up.
pub struct DiskJob {
    /// Name of the disk inside the snapshot; an incremental inherits from the parent's disk of the same name.
    pub name: String,
    pub source: Box<dyn DiskSource>,
    /// Byte ranges changed since the parent snapshot, if known. `None` reads the whole (allocated) disk.
    pub changed: Option<Vec<Extent>>,
    /// Change-tracking token to record for the next incremental (VMware changeId, bitmap name).
    pub change_token: Option<String>,
    /// Continue an interrupted backup of this disk: blocks not in `changed` come from here instead of the
    /// parent snapshot's disk.
    pub resume: Option<ResumeBase>,
}

/// What a resumed disk's unread blocks are: the segments an interrupted backup's checkpoint lists (format-spec
/// §8c), then the parent snapshot's segments from there on (or zeros where the interrupted backup was a full
/// read). `changed` then holds what changed in the checkpointed part since it was read, and what the
/// interrupted backup still had to read.
pub struct ResumeBase {
    pub manifest: DiskManifest,
    /// The first this many segments come from the checkpoint: their blocks were read, but not necessarily
    /// stored, so every one the index does not list is read again.
    pub checkpoint_segments: usize,
}

pub struct BackupOptions {
    pub source: String,
    pub tags: Vec<String>,
    pub hostname: String,
    /// The snapshot incrementals build on (normally the latest of the same source).
    pub parent: Option<(ObjectId, Snapshot)>,
    pub annotations: BTreeMap<String, String>,
    /// Hashing/compression/encryption threads.
    pub workers: usize,
    /// Concurrent pack uploads.
    pub uploaders: usize,
    /// Write an index file (a checkpoint) every this many packs.
    pub checkpoint_packs: usize,
    /// Record this time (Unix seconds and nanoseconds) instead of the current time, as restic's `--time`.
    pub time_override: Option<(i64, u32)>,
    /// Recorded as who made the snapshot (default: the user running the backup).
    pub username: String,
    /// Store new blocks as deltas against similar stored blocks where that pays ([`crate::delta`]).
    pub delta: bool,
    /// Save a checkpoint (format-spec §8c) at most this often, so that an interrupted backup can be resumed
    /// ([`ResumeBase`]); `None` saves none (only sources whose changes since a checkpoint can be asked for,
    /// VMware disks with CBT, can resume).
    pub checkpoint_interval: Option<Duration>,
}

impl BackupOptions {
    pub fn new(source: impl Into<String>) -> Self {
        BackupOptions {
            source: source.into(),
            tags: Vec::new(),
            hostname: crate::util::hostname(),
            parent: None,
            annotations: BTreeMap::new(),
            workers: crate::util::cores(),
            uploaders: 2,
            checkpoint_packs: 16,
            time_override: None,
            username: crate::util::username(),
            delta: true,
            checkpoint_interval: None,
        }
    }
}

/// How a disk will be read: which blocks come from the source, and where the others come from.
struct DiskPlan {
    name: String,
    capacity: u64,
    blocks: u64,
    read: BlockRanges,
    /// Blocks not read are inherited from this parent disk; without a parent they are zero (unallocated).
    parent: Option<DiskManifest>,
    /// Why a full read happened although change information was given (reported to the user).
    note: Option<String>,
    /// The first this many segments of `parent` come from a checkpoint ([`ResumeBase`]).
    checkpoint_segments: usize,
}

/// Decides what to read for each disk: the change list against the parent, or the allocated ranges.
fn plan_disk(job: &mut DiskJob, parent: Option<&Snapshot>, block_size: u64) -> Result<DiskPlan> {
    let capacity = job.source.capacity();
    let blocks = capacity.div_ceil(block_size);
    let (parent_disk, checkpoint_segments) = match &job.resume {
        Some(r) => (Some(r.manifest.clone()), r.checkpoint_segments),
        None => (parent.and_then(|p| p.disk(&job.name)).cloned(), 0),
    };
    let mut note = None;
    if let Some(changed) = &job.changed {
        match &parent_disk {
            Some(pd) if capacity < pd.capacity => {
                return Err(Error::source(
                    job.source.describe(),
                    format!(
                        "the source ({capacity} bytes) is smaller than disk {} of its parent snapshot ({} bytes); \
                         an incremental cannot shrink a disk (run a full backup)",
                        job.name, pd.capacity
                    ),
                ));
            }
            Some(pd) => {
                crate::source::changes::validate(changed, capacity)
                    .map_err(|e| Error::source(job.source.describe(), e))?;
                let mut read = BlockRanges::from_extents(changed, block_size);
                // A grown disk: the parent's last (possibly partial) block and everything after it are read.
                if capacity > pd.capacity {
                    read.add(pd.capacity / block_size..blocks);
                }
                return Ok(DiskPlan {
                    name: job.name.clone(),
                    capacity,
                    blocks,
                    read,
                    parent: Some(pd.clone()),
                    note: None,
                    checkpoint_segments,
                });
            }
            None => {
                note = Some(format!(
                    "disk {}: no parent snapshot holds this disk, so the change list cannot be used; reading the whole disk",
                    job.name
                ));
            }
        }
    }
    let read = match job.source.allocated()? {
        Some(extents) => BlockRanges::from_extents(&extents, block_size),
        None => BlockRanges::all(blocks),
    };
    Ok(DiskPlan { name: job.name.clone(), capacity, blocks, read, parent: None, note, checkpoint_segments: 0 })
}

/// An incremental reuses the parent's unchanged segments by id. A segment the index no longer lists (a prune
/// dropped it, or the index is damaged), or whose only copy a check found damaged, cannot be vouched for, so its
/// blocks are read from the source instead.
fn reread_unindexed_segments(plan: &mut DiskPlan, cache: &IndexCache) -> Result<()> {
    let Some(parent) = &plan.parent else { return Ok(()) };
    let mut first = 0u64;
    let mut missing = 0;
    for seg in &parent.segments {
        let end = (first + seg.blocks as u64).min(plan.blocks);
        if !cache.contains(&seg.id)? {
            plan.read.add(first..end);
            missing += 1;
        }
        first += seg.blocks as u64;
    }
    if missing > 0 {
        tracing::warn!(
            "disk {}: {missing} manifest segment(s) of the parent snapshot are no longer indexed or were found \
             damaged; reading their blocks",
            plan.name
        );
    }
    Ok(())
}

/// A resumed disk's checkpoint segments list blocks the interrupted backup read but may not have stored (the
/// pack it was filling when it stopped) or that a prune removed since: those the index does not list are read
/// again. (Segments the index does not list are read whole by [`reread_unindexed_segments`].)
fn reread_unstored_checkpoint_blocks(repo: &Repository, plan: &mut DiskPlan, cache: &IndexCache) -> Result<()> {
    let Some(base) = &plan.parent else { return Ok(()) };
    let mut missing = Vec::new();
    let mut cursor = plan.read.cursor();
    for (k, seg) in base.segments.iter().take(plan.checkpoint_segments).enumerate() {
        if !cache.contains(&seg.id)? {
            continue;
        }
        let first = k as u64 * SEGMENT_BLOCKS as u64;
        for (j, id) in load_segment(repo, cache, seg)?.iter().enumerate() {
            let b = first + j as u64;
            if !cursor.contains(b) && !id.is_zero_block() && !cache.contains(id)? {
                missing.push(b..b + 1);
            }
        }
    }
    if !missing.is_empty() {
        tracing::info!(
            "disk {}: {} blocks of the checkpoint were not stored by the interrupted backup; reading them",
            plan.name,
            missing.len()
        );
        plan.read.add_all(missing);
    }
    Ok(())
}

/// A block of the parent found damaged or lost (a damage record names it, format-spec §8d), that no backup has stored
/// intact since, is read from the source again, also where the change list says it did not change: the new
/// snapshot must not reuse it by id. Nothing to do, and nothing read, while every such block has an intact copy.
fn reread_damaged_blocks(repo: &Repository, plan: &mut DiskPlan, cache: &IndexCache) -> Result<()> {
    let Some(parent) = &plan.parent else { return Ok(()) };
    // Once backups have stored every such block again, the parent's segments need not be read for this.
    let lost: Vec<BlobId> = cache.damage().blobs().copied().collect();
    let mut still_lost = false;
    for id in &lost {
        still_lost |= !cache.contains(id)?;
    }
    if !still_lost {
        return Ok(());
    }
    let mut damaged = Vec::new();
    let mut first = 0u64;
    for seg in &parent.segments {
        // A segment with no intact copy is read whole already (`reread_unindexed_segments`).
        if cache.contains(&seg.id)? {
            for (j, id) in load_segment(repo, cache, seg)?.iter().enumerate() {
                let b = first + j as u64;
                if b < plan.blocks && cache.damage().names(id) && !cache.contains(id)? {
                    damaged.push(b..b + 1);
                }
            }
        }
        first += seg.blocks as u64;
    }
    if !damaged.is_empty() {
        tracing::warn!(
            "disk {}: {} block(s) of the parent snapshot were found damaged (damage records name them); reading \
             them again",
            plan.name,
            damaged.len()
        );
        plan.read.add_all(damaged);
    }
    Ok(())
}

/// A block read from the source, on its way to a worker.
struct ReadBlock {
    disk: usize,
    index: u64,
    data: AlignedBuf,
    /// The parent's block at this offset, a delta base to try ([`BasePrefetch::likely_base`]).
    likely_base: Option<BlobId>,
    /// How the source repository of a copy stored the block ([`DiskSource::stored_form`]).
    stored_form: Option<StoredForm>,
}

/// A worker's verdict on one block.
struct BlockResult {
    index: u64,
    id: BlobId,
    kind: BlockKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum BlockKind {
    Zero,
    Known,
    New { stored: u32 },
}

/// The first error of any pipeline thread wins; the others stop at their next step.
#[derive(Default)]
struct Abort {
    flag: AtomicBool,
    error: Mutex<Option<Error>>,
    /// An assembler found a parent segment damaged and recorded it ([`Attempt::parent_damage_recorded`]).
    parent_damage_recorded: AtomicBool,
}

impl Abort {
    fn set(&self, e: Error) {
        let mut g = self.error.lock().unwrap();
        if g.is_none() {
            *g = Some(e);
        }
        self.flag.store(true, Ordering::SeqCst);
    }
    fn is_set(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }
    fn run(&self, f: impl FnOnce() -> Result<()>) {
        if let Err(e) = f() {
            self.set(e);
        }
    }
}

/// Blobs this run has decided to store (dedup within the run, before their packs are indexed).
struct Claims {
    cache: Arc<IndexCache>,
    new: Mutex<HashSet<BlobId>>,
}

impl Claims {
    /// True if the blob must be stored by the caller (it is neither in the repository nor claimed already).
    fn claim(&self, id: &BlobId) -> Result<bool> {
        if self.cache.contains(id)? {
            return Ok(false);
        }
        Ok(self.new.lock().unwrap().insert(*id))
    }
}

/// Holds the open metadata pack; shared by the assemblers.
struct MetaPacker {
    writer: Mutex<Option<PackWriter>>,
    sealer: Mutex<BlobSealer>,
}

impl MetaPacker {
    /// Stores the open metadata pack now (not when it is full) and hands it to the indexer.
    fn flush(&self, repo: &Repository, done_tx: &Sender<IndexedPack>, counters: &Counters) -> Result<()> {
        let Some(w) = self.writer.lock().unwrap().take().filter(|w| !w.is_empty()) else { return Ok(()) };
        let pack = w.finish(repo.keys());
        let stored = pack.bytes.len() as u64;
        let indexed = repo.save_pack(pack)?;
        counters.add_stored(stored);
        done_tx.send(indexed).map_err(|_| Error::Interrupted)
    }
}

/// Saves checkpoints (format-spec §8c) while a resumable backup runs: when a disk has assembled a segment and
/// the interval has passed, the segments of every disk so far, once the metadata pack holding them is stored.
/// Each checkpoint replaces the previous one; the last is deleted once the snapshot is saved.
struct Checkpointer {
    interval: Duration,
    state: Mutex<CheckpointState>,
}

struct CheckpointState {
    last: Instant,
    /// Every disk's segments assembled so far.
    checkpoint: Checkpoint,
    saved: Option<ObjectId>,
}

impl Checkpointer {
    fn new(
        opts: &BackupOptions,
        plans: &[DiskPlan],
        jobs: &[DiskJob],
        time: (i64, u32),
        block_size: u32,
    ) -> Option<Checkpointer> {
        let interval = opts.checkpoint_interval?;
        let disks = plans
            .iter()
            .zip(jobs)
            .map(|(p, j)| CheckpointDisk {
                name: p.name.clone(),
                capacity: p.capacity,
                block_size,
                change_token: j.change_token.clone(),
                segments: Vec::new(),
            })
            .collect();
        let checkpoint = Checkpoint {
            time_secs: time.0,
            time_nanos: time.1,
            hostname: opts.hostname.clone(),
            username: opts.username.clone(),
            source: opts.source.clone(),
            parent: Checkpoint::parent_ref(opts.parent.as_ref().map(|(id, s)| (id, s))),
            disks,
        };
        let state = CheckpointState { last: Instant::now(), checkpoint, saved: None };
        Some(Checkpointer { interval, state: Mutex::new(state) })
    }

    /// Disk `disk` has assembled its next segment, `seg` (already in the metadata packer).
    fn segment_done(
        &self,
        repo: &Repository,
        meta: &MetaPacker,
        done_tx: &Sender<IndexedPack>,
        counters: &Counters,
        disk: usize,
        seg: SegmentRef,
    ) -> Result<()> {
        let mut st = self.state.lock().unwrap();
        st.checkpoint.disks[disk].segments.push(seg);
        if st.last.elapsed() < self.interval {
            return Ok(());
        }
        // The segment blobs first: a checkpoint never names a segment that only this process holds.
        meta.flush(repo, done_tx, counters)?;
        let id = repo.save_checkpoint(&st.checkpoint)?;
        if let Some(previous) = st.saved.replace(id) {
            repo.delete_checkpoint(&previous);
        }
        st.last = Instant::now();
        Ok(())
    }

    fn saved(self) -> Option<ObjectId> {
        self.state.into_inner().unwrap().saved
    }
}

pub fn is_zero(buf: &[u8]) -> bool {
    // SAFETY: u128 has no invalid bit patterns; align_to only reinterprets the aligned middle part.
    let (pre, mid, post) = unsafe { buf.align_to::<u128>() };
    pre.iter().all(|&b| b == 0)
        && post.iter().all(|&b| b == 0)
        && mid.chunks(64).all(|c| c.iter().fold(0u128, |a, &x| a | x) == 0)
}

/// Starts a pipeline thread with a name (profiles and debuggers show which stage is busy).
fn spawn_named<'scope, T: Send + 'scope>(
    s: &'scope std::thread::Scope<'scope, '_>,
    name: &str,
    f: impl FnOnce() -> T + Send + 'scope,
) -> std::thread::ScopedJoinHandle<'scope, T> {
    std::thread::Builder::new().name(name.into()).spawn_scoped(s, f).expect("failed to spawn a thread")
}

/// Runs a backup of `jobs` and commits a snapshot. Returns its id and content. Brings `cache` up to date
/// itself, once its session marker exists.
pub fn run(
    repo: &Repository,
    cache: Arc<IndexCache>,
    mut jobs: Vec<DiskJob>,
    opts: &BackupOptions,
    counters: &Counters,
) -> Result<(ObjectId, Snapshot)> {
    let started = Instant::now();
    let (time_secs, time_nanos) = match opts.time_override {
        Some(t) => t,
        None => crate::util::now_time(),
    };
    if jobs.is_empty() {
        return Err(Error::invalid("nothing to back up"));
    }
    let mut seen = HashSet::new();
    for j in &jobs {
        if !seen.insert(j.name.clone()) {
            return Err(Error::invalid(format!("two disks are named {:?}", j.name)));
        }
    }
    // The session marker comes before the index is read: a prune either waits for this backup, or rewrote the
    // index before it, so that nothing it dropped is seen here (format-spec §9b).
    let session = crate::lock::start_session(repo, "backup")?;
    let synced = cache.sync(repo)?;
    if synced.changed() {
        tracing::info!("local index cache: {synced}");
    }
    // Packs a killed backup stored without indexing them: index them now, so that their blocks count as stored.
    // A resumed backup looks for them whatever this host's cache says: the interrupted one may have run elsewhere.
    let resuming = jobs.iter().any(|j| j.resume.is_some());
    let may_have_leftovers = cache.begin_backup()? || synced.rebuilt || resuming;
    let adopted = if may_have_leftovers {
        crate::repair::adopt_unindexed_packs(repo, &cache)?
    } else {
        crate::repair::RepairReport::default()
    };
    if adopted.packs_indexed > 0 {
        tracing::info!(
            "indexed {} packs left by an interrupted backup ({} blobs)",
            adopted.packs_indexed,
            adopted.blobs_indexed
        );
    }
    let block_size = repo.config().block_size as u64;
    // A parent segment found damaged mid-run (not known before: a check would have recorded it) is recorded, and
    // the disks are gone through once more, reading that segment's blocks from the source: its block ids are
    // lost, the source still has the blocks. What the first attempt stored is known by then (dedup).
    let mut first_attempt_checkpoint = None;
    let mut first_attempt_written = IndexStats::default();
    let (plans, attempt) = loop {
        let plans = plan_disks(repo, &cache, &mut jobs, opts, counters)?;
        let mut attempt = back_up_disks(repo, &cache, &mut jobs, &plans, opts, counters, (time_secs, time_nanos));
        let Some(e) = attempt.error.take() else { break (plans, attempt) };
        let saved = attempt.checkpointer.and_then(Checkpointer::saved);
        if attempt.parent_damage_recorded && first_attempt_checkpoint.is_none() && !crate::util::interrupted() {
            tracing::warn!("{e}; backing up again, reading the blocks of the damaged segment from the source");
            first_attempt_checkpoint = Some(saved);
            first_attempt_written = attempt.index_written;
            cache.sync(repo)?;
            if record_damaged_parent_segments(repo, &cache, &plans)? {
                cache.sync(repo)?;
            }
            continue;
        }
        if let Some(saved) = saved.or(first_attempt_checkpoint.flatten()) {
            tracing::warn!(
                "the progress of this backup is saved (checkpoint {}): the next backup of {} continues from there",
                saved.short(),
                opts.source
            );
        }
        return Err(e);
    };
    let Attempt { disk_outputs, index_written, checkpointer, .. } = attempt;

    let mut disks = Vec::with_capacity(plans.len());
    let bytes_added = index_written.pack_bytes + first_attempt_written.pack_bytes;
    let mut summary = Summary { bytes_added, ..Summary::default() };
    for ((plan, job), out) in plans.iter().zip(&jobs).zip(disk_outputs) {
        let (segments, stats) = out.ok_or_else(|| Error::invalid(format!("disk {} was not assembled", plan.name)))?;
        summary.bytes_read += stats.bytes_read;
        summary.new_blobs += stats.new_blocks;
        disks.push(DiskManifest {
            name: plan.name.clone(),
            source_kind: job.source.kind().to_string(),
            source_path: job.source.describe(),
            capacity: plan.capacity,
            block_size: block_size as u32,
            change_token: job.change_token.clone(),
            segments,
            stats,
        });
    }
    summary.duration_ms = started.elapsed().as_millis() as u64;
    let snapshot = Snapshot {
        time_secs,
        time_nanos,
        hostname: opts.hostname.clone(),
        username: opts.username.clone(),
        source: opts.source.clone(),
        tags: opts.tags.clone(),
        parent: opts.parent.as_ref().map(|(id, _)| *id),
        disks,
        annotations: opts.annotations.clone(),
        summary,
    };
    session.ensure_held()?;
    let id = repo.save_snapshot(&snapshot)?;
    for saved in [checkpointer.and_then(Checkpointer::saved), first_attempt_checkpoint.flatten()].into_iter().flatten()
    {
        repo.delete_checkpoint(&saved);
    }
    cache.end_backup()?;
    drop(session);
    Ok((id, snapshot))
}

/// After a pass met a damaged segment of a parent: reads the parents' other segments and records every damaged
/// one, so that the next pass reads their blocks from the source instead of meeting them one pass at a time (and
/// does not inherit a damaged segment whole). Returns whether it recorded any.
fn record_damaged_parent_segments(repo: &Repository, cache: &IndexCache, plans: &[DiskPlan]) -> Result<bool> {
    let segments: Vec<&SegmentRef> = plans.iter().filter_map(|p| p.parent.as_ref()).flat_map(|p| &p.segments).collect();
    let probe = |seg: &&SegmentRef| -> Result<Option<(ObjectId, BlobId)>> {
        // One without an intact indexed copy is read whole anyway.
        if !cache.contains(&seg.id)? {
            return Ok(None);
        }
        Ok(load_segment(repo, cache, seg).err().and_then(|e| cache.damaged_copy(&seg.id, &e)))
    };
    let probed: Vec<Result<Option<(ObjectId, BlobId)>>> =
        crate::util::with_request_threads(|| segments.par_iter().map(probe).collect())?;
    let mut found = Vec::new();
    for p in probed {
        found.extend(p?);
    }
    if found.is_empty() {
        return Ok(false);
    }
    tracing::warn!("{} more damaged manifest segment(s) of the parent snapshot: reading their blocks", found.len());
    Ok(crate::damage::record_found(repo, &cache.damage(), found))
}

/// The disks' plans: what to read, what to inherit from the parent (see [`plan_disk`] and the rereads).
fn plan_disks(
    repo: &Repository,
    cache: &IndexCache,
    jobs: &mut [DiskJob],
    opts: &BackupOptions,
    counters: &Counters,
) -> Result<Vec<DiskPlan>> {
    let block_size = repo.config().block_size as u64;
    let parent_snap = opts.parent.as_ref().map(|(_, s)| s);
    let mut plans: Vec<DiskPlan> =
        jobs.iter_mut().map(|j| plan_disk(j, parent_snap, block_size)).collect::<Result<_>>()?;
    for p in &mut plans {
        reread_unindexed_segments(p, cache)?;
        reread_unstored_checkpoint_blocks(repo, p, cache)?;
        reread_damaged_blocks(repo, p, cache)?;
    }
    for p in &plans {
        if let Some(n) = &p.note {
            tracing::warn!("{n}");
        }
        counters.add_total(p.read.block_count() * block_size);
    }
    Ok(plans)
}

/// What one pass of the pipeline over the disks gave.
struct Attempt {
    /// The first error of any pipeline thread.
    error: Option<Error>,
    /// A parent segment was found damaged and recorded: a second pass reads its blocks instead.
    parent_damage_recorded: bool,
    disk_outputs: Vec<Option<(Vec<SegmentRef>, DiskStats)>>,
    index_written: IndexStats,
    checkpointer: Option<Checkpointer>,
}

/// Reads, hashes, seals, packs, stores and indexes the disks' blocks as planned, and assembles their segments.
fn back_up_disks(
    repo: &Repository,
    cache: &Arc<IndexCache>,
    jobs: &mut [DiskJob],
    plans: &[DiskPlan],
    opts: &BackupOptions,
    counters: &Counters,
    (time_secs, time_nanos): (i64, u32),
) -> Attempt {
    let block_size = repo.config().block_size as u64;
    let abort = Abort::default();
    let claims = Claims { cache: cache.clone(), new: Mutex::new(HashSet::new()) };
    let meta = MetaPacker { writer: Mutex::new(None), sealer: Mutex::new(BlobSealer::new(repo.config().zstd_level)) };
    let pack_target = repo.config().pack_target_size as usize;
    let workers = opts.workers.max(1);

    let (block_tx, block_rx) = bounded::<ReadBlock>(workers * 2);
    // Block buffers go back to the readers once hashed and sealed: a fresh zeroed 1 MiB buffer per block cost
    // a memset and page faults per block (a few % of a full backup's CPU).
    let block_buffers = BufferPool::new(workers * 4 + jobs.len());
    // Stored data packs' buffers go back to the packer (where the backend did not keep them: local directories).
    let pack_buffers = BufferPool::<Vec<u8>>::new(opts.uploaders.max(1) + 1);
    let base_buffers = crate::delta::base_buffers(workers);
    let (blob_tx, blob_rx) = bounded::<SealedBlob>(workers * 2);
    let (pack_tx, pack_rx) = bounded::<FinishedPack>(1);
    let (done_tx, done_rx) = bounded::<IndexedPack>(64);
    let result_channels: Vec<(Sender<BlockResult>, Receiver<BlockResult>)> =
        plans.iter().map(|_| bounded(4096)).collect();
    let result_txs: Vec<Sender<BlockResult>> = result_channels.iter().map(|(t, _)| t.clone()).collect();

    let mut disk_outputs: Vec<Option<(Vec<SegmentRef>, DiskStats)>> = plans.iter().map(|_| None).collect();
    let mut index_written = IndexStats::default();
    let checkpointer = Checkpointer::new(opts, plans, jobs, (time_secs, time_nanos), block_size as u32);
    let prefetch = match opts.delta && repo.config().zstd_level != 0 {
        true => base_prefetch(repo, cache, plans, &base_buffers),
        false => None,
    };

    std::thread::scope(|s| {
        // Readers.
        for (d, (job, plan)) in jobs.iter_mut().zip(plans).enumerate() {
            let (block_tx, block_buffers) = (block_tx.clone(), &block_buffers);
            let (abort, prefetch) = (&abort, prefetch.as_ref());
            spawn_named(s, "backup-read", move || {
                abort.run(|| read_disk(d, job, plan, block_size, &block_tx, block_buffers, abort, counters, prefetch))
            });
        }
        drop(block_tx);

        // Delta bases read ahead (incrementals from change lists).
        if let Some(p) = &prefetch {
            for _ in 0..crate::delta::PREFETCH_THREADS {
                spawn_named(s, "backup-base", move || p.run(repo));
            }
        }

        // Workers.
        for _ in 0..workers {
            let block_rx = block_rx.clone();
            let blob_tx = blob_tx.clone();
            let result_txs = result_txs.clone();
            let (block_buffers, base_buffers) = (&block_buffers, base_buffers.clone());
            let (abort, claims, cache, prefetch) = (&abort, &claims, &cache, prefetch.as_ref());
            spawn_named(s, "backup-seal", move || {
                abort.run(|| {
                    let mut sealer = DeltaSealer::new(repo, cache, prefetch, base_buffers, opts.delta);
                    for b in block_rx {
                        if abort.is_set() {
                            break;
                        }
                        let r = process_block(repo, claims, &mut sealer, &b, &blob_tx, counters)?;
                        block_buffers.give(b.data);
                        if result_txs[b.disk].send(r).is_err() {
                            break;
                        }
                    }
                    Ok(())
                })
            });
        }
        drop(block_rx);
        drop(blob_tx);
        drop(result_txs);

        // Data packer. It packs every blob the workers sealed, also after an error elsewhere (the workers stop
        // taking blocks then): stored and indexed, they make the rerun cheaper.
        {
            let pack_tx = pack_tx.clone();
            let (abort, pack_buffers) = (&abort, &pack_buffers);
            spawn_named(s, "backup-pack", move || {
                abort.run(|| {
                    let mut writer: Option<PackWriter> = None;
                    for blob in blob_rx {
                        let w = writer.get_or_insert_with(|| {
                            PackWriter::with_buffer(BlobType::Data, pack_buffers.take(), pack_target + (2 << 20))
                        });
                        w.add(blob);
                        if w.len() >= pack_target {
                            let full = writer.take().unwrap().finish(repo.keys());
                            if pack_tx.send(full).is_err() {
                                return Ok(());
                            }
                        }
                    }
                    if let Some(w) = writer.filter(|w| !w.is_empty()) {
                        let _ = pack_tx.send(w.finish(repo.keys()));
                    }
                    Ok(())
                })
            });
        }

        // Uploaders.
        for _ in 0..opts.uploaders.max(1) {
            let (pack_rx, done_tx) = (pack_rx.clone(), done_tx.clone());
            let (abort, pack_buffers) = (&abort, &pack_buffers);
            spawn_named(s, "backup-store", move || {
                abort.run(|| {
                    for pack in pack_rx {
                        let stored = pack.bytes.len() as u64;
                        let (indexed, buffer) = repo.save_pack_keeping_buffer(pack)?;
                        if let Some(b) = buffer {
                            pack_buffers.give(b);
                        }
                        counters.add_stored(stored);
                        if done_tx.send(indexed).is_err() {
                            break;
                        }
                    }
                    Ok(())
                })
            });
        }
        drop(pack_rx);

        // Indexer.
        let indexer = {
            let abort = &abort;
            let cache = &cache;
            spawn_named(s, "backup-index", move || {
                let mut stats = IndexStats::default();
                abort.run(|| {
                    let mut pending = Vec::new();
                    for p in done_rx {
                        stats.packs += 1;
                        stats.pack_bytes += p.entries.iter().map(|e| e.stored_len as u64).sum::<u64>();
                        pending.push(p);
                        if pending.len() >= opts.checkpoint_packs && !abort.is_set() {
                            write_index(repo, cache, std::mem::take(&mut pending))?;
                        }
                    }
                    // The remaining packs are indexed even after a failure elsewhere: they are stored, and a
                    // rerun then reuses them instead of uploading them again.
                    if !pending.is_empty() {
                        write_index(repo, cache, pending)?;
                    }
                    Ok(())
                });
                stats
            })
        };

        // Assemblers.
        let assemblers: Vec<_> = plans
            .iter()
            .zip(result_channels)
            .enumerate()
            .map(|(d, (plan, (_, rx)))| {
                let (abort, claims, meta, pack_tx, done_tx) =
                    (&abort, &claims, &meta, pack_tx.clone(), done_tx.clone());
                let checkpoints = checkpointer.as_ref().map(|c| (c, d, done_tx));
                spawn_named(s, "backup-assemble", move || {
                    let mut out = None;
                    abort.run(|| {
                        let on_segment = |seg: SegmentRef| match &checkpoints {
                            Some((c, d, done_tx)) => c.segment_done(repo, meta, done_tx, counters, *d, seg),
                            None => Ok(()),
                        };
                        let recorded = &abort.parent_damage_recorded;
                        out = Some(assemble_disk(
                            repo,
                            claims,
                            meta,
                            plan,
                            rx,
                            &pack_tx,
                            pack_target,
                            recorded,
                            on_segment,
                        )?);
                        Ok(())
                    });
                    out
                })
            })
            .collect();
        drop(done_tx);
        for (d, a) in assemblers.into_iter().enumerate() {
            disk_outputs[d] = a.join().unwrap_or(None);
        }
        // Every block is sealed (or the backup stopped): no base is needed any more.
        if let Some(p) = &prefetch {
            p.stop();
        }
        // All segments are emitted: close the metadata pack.
        if !abort.is_set() {
            if let Some(w) = meta.writer.lock().unwrap().take().filter(|w| !w.is_empty()) {
                let _ = pack_tx.send(w.finish(repo.keys()));
            }
        }
        drop(pack_tx);
        index_written = indexer.join().unwrap_or_default();
    });
    let parent_damage_recorded = abort.parent_damage_recorded.load(Ordering::SeqCst);
    let error = abort.error.into_inner().unwrap();
    Attempt { error, parent_damage_recorded, disk_outputs, index_written, checkpointer }
}

#[derive(Default, Clone, Copy)]
struct IndexStats {
    packs: u64,
    pack_bytes: u64,
}

fn write_index(repo: &Repository, cache: &IndexCache, packs: Vec<IndexedPack>) -> Result<()> {
    let file = IndexFile { supersedes: Vec::new(), packs };
    let id = repo.save_index(&file)?;
    cache.insert_index_file(&id, &file)
}

#[allow(clippy::too_many_arguments)]
fn read_disk(
    disk: usize,
    job: &mut DiskJob,
    plan: &DiskPlan,
    block_size: u64,
    tx: &Sender<ReadBlock>,
    buffers: &BufferPool,
    abort: &Abort,
    counters: &Counters,
    prefetch: Option<&BasePrefetch>,
) -> Result<()> {
    job.source.will_read(&plan.read, block_size);
    for (k, index) in plan.read.iter().enumerate() {
        if let Some(p) = prefetch {
            p.advance(disk, k as u64);
        }
        if crate::util::interrupted() {
            return Err(Error::Interrupted);
        }
        if abort.is_set() {
            return Ok(());
        }
        let offset = index * block_size;
        let len = block_size.min(plan.capacity - offset) as usize;
        // Page-aligned, so that a file source may read it with O_DIRECT.
        let mut data = buffers.take();
        job.source.read_block(offset, len, &mut data)?;
        counters.add_done(len as u64);
        let likely_base = prefetch.and_then(|p| p.likely_base(disk, k as u64));
        let stored_form = job.source.stored_form(offset);
        if tx.send(ReadBlock { disk, index, data, likely_base, stored_form }).is_err() {
            return Ok(());
        }
    }
    Ok(())
}

fn process_block(
    repo: &Repository,
    claims: &Claims,
    sealer: &mut DeltaSealer,
    block: &ReadBlock,
    blob_tx: &Sender<SealedBlob>,
    counters: &Counters,
) -> Result<BlockResult> {
    let (data, index) = (&block.data[..], block.index);
    if is_zero(data) {
        return Ok(BlockResult { index, id: BlobId::ZERO, kind: BlockKind::Zero });
    }
    let id = repo.keys().blob_id(data);
    if !claims.claim(&id)? {
        return Ok(BlockResult { index, id, kind: BlockKind::Known });
    }
    let sealed = sealer.seal(id, data, block.likely_base, block.stored_form.as_ref())?;
    let stored = sealed.bytes.len() as u32;
    // A block with a stored form is sealed in it unless it became a delta.
    if block.stored_form.is_some() && sealed.base.is_none() {
        counters.add_sealed_as_stored(1);
    }
    // A closed channel means the packer stopped on an error, which the abort records.
    let _ = blob_tx.send(sealed);
    Ok(BlockResult { index, id, kind: BlockKind::New { stored } })
}

/// The likely delta bases of an incremental from a change list: the parent's block at each offset to be read,
/// where the index lists it as a plain data blob. `None` when no disk has such candidates. Best effort: a parent
/// segment that cannot be read only means no prefetch for its blocks (the backup itself reports it).
fn base_prefetch(
    repo: &Repository,
    cache: &IndexCache,
    plans: &[DiskPlan],
    buffers: &BufferPool,
) -> Option<BasePrefetch> {
    let mut candidates = Vec::with_capacity(plans.len());
    for plan in plans {
        let mut disk = Vec::new();
        if let Some(parent) = &plan.parent {
            let segment_of = |block: u64| (block / SEGMENT_BLOCKS as u64) as usize;
            // The parent's segments holding blocks to read, loaded several at a time (on S3 each is a round trip;
            // a 2 TiB disk has 512), and taken in order with the blocks they hold.
            let mut needed: Vec<usize> =
                plan.read.iter().map(segment_of).filter(|&s| s < parent.segments.len()).collect();
            needed.dedup();
            let mut blocks = plan.read.iter().enumerate().peekable();
            let load = |&s: &usize| load_segment(repo, cache, &parent.segments[s]);
            let prefetched = crate::util::fetch_in_order(&needed, load, |&s, ids| {
                let ids = ids.unwrap_or_else(|e| {
                    tracing::debug!("no delta base prefetch for segment {s}: {e}");
                    Vec::new()
                });
                while let Some((k, block)) = blocks.next_if(|&(_, block)| segment_of(block) == s) {
                    let Some(id) = ids.get(block as usize % SEGMENT_BLOCKS).filter(|id| !id.is_zero_block()) else {
                        continue;
                    };
                    if let Ok(Some(loc)) = cache.lookup_intact(id) {
                        if loc.entry.can_be_base() {
                            disk.push((k as u64, loc));
                        }
                    }
                }
                Ok(())
            });
            if let Err(e) = prefetched {
                tracing::debug!("no delta base prefetch: {e}");
            }
        }
        candidates.push(disk);
    }
    let p = BasePrefetch::new(candidates, buffers.clone());
    (!p.is_empty()).then_some(p)
}

/// Loads the block ids of one of the parent's segments.
pub(crate) fn load_segment(repo: &Repository, cache: &IndexCache, seg: &SegmentRef) -> Result<Vec<BlobId>> {
    match cache.lookup(&seg.id)? {
        None => Err(Error::Missing {
            object: format!("manifest segment {} (not in any index file: {})", seg.id, cache.why_not_indexed()),
        }),
        loc => read_segment(repo, loc, seg),
    }
}

/// Reads a segment blob stored at `loc` (`None`: no index file lists it) and checks it holds `seg.blocks` ids.
pub(crate) fn read_segment(repo: &Repository, loc: Option<BlobLocation>, seg: &SegmentRef) -> Result<Vec<BlobId>> {
    let loc =
        loc.ok_or_else(|| Error::Missing { object: format!("manifest segment {} (not in any index file)", seg.id) })?;
    let plain = repo.read_blob(&loc, &crate::repository::NoDeltas)?;
    if plain.len() != seg.blocks as usize * 32 {
        return Err(Error::corrupt(
            format!("manifest segment {}", seg.id),
            format!("holds {} bytes, expected {} block ids", plain.len(), seg.blocks),
        ));
    }
    Ok(segment_ids(&plain))
}

/// Segment `seg` of `plan`'s disk: its blocks, and how many of them are read from the source.
fn segment_reads(plan: &DiskPlan, seg: u64) -> (std::ops::Range<u64>, u64) {
    let first = seg * SEGMENT_BLOCKS as u64;
    let last = (first + SEGMENT_BLOCKS as u64).min(plan.blocks);
    let read_here = plan.read.ranges().iter().map(|r| r.end.min(last).saturating_sub(r.start.max(first))).sum();
    (first..last, read_here)
}

/// Whether segment `seg` of `plan`'s disk takes blocks from the parent's segment, which must then be read (not
/// every block of it is read from the source, and the parent's segment cannot be reused whole): that segment.
fn parent_segment_to_read(plan: &DiskPlan, seg: u64) -> Option<SegmentRef> {
    let (blocks, read_here) = segment_reads(plan, seg);
    let n = blocks.end - blocks.start;
    let ps = plan.parent.as_ref().and_then(|p| p.segments.get(seg as usize)).copied()?;
    let reused_whole = read_here == 0 && ps.blocks as u64 == n;
    (read_here < n && !reused_whole).then_some(ps)
}

/// Assembles a disk's manifest segments from the block results of its reads and the parent's segments, which a
/// thread reads ahead in order, several at a time (on S3 each is a round trip, and a 2 TiB disk has 512).
#[allow(clippy::too_many_arguments)]
fn assemble_disk(
    repo: &Repository,
    claims: &Claims,
    meta: &MetaPacker,
    plan: &DiskPlan,
    results: Receiver<BlockResult>,
    pack_tx: &Sender<FinishedPack>,
    pack_target: usize,
    parent_damage_recorded: &AtomicBool,
    on_segment: impl Fn(SegmentRef) -> Result<()>,
) -> Result<(Vec<SegmentRef>, DiskStats)> {
    let needed: Vec<SegmentRef> =
        (0..plan.blocks.div_ceil(SEGMENT_BLOCKS as u64)).filter_map(|seg| parent_segment_to_read(plan, seg)).collect();
    std::thread::scope(|s| {
        let (tx, parent_segments) = bounded(crate::util::REQUESTS_IN_FLIGHT);
        spawn_named(s, "backup-parent", move || {
            let load = |ps: &SegmentRef| load_segment(repo, &claims.cache, ps);
            let read = crate::util::fetch_in_order(&needed, load, |_, r| tx.send(r).map_err(|_| Error::Interrupted));
            if let Err(e) = read {
                let _ = tx.send(Err(e));
            }
        });
        let assembled = assemble_segments(
            repo,
            claims,
            meta,
            plan,
            results,
            &parent_segments,
            pack_tx,
            pack_target,
            parent_damage_recorded,
            on_segment,
        );
        // The reader stops at its next segment if the assembly stopped early.
        drop(parent_segments);
        assembled
    })
}

#[allow(clippy::too_many_arguments)]
fn assemble_segments(
    repo: &Repository,
    claims: &Claims,
    meta: &MetaPacker,
    plan: &DiskPlan,
    results: Receiver<BlockResult>,
    parent_segments: &Receiver<Result<Vec<BlobId>>>,
    pack_tx: &Sender<FinishedPack>,
    pack_target: usize,
    parent_damage_recorded: &AtomicBool,
    on_segment: impl Fn(SegmentRef) -> Result<()>,
) -> Result<(Vec<SegmentRef>, DiskStats)> {
    let mut stats = DiskStats::default();
    let mut pending: HashMap<u64, BlockResult> = HashMap::new();
    let mut segments = Vec::new();
    let mut read_cursor = plan.read.cursor();
    let seg_count = plan.blocks.div_ceil(SEGMENT_BLOCKS as u64);
    let block_size = repo.config().block_size as u64;

    for seg in 0..seg_count {
        let (std::ops::Range { start: first, end: last }, read_here) = segment_reads(plan, seg);
        let n = (last - first) as u32;
        let parent_seg = plan.parent.as_ref().and_then(|p| p.segments.get(seg as usize)).copied();

        // Unchanged segment of an incremental: reuse the parent's segment as it is.
        if read_here == 0 {
            if let Some(ps) = parent_seg.filter(|ps| ps.blocks == n) {
                segments.push(ps);
                stats.blocks_inherited += n as u64;
                on_segment(ps)?;
                continue;
            }
        }
        let parent_ids = match parent_segment_to_read(plan, seg) {
            Some(ps) => {
                // Unchanged blocks come from the parent: with its segment unreadable this pass cannot assemble the
                // disk. Recorded as damaged, the segment's blocks are read from the source in a second pass
                // ([`run`]); a backup without the record would deduplicate against the same damaged blob.
                let loaded = parent_segments.recv().unwrap_or(Err(Error::Interrupted));
                Some(loaded.map_err(|e| {
                    let copy = claims.cache.damaged_copy(&ps.id, &e);
                    let recorded =
                        copy.is_some_and(|c| crate::damage::record_found(repo, &claims.cache.damage(), vec![c]));
                    if recorded {
                        parent_damage_recorded.store(true, Ordering::SeqCst);
                    }
                    e.with_remedy(if recorded {
                        "it is a manifest segment of the parent snapshot, now recorded as damaged, so that its blocks \
                         are read from the source instead (by a second pass of this backup, or by the next one)"
                    } else {
                        "it is a manifest segment of the parent snapshot: `check --read-data` records the damage, \
                         after which the next backup reads the segment's blocks again (or `repair packs` takes the \
                         damaged pack out, its intact blobs kept)"
                    })
                })?)
            }
            None => None,
        };
        let mut ids = Vec::with_capacity(n as usize * 32);
        for i in first..last {
            let id = if read_cursor.contains(i) {
                let r = loop {
                    if let Some(r) = pending.remove(&i) {
                        break r;
                    }
                    match results.recv() {
                        Ok(r) => {
                            pending.insert(r.index, r);
                        }
                        // The workers stopped: an error elsewhere is recorded in the abort.
                        Err(_) => return Err(Error::Interrupted),
                    }
                };
                let len = block_size.min(plan.capacity - i * block_size);
                stats.blocks_read += 1;
                stats.bytes_read += len;
                match r.kind {
                    BlockKind::Zero => stats.zero_blocks += 1,
                    BlockKind::Known => {}
                    BlockKind::New { stored } => {
                        stats.new_blocks += 1;
                        stats.new_bytes_stored += stored as u64;
                    }
                }
                r.id
            } else {
                let inherited = parent_ids.as_ref().and_then(|p| p.get((i - first) as usize)).copied();
                match inherited {
                    Some(id) => {
                        stats.blocks_inherited += 1;
                        if id.is_zero_block() {
                            stats.zero_blocks += 1;
                        }
                        id
                    }
                    None => {
                        stats.zero_blocks += 1;
                        BlobId::ZERO
                    }
                }
            };
            ids.extend_from_slice(&id.0);
        }
        let seg_id = repo.keys().blob_id(&ids);
        if claims.claim(&seg_id)? {
            let sealed = meta.sealer.lock().unwrap().seal(repo.keys(), BlobType::Segment, seg_id, &ids);
            let full = {
                let mut w = meta.writer.lock().unwrap();
                let writer = w.get_or_insert_with(|| PackWriter::new(BlobType::Segment, pack_target));
                writer.add(sealed);
                if writer.len() >= pack_target {
                    w.take()
                } else {
                    None
                }
            };
            if let Some(full) = full {
                pack_tx.send(full.finish(repo.keys())).map_err(|_| Error::Interrupted)?;
            }
        }
        segments.push(SegmentRef { id: seg_id, blocks: n });
        on_segment(SegmentRef { id: seg_id, blocks: n })?;
    }
    Ok((segments, stats))
}

#[cfg(test)]
mod tests {
    #[test]
    fn zero_detection() {
        let mut v = vec![0u8; (1 << 20) + 3];
        assert!(super::is_zero(&v));
        assert!(super::is_zero(&v[1..]));
        for pos in [0, 1, 17, 4096, v.len() - 1] {
            v[pos] = 1;
            assert!(!super::is_zero(&v), "byte {pos}");
            v[pos] = 0;
        }
    }
}
