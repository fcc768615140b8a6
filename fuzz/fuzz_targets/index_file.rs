//! Index file payloads, verification and damage records, and local-cache values and files.
#![no_main]
use diskvault::format::index::{BlobLocation, IndexFile};
use diskvault::format::damage::DamageRecord;
use diskvault::format::verified::VerificationRecord;
use diskvault::check::HeaderRecord;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = IndexFile::decode(data) {
        assert_eq!(f.encode(), data);
    }
    if let Ok(r) = VerificationRecord::decode(data) {
        assert_eq!(r.encode(), data);
    }
    if let Ok(r) = DamageRecord::decode(data) {
        assert!(r.entries.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(r.encode(), data);
    }
    if let Ok(l) = BlobLocation::decode(data) {
        assert_eq!(&l.encode()[..], data);
    }
    if let Ok(r) = HeaderRecord::decode(data) {
        assert_eq!(r.encode(), data);
    }
});
