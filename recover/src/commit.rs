//! `repo recover commit`: a writable database session's current state, backed up as a
//! new snapshot of the same source (a repaired database becomes a backup).
//!
//! The server is frozen for the backup (`docker pause`, or SIGSTOP to its process
//! group), so that the data directory holds one crash-consistent state, as a storage
//! snapshot would: the committed snapshot recovers the way a power cut would, with the
//! WAL (or redo log) replayed. It is thawed again whatever happens. The backup compares
//! with the session's snapshot by size and times (the layer numbers inodes afresh): a
//! file the session never changed is not read at all, and what it changed dedups
//! against the parent. Of a changed file only the ranges the layer says changed are
//! read ([`cairn_mount::layer::changes`]): the rest keeps the chunks of the file it
//! came from in the session's snapshot. Lock files of the running server are left out.

use std::collections::HashMap;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use cairn_engine::backup::delta::{Changes, FileDelta, KnownChanges};
use cairn_engine::backup::{backup_tree, TreeBackupOptions};
use cairn_engine::progress::Progress;
use cairn_engine::snapshot::Snapshot;
use cairn_engine::tree::{Extent, NodeKind};
use cairn_engine::Repository;
use cairn_mount::layer::changes;

use crate::runtime;
use crate::state::Store;
use crate::RecoverError;

/// What the committed snapshot's manifest records about where it came from.
pub const META_SESSION: &str = "recover.session";
pub const META_FROM: &str = "recover.from";

/// Files of a running server that a snapshot must not hold.
const EXCLUDES: &[&str] = &["postmaster.pid", "postmaster.opts", "*.pid", "mysql.sock"];

/// Thaws the server when dropped.
struct Frozen<'r> {
    runtime: &'r dyn runtime::ServerRuntime,
    rec: &'r crate::SessionRecord,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        if let Err(e) = self.runtime.pause(self.rec, false) {
            tracing::error!("thawing the server of session {}: {e}", self.rec.id);
        }
    }
}

/// Backs up session `id`'s data directory into `repo` as a new snapshot of the session's
/// source, tagged with `tags` as well as the original's.
pub fn commit(
    store: &Store,
    repo: &Repository,
    id: &str,
    tags: &[String],
) -> Result<Snapshot, RecoverError> {
    let rec = store
        .get(id)?
        .ok_or_else(|| RecoverError::NoSession(id.to_owned()))?;
    if rec.is_vm() {
        return Err(RecoverError::Setup(
            "commit takes a database session (a VM's copy is kept with `repo recover promote`)"
                .into(),
        ));
    }
    if !rec.writable {
        return Err(RecoverError::Setup(format!(
            "session {id} is read-only: nothing to commit (start one with --writable)"
        )));
    }
    let original = repo
        .snapshots()
        .map_err(engine)?
        .into_iter()
        .find(|s| s.id.to_hex() == rec.snapshot)
        .ok_or_else(|| {
            RecoverError::Setup(format!(
                "snapshot {} of session {id} is no longer in the repository",
                &rec.snapshot[..8.min(rec.snapshot.len())]
            ))
        })?;
    let docker = crate::docker::Docker::connect().ok();
    let runtime = runtime::for_record(&rec, docker.as_ref())?
        .ok_or_else(|| RecoverError::Setup(format!("session {id} has no server")))?;
    let mut meta = original.manifest.meta.clone();
    meta.insert(META_SESSION.into(), rec.id.clone());
    meta.insert(META_FROM.into(), rec.snapshot.clone());
    let mut all_tags = original.manifest.tags.clone();
    all_tags.extend(tags.iter().cloned());
    let opts = TreeBackupOptions {
        paths: vec![rec.merged()],
        excludes: EXCLUDES.iter().map(|s| (*s).to_owned()).collect(),
        host: Some(original.manifest.host.clone()),
        tags: all_tags,
        parent: Some(original.id),
        root_name: original.manifest.name.clone(),
        meta,
        ignore_inodes: true,
        changes: Some(Changes(Arc::new(LayerChanges::of(repo, &original)?))),
        ..Default::default()
    };
    runtime.pause(&rec, true)?;
    let frozen = Frozen {
        runtime: runtime.as_ref(),
        rec: &rec,
    };
    let outcome = backup_tree(repo, &opts, &Progress::default()).map_err(engine)?;
    drop(frozen);
    for w in &outcome.warnings {
        tracing::warn!("commit of session {id}: {w:?}");
    }
    Ok(outcome.snapshot)
}

/// A session's layer as a source of known changes: the daemon says what changed in a
/// file and where it came from; the session's snapshot has that file's chunks.
struct LayerChanges {
    /// Every file of the snapshot by its path relative to the root, with its content.
    files: HashMap<Vec<u8>, Vec<Extent>>,
}

impl LayerChanges {
    fn of(repo: &Repository, snapshot: &Snapshot) -> Result<Self, RecoverError> {
        let files = cairn_engine::walk::collect(
            repo,
            &snapshot.manifest.root,
            Path::new(""),
            &|_, n| matches!(n.kind, NodeKind::Dir | NodeKind::File),
            &|p, n| (p.as_os_str().as_bytes().to_vec(), n),
        )
        .map_err(engine)?
        .into_iter()
        .filter(|(_, n)| n.kind == NodeKind::File)
        .map(|(p, n)| (p, n.content))
        .collect();
        Ok(Self { files })
    }
}

impl KnownChanges for LayerChanges {
    fn delta(&self, path: &Path, _size: u64) -> Option<FileDelta> {
        let found = match changes::read(path) {
            Ok(c) => c?,
            Err(e) => {
                tracing::warn!("{}: reading it whole: {e}", path.display());
                return None;
            }
        };
        let base = self.files.get(&found.origin)?.clone();
        Some(FileDelta {
            base,
            changed: found.changed,
        })
    }
}

fn engine(e: cairn_engine::Error) -> RecoverError {
    RecoverError::Setup(format!("backing up the session: {e}"))
}
