//! `prune`: deletes the blobs no snapshot needs, safely while backups run.
//!
//! Two phases:
//! 1. **Mark** (under a shared lock, beside running backups): list the snapshots, walk
//!    their trees and set one bit per index row they use. Rows are numbered by the index,
//!    so the mark costs one bit per blob (two with the copy taken before the sweep).
//!    Packs are then classed by streaming the index in pack order: wholly unused packs
//!    are condemned; packs whose unused share exceeds `max_unused` are rewritten (their
//!    used blobs copied, still sealed, into new packs that are durable and indexed before
//!    anything is deleted); packs written within the `grace` period are left alone, so the
//!    packs of a backup that has not committed (or was killed: the next backup reuses
//!    them) survive.
//! 2. **Sweep** (the lock turned exclusive: it waits until no backup runs, and keeps new
//!    ones waiting only while it deletes): the snapshots committed since the mark are
//!    walked too; a condemned pack holding a blob one of them uses (a backup deduplicated
//!    against it) is kept. Then the condemned packs are deleted, index first.
//!
//! A kill at any point loses nothing a snapshot needs: every deletion follows the durable
//! copy of what is still used, and the index is a cache rebuilt from what exists.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use fixedbitset::FixedBitSet;
use rayon::prelude::*;
use serde::Serialize;

use crate::backend::FileKind;
use crate::error::{Error, IoContext, Result};
use crate::id::{BlobId, PackId, SnapshotId};
use crate::lock::LockKind;
use crate::repository::Repository;
use crate::saver::BlobSaver;

#[derive(Debug, Clone, Copy)]
pub struct PruneOptions {
    /// Rewrite a pack when more than this share (0..=1) of its bytes is unused.
    pub max_unused: f64,
    /// Leave packs written within this long alone.
    pub grace: Duration,
    /// Plan and report, change nothing.
    pub dry_run: bool,
    /// How long to wait for running backups before the sweep.
    pub lock_wait: Duration,
}

impl Default for PruneOptions {
    fn default() -> Self {
        Self {
            max_unused: 0.10,
            grace: Duration::from_secs(3600),
            dry_run: false,
            lock_wait: Duration::from_secs(3600),
        }
    }
}

/// What a prune found and did. Byte counts are pack-file bytes.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PruneReport {
    pub dry_run: bool,
    pub snapshots: u64,
    pub packs: u64,
    pub blobs: u64,
    pub blobs_used: u64,
    pub bytes_total: u64,
    pub bytes_unused: u64,
    pub packs_deleted: u64,
    pub packs_repacked: u64,
    pub packs_written: u64,
    /// Packs with unused blobs left alone because they are younger than the grace period.
    pub packs_young: u64,
    /// Condemned packs kept because a snapshot committed during the prune uses them.
    pub packs_kept_in_use: u64,
    /// Packs that could not be rewritten (damaged): kept, see the warnings.
    pub packs_unreadable: u64,
    pub snapshots_during: u64,
    pub blobs_removed: u64,
    pub bytes_deleted: u64,
    pub bytes_written: u64,
    pub bytes_freed: u64,
    /// Unused bytes left in packs below the `max_unused` threshold or in the grace period.
    pub bytes_unused_left: u64,
    pub incomplete_files_removed: u64,
    pub warnings: Vec<String>,
    pub duration_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Delete,
    Repack,
}

struct Planned {
    pack: PackId,
    size: u64,
    fate: Fate,
    unused_rows: u64,
}

/// One bit per index row: is the blob of this row used by a snapshot?
pub(crate) struct Marks {
    used: FixedBitSet,
    max_row: u64,
}

impl Marks {
    pub(crate) fn new(max_row: u64) -> Self {
        Self {
            used: FixedBitSet::with_capacity(usize::try_from(max_row).unwrap_or(0) + 1),
            max_row,
        }
    }

    pub(crate) fn is_set(&self, row: u64) -> bool {
        row <= self.max_row && self.used.contains(row as usize)
    }

    /// Marks one location of `id`, the newest the mark knows, so that other copies (a
    /// repack interrupted before its sweep, two backups that stored the same blob) count
    /// as unused and go. Returns (indexed at all, was marked already).
    fn mark(&mut self, repo: &Repository, id: &BlobId) -> Result<(bool, bool)> {
        let rows = repo.index().rows_of(id)?;
        let was = rows.iter().any(|r| self.is_set(*r));
        if !was {
            if let Some(r) = rows.iter().filter(|r| **r <= self.max_row).max() {
                self.used.insert(*r as usize);
            }
        }
        Ok((!rows.is_empty(), was))
    }

    /// Marks everything reachable from `root`. Trees already marked are not read again
    /// (their content was marked with them). Returns the number of missing blobs. A
    /// missing or unreadable tree is an error unless `tolerate` (a snapshot whose loss
    /// `repair` recorded).
    pub(crate) fn mark_tree(
        &mut self,
        repo: &Repository,
        root: &BlobId,
        snap: &SnapshotId,
        tolerate: bool,
    ) -> Result<u64> {
        let mut missing = 0;
        let mut stack = vec![*root];
        while let Some(t) = stack.pop() {
            let (found, seen) = self.mark(repo, &t)?;
            if seen {
                continue;
            }
            if !found && tolerate {
                missing += 1;
                continue;
            }
            if !found {
                return Err(Error::corrupt(
                    format!("snapshot {snap}"),
                    format!(
                        "tree {t} is missing; run `repo check` and `repo repair` before pruning"
                    ),
                ));
            }
            let tree = match repo.load_tree(&t) {
                Err(_) if tolerate => {
                    missing += 1;
                    continue;
                }
                other => other,
            };
            let tree = tree.map_err(|e| {
                Error::corrupt(
                    format!("snapshot {snap}"),
                    format!("tree {t} unreadable ({e}); run `repo check` and `repo repair` before pruning"),
                )
            })?;
            for n in &tree.nodes {
                for b in n.content_blobs() {
                    if !self.mark(repo, &b)?.0 {
                        missing += 1;
                    }
                }
                if let Some(sub) = n.subtree {
                    stack.push(sub);
                }
            }
        }
        Ok(missing)
    }
}

/// Prunes `repo`; see the module docs. Takes a shared lock unless this process holds one
/// already, and turns it exclusive for the sweep.
pub fn prune(repo: &Repository, opts: &PruneOptions) -> Result<PruneReport> {
    let started = Instant::now();
    if !repo.has_lock() {
        repo.lock(LockKind::Shared, "prune", opts.lock_wait)?;
    }
    if let Some(other) = crate::lock::list(repo.backend())?.into_iter().find(|e| {
        e.stale.is_none()
            && e.info
                .as_ref()
                .is_ok_and(|i| i.operation == "prune" && i.pid != std::process::id())
    }) {
        return Err(Error::Locked(format!(
            "another prune is running: {}",
            other.describe()
        )));
    }
    let mut report = PruneReport {
        dry_run: opts.dry_run,
        ..PruneReport::default()
    };

    // ---- mark ----
    let max_row = repo.index().max_row()?;
    let mut marks = Marks::new(max_row);
    let before: Vec<SnapshotId> = snapshot_ids(repo)?;
    let damaged = crate::damage::all(repo)?;
    for id in &before {
        let snap = repo.load_snapshot(id).map_err(|e| {
            Error::corrupt(
                format!("snapshot {id}"),
                format!("unreadable ({e}); prune needs every snapshot: run `repo check`"),
            )
        })?;
        let missing = marks.mark_tree(repo, &snap.manifest.root, id, damaged.contains_key(id))?;
        if missing > 0 {
            report.warnings.push(format!(
                "snapshot {id} refers to {missing} blobs that are not in the repository (see `repo check`)"
            ));
        }
    }
    report.snapshots = before.len() as u64;

    // ---- plan ----
    let grace_start = SystemTime::now()
        .checked_sub(opts.grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut plan: Vec<Planned> = Vec::new();
    let sizes = repo.index().pack_sizes()?;
    repo.index().scan_by_pack(max_row, &mut |pack, rows| {
        let size = sizes.get(&pack).copied().unwrap_or(0);
        let used: Vec<&(u64, u32)> = rows.iter().filter(|(row, _)| marks.is_set(*row)).collect();
        let used_bytes: u64 = used.iter().map(|(_, len)| u64::from(*len)).sum();
        report.packs += 1;
        report.blobs += rows.len() as u64;
        report.blobs_used += used.len() as u64;
        report.bytes_total += size;
        if used.len() == rows.len() {
            return Ok(());
        }
        let unused = size.saturating_sub(used_bytes);
        report.bytes_unused += unused;
        let young = repo
            .backend()
            .modified(FileKind::Pack, &pack.to_hex())
            .is_ok_and(|m| m > grace_start);
        let fate = if young {
            report.packs_young += 1;
            None
        } else if used.is_empty() {
            Some(Fate::Delete)
        } else if unused as f64 > opts.max_unused * size as f64 {
            Some(Fate::Repack)
        } else {
            None
        };
        match fate {
            Some(fate) => plan.push(Planned {
                pack,
                size,
                fate,
                unused_rows: (rows.len() - used.len()) as u64,
            }),
            None => report.bytes_unused_left += unused,
        }
        Ok(())
    })?;
    let count = |f: Fate| plan.iter().filter(|p| p.fate == f).count() as u64;
    report.packs_deleted = count(Fate::Delete);
    report.packs_repacked = count(Fate::Repack);
    if opts.dry_run {
        report.blobs_removed = plan.iter().map(|p| p.unused_rows).sum();
        report.bytes_deleted = plan.iter().map(|p| p.size).sum();
        report.bytes_freed = report.bytes_deleted; // before repack writes; an upper bound
        report.duration_ms = elapsed_ms(started);
        return Ok(report);
    }

    // ---- repack (still shared: backups go on) ----
    let saver = BlobSaver::new(repo);
    let failed: Mutex<Vec<(PackId, Error)>> = Mutex::new(Vec::new());
    let marks_ref = &marks;
    plan.par_iter()
        .filter(|p| p.fate == Fate::Repack)
        .for_each(|p| {
            if let Err(e) = copy_used(repo, &saver, &p.pack, marks_ref) {
                tracing::warn!("pack {} not rewritten: {e}", p.pack);
                lock(&failed).push((p.pack, e));
            }
        });
    saver.flush()?;
    let failed: HashSet<PackId> = failed
        .into_inner()
        .unwrap_or_default()
        .into_iter()
        .map(|(pack, e)| {
            report.warnings.push(format!(
                "pack {pack} kept: {e} (run `repo check --read-data`, then `repo repair`)"
            ));
            pack
        })
        .collect();
    report.packs_written = saver.stats().packs;
    report.bytes_written = saver.stats().pack_bytes;

    // ---- sweep (exclusive) ----
    repo.upgrade_lock(opts.lock_wait)?;
    let copied = marks.used.clone();
    let known: HashSet<SnapshotId> = before.iter().copied().collect();
    for id in snapshot_ids(repo)? {
        if known.contains(&id) {
            continue;
        }
        report.snapshots_during += 1;
        let snap = repo.load_snapshot(&id)?;
        marks.mark_tree(repo, &snap.manifest.root, &id, false)?;
    }
    for p in &plan {
        let keep = if p.fate == Fate::Repack && failed.contains(&p.pack) {
            report.packs_unreadable += 1;
            true
        } else {
            // A row used now but not when the copies were made: a snapshot committed
            // during the prune needs this pack.
            let late = repo.index().pack_rows(&p.pack)?.iter().any(|(row, _)| {
                marks.is_set(*row) && !(*row <= max_row && copied.contains(*row as usize))
            });
            if late {
                report.packs_kept_in_use += 1;
            }
            late
        };
        if keep {
            report.bytes_unused_left += p.size;
            match p.fate {
                Fate::Delete => report.packs_deleted -= 1,
                Fate::Repack => report.packs_repacked -= 1,
            }
            continue;
        }
        repo.index().remove_pack(&p.pack)?;
        repo.backend()
            .remove(FileKind::Pack, &p.pack.to_hex())
            .ctx(|| format!("deleting pack {}", p.pack))?;
        report.bytes_deleted += p.size;
        report.blobs_removed += p.unused_rows;
    }
    let (files, _) = repo
        .backend()
        .remove_incomplete(opts.grace)
        .ctx(|| "removing incomplete files".into())?;
    report.incomplete_files_removed = files;
    crate::damage::forget_orphans(repo)?;
    report.bytes_freed = report.bytes_deleted.saturating_sub(report.bytes_written);
    report.duration_ms = elapsed_ms(started);
    if let Err(e) = repo.sync_index() {
        tracing::warn!("index shard stamps not recorded: {e}");
    }
    Ok(report)
}

fn elapsed_ms(started: Instant) -> u64 {
    u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn snapshot_ids(repo: &Repository) -> Result<Vec<SnapshotId>> {
    Ok(repo
        .backend()
        .list(FileKind::Snapshot)
        .ctx(|| "listing snapshots".into())?
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect())
}

/// Verifies the used blobs of `pack` and copies them, still sealed, into the saver's
/// packs; an error leaves the pack to be kept.
fn copy_used(repo: &Repository, saver: &BlobSaver<'_>, pack: &PackId, marks: &Marks) -> Result<()> {
    let bytes = repo
        .backend()
        .read(FileKind::Pack, &pack.to_hex())
        .ctx(|| format!("reading pack {pack}"))?;
    for (_, e) in repo
        .index()
        .pack_rows(pack)?
        .iter()
        .filter(|(row, _)| marks.is_set(*row))
    {
        saver.add_stored(e, crate::pack::verified_blob(repo.crypto(), &bytes, e)?)?;
    }
    Ok(())
}
