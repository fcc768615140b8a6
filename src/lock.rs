//! Repository locks: the exclusive lock of the operations that must not run twice at once (prune, index
//! repair, snapshot repair), the lock of copies from one source repository, the snapshots lock of the commands
//! that change or remove stored snapshots, and the session markers of readers and writers (backup, restore,
//! check).
//!
//! Sessions never block anyone. They exist so that prune knows whom to wait for before it deletes a pack it
//! has taken out of the index: a backup that deduplicated against a block of that pack, or a restore that
//! resolved a blob to it, is still running as long as its session marker is alive (`format-spec` §9b).
//!
//! The lock is `locks/exclusive`, created with the backend's atomic create-if-absent (S3: a conditional
//! `If-None-Match: *` PUT). Its holder rewrites it every quarter of the stale time. Another client treats
//! it as dead only when the storage's own clock says it was not rewritten for the stale time
//! ([`crate::backend::Backend::age`]), so a killed holder stops blocking others after expiry, and no two
//! clients' clocks need to agree. A lock taken on the same running system (the same boot, the same PID
//! namespace) by a process that no longer exists is dead at once, as restic judges locks of its
//! own host: a killed `prune` does not block the next one on that host for the stale time.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::backend::Backend;
use crate::error::{Error, Result};
use crate::format::envelope::{self, Kind};
use crate::format::lock::LockInfo;
use crate::format::names;
use crate::repository::Repository;

pub const EXCLUSIVE: &str = "exclusive";
/// Locks of copies are `locks/copy-<64 hex>`, the source repository's config id.
pub const COPY_PREFIX: &str = "copy-";
/// Held by the commands that change or remove stored snapshots and their protection (`forget`, `tag`,
/// `protect`, `unprotect`, `repair snapshots --write`): see [`acquire_snapshots`].
pub const SNAPSHOTS: &str = "snapshots";
/// Session markers are `locks/session-<32 hex>`.
pub const SESSION_PREFIX: &str = "session-";

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
    /// Dropped to stop the refresher: it wakes at once instead of at its next poll (every command that holds a
    /// session would otherwise end up to a poll interval late).
    stop: Option<crossbeam_channel::Sender<()>>,
    /// Set when the refresher found the object gone or replaced: someone judged us abandoned.
    lost: Arc<AtomicBool>,
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
        let gone = if self.holder_is_gone() { "; its process no longer runs on this host" } else { "" };
        match &self.info {
            Some(i) => format!(
                "{} (held for {:?} by {}@{}, pid {}; last refreshed {age} ago{gone})",
                self.name, i.purpose, i.username, i.hostname, i.pid
            ),
            None => format!("{} (unreadable lock object; last written {age} ago)", self.name),
        }
    }

    /// Abandoned: not refreshed for `stale` by the storage's clock, or its holder is known to be gone.
    fn is_abandoned(&self, stale: Duration) -> bool {
        self.age.is_some_and(|a| a > stale) || self.holder_is_gone()
    }

    /// The lock was taken on this running system ([`HostInstance`]) by a process that no longer exists (or is a
    /// zombie). A PID since reused by another process keeps the lock alive until it expires: the safe side.
    fn holder_is_gone(&self) -> bool {
        let Some(info) = &self.info else { return false };
        match HostInstance::current() {
            Some(here) if here.tagged(&info.holder) => !process_exists(info.pid),
            _ => false,
        }
    }
}

/// This running system as lock holders name it: the kernel's boot id and the PID namespace. Two processes with
/// the same instance see each other's PIDs; no two machines (clones with one hostname included), no two boots,
/// and no two containers with their own PID namespaces share one.
struct HostInstance {
    tag: [u8; 8],
}

impl HostInstance {
    /// `None` where `/proc` does not say (then no lock is judged by its PID).
    fn current() -> Option<&'static HostInstance> {
        static CURRENT: std::sync::OnceLock<Option<HostInstance>> = std::sync::OnceLock::new();
        CURRENT
            .get_or_init(|| {
                let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
                let pid_ns = std::fs::read_link("/proc/self/ns/pid").ok()?;
                let mut h = blake3::Hasher::new();
                h.update(b"diskvault lock holder instance\0");
                h.update(boot.trim().as_bytes());
                h.update(b"\0");
                h.update(pid_ns.as_os_str().as_encoded_bytes());
                let tag = h.finalize().as_bytes()[..8].try_into().expect("8 bytes");
                Some(HostInstance { tag })
            })
            .as_ref()
    }

    /// A lock holder id of a process of this instance: the instance's tag, then 8 random bytes.
    fn holder_id(&self) -> [u8; 16] {
        let mut id = crate::crypto::random_array::<16>();
        id[..8].copy_from_slice(&self.tag);
        id
    }

    fn tagged(&self, holder: &[u8; 16]) -> bool {
        holder[..8] == self.tag
    }
}

/// Whether process `pid` exists and is not a zombie (seen from this PID namespace).
fn process_exists(pid: u32) -> bool {
    // No process has such a PID; a lock naming one is not judged by it (the safe side: it expires by age).
    let Ok(pid_t) = libc::pid_t::try_from(pid) else { return true };
    // SAFETY: signal 0 only checks that the process exists and may be signalled; nothing is sent.
    if unsafe { libc::kill(pid_t, 0) } != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return false;
    }
    // A killed process whose parent has not reaped it yet still has its PID: state Z (or X), after the command
    // name, which may itself hold spaces and parentheses.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rfind(") ").is_some_and(|i| matches!(stat.as_bytes().get(i + 2), Some(b'Z' | b'X'))),
        // Unreadable (a hidepid mount): it exists.
        Err(_) => true,
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

/// The bytes of a lock object or session marker naming this process as holder.
fn sealed_lock_info(repo: &Repository, purpose: &str) -> Vec<u8> {
    let info = LockInfo {
        purpose: purpose.to_string(),
        hostname: crate::util::hostname(),
        username: crate::util::username(),
        pid: std::process::id(),
        created_secs: crate::util::now_secs(),
        holder: HostInstance::current().map_or_else(crate::crypto::random_array, HostInstance::holder_id),
    };
    envelope::seal(repo.keys(), Kind::Lock, &info.encode())
}

/// Takes the exclusive lock, or fails with [`Error::Locked`] naming the holder. An abandoned lock (not
/// refreshed for [`stale_after`]) is removed and taken over.
pub fn acquire_exclusive(repo: &Repository, purpose: &str) -> Result<LockGuard> {
    acquire(repo, EXCLUSIVE, purpose, "the repository is locked")
}

/// Takes the lock of copies from the repository whose config id is `source_id` into `repo`
/// (`locks/copy-<source id hex>`), or fails with [`Error::Locked`] naming the copy that holds it. Two copies
/// from one source at once would each find the same snapshots not yet copied and store them twice. Copies
/// from other sources, backups and prune are not held up.
pub fn acquire_copy(repo: &Repository, source_id: &[u8; 32], purpose: &str) -> Result<LockGuard> {
    let name = format!("{COPY_PREFIX}{}", hex::encode(source_id));
    acquire(repo, &name, purpose, "another copy from the same source repository into this one is running")
}

/// Takes the snapshots lock, waiting up to `DISKVAULT_LOCK_WAIT_SECS` (default 30) for another holder to finish,
/// then fails with [`Error::Locked`] naming it. Its holders read, rewrite and delete snapshot objects and
/// protection markers; two at once could undo each other. `tag` moves a snapshot to a new id and its marker
/// with it: a `protect` of the old id in between would leave the new one unprotected, for a later `forget` to
/// remove; two `tag`s of one snapshot would each write a copy. Its holders are quick, hence the wait. Backups,
/// restores, copies and prune are not held up.
pub fn acquire_snapshots(repo: &Repository, purpose: &str) -> Result<LockGuard> {
    let wait = std::env::var("DISKVAULT_LOCK_WAIT_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(30u64);
    let start = std::time::Instant::now();
    let mut said = false;
    loop {
        match acquire(repo, SNAPSHOTS, purpose, "another command is changing snapshots") {
            Err(Error::Locked(holder)) if start.elapsed() < Duration::from_secs(wait) => {
                if !said {
                    tracing::warn!("waiting up to {wait} s: {holder}");
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(500));
            }
            done => return done,
        }
    }
}

/// Takes `locks/<name>` with the backend's atomic create-if-absent; `busy` starts the error when it is held.
fn acquire(repo: &Repository, name: &str, purpose: &str, busy: &str) -> Result<LockGuard> {
    let name = format!("{}/{name}", names::LOCKS);
    let bytes = sealed_lock_info(repo, purpose);
    let stale = stale_after();
    for _ in 0..3 {
        if repo.backend().create_new(&name, &bytes)? {
            return Ok(LockGuard::start(repo.backend().clone(), name, bytes, stale));
        }
        let Some((existing, state)) = read_lock(repo, &name)? else { continue };
        if state.is_abandoned(stale) {
            // Delete only what we judged stale: if it changed meanwhile, its holder is alive.
            if repo.backend().get(&name).ok().as_deref() == Some(&existing[..]) {
                tracing::warn!("removing an abandoned lock: {}", state.describe());
                repo.backend().delete(&name)?;
            }
            continue;
        }
        return Err(Error::Locked(format!(
            "{busy}: {}; it expires {} s after its last refresh if its holder is gone",
            state.describe(),
            stale.as_secs()
        )));
    }
    Err(Error::Locked(format!("{name} is changing hands; try again")))
}

impl LockGuard {
    fn start(backend: Arc<dyn Backend>, name: String, bytes: Vec<u8>, stale: Duration) -> LockGuard {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let lost = Arc::new(AtomicBool::new(false));
        let (b, n, data, l) = (backend.clone(), name.clone(), bytes.clone(), lost.clone());
        let refresher = std::thread::spawn(move || {
            let every = stale / 4;
            loop {
                match stopped.recv_timeout(every) {
                    Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
                    _ => return,
                }
                // Rewrite only what is still ours: recreating a lock someone removed as abandoned would
                // hide from them that we came back.
                match b.get(&n) {
                    Ok(current) if current == data => {
                        if let Err(e) = b.put(&n, &data) {
                            tracing::warn!("could not refresh {n}: {e}");
                        }
                    }
                    Ok(_) | Err(Error::Missing { .. }) => {
                        tracing::error!("{n} was removed by another client that judged it abandoned");
                        l.store(true, Ordering::SeqCst);
                        return;
                    }
                    Err(e) => tracing::warn!("could not refresh {n}: {e}"),
                }
            }
        });
        LockGuard { backend, name, bytes, stop: Some(stop), lost, refresher: Some(refresher) }
    }

    /// Fails if the lock was lost: it was not refreshed for the stale time and another client removed it.
    /// A backup checks this before it commits its snapshot, since a prune may then have deleted blobs it uses.
    pub fn ensure_held(&self) -> Result<()> {
        if self.lost.load(Ordering::SeqCst) {
            return Err(Error::Locked(format!(
                "{} expired while this operation ran (not refreshed for {} s; a stalled process or a lost \
                 connection); other clients may have acted on it, so nothing is committed: run it again",
                self.name,
                stale_after().as_secs()
            )));
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The flag [`LockGuard::ensure_held`] reads, for long-running readers that check it themselves.
    pub fn lost_flag(&self) -> Arc<AtomicBool> {
        self.lost.clone()
    }
}

/// Starts a session: a marker object `locks/session-<random>` that lives, refreshed, as long as the returned
/// guard. Backups, restores and checks hold one, so that prune waits for them before deleting packs.
pub fn start_session(repo: &Repository, purpose: &str) -> Result<LockGuard> {
    let name = format!("{}/{SESSION_PREFIX}{}", names::LOCKS, hex::encode(crate::crypto::random_array::<16>()));
    let bytes = sealed_lock_info(repo, purpose);
    if !repo.backend().create_new(&name, &bytes)? {
        return Err(Error::Locked(format!("{name} exists already (random name collision?); try again")));
    }
    Ok(LockGuard::start(repo.backend().clone(), name, bytes, stale_after()))
}

/// The live sessions. Abandoned ones (not refreshed for [`stale_after`] by the storage's clock) are removed,
/// so that their holders notice ([`LockGuard::ensure_held`]) if they were only stalled.
pub fn live_sessions(repo: &Repository) -> Result<Vec<LockState>> {
    let stale = stale_after();
    let mut out = Vec::new();
    for o in repo.backend().list(names::LOCKS)? {
        if !o.name.rsplit('/').next().is_some_and(|n| n.starts_with(SESSION_PREFIX)) {
            continue;
        }
        let Some((bytes, state)) = read_lock(repo, &o.name)? else { continue };
        if state.is_abandoned(stale) {
            if repo.backend().get(&o.name).ok().as_deref() == Some(&bytes[..]) {
                tracing::warn!("removing an abandoned session: {}", state.describe());
                repo.backend().delete(&o.name)?;
            }
            continue;
        }
        out.push(state);
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

impl Drop for LockGuard {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        // Release only our own lock (it may have been taken over after we stalled).
        if self.backend.get(&self.name).ok().as_deref() == Some(&self.bytes[..]) {
            let _ = self.backend.delete(&self.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process is alive while it runs; killed, it is gone already as a zombie, and after it is reaped. A PID no
    /// process can have is never taken for a dead holder.
    #[test]
    fn processes_count_as_existing_while_they_run() {
        assert!(process_exists(std::process::id()));
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        assert!(process_exists(child.id()));
        child.kill().unwrap();
        // Not reaped yet: a zombie once the signal is delivered.
        let start = std::time::Instant::now();
        while process_exists(child.id()) {
            assert!(start.elapsed() < Duration::from_secs(10), "a killed, unreaped child still counts as running");
            std::thread::sleep(Duration::from_millis(10));
        }
        child.wait().unwrap();
        assert!(!process_exists(child.id()));
        assert!(process_exists(u32::MAX));
    }
}
