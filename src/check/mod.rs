//! `check`: is the repository whole?
//!
//! Structure (always): every index file decodes; every indexed pack exists, is large enough, and its header
//! lists exactly what the index says (read once per host while the pack and its listing stay the same, see
//! [`HeaderRecord`]); every snapshot decodes and every segment and block it references is
//! indexed, each block's blob with the block's length. Packs that no index lists are reported (a killed backup leaves them; they are harmless), and so are
//! checkpoints that do not decode (a warning: a backup then reads what they covered).
//!
//! Data (`--read-data`, or a subset): every selected pack is downloaded whole, its hash compared with its
//! name, its header decrypted, and every blob authenticated, decompressed and re-hashed. A delta blob is opened
//! with its base's plaintext when a reader opens that base later in the pass (packs holding deltas are read
//! first, see `PendingDeltas`); the others last, with their bases read ahead in batches (see `check_deltas`).
//!
//! Problems are collected, not fatal: the report names the object, and for snapshots the disk and byte
//! offset concerned.

mod headers;
mod index;
mod needed;
mod new_data;

use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use crate::damage::KnownDamage;
use crate::error::{Error, Result};
use crate::format::index::{BlobLocation, IndexedPack};
use crate::format::pack::{self, PackEntry};
use crate::format::snapshot::{segment_ids, DiskManifest, Snapshot};
use crate::format::verified::VerificationRecord;
use crate::format::{names, BlobId, BlobType, ObjectId, SEGMENT_BLOCKS};
use crate::progress::Counters;
use crate::repository::{list_ids, BlobLocator, Repository};
use crate::restore::{
    fetch_blobs, plan_reads, preload_bases, split_deltas, with_range_buffer, Bases, ReadJob, Want, WantsByPack,
};
pub use headers::{CheckedHeader, HeaderRecord, FILE_NAME as HEADER_RECORD};
pub use needed::{snapshot_states, SnapshotState};
pub use new_data::{verify_new_data, NewDataReport};

/// Which packs `--read-data` reads.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub enum DataSubset {
    #[default]
    None,
    All,
    /// This fraction of the packs (`n/m` or `x%`), the least recently verified first. Unlike restic's fixed
    /// partitions, running `1/4` four times reads every pack once, from any host, because each run records
    /// what it verified in `verified/`.
    Fraction(f64),
    /// The packs no check has verified yet: with `--snapshot`, what a new backup added (verifying an incremental
    /// reads its new data, not the whole disk again).
    Unverified,
}

impl DataSubset {
    pub fn parse(s: &str) -> std::result::Result<DataSubset, String> {
        if s == "unverified" {
            return Ok(DataSubset::Unverified);
        }
        if let Some(p) = s.strip_suffix('%') {
            let v: f64 = p.trim().parse().map_err(|_| format!("{s:?}: expected a percentage like 10%"))?;
            if !(v > 0.0 && v <= 100.0) {
                return Err(format!("{s:?}: the percentage must be in (0, 100]"));
            }
            return Ok(DataSubset::Fraction(v / 100.0));
        }
        let (n, m) = s.split_once('/').ok_or_else(|| format!("{s:?}: expected n/m, a percentage or unverified"))?;
        let (n, m): (u32, u32) = (
            n.trim().parse().map_err(|_| format!("{s:?}: n is not a number"))?,
            m.trim().parse().map_err(|_| format!("{s:?}: m is not a number"))?,
        );
        if m == 0 || n == 0 || n > m {
            return Err(format!("{s:?}: need 1 <= n <= m"));
        }
        Ok(DataSubset::Fraction(n as f64 / m as f64))
    }
}

/// Verification records beyond this many are merged into one by the next data check.
const MAX_VERIFICATION_RECORDS: usize = 8;

/// What the verification records (format-spec §8a) say.
#[derive(Debug, Default)]
pub struct Verifications {
    /// The records read (a check merges them once there are too many).
    pub record_ids: Vec<ObjectId>,
    /// When each pack was last read and verified (the checking host's clock, seconds since the epoch).
    pub last_verified: HashMap<ObjectId, i64>,
    /// Why records could not be read: each only makes some packs look less recently verified.
    pub unreadable: Vec<String>,
}

impl Verifications {
    pub fn load(repo: &Repository) -> Result<Verifications> {
        let mut v = Verifications { record_ids: list_ids(&**repo.backend(), names::VERIFIED)?, ..Default::default() };
        for rid in &v.record_ids {
            match repo.load_verification(rid) {
                Ok(rec) => {
                    for (id, secs) in rec.entries {
                        let e = v.last_verified.entry(id).or_insert(secs);
                        *e = (*e).max(secs);
                    }
                }
                Err(e) => v.unreadable.push(e.to_string()),
            }
        }
        Ok(v)
    }
}

/// Picks the packs to read: all, the least recently verified fraction (never verified first), or those never
/// verified.
fn select_packs(
    subset: DataSubset,
    packs: &HashMap<ObjectId, u64>,
    last_verified: &HashMap<ObjectId, i64>,
) -> Vec<(ObjectId, u64)> {
    let mut all: Vec<(ObjectId, u64)> = packs.iter().map(|(id, s)| (*id, *s)).collect();
    match subset {
        DataSubset::None => Vec::new(),
        DataSubset::All => all,
        DataSubset::Fraction(f) => {
            all.sort_by_key(|(id, _)| (last_verified.get(id).copied().unwrap_or(i64::MIN), *id));
            let n = ((all.len() as f64 * f).ceil() as usize).min(all.len());
            all.truncate(n);
            all
        }
        DataSubset::Unverified => {
            all.retain(|(id, _)| !last_verified.contains_key(id));
            all
        }
    }
}

/// Blocks of one snapshot disk that cannot be restored, with the reason for each.
#[derive(Debug, Clone)]
pub struct AffectedDisk {
    pub snapshot: ObjectId,
    pub disk: String,
    pub blocks: BlockRuns,
}

/// Block numbers, ascending, as runs of consecutive blocks with one reason: a disk whose every block is lost is
/// one run, not 24 bytes a block (a check of a repository damaged throughout held 239 MB of those at 3 million
/// blocks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockRuns(Vec<(std::ops::Range<u64>, &'static str)>);

impl BlockRuns {
    /// Adds `blocks`, which start at or after the end of the last run.
    pub fn push(&mut self, blocks: std::ops::Range<u64>, why: &'static str) {
        if blocks.is_empty() {
            return;
        }
        debug_assert!(self.0.last().is_none_or(|(last, _)| last.end <= blocks.start), "runs out of order");
        match self.0.last_mut() {
            Some((last, w)) if last.end == blocks.start && *w == why => last.end = blocks.end,
            _ => self.0.push((blocks, why)),
        }
    }

    pub fn runs(&self) -> &[(std::ops::Range<u64>, &'static str)] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many blocks.
    pub fn count(&self) -> u64 {
        self.0.iter().map(|(r, _)| r.end - r.start).sum()
    }

    /// Whether any of `blocks` is in a run.
    pub fn overlaps(&self, blocks: std::ops::Range<u64>) -> bool {
        let i = self.0.partition_point(|(r, _)| r.end <= blocks.start);
        self.0.get(i).is_some_and(|(r, _)| r.start < blocks.end)
    }

    pub fn contains(&self, block: u64) -> bool {
        self.overlaps(block..block + 1)
    }

    /// The runs as byte ranges `[start, end)` of a disk, adjacent ones merged whatever their reasons.
    pub fn byte_ranges(&self, block_size: u64, capacity: u64) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (r, _) in &self.0 {
            let (start, end) = (r.start * block_size, (r.end * block_size).min(capacity));
            match out.last_mut() {
                Some(last) if last.1 == start => last.1 = end,
                _ => out.push((start, end)),
            }
        }
        out
    }
}

#[derive(Debug, Default)]
pub struct CheckReport {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub packs: usize,
    pub index_files: usize,
    pub snapshots: usize,
    pub blobs: usize,
    pub packs_read: usize,
    pub bytes_read: u64,
    /// Pack headers read and compared with the index (without `--read-data`), and those this host's record
    /// vouched for instead (see [`HeaderRecord`]).
    pub headers_read: usize,
    pub headers_known: usize,
    /// Snapshot disks with unreadable blocks (input to `repair snapshots`).
    pub affected: Vec<AffectedDisk>,
    /// Packs in which a problem was found, sorted (input to `repair packs`).
    pub damaged_packs: Vec<ObjectId>,
    /// Index files that are damaged (input to `repair index`).
    pub damaged_index_files: Vec<ObjectId>,
    /// Snapshot objects that are damaged (their bytes do not match their name, or do not open or decode).
    pub damaged_snapshots: Vec<ObjectId>,
    /// With data read: packs no check has verified yet (after this one), and when the least recently
    /// verified of the others was verified (its clock, seconds since the epoch).
    pub never_verified: usize,
    pub oldest_verification: Option<i64>,
    /// Blob copies the damage records (format-spec §8d) name after this check: found now, or earlier in packs
    /// not read again.
    pub damage_recorded: usize,
}

impl CheckReport {
    pub fn is_healthy(&self) -> bool {
        self.errors.is_empty()
    }
}

/// What a check reads, and what it may take as read before.
#[derive(Clone, Debug, Default)]
pub struct CheckOptions {
    /// The packs whose data is read.
    pub subset: DataSubset,
    /// Read data for at most this long: the selected packs are read least recently verified first, and those
    /// not begun when it is spent are left for the next check (their headers are still checked against the
    /// index).
    pub budget: Option<std::time::Duration>,
    /// This host's record of pack headers found to agree with the index (see [`HeaderRecord`]): the headers it
    /// vouches for are not read again, and the check writes what it found back. `None`: every header is read.
    pub header_record: Option<PathBuf>,
    /// Only these snapshots: their structure, and of the data, only the packs a restore of them reads (a
    /// night's backups verified byte for byte without reading the rest). `None`: every snapshot.
    pub snapshots: Option<Vec<ObjectId>>,
}

impl CheckOptions {
    /// Every header read, and the data of `subset`: what `repair` judges by.
    pub fn thorough(subset: DataSubset) -> CheckOptions {
        CheckOptions { subset, ..Default::default() }
    }
}

/// Checks the repository (see the module docs); problems are in the report, errors only stop the check.
pub fn run(repo: &Repository, opts: &CheckOptions, counters: &Counters) -> Result<CheckReport> {
    let subset = opts.subset;
    let deadline = opts.budget.map(|b| std::time::Instant::now() + b);
    let mut report = CheckReport::default();
    let backend = repo.backend();
    // Prune waits for this session before it deletes packs it has dropped from the index.
    let _session = crate::lock::start_session(repo, "check")?;
    let (records, unreadable) = repo.list_deletions_checked()?;
    for (_, e) in unreadable {
        report.warnings.push(format!("{e}: a deletion record of prune; the next prune sets it aside"));
    }
    let doomed = crate::repository::doomed_packs_of(records);
    let records = crate::damage::load(repo)?;
    for e in &records.unreadable {
        report
            .warnings
            .push(format!("{e}: a damage record, replaced by this check's (data read finds that damage again)"));
    }

    // Packs present.
    let mut pack_sizes: HashMap<ObjectId, u64> = HashMap::new();
    for info in backend.list(names::PACKS)? {
        match info.name.rsplit('/').next().and_then(BlobId::from_hex) {
            Some(id) if names::pack(&id) == info.name => {
                pack_sizes.insert(id, info.size);
            }
            _ => report.warnings.push(format!("{}: not a pack name, ignored", info.name)),
        }
    }

    let index = load_index(repo, &mut report)?;
    // Every delta blob's base is an indexed plain data blob.
    let base_problems: Vec<Problem> = index
        .first_copies()
        .filter_map(|(pack, e)| {
            let base = e.base?;
            let why = match index.first_copy(&base) {
                None => "is in no index file",
                Some((_, b)) if !b.can_be_base() => "is not a plain data blob",
                Some(_) => return None,
            };
            Some(Problem {
                pack,
                damage: Damage::Blob(e.id),
                message: format!("{}: blob {}: its delta base {base} {why}", names::pack(&pack), e.id),
            })
        })
        .collect();
    // Packs a prune dropped from the index wait for deletion: neither orphans nor data to verify.
    let dropped = |id: &ObjectId| doomed.binary_search(id).is_ok() && !index.contains_pack(id);
    let awaiting_deletion = pack_sizes.keys().filter(|id| dropped(id)).count();
    pack_sizes.retain(|id, _| !dropped(id));
    if awaiting_deletion > 0 {
        report.warnings.push(format!("{awaiting_deletion} packs dropped by prune await deletion (see `prune`)"));
    }
    report.packs = pack_sizes.len();

    // Every indexed pack exists, and its header agrees with the index (with --read-data, the data pass reads
    // each header along with the rest of its pack).
    let record = opts.header_record.as_deref().map(HeaderRecord::load);
    let data_pass_reads_headers = subset == DataSubset::All && deadline.is_none() && opts.snapshots.is_none();
    let mut headers = check_headers(repo, &index, &pack_sizes, record.as_ref(), data_pass_reads_headers)?;
    report.headers_read = headers.read;
    report.headers_known = headers.known;
    let header_problems = std::mem::take(&mut headers.problems);
    for id in pack_sizes.keys() {
        if !index.contains_pack(id) {
            report.warnings.push(format!(
                "{}: not in any index (left by an interrupted backup; `repair index` adopts it)",
                names::pack(id)
            ));
        }
    }

    // Data: the selected packs, least recently verified first.
    let Verifications { record_ids, last_verified, unreadable } =
        if subset == DataSubset::None { Verifications::default() } else { Verifications::load(repo)? };
    // A lost record only costs ordering: warn and go on.
    report.warnings.extend(unreadable);
    // With snapshots named: only the packs a restore of them reads are read, and data damage elsewhere is not
    // theirs to report.
    let needed_packs = match &opts.snapshots {
        Some(snapshots) => Some(packs_needed(repo, &index, &records.damage, snapshots)?),
        None => None,
    };
    let needed_sizes: Option<HashMap<ObjectId, u64>> = needed_packs
        .as_ref()
        .map(|needed| pack_sizes.iter().filter(|(id, _)| needed.contains(id)).map(|(id, size)| (*id, *size)).collect());
    let mut selected = select_packs(subset, needed_sizes.as_ref().unwrap_or(&pack_sizes), &last_verified);
    if deadline.is_some() {
        // What the budget leaves out should be what was verified most recently.
        selected.sort_by_key(|(id, _)| (last_verified.get(id).copied().unwrap_or(i64::MIN), *id));
    } else {
        // Packs holding delta blobs first: their deltas wait for their bases (see `PendingDeltas`).
        let holds_deltas = |id: &ObjectId| index.listing(id).is_some_and(|p| p.holds_deltas());
        selected.sort_by_key(|(id, _)| !holds_deltas(id));
    }
    let DataPass { problems: data_problems, read, .. } =
        read_data(repo, Some(&index), &index, &selected, deadline, counters)?;
    // Interrupted: nothing is reported (nor recorded as verified) from a partial read.
    if crate::util::interrupted() {
        return Err(Error::Interrupted);
    }
    report.packs_read = read.len();
    report.bytes_read = read.iter().map(|(_, s)| s).sum();
    let failed: HashSet<ObjectId> = data_problems.iter().map(|p| p.pack).collect();
    if subset != DataSubset::None {
        let now = crate::util::now_secs();
        let verified_now: HashSet<ObjectId> =
            read.iter().map(|(id, _)| *id).filter(|id| !failed.contains(id)).collect();
        let last = |id: &ObjectId| if verified_now.contains(id) { Some(now) } else { last_verified.get(id).copied() };
        report.never_verified = pack_sizes.keys().filter(|id| last(id).is_none()).count();
        report.oldest_verification = pack_sizes.keys().filter_map(last).min();
    }
    if !read.is_empty() {
        // Packs gone since (a prune deleted them) are left out when the records are merged.
        let gone = |id: &ObjectId| !pack_sizes.contains_key(id);
        record_verification(repo, &read, &failed, &record_ids, last_verified, &gone)?;
    }

    // Packs that could not be used at all (`unusable`), and the blob copies found damaged or lost (`found`).
    let mut unusable: HashSet<ObjectId> = HashSet::new();
    let mut unreachable: HashSet<ObjectId> = HashSet::new();
    let mut found: Vec<(ObjectId, BlobId)> = Vec::new();
    for p in header_problems.into_iter().chain(base_problems).chain(data_problems) {
        report.damaged_packs.push(p.pack);
        match p.damage {
            Damage::Blob(b) => found.push((p.pack, b)),
            Damage::Pack => {
                unusable.insert(p.pack);
                if let Some(ip) = index.pack(&p.pack) {
                    found.extend(ip.entries.iter().map(|e| (p.pack, e.id)));
                }
            }
            Damage::Unreachable => {
                unusable.insert(p.pack);
                unreachable.insert(p.pack);
            }
            Damage::Noted => {}
        }
        report.errors.push(p.message);
    }
    let copies = |id: &BlobId| index.copies(id);
    // Packs whose every byte this check has judged: read, not only attempted.
    let judged: HashSet<ObjectId> = read.iter().map(|(id, _)| *id).filter(|id| !unreachable.contains(id)).collect();
    let known = known_damage(&records.damage, found, &judged, &index, &copies);
    // Damage found by an earlier check in packs not read now.
    let mut earlier: std::collections::BTreeMap<ObjectId, usize> = Default::default();
    for (pack, blob) in known.sorted() {
        let theirs = needed_packs.as_ref().is_none_or(|n| n.contains(&pack));
        if theirs && !judged.contains(&pack) && !unusable.contains(&pack) && index.lists(&pack, &blob) {
            *earlier.entry(pack).or_default() += 1;
        }
    }
    for (pack, n) in earlier {
        report.damaged_packs.push(pack);
        report.errors.push(format!(
            "{}: {} found damaged by an earlier check (a damage record says so; `check --read-data` reads the pack \
             again)",
            names::pack(&pack),
            crate::util::count(n, "blob")
        ));
    }
    report.damaged_packs.sort();
    report.damaged_packs.dedup();
    if let Some(path) = &opts.header_record {
        // What agrees now: the headers read or vouched for above, and those of the packs read whole; less every
        // pack found damaged.
        let read_whole = read.iter().filter_map(|&(id, size)| {
            Some(CheckedHeader { pack: id, size, listing: headers::listing_digest(&index.pack(&id)?) })
        });
        let mut agree: Vec<CheckedHeader> = headers.agree.into_iter().chain(read_whole).collect();
        agree.retain(|c| report.damaged_packs.binary_search(&c.pack).is_err());
        if let Err(e) = HeaderRecord::new(agree).save(path) {
            tracing::warn!("{}: not saved ({e}): the next check reads every pack header again", path.display());
        }
    }
    // A blob restores from its first copy in a pack that is usable and not known to be damaged.
    let intact = |id: &BlobId| copies(id).find(|(pack, _)| !unusable.contains(pack) && !known.at(pack, id));
    let damaged = |id: &BlobId| match (index.first_copy(id), intact(id)) {
        (None, _) => Some("not indexed"),
        (Some(_), None) if copies(id).all(|(pack, _)| unusable.contains(&pack)) => Some("in a missing or damaged pack"),
        (Some(_), None) => Some("damaged"),
        (Some(_), Some((_, e))) => match e.base {
            Some(b) if intact(&b).is_none() => Some("a delta whose base is damaged"),
            _ => None,
        },
    };

    // Checkpoints of interrupted backups (format-spec §8c) are shortcuts, not data: a damaged one only means
    // the next backup reads what it covered, so it is a warning.
    for cid in list_ids(&**backend, names::CHECKPOINTS)? {
        match repo.load_checkpoint(&cid) {
            Ok(_) | Err(Error::Missing { .. }) => {}
            Err(e) => report.warnings.push(format!("{e} (a checkpoint: the next backup of its VM reads in full)")),
        }
    }

    // Snapshots: every segment and block resolves to an intact blob. Blobs the known damage names are noted as
    // referenced: a lost one no snapshot references is forgotten below (unless some segment could not be read).
    let only = opts.snapshots.as_deref();
    let (referenced, every_segment_read) = check_snapshots(repo, only, &known, &damaged, &intact, &mut report)?;

    // A lost blob (its copy's pack is gone) that no snapshot references is no longer worth knowing of.
    let known = if every_segment_read {
        let needed = |(pack, blob): &(ObjectId, BlobId)| index.lists(pack, blob) || referenced.contains(blob);
        KnownDamage::new(known.sorted().into_iter().filter(needed))
    } else {
        known
    };
    if known != records.damage || records.ids.len() > 1 || !records.unreadable.is_empty() {
        crate::damage::replace(repo, &records.ids, &known)?;
    }
    report.damage_recorded = known.len();
    Ok(report)
}

/// An index file's listings as check holds them, and the key epoch that sealed it.
type LoadedIndexFile = Result<(Vec<index::Listing>, crate::crypto::KeyEpoch)>;

/// The index files, and what they say each pack holds. Damaged index files and disagreements are reported.
fn load_index(repo: &Repository, report: &mut CheckReport) -> Result<index::Index> {
    // An index file listed a moment ago and gone now was replaced by a prune: read the new listing.
    let mut attempt = 0;
    let loaded = loop {
        let index_ids = repo.list_index_ids()?;
        // Each file's listings are made compact as it is decoded, not once all are: a check of 3 million blobs
        // peaked at 350-384 MB holding them decoded, 278-286 MB so.
        let loaded: Vec<(ObjectId, LoadedIndexFile)> = crate::util::with_request_threads(|| {
            index_ids
                .par_iter()
                .map(|id| {
                    let listings = |(f, epoch): (crate::format::index::IndexFile, _)| {
                        (f.packs.into_iter().map(index::Listing::new).collect(), epoch)
                    };
                    (*id, repo.load_index_with_epoch(id).map(listings))
                })
                .collect()
        })?;
        attempt += 1;
        if attempt < 5 && loaded.iter().any(|(_, f)| matches!(f, Err(Error::Missing { .. }))) {
            continue;
        }
        break loaded;
    };
    report.index_files = loaded.len();
    let current_epoch = repo.keys().current_epoch();
    let mut older_index_files = 0;
    let listed = loaded.iter().filter_map(|(_, f)| f.as_ref().ok()).flat_map(|(f, _)| f);
    let (packs, blobs) = listed.fold((0, 0), |(p, b), pack| (p + 1, b + pack.len()));
    let mut index = index::IndexBuilder::with_capacity(packs, blobs);
    for (id, f) in loaded {
        match f {
            Err(e) => {
                if matches!(e, Error::Corrupt { .. }) {
                    report.damaged_index_files.push(id);
                }
                report.errors.push(e.to_string())
            }
            Ok((listings, epoch)) => {
                older_index_files += (epoch < current_epoch) as usize;
                for p in listings {
                    // A pack listed twice (an interrupted prune or repair wrote both) is one copy.
                    match index.pack(&p.id()) {
                        Some(first) if *first != p => report.errors.push(format!(
                            "{}: lists pack {} differently from another index file",
                            names::index(&id),
                            p.id().short()
                        )),
                        Some(_) => {}
                        None => index.add(p),
                    }
                }
            }
        }
    }
    let index = index.finish();
    report.blobs = index.blob_count();
    // After a key rotation: what a revoked key still opens, until `prune --reencrypt` seals it again.
    let older_blobs = index.first_copies().filter(|(_, e)| e.key_epoch < current_epoch).count();
    if older_blobs + older_index_files > 0 {
        report.warnings.push(format!(
            "{older_blobs} blobs and {older_index_files} index files are sealed with a key from before the last key \
             rotation (epoch {current_epoch}): a revoked key still opens them; `prune --reencrypt` seals them again"
        ));
    }
    Ok(index)
}

/// The data pass: reads `selected` in order, several packs at a time, until the deadline (packs begun are
/// finished), then the delta blobs whose bases were not met on the way (none are left in what it returns).
/// Headers are compared with `index`'s listings where given; delta bases are found through `locator`.
fn read_data(
    repo: &Repository,
    index: Option<&index::Index>,
    locator: &dyn BlobLocator,
    selected: &[(ObjectId, u64)],
    deadline: Option<std::time::Instant>,
    counters: &Counters,
) -> Result<DataPass> {
    counters.add_total(selected.iter().map(|(_, s)| s).sum());
    // More readers than cores: a pack's download overlaps the checking of others.
    let readers = rayon::current_num_threads().max(2) * 2;
    // Readers take the selected packs in order, each until none is left or the budget is spent.
    let next = std::sync::atomic::AtomicUsize::new(0);
    let pending = PendingDeltas::default();
    let read_one = |_| {
        let mut out = DataPass::default();
        loop {
            if crate::util::interrupted() || deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return out;
            }
            let Some(&(id, size)) = selected.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) else {
                return out;
            };
            let indexed = index.and_then(|i| i.pack(&id));
            let (p, deltas) = check_pack_data(repo, &id, size, indexed.as_ref(), locator, &pending);
            counters.add_done(size);
            out.problems.extend(p);
            out.deltas.extend(deltas.into_iter().map(|e| (id, e)));
            out.read.push((id, size));
        }
    };
    // The pool's threads are joined before check goes on (see `util::with_thread_pool`).
    crate::util::with_thread_pool(readers, "check", |pool| {
        pool.install(|| -> Result<_> {
            let mut pass = (0..readers).into_par_iter().map(read_one).reduce(DataPass::default, |mut a, b| {
                a.problems.extend(b.problems);
                a.deltas.extend(b.deltas);
                a.read.extend(b.read);
                a
            });
            let (left, opened) = pending.finish();
            tracing::debug!(
                "delta blobs: {opened} opened with their base in the data pass, {} after it",
                left.len() + pass.deltas.len()
            );
            pass.deltas.extend(left);
            let deltas = std::mem::take(&mut pass.deltas);
            pass.problems.extend(check_deltas(repo, locator, deltas)?);
            Ok(pass)
        })
    })?
}

/// The header pass's findings.
#[derive(Default)]
struct HeaderPass {
    problems: Vec<Problem>,
    /// Headers that agree with the index: read now, or vouched for by the record.
    agree: Vec<CheckedHeader>,
    read: usize,
    known: usize,
}

/// Every indexed pack exists, and its header lists what the index lists: read from the storage unless `record`
/// vouches for it, or `data_pass_reads_headers` (then only existence is checked here).
fn check_headers(
    repo: &Repository,
    index: &index::Index,
    pack_sizes: &HashMap<ObjectId, u64>,
    record: Option<&HeaderRecord>,
    data_pass_reads_headers: bool,
) -> Result<HeaderPass> {
    enum Outcome {
        /// Indexed but not there, or its size unknown.
        Absent(Problem),
        /// Left to the data pass.
        Unread,
        /// The record vouches for it.
        Known(CheckedHeader),
        Read(std::result::Result<CheckedHeader, Problem>),
    }
    let outcomes: Vec<Outcome> = crate::util::with_request_threads(|| {
        index
            .listings()
            .par_iter()
            .map(|listing| {
                let id = &listing.id();
                let name = names::pack(id);
                let problem = |msg: String| Problem { pack: *id, damage: Damage::Pack, message: msg };
                let unreachable = |e: Error| Problem { pack: *id, damage: damage_of(&e), message: e.to_string() };
                let size = match pack_sizes.get(id) {
                    Some(&size) => size,
                    // Not listed: lost, or stored (with its index file) by a backup after the listing.
                    None => match repo.backend().size(&name) {
                        Ok(Some(size)) => size,
                        Ok(None) => {
                            let missing = format!("{name}: indexed but missing ({} blobs lost)", listing.len());
                            return Outcome::Absent(problem(missing));
                        }
                        Err(e) => return Outcome::Absent(unreachable(e)),
                    },
                };
                // A full data pass reads every header with its pack; one on a budget may not get to every pack.
                if data_pass_reads_headers {
                    return Outcome::Unread;
                }
                // Made whole only here: the data pass and missing packs need no copy of the listing.
                let p = &listing.to_indexed();
                let checked = CheckedHeader { pack: *id, size, listing: headers::listing_digest(p) };
                if record.is_some_and(|r| r.vouches_for(id, size, &checked.listing)) {
                    return Outcome::Known(checked);
                }
                Outcome::Read(match repo.read_pack_header(id, size) {
                    Err(e) => Err(unreachable(e)),
                    Ok(h) if h.entries != p.entries || h.pack_type != p.pack_type => {
                        Err(problem(format!("{name}: pack header does not match the index")))
                    }
                    Ok(_) => Ok(checked),
                })
            })
            .collect()
    })?;
    let mut pass = HeaderPass::default();
    for o in outcomes {
        match o {
            Outcome::Absent(p) => pass.problems.push(p),
            Outcome::Unread => {}
            Outcome::Known(checked) => {
                pass.known += 1;
                pass.agree.push(checked);
            }
            Outcome::Read(r) => {
                pass.read += 1;
                match r {
                    Ok(checked) => pass.agree.push(checked),
                    Err(p) => pass.problems.push(p),
                }
            }
        }
    }
    Ok(pass)
}

/// What a manifest segment holds, as the snapshot pass found it: each distinct segment is judged once, however
/// many snapshots share it.
enum SegmentVerdict {
    /// No intact copy of it, and why (see `damaged` in [`run_within`]).
    Lost(&'static str),
    /// Its blob is not a segment of that many blocks.
    WrongShape,
    /// Reading it failed.
    Unreadable(String),
    /// Read: the positions of its blocks that are unreadable, and why.
    Read(BlockRuns),
}

/// The snapshot pass: every snapshot decodes, and every segment and block it references resolves to an intact
/// blob (`damaged` says why not; `intact` gives the copy to read). Each distinct segment is read once, several
/// at a time: an incremental shares the segments of its unchanged ranges with its parent, so reading them per
/// snapshot read the same segment as many times as there are snapshots, each a round trip on S3. Returns the
/// ids `known` names that the snapshots reference, and whether every segment could be read.
fn check_snapshots(
    repo: &Repository,
    only: Option<&[ObjectId]>,
    known: &KnownDamage,
    damaged: &(dyn Fn(&BlobId) -> Option<&'static str> + Sync),
    intact: &(dyn Fn(&BlobId) -> Option<(ObjectId, PackEntry)> + Sync),
    report: &mut CheckReport,
) -> Result<(HashSet<BlobId>, bool)> {
    let mut snap_ids = list_ids(&**repo.backend(), names::SNAPSHOTS)?;
    if let Some(only) = only {
        snap_ids.retain(|id| only.contains(id));
    }
    report.snapshots = snap_ids.len();
    let (snapshots, verdicts) = crate::util::with_request_threads(|| {
        let snapshots: Vec<(ObjectId, Result<Snapshot>)> =
            snap_ids.par_iter().map(|id| (*id, repo.load_snapshot(id))).collect();
        let mut distinct: Vec<SegmentUse> = snapshots
            .iter()
            .filter_map(|(_, s)| s.as_ref().ok())
            .flat_map(|s| s.disks.iter().flat_map(segment_uses))
            .collect();
        distinct.sort_unstable();
        distinct.dedup();
        let verdicts: HashMap<SegmentUse, (SegmentVerdict, Vec<BlobId>)> =
            distinct.par_iter().map(|u| (*u, judge_segment(repo, known, damaged, intact, u))).collect();
        (snapshots, verdicts)
    })?;

    let referenced: HashSet<BlobId> = verdicts.values().flat_map(|(_, named)| named.iter().copied()).collect();
    let mut every_segment_read = true;
    for (sid, snap) in snapshots {
        let snap = match snap {
            Ok(s) => s,
            // Forgotten or retagged since the listing.
            Err(Error::Missing { .. }) => continue,
            Err(e) => {
                if matches!(e, Error::Corrupt { .. }) {
                    report.damaged_snapshots.push(sid);
                }
                report.errors.push(e.to_string());
                every_segment_read = false;
                continue;
            }
        };
        for disk in &snap.disks {
            let mut affected = BlockRuns::default();
            let bs = disk.block_size as u64;
            let where_ = |block: u64| {
                format!(
                    "snapshot {} ({}), disk {}, block {block} (offset {})",
                    sid.short(),
                    snap.source,
                    disk.name,
                    block * bs
                )
            };
            for (k, (seg, used)) in disk.segments.iter().zip(segment_uses(disk)).enumerate() {
                let first = k as u64 * SEGMENT_BLOCKS as u64;
                let end = first + seg.blocks as u64;
                match &verdicts[&used].0 {
                    SegmentVerdict::Lost(why) => {
                        affected.push(first..end, "manifest segment lost");
                        report.errors.push(format!(
                            "{}: manifest segment {} is {why}: blocks {first}..{end} are unreadable",
                            where_(first),
                            seg.id.short(),
                        ));
                    }
                    SegmentVerdict::WrongShape => {
                        affected.push(first..end, "manifest segment damaged");
                        report.errors.push(format!(
                            "{}: manifest segment {} has the wrong size or type",
                            where_(first),
                            seg.id.short()
                        ));
                    }
                    SegmentVerdict::Unreadable(e) => {
                        affected.push(first..end, "manifest segment damaged");
                        report.errors.push(format!("{}: {e}", where_(first)));
                    }
                    SegmentVerdict::Read(bad) => {
                        if let Some((run, why)) = bad.runs().first() {
                            for (r, why) in bad.runs() {
                                affected.push(first + r.start..first + r.end, why);
                            }
                            report.errors.push(format!(
                                "{}: {} block(s) in blocks {first}..{end} are unreadable (first: {why})",
                                where_(first + run.start),
                                bad.count(),
                            ));
                        }
                        continue;
                    }
                }
                every_segment_read = false;
            }
            if !affected.is_empty() {
                report.affected.push(AffectedDisk { snapshot: sid, disk: disk.name.clone(), blocks: affected });
            }
        }
    }
    // What other snapshots reference is unknown: no lost blob may be forgotten.
    Ok((referenced, every_segment_read && only.is_none()))
}

/// The packs a restore of `snapshots` reads, by check's index (see [`needed`]).
fn packs_needed(
    repo: &Repository,
    index: &index::Index,
    damage: &KnownDamage,
    snapshots: &[ObjectId],
) -> Result<HashSet<ObjectId>> {
    let loaded = crate::util::with_request_threads(|| {
        snapshots.par_iter().filter_map(|id| repo.load_snapshot(id).ok()).collect::<Vec<Snapshot>>()
    })?;
    let loaded: Vec<&Snapshot> = loaded.iter().collect();
    Ok(needed::packs_needed(repo, &needed::IndexCopies { index, damage }, &loaded)?.0)
}

/// A manifest segment as a disk uses it: its id and block count, and the length of its blocks (every block but
/// a disk's last is `block_len` bytes). Segments are judged once per use: a block's blob must have its length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) struct SegmentUse {
    id: BlobId,
    blocks: u32,
    block_len: u32,
    last_len: u32,
}

impl SegmentUse {
    fn segment(&self) -> crate::format::snapshot::SegmentRef {
        crate::format::snapshot::SegmentRef { id: self.id, blocks: self.blocks }
    }

    /// The length of block `j` of the segment.
    fn block_len(&self, j: usize) -> u32 {
        if j as u32 + 1 == self.blocks {
            self.last_len
        } else {
            self.block_len
        }
    }
}

/// How `disk` uses each of its segments, in order.
pub(super) fn segment_uses(disk: &DiskManifest) -> impl Iterator<Item = SegmentUse> + '_ {
    let bs = disk.block_size as u64;
    disk.segments.iter().enumerate().map(move |(k, seg)| {
        let last = (k * SEGMENT_BLOCKS) as u64 + (seg.blocks as u64).saturating_sub(1);
        let last_len = disk.capacity.saturating_sub(last * bs).min(bs) as u32;
        SegmentUse { id: seg.id, blocks: seg.blocks, block_len: disk.block_size, last_len }
    })
}

/// Judges one manifest segment for [`check_snapshots`]; also returns the ids `known` names among it and its
/// blocks.
fn judge_segment(
    repo: &Repository,
    known: &KnownDamage,
    damaged: &(dyn Fn(&BlobId) -> Option<&'static str> + Sync),
    intact: &(dyn Fn(&BlobId) -> Option<(ObjectId, PackEntry)> + Sync),
    seg: &SegmentUse,
) -> (SegmentVerdict, Vec<BlobId>) {
    let mut named: Vec<BlobId> = known.names(&seg.id).then_some(seg.id).into_iter().collect();
    if let Some(why) = damaged(&seg.id) {
        return (SegmentVerdict::Lost(why), named);
    }
    let (pack, entry) = intact(&seg.id).expect("damaged() found an intact copy");
    let plain = match repo.read_blob(&BlobLocation { pack, entry }, &crate::repository::NoDeltas) {
        Ok(p) if entry.blob_type == BlobType::Segment && p.len() == seg.blocks as usize * 32 => p,
        Ok(_) => return (SegmentVerdict::WrongShape, named),
        Err(e) => return (SegmentVerdict::Unreadable(e.to_string()), named),
    };
    let mut bad = BlockRuns::default();
    for (j, id) in segment_ids(&plain).into_iter().enumerate() {
        if id.is_zero_block() {
            continue;
        }
        if known.names(&id) {
            named.push(id);
        }
        let len = seg.block_len(j);
        if let Some(why) = damaged(&id) {
            bad.push(j as u64..j as u64 + 1, why);
        } else if intact(&id).is_some_and(|(_, e)| e.raw_len != len) {
            // Restores and `serve` refuse it (a writer's bug, or a forged manifest): none cuts or pads a block.
            bad.push(j as u64..j as u64 + 1, "its blob is not the block's length");
        }
    }
    (SegmentVerdict::Read(bad), named)
}

/// Records the packs verified intact now; merges the records once there are too many.
fn record_verification(
    repo: &Repository,
    selected: &[(ObjectId, u64)],
    failed: &HashSet<ObjectId>,
    previous_records: &[ObjectId],
    mut last_verified: HashMap<ObjectId, i64>,
    gone: &dyn Fn(&ObjectId) -> bool,
) -> Result<()> {
    let now = crate::util::now_secs();
    let verified: Vec<(ObjectId, i64)> =
        selected.iter().filter(|(id, _)| !failed.contains(id)).map(|(id, _)| (*id, now)).collect();
    if previous_records.len() < MAX_VERIFICATION_RECORDS {
        repo.save_verification(&VerificationRecord { entries: verified })?;
        return Ok(());
    }
    // Merge: one record with everything but packs no longer stored, written before the records it replaces are
    // deleted.
    last_verified.extend(verified);
    last_verified.retain(|id, _| !gone(id));
    let mut entries: Vec<(ObjectId, i64)> = last_verified.into_iter().collect();
    entries.sort();
    let merged = repo.save_verification(&VerificationRecord { entries })?;
    for id in previous_records.iter().filter(|id| **id != merged) {
        repo.backend().delete(&names::verified(id))?;
    }
    Ok(())
}

/// What the readers of the data pass found: problems, delta blobs left for [`check_deltas`], packs read.
#[derive(Default)]
struct DataPass {
    problems: Vec<Problem>,
    deltas: Vec<(ObjectId, PackEntry)>,
    read: Vec<(ObjectId, u64)>,
}

struct Problem {
    pack: ObjectId,
    damage: Damage,
    message: String,
}

enum Damage {
    /// The whole pack is unusable (missing, or its blobs cannot be located).
    Pack,
    /// The pack could not be read now (the storage failed): unusable for this check, but not known damaged.
    Unreachable,
    /// One blob is unreadable.
    Blob(BlobId),
    /// Worth reporting, but the per-blob checks that follow say what is unreadable.
    Noted,
}

/// What an error reading a whole pack says of it: lost or damaged, or only not reachable now.
fn damage_of(e: &Error) -> Damage {
    match e {
        Error::Missing { .. } | Error::Corrupt { .. } => Damage::Pack,
        _ => Damage::Unreachable,
    }
}

/// The blob copies known to be damaged or lost after this check (format-spec §8d): those `found` now, and those
/// of the `previous` records in packs not `judged` now (a pack read again is judged by this read alone). A copy
/// its pack no longer lists (`repair packs` took the pack out) stays only while no intact copy of the blob is
/// indexed: until a backup stores it again, it tells backups that the block is lost.
fn known_damage<I: Iterator<Item = (ObjectId, PackEntry)>>(
    previous: &KnownDamage,
    found: Vec<(ObjectId, BlobId)>,
    judged: &HashSet<ObjectId>,
    index: &index::Index,
    copies: &dyn Fn(&BlobId) -> I,
) -> KnownDamage {
    let mut candidates: Vec<(ObjectId, BlobId)> =
        previous.sorted().into_iter().filter(|(pack, _)| !judged.contains(pack)).collect();
    candidates.extend(found);
    let all = KnownDamage::new(candidates.iter().copied());
    KnownDamage::new(
        candidates
            .into_iter()
            .filter(|(pack, blob)| index.lists(pack, blob) || copies(blob).all(|(q, _)| all.at(&q, blob))),
    )
}

/// Downloads one pack and verifies every byte of it but its delta blobs. Returns the problems found, and the
/// delta blobs for [`check_deltas`].
fn check_pack_data(
    repo: &Repository,
    id: &ObjectId,
    size: u64,
    indexed: Option<&IndexedPack>,
    locator: &dyn BlobLocator,
    pending: &PendingDeltas,
) -> (Vec<Problem>, Vec<PackEntry>) {
    let name = names::pack(id);
    // Each checker thread reads its packs into one buffer (see `Backend::get_range_placed`).
    thread_local! {
        static PACK: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    PACK.with_borrow_mut(|bytes| match repo.backend().get_range_placed(&name, 0, size, bytes) {
        Ok(range) => check_pack_bytes(repo, id, &name, indexed, &mut bytes[range], locator, pending),
        Err(e) => (vec![Problem { pack: *id, damage: damage_of(&e), message: e.to_string() }], Vec::new()),
    })
}

/// Verifies the bytes of pack `id` (stored as `name`), but for its delta blobs, which are returned for
/// [`check_deltas`] (a blob listed twice in the pack is checked here the second time).
fn check_pack_bytes(
    repo: &Repository,
    id: &ObjectId,
    name: &str,
    indexed: Option<&IndexedPack>,
    bytes: &mut [u8],
    locator: &dyn BlobLocator,
    pending: &PendingDeltas,
) -> (Vec<Problem>, Vec<PackEntry>) {
    let whole = |message: String| Problem { pack: *id, damage: Damage::Pack, message };
    let mut problems = Vec::new();
    if BlobId::of_file(bytes) != *id {
        // Keep going: the blob-level check below says which blobs are damaged.
        problems.push(Problem {
            pack: *id,
            damage: Damage::Noted,
            message: format!("{name}: content does not match its name"),
        });
    }
    let entries = match pack::read_header(repo.keys(), bytes) {
        Ok(h) => {
            if indexed.is_some_and(|p| p.entries != h.entries || p.pack_type != h.pack_type) {
                problems.push(Problem {
                    pack: *id,
                    damage: Damage::Pack,
                    message: format!("{name}: pack header does not match the index"),
                });
            }
            h.entries
        }
        // The header is unreadable, but the index still says where the blobs are.
        Err(e) => match indexed {
            Some(p) => {
                problems.push(Problem { pack: *id, damage: Damage::Noted, message: format!("{name}: {e}") });
                p.entries.clone()
            }
            None => return (vec![whole(format!("{name}: {e}"))], Vec::new()),
        },
    };
    // Blobs are decrypted where they lie (no copy), into one reused buffer. That needs entries that do not
    // overlap, which a readable header guarantees; entries taken from the index (the header was unreadable)
    // may not, and are opened from copies.
    let disjoint = entries.windows(2).all(|w| w[0].end() <= w[1].offset as u64);
    let mut plain = crate::util::AlignedBuf::default();
    let mut delta_plain = crate::util::AlignedBuf::default();
    let mut deltas: Vec<PackEntry> = Vec::new();
    let mut deferred: HashSet<BlobId> = HashSet::new();
    for e in &entries {
        let in_pack = e.end() <= bytes.len() as u64;
        if e.base.is_some() && in_pack && deferred.insert(e.id) {
            let stored = &bytes[e.offset as usize..e.end() as usize];
            if !pending.hold(*id, *e, stored) {
                deltas.push(*e);
            }
            continue;
        }
        // A delta blob is decoded with its base, read from wherever it is stored.
        let base = match repo.read_base(e, locator) {
            Ok(b) => b,
            Err(err) => {
                problems.push(Problem {
                    pack: *id,
                    damage: Damage::Blob(e.id),
                    message: format!("{name}: blob {} at offset {}: its delta base: {err}", e.id, e.offset),
                });
                continue;
            }
        };
        let cause = match bytes.get_mut(e.offset as usize..e.end() as usize) {
            None => Some("beyond the end of the pack".to_string()),
            Some(stored) if disjoint => {
                pack::open_blob_in_place(repo.keys(), e, stored, &mut plain, base.as_deref()).err()
            }
            Some(stored) => match pack::open_blob(repo.keys(), e, stored, base.as_deref()) {
                Ok(p) => {
                    plain.clear(p.len());
                    plain.extend_from_slice(&p);
                    None
                }
                Err(c) => Some(c),
            },
        };
        match cause {
            Some(c) => problems.push(blob_problem(id, e, &c)),
            // Deltas held for this blob are opened now, while its plaintext is at hand.
            None if e.can_be_base() => {
                for mut d in pending.take(&e.id) {
                    if let Err(c) =
                        pack::open_blob_in_place(repo.keys(), &d.entry, &mut d.stored, &mut delta_plain, Some(&plain))
                    {
                        problems.push(blob_problem(&d.pack, &d.entry, &c));
                    }
                }
            }
            None => {}
        }
    }
    (problems, deltas)
}

/// Blob `e` of pack `pack` did not open, because of `cause`.
fn blob_problem(pack: &ObjectId, e: &PackEntry, cause: &str) -> Problem {
    Problem {
        pack: *pack,
        damage: Damage::Blob(e.id),
        message: format!("{}: {} blob {} at offset {}: {cause}", names::pack(pack), e.blob_type.name(), e.id, e.offset),
    }
}

/// Delta blobs met in the data pass, held for their base: when a reader opens that base later in the pass, it
/// opens them too, with the base's plaintext at hand ([`check_pack_bytes`]). The packs that hold deltas are read
/// first, so that most bases come after their deltas. A delta whose base was opened before it was met (or is in
/// a pack not selected, or is damaged), or that found no room, is read again with its base after the pass
/// ([`check_deltas`]). Measured on the benchmark's repository: that phase took 0.2 s of a 1.2 s check, reading
/// and decompressing each base a second time.
#[derive(Default)]
struct PendingDeltas {
    state: std::sync::Mutex<PendingState>,
}

#[derive(Default)]
struct PendingState {
    by_base: HashMap<BlobId, Vec<PendingDelta>>,
    bytes: usize,
    opened: usize,
}

struct PendingDelta {
    pack: ObjectId,
    entry: PackEntry,
    /// As stored in the pack (sealed).
    stored: Vec<u8>,
}

/// Bytes of delta blobs held for their bases at most (deltas are small: 34 KiB on average in the benchmark).
const PENDING_DELTA_BYTES: usize = 64 << 20;

impl PendingDeltas {
    fn lock(&self) -> std::sync::MutexGuard<'_, PendingState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Holds delta blob `entry` of `pack`, stored as `stored`, for its base. False if there is no room.
    fn hold(&self, pack: ObjectId, entry: PackEntry, stored: &[u8]) -> bool {
        let Some(base) = entry.base else { return false };
        let mut st = self.lock();
        if st.bytes + stored.len() > PENDING_DELTA_BYTES {
            return false;
        }
        st.bytes += stored.len();
        st.by_base.entry(base).or_default().push(PendingDelta { pack, entry, stored: stored.to_vec() });
        true
    }

    /// The deltas held for `base`, which is being opened.
    fn take(&self, base: &BlobId) -> Vec<PendingDelta> {
        let mut st = self.lock();
        let Some(taken) = st.by_base.remove(base) else { return Vec::new() };
        st.bytes -= taken.iter().map(|d| d.stored.len()).sum::<usize>();
        st.opened += taken.len();
        taken
    }

    /// The deltas whose base no reader opened, and how many were opened with their base.
    fn finish(&self) -> (Vec<(ObjectId, PackEntry)>, usize) {
        let mut st = self.lock();
        let left = std::mem::take(&mut st.by_base).into_values().flatten().map(|d| (d.pack, d.entry)).collect();
        st.bytes = 0;
        (left, st.opened)
    }
}

/// Opens the delta blobs the data pass did not (see [`PendingDeltas`]), after it: their bases are read ahead in
/// batches with coalesced ranged reads in parallel, as restore does them (a read per base cost a round trip per
/// delta on remote storage, one delta after another within a pack). The deltas are read again with ranged reads:
/// they are small, and their packs' bytes were verified whole by [`check_pack_bytes`].
fn check_deltas(
    repo: &Repository,
    locator: &dyn BlobLocator,
    deltas: Vec<(ObjectId, PackEntry)>,
) -> Result<Vec<Problem>> {
    let mut wants: WantsByPack = HashMap::new();
    for (pack, entry) in deltas {
        wants.entry(pack).or_default().insert(entry.id, Want { entry, blocks: Vec::new() });
    }
    // A base the index does not list is left to the delta's own read, which reports it.
    let (_, batches) = split_deltas(wants, locator)?;
    let bases = Bases::new(locator);
    let mut problems = Vec::new();
    for (base_wants, delta_wants) in batches {
        if crate::util::interrupted() {
            break;
        }
        preload_bases(repo, &bases, base_wants);
        let found: Vec<Problem> =
            plan_reads(delta_wants).par_iter().flat_map_iter(|job| check_delta_read(repo, &bases, job)).collect();
        problems.extend(found);
        bases.end_batch();
    }
    Ok(problems)
}

/// Reads one coalesced range of delta blobs and opens each with its base. Returns the problems found.
fn check_delta_read(repo: &Repository, bases: &Bases, job: &ReadJob) -> Vec<Problem> {
    let name = names::pack(&job.pack);
    let damaged = |w: &Want, cause: &str| Problem {
        pack: job.pack,
        damage: Damage::Blob(w.entry.id),
        message: format!("{name}: {} {cause}", w.entry.blob_type.name()),
    };
    let mut problems = Vec::new();
    let fetched = with_range_buffer(|data| {
        fetch_blobs(repo, bases, job, data, None, |w, plain| match plain {
            // The storage failed to return its base: reported, but the delta is not known damaged.
            Err(f) if f.damaged.is_empty() => {
                problems.push(Problem { damage: Damage::Noted, ..damaged(w, &f.cause) });
            }
            Err(f) => problems.push(damaged(w, &f.cause)),
            Ok(_) => {}
        })
    });
    if let Err(e) = fetched {
        for w in &job.wants {
            problems.push(damaged(w, &format!("blob {} at offset {}: {e}", w.entry.id, w.entry.offset)));
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::pack::{BlobSealer, FinishedPack, PackWriter, SealedBlob};
    use crate::repository::test_repository;

    fn pack_of(repo: &Repository, blob: SealedBlob) -> FinishedPack {
        let mut w = PackWriter::new(BlobType::Data, 2 << 20);
        w.add(blob);
        w.finish(repo.keys())
    }

    /// Checks `pack`'s bytes as the data pass does; returns (problems, deltas left for after the pass).
    fn check(repo: &Repository, pack: &FinishedPack, pending: &PendingDeltas) -> (Vec<Problem>, Vec<PackEntry>) {
        let locator = crate::repository::NoDeltas;
        let mut bytes = pack.bytes.clone();
        check_pack_bytes(repo, &pack.id, &names::pack(&pack.id), None, &mut bytes, &locator, pending)
    }

    #[test]
    fn block_runs_merge_consecutive_blocks_of_one_reason() {
        let mut runs = BlockRuns::default();
        for b in [3, 4, 5] {
            runs.push(b..b + 1, "lost");
        }
        runs.push(6..8, "damaged");
        runs.push(10..11, "damaged");
        assert_eq!(runs.runs(), [(3..6, "lost"), (6..8, "damaged"), (10..11, "damaged")]);
        assert_eq!(runs.count(), 6);
        assert!(!runs.contains(2) && runs.contains(3) && runs.contains(7) && !runs.contains(8) && runs.contains(10));
        assert!(runs.overlaps(0..4) && !runs.overlaps(8..10) && runs.overlaps(9..20) && !runs.overlaps(11..20));
        // The last block is short: the disk ends at 10.5 blocks.
        assert_eq!(runs.byte_ranges(100, 1050), [(300, 800), (1000, 1050)]);
    }

    #[test]
    fn a_delta_met_before_its_base_is_opened_with_it_in_the_data_pass() {
        let dir = tempfile::tempdir().unwrap();
        let repo = test_repository(dir.path());
        let keys = repo.keys();
        let mut base = vec![0u8; 1 << 20];
        blake3::Hasher::new().update(b"base").finalize_xof().fill(&mut base);
        let mut changed = base.clone();
        changed[4096..8192].fill(7);
        let (base_id, changed_id) = (keys.blob_id(&base), keys.blob_id(&changed));
        let mut sealer = BlobSealer::new(3);
        let delta = sealer.seal_delta(keys, changed_id, &changed, base_id, &base).expect("a delta pays");
        let delta_pack = pack_of(&repo, delta);
        let base_pack = pack_of(&repo, sealer.seal(keys, BlobType::Data, base_id, &base));

        // The delta's pack first: the delta is held, then opened with its base.
        let pending = PendingDeltas::default();
        let (p, left) = check(&repo, &delta_pack, &pending);
        assert!(p.is_empty() && left.is_empty());
        let (p, left) = check(&repo, &base_pack, &pending);
        assert!(p.is_empty() && left.is_empty());
        let (left, opened) = pending.finish();
        assert!(left.is_empty());
        assert_eq!(opened, 1);

        // A damaged delta is named, and its pack, when its base is opened.
        let pending = PendingDeltas::default();
        let mut damaged =
            FinishedPack { id: delta_pack.id, bytes: delta_pack.bytes.clone(), header: delta_pack.header.clone() };
        let at = damaged.header.entries[0].offset as usize + 10;
        damaged.bytes[at] ^= 1;
        let (p, _) = check(&repo, &damaged, &pending);
        assert!(p.iter().all(|p| matches!(p.damage, Damage::Noted)), "only the pack's hash so far");
        let (p, _) = check(&repo, &base_pack, &pending);
        assert_eq!(p.len(), 1);
        assert!(matches!(p[0].damage, Damage::Blob(id) if id == changed_id) && p[0].pack == delta_pack.id);
        let offset = damaged.header.entries[0].offset;
        assert!(p[0].message.contains(&format!("data blob {changed_id} at offset {offset}")), "{}", p[0].message);

        // The base opened first: the delta waits for the pass's end, to be read again with its base.
        let pending = PendingDeltas::default();
        check(&repo, &base_pack, &pending);
        let (_, left) = check(&repo, &delta_pack, &pending);
        assert!(left.is_empty());
        let (left, opened) = pending.finish();
        assert_eq!(opened, 0);
        assert_eq!(left, vec![(delta_pack.id, delta_pack.header.entries[0])]);
    }
}
