//! Bandwidth limits (`--limit-upload`, `--limit-download`): a limited backup, restore and copy keep to their
//! rate, give back the same bytes, and a bad rate is refused. Run on local and (in the S3 pass) S3
//! repositories: the S3 backend streams limited uploads piece by piece with its own checksum.

mod common;

use std::time::{Duration, Instant};

use common::*;

/// 12 MiB of incompressible data at 4 MiB/s take 3 s, less the bucket's initial half MiB: at least 2.5 s.
/// The upper bound only catches a limiter that throttles far below its rate.
fn assert_rate_kept(what: &str, took: Duration) {
    assert!(took >= Duration::from_millis(2500), "{what} at 4 MiB/s moved 12 MiB in {took:?}");
    assert!(took < Duration::from_secs(30), "{what} at 4 MiB/s took {took:?}");
}

#[test]
fn limited_backup_restore_and_copy_keep_to_their_rate() {
    let e = Env::with_repo();
    let data = random_bytes(77, 12 * MIB);
    let image = e.path("d.raw");
    write(&image, &data);

    let t = Instant::now();
    let r = e.backup(&["--limit-upload", "4M", "--name", "vm", image.to_str().unwrap()]);
    assert_rate_kept("backup --limit-upload", t.elapsed());
    let id = r["snapshot"].as_str().unwrap().to_string();

    let t = Instant::now();
    let restored = e.restore(&id, &["--limit-download", "4096"]);
    assert_rate_kept("restore --limit-download", t.elapsed());
    assert!(restored == data, "a limited restore gave other bytes");
    e.ok(&["check", "--read-data"]);

    // A copy reads its source within --limit-download (the same option, the source's budget).
    let dest = Env::new();
    dest.ok(&["init"]);
    let mut c = dest.command(&["copy", "--json", "--from-repo", &e.location(), "--limit-download", "4M"]);
    c.env("DISKVAULT_FROM_PASSWORD", &e.password);
    let t = Instant::now();
    let r = Run::of(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_rate_kept("copy --limit-download", t.elapsed());
    let copy = r.json()["copied"][0]["snapshot"].as_str().unwrap().to_string();
    assert!(dest.restore(&copy, &[]) == data);

    for bad in ["fast", "10X", "0"] {
        let r = e.fails(&["snapshots", "--limit-upload", bad]);
        assert!(r.stderr.contains("--limit-upload"), "{}", r.stderr);
    }
}
