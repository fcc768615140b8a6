//! Lock objects (`locks/<name>`): who holds an exclusive operation on the repository.
//!
//! Envelope kind 7, payload bincode of [`LockInfo`]. A lock is created with an atomic create-if-absent and
//! rewritten by its holder every quarter of the stale time; its age is measured by the *storage's* clock
//! (object modification time against a fresh probe object), so expiry needs no synchronized client clocks.

use serde::{Deserialize, Serialize};

use super::{bincode_decode, bincode_encode};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    /// What the holder is doing (`repair index`, `prune`…).
    pub purpose: String,
    pub hostname: String,
    pub username: String,
    pub pid: u32,
    /// Holder's clock when it took the lock (informational only).
    pub created_secs: i64,
    /// Identifies this holder: the tag of its running system (boot and PID namespace), then 8 random bytes
    /// (format-spec §9a); 16 random bytes where the system does not tell.
    pub holder: [u8; 16],
}

impl LockInfo {
    pub fn encode(&self) -> Vec<u8> {
        bincode_encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<LockInfo, String> {
        bincode_decode(bytes)
    }
}
