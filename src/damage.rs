//! Known damage (format-spec §8d): the blob copies found damaged or lost (by `check`, or by a restore, `serve`
//! or backup that met them: [`record_found`]), shared through `damaged/` records so that every host acts on them
//! before anyone runs `repair packs`:
//!
//! - backups do not deduplicate against such a copy: they store the block again where the source still holds
//!   it, also an unchanged block of a changed-areas incremental ([`crate::backup`]);
//! - the local index cache lists another copy of the blob where an index file names one, so restores, `serve`
//!   and delta bases use the intact copy ([`crate::cache`]);
//! - prune never lets a damaged copy count as the one in use ([`crate::prune`]).
//!
//! `check` writes the records and keeps them current ([`replace`]): a pack read again and found intact
//! clears its entries, and a copy that is neither indexed any more nor the only trace of a lost blob is
//! dropped.

use std::collections::HashSet;

use crate::error::{Error, Result};
use crate::format::damage::DamageRecord;
use crate::format::{names, BlobId, ObjectId};
use crate::repository::{is_unreadable_object, list_ids, Repository};

/// A set of (pack, blob) copies known to be damaged or lost.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KnownDamage {
    copies: HashSet<(ObjectId, BlobId)>,
    blobs: HashSet<BlobId>,
}

impl KnownDamage {
    pub fn new(copies: impl IntoIterator<Item = (ObjectId, BlobId)>) -> KnownDamage {
        let copies: HashSet<(ObjectId, BlobId)> = copies.into_iter().collect();
        let blobs = copies.iter().map(|(_, b)| *b).collect();
        KnownDamage { copies, blobs }
    }

    pub fn is_empty(&self) -> bool {
        self.copies.is_empty()
    }

    pub fn len(&self) -> usize {
        self.copies.len()
    }

    /// Whether the copy of `blob` in `pack` is damaged or lost.
    pub fn at(&self, pack: &ObjectId, blob: &BlobId) -> bool {
        !self.copies.is_empty() && self.copies.contains(&(*pack, *blob))
    }

    /// Whether some copy of `blob` is damaged or lost (another may be intact).
    pub fn names(&self, blob: &BlobId) -> bool {
        !self.blobs.is_empty() && self.blobs.contains(blob)
    }

    /// The blobs with a copy known damaged or lost.
    pub fn blobs(&self) -> impl Iterator<Item = &BlobId> {
        self.blobs.iter()
    }

    /// The copies, sorted (the order of a record).
    pub fn sorted(&self) -> Vec<(ObjectId, BlobId)> {
        let mut v: Vec<(ObjectId, BlobId)> = self.copies.iter().copied().collect();
        v.sort();
        v
    }
}

/// The damage records of a repository, as read.
#[derive(Default)]
pub struct DamageRecords {
    /// Every record listed, readable or not.
    pub ids: Vec<ObjectId>,
    /// The union of the readable ones.
    pub damage: KnownDamage,
    /// Records that cannot be read (damaged themselves, or of a newer version), with the reason.
    pub unreadable: Vec<Error>,
}

/// Reads every damage record. One that cannot be read is set aside (the damage it named is found again by the
/// next `check --read-data`, which replaces it).
pub fn load(repo: &Repository) -> Result<DamageRecords> {
    let mut out = DamageRecords { ids: list_ids(&**repo.backend(), names::DAMAGED)?, ..Default::default() };
    let mut copies = Vec::new();
    for id in &out.ids {
        match repo.load_damage(id) {
            Ok(rec) => copies.extend(rec.entries),
            // Replaced by a check since the listing: its entries are in the record that replaced it.
            Err(Error::Missing { .. }) => {}
            Err(e) if is_unreadable_object(&e) => out.unreadable.push(e),
            Err(e) => return Err(e),
        }
    }
    out.damage = KnownDamage::new(copies);
    Ok(out)
}

/// Replaces the records `previous` with one holding `damage` (none if it is empty): written before the old
/// ones are deleted, so that a reader always finds every copy in some record. A record written by another check
/// meanwhile is not in `previous` and stays.
pub fn replace(repo: &Repository, previous: &[ObjectId], damage: &KnownDamage) -> Result<()> {
    let new =
        if damage.is_empty() { None } else { Some(repo.save_damage(&DamageRecord { entries: damage.sorted() })?) };
    for id in previous.iter().filter(|id| Some(**id) != new) {
        match repo.backend().delete(&names::damaged(id)) {
            Ok(()) | Err(Error::Missing { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Records blob copies a reader (restore, backup) found damaged, beside the records of checks, so that the next
/// backups store those blocks again: those `known` (the damage the reader's cache synced) does not hold yet, in one
/// new record that the next check merges. Best effort: a failure to write (read-only credentials, say) is a
/// warning, and the next `check --read-data` finds the damage again. Returns whether every copy found is now
/// recorded.
pub fn record_found(repo: &Repository, known: &KnownDamage, mut found: Vec<(ObjectId, BlobId)>) -> bool {
    found.retain(|(pack, blob)| !known.at(pack, blob));
    found.sort();
    found.dedup();
    if found.is_empty() {
        return true;
    }
    let n = found.len();
    match repo.save_damage(&DamageRecord { entries: found }) {
        Ok(id) => {
            tracing::warn!(
                "recorded {n} damaged blob cop{} in {}: the next backups of the sources store those blocks again",
                if n == 1 { "y" } else { "ies" },
                names::damaged(&id)
            );
            true
        }
        Err(e) => {
            tracing::warn!("could not record the damage found ({e}); `check --read-data` finds it again");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_replaced_by_one_and_the_empty_set_by_none() {
        let dir = std::env::temp_dir().join(format!("diskvault-damage-{}", std::process::id()));
        let repo = crate::repository::test_repository(&dir);
        let (p, a, b) = (BlobId([1; 32]), BlobId([2; 32]), BlobId([3; 32]));
        let first = repo.save_damage(&DamageRecord { entries: vec![(p, a)] }).unwrap();
        let second = repo.save_damage(&DamageRecord { entries: vec![(p, b)] }).unwrap();
        let loaded = load(&repo).unwrap();
        assert_eq!(loaded.damage, KnownDamage::new([(p, a), (p, b)]));
        assert!(loaded.damage.at(&p, &a) && !loaded.damage.at(&a, &p) && loaded.damage.names(&b));
        replace(&repo, &[first, second], &loaded.damage).unwrap();
        let merged = load(&repo).unwrap();
        assert_eq!((merged.ids.len(), &merged.damage), (1, &loaded.damage));
        replace(&repo, &merged.ids, &KnownDamage::default()).unwrap();
        assert!(load(&repo).unwrap().ids.is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
