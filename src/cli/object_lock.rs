//! `diskvault object-lock`, and the same step after `prune`.

use super::Globals;
use crate::error::{Error, Result};
use crate::object_lock::{self, ObjectLockReport};
use crate::repository::Repository;
use crate::util::format_utc;

#[derive(clap::Args, Debug)]
pub struct ObjectLockArgs {
    /// Report what would be extended; change nothing.
    #[arg(long, short = 'n')]
    dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(g: &Globals, args: &ObjectLockArgs) -> Result<()> {
    let repo = g.open_repo()?;
    let r = object_lock::extend(&repo, retention_record(g, &repo).as_deref(), args.dry_run)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r).expect("JSON of plain values"));
    } else {
        print_report(&r, args.dry_run);
    }
    finish(&r, args.dry_run)
}

/// After a prune: extends retention where the repository's storage applies it (nothing otherwise).
pub(crate) fn after_prune(g: &Globals, repo: &Repository, dry_run: bool) -> Result<()> {
    if repo.backend().retention_policy().is_none() {
        return Ok(());
    }
    let r = object_lock::extend(repo, retention_record(g, repo).as_deref(), dry_run)?;
    print_report(&r, dry_run);
    finish(&r, dry_run)
}

/// The host's cache, where retention ends are recorded; without it every object's retention is read again.
fn retention_record(g: &Globals, repo: &Repository) -> Option<std::sync::Arc<crate::cache::IndexCache>> {
    match g.open_cache_unsynced(repo) {
        Ok(c) => Some(c),
        Err(e) => {
            tracing::warn!("{e}: the retention of every object is read from the storage");
            None
        }
    }
}

fn finish(r: &ObjectLockReport, dry_run: bool) -> Result<()> {
    if !dry_run {
        record_metrics(r);
    }
    let hint = if r.failures.len() as u64 == r.objects {
        " (every object failed: is Object Lock enabled on the bucket? It is chosen when the bucket is created)"
    } else {
        ""
    };
    match r.failures.len() {
        0 => Ok(()),
        n => Err(Error::invalid(format!(
            "the retention of {n} objects could not be checked or extended (listed above); they may be deleted \
             before the promised {} days{hint}",
            r.days
        ))),
    }
}

fn record_metrics(r: &ObjectLockReport) {
    use crate::metrics::gauge;
    gauge("diskvault_object_lock_objects", "Objects the repository needs, examined.", &[], r.objects as f64);
    gauge("diskvault_object_lock_extended", "Objects whose retention this run extended.", &[], r.extended as f64);
    gauge(
        "diskvault_object_lock_failures",
        "Objects whose retention could not be extended.",
        &[],
        r.failures.len() as f64,
    );
    if let Some(t) = r.earliest_until {
        gauge(
            "diskvault_object_lock_earliest_until_timestamp_seconds",
            "The earliest end of retention of any object the repository needs.",
            &[],
            t as f64,
        );
    }
}

fn print_report(r: &ObjectLockReport, dry_run: bool) {
    let would = if dry_run { "would be " } else { "" };
    println!(
        "object lock ({}, {} days): {} objects needed, {} {would}extended{}, {} held long enough ({} as this host \
         recorded, not asked again); {} dropped packs left to expire",
        r.mode,
        r.days,
        r.objects,
        r.extended,
        r.extended_until.map(|t| format!(" to {}", format_utc(t))).unwrap_or_default(),
        r.held,
        r.held_as_recorded,
        r.dropped_packs
    );
    if r.had_none > 0 {
        println!(
            "  {} of them had no retention at all (written without DISKVAULT_S3_OBJECT_LOCK): anyone with the \
             storage's credentials could delete them{}",
            r.had_none,
            if dry_run { "" } else { " until now" }
        );
    }
    if r.gone > 0 {
        println!("  {} disappeared while this ran (deleted by a prune)", r.gone);
    }
    // The same cause usually fails every object (a bucket without Object Lock): the first ones tell it.
    const SHOWN: usize = 10;
    for f in r.failures.iter().take(SHOWN) {
        eprintln!("error: {f}");
    }
    if r.failures.len() > SHOWN {
        eprintln!("error: … and {} more objects (`--json` lists them all)", r.failures.len() - SHOWN);
    }
    match r.earliest_until {
        Some(t) if !dry_run && r.failures.is_empty() => {
            println!("every object the repository needs is retained until at least {}", format_utc(t))
        }
        Some(t) => println!("the earliest retention of a needed object ends {}", format_utc(t)),
        None => {}
    }
}
