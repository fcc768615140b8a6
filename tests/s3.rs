//! S3-specific behaviour against a real SeaweedFS: several hosts writing one repository at once with dedup
//! across them, and a flaky or vanished server between client and store (a fault-injecting TCP proxy).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

#[test]
fn three_hosts_back_up_at_once_and_dedup_across_each_other() {
    let e = Env::s3();
    e.ok(&["init"]);
    let template = random_bytes(1, 8 * MIB);
    let hosts: Vec<Env> = (0..3).map(|_| e.other_host()).collect();
    let mut images = Vec::new();
    for (i, h) in hosts.iter().enumerate() {
        let mut img = template.clone();
        img.extend(random_bytes(10 + i as u64, 3 * MIB));
        write(&h.path("disk.raw"), &img);
        images.push(img);
    }
    // At once, each with its own local cache (a separate backup proxy).
    Env::run_at_once(
        hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                h.command(&[
                    "backup",
                    "--json",
                    "--host",
                    &format!("proxy{i}"),
                    "--name",
                    &format!("vm{i}"),
                    h.path("disk.raw").to_str().unwrap(),
                ])
            })
            .collect(),
    );
    for (i, img) in images.iter().enumerate() {
        assert_eq!(&e.restore("latest", &["--name", &format!("vm{i}")]), img, "vm{i}");
    }
    // A later backup on each host dedups against what the *other* hosts stored: a disk made of the other
    // two hosts' unique blocks stores nothing new.
    for (i, h) in hosts.iter().enumerate() {
        let mut others = Vec::new();
        for (j, img) in images.iter().enumerate() {
            if j != i {
                others.extend_from_slice(&img[8 * MIB..]);
            }
        }
        write(&h.path("mix.raw"), &others);
        let r = h.backup(&["--name", &format!("mix{i}"), h.path("mix.raw").to_str().unwrap()]);
        assert_eq!(r["disks"][0]["new_blocks"], 0, "host {i} must dedup against the other hosts' blocks");
    }
    assert!(e.ok(&["check", "--read-data"]).stdout.contains("no errors found"));
}

/// A TCP proxy in front of the S3 server that breaks some connections: answers 503 SlowDown, drops the
/// connection in the middle of the response, or stalls before forwarding.
struct FaultProxy {
    port: u16,
    faults: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
    /// When set: the answer to the first conditional create (If-None-Match) of each object is lost after the
    /// server carried it out, so the client's retry finds the object there.
    lose_first_create: Arc<AtomicBool>,
    created: Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl FaultProxy {
    /// Every `every`-th connection gets a fault (cycling through the three kinds).
    fn start(upstream: u16, every: u64) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults = Arc::new(AtomicU64::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let lose_first_create = Arc::new(AtomicBool::new(false));
        let created = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
        let (f, d, lose, seen) = (faults.clone(), down.clone(), lose_first_create.clone(), created.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            for conn in listener.incoming() {
                let Ok(client) = conn else { continue };
                n += 1;
                if d.load(Ordering::SeqCst) {
                    // The server is "gone": refuse by closing at once.
                    let _ = client.shutdown(Shutdown::Both);
                    continue;
                }
                let fault = if n.is_multiple_of(every) { Some((n / every) % 3) } else { None };
                if fault.is_some() {
                    f.fetch_add(1, Ordering::SeqCst);
                }
                let lost = lose.load(Ordering::SeqCst).then(|| (seen.clone(), f.clone()));
                std::thread::spawn(move || serve(client, upstream, fault, lost));
            }
        });
        FaultProxy { port, faults, down, lose_first_create, created }
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }
}

fn read_head(client: &mut TcpStream) -> Vec<u8> {
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 65536 {
        match client.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    head
}

type LostCreates = (Arc<std::sync::Mutex<std::collections::HashSet<String>>>, Arc<AtomicU64>);

fn serve(mut client: TcpStream, upstream: u16, fault: Option<u64>, lose_creates: Option<LostCreates>) {
    match fault {
        Some(0) => {
            let _ = read_head(&mut client);
            let body = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>";
            let _ = write!(
                client,
                "HTTP/1.1 503 Slow Down\r\nContent-Type: application/xml\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = client.shutdown(Shutdown::Both);
            return;
        }
        Some(2) => std::thread::sleep(Duration::from_millis(1500)),
        _ => {}
    }
    let Ok(mut up) = TcpStream::connect(("127.0.0.1", upstream)) else { return };
    // One request per connection: the server closes after answering, so the client opens a new connection
    // (and meets the fault schedule) for every request.
    let head = String::from_utf8_lossy(&read_head(&mut client)).into_owned();
    let mut rewritten: String = head
        .trim_end()
        .split("\r\n")
        .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
        .map(|l| format!("{l}\r\n"))
        .collect();
    rewritten.push_str("Connection: close\r\n\r\n");
    if up.write_all(rewritten.as_bytes()).is_err() {
        return;
    }
    let (mut c2, mut u2) = (client.try_clone().unwrap(), up.try_clone().unwrap());
    let to_up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut c2, &mut u2);
        let _ = u2.shutdown(Shutdown::Write);
    });
    let (mut up, mut client) = (up, client);
    let request_line = head.lines().next().unwrap_or("").to_string();
    let conditional = head.to_ascii_lowercase().contains("\r\nif-none-match:");
    if let Some((seen, lost)) = lose_creates.filter(|_| conditional) {
        if seen.lock().unwrap().insert(request_line) {
            // The server does the create; its answer never reaches the client.
            let _ = std::io::copy(&mut up, &mut std::io::sink());
            lost.fetch_add(1, Ordering::SeqCst);
            let _ = client.shutdown(Shutdown::Both);
            let _ = to_up.join();
            return;
        }
    }
    if fault == Some(1) {
        // Forward the beginning of the answer, then break the connection.
        let mut buf = vec![0u8; 200];
        if let Ok(n) = up.read(&mut buf) {
            let _ = client.write_all(&buf[..n.min(120)]);
        }
        let _ = client.shutdown(Shutdown::Both);
        let _ = up.shutdown(Shutdown::Both);
    } else {
        let _ = std::io::copy(&mut up, &mut client);
        let _ = client.shutdown(Shutdown::Both);
    }
    let _ = to_up.join();
}

#[test]
fn backup_and_restore_succeed_through_a_flaky_connection_and_report_retries() {
    let e = Env::s3();
    e.ok(&["init", "--pack-size", "1"]);
    let proxy = FaultProxy::start(s3::server().port, 4);
    let flaky = e.via_endpoint(&proxy.endpoint());
    let img = random_bytes(5, 24 * MIB + 123);
    write(&flaky.path("disk.raw"), &img);
    let out = flaky.ok(&["backup", flaky.path("disk.raw").to_str().unwrap()]);
    assert!(proxy.faults.load(Ordering::SeqCst) > 0, "the proxy injected no fault");
    assert!(out.stdout.contains("failed at first and succeeded when retried"), "retries are reported: {}", out.stdout);
    assert_eq!(flaky.restore("latest", &[]), img);
    // A bandwidth-limited upload streams its body: a retried request streams the same bytes again.
    let faults = proxy.faults.load(Ordering::SeqCst);
    let img2 = random_bytes(15, 12 * MIB);
    write(&flaky.path("disk2.raw"), &img2);
    let r = flaky.backup(&["--limit-upload", "64M", "--name", "two", flaky.path("disk2.raw").to_str().unwrap()]);
    assert!(proxy.faults.load(Ordering::SeqCst) > faults, "no fault during the limited backup");
    assert_eq!(flaky.restore(r["snapshot"].as_str().unwrap(), &["--limit-download", "64M"]), img2);
    // And the repository is whole, read directly.
    assert!(e.ok(&["check", "--read-data"]).stdout.contains("no errors found"));
}

#[test]
fn a_create_whose_answer_was_lost_is_recognised_as_ours_when_retried() {
    let e = Env::s3();
    e.ok(&["init", "--pack-size", "1"]);
    let proxy = FaultProxy::start(s3::server().port, u64::MAX);
    proxy.lose_first_create.store(true, Ordering::SeqCst);
    let via = e.via_endpoint(&proxy.endpoint());
    let img = random_bytes(9, 3 * MIB);
    write(&via.path("disk.raw"), &img);
    // Session markers and the exclusive lock are conditional creates: each first answer is lost.
    via.ok(&["backup", via.path("disk.raw").to_str().unwrap()]);
    assert_eq!(via.restore("latest", &[]), img);
    via.ok(&["forget", "--keep-last", "1", "--prune"]);
    assert!(proxy.created.lock().unwrap().len() >= 3, "{:?}", proxy.created.lock().unwrap());
    assert!(proxy.faults.load(Ordering::SeqCst) >= 3);
    assert!(e.ok(&["locks"]).stdout.contains("0 locks"), "a marker or lock was left");
}

#[test]
fn vanished_server_fails_clearly_and_the_next_run_resumes() {
    let e = Env::s3();
    e.ok(&["init", "--pack-size", "1"]);
    let proxy = FaultProxy::start(s3::server().port, u64::MAX);
    let via = e.via_endpoint(&proxy.endpoint());
    let img = random_bytes(6, 20 * MIB);
    write(&via.path("disk.raw"), &img);
    proxy.down.store(true, Ordering::SeqCst);
    let mut c = via.command(&["backup", via.path("disk.raw").to_str().unwrap()]);
    c.env("DISKVAULT_S3_MAX_ATTEMPTS", "2");
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("error: storage backend"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    proxy.down.store(false, Ordering::SeqCst);
    via.ok(&["backup", via.path("disk.raw").to_str().unwrap()]);
    assert_eq!(via.restore("latest", &[]), img);
}

#[test]
fn large_packs_go_up_as_multipart_uploads() {
    // 40 MiB packs are above the multipart threshold (32 MiB): three parts each.
    let e = Env::s3();
    e.ok(&["init", "--pack-size", "40"]);
    let img = random_bytes(8, 48 * MIB + 5);
    write(&e.path("disk.raw"), &img);
    e.ok(&["backup", "--upload-concurrency", "4", e.path("disk.raw").to_str().unwrap()]);
    assert!(e.objects("packs").iter().any(|p| e.object_size(p) > 40 << 20), "no pack above the multipart threshold");
    assert_eq!(e.restore("latest", &[]), img);
    // Parts of a bandwidth-limited upload are streamed, each with the checksum computed by diskvault.
    let img2 = random_bytes(18, 48 * MIB + 5);
    write(&e.path("disk2.raw"), &img2);
    let r = e.backup(&["--limit-upload", "256M", "--name", "two", e.path("disk2.raw").to_str().unwrap()]);
    assert_eq!(e.restore(r["snapshot"].as_str().unwrap(), &[]), img2);
    assert!(e.ok(&["check", "--read-data"]).stdout.contains("no errors found"));
}

#[test]
fn object_lock_retention_makes_backups_immutable() {
    // Object Lock must be enabled when the bucket is created: a bucket of its own.
    let e = Env::s3();
    let bucket = format!("dvlock-{}", std::process::id());
    let location = format!("s3:{}/{bucket}/repo", s3::server().endpoint);
    let run = |args: &[&str]| {
        let mut c = e.command(args);
        c.env("DISKVAULT_REPOSITORY", &location).env("DISKVAULT_S3_OBJECT_LOCK", "GOVERNANCE:2");
        let out = c.output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["init"]);
    write(&e.path("d"), &random_bytes(77, 2 * MIB));
    run(&["backup", e.path("d").to_str().unwrap()]);
    let (rt, client) = s3::raw_client();
    rt.block_on(async {
        let listed = client.list_objects_v2().bucket(&bucket).prefix("repo/packs/").send().await.unwrap();
        let key = listed.contents()[0].key().unwrap().to_string();
        let head = client.head_object().bucket(&bucket).key(&key).send().await.unwrap();
        assert_eq!(head.object_lock_mode().map(|m| m.as_str()), Some("GOVERNANCE"), "{key} has no retention");
        let until = head.object_lock_retain_until_date().expect("a retain-until date").secs();
        let now = diskvault::util::now_secs();
        assert!(until > now + 86400 && until <= now + 2 * 86400 + 60, "retain until {until}, now {now}");
        // The stored version cannot be deleted while retained.
        let versions = client.list_object_versions().bucket(&bucket).prefix(&key).send().await.unwrap();
        let version = versions.versions()[0].version_id().unwrap().to_string();
        let del = client.delete_object().bucket(&bucket).key(&key).version_id(&version).send().await;
        assert!(del.is_err(), "a retained version was deleted");
        // Locks are not retained (they are rewritten and removed by design).
        let locks = client.list_objects_v2().bucket(&bucket).prefix("repo/locks/").send().await.unwrap();
        assert!(locks.contents().is_empty());
    });
    // The repository works as usual.
    let mut c = e.command(&["check", "--read-data"]);
    c.env("DISKVAULT_REPOSITORY", &location);
    assert!(c.output().unwrap().status.success());

    // Prune does not delete what retention still holds: the packs stay, recorded for a later prune.
    let packs_before = rt.block_on(async {
        client.list_objects_v2().bucket(&bucket).prefix("repo/packs/").send().await.unwrap().contents().len()
    });
    run(&["forget", "--keep-tag", "nothing-has-this-tag"]);
    let mut c = e.command(&["prune"]);
    c.env("DISKVAULT_REPOSITORY", &location);
    let out = c.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains(&format!("{packs_before} held back by retention")), "{stdout}");
    rt.block_on(async {
        let listed = client.list_objects_v2().bucket(&bucket).prefix("repo/packs/").send().await.unwrap();
        assert_eq!(listed.contents().len(), packs_before, "retained packs were deleted");
        let records = client.list_objects_v2().bucket(&bucket).prefix("repo/deletions/").send().await.unwrap();
        assert_eq!(records.contents().len(), 1, "the retained packs are recorded for a later prune");
    });
}

#[test]
fn object_lock_extends_the_retention_of_what_snapshots_need() {
    let e = Env::s3();
    let bucket = format!("dvlockx-{}", std::process::id());
    let location = format!("s3:{}/{bucket}/repo", s3::server().endpoint);
    let run = |lock: Option<&str>, args: &[&str]| {
        let mut c = e.command(args);
        c.env("DISKVAULT_REPOSITORY", &location);
        if let Some(lock) = lock {
            c.env("DISKVAULT_S3_OBJECT_LOCK", lock);
        }
        let out = c.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let ok = |lock: Option<&str>, args: &[&str]| {
        let (code, stdout, stderr) = run(lock, args);
        assert_eq!(code, Some(0), "{args:?}: {stderr}");
        stdout
    };
    let lock = Some("GOVERNANCE:1");
    ok(lock, &["init"]);
    let one = random_bytes(81, 2 * MIB);
    let two = random_bytes(82, 3 * MIB);
    write(&e.path("one"), &one);
    write(&e.path("two"), &two);
    ok(lock, &["backup", "--name", "one", "--tag", "old", e.path("one").to_str().unwrap()]);
    // A host without the setting writes objects nobody retains.
    ok(None, &["backup", "--name", "two", "--tag", "new", e.path("two").to_str().unwrap()]);

    let (rt, client) = s3::raw_client();
    let now = diskvault::util::now_secs();
    // Every object that makes up backups, with its retention's end (None: not retained).
    let retained = || {
        rt.block_on(async {
            let mut out = std::collections::BTreeMap::new();
            for dir in ["config", "keys/", "snapshots/", "index/", "packs/"] {
                let listed =
                    client.list_objects_v2().bucket(&bucket).prefix(format!("repo/{dir}")).send().await.unwrap();
                for o in listed.contents() {
                    let key = o.key().unwrap().to_string();
                    let head = client.head_object().bucket(&bucket).key(&key).send().await.unwrap();
                    out.insert(key, head.object_lock_retain_until_date().map(|t| t.secs()));
                }
            }
            out
        })
    };
    let before = retained();
    let unretained = before.values().filter(|u| u.is_none()).count();
    assert!(unretained >= 3, "the second backup's pack, index file and snapshot: {before:?}");

    // Without the setting there is no promise to keep: refused, naming the variable.
    let (code, _, stderr) = run(None, &["object-lock"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("DISKVAULT_S3_OBJECT_LOCK"), "{stderr}");

    // A dry run reports every object as due (1 day is within 1 + 7 days) and changes nothing.
    let dry: serde_json::Value = serde_json::from_str(&ok(lock, &["object-lock", "--dry-run", "--json"])).unwrap();
    assert_eq!(dry["objects"].as_u64(), Some(before.len() as u64), "{dry}");
    assert_eq!(dry["extended"], dry["objects"], "{dry}");
    assert_eq!(dry["had_none"].as_u64(), Some(unretained as u64), "{dry}");
    assert_eq!(retained(), before, "a dry run changed retention");

    // Forget the first snapshot; the prune drops its pack, which retention still holds, then extends the rest.
    ok(lock, &["forget", "--keep-tag", "new"]);
    let pruned = ok(lock, &["prune"]);
    // The first backup's packs (its data and its manifest) are the retained ones.
    let dropped: Vec<String> = before
        .iter()
        .filter(|(k, until)| k.starts_with("repo/packs/") && until.is_some())
        .map(|(k, _)| k.clone())
        .collect();
    assert!(pruned.contains(&format!("{} held back by retention", dropped.len())), "{pruned}");
    assert!(pruned.contains("every object the repository needs is retained until at least"), "{pruned}");
    let extended_to = now + 15 * 86400;
    for (key, until) in retained() {
        let until = until.unwrap_or_else(|| panic!("{key} is not retained after the prune"));
        if dropped.contains(&key) {
            // Left to expire: extending it would keep it forever.
            assert!(until <= now + 86400 + 120, "{key}: the dropped pack was extended to {until}");
        } else {
            assert!(
                (extended_to - 120..=extended_to + 120).contains(&until),
                "{key}: retained until {until}, not ~{extended_to}"
            );
        }
    }

    // The next run finds everything held for long enough and sends no extension; this host recorded what it
    // extended, so it asks the storage only about the config (rewritten in place by `key rotate`).
    let again: serde_json::Value = serde_json::from_str(&ok(lock, &["object-lock", "--json"])).unwrap();
    assert_eq!(again["extended"].as_u64(), Some(0), "{again}");
    assert_eq!(again["held"], again["objects"], "{again}");
    assert_eq!(again["held_as_recorded"].as_u64(), Some(again["objects"].as_u64().unwrap() - 1), "{again}");
    assert_eq!(again["dropped_packs"].as_u64(), Some(dropped.len() as u64), "{again}");
    let earliest = again["earliest_until"].as_i64().unwrap();
    assert!((extended_to - 120..=extended_to + 120).contains(&earliest), "{again}");
    // Another host (no record) asks the storage about every object, and finds the same.
    let mut c = e.command(&["object-lock", "--json"]);
    c.env("DISKVAULT_REPOSITORY", &location).env("DISKVAULT_S3_OBJECT_LOCK", "GOVERNANCE:1");
    c.env("DISKVAULT_CACHE_DIR", e.path("another-host-cache"));
    let out = c.output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let elsewhere: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(elsewhere["held"], again["objects"], "{elsewhere}");
    assert_eq!(elsewhere["held_as_recorded"].as_u64(), Some(0), "{elsewhere}");
    assert!(elsewhere["earliest_until"].as_i64().unwrap().abs_diff(earliest) <= 5, "{elsewhere}");

    // The data is what it was.
    let target = e.path("restored");
    ok(lock, &["restore", "latest", "--name", "two", "--target", target.to_str().unwrap(), "--verify"]);
    assert_eq!(std::fs::read(&target).unwrap(), two);

    // A bucket created without Object Lock refuses every extension: a failure that says so.
    e.ok(&["init"]);
    let mut c = e.command(&["object-lock"]);
    c.env("DISKVAULT_S3_OBJECT_LOCK", "GOVERNANCE:1");
    let out = c.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("extend the retention of config") && stderr.contains("is Object Lock enabled on the bucket?"),
        "{stderr}"
    );
}

#[test]
fn server_side_encryption_and_storage_class_are_applied() {
    let e = Env::s3();
    let run = |args: &[&str]| {
        let mut c = e.command(args);
        c.env("DISKVAULT_S3_SSE", "AES256").env("DISKVAULT_S3_STORAGE_CLASS", "STANDARD_IA");
        let out = c.output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    run(&["init"]);
    write(&e.path("d"), &random_bytes(78, MIB));
    run(&["backup", e.path("d").to_str().unwrap()]);
    let (rt, client) = s3::raw_client();
    let location = e.location();
    let prefix = location.split('/').skip(4).collect::<Vec<_>>().join("/");
    rt.block_on(async {
        let head_of = |dir: &'static str| {
            let (client, prefix) = (client.clone(), prefix.clone());
            async move {
                let listed = client
                    .list_objects_v2()
                    .bucket(s3::BUCKET)
                    .prefix(format!("{prefix}/{dir}/"))
                    .send()
                    .await
                    .unwrap();
                let key = listed.contents()[0].key().unwrap().to_string();
                (key.clone(), client.head_object().bucket(s3::BUCKET).key(&key).send().await.unwrap())
            }
        };
        let (pack, head) = head_of("packs").await;
        assert_eq!(head.server_side_encryption().map(|s| s.as_str()), Some("AES256"), "{pack} is not stored encrypted");
        assert_eq!(
            head.storage_class().map(|c| c.as_str()),
            Some("STANDARD_IA"),
            "{pack}: data packs use the storage class"
        );
        let (index, head) = head_of("index").await;
        assert_eq!(
            head.server_side_encryption().map(|s| s.as_str()),
            Some("AES256"),
            "{index} is not stored encrypted"
        );
        assert!(head.storage_class().is_none_or(|c| c.as_str() == "STANDARD"), "{index}: metadata stays STANDARD");
    });
    assert_eq!(e.restore("latest", &[]), random_bytes(78, MIB));
}

#[test]
fn private_ca_bundle_is_required_and_used_for_tls() {
    let server = s3::Server::start_tls();
    let (https, cert) = server.tls.clone().unwrap();
    let e = Env::s3();
    let location = format!("s3:{https}/tlsbucket/repo");
    let run = |ca: Option<&std::path::Path>, args: &[&str]| {
        let mut c = e.command(args);
        c.env("DISKVAULT_REPOSITORY", &location).env("DISKVAULT_S3_MAX_ATTEMPTS", "2");
        if let Some(ca) = ca {
            c.env("DISKVAULT_S3_CA_BUNDLE", ca);
        }
        c.output().unwrap()
    };
    // Never silently insecure: an unknown certificate is refused.
    let out = run(None, &["init"]);
    assert!(!out.status.success(), "a self-signed certificate was accepted without the CA bundle");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("error: storage backend"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // With the bundle: the whole round trip over TLS.
    assert!(run(Some(&cert), &["init"]).status.success());
    write(&e.path("d"), &random_bytes(79, MIB + 3));
    assert!(run(Some(&cert), &["backup", e.path("d").to_str().unwrap()]).status.success());
    let t = e.path("out");
    let out = run(Some(&cert), &["restore", "latest", "--target", t.to_str().unwrap(), "--verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(std::fs::read(&t).unwrap(), random_bytes(79, MIB + 3));
}
