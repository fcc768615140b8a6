//! `diskvault tag`: add, remove or set the tags of stored snapshots ([`crate::tag`]).

use super::{FilterArgs, Globals};
use crate::error::{Error, Result};
use crate::tag::TagChange;
use crate::util::{count, format_utc};

#[derive(clap::Args, Debug)]
pub struct TagArgs {
    /// The snapshots (ids, unique prefixes, or `latest` of the filters); none: every snapshot the filters select.
    #[arg(value_name = "SNAPSHOT")]
    snapshots: Vec<String>,
    /// Add these tags (comma-separated; repeatable).
    #[arg(long, value_name = "TAG[,TAG…]")]
    add: Vec<String>,
    /// Remove these tags (comma-separated; repeatable).
    #[arg(long, value_name = "TAG[,TAG…]")]
    remove: Vec<String>,
    /// Replace the tags with these (comma-separated; repeatable; `--set ''` removes all).
    #[arg(long, value_name = "TAG[,TAG…]")]
    set: Vec<String>,
    #[command(flatten)]
    filter: FilterArgs,
    /// Show what would change; change nothing.
    #[arg(long, short = 'n')]
    dry_run: bool,
}

/// `a,b` and `c` as [a, b, c].
fn split(values: &[String]) -> Vec<String> {
    values.iter().flat_map(|v| v.split(',')).map(str::trim).filter(|t| !t.is_empty()).map(String::from).collect()
}

pub fn run(g: &Globals, args: &TagArgs) -> Result<()> {
    let change = TagChange {
        set: (!args.set.is_empty()).then(|| split(&args.set)),
        add: split(&args.add),
        remove: split(&args.remove),
    };
    if change.is_empty() {
        return Err(Error::invalid("nothing to do: give --add, --remove or --set"));
    }
    let repo = g.open_repo()?;
    let filter = args.filter.filter();
    let snapshots = if args.snapshots.is_empty() {
        repo.list_snapshots_matching(&filter)?
    } else {
        args.snapshots.iter().map(|s| repo.find_snapshot_matching(s, &filter)).collect::<Result<Vec<_>>>()?
    };
    let considered = snapshots.len();
    let changed = crate::tag::retag(&repo, snapshots, &change, args.dry_run)?;
    for r in &changed {
        let id = if args.dry_run { r.old.short() } else { format!("{} -> {}", r.old.short(), r.new.short()) };
        println!(
            "{id}  {}  {}  tags: {} -> {}",
            r.snapshot.source,
            format_utc(r.snapshot.time_secs),
            show(&r.old_tags),
            show(&r.snapshot.tags)
        );
    }
    let verb = if args.dry_run { "would change" } else { "changed" };
    println!(
        "{verb} the tags of {} ({} already as asked)",
        count(changed.len(), "snapshot"),
        considered - changed.len()
    );
    Ok(())
}

fn show(tags: &[String]) -> String {
    if tags.is_empty() {
        "(none)".into()
    } else {
        tags.join(",")
    }
}
