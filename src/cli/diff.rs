//! `diskvault diff`.

use super::Globals;
use crate::diff::{diff_disk, DiskDiff};
use crate::error::{Error, Result};
use crate::util::{format_utc, human_bytes};

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
    /// Print JSON, with every changed byte range.
    #[arg(long)]
    json: bool,
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
    let cache = g.open_cache_unsynced(&repo)?;
    // Segments are read: a prune meanwhile keeps the packs holding them.
    let session = crate::lock::start_session(&repo, "diff")?;
    cache.sync(&repo)?;
    let mut names: Vec<&str> = b.disks.iter().map(|d| d.name.as_str()).collect();
    names.extend(a.disks.iter().map(|d| d.name.as_str()).filter(|n| b.disk(n).is_none()));
    if let Some(only) = &args.disk {
        if !names.contains(&only.as_str()) {
            return Err(Error::invalid(format!("neither snapshot has a disk {only:?}")));
        }
        names.retain(|n| n == only);
    }
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
    println!(
        "{} ({} at {}) -> {} ({} at {})",
        a_id.short(),
        a.source,
        format_utc(a.time_secs),
        b_id.short(),
        b.source,
        format_utc(b.time_secs)
    );
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
