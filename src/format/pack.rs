//! Packs: many encrypted blobs in one stored object, with an encrypted header at the end that lists them, so
//! the index can always be rebuilt from the packs alone.
//!
//! ```text
//! blob 0 | blob 1 | … | blob n-1 | sealed header | header_len u32 LE | "DVLT" 5 1 0 0
//! ```
//! A blob is `nonce(12) ‖ AES-256-GCM(zstd(plaintext) or plaintext) ‖ tag(16)` with associated data
//! `type u8 ‖ flags u8 ‖ id[32]`, so a blob cannot be passed off as another blob, another type, or with its
//! compression flag flipped. The sealed header is `nonce ‖ AES-256-GCM(header) ‖ tag` with associated data the
//! 8-byte trailer header. See `format-spec/pack.md`.

use super::envelope::{self, Kind};
use super::{BlobId, BlobType, Reader};
use crate::crypto::{Keys, SEAL_OVERHEAD};
use crate::util::AlignedBuf;

/// Flag bit: the blob's plaintext is a zstd frame.
pub const FLAG_ZSTD: u8 = 1;
/// Size of one header entry.
pub const ENTRY_LEN: usize = 48;
/// Trailer: header length (4) + object header (8).
pub const TRAILER_LEN: usize = 12;
/// Largest plaintext of one blob (a block, or a segment of 4096 ids plus slack).
pub const MAX_BLOB_RAW: u32 = 4 << 20;
/// Largest pack accepted by readers.
pub const MAX_PACK_SIZE: u64 = 1 << 31;

/// One blob's place in a pack, as listed in the pack header and in index files.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackEntry {
    pub blob_type: BlobType,
    pub flags: u8,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
    pub id: BlobId,
}

impl PackEntry {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.blob_type as u8);
        out.push(self.flags);
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.extend_from_slice(&self.id.0);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<PackEntry, String> {
        let t = r.u8()?;
        let blob_type = BlobType::from_u8(t).ok_or_else(|| format!("unknown blob type {t}"))?;
        let flags = r.u8()?;
        if flags & !FLAG_ZSTD != 0 {
            return Err(format!("unknown blob flags {flags:#x}"));
        }
        if r.u16()? != 0 {
            return Err("reserved entry bytes are not zero".into());
        }
        let e = PackEntry { blob_type, flags, offset: r.u32()?, stored_len: r.u32()?, raw_len: r.u32()?, id: r.id()? };
        if e.raw_len > MAX_BLOB_RAW {
            return Err(format!("blob {} claims {} bytes of plaintext", e.id.short(), e.raw_len));
        }
        if (e.stored_len as usize) < SEAL_OVERHEAD {
            return Err(format!("blob {} is {} bytes, shorter than nonce and tag", e.id.short(), e.stored_len));
        }
        Ok(e)
    }

    pub fn end(&self) -> u64 {
        self.offset as u64 + self.stored_len as u64
    }
}

/// The decoded header of a pack.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackHeader {
    pub pack_type: BlobType,
    pub entries: Vec<PackEntry>,
}

impl PackHeader {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 + self.entries.len() * ENTRY_LEN);
        out.push(self.pack_type as u8);
        out.extend_from_slice(&[0, 0, 0]);
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for e in &self.entries {
            e.encode_into(&mut out);
        }
        out
    }

    /// Decodes a header plaintext and checks that the blobs tile `0..blobs_end` in order with no gap.
    pub fn decode(bytes: &[u8], blobs_end: u64) -> Result<PackHeader, String> {
        let mut r = Reader::new(bytes);
        let t = r.u8()?;
        let pack_type = BlobType::from_u8(t).ok_or_else(|| format!("unknown pack type {t}"))?;
        if r.take(3)? != [0, 0, 0] {
            return Err("reserved header bytes are not zero".into());
        }
        let count = r.u32()? as usize;
        if r.remaining() != count.checked_mul(ENTRY_LEN).ok_or("entry count overflows")? {
            return Err(format!("header claims {count} entries but holds {} bytes of entries", r.remaining()));
        }
        let mut entries = Vec::with_capacity(count);
        let mut expected_offset = 0u64;
        for _ in 0..count {
            let e = PackEntry::decode(&mut r)?;
            if e.blob_type != pack_type {
                return Err(format!("{} blob {} in a {} pack", e.blob_type.name(), e.id.short(), pack_type.name()));
            }
            if e.offset as u64 != expected_offset {
                return Err(format!(
                    "blob {} at offset {} where {} was expected",
                    e.id.short(),
                    e.offset,
                    expected_offset
                ));
            }
            expected_offset = e.end();
            entries.push(e);
        }
        if expected_offset != blobs_end {
            return Err(format!("blobs end at {expected_offset} but the header starts at {blobs_end}"));
        }
        Ok(PackHeader { pack_type, entries })
    }
}

fn blob_aad(blob_type: BlobType, flags: u8, id: &BlobId) -> [u8; 34] {
    let mut aad = [0u8; 34];
    aad[0] = blob_type as u8;
    aad[1] = flags;
    aad[2..].copy_from_slice(&id.0);
    aad
}

/// Compresses (when that saves space) and encrypts blobs; one per worker thread, so the zstd context is reused.
pub struct BlobSealer {
    compressor: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
}

/// A blob ready to be appended to a pack.
pub struct SealedBlob {
    pub blob_type: BlobType,
    pub id: BlobId,
    pub flags: u8,
    pub raw_len: u32,
    pub bytes: Vec<u8>,
}

impl BlobSealer {
    /// `zstd_level` 0 turns compression off.
    pub fn new(zstd_level: i32) -> Self {
        let compressor = (zstd_level != 0)
            .then(|| zstd::bulk::Compressor::new(zstd_level).expect("zstd level was validated in the config"));
        BlobSealer { compressor, scratch: Vec::new() }
    }

    pub fn seal(&mut self, keys: &Keys, blob_type: BlobType, id: BlobId, plaintext: &[u8]) -> SealedBlob {
        let mut flags = 0;
        let mut body: &[u8] = plaintext;
        if let Some(c) = &mut self.compressor {
            self.scratch.clear();
            self.scratch.reserve(zstd::zstd_safe::compress_bound(plaintext.len()));
            // Keep the compressed form only if it saves at least 1/32 of the block.
            if c.compress_to_buffer(plaintext, &mut self.scratch).is_ok()
                && self.scratch.len() < plaintext.len() - plaintext.len() / 32
            {
                flags = FLAG_ZSTD;
                body = &self.scratch;
            }
        }
        let mut bytes = Vec::with_capacity(body.len() + SEAL_OVERHEAD);
        keys.seal_into(&blob_aad(blob_type, flags, &id), body, &mut bytes);
        SealedBlob { blob_type, id, flags, raw_len: plaintext.len() as u32, bytes }
    }
}

/// Authenticates, decompresses and re-hashes one stored blob. The error is the cause only.
pub fn open_blob(keys: &Keys, entry: &PackEntry, stored: &[u8]) -> Result<Vec<u8>, String> {
    check_stored_len(entry, stored)?;
    let body = keys.open(&blob_aad(entry.blob_type, entry.flags, &entry.id), stored).map_err(|e| e.to_string())?;
    let plain = if entry.flags & FLAG_ZSTD != 0 {
        let mut out = Vec::with_capacity(entry.raw_len as usize);
        decompress(&body, &mut out)?;
        out
    } else {
        body
    };
    verify_plain(keys, entry, &plain)?;
    Ok(plain)
}

/// [`open_blob`] for bytes the caller owns and no longer needs: decrypted where they lie, the plaintext
/// decompressed (or copied) into `out`, whose buffer is reused. Restore, serve and check fetch whole ranges and
/// open every blob in them: this saves a copy of each blob and, with a reused `out`, an allocation.
pub fn open_blob_in_place(
    keys: &Keys,
    entry: &PackEntry,
    stored: &mut [u8],
    out: &mut AlignedBuf,
) -> Result<(), String> {
    check_stored_len(entry, stored)?;
    let aad = blob_aad(entry.blob_type, entry.flags, &entry.id);
    let body = keys.open_in_place(&aad, stored).map_err(|e| e.to_string())?;
    out.clear(entry.raw_len as usize);
    if entry.flags & FLAG_ZSTD != 0 {
        decompress(body, &mut out.writer())?;
    } else {
        out.extend_from_slice(body);
    }
    verify_plain(keys, entry, out)
}

fn check_stored_len(entry: &PackEntry, stored: &[u8]) -> Result<(), String> {
    if stored.len() != entry.stored_len as usize {
        return Err(format!("{} bytes where the index says {}", stored.len(), entry.stored_len));
    }
    Ok(())
}

fn verify_plain(keys: &Keys, entry: &PackEntry, plain: &[u8]) -> Result<(), String> {
    if plain.len() != entry.raw_len as usize {
        return Err(format!("plaintext is {} bytes where the index says {}", plain.len(), entry.raw_len));
    }
    if keys.blob_id(plain) != entry.id {
        return Err("content does not match its id".into());
    }
    Ok(())
}

/// Decompresses one zstd frame into `out` (up to its capacity).
fn decompress<W: zstd::zstd_safe::WriteBuf + ?Sized>(frame: &[u8], out: &mut W) -> Result<(), String> {
    // One decompression context per thread: creating one per blob showed in profiles.
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    DECOMPRESSOR
        .with_borrow_mut(|slot| {
            if slot.is_none() {
                *slot = Some(zstd::bulk::Decompressor::new()?);
            }
            slot.as_mut().expect("set above").decompress_to_buffer(frame, out)
        })
        .map(|_| ())
        .map_err(|e| format!("zstd: {e}"))
}

/// Builds one pack in memory.
pub struct PackWriter {
    pack_type: BlobType,
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl PackWriter {
    pub fn new(pack_type: BlobType, capacity: usize) -> Self {
        PackWriter { pack_type, buf: Vec::with_capacity(capacity), entries: Vec::new() }
    }

    pub fn add(&mut self, blob: SealedBlob) {
        debug_assert_eq!(blob.blob_type, self.pack_type);
        self.entries.push(PackEntry {
            blob_type: blob.blob_type,
            flags: blob.flags,
            offset: self.buf.len() as u32,
            stored_len: blob.bytes.len() as u32,
            raw_len: blob.raw_len,
            id: blob.id,
        });
        self.buf.extend_from_slice(&blob.bytes);
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Seals the header and returns the finished pack bytes, its id and its entries.
    pub fn finish(mut self, keys: &Keys) -> FinishedPack {
        let header = PackHeader { pack_type: self.pack_type, entries: self.entries };
        let trailer_hdr = envelope::header(Kind::Pack);
        let start = self.buf.len();
        keys.seal_into(&trailer_hdr, &header.encode(), &mut self.buf);
        let header_len = (self.buf.len() - start) as u32;
        self.buf.extend_from_slice(&header_len.to_le_bytes());
        self.buf.extend_from_slice(&trailer_hdr);
        FinishedPack { id: BlobId::of_file(&self.buf), bytes: self.buf, header }
    }
}

pub struct FinishedPack {
    pub id: BlobId,
    pub bytes: Vec<u8>,
    pub header: PackHeader,
}

/// Where the sealed header sits, read from a pack's 12-byte trailer. `pack_len` is the whole pack's length.
pub fn parse_trailer(trailer: &[u8], pack_len: u64) -> Result<(u64, u32), String> {
    if pack_len < TRAILER_LEN as u64 || trailer.len() != TRAILER_LEN {
        return Err(format!("truncated: {pack_len} bytes is too short for a pack"));
    }
    let header_len = u32::from_le_bytes(trailer[..4].try_into().unwrap());
    match envelope::check_header(&trailer[4..], Kind::Pack) {
        Ok(()) => {}
        Err(envelope::HeaderError::Version(v)) => return Err(format!("pack format version {v} is not supported")),
        Err(envelope::HeaderError::Other(e)) => return Err(format!("bad trailer ({e}); truncated or not a pack")),
    }
    let header_start = pack_len
        .checked_sub(TRAILER_LEN as u64 + header_len as u64)
        .ok_or_else(|| format!("header length {header_len} exceeds the pack size {pack_len}"))?;
    Ok((header_start, header_len))
}

/// Decrypts and decodes a pack header. `sealed` is the sealed header, `header_start` where it begins.
pub fn open_header(keys: &Keys, sealed: &[u8], header_start: u64) -> Result<PackHeader, String> {
    let plain = keys.open(&envelope::header(Kind::Pack), sealed).map_err(|e| format!("pack header: {e}"))?;
    PackHeader::decode(&plain, header_start).map_err(|e| format!("pack header: {e}"))
}

/// Reads the header of a whole pack held in memory (used by `check --read-data` and index repair).
pub fn read_header(keys: &Keys, pack: &[u8]) -> Result<PackHeader, String> {
    let len = pack.len() as u64;
    let trailer = &pack[pack.len().saturating_sub(TRAILER_LEN)..];
    let (start, hlen) = parse_trailer(trailer, len)?;
    open_header(keys, &pack[start as usize..start as usize + hlen as usize], start)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> Keys {
        Keys::from_master_secret(&[3u8; 32])
    }

    #[test]
    fn pack_roundtrip() {
        let k = keys();
        let mut sealer = BlobSealer::new(3);
        let mut w = PackWriter::new(BlobType::Data, 1 << 20);
        let blocks: Vec<Vec<u8>> = vec![vec![1u8; 5000], (0..70000u32).map(|i| (i * 7919 % 251) as u8).collect()];
        for b in &blocks {
            w.add(sealer.seal(&k, BlobType::Data, k.blob_id(b), b));
        }
        let p = w.finish(&k);
        assert_eq!(p.id, BlobId::of_file(&p.bytes));
        let h = read_header(&k, &p.bytes).unwrap();
        assert_eq!(h, p.header);
        for (e, b) in h.entries.iter().zip(&blocks) {
            let stored = &p.bytes[e.offset as usize..e.end() as usize];
            assert_eq!(&open_blob(&k, e, stored).unwrap(), b);
        }
        assert_eq!(h.entries[0].flags, FLAG_ZSTD);
    }

    #[test]
    fn blobs_open_in_place_into_an_aligned_reused_block() {
        let k = keys();
        let mut sealer = BlobSealer::new(3);
        let compressible = vec![7u8; 1 << 20];
        // Incompressible: stored without zstd, copied into the block.
        let mut noise = vec![0u8; 1 << 20];
        blake3::Hasher::new().update(b"noise").finalize_xof().fill(&mut noise);
        let mut w = PackWriter::new(BlobType::Data, 4 << 20);
        for b in [&compressible, &noise, &compressible[..1000].to_vec()] {
            w.add(sealer.seal(&k, BlobType::Data, k.blob_id(b), b));
        }
        let p = w.finish(&k);
        assert_eq!(p.header.entries[0].flags, FLAG_ZSTD);
        assert_eq!(p.header.entries[1].flags, 0);
        let mut out = AlignedBuf::default();
        for (e, b) in p.header.entries.iter().zip([&compressible[..], &noise[..], &compressible[..1000]]) {
            let mut stored = p.bytes[e.offset as usize..e.end() as usize].to_vec();
            open_blob_in_place(&k, e, &mut stored, &mut out).unwrap();
            assert_eq!(&out[..], b);
            assert!(out.as_ptr().addr().is_multiple_of(crate::util::BUF_ALIGN));
        }
        // Tampered, or a wrong plaintext length in the entry: refused.
        let e = p.header.entries[0];
        let mut stored = p.bytes[e.offset as usize..e.end() as usize].to_vec();
        stored[30] ^= 1;
        assert!(open_blob_in_place(&k, &e, &mut stored, &mut out).is_err());
        let mut short = e;
        short.raw_len -= 1;
        let mut stored = p.bytes[e.offset as usize..e.end() as usize].to_vec();
        assert!(open_blob_in_place(&k, &short, &mut stored, &mut out).is_err());
    }

    #[test]
    fn damaged_packs_are_refused() {
        let k = keys();
        let mut sealer = BlobSealer::new(3);
        let mut w = PackWriter::new(BlobType::Data, 1 << 20);
        let b = vec![9u8; 4096];
        w.add(sealer.seal(&k, BlobType::Data, k.blob_id(&b), &b));
        let p = w.finish(&k);
        // Truncated.
        assert!(read_header(&k, &p.bytes[..p.bytes.len() - 3]).is_err());
        // Flipped header byte.
        let mut bad = p.bytes.clone();
        let n = bad.len();
        bad[n - TRAILER_LEN - 5] ^= 0x40;
        assert!(read_header(&k, &bad).is_err());
        // Flipped blob byte: header still fine, blob refused.
        let mut bad = p.bytes.clone();
        bad[20] ^= 1;
        let h = read_header(&k, &bad).unwrap();
        let e = h.entries[0];
        assert!(open_blob(&k, &e, &bad[e.offset as usize..e.end() as usize]).is_err());
        // Flag flipped in the entry: authentication fails.
        let mut e2 = e;
        e2.flags ^= FLAG_ZSTD;
        assert!(open_blob(&k, &e2, &p.bytes[e.offset as usize..e.end() as usize]).is_err());
    }
}
