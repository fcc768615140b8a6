//! File-level restore: `ls`, `dump` and `extract` read the files inside a backed-up disk (GPT and MBR tables,
//! ext4 made by the real mke2fs from a directory tree) without mounting anything.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use common::Env;

fn run_tool(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e} (scripts/setup.sh installs fdisk and e2fsprogs)"));
    assert!(out.status.success(), "{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
}

/// A directory tree with what file-level restore must get right: contents over several 1 MiB blocks, a sparse
/// file, symlinks, permissions, old modification times, a large (hashed) directory, non-ASCII names.
fn make_tree(root: &Path) {
    let w = |p: &str, data: &[u8]| {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, data).unwrap();
    };
    w("etc/hostname", b"db01\n");
    w("etc/nginx/nginx.conf", b"events {}\nhttp { server { listen 80; } }\n");
    w("var/lib/app/data.bin", &common::random_bytes(7, 3_000_000));
    w("home/anna/naïve notes.txt", "zwölf Boxkämpfer\n".as_bytes());
    for i in 0..300 {
        w(&format!("var/spool/many/msg-{i:04}"), format!("message {i}\n").as_bytes());
    }
    let sparse = root.join("var/lib/app/sparse.img");
    let f = std::fs::File::create(&sparse).unwrap();
    f.set_len(6 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"the end", (6 << 20) - 7).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"start", 0).unwrap();
    std::os::unix::fs::symlink("../etc/hostname", root.join("home/hostname-link")).unwrap();
    std::os::unix::fs::symlink("/etc/nginx/nginx.conf", root.join("etc/nginx.conf")).unwrap();
    std::fs::create_dir_all(root.join("srv/empty")).unwrap();
    std::fs::set_permissions(root.join("etc/nginx"), std::fs::Permissions::from_mode(0o750)).unwrap();
    std::fs::set_permissions(root.join("home/anna/naïve notes.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
    run_tool(Command::new("touch").args(["-h", "-d", "2019-03-04 05:06:07"]).arg(root.join("etc/hostname")));
    run_tool(Command::new("touch").args(["-h", "-d", "2021-07-08 09:10:11"]).arg(root.join("etc/nginx.conf")));
    run_tool(Command::new("touch").args(["-d", "2018-01-01 00:00:00"]).arg(root.join("srv/empty")));
    // Past tar's 100-byte name field, and a symlink target past its 100-byte link field.
    let long = format!("srv/{}/{}.txt", "d".repeat(90), "f".repeat(120));
    w(&long, b"a long name\n");
    std::os::unix::fs::symlink(format!("../{long}"), root.join(format!("srv/{}", "l".repeat(20)))).unwrap();
}

/// Writes an ext4 file system holding `tree` into `image` at byte `offset`, `kib` KiB long.
fn mkfs_ext4(image: &Path, offset: u64, kib: u64, tree: &Path, label: &str) {
    run_tool(
        Command::new("mke2fs")
            .args(["-q", "-F", "-t", "ext4", "-L", label, "-d"])
            .arg(tree)
            .arg("-E")
            .arg(format!("offset={offset}"))
            .arg(image)
            .arg(format!("{kib}k")),
    );
}

/// A sparse disk image of `mib` MiB partitioned by sfdisk from `script`.
fn partitioned(path: &Path, mib: u64, script: &str) {
    std::fs::File::create(path).unwrap().set_len(mib << 20).unwrap();
    let mut child = Command::new("sfdisk")
        .args(["-q", "--no-reread", "--no-tell-kernel"])
        .arg(path)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("sfdisk (scripts/setup.sh installs fdisk)");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), script.as_bytes()).unwrap();
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success(), "sfdisk failed on {script}");
}

/// Every entry below `root`, by path relative to it.
fn local_tree(root: &Path) -> Vec<(String, std::fs::Metadata)> {
    let mut out = Vec::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        for e in std::fs::read_dir(root.join(&rel)).unwrap() {
            let e = e.unwrap();
            let rel = rel.join(e.file_name());
            let meta = std::fs::symlink_metadata(root.join(&rel)).unwrap();
            if meta.is_dir() {
                dirs.push(rel.clone());
            }
            out.push((rel.to_str().unwrap().to_string(), meta));
        }
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// `got` holds what `want` holds: the same entries, kinds, contents, symlink targets, permissions and
/// modification times.
fn assert_same_tree(want: &Path, got: &Path) {
    assert_tree(want, got, true)
}

/// The same entries, kinds and contents, whatever their times and permissions: a committed fixture disk was
/// filled from a tree made when it was made.
fn assert_same_contents(want: &Path, got: &Path) {
    assert_tree(want, got, false)
}

fn assert_tree(want: &Path, got: &Path, attributes: bool) {
    let (w, g) = (local_tree(want), local_tree(got));
    let names = |t: &[(String, std::fs::Metadata)]| t.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    assert_eq!(names(&w), names(&g), "entries of {} and {}", want.display(), got.display());
    for ((name, wm), (_, gm)) in w.iter().zip(&g) {
        assert_eq!(wm.file_type(), gm.file_type(), "{name}");
        if !attributes {
            assert!(!wm.is_file() || std::fs::read(want.join(name)).unwrap() == std::fs::read(got.join(name)).unwrap());
            continue;
        }
        assert_eq!(wm.mtime(), gm.mtime(), "modification time of {name}");
        if wm.file_type().is_symlink() {
            assert_eq!(std::fs::read_link(want.join(name)).unwrap(), std::fs::read_link(got.join(name)).unwrap());
            continue;
        }
        assert_eq!(wm.mode() & 0o7777, gm.mode() & 0o7777, "permissions of {name}");
        if wm.is_file() {
            assert!(std::fs::read(want.join(name)).unwrap() == std::fs::read(got.join(name)).unwrap(), "{name}");
        }
    }
}

/// Backs up a committed fixture disk (`tests/fixtures/NAME`, zstd-compressed) as source `source`; returns the
/// tree of `fixture-tree.sh` it was filled with, made anew.
fn back_up_fixture(e: &Env, name: &str, source: &str) -> PathBuf {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let disk = e.path("fixture.raw");
    let compressed = std::fs::read(fixtures.join(name)).unwrap();
    std::fs::write(&disk, zstd::decode_all(&compressed[..]).unwrap()).unwrap();
    e.ok(&["backup", "--name", source, &format!("disk0={}", disk.display())]);
    let tree = e.path("tree");
    run_tool(Command::new(fixtures.join("fixture-tree.sh")).arg(&tree));
    tree
}

/// Writes a GPT disk with one ext4 partition holding `tree` to `disk` and backs it up as `disk0` of source `vm`
/// (`extra` backup arguments before the disk); returns the snapshot's short id.
fn back_up_ext4_tree(e: &Env, disk: &Path, tree: &Path, extra: &[&str]) -> String {
    let _ = std::fs::remove_file(disk);
    partitioned(disk, 32, &format!("label: gpt\nstart=2048, type={LINUX}\n"));
    mkfs_ext4(disk, 2048 * 512, 28 << 10, tree, "root");
    let spec = format!("disk0={}", disk.display());
    let mut args = vec!["--name", "vm"];
    args.extend_from_slice(extra);
    args.push(&spec);
    e.backup(&args)["snapshot"].as_str().unwrap()[..8].to_string()
}

/// Every data blob of the repository, as (its pack's object name, a byte in the middle of its stored bytes, its
/// id, whether it is compressed): places to damage one blob at a time.
fn data_blobs(e: &Env) -> Vec<(String, usize, String, bool)> {
    let packs = e.objects("packs");
    let mut out = Vec::new();
    for index in e.objects("index") {
        let v = e.ok(&["cat", "index", index.rsplit('/').next().unwrap()]).json();
        for pack in v["packs"].as_array().unwrap() {
            let name = packs.iter().find(|n| n.ends_with(pack["id"].as_str().unwrap())).unwrap();
            for blob in pack["blobs"].as_array().unwrap().iter().filter(|b| b["type"] == "data") {
                let at = (blob["offset"].as_u64().unwrap() + blob["stored_len"].as_u64().unwrap() / 2) as usize;
                out.push((name.clone(), at, blob["id"].as_str().unwrap().to_string(), blob["compressed"] == true));
            }
        }
    }
    out
}

const ESP: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
const LINUX: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

#[test]
fn files_of_an_ext4_partition_are_listed_dumped_and_extracted_as_they_were() {
    let e = Env::with_repo();
    let tree = e.path("tree");
    make_tree(&tree);
    let disk = e.path("disk.raw");
    // An EFI partition (left unformatted) and the root file system, as a Debian installer lays them out.
    partitioned(
        &disk,
        64,
        &format!("label: gpt\nstart=2048, size=16384, type={ESP}\nstart=18432, size=110592, type={LINUX}, name=root\n"),
    );
    mkfs_ext4(&disk, 18432 * 512, 50 << 10, &tree, "rootfs");
    e.ok(&["backup", "--name", "db01", &format!("disk0={}", disk.display())]);

    let volumes = e.ok(&["ls", "latest", "--json"]).json();
    assert_eq!(volumes["table"], "gpt");
    let v = volumes["volumes"].as_array().unwrap();
    assert_eq!(v.len(), 2, "{volumes}");
    assert_eq!((v[0]["name"].as_str(), v[0]["partition_type"].as_str()), (Some("part1"), Some("EFI System")));
    assert_eq!(
        (v[1]["name"].as_str(), v[1]["fs"].as_str(), v[1]["label"].as_str()),
        (Some("part2"), Some("ext"), Some("rootfs"))
    );
    assert_eq!(v[1]["start"], 18432 * 512);
    assert_eq!(v[1]["partition_name"], "root");

    // Every entry of the tree, with its kind, size, permissions, time and symlink target.
    let listed = e.ok(&["ls", "latest", "/part2", "-R", "--json"]).json();
    let listed: std::collections::BTreeMap<String, serde_json::Value> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["path"].as_str().unwrap().trim_start_matches("/part2/").to_string(), x.clone()))
        .filter(|(p, _)| !p.starts_with("lost+found"))
        .collect();
    let local = local_tree(&tree);
    assert_eq!(listed.keys().cloned().collect::<Vec<_>>(), local.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>());
    for (name, m) in &local {
        let x = &listed[name];
        assert_eq!(x["mtime"], m.mtime(), "{name}");
        if m.file_type().is_symlink() {
            assert_eq!(x["kind"], "symlink");
            assert_eq!(x["target"].as_str().map(PathBuf::from), Some(std::fs::read_link(tree.join(name)).unwrap()));
        } else {
            assert_eq!(x["mode"], m.mode() & 0o7777, "{name}");
            assert_eq!(x["kind"], if m.is_dir() { "dir" } else { "file" }, "{name}");
        }
        if m.is_file() {
            assert_eq!(x["size"], m.len(), "{name}");
        }
    }
    let long = e.ok(&["ls", "latest:disk0", "/part2/etc", "--long"]).stdout;
    assert!(long.contains("drwxr-x--- ") && long.contains("/part2/etc/nginx\n"), "{long}");
    assert!(long.contains("/part2/etc/nginx.conf -> /etc/nginx/nginx.conf"), "{long}");
    assert!(long.contains("2019-03-04") && long.contains("/part2/etc/hostname"), "{long}");

    // dump: a file's bytes, a symlink followed inside the guest, a volume's raw bytes.
    let dump = |path: &str| {
        let r = e.run(&["dump", "latest", path]);
        assert_eq!(r.code, 0, "dump {path}: {}", r.stderr);
        e.command(&["dump", "latest", path]).output().unwrap().stdout
    };
    assert!(dump("/part2/var/lib/app/data.bin") == std::fs::read(tree.join("var/lib/app/data.bin")).unwrap());
    assert_eq!(dump("/part2/home/hostname-link"), b"db01\n");
    assert_eq!(dump("/part2/etc/nginx.conf"), std::fs::read(tree.join("etc/nginx/nginx.conf")).unwrap());
    let image = std::fs::read(&disk).unwrap();
    assert_eq!(v[1]["len"], 110592 * 512);
    assert!(dump("/part2") == image[18432 * 512..(18432 + 110592) * 512], "the partition's raw bytes");

    // dump of a directory: a tar archive GNU tar unpacks into the tree as it was; --tar of a volume: all of it.
    let untar = |archive: &[u8], into: &Path| {
        std::fs::create_dir_all(into).unwrap();
        let mut child = Command::new("tar")
            .arg("-x")
            .arg("-C")
            .arg(into)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("GNU tar");
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), archive).unwrap();
        drop(child.stdin.take());
        assert!(child.wait().unwrap().success(), "tar -x of the dump");
    };
    let untarred = e.path("untarred");
    untar(&dump("/part2/etc"), &untarred);
    assert_same_tree(&tree.join("etc"), &untarred.join("etc"));
    let r = e.command(&["dump", "latest", "/part2", "--tar"]).output().unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let whole_tar = e.path("whole-tar");
    untar(&r.stdout, &whole_tar);
    for dir in ["etc", "home", "var", "srv"] {
        assert_same_tree(&tree.join(dir), &whole_tar.join(dir));
    }

    // extract: the tree as it was, holes left as holes; nothing is replaced.
    let out = e.path("out");
    let t = out.to_str().unwrap();
    e.ok(&["extract", "latest", "/part2/etc", "/part2/home", "/part2/var", "/part2/srv", "--target", t]);
    assert_same_tree(&tree, &out);
    let sparse = std::fs::metadata(out.join("var/lib/app/sparse.img")).unwrap();
    assert!(sparse.blocks() * 512 < 64 << 10, "6 MiB sparse file took {} bytes", sparse.blocks() * 512);
    let again = e.fails(&["extract", "latest", "/part2/etc", "--target", t]);
    assert!(again.stderr.contains("exists already"), "{}", again.stderr);
    let whole_fs = e.path("whole");
    e.ok(&["extract", "latest", "/part2", "--target", whole_fs.to_str().unwrap()]);
    assert_same_tree(&tree.join("etc"), &whole_fs.join("etc"));

    // Clear errors for what is not there or not readable.
    let r = e.fails(&["ls", "latest", "/part2/etc/missing"]);
    assert!(r.stderr.contains("/part2/etc/missing: no such file or directory"), "{}", r.stderr);
    let r = e.fails(&["ls", "latest", "/part7"]);
    assert!(r.stderr.contains("no volume \"part7\" (volumes: part1, part2)"), "{}", r.stderr);
    let r = e.fails(&["ls", "latest", "/part1/x"]);
    assert!(r.stderr.contains("part1 holds unknown, whose files diskvault does not read"), "{}", r.stderr);
    let r = e.fails(&["ls", "latest", "part2"]);
    assert!(r.stderr.contains("not absolute"), "{}", r.stderr);
}

#[test]
fn logical_mbr_partitions_a_damaged_gpt_header_and_a_disk_without_a_table_are_read() {
    let e = Env::with_repo();
    let tree = e.path("tree");
    make_tree(&tree);
    // MBR: a primary partition, and an extended one holding two logical partitions; ext4 on the second.
    let mbr = e.path("mbr.raw");
    partitioned(&mbr, 96, "label: dos\nstart=2048, size=8192, type=83\nstart=10240, type=5\nstart=12288, size=8192, type=83\nstart=22528, type=83\n");
    let part6 = 22528 * 512;
    mkfs_ext4(&mbr, part6, (96 << 10) - part6 / 1024, &tree, "data");
    // GPT with its primary header zeroed: the backup header at the disk's end still has the table.
    let gpt = e.path("gpt.raw");
    partitioned(&gpt, 48, &format!("label: gpt\nstart=2048, type={LINUX}\n"));
    mkfs_ext4(&gpt, 2048 * 512, 40 << 10, &tree, "backup-hdr");
    let f = std::fs::OpenOptions::new().write(true).open(&gpt).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0u8; 512], 512).unwrap();
    // No table at all: ext4 on the whole disk, as data disks often are.
    let whole = e.path("whole.raw");
    std::fs::File::create(&whole).unwrap().set_len(32 << 20).unwrap();
    mkfs_ext4(&whole, 0, 32 << 10, &tree, "whole");
    e.ok(&[
        "backup",
        "--name",
        "vm",
        &format!("mbr={}", mbr.display()),
        &format!("gpt={}", gpt.display()),
        &format!("whole={}", whole.display()),
    ]);

    let v = e.ok(&["ls", "latest:mbr", "--json"]).json();
    assert_eq!(v["table"], "mbr");
    let names: Vec<&str> = v["volumes"].as_array().unwrap().iter().map(|x| x["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["part1", "part5", "part6"]);
    assert_eq!(v["volumes"][2]["label"], "data");
    assert_eq!(v["volumes"][2]["start"], part6);
    let v = e.ok(&["ls", "latest:gpt", "--json"]).json();
    assert_eq!((v["table"].as_str(), v["volumes"][0]["label"].as_str()), (Some("gpt"), Some("backup-hdr")));
    let v = e.ok(&["ls", "latest", "--disk", "whole", "--json"]).json();
    assert_eq!(v["table"], serde_json::Value::Null);
    assert_eq!((v["volumes"][0]["name"].as_str(), v["volumes"][0]["label"].as_str()), (Some("whole"), Some("whole")));

    for (disk, path) in [("mbr", "/part6"), ("gpt", "/part1"), ("whole", "/whole")] {
        let out = e.path(&format!("out-{disk}"));
        e.ok(&["extract", &format!("latest:{disk}"), &format!("{path}/var"), "--target", out.to_str().unwrap()]);
        assert_same_tree(&tree.join("var"), &out.join("var"));
    }
    let r = e.fails(&["ls", "latest", "/"]);
    assert!(r.stderr.contains("several disks (mbr, gpt, whole)"), "{}", r.stderr);
}

#[test]
fn a_damaged_blob_under_a_file_is_named_and_everything_else_is_still_copied() {
    let e = Env::with_repo();
    let tree = e.path("tree");
    make_tree(&tree);
    back_up_ext4_tree(&e, &e.path("disk.raw"), &tree, &[]);
    // Damage one blob stored uncompressed (a block of data.bin's random bytes) that holds no file system
    // metadata: the first whose damage leaves the whole tree listable.
    let candidates: Vec<_> = data_blobs(&e).into_iter().filter(|(_, _, _, compressed)| !compressed).collect();
    let damaged = candidates
        .iter()
        .find(|(pack, at, _, _)| {
            e.flip(pack, *at);
            let listable = e.run(&["ls", "latest", "/part1", "-R"]).code == 0;
            if !listable {
                e.flip(pack, *at); // flipped back
            }
            listable
        })
        .map(|(_, _, id, _)| id.clone())
        .expect("a blob of data.bin's contents alone");

    let r = e.command(&["dump", "latest", "/part1/var/lib/app/data.bin"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success(), "a damaged file was dumped: {stderr}");
    assert!(stderr.contains(&damaged), "the error names no damaged blob: {stderr}");
    // What came out before the error is the file's start, nothing else.
    let want = std::fs::read(tree.join("var/lib/app/data.bin")).unwrap();
    assert!(r.stdout.len() < want.len() && want.starts_with(&r.stdout), "{} bytes of other data", r.stdout.len());
    // The damaged copy is recorded: the next backup of the disk stores the block again (tests/integrity.rs).
    let recorded: Vec<serde_json::Value> = e
        .objects("damaged")
        .iter()
        .map(|name| e.ok(&["cat", "damaged", name.rsplit('/').next().unwrap()]).json())
        .collect();
    assert!(
        recorded.iter().any(|r| r["copies"].as_array().unwrap().iter().any(|c| c["blob"] == damaged.as_str())),
        "{stderr}"
    );

    // extract leaves the damaged file out, names it and its blob, and copies everything else.
    let out = e.path("out");
    let r = e.run(&["extract", "latest", "/part1", "--target", out.to_str().unwrap()]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("not extracted: /part1/var/lib/app/data.bin: packs/"), "{}", r.stderr);
    assert!(r.stderr.contains(&damaged), "{}", r.stderr);
    assert!(!out.join("var/lib/app/data.bin").exists(), "part of a damaged file was left");
    let app = tree.join("var/lib/app");
    let mtime = std::fs::metadata(&app).unwrap().modified().unwrap();
    std::fs::remove_file(app.join("data.bin")).unwrap();
    std::fs::File::open(&app).unwrap().set_modified(mtime).unwrap();
    for dir in ["etc", "home", "var", "srv"] {
        assert_same_tree(&tree.join(dir), &out.join(dir));
    }

    // A tar archive stops in the damaged file, without the end-of-archive blocks that would make the truncated
    // archive look complete.
    let r = e.command(&["dump", "latest", "/part1/var"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && stderr.contains(&damaged), "{stderr}");
    let tar = e.path("damaged.tar");
    std::fs::write(&tar, &r.stdout).unwrap();
    let listed = Command::new("tar").arg("-tf").arg(&tar).output().unwrap();
    assert!(!listed.status.success(), "tar took the truncated archive for a whole one");
    assert!(String::from_utf8_lossy(&listed.stdout).contains("var/lib/app/data.bin\n"), "{listed:?}");
    assert!(!r.stdout.ends_with(&[0u8; 1024]), "end-of-archive blocks after a failure");
}

#[test]
fn find_names_the_snapshots_and_paths_that_hold_a_file() {
    let e = Env::with_repo();
    let tree = e.path("tree");
    make_tree(&tree);
    let disk = e.path("disk.raw");
    let back_up = |day: &str| back_up_ext4_tree(&e, &disk, &tree, &["--time", &format!("{day} 22:00:00")]);
    let day1 = back_up("2026-11-01");
    // Day 2: nginx's configuration is gone, a report arrived.
    std::fs::remove_dir_all(tree.join("etc/nginx")).unwrap();
    std::fs::remove_file(tree.join("etc/nginx.conf")).unwrap();
    std::fs::write(tree.join("home/anna/Report.PDF"), b"%PDF-1.7").unwrap();
    let day2 = back_up("2026-11-02");
    // Another source whose disk holds no file system: searched, nothing found.
    common::write(&e.path("blank.raw"), &common::random_bytes(3, 1 << 20));
    e.ok(&["backup", "--name", "scratch", e.path("blank.raw").to_str().unwrap()]);

    // A name, in any directory: only the older snapshot has it (the file and the symlink).
    let out = e.ok(&["find", "nginx.conf"]).stdout;
    let want =
        format!("{day1}:disk0 (vm, 2026-11-01 22:00:00):\n  /part1/etc/nginx/nginx.conf\n  /part1/etc/nginx.conf\n");
    assert!(out.contains(&want), "{out}");
    assert!(!out.contains(&day2) && out.ends_with("2 matches in 3 disks of 3 snapshots\n"), "{out}");
    // `--long` shows them as `ls --long` does.
    let out = e.ok(&["find", "nginx.conf", "--long", "--name", "vm"]).stdout;
    assert!(
        out.contains("  lrwxrwxrwx ")
            && out.contains(" 2021-07-08 09:10:11 /part1/etc/nginx.conf -> /etc/nginx/nginx.conf"),
        "{out}"
    );

    // A path pattern: `**` across directories, `?` one character; JSON, newest snapshot first.
    let found = e.ok(&["find", "/part1/var/**/msg-000?", "--json"]).json();
    let found = found.as_array().unwrap();
    assert_eq!(found.len(), 2, "{found:?}");
    for (f, day) in found.iter().zip([&day2, &day1]) {
        assert!(f["snapshot"].as_str().unwrap().starts_with(day.as_str()), "{f}");
        let paths: Vec<&str> = f["entries"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
        let want: Vec<String> = (0..10).map(|i| format!("/part1/var/spool/many/msg-{i:04}")).collect();
        assert_eq!(paths, want);
    }
    // Case: exact unless -i; --snapshot and --path narrow the search.
    assert!(e.ok(&["find", "report.pdf"]).stdout.starts_with("0 matches"));
    let out = e.ok(&["find", "-i", "report.pdf"]).stdout;
    assert!(out.contains(&format!("{day2}:disk0")) && out.contains("  /part1/home/anna/Report.PDF\n"), "{out}");
    let out = e.ok(&["find", "msg-0001", "--snapshot", &day1, "--path", "/part1/var/spool"]).stdout;
    assert!(out.ends_with("1 match in 1 disk of 1 snapshot\n") && out.contains(&day1), "{out}");
    let out = e.ok(&["find", "*", "--name", "vm", "--path", "/part1/etc/nginx"]).stdout;
    assert!(
        out.contains("/part1/etc/nginx/nginx.conf") && out.contains("/part1/etc/nginx is absent from 1 of them"),
        "{out}"
    );
    let r = e.fails(&["find", "[a-"]);
    assert!(r.stderr.contains("pattern \"[a-\""), "{}", r.stderr);
    // Modification times bound the matches: the symlink touched to 2021-07-08 09:10:11 (day 1 only), and what
    // is older than 2020 (the hostname of 2019 and the empty directory of 2018, both days).
    let out = e.ok(&["find", "*", "--newer", "2021-07-08 09:10:11", "--older", "2021-07-09"]).stdout;
    assert!(out.contains(&format!("{day1}:disk0")) && out.contains("  /part1/etc/nginx.conf\n"), "{out}");
    assert!(out.ends_with("1 match in 3 disks of 3 snapshots\n"), "{out}");
    let out = e.ok(&["find", "*", "--older", "2020-01-01"]).stdout;
    assert!(out.contains("  /part1/etc/hostname\n  /part1/srv/empty\n"), "{out}");
    assert!(out.ends_with("4 matches in 3 disks of 3 snapshots\n"), "{out}");

    // Damage under the file system's metadata: what cannot be searched is named with the damaged blob, the rest
    // is searched, and the exit code says the answer is incomplete.
    let blobs = data_blobs(&e);
    let r = blobs
        .iter()
        .find_map(|(pack, at, id, _)| {
            e.flip(pack, *at);
            let r = e.run(&["find", "msg-0001"]);
            e.flip(pack, *at);
            (r.code != 0).then_some((r, id))
        })
        .expect("a blob the search reads");
    let (r, id) = r;
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("not searched: ") && r.stderr.contains(id.as_str()), "{}", r.stderr);
    assert!(r.stdout.ends_with(" of 3 snapshots\n"), "the search went on: {}", r.stdout);

    // A day on which the disk did not change (the same blocks, so the same segments): its file system is not
    // walked again, and it still has what it has.
    let day3 = e.backup(&["--name", "vm", "--time", "2026-11-03 22:00:00", &format!("disk0={}", disk.display())]);
    let day3 = &day3["snapshot"].as_str().unwrap()[..8];
    let r = e.ok(&["find", "msg-0001", "--name", "vm", "-v"]);
    for day in [day3, &day2, &day1] {
        assert!(r.stdout.contains(&format!("{day}:disk0 (vm, ")), "{}", r.stdout);
    }
    assert!(r.stdout.ends_with("3 matches in 3 disks of 3 snapshots\n"), "{}", r.stdout);
    assert!(
        r.stderr.contains(&format!("{day2}:disk0: the same blocks as {day3}:disk0, not searched again")),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains(&format!("{day1}:disk0: the same blocks")), "{}", r.stderr);
}

#[test]
fn diff_files_lists_what_changed_between_two_snapshots_and_nothing_else() {
    let e = Env::with_repo();
    let tree = e.path("tree");
    make_tree(&tree);
    let disk = e.path("disk.raw");
    let day1 = back_up_ext4_tree(&e, &disk, &tree, &[]);
    // One change of each kind; the rest of the tree (300 messages, the sparse file…) stays as it was.
    std::fs::remove_file(tree.join("etc/hostname")).unwrap();
    std::fs::write(tree.join("etc/new.conf"), b"key=value").unwrap();
    std::fs::set_permissions(tree.join("home/anna/naïve notes.txt"), std::fs::Permissions::from_mode(0o644)).unwrap();
    std::fs::remove_file(tree.join("home/hostname-link")).unwrap();
    std::os::unix::fs::symlink("../etc/new.conf", tree.join("home/hostname-link")).unwrap();
    std::fs::remove_dir(tree.join("srv/empty")).unwrap();
    std::fs::write(tree.join("srv/empty"), b"").unwrap();
    let data = tree.join("var/lib/app/data.bin");
    std::fs::OpenOptions::new().write(true).open(&data).unwrap().set_len(1_000_000).unwrap();
    // Other bytes of the same length, the modification time set back: only a read of both tells.
    let forged = tree.join("var/spool/many/msg-0007");
    let mtime = std::fs::metadata(&forged).unwrap().modified().unwrap();
    std::fs::write(&forged, b"MESSAGE 7\n").unwrap();
    std::fs::File::options().write(true).open(&forged).unwrap().set_modified(mtime).unwrap();
    let day2 = back_up_ext4_tree(&e, &disk, &tree, &[]);

    let out = e.ok(&["diff", &day1, &day2, "--files"]).stdout;
    let listed: Vec<&str> = out.lines().filter(|l| l.len() > 5 && &l[1..5] == "    ").collect();
    assert_eq!(
        listed,
        [
            "-    /part1/etc/hostname",
            "+    /part1/etc/new.conf",
            "U    /part1/home/anna/naïve notes.txt",
            "M    /part1/home/hostname-link",
            "T    /part1/srv/empty",
            "M    /part1/var/lib/app/data.bin",
        ],
        "{out}"
    );
    assert!(
        out.contains("disk0: 1 added, 1 removed, 2 modified, 1 changed type, 1 changed permissions or owner; files added hold 9 B, files removed held 5 B"),
        "{out}"
    );
    let out = e.ok(&["diff", &day1, &day2, "--files", "--path", "/part1/home"]).stdout;
    assert_eq!(out.lines().filter(|l| l.starts_with("U    ") || l.starts_with("M    ")).count(), 2, "{out}");
    assert!(!out.contains("/part1/etc"), "{out}");
    let json = e.ok(&["diff", &day1, &day2, "--files", "--json"]).json();
    let data_change = &json["disks"][0]["changes"][5];
    assert_eq!(data_change["change"], "modified");
    assert_eq!(
        (data_change["old_size"].as_u64(), data_change["new_size"].as_u64()),
        (Some(3_000_000), Some(1_000_000))
    );
    assert!(e.ok(&["diff", &day2, &day2, "--files"]).stdout.contains("disk0: unchanged"));

    // --contents reads the files whose size and time match: the forged one, and nothing else, is added.
    let out = e.ok(&["diff", &day1, &day2, "--files", "--contents"]).stdout;
    let with_contents: Vec<&str> = out.lines().filter(|l| l.len() > 5 && &l[1..5] == "    ").collect();
    let mut want = listed.clone();
    want.push("M    /part1/var/spool/many/msg-0007    (contents differ; size and modification time as they were)");
    want.sort_by_key(|l| l[5..].to_string());
    assert_eq!(with_contents, want, "{out}");
    let json = e.ok(&["diff", &day1, &day2, "--files", "--contents", "--json"]).json();
    let flagged: Vec<&str> = json["disks"][0]["changes"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["contents_only"] == true)
        .map(|c| c["path"].as_str().unwrap())
        .collect();
    assert_eq!(flagged, ["/part1/var/spool/many/msg-0007"]);
    // Contents that cannot be read (damaged data) are named as not compared, and the answer is incomplete.
    let blobs = data_blobs(&e);
    let r = blobs
        .iter()
        .find_map(|(pack, at, _, _)| {
            e.flip(pack, *at);
            let r = e.run(&["diff", &day1, &day2, "--files", "--contents"]);
            e.flip(pack, *at);
            r.stderr.contains("not compared: disk0 contents of /part1/").then_some(r)
        })
        .expect("a blob holding the data of a file unchanged in size and time");
    assert_eq!(r.code, 3, "{}", r.stderr);

    // Damage in a directory of one snapshot: what is below it is not compared (and not called added or
    // removed), the rest is, and the exit code says the answer is incomplete.
    let truth = listed.iter().map(|l| l.to_string()).collect::<Vec<_>>();
    let blobs = data_blobs(&e);
    let r = blobs
        .iter()
        .find_map(|(pack, at, _, _)| {
            e.flip(pack, *at);
            let r = e.run(&["diff", &day1, &day2, "--files"]);
            e.flip(pack, *at);
            (r.code != 0 && r.stderr.contains("snapshot)")).then_some(r)
        })
        .expect("a blob holding a directory");
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("not compared: disk0 /part1/"), "{}", r.stderr);
    for line in r.stdout.lines().filter(|l| l.len() > 5 && &l[1..5] == "    ") {
        assert!(truth.contains(&line.to_string()), "{line} is not a change:\n{}\n{}", r.stdout, r.stderr);
    }
}

#[test]
fn diff_files_does_not_walk_a_volume_whose_blocks_did_not_change() {
    let e = Env::with_repo();
    let (day1, day2) = two_volumes_one_rewritten(&e);

    let out = e.ok(&["diff", &day1, &day2, "--files", "--contents"]).stdout;
    assert!(out.contains("disk0: volume /part1 unchanged (the same blocks)"), "{out}");
    let listed: Vec<&str> = out.lines().filter(|l| l.len() > 5 && &l[1..5] == "    ").collect();
    assert_eq!(listed, ["+    /part2/db/journal.log"], "{out}");
    let json = e.ok(&["diff", &day1, &day2, "--files", "--json"]).json();
    assert_eq!(json["disks"][0]["unchanged_volumes"], serde_json::json!(["part1"]), "{json}");
    // Below a path of the unchanged volume nothing is walked either; the changed one is.
    let out = e.ok(&["diff", &day1, &day2, "--files", "--path", "/part1/etc"]).stdout;
    assert!(out.contains("volume /part1 unchanged"), "{out}");
    let out = e.ok(&["diff", &day1, &day2, "--files", "--path", "/part2/db"]).stdout;
    assert!(!out.contains("unchanged"), "{out}");
    assert!(out.contains("+    /part2/db/journal.log"), "{out}");
    // Nothing of /part1 is read: damage to any one blob is met in /part2 or the partition table, never there.
    let mut met_in_part2 = 0;
    for (pack, at, _, _) in data_blobs(&e) {
        e.flip(&pack, at);
        let r = e.run(&["diff", &day1, &day2, "--files", "--contents"]);
        e.flip(&pack, at);
        assert!(!r.stderr.contains("/part1"), "{}", r.stderr);
        met_in_part2 += usize::from(r.stderr.contains("not compared: disk0 /part2"));
    }
    assert!(met_in_part2 > 0, "no damaged blob was met in /part2 either");
}

#[test]
fn find_does_not_walk_a_volume_whose_blocks_did_not_change() {
    let e = Env::with_repo();
    let (day1, day2) = two_volumes_one_rewritten(&e);
    // Newest first: day 1's /part1 holds day 2's bytes and is not walked; its /part2 is.
    let r = e.ok(&["find", "hostname", "table.dat", "journal.log", "-v"]);
    for day in [&day1, &day2] {
        let block = r.stdout.split(&format!("{day}:disk0 (")).nth(1).expect("both days match");
        let block: String = block.lines().skip(1).take_while(|l| l.starts_with("  ")).collect::<Vec<_>>().join("\n");
        assert!(block.contains("/part1/etc/hostname") && block.contains("/part2/db/table.dat"), "{day}: {block}");
        assert_eq!(block.contains("journal.log"), day == &day2, "{day}: {block}");
    }
    assert!(r.stdout.ends_with("5 matches in 2 disks of 2 snapshots\n"), "{}", r.stdout);
    assert!(
        r.stderr.contains(&format!("/part1: the same blocks as in {day2}:disk0, not searched again")),
        "{}",
        r.stderr
    );
    assert!(!r.stderr.contains("/part2: the same blocks"), "{}", r.stderr);
}

/// A GPT disk with two ext4 partitions backed up twice (days 1 and 2), the second partition written again in
/// between; returns the two snapshots' short ids.
fn two_volumes_one_rewritten(e: &Env) -> (String, String) {
    let (root, data) = (e.path("root"), e.path("data"));
    make_tree(&root);
    std::fs::create_dir_all(data.join("db")).unwrap();
    std::fs::write(data.join("db/table.dat"), common::random_bytes(3, 200_000)).unwrap();
    let disk = e.path("disk.raw");
    partitioned(&disk, 48, &format!("label: gpt\nstart=2048, size=32768, type={LINUX}\nstart=34816, type={LINUX}\n"));
    mkfs_ext4(&disk, 2048 * 512, 16 << 10, &root, "root");
    mkfs_ext4(&disk, 34816 * 512, 28 << 10, &data, "data");
    let spec = format!("disk0={}", disk.display());
    let day1 = e.backup(&["--name", "vm", &spec])["snapshot"].as_str().unwrap()[..8].to_string();
    // Only the second file system is written again.
    std::fs::write(data.join("db/journal.log"), b"commit 1\n").unwrap();
    mkfs_ext4(&disk, 34816 * 512, 28 << 10, &data, "data");
    let day2 = e.backup(&["--name", "vm", &spec])["snapshot"].as_str().unwrap()[..8].to_string();
    (day1, day2)
}

#[test]
fn times_keep_their_nanoseconds_and_an_unreadable_inode_hides_nothing_else() {
    let e = Env::with_repo();
    let tree = e.path("tree");
    std::fs::create_dir_all(tree.join("d/sub")).unwrap();
    for f in ["d/recent", "d/old", "d/sub/inner"] {
        std::fs::write(tree.join(f), f.as_bytes()).unwrap();
    }
    let disk = e.path("disk.raw");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    // 256-byte inodes hold nanoseconds; mke2fs -d copies whole seconds only, so debugfs sets the times. `old`
    // gets one before 1970, which ext4-view 1.0 refuses to decode: its inode cannot be read.
    run_tool(
        Command::new("mke2fs").args(["-q", "-F", "-t", "ext4", "-I", "256", "-d"]).arg(&tree).arg(&disk).arg("16M"),
    );
    let times =
        [("/d/recent", 0x5e0d_5da5u32, 123_456_789u32), ("/d/sub", 0x5e0d_5da5, 7), ("/d/old", (-100i32) as u32, 0)];
    for (path, secs, nanos) in times {
        for (field, value) in [("mtime", secs), ("mtime_extra", nanos << 2)] {
            run_tool(Command::new("debugfs").args(["-w", "-R", &format!("sif {path} {field} {value:#x}")]).arg(&disk));
        }
    }
    let spec = format!("disk0={}", disk.display());
    let unreadable = e.backup(&["--name", "vm", &spec])["snapshot"].as_str().unwrap()[..8].to_string();

    // ls, extract and dump name the one unreadable entry, do the rest, and end with exit code 3.
    let ls = e.run(&["ls", "latest", "/whole/d"]);
    assert_eq!(ls.code, 3, "{}", ls.stderr);
    assert_eq!(ls.stdout.lines().collect::<Vec<_>>(), ["/whole/d/recent", "/whole/d/sub"], "{}", ls.stdout);
    assert!(ls.stderr.contains("not listed: /whole/d/old: ") && ls.stderr.contains("before 1970"), "{}", ls.stderr);
    let extracted = e.path("extracted");
    let r = e.run(&["extract", "latest", "/whole/d", "--target", extracted.to_str().unwrap()]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("/whole/d/old"), "{}", r.stderr);
    let archive = e.command(&["dump", "latest", "/whole/d"]).output().unwrap();
    assert_eq!(archive.status.code(), Some(3), "{}", String::from_utf8_lossy(&archive.stderr));
    let untarred = e.path("untarred");
    std::fs::create_dir_all(&untarred).unwrap();
    let mut tar =
        Command::new("tar").arg("-x").arg("-C").arg(&untarred).stdin(std::process::Stdio::piped()).spawn().unwrap();
    std::io::Write::write_all(tar.stdin.as_mut().unwrap(), &archive.stdout).unwrap();
    drop(tar.stdin.take());
    assert!(tar.wait().unwrap().success(), "tar -x of the dump");
    // Both copies have the rest, with the times to the nanosecond (the tar through PAX records).
    for root in [extracted, untarred] {
        let time = |p: &str| {
            let m = std::fs::symlink_metadata(root.join(p)).unwrap();
            (m.mtime(), m.mtime_nsec())
        };
        assert_eq!(time("d/recent"), (1_577_934_245, 123_456_789), "{}", root.display());
        assert_eq!(time("d/sub"), (1_577_934_245, 7), "{}", root.display());
        assert_eq!(std::fs::read(root.join("d/sub/inner")).unwrap(), b"d/sub/inner");
        assert!(!root.join("d/old").exists());
    }

    // diff --files with a later snapshot where `old` can be read: it is not called added, but not compared.
    run_tool(Command::new("debugfs").args(["-w", "-R", "sif /d/old mtime 0x5e0d5da5"]).arg(&disk));
    let readable = e.backup(&["--name", "vm", &spec])["snapshot"].as_str().unwrap()[..8].to_string();
    let diff = e.run(&["diff", &unreadable, &readable, "--files"]);
    assert_eq!(diff.code, 3, "{}\n{}", diff.stdout, diff.stderr);
    assert!(!diff.stdout.contains("/whole/d/old"), "{}", diff.stdout);
    assert!(diff.stderr.contains("not compared: disk0 /whole/d/old: "), "{}", diff.stderr);
}

/// A symlink whose inode claims a 4 GiB target (a damaged or crafted guest): ext4-view would read all of it into
/// memory (4 GiB, found by fuzzing). It is left out by name and cause; everything else is listed, and a path
/// through a symlink to a directory still resolves.
#[test]
fn a_symlink_claiming_a_huge_target_is_refused_unread() {
    let e = Env::with_repo();
    let tree = e.path("tree");
    std::fs::create_dir_all(tree.join("d")).unwrap();
    std::fs::write(tree.join("d/file"), b"hello").unwrap();
    std::os::unix::fs::symlink("file", tree.join("d/short")).unwrap();
    // Longer than 59 bytes: stored in a data block, read by the size the inode claims.
    std::os::unix::fs::symlink(format!("/d/{}", "a".repeat(80)), tree.join("d/long")).unwrap();
    std::os::unix::fs::symlink("d", tree.join("to-d")).unwrap();
    let disk = e.path("disk.raw");
    std::fs::File::create(&disk).unwrap().set_len(16 << 20).unwrap();
    run_tool(Command::new("mke2fs").args(["-q", "-F", "-t", "ext4", "-d"]).arg(&tree).arg(&disk).arg("16M"));
    run_tool(Command::new("debugfs").args(["-w", "-R", "sif /d/long size 0xff000000"]).arg(&disk));
    e.ok(&["backup", "--name", "vm", &format!("disk0={}", disk.display())]);

    let ls = e.run(&["ls", "latest", "/whole/d"]);
    assert_eq!(ls.code, 3, "{}", ls.stderr);
    assert_eq!(ls.stdout.lines().collect::<Vec<_>>(), ["/whole/d/file", "/whole/d/short"], "{}", ls.stdout);
    assert!(ls.stderr.contains("not listed: /whole/d/long: a symlink whose inode claims a 4278190080-byte target"));
    let r = e.fails(&["dump", "latest", "/whole/to-d/long"]);
    assert!(r.stderr.contains("claims a 4278190080-byte target"), "{}", r.stderr);
    assert_eq!(e.ok(&["dump", "latest", "/whole/to-d/short"]).stdout, "hello");
    assert_eq!(e.ok(&["dump", "latest", "/whole/to-d/../to-d/file"]).stdout, "hello");
}

#[test]
fn a_path_through_a_damaged_directory_is_not_searched_rather_than_absent() {
    let e = Env::with_repo();
    let tree = e.path("tree");
    make_tree(&tree);
    let disk = e.path("disk.raw");
    std::fs::File::create(&disk).unwrap().set_len(32 << 20).unwrap();
    mkfs_ext4(&disk, 0, 32 << 10, &tree, "data");
    // Damage inside the guest (the blobs are intact): bytes of /var/spool's directory block overwritten, so that
    // its checksum no longer matches.
    let bmap = Command::new("debugfs").args(["-R", "bmap /var/spool 0"]).arg(&disk).output().unwrap();
    let block: u64 = String::from_utf8_lossy(&bmap.stdout).trim().parse().expect("a block number");
    let size = Command::new("dumpe2fs").arg("-h").arg(&disk).output().unwrap();
    let size = String::from_utf8_lossy(&size.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("Block size:").map(|v| v.trim().parse::<u64>().unwrap()))
        .unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, b"damaged damaged!", block * size + 100).unwrap();
    e.ok(&["backup", "--name", "vm", &format!("disk0={}", disk.display())]);

    // Below it, nothing can be said: not "absent", which would tell the user the backup lacks the files.
    let r = e.run(&["find", "msg-0001", "--path", "/whole/var/spool/many"]);
    assert_eq!(r.code, 3, "{}\n{}", r.stdout, r.stderr);
    assert!(!r.stdout.contains("absent"), "{}", r.stdout);
    assert!(r.stderr.contains("not searched: ") && r.stderr.contains("invalid checksum"), "{}", r.stderr);
    // A path that is really not there is absent, and that is a complete answer.
    let r = e.ok(&["find", "msg-0001", "--path", "/whole/var/nothing-here"]);
    assert!(r.stdout.ends_with("/whole/var/nothing-here is absent from 1 of them\n"), "{}", r.stdout);
}

#[test]
fn an_encrypted_directory_is_reported_and_everything_else_is_copied() {
    let e = Env::with_repo();
    let tree = e.path("tree");
    make_tree(&tree);
    std::fs::create_dir_all(tree.join("home/bob/private")).unwrap();
    std::fs::write(tree.join("home/bob/private/diary"), b"ciphertext, in a real fscrypt directory").unwrap();
    let disk = e.path("disk.raw");
    std::fs::File::create(&disk).unwrap().set_len(32 << 20).unwrap();
    mkfs_ext4(&disk, 0, 32 << 10, &tree, "data");
    // The inode flag fscrypt sets on an encrypted directory (EXT4_ENCRYPT_FL), next to the extents flag.
    run_tool(Command::new("debugfs").args(["-w", "-R", "set_inode_field /home/bob/private flags 0x80800"]).arg(&disk));
    e.ok(&["backup", "--name", "vm", &format!("disk0={}", disk.display())]);
    // What extract gives: the directory, empty, with its time.
    let private = tree.join("home/bob/private");
    let mtime = std::fs::metadata(&private).unwrap().modified().unwrap();
    std::fs::remove_file(private.join("diary")).unwrap();
    std::fs::File::open(&private).unwrap().set_modified(mtime).unwrap();

    let r = e.run(&["ls", "latest", "/whole/home", "-R"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stdout.contains("/whole/home/anna/naïve notes.txt\n"), "{}", r.stdout);
    assert!(r.stderr.contains("not listed: /whole/home/bob/private: encrypted with fscrypt"), "{}", r.stderr);

    let out = e.path("out");
    let r = e.run(&["extract", "latest", "/whole/home", "--target", out.to_str().unwrap()]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("not extracted: /whole/home/bob/private: encrypted with fscrypt"), "{}", r.stderr);
    assert_same_tree(&tree.join("home"), &out.join("home"));

    let r = e.command(&["dump", "latest", "/whole/home"]).output().unwrap();
    assert_eq!(r.status.code(), Some(3), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("not in the archive: /whole/home/bob/private"));
    let tar = e.path("home.tar");
    std::fs::write(&tar, &r.stdout).unwrap();
    let listed = Command::new("tar").arg("-tf").arg(&tar).output().unwrap();
    assert!(listed.status.success(), "the archive is whole: {listed:?}");
    let names = String::from_utf8_lossy(&listed.stdout);
    assert!(names.contains("home/anna/naïve notes.txt\n") && names.contains("home/bob/private\n"), "{names}");
    assert!(!names.contains("diary"), "{names}");
}

#[test]
fn files_of_an_ntfs_partition_are_listed_and_extracted_as_windows_wrote_them() {
    // A GPT disk whose NTFS partition ntfs-3g filled with the tree of tests/fixtures/fixture-tree.sh (made by
    // tests/fixtures/make-ntfs-disk.sh; committed, so that this test needs neither FUSE nor ntfs-3g).
    let e = Env::with_repo();
    let tree = back_up_fixture(&e, "ntfs-disk.raw.zst", "win01");

    let v = e.ok(&["ls", "latest", "--json"]).json();
    assert_eq!(v["volumes"][0]["fs"], "ntfs", "{v}");
    assert_eq!(v["volumes"][0]["partition_type"], "Microsoft basic data");
    // The user's files only: no $MFT and friends, no 8.3 aliases (PROGRA~1) beside the long names.
    let listed = e.ok(&["ls", "latest", "/part1", "-R"]).stdout;
    let mut want: Vec<String> = local_tree(&tree).into_iter().map(|(n, _)| format!("/part1/{n}")).collect();
    want.extend(["/part1/Users/Anna/sparse.vhd", "/part1/Compressed", "/part1/Compressed/log.txt"].map(String::from));
    want.sort();
    assert_eq!(listed.lines().collect::<Vec<_>>(), want);

    // Names are found as Windows finds them, whatever their case: by path, and by `find` without `-i`.
    let r = e.command(&["dump", "latest", "/part1/program files/CONTOSO APP/Settings.INI"]).output().unwrap();
    assert_eq!(r.stdout, b"[settings]\r\nlevel=3\r\n", "{}", String::from_utf8_lossy(&r.stderr));
    let found = e.ok(&["find", "SETTINGS.ini", "/part1/program files/**/*.EXE"]).stdout;
    let found: Vec<&str> = found.lines().filter(|l| l.starts_with("  ")).collect();
    assert_eq!(
        found,
        ["  /part1/Program Files/Contoso App/bin/contoso.exe", "  /part1/Program Files/Contoso App/settings.ini"]
    );

    let out = e.path("out");
    e.ok(&["extract", "latest", "/part1/Users", "/part1/Program Files", "--target", out.to_str().unwrap()]);
    for rel in [
        "Users/Anna/Documents/Quarterly Report 2026.txt",
        "Users/Anna/Documents/Überweisung.txt",
        "Program Files/Contoso App/bin/contoso.exe",
        "Program Files/Contoso App/settings.ini",
    ] {
        assert!(std::fs::read(out.join(rel)).unwrap() == std::fs::read(tree.join(rel)).unwrap(), "{rel}");
    }
    for rel in ["Users/Anna/Documents/Überweisung.txt", "Program Files/Contoso App/settings.ini"] {
        let (got, want) = (std::fs::metadata(out.join(rel)).unwrap(), std::fs::metadata(tree.join(rel)).unwrap());
        assert_eq!(got.mtime(), want.mtime(), "modification time of {rel}");
    }
    // The sparse file: data in its first and last 4 KiB, holes between, kept as holes.
    let vhd = std::fs::read(out.join("Users/Anna/sparse.vhd")).unwrap();
    assert_eq!((vhd.len(), &vhd[..8], &vhd[(4 << 20) - 4096..][..6]), (4 << 20, &b"conectix"[..], &b"footer"[..]));
    assert!(vhd[4096..(4 << 20) - 4096].iter().all(|&b| b == 0));
    let blocks = std::fs::metadata(out.join("Users/Anna/sparse.vhd")).unwrap().blocks();
    assert!(blocks * 512 <= 64 << 10, "a 4 MiB sparse file took {} bytes", blocks * 512);
    // An NTFS-compressed file: its stored bytes are not its contents. dump refuses it; extract leaves it out,
    // extracts the rest, says why and exits with 3.
    let r = e.command(&["dump", "latest", "/part1/Compressed/log.txt"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&r.stderr);
    assert!(!r.status.success() && r.stdout.is_empty(), "{stderr}");
    assert!(stderr.contains("/part1/Compressed/log.txt: the file is NTFS-compressed"), "{stderr}");
    let all = e.path("all");
    let r = e.run(&["extract", "latest", "/part1", "--target", all.to_str().unwrap()]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains("not extracted: /part1/Compressed/log.txt: NTFS-compressed"), "{}", r.stderr);
    assert!(!all.join("Compressed/log.txt").exists() && all.join("Compressed").is_dir());
    for dir in ["Program Files", "ProgramData", "Windows", "Users/Anna/Documents"] {
        assert_same_contents(&tree.join(dir), &all.join(dir));
    }
    let empty = std::fs::metadata(all.join("ProgramData/Empty Folder")).unwrap();
    assert!(
        empty.is_dir() && empty.mtime() == std::fs::metadata(tree.join("ProgramData/Empty Folder")).unwrap().mtime()
    );
    assert_eq!(std::fs::metadata(all.join("Windows/System32/config/empty.log")).unwrap().len(), 0);
    assert_eq!(std::fs::read(all.join("Windows/System32/small.dll")).unwrap(), b"resident");
}

/// A damaged MFT record hides its own file only: the directory holding it is listed, extracted and dumped
/// without it, the file named with the reason, exit code 3 (ext4's case is in
/// `times_keep_their_nanoseconds_and_an_unreadable_inode_hides_nothing_else`).
#[test]
fn a_damaged_ntfs_file_record_hides_only_its_file() {
    let e = Env::with_repo();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut disk = zstd::decode_all(&std::fs::read(fixtures.join("ntfs-disk.raw.zst")).unwrap()[..]).unwrap();
    // settings.ini's record: a 1 KiB record signed FILE that holds its name (UTF-16LE) and its bytes (resident);
    // its directory's record holds the name too, in its index.
    let name: Vec<u8> = "settings.ini".encode_utf16().flat_map(|u| u.to_le_bytes()).collect();
    let holds = |o: usize, what: &[u8]| disk[o..o + 1024].windows(what.len()).any(|w| w == what);
    let records: Vec<usize> = (0..disk.len() - 1024)
        .step_by(1024)
        .filter(|&o| &disk[o..o + 4] == b"FILE" && holds(o, &name) && holds(o, b"[settings]"))
        .collect();
    assert_eq!(records.len(), 1, "one record is settings.ini's");
    // Its update sequence number, repeated at the end of each 512-byte sector, no longer matches.
    disk[records[0] + 510] ^= 0xff;
    let path = e.path("fixture.raw");
    std::fs::write(&path, &disk).unwrap();
    e.ok(&["backup", "--name", "win01", &format!("disk0={}", path.display())]);
    let tree = e.path("tree");
    run_tool(Command::new(fixtures.join("fixture-tree.sh")).arg(&tree));
    let dir = "/part1/Program Files/Contoso App";

    let r = e.run(&["ls", "latest", dir]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(r.stdout.lines().collect::<Vec<_>>(), [format!("{dir}/bin")], "{}", r.stderr);
    assert!(r.stderr.contains(&format!("not listed: {dir}/settings.ini")), "{}", r.stderr);

    let out = e.path("out");
    let r = e.run(&["extract", "latest", dir, "--target", out.to_str().unwrap()]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stderr.contains(&format!("{dir}/settings.ini")), "{}", r.stderr);
    let exe = "Contoso App/bin/contoso.exe";
    assert_eq!(std::fs::read(out.join(exe)).unwrap(), std::fs::read(tree.join("Program Files").join(exe)).unwrap());
    assert!(!out.join("Contoso App/settings.ini").exists());

    let r = e.command(&["dump", "latest", dir]).output().unwrap();
    assert_eq!(r.status.code(), Some(3), "{}", String::from_utf8_lossy(&r.stderr));
    let tar = e.path("app.tar");
    std::fs::write(&tar, &r.stdout).unwrap();
    let listed = Command::new("tar").arg("-tf").arg(&tar).output().unwrap();
    assert!(listed.status.success(), "the archive is whole: {listed:?}");
    let names = String::from_utf8_lossy(&listed.stdout);
    assert!(names.contains("bin/contoso.exe") && !names.contains("settings.ini"), "{names}");
}

/// The same for a damaged XFS inode: its directory entry names it, its inode fails to read.
#[test]
fn a_damaged_xfs_inode_hides_only_its_file() {
    let e = Env::with_repo();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut disk = zstd::decode_all(&std::fs::read(fixtures.join("xfs-disk.raw.zst")).unwrap()[..]).unwrap();
    let part = 2048 * 512;
    // settings.ini's entry in its directory's inode (short form: name length, 2-byte offset, name, file type,
    // 4-byte inode number).
    let at = disk.windows(15).position(|w| w[0] == 12 && &w[3..] == b"settings.ini").unwrap();
    let ino = u32::from_be_bytes(disk[at + 3 + 12 + 1..][..4].try_into().unwrap()) as u64;
    // Where that inode lies, from the superblock's geometry.
    let sb = &disk[part..];
    let be32 = |o: usize| u32::from_be_bytes(sb[o..o + 4].try_into().unwrap()) as u64;
    let (block_size, ag_blocks) = (be32(4), be32(84));
    let inode_size = u16::from_be_bytes(sb[104..106].try_into().unwrap()) as u64;
    let (inop_log, agblk_log) = (sb[123] as u64, sb[124] as u64);
    let (ag, ag_ino) = (ino >> (agblk_log + inop_log), ino & ((1 << (agblk_log + inop_log)) - 1));
    let inode = part as u64
        + (ag * ag_blocks + (ag_ino >> inop_log)) * block_size
        + (ag_ino & ((1 << inop_log) - 1)) * inode_size;
    let inode = inode as usize;
    assert_eq!(&disk[inode..inode + 2], b"IN", "inode {ino} at byte {inode}");
    disk[inode] = b'X';
    let path = e.path("fixture.raw");
    std::fs::write(&path, &disk).unwrap();
    e.ok(&["backup", "--name", "rocky9", &format!("disk0={}", path.display())]);
    let dir = "/part1/Program Files/Contoso App";

    let r = e.run(&["ls", "latest", dir]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert_eq!(r.stdout.lines().collect::<Vec<_>>(), [format!("{dir}/bin")], "{}", r.stderr);
    assert!(r.stderr.contains(&format!("not listed: {dir}/settings.ini")), "{}", r.stderr);
    let r = e.run(&["find", "*.ini", "contoso.exe", "--path", "/part1/Program Files"]);
    assert_eq!(r.code, 3, "{}", r.stderr);
    assert!(r.stdout.contains(&format!("{dir}/bin/contoso.exe")) && !r.stdout.contains("settings.ini"), "{}", r.stdout);
    assert!(r.stderr.contains(&format!("{dir}/settings.ini")), "{}", r.stderr);
}

#[test]
fn files_of_lvm_logical_volumes_are_read_across_their_segments() {
    // A GPT disk with /boot and an LVM PV in VG "rhel": LV "root" (linear) and LV "home-dir", whose two
    // segments lie out of order on the PV (made by tests/fixtures/make-lvm-disk.sh with the real LVM tools).
    let e = Env::with_repo();
    let tree = back_up_fixture(&e, "lvm-disk.raw.zst", "rhel9");

    let v = e.ok(&["ls", "latest", "--json"]).json();
    let vols: Vec<(&str, &str, &str)> = v["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| (x["name"].as_str().unwrap(), x["fs"].as_str().unwrap(), x["label"].as_str().unwrap()))
        .collect();
    // Device-mapper names: VG and LV joined by a dash, dashes within them doubled.
    assert_eq!(
        vols,
        [
            ("part1", "ext", "boot"),
            ("part2", "lvm", ""),
            ("rhel-root", "ext", "root"),
            ("rhel-home--dir", "ext", "home")
        ]
    );
    assert_eq!(v["volumes"][3]["partition_name"], "rhel/home-dir");

    let out = e.path("out");
    e.ok(&["extract", "latest", "/rhel-root/Users", "/rhel-root/Program Files", "--target", out.to_str().unwrap()]);
    assert_same_contents(&tree.join("Users"), &out.join("Users"));
    assert_same_contents(&tree.join("Program Files"), &out.join("Program Files"));
    let settings = "Program Files/Contoso App/settings.ini";
    let mtime = |root: &Path| std::fs::metadata(root.join(settings)).unwrap().mtime();
    assert_eq!(mtime(&out), mtime(&tree), "the time fixture-tree.sh gave {settings}");
    // A file whose bytes lie in both segments: the second segment comes first on the PV.
    let r = e.command(&["dump", "latest", "/rhel-home--dir/across-segments.bin"]).output().unwrap();
    let want: Vec<u8> = (0..4u32 << 20).map(|i| ((i * 7 + i / 4096) % 251) as u8).collect();
    assert!(r.status.success() && r.stdout == want, "{}", String::from_utf8_lossy(&r.stderr));
    assert_eq!(e.command(&["dump", "latest", "/part1/vmlinuz"]).output().unwrap().stdout, b"vmlinuz stand-in\n");
    let r = e.fails(&["ls", "latest", "/part2/x"]);
    assert!(r.stderr.contains("part2 holds lvm2 pv"), "{}", r.stderr);
}

#[test]
fn files_of_an_xfs_root_are_read_with_its_log_replayed() {
    // A GPT disk whose XFS v5 partition (as RHEL 9 makes it) the kernel filled with the tree of
    // tests/fixtures/fixture-tree.sh and the structures of tests/fixtures/make-xfs-disk.sh, then was shut down
    // with after-crash.txt only in its log, as a crash-consistent snapshot leaves it.
    let e = Env::with_repo();
    let tree = back_up_fixture(&e, "xfs-disk.raw.zst", "rocky9");
    let v = e.ok(&["ls", "latest", "--json"]).json();
    assert_eq!((v["volumes"][0]["fs"].as_str(), v["volumes"][0]["label"].as_str()), (Some("xfs"), Some("rhel-root")));
    let dump = |path: &str| {
        let r = e.command(&["dump", "latest", path]).output().unwrap();
        assert!(r.status.success(), "dump {path}: {}", String::from_utf8_lossy(&r.stderr));
        r.stdout
    };

    // Only the log's replay has this file.
    assert_eq!(dump("/part1/after-crash.txt"), b"written just before the crash\n");

    let out = e.path("out");
    e.ok(&["extract", "latest", "/part1", "--target", out.to_str().unwrap()]);
    for top in std::fs::read_dir(&tree).unwrap() {
        let name = top.unwrap().file_name();
        assert_same_contents(&tree.join(&name), &out.join(&name));
    }
    let mtime = |p: &str| {
        let m = std::fs::metadata(out.join(p)).unwrap();
        (m.mtime(), m.mtime_nsec())
    };
    assert_eq!(mtime("Users/Anna/Documents/Überweisung.txt"), (1714979289, 0), "2024-05-06 07:08:09 UTC");
    assert_eq!(mtime("var/spool/msg-001"), (1612325106, 123456789), "2021-02-03 04:05:06.123456789 UTC");
    // A directory of 400 entries (not in its inode), with its owner and setgid bit.
    let spool = e.ok(&["ls", "latest", "/part1/var/spool", "--json"]).json();
    assert_eq!(spool.as_array().unwrap().len(), 400);
    let var = e.ok(&["ls", "latest", "/part1/var", "--json"]).json();
    let entry =
        |name: &str| var.as_array().unwrap().iter().find(|x| x["path"] == format!("/part1/var/{name}")).unwrap();
    assert_eq!((entry("spool")["mode"].as_u64(), entry("spool")["uid"].as_u64()), (Some(0o2770), Some(1000)));
    assert_eq!(std::fs::read(out.join("var/spool/msg-377")).unwrap(), b"message 377\n");
    // 200 extents with holes between them: the extent map is a B+tree.
    let fragmented = std::fs::read(out.join("var/fragmented.bin")).unwrap();
    assert_eq!(fragmented.len(), 199 * 8192 + 4096);
    for (i, block) in fragmented.chunks(4096).enumerate() {
        let want = if i % 2 == 0 { (i / 2 % 250 + 1) as u8 } else { 0 };
        assert!(block.iter().all(|&b| b == want), "block {i} of fragmented.bin");
    }
    // Preallocated (unwritten) extents read as zeros around what was written.
    let prealloc = std::fs::read(out.join("var/prealloc.bin")).unwrap();
    assert_eq!(prealloc.len(), 4 << 20);
    assert!(prealloc
        .iter()
        .enumerate()
        .all(|(i, &b)| b == if (1 << 20..(1 << 20) + (64 << 10)).contains(&i) { b'a' } else { 0 }));
    let sparse = std::fs::read(out.join("var/sparse.img")).unwrap();
    assert_eq!((sparse.len(), &sparse[2 << 20..(2 << 20) + 6]), (5 << 20, &b"middle"[..]));
    // Symlinks: an inline target, a long one stored in its own block, and one followed within a path.
    assert_eq!(entry("anna")["target"], "../Users/Anna");
    let long = format!("/{}end", "long-target-".repeat(30));
    assert_eq!(entry("long-link")["target"].as_str(), Some(long.as_str()));
    assert_eq!(std::fs::read_link(out.join("var/long-link")).unwrap(), Path::new(&long));
    assert_eq!(dump("/part1/var/anna/Documents/Überweisung.txt"), "Überweisung an Jörg: 100 €\r\n".as_bytes());
    // Two names of one file: one file with two names again, in extract and in a tar archive.
    let (a, b) = (out.join("var/spool/msg-002"), out.join("var/second-name-of-msg-002"));
    assert_eq!(std::fs::metadata(&a).unwrap().ino(), std::fs::metadata(&b).unwrap().ino(), "a hard link");
    assert_eq!(std::fs::metadata(&b).unwrap().nlink(), 2);
    let tar = e.path("var.tar");
    std::fs::write(&tar, dump("/part1/var")).unwrap();
    let listed = Command::new("tar").arg("-tvf").arg(&tar).output().unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout);
    assert!(listed.contains("var/spool/msg-002 link to var/second-name-of-msg-002"), "{listed}");
}
