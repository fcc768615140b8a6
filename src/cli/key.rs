//! `diskvault key list|add|remove|passwd`.

use std::path::PathBuf;

use super::Globals;
use crate::error::{Error, Result};
use crate::format::keyfile::KdfParams;
use crate::format::BlobId;
use crate::util::format_utc;

#[derive(clap::Subcommand, Debug)]
pub enum KeyCommand {
    /// List the key files.
    List,
    /// Add a password that opens the repository.
    Add(NewPassword),
    /// Remove a key file (not the one in use).
    Remove {
        /// Key id or unique prefix.
        id: String,
    },
    /// Change the password of the key in use.
    Passwd(NewPassword),
}

#[derive(clap::Args, Debug)]
pub struct NewPassword {
    /// Read the new password from this file (else DISKVAULT_NEW_PASSWORD, else a prompt).
    #[arg(long)]
    new_password_file: Option<PathBuf>,
}

impl NewPassword {
    fn get(&self) -> Result<Vec<u8>> {
        let p = if let Some(f) = &self.new_password_file {
            super::read_password_file(f)?
        } else if let Ok(p) = std::env::var("DISKVAULT_NEW_PASSWORD") {
            p.into_bytes()
        } else {
            super::prompt_password("new password", true)?
        };
        if p.is_empty() {
            return Err(Error::invalid("an empty password is not allowed"));
        }
        Ok(p)
    }
}

pub fn run(g: &Globals, cmd: &KeyCommand) -> Result<()> {
    let mut repo = g.open_repo()?;
    match cmd {
        KeyCommand::List => {
            println!("  {:<10} {:<19} {:<16} user", "id", "created (UTC)", "host");
            for (id, kf) in repo.list_keys()? {
                let cur = if id == repo.key_id() { "*" } else { " " };
                match kf {
                    Ok(k) => println!(
                        "{cur} {:<10} {:<19} {:<16} {}",
                        id.short(),
                        format_utc(k.created_secs),
                        k.hostname,
                        k.username
                    ),
                    Err(e) => println!("{cur} {:<10} unreadable: {e}", id.short()),
                }
            }
        }
        KeyCommand::Add(np) => {
            let id = repo.add_key(&np.get()?, KdfParams::DEFAULT)?;
            println!("added key {}", id.short());
        }
        KeyCommand::Remove { id } => {
            let prefix = id.to_ascii_lowercase();
            let matches: Vec<BlobId> =
                repo.list_keys()?.into_iter().map(|(i, _)| i).filter(|i| i.hex().starts_with(&prefix)).collect();
            match matches.as_slice() {
                [one] => {
                    repo.remove_key(one)?;
                    println!("removed key {}", one.short());
                }
                [] => return Err(Error::invalid(format!("no key with id {id}"))),
                _ => return Err(Error::invalid(format!("key id prefix {id} is ambiguous"))),
            }
        }
        KeyCommand::Passwd(np) => {
            let id = repo.change_password(&np.get()?, KdfParams::DEFAULT)?;
            println!("password changed (new key {})", id.short());
        }
    }
    Ok(())
}
