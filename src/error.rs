//! The library's error type.
//!
//! Every error that concerns stored data names the object (`packs/ab/ab12…`, `snapshots/…`, a disk offset)
//! and the cause, so that a user reading one line knows what is damaged and why.

use std::path::PathBuf;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A stored object exists but its bytes are not what the format says (bad magic, failed authentication,
    /// wrong hash, truncated, unparseable).
    #[error("{object}: {cause}")]
    Corrupt { object: String, cause: String },

    /// A stored object the repository needs does not exist.
    #[error("{object}: not found in the repository")]
    Missing { object: String },

    /// The storage backend failed (I/O error, network, permission, full disk).
    #[error("storage backend: {op} {object}: {cause}")]
    Backend { op: &'static str, object: String, cause: String },

    /// There is no repository at the location.
    #[error("no repository at {0} (create one with `diskvault init`)")]
    NoRepository(String),

    /// A repository already exists where `init` would create one.
    #[error("a repository already exists at {0}")]
    RepositoryExists(String),

    /// No key file could be opened with the password.
    #[error("wrong password: no key in keys/ can be opened with it")]
    WrongPassword,

    /// The object was written by a newer (or unknown) version of the format.
    #[error("{object}: format version {found} is not supported (this diskvault reads up to version {supported})")]
    UnsupportedVersion { object: String, found: u32, supported: u32 },

    /// Reading the disk being backed up failed.
    #[error("source {source_name}: {cause}")]
    Source { source_name: String, cause: String },

    /// A local file (target, changed-areas file, password file…) could not be used.
    #[error("{}: {cause}", path.display())]
    LocalFile { path: PathBuf, cause: String },

    /// The local dedup index cache failed. It is only a cache: the caller may rebuild it.
    #[error("local index cache {}: {cause}", path.display())]
    Cache { path: PathBuf, cause: String },

    /// The request does not make sense (unknown snapshot, ambiguous id, bad option values).
    #[error("{0}")]
    Invalid(String),

    /// A guest file system has no entry at a path (as opposed to one it cannot read: [`Error::Invalid`]).
    #[error("{0}")]
    NotFound(String),

    /// Restore found data it cannot restore; the affected ranges are named.
    #[error("restore of {disk}: {cause}")]
    Restore { disk: String, cause: String },

    /// An exclusive lock is held by someone else; the message names the holder.
    #[error("{0}")]
    Locked(String),

    /// The operation finished, but not everything could be done (a partial restore); the report says what.
    #[error("{0}")]
    Incomplete(String),

    /// A vSphere API call failed: the fault type and message, or what was wrong with the answer.
    #[error("vSphere {call}: {cause}")]
    VSphere { call: String, cause: String },

    /// The user interrupted the operation.
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    pub fn corrupt(object: impl Into<String>, cause: impl std::fmt::Display) -> Self {
        Error::Corrupt { object: object.into(), cause: cause.to_string() }
    }

    /// A damaged object's error with what to do about it appended to its cause; other errors as they are.
    pub fn with_remedy(self, remedy: impl std::fmt::Display) -> Self {
        match self {
            Error::Corrupt { object, cause } => Error::Corrupt { object, cause: format!("{cause}; {remedy}") },
            e => e,
        }
    }

    pub fn backend(op: &'static str, object: impl Into<String>, cause: impl std::fmt::Display) -> Self {
        Error::Backend { op, object: object.into(), cause: cause.to_string() }
    }

    pub fn local(path: impl Into<PathBuf>, cause: impl std::fmt::Display) -> Self {
        Error::LocalFile { path: path.into(), cause: cause.to_string() }
    }

    pub fn source(source_name: impl Into<String>, cause: impl std::fmt::Display) -> Self {
        Error::Source { source_name: source_name.into(), cause: cause.to_string() }
    }

    pub fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }

    /// Process exit code for this error, following restic's conventions where they exist.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::NoRepository(_) => 10,
            Error::WrongPassword => 12,
            Error::Incomplete(_) => 3,
            Error::Locked(_) => 11,
            Error::Interrupted => 130,
            _ => 1,
        }
    }
}
