//! Which guest files a `find` pattern selects (restic's `find`, across snapshots).
//!
//! A pattern is a shell glob (`*`, `?`, `[a-z]`, `**`). Without a `/` it is matched against an entry's name, in
//! any directory (`nginx.conf`, `*.pem`); with one, against its whole guest path, volume first
//! (`/part2/etc/nginx/*`, `/part*/home/**/id_rsa`), where `*` stays within a directory and `**` crosses them.

use crate::error::{Error, Result};
use crate::guestfs::{Entry, GuestFs, Unentered};

/// The patterns of one `find`.
#[derive(Clone)]
pub struct NameMatcher {
    /// Each pattern, and whether it is matched against the whole guest path rather than the name.
    patterns: Vec<(glob::Pattern, bool)>,
    ignore_case: bool,
    /// Modified at or after, and before (seconds since the epoch), where given.
    newer: Option<i64>,
    older: Option<i64>,
}

impl NameMatcher {
    /// `ignore_case` matches as Windows names files (NTFS volumes).
    pub fn new(patterns: &[String], ignore_case: bool) -> Result<NameMatcher> {
        let patterns = patterns
            .iter()
            .map(|p| {
                let pattern = glob::Pattern::new(p)
                    .map_err(|e| Error::invalid(format!("pattern {p:?}: {} (at character {})", e.msg, e.pos)))?;
                Ok((pattern, p.contains('/')))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(NameMatcher { patterns, ignore_case, newer: None, older: None })
    }

    /// The same patterns, matched ignoring case: for a file system whose names are (NTFS, as Windows finds them).
    pub fn ignoring_case(&self) -> NameMatcher {
        NameMatcher { ignore_case: true, ..self.clone() }
    }

    /// Only entries modified at or after `newer` and before `older` (seconds since the epoch), where given.
    pub fn modified_within(self, newer: Option<i64>, older: Option<i64>) -> NameMatcher {
        NameMatcher { newer, older, ..self }
    }

    /// Whether any pattern selects `entry`, modified within the times given.
    pub fn matches(&self, entry: &Entry) -> bool {
        if self.newer.is_some_and(|t| entry.mtime < t) || self.older.is_some_and(|t| entry.mtime >= t) {
            return false;
        }
        let options = glob::MatchOptions {
            case_sensitive: !self.ignore_case,
            require_literal_separator: true,
            require_literal_leading_dot: false,
        };
        let name = String::from_utf8_lossy(&entry.name);
        self.patterns.iter().any(|(p, whole_path)| {
            if *whole_path {
                p.matches_with(&entry.path, options)
            } else {
                p.matches_with(&name, options)
            }
        })
    }

    /// Hands every entry below directory `path` of `fs` that a pattern selects to `found`, depth first and by
    /// name. Returns the directories that could not be searched, as [`GuestFs::walk`] does.
    pub fn search(
        &self,
        fs: &GuestFs,
        path: &[u8],
        found: &mut dyn FnMut(&Entry) -> Result<()>,
    ) -> Result<Vec<Unentered>> {
        fs.walk(path, &mut |_, entry| {
            if crate::util::interrupted() {
                return Err(Error::Interrupted);
            }
            if self.matches(entry) {
                found(entry)?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guestfs::EntryKind;

    fn entry(path: &str) -> Entry {
        Entry {
            path: path.into(),
            name: path.rsplit('/').next().unwrap().as_bytes().to_vec(),
            kind: EntryKind::File,
            size: 0,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nanos: 0,
            target: None,
            target_bytes: Vec::new(),
            inode: None,
            links: 1,
        }
    }

    fn selects(patterns: &[&str], ignore_case: bool, path: &str) -> bool {
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        NameMatcher::new(&patterns, ignore_case).unwrap().matches(&entry(path))
    }

    #[test]
    fn names_match_in_any_directory_and_paths_from_the_volume() {
        assert!(selects(&["nginx.conf"], false, "/part2/etc/nginx/nginx.conf"));
        assert!(selects(&["*.conf"], false, "/part2/etc/nginx/nginx.conf"));
        assert!(
            !selects(&["*.conf"], false, "/part2/etc/nginx.conf.d/default"),
            "a directory's name is not the file's"
        );
        assert!(selects(&["*.pem", "id_rsa"], false, "/part2/home/anna/.ssh/id_rsa"));
        assert!(selects(&[".bash*"], false, "/part2/home/anna/.bashrc"), "dot files match as restic's find does");
        // With a slash: the whole guest path, `*` within one directory, `**` across them.
        assert!(selects(&["/part2/etc/nginx/*"], false, "/part2/etc/nginx/nginx.conf"));
        assert!(!selects(&["/part2/etc/*"], false, "/part2/etc/nginx/nginx.conf"));
        assert!(selects(&["/part*/home/**/id_rsa"], false, "/part2/home/anna/.ssh/id_rsa"));
        assert!(!selects(&["/part3/**/id_rsa"], false, "/part2/home/anna/.ssh/id_rsa"));
        // Case: exact unless asked (or the file system's names ignore it).
        assert!(!selects(&["boot.ini"], false, "/part1/BOOT.INI"));
        assert!(selects(&["boot.ini"], true, "/part1/BOOT.INI"));
        let exact = NameMatcher::new(&["/part1/windows/*.INI".to_string()], false).unwrap();
        assert!(exact.ignoring_case().matches(&entry("/part1/Windows/boot.ini")));
    }

    #[test]
    fn modification_times_bound_what_matches() {
        let mut e = entry("/part2/var/log/syslog");
        e.mtime = 1000;
        let m = |newer, older| NameMatcher::new(&["*".to_string()], false).unwrap().modified_within(newer, older);
        assert!(m(Some(1000), None).matches(&e), "at the time given counts as newer");
        assert!(!m(Some(1001), None).matches(&e));
        assert!(m(None, Some(1001)).matches(&e));
        assert!(!m(None, Some(1000)).matches(&e), "older means before");
        assert!(m(Some(999), Some(1001)).matches(&e));
    }

    #[test]
    fn a_malformed_pattern_is_refused_by_name() {
        let err = NameMatcher::new(&["[a-".to_string()], false).err().expect("refused").to_string();
        assert!(err.contains("pattern \"[a-\""), "{err}");
    }
}
