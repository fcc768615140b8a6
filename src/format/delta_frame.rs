//! zstd frames of delta blobs (format-spec §6a) at the level of zstd's own contexts, which the `zstd` crate's safe
//! types cannot hold across frames with a prefix that lives shorter than they do.
//!
//! **Decoding** ([`PrefixDecoder`]): every delta frame is decoded with its base as prefix. A context is kept and
//! reused: making one per frame cost about 0.6 ms (measured as the encoder's check below, 0.8 ms a block with a
//! new context, 0.2 ms with a kept one), more than decoding a lightly changed block.
//!
//! **Encoding a block that differs from its base in few places** ([`SamePlaceEncoder`]). A disk block rewritten
//! in place (database pages, a journal, file-system metadata) equals its base at the same offsets except where it
//! was written. zstd finds those matches too, but only after loading the whole 1 MiB base into its hash table and
//! searching the block: about 1 ms of a core per delta on the benchmark's VM. Here the block is compared with its
//! base word by word; every equal run becomes a match reaching back exactly the base's length (into the prefix,
//! to the same offset), everything else a literal, and zstd only entropy-codes that list of sequences
//! (`ZSTD_compressSequences`, an API of zstd's experimental section). The frame is an ordinary delta frame.
//! Changed bytes are stored as literals, without zstd's search for repeats among them, so this pays only when
//! few bytes changed: at most 1/16 of the block (`MAX_LITERAL_SHARE`), else the caller uses zstd's search.
//! `ZSTD_compressSequences` can only validate offsets against a dictionary it loaded itself (loading is the cost
//! avoided), so each frame is decoded against the base and compared with the block before it is used.
//!
//! Measured:
//! - `benches/pipeline.rs`, `stage/seal-delta-3-pages` (sealing included): 205-258 µs instead of 912 µs for a
//!   block with three of its 256 pages rewritten;
//! - a CBT incremental of 1000 such blocks: 2.99-3.24 instead of 3.92-4.31 CPU-seconds, 14.74 instead of 15.09
//!   MiB stored;
//! - the benchmark's 115 day-1 deltas, in a test program: the 73 under the bound took 19-28 ms to encode instead of
//!   64-95 ms (without the check), and came out smaller. All 115 encoded this way came to 6.3 MB instead of 4.0
//!   (hence the bound; with it, 3.99 MB).

use std::ptr::NonNull;

use zstd::zstd_safe::{zstd_sys as sys, WriteBuf};

/// Equal runs shorter than this stay literals: a sequence costs a few bytes to code.
const MIN_MATCH: usize = 32;
/// A block is encoded here only if at most 1/16 of it differs from its base.
const MAX_LITERAL_SHARE: usize = 16;
/// The frame's window, as for every delta (format-spec §6a): it reaches from the block back across its base.
const WINDOW_LOG: i32 = 21;

/// Encodes blocks against their bases at the same places. One per sealer: it keeps its zstd context and
/// buffers.
pub struct SamePlaceEncoder {
    cctx: NonNull<sys::ZSTD_CCtx>,
    /// Decodes each frame again to check it.
    check: PrefixDecoder,
    sequences: Vec<sys::ZSTD_Sequence>,
    decoded: Vec<u8>,
}

// The context is owned by the encoder and only used through `&mut self`.
unsafe impl Send for SamePlaceEncoder {}

impl Drop for SamePlaceEncoder {
    fn drop(&mut self) {
        // SAFETY: created in `new`, freed once here.
        unsafe { sys::ZSTD_freeCCtx(self.cctx.as_ptr()) };
    }
}

impl SamePlaceEncoder {
    /// `None` if zstd cannot allocate its contexts.
    pub fn new() -> Option<Self> {
        let check = PrefixDecoder::new()?;
        // SAFETY: plain constructor; a null result is handled.
        let cctx = NonNull::new(unsafe { sys::ZSTD_createCCtx() })?;
        Some(SamePlaceEncoder { cctx, check, sequences: Vec::new(), decoded: Vec::new() })
    }

    /// The zstd frame of `block` against `base` as prefix, at compression `level` (which only sets how hard
    /// the literals are coded), into `out`. False, leaving `out` undefined, if more than 1/16 of the block differs
    /// from the base at the same offsets, or if zstd failed.
    pub fn encode(&mut self, block: &[u8], base: &[u8], level: i32, out: &mut Vec<u8>) -> bool {
        let max_literals = block.len() / MAX_LITERAL_SHARE;
        if u32::try_from(base.len()).is_err() || !self.find_sequences(block, base, max_literals) {
            return false;
        }
        out.clear();
        // SAFETY: ZSTD_compressBound has no preconditions.
        out.reserve(unsafe { sys::ZSTD_compressBound(block.len()) });
        let cctx = self.cctx.as_ptr();
        // SAFETY: `cctx` is a live context; `sequences` and `block` are valid for their lengths, and `out` for its
        // capacity; zstd writes at most the capacity and returns how much it wrote or an error code. The
        // sequences' matches reach into the prefix, which zstd does not read when it codes sequences it is given.
        let written = unsafe {
            sys::ZSTD_CCtx_reset(cctx, sys::ZSTD_ResetDirective::ZSTD_reset_session_and_parameters);
            for (param, value) in [
                (sys::ZSTD_cParameter::ZSTD_c_compressionLevel, level),
                (sys::ZSTD_cParameter::ZSTD_c_windowLog, WINDOW_LOG),
                (sys::ZSTD_cParameter::ZSTD_c_minMatch, 4),
            ] {
                if sys::ZSTD_isError(sys::ZSTD_CCtx_setParameter(cctx, param, value)) != 0 {
                    return false;
                }
            }
            sys::ZSTD_compressSequences(
                cctx,
                out.as_mut_ptr().cast(),
                out.capacity(),
                self.sequences.as_ptr(),
                self.sequences.len(),
                block.as_ptr().cast(),
                block.len(),
            )
        };
        // SAFETY: as above.
        if unsafe { sys::ZSTD_isError(written) } != 0 || written > out.capacity() {
            return false;
        }
        // SAFETY: zstd initialised the first `written` bytes.
        unsafe { out.set_len(written) };
        self.decodes_to(out, base, block)
    }

    /// Fills `sequences` with the equal runs of `block` and `base` at the same offsets; false once more than
    /// `max_literals` bytes are left between them.
    fn find_sequences(&mut self, block: &[u8], base: &[u8], max_literals: usize) -> bool {
        self.sequences.clear();
        let compared = block.len().min(base.len());
        let (block_part, base_part) = (&block[..compared], &base[..compared]);
        // The match of offset `base.len()` at any offset of the block is the base's byte at that offset.
        let offset = base.len() as u32;
        let mut matched = 0;
        let (mut literals_from, mut at) = (0, 0);
        while at < compared {
            let run = equal_run(block_part, base_part, at);
            if run >= MIN_MATCH {
                self.sequences.push(sys::ZSTD_Sequence {
                    offset,
                    litLength: (at - literals_from) as u32,
                    matchLength: run as u32,
                    rep: 0,
                });
                matched += run;
                at += run;
                literals_from = at;
            } else {
                at += run.max(1);
                if at - matched > max_literals {
                    return false;
                }
            }
        }
        // What follows the last match (and the part of a block longer than its base) is literals.
        block.len() - matched <= max_literals
    }

    /// Whether `frame` decodes against `base` to exactly `block`.
    fn decodes_to(&mut self, frame: &[u8], base: &[u8], block: &[u8]) -> bool {
        self.decoded.clear();
        self.decoded.reserve(block.len());
        self.check.decode(frame, base, &mut self.decoded).is_ok() && self.decoded == block
    }
}

/// Decodes delta frames against their bases with one reused zstd context.
pub struct PrefixDecoder {
    dctx: NonNull<sys::ZSTD_DCtx>,
}

// The context is owned by the decoder and only used through `&mut self`.
unsafe impl Send for PrefixDecoder {}

impl Drop for PrefixDecoder {
    fn drop(&mut self) {
        // SAFETY: created in `new`, freed once here.
        unsafe { sys::ZSTD_freeDCtx(self.dctx.as_ptr()) };
    }
}

impl PrefixDecoder {
    /// `None` if zstd cannot allocate a context.
    pub fn new() -> Option<Self> {
        // SAFETY: plain constructor; a null result is handled.
        NonNull::new(unsafe { sys::ZSTD_createDCtx() }).map(|dctx| PrefixDecoder { dctx })
    }

    /// Decodes `frame` with `base` as its prefix into `out`, up to its capacity; the decoded length, or zstd's
    /// reason.
    pub fn decode<W: WriteBuf + ?Sized>(&mut self, frame: &[u8], base: &[u8], out: &mut W) -> Result<usize, String> {
        let dctx = self.dctx.as_ptr();
        let zstd_error = |code: usize| {
            // SAFETY: zstd's error names are static C strings.
            let name = unsafe { std::ffi::CStr::from_ptr(sys::ZSTD_getErrorName(code)) };
            format!("zstd: {}", name.to_string_lossy())
        };
        // SAFETY: `dctx` is a live context. The prefix is referenced for the next frame only and `base` outlives
        // the call; the output is valid for its capacity, and zstd writes at most that and returns what it wrote
        // or an error code.
        unsafe {
            for code in [
                sys::ZSTD_DCtx_reset(dctx, sys::ZSTD_ResetDirective::ZSTD_reset_session_only),
                sys::ZSTD_DCtx_refPrefix(dctx, base.as_ptr().cast(), base.len()),
            ] {
                if sys::ZSTD_isError(code) != 0 {
                    return Err(zstd_error(code));
                }
            }
            let written = sys::ZSTD_decompressDCtx(
                dctx,
                out.as_mut_ptr().cast(),
                out.capacity(),
                frame.as_ptr().cast(),
                frame.len(),
            );
            if sys::ZSTD_isError(written) != 0 {
                return Err(zstd_error(written));
            }
            out.filled_until(written);
            Ok(written)
        }
    }
}

/// The length of the run of equal bytes of `a` and `b` from `at` (both the same length), a word at a time.
fn equal_run(a: &[u8], b: &[u8], at: usize) -> usize {
    const WORD: usize = 8;
    let mut end = at;
    while end + WORD <= a.len() && a[end..end + WORD] == b[end..end + WORD] {
        end += WORD;
    }
    while end < a.len() && a[end] == b[end] {
        end += 1;
    }
    end - at
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    /// Bytes no run of which repeats elsewhere (so that only the same-place matches can explain a frame).
    fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut out = vec![0u8; len];
        blake3::Hasher::new().update(&seed.to_le_bytes()).finalize_xof().fill(&mut out);
        out
    }

    fn decode(frame: &[u8], base: &[u8], capacity: usize) -> Vec<u8> {
        let mut dctx = zstd::zstd_safe::DCtx::create();
        dctx.ref_prefix(base).unwrap();
        let mut out = Vec::with_capacity(capacity);
        dctx.decompress(&mut out, frame).unwrap();
        out
    }

    #[test]
    fn a_block_with_a_few_rewritten_pages_becomes_a_small_frame_that_decodes_against_its_base() {
        let base = noise(MIB, 1);
        let mut block = base.clone();
        // Whole pages, a few bytes, and both ends of the block.
        for (at, len) in [(0, 100), (4096 * 7, 4096), (300_001, 3), (MIB - 4096 * 2, 4096), (MIB - 5, 5)] {
            block[at..at + len].copy_from_slice(&noise(len, at as u64 + 7));
        }
        let mut enc = SamePlaceEncoder::new().unwrap();
        let mut frame = Vec::new();
        assert!(enc.encode(&block, &base, 3, &mut frame));
        assert_eq!(decode(&frame, &base, MIB), block);
        // The changed bytes (8304, incompressible) and a few bytes per run: nothing of the base.
        assert!(frame.len() < 8304 + 200, "frame of {} bytes", frame.len());
    }

    #[test]
    fn an_unchanged_block_costs_a_few_bytes_per_128_kib() {
        let base = noise(MIB, 2);
        let mut enc = SamePlaceEncoder::new().unwrap();
        let mut frame = Vec::new();
        assert!(enc.encode(&base, &base, 1, &mut frame));
        assert_eq!(decode(&frame, &base, MIB), base);
        // A frame header, and per zstd block of 128 KiB a block header and one sequence.
        assert!(frame.len() < 160, "frame of {} bytes", frame.len());
    }

    #[test]
    fn a_block_that_differs_in_more_than_a_sixteenth_is_left_to_zstd() {
        let base = noise(MIB, 3);
        let mut enc = SamePlaceEncoder::new().unwrap();
        let mut frame = Vec::new();
        // Exactly a sixteenth is still taken; a byte more is not.
        for (changed, taken) in [(MIB / 16, true), (MIB / 16 + 1, false), (MIB / 16 + 4096, false)] {
            let mut block = base.clone();
            block[MIB / 2..MIB / 2 + changed].copy_from_slice(&noise(changed, 4));
            assert_eq!(enc.encode(&block, &base, 3, &mut frame), taken, "{changed} bytes changed");
            if taken {
                assert_eq!(decode(&frame, &base, MIB), block);
            }
        }
        // Spread out in single bytes: no run of the base is long enough either.
        let mut sprinkled = base.clone();
        for at in (0..MIB).step_by(16) {
            sprinkled[at] ^= 0xff;
        }
        assert!(!SamePlaceEncoder::new().unwrap().encode(&sprinkled, &base, 3, &mut frame));
    }

    #[test]
    fn blocks_shorter_or_longer_than_their_base_decode() {
        let base = noise(MIB, 5);
        let mut enc = SamePlaceEncoder::new().unwrap();
        let mut frame = Vec::new();
        // The last block of a disk whose size is not a whole number of blocks.
        let mut short = base[..MIB / 2 + 17].to_vec();
        short[1000..1010].fill(0);
        assert!(enc.encode(&short, &base, 3, &mut frame));
        assert_eq!(decode(&frame, &base, short.len()), short);
        // A base shorter than the block: the rest is literals.
        let small_base = &base[..MIB - 8192];
        let mut long = base.clone();
        long[5..9].fill(1);
        assert!(enc.encode(&long, small_base, 3, &mut frame));
        assert_eq!(decode(&frame, small_base, MIB), long);
    }
}
