//! `diskvault cat`: decoded repository objects as JSON, for debugging and support.

use super::Globals;
use crate::error::{Error, Result};
use crate::format::pack::PackEntry;
use crate::format::{names, BlobId};

#[derive(clap::Args, Debug)]
pub struct CatArgs {
    /// What to print: config, key, snapshot, index, pack (its header), verified (a verification record), damaged
    /// (a damage record of check).
    #[arg(value_parser = ["config", "key", "snapshot", "index", "pack", "verified", "damaged"])]
    kind: String,
    /// Object id (full; snapshots also accept a prefix or `latest`).
    id: Option<String>,
}

fn entry_json(e: &PackEntry) -> serde_json::Value {
    serde_json::json!({
        "type": e.blob_type.name(), "id": e.id.hex(), "offset": e.offset,
        "stored_len": e.stored_len, "raw_len": e.raw_len, "compressed": e.flags & 1 != 0,
        "delta_base": e.base.map(|b| b.hex()), "key_epoch": e.key_epoch,
    })
}

pub fn run(g: &Globals, args: &CatArgs) -> Result<()> {
    let repo = g.open_repo()?;
    let need_id = || -> Result<BlobId> {
        let s = args.id.as_deref().ok_or_else(|| Error::invalid(format!("cat {} needs an id", args.kind)))?;
        BlobId::from_hex(s).ok_or_else(|| Error::invalid(format!("{s:?} is not a full 64-digit hex id")))
    };
    let v = match args.kind.as_str() {
        "config" => {
            let c = repo.config();
            serde_json::json!({
                "id": c.id_hex(), "created_secs": c.created_secs, "block_size": c.block_size,
                "pack_target_size": c.pack_target_size, "zstd_level": c.zstd_level,
                "format_version": crate::format::FORMAT_VERSION, "key_epoch": repo.keys().current_epoch(),
            })
        }
        "key" => {
            let id = need_id()?;
            let keys = repo.list_keys()?;
            let (_, kf) = keys.into_iter().find(|(k, _)| *k == id).ok_or(Error::Missing { object: names::key(&id) })?;
            let k = kf?;
            serde_json::json!({
                "created_secs": k.created_secs, "hostname": k.hostname, "username": k.username,
                "kdf": {"algorithm": "argon2id", "memory_kib": k.kdf.memory_kib, "iterations": k.kdf.iterations, "parallelism": k.kdf.parallelism},
                "key_epoch": k.epoch,
            })
        }
        "snapshot" => {
            let r = args.id.as_deref().unwrap_or("latest");
            let (id, s) = repo.find_snapshot(r, None)?;
            let mut v = serde_json::to_value(&s).expect("JSON of plain values");
            v["id"] = serde_json::Value::String(id.hex());
            v
        }
        "index" => {
            let f = repo.load_index(&need_id()?)?;
            serde_json::json!({
                "supersedes": f.supersedes.iter().map(|s| s.hex()).collect::<Vec<_>>(),
                "packs": f.packs.iter().map(|p| serde_json::json!({
                    "id": p.id.hex(), "type": p.pack_type.name(),
                    "blobs": p.entries.iter().map(entry_json).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        }
        "pack" => {
            let id = need_id()?;
            let name = names::pack(&id);
            let size = repo.backend().size(&name)?.ok_or(Error::Missing { object: name })?;
            let h = repo.read_pack_header(&id, size)?;
            serde_json::json!({
                "id": id.hex(), "size": size, "type": h.pack_type.name(),
                "blobs": h.entries.iter().map(entry_json).collect::<Vec<_>>(),
            })
        }
        "verified" => {
            let rec = repo.load_verification(&need_id()?)?;
            serde_json::json!({
                "packs": rec.entries.iter().map(|(id, secs)| serde_json::json!({"pack": id.hex(), "verified_secs": secs})).collect::<Vec<_>>(),
            })
        }
        "damaged" => {
            let rec = repo.load_damage(&need_id()?)?;
            serde_json::json!({
                "copies": rec.entries.iter().map(|(pack, blob)| serde_json::json!({"pack": pack.hex(), "blob": blob.hex()})).collect::<Vec<_>>(),
            })
        }
        _ => unreachable!("clap restricts the values"),
    };
    println!("{}", serde_json::to_string_pretty(&v).expect("JSON of plain values"));
    Ok(())
}
