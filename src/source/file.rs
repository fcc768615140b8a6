//! Raw disk images and block devices.
//!
//! Full backups skip holes: `SEEK_DATA`/`SEEK_HOLE` tell which ranges of a sparse file are allocated.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::{DiskSource, Extent};
use crate::error::{Error, Result};

pub struct FileSource {
    path: PathBuf,
    file: File,
    capacity: u64,
    is_block_device: bool,
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
        Ok(FileSource { path: path.to_path_buf(), file, capacity, is_block_device })
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
        self.file.read_exact_at(buf, offset).map_err(|e| {
            let cause = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                "the source ended early (did it shrink during the backup?)".to_string()
            } else {
                e.to_string()
            };
            Error::source(self.describe(), format!("read of {} bytes at offset {offset} failed: {cause}", buf.len()))
        })
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
