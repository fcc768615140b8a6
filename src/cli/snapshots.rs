//! `diskvault snapshots`.

use super::{FilterArgs, Globals};
use crate::error::{Error, Result};
use crate::util::{format_utc, human_bytes};

#[derive(clap::Args, Debug)]
pub struct SnapshotsArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// Only the newest N snapshots of each source.
    #[arg(long, value_name = "N")]
    latest: Option<usize>,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(g: &Globals, args: &SnapshotsArgs) -> Result<()> {
    let repo = g.open_repo()?;
    let (mut snaps, unreadable) = repo.list_snapshots_matching_checked(&args.filter.filter())?;
    for (_, e) in &unreadable {
        eprintln!("cannot read: {e}");
    }
    // Metrics describe every snapshot of the selection, whatever --latest shows.
    record_metrics(&snaps, unreadable.len());
    // Listed, but not all: as the file-level commands end when they left damaged parts out.
    let done = || -> Result<()> {
        if unreadable.is_empty() {
            return Ok(());
        }
        Err(Error::Incomplete(format!(
            "{} could not be read (named above): `check` reports a damaged one, `forget ID` removes it",
            crate::util::count(unreadable.len(), "snapshot object")
        )))
    };
    if let Some(n) = args.latest {
        snaps = newest_per_source(snaps, n);
    }
    if args.json {
        let v: Vec<serde_json::Value> = snaps
            .iter()
            .map(|(id, s)| {
                serde_json::json!({
                    "id": id.hex(),
                    "time": format_utc(s.time_secs),
                    "time_secs": s.time_secs,
                    "hostname": s.hostname,
                    "username": s.username,
                    "source": s.source,
                    "tags": s.tags,
                    "parent": s.parent.map(|p| p.hex()),
                    "annotations": s.annotations,
                    "disks": s.disks.iter().map(|d| serde_json::json!({
                        "name": d.name,
                        "source_kind": d.source_kind,
                        "source_path": d.source_path,
                        "capacity": d.capacity,
                        "change_token": d.change_token,
                        "segments": d.segments.len(),
                        "bytes_read": d.stats.bytes_read,
                        "new_blocks": d.stats.new_blocks,
                        "new_bytes_stored": d.stats.new_bytes_stored,
                    })).collect::<Vec<_>>(),
                    "summary": {
                        "duration_ms": s.summary.duration_ms,
                        "bytes_read": s.summary.bytes_read,
                        "bytes_added": s.summary.bytes_added,
                        "new_blobs": s.summary.new_blobs,
                    },
                })
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON of plain values"));
        return done();
    }
    println!("{:<10} {:<19} {:<16} {:<20} {:<28} {:>10}  tags", "id", "time (UTC)", "host", "source", "disks", "added");
    for (id, s) in &snaps {
        let disks: Vec<String> = s.disks.iter().map(|d| format!("{} ({})", d.name, human_bytes(d.capacity))).collect();
        println!(
            "{:<10} {:<19} {:<16} {:<20} {:<28} {:>10}  {}",
            id.short(),
            format_utc(s.time_secs),
            s.hostname,
            s.source,
            disks.join(", "),
            human_bytes(s.summary.bytes_added),
            s.tags.join(",")
        );
    }
    println!("{}", crate::util::count(snaps.len(), "snapshot"));
    // Interrupted VMware backups that the next `backup --vm` continues (format-spec §8c).
    for (id, c) in repo.list_checkpoints(args.filter.name.as_deref())? {
        let disks: Vec<String> = c
            .disks
            .iter()
            .map(|d| {
                let done = (d.blocks_done() * d.block_size as u64).min(d.capacity);
                format!("{} {} of {}", d.name, human_bytes(done), human_bytes(d.capacity))
            })
            .collect();
        println!(
            "interrupted backup of {} started {} on {} (checkpoint {}): {} read; the next backup continues it",
            c.source,
            format_utc(c.time_secs),
            c.hostname,
            id.short(),
            disks.join(", ")
        );
    }
    done()
}

/// Per source, how many snapshots there are and when the newest was taken: run from one monitoring host,
/// `snapshots --metrics-file` watches every VM that any proxy backs up into the repository.
fn record_metrics(snaps: &[(crate::format::ObjectId, crate::format::snapshot::Snapshot)], unreadable: usize) {
    use crate::metrics::gauge;
    gauge(
        "diskvault_snapshot_objects_unreadable",
        "Snapshot objects that could not be read (damaged, or of a newer format version).",
        &[],
        unreadable as f64,
    );
    let mut by_source: std::collections::BTreeMap<&str, (usize, f64)> = std::collections::BTreeMap::new();
    for (_, s) in snaps {
        let time = s.unix_time();
        let e = by_source.entry(s.source.as_str()).or_insert((0, f64::MIN));
        *e = (e.0 + 1, e.1.max(time));
    }
    for (source, (count, newest)) in by_source {
        let l = [("source", source)];
        gauge("diskvault_snapshots", "Snapshots of the source in the repository.", &l, count as f64);
        gauge("diskvault_snapshot_newest_timestamp_seconds", "Time of the source's newest snapshot.", &l, newest);
    }
}

/// The newest `n` snapshots of each source in `snaps` (oldest first), in the same order.
fn newest_per_source(
    snaps: Vec<(crate::format::ObjectId, crate::format::snapshot::Snapshot)>,
    n: usize,
) -> Vec<(crate::format::ObjectId, crate::format::snapshot::Snapshot)> {
    let mut left: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    let mut out: Vec<_> = snaps
        .into_iter()
        .rev()
        .filter(|(_, s)| {
            let k = left.entry(s.source.clone()).or_insert(n);
            let keep = *k > 0;
            *k = k.saturating_sub(1);
            keep
        })
        .collect();
    out.reverse();
    out
}
