//! Storage backends: where the repository's files live.
//!
//! The trait is small and synchronous. Contract of every implementation:
//! - `write` is atomic and durable when it returns: readers see the whole file or none,
//!   and a crash after the return cannot lose it.
//! - Files are immutable once written, with three exceptions, each replaced whole and
//!   atomically by `write`: `config` (by a format upgrade), a lock file (by its holder at
//!   each refresh and when it turns exclusive) and a damage mark (by `repair`). Packs,
//!   snapshots and key files are never rewritten, only removed.
//! - `create` starts a file written in pieces ([`NewFile`]) and named only once complete
//!   (a pack, named by the hash of its bytes): the same guarantees hold from
//!   [`NewFile::commit`] on, and a file never committed is never seen.
//! - `read_at` returns exactly `len` bytes or an error (`UnexpectedEof` for a short file).
//! - `list` returns the names (no directories) of every complete file of a kind.
//! - Nothing is cached here: caching is a decorator's job.
//!
//! [`LocalBackend`] keeps a repository in a directory of a filesystem ([`fs::Fs`]): the
//! operating system's ([`fs::RealFs`]), or for tests an in-memory one that models power
//! loss and injects faults ([`sim::SimFs`]).

pub mod crash;
pub mod directed;
pub mod fs;
mod local;
pub mod read_cache;
#[cfg(feature = "remote")]
pub mod remote;
#[cfg(feature = "s3")]
pub mod s3;
pub mod sim;
pub mod url;

use std::io::{self, Write};
use std::sync::Arc;

use crate::id::{BlobId, PackId};
pub use local::LocalBackend;
pub use url::{RepositoryUrl, S3Location, UrlError};

/// What opening a backend may need beyond its URL.
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    /// Keys for an `s3://` repository (`None`: anonymous requests).
    #[cfg(feature = "s3")]
    pub s3_credentials: Option<s3::S3Credentials>,
    /// The token and trust of an `https://` repository server.
    #[cfg(feature = "remote")]
    pub remote: remote::RemoteOptions,
}

/// The backend of the repository at `url`.
pub fn open(url: &RepositoryUrl, options: &BackendOptions) -> io::Result<Arc<dyn Backend>> {
    let _ = options;
    match url {
        RepositoryUrl::Local(path) => Ok(Arc::new(LocalBackend::new(
            std::path::absolute(path).unwrap_or_else(|_| path.clone()),
        ))),
        #[cfg(feature = "s3")]
        RepositoryUrl::S3(location) => Ok(Arc::new(s3::S3Backend::new(
            location,
            options.s3_credentials.as_ref(),
        )?)),
        #[cfg(not(feature = "s3"))]
        RepositoryUrl::S3(_) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "this build has no S3 support (the engine's `s3` feature)",
        )),
        #[cfg(feature = "remote")]
        RepositoryUrl::Remote(url) => {
            Ok(Arc::new(remote::RemoteBackend::new(url, &options.remote)?))
        }
        #[cfg(not(feature = "remote"))]
        RepositoryUrl::Remote(url) => Err(io::Error::new(
            io::ErrorKind::Unsupported,
            format!("{url}: this build has no repository-server support (the `remote` feature)"),
        )),
    }
}

/// The kinds of file a repository holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    Config,
    Key,
    Pack,
    Snapshot,
    Lock,
    /// Damage marks written by `repair` (`damage/<snapshot id>`).
    Damage,
}

impl FileKind {
    #[must_use]
    pub fn dir(self) -> &'static str {
        match self {
            Self::Config => "",
            Self::Key => "keys",
            Self::Pack => "data",
            Self::Snapshot => "snapshots",
            Self::Lock => "locks",
            Self::Damage => "damage",
        }
    }
}

/// A place to keep a repository's files. See the module docs for the contract.
pub trait Backend: Send + Sync {
    /// Human-readable location, for messages.
    fn location(&self) -> String;
    /// Prepares the place of a new repository (a local backend makes its directories).
    fn create_layout(&self) -> io::Result<()> {
        Ok(())
    }
    /// Reads a whole file.
    fn read(&self, kind: FileKind, name: &str) -> io::Result<Vec<u8>>;
    /// Reads `len` bytes at `offset`.
    fn read_at(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Size of a file in bytes.
    fn size(&self, kind: FileKind, name: &str) -> io::Result<u64>;
    /// Writes a whole file atomically and durably (see module docs).
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> io::Result<()>;
    /// Starts a file of `kind` to be written in pieces and named at the end. The default
    /// keeps the pieces in memory and calls [`Backend::write`] on commit; a backend that
    /// can stream to storage does so, and memory stays flat whatever the file's size.
    fn create(&self, kind: FileKind) -> io::Result<Box<dyn NewFile + '_>> {
        Ok(Box::new(BufferedFile {
            backend: self,
            kind,
            data: Vec::new(),
        }))
    }
    /// Names of all files of a kind.
    fn list(&self, kind: FileKind) -> io::Result<Vec<String>>;
    /// Packs are spread over shards (`data/XX/`, XX the first byte of the id in hex).
    /// Each shard with a stamp that changes whenever a pack is added to or removed from
    /// it (a local directory's modification time, in ns), so that a reader can list only
    /// the shards that changed since it last looked. `None`: no such stamps; list all.
    fn pack_shards(&self) -> io::Result<Option<Vec<(String, i64)>>> {
        Ok(None)
    }
    /// The packs of one shard named by [`Backend::pack_shards`].
    fn list_pack_shard(&self, shard: &str) -> io::Result<Vec<String>> {
        Ok(self
            .list(FileKind::Pack)?
            .into_iter()
            .filter(|n| n.starts_with(shard))
            .collect())
    }
    /// Removes a file; removing a missing file is not an error.
    fn remove(&self, kind: FileKind, name: &str) -> io::Result<()>;
    /// Moves a damaged file out of the repository's view (kept for forensics), into
    /// `quarantine/` for a local repository.
    fn quarantine(&self, kind: FileKind, name: &str) -> io::Result<()>;
    /// When a file was written.
    fn modified(&self, kind: FileKind, name: &str) -> io::Result<std::time::SystemTime>;
    /// Removes incomplete files (a writer killed mid-write) older than `age`; returns how
    /// many and their bytes.
    fn remove_incomplete(&self, age: std::time::Duration) -> io::Result<(u64, u64)>;
    /// The longest read that should cover several blobs (a restore joins neighbours up
    /// to it): on a local disk 1 MiB keeps reads parallel; on a network store each
    /// request costs a round trip and money, so reads are larger.
    fn read_size_hint(&self) -> u64 {
        1 << 20
    }
    /// The storage under a cache ([`read_cache::ReadCache`]): what reads once and
    /// would only fill the cache (a restore) reads from it. `None`: not a cache.
    fn uncached(&self) -> Option<&dyn Backend> {
        None
    }
    /// The storage's directory of blobs, where it keeps one (a repository server):
    /// known-chunk negotiation. `None` (the default): the index alone answers.
    fn directory(&self) -> Option<&dyn BlobDirectory> {
        None
    }
}

/// Where the storage says blobs are: a repository server's record of the blob ids each
/// pack holds, reported by the clients that wrote them (the server cannot read a
/// trailer). A client asks it before it uploads, so that blobs another host stored,
/// or that this host's partial index does not list, are not sent again.
///
/// The answers are hints. A pack a client reports is only bytes the server cannot
/// check, so the engine believes a blob is stored only once it has read the named
/// pack's trailer and authenticated it with the master key ([`crate::Repository`]).
pub trait BlobDirectory: Send + Sync {
    /// Records that the pack `pack`, already stored, holds `blobs`.
    fn report(&self, pack: &PackId, blobs: &[BlobId]) -> io::Result<()>;
    /// Of `ids`, those the storage knows, each with a pack said to hold it.
    fn locate(&self, ids: &[BlobId]) -> io::Result<Vec<(BlobId, PackId)>>;
}

/// Refuses a name that is not one file's name in its kind's directory (`..`, `a/b`, a
/// hidden temporary file).
pub(crate) fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid repository file name {name:?}"),
        ));
    }
    Ok(())
}

/// A file being written whose name is known only when it is complete. Dropping it
/// without [`NewFile::commit`] discards it.
pub trait NewFile: Write + Send {
    /// Makes the file durable and visible as `name`, atomically (see module docs).
    fn commit(self: Box<Self>, name: &str) -> io::Result<()>;
}

/// [`Backend::create`] for a backend that cannot stream: the bytes wait in memory.
struct BufferedFile<'b, B: Backend + ?Sized> {
    backend: &'b B,
    kind: FileKind,
    data: Vec<u8>,
}

impl<B: Backend + ?Sized> Write for BufferedFile<'_, B> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.data.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<B: Backend + ?Sized> NewFile for BufferedFile<'_, B> {
    fn commit(self: Box<Self>, name: &str) -> io::Result<()> {
        self.backend.write(self.kind, name, &self.data)
    }
}
