//! Which files differ between two snapshots of a disk (`diff --files`), as restic's `diff` lists them.
//!
//! Both file systems are walked and their entries matched by path. A regular file counts as modified when
//! its size or modification time differs (as rsync decides by default: its blocks are not compared), a symlink
//! when its target does; permissions and owners changing alone are a metadata change. Nothing below a
//! directory that could not be read in either snapshot is reported: its entries are unknown, not added or
//! removed.

use crate::error::{Error, Result};
use crate::guestfs::{Entry, EntryKind, GuestDisk, Unentered, Volume};

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
    FileChange { change, path: e.path.clone(), kind: e.kind, old_size: size(old), new_size: size(new) }
}

/// Entries of the earlier tree in flight from its walk: enough to keep both walks busy.
const IN_FLIGHT: usize = 1024;

/// What differs below directory `path` of volume `old_volume` of `old` and `new_volume` of `new`.
///
/// Both trees are walked at once, the earlier one on a thread of its own, and merged in walk order: memory
/// holds the changes, not the trees (a file server's millions of entries).
pub fn diff_trees(
    old: &GuestDisk,
    old_volume: &Volume,
    new: &GuestDisk,
    new_volume: &Volume,
    path: &[u8],
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
                    if let Some(c) = compare(&old_entry, e) {
                        changes.push((k.clone(), file_change(c, e, Some(&old_entry), Some(e))));
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
        // Below a directory either walk could not enter, entries are unknown: not added, not removed.
        let unknown: Vec<Vec<u8>> = old_unentered.iter().chain(&new_unentered).map(|u| key(&u.path)).collect();
        changes.retain(|(k, _)| !unknown.iter().any(|u| k.len() > u.len() && k.starts_with(u) && k[u.len()] == 0));
        let unreadable = old_unentered
            .iter()
            .map(|u| format!("{u} (in the earlier snapshot)"))
            .chain(new_unentered.iter().map(|u| format!("{u} (in the later snapshot)")))
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
    fn keys_order_entries_as_a_walk_meets_them() {
        // `a/b` (inside `a`) before `a.txt`: '/' sorts after '.', but a directory's contents come right after it.
        let mut keys = vec![key(b"/a.txt"), key(b"/a/b"), key(b"/a"), key(b"/b"), key(b"/a\x01")];
        keys.sort();
        assert_eq!(keys, vec![key(b"/a"), key(b"/a/b"), key(b"/a\x01"), key(b"/a.txt"), key(b"/b")]);
    }
}
