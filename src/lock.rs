//! Exclusive repository locks, for the operations that must not run twice at once (index repair, snapshot
//! repair, and later prune). Backups take no lock: every object they write is content-addressed and new.
//!
//! The lock is `locks/exclusive`, created with the backend's atomic create-if-absent (S3: a conditional
//! `If-None-Match: *` PUT). Its holder rewrites it every quarter of the stale time. Another client treats
//! it as dead only when the storage's own clock says it was not rewritten for the stale time
//! ([`crate::backend::Backend::age`]), so a killed holder stops blocking others after expiry, and no two
//! clients' clocks need to agree.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::format::envelope::{self, Kind};
use crate::format::lock::LockInfo;
use crate::format::names;
use crate::repository::Repository;

pub const EXCLUSIVE: &str = "exclusive";

/// After how long without a refresh a lock counts as abandoned: `DISKVAULT_LOCK_STALE_SECS`, default 300.
pub fn stale_after() -> Duration {
    let secs = std::env::var("DISKVAULT_LOCK_STALE_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(300u64);
    Duration::from_secs(secs.max(2))
}

/// A held lock; refreshed in the background, released when dropped.
pub struct LockGuard {
    backend: Arc<dyn Backend>,
    name: String,
    bytes: Vec<u8>,
    stop: Arc<AtomicBool>,
    refresher: Option<std::thread::JoinHandle<()>>,
}

/// A lock as found in the repository.
pub struct LockState {
    pub name: String,
    pub info: Option<LockInfo>,
    pub age: Option<Duration>,
}

impl LockState {
    pub fn describe(&self) -> String {
        let age = self.age.map(|a| format!("{} s", a.as_secs())).unwrap_or_else(|| "unknown".into());
        match &self.info {
            Some(i) => format!(
                "{} (held for {:?} by {}@{}, pid {}; last refreshed {age} ago)",
                self.name, i.purpose, i.username, i.hostname, i.pid
            ),
            None => format!("{} (unreadable lock object; last written {age} ago)", self.name),
        }
    }
}

fn read_lock(repo: &Repository, name: &str) -> Result<Option<(Vec<u8>, LockState)>> {
    let bytes = match repo.backend().get(name) {
        Ok(b) => b,
        Err(Error::Missing { .. }) => return Ok(None),
        Err(e) => return Err(e),
    };
    let info = envelope::open(repo.keys(), Kind::Lock, &bytes).ok().and_then(|p| LockInfo::decode(&p).ok());
    let age = repo.backend().age(name)?;
    Ok(Some((bytes, LockState { name: name.to_string(), info, age })))
}

/// Every lock object in the repository.
pub fn list(repo: &Repository) -> Result<Vec<LockState>> {
    let mut out = Vec::new();
    for o in repo.backend().list(names::LOCKS)? {
        if o.name.rsplit('/').next().is_some_and(|n| n.starts_with('.')) {
            continue;
        }
        if let Some((_, s)) = read_lock(repo, &o.name)? {
            out.push(s);
        }
    }
    Ok(out)
}

/// Takes the exclusive lock, or fails with [`Error::Locked`] naming the holder. An abandoned lock (not
/// refreshed for [`stale_after`]) is removed and taken over.
pub fn acquire_exclusive(repo: &Repository, purpose: &str) -> Result<LockGuard> {
    let name = format!("{}/{EXCLUSIVE}", names::LOCKS);
    let info = LockInfo {
        purpose: purpose.to_string(),
        hostname: crate::util::hostname(),
        username: crate::util::username(),
        pid: std::process::id(),
        created_secs: crate::util::now_secs(),
        holder: crate::crypto::random_array(),
    };
    let bytes = envelope::seal(repo.keys(), Kind::Lock, &info.encode());
    let stale = stale_after();
    for _ in 0..3 {
        if repo.backend().create_new(&name, &bytes)? {
            return Ok(LockGuard::start(repo.backend().clone(), name, bytes, stale));
        }
        let Some((existing, state)) = read_lock(repo, &name)? else { continue };
        if state.age.is_some_and(|a| a > stale) {
            // Delete only what we judged stale: if it changed meanwhile, its holder is alive.
            if repo.backend().get(&name).ok().as_deref() == Some(&existing[..]) {
                tracing::warn!("removing an abandoned lock: {}", state.describe());
                repo.backend().delete(&name)?;
            }
            continue;
        }
        return Err(Error::Locked(format!(
            "the repository is locked: {}; it expires {} s after its last refresh if its holder is gone",
            state.describe(),
            stale.as_secs()
        )));
    }
    Err(Error::Locked("the repository lock is changing hands; try again".into()))
}

impl LockGuard {
    fn start(backend: Arc<dyn Backend>, name: String, bytes: Vec<u8>, stale: Duration) -> LockGuard {
        let stop = Arc::new(AtomicBool::new(false));
        let (b, n, data, s) = (backend.clone(), name.clone(), bytes.clone(), stop.clone());
        let refresher = std::thread::spawn(move || {
            let every = stale / 4;
            let mut last = Instant::now();
            while !s.load(Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(100));
                if last.elapsed() >= every {
                    if let Err(e) = b.put(&n, &data) {
                        tracing::warn!("could not refresh the repository lock: {e}");
                    }
                    last = Instant::now();
                }
            }
        });
        LockGuard { backend, name, bytes, stop, refresher: Some(refresher) }
    }
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        // Release only our own lock (it may have been taken over after we stalled).
        if self.backend.get(&self.name).ok().as_deref() == Some(&self.bytes[..]) {
            let _ = self.backend.delete(&self.name);
        }
    }
}
