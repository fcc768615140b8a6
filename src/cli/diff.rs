//! `diskvault diff`.

use std::sync::Arc;

use super::Globals;
use crate::diff::{diff_disk, DiskDiff};
use crate::error::{Error, Result};
use crate::format::snapshot::{DiskManifest, Snapshot};
use crate::format::ObjectId;
use crate::guestfs::compare::{diff_trees, Change, FileChange};
use crate::guestfs::{is_damage, split_path, GuestDisk};
use crate::nbd::server::Device;
use crate::repository::Repository;
use crate::util::{count, format_utc, human_bytes};

#[derive(clap::Args, Debug)]
pub struct DiffArgs {
    /// The earlier snapshot: id, unique prefix, or `latest`.
    from: String,
    /// The later snapshot.
    to: String,
    /// Only this disk.
    #[arg(long)]
    disk: Option<String>,
    /// With `latest`: the latest snapshot of this source.
    #[arg(long)]
    name: Option<String>,
    /// Print JSON, with every changed byte range (with --files: every changed file).
    #[arg(long)]
    json: bool,
    /// Which files differ, in the disks' file systems (ext2/3/4, XFS, NTFS): added, removed, modified (size or
    /// modification time; a symlink's target), another type, or only permissions and owner.
    #[arg(long)]
    files: bool,
    /// With --files: only below this guest path, volume first (`/part2/etc`).
    #[arg(long, requires = "files")]
    path: Option<String>,
    /// With --files: also read the files whose size and modification time are as they were, in both snapshots,
    /// and report those whose contents differ (a tool or an attacker may set the time back). Reads those files
    /// of every volume that changed: as costly as extracting them twice; narrow it with --path.
    #[arg(long, requires = "files")]
    contents: bool,
}

/// Changed ranges printed per disk in the text output.
const SHOWN_EXTENTS: usize = 10;

enum Outcome {
    Changed(DiskDiff),
    Added(u64),
    Removed(u64),
    /// Block sizes differ: nothing to compare block by block.
    Incomparable,
}

pub fn run(g: &Globals, args: &DiffArgs) -> Result<()> {
    let repo = g.open_repo()?;
    let (a_id, a) = repo.find_snapshot(&args.from, args.name.as_deref())?;
    let (b_id, b) = repo.find_snapshot(&args.to, args.name.as_deref())?;
    if args.files {
        return run_files(g, args, repo, (a_id, a), (b_id, b));
    }
    let cache = g.open_cache_unsynced(&repo)?;
    // Segments are read: a prune meanwhile keeps the packs holding them.
    let session = crate::lock::start_session(&repo, "diff")?;
    cache.sync(&repo)?;
    let names = disk_names(&a, &b, args.disk.as_deref())?;
    let mut out = Vec::new();
    for name in names {
        let outcome = match (a.disk(name), b.disk(name)) {
            (Some(old), Some(new)) => match diff_disk(&repo, &cache, old, new)? {
                Some(d) => Outcome::Changed(d),
                None => Outcome::Incomparable,
            },
            (None, Some(new)) => Outcome::Added(new.capacity),
            (Some(old), None) => Outcome::Removed(old.capacity),
            (None, None) => unreachable!("names come from the snapshots"),
        };
        out.push((name.to_string(), outcome));
    }
    session.ensure_held()?;
    drop(session);

    if args.json {
        let disks: Vec<serde_json::Value> = out
            .iter()
            .map(|(name, o)| match o {
                Outcome::Changed(d) => serde_json::json!({
                    "name": name,
                    "status": if d.changed_blocks() == 0 && d.old_capacity == d.new_capacity { "unchanged" } else { "changed" },
                    "old_capacity": d.old_capacity,
                    "new_capacity": d.new_capacity,
                    "block_size": d.block_size,
                    "changed_blocks": d.changed_blocks(),
                    "changed_bytes": d.changed_bytes(),
                    "allocated_blocks": d.allocated_blocks,
                    "zeroed_blocks": d.zeroed_blocks,
                    "rewritten_blocks": d.rewritten_blocks,
                    "extents": d.extents,
                }),
                Outcome::Added(c) => serde_json::json!({"name": name, "status": "added", "new_capacity": c}),
                Outcome::Removed(c) => serde_json::json!({"name": name, "status": "removed", "old_capacity": c}),
                Outcome::Incomparable => serde_json::json!({"name": name, "status": "block size differs"}),
            })
            .collect();
        let v = serde_json::json!({"from": a_id.hex(), "to": b_id.hex(), "disks": disks});
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON of plain values"));
        return Ok(());
    }
    print_header((&a_id, &a), (&b_id, &b));
    for (name, o) in &out {
        match o {
            Outcome::Added(c) => println!("{name}: added ({})", human_bytes(*c)),
            Outcome::Removed(c) => println!("{name}: removed ({})", human_bytes(*c)),
            Outcome::Incomparable => println!("{name}: block sizes differ, not compared"),
            Outcome::Changed(d) => {
                if d.old_capacity != d.new_capacity {
                    println!("{name}: resized from {} to {}", human_bytes(d.old_capacity), human_bytes(d.new_capacity));
                }
                if d.changed_blocks() == 0 {
                    println!("{name}: unchanged");
                    continue;
                }
                println!(
                    "{name}: {} changed in {} blocks and {} ranges ({} newly allocated, {} zeroed, {} rewritten)",
                    human_bytes(d.changed_bytes()),
                    d.changed_blocks(),
                    d.extents.len(),
                    d.allocated_blocks,
                    d.zeroed_blocks,
                    d.rewritten_blocks
                );
                for e in d.extents.iter().take(SHOWN_EXTENTS) {
                    println!("  bytes {}..{} ({})", e.start, e.end(), human_bytes(e.length));
                }
                if d.extents.len() > SHOWN_EXTENTS {
                    println!("  … {} more ranges (--json lists them all)", d.extents.len() - SHOWN_EXTENTS);
                }
            }
        }
    }
    Ok(())
}

/// `ID (SOURCE at TIME) -> ID (SOURCE at TIME)`.
fn print_header((a_id, a): (&ObjectId, &Snapshot), (b_id, b): (&ObjectId, &Snapshot)) {
    let side = |id: &ObjectId, s: &Snapshot| format!("{} ({} at {})", id.short(), s.source, format_utc(s.time_secs));
    println!("{} -> {}", side(a_id, a), side(b_id, b));
}

/// The disks of either snapshot (the later one's order first), or only `only`.
fn disk_names<'s>(a: &'s Snapshot, b: &'s Snapshot, only: Option<&str>) -> Result<Vec<&'s str>> {
    let mut names: Vec<&str> = b.disks.iter().map(|d| d.name.as_str()).collect();
    names.extend(a.disks.iter().map(|d| d.name.as_str()).filter(|n| b.disk(n).is_none()));
    if let Some(only) = only {
        if !names.contains(&only) {
            return Err(Error::invalid(format!("neither snapshot has a disk {only:?}")));
        }
        names.retain(|n| *n == only);
    }
    Ok(names)
}

/// `diff --files`: the files that differ, disk by disk and volume by volume.
fn run_files(
    g: &Globals,
    args: &DiffArgs,
    repo: Repository,
    (a_id, a): (ObjectId, Snapshot),
    (b_id, b): (ObjectId, Snapshot),
) -> Result<()> {
    let within = args.path.as_deref().map(split_path).transpose()?.flatten();
    let names: Vec<String> = disk_names(&a, &b, args.disk.as_deref())?.into_iter().map(String::from).collect();
    let (exports, _session) = super::files::file_exports(g, repo)?;
    let (repo, cache) = (exports.repository(), exports.index_cache());
    let open = |id: &ObjectId, disk: &DiskManifest| -> Result<GuestDisk> {
        let device: Arc<dyn Device> = Arc::new(exports.disk(id, disk, crate::serve::DEFAULT_READAHEAD_BLOCKS)?);
        GuestDisk::open(device)
    };
    if !args.json {
        print_header((&a_id, &a), (&b_id, &b));
    }
    // What could not be compared (a damaged disk, volume or directory), with the reason.
    let mut not_compared: Vec<String> = Vec::new();
    let mut disks_json = Vec::new();
    for name in &names {
        let (old, new) = (a.disk(name), b.disk(name));
        // The same segments hold the same blocks: nothing in the disk changed.
        let unchanged =
            matches!((old, new), (Some(o), Some(n)) if o.capacity == n.capacity && o.segments == n.segments);
        let mut changes: Vec<FileChange> = Vec::new();
        let mut notes: Vec<String> = Vec::new();
        let mut unchanged_volumes: Vec<String> = Vec::new();
        if old.is_none() || new.is_none() {
            notes.push(if old.is_none() { "disk added".into() } else { "disk removed".into() });
        } else if let (false, Some(old), Some(new)) = (unchanged, old, new) {
            // The disk's byte ranges that differ: a volume with none of them is not walked.
            let changed_ranges = diff_disk(repo, cache, old, new)?.map(|d| d.extents);
            let (old_guest, new_guest) = match open(&a_id, old).and_then(|o| Ok((o, open(&b_id, new)?))) {
                Ok(guests) => guests,
                Err(e) if is_damage(&e) => {
                    not_compared.push(format!("{name}: {e}"));
                    continue;
                }
                Err(e) => return Err(e),
            };
            let volumes: Vec<(String, String)> = match &within {
                Some((volume, inner)) => vec![(volume.to_string(), inner.clone())],
                None => {
                    let mut v: Vec<String> =
                        new_guest.volumes.iter().filter(|v| v.fs.readable()).map(|v| v.name.clone()).collect();
                    let gone: Vec<String> = old_guest
                        .volumes
                        .iter()
                        .filter(|o| o.fs.readable() && !v.contains(&o.name))
                        .map(|o| o.name.clone())
                        .collect();
                    v.extend(gone);
                    v.into_iter().map(|v| (v, "/".to_string())).collect()
                }
            };
            for (volume, inner) in volumes {
                let (Ok(ov), Ok(nv)) = (old_guest.volume(&volume), new_guest.volume(&volume)) else {
                    let (was, is) = (old_guest.volume(&volume).is_ok(), new_guest.volume(&volume).is_ok());
                    notes.push(match (was, is) {
                        (false, true) => format!("volume /{volume} added"),
                        (true, false) => format!("volume /{volume} removed"),
                        _ => format!("neither snapshot has a volume /{volume}"),
                    });
                    continue;
                };
                if changed_ranges.as_ref().is_some_and(|c| nv.unchanged_since(ov, c)) {
                    notes.push(format!("volume /{volume} unchanged (the same blocks)"));
                    unchanged_volumes.push(volume);
                    continue;
                }
                let diffed = ov.fs.readable().then_some(()).ok_or_else(|| {
                    Error::invalid(format!("/{volume} holds {} now, {} before", nv.fs.name(), ov.fs.name()))
                });
                let diffed =
                    diffed.and_then(|()| diff_trees(&old_guest, ov, &new_guest, nv, inner.as_bytes(), args.contents));
                match diffed {
                    Ok(d) => {
                        changes.extend(d.changes);
                        not_compared.extend(d.unreadable.into_iter().map(|u| format!("{name} {u}")));
                    }
                    Err(e) if is_damage(&e) => not_compared.push(format!("{name} /{volume}: {e}")),
                    Err(e) => return Err(e),
                }
            }
        }
        if args.json {
            disks_json.push(serde_json::json!({
                "name": name,
                "status": if unchanged { "unchanged" } else { "compared" },
                "notes": notes,
                "unchanged_volumes": unchanged_volumes,
                "changes": changes,
            }));
            continue;
        }
        print_file_changes(name, unchanged, &notes, &changes);
    }
    if args.json {
        let v = serde_json::json!({"from": a_id.hex(), "to": b_id.hex(), "disks": disks_json, "not_compared": not_compared});
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON of plain values"));
    }
    for n in &not_compared {
        eprintln!("not compared: {n}");
    }
    if !not_compared.is_empty() {
        return Err(Error::Incomplete(format!("{} could not be compared", count(not_compared.len(), "place"))));
    }
    Ok(())
}

fn print_file_changes(name: &str, unchanged: bool, notes: &[String], changes: &[FileChange]) {
    if unchanged {
        println!("{name}: unchanged (the same blocks)");
        return;
    }
    for note in notes {
        println!("{name}: {note}");
    }
    for c in changes {
        let slash = if c.kind == crate::guestfs::EntryKind::Dir { "/" } else { "" };
        let why = if c.contents_only { "    (contents differ; size and modification time as they were)" } else { "" };
        println!("{}    {}{slash}{why}", c.change.mark(), c.path);
    }
    let n = |kind: Change| changes.iter().filter(|c| c.change == kind).count();
    let sum = |kind: Change, size: fn(&FileChange) -> Option<u64>| -> u64 {
        changes.iter().filter(|c| c.change == kind).filter_map(size).sum()
    };
    println!(
        "{name}: {} added, {} removed, {} modified, {} changed type, {} changed permissions or owner; files added \
         hold {}, files removed held {}",
        n(Change::Added),
        n(Change::Removed),
        n(Change::Modified),
        n(Change::Type),
        n(Change::Metadata),
        human_bytes(sum(Change::Added, |c| c.new_size)),
        human_bytes(sum(Change::Removed, |c| c.old_size)),
    );
}
