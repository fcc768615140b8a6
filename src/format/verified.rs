//! Verification records (`verified/<id>`): which packs a `check --read-data` run read and found intact, and
//! when. Subset checks read the least recently verified packs first, so repeated `--read-data-subset` runs
//! from any host cover the whole repository.
//!
//! Payload (inside the envelope, kind 6): `count u32 ‖ count × (pack id ‖ verified_secs i64)`.

use super::{ObjectId, Reader};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerificationRecord {
    pub entries: Vec<(ObjectId, i64)>,
}

impl VerificationRecord {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4 + self.entries.len() * 40);
        out.extend_from_slice(&(self.entries.len() as u32).to_le_bytes());
        for (id, secs) in &self.entries {
            out.extend_from_slice(&id.0);
            out.extend_from_slice(&secs.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<VerificationRecord, String> {
        let mut r = Reader::new(bytes);
        let n = r.u32()? as usize;
        if n.saturating_mul(40) != r.remaining() {
            return Err(format!("claims {n} entries but holds {} bytes of entries", r.remaining()));
        }
        let mut entries = Vec::with_capacity(n);
        for _ in 0..n {
            let id = r.id()?;
            let secs = i64::from_le_bytes(r.take(8)?.try_into().unwrap());
            entries.push((id, secs));
        }
        Ok(VerificationRecord { entries })
    }
}
