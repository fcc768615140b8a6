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
