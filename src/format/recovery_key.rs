//! The recovery key (`key export`, `key recover`): the repository's master secret as text to print or keep
//! offline, so that a repository whose key files are all lost, damaged or forgotten can still be opened. It is
//! not stored in the repository; its text is a contract like the objects' bytes (`format-spec/` §4a).
//!
//! ```text
//! diskvault recovery key v1
//! repository 3b9f…(64 hex digits: the config id)
//! secret 1f2e-3d4c-…(16 groups of 4 hex digits)
//! check 9a3b12fe
//! ```
//!
//! `check` is the first 4 bytes of `blake3::derive_key(CHECK_CONTEXT, secret)`: a mistyped secret is refused
//! before anything is tried with it.

use std::fmt::Write as _;

/// The first line of every recovery key.
pub const FIRST_LINE: &str = "diskvault recovery key v1";
const CHECK_CONTEXT: &str = "diskvault 2026-12 recovery key check";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveryKey {
    /// The config id of the repository the key belongs to.
    pub repository: [u8; 32],
    pub secret: [u8; 32],
}

fn check_of(secret: &[u8; 32]) -> [u8; 4] {
    let k = blake3::derive_key(CHECK_CONTEXT, secret);
    [k[0], k[1], k[2], k[3]]
}

impl RecoveryKey {
    /// The text form, newline-terminated lines.
    pub fn encode(&self) -> String {
        let mut s = format!("{FIRST_LINE}\nrepository {}\nsecret ", hex::encode(self.repository));
        for (i, pair) in self.secret.chunks(2).enumerate() {
            if i > 0 {
                s.push('-');
            }
            let _ = write!(s, "{}", hex::encode(pair));
        }
        let _ = writeln!(s, "\ncheck {}", hex::encode(check_of(&self.secret)));
        s
    }

    /// Parses the text form. Blank lines and lines starting with `#` are skipped; hex digits may be upper or
    /// lower case, and the secret's groups may be separated by dashes or spaces (or not at all).
    pub fn decode(text: &str) -> Result<RecoveryKey, String> {
        let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'));
        match lines.next() {
            Some(FIRST_LINE) => {}
            Some(l) if l.starts_with("diskvault recovery key") => {
                return Err(format!("unsupported recovery key version ({l:?}; this version reads {FIRST_LINE:?})"))
            }
            _ => return Err(format!("not a diskvault recovery key (the first line must be {FIRST_LINE:?})")),
        }
        let (mut repository, mut secret, mut check) = (None, None, None);
        for line in lines {
            let (field, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let digits: String = value.chars().filter(|c| !matches!(c, '-' | ' ' | '\t')).collect();
            let slot = match field {
                "repository" => &mut repository,
                "secret" => &mut secret,
                "check" => &mut check,
                _ => return Err(format!("unknown line {field:?}")),
            };
            if slot.replace(digits).is_some() {
                return Err(format!("{field} is given twice"));
            }
        }
        let repository = hex32("repository", repository)?;
        let secret = hex32("secret", secret)?;
        let check = check.ok_or("no check line")?;
        let mut given = [0u8; 4];
        hex::decode_to_slice(&check, &mut given).map_err(|_| format!("check {check:?} is not 8 hex digits"))?;
        if given != check_of(&secret) {
            return Err("the secret does not match its check digits (mistyped?)".into());
        }
        Ok(RecoveryKey { repository, secret })
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
        RecoveryKey { repository: [7; 32], secret: std::array::from_fn(|i| (i * 9) as u8) }
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
