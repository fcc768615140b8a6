//! `diskvault repair index`.

use super::Globals;
use crate::error::Result;

#[derive(clap::Subcommand, Debug)]
pub enum RepairCommand {
    /// Rebuild all index files from the pack headers (after a lost or damaged index file).
    Index,
}

pub fn run(g: &Globals, cmd: &RepairCommand) -> Result<()> {
    let repo = g.open_repo()?;
    match cmd {
        RepairCommand::Index => {
            let r = crate::repair::rebuild_index(&repo)?;
            for u in &r.unreadable {
                eprintln!("warning: pack left out of the index: {u}");
            }
            println!(
                "indexed {} packs ({} blobs) in {} new index files; removed {} old index files",
                r.packs_indexed, r.blobs_indexed, r.index_files_written, r.index_files_removed
            );
        }
    }
    Ok(())
}
