//! Kept overlay maps of `serve --keep-overlays` (`diskvault-overlay-<snapshot>-<disk>.map`): a local file read
//! back when serve starts. The seed corpus holds valid maps for the geometries below.
#![no_main]
use diskvault::serve::decode_overlay_map;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    for (capacity, block_size) in [(130u64 << 20, 1u64 << 20), (4096, 4096), (0, 1 << 20), (u64::MAX, 1)] {
        if let Ok(words) = decode_overlay_map(data, capacity, block_size) {
            assert_eq!(words.len() as u64, capacity.div_ceil(block_size).div_ceil(64));
        }
    }
});
