//! `backup --verify`: read back, byte for byte, the packs new snapshots need that no check has verified yet (for
//! an incremental, what it added), as Proxmox Backup Server's "verify new snapshots" does.
//!
//! Unlike `check`, this reads no index file: the packs a restore of the snapshots reads come from the index
//! cache the backup just brought up to date (see [`super::needed`]), and each pack read is judged by its own
//! header. A verify after every backup of a repository of millions of blobs so costs the new data, not a
//! download of the whole index. What it finds is reported, recorded as damage for the next backups (as restores
//! record what they meet; for a pack lost or unreadable as a whole, every blob the index cache lists in it, as
//! check records what the index lists) and its packs are not recorded as verified; a full `check` judges the rest.

use rayon::prelude::*;

use super::{needed, read_data, record_verification, Damage, DataPass, Verifications};
use crate::cache::IndexCache;
use crate::error::{Error, Result};
use crate::format::snapshot::Snapshot;
use crate::format::{names, ObjectId};
use crate::progress::Counters;
use crate::repository::Repository;

/// What [`verify_new_data`] found.
#[derive(Debug, Default)]
pub struct NewDataReport {
    /// Packs a restore of the snapshots reads, and those of them read now (no check had verified them).
    pub packs_needed: usize,
    pub packs_read: usize,
    pub bytes_read: u64,
    /// Damage found, each naming the object and the cause.
    pub errors: Vec<String>,
    /// Verification records that could not be read (their packs were read as if never verified).
    pub warnings: Vec<String>,
}

/// Verifies the data of `snapshots` that no check has verified yet (see the module docs).
pub fn verify_new_data(
    repo: &Repository,
    cache: &IndexCache,
    snapshots: &[(ObjectId, Snapshot)],
    counters: &Counters,
) -> Result<NewDataReport> {
    // Prune waits for this session before it deletes packs it has dropped from the index.
    let _session = crate::lock::start_session(repo, "check")?;
    // A prune since the backup may have moved blobs to new packs: the cache then says where.
    cache.sync(repo)?;
    let listed: Vec<&Snapshot> = snapshots.iter().map(|(_, s)| s).collect();
    let (needed, damaged_blocks) = needed::packs_needed(repo, cache, &listed)?;
    let mut report = NewDataReport { packs_needed: needed.len(), ..Default::default() };
    for ((id, snap), damaged) in snapshots.iter().zip(damaged_blocks) {
        if damaged > 0 {
            report.errors.push(format!(
                "snapshot {} ({}): {} cannot be read (recorded damage or a lost pack; `check` names them)",
                id.short(),
                snap.source,
                crate::util::count(damaged as usize, "block")
            ));
        }
    }
    let verifications = Verifications::load(repo)?;
    report.warnings.extend(verifications.unreadable);
    let mut unverified: Vec<ObjectId> =
        needed.into_iter().filter(|p| !verifications.last_verified.contains_key(p)).collect();
    unverified.sort();
    let sizes = crate::util::with_request_threads(|| {
        unverified.par_iter().map(|p| repo.backend().size(&names::pack(p)).map(|s| (*p, s))).collect::<Vec<_>>()
    })?;
    let mut selected = Vec::with_capacity(sizes.len());
    // Packs lost or unreadable as a whole: every blob the index lists in them is recorded.
    let mut lost = Vec::new();
    for size in sizes {
        match size? {
            (p, Some(size)) => selected.push((p, size)),
            (p, None) => {
                report.errors.push(format!("{}: missing", names::pack(&p)));
                lost.push(p);
            }
        }
    }
    let DataPass { problems, read, .. } = read_data(repo, None, cache, &selected, None, counters)?;
    if crate::util::interrupted() {
        return Err(Error::Interrupted);
    }
    report.packs_read = read.len();
    report.bytes_read = read.iter().map(|(_, s)| s).sum();
    let failed: std::collections::HashSet<ObjectId> = problems.iter().map(|p| p.pack).collect();
    let mut found = Vec::new();
    for p in problems {
        match p.damage {
            Damage::Blob(blob) => found.push((p.pack, blob)),
            Damage::Pack => lost.push(p.pack),
            Damage::Unreachable | Damage::Noted => {}
        }
        report.errors.push(p.message);
    }
    // As check records them: the copies the index lists in the pack. Here the index cache says what that is.
    for pack in lost {
        found.extend(cache.blobs_in_pack(&pack)?.into_iter().map(|b| (pack, b)));
    }
    crate::damage::record_found(repo, &cache.damage(), found);
    if !read.is_empty() {
        // Without the full pack listing, a merge keeps every pack's time; the next check's merge drops pruned ones.
        let none_gone = |_: &ObjectId| false;
        record_verification(repo, &read, &failed, &verifications.record_ids, verifications.last_verified, &none_gone)?;
    }
    Ok(report)
}
