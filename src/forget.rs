//! Retention: which snapshots a policy keeps, and why (`forget`).
//!
//! Snapshots are grouped (by source by default: one VM's disks are one snapshot), each group is ordered
//! newest first, and every rule keeps what it selects; a snapshot is removed only if no rule keeps it and it
//! is not protected. The rules follow restic's: `last` keeps the newest n; `hourly`/`daily`/`weekly`/
//! `monthly`/`yearly` keep the newest snapshot of each of the n newest periods that have one; `within`
//! keeps everything younger than a duration before the group's newest snapshot, and `within-daily` (…) the
//! newest snapshot of each day (…) in that time; `tags` keeps snapshots
//! carrying a tag. Periods are UTC. Snapshots can also be named one by one ([`decide_chosen`]). Forgetting
//! removes snapshot objects only; their data stays until prune.

use std::collections::{BTreeMap, HashSet};

use crate::error::{Error, Result};
use crate::format::snapshot::Snapshot;
use crate::format::{names, ObjectId};
use crate::repository::Repository;
use crate::util::civil_from_days;

#[derive(Clone, Debug, Default)]
pub struct Policy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
    /// Keep snapshots at most this many seconds older than the group's newest.
    pub within_secs: Option<i64>,
    /// Keep the newest snapshot of each hour, day, week, month, year that lies at most this many seconds before
    /// the group's newest (restic's `--keep-within-hourly` …).
    pub within_hourly_secs: Option<i64>,
    pub within_daily_secs: Option<i64>,
    pub within_weekly_secs: Option<i64>,
    pub within_monthly_secs: Option<i64>,
    pub within_yearly_secs: Option<i64>,
    pub tags: Vec<String>,
}

impl Policy {
    pub fn is_empty(&self) -> bool {
        self.last + self.hourly + self.daily + self.weekly + self.monthly + self.yearly == 0
            && self.within_secs.is_none()
            && self.within_periods().iter().all(|(_, w)| w.is_none())
            && self.tags.is_empty()
    }

    fn within_periods(&self) -> [(&'static str, Option<i64>); 5] {
        [
            ("within-hourly", self.within_hourly_secs),
            ("within-daily", self.within_daily_secs),
            ("within-weekly", self.within_weekly_secs),
            ("within-monthly", self.within_monthly_secs),
            ("within-yearly", self.within_yearly_secs),
        ]
    }
}

/// What snapshots are grouped by before a policy is applied to each group (restic's `--group-by`): any of
/// source, host and tags; none puts every snapshot in one group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupBy {
    pub source: bool,
    pub host: bool,
    pub tags: bool,
}

impl GroupBy {
    pub const SOURCE: GroupBy = GroupBy { source: true, host: false, tags: false };
    pub const HOST: GroupBy = GroupBy { source: false, host: true, tags: false };

    /// A comma-separated list of `source`, `host`, `tags`, or the empty string.
    pub fn parse(s: &str) -> std::result::Result<GroupBy, String> {
        let mut g = GroupBy { source: false, host: false, tags: false };
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "source" => g.source = true,
                "host" => g.host = true,
                "tags" => g.tags = true,
                _ => return Err(format!("{part:?}: group by any of `source`, `host`, `tags` (comma-separated)")),
            }
        }
        Ok(g)
    }

    fn key(self, s: &Snapshot) -> String {
        let mut key = match (self.source, self.host) {
            (true, true) => format!("{} on {}", s.source, s.hostname),
            (true, false) => s.source.clone(),
            (false, true) => s.hostname.clone(),
            (false, false) => String::new(),
        };
        if self.tags {
            let mut tags = s.tags.clone();
            tags.sort();
            tags.dedup();
            key = format!("{key}{}tags [{}]", if key.is_empty() { "" } else { " " }, tags.join(","));
        }
        if key.is_empty() {
            key = "all snapshots".into();
        }
        key
    }
}

/// Maps a time (Unix seconds) to the number of its period (hour, day, week…).
type PeriodOf = fn(i64) -> i64;

/// The verdict on one snapshot.
#[derive(Clone, Debug)]
pub struct Decision {
    pub id: ObjectId,
    pub group: String,
    pub time_secs: i64,
    /// Why it is kept (empty: it is removed).
    pub reasons: Vec<String>,
    /// Why the snapshot object cannot be read, for one named by id that is damaged: it can only be removed.
    pub damage: Option<String>,
}

impl Decision {
    pub fn keep(&self) -> bool {
        !self.reasons.is_empty()
    }
}

/// Applies the policy to every group. `protected` snapshots are always kept.
pub fn decide(
    snapshots: &[(ObjectId, Snapshot)],
    policy: &Policy,
    group_by: GroupBy,
    protected: &HashSet<ObjectId>,
) -> Vec<Decision> {
    let mut groups: BTreeMap<String, Vec<&(ObjectId, Snapshot)>> = BTreeMap::new();
    for s in snapshots {
        groups.entry(group_by.key(&s.1)).or_default().push(s);
    }
    let mut out = Vec::new();
    for (group, mut snaps) in groups {
        snaps.sort_by_key(|(id, s)| std::cmp::Reverse((s.time_secs, s.time_nanos, *id)));
        let newest = snaps.first().map(|(_, s)| s.time_secs).unwrap_or(0);
        let mut decisions: Vec<Decision> = snaps
            .iter()
            .map(|(id, s)| Decision {
                id: *id,
                group: group.clone(),
                time_secs: s.time_secs,
                reasons: Vec::new(),
                damage: None,
            })
            .collect();
        for (i, (id, s)) in snaps.iter().enumerate() {
            if protected.contains(id) {
                decisions[i].reasons.push("protected".into());
            }
            if let Some(t) = policy.tags.iter().find(|t| s.tags.contains(t)) {
                decisions[i].reasons.push(format!("tag {t}"));
            }
            if policy.within_secs.is_some_and(|w| newest - s.time_secs <= w) {
                decisions[i].reasons.push("within".into());
            }
            if (i as u32) < policy.last {
                decisions[i].reasons.push("last".into());
            }
        }
        let periods: [(&str, u32, PeriodOf); 5] = [
            ("hourly", policy.hourly, |t| t.div_euclid(3600)),
            ("daily", policy.daily, |t| t.div_euclid(86400)),
            // Weeks start on Monday; 1970-01-01 was a Thursday.
            ("weekly", policy.weekly, |t| {
                let d = t.div_euclid(86400);
                d - (d + 3).rem_euclid(7)
            }),
            ("monthly", policy.monthly, |t| {
                let (y, m, _) = civil_from_days(t.div_euclid(86400));
                y * 12 + m as i64
            }),
            ("yearly", policy.yearly, |t| civil_from_days(t.div_euclid(86400)).0),
        ];
        for (name, count, bucket) in periods {
            let mut left = count;
            let mut last_bucket = None;
            for (i, (_, s)) in snaps.iter().enumerate() {
                if left == 0 {
                    break;
                }
                let b = bucket(s.time_secs);
                if last_bucket != Some(b) {
                    decisions[i].reasons.push(name.into());
                    last_bucket = Some(b);
                    left -= 1;
                }
            }
        }
        // The same periods, bounded by age instead of by count.
        for ((name, within), (_, _, bucket)) in policy.within_periods().into_iter().zip(periods) {
            let Some(within) = within else { continue };
            let mut last_bucket = None;
            for (i, (_, s)) in snaps.iter().enumerate() {
                if newest - s.time_secs > within {
                    break;
                }
                let b = bucket(s.time_secs);
                if last_bucket != Some(b) {
                    decisions[i].reasons.push(name.into());
                    last_bucket = Some(b);
                }
            }
        }
        out.extend(decisions);
    }
    out
}

/// The verdicts for removing exactly the `chosen` snapshots (restic's `forget ID…`), grouped as a policy's are,
/// and the `damaged` snapshot objects named (id, why it cannot be read), last. A protected one is an error
/// naming it, so that nothing is removed: unprotecting is a decision of its own.
pub fn decide_chosen(
    chosen: &[(ObjectId, Snapshot)],
    damaged: &[(ObjectId, String)],
    protected: &HashSet<ObjectId>,
) -> Result<Vec<Decision>> {
    if let Some(id) =
        chosen.iter().map(|(id, _)| id).chain(damaged.iter().map(|(id, _)| id)).find(|id| protected.contains(id))
    {
        return Err(Error::invalid(format!(
            "snapshot {} is protected: `unprotect {}` first if it is to go",
            id.short(),
            id.short()
        )));
    }
    let mut decisions: Vec<Decision> = chosen
        .iter()
        .map(|(id, s)| Decision {
            id: *id,
            group: GroupBy::SOURCE.key(s),
            time_secs: s.time_secs,
            reasons: Vec::new(),
            damage: None,
        })
        .collect();
    decisions.sort_by(|a, b| a.group.cmp(&b.group).then(b.time_secs.cmp(&a.time_secs)));
    decisions.extend(damaged.iter().map(|(id, cause)| Decision {
        id: *id,
        group: "damaged snapshots".into(),
        time_secs: 0,
        reasons: Vec::new(),
        damage: Some(cause.clone()),
    }));
    decisions.dedup_by_key(|d| d.id);
    Ok(decisions)
}

/// Snapshot ids marked protected (`protected/<snapshot id>` objects).
pub fn protected(repo: &Repository) -> Result<HashSet<ObjectId>> {
    Ok(crate::repository::list_ids(&**repo.backend(), names::PROTECTED)?.into_iter().collect())
}

/// Marks or unmarks a snapshot as protected: a protected snapshot is never forgotten. The caller holds the
/// snapshots lock ([`crate::lock::acquire_snapshots`]) and has seen the snapshot exist under it.
pub fn set_protected(repo: &Repository, id: &ObjectId, protect: bool) -> Result<()> {
    let name = names::protected(id);
    if protect {
        repo.backend().put(&name, b"")
    } else {
        repo.backend().delete(&name)
    }
}

/// Removes the snapshots the decisions do not keep. Returns how many were removed. The caller holds the
/// snapshots lock ([`crate::lock::acquire_snapshots`]), as for [`set_protected`].
pub fn apply(repo: &Repository, decisions: &[Decision]) -> Result<usize> {
    let protected = protected(repo)?;
    let mut removed = 0;
    for d in decisions.iter().filter(|d| !d.keep()) {
        // Checked again just before deleting: protection may have been added meanwhile.
        if protected.contains(&d.id) {
            return Err(Error::invalid(format!("snapshot {} is protected", d.id.short())));
        }
        repo.backend().delete(&names::snapshot(&d.id))?;
        removed += 1;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::snapshot::Summary;
    use crate::format::BlobId;

    fn snap(i: u8, time: i64, source: &str, tags: &[&str]) -> (ObjectId, Snapshot) {
        (
            BlobId([i; 32]),
            Snapshot {
                time_secs: time,
                time_nanos: 0,
                hostname: "h".into(),
                username: "u".into(),
                source: source.into(),
                tags: tags.iter().map(|t| t.to_string()).collect(),
                parent: None,
                disks: vec![],
                annotations: Default::default(),
                summary: Summary::default(),
            },
        )
    }

    fn kept(d: &[Decision]) -> Vec<u8> {
        let mut v: Vec<u8> = d.iter().filter(|d| d.keep()).map(|d| d.id.0[0]).collect();
        v.sort();
        v
    }

    #[test]
    fn daily_weekly_monthly() {
        // One snapshot a day at noon from 2026-01-01 (a Thursday) for 60 days; ids 1..=60.
        let base = crate::util::parse_utc("2026-01-01 12:00").unwrap();
        let snaps: Vec<_> = (0..60).map(|d| snap(d as u8 + 1, base + d * 86400, "vm", &[])).collect();
        let p = Policy { daily: 3, ..Default::default() };
        assert_eq!(kept(&decide(&snaps, &p, GroupBy::SOURCE, &HashSet::new())), vec![58, 59, 60]);
        // Weekly: newest of each of the 2 newest weeks. Day 60 = 2026-03-01 (Sunday), its week starts on day 54.
        let p = Policy { weekly: 2, ..Default::default() };
        assert_eq!(kept(&decide(&snaps, &p, GroupBy::SOURCE, &HashSet::new())), vec![53, 60]);
        // Monthly 3: Mar 1 (60), Feb 28 (59), Jan 31 (31).
        let p = Policy { monthly: 3, ..Default::default() };
        assert_eq!(kept(&decide(&snaps, &p, GroupBy::SOURCE, &HashSet::new())), vec![31, 59, 60]);
        let p = Policy { within_secs: Some(2 * 86400), last: 1, ..Default::default() };
        assert_eq!(kept(&decide(&snaps, &p, GroupBy::SOURCE, &HashSet::new())), vec![58, 59, 60]);
    }

    #[test]
    fn within_periods_keep_one_per_period_for_a_time() {
        // Four snapshots a day (00:00, 06:00, 12:00, 18:00) from 2026-01-01 for 60 days; ids 1..=240.
        let base = crate::util::parse_utc("2026-01-01 00:00").unwrap();
        let snaps: Vec<_> = (0..240).map(|k| snap(k as u8 + 1, base + k * 6 * 3600, "vm", &[])).collect();
        let decide_with = |p: Policy| decide(&snaps, &p, GroupBy::SOURCE, &HashSet::new());
        // The newest is day 60 (Mar 1) at 18:00 (id 240). Within 2 days of it: Feb 27 18:00 .. Mar 1 18:00, so
        // the last of Feb 27 (232), Feb 28 (236) and Mar 1 (240).
        let d = decide_with(Policy { within_daily_secs: Some(2 * 86400), ..Default::default() });
        assert_eq!(kept(&d), vec![232, 236, 240]);
        assert!(d.iter().filter(|d| d.keep()).all(|d| d.reasons == ["within-daily"]));
        // Within 12 hours, hourly: every snapshot from 06:00 on Mar 1 (one per hour that has one).
        let d = decide_with(Policy { within_hourly_secs: Some(12 * 3600), ..Default::default() });
        assert_eq!(kept(&d), vec![238, 239, 240]);
        // Within 20 days, monthly: the last of February (236) and March (240); within 40, January's too (124).
        let d = decide_with(Policy { within_monthly_secs: Some(20 * 86400), ..Default::default() });
        assert_eq!(kept(&d), vec![236, 240]);
        let d = decide_with(Policy { within_monthly_secs: Some(40 * 86400), ..Default::default() });
        assert_eq!(kept(&d), vec![124, 236, 240]);
        // Weekly within 13 days (from Mon Feb 16 18:00): Mar 1 is a Sunday, so its week (from Feb 23) and the one
        // before, whose last is Sun Feb 22 18:00 (212). 14 days reach Sun Feb 15 18:00, the last of a third week.
        let d = decide_with(Policy { within_weekly_secs: Some(13 * 86400), ..Default::default() });
        assert_eq!(kept(&d), vec![212, 240]);
        let d = decide_with(Policy { within_weekly_secs: Some(14 * 86400), ..Default::default() });
        assert_eq!(kept(&d), vec![184, 212, 240]);
        // Yearly, and combined with a count rule: both reasons are given.
        let d = decide_with(Policy { within_yearly_secs: Some(365 * 86400), daily: 1, ..Default::default() });
        assert_eq!(kept(&d), vec![240]);
        assert_eq!(d.iter().find(|d| d.keep()).unwrap().reasons, ["daily", "within-yearly"]);
    }

    #[test]
    fn groups_tags_and_protection() {
        let snaps =
            vec![snap(1, 100, "a", &[]), snap(2, 200, "a", &["keep"]), snap(3, 300, "a", &[]), snap(4, 50, "b", &[])];
        let p = Policy { last: 1, tags: vec!["keep".into()], ..Default::default() };
        let prot: HashSet<ObjectId> = [BlobId([1; 32])].into();
        assert_eq!(kept(&decide(&snaps, &p, GroupBy::SOURCE, &prot)), vec![1, 2, 3, 4]);
        assert_eq!(kept(&decide(&snaps, &p, GroupBy::SOURCE, &HashSet::new())), vec![2, 3, 4]);
        assert_eq!(
            kept(&decide(&snaps, &Policy { last: 1, ..Default::default() }, GroupBy::HOST, &HashSet::new())),
            vec![3]
        );
    }
}
