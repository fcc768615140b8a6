//! Raw disk images and block devices.
//!
//! Full backups skip holes: `SEEK_DATA`/`SEEK_HOLE` tell which ranges of a sparse file are allocated.
//!
//! Reads take one of two paths, chosen from the backup's plan ([`DiskSource::will_read`]): long runs of blocks
//! (a full backup) are read with O_DIRECT into the pipeline's page-aligned buffers, skipping the page cache,
//! whose filling cost more CPU than anything but compression and capped cold reads at ~560 MB/s on the
//! project's VM (O_DIRECT: 1.4 GB/s from one thread); scattered blocks (a change list) go through the page cache
//! with read-ahead along the plan, so that many are fetched at once.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::{BlockRanges, DiskSource, Extent, PlannedReads};
use crate::error::{Error, Result};
use crate::util::BUF_ALIGN;

/// How far ahead of the reader the kernel is asked to fetch planned blocks.
const READ_AHEAD_BYTES: u64 = 64 << 20;
/// Plans whose runs of consecutive blocks are this long on average are read with O_DIRECT.
const DIRECT_MIN_RUN_BLOCKS: u64 = 8;

pub struct FileSource {
    path: PathBuf,
    file: File,
    capacity: u64,
    is_block_device: bool,
    read_ahead: Option<ReadAhead>,
    /// The same file opened with O_DIRECT, where the file system allows it, and whether the plan uses it.
    direct: Option<File>,
    use_direct: bool,
}

/// Read-ahead along the backup's plan: the kernel is asked (`POSIX_FADV_WILLNEED`) to fetch the planned blocks
/// a window ahead of the reader, so the disk works while earlier blocks are hashed and compressed, and the
/// scattered blocks of an incremental are fetched many at a time instead of one synchronous read each (185
/// changed blocks of a 4 GiB image, cold: 0.1-0.3 s read one by one).
struct ReadAhead {
    plan: PlannedReads,
    /// Advised and not yet read: (offset, length) in plan order.
    advised: std::collections::VecDeque<(u64, u64)>,
    advised_bytes: u64,
}

impl ReadAhead {
    /// Forgets what was read up to `offset`, then advises planned blocks until the window is full again.
    fn advance(&mut self, fd: i32, offset: u64) {
        while let Some(&(o, len)) = self.advised.front() {
            if o > offset {
                break;
            }
            self.advised.pop_front();
            self.advised_bytes -= len;
        }
        let mut run: Option<(u64, u64)> = None;
        while self.advised_bytes < READ_AHEAD_BYTES {
            let Some((_, o, len)) = self.plan.next() else { break };
            let len = len as u64;
            self.advised.push_back((o, len));
            self.advised_bytes += len;
            run = match run {
                Some((start, end)) if end == o => Some((start, o + len)),
                Some(r) => {
                    advise_willneed(fd, r);
                    Some((o, o + len))
                }
                None => Some((o, o + len)),
            };
        }
        if let Some(r) = run {
            advise_willneed(fd, r);
        }
    }
}

fn advise_willneed(fd: i32, (start, end): (u64, u64)) {
    // SAFETY: plain advisory call on a valid descriptor; a failure only costs the read-ahead.
    unsafe { libc::posix_fadvise(fd, start as i64, (end - start) as i64, libc::POSIX_FADV_WILLNEED) };
}

impl FileSource {
    pub fn open(path: &Path) -> Result<FileSource> {
        let mut file =
            File::open(path).map_err(|e| Error::source(path.display().to_string(), format!("cannot open: {e}")))?;
        let meta = file.metadata().map_err(|e| Error::source(path.display().to_string(), e))?;
        let is_block_device = meta.file_type().is_block_device();
        if !meta.is_file() && !is_block_device {
            return Err(Error::source(path.display().to_string(), "not a regular file or block device"));
        }
        // Block devices report length 0 in metadata; their size is where SEEK_END lands.
        let capacity = if is_block_device {
            file.seek(SeekFrom::End(0)).map_err(|e| Error::source(path.display().to_string(), e))?
        } else {
            meta.len()
        };
        // SAFETY: plain advisory call on a valid descriptor.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL) };
        let direct = OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).ok();
        Ok(FileSource {
            path: path.to_path_buf(),
            file,
            capacity,
            is_block_device,
            read_ahead: None,
            direct,
            use_direct: false,
        })
    }

    fn read_error(&self, offset: u64, len: usize, e: std::io::Error) -> Error {
        let cause = if e.kind() == std::io::ErrorKind::UnexpectedEof {
            "the source ended early (did it shrink during the backup?)".to_string()
        } else {
            e.to_string()
        };
        Error::source(self.describe(), format!("read of {len} bytes at offset {offset} failed: {cause}"))
    }
}

impl DiskSource for FileSource {
    fn kind(&self) -> &'static str {
        "file"
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }

    fn capacity(&self) -> u64 {
        self.capacity
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        // O_DIRECT needs offset, length and buffer aligned to the sector size ([`BUF_ALIGN`] covers them).
        let aligned = offset.is_multiple_of(BUF_ALIGN as u64)
            && buf.len().is_multiple_of(BUF_ALIGN)
            && buf.as_ptr().addr().is_multiple_of(BUF_ALIGN);
        if let (true, true, Some(direct)) = (self.use_direct, aligned, &self.direct) {
            match direct.read_exact_at(buf, offset) {
                Ok(()) => return Ok(()),
                // Refused after all (some file systems decide per read): through the page cache from here on.
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => self.use_direct = false,
                Err(e) => return Err(self.read_error(offset, buf.len(), e)),
            }
        }
        if let Some(ra) = &mut self.read_ahead {
            ra.advance(self.file.as_raw_fd(), offset);
        }
        self.file.read_exact_at(buf, offset).map_err(|e| self.read_error(offset, buf.len(), e))
    }

    fn hint_reads(&mut self, blocks: &BlockRanges, block_size: u64) {
        self.will_read(blocks, block_size);
    }

    fn will_read(&mut self, blocks: &BlockRanges, block_size: u64) {
        let runs = blocks.ranges().len() as u64;
        self.use_direct = self.direct.is_some() && runs > 0 && blocks.block_count() / runs >= DIRECT_MIN_RUN_BLOCKS;
        if self.use_direct {
            self.read_ahead = None;
            return;
        }
        let plan = PlannedReads::new(blocks.ranges().to_vec(), block_size, self.capacity);
        let mut ra = ReadAhead { plan, advised: Default::default(), advised_bytes: 0 };
        ra.advance(self.file.as_raw_fd(), 0);
        self.read_ahead = Some(ra);
    }

    fn allocated(&mut self) -> Result<Option<Vec<Extent>>> {
        if self.is_block_device {
            return Ok(None);
        }
        Ok(data_extents(&self.file, self.capacity))
    }
}

/// The ranges of the first `capacity` bytes of regular file `file` that hold data, the rest being holes
/// (`SEEK_DATA`/`SEEK_HOLE`); `None` if the file system cannot tell.
pub(crate) fn data_extents(file: &File, capacity: u64) -> Option<Vec<Extent>> {
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos: i64 = 0;
    let end = capacity as i64;
    while pos < end {
        // SAFETY: lseek on a valid descriptor has no memory effects.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            let err = std::io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::ENXIO) => break, // no data after pos
                _ => return None,           // file system cannot tell: read everything
            }
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let hole = if hole < 0 { end } else { hole.min(end) };
        if hole > data {
            out.push(Extent { start: data as u64, length: (hole - data) as u64 });
        }
        pos = hole;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::util::AlignedBuf;

    /// Reads every block of `path` along `plan` into reused aligned buffers, as a backup does.
    fn read_along(path: &Path, plan: &BlockRanges) -> (Vec<(u64, Vec<u8>)>, bool) {
        const BS: u64 = 1 << 20;
        let mut src = FileSource::open(path).unwrap();
        src.will_read(plan, BS);
        let mut buf = AlignedBuf::default();
        let mut out = Vec::new();
        for b in plan.iter() {
            buf.resize(BS.min(src.capacity() - b * BS) as usize);
            src.read_at(b * BS, &mut buf).unwrap();
            out.push((b, buf.to_vec()));
        }
        (out, src.use_direct)
    }

    fn check_dir(dir: &Path) -> bool {
        let path = dir.join("disk.raw");
        let mut img = vec![0u8; (20 << 20) + 12_345];
        blake3::Hasher::new().update(b"disk").finalize_xof().fill(&mut img);
        std::fs::write(&path, &img).unwrap();
        let block = |b: u64| img[(b << 20) as usize..((b + 1) << 20).min(img.len() as u64) as usize].to_vec();
        // A dense plan (a full backup) with its short last block, then a scattered one (a change list).
        let dense = BlockRanges::all(21);
        let (got, direct) = read_along(&path, &dense);
        assert!(got.iter().all(|(b, data)| *data == block(*b)), "dense plan read wrong bytes");
        let mut scattered = BlockRanges::default();
        for b in [1, 5, 9, 20] {
            scattered.add(b..b + 1);
        }
        let (got, scattered_direct) = read_along(&path, &scattered);
        assert!(!scattered_direct, "scattered blocks go through the page cache");
        assert!(got.iter().all(|(b, data)| *data == block(*b)), "scattered plan read wrong bytes");
        direct
    }

    fn takes_o_direct(path: &Path) -> bool {
        OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path).is_ok()
    }

    #[test]
    fn reads_are_exact_with_and_without_o_direct() {
        // Where the file system takes O_DIRECT (ext4, xfs, newer tmpfs), a full backup uses it; elsewhere reads go
        // through the page cache. Exact either way.
        let disk = tempfile::tempdir().unwrap();
        assert_eq!(check_dir(disk.path()), takes_o_direct(&disk.path().join("disk.raw")));
        if let Ok(shm) = tempfile::tempdir_in("/dev/shm") {
            assert_eq!(check_dir(shm.path()), takes_o_direct(&shm.path().join("disk.raw")));
        }
        // A buffer that is not page-aligned (so not for O_DIRECT) is read exactly too.
        let path = disk.path().join("disk.raw");
        let mut src = FileSource::open(&path).unwrap();
        src.will_read(&BlockRanges::all(21), 1 << 20);
        let mut buf = vec![0u8; (1 << 20) + 1];
        let unaligned = if buf.as_ptr().addr().is_multiple_of(BUF_ALIGN) { &mut buf[1..] } else { &mut buf[..1 << 20] };
        src.read_at(1 << 20, unaligned).unwrap();
        assert_eq!(unaligned, &std::fs::read(&path).unwrap()[1 << 20..2 << 20]);
    }
}
