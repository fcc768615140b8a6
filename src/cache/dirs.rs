//! The cache root's directories, one per repository (`<cache root>/<repository id hex>`): when each was last
//! used, and removing those a host no longer uses (`diskvault cache --cleanup`, as `restic cache --cleanup`).
//!
//! Every process that opens a repository's index cache marks the directory used ([`mark_used`]): it rewrites the
//! file `last-used`, whose modification time is the last use and whose content is the repository's location,
//! and holds a shared lock on it for as long as it uses the cache (format-spec §12b). That lock, not the time,
//! is what keeps the cache of a `serve` running for weeks, which reads it read-only and so holds no database
//! lock. A directory is removed only if nobody holds it and it was last used longer ago than the age asked for.
//! Removing a cache loses nothing: the next command on that repository rebuilds it from `index/`.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// The file whose modification time is a cache directory's last use, locked (shared) while it is used.
pub const LAST_USED: &str = "last-used";
/// The shortest age [`remove`] accepts: a cache used today is never removed, whatever the locks say (a
/// process of an older version takes none).
pub const MIN_AGE: Duration = Duration::from_secs(86400);

/// One repository's directory under the cache root.
#[derive(Debug, Clone)]
pub struct CacheDir {
    pub path: PathBuf,
    /// The repository id (hex), the directory's name.
    pub repository_id: String,
    /// Where the repository was last opened from, if recorded.
    pub location: Option<String>,
    /// Bytes of the files in it.
    pub bytes: u64,
    pub last_used: SystemTime,
    /// A process holds one of its databases open.
    pub in_use: bool,
}

impl CacheDir {
    /// How long ago it was last used (zero for a time in the future).
    pub fn age(&self) -> Duration {
        SystemTime::now().duration_since(self.last_used).unwrap_or_default()
    }

    /// Held by no process and unused for longer than `max_age`: what a cleanup removes.
    pub fn is_old(&self, max_age: Duration) -> bool {
        !self.in_use && self.age() > max_age
    }
}

/// Records that this process uses `dir` for the repository at `location`, and holds it used until the returned
/// file is dropped. Best effort: a cache directory that cannot be marked still works (a cleanup could only remove
/// it sooner, and it would be rebuilt).
pub fn mark_used(dir: &Path, location: &str) -> Option<std::fs::File> {
    let mut f = std::fs::create_dir_all(dir)
        .and_then(|()| {
            std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(dir.join(LAST_USED))
        })
        .ok()?;
    std::io::Write::write_all(&mut f, format!("{location}\n").as_bytes()).ok()?;
    // An open-file-description lock: it stays while this file is open, whatever else the process opens and
    // closes (a classic fcntl lock would go with the first close of any descriptor of the file).
    lock(&f, libc::F_OFD_SETLK, libc::F_RDLCK).ok()?;
    Some(f)
}

/// The repository directories under `root`, most recently used first. Other entries are left out.
pub fn list(root: &Path) -> std::io::Result<Vec<CacheDir>> {
    let entries = match std::fs::read_dir(root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut dirs = Vec::new();
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str().filter(|n| is_repository_id(n)) else { continue };
        let path = entry.path();
        if !path.is_dir() {
            continue;
        }
        let location = std::fs::read_to_string(path.join(LAST_USED)).ok().map(|s| s.trim_end().to_string());
        dirs.push(CacheDir {
            repository_id: name.to_string(),
            location: location.filter(|l| !l.is_empty()),
            bytes: bytes_below(&path),
            last_used: last_used(&path),
            in_use: held_open(&path),
            path,
        });
    }
    dirs.sort_by(|a, b| b.last_used.cmp(&a.last_used).then_with(|| a.repository_id.cmp(&b.repository_id)));
    Ok(dirs)
}

/// Those of `dirs` unused for longer than `max_age` and not in use: what [`remove`] would take.
pub fn unused(dirs: &[CacheDir], max_age: Duration) -> Vec<&CacheDir> {
    dirs.iter().filter(|d| d.is_old(max_age)).collect()
}

/// Removes a cache directory [`unused`] selected, if it still is unused: it is first renamed out of the way, so a
/// process that opens the repository meanwhile starts a new cache instead of opening a half-deleted one.
pub fn remove(dir: &CacheDir, max_age: Duration) -> std::io::Result<()> {
    if max_age < MIN_AGE {
        return Err(std::io::Error::other("caches used within the last day are never removed"));
    }
    if !dir.path.exists() {
        // Another cleanup took it first.
        return Ok(());
    }
    if held_open(&dir.path) || SystemTime::now().duration_since(last_used(&dir.path)).unwrap_or_default() <= max_age {
        return Err(std::io::Error::other("it was used meanwhile"));
    }
    let parent = dir.path.parent().unwrap_or(Path::new("."));
    let doomed = parent.join(format!(".removing-{}-{}", dir.repository_id, std::process::id()));
    match std::fs::rename(&dir.path, &doomed) {
        // Another cleanup took it first.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        r => r?,
    }
    std::fs::remove_dir_all(&doomed)
}

/// Removes what killed runs left in the cache directories of `root`: a removal that stopped half-way.
pub fn remove_leftovers(root: &Path) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name.to_str().is_some_and(|n| n.starts_with(".removing-")) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn is_repository_id(name: &str) -> bool {
    name.len() == 64 && name.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The newest modification time of the marker, the directory and its index database directory (RocksDB creates a
/// file there whenever a process opens it for writing): caches made before the marker existed have a last use too.
fn last_used(dir: &Path) -> SystemTime {
    [dir.join(LAST_USED), dir.to_path_buf(), dir.join("index")]
        .iter()
        .filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .max()
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn bytes_below(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => bytes_below(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

/// Whether a process holds `dir`: a shared lock on its `last-used` file, or the lock of a database directly under
/// it (RocksDB locks `LOCK` while open). In doubt, yes.
pub(super) fn held_open(dir: &Path) -> bool {
    let Ok(subdirs) = std::fs::read_dir(dir) else { return true };
    let locks = subdirs.flatten().map(|sub| sub.path().join("LOCK")).chain([dir.join(LAST_USED)]);
    for path in locks {
        let Ok(f) = std::fs::File::open(&path) else { continue };
        match lock(&f, libc::F_OFD_GETLK, libc::F_WRLCK) {
            Ok(libc::F_UNLCK) => {}
            _ => return true,
        }
    }
    false
}

/// `fcntl` with a whole-file lock request of `kind`; returns the lock type the kernel reports back (for
/// `F_OFD_GETLK`: `F_UNLCK` if nothing would stop a lock of `kind`).
fn lock(f: &std::fs::File, cmd: libc::c_int, kind: libc::c_int) -> std::io::Result<libc::c_int> {
    // SAFETY: a zeroed flock is a valid argument (whole file, l_pid 0 as OFD locks need); fcntl only reads and
    // writes it.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    if unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(fl.l_type as libc::c_int)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn age(path: &Path, by: Duration) {
        let t = SystemTime::now() - by;
        let f = std::fs::File::open(path).unwrap();
        f.set_modified(t).unwrap();
    }

    #[test]
    fn last_use_is_the_newest_of_marker_directory_and_index() {
        let root = tempfile::tempdir().unwrap();
        let dir = root.path().join("ab".repeat(32));
        std::fs::create_dir_all(dir.join("index")).unwrap();
        drop(mark_used(&dir, "s3:https://host/bucket"));
        std::fs::create_dir_all(root.path().join("not-a-cache")).unwrap();
        let old = Duration::from_secs(40 * 86400);
        for p in [dir.join(LAST_USED), dir.join("index"), dir.clone()] {
            age(&p, old);
        }
        let listed = list(root.path()).unwrap();
        assert_eq!(listed.len(), 1, "only repository ids are caches");
        assert_eq!(listed[0].location.as_deref(), Some("s3:https://host/bucket"));
        assert!(listed[0].age() >= old - Duration::from_secs(60));
        assert_eq!(unused(&listed, Duration::from_secs(30 * 86400)).len(), 1);
        assert!(remove(&listed[0], Duration::from_secs(3600)).is_err(), "under a day is refused");

        // Held (by this process here; any process in practice): in use, whatever its age.
        let held = mark_used(&dir, "s3:https://host/bucket").expect("marked");
        age(&dir.join(LAST_USED), old);
        age(&dir, old);
        let listed = list(root.path()).unwrap();
        assert!(listed[0].in_use);
        assert!(unused(&listed, Duration::from_secs(86400)).is_empty());
        assert!(remove(&listed[0], Duration::from_secs(86400)).is_err());
        drop(held);
        let listed = list(root.path()).unwrap();
        assert!(!listed[0].in_use);
        // Selected while old, used before the removal: kept.
        drop(mark_used(&dir, "s3:https://host/bucket"));
        assert!(remove(&listed[0], Duration::from_secs(86400)).is_err());
        assert!(dir.exists());
        age(&dir.join(LAST_USED), old);
        age(&dir.join("index"), old);
        age(&dir, old);
        remove(&listed[0], Duration::from_secs(86400)).unwrap();
        assert!(!dir.exists());
    }
}
