//! Restore of one disk of a snapshot to a file or block device.
//!
//! The disk is restored one manifest segment (4096 blocks) at a time. Within a segment, the blobs needed are
//! grouped by pack and coalesced into ranged reads; a pool of fetchers reads them in parallel, authenticates
//! and decompresses every blob, re-checks its id, and writes it at every offset that holds it. Zero blocks
//! become holes in a fresh file (zeros are written on block devices). `verify` re-reads the target afterwards
//! and compares every block's id with the manifest.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rayon::prelude::*;

use crate::backup::{is_zero, load_segment};
use crate::cache::IndexCache;
use crate::error::{Error, Result};
use crate::format::pack::{self, PackEntry};
use crate::format::snapshot::DiskManifest;
use crate::format::{names, BlobId, ObjectId, SEGMENT_BLOCKS};
use crate::progress::Counters;
use crate::repository::Repository;

pub struct RestoreOptions {
    /// Replace an existing regular file.
    pub overwrite: bool,
    /// Re-read the target afterwards and compare every block's id.
    pub verify: bool,
    /// Concurrent pack reads.
    pub fetchers: usize,
}

impl Default for RestoreOptions {
    fn default() -> Self {
        RestoreOptions { overwrite: false, verify: false, fetchers: 4 }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct RestoreStats {
    pub blocks_written: u64,
    pub bytes_written: u64,
    pub zero_blocks: u64,
    pub bytes_fetched: u64,
    pub blocks_verified: u64,
}

/// Ranged reads are merged across gaps up to this size, and capped at this length.
const COALESCE_GAP: u64 = 256 << 10;
const MAX_READ: u64 = 16 << 20;

struct Target {
    file: File,
    path: PathBuf,
    /// Holes already read as zeros (fresh sparse file); otherwise zero blocks are written.
    holes_are_zero: bool,
}

fn open_target(path: &Path, capacity: u64, overwrite: bool) -> Result<Target> {
    let meta = std::fs::metadata(path).ok();
    let is_device = meta.as_ref().is_some_and(|m| m.file_type().is_block_device());
    if is_device {
        let file = OpenOptions::new().write(true).read(true).open(path).map_err(|e| Error::local(path, e))?;
        let size = {
            use std::io::{Seek, SeekFrom};
            (&file).seek(SeekFrom::End(0)).map_err(|e| Error::local(path, e))?
        };
        if size < capacity {
            return Err(Error::local(path, format!("the block device has {size} bytes, the disk needs {capacity}")));
        }
        return Ok(Target { file, path: path.into(), holes_are_zero: false });
    }
    if let Some(m) = &meta {
        if !m.is_file() {
            return Err(Error::local(path, "exists and is neither a regular file nor a block device"));
        }
        if !overwrite {
            return Err(Error::local(path, "exists already (use --overwrite to replace it)"));
        }
    }
    let file = OpenOptions::new()
        .write(true)
        .read(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(|e| Error::local(path, format!("cannot create: {e}")))?;
    file.set_len(capacity).map_err(|e| Error::local(path, e))?;
    Ok(Target { file, path: path.into(), holes_are_zero: true })
}

/// One blob to fetch and the disk blocks it fills.
struct Want {
    entry: PackEntry,
    blocks: Vec<u64>,
}

/// One ranged read of a pack and the blobs in it.
struct ReadJob {
    pack: ObjectId,
    offset: u64,
    len: u64,
    wants: Vec<Want>,
}

/// Restores `disk` to `target`.
pub fn restore_disk(
    repo: &Repository,
    cache: &IndexCache,
    disk: &DiskManifest,
    target: &Path,
    opts: &RestoreOptions,
    counters: &Counters,
) -> Result<RestoreStats> {
    disk.validate().map_err(|e| Error::corrupt("snapshot", e))?;
    let t = open_target(target, disk.capacity, opts.overwrite)?;
    counters.add_total(disk.capacity);
    let bs = disk.block_size as u64;
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(opts.fetchers.max(1))
        .thread_name(|i| format!("restore-fetch-{i}"))
        .build()
        .map_err(|e| Error::invalid(format!("thread pool: {e}")))?;
    let stats = Mutex::new(RestoreStats::default());
    let zero_buf = vec![0u8; bs as usize];

    for (k, seg) in disk.segments.iter().enumerate() {
        let first = k as u64 * SEGMENT_BLOCKS as u64;
        let ids = load_segment(repo, cache, seg)?;
        let mut by_pack: HashMap<ObjectId, HashMap<BlobId, Want>> = HashMap::new();
        for (j, id) in ids.iter().enumerate() {
            let block = first + j as u64;
            let len = bs.min(disk.capacity - block * bs);
            if id.is_zero_block() {
                if !t.holes_are_zero {
                    write_at(&t, &zero_buf[..len as usize], block * bs)?;
                }
                let mut s = stats.lock().unwrap();
                s.zero_blocks += 1;
                counters.add_done(len);
                continue;
            }
            let loc = cache.lookup(id)?.ok_or_else(|| Error::Restore {
                disk: disk.name.clone(),
                cause: format!(
                    "block {block} (bytes {}..{}) needs blob {id}, which no index file lists (lost pack?)",
                    block * bs,
                    block * bs + len
                ),
            })?;
            by_pack
                .entry(loc.pack)
                .or_default()
                .entry(*id)
                .or_insert_with(|| Want { entry: loc.entry, blocks: Vec::new() })
                .blocks
                .push(block);
        }
        let jobs = plan_reads(by_pack);
        pool.install(|| {
            jobs.par_iter().try_for_each(|job| {
                let fetched = run_read_job(repo, disk, &t, job, counters)?;
                let mut s = stats.lock().unwrap();
                s.bytes_fetched += job.len;
                s.blocks_written += fetched.0;
                s.bytes_written += fetched.1;
                Ok::<_, Error>(())
            })
        })?;
    }
    t.file.sync_all().map_err(|e| Error::local(&t.path, format!("sync: {e}")))?;
    let mut stats = stats.into_inner().unwrap();
    if opts.verify {
        stats.blocks_verified = verify_target(repo, cache, disk, &t)?;
    }
    Ok(stats)
}

fn plan_reads(by_pack: HashMap<ObjectId, HashMap<BlobId, Want>>) -> Vec<ReadJob> {
    let mut jobs = Vec::new();
    for (pack, wants) in by_pack {
        let mut wants: Vec<Want> = wants.into_values().collect();
        wants.sort_by_key(|w| w.entry.offset);
        let mut cur: Option<ReadJob> = None;
        for w in wants {
            let (start, end) = (w.entry.offset as u64, w.entry.end());
            match &mut cur {
                Some(j) if start <= j.offset + j.len + COALESCE_GAP && end - j.offset <= MAX_READ => {
                    j.len = end - j.offset;
                    j.wants.push(w);
                }
                _ => {
                    if let Some(j) = cur.take() {
                        jobs.push(j);
                    }
                    cur = Some(ReadJob { pack, offset: start, len: end - start, wants: vec![w] });
                }
            }
        }
        jobs.extend(cur);
    }
    // Read packs in disk order of their first block: the target is written roughly sequentially.
    jobs.sort_by_key(|j| j.wants.iter().flat_map(|w| w.blocks.first()).min().copied().unwrap_or(0));
    jobs
}

fn write_at(t: &Target, data: &[u8], offset: u64) -> Result<()> {
    t.file
        .write_all_at(data, offset)
        .map_err(|e| Error::local(&t.path, format!("write of {} bytes at offset {offset}: {e}", data.len())))
}

/// Fetches one range, opens each blob in it, writes it everywhere it belongs. Returns (blocks, bytes) written.
fn run_read_job(
    repo: &Repository,
    disk: &DiskManifest,
    t: &Target,
    job: &ReadJob,
    counters: &Counters,
) -> Result<(u64, u64)> {
    let name = names::pack(&job.pack);
    let bs = disk.block_size as u64;
    let describe_blocks = |w: &Want| {
        let b = w.blocks[0];
        let more = if w.blocks.len() > 1 { format!(" and {} more blocks", w.blocks.len() - 1) } else { String::new() };
        format!("block {b} (bytes {}..{}){more}", b * bs, (b * bs + bs).min(disk.capacity))
    };
    let data = repo.backend().get_range(&name, job.offset, job.len).map_err(|e| Error::Restore {
        disk: disk.name.clone(),
        cause: format!("{} cannot be restored: {e}", describe_blocks(&job.wants[0])),
    })?;
    let (mut blocks, mut bytes) = (0, 0);
    for w in &job.wants {
        let rel = (w.entry.offset as u64 - job.offset) as usize;
        let stored = &data[rel..rel + w.entry.stored_len as usize];
        let plain = pack::open_blob(repo.keys(), &w.entry, stored).map_err(|cause| Error::Restore {
            disk: disk.name.clone(),
            cause: format!(
                "{} cannot be restored: {name}: blob {} at offset {}: {cause}",
                describe_blocks(w),
                w.entry.id,
                w.entry.offset
            ),
        })?;
        for &b in &w.blocks {
            let len = bs.min(disk.capacity - b * bs) as usize;
            if plain.len() != len {
                return Err(Error::Restore {
                    disk: disk.name.clone(),
                    cause: format!("block {b}: blob {} holds {} bytes, the block has {len}", w.entry.id, plain.len()),
                });
            }
            write_at(t, &plain, b * bs)?;
            counters.add_done(len as u64);
            blocks += 1;
            bytes += len as u64;
        }
    }
    Ok((blocks, bytes))
}

/// Re-reads the target and compares each block with the manifest. Returns the number of blocks checked.
fn verify_target(repo: &Repository, cache: &IndexCache, disk: &DiskManifest, t: &Target) -> Result<u64> {
    let bs = disk.block_size as u64;
    let mut checked = 0u64;
    for (k, seg) in disk.segments.iter().enumerate() {
        let ids = load_segment(repo, cache, seg)?;
        let first = k as u64 * SEGMENT_BLOCKS as u64;
        let bad: Vec<u64> = ids
            .par_iter()
            .enumerate()
            .map_init(
                || vec![0u8; bs as usize],
                |buf, (j, id)| {
                    let block = first + j as u64;
                    let len = bs.min(disk.capacity - block * bs) as usize;
                    let ok = t.file.read_exact_at(&mut buf[..len], block * bs).is_ok()
                        && if id.is_zero_block() {
                            is_zero(&buf[..len])
                        } else {
                            repo.keys().blob_id(&buf[..len]) == *id
                        };
                    (!ok).then_some(block)
                },
            )
            .flatten()
            .collect();
        if let Some(&b) = bad.first() {
            return Err(Error::Restore {
                disk: disk.name.clone(),
                cause: format!(
                    "verification failed: {} blocks of {} differ from the snapshot, first block {b} (bytes {}..)",
                    bad.len(),
                    t.path.display(),
                    b * bs
                ),
            });
        }
        checked += ids.len() as u64;
    }
    Ok(checked)
}
