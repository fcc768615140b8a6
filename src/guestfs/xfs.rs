//! XFS volumes (the root file system of RHEL, Rocky, AlmaLinux, Oracle Linux and CentOS guests), read with the
//! `lamxfs` crate: v4 and v5 layouts, every directory format, extent B+trees, unwritten extents as zeros, and a
//! v5 log that still holds committed changes (a crash-consistent snapshot) replayed in memory as Linux replays
//! it at mount. What it cannot read correctly (a v4 log left dirty, a realtime section, an external log) it
//! refuses.
//!
//! lamxfs answers a file's type, permissions and size. Owner, modification time and link count are read here
//! from the inode's core on the volume, and used only when that core is the inode lamxfs read (same inode
//! number, type, permissions and size): an inode that only the log's replay brings into being shows owner 0 and
//! time 0.
//! lamxfs resolves paths without following symlinks; [`XfsFs::lookup`] follows them as the kernel does.

use std::cell::RefCell;

use super::{
    copy_chunks, follow_symlinks, fs_error, guest_path, join, not_found, Entry, EntryKind, FileSystem, Listing,
    VolumeReader,
};
use crate::error::{Error, Result};

/// The volume as lamxfs reads it, with its small reads (inodes, directory and extent-tree blocks: metadata)
/// kept. lamxfs reads the directories of a path from the root for every lookup, and those blocks lie across the
/// allocation groups: without this, the file contents streaming through serve's blob cache pushed them out, and
/// each lookup decompressed their 1 MiB blocks again (zstd was 40% of an extraction's CPU).
struct CachedVolume {
    reader: VolumeReader,
    small_reads: lru::LruCache<(u64, usize), Box<[u8]>>,
    cached_bytes: usize,
}

/// Reads up to this size are metadata to keep.
const SMALL_READ: usize = 64 << 10;
/// Bytes of small reads kept.
const SMALL_READS_KEPT: usize = 16 << 20;

impl lamxfs::BlockRead for CachedVolume {
    type Error = String;

    fn read_at(&mut self, offset_bytes: u64, buf: &mut [u8]) -> std::result::Result<(), String> {
        if buf.len() > SMALL_READ {
            return self.reader.read(offset_bytes, buf);
        }
        if let Some(kept) = self.small_reads.get(&(offset_bytes, buf.len())) {
            buf.copy_from_slice(kept);
            return Ok(());
        }
        self.reader.read(offset_bytes, buf)?;
        self.cached_bytes += buf.len();
        self.small_reads.put((offset_bytes, buf.len()), buf.into());
        while self.cached_bytes > SMALL_READS_KEPT {
            match self.small_reads.pop_lru() {
                Some((_, old)) => self.cached_bytes -= old.len(),
                None => break,
            }
        }
        Ok(())
    }
}

/// Where inodes lie, from the superblock: enough to read an inode's core by number.
struct Geometry {
    block_size: u64,
    ag_blocks: u64,
    inode_size: u64,
    inodes_per_block_log: u32,
    ag_blocks_log: u32,
}

pub(super) struct XfsFs {
    fs: RefCell<lamxfs::Xfs<CachedVolume>>,
    geometry: Geometry,
    volume: String,
    reader: VolumeReader,
}

/// What is read here from an inode's core.
struct Core {
    uid: u32,
    gid: u32,
    mtime: i64,
    mtime_nanos: u32,
    links: u32,
}

/// An inode as described here.
struct Described {
    ino: u64,
    mode: u32,
    size: u64,
}

impl XfsFs {
    pub(super) fn open(reader: VolumeReader, volume: &str) -> Result<XfsFs> {
        let mut sb = [0u8; 512];
        reader.read(0, &mut sb).map_err(|e| fs_error(&reader.failure, volume, b"/", e))?;
        let be32 = |at: usize| u64::from(u32::from_be_bytes(sb[at..at + 4].try_into().expect("4 bytes")));
        let geometry = Geometry {
            block_size: be32(4),
            ag_blocks: be32(84),
            inode_size: u64::from(u16::from_be_bytes([sb[104], sb[105]])),
            inodes_per_block_log: u32::from(sb[123]),
            ag_blocks_log: u32::from(sb[124]),
        };
        let cached = CachedVolume { reader: reader.clone(), small_reads: lru::LruCache::unbounded(), cached_bytes: 0 };
        let fs = lamxfs::Xfs::open(cached, reader.len)
            .map_err(|e| fs_error(&reader.failure, volume, b"/", describe_error(&e)))?;
        Ok(XfsFs { fs: RefCell::new(fs), geometry, volume: volume.to_string(), reader })
    }

    fn error(&self, path: &[u8], e: lamxfs::Error) -> Error {
        match e {
            lamxfs::Error::NotFound { .. } => not_found(&self.reader.failure, &self.volume, path),
            e => fs_error(&self.reader.failure, &self.volume, path, describe_error(&e)),
        }
    }

    fn inode(&self, path: &[u8]) -> Result<lamxfs::Inode> {
        self.fs.borrow_mut().resolve(lamxfs::Path::new(path)).map_err(|e| self.error(path, e))
    }

    fn stat(&self, path: &[u8], ino: u64) -> Result<Described> {
        let meta = self.fs.borrow_mut().metadata(&lamxfs::Inode { ino }).map_err(|e| self.error(path, e))?;
        Ok(Described { ino, mode: meta.mode(), size: meta.size() })
    }

    /// `path` with every symlink in it followed (the last one too if `follow_last`), as a path without
    /// symlinks, `.` or `..` (what lamxfs resolves), and the inode it names.
    fn lookup(&self, path: &[u8], follow_last: bool) -> Result<(Vec<u8>, Described)> {
        // Most paths hold no symlink: lamxfs resolves those in one walk.
        if !path.split(|&b| b == b'/').any(|c| c == b"..") {
            let resolved = self.fs.borrow_mut().resolve(lamxfs::Path::new(path));
            if let Ok(inode) = resolved {
                let d = self.stat(path, inode.ino)?;
                if !(follow_last && kind_of(d.mode) == EntryKind::Symlink) {
                    return Ok((path.to_vec(), d));
                }
            }
            self.reader.failure.borrow_mut().take();
        }
        let real = follow_symlinks(
            path,
            follow_last,
            &mut |p| Ok(kind_of(self.stat(p, self.inode(p)?.ino)?.mode) == EntryKind::Symlink),
            &mut |p| self.link_target(p),
            &|what| self.error_text(path, what),
        )?;
        let d = self.stat(&real, self.inode(&real)?.ino)?;
        Ok((real, d))
    }

    fn link_target(&self, path: &[u8]) -> Result<Vec<u8>> {
        self.fs.borrow_mut().read_link(lamxfs::Path::new(path)).map_err(|e| self.error(path, e))
    }

    fn error_text(&self, path: &[u8], what: &str) -> Error {
        fs_error(&self.reader.failure, &self.volume, path, what)
    }

    /// Owner, modification time and link count from the inode's core on the volume, when it is the inode
    /// lamxfs described (else the log's replay changed it: `None`). An error when the core cannot be read.
    fn core(&self, path: &[u8], d: &Described) -> Result<Option<Core>> {
        let g = &self.geometry;
        let per_ag_bits = g.ag_blocks_log + g.inodes_per_block_log;
        if per_ag_bits >= 64 || g.inode_size < 176 {
            return Ok(None);
        }
        let ag = d.ino >> per_ag_bits;
        let in_ag = d.ino & ((1 << per_ag_bits) - 1);
        let offset = ag
            .checked_mul(g.ag_blocks)
            .and_then(|b| b.checked_add(in_ag >> g.inodes_per_block_log))
            .and_then(|b| b.checked_mul(g.block_size))
            .and_then(|o| o.checked_add((in_ag & ((1 << g.inodes_per_block_log) - 1)).checked_mul(g.inode_size)?));
        let Some(offset) = offset else { return Ok(None) };
        let mut core = [0u8; 176];
        // A damaged block is the repository's error, not a reason to show made-up owners and times.
        self.reader.read(offset, &mut core).map_err(|e| self.error_text(path, &e))?;
        let be16 = |at: usize| u16::from_be_bytes([core[at], core[at + 1]]);
        let be32 = |at: usize| u32::from_be_bytes(core[at..at + 4].try_into().expect("4 bytes"));
        let be64 = |at: usize| u64::from_be_bytes(core[at..at + 8].try_into().expect("8 bytes"));
        let version = core[4];
        let same = be16(0) == 0x494e // "IN"
            && u32::from(be16(2)) == d.mode
            && be64(56) == d.size
            && (version < 3 || be64(152) == d.ino);
        if !same {
            return Ok(None);
        }
        // Version 3 cores with the bigtime flag count nanoseconds from 1901-12-13 (2^31 s before the epoch).
        let bigtime = version >= 3 && be64(120) & (1 << 3) != 0;
        let (mtime, nanos) = if bigtime {
            let ns = be64(40);
            ((ns / 1_000_000_000) as i64 - (1 << 31), (ns % 1_000_000_000) as u32)
        } else {
            (i64::from(be32(40) as i32), be32(44))
        };
        // Version 1 cores kept the link count in 16 bits at 6; later ones in 32 bits at 16.
        let links = if version == 1 { u32::from(be16(6)) } else { be32(16) };
        Ok(Some(Core { uid: be32(8), gid: be32(12), mtime, mtime_nanos: nanos.min(999_999_999), links }))
    }

    /// The entry at `shown` (the path as the caller gave it), which is `real` with its symlinks followed.
    fn describe(&self, shown: &[u8], real: &[u8], name: Vec<u8>, d: &Described) -> Result<Entry> {
        let kind = kind_of(d.mode);
        let target_bytes = if kind == EntryKind::Symlink { self.link_target(real)? } else { Vec::new() };
        let core = self.core(real, d)?.unwrap_or(Core { uid: 0, gid: 0, mtime: 0, mtime_nanos: 0, links: 1 });
        Ok(Entry {
            path: guest_path(&self.volume, shown),
            name,
            kind,
            size: d.size,
            mode: (d.mode & 0o7777) as u16,
            uid: core.uid,
            gid: core.gid,
            mtime: core.mtime,
            mtime_nanos: core.mtime_nanos,
            target: (kind == EntryKind::Symlink).then(|| String::from_utf8_lossy(&target_bytes).into_owned()),
            target_bytes,
            inode: Some(d.ino),
            links: core.links.max(1),
        })
    }
}

impl FileSystem for XfsFs {
    fn entry(&self, path: &[u8]) -> Result<Entry> {
        let (real, d) = self.lookup(path, false)?;
        let name = path.rsplit(|&b| b == b'/').next().unwrap_or_default().to_vec();
        self.describe(path, &real, name, &d)
    }

    fn read_dir(&self, path: &[u8]) -> Result<Listing> {
        let (real, _) = self.lookup(path, true)?;
        let listed = self.fs.borrow_mut().read_dir(lamxfs::Path::new(&real)).map_err(|e| self.error(path, e))?;
        let (mut out, mut unreadable) = (Vec::new(), Vec::new());
        for entry in listed {
            if entry.name == b"." || entry.name == b".." {
                continue;
            }
            let child = join(path, &entry.name);
            let real_child = join(&real, &entry.name);
            let read =
                self.stat(&child, entry.inode_number).and_then(|d| self.describe(&child, &real_child, entry.name, &d));
            Listing::add(&mut out, &mut unreadable, child.clone(), guest_path(&self.volume, &child), read)?;
        }
        Ok(Listing::Entries(out, unreadable))
    }

    fn read_file(&self, path: &[u8], out: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<u64> {
        let (_, d) = self.lookup(path, true)?;
        let inode = lamxfs::Inode { ino: d.ino };
        if kind_of(d.mode) != EntryKind::File {
            return Err(self.error_text(path, "not a regular file"));
        }
        let mut offset = 0u64;
        let copied = copy_chunks(
            d.size,
            &mut |buf| {
                let n = self.fs.borrow_mut().read_file_at(&inode, offset, buf).map_err(|e| self.error(path, e))?;
                offset += n as u64;
                Ok(n)
            },
            out,
        )?;
        if copied != d.size {
            return Err(self.error_text(path, &format!("read {copied} bytes of its {}", d.size)));
        }
        Ok(copied)
    }
}

/// What a mode's file type bits say.
fn kind_of(mode: u32) -> EntryKind {
    match mode & 0o170000 {
        0o040000 => EntryKind::Dir,
        0o120000 => EntryKind::Symlink,
        0o060000 => EntryKind::BlockDevice,
        0o020000 => EntryKind::CharDevice,
        0o010000 => EntryKind::Fifo,
        0o140000 => EntryKind::Socket,
        _ => EntryKind::File,
    }
}

/// lamxfs's error as a user reads it (lamxfs gives a token such as `sb_dirty_log`).
fn describe_error(e: &lamxfs::Error) -> String {
    use lamxfs::{Error as X, SuperblockReason as R};
    match e {
        X::NotFound { .. } => "no such file or directory".into(),
        X::NotARegularFile => "not a regular file".into(),
        X::NotASymlink => "not a symlink".into(),
        X::BadSuperblock(R::DirtyLog) => "its log holds changes that cannot be replayed here (a v4 file system \
                                          shut down uncleanly, or a log item lamxfs does not know); mount a \
                                          restored copy under Linux once to replay it"
            .into(),
        X::BadSuperblock(R::ExternalLog) => "its log is on another device, which a backup of this disk lacks".into(),
        X::BadSuperblock(R::RealtimeDevice) => "it has a realtime section, which is not read here".into(),
        X::BadSuperblock(reason) => format!("not a readable XFS superblock ({reason:?})"),
        X::UnsupportedFeature(feature) => format!("uses the XFS feature {feature}, which is not read here"),
        X::BadCrc { ag, ag_block, what } => {
            format!("damaged XFS {what}: checksum mismatch in AG {ag} block {ag_block}")
        }
        X::Inconsistent { token, where_ } => format!("damaged XFS structure ({token} at {where_:?})"),
        X::FileTooLarge { size, .. } => format!("a file of {size} bytes, larger than lamxfs reads at once"),
        X::Io { offset, .. } => format!("read at byte {offset} of the volume failed"),
        X::OutOfMemory { site } => format!("out of memory ({site})"),
    }
}
