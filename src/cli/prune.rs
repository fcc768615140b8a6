//! `diskvault prune`.

use super::Globals;
use crate::error::Result;
use crate::prune::{self, PruneOptions, PruneReport};
use crate::util::human_bytes;

#[derive(clap::Args, Debug)]
pub struct PruneArgs {
    /// Repack a data pack when more than this share of it is unused (percent).
    #[arg(long, default_value = "10%", value_parser = parse_percent)]
    max_unused: f64,
    /// Copy at most this much while repacking (e.g. 500M, 20G; default: no limit).
    #[arg(long, value_parser = parse_size)]
    max_repack: Option<u64>,
    /// Show what would be deleted and repacked; change nothing.
    #[arg(long, short = 'n')]
    dry_run: bool,
    /// After `key rotate`: seal again with the new key every blob and index file sealed with an older one
    /// (packs holding one are repacked, within --max-repack), so that a revoked key opens no disk data even
    /// where it reaches the storage. Snapshots keep their key (their ids are their content).
    #[arg(long)]
    reencrypt: bool,
}

pub(crate) fn parse_percent(s: &str) -> std::result::Result<f64, String> {
    let v: f64 = s.trim_end_matches('%').parse().map_err(|_| format!("{s:?} is not a percentage"))?;
    if !(0.0..=100.0).contains(&v) {
        return Err(format!("{s:?} is not between 0% and 100%"));
    }
    Ok(v / 100.0)
}

/// Sizes like `1024`, `500K`, `20M`, `3G`, `1T` (powers of 1024).
pub(crate) fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("{s:?}: unknown unit (K, M, G, T)")),
            };
            (&t[..i], m)
        }
        _ => (t, 1),
    };
    num.parse::<u64>().ok().and_then(|n| n.checked_mul(mult)).ok_or_else(|| format!("{s:?} is not a size"))
}

pub fn run(g: &Globals, args: &PruneArgs) -> Result<()> {
    let repo = g.open_repo()?;
    let opts = PruneOptions {
        max_unused: args.max_unused,
        max_repack: args.max_repack,
        dry_run: args.dry_run,
        reencrypt: args.reencrypt,
        ..PruneOptions::default()
    };
    let r = prune::run(&repo, &g.cache_root(), &opts)?;
    if !args.dry_run {
        record_metrics(&r);
    }
    print_report(&r, args.dry_run);
    super::object_lock::after_prune(g, &repo, args.dry_run)
}

/// A prune's numbers as metrics for `--metrics-file` (also after `forget --prune`).
pub(crate) fn record_metrics(r: &PruneReport) {
    use crate::metrics::gauge;
    gauge("diskvault_prune_packs_deleted", "Packs deleted by this run.", &[], r.packs_deleted as f64);
    gauge("diskvault_prune_bytes_deleted", "Bytes of the packs deleted by this run.", &[], r.bytes_deleted as f64);
    gauge(
        "diskvault_prune_packs_waiting",
        "Dropped packs waiting for running sessions to end.",
        &[],
        r.packs_waiting as f64,
    );
    gauge(
        "diskvault_prune_packs_repacked",
        "Packs whose used blobs were copied into new packs.",
        &[],
        r.packs_repacked as f64,
    );
    gauge("diskvault_prune_unused_bytes_kept", "Unused bytes left in kept packs.", &[], r.unused_bytes_kept as f64);
    gauge("diskvault_prune_pack_bytes", "Bytes of all packs examined.", &[], r.pack_bytes as f64);
}

pub(crate) fn print_report(r: &PruneReport, dry_run: bool) {
    let would = if dry_run { "would be " } else { "" };
    if r.packs_deleted + r.packs_rescued + r.packs_retained > 0 {
        println!(
            "deleted {} dropped packs ({}); {} rescued (newer backups use them); {} held back by retention",
            r.packs_deleted,
            human_bytes(r.bytes_deleted),
            r.packs_rescued,
            r.packs_retained
        );
    }
    for w in &r.warnings {
        eprintln!("warning: {w}");
    }
    if !r.planned {
        println!(
            "{} packs wait for the end of sessions that started before an earlier prune; nothing new is planned \
             until they end:",
            r.packs_waiting
        );
        for s in &r.waiting_for {
            println!("  {s}");
        }
        return;
    }
    println!(
        "{} snapshots reference {} blobs; {} packs ({}) examined",
        r.snapshots,
        r.blobs_in_use,
        r.packs,
        human_bytes(r.pack_bytes)
    );
    if r.packs_adopted > 0 {
        println!("indexed {} packs no index file listed (left by interrupted runs)", r.packs_adopted);
    }
    println!("unused packs {would}removed: {} ({})", r.packs_unused, human_bytes(r.bytes_unused));
    println!(
        "packs {would}repacked: {} ({}), {} copied",
        r.packs_repacked,
        human_bytes(r.bytes_repacked),
        human_bytes(r.bytes_copied)
    );
    println!("unused space left in kept packs: {}", human_bytes(r.unused_bytes_kept));
    if r.blobs_resealed + r.blobs_of_older_epochs_left > 0 {
        println!(
            "blobs {would}sealed again with the current key: {}; of older keys left (beyond --max-repack): {}",
            r.blobs_resealed, r.blobs_of_older_epochs_left
        );
    }
    if r.checkpoints_removed > 0 {
        println!(
            "checkpoints of interrupted backups that can no longer be continued {would}removed: {}",
            r.checkpoints_removed
        );
    }
    if !dry_run {
        let compacted = match r.index_files_compacted {
            0 => String::new(),
            n => format!(" ({n} small ones merged)"),
        };
        println!("index: {} files written, {} removed{compacted}", r.index_files_written, r.index_files_removed);
        if r.packs_waiting > 0 {
            println!(
                "{} packs await deletion until these sessions end (the next prune deletes them):",
                r.packs_waiting
            );
            for s in &r.waiting_for {
                println!("  {s}");
            }
        }
    }
}
