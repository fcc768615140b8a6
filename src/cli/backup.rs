//! `diskvault backup`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Globals;
use crate::backup::{self, BackupOptions, DiskJob};
use crate::error::{Error, Result};
use crate::format::ObjectId;
use crate::nbd::client::TlsOptions;
use crate::progress::{Counters, Reporter};
use crate::repository::Repository;
use crate::source::nbd::NbdOptions;
use crate::source::vddk::VddkOptions;
use crate::source::SourceOptions;
use crate::util::human_bytes;

#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("vms").args(["vm", "vm_folder", "vm_tag"]).multiple(true)))]
pub struct BackupArgs {
    /// Disks to back up: `SOURCE` or `NAME=SOURCE`, where a source is a raw image file, a block device, or
    /// an NBD export (`nbd://HOST[:PORT]/EXPORT`, `nbd+unix:///EXPORT?socket=PATH`, `nbds://…` with TLS).
    /// Disk names default to the file or export name.
    #[arg(required_unless_present = "vms")]
    disks: Vec<String>,
    /// Back up this VMware VM (name or moref) through vSphere and the VDDK: snapshot, changed blocks since the
    /// last backup (CBT), snapshot removed afterwards. Needs --vsphere… and --vddk-libdir.
    /// (Repeatable: several VMs, each its own snapshot, in parallel within --max-disks-per-host.)
    #[arg(long, conflicts_with = "disks")]
    vm: Vec<String>,
    /// Back up every VM in this vSphere folder and its subfolders, as --vm does (templates are left out): an
    /// inventory path (`DC0/vm/production`) or moref. A VM added to the folder is in the next run. Repeatable.
    #[arg(long, conflicts_with = "disks", value_name = "PATH")]
    vm_folder: Vec<String>,
    /// Back up every VM that carries this vSphere tag, as --vm does (templates are left out): `TAG`, or
    /// `CATEGORY/TAG` where several categories have a tag of that name. A VM tagged later is in the next run.
    /// Repeatable.
    #[arg(long, conflicts_with = "disks", value_name = "TAG")]
    vm_tag: Vec<String>,
    /// With --vm-folder or --vm-tag: leave out this VM (name or moref). Repeatable.
    #[arg(long, requires = "vms", value_name = "VM")]
    exclude_vm: Vec<String>,
    /// With several --vm: the most disks read at once from one ESXi host (NFC connections are limited).
    #[arg(long, default_value_t = 8, requires = "vms", value_parser = clap::value_parser!(u32).range(1..=64))]
    max_disks_per_host: u32,
    #[command(flatten)]
    vsphere: super::vm::VsphereArgs,
    /// With --vm: quiesce the guest's file systems for the snapshot (VMware Tools).
    #[arg(long, requires = "vms")]
    quiesce: bool,
    /// With --vm: re-read this percentage of the blocks CBT calls unchanged and compare them with the last
    /// backup; any difference is reported and the disk is read in full.
    #[arg(long, requires = "vms", value_name = "PERCENT", default_value = "0", value_parser = super::prune::parse_percent)]
    verify_cbt: f64,
    /// With --vm: VDDK transport modes to allow, in order (`nbdssl`, `hotadd:nbdssl`, `san`…).
    #[arg(long, requires = "vms", value_name = "MODES")]
    transport: Option<String>,
    /// With --vm: save the backup's progress at most this often (seconds), so that a backup that is
    /// interrupted continues from there next time instead of reading the whole disk again.
    #[arg(long, requires = "vms", value_name = "SECONDS", default_value_t = 300)]
    checkpoint_interval: u64,
    /// With --vm: do not continue an interrupted backup from its checkpoint; read as if it had not happened.
    #[arg(long, requires = "vms")]
    no_resume: bool,
    /// With --vm: leave this disk out, by name (`disk2`: its file name without .vmdk) or label (`Hard disk 2`);
    /// repeatable. (Independent disks and physical-mode RDMs are always left out: VM snapshots do not include
    /// them.)
    #[arg(long = "exclude-disk", requires = "vms", value_name = "DISK")]
    exclude_disks: Vec<String>,
    /// The source (VM) these disks belong to; snapshots are grouped by it. Defaults to the first disk's name.
    #[arg(long)]
    name: Option<String>,
    /// Tag for the snapshot (repeatable).
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// Host name recorded in the snapshot.
    #[arg(long)]
    host: Option<String>,
    /// Changed byte ranges since the parent snapshot (VMware QueryChangedDiskAreas JSON): `FILE`, or
    /// `DISK=FILE` with several disks. Only blocks touching them are read; the rest is taken from the parent.
    #[arg(long = "changed-areas")]
    changed_areas: Vec<String>,
    /// NBD sources: back up only the areas this dirty bitmap (`qemu:dirty-bitmap:NAME`) marks, the rest is
    /// taken from the parent snapshot. Without a parent the whole allocated disk is read.
    #[arg(long, value_name = "NAME")]
    dirty_bitmap: Option<String>,
    /// NBD sources: connections per export when the server allows several (multi-conn).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=16))]
    nbd_connections: u32,
    /// NBD sources with TLS (`nbds://`): PEM file of the CA that signed the server's certificate.
    #[arg(long, value_name = "FILE")]
    nbd_tls_ca: Option<PathBuf>,
    /// NBD sources with TLS: the name the server's certificate must carry (default: the host).
    #[arg(long, value_name = "NAME")]
    nbd_tls_server_name: Option<String>,
    /// NBD sources with TLS: a client certificate (PEM) for servers that require one.
    #[arg(long, value_name = "FILE", requires = "nbd_tls_key")]
    nbd_tls_cert: Option<PathBuf>,
    /// The private key of --nbd-tls-cert (PEM).
    #[arg(long, value_name = "FILE", requires = "nbd_tls_cert")]
    nbd_tls_key: Option<PathBuf>,
    /// VMware sources (`vddk://USER@SERVER/[DATASTORE] PATH.vmdk?moref=vm-N&snapshot=…&thumbprint=…`): the VDDK
    /// directory, holding `lib64/libvixDiskLib.so.8` (or .7, .6). The password is read from
    /// DISKVAULT_VSPHERE_PASSWORD, --vsphere-password-file or --vsphere-password-command.
    #[arg(long, env = "DISKVAULT_VDDK_LIBDIR", value_name = "DIR")]
    vddk_libdir: Option<PathBuf>,
    /// Change-tracking token to record with every disk (for example the VMware changeId).
    #[arg(long)]
    change_token: Option<String>,
    /// Parent snapshot (id prefix). Default: the latest snapshot of the same --name.
    #[arg(long, conflicts_with = "no_parent")]
    parent: Option<String>,
    /// Do not use a parent: read every allocated block.
    #[arg(long)]
    no_parent: bool,
    /// Print the result as JSON.
    #[arg(long)]
    json: bool,
    /// Record this time (UTC, `YYYY-MM-DD HH:MM:SS`) as the snapshot's time instead of now.
    #[arg(long, value_parser = super::parse_time)]
    time: Option<i64>,
    /// Packs uploaded at once (memory in flight is about this many packs).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    upload_concurrency: u32,
    /// Store every new block whole, never as a delta against a similar stored block (faster incrementals and
    /// restores of changed blocks, more space: see `format-spec/` §6a).
    #[arg(long)]
    no_delta: bool,
    /// After the backup, read back and verify byte for byte the packs its snapshot needs that no check has
    /// verified yet: for an incremental, the data it added (found through the local index cache, without the
    /// index download of `check --read-data-subset unverified --snapshot ID`, which also checks the structure).
    /// Damage found is reported and recorded, and the exit code is non-zero.
    #[arg(long)]
    verify: bool,
}

fn split_named(spec: &str) -> (Option<&str>, &str) {
    match spec.split_once('=') {
        Some((n, p)) if !n.is_empty() && !n.contains('/') => (Some(n), p),
        _ => (None, spec),
    }
}

fn default_disk_name(spec: &str) -> String {
    if crate::source::is_nbd_uri(spec) {
        let export = crate::nbd::client::Address::parse(spec).map(|a| a.export).unwrap_or_default();
        return match export.rsplit('/').next() {
            Some(last) if !last.is_empty() => last.to_string(),
            _ => "nbd".to_string(),
        };
    }
    if let Ok(t) = crate::source::vddk::parse_uri(spec, Some("")) {
        let file = t.path.rsplit(['/', ' ', ']']).next().unwrap_or("disk");
        return file.strip_suffix(".vmdk").unwrap_or(file).to_string();
    }
    let path = Path::new(spec);
    path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| spec.to_string())
}

pub fn run(g: &Globals, args: &BackupArgs) -> Result<()> {
    crate::util::catch_interrupts();
    if !args.vm.is_empty() || !args.vm_folder.is_empty() || !args.vm_tag.is_empty() {
        return run_vms(g, args);
    }
    let mut disks: Vec<(String, String)> = Vec::new();
    for spec in &args.disks {
        let (name, source) = split_named(spec);
        disks.push((name.map(str::to_string).unwrap_or_else(|| default_disk_name(source)), source.to_string()));
    }
    if disks.iter().any(|(_, s)| s.starts_with("vddk://")) {
        if let Some(dir) = &args.vddk_libdir {
            crate::vddk::ensure_loader_path(dir)?;
        }
    }
    let nbd_options = NbdOptions {
        dirty_bitmap: args.dirty_bitmap.clone(),
        connections: args.nbd_connections as usize,
        tls: TlsOptions {
            ca_file: args.nbd_tls_ca.clone(),
            server_name: args.nbd_tls_server_name.clone(),
            client_cert: args.nbd_tls_cert.clone().zip(args.nbd_tls_key.clone()),
        },
        ..NbdOptions::default()
    };
    let source_options = SourceOptions {
        nbd: nbd_options,
        vddk: VddkOptions {
            libdir: args.vddk_libdir.clone(),
            // Asked for only where a disk is a VMware one: a password command may be slow or prompt.
            password: if disks.iter().any(|(_, s)| s.starts_with("vddk://")) {
                args.vsphere.password_if_given()?
            } else {
                None
            },
        },
    };
    if args.dirty_bitmap.is_some() && !disks.iter().any(|(_, s)| crate::source::is_nbd_uri(s)) {
        return Err(Error::invalid("--dirty-bitmap applies to NBD sources (nbd://…), and no disk is one"));
    }
    let mut changed: Vec<(Option<String>, PathBuf)> = Vec::new();
    for spec in &args.changed_areas {
        let (name, path) = split_named(spec);
        changed.push((name.map(str::to_string), PathBuf::from(path)));
    }
    if changed.iter().any(|(n, _)| n.is_none()) && (disks.len() > 1 || changed.len() > 1) {
        return Err(Error::invalid("with several disks or change files, name them: --changed-areas DISK=FILE"));
    }
    let source = args.name.clone().unwrap_or_else(|| disks[0].0.clone());

    // Sources and change lists first: they need no key, and a source may start fetching the blocks a change list
    // names while the key is derived (~0.1 s of Argon2). A file source does where it will read through the page
    // cache (scattered blocks); runs long enough for O_DIRECT are read later (fetching them into the page cache
    // first measured slower: 0.50-0.58 s against 0.45-0.50 s for the benchmark's day-1 incremental).
    let mut opened = Vec::new();
    for (name, spec) in &disks {
        let mut src = crate::source::open(spec, &source_options)?;
        let change_file = changed.iter().find(|(n, _)| n.as_deref().is_none_or(|n| n == name)).map(|(_, p)| p);
        let listed = match change_file {
            Some(f) => Some(crate::source::changes::load(f, src.capacity())?),
            None => None,
        };
        if let Some(extents) = &listed {
            let block_size = crate::format::BLOCK_SIZE as u64;
            src.hint_reads(&crate::source::BlockRanges::from_extents(extents, block_size), block_size);
        }
        opened.push((name.clone(), src, listed));
    }

    let repo = g.open_repo()?;
    let cache = g.open_cache_unsynced(&repo)?;
    let parent = if args.no_parent {
        None
    } else if let Some(p) = &args.parent {
        Some(repo.find_snapshot(p, None)?)
    } else {
        repo.latest_snapshot_of(&source)?
    };
    if (!changed.is_empty() || args.dirty_bitmap.is_some()) && parent.is_none() {
        tracing::warn!("no parent snapshot of {source:?}: the change lists cannot be used, reading whole disks");
    }

    let mut jobs = Vec::new();
    for (name, mut src, listed) in opened {
        let extents = match listed {
            Some(extents) => Some(extents),
            None if parent.is_some() => src.changed()?,
            None => None,
        };
        jobs.push(DiskJob {
            name,
            source: src,
            changed: if parent.is_some() { extents } else { None },
            change_token: args.change_token.clone(),
            resume: None,
        });
    }
    for (n, _) in &changed {
        if let Some(n) = n {
            if !disks.iter().any(|(d, _)| d == n) {
                return Err(Error::invalid(format!("--changed-areas names disk {n:?}, which is not being backed up")));
            }
        }
    }

    let mut opts = BackupOptions::new(source.clone());
    opts.tags = args.tags.clone();
    if let Some(h) = &args.host {
        opts.hostname = h.clone();
    }
    opts.parent = parent;
    opts.uploaders = args.upload_concurrency as usize;
    opts.time_override = args.time.map(|t| (t, 0));
    opts.delta = !args.no_delta;
    let counters = Arc::new(Counters::default());
    let (id, snap) = {
        let _reporter = Reporter::start("backup", counters.clone(), g.progress);
        backup::run(&repo, cache.clone(), jobs, &opts, &counters)?
    };

    print_result(args, &repo, &id, &snap, None)?;
    verify_new(g, args, &repo, &cache, vec![(id, snap)])
}

/// `--verify`: reads back the packs the new snapshots need that no check has verified yet. With `--json` its
/// summary goes to standard error, leaving standard output to the backup's JSON.
fn verify_new(
    g: &Globals,
    args: &BackupArgs,
    repo: &Repository,
    cache: &crate::cache::IndexCache,
    snapshots: Vec<(ObjectId, crate::format::snapshot::Snapshot)>,
) -> Result<()> {
    if !args.verify || snapshots.is_empty() {
        return Ok(());
    }
    let counters = Arc::new(Counters::default());
    let report = {
        let _reporter = Reporter::start("verify", counters.clone(), g.progress);
        crate::check::verify_new_data(repo, cache, &snapshots, &counters)?
    };
    crate::metrics::gauge(
        "diskvault_backup_verify_errors",
        "Damage backup --verify found in the data the new snapshots need.",
        &[],
        report.errors.len() as f64,
    );
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    for e in &report.errors {
        eprintln!("damaged: {e}");
    }
    let ids: Vec<String> = snapshots.iter().map(|(id, _)| id.short()).collect();
    let summary = format!(
        "verified {} {}: read the {} of the {} packs a restore reads that no check had verified ({})",
        if ids.len() == 1 { "snapshot" } else { "snapshots" },
        ids.join(", "),
        report.packs_read,
        report.packs_needed,
        human_bytes(report.bytes_read)
    );
    if args.json {
        eprintln!("{summary}");
    } else {
        println!("{summary}");
    }
    match report.errors.len() {
        0 => Ok(()),
        n => Err(Error::invalid(format!(
            "verifying the new data found {} (listed above); the damaged blobs among them are recorded, so that \
             the next backups store those blocks again; `check --read-data` judges the rest of the repository",
            crate::util::count(n, "problem")
        ))),
    }
}

/// A saved snapshot's numbers as metrics for `--metrics-file`, labelled by source (and disk).
fn record_metrics(snap: &crate::format::snapshot::Snapshot) {
    use crate::metrics::gauge;
    let src = [("source", snap.source.as_str())];
    let s = &snap.summary;
    let time = snap.unix_time();
    gauge(
        "diskvault_backup_snapshot_timestamp_seconds",
        "Time of the snapshot this run saved (Unix time).",
        &src,
        time,
    );
    gauge(
        "diskvault_backup_duration_seconds",
        "Wall time of the backup of the source.",
        &src,
        s.duration_ms as f64 / 1e3,
    );
    gauge("diskvault_backup_bytes_read", "Bytes read from the source's disks.", &src, s.bytes_read as f64);
    gauge("diskvault_backup_bytes_added", "Bytes the backup added to the repository.", &src, s.bytes_added as f64);
    for d in &snap.disks {
        let l = [("source", snap.source.as_str()), ("disk", d.name.as_str())];
        let st = &d.stats;
        gauge("diskvault_backup_disk_capacity_bytes", "Capacity of the disk.", &l, d.capacity as f64);
        gauge("diskvault_backup_disk_bytes_read", "Bytes read from the disk.", &l, st.bytes_read as f64);
        gauge("diskvault_backup_disk_blocks_read", "Blocks read from the disk.", &l, st.blocks_read as f64);
        let unchanged = st.blocks_inherited as f64;
        gauge("diskvault_backup_disk_blocks_unchanged", "Blocks taken from the parent without reading.", &l, unchanged);
        gauge("diskvault_backup_disk_zero_blocks", "Blocks that are all zeros.", &l, st.zero_blocks as f64);
        gauge("diskvault_backup_disk_new_blocks", "Blocks the repository did not hold yet.", &l, st.new_blocks as f64);
        let stored = st.new_bytes_stored as f64;
        gauge("diskvault_backup_disk_new_bytes_stored", "Bytes stored for the new blocks.", &l, stored);
    }
}

/// How each disk of a VMware backup was read, as metrics: a disk read whole although it had a parent means CBT
/// was reset, off, or failed `--verify-cbt`, something to alert on when it keeps happening.
fn record_vm_metrics(source: &str, disks: &[crate::vmware::DiskReport]) {
    use crate::metrics::gauge;
    for d in disks {
        let l = [("source", source), ("disk", d.name.as_str())];
        let incremental = if d.mode == "incremental" { 1.0 } else { 0.0 };
        gauge(
            "diskvault_backup_disk_incremental",
            "1 if only the areas CBT reported changed were read.",
            &l,
            incremental,
        );
        let fallback = if d.reason.is_some() { 1.0 } else { 0.0 };
        gauge(
            "diskvault_backup_disk_full_read_fallback",
            "1 if the disk was read whole although an earlier backup could have been the base (CBT reset, off, \
             resized or failed --verify-cbt).",
            &l,
            fallback,
        );
        let resumed = if d.mode == "resumed" { 1.0 } else { 0.0 };
        gauge(
            "diskvault_backup_disk_resumed",
            "1 if the disk continued an interrupted backup from its checkpoint.",
            &l,
            resumed,
        );
    }
}

/// Prints what a backup did (JSON with --json); `vm` adds how each VMware disk was read.
fn print_result(
    args: &BackupArgs,
    repo: &crate::repository::Repository,
    id: &crate::format::ObjectId,
    snap: &crate::format::snapshot::Snapshot,
    vm: Option<&[crate::vmware::DiskReport]>,
) -> Result<()> {
    record_metrics(snap);
    if args.json {
        let v = result_json(repo, id, snap, vm);
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON of plain values"));
        return Ok(());
    }
    print_text(repo, id, snap)
}

/// The JSON `backup --json` prints for one snapshot.
fn result_json(
    repo: &crate::repository::Repository,
    id: &crate::format::ObjectId,
    snap: &crate::format::snapshot::Snapshot,
    vm: Option<&[crate::vmware::DiskReport]>,
) -> serde_json::Value {
    let retries = repo.backend().retries();
    {
        let v = serde_json::json!({
            "snapshot": id.hex(),
            "retries": retries,
            "source": snap.source,
            "parent": snap.parent.map(|p| p.hex()),
            "duration_ms": snap.summary.duration_ms,
            "bytes_read": snap.summary.bytes_read,
            "bytes_added": snap.summary.bytes_added,
            "new_blobs": snap.summary.new_blobs,
            "vmware_disks": vm,
            "disks": snap.disks.iter().map(|d| serde_json::json!({
                "name": d.name,
                "capacity": d.capacity,
                "bytes_read": d.stats.bytes_read,
                "blocks_read": d.stats.blocks_read,
                "blocks_inherited": d.stats.blocks_inherited,
                "zero_blocks": d.stats.zero_blocks,
                "new_blocks": d.stats.new_blocks,
                "new_bytes_stored": d.stats.new_bytes_stored,
            })).collect::<Vec<_>>(),
        });
        v
    }
}

/// The text summary of one snapshot.
fn print_text(
    repo: &crate::repository::Repository,
    id: &crate::format::ObjectId,
    snap: &crate::format::snapshot::Snapshot,
) -> Result<()> {
    let retries = repo.backend().retries();
    let secs = snap.summary.duration_ms as f64 / 1000.0;
    println!(
        "snapshot {} saved (source {}, {})",
        id.short(),
        snap.source,
        crate::util::count(snap.disks.len(), "disk")
    );
    if let Some(p) = snap.parent {
        println!("  parent {}", p.short());
    }
    for d in &snap.disks {
        println!(
            "  {}: {} disk, read {} ({} blocks), {} blocks unchanged, {} zero, {} new blocks stored in {}",
            d.name,
            human_bytes(d.capacity),
            human_bytes(d.stats.bytes_read),
            d.stats.blocks_read,
            d.stats.blocks_inherited,
            d.stats.zero_blocks,
            d.stats.new_blocks,
            human_bytes(d.stats.new_bytes_stored)
        );
    }
    println!(
        "  read {} in {:.1} s ({}/s), added {} to the repository",
        human_bytes(snap.summary.bytes_read),
        secs,
        human_bytes((snap.summary.bytes_read as f64 / secs.max(0.001)) as u64),
        human_bytes(snap.summary.bytes_added)
    );
    if retries > 0 {
        println!("  {retries} storage requests failed at first and succeeded when retried");
    }
    Ok(())
}

fn run_vms(g: &Globals, args: &BackupArgs) -> Result<()> {
    let libdir = args
        .vddk_libdir
        .clone()
        .ok_or_else(|| Error::invalid("backing up a VM reads its disks with the VDDK: give --vddk-libdir DIR"))?;
    crate::vddk::ensure_loader_path(&libdir)?;
    let repo = g.open_repo()?;
    let cache = g.open_cache_unsynced(&repo)?;
    let password = args.vsphere.password()?;
    // Where each VM runs decides what may run at once.
    let mut probe = args.vsphere.connect_with(&password)?;
    let vms = select_vms(&mut probe, args);
    probe.logout();
    let vms = vms?;
    let vm_opts = crate::vmware::VmBackupOptions {
        libdir,
        quiesce: args.quiesce,
        transports: args.transport.clone(),
        user: args.vsphere.user()?.to_string(),
        verify_cbt_fraction: args.verify_cbt,
        checkpoint_interval: std::time::Duration::from_secs(args.checkpoint_interval),
        resume: !args.no_resume,
        exclude_disks: args.exclude_disks.clone(),
    };
    let limiter = HostLimiter::new(args.max_disks_per_host as usize);
    let counters = Arc::new(Counters::default());
    let results: Vec<Result<crate::vmware::VmBackup>> = {
        let _reporter = Reporter::start("backup", counters.clone(), g.progress);
        std::thread::scope(|s| {
            let handles: Vec<_> = vms
                .iter()
                .map(|info| {
                    let (repo, cache, counters, limiter, vm_opts, password) =
                        (&repo, cache.clone(), &counters, &limiter, &vm_opts, &password);
                    s.spawn(move || {
                        let _slot = limiter.acquire(&info.host, info.disks.len());
                        let mut client = args.vsphere.connect_with(password)?;
                        let mut opts = BackupOptions::new(info.name.as_str());
                        opts.tags = args.tags.clone();
                        if let Some(h) = &args.host {
                            opts.hostname = h.clone();
                        }
                        opts.uploaders = args.upload_concurrency as usize;
                        opts.time_override = args.time.map(|t| (t, 0));
                        opts.delta = !args.no_delta;
                        let r =
                            crate::vmware::backup_vm(&mut client, repo, cache, &info.moref, vm_opts, opts, counters);
                        client.logout();
                        r
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|_| Err(Error::invalid("a VM backup thread panicked"))))
                .collect()
        })
    };
    let mut first_error = None;
    let mut json = Vec::new();
    let mut saved = Vec::new();
    for (info, result) in vms.iter().zip(results) {
        match result {
            Ok(b) => {
                saved.push((b.id, b.snapshot.clone()));
                record_metrics(&b.snapshot);
                record_vm_metrics(&b.snapshot.source, &b.disks);
                crate::metrics::gauge(
                    "diskvault_backup_abandoned_vm_snapshots_removed",
                    "VM snapshots of earlier backups that died, removed by this one.",
                    &[("source", b.snapshot.source.as_str())],
                    b.removed_vm_snapshots.len() as f64,
                );
                if args.json {
                    let mut v = result_json(&repo, &b.id, &b.snapshot, Some(&b.disks));
                    v["removed_vm_snapshots"] = serde_json::json!(b.removed_vm_snapshots);
                    v["skipped_disks"] = serde_json::json!(b.skipped_disks);
                    json.push(v);
                    continue;
                }
                println!("VM {} ({}):", info.name, info.moref);
                for s in &b.removed_vm_snapshots {
                    println!("  removed VM snapshot {s:?} left by a backup that did not finish");
                }
                for d in &b.disks {
                    println!(
                        "  {}: {} read over {}{}",
                        d.name,
                        d.mode,
                        d.transport,
                        d.reason.as_ref().map(|r| format!(" ({r})")).unwrap_or_default()
                    );
                    if let Some(from) = &d.resumed_from {
                        println!("    {from}");
                    }
                }
                for d in &b.skipped_disks {
                    println!("  {} ({}): not backed up: {}", d.name, d.label, d.reason);
                }
                print_text(&repo, &b.id, &b.snapshot)?;
            }
            Err(e) => {
                eprintln!("error: VM {}: {e}", info.name);
                first_error.get_or_insert(e);
            }
        }
    }
    if args.json {
        let out = if json.len() == 1 && args.vm.len() == 1 && args.vm_folder.is_empty() && args.vm_tag.is_empty() {
            json.remove(0)
        } else {
            serde_json::Value::Array(json)
        };
        println!("{}", serde_json::to_string_pretty(&out).expect("JSON of plain values"));
    }
    // The VMs backed up are verified even if another failed; that failure is the one reported.
    let verified = verify_new(g, args, &repo, &cache, saved);
    match first_error {
        Some(e) => Err(e),
        None => verified,
    }
}

/// The VMs a run backs up: those named (--vm), then those in the folders (--vm-folder, recursively) but the
/// excluded ones (--exclude-vm) and templates (which cannot be snapshotted), each once.
fn select_vms(client: &mut crate::vsphere::Client, args: &BackupArgs) -> Result<Vec<crate::vsphere::VmInfo>> {
    let mut vms: Vec<crate::vsphere::VmInfo> = Vec::new();
    for name in &args.vm {
        vms.push(client.find_vm(name)?);
    }
    // Adds the VMs of a folder or tag (`from`), but not templates, excluded VMs or VMs already selected.
    let add = |vms: &mut Vec<crate::vsphere::VmInfo>, found: Vec<crate::vsphere::VmInfo>, from: &str| {
        let mut added = 0;
        for vm in found {
            let excluded = args.exclude_vm.iter().any(|x| *x == vm.name || *x == vm.moref);
            if vm.template {
                tracing::warn!("VM {} of {from} is a template: left out", vm.name);
            } else if !excluded && !vms.iter().any(|v| v.moref == vm.moref) {
                vms.push(vm);
                added += 1;
            }
        }
        tracing::info!("{from}: {added} VMs to back up");
    };
    for path in &args.vm_folder {
        let folder = client.resolve(path, &["Folder"], "folder")?;
        let found = client.virtual_machines_in(&folder)?;
        add(&mut vms, found, path);
    }
    if !args.vm_tag.is_empty() {
        let all = client.virtual_machines()?;
        for (tag, tagged) in args.vm_tag.iter().zip(client.vms_with_tags(&args.vm_tag)?) {
            let found: Vec<_> = all.iter().filter(|vm| tagged.contains(&vm.moref)).cloned().collect();
            if found.is_empty() {
                tracing::warn!("no VM carries the tag {tag:?}");
            }
            add(&mut vms, found, &format!("tag {tag}"));
        }
    }
    for x in &args.exclude_vm {
        if !vms.iter().any(|v| v.name == *x || v.moref == *x) && client.find_vm(x).is_err() {
            return Err(Error::invalid(format!("--exclude-vm {x}: no virtual machine of that name")));
        }
    }
    if vms.is_empty() {
        let tags = args.vm_tag.iter().map(|t| format!("tag {t}"));
        let from: Vec<String> = args.vm_folder.iter().cloned().chain(tags).collect();
        return Err(Error::invalid(format!("no VM to back up in {}", from.join(", "))));
    }
    Ok(vms)
}

/// Bounds the disks read at once per ESXi host. A VM with more disks than the bound runs alone.
struct HostLimiter {
    max: usize,
    busy: std::sync::Mutex<std::collections::HashMap<String, usize>>,
    freed: std::sync::Condvar,
}

struct HostSlot<'a> {
    limiter: &'a HostLimiter,
    host: String,
    disks: usize,
}

impl HostLimiter {
    fn new(max: usize) -> HostLimiter {
        HostLimiter { max: max.max(1), busy: Default::default(), freed: std::sync::Condvar::new() }
    }

    fn acquire(&self, host: &str, disks: usize) -> HostSlot<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let now = busy.get(host).copied().unwrap_or(0);
            if now == 0 || now + disks <= self.max {
                *busy.entry(host.to_string()).or_default() += disks;
                return HostSlot { limiter: self, host: host.to_string(), disks };
            }
            busy = self.freed.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
    }
}

impl Drop for HostSlot<'_> {
    fn drop(&mut self) {
        let mut busy = self.limiter.busy.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = busy.get_mut(&self.host) {
            *n -= self.disks;
        }
        drop(busy);
        self.limiter.freed.notify_all();
    }
}
