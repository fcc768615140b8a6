//! The repository format, version 1: every object diskvault stores, encoded and decoded byte for byte as
//! `format-spec/` describes. Nothing outside this module knows a byte layout.
//!
//! | object | module | named by |
//! |---|---|---|
//! | `config` | [`config`] | fixed name |
//! | `keys/<id>` | [`keyfile`] | BLAKE3 of the file |
//! | `packs/<xx>/<id>` | [`pack`] | BLAKE3 of the file |
//! | `index/<id>` | [`index`] | BLAKE3 of the file |
//! | `snapshots/<id>` | [`snapshot`] | BLAKE3 of the file |
//! | `verified/<id>` | [`verified`] | BLAKE3 of the file |
//! | `locks/<name>` | [`lock`] | purpose (`exclusive`, `session-<hex>`) |
//! | `deletions/<id>` | [`deletion`] | BLAKE3 of the file |
//! | `damaged/<id>` | [`damage`] | BLAKE3 of the file |
//! | the recovery key (text, kept outside) | [`recovery_key`] | - |
//!
//! Encrypted whole-file objects (config, index, snapshots) share one envelope ([`envelope`]).

pub mod checkpoint;
pub mod config;
pub mod damage;
pub mod deletion;
pub mod delta_frame;
pub mod envelope;
pub mod index;
pub mod keyfile;
pub mod lock;
pub mod pack;
pub mod recovery_key;
pub mod snapshot;
pub mod verified;

use std::fmt;

use serde::{Deserialize, Serialize};

/// The newest format version this code reads and writes. Version 2 adds delta blobs (`format-spec/` §6a): only
/// packs and index files that hold delta blobs are written as version 2, every other object stays version 1.
/// Version 3 adds key epochs (§3a): objects sealed after a `key rotate` say which key sealed them.
pub const FORMAT_VERSION: u32 = 3;

/// File magic shared by every diskvault object.
pub const MAGIC: [u8; 4] = *b"DVLT";

/// The block size of format version 1: 1 MiB.
pub const BLOCK_SIZE: u32 = 1 << 20;

/// Block ids per manifest segment (one metadata blob): 4096 ids = 4 GiB of disk per segment.
pub const SEGMENT_BLOCKS: usize = 4096;

/// A 32-byte identifier: keyed BLAKE3 for blobs, plain BLAKE3 of the file bytes for stored files.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub struct BlobId(pub [u8; 32]);

/// The bytes' order (as the index cache's keys sort), decided by the first eight in one integer comparison where
/// they differ, as they nearly always do between hashes: sorting and searching millions of ids (`stats`,
/// `snapshots --verified`, prune) spent a third of their time in byte-wise comparisons.
impl Ord for BlobId {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.head().cmp(&other.head()).then_with(|| self.0.cmp(&other.0))
    }
}

impl PartialOrd for BlobId {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

/// The id of a stored file (pack, index file, snapshot, key): BLAKE3 of its bytes.
pub type ObjectId = BlobId;

impl BlobId {
    /// The first eight bytes, as a number that orders as they do (ids are hashes: spread evenly over it).
    pub fn head(&self) -> u64 {
        u64::from_be_bytes(self.0[..8].try_into().expect("8 of 32 bytes"))
    }

    /// The id that marks an all-zero block in a manifest segment. Such blocks are never stored.
    pub const ZERO: BlobId = BlobId([0; 32]);

    pub fn is_zero_block(&self) -> bool {
        self.0 == [0; 32]
    }

    pub fn hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn short(&self) -> String {
        hex::encode(&self.0[..4])
    }

    pub fn from_hex(s: &str) -> Option<BlobId> {
        let mut a = [0u8; 32];
        hex::decode_to_slice(s, &mut a).ok()?;
        Some(BlobId(a))
    }

    /// The id of a stored file: unkeyed BLAKE3 of its bytes, so integrity can be checked without a key.
    pub fn of_file(bytes: &[u8]) -> ObjectId {
        BlobId(*blake3::hash(bytes).as_bytes())
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.hex())
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.hex())
    }
}

/// What a blob holds. Data and metadata blobs go into separate packs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BlobType {
    /// A disk block (up to 1 MiB of plaintext).
    Data = 0,
    /// A manifest segment: a list of block ids.
    Segment = 1,
}

impl BlobType {
    pub fn from_u8(v: u8) -> Option<BlobType> {
        match v {
            0 => Some(BlobType::Data),
            1 => Some(BlobType::Segment),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            BlobType::Data => "data",
            BlobType::Segment => "segment",
        }
    }
}

/// Where the objects of each kind live in a repository.
pub mod names {
    use super::ObjectId;

    pub const CONFIG: &str = "config";
    pub const KEYS: &str = "keys";
    pub const PACKS: &str = "packs";
    pub const INDEX: &str = "index";
    pub const SNAPSHOTS: &str = "snapshots";
    pub const LOCKS: &str = "locks";
    pub const VERIFIED: &str = "verified";
    pub const PROTECTED: &str = "protected";
    pub const DELETIONS: &str = "deletions";
    pub const CHECKPOINTS: &str = "checkpoints";
    pub const DAMAGED: &str = "damaged";

    pub fn pack(id: &ObjectId) -> String {
        let h = id.hex();
        format!("{PACKS}/{}/{h}", &h[..2])
    }
    pub fn index(id: &ObjectId) -> String {
        format!("{INDEX}/{}", id.hex())
    }
    pub fn snapshot(id: &ObjectId) -> String {
        format!("{SNAPSHOTS}/{}", id.hex())
    }
    pub fn protected(snapshot: &ObjectId) -> String {
        format!("{PROTECTED}/{}", snapshot.hex())
    }
    pub fn verified(id: &ObjectId) -> String {
        format!("{VERIFIED}/{}", id.hex())
    }
    pub fn deletion(id: &ObjectId) -> String {
        format!("{DELETIONS}/{}", id.hex())
    }
    pub fn damaged(id: &ObjectId) -> String {
        format!("{DAMAGED}/{}", id.hex())
    }
    pub fn checkpoint(id: &ObjectId) -> String {
        format!("{CHECKPOINTS}/{}", id.hex())
    }
    pub fn key(id: &ObjectId) -> String {
        format!("{KEYS}/{}", id.hex())
    }
}

/// A little-endian byte reader for the hand-written layouts; every read is bounds-checked.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len()).ok_or_else(|| {
            format!("truncated: needs {n} bytes at offset {}, has {}", self.pos, self.buf.len() - self.pos)
        })?;
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().unwrap()))
    }
    pub fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    pub fn id(&mut self) -> Result<BlobId, String> {
        Ok(BlobId(self.take(32)?.try_into().unwrap()))
    }
    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

/// bincode configuration of format version 1: little-endian, fixed-width integers, a length limit.
/// `format-spec/encoding.md` spells out what this produces.
pub(crate) fn bincode_config() -> bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Fixint,
    bincode::config::Limit<{ 64 << 20 }>,
> {
    bincode::config::standard().with_little_endian().with_fixed_int_encoding().with_limit::<{ 64 << 20 }>()
}

pub(crate) fn bincode_encode<T: Serialize>(v: &T) -> Vec<u8> {
    bincode::serde::encode_to_vec(v, bincode_config()).expect("encoding an in-memory value cannot fail")
}

/// Decodes a bincode value and requires that it uses every byte.
pub(crate) fn bincode_decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    let (v, used) =
        bincode::serde::decode_from_slice(bytes, bincode_config()).map_err(|e| format!("undecodable: {e}"))?;
    if used != bytes.len() {
        return Err(format!("{} trailing bytes after the encoded value", bytes.len() - used));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::BlobId;

    #[test]
    fn ids_order_as_their_bytes() {
        let mut ids: Vec<BlobId> = (0u32..2000).map(|i| BlobId(*blake3::hash(&i.to_le_bytes()).as_bytes())).collect();
        // Ids alike in their first 8 bytes (and more), differing after them, or only in the last byte.
        for (k, last) in [(8, 1u8), (8, 2), (31, 0), (31, 9), (0, 0)] {
            let mut id = ids[0];
            id.0[k..].fill(last);
            ids.push(id);
        }
        for a in ids[..200].iter().chain(&ids[2000..]) {
            for b in &ids {
                assert_eq!(a.cmp(b), a.0.cmp(&b.0), "{a} {b}");
            }
        }
        let mut sorted = ids.clone();
        sorted.sort();
        ids.sort_by_key(|id| id.0);
        assert_eq!(sorted, ids);
    }
}
