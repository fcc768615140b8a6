//! `diskvault ls`, `dump` and `extract`: files inside a snapshot's disk (file-level restore, see
//! [`crate::guestfs`]).

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use super::Globals;
use crate::error::{Error, Result};
use crate::guestfs::extract::extract;
use crate::guestfs::{split_path, CopyStats, Entry, EntryKind, FsKind, GuestDisk, GuestFs};
use crate::nbd::server::Device;
use crate::progress::{Counters, Reporter};
use crate::util::{format_utc, human_bytes};

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
    let cache = g.open_cache_unsynced(&repo)?;
    let session = crate::lock::start_session(&repo, "file restore")?;
    cache.sync(&repo)?;
    let exports = crate::serve::RepositoryExports::new(
        repo,
        cache,
        crate::serve::ServeOptions {
            cache_bytes: 64 << 20,
            session_lost: Some(session.lost_flag()),
            ..Default::default()
        },
    );
    let device: Arc<dyn Device> = Arc::new(exports.disk(&id, disk, crate::serve::DEFAULT_READAHEAD_BLOCKS)?);
    Ok(Opened { guest: GuestDisk::open(device)?, _session: session })
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
            entries.extend(fs.read_dir(inner.as_bytes())?.into_iter().map(|(_, e)| e));
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
                let target = e.target.as_deref().map(|t| format!(" -> {t}")).unwrap_or_default();
                writeln!(
                    out,
                    "{} {:>6} {:>6} {:>12} {} {}{target}",
                    mode_string(e),
                    e.uid,
                    e.gid,
                    e.size,
                    format_utc(e.mtime),
                    e.path
                )?;
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
        return Err(Error::Incomplete(format!("{} directories could not be listed", unlisted.len())));
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
