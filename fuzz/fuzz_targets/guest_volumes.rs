//! Guest disks, which a VM (perhaps a compromised one) wrote: partition tables, ext2/3/4, XFS and NTFS read through
//! `guestfs` (`ls`, `dump`, `extract`). No input may panic, hang or read outside the disk.
//!
//! An input is a sparse disk image, so that small inputs describe whole disks: a u32 LE size in 512-byte
//! sectors (at most 2^17: 64 MiB), then runs of (u32 LE first sector, u16 LE length, that many bytes) written
//! over zeros. The seed corpus holds real disks made by sfdisk and mke2fs (GPT, MBR with logical partitions,
//! ext4 on the whole disk), ntfs-3g, the LVM tools and mkfs.xfs (seed-xfs: shut down with its log dirty, the log
//! cut down to the records before its head) in that form.
#![no_main]
use std::collections::BTreeMap;
use std::sync::Arc;

use diskvault::guestfs::{EntryKind, GuestDisk};
use diskvault::nbd::server::Device;
use libfuzzer_sys::fuzz_target;

struct SparseDisk {
    size: u64,
    bytes: BTreeMap<u64, u8>,
}

impl Device for SparseDisk {
    fn size(&self) -> u64 {
        self.size
    }
    fn writable(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> diskvault::error::Result<()> {
        let end = offset + buf.len() as u64;
        assert!(end <= self.size, "read of {offset}..{end} beyond the disk's {} bytes", self.size);
        buf.fill(0);
        for (&at, &b) in self.bytes.range(offset..end) {
            buf[(at - offset) as usize] = b;
        }
        Ok(())
    }
    fn write(&self, _: u64, _: &[u8]) -> diskvault::error::Result<()> {
        unreachable!("read-only")
    }
    fn flush(&self) -> diskvault::error::Result<()> {
        Ok(())
    }
    fn zero_extents(&self, _: u64, len: u64) -> diskvault::error::Result<Vec<(u64, bool)>> {
        Ok(vec![(len, false)])
    }
}

fn parse(data: &[u8]) -> Option<SparseDisk> {
    let sectors = u32::from_le_bytes(data.get(..4)?.try_into().ok()?).min(1 << 17) as u64;
    let size = sectors * 512;
    let mut bytes = BTreeMap::new();
    let mut rest = &data[4..];
    while rest.len() >= 6 {
        let start = u32::from_le_bytes(rest[..4].try_into().unwrap()) as u64 * 512;
        let len = (u16::from_le_bytes([rest[4], rest[5]]) as usize).min(rest.len() - 6);
        for (k, &b) in rest[6..6 + len].iter().enumerate() {
            if start + (k as u64) < size && b != 0 {
                bytes.insert(start + k as u64, b);
            }
        }
        rest = &rest[6 + len..];
    }
    Some(SparseDisk { size, bytes })
}

fuzz_target!(|data: &[u8]| {
    let Some(disk) = parse(data) else { return };
    let size = disk.size;
    let Ok(guest) = GuestDisk::open(Arc::new(disk)) else { return };
    for v in &guest.volumes {
        assert!(v.start + v.len <= size, "volume {} beyond the disk", v.name);
        let Ok(fs) = guest.fs(v) else { continue };
        // Bounded: a crafted directory cycle would otherwise be walked until the path grows too long.
        let mut seen = 0;
        let _ = fs.walk(b"/", &mut |path, e| {
            seen += 1;
            if seen > 200 {
                return Err(diskvault::error::Error::invalid("enough"));
            }
            if e.kind == EntryKind::File {
                let mut total = 0u64;
                // Bounded too: a crafted inode may claim a size of terabytes in holes, read as zeros.
                let _ = fs.read_file(path, &mut |_, chunk| {
                    total += chunk.len() as u64;
                    if total > size {
                        return Err(diskvault::error::Error::invalid("enough"));
                    }
                    Ok(())
                });
            }
            Ok(())
        });
    }
});
