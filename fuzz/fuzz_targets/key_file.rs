//! Key files (decoding only: unwrapping runs Argon2 with the file's own, bounded, parameters), and recovery keys
//! (text typed back in by people: `key recover`).
#![no_main]
use diskvault::format::keyfile::KeyFile;
use diskvault::format::recovery_key::RecoveryKey;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(k) = KeyFile::decode(data) {
        assert_eq!(KeyFile::decode(&k.encode()).ok(), Some(k));
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(k) = RecoveryKey::decode(text) {
            assert_eq!(RecoveryKey::decode(&k.encode()), Ok(k));
        }
    }
});
