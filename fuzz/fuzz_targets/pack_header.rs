//! Pack trailers, pack header plaintexts, whole packs (sealed with a fixed key) and blobs.
#![no_main]
use diskvault::crypto::Keys;
use diskvault::format::pack::{self, PackHeader};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let keys = Keys::from_master_secret(&[7; 32]);
    // The whole input as a stored pack: trailer and header parsing must fail cleanly.
    if let Ok(h) = pack::read_header(&keys, data) {
        for e in &h.entries {
            let _ = pack::open_blob(&keys, e, &data[e.offset as usize..e.end() as usize], None);
        }
    }
    // The input as a decrypted header: decode, and re-encoding must give the same bytes.
    if data.len() >= 8 {
        let blobs_end = u64::from_le_bytes(data[..8].try_into().unwrap()) % (1 << 32);
        if let Ok(h) = PackHeader::decode(&data[8..], blobs_end) {
            assert_eq!(h.encode(), &data[8..]);
        }
    }
    let _ = pack::parse_trailer(&data[data.len().saturating_sub(12)..], data.len() as u64);
});
