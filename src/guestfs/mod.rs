//! Files inside snapshot disks, for file-level restore (`ls`, `find`, `dump`, `extract`, `diff --files`).
//!
//! A disk's partition table ([`partitions`]) and its file systems are read in user space from a snapshot disk
//! (serve's [`SnapshotDisk`](crate::serve::SnapshotDisk)): only the blocks a lookup touches are fetched, and a
//! file read from start to end is fetched ahead. Nothing is mounted: no root, no loop or NBD device, no kernel
//! parsing a file system that a guest (perhaps a compromised one) wrote. ext2/3/4 are read with the `ext4-view`
//! crate, which replays the journal in memory, as the file system of a crash-consistent VM snapshot needs
//! (`guestfs/ext4.rs`); XFS with the `lamxfs` crate, which replays its log in memory too (`guestfs/xfs.rs`);
//! NTFS with the `ntfs` crate (`guestfs/ntfs.rs`). Other file systems are recognised and
//! named; `dump` of a volume streams its raw bytes for tools that read them (`dump … /part2 > part2.img`, then
//! mount that locally).
//!
//! Guest paths start with the volume: `/part2/etc/fstab` (partition 2, numbered as Linux numbers them),
//! `/whole/etc/fstab` for a disk formatted without a partition table, or `/rhel-root/etc/fstab` for an LVM
//! logical volume ([`lvm`]), by its device-mapper name. `/` lists the volumes.

pub mod compare;
mod ext4;
pub mod extract;
pub mod find;
pub mod lvm;
mod ntfs;
pub mod partitions;
pub mod tar;
mod xfs;

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
        matches!(self, FsKind::Ext | FsKind::Ntfs | FsKind::Xfs)
    }
}

/// A partition, the whole disk or an LVM logical volume, and what it holds.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Volume {
    /// `part2`, [`WHOLE_DISK`], or a logical volume's device-mapper name (`rhel-root`: VG and LV, dashes in
    /// them doubled).
    pub name: String,
    /// Where it starts on the disk (a logical volume: its first extent).
    pub start: u64,
    pub len: u64,
    /// The partition table's type for it (empty for the whole disk), or `LVM logical volume`.
    pub partition_type: String,
    /// The GPT partition name, or a logical volume's `VG/LV`.
    pub partition_name: String,
    pub fs: FsKind,
    /// The file system's label, where it has one.
    pub label: String,
    /// Why its bytes cannot be read from this disk, if they cannot (a logical volume on other disks too, a thin
    /// one, LVM metadata that does not parse).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unreadable: Option<String>,
    /// (offset in the volume, offset on the disk, length): one for a partition, a logical volume's segments.
    #[serde(skip)]
    extents: Arc<[(u64, u64, u64)]>,
}

impl Volume {
    /// Whether this volume holds exactly the bytes `earlier` (the volume of that name in an earlier snapshot of
    /// the disk) held: laid out on the disk alike, and none of its bytes among `changed`, the byte ranges of the
    /// disk that differ between the two snapshots. Then no file in it can differ (`diff --files` skips it).
    pub fn unchanged_since(&self, earlier: &Volume, changed: &[crate::source::Extent]) -> bool {
        self.unreadable.is_none()
            && self.extents == earlier.extents
            && self.fs == earlier.fs
            && self.extents.iter().all(|&(_, at, len)| !changed.iter().any(|c| c.start < at + len && at < c.end()))
    }
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
    /// As [`Volume::extents`]: in volume order, adjacent, from 0 to `len`.
    extents: Arc<[(u64, u64, u64)]>,
    len: u64,
    failure: Rc<RefCell<Option<Error>>>,
}

impl VolumeReader {
    fn new(disk: Arc<dyn Device>, extents: Arc<[(u64, u64, u64)]>, failure: Rc<RefCell<Option<Error>>>) -> Self {
        let len = extents.iter().map(|e| e.2).sum();
        VolumeReader { disk, extents, len, failure }
    }

    /// Reads `buf` from `offset` of the volume, extent by extent.
    fn read_extents(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0;
        for &(vol_off, disk_off, len) in self.extents.iter() {
            let at = offset + done as u64;
            if done == buf.len() {
                break;
            }
            if at >= vol_off && at < vol_off + len {
                let n = ((vol_off + len - at) as usize).min(buf.len() - done);
                self.disk.read(disk_off + (at - vol_off), &mut buf[done..done + n])?;
                done += n;
            }
        }
        if done < buf.len() {
            return Err(Error::invalid(format!("bytes {offset}.. of the volume are in none of its extents")));
        }
        Ok(())
    }

    /// Fills `buf` from `offset` of the volume. A failure is kept for [`fs_error`], and handed to the file
    /// system library as text.
    fn read(&self, offset: u64, buf: &mut [u8]) -> std::result::Result<(), String> {
        let read = match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => self.read_extents(offset, buf),
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
    /// Reads `disk`'s partition table and the LVM metadata of its physical volumes, and recognises the file
    /// system of each volume.
    pub fn open(disk: Arc<dyn Device>) -> Result<GuestDisk> {
        let len = disk.size();
        // The disk's own error is kept: a damaged blob is reported as the repository names it.
        let failure: Rc<RefCell<Option<Error>>> = Rc::default();
        let whole: Arc<[(u64, u64, u64)]> = Arc::new([(0, 0, len)]);
        let reader = VolumeReader::new(disk.clone(), whole.clone(), failure.clone());
        let failed = |what: &str, e: String| {
            failure.borrow_mut().take().unwrap_or_else(|| Error::invalid(format!("{what}: {e}")))
        };
        let probe_of = |r: &VolumeReader| {
            let mut head = vec![0u8; PROBE_BYTES.min(r.len) as usize];
            r.read(0, &mut head).map(|()| probe(&head)).map_err(|e| failed("file system signature", e))
        };
        let volume = |name: String, extents: Arc<[(u64, u64, u64)]>, partition_type: String, partition_name| {
            let r = VolumeReader::new(disk.clone(), extents.clone(), failure.clone());
            let (fs, label) = probe_of(&r)?;
            let start = extents.first().map_or(0, |e| e.1);
            Ok::<_, Error>(Volume {
                name,
                start,
                len: r.len,
                partition_type,
                partition_name,
                fs,
                label,
                unreadable: None,
                extents,
            })
        };
        // A file system on the whole disk first: a FAT or NTFS boot sector ends like an MBR.
        let on_whole = probe_of(&reader)?.0;
        let (table, parts) = match on_whole {
            FsKind::Unknown => match partitions::read_table(&mut |o, b| reader.read(o, b), len) {
                Ok(Some((kind, parts))) => (Some(kind), parts),
                Ok(None) => (None, Vec::new()),
                Err(e) => return Err(failed("partition table", e)),
            },
            _ => (None, Vec::new()),
        };
        let mut volumes = Vec::new();
        if table.is_none() {
            volumes.push(volume(WHOLE_DISK.into(), whole, String::new(), String::new())?);
        }
        for p in parts {
            let name = format!("part{}", p.number);
            volumes.push(volume(name, Arc::new([(0, p.start, p.len)]), p.type_name, p.name)?);
        }
        // The logical volumes of each LVM physical volume, after it.
        let mut with_lvs = Vec::new();
        for mut pv in volumes {
            let mut lvs = Vec::new();
            if pv.fs == FsKind::Lvm {
                let r = VolumeReader::new(disk.clone(), pv.extents.clone(), failure.clone());
                match lvm::read_lvs(&mut |o, b| r.read(o, b), r.len) {
                    Ok(found) => lvs = found.unwrap_or_default(),
                    Err(e) if failure.borrow().is_some() => return Err(failed("LVM", e)),
                    Err(e) => pv.unreadable = Some(e),
                }
            }
            let pv_start = pv.start;
            with_lvs.push(pv);
            for lv in lvs {
                let name = format!("{}-{}", lv.vg.replace('-', "--"), lv.name.replace('-', "--"));
                let path = format!("{}/{}", lv.vg, lv.name);
                let kind = "LVM logical volume".to_string();
                let extents: Arc<[(u64, u64, u64)]> =
                    lv.extents.iter().map(|&(o, p, n)| (o, pv_start + p, n)).collect();
                match lv.unreadable {
                    None => with_lvs.push(volume(name, extents, kind, path)?),
                    Some(why) => with_lvs.push(Volume {
                        name,
                        start: 0,
                        len: 0,
                        partition_type: kind,
                        partition_name: path,
                        fs: FsKind::Unknown,
                        label: String::new(),
                        unreadable: Some(why),
                        extents,
                    }),
                }
            }
        }
        Ok(GuestDisk { disk, table, volumes: with_lvs })
    }

    fn reader(&self, volume: &Volume) -> VolumeReader {
        VolumeReader::new(self.disk.clone(), volume.extents.clone(), Rc::default())
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
        if let Some(why) = &volume.unreadable {
            return Err(Error::invalid(format!("{} cannot be read: {why}", volume.name)));
        }
        let reader = self.reader(volume);
        let mut buf = vec![0u8; 1 << 20];
        let mut done = 0;
        while done < volume.len {
            let n = (volume.len - done).min(buf.len() as u64) as usize;
            reader.read_extents(done, &mut buf[..n])?;
            out.write_all(&buf[..n]).map_err(|e| Error::local("standard output", e))?;
            done += n as u64;
        }
        Ok(done)
    }

    /// The file system of `volume`, opened.
    pub fn fs(&self, volume: &Volume) -> Result<GuestFs> {
        if let Some(why) = &volume.unreadable {
            return Err(Error::invalid(format!("{} cannot be read: {why}", volume.name)));
        }
        let reader = self.reader(volume);
        let inner: Box<dyn FileSystem> = match volume.fs {
            FsKind::Ext => Box::new(ext4::Ext4Fs::open(reader, &volume.name)?),
            FsKind::Ntfs => Box::new(ntfs::NtfsFs::open(reader, &volume.name)?),
            FsKind::Xfs => Box::new(xfs::XfsFs::open(reader, &volume.name)?),
            other => {
                return Err(Error::invalid(format!(
                    "{} holds {}, whose files diskvault does not read (ext2/3/4, XFS and NTFS only); `dump` of /{} \
                     gives its raw bytes to mount locally",
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
    fn read_dir(&self, path: &[u8]) -> Result<Listing>;
    /// Hands the contents of regular file `path` (a symlink followed) to `out` in chunks, with their offsets.
    /// Returns the size.
    fn read_file(&self, path: &[u8], out: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<u64>;
    /// Why regular file `path`'s contents cannot be read here, if they cannot (and [`Self::read_file`] refuses).
    fn unreadable(&self, _path: &[u8]) -> Result<Option<&'static str>> {
        Ok(None)
    }
}

/// A directory's entries, each with its path.
pub type DirEntries = Vec<(Vec<u8>, Entry)>;

/// What reading a directory gave.
enum Listing {
    /// Its entries, each with its path, and those whose own record cannot be read (a damaged inode): named with
    /// the reason, so that one such entry does not hide the rest of the directory.
    Entries(DirEntries, Vec<Unentered>),
    /// Why the directory's entries cannot be read here (fscrypt-encrypted ext4); a walk goes on past it.
    Unreadable(&'static str),
}

impl Listing {
    /// Sorts out one entry of a directory being listed: `Ok` as read, or, if only that entry is damaged, named
    /// among the unreadable ones; any other error stops the listing.
    fn add(
        entries: &mut DirEntries,
        unreadable: &mut Vec<Unentered>,
        child: Vec<u8>,
        shown: String,
        read: Result<Entry>,
    ) -> Result<()> {
        match read {
            Ok(e) => entries.push((child, e)),
            Err(err) if is_damage(&err) => unreadable.push(Unentered { shown: left_out(&shown, &err), path: child }),
            Err(err) => return Err(err),
        }
        Ok(())
    }
}

/// What a copy of files out of a guest file system (`extract`, `dump` as tar) did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CopyStats {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Bytes of file contents (holes included).
    pub bytes: u64,
    /// Guest paths of devices, FIFOs and sockets, which are not copied.
    pub skipped: Vec<String>,
    /// Files whose contents, and directories whose entries, cannot be read (here, or from the repository:
    /// damaged data), with the reason (`path: reason`): not copied.
    pub unreadable: Vec<String>,
    /// Of `files`, those made a hard link to an earlier name of the same file, as the guest has them.
    pub hard_links: u64,
}

/// Whether `err`, met reading one file or directory, concerns only that one: damaged or missing repository
/// data under it, or a damaged guest structure. A copy leaves it out, names it and goes on. Anything else (the
/// storage unreachable, the session lost, the destination unwritable, an interruption) stops the copy.
pub fn is_damage(err: &Error) -> bool {
    matches!(err, Error::Corrupt { .. } | Error::Missing { .. } | Error::Invalid(_) | Error::NotFound(_))
}

/// `path: err`, as a report lists what it left out (the error alone when it names the path already).
fn left_out(path: &str, err: &Error) -> String {
    let err = err.to_string();
    if err.starts_with(path) {
        err
    } else {
        format!("{path}: {err}")
    }
}

/// The error of a file system operation: the disk's own error where reading failed (a damaged blob, named as
/// the repository names it), else `what` at the guest path.
fn fs_error(failure: &Rc<RefCell<Option<Error>>>, volume: &str, path: &[u8], what: impl std::fmt::Display) -> Error {
    if let Some(disk_error) = failure.borrow_mut().take() {
        return disk_error;
    }
    Error::invalid(format!("{}: {what}", guest_path(volume, path)))
}

/// No entry at `path` ([`Error::NotFound`]), unless reading the disk failed on the way: then the disk's error.
fn not_found(failure: &Rc<RefCell<Option<Error>>>, volume: &str, path: &[u8]) -> Error {
    if let Some(disk_error) = failure.borrow_mut().take() {
        return disk_error;
    }
    Error::NotFound(format!("{}: no such file or directory", guest_path(volume, path)))
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
    /// The file system's number for the file (XFS inode, NTFS file record), where the reader gives one: names
    /// of one file (hard links) share it, and a directory met again below itself is a damaged file system.
    #[serde(skip)]
    pub inode: Option<u64>,
    /// How many names the file has (1 when not known).
    #[serde(skip)]
    pub links: u32,
}

impl Entry {
    /// For a regular file with several names whose file system numbers its files, that number: a copy makes
    /// the file's later names hard links to the first.
    fn hard_link_key(&self) -> Option<u64> {
        self.inode.filter(|_| self.kind == EntryKind::File && self.links > 1)
    }
}

/// A directory a walk could not enter.
#[derive(Debug, Clone)]
pub struct Unentered {
    /// Its path in the file system (after the volume).
    pub path: Vec<u8>,
    /// `guest path: reason`, as reports list it.
    pub shown: String,
}

impl std::fmt::Display for Unentered {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// A readable file system of a [`GuestDisk`] volume. Paths given to it are the part after the volume: `/etc`.
pub struct GuestFs {
    inner: Box<dyn FileSystem>,
}

/// Hands a file of `len` bytes, as `read` gives it (perhaps less than asked each time: a file system block, a
/// data run), to `out` in chunks of up to 1 MiB with their offsets. Returns the bytes handed on.
fn copy_chunks(
    len: u64,
    read: &mut dyn FnMut(&mut [u8]) -> Result<usize>,
    out: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
) -> Result<u64> {
    // Sized to the file: most files are small, and zeroing 1 MiB for each was a tenth of an extraction's CPU.
    let mut buf = vec![0u8; len.clamp(1, 1 << 20) as usize];
    let mut offset = 0;
    loop {
        let mut filled = 0;
        while filled < buf.len() {
            match read(&mut buf[filled..])? {
                0 => break,
                n => filled += n,
            }
        }
        if filled == 0 {
            return Ok(offset);
        }
        out(offset, &buf[..filled])?;
        offset += filled as u64;
    }
}

/// Little-endian fields of guest structures at fixed offsets (callers check `b`'s length first).
fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// The part of guest path `guest` below `top`, a path it was walked from: a walk's paths are `top` + `/` +
/// names (no `.` or `..`: read_dir drops them). Empty for `top` itself.
fn below<'a>(top: &[u8], guest: &'a [u8]) -> &'a [u8] {
    let rest = &guest[top.len()..];
    rest.strip_prefix(b"/").unwrap_or(rest)
}

/// Symlinks followed in one path before it is refused, as Linux's limit.
const MAX_SYMLINK_HOPS: usize = 40;

/// `path` with every symlink in it followed (the last one too if `follow_last`): a path without symlinks, `.` or
/// `..`, which a file system reader then resolves without following any. `is_symlink` tells whether a path
/// holding no symlink but perhaps its last name names a symlink, `target` reads that symlink's target, and
/// `error` makes the error of a path with too many.
fn follow_symlinks(
    path: &[u8],
    follow_last: bool,
    is_symlink: &mut dyn FnMut(&[u8]) -> Result<bool>,
    target: &mut dyn FnMut(&[u8]) -> Result<Vec<u8>>,
    error: &dyn Fn(&str) -> Error,
) -> Result<Vec<u8>> {
    let mut todo: std::collections::VecDeque<Vec<u8>> = components(path).collect();
    let mut done: Vec<Vec<u8>> = Vec::new();
    let mut hops = 0;
    while let Some(name) = todo.pop_front() {
        if name == b".." {
            done.pop();
            continue;
        }
        let candidate = absolute(done.iter().chain([&name]));
        if (follow_last || !todo.is_empty()) && is_symlink(&candidate)? {
            hops += 1;
            if hops > MAX_SYMLINK_HOPS {
                return Err(error("too many levels of symbolic links"));
            }
            let target = target(&candidate)?;
            if target.starts_with(b"/") {
                done.clear();
            }
            for c in components(&target).collect::<Vec<_>>().into_iter().rev() {
                todo.push_front(c);
            }
        } else {
            done.push(name);
        }
    }
    Ok(absolute(done.iter()))
}

/// The names of a path, without empty ones and `.`.
fn components(path: &[u8]) -> impl Iterator<Item = Vec<u8>> + '_ {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty() && *c != b".").map(<[u8]>::to_vec)
}

/// `/a/b/c` from its names.
fn absolute<'a>(names: impl Iterator<Item = &'a Vec<u8>>) -> Vec<u8> {
    let mut p = Vec::new();
    for n in names {
        p.push(b'/');
        p.extend_from_slice(n);
    }
    if p.is_empty() {
        p.push(b'/');
    }
    p
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

    /// The entries of directory `path` (not `.` and `..`), by name, with the path of each; and those whose own
    /// record cannot be read (a damaged inode), with why.
    pub fn read_dir(&self, path: &[u8]) -> Result<(DirEntries, Vec<Unentered>)> {
        match self.sorted_dir(path)? {
            Listing::Entries(entries, unreadable) => Ok((entries, unreadable)),
            Listing::Unreadable(why) => Err(Error::invalid(format!("{}: {why}", self.inner.entry(path)?.path))),
        }
    }

    fn sorted_dir(&self, path: &[u8]) -> Result<Listing> {
        let mut listing = self.inner.read_dir(path)?;
        if let Listing::Entries(entries, unreadable) = &mut listing {
            entries.sort_by(|a, b| a.1.name.cmp(&b.1.name));
            unreadable.sort_by(|a, b| a.path.cmp(&b.path));
        }
        Ok(listing)
    }

    /// Every entry under directory `path`, depth first and by name, each directory before its contents.
    /// Returns the directories below `path` whose entries cannot be read (here, or from the repository: see
    /// [`is_damage`]; or a directory that is its own ancestor, in a damaged file system); they are handed to `f`,
    /// but not entered.
    pub fn walk(&self, path: &[u8], f: &mut dyn FnMut(&[u8], &Entry) -> Result<()>) -> Result<Vec<Unentered>> {
        let mut unreadable = Vec::new();
        let mut ancestors: Vec<u64> = self.entry(path)?.inode.into_iter().collect();
        let (entries, unlisted) = self.read_dir(path)?;
        unreadable.extend(unlisted);
        self.walk_into(entries, f, &mut ancestors, &mut unreadable)?;
        Ok(unreadable)
    }

    fn walk_into(
        &self,
        entries: DirEntries,
        f: &mut dyn FnMut(&[u8], &Entry) -> Result<()>,
        ancestors: &mut Vec<u64>,
        unreadable: &mut Vec<Unentered>,
    ) -> Result<()> {
        for (child, e) in entries {
            f(&child, &e)?;
            if e.kind != EntryKind::Dir {
                continue;
            }
            let unentered = |shown: String| Unentered { path: child.clone(), shown };
            if e.inode.is_some_and(|ino| ancestors.contains(&ino)) {
                unreadable.push(unentered(format!(
                    "{}: the directory is one of its own ancestors (a damaged file system)",
                    e.path
                )));
                continue;
            }
            match self.sorted_dir(&child) {
                Ok(Listing::Entries(inner, unlisted)) => {
                    unreadable.extend(unlisted);
                    ancestors.extend(e.inode);
                    self.walk_into(inner, f, ancestors, unreadable)?;
                    if e.inode.is_some() {
                        ancestors.pop();
                    }
                }
                Ok(Listing::Unreadable(why)) => unreadable.push(unentered(format!("{}: {why}", e.path))),
                Err(err) if is_damage(&err) => unreadable.push(unentered(left_out(&e.path, &err))),
                Err(err) => return Err(err),
            }
        }
        Ok(())
    }

    /// Copies the contents of regular file `path` (a symlink is followed, within the guest file system) to
    /// `out`, a chunk at a time: `out` gets each chunk's offset, so a caller can leave holes. Returns the size.
    pub fn read_file(&self, path: &[u8], out: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<u64> {
        self.inner.read_file(path, out)
    }

    /// Why the contents of regular file `path` cannot be read here (an NTFS file that is compressed, encrypted
    /// or a reparse point), if they cannot: [`Self::read_file`] refuses those.
    pub fn unreadable(&self, path: &[u8]) -> Result<Option<&'static str>> {
        self.inner.unreadable(path)
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
