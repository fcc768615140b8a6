//! `diskvault snapshots`.

use super::{FilterArgs, Globals};
use crate::check::SnapshotState;
use crate::error::{Error, Result};
use crate::format::snapshot::Snapshot;
use crate::format::ObjectId;
use crate::repository::Repository;
use crate::util::{format_utc, human_bytes};

#[derive(clap::Args, Debug)]
pub struct SnapshotsArgs {
    #[command(flatten)]
    filter: FilterArgs,
    /// Only the newest N snapshots of each source.
    #[arg(long, value_name = "N")]
    latest: Option<usize>,
    /// Also show how recently each snapshot was verified byte for byte: the oldest time a data check
    /// (`check --read-data`, a subset, `--snapshot`, or `backup --verify`) verified one of the packs a restore
    /// of it reads;
    /// "unverified" while some of them never were; "DAMAGED" when a block of it cannot be read. Reads the
    /// snapshots' manifest segments.
    #[arg(long)]
    verified: bool,
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
    let states = if args.verified { Some(verification_states(g, &repo, &snaps)?) } else { None };
    let state_of = |i: usize| states.as_ref().map(|s| &s[i]);
    if args.json {
        let v: Vec<serde_json::Value> = snaps
            .iter()
            .enumerate()
            .map(|(i, (id, s))| {
                let mut v = serde_json::json!({
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
                });
                if let Some(state) = state_of(i) {
                    v["verification"] = serde_json::json!({
                        "verified": state.is_verified(),
                        "verified_since": state.verified_since.map(format_utc),
                        "verified_since_secs": state.verified_since,
                        "packs": state.packs,
                        "unverified_packs": state.unverified,
                        "damaged_blocks": state.damaged_blocks,
                    });
                }
                v
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON of plain values"));
        return done();
    }
    let verified_header = if states.is_some() { format!("  {:<24}", "verified (UTC)") } else { String::new() };
    println!(
        "{:<10} {:<19} {:<16} {:<20} {:<28} {:>10}{verified_header}  tags",
        "id", "time (UTC)", "host", "source", "disks", "added"
    );
    for (i, (id, s)) in snaps.iter().enumerate() {
        let disks: Vec<String> = s.disks.iter().map(|d| format!("{} ({})", d.name, human_bytes(d.capacity))).collect();
        let verified = state_of(i).map(|st| format!("  {:<24}", describe(st))).unwrap_or_default();
        println!(
            "{:<10} {:<19} {:<16} {:<20} {:<28} {:>10}{verified}  {}",
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

/// Each snapshot's verification state (see [`crate::check::snapshot_states`]).
fn verification_states(g: &Globals, repo: &Repository, snaps: &[(ObjectId, Snapshot)]) -> Result<Vec<SnapshotState>> {
    // Prune waits for this session before deleting packs: a segment it moves meanwhile is not read as lost. The
    // cache is brought up to date after it starts.
    let _session = crate::lock::start_session(repo, "snapshots --verified")?;
    let verifications = crate::check::Verifications::load(repo)?;
    for e in &verifications.unreadable {
        eprintln!("cannot read: {e} (a verification record: its packs show as less recently verified)");
    }
    let cache = g.open_cache(repo)?;
    let listed: Vec<&Snapshot> = snaps.iter().map(|(_, s)| s).collect();
    let states = crate::check::snapshot_states(repo, &cache, &listed, &verifications.last_verified)?;
    record_verification_metrics(snaps, &states);
    Ok(states)
}

/// The table's "verified" column.
fn describe(state: &SnapshotState) -> String {
    if state.damaged_blocks > 0 {
        format!("DAMAGED ({})", crate::util::count(state.damaged_blocks as usize, "block"))
    } else if state.unverified > 0 {
        format!("unverified ({}/{} packs)", state.unverified, state.packs)
    } else {
        state.verified_since.map(format_utc).unwrap_or_else(|| "yes (no data)".into())
    }
}

/// Per source, of the snapshots listed: when the newest verified one was taken, and how many are damaged.
fn record_verification_metrics(snaps: &[(ObjectId, Snapshot)], states: &[SnapshotState]) {
    use crate::metrics::gauge;
    let mut by_source: std::collections::BTreeMap<&str, (f64, usize)> = std::collections::BTreeMap::new();
    for ((_, s), state) in snaps.iter().zip(states) {
        let e = by_source.entry(s.source.as_str()).or_insert((0.0, 0));
        if state.is_verified() {
            e.0 = e.0.max(s.unix_time());
        }
        e.1 += (state.damaged_blocks > 0) as usize;
    }
    for (source, (newest_verified, damaged)) in by_source {
        let l = [("source", source)];
        gauge(
            "diskvault_snapshot_newest_verified_timestamp_seconds",
            "Time of the source's newest listed snapshot whose every pack a data check verified (0: none).",
            &l,
            newest_verified,
        );
        gauge(
            "diskvault_snapshots_damaged",
            "Listed snapshots of the source with blocks that cannot be read.",
            &l,
            damaged as f64,
        );
    }
}

/// Per source, how many snapshots there are and when the newest was taken: run from one monitoring host,
/// `snapshots --metrics-file` watches every VM that any proxy backs up into the repository.
fn record_metrics(snaps: &[(ObjectId, Snapshot)], unreadable: usize) {
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
fn newest_per_source(snaps: Vec<(ObjectId, Snapshot)>, n: usize) -> Vec<(ObjectId, Snapshot)> {
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
