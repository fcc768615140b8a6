//! Storage backends: where repository objects live. The engine only ever sees [`Backend`].
//!
//! Objects are immutable and named by `/`-separated paths relative to the repository root (`config`,
//! `packs/ab/ab…`, `index/…`). The contract every backend keeps:
//! - `put` is atomic: a reader sees the whole object or nothing, never a partial one, also after a crash;
//! - `put` returns only once the object is durable;
//! - `create_new` fails with `Ok(false)` if the object already exists (used for lock objects);
//! - `list` never returns temporary objects of an unfinished `put`.

pub mod local;
#[cfg(feature = "s3")]
pub mod s3;
pub mod throttle;

use std::ops::Range;
use std::sync::Arc;

use crate::error::{Error, Result};

/// How long a backend makes the storage keep what it writes (S3 Object Lock): `GOVERNANCE` (only accounts with
/// the right to bypass it may delete early) or `COMPLIANCE` (nobody may), for `days`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RetentionPolicy {
    pub mode: String,
    pub days: u32,
}

/// One object's storage retention.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retention {
    pub mode: String,
    /// How much longer it lasts, by the storage's clock (zero once it has ended).
    pub left: std::time::Duration,
}

/// An object name and its size, as listed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: String,
    pub size: u64,
}

pub trait Backend: Send + Sync {
    /// Human-readable location, for messages.
    fn location(&self) -> String;

    /// Stores an object, replacing any existing object of that name, atomically and durably.
    fn put(&self, name: &str, data: &[u8]) -> Result<()>;

    /// Stores an object only if none of that name exists. Returns `false` if one does. Callers pass bytes unique
    /// to them (sealed objects carry a random nonce), so a backend that retries may treat an existing object
    /// holding exactly `data` as its own earlier attempt whose answer was lost.
    fn create_new(&self, name: &str, data: &[u8]) -> Result<bool>;

    /// [`Backend::put`] of a buffer the caller gives up: a backend that must own what it sends (S3) takes it
    /// without a copy. The buffer comes back if the backend did not keep it (a local directory), for the caller
    /// to reuse.
    fn put_owned(&self, name: &str, data: Vec<u8>) -> Result<Option<Vec<u8>>> {
        self.put(name, &data)?;
        Ok(Some(data))
    }

    /// Reads a whole object. A missing object is [`Error::Missing`].
    fn get(&self, name: &str) -> Result<Vec<u8>>;

    /// Reads `len` bytes at `offset`. Fewer bytes than asked is an error naming the object.
    fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>>;

    /// [`Backend::get_range`] into `buf`, replacing what it held, for callers that read range after range:
    /// a reused buffer is already mapped, while a fresh one of many MiB costs a page fault per 4 KiB on every
    /// read (a quarter of a local restore's CPU, measured).
    fn get_range_into(&self, name: &str, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
        *buf = self.get_range(name, offset, len)?;
        Ok(())
    }

    /// [`Backend::get_range_into`], except that the bytes may land anywhere in `buf`: the returned range of it
    /// holds them (what else `buf` holds is unspecified). A local directory then reads large ranges with
    /// O_DIRECT straight into a page-aligned part of `buf`, without the kernel's copy out of the page cache
    /// (17% of `check --read-data`'s CPU).
    fn get_range_placed(&self, name: &str, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<Range<usize>> {
        self.get_range_into(name, offset, len, buf)?;
        Ok(0..buf.len())
    }

    /// Size of an object, `None` if it does not exist.
    fn size(&self, name: &str) -> Result<Option<u64>>;

    /// All objects below a directory (`packs`, `index`…), recursively, in no particular order.
    fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>>;

    /// Removes an object; removing a missing object is not an error.
    fn delete(&self, name: &str) -> Result<()>;

    /// Removes what unfinished writes left behind (temporary files, incomplete uploads) older than
    /// `older_than`, so that writes still in progress elsewhere are not disturbed. Returns how many.
    fn remove_stale_temporaries(&self, older_than: std::time::Duration) -> Result<usize>;

    /// How long ago the object was last written, by the storage's own clock (`None` if it does not exist).
    /// Lock expiry uses this, so that no two clients' clocks need to agree.
    fn age(&self, name: &str) -> Result<Option<std::time::Duration>>;

    /// The Object Lock retention this backend gives every object that makes up backups as it writes it
    /// (`DISKVAULT_S3_OBJECT_LOCK`), if any.
    fn retention_policy(&self) -> Option<RetentionPolicy> {
        None
    }

    /// The object's storage retention (S3 Object Lock), `None` if it has none or does not exist.
    fn retention(&self, _name: &str) -> Result<Option<Retention>> {
        Ok(None)
    }

    /// How much longer the storage refuses to delete the object, by the storage's clock; `None` if nothing
    /// holds it. Prune does not delete what is still retained.
    fn retention_left(&self, name: &str) -> Result<Option<std::time::Duration>> {
        Ok(self.retention(name)?.map(|r| r.left).filter(|left| !left.is_zero()))
    }

    /// Makes the storage refuse to delete the object for `keep` from now (by its clock), in `mode`. Returns
    /// `false` if the object does not exist. Storage without retention refuses.
    fn extend_retention(&self, name: &str, _mode: &str, _keep: std::time::Duration) -> Result<bool> {
        Err(Error::backend("extend the retention of", name, "this storage has no object retention"))
    }

    /// Creates what must exist before the first object (an S3 bucket); called by `init`.
    fn create_container(&self) -> Result<()> {
        Ok(())
    }

    /// Requests that had to be retried so far (network backends), for reports.
    fn retries(&self) -> u64 {
        0
    }
}

/// Opens the backend a repository location names: `s3://bucket/prefix`, `s3:http(s)://host:port/bucket/prefix`,
/// or a local path (optionally `local:PATH`). S3 options come from `DISKVAULT_S3_*` variables
/// ([`s3::S3Options::from_env`]).
pub fn open(location: &str) -> Result<Arc<dyn Backend>> {
    open_limited(location, &throttle::Limits::default())
}

/// [`open`], with bandwidth limits on what goes to and comes from the storage.
pub fn open_limited(location: &str, limits: &throttle::Limits) -> Result<Arc<dyn Backend>> {
    if location.starts_with("s3:") {
        #[cfg(feature = "s3")]
        return Ok(Arc::new(s3::S3Backend::open(
            location,
            s3::S3Options { limits: limits.clone(), ..s3::S3Options::from_env()? },
        )?));
        #[cfg(not(feature = "s3"))]
        return Err(Error::invalid(format!("{location}: this diskvault was built without S3 support (feature `s3`)")));
    }
    let path = location.strip_prefix("local:").unwrap_or(location);
    if path.is_empty() {
        return Err(Error::invalid("empty repository location"));
    }
    Ok(Arc::new(local::LocalBackend::with_limits(path.into(), limits.clone())))
}

/// A ranged read that got `got` of the `len` bytes asked at `offset`: the object is shorter than its reader
/// expects (every backend reports it alike).
pub(crate) fn truncated(name: &str, offset: u64, len: u64, got: u64) -> Error {
    Error::corrupt(name, format!("truncated: wanted {len} bytes at offset {offset}, the object ends after {got}"))
}
