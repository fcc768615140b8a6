//! Exclusive locks: a second holder is refused (and told who holds the lock) while the first lives; a holder
//! killed with SIGKILL stops blocking others once its lock is not refreshed for the stale time.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use diskvault::backend::Backend;
use diskvault::repository::Repository;

fn backend_for(location: &str) -> Arc<dyn Backend> {
    if location.starts_with("s3:") {
        s3::backend_at(location)
    } else {
        diskvault::backend::open(location).unwrap()
    }
}

/// Not a test of its own: run by `killed_holder_stops_blocking_after_expiry` as a child process that takes
/// the lock and holds it until killed. Without the variable it does nothing.
#[test]
fn lock_holder_child() {
    let Ok(location) = std::env::var("DV_TEST_LOCK_HOLDER") else { return };
    let repo = Repository::open(backend_for(&location), b"correct horse battery staple").unwrap();
    let _guard = diskvault::lock::acquire_exclusive(&repo, "test holder").unwrap();
    println!("HOLDING");
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[test]
fn second_holder_is_refused_while_the_first_lives() {
    let e = Env::with_repo();
    let repo = Repository::open(e.backend(), e.password.as_bytes()).unwrap();
    let guard = diskvault::lock::acquire_exclusive(&repo, "maintenance test").unwrap();
    let r = e.fails(&["repair", "index"]);
    assert_eq!(r.code, 11, "{}", r.stderr);
    assert!(r.stderr.contains("maintenance test") && r.stderr.contains("pid"), "the holder is named: {}", r.stderr);
    assert!(e.ok(&["locks"]).stdout.contains("maintenance test"));
    // Backups take no lock.
    write(&e.path("d"), &random_bytes(1, MIB));
    e.ok(&["backup", e.path("d").to_str().unwrap()]);
    drop(guard);
    e.ok(&["repair", "index"]);
    assert!(e.ok(&["locks"]).stdout.contains("0 locks"));
}

#[test]
fn killed_holder_stops_blocking_after_expiry() {
    let e = Env::with_repo();
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "lock_holder_child", "--nocapture", "--test-threads=1"])
        .env("DV_TEST_LOCK_HOLDER", e.location())
        .env("DISKVAULT_LOCK_STALE_SECS", "3")
        .stdout(std::process::Stdio::piped());
    if e.is_s3() {
        s3::server().add_credentials(&mut cmd);
    }
    let mut child = cmd.spawn().unwrap();
    let start = Instant::now();
    while e.objects("locks").is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "the child never took the lock");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Alive and refreshing: refused, also after longer than the stale time.
    std::thread::sleep(Duration::from_secs(4));
    let mut c = e.command(&["repair", "index"]);
    c.env("DISKVAULT_LOCK_STALE_SECS", "3");
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(11), "a live holder's lock must hold: {}", String::from_utf8_lossy(&out.stderr));
    child.kill().unwrap(); // SIGKILL: no cleanup
    child.wait().unwrap();
    assert!(!e.objects("locks").is_empty(), "the killed holder's lock is left behind");
    let killed_at = Instant::now();
    loop {
        let mut c = e.command(&["repair", "index"]);
        c.env("DISKVAULT_LOCK_STALE_SECS", "3");
        let out = c.output().unwrap();
        if out.status.success() {
            break;
        }
        assert_eq!(out.status.code(), Some(11), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(killed_at.elapsed() < Duration::from_secs(20), "the abandoned lock never expired");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(killed_at.elapsed() >= Duration::from_secs(1), "expiry must wait for the stale time");
}

fn snapshot_tags(e: &Env) -> Vec<(String, serde_json::Value)> {
    let list = e.ok(&["snapshots", "--json"]).json();
    list.as_array().unwrap().iter().map(|s| (s["id"].as_str().unwrap().to_string(), s["tags"].clone())).collect()
}

#[test]
fn commands_that_change_snapshots_wait_for_the_snapshots_lock() {
    let e = Env::with_repo();
    write(&e.path("d"), &random_bytes(7, MIB));
    let id = e.backup(&[e.path("d").to_str().unwrap()])["snapshot"].as_str().unwrap().to_string();
    let repo = e.open_repo();
    let guard = diskvault::lock::acquire_snapshots(&repo, "snapshots lock test").unwrap();
    for args in [vec!["protect", &id[..8]], vec!["tag", &id[..8], "--add", "x"], vec!["forget", &id[..8]]] {
        let mut c = e.command(&args);
        c.env("DISKVAULT_LOCK_WAIT_SECS", "1");
        let r = Run::of(c);
        assert_eq!(r.code, 11, "{args:?} must wait for the lock, then give up: {}", r.stderr);
        assert!(r.stderr.contains("snapshots lock test"), "the holder is named: {}", r.stderr);
    }
    // Dry runs, backups and restores are not held up; nothing changed.
    assert!(e.ok(&["forget", &id[..8], "-n"]).stdout.contains("would be removed"));
    assert!(e.ok(&["tag", &id[..8], "--add", "x", "-n"]).stdout.contains("would change the tags of 1 snapshot"));
    write(&e.path("d"), &random_bytes(8, MIB));
    e.backup(&[e.path("d").to_str().unwrap()]);
    assert_eq!(e.restore(&id, &[]), random_bytes(7, MIB));
    assert_eq!(snapshot_tags(&e).len(), 2);
    assert!(snapshot_tags(&e).iter().all(|(_, t)| t == &serde_json::json!([])));

    // A waiting command goes ahead once the holder is done.
    let mut c = e.command(&["tag", &id[..8], "--add", "x"]);
    c.stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::piped());
    let child = c.spawn().unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert!(e.ok(&["snapshots"]).stdout.contains(&id[..8]), "it waits: the snapshot is not retagged yet");
    drop(guard);
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("changed the tags of 1 snapshot"));
    assert!(e.ok(&["locks"]).stdout.contains("0 locks"));
}

#[test]
fn a_snapshot_changed_after_it_was_listed_is_not_written_back() {
    let e = Env::with_repo();
    let mut ids = Vec::new();
    for seed in [1, 2] {
        write(&e.path("d"), &random_bytes(seed, MIB));
        ids.push(e.backup(&[e.path("d").to_str().unwrap()])["snapshot"].as_str().unwrap().to_string());
    }
    let repo = e.open_repo();
    let listed = repo.list_snapshots().unwrap();
    // Other clients forget the first and retag the second after this one listed them.
    e.ok(&["forget", &ids[0][..8]]);
    e.ok(&["tag", &ids[1][..8], "--add", "y"]);
    let change = diskvault::tag::TagChange { add: vec!["x".into()], ..Default::default() };
    let changed = diskvault::tag::retag(&repo, listed, &change, false).unwrap();
    assert!(changed.is_empty(), "neither is there any more: {changed:?}");
    let left = snapshot_tags(&e);
    assert_eq!(left.len(), 1, "no snapshot came back and none was doubled: {left:?}");
    assert_eq!(left[0].1, serde_json::json!(["y"]));
}
