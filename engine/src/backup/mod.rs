//! Backups: file trees ([`tree`]) and byte streams ([`stream`]).
//!
//! Both cut content with FastCDC and hand chunks to a [`BlobSaver`] in batches that are
//! hashed, compressed and encrypted in parallel on rayon, while the next batch is read
//! ([`content`]). A snapshot is written only after every pack it refers to is durable.

pub mod content;
pub mod image;
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

pub use image::{backup_image, BlockRegion, BlockSource, ImageBackupOptions};
pub use stream::{backup_stream, StreamBackupOptions};
pub use tree::{backup_tree, BackupOutcome, TreeBackupOptions};
