//! Changed-areas JSON files (user input, read next to stored data).
#![no_main]
use diskvault::source::changes;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(extents) = changes::parse(data, 1 << 40) {
        assert!(extents.iter().all(|e| e.start + e.length <= 1 << 40));
    }
});
