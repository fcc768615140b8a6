//! Keeping what the snapshots need under the storage's retention (S3 Object Lock) for as long as users were
//! promised.
//!
//! With `DISKVAULT_S3_OBJECT_LOCK=MODE:DAYS` every object that makes up backups is written with a retention of
//! DAYS: until then nobody holding the storage credentials (ransomware, a mistaken admin) can delete it. That
//! alone protects a pack for DAYS after its upload, while an incremental-forever chain keeps needing the packs
//! of the first full backup for years: on day DAYS + 1 they could be deleted, and with them every snapshot.
//! [`extend`] lengthens the retention of everything the repository needs (config, keys, snapshots, index files,
//! packs; not the packs a prune dropped, which are left to expire) whose retention ends within DAYS +
//! [`GENERATION`], to DAYS + 2 x [`GENERATION`]. Run at least once per [`GENERATION`] (prune runs it, and the
//! nightly maintenance runs prune), every object any snapshot needs stays retained for at least DAYS ahead,
//! while each object is touched about once per generation rather than on every run (Veeam's "block generation"
//! idea: fewer retention requests for a few days' longer storage of dropped packs). Format spec §9c.
//!
//! The retention each object was found with or given is recorded in the host's local cache
//! ([`IndexCache::record_retention`]): an object recorded as retained beyond the threshold is not asked again,
//! so a nightly run sends a request per object only about once per generation, not one per object every night
//! (a million packs: a million HEAD requests). The record never claims more than the storage said or was told,
//! and retention only grows: COMPLIANCE retention cannot be shortened, GOVERNANCE retention only by someone
//! allowed to bypass it, who can delete the object anyway.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use crate::backend::RetentionPolicy;
use crate::cache::IndexCache;
use crate::error::{Error, Result};
use crate::format::names;
use crate::format::ObjectId;
use crate::repository::Repository;

/// How far ahead of the promised retention an extension reaches, and how often it must run.
pub const GENERATION: Duration = Duration::from_secs(7 * 86400);

/// What [`extend`] found and did.
#[derive(Debug, Default, serde::Serialize)]
pub struct ObjectLockReport {
    pub mode: String,
    pub days: u32,
    /// Objects the repository needs, examined.
    pub objects: u64,
    /// Their retention was extended (with `dry_run`: would be).
    pub extended: u64,
    /// Of those, objects that had no retention at all (written without `DISKVAULT_S3_OBJECT_LOCK`).
    pub had_none: u64,
    /// Already retained beyond the threshold: left as they are.
    pub held: u64,
    /// Of those, objects this host's record shows retained beyond the threshold: no request sent.
    pub held_as_recorded: u64,
    /// Packs a prune dropped (in deletion records): not extended, so that they can be deleted.
    pub dropped_packs: u64,
    /// Objects that disappeared between listing and extending (deleted by a prune meanwhile).
    pub gone: u64,
    /// The retention given to extended objects, as seconds since the epoch (our clock).
    pub extended_until: Option<i64>,
    /// After the run, the earliest end of retention of any needed object (our clock), `None` if none is
    /// retained. With `dry_run`, as it is now.
    pub earliest_until: Option<i64>,
    /// Objects whose retention could not be read or extended: name and cause.
    pub failures: Vec<String>,
}

/// Extends the retention of every object the repository needs whose retention ends within the policy's days +
/// [`GENERATION`] to days + 2 x [`GENERATION`] (their own mode kept; the policy's for objects without one).
/// `dry_run` only reports. `record`: the host's cache, where retention ends read or set are recorded and
/// looked up first. Failures on single objects are collected in the report, not returned.
pub fn extend(repo: &Repository, record: Option<&IndexCache>, dry_run: bool) -> Result<ObjectLockReport> {
    let backend = repo.backend().as_ref();
    let RetentionPolicy { mode, days } = backend.retention_policy().ok_or_else(|| {
        Error::invalid(format!(
            "{}: no Object Lock retention is configured (DISKVAULT_S3_OBJECT_LOCK=MODE:DAYS, on an S3 bucket \
             created with Object Lock)",
            backend.location()
        ))
    })?;
    let promised = Duration::from_secs(u64::from(days) * 86400);
    let threshold = promised + GENERATION;
    let target = promised + 2 * GENERATION;

    let dropped: HashSet<ObjectId> = repo.list_deletions()?.into_iter().flat_map(|(_, record)| record.packs).collect();
    let mut report = ObjectLockReport { mode: mode.clone(), days, ..Default::default() };
    let mut needed = vec![names::CONFIG.to_string()];
    for dir in [names::KEYS, names::SNAPSHOTS, names::INDEX] {
        needed.extend(backend.list(dir)?.into_iter().map(|o| o.name));
    }
    for id in crate::repository::list_ids(backend, names::PACKS)? {
        match dropped.contains(&id) {
            true => report.dropped_packs += 1,
            false => needed.push(names::pack(&id)),
        }
    }
    report.objects = needed.len() as u64;

    let now = crate::util::now_secs();
    let outcome = Mutex::new(&mut report);
    let next = AtomicUsize::new(0);
    // A record that cannot be read or written only costs the request it would have saved. The config is always
    // asked: it is the one object rewritten in place (`key rotate`), and a new version has retention of its own.
    let recorded = |name: &str| match name == names::CONFIG {
        true => None,
        false => record.and_then(|c| c.retention_until(name).ok().flatten()),
    };
    let remember = |name: &str, until: i64| {
        if let Some(c) = record {
            let _ = c.record_retention(name, until);
        }
    };
    let examine = |name: &str| -> Result<()> {
        if let Some(until) = recorded(name).filter(|&until| until - now >= threshold.as_secs() as i64) {
            let mut r = outcome.lock().unwrap_or_else(|p| p.into_inner());
            r.held += 1;
            r.held_as_recorded += 1;
            keep_earliest(&mut r.earliest_until, until);
            return Ok(());
        }
        let current = backend.retention(name)?;
        let left = current.as_ref().map(|r| r.left).unwrap_or_default();
        if left >= threshold {
            remember(name, now + left.as_secs() as i64);
            let mut r = outcome.lock().unwrap_or_else(|p| p.into_inner());
            r.held += 1;
            keep_earliest(&mut r.earliest_until, now + left.as_secs() as i64);
            return Ok(());
        }
        let until = if dry_run {
            Some(left)
        } else {
            // An object keeps its mode: COMPLIANCE cannot be turned into GOVERNANCE.
            let mode = current.as_ref().filter(|r| !r.left.is_zero()).map_or(mode.as_str(), |r| r.mode.as_str());
            let extended = backend.extend_retention(name, mode, target)?.then_some(target);
            if extended.is_some() {
                remember(name, now + target.as_secs() as i64);
            }
            extended
        };
        let mut r = outcome.lock().unwrap_or_else(|p| p.into_inner());
        match until {
            Some(until) => {
                r.extended += 1;
                r.had_none += u64::from(current.is_none());
                if !until.is_zero() {
                    keep_earliest(&mut r.earliest_until, now + until.as_secs() as i64);
                }
            }
            None => r.gone += 1,
        }
        Ok(())
    };
    let interrupted = AtomicBool::new(false);
    std::thread::scope(|s| {
        for _ in 0..crate::util::REQUESTS_IN_FLIGHT.min(needed.len()) {
            s.spawn(|| {
                while let Some(name) = needed.get(next.fetch_add(1, Ordering::Relaxed)) {
                    if crate::util::interrupted() {
                        interrupted.store(true, Ordering::Relaxed);
                        return;
                    }
                    if let Err(e) = examine(name) {
                        outcome.lock().unwrap_or_else(|p| p.into_inner()).failures.push(e.to_string());
                    }
                }
            });
        }
    });
    if interrupted.into_inner() {
        return Err(Error::Interrupted);
    }
    if !dry_run && report.extended > 0 {
        report.extended_until = Some(now + target.as_secs() as i64);
    }
    report.failures.sort();
    Ok(report)
}

fn keep_earliest(earliest: &mut Option<i64>, until: i64) {
    *earliest = Some(earliest.map_or(until, |e| e.min(until)));
}
