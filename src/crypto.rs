//! Keys and the two cryptographic operations of the format: keyed block ids and authenticated encryption.
//!
//! A repository has one 32-byte master secret (wrapped in each key file, see [`crate::format::keyfile`]).
//! Two independent keys are derived from it with BLAKE3's key derivation mode:
//! - the **id key** for keyed BLAKE3 block ids, so ids reveal nothing about content to anyone without the key;
//! - the **encryption key** for AES-256-GCM.
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

/// The keys derived from a repository's master secret.
#[derive(Clone)]
pub struct Keys {
    id_key: [u8; 32],
    cipher: LessSafeKey,
}

fn cipher(key: &[u8; 32]) -> LessSafeKey {
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("a 32-byte key is an AES-256 key"))
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
        Keys { id_key, cipher: cipher(&enc_key) }
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
            .seal_in_place_separate_tag(Nonce::assume_unique_for_key(nonce), Aad::from(aad), &mut out[start..])
            .expect("AES-GCM encryption of less than 64 GiB cannot fail");
        out.extend_from_slice(tag.as_ref());
    }

    pub fn seal(&self, aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(plaintext.len() + SEAL_OVERHEAD);
        self.seal_into(aad, plaintext, &mut out);
        out
    }

    /// Decrypts `nonce ‖ ciphertext ‖ tag` where it lies, after checking its authenticity; returns the
    /// plaintext, a part of `sealed` (saves a copy where the caller owns the bytes it fetched).
    pub fn open_in_place<'a>(&self, aad: &[u8], sealed: &'a mut [u8]) -> Result<&'a [u8], AuthError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(AuthError);
        }
        let (nonce, rest) = sealed.split_at_mut(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| AuthError)?;
        let plain = self.cipher.open_in_place(nonce, Aad::from(aad), rest).map_err(|_| AuthError)?;
        Ok(plain)
    }

    /// Decrypts `nonce ‖ ciphertext ‖ tag` and checks its authenticity.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, AuthError> {
        if sealed.len() < SEAL_OVERHEAD {
            return Err(AuthError);
        }
        let (nonce, rest) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| AuthError)?;
        let mut buf = rest.to_vec();
        let plain_len = self.cipher.open_in_place(nonce, Aad::from(aad), &mut buf).map_err(|_| AuthError)?.len();
        buf.truncate(plain_len);
        Ok(buf)
    }
}

/// AES-256-GCM with a one-off key (used to wrap the master secret in key files).
pub fn seal_with_key(key: &[u8; 32], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    Keys { id_key: [0; 32], cipher: cipher(key) }.seal(aad, plaintext)
}

pub fn open_with_key(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, AuthError> {
    Keys { id_key: [0; 32], cipher: cipher(key) }.open(aad, sealed)
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
        let mut in_place = sealed.clone();
        assert_eq!(keys.open_in_place(b"aad", &mut in_place).unwrap(), b"hello world");
        let mut bad = sealed.clone();
        bad[NONCE_LEN + 2] ^= 1;
        assert!(keys.open_in_place(b"aad", &mut bad).is_err());
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
