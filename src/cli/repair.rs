//! `diskvault repair index|packs|snapshots`.

use super::Globals;
use crate::check::{self, CheckOptions, DataSubset};
use crate::error::Result;
use crate::format::ObjectId;
use crate::progress::Counters;
use crate::repair;
use crate::util::human_bytes;

#[derive(clap::Subcommand, Debug)]
pub enum RepairCommand {
    /// Rebuild all index files from the pack headers (after a lost or damaged index file).
    Index,
    /// Take damaged packs (as `check --read-data` names them) out of the repository, keeping their intact blobs:
    /// the next backup stores the lost blocks again where its source still has them, and older snapshots that
    /// reference them become restorable again.
    Packs(PacksArgs),
    /// List the snapshots and byte ranges affected by lost or damaged data; with --write, save repaired
    /// snapshots that mark those ranges as lost (they restore as zeros, and say so).
    Snapshots(SnapshotsArgs),
}

#[derive(clap::Args, Debug)]
pub struct PacksArgs {
    /// Pack ids (hex), or their names as check prints them (`packs/4d/4d52…`). None: read every pack first
    /// (as `check --read-data`) and repair those found damaged.
    #[arg(value_parser = parse_pack)]
    packs: Vec<ObjectId>,
}

fn parse_pack(s: &str) -> std::result::Result<ObjectId, String> {
    let hex = s.trim_end_matches(':').rsplit('/').next().unwrap_or(s);
    ObjectId::from_hex(hex).ok_or_else(|| format!("{s:?} is not a pack id (64 hex digits)"))
}

#[derive(clap::Args, Debug)]
pub struct SnapshotsArgs {
    /// Also read every pack to find damaged blobs (otherwise: lost packs, blobs and segments only).
    #[arg(long)]
    read_data: bool,
    /// Write the repaired snapshots (without it, only list what is affected).
    #[arg(long)]
    write: bool,
    /// With --write: remove the damaged snapshots once their repaired versions are saved.
    #[arg(long, requires = "write")]
    forget: bool,
}

pub fn run(g: &Globals, cmd: &RepairCommand) -> Result<()> {
    let repo = g.open_repo()?;
    match cmd {
        RepairCommand::Index => {
            let _lock = crate::lock::acquire_exclusive(&repo, "repair index")?;
            let r = repair::rebuild_index(&repo)?;
            for u in &r.unreadable {
                eprintln!("warning: pack left out of the index: {u}");
            }
            println!(
                "indexed {} packs ({} blobs) in {} new index files; removed {} old index files and {} stale temporary files",
                r.packs_indexed, r.blobs_indexed, r.index_files_written, r.index_files_removed, r.temporaries_removed
            );
        }
        RepairCommand::Packs(a) => {
            let _lock = crate::lock::acquire_exclusive(&repo, "repair packs")?;
            let packs = if a.packs.is_empty() {
                let report = check::run(&repo, &CheckOptions::thorough(DataSubset::All), &Counters::default())?;
                for e in &report.errors {
                    eprintln!("damaged: {e}");
                }
                if report.damaged_packs.is_empty() {
                    println!("every pack read back intact; nothing to repair");
                    return Ok(());
                }
                println!("{} with damage found", crate::util::count(report.damaged_packs.len(), "pack"));
                report.damaged_packs
            } else {
                a.packs.clone()
            };
            let mut lost = 0;
            for r in repair::repair_packs(&repo, &packs)? {
                let name = crate::format::names::pack(&r.pack);
                if r.intact {
                    println!("{name}: every blob verified; left as it is");
                    continue;
                }
                lost += r.lost.len();
                let why = r.damage.as_deref().map(|d| format!(" ({d})")).unwrap_or_default();
                println!("{name}{why}: {} blobs kept in new packs, {} lost; removed", r.salvaged, r.lost.len());
                for (id, cause) in &r.lost {
                    println!("  lost blob {id}: {cause}");
                }
            }
            if lost > 0 {
                println!(
                    "back up the affected sources again: blocks they still hold are stored again, and older snapshots \
                     that reference them become restorable; `repair snapshots` lists what stays lost"
                );
            }
        }
        RepairCommand::Snapshots(a) => {
            let subset = if a.read_data { DataSubset::All } else { DataSubset::None };
            let report = check::run(&repo, &CheckOptions::thorough(subset), &Counters::default())?;
            if report.affected.is_empty() {
                println!("no snapshot references lost or damaged data");
                return Ok(());
            }
            for d in &report.affected {
                let snap = repo.load_snapshot(&d.snapshot)?;
                let Some(disk) = snap.disk(&d.disk) else { continue };
                let ranges = d.blocks.byte_ranges(disk.block_size as u64, disk.capacity);
                let lost: u64 = ranges.iter().map(|(s, e)| e - s).sum();
                println!(
                    "snapshot {} ({}), disk {}: {} lost in {} ranges ({})",
                    d.snapshot.short(),
                    snap.source,
                    d.disk,
                    human_bytes(lost),
                    ranges.len(),
                    d.blocks.runs()[0].1
                );
                for (s, e) in &ranges {
                    println!("  bytes {s}..{e}");
                }
            }
            if !a.write {
                println!("nothing changed; run with --write to save repaired snapshots that mark these ranges as lost");
                return Ok(());
            }
            let _lock = crate::lock::acquire_exclusive(&repo, "repair snapshots")?;
            let _snapshots_lock = crate::lock::acquire_snapshots(&repo, "repair snapshots")?;
            let cache = g.open_cache(&repo)?;
            for r in repair::repair_snapshots(&repo, &cache, &report.affected, a.forget)? {
                println!(
                    "snapshot {} repaired as {}{}",
                    r.old.short(),
                    r.new.short(),
                    if a.forget { " (damaged original removed)" } else { "" }
                );
            }
        }
    }
    Ok(())
}
