//! ext2/3/4 volumes, read with the `ext4-view` crate (its journal replayed in memory).

use super::{copy_chunks, fs_error, guest_path, join, Entry, EntryKind, FileSystem, VolumeReader};
use crate::error::Result;

pub(super) struct Ext4Fs {
    fs: ext4_view::Ext4,
    volume: String,
    reader: VolumeReader,
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

impl Ext4Fs {
    pub(super) fn open(reader: VolumeReader, volume: &str) -> Result<Ext4Fs> {
        match ext4_view::Ext4::load(Box::new(reader.clone())) {
            Ok(fs) => Ok(Ext4Fs { fs, volume: volume.to_string(), reader }),
            Err(e) => Err(fs_error(&reader.failure, volume, b"/", e)),
        }
    }

    fn error(&self, path: &[u8], e: ext4_view::Ext4Error) -> crate::error::Error {
        match e {
            ext4_view::Ext4Error::NotFound => {
                fs_error(&self.reader.failure, &self.volume, path, "no such file or directory")
            }
            e => fs_error(&self.reader.failure, &self.volume, path, e),
        }
    }

    /// `path` as an ext4-view path (refused if not one a file system could hold: empty, relative, a NUL byte).
    fn path<'p>(&self, path: &'p [u8]) -> Result<ext4_view::Path<'p>> {
        ext4_view::Path::try_from(path).map_err(|_| self.error(path, ext4_view::Ext4Error::MalformedPath))
    }

    fn describe(&self, path: &[u8], name: Vec<u8>, meta: ext4_view::Metadata) -> Result<Entry> {
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
        let target_bytes = if kind == EntryKind::Symlink {
            self.fs.read_link(self.path(path)?).map_err(|e| self.error(path, e))?.as_ref().to_vec()
        } else {
            Vec::new()
        };
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
        })
    }
}

impl FileSystem for Ext4Fs {
    fn entry(&self, path: &[u8]) -> Result<Entry> {
        let meta = self.fs.symlink_metadata(self.path(path)?).map_err(|e| self.error(path, e))?;
        let name = path.rsplit(|&b| b == b'/').next().unwrap_or_default().to_vec();
        self.describe(path, name, meta)
    }

    fn read_dir(&self, path: &[u8]) -> Result<Vec<(Vec<u8>, Entry)>> {
        let mut out = Vec::new();
        for entry in self.fs.read_dir(self.path(path)?).map_err(|e| self.error(path, e))? {
            let entry = entry.map_err(|e| self.error(path, e))?;
            let name = entry.file_name().as_ref().to_vec();
            if name == b"." || name == b".." {
                continue;
            }
            let child = join(path, &name);
            let meta = entry.metadata().map_err(|e| self.error(&child, e))?;
            let e = self.describe(&child, name, meta)?;
            out.push((child, e));
        }
        Ok(out)
    }

    fn read_file(&self, path: &[u8], out: &mut dyn FnMut(u64, &[u8]) -> Result<()>) -> Result<u64> {
        let mut file = self.fs.open(self.path(path)?).map_err(|e| self.error(path, e))?;
        let len = file.metadata().len();
        // read_bytes stops at each file system block.
        copy_chunks(len, &mut |buf| file.read_bytes(buf).map_err(|e| self.error(path, e)), out)
    }
}
