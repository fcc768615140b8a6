//! NTFS volumes (Windows guests), read with the `ntfs` crate.
//!
//! Names are looked up as Windows does, case-insensitively through the volume's $UpCase table. A file's short
//! (8.3) name is not listed beside its long one, nor are the file system's own metadata files ($MFT, $Bitmap …).
//! NTFS has no Unix permissions: files show as 0644 and directories as 0755 (0444 and 0555 when read-only),
//! owned by root. Alternate data streams are not read; reparse points (symlinks, junctions) show as the file or
//! directory they are. The contents of compressed, EFS-encrypted and reparse-point files are refused, with the
//! reason (see `NtfsFs::reason_unreadable`).

use std::cell::RefCell;
use std::io::{Read, Seek, SeekFrom};

use ntfs::indexes::NtfsFileNameIndex;
use ntfs::structured_values::{NtfsFileAttributeFlags, NtfsFileNamespace};
use ntfs::{Ntfs, NtfsAttributeFlags, NtfsFile, NtfsReadSeek};

use super::{copy_chunks, fs_error, guest_path, join, not_found, Entry, EntryKind, FileSystem, Listing, VolumeReader};
use crate::error::{Error, Result};

/// Files 0 to 15 are the file system's own ($MFT, $MFTMirr, $LogFile, $Volume, $AttrDef, the root, $Bitmap,
/// $Boot, $BadClus, $Secure, $UpCase, $Extend and reserved records).
const FIRST_USER_RECORD: u64 = 16;
const ROOT_RECORD: u64 = 5;

/// The volume as the `ntfs` crate reads it: a position and [`Read`] + [`Seek`].
struct Cursor {
    reader: VolumeReader,
    pos: u64,
}

impl Read for Cursor {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.reader.len.saturating_sub(self.pos)).min(buf.len() as u64) as usize;
        if n == 0 {
            return Ok(0);
        }
        self.reader.read(self.pos, &mut buf[..n]).map_err(std::io::Error::other)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Seek for Cursor {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let pos = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.reader.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = pos.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek before the start"))?;
        Ok(self.pos)
    }
}

pub(super) struct NtfsFs {
    ntfs: Ntfs,
    io: RefCell<Cursor>,
    volume: String,
    /// The volume reader's, reachable while `io` is borrowed.
    failure: std::rc::Rc<RefCell<Option<Error>>>,
}

/// NTFS time (100 ns intervals since 1601) as seconds and nanoseconds since the Unix epoch.
fn unix_time(nt: u64) -> (i64, u32) {
    const EPOCH_DIFFERENCE: i64 = 11_644_473_600;
    ((nt / 10_000_000) as i64 - EPOCH_DIFFERENCE, (nt % 10_000_000) as u32 * 100)
}

impl NtfsFs {
    pub(super) fn open(reader: VolumeReader, volume: &str) -> Result<NtfsFs> {
        let failure = reader.failure.clone();
        let mut io = Cursor { reader, pos: 0 };
        let fail = |e: ntfs::NtfsError| fs_error(&failure, volume, b"/", e);
        let mut ntfs = Ntfs::new(&mut io).map_err(fail)?;
        ntfs.read_upcase_table(&mut io).map_err(fail)?;
        Ok(NtfsFs { ntfs, io: RefCell::new(io), volume: volume.to_string(), failure })
    }

    fn error(&self, path: &[u8], e: impl std::fmt::Display) -> Error {
        fs_error(&self.failure, &self.volume, path, e)
    }

    /// The file at `path`, each component looked up case-insensitively.
    fn lookup(&self, io: &mut Cursor, path: &[u8]) -> Result<NtfsFile<'_>> {
        let mut file = self.ntfs.root_directory(io).map_err(|e| self.error(path, e))?;
        for component in path.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            let missing = || not_found(&self.failure, &self.volume, path);
            let name = std::str::from_utf8(component).map_err(|_| missing())?;
            if !file.is_directory() {
                return Err(self.error(path, "not a directory"));
            }
            let next = {
                let index = file.directory_index(io).map_err(|e| self.error(path, e))?;
                let mut finder = index.finder();
                let entry = NtfsFileNameIndex::find(&mut finder, &self.ntfs, io, name)
                    .ok_or_else(missing)?
                    .map_err(|e| self.error(path, e))?;
                entry.to_file(&self.ntfs, io).map_err(|e| self.error(path, e))?
            };
            file = next;
        }
        Ok(file)
    }

    fn describe(&self, io: &mut Cursor, path: &[u8], name: Vec<u8>, file: &NtfsFile) -> Result<Entry> {
        let info = file.info().map_err(|e| self.error(path, e))?;
        let dir = file.is_directory();
        let size = match (dir, file.data(io, "")) {
            (false, Some(item)) => {
                let item = item.map_err(|e| self.error(path, e))?;
                item.to_attribute().map_err(|e| self.error(path, e))?.value_length()
            }
            _ => 0,
        };
        let read_only = info.file_attributes().contains(NtfsFileAttributeFlags::READ_ONLY);
        let mode = match (dir, read_only) {
            (true, false) => 0o755,
            (true, true) => 0o555,
            (false, false) => 0o644,
            (false, true) => 0o444,
        };
        let (mtime, mtime_nanos) = unix_time(info.modification_time().nt_timestamp());
        Ok(Entry {
            path: guest_path(&self.volume, path),
            name,
            kind: if dir { EntryKind::Dir } else { EntryKind::File },
            size,
            mode,
            uid: 0,
            gid: 0,
            mtime,
            mtime_nanos,
            target: None,
            target_bytes: Vec::new(),
            inode: Some(file.file_record_number()),
            links: file.hard_link_count().into(),
        })
    }
}

impl NtfsFs {
    /// Why the contents of `file` cannot be read, if they cannot. The ntfs crate hands over the unnamed $DATA
    /// stream as stored: compressed or encrypted bytes, or, for a reparse point such as a WOF-compressed
    /// (CompactOS) or deduplicated file, a stream of zeros while the data lives elsewhere. Refused rather than
    /// written out as if they were the file's bytes.
    fn reason_unreadable(&self, io: &mut Cursor, file: &NtfsFile, path: &[u8]) -> Result<Option<&'static str>> {
        let info = file.info().map_err(|e| self.error(path, e))?;
        if info.file_attributes().contains(NtfsFileAttributeFlags::REPARSE_POINT) {
            return Ok(Some("a reparse point (a WOF-compressed or deduplicated file, or a link)"));
        }
        let Some(item) = file.data(io, "") else { return Ok(None) };
        let item = item.map_err(|e| self.error(path, e))?;
        let flags = item.to_attribute().map_err(|e| self.error(path, e))?.flags();
        Ok(if flags.contains(NtfsAttributeFlags::COMPRESSED) {
            Some("NTFS-compressed")
        } else if flags.contains(NtfsAttributeFlags::ENCRYPTED) {
            Some("EFS-encrypted")
        } else {
            None
        })
    }
}

impl FileSystem for NtfsFs {
    fn unreadable(&self, path: &[u8]) -> Result<Option<&'static str>> {
        let io = &mut *self.io.borrow_mut();
        let file = self.lookup(io, path)?;
        self.reason_unreadable(io, &file, path)
    }

    fn entry(&self, path: &[u8]) -> Result<Entry> {
        let io = &mut *self.io.borrow_mut();
        let file = self.lookup(io, path)?;
        let name = path.rsplit(|&b| b == b'/').next().unwrap_or_default().to_vec();
        self.describe(io, path, name, &file)
    }

    fn read_dir(&self, path: &[u8]) -> Result<Listing> {
        let io = &mut *self.io.borrow_mut();
        let dir = self.lookup(io, path)?;
        if !dir.is_directory() {
            return Err(self.error(path, "not a directory"));
        }
        let index = dir.directory_index(io).map_err(|e| self.error(path, e))?;
        let mut entries = index.entries();
        let (mut out, mut unreadable) = (Vec::new(), Vec::new());
        while let Some(entry) = entries.next(io) {
            let entry = entry.map_err(|e| self.error(path, e))?;
            let Some(key) = entry.key() else { continue };
            let file_name = key.map_err(|e| self.error(path, e))?;
            let record = entry.file_reference().file_record_number();
            // A long name's 8.3 alias, the root's own "." entry and the metadata files are not the user's.
            if file_name.namespace() == NtfsFileNamespace::Dos || record < FIRST_USER_RECORD {
                continue;
            }
            let name = file_name.name().to_string_lossy().into_bytes();
            let child = join(path, &name);
            let read = match entry.to_file(&self.ntfs, io) {
                Ok(file) if file.file_record_number() == ROOT_RECORD => continue,
                Ok(file) => self.describe(io, &child, name, &file),
                Err(e) => Err(self.error(&child, e)),
            };
            Listing::add(&mut out, &mut unreadable, child.clone(), guest_path(&self.volume, &child), read)?;
        }
        Ok(Listing::Entries(out, unreadable))
    }

    fn read_file(&self, path: &[u8], out: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<u64> {
        let io = &mut *self.io.borrow_mut();
        let file = self.lookup(io, path)?;
        if file.is_directory() {
            return Err(self.error(path, "path is a directory"));
        }
        let Some(item) = file.data(io, "") else { return Ok(0) };
        let item = item.map_err(|e| self.error(path, e))?;
        let attribute = item.to_attribute().map_err(|e| self.error(path, e))?;
        if let Some(why) = self.reason_unreadable(io, &file, path)? {
            return Err(self.error(path, format!("the file is {why}, whose contents diskvault does not read")));
        }
        let mut value = attribute.value(io).map_err(|e| self.error(path, e))?;
        // Reads stop at each data run.
        copy_chunks(value.len(), &mut |buf| value.read(io, buf).map_err(|e| self.error(path, e)), out)
    }
}
