//! `diskvault forget`, `protect`, `unprotect`.

use super::{FilterArgs, Globals};
use crate::error::{Error, Result};
use crate::forget::{self, GroupBy, Policy};
use crate::util::{count, format_utc};

#[derive(clap::Args, Debug)]
pub struct ForgetArgs {
    /// Remove exactly these snapshots instead of applying a policy: ids, unique id prefixes, or `latest` (the
    /// newest snapshot the filters select).
    #[arg(value_name = "SNAPSHOT")]
    snapshots: Vec<String>,
    /// Keep the newest N snapshots.
    #[arg(long, default_value_t = 0)]
    keep_last: u32,
    /// Keep the newest snapshot of each of the last N hours that have one.
    #[arg(long, default_value_t = 0)]
    keep_hourly: u32,
    /// … of each of the last N days.
    #[arg(long, default_value_t = 0)]
    keep_daily: u32,
    /// … of each of the last N weeks (Monday to Sunday, UTC).
    #[arg(long, default_value_t = 0)]
    keep_weekly: u32,
    /// … of each of the last N months.
    #[arg(long, default_value_t = 0)]
    keep_monthly: u32,
    /// … of each of the last N years.
    #[arg(long, default_value_t = 0)]
    keep_yearly: u32,
    /// Keep snapshots younger than this before the newest of their group (e.g. 14d, 6m, 1y2m).
    #[arg(long, value_parser = crate::util::parse_duration)]
    keep_within: Option<i64>,
    /// Keep the newest snapshot of each hour within this time before the newest of their group.
    #[arg(long, value_name = "DURATION", value_parser = crate::util::parse_duration)]
    keep_within_hourly: Option<i64>,
    /// … of each day within this time (e.g. 14d).
    #[arg(long, value_name = "DURATION", value_parser = crate::util::parse_duration)]
    keep_within_daily: Option<i64>,
    /// … of each week within this time (e.g. 3m).
    #[arg(long, value_name = "DURATION", value_parser = crate::util::parse_duration)]
    keep_within_weekly: Option<i64>,
    /// … of each month within this time (e.g. 2y).
    #[arg(long, value_name = "DURATION", value_parser = crate::util::parse_duration)]
    keep_within_monthly: Option<i64>,
    /// … of each year within this time (e.g. 10y).
    #[arg(long, value_name = "DURATION", value_parser = crate::util::parse_duration)]
    keep_within_yearly: Option<i64>,
    /// Keep snapshots with this tag (repeatable).
    #[arg(long = "keep-tag")]
    keep_tags: Vec<String>,
    /// How to group snapshots before applying the policy: any of source, host, tags (comma-separated; empty: one group).
    #[arg(long, default_value = "source", value_parser = GroupBy::parse)]
    group_by: GroupBy,
    #[command(flatten)]
    filter: FilterArgs,
    /// Show what would be removed and which rule keeps what; change nothing.
    #[arg(long, short = 'n')]
    dry_run: bool,
    /// Prune right after (with prune's default thresholds).
    #[arg(long)]
    prune: bool,
}

#[derive(clap::Args, Debug)]
pub struct ProtectArgs {
    /// Snapshot id (or unique prefix).
    snapshot: String,
}

pub fn run(g: &Globals, args: &ForgetArgs) -> Result<()> {
    let policy = Policy {
        last: args.keep_last,
        hourly: args.keep_hourly,
        daily: args.keep_daily,
        weekly: args.keep_weekly,
        monthly: args.keep_monthly,
        yearly: args.keep_yearly,
        within_secs: args.keep_within,
        within_hourly_secs: args.keep_within_hourly,
        within_daily_secs: args.keep_within_daily,
        within_weekly_secs: args.keep_within_weekly,
        within_monthly_secs: args.keep_within_monthly,
        within_yearly_secs: args.keep_within_yearly,
        tags: args.keep_tags.clone(),
    };
    let chosen = !args.snapshots.is_empty();
    if chosen && !policy.is_empty() {
        return Err(Error::invalid("give snapshots to remove or a retention policy (--keep-…), not both"));
    }
    if !chosen && policy.is_empty() {
        return Err(Error::invalid(
            "no policy given (--keep-last, --keep-daily, … ) and no snapshot named: refusing to forget everything",
        ));
    }
    let repo = g.open_repo()?;
    // Held from the listing to the last removal, so that what is decided is what is removed; released before
    // the prune.
    let lock = if args.dry_run { None } else { Some(crate::lock::acquire_snapshots(&repo, "forget")?) };
    let filter = args.filter.filter();
    let protected = forget::protected(&repo)?;
    let decisions = if chosen {
        // A damaged snapshot object named by id can still go: that is how it leaves the repository.
        let (mut snaps, mut damaged) = (Vec::new(), Vec::new());
        for reference in &args.snapshots {
            if reference == "latest" {
                snaps.push(repo.find_snapshot_matching(reference, &filter)?);
                continue;
            }
            let id = repo.resolve_snapshot_id(reference)?;
            match repo.load_snapshot(&id) {
                Ok(s) => snaps.push((id, s)),
                Err(e @ Error::Corrupt { .. }) => damaged.push((id, e.to_string())),
                Err(e) => return Err(e),
            }
        }
        forget::decide_chosen(&snaps, &damaged, &protected)?
    } else {
        forget::decide(&repo.list_snapshots_matching(&filter)?, &policy, args.group_by, &protected)
    };
    let mut group = None;
    for d in &decisions {
        if group.as_ref() != Some(&d.group) {
            println!("{}:", d.group);
            group = Some(d.group.clone());
        }
        if let Some(cause) = &d.damage {
            println!("  remove  {}  ({cause})", d.id.short());
        } else if d.keep() {
            println!("  keep    {}  {}  ({})", d.id.short(), format_utc(d.time_secs), d.reasons.join(", "));
        } else {
            println!("  remove  {}  {}", d.id.short(), format_utc(d.time_secs));
        }
    }
    let to_remove = decisions.iter().filter(|d| !d.keep()).count();
    // What a policy kept is worth saying; named snapshots leave the others out of the picture.
    let kept = |removed: usize| if chosen { String::new() } else { format!(", kept {}", decisions.len() - removed) };
    if args.dry_run {
        let kept = if chosen { String::new() } else { format!(", {} kept", decisions.len() - to_remove) };
        println!("dry run: {} would be removed{kept}", count(to_remove, "snapshot"));
        return Ok(());
    }
    let removed = forget::apply(&repo, &decisions)?;
    drop(lock);
    if !args.prune {
        println!(
            "removed {}{}; their data stays in the repository until it is pruned",
            count(removed, "snapshot"),
            kept(removed)
        );
        return Ok(());
    }
    println!("removed {}{}; pruning", count(removed, "snapshot"), kept(removed));
    let r = crate::prune::run(&repo, &g.cache_root(), &crate::prune::PruneOptions::default())?;
    super::prune::record_metrics(&r);
    super::prune::print_report(&r, false);
    super::object_lock::after_prune(g, &repo, false)
}

pub fn protect(g: &Globals, args: &ProtectArgs, protect: bool) -> Result<()> {
    let repo = g.open_repo()?;
    // Looked up under the lock: a `tag` may have just moved the snapshot to a new id.
    let _lock = crate::lock::acquire_snapshots(&repo, if protect { "protect" } else { "unprotect" })?;
    // By id, whether the snapshot can be read or not: a damaged one that was protected must be unprotected
    // before `forget` takes it out.
    let id = match args.snapshot.as_str() {
        "latest" => repo.find_snapshot("latest", None)?.0,
        reference => repo.resolve_snapshot_id(reference)?,
    };
    forget::set_protected(&repo, &id, protect)?;
    println!(
        "snapshot {} is {}",
        id.short(),
        if protect { "protected: forget keeps it" } else { "no longer protected" }
    );
    Ok(())
}
