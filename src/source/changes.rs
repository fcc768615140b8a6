//! Changed-areas files: the byte ranges that changed since a parent backup, in the shape of VMware's
//! `QueryChangedDiskAreas` answer.
//!
//! Accepted JSON forms:
//! - a list of areas: `[{"start": 0, "length": 65536}, …]` (`offset` is accepted for `start`);
//! - VMware's `DiskChangeInfo`: `{"startOffset": 0, "length": N, "changedArea": [{"start":…,"length":…}]}`;
//! - an object with a `changed` list and optionally `disk_size` (checked against the disk), other fields
//!   ignored: what change-tracking exporters and the benchmark workload write.

use std::path::Path;

use serde::Deserialize;

use super::Extent;
use crate::error::{Error, Result};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Area {
    #[serde(alias = "offset")]
    start: u64,
    length: u64,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ChangeFile {
    List(Vec<Area>),
    #[serde(rename_all = "camelCase")]
    DiskChangeInfo {
        #[allow(dead_code)]
        start_offset: Option<u64>,
        #[allow(dead_code)]
        length: Option<u64>,
        changed_area: Vec<Area>,
    },
    Wrapped {
        changed: Vec<Area>,
        disk_size: Option<u64>,
    },
}

/// Reads and validates a changed-areas file against the disk's capacity.
pub fn load(path: &Path, capacity: u64) -> Result<Vec<Extent>> {
    let text = std::fs::read(path).map_err(|e| Error::local(path, format!("cannot read changed-areas file: {e}")))?;
    parse(&text, capacity).map_err(|e| Error::local(path, e))
}

/// Parses and validates the JSON of a changed-areas file.
pub fn parse(text: &[u8], capacity: u64) -> std::result::Result<Vec<Extent>, String> {
    let parsed: ChangeFile = serde_json::from_slice(text).map_err(|e| {
        format!("not a changed-areas file ({e}); expected a JSON list of {{\"start\": N, \"length\": N}} byte ranges")
    })?;
    let areas = match parsed {
        ChangeFile::List(a) => a,
        ChangeFile::DiskChangeInfo { changed_area, .. } => changed_area,
        ChangeFile::Wrapped { changed, disk_size } => {
            if let Some(size) = disk_size.filter(|&s| s != capacity) {
                return Err(format!("the change list is for a disk of {size} bytes, this disk has {capacity}"));
            }
            changed
        }
    };
    let extents: Vec<Extent> = areas.into_iter().map(|a| Extent { start: a.start, length: a.length }).collect();
    validate(&extents, capacity)?;
    Ok(extents)
}

/// Every extent must lie within the disk.
pub fn validate(extents: &[Extent], capacity: u64) -> std::result::Result<(), String> {
    for e in extents {
        match e.start.checked_add(e.length) {
            Some(end) if end <= capacity => {}
            _ => {
                return Err(format!(
                    "changed area {{start: {}, length: {}}} lies outside the disk ({} bytes)",
                    e.start, e.length, capacity
                ))
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str, cap: u64) -> Result<Vec<Extent>> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.json");
        std::fs::write(&p, s).unwrap();
        load(&p, cap)
    }

    #[test]
    fn forms() {
        assert_eq!(parse(r#"[{"start":1,"length":2}]"#, 10).unwrap(), vec![Extent { start: 1, length: 2 }]);
        assert_eq!(parse(r#"[{"offset":1,"length":2}]"#, 10).unwrap(), vec![Extent { start: 1, length: 2 }]);
        let vm = r#"{"startOffset":0,"length":10,"changedArea":[{"start":4,"length":6}]}"#;
        assert_eq!(parse(vm, 10).unwrap(), vec![Extent { start: 4, length: 6 }]);
        assert!(parse(r#"[{"start":5,"length":6}]"#, 10).is_err());
        assert!(parse(r#"[{"start":18446744073709551615,"length":6}]"#, 10).is_err());
        let wrapped = r#"{"disk_size":10,"note":"x","changed":[{"offset":2,"length":3}]}"#;
        assert_eq!(parse(wrapped, 10).unwrap(), vec![Extent { start: 2, length: 3 }]);
        assert!(parse(wrapped, 11).unwrap_err().to_string().contains("disk of 10 bytes"));
        assert!(parse(r#"{"foo": 1}"#, 10).is_err());
        assert!(parse("not json", 10).is_err());
    }
}
