//! `diskvault key list|add|remove|passwd|rotate|export|recover`.

use std::path::PathBuf;

use super::Globals;
use crate::error::{Error, Result};
use crate::format::keyfile::KdfParams;
use crate::format::recovery_key::RecoveryKey;
use crate::format::BlobId;
use crate::repository::Repository;
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
    /// Rotate the repository key, to revoke a password or recovery key that leaked: everything written from
    /// now on is sealed with a new key that only the new password's key file holds. Every other key file is
    /// removed and the old recovery key stops working (export a new one); add the passwords to keep again with
    /// `key add`. Stored data stays readable and deduplicates as before; whoever held a revoked key can still
    /// read what was stored before the rotation (if they can reach the storage) until `prune --reencrypt` has
    /// sealed it again, and nothing written after it.
    Rotate(NewPassword),
    /// Print the recovery key: the repository's master secret as text, to keep offline (on paper, in a safe).
    /// With it `key recover` opens the repository when every key file is lost, damaged or its password
    /// forgotten. Whoever holds it can read and write every backup: guard it like all passwords together.
    Export {
        /// Write it to this new file (mode 0600) instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
    },
    /// Add a password to the repository from its recovery key (`key export`), without any other password.
    Recover {
        /// The recovery key, as `key export` wrote it (or typed back in).
        #[arg(long)]
        recovery_key_file: PathBuf,
        #[command(flatten)]
        new_password: NewPassword,
    },
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
            super::prompt_password("new password", "set DISKVAULT_NEW_PASSWORD, or use --new-password-file", true)?
        };
        if p.is_empty() {
            return Err(Error::invalid("an empty password is not allowed"));
        }
        Ok(p)
    }
}

pub fn run(g: &Globals, cmd: &KeyCommand) -> Result<()> {
    if let KeyCommand::Recover { recovery_key_file, new_password } = cmd {
        return recover(g, recovery_key_file, new_password);
    }
    let mut repo = g.open_repo()?;
    match cmd {
        KeyCommand::List => {
            println!("  {:<10} {:<19} {:<16} {:<12} key epoch", "id", "created (UTC)", "host", "user");
            let current = repo.keys().current_epoch();
            for (id, kf) in repo.list_keys()? {
                let cur = if id == repo.key_id() { "*" } else { " " };
                match kf {
                    Ok(k) => println!(
                        "{cur} {:<10} {:<19} {:<16} {:<12} {}{}",
                        id.short(),
                        format_utc(k.created_secs),
                        k.hostname,
                        k.username,
                        k.epoch,
                        if k.epoch < current { " (from before a key rotation: opens nothing)" } else { "" }
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
        KeyCommand::Rotate(np) => {
            let (id, removed) = repo.rotate_key(&np.get()?, KdfParams::DEFAULT)?;
            println!(
                "rotated the repository key to key epoch {}: new key {} for the new password",
                repo.keys().current_epoch(),
                id.short()
            );
            if !removed.is_empty() {
                let ids: Vec<String> = removed.iter().map(|k| k.short()).collect();
                println!(
                    "removed {} key file(s), whose passwords no longer open the repository: {}",
                    removed.len(),
                    ids.join(", ")
                );
            }
            println!(
                "the recovery key changed: run `diskvault key export` and replace the old one, which no longer opens \
                 the repository"
            );
        }
        KeyCommand::Export { output } => export(&repo, output.as_deref())?,
        KeyCommand::Recover { .. } => {} // run above, without opening the repository with a password
    }
    Ok(())
}

fn export(repo: &Repository, output: Option<&std::path::Path>) -> Result<()> {
    let text = repo.recovery_key().encode();
    let Some(path) = output else {
        print!("{text}");
        return Ok(());
    };
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::local(path, format!("cannot create: {e}")))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(|e| Error::local(path, format!("cannot write: {e}")))?;
    eprintln!(
        "recovery key written to {}: keep it offline; it opens the repository without a password",
        path.display()
    );
    Ok(())
}

fn recover(g: &Globals, file: &std::path::Path, new_password: &NewPassword) -> Result<()> {
    let text = std::fs::read_to_string(file).map_err(|e| Error::local(file, format!("cannot read: {e}")))?;
    let key = RecoveryKey::decode(&text).map_err(|e| Error::invalid(format!("{}: {e}", file.display())))?;
    let backend = g.open_backend(g.location()?)?;
    let repo = Repository::recover(backend, &key, &new_password.get()?, KdfParams::DEFAULT)?;
    println!("added key {} from the recovery key", repo.key_id().short());
    Ok(())
}
