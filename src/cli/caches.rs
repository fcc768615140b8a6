//! `diskvault cache`: the local caches of this host, one per repository, and removing those no longer used.

use std::time::Duration;

use super::Globals;
use crate::cache::dirs::{self, CacheDir};
use crate::error::{Error, Result};
use crate::util::{format_utc, human_bytes};

/// The default of `--max-age`, as restic's.
pub const DEFAULT_MAX_AGE: &str = "30d";

#[derive(clap::Args, Debug)]
pub struct CacheArgs {
    /// Remove the caches not used for longer than --max-age (repositories this host no longer backs up). A cache
    /// a running process holds (a backup, a `serve` of weeks) is kept. Nothing of the repository is lost: a
    /// removed cache is rebuilt from it.
    #[arg(long)]
    cleanup: bool,
    /// How long a cache must have gone unused to count as old: `30d`, `2w`, `6m`… (at least a day: a cache used
    /// today is kept even if no process holds it).
    #[arg(long, default_value = DEFAULT_MAX_AGE, value_name = "DURATION", value_parser = parse_max_age)]
    max_age: Duration,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

fn parse_max_age(s: &str) -> std::result::Result<Duration, String> {
    let secs = crate::util::parse_duration(s)?;
    let age = Duration::from_secs(secs.unsigned_abs());
    if age < dirs::MIN_AGE {
        return Err(format!("{s:?}: at least a day (1d)"));
    }
    Ok(age)
}

pub fn run(g: &Globals, args: &CacheArgs) -> Result<()> {
    let root = g.cache_root();
    let listed = dirs::list(&root).map_err(|e| Error::local(&root, e))?;
    let mut removed: Vec<&CacheDir> = Vec::new();
    let mut failed = 0;
    if args.cleanup {
        dirs::remove_leftovers(&root);
        for d in dirs::unused(&listed, args.max_age) {
            match dirs::remove(d, args.max_age) {
                Ok(()) => removed.push(d),
                Err(e) => {
                    failed += 1;
                    eprintln!("warning: {} not removed: {e}", d.path.display());
                }
            }
        }
    }
    let is_removed = |d: &CacheDir| removed.iter().any(|r| r.path == d.path);
    if args.json {
        let caches: Vec<serde_json::Value> = listed
            .iter()
            .map(|d| {
                serde_json::json!({
                    "repository_id": d.repository_id,
                    "location": d.location,
                    "path": d.path,
                    "bytes": d.bytes,
                    "last_used": unix_secs(d),
                    "in_use": d.in_use,
                    "old": d.is_old(args.max_age),
                    "removed": is_removed(d),
                })
            })
            .collect();
        let out = serde_json::json!({ "root": root, "caches": caches });
        println!("{}", serde_json::to_string_pretty(&out).map_err(|e| Error::invalid(e.to_string()))?);
    } else {
        print_table(&root, &listed, args, &is_removed);
    }
    if failed > 0 {
        return Err(Error::local(&root, std::io::Error::other(format!("{failed} old caches could not be removed"))));
    }
    Ok(())
}

fn print_table(root: &std::path::Path, listed: &[CacheDir], args: &CacheArgs, is_removed: &dyn Fn(&CacheDir) -> bool) {
    if listed.is_empty() {
        println!("no caches in {}", root.display());
        return;
    }
    println!("{:<10} {:>10}  {:<26} {:<8} location", "repository", "size", "last used (UTC)", "state");
    for d in listed {
        let state = if is_removed(d) {
            "removed"
        } else if d.in_use {
            "in use"
        } else if d.is_old(args.max_age) {
            "old"
        } else {
            ""
        };
        let used = format!("{} ({})", &format_utc(unix_secs(d))[..10], days_ago(d.age()));
        println!(
            "{:<10} {:>10}  {:<26} {:<8} {}",
            &d.repository_id[..8],
            human_bytes(d.bytes),
            used,
            state,
            d.location.as_deref().unwrap_or("-")
        );
    }
    let total: u64 = listed.iter().map(|d| d.bytes).sum();
    println!("{} in {}, {}", crate::util::count(listed.len(), "cache"), root.display(), human_bytes(total));
    let removed: Vec<&CacheDir> = listed.iter().filter(|d| is_removed(d)).collect();
    if args.cleanup {
        let freed: u64 = removed.iter().map(|d| d.bytes).sum();
        println!("removed {}, {} freed", crate::util::count(removed.len(), "old cache"), human_bytes(freed));
    } else {
        let old = dirs::unused(listed, args.max_age);
        if !old.is_empty() {
            println!(
                "{} unused for longer than {}: `diskvault cache --cleanup` removes {}",
                crate::util::count(old.len(), "cache"),
                days(args.max_age),
                if old.len() == 1 { "it" } else { "them" }
            );
        }
    }
}

/// Once per process, when a command opens the cache of `repo`: the caches of other repositories left unused for
/// longer than the default age are noted, as restic notes them (not with `--quiet`), or with `--cleanup-cache`
/// removed.
pub fn note_old_caches(g: &Globals, repo: &crate::repository::Repository) {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let quiet = matches!(g.progress, crate::progress::Mode::Quiet);
        if quiet && !g.cleanup_cache {
            return;
        }
        let root = g.cache_root();
        let Ok(listed) = dirs::list(&root) else { return };
        let Ok(max_age) = parse_max_age(DEFAULT_MAX_AGE) else { return };
        let mut old = dirs::unused(&listed, max_age);
        old.retain(|d| d.repository_id != repo.config().id_hex());
        if old.is_empty() {
            return;
        }
        if g.cleanup_cache {
            dirs::remove_leftovers(&root);
            for d in old {
                match dirs::remove(d, max_age) {
                    Ok(()) if !quiet => eprintln!(
                        "removed the local cache {} ({}, last used {})",
                        d.path.display(),
                        human_bytes(d.bytes),
                        days_ago(d.age())
                    ),
                    Ok(()) => {}
                    Err(e) => eprintln!("warning: old local cache {} not removed: {e}", d.path.display()),
                }
            }
            return;
        }
        let bytes: u64 = old.iter().map(|d| d.bytes).sum();
        eprintln!(
            "note: {} in {} unused for longer than {} ({}): `diskvault cache --cleanup` (or --cleanup-cache) removes {}",
            crate::util::count(old.len(), "local cache"),
            root.display(),
            days(max_age),
            human_bytes(bytes),
            if old.len() == 1 { "it" } else { "them" }
        );
    });
}

fn unix_secs(d: &CacheDir) -> i64 {
    d.last_used.duration_since(std::time::UNIX_EPOCH).map(|t| t.as_secs() as i64).unwrap_or(0)
}

fn days(age: Duration) -> String {
    crate::util::count((age.as_secs() / 86400) as usize, "day")
}

fn days_ago(age: Duration) -> String {
    match age.as_secs() / 86400 {
        0 => "today".to_string(),
        n => format!("{} ago", crate::util::count(n as usize, "day")),
    }
}
