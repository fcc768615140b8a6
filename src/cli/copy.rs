//! `diskvault copy`: snapshots of another repository stored in this one ([`crate::copy`]).

use std::path::PathBuf;
use std::sync::Arc;

use super::{FilterArgs, Globals};
use crate::copy::{Copied, CopyOptions, PlannedCopy};
use crate::error::{Error, Result};
use crate::progress::{Counters, Reporter};
use crate::repository::Repository;
use crate::util::{format_utc, human_bytes};

#[derive(clap::Args, Debug)]
pub struct CopyArgs {
    /// The repository to copy from (a directory or an S3 location, as -r takes them).
    #[arg(long, env = "DISKVAULT_FROM_REPOSITORY", value_name = "LOCATION")]
    from_repo: String,
    /// Read the source repository's password from this file (first line). The environment variable
    /// DISKVAULT_FROM_PASSWORD holds it directly.
    #[arg(long, env = "DISKVAULT_FROM_PASSWORD_FILE", value_name = "FILE")]
    from_password_file: Option<PathBuf>,
    /// Run this shell command and use its first output line as the source repository's password.
    #[arg(long, env = "DISKVAULT_FROM_PASSWORD_COMMAND", value_name = "COMMAND")]
    from_password_command: Option<String>,
    #[command(flatten)]
    filter: FilterArgs,
    /// Packs uploaded at once.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    upload_concurrency: u32,
    /// Store every new block whole, as `backup --no-delta`.
    #[arg(long)]
    no_delta: bool,
    /// Only say which snapshots would be copied, on which earlier copies, reading how much.
    #[arg(long)]
    dry_run: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Snapshots to copy (id, prefix, or `latest`: the latest the filters select); default: every snapshot the
    /// filters select.
    #[arg(value_name = "SNAPSHOT")]
    snapshots: Vec<String>,
}

pub fn run(g: &Globals, args: &CopyArgs) -> Result<()> {
    crate::util::catch_interrupts();
    let password = super::password_from(
        "DISKVAULT_FROM_PASSWORD",
        args.from_password_file.as_deref(),
        args.from_password_command.as_deref(),
        "source repository password",
        "set DISKVAULT_FROM_PASSWORD, or use --from-password-file or --from-password-command",
        false,
    )?;
    let src = Repository::open(g.open_backend(&args.from_repo)?, &password).inspect_err(|e| {
        if matches!(e, Error::WrongPassword) {
            eprintln!("source repository {}:", args.from_repo);
        }
    })?;
    let dest = g.open_repo()?;
    if src.config().id == dest.config().id {
        return Err(Error::invalid("the source and the destination are the same repository"));
    }
    let mut wanted = Vec::new();
    let filter = args.filter.filter();
    // Source snapshots that cannot be read are not copied; the run then ends incomplete (exit code 3).
    let mut unreadable = 0;
    if args.snapshots.is_empty() {
        let damaged;
        (wanted, damaged) = src.list_snapshots_matching_checked(&filter)?;
        for (_, e) in &damaged {
            eprintln!("not copied: {e}");
        }
        unreadable = damaged.len();
    } else {
        for s in &args.snapshots {
            let found = src.find_snapshot_matching(s, &filter)?;
            if !wanted.iter().any(|(id, _)| *id == found.0) {
                wanted.push(found);
            }
        }
    }
    let src_cache = g.open_cache_unsynced(&src)?;
    let dest_cache = g.open_cache_unsynced(&dest)?;
    if args.dry_run {
        let selected = wanted.len();
        let planned = crate::copy::plan(&src, &src_cache, &dest, wanted)?;
        return print_plan(&planned, selected - planned.len(), args.json);
    }
    let opts = CopyOptions { uploaders: args.upload_concurrency as usize, delta: !args.no_delta, ..Default::default() };
    let counters = Arc::new(Counters::default());
    let selected = wanted.len();
    let json = args.json;
    let (copied, not_copied) = {
        let _reporter = Reporter::start("copy", counters.clone(), g.progress);
        crate::copy::copy(src, src_cache, &dest, dest_cache, wanted, &opts, &counters, |c| {
            if !json {
                print_copied(c);
            }
        })?
    };
    let skipped = selected - copied.len() - not_copied.len();
    {
        use crate::metrics::gauge;
        gauge("diskvault_copy_snapshots_copied", "Snapshots copied by this run.", &[], copied.len() as f64);
        gauge(
            "diskvault_copy_snapshots_not_copied",
            "Selected snapshots left out because data they need is damaged (or they could not be read).",
            &[],
            (not_copied.len() + unreadable) as f64,
        );
        gauge(
            "diskvault_copy_snapshots_already_copied",
            "Selected snapshots the destination held already.",
            &[],
            skipped as f64,
        );
        let read: u64 = copied.iter().map(|c| c.snapshot.summary.bytes_read).sum();
        let added: u64 = copied.iter().map(|c| c.snapshot.summary.bytes_added).sum();
        gauge("diskvault_copy_bytes_read", "Bytes of disk data read from the source repository.", &[], read as f64);
        gauge("diskvault_copy_bytes_added", "Bytes added to this repository.", &[], added as f64);
        let reads: u64 = copied.iter().map(|c| c.source_reads).sum();
        gauge(
            "diskvault_copy_source_reads",
            "Ranged reads of the source repository's packs (requests on S3; delta bases not counted).",
            &[],
            reads as f64,
        );
        let as_stored: u64 = copied.iter().map(|c| c.blocks_sealed_as_stored).sum();
        gauge(
            "diskvault_copy_blocks_sealed_as_stored",
            "New blocks stored as the source repository stored them, without compressing them again.",
            &[],
            as_stored as f64,
        );
    }
    if json {
        let v = serde_json::json!({
            "copied": copied.iter().map(|c| serde_json::json!({
                "from": c.from.hex(),
                "snapshot": c.id.hex(),
                "source": c.snapshot.source,
                "time": format_utc(c.snapshot.time_secs),
                "parent": c.snapshot.parent.map(|p| p.hex()),
                "bytes_read": c.snapshot.summary.bytes_read,
                "bytes_added": c.snapshot.summary.bytes_added,
                "source_reads": c.source_reads,
                "blocks_sealed_as_stored": c.blocks_sealed_as_stored,
            })).collect::<Vec<_>>(),
            "already_copied": skipped,
            "not_copied": not_copied.iter().map(|n| serde_json::json!({
                "from": n.from.hex(),
                "source": n.source,
                "cause": n.cause,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON of plain values"));
    } else {
        for n in &not_copied {
            println!("not copied {}  {}: {}", n.from.short(), n.source, n.cause);
        }
        println!(
            "{} copied, {} in the destination already",
            crate::util::count(copied.len(), "snapshot"),
            crate::util::count(skipped, "snapshot")
        );
    }
    if unreadable + not_copied.len() > 0 {
        return Err(Error::Incomplete(format!(
            "{} of the source could not be copied (named above; `check --read-data` there finds the damage, \
             `repair packs` takes it out)",
            crate::util::count(unreadable + not_copied.len(), "snapshot")
        )));
    }
    Ok(())
}

fn print_plan(planned: &[PlannedCopy], skipped: usize, json: bool) -> Result<()> {
    if json {
        let v = serde_json::json!({
            "would_copy": planned.iter().map(|p| serde_json::json!({
                "from": p.from.hex(),
                "source": p.snapshot.source,
                "time": format_utc(p.snapshot.time_secs),
                "builds_on": p.parent.map(|id| id.hex()),
                "bytes_to_read": p.bytes_to_read,
            })).collect::<Vec<_>>(),
            "already_copied": skipped,
        });
        println!("{}", serde_json::to_string_pretty(&v).expect("JSON of plain values"));
        return Ok(());
    }
    for p in planned {
        let on = match p.parent {
            Some(id) => format!("only what differs from {}", id.short()),
            None => "in full".into(),
        };
        println!(
            "would copy {}  {}  {}: read {}, {on}",
            p.from.short(),
            format_utc(p.snapshot.time_secs),
            p.snapshot.source,
            human_bytes(p.bytes_to_read)
        );
    }
    println!(
        "{} would be copied, {} in the destination already (dry run: nothing copied)",
        crate::util::count(planned.len(), "snapshot"),
        crate::util::count(skipped, "snapshot")
    );
    Ok(())
}

fn print_copied(c: &Copied) {
    let s = &c.snapshot;
    let as_stored = match c.blocks_sealed_as_stored {
        0 => String::new(),
        n => format!(" ({} as the source stored them)", crate::util::count(n as usize, "block")),
    };
    println!(
        "copied {} -> {}  {}  {}: read {} in {}, added {}{as_stored}",
        c.from.short(),
        c.id.short(),
        format_utc(s.time_secs),
        s.source,
        human_bytes(s.summary.bytes_read),
        crate::util::count(c.source_reads as usize, "request"),
        human_bytes(s.summary.bytes_added)
    );
}
