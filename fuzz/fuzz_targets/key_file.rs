//! Key files (decoding only: unwrapping runs Argon2 with the file's own, bounded, parameters).
#![no_main]
use diskvault::format::keyfile::KeyFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(k) = KeyFile::decode(data) {
        assert_eq!(KeyFile::decode(&k.encode()).ok(), Some(k));
    }
});
