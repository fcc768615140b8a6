//! The repository configuration (`config`): identity and the parameters every writer must agree on.
//! Encrypted with the master key inside the envelope (kind 1); payload is bincode of [`Config`].

use serde::{Deserialize, Serialize};

use super::{bincode_decode, bincode_encode, BLOCK_SIZE};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// Random repository id; also names the local cache directory.
    pub id: [u8; 32],
    pub created_secs: i64,
    /// Block size of disk images: 1 MiB in format version 1.
    pub block_size: u32,
    /// Packs are closed once they reach this many bytes.
    pub pack_target_size: u32,
    /// zstd level for blobs; 0 = no compression.
    pub zstd_level: i32,
}

pub const MIN_PACK_SIZE: u32 = 1 << 20;
pub const MAX_PACK_SIZE: u32 = 512 << 20;

impl Config {
    pub fn encode(&self) -> Vec<u8> {
        bincode_encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Config, String> {
        let c: Config = bincode_decode(bytes)?;
        c.validate()?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.block_size != BLOCK_SIZE {
            return Err(format!(
                "block size {} is not supported (format version 1 uses {BLOCK_SIZE})",
                self.block_size
            ));
        }
        if !(MIN_PACK_SIZE..=MAX_PACK_SIZE).contains(&self.pack_target_size) {
            return Err(format!(
                "pack target size {} is outside {MIN_PACK_SIZE}..={MAX_PACK_SIZE}",
                self.pack_target_size
            ));
        }
        if !(0..=19).contains(&self.zstd_level) {
            return Err(format!("zstd level {} is outside 0..=19", self.zstd_level));
        }
        Ok(())
    }

    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }
}
