//! NBD: backups from real `qemu-nbd` exports (allocation map, dirty bitmaps kept by qemu while `qemu-io` plays
//! the guest), and `diskvault serve` read by real clients (`qemu-img`, `qemu-io`, `nbdinfo`) and by a hostile
//! one. The programs come from Debian's qemu-utils and libnbd-bin (scripts/setup.sh).

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use diskvault::nbd::proto::*;

fn tool(name: &str) -> Command {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output().unwrap();
    assert!(found.status.success(), "{name} is not installed: run scripts/setup.sh (qemu-utils, libnbd-bin)");
    Command::new(name)
}

fn run_tool(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn wait_for_socket(path: &Path, child: &mut Child) {
    let start = Instant::now();
    while UnixStream::connect(path).is_err() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("server exited early ({status})");
        }
        assert!(start.elapsed() < Duration::from_secs(20), "{} did not appear", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `qemu-nbd` exporting a qcow2 image read-only, optionally with a dirty bitmap; stopped on drop.
struct QemuNbd {
    child: Child,
    uri: String,
}

impl QemuNbd {
    /// Over a Unix socket, allowing `shared` clients (multi-conn when more than one).
    fn unix(image: &Path, socket: &Path, bitmap: Option<&str>, shared: u32) -> QemuNbd {
        // A killed earlier server leaves its socket file: waiting for the file would then return at once, before
        // this server listens (seen as 'Connection refused').
        let _ = std::fs::remove_file(socket);
        let mut c = tool("qemu-nbd");
        c.args(["-r", "-f", "qcow2", "-t", "-e", &shared.to_string(), "-k"]).arg(socket);
        if let Some(b) = bitmap {
            c.args(["-B", b]);
        }
        let mut child = c.arg(image).stdout(Stdio::null()).stderr(Stdio::inherit()).spawn().unwrap();
        // qemu-nbd does not answer connections made only to probe: wait for the file instead.
        let start = Instant::now();
        while !socket.exists() {
            assert!(child.try_wait().unwrap().is_none(), "qemu-nbd exited early");
            assert!(start.elapsed() < Duration::from_secs(20), "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd { child, uri: format!("nbd+unix:///?socket={}", socket.display()) }
    }

    /// Over TCP on 127.0.0.1.
    fn tcp(image: &Path) -> QemuNbd {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let mut child = tool("qemu-nbd")
            .args(["-r", "-f", "qcow2", "-t", "-b", "127.0.0.1", "-p", &port.to_string()])
            .arg(image)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(child.try_wait().unwrap().is_none(), "qemu-nbd exited early");
            assert!(start.elapsed() < Duration::from_secs(20), "qemu-nbd did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
        QemuNbd { child, uri: format!("nbd://127.0.0.1:{port}/") }
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The guest: writes `data` at `offset` of a qcow2 image through qemu-io (qemu keeps the dirty bitmaps).
fn guest_write(env: &Env, image: &Path, offset: u64, data: &[u8]) {
    let src = env.path("guest-write.bin");
    write(&src, data);
    run_tool(
        tool("qemu-io")
            .args(["-f", "qcow2", "-c"])
            .arg(format!("write -s {} {offset} {}", src.display(), data.len()))
            .arg(image),
    );
}

/// The image's whole content as raw bytes.
fn raw_content(env: &Env, image: &Path) -> Vec<u8> {
    let out = env.path("raw-content.raw");
    run_tool(tool("qemu-img").args(["convert", "-f", "qcow2", "-O", "raw"]).arg(image).arg(&out));
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

fn new_qcow2(env: &Env, name: &str, size: u64) -> PathBuf {
    let p = env.path(name);
    run_tool(tool("qemu-img").args(["create", "-f", "qcow2"]).arg(&p).arg(size.to_string()));
    p
}

const M: u64 = MIB as u64;

#[test]
fn full_and_dirty_bitmap_incrementals_from_qemu_nbd_restore_bit_exact() {
    let env = Env::with_repo();
    let image = new_qcow2(&env, "vm.qcow2", 64 * M);
    // Day 0: the guest writes 5 MiB over three places; the rest of the disk was never written.
    let day0 = [(M, 3 * M), (20 * M + 4096, 700_000), (63 * M, M)];
    for (i, (off, len)) in day0.iter().enumerate() {
        guest_write(&env, &image, *off, &random_bytes(i as u64 + 1, *len as usize));
    }
    run_tool(tool("qemu-img").args(["bitmap", "--add"]).arg(&image).arg("b0"));
    let sock = env.path("qemu-nbd.sock");

    let mut expected = Vec::new();
    let mut ids = Vec::new();
    {
        let server = QemuNbd::unix(&image, &sock, Some("b0"), 4);
        // The server allows 4 clients and says so (multi-conn): the backup reads over 4 connections.
        let out = env
            .command(&["backup", "--json", "--name", "vm", &format!("disk0={}", server.uri)])
            .env("DISKVAULT_LOG", "diskvault=debug")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{stderr}");
        assert!(stderr.contains("reading with 4 connection(s)"), "{stderr}");
        let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        // base:allocation: only the written blocks are read.
        let written = blocks_touched(&day0);
        assert_eq!(r["disks"][0]["blocks_read"], written, "{r}");
        assert_eq!(r["disks"][0]["bytes_read"], written * M);
        ids.push(r["snapshot"].as_str().unwrap().to_string());
    }
    expected.push(raw_content(&env, &image));

    // Three days of guest writes, each backed up from the dirty bitmap, which is then cleared (as a backup
    // orchestrator does after a successful backup).
    let days: [&[(u64, u64)]; 3] =
        [&[(2 * M + 512, 64 << 10), (40 * M, 3 * M)], &[(M - 4096, 8192), (63 * M + 100, 10)], &[(30 * M, 5 * M + 1)]];
    for (d, writes) in days.iter().enumerate() {
        for (i, (off, len)) in writes.iter().enumerate() {
            guest_write(&env, &image, *off, &random_bytes(100 * d as u64 + i as u64, *len as usize));
        }
        let r = {
            let server = QemuNbd::unix(&image, &sock, Some("b0"), 1);
            env.backup(&["--name", "vm", "--dirty-bitmap", "b0", &format!("disk0={}", server.uri)])
        };
        // Exactly the blocks the bitmap marks (64 KiB granularity, never crossing a 1 MiB block here).
        let touched = blocks_touched(writes);
        assert_eq!(r["disks"][0]["blocks_read"], touched, "day {d}: {r}");
        assert_eq!(r["disks"][0]["bytes_read"], touched * M, "day {d}");
        assert_eq!(r["parent"].as_str().unwrap(), ids.last().unwrap());
        ids.push(r["snapshot"].as_str().unwrap().to_string());
        expected.push(raw_content(&env, &image));
        run_tool(tool("qemu-img").args(["bitmap", "--clear"]).arg(&image).arg("b0"));
    }

    // Every point in time restores to what the disk held then, not to later writes.
    for (id, want) in ids.iter().zip(&expected) {
        let got = env.restore(id, &[]);
        assert!(got == *want, "snapshot {id} differs from the disk at its time");
    }
    assert!(expected.windows(2).all(|w| w[0] != w[1]));

    // Over TCP too, from a single-connection server (no multi-conn): a full backup equals the image.
    let server = QemuNbd::tcp(&image);
    let r = env.backup(&["--name", "vm-tcp", "--no-parent", &format!("disk0={}", server.uri)]);
    let got = env.restore(r["snapshot"].as_str().unwrap(), &[]);
    assert!(got == *expected.last().unwrap());
}

#[test]
fn nbd_source_errors_are_named() {
    let env = Env::with_repo();
    let image = new_qcow2(&env, "e.qcow2", 8 * M);
    guest_write(&env, &image, 0, &random_bytes(9, 4096));
    let sock = env.path("e.sock");
    let server = QemuNbd::unix(&image, &sock, None, 4);

    // A dirty bitmap the server does not export.
    let r = env.fails(&["backup", "--dirty-bitmap", "nope", &server.uri]);
    assert!(r.stderr.contains("does not export dirty bitmap \"nope\""), "{}", r.stderr);
    // An export that does not exist.
    let uri = format!("nbd+unix:///missing?socket={}", sock.display());
    let r = env.fails(&["backup", &uri]);
    assert!(r.stderr.contains("no export named \"missing\""), "{}", r.stderr);
    // Nobody listening.
    let r = env.fails(&["backup", &format!("nbd+unix:///?socket={}", env.path("none.sock").display())]);
    assert!(r.stderr.contains("cannot connect"), "{}", r.stderr);
    // A malformed URI.
    let r = env.fails(&["backup", "nbd+unix:///x"]);
    assert!(r.stderr.contains("?socket=PATH"), "{}", r.stderr);
    // TLS asked of a server without it: refused by the server, named as such.
    let ca = env.path("none.pem");
    write(&ca, b"");
    let r = env.fails(&[
        "backup",
        "--nbd-tls-ca",
        ca.to_str().unwrap(),
        &format!("nbds+unix:///?socket={}", sock.display()),
    ]);
    assert!(r.stderr.contains("TLS"), "{}", r.stderr);
    assert!(env.ok(&["snapshots", "--json"]).json().as_array().unwrap().is_empty());
}

/// Every stored object but locks.
fn stored_objects(env: &Env) -> Vec<String> {
    ["keys", "packs", "index", "snapshots", "deletions"].iter().flat_map(|d| env.objects(d)).collect()
}

/// `diskvault serve` on a Unix socket; stopped with SIGTERM on drop.
struct Serve {
    child: Child,
    socket: PathBuf,
    listing: Vec<String>,
}

impl Serve {
    fn start(env: &Env, extra: &[&str]) -> Serve {
        Serve::start_with(env, extra, &[])
    }

    fn start_with(env: &Env, extra: &[&str], vars: &[(&str, &str)]) -> Serve {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let socket = env.path(&format!("serve-{}-{n}.sock", std::process::id()));
        let mut args = vec!["serve", "--socket", socket.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut child = env
            .command(&args)
            .envs(vars.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        // The first line says it is listening; the export lines follow.
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut first = String::new();
        out.read_line(&mut first).unwrap();
        assert!(first.starts_with("serving"), "serve said {first:?}");
        let n: usize = first.split_whitespace().nth(1).unwrap().parse().unwrap();
        let listing = (0..n)
            .map(|_| {
                let mut l = String::new();
                out.read_line(&mut l).unwrap();
                l.split_whitespace().next().unwrap().to_string()
            })
            .collect();
        wait_for_socket(&socket, &mut child);
        Serve { child, socket, listing }
    }

    fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.socket.display())
    }

    fn stop(mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait().unwrap();
        assert!(status.success(), "serve exited with {status} after SIGTERM");
        assert!(!self.socket.exists(), "serve left its socket behind");
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A disk with data, a hole, a zero-filled region, and a size that is not a multiple of the block size (but
/// of 512 bytes, as every VM disk is: qemu's NBD client rounds export sizes up to sectors).
fn served_disk(seed: u64) -> Vec<u8> {
    let mut d = vec![0u8; 20 * MIB + 25 * 512];
    d[..3 * MIB].copy_from_slice(&random_bytes(seed, 3 * MIB));
    d[8 * MIB..9 * MIB + 5].copy_from_slice(&random_bytes(seed + 1, MIB + 5));
    let tail = d.len() - 4000;
    d[tail..].copy_from_slice(&random_bytes(seed + 2, 4000));
    d
}

/// Backs up [`served_disk`]`(seed)` from `disk.img` as source `vm`, disk `d0`: (content, snapshot id).
fn backed_up_disk(env: &Env, seed: u64) -> (Vec<u8>, String) {
    let v = served_disk(seed);
    write(&env.path("disk.img"), &v);
    let r = env.backup(&["--name", "vm", &format!("d0={}", env.path("disk.img").display())]);
    (v, r["snapshot"].as_str().unwrap().to_string())
}

#[test]
fn served_snapshots_read_by_qemu_and_nbdinfo() {
    let env = Env::with_repo();
    let disk = env.path("disk.img");
    let (v1, s1) = backed_up_disk(&env, 1);
    let mut v2 = v1.clone();
    v2[MIB..MIB + 3000].copy_from_slice(&random_bytes(7, 3000));
    write(&disk, &v2);
    let s2 = env.backup(&["--name", "vm", &format!("d0={}", disk.display())])["snapshot"].as_str().unwrap().to_string();
    // Block 1 of the second snapshot differs in 3000 bytes: it is stored as a delta blob, which serve resolves.
    assert_eq!(env.delta_blobs().len(), 1);
    let objects_before = stored_objects(&env);

    let serve = Serve::start(&env, &[]);
    let e1 = format!("{}/d0", &s1[..8]);
    let e2 = format!("{}/d0", &s2[..8]);
    assert_eq!(serve.listing, vec![e1.clone(), e2.clone()]);

    // NBD_OPT_LIST as nbdinfo sees it.
    let list = run_tool(tool("nbdinfo").arg("--list").arg("--json").arg(serve.uri("")));
    let list: serde_json::Value = serde_json::from_str(&list).unwrap();
    let names: Vec<&str> =
        list["exports"].as_array().unwrap().iter().map(|e| e["export-name"].as_str().unwrap()).collect();
    assert_eq!(names, vec![e1.as_str(), e2.as_str()]);
    assert_eq!(list["exports"][0]["export-size"], v1.len() as u64);
    assert_eq!(list["exports"][0]["is_read_only"], true);

    // qemu-img compare against the restored file, and convert from the export.
    for (export, id, want) in [(&e1, &s1, &v1), (&e2, &s2, &v2)] {
        let restored = env.path(&format!("restored-{id}"));
        env.ok(&["restore", id, "--target", restored.to_str().unwrap()]);
        let out = run_tool(
            tool("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(serve.uri(export)).arg(&restored),
        );
        assert!(out.contains("identical"), "{out}");
        let converted = env.path("converted.raw");
        run_tool(tool("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(serve.uri(export)).arg(&converted));
        assert!(std::fs::read(&converted).unwrap() == *want, "qemu-img convert of {export} differs");
    }

    // base:allocation: exactly the all-zero 1 MiB blocks are holes.
    let map = run_tool(tool("nbdinfo").arg("--map").arg("--json").arg(serve.uri(&e2)));
    let map: serde_json::Value = serde_json::from_str(&map).unwrap();
    let mut holes = Vec::new();
    for e in map.as_array().unwrap() {
        let (off, len, ty) =
            (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap(), e["type"].as_u64().unwrap());
        if ty == (STATE_HOLE | STATE_ZERO) as u64 {
            holes.push((off, off + len));
        } else {
            assert_eq!(ty, 0);
        }
    }
    let zero_blocks: Vec<u64> =
        v2.chunks(MIB).enumerate().filter(|(_, c)| c.iter().all(|&b| b == 0)).map(|(i, _)| i as u64).collect();
    let mut from_map = Vec::new();
    for (s, e) in holes {
        assert!(s % M == 0 && (e % M == 0 || e == v2.len() as u64), "hole {s}..{e} not on block bounds");
        from_map.extend(s / M..e.div_ceil(M));
    }
    assert_eq!(from_map, zero_blocks);
    // Asked for one extent (qemu always is), the server answers the whole run of blocks in the same state,
    // not one block of it: qemu would ask again for every 1 MiB.
    let mut c = RawClient::session_with_allocation(&serve.socket, &e2);
    let size = v2.len() as u32;
    for (offset, run, flags) in
        [(0, 3 * M, 0), (3 * M, 5 * M, STATE_HOLE | STATE_ZERO), (10 * M, 10 * M, STATE_HOLE | STATE_ZERO)]
    {
        c.request_with_flags(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, offset, size - offset as u32, &[]);
        let (_, extents) = parse_block_status(&c.reply().unwrap()).unwrap();
        assert_eq!(extents, vec![StatusExtent { length: run as u32, flags }], "one extent from {offset}");
    }

    // Two clients at once, on different exports, both bit-exact.
    let a = env.path("a.raw");
    let b = env.path("b.raw");
    let mut ca =
        tool("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(serve.uri(&e1)).arg(&a).spawn().unwrap();
    let mut cb =
        tool("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(serve.uri(&e2)).arg(&b).spawn().unwrap();
    assert!(ca.wait().unwrap().success() && cb.wait().unwrap().success());
    assert!(std::fs::read(&a).unwrap() == v1 && std::fs::read(&b).unwrap() == v2);

    // diskvault's own NBD client on a served export: a copy into another repository, reading only the
    // blocks base:allocation calls data.
    let other = Env::with_repo();
    let r = other.backup(&["--name", "copy", &format!("d0={}", serve.uri(&e2))]);
    assert_eq!(r["disks"][0]["blocks_read"], (v2.len().div_ceil(MIB) - zero_blocks.len()) as u64);
    assert!(other.restore(r["snapshot"].as_str().unwrap(), &[]) == v2);

    // qemu-io reads across block boundaries.
    let out = run_tool(
        tool("qemu-io").args(["-r", "-f", "raw", "-c"]).arg(format!("read -v {} 16", 3 * MIB - 8)).arg(serve.uri(&e1)),
    );
    let expect: Vec<String> = v1[3 * MIB - 8..3 * MIB + 8].iter().map(|b| format!("{b:02x}")).collect();
    assert!(out.contains(&expect.join(" ")), "{out}");

    // A filtered server lists and opens only the snapshot it was given.
    let only = Serve::start(&env, &["--snapshot", &s1[..8]]);
    assert_eq!(only.listing, vec![e1.clone()]);
    let out = tool("nbdinfo").arg(only.uri(&e2)).output().unwrap();
    assert!(!out.status.success(), "an export outside the filter was served");
    run_tool(tool("nbdinfo").arg(only.uri(&e1)));
    only.stop();

    // Serving wrote nothing into the repository.
    assert_eq!(stored_objects(&env), objects_before);
    serve.stop();
    assert!(env.objects("locks").is_empty(), "serve left its session marker");
}

/// A snapshot backed up while serve runs is listed and served (its index entries are newer than serve's
/// cache), and the backup writes the host's index cache as usual: serve only reads it.
#[test]
fn a_snapshot_backed_up_while_serve_runs_is_served() {
    let env = Env::with_repo();
    backed_up_disk(&env, 8);
    let serve = Serve::start(&env, &[]);
    let v2 = served_disk(9);
    write(&env.path("disk.img"), &v2);
    let r = env.run(&["-v", "backup", "--json", "--name", "vm", &format!("d0={}", env.path("disk.img").display())]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert!(!r.stderr.contains("private temporary"), "serve held the index cache: {}", r.stderr);
    let id = r.json()["snapshot"].as_str().unwrap().to_string();
    let out = env.path("new.raw");
    run_tool(
        tool("qemu-img")
            .args(["convert", "-f", "raw", "-O", "raw"])
            .arg(serve.uri(&format!("{}/d0", &id[..8])))
            .arg(&out),
    );
    assert!(std::fs::read(&out).unwrap() == v2, "the new snapshot is served with other bytes");
    serve.stop();
}

/// A prune while serve runs replaces index files that serve's view of the host's index cache holds; a
/// snapshot backed up after it is still served right, and so is the one served before.
#[test]
fn snapshots_are_served_right_after_a_prune_while_serve_runs() {
    let env = Env::with_repo();
    backed_up_disk(&env, 8);
    let (v2, s2) = backed_up_disk(&env, 9);
    let serve = Serve::start(&env, &[]);
    let read = |id: &str, name: &str| -> Vec<u8> {
        let out = env.path(name);
        run_tool(
            tool("qemu-img")
                .args(["convert", "-f", "raw", "-O", "raw"])
                .arg(serve.uri(&format!("{}/d0", &id[..8])))
                .arg(&out),
        );
        std::fs::read(&out).unwrap()
    };
    assert!(read(&s2, "before.raw") == v2);
    env.ok(&["forget", "--keep-last", "1"]);
    let pruned = env.ok(&["prune", "--max-unused", "0"]);
    assert!(pruned.stdout.contains("index:"), "{}", pruned.stdout);
    let (v3, s3) = backed_up_disk(&env, 10);
    assert!(read(&s3, "new.raw") == v3, "the snapshot backed up after the prune is served with other bytes");
    assert!(read(&s2, "again.raw") == v2, "the snapshot served before the prune is served with other bytes");
    serve.stop();
}

#[test]
fn writable_overlay_keeps_the_repository_untouched() {
    let env = Env::with_repo();
    let (v, id) = backed_up_disk(&env, 3);
    let objects_before = stored_objects(&env);
    let serve = Serve::start(&env, &["--writable", "--overlay-dir", env.dir.path().to_str().unwrap()]);
    let export = format!("{}/d0", &id[..8]);
    let uri = serve.uri(&export);
    // A guest writes across a block boundary, into a hole, and at the odd-sized tail.
    let patch = random_bytes(11, 10_000);
    let src = env.path("patch.bin");
    write(&src, &patch);
    let tail = v.len() as u64 - 1000;
    let cmds = [
        format!("write -s {} {} 10000", src.display(), 3 * MIB - 5000),
        format!("write -P 0x5a {} 4096", 12 * MIB),
        format!("write -P 0x6b {tail} 1000"),
    ];
    let mut c = tool("qemu-io");
    c.args(["-f", "raw"]);
    for cmd in &cmds {
        c.arg("-c").arg(cmd);
    }
    run_tool(c.arg(&uri));
    let mut want = v.clone();
    want[3 * MIB - 5000..3 * MIB + 5000].copy_from_slice(&patch);
    want[12 * MIB..12 * MIB + 4096].fill(0x5a);
    want[tail as usize..].fill(0x6b);
    // Another connection sees the writes (one overlay per export).
    let out = env.path("overlay.raw");
    run_tool(tool("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(&uri).arg(&out));
    assert!(std::fs::read(&out).unwrap() == want, "the overlay does not hold the writes");
    // The written hole is data now.
    let map = run_tool(tool("nbdinfo").arg("--map").arg(&uri));
    assert!(
        map.lines().any(|l| l.split_whitespace().next() == Some(&(12 * MIB).to_string()) && l.contains("data")),
        "{map}"
    );
    serve.stop();
    // The repository did not change, and the snapshot is what was backed up.
    assert_eq!(stored_objects(&env), objects_before);
    assert!(env.restore(&id, &[]) == v);
    // The overlay file went with the server.
    assert!(!std::fs::read_dir(env.dir.path())
        .unwrap()
        .flatten()
        .any(|e| e.file_name().to_string_lossy().starts_with("diskvault-overlay")));
}

/// With --keep-overlays, what a VM booted from a backup wrote stays across restarts of serve: writes a client
/// flushed survive even a killed server; the repository is untouched; a damaged map is refused, not ignored.
#[test]
fn kept_overlays_survive_a_restart_and_a_killed_server() {
    let env = Env::with_repo();
    let (v, id) = backed_up_disk(&env, 4);
    let objects_before = stored_objects(&env);
    let dir = env.path("overlays");
    std::fs::create_dir(&dir).unwrap();
    let args = ["--writable", "--overlay-dir", dir.to_str().unwrap(), "--keep-overlays"];
    let export = format!("{}/d0", &id[..8]);
    let qemu_io = |uri: &str, cmd: &str| run_tool(tool("qemu-io").args(["-f", "raw", "-c", cmd, uri]));
    let read_all = |uri: &str| {
        let out = env.path("read.raw");
        run_tool(tool("qemu-img").args(["convert", "-f", "raw", "-O", "raw", uri]).arg(&out));
        std::fs::read(&out).unwrap()
    };

    // qemu-io flushes when it closes the disk; then serve is killed (SIGKILL, no chance to save more).
    let serve = Serve::start(&env, &args);
    let patch = random_bytes(12, 10_000);
    write(&env.path("patch.bin"), &patch);
    qemu_io(&serve.uri(&export), &format!("write -s {} {} 10000", env.path("patch.bin").display(), 3 * MIB - 5000));
    qemu_io(&serve.uri(&export), &format!("write -P 0x5a {} 4096", 12 * MIB));
    drop(serve);
    let mut want = v.clone();
    want[3 * MIB - 5000..3 * MIB + 5000].copy_from_slice(&patch);
    want[12 * MIB..12 * MIB + 4096].fill(0x5a);
    let serve = Serve::start(&env, &args);
    assert!(read_all(&serve.uri(&export)) == want, "the flushed writes did not survive a killed serve");

    // More writes, a clean stop, a third start: all of it is there.
    qemu_io(&serve.uri(&export), &format!("write -P 0x6b {} 1000", v.len() - 1000));
    serve.stop();
    let tail = want.len() - 1000;
    want[tail..].fill(0x6b);
    let serve = Serve::start(&env, &args);
    assert!(read_all(&serve.uri(&export)) == want, "the overlay was not continued after a clean stop");
    serve.stop();

    // Without --keep-overlays the disk is the snapshot again; the repository never changed.
    let serve = Serve::start(&env, &args[..3]);
    assert!(read_all(&serve.uri(&export)) == v, "a temporary overlay saw a kept one");
    serve.stop();
    assert_eq!(stored_objects(&env), objects_before);
    assert!(env.restore(&id, &[]) == v);

    // A damaged map: the export cannot be opened (rather than silently serving the snapshot's old bytes).
    let map =
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).find(|p| p.extension() == Some("map".as_ref()));
    let map = map.expect("a kept overlay has a map file");
    let mut bytes = std::fs::read(&map).unwrap();
    bytes[30] ^= 1;
    write(&map, &bytes);
    let serve = Serve::start(&env, &args);
    let out = env.path("refused.raw");
    let r =
        tool("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &serve.uri(&export)]).arg(&out).output().unwrap();
    assert!(!r.status.success(), "an export with a damaged overlay map was served");
    serve.stop();
}

/// A client speaking NBD by hand, to send what real clients never do.
struct RawClient(UnixStream);

impl RawClient {
    fn greet(socket: &Path) -> RawClient {
        let mut s = UnixStream::connect(socket).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[..8], b"NBDMAGIC");
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes()).unwrap();
        RawClient(s)
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.0.write_all(&m).unwrap();
    }

    /// Option replies until a final one: returns the final reply type.
    fn option_result(&mut self) -> u32 {
        loop {
            let mut h = [0u8; 20];
            self.0.read_exact(&mut h).unwrap();
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            self.0.read_exact(&mut d).unwrap();
            if kind != REP_INFO && kind != REP_SERVER && kind != REP_META_CONTEXT {
                return kind;
            }
        }
    }

    fn session(socket: &Path, export: &str) -> RawClient {
        let mut c = RawClient::greet(socket);
        c.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(c.option_result(), REP_ACK);
        c.option(OPT_GO, &encode_go(export, &[]));
        assert_eq!(c.option_result(), REP_ACK);
        c
    }

    /// A session with structured replies and the `base:allocation` context.
    fn session_with_allocation(socket: &Path, export: &str) -> RawClient {
        let mut c = RawClient::greet(socket);
        c.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(c.option_result(), REP_ACK);
        c.option(OPT_SET_META_CONTEXT, &encode_meta_context(export, &[BASE_ALLOCATION]));
        assert_eq!(c.option_result(), REP_ACK);
        c.option(OPT_GO, &encode_go(export, &[]));
        assert_eq!(c.option_result(), REP_ACK);
        c
    }

    fn request(&mut self, command: u16, offset: u64, length: u32, payload: &[u8]) {
        self.request_with_flags(0, command, offset, length, payload);
    }

    fn request_with_flags(&mut self, flags: u16, command: u16, offset: u64, length: u32, payload: &[u8]) {
        let r = Request { flags, command, cookie: 42, offset, length };
        self.0.write_all(&r.encode()).unwrap();
        self.0.write_all(payload).unwrap();
    }

    /// The reply: Ok(data) or Err((error number, message)).
    fn reply(&mut self) -> Result<Vec<u8>, (u32, String)> {
        let mut magic = [0u8; 4];
        self.0.read_exact(&mut magic).unwrap();
        match u32::from_be_bytes(magic) {
            SIMPLE_REPLY_MAGIC => {
                let mut h = [0u8; 12];
                self.0.read_exact(&mut h).unwrap();
                match u32::from_be_bytes(h[..4].try_into().unwrap()) {
                    0 => Ok(Vec::new()),
                    e => Err((e, String::new())),
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let mut h = [0u8; CHUNK_HEADER_LEN];
                self.0.read_exact(&mut h).unwrap();
                let h = ChunkHeader::parse(&h);
                assert_eq!(h.cookie, 42);
                assert!(h.flags & REPLY_FLAG_DONE != 0);
                let mut p = vec![0u8; h.length as usize];
                self.0.read_exact(&mut p).unwrap();
                match h.kind {
                    REPLY_TYPE_OFFSET_DATA => Ok(p[8..].to_vec()),
                    REPLY_TYPE_BLOCK_STATUS => Ok(p),
                    k if k & (1 << 15) != 0 => Err(parse_error_chunk(&p).unwrap()),
                    k => panic!("chunk type {k}"),
                }
            }
            m => panic!("reply magic {m:#x}"),
        }
    }

    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
}

#[test]
fn hostile_clients_get_errors_and_the_server_survives() {
    let env = Env::with_repo();
    let (v, id) = backed_up_disk(&env, 5);
    let serve = Serve::start(&env, &[]);
    let export = format!("{}/d0", &id[..8]);
    let size = v.len() as u64;

    // Negotiation: an unknown export, an unknown option, a garbled GO payload, then a 1 GiB option payload.
    let mut c = RawClient::greet(&serve.socket);
    c.option(OPT_GO, &encode_go("nosuch/d0", &[]));
    assert_eq!(c.option_result(), REP_ERR_UNKNOWN);
    c.option(77, b"xyz");
    assert_eq!(c.option_result(), REP_ERR_UNSUP);
    c.option(OPT_GO, &[0, 0, 1, 0, b'a']);
    assert_eq!(c.option_result(), REP_ERR_INVALID);
    c.option(OPT_SET_META_CONTEXT, &encode_meta_context(&export, &[BASE_ALLOCATION]));
    assert_eq!(c.option_result(), REP_ERR_INVALID, "meta contexts before structured replies");
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&(1u32 << 30).to_be_bytes());
    c.0.write_all(&m).unwrap();
    assert!(c.closed(), "a 1 GiB option must end the connection");

    // Transmission: each bad request gets an error reply and the connection goes on.
    let mut c = RawClient::session(&serve.socket, &export);
    c.request(CMD_READ, size - 10, 20, &[]);
    assert_eq!(c.reply().unwrap_err().0, EINVAL, "read past the end");
    c.request(CMD_READ, u64::MAX - 5, 100, &[]);
    assert_eq!(c.reply().unwrap_err().0, EINVAL, "offset overflow");
    c.request(CMD_READ, 0, 64 << 20, &[]);
    assert_eq!(c.reply().unwrap_err().0, EOVERFLOW, "oversized read");
    c.request(CMD_WRITE, 0, 4096, &[0xee; 4096]);
    assert_eq!(c.reply().unwrap_err().0, EPERM, "write to a read-only export");
    c.request(CMD_TRIM, 0, 4096, &[]);
    assert_eq!(c.reply().unwrap_err().0, EPERM);
    c.request(CMD_BLOCK_STATUS, 0, 4096, &[]);
    assert_eq!(c.reply().unwrap_err().0, EINVAL, "block status without a meta context");
    c.request(99, 0, 0, &[]);
    assert_eq!(c.reply().unwrap_err().0, EINVAL, "unknown command");
    c.request(CMD_READ, 3 * M - 100, 200, &[]);
    assert_eq!(c.reply().unwrap(), v[3 * MIB - 100..3 * MIB + 100], "a good read after the bad ones");
    // Reads larger than a worker keeps a buffer for, and smaller ones after them (workers reuse buffers).
    c.request(CMD_READ, M / 2, 9 * M as u32, &[]);
    assert!(c.reply().unwrap() == v[MIB / 2..MIB / 2 + 9 * MIB], "a 9 MiB read");
    for (offset, len) in [(8 * M - 5, 3 * MIB), (100, 1000), (size - 4000, 4000)] {
        c.request(CMD_READ, offset, len as u32, &[]);
        assert!(c.reply().unwrap() == v[offset as usize..offset as usize + len], "read of {len} at {offset}");
    }
    // A request with a broken magic loses framing: the server hangs up.
    let mut bad = Request { flags: 0, command: CMD_READ, cookie: 1, offset: 0, length: 1 }.encode();
    bad[0] ^= 0xff;
    c.0.write_all(&bad).unwrap();
    assert!(c.closed());
    // So does a write larger than any request may be (its payload cannot be skipped safely).
    let mut c = RawClient::session(&serve.socket, &export);
    c.request(CMD_WRITE, 0, u32::MAX, &[]);
    assert!(c.closed());
    // Half a request, then gone.
    let mut c = RawClient::session(&serve.socket, &export);
    c.0.write_all(&Request { flags: 0, command: CMD_READ, cookie: 1, offset: 0, length: 1 }.encode()[..10]).unwrap();
    drop(c);

    // The server still serves everyone else correctly.
    let out = env.path("after.raw");
    run_tool(tool("qemu-img").args(["convert", "-f", "raw", "-O", "raw"]).arg(serve.uri(&export)).arg(&out));
    assert!(std::fs::read(&out).unwrap() == v);
    serve.stop();
}

/// A CA, a server certificate for `localhost` and a client certificate it signed (in qemu's x509 credential
/// layout), and an unrelated CA.
fn make_certificates(dir: &Path) {
    let ssl = |args: &[&str]| {
        run_tool(tool("openssl").current_dir(dir).args(args));
    };
    ssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        "/CN=diskvault test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    // `NAME-key.pem` and `NAME-cert.pem` for `subject`, signed by the CA, with these X.509 extensions.
    let signed = |name: &str, subject: &str, extensions: &[u8]| {
        let (key, csr, ext, cert) =
            (format!("{name}-key.pem"), format!("{name}.csr"), format!("{name}-ext.cnf"), format!("{name}-cert.pem"));
        ssl(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", subject]);
        write(&dir.join(&ext), extensions);
        ssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &ext,
        ]);
    };
    signed(
        "server",
        "/CN=localhost",
        b"subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    );
    // A client certificate from the same CA, for servers that admit only clients they know.
    signed("client", "/CN=operator", b"basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n");
    ssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "other-key.pem",
        "-out",
        "other-ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=someone else",
    ]);
}

#[test]
fn tls_sources_verify_the_server() {
    let env = Env::with_repo();
    let image = new_qcow2(&env, "tls.qcow2", 16 * M);
    guest_write(&env, &image, 5 * M, &random_bytes(21, 2 * MIB + 77));
    let certs = env.path("certs");
    std::fs::create_dir(&certs).unwrap();
    make_certificates(&certs);
    let sock = env.path("tls.sock");
    let mut child = tool("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-t", "-e", "4", "-k"])
        .arg(&sock)
        .arg("--object")
        .arg(format!("tls-creds-x509,id=tls0,dir={},endpoint=server,verify-peer=off", certs.display()))
        .args(["--tls-creds", "tls0"])
        .arg(&image)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !sock.exists() {
        assert!(
            child.try_wait().unwrap().is_none() && start.elapsed() < Duration::from_secs(20),
            "qemu-nbd did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let server = QemuNbd { child, uri: format!("nbds+unix:///?socket={}", sock.display()) };
    let ca = certs.join("ca-cert.pem");
    let other = certs.join("other-ca.pem");

    let r = env.backup(&["--nbd-tls-ca", ca.to_str().unwrap(), &format!("d={}", server.uri)]);
    assert_eq!(r["disks"][0]["blocks_read"], 3);
    assert!(env.restore(r["snapshot"].as_str().unwrap(), &[]) == raw_content(&env, &image));

    // A server signed by another CA, a name the certificate does not carry, and plain NBD to a TLS server.
    let r = env.fails(&["backup", "--nbd-tls-ca", other.to_str().unwrap(), &server.uri]);
    assert!(r.stderr.contains("TLS handshake") && r.stderr.contains("UnknownIssuer"), "{}", r.stderr);
    let r =
        env.fails(&["backup", "--nbd-tls-ca", ca.to_str().unwrap(), "--nbd-tls-server-name", "elsewhere", &server.uri]);
    assert!(r.stderr.contains("not valid for name \"elsewhere\""), "{}", r.stderr);
    let r = env.fails(&["backup", &format!("nbd+unix:///?socket={}", sock.display())]);
    assert!(r.stderr.contains("requires TLS"), "{}", r.stderr);
    let r = env.fails(&["backup", &server.uri]);
    assert!(r.stderr.contains("--nbd-tls-ca"), "{}", r.stderr);
}

/// qemu's x509 credentials for a client in a directory of their own: the CA it trusts, and optionally the
/// client certificate of [`make_certificates`].
fn qemu_client_creds(certs: &Path, name: &str, ca: &str, with_cert: bool) -> PathBuf {
    let dir = certs.join(name);
    std::fs::create_dir(&dir).unwrap();
    std::fs::copy(certs.join(ca), dir.join("ca-cert.pem")).unwrap();
    if with_cert {
        std::fs::copy(certs.join("client-cert.pem"), dir.join("client-cert.pem")).unwrap();
        std::fs::copy(certs.join("client-key.pem"), dir.join("client-key.pem")).unwrap();
    }
    dir
}

/// `command` (`qemu-img convert`, `qemu-io`) opening an export served over TLS on a Unix socket, with the
/// client credentials in `creds`; the caller adds the rest.
fn qemu_tls(command: &[&str], serve: &Serve, export: &str, creds: &Path) -> Command {
    let mut c = tool(command[0]);
    c.args(&command[1..])
        .arg("--object")
        .arg(format!("tls-creds-x509,id=tls0,dir={},endpoint=client", creds.display()))
        .arg("--image-opts")
        .arg(format!(
            "driver=nbd,server.type=unix,server.path={},export={export},tls-creds=tls0,tls-hostname=localhost",
            serve.socket.display()
        ));
    c
}

/// `qemu-img convert` of an export served over TLS into `out`.
fn qemu_convert_tls(serve: &Serve, export: &str, creds: &Path, out: &Path) -> std::process::Output {
    qemu_tls(&["qemu-img", "convert"], serve, export, creds).args(["-O", "raw"]).arg(out).output().unwrap()
}

#[test]
fn served_snapshots_over_tls_admit_only_trusted_clients() {
    let env = Env::with_repo();
    let (v, id) = backed_up_disk(&env, 5);
    let export = format!("{}/d0", &id[..8]);
    let certs = env.path("certs");
    std::fs::create_dir(&certs).unwrap();
    make_certificates(&certs);
    let pem = |f: &str| certs.join(f).to_str().unwrap().to_string();
    let (cert, key, ca) = (pem("server-cert.pem"), pem("server-key.pem"), pem("ca-cert.pem"));
    let known = qemu_client_creds(&certs, "known", "ca-cert.pem", true);
    let anonymous = qemu_client_creds(&certs, "anonymous", "ca-cert.pem", false);
    let wrong_ca = qemu_client_creds(&certs, "wrong-ca", "other-ca.pem", true);

    // Client certificates required.
    let serve = Serve::start(&env, &["--tls-cert", &cert, "--tls-key", &key, "--tls-client-ca", &ca]);
    let out = env.path("tls.raw");
    let r = qemu_convert_tls(&serve, &export, &anonymous, &out);
    assert!(!r.status.success(), "a client without a certificate was served");
    let r = qemu_convert_tls(&serve, &export, &wrong_ca, &out);
    assert!(!r.status.success(), "a client that does not trust the server's CA went on");
    let plain = tool("qemu-img").args(["info"]).arg(serve.uri(&export)).output().unwrap();
    let stderr = String::from_utf8_lossy(&plain.stderr);
    assert!(!plain.status.success() && stderr.contains("this server requires TLS"), "{stderr}");
    // diskvault's own NBD client: refused without a certificate, and told why; with one, it backs the export up.
    let uri = format!("nbds+unix:///{export}?socket={}", serve.socket.display());
    let r = env.fails(&["backup", "--nbd-tls-ca", &ca, &uri]);
    assert!(r.stderr.contains("CertificateRequired"), "{}", r.stderr);
    let (client_cert, client_key) = (pem("client-cert.pem"), pem("client-key.pem"));
    let r = env.backup(&[
        "--name",
        "copy",
        "--nbd-tls-ca",
        &ca,
        "--nbd-tls-cert",
        &client_cert,
        "--nbd-tls-key",
        &client_key,
        &format!("d0={uri}"),
    ]);
    assert!(env.restore(r["snapshot"].as_str().unwrap(), &[]) == v);
    // After all that, a known qemu client reads every byte.
    let r = qemu_convert_tls(&serve, &export, &known, &out);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(std::fs::read(&out).unwrap() == v, "the export read over TLS differs from the disk");
    serve.stop();

    // TLS without client certificates: anyone who trusts the server's CA reads, and writes to a writable
    // export (a 3 MiB write is many TLS records in one request).
    let overlays = env.dir.path().to_str().unwrap();
    let serve = Serve::start(&env, &["--tls-cert", &cert, "--tls-key", &key, "--writable", "--overlay-dir", overlays]);
    let r = qemu_convert_tls(&serve, &export, &anonymous, &out);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(std::fs::read(&out).unwrap() == v);
    let written = qemu_tls(&["qemu-io"], &serve, &export, &anonymous)
        .args(["-c", &format!("write -P 0x3c {MIB} {}", 3 * MIB)])
        .output()
        .unwrap();
    let says = String::from_utf8_lossy(&written.stdout);
    assert!(written.status.success() && says.contains("wrote 3145728/3145728"), "{says}");
    let r = qemu_convert_tls(&serve, &export, &anonymous, &out);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let mut want = v.clone();
    want[MIB..4 * MIB].fill(0x3c);
    assert!(std::fs::read(&out).unwrap() == want, "the write over TLS did not land as written");
    serve.stop();
}

/// In TLS 1.3 a server judges a client certificate after the client has finished its handshake: the client
/// learns of the refusal only when it next reads or writes, and by then the server may have closed the
/// connection. The client must still name the cause, not report a broken pipe (this raced in CI before).
#[test]
fn a_refused_client_certificate_is_named_after_the_server_hung_up() {
    use diskvault::nbd::tls::{client_config, server_config, ClientStream};
    let dir = tempfile::tempdir().unwrap();
    make_certificates(dir.path());
    let file = |f: &str| dir.path().join(f);
    let server = server_config(&file("server-cert.pem"), &file("server-key.pem"), Some(&file("ca-cert.pem"))).unwrap();
    let (client_sock, mut server_sock) = UnixStream::pair().unwrap();
    let refusing = std::thread::spawn(move || {
        let mut conn = rustls::ServerConnection::new(server).unwrap();
        while conn.is_handshaking() {
            if let Err(e) = conn.complete_io(&mut server_sock) {
                let _ = conn.write_tls(&mut server_sock);
                return e.to_string();
            }
        }
        "the server accepted a client without a certificate".to_string()
    });
    let config = client_config(&file("ca-cert.pem"), None).unwrap();
    let conn = rustls::ClientConnection::new(config, "localhost".try_into().unwrap()).unwrap();
    let mut client = ClientStream::connect(conn, client_sock).unwrap();
    // The server has refused and closed its end before the client says anything.
    let refusal = refusing.join().unwrap();
    assert!(refusal.contains("CertificateRequired") || refusal.contains("peer sent no certificates"), "{refusal}");
    let _ = client.write(b"NBD option");
    let mut buf = [0u8; 16];
    let e = client.read(&mut buf).expect_err("read from a connection the server refused");
    assert!(e.to_string().contains("CertificateRequired"), "{e}");
}

/// A client that connects and never chooses an export would hold one of `--max-clients` slots for good: serve
/// disconnects it after `--handshake-limit`, also when it trickles bytes, and leaves negotiated clients alone.
#[test]
fn clients_that_do_not_negotiate_are_disconnected() {
    use diskvault::nbd::client::{Address, Connection, TlsOptions};
    let env = Env::with_repo();
    let (v, id) = backed_up_disk(&env, 10);
    let serve = Serve::start(&env, &["--handshake-limit", "1", "--max-clients", "1"]);
    let address = Address::parse(&serve.uri(&format!("{}/d0", &id[..8]))).unwrap();
    let connect = || Connection::connect(&address, &[], &TlsOptions::default());

    // A raw connection, once the server greeted it. Connections of a moment ago (Serve::start's probe) may
    // still hold the one slot for a moment.
    let greeted = || {
        let start = Instant::now();
        loop {
            let mut s = UnixStream::connect(&serve.socket).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            if s.read_exact(&mut [0u8; 18]).is_ok() {
                return s;
            }
            assert!(start.elapsed() < Duration::from_secs(5), "serve refused a client for 5 s with no other");
            std::thread::sleep(Duration::from_millis(50));
        }
    };

    // Greeted, then silent: it holds the only slot until the limit ends it.
    let mut idle = greeted();
    let connected = Instant::now();
    assert!(connect().is_err(), "a second client was served next to the first with --max-clients 1");
    let mut rest = Vec::new();
    idle.read_to_end(&mut rest).expect("serve closes an idle connection (this is not the test's read timeout)");
    let held = connected.elapsed();
    assert!(held >= Duration::from_millis(800) && held < Duration::from_secs(10), "idle client held {held:?}");

    // The slot is free again (the server thread ends just after the close), and a negotiated client is not
    // cut off by the limit.
    let start = Instant::now();
    let mut client = loop {
        match connect() {
            Ok(c) => break c,
            Err(e) => assert!(start.elapsed() < Duration::from_secs(5), "the idle client's slot stayed taken: {e}"),
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(1500));
    let mut block = vec![0u8; MIB];
    client.read_at(0, &mut block).unwrap();
    assert!(block == v[..MIB], "a negotiated client read wrong data after the handshake limit");
    client.disconnect();

    // A client sending one byte at a time never stays silent long, yet is still disconnected at the limit.
    let mut trickle = greeted();
    let start = Instant::now();
    let mut request = FLAG_C_FIXED_NEWSTYLE.to_be_bytes().to_vec();
    request.extend_from_slice(&IHAVEOPT.to_be_bytes());
    request.extend_from_slice(&[0u8; 64]);
    let mut sent = 0;
    while sent < request.len() && trickle.write_all(&request[sent..sent + 1]).is_ok() {
        sent += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(sent < request.len(), "a trickling client stayed connected for {:?}", start.elapsed());
    assert!(start.elapsed() < Duration::from_secs(10), "a trickling client stayed connected for {:?}", start.elapsed());
    serve.stop();
}

#[test]
fn serve_stops_fetching_when_its_session_is_lost() {
    let env = Env::with_repo();
    let (v, id) = backed_up_disk(&env, 8);
    let serve = Serve::start_with(&env, &[], &[("DISKVAULT_LOCK_STALE_SECS", "2")]);
    let uri = serve.uri(&format!("{}/d0", &id[..8]));
    let read = |offset: usize, len: usize| {
        tool("qemu-io")
            .args(["-r", "-f", "raw", "-c"])
            .arg(format!("read -v {offset} {len}"))
            .arg(&uri)
            .output()
            .unwrap()
    };
    let out = read(0, 16);
    assert!(out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&format!("{:02x}", v[0])));
    // Another client judged the session abandoned and removed it: a prune may now move data, so serve must
    // not fetch blobs by the locations it knew.
    for marker in env.objects("locks") {
        env.delete_object(&marker);
    }
    std::thread::sleep(Duration::from_millis(1500));
    let tail = v.len() - 512;
    let out = read(tail, 512);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("failed") || !out.status.success(), "a read after the session was lost succeeded: {text}");
    serve.stop();
}

#[test]
fn restore_writes_qcow2_and_vmdk_for_other_tools() {
    let env = Env::with_repo();
    let (v, id) = backed_up_disk(&env, 9);
    let raw = env.path("d.raw");
    write(&raw, &v);
    for format in ["qcow2", "vmdk"] {
        let out = env.path(&format!("d.{format}"));
        env.ok(&["restore", &id, "--target", out.to_str().unwrap(), "--format", format]);
        let info = run_tool(tool("qemu-img").args(["info", "--output=json"]).arg(&out));
        let info: serde_json::Value = serde_json::from_str(&info).unwrap();
        assert_eq!(info["format"], format);
        assert_eq!(info["virtual-size"], v.len() as u64);
        let cmp = run_tool(tool("qemu-img").args(["compare", "-f", format, "-F", "raw"]).arg(&out).arg(&raw));
        assert!(cmp.contains("identical"), "{cmp}");
        // No temporary raw file is left, and an existing target is not replaced without --overwrite.
        assert!(!env.path(&format!("d.{format}.partial.raw")).exists());
        let r = env.fails(&["restore", &id, "--target", out.to_str().unwrap(), "--format", format]);
        assert!(r.stderr.contains("--overwrite"), "{}", r.stderr);
    }
}

/// `env`'s repository served in this process (for tests that count reads or look at overlays directly).
fn exports_in_process(env: &Env, opts: diskvault::serve::ServeOptions) -> diskvault::serve::RepositoryExports {
    let repo = env.open_repo();
    let cache = std::sync::Arc::new(diskvault::cache::IndexCache::open(&repo, &env.cache()).unwrap().0);
    diskvault::serve::RepositoryExports::new(repo, cache, opts)
}

/// `data` backed up as source `vm` and the repository served in this process: the exports, the snapshot's id
/// and its disk.
fn backed_up_in_process(
    e: &Env,
    data: &[u8],
) -> (diskvault::serve::RepositoryExports, diskvault::format::ObjectId, diskvault::format::snapshot::DiskManifest) {
    write(&e.path("d.raw"), data);
    e.backup(&["--name", "vm", e.path("d.raw").to_str().unwrap()]);
    let exports = exports_in_process(e, Default::default());
    let (id, snap) = exports.repository().find_snapshot("latest", None).unwrap();
    (exports, id, snap.disks[0].clone())
}

/// The first `len` bytes of `disk`, read 1 MiB at a time from the start.
fn read_in_order(disk: &diskvault::serve::SnapshotDisk, len: usize) -> Vec<u8> {
    use diskvault::nbd::server::Device;
    let mut back = vec![0u8; len];
    for (k, chunk) in back.chunks_mut(MIB).enumerate() {
        disk.read((k * MIB) as u64, chunk).unwrap();
    }
    back
}

/// `NBD_CMD_CACHE` on a snapshot export: the hinted range is fetched in coalesced ranged reads of the packs,
/// and reading it afterwards goes to no pack again (in-process, to count the reads).
#[test]
fn a_cache_hint_fetches_its_range_in_few_reads() {
    use diskvault::nbd::server::Device;
    let e = Env::with_repo();
    let data = random_bytes(61, 32 * MIB);
    let (exports, id, manifest) = backed_up_in_process(&e, &data);
    // No read-ahead of its own: what is fetched ahead is what the hint asked for.
    let disk = exports.disk(&id, &manifest, 1).unwrap();
    disk.prefetch(0, data.len() as u64);
    let hinted = exports.pack_reads();
    // 32 incompressible blocks lie in two or three packs of 16 MiB: a read per pack, or two when a pack
    // passes the 16 MiB cap of a ranged read; one read per block would be 32.
    assert!((1..=6).contains(&hinted), "the hint of 32 blocks took {hinted} reads");
    assert!(read_in_order(&disk, data.len()) == data, "the hinted range reads back other bytes");
    assert_eq!(exports.pack_reads(), hinted, "reads of the hinted range went to the packs again");
}

/// A sequential reader of a snapshot export finds the blocks ahead of it fetched in the background, in few
/// ranged reads; a reader of scattered blocks makes one read per block and fetches nothing around them (it
/// would wait for what it does not want). In-process, to count the reads.
#[test]
fn sequential_readers_are_read_ahead_and_scattered_readers_are_not() {
    use diskvault::nbd::server::Device;
    let e = Env::with_repo();
    let data = random_bytes(62, 48 * MIB);
    let (exports, id, manifest) = backed_up_in_process(&e, &data);
    let disk = exports.disk(&id, &manifest, 16).unwrap();

    let mut buf = vec![0u8; MIB];
    for b in [40, 5, 30, 12] {
        disk.read((b * MIB) as u64, &mut buf[..4096]).unwrap();
        assert!(buf[..4096] == data[b * MIB..b * MIB + 4096], "block {b} reads back other bytes");
    }
    assert_eq!(exports.pack_reads(), 4, "scattered reads fetched more than their own blocks");
    disk.read((20 * MIB) as u64, &mut buf[..4096]).unwrap();
    assert_eq!(exports.pack_reads(), 5, "block 20 was fetched ahead although no read came near it");

    assert!(read_in_order(&disk, data.len()) == data, "the sequential read returns other bytes");
    // 43 blocks were not cached: one read each without read-ahead. With it: blocks 0 and 1 on their own, then a
    // window of 8 blocks and windows of 16, a ranged read per pack of 16 MiB each touches (more where a cached
    // block splits a range): 18.
    let reads = exports.pack_reads() - 5;
    assert!((3..=20).contains(&reads), "a sequential read of 43 uncached blocks took {reads} reads");
}

/// Kept overlays of snapshots that were since forgotten are reported when serve starts, and left in place
/// (in-process: `RepositoryExports::orphaned_overlays`, which serve logs as warnings).
#[test]
fn kept_overlays_of_forgotten_snapshots_are_reported_not_deleted() {
    use diskvault::nbd::server::Device;
    use diskvault::serve::ServeOptions;
    let env = Env::with_repo();
    let (_, old) = backed_up_disk(&env, 31);
    let (_, new) = backed_up_disk(&env, 32);
    let dir = env.path("overlays");
    std::fs::create_dir(&dir).unwrap();
    let exports = || {
        let opts = ServeOptions { writable: true, keep_overlays: true, overlay_dir: dir.clone(), ..Default::default() };
        exports_in_process(&env, opts)
    };
    let e = exports();
    for id in [&old, &new] {
        let (id, snap) = e.repository().find_snapshot(id, None).unwrap();
        let disk = e.disk(&id, &snap.disks[0], 1).unwrap();
        disk.write(0, b"a guest's write").unwrap();
        disk.flush().unwrap();
    }
    assert!(e.orphaned_overlays().unwrap().is_empty());
    drop(e);

    env.ok(&["forget", "--keep-last", "1"]);
    let orphans = exports().orphaned_overlays().unwrap();
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    let (path, snapshot) = &orphans[0];
    assert_eq!(snapshot.hex(), old);
    assert!(path.exists() && path.with_extension("map").exists(), "the overlay of a forgotten snapshot was deleted");
}
