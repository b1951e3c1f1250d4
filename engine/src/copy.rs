//! Copying snapshots from one repository to another (`repo copy`), keys and backends
//! of either side of the caller's choice.
//!
//! Blob ids are keyed hashes, so the same content has another id in a repository with
//! another master key: a copy reads each blob from the source, saves it in the
//! destination (which stores it only when it lacks it: the destination's own dedup), and
//! rewrites every tree with the destination's ids. Extent-list blobs are remade by the
//! destination's saver from the loaded trees. The copied manifest keeps time, host,
//! paths, tags and summary, and records the source snapshot in `meta["copied_from"]`:
//! a snapshot already copied is skipped, so running a copy again transfers nothing, and
//! a copy stopped midway keeps the packs it wrote (the next run finds their blobs in the
//! destination's index and does not store them again).
//!
//! Dedup across the two repositories' own backups needs the same chunker parameters
//! (`repo init --copy-chunker-params-from`, to come); blobs are copied as they are cut in
//! the source either way.

use std::collections::{HashMap, HashSet};

use crate::blob::BlobKind;
use crate::error::Result;
use crate::id::{BlobId, SnapshotId};
use crate::saver::BlobSaver;
use crate::snapshot::Snapshot;
use crate::tree::MAX_DEPTH;
use crate::Repository;

/// The key of a copied manifest's `meta` naming the snapshot it was copied from.
pub const COPIED_FROM: &str = "copied_from";

/// What a copy did.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct CopyReport {
    /// (source snapshot, new snapshot in the destination).
    pub copied: Vec<(SnapshotId, SnapshotId)>,
    /// Source snapshots the destination already had a copy of.
    pub skipped: Vec<SnapshotId>,
    /// Blobs read from the source.
    pub blobs_read: u64,
    /// Blobs the destination lacked, and their bytes as stored there.
    pub blobs_new: u64,
    pub bytes_stored: u64,
}

/// The newest `n` of `snapshots` of each host and source (paths and name), oldest
/// first: what `--latest N` copies.
#[must_use]
pub fn newest_of_each_source(snapshots: Vec<Snapshot>, n: usize) -> Vec<Snapshot> {
    let mut groups: std::collections::BTreeMap<String, Vec<Snapshot>> = Default::default();
    for s in snapshots {
        let key = format!(
            "{}\0{}\0{}",
            s.manifest.host,
            s.manifest.paths.join("\0"),
            s.manifest.name.clone().unwrap_or_default()
        );
        groups.entry(key).or_default().push(s);
    }
    let mut chosen: Vec<Snapshot> = groups
        .into_values()
        .flat_map(|mut g| {
            g.sort_by_key(|s| s.manifest.time);
            let skip = g.len().saturating_sub(n);
            g.into_iter().skip(skip)
        })
        .collect();
    chosen.sort_by_key(|s| s.manifest.time);
    chosen
}

/// The source snapshots that `to` has copies of.
pub fn already_copied(to: &Repository) -> Result<HashSet<SnapshotId>> {
    Ok(to
        .snapshots()?
        .iter()
        .filter_map(|s| s.manifest.meta.get(COPIED_FROM)?.parse().ok())
        .collect())
}

/// Copies `snapshots` of `from` into `to` (each one once: those `to` has a copy of are
/// skipped). The caller holds a shared lock on both.
pub fn copy_snapshots(
    from: &Repository,
    to: &Repository,
    snapshots: &[Snapshot],
) -> Result<CopyReport> {
    let done = already_copied(to)?;
    let mut report = CopyReport::default();
    let saver = BlobSaver::new(to);
    let mut ids: HashMap<BlobId, BlobId> = HashMap::new();
    for snap in snapshots {
        if done.contains(&snap.id) {
            report.skipped.push(snap.id);
            continue;
        }
        let mut copier = Copier {
            from,
            saver: &saver,
            ids: &mut ids,
            blobs_read: 0,
        };
        let root = copier.tree(&snap.manifest.root, 0)?;
        report.blobs_read += copier.blobs_read;
        // The packs first: a manifest must never name a blob that is not durable.
        saver.flush()?;
        let mut manifest = snap.manifest.clone();
        manifest.root = root;
        manifest.parent = None;
        manifest
            .meta
            .insert(COPIED_FROM.to_owned(), snap.id.to_hex());
        let new = to.save_snapshot(&manifest)?;
        tracing::info!("snapshot {} copied as {}", snap.id.short(), new.short());
        report.copied.push((snap.id, new));
    }
    let stats = saver.stats();
    report.blobs_new = stats.blobs_new;
    report.bytes_stored = stats.bytes_stored;
    Ok(report)
}

/// One snapshot's walk: source id -> destination id, for every blob met.
struct Copier<'a, 'r> {
    from: &'a Repository,
    saver: &'a BlobSaver<'r>,
    /// Shared by the snapshots of one copy: a blob is read once per run.
    ids: &'a mut HashMap<BlobId, BlobId>,
    blobs_read: u64,
}

impl Copier<'_, '_> {
    fn tree(&mut self, id: &BlobId, depth: usize) -> Result<BlobId> {
        if depth > MAX_DEPTH {
            return Err(crate::tree::too_deep(id));
        }
        if let Some(new) = self.ids.get(id) {
            return Ok(*new);
        }
        let mut tree = self.from.load_tree(id)?;
        for node in &mut tree.nodes {
            for extent in &mut node.content {
                if let Some(blob) = extent.blob {
                    extent.blob = Some(self.data(&blob)?);
                }
            }
            // Remade by the destination's saver from the whole list (format 2).
            node.content_lists.clear();
            if let Some(sub) = node.subtree {
                node.subtree = Some(self.tree(&sub, depth + 1)?);
            }
        }
        let (new, _) = self.saver.save_tree(tree)?;
        self.ids.insert(*id, new);
        Ok(new)
    }

    fn data(&mut self, id: &BlobId) -> Result<BlobId> {
        if let Some(new) = self.ids.get(id) {
            return Ok(*new);
        }
        let bytes = self.from.read_blob(id)?;
        self.blobs_read += 1;
        let (new, _) = self.saver.save(BlobKind::Data, &bytes)?;
        self.ids.insert(*id, new);
        Ok(new)
    }
}
