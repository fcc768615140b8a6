//! Keys and the two cryptographic operations of the format: keyed block ids and authenticated encryption.
//!
//! A repository has one 32-byte master secret (wrapped in each key file, see [`crate::format::keyfile`]).
//! Two independent keys are derived from it with BLAKE3's key derivation mode:
//! - the **id key** for keyed BLAKE3 block ids, so ids reveal nothing about content to anyone without the key;
//! - the **encryption key** for AES-256-GCM.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};

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

/// The keys derived from a repository's master secret.
#[derive(Clone)]
pub struct Keys {
    id_key: [u8; 32],
    cipher: Aes256Gcm,
}

/// Authentication failed: wrong key, or the bytes were changed.
#[derive(Debug, Clone, Copy)]
pub struct AuthError;

impl std::fmt::Display for AuthError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("authentication failed (data altered or wrong key)")
    }
}

impl Keys {
    pub fn from_master_secret(secret: &[u8; 32]) -> Self {
        let id_key = blake3::derive_key(ID_KEY_CONTEXT, secret);
        let enc_key = blake3::derive_key(ENC_KEY_CONTEXT, secret);
        Keys { id_key, cipher: Aes256Gcm::new(&enc_key.into()) }
    }

    /// The id of a block or metadata blob: keyed BLAKE3 of its plaintext.
    pub fn blob_id(&self, plaintext: &[u8]) -> BlobId {
        BlobId(*blake3::keyed_hash(&self.id_key, plaintext).as_bytes())
    }

    /// Encrypts `plaintext` to `nonce ‖ ciphertext ‖ tag`, appended to `out`.
    pub fn seal_into(&self, aad: &[u8], plaintext: &[u8], out: &mut Vec<u8>) {
        let nonce: [u8; NONCE_LEN] = random_array();
        out.reserve(plaintext.len() + SEAL_OVERHEAD);
        out.extend_from_slice(&nonce);
        let start = out.len();
        out.extend_from_slice(plaintext);
        let tag = self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut out[start..])
            .expect("AES-GCM encryption of less than 64 GiB cannot fail");
        out.extend_from_slice(&tag);
    }

    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        self.seal_into(aad, plaintext, &mut out);
        out
    }

    /// Decrypts `nonce ‖ ciphertext ‖ tag` and checks its authenticity.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, AuthError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(AuthError);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut buf = ct.to_vec();
        self.cipher
            .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, &mut buf, Tag::from_slice(tag))
            .map_err(|_| AuthError)?;
        Ok(buf)
    }
}

/// AES-256-GCM with a one-off key (used to wrap the master secret in key files).
pub fn seal_with_key(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let cipher = Aes256Gcm::new(key.into());
    let nonce: [u8; NONCE_LEN] = random_array();
    let mut out = nonce.to_vec();
    let mut buf = plaintext.to_vec();
    let tag = cipher
        .encrypt_in_place_detached(Nonce::from_slice(&nonce), aad, &mut buf)
        .expect("AES-GCM encryption of less than 64 GiB cannot fail");
    out.extend_from_slice(&buf);
    out.extend_from_slice(&tag);
    out
}

pub fn open_with_key(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, AuthError> {
    let keys = Keys { id_key: [0; 32], cipher: Aes256Gcm::new(key.into()) };
    keys.open(aad, sealed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_roundtrip_and_tamper() {
        let keys = Keys::from_master_secret(&[7u8; 32]);
        let sealed = keys.seal(b"aad", b"hello world");
        assert_eq!(keys.open(b"aad", &sealed).unwrap(), b"hello world");
        assert!(keys.open(b"other aad", &sealed).is_err());
        let mut bad = sealed.clone();
        bad[NONCE_LEN + 2] ^= 1;
        assert!(keys.open(b"aad", &bad).is_err());
        let other = Keys::from_master_secret(&[8u8; 32]);
        assert!(other.open(b"aad", &sealed).is_err());
        assert!(keys.open(b"aad", &sealed[..10]).is_err());
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
