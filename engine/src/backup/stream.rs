//! Backing up one byte stream (a pg_dump, a tar, anything read from a pipe).
//!
//! The snapshot's root tree holds a single file named after the stream, so listing,
//! `cat`, restore and the mount treat a stream like a one-file tree.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::Instant;

use chrono::Utc;

use super::content::{save_content, ContentError};
use super::pipeline::{with_workers, BATCH_BYTES};
use super::BackupOutcome;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repository::{current_host, Repository};
use crate::saver::BlobSaver;
use crate::snapshot::{Manifest, SnapshotKind, Summary};
use crate::tree::is_valid_name;

#[derive(Debug, Clone, Default)]
pub struct StreamBackupOptions {
    pub name: String,
    pub host: Option<String>,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
}

/// Reads `reader` to its end and stores it as a stream snapshot. A read error fails the
/// backup: no snapshot of half a stream.
pub fn backup_stream<R: Read + Send>(
    repo: &Repository,
    opts: &StreamBackupOptions,
    reader: R,
    progress: &Progress,
) -> Result<BackupOutcome> {
    let started = Instant::now();
    if !is_valid_name(opts.name.as_bytes()) {
        return Err(Error::InvalidInput(format!(
            "stream name {:?} must be a single file name (no '/')",
            opts.name
        )));
    }
    let host = opts.host.clone().unwrap_or_else(current_host);
    let saver = BlobSaver::new(repo);
    let mut content = Vec::new();
    let size = with_workers(&saver, |workers| {
        save_content(
            workers,
            repo.config().chunker,
            reader,
            BATCH_BYTES as u64,
            progress,
            &mut content,
        )
    })
    .map_err(|e| match e {
        ContentError::Source(e) => Error::io(format!("reading stream {:?}", opts.name), e),
        ContentError::Repo(e) => e,
    })?;
    let now = Utc::now();
    let (root, stored) =
        super::save_single_file_tree(&saver, opts.name.as_bytes().to_vec(), size, content, now)?;
    Progress::add(&progress.bytes_stored, stored);
    saver.flush()?;
    let stats = saver.stats();
    let parent = super::latest_named(repo, SnapshotKind::Stream, &host, &opts.name)?.map(|s| s.id);
    let summary = Summary {
        files: 1,
        total_bytes: size,
        bytes_read: size,
        blobs_new: stats.blobs_new,
        bytes_new: stats.bytes_new,
        bytes_stored: stats.bytes_stored,
        duration_ms: super::elapsed_ms(started),
        ..Summary::default()
    };
    let manifest = Manifest {
        time: now,
        parent,
        summary,
        meta: opts.meta.clone(),
        ..Manifest::named(
            SnapshotKind::Stream,
            &opts.name,
            host,
            opts.tags.clone(),
            root,
        )
    };
    super::commit(repo, manifest, Vec::new())
}
