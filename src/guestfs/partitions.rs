//! Partition tables of a guest disk, read only: GPT (UEFI spec 2.10 §5.3) and MBR with its extended
//! partition's chain of EBRs.
//!
//! Written here rather than taken from the `gpt` and `mbrman` crates: both are made for writing tables and
//! trust what they read (`gpt` asserts 128-byte entries, which the spec does not promise; `mbrman` adds EBR
//! offsets in `u32`, which a hostile chain overflows). A guest disk is data its guest wrote, so every field is
//! checked here and nothing panics on any input (fuzzed: `fuzz/fuzz_targets/guest_volumes.rs`).

use super::{le16, le32, le64};

/// Reads `buf.len()` bytes of the disk at an offset.
pub type ReadAt<'a> = dyn FnMut(u64, &mut [u8]) -> Result<(), String> + 'a;

/// The table a disk carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Gpt,
    Mbr,
}

/// One partition: where it is and what the table says it holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// As Linux numbers them: GPT entries from 1, MBR primaries 1-4 and logical partitions from 5.
    pub number: u32,
    pub start: u64,
    pub len: u64,
    /// The table's type: a GPT type GUID's well-known name (else the GUID), or an MBR type byte (`0x83`).
    pub type_name: String,
    /// The GPT partition name (empty for MBR).
    pub name: String,
}

/// GPT header fields beyond what the entries need are ignored; these bounds keep a hostile header from making
/// us read or allocate without limit (real tables: 128 entries of 128 bytes).
const MAX_GPT_ENTRIES: u64 = 4096;
const MAX_GPT_ENTRY_SIZE: u64 = 4096;
const MAX_EBRS: usize = 256;

/// The disk's partition table, if it has one: `Ok(None)` when neither a GPT nor an MBR with partitions is
/// there. A GPT whose primary header is damaged is read from its backup at the disk's end. Partitions that
/// reach past the disk's end are cut at it.
pub fn read_table(read: &mut ReadAt, disk_len: u64) -> Result<Option<(TableKind, Vec<Partition>)>, String> {
    for sector in [512u64, 4096] {
        if let Some(parts) = read_gpt(read, disk_len, sector)? {
            return Ok(Some((TableKind::Gpt, parts)));
        }
    }
    read_mbr(read, disk_len)
}

/// A GPT header at `lba`, if one is there and its CRC holds: (entries' LBA, count, entry size, entries' CRC).
fn gpt_header(read: &mut ReadAt, disk_len: u64, sector: u64, lba: u64) -> Result<Option<(u64, u64, u64, u32)>, String> {
    let Some(end) = lba.checked_mul(sector).and_then(|o| o.checked_add(sector)) else { return Ok(None) };
    if end > disk_len {
        return Ok(None);
    }
    let mut h = vec![0u8; sector as usize];
    read(lba * sector, &mut h)?;
    if &h[..8] != b"EFI PART" {
        return Ok(None);
    }
    let size = le32(&h, 12) as usize;
    if !(92..=h.len()).contains(&size) {
        return Ok(None);
    }
    let stored_crc = le32(&h, 16);
    h[16..20].fill(0);
    if crc32fast::hash(&h[..size]) != stored_crc {
        return Ok(None);
    }
    Ok(Some((le64(&h, 72), le32(&h, 80) as u64, le32(&h, 84) as u64, le32(&h, 88))))
}

fn read_gpt(read: &mut ReadAt, disk_len: u64, sector: u64) -> Result<Option<Vec<Partition>>, String> {
    let last_lba = (disk_len / sector).saturating_sub(1);
    let header = match gpt_header(read, disk_len, sector, 1)? {
        Some(h) => h,
        None if last_lba > 1 => match gpt_header(read, disk_len, sector, last_lba)? {
            Some(h) => h,
            None => return Ok(None),
        },
        None => return Ok(None),
    };
    let (entries_lba, count, entry_size, entries_crc) = header;
    if count > MAX_GPT_ENTRIES || !(128..=MAX_GPT_ENTRY_SIZE).contains(&entry_size) || entry_size % 8 != 0 {
        return Err(format!("GPT: implausible partition entry array ({count} entries of {entry_size} bytes)"));
    }
    let bytes = count * entry_size;
    let start = entries_lba.checked_mul(sector).filter(|s| s.checked_add(bytes).is_some_and(|e| e <= disk_len));
    let Some(start) = start else {
        return Err(format!("GPT: the partition entries at LBA {entries_lba} lie beyond the disk's end"));
    };
    let mut entries = vec![0u8; bytes as usize];
    read(start, &mut entries)?;
    if crc32fast::hash(&entries) != entries_crc {
        return Err("GPT: the partition entries do not match their CRC (damaged table)".into());
    }
    let mut parts = Vec::new();
    for (i, e) in entries.chunks_exact(entry_size as usize).enumerate() {
        let type_guid: [u8; 16] = e[..16].try_into().expect("16 bytes");
        if type_guid == [0; 16] {
            continue;
        }
        let (first, last) = (le64(e, 32), le64(e, 40));
        if last < first {
            continue;
        }
        let Some(start) = first.checked_mul(sector).filter(|&s| s < disk_len) else { continue };
        let len = (last - first).saturating_add(1).saturating_mul(sector).min(disk_len - start);
        let name: Vec<u16> = (0..36).map(|k| le16(e, 56 + 2 * k)).take_while(|&c| c != 0).collect();
        parts.push(Partition {
            number: i as u32 + 1,
            start,
            len,
            type_name: gpt_type_name(&type_guid),
            name: String::from_utf16_lossy(&name),
        });
    }
    Ok(Some(parts))
}

/// A GPT GUID as text: the first three fields are stored little-endian.
fn guid_text(g: &[u8; 16]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{}-{}",
        u32::from_le_bytes([g[0], g[1], g[2], g[3]]),
        u16::from_le_bytes([g[4], g[5]]),
        u16::from_le_bytes([g[6], g[7]]),
        hex::encode_upper(&g[8..10]),
        hex::encode_upper(&g[10..])
    )
}

fn gpt_type_name(g: &[u8; 16]) -> String {
    let guid = guid_text(g);
    let name = match guid.as_str() {
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "EFI System",
        "21686148-6449-6E6F-744E-656564454649" => "BIOS boot",
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "Linux filesystem",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "Linux root (x86-64)",
        "933AC7E1-2EB4-4F13-B844-0E14E2AEF915" => "Linux home",
        "BC13C2FF-59E6-4262-A352-B275FD6F7172" => "Linux extended boot",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "Linux LVM",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "Linux swap",
        "A19D880F-05FC-4D3B-A006-743F0F84911E" => "Linux RAID",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "Microsoft basic data",
        "E3C9E316-0B5C-4DB8-817D-F92DF00215AE" => "Microsoft reserved",
        "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC" => "Windows recovery",
        _ => return guid,
    };
    name.to_string()
}

fn mbr_type_name(sys: u8) -> String {
    let name = match sys {
        0x07 => "NTFS/exFAT",
        0x0b | 0x0c => "FAT32",
        0x82 => "Linux swap",
        0x83 => "Linux",
        0x8e => "Linux LVM",
        0xef => "EFI System",
        0xfd => "Linux RAID",
        _ => "",
    };
    if name.is_empty() {
        format!("0x{sys:02x}")
    } else {
        format!("0x{sys:02x} {name}")
    }
}

fn is_extended(sys: u8) -> bool {
    matches!(sys, 0x05 | 0x0f | 0x85)
}

/// The four entries of an MBR or EBR sector: (boot flag, type, first LBA, sectors).
fn mbr_entries(s: &[u8]) -> [(u8, u8, u64, u64); 4] {
    std::array::from_fn(|k| {
        let e = &s[446 + 16 * k..462 + 16 * k];
        (e[0], e[4], le32(e, 8) as u64, le32(e, 12) as u64)
    })
}

fn read_mbr(read: &mut ReadAt, disk_len: u64) -> Result<Option<(TableKind, Vec<Partition>)>, String> {
    const SECTOR: u64 = 512;
    if disk_len < SECTOR {
        return Ok(None);
    }
    let mut s = [0u8; 512];
    read(0, &mut s)?;
    if s[510..] != [0x55, 0xaa] {
        return Ok(None);
    }
    let entries = mbr_entries(&s);
    // A boot sector of a file system that fills the disk also ends in 55 AA: an MBR's entries have boot flags
    // 0x00 or 0x80 only, and at least one partition.
    if entries.iter().any(|e| e.0 != 0 && e.0 != 0x80) || entries.iter().all(|e| e.1 == 0) {
        return Ok(None);
    }
    if entries.iter().any(|e| e.1 == 0xee) {
        return Err("the disk has a protective MBR but no readable GPT (damaged GPT header and backup)".into());
    }
    let mut parts = Vec::new();
    let part = |number: u32, sys: u8, first: u64, sectors: u64| -> Option<Partition> {
        let start = first.checked_mul(SECTOR).filter(|&s| sectors > 0 && first > 0 && s < disk_len)?;
        let len = sectors.saturating_mul(SECTOR).min(disk_len - start);
        Some(Partition { number, start, len, type_name: mbr_type_name(sys), name: String::new() })
    };
    let mut extended = None;
    for (k, &(_, sys, first, sectors)) in entries.iter().enumerate() {
        if sys == 0 {
            continue;
        }
        if is_extended(sys) {
            extended.get_or_insert(first);
            continue;
        }
        parts.extend(part(k as u32 + 1, sys, first, sectors));
    }
    // Logical partitions: each EBR holds one, relative to itself, and a link to the next EBR, relative to the
    // extended partition's start. Links must move forward, which also ends loops.
    if let Some(ext_start) = extended {
        let (mut rel, mut number) = (0u64, 5);
        for _ in 0..MAX_EBRS {
            let Some(ebr) = ext_start.checked_add(rel).filter(|&l| l.saturating_mul(SECTOR) + SECTOR <= disk_len)
            else {
                break;
            };
            read(ebr * SECTOR, &mut s)?;
            if s[510..] != [0x55, 0xaa] {
                break;
            }
            let e = mbr_entries(&s);
            let (_, sys, first, sectors) = e[0];
            if sys != 0 && !is_extended(sys) {
                if let Some(p) = ebr.checked_add(first).and_then(|f| part(number, sys, f, sectors)) {
                    parts.push(p);
                }
                number += 1;
            }
            let (_, next_sys, next, _) = e[1];
            if !is_extended(next_sys) || next <= rel {
                break;
            }
            rel = next;
        }
    }
    Ok(Some((TableKind::Mbr, parts)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(disk: &[u8]) -> impl FnMut(u64, &mut [u8]) -> Result<(), String> + '_ {
        move |off, buf| {
            let s = disk.get(off as usize..off as usize + buf.len()).ok_or("beyond the end")?;
            buf.copy_from_slice(s);
            Ok(())
        }
    }

    fn mbr_entry(disk: &mut [u8], sector: usize, k: usize, sys: u8, first: u32, sectors: u32) {
        let e = &mut disk[sector * 512 + 446 + 16 * k..][..16];
        e[4] = sys;
        e[8..12].copy_from_slice(&first.to_le_bytes());
        e[12..16].copy_from_slice(&sectors.to_le_bytes());
        disk[sector * 512 + 510..sector * 512 + 512].copy_from_slice(&[0x55, 0xaa]);
    }

    #[test]
    fn mbr_logical_partitions_are_numbered_from_5_and_a_looping_chain_ends() {
        let mut disk = vec![0u8; 4 << 20];
        mbr_entry(&mut disk, 0, 0, 0x83, 2048, 2048);
        mbr_entry(&mut disk, 0, 1, 0x05, 4096, 4096);
        // First EBR at 4096: a logical partition 2048 sectors after it, next EBR 2048 into the extended one.
        mbr_entry(&mut disk, 4096, 0, 0x83, 1, 1000);
        mbr_entry(&mut disk, 4096, 1, 0x05, 2048, 2048);
        // Second EBR links back to the first: the chain must stop there.
        mbr_entry(&mut disk, 6144, 0, 0x8e, 1, 1000);
        mbr_entry(&mut disk, 6144, 1, 0x05, 0, 2048);
        let (kind, parts) = read_table(&mut reader(&disk), disk.len() as u64).unwrap().unwrap();
        assert_eq!(kind, TableKind::Mbr);
        let got: Vec<(u32, u64, u64)> = parts.iter().map(|p| (p.number, p.start / 512, p.len / 512)).collect();
        assert_eq!(got, vec![(1, 2048, 2048), (5, 4097, 1000), (6, 6145, 1000)]);
        assert_eq!(parts[2].type_name, "0x8e Linux LVM");
    }

    #[test]
    fn a_file_system_boot_sector_is_not_an_mbr() {
        let mut disk = vec![0u8; 1 << 20];
        disk[510..512].copy_from_slice(&[0x55, 0xaa]);
        // FAT's boot sector: code and BPB fields where MBR entries would be.
        disk[446..462].copy_from_slice(&[0x29; 16]);
        assert_eq!(read_table(&mut reader(&disk), disk.len() as u64).unwrap(), None);
    }
}
