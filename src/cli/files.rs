//! `diskvault ls`, `find`, `dump` and `extract`: files inside a snapshot's disk (file-level restore, see
//! [`crate::guestfs`]).

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use super::{FilterArgs, Globals};
use crate::error::{Error, Result};
use crate::format::snapshot::DiskManifest;
use crate::format::ObjectId;
use crate::guestfs::extract::extract;
use crate::guestfs::find::NameMatcher;
use crate::guestfs::{split_path, CopyStats, Entry, EntryKind, FsKind, GuestDisk, GuestFs, Volume};
use crate::nbd::server::Device;
use crate::progress::{Counters, Reporter};
use crate::repository::Repository;
use crate::serve::RepositoryExports;
use crate::util::{count, format_utc, human_bytes};

#[derive(clap::Args, Debug)]
pub struct GuestArgs {
    /// The snapshot: id, unique prefix, or `latest`; with the disk as `ID:DISK` when it has several.
    snapshot: String,
    /// The disk, when the snapshot has several (as `ID:DISK`).
    #[arg(long)]
    disk: Option<String>,
    /// With `latest`: the latest snapshot of this source.
    #[arg(long)]
    name: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct LsArgs {
    #[command(flatten)]
    at: GuestArgs,
    /// A guest path, volume first: `/part2/etc`, or `/whole/…` for a disk without a partition table. `/` (the
    /// default) lists the disk's volumes.
    #[arg(default_value = "/")]
    path: String,
    /// Type, permissions, owner, size and modification time of each entry.
    #[arg(short, long)]
    long: bool,
    /// Everything below the directory, not only its entries.
    #[arg(short = 'R', long)]
    recursive: bool,
    /// Print JSON: the volumes with their table, or the entries with their metadata.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct DumpArgs {
    #[command(flatten)]
    at: GuestArgs,
    /// A file (`/part2/etc/fstab`; a symlink is followed within the guest) for its contents, a directory
    /// (`/part2/etc`) for a tar archive of it, or a volume (`/part2`) for its raw bytes.
    path: String,
    /// Write a tar archive whatever the path is: of a file, or of a volume's whole file system.
    #[arg(long)]
    tar: bool,
}

#[derive(clap::Args, Debug)]
pub struct ExtractArgs {
    #[command(flatten)]
    at: GuestArgs,
    /// Guest paths of files or directories (`/part2/etc/nginx`); `/part2` extracts the whole file system.
    #[arg(required = true)]
    paths: Vec<String>,
    /// The local directory to extract into (created if missing); nothing in it is replaced.
    #[arg(long)]
    target: PathBuf,
    /// Print what was extracted as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(clap::Args, Debug)]
pub struct FindArgs {
    /// Shell globs (`*`, `?`, `[a-z]`, `**`): without a `/` matched against names in any directory (`nginx.conf`,
    /// `*.pem`), with one against the whole guest path, volume first (`/part2/etc/nginx/*`, `/part*/home/**/id_rsa`).
    #[arg(required = true, value_name = "PATTERN")]
    patterns: Vec<String>,
    /// Search these snapshots (id, unique prefix, or `latest` of the filters; repeatable) instead of every
    /// snapshot the filters select.
    #[arg(long = "snapshot", value_name = "ID")]
    snapshots: Vec<String>,
    #[command(flatten)]
    filter: FilterArgs,
    /// Only this disk of each snapshot.
    #[arg(long)]
    disk: Option<String>,
    /// Search only below this guest path, volume first (`/part2/home`); default: every volume whose files
    /// diskvault reads.
    #[arg(long)]
    path: Option<String>,
    /// Match names ignoring case (on NTFS volumes always, as Windows does).
    #[arg(short = 'i', long)]
    ignore_case: bool,
    /// Only entries modified at or after this time (`2026-11-30`, `2026-11-30 18:00`; UTC).
    #[arg(long, value_name = "TIME", value_parser = super::parse_time)]
    newer: Option<i64>,
    /// Only entries modified before this time.
    #[arg(long, value_name = "TIME", value_parser = super::parse_time)]
    older: Option<i64>,
    /// Type, permissions, owner, size and modification time of each match, as `ls --long`.
    #[arg(short, long)]
    long: bool,
    /// Print JSON: per snapshot disk with matches, its entries.
    #[arg(long)]
    json: bool,
}

/// A snapshot disk opened for its files. The session marker keeps a concurrent prune from moving what the
/// reads need.
struct Opened {
    guest: GuestDisk,
    _session: crate::lock::LockGuard,
}

fn open(g: &Globals, at: &GuestArgs) -> Result<Opened> {
    let (snap_ref, disk_in_ref) = match at.snapshot.split_once(':') {
        Some((s, d)) => (s, Some(d)),
        None => (at.snapshot.as_str(), None),
    };
    let repo = g.open_repo()?;
    let (id, snap) = repo.find_snapshot(snap_ref, at.name.as_deref())?;
    let disk = super::choose_disk(&id, &snap, at.disk.as_deref().or(disk_in_ref))?;
    let (exports, session) = file_exports(g, repo)?;
    let device: Arc<dyn Device> = Arc::new(exports.disk(&id, disk, crate::serve::DEFAULT_READAHEAD_BLOCKS)?);
    Ok(Opened { guest: GuestDisk::open(device)?, _session: session })
}

/// The repository's snapshot disks, for reading their files, under a session marker (the guard).
pub(super) fn file_exports(g: &Globals, repo: Repository) -> Result<(RepositoryExports, crate::lock::LockGuard)> {
    let cache = g.open_cache_unsynced(&repo)?;
    let session = crate::lock::start_session(&repo, "file restore")?;
    cache.sync(&repo)?;
    let exports = RepositoryExports::new(
        repo,
        cache,
        crate::serve::ServeOptions {
            cache_bytes: 64 << 20,
            session_lost: Some(session.lost_flag()),
            ..Default::default()
        },
    );
    Ok((exports, session))
}

/// The file system of the volume a guest path starts with, and the path within it.
fn fs_of(guest: &GuestDisk, path: &str) -> Result<Option<(GuestFs, String)>> {
    match split_path(path)? {
        None => Ok(None),
        Some((volume, inner)) => Ok(Some((guest.fs(guest.volume(volume)?)?, inner))),
    }
}

pub fn ls(g: &Globals, args: &LsArgs) -> Result<()> {
    let opened = open(g, &args.at)?;
    let guest = &opened.guest;
    let Some((fs, inner)) = fs_of(guest, &args.path)? else {
        return print_volumes(guest, args.json);
    };
    let top = fs.entry(inner.as_bytes())?;
    let mut entries = Vec::new();
    let mut unlisted = Vec::new();
    if top.kind == EntryKind::Dir {
        if args.recursive {
            unlisted = fs.walk(inner.as_bytes(), &mut |_, e| {
                entries.push(e.clone());
                Ok(())
            })?;
        } else {
            let (listed, unreadable) = fs.read_dir(inner.as_bytes())?;
            entries.extend(listed.into_iter().map(|(_, e)| e));
            unlisted = unreadable;
        }
    } else {
        entries.push(top);
    }
    let mut out = std::io::stdout().lock();
    let print = |out: &mut dyn Write| -> std::io::Result<()> {
        if args.json {
            serde_json::to_writer_pretty(&mut *out, &entries)?;
            return writeln!(out);
        }
        for e in &entries {
            if args.long {
                writeln!(out, "{}", long_line(e))?;
            } else {
                writeln!(out, "{}", e.path)?;
            }
        }
        Ok(())
    };
    print(&mut out).map_err(|e| Error::local("standard output", e))?;
    for u in &unlisted {
        eprintln!("not listed: {u}");
    }
    if !unlisted.is_empty() {
        return Err(Error::Incomplete(format!("{} could not be listed", count(unlisted.len(), "place"))));
    }
    Ok(())
}

fn print_volumes(guest: &GuestDisk, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let print = |out: &mut dyn Write| -> std::io::Result<()> {
        if json {
            let doc = serde_json::json!({ "table": guest.table, "volumes": guest.volumes });
            serde_json::to_writer_pretty(&mut *out, &doc)?;
            return writeln!(out);
        }
        let table = match guest.table {
            Some(crate::guestfs::partitions::TableKind::Gpt) => "GPT",
            Some(crate::guestfs::partitions::TableKind::Mbr) => "MBR",
            None => "no partition table",
        };
        writeln!(out, "{table}")?;
        let width = guest.volumes.iter().map(|v| v.name.len() + 1).max().unwrap_or(0).max(7);
        writeln!(out, "{:<width$} {:>10} {:>10}  {:<22} {:<9} LABEL", "VOLUME", "START", "SIZE", "TYPE", "FS")?;
        for v in &guest.volumes {
            let note = match (&v.unreadable, v.fs) {
                (Some(why), _) => format!(" (not readable: {why})"),
                (None, FsKind::Lvm) => " (its logical volumes follow)".to_string(),
                (None, fs) if !fs.readable() => " (files not read here; dump gives its bytes)".to_string(),
                _ => String::new(),
            };
            writeln!(
                out,
                "{:<width$} {:>10} {:>10}  {:<22} {:<9} {}{note}",
                format!("/{}", v.name),
                human_bytes(v.start),
                human_bytes(v.len),
                v.partition_type,
                v.fs.name(),
                v.label
            )?;
        }
        Ok(())
    };
    print(&mut out).map_err(|e| Error::local("standard output", e))
}

/// An entry as `ls -l` shows it.
fn long_line(e: &Entry) -> String {
    let target = e.target.as_deref().map(|t| format!(" -> {t}")).unwrap_or_default();
    format!("{} {:>6} {:>6} {:>12} {} {}{target}", mode_string(e), e.uid, e.gid, e.size, format_utc(e.mtime), e.path)
}

/// The matches of one snapshot disk.
#[derive(serde::Serialize)]
struct Found {
    snapshot: String,
    disk: String,
    source: String,
    time: String,
    entries: Vec<Entry>,
}

/// What a search of one snapshot disk found.
#[derive(Clone, Default)]
struct DiskSearch {
    entries: Vec<Entry>,
    /// Whether its volumes could be read at all.
    opened: bool,
    /// Volumes (or the `--path`) it does not have.
    absent: usize,
    /// What could not be searched, each as `: cause` or ` /volume…: cause` to follow the disk's name.
    problems: Vec<String>,
    /// The volumes searched without a problem, each with what it found: the same volume of a later snapshot
    /// that holds the same bytes is not searched again.
    clean_volumes: Vec<(Volume, Vec<Entry>)>,
}

/// A disk's last search in a `find`, with what identifies its blocks.
struct LastSearch {
    /// Its capacity and segments: equal, the disks hold the same blocks.
    disk: DiskManifest,
    /// `ID:DISK` of the snapshot disk searched.
    at: String,
    result: DiskSearch,
}

/// The last search of a disk before this one, and the disk's byte ranges that differ between the two.
struct Earlier<'a> {
    search: &'a LastSearch,
    changed: Vec<crate::source::Extent>,
}

/// Searches the volumes of `disk` of snapshot `id` (only `within`'s, below its path, where given) for what
/// `matcher` selects. Damage is listed in the result; anything else is an error.
fn search_disk(
    exports: &RepositoryExports,
    id: &ObjectId,
    disk: &DiskManifest,
    within: Option<&(&str, String)>,
    matcher: &NameMatcher,
    earlier: Option<&Earlier>,
) -> Result<DiskSearch> {
    let mut result = DiskSearch::default();
    let device: Arc<dyn Device> = Arc::new(exports.disk(id, disk, crate::serve::DEFAULT_READAHEAD_BLOCKS)?);
    let guest = match GuestDisk::open(device) {
        Ok(guest) => guest,
        Err(e) if crate::guestfs::is_damage(&e) => {
            result.problems.push(format!(": {e}"));
            return Ok(result);
        }
        Err(e) => return Err(e),
    };
    result.opened = true;
    let volumes: Vec<(&crate::guestfs::Volume, &str)> = match within {
        Some((volume, inner)) => match guest.volume(volume) {
            Ok(v) => vec![(v, inner.as_str())],
            // Not on this disk (another disk of the snapshot, or an older layout).
            Err(_) => {
                result.absent += 1;
                return Ok(result);
            }
        },
        None => guest.volumes.iter().filter(|v| v.fs.readable()).map(|v| (v, "/")).collect(),
    };
    for (volume, inner) in volumes {
        let same = earlier.and_then(|e| {
            let (_, found) = e
                .search
                .result
                .clean_volumes
                .iter()
                .find(|(v, _)| v.name == volume.name && volume.unchanged_since(v, &e.changed))?;
            Some((e, found))
        });
        if let Some((e, found)) = same {
            tracing::info!("/{}: the same blocks as in {}, not searched again", volume.name, e.search.at);
            result.entries.extend(found.iter().cloned());
            result.clean_volumes.push((volume.clone(), found.clone()));
            continue;
        }
        let (entries_before, problems_before, absent_before) =
            (result.entries.len(), result.problems.len(), result.absent);
        // Windows finds NTFS names whatever their case; so does a search of them.
        let ntfs;
        let matcher = if volume.fs == FsKind::Ntfs {
            ntfs = matcher.ignoring_case();
            &ntfs
        } else {
            matcher
        };
        let searched = guest.fs(volume).and_then(|fs| {
            // Not there (created later, or deleted): absent. Unreadable on the way there: not searched, below.
            if within.is_some() && fs.entry(inner.as_bytes()).is_err_and(|e| matches!(e, Error::NotFound(_))) {
                result.absent += 1;
                return Ok(Vec::new());
            }
            matcher.search(&fs, inner.as_bytes(), &mut |e| {
                result.entries.push(e.clone());
                Ok(())
            })
        });
        match searched {
            Ok(unentered) => result.problems.extend(unentered.into_iter().map(|u| format!(" {u}"))),
            Err(e) if crate::guestfs::is_damage(&e) => result.problems.push(format!(" /{}: {e}", volume.name)),
            Err(e) => return Err(e),
        }
        if (result.problems.len(), result.absent) == (problems_before, absent_before) {
            result.clean_volumes.push((volume.clone(), result.entries[entries_before..].to_vec()));
        }
    }
    Ok(result)
}

pub fn find(g: &Globals, args: &FindArgs) -> Result<()> {
    let matcher = NameMatcher::new(&args.patterns, args.ignore_case)?.modified_within(args.newer, args.older);
    let within = args.path.as_deref().map(split_path).transpose()?.flatten();
    let repo = g.open_repo()?;
    let filter = args.filter.filter();
    // Newest first: the question is usually the latest backup that still had a file.
    let snapshots = if args.snapshots.is_empty() {
        repo.list_snapshots_matching(&filter)?.into_iter().rev().collect()
    } else {
        args.snapshots.iter().map(|s| repo.find_snapshot_matching(s, &filter)).collect::<Result<Vec<_>>>()?
    };
    let (exports, _session) = file_exports(g, repo)?;
    let mut out = std::io::stdout().lock();
    let mut found_all = Vec::new();
    let (mut matches, mut disks_searched, mut path_absent) = (0usize, 0usize, 0usize);
    // `ID:DISK` (and the volume or path) that could not be searched, with the cause; the rest goes on.
    let mut not_searched: Vec<String> = Vec::new();
    // The last search of each disk, with its blocks (capacity and segments): a disk that did not change from
    // one snapshot to the next (an idle data disk, whose CBT reported nothing) is walked once, and so is a
    // volume none of whose bytes changed (a boot partition, a data volume beside a busy system one). Only the
    // last: every result kept would be every file of every snapshot in memory.
    let mut last: HashMap<String, LastSearch> = HashMap::new();
    for (id, snap) in &snapshots {
        for disk in snap.disks.iter().filter(|d| args.disk.as_deref().is_none_or(|n| n == d.name)) {
            let at = format!("{}:{}", id.short(), disk.name);
            let result = match last.get(&disk.name) {
                Some(earlier)
                    if (earlier.disk.capacity, &earlier.disk.segments) == (disk.capacity, &disk.segments)
                        && earlier.result.problems.is_empty() =>
                {
                    tracing::info!("{at}: the same blocks as {}, not searched again", earlier.at);
                    earlier.result.clone()
                }
                Some(earlier) => {
                    // Unreadable segments (or another block size): the volumes are searched whatever they hold.
                    let changed =
                        crate::diff::diff_disk(exports.repository(), exports.index_cache(), &earlier.disk, disk)
                            .unwrap_or_else(|e| {
                                tracing::debug!("{at}: not compared with {}: {e}", earlier.at);
                                None
                            });
                    let earlier = changed.map(|d| Earlier { search: earlier, changed: d.extents });
                    search_disk(&exports, id, disk, within.as_ref(), &matcher, earlier.as_ref())?
                }
                None => search_disk(&exports, id, disk, within.as_ref(), &matcher, None)?,
            };
            not_searched.extend(result.problems.iter().map(|p| format!("{at}{p}")));
            path_absent += result.absent;
            disks_searched += usize::from(result.opened);
            let found = Found {
                snapshot: id.hex(),
                disk: disk.name.clone(),
                source: snap.source.clone(),
                time: format_utc(snap.time_secs),
                entries: result.entries.clone(),
            };
            last.insert(disk.name.clone(), LastSearch { disk: disk.clone(), at: at.clone(), result });
            if found.entries.is_empty() {
                continue;
            }
            matches += found.entries.len();
            if args.json {
                found_all.push(found);
                continue;
            }
            let print = |out: &mut dyn Write| -> std::io::Result<()> {
                writeln!(out, "{at} ({}, {}):", found.source, found.time)?;
                for e in &found.entries {
                    writeln!(out, "  {}", if args.long { long_line(e) } else { e.path.clone() })?;
                }
                out.flush()
            };
            print(&mut out).map_err(|e| Error::local("standard output", e))?;
        }
    }
    let summary = |out: &mut dyn Write| -> std::io::Result<()> {
        if args.json {
            serde_json::to_writer_pretty(&mut *out, &found_all)?;
            return writeln!(out);
        }
        let absent = match (path_absent, &args.path) {
            (0, _) | (_, None) => String::new(),
            (n, Some(p)) => format!("; {p} is absent from {n} of them"),
        };
        writeln!(
            out,
            "{} in {} of {}{absent}",
            if matches == 1 { "1 match".to_string() } else { format!("{matches} matches") },
            count(disks_searched, "disk"),
            count(snapshots.len(), "snapshot")
        )
    };
    summary(&mut out).map_err(|e| Error::local("standard output", e))?;
    for n in &not_searched {
        eprintln!("not searched: {n}");
    }
    if !not_searched.is_empty() {
        return Err(Error::Incomplete(format!("{} could not be searched", count(not_searched.len(), "place"))));
    }
    Ok(())
}

/// `drwxr-xr-x` as `ls -l` shows it.
fn mode_string(e: &Entry) -> String {
    let kind = match e.kind {
        EntryKind::File => '-',
        EntryKind::Dir => 'd',
        EntryKind::Symlink => 'l',
        EntryKind::BlockDevice => 'b',
        EntryKind::CharDevice => 'c',
        EntryKind::Fifo => 'p',
        EntryKind::Socket => 's',
    };
    let m = e.mode;
    let bit = |mask: u16, c: char| if m & mask != 0 { c } else { '-' };
    // The execute slot shows setuid, setgid and sticky: lower case with execute, upper case without.
    let exec = |x: u16, special: u16, c: char| match (m & x != 0, m & special != 0) {
        (true, true) => c,
        (false, true) => c.to_ascii_uppercase(),
        (true, false) => 'x',
        (false, false) => '-',
    };
    [
        kind,
        bit(0o400, 'r'),
        bit(0o200, 'w'),
        exec(0o100, 0o4000, 's'),
        bit(0o040, 'r'),
        bit(0o020, 'w'),
        exec(0o010, 0o2000, 's'),
        bit(0o004, 'r'),
        bit(0o002, 'w'),
        exec(0o001, 0o1000, 't'),
    ]
    .iter()
    .collect()
}

pub fn dump(g: &Globals, args: &DumpArgs) -> Result<()> {
    {
        use std::io::IsTerminal;
        if std::io::stdout().is_terminal() {
            return Err(Error::invalid("standard output is a terminal; redirect or pipe it"));
        }
    }
    crate::util::catch_interrupts();
    let opened = open(g, &args.at)?;
    let guest = &opened.guest;
    let mut out = std::io::BufWriter::with_capacity(1 << 20, std::io::stdout().lock());
    let Some((volume, inner)) = split_path(&args.path)? else {
        return Err(Error::invalid("dump needs a file, a directory, or a volume such as /part1 (see `ls`)"));
    };
    if inner == "/" && !args.tar {
        guest.dump_volume(guest.volume(volume)?, &mut out)?;
        return out.flush().map_err(|e| Error::local("standard output", e));
    }
    let fs = guest.fs(guest.volume(volume)?)?;
    if !args.tar && fs.entry(inner.as_bytes())?.kind != EntryKind::Dir {
        fs.read_file(inner.as_bytes(), &mut |_, data| {
            out.write_all(data).map_err(|e| Error::local("standard output", e))
        })?;
        return out.flush().map_err(|e| Error::local("standard output", e));
    }
    let counters = Arc::new(Counters::default());
    let stats = {
        let _r = Reporter::start("dump", counters.clone(), g.progress);
        crate::guestfs::tar::write_tar(&fs, inner.as_bytes(), &mut out, &counters)?
    };
    out.flush().map_err(|e| Error::local("standard output", e))?;
    let report = [(args.path.clone(), stats)];
    print_problems(&report, "not in the archive");
    incomplete(&report)
}

pub fn extract_files(g: &Globals, args: &ExtractArgs) -> Result<()> {
    crate::util::catch_interrupts();
    let opened = open(g, &args.at)?;
    let guest = &opened.guest;
    let counters = Arc::new(Counters::default());
    let mut reports = Vec::new();
    {
        let _r = Reporter::start("extract", counters.clone(), g.progress);
        for path in &args.paths {
            let Some((fs, inner)) = fs_of(guest, path)? else {
                return Err(Error::invalid("extract needs a path in a volume, such as /part2/etc (see `ls`)"));
            };
            let stats = extract(&fs, inner.as_bytes(), &args.target, &counters)?;
            reports.push((path.clone(), stats));
        }
    }
    if args.json {
        let doc: Vec<_> = reports.iter().map(|(p, s)| serde_json::json!({ "path": p, "extracted": s })).collect();
        println!("{}", serde_json::to_string_pretty(&doc).map_err(|e| Error::invalid(e.to_string()))?);
        return incomplete(&reports);
    }
    for (path, s) in &reports {
        let links = if s.hard_links > 0 { format!(", {} of them hard links", s.hard_links) } else { String::new() };
        eprintln!(
            "extracted {path} into {}: {} files ({}{links}), {} directories, {} symlinks",
            args.target.display(),
            s.files,
            human_bytes(s.bytes),
            s.dirs,
            s.symlinks
        );
    }
    print_problems(&reports, "not extracted");
    incomplete(&reports)
}

/// What was left out of a copy, on standard error.
fn print_problems(reports: &[(String, CopyStats)], left_out: &str) {
    for (_, s) in reports {
        if !s.skipped.is_empty() {
            eprintln!("  skipped {} devices, FIFOs and sockets: {}", s.skipped.len(), s.skipped.join(", "));
        }
        for u in &s.unreadable {
            eprintln!("  {left_out}: {u}");
        }
    }
}

/// Exit code 3 (as a partial restore) when files could not be copied.
fn incomplete(reports: &[(String, CopyStats)]) -> Result<()> {
    let left: usize = reports.iter().map(|(_, s)| s.unreadable.len()).sum();
    if left > 0 {
        return Err(Error::Incomplete(format!("{left} files or directories could not be copied (see the report)")));
    }
    Ok(())
}
