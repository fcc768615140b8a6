//! Config and lock payloads, and the envelope header checks.
#![no_main]
use diskvault::crypto::Keys;
use diskvault::format::config::Config;
use diskvault::format::envelope::{self, Kind};
use diskvault::format::lock::LockInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = Config::decode(data) {
        assert_eq!(c.encode(), data);
    }
    if let Ok(l) = LockInfo::decode(data) {
        assert_eq!(l.encode(), data);
    }
    let keys = Keys::from_master_secret(&[7; 32]);
    let _ = envelope::open(&keys, Kind::Config, data);
    let _ = envelope::open(&keys, Kind::Lock, data);
});
