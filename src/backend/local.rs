//! A repository in a local directory (or a mounted file system).
//!
//! `put` writes `.tmp-<random>` next to the final name, fsyncs it, renames it into place and fsyncs the
//! directory: after a crash an object is either complete or absent. Temporary files start with `.tmp-`, are
//! never listed, and are removed by maintenance.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::throttle::{Limits, Paced};
use super::{Backend, ObjectInfo};
use crate::error::{Error, Result};
use crate::util::{AlignedBuf, BUF_ALIGN};

pub const TEMP_PREFIX: &str = ".tmp-";

pub struct LocalBackend {
    root: PathBuf,
    limits: Limits,
}

impl LocalBackend {
    pub fn new(root: PathBuf) -> Self {
        Self::with_limits(root, Limits::default())
    }

    /// A backend whose writes and reads keep to `limits` (a repository on a network file system).
    pub fn with_limits(root: PathBuf, limits: Limits) -> Self {
        LocalBackend { root, limits }
    }

    fn path(&self, name: &str) -> Result<PathBuf> {
        // Names come from the engine, but never let one escape the repository directory.
        if name.is_empty() || name.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return Err(Error::invalid(format!("invalid object name {name:?}")));
        }
        Ok(self.root.join(name))
    }

    fn write_temp(&self, path: &Path, data: &[u8]) -> std::io::Result<PathBuf> {
        let dir = path.parent().expect("object paths have a parent");
        fs::create_dir_all(dir)?;
        let tmp = dir.join(format!("{TEMP_PREFIX}{}", hex::encode(crate::crypto::random_array::<8>())));
        let upload = self.limits.upload.as_deref();
        let result = match upload {
            // A limited upload is written piece by piece as its budget allows: through the page cache.
            Some(_) => write_buffered(&tmp, data, upload),
            None => write_direct(&tmp, data).or_else(|e| {
                if e.raw_os_error() != Some(libc::EINVAL) {
                    return Err(e);
                }
                // The file system refuses O_DIRECT (tmpfs…): through the page cache.
                let _ = fs::remove_file(&tmp);
                write_buffered(&tmp, data, None)
            }),
        };
        match result {
            Ok(()) => Ok(tmp),
            Err(e) => {
                let _ = fs::remove_file(&tmp);
                Err(e)
            }
        }
    }
}

/// Objects from this size on are written with O_DIRECT: packs bypass the page cache, which a backup would
/// otherwise fill with data it never reads again (and pay for the copy and the reclaim).
const DIRECT_MIN: usize = 1 << 20;

/// O_DIRECT writes go through a page-aligned staging buffer of up to this size, kept by the writing thread: a
/// fresh zeroed buffer the size of each pack cost a memset and a page fault per 4 KiB (4% of a full backup's CPU).
const STAGING_SIZE: usize = 4 << 20;

thread_local! {
    static STAGING: std::cell::RefCell<AlignedBuf> = std::cell::RefCell::new(AlignedBuf::default());
}

/// Writes `data` to the new file `path` and syncs it; O_DIRECT for large objects (the last page padded, then
/// the file cut to size). EINVAL means the file system does not do O_DIRECT.
fn write_direct(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    if data.len() < DIRECT_MIN {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let f = OpenOptions::new().write(true).create_new(true).custom_flags(libc::O_DIRECT).open(path)?;
    STAGING.with_borrow_mut(|staging| {
        for (k, piece) in data.chunks(STAGING_SIZE).enumerate() {
            let padded = piece.len().next_multiple_of(BUF_ALIGN);
            // Never shrunk: growing it again would zero-fill it again.
            if staging.len() < padded {
                staging.resize(padded);
            }
            staging[..piece.len()].copy_from_slice(piece);
            staging[piece.len()..padded].fill(0);
            f.write_all_at(&staging[..padded], (k * STAGING_SIZE) as u64)?;
        }
        Ok::<_, std::io::Error>(())
    })?;
    f.set_len(data.len() as u64)?;
    f.sync_all()
}

/// Writes `data` to the new file `path` through the page cache, paced by `throttle`, and syncs it.
fn write_buffered(path: &Path, data: &[u8], throttle: Option<&super::throttle::Throttle>) -> std::io::Result<()> {
    let mut f = Paced::new(OpenOptions::new().write(true).create_new(true).open(path)?, throttle);
    f.write_all(data)?;
    f.into_inner().sync_all()
}

/// What [`read_direct`] found.
enum Direct {
    /// The range, at this place in the buffer.
    Read(std::ops::Range<usize>),
    /// The object ends this many bytes after the offset, before the range does.
    Short(u64),
    /// The file system refuses O_DIRECT.
    Refused,
}

/// Reads `len` bytes at `offset` of `path` with O_DIRECT into `buf` (its previous content dropped), at the first
/// page-aligned address of its allocation. The read covers whole pages around the range; only the pages at its
/// ends are read beyond it.
fn read_direct(path: &Path, offset: u64, len: u64, buf: &mut Vec<u8>) -> std::io::Result<Direct> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::io::AsRawFd;
    let file = match OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Direct::Refused),
        Err(e) => return Err(e),
    };
    let first = offset - offset % BUF_ALIGN as u64;
    let span = usize::try_from((offset + len).next_multiple_of(BUF_ALIGN as u64) - first)
        .map_err(|_| std::io::Error::from(ErrorKind::OutOfMemory))?;
    buf.clear();
    buf.reserve(span + BUF_ALIGN);
    // Only the padding before the aligned start is written here; the read fills the rest.
    let pad = buf.as_ptr().align_offset(BUF_ALIGN);
    buf.resize(pad, 0);
    let mut done = 0usize;
    while done < span {
        // SAFETY: `pad + span` is within the reserved capacity, and the kernel writes at most `span - done`
        // bytes from `pad + done`; `set_len` below covers only bytes it wrote.
        let n = unsafe {
            libc::pread(
                file.as_raw_fd(),
                buf.as_mut_ptr().add(pad + done).cast(),
                span - done,
                (first + done as u64) as libc::off_t,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EINVAL) if done == 0 => return Ok(Direct::Refused),
                _ => return Err(e),
            }
        }
        // SAFETY: the kernel initialised these `n` bytes.
        unsafe { buf.set_len(pad + done + n as usize) };
        done += n as usize;
        // A short read (the end of the file) leaves an unaligned position that O_DIRECT cannot continue from.
        if n == 0 || !done.is_multiple_of(BUF_ALIGN) {
            break;
        }
    }
    let start = pad + (offset - first) as usize;
    if buf.len() < start + len as usize {
        return Ok(Direct::Short((first + done as u64).max(offset) - offset));
    }
    Ok(Direct::Read(start..start + len as usize))
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

fn io_cause(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOSPC) => format!("{e} (the repository's file system is full)"),
        _ => e.to_string(),
    }
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn put(&self, name: &str, data: &[u8]) -> Result<()> {
        let path = self.path(name)?;
        let tmp = self.write_temp(&path, data).map_err(|e| Error::backend("write", name, io_cause(&e)))?;
        if let Err(e) = fs::rename(&tmp, &path) {
            let _ = fs::remove_file(&tmp);
            return Err(Error::backend("rename", name, io_cause(&e)));
        }
        sync_dir(path.parent().unwrap()).map_err(|e| Error::backend("sync", name, io_cause(&e)))
    }

    fn create_new(&self, name: &str, data: &[u8]) -> Result<bool> {
        let path = self.path(name)?;
        let tmp = self.write_temp(&path, data).map_err(|e| Error::backend("write", name, io_cause(&e)))?;
        // link(2) fails with EEXIST if the name is taken: an atomic create-if-absent.
        let r = fs::hard_link(&tmp, &path);
        let _ = fs::remove_file(&tmp);
        match r {
            Ok(()) => {
                sync_dir(path.parent().unwrap()).map_err(|e| Error::backend("sync", name, io_cause(&e)))?;
                Ok(true)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(e) => Err(Error::backend("link", name, io_cause(&e))),
        }
    }

    fn get(&self, name: &str) -> Result<Vec<u8>> {
        let path = self.path(name)?;
        let read = match self.limits.download.as_deref() {
            None => fs::read(path),
            Some(t) => File::open(path).and_then(|f| {
                let mut v = Vec::new();
                Paced::new(f, Some(t)).read_to_end(&mut v).map(|_| v)
            }),
        };
        match read {
            Ok(v) => Ok(v),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(Error::Missing { object: name.into() }),
            Err(e) => Err(Error::backend("read", name, io_cause(&e))),
        }
    }

    fn get_range(&self, name: &str, offset: u64, len: u64) -> Result<Vec<u8>> {
        let mut buf = Vec::new();
        self.get_range_into(name, offset, len, &mut buf)?;
        Ok(buf)
    }

    fn get_range_into(&self, name: &str, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<()> {
        let mut f = match File::open(self.path(name)?) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(Error::Missing { object: name.into() }),
            Err(e) => return Err(Error::backend("open", name, io_cause(&e))),
        };
        buf.clear();
        buf.reserve(len as usize);
        f.seek(SeekFrom::Start(offset))
            .and_then(|_| match self.limits.download.as_deref() {
                // Unpaced, `Take` tells read_to_end its length: one read of the whole range.
                None => f.take(len).read_to_end(buf),
                throttle => Paced::new(f.take(len), throttle).read_to_end(buf),
            })
            .map_err(|e| Error::backend("read", name, io_cause(&e)))?;
        if buf.len() as u64 != len {
            return Err(super::truncated(name, offset, len, buf.len() as u64));
        }
        Ok(())
    }

    fn get_range_placed(&self, name: &str, offset: u64, len: u64, buf: &mut Vec<u8>) -> Result<std::ops::Range<usize>> {
        // Small and bandwidth-limited reads, and file systems without O_DIRECT (tmpfs, some network file
        // systems), go through the page cache.
        let direct = if len < DIRECT_MIN as u64 || self.limits.download.is_some() {
            Direct::Refused
        } else {
            match read_direct(&self.path(name)?, offset, len, buf) {
                Ok(d) => d,
                Err(e) if e.kind() == ErrorKind::NotFound => return Err(Error::Missing { object: name.into() }),
                Err(e) => return Err(Error::backend("read", name, io_cause(&e))),
            }
        };
        match direct {
            Direct::Read(range) => Ok(range),
            Direct::Short(got) => Err(super::truncated(name, offset, len, got)),
            Direct::Refused => {
                self.get_range_into(name, offset, len, buf)?;
                Ok(0..buf.len())
            }
        }
    }

    fn size(&self, name: &str) -> Result<Option<u64>> {
        match fs::metadata(self.path(name)?) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::backend("stat", name, io_cause(&e))),
        }
    }

    fn list(&self, dir: &str) -> Result<Vec<ObjectInfo>> {
        let mut out = Vec::new();
        let mut stack = vec![(self.path(dir)?, dir.to_string())];
        while let Some((path, prefix)) = stack.pop() {
            let rd = match fs::read_dir(&path) {
                Ok(rd) => rd,
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(e) => return Err(Error::backend("list", prefix, io_cause(&e))),
            };
            for entry in rd {
                let entry = entry.map_err(|e| Error::backend("list", prefix.clone(), io_cause(&e)))?;
                let fname = entry.file_name().to_string_lossy().into_owned();
                if fname.starts_with(TEMP_PREFIX) {
                    continue;
                }
                let child = format!("{prefix}/{fname}");
                let meta = match entry.metadata() {
                    Ok(m) => m,
                    // Deleted since the directory was read (a prune next to us): not there, as on S3.
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(Error::backend("stat", child, io_cause(&e))),
                };
                if meta.is_dir() {
                    stack.push((entry.path(), child));
                } else {
                    out.push(ObjectInfo { name: child, size: meta.len() });
                }
            }
        }
        Ok(out)
    }

    fn delete(&self, name: &str) -> Result<()> {
        match fs::remove_file(self.path(name)?) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(e) => Err(Error::backend("delete", name, io_cause(&e))),
        }
    }

    fn age(&self, name: &str) -> Result<Option<std::time::Duration>> {
        match fs::metadata(self.path(name)?) {
            Ok(m) => Ok(Some(m.modified().ok().and_then(|t| t.elapsed().ok()).unwrap_or_default())),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(Error::backend("stat", name, io_cause(&e))),
        }
    }

    fn remove_stale_temporaries(&self, older_than: std::time::Duration) -> Result<usize> {
        let mut removed = 0;
        let mut stack = vec![self.root.clone()];
        while let Some(dir) = stack.pop() {
            let Ok(rd) = fs::read_dir(&dir) else { continue };
            for entry in rd.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if meta.is_dir() {
                    stack.push(entry.path());
                    continue;
                }
                let stale = meta.modified().ok().and_then(|m| m.elapsed().ok()).is_some_and(|age| age > older_than);
                if stale && entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                    fs::remove_file(entry.path())
                        .map_err(|e| Error::backend("delete", entry.path().display().to_string(), io_cause(&e)))?;
                    removed += 1;
                }
            }
        }
        Ok(removed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_get_list_create_new() {
        let dir = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(dir.path().to_path_buf());
        b.put("index/aa", b"hello").unwrap();
        b.put("packs/ab/abcd", b"0123456789").unwrap();
        assert_eq!(b.get("index/aa").unwrap(), b"hello");
        assert_eq!(b.get_range("packs/ab/abcd", 2, 3).unwrap(), b"234");
        assert!(b.get_range("packs/ab/abcd", 8, 3).is_err());
        assert!(matches!(b.get("index/zz"), Err(Error::Missing { .. })));
        let names: Vec<_> = b.list("packs").unwrap().into_iter().map(|o| o.name).collect();
        assert_eq!(names, vec!["packs/ab/abcd".to_string()]);
        assert!(b.create_new("locks/x", b"1").unwrap());
        assert!(!b.create_new("locks/x", b"2").unwrap());
        assert_eq!(b.get("locks/x").unwrap(), b"1");
        assert!(b.path("../etc").is_err());
        b.delete("locks/x").unwrap();
        b.delete("locks/x").unwrap();
        assert_eq!(b.size("locks/x").unwrap(), None);
    }

    /// Repository roots on a disk file system, which takes O_DIRECT, and on tmpfs where there is one (older
    /// kernels refuse O_DIRECT there: the buffered fallback).
    fn disk_and_tmpfs_roots() -> Vec<tempfile::TempDir> {
        let mut roots = vec![tempfile::tempdir().unwrap()];
        if Path::new("/dev/shm").is_dir() {
            roots.push(tempfile::tempdir_in("/dev/shm").unwrap());
        }
        roots
    }

    /// Placed range reads (O_DIRECT from 1 MiB, where the file system takes it) hand back exactly the bytes a
    /// buffered range read does, wherever the range starts and ends, and refuse ranges past the end or of
    /// missing objects as the buffered read does.
    #[test]
    fn placed_range_reads_match_buffered_ones() {
        let data: Vec<u8> = (0..(5 << 20) + 1234).map(|i: u32| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
        let roots = disk_and_tmpfs_roots();
        let n = data.len() as u64;
        for root in &roots {
            let b = LocalBackend::new(root.path().to_path_buf());
            b.put("packs/ab/p", &data).unwrap();
            let mut buf = Vec::new();
            for (offset, len) in [
                (0, n),
                (0, 1 << 20),
                (4096, 2 << 20),
                (777, (3 << 20) + 5),
                (n - (1 << 20) - 3, (1 << 20) + 3),
                (10, 100),
            ] {
                let r = b.get_range_placed("packs/ab/p", offset, len, &mut buf).unwrap();
                let want = &data[offset as usize..(offset + len) as usize];
                assert!(buf[r] == *want, "{offset}+{len} in {}", root.path().display());
            }
            let past = b.get_range_placed("packs/ab/p", n - (1 << 20), (1 << 20) + 1, &mut buf).unwrap_err();
            assert!(past.to_string().contains("truncated") && past.to_string().contains("packs/ab/p"), "{past}");
            let missing = b.get_range_placed("packs/ab/q", 0, 2 << 20, &mut buf).unwrap_err();
            assert!(matches!(missing, Error::Missing { .. }), "{missing}");
        }
    }

    /// Large objects (O_DIRECT through the thread's staging buffer, the last page padded then cut) keep their
    /// exact size and bytes, on a disk file system and on tmpfs, which refuses O_DIRECT (the buffered fallback).
    /// Sizes across several staging buffers, written largest first so that a shorter object is staged in a
    /// buffer holding a larger one's bytes; `put_owned` hands the buffer back unchanged.
    #[test]
    fn large_objects_round_trip_with_and_without_o_direct() {
        let object = |len: usize, seed: u32| -> Vec<u8> {
            (0..len as u32).map(|i| (i.wrapping_add(seed).wrapping_mul(2_654_435_761) >> 13) as u8).collect()
        };
        let sizes = [(9 << 20) + 777, (4 << 20) + 1, 4 << 20, (3 << 20) + 777, (1 << 20) + 1];
        let roots = disk_and_tmpfs_roots();
        for root in &roots {
            let b = LocalBackend::new(root.path().to_path_buf());
            for (k, len) in sizes.into_iter().enumerate() {
                let data = object(len, k as u32);
                let name = format!("packs/ab/big{k}");
                assert!(b.put_owned(&name, data.clone()).unwrap().as_ref() == Some(&data));
                assert_eq!(b.size(&name).unwrap(), Some(len as u64));
                assert!(b.get(&name).unwrap() == data, "{len} bytes in {}", root.path().display());
                assert!(b.create_new(&format!("{name}-new"), &data).unwrap());
                assert!(b.get(&format!("{name}-new")).unwrap() == data);
            }
        }
    }
}
