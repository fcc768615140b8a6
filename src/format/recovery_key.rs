//! The recovery key (`key export`, `key recover`): the repository's keyring (its master secret, and one more
//! per `key rotate`) as text to print or keep offline, so that a repository whose key files are all lost,
//! damaged or forgotten can still be opened. It is not stored in the repository; its text is a contract like the
//! objects' bytes (`format-spec/` §4a).
//!
//! ```text
//! diskvault recovery key v1
//! repository 3b9f…(64 hex digits: the config id)
//! secret 1f2e-3d4c-…(16 groups of 4 hex digits)
//! check 9a3b12fe
//! ```
//!
//! A rotated repository's key says `v2` and has one `secret` line per key epoch, epoch 0 first. `check` is the
//! first 4 bytes of `blake3::derive_key(CHECK_CONTEXT, secret 0 ‖ secret 1 ‖ …)`: a mistyped secret is refused
//! before anything is tried with it.

use std::fmt::Write as _;

/// The first line of the recovery key of a repository never rotated.
pub const FIRST_LINE: &str = "diskvault recovery key v1";
/// The first line of the recovery key of a rotated repository (a keyring of several secrets).
pub const FIRST_LINE_V2: &str = "diskvault recovery key v2";
const CHECK_CONTEXT: &str = "diskvault 2026-12 recovery key check";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryKey {
    /// The config id of the repository the key belongs to.
    pub repository: [u8; 32],
    /// The keyring, epoch 0 first: one secret or more.
    pub secrets: Vec<[u8; 32]>,
}

fn check_of(secrets: &[[u8; 32]]) -> [u8; 4] {
    let k = blake3::derive_key(CHECK_CONTEXT, secrets.as_flattened());
    [k[0], k[1], k[2], k[3]]
}

impl RecoveryKey {
    /// The text form, newline-terminated lines.
    pub fn encode(&self) -> String {
        let first = if self.secrets.len() == 1 { FIRST_LINE } else { FIRST_LINE_V2 };
        let mut s = format!("{first}\nrepository {}\n", hex::encode(self.repository));
        for secret in &self.secrets {
            s.push_str("secret ");
            for (i, pair) in secret.chunks(2).enumerate() {
                if i > 0 {
                    s.push('-');
                }
                let _ = write!(s, "{}", hex::encode(pair));
            }
            s.push('\n');
        }
        let _ = writeln!(s, "check {}", hex::encode(check_of(&self.secrets)));
        s
    }

    /// Parses the text form. Blank lines and lines starting with `#` are skipped; hex digits may be upper or
    /// lower case, and the secret's groups may be separated by dashes or spaces (or not at all).
    pub fn decode(text: &str) -> Result<RecoveryKey, String> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
        let rotated = match lines.next() {
            Some(FIRST_LINE) => false,
            Some(FIRST_LINE_V2) => true,
            Some(l) if l.starts_with("diskvault recovery key") => {
                return Err(format!(
                    "unsupported recovery key version ({l:?}; this version reads {FIRST_LINE:?} and {FIRST_LINE_V2:?})"
                ))
            }
            _ => return Err(format!("not a diskvault recovery key (the first line must be {FIRST_LINE:?})")),
        };
        let (mut repository, mut check) = (None, None);
        let mut secrets = Vec::new();
        for line in lines {
            let (field, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let digits: String = value.chars().filter(|c| !matches!(c, '-' | ' ' | '\t')).collect();
            let slot = match field {
                "repository" => &mut repository,
                "secret" if rotated => {
                    secrets.push(hex32("secret", Some(digits))?);
                    continue;
                }
                "secret" if secrets.is_empty() => {
                    secrets.push(hex32("secret", Some(digits))?);
                    continue;
                }
                "check" => &mut check,
                "secret" => return Err("secret is given twice (a v1 key holds one)".into()),
                _ => return Err(format!("unknown line {field:?}")),
            };
            if slot.replace(digits).is_some() {
                return Err(format!("{field} is given twice"));
            }
        }
        let repository = hex32("repository", repository)?;
        match (rotated, secrets.len()) {
            (_, 0) => return Err("no secret line".into()),
            (true, 1) => return Err("a v2 key holds two secrets or more (one line was lost?)".into()),
            (_, n) if n > crate::crypto::MAX_EPOCHS => return Err(format!("{n} secrets, more than a keyring holds")),
            _ => {}
        }
        let check = check.ok_or("no check line")?;
        let mut given = [0u8; 4];
        hex::decode_to_slice(&check, &mut given).map_err(|_| format!("check {check:?} is not 8 hex digits"))?;
        if given != check_of(&secrets) {
            return Err("the secret does not match its check digits (mistyped?)".into());
        }
        Ok(RecoveryKey { repository, secrets })
    }
}

fn hex32(field: &str, digits: Option<String>) -> Result<[u8; 32], String> {
    let digits = digits.ok_or_else(|| format!("no {field} line"))?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(&digits, &mut out).map_err(|_| format!("{field} is not 64 hex digits"))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> RecoveryKey {
        RecoveryKey { repository: [7; 32], secrets: vec![std::array::from_fn(|i| (i * 9) as u8)] }
    }

    #[test]
    fn a_rotated_keyring_round_trips_as_v2_and_a_lost_line_is_refused() {
        let k = RecoveryKey { repository: [7; 32], secrets: vec![[1; 32], [2; 32], [3; 32]] };
        let text = k.encode();
        assert!(text.starts_with(FIRST_LINE_V2));
        assert_eq!(text.lines().filter(|l| l.starts_with("secret")).count(), 3);
        assert_eq!(RecoveryKey::decode(&text), Ok(k));
        // One secret line lost (or the lines swapped): the check digits cover every secret, in order.
        let lines: Vec<&str> = text.lines().collect();
        let lost: String = lines.iter().enumerate().filter(|(i, _)| *i != 3).map(|(_, l)| format!("{l}\n")).collect();
        assert!(RecoveryKey::decode(&lost).unwrap_err().contains("check digits"));
        let swapped = text.replacen(lines[2], "X", 1).replacen(lines[3], lines[2], 1).replacen('X', lines[3], 1);
        assert!(RecoveryKey::decode(&swapped).unwrap_err().contains("check digits"));
    }

    #[test]
    fn round_trips_and_reads_what_people_type() {
        let k = key();
        let text = k.encode();
        assert_eq!(text.lines().count(), 4);
        assert_eq!(RecoveryKey::decode(&text), Ok(k.clone()));
        // Retyped: upper case, spaces for dashes, a comment, blank lines.
        let retyped = format!("# from the safe\n\n{}", text.to_uppercase().replace('-', " "))
            .replace("DISKVAULT RECOVERY KEY V1", FIRST_LINE)
            .replace("REPOSITORY", "repository")
            .replace("SECRET", "secret")
            .replace("CHECK", "check");
        assert_eq!(RecoveryKey::decode(&retyped), Ok(k));
    }

    #[test]
    fn typos_and_other_texts_are_refused() {
        let text = key().encode();
        let secret_line = text.lines().find(|l| l.starts_with("secret")).unwrap();
        let typo = secret_line.replacen('1', "7", 1);
        assert_ne!(typo, secret_line);
        let e = RecoveryKey::decode(&text.replace(secret_line, &typo)).unwrap_err();
        assert!(e.contains("check digits"), "{e}");
        let short = text.replace(secret_line, &secret_line[..secret_line.len() - 2]);
        assert!(RecoveryKey::decode(&short).unwrap_err().contains("64 hex digits"));
        assert!(RecoveryKey::decode("hello").unwrap_err().contains("not a diskvault recovery key"));
        assert!(RecoveryKey::decode("diskvault recovery key v9").unwrap_err().contains("unsupported"));
        let no_check: String = text.lines().filter(|l| !l.starts_with("check")).map(|l| format!("{l}\n")).collect();
        assert!(RecoveryKey::decode(&no_check).unwrap_err().contains("no check line"));
        let twice = format!("{text}{secret_line}\n");
        assert!(RecoveryKey::decode(&twice).unwrap_err().contains("twice"));
    }
}
