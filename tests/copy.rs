//! `copy`: snapshots of one repository stored in another that has its own password and keys (an offsite
//! copy), restorable there bit-exact, incremental, never copied twice, and refused cleanly on bad input.

mod common;

use common::*;
use diskvault::format::BlobType;

/// A destination repository with a password of its own.
fn destination() -> Env {
    let mut e = Env::new();
    e.password = "another password entirely".into();
    e.ok(&["init"]);
    e
}

/// `copy --json` into `dest` from `src`, with the source's password in DISKVAULT_FROM_PASSWORD.
fn copy(dest: &Env, src: &Env, from_password: &str, extra: &[&str]) -> Run {
    let mut c = dest.command(&["copy", "--json", "--from-repo", &src.location()]);
    c.args(extra).env("DISKVAULT_FROM_PASSWORD", from_password);
    Run::of(c)
}

fn backup(env: &Env, name: &str, data: &[u8], extra: &[&str]) -> String {
    let image = env.path(&format!("{name}.raw"));
    write(&image, data);
    let mut args = vec!["--name", name];
    args.extend_from_slice(extra);
    let spec = format!("d0={}", image.display());
    args.push(&spec);
    env.backup(&args)["snapshot"].as_str().unwrap().to_string()
}

fn snapshots(env: &Env) -> Vec<serde_json::Value> {
    env.ok(&["snapshots", "--json"]).json().as_array().unwrap().clone()
}

#[test]
fn copies_restore_bit_exact_build_on_earlier_copies_and_are_made_once() {
    let src = Env::with_repo();
    let dest = destination();
    // Day 0: data, a run of zero blocks and a short last block; day 1: one block rewritten, one zeroed, the
    // short last block changed; and another VM.
    let mut day0 = random_bytes(1, 12 * MIB);
    day0[4 * MIB..6 * MIB].fill(0);
    day0.extend_from_slice(&random_bytes(2, 4096));
    let mut day1 = day0.clone();
    day1[MIB..2 * MIB].copy_from_slice(&random_bytes(3, MIB));
    day1[8 * MIB..9 * MIB].fill(0);
    day1[12 * MIB..].fill(7);
    let other = random_bytes(4, 5 * MIB);
    let s0 = backup(&src, "vm1", &day0, &["--tag", "daily"]);
    let s1 = backup(&src, "vm1", &day1, &[]);
    let s2 = backup(&src, "vm2", &other, &[]);

    // A dry run says what the copy will do, and copies nothing.
    let dry = copy(&dest, &src, &src.password, &["--dry-run"]);
    assert_eq!(dry.code, 0, "{}", dry.stderr);
    let plan = dry.json()["would_copy"].as_array().unwrap().clone();
    assert_eq!(plan.iter().map(|p| p["from"].as_str().unwrap()).collect::<Vec<_>>(), [&s0, &s1, &s2]);
    assert_eq!(plan[1]["builds_on"], s0.as_str());
    assert!(plan[0]["builds_on"].is_null() && plan[2]["builds_on"].is_null());
    assert!(snapshots(&dest).is_empty(), "the dry run copied something");

    let r = copy(&dest, &src, &src.password, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = r.json();
    let copied = report["copied"].as_array().unwrap();
    assert_eq!(copied.len(), 3, "{report}");
    assert_eq!(report["already_copied"], 0);
    let copy_of = |original: &str| {
        let c = copied.iter().find(|c| c["from"] == original).unwrap_or_else(|| panic!("{original} not copied"));
        c.clone()
    };
    // Day 1's copy built on day 0's and read only the three blocks whose ids differ between the originals.
    let (c0, c1) = (copy_of(&s0), copy_of(&s1));
    assert_eq!(c1["parent"], c0["snapshot"]);
    assert_eq!(c1["bytes_read"], (2 * MIB + 4096) as u64, "{c1}");
    // A full copy reads only the non-zero blocks.
    assert_eq!(c0["bytes_read"], (10 * MIB + 4096) as u64, "{c0}");
    // As the dry run said.
    for p in &plan {
        assert_eq!(p["bytes_to_read"], copy_of(p["from"].as_str().unwrap())["bytes_read"], "{p}");
    }

    for (original, data) in [(&s0, &day0), (&s1, &day1), (&s2, &other)] {
        let id = copy_of(original)["snapshot"].as_str().unwrap().to_string();
        assert!(dest.restore(&id, &[]) == *data, "the copy of {original} restores other bytes");
    }
    // The copies carry the originals' time, host, user, source, tags and disk names, and say what they copy.
    let (originals, copies) = (snapshots(&src), snapshots(&dest));
    for o in &originals {
        let c = copies.iter().find(|c| c["annotations"]["copy.from"] == o["id"]).expect("a copy of each");
        for field in ["time", "time_secs", "hostname", "username", "source", "tags"] {
            assert_eq!(c[field], o[field], "{field}");
        }
        assert_eq!(c["disks"][0]["name"], o["disks"][0]["name"]);
        assert_eq!(c["disks"][0]["capacity"], o["disks"][0]["capacity"]);
    }
    dest.ok(&["check", "--read-data"]);

    // Copied once: a second run copies nothing, also after the source's day 1 got a tag (and so a new id); after
    // a new source snapshot, only that one, built on the copy of that retagged day 1.
    let retagged = src.ok(&["tag", &s1[..12], "--add", "audited"]).stdout;
    assert!(retagged.contains("changed the tags of 1 snapshot"), "{retagged}");
    let again = copy(&dest, &src, &src.password, &[]);
    assert_eq!(again.code, 0, "{}", again.stderr);
    assert_eq!(again.json()["copied"].as_array().unwrap().len(), 0);
    assert_eq!(again.json()["already_copied"], 3);
    let mut day2 = day1.clone();
    day2[10 * MIB..11 * MIB].fill(0x5a);
    let s3 = backup(&src, "vm1", &day2, &[]);
    let r = copy(&dest, &src, &src.password, &["--name", "vm1"]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = r.json();
    let copied = report["copied"].as_array().unwrap();
    assert_eq!(copied.len(), 1, "{report}");
    assert_eq!(copied[0]["from"], s3.as_str());
    assert_eq!(copied[0]["parent"], c1["snapshot"]);
    assert_eq!(copied[0]["bytes_read"], MIB as u64);
    assert!(dest.restore(copied[0]["snapshot"].as_str().unwrap(), &[]) == day2);
}

/// An incremental copy fetches the changed blocks, scattered over the disk but neighbours in the source's
/// packs, in batches: a few ranged reads (GETs on S3), not one per block.
#[test]
fn an_incremental_copy_reads_scattered_changes_in_few_requests() {
    let src = Env::with_repo();
    let dest = destination();
    let day0 = random_bytes(11, 96 * MIB);
    let mut day1 = day0.clone();
    for k in 0..24 {
        let b = 4 * k + 1;
        day1[b * MIB..(b + 1) * MIB].copy_from_slice(&random_bytes(100 + k as u64, MIB));
    }
    backup(&src, "vm1", &day0, &[]);
    let s1 = backup(&src, "vm1", &day1, &[]);

    let r = copy(&dest, &src, &src.password, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = r.json();
    let copied = report["copied"].as_array().unwrap();
    let c1 = copied.iter().find(|c| c["from"] == s1.as_str()).expect("day 1 copied");
    assert_eq!(c1["bytes_read"], 24 * MIB as u64, "the copy read other blocks than the changed ones: {report}");
    let reads = c1["source_reads"].as_u64().unwrap();
    // 24 MiB of incompressible blocks lie in two packs of the source: batches of 8 make 3 reads, 4 if a batch
    // straddles the packs, a few more if the copy's reader overtakes the fetcher (3-6 with the two cores
    // contended three times over); one read per block would be 24.
    assert!((1..=12).contains(&reads), "24 changed blocks took {reads} reads of the source's packs: {report}");
    assert!(dest.restore(c1["snapshot"].as_str().unwrap(), &[]) == day1, "the incremental copy restores other bytes");
}

/// Blocks that compress: each byte of a random block repeated four times.
fn compressible(seed: u64, blocks: usize) -> Vec<u8> {
    random_bytes(seed, blocks * MIB / 4).iter().flat_map(|b| [*b; 4]).collect()
}

/// A copy into a repository that compresses at the source's level seals each block the source stored whole in
/// the form it is stored there (zstd frame or raw), with the destination's key, instead of compressing it again;
/// a block the source holds as a delta, and every block copied into a repository of another level, is
/// compressed anew. All of them restore bit-exact.
#[test]
fn a_copy_at_the_source_level_seals_blocks_as_stored_there_and_compresses_the_rest() {
    let src = Env::with_repo();
    // Four blocks that compress, two that do not (stored raw), one zero block.
    let mut day0 = compressible(21, 4);
    day0.extend_from_slice(&random_bytes(22, 2 * MIB));
    day0.extend_from_slice(&vec![0; MIB]);
    let s0 = backup(&src, "vm1", &day0, &[]);
    // Day 1: a few bytes of the first block rewritten, which the source stores as a delta against day 0's.
    let mut day1 = day0.clone();
    day1[1000..1100].fill(0x42);
    let s1 = backup(&src, "vm1", &day1, &[]);
    assert_eq!(src.delta_blobs().len(), 1, "the source stored day 1's block whole");

    let same_level = destination();
    let r = copy(&same_level, &src, &src.password, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = r.json();
    let copied = report["copied"].as_array().unwrap();
    let copy_of = |original: &str| copied.iter().find(|c| c["from"] == original).expect("copied").clone();
    let (c0, c1) = (copy_of(&s0), copy_of(&s1));
    assert_eq!(c0["blocks_sealed_as_stored"], 6, "{report}");
    assert_eq!(c1["blocks_sealed_as_stored"], 0, "a delta blob's form was taken: {report}");
    assert!(same_level.restore(c0["snapshot"].as_str().unwrap(), &[]) == day0, "the copy of day 0 differs");
    assert!(same_level.restore(c1["snapshot"].as_str().unwrap(), &[]) == day1, "the copy of day 1 differs");
    same_level.ok(&["check", "--read-data"]);
    // Each block is stored in as many bytes as in the source, as a backup at this level would store it.
    let stored_lens = |env: &Env| {
        let repo = env.open_repo();
        let mut lens: Vec<u32> = Vec::new();
        for id in repo.list_index_ids().unwrap() {
            for p in repo.load_index(&id).unwrap().packs {
                let whole_data = p.entries.iter().filter(|e| e.base.is_none() && e.blob_type == BlobType::Data);
                lens.extend(whole_data.map(|e| e.stored_len));
            }
        }
        lens.sort();
        lens
    };
    assert_eq!(stored_lens(&same_level), stored_lens(&src));
    // Day 1 alone without deltas in the destination: its first block, a delta in the source, is stored whole,
    // compressed here; its other five blocks as the source stored them.
    let whole = destination();
    let r = copy(&whole, &src, &src.password, &["--no-delta", &s1]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let c = &r.json()["copied"][0];
    assert_eq!(c["blocks_sealed_as_stored"], 5, "{c}");
    assert!(whole.delta_blobs().is_empty());
    assert!(whole.restore(c["snapshot"].as_str().unwrap(), &[]) == day1, "the copy of day 1 differs");
    whole.ok(&["check", "--read-data"]);

    // At another level nothing is taken as stored: every block is compressed for the destination.
    let mut other_level = Env::new();
    other_level.password = "another password entirely".into();
    other_level.ok(&["init", "--compression", "1"]);
    let r = copy(&other_level, &src, &src.password, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    let report = r.json();
    for c in report["copied"].as_array().unwrap() {
        assert_eq!(c["blocks_sealed_as_stored"], 0, "{report}");
        let data = if c["from"] == s0.as_str() { &day0 } else { &day1 };
        assert!(other_level.restore(c["snapshot"].as_str().unwrap(), &[]) == *data, "a copy at level 1 differs");
    }
    assert_ne!(stored_lens(&other_level), stored_lens(&src), "level 1 compressed as level 3 did");
}

#[test]
fn bad_sources_are_refused_and_leave_the_destination_as_it_was() {
    let src = Env::with_repo();
    let dest = destination();
    let data = random_bytes(5, 6 * MIB);
    backup(&src, "vm", &data, &[]);

    let r = copy(&dest, &src, "not the password", &[]);
    assert_eq!(r.code, 12, "{}", r.stderr);
    assert!(r.stderr.contains("source repository") && r.stderr.contains("wrong password"), "{}", r.stderr);
    let r = copy(&dest, &dest, &dest.password, &[]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("same repository"), "{}", r.stderr);
    let missing = Env::new();
    let r = copy(&dest, &missing, "x", &[]);
    assert_eq!(r.code, 10, "{}", r.stderr);

    // A damaged data pack in the source: the copy fails naming the pack, and no snapshot appears.
    let pack = src.objects("packs").into_iter().max_by_key(|p| src.object_size(p)).unwrap();
    src.flip(&pack, 5000);
    let r = copy(&dest, &src, &src.password, &[]);
    assert_ne!(r.code, 0, "a copy from a damaged pack succeeded");
    let pack_id = pack.rsplit('/').next().unwrap();
    assert!(r.stderr.contains(&pack_id[..16]), "the error names the pack: {}", r.stderr);
    assert!(!r.stderr.contains("panicked"));
    assert!(snapshots(&dest).is_empty(), "a snapshot was committed from damaged data");
    dest.ok(&["check"]);
}

#[test]
fn an_interrupted_copy_stops_cleanly_and_the_next_run_completes_it() {
    let src = Env::with_repo();
    let dest = destination();
    let disks: Vec<Vec<u8>> = (0..3).map(|i| random_bytes(20 + i, 64 * MIB)).collect();
    let originals: Vec<String> = disks.iter().map(|d| backup(&src, "vm", d, &[])).collect();

    // Interrupted once the first snapshot is copied, while the second is being read.
    let mut c = dest.command(&["copy", "--from-repo", &src.location()]);
    c.env("DISKVAULT_FROM_PASSWORD", &src.password).stdout(std::process::Stdio::piped());
    let mut child = c.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    assert!(first.starts_with("copied"), "{first}");
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let status = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&status.stderr);
    assert_eq!(status.status.code(), Some(130), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let copied = snapshots(&dest).len();
    assert!((1..3).contains(&copied), "{copied} snapshots copied before the interrupt took effect");
    // Both repositories are left without the copy's session markers.
    assert!(src.objects("locks").is_empty(), "{:?}", src.objects("locks"));
    assert!(dest.objects("locks").is_empty(), "{:?}", dest.objects("locks"));

    let r = copy(&dest, &src, &src.password, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["already_copied"], copied);
    for (original, data) in originals.iter().zip(&disks) {
        let c = snapshots(&dest).into_iter().find(|c| c["annotations"]["copy.from"] == original.as_str()).unwrap();
        assert!(dest.restore(c["id"].as_str().unwrap(), &[]) == *data);
    }
}

#[test]
fn two_copies_from_one_source_at_once_store_each_snapshot_once() {
    let src = Env::with_repo();
    let dest = destination();
    let originals: Vec<String> = (0..3).map(|i| backup(&src, "vm", &random_bytes(40 + i, 24 * MIB), &[])).collect();

    // A copy from this source holds its lock: another is refused, naming the holder, and copies nothing.
    let held = diskvault::lock::acquire_copy(&dest.open_repo(), &src.open_repo().config().id, "copy").unwrap();
    let r = copy(&dest, &src, &src.password, &[]);
    assert_eq!(r.code, 11, "{}", r.stderr);
    assert!(r.stderr.contains("another copy from the same source"), "{}", r.stderr);
    assert!(snapshots(&dest).is_empty());
    // Copies from another source are not held up.
    let other = Env::with_repo();
    backup(&other, "other-vm", &random_bytes(50, 4 * MIB), &[]);
    let r = copy(&dest, &other, &other.password, &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    drop(held);

    // Two copies started together: whichever runs second either finds the lock or nothing left to copy.
    let runs: Vec<std::process::Output> = (0..2)
        .map(|_| {
            let mut c = dest.command(&["copy", "--json", "--from-repo", &src.location()]);
            c.env("DISKVAULT_FROM_PASSWORD", &src.password);
            c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped()).spawn().unwrap()
        })
        .collect::<Vec<_>>()
        .into_iter()
        .map(|child| child.wait_with_output().unwrap())
        .collect();
    for out in &runs {
        let stderr = String::from_utf8_lossy(&out.stderr);
        match out.status.code() {
            Some(0) => {}
            Some(11) => assert!(stderr.contains("another copy from the same source"), "{stderr}"),
            code => panic!("copy ended with {code:?}: {stderr}"),
        }
    }
    assert!(runs.iter().any(|o| o.status.success()), "neither copy ran");
    let from: Vec<String> = snapshots(&dest)
        .iter()
        .filter_map(|s| s["annotations"]["copy.from"].as_str().map(String::from))
        .filter(|f| originals.contains(f))
        .collect();
    let mut unique = from.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(from.len(), unique.len(), "a snapshot was copied twice: {from:?}");
    assert_eq!(unique.len(), 3, "{from:?}");
    assert!(dest.objects("locks").is_empty(), "{:?}", dest.objects("locks"));
}

#[test]
fn a_damaged_source_snapshot_is_named_and_the_others_are_copied() {
    let src = Env::with_repo();
    let dest = destination();
    let (a, b) = (random_bytes(11, 2 * MIB), random_bytes(12, 3 * MIB));
    let damaged = backup(&src, "vm1", &a, &[]);
    backup(&src, "vm2", &b, &[]);
    let object = format!("snapshots/{damaged}");
    let n = src.object_size(&object) as usize;
    src.flip(&object, n - 10);
    let r = copy(&dest, &src, &src.password, &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains(&object) && r.stderr.contains("could not be copied"), "{}", r.stderr);
    assert_eq!(r.json()["copied"].as_array().unwrap().len(), 1);
    assert_eq!(dest.restore("latest", &["--name", "vm2"]), b);
}

#[test]
fn a_snapshot_with_damaged_data_is_left_out_and_the_later_ones_are_copied() {
    let src = Env::with_repo();
    let dest = destination();
    let day0 = random_bytes(21, 3 * MIB);
    let mut day1 = day0.clone();
    day1[..MIB].copy_from_slice(&random_bytes(22, MIB));
    let other = random_bytes(23, 2 * MIB);
    let s0 = backup(&src, "vm1", &day0, &[]);
    // Day 0's data pack (the other VM's and day 1's blocks go to packs of their own backups).
    let pack = src.objects("packs").into_iter().max_by_key(|p| src.object_size(p)).unwrap();
    backup(&src, "vm1", &day1, &[]);
    backup(&src, "vm2", &other, &[]);
    src.flip(&pack, 2 * MIB + 100);

    let r = copy(&dest, &src, &src.password, &[]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    let j = r.json();
    let not_copied = j["not_copied"].as_array().unwrap();
    assert_eq!(not_copied[0]["from"].as_str(), Some(s0.as_str()), "{j}");
    assert!(not_copied[0]["cause"].as_str().unwrap().contains(pack.rsplit('/').next().unwrap()), "{j}");
    // Day 1 shares two of day 0's blocks: it is left out too if the damaged blob is one of them (blobs go into
    // a pack in the order the workers finish them). The other VM is copied.
    assert_eq!(not_copied.len() + j["copied"].as_array().unwrap().len(), 3, "{j}");
    let copied: Vec<&str> = j["copied"].as_array().unwrap().iter().map(|c| c["source"].as_str().unwrap()).collect();
    assert!(copied.contains(&"vm2"), "{j}");
    assert_eq!(dest.restore("latest", &["--name", "vm2"]), other);
    for c in j["copied"].as_array().unwrap() {
        let expected = if c["source"] == "vm2" { &other } else { &day1 };
        assert_eq!(&dest.restore(c["snapshot"].as_str().unwrap(), &[]), expected);
    }
    // A rerun copies nothing new and still says what is missing.
    let again = copy(&dest, &src, &src.password, &[]);
    assert_eq!(again.code, 3, "{}", again.stderr);
    assert!(again.json()["copied"].as_array().unwrap().is_empty());
    assert!(dest.ok(&["check", "--read-data"]).stdout.contains("no errors found"));
}
