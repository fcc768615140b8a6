//! `forget`: retention policies through the CLI, dry run, protection, and that kept snapshots still restore.

mod common;

use common::*;

/// Backs up a small disk whose content differs per day; returns (snapshot id, image) per day.
fn daily_backups(e: &Env, days: &[&str]) -> Vec<(String, Vec<u8>)> {
    days.iter()
        .enumerate()
        .map(|(i, day)| {
            let img = random_bytes(500 + i as u64, MIB + 17);
            write(&e.path("disk.raw"), &img);
            let r =
                e.backup(&["--name", "vm", "--time", &format!("{day} 22:00:00"), e.path("disk.raw").to_str().unwrap()]);
            (r["snapshot"].as_str().unwrap().to_string(), img)
        })
        .collect()
}

fn snapshot_ids(e: &Env) -> Vec<String> {
    e.ok(&["snapshots", "--json"])
        .json()
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn keep_daily_and_weekly_with_dry_run_and_protection() {
    let e = Env::with_repo();
    // Mon 2026-11-02 … Sun 2026-11-15: two weeks, one snapshot a day.
    let days: Vec<String> = (2..=15).map(|d| format!("2026-11-{d:02}")).collect();
    let days: Vec<&str> = days.iter().map(String::as_str).collect();
    let snaps = daily_backups(&e, &days);

    let r = e.fails(&["forget"]);
    assert!(r.stderr.contains("no policy"), "{}", r.stderr);

    let dry = e.ok(&["forget", "--keep-daily", "3", "--keep-weekly", "2", "--dry-run"]).stdout;
    assert!(dry.contains("10 snapshots would be removed, 4 kept"), "{dry}");
    assert!(dry.contains("daily, weekly"), "the rules that keep a snapshot are named: {dry}");
    assert_eq!(snapshot_ids(&e).len(), 14, "a dry run changes nothing");
    // By age instead of count: one a day for 2 days before the newest (Nov 13 22:00 on), one a week for 9 days
    // (from Nov 6 22:00: the week from Nov 2 has its last there, Nov 8).
    let dry = e.ok(&["forget", "--keep-within-daily", "2d", "--keep-within-weekly", "9d", "-n"]).stdout;
    assert!(dry.contains("10 snapshots would be removed, 4 kept"), "{dry}");
    assert!(dry.contains("(within-daily, within-weekly)") && dry.contains("(within-weekly)"), "{dry}");

    // Protect the oldest: forget must keep it.
    let oldest = &snaps[0].0;
    e.ok(&["protect", &oldest[..12]]);
    let out = e.ok(&["forget", "--keep-daily", "3", "--keep-weekly", "2"]).stdout;
    assert!(out.contains("removed 9 snapshots"), "{out}");
    let left = snapshot_ids(&e);
    // Kept: Nov 13, 14, 15 (daily; 15 is also the newest of its week), Nov 8 (newest of the week before), Nov 2 (protected).
    let expected: Vec<&String> = [0usize, 6, 11, 12, 13].iter().map(|&i| &snaps[i].0).collect();
    let mut got: Vec<&String> = left.iter().collect();
    got.sort();
    let mut want = expected.clone();
    want.sort();
    assert_eq!(got, want);
    for i in [0usize, 6, 13] {
        assert_eq!(e.restore(&snaps[i].0, &[]), snaps[i].1, "kept snapshot of day {i} restores");
    }
    assert!(e.ok(&["check"]).stdout.contains("no errors found"));
    // Unprotected, it goes with the next forget.
    e.ok(&["unprotect", &oldest[..12]]);
    let out = e.ok(&["forget", "--keep-daily", "3", "--keep-weekly", "2"]).stdout;
    assert!(out.contains("removed 1 snapshot, kept"), "{out}");
}

#[test]
fn named_snapshots_are_forgotten_and_the_others_still_restore() {
    let e = Env::with_repo();
    let days = daily_backups(&e, &["2026-11-02", "2026-11-03", "2026-11-04", "2026-11-05"]);
    write(&e.path("db.raw"), &random_bytes(900, MIB));
    let db = e.backup(&["--name", "db", e.path("db.raw").to_str().unwrap()])["snapshot"].as_str().unwrap().to_string();
    let prefix = |i: usize| days[i].0[..8].to_string();

    let r = e.fails(&["forget", &prefix(0), "--keep-last", "1"]);
    assert!(r.stderr.contains("not both"), "{}", r.stderr);
    let r = e.fails(&["forget", "0123abcd"]);
    assert!(r.stderr.contains("no snapshot with id 0123abcd"), "{}", r.stderr);
    // A protected snapshot among those named: refused, and none of them is removed.
    // (Removed newest first: the protected one, older, would come second.)
    e.ok(&["protect", &prefix(0)]);
    let r = e.fails(&["forget", &prefix(0), &prefix(1)]);
    assert!(r.stderr.contains(&format!("snapshot {} is protected", &days[0].0[..8])), "{}", r.stderr);
    assert_eq!(snapshot_ids(&e).len(), 5);
    e.ok(&["unprotect", &prefix(0)]);

    // `latest` is the newest snapshot the filters select: vm's of Nov 5, not db's.
    let dry = e.ok(&["forget", &prefix(1), "latest", "--name", "vm", "--dry-run"]).stdout;
    assert!(dry.contains("2 snapshots would be removed") && dry.contains(&days[3].0[..8]), "{dry}");
    assert_eq!(snapshot_ids(&e).len(), 5, "a dry run changes nothing");

    let before = e.pack_bytes();
    let out = e.ok(&["forget", &prefix(1), "latest", "--name", "vm", "--prune"]).stdout;
    assert!(out.contains("removed 2 snapshots; pruning"), "{out}");
    let mut left = snapshot_ids(&e);
    left.sort();
    let mut want = vec![days[0].0.clone(), days[2].0.clone(), db.clone()];
    want.sort();
    assert_eq!(left, want);
    // Each day's disk is its own random MiB and 17 bytes: the prune freed the two that only they used.
    assert!(before - e.pack_bytes() >= 2 * MIB as u64, "{before} -> {}", e.pack_bytes());
    for i in [0, 2] {
        assert_eq!(e.restore(&days[i].0, &[]), days[i].1, "day {i} restores");
    }
    assert_eq!(e.restore(&db, &[]), random_bytes(900, MIB));
    assert!(e.ok(&["check", "--read-data"]).stdout.contains("no errors found"));
}

#[test]
fn tags_are_changed_with_the_snapshot_kept_whole_and_protection_following_it() {
    let e = Env::with_repo();
    let days = daily_backups(&e, &["2026-11-02", "2026-11-03", "2026-11-04"]);
    let before: Vec<serde_json::Value> = e.ok(&["snapshots", "--json"]).json().as_array().unwrap().clone();
    e.ok(&["protect", &days[0].0[..8]]);

    assert!(e.fails(&["tag", &days[0].0[..8]]).stderr.contains("give --add, --remove or --set"));
    let dry = e.ok(&["tag", "--add", "archive,q4", "--name", "vm", "-n"]).stdout;
    assert!(dry.contains("would change the tags of 3 snapshots"), "{dry}");
    assert_eq!(snapshot_ids(&e).len(), 3);
    assert!(e.ok(&["snapshots", "--tag", "archive"]).stdout.contains("0 snapshots"), "a dry run changes nothing");

    let out = e.ok(&["tag", "--add", "archive,q4", "--name", "vm"]).stdout;
    assert!(out.contains("changed the tags of 3 snapshots (0 already as asked)"), "{out}");
    // (Its id changed with the first tag: `latest` finds it.)
    let out = e.ok(&["tag", "latest", "--name", "vm", "--remove", "q4", "--add", "monthly"]).stdout;
    assert!(out.contains("tags: archive,q4 -> archive,monthly"), "{out}");
    assert!(e.ok(&["tag", "--add", "archive"]).stdout.contains("changed the tags of 0 snapshots (3 already as asked)"));

    // Each snapshot is there once, under a new id, with everything but its tags as it was.
    let after: Vec<serde_json::Value> = e.ok(&["snapshots", "--json"]).json().as_array().unwrap().clone();
    assert_eq!(after.len(), 3);
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(a["id"], b["id"]);
        for field in ["time", "source", "hostname", "disks", "parent"] {
            assert_eq!(a[field], b[field], "{field}");
        }
    }
    let tags: Vec<&serde_json::Value> = after.iter().map(|s| &s["tags"]).collect();
    assert_eq!(
        tags,
        [
            &serde_json::json!(["archive", "q4"]),
            &serde_json::json!(["archive", "q4"]),
            &serde_json::json!(["archive", "monthly"])
        ]
    );
    for (i, s) in after.iter().enumerate() {
        assert_eq!(e.restore(s["id"].as_str().unwrap(), &[]), days[i].1, "day {i} restores under its new id");
    }
    // The protection moved with the first day's snapshot; the retention rules see the new tags.
    let out = e.ok(&["forget", "--keep-tag", "monthly"]).stdout;
    assert!(out.contains("removed 1 snapshot, kept 2"), "{out}");
    let left = snapshot_ids(&e);
    assert!(left.contains(&after[0]["id"].as_str().unwrap().to_string()), "the protected one stays");
    assert!(left.contains(&after[2]["id"].as_str().unwrap().to_string()), "the monthly one stays");
    assert!(e.ok(&["check", "--read-data"]).stdout.contains("no errors found"));
}

#[test]
fn keep_last_per_source_and_keep_tag() {
    let e = Env::with_repo();
    for (i, name) in ["a", "a", "a", "b", "b"].iter().enumerate() {
        write(&e.path("d"), &random_bytes(i as u64, MIB));
        let tag = if i == 0 { "golden" } else { "daily" };
        e.backup(&[
            "--name",
            name,
            "--tag",
            tag,
            "--time",
            &format!("2026-10-0{} 10:00", i + 1),
            e.path("d").to_str().unwrap(),
        ]);
    }
    let out = e.ok(&["forget", "--keep-last", "1", "--keep-tag", "golden"]).stdout;
    assert!(out.contains("removed 2 snapshots"), "{out}");
    let snaps = e.ok(&["snapshots", "--json"]).json();
    let mut kept: Vec<(String, String)> = snaps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["source"].as_str().unwrap().to_string(), s["time"].as_str().unwrap().to_string()))
        .collect();
    kept.sort();
    assert_eq!(
        kept,
        vec![
            ("a".to_string(), "2026-10-01 10:00:00".to_string()),
            ("a".to_string(), "2026-10-03 10:00:00".to_string()),
            ("b".to_string(), "2026-10-05 10:00:00".to_string())
        ]
    );
}

/// What `stats --json` says each snapshot holds alone, oldest first.
fn unique_bytes(stats: &serde_json::Value) -> Vec<u64> {
    stats["snapshot_unique_bytes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["unique_stored_bytes"].as_u64().unwrap())
        .collect()
}

#[test]
fn stats_show_dedup_and_what_each_snapshot_adds() {
    let e = Env::with_repo();
    let base = random_bytes(900, 4 * MIB);
    write(&e.path("a"), &base);
    e.backup(&["--name", "vm", e.path("a").to_str().unwrap()]);
    let mut changed = base.clone();
    changed[MIB..2 * MIB].copy_from_slice(&random_bytes(901, MIB));
    changed.extend(vec![0u8; 2 * MIB]);
    write(&e.path("a"), &changed);
    e.backup(&["--name", "vm", e.path("a").to_str().unwrap()]);
    let s = e.ok(&["stats", "--json"]).json();
    assert_eq!(s["snapshots"], 2);
    assert_eq!(s["logical_bytes"], (4 + 6) * MIB as u64);
    assert_eq!(s["data_bytes"], 8 * MIB as u64, "zero blocks are not data");
    // 5 distinct data blocks (4 + 1 changed) of 1 MiB each, plus two small segments.
    let plain = s["blob_plaintext_bytes"].as_u64().unwrap();
    assert!(plain >= 5 * MIB as u64 && plain < 5 * MIB as u64 + 4096, "{plain}");
    // Each snapshot alone holds one block of random (incompressible) data.
    for u in unique_bytes(&s) {
        assert!(u > MIB as u64 && u < MIB as u64 + 1024, "{u}");
    }
}

/// Two snapshots of an unchanged disk share its segment and so its blocks: neither holds any alone. A third,
/// with one block changed, holds that block alone. A short last block counts its own length.
#[test]
fn stats_count_blocks_of_a_shared_segment_for_every_snapshot_sharing_it() {
    let e = Env::with_repo();
    let mut img = random_bytes(902, 3 * MIB + 1000);
    write(&e.path("a"), &img);
    e.backup(&["--name", "vm", e.path("a").to_str().unwrap()]);
    e.backup(&["--name", "vm", e.path("a").to_str().unwrap()]);
    img[..MIB].copy_from_slice(&random_bytes(903, MIB));
    write(&e.path("a"), &img);
    e.backup(&["--name", "vm", e.path("a").to_str().unwrap()]);
    let s = e.ok(&["stats", "--json"]).json();
    assert_eq!(s["snapshots"], 3);
    assert_eq!(s["logical_bytes"], 3 * (3 * MIB as u64 + 1000));
    assert_eq!(s["data_bytes"], 3 * (3 * MIB as u64 + 1000));
    let unique = unique_bytes(&s);
    assert_eq!(unique[..2], [0, 0], "{unique:?}");
    assert!(unique[2] > MIB as u64 && unique[2] < MIB as u64 + 1024, "{unique:?}");
}

#[test]
fn host_and_tag_filters_select_what_snapshots_forget_and_copy_consider() {
    let e = Env::with_repo();
    // (source, host, tags): six snapshots, a day apart.
    let made = [
        ("a", "esx1", "daily"),
        ("a", "esx1", "daily,app"),
        ("a", "esx2", "weekly,app"),
        ("b", "esx2", "daily"),
        ("b", "esx2", "daily,app"),
        ("b", "esx1", "weekly"),
    ];
    let mut ids = Vec::new();
    for (i, (name, host, tags)) in made.iter().enumerate() {
        write(&e.path("d"), &random_bytes(700 + i as u64, MIB));
        let day = format!("2026-10-0{} 10:00", i + 1);
        let mut args = vec!["--name", name, "--host", host, "--time", &day];
        for t in tags.split(',') {
            args.extend(["--tag", t]);
        }
        let d = e.path("d");
        args.push(d.to_str().unwrap());
        ids.push(e.backup(&args)["snapshot"].as_str().unwrap().to_string());
    }
    let listed = |args: &[&str]| -> Vec<String> {
        let mut a = vec!["snapshots", "--json"];
        a.extend_from_slice(args);
        e.ok(&a).json().as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_string()).collect()
    };
    let of = |k: &[usize]| -> Vec<String> { k.iter().map(|&i| ids[i].clone()).collect() };
    assert_eq!(listed(&["--host", "esx1"]), of(&[0, 1, 5]));
    assert_eq!(listed(&["--host", "esx1", "--host", "esx2"]).len(), 6);
    // Comma: all of the tags; repeated: any of the sets.
    assert_eq!(listed(&["--tag", "daily,app"]), of(&[1, 4]));
    assert_eq!(listed(&["--tag", "weekly", "--tag", "daily,app"]), of(&[1, 2, 4, 5]));
    assert_eq!(listed(&["--name", "b", "--tag", "daily"]), of(&[3, 4]));
    assert_eq!(listed(&["--host", "esx2", "--tag", "app"]), of(&[2, 4]));
    assert!(listed(&["--tag", "monthly"]).is_empty());
    // The newest N of each source, after the filters.
    assert_eq!(listed(&["--latest", "1"]), of(&[2, 5]));
    assert_eq!(listed(&["--latest", "2", "--tag", "daily"]), of(&[0, 1, 3, 4]));
    let text = e.ok(&["snapshots", "--host", "esx1"]).stdout;
    assert!(text.contains("3 snapshots") && !text.contains(&ids[2][..8]), "{text}");

    // forget applies its policy to the selected snapshots only.
    let out = e.ok(&["forget", "--keep-last", "1", "--tag", "daily"]).stdout;
    assert!(out.contains("removed 2 snapshots"), "{out}");
    assert_eq!(listed(&[]), of(&[1, 2, 4, 5]), "forget removed other than the older daily snapshots per source");

    // copy takes the same filters.
    let dest = Env::new();
    dest.ok(&["init"]);
    let mut c = dest.command(&["copy", "--json", "--from-repo", &e.location(), "--host", "esx2"]);
    c.env("DISKVAULT_FROM_PASSWORD", &e.password);
    let r = Run::of(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let from: Vec<String> =
        r.json()["copied"].as_array().unwrap().iter().map(|c| c["from"].as_str().unwrap().to_string()).collect();
    assert_eq!(from, of(&[2, 4]));
    // `latest` is the latest the filters select (of esx2: 4), not the repository's latest (5).
    let dest = Env::new();
    dest.ok(&["init"]);
    let mut c = dest.command(&["copy", "--json", "--from-repo", &e.location(), "--host", "esx2", "latest"]);
    c.env("DISKVAULT_FROM_PASSWORD", &e.password);
    let r = Run::of(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["copied"][0]["from"], ids[4].as_str());
}

#[test]
fn group_by_tags_or_nothing_applies_the_policy_per_tag_set_or_to_all() {
    let e = Env::with_repo();
    let made = [("a", "daily"), ("a", "daily"), ("a", "weekly"), ("a", "weekly"), ("b", "daily")];
    let mut ids = Vec::new();
    for (i, (name, tag)) in made.iter().enumerate() {
        write(&e.path("d"), &random_bytes(800 + i as u64, MIB));
        let day = format!("2026-10-0{} 10:00", i + 1);
        let d = e.path("d");
        let r = e.backup(&["--name", name, "--tag", tag, "--time", &day, d.to_str().unwrap()]);
        ids.push(r["snapshot"].as_str().unwrap().to_string());
    }
    let left = || -> Vec<String> {
        let mut v: Vec<String> = e
            .ok(&["snapshots", "--json"])
            .json()
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_string())
            .collect();
        v.sort();
        v
    };
    let of = |k: &[usize]| -> Vec<String> {
        let mut v: Vec<String> = k.iter().map(|&i| ids[i].clone()).collect();
        v.sort();
        v
    };
    let dry = e.ok(&["forget", "--keep-last", "1", "--group-by", "source,tags", "--dry-run"]).stdout;
    assert!(dry.contains("a tags [daily]:") && dry.contains("a tags [weekly]:"), "{dry}");
    e.ok(&["forget", "--keep-last", "1", "--group-by", "source,tags"]);
    assert_eq!(left(), of(&[1, 3, 4]), "the newest of each source and tag set is kept");
    // No grouping: one group across sources.
    e.ok(&["forget", "--keep-last", "1", "--group-by", ""]);
    assert_eq!(left(), of(&[4]));
    let r = e.run(&["forget", "--keep-last", "1", "--group-by", "paths"]);
    assert_eq!(r.code, 2, "{}", r.stderr);
    assert!(r.stderr.contains("group by any of"), "{}", r.stderr);
}
