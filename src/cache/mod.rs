//! The local dedup index: a RocksDB database in the user's cache directory mapping blob id → location.
//!
//! It is **only a cache** of the repository's `index/` files. [`IndexCache::open`] catches up with index files
//! other hosts wrote since the last run. If an index file it loaded has disappeared (prune or repair replaced
//! it), what that file listed is taken out again: the cache remembers, per file, the packs and blob ids it
//! listed, so that catching up with a prune costs in proportion to the index files it replaced, not to the
//! repository. If the database is unreadable it is thrown away and rebuilt from `index/`. Deleting it loses
//! nothing.
//!
//! Keys: `c` ‖ blob id ‖ pack id → [`BlobLocation`] (80 bytes, 112 for a delta blob): every listed copy of a blob,
//! so that taking one out never needs to know which others exist; `p` ‖ pack id ‖ index file id → empty (that
//! file lists the pack); `x` ‖ index file id ‖ pack id → the ids of the blobs the file lists in that pack;
//! `i` ‖ index file id → empty (loaded); `v` → cache layout version and repository id;
//! `f` ‖ page feature (u64 LE) → id of a stored data block holding that page ([`crate::delta`]: where a new
//! block's delta base is looked for). Features are hints, checked against the blob index when used, so they
//! survive a rebuild of the blob index and are only dropped with the whole cache. Of a blob's copies, lookups
//! return one not known to be damaged (format-spec §8d) where there is one. `l` ‖ object name → end of its S3
//! Object Lock retention as this host last read or set it ([`crate::object_lock`]).
//!
//! One process at a time can write it (RocksDB's lock). A second process on the same host (a backup while
//! `serve` runs, two backup jobs at once) reads the shared cache as it was when it opened (read-only, so no
//! lock) and keeps what it adds — newer index files, features of the blocks it stores — in a private cache
//! in a temporary directory, consulted first. It so deduplicates and finds delta bases as the first process
//! does, without rebuilding the index from the repository. Should the shared cache turn out to be out of date
//! (it holds an index file the repository no longer has: a prune ran), it brings it up to date if no process
//! writes it any more, else reads it again as the writing process left it; only if it is still out of date is it
//! no longer consulted, and the private cache filled from the whole `index/`. The features it recorded are left
//! in files beside the shared cache when its
//! backup ends, and the next process that writes the shared cache takes them in: they exist nowhere else.
//! `serve`, which runs for days and only reads, takes this second place on purpose once it has brought the cache
//! up to date ([`IndexCache::into_reader`]): the backups on the host keep writing the shared cache.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard};

use rayon::prelude::*;

use crate::damage::KnownDamage;
use crate::error::{Error, Result};
use crate::format::index::{BlobLocation, IndexFile, IndexedPack};
use crate::format::pack::PackEntry;
use crate::format::{BlobId, ObjectId};
use crate::repository::Repository;

pub mod dirs;

const LAYOUT_VERSION: &[u8] = b"diskvault-index-cache-4";
/// Length of the keys' prefix that RocksDB's prefix filters hold: a tag byte and one id. A blob's copies, a pack's
/// listings and an index file's listings are each found by one such prefix.
const PREFIX_LEN: usize = 33;

pub struct IndexCache {
    db: rocksdb::DB,
    path: PathBuf,
    /// Created (or emptied) by this open: it knows nothing of earlier backups.
    fresh: bool,
    /// A private cache in a temporary directory (the shared one was busy or unusable); removed on drop.
    _temp: Option<tempdir::TempDir>,
    /// When the shared cache was busy: it, read-only as it was when this process opened it (or last brought it
    /// up to date), below `db`. `None` once found out of date and not brought up to date: then only `db` is
    /// consulted.
    shared: RwLock<Option<rocksdb::DB>>,
    /// Index files the last sync left out as unreadable ([`SyncStats::unreadable_index_files`]).
    unreadable_index_files: AtomicUsize,
    /// Where a private cache leaves the features of the blocks its backup stored, for the next process that
    /// writes the shared cache ([`IndexCache::end_backup`]); `None` for the shared cache itself.
    spool: Option<PathBuf>,
    /// The damage records as of the last sync: lookups prefer other copies, and backups do not deduplicate
    /// against such copies.
    damage: RwLock<KnownDamage>,
    /// Holds the repository's cache directory in use while open ([`dirs::mark_used`]).
    _in_use: Option<std::fs::File>,
}

/// Features a private cache recorded, left for the shared cache: files of 40-byte records (feature u64 LE, block
/// id), named `*.features` once complete. Features are hints checked against the blob index when used, so a
/// damaged file costs at most useless lookups.
const FEATURE_SPOOL: &str = "features-pending";
const SPOOL_RECORD: usize = 40;

/// What [`IndexCache::open`] did to bring the cache up to date.
#[derive(Debug, Default, Clone, Copy)]
pub struct SyncStats {
    pub index_files_loaded: usize,
    pub blobs_added: usize,
    pub rebuilt: bool,
    /// Index files no longer in the repository (replaced by a prune) whose entries were taken out.
    pub index_files_removed: usize,
    /// Index files that cannot be read (damaged, or of a newer format version), left out with a warning.
    pub unreadable_index_files: usize,
}

impl SyncStats {
    /// Whether the sync changed anything (worth a log line).
    pub fn changed(&self) -> bool {
        self.index_files_loaded > 0 || self.index_files_removed > 0 || self.rebuilt
    }
}

impl std::fmt::Display for SyncStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "loaded {} index files ({} blobs)", self.index_files_loaded, self.blobs_added)?;
        if self.index_files_removed > 0 {
            write!(f, ", left out {} that were replaced", self.index_files_removed)?;
        }
        if self.rebuilt {
            write!(f, ", rebuilt")?;
        }
        Ok(())
    }
}

/// Where this host keeps what it caches of `repo` under `cache_root`: the index cache (`index`), and what else
/// the commands remember locally (format-spec §12).
pub fn repository_dir(repo: &Repository, cache_root: &Path) -> PathBuf {
    cache_root.join(repo.config().id_hex())
}

/// The default cache root: `$DISKVAULT_CACHE_DIR`, else `$XDG_CACHE_HOME/diskvault`, else `~/.cache/diskvault`.
pub fn default_cache_root() -> PathBuf {
    if let Some(d) = std::env::var_os("DISKVAULT_CACHE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(d).join("diskvault");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache").join("diskvault"),
        None => std::env::temp_dir().join("diskvault-cache"),
    }
}

/// Options of the index cache: [`base_options`], and prefix filters (a blob's copies, a pack's or an index
/// file's listings are each found by a prefix seek).
fn db_options() -> rocksdb::Options {
    let mut o = base_options();
    // Not `create_fixed_prefix`: Debian's librocksdb keeps its assertions, and that transform asserts on keys
    // shorter than the prefix (`v`, `f` ‖ feature).
    o.set_prefix_extractor(rocksdb::SliceTransform::create("diskvault-id-prefix", key_prefix, Some(has_key_prefix)));
    o
}

/// Options of every RocksDB database here: the index cache and [`ScratchDb`].
fn base_options() -> rocksdb::Options {
    let mut o = rocksdb::Options::default();
    o.create_if_missing(true);
    // Blob ids are random: compression gains nothing, bloom filters make misses (new blocks) cheap.
    o.set_compression_type(rocksdb::DBCompressionType::None);
    let mut bo = rocksdb::BlockBasedOptions::default();
    bo.set_bloom_filter(10.0, false);
    // Index and filter blocks live in a fixed-size block cache: memory stays bounded however many blobs the
    // repository has, and up to some 25 million keys the filters of every table stay cached (a cache that
    // is too small makes every lookup re-read a filter block: measured 5x slower at a million keys).
    // Partitioned: a whole-table filter block is megabytes, and re-reading it after each eviction made lookups
    // in a 3-million-key database 100x slower (measured); partitions are a few KiB.
    bo.set_cache_index_and_filter_blocks(true);
    bo.set_index_type(rocksdb::BlockBasedIndexType::TwoLevelIndexSearch);
    bo.set_partition_filters(true);
    bo.set_pin_top_level_index_and_filter(true);
    bo.set_pin_l0_filter_and_index_blocks_in_cache(true);
    if let Ok(cache) = rocksdb::Cache::new_lru_cache(32 << 20) {
        bo.set_block_cache(&cache);
    }
    o.set_block_based_table_factory(&bo);
    o.set_max_open_files(256);
    // Bounded memory whatever the repository size: small memtables, data spills to sorted files (a cache
    // build of a million blobs peaked at 196 MiB with RocksDB's 64 MiB ones, 163 MiB with these, as fast).
    o.set_write_buffer_size(16 << 20);
    o.set_max_write_buffer_number(2);
    o.set_keep_log_file_num(2);
    o
}

/// The file beside the cache at `path` that says it failed during a run and is to be rebuilt when next opened.
fn rebuild_marker(path: &Path) -> PathBuf {
    path.with_file_name("index-failed")
}

/// A key of one table: its tag byte, then a 32-byte id.
fn key(tag: u8, id: &BlobId) -> [u8; 33] {
    let mut k = [0u8; 33];
    k[0] = tag;
    k[1..].copy_from_slice(&id.0);
    k
}

/// A key of one table that relates two ids: its tag byte, then both ids.
fn pair_key(tag: u8, first: &BlobId, second: &BlobId) -> [u8; 65] {
    let mut k = [0u8; 65];
    k[..33].copy_from_slice(&key(tag, first));
    k[33..].copy_from_slice(&second.0);
    k
}

/// The part of a key that RocksDB's prefix filters hold ([`PREFIX_LEN`]).
fn key_prefix(k: &[u8]) -> &[u8] {
    &k[..k.len().min(PREFIX_LEN)]
}

fn has_key_prefix(k: &[u8]) -> bool {
    k.len() >= PREFIX_LEN
}

/// The key of the copy of blob `id` in `pack`.
fn copy_key(id: &BlobId, pack: &ObjectId) -> [u8; 65] {
    pair_key(b'c', id, pack)
}

/// A key and its value, as an iterator returns them.
type KeyValue = (Box<[u8]>, Box<[u8]>);

/// The keys of `db` that begin with `prefix`, in order. A prefix of [`PREFIX_LEN`] bytes is looked up through
/// the prefix filters; a shorter one (a whole table) is read in total order.
fn scan<'a>(
    db: &'a rocksdb::DB,
    prefix: &'a [u8],
) -> impl Iterator<Item = std::result::Result<KeyValue, rocksdb::Error>> + 'a {
    let mut opts = rocksdb::ReadOptions::default();
    if prefix.len() == PREFIX_LEN {
        opts.set_prefix_same_as_start(true);
    } else {
        opts.set_total_order_seek(true);
    }
    db.iterator_opt(rocksdb::IteratorMode::From(prefix, rocksdb::Direction::Forward), opts)
        .take_while(move |item| item.as_ref().map_or(true, |(k, _)| k.starts_with(prefix)))
}

/// Iterators over blob copies of this process's cache and the shared one below it: seeking one blob's prefix
/// each (through the prefix filters), or, `total_order`, walking forward through many.
fn copy_iterators<'a>(
    db: &'a rocksdb::DB,
    shared: Option<&'a rocksdb::DB>,
    total_order: bool,
) -> Vec<rocksdb::DBRawIterator<'a>> {
    let options = || {
        let mut opts = rocksdb::ReadOptions::default();
        match total_order {
            true => opts.set_total_order_seek(true),
            false => opts.set_prefix_same_as_start(true),
        }
        opts
    };
    std::iter::once(db).chain(shared).map(|db| db.raw_iterator_opt(options())).collect()
}

fn retention_key(object: &str) -> Vec<u8> {
    [b"l", object.as_bytes()].concat()
}

fn feature_key(feature: u64) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[0] = b'f';
    k[1..].copy_from_slice(&feature.to_le_bytes());
    k
}

/// The id that ends a key of [`pair_key`]'s shape.
fn second_id(k: &[u8]) -> Option<BlobId> {
    k.get(33..65).and_then(|s| <[u8; 32]>::try_from(s).ok()).map(BlobId)
}

/// Reads `ids` in parallel. One that cannot be read is left out with a warning, counted in `stats`, and tried
/// again at the next sync: a damaged index file must not stop every backup and restore. Its blobs are not found
/// through it meanwhile (a backup stores them again; a restore that needs them names them), `check` reports it,
/// and `repair index` rebuilds it from the packs. Prune reads the index itself and refuses to run.
fn load_readable_index_files(
    repo: &Repository,
    ids: &[ObjectId],
    stats: &mut SyncStats,
) -> Result<Vec<(ObjectId, IndexFile)>> {
    let loaded: Vec<(ObjectId, Result<IndexFile>)> =
        crate::util::with_request_threads(|| ids.par_iter().map(|id| (*id, repo.load_index(id))).collect())?;
    let mut files = Vec::with_capacity(loaded.len());
    for (id, file) in loaded {
        match file {
            Ok(f) => files.push((id, f)),
            Err(e) if crate::repository::is_unreadable_object(&e) => {
                tracing::warn!("{e}; left out: its blobs are not found through it until `repair index` rebuilds it");
                stats.unreadable_index_files += 1;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(files)
}

/// Minimal self-cleaning temporary directory (tempfile is a dev-dependency only).
mod tempdir {
    use std::path::{Path, PathBuf};

    const PREFIX: &str = "diskvault-cache-";

    /// `<temp dir>/diskvault-cache-<pid>-<random>`, removed on drop.
    pub struct TempDir(PathBuf);
    impl TempDir {
        pub fn new() -> std::io::Result<TempDir> {
            let p = std::env::temp_dir().join(format!(
                "{PREFIX}{}-{}",
                std::process::id(),
                hex::encode(crate::crypto::random_array::<6>())
            ));
            std::fs::create_dir_all(&p)?;
            Ok(TempDir(p))
        }
        pub fn path(&self) -> &Path {
            &self.0
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Removes the temporary directories of processes that were killed before they could (a private index
    /// cache holds the whole repository's index). Once per process. A directory stays while the process named
    /// in it runs, or while a database in it is open (its owner may be in another PID namespace that shares
    /// the temporary directory): RocksDB holds a record lock on its `LOCK` file while open.
    pub fn remove_abandoned() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else { return };
            for entry in entries.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(owner_pid) else { continue };
                let dir = entry.path();
                if pid == std::process::id() || process_exists(pid) || super::dirs::held_open(&dir) {
                    continue;
                }
                match std::fs::remove_dir_all(&dir) {
                    Ok(()) => tracing::info!("removed {}, left by a process that no longer runs", dir.display()),
                    Err(e) => tracing::debug!("cannot remove abandoned {}: {e}", dir.display()),
                }
            }
        });
    }

    /// The process id in a name made by [`TempDir::new`].
    fn owner_pid(name: &str) -> Option<u32> {
        let (pid, random) = name.strip_prefix(PREFIX)?.split_once('-')?;
        let pid: u32 = pid.parse().ok()?;
        (pid > 0 && random.len() == 12 && random.bytes().all(|b| b.is_ascii_hexdigit())).then_some(pid)
    }

    fn process_exists(pid: u32) -> bool {
        let Ok(pid) = libc::pid_t::try_from(pid) else { return true };
        // SAFETY: signal 0 only checks whether the process exists.
        let r = unsafe { libc::kill(pid, 0) };
        r == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn only_names_made_by_tempdir_have_an_owner() {
            assert_eq!(super::owner_pid("diskvault-cache-4242-0123456789ab"), Some(4242));
            for name in [
                "diskvault-cache",
                "diskvault-cache-0-0123456789ab",
                "diskvault-cache-4242-notes",
                "diskvault-cache-4242-0123456789abc",
                "diskvault-cache--0123456789ab",
                "other-4242-0123456789ab",
            ] {
                assert_eq!(super::owner_pid(name), None, "{name}");
            }
        }
    }
}

/// Marks `cache_root` as a cache directory (bford.info/cachedir), as restic and borg mark theirs: backup tools
/// that honour the tag (`restic --exclude-caches`, `borg --exclude-caches`, `tar --exclude-caches`) leave it out.
/// Best effort: a cache that cannot be tagged still works.
fn tag_as_cache(cache_root: &Path) {
    const TAG: &str = "Signature: 8a477f597d28d172789f06886806bc55\n\
                       # This file is a cache directory tag created by diskvault.\n\
                       # For information about cache directory tags, see https://bford.info/cachedir/\n";
    let path = cache_root.join("CACHEDIR.TAG");
    if !path.exists() {
        let _ = std::fs::create_dir_all(cache_root).and_then(|()| std::fs::write(&path, TAG));
    }
}

impl IndexCache {
    /// Opens (or creates) the cache of `repo` under `cache_root` and brings it up to date with `index/`.
    ///
    /// If the shared cache cannot be used (another diskvault process holds it, the directory is read-only,
    /// the database is damaged beyond reopening), a private cache in a temporary directory is built instead:
    /// slower, never wrong.
    pub fn open(repo: &Repository, cache_root: &Path) -> Result<(IndexCache, SyncStats)> {
        let cache = Self::open_unsynced(repo, cache_root)?;
        let stats = cache.sync(repo)?;
        Ok((cache, stats))
    }

    /// Opens the cache without catching up with `index/`, for callers that [`IndexCache::sync`] it themselves at
    /// the right moment (backup and restore: after their session marker exists).
    pub fn open_unsynced(repo: &Repository, cache_root: &Path) -> Result<IndexCache> {
        tempdir::remove_abandoned();
        tag_as_cache(cache_root);
        let dir = repository_dir(repo, cache_root);
        let in_use = dirs::mark_used(&dir, &repo.backend().location());
        let mut cache = Self::open_path(&dir.join("index"), repo)?;
        cache._in_use = in_use;
        Ok(cache)
    }

    fn open_path(path: &Path, repo: &Repository) -> Result<IndexCache> {
        let spool = path.with_file_name(FEATURE_SPOOL);
        match Self::open_at(path, repo) {
            Ok(c) => {
                c.import_spooled_features(&spool);
                Ok(c)
            }
            Err(e) => {
                let shared = Self::open_shared_read_only(path, repo);
                match &shared {
                    Some(_) => tracing::info!(
                        "{e}: reading the local index cache as another process left it, with this run's \
                         additions in a private temporary cache"
                    ),
                    None => tracing::warn!("{e}; using a private temporary index cache for this run"),
                }
                Self::private_above(shared, spool, repo)
            }
        }
    }

    /// A private cache in a temporary directory, above `shared` (read-only) if given; its features go to
    /// `spool` at the end of a backup.
    fn private_above(shared: Option<rocksdb::DB>, spool: PathBuf, repo: &Repository) -> Result<IndexCache> {
        let tmp =
            tempdir::TempDir::new().map_err(|e| Error::Cache { path: std::env::temp_dir(), cause: e.to_string() })?;
        let mut c = Self::open_at(&tmp.path().join("index"), repo)?;
        c._temp = Some(tmp);
        c.spool = Some(spool);
        if shared.is_some() {
            // The shared cache knows the earlier backups: leftovers of unfinished ones are its owner's.
            c.fresh = false;
            c.shared = RwLock::new(shared);
        }
        Ok(c)
    }

    /// Leaves the shared cache to the processes that write it, for a process that runs for long and only
    /// reads (`serve`): this cache, brought up to date by the caller, is closed and read read-only from then on,
    /// below a private cache. Held for days, it made every backup on the host a second process (see the
    /// module docs) whose features and index entries never reached the shared cache.
    pub fn into_reader(mut self, repo: &Repository) -> Result<IndexCache> {
        if self._temp.is_some() {
            return Ok(self);
        }
        let path = self.path.clone();
        let damage = std::mem::take(&mut *self.damage.write().unwrap_or_else(|p| p.into_inner()));
        let in_use = self._in_use.take();
        drop(self);
        let mut reader = match Self::open_shared_read_only(&path, repo) {
            Some(shared) => Self::private_above(Some(shared), path.with_file_name(FEATURE_SPOOL), repo),
            None => Self::open_path(&path, repo),
        }?;
        *reader.damage.write().unwrap_or_else(|p| p.into_inner()) = damage;
        reader._in_use = in_use;
        Ok(reader)
    }

    /// The shared cache at `path` opened read-only (which takes no lock), if it is this repository's in the
    /// current layout. Every table file is opened at once and kept open, so that the process writing the cache
    /// can compact it meanwhile: a table file it deletes stays readable here.
    fn open_shared_read_only(path: &Path, repo: &Repository) -> Option<rocksdb::DB> {
        let mut opts = db_options();
        opts.set_max_open_files(-1);
        let db = match rocksdb::DB::open_for_read_only(&opts, path, false) {
            Ok(db) => db,
            Err(e) => {
                tracing::debug!("local index cache {}: cannot read it either: {e}", path.display());
                return None;
            }
        };
        let mut expected = LAYOUT_VERSION.to_vec();
        expected.extend_from_slice(&repo.config().id);
        match db.get(b"v") {
            Ok(Some(v)) if v == expected => Some(db),
            _ => None,
        }
    }

    /// The shared cache below the private one, while it is usable.
    fn shared(&self) -> RwLockReadGuard<'_, Option<rocksdb::DB>> {
        self.shared.read().unwrap_or_else(|p| p.into_inner())
    }

    fn set_shared(&self, db: Option<rocksdb::DB>) {
        *self.shared.write().unwrap_or_else(|p| p.into_inner()) = db;
    }

    /// Stops consulting the shared cache (it is out of date).
    fn drop_shared(&self) {
        if self.shared().is_some() {
            tracing::info!("the local index cache another process holds is out of date; no longer reading it");
            self.set_shared(None);
        }
    }

    /// The index files the shared cache below holds, if there is one and it is up to date with `in_repo`. One
    /// that holds a file the repository no longer has (a prune replaced it) is brought up to date, if no other
    /// process writes it, or read again as the process writing it left it (which has caught up if a backup ran
    /// since). Only if it is still out of date is it no longer read: then this process's cache loads every index
    /// file. A `serve` running for days so keeps reading the shared cache across prunes.
    fn shared_index_files(&self, repo: &Repository, in_repo: &[ObjectId]) -> Result<Option<Vec<ObjectId>>> {
        let current = |db: &rocksdb::DB| -> Result<Option<Vec<ObjectId>>> {
            let files = self.index_files_in(db)?;
            Ok(files.iter().all(|id| in_repo.binary_search(id).is_ok()).then_some(files))
        };
        match self.shared().as_ref() {
            None => return Ok(None),
            Some(db) => {
                if let Some(files) = current(db)? {
                    return Ok(Some(files));
                }
            }
        }
        let path = self.spool.as_ref().map(|spool| spool.with_file_name("index"));
        if let Some(path) = path {
            match Self::open_at(&path, repo) {
                Ok(writer) => {
                    if let Err(e) = writer.sync(repo) {
                        tracing::debug!("bringing the shared local index cache up to date: {e}");
                    }
                }
                Err(e) => tracing::debug!("the shared local index cache is written by another process: {e}"),
            }
            if let Some(db) = Self::open_shared_read_only(&path, repo) {
                if let Some(files) = current(&db)? {
                    tracing::info!(
                        "the shared local index cache caught up with replaced index files; reading it again"
                    );
                    self.set_shared(Some(db));
                    return Ok(Some(files));
                }
            }
        }
        self.drop_shared();
        Ok(None)
    }

    fn open_at(path: &Path, repo: &Repository) -> Result<IndexCache> {
        let cache_err = |e: &dyn std::fmt::Display| Error::Cache { path: path.to_path_buf(), cause: e.to_string() };
        std::fs::create_dir_all(path).map_err(|e| cache_err(&e))?;
        let marker = rebuild_marker(path);
        if marker.exists() {
            tracing::warn!("local index cache {} failed during an earlier run; rebuilding it", path.display());
            // Fails if another process has it open: it is then left to the next run.
            if rocksdb::DB::destroy(&rocksdb::Options::default(), path).is_ok() {
                let _ = std::fs::remove_file(&marker);
            }
        }
        let rebuild = |e: rocksdb::Error| -> Result<rocksdb::DB> {
            tracing::warn!("local index cache {} is damaged ({e}); rebuilding it", path.display());
            rocksdb::DB::destroy(&rocksdb::Options::default(), path).map_err(|e| cache_err(&e))?;
            rocksdb::DB::open(&db_options(), path).map_err(|e| cache_err(&e))
        };
        let db = match rocksdb::DB::open(&db_options(), path) {
            // Table files are read only when used: a damaged one can open, and fail the first read.
            Ok(db) => match db.get(b"v") {
                Err(e) if e.kind() == rocksdb::ErrorKind::Corruption => {
                    drop(db);
                    rebuild(e)?
                }
                _ => db,
            },
            Err(e) if e.kind() == rocksdb::ErrorKind::Corruption => rebuild(e)?,
            Err(e) => return Err(cache_err(&e)),
        };
        let mut cache = IndexCache {
            db,
            path: path.to_path_buf(),
            fresh: false,
            _temp: None,
            shared: RwLock::new(None),
            unreadable_index_files: Default::default(),
            spool: None,
            damage: Default::default(),
            _in_use: None,
        };
        let mut expected = LAYOUT_VERSION.to_vec();
        expected.extend_from_slice(&repo.config().id);
        match cache.db.get(b"v").map_err(|e| cache_err(&e))? {
            Some(v) if v == expected => {}
            Some(_) => {
                tracing::warn!("local index cache {} has another layout; rebuilding it", path.display());
                cache.clear(true)?;
                cache.db.put(b"v", &expected).map_err(|e| cache_err(&e))?;
                cache.fresh = true;
            }
            None => {
                cache.db.put(b"v", &expected).map_err(|e| cache_err(&e))?;
                cache.fresh = true;
            }
        }
        Ok(cache)
    }

    /// Marks a backup as running with this cache. Returns whether packs may have been left unindexed that this
    /// cache would know of: the last backup with it did not finish (killed, or failed after uploading), or
    /// the cache is new. Only then does a backup look for such packs (listing every pack is slow on S3);
    /// others' leftovers are adopted by `prune` and `repair index`.
    pub fn begin_backup(&self) -> Result<bool> {
        let unfinished = self.db.get(b"r").map_err(|e| self.err(e))?.is_some();
        self.db.put(b"r", b"1").map_err(|e| self.err(e))?;
        Ok(unfinished || self.fresh)
    }

    /// The backup finished: every pack it stored is indexed. A private cache leaves the features it recorded
    /// for the shared one (otherwise lost with it: later backups would find no delta base in those blocks).
    pub fn end_backup(&self) -> Result<()> {
        self.db.delete(b"r").map_err(|e| self.err(e))?;
        match &self.spool {
            Some(spool) => self.spool_features(spool),
            None => self.persist(),
        }
        Ok(())
    }

    /// Writes this cache's features to a new file in `spool`. Only a warning if that fails: they are hints.
    fn spool_features(&self, spool: &Path) {
        let name = format!("{}-{}", std::process::id(), hex::encode(crate::crypto::random_array::<8>()));
        let tmp = spool.join(format!(".{name}.tmp"));
        // Streamed: a large backup leaves hundreds of MiB of features.
        let write = || -> std::io::Result<usize> {
            let mut out: Option<std::io::BufWriter<std::fs::File>> = None;
            let mut count = 0;
            for item in scan(&self.db, b"f") {
                let (k, v) = item.map_err(std::io::Error::other)?;
                if k.len() == 9 && v.len() == 32 {
                    let out = match &mut out {
                        Some(out) => out,
                        None => {
                            std::fs::create_dir_all(spool)?;
                            out.insert(std::io::BufWriter::new(std::fs::File::create(&tmp)?))
                        }
                    };
                    std::io::Write::write_all(out, &k[1..])?;
                    std::io::Write::write_all(out, &v)?;
                    count += 1;
                }
            }
            if let Some(out) = out {
                out.into_inner().map_err(|e| e.into_error())?;
                std::fs::rename(&tmp, spool.join(format!("{name}.features")))?;
            }
            Ok(count)
        };
        let written = write();
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        match written {
            Ok(0) => {}
            Ok(n) => tracing::debug!("left {n} page features in {} for the shared index cache", spool.display()),
            Err(e) => tracing::warn!("cannot leave page features in {}: {e}", spool.display()),
        }
    }

    /// Takes in the features private caches left in `spool`, and removes their files. Only warnings on failure.
    fn import_spooled_features(&self, spool: &Path) {
        let Ok(dir) = std::fs::read_dir(spool) else { return };
        for entry in dir.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|x| x != "features" && x != "tmp") {
                continue;
            }
            if path.extension().is_some_and(|x| x == "tmp") {
                // Left by a process killed while writing it.
                let old = entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| t.elapsed().ok());
                if old.is_some_and(|age| age.as_secs() > 3600) {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            let imported = (|| -> std::result::Result<(), String> {
                // In pieces: a large backup leaves hundreds of MiB of features.
                const PIECE: u64 = (SPOOL_RECORD as u64) << 16;
                let mut file = std::fs::File::open(&path).map_err(|e| e.to_string())?;
                let mut piece = Vec::with_capacity(PIECE as usize);
                loop {
                    piece.clear();
                    std::io::Read::read_to_end(&mut std::io::Read::take(&mut file, PIECE), &mut piece)
                        .map_err(|e| e.to_string())?;
                    let mut batch = rocksdb::WriteBatch::default();
                    for r in piece.chunks_exact(SPOOL_RECORD) {
                        batch.put([&[b'f'][..], &r[..8]].concat(), &r[8..]);
                    }
                    self.db.write(batch).map_err(|e| e.to_string())?;
                    if (piece.len() as u64) < PIECE {
                        return std::fs::remove_file(&path).map_err(|e| e.to_string());
                    }
                }
            })();
            match imported {
                Ok(()) => tracing::debug!("took in the page features of {}", path.display()),
                Err(e) => tracing::warn!("page features left in {}: {e}", path.display()),
            }
        }
    }

    /// Writes what this process added to a table file. Otherwise the next process replays this one's log and
    /// writes that table itself while opening, before it can start: 70-170 ms of a CBT incremental after a
    /// 4 GiB full backup (cold page cache), 20-30 ms once the full backup had persisted its entries.
    /// Only a warning if that fails (a full disk): the log holds the entries, and the backup is saved.
    fn persist(&self) {
        if let Err(e) = self.db.flush() {
            tracing::warn!("{}", self.err(format!("writing a table file: {e}")));
        }
    }

    /// The error of a failed use of the cache. Whatever failed (a damaged table file found mid-run, a malformed
    /// entry, a write the disk refused), the cache is marked so that the next run rebuilds it from the
    /// repository ([`IndexCache::open`]) instead of meeting the same fault: it is only a cache.
    fn err(&self, e: impl std::fmt::Display) -> Error {
        let cause = match std::fs::write(rebuild_marker(&self.path), b"") {
            Ok(()) => format!("{e}; it is rebuilt from the repository at the next run"),
            Err(_) => format!("{e}; delete the cache directory to rebuild it"),
        };
        Error::Cache { path: self.path.clone(), cause }
    }

    /// Empties the blob index (features stay: they are hints), or with `everything` the whole database (another
    /// layout's keys too).
    fn clear(&self, everything: bool) -> Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        if everything {
            batch.delete_range(&[0u8][..], &[0xffu8, 0xff][..]);
        } else {
            for prefix in *b"cipx" {
                batch.delete_range([prefix], [prefix + 1]);
            }
        }
        self.db.write(batch).map_err(|e| self.err(e))
    }

    fn index_files_in(&self, db: &rocksdb::DB) -> Result<Vec<ObjectId>> {
        let mut out = Vec::new();
        for item in scan(db, b"i") {
            let (k, _) = item.map_err(|e| self.err(e))?;
            match k.get(1..).and_then(|s| <[u8; 32]>::try_from(s).ok()) {
                Some(a) => out.push(BlobId(a)),
                None => return Err(self.err("malformed key")),
            }
        }
        Ok(out)
    }

    /// Loads index files not yet in the cache, and takes out the entries of those no longer in the repository.
    pub fn sync(&self, repo: &Repository) -> Result<SyncStats> {
        // An index file can vanish between listing and reading when a prune replaces it: list again.
        let mut attempt = 0;
        loop {
            match self.sync_once(repo) {
                Err(Error::Missing { object }) if object.starts_with("index/") && attempt < 5 => {
                    tracing::info!("{object} was replaced while loading it; loading the index again");
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    fn sync_once(&self, repo: &Repository) -> Result<SyncStats> {
        let mut stats = SyncStats::default();
        let records = crate::damage::load(repo)?;
        for e in &records.unreadable {
            tracing::warn!("{e}: a damage record, left out (the next `check --read-data` finds that damage again)");
        }
        *self.damage.write().unwrap_or_else(|p| p.into_inner()) = records.damage;
        let listed = repo.list_index_files()?;
        let in_repo: Vec<ObjectId> = listed.iter().map(|(id, _)| *id).collect();
        // The index files loaded, into this process's cache or the shared one below it (brought up to date if a
        // prune left it out of date, else no longer read).
        let mut loaded = self.index_files_in(&self.db)?;
        if let Some(below) = self.shared_index_files(repo, &in_repo)? {
            loaded.extend(below);
        }
        loaded.sort();
        loaded.dedup();
        let removed: Vec<ObjectId> = loaded.iter().filter(|id| in_repo.binary_search(id).is_err()).copied().collect();
        if !removed.is_empty() {
            tracing::info!(
                "{} index files were replaced in the repository; leaving out what they listed",
                removed.len()
            );
            self.forget_index_files(&removed)?;
            loaded.retain(|id| removed.binary_search(id).is_err());
            stats.index_files_removed = removed.len();
        }
        let missing: Vec<ObjectId> = in_repo.iter().filter(|id| loaded.binary_search(id).is_err()).copied().collect();
        // Index files that a file of this run supersedes (format-spec §5: readers ignore a superseded file once
        // the superseding one exists; only an interrupted `repair index` leaves both).
        let mut superseded: Vec<ObjectId> = Vec::new();
        let excluded = self.load_index_files(repo, &missing, &listed, &mut superseded, &mut stats)?;
        let stale = |s: &ObjectId| {
            (loaded.binary_search(s).is_ok() || missing.binary_search(s).is_ok()) && !excluded.contains(s)
        };
        if superseded.iter().any(stale) {
            // Entries of a superseded file are in the cache (loaded before the file superseding it): rebuild,
            // first learning what every file supersedes, then leaving those out.
            tracing::info!("index files were superseded; rebuilding the local index cache");
            self.drop_shared();
            self.clear(false)?;
            stats = SyncStats { rebuilt: true, ..SyncStats::default() };
            for chunk in crate::repository::index_load_batches(&in_repo, &listed) {
                for (_, f) in load_readable_index_files(repo, chunk, &mut SyncStats::default())? {
                    superseded.extend(f.supersedes.into_iter().filter(|s| in_repo.binary_search(s).is_ok()));
                }
            }
            self.load_index_files(repo, &in_repo, &listed, &mut superseded, &mut stats)?;
        }
        if stats.changed() {
            self.persist();
        }
        self.unreadable_index_files.store(stats.unreadable_index_files, Ordering::Relaxed);
        Ok(stats)
    }

    /// Loads `ids` (fetched and decrypted in parallel, in [`crate::repository::index_load_batches`]), collecting into `superseded` the
    /// files of `listed` (the repository's, with their sizes) they supersede; a file already in `superseded` is recorded as loaded
    /// with no entries, and returned. A file superseded by one loaded after it is not caught here: the caller
    /// compares `superseded` with what was loaded.
    fn load_index_files(
        &self,
        repo: &Repository,
        ids: &[ObjectId],
        listed: &[(ObjectId, u64)],
        superseded: &mut Vec<ObjectId>,
        stats: &mut SyncStats,
    ) -> Result<Vec<ObjectId>> {
        let mut excluded = Vec::new();
        for chunk in crate::repository::index_load_batches(ids, listed) {
            let files = load_readable_index_files(repo, chunk, stats)?;
            for (_, file) in &files {
                let in_repo = |s: &&ObjectId| listed.binary_search_by_key(*s, |(id, _)| *id).is_ok();
                superseded.extend(file.supersedes.iter().filter(in_repo));
            }
            for (id, file) in &files {
                if superseded.contains(id) {
                    self.insert_index_file(id, &IndexFile::default())?;
                    excluded.push(*id);
                    continue;
                }
                stats.blobs_added += file.blob_count();
                self.insert_index_file(id, file)?;
                stats.index_files_loaded += 1;
            }
        }
        Ok(excluded)
    }

    /// Records the entries of an index file (one write batch), and that the file is loaded. What the file lists
    /// is kept too (keys `x`, `p`), so that its entries can be taken out again if it is removed.
    pub fn insert_index_file(&self, index_id: &ObjectId, file: &IndexFile) -> Result<()> {
        let mut listings: std::collections::BTreeMap<ObjectId, Vec<u8>> = Default::default();
        let mut batch = rocksdb::WriteBatch::default();
        let mut copies: Vec<(&IndexedPack, &PackEntry)> = Vec::new();
        for p in &file.packs {
            batch.put(pair_key(b'p', &p.id, index_id), []);
            let listing = listings.entry(p.id).or_default();
            for e in &p.entries {
                listing.extend_from_slice(&e.id.0);
                copies.push((p, e));
            }
        }
        // In key order, blob then pack (as `ScratchDb::put_all_keyed` writes; stable: of a blob listed twice in a
        // pack, the later entry wins as before): building the cache of 3 million blobs took 40% less time.
        copies.sort_by_key(|(p, e)| (e.id.0, p.id.0));
        for (p, e) in copies {
            batch.put(copy_key(&e.id, &p.id), BlobLocation { pack: p.id, entry: *e }.encode());
        }
        for (pack, ids) in listings {
            batch.put(pair_key(b'x', index_id, &pack), ids);
        }
        // In the same batch: a file recorded as loaded has all its entries in.
        batch.put(key(b'i', index_id), []);
        self.db.write(batch).map_err(|e| self.err(e))
    }

    /// Takes out what index files that are no longer in the repository listed (a prune or `repair index`
    /// replaced them): the packs no remaining file lists, and the copies of blobs in those packs. One write
    /// batch per file, so that an interrupted run leaves each file in or out.
    fn forget_index_files(&self, removed: &[ObjectId]) -> Result<()> {
        for index_id in removed {
            let mut batch = rocksdb::WriteBatch::default();
            let mut copies: Vec<[u8; 65]> = Vec::new();
            for (pack, ids) in self.listings_of(index_id)? {
                batch.delete(pair_key(b'x', index_id, &pack));
                batch.delete(pair_key(b'p', &pack, index_id));
                if !self.other_files_list(&pack, index_id)? {
                    copies.extend(ids.iter().map(|id| copy_key(id, &pack)));
                }
            }
            // In key order, as `insert_index_file` writes them.
            copies.sort_unstable();
            for k in copies {
                batch.delete(k);
            }
            batch.delete(key(b'i', index_id));
            self.db.write(batch).map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// What index file `index_id` listed, pack by pack (keys `x`).
    fn listings_of(&self, index_id: &ObjectId) -> Result<Vec<(ObjectId, Vec<BlobId>)>> {
        let prefix = key(b'x', index_id);
        let mut out = Vec::new();
        for item in scan(&self.db, &prefix) {
            let (k, v) = item.map_err(|e| self.err(e))?;
            let pack = second_id(&k).ok_or_else(|| self.err("malformed key"))?;
            if v.len() % 32 != 0 {
                return Err(self.err(format!("listing of pack {pack} in index file {index_id}: malformed")));
            }
            let ids = v.chunks_exact(32).map(|c| BlobId(c.try_into().expect("32 bytes"))).collect();
            out.push((pack, ids));
        }
        Ok(out)
    }

    /// Whether an index file other than `index_id` lists `pack` (keys `p`).
    fn other_files_list(&self, pack: &ObjectId, index_id: &ObjectId) -> Result<bool> {
        let prefix = key(b'p', pack);
        for item in scan(&self.db, &prefix) {
            let (k, _) = item.map_err(|e| self.err(e))?;
            if second_id(&k).as_ref() != Some(index_id) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The copy of blob `id` that a read through this cache failed on with `err`, if `err` says the copy itself
    /// is damaged (not that the storage failed): what a reader records (format-spec §8d).
    pub fn damaged_copy(&self, id: &BlobId, err: &Error) -> Option<(ObjectId, BlobId)> {
        match err {
            Error::Corrupt { .. } => self.lookup(id).ok().flatten().map(|loc| (loc.pack, *id)),
            _ => None,
        }
    }

    /// The known damage as of the last sync (format-spec §8d).
    pub fn damage(&self) -> RwLockReadGuard<'_, KnownDamage> {
        self.damage.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Why a blob the index does not list may be missing, for error messages: index files the last sync left
    /// out as unreadable, else a lost pack.
    pub fn why_not_indexed(&self) -> &'static str {
        if self.unreadable_index_files.load(Ordering::Relaxed) > 0 {
            "an index file that lists it is damaged? `repair index` rebuilds it"
        } else {
            "lost pack?"
        }
    }

    /// Where blob `id` is stored: a copy not known to be damaged, if the index lists one, else a damaged one
    /// (reading it then names the damage).
    pub fn lookup(&self, id: &BlobId) -> Result<Option<BlobLocation>> {
        self.find_copy(id, true)
    }

    /// The blob's location, unless every copy known is damaged: what a backup deduplicates against, and what a
    /// new blob may rely on (a delta base). Readers of what is stored use [`IndexCache::lookup`].
    pub fn lookup_intact(&self, id: &BlobId) -> Result<Option<BlobLocation>> {
        self.find_copy(id, false)
    }

    /// Whether the blob is stored at a copy not known to be damaged: what a backup deduplicates against.
    pub fn contains(&self, id: &BlobId) -> Result<bool> {
        Ok(self.lookup_intact(id)?.is_some())
    }

    /// The first copy of blob `id` that index files list and no damage record names (this process's cache
    /// first, then the shared one below it), else, with `or_damaged`, the first damaged one. Stops at the first
    /// intact copy: on the backup's and the restore's per-block path, one seek where the blob has one copy.
    fn find_copy(&self, id: &BlobId, or_damaged: bool) -> Result<Option<BlobLocation>> {
        let damage = self.damage();
        let shared = self.shared();
        // One prefix per iterator: the prefix filters skip tables that do not hold the blob.
        let mut iters = copy_iterators(&self.db, shared.as_ref(), false);
        let found = self.copy_at(&mut iters, id, &damage)?;
        Ok(found.filter(|(_, intact)| *intact || or_damaged).map(|(loc, _)| loc))
    }

    /// [`IndexCache::lookup`] of many blobs, `ids` in ascending order: one iterator per database walks forward
    /// through the cache instead of one made and sought from scratch per blob (`stats` of a repository of 3
    /// million blobs spent 18 s in those). `each` gets every id with its copy, and whether that copy is intact
    /// (false: every copy the index lists is named by a damage record).
    pub fn lookup_sorted<'a>(
        &self,
        ids: impl IntoIterator<Item = &'a BlobId>,
        mut each: impl FnMut(&BlobId, Option<(BlobLocation, bool)>),
    ) -> Result<()> {
        let damage = self.damage();
        let shared = self.shared();
        let mut iters = copy_iterators(&self.db, shared.as_ref(), true);
        for id in ids {
            each(id, self.copy_at(&mut iters, id, &damage)?);
        }
        Ok(())
    }

    /// The first copy of `id` through `iters` (this process's cache, then the shared one) not named by `damage`,
    /// else the first damaged one; with whether it is intact.
    fn copy_at(
        &self,
        iters: &mut [rocksdb::DBRawIterator<'_>],
        id: &BlobId,
        damage: &KnownDamage,
    ) -> Result<Option<(BlobLocation, bool)>> {
        let prefix = key(b'c', id);
        let mut damaged = None;
        for it in iters {
            // Where the iterator stands a little before the blob (`lookup_sorted` of nearly every blob), a few
            // steps forward cost less than a seek through every level of the database.
            let mut steps = 0;
            while steps < 16 && it.key().is_some_and(|k| k < &prefix[..]) {
                it.next();
                steps += 1;
            }
            if it.key().is_none_or(|k| k < &prefix[..]) {
                it.seek(prefix);
            }
            while let (Some(k), Some(v)) = (it.key(), it.value()) {
                if !k.starts_with(&prefix) {
                    break;
                }
                let loc = BlobLocation::decode(v).map_err(|e| self.err(format!("entry for blob {id}: {e}")))?;
                if !damage.at(&loc.pack, id) {
                    return Ok(Some((loc, true)));
                }
                damaged.get_or_insert((loc, false));
                it.next();
            }
            it.status().map_err(|e| self.err(e))?;
        }
        Ok(damaged)
    }

    /// The blobs the loaded index files list in `pack`: what a pack lost or unreadable as a whole held.
    pub fn blobs_in_pack(&self, pack: &ObjectId) -> Result<Vec<BlobId>> {
        let prefix = key(b'p', pack);
        let shared = self.shared();
        let mut blobs = Vec::new();
        for db in std::iter::once(&self.db).chain(shared.as_ref()) {
            for item in scan(db, &prefix) {
                let (k, _) = item.map_err(|e| self.err(e))?;
                let index_id = second_id(&k).ok_or_else(|| self.err("malformed key"))?;
                let listing = db.get(pair_key(b'x', &index_id, pack)).map_err(|e| self.err(e))?.unwrap_or_default();
                if listing.len() % 32 != 0 {
                    return Err(self.err(format!("listing of pack {pack} in index file {index_id}: malformed")));
                }
                blobs.extend(listing.chunks_exact(32).map(|c| BlobId(c.try_into().expect("32 bytes"))));
            }
        }
        blobs.sort();
        blobs.dedup();
        Ok(blobs)
    }

    /// Whether an index file lists this pack.
    pub fn knows_pack(&self, id: &ObjectId) -> Result<bool> {
        let prefix = key(b'p', id);
        let shared = self.shared();
        for db in std::iter::once(&self.db).chain(shared.as_ref()) {
            if let Some(item) = scan(db, &prefix).next() {
                item.map_err(|e| self.err(e))?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The stored blocks that hold pages with these features (see [`crate::delta`]), one per feature found
    /// (this process's entry for a feature before the shared cache's).
    pub fn blocks_with_features(&self, features: &[u64]) -> Result<Vec<BlobId>> {
        let keys: Vec<[u8; 9]> = features.iter().map(|f| feature_key(*f)).collect();
        let mut found = self.db.multi_get(&keys);
        if let Some(shared) = self.shared().as_ref() {
            for (v, below) in found.iter_mut().zip(shared.multi_get(&keys)) {
                if matches!(v, Ok(None)) {
                    *v = below;
                }
            }
        }
        let mut out = Vec::new();
        for v in found {
            if let Some(v) = v.map_err(|e| self.err(e))? {
                let id = <[u8; 32]>::try_from(&v[..]).map_err(|_| self.err("malformed feature entry"))?;
                out.push(BlobId(id));
            }
        }
        Ok(out)
    }

    /// The end of the retention of object `name` (seconds since the epoch) as this host last read it from the
    /// storage or set it ([`crate::object_lock`]); `None` without a record.
    pub fn retention_until(&self, name: &str) -> Result<Option<i64>> {
        let value = self.db.get(retention_key(name)).map_err(|e| self.err(e))?;
        Ok(value.and_then(|v| Some(i64::from_le_bytes(v.as_slice().try_into().ok()?))))
    }

    /// Records the end of the retention of object `name`, read from the storage or just set.
    pub fn record_retention(&self, name: &str, until: i64) -> Result<()> {
        self.db.put(retention_key(name), until.to_le_bytes()).map_err(|e| self.err(e))
    }

    /// Records that block `id` holds pages with these features (the newest block holding a page wins).
    pub fn add_features(&self, id: &BlobId, features: &[u64]) -> Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        for f in features {
            batch.put(feature_key(*f), id.0);
        }
        self.db.write(batch).map_err(|e| self.err(e))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// A throw-away RocksDB database for work that must not hold the whole repository in memory (prune's mark
/// and sweep): keys are a one-byte table tag and a 32-byte id. Created empty, removed on drop.
pub struct ScratchDb {
    db: Option<rocksdb::DB>,
    path: PathBuf,
    _temp: Option<tempdir::TempDir>,
}

impl ScratchDb {
    /// Creates an empty database at `<cache_root>/<repository id>/<name>`, or in a temporary directory if
    /// that is not possible.
    pub fn create(repo: &Repository, cache_root: &Path, name: &str) -> Result<ScratchDb> {
        let path = repository_dir(repo, cache_root).join(name);
        match Self::create_at(&path) {
            Ok(db) => Ok(ScratchDb { db: Some(db), path, _temp: None }),
            Err(e) => {
                tracing::warn!("{}: {e}; using a temporary directory", path.display());
                let tmp = tempdir::TempDir::new()
                    .map_err(|e| Error::Cache { path: std::env::temp_dir(), cause: e.to_string() })?;
                let path = tmp.path().join(name);
                let db = Self::create_at(&path).map_err(|e| Error::Cache { path: path.clone(), cause: e })?;
                Ok(ScratchDb { db: Some(db), path, _temp: Some(tmp) })
            }
        }
    }

    fn create_at(path: &Path) -> std::result::Result<rocksdb::DB, String> {
        if path.exists() {
            rocksdb::DB::destroy(&rocksdb::Options::default(), path).map_err(|e| e.to_string())?;
        }
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        rocksdb::DB::open(&base_options(), path).map_err(|e| e.to_string())
    }

    fn db(&self) -> &rocksdb::DB {
        self.db.as_ref().expect("open until dropped")
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Cache { path: self.path.clone(), cause: e.to_string() }
    }

    /// Writes without RocksDB's write-ahead log: a scratch database is never reopened (a run that stops
    /// leaves it to be destroyed by the next), so the log only wrote everything twice.
    fn write(&self, batch: rocksdb::WriteBatch) -> Result<()> {
        let mut o = rocksdb::WriteOptions::default();
        o.disable_wal(true);
        self.db().write_opt(batch, &o).map_err(|e| self.err(e))
    }

    pub fn put(&self, table: u8, id: &BlobId, value: &[u8]) -> Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        batch.put(key(table, id), value);
        self.write(batch)
    }

    /// Inserts many keys with one write.
    pub fn put_all<'a>(&self, table: u8, items: impl IntoIterator<Item = (&'a BlobId, &'a [u8])>) -> Result<()> {
        self.put_all_keyed(table, items.into_iter().map(|(id, v)| (&id.0[..], v)))
    }

    pub fn get(&self, table: u8, id: &BlobId) -> Result<Option<Vec<u8>>> {
        self.db().get(key(table, id)).map_err(|e| self.err(e))
    }

    pub fn contains(&self, table: u8, id: &BlobId) -> Result<bool> {
        Ok(self.db().get_pinned(key(table, id)).map_err(|e| self.err(e))?.is_some())
    }

    /// Which of `ids` are present, in one batched lookup.
    pub fn contains_many(&self, table: u8, ids: &[BlobId]) -> Result<Vec<bool>> {
        let keys: Vec<[u8; 33]> = ids.iter().map(|id| key(table, id)).collect();
        self.db().multi_get(keys).into_iter().map(|r| r.map(|v| v.is_some()).map_err(|e| self.err(e))).collect()
    }

    /// Inserts many keys of a table whose keys are longer than an id (`table ‖ key`), with one write.
    pub fn put_all_keyed<'a>(&self, table: u8, items: impl IntoIterator<Item = (&'a [u8], &'a [u8])>) -> Result<()> {
        // In key order (stable: of a key given twice the last wins, as in the batch): the memtable's skip list
        // then finds each key's place from the one before instead of from its top.
        let mut items: Vec<(&[u8], &[u8])> = items.into_iter().collect();
        items.sort_by(|a, b| a.0.cmp(b.0));
        let mut batch = rocksdb::WriteBatch::default();
        let mut k = Vec::new();
        for (key, v) in items {
            k.clear();
            k.push(table);
            k.extend_from_slice(key);
            batch.put(&k, v);
        }
        self.write(batch)
    }

    /// Hands every key of `table` that starts with `prefix` (without the table's byte) and its value to `each`,
    /// in ascending key order.
    pub fn for_each_in(
        &self,
        table: u8,
        prefix: &[u8],
        mut each: impl FnMut(&[u8], &[u8]) -> Result<()>,
    ) -> Result<()> {
        let mut start = vec![table];
        start.extend_from_slice(prefix);
        let mut it = self.db().raw_iterator();
        it.seek(&start);
        while let (Some(k), Some(v)) = (it.key(), it.value()) {
            if !k.starts_with(&start) {
                break;
            }
            each(&k[1..], v)?;
            it.next();
        }
        it.status().map_err(|e| self.err(e))
    }

    /// Removes every key of a table.
    pub fn clear_table(&self, table: u8) -> Result<()> {
        let mut batch = rocksdb::WriteBatch::default();
        batch.delete_range([table], [table + 1]);
        self.write(batch)
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        drop(self.db.take());
        if self._temp.is_none() {
            let _ = rocksdb::DB::destroy(&rocksdb::Options::default(), &self.path);
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

impl crate::repository::BlobLocator for IndexCache {
    fn locate(&self, id: &BlobId) -> Result<Option<BlobLocation>> {
        self.lookup(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::damage::DamageRecord;
    use crate::format::index::IndexedPack;
    use crate::format::pack::PackEntry;
    use crate::format::BlobType;

    /// An index file listing `blob` in pack `pack`.
    fn listing(pack: ObjectId, blob: BlobId) -> IndexFile {
        listings(&[(pack, &[blob])])
    }

    /// An index file listing these packs with these blobs.
    fn listings(packs: &[(ObjectId, &[BlobId])]) -> IndexFile {
        let entry = |(i, id): (usize, &BlobId)| PackEntry {
            blob_type: BlobType::Data,
            flags: 0,
            key_epoch: 0,
            offset: 100 * i as u32,
            stored_len: 100,
            raw_len: 1 << 20,
            id: *id,
            base: None,
        };
        let packs = packs
            .iter()
            .map(|(id, blobs)| IndexedPack {
                id: *id,
                pack_type: BlobType::Data,
                entries: blobs.iter().enumerate().map(entry).collect(),
            })
            .collect();
        IndexFile { supersedes: Vec::new(), packs }
    }

    /// A table file of the cache damaged where opening does not look: the lookup that meets it fails naming the
    /// cache, and the next open rebuilds it from the repository instead of failing the same way.
    #[test]
    fn a_cache_found_damaged_mid_run_is_rebuilt_at_the_next_open() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let repo = crate::repository::test_repository(&dir.join("repo"));
        let root = dir.join("cache");
        let blobs: Vec<BlobId> = (0..2000u32)
            .map(|n| {
                let mut id = [0u8; 32];
                id[..4].copy_from_slice(&n.to_be_bytes());
                id[4] = 7;
                BlobId(id)
            })
            .collect();
        repo.save_index(&listings(&[(BlobId([1; 32]), &blobs)])).unwrap();
        let (cache, _) = IndexCache::open(&repo, &root).unwrap();
        let path = cache.path().to_path_buf();
        drop(cache);
        // Overwrite the start of the largest table file: data blocks of blob entries (`v`, read on opening,
        // sorts after them).
        let table = std::fs::read_dir(&path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|x| x == "sst"))
            .max_by_key(|p| std::fs::metadata(p).unwrap().len())
            .unwrap();
        let mut bytes = std::fs::read(&table).unwrap();
        bytes[100..20_000].fill(0x5a);
        std::fs::write(&table, bytes).unwrap();

        let (cache, _) = IndexCache::open(&repo, &root).unwrap();
        let failed = blobs.iter().find_map(|b| cache.lookup(b).err()).expect("a lookup meets the damage");
        assert!(failed.to_string().contains("rebuilt from the repository at the next run"), "{failed}");
        drop(cache);
        let (cache, synced) = IndexCache::open(&repo, &root).unwrap();
        assert_eq!(synced.blobs_added, blobs.len(), "{synced}");
        for b in &blobs {
            assert_eq!(cache.lookup(b).unwrap().unwrap().pack, BlobId([1; 32]));
        }
        assert!(!rebuild_marker(&path).exists());
    }

    /// A cache another layout wrote (an older diskvault on this host) is emptied whole, its own keys too.
    #[test]
    fn a_cache_of_another_layout_is_emptied_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let repo = crate::repository::test_repository(&dir.join("repo"));
        repo.save_index(&listing(BlobId([1; 32]), BlobId([2; 32]))).unwrap();
        let root = dir.join("cache");
        let (cache, _) = IndexCache::open(&repo, &root).unwrap();
        // Layout 3's keys: a blob entry `b` ‖ id, the damage fingerprint `d`.
        cache.db.put(b"v", b"diskvault-index-cache-3").unwrap();
        cache.db.put(key(b'b', &BlobId([2; 32])), [0u8; 80]).unwrap();
        cache.db.put(b"d", [0u8; 32]).unwrap();
        drop(cache);
        let (cache, synced) = IndexCache::open(&repo, &root).unwrap();
        assert_eq!(synced.index_files_loaded, 1, "{synced}");
        for table in [&b"b"[..], b"d"] {
            assert!(scan(&cache.db, table).next().is_none(), "{table:?} left");
        }
        assert_eq!(cache.lookup(&BlobId([2; 32])).unwrap().unwrap().pack, BlobId([1; 32]));
    }

    /// A reader below which the shared cache turns out of date (a prune replaced index files) keeps reading the
    /// shared cache, brought up to date, rather than loading every index file into its private one.
    #[test]
    fn a_reader_keeps_reading_the_shared_cache_across_a_prune() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let repo = crate::repository::test_repository(&dir.join("repo"));
        let root = dir.join("cache");
        let id = |n: u8| BlobId([n; 32]);
        let remove = |index: &ObjectId| repo.backend().delete(&crate::format::names::index(index)).unwrap();
        let a = repo.save_index(&listing(id(101), id(1))).unwrap();
        repo.save_index(&listing(id(102), id(2))).unwrap();
        let reader = IndexCache::open(&repo, &root).unwrap().0.into_reader(&repo).unwrap();
        assert!(reader.shared().is_some());

        // A prune moves blob 1 to pack 103. No other process writes the shared cache: the reader brings it up to
        // date and reads it again, loading nothing itself.
        let a2 = repo.save_index(&listing(id(103), id(1))).unwrap();
        remove(&a);
        let synced = reader.sync(&repo).unwrap();
        assert_eq!((synced.index_files_loaded, synced.index_files_removed), (0, 0), "{synced}");
        assert!(reader.shared().is_some());
        assert_eq!(reader.lookup(&id(1)).unwrap().unwrap().pack, id(103));
        assert_eq!(reader.lookup(&id(2)).unwrap().unwrap().pack, id(102));

        // Another process writes the shared cache: once it has caught up with the next prune, the reader reads
        // the cache again as that process left it.
        let a3 = repo.save_index(&listing(id(104), id(1))).unwrap();
        remove(&a2);
        let (writer, _) = IndexCache::open(&repo, &root).unwrap();
        assert!(writer._temp.is_none(), "the writer holds the shared cache");
        let synced = reader.sync(&repo).unwrap();
        assert_eq!(synced.index_files_loaded, 0, "{synced}");
        assert_eq!(reader.lookup(&id(1)).unwrap().unwrap().pack, id(104));

        // It has not caught up with the one after (it has not synced since): the reader stops reading it and
        // loads every index file itself, never answering from the out-of-date cache.
        repo.save_index(&listing(id(105), id(1))).unwrap();
        remove(&a3);
        let synced = reader.sync(&repo).unwrap();
        assert!(reader.shared().is_none());
        assert_eq!(synced.index_files_loaded, 2, "{synced}");
        assert_eq!(reader.lookup(&id(1)).unwrap().unwrap().pack, id(105));
        assert_eq!(reader.lookup(&id(2)).unwrap().unwrap().pack, id(102));
    }

    /// A scratch write puts its keys in sorted order; of a key given twice, the value given last still wins.
    #[test]
    fn a_scratch_write_keeps_the_last_value_of_a_key_given_twice() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("scratch");
        let scratch = ScratchDb { db: Some(ScratchDb::create_at(&path).unwrap()), path, _temp: None };
        let (k0, k1) = ([0u8; 4], [1u8; 4]);
        scratch.put_all_keyed(b'x', [(&k1[..], &b"z"[..]), (&k0[..], &b"0"[..]), (&k1[..], &b"a"[..])]).unwrap();
        let mut seen = Vec::new();
        scratch
            .for_each_in(b'x', &[], |k, v| {
                seen.push((k.to_vec(), v.to_vec()));
                Ok(())
            })
            .unwrap();
        assert_eq!(seen, [(k0.to_vec(), b"0".to_vec()), (k1.to_vec(), b"a".to_vec())]);
    }

    /// After each way a prune replaces index files, the cache that caught up answers as one built from
    /// scratch, with no rebuild.
    #[test]
    fn catching_up_with_replaced_index_files_answers_as_a_rebuild_does() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let repo = crate::repository::test_repository(&dir.join("repo"));
        let id = |n: u8| BlobId([n; 32]);
        let (p1, p2, p3, p4, p5) = (id(101), id(102), id(103), id(104), id(105));
        let blobs: Vec<BlobId> = (1..=9).map(id).collect();
        let packs = [p1, p2, p3, p4, p5];
        let remove = |index: &ObjectId| repo.backend().delete(&crate::format::names::index(index)).unwrap();
        let a = repo.save_index(&listings(&[(p1, &blobs[0..3]), (p2, &blobs[3..5])])).unwrap();
        let b = repo.save_index(&listings(&[(p3, &blobs[5..7])])).unwrap();
        let (cache, _) = IndexCache::open(&repo, &dir.join("cache")).unwrap();
        let mut step = 0;
        let mut same_as_rebuilt = |cache: &IndexCache, removed: usize| {
            step += 1;
            let stats = cache.sync(&repo).unwrap();
            assert_eq!((stats.rebuilt, stats.index_files_removed), (false, removed), "step {step}");
            let (fresh, _) = IndexCache::open(&repo, &dir.join(format!("fresh-{step}"))).unwrap();
            for blob in &blobs {
                assert_eq!(cache.lookup(blob).unwrap(), fresh.lookup(blob).unwrap(), "step {step}, blob {blob}");
            }
            for pack in &packs {
                assert_eq!(cache.knows_pack(pack).unwrap(), fresh.knows_pack(pack).unwrap(), "step {step}, {pack}");
            }
        };
        // A prune drops pack p2 and repacks blob 1 of p1 into p4 (blobs 2 and 3 are unused).
        let a2 = repo.save_index(&listings(&[(p4, &blobs[0..1])])).unwrap();
        remove(&a);
        same_as_rebuilt(&cache, 1);
        assert_eq!(cache.lookup(&blobs[0]).unwrap().unwrap().pack, p4);
        assert!(cache.lookup(&blobs[1]).unwrap().is_none() && !cache.knows_pack(&p2).unwrap());
        // Compaction: two files merged into one listing the same packs.
        let merged = repo.save_index(&listings(&[(p3, &blobs[5..7]), (p4, &blobs[0..1])])).unwrap();
        remove(&a2);
        remove(&b);
        same_as_rebuilt(&cache, 2);
        assert!(cache.lookup(&blobs[5]).unwrap().is_some());
        // An interrupted prune: a second file lists p3 too; the first goes, p3 stays listed.
        let again = repo.save_index(&listings(&[(p3, &blobs[5..7])])).unwrap();
        same_as_rebuilt(&cache, 0);
        remove(&merged);
        same_as_rebuilt(&cache, 1);
        assert!(cache.knows_pack(&p3).unwrap() && cache.lookup(&blobs[6]).unwrap().is_some());
        assert!(cache.lookup(&blobs[0]).unwrap().is_none(), "p4 is listed by no file left");
        // Two copies of blob 8 (p5 and p1): whichever file goes, the other copy is found.
        let c = repo.save_index(&listings(&[(p5, &blobs[7..8])])).unwrap();
        let d = repo.save_index(&listings(&[(p1, &blobs[7..9])])).unwrap();
        same_as_rebuilt(&cache, 0);
        let listed = cache.lookup(&blobs[7]).unwrap().unwrap().pack;
        let (named, other) = if listed == p5 { (c, d) } else { (d, c) };
        remove(&named);
        same_as_rebuilt(&cache, 1);
        assert!(cache.lookup(&blobs[7]).unwrap().is_some_and(|loc| loc.pack != listed));
        // The file of the copy that lookups do not name goes: they name the same copy as before.
        let e = repo.save_index(&listings(&[(p2, &blobs[7..8])])).unwrap();
        same_as_rebuilt(&cache, 0);
        let listed = cache.lookup(&blobs[7]).unwrap().unwrap().pack;
        remove(if listed == p2 { &other } else { &e });
        same_as_rebuilt(&cache, 1);
        assert_eq!(cache.lookup(&blobs[7]).unwrap().unwrap().pack, listed);
        remove(&again);
    }

    #[test]
    fn lookups_in_id_order_answer_as_single_lookups() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let repo = crate::repository::test_repository(&dir.join("repo"));
        let blob = |i: u32| BlobId(*blake3::hash(&i.to_le_bytes()).as_bytes());
        // 3000 blobs in 30 packs, the first 200 also in a second pack.
        let all: Vec<BlobId> = (0..3000).map(blob).collect();
        let packs: Vec<(ObjectId, Vec<BlobId>)> =
            all.chunks(100).enumerate().map(|(i, c)| (BlobId([i as u8 + 1; 32]), c.to_vec())).collect();
        let again = BlobId([0xee; 32]);
        for (pack, blobs) in packs.iter().chain([&(again, all[..200].to_vec())]) {
            repo.save_index(&listings(&[(*pack, blobs)])).unwrap();
        }
        // The first copies of every other one of them damaged: their second copies are the ones listed.
        let first_pack = |i: usize| packs[i / 100].0;
        let mut damaged: Vec<(ObjectId, BlobId)> = (0..200).step_by(2).map(|i| (first_pack(i), all[i])).collect();
        // And one blob's only copy.
        damaged.push((first_pack(1000), all[1000]));
        repo.save_damage(&DamageRecord { entries: KnownDamage::new(damaged).sorted() }).unwrap();
        let (cache, _) = IndexCache::open(&repo, &dir.join("cache")).unwrap();
        // Every blob (the iterator steps forward), every 50th (it seeks), and ids no index lists among them.
        let mut every: Vec<BlobId> = all.iter().copied().chain((5000..5100).map(blob)).collect();
        every.sort();
        let sparse: Vec<BlobId> = every.iter().step_by(50).copied().collect();
        let in_order = |ids: &[BlobId]| {
            let mut answers = Vec::new();
            cache.lookup_sorted(ids, |id, loc| answers.push((*id, loc.map(|(l, intact)| (l.pack, intact))))).unwrap();
            let single: Vec<_> = ids
                .iter()
                .map(|id| {
                    let intact = cache.lookup_intact(id).unwrap().is_some();
                    (*id, cache.lookup(id).unwrap().map(|l| (l.pack, intact)))
                })
                .collect();
            assert_eq!(answers, single);
            answers
        };
        in_order(&sparse);
        let answers = in_order(&every);
        assert_eq!(answers.iter().filter(|(_, p)| p.is_none()).count(), 100);
        assert_eq!(answers.iter().filter(|(_, p)| p == &Some((again, true))).count(), 100);
        assert_eq!(answers.iter().filter(|(_, p)| p.is_some_and(|(_, intact)| !intact)).count(), 1);
    }

    #[test]
    fn a_copy_known_damaged_is_never_the_one_listed_nor_deduplicated_against() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let repo = crate::repository::test_repository(&dir.join("repo"));
        let blob = BlobId([9; 32]);
        let (p, q) = (BlobId([1; 32]), BlobId([2; 32]));
        repo.save_index(&listing(p, blob)).unwrap();
        repo.save_index(&listing(q, blob)).unwrap();
        // Whichever copy is damaged, and whichever index file loads first, the other copy is the one listed.
        for (damaged, intact) in [(p, q), (q, p)] {
            let record = repo.save_damage(&DamageRecord { entries: vec![(damaged, blob)] }).unwrap();
            let (cache, _) = IndexCache::open(&repo, &dir.join(format!("cache-{}", damaged.short()))).unwrap();
            assert_eq!(cache.lookup(&blob).unwrap().unwrap().pack, intact);
            assert!(cache.contains(&blob).unwrap());
            repo.backend().delete(&crate::format::names::damaged(&record)).unwrap();
        }
        // A cache opened before the damage was recorded turns to the other copy once it syncs, with no rebuild.
        let (cache, _) = IndexCache::open(&repo, &dir.join("cache-before")).unwrap();
        let listed = cache.lookup(&blob).unwrap().unwrap().pack;
        let other = if listed == p { q } else { p };
        repo.save_damage(&DamageRecord { entries: vec![(listed, blob)] }).unwrap();
        assert!(!cache.sync(&repo).unwrap().changed());
        assert_eq!(cache.lookup(&blob).unwrap().unwrap().pack, other);
        // With every copy damaged, the blob is listed (a restore names the damage) but not deduplicated against.
        repo.save_damage(&DamageRecord { entries: vec![(other, blob)] }).unwrap();
        cache.sync(&repo).unwrap();
        assert!(cache.lookup(&blob).unwrap().is_some());
        assert!(!cache.contains(&blob).unwrap() && cache.lookup_intact(&blob).unwrap().is_none());
    }
}
