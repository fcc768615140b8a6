//! `diskvault restore`.

use std::path::PathBuf;
use std::sync::Arc;

use super::Globals;
use crate::error::{Error, Result};
use crate::progress::{Counters, Reporter};
use crate::restore::{self, RestoreOptions};
use crate::util::human_bytes;
use crate::vmware::BootCheck;

#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// Snapshot id (or unique prefix), or `latest`; `ID:DISK` picks a disk.
    snapshot: String,
    /// The disk to restore (needed when the snapshot has several).
    #[arg(long)]
    disk: Option<String>,
    /// With `latest`: the latest snapshot of this source.
    #[arg(long)]
    name: Option<String>,
    /// File or block device to write; `-` streams the raw disk, every byte in order, to standard output.
    #[arg(long, short = 't', required_unless_present_any = ["to_vm", "to_new_vm", "to_vmdk"])]
    target: Option<PathBuf>,
    /// Restore onto this existing, powered-off VMware VM (name or moref) instead, writing only the blocks that
    /// differ from the snapshot: those CBT says the VM changed since the backup where it can tell, else every
    /// block is read and compared. Needs --vsphere… and --vddk-libdir.
    #[arg(long, conflicts_with = "target", value_name = "VM")]
    to_vm: Option<String>,
    /// Restore as a new, powered-off VMware VM of this name, created from the configuration recorded with the
    /// snapshot (CPUs, memory, firmware, guest OS, disks), with every disk written into it.
    #[arg(long, conflicts_with_all = ["target", "to_vm"], value_name = "NAME")]
    to_new_vm: Option<String>,
    /// With --to-vm or --to-new-vm: power the VM on once every disk is restored (a VM rolled back, or brought
    /// up at the recovery site; a new VM's NICs connect as recorded, with new MACs).
    #[arg(long, conflicts_with_all = ["target", "to_vmdk"])]
    power_on: bool,
    /// With --to-new-vm: check that the restored VM starts (a recoverability test): power it on, wait until its
    /// guest runs VMware Tools with a green heartbeat, then remove it. Exit code 1 if no heartbeat comes
    /// within --boot-timeout. Give --network to start it on an isolated port group, away from the original.
    #[arg(long, requires = "to_new_vm", conflicts_with = "power_on")]
    verify_boot: bool,
    /// With --verify-boot: after the heartbeat, wait for the guest's IP address and run this shell command here,
    /// with DISKVAULT_VM_IP, DISKVAULT_VM_NAME and DISKVAULT_VM_MOREF set (e.g. `nc -z $DISKVAULT_VM_IP 1433`): the
    /// check passes only if it exits 0 (within --boot-timeout).
    #[arg(long, requires = "verify_boot", value_name = "COMMAND")]
    verify_command: Option<String>,
    /// With --verify-boot: seconds from power-on for the heartbeat (and the check command) to succeed.
    #[arg(long, requires = "verify_boot", value_name = "SECONDS", default_value_t = 600)]
    boot_timeout: u64,
    /// With --verify-boot: keep the VM afterwards (powered on), to look at it.
    #[arg(long, requires = "verify_boot")]
    keep: bool,
    /// Restore into a new VMDK created through the VDDK: a local file (a hosted, sparse VMDK), or a datastore
    /// path "[datastore] dir/name.vmdk" (a thin disk cloned there and attached to the VM --attach-to).
    #[arg(long, conflicts_with_all = ["target", "to_vm", "to_new_vm"], value_name = "PATH")]
    to_vmdk: Option<String>,
    /// With --to-vmdk "[datastore] …": the VM (name or moref) that gets the new disk.
    #[arg(long, requires = "to_vmdk", value_name = "VM")]
    attach_to: Option<String>,
    /// With --to-vmdk "[datastore] …": where the hosted VMDK is written before it is cloned onto the datastore
    /// (it needs room for the disk's data; default: the system's temporary directory).
    #[arg(long, requires = "to_vmdk", value_name = "DIR")]
    temp_dir: Option<PathBuf>,
    /// With --to-new-vm: the datastore for the new VM and all its disks (default: each disk on the datastore it
    /// was on, the VM's files with its first disk).
    #[arg(long, requires = "to_new_vm", value_name = "NAME")]
    datastore: Option<String>,
    /// With --to-new-vm: create every disk thin (default: thin or thick, lazily or eagerly zeroed, as it was).
    #[arg(long, requires = "to_new_vm")]
    thin: bool,
    /// With --to-new-vm: show the VM that would be created (placement, datastores, disks, networks), checked
    /// against the inventory, and create nothing (a recovery plan to test before it is needed).
    #[arg(long, requires = "to_new_vm", conflicts_with_all = ["power_on", "verify_boot"])]
    dry_run: bool,
    /// With --to-new-vm: the folder for the new VM, as an inventory path ("DC0/vm/restored") or moref (default:
    /// the folder the VM was in).
    #[arg(long, requires = "to_new_vm", value_name = "PATH")]
    folder: Option<String>,
    /// With --to-new-vm: the resource pool, as an inventory path ("DC0/host/cluster/Resources") or moref
    /// (default: the pool the VM was in).
    #[arg(long, requires = "to_new_vm", value_name = "PATH")]
    resource_pool: Option<String>,
    /// With --to-new-vm: NICs recorded on network RECORDED (a standard port group's name, or a distributed port
    /// group's key, or its name while it exists) join the port group NEW (standard or distributed) instead.
    /// Repeatable.
    #[arg(long = "network", requires = "to_new_vm", value_name = "RECORDED=NEW", value_parser = parse_network_map)]
    networks: Vec<(String, String)>,
    /// With --to-vm: the VM's disk to write (its file name without .vmdk, e.g. disk1); default: the same name
    /// as the snapshot's disk.
    #[arg(long, requires = "to_vm", value_name = "NAME")]
    vm_disk: Option<String>,
    /// With --to-vm: read and compare every block even where CBT can say what changed since the backup.
    #[arg(long, requires = "to_vm")]
    no_cbt: bool,
    /// With --to-vm and CBT: re-read this percentage of the blocks CBT calls unchanged since the backup and
    /// compare them with the snapshot first; any difference and every block is compared.
    #[arg(long, requires = "to_vm", value_name = "PERCENT", default_value = "1", value_parser = super::prune::parse_percent)]
    verify_cbt: f64,
    #[command(flatten)]
    vsphere: super::vm::VsphereArgs,
    /// With --to-vm: the VDDK directory.
    #[arg(long, env = "DISKVAULT_VDDK_LIBDIR", value_name = "DIR")]
    vddk_libdir: Option<PathBuf>,
    /// Output format of --target: `raw` (sparse), or `qcow2` / `vmdk` for other tools (converted with
    /// qemu-img from a temporary raw file next to the target).
    #[arg(long, default_value = "raw", value_parser = ["raw", "qcow2", "vmdk"])]
    format: String,
    /// Print the result as JSON (with --to-vm).
    #[arg(long)]
    json: bool,
    /// Replace the target file if it exists.
    #[arg(long)]
    overwrite: bool,
    /// Re-read the target afterwards and compare every block with the snapshot.
    #[arg(long)]
    verify: bool,
    /// Concurrent pack reads.
    #[arg(long, default_value_t = 4)]
    fetchers: usize,
    /// If blocks are damaged or lost, restore everything else, leave those as zeros, list them and exit
    /// with code 3 (instead of stopping at the first one).
    #[arg(long)]
    allow_partial: bool,
}

fn parse_network_map(s: &str) -> std::result::Result<(String, String), String> {
    match s.split_once('=') {
        Some((recorded, new)) if !recorded.is_empty() && !new.is_empty() => Ok((recorded.into(), new.into())),
        _ => Err(format!("{s:?}: expected RECORDED=NEW (network names)")),
    }
}

pub fn run(g: &Globals, args: &RestoreArgs) -> Result<()> {
    let (snap_ref, disk_from_ref) = match args.snapshot.split_once(':') {
        Some((s, d)) => (s, Some(d.to_string())),
        None => (args.snapshot.as_str(), None),
    };
    let disk_name = args.disk.clone().or(disk_from_ref);
    // Ctrl-C stops through the error path: the session marker is removed, change tracking turned back on.
    crate::util::catch_interrupts();
    let repo = g.open_repo()?;
    let (id, snap) = repo.find_snapshot(snap_ref, args.name.as_deref())?;
    if let Some(name) = &args.to_new_vm {
        return restore_new_vm(g, args, &repo, &id, &snap, name);
    }
    // Onto a VM, a snapshot's disks go all at once unless one is chosen (see `restore_to_vm`).
    if let (Some(vm), None) = (&args.to_vm, &disk_name) {
        if snap.disks.len() > 1 {
            if args.vm_disk.is_some() {
                return Err(Error::invalid("--vm-disk needs one disk of the snapshot (ID:DISK or --disk)"));
            }
            let cache = g.open_cache_unsynced(&repo)?;
            let disks: Vec<_> = snap.disks.iter().map(|d| (d, None)).collect();
            return restore_to_vm(g, args, &repo, &cache, &id, &disks, vm);
        }
    }
    let disk = super::choose_disk(&id, &snap, disk_name.as_deref())?;
    let cache = g.open_cache_unsynced(&repo)?;
    let counters = Arc::new(Counters::default());
    if let Some(path) = &args.to_vmdk {
        return restore_vmdk(g, args, &repo, &cache, &id, disk, path);
    }
    if let Some(vm) = &args.to_vm {
        return restore_to_vm(g, args, &repo, &cache, &id, &[(disk, args.vm_disk.as_deref())], vm);
    }
    let final_target = args.target.clone().expect("clap requires --target without --to-vm");
    if final_target.as_os_str() == "-" {
        return restore_to_stdout(g, args, repo, cache, &id, disk, &counters);
    }
    if args.format != "raw" && final_target.exists() && !args.overwrite {
        return Err(Error::local(&final_target, "exists already (use --overwrite to replace it)"));
    }
    // Other formats: restore raw next to the target first, then convert.
    let target = if args.format == "raw" {
        final_target.clone()
    } else {
        let mut name = final_target.file_name().unwrap_or_default().to_os_string();
        name.push(".partial.raw");
        final_target.with_file_name(name)
    };
    if let Some(ranges) = snap.annotations.get(&format!("repaired.damaged.{}", disk.name)) {
        eprintln!(
            "warning: snapshot {} was repaired: byte ranges {ranges} of disk {} were lost and restore as zeros",
            id.short(),
            disk.name
        );
    }
    let opts = RestoreOptions {
        // The temporary raw file of a conversion is ours to replace.
        overwrite: args.overwrite || args.format != "raw",
        verify: args.verify,
        fetchers: args.fetchers,
        allow_partial: args.allow_partial,
    };
    let started = std::time::Instant::now();
    let stats = {
        let _r = Reporter::start("restore", counters.clone(), g.progress);
        restore::restore_disk(&repo, &cache, disk, &target, &opts, &counters)
    };
    let stats = match stats {
        Err(Error::Interrupted) => {
            eprintln!("{} holds an incomplete disk: restore it again", target.display());
            return Err(Error::Interrupted);
        }
        other => other?,
    };
    if args.format != "raw" {
        let converted = convert_image(&target, &final_target, &args.format);
        let _ = std::fs::remove_file(&target);
        converted?;
    }
    let target = final_target;
    let secs = started.elapsed().as_secs_f64();
    record_metrics(disk, secs, stats.bytes_written, Some(&stats));
    println!(
        "restored disk {} of snapshot {} to {}: {} in {:.1} s ({}/s), {} blocks written, {} zero blocks{}",
        disk.name,
        id.short(),
        target.display(),
        human_bytes(disk.capacity),
        secs,
        human_bytes((disk.capacity as f64 / secs.max(0.001)) as u64),
        stats.blocks_written,
        stats.zero_blocks,
        if args.verify { format!(", verified {} blocks", stats.blocks_verified) } else { String::new() }
    );
    if stats.damaged.is_empty() {
        return Ok(());
    }
    let lost: u64 = stats.damaged.iter().map(|r| r.end - r.start).sum();
    for r in &stats.damaged {
        eprintln!("damaged: bytes {}..{} ({}): {}", r.start, r.end, human_bytes(r.end - r.start), r.cause);
    }
    Err(Error::Incomplete(format!(
        "restore incomplete: {} in {} ranges could not be restored and were left as zeros (listed above)",
        human_bytes(lost),
        stats.damaged.len()
    )))
}

/// Converts a raw image to `format` with qemu-img.
fn convert_image(raw: &std::path::Path, out: &std::path::Path, format: &str) -> Result<()> {
    let status = std::process::Command::new("qemu-img")
        .args(["convert", "-q", "-f", "raw", "-O", format])
        .arg(raw)
        .arg(out)
        .status()
        .map_err(|e| Error::local(out, format!("cannot run qemu-img (install qemu-utils) to write {format}: {e}")))?;
    if !status.success() {
        return Err(Error::local(out, format!("qemu-img convert to {format} failed ({status})")));
    }
    Ok(())
}

fn restore_new_vm(
    g: &Globals,
    args: &RestoreArgs,
    repo: &crate::repository::Repository,
    id: &crate::format::ObjectId,
    snap: &crate::format::snapshot::Snapshot,
    name: &str,
) -> Result<()> {
    let placement = crate::vmware::NewVmPlacement {
        datastore: args.datastore.clone(),
        thin: args.thin,
        folder: args.folder.clone(),
        resource_pool: args.resource_pool.clone(),
        networks: args.networks.clone(),
    };
    if args.dry_run {
        let mut client = args.vsphere.connect()?;
        let plan = crate::vmware::plan_new_vm(&mut client, snap, name, &placement);
        client.logout();
        return print_plan(&plan?, id, args.json);
    }
    let libdir = vddk_libdir(args)?;
    let cache = g.open_cache_unsynced(repo)?;
    let counters = Arc::new(Counters::default());
    let mut client = args.vsphere.connect()?;
    let reports = {
        let _r = Reporter::start("restore", counters.clone(), g.progress);
        crate::vmware::restore_as_new_vm(
            &mut client,
            repo,
            &cache,
            snap,
            name,
            &placement,
            &libdir,
            args.vsphere.user()?,
            &counters,
        )
    };
    let powered = reports.is_ok() && args.power_on;
    let reports = reports.and_then(|r| power_on(&mut client, name, args.power_on).map(|()| r));
    let boot = match (&reports, args.verify_boot) {
        (Ok(_), true) => Some(verify_boot(&mut client, name, args)),
        _ => None,
    };
    client.logout();
    let reports = reports?;
    let boot = boot.transpose()?;
    if let Some(b) = &boot {
        let source = [("source", snap.source.as_str())];
        crate::metrics::gauge(
            "diskvault_verify_boot_verified",
            "1 if the VM restored from this source's snapshot ran VMware Tools with a green heartbeat in time.",
            &source,
            if b.verified { 1.0 } else { 0.0 },
        );
        if let Some(after) = b.heartbeat_after_secs {
            crate::metrics::gauge(
                "diskvault_verify_boot_heartbeat_seconds",
                "Seconds from power-on of the restored VM to its guest's heartbeat.",
                &source,
                after,
            );
        }
    }
    if args.json {
        let json = match &boot {
            Some(b) => serde_json::to_string_pretty(&serde_json::json!({ "disks": reports, "boot": b })),
            None => serde_json::to_string_pretty(&reports),
        };
        println!("{}", json.expect("JSON of plain values"));
        return boot_verdict(name, boot.as_ref());
    }
    let state = match &boot {
        Some(b) if b.removed => "removed after the boot check",
        Some(_) => "kept powered on after the boot check",
        None if powered => "powered on",
        None => "powered off",
    };
    println!("created VM {name} ({state}) from snapshot {}", id.short());
    for r in &reports {
        match &r.left_empty_because {
            Some(why) => println!("  {} -> {}: left empty ({why})", r.disk, r.vm_disk),
            None => println!(
                "  {} -> {}: wrote {} blocks ({})",
                r.disk,
                r.vm_disk,
                r.blocks_written,
                human_bytes(r.bytes_written)
            ),
        }
    }
    if let Some(BootCheck { verified: true, heartbeat_after_secs: Some(after), guest, command_exit_code, .. }) = &boot {
        println!("boot check: the guest ran VMware Tools with a green heartbeat {after:.1} s after power-on");
        if command_exit_code.is_some() {
            println!("boot check: the check command succeeded against {}", guest.ip_address.as_deref().unwrap_or("?"));
        }
    }
    boot_verdict(name, boot.as_ref())
}

/// `--dry-run`: the VM `--to-new-vm` would create.
fn print_plan(plan: &crate::vmware::NewVmPlan, id: &crate::format::ObjectId, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(plan).expect("JSON of plain values"));
        return Ok(());
    }
    println!("would create VM {} from snapshot {} (nothing created):", plan.name, id.short());
    println!("  folder {}, resource pool {}, files on {}", plan.folder, plan.resource_pool, plan.datastore);
    let cores =
        if plan.cores_per_socket > 0 { format!(" ({} per socket)", plan.cores_per_socket) } else { String::new() };
    let version = if plan.hardware_version.is_empty() { "default" } else { plan.hardware_version.as_str() };
    println!("  {} CPUs{cores}, {} MiB memory, hardware version {version}", plan.num_cpu, plan.memory_mb);
    for d in &plan.disks {
        let how = d.provisioning.name();
        let empty = d.left_empty_because.as_deref().map(|r| format!(", created empty ({r})")).unwrap_or_default();
        println!("  disk {}: {} on {}, {how}{empty}", d.disk, human_bytes(d.capacity), d.datastore);
    }
    for (kind, network) in &plan.nics {
        println!("  NIC {kind} on {network}");
    }
    Ok(())
}

/// `--verify-boot`: powers the new VM on, waits for its guest's heartbeat, and removes the VM (unless --keep),
/// also when the wait fails or is interrupted.
fn verify_boot(client: &mut crate::vsphere::Client, name: &str, args: &RestoreArgs) -> Result<BootCheck> {
    let moref = client.find_vm(name)?.moref;
    let timeout = std::time::Duration::from_secs(args.boot_timeout);
    let check = crate::vmware::check_boot(client, &moref, name, args.verify_command.as_deref(), timeout);
    if args.keep {
        return check;
    }
    // Powered off first: a running VM cannot be destroyed (it may not have started at all).
    let _ = client.power_off(&moref);
    let removed = client.destroy_vm(&moref);
    match (check, removed) {
        (Ok(mut c), Ok(())) => {
            c.removed = true;
            Ok(c)
        }
        (Ok(_), Err(e)) => {
            Err(Error::invalid(format!("boot check done, but VM {name} ({moref}) could not be removed: {e}")))
        }
        (Err(e), _) => Err(e),
    }
}

/// The exit status of a boot check: an error saying what failed.
fn boot_verdict(name: &str, boot: Option<&BootCheck>) -> Result<()> {
    match boot {
        Some(b) if !b.verified => Err(Error::invalid(format!(
            "boot check failed: VM {name}: {}; the restored system may not work. {}",
            b.failure.as_deref().unwrap_or("not verified"),
            if b.removed { "The VM was removed (--keep keeps it, to look at its console)." } else { "The VM is kept." }
        ))),
        _ => Ok(()),
    }
}

/// Powers the restored VM on if asked (`--power-on`); the error says the disks are restored.
fn power_on(client: &mut crate::vsphere::Client, vm: &str, asked: bool) -> Result<()> {
    if !asked {
        return Ok(());
    }
    let moref = client.find_vm(vm)?.moref;
    client
        .power_on(&moref)
        .map_err(|e| Error::invalid(format!("the disks are restored, but VM {vm} did not power on: {e}")))
}

/// The VDDK directory, on the loader's path (a re-exec if needed).
fn vddk_libdir(args: &RestoreArgs) -> Result<PathBuf> {
    let libdir = args
        .vddk_libdir
        .clone()
        .ok_or_else(|| Error::invalid("restoring into VMware writes through the VDDK: give --vddk-libdir DIR"))?;
    crate::vddk::ensure_loader_path(&libdir)?;
    Ok(libdir)
}

/// `restore … --to-vm`: the disks onto the VM's, and what was done (JSON: one report per disk; an object when
/// one disk was restored, as before several could be).
fn restore_to_vm(
    g: &Globals,
    args: &RestoreArgs,
    repo: &crate::repository::Repository,
    cache: &crate::cache::IndexCache,
    id: &crate::format::ObjectId,
    disks: &[(&crate::format::snapshot::DiskManifest, Option<&str>)],
    vm: &str,
) -> Result<()> {
    let libdir = vddk_libdir(args)?;
    let mut client = args.vsphere.connect()?;
    let counters = Arc::new(Counters::default());
    let reports = {
        let _r = Reporter::start("restore", counters.clone(), g.progress);
        crate::vmware::restore_to_vm(
            &mut client,
            repo,
            cache,
            disks,
            vm,
            &libdir,
            args.vsphere.user()?,
            crate::vmware::VmRestoreOptions { use_cbt: !args.no_cbt, verify_cbt_fraction: args.verify_cbt },
            &counters,
        )
    };
    let reports = reports.and_then(|r| power_on(&mut client, vm, args.power_on).map(|()| r));
    client.logout();
    let reports = reports?;
    if args.json {
        let json = match reports.as_slice() {
            [one] => serde_json::to_string_pretty(one),
            all => serde_json::to_string_pretty(all),
        };
        println!("{}", json.expect("JSON of plain values"));
        return Ok(());
    }
    for report in &reports {
        match report.changed_since_backup {
            Some(changed) => println!(
                "restored disk {} of snapshot {} onto {} of VM {}: CBT: {changed} blocks changed since the backup, \
                 written ({}); {} other blocks re-read to check CBT",
                report.disk,
                id.short(),
                report.vm_disk,
                report.vm,
                human_bytes(report.bytes_written),
                report.blocks_compared
            ),
            None => println!(
                "restored disk {} of snapshot {} onto {} of VM {}: compared {} blocks, wrote {} ({}){}",
                report.disk,
                id.short(),
                report.vm_disk,
                report.vm,
                report.blocks_compared,
                report.blocks_written,
                human_bytes(report.bytes_written),
                report
                    .compared_all_because
                    .as_deref()
                    .map(|r| format!("; every block compared: {r}"))
                    .unwrap_or_default()
            ),
        }
    }
    if reports.iter().any(|r| r.change_tracking_reset) {
        println!("change tracking was off during the restore and is on again: the next backup reads in full");
    }
    Ok(())
}

/// `--to-vmdk`: a new hosted VMDK, or a new disk on a datastore attached to a VM.
fn restore_vmdk(
    g: &Globals,
    args: &RestoreArgs,
    repo: &crate::repository::Repository,
    cache: &crate::cache::IndexCache,
    id: &crate::format::ObjectId,
    disk: &crate::format::snapshot::DiskManifest,
    path: &str,
) -> Result<()> {
    let libdir = vddk_libdir(args)?;
    let counters = Arc::new(Counters::default());
    let report = if path.starts_with('[') {
        let vm = args
            .attach_to
            .as_deref()
            .ok_or_else(|| Error::invalid("a VMDK on a datastore is made for a VM: name it with --attach-to VM"))?;
        let mut client = args.vsphere.connect()?;
        let temp_dir = args.temp_dir.clone().unwrap_or_else(std::env::temp_dir);
        let report = {
            let _r = Reporter::start("restore", counters.clone(), g.progress);
            crate::vmware::restore_to_new_vmdk(
                &mut client,
                repo,
                cache,
                disk,
                path,
                vm,
                &libdir,
                args.vsphere.user()?,
                &temp_dir,
                &counters,
            )
        };
        client.logout();
        report?
    } else {
        if args.attach_to.is_some() {
            return Err(Error::invalid("--attach-to needs a datastore path: --to-vmdk \"[datastore] dir/name.vmdk\""));
        }
        let _r = Reporter::start("restore", counters.clone(), g.progress);
        crate::vmware::restore_to_hosted_vmdk(repo, cache, disk, &libdir, std::path::Path::new(path), &counters)?
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report).expect("JSON of plain values"));
        return Ok(());
    }
    let attached = if report.vm.is_empty() { String::new() } else { format!(", attached to VM {}", report.vm) };
    println!(
        "restored disk {} of snapshot {} into the new VMDK {}{attached}: wrote {} blocks ({})",
        disk.name,
        id.short(),
        report.vm_disk,
        report.blocks_written,
        human_bytes(report.bytes_written)
    );
    Ok(())
}

/// `--target -`: the raw disk streamed to standard output (reports go to standard error).
fn restore_to_stdout(
    g: &Globals,
    args: &RestoreArgs,
    repo: crate::repository::Repository,
    cache: Arc<crate::cache::IndexCache>,
    id: &crate::format::ObjectId,
    disk: &crate::format::snapshot::DiskManifest,
    counters: &Arc<Counters>,
) -> Result<()> {
    let refuse = |what: &str| Err(Error::invalid(format!("--target - streams a raw disk: {what}")));
    if args.format != "raw" {
        return refuse("--format must be raw");
    }
    if args.verify {
        return refuse("--verify cannot re-read standard output");
    }
    if args.allow_partial {
        return refuse("--allow-partial needs a file or device to leave damaged ranges in");
    }
    {
        use std::io::IsTerminal;
        if std::io::stdout().is_terminal() {
            return refuse("standard output is a terminal; pipe or redirect it");
        }
    }
    let started = std::time::Instant::now();
    let stdout = std::io::stdout();
    widen_pipe(&stdout);
    let mut out = std::io::BufWriter::with_capacity(1 << 20, stdout.lock());
    let written = {
        let _r = Reporter::start("restore", counters.clone(), g.progress);
        restore::stream_disk(repo, cache, id, disk, &mut out, counters)?
    };
    let secs = started.elapsed().as_secs_f64();
    record_metrics(disk, secs, written, None);
    eprintln!(
        "restored disk {} of snapshot {} to standard output: {} in {:.1} s ({}/s)",
        disk.name,
        id.short(),
        human_bytes(written),
        secs,
        human_bytes((written as f64 / secs.max(0.001)) as u64)
    );
    Ok(())
}

/// Gives a pipe on `fd` a 1 MiB buffer instead of Linux's 64 KiB, where the system allows it (unprivileged
/// processes up to `/proc/sys/fs/pipe-max-size`, 1 MiB by default); anything else is left as it is. With 64 KiB
/// a stream into `cat` moved 4 GiB in 4.0 s on the project's VM, with 1 MiB in 1.4 s: the reader and the writer
/// take turns every 64 KiB.
fn widen_pipe(fd: &impl std::os::fd::AsRawFd) {
    // SAFETY: fcntl on a descriptor we hold; it fails harmlessly where it is not a pipe.
    unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, 1 << 20) };
}

/// The metrics of a restore of `disk`; `stats` of a restore into a file or device (a stream has no fetch
/// counts and stops at damage).
fn record_metrics(
    disk: &crate::format::snapshot::DiskManifest,
    secs: f64,
    written: u64,
    stats: Option<&restore::RestoreStats>,
) {
    use crate::metrics::gauge;
    let l = [("disk", disk.name.as_str())];
    gauge("diskvault_restore_duration_seconds", "Wall time of the restore.", &l, secs);
    gauge("diskvault_restore_disk_capacity_bytes", "Capacity of the restored disk.", &l, disk.capacity as f64);
    gauge("diskvault_restore_bytes_written", "Bytes written to the target.", &l, written as f64);
    if let Some(stats) = stats {
        gauge("diskvault_restore_bytes_fetched", "Bytes read from the repository.", &l, stats.bytes_fetched as f64);
        let damaged: u64 = stats.damaged.iter().map(|r| r.end - r.start).sum();
        gauge(
            "diskvault_restore_damaged_bytes",
            "Bytes that could not be restored (left as zeros).",
            &l,
            damaged as f64,
        );
    }
}
