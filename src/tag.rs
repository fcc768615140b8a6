//! Changing the tags of stored snapshots (`tag`), as `restic tag` does.
//!
//! A snapshot object is named by the hash of its bytes, so new tags make a new object: the snapshot is written
//! again with them (same time, source, disks and block ids; no data is touched), its protection marker moves
//! to the new id, and the old object is deleted. The annotation [`ORIGINAL`] keeps the id it was first written
//! under, by which `copy` still knows it was copied. Prune needs nothing more: the new object references only
//! what the old one did, and a prune that listed the old one marks it, or finds the new one in its rescue search
//! (format-spec §9b). Under S3 Object Lock the new object gets its retention as any snapshot does, and the old
//! one's version stays in the bucket until its own ends, as after `forget`.

use crate::error::{Error, Result};
use crate::format::snapshot::{Snapshot, ORIGINAL};
use crate::format::{names, ObjectId};
use crate::repository::Repository;

/// What to do to each snapshot's tags: `set` replaces them (when given), then `remove` goes, then `add` comes.
#[derive(Debug, Default, Clone)]
pub struct TagChange {
    pub set: Option<Vec<String>>,
    pub add: Vec<String>,
    pub remove: Vec<String>,
}

impl TagChange {
    pub fn is_empty(&self) -> bool {
        self.set.is_none() && self.add.is_empty() && self.remove.is_empty()
    }

    /// `tags` changed: in their order, each once, added ones last.
    pub fn apply(&self, tags: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for t in self.set.as_deref().unwrap_or(tags) {
            if !self.remove.contains(t) && !out.contains(t) {
                out.push(t.clone());
            }
        }
        for t in &self.add {
            if !out.contains(t) {
                out.push(t.clone());
            }
        }
        out
    }
}

/// One snapshot whose tags changed.
#[derive(Debug, serde::Serialize)]
pub struct Retagged {
    pub old: ObjectId,
    /// The new id (with `dry_run`, the old one: nothing was written).
    pub new: ObjectId,
    pub snapshot: Snapshot,
    pub old_tags: Vec<String>,
}

/// Applies `change` to each of `snapshots`. Returns those whose tags changed; the others are left as they are.
/// With `dry_run` nothing is written. Otherwise it holds the snapshots lock ([`crate::lock::acquire_snapshots`])
/// and first reads each snapshot again: one that another command changed or removed since it was listed is
/// left out with a warning, rather than written back under a new id.
pub fn retag(
    repo: &Repository,
    snapshots: Vec<(ObjectId, Snapshot)>,
    change: &TagChange,
    dry_run: bool,
) -> Result<Vec<Retagged>> {
    let _locks = if dry_run {
        None
    } else {
        Some((crate::lock::acquire_snapshots(repo, "tag")?, crate::lock::start_session(repo, "tag")?))
    };
    let protected = crate::forget::protected(repo)?;
    let mut out = Vec::new();
    for (old, listed) in snapshots {
        let mut snapshot = if dry_run {
            listed
        } else {
            match repo.load_snapshot(&old) {
                Ok(s) => s,
                Err(Error::Missing { .. }) => {
                    tracing::warn!("snapshot {} is gone (changed or forgotten meanwhile): left out", old.short());
                    continue;
                }
                Err(e) => return Err(e),
            }
        };
        let old_tags = std::mem::take(&mut snapshot.tags);
        snapshot.tags = change.apply(&old_tags);
        if snapshot.tags == old_tags {
            continue;
        }
        if dry_run {
            out.push(Retagged { old, new: old, snapshot, old_tags });
            continue;
        }
        snapshot.annotations.entry(ORIGINAL.into()).or_insert_with(|| old.hex());
        // Written before anything is deleted: a failure in between leaves both, never neither.
        let new = repo.save_snapshot(&snapshot)?;
        if protected.contains(&old) {
            crate::forget::set_protected(repo, &new, true)?;
            crate::forget::set_protected(repo, &old, false)?;
        }
        repo.backend().delete(&names::snapshot(&old))?;
        out.push(Retagged { old, new, snapshot, old_tags });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(v: &[&str]) -> Vec<String> {
        v.iter().map(|t| t.to_string()).collect()
    }

    #[test]
    fn set_then_remove_then_add_each_tag_once() {
        let now = tags(&["daily", "vm", "daily"]);
        let add = TagChange { add: tags(&["archive", "vm"]), ..Default::default() };
        assert_eq!(add.apply(&now), tags(&["daily", "vm", "archive"]));
        let remove = TagChange { remove: tags(&["daily", "nope"]), ..Default::default() };
        assert_eq!(remove.apply(&now), tags(&["vm"]));
        let set = TagChange { set: Some(tags(&["a", "b"])), remove: tags(&["b"]), add: tags(&["c"]) };
        assert_eq!(set.apply(&now), tags(&["a", "c"]));
        let clear = TagChange { set: Some(Vec::new()), ..Default::default() };
        assert!(clear.apply(&now).is_empty());
        // Removed and added: added wins, as the last word.
        let both = TagChange { add: tags(&["x"]), remove: tags(&["x"]), ..Default::default() };
        assert_eq!(both.apply(&now), tags(&["daily", "vm", "x"]));
    }
}
