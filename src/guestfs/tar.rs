//! Writes files and directories of a guest file system as a tar stream (`diskvault dump` of a directory), for
//! a restore onto another machine through a pipe (`… dump … /part2/etc | ssh host tar -x`), as restic's `dump`.
//!
//! GNU tar format, by the `tar` crate: long names and link targets, sizes past 8 GiB and large owner ids are
//! encoded as GNU tar writes them. Each entry has its type, permissions (setuid, setgid and sticky included),
//! owner ids and modification time; a time with a fraction of a second, or before 1970, goes in a PAX `mtime`
//! record before the entry (GNU tar, bsdtar and Python's tarfile read it), as the header holds whole seconds
//! since 1970 only. What `extract` leaves out, this leaves out too, and reports the
//! same way: devices, FIFOs and sockets are skipped; files whose contents and directories whose entries cannot
//! be read here are listed as unreadable. Names of one file become hard-link entries where the file system
//! numbers its files (XFS, NTFS), and holes are written as zeros.
//!
//! When reading fails halfway through a file, the stream ends there without tar's end-of-archive blocks, so
//! the receiving `tar` reports a truncated archive instead of taking it for a complete one.

use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::{below, CopyStats, Entry, EntryKind, GuestFs};
use crate::error::{Error, Result};
use crate::progress::Counters;

/// Writes `path` of `fs` to `out` as a tar stream: a file or directory under its own name (`etc/…`), the root
/// of a volume (`/`) as its contents (`bin/…`, `etc/…`). `counters` count the bytes of file contents.
pub fn write_tar(fs: &GuestFs, path: &[u8], out: &mut dyn Write, counters: &Counters) -> Result<CopyStats> {
    let top = fs.entry(path)?;
    let mut archive = tar::Builder::new(Output { out, cut: false, failed: false });
    let result = write_entries(fs, path, &top, &mut archive, counters);
    if result.is_err() {
        // The Builder writes the end-of-archive blocks when dropped; a truncated stream must not get them.
        archive.get_mut().cut = true;
        return result;
    }
    archive.into_inner().map_err(output_error)?;
    result
}

fn write_entries(
    fs: &GuestFs,
    path: &[u8],
    top: &Entry,
    archive: &mut tar::Builder<Output<'_>>,
    counters: &Counters,
) -> Result<CopyStats> {
    let mut stats = CopyStats::default();
    // Names in the archive: relative to `path`'s directory, or to the root for a whole volume.
    let prefix: &[u8] = if path == b"/" { b"" } else { &top.name };
    // The archive name of each file with several names, first met: its other names become hard links to it.
    let mut first_names: std::collections::HashMap<u64, PathBuf> = std::collections::HashMap::new();
    let mut one = |guest: &[u8], e: &Entry| -> Result<()> {
        if crate::util::interrupted() {
            return Err(Error::Interrupted);
        }
        let mut name = PathBuf::from(std::ffi::OsStr::from_bytes(prefix));
        let rest = below(path, guest);
        if !rest.is_empty() {
            name.push(std::ffi::OsStr::from_bytes(rest));
        }
        if name.as_os_str().is_empty() {
            return Ok(()); // a volume's root: its contents are the archive's top level
        }
        match e.kind {
            EntryKind::File => {
                if let Some(first) = e.hard_link_key().and_then(|key| first_names.get(&key)) {
                    let mut header = header(archive, e, tar::EntryType::Link)?;
                    archive.append_link(&mut header, &name, first).map_err(|err| entry_error(archive, e, err))?;
                    stats.files += 1;
                    stats.hard_links += 1;
                    return Ok(());
                }
                match fs.unreadable(guest)? {
                    Some(why) => stats.unreadable.push(format!("{}: {why}", e.path)),
                    None => {
                        stats.bytes += append_file(fs, guest, &name, e, archive, counters)?;
                        stats.files += 1;
                        if let Some(key) = e.hard_link_key() {
                            first_names.insert(key, name);
                        }
                    }
                }
            }
            EntryKind::Dir => {
                let mut header = header(archive, e, tar::EntryType::Directory)?;
                archive
                    .append_data(&mut header, &name, std::io::empty())
                    .map_err(|err| entry_error(archive, e, err))?;
                stats.dirs += 1;
            }
            EntryKind::Symlink => {
                let mut header = header(archive, e, tar::EntryType::Symlink)?;
                let target = Path::new(std::ffi::OsStr::from_bytes(&e.target_bytes));
                archive.append_link(&mut header, &name, target).map_err(|err| entry_error(archive, e, err))?;
                stats.symlinks += 1;
            }
            _ => stats.skipped.push(e.path.clone()),
        }
        Ok(())
    };
    one(path, top)?;
    if top.kind == EntryKind::Dir {
        let unreadable = fs.walk(path, &mut one)?;
        stats.unreadable.extend(unreadable.into_iter().map(|u| u.shown));
    }
    Ok(stats)
}

/// Appends regular file `guest` under `name`: its header, then its contents as they are read, then the padding
/// to tar's 512-byte blocks. Returns its size.
fn append_file(
    fs: &GuestFs,
    guest: &[u8],
    name: &Path,
    e: &Entry,
    archive: &mut tar::Builder<Output<'_>>,
    counters: &Counters,
) -> Result<u64> {
    let mut header = header(archive, e, tar::EntryType::Regular)?;
    header.set_size(e.size);
    // The header (and a GNU long-name entry before it) through the crate, with no data: the contents are
    // streamed after it, as the file system hands them over, instead of being held in memory.
    archive.append_data(&mut header, name, std::io::empty()).map_err(|err| entry_error(archive, e, err))?;
    let out = archive.get_mut();
    let mut written = 0u64;
    let size = fs.read_file(guest, &mut |_, data| {
        // Never more than the header promised: the archive's framing depends on it.
        let take = data.len().min((e.size - written) as usize);
        out.write_all(&data[..take]).map_err(output_error)?;
        written += take as u64;
        counters.add_done(take as u64);
        Ok(())
    })?;
    if size != e.size {
        return Err(Error::invalid(format!("{}: read {size} bytes of its {}", e.path, e.size)));
    }
    let padding = (512 - e.size % 512) % 512;
    out.write_all(&[0u8; 512][..padding as usize]).map_err(output_error)?;
    Ok(size)
}

/// `secs + nanos / 10^9` as PAX writes a time: decimal seconds, a minus sign before 1970.
fn pax_time(secs: i64, nanos: u32) -> String {
    if secs < 0 && nanos > 0 {
        format!("-{}.{:09}", -(secs + 1), 1_000_000_000 - nanos)
    } else {
        format!("{secs}.{nanos:09}")
    }
}

/// A GNU header with the entry's type, permissions, owner and modification time, for the entry about to be
/// appended. A time the header cannot hold (a fraction of a second, or before 1970) goes first into the archive
/// as a PAX `mtime` record, which applies to the entry that follows.
fn header(archive: &mut tar::Builder<Output<'_>>, e: &Entry, kind: tar::EntryType) -> Result<tar::Header> {
    if e.mtime_nanos != 0 || e.mtime < 0 {
        let time = pax_time(e.mtime, e.mtime_nanos);
        archive.append_pax_extensions([("mtime", time.as_bytes())]).map_err(|err| entry_error(archive, e, err))?;
    }
    let mut header = tar::Header::new_gnu();
    header.set_entry_type(kind);
    header.set_size(0);
    header.set_mode((e.mode & 0o7777).into());
    header.set_uid(e.uid.into());
    header.set_gid(e.gid.into());
    // tar's times are unsigned; a time before 1970 is written as 1970.
    header.set_mtime(e.mtime.max(0) as u64);
    Ok(header)
}

/// The error of appending entry `e`: the output's, or else a name or link target that tar cannot hold (the
/// crate refuses `..` in names).
fn entry_error(archive: &tar::Builder<Output<'_>>, e: &Entry, err: std::io::Error) -> Error {
    if archive.get_ref().failed {
        return output_error(err);
    }
    Error::invalid(format!("{}: cannot be written to a tar archive: {err}", e.path))
}

fn output_error(err: std::io::Error) -> Error {
    Error::local("standard output", err)
}

/// The writer under the archive. It remembers that a write failed, and once `cut` takes nothing more, so that
/// a failed archive stays truncated.
struct Output<'a> {
    out: &'a mut dyn Write,
    cut: bool,
    failed: bool,
}

impl Write for Output<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.cut {
            return Err(std::io::Error::other("the archive was cut short"));
        }
        self.out.write(buf).inspect_err(|e| self.failed |= e.kind() != std::io::ErrorKind::Interrupted)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush().inspect_err(|_| self.failed = true)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn pax_times_are_decimal_seconds_before_and_after_1970() {
        assert_eq!(pax_time(1_600_000_000, 123_456_789), "1600000000.123456789");
        assert_eq!(pax_time(5, 0), "5.000000000");
        // -2 s + 0.5 s is 1.5 s before 1970.
        assert_eq!(pax_time(-2, 500_000_000), "-1.500000000");
        assert_eq!(pax_time(-1, 1), "-0.999999999");
        assert_eq!(pax_time(-5, 0), "-5.000000000");
    }
    use crate::guestfs::{join, FileSystem, Listing};

    /// A directory `/d` holding `a` (1000 bytes), `b` (3000 bytes; its reading fails after its first 1024 bytes
    /// when `fail` is set) and the directory `c`, whose entries are in a damaged blob.
    struct TwoFiles {
        fail: bool,
    }

    fn entry(path: &str, kind: EntryKind, size: u64) -> Entry {
        Entry {
            path: format!("/v{path}"),
            name: path.rsplit('/').next().unwrap().as_bytes().to_vec(),
            kind,
            size,
            mode: 0o640,
            uid: 1000,
            gid: 100,
            mtime: 1_600_000_000,
            mtime_nanos: 0,
            target: None,
            target_bytes: Vec::new(),
            inode: None,
            links: 1,
        }
    }

    impl FileSystem for TwoFiles {
        fn entry(&self, path: &[u8]) -> Result<Entry> {
            Ok(match path {
                b"/d" => entry("/d", EntryKind::Dir, 0),
                b"/d/a" => entry("/d/a", EntryKind::File, 1000),
                b"/d/b" => entry("/d/b", EntryKind::File, 3000),
                _ => entry("/d/c", EntryKind::Dir, 0),
            })
        }
        fn read_dir(&self, path: &[u8]) -> Result<Listing> {
            if path == b"/d/c" {
                return Err(Error::corrupt("packs/12/1234", "blob 5678: authentication failed"));
            }
            let names = [b"/d/a".to_vec(), b"/d/b".to_vec(), b"/d/c".to_vec()];
            Ok(Listing::Entries(names.into_iter().map(|p| (p.clone(), self.entry(&p).unwrap())).collect(), Vec::new()))
        }
        fn read_file(&self, path: &[u8], out: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<u64> {
            let len = self.entry(path)?.size;
            out(0, &vec![path[3]; 1024.min(len as usize)])?;
            if self.fail && path == b"/d/b" {
                return Err(Error::invalid("blob 1234: authentication failed"));
            }
            if len > 1024 {
                out(1024, &vec![path[3]; len as usize - 1024])?;
            }
            Ok(len)
        }
    }

    /// `/d` (inode 1) holding directory `c` (inode 2), which holds `back`: inode 1 again, as a damaged file
    /// system can.
    struct Cycle;

    impl FileSystem for Cycle {
        fn entry(&self, path: &[u8]) -> Result<Entry> {
            let name = std::str::from_utf8(path).unwrap();
            let inode = if path.ends_with(b"/c") { 2 } else { 1 };
            Ok(Entry { inode: Some(inode), ..entry(name, EntryKind::Dir, 0) })
        }
        fn read_dir(&self, path: &[u8]) -> Result<Listing> {
            let child = if path == b"/d" { join(path, b"c") } else { join(path, b"back") };
            Ok(Listing::Entries(vec![(child.clone(), self.entry(&child)?)], Vec::new()))
        }
        fn read_file(&self, _: &[u8], _: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<u64> {
            unreachable!("no files")
        }
    }

    #[test]
    fn a_directory_that_is_its_own_ancestor_is_not_entered() {
        let fs = GuestFs { inner: Box::new(Cycle) };
        let mut out = Vec::new();
        let stats = write_tar(&fs, b"/d", &mut out, &Counters::default()).unwrap();
        assert_eq!(stats.dirs, 3, "d, d/c and d/c/back, empty");
        assert_eq!(
            stats.unreadable,
            ["/v/d/c/back: the directory is one of its own ancestors (a damaged file system)"]
        );
    }

    fn archive(fail: bool) -> (Result<CopyStats>, Vec<u8>) {
        let fs = GuestFs { inner: Box::new(TwoFiles { fail }) };
        let mut out = Vec::new();
        let result = write_tar(&fs, b"/d", &mut out, &Counters::default());
        (result, out)
    }

    #[test]
    fn a_directory_becomes_entries_with_their_contents_and_metadata() {
        let (result, out) = archive(false);
        let stats = result.unwrap();
        assert_eq!((stats.files, stats.dirs), (2, 2));
        // The damaged directory is in the archive, empty, and named in the report.
        assert_eq!(stats.unreadable, ["/v/d/c: packs/12/1234: blob 5678: authentication failed"]);
        let mut entries = Vec::new();
        for e in tar::Archive::new(&out[..]).entries().unwrap() {
            let mut e = e.unwrap();
            let h = e.header().clone();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            let path = e.path().unwrap().to_str().unwrap().to_string();
            entries.push((path, h.entry_type(), h.mode().unwrap(), h.uid().unwrap(), h.mtime().unwrap(), data));
        }
        let names: Vec<_> = entries.iter().map(|e| (e.0.as_str(), e.1, e.2, e.3, e.4)).collect();
        assert_eq!(
            names,
            [
                ("d", tar::EntryType::Directory, 0o640, 1000, 1_600_000_000),
                ("d/a", tar::EntryType::Regular, 0o640, 1000, 1_600_000_000),
                ("d/b", tar::EntryType::Regular, 0o640, 1000, 1_600_000_000),
                ("d/c", tar::EntryType::Directory, 0o640, 1000, 1_600_000_000),
            ]
        );
        assert_eq!(entries[1].5, vec![b'a'; 1000]);
        assert_eq!(entries[2].5, vec![b'b'; 3000]);
        assert!(out.len() % 512 == 0 && out.ends_with(&[0u8; 1024]), "end-of-archive blocks");
    }

    #[test]
    fn a_failed_read_leaves_the_archive_truncated_not_complete() {
        let (result, out) = archive(true);
        assert!(result.unwrap_err().to_string().contains("blob 1234"));
        // d, d/a (a header and 1000 bytes padded to 1024), d/b's header and the 1024 bytes read: nothing more.
        assert_eq!(out.len(), 512 + 512 + 1024 + 512 + 1024);
        let mut reader = tar::Archive::new(&out[..]);
        let mut last = Ok(0);
        for e in reader.entries().unwrap() {
            last = e.and_then(|mut e| e.read_to_end(&mut Vec::new()));
            if last.is_err() {
                break;
            }
        }
        assert!(last.is_err(), "a reader takes the truncated archive for a whole one");
    }
}
