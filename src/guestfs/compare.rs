//! Which files differ between two snapshots of a disk (`diff --files`), as restic's `diff` lists them.
//!
//! Both file systems are walked and their entries matched by path. A regular file counts as modified when
//! its size or modification time differs (as rsync decides by default), a symlink when its target does;
//! permissions and owners changing alone are a metadata change. With contents compared
//! ([`diff_trees`]' `contents`), a file whose size and time are as they were is also read in both snapshots:
//! a tool, or an attacker, may have changed its bytes and set its time back. Nothing below a directory that
//! could not be read in either snapshot is reported: its entries are unknown, not added or removed.

use crate::error::{Error, Result};
use crate::guestfs::{is_damage, left_out, Entry, EntryKind, GuestDisk, GuestFs, Unentered, Volume};

/// How an entry differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Removed,
    /// A file's size or modification time, or a symlink's target.
    Modified,
    /// It is another kind of entry now (a file became a directory…).
    Type,
    /// Only its permissions or owner.
    Metadata,
}

impl Change {
    /// The mark restic's `diff` prints for it.
    pub fn mark(self) -> char {
        match self {
            Change::Added => '+',
            Change::Removed => '-',
            Change::Modified => 'M',
            Change::Type => 'T',
            Change::Metadata => 'U',
        }
    }
}

/// One entry that differs.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FileChange {
    pub change: Change,
    /// The guest path, volume first.
    pub path: String,
    /// The entry's kind where it is now (for a removed one: where it was).
    pub kind: EntryKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub old_size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_size: Option<u64>,
    /// Modified with its size and modification time as they were: found by reading both (`--contents`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub contents_only: bool,
}

/// What differs below a directory of two file systems.
#[derive(Debug, Default)]
pub struct TreeDiff {
    /// In walk order: depth first, by name, each directory before its contents.
    pub changes: Vec<FileChange>,
    /// Directories of either snapshot that could not be read, with the reason; nothing below them is compared.
    pub unreadable: Vec<String>,
}

/// A path as a walk orders it (depth first, by name): its components joined by a zero byte, which no name holds
/// and which sorts before every byte a name does (`/a`, `/a/b`, `/a.txt`).
fn key(path: &[u8]) -> Vec<u8> {
    path.iter().map(|&b| if b == b'/' { 0 } else { b }).collect()
}

/// How `new` differs from `old` at one path, if it does.
fn compare(old: &Entry, new: &Entry) -> Option<Change> {
    if old.kind != new.kind {
        return Some(Change::Type);
    }
    let modified = match new.kind {
        EntryKind::File => old.size != new.size || (old.mtime, old.mtime_nanos) != (new.mtime, new.mtime_nanos),
        EntryKind::Symlink => old.target_bytes != new.target_bytes,
        _ => false,
    };
    if modified {
        Some(Change::Modified)
    } else if (old.mode, old.uid, old.gid) != (new.mode, new.uid, new.gid) {
        Some(Change::Metadata)
    } else {
        None
    }
}

fn file_change(change: Change, e: &Entry, old: Option<&Entry>, new: Option<&Entry>) -> FileChange {
    let size = |e: Option<&Entry>| e.filter(|e| e.kind == EntryKind::File).map(|e| e.size);
    FileChange {
        change,
        path: e.path.clone(),
        kind: e.kind,
        old_size: size(old),
        new_size: size(new),
        contents_only: false,
    }
}

/// Bytes of a file digested at a time: a window that is all zeros is left out, so that zeros stored and a hole
/// digest alike (a file rewritten by a copy that made it sparse has not changed).
const DIGEST_WINDOW: usize = 64 << 10;

/// A digest of a file's contents, from the chunks [`GuestFs::read_file`] hands out in order.
struct ContentDigest {
    hasher: blake3::Hasher,
    window: Vec<u8>,
    /// Which window `window` holds, and whether anything was put in it.
    index: u64,
    filled: bool,
}

impl ContentDigest {
    fn new() -> Self {
        ContentDigest { hasher: blake3::Hasher::new(), window: vec![0; DIGEST_WINDOW], index: 0, filled: false }
    }

    fn feed(&mut self, mut offset: u64, mut data: &[u8]) {
        while !data.is_empty() {
            let w = offset / DIGEST_WINDOW as u64;
            if w != self.index {
                self.flush();
                self.index = w;
            }
            let at = (offset % DIGEST_WINDOW as u64) as usize;
            let n = data.len().min(DIGEST_WINDOW - at);
            self.window[at..at + n].copy_from_slice(&data[..n]);
            self.filled = true;
            offset += n as u64;
            data = &data[n..];
        }
    }

    fn flush(&mut self) {
        if !self.filled {
            return;
        }
        if !crate::backup::is_zero(&self.window) {
            self.hasher.update(&self.index.to_le_bytes());
            self.hasher.update(&self.window);
        }
        self.window.fill(0);
        self.filled = false;
    }

    fn finish(mut self, size: u64) -> blake3::Hash {
        self.flush();
        self.hasher.update(&size.to_le_bytes());
        self.hasher.finalize()
    }
}

/// The digest of regular file `path`'s contents in `fs`.
fn digest_file(fs: &GuestFs, path: &[u8]) -> Result<blake3::Hash> {
    let mut digest = ContentDigest::new();
    let size = fs.read_file(path, &mut |offset, chunk| {
        if crate::util::interrupted() {
            return Err(Error::Interrupted);
        }
        digest.feed(offset, chunk);
        Ok(())
    })?;
    Ok(digest.finish(size))
}

/// Whether file `path`, of the same size and time in both snapshots, holds other bytes in `new` than in `old`;
/// `Err` with the reason when that cannot be told (contents that cannot be read here, or damaged data).
fn contents_differ(
    old: &GuestFs,
    new: &GuestFs,
    path: &[u8],
    shown: &str,
) -> Result<std::result::Result<bool, String>> {
    for (fs, side) in [(old, "earlier"), (new, "later")] {
        if let Some(why) = fs.unreadable(path)? {
            return Ok(Err(format!("contents of {shown}: {why} (in the {side} snapshot)")));
        }
    }
    let digests = digest_file(old, path).and_then(|o| Ok((o, digest_file(new, path)?)));
    match digests {
        Ok((o, n)) => Ok(Ok(o != n)),
        Err(e) if is_damage(&e) => Ok(Err(format!("contents of {}", left_out(shown, &e)))),
        Err(e) => Err(e),
    }
}

/// Entries of the earlier tree in flight from its walk: enough to keep both walks busy.
const IN_FLIGHT: usize = 1024;

/// What differs below directory `path` of volume `old_volume` of `old` and `new_volume` of `new`; with
/// `contents`, files whose size and time match are read in both and compared too.
///
/// Both trees are walked at once, the earlier one on a thread of its own, and merged in walk order: memory
/// holds the changes, not the trees (a file server's millions of entries).
pub fn diff_trees(
    old: &GuestDisk,
    old_volume: &Volume,
    new: &GuestDisk,
    new_volume: &Volume,
    path: &[u8],
    contents: bool,
) -> Result<TreeDiff> {
    std::thread::scope(|scope| {
        let (tx, rx) = crossbeam_channel::bounded::<(Vec<u8>, Entry)>(IN_FLIGHT);
        let earlier = scope.spawn(move || -> Result<Vec<Unentered>> {
            let fs = old.fs(old_volume)?;
            let mut receiver_gone = false;
            let walked = fs.walk(path, &mut |child, e| {
                // The merge stopped (it failed): no one reads the rest.
                receiver_gone = receiver_gone || tx.send((key(child), e.clone())).is_err();
                if receiver_gone {
                    return Err(Error::Interrupted);
                }
                Ok(())
            });
            match walked {
                Err(Error::Interrupted) if receiver_gone => Ok(Vec::new()),
                other => other,
            }
        });
        let fs = new.fs(new_volume)?;
        // The earlier file system again, on this thread, to read files from (the walk's is on its own thread).
        let old_fs = if contents { Some(old.fs(old_volume)?) } else { None };
        let mut not_compared: Vec<String> = Vec::new();
        let mut changes: Vec<(Vec<u8>, FileChange)> = Vec::new();
        let mut next_old = rx.recv().ok();
        let new_unentered = fs.walk(path, &mut |child, e| {
            if crate::util::interrupted() {
                return Err(Error::Interrupted);
            }
            let k = key(child);
            // Earlier entries before this one are gone; one at this path is compared.
            while let Some((old_key, old_entry)) = next_old.take() {
                if old_key < k {
                    changes.push((old_key, file_change(Change::Removed, &old_entry, Some(&old_entry), None)));
                    next_old = rx.recv().ok();
                    continue;
                }
                if old_key == k {
                    let mut change = compare(&old_entry, e).map(|c| file_change(c, e, Some(&old_entry), Some(e)));
                    let same_data = !matches!(change, Some(FileChange { change: Change::Modified | Change::Type, .. }));
                    if let (Some(old_fs), EntryKind::File, true) = (&old_fs, e.kind, same_data) {
                        match contents_differ(old_fs, &fs, child, &e.path)? {
                            Ok(false) => {}
                            Ok(true) => {
                                let mut c = file_change(Change::Modified, e, Some(&old_entry), Some(e));
                                c.contents_only = true;
                                change = Some(c);
                            }
                            Err(why) => not_compared.push(why),
                        }
                    }
                    if let Some(c) = change {
                        changes.push((k.clone(), c));
                    }
                    next_old = rx.recv().ok();
                    return Ok(());
                }
                next_old = Some((old_key, old_entry));
                break;
            }
            changes.push((k, file_change(Change::Added, e, None, Some(e))));
            Ok(())
        })?;
        while let Some((old_key, old_entry)) = next_old {
            changes.push((old_key, file_change(Change::Removed, &old_entry, Some(&old_entry), None)));
            next_old = rx.recv().ok();
        }
        drop(rx);
        let old_unentered =
            earlier.join().map_err(|_| Error::invalid("the walk of the earlier snapshot panicked"))??;
        // Below a directory either walk could not enter, entries are unknown: not added, not removed. So is an
        // entry that could not be read in either.
        let unknown: Vec<Vec<u8>> = old_unentered.iter().chain(&new_unentered).map(|u| key(&u.path)).collect();
        changes.retain(|(k, _)| !unknown.iter().any(|u| k.starts_with(u) && (k.len() == u.len() || k[u.len()] == 0)));
        let unreadable = old_unentered
            .iter()
            .map(|u| format!("{u} (in the earlier snapshot)"))
            .chain(new_unentered.iter().map(|u| format!("{u} (in the later snapshot)")))
            .chain(not_compared)
            .collect();
        Ok(TreeDiff { changes: changes.into_iter().map(|(_, c)| c).collect(), unreadable })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(kind: EntryKind, size: u64, mtime: i64, mode: u16) -> Entry {
        Entry {
            path: "/part1/x".into(),
            name: b"x".to_vec(),
            kind,
            size,
            mode,
            uid: 0,
            gid: 0,
            mtime,
            mtime_nanos: 0,
            target: None,
            target_bytes: Vec::new(),
            inode: None,
            links: 1,
        }
    }

    #[test]
    fn files_differ_by_size_time_kind_and_then_metadata() {
        let f = entry(EntryKind::File, 10, 100, 0o644);
        assert_eq!(compare(&f, &f), None);
        assert_eq!(compare(&f, &entry(EntryKind::File, 11, 100, 0o644)), Some(Change::Modified));
        assert_eq!(compare(&f, &entry(EntryKind::File, 10, 101, 0o600)), Some(Change::Modified));
        assert_eq!(compare(&f, &entry(EntryKind::File, 10, 100, 0o600)), Some(Change::Metadata));
        assert_eq!(compare(&f, &entry(EntryKind::Dir, 10, 100, 0o644)), Some(Change::Type));
        // A directory's time follows its entries: only its kind and metadata count.
        let d = entry(EntryKind::Dir, 4096, 100, 0o755);
        assert_eq!(compare(&d, &entry(EntryKind::Dir, 8192, 200, 0o755)), None);
        let mut link = entry(EntryKind::Symlink, 5, 100, 0o777);
        link.target_bytes = b"/etc".to_vec();
        let mut moved = link.clone();
        moved.target_bytes = b"/srv".to_vec();
        assert_eq!(compare(&link, &moved), Some(Change::Modified));
    }

    #[test]
    fn a_digest_depends_on_the_bytes_not_on_chunks_or_holes() {
        let mut data = vec![0u8; 300_000];
        data[1000..1010].copy_from_slice(b"0123456789");
        data[200_000] = 7;
        let digest = |chunks: &[(u64, &[u8])]| {
            let mut d = ContentDigest::new();
            for &(offset, chunk) in chunks {
                d.feed(offset, chunk);
            }
            d.finish(data.len() as u64)
        };
        let whole = digest(&[(0, &data)]);
        // Other chunk sizes; zeros left out as holes (a sparse copy of the same file).
        let pieces: Vec<(u64, &[u8])> = data.chunks(4096).enumerate().map(|(i, c)| ((i * 4096) as u64, c)).collect();
        assert_eq!(digest(&pieces), whole);
        assert_eq!(digest(&[(1000, &data[1000..1010]), (200_000, &data[200_000..200_001])]), whole);
        // One byte more, or moved: another digest.
        assert_ne!(digest(&[(1000, &data[1000..1010])]), whole);
        assert_ne!(digest(&[(1001, &data[1000..1010]), (200_000, &data[200_000..200_001])]), whole);
        let mut other = data.clone();
        other[299_999] = 1;
        assert_ne!(digest(&[(0, &other)]), whole);
    }

    #[test]
    fn keys_order_entries_as_a_walk_meets_them() {
        // `a/b` (inside `a`) before `a.txt`: '/' sorts after '.', but a directory's contents come right after it.
        let mut keys = vec![key(b"/a.txt"), key(b"/a/b"), key(b"/a"), key(b"/b"), key(b"/a\x01")];
        keys.sort();
        assert_eq!(keys, vec![key(b"/a"), key(b"/a/b"), key(b"/a\x01"), key(b"/a.txt"), key(b"/b")]);
    }
}
