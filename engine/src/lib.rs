//! # cairn-engine: the repository
//!
//! Everything that reads or writes a cairn repository, and nothing else: no CLI, no FUSE,
//! no subprocesses. The engine stores **file trees** and **streams** (block images come
//! next); it does not know what a VM or a database is.
//!
//! A tour, from the bottom up:
//! - [`id`]: typed 32-byte ids (`BlobId`, `PackId`, `SnapshotId`, ...).
//! - [`crypto`], [`keyfile`]: the master key, AES-256-GCM sealing, keyed BLAKE3 ids,
//!   argon2id-wrapped key files.
//! - [`store`]: where files live (a local directory; in tests an in-memory filesystem that
//!   models power loss and injects faults), with atomic durable writes.
//! - [`config`]: the repository's parameters and format version.
//! - [`chunker`], [`blob`], [`pack`]: cutting content, encoding blobs, packing them.
//! - [`index`]: the SQLite blob index, a cache rebuilt from pack trailers.
//! - [`cache`]: a host's cache of a repository (index, manifests), outside it.
//! - [`tree`], [`snapshot`]: directory listings and snapshot manifests.
//! - [`repository`]: the facade that opens all of the above.
//! - [`saver`], [`backup`], [`restore`], [`walk`], [`diff`], [`check`], [`retention`]: the
//!   commands' engines.
//!
//! The on-disk format is specified byte by byte in `docs/FORMAT.md`.

pub mod backup;
pub mod blob;
pub mod cache;
pub mod check;
pub mod chunker;
pub mod config;
pub mod copy;
pub mod crypto;
pub mod damage;
pub mod diff;
pub mod error;
pub mod forget;
pub mod host;
pub mod id;
pub mod index;
pub mod keyfile;
pub mod lock;
pub mod pack;
pub mod progress;
pub mod prune;
pub mod repair;
pub mod repository;
pub mod restore;
pub mod retention;
pub mod saver;
pub mod snapshot;
pub mod store;
pub mod threads;
pub mod tree;
pub mod trust;
pub mod walk;

pub use error::{Error, ErrorKind, Result};
pub use repository::Repository;

/// What the crate's unit tests share.
#[cfg(test)]
pub(crate) mod test_util;
