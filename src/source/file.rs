//! Raw disk images and block devices.
//!
//! Full backups skip holes: `SEEK_DATA`/`SEEK_HOLE` tell which ranges of a sparse file are allocated.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::{BlockRanges, DiskSource, Extent, PlannedReads};
use crate::error::{Error, Result};

/// How far ahead of the reader the kernel is asked to fetch planned blocks.
const READ_AHEAD_BYTES: u64 = 64 << 20;

pub struct FileSource {
    path: PathBuf,
    file: File,
    capacity: u64,
    is_block_device: bool,
    read_ahead: Option<ReadAhead>,
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
        Ok(FileSource { path: path.to_path_buf(), file, capacity, is_block_device, read_ahead: None })
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
        if let Some(ra) = &mut self.read_ahead {
            ra.advance(self.file.as_raw_fd(), offset);
        }
        self.file.read_exact_at(buf, offset).map_err(|e| {
            let cause = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the source ended early (did it shrink during the backup?)".to_string()
            } else {
                e.to_string()
            };
            Error::source(self.describe(), format!("read of {} bytes at offset {offset} failed: {cause}", buf.len()))
        })
    }

    fn hint_reads(&mut self, blocks: &BlockRanges, block_size: u64) {
        self.will_read(blocks, block_size);
    }

    fn will_read(&mut self, blocks: &BlockRanges, block_size: u64) {
        let plan = PlannedReads::new(blocks.ranges().to_vec(), block_size, self.capacity);
        let mut ra = ReadAhead { plan, advised: Default::default(), advised_bytes: 0 };
        ra.advance(self.file.as_raw_fd(), 0);
        self.read_ahead = Some(ra);
    }

    fn allocated(&mut self) -> Result<Option<Vec<Extent>>> {
        if self.is_block_device {
            return Ok(None);
        }
        let fd = self.file.as_raw_fd();
        let mut out = Vec::new();
        let mut pos: i64 = 0;
        let end = self.capacity as i64;
        while pos < end {
            // SAFETY: lseek on a valid descriptor has no memory effects.
            let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
            if data < 0 {
                let err = std::io::Error::last_os_error();
                match err.raw_os_error() {
                    Some(libc::ENXIO) => break, // no data after pos
                    _ => return Ok(None),       // file system cannot tell: read everything
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
        Ok(Some(out))
    }
}
