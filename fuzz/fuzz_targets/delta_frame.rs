//! Delta frames (format-spec §6a) at zstd's level: any frame decoded against any base with one reused context
//! must fail cleanly and never write past its output; a frame the same-place encoder accepts for any block and
//! base must decode to that block.
#![no_main]
use diskvault::format::delta_frame::{PrefixDecoder, SamePlaceEncoder};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 3 {
        return;
    }
    // First two bytes: where the base ends; the third: the output's capacity, in 512-byte steps.
    let rest = &data[3..];
    let split = usize::from(u16::from_le_bytes([data[0], data[1]])) % (rest.len() + 1);
    let (base, tail) = rest.split_at(split);
    let capacity = usize::from(data[2]) * 512;
    let mut decoder = PrefixDecoder::new().expect("a zstd context");
    for _ in 0..2 {
        let mut out = Vec::with_capacity(capacity);
        if let Ok(n) = decoder.decode(tail, base, &mut out) {
            // What it says it wrote is what the output holds, within the room it was given.
            assert_eq!(n, out.len());
            assert!(n <= capacity, "{n} bytes decoded into room for {capacity}");
        }
    }
    let mut encoder = SamePlaceEncoder::new().expect("zstd contexts");
    let mut frame = Vec::new();
    if encoder.encode(tail, base, 3, &mut frame) {
        let mut out = Vec::with_capacity(tail.len());
        assert_eq!(decoder.decode(&frame, base, &mut out).map(|_| out.as_slice()), Ok(tail));
    }
});
