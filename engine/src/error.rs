//! The engine's error type.
//!
//! Rules: every error names the object it concerns (a file of the repository, a path of
//! the source, a snapshot) and has a [`ErrorKind`] a caller can match on to choose an exit
//! code or a retry. Bytes read from a repository are untrusted: malformed input is
//! [`ErrorKind::Corrupt`], never a panic. A password never appears in an error.

use std::io;
use std::path::PathBuf;

/// What went wrong, coarsely, for callers that branch on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The path holds no repository (no `config`).
    NotARepository,
    /// No key file of the repository opens with the given password.
    WrongPassword,
    /// The repository was written by a newer format version.
    UnsupportedVersion,
    /// Data in the repository failed authentication, decoding or validation.
    Corrupt,
    /// Something asked for does not exist (snapshot, path, key).
    NotFound,
    /// The request itself is invalid (bad argument, ambiguous prefix, refused operation).
    InvalidInput,
    /// Operating-system I/O failure (disk full, permission denied, ...).
    Io,
    /// Another process holds a conflicting lock on the repository.
    Locked,
    /// The repository is not the one this host knew at that location: its master key,
    /// encryption or id changed ([`crate::trust`]).
    IdentityChanged,
    /// The operation was cancelled (by its caller, a user, the scheduler).
    Cancelled,
}

/// The engine's error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{path}: not a cairn repository (no config file); create one with `repo init`")]
    NotARepository { path: PathBuf },

    #[error("wrong password: no key of this repository opens with it")]
    WrongPassword,

    #[error(
        "repository format version {found} is newer than this program supports ({supported}); upgrade cairn"
    )]
    UnsupportedVersion { found: u32, supported: u32 },

    #[error("{what}: {reason}")]
    Corrupt { what: String, reason: String },

    #[error("{0}")]
    NotFound(String),

    #[error("{0}")]
    InvalidInput(String),

    #[error("{0}")]
    Locked(String),

    #[error(
        "{location}: {detail}. Whoever can write the repository's storage could have planted a key \
         of their own, which would let them read every new backup, so nothing was done. If the \
         repository was re-created or re-keyed on purpose, accept it with `repo trust --accept`"
    )]
    IdentityChanged { location: String, detail: String },

    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },

    #[error("cancelled; nothing of this operation was committed")]
    Cancelled,
}

impl Error {
    #[must_use]
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::NotARepository { .. } => ErrorKind::NotARepository,
            Self::WrongPassword => ErrorKind::WrongPassword,
            Self::UnsupportedVersion { .. } => ErrorKind::UnsupportedVersion,
            Self::Corrupt { .. } => ErrorKind::Corrupt,
            Self::NotFound(_) => ErrorKind::NotFound,
            Self::InvalidInput(_) => ErrorKind::InvalidInput,
            Self::Io { .. } => ErrorKind::Io,
            Self::Locked(_) => ErrorKind::Locked,
            Self::IdentityChanged { .. } => ErrorKind::IdentityChanged,
            Self::Cancelled => ErrorKind::Cancelled,
        }
    }

    /// Whether trying the same operation again may succeed (transient I/O).
    #[must_use]
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Io { source, .. } if matches!(
            source.kind(),
            io::ErrorKind::Interrupted | io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
        ))
    }

    pub fn corrupt(what: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Corrupt {
            what: what.into(),
            reason: reason.into(),
        }
    }

    /// An I/O error while doing `what`. A full disk says so in words, since that is what
    /// the reader must act on.
    pub fn io(what: impl Into<String>, source: io::Error) -> Self {
        let mut what = what.into();
        let full = source.raw_os_error() == Some(libc::ENOSPC)
            || source.kind() == io::ErrorKind::StorageFull;
        if full && !what.contains("disk is full") {
            what.push_str(" (the disk is full: free some space, then try again)");
        }
        Self::Io { what, source }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Adds "what was being done" to an `io::Result`.
pub trait IoContext<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for io::Result<T> {
    fn ctx(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::io(what(), e))
    }
}
