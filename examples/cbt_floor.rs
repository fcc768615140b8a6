//! The floor of a CBT incremental on this machine, for `benches/compare.sh`: the time just to read the blocks
//! a changed-areas file names and hash them (keyed BLAKE3, zero blocks skipped as the backup skips them), on
//! every core, through the backup's own file source. With `--seal` each non-zero block is also compressed and
//! encrypted as the backup would store it whole (zstd at the default level, AES-256-GCM): the work no
//! incremental can skip. Nothing is written.
//!
//! `cargo run --release --example cbt_floor -- IMAGE CHANGED_AREAS_JSON [--seal]`
//!
//! Prints one line: `blocks N nonzero Z bytes B seconds S`.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use diskvault::crypto::Keys;
use diskvault::format::pack::BlobSealer;
use diskvault::format::BlobType;
use diskvault::source::{changes, file::FileSource, BlockRanges, DiskSource};
use diskvault::util::AlignedBuf;

const BLOCK: u64 = diskvault::format::BLOCK_SIZE as u64;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (image, changed) = match &args[..] {
        [i, c, ..] => (PathBuf::from(i), PathBuf::from(c)),
        _ => return Err("usage: cbt_floor IMAGE CHANGED_AREAS_JSON [--seal]".into()),
    };
    let seal = args.iter().any(|a| a == "--seal");
    let capacity = FileSource::open(&image)?.capacity();
    let plan = BlockRanges::from_extents(&changes::load(&changed, capacity)?, BLOCK);
    let blocks: Vec<u64> = plan.iter().collect();
    let keys = Keys::from_master_secret(&diskvault::crypto::random_array());
    let threads = diskvault::util::cores();

    let start = Instant::now();
    // The threads take the blocks in order from one queue, each reading the ones it takes.
    let next = AtomicUsize::new(0);
    let results = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (image, keys, plan, blocks, next) = (&image, &keys, &plan, &blocks, &next);
                s.spawn(move || -> diskvault::Result<(u64, u64)> {
                    let mut source = FileSource::open(image)?;
                    source.will_read(plan, BLOCK);
                    let mut sealer = BlobSealer::new(3);
                    let mut buf = AlignedBuf::zeroed(BLOCK as usize);
                    let (mut nonzero, mut bytes) = (0, 0);
                    while let Some(&b) = blocks.get(next.fetch_add(1, Ordering::Relaxed)) {
                        let len = BLOCK.min(capacity - b * BLOCK) as usize;
                        source.read_at(b * BLOCK, &mut buf[..len])?;
                        bytes += len as u64;
                        if diskvault::backup::is_zero(&buf[..len]) {
                            continue;
                        }
                        nonzero += 1;
                        let id = keys.blob_id(&buf[..len]);
                        if seal {
                            std::hint::black_box(sealer.seal(keys, BlobType::Data, id, &buf[..len]));
                        }
                    }
                    Ok((nonzero, bytes))
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().expect("worker thread")).collect::<Vec<_>>()
    });
    let seconds = start.elapsed().as_secs_f64();
    let (mut nonzero, mut bytes) = (0, 0);
    for r in results {
        let (n, b) = r?;
        nonzero += n;
        bytes += b;
    }
    println!("blocks {} nonzero {nonzero} bytes {bytes} seconds {seconds:.3}", blocks.len());
    Ok(())
}
