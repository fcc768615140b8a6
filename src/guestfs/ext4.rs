//! ext2/3/4 volumes, read with the `ext4-view` crate (its journal replayed in memory).
//!
//! ext4-view reads a symlink's target whole into memory, sized by what its inode claims: a crafted inode claiming
//! 4 GiB made it allocate that much (found by fuzzing). So it is never left to follow a symlink: paths are
//! resolved here first ([`follow_symlinks`]), and a target longer than a path can be is refused unread.

use std::cell::RefCell;
use std::collections::HashSet;

use super::{
    copy_chunks, follow_symlinks, fs_error, guest_path, join, not_found, Entry, EntryKind, FileSystem, Listing,
    VolumeReader,
};
use crate::error::Result;

/// The longest symlink target (Linux's PATH_MAX less the NUL; ext4 holds one in a block at most).
const MAX_SYMLINK_TARGET: u64 = 4095;
/// Directories known to be no symlinks, kept at most: resolving a walk's next directory then looks up its
/// last name only.
const MAX_KNOWN_DIRECTORIES: usize = 1 << 16;

pub(super) struct Ext4Fs {
    fs: ext4_view::Ext4,
    volume: String,
    reader: VolumeReader,
    /// Paths (without symlinks) of directories met while resolving paths.
    known_directories: RefCell<HashSet<Vec<u8>>>,
}

impl ext4_view::Ext4Read for VolumeReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        VolumeReader::read(self, start_byte, dst).map_err(Into::into)
    }
}

/// Checks that the superblock's geometry fits the volume before ext4-view sizes its tables by it: a crafted
/// superblock claiming 2^27 block groups made it allocate 2 GiB for their descriptors (found by fuzzing). A real
/// file system lies within its volume and has at least 256 blocks per group (mke2fs's minimum).
fn check_geometry(reader: &VolumeReader, volume: &str) -> Result<()> {
    let mut sb = [0u8; 1024];
    reader.read(1024, &mut sb).map_err(|e| fs_error(&reader.failure, volume, b"/", e))?;
    let le32 = |at: usize| super::le32(&sb, at) as u64;
    // As ext4-view counts them: the high half whatever the 64bit feature says.
    let blocks = le32(0x04) | le32(0x150) << 32;
    let log_block_size = le32(0x18);
    let per_group = le32(0x20);
    let refuse =
        |what: String| Err(fs_error(&reader.failure, volume, b"/", format!("implausible ext4 superblock: {what}")));
    if log_block_size > 6 {
        return refuse(format!("block size 2^{}", log_block_size + 10));
    }
    let bytes = blocks.checked_mul(1024 << log_block_size);
    if bytes.is_none_or(|b| b > reader.len) {
        return refuse(format!(
            "{blocks} blocks of {} bytes in a volume of {} bytes",
            1024 << log_block_size,
            reader.len
        ));
    }
    if per_group < 256 {
        return refuse(format!("{per_group} blocks per group"));
    }
    Ok(())
}

impl Ext4Fs {
    pub(super) fn open(reader: VolumeReader, volume: &str) -> Result<Ext4Fs> {
        check_geometry(&reader, volume)?;
        match ext4_view::Ext4::load(Box::new(reader.clone())) {
            Ok(fs) => Ok(Ext4Fs { fs, volume: volume.to_string(), reader, known_directories: RefCell::default() }),
            Err(e) => Err(fs_error(&reader.failure, volume, b"/", e)),
        }
    }

    fn error(&self, path: &[u8], e: ext4_view::Ext4Error) -> crate::error::Error {
        match e {
            ext4_view::Ext4Error::NotFound => not_found(&self.reader.failure, &self.volume, path),
            // ext4-view 1.0 takes a time before 1970 (a negative one, which ext4 stores and Linux reads) for
            // damage, and then reads nothing of the inode.
            e if e.to_string().ends_with("has invalid timestamp") => fs_error(
                &self.reader.failure,
                &self.volume,
                path,
                format!("{e} (likely a time before 1970, which the ext4 reader used cannot decode: `dump` the volume and mount it to read this one)"),
            ),
            e => fs_error(&self.reader.failure, &self.volume, path, e),
        }
    }

    /// `path` as an ext4-view path (refused if not one a file system could hold: empty, relative, a NUL byte).
    fn path<'p>(&self, path: &'p [u8]) -> Result<ext4_view::Path<'p>> {
        ext4_view::Path::try_from(path).map_err(|_| self.error(path, ext4_view::Ext4Error::MalformedPath))
    }

    /// `path` without symlinks (the last one followed if `follow_last`), for ext4-view to follow none.
    fn resolve(&self, path: &[u8], follow_last: bool) -> Result<Vec<u8>> {
        let is_symlink = &mut |p: &[u8]| {
            if self.known_directories.borrow().contains(p) {
                return Ok(false);
            }
            let meta = self.fs.symlink_metadata(self.path(p)?).map_err(|e| self.error(p, e))?;
            if meta.is_dir() {
                let mut known = self.known_directories.borrow_mut();
                if known.len() >= MAX_KNOWN_DIRECTORIES {
                    known.clear();
                }
                known.insert(p.to_vec());
            }
            Ok(meta.file_type() == ext4_view::FileType::Symlink)
        };
        let target = &mut |p: &[u8]| {
            let meta = self.fs.symlink_metadata(self.path(p)?).map_err(|e| self.error(p, e))?;
            self.link_target(p, &meta)
        };
        follow_symlinks(path, follow_last, is_symlink, target, &|what| {
            fs_error(&self.reader.failure, &self.volume, path, what)
        })
    }

    /// The target of symlink `path` (whose ancestors are no symlinks), unless its inode claims one longer than a
    /// path can be.
    fn link_target(&self, path: &[u8], meta: &ext4_view::Metadata) -> Result<Vec<u8>> {
        if meta.len() > MAX_SYMLINK_TARGET {
            let what = format!("a symlink whose inode claims a {}-byte target (a damaged inode)", meta.len());
            return Err(fs_error(&self.reader.failure, &self.volume, path, what));
        }
        Ok(self.fs.read_link(self.path(path)?).map_err(|e| self.error(path, e))?.as_ref().to_vec())
    }

    /// The entry at `path` (as the user names it), whose inode `meta` describes; `real` is `path` resolved.
    fn describe(&self, path: &[u8], real: &[u8], name: Vec<u8>, meta: ext4_view::Metadata) -> Result<Entry> {
        use ext4_view::FileType as T;
        let kind = match meta.file_type() {
            T::Regular => EntryKind::File,
            T::Directory => EntryKind::Dir,
            T::Symlink => EntryKind::Symlink,
            T::BlockDevice => EntryKind::BlockDevice,
            T::CharacterDevice => EntryKind::CharDevice,
            T::Fifo => EntryKind::Fifo,
            T::Socket => EntryKind::Socket,
        };
        let target_bytes = if kind == EntryKind::Symlink { self.link_target(real, &meta)? } else { Vec::new() };
        let mtime = meta.modified();
        Ok(Entry {
            path: guest_path(&self.volume, path),
            name,
            kind,
            size: meta.len(),
            mode: meta.mode(),
            uid: meta.uid(),
            gid: meta.gid(),
            mtime: mtime.seconds(),
            mtime_nanos: mtime.nanoseconds(),
            target: (kind == EntryKind::Symlink).then(|| String::from_utf8_lossy(&target_bytes).into_owned()),
            target_bytes,
            // ext4-view tells neither inode numbers nor link counts.
            inode: None,
            links: 1,
        })
    }
}

impl FileSystem for Ext4Fs {
    fn entry(&self, path: &[u8]) -> Result<Entry> {
        let real = self.resolve(path, false)?;
        let meta = self.fs.symlink_metadata(self.path(&real)?).map_err(|e| self.error(path, e))?;
        let name = path.rsplit(|&b| b == b'/').next().unwrap_or_default().to_vec();
        self.describe(path, &real, name, meta)
    }

    fn read_dir(&self, path: &[u8]) -> Result<Listing> {
        let real = self.resolve(path, true)?;
        let entries = match self.fs.read_dir(self.path(&real)?) {
            Ok(entries) => entries,
            Err(ext4_view::Ext4Error::Encrypted) => {
                return Ok(Listing::Unreadable("encrypted with fscrypt, whose keys the guest holds"))
            }
            Err(e) => return Err(self.error(path, e)),
        };
        let (mut out, mut unreadable) = (Vec::new(), Vec::new());
        for entry in entries {
            let entry = entry.map_err(|e| self.error(path, e))?;
            let name = entry.file_name().as_ref().to_vec();
            if name == b"." || name == b".." {
                continue;
            }
            let child = join(path, &name);
            let real_child = join(&real, &name);
            let read = entry
                .metadata()
                .map_err(|e| self.error(&child, e))
                .and_then(|m| self.describe(&child, &real_child, name, m));
            Listing::add(&mut out, &mut unreadable, child.clone(), guest_path(&self.volume, &child), read)?;
        }
        Ok(Listing::Entries(out, unreadable))
    }

    fn read_file(&self, path: &[u8], out: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<u64> {
        let real = self.resolve(path, true)?;
        let mut file = self.fs.open(self.path(&real)?).map_err(|e| self.error(path, e))?;
        let len = file.metadata().len();
        // read_bytes stops at each file system block.
        copy_chunks(len, &mut |buf| file.read_bytes(buf).map_err(|e| self.error(path, e)), out)
    }
}
