//! An open repository: a backend, the keys unwrapped from a key file, and the config. Reads and writes whole
//! objects (packs, index files, snapshots, keys) and single blobs, turning format errors into [`Error`]s that
//! name the object.

use std::sync::Arc;

use rayon::prelude::*;

use crate::backend::Backend;
use crate::crypto::{self, KeyEpoch, Keys};
use crate::error::{Error, Result};
use crate::format::checkpoint::Checkpoint;
use crate::format::config::Config;
use crate::format::damage::DamageRecord;
use crate::format::deletion::DeletionRecord;
use crate::format::envelope::{self, HeaderError, Kind};
use crate::format::index::{BlobLocation, IndexFile, IndexedPack};
use crate::format::keyfile::{KdfParams, KeyError, KeyFile};
use crate::format::pack::{self, FinishedPack, PackEntry, PackHeader};
use crate::format::recovery_key::RecoveryKey;
use crate::format::snapshot::Snapshot;
use crate::format::verified::VerificationRecord;
use crate::format::{names, BlobId, ObjectId, BLOCK_SIZE, FORMAT_VERSION};
use crate::util::AlignedBuf;

/// Options for `init`.
#[derive(Clone, Debug)]
pub struct InitOptions {
    pub pack_target_size: u32,
    pub zstd_level: i32,
    pub kdf: KdfParams,
}

/// Finds where a blob is stored: the local index cache, or check's in-memory index.
pub trait BlobLocator: Sync {
    fn locate(&self, id: &BlobId) -> Result<Option<BlobLocation>>;
}

/// For reads of blobs that are never deltas (manifest segments).
pub struct NoDeltas;

impl BlobLocator for NoDeltas {
    fn locate(&self, _: &BlobId) -> Result<Option<BlobLocation>> {
        Ok(None)
    }
}

impl Default for InitOptions {
    fn default() -> Self {
        InitOptions { pack_target_size: 16 << 20, zstd_level: 3, kdf: KdfParams::DEFAULT }
    }
}

/// Which snapshots a command considers, as restic's filters: of this source, of any of these hosts, and
/// carrying every tag of at least one of these tag sets. Empty parts select everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotFilter {
    pub source: Option<String>,
    pub hosts: Vec<String>,
    pub tag_sets: Vec<Vec<String>>,
}

impl SnapshotFilter {
    pub fn matches(&self, s: &Snapshot) -> bool {
        self.source.as_ref().is_none_or(|src| s.source == *src)
            && (self.hosts.is_empty() || self.hosts.contains(&s.hostname))
            && (self.tag_sets.is_empty() || self.tag_sets.iter().any(|set| set.iter().all(|t| s.tags.contains(t))))
    }
}

pub struct Repository {
    backend: Arc<dyn Backend>,
    keys: Keys,
    config: Config,
    /// The key file this session was opened with.
    key_id: ObjectId,
    /// The master secrets, epoch 0 first (one until the first `key rotate`).
    keyring: Vec<[u8; 32]>,
}

/// The error of a blob that does not open: the pack, the blob and the cause.
fn blob_error(pack_name: &str, loc: &BlobLocation, cause: String) -> Error {
    let e = &loc.entry;
    Error::corrupt(pack_name, format!("{} blob {} at offset {}: {cause}", e.blob_type.name(), e.id, e.offset))
}

fn map_header_err(object: &str, e: HeaderError) -> Error {
    match e {
        HeaderError::Version(found) => {
            Error::UnsupportedVersion { object: object.into(), found, supported: FORMAT_VERSION }
        }
        HeaderError::Other(cause) => Error::corrupt(object, cause),
    }
}

/// Reads a whole file object and checks that its bytes hash to its name.
fn get_verified(backend: &dyn Backend, name: &str, id: &ObjectId) -> Result<Vec<u8>> {
    let bytes = backend.get(name)?;
    if BlobId::of_file(&bytes) != *id {
        return Err(Error::corrupt(name, "content does not match its name (damaged or truncated)"));
    }
    Ok(bytes)
}

/// How much of a pack's end [`Repository::read_pack_header`] reads at once: its trailer and, in one request, the
/// header of a pack listing up to ~340 blobs (a 16 MiB data pack of compressible blocks lists a few dozen).
const PACK_TAIL_READ: u64 = 16 << 10;

impl Repository {
    /// Creates a new repository: config and the first key.
    pub fn init(backend: Arc<dyn Backend>, password: &[u8], opts: &InitOptions) -> Result<Repository> {
        backend.create_container()?;
        if backend.size(names::CONFIG)?.is_some() {
            return Err(Error::RepositoryExists(backend.location()));
        }
        let config = Config {
            id: crypto::random_array(),
            created_secs: crate::util::now_secs(),
            block_size: BLOCK_SIZE,
            pack_target_size: opts.pack_target_size,
            zstd_level: opts.zstd_level,
        };
        config.validate().map_err(Error::invalid)?;
        let keyring = vec![crypto::random_array()];
        let keys = Keys::from_keyring(&keyring);
        let key_id = write_key(&*backend, &keyring, password, opts.kdf)?;
        let sealed = envelope::seal(&keys, Kind::Config, &config.encode());
        // The config is written last and only if absent: it is what makes the directory a repository.
        if !backend.create_new(names::CONFIG, &sealed)? {
            backend.delete(&names::key(&key_id))?;
            return Err(Error::RepositoryExists(backend.location()));
        }
        Ok(Repository { backend, keys, config, key_id, keyring })
    }

    /// Opens a repository with a password, trying every key file.
    pub fn open(backend: Arc<dyn Backend>, password: &[u8]) -> Result<Repository> {
        let config_bytes = match backend.get(names::CONFIG) {
            Ok(b) => b,
            Err(Error::Missing { .. }) => return Err(Error::NoRepository(backend.location())),
            Err(e) => return Err(e),
        };
        envelope::check_header(&config_bytes, Kind::Config).map_err(|e| map_header_err(names::CONFIG, e))?;
        let mut key_names = backend.list(names::KEYS)?;
        key_names.sort_by(|a, b| a.name.cmp(&b.name));
        if key_names.is_empty() {
            return Err(Error::corrupt(names::KEYS, "the repository has no key files"));
        }
        let mut first_damage = None;
        // A key file that opens with this password but predates a key rotation.
        let mut revoked = None;
        let config_epoch = envelope::epoch_of(&config_bytes);
        for info in &key_names {
            let Some(id) = info.name.rsplit('/').next().and_then(BlobId::from_hex) else { continue };
            let kf = match get_verified(&*backend, &info.name, &id)
                .and_then(|b| KeyFile::decode(&b).map_err(|e| key_err(&info.name, e)))
            {
                Ok(kf) => kf,
                Err(e) => {
                    tracing::warn!("skipping key file: {e}");
                    first_damage.get_or_insert(e);
                    continue;
                }
            };
            match kf.unwrap_keyring(password) {
                Ok(keyring) if keyring.len() <= config_epoch as usize => {
                    revoked.get_or_insert((info.name.clone(), keyring.len() - 1));
                }
                Ok(mut keyring) => {
                    // Secrets beyond the config's epoch are a rotation that stopped before it sealed the config:
                    // unused (nothing may be sealed with a secret that older key files do not hold).
                    keyring.truncate(config_epoch as usize + 1);
                    let keys = Keys::from_keyring(&keyring);
                    let plain = envelope::open(&keys, Kind::Config, &config_bytes)
                        .map_err(|e| map_header_err(names::CONFIG, e))?;
                    let config = Config::decode(&plain).map_err(|e| Error::corrupt(names::CONFIG, e))?;
                    return Ok(Repository { backend, keys, config, key_id: id, keyring });
                }
                Err(KeyError::WrongPassword) => continue,
                Err(e) => {
                    let e = key_err(&info.name, e);
                    tracing::warn!("skipping key file: {e}");
                    first_damage.get_or_insert(e);
                }
            }
        }
        if let Some((name, epoch)) = revoked {
            return Err(Error::invalid(format!(
                "this password opens {name}, a key file from before a key rotation (it holds key epochs up to \
                 {epoch}, the repository is at epoch {config_epoch}): it was revoked and opens nothing any more"
            )));
        }
        // If some key file was unreadable the password may belong to it: say so rather than "wrong password".
        match first_damage {
            Some(e) => Err(Error::invalid(format!("no readable key file accepts this password ({e})"))),
            None => Err(Error::WrongPassword),
        }
    }

    /// Opens a repository with its recovery key instead of a password (every key file lost, damaged or
    /// forgotten) and adds a key file for `password`, which opens it from then on.
    pub fn recover(
        backend: Arc<dyn Backend>,
        recovery: &RecoveryKey,
        password: &[u8],
        kdf: KdfParams,
    ) -> Result<Repository> {
        let config_bytes = match backend.get(names::CONFIG) {
            Ok(b) => b,
            Err(Error::Missing { .. }) => return Err(Error::NoRepository(backend.location())),
            Err(e) => return Err(e),
        };
        envelope::check_header(&config_bytes, Kind::Config).map_err(|e| map_header_err(names::CONFIG, e))?;
        let config_epoch = envelope::epoch_of(&config_bytes);
        if recovery.secrets.len() <= config_epoch as usize {
            return Err(Error::invalid(format!(
                "the recovery key is from before a key rotation (it holds key epochs up to {}, the repository is at \
                 epoch {config_epoch}): it was revoked with the rotation; `key export` with a current password gives \
                 the current one",
                recovery.secrets.len() - 1
            )));
        }
        let keyring = recovery.secrets[..=config_epoch as usize].to_vec();
        let keys = Keys::from_keyring(&keyring);
        let plain = envelope::open(&keys, Kind::Config, &config_bytes).map_err(|e| match e {
            HeaderError::Other(cause) => Error::invalid(format!(
                "the recovery key (of repository {}) does not open this repository's config: {cause} (a key of \
                 another repository, or a damaged config)",
                hex::encode(recovery.repository)
            )),
            e => map_header_err(names::CONFIG, e),
        })?;
        let config = Config::decode(&plain).map_err(|e| Error::corrupt(names::CONFIG, e))?;
        if config.id != recovery.repository {
            // The secret opened the config, so it is this repository's (a copy made with the same secret, or an
            // edited first line): go on, but say so.
            tracing::warn!(
                "the recovery key names repository {}, this one is {}; its secret opens it",
                hex::encode(recovery.repository),
                hex::encode(config.id)
            );
        }
        let key_id = write_key(&*backend, &keyring, password, kdf)?;
        Ok(Repository { backend, keys, config, key_id, keyring })
    }

    /// The recovery key: the keyring as text (`format::recovery_key`). Whoever holds it can read and write the
    /// repository, whatever its key files and passwords, until the next key rotation.
    pub fn recovery_key(&self) -> RecoveryKey {
        RecoveryKey { repository: self.config.id, secrets: self.keyring.clone() }
    }

    pub fn backend(&self) -> &Arc<dyn Backend> {
        &self.backend
    }
    pub fn keys(&self) -> &Keys {
        &self.keys
    }
    pub fn config(&self) -> &Config {
        &self.config
    }
    pub fn key_id(&self) -> ObjectId {
        self.key_id
    }

    // ---- keys ----

    pub fn add_key(&self, password: &[u8], kdf: KdfParams) -> Result<ObjectId> {
        write_key(&*self.backend, &self.keyring, password, kdf)
    }

    /// Rotates the repository key: a new master secret (key epoch) that only a key file for `password` holds,
    /// with which everything written from now on is sealed; the config is sealed again with it, so that every
    /// older key file and recovery key stops opening the repository, and every other key file is removed.
    /// Data written before stays readable (the keyring keeps the older secrets) and deduplicates as before (ids
    /// come from epoch 0). Returns the new key file and the removed ones.
    ///
    /// Crash-safe in this order: the new key file first (opens the repository before and after), then the
    /// config (from then on only the new key file opens it), then the other key files (revoked already: one
    /// that cannot be deleted is left with a warning).
    pub fn rotate_key(&mut self, password: &[u8], kdf: KdfParams) -> Result<(ObjectId, Vec<ObjectId>)> {
        if self.keyring.len() >= crypto::MAX_EPOCHS {
            return Err(Error::invalid(format!(
                "the keyring holds {} epochs, the most there can be",
                self.keyring.len()
            )));
        }
        // One rotation at a time, from the newest keyring: a second client that opened the repository before a
        // rotation would otherwise seal the config with a secret of its own and delete the key file of the
        // first, and what was written in between with the first's secret would be lost with it.
        let _lock = crate::lock::acquire_exclusive(self, "key rotate")?;
        let config = self.backend.get(names::CONFIG)?;
        let config_epoch = envelope::epoch_of(&config);
        if config_epoch != self.keys.current_epoch() || envelope::open(&self.keys, Kind::Config, &config).is_err() {
            return Err(Error::invalid(format!(
                "the repository key was rotated since this command opened it (the config is sealed with key epoch \
                 {config_epoch}, this key's newest is {}): run it again with a current password",
                self.keys.current_epoch()
            )));
        }
        let mut keyring = self.keyring.clone();
        keyring.push(crypto::random_array());
        let keys = Keys::from_keyring(&keyring);
        let new_key = write_key(&*self.backend, &keyring, password, kdf)?;
        self.backend.put(names::CONFIG, &envelope::seal(&keys, Kind::Config, &self.config.encode()))?;
        (self.keys, self.keyring, self.key_id) = (keys, keyring, new_key);
        // The rotation has taken effect: older key files open nothing now, so one that cannot be deleted is only
        // left behind (with a warning), not a failure of the rotation.
        let mut removed = Vec::new();
        let others = match self.backend.list(names::KEYS) {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!("the key was rotated, but the older key files were not listed to remove them: {e}");
                return Ok((new_key, removed));
            }
        };
        for info in others {
            let Some(id) = info.name.rsplit('/').next().and_then(BlobId::from_hex) else { continue };
            if id == new_key {
                continue;
            }
            match self.backend.delete(&info.name) {
                Ok(()) => removed.push(id),
                Err(e) => {
                    tracing::warn!("could not remove {} (revoked all the same, it opens nothing): {e}", info.name)
                }
            }
        }
        Ok((new_key, removed))
    }

    pub fn list_keys(&self) -> Result<Vec<(ObjectId, Result<KeyFile>)>> {
        let mut out = Vec::new();
        for info in self.backend.list(names::KEYS)? {
            let Some(id) = info.name.rsplit('/').next().and_then(BlobId::from_hex) else { continue };
            let kf = get_verified(&*self.backend, &info.name, &id)
                .and_then(|b| KeyFile::decode(&b).map_err(|e| key_err(&info.name, e)));
            out.push((id, kf));
        }
        out.sort_by_key(|(_, k)| k.as_ref().map(|k| k.created_secs).unwrap_or(0));
        Ok(out)
    }

    /// Removes a key file. The key that opened this session cannot be removed (use `passwd`).
    pub fn remove_key(&self, id: &ObjectId) -> Result<()> {
        if *id == self.key_id {
            return Err(Error::invalid("refusing to remove the key this session was opened with"));
        }
        let name = names::key(id);
        if self.backend.size(&name)?.is_none() {
            return Err(Error::Missing { object: name });
        }
        self.backend.delete(&name)
    }

    /// Replaces the current key with one for a new password.
    pub fn change_password(&mut self, password: &[u8], kdf: KdfParams) -> Result<ObjectId> {
        let new_id = self.add_key(password, kdf)?;
        self.backend.delete(&names::key(&self.key_id))?;
        self.key_id = new_id;
        Ok(new_id)
    }

    // ---- packs and blobs ----

    /// Stores a finished pack (its bytes go to the backend without a copy) and returns what an index file lists
    /// for it.
    pub fn save_pack(&self, pack: FinishedPack) -> Result<IndexedPack> {
        self.save_pack_keeping_buffer(pack).map(|(indexed, _)| indexed)
    }

    /// [`Repository::save_pack`], handing back the pack's buffer where the backend did not keep it, for the next
    /// pack ([`PackWriter::with_buffer`](crate::format::pack::PackWriter::with_buffer)).
    pub fn save_pack_keeping_buffer(&self, pack: FinishedPack) -> Result<(IndexedPack, Option<Vec<u8>>)> {
        let FinishedPack { id, bytes, header } = pack;
        let buffer = self.backend.put_owned(&names::pack(&id), bytes)?;
        Ok((IndexedPack { id, pack_type: header.pack_type, entries: header.entries }, buffer))
    }

    /// Reads one blob and returns its authenticated, id-checked plaintext; a delta blob's base is found with
    /// `locator` and read first.
    pub fn read_blob(&self, loc: &BlobLocation, locator: &dyn BlobLocator) -> Result<Vec<u8>> {
        let base = self.read_base(&loc.entry, locator)?;
        let name = names::pack(&loc.pack);
        let stored = self.backend.get_range(&name, loc.entry.offset as u64, loc.entry.stored_len as u64)?;
        pack::open_blob(&self.keys, &loc.entry, &stored, base.as_deref()).map_err(|cause| blob_error(&name, loc, cause))
    }

    /// [`Repository::read_blob`] into buffers the caller reuses from blob to blob: `stored` receives the blob as
    /// stored (decrypted in place), `plain` its plaintext.
    pub fn read_blob_into(
        &self,
        loc: &BlobLocation,
        locator: &dyn BlobLocator,
        stored: &mut Vec<u8>,
        plain: &mut AlignedBuf,
    ) -> Result<()> {
        let base = self.read_base(&loc.entry, locator)?;
        let name = names::pack(&loc.pack);
        self.backend.get_range_into(&name, loc.entry.offset as u64, loc.entry.stored_len as u64, stored)?;
        pack::open_blob_in_place(&self.keys, &loc.entry, stored, plain, base.as_deref())
            .map(|_| ())
            .map_err(|cause| blob_error(&name, loc, cause))
    }

    /// The plaintext of the base of `entry` if it is a delta blob (`None` otherwise). The base must be an indexed
    /// data blob that is not a delta itself.
    pub fn read_base(&self, entry: &PackEntry, locator: &dyn BlobLocator) -> Result<Option<Vec<u8>>> {
        let Some(base) = entry.base else { return Ok(None) };
        let object = || format!("blob {}", entry.id);
        let loc = locator
            .locate(&base)?
            .ok_or_else(|| Error::corrupt(object(), format!("its delta base {base} is in no index file")))?;
        if !loc.entry.can_be_base() {
            return Err(Error::corrupt(object(), format!("its delta base {base} is not a plain data blob")));
        }
        self.read_blob(&loc, locator).map(Some)
    }

    /// Reads and decrypts a pack's header: one ranged read of the pack's end, a second only for a header
    /// beyond it.
    pub fn read_pack_header(&self, id: &ObjectId, size: u64) -> Result<PackHeader> {
        let name = names::pack(id);
        let tl = pack::TRAILER_LEN as u64;
        if size < tl {
            return Err(Error::corrupt(&name, format!("truncated: {size} bytes")));
        }
        // The pack's tail, in the hope that it holds the header too (a pack of 16 MiB holds a header of a few
        // KiB): one request instead of two, for the checks and repairs that read every pack's header.
        let tail_len = size.min(PACK_TAIL_READ);
        let tail_start = size - tail_len;
        let tail = self.backend.get_range(&name, tail_start, tail_len)?;
        if tail.len() as u64 != tail_len {
            return Err(Error::corrupt(&name, format!("truncated: fewer than the {size} bytes listed")));
        }
        let t = pack::parse_trailer(&tail[(tail_len - tl) as usize..], size).map_err(|e| Error::corrupt(&name, e))?;
        let sealed = match t.header_start.checked_sub(tail_start) {
            Some(at) => std::borrow::Cow::Borrowed(&tail[at as usize..at as usize + t.header_len as usize]),
            None => std::borrow::Cow::Owned(self.backend.get_range(&name, t.header_start, t.header_len as u64)?),
        };
        pack::open_header(&self.keys, &sealed, &t).map_err(|e| Error::corrupt(&name, e))
    }

    // ---- content-named encrypted objects (index files, snapshots, verification records) ----

    /// Seals `payload` in the envelope, stores it under `name_of(id)` with id = hash of the bytes.
    fn save_sealed(
        &self,
        kind: Kind,
        version: u8,
        name_of: fn(&ObjectId) -> String,
        payload: &[u8],
    ) -> Result<ObjectId> {
        let bytes = envelope::seal_versioned(&self.keys, kind, version, payload);
        let id = BlobId::of_file(&bytes);
        self.backend.put(&name_of(&id), &bytes)?;
        Ok(id)
    }

    /// Reads, hash-checks and opens a sealed object, then decodes its payload; errors name the object.
    fn load_sealed<T>(
        &self,
        kind: Kind,
        name_of: fn(&ObjectId) -> String,
        id: &ObjectId,
        decode: impl FnOnce(&[u8]) -> std::result::Result<T, String>,
    ) -> Result<T> {
        self.load_sealed_with_header(kind, name_of, id, |plain, _| decode(plain)).map(|(t, _)| t)
    }

    /// [`Repository::load_sealed`], also returning the key epoch that sealed the object; `decode` is also given
    /// the object header (format version, key epoch).
    fn load_sealed_with_header<T>(
        &self,
        kind: Kind,
        name_of: fn(&ObjectId) -> String,
        id: &ObjectId,
        decode: impl FnOnce(&[u8], &[u8]) -> std::result::Result<T, String>,
    ) -> Result<(T, KeyEpoch)> {
        let name = name_of(id);
        let bytes = get_verified(&*self.backend, &name, id)?;
        let plain = envelope::open(&self.keys, kind, &bytes).map_err(|e| map_header_err(&name, e))?;
        let header = &bytes[..envelope::HEADER_LEN];
        Ok((decode(&plain, header).map_err(|e| Error::corrupt(&name, e))?, envelope::epoch_of(header)))
    }

    // ---- index files ----

    pub fn save_index(&self, index: &IndexFile) -> Result<ObjectId> {
        self.save_sealed(Kind::Index, index.version(), names::index, &index.encode())
    }

    pub fn load_index(&self, id: &ObjectId) -> Result<IndexFile> {
        self.load_index_with_epoch(id).map(|(f, _)| f)
    }

    /// An index file and the key epoch that sealed it (prune re-seals older ones with `--reencrypt`).
    /// An index file listing what its format version does not have (delta blobs in version 1, key epochs
    /// before version 3) is refused, as a pack is (format-spec §10).
    pub fn load_index_with_epoch(&self, id: &ObjectId) -> Result<(IndexFile, KeyEpoch)> {
        self.load_sealed_with_header(Kind::Index, names::index, id, |plain, header| {
            let file = IndexFile::decode(plain)?;
            if header[5] < file.version() {
                return Err(format!(
                    "format version {} index file lists blobs of version {} (delta blobs or key epochs)",
                    header[5],
                    file.version()
                ));
            }
            Ok(file)
        })
    }

    pub fn list_index_ids(&self) -> Result<Vec<ObjectId>> {
        list_ids(&*self.backend, names::INDEX)
    }

    /// The index files with their stored sizes, sorted by id.
    pub fn list_index_files(&self) -> Result<Vec<(ObjectId, u64)>> {
        list_ids_with_sizes(&*self.backend, names::INDEX)
    }

    // ---- verification records ----

    pub fn save_verification(&self, rec: &VerificationRecord) -> Result<ObjectId> {
        self.save_sealed(Kind::Verification, 1, names::verified, &rec.encode())
    }

    pub fn load_verification(&self, id: &ObjectId) -> Result<VerificationRecord> {
        self.load_sealed(Kind::Verification, names::verified, id, VerificationRecord::decode)
    }

    // ---- damage records (check) ----

    pub fn save_damage(&self, rec: &DamageRecord) -> Result<ObjectId> {
        self.save_sealed(Kind::Damage, 1, names::damaged, &rec.encode())
    }

    pub fn load_damage(&self, id: &ObjectId) -> Result<DamageRecord> {
        self.load_sealed(Kind::Damage, names::damaged, id, DamageRecord::decode)
    }

    // ---- deletion records (prune) ----

    pub fn save_deletion(&self, rec: &DeletionRecord) -> Result<ObjectId> {
        self.save_sealed(Kind::Deletion, 1, names::deletion, &rec.encode())
    }

    pub fn load_deletion(&self, id: &ObjectId) -> Result<DeletionRecord> {
        self.load_sealed(Kind::Deletion, names::deletion, id, DeletionRecord::decode)
    }

    /// Every deletion record that can be read; one that cannot is left out with a warning
    /// ([`Repository::list_deletions_checked`]).
    pub fn list_deletions(&self) -> Result<Vec<(ObjectId, DeletionRecord)>> {
        let (records, unreadable) = self.list_deletions_checked()?;
        for (_, e) in unreadable {
            tracing::warn!("{e}; left out (the next prune sets it aside and sweeps its packs again)");
        }
        Ok(records)
    }

    /// The deletion records, and apart from them those that cannot be read ([`is_unreadable_object`]). Leaving
    /// one out is safe: the packs it names are no longer in the index, so they count as unindexed and are
    /// adopted (indexed again) rather than deleted, then swept again by the next prune.
    pub fn list_deletions_checked(&self) -> Result<Checked<DeletionRecord>> {
        let (mut records, mut unreadable) = (Vec::new(), Vec::new());
        for id in list_ids(&*self.backend, names::DELETIONS)? {
            match self.load_deletion(&id) {
                Ok(rec) => records.push((id, rec)),
                // Listed a moment ago and gone now: a prune finished it (its packs are deleted or indexed again).
                Err(Error::Missing { .. }) => {}
                Err(e) if is_unreadable_object(&e) => unreadable.push((id, e)),
                Err(e) => return Err(e),
            }
        }
        Ok((records, unreadable))
    }

    /// Packs that a prune has scheduled for deletion (sorted): not to be indexed again by adoption or repair.
    pub fn doomed_packs(&self) -> Result<Vec<ObjectId>> {
        Ok(doomed_packs_of(self.list_deletions()?))
    }

    // ---- checkpoints of running VMware backups ----

    pub fn save_checkpoint(&self, c: &Checkpoint) -> Result<ObjectId> {
        self.save_sealed(Kind::Checkpoint, 1, names::checkpoint, &c.encode())
    }

    pub fn load_checkpoint(&self, id: &ObjectId) -> Result<Checkpoint> {
        self.load_sealed(Kind::Checkpoint, names::checkpoint, id, Checkpoint::decode)
    }

    /// The checkpoints of interrupted backups (of one source, or all), oldest first. A checkpoint is only a
    /// shortcut: one that cannot be read is skipped with a warning (a backup then reads what it covered).
    pub fn list_checkpoints(&self, source: Option<&str>) -> Result<Vec<(ObjectId, Checkpoint)>> {
        let mut out = Vec::new();
        for id in list_ids(&*self.backend, names::CHECKPOINTS)? {
            match self.load_checkpoint(&id) {
                Ok(c) if source.is_none_or(|s| c.source == s) => out.push((id, c)),
                Ok(_) | Err(Error::Missing { .. }) => {}
                Err(e) => tracing::warn!("ignoring checkpoint {}: {e}", id.short()),
            }
        }
        // A backup's checkpoints share its start time and each covers more than the last; a backup stopped
        // between writing one and deleting the previous leaves both, and the one to continue is the fuller.
        out.sort_by_key(|(_, c)| (c.time_secs, c.time_nanos, c.blocks_done()));
        Ok(out)
    }

    /// Deletes a checkpoint; a failure only leaves a stale shortcut behind, so it is a warning.
    pub fn delete_checkpoint(&self, id: &ObjectId) {
        if let Err(e) = self.backend.delete(&names::checkpoint(id)) {
            tracing::warn!("could not delete checkpoint {}: {e}", id.short());
        }
    }

    // ---- snapshots ----

    pub fn save_snapshot(&self, snap: &Snapshot) -> Result<ObjectId> {
        self.save_sealed(Kind::Snapshot, 1, names::snapshot, &snap.encode())
    }

    pub fn load_snapshot(&self, id: &ObjectId) -> Result<Snapshot> {
        self.load_sealed(Kind::Snapshot, names::snapshot, id, Snapshot::decode)
    }

    /// All snapshots that can be read, oldest first. One that cannot ([`Repository::list_snapshots_checked`]) is
    /// left out with a warning naming it: one damaged object must not stop listing, restoring, backing up
    /// (the parent is the latest readable one) or forgetting by a policy the others. `check` reports it, and
    /// `forget ID` removes it.
    pub fn list_snapshots(&self) -> Result<Vec<(ObjectId, Snapshot)>> {
        let (snapshots, unreadable) = self.list_snapshots_checked()?;
        for (_, e) in &unreadable {
            match e {
                Error::Corrupt { .. } => tracing::warn!("{e}; left out (`check` reports it, `forget ID` removes it)"),
                _ => tracing::warn!("{e}; left out"),
            }
        }
        Ok(snapshots)
    }

    /// All snapshots, oldest first, and apart from them those that cannot be read here: an object whose
    /// bytes are damaged (they do not match its name, or do not open or decode) or that a newer format version
    /// wrote. One that was deleted between the listing and its reading (forgotten, retagged) is in neither.
    /// Errors of the storage itself fail. For those that must account for every snapshot (prune).
    pub fn list_snapshots_checked(&self) -> Result<Checked<Snapshot>> {
        let ids = list_ids(&*self.backend, names::SNAPSHOTS)?;
        let loaded: Vec<(ObjectId, Result<Snapshot>)> =
            crate::util::with_request_threads(|| ids.par_iter().map(|id| (*id, self.load_snapshot(id))).collect())?;
        let (mut snapshots, mut unreadable) = (Vec::new(), Vec::new());
        for (id, loaded) in loaded {
            match loaded {
                Ok(s) => snapshots.push((id, s)),
                Err(Error::Missing { .. }) => {}
                Err(e) if is_unreadable_object(&e) => unreadable.push((id, e)),
                Err(e) => return Err(e),
            }
        }
        snapshots.sort_by_key(|(_, s)| (s.time_secs, s.time_nanos));
        Ok((snapshots, unreadable))
    }

    /// The latest snapshot of `source`, if there is one (a backup's parent).
    pub fn latest_snapshot_of(&self, source: &str) -> Result<Option<(ObjectId, Snapshot)>> {
        Ok(self.list_snapshots_of(Some(source))?.pop())
    }

    /// The snapshots of one source (all if `None`), oldest first.
    pub fn list_snapshots_of(&self, source: Option<&str>) -> Result<Vec<(ObjectId, Snapshot)>> {
        self.list_snapshots_matching(&SnapshotFilter { source: source.map(String::from), ..Default::default() })
    }

    /// The snapshots `filter` selects, oldest first.
    pub fn list_snapshots_matching(&self, filter: &SnapshotFilter) -> Result<Vec<(ObjectId, Snapshot)>> {
        let mut all = self.list_snapshots()?;
        all.retain(|(_, s)| filter.matches(s));
        Ok(all)
    }

    /// [`Repository::list_snapshots_checked`], the readable ones those `filter` selects (the unreadable ones
    /// cannot be told apart by it: all of them).
    pub fn list_snapshots_matching_checked(&self, filter: &SnapshotFilter) -> Result<Checked<Snapshot>> {
        let (mut snapshots, unreadable) = self.list_snapshots_checked()?;
        snapshots.retain(|(_, s)| filter.matches(s));
        Ok((snapshots, unreadable))
    }

    /// Resolves a snapshot reference: a full id, a unique id prefix, or `latest` (optionally within a source).
    pub fn find_snapshot(&self, reference: &str, source: Option<&str>) -> Result<(ObjectId, Snapshot)> {
        self.find_snapshot_matching(
            reference,
            &SnapshotFilter { source: source.map(String::from), ..Default::default() },
        )
    }

    /// [`Repository::find_snapshot`], where `latest` is the latest snapshot `filter` selects.
    pub fn find_snapshot_matching(&self, reference: &str, filter: &SnapshotFilter) -> Result<(ObjectId, Snapshot)> {
        if reference == "latest" {
            return self.list_snapshots_matching(filter)?.pop().ok_or_else(|| {
                Error::invalid(match &filter.source {
                    _ if filter.hosts.len() + filter.tag_sets.len() > 0 => "no snapshot matches the filters".into(),
                    Some(src) => format!("no snapshot of source {src:?}"),
                    None => "the repository has no snapshots".into(),
                })
            });
        }
        let id = self.resolve_snapshot_id(reference)?;
        Ok((id, self.load_snapshot(&id)?))
    }

    /// The snapshot object a full id or unique id prefix names, whether it can be read or not.
    pub fn resolve_snapshot_id(&self, reference: &str) -> Result<ObjectId> {
        if reference.len() < 4 || !reference.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(Error::invalid(format!(
                "{reference:?} is not a snapshot id (hex, at least 4 digits) or `latest`"
            )));
        }
        let reference = reference.to_ascii_lowercase();
        let matches: Vec<ObjectId> = list_ids(&*self.backend, names::SNAPSHOTS)?
            .into_iter()
            .filter(|id| id.hex().starts_with(&reference))
            .collect();
        match matches.as_slice() {
            [id] => Ok(*id),
            [] => Err(Error::invalid(format!("no snapshot with id {reference}"))),
            _ => {
                Err(Error::invalid(format!("snapshot id prefix {reference} is ambiguous ({} matches)", matches.len())))
            }
        }
    }
}

/// Objects of one kind as read: those that could be (id, object), and apart from them those that could not
/// (id, why; see [`is_unreadable_object`]).
pub type Checked<T> = (Vec<(ObjectId, T)>, Vec<(ObjectId, Error)>);

/// The packs the deletion `records` schedule for deletion, sorted, each once.
pub fn doomed_packs_of(records: Vec<(ObjectId, DeletionRecord)>) -> Vec<ObjectId> {
    let mut out: Vec<ObjectId> = records.into_iter().flat_map(|(_, r)| r.packs).collect();
    out.sort();
    out.dedup();
    out
}

/// Whether `e`, from reading an object, says the object itself cannot be read here (damaged, or of a newer
/// format version), not that the storage failed.
pub fn is_unreadable_object(e: &Error) -> bool {
    matches!(e, Error::Corrupt { .. } | Error::UnsupportedVersion { .. })
}

fn key_err(name: &str, e: KeyError) -> Error {
    match e {
        KeyError::WrongPassword => Error::WrongPassword,
        KeyError::Version(found) => Error::UnsupportedVersion { object: name.into(), found, supported: FORMAT_VERSION },
        KeyError::Corrupt(c) => Error::corrupt(name, c),
    }
}

fn write_key(backend: &dyn Backend, keyring: &[[u8; 32]], password: &[u8], kdf: KdfParams) -> Result<ObjectId> {
    let kf = KeyFile::create(keyring, password, kdf, crate::util::hostname(), crate::util::username());
    let bytes = kf.encode();
    let id = BlobId::of_file(&bytes);
    backend.put(&names::key(&id), &bytes)?;
    Ok(id)
}

/// Ids of the objects in a flat directory of content-named files; other names are ignored with a warning.
pub fn list_ids(backend: &dyn Backend, dir: &str) -> Result<Vec<ObjectId>> {
    Ok(list_ids_with_sizes(backend, dir)?.into_iter().map(|(id, _)| id).collect())
}

/// The objects of `dir` named by an id, with their sizes, sorted by id.
pub fn list_ids_with_sizes(backend: &dyn Backend, dir: &str) -> Result<Vec<(ObjectId, u64)>> {
    let mut ids = Vec::new();
    for info in backend.list(dir)? {
        match info.name.rsplit('/').next().and_then(BlobId::from_hex) {
            Some(id) => ids.push((id, info.size)),
            None => tracing::warn!("ignoring unexpected object {}", info.name),
        }
    }
    ids.sort();
    Ok(ids)
}

/// A local repository in `dir` with a key derivation cheap enough for unit tests.
#[cfg(test)]
pub(crate) fn test_repository(dir: &std::path::Path) -> Repository {
    let backend = crate::backend::open(dir.to_str().expect("a UTF-8 path")).expect("a local backend");
    let kdf = KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };
    Repository::init(backend, b"pw", &InitOptions { kdf, ..Default::default() }).expect("init")
}

/// Index files loaded at once (the index cache's sync, prune): at most this many (parallel GETs hide S3's latency
/// for the small files backups write)...
const LOAD_BATCH_FILES: usize = 64;
/// ...and at most this many stored bytes, whatever their number: an index file takes about twice its stored
/// size once decoded, and 64 files of a prune's 65,536 entries each took a 1M-blob cache build to 232 MiB.
const LOAD_BATCH_BYTES: u64 = 16 << 20;

/// `ids` (sorted) in consecutive batches to load at once, within `LOAD_BATCH_FILES` and `LOAD_BATCH_BYTES` (64
/// files, 16 MiB stored), sizes as `listed` (sorted, [`Repository::list_index_files`]) gives them; a file larger
/// than the byte bound is a batch of its own.
pub fn index_load_batches<'a>(ids: &'a [ObjectId], listed: &[(ObjectId, u64)]) -> Vec<&'a [ObjectId]> {
    let size = |id: &ObjectId| listed.binary_search_by_key(id, |(i, _)| *i).map_or(0, |at| listed[at].1);
    let mut batches = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, id) in ids.iter().enumerate() {
        let len = size(id);
        if i > start && (i - start == LOAD_BATCH_FILES || bytes + len > LOAD_BATCH_BYTES) {
            batches.push(&ids[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += len;
    }
    if start < ids.len() {
        batches.push(&ids[start..]);
    }
    batches
}

#[cfg(test)]
mod tests {
    #[test]
    fn index_files_load_in_batches_bounded_in_number_and_bytes() {
        let ids: Vec<ObjectId> = (0..200u8).map(|n| BlobId([n; 32])).collect();
        // Small files but for a few over the byte bound.
        let size = |n: usize| if n % 100 == 7 { LOAD_BATCH_BYTES + 1 } else { 100 << 10 };
        let listed: Vec<(ObjectId, u64)> = ids.iter().enumerate().map(|(n, id)| (*id, size(n))).collect();
        let batches = index_load_batches(&ids, &listed);
        assert_eq!(batches.concat(), ids, "every file once, in order");
        for b in &batches {
            let bytes: u64 = b.iter().map(|id| size(id.0[0] as usize)).sum();
            assert!(b.len() <= LOAD_BATCH_FILES && (bytes <= LOAD_BATCH_BYTES || b.len() == 1), "{} files", b.len());
        }
        assert!(batches.iter().any(|b| b.len() == LOAD_BATCH_FILES), "small files go 64 at a time");
    }

    use super::*;
    use crate::format::checkpoint::CheckpointDisk;
    use crate::format::snapshot::SegmentRef;
    use crate::format::{BLOCK_SIZE, SEGMENT_BLOCKS};

    #[test]
    fn pack_headers_are_read_whether_or_not_the_tail_read_holds_them() {
        use crate::format::pack::{BlobSealer, PackWriter};
        use crate::format::BlobType;
        let dir = tempfile::tempdir().unwrap();
        let repo = test_repository(dir.path());
        let mut sealer = BlobSealer::new(3);
        // 10 blobs: the header is in the first read. 600 blobs: a 29 KiB header, read on its own. 1 blob of a
        // few bytes: a pack smaller than the tail read.
        for blobs in [10u32, 600, 1] {
            let mut w = PackWriter::new(BlobType::Data, 1 << 20);
            for i in 0..blobs {
                let plain = [&i.to_le_bytes()[..], &blobs.to_le_bytes()].concat();
                w.add(sealer.seal(repo.keys(), BlobType::Data, repo.keys().blob_id(&plain), &plain));
            }
            let pack = w.finish(repo.keys());
            let (id, size, header) = (pack.id, pack.bytes.len() as u64, pack.header.clone());
            repo.save_pack(pack).unwrap();
            assert_eq!(size > PACK_TAIL_READ, blobs == 600);
            assert_eq!(repo.read_pack_header(&id, size).unwrap(), header, "{blobs} blobs");
            // Listed larger than it is (truncated since the listing): an error naming the pack, not a panic.
            let e = repo.read_pack_header(&id, size + 5).unwrap_err();
            assert!(e.to_string().contains(&id.hex()), "{e}");
        }
    }

    #[test]
    fn a_rotation_from_a_keyring_rotated_meanwhile_is_refused_and_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let mut first = test_repository(dir.path());
        let mut second = Repository::open(first.backend().clone(), b"pw").unwrap();
        let kdf = KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };
        let (kept, removed) = first.rotate_key(b"first", kdf).unwrap();
        assert_eq!(removed.len(), 1);
        // The second client still holds epoch 0 only: rotating from it would seal the config with a secret the
        // first's key file does not hold and delete that key file.
        let e = second.rotate_key(b"second", kdf).unwrap_err().to_string();
        assert!(e.contains("rotated since this command opened it"), "{e}");
        let keys: Vec<ObjectId> = first.list_keys().unwrap().into_iter().map(|(id, _)| id).collect();
        assert_eq!(keys, [kept]);
        let reopened = Repository::open(first.backend().clone(), b"first").unwrap();
        assert_eq!(reopened.keys().current_epoch(), 1);
        assert!(crate::lock::list(&reopened).unwrap().is_empty(), "the rotation lock was released");
    }

    /// A backend that refuses to delete key files (storage whose credentials may write but not delete).
    struct KeysUndeletable(Arc<dyn Backend>);

    impl Backend for KeysUndeletable {
        fn location(&self) -> String {
            self.0.location()
        }
        fn put(&self, name: &str, data: &[u8]) -> Result<()> {
            self.0.put(name, data)
        }
        fn create_new(&self, name: &str, data: &[u8]) -> Result<bool> {
            self.0.create_new(name, data)
        }
        fn get(&self, name: &str) -> Result<Vec<u8>> {
            self.0.get(name)
        }
        fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
            self.0.get_range(name, offset, len)
        }
        fn size(&self, name: &str) -> Result<Option<u64>> {
            self.0.size(name)
        }
        fn list(&self, dir: &str) -> Result<Vec<crate::backend::ObjectInfo>> {
            self.0.list(dir)
        }
        fn delete(&self, name: &str) -> Result<()> {
            if name.starts_with(names::KEYS) {
                return Err(Error::backend("delete", name, "access denied"));
            }
            self.0.delete(name)
        }
        fn remove_stale_temporaries(&self, older_than: std::time::Duration) -> Result<usize> {
            self.0.remove_stale_temporaries(older_than)
        }
        fn age(&self, name: &str) -> Result<Option<std::time::Duration>> {
            self.0.age(name)
        }
    }

    #[test]
    fn a_key_file_that_cannot_be_deleted_is_revoked_all_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let repo = test_repository(dir.path());
        let kdf = KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };
        repo.add_key(b"colleague", kdf).unwrap();
        let backend: Arc<dyn Backend> = Arc::new(KeysUndeletable(repo.backend().clone()));
        let mut repo = Repository::open(backend.clone(), b"pw").unwrap();
        let (_, removed) = repo.rotate_key(b"rotated", kdf).expect("the rotation took effect");
        assert!(removed.is_empty());
        assert_eq!(repo.list_keys().unwrap().len(), 3, "both older key files are still there");
        for old in [&b"pw"[..], b"colleague"] {
            let e = Repository::open(backend.clone(), old).err().expect("revoked").to_string();
            assert!(e.contains("from before a key rotation"), "{e}");
        }
        assert_eq!(Repository::open(backend, b"rotated").unwrap().keys().current_epoch(), 1);
    }

    #[test]
    fn an_index_file_listing_what_its_version_has_not_is_refused() {
        use crate::format::index::{IndexFile, IndexedPack};
        use crate::format::pack::{PackEntry, FLAG_DELTA, FLAG_ZSTD};
        use crate::format::BlobType;
        let dir = tempfile::tempdir().unwrap();
        let repo = test_repository(dir.path());
        let entry = PackEntry::example();
        let delta = PackEntry { flags: FLAG_ZSTD | FLAG_DELTA, base: Some(BlobId([6; 32])), ..entry };
        let rotated = PackEntry { key_epoch: 1, ..entry };
        for (entries, version, ok) in [
            (vec![entry], 1, true),
            (vec![delta], 2, true),
            (vec![delta], 1, false),
            (vec![rotated], 2, false),
            (vec![rotated, delta], 3, true),
        ] {
            let file = IndexFile {
                supersedes: Vec::new(),
                packs: vec![IndexedPack { id: BlobId([7; 32]), pack_type: BlobType::Data, entries }],
            };
            let id = repo.save_sealed(Kind::Index, version, names::index, &file.encode()).unwrap();
            match repo.load_index(&id) {
                Ok(f) => assert!(ok && f == file, "version {version}: {f:?}"),
                Err(e) => assert!(!ok && e.to_string().contains("lists blobs of version"), "version {version}: {e}"),
            }
        }
    }

    #[test]
    fn a_rotation_stopped_before_the_config_leaves_its_secret_unused() {
        let dir = tempfile::tempdir().unwrap();
        let repo = test_repository(dir.path());
        let kdf = KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };
        // What `rotate_key` leaves when stopped after its first write: a key file holding one more secret.
        let mut keyring = repo.keyring.clone();
        keyring.push(crypto::random_array());
        write_key(&**repo.backend(), &keyring, b"half", kdf).unwrap();
        let half = Repository::open(repo.backend().clone(), b"half").unwrap();
        assert_eq!(half.keys().current_epoch(), 0, "sealing with the unfinished epoch would shut out the old keys");
        let id = half.save_verification(&VerificationRecord { entries: Vec::new() }).unwrap();
        repo.load_verification(&id).unwrap();
    }

    #[test]
    fn of_one_backups_checkpoints_the_fullest_is_listed_last() {
        let dir = tempfile::tempdir().unwrap();
        let repo = test_repository(dir.path());
        // Twelve checkpoints of one backup (one more segment each), as a backup killed between writing each
        // and deleting the one before would leave them; listed in an order their ids decide.
        let segments = 12;
        for done in 1..=segments {
            let segment = SegmentRef { id: BlobId([done as u8; 32]), blocks: SEGMENT_BLOCKS as u32 };
            let disk = CheckpointDisk {
                name: "disk1".into(),
                capacity: segments * SEGMENT_BLOCKS as u64 * BLOCK_SIZE as u64,
                block_size: BLOCK_SIZE,
                change_token: Some("52 de/7".into()),
                segments: vec![segment; done as usize],
            };
            let c = Checkpoint {
                time_secs: 1_700_000_000,
                time_nanos: 5,
                hostname: "proxy".into(),
                username: "backup".into(),
                source: "vm".into(),
                parent: None,
                disks: vec![disk],
            };
            repo.save_checkpoint(&c).unwrap();
        }
        let listed = repo.list_checkpoints(Some("vm")).unwrap();
        let done: Vec<u64> = listed.iter().map(|(_, c)| c.blocks_done() / SEGMENT_BLOCKS as u64).collect();
        assert_eq!(done, (1..=segments).collect::<Vec<_>>());
    }
}
