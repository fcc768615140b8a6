//! Exclusive locks: a second holder is refused (and told who holds the lock) while the first lives; a holder
//! killed with SIGKILL on this host stops blocking others at once, one elsewhere once its lock is not refreshed
//! for the stale time.

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

/// Not a test of its own: run by `a_killed_holder_on_this_host_stops_blocking_at_once` as a child process that takes
/// the lock and holds it until killed. Without the variable it does nothing.
#[test]
fn lock_holder_child() {
    let Ok(location) = std::env::var("DV_TEST_LOCK_HOLDER") else { return };
    let repo = Repository::open(backend_for(&location), b"correct horse battery staple").unwrap();
    let _guard = match std::env::var("DV_TEST_LOCK_KIND").as_deref() {
        Ok("session") => diskvault::lock::start_session(&repo, "backup").unwrap(),
        _ => diskvault::lock::acquire_exclusive(&repo, "test holder").unwrap(),
    };
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

/// Starts `lock_holder_child` and waits until it holds the exclusive lock (`kind` "exclusive") or a session
/// marker (`kind` "session").
fn start_lock_holder(e: &Env, kind: &str) -> std::process::Child {
    let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", "lock_holder_child", "--nocapture", "--test-threads=1"])
        .env("DV_TEST_LOCK_HOLDER", e.location())
        .env("DV_TEST_LOCK_KIND", kind)
        .env("DISKVAULT_LOCK_STALE_SECS", "3")
        .stdout(std::process::Stdio::piped());
    if e.is_s3() {
        s3::server().add_credentials(&mut cmd);
    }
    let child = cmd.spawn().unwrap();
    let start = Instant::now();
    while e.objects("locks").is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "the child never took the lock");
        std::thread::sleep(Duration::from_millis(50));
    }
    child
}

/// `repair index`, which takes the exclusive lock, with locks going stale after `stale_secs`.
fn repair_index(e: &Env, stale_secs: u32) -> std::process::Output {
    let mut c = e.command(&["repair", "index"]);
    c.env("DISKVAULT_LOCK_STALE_SECS", stale_secs.to_string());
    c.output().unwrap()
}

/// A holder killed with SIGKILL on this host leaves its lock behind; the next command on the host sees that its
/// process is gone and takes the lock at once, without waiting for the stale time: also while the killed process
/// is a zombie (not yet reaped by its parent).
#[test]
fn a_killed_holder_on_this_host_stops_blocking_at_once() {
    let e = Env::with_repo();
    let mut child = start_lock_holder(&e, "exclusive");
    // Alive and refreshing: refused, also after longer than the stale time.
    std::thread::sleep(Duration::from_secs(4));
    let out = repair_index(&e, 3);
    assert_eq!(out.status.code(), Some(11), "a live holder's lock must hold: {}", String::from_utf8_lossy(&out.stderr));
    child.kill().unwrap(); // SIGKILL: no cleanup; not reaped yet
    std::thread::sleep(Duration::from_millis(200));
    assert!(!e.objects("locks").is_empty(), "the killed holder's lock is left behind");
    let out = repair_index(&e, 300);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a lock of a process gone from this host must not hold for 300 s: {stderr}");
    assert!(stderr.contains("removing an abandoned lock") && stderr.contains("no longer runs"), "{stderr}");
    child.wait().unwrap();
    assert!(e.objects("locks").is_empty(), "{:?}", e.objects("locks"));
}

/// The session marker of a backup killed on this host stops counting as a live session at once: prune need not
/// wait the stale time for it before deleting packs, and it is removed.
#[test]
fn a_killed_session_on_this_host_is_not_waited_for() {
    let e = Env::with_repo();
    let repo = Repository::open(e.backend(), e.password.as_bytes()).unwrap();
    let mut child = start_lock_holder(&e, "session");
    assert_eq!(diskvault::lock::live_sessions(&repo).unwrap().len(), 1, "a live session counts");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(e.objects("locks").len(), 1, "the killed holder's marker is left behind");
    assert!(diskvault::lock::live_sessions(&repo).unwrap().is_empty(), "its process is gone from this host");
    assert!(e.objects("locks").is_empty(), "{:?}", e.objects("locks"));
}

/// A lock naming this host and a PID that runs nowhere here, taken on another running system (a clone of this
/// machine with the same hostname, another boot, a container with its own PIDs): its PID says nothing here, so
/// it holds until it expires, as every lock of another host does.
#[test]
fn a_lock_of_another_system_holds_until_it_expires() {
    let e = Env::with_repo();
    let repo = Repository::open(e.backend(), e.password.as_bytes()).unwrap();
    let mut gone = std::process::Command::new("true").spawn().unwrap();
    gone.wait().unwrap();
    let info = diskvault::format::lock::LockInfo {
        purpose: "prune".into(),
        hostname: diskvault::util::hostname(),
        username: "root".into(),
        pid: gone.id(),
        created_secs: diskvault::util::now_secs(),
        holder: [7; 16],
    };
    let sealed =
        diskvault::format::envelope::seal(repo.keys(), diskvault::format::envelope::Kind::Lock, &info.encode());
    assert!(repo.backend().create_new("locks/exclusive", &sealed).unwrap());
    let written = Instant::now();
    let out = repair_index(&e, 3);
    assert_eq!(out.status.code(), Some(11), "{}", String::from_utf8_lossy(&out.stderr));
    loop {
        let out = repair_index(&e, 3);
        if out.status.success() {
            break;
        }
        assert_eq!(out.status.code(), Some(11), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(written.elapsed() < Duration::from_secs(20), "the abandoned lock never expired");
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(written.elapsed() >= Duration::from_secs(3), "expiry must wait for the stale time");
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
