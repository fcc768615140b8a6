//! The envelope of encrypted whole-file objects (config, index files, snapshots).
//!
//! ```text
//! 0   4  magic "DVLT"
//! 4   1  kind (1 config, 2 index, 3 snapshot, 6 verification record, 7 lock, 8 deletion record, 9 checkpoint,
//!          10 damage record; 4 key file and 5 pack use the same 8-byte header)
//! 5   1  format version (1; 2 for index files listing delta blobs; 3 for objects sealed after a key rotation)
//! 6   2  version 3: key epoch (u16 LE) of the key that sealed the object; before: reserved, zero
//! 8  12  nonce
//! 20  n  AES-256-GCM ciphertext of zstd(payload), AAD = bytes 0..8
//! .. 16  tag
//! ```

use super::{FORMAT_VERSION, MAGIC};
use crate::crypto::{KeyEpoch, Keys, SEAL_OVERHEAD};

pub const HEADER_LEN: usize = 8;
/// Largest payload accepted after decompression; no object of format version 1 comes near it.
const MAX_PAYLOAD: usize = 1 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Config = 1,
    Index = 2,
    Snapshot = 3,
    Key = 4,
    /// Used in pack trailers and as the pack header's associated data.
    Pack = 5,
    Verification = 6,
    Lock = 7,
    Deletion = 8,
    Checkpoint = 9,
    Damage = 10,
}

/// The header of a version 1 object: every object except packs and index files that hold delta blobs.
pub fn header(kind: Kind) -> [u8; HEADER_LEN] {
    header_versioned(kind, 1)
}

pub fn header_versioned(kind: Kind, version: u8) -> [u8; HEADER_LEN] {
    [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], kind as u8, version, 0, 0]
}

/// The format version that first carries a key epoch in the header (bytes 6..8).
pub const EPOCH_VERSION: u8 = 3;

/// The header of an object of format `version` sealed with the key of `epoch`: as before key rotation existed
/// for epoch 0, so that a repository never rotated stays readable by older diskvault; version 3 with the epoch
/// otherwise.
pub fn header_sealed(kind: Kind, version: u8, epoch: KeyEpoch) -> [u8; HEADER_LEN] {
    if epoch == 0 {
        return header_versioned(kind, version);
    }
    let [lo, hi] = epoch.to_le_bytes();
    [MAGIC[0], MAGIC[1], MAGIC[2], MAGIC[3], kind as u8, EPOCH_VERSION, lo, hi]
}

/// The key epoch a checked header (see [`check_header`]) names: 0 before version 3.
pub fn epoch_of(header: &[u8]) -> KeyEpoch {
    if header[5] >= EPOCH_VERSION {
        u16::from_le_bytes([header[6], header[7]])
    } else {
        0
    }
}

/// Checks magic, kind and version (1 up to [`FORMAT_VERSION`]) of an object's 8-byte header; returns the version.
/// The key epoch is then [`epoch_of`] the header.
pub fn check_header(bytes: &[u8], kind: Kind) -> Result<u8, HeaderError> {
    if bytes.len() < HEADER_LEN {
        return Err(HeaderError::Other(format!("truncated: {} bytes, shorter than the header", bytes.len())));
    }
    if bytes[..4] != MAGIC {
        return Err(HeaderError::Other("not a diskvault object (bad magic)".into()));
    }
    if bytes[4] != kind as u8 {
        return Err(HeaderError::Other(format!(
            "object kind {} where {:?} ({}) was expected",
            bytes[4], kind, kind as u8
        )));
    }
    if bytes[5] == 0 || bytes[5] as u32 > FORMAT_VERSION {
        return Err(HeaderError::Version(bytes[5] as u32));
    }
    if bytes[5] < EPOCH_VERSION && bytes[6..8] != [0, 0] {
        return Err(HeaderError::Other("reserved header bytes are not zero".into()));
    }
    Ok(bytes[5])
}

#[derive(Debug)]
pub enum HeaderError {
    Version(u32),
    Other(String),
}

pub fn seal(keys: &Keys, kind: Kind, payload: &[u8]) -> Vec<u8> {
    seal_versioned(keys, kind, 1, payload)
}

pub fn seal_versioned(keys: &Keys, kind: Kind, version: u8, payload: &[u8]) -> Vec<u8> {
    let hdr = header_sealed(kind, version, keys.current_epoch());
    let compressed = zstd::bulk::compress(payload, 3).expect("zstd compression into a Vec cannot fail");
    let mut out = Vec::with_capacity(HEADER_LEN + compressed.len() + SEAL_OVERHEAD);
    out.extend_from_slice(&hdr);
    keys.seal_into(&hdr, &compressed, &mut out);
    out
}

/// Opens an envelope: header check, authentication, decompression. Errors are plain causes; the caller adds
/// the object's name.
pub fn open(keys: &Keys, kind: Kind, bytes: &[u8]) -> Result<Vec<u8>, HeaderError> {
    check_header(bytes, kind)?;
    let compressed = keys
        .open(epoch_of(bytes), &bytes[..HEADER_LEN], &bytes[HEADER_LEN..])
        .map_err(|e| HeaderError::Other(e.to_string()))?;
    decompress_limited(&compressed, MAX_PAYLOAD).map_err(HeaderError::Other)
}

/// Decompresses one zstd frame, refusing output beyond `limit` bytes.
pub fn decompress_limited(data: &[u8], limit: usize) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut dec = zstd::stream::read::Decoder::with_buffer(data).map_err(|e| format!("zstd: {e}"))?;
    let mut out = Vec::new();
    (&mut dec).take(limit as u64 + 1).read_to_end(&mut out).map_err(|e| format!("zstd: {e}"))?;
    if out.len() > limit {
        return Err(format!("decompresses to more than {limit} bytes"));
    }
    Ok(out)
}
