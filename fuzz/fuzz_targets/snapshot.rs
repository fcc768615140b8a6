//! Snapshot and checkpoint payloads, and the encrypted envelope around them.
#![no_main]
use diskvault::crypto::Keys;
use diskvault::format::checkpoint::Checkpoint;
use diskvault::format::envelope::{self, Kind};
use diskvault::format::snapshot::Snapshot;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = Snapshot::decode(data) {
        assert_eq!(Snapshot::decode(&s.encode()).unwrap(), s);
    }
    if let Ok(c) = Checkpoint::decode(data) {
        assert_eq!(Checkpoint::decode(&c.encode()).unwrap(), c);
    }
    let keys = Keys::from_master_secret(&[7; 32]);
    let _ = envelope::open(&keys, Kind::Snapshot, data);
    let _ = envelope::open(&keys, Kind::Checkpoint, data);
});
