//! Copies files and directories out of a guest file system into a local directory (`diskvault extract`).
//!
//! What a user of `tar -x` expects: contents bit-exact with their holes left as holes, permissions, modification
//! times, symlinks as symlinks, and owners when running as root. Devices, FIFOs and sockets are listed as
//! skipped, files whose contents cannot be read here (NTFS-compressed ones, say) and directories whose entries
//! cannot (fscrypt-encrypted ones) as unreadable, with the reason. Names of one file (hard links) become hard
//! links again where the file system numbers its files (XFS, NTFS; ext4-view does not tell). A file or
//! directory whose data is damaged in the repository is left out and named the same way, and the extraction
//! goes on with the rest, as `restic restore` does: a disaster's restore takes what is there.
//!
//! The guest decides the names: nothing is written outside the destination. Every entry is created anew
//! (`O_EXCL`, symlinks not followed), so a crafted directory holding a symlink and a directory of the same name
//! stops the extraction instead of writing through the link.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::{below, is_damage, left_out, CopyStats, Entry, EntryKind, GuestFs};
use crate::error::{Error, Result};
use crate::progress::Counters;

/// Extracts `path` of `fs` into directory `target` (created if missing): a file or directory as
/// `target/NAME`, the root of a volume (`/`) as the contents of `target`. Refuses to replace anything that
/// exists. `counters` count the bytes of file contents.
pub fn extract(fs: &GuestFs, path: &[u8], target: &Path, counters: &Counters) -> Result<CopyStats> {
    std::fs::create_dir_all(target).map_err(|e| Error::local(target, format!("cannot create: {e}")))?;
    let top = fs.entry(path)?;
    let mut stats = CopyStats::default();
    let owners = unsafe { libc::geteuid() } == 0;
    // Directories get their permissions and times once their contents are written (a read-only directory
    // could not be filled, and every entry created in one changes its modification time), innermost first.
    let mut dirs: Vec<(PathBuf, Entry)> = Vec::new();
    // Where the first name of each file with several names went: its other names become hard links to it.
    let mut first_names: HashMap<u64, PathBuf> = HashMap::new();
    let dest = if path == b"/" {
        target.to_path_buf()
    } else {
        let dest = target.join(OsStr::from_bytes(&top.name));
        if std::fs::symlink_metadata(&dest).is_ok() {
            return Err(Error::local(&dest, "exists already: extract into another --target"));
        }
        dest
    };
    let mut one = |local: &Path, guest: &[u8], e: &Entry, dirs: &mut Vec<(PathBuf, Entry)>| -> Result<()> {
        // Also the way out of a crafted directory cycle, which is walked until its paths grow too long.
        if crate::util::interrupted() {
            return Err(Error::Interrupted);
        }
        match e.kind {
            EntryKind::File => {
                if let Some(first) = e.hard_link_key().and_then(|key| first_names.get(&key)) {
                    std::fs::hard_link(first, local)
                        .map_err(|err| Error::local(local, format!("cannot link to {}: {err}", first.display())))?;
                    stats.files += 1;
                    stats.hard_links += 1;
                    return Ok(());
                }
                let copied = match fs.unreadable(guest) {
                    Ok(Some(why)) => {
                        stats.unreadable.push(format!("{}: {why}", e.path));
                        return Ok(());
                    }
                    Ok(None) => write_file(fs, guest, local, e, owners, counters),
                    Err(err) => Err(err),
                };
                match copied {
                    Ok(size) => {
                        stats.bytes += size;
                        stats.files += 1;
                        if let Some(key) = e.hard_link_key() {
                            first_names.insert(key, local.to_path_buf());
                        }
                    }
                    Err(err) if is_damage(&err) => stats.unreadable.push(left_out(&e.path, &err)),
                    Err(err) => return Err(err),
                }
            }
            EntryKind::Dir => {
                if local != target {
                    std::fs::create_dir(local).map_err(|err| Error::local(local, format!("cannot create: {err}")))?;
                }
                dirs.push((local.to_path_buf(), e.clone()));
                stats.dirs += 1;
            }
            EntryKind::Symlink => {
                std::os::unix::fs::symlink(OsStr::from_bytes(&e.target_bytes), local)
                    .map_err(|err| Error::local(local, format!("cannot create the symlink: {err}")))?;
                finish(local, e, owners, false)?;
                stats.symlinks += 1;
            }
            _ => stats.skipped.push(e.path.clone()),
        }
        Ok(())
    };
    one(&dest, path, &top, &mut dirs)?;
    if top.kind == EntryKind::Dir {
        let unreadable =
            fs.walk(path, &mut |guest, e| one(&dest.join(OsStr::from_bytes(below(path, guest))), guest, e, &mut dirs))?;
        stats.unreadable.extend(unreadable.into_iter().map(|u| u.shown));
    }
    for (local, e) in dirs.iter().rev() {
        finish(local, e, owners, true)?;
    }
    Ok(stats)
}

/// Writes file `guest` to the new file `local`, leaving all-zero 4 KiB pages as holes. Returns its size. When
/// it fails after creating `local`, it removes it: part of a file is not the file.
fn write_file(fs: &GuestFs, guest: &[u8], local: &Path, e: &Entry, owners: bool, counters: &Counters) -> Result<u64> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .mode(0o600)
        .open(local)
        .map_err(|err| Error::local(local, format!("cannot create: {err}")))?;
    let written = fill_file(fs, guest, &file, local, e, owners, counters);
    if written.is_err() {
        drop(file);
        let _ = std::fs::remove_file(local);
    }
    written
}

fn fill_file(
    fs: &GuestFs,
    guest: &[u8],
    file: &std::fs::File,
    local: &Path,
    e: &Entry,
    owners: bool,
    counters: &Counters,
) -> Result<u64> {
    let size = fs.read_file(guest, &mut |offset, data| {
        for (k, page) in data.chunks(4096).enumerate() {
            if page.iter().any(|&b| b != 0) {
                file.write_all_at(page, offset + 4096 * k as u64).map_err(|err| Error::local(local, err))?;
            }
        }
        counters.add_done(data.len() as u64);
        Ok(())
    })?;
    file.set_len(size).map_err(|err| Error::local(local, err))?;
    if size != e.size {
        return Err(Error::invalid(format!("{}: read {size} bytes of its {}", e.path, e.size)));
    }
    finish(local, e, owners, true)?;
    Ok(size)
}

/// Gives `local` the entry's owner (when running as root), permissions (not for a symlink, whose own are
/// ignored by Linux) and modification time.
fn finish(local: &Path, e: &Entry, owners: bool, follow_mode: bool) -> Result<()> {
    if owners {
        std::os::unix::fs::lchown(local, Some(e.uid), Some(e.gid))
            .map_err(|err| Error::local(local, format!("cannot change the owner: {err}")))?;
    }
    if follow_mode {
        // setuid, setgid and sticky only where the owner is the guest's too, as tar does.
        let mode = if owners { e.mode & 0o7777 } else { e.mode & 0o777 };
        std::fs::set_permissions(local, std::fs::Permissions::from_mode(mode.into()))
            .map_err(|err| Error::local(local, format!("cannot set permissions: {err}")))?;
    }
    set_mtime(local, e.mtime, e.mtime_nanos).map_err(|err| Error::local(local, format!("cannot set times: {err}")))
}

/// Sets access and modification time of `local` (a symlink itself, not its target) to `secs.nanos`.
fn set_mtime(local: &Path, secs: i64, nanos: u32) -> std::io::Result<()> {
    let c = std::ffi::CString::new(local.as_os_str().as_bytes())?;
    let t = libc::timespec { tv_sec: secs as libc::time_t, tv_nsec: nanos.min(999_999_999) as _ };
    let times = [t, t];
    // SAFETY: a NUL-terminated path and two timespecs that outlive the call.
    if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
