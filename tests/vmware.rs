//! Backups of a VMware VM end to end: the vSphere simulator with CBT (tests/vcsim) and the test VDDK
//! (tests/vddk), driven by `diskvault backup --vm` exactly as against vCenter and VMware's library.

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::vddk::fake_vddk;
use common::vsphere::Vcsim;
use common::*;

const M: u64 = MIB as u64;

struct Lab {
    env: Env,
    sim: Vcsim,
    vddk_log: PathBuf,
}

impl Lab {
    fn new() -> Lab {
        Lab::with_simulator(&[])
    }

    fn with_simulator(settings: &[(&str, &str)]) -> Lab {
        let env = Env::with_repo();
        let sim = Vcsim::start_with(settings);
        let vddk_log = env.path("vddk.log");
        Lab { env, sim, vddk_log }
    }

    /// diskvault pointed at the test vSphere and the test VDDK.
    fn command(&self, args: &[&str], extra: &[(&str, &str)]) -> std::process::Command {
        let mut c = self.env.command(args);
        c.envs(self.sim.env())
            .env("DISKVAULT_VDDK_LIBDIR", fake_vddk())
            .env("FAKE_VDDK_DATASTORES", format!("LocalDS_0={}", self.sim.datastores["LocalDS_0"].as_str().unwrap()))
            .env("FAKE_VDDK_THUMBPRINT", &self.sim.sha1)
            .env("FAKE_VDDK_LOG", &self.vddk_log)
            .envs(extra.iter().copied());
        c
    }

    /// A vSphere API session on the simulator (to arrange the inventory as a test needs).
    fn client(&self) -> diskvault::vsphere::Client {
        let trust = diskvault::vsphere::Trust::Thumbprint(self.sim.sha1.clone());
        diskvault::vsphere::Client::login(&self.sim.url, &self.sim.user, &self.sim.password, &trust).unwrap()
    }

    fn run(&self, args: &[&str], extra: &[(&str, &str)]) -> Run {
        Run::of(self.command(args, extra))
    }

    /// Starts a command whose VDDK reads are slowed down and sends it SIGINT once reads are under way; returns
    /// its exit code and stderr.
    fn interrupt_during_reads(&self, args: &[&str], while_reading: impl FnOnce()) -> (Option<i32>, String) {
        let mut c = self.command(args, &[("FAKE_VDDK_READ_DELAY_MS", "100")]);
        let child = c.stderr(std::process::Stdio::piped()).spawn().unwrap();
        let start = std::time::Instant::now();
        while !std::fs::read_to_string(&self.vddk_log).unwrap_or_default().lines().any(|l| l.starts_with("Read ")) {
            assert!(start.elapsed() < std::time::Duration::from_secs(30), "no read started");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        while_reading();
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let out = child.wait_with_output().unwrap();
        (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    fn ok(&self, args: &[&str]) -> serde_json::Value {
        let r = self.run(args, &[]);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
        r.json()
    }

    fn succeed(&self, args: &[&str]) {
        let r = self.run(args, &[]);
        assert_eq!(r.code, 0, "{args:?}: {}", r.stderr);
    }

    fn vm(&self) -> serde_json::Value {
        self.ok(&["vm", "list", "--json"])[0].clone()
    }

    /// The VM of this name as `vm list --json` shows it, if there is one.
    fn vm_named(&self, name: &str) -> Option<serde_json::Value> {
        self.ok(&["vm", "list", "--json"]).as_array().unwrap().iter().find(|v| v["name"] == name).cloned()
    }

    fn disk_file(&self, vm: &serde_json::Value, i: usize) -> PathBuf {
        self.sim.flat_file(vm["disks"][i]["file_name"].as_str().unwrap())
    }

    /// The guest writes `data` at `offset` of disk `i`.
    fn guest_write(&self, vm: &serde_json::Value, i: usize, offset: u64, data: &[u8]) {
        let f = std::fs::OpenOptions::new().write(true).open(self.disk_file(vm, i)).unwrap();
        f.write_all_at(data, offset).unwrap();
    }

    /// No VM snapshot is left, nor its frozen disk images; the VDDK's rules were kept.
    fn assert_clean(&self) {
        self.assert_released(&[("PrepareForAccess ", "EndAccess "), ("Open ", "Close ")]);
    }

    /// As [`Lab::assert_clean`], checking only the pairs of calls given (a killed process cannot close its
    /// handles; what it began on the server side, later processes must end).
    fn assert_released(&self, pairs: &[(&str, &str)]) {
        assert_eq!(self.vm()["snapshots"], 0, "a VM snapshot was left behind");
        let dir = self.sim.datastores["LocalDS_0"].as_str().unwrap();
        let leftovers: Vec<String> = std::fs::read_dir(Path::new(dir).join(self.vm()["name"].as_str().unwrap()))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains('@'))
            .collect();
        assert!(leftovers.is_empty(), "snapshot images left: {leftovers:?}");
        let log = std::fs::read_to_string(&self.vddk_log).unwrap_or_default();
        assert!(!log.contains("VIOLATION"), "{log}");
        let count = |p: &str| log.lines().filter(|l| l.starts_with(p)).count();
        for (begin, end) in pairs {
            assert_eq!(count(begin), count(end), "{begin}/{end}: {log}");
        }
    }
}

#[test]
fn full_then_cbt_incrementals_restore_every_point_in_time() {
    let lab = Lab::new();
    let vm = lab.vm();
    let name = vm["name"].as_str().unwrap().to_string();
    lab.succeed(&["vm", "enable-cbt", &name]);

    // Day 0: both disks get data.
    lab.guest_write(&vm, 0, 0, &random_bytes(1, 3 * MIB));
    lab.guest_write(&vm, 1, 10 * M + 4096, &random_bytes(2, MIB));
    let mut expected: Vec<[Vec<u8>; 2]> = Vec::new();
    let snapshot_now =
        |lab: &Lab| [std::fs::read(lab.disk_file(&vm, 0)).unwrap(), std::fs::read(lab.disk_file(&vm, 1)).unwrap()];
    let r = lab.ok(&["backup", "--json", "--vm", &name]);
    assert_eq!(r["source"], name.as_str());
    for d in r["vmware_disks"].as_array().unwrap() {
        assert_eq!(d["mode"], "full");
        assert_eq!(d["transport"], "nbdssl");
        assert!(d["change_id"].as_str().unwrap().ends_with("/1"), "{d}");
    }
    // Full reads are of the allocated blocks only.
    assert_eq!(r["disks"][0]["blocks_read"], 3);
    assert_eq!(r["disks"][1]["blocks_read"], 2);
    let mut ids = vec![r["snapshot"].as_str().unwrap().to_string()];
    expected.push(snapshot_now(&lab));
    lab.assert_clean();

    // Three days of writes, each backed up from CBT: exactly the touched blocks are read.
    let days: [&[(usize, u64, usize)]; 3] =
        [&[(0, 5 * M, 4096), (1, 10 * M, 100)], &[(0, 63 * M, MIB), (0, 20 * M - 10, 20)], &[(1, 0, 2 * MIB + 1)]];
    for (n, writes) in days.iter().enumerate() {
        for (i, (disk, off, len)) in writes.iter().enumerate() {
            lab.guest_write(&vm, *disk, *off, &random_bytes(10 * n as u64 + i as u64 + 3, *len));
        }
        let r = lab.ok(&["backup", "--json", "--vm", &name]);
        for disk in 0..2 {
            let areas: Vec<(u64, u64)> = writes.iter().filter(|w| w.0 == disk).map(|w| (w.1, w.2 as u64)).collect();
            let want = if areas.is_empty() { 0 } else { blocks_touched(&areas) };
            assert_eq!(r["vmware_disks"][disk]["mode"], "incremental", "{r}");
            assert_eq!(r["disks"][disk]["blocks_read"], want, "day {n} disk {disk}: {r}");
        }
        assert_eq!(r["parent"].as_str().unwrap(), ids.last().unwrap());
        ids.push(r["snapshot"].as_str().unwrap().to_string());
        expected.push(snapshot_now(&lab));
        lab.assert_clean();
    }

    // Every disk of every snapshot restores to its content at snapshot time, not to later writes.
    for (id, want) in ids.iter().zip(&expected) {
        for (disk, content) in ["disk1", "disk2"].iter().zip(want) {
            let got = lab.env.restore(&format!("{id}:{disk}"), &[]);
            assert!(got == *content, "snapshot {id} disk {disk} differs");
        }
    }

    // The VM's configuration is recorded with the snapshot.
    let snap = lab.env.ok(&["cat", "snapshot", &ids[0]]).json();
    let config: serde_json::Value =
        serde_json::from_str(snap["annotations"]["vmware.config"].as_str().unwrap()).unwrap();
    assert_eq!(config["disks"].as_array().unwrap().len(), 2);
    assert!(config["num_cpu"].as_u64().unwrap() >= 1 && config["memory_mb"].as_u64().unwrap() >= 1, "{config}");

    // A CBT reset: the next backup reads in full and says why.
    lab.succeed(&["vm", "reset-cbt", &name]);
    lab.guest_write(&vm, 0, 30 * M, &random_bytes(77, 1000));
    let r = lab.ok(&["backup", "--json", "--vm", &name]);
    for d in r["vmware_disks"].as_array().unwrap() {
        assert_eq!(d["mode"], "full");
        assert!(d["reason"].as_str().unwrap().contains("change tracking was reset"), "{d}");
    }
    let now = std::fs::read(lab.disk_file(&vm, 0)).unwrap();
    let allocated = now.chunks(MIB).filter(|c| c.iter().any(|&b| b != 0)).count();
    assert_eq!(r["disks"][0]["blocks_read"], allocated as u64, "allocated blocks of disk1 after the reset: {r}");
    let got = lab.env.restore(&format!("{}:disk1", r["snapshot"].as_str().unwrap()), &[]);
    assert!(got == now);
    lab.assert_clean();

    // Tracking off: full reads, said so.
    lab.succeed(&["vm", "disable-cbt", &name]);
    let r = lab.ok(&["backup", "--json", "--vm", &name]);
    assert!(r["vmware_disks"][0]["reason"].as_str().unwrap().contains("change tracking is off"), "{r}");
    lab.assert_clean();
}

#[test]
fn a_failed_backup_removes_the_vm_snapshot() {
    let lab = Lab::new();
    let vm = lab.vm();
    let name = vm["name"].as_str().unwrap().to_string();
    lab.guest_write(&vm, 0, 0, &random_bytes(5, 4 * MIB));
    // A VIX error in the middle of disk1's reads.
    let r = lab.run(&["backup", "--vm", &name], &[("FAKE_VDDK_FAIL_READ_SECTOR", "4100")]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("VixDiskLib_ReadAsync failed: VIX error 16002"), "{}", r.stderr);
    lab.assert_clean();
    assert!(lab.env.ok(&["snapshots", "--json"]).json().as_array().unwrap().is_empty());
    // An unknown VM, and a VDDK that is missing: nothing is touched.
    let r = lab.run(&["backup", "--vm", "nope"], &[]);
    assert!(r.stderr.contains("no virtual machine named \"nope\""), "{}", r.stderr);
    let empty = lab.env.path("empty-vddk");
    std::fs::create_dir_all(empty.join("lib64")).unwrap();
    let r = lab.run(&["backup", "--vm", &name], &[("DISKVAULT_VDDK_LIBDIR", empty.to_str().unwrap())]);
    assert!(r.stderr.contains("no VDDK library"), "{}", r.stderr);
    lab.assert_clean();
}

#[test]
fn cbt_verification_catches_changes_cbt_lost() {
    let lab = Lab::new();
    let vm = lab.vm();
    let name = vm["name"].as_str().unwrap().to_string();
    lab.succeed(&["vm", "enable-cbt", &name]);
    lab.guest_write(&vm, 0, 0, &random_bytes(1, 3 * MIB));
    lab.ok(&["backup", "--json", "--vm", &name]);

    // The simulator's CBT now "loses" changes to block 41 of disk1, as real CBT bugs have.
    let flat = lab.disk_file(&vm, 0);
    write(&PathBuf::from(format!("{}.cbt-drop", flat.display())), format!("{} {}\n", 41 * M, M).as_bytes());
    lab.guest_write(&vm, 0, 40 * M, &random_bytes(2, MIB));
    lab.guest_write(&vm, 0, 41 * M + 5, &random_bytes(3, 1000));
    let trusting = lab.ok(&["backup", "--json", "--vm", &name]);
    assert_eq!(trusting["disks"][0]["blocks_read"], 1, "CBT reported only block 40");
    let restored = lab.env.restore(&format!("{}:disk1", trusting["snapshot"].as_str().unwrap()), &[]);
    assert!(restored != std::fs::read(&flat).unwrap(), "the simulated CBT bug did not lose the change");

    // With verification, the difference is found and the disk read in full.
    lab.guest_write(&vm, 0, 50 * M, &random_bytes(4, 100));
    let metrics = lab.env.path("vm.prom");
    let r = lab.ok(&[
        "backup",
        "--json",
        "--vm",
        &name,
        "--verify-cbt",
        "100%",
        "--metrics-file",
        metrics.to_str().unwrap(),
    ]);
    let d = &r["vmware_disks"][0];
    assert_eq!(d["mode"], "full", "{r}");
    assert!(d["reason"].as_str().unwrap().contains("CBT verification: 1 of"), "{d}");
    assert_eq!(r["vmware_disks"][1]["mode"], "incremental", "disk2's CBT is right and stays trusted");
    // Monitoring sees the fallback per disk.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let gauge = |metric: &str, disk: &str| {
        let series = format!(
            "{metric}{{command=\"backup\",repository=\"{}\",source=\"{name}\",disk=\"{disk}\"}} ",
            lab.env.location()
        );
        text.lines()
            .find_map(|l| l.strip_prefix(&series))
            .unwrap_or_else(|| panic!("no {series} in {text}"))
            .to_string()
    };
    assert_eq!(gauge("diskvault_backup_disk_full_read_fallback", "disk1"), "1");
    assert_eq!(gauge("diskvault_backup_disk_full_read_fallback", "disk2"), "0");
    assert_eq!(gauge("diskvault_backup_disk_incremental", "disk2"), "1");
    let restored = lab.env.restore(&format!("{}:disk1", r["snapshot"].as_str().unwrap()), &[]);
    assert!(restored == std::fs::read(&flat).unwrap());
    // A small sample finds nothing wrong when CBT is right.
    std::fs::remove_file(format!("{}.cbt-drop", flat.display())).unwrap();
    lab.guest_write(&vm, 0, 7 * M, &random_bytes(5, 10));
    let r = lab.ok(&["backup", "--json", "--vm", &name, "--verify-cbt", "10"]);
    assert_eq!(r["vmware_disks"][0]["mode"], "incremental", "{r}");
    assert_eq!(r["disks"][0]["blocks_read"], 1);
    lab.assert_clean();
}

#[test]
fn restore_onto_the_vm_disk_writes_only_differing_blocks() {
    let lab = Lab::new();
    let vm = lab.vm();
    let name = vm["name"].as_str().unwrap().to_string();
    lab.succeed(&["vm", "enable-cbt", &name]);
    lab.guest_write(&vm, 0, 0, &random_bytes(1, 4 * MIB));
    let r = lab.ok(&["backup", "--json", "--vm", &name]);
    let id = r["snapshot"].as_str().unwrap().to_string();
    let at_backup = std::fs::read(lab.disk_file(&vm, 0)).unwrap();
    // Later the guest changes blocks 1 and 2, and writes into block 20 (zero at backup time).
    lab.guest_write(&vm, 0, M + 100, &random_bytes(2, MIB));
    lab.guest_write(&vm, 0, 20 * M, &random_bytes(3, 512));
    assert!(std::fs::read(lab.disk_file(&vm, 0)).unwrap() != at_backup);

    // Not while it runs.
    let r = lab.run(&["restore", &format!("{id}:disk1"), "--to-vm", &name], &[]);
    assert!(r.stderr.contains("needs it powered off"), "{}", r.stderr);
    lab.succeed(&["vm", "power-off", &name]);
    std::fs::remove_file(&lab.vddk_log).ok();
    // Every block compared (CBT could say what changed: see quick_rollback_… below).
    let r = lab.ok(&["restore", &format!("{id}:disk1"), "--to-vm", &name, "--no-cbt", "--json"]);
    assert_eq!(r["blocks_compared"], 64);
    assert_eq!(r["blocks_written"], 3, "{r}");
    assert_eq!(r["compared_all_because"], "asked to (--no-cbt)", "{r}");
    assert!(std::fs::read(lab.disk_file(&vm, 0)).unwrap() == at_backup, "the VM's disk is not the snapshot's");
    // Change tracking was off while writing and is on again, started anew.
    assert_eq!(r["change_tracking_reset"], true, "{r}");
    assert_eq!(lab.vm()["cbt_enabled"], true);
    let log = std::fs::read_to_string(&lab.vddk_log).unwrap();
    assert_eq!(log.lines().filter(|l| l.starts_with("Write ")).count(), 3, "{log}");
    assert!(log.contains("readOnly=0 snapshot= modes=nbdssl"), "writes go over an explicit nbdssl: {log}");
    // Once more: nothing differs, nothing is written. (Change tracking started anew: CBT cannot say.)
    let r = lab.ok(&["restore", &format!("{id}:disk1"), "--to-vm", &name, "--json"]);
    assert_eq!(r["blocks_written"], 0);
    assert_eq!(r["blocks_compared"], 64);
    assert!(r["compared_all_because"].as_str().unwrap().contains("change tracking is off"), "{r}");
    // Onto the other disk of the VM by name.
    let r = lab.ok(&["restore", &format!("{id}:disk1"), "--to-vm", &name, "--vm-disk", "disk2", "--json"]);
    assert_eq!(r["blocks_written"], 4);
    assert!(std::fs::read(lab.disk_file(&vm, 1)).unwrap() == at_backup);
    lab.assert_clean();
    // The next backup does not trust changes from before the restore: it reads in full, and says why.
    let r = lab.ok(&["backup", "--json", "--vm", &name]);
    for d in r["vmware_disks"].as_array().unwrap() {
        assert_eq!(d["mode"], "full", "{r}");
        assert!(d["reason"].as_str().unwrap().contains("change tracking was reset"), "{d}");
    }
    assert!(lab.env.restore(&format!("{}:disk2", r["snapshot"].as_str().unwrap()), &[]) == at_backup);
    lab.assert_clean();
}

/// The VDDK's reads of the VM disk since the log was last removed, in sectors.
fn sectors_read(lab: &Lab) -> u64 {
    let log = std::fs::read_to_string(&lab.vddk_log).unwrap_or_default();
    log.lines()
        .filter_map(|l| l.strip_prefix("Read "))
        .map(|l| l.split(' ').nth(1).unwrap().parse::<u64>().unwrap())
        .sum()
}

#[test]
fn quick_rollback_writes_only_what_the_vm_changed_since_the_backup() {
    let lab = Lab::new();
    let vm = lab.vm();
    let name = vm["name"].as_str().unwrap().to_string();
    lab.succeed(&["vm", "enable-cbt", &name]);
    lab.guest_write(&vm, 0, 0, &random_bytes(1, 4 * MIB));
    let first = lab.ok(&["backup", "--json", "--vm", &name]);
    let id = first["snapshot"].as_str().unwrap().to_string();
    let at_backup = [std::fs::read(lab.disk_file(&vm, 0)).unwrap(), std::fs::read(lab.disk_file(&vm, 1)).unwrap()];
    // The guest changes block 30 of disk1; a later backup; then blocks 1 and 2, block 20 (zero at the first
    // backup), and block 5 of disk2 (all zeros then).
    lab.guest_write(&vm, 0, 30 * M + 7, &random_bytes(2, 100));
    lab.ok(&["backup", "--json", "--vm", &name]);
    lab.guest_write(&vm, 0, M + 100, &random_bytes(3, MIB));
    lab.guest_write(&vm, 0, 20 * M, &random_bytes(4, 512));
    lab.guest_write(&vm, 1, 5 * M, &random_bytes(5, 4096));
    lab.succeed(&["vm", "power-off", &name]);

    // The whole VM back to the first backup: CBT names the blocks changed since, across the later backup, on
    // each disk (asked for both before change tracking is turned off for the writes); they are written, and of
    // the others only a 1% sample per disk (one block) is read to check CBT.
    std::fs::remove_file(&lab.vddk_log).ok();
    let r = lab.ok(&["restore", &id, "--to-vm", &name, "--json", "--power-on"]);
    assert_eq!(lab.vm()["power_state"], "poweredOn", "--power-on");
    let disk = |n: &str| r.as_array().unwrap().iter().find(|d| d["disk"] == n).unwrap_or_else(|| panic!("{r}")).clone();
    let (d1, d2) = (disk("disk1"), disk("disk2"));
    assert_eq!(d1["changed_since_backup"], 4, "{r}");
    assert_eq!(d1["blocks_written"], 4, "{r}");
    assert_eq!(d1["blocks_compared"], 1, "{r}");
    assert!(d1["compared_all_because"].is_null(), "{r}");
    assert_eq!(d2["changed_since_backup"], 1, "{r}");
    assert_eq!(d2["blocks_written"], 1, "{r}");
    assert_eq!(sectors_read(&lab), 2 * 2048, "one 1 MiB block read from each of the VM's disks");
    for (i, want) in at_backup.iter().enumerate() {
        assert!(std::fs::read(lab.disk_file(&vm, i)).unwrap() == *want, "disk {i} of the VM is not the snapshot's");
    }
    lab.assert_clean();
}

#[test]
fn quick_rollback_compares_every_block_when_cbt_cannot_be_trusted() {
    let lab = Lab::new();
    let vm = lab.vm();
    let name = vm["name"].as_str().unwrap().to_string();
    lab.succeed(&["vm", "enable-cbt", &name]);
    lab.guest_write(&vm, 0, 0, &random_bytes(1, 3 * MIB));
    let id = lab.ok(&["backup", "--json", "--vm", &name])["snapshot"].as_str().unwrap().to_string();
    let at_backup = std::fs::read(lab.disk_file(&vm, 0)).unwrap();
    lab.succeed(&["vm", "power-off", &name]);

    // The simulator's CBT "loses" the change to block 41, as real CBT bugs have: the sample (here all of the
    // unchanged blocks) finds it, and every block is compared and restored.
    let flat = lab.disk_file(&vm, 0);
    write(&PathBuf::from(format!("{}.cbt-drop", flat.display())), format!("{} {}\n", 41 * M, M).as_bytes());
    lab.guest_write(&vm, 0, 40 * M, &random_bytes(2, MIB));
    lab.guest_write(&vm, 0, 41 * M + 5, &random_bytes(3, 1000));
    let r = lab.ok(&["restore", &format!("{id}:disk1"), "--to-vm", &name, "--verify-cbt", "100%", "--json"]);
    assert!(r["compared_all_because"].as_str().unwrap().contains("CBT verification: 1 of"), "{r}");
    assert!(r["changed_since_backup"].is_null(), "{r}");
    assert_eq!(r["blocks_written"], 2, "{r}");
    assert!(std::fs::read(&flat).unwrap() == at_backup, "the change CBT lost was not restored");
    std::fs::remove_file(format!("{}.cbt-drop", flat.display())).unwrap();

    // Tracking reset since the backup (a new changeId UUID): CBT cannot say what changed since; every block is
    // compared.
    lab.succeed(&["vm", "reset-cbt", &name]);
    lab.ok(&["backup", "--json", "--vm", &name]);
    lab.guest_write(&vm, 0, 2 * M, &random_bytes(4, 4096));
    let r = lab.ok(&["restore", &format!("{id}:disk1"), "--to-vm", &name, "--json"]);
    assert!(r["compared_all_because"].as_str().unwrap().contains("not tracked since the backup"), "{r}");
    assert_eq!(r["blocks_compared"], 64);
    assert_eq!(r["blocks_written"], 1, "{r}");
    assert!(std::fs::read(&flat).unwrap() == at_backup);
    lab.assert_clean();
}

#[test]
fn an_interrupted_backup_removes_the_vm_snapshot() {
    let lab = Lab::new();
    let vm = lab.vm();
    let name = vm["name"].as_str().unwrap().to_string();
    lab.guest_write(&vm, 0, 0, &random_bytes(8, 24 * MIB));
    // Ctrl-C once reads are under way.
    let (code, stderr) = lab.interrupt_during_reads(&["backup", "--vm", &name], || {});
    assert_eq!(code, Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    lab.assert_clean();
    assert!(lab.env.ok(&["snapshots", "--json"]).json().as_array().unwrap().is_empty());
}

#[test]
fn an_interrupted_restore_into_a_vm_turns_change_tracking_back_on() {
    let lab = Lab::new();
    let vm = lab.vm();
    let name = vm["name"].as_str().unwrap().to_string();
    lab.succeed(&["vm", "enable-cbt", &name]);
    lab.guest_write(&vm, 0, 0, &random_bytes(4, 8 * MIB));
    let id = lab.ok(&["backup", "--json", "--vm", &name])["snapshot"].as_str().unwrap().to_string();
    lab.succeed(&["vm", "power-off", &name]);
    std::fs::remove_file(&lab.vddk_log).ok();
    let restore = ["restore", &format!("{id}:disk1"), "--to-vm", &name, "--no-cbt"];
    let (code, stderr) = lab.interrupt_during_reads(&restore, || {
        assert_eq!(lab.vm()["cbt_enabled"], false, "change tracking is off while restoring");
    });
    assert_eq!(code, Some(130), "{stderr}");
    assert_eq!(lab.vm()["cbt_enabled"], true, "change tracking was left off");
    assert!(lab.env.objects("locks").is_empty(), "the restore's session marker was left");
    lab.assert_clean();
}

#[test]
fn restore_as_a_new_vm_from_the_recorded_configuration() {
    let lab = Lab::new();
    // Settings a restored VM must keep: sockets of two cores (per-socket licences), CPU hot add, its notes.
    let spec = "<spec><annotation>db01: SQL Server &lt;licensed per socket&gt;</annotation><numCPUs>4</numCPUs>\
                <numCoresPerSocket>2</numCoresPerSocket><cpuHotAddEnabled>true</cpuHotAddEnabled></spec>";
    let mut client = lab.client();
    let first = lab.vm()["moref"].as_str().unwrap().to_string();
    client.run_task("ReconfigVM_Task", &diskvault::vsphere::MoRef::new("VirtualMachine", &first), spec).unwrap();
    let vm = lab.vm();
    let name = vm["name"].as_str().unwrap().to_string();
    lab.guest_write(&vm, 0, 0, &random_bytes(1, 3 * MIB));
    lab.guest_write(&vm, 1, 33 * M, &random_bytes(2, 5000));
    let id = lab.ok(&["backup", "--json", "--vm", &name])["snapshot"].as_str().unwrap().to_string();
    let originals = [std::fs::read(lab.disk_file(&vm, 0)).unwrap(), std::fs::read(lab.disk_file(&vm, 1)).unwrap()];

    let r = lab.ok(&["restore", &id, "--to-new-vm", "restored-vm", "--json"]);
    assert_eq!(r.as_array().unwrap().len(), 2);
    assert_eq!((r[0]["blocks_written"].as_u64(), r[1]["blocks_written"].as_u64()), (Some(3), Some(1)), "{r}");
    let new = lab.vm_named("restored-vm").expect("the new VM is listed");
    assert_eq!(new["power_state"], "poweredOff");
    assert!(vm["num_cpu"].as_u64().unwrap() >= 1 && vm["memory_mb"].as_u64().unwrap() >= 1, "{vm}");
    assert_eq!((&new["num_cpu"], &new["memory_mb"]), (&vm["num_cpu"], &vm["memory_mb"]));
    assert_eq!(new["disks"].as_array().unwrap().len(), 2);
    let settings =
        ["config.hardware.numCoresPerSocket", "config.cpuHotAddEnabled", "config.annotation", "config.version"];
    let read = |client: &mut diskvault::vsphere::Client, moref: &str| -> Vec<(String, String)> {
        let this = diskvault::vsphere::MoRef::new("VirtualMachine", moref);
        let mut props: Vec<_> =
            client.properties(&this, &settings).unwrap().into_iter().map(|(p, v)| (p, v.text.clone())).collect();
        props.sort();
        props
    };
    let original_settings = read(&mut client, &first);
    assert!(
        original_settings.contains(&("config.hardware.numCoresPerSocket".into(), "2".into())),
        "{original_settings:?}"
    );
    assert_eq!(read(&mut client, new["moref"].as_str().unwrap()), original_settings);
    client.logout();
    // Controllers, slots and network adapters as recorded; new MAC addresses.
    let kinds = |v: &serde_json::Value, what: &str, field: &str| -> Vec<String> {
        v[what].as_array().unwrap().iter().map(|c| c[field].as_str().unwrap().to_string()).collect()
    };
    assert!(!vm["nics"].as_array().unwrap().is_empty(), "{vm}");
    assert_eq!(kinds(&new, "nics", "kind"), kinds(&vm, "nics", "kind"));
    assert_eq!(kinds(&new, "nics", "network"), kinds(&vm, "nics", "network"));
    assert_eq!(kinds(&new, "nics", "portgroup_key"), kinds(&vm, "nics", "portgroup_key"));
    assert_ne!(kinds(&new, "nics", "mac_address"), kinds(&vm, "nics", "mac_address"));
    let scsi = |v: &serde_json::Value| -> Vec<String> {
        kinds(v, "controllers", "kind").into_iter().filter(|k| k != "VirtualIDEController").collect()
    };
    assert!(!scsi(&vm).is_empty(), "{vm}");
    assert_eq!(scsi(&new), scsi(&vm));
    for (i, original) in originals.iter().enumerate() {
        assert_eq!(new["disks"][i]["unit_number"], vm["disks"][i]["unit_number"]);
        assert_eq!(new["disks"][i]["capacity"], vm["disks"][i]["capacity"]);
        assert!(std::fs::read(lab.disk_file(&new, i)).unwrap() == *original, "disk {i} of the new VM differs");
    }
    // A damaged pack: the restore stops, naming the blob, its pack and a block it holds (of either disk: which
    // pack is the largest depends on how the backup's threads met), and the half-restored VM goes.
    let packs = lab.env.objects("packs");
    let data_pack = packs.iter().max_by_key(|p| lab.env.read_object(p).len()).unwrap();
    lab.env.flip(data_pack, 1000);
    let r = lab.run(&["restore", &id, "--to-new-vm", "broken-vm"], &[]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains(data_pack.as_str()) && r.stderr.contains(" of disk disk"), "{}", r.stderr);
    assert!(lab.vm_named("broken-vm").is_none());
    lab.env.flip(data_pack, 1000);
    // The name is taken now; a file backup has no VM configuration to restore from.
    let r = lab.run(&["restore", &id, "--to-new-vm", "restored-vm"], &[]);
    assert!(r.stderr.contains("exists already"), "{}", r.stderr);
    let img = lab.env.path("plain.img");
    write(&img, &random_bytes(3, MIB));
    let plain = lab.env.backup(&["--name", "files", img.to_str().unwrap()])["snapshot"].as_str().unwrap().to_string();
    let r = lab.run(&["restore", &plain, "--to-new-vm", "x"], &[]);
    assert!(r.stderr.contains("not taken of a VMware VM"), "{}", r.stderr);
    lab.assert_clean();
}

#[test]
fn restore_as_a_new_vm_into_another_folder_pool_and_network() {
    let lab = Lab::with_simulator(&[("VCSIM_THICK_EAGER_DISKS", "2")]);
    let vm = lab.vm();
    let name = vm["name"].as_str().unwrap().to_string();
    lab.guest_write(&vm, 0, 0, &random_bytes(4, 2 * MIB));
    // disk2 is thick and eagerly zeroed (as a clustered VM's shared disk would be).
    assert_eq!((&vm["disks"][1]["thin_provisioned"], &vm["disks"][1]["eagerly_scrub"]), (&false.into(), &true.into()));
    let id = lab.ok(&["backup", "--json", "--vm", &name])["snapshot"].as_str().unwrap().to_string();
    let original = std::fs::read(lab.disk_file(&vm, 0)).unwrap();
    // A folder for restores next to the VM's own (the datacenter's VM folder).
    let mut client = lab.client();
    let vm_folder = client.find_by_inventory_path("DC0/vm").unwrap().expect("the datacenter's VM folder");
    assert_eq!(vm["folder"], vm_folder.value.as_str(), "{vm}");
    client.call("CreateFolder", &vm_folder, "<name>restored</name>").unwrap();
    let restored_folder = client.find_by_inventory_path("DC0/vm/restored").unwrap().expect("the new folder");
    let pool = client.find_by_inventory_path("DC0/host/DC0_H0/Resources").unwrap().expect("the host's pool");
    // And a distributed port group of the DR site.
    let recorded_pg = diskvault::vsphere::MoRef::new("DistributedVirtualPortgroup", "dvportgroup-13");
    let props = client.properties(&recorded_pg, &["config.distributedVirtualSwitch"]).unwrap();
    let switch = diskvault::vsphere::MoRef::new(props[0].1.attribute("type").unwrap(), props[0].1.text.trim());
    let spec = "<spec><name>DR-PG</name><type>earlyBinding</type><numPorts>8</numPorts></spec>";
    client.run_task("AddDVPortgroup_Task", &switch, spec).unwrap();
    let dr_pg = client.find_by_inventory_path("DC0/network/DR-PG").unwrap().expect("the new port group");
    client.logout();
    // The recorded NIC's network (a distributed port group's key, or a standard one's name) and another.
    let nic = &vm["nics"][0];
    let (recorded, other) = match nic["portgroup_key"].as_str().unwrap() {
        "" => (nic["network"].as_str().unwrap().to_string(), "DR Network"),
        key => (key.to_string(), "VM Network"),
    };

    let listed = |vm: &str| lab.vm_named(vm).is_some();
    // Wrong places are refused before anything is created.
    for (args, says) in [
        (["--folder", "DC0/vm/nowhere"], "no folder at the inventory path \"DC0/vm/nowhere\""),
        (["--resource-pool", "DC0/vm"], "is a Folder"),
        (["--network", "no-such-net=VM Network"], "no recorded NIC is on \"no-such-net\""),
        (["--network", &format!("{recorded}=DR Network")], "there is no network \"DR Network\""),
    ] {
        let r = lab.run(&[&["restore", &id, "--to-new-vm", "dr-vm"][..], &args[..]].concat(), &[]);
        assert!(r.code != 0 && r.stderr.contains(says), "{args:?}: {}", r.stderr);
    }
    assert!(!listed("dr-vm"));

    let map = format!("{recorded}={other}");
    let args = ["--folder", "DC0/vm/restored", "--resource-pool", &pool.value, "--network", &map];
    // The plan first: what would be made where, checked against the inventory, nothing created.
    let plan = lab.ok(&[&["restore", &id, "--to-new-vm", "dr-vm", "--dry-run", "--json"][..], &args[..]].concat());
    assert_eq!(
        (&plan["folder"], &plan["resource_pool"]),
        (&restored_folder.value.as_str().into(), &pool.value.as_str().into())
    );
    assert_eq!(
        (&plan["disks"][0]["provisioning"], &plan["disks"][1]["provisioning"]),
        (&"thin".into(), &"thick-eager".into())
    );
    assert_eq!((&plan["disks"][1]["datastore"], &plan["nics"][0][1]), (&"LocalDS_0".into(), &other.into()), "{plan}");
    assert!(!listed("dr-vm"), "a dry run creates nothing");
    let r = lab.run(&["restore", &id, "--to-new-vm", "dr-vm", "--dry-run", "--datastore", "nowhere"], &[]);
    assert!(
        r.code != 0 && r.stderr.contains("there is no datastore \"nowhere\" (datastores: LocalDS_0)"),
        "{}",
        r.stderr
    );
    lab.succeed(&[&["restore", &id, "--to-new-vm", "dr-vm"][..], &args[..]].concat());
    let new = lab.vm_named("dr-vm").expect("the new VM is listed");
    assert_eq!(new["folder"], restored_folder.value.as_str(), "{new}");
    let provisioning = |v: &serde_json::Value| -> Vec<(bool, bool)> {
        let disks = v["disks"].as_array().unwrap();
        disks
            .iter()
            .map(|d| (d["thin_provisioned"].as_bool().unwrap(), d["eagerly_scrub"].as_bool().unwrap()))
            .collect()
    };
    assert_eq!(provisioning(&new), [(true, false), (false, true)], "as recorded: disk2 thick, eagerly zeroed");
    assert_eq!(new["resource_pool"], pool.value.as_str(), "{new}");
    assert_eq!((new["nics"][0]["network"].as_str(), new["nics"][0]["portgroup_key"].as_str()), (Some(other), Some("")));
    assert!(std::fs::read(lab.disk_file(&new, 0)).unwrap() == original, "the new VM's disk differs");

    // Onto a distributed port group, the recorded one named by its name (it exists here).
    assert_eq!(recorded, "dvportgroup-13", "the simulator's VMs are on DC0_DVPG0: {nic}");
    let args = ["--network", "DC0_DVPG0=DR-PG", "--power-on", "--thin"];
    let r = lab.run(&[&["restore", &id, "--to-new-vm", "dr-vm2"][..], &args].concat(), &[]);
    assert!(r.code == 0 && r.stdout.contains("created VM dr-vm2 (powered on)"), "{}{}", r.stdout, r.stderr);
    let new = lab.vm_named("dr-vm2").expect("the new VM is listed");
    assert_eq!(new["power_state"], "poweredOn");
    assert_eq!(provisioning(&new), [(true, false), (true, false)], "--thin");
    assert_eq!(new["nics"][0]["portgroup_key"], dr_pg.value.as_str(), "{new}");
    assert_eq!(new["nics"][0]["switch_uuid"], nic["switch_uuid"], "{new}");
    lab.assert_clean();
}

#[test]
fn a_restored_vm_is_started_to_check_that_it_boots() {
    let lab = Lab::new();
    let vm = lab.vm();
    let name = vm["name"].as_str().unwrap().to_string();
    // A boot sector on the first disk: the simulator's guest then starts (VMware Tools, green heartbeat).
    let mut boot_sector = random_bytes(31, 512);
    boot_sector[510..].copy_from_slice(&[0x55, 0xAA]);
    lab.guest_write(&vm, 0, 0, &boot_sector);
    lab.guest_write(&vm, 0, 3 * M, &random_bytes(32, MIB));
    let good = lab.ok(&["backup", "--json", "--vm", &name])["snapshot"].as_str().unwrap().to_string();
    let listed = |vm: &str| lab.vm_named(vm).is_some();

    let prom = lab.env.path("boot.prom");
    let verified = || {
        let series = format!(
            "diskvault_verify_boot_verified{{command=\"restore\",repository=\"{}\",source=\"{name}\"}} ",
            lab.env.location()
        );
        let text = std::fs::read_to_string(&prom).unwrap();
        text.lines().find_map(|l| l.strip_prefix(&series).map(str::to_string)).unwrap_or_else(|| panic!("{text}"))
    };
    let isolated = ["--network", "DC0_DVPG0=VM Network", "--metrics-file", prom.to_str().unwrap()];
    let r = lab.ok(&[&["restore", &good, "--to-new-vm", "check-1", "--verify-boot", "--json"][..], &isolated].concat());
    assert_eq!(verified(), "1");
    assert_eq!((&r["boot"]["verified"], &r["boot"]["removed"]), (&true.into(), &true.into()), "{r}");
    assert!(r["boot"]["heartbeat_after_secs"].as_f64().unwrap() < 60.0, "{r}");
    assert_eq!(r["disks"][0]["blocks_written"], 2, "{r}");
    assert!(!listed("check-1"), "the checked VM was removed");
    // An application check: run here once the guest has an address, it must exit 0.
    let seen = lab.env.path("seen-by-check");
    let record = format!("env | grep ^DISKVAULT_VM_ | sort > {}", seen.display());
    lab.succeed(&["restore", &good, "--to-new-vm", "check-4", "--verify-boot", "--verify-command", &record]);
    let env = std::fs::read_to_string(&seen).unwrap();
    let lines: Vec<&str> = env.lines().collect();
    assert!(lines.len() == 3 && lines[0].starts_with("DISKVAULT_VM_IP=192.0.2."), "{env}");
    assert!(lines[1].starts_with("DISKVAULT_VM_MOREF=vm-") && lines[2] == "DISKVAULT_VM_NAME=check-4", "{env}");
    for (command, says) in [
        ("exit 3", "the check command failed (exit status: 3) against 192.0.2."),
        ("sleep 30", "the check command did not finish within 3 s of power-on"),
    ] {
        let args = ["--verify-boot", "--verify-command", command, "--boot-timeout", "3"];
        let r = lab.run(&[&["restore", &good, "--to-new-vm", "check-5"][..], &args].concat(), &[]);
        assert!(r.code == 1 && r.stderr.contains(says), "{command}: {}", r.stderr);
        assert!(!listed("check-5"));
    }

    // The boot sector lost before the next backup: that backup's VM never reports a heartbeat.
    lab.guest_write(&vm, 0, 510, &[0, 0]);
    let bad = lab.ok(&["backup", "--json", "--vm", &name])["snapshot"].as_str().unwrap().to_string();
    let args = ["--verify-boot", "--boot-timeout", "2", "--metrics-file", prom.to_str().unwrap()];
    let r = lab.run(&[&["restore", &bad, "--to-new-vm", "check-2"][..], &args].concat(), &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    assert_eq!(verified(), "0", "monitoring sees the failed check");
    assert!(r.stderr.contains("boot check failed: VM check-2: no VMware Tools heartbeat within 2 s"), "{}", r.stderr);
    assert!(r.stderr.contains("was removed"), "{}", r.stderr);
    assert!(!listed("check-2"));
    // --keep leaves it running, to be looked at.
    let r =
        lab.run(&["restore", &bad, "--to-new-vm", "check-3", "--verify-boot", "--boot-timeout", "1", "--keep"], &[]);
    assert_eq!(r.code, 1, "{}", r.stderr);
    let kept = lab.vm_named("check-3").expect("kept");
    assert_eq!(kept["power_state"], "poweredOn");
    lab.assert_clean();
}

#[test]
fn excluded_and_independent_disks_are_left_out_and_restored_empty() {
    // disk3 is independent: VM snapshots leave it out (the simulator then has nothing to read it from).
    let lab = Lab::with_simulator(&[("VCSIM_DISKS", "3"), ("VCSIM_INDEPENDENT_DISKS", "3")]);
    let vm = lab.vm();
    let name = vm["name"].as_str().unwrap().to_string();
    assert_eq!(vm["disks"][1]["label"], "Hard disk 2", "{vm}");
    for i in 0..3 {
        lab.guest_write(&vm, i, 0, &random_bytes(i as u64 + 1, MIB));
    }
    let r = lab.ok(&["backup", "--json", "--vm", &name, "--exclude-disk", "Hard disk 2"]);
    let read: Vec<&str> = r["vmware_disks"].as_array().unwrap().iter().map(|d| d["name"].as_str().unwrap()).collect();
    assert_eq!(read, ["disk1"], "{r}");
    let skipped = &r["skipped_disks"];
    assert_eq!((&skipped[0]["name"], &skipped[0]["reason"]), (&"disk2".into(), &"excluded (--exclude-disk)".into()));
    assert_eq!(skipped[1]["name"], "disk3");
    assert!(skipped[1]["reason"].as_str().unwrap().contains("independent disk"), "{r}");
    let id = r["snapshot"].as_str().unwrap().to_string();
    assert!(lab.env.restore(&format!("{id}:disk1"), &[]) == std::fs::read(lab.disk_file(&vm, 0)).unwrap());

    // As a new VM: the configuration keeps all three disks; the two left out are created empty, and say why.
    let r = lab.ok(&["restore", &id, "--to-new-vm", "copy-vm", "--json"]);
    let report = |d: &str| r.as_array().unwrap().iter().find(|x| x["disk"] == d).unwrap().clone();
    assert_eq!(report("disk1")["blocks_written"], 1, "{r}");
    assert!(report("disk2")["left_empty_because"].as_str().unwrap().contains("excluded"), "{r}");
    assert!(report("disk3")["left_empty_because"].as_str().unwrap().contains("independent"), "{r}");
    let new = lab.vm_named("copy-vm").expect("the new VM is listed");
    assert_eq!(new["disks"].as_array().unwrap().len(), 3);
    assert!(std::fs::read(lab.disk_file(&new, 0)).unwrap() == std::fs::read(lab.disk_file(&vm, 0)).unwrap());
    assert!(std::fs::read(lab.disk_file(&new, 1)).unwrap().iter().all(|&b| b == 0), "disk2 was not left empty");

    // Leaving out every disk is refused, before any VM snapshot is taken.
    let r = lab.run(&["backup", "--vm", &name, "--exclude-disk", "disk1", "--exclude-disk", "disk2"], &[]);
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("no disk to back up (disk1: excluded"), "{}", r.stderr);
    lab.assert_clean();
}

#[test]
fn every_vm_of_a_folder_is_backed_up_but_the_excluded_ones() {
    let lab = Lab::new();
    let all = lab.ok(&["vm", "list", "--json"]);
    let vms = all.as_array().unwrap();
    let (a, b) = (vms[0]["name"].as_str().unwrap(), vms[1]["name"].as_str().unwrap());
    lab.guest_write(&vms[0], 0, 0, &random_bytes(21, MIB));
    lab.guest_write(&vms[1], 0, 0, &random_bytes(22, MIB));
    // A folder "production" in the datacenter's VM folder, holding VM a.
    let mut client = lab.client();
    let vm_folder = client.find_by_inventory_path("DC0/vm").unwrap().unwrap();
    client.call("CreateFolder", &vm_folder, "<name>production</name>").unwrap();
    let production = client.find_by_inventory_path("DC0/vm/production").unwrap().unwrap();
    let list = format!("<list type=\"VirtualMachine\">{}</list>", vms[0]["moref"].as_str().unwrap());
    client.run_task("MoveIntoFolder_Task", &production, &list).unwrap();
    client.logout();

    let sources = |r: &serde_json::Value| -> Vec<String> {
        r.as_array().unwrap().iter().map(|s| s["source"].as_str().unwrap().to_string()).collect()
    };
    let r = lab.ok(&["backup", "--json", "--vm-folder", "DC0/vm/production"]);
    assert_eq!(sources(&r), [a]);
    let got = lab.env.restore(&format!("{}:disk1", r[0]["snapshot"].as_str().unwrap()), &[]);
    assert!(got == std::fs::read(lab.disk_file(&vms[0], 0)).unwrap());
    // The datacenter's folder holds both, the subfolder's VM too; one is excluded.
    let r = lab.ok(&["backup", "--json", "--vm-folder", "DC0/vm", "--exclude-vm", a]);
    assert_eq!(sources(&r), [b]);
    let r = lab.ok(&["backup", "--json", "--vm-folder", "DC0/vm"]);
    let mut both = sources(&r);
    both.sort();
    assert_eq!(both, [a, b]);

    for (args, says) in [
        (vec!["--vm-folder", "DC0/vm/nothing"], "no folder at the inventory path \"DC0/vm/nothing\""),
        (vec!["--vm-folder", "DC0/host/DC0_H0"], "\"DC0/host/DC0_H0\" is a ComputeResource"),
        (vec!["--vm-folder", "DC0/vm/production", "--exclude-vm", a], "no VM to back up in DC0/vm/production"),
        (vec!["--vm-folder", "DC0/vm", "--exclude-vm", "ghost"], "--exclude-vm ghost: no virtual machine"),
    ] {
        let r = lab.run(&[&["backup"][..], &args[..]].concat(), &[]);
        assert!(r.code != 0 && r.stderr.contains(says), "{args:?}: {}", r.stderr);
    }
    lab.assert_clean();
}

#[test]
fn every_vm_with_a_tag_is_backed_up() {
    // Tags as an administrator sets them in vCenter: "gold" in two categories, "empty" on no VM.
    let (a, b) = ("DC0_H0_VM0", "DC0_H0_VM1");
    let tags = format!("Backup/gold={a};Backup/silver={a},{b};Other/gold={b};Backup/empty=");
    let lab = Lab::with_simulator(&[("VCSIM_TAGS", &tags)]);
    let vm_a = lab.vm_named(a).unwrap();
    lab.guest_write(&vm_a, 0, 0, &random_bytes(23, MIB));
    lab.guest_write(&lab.vm_named(b).unwrap(), 0, 0, &random_bytes(24, MIB));
    let sources = |r: &serde_json::Value| -> Vec<String> {
        let mut s: Vec<String> =
            r.as_array().unwrap().iter().map(|s| s["source"].as_str().unwrap().to_string()).collect();
        s.sort();
        s
    };
    let listed = lab.ok(&["vm", "list", "--json", "--tag", "Other/gold"]);
    let names: Vec<&str> = listed.as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, [b]);
    // Each VM's tags, and none where it has none (listed only when asked for).
    let listed = lab.ok(&["vm", "list", "--json", "--tags"]);
    for vm in listed.as_array().unwrap() {
        let expected: &[&str] = match vm["name"].as_str().unwrap() {
            n if n == a => &["Backup/gold", "Backup/silver"],
            n if n == b => &["Backup/silver", "Other/gold"],
            _ => &[],
        };
        assert_eq!(vm["tags"], serde_json::json!(expected), "{vm}");
    }
    assert!(lab.ok(&["vm", "list", "--json"]).as_array().unwrap().iter().all(|vm| vm.get("tags").is_none()));
    let text = lab.run(&["vm", "list", "--tags"], &[]).stdout;
    let line = text.lines().find(|l| l.starts_with(a)).unwrap_or_else(|| panic!("{a} not listed: {text}"));
    assert!(line.contains(" Backup/gold,Backup/silver "), "{text}");
    let r = lab.ok(&["backup", "--json", "--vm-tag", "Backup/gold"]);
    assert_eq!(sources(&r), [a]);
    let got = lab.env.restore(&format!("{}:disk1", r[0]["snapshot"].as_str().unwrap()), &[]);
    assert!(got == std::fs::read(lab.disk_file(&vm_a, 0)).unwrap());
    let r = lab.ok(&["backup", "--json", "--vm-tag", "silver"]);
    assert_eq!(sources(&r), [a, b]);
    let r = lab.ok(&["backup", "--json", "--vm-tag", "silver", "--exclude-vm", b]);
    assert_eq!(sources(&r), [a]);
    // A VM with two of the tags is backed up once.
    let r = lab.ok(&["backup", "--json", "--vm-tag", "Backup/gold", "--vm-tag", "silver"]);
    assert_eq!(sources(&r), [a, b]);

    for (args, says) in [
        (vec!["--vm-tag", "gold"], "tags named \"gold\" exist in categories"),
        (vec!["--vm-tag", "bronze"], "no vSphere tag \"bronze\" (tags: empty, gold, silver)"),
        (vec!["--vm-tag", "Backup/empty"], "no VM to back up in tag Backup/empty"),
    ] {
        let r = lab.run(&[&["backup"][..], &args[..]].concat(), &[]);
        assert!(r.code != 0 && r.stderr.contains(says), "{args:?}: {}", r.stderr);
    }
    lab.assert_clean();
}

#[test]
fn several_vms_in_one_run_within_the_per_host_disk_bound() {
    let lab = Lab::new();
    let all = lab.ok(&["vm", "list", "--json"]);
    let vms = all.as_array().unwrap();
    assert_eq!(vms.len(), 2);
    for (i, vm) in vms.iter().enumerate() {
        lab.guest_write(vm, 0, 0, &random_bytes(i as u64 + 1, 2 * MIB));
        lab.guest_write(vm, 1, 5 * M, &random_bytes(i as u64 + 11, MIB));
    }
    let (a, b) = (vms[0]["name"].as_str().unwrap(), vms[1]["name"].as_str().unwrap());
    // Both VMs share the simulator's one host; 2 disks at most means one VM at a time.
    let r = lab.ok(&["backup", "--json", "--verify", "--vm", a, "--vm", b, "--max-disks-per-host", "2"]);
    let results = r.as_array().unwrap();
    assert_eq!(results.len(), 2);
    // --verify read back what both VMs' snapshots need: each shows as verified.
    let listed = lab.env.ok(&["snapshots", "--verified", "--json"]).json();
    assert_eq!(listed.as_array().unwrap().len(), 2);
    assert!(listed.as_array().unwrap().iter().all(|s| s["verification"]["verified"] == true), "{listed:#}");
    for (res, vm) in results.iter().zip(vms) {
        assert_eq!(res["source"], vm["name"]);
        assert_eq!(res["disks"][0]["blocks_read"], 2);
        assert_eq!(res["disks"][1]["blocks_read"], 1);
        for (i, disk) in ["disk1", "disk2"].iter().enumerate() {
            let got = lab.env.restore(&format!("{}:{disk}", res["snapshot"].as_str().unwrap()), &[]);
            assert!(got == std::fs::read(lab.disk_file(vm, i)).unwrap(), "{} {disk}", vm["name"]);
        }
    }
    // Never more than 2 disks open at once, by the test VDDK's own account.
    let log = std::fs::read_to_string(&lab.vddk_log).unwrap();
    let (mut open, mut most) = (0i32, 0i32);
    for l in log.lines() {
        if l.starts_with("Open ") {
            open += 1;
            most = most.max(open);
        } else if l.starts_with("Close ") {
            open -= 1;
        }
    }
    assert!(most <= 2, "{most} disks were open at once:\n{log}");
    // A VM that does not exist fails the run, naming it, before any snapshot is taken.
    let r = lab.run(&["backup", "--vm", a, "--vm", "ghost"], &[]);
    assert!(r.stderr.contains("no virtual machine named \"ghost\""), "{}", r.stderr);
    lab.assert_clean();
}

#[test]
fn restore_into_new_vmdks_created_through_the_vddk() {
    let lab = Lab::new();
    let vm = lab.vm();
    let name = vm["name"].as_str().unwrap().to_string();
    lab.guest_write(&vm, 0, 0, &random_bytes(1, 2 * MIB));
    lab.guest_write(&vm, 0, 40 * M + 512, &random_bytes(2, 7000));
    let id = lab.ok(&["backup", "--json", "--vm", &name])["snapshot"].as_str().unwrap().to_string();
    let original = lab.disk_file(&vm, 0);
    let capacity = vm["disks"][0]["capacity"].as_u64().unwrap();
    // The guest goes on writing: the restores must give the snapshot's content.
    let at_snapshot = std::fs::read(&original).unwrap();
    lab.guest_write(&vm, 0, 0, &random_bytes(3, MIB));

    // A hosted VMDK on this machine: sparse, read by qemu-img as the snapshot's disk.
    let hosted = lab.env.path("restored.vmdk");
    let hosted_s = hosted.to_str().unwrap();
    let r = lab.ok(&["restore", &format!("{id}:disk1"), "--to-vmdk", hosted_s, "--json"]);
    assert_eq!(r["blocks_written"], 3, "{r}");
    let expected = lab.env.path("expected.raw");
    std::fs::write(&expected, &at_snapshot).unwrap();
    let info = Command::new("qemu-img").args(["info", "--output=json", hosted_s]).output().unwrap();
    assert!(info.status.success(), "{}", String::from_utf8_lossy(&info.stderr));
    let info: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!((info["format"].as_str(), info["virtual-size"].as_u64()), (Some("vmdk"), Some(capacity)), "{info}");
    assert!(info["actual-size"].as_u64().unwrap() < 8 * M, "not sparse: {info}");
    let cmp = Command::new("qemu-img").args(["compare", "-f", "vmdk", "-F", "raw", hosted_s]).arg(&expected).output();
    let cmp = cmp.unwrap();
    assert!(cmp.status.success(), "{}{}", String::from_utf8_lossy(&cmp.stdout), String::from_utf8_lossy(&cmp.stderr));
    // Never over an existing file.
    let r = lab.run(&["restore", &format!("{id}:disk1"), "--to-vmdk", hosted_s], &[]);
    assert!(r.code != 0 && r.stderr.contains("exists already"), "{}", r.stderr);

    // A managed disk on the datastore, attached to the VM (written locally first, then cloned there).
    let new_path = format!("[LocalDS_0] {name}/restored-disk1.vmdk");
    let r = lab.run(&["restore", &format!("{id}:disk1"), "--to-vmdk", &new_path], &[]);
    assert!(r.code != 0 && r.stderr.contains("--attach-to"), "{}", r.stderr);
    let temp = lab.env.path("vmdk-temp");
    std::fs::create_dir_all(&temp).unwrap();
    let r = lab.ok(&[
        "restore",
        &format!("{id}:disk1"),
        "--to-vmdk",
        &new_path,
        "--attach-to",
        &name,
        "--temp-dir",
        temp.to_str().unwrap(),
        "--json",
    ]);
    assert_eq!((r["vm"].as_str(), r["blocks_written"].as_u64()), (Some(name.as_str()), Some(3)), "{r}");
    assert_eq!(std::fs::read_dir(&temp).unwrap().count(), 0, "the temporary VMDK was left");
    let after = lab.vm();
    let disks = after["disks"].as_array().unwrap();
    let added = disks.iter().find(|d| d["file_name"] == new_path.as_str()).expect("the new disk is attached");
    assert_eq!(added["capacity"].as_u64(), Some(capacity));
    assert!(std::fs::read(lab.sim.flat_file(&new_path)).unwrap() == at_snapshot, "the cloned disk differs");
    let log = std::fs::read_to_string(&lab.vddk_log).unwrap();
    assert!(log.lines().any(|l| l.starts_with("Create ") && l.contains("type=1")), "{log}");
    assert!(log.lines().any(|l| l.starts_with("Clone ") && l.ends_with("-> 0")), "{log}");
    // The same path again: the VDDK refuses to clone over it, and the VM keeps its three disks.
    let r =
        lab.run(&["restore", &format!("{id}:disk1"), "--to-vmdk", &new_path, "--attach-to", &name, "--temp-dir"], &[]);
    assert_ne!(r.code, 0);
    let r = lab.run(
        &[
            "restore",
            &format!("{id}:disk1"),
            "--to-vmdk",
            &new_path,
            "--attach-to",
            &name,
            "--temp-dir",
            temp.to_str().unwrap(),
        ],
        &[],
    );
    assert!(
        r.code != 0 && r.stderr.contains("VixDiskLib_Clone") && r.stderr.contains("already exists"),
        "{}",
        r.stderr
    );
    assert_eq!(std::fs::read_dir(&temp).unwrap().count(), 0, "the temporary VMDK was left");
    assert_eq!(lab.vm()["disks"].as_array().unwrap().len(), 3);
    lab.assert_clean();
}

/// Grows a VM disk as vSphere does (ReconfigVM_Task, edit; change tracking goes on) and its flat file with it.
fn grow_disk(lab: &Lab, vm: &serde_json::Value, i: usize, new_capacity: u64) {
    use diskvault::vsphere::{Client, MoRef, Trust};
    let mut client =
        Client::login(&lab.sim.url, &lab.sim.user, &lab.sim.password, &Trust::Thumbprint(lab.sim.sha256.clone()))
            .unwrap();
    let d = &vm["disks"][i];
    let body = format!(
        "<spec><deviceChange><operation>edit</operation><device xsi:type=\"VirtualDisk\"><key>{}</key>\
         <deviceInfo><label>{}</label><summary></summary></deviceInfo><backing xsi:type=\"VirtualDiskFlatVer2BackingInfo\"><fileName>{}</fileName><diskMode>persistent</diskMode>\
         <changeId>{}</changeId></backing><controllerKey>{}</controllerKey><unitNumber>{}</unitNumber><capacityInKB>{}</capacityInKB>\
         <capacityInBytes>{new_capacity}</capacityInBytes></device></deviceChange></spec>",
        d["key"],
        d["label"].as_str().unwrap(),
        d["file_name"].as_str().unwrap(),
        d["change_id"].as_str().unwrap(),
        d["controller_key"],
        d["unit_number"],
        new_capacity / 1024
    );
    let moref = vm["moref"].as_str().unwrap();
    client.run_task("ReconfigVM_Task", &MoRef::new("VirtualMachine", moref), &body).unwrap();
    client.logout();
    let f = std::fs::OpenOptions::new().write(true).open(lab.disk_file(vm, i)).unwrap();
    f.set_len(new_capacity).unwrap();
}

#[test]
fn a_resized_disk_is_read_in_full_and_says_why() {
    let lab = Lab::new();
    let vm = lab.vm();
    let name = vm["name"].as_str().unwrap().to_string();
    lab.succeed(&["vm", "enable-cbt", &name]);
    lab.guest_write(&vm, 0, 0, &random_bytes(1, 2 * MIB));
    let first = lab.ok(&["backup", "--json", "--vm", &name]);
    let disk1 = lab.disk_file(&vm, 0);
    let day0 = std::fs::read(&disk1).unwrap();

    // The admin grows disk1 from 64 to 80 MiB; the guest writes into the new space.
    grow_disk(&lab, &vm, 0, 80 * M);
    let by_name = |list: &serde_json::Value, field: &str, want: &str| -> serde_json::Value {
        let found = list.as_array().unwrap().iter().find(|d| d[field].as_str().unwrap().contains(want));
        found.unwrap_or_else(|| panic!("no {want} in {list}")).clone()
    };
    let vm_now = lab.vm();
    assert_eq!(by_name(&vm_now["disks"], "file_name", "/disk1.vmdk")["capacity"].as_u64(), Some(80 * M), "{vm_now}");
    lab.guest_write(&vm, 0, 70 * M, &random_bytes(2, MIB));
    let r = lab.ok(&["backup", "--json", "--vm", &name]);
    let d = by_name(&r["vmware_disks"], "name", "disk1");
    assert_eq!(d["mode"], "full", "{r}");
    assert!(d["reason"].as_str().unwrap().contains("resized (67108864 -> 83886080 bytes)"), "{d}");
    assert_eq!(
        by_name(&r["vmware_disks"], "name", "disk2")["mode"],
        "incremental",
        "the other disk stays incremental: {r}"
    );
    assert_eq!(by_name(&r["disks"], "name", "disk1")["blocks_read"], 3, "the allocated blocks of the grown disk: {r}");

    // Both points in time restore bit-exact, at their own sizes.
    let day1 = std::fs::read(&disk1).unwrap();
    assert_eq!(day1.len() as u64, 80 * M);
    assert!(lab.env.restore(&format!("{}:disk1", first["snapshot"].as_str().unwrap()), &[]) == day0);
    assert!(lab.env.restore(&format!("{}:disk1", r["snapshot"].as_str().unwrap()), &[]) == day1);
    lab.assert_clean();
}

/// Whether two files hold the same bytes, read a MiB at a time (multi-GiB sparse disks).
fn same_content(a: &Path, b: &Path) -> bool {
    use std::io::Read;
    let (mut fa, mut fb) = (std::fs::File::open(a).unwrap(), std::fs::File::open(b).unwrap());
    if fa.metadata().unwrap().len() != fb.metadata().unwrap().len() {
        return false;
    }
    let (mut ba, mut bb) = (vec![0u8; MIB], vec![0u8; MIB]);
    loop {
        let n = fa.read(&mut ba).unwrap();
        if n == 0 {
            return true;
        }
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            return false;
        }
    }
}

/// The element of a JSON list whose `name` is `name`.
fn named(list: &serde_json::Value, name: &str) -> serde_json::Value {
    let found = list.as_array().unwrap().iter().find(|d| d["name"] == name);
    found.unwrap_or_else(|| panic!("no {name} in {list}")).clone()
}

/// A VM with change tracking whose disk1 is a thin 4 GiB + 32 MiB disk: two manifest segments, the first 4096
/// blocks long, with 8 blocks of data in the first and 24 in the second. disk2 is empty.
fn lab_with_a_two_segment_disk() -> (Lab, serde_json::Value, String) {
    let lab = Lab::new();
    let vm = lab.vm();
    let name = vm["name"].as_str().unwrap().to_string();
    lab.succeed(&["vm", "enable-cbt", &name]);
    grow_disk(&lab, &vm, 0, 4128 * M);
    lab.guest_write(&vm, 0, 0, &random_bytes(1, 6 * MIB));
    lab.guest_write(&vm, 0, 3000 * M, &random_bytes(2, 2 * MIB));
    lab.guest_write(&vm, 0, 4096 * M, &random_bytes(3, 24 * MIB));
    (lab, vm, name)
}

/// A backup that saves a checkpoint after every segment and fails with a VIX read error 20 MiB into disk1's
/// second segment (the connection to the host broke). Returns its stderr.
fn backup_failing_in_the_second_segment(lab: &Lab, name: &str) -> String {
    let sector = ((4096 + 20) * M / 512).to_string();
    let r = lab.run(
        &["backup", "--vm", name, "--checkpoint-interval", "0"],
        &[("FAKE_VDDK_FAIL_READ_SECTOR", sector.as_str())],
    );
    assert_ne!(r.code, 0);
    assert!(r.stderr.contains("VIX error 16002"), "{}", r.stderr);
    r.stderr
}

/// Restores disk1 of `snapshot` to a file and compares it with the VM's disk as it is now.
fn assert_disk1_restores(lab: &Lab, vm: &serde_json::Value, snapshot: &str) {
    let restored = lab.env.path("disk1.raw");
    let _ = std::fs::remove_file(&restored);
    lab.env.ok(&["restore", &format!("{snapshot}:disk1"), "--target", restored.to_str().unwrap()]);
    assert!(same_content(&restored, &lab.disk_file(vm, 0)), "snapshot {snapshot} of disk1 restores different bytes");
}

#[test]
fn an_interrupted_backup_continues_from_its_checkpoint() {
    let (lab, vm, name) = lab_with_a_two_segment_disk();

    let stderr = backup_failing_in_the_second_segment(&lab, &name);
    assert!(stderr.contains(&format!("the next backup of {name} continues from there")), "{stderr}");
    lab.assert_clean();
    let listing = lab.env.ok(&["snapshots"]).stdout;
    assert!(listing.contains("0 snapshots"), "{listing}");
    assert!(
        listing.contains(&format!("interrupted backup of {name}"))
            && listing.contains("disk1 4.00 GiB of 4.03 GiB")
            && listing.contains("disk2 64.00 MiB of 64.00 MiB"),
        "{listing}"
    );
    // A prune in between keeps what the checkpoint names, although no snapshot does yet.
    lab.env.ok(&["prune"]);

    // Meanwhile the guest writes into the part that was read, into the part that was not, and into disk2.
    lab.guest_write(&vm, 0, 100 * M + 7, &random_bytes(4, 1000));
    lab.guest_write(&vm, 0, 4124 * M, &random_bytes(5, MIB));
    lab.guest_write(&vm, 1, 10 * M, &random_bytes(6, MIB));
    // With CBT verification: half the blocks CBT calls unchanged since the checkpoint are re-read and compared.
    let retry =
        lab.run(&["backup", "--json", "--vm", &name, "--verify-cbt", "50%"], &[("DISKVAULT_LOG", "diskvault=info")]);
    assert_eq!(retry.code, 0, "{}", retry.stderr);
    assert!(retry.stderr.contains("sampled unchanged blocks re-read, 0 differ"), "{}", retry.stderr);
    let r = retry.json();
    let (d1, d2) = (named(&r["vmware_disks"], "disk1"), named(&r["vmware_disks"], "disk2"));
    assert_eq!((d1["mode"].as_str(), d2["mode"].as_str()), (Some("resumed"), Some("resumed")), "{r}");
    assert!(d1["resumed_from"].as_str().unwrap().contains("4.00 GiB of 4.03 GiB read then"), "{d1}");
    // disk1: the changed block of the first segment, and the second segment's 25 allocated blocks; disk2:
    // its one changed block. Nothing that was read before the interruption is read again.
    assert_eq!(named(&r["disks"], "disk1")["blocks_read"], 1 + 25, "{r}");
    assert_eq!(named(&r["disks"], "disk2")["blocks_read"], 1, "{r}");
    lab.assert_clean();
    let resumed = r["snapshot"].as_str().unwrap().to_string();
    assert_disk1_restores(&lab, &vm, &resumed);
    assert!(lab.env.restore(&format!("{resumed}:disk2"), &[]) == std::fs::read(lab.disk_file(&vm, 1)).unwrap());
    // The checkpoint is gone with the snapshot that completed it; the next backup is an ordinary incremental.
    let listing = lab.env.ok(&["snapshots"]).stdout;
    assert!(!listing.contains("interrupted backup"), "{listing}");
    lab.guest_write(&vm, 0, 4097 * M, &random_bytes(7, 10));
    let r = lab.ok(&["backup", "--json", "--vm", &name]);
    assert_eq!(named(&r["vmware_disks"], "disk1")["mode"], "incremental", "{r}");
    assert_eq!(r["parent"].as_str(), Some(resumed.as_str()));
    assert_eq!(
        (&named(&r["disks"], "disk1")["blocks_read"], &named(&r["disks"], "disk2")["blocks_read"]),
        (&1.into(), &0.into()),
        "{r}"
    );
    assert_disk1_restores(&lab, &vm, r["snapshot"].as_str().unwrap());
    lab.env.ok(&["check", "--read-data"]);
}

#[test]
fn a_killed_backup_continues_its_work_and_its_vm_snapshot_is_removed() {
    let (lab, vm, name) = lab_with_a_two_segment_disk();

    // The proxy dies (SIGKILL) once the first segment is checkpointed, while its blocks still sit in the data
    // pack being filled: the checkpoint names blocks that were never stored.
    let mut c =
        lab.command(&["backup", "--vm", &name, "--checkpoint-interval", "0"], &[("FAKE_VDDK_READ_DELAY_MS", "300")]);
    let mut child = c.stderr(std::process::Stdio::piped()).spawn().unwrap();
    let (repo, start) = (lab.env.open_repo(), std::time::Instant::now());
    let covers_disk1 =
        |c: &diskvault::format::checkpoint::Checkpoint| c.disk("disk1").is_some_and(|d| d.blocks_done() > 0);
    while !repo.list_checkpoints(None).unwrap().iter().any(|(_, c)| covers_disk1(c)) {
        assert!(start.elapsed() < std::time::Duration::from_secs(60), "no checkpoint covers disk1's first segment");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(lab.vm()["snapshots"], 1, "the killed backup could not remove its VM snapshot");
    // Its session markers (the backup's, and the one its VM snapshot names), as if the backup had run on another
    // proxy (a holder of another running system, whose process this host cannot see): while they could still
    // belong to a live backup there, the snapshot stays.
    let (backend, lock) = (repo.backend(), diskvault::format::envelope::Kind::Lock);
    for marker in lab.env.objects("locks") {
        let sealed = backend.get(&marker).unwrap();
        let plain = diskvault::format::envelope::open(repo.keys(), lock, &sealed).unwrap();
        let mut info = diskvault::format::lock::LockInfo::decode(&plain).unwrap();
        info.holder = [7; 16];
        backend.put(&marker, &diskvault::format::envelope::seal(repo.keys(), lock, &info.encode())).unwrap();
    }
    let r = lab.run(&["backup", "--vm", &name], &[("FAKE_VDDK_FAIL_READ_SECTOR", "0")]);
    assert!(r.code != 0 && !r.stderr.contains("did not finish"), "{}", r.stderr);
    assert_eq!(lab.vm()["snapshots"], 1, "{}", r.stderr);

    // The retry, once that marker has gone stale (2 s here, 300 s by default), removes the VM snapshot the
    // killed backup left behind, and continues its work. (Had the marker stayed this host's, the first retry
    // would have: its process is gone, tests/locks.rs.)
    std::thread::sleep(std::time::Duration::from_millis(2500));
    let retry = lab.run(&["backup", "--json", "--vm", &name], &[("DISKVAULT_LOCK_STALE_SECS", "2")]);
    assert_eq!(retry.code, 0, "{}", retry.stderr);
    assert!(retry.stderr.contains("left by a backup that did not finish"), "{}", retry.stderr);
    // Snapshot and frozen images gone, and the VM can be relocated again (EndAccess for the dead backup's disks).
    lab.assert_released(&[("PrepareForAccess ", "EndAccess ")]);
    let r = retry.json();
    let removed = r["removed_vm_snapshots"].as_array().unwrap();
    assert!(removed.len() == 1 && removed[0].as_str().unwrap().starts_with("diskvault "), "{r}");
    assert_eq!(named(&r["vmware_disks"], "disk1")["mode"], "resumed", "{r}");
    // The first segment's 8 blocks again (not stored), and the 24 blocks of the second; not the 4088 holes of a
    // segment read whole.
    assert_eq!(named(&r["disks"], "disk1")["blocks_read"], 8 + 24, "{r}");
    assert_disk1_restores(&lab, &vm, r["snapshot"].as_str().unwrap());
    lab.env.ok(&["check", "--read-data"]);
}

#[test]
fn a_resumed_backup_whose_cbt_lies_is_read_in_full() {
    let (lab, vm, name) = lab_with_a_two_segment_disk();
    backup_failing_in_the_second_segment(&lab, &name);
    // CBT "loses" a change in the part the checkpoint covers.
    let flat = lab.disk_file(&vm, 0);
    write(&PathBuf::from(format!("{}.cbt-drop", flat.display())), format!("{} {}\n", 2000 * M, M).as_bytes());
    lab.guest_write(&vm, 0, 2000 * M + 9, &random_bytes(9, 5000));
    let r = lab.ok(&["backup", "--json", "--vm", &name, "--verify-cbt", "100%"]);
    let d1 = named(&r["vmware_disks"], "disk1");
    assert_eq!(d1["mode"], "full", "{r}");
    assert!(d1["reason"].as_str().unwrap().contains("CBT verification: 1 of"), "{d1}");
    assert_eq!(named(&r["vmware_disks"], "disk2")["mode"], "resumed", "disk2's CBT is right: {r}");
    // Read in full: the 8 + 24 allocated blocks and the one CBT lost.
    assert_eq!(named(&r["disks"], "disk1")["blocks_read"], 8 + 24 + 1, "{r}");
    assert_disk1_restores(&lab, &vm, r["snapshot"].as_str().unwrap());
    lab.assert_clean();
}
