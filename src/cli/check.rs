//! `diskvault check`.

use std::sync::Arc;

use super::Globals;
use crate::cache::repository_dir;
use crate::check::{self, CheckOptions, DataSubset};
use crate::error::{Error, Result};
use crate::progress::{Counters, Reporter};
use crate::util::human_bytes;

#[derive(clap::Args, Debug)]
pub struct CheckArgs {
    /// Also read and verify every byte of every pack.
    #[arg(long, conflicts_with = "read_data_subset")]
    read_data: bool,
    /// Read and verify a fraction of the packs, the least recently verified first: `n/m` or `x%` (`1/7` run
    /// daily verifies every pack in a week, from any host); or `unverified`: the packs no check has verified
    /// yet (with --snapshot, what that backup added).
    #[arg(long, value_parser = DataSubset::parse)]
    read_data_subset: Option<DataSubset>,
    /// Read data until the check has run this long (e.g. 45min, 2h; counted from its start, as borg counts
    /// its --max-duration), least recently verified packs first; packs not begun by then are left for the
    /// next check. With --read-data or --read-data-subset.
    #[arg(long, value_name = "DURATION", value_parser = crate::util::parse_duration)]
    max_duration: Option<i64>,
    /// Only this snapshot (repeatable): an id, an id prefix, or `latest` (of the source --name gives). Its
    /// structure, and with --read-data or --read-data-subset only the packs a restore of it reads: last
    /// night's backup of a VM verified byte for byte, without reading the rest.
    #[arg(long = "snapshot", value_name = "SNAPSHOT")]
    snapshots: Vec<String>,
    /// With --snapshot latest: the source (VM) whose latest snapshot is meant.
    #[arg(long, requires = "snapshots")]
    name: Option<String>,
}

pub fn run(g: &Globals, args: &CheckArgs) -> Result<()> {
    crate::util::catch_interrupts();
    let repo = g.open_repo()?;
    let subset = match (args.read_data, args.read_data_subset) {
        (true, _) => DataSubset::All,
        (false, Some(s)) => s,
        (false, None) => DataSubset::None,
    };
    if args.max_duration.is_some() && subset == DataSubset::None {
        return Err(Error::invalid("--max-duration limits reading data: give --read-data or --read-data-subset"));
    }
    let snapshots = match args.snapshots.is_empty() {
        true => None,
        false => Some(
            args.snapshots
                .iter()
                // An id names the object even if it cannot be read: the check then says why.
                .map(|r| match r.as_str() {
                    "latest" => repo.find_snapshot(r, args.name.as_deref()).map(|(id, _)| id),
                    _ => repo.resolve_snapshot_id(r),
                })
                .collect::<Result<Vec<_>>>()?,
        ),
    };
    let opts = CheckOptions {
        snapshots,
        subset,
        budget: args.max_duration.map(|s| std::time::Duration::from_secs(s as u64)),
        header_record: Some(repository_dir(&repo, &g.cache_root()).join(check::HEADER_RECORD)),
    };
    let counters = Arc::new(Counters::default());
    let report = {
        let _r = Reporter::start("check", counters.clone(), g.progress);
        check::run(&repo, &opts, &counters)?
    };
    {
        use crate::metrics::gauge;
        gauge(
            "diskvault_check_errors",
            "Damage found (each error message counts once).",
            &[],
            report.errors.len() as f64,
        );
        gauge("diskvault_check_warnings", "Warnings of the check.", &[], report.warnings.len() as f64);
        gauge("diskvault_check_snapshots", "Snapshots checked.", &[], report.snapshots as f64);
        gauge("diskvault_check_packs", "Packs in the repository's index.", &[], report.packs as f64);
        gauge("diskvault_check_packs_read", "Packs read and verified byte for byte.", &[], report.packs_read as f64);
        gauge("diskvault_check_bytes_read", "Bytes of packs read and verified.", &[], report.bytes_read as f64);
        gauge(
            "diskvault_check_damaged_blob_copies",
            "Blob copies the repository's damage records name (backups store those blocks again).",
            &[],
            report.damage_recorded as f64,
        );
        if subset != DataSubset::None {
            gauge(
                "diskvault_check_packs_never_verified",
                "Packs that no check has read and verified yet.",
                &[],
                report.never_verified as f64,
            );
            if let Some(t) = report.oldest_verification {
                gauge(
                    "diskvault_check_oldest_verification_timestamp_seconds",
                    "When the least recently verified pack was last read and verified.",
                    &[],
                    t as f64,
                );
            }
        }
    }
    for w in &report.warnings {
        eprintln!("warning: {w}");
    }
    for e in &report.errors {
        eprintln!("damaged: {e}");
    }
    let headers = match (report.headers_read, report.headers_known) {
        (0, 0) => String::new(),
        (read, 0) => format!("; pack headers: {read} read"),
        (read, known) => format!("; pack headers: {read} read, {known} unchanged since an earlier check on this host"),
    };
    println!(
        "checked {}, {}, {} ({}{headers}){}",
        crate::util::count(report.snapshots, "snapshot"),
        crate::util::count(report.index_files, "index file"),
        crate::util::count(report.packs, "pack"),
        crate::util::count(report.blobs, "blob"),
        if report.packs_read > 0 {
            format!("; read {} packs ({})", report.packs_read, human_bytes(report.bytes_read))
        } else {
            String::new()
        }
    );
    if subset != DataSubset::None {
        let oldest = report.oldest_verification.map(crate::util::format_utc).unwrap_or_else(|| "never".into());
        println!(
            "verification: {} of {} packs never verified; the least recently verified on {oldest} (UTC)",
            report.never_verified, report.packs
        );
    }
    if report.damage_recorded > 0 {
        println!(
            "damage recorded: {} damaged or lost; backups store those blocks again from their sources, and \
             restores read another copy where one is stored",
            if report.damage_recorded == 1 {
                "1 blob copy".to_string()
            } else {
                format!("{} blob copies", report.damage_recorded)
            }
        );
    }
    if report.is_healthy() {
        println!("no errors found");
        Ok(())
    } else {
        if !report.damaged_index_files.is_empty() {
            eprintln!(
                "to heal a damaged index file: `repair index`, which rebuilds the index from the packs' own headers; \
                 then check again"
            );
        } else if report.affected.is_empty() && report.damaged_snapshots.is_empty() && !report.damaged_packs.is_empty()
        {
            eprintln!(
                "every snapshot restores from intact copies; to remove the damaged ones: `repair packs` (with these \
                 packs, or alone to find them)"
            );
        } else if report.errors.len() > report.damaged_snapshots.len() {
            eprintln!(
                "to heal: back up the affected sources again (the damaged blocks they still hold are stored \
                 again), then `repair packs` (with these packs, or alone to find them) removes the damaged copies; \
                 `repair snapshots` lists what stays lost"
            );
        }
        if !report.damaged_snapshots.is_empty() {
            let ids: Vec<String> = report.damaged_snapshots.iter().map(|id| id.hex()).collect();
            eprintln!(
                "a damaged snapshot object cannot be repaired (prune refuses to run while one is there): \
                 put it back from elsewhere (an older version in the bucket), or remove it with `diskvault forget {}`",
                ids.join(" ")
            );
        }
        Err(Error::invalid(format!("the repository has {} errors (listed above)", report.errors.len())))
    }
}
