//! Deletion records of prune (`deletions/<id>`), and lock/session objects: bincode payloads read back from
//! storage.
#![no_main]
use diskvault::format::deletion::DeletionRecord;
use diskvault::format::lock::LockInfo;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = DeletionRecord::decode(data) {
        assert!(r.packs.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(DeletionRecord::decode(&r.encode()).unwrap(), r);
    }
    if let Ok(l) = LockInfo::decode(data) {
        assert_eq!(LockInfo::decode(&l.encode()).unwrap(), l);
    }
});
