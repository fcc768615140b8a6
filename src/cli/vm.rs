//! `diskvault vm …`: the vSphere inventory and Changed Block Tracking.

use std::path::PathBuf;

use crate::error::{Error, Result};
use crate::util::human_bytes;
use crate::vsphere::{Client, Trust};

/// How to reach vCenter (or ESXi).
#[derive(clap::Args, Debug, Clone)]
pub struct VsphereArgs {
    /// vCenter or ESXi API address (`https://vcenter.example`, `/sdk` optional).
    #[arg(long = "vsphere", env = "DISKVAULT_VSPHERE_URL", value_name = "URL")]
    pub url: Option<String>,
    /// User name; the password comes from DISKVAULT_VSPHERE_PASSWORD, --vsphere-password-file,
    /// --vsphere-password-command or a prompt.
    #[arg(long = "vsphere-user", env = "DISKVAULT_VSPHERE_USER", value_name = "USER")]
    pub user: Option<String>,
    /// Read the vSphere password from this file (first line), e.g. a systemd credential.
    #[arg(long = "vsphere-password-file", env = "DISKVAULT_VSPHERE_PASSWORD_FILE", value_name = "FILE")]
    pub password_file: Option<PathBuf>,
    /// Run this shell command and use its first output line as the vSphere password (a secret store).
    #[arg(long = "vsphere-password-command", env = "DISKVAULT_VSPHERE_PASSWORD_COMMAND", value_name = "COMMAND")]
    pub password_command: Option<String>,
    /// Trust the server whose certificate has this SHA-1 or SHA-256 thumbprint (`AA:BB:…`).
    #[arg(long = "vsphere-thumbprint", env = "DISKVAULT_VSPHERE_THUMBPRINT", value_name = "HEX")]
    pub thumbprint: Option<String>,
    /// Trust servers whose certificate this CA (PEM) signed.
    #[arg(long = "vsphere-ca-file", env = "DISKVAULT_VSPHERE_CA_FILE", value_name = "FILE")]
    pub ca_file: Option<PathBuf>,
}

fn utf8(password: Vec<u8>) -> Result<String> {
    String::from_utf8(password).map_err(|_| Error::invalid("the vSphere password is not UTF-8"))
}

impl VsphereArgs {
    pub fn url(&self) -> Result<&str> {
        self.url
            .as_deref()
            .ok_or_else(|| Error::invalid("no vSphere address: give --vsphere URL or DISKVAULT_VSPHERE_URL"))
    }

    pub fn user(&self) -> Result<&str> {
        self.user
            .as_deref()
            .ok_or_else(|| Error::invalid("no vSphere user: give --vsphere-user or DISKVAULT_VSPHERE_USER"))
    }

    /// The password, from DISKVAULT_VSPHERE_PASSWORD, the password file or command, or the terminal (once).
    pub fn password(&self) -> Result<String> {
        match self.password_if_given()? {
            Some(p) => Ok(p),
            None => utf8(super::prompt_password(
                "vSphere password",
                "set DISKVAULT_VSPHERE_PASSWORD, --vsphere-password-file or --vsphere-password-command",
                false,
            )?),
        }
    }

    /// The password if one is given without asking (for `vddk://` URIs, which may not need one).
    pub fn password_if_given(&self) -> Result<Option<String>> {
        super::password_given(
            "DISKVAULT_VSPHERE_PASSWORD",
            self.password_file.as_deref().filter(|f| !f.as_os_str().is_empty()),
            self.password_command.as_deref().filter(|c| !c.is_empty()),
        )?
        .map(utf8)
        .transpose()
    }

    pub fn connect(&self) -> Result<Client> {
        self.connect_with(&self.password()?)
    }

    pub fn connect_with(&self, password: &str) -> Result<Client> {
        // An empty value (an unset variable in a script) counts as not given.
        let thumbprint = self.thumbprint.as_ref().filter(|t| !t.is_empty());
        let ca_file = self.ca_file.as_ref().filter(|p| !p.as_os_str().is_empty());
        let trust = match (thumbprint, ca_file) {
            (Some(tp), None) => Trust::Thumbprint(tp.clone()),
            (None, Some(ca)) => Trust::CaFile(ca.clone()),
            (Some(_), Some(_)) => {
                return Err(Error::invalid("give --vsphere-thumbprint or --vsphere-ca-file, not both"))
            }
            (None, None) => {
                return Err(Error::invalid(
                    "the vSphere server's certificate must be verified: give --vsphere-thumbprint (shown by \
                     `openssl s_client` or the vSphere client) or --vsphere-ca-file",
                ))
            }
        };
        Client::login(self.url()?, self.user()?, password, &trust)
    }
}

#[derive(clap::Subcommand, Debug)]
pub enum VmCommand {
    /// List virtual machines with their disks and change tracking state.
    List {
        #[command(flatten)]
        vsphere: VsphereArgs,
        /// Only the VMs carrying this vSphere tag (`TAG` or `CATEGORY/TAG`): what `backup --vm-tag` selects,
        /// templates included.
        #[arg(long, value_name = "TAG")]
        tag: Option<String>,
        /// Also show each VM's vSphere tags (`CATEGORY/TAG`), read from vCenter's tagging service.
        #[arg(long)]
        tags: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Turn Changed Block Tracking on (effective from the next snapshot).
    EnableCbt {
        #[command(flatten)]
        vsphere: VsphereArgs,
        /// VM name or moref.
        vm: String,
    },
    /// Turn Changed Block Tracking off.
    DisableCbt {
        #[command(flatten)]
        vsphere: VsphereArgs,
        vm: String,
    },
    /// Power a VM off (hard), e.g. before restoring onto its disks.
    PowerOff {
        #[command(flatten)]
        vsphere: VsphereArgs,
        vm: String,
    },
    /// Reset Changed Block Tracking (off, a snapshot cycle, on): the next backup reads every disk in full.
    ResetCbt {
        #[command(flatten)]
        vsphere: VsphereArgs,
        vm: String,
    },
}

/// The VMs of the inventory, only those carrying `tag` if given, with their tags if `with_tags`.
fn list_vms(c: &mut Client, tag: Option<&String>, with_tags: bool) -> Result<Vec<crate::vsphere::VmInfo>> {
    let mut vms = c.virtual_machines()?;
    if let Some(tag) = tag {
        let tagged = c.vms_with_tags(std::slice::from_ref(tag))?;
        vms.retain(|vm| tagged[0].contains(&vm.moref));
    }
    if with_tags {
        let mut by_vm = c.tags_of_vms()?;
        for vm in &mut vms {
            vm.tags = Some(by_vm.remove(&vm.moref).unwrap_or_default());
        }
    }
    Ok(vms)
}

pub fn run(cmd: &VmCommand) -> Result<()> {
    match cmd {
        VmCommand::List { vsphere, tag, tags, json } => {
            let mut c = vsphere.connect()?;
            let vms = list_vms(&mut c, tag.as_ref(), *tags);
            c.logout();
            let vms = vms?;
            if *json {
                println!("{}", serde_json::to_string_pretty(&vms).expect("JSON of plain values"));
                return Ok(());
            }
            let tags_header = if *tags { format!(" {:<24}", "tags") } else { String::new() };
            println!("{:<24} {:<10} {:<11} {:<4} {:>5}{tags_header}  disks", "name", "moref", "power", "cbt", "snaps");
            for vm in &vms {
                let disks: Vec<String> = vm
                    .disks
                    .iter()
                    .map(|d| format!("{} (key {}, {}, {})", d.label, d.key, human_bytes(d.capacity), d.file_name))
                    .collect();
                let tags = match &vm.tags {
                    Some(t) if t.is_empty() => format!(" {:<24}", "-"),
                    Some(t) => format!(" {:<24}", t.join(",")),
                    None => String::new(),
                };
                println!(
                    "{:<24} {:<10} {:<11} {:<4} {:>5}{tags}  {}",
                    vm.name,
                    vm.moref,
                    vm.power_state,
                    if vm.cbt_enabled { "on" } else { "off" },
                    vm.snapshots,
                    disks.join("; ")
                );
            }
            Ok(())
        }
        VmCommand::EnableCbt { vsphere, vm } | VmCommand::DisableCbt { vsphere, vm } => {
            let on = matches!(cmd, VmCommand::EnableCbt { .. });
            let mut c = vsphere.connect()?;
            let info = c.find_vm(vm)?;
            c.set_change_tracking(&info.moref, on)?;
            c.logout();
            println!(
                "change tracking {} for {} ({}); it takes effect at the next snapshot",
                if on { "enabled" } else { "disabled" },
                info.name,
                info.moref
            );
            Ok(())
        }
        VmCommand::PowerOff { vsphere, vm } => {
            let mut c = vsphere.connect()?;
            let info = c.find_vm(vm)?;
            if info.power_state != "poweredOff" {
                c.power_off(&info.moref)?;
            }
            c.logout();
            println!("{} ({}) is powered off", info.name, info.moref);
            Ok(())
        }
        VmCommand::ResetCbt { vsphere, vm } => {
            let mut c = vsphere.connect()?;
            let info = c.find_vm(vm)?;
            c.stop_change_tracking(&info.moref)?;
            c.set_change_tracking(&info.moref, true)?;
            c.logout();
            println!(
                "change tracking reset for {} ({}): the next backup reads every disk in full",
                info.name, info.moref
            );
            Ok(())
        }
    }
}
