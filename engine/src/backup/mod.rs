//! Backups: file trees ([`tree`]), tar archives ingested as trees ([`archive`]), byte
//! streams ([`stream`]) and block images ([`image`]).
//!
//! Content is cut with FastCDC (fixed, aligned chunks for images) and handed in batches
//! to worker threads that hash, deduplicate, compress, encrypt and pack it
//! ([`pipeline`]), while the next batch is read ([`content`]). A snapshot is written
//! only after every pack it refers to is durable.

pub mod archive;
pub mod content;
pub mod delta;
pub mod disks;
pub mod image;
pub mod pipeline;
mod source;
pub mod stream;
pub mod tree;

use std::path::PathBuf;

use serde::Serialize;

/// Something that went wrong with one source entry; the backup went on without it.
#[derive(Debug, Clone, Serialize)]
pub struct Warning {
    pub path: PathBuf,
    pub message: String,
    /// Whether the entry is missing from the snapshot (an error) or only suspect.
    pub lost: bool,
}

/// Warnings gathered from many threads; each is logged as it comes, and one that lost
/// data is counted in the progress display.
#[derive(Default)]
pub(crate) struct Warnings(std::sync::Mutex<Vec<Warning>>);

impl Warnings {
    pub(crate) fn add(
        &self,
        path: &std::path::Path,
        message: String,
        lost: bool,
        progress: &crate::progress::Progress,
    ) {
        tracing::warn!("{}: {message}", path.display());
        if lost {
            crate::progress::Progress::add(&progress.errors, 1);
        }
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Warning {
                path: path.to_owned(),
                message,
                lost,
            });
    }

    pub(crate) fn into_vec(self) -> Vec<Warning> {
        self.0
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The root tree of a stream or image snapshot: one file, owned by whoever backs it up,
/// stamped now. Saved; returns the tree's id and the bytes it added.
pub(crate) fn save_single_file_tree(
    saver: &crate::saver::BlobSaver<'_>,
    name: Vec<u8>,
    size: u64,
    content: Vec<crate::tree::Extent>,
    now: chrono::DateTime<chrono::Utc>,
) -> crate::Result<(crate::id::BlobId, u64)> {
    use crate::tree::{Node, NodeKind, Timestamp, Tree};
    let stamp = Timestamp {
        sec: now.timestamp(),
        nsec: now.timestamp_subsec_nanos(),
    };
    let node = Node {
        mode: 0o600,
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        user: Some(crate::repository::current_user()),
        mtime: stamp,
        ctime: stamp,
        size,
        content,
        ..Node::new(name, NodeKind::File)
    };
    saver.save_tree(Tree { nodes: vec![node] })
}

/// The newest snapshot of `kind` named `name` from `host`: the parent of a named backup.
pub(crate) fn latest_named(
    repo: &crate::Repository,
    kind: crate::snapshot::SnapshotKind,
    host: &str,
    name: &str,
) -> crate::Result<Option<crate::snapshot::Snapshot>> {
    Ok(repo.snapshots()?.into_iter().rev().find(|s| {
        s.manifest.kind == kind
            && s.manifest.host == host
            && s.manifest.name.as_deref() == Some(name)
    }))
}

/// Milliseconds since `started`, for summaries.
pub(crate) fn elapsed_ms(started: std::time::Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// Writes the manifest (the commit point of every backup) and returns the outcome.
pub(crate) fn commit(
    repo: &crate::Repository,
    manifest: crate::snapshot::Manifest,
    warnings: Vec<Warning>,
) -> crate::Result<BackupOutcome> {
    repo.ensure_lock_held()?;
    let id = repo.save_snapshot(&manifest)?;
    // The shards this backup wrote to are in the page cache now: record their stamps so
    // that the next command need not list them. (Not for a partial index: that would
    // read the trailers its lazy open saved.)
    if !repo.index_is_partial() {
        if let Err(e) = repo.sync_index() {
            tracing::warn!("index shard stamps not recorded: {e}");
        }
    }
    Ok(BackupOutcome {
        snapshot: crate::snapshot::Snapshot { id, manifest },
        warnings,
    })
}

pub use archive::{backup_tar, ArchiveBackupOptions};
pub use disks::{backup_disk_set, disk_set_parent, DiskInput, DiskOutcome, DiskSetOptions};
pub use image::{backup_image, image_parent, BlockRegion, BlockSource, ImageBackupOptions};
pub use stream::{backup_stream, StreamBackupOptions};
pub use tree::{backup_tree, BackupOutcome, TreeBackupOptions};
