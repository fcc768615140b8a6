//! Backup of a VMware VM: snapshot → record the configuration and each disk's changeId → per disk a full read
//! of the allocated blocks or an incremental from `QueryChangedDiskAreas` against the changeId stored in the
//! parent backup → read through the VDDK into the engine → remove the snapshot, also when anything failed.
//!
//! A disk is read in full, and the report says why, when there is no earlier backup of it, tracking is off,
//! the changeId's UUID changed (tracking was reset), the disk was resized, or the parent has no changeId.
//!
//! Restores go the other way through the VDDK: onto an existing, powered-off VM's disks ([`restore_to_vm`]:
//! only the blocks that differ, or with CBT only those changed since the backup), or into a new VM made from
//! the recorded configuration ([`restore_as_new_vm`], where [`NewVmPlacement`] says), which [`check_boot`] can
//! start to see that the restored system runs.

use std::path::PathBuf;
use std::sync::Arc;

use crate::backup::{self, BackupOptions, DiskJob, ResumeBase};
use crate::cache::IndexCache;
use crate::error::{Error, Result};
use crate::format::checkpoint::Checkpoint;
use crate::format::snapshot::{DiskManifest, Snapshot};
use crate::format::ObjectId;
use crate::progress::Counters;
use crate::repository::Repository;
use crate::source::vddk::VddkSource;
use crate::source::{DiskSource, Extent};
use crate::vddk::{Credentials, Disk, DiskTarget, Library};
use crate::vsphere::{Client, MoRef, VirtualDiskInfo};

pub struct VmBackupOptions {
    /// The VDDK's directory.
    pub libdir: PathBuf,
    /// Ask VMware Tools to quiesce the guest's file systems for the snapshot.
    pub quiesce: bool,
    /// VDDK transport modes to allow (`nbdssl`, `hotadd:nbdssl`…); `None` lets the library choose.
    pub transports: Option<String>,
    /// The user name the API session belongs to (the VDDK reuses the session).
    pub user: String,
    /// Fraction (0.0-1.0) of the blocks CBT calls unchanged to re-read and compare with the parent (0: trust CBT).
    pub verify_cbt_fraction: f64,
    /// Save a checkpoint this often while reading, so that an interrupted backup can be resumed.
    pub checkpoint_interval: std::time::Duration,
    /// Continue an interrupted backup of the VM from its checkpoint (re-reading only what changed since).
    pub resume: bool,
    /// Disks not to back up: names (`disk2`, the file name without `.vmdk`) or labels (`Hard disk 2`).
    pub exclude_disks: Vec<String>,
}

/// A disk of the VM the backup left out, and why.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct SkippedDisk {
    pub name: String,
    pub label: String,
    pub reason: String,
}

/// Whether a backup leaves `disk` out, and why: excluded, or not in VM snapshots.
fn left_out(disk: &VirtualDiskInfo, opts: &VmBackupOptions) -> Option<SkippedDisk> {
    let name = disk_name(&disk.file_name);
    let excluded = opts.exclude_disks.iter().any(|x| *x == name || *x == disk.label);
    let reason = if excluded { Some("excluded (--exclude-disk)") } else { disk.not_in_snapshots() }?;
    Some(SkippedDisk { name, label: disk.label.clone(), reason: reason.into() })
}

/// The annotation of a VMware snapshot that lists the disks it left out (JSON of [`SkippedDisk`]s).
pub const SKIPPED_DISKS: &str = "vmware.skipped_disks";

/// How one disk was read, and why.
#[derive(Clone, Debug, serde::Serialize)]
pub struct DiskReport {
    pub name: String,
    pub key: i32,
    /// `full`, `incremental`, or `resumed` (an interrupted backup continued from its checkpoint).
    pub mode: String,
    /// Why a full read happened although a parent exists (or `None`); for a resumed disk, why the part the
    /// interrupted backup had not reached is read in full.
    pub reason: Option<String>,
    /// For a resumed disk: the checkpoint continued from, and how much of the disk it covered.
    pub resumed_from: Option<String>,
    pub change_id: String,
    pub transport: String,
}

pub struct VmBackup {
    pub id: ObjectId,
    pub snapshot: Snapshot,
    pub disks: Vec<DiskReport>,
    /// Disks left out: excluded, or not in VM snapshots (independent disks, physical-mode RDMs).
    pub skipped_disks: Vec<SkippedDisk>,
    /// VM snapshots of earlier backups that died, removed first (their names).
    pub removed_vm_snapshots: Vec<String>,
}

/// The disk's name in the snapshot: its file's stem (`disk1` for `[ds] vm/disk1.vmdk`), stable across backups.
pub fn disk_name(file_name: &str) -> String {
    let file = file_name.rsplit(['/', ']', ' ']).next().unwrap_or(file_name);
    file.strip_suffix(".vmdk").unwrap_or(file).to_string()
}

/// Backs up VM `vm` (name or moref) as one snapshot of source `<VM name>`.
pub fn backup_vm(
    client: &mut Client,
    repo: &Repository,
    cache: Arc<IndexCache>,
    vm: &str,
    opts: &VmBackupOptions,
    mut backup_opts: BackupOptions,
    counters: &Counters,
) -> Result<VmBackup> {
    let info = client.find_vm(vm)?;
    // Nothing to back up: say so before a VM snapshot is taken.
    let left_out: Vec<SkippedDisk> = info.disks.iter().filter_map(|d| left_out(d, opts)).collect();
    if left_out.len() == info.disks.len() {
        let why: Vec<String> = left_out.iter().map(|d| format!("{}: {}", d.name, d.reason)).collect();
        return Err(Error::invalid(format!("VM {}: no disk to back up ({})", info.name, why.join("; "))));
    }
    // The library first: a missing or broken VDDK must fail before the VM is touched.
    let lib = Library::load(&opts.libdir)?;
    // A session marker for as long as the VM snapshot exists; the snapshot names it, so that if this process dies
    // with the snapshot in place, a later backup sees the marker gone and removes the snapshot.
    let session = crate::lock::start_session(repo, "backup")?;
    let removed_vm_snapshots = remove_abandoned_snapshots(client, repo, &info, &lib, &opts.user);
    let label = format!("diskvault {}", crate::util::format_utc(crate::util::now_secs()));
    let snap =
        client.create_snapshot(&info.moref, &label, &snapshot_description(repo, session.name()), opts.quiesce)?;
    tracing::info!("{}: snapshot {} created", info.name, snap.value);
    backup_opts.source = info.name.clone();
    let result = backup_snapshot(client, repo, cache, &info.moref, &snap, lib, opts, backup_opts, counters);
    // Always, whatever happened above.
    let removed = client.remove_snapshot(&snap);
    drop(session);
    let result = result.map(|b| VmBackup { removed_vm_snapshots, ..b });
    match (result, removed) {
        (Ok(b), Ok(())) => Ok(b),
        (Ok(b), Err(e)) => Err(Error::VSphere {
            call: "RemoveSnapshot_Task".into(),
            cause: format!(
                "the backup was saved as snapshot {}, but VM snapshot {} of {} could not be removed: {e}; remove it \
                 in vSphere",
                b.id.short(),
                snap.value,
                info.name
            ),
        }),
        (Err(e), Ok(())) => Err(e),
        (Err(e), Err(e2)) => {
            tracing::error!(
                "VM snapshot {} of {} could not be removed: {e2}; remove it in vSphere",
                snap.value,
                info.name
            );
            Err(e)
        }
    }
}

/// The description of the VM snapshots a backup makes: whose they are (this repository, this session marker).
fn snapshot_description(repo: &Repository, session: &str) -> String {
    format!("{SNAPSHOT_OWNER}{} {session}", hex::encode(&repo.config().id[..8]))
}

const SNAPSHOT_OWNER: &str = "diskvault backup into repository ";

/// Removes the VM snapshots that backups into this repository made and could not remove (the process was
/// killed, the proxy lost power): their session marker has ended (§9a: deleted, or abandoned by the storage's
/// clock). Left alone, such a snapshot grows its delta disk until the datastore fills. Snapshots of backups
/// still running (from any proxy) and of other repositories are left alone; failures are only reported.
fn remove_abandoned_snapshots(
    client: &mut Client,
    repo: &Repository,
    info: &crate::vsphere::VmInfo,
    lib: &Arc<Library>,
    user: &str,
) -> Vec<String> {
    let prefix = snapshot_description(repo, "");
    let ours: Vec<_> = info
        .snapshot_tree
        .iter()
        .filter_map(|s| s.description.strip_prefix(&prefix).map(|session| (s, session)))
        .collect();
    let mut removed = Vec::new();
    if ours.is_empty() {
        return removed;
    }
    let live: Vec<String> = match crate::lock::live_sessions(repo) {
        Ok(l) => l.into_iter().map(|s| s.name).collect(),
        Err(e) => {
            tracing::warn!("VM {}: not looking for abandoned snapshots: {e}", info.name);
            return removed;
        }
    };
    for (s, session) in ours {
        if live.iter().any(|l| l == session) {
            continue;
        }
        tracing::warn!(
            "VM {}: removing snapshot {:?} ({}) left by a backup that did not finish ({session} has ended)",
            info.name,
            s.name,
            s.moref
        );
        match client.remove_snapshot(&MoRef::new("VirtualMachineSnapshot", &s.moref)) {
            Ok(()) => removed.push(s.name.clone()),
            Err(e) => {
                tracing::error!(
                    "VM {}: snapshot {} could not be removed: {e}; remove it in vSphere",
                    info.name,
                    s.moref
                )
            }
        }
        // The dead backup also kept the VM from being relocated: one PrepareForAccess per disk it opened.
        for disk in &info.disks {
            let ended = vm_disk_target(client, &info.moref, &disk.file_name, user)
                .and_then(|target| crate::vddk::end_abandoned_access(lib, &target));
            if let Err(e) = ended {
                tracing::error!("VM {}: relocation may stay disabled (re-enable it in vSphere): {e}", info.name);
            }
        }
    }
    removed
}

#[allow(clippy::too_many_arguments)]
fn backup_snapshot(
    client: &mut Client,
    repo: &Repository,
    cache: Arc<IndexCache>,
    moref: &str,
    snap: &MoRef,
    lib: Arc<Library>,
    opts: &VmBackupOptions,
    mut backup_opts: BackupOptions,
    counters: &Counters,
) -> Result<VmBackup> {
    let mut config = client.snapshot_config(snap)?;
    config.name = backup_opts.source.clone();
    (config.folder, config.resource_pool) = client.placement(moref)?;
    let parent = repo.latest_snapshot_of(&backup_opts.source)?;
    // Checkpoints of interrupted backups of this VM: the newest continues if it was made on the same parent.
    let checkpoints = repo.list_checkpoints(Some(&backup_opts.source))?;
    let resume_from = checkpoints
        .iter()
        .rev()
        .find(|(_, c)| c.continues_from(parent.as_ref().map(|(id, s)| (id, s))))
        .filter(|_| opts.resume);
    let (server, _) = client.server_host();
    let thumbprint = client.server_sha1_thumbprint();
    let cookie = client
        .session_cookie()
        .ok_or_else(|| Error::VSphere { call: "Login".into(), cause: "no session cookie to hand to the VDDK".into() })?
        .to_string();
    let mut jobs = Vec::new();
    let mut reports = Vec::new();
    let mut skipped = Vec::new();
    for disk in &config.disks {
        let name = disk_name(&disk.file_name);
        if let Some(skip) = left_out(disk, opts) {
            if disk.not_in_snapshots().is_some() {
                tracing::warn!("disk {name} ({}) is not backed up: {}", disk.label, skip.reason);
            }
            skipped.push(skip);
            continue;
        }
        let target = DiskTarget {
            server: server.clone(),
            port: None,
            thumbprint: thumbprint.clone(),
            credentials: Credentials::Session { cookie: cookie.clone(), user: opts.user.clone() },
            moref: moref.to_string(),
            snapshot: Some(snap.value.clone()),
            path: disk.file_name.clone(),
            transports: opts.transports.clone(),
        };
        let mut source = VddkSource::from_disk(Disk::open(lib.clone(), &target)?);
        let transport = source.transport().to_string();
        let parent_snapshot = parent.as_ref().map(|(_, s)| s);
        let resumed = match resume_from {
            Some((cid, c)) => resume_disk(client, moref, snap, disk, &name, (cid, c), parent_snapshot, &mut source)?,
            None => None,
        };
        // A resumed disk reads what changed since the checkpoint and what the interrupted backup had not reached.
        let (mut changed, mut reason, mut resume, mut resumed_from) = (None, None, None, None);
        let mut cbt_failed = None;
        if let Some(r) = resumed {
            tracing::info!("disk {name}: {}", r.description);
            match verify_cbt(
                repo,
                &cache,
                &mut |o, b| source.read_at(o, b),
                &r.base.manifest,
                &r.changed,
                opts.verify_cbt_fraction,
            )?
            .1
            {
                // CBT is not to be trusted for this disk at all: read it whole, as an incremental would.
                Some(mismatch) => {
                    tracing::error!("disk {name}: {mismatch}; not continuing the interrupted backup, reading in full");
                    cbt_failed = Some(mismatch);
                }
                None => {
                    (changed, reason, resume, resumed_from) =
                        (Some(r.changed), r.rest_reason, Some(r.base), Some(r.description))
                }
            }
        }
        if resume.is_none() {
            (changed, reason) = match cbt_failed.or_else(|| full_read_reason(disk, parent_snapshot, &name)) {
                Some(reason) => (None, Some(reason)),
                None => {
                    let parent_disk = parent_snapshot.and_then(|p| p.disk(&name)).expect("checked by full_read_reason");
                    let parent_token = parent_disk.change_token.as_deref().expect("checked by full_read_reason");
                    let areas =
                        client.query_changed_disk_areas(moref, Some(snap), disk.key, parent_token, disk.capacity)?;
                    match verify_cbt(
                        repo,
                        &cache,
                        &mut |o, b| source.read_at(o, b),
                        parent_disk,
                        &areas,
                        opts.verify_cbt_fraction,
                    )?
                    .1
                    {
                        None => (Some(areas), None),
                        Some(mismatch) => {
                            tracing::error!("disk {name}: {mismatch}; reading the whole disk");
                            (None, Some(mismatch))
                        }
                    }
                }
            };
            if let Some(r) = &reason {
                if parent.is_some() {
                    tracing::warn!("disk {name}: reading in full: {r}");
                }
            }
        }
        let mode = match (&resume, &changed) {
            (Some(_), _) => "resumed",
            (None, Some(_)) => "incremental",
            (None, None) => "full",
        };
        reports.push(DiskReport {
            name: name.clone(),
            key: disk.key,
            mode: mode.into(),
            reason,
            resumed_from,
            change_id: disk.change_id.clone(),
            transport,
        });
        jobs.push(DiskJob {
            name,
            source: Box::new(source),
            changed,
            change_token: (!disk.change_id.is_empty()).then(|| disk.change_id.clone()),
            resume,
        });
    }
    if jobs.is_empty() {
        return Err(Error::invalid("the VM snapshot has no disk to back up"));
    }
    backup_opts.parent = parent;
    backup_opts.annotations.insert("vmware.moref".into(), moref.to_string());
    if !skipped.is_empty() {
        backup_opts.annotations.insert(SKIPPED_DISKS.into(), serde_json::to_string(&skipped).expect("JSON"));
    }
    backup_opts
        .annotations
        .insert("vmware.config".into(), serde_json::to_string(&config).expect("JSON of plain values"));
    backup_opts.checkpoint_interval = Some(opts.checkpoint_interval);
    let (id, snapshot) = backup::run(repo, cache, jobs, &backup_opts, counters)?;
    // The snapshot holds everything the checkpoints were for.
    for (cid, _) in &checkpoints {
        repo.delete_checkpoint(cid);
    }
    Ok(VmBackup { id, snapshot, disks: reports, skipped_disks: skipped, removed_vm_snapshots: Vec::new() })
}

/// How a disk continues from a checkpoint.
struct ResumedDisk {
    /// What changed in the checkpointed part since it was read, and what the interrupted backup had yet to read.
    changed: Vec<Extent>,
    base: ResumeBase,
    /// Why the part not reached is read in full (as the interrupted backup would have), if it is.
    rest_reason: Option<String>,
    description: String,
}

/// Continues disk `name` from checkpoint `c` if that is sound: the checkpoint covers part of this disk, change
/// tracking has run without a reset since (same changeId UUID) and the disk has its size. CBT then says what
/// changed in the covered part since the checkpoint's VM snapshot; the rest is read as the interrupted backup
/// would have (changes since the parent's changeId, or the allocated blocks).
#[allow(clippy::too_many_arguments)]
fn resume_disk(
    client: &mut Client,
    moref: &str,
    snap: &MoRef,
    disk: &VirtualDiskInfo,
    name: &str,
    (cid, c): (&ObjectId, &Checkpoint),
    parent: Option<&Snapshot>,
    source: &mut VddkSource,
) -> Result<Option<ResumedDisk>> {
    use crate::source::DiskSource;
    let Some(cd) = c.disk(name).filter(|cd| !cd.segments.is_empty()) else { return Ok(None) };
    let Some(token) = cd.change_token.as_deref().filter(|t| !t.is_empty()) else { return Ok(None) };
    if disk.change_id.is_empty()
        || change_id_uuid(token) != change_id_uuid(&disk.change_id)
        || cd.capacity != disk.capacity
    {
        tracing::warn!(
            "disk {name}: not continuing checkpoint {}: change tracking was reset or the disk resized",
            cid.short()
        );
        return Ok(None);
    }
    let bs = cd.block_size as u64;
    let done = (cd.blocks_done() * bs).min(disk.capacity);
    let clip = |areas: &[Extent], from: u64, to: u64| -> Vec<Extent> {
        areas
            .iter()
            .filter_map(|e| {
                let (start, end) = (e.start.max(from), e.end().min(to));
                (start < end).then(|| Extent { start, length: end - start })
            })
            .collect()
    };
    // vSphere may no longer know the checkpoint's changeId (snapshot consolidation): then read as if it had
    // not been made.
    let since_checkpoint = match client.query_changed_disk_areas(moref, Some(snap), disk.key, token, disk.capacity) {
        Ok(areas) => areas,
        Err(e) => {
            tracing::warn!("disk {name}: not continuing checkpoint {}: {e}", cid.short());
            return Ok(None);
        }
    };
    let mut changed = clip(&since_checkpoint, 0, done);
    let mut segments = cd.segments.clone();
    let rest_reason = full_read_reason(disk, parent, name);
    match (rest_reason.is_none(), parent.and_then(|p| p.disk(name))) {
        (true, Some(pd)) => {
            let parent_token = pd.change_token.as_deref().expect("checked by full_read_reason");
            let since_parent =
                client.query_changed_disk_areas(moref, Some(snap), disk.key, parent_token, disk.capacity)?;
            changed.extend(clip(&since_parent, done, disk.capacity));
            segments.extend_from_slice(&pd.segments[cd.segments.len()..]);
        }
        _ => {
            let allocated = source.allocated()?.unwrap_or_else(|| vec![Extent { start: 0, length: disk.capacity }]);
            changed.extend(clip(&allocated, done, disk.capacity));
        }
    }
    let description = format!(
        "continuing the backup interrupted at {} (checkpoint {}): {} of {} read then, only what changed since \
         is read again",
        crate::util::format_utc(c.time_secs),
        cid.short(),
        crate::util::human_bytes(done),
        crate::util::human_bytes(disk.capacity)
    );
    let manifest = DiskManifest {
        name: name.to_string(),
        source_kind: source.kind().to_string(),
        source_path: source.describe(),
        capacity: disk.capacity,
        block_size: cd.block_size,
        change_token: cd.change_token.clone(),
        segments,
        stats: Default::default(),
    };
    let base = ResumeBase { manifest, checkpoint_segments: cd.segments.len() };
    Ok(Some(ResumedDisk { changed, base, rest_reason, description }))
}

/// The UUID part of a changeId (`<uuid>/<sequence>`): it changes when change tracking is reset.
fn change_id_uuid(change_id: &str) -> &str {
    change_id.split('/').next().unwrap_or("")
}

/// Why disk `name` must be read in full, or `None` if its changes since the parent can be asked for.
fn full_read_reason(disk: &VirtualDiskInfo, parent: Option<&Snapshot>, name: &str) -> Option<String> {
    let Some(parent) = parent else { return Some("no earlier backup of this VM".into()) };
    if disk.change_id.is_empty() {
        return Some("change tracking is off for this disk (vm enable-cbt)".into());
    }
    let Some(pd) = parent.disk(name) else { return Some("the disk is new since the last backup".into()) };
    let Some(token) = pd.change_token.as_deref().filter(|t| !t.is_empty()) else {
        return Some("the last backup recorded no changeId for this disk".into());
    };
    if change_id_uuid(token) != change_id_uuid(&disk.change_id) {
        return Some(format!("change tracking was reset (changeId {token} then, {} now)", disk.change_id));
    }
    if pd.capacity != disk.capacity {
        return Some(format!("the disk was resized ({} -> {} bytes)", pd.capacity, disk.capacity));
    }
    None
}

/// CBT distrust: re-reads (with `read`) a random `fraction` of the blocks the change list calls unchanged and
/// compares their ids with those of `parent`, the backup the changes are counted from. Returns what was wrong, if
/// anything (the caller then reads, or compares, the whole disk).
fn verify_cbt(
    repo: &Repository,
    cache: &IndexCache,
    read: &mut dyn FnMut(u64, &mut [u8]) -> Result<()>,
    parent: &crate::format::snapshot::DiskManifest,
    changed: &[crate::source::Extent],
    fraction: f64,
) -> Result<(u64, Option<String>)> {
    use crate::source::BlockRanges;
    if fraction <= 0.0 {
        return Ok((0, None));
    }
    let bs = parent.block_size as u64;
    // Only blocks the manifest lists (a resumed disk's base may end early: zeros where a full read continues).
    let blocks = parent.capacity.div_ceil(bs).min(parent.segments.iter().map(|s| s.blocks as u64).sum());
    let changed = BlockRanges::from_extents(changed, bs);
    let mut cursor = changed.cursor();
    let unchanged: Vec<u64> = (0..blocks).filter(|&b| !cursor.contains(b)).collect();
    if unchanged.is_empty() {
        return Ok((0, None));
    }
    let want = ((unchanged.len() as f64 * fraction).ceil() as usize).clamp(1, unchanged.len());
    // A random sample, in disk order (one segment load per segment touched).
    let mut sample: Vec<u64> = Vec::with_capacity(want);
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| Error::invalid(format!("no randomness: {e}")))?;
    let mut x = u64::from_le_bytes(seed) | 1;
    let mut pool = unchanged;
    for i in 0..want {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let j = i + (x % (pool.len() - i) as u64) as usize;
        pool.swap(i, j);
    }
    sample.extend_from_slice(&pool[..want]);
    sample.sort_unstable();
    let mut buf = vec![0u8; bs as usize];
    let mut segment: Option<(usize, Vec<crate::format::BlobId>)> = None;
    let mut wrong = Vec::new();
    let mut compared = 0;
    for &b in &sample {
        // A 1% sample of a 2 TB disk is 20 GB to read.
        if crate::util::interrupted() {
            return Err(Error::Interrupted);
        }
        let k = (b / crate::format::SEGMENT_BLOCKS as u64) as usize;
        if segment.as_ref().is_none_or(|(sk, _)| *sk != k) {
            let seg = parent.segments.get(k).ok_or_else(|| Error::corrupt("snapshot", format!("no segment {k}")))?;
            // The cache is brought up to date only once the backup's session starts: a segment another host
            // wrote may not be in it yet. The sample then leaves that segment out.
            let ids = match crate::backup::load_segment(repo, cache, seg) {
                Ok(ids) => ids,
                Err(Error::Missing { object }) => {
                    tracing::debug!("CBT verification: skipping segment {k}: {object} not in the local cache");
                    Vec::new()
                }
                Err(e) => return Err(e),
            };
            segment = Some((k, ids));
        }
        let ids = &segment.as_ref().expect("loaded above").1;
        let Some(&expected) = ids.get((b % crate::format::SEGMENT_BLOCKS as u64) as usize) else { continue };
        compared += 1;
        let len = bs.min(parent.capacity - b * bs) as usize;
        read(b * bs, &mut buf[..len])?;
        let id = if crate::backup::is_zero(&buf[..len]) {
            crate::format::BlobId::ZERO
        } else {
            repo.keys().blob_id(&buf[..len])
        };
        if id != expected {
            wrong.push(b);
        }
    }
    tracing::info!(
        "CBT verification: {} of {} sampled unchanged blocks re-read, {} differ",
        compared,
        blocks,
        wrong.len()
    );
    if wrong.is_empty() {
        return Ok((compared, None));
    }
    Ok((
        compared,
        Some(format!(
            "CBT verification: {} of {} re-read blocks that CBT called unchanged differ from the backup (first: \
         block {}, bytes {}..); change tracking cannot be trusted for this disk",
            wrong.len(),
            compared,
            wrong[0],
            wrong[0] * bs
        )),
    ))
}

/// What a restore onto a VM's disk did.
#[derive(Clone, Debug, serde::Serialize)]
pub struct VmRestoreReport {
    pub disk: String,
    pub vm: String,
    pub vm_disk: String,
    /// Blocks read from the VM's disk and compared with the snapshot (with CBT: only the sample that checks it).
    pub blocks_compared: u64,
    pub blocks_written: u64,
    pub bytes_written: u64,
    /// Change tracking was on, turned off for the restore and back on: the next backup reads in full.
    pub change_tracking_reset: bool,
    /// With CBT ("quick rollback"): the blocks the VM changed since the backup, the only ones written.
    pub changed_since_backup: Option<u64>,
    /// Why every block was compared instead of asking CBT what changed since the backup.
    pub compared_all_because: Option<String>,
    /// A disk of a new VM that the backup left out (why): created, and left empty.
    pub left_empty_because: Option<String>,
}

impl VmRestoreReport {
    fn new(disk: String, vm: String, vm_disk: String) -> Self {
        VmRestoreReport {
            disk,
            vm,
            vm_disk,
            blocks_compared: 0,
            blocks_written: 0,
            bytes_written: 0,
            change_tracking_reset: false,
            changed_since_backup: None,
            compared_all_because: None,
            left_empty_because: None,
        }
    }
}

/// How a restore onto an existing VM's disk finds the blocks to write.
#[derive(Clone, Copy, Debug)]
pub struct VmRestoreOptions {
    /// Ask CBT which areas the VM changed since the backup and write only those, where CBT can tell (the VM
    /// tracked changes without a reset since); otherwise every block is read and compared.
    pub use_cbt: bool,
    /// With CBT: the share of the other blocks re-read and compared with the snapshot first; a difference
    /// means CBT cannot be trusted, and every block is compared.
    pub verify_cbt_fraction: f64,
}

impl Default for VmRestoreOptions {
    fn default() -> Self {
        VmRestoreOptions { use_cbt: true, verify_cbt_fraction: 0.01 }
    }
}

/// Restores disks of a snapshot onto the matching disks of an existing, powered-off VM, writing only the
/// blocks whose content differs from the snapshot. `disks`: each disk of the snapshot, and the name of the VM's
/// disk to write (its file name without `.vmdk`), by default the same name.
///
/// Where a VM's disk has tracked changes without a reset since the backup (its changeId has the UUID of the
/// one the backup recorded), CBT says which areas the VM wrote since (`QueryChangedDiskAreas` against the
/// backup's changeId on the powered-off disk as it is): only the blocks in them are written, after a sample
/// of the others was re-read and found as the snapshot has them ("quick rollback": minutes for a VM that
/// changed little, instead of reading the whole disk through the VDDK). Otherwise, or if the sample differs,
/// every block is read and hashed, and written if it differs; the report says why. Every disk's changes are
/// asked for before change tracking is turned off for the writes (which drops what it knows): restoring the
/// disks of a VM one command at a time would leave CBT to the first only.
#[allow(clippy::too_many_arguments)]
pub fn restore_to_vm(
    client: &mut Client,
    repo: &Repository,
    cache: &IndexCache,
    disks: &[(&DiskManifest, Option<&str>)],
    vm: &str,
    libdir: &std::path::Path,
    user: &str,
    opts: VmRestoreOptions,
    counters: &Counters,
) -> Result<Vec<VmRestoreReport>> {
    let info = client.find_vm(vm)?;
    if info.power_state != "poweredOff" {
        return Err(Error::invalid(format!(
            "VM {} is {}: restoring onto its disks needs it powered off (diskvault vm power-off {})",
            info.name, info.power_state, info.name
        )));
    }
    let mut targets = Vec::new();
    for &(disk, vm_disk) in disks {
        disk.validate().map_err(|e| Error::corrupt("snapshot", e))?;
        let want = vm_disk.unwrap_or(&disk.name);
        let target_disk = info.disks.iter().find(|d| disk_name(&d.file_name) == want).ok_or_else(|| {
            let names: Vec<String> = info.disks.iter().map(|d| disk_name(&d.file_name)).collect();
            Error::invalid(format!("VM {} has no disk {want:?} (its disks: {})", info.name, names.join(", ")))
        })?;
        if target_disk.capacity < disk.capacity {
            return Err(Error::invalid(format!(
                "VM disk {} has {} bytes, the snapshot's disk {} needs {}",
                target_disk.file_name, target_disk.capacity, disk.name, disk.capacity
            )));
        }
        if targets.iter().any(|(_, t): &(&DiskManifest, &VirtualDiskInfo)| t.key == target_disk.key) {
            return Err(Error::invalid(format!("VM disk {} is the target of two disks", target_disk.file_name)));
        }
        targets.push((disk, target_disk));
    }
    let lib = Library::load(libdir)?;
    let session = crate::lock::start_session(repo, "restore")?;
    cache.sync(repo)?;
    let mut jobs = Vec::new();
    for (disk, target_disk) in targets {
        let target = vm_disk_target(client, &info.moref, &target_disk.file_name, user)?;
        let mut report = VmRestoreReport::new(disk.name.clone(), info.name.clone(), target_disk.file_name.clone());
        // Asked before change tracking is turned off below.
        let since_backup = match changed_since_backup(client, &info, target_disk, disk, opts) {
            Ok(areas) => Some(areas),
            Err(reason) => {
                tracing::info!("disk {}: comparing every block: {reason}", disk.name);
                report.compared_all_because = Some(reason);
                None
            }
        };
        report.change_tracking_reset = info.cbt_enabled;
        jobs.push((disk, target, since_backup, report));
    }
    // The guide: disable change tracking for a full restore (SAN requires it). Turned back on afterwards, it
    // starts anew, so the next backup reads the disks in full instead of trusting changes that CBT may not
    // have seen.
    if info.cbt_enabled {
        client.stop_change_tracking(&info.moref)?;
    }
    let written: Result<Vec<VmRestoreReport>> = jobs
        .into_iter()
        .map(|(disk, target, since_backup, mut report)| {
            let mut out = Disk::open_writable(lib.clone(), &target)?;
            let mut before = Written::Unknown;
            if let Some(areas) = &since_backup {
                let fraction = opts.verify_cbt_fraction;
                let (sampled, mismatch) =
                    verify_cbt(repo, cache, &mut |o, b| out.read_at(o, b), disk, areas, fraction)?;
                report.blocks_compared += sampled;
                match mismatch {
                    None => {
                        let changed = crate::source::BlockRanges::from_extents(areas, disk.block_size as u64);
                        report.changed_since_backup = Some(changed.block_count());
                        before = Written::SnapshotExcept(changed);
                    }
                    Some(m) => {
                        tracing::error!("disk {}: {m}; comparing every block", disk.name);
                        report.compared_all_because = Some(m);
                    }
                }
            }
            write_blocks(repo, cache, disk, &mut out, before, &mut report, counters)?;
            Ok(report)
        })
        .collect();
    if info.cbt_enabled {
        let enabled = client.set_change_tracking(&info.moref, true);
        if written.is_ok() {
            enabled.map_err(|e| {
                Error::invalid(format!(
                    "restored, but change tracking could not be turned back on for {}: {e}",
                    info.name
                ))
            })?;
        }
    }
    let reports = written?;
    session.ensure_held()?;
    Ok(reports)
}

/// The areas of the VM's disk `target` that the VM changed since `disk` was backed up from it, by CBT; or why
/// CBT cannot tell.
fn changed_since_backup(
    client: &mut Client,
    vm: &crate::vsphere::VmInfo,
    target: &VirtualDiskInfo,
    disk: &DiskManifest,
    opts: VmRestoreOptions,
) -> std::result::Result<Vec<Extent>, String> {
    if !opts.use_cbt {
        return Err("asked to (--no-cbt)".into());
    }
    let backup_token = match (disk.source_kind.as_str(), disk.change_token.as_deref()) {
        ("vddk", Some(t)) if !t.is_empty() => t,
        _ => return Err("the backup recorded no changeId for this disk".into()),
    };
    if !vm.cbt_enabled || target.change_id.is_empty() {
        return Err("change tracking is off on the VM's disk".into());
    }
    // Same UUID: the same disk, tracked without a reset since the backup (another disk, or one whose tracking
    // was reset, has another).
    if change_id_uuid(backup_token) != change_id_uuid(&target.change_id) {
        return Err(format!(
            "the VM's disk is not tracked since the backup (changeId {backup_token} then, {} now: another disk, or \
             change tracking was reset)",
            target.change_id
        ));
    }
    if target.capacity != disk.capacity {
        return Err(format!(
            "the disk was resized since the backup ({} bytes then, {} now)",
            disk.capacity, target.capacity
        ));
    }
    client
        .query_changed_disk_areas(&vm.moref, None, target.key, backup_token, target.capacity)
        .map_err(|e| format!("vSphere cannot say what changed since the backup: {e}"))
}

/// What the disk being written holds before the restore.
enum Written {
    /// Anything: every block is read and hashed, and written only if it differs.
    Unknown,
    /// Zeros (a disk just created): only non-zero blocks are written, and none is read (thin disks stay thin).
    Zeros,
    /// The snapshot's content except in these blocks (CBT's changes since the backup), which are written.
    SnapshotExcept(crate::source::BlockRanges),
}

/// Restores `disk` of a snapshot into a new hosted VMDK at `path` (monolithicSparse, created through the
/// VDDK), writing only its non-zero blocks. Refuses to replace an existing file.
pub fn restore_to_hosted_vmdk(
    repo: &Repository,
    cache: &IndexCache,
    disk: &crate::format::snapshot::DiskManifest,
    libdir: &std::path::Path,
    path: &std::path::Path,
    counters: &Counters,
) -> Result<VmRestoreReport> {
    disk.validate().map_err(|e| Error::corrupt("snapshot", e))?;
    if path.exists() {
        return Err(Error::local(path, "exists already: a new VMDK is never written over an existing file"));
    }
    let lib = Library::load(libdir)?;
    let session = crate::lock::start_session(repo, "restore")?;
    cache.sync(repo)?;
    crate::vddk::create_hosted(&lib, path, disk.capacity)?;
    let mut report = VmRestoreReport::new(disk.name.clone(), String::new(), path.display().to_string());
    let written = Disk::open_writable(lib, &DiskTarget::hosted(path))
        .and_then(|mut out| write_blocks(repo, cache, disk, &mut out, Written::Zeros, &mut report, counters));
    if let Err(e) = written.and_then(|()| session.ensure_held()) {
        // Half a disk is worse than none: the file was ours.
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(report)
}

/// Restores `disk` of a snapshot as a new thin VMDK `datastore_path` (`[datastore] dir/name.vmdk`) and
/// attaches it to the VM `attach_to`. As the VDDK guide prescribes for managed disks: a hosted VMDK is created
/// and written in `temp_dir`, cloned onto the datastore (`VixDiskLib_Clone`), then added to the VM
/// (ReconfigVM_Task). The temporary VMDK is always removed.
#[allow(clippy::too_many_arguments)]
pub fn restore_to_new_vmdk(
    client: &mut Client,
    repo: &Repository,
    cache: &IndexCache,
    disk: &crate::format::snapshot::DiskManifest,
    datastore_path: &str,
    attach_to: &str,
    libdir: &std::path::Path,
    user: &str,
    temp_dir: &std::path::Path,
    counters: &Counters,
) -> Result<VmRestoreReport> {
    if !datastore_path.starts_with('[') || !datastore_path.ends_with(".vmdk") {
        return Err(Error::invalid(format!(
            "{datastore_path:?} is not a datastore path like \"[datastore1] dir/name.vmdk\""
        )));
    }
    let info = client.find_vm(attach_to)?;
    let temp = temp_dir.join(format!("diskvault-restore-{}.vmdk", hex::encode(crate::crypto::random_array::<8>())));
    let mut report = restore_to_hosted_vmdk(repo, cache, disk, libdir, &temp, counters)?;
    let lib = Library::load(libdir)?;
    let target = vm_disk_target(client, &info.moref, datastore_path, user)?;
    let cloned = crate::vddk::clone_to_datastore(&lib, &temp, &target, disk.capacity);
    let _ = std::fs::remove_file(&temp);
    cloned?;
    client.attach_disk(&info.moref, datastore_path, disk.capacity).map_err(|e| {
        Error::invalid(format!(
            "the disk was restored to {datastore_path} but could not be attached to {}: {e}",
            info.name
        ))
    })?;
    report.vm = info.name;
    report.vm_disk = datastore_path.to_string();
    Ok(report)
}

/// A VM's disk reached with the API session's cookie (no second login).
fn vm_disk_target(client: &Client, moref: &str, path: &str, user: &str) -> Result<DiskTarget> {
    let (server, _) = client.server_host();
    let cookie = client
        .session_cookie()
        .ok_or_else(|| Error::VSphere { call: "Login".into(), cause: "no session cookie to hand to the VDDK".into() })?
        .to_string();
    Ok(DiskTarget {
        server,
        port: None,
        thumbprint: client.server_sha1_thumbprint(),
        credentials: Credentials::Session { cookie, user: user.to_string() },
        moref: moref.to_string(),
        snapshot: None,
        path: path.to_string(),
        transports: None,
    })
}

/// Blocks decided, fetched and written at a time by [`write_blocks`].
const WRITE_WINDOW: usize = 32;
/// Threads that fetch a window's blobs from the repository (ranged reads, decryption, decompression).
const WRITE_FETCHERS: usize = 4;

/// Writes the blocks of `disk` into `out`: those that differ from what it holds (read and hashed first), or,
/// on a disk of zeros, the non-zero ones, or on a disk that holds the snapshot but for some blocks, those. A
/// short last block is padded to whole sectors.
///
/// The blocks to write are fetched a window ahead of the VDDK writes, as restore to a file fetches them:
/// grouped by pack into coalesced ranged reads, by several threads. One blob read at a time, in turn with the
/// writes, cost a round trip per block on S3 and left the cores idle while the VDDK wrote: a new VM from a disk
/// of 384 MiB of data through S3 behind a 10 ms proxy took 10.5 s, now 1.5-1.8 s
/// (`benches/results/2026-12-05-vmware-restore-session19.md`).
fn write_blocks(
    repo: &Repository,
    cache: &IndexCache,
    disk: &crate::format::snapshot::DiskManifest,
    out: &mut Disk,
    before: Written,
    report: &mut VmRestoreReport,
    counters: &Counters,
) -> Result<()> {
    let bs = disk.block_size as u64;
    counters.add_total(disk.capacity);
    let mut current = vec![0u8; bs as usize];
    let mut changed = match &before {
        Written::SnapshotExcept(blocks) => Some(blocks.cursor()),
        _ => None,
    };
    std::thread::scope(|s| -> Result<()> {
        // Windows of (block, id) to fetch go to the fetching thread; fetched windows come back in order.
        let (want_tx, want_rx) = crossbeam_channel::bounded::<Vec<(u64, crate::format::BlobId)>>(1);
        let (got_tx, got_rx) = crossbeam_channel::bounded::<Result<Fetched>>(1);
        s.spawn(move || {
            let bases = crate::restore::Bases::new(cache);
            // The pool's threads are joined when the windows end (see `util::with_thread_pool`).
            let fetching = crate::util::with_thread_pool(WRITE_FETCHERS, "vddk-write-fetch", |pool| {
                for window in &want_rx {
                    let fetched = pool.install(|| fetch_window(repo, cache, &bases, disk, &window));
                    if got_tx.send(fetched).is_err() {
                        break;
                    }
                }
            });
            if let Err(e) = fetching {
                let _ = got_tx.send(Err(e));
            }
        });
        let mut in_flight = 0;
        let mut window = Vec::with_capacity(WRITE_WINDOW);
        for (k, seg) in disk.segments.iter().enumerate() {
            let ids = crate::backup::load_segment(repo, cache, seg)?;
            for (j, id) in ids.iter().enumerate() {
                let b = k as u64 * crate::format::SEGMENT_BLOCKS as u64 + j as u64;
                let len = bs.min(disk.capacity - b * bs) as usize;
                if crate::util::interrupted() {
                    return Err(Error::Interrupted);
                }
                counters.add_done(len as u64);
                let write = match &before {
                    Written::Zeros => !id.is_zero_block(),
                    Written::SnapshotExcept(_) => changed.as_mut().is_some_and(|c| c.contains(b)),
                    Written::Unknown => {
                        out.read_at(b * bs, &mut current[..len])?;
                        report.blocks_compared += 1;
                        let now = if crate::backup::is_zero(&current[..len]) {
                            crate::format::BlobId::ZERO
                        } else {
                            repo.keys().blob_id(&current[..len])
                        };
                        now != *id
                    }
                };
                if write {
                    window.push((b, *id));
                }
                if window.len() == WRITE_WINDOW {
                    let _ = want_tx.send(std::mem::take(&mut window));
                    in_flight += 1;
                    // One window written while the next is fetched.
                    if in_flight == 2 {
                        write_fetched(out, disk, got_rx.recv().expect("the fetcher answers every window"), report)?;
                        in_flight -= 1;
                    }
                }
            }
        }
        if !window.is_empty() {
            let _ = want_tx.send(window);
            in_flight += 1;
        }
        drop(want_tx);
        for _ in 0..in_flight {
            write_fetched(out, disk, got_rx.recv().expect("the fetcher answers every window"), report)?;
        }
        Ok(())
    })?;
    out.flush()
}

/// Writes a fetched window through the VDDK (a short last block padded to whole sectors).
fn write_fetched(
    out: &mut Disk,
    disk: &DiskManifest,
    fetched: Result<Fetched>,
    report: &mut VmRestoreReport,
) -> Result<()> {
    let bs = disk.block_size as u64;
    for (b, data) in fetched? {
        let len = bs.min(disk.capacity - b * bs) as usize;
        let padded = (len as u64).next_multiple_of(crate::vddk::ffi::SECTOR_SIZE) as usize;
        match data {
            Some(d) if d.len() != len => {
                return Err(Error::corrupt(
                    format!("block {b} of disk {}", disk.name),
                    format!("its blob holds {} bytes, the block has {len}", d.len()),
                ))
            }
            Some(d) if len == padded => out.write_at(b * bs, &d)?,
            Some(d) => {
                let mut d = d.to_vec();
                d.resize(padded, 0);
                out.write_at(b * bs, &d)?
            }
            None => out.write_at(b * bs, &vec![0u8; padded])?,
        }
        report.blocks_written += 1;
        report.bytes_written += len as u64;
    }
    Ok(())
}

/// A fetched window: each block's content (`None`: zeros), in block order.
type Fetched = Vec<(u64, Option<Arc<crate::util::AlignedBuf>>)>;

/// Fetches the blobs of `window` ((block, id) in block order) in coalesced ranged reads, in parallel on the
/// current thread pool. A blob that cannot be read, or is not indexed, is an error naming it and the block.
fn fetch_window(
    repo: &Repository,
    cache: &IndexCache,
    bases: &crate::restore::Bases,
    disk: &DiskManifest,
    window: &[(u64, crate::format::BlobId)],
) -> Result<Fetched> {
    use rayon::prelude::*;
    use std::collections::HashMap;
    let mut by_pack: HashMap<ObjectId, HashMap<crate::format::BlobId, crate::restore::Want>> = HashMap::new();
    let mut out: Fetched = Vec::with_capacity(window.len());
    for &(b, id) in window {
        if id.is_zero_block() {
            out.push((b, None));
            continue;
        }
        let loc = cache.lookup(&id)?.ok_or_else(|| {
            Error::corrupt(format!("blob {id}"), format!("block {b} of disk {} is in no index file", disk.name))
        })?;
        let want = by_pack.entry(loc.pack).or_default().entry(id);
        want.or_insert_with(|| crate::restore::Want { entry: loc.entry, blocks: Vec::new() }).blocks.push(b);
    }
    let fetched = std::sync::Mutex::new(out);
    crate::restore::plan_reads(by_pack).par_iter().try_for_each(|job| {
        let mut failed = None;
        crate::restore::with_range_buffer(|data| {
            crate::restore::fetch_blobs(repo, bases, job, data, None, |w, plain| match plain {
                Ok((p, _)) => {
                    let p = Arc::new(p);
                    fetched
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(w.blocks.iter().map(|&b| (b, Some(p.clone()))));
                }
                Err(failure) => {
                    failed.get_or_insert_with(|| {
                        let cause = format!("block {} of disk {}: {}", w.blocks[0], disk.name, failure.cause);
                        let object = format!("blob {} in {}", w.entry.id, crate::format::names::pack(&job.pack));
                        crate::restore::BlobFailure { cause, ..failure }.into_error(object)
                    });
                }
            })
        })?;
        failed.map_or(Ok(()), Err)
    })?;
    let mut out = fetched.into_inner().unwrap_or_else(|e| e.into_inner());
    out.sort_unstable_by_key(|(b, _)| *b);
    Ok(out)
}

/// What a boot check of a restored VM saw (`restore --to-new-vm --verify-boot`).
#[derive(Clone, Debug, serde::Serialize)]
pub struct BootCheck {
    /// The guest ran VMware Tools with a green heartbeat (the restored system started), and the check command,
    /// if one was given, succeeded.
    pub verified: bool,
    /// Seconds from power-on to that heartbeat.
    pub heartbeat_after_secs: Option<f64>,
    /// The last status the guest reported.
    pub guest: crate::vsphere::GuestStatus,
    /// The check command's exit code (`None`: no command, not run, or killed at the deadline).
    pub command_exit_code: Option<i32>,
    /// Why the check failed, in words.
    pub failure: Option<String>,
    /// The VM was removed afterwards.
    pub removed: bool,
}

/// Powers `vm` on and waits up to `timeout` for its guest to run VMware Tools with a green heartbeat (what a
/// booted system with Tools reports; Veeam's SureBackup checks the same first). Then, with a `command`, waits for
/// the guest's IP address and runs the command on this host (`sh -c`, with `DISKVAULT_VM_NAME`,
/// `DISKVAULT_VM_MOREF` and `DISKVAULT_VM_IP` set: a ping, a port, an application query), which must exit 0
/// within what is left of `timeout`. Ctrl-C stops the wait.
pub fn check_boot(
    client: &mut Client,
    vm: &str,
    name: &str,
    command: Option<&str>,
    timeout: std::time::Duration,
) -> Result<BootCheck> {
    use std::time::{Duration, Instant};
    client.power_on(vm)?;
    let start = Instant::now();
    let mut check = BootCheck {
        verified: false,
        heartbeat_after_secs: None,
        guest: Default::default(),
        command_exit_code: None,
        failure: None,
        removed: false,
    };
    let pause =
        |start: Instant| std::thread::sleep(Duration::from_millis(250).min(timeout.saturating_sub(start.elapsed())));
    // The heartbeat, then (for a command) the address.
    loop {
        check.guest = client.guest_status(vm)?;
        let beats = check.guest.tools == "guestToolsRunning" && check.guest.heartbeat == "green";
        if beats && check.heartbeat_after_secs.is_none() {
            check.heartbeat_after_secs = Some(start.elapsed().as_secs_f64());
        }
        if beats && (command.is_none() || check.guest.ip_address.is_some()) {
            break;
        }
        if start.elapsed() >= timeout {
            check.failure = Some(match check.heartbeat_after_secs {
                None => format!(
                    "no VMware Tools heartbeat within {} s of power-on (Tools: {}, heartbeat: {})",
                    timeout.as_secs(),
                    or_unknown(&check.guest.tools),
                    or_unknown(&check.guest.heartbeat)
                ),
                Some(_) => format!("the guest reported no IP address within {} s of power-on", timeout.as_secs()),
            });
            return Ok(check);
        }
        if crate::util::interrupted() {
            return Err(Error::Interrupted);
        }
        pause(start);
    }
    let Some(command) = command else {
        check.verified = true;
        return Ok(check);
    };
    let ip = check.guest.ip_address.clone().unwrap_or_default();
    use std::os::unix::process::CommandExt;
    // In a process group of its own, so that a command past the deadline goes with everything it started.
    let mut child = std::process::Command::new("sh")
        .process_group(0)
        .args(["-c", command])
        .env("DISKVAULT_VM_NAME", name)
        .env("DISKVAULT_VM_MOREF", vm)
        .env("DISKVAULT_VM_IP", &ip)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(|e| Error::invalid(format!("--verify-command: cannot run sh: {e}")))?;
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                check.command_exit_code = status.code();
                check.verified = status.success();
                if !status.success() {
                    check.failure = Some(format!("the check command failed ({status}) against {ip}"));
                }
                return Ok(check);
            }
            Ok(None) if start.elapsed() >= timeout || crate::util::interrupted() => {
                // SAFETY: signals the process group this function created (its leader is our child).
                unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                let _ = child.wait();
                if crate::util::interrupted() {
                    return Err(Error::Interrupted);
                }
                check.failure =
                    Some(format!("the check command did not finish within {} s of power-on", timeout.as_secs()));
                return Ok(check);
            }
            Ok(None) => pause(start),
            Err(e) => return Err(Error::invalid(format!("--verify-command: {e}"))),
        }
    }
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() {
        "unknown"
    } else {
        s
    }
}

/// Where `restore --to-new-vm` creates the VM, and which networks its NICs join instead of the recorded ones.
/// What is not given is as recorded: the VM's folder and resource pool, the datastore of its first disk, its
/// networks. Restoring into another cluster or vCenter (disaster recovery) needs them.
#[derive(Clone, Debug, Default)]
pub struct NewVmPlacement {
    /// The datastore for the VM and all its disks (default: each disk where it was, the VM with its first).
    pub datastore: Option<String>,
    /// Every disk thin (default: thin or thick as it was).
    pub thin: bool,
    /// A folder: inventory path (`DC0/vm/restored`) or moref (`group-v3`).
    pub folder: Option<String>,
    /// A resource pool (or vApp): inventory path (`DC0/host/cluster/Resources`) or moref.
    pub resource_pool: Option<String>,
    /// (recorded network, network to use instead): a recorded standard port group's name or distributed port
    /// group's key (or name, while it exists), and a port group's name (standard or distributed).
    pub networks: Vec<(String, String)>,
}

impl NewVmPlacement {
    /// Changes `config` where this placement says otherwise; inventory paths are looked up.
    fn apply(&self, client: &mut Client, config: &mut crate::vsphere::VmConfig) -> Result<()> {
        if let Some(folder) = &self.folder {
            config.folder = client.resolve(folder, &["Folder"], "folder")?.value;
        }
        if let Some(pool) = &self.resource_pool {
            config.resource_pool = client.resolve(pool, &["ResourcePool", "VirtualApp"], "resource pool")?.value;
        }
        let networks = if self.networks.is_empty() { Vec::new() } else { client.networks()? };
        for (recorded, new) in &self.networks {
            // The new backing: a standard port group by name, or a distributed one by key and switch.
            let target = match networks.iter().find(|(_, name)| name == new) {
                Some((moref, _)) if moref.kind == "Network" => None,
                Some((moref, _)) if moref.kind == "DistributedVirtualPortgroup" => {
                    Some(client.distributed_portgroup(moref)?)
                }
                Some((moref, _)) => {
                    return Err(Error::invalid(format!(
                        "--network {recorded}={new}: {new} is a {} ({}), not a port group",
                        moref.kind, moref.value
                    )))
                }
                None => {
                    let names: Vec<&str> = networks.iter().map(|(_, n)| n.as_str()).collect();
                    return Err(Error::invalid(format!(
                        "--network {recorded}={new}: there is no network {new:?} (networks: {})",
                        names.join(", ")
                    )));
                }
            };
            // A recorded distributed port group is named by its key, or by its name while it still exists.
            let recorded_key = networks
                .iter()
                .find(|(m, name)| name == recorded && m.kind == "DistributedVirtualPortgroup")
                .map(|(m, _)| m.value.clone());
            let mut mapped = false;
            for nic in config.nics.iter_mut() {
                let on_it = if nic.portgroup_key.is_empty() {
                    nic.network == *recorded
                } else {
                    nic.portgroup_key == *recorded || recorded_key.as_ref() == Some(&nic.portgroup_key)
                };
                if !on_it {
                    continue;
                }
                match &target {
                    None => {
                        (nic.network, nic.portgroup_key, nic.switch_uuid) = (new.clone(), String::new(), String::new())
                    }
                    Some((key, switch)) => {
                        (nic.network, nic.portgroup_key, nic.switch_uuid) = (String::new(), key.clone(), switch.clone())
                    }
                }
                mapped = true;
            }
            if !mapped {
                let mut had: Vec<&str> = config
                    .nics
                    .iter()
                    .map(|n| if n.portgroup_key.is_empty() { n.network.as_str() } else { n.portgroup_key.as_str() })
                    .collect();
                had.dedup();
                return Err(Error::invalid(format!(
                    "--network {recorded}={new}: no recorded NIC is on {recorded:?} (they are on: {})",
                    if had.is_empty() { "none, the VM had no NIC".to_string() } else { had.join(", ") }
                )));
            }
        }
        Ok(())
    }
}

/// The VM `restore --to-new-vm` creates: the recorded configuration as `placement` changes it, checked against
/// the inventory (the name free; folder, pool, networks and datastores there). `--dry-run` shows it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct NewVmPlan {
    pub name: String,
    /// Folder and resource pool (morefs).
    pub folder: String,
    pub resource_pool: String,
    /// The datastore of the VM's own files.
    pub datastore: String,
    pub num_cpu: u32,
    pub cores_per_socket: u32,
    pub memory_mb: u64,
    pub hardware_version: String,
    pub disks: Vec<PlannedDisk>,
    /// Each NIC's device type and network (port group name, or distributed port group key).
    pub nics: Vec<(String, String)>,
    #[serde(skip)]
    config: crate::vsphere::VmConfig,
    #[serde(skip)]
    storage: crate::vsphere::NewVmStorage,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct PlannedDisk {
    /// The disk's name in the snapshot.
    pub disk: String,
    pub capacity: u64,
    pub datastore: String,
    pub provisioning: crate::vsphere::Provisioning,
    /// Why it is created empty (a disk the backup left out), if it is.
    pub left_empty_because: Option<String>,
}

/// Plans the new VM of [`restore_as_new_vm`] without creating anything.
pub fn plan_new_vm(
    client: &mut Client,
    snapshot: &Snapshot,
    name: &str,
    placement: &NewVmPlacement,
) -> Result<NewVmPlan> {
    let recorded = snapshot.annotations.get("vmware.config").ok_or_else(|| {
        Error::invalid(
            "this snapshot was not taken of a VMware VM (no recorded configuration): restore its disks to files",
        )
    })?;
    let mut config: crate::vsphere::VmConfig =
        serde_json::from_str(recorded).map_err(|e| Error::corrupt("snapshot annotation vmware.config", e))?;
    if client.virtual_machines()?.iter().any(|v| v.name == name) {
        return Err(Error::invalid(format!("a VM named {name:?} exists already")));
    }
    placement.apply(client, &mut config)?;
    if config.folder.is_empty() || config.resource_pool.is_empty() {
        return Err(Error::invalid(
            "the recorded configuration does not say where the VM was (folder, pool): give --folder and --resource-pool",
        ));
    }
    let storage = crate::vsphere::NewVmStorage {
        vm_datastore: match &placement.datastore {
            Some(d) => d.clone(),
            None => config
                .disks
                .first()
                .and_then(|d| d.datastore())
                .map(str::to_string)
                .ok_or_else(|| Error::invalid("no datastore recorded: give --datastore"))?,
        },
        disks_datastore: placement.datastore.clone(),
        thin: placement.thin,
    };
    let skipped: Vec<SkippedDisk> = match snapshot.annotations.get(SKIPPED_DISKS) {
        Some(json) => {
            serde_json::from_str(json).map_err(|e| Error::corrupt(format!("annotation {SKIPPED_DISKS}"), e))?
        }
        None => Vec::new(),
    };
    let mut disks = Vec::new();
    for d in &config.disks {
        let in_snapshot = disk_name(&d.file_name);
        let left_empty_because = match snapshot.disk(&in_snapshot) {
            Some(_) => None,
            None => {
                let reason = skipped.iter().find(|s| s.name == in_snapshot).map(|s| s.reason.clone());
                Some(format!(
                    "not backed up: {}",
                    reason.ok_or_else(|| {
                        Error::corrupt("snapshot", format!("the recorded disk {in_snapshot} is not in the snapshot"))
                    })?
                ))
            }
        };
        let (datastore, provisioning) = storage.for_disk(d);
        disks.push(PlannedDisk {
            disk: in_snapshot,
            capacity: d.capacity,
            datastore: datastore.to_string(),
            provisioning,
            left_empty_because,
        });
    }
    // Every datastore it needs must be there (vCenter's own refusal comes later, after a half-made VM).
    let known: Vec<String> = client.datastores()?.into_iter().map(|(_, n)| n).collect();
    let needed = std::iter::once(&storage.vm_datastore).chain(disks.iter().map(|d| &d.datastore));
    for ds in needed {
        if !known.contains(ds) {
            return Err(Error::invalid(format!(
                "there is no datastore {ds:?} (datastores: {}): give --datastore",
                known.join(", ")
            )));
        }
    }
    let nics = config
        .nics
        .iter()
        .map(|n| (n.kind.clone(), if n.portgroup_key.is_empty() { n.network.clone() } else { n.portgroup_key.clone() }))
        .collect();
    Ok(NewVmPlan {
        name: name.to_string(),
        folder: config.folder.clone(),
        resource_pool: config.resource_pool.clone(),
        datastore: storage.vm_datastore.clone(),
        num_cpu: config.num_cpu,
        cores_per_socket: config.cores_per_socket,
        memory_mb: config.memory_mb,
        hardware_version: config.hardware_version.clone(),
        disks,
        nics,
        config,
        storage,
    })
}

/// Creates a new, powered-off VM named `name` from the configuration recorded in `snapshot` (CPUs, memory,
/// firmware, guest OS, disks of the recorded sizes, NICs) where `placement` says, and writes every disk into it.
#[allow(clippy::too_many_arguments)]
pub fn restore_as_new_vm(
    client: &mut Client,
    repo: &Repository,
    cache: &IndexCache,
    snapshot: &Snapshot,
    name: &str,
    placement: &NewVmPlacement,
    libdir: &std::path::Path,
    user: &str,
    counters: &Counters,
) -> Result<Vec<VmRestoreReport>> {
    let plan = plan_new_vm(client, snapshot, name, placement)?;
    let (config, storage) = (&plan.config, &plan.storage);
    let lib = Library::load(libdir)?;
    let session = crate::lock::start_session(repo, "restore")?;
    cache.sync(repo)?;
    let moref = client.create_vm(name, config, storage)?;
    let mut write_disks = || -> Result<Vec<VmRestoreReport>> {
        let created = client.find_vm(&moref)?;
        if created.disks.len() != config.disks.len() {
            return Err(Error::VSphere {
                call: "CreateVM_Task".into(),
                cause: format!("the new VM has {} disks, {} were asked for", created.disks.len(), config.disks.len()),
            });
        }
        let mut reports = Vec::new();
        for (recorded_disk, new_disk) in config.disks.iter().zip(&created.disks) {
            let in_snapshot = disk_name(&recorded_disk.file_name);
            let new_report = |disk: String| VmRestoreReport::new(disk, name.to_string(), new_disk.file_name.clone());
            let Some(disk) = snapshot.disk(&in_snapshot) else {
                // Left out by the backup (the plan knows why): the new VM keeps its place, empty.
                let planned = plan.disks.iter().find(|d| d.disk == in_snapshot);
                let reason = planned.and_then(|d| d.left_empty_because.clone()).unwrap_or_default();
                tracing::warn!("disk {in_snapshot} {reason}: created empty");
                let mut report = new_report(in_snapshot);
                report.left_empty_because = Some(reason);
                reports.push(report);
                continue;
            };
            let target = vm_disk_target(client, &moref, &new_disk.file_name, user)?;
            let mut report = new_report(disk.name.clone());
            let mut out = Disk::open_writable(lib.clone(), &target)?;
            write_blocks(repo, cache, disk, &mut out, Written::Zeros, &mut report, counters)?;
            reports.push(report);
        }
        session.ensure_held()?;
        Ok(reports)
    };
    let written = write_disks();
    if let Err(e) = &written {
        // Half a VM is worse than none, and the VM is ours: it goes (its disks with it).
        match client.destroy_vm(&moref) {
            Ok(()) => tracing::warn!("the new VM {name} was removed: {e}"),
            Err(d) => tracing::error!("the half-restored VM {name} ({moref}) could not be removed ({d}): remove it"),
        }
    }
    written
}
