//! Keys and the two cryptographic operations of the format: keyed block ids and authenticated encryption.
//!
//! A repository has a **keyring** of 32-byte master secrets, one per key epoch (wrapped in each key file, see
//! [`crate::format::keyfile`]): epoch 0 from `init`, one more per `key rotate`. Keys are derived from them with
//! BLAKE3's key derivation mode:
//! - the **id key** for keyed BLAKE3 block ids, from epoch 0's secret only, so ids reveal nothing about content
//!   to anyone without the key and stay the same across rotations (dedup against older backups);
//! - an **encryption key** for AES-256-GCM per epoch. New objects are sealed with the newest and say which
//!   epoch sealed them, so a key revoked by a rotation (which knows only the older secrets) reads nothing
//!   written since.
//!
//! AES-256-GCM is ring's (BoringSSL's assembly: AES-NI with GHASH aggregated over several blocks), measured
//! about four times faster here than the RustCrypto `aes-gcm` crate, whose GHASH was the bottleneck of restores
//! and checks. The bytes are standard AES-256-GCM either way (format-spec §3).

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

use crate::format::BlobId;

pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
/// Bytes added by [`Keys::seal`]: nonce in front, tag behind.
pub const SEAL_OVERHEAD: usize = NONCE_LEN + TAG_LEN;

const ID_KEY_CONTEXT: &str = "diskvault 2026-11 v1 block id key";
const ENC_KEY_CONTEXT: &str = "diskvault 2026-11 v1 aes-256-gcm key";

/// Fills `buf` from the operating system's random number generator.
pub fn random_bytes(buf: &mut [u8]) {
    // getrandom only fails if the OS has no entropy source at all; nothing sensible can continue then.
    getrandom::fill(buf).expect("operating system random number generator failed");
}

pub fn random_array<const N: usize>() -> [u8; N] {
    let mut a = [0u8; N];
    random_bytes(&mut a);
    a
}

/// A key epoch: which of the keyring's secrets sealed an object (0 until the first `key rotate`).
pub type KeyEpoch = u16;

/// Most secrets a keyring holds: far more rotations than anyone makes, few enough that a damaged key file
/// cannot make an opener derive keys without end.
pub const MAX_EPOCHS: usize = 1024;

/// The keys derived from a repository's keyring.
#[derive(Clone)]
pub struct Keys {
    id_key: [u8; 32],
    /// One cipher per key epoch, oldest first; new objects are sealed with the last.
    ciphers: Vec<LessSafeKey>,
}

fn cipher(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key is an AES-256 key"))
}

/// Opening a sealed item failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthError {
    /// Wrong key, or the bytes were changed.
    Failed,
    /// Sealed with a key epoch this keyring does not have: a key from before a `key rotate`.
    UnknownEpoch(KeyEpoch),
}

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AuthError::Failed => f.write_str("authentication failed (data altered or wrong key)"),
            AuthError::UnknownEpoch(e) => {
                write!(f, "sealed with key epoch {e}, which this key does not hold (a key from before a key rotation)")
            }
        }
    }
}

impl Keys {
    /// The keys of a repository that was never rotated (a keyring of one secret).
    pub fn from_master_secret(secret: &[u8; 32]) -> Self {
        Keys::from_keyring(std::slice::from_ref(secret))
    }

    /// The keys of a keyring, epoch 0 first. Panics on an empty keyring (key files and recovery keys refuse one).
    pub fn from_keyring(secrets: &[[u8; 32]]) -> Self {
        assert!(!secrets.is_empty(), "a keyring holds at least epoch 0");
        let id_key = blake3::derive_key(ID_KEY_CONTEXT, &secrets[0]);
        let ciphers = secrets.iter().map(|s| cipher(&blake3::derive_key(ENC_KEY_CONTEXT, s))).collect();
        Keys { id_key, ciphers }
    }

    /// The epoch new objects are sealed with: the newest.
    pub fn current_epoch(&self) -> KeyEpoch {
        (self.ciphers.len() - 1) as KeyEpoch
    }

    fn cipher_of(&self, epoch: KeyEpoch) -> Result<&LessSafeKey, AuthError> {
        self.ciphers.get(epoch as usize).ok_or(AuthError::UnknownEpoch(epoch))
    }

    /// The id of a block or metadata blob: keyed BLAKE3 of its plaintext.
    pub fn blob_id(&self, plaintext: &[u8]) -> BlobId {
        BlobId(*blake3::keyed_hash(&self.id_key, plaintext).as_bytes())
    }

    /// Encrypts `plaintext` to `nonce ‖ ciphertext ‖ tag` with the current epoch's key, appended to `out`.
    pub fn seal_into(&self, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let cipher = self.ciphers.last().expect("a keyring holds at least epoch 0");
        let nonce: [u8; NONCE_LEN] = random_array();
        out.reserve(plaintext.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = cipher
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut out[start..])
            .expect("AES-GCM encryption of less than 64 GiB cannot fail");
        out.extend_from_slice(tag.as_ref());
    }

    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        self.seal_into(aad, plaintext, &mut out);
        out
    }

    /// Decrypts `nonce ‖ ciphertext ‖ tag`, sealed with the key of `epoch`, where it lies, after checking its
    /// authenticity; returns the plaintext, a part of `sealed` (saves a copy where the caller owns the bytes
    /// it fetched).
    pub fn open_in_place<'a>(&self, epoch: KeyEpoch, aad: &[u8], sealed: &'a mut [u8]) -> Result<&'a [u8], AuthError> {
        let cipher = self.cipher_of(epoch)?;
        if sealed.len() < SEAL_OVERHEAD {
            return Err(AuthError::Failed);
        }
        let (nonce, rest) = sealed.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| AuthError::Failed)?;
        let plain = cipher.open_in_place(nonce, Aad::from(aad), rest).map_err(|_| AuthError::Failed)?;
        Ok(plain)
    }

    /// Decrypts `nonce ‖ ciphertext ‖ tag`, sealed with the key of `epoch`, and checks its authenticity.
    pub fn open(&self, epoch: KeyEpoch, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, AuthError> {
        let cipher = self.cipher_of(epoch)?;
        if sealed.len() < SEAL_OVERHEAD {
            return Err(AuthError::Failed);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| AuthError::Failed)?;
        let mut buf = rest.to_vec();
        let plain_len = cipher.open_in_place(nonce, Aad::from(aad), &mut buf).map_err(|_| AuthError::Failed)?.len();
        buf.truncate(plain_len);
        Ok(buf)
    }
}

/// AES-256-GCM with a one-off key (used to wrap the master secret in key files).
pub fn seal_with_key(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    Keys { id_key: [0; 32], ciphers: vec![cipher(key)] }.seal(aad, plaintext)
}

pub fn open_with_key(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, AuthError> {
    Keys { id_key: [0; 32], ciphers: vec![cipher(key)] }.open(0, aad, sealed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_roundtrip_and_tamper() {
        let keys = Keys::from_master_secret(&[7u8; 32]);
        let sealed = keys.seal(b"aad", b"hello world");
        assert_eq!(keys.open(0, b"aad", &sealed).unwrap(), b"hello world");
        assert!(keys.open(0, b"other aad", &sealed).is_err());
        let mut bad = sealed.clone();
        bad[NONCE_LEN + 2] ^= 1;
        assert!(keys.open(0, b"aad", &bad).is_err());
        let other = Keys::from_master_secret(&[8u8; 32]);
        assert!(other.open(0, b"aad", &sealed).is_err());
        assert!(keys.open(0, b"aad", &sealed[..10]).is_err());
        let mut in_place = sealed.clone();
        assert_eq!(keys.open_in_place(0, b"aad", &mut in_place).unwrap(), b"hello world");
        let mut bad = sealed.clone();
        bad[NONCE_LEN + 2] ^= 1;
        assert!(keys.open_in_place(0, b"aad", &mut bad).is_err());
    }

    #[test]
    fn a_rotated_keyring_seals_with_its_newest_epoch_and_opens_every_one() {
        let old = Keys::from_master_secret(&[1u8; 32]);
        let rotated = Keys::from_keyring(&[[1u8; 32], [2u8; 32]]);
        assert_eq!((old.current_epoch(), rotated.current_epoch()), (0, 1));
        // Ids come from epoch 0 only: blocks stored before the rotation still deduplicate.
        assert_eq!(old.blob_id(b"block"), rotated.blob_id(b"block"));
        let before = old.seal(b"aad", b"old data");
        assert_eq!(rotated.open(0, b"aad", &before).unwrap(), b"old data");
        let after = rotated.seal(b"aad", b"new data");
        assert_eq!(rotated.open(1, b"aad", &after).unwrap(), b"new data");
        // The revoked keyring reads nothing sealed since, whichever epoch it is asked for.
        assert_eq!(old.open(1, b"aad", &after), Err(AuthError::UnknownEpoch(1)));
        assert_eq!(old.open(0, b"aad", &after), Err(AuthError::Failed));
        assert_eq!(rotated.open(0, b"aad", &after), Err(AuthError::Failed));
    }

    #[test]
    fn ids_are_keyed() {
        let a = Keys::from_master_secret(&[1u8; 32]);
        let b = Keys::from_master_secret(&[2u8; 32]);
        assert_eq!(a.blob_id(b"x"), a.blob_id(b"x"));
        assert_ne!(a.blob_id(b"x"), b.blob_id(b"x"));
        assert_ne!(a.blob_id(b"x").0, *blake3::hash(b"x").as_bytes());
    }
}
