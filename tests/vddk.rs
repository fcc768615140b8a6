//! The VDDK data path, through the production loader, against the test-only VDDK (tests/vddk/fake_vixDiskLib.c,
//! built here with gcc): it implements the VDDK C ABI over local "datastore" files and records every call and
//! every breach of the library's rules (init first, one open/close thread, no concurrent I/O on a handle,
//! PrepareForAccess/EndAccess paired, read-only handles, QueryAllocatedBlocks chunk limits).

mod common;

use std::path::{Path, PathBuf};

use common::vddk::fake_vddk;
use common::*;

const M: u64 = MIB as u64;

/// A datastore directory and the environment the test VDDK reads.
struct Vsphere {
    datastore: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
}

impl Vsphere {
    fn new(env: &Env) -> Vsphere {
        let datastore = env.path("LocalDS_0");
        std::fs::create_dir_all(datastore.join("vm1")).unwrap();
        let log = env.path("vddk.log");
        let vars = vec![
            ("FAKE_VDDK_DATASTORES".to_string(), format!("LocalDS_0={}", datastore.display())),
            ("FAKE_VDDK_LOG".to_string(), log.display().to_string()),
            ("FAKE_VDDK_USER".to_string(), "administrator@vsphere.local".to_string()),
            ("FAKE_VDDK_PASSWORD".to_string(), "s3cret".to_string()),
            ("FAKE_VDDK_THUMBPRINT".to_string(), "AA:BB:CC".to_string()),
            ("DISKVAULT_VSPHERE_PASSWORD".to_string(), "s3cret".to_string()),
        ];
        Vsphere { datastore, log, env: vars }
    }

    fn flat(&self, name: &str) -> PathBuf {
        self.datastore.join(format!("vm1/{name}-flat.vmdk"))
    }

    fn uri(&self, disk: &str, extra: &str) -> String {
        format!(
            "vddk://administrator%40vsphere.local@127.0.0.1/%5BLocalDS_0%5D%20vm1%2F{disk}.vmdk?moref=vm-42&thumbprint=AA:BB:CC{extra}"
        )
    }

    fn run(&self, env: &Env, args: &[&str], extra_env: &[(&str, &str)]) -> Run {
        let mut c = env.command(args);
        c.env("DISKVAULT_VDDK_LIBDIR", fake_vddk());
        for (k, v) in &self.env {
            c.env(k, v);
        }
        for (k, v) in extra_env {
            c.env(k, v);
        }
        Run::of(c)
    }

    fn events(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The library's rules held, and every access that was prepared was ended, every open closed.
    fn assert_rules_kept(&self) {
        let log = self.events();
        assert!(!log.contains("VIOLATION"), "the VDDK's rules were broken:\n{log}");
        let count = |p: &str| log.lines().filter(|l| l.starts_with(p)).count();
        assert_eq!(count("PrepareForAccess "), count("EndAccess "), "{log}");
        assert_eq!(count("Open "), count("Close "), "{log}");
        assert_eq!(count("ConnectEx moref"), count("Disconnect"), "{log}");
        assert_eq!(count("InitEx "), count("Exit"), "{log}");
    }
}

/// A sparse flat file: data at `areas`, holes elsewhere.
fn sparse_disk(path: &Path, size: u64, areas: &[(u64, usize, u64)]) -> Vec<u8> {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut content = vec![0u8; size as usize];
    for &(off, len, seed) in areas {
        let data = random_bytes(seed, len);
        std::os::unix::fs::FileExt::write_all_at(&f, &data, off).unwrap();
        content[off as usize..off as usize + len].copy_from_slice(&data);
    }
    content
}

#[test]
fn vddk_backup_reads_allocated_blocks_of_the_snapshot_image() {
    let env = Env::with_repo();
    let vs = Vsphere::new(&env);
    // The live disk and, as the snapshot froze it, disk1-flat.vmdk@snapshot-7.
    let frozen = sparse_disk(
        &vs.datastore.join("vm1/disk1-flat.vmdk@snapshot-7"),
        40 * M + 512 * 3,
        &[(0, 4096, 1), (5 * M + 100, 2 * MIB, 2), (40 * M, 1536, 3)],
    );
    sparse_disk(&vs.flat("disk1"), 40 * M + 512 * 3, &[(0, 4096, 9)]);
    let r = vs.run(
        &env,
        &["backup", "--json", "--name", "vm1", &vs.uri("disk1", "&snapshot=snapshot-7")],
        &[("DISKVAULT_LOG", "diskvault=debug")],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    // The library's printf-style log lines arrive formatted (va_list handled), and the transport is reported.
    assert!(r.stderr.contains("fake VDDK 8.0 initialised (test library)"), "{}", r.stderr);
    assert!(r.stderr.contains("opened with transport nbdssl"), "{}", r.stderr);
    let j = r.json();
    assert_eq!(j["disks"][0]["name"], "disk1");
    assert_eq!(j["disks"][0]["capacity"], frozen.len() as u64);
    // QueryAllocatedBlocks with 1 MiB chunks: blocks 0, 5, 6, 7 and the short tail (counted as allocated).
    assert_eq!(j["disks"][0]["blocks_read"], 5, "{j}");
    let restored = env.restore(j["snapshot"].as_str().unwrap(), &[]);
    assert!(restored == frozen, "the snapshot-time image was not what got backed up");
    vs.assert_rules_kept();
    let log = vs.events();
    assert!(log.contains("ConnectEx moref=vm-42 readOnly=1 snapshot=snapshot-7"), "{log}");
    assert!(log.contains("QueryAllocatedBlocks 0 81920 2048"), "{log}");
    // The planned blocks were read with ReadAsync (queued in batches, then one Wait).
    assert_eq!(log.lines().filter(|l| l.starts_with("ReadAsync ")).count(), 5, "{log}");

    // Allocated blocks answered out of order and overlapping: the same blocks are read, the same image restored.
    let r = vs.run(
        &env,
        &["backup", "--json", "--name", "vm1-odd", &vs.uri("disk1", "&snapshot=snapshot-7")],
        &[("FAKE_VDDK_ALLOCATED_ANSWER", "reversed")],
    );
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["disks"][0]["blocks_read"], 5, "{}", r.stdout);
    assert!(env.restore(r.json()["snapshot"].as_str().unwrap(), &[]) == frozen);
    // A block whose byte offset does not fit 64 bits: refused, named, no snapshot.
    let r = vs.run(
        &env,
        &["backup", "--name", "vm1-beyond", &vs.uri("disk1", "&snapshot=snapshot-7")],
        &[("FAKE_VDDK_ALLOCATED_ANSWER", "beyond")],
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("QueryAllocatedBlocks answered sector 1152921504606846976"), "{}", r.stderr);
    assert!(!env.ok(&["snapshots"]).stdout.contains("vm1-beyond"));
    // A capacity beyond any VMware disk (here one whose byte count overflows 64 bits): refused.
    let r = vs.run(
        &env,
        &["backup", "--name", "vm1-huge", &vs.uri("disk1", "&snapshot=snapshot-7")],
        &[("FAKE_VDDK_CAPACITY_SECTORS", "36893488147419103")],
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("more than any VMware disk (62 TB)"), "{}", r.stderr);
    vs.assert_rules_kept();

    // The live disk without a snapshot, with the transport asked for.
    let r = vs.run(&env, &["backup", "--json", "--name", "vm1-live", &vs.uri("disk1", "&transports=nbdssl")], &[]);
    assert_eq!(r.code, 0, "{}", r.stderr);
    assert_eq!(r.json()["disks"][0]["blocks_read"], 2);

    // The password from a file instead of the environment.
    let file = env.path("vsphere.password");
    write(&file, b"s3cret\n");
    let mut c = env.command(&["backup", "--name", "vm1-pwfile", &vs.uri("disk1", ""), "--vsphere-password-file"]);
    c.arg(&file).env("DISKVAULT_VDDK_LIBDIR", fake_vddk());
    c.envs(vs.env.iter().filter(|(k, _)| k != "DISKVAULT_VSPHERE_PASSWORD").map(|(k, v)| (k, v)));
    let r = Run::of(c);
    assert_eq!(r.code, 0, "{}", r.stderr);
    vs.assert_rules_kept();
}

#[test]
fn vddk_errors_are_named_and_access_is_always_ended() {
    let env = Env::with_repo();
    let vs = Vsphere::new(&env);
    sparse_disk(&vs.flat("disk1"), 8 * M, &[(0, 3 * MIB, 4)]);
    let uri = vs.uri("disk1", "");

    // Wrong password.
    let r = vs.run(&env, &["backup", &uri], &[("DISKVAULT_VSPHERE_PASSWORD", "wrong")]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("VixDiskLib_ConnectEx failed: VIX error 35: Authentication failure"), "{}", r.stderr);
    // Wrong thumbprint.
    let bad_tp = uri.replace("AA:BB:CC", "AA:BB:CD");
    let r = vs.run(&env, &["backup", &bad_tp], &[]);
    assert!(r.stderr.contains("VIX error 18000: Cannot connect to host"), "{}", r.stderr);
    // A disk that does not exist.
    let r = vs.run(&env, &["backup", &vs.uri("nodisk", "")], &[]);
    assert!(r.stderr.contains("VixDiskLib_Open failed: VIX error 4"), "{}", r.stderr);
    // A VIX error in the middle of the reads: no snapshot, and the access is still ended.
    let r = vs.run(&env, &["backup", &uri], &[("FAKE_VDDK_FAIL_READ_SECTOR", "4100")]);
    assert_ne!(r.code, 0);
    assert!(
        r.stderr.contains("read of 1048576 bytes at offset 2097152")
            && r.stderr.contains("VixDiskLib_ReadAsync failed: VIX error 16002"),
        "{}",
        r.stderr
    );
    vs.assert_rules_kept();
    assert!(env.ok(&["snapshots", "--json"]).json().as_array().unwrap().is_empty());

    // No library in the directory; only an unsupported version; something that is not a VDDK.
    let empty = env.path("no-vddk");
    std::fs::create_dir_all(empty.join("lib64")).unwrap();
    let r = vs.run(&env, &["backup", &uri, "--vddk-libdir", empty.to_str().unwrap()], &[]);
    assert!(
        r.stderr.contains("no VDDK library: looked for") && r.stderr.contains("libvixDiskLib.so.8"),
        "{}",
        r.stderr
    );
    // The lib64 directory itself instead of the one above it (an easy slip): said so.
    let lib64 = fake_vddk().join("lib64");
    let r = vs.run(&env, &["backup", &uri, "--vddk-libdir", lib64.to_str().unwrap()], &[]);
    assert!(r.stderr.contains("holds the library itself: give the directory above it"), "{}", r.stderr);
    std::fs::copy(fake_vddk().join("lib64/libvixDiskLib.so.8"), empty.join("lib64/libvixDiskLib.so.5")).unwrap();
    let r = vs.run(&env, &["backup", &uri, "--vddk-libdir", empty.to_str().unwrap()], &[]);
    assert!(r.stderr.contains("found libvixDiskLib.so.5 (diskvault supports VDDK 6, 7 and 8)"), "{}", r.stderr);
    let not_vddk = env.path("not-vddk");
    std::fs::create_dir_all(not_vddk.join("lib64")).unwrap();
    let libc = ["/lib/x86_64-linux-gnu/libz.so.1", "/usr/lib/x86_64-linux-gnu/libz.so.1"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("zlib for a library that is not a VDDK");
    std::fs::copy(libc, not_vddk.join("lib64/libvixDiskLib.so.7")).unwrap();
    let r = vs.run(&env, &["backup", &uri, "--vddk-libdir", not_vddk.to_str().unwrap()], &[]);
    assert!(r.stderr.contains("is not a usable VDDK: it has no VixDiskLib_InitEx"), "{}", r.stderr);
    // A VDDK whose InitEx refuses the version (the test library accepts 7 and 8 only).
    let old = env.path("old-vddk");
    std::fs::create_dir_all(old.join("lib64")).unwrap();
    std::fs::copy(fake_vddk().join("lib64/libvixDiskLib.so.8"), old.join("lib64/libvixDiskLib.so.6")).unwrap();
    let r = vs.run(&env, &["backup", &uri, "--vddk-libdir", old.to_str().unwrap()], &[]);
    assert!(r.stderr.contains("VixDiskLib_InitEx failed: VIX error 6"), "{}", r.stderr);
}
