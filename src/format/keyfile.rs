//! Key files (`keys/<id>`): the repository's keyring (its master secret, and one more per `key rotate`) wrapped
//! with a key derived from a passphrase by Argon2id. Any number of key files can wrap the same keyring, one per
//! passphrase.
//!
//! File: 8-byte object header (kind 4; version 1 for a keyring of one secret, else version 3 with the newest
//! epoch in bytes 6..8) ‖ bincode of [`KeyFile`]. The wrapped keyring is `nonce ‖ AES-256-GCM(secret of epoch 0
//! ‖ … ‖ secret of the newest epoch) ‖ tag` with associated data `header ‖ memory_kib ‖ iterations ‖
//! parallelism ‖ salt` (integers u32 LE), so the KDF parameters cannot be changed without detection.

use serde::{Deserialize, Serialize};

use super::envelope::{self, HeaderError, Kind, HEADER_LEN};
use super::{bincode_decode, bincode_encode};
use crate::crypto::{self, KeyEpoch};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KdfParams {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl KdfParams {
    /// Defaults for new keys: Argon2id, 64 MiB, 3 passes, 4 lanes: RFC 9106's second recommended option. The
    /// lanes are computed in parallel (argon2's `parallel` feature): the same memory-hard work, done sooner by a
    /// legitimate opener with several cores (every command pays it once: 100 -> 70 ms for `snapshots` here).
    pub const DEFAULT: KdfParams = KdfParams { memory_kib: 64 * 1024, iterations: 3, parallelism: 4 };

    fn validate(&self) -> Result<(), String> {
        // Bounds keep a hostile key file from making `open` allocate or spin without end.
        if !(1..=16).contains(&self.parallelism)
            || !(8 * self.parallelism..=(4 << 20)).contains(&self.memory_kib)
            || !(1..=64).contains(&self.iterations)
        {
            return Err(format!("Argon2 parameters out of range: {self:?}"));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyFile {
    pub created_secs: i64,
    pub hostname: String,
    pub username: String,
    pub kdf: KdfParams,
    pub salt: [u8; 32],
    pub wrapped_secret: Vec<u8>,
    /// The newest key epoch the wrapped keyring holds (from the object header, not the bincode part).
    #[serde(skip)]
    pub epoch: KeyEpoch,
}

#[derive(Debug)]
pub enum KeyError {
    WrongPassword,
    Version(u32),
    Corrupt(String),
}

/// Argon2id (RFC 9106, version 0x13) with a key file's parameters and a 32-byte output.
fn argon2id(kdf: &KdfParams) -> Result<argon2::Argon2<'static>, String> {
    let params = argon2::Params::new(kdf.memory_kib, kdf.iterations, kdf.parallelism, Some(32))
        .map_err(|e| format!("Argon2 parameters: {e}"))?;
    Ok(argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params))
}

fn derive(password: &[u8], kdf: &KdfParams, salt: &[u8; 32]) -> Result<[u8; 32], String> {
    let a = argon2id(kdf)?;
    let mut out = [0u8; 32];
    match KdfMemory::map(kdf.memory_kib as usize) {
        Some(mut memory) => a.hash_password_into_with_memory(password, salt, &mut out, memory.blocks()),
        None => a.hash_password_into(password, salt, &mut out),
    }
    .map_err(|e| format!("Argon2: {e}"))?;
    Ok(out)
}

/// Argon2's working memory (64 MiB for new keys), mapped for this one derivation and backed by huge pages where
/// the kernel allows (`MADV_HUGEPAGE`): a few dozen page faults instead of 16384 and no zeroing pass before the
/// parallel lanes start, which was a third of every command's key derivation (5 alternating runs on a 2-core
/// VM: 111-122 ms instead of 161-192 ms). `None` if the mapping fails: Argon2 then allocates its own.
struct KdfMemory {
    ptr: std::ptr::NonNull<libc::c_void>,
    blocks: usize,
}

impl KdfMemory {
    fn map(blocks: usize) -> Option<KdfMemory> {
        let len = blocks.checked_mul(argon2::Block::SIZE)?;
        // SAFETY: a fresh private anonymous mapping; nothing else refers to it.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return None;
        }
        // SAFETY: advice on the mapping just made; failing to take it costs only speed.
        unsafe { libc::madvise(ptr, len, libc::MADV_HUGEPAGE) };
        Some(KdfMemory { ptr: std::ptr::NonNull::new(ptr)?, blocks })
    }

    fn blocks(&mut self) -> &mut [argon2::Block] {
        // SAFETY: the mapping is page-aligned (Block needs 64 bytes), `blocks` KiB long, zero-filled by the
        // kernel (an all-zero Block is valid: 128 u64s), and borrowed mutably from its only owner.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().cast::<argon2::Block>(), self.blocks) }
    }
}

impl Drop for KdfMemory {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`, which no borrow outlives.
        unsafe { libc::munmap(self.ptr.as_ptr(), self.blocks * argon2::Block::SIZE) };
    }
}

fn object_header(epoch: KeyEpoch) -> [u8; HEADER_LEN] {
    envelope::header_sealed(Kind::Key, 1, epoch)
}

fn aad(epoch: KeyEpoch, kdf: &KdfParams, salt: &[u8; 32]) -> Vec<u8> {
    let mut a = object_header(epoch).to_vec();
    for v in [kdf.memory_kib, kdf.iterations, kdf.parallelism] {
        a.extend_from_slice(&v.to_le_bytes());
    }
    a.extend_from_slice(salt);
    a
}

impl KeyFile {
    /// Wraps `keyring` (epoch 0 first, at least one secret) under `password`.
    pub fn create(
        keyring: &[[u8; 32]],
        password: &[u8],
        kdf: KdfParams,
        hostname: String,
        username: String,
    ) -> KeyFile {
        assert!((1..=crypto::MAX_EPOCHS).contains(&keyring.len()), "a keyring of 1 to MAX_EPOCHS secrets");
        let epoch = (keyring.len() - 1) as KeyEpoch;
        let salt: [u8; 32] = crypto::random_array();
        let wrapping = derive(password, &kdf, &salt).expect("validated parameters");
        let wrapped_secret = crypto::seal_with_key(&wrapping, &aad(epoch, &kdf, &salt), keyring.as_flattened());
        KeyFile { created_secs: crate::util::now_secs(), hostname, username, kdf, salt, wrapped_secret, epoch }
    }

    /// The keyring, epoch 0 first.
    pub fn unwrap_keyring(&self, password: &[u8]) -> Result<Vec<[u8; 32]>, KeyError> {
        self.kdf.validate().map_err(KeyError::Corrupt)?;
        let wrapping = derive(password, &self.kdf, &self.salt).map_err(KeyError::Corrupt)?;
        let plain = crypto::open_with_key(&wrapping, &aad(self.epoch, &self.kdf, &self.salt), &self.wrapped_secret)
            .map_err(|_| KeyError::WrongPassword)?;
        let secrets = self.epoch as usize + 1;
        if plain.len() != secrets * 32 {
            return Err(KeyError::Corrupt(format!(
                "the wrapped keyring is {} bytes, not the {} of epochs 0 to {}",
                plain.len(),
                secrets * 32,
                self.epoch
            )));
        }
        Ok(plain.chunks_exact(32).map(|c| c.try_into().expect("32-byte chunks")).collect())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = object_header(self.epoch).to_vec();
        out.extend_from_slice(&bincode_encode(self));
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<KeyFile, KeyError> {
        envelope::check_header(bytes, Kind::Key).map_err(|e| match e {
            HeaderError::Version(v) => KeyError::Version(v),
            HeaderError::Other(e) => KeyError::Corrupt(e),
        })?;
        let mut k: KeyFile = bincode_decode(&bytes[HEADER_LEN..]).map_err(KeyError::Corrupt)?;
        k.kdf.validate().map_err(KeyError::Corrupt)?;
        k.epoch = envelope::epoch_of(bytes);
        if k.epoch as usize >= crypto::MAX_EPOCHS {
            return Err(KeyError::Corrupt(format!(
                "key epoch {} is beyond the {} a keyring holds",
                k.epoch,
                crypto::MAX_EPOCHS
            )));
        }
        Ok(k)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: KdfParams = KdfParams { memory_kib: 64, iterations: 1, parallelism: 1 };

    #[test]
    fn wrap_unwrap() {
        let k = KeyFile::create(&[[4; 32]], b"pw", FAST, "h".into(), "u".into());
        let bytes = k.encode();
        assert_eq!(bytes[5], 1, "a keyring of one secret is written as format version 1");
        let k2 = KeyFile::decode(&bytes).unwrap();
        assert_eq!(k2.unwrap_keyring(b"pw").unwrap(), [[4; 32]]);
        assert!(matches!(k2.unwrap_keyring(b"nope"), Err(KeyError::WrongPassword)));
        let mut tampered = k2.clone();
        tampered.kdf.iterations = 2;
        assert!(tampered.unwrap_keyring(b"pw").is_err());
    }

    #[test]
    fn a_rotated_keyring_is_wrapped_whole_and_its_epoch_is_authenticated() {
        let k = KeyFile::create(&[[4; 32], [5; 32], [6; 32]], b"pw", FAST, "h".into(), "u".into());
        let bytes = k.encode();
        assert_eq!((bytes[5], &bytes[6..8]), (3, &[2u8, 0][..]), "version 3, newest epoch 2");
        let k2 = KeyFile::decode(&bytes).unwrap();
        assert_eq!(k2.unwrap_keyring(b"pw").unwrap(), [[4; 32], [5; 32], [6; 32]]);
        // An epoch changed in the header no longer opens: the header is associated data.
        let mut edited = bytes.clone();
        edited[6] = 1;
        assert!(matches!(KeyFile::decode(&edited).unwrap().unwrap_keyring(b"pw"), Err(KeyError::WrongPassword)));
    }

    #[test]
    fn derivation_in_mapped_memory_is_argon2id() {
        // The mapped working memory must not change the result: RFC 9106's Argon2id, as the crate computes it
        // in memory of its own, for the default parameters (4 lanes) and the smallest ones.
        for kdf in [KdfParams::DEFAULT, FAST] {
            assert!(KdfMemory::map(kdf.memory_kib as usize).is_some(), "derive would fall back to the crate's memory");
            let salt = [9u8; 32];
            let mut expected = [0u8; 32];
            argon2id(&kdf).unwrap().hash_password_into(b"pw", &salt, &mut expected).unwrap();
            assert_eq!(derive(b"pw", &kdf, &salt).unwrap(), expected);
        }
    }
}
