//! Snapshot disks as NBD exports (instant access): [`RepositoryExports`] implements the NBD server's
//! [`Exports`] for a repository, and [`SnapshotDisk`] its [`Device`] for one disk of one snapshot.
//!
//! A read maps bytes to 1 MiB blocks, blocks to ids (manifest segments, a few kept in memory), ids to pack
//! locations (the index cache), and fetches a missing blob with a ranged read of its own. A sequential reader
//! gets read-ahead: the next blocks of the disk that are not cached are fetched in the background, in the same
//! coalesced ranged reads as restore uses (one storage request per few MiB), a window ahead of it. Plaintext
//! blobs live in a byte-bounded LRU shared by all exports; blobs being fetched are marked in flight, so
//! concurrent readers wait for them instead of fetching twice.
//!
//! With `writable`, each export gets a copy-on-write overlay: a sparse local file holding every 1 MiB block
//! written so far, copied up from the snapshot on first write. The repository is never written. By default
//! the file is unlinked at creation, so it disappears with the process. With `keep_overlays` it is kept as
//! `diskvault-overlay-<snapshot id>-<hex of the disk name>` in the overlay directory, with a map of the blocks
//! it holds next to it (`….map`), and the next serve of the same disk continues it: a VM booted from a backup
//! keeps what it wrote across a restart of serve. The map is saved when a client flushes (after the data is
//! synced) and when serve stops, so whatever a flush acknowledged survives even a killed server, as a disk
//! promises. Map file (local, not a repository object): `b"DVOVMAP1"`, capacity u64 LE, block size u64 LE,
//! one bit per block in u64 LE words (block k is bit k%64 of word k/64), then the BLAKE3 hash of all that.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use crate::cache::IndexCache;
use crate::error::{Error, Result};
use crate::format::pack::StoredForm;
use crate::format::snapshot::DiskManifest;
use crate::format::{BlobId, ObjectId, SEGMENT_BLOCKS};
use crate::nbd::server::{Device, Exports};
use crate::repository::Repository;
use crate::restore::{fetch_blobs, plan_reads, Bases, ReadJob, Want};
use crate::util::{AlignedBuf, BufferPool};

pub struct ServeOptions {
    /// Accept writes into a local overlay.
    pub writable: bool,
    /// Where overlay files are created.
    pub overlay_dir: PathBuf,
    /// Keep overlays in `overlay_dir` and continue them when the same disk is served again.
    pub keep_overlays: bool,
    /// Bytes of decrypted blobs kept in memory, shared by all exports.
    pub cache_bytes: u64,
    /// Blocks fetched ahead of a sequential reader, in the background (see [`SnapshotDisk`]).
    pub readahead_blocks: u64,
    /// Only these snapshots (full ids); empty: all.
    pub snapshots: Vec<ObjectId>,
    /// Only snapshots of this source.
    pub source: Option<String>,
    /// Set when the caller's session marker was lost: blobs are then no longer fetched (a prune may have
    /// moved or deleted them), only served from memory or the overlay.
    pub session_lost: Option<Arc<std::sync::atomic::AtomicBool>>,
    /// Keep each cached data blob's stored form ([`SnapshotDisk::stored_form`]) next to its plaintext: `copy`
    /// seals it again instead of compressing the block again.
    pub keep_stored_forms: bool,
}

/// Read-ahead of a sequential reader, in blocks: against S3 with 10 ms of latency a sequential read of the
/// benchmark's 4 GiB export took 3.9 s with 16, 3.2 s with 32, 2.9 s with 64; from a local repository the
/// same 1.8 s with 16 or 32 (`benches/results/2026-12-04-serve-session17.md`).
pub const DEFAULT_READAHEAD_BLOCKS: u64 = 32;

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            writable: false,
            overlay_dir: std::env::temp_dir(),
            keep_overlays: false,
            cache_bytes: 256 << 20,
            readahead_blocks: DEFAULT_READAHEAD_BLOCKS,
            snapshots: Vec::new(),
            source: None,
            session_lost: None,
            keep_stored_forms: false,
        }
    }
}

/// What every export shares: the repository, its index, the blob cache.
struct Shared {
    session_lost: Option<Arc<std::sync::atomic::AtomicBool>>,
    repo: Repository,
    cache: Arc<IndexCache>,
    blobs: BlobCache,
    /// Index syncs serialized: a lookup miss may mean a snapshot newer than the last sync.
    sync_lock: Mutex<()>,
    /// Ranged reads of packs made so far (delta bases not counted).
    pack_reads: std::sync::atomic::AtomicU64,
    /// Blob copies found damaged and recorded (format-spec §8d), so that each is recorded once.
    damage_found: Mutex<std::collections::HashSet<(crate::format::ObjectId, BlobId)>>,
    /// Read-ahead threads not yet joined ([`Shared::fetch_in_background`], [`Shared::wait_for_background`]).
    background: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl Shared {
    /// Makes one planned ranged read of a pack, caches the blobs it holds and releases their claims (however
    /// it ends: were it to panic, readers waiting for its blobs would wait forever). Only a failure concerning
    /// `primary` is returned (the others are left to the reads of their blocks).
    fn fetch_job(&self, job: &ReadJob, primary: Option<BlobId>) -> Result<()> {
        let _release = ReleaseClaims { blobs: &self.blobs, ids: job.wants.iter().map(|w| w.entry.id).collect() };
        let holds_primary = primary.is_none_or(|p| job.wants.iter().any(|w| w.entry.id == p));
        self.pack_reads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let bases = Bases::new(&*self.cache);
        let mut failed = None;
        let fetched =
            fetch_blobs(
                &self.repo,
                &bases,
                job,
                &mut Vec::new(),
                Some(&self.blobs.spare),
                |want, result| match result {
                    Ok((plain, body)) => {
                        let form = self.blobs.keep_forms.then(|| StoredForm::of(&want.entry, body)).flatten();
                        self.blobs.insert(want.entry.id, Arc::new(plain), form)
                    }
                    Err(failure) => {
                        for (pack, blob) in &failure.damaged {
                            self.record_damage(*pack, *blob);
                        }
                        if primary.is_none_or(|p| p == want.entry.id) && failed.is_none() {
                            failed = Some(failure.into_error(crate::format::names::pack(&job.pack)))
                        }
                    }
                },
            );
        match (fetched, failed) {
            (Err(e), _) if holds_primary => Err(e),
            (_, Some(e)) => Err(e),
            _ => Ok(()),
        }
    }

    /// Records a blob copy found damaged, once per process, so that the next backups store the block again.
    fn record_damage(&self, pack: crate::format::ObjectId, blob: BlobId) {
        if self.damage_found.lock().unwrap_or_else(|p| p.into_inner()).insert((pack, blob)) {
            crate::damage::record_found(&self.repo, &self.cache.damage(), vec![(pack, blob)]);
        }
    }

    /// [`Shared::fetch_job`] on a thread of its own; if none can be started, the claims are released at once
    /// (the readers of those blocks then fetch them).
    fn fetch_in_background(self: &Arc<Self>, job: ReadJob) {
        let ids: Vec<BlobId> = job.wants.iter().map(|w| w.entry.id).collect();
        let shared = self.clone();
        let started = std::thread::Builder::new().name("serve-readahead".into()).spawn(move || {
            if let Err(e) = shared.fetch_job(&job, None) {
                tracing::debug!("read-ahead of pack {}: {e}", job.pack.short());
            }
        });
        match started {
            Ok(thread) => {
                let mut threads = self.background.lock().unwrap_or_else(|p| p.into_inner());
                // Those done are joined now (at once), so that a long serve does not collect handles.
                for done in threads.extract_if(.., |t| t.is_finished()) {
                    let _ = done.join();
                }
                threads.push(thread);
            }
            Err(_) => drop(ReleaseClaims { blobs: &self.blobs, ids }),
        }
    }

    /// Joins every read-ahead thread. A process must not exit before its threads have: a thread that looked
    /// up the RocksDB index cache runs RocksDB's thread-local destructors as it ends, which lock mutexes that
    /// exit destroys (the process then aborted with "pthread lock: Invalid argument", or crashed).
    fn wait_for_background(&self) {
        let threads = std::mem::take(&mut *self.background.lock().unwrap_or_else(|p| p.into_inner()));
        for t in threads {
            let _ = t.join();
        }
    }
}

/// Releases claims on blobs when dropped (whatever has not been fetched, readers then fetch themselves).
struct ReleaseClaims<'a> {
    blobs: &'a BlobCache,
    ids: Vec<BlobId>,
}

impl Drop for ReleaseClaims<'_> {
    fn drop(&mut self) {
        self.ids.iter().for_each(|id| self.blobs.abandon(id));
    }
}

pub struct RepositoryExports {
    shared: Arc<Shared>,
    opts: ServeOptions,
    /// Open devices by `<full snapshot id>/<disk>`: every connection to an export sees the same overlay.
    open: Mutex<HashMap<String, Arc<SnapshotDisk>>>,
}

impl RepositoryExports {
    /// `cache` must be synced with the repository (after the caller's session marker exists).
    pub fn new(repo: Repository, cache: Arc<IndexCache>, opts: ServeOptions) -> RepositoryExports {
        let blobs = BlobCache::new(opts.cache_bytes, opts.keep_stored_forms);
        RepositoryExports {
            shared: Arc::new(Shared {
                session_lost: opts.session_lost.clone(),
                repo,
                cache,
                blobs,
                sync_lock: Mutex::new(()),
                pack_reads: Default::default(),
                damage_found: Default::default(),
                background: Default::default(),
            }),
            opts,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn admitted(&self, id: &ObjectId, source: &str) -> bool {
        (self.opts.snapshots.is_empty() || self.opts.snapshots.contains(id))
            && self.opts.source.as_deref().is_none_or(|s| s == source)
    }

    /// The export names: `<short snapshot id>/<disk>`, oldest snapshot first.
    pub fn names(&self) -> Result<Vec<(String, String)>> {
        let mut out = Vec::new();
        for (id, snap) in self.shared.repo.list_snapshots()? {
            if !self.admitted(&id, &snap.source) {
                continue;
            }
            for d in &snap.disks {
                let desc = format!(
                    "{} disk {} of {} at {} ({} bytes)",
                    snap.source,
                    d.name,
                    id.short(),
                    crate::util::format_utc(snap.time_secs),
                    d.capacity
                );
                out.push((format!("{}/{}", id.short(), d.name), desc));
            }
        }
        Ok(out)
    }
}

impl Exports for RepositoryExports {
    fn list(&self) -> Result<Vec<(String, String)>> {
        self.names()
    }

    fn open(&self, name: &str) -> Result<Option<Arc<dyn Device>>> {
        let Some((snap_ref, disk_name)) = name.split_once('/') else { return Ok(None) };
        let (id, snap) = match self.shared.repo.find_snapshot(snap_ref, self.opts.source.as_deref()) {
            Ok(v) => v,
            Err(Error::Invalid(_)) => return Ok(None),
            Err(e) => return Err(e),
        };
        if !self.admitted(&id, &snap.source) {
            return Ok(None);
        }
        let Some(disk) = snap.disk(disk_name) else { return Ok(None) };
        let key = format!("{}/{}", id.hex(), disk.name);
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(d) = open.get(&key) {
            return Ok(Some(d.clone()));
        }
        let device = Arc::new(self.disk(&id, disk, self.opts.readahead_blocks)?);
        open.insert(key, device.clone());
        Ok(Some(device))
    }
}

impl RepositoryExports {
    /// Kept overlays in the overlay directory whose snapshot is no longer in the repository (forgotten, then
    /// pruned or not): no export serves their writes any more. Listed for the operator, never deleted here:
    /// they may hold the only copy of what a VM wrote.
    pub fn orphaned_overlays(&self) -> Result<Vec<(PathBuf, ObjectId)>> {
        if !self.opts.keep_overlays {
            return Ok(Vec::new());
        }
        let snapshots: HashSet<ObjectId> =
            crate::repository::list_ids(&**self.shared.repo.backend(), crate::format::names::SNAPSHOTS)?
                .into_iter()
                .collect();
        let dir = &self.opts.overlay_dir;
        let entries = std::fs::read_dir(dir).map_err(|e| Error::local(dir, e))?;
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            // `diskvault-overlay-<snapshot hex>-<disk hex>`; maps and temporaries have an extension.
            let Some((snapshot, _disk)) = name.strip_prefix(OVERLAY_PREFIX).and_then(|r| r.split_once('-')) else {
                continue;
            };
            if name.contains('.') {
                continue;
            }
            if let Some(id) = ObjectId::from_hex(snapshot).filter(|id| !snapshots.contains(id)) {
                out.push((entry.path(), id));
            }
        }
        out.sort();
        Ok(out)
    }

    /// The repository the exports read.
    pub fn repository(&self) -> &Repository {
        &self.shared.repo
    }

    /// The local index the exports find blobs in.
    pub fn index_cache(&self) -> &IndexCache {
        &self.shared.cache
    }

    /// Makes every open export's overlay durable (see [`Device::flush`]): serve calls it when it stops.
    pub fn flush_all(&self) -> Result<()> {
        let open: Vec<Arc<SnapshotDisk>> =
            self.open.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        open.iter().try_for_each(|d| d.flush())
    }

    /// Ranged reads of packs made so far by all exports (each one request to the storage; reads of delta
    /// bases are not counted).
    pub fn pack_reads(&self) -> u64 {
        self.shared.pack_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// A reader of `disk` of snapshot `id` with `readahead` blocks of read-ahead for sequential reads, sharing
    /// the blob cache (not listed among the exports; `copy` reads disks this way).
    pub fn disk(&self, id: &ObjectId, disk: &DiskManifest, readahead: u64) -> Result<SnapshotDisk> {
        disk.validate().map_err(|e| Error::corrupt(format!("snapshot {}", id.short()), e))?;
        let (dir, bs) = (&self.opts.overlay_dir, disk.block_size as u64);
        let overlay = match (self.opts.writable, self.opts.keep_overlays) {
            (false, _) => None,
            (true, false) => Some(Overlay::create(dir, disk.capacity, bs)?),
            (true, true) => Some(Overlay::open_kept(dir, id, &disk.name, disk.capacity, bs)?),
        };
        Ok(SnapshotDisk {
            shared: self.shared.clone(),
            manifest: disk.clone(),
            segments: Mutex::new(lru::LruCache::new(std::num::NonZeroUsize::new(64).expect("non-zero"))),
            // At most a quarter of the blob cache, or windows would push out what the reader has yet to read.
            readahead: readahead.min(self.opts.cache_bytes / bs / 4).max(1),
            read_ahead: Mutex::new(Default::default()),
            zero_block: Arc::new(AlignedBuf::zeroed(bs as usize)),
            overlay,
        })
    }
}

/// One disk of one snapshot, readable at any offset.
pub struct SnapshotDisk {
    shared: Arc<Shared>,
    manifest: DiskManifest,
    /// Loaded manifest segments by index.
    segments: Mutex<lru::LruCache<usize, Arc<Vec<BlobId>>>>,
    readahead: u64,
    read_ahead: Mutex<ReadAhead>,
    /// What an all-zero block reads as (one buffer, not one per read).
    zero_block: Arc<AlignedBuf>,
    overlay: Option<Overlay>,
}

/// What a disk's readers did lately, for read-ahead. A miss of the block after one just read is a sequential
/// reader's: the next [`FIRST_WINDOW`] blocks are then fetched in the background while it waits for its own,
/// and a read in the second half of such a window starts the next one, twice as long, up to `readahead`
/// blocks, so the reader finds its blocks decoded instead of waiting at each window's boundary. Other misses
/// fetch their own block only: a random reader (a booting VM) waited 3.5 times longer per 64 KiB read when
/// every miss fetched 16 MiB around it. Windows grow rather than start whole because a reader of a file a few
/// blocks long is sequential too: file-level restore from XFS, whose files are scattered over its allocation
/// groups, took 4.2-7 s for /usr with whole 32-block windows (each file's window decoded and then pushed out of
/// the cache unused), 2.8 s without read-ahead and 3.0-3.5 s with windows growing from 8 blocks; the same /usr
/// from ext4 took 3.2-3.4 s with whole windows and 2.8 s with growing ones.
#[derive(Default)]
struct ReadAhead {
    /// The blocks read last, newest at the back.
    recent: std::collections::VecDeque<u64>,
    /// Windows being fetched ahead: `(trigger, end, length)`; `trigger..end` is the window's second half.
    windows: std::collections::VecDeque<(u64, u64, u64)>,
}

/// Blocks of the first read-ahead window of a sequential reader.
const FIRST_WINDOW: u64 = 8;

/// Blocks [`ReadAhead`] remembers as read (several readers of one disk each leave theirs).
const KEPT_RECENT: usize = 16;
/// Read-ahead windows remembered per disk (readers of other places of the disk forget the oldest).
const KEPT_WINDOWS: usize = 8;

impl ReadAhead {
    /// Notes a read of `block`. Returns where the next window starts, and the length of the window before it,
    /// if `block` is in the second half of one.
    fn read(&mut self, block: u64) -> Option<(u64, u64)> {
        if self.recent.back() != Some(&block) {
            if self.recent.len() == KEPT_RECENT {
                self.recent.pop_front();
            }
            self.recent.push_back(block);
        }
        let i = self.windows.iter().position(|&(trigger, end, _)| (trigger..end).contains(&block))?;
        self.windows.remove(i).map(|(_, end, len)| (end, len))
    }

    fn follows_a_read(&self, block: u64) -> bool {
        block > 0 && self.recent.contains(&(block - 1))
    }

    fn add_window(&mut self, start: u64, end: u64) {
        if self.windows.len() == KEPT_WINDOWS {
            self.windows.pop_front();
        }
        self.windows.push_back((start + (end - start) / 2, end, end - start));
    }
}

/// The id of `block` in the loaded segment `ids` that holds it.
fn id_in_segment(ids: &[BlobId], block: u64) -> Result<BlobId> {
    ids.get((block % SEGMENT_BLOCKS as u64) as usize).copied().ok_or_else(|| {
        let k = block / SEGMENT_BLOCKS as u64;
        Error::corrupt("snapshot", format!("segment {k} has no entry for block {block}"))
    })
}

impl SnapshotDisk {
    /// The disk as the snapshot describes it.
    pub fn manifest(&self) -> &DiskManifest {
        &self.manifest
    }

    fn block_size(&self) -> u64 {
        self.manifest.block_size as u64
    }

    fn block_len(&self, block: u64) -> usize {
        self.block_size().min(self.manifest.capacity - block * self.block_size()) as usize
    }

    fn segment(&self, k: usize) -> Result<Arc<Vec<BlobId>>> {
        if let Some(s) = self.segments.lock().unwrap_or_else(|p| p.into_inner()).get(&k) {
            return Ok(s.clone());
        }
        let seg = &self.manifest.segments[k];
        // Located as blobs are: a snapshot backed up while serve runs is newer than its index cache.
        let ids = Arc::new(crate::backup::read_segment(&self.shared.repo, self.locate(&seg.id)?, seg)?);
        self.segments.lock().unwrap_or_else(|p| p.into_inner()).put(k, ids.clone());
        Ok(ids)
    }

    fn block_id(&self, block: u64) -> Result<BlobId> {
        let ids = self.segment((block / SEGMENT_BLOCKS as u64) as usize)?;
        id_in_segment(&ids, block)
    }

    /// The snapshot's content of `block` (not the overlay's).
    fn base_block(&self, block: u64) -> Result<Arc<AlignedBuf>> {
        let id = self.block_id(block)?;
        let next_window = self.read_ahead().read(block);
        if let Some((start, len)) = next_window {
            self.fetch_window(start, len * 2);
        }
        if id.is_zero_block() {
            return Ok(self.zero_block.clone());
        }
        let data = loop {
            match self.shared.blobs.get_or_claim(&id) {
                Claim::Ready(data) => break data,
                Claim::Fetch => self.fetch_from(block, id)?,
            }
        };
        // A blob is checked against its id, not against where a manifest puts it: one of another length is
        // damage (restore says the same), not a block to cut or pad.
        let len = self.block_len(block);
        if data.len() != len {
            return Err(Error::corrupt(
                format!("blob {id}"),
                format!("holds {} bytes, block {block} of disk {} has {len}", data.len(), self.manifest.name),
            ));
        }
        Ok(data)
    }

    /// How the source repository stored `block`, while its blob is cached and stored forms are kept
    /// ([`ServeOptions::keep_stored_forms`]). `None` for a zero block, a delta blob, a blob no longer cached, and
    /// on a writable export (the overlay may hold other bytes).
    pub fn stored_form(&self, block: u64) -> Option<StoredForm> {
        if self.overlay.is_some() {
            return None;
        }
        let id = self.block_id(block).ok().filter(|id| !id.is_zero_block())?;
        self.shared.blobs.form(&id)
    }

    fn read_ahead(&self) -> std::sync::MutexGuard<'_, ReadAhead> {
        self.read_ahead.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Fetches blob `id` (of `block`), claimed by the caller, with a ranged read of its own; for a sequential
    /// reader, the window after it in the background (see [`ReadAhead`]).
    fn fetch_from(&self, block: u64, id: BlobId) -> Result<()> {
        if self.session_lost() {
            self.shared.blobs.abandon(&id);
            return Err(Error::Locked(
                "serve's session marker expired (not refreshed in time), so a prune may have moved data: \
                 restart serve"
                    .into(),
            ));
        }
        let sequential = self.read_ahead().follows_a_read(block);
        if sequential {
            self.fetch_window(block + 1, FIRST_WINDOW);
        }
        let (mine, unlocated) = self.plan_claimed(&[(block, id)])?;
        if !unlocated.is_empty() {
            return Err(Error::corrupt(
                format!("blob {id}"),
                format!(
                    "block {block} of disk {} is not in any index file ({})",
                    self.manifest.name,
                    self.shared.cache.why_not_indexed()
                ),
            ));
        }
        mine.iter().try_for_each(|job| self.shared.fetch_job(job, Some(id)))
    }

    /// Claims the blocks of the read-ahead window of `len` blocks (at most `readahead`) from `start` that are
    /// neither cached nor being fetched and fetches them in the background, a thread per ranged read.
    fn fetch_window(&self, start: u64, len: u64) {
        let blocks = self.manifest.capacity.div_ceil(self.block_size());
        let end = (start + len.min(self.readahead)).min(blocks);
        if self.readahead < 2 || start >= end || self.session_lost() {
            return;
        }
        let mut wanted = Vec::new();
        self.claim(start..end, &mut wanted);
        self.read_ahead().add_window(start, end);
        if let Ok((jobs, _)) = self.plan_claimed(&wanted) {
            jobs.into_iter().for_each(|job| self.shared.fetch_in_background(job));
        }
    }

    /// Fetches the blobs of `blocks` that are neither cached nor being fetched, in as few ranged reads as their
    /// places in the packs allow (blocks far apart on the disk are often neighbours in a pack: an incremental
    /// backup stores its changed blocks together). Errors are left to the reads of the blocks themselves.
    pub fn prefetch_blocks(&self, blocks: impl IntoIterator<Item = u64>) {
        if self.session_lost() {
            return;
        }
        let mut wanted = Vec::new();
        self.claim(blocks, &mut wanted);
        let jobs = match self.plan_claimed(&wanted) {
            Ok((jobs, _)) => jobs,
            Err(e) => return tracing::debug!("prefetch of {} blocks: {e}", wanted.len()),
        };
        // Every read is made (and releases its claims), also after a failure.
        for job in &jobs {
            if let Err(e) = self.shared.fetch_job(job, None) {
                tracing::debug!("prefetch of {} blobs of pack {}: {e}", job.wants.len(), job.pack.short());
            }
        }
    }

    /// Whether the caller's session marker was lost (blobs may then have been moved by a prune).
    fn session_lost(&self) -> bool {
        self.shared.session_lost.as_ref().is_some_and(|l| l.load(std::sync::atomic::Ordering::SeqCst))
    }

    /// Claims, into `wanted`, the blobs of `blocks` that are not all-zero, not in `wanted` already, and neither
    /// cached nor being fetched by another reader.
    fn claim(&self, blocks: impl IntoIterator<Item = u64>, wanted: &mut Vec<(u64, BlobId)>) {
        let mut seen: HashSet<BlobId> = wanted.iter().map(|(_, id)| *id).collect();
        for b in blocks {
            let Ok(next) = self.block_id(b) else { break };
            if next.is_zero_block() || !seen.insert(next) || !self.shared.blobs.try_claim(&next) {
                continue;
            }
            wanted.push((b, next));
        }
    }

    /// The ranged reads that fetch the claimed `wanted` blobs, and those of them no index lists. The claims
    /// of the latter (and of all, on an error) are released; the reads release theirs.
    fn plan_claimed(&self, wanted: &[(u64, BlobId)]) -> Result<(Vec<ReadJob>, Vec<BlobId>)> {
        let mut by_pack: HashMap<ObjectId, HashMap<BlobId, Want>> = HashMap::new();
        let mut unlocated = Vec::new();
        for (b, bid) in wanted {
            match self.locate(bid) {
                Ok(Some(loc)) => {
                    by_pack.entry(loc.pack).or_default().insert(*bid, Want { entry: loc.entry, blocks: vec![*b] });
                }
                Ok(None) => unlocated.push(*bid),
                Err(e) => {
                    wanted.iter().for_each(|(_, id)| self.shared.blobs.abandon(id));
                    return Err(e);
                }
            }
        }
        unlocated.iter().for_each(|id| self.shared.blobs.abandon(id));
        Ok((plan_reads(by_pack), unlocated))
    }

    /// The blob's location; on a miss the index cache is synced once (the snapshot may be newer than it).
    fn locate(&self, id: &BlobId) -> Result<Option<crate::format::index::BlobLocation>> {
        if let Some(loc) = self.shared.cache.lookup(id)? {
            return Ok(Some(loc));
        }
        let _guard = self.shared.sync_lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(loc) = self.shared.cache.lookup(id)? {
            return Ok(Some(loc));
        }
        self.shared.cache.sync(&self.shared.repo)?;
        self.shared.cache.lookup(id)
    }

    /// Calls `f(block, start within block, range of buf)` for each block `offset..offset+len` touches.
    fn for_blocks(
        &self,
        offset: u64,
        len: usize,
        mut f: impl FnMut(u64, usize, std::ops::Range<usize>) -> Result<()>,
    ) -> Result<()> {
        let bs = self.block_size();
        let mut done = 0usize;
        while done < len {
            let pos = offset + done as u64;
            let block = pos / bs;
            let within = (pos % bs) as usize;
            let n = (self.block_len(block) - within).min(len - done);
            f(block, within, done..done + n)?;
            done += n;
        }
        Ok(())
    }
}

/// A disk's reader ends with its read-ahead (see `Shared::wait_for_background`).
impl Drop for SnapshotDisk {
    fn drop(&mut self) {
        self.shared.wait_for_background();
    }
}

impl Device for SnapshotDisk {
    fn size(&self) -> u64 {
        self.manifest.capacity
    }

    fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.for_blocks(offset, buf.len(), |block, within, range| {
            if let Some(o) = &self.overlay {
                if o.has(block) {
                    return o.read(block * self.block_size() + within as u64, &mut buf[range]);
                }
            }
            let data = self.base_block(block)?;
            buf[range.clone()].copy_from_slice(&data[within..within + range.len()]);
            Ok(())
        })
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        let Some(o) = &self.overlay else {
            return Err(Error::invalid("the export is read-only"));
        };
        let _serial = o.write_lock.lock().unwrap_or_else(|p| p.into_inner());
        self.for_blocks(offset, data.len(), |block, within, range| {
            if !o.has(block) {
                let base = self.base_block(block)?;
                o.write(block * self.block_size(), &base[..self.block_len(block)])?;
                o.mark(block);
            }
            o.write(block * self.block_size() + within as u64, &data[range])
        })
    }

    fn flush(&self) -> Result<()> {
        match &self.overlay {
            Some(o) => o.flush(),
            None => Ok(()),
        }
    }

    fn zero_extents(&self, offset: u64, len: u64) -> Result<Vec<(u64, bool)>> {
        let bs = self.block_size();
        let end = offset + len;
        let mut out = Vec::new();
        let mut pos = offset;
        // At most the rest of one segment per answer: clients ask again for the rest.
        let k = (pos / bs / SEGMENT_BLOCKS as u64) as usize;
        let ids = self.segment(k)?;
        let limit = (k as u64 + 1) * SEGMENT_BLOCKS as u64;
        while pos < end && pos / bs < limit {
            let block = pos / bs;
            let block_end = ((block + 1) * bs).min(end);
            let overlaid = self.overlay.as_ref().is_some_and(|o| o.has(block));
            let zero = !overlaid && id_in_segment(&ids, block)?.is_zero_block();
            out.push((block_end - pos, zero));
            pos = block_end;
        }
        Ok(out)
    }

    /// `NBD_CMD_CACHE`: the range's blocks fetched in coalesced reads, `PREFETCH_BATCH` blocks at a time, up
    /// to half the blob cache (more would evict what this hint just fetched before the client reads it).
    fn prefetch(&self, offset: u64, len: u64) {
        let bs = self.block_size();
        let first = offset / bs;
        let end = (offset + len).div_ceil(bs).min(self.manifest.capacity.div_ceil(bs));
        let end = end.min(first + (self.shared.blobs.limit() / 2 / bs).max(1));
        let mut batch = first;
        while batch < end {
            let next = (batch + PREFETCH_BATCH).min(end);
            // Overlaid blocks read from the overlay: their snapshot content is not needed.
            let wanted = (batch..next).filter(|b| !self.overlay.as_ref().is_some_and(|o| o.has(*b)));
            self.prefetch_blocks(wanted);
            batch = next;
        }
    }
}

/// Copy-on-write blocks of a writable export.
struct Overlay {
    file: File,
    path: PathBuf,
    present: Mutex<Vec<u64>>,
    /// Writes (with their copy-ups) one at a time: a copy-up must not overwrite a concurrent write's bytes.
    write_lock: Mutex<()>,
    /// A kept overlay's map file, and the disk's capacity and block size it records.
    map: Option<(PathBuf, u64, u64)>,
    /// The blocks the map file names, held while it is replaced: concurrent flushes (several connections)
    /// take turns on its temporary file, and each saves the union of what was saved and what it synced, so a
    /// flush that snapshotted earlier cannot save an older map over a newer one.
    saved: Mutex<Vec<u64>>,
}

const OVERLAY_MAP_MAGIC: &[u8; 8] = b"DVOVMAP1";
/// Overlay files are `<prefix><16 hex random>` (temporary, unlinked at once) or `<prefix><snapshot hex>-<disk
/// name hex>` (kept).
const OVERLAY_PREFIX: &str = "diskvault-overlay-";

/// Decodes a kept overlay's map file (see the module docs) made for a disk of `capacity` bytes in blocks of
/// `block_size`: its bitmap of the blocks the overlay holds, one bit per block. A local file read back at
/// start, so every damage is an error, never a panic (fuzzed: `fuzz/fuzz_targets/overlay_map.rs`).
pub fn decode_overlay_map(bytes: &[u8], capacity: u64, block_size: u64) -> std::result::Result<Vec<u64>, String> {
    let words = capacity.div_ceil(block_size.max(1)).div_ceil(64) as usize;
    let body_len = words.checked_mul(8).and_then(|n| n.checked_add(24)).ok_or("the disk is too large for a map")?;
    if bytes.len() != body_len + 32 {
        return Err(format!("{} bytes where {} were expected", bytes.len(), body_len + 32));
    }
    let (body, hash) = bytes.split_at(body_len);
    if blake3::hash(body).as_bytes() != hash || &body[..8] != OVERLAY_MAP_MAGIC {
        return Err("damaged (checksum or magic)".into());
    }
    let u64_at = |i: usize| u64::from_le_bytes(body[i..i + 8].try_into().expect("8 bytes"));
    if (u64_at(8), u64_at(16)) != (capacity, block_size) {
        return Err(format!(
            "made for a disk of {} bytes in blocks of {}, not {capacity} in blocks of {block_size}",
            u64_at(8),
            u64_at(16)
        ));
    }
    Ok((0..words).map(|k| u64_at(24 + 8 * k)).collect())
}

/// Blocks an `NBD_CMD_CACHE` hint fetches per round of coalesced reads.
const PREFETCH_BATCH: u64 = 32;

impl Overlay {
    fn create(dir: &Path, capacity: u64, block_size: u64) -> Result<Overlay> {
        let mut random = [0u8; 8];
        getrandom::fill(&mut random).map_err(|e| Error::invalid(format!("no randomness: {e}")))?;
        let path = dir.join(format!("{OVERLAY_PREFIX}{}", hex::encode(random)));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| Error::local(&path, format!("cannot create the overlay: {e}")))?;
        // Unlinked at once: the overlay lives exactly as long as the server holds it open.
        let _ = std::fs::remove_file(&path);
        file.set_len(capacity).map_err(|e| Error::local(&path, e))?;
        let blocks = capacity.div_ceil(block_size);
        Ok(Overlay {
            file,
            path,
            present: Mutex::new(vec![0; blocks.div_ceil(64) as usize]),
            write_lock: Mutex::new(()),
            map: None,
            saved: Mutex::new(Vec::new()),
        })
    }

    /// The kept overlay of `disk` of `snapshot` in `dir`, continued if it exists (see the module docs).
    fn open_kept(dir: &Path, snapshot: &ObjectId, disk: &str, capacity: u64, block_size: u64) -> Result<Overlay> {
        let path = dir.join(format!("{OVERLAY_PREFIX}{}-{}", snapshot.hex(), hex::encode(disk)));
        let map_path = path.with_extension("map");
        let words = capacity.div_ceil(block_size).div_ceil(64) as usize;
        let present = match std::fs::read(&map_path) {
            Ok(bytes) => decode_overlay_map(&bytes, capacity, block_size)
                .map_err(|e| Error::local(&map_path, format!("overlay map: {e}")))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => vec![0; words],
            Err(e) => return Err(Error::local(&map_path, format!("overlay map: {e}"))),
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| Error::local(&path, format!("cannot open the overlay: {e}")))?;
        file.set_len(capacity).map_err(|e| Error::local(&path, e))?;
        let kept = present.iter().map(|w| w.count_ones()).sum::<u32>();
        if kept > 0 {
            tracing::info!("{}: continuing an overlay of {kept} written blocks", path.display());
        }
        Ok(Overlay {
            file,
            path,
            saved: Mutex::new(present.clone()),
            present: Mutex::new(present),
            write_lock: Mutex::new(()),
            map: Some((map_path, capacity, block_size)),
        })
    }

    /// Makes the writes so far durable: the data, then (for a kept overlay) the map naming it.
    fn flush(&self) -> Result<()> {
        // The map saved is the one from before the sync: a block marked since may not have its copied-up
        // bytes on disk yet, and must not be named.
        let present = self.map.as_ref().map(|_| self.present.lock().unwrap_or_else(|p| p.into_inner()).clone());
        self.file.sync_data().map_err(|e| Error::local(&self.path, e))?;
        let (Some((map_path, capacity, block_size)), Some(present)) = (&self.map, present) else { return Ok(()) };
        let mut saved = self.saved.lock().unwrap_or_else(|p| p.into_inner());
        // Blocks are never unmarked: what was saved plus what this flush synced.
        let merged: Vec<u64> = saved.iter().zip(&present).map(|(a, b)| a | b).collect();
        // No block written for the first time since the last save (a guest rewriting what it wrote, or
        // flushing often): the map on disk is current, and rewriting it would cost two more syncs.
        if merged == *saved {
            return Ok(());
        }
        let mut body = Vec::new();
        body.extend_from_slice(OVERLAY_MAP_MAGIC);
        body.extend_from_slice(&capacity.to_le_bytes());
        body.extend_from_slice(&block_size.to_le_bytes());
        for w in &merged {
            body.extend_from_slice(&w.to_le_bytes());
        }
        let hash = blake3::hash(&body);
        body.extend_from_slice(hash.as_bytes());
        crate::util::replace_file(map_path, &map_path.with_extension("map.tmp"), &body, true)
            .map_err(|e| Error::local(map_path, format!("saving the overlay map: {e}")))?;
        *saved = merged;
        Ok(())
    }

    fn has(&self, block: u64) -> bool {
        let p = self.present.lock().unwrap_or_else(|p| p.into_inner());
        p[(block / 64) as usize] & (1 << (block % 64)) != 0
    }

    fn mark(&self, block: u64) {
        let mut p = self.present.lock().unwrap_or_else(|p| p.into_inner());
        p[(block / 64) as usize] |= 1 << (block % 64);
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(buf, offset).map_err(|e| Error::local(&self.path, format!("overlay read: {e}")))
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<()> {
        self.file.write_all_at(data, offset).map_err(|e| Error::local(&self.path, format!("overlay write: {e}")))
    }
}

/// Decrypted blobs by id, bounded in bytes, with in-flight fetches marked.
struct BlobCache {
    state: Mutex<CacheState>,
    fetched: Condvar,
    /// Buffers of evicted blobs, for fetches to decode into (a fresh 1 MiB buffer costs its page faults).
    spare: BufferPool,
    /// Keep the stored forms of data blobs ([`ServeOptions::keep_stored_forms`]).
    keep_forms: bool,
}

/// Buffers of evicted blobs kept for reuse.
const SPARE_BUFFERS: usize = 16;

struct CacheState {
    lru: lru::LruCache<BlobId, Arc<AlignedBuf>>,
    /// The stored forms of cached blobs, when kept (counted in `bytes`, evicted with their blob).
    forms: HashMap<BlobId, StoredForm>,
    bytes: u64,
    limit: u64,
    in_flight: HashSet<BlobId>,
}

enum Claim {
    Ready(Arc<AlignedBuf>),
    /// The caller must fetch it, then `insert` or `abandon`.
    Fetch,
}

impl BlobCache {
    /// Bytes of blobs it keeps.
    fn limit(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).limit
    }

    fn new(limit: u64, keep_forms: bool) -> BlobCache {
        BlobCache {
            state: Mutex::new(CacheState {
                lru: lru::LruCache::unbounded(),
                forms: HashMap::new(),
                bytes: 0,
                limit,
                in_flight: HashSet::new(),
            }),
            fetched: Condvar::new(),
            spare: BufferPool::new(SPARE_BUFFERS),
            keep_forms,
        }
    }

    /// The cached blob, or a claim to fetch it; waits while another thread fetches it.
    fn get_or_claim(&self, id: &BlobId) -> Claim {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(d) = s.lru.get(id) {
                return Claim::Ready(d.clone());
            }
            if s.in_flight.insert(*id) {
                return Claim::Fetch;
            }
            s = self.fetched.wait(s).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// Claims `id` for fetching if it is neither cached nor in flight.
    fn try_claim(&self, id: &BlobId) -> bool {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        !s.lru.contains(id) && s.in_flight.insert(*id)
    }

    /// The stored form of cached blob `id`, if kept.
    fn form(&self, id: &BlobId) -> Option<StoredForm> {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).forms.get(id).cloned()
    }

    fn insert(&self, id: BlobId, data: Arc<AlignedBuf>, form: Option<StoredForm>) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.in_flight.remove(&id);
        s.bytes += data.len() as u64;
        if let Some(old) = s.lru.put(id, data) {
            s.bytes -= old.len() as u64;
        }
        if let Some(old) = s.forms.remove(&id) {
            s.bytes -= old.memory() as u64;
        }
        if let Some(form) = form.filter(|_| self.keep_forms) {
            s.bytes += form.memory() as u64;
            s.forms.insert(id, form);
        }
        while s.bytes > s.limit && s.lru.len() > 1 {
            match s.lru.pop_lru() {
                Some((evicted, d)) => {
                    s.bytes -= d.len() as u64;
                    if let Some(form) = s.forms.remove(&evicted) {
                        s.bytes -= form.memory() as u64;
                    }
                    // Unless a reader still holds it.
                    self.spare.give_shared(d);
                }
                None => break,
            }
        }
        drop(s);
        self.fetched.notify_all();
    }

    fn abandon(&self, id: &BlobId) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).in_flight.remove(id);
        self.fetched.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_ahead_follows_sequential_readers_only() {
        let mut ra = ReadAhead::default();
        // A first read, and reads far from every other: no predecessor was read, no window.
        for block in [100, 7, 300] {
            assert_eq!(ra.read(block), None);
            assert!(!ra.follows_a_read(block), "block {block}");
        }
        assert!(ra.follows_a_read(101) && ra.follows_a_read(8) && !ra.follows_a_read(102));
        // A window 8..40 fetched ahead: reads in its first half start nothing, the first read in its second half
        // (also one that skipped a hole) starts the next window, once.
        ra.add_window(8, 40);
        assert_eq!(ra.read(8), None);
        assert_eq!(ra.read(23), None);
        assert_eq!(ra.read(30), Some((40, 32)));
        assert_eq!(ra.read(31), None, "the next window was started twice");
        // Readers elsewhere on the disk push out the oldest windows and reads, not the newest.
        for k in 0..KEPT_WINDOWS as u64 + 1 {
            ra.add_window(1000 + 100 * k, 1032 + 100 * k);
        }
        assert_eq!(ra.read(1020), None, "the oldest window was kept");
        assert_eq!(ra.read(1000 + 100 * KEPT_WINDOWS as u64 + 20), Some((1032 + 100 * KEPT_WINDOWS as u64, 32)));
        for block in 5000..5000 + KEPT_RECENT as u64 {
            ra.read(block);
        }
        assert!(!ra.follows_a_read(101), "reads long past still count");
        assert!(ra.follows_a_read(5000 + KEPT_RECENT as u64));
    }

    #[test]
    fn a_kept_overlay_is_continued_only_for_the_disk_it_was_made_for() {
        let dir = tempfile::tempdir().unwrap();
        let snapshot = ObjectId::of_file(b"a snapshot");
        let (capacity, bs) = (130 << 20, 1 << 20);
        let o = Overlay::open_kept(dir.path(), &snapshot, "scsi0:1", capacity, bs).unwrap();
        o.write(129 << 20, b"written").unwrap();
        for block in [0, 63, 64, 129] {
            o.mark(block);
        }
        o.flush().unwrap();
        drop(o);
        let o = Overlay::open_kept(dir.path(), &snapshot, "scsi0:1", capacity, bs).unwrap();
        let held: Vec<u64> = (0..130).filter(|&b| o.has(b)).collect();
        assert_eq!(held, [0, 63, 64, 129]);
        let mut buf = [0u8; 7];
        o.read(129 << 20, &mut buf).unwrap();
        assert_eq!(&buf, b"written");
        // Another disk of the snapshot has its own overlay; the same disk grown is refused.
        let other = Overlay::open_kept(dir.path(), &snapshot, "scsi0:2", capacity, bs).unwrap();
        assert!((0..130).all(|b| !other.has(b)));
        let e = Overlay::open_kept(dir.path(), &snapshot, "scsi0:1", capacity + bs, bs).err().unwrap().to_string();
        assert!(e.contains("overlay map") && e.contains("made for a disk of 136314880 bytes"), "{e}");
    }

    /// The seeds of `fuzz/fuzz_targets/overlay_map.rs` are valid maps, so the fuzzer starts past the checksum.
    #[test]
    fn the_fuzz_seed_maps_decode() {
        let seed = |name: &str| std::fs::read(format!("{}/fuzz/corpus/overlay_map/{name}", env!("CARGO_MANIFEST_DIR")));
        let words = decode_overlay_map(&seed("map-130m").unwrap(), 130 << 20, 1 << 20).unwrap();
        assert_eq!(words, [0x8000000000000001, 3, 2]);
        assert_eq!(decode_overlay_map(&seed("map-4k").unwrap(), 4096, 4096).unwrap(), [1]);
        assert!(decode_overlay_map(&seed("map-empty").unwrap(), 0, 1 << 20).unwrap().is_empty());
        assert!(decode_overlay_map(&seed("map-4k").unwrap(), 8192, 4096).is_err());
    }

    #[test]
    fn a_kept_overlay_map_is_saved_only_when_it_grew_and_never_loses_a_block_to_concurrent_flushes() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let snapshot = ObjectId::of_file(b"another snapshot");
        let (capacity, bs) = (256 << 20, 1 << 20);
        let o = Overlay::open_kept(dir.path(), &snapshot, "d", capacity, bs).unwrap();
        let map = o.map.as_ref().unwrap().0.clone();
        let inode = || std::fs::metadata(&map).map(|m| m.ino()).ok();
        o.mark(3);
        o.flush().unwrap();
        let first = inode();
        assert!(first.is_some());
        // Nothing new marked: the map is not replaced.
        o.flush().unwrap();
        assert_eq!(inode(), first);
        o.mark(4);
        o.flush().unwrap();
        assert_ne!(inode(), first);

        // Eight connections marking and flushing at once: every block marked before a flush that returned is
        // in the map.
        std::thread::scope(|s| {
            for t in 0..8u64 {
                let o = &o;
                s.spawn(move || {
                    for k in 0..30u64 {
                        o.mark(8 + t * 30 + k);
                        o.flush().unwrap();
                    }
                });
            }
        });
        drop(o);
        let o = Overlay::open_kept(dir.path(), &snapshot, "d", capacity, bs).unwrap();
        let missing: Vec<u64> = [3, 4].into_iter().chain(8..248).filter(|&b| !o.has(b)).collect();
        assert!(missing.is_empty(), "blocks missing from the saved map: {missing:?}");
    }
}
