//! Packs: many encrypted blobs in one stored object, with an encrypted header at the end that lists them, so
//! the index can always be rebuilt from the packs alone.
//!
//! ```text
//! blob 0 | blob 1 | … | blob n-1 | sealed header | header_len u32 LE | "DVLT" 5 version epoch(u16, version 3)
//! ```
//! Every blob says which key epoch sealed it (its entry's `key_epoch`, format version 3): after a `key rotate`
//! a pack that prune or repair fills with older blobs holds blobs of several epochs, copied as they are.
//! A blob is `nonce(12) ‖ AES-256-GCM(zstd(plaintext) or plaintext) ‖ tag(16)` with associated data
//! `type u8 ‖ flags u8 ‖ id[32]` (‖ `base[32]` for a delta blob), so a blob cannot be passed off as another blob,
//! another type, with its compression flag flipped or against another base. The sealed header is
//! `nonce ‖ AES-256-GCM(header) ‖ tag` with associated data the 8-byte trailer header. See `format-spec/` §6.
//!
//! A **delta blob** (format version 2) is a data block compressed with a stored data block, its *base*, as
//! zstd's raw-content prefix: a block that shares most of its pages with one stored before (the same disk
//! offset yesterday, a clone's copy of a template block, a file moved by whole pages) costs only what differs.
//! A base is never itself a delta, so a delta opens with exactly one extra blob read.

use super::delta_frame::{PrefixDecoder, SamePlaceEncoder};
use super::envelope::{self, Kind};
use super::{BlobId, BlobType, Reader};
use crate::crypto::{KeyEpoch, Keys, SEAL_OVERHEAD};
use crate::util::AlignedBuf;

/// Flag bit: the blob's plaintext is a zstd frame.
pub const FLAG_ZSTD: u8 = 1;
/// Flag bit (format version 2): the zstd frame was compressed with the base blob's plaintext as prefix.
pub const FLAG_DELTA: u8 = 2;
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
    /// The key epoch that sealed the blob (bytes 2..4; format version 3, zero before).
    pub key_epoch: KeyEpoch,
    pub offset: u32,
    pub stored_len: u32,
    pub raw_len: u32,
    pub id: BlobId,
    /// The base of a delta blob (`flags & FLAG_DELTA`); stored after the entries, not in the 48 bytes.
    pub base: Option<BlobId>,
}

impl PackEntry {
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.push(self.blob_type as u8);
        out.push(self.flags);
        out.extend_from_slice(&self.key_epoch.to_le_bytes());
        out.extend_from_slice(&self.offset.to_le_bytes());
        out.extend_from_slice(&self.stored_len.to_le_bytes());
        out.extend_from_slice(&self.raw_len.to_le_bytes());
        out.extend_from_slice(&self.id.0);
    }

    pub(crate) fn decode(r: &mut Reader<'_>) -> Result<PackEntry, String> {
        let t = r.u8()?;
        let blob_type = BlobType::from_u8(t).ok_or_else(|| format!("unknown blob type {t}"))?;
        let flags = r.u8()?;
        if flags & !(FLAG_ZSTD | FLAG_DELTA) != 0 {
            return Err(format!("unknown blob flags {flags:#x}"));
        }
        if flags & FLAG_DELTA != 0 && (flags & FLAG_ZSTD == 0 || blob_type != BlobType::Data) {
            return Err(format!("a delta must be a compressed data blob (type {t}, flags {flags:#x})"));
        }
        let key_epoch = r.u16()?;
        let e = PackEntry {
            blob_type,
            flags,
            key_epoch,
            offset: r.u32()?,
            stored_len: r.u32()?,
            raw_len: r.u32()?,
            id: r.id()?,
            base: None,
        };
        if e.raw_len > MAX_BLOB_RAW {
            return Err(format!("blob {} claims {} bytes of plaintext", e.id.short(), e.raw_len));
        }
        if (e.stored_len as usize) < SEAL_OVERHEAD {
            return Err(format!("blob {} is {} bytes, shorter than nonce and tag", e.id.short(), e.stored_len));
        }
        Ok(e)
    }

    /// A compressed data blob's entry for unit tests: id 5, 100 bytes stored, 1 MiB of plaintext.
    #[cfg(test)]
    pub(crate) fn example() -> PackEntry {
        PackEntry {
            blob_type: BlobType::Data,
            flags: FLAG_ZSTD,
            key_epoch: 0,
            offset: 0,
            stored_len: 100,
            raw_len: 1 << 20,
            id: BlobId([5; 32]),
            base: None,
        }
    }

    pub fn end(&self) -> u64 {
        self.offset as u64 + self.stored_len as u64
    }

    pub fn is_delta(&self) -> bool {
        self.flags & FLAG_DELTA != 0
    }

    /// Whether this blob may be a delta blob's base: a data blob that is not a delta itself (§6a).
    pub fn can_be_base(&self) -> bool {
        self.blob_type == BlobType::Data && !self.is_delta()
    }
}

/// Writes the base ids of the delta entries among `entries`, in entry order (the table after the entries).
pub(crate) fn encode_bases(entries: &[PackEntry], out: &mut Vec<u8>) {
    for b in entries.iter().filter_map(|e| e.base) {
        out.extend_from_slice(&b.0);
    }
}

/// Reads the base table that follows `entries` and fills in each delta entry's base.
pub(crate) fn decode_bases(r: &mut Reader<'_>, entries: &mut [PackEntry]) -> Result<(), String> {
    for e in entries.iter_mut().filter(|e| e.is_delta()) {
        let base = r.id().map_err(|_| format!("delta blob {}: its base id is missing", e.id.short()))?;
        if base == e.id {
            return Err(format!("delta blob {} is its own base", e.id.short()));
        }
        e.base = Some(base);
    }
    Ok(())
}

/// The format version of a pack or index file holding these entries: 3 if one was sealed after a key rotation,
/// else 2 if one is a delta blob, else 1.
pub fn version_for(entries: &[PackEntry]) -> u8 {
    if entries.iter().any(|e| e.key_epoch != 0) {
        envelope::EPOCH_VERSION
    } else if entries.iter().any(|e| e.is_delta()) {
        2
    } else {
        1
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
        encode_bases(&self.entries, &mut out);
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
        if r.remaining() < count.checked_mul(ENTRY_LEN).ok_or("entry count overflows")? {
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
        decode_bases(&mut r, &mut entries)?;
        if r.remaining() != 0 {
            return Err(format!("{} bytes after the entries and their bases", r.remaining()));
        }
        Ok(PackHeader { pack_type, entries })
    }
}

/// `type ‖ flags ‖ id`, and `‖ base` for a delta blob: 34 or 66 bytes.
fn blob_aad(blob_type: BlobType, flags: u8, id: &BlobId, base: Option<&BlobId>) -> ([u8; 66], usize) {
    let mut aad = [0u8; 66];
    aad[0] = blob_type as u8;
    aad[1] = flags;
    aad[2..34].copy_from_slice(&id.0);
    match base {
        Some(b) => {
            aad[34..].copy_from_slice(&b.0);
            (aad, 66)
        }
        None => (aad, 34),
    }
}

fn entry_aad(e: &PackEntry) -> ([u8; 66], usize) {
    blob_aad(e.blob_type, e.flags, &e.id, e.base.as_ref())
}

/// Compresses (when that saves space) and encrypts blobs; one per worker thread, so the zstd context is reused.
pub struct BlobSealer {
    level: i32,
    compressor: Option<zstd::bulk::Compressor<'static>>,
    scratch: Vec<u8>,
    /// Made at the first delta, at the default levels (1 to 3) only.
    same_place: Option<SamePlaceEncoder>,
}

/// How another repository stored a data block whole: what `copy` seals again with this repository's key
/// instead of compressing the block again (the source's blob was opened, decompressed and its id checked, so
/// the form is known to hold exactly the block).
#[derive(Clone, Debug)]
pub enum StoredForm {
    /// Stored uncompressed (compression did not pay).
    Raw,
    /// The zstd frame of the whole block.
    Zstd(std::sync::Arc<[u8]>),
}

impl StoredForm {
    /// The form of a stored blob whose decrypted body is `body`; `None` for a delta blob, which only decodes
    /// against its base.
    pub fn of(entry: &PackEntry, body: &[u8]) -> Option<StoredForm> {
        match (entry.is_delta(), entry.flags & FLAG_ZSTD != 0) {
            (true, _) => None,
            (false, true) => Some(StoredForm::Zstd(body.into())),
            (false, false) => Some(StoredForm::Raw),
        }
    }

    /// Bytes it holds in memory.
    pub fn memory(&self) -> usize {
        match self {
            StoredForm::Raw => 0,
            StoredForm::Zstd(frame) => frame.len(),
        }
    }
}

/// A blob ready to be appended to a pack.
pub struct SealedBlob {
    pub blob_type: BlobType,
    pub id: BlobId,
    pub flags: u8,
    pub key_epoch: KeyEpoch,
    pub raw_len: u32,
    pub base: Option<BlobId>,
    pub bytes: Vec<u8>,
}

impl SealedBlob {
    /// `body` (the block's stored form: compressed or not as `flags` say) sealed with the current key epoch under
    /// the blob's associated data. Every way of sealing a new blob ends here.
    fn seal(
        keys: &Keys,
        blob_type: BlobType,
        id: BlobId,
        flags: u8,
        base: Option<BlobId>,
        raw_len: usize,
        body: &[u8],
    ) -> SealedBlob {
        let mut bytes = Vec::with_capacity(body.len() + SEAL_OVERHEAD);
        let (aad, n) = blob_aad(blob_type, flags, &id, base.as_ref());
        keys.seal_into(&aad[..n], body, &mut bytes);
        SealedBlob { blob_type, id, flags, key_epoch: keys.current_epoch(), raw_len: raw_len as u32, base, bytes }
    }

    /// A stored blob as it is, for another pack: its sealed bytes do not depend on the pack they are in.
    pub fn copy_of(entry: &PackEntry, stored: &[u8]) -> SealedBlob {
        SealedBlob {
            blob_type: entry.blob_type,
            id: entry.id,
            flags: entry.flags,
            key_epoch: entry.key_epoch,
            raw_len: entry.raw_len,
            base: entry.base,
            bytes: stored.to_vec(),
        }
    }
}

impl BlobSealer {
    /// `zstd_level` 0 turns compression off.
    pub fn new(zstd_level: i32) -> Self {
        let compressor = (zstd_level != 0).then(|| {
            let mut c = zstd::bulk::Compressor::new(zstd_level).expect("zstd level was validated in the config");
            for p in block_params(zstd_level) {
                c.set_parameter(p).expect("a valid zstd parameter");
            }
            c
        });
        BlobSealer { level: zstd_level, compressor, scratch: Vec::new(), same_place: None }
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
        SealedBlob::seal(keys, blob_type, id, flags, None, plaintext.len(), body)
    }

    /// Seals data block `plaintext` in `form`, the way another repository stored it ([`StoredForm`]), instead of
    /// compressing it: a copy between repositories of the same compression level stores what a backup would,
    /// for a fraction of the CPU. With compression off the block is stored raw, whatever the form.
    pub fn seal_stored(&mut self, keys: &Keys, id: BlobId, plaintext: &[u8], form: &StoredForm) -> SealedBlob {
        let (flags, body): (u8, &[u8]) = match form {
            StoredForm::Zstd(frame) if self.compressor.is_some() => (FLAG_ZSTD, frame),
            _ => (0, plaintext),
        };
        SealedBlob::seal(keys, BlobType::Data, id, flags, None, plaintext.len(), body)
    }

    /// Seals a data block as a delta against `base_plain`, the plaintext of the stored data blob `base`.
    /// Returns `None` when that does not pay (compression is off, or the delta saves less than 1/8 of the
    /// block): the caller then seals the block on its own.
    pub fn seal_delta(
        &mut self,
        keys: &Keys,
        id: BlobId,
        plaintext: &[u8],
        base: BlobId,
        base_plain: &[u8],
    ) -> Option<SealedBlob> {
        if self.compressor.is_none() || base == id {
            return None;
        }
        // At the default levels, a block rewritten in few places is coded from those places without a search;
        // higher levels are the user's choice of size over speed, and keep zstd's search.
        if self.level <= 3 && self.same_place.is_none() {
            self.same_place = SamePlaceEncoder::new();
        }
        let (level, scratch) = (self.level, &mut self.scratch);
        if !self.same_place.as_mut().is_some_and(|e| e.encode(plaintext, base_plain, level, scratch)) {
            // A context per delta: zstd keeps the prefix by reference for one frame, which the long-lived
            // compressor's 'static lifetime cannot express. Deltas are a small share of the blocks.
            let mut cctx = zstd::zstd_safe::CCtx::create();
            for p in delta_params(self.level) {
                cctx.set_parameter(p).ok()?;
            }
            cctx.ref_prefix(base_plain).ok()?;
            self.scratch.clear();
            self.scratch.reserve(zstd::zstd_safe::compress_bound(plaintext.len()));
            cctx.compress2(&mut self.scratch, plaintext).ok()?;
        }
        if self.scratch.len() >= plaintext.len() - plaintext.len() / 8 {
            return None;
        }
        let flags = FLAG_ZSTD | FLAG_DELTA;
        Some(SealedBlob::seal(keys, BlobType::Data, id, flags, Some(base), plaintext.len(), &self.scratch))
    }
}

/// zstd parameters of a whole block, beyond its level. Level 3 (the default) searches 1 MiB blocks with
/// 2^15 + 2^14 hash entries instead of zstd's 2^17 + 2^16: its tables then stay in a core's L2 cache next to the
/// block. Measured on the benchmark's three backups, 3 alternating runs each: the full backup's CPU 10.6 ->
/// 9.3 s (median), the repository 794.6 -> 798.9 MiB (+0.5%); 2^14 + 2^14 saved no more CPU and stored +0.9%.
fn block_params(level: i32) -> Vec<zstd::zstd_safe::CParameter> {
    use zstd::zstd_safe::CParameter;
    if level == 3 {
        return vec![CParameter::HashLog(15), CParameter::ChainLog(14)];
    }
    Vec::new()
}

/// zstd parameters of a delta against a 1 MiB base, for a block that differs from it in more than a few places
/// (see [`SamePlaceEncoder`] for the others). At the default levels (1 to 3) deltas use zstd's fast
/// strategy with a window and hash table that reach across the whole base: most of a delta is long matches
/// into the base, which the fast strategy finds as well as level 3's double hash, with a third of the work of
/// loading the base (measured on the benchmark's 115 day-1 deltas: 0.24-0.30 s vs 0.41-0.51 s, 3.9 vs 4.0 MiB).
/// Higher levels are the user's choice of size over speed and are kept.
fn delta_params(level: i32) -> Vec<zstd::zstd_safe::CParameter> {
    use zstd::zstd_safe::CParameter;
    if level > 3 {
        return vec![CParameter::CompressionLevel(level), CParameter::WindowLog(21)];
    }
    vec![CParameter::CompressionLevel(1), CParameter::WindowLog(21), CParameter::HashLog(17)]
}

/// Authenticates, decompresses and re-hashes one stored blob. `base` is the plaintext of a delta blob's base
/// (see [`PackEntry::base`]), `None` for other blobs. The error is the cause only.
pub fn open_blob(keys: &Keys, entry: &PackEntry, stored: &[u8], base: Option<&[u8]>) -> Result<Vec<u8>, String> {
    check_stored_len(entry, stored)?;
    let (aad, n) = entry_aad(entry);
    let body = keys.open(entry.key_epoch, &aad[..n], stored).map_err(|e| e.to_string())?;
    Ok(decode_body(keys, entry, &body, base)?.unwrap_or(body))
}

/// Decodes the decrypted `body` of a blob and checks the plaintext's length and id. Returns the plaintext if it is
/// not `body` itself (a compressed blob's), `None` if it is.
fn decode_body(keys: &Keys, entry: &PackEntry, body: &[u8], base: Option<&[u8]>) -> Result<Option<Vec<u8>>, String> {
    if entry.flags & FLAG_ZSTD == 0 {
        return verify_plain(keys, entry, body).map(|()| None);
    }
    let mut plain = Vec::with_capacity(entry.raw_len as usize);
    decompress(entry, body, &mut plain, base)?;
    verify_plain(keys, entry, &plain)?;
    Ok(Some(plain))
}

/// Authenticates one stored blob without decoding it: what prune checks before copying a delta blob, whose
/// base may be in any pack. The bytes are those sealed for this entry (id, type, flags, base), unaltered.
pub fn authenticate_blob(keys: &Keys, entry: &PackEntry, stored: &[u8]) -> Result<(), String> {
    check_stored_len(entry, stored)?;
    let (aad, n) = entry_aad(entry);
    keys.open(entry.key_epoch, &aad[..n], stored).map(|_| ()).map_err(|e| e.to_string())
}

/// A stored blob checked as [`verify_for_copy`] checks it and sealed again with the current key epoch
/// (`prune --reencrypt` after a `key rotate`): opened once with its own epoch's key (a whole blob then decoded and
/// re-hashed) and sealed with the newest, under the same associated data (type, flags, id, base); the body is
/// not compressed again. The error is the cause only.
pub fn reseal_blob(keys: &Keys, entry: &PackEntry, stored: &[u8]) -> Result<SealedBlob, String> {
    check_stored_len(entry, stored)?;
    let (aad, n) = entry_aad(entry);
    let body = keys.open(entry.key_epoch, &aad[..n], stored).map_err(|e| e.to_string())?;
    if !entry.is_delta() {
        decode_body(keys, entry, &body, None)?;
    }
    let mut bytes = Vec::with_capacity(stored.len());
    keys.seal_into(&aad[..n], &body, &mut bytes);
    Ok(SealedBlob { key_epoch: keys.current_epoch(), bytes, ..SealedBlob::copy_of(entry, &[]) })
}

/// Verifies a stored blob before it is copied into another pack (prune's repacking, `repair packs`): opened
/// and re-hashed, or for a delta blob, whose base may lie in any pack, authenticated (check --read-data decodes
/// it with its base).
pub fn verify_for_copy(keys: &Keys, entry: &PackEntry, stored: &[u8]) -> Result<(), String> {
    if entry.is_delta() {
        authenticate_blob(keys, entry, stored)
    } else {
        open_blob(keys, entry, stored, None).map(|_| ())
    }
}

/// [`open_blob`] for bytes the caller owns and no longer needs: decrypted where they lie, the plaintext
/// decompressed (or copied) into `out`, whose buffer is reused. Restore, serve and check fetch whole ranges and
/// open every blob in them: this saves a copy of each blob and, with a reused `out`, an allocation.
/// Returns where in `stored` the decrypted body now lies (the zstd frame of a compressed blob).
pub fn open_blob_in_place(
    keys: &Keys,
    entry: &PackEntry,
    stored: &mut [u8],
    out: &mut AlignedBuf,
    base: Option<&[u8]>,
) -> Result<std::ops::Range<usize>, String> {
    check_stored_len(entry, stored)?;
    let (aad, n) = entry_aad(entry);
    let body = keys.open_in_place(entry.key_epoch, &aad[..n], stored).map_err(|e| e.to_string())?;
    out.clear(entry.raw_len as usize);
    if entry.flags & FLAG_ZSTD != 0 {
        decompress(entry, body, &mut out.writer(), base)?;
    } else {
        out.extend_from_slice(body);
    }
    verify_plain(keys, entry, out)?;
    Ok(crate::crypto::NONCE_LEN..crate::crypto::NONCE_LEN + body.len())
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

/// Decompresses one zstd frame into `out` (up to its capacity); a delta blob's with its base as prefix.
fn decompress<W: zstd::zstd_safe::WriteBuf + ?Sized>(
    entry: &PackEntry,
    frame: &[u8],
    out: &mut W,
    base: Option<&[u8]>,
) -> Result<(), String> {
    // One decompression context per thread: creating one per blob showed in profiles (for deltas, whose context
    // holds a prefix, see `delta_frame`).
    if let Some(base_id) = entry.base {
        let base = base.ok_or_else(|| format!("delta blob: its base {base_id} was not read"))?;
        thread_local! {
            static DELTA_DECODER: std::cell::RefCell<Option<PrefixDecoder>> = const { std::cell::RefCell::new(None) };
        }
        return DELTA_DECODER.with_borrow_mut(|slot| {
            if slot.is_none() {
                *slot = PrefixDecoder::new();
            }
            let decoder = slot.as_mut().ok_or("zstd: cannot allocate a decompression context")?;
            decoder.decode(frame, base, out).map(|_| ()).map_err(|e| format!("{e} (delta against {base_id})"))
        });
    }
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

/// Open packs, one per blob type (data, segments), that blobs copied out of other packs go into (prune's
/// repacking, `repair packs`).
pub struct PackWriters {
    open: [Option<PackWriter>; 2],
    target: usize,
}

impl PackWriters {
    /// Packs are handed back once they reach `target` bytes.
    pub fn new(target: usize) -> Self {
        PackWriters { open: [None, None], target }
    }

    /// Adds a blob to the open pack of its type; returns that pack if it is now full, to be stored.
    pub fn add(&mut self, blob: SealedBlob) -> Option<PackWriter> {
        let slot = (blob.blob_type == BlobType::Segment) as usize;
        let target = self.target;
        let w = self.open[slot].get_or_insert_with(|| PackWriter::new(blob.blob_type, target + (4 << 20)));
        w.add(blob);
        if w.len() >= target {
            self.open[slot].take()
        } else {
            None
        }
    }

    /// The packs still open that hold something, to be stored.
    pub fn finish(&mut self) -> Vec<PackWriter> {
        self.open.iter_mut().filter_map(Option::take).filter(|w| !w.is_empty()).collect()
    }
}

/// Builds one pack in memory.
pub struct PackWriter {
    pack_type: BlobType,
    buf: Vec<u8>,
    entries: Vec<PackEntry>,
}

impl PackWriter {
    pub fn new(pack_type: BlobType, capacity: usize) -> Self {
        PackWriter::with_buffer(pack_type, Vec::new(), capacity)
    }

    /// A pack built in `buf`, a stored pack's buffer reused (its content is dropped).
    pub fn with_buffer(pack_type: BlobType, mut buf: Vec<u8>, capacity: usize) -> Self {
        buf.clear();
        buf.reserve(capacity);
        PackWriter { pack_type, buf, entries: Vec::new() }
    }

    pub fn add(&mut self, blob: SealedBlob) {
        debug_assert_eq!(blob.blob_type, self.pack_type);
        self.entries.push(PackEntry {
            blob_type: blob.blob_type,
            flags: blob.flags,
            key_epoch: blob.key_epoch,
            offset: self.buf.len() as u32,
            stored_len: blob.bytes.len() as u32,
            raw_len: blob.raw_len,
            id: blob.id,
            base: blob.base,
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
        let trailer_hdr = envelope::header_sealed(Kind::Pack, version_for(&self.entries), keys.current_epoch());
        let header = PackHeader { pack_type: self.pack_type, entries: self.entries };
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

/// A pack's 12-byte trailer: where the sealed header sits and the object header that is its associated data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    pub header_start: u64,
    pub header_len: u32,
    pub object_header: [u8; envelope::HEADER_LEN],
}

impl Trailer {
    /// The pack's format version.
    pub fn version(&self) -> u8 {
        self.object_header[5]
    }
}

/// Parses a pack's 12-byte trailer. `pack_len` is the whole pack's length.
pub fn parse_trailer(trailer: &[u8], pack_len: u64) -> Result<Trailer, String> {
    if pack_len < TRAILER_LEN as u64 || trailer.len() != TRAILER_LEN {
        return Err(format!("truncated: {pack_len} bytes is too short for a pack"));
    }
    let header_len = u32::from_le_bytes(trailer[..4].try_into().unwrap());
    match envelope::check_header(&trailer[4..], Kind::Pack) {
        Ok(_) => {}
        Err(envelope::HeaderError::Version(v)) => return Err(format!("pack format version {v} is not supported")),
        Err(envelope::HeaderError::Other(e)) => return Err(format!("bad trailer ({e}); truncated or not a pack")),
    };
    let header_start = pack_len
        .checked_sub(TRAILER_LEN as u64 + header_len as u64)
        .ok_or_else(|| format!("header length {header_len} exceeds the pack size {pack_len}"))?;
    let object_header = trailer[4..].try_into().expect("TRAILER_LEN - 4 bytes");
    Ok(Trailer { header_start, header_len, object_header })
}

/// Decrypts and decodes a pack header: `sealed` is the sealed header the trailer points to.
pub fn open_header(keys: &Keys, sealed: &[u8], trailer: &Trailer) -> Result<PackHeader, String> {
    let aad = &trailer.object_header;
    let plain = keys.open(envelope::epoch_of(aad), aad, sealed).map_err(|e| format!("pack header: {e}"))?;
    let header = PackHeader::decode(&plain, trailer.header_start).map_err(|e| format!("pack header: {e}"))?;
    let needed = version_for(&header.entries);
    if trailer.version() < needed {
        return Err(format!(
            "pack header: format version {} pack lists blobs of version {needed} (delta blobs or key epochs)",
            trailer.version()
        ));
    }
    Ok(header)
}

/// Reads the header of a whole pack held in memory (used by `check --read-data` and index repair).
pub fn read_header(keys: &Keys, pack: &[u8]) -> Result<PackHeader, String> {
    let len = pack.len() as u64;
    let trailer = &pack[pack.len().saturating_sub(TRAILER_LEN)..];
    let t = parse_trailer(trailer, len)?;
    let start = t.header_start as usize;
    open_header(keys, &pack[start..start + t.header_len as usize], &t)
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
            assert_eq!(&open_blob(&k, e, stored, None).unwrap(), b);
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
            open_blob_in_place(&k, e, &mut stored, &mut out, None).unwrap();
            assert_eq!(&out[..], b);
            assert!(out.as_ptr().addr().is_multiple_of(crate::util::BUF_ALIGN));
        }
        // Tampered, or a wrong plaintext length in the entry: refused.
        let e = p.header.entries[0];
        let mut stored = p.bytes[e.offset as usize..e.end() as usize].to_vec();
        stored[30] ^= 1;
        assert!(open_blob_in_place(&k, &e, &mut stored, &mut out, None).is_err());
        let mut short = e;
        short.raw_len -= 1;
        let mut stored = p.bytes[e.offset as usize..e.end() as usize].to_vec();
        assert!(open_blob_in_place(&k, &short, &mut stored, &mut out, None).is_err());
    }

    #[test]
    fn a_delta_blob_sealed_again_with_a_newer_epoch_opens_only_with_it() {
        let old = keys();
        let rotated = Keys::from_keyring(&[[3u8; 32], [4u8; 32]]);
        let mut base = vec![0u8; 1 << 20];
        blake3::Hasher::new().update(b"base").finalize_xof().fill(&mut base);
        let mut block = base.clone();
        block[..4096].fill(1);
        let (base_id, id) = (old.blob_id(&base), old.blob_id(&block));
        let delta = BlobSealer::new(3).seal_delta(&old, id, &block, base_id, &base).expect("the delta pays");
        let mut w = PackWriter::new(BlobType::Data, 4 << 20);
        w.add(delta);
        let p = w.finish(&old);
        let e = p.header.entries[0];
        let resealed = reseal_blob(&rotated, &e, &p.bytes[e.offset as usize..e.end() as usize]).unwrap();
        assert_eq!((resealed.key_epoch, resealed.base, resealed.flags), (1, Some(base_id), e.flags));
        let mut w = PackWriter::new(BlobType::Data, 4 << 20);
        w.add(resealed);
        let p = w.finish(&rotated);
        let e = p.header.entries[0];
        let stored = &p.bytes[e.offset as usize..e.end() as usize];
        assert_eq!(open_blob(&rotated, &e, stored, Some(&base)).unwrap(), block);
        assert!(open_blob(&old, &e, stored, Some(&base)).unwrap_err().contains("key epoch 1"));
        assert!(read_header(&old, &p.bytes).is_err(), "the new pack's header is sealed with epoch 1 too");
    }

    #[test]
    fn a_whole_blob_is_checked_before_it_is_sealed_again() {
        let old = keys();
        let rotated = Keys::from_keyring(&[[3u8; 32], [4u8; 32]]);
        let block = vec![7u8; 1 << 20];
        // Sealed under an id its content does not hash to: authentic, but not that block.
        let wrong = BlobSealer::new(3).seal(&old, BlobType::Data, old.blob_id(b"another block"), &block);
        let right = BlobSealer::new(3).seal(&old, BlobType::Data, old.blob_id(&block), &block);
        let mut w = PackWriter::new(BlobType::Data, 4 << 20);
        w.add(wrong);
        w.add(right);
        let p = w.finish(&old);
        let stored = |e: &PackEntry| &p.bytes[e.offset as usize..e.end() as usize];
        let (bad, good) = (p.header.entries[0], p.header.entries[1]);
        let err = reseal_blob(&rotated, &bad, stored(&bad)).err().expect("a blob not matching its id was sealed again");
        assert!(err.contains("does not match its id"), "{err}");
        assert_eq!(reseal_blob(&rotated, &good, stored(&good)).unwrap().key_epoch, 1);
    }

    #[test]
    fn deltas_reach_the_whole_base_at_every_level() {
        // Pages at their base offset are 1 MiB back, beyond the window zstd's fast levels use by default.
        let k = keys();
        let mut base = vec![0u8; 1 << 20];
        blake3::Hasher::new().update(b"base").finalize_xof().fill(&mut base);
        let mut block = base.clone();
        block[..4096].fill(1);
        block[(1 << 20) - 4096..].fill(2);
        block.copy_within(8192..12288, 512 << 10);
        // A quarter rewritten: more than the same-place encoder takes at the default levels, so zstd's search.
        let mut quarter = base.clone();
        quarter[256 << 10..512 << 10].fill(3);
        let base_id = k.blob_id(&base);
        for (block, most) in [(&block, 16 << 10), (&quarter, 1 << 10)] {
            let id = k.blob_id(block);
            for level in [1, 3, 9, 19] {
                let delta = BlobSealer::new(level).seal_delta(&k, id, block, base_id, &base).expect("the delta pays");
                assert!(delta.bytes.len() < most, "level {level}: {} bytes", delta.bytes.len());
                let mut w = PackWriter::new(BlobType::Data, 4 << 20);
                w.add(delta);
                let p = w.finish(&k);
                let e = p.header.entries[0];
                let stored = &p.bytes[e.offset as usize..e.end() as usize];
                assert_eq!(&open_blob(&k, &e, stored, Some(&base)).unwrap(), block, "level {level}");
            }
        }
    }

    #[test]
    fn delta_blobs_open_only_with_their_base() {
        let k = keys();
        let mut sealer = BlobSealer::new(3);
        let mut base = vec![0u8; 1 << 20];
        blake3::Hasher::new().update(b"base").finalize_xof().fill(&mut base);
        let mut block = base.clone();
        block[4096..8192].fill(7);
        let (base_id, id) = (k.blob_id(&base), k.blob_id(&block));
        let delta = sealer.seal_delta(&k, id, &block, base_id, &base).expect("one changed page: the delta pays");
        assert!(delta.bytes.len() < 16 << 10, "{} bytes", delta.bytes.len());
        // Unrelated data gains nothing from the base: no delta.
        let mut other = vec![0u8; 1 << 20];
        blake3::Hasher::new().update(b"other").finalize_xof().fill(&mut other);
        assert!(sealer.seal_delta(&k, k.blob_id(&other), &other, base_id, &base).is_none());

        let mut w = PackWriter::new(BlobType::Data, 4 << 20);
        w.add(sealer.seal(&k, BlobType::Data, base_id, &base));
        w.add(delta);
        let p = w.finish(&k);
        assert_eq!(p.bytes[p.bytes.len() - 3], 2, "a pack with a delta blob is format version 2");
        let h = read_header(&k, &p.bytes).unwrap();
        assert_eq!(h, p.header);
        let e = h.entries[1];
        assert_eq!((e.base, e.flags), (Some(base_id), FLAG_ZSTD | FLAG_DELTA));
        let stored = &p.bytes[e.offset as usize..e.end() as usize];
        assert_eq!(open_blob(&k, &e, stored, Some(&base)).unwrap(), block);
        let mut out = AlignedBuf::default();
        open_blob_in_place(&k, &e, &mut stored.to_vec(), &mut out, Some(&base)).unwrap();
        assert_eq!(&out[..], &block[..]);
        authenticate_blob(&k, &e, stored).unwrap();
        // Without the base, with another base's plaintext, or named against another base: refused.
        assert!(open_blob(&k, &e, stored, None).unwrap_err().contains("base"));
        assert!(open_blob(&k, &e, stored, Some(&other)).is_err());
        let renamed = PackEntry { base: Some(k.blob_id(&other)), ..e };
        assert!(open_blob(&k, &renamed, stored, Some(&other)).is_err());
        assert!(authenticate_blob(&k, &renamed, stored).is_err());
        // A pack without deltas stays version 1.
        let mut w = PackWriter::new(BlobType::Data, 4 << 20);
        w.add(sealer.seal(&k, BlobType::Data, base_id, &base));
        let p1 = w.finish(&k);
        assert_eq!(p1.bytes[p1.bytes.len() - 3], 1);
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
        assert!(open_blob(&k, &e, &bad[e.offset as usize..e.end() as usize], None).is_err());
        // Flag flipped in the entry: authentication fails.
        let mut e2 = e;
        e2.flags ^= FLAG_ZSTD;
        assert!(open_blob(&k, &e2, &p.bytes[e.offset as usize..e.end() as usize], None).is_err());
    }
}
