//! Restore of one disk of a snapshot to a file or block device.
//!
//! The disk is restored one manifest segment (4096 blocks) at a time. Within a segment, the blobs needed are
//! grouped by pack and coalesced into ranged reads; a pool of fetchers reads them in parallel, authenticates
//! and decompresses every blob, re-checks its id, and writes it at every offset that holds it. Delta blobs
//! ([`crate::delta`]) are fetched alongside, in batches whose bases are read ahead together (`Bases`). Zero blocks
//! become holes in a fresh file; on a block device they are zeroed by the device where it can (`fallocate`:
//! WRITE ZEROES, unmapping where allowed), else written. `verify` re-reads the target afterwards
//! and compares every block's id with the manifest.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rayon::prelude::*;

use crate::backup::{is_zero, load_segment};
use crate::cache::IndexCache;
use crate::error::{Error, Result};
use crate::format::pack::{self, PackEntry};
use crate::format::snapshot::DiskManifest;
use crate::format::{names, BlobId, ObjectId, SEGMENT_BLOCKS};
use crate::progress::Counters;
use crate::repository::{BlobLocator, Repository};
use crate::util::{AlignedBuf, BufferPool, BUF_ALIGN};

pub struct RestoreOptions {
    /// Replace an existing regular file.
    pub overwrite: bool,
    /// Re-read the target afterwards and compare every block's id.
    pub verify: bool,
    /// Concurrent pack reads.
    pub fetchers: usize,
    /// Restore what can be restored when blocks are damaged; report the rest (see [`RestoreStats::damaged`]).
    pub allow_partial: bool,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions { overwrite: false, verify: false, fetchers: 4, allow_partial: false }
    }
}

#[derive(Debug, Default, Clone)]
pub struct RestoreStats {
    pub blocks_written: u64,
    pub bytes_written: u64,
    pub zero_blocks: u64,
    pub bytes_fetched: u64,
    pub blocks_verified: u64,
    /// With `allow_partial`: byte ranges that could not be restored (left as zeros), with the cause.
    pub damaged: Vec<DamagedRange>,
}

/// Ranged reads are merged across gaps up to this size, and capped at this length.
const COALESCE_GAP: u64 = 256 << 10;
const MAX_READ: u64 = 16 << 20;

struct Target {
    file: File,
    path: PathBuf,
    /// Holes already read as zeros (fresh sparse file); otherwise zero blocks are zeroed ([`Target::zero`]).
    holes_are_zero: bool,
    /// The device has taken a zeroing request, or none was tried yet ([`zero_device_range`]).
    zeroes_offloaded: AtomicBool,
}

impl Target {
    /// Makes `range` of the target read as zeros, on a target whose holes are not zero already (a block
    /// device): with one request to the device where it takes one, else by writing zero blocks through
    /// `writer` (`zero_block` is one block of zeros).
    fn zero(&self, range: std::ops::Range<u64>, writer: &Writer, zero_block: &Arc<AlignedBuf>) -> Result<()> {
        if self.holes_are_zero || range.is_empty() {
            return Ok(());
        }
        if self.zeroes_offloaded.load(Ordering::Relaxed) {
            match zero_device_range(&self.file, range.start, range.end - range.start) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    tracing::debug!("{}: zeroing {range:?} on the device: {e}; writing zeros", self.path.display());
                    // Neither request exists for this device: do not ask again for every range.
                    if e.raw_os_error() == Some(libc::EOPNOTSUPP) {
                        self.zeroes_offloaded.store(false, Ordering::Relaxed);
                    }
                }
            }
        }
        let bs = zero_block.len() as u64;
        for off in range.clone().step_by(bs as usize) {
            writer.write(off, zero_block.clone(), (range.end - off).min(bs) as usize)?;
        }
        Ok(())
    }
}

/// Zeroes `len` bytes at `offset` of a block device without sending them: `fallocate(PUNCH_HOLE)` asks the
/// device to zero the range and lets it deallocate it (a thin LVM volume, an SSD, a virtual disk or a SAN LUN
/// that honours WRITE ZEROES with unmap stays thin, instantly); a device that cannot unmap gets
/// `fallocate(ZERO_RANGE)`, which the kernel turns into WRITE ZEROES or, failing that, writes the zeros
/// itself. Restoring the benchmark's vm1-day1 (2.6 of its 4 GiB are zero blocks) onto a loop device over a
/// sparse file: 3.7 s writing zero blocks, which allocated all 4.1 GB of the file; 1.6 s and 1.4 GB this way.
fn zero_device_range(file: &File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let (Ok(off), Ok(n)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(std::io::ErrorKind::InvalidInput.into());
    };
    let fallocate = |mode| {
        // SAFETY: a plain system call on an open descriptor; no memory is passed.
        if unsafe { libc::fallocate(file.as_raw_fd(), mode, off, n) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    fallocate(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)
        .or_else(|_| fallocate(libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE))
}

fn open_target(path: &Path, capacity: u64, overwrite: bool) -> Result<Target> {
    let meta = std::fs::metadata(path).ok();
    let is_device = meta.as_ref().is_some_and(|m| m.file_type().is_block_device());
    if is_device {
        let file = OpenOptions::new().write(true).read(true).open(path).map_err(|e| Error::local(path, e))?;
        let size = {
            use std::io::{Seek, SeekFrom};
            (&file).seek(SeekFrom::End(0)).map_err(|e| Error::local(path, e))?
        };
        if size < capacity {
            return Err(Error::local(path, format!("the block device has {size} bytes, the disk needs {capacity}")));
        }
        return Ok(Target { file, path: path.into(), holes_are_zero: false, zeroes_offloaded: AtomicBool::new(true) });
    }
    if let Some(m) = &meta {
        if !m.is_file() {
            return Err(Error::local(path, "exists and is neither a regular file nor a block device"));
        }
        if !overwrite {
            return Err(Error::local(path, "exists already (use --overwrite to replace it)"));
        }
    }
    let file = OpenOptions::new()
        .write(true)
        .read(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::local(path, format!("cannot create: {e}")))?;
    file.set_len(capacity).map_err(|e| Error::local(path, e))?;
    Ok(Target { file, path: path.into(), holes_are_zero: true, zeroes_offloaded: AtomicBool::new(false) })
}

/// Where the bases of delta blobs come from while blobs are opened ([`Bases::with_base`]): those read ahead for
/// a batch of deltas (restore), else a read of their own through `locator`.
pub(crate) struct Bases<'a> {
    locator: &'a dyn BlobLocator,
    preloaded: Mutex<HashMap<BlobId, Arc<AlignedBuf>>>,
    /// Buffers of a finished batch, for the next one (fresh 1 MiB buffers cost page faults).
    spare: BufferPool,
}

impl<'a> Bases<'a> {
    pub fn new(locator: &'a dyn BlobLocator) -> Self {
        Bases { locator, preloaded: Mutex::new(HashMap::new()), spare: BufferPool::new(BASES_PER_BATCH) }
    }

    /// Opens a blob with `open`, given its delta base if it is a delta blob: the base read ahead for this batch,
    /// else one of this thread's recent bases, else read now (consecutive changed blocks of a disk often share
    /// a base, such as a clone's file copied from one template block).
    fn with_base<T>(&self, repo: &Repository, entry: &PackEntry, open: impl FnOnce(Option<&[u8]>) -> T) -> Result<T> {
        const KEPT: usize = 4;
        thread_local! {
            static RECENT: std::cell::RefCell<Vec<(BlobId, std::rc::Rc<Vec<u8>>)>> =
                const { std::cell::RefCell::new(Vec::new()) };
        }
        let Some(id) = entry.base else { return Ok(open(None)) };
        if let Some(b) = self.preloaded.lock().unwrap().get(&id).cloned() {
            return Ok(open(Some(&b)));
        }
        let recent = RECENT.with_borrow(|v| v.iter().find(|(k, _)| *k == id).map(|(_, b)| b.clone()));
        let base = match recent {
            Some(b) => b,
            None => {
                let b = std::rc::Rc::new(repo.read_base(entry, self.locator)?.expect("a delta has a base"));
                RECENT.with_borrow_mut(|v| {
                    if v.len() == KEPT {
                        v.remove(0);
                    }
                    v.push((id, b.clone()));
                });
                b
            }
        };
        Ok(open(Some(&base)))
    }

    /// Forgets the batch's bases, keeping their buffers.
    pub(crate) fn end_batch(&self) {
        let done: Vec<Arc<AlignedBuf>> = self.preloaded.lock().unwrap().drain().map(|(_, b)| b).collect();
        for b in done {
            self.spare.give_shared(b);
        }
    }
}

/// Runs `f` with this thread's range buffer: each fetcher reads its ranges into one buffer (see
/// `Backend::get_range_placed`).
pub(crate) fn with_range_buffer<T>(f: impl FnOnce(&mut Vec<u8>) -> T) -> T {
    thread_local! {
        static RANGE: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    RANGE.with_borrow_mut(f)
}

/// Distinct bases read ahead at once for delta blobs (each up to a block: bounds restore's memory, which holds
/// them beside the whole blobs being fetched). 16 instead of 32 since the batches run alongside the whole blobs:
/// peak RSS of the benchmark's vm1-day1 restore 176 instead of 193 MiB, of a 16 GiB disk 176 instead of
/// 193-216 MiB, wall time the same (six and three alternating runs).
const BASES_PER_BATCH: usize = 16;

/// One blob to fetch and the disk blocks it fills.
pub(crate) struct Want {
    pub entry: PackEntry,
    pub blocks: Vec<u64>,
}

/// One ranged read of a pack and the blobs in it.
pub(crate) struct ReadJob {
    pub pack: ObjectId,
    pub offset: u64,
    pub len: u64,
    pub wants: Vec<Want>,
}

/// A byte range of the restored disk that could not be restored, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DamagedRange {
    pub start: u64,
    pub end: u64,
    pub cause: String,
}

/// Blocks that could not be restored, with the cause; merged into ranges at the end.
#[derive(Default)]
struct Damage(Mutex<Vec<(u64, String)>>);

impl Damage {
    fn add(&self, blocks: impl IntoIterator<Item = u64>, cause: &str) {
        self.0.lock().unwrap().extend(blocks.into_iter().map(|b| (b, cause.to_string())));
    }

    fn into_ranges(self, disk: &DiskManifest) -> Vec<DamagedRange> {
        let bs = disk.block_size as u64;
        let mut blocks = self.0.into_inner().unwrap();
        blocks.sort_by_key(|(b, _)| *b);
        let mut out: Vec<DamagedRange> = Vec::new();
        for (b, cause) in blocks {
            let (start, end) = (b * bs, ((b + 1) * bs).min(disk.capacity));
            match out.last_mut() {
                Some(r) if r.end >= start && r.cause == cause => r.end = r.end.max(end),
                _ => out.push(DamagedRange { start, end, cause }),
            }
        }
        out
    }
}

/// Restores `disk` to `target`.
///
/// Without `allow_partial` the first unreadable block stops the restore with an error naming the block, its
/// byte range and the damaged object. With it, every block that can be restored is, the others are left as
/// zeros, and [`RestoreStats::damaged`] lists their byte ranges and causes. Brings `cache` up to date itself,
/// once its session marker exists.
pub fn restore_disk(
    repo: &Repository,
    cache: &IndexCache,
    disk: &DiskManifest,
    target: &Path,
    opts: &RestoreOptions,
    counters: &Counters,
) -> Result<RestoreStats> {
    disk.validate().map_err(|e| Error::corrupt("snapshot", e))?;
    // A session from before the index is read until the last blob: a prune that moves blobs waits for it.
    let session = crate::lock::start_session(repo, "restore")?;
    cache.sync(repo)?;
    let t = open_target(target, disk.capacity, opts.overwrite)?;
    counters.add_total(disk.capacity);
    let bs = disk.block_size as u64;
    let stats = Mutex::new(RestoreStats::default());
    let damage = Damage::default();
    let zero_buf = Arc::new(AlignedBuf::zeroed(bs as usize));
    let mut writer = Writer::start(&t)?;
    let describe =
        |block: u64| format!("block {block} (bytes {}..{})", block * bs, ((block + 1) * bs).min(disk.capacity));
    // Blob copies found damaged, recorded for the next backups (format-spec §8d).
    let found: Mutex<Vec<(ObjectId, BlobId)>> = Mutex::default();
    // Stops at the first damage unless partial restores are allowed.
    let damaged = |blocks: Vec<u64>, cause: String, copies: &[(ObjectId, BlobId)]| -> Result<()> {
        found.lock().unwrap().extend_from_slice(copies);
        if !opts.allow_partial {
            return Err(Error::Restore {
                disk: disk.name.clone(),
                cause: format!("{} cannot be restored: {cause}", describe(blocks[0])),
            });
        }
        damage.add(blocks, &cause);
        Ok(())
    };

    // Its threads are joined before the restore goes on (see `util::with_thread_pool`).
    let fetched = crate::util::with_thread_pool(opts.fetchers.max(1), "restore-fetch", |pool| -> Result<()> {
        for (k, seg) in disk.segments.iter().enumerate() {
            if crate::util::interrupted() {
                writer.finish()?;
                return Err(Error::Interrupted);
            }
            let first = k as u64 * SEGMENT_BLOCKS as u64;
            let ids = match load_segment(repo, cache, seg) {
                Ok(ids) => ids,
                Err(e) => {
                    let blocks: Vec<u64> = (first..first + seg.blocks as u64).collect();
                    let copy = cache.damaged_copy(&seg.id, &e);
                    let cause = format!("manifest segment {} is unreadable: {e}", seg.id.short());
                    damaged(blocks, cause, copy.as_slice())?;
                    continue;
                }
            };
            let mut by_pack: HashMap<ObjectId, HashMap<BlobId, Want>> = HashMap::new();
            // Runs of zero blocks (byte ranges), zeroed after the segment's data.
            let mut zeros: Vec<std::ops::Range<u64>> = Vec::new();
            for (j, id) in ids.iter().enumerate() {
                let block = first + j as u64;
                let len = bs.min(disk.capacity - block * bs);
                if id.is_zero_block() {
                    match zeros.last_mut() {
                        Some(run) if run.end == block * bs => run.end += len,
                        _ => zeros.push(block * bs..block * bs + len),
                    }
                    stats.lock().unwrap().zero_blocks += 1;
                    counters.add_done(len);
                    continue;
                }
                let Some(loc) = cache.lookup(id)? else {
                    let cause = format!("blob {id} is not in any index file ({})", cache.why_not_indexed());
                    damaged(vec![block], cause, &[])?;
                    continue;
                };
                by_pack
                    .entry(loc.pack)
                    .or_default()
                    .entry(*id)
                    .or_insert_with(|| Want { entry: loc.entry, blocks: Vec::new() })
                    .blocks
                    .push(block);
            }
            // Whole blobs, and alongside them the delta blobs in batches whose bases are read ahead together (with
            // one ranged read per base, restoring from remote storage waited for a round trip per delta). The deltas
            // do not wait for the whole blobs: after them, the reads of their bases and the batches' turns left
            // the disk half idle (0.2 s of a 1.6 s restore of the benchmark's day 1).
            let (whole, delta_batches) = split_deltas(by_pack, cache)?;
            let bases = Bases::new(cache);
            // Set when one side fails: the other stops too, and the failure is the one reported.
            let failed = AtomicBool::new(false);
            // The fetchers take the jobs one by one in their (disk) order: `par_iter` would split the list into
            // a quarter per fetcher, and the target would be written in four far-apart places at once. The gain is
            // small: on the benchmark's vm1-day1, median 2.50 -> 2.39 s over 8 alternating cold runs, within noise
            // in 4 more (the writer waits on the disk either way, and its runs were as long as before).
            let run_jobs = |jobs: Vec<ReadJob>| -> Result<()> {
                let done = jobs.iter().par_bridge().try_for_each(|job| -> std::result::Result<(), Option<Error>> {
                    if failed.load(Ordering::Relaxed) {
                        return Err(None);
                    }
                    if crate::util::interrupted() {
                        return Err(Some(Error::Interrupted));
                    }
                    let (blocks, bytes) = run_read_job(repo, &bases, disk, &writer, job, counters, &damaged)?;
                    let mut s = stats.lock().unwrap();
                    s.bytes_fetched += job.len;
                    s.blocks_written += blocks;
                    s.bytes_written += bytes;
                    Ok(())
                });
                match done {
                    Ok(()) | Err(None) => Ok(()),
                    Err(Some(e)) => {
                        failed.store(true, Ordering::Relaxed);
                        Err(e)
                    }
                }
            };
            let run_deltas = || -> Result<()> {
                for (base_wants, deltas) in delta_batches {
                    if failed.load(Ordering::Relaxed) {
                        break;
                    }
                    preload_bases(repo, &bases, base_wants);
                    run_jobs(plan_reads(deltas))?;
                    bases.end_batch();
                }
                Ok(())
            };
            let (whole_done, deltas_done) = pool.install(|| rayon::join(|| run_jobs(plan_reads(whole)), run_deltas));
            let fetched = whole_done
                .and(deltas_done)
                .and_then(|()| zeros.into_iter().try_for_each(|run| t.zero(run, &writer, &zero_buf)));
            if let Err(e) = fetched {
                // A write error stops the fetchers with "the writer stopped": report the write error itself.
                writer.finish()?;
                return Err(e);
            }
        }
        Ok(())
    });
    crate::damage::record_found(repo, &cache.damage(), found.into_inner().unwrap_or_else(|p| p.into_inner()));
    fetched??;
    // Damaged blocks must read as zeros, whatever the target held before.
    let damaged_ranges = damage.into_ranges(disk);
    let zeroed = damaged_ranges.iter().try_for_each(|r| t.zero(r.start..r.end, &writer, &zero_buf));
    writer.finish()?;
    zeroed?;
    t.file.sync_all().map_err(|e| Error::local(&t.path, format!("sync: {e}")))?;
    let mut stats = stats.into_inner().unwrap();
    if opts.verify {
        stats.blocks_verified = verify_target(repo, cache, disk, &t, &damaged_ranges)?;
    }
    stats.damaged = damaged_ranges;
    drop(session);
    Ok(stats)
}

/// Writes every byte of `disk` (of snapshot `id`), in order, to `out`: a pipe (`restore --target -`), where
/// nothing can be written out of order and no hole can be left. Blocks are read as `copy` reads a source
/// ([`SnapshotSource`](crate::source::snapshot::SnapshotSource)): a thread per core fetches the allocated blocks
/// a few batches ahead in coalesced ranged reads, every blob authenticated, decompressed and its id re-checked; zero
/// blocks are written as zeros. Returns the bytes written. A damaged block stops the stream with an error
/// naming it: what was written before it is a correct prefix of the disk.
pub fn stream_disk(
    repo: Repository,
    cache: Arc<IndexCache>,
    id: &ObjectId,
    disk: &DiskManifest,
    out: &mut dyn std::io::Write,
    counters: &Counters,
) -> Result<u64> {
    use crate::source::DiskSource;
    disk.validate().map_err(|e| Error::corrupt("snapshot", e))?;
    let session = crate::lock::start_session(&repo, "restore")?;
    cache.sync(&repo)?;
    counters.add_total(disk.capacity);
    let bs = disk.block_size as u64;
    let allocated = crate::diff::allocated_extents(&repo, &cache, disk)?;
    let exports = crate::serve::RepositoryExports::new(
        repo,
        cache,
        // Enough for the batches the fetching thread runs ahead (as `copy`).
        crate::serve::ServeOptions {
            cache_bytes: 32 << 20,
            session_lost: Some(session.lost_flag()),
            ..Default::default()
        },
    );
    let plan = crate::source::BlockRanges::from_extents(&allocated, bs);
    // Decompressing is the work here: a fetching thread per core, the reader only copies.
    let fetchers = crate::util::cores();
    let mut source =
        crate::source::snapshot::SnapshotSource::new(exports.disk(id, disk, 1)?, Some(allocated), fetchers);
    source.will_read(&plan, bs);
    let mut block = vec![0u8; bs as usize];
    let mut offset = 0;
    while offset < disk.capacity {
        if crate::util::interrupted() {
            return Err(Error::Interrupted);
        }
        let len = bs.min(disk.capacity - offset) as usize;
        source.read_at(offset, &mut block[..len]).map_err(|e| Error::Restore {
            disk: disk.name.clone(),
            cause: format!("block {} (bytes {offset}..{}) cannot be restored: {e}", offset / bs, offset + len as u64),
        })?;
        out.write_all(&block[..len]).map_err(|e| Error::local("standard output", e))?;
        counters.add_done(len as u64);
        offset += len as u64;
    }
    out.flush().map_err(|e| Error::local("standard output", e))?;
    session.ensure_held()?;
    Ok(offset)
}

/// Groups the wanted blobs of each pack into coalesced ranged reads, in disk order of their first block.
pub(crate) fn plan_reads(by_pack: HashMap<ObjectId, HashMap<BlobId, Want>>) -> Vec<ReadJob> {
    let mut jobs = Vec::new();
    for (pack, wants) in by_pack {
        let mut wants: Vec<Want> = wants.into_values().collect();
        wants.sort_by_key(|w| w.entry.offset);
        let mut cur: Option<ReadJob> = None;
        for w in wants {
            let (start, end) = (w.entry.offset as u64, w.entry.end());
            match &mut cur {
                Some(j) if start <= j.offset + j.len + COALESCE_GAP && end - j.offset <= MAX_READ => {
                    j.len = end - j.offset;
                    j.wants.push(w);
                }
                _ => {
                    if let Some(j) = cur.take() {
                        jobs.push(j);
                    }
                    cur = Some(ReadJob { pack, offset: start, len: end - start, wants: vec![w] });
                }
            }
        }
        jobs.extend(cur);
    }
    // Read packs in disk order of their first block: the target is written roughly sequentially.
    jobs.sort_by_key(|j| j.wants.iter().flat_map(|w| w.blocks.first()).min().copied().unwrap_or(0));
    jobs
}

/// Wanted blobs by pack, with the delta blobs taken out: (the others, then batches of (bases to read ahead, the
/// deltas that use them)). A base the index does not list is left to the delta's own read, which reports it.
pub(crate) type WantsByPack = HashMap<ObjectId, HashMap<BlobId, Want>>;

pub(crate) fn split_deltas(
    by_pack: WantsByPack,
    locator: &dyn BlobLocator,
) -> Result<(WantsByPack, Vec<(WantsByPack, WantsByPack)>)> {
    let mut whole: WantsByPack = HashMap::new();
    let mut deltas: Vec<(ObjectId, Want)> = Vec::new();
    for (pack, wants) in by_pack {
        for (id, w) in wants {
            if w.entry.base.is_some() {
                deltas.push((pack, w));
            } else {
                whole.entry(pack).or_default().insert(id, w);
            }
        }
    }
    // Deltas sharing a base end up in one batch.
    deltas.sort_by_key(|(_, w)| (w.entry.base, w.entry.offset));
    let mut batches: Vec<(WantsByPack, WantsByPack)> = Vec::new();
    let mut in_batch = 0;
    let mut last_base = None;
    for (pack, w) in deltas {
        let base = w.entry.base.expect("deltas only");
        if last_base != Some(base) {
            if batches.is_empty() || in_batch == BASES_PER_BATCH {
                batches.push((HashMap::new(), HashMap::new()));
                in_batch = 0;
            }
            in_batch += 1;
            last_base = Some(base);
            if let Some(loc) = locator.locate(&base)? {
                let batch = batches.last_mut().expect("pushed above");
                batch.0.entry(loc.pack).or_default().insert(base, Want { entry: loc.entry, blocks: Vec::new() });
            }
        }
        batches.last_mut().expect("pushed above").1.entry(pack).or_default().insert(w.entry.id, w);
    }
    Ok((whole, batches))
}

/// Reads a batch of bases with coalesced ranged reads in parallel (in the current rayon pool) into `bases`.
/// Failures are left to the deltas' own reads of their bases, which name the damage.
pub(crate) fn preload_bases(repo: &Repository, bases: &Bases, wants: WantsByPack) {
    let jobs = plan_reads(wants);
    jobs.par_iter().for_each(|job| {
        let _ = with_range_buffer(|data| {
            fetch_blobs(repo, bases, job, data, Some(&bases.spare), |w, plain| {
                if let Ok((p, _)) = plain {
                    bases.preloaded.lock().unwrap().insert(w.entry.id, Arc::new(p));
                }
            })
        });
    });
}

/// A queued block that goes back to the fetchers once written, if nothing else shares it.
struct Recycle<'a>(Option<Arc<AlignedBuf>>, &'a BufferPool);

impl std::ops::Deref for Recycle<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().expect("set until dropped")
    }
}

impl Drop for Recycle<'_> {
    fn drop(&mut self) {
        if let Some(block) = self.0.take() {
            self.1.give_shared(block);
        }
    }
}

/// `data[..len]` to write at an offset; the data is shared by every block that holds the same blob.
type WriteOp = (u64, Arc<AlignedBuf>, usize);

/// The one thread that writes the target. Fetchers decrypt in parallel, but concurrent `pwrite`s to one file
/// contend on its inode lock (measured: most of a restore's CPU went to that spinning), so writes are
/// funnelled here. The writer takes whatever is queued, sorts it by offset and writes each run of adjacent
/// blocks with one `pwritev` of up to [`MAX_WRITE`]: the disk of the benchmark's VM took O_DIRECT writes of
/// 1 MiB at 1.6 GB/s and of 2-8 MiB at 2.1-2.7 GB/s. (A restore's wall time measured the same within that
/// disk's noise, with less system CPU; block devices, where zero blocks are written too, get long runs.)
struct Writer {
    tx: Option<crossbeam_channel::Sender<WriteOp>>,
    /// Blocks written and no longer shared come back here for the fetchers to decompress into: a fresh
    /// 1 MiB buffer per blob cost 256 page faults and an munmap each (~5% of a restore's CPU).
    spare: BufferPool,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
    path: PathBuf,
}

/// Queued writes: also the most the writer takes at once. 32 against 16: median cold restore of the benchmark's
/// vm1-day1 1.58 vs 1.71 s (ten shuffled runs each), peak RSS 189 vs 160 MiB.
const WRITE_QUEUE: usize = 32;
/// The longest run of adjacent blocks written with one call.
const MAX_WRITE: usize = 8 << 20;

impl Writer {
    /// Writes go through a second descriptor opened with O_DIRECT where the file system allows it: restored
    /// data skips the page cache (no copy into it, no reclaim, a cheap final sync) and is read back from
    /// the device by `--verify`. Writes that are not page-aligned (a short last block) use the buffered one.
    fn start(t: &Target) -> Result<Writer> {
        let file = t.file.try_clone().map_err(|e| Error::local(&t.path, e))?;
        let direct = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&t.path).ok();
        let path = t.path.clone();
        let (tx, rx) = crossbeam_channel::bounded::<WriteOp>(WRITE_QUEUE);
        let spare = BufferPool::new(64);
        let written = spare.clone();
        let p = path.clone();
        let thread = std::thread::spawn(move || {
            let mut direct = direct;
            let mut batch: Vec<(u64, Recycle, usize)> = Vec::with_capacity(WRITE_QUEUE);
            while let Ok(first) = rx.recv() {
                batch.extend(
                    std::iter::once(first)
                        .chain(rx.try_iter().take(WRITE_QUEUE - 1))
                        .map(|(offset, data, len)| (offset, Recycle(Some(data), &written), len)),
                );
                batch.sort_unstable_by_key(|w| w.0);
                while !batch.is_empty() {
                    let n = adjacent_run(&batch);
                    write_run(&file, &mut direct, &batch[..n]).map_err(|(offset, len, e)| {
                        Error::local(&p, format!("write of {len} bytes at offset {offset}: {e}"))
                    })?;
                    // Written: the blocks go back to the fetchers.
                    batch.drain(..n);
                }
            }
            Ok(())
        });
        Ok(Writer { tx: Some(tx), spare, thread: Some(thread), path })
    }

    /// Queues `data[..len]` for `offset`. Fails only if the writer stopped on an error ([`Writer::finish`] has it).
    fn write(&self, offset: u64, data: Arc<AlignedBuf>, len: usize) -> Result<()> {
        let tx = self.tx.as_ref().expect("writer is open until finish");
        tx.send((offset, data, len)).map_err(|_| Error::local(&self.path, "the writer stopped"))
    }

    /// Waits for every queued write; returns the writer's error, if any.
    fn finish(&mut self) -> Result<()> {
        self.tx.take();
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(Error::local(&self.path, "the writer thread panicked")),
            None => Ok(()),
        }
    }
}

/// How many of `writes` (sorted by offset) form a run of adjacent, page-aligned blocks that one O_DIRECT call
/// can write: at least one.
fn adjacent_run(writes: &[(u64, Recycle, usize)]) -> usize {
    let (mut n, mut end, mut bytes) = (1, writes[0].0 + writes[0].2 as u64, writes[0].2);
    if !page_aligned(writes[0].0, writes[0].2) {
        return 1;
    }
    while let Some(w) = writes.get(n) {
        if w.0 != end || !page_aligned(w.0, w.2) || bytes + w.2 > MAX_WRITE {
            break;
        }
        end += w.2 as u64;
        bytes += w.2;
        n += 1;
    }
    n
}

/// Whether a write of `len` bytes at `offset` from an [`AlignedBuf`] can go through O_DIRECT.
fn page_aligned(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(BUF_ALIGN as u64) && len.is_multiple_of(BUF_ALIGN)
}

/// Writes a run of adjacent blocks (from [`adjacent_run`]): one `pwritev` through the O_DIRECT descriptor while
/// the file system takes it (the blocks are [`AlignedBuf`]s, page-aligned), else block by block through the
/// buffered one. The error names the offset and length of what failed.
fn write_run(
    file: &File,
    direct: &mut Option<File>,
    run: &[(u64, Recycle, usize)],
) -> std::result::Result<(), (u64, usize, std::io::Error)> {
    let offset = run[0].0;
    if let (Some(d), true) = (direct.as_ref(), page_aligned(offset, run[0].2)) {
        let mut slices: Vec<std::io::IoSlice> =
            run.iter().map(|(_, data, len)| std::io::IoSlice::new(&data[..*len])).collect();
        match write_all_vectored_at(d, &mut slices, offset) {
            Ok(()) => return Ok(()),
            // Refused after all (some file systems decide per write): buffered from here on.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => *direct = None,
            Err(e) => return Err((offset, run.iter().map(|w| w.2).sum(), e)),
        }
    }
    for (offset, data, len) in run {
        file.write_all_at(&data[..*len], *offset).map_err(|e| (*offset, *len, e))?;
    }
    Ok(())
}

/// `pwritev` until every byte of `slices` is written at `offset` (the kernel may write less than asked).
fn write_all_vectored_at(file: &File, mut slices: &mut [std::io::IoSlice], mut offset: u64) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    while !slices.is_empty() {
        let count = slices.len().min(1024) as libc::c_int;
        // SAFETY: `IoSlice` is ABI-compatible with `iovec` on Unix, and every slice borrows a live buffer.
        let n = unsafe { libc::pwritev(file.as_raw_fd(), slices.as_ptr().cast(), count, offset as libc::off_t) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        offset += n as u64;
        std::io::IoSlice::advance_slices(&mut slices, n as usize);
    }
    Ok(())
}

/// Called with blocks that cannot be restored, the cause, and the blob copies found damaged (format-spec §8d);
/// decides whether that stops the restore.
type OnDamage<'a> = dyn Fn(Vec<u64>, String, &[(ObjectId, BlobId)]) -> Result<()> + Sync + 'a;

/// Fetches one range, opens each blob in it, writes it everywhere it belongs. Returns (blocks, bytes) written.
/// Unreadable blobs go to `damaged`, which decides whether that stops the restore.
#[allow(clippy::too_many_arguments)]
fn run_read_job(
    repo: &Repository,
    bases: &Bases,
    disk: &DiskManifest,
    writer: &Writer,
    job: &ReadJob,
    counters: &Counters,
    damaged: &OnDamage<'_>,
) -> Result<(u64, u64)> {
    let bs = disk.block_size as u64;
    let (mut blocks, mut bytes) = (0, 0);
    let mut stopped: Result<()> = Ok(());
    let mut write_blob = |w: &Want, plain: std::result::Result<AlignedBuf, BlobFailure>| -> Result<()> {
        let plain = match plain {
            Ok(p) => Arc::new(p),
            // The copies found damaged are recorded; where the storage failed to return a delta's base there are
            // none, and the blocks are unreadable now, as those of a range it failed to return are.
            Err(f) => {
                let cause = format!("{}: {}", names::pack(&job.pack), f.cause);
                return damaged(w.blocks.clone(), cause, &f.damaged);
            }
        };
        for &b in &w.blocks {
            let len = bs.min(disk.capacity - b * bs) as usize;
            if plain.len() != len {
                let cause = format!("blob {} holds {} bytes, the block has {len}", w.entry.id, plain.len());
                damaged(vec![b], cause, &[])?;
                continue;
            }
            writer.write(b * bs, plain.clone(), len)?;
            counters.add_done(len as u64);
            blocks += 1;
            bytes += len as u64;
        }
        Ok(())
    };
    let fetched = with_range_buffer(|data| {
        fetch_blobs(repo, bases, job, data, Some(&writer.spare), |w, plain| {
            if stopped.is_ok() {
                stopped = write_blob(w, plain.map(|(p, _)| p));
            }
        })
    });
    if let Err(e) = fetched {
        let blocks: Vec<u64> = job.wants.iter().flat_map(|w| w.blocks.iter().copied()).collect();
        // A pack gone or damaged as a whole; not a storage that failed to answer.
        let copies: Vec<(ObjectId, BlobId)> = match e {
            Error::Missing { .. } | Error::Corrupt { .. } => job.wants.iter().map(|w| (job.pack, w.entry.id)).collect(),
            _ => Vec::new(),
        };
        damaged(blocks, e.to_string(), &copies)?;
        return Ok((0, 0));
    }
    stopped?;
    Ok((blocks, bytes))
}

/// Reads one coalesced range into `data` and opens every blob in it (authenticated, decompressed, id re-checked),
/// handing each want's result to `each` in order: the plaintext, and the blob's body as stored, decrypted (the
/// zstd frame of a compressed blob). The error is the failed read; a blob's names the blob and the cause.
pub(crate) fn fetch_blobs(
    repo: &Repository,
    bases: &Bases,
    job: &ReadJob,
    data: &mut Vec<u8>,
    spare: Option<&BufferPool>,
    mut each: impl FnMut(&Want, std::result::Result<(AlignedBuf, &[u8]), BlobFailure>),
) -> Result<()> {
    let range = repo.backend().get_range_placed(&names::pack(&job.pack), job.offset, job.len, data)?;
    let data = &mut data[range];
    // One blob opened at a time: a range of well-compressed blobs is many times its size in plain text.
    for w in &job.wants {
        let plain = spare.map_or_else(AlignedBuf::default, BufferPool::take);
        each(w, open_want(repo, bases, job, data, w, plain));
    }
    Ok(())
}

/// Why a wanted blob of a fetched range did not open.
#[derive(Debug)]
pub(crate) struct BlobFailure {
    /// What failed, naming the blob (and its delta base).
    pub cause: String,
    /// The blob copies this shows damaged or lost (format-spec §8d): the blob's own, and its delta base's when
    /// that could not be read (the delta is of no use without it). Empty when the storage failed to answer a read
    /// of the base: nothing is known damaged then.
    pub damaged: Vec<(ObjectId, BlobId)>,
}

impl BlobFailure {
    /// The error for a reader that stops at it, about `object`: damage, or the storage's failure.
    pub fn into_error(self, object: String) -> Error {
        if self.damaged.is_empty() {
            Error::backend("read", object, self.cause)
        } else {
            Error::corrupt(object, self.cause)
        }
    }
}

/// Opens one wanted blob of a fetched range (`data` starts at `job.offset`), decrypting it where it lies.
/// Returns the plaintext and the decrypted body.
fn open_want<'d>(
    repo: &Repository,
    bases: &Bases,
    job: &ReadJob,
    data: &'d mut [u8],
    w: &Want,
    mut plain: AlignedBuf,
) -> std::result::Result<(AlignedBuf, &'d [u8]), BlobFailure> {
    let own = |cause: String| BlobFailure {
        cause: format!("blob {} at offset {}: {cause}", w.entry.id, w.entry.offset),
        damaged: vec![(job.pack, w.entry.id)],
    };
    let rel = (w.entry.offset as u64 - job.offset) as usize;
    let stored =
        data.get_mut(rel..rel + w.entry.stored_len as usize).ok_or_else(|| own("the pack ends early".into()))?;
    let opened = bases
        .with_base(repo, &w.entry, |base| pack::open_blob_in_place(repo.keys(), &w.entry, stored, &mut plain, base))
        .map_err(|e| {
            let mut failure = own(format!("its delta base: {e}"));
            match e {
                // The base lost or damaged: its copy too, when the index has it as a base.
                Error::Missing { .. } | Error::Corrupt { .. } => failure.damaged.extend(
                    w.entry
                        .base
                        .and_then(|b| bases.locator.locate(&b).ok().flatten())
                        .and_then(|loc| loc.entry.can_be_base().then_some((loc.pack, loc.entry.id))),
                ),
                _ => failure.damaged.clear(),
            }
            failure
        })?;
    let body = opened.map_err(own)?;
    Ok((plain, &stored[body]))
}

/// Re-reads the target and compares each block with the manifest. Returns the number of blocks checked.
/// Blocks in `skip` (known damaged, left as zeros) are not compared.
fn verify_target(
    repo: &Repository,
    cache: &IndexCache,
    disk: &DiskManifest,
    t: &Target,
    skip: &[DamagedRange],
) -> Result<u64> {
    let bs = disk.block_size as u64;
    let mut checked = 0u64;
    // Blocks wholly in holes of a file read as zeros without being read: a sparse restore of a thin disk is mostly
    // holes (a 12 GiB disk holding 7 MiB took 21 s to verify, reading every hole).
    let with_data = match t.file.metadata() {
        Ok(m) if m.is_file() => crate::source::file::data_extents(&t.file, disk.capacity)
            .map(|extents| crate::source::BlockRanges::from_extents(&extents, bs)),
        _ => None,
    };
    for (k, seg) in disk.segments.iter().enumerate() {
        let first = k as u64 * SEGMENT_BLOCKS as u64;
        if skip.iter().any(|r| r.start <= first * bs && r.end >= ((first + seg.blocks as u64) * bs).min(disk.capacity))
        {
            continue;
        }
        let ids = load_segment(repo, cache, seg)?;
        let bad: Vec<u64> = ids
            .par_iter()
            .enumerate()
            .map_init(
                || vec![0u8; bs as usize],
                |buf, (j, id)| {
                    let block = first + j as u64;
                    if skip.iter().any(|r| r.start <= block * bs && block * bs < r.end) {
                        return None;
                    }
                    if with_data.as_ref().is_some_and(|d| !d.contains(block)) {
                        return (!id.is_zero_block()).then_some(block);
                    }
                    let len = bs.min(disk.capacity - block * bs) as usize;
                    let ok = t.file.read_exact_at(&mut buf[..len], block * bs).is_ok()
                        && if id.is_zero_block() {
                            is_zero(&buf[..len])
                        } else {
                            repo.keys().blob_id(&buf[..len]) == *id
                        };
                    (!ok).then_some(block)
                },
            )
            .flatten()
            .collect();
        if let Some(&b) = bad.first() {
            return Err(Error::Restore {
                disk: disk.name.clone(),
                cause: format!(
                    "verification failed: {} blocks of {} differ from the snapshot, first block {b} (bytes {}..)",
                    bad.len(),
                    t.path.display(),
                    b * bs
                ),
            });
        }
        checked += ids.len() as u64;
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_are_adjacent_page_aligned_blocks_up_to_the_limit() {
        let spare = BufferPool::new(64);
        const MIB: u64 = 1 << 20;
        let w = |offset: u64, len: usize| (offset, Recycle(Some(Arc::new(AlignedBuf::zeroed(len))), &spare), len);
        // Blocks 0-2 adjacent, a gap, block 5, then a short (unaligned) last block right after it.
        let writes = [w(0, MIB as usize), w(MIB, MIB as usize), w(2 * MIB, MIB as usize), w(5 * MIB, MIB as usize)];
        assert_eq!(adjacent_run(&writes), 3);
        assert_eq!(adjacent_run(&writes[3..]), 1);
        let tail = [w(5 * MIB, MIB as usize), w(6 * MIB, 1000)];
        assert_eq!(adjacent_run(&tail), 1, "an unaligned block is written on its own");
        assert_eq!(adjacent_run(&tail[1..]), 1);
        let long: Vec<_> = (0..20).map(|i| w(i * MIB, MIB as usize)).collect();
        assert_eq!(adjacent_run(&long), MAX_WRITE / MIB as usize);
    }

    /// Zero ranges of a target that takes no zeroing request are written with zero blocks. (The refusal here:
    /// `fallocate` on a read-only descriptor; the writer has its own.)
    #[test]
    fn zero_ranges_are_written_where_the_device_refuses_to_zero_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("device");
        std::fs::write(&path, vec![0xAAu8; 5 << 20]).unwrap();
        let target = |file: File| Target {
            file,
            path: path.clone(),
            holes_are_zero: false,
            zeroes_offloaded: AtomicBool::new(true),
        };
        let mut writer = Writer::start(&target(OpenOptions::new().write(true).open(&path).unwrap())).unwrap();
        let refusing = target(File::open(&path).unwrap());
        let zero = Arc::new(AlignedBuf::zeroed(1 << 20));
        // Two whole blocks and a short one.
        refusing.zero((1 << 20)..(3 << 20) + 4096, &writer, &zero).unwrap();
        writer.finish().unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data[..1 << 20].iter().all(|&b| b == 0xAA), "before the range");
        assert!(data[1 << 20..(3 << 20) + 4096].iter().all(|&b| b == 0), "the range is not zeros");
        assert!(data[(3 << 20) + 4096..].iter().all(|&b| b == 0xAA), "after the range");
    }

    #[test]
    fn a_run_is_written_where_it_belongs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("target.raw");
        let file = OpenOptions::new().create(true).truncate(true).read(true).write(true).open(&path).unwrap();
        file.set_len(16 << 20).unwrap();
        let spare = BufferPool::new(64);
        let block = |fill: u8, len: usize| {
            let mut b = AlignedBuf::zeroed(len);
            b.fill(fill);
            Arc::new(b)
        };
        let mut writes: Vec<(u64, Recycle, usize)> =
            (0..3u8).map(|i| ((i as u64 + 1) << 20, Recycle(Some(block(i + 1, 1 << 20)), &spare), 1 << 20)).collect();
        // A shared block written shorter than its buffer, as the disk's last block is.
        writes.push((4 << 20, Recycle(Some(block(9, 1 << 20)), &spare), 4096));
        let mut direct = OpenOptions::new().write(true).custom_flags(libc::O_DIRECT).open(&path).ok();
        assert_eq!(adjacent_run(&writes), 4);
        write_run(&file, &mut direct, &writes).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data[..1 << 20].iter().all(|&b| b == 0));
        for i in 0..3usize {
            assert!(data[(i + 1) << 20..(i + 2) << 20].iter().all(|&b| b == i as u8 + 1), "block {}", i + 1);
        }
        assert!(data[4 << 20..(4 << 20) + 4096].iter().all(|&b| b == 9));
        assert!(data[(4 << 20) + 4096..].iter().all(|&b| b == 0));
    }
}
