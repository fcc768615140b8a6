//! Files inside snapshot disks, for file-level restore (`ls`, `dump`, `extract`).
//!
//! A disk's partition table ([`partitions`]) and its file systems are read in user space from a snapshot disk
//! (serve's [`SnapshotDisk`](crate::serve::SnapshotDisk)): only the blocks a lookup touches are fetched, and a
//! file read from start to end is fetched ahead. Nothing is mounted: no root, no loop or NBD device, no kernel
//! parsing a file system that a guest (perhaps a compromised one) wrote. ext2/3/4 are read with the `ext4-view`
//! crate, which replays the journal in memory, as the file system of a crash-consistent VM snapshot needs
//! (`guestfs/ext4.rs`); NTFS with the `ntfs` crate (`guestfs/ntfs.rs`). Other file systems are recognised and
//! named; `dump` of a volume streams its raw bytes for tools that read them (`dump … /part2 > part2.img`, then
//! mount that locally).
//!
//! Guest paths start with the volume: `/part2/etc/fstab` (partition 2, numbered as Linux numbers them), or
//! `/whole/etc/fstab` for a disk formatted without a partition table. `/` lists the volumes.

mod ext4;
pub mod extract;
mod ntfs;
pub mod partitions;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::nbd::server::Device;
use partitions::TableKind;

/// The name of the volume that is the whole disk (a file system without a partition table).
pub const WHOLE_DISK: &str = "whole";

/// What a volume holds, by the signature at its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Ext,
    Ntfs,
    Vfat,
    Xfs,
    Btrfs,
    Lvm,
    Luks,
    Swap,
    Unknown,
}

impl FsKind {
    pub fn name(self) -> &'static str {
        match self {
            FsKind::Ext => "ext2/3/4",
            FsKind::Ntfs => "ntfs",
            FsKind::Vfat => "vfat",
            FsKind::Xfs => "xfs",
            FsKind::Btrfs => "btrfs",
            FsKind::Lvm => "lvm2 pv",
            FsKind::Luks => "luks",
            FsKind::Swap => "swap",
            FsKind::Unknown => "unknown",
        }
    }

    /// Whether diskvault lists and reads its files.
    pub fn readable(self) -> bool {
        matches!(self, FsKind::Ext | FsKind::Ntfs)
    }
}

/// A partition, or the whole disk, and what it holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Volume {
    /// `part2`, or [`WHOLE_DISK`].
    pub name: String,
    pub start: u64,
    pub len: u64,
    /// The partition table's type for it (empty for the whole disk).
    pub partition_type: String,
    /// The GPT partition name.
    pub partition_name: String,
    pub fs: FsKind,
    /// The file system's label, where it has one.
    pub label: String,
}

/// A snapshot disk's volumes, opened for reading files.
pub struct GuestDisk {
    disk: Arc<dyn Device>,
    pub table: Option<TableKind>,
    pub volumes: Vec<Volume>,
}

/// Reads volume bytes, keeping the disk's own error: a damaged blob is reported as the repository names it,
/// not as the file system library's "io error".
#[derive(Clone)]
struct VolumeReader {
    disk: Arc<dyn Device>,
    start: u64,
    len: u64,
    failure: Rc<RefCell<Option<Error>>>,
}

impl VolumeReader {
    /// Fills `buf` from `offset` of the volume. A failure is kept for [`fs_error`], and handed to the file
    /// system library as text.
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), String> {
        let read = match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => self.disk.read(self.start + offset, buf),
            _ => Err(Error::invalid(format!(
                "read of {} bytes at {offset} beyond the volume's {} bytes",
                buf.len(),
                self.len
            ))),
        };
        read.map_err(|e| {
            let text = e.to_string();
            *self.failure.borrow_mut() = Some(e);
            text
        })
    }
}

/// The file system signatures looked for at a volume's start (they all lie in its first 68 KiB).
fn probe(head: &[u8]) -> (FsKind, String) {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    let label = |off: usize, len: usize| {
        let raw = head.get(off..off + len).unwrap_or_default();
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        String::from_utf8_lossy(&raw[..end]).trim().to_string()
    };
    if at(1080, &[0x53, 0xef]) {
        (FsKind::Ext, label(1024 + 120, 16))
    } else if at(3, b"NTFS    ") {
        (FsKind::Ntfs, String::new())
    } else if at(82, b"FAT32   ") {
        (FsKind::Vfat, label(71, 11))
    } else if at(54, b"FAT1") {
        (FsKind::Vfat, label(43, 11))
    } else if at(0, b"XFSB") {
        (FsKind::Xfs, label(108, 12))
    } else if at(0x10040, b"_BHRfS_M") {
        (FsKind::Btrfs, label(0x1012b, 256))
    } else if (0..4).any(|s| at(512 * s, b"LABELONE") && at(512 * s + 24, b"LVM2 001")) {
        (FsKind::Lvm, String::new())
    } else if at(0, b"LUKS\xba\xbe") {
        (FsKind::Luks, String::new())
    } else if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        (FsKind::Swap, String::new())
    } else {
        (FsKind::Unknown, String::new())
    }
}

/// Bytes read from a volume's start to recognise its file system (btrfs's superblock is at 64 KiB).
const PROBE_BYTES: u64 = 0x10000 + 4096;

impl GuestDisk {
    /// Reads `disk`'s partition table and recognises the file system of each partition (or of the whole disk).
    pub fn open(disk: Arc<dyn Device>) -> Result<GuestDisk> {
        let len = disk.size();
        // The disk's own error is kept: a damaged blob is reported as the repository names it.
        let failure: RefCell<Option<Error>> = RefCell::default();
        let mut read = |off: u64, buf: &mut [u8]| {
            disk.read(off, buf).map_err(|e| {
                let text = e.to_string();
                *failure.borrow_mut() = Some(e);
                text
            })
        };
        let head_of = |read: &mut partitions::ReadAt, start, vol_len| {
            let mut head = vec![0u8; PROBE_BYTES.min(vol_len) as usize];
            read(start, &mut head).map(|()| probe(&head))
        };
        let describe =
            |e: String| failure.borrow_mut().take().unwrap_or_else(|| Error::invalid(format!("partition table: {e}")));
        // A file system on the whole disk first: a FAT or NTFS boot sector ends like an MBR.
        let whole = head_of(&mut read, 0, len).map_err(describe)?;
        let (table, parts) = if whole.0 != FsKind::Unknown {
            (None, Vec::new())
        } else {
            match partitions::read_table(&mut read, len).map_err(describe)? {
                Some((kind, parts)) => (Some(kind), parts),
                None => (None, Vec::new()),
            }
        };
        let mut volumes = Vec::new();
        if table.is_none() {
            volumes.push(Volume {
                name: WHOLE_DISK.into(),
                start: 0,
                len,
                partition_type: String::new(),
                partition_name: String::new(),
                fs: whole.0,
                label: whole.1,
            });
        }
        for p in parts {
            let (fs, label) = head_of(&mut read, p.start, p.len).map_err(describe)?;
            volumes.push(Volume {
                name: format!("part{}", p.number),
                start: p.start,
                len: p.len,
                partition_type: p.type_name,
                partition_name: p.name,
                fs,
                label,
            });
        }
        Ok(GuestDisk { disk, table, volumes })
    }

    /// The volume called `name`.
    pub fn volume(&self, name: &str) -> Result<&Volume> {
        self.volumes.iter().find(|v| v.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.volumes.iter().map(|v| v.name.as_str()).collect();
            Error::invalid(format!("the disk has no volume {name:?} (volumes: {})", names.join(", ")))
        })
    }

    /// Streams `volume`'s raw bytes to `out`, a block at a time. Returns the bytes written.
    pub fn dump_volume(&self, volume: &Volume, out: &mut dyn std::io::Write) -> Result<u64> {
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < volume.len {
            let n = (volume.len - done).min(buf.len() as u64) as usize;
            self.disk.read(volume.start + done, &mut buf[..n])?;
            out.write_all(&buf[..n]).map_err(|e| Error::local("standard output", e))?;
            done += n as u64;
        }
        Ok(done)
    }

    /// The file system of `volume`, opened.
    pub fn fs(&self, volume: &Volume) -> Result<GuestFs> {
        let reader =
            VolumeReader { disk: self.disk.clone(), start: volume.start, len: volume.len, failure: Rc::default() };
        let inner: Box<dyn FileSystem> = match volume.fs {
            FsKind::Ext => Box::new(ext4::Ext4Fs::open(reader, &volume.name)?),
            FsKind::Ntfs => Box::new(ntfs::NtfsFs::open(reader, &volume.name)?),
            other => {
                return Err(Error::invalid(format!(
                    "{} holds {}, whose files diskvault does not read (ext2/3/4 and NTFS only); `dump` of /{} gives \
                     its raw bytes to mount locally",
                    volume.name,
                    other.name(),
                    volume.name
                )))
            }
        };
        Ok(GuestFs { inner })
    }
}

/// What a file system backend answers; paths are the part after the volume (`/etc`), as bytes.
trait FileSystem {
    /// The entry at `path`, not following a final symlink.
    fn entry(&self, path: &[u8]) -> Result<Entry>;
    /// The entries of directory `path`, without `.` and `..`, each with its path.
    fn read_dir(&self, path: &[u8]) -> Result<Vec<(Vec<u8>, Entry)>>;
    /// Hands the contents of regular file `path` (a symlink followed) to `out` in chunks, with their offsets.
    /// Returns the size.
    fn read_file(&self, path: &[u8], out: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<u64>;
}

/// The error of a file system operation: the disk's own error where reading failed (a damaged blob, named as
/// the repository names it), else `what` at the guest path.
fn fs_error(failure: &Rc<RefCell<Option<Error>>>, volume: &str, path: &[u8], what: impl std::fmt::Display) -> Error {
    if let Some(disk_error) = failure.borrow_mut().take() {
        return disk_error;
    }
    Error::invalid(format!("{}: {what}", guest_path(volume, path)))
}

/// `/part2/etc`: a path within a volume as the user writes it.
fn guest_path(volume: &str, path: &[u8]) -> String {
    let shown =
        if path == b"/" || path.is_empty() { String::new() } else { String::from_utf8_lossy(path).into_owned() };
    format!("/{volume}{shown}")
}

/// What a directory entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    BlockDevice,
    CharDevice,
    Fifo,
    Socket,
}

/// A file, directory or other entry of a guest file system.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entry {
    /// The guest path, volume first (`/part2/etc/fstab`); names that are not UTF-8 are shown lossily.
    pub path: String,
    /// The name's bytes as the file system stores them.
    #[serde(skip)]
    pub name: Vec<u8>,
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits, with setuid, setgid and sticky (`0o7777`).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    #[serde(skip)]
    pub mtime_nanos: u32,
    /// A symlink's target.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    #[serde(skip)]
    pub target_bytes: Vec<u8>,
}

/// A readable file system of a [`GuestDisk`] volume. Paths given to it are the part after the volume: `/etc`.
pub struct GuestFs {
    inner: Box<dyn FileSystem>,
}

/// `dir` + `/` + `name`.
fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if p.last() != Some(&b'/') {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

impl GuestFs {
    /// The entry at `path`, not following a final symlink.
    pub fn entry(&self, path: &[u8]) -> Result<Entry> {
        self.inner.entry(path)
    }

    /// The entries of directory `path` (not `.` and `..`), by name, with the path of each.
    pub fn read_dir(&self, path: &[u8]) -> Result<Vec<(Vec<u8>, Entry)>> {
        let mut entries = self.inner.read_dir(path)?;
        entries.sort_by(|a, b| a.1.name.cmp(&b.1.name));
        Ok(entries)
    }

    /// Every entry under directory `path`, depth first and by name, each directory before its contents.
    pub fn walk(&self, path: &[u8], f: &mut dyn FnMut(&[u8], &Entry) -> Result<()>) -> Result<()> {
        for (child, e) in self.read_dir(path)? {
            f(&child, &e)?;
            if e.kind == EntryKind::Dir {
                self.walk(&child, f)?;
            }
        }
        Ok(())
    }

    /// Copies the contents of regular file `path` (a symlink is followed, within the guest file system) to
    /// `out`, a chunk at a time: `out` gets each chunk's offset, so a caller can leave holes. Returns the size.
    pub fn read_file(&self, path: &[u8], out: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<u64> {
        self.inner.read_file(path, out)
    }
}

/// A guest path split at its volume: `/part2/etc/fstab` is `("part2", "/etc/fstab")`, `/part2` is
/// `("part2", "/")` and `/` is `None` (the disk's volumes).
pub fn split_path(path: &str) -> Result<Option<(&str, String)>> {
    let trimmed = path.trim_start_matches('/');
    if !path.starts_with('/') {
        return Err(Error::invalid(format!(
            "guest path {path:?} is not absolute: it starts with the volume, as in /part1/etc/fstab"
        )));
    }
    if trimmed.is_empty() {
        return Ok(None);
    }
    let (volume, rest) = trimmed.split_once('/').unwrap_or((trimmed, ""));
    let rest = rest.trim_end_matches('/');
    Ok(Some((volume, format!("/{rest}"))))
}
