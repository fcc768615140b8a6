//! VMware virtual disks read through the VDDK ([`crate::vddk`]) as disk sources.
//!
//! A disk is named by a `vddk://` URI, the same parameters nbdkit's vddk plugin takes:
//! `vddk://[USER@]SERVER[:PORT]/[DATASTORE] PATH.vmdk?moref=vm-N[&snapshot=snapshot-M][&thumbprint=AA:BB:…]
//! [&transports=nbdssl:nbd]` (the path percent-encoded where needed). The password comes from
//! [`VddkOptions::password`]; the VM backup command builds the same target from the vSphere API.

use std::path::PathBuf;

use super::{BlockRanges, DiskSource, Extent, PlannedReads};
use crate::error::{Error, Result};
use crate::vddk::{Credentials, Disk, DiskTarget, Library};

/// Granularity of allocation queries (bytes): the backup's block size.
const ALLOCATION_CHUNK: u64 = 1 << 20;

#[derive(Clone, Default)]
pub struct VddkOptions {
    /// The VDDK's directory (holding `lib64/libvixDiskLib.so.N`).
    pub libdir: Option<PathBuf>,
    /// For URIs with a user: the password.
    pub password: Option<String>,
}

/// Blocks read per `ReadAsync` batch (queued together, then one `Wait`).
const ASYNC_BATCH: usize = 8;

pub struct VddkSource {
    disk: Disk,
    plan: Option<PlannedReads>,
    /// Blocks read ahead of the backup, in plan order: (offset, data).
    ready: std::collections::VecDeque<(u64, Vec<u8>)>,
}

/// Parses a `vddk://` URI into a target (credentials from `password`).
pub fn parse_uri(uri: &str, password: Option<&str>) -> std::result::Result<DiskTarget, String> {
    let rest = uri.strip_prefix("vddk://").ok_or_else(|| format!("{uri:?} is not a vddk:// URI"))?;
    let (main, query) = rest.split_once('?').ok_or_else(|| format!("{uri:?}: needs ?moref=vm-N"))?;
    let (authority, path) = main.split_once('/').ok_or_else(|| format!("{uri:?}: no disk path after the server"))?;
    let (user, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(crate::util::percent_decode(u)?), h),
        None => (None, authority),
    };
    let (server, port) = match hostport.rsplit_once(':') {
        Some((h, p)) if !h.contains(']') || h.ends_with(']') => {
            (h.to_string(), Some(p.parse::<u32>().map_err(|_| format!("{uri:?}: port {p:?} is not a number"))?))
        }
        _ => (hostport.to_string(), None),
    };
    if server.is_empty() {
        return Err(format!("{uri:?}: no server"));
    }
    let mut target = DiskTarget {
        server,
        port,
        thumbprint: None,
        credentials: Credentials::Password { user: String::new(), password: String::new() },
        moref: String::new(),
        snapshot: None,
        path: crate::util::percent_decode(path)?,
        transports: None,
    };
    for kv in query.split('&').filter(|kv| !kv.is_empty()) {
        let (k, v) = kv.split_once('=').ok_or_else(|| format!("{uri:?}: {kv:?} is not KEY=VALUE"))?;
        let v = crate::util::percent_decode(v)?;
        match k {
            "moref" => target.moref = v,
            "snapshot" => target.snapshot = Some(v),
            "thumbprint" => target.thumbprint = Some(v),
            "transports" => target.transports = Some(v),
            _ => return Err(format!("{uri:?}: unknown parameter {k:?} (moref, snapshot, thumbprint, transports)")),
        }
    }
    if !target.moref.starts_with("vm-") {
        return Err(format!("{uri:?}: needs moref=vm-N (the VM's managed object id)"));
    }
    if !target.path.starts_with('[') {
        return Err(format!("{uri:?}: the disk path must be a datastore path like [datastore1] vm/vm.vmdk"));
    }
    if let Some(user) = user {
        let password = password.ok_or(
            "a vddk:// URI with a user needs a password (DISKVAULT_VSPHERE_PASSWORD, --vsphere-password-file or \
             --vsphere-password-command)",
        )?;
        target.credentials = Credentials::Password { user, password: password.to_string() };
    } else {
        return Err(format!("{uri:?}: no user (vddk://USER@SERVER/…)"));
    }
    Ok(target)
}

impl VddkSource {
    pub fn open(uri: &str, options: &VddkOptions) -> Result<VddkSource> {
        let target = parse_uri(uri, options.password.as_deref()).map_err(|e| Error::source(uri.to_string(), e))?;
        let libdir =
            options.libdir.as_ref().ok_or_else(|| Error::invalid("a vddk:// source needs --vddk-libdir DIR"))?;
        let lib = Library::load(libdir)?;
        Ok(VddkSource::from_disk(Disk::open(lib, &target)?))
    }

    pub fn from_disk(disk: Disk) -> VddkSource {
        VddkSource { disk, plan: None, ready: std::collections::VecDeque::new() }
    }

    pub fn transport(&self) -> &str {
        self.disk.transport()
    }
}

impl DiskSource for VddkSource {
    fn kind(&self) -> &'static str {
        "vddk"
    }

    fn describe(&self) -> String {
        self.disk.describe().to_string()
    }

    fn capacity(&self) -> u64 {
        self.disk.capacity()
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        if self.ready.is_empty() {
            if let Some(plan) = &mut self.plan {
                let mut batch = Vec::with_capacity(ASYNC_BATCH);
                while batch.len() < ASYNC_BATCH {
                    match plan.next() {
                        Some((_, off, len)) => batch.push((off, vec![0u8; len as usize])),
                        None => break,
                    }
                }
                self.disk.read_many(&mut batch)?;
                self.ready.extend(batch);
            }
        }
        match self.ready.front() {
            Some((at, data)) if *at == offset && data.len() == buf.len() => {
                buf.copy_from_slice(data);
                self.ready.pop_front();
                Ok(())
            }
            _ => {
                // Off the plan: read directly, and forget what was read ahead.
                self.ready.clear();
                self.plan = None;
                self.disk.read_at(offset, buf)
            }
        }
    }

    fn will_read(&mut self, blocks: &BlockRanges, block_size: u64) {
        self.plan = Some(PlannedReads::new(blocks.ranges().to_vec(), block_size, self.disk.capacity()));
    }

    fn allocated(&mut self) -> Result<Option<Vec<Extent>>> {
        self.disk.allocated(ALLOCATION_CHUNK)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris() {
        let t = parse_uri(
            "vddk://administrator%40vsphere.local@vc.example:443/%5BLocalDS_0%5D%20vm1%2Fvm1.vmdk?moref=vm-57&snapshot=snapshot-3&thumbprint=AA:BB",
            Some("pw"),
        )
        .unwrap();
        assert_eq!(t.server, "vc.example");
        assert_eq!(t.port, Some(443));
        assert_eq!(t.path, "[LocalDS_0] vm1/vm1.vmdk");
        assert_eq!(t.moref, "vm-57");
        assert_eq!(t.snapshot.as_deref(), Some("snapshot-3"));
        assert_eq!(t.thumbprint.as_deref(), Some("AA:BB"));
        assert!(
            matches!(t.credentials, Credentials::Password { ref user, .. } if user == "administrator@vsphere.local")
        );
        assert!(parse_uri("vddk://u@h/[ds] a.vmdk?moref=vm-1", None).unwrap_err().contains("password"));
        assert!(parse_uri("vddk://u@h/[ds] a.vmdk?snapshot=s", Some("p")).unwrap_err().contains("moref"));
        assert!(parse_uri("vddk://u@h/a.vmdk?moref=vm-1", Some("p")).unwrap_err().contains("datastore path"));
        assert!(parse_uri("vddk://u@h/[d] a.vmdk?moref=vm-1&x=1", Some("p")).unwrap_err().contains("unknown"));
    }
}
