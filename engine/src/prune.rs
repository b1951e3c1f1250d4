//! `prune`: deletes the blobs no snapshot needs, safely while backups run.
//!
//! Steps ([`prune`]):
//! 1. **Mark** (under a shared lock, beside running backups): list the snapshots, walk
//!    their trees and set one bit per index row they use. Rows are numbered by the index,
//!    so the mark costs one bit per blob (two with the copy taken before the sweep).
//! 2. **Plan**: stream the index in pack order. Wholly unused packs are condemned; packs
//!    whose unused share exceeds `max_unused` are to be rewritten. Packs a writer that
//!    has not committed may still need are left alone ([`crate::lock::uncommitted_windows`]):
//!    those written since a running backup (or prune, or repair) started, and those an
//!    interrupted one wrote while it ran, whose stale lock is still there (the next backup
//!    reuses them; `repo unlock` lets them go). Nothing else waits: the data of forgotten
//!    snapshots goes at once.
//! 3. **Repack** (still shared: backups go on): the used blobs of the packs to rewrite
//!    are verified and copied, still sealed, into new packs, durable and indexed before
//!    anything is deleted. A write that fails (a full disk) stops the copying
//!    (the saver is fail-stop) and the prune fails after its sweep.
//! 4. **Sweep** (the lock turned exclusive: it waits until no backup runs, and keeps new
//!    ones waiting only while it deletes): the snapshots committed since the mark are
//!    walked too. A condemned pack is deleted only once every row of it that a snapshot
//!    needs has a copy in an indexed pack that stays (indexed means durable): a copy that
//!    was lost, or a blob a backup deduplicated against meanwhile, keeps its pack.
//!    Deletion goes index first, then the file.
//!
//! A kill or a power loss at any point loses nothing a snapshot needs: every deletion
//! follows the durable copy of what is still used, and the index is a cache rebuilt
//! from what exists.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use fixedbitset::FixedBitSet;
use rayon::prelude::*;
use serde::Serialize;

use crate::error::{Error, IoContext, Result};
use crate::id::{BlobId, PackId, SnapshotId};
use crate::lock::{LockKind, Window};
use crate::repository::Repository;
use crate::saver::BlobSaver;
use crate::store::FileKind;

#[derive(Debug, Clone, Copy)]
pub struct PruneOptions {
    /// Rewrite a pack when more than this share (0..=1) of its bytes is unused.
    pub max_unused: f64,
    /// Also leave packs written within this long alone (for writers this program cannot
    /// see through locks). Zero by default: the locks of running and interrupted writers
    /// say what must stay.
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
            grace: Duration::ZERO,
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
    /// Packs with unused blobs left alone because a writer that has not committed may
    /// need them (or they are within `grace`).
    pub packs_young: u64,
    /// Who those writers are.
    pub protected_by: Vec<String>,
    /// Condemned packs kept because a blob of theirs that a snapshot needs has no copy
    /// elsewhere (a snapshot committed during the prune uses it, or its copy was lost).
    pub packs_kept_in_use: u64,
    /// Packs that could not be rewritten because they are damaged: kept, see the warnings.
    pub packs_unreadable: u64,
    /// Packs not rewritten because writing failed (a full disk): kept.
    pub packs_not_rewritten: u64,
    pub snapshots_during: u64,
    pub blobs_removed: u64,
    pub bytes_deleted: u64,
    pub bytes_written: u64,
    pub bytes_freed: u64,
    /// Unused bytes left in packs below the `max_unused` threshold or left alone.
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
/// already, and turns it exclusive for the sweep. When the repack could not write (a
/// full disk), the sweep still deletes what is safe to delete, and then the prune fails
/// with that write error: the report's figures are in the error's message.
pub fn prune(repo: &Repository, opts: &PruneOptions) -> Result<PruneReport> {
    let started = Instant::now();
    take_lock(repo, opts)?;
    let mut report = PruneReport {
        dry_run: opts.dry_run,
        ..PruneReport::default()
    };
    let max_row = repo.index().max_row()?;
    let (mut marks, before) = mark_snapshots(repo, max_row, &mut report)?;
    let windows = uncommitted_windows(repo)?;
    let plan = plan(repo, &marks, max_row, &windows, opts, &mut report)?;
    if opts.dry_run {
        report.blobs_removed = plan.iter().map(|p| p.unused_rows).sum();
        report.bytes_deleted = plan.iter().map(|p| p.size).sum();
        report.bytes_freed = report.bytes_deleted; // before repack writes; an upper bound
        report.duration_ms = elapsed_ms(started);
        return Ok(report);
    }
    let repacked = repack(repo, &plan, &marks, &mut report);

    repo.upgrade_lock(opts.lock_wait)?;
    mark_late_snapshots(repo, &mut marks, &before, &mut report)?;
    // A backup interrupted since the plan left a stale lock: its packs stay too.
    let windows = uncommitted_windows(repo)?;
    sweep(
        repo,
        &plan,
        &marks,
        &repacked.unreadable,
        &windows,
        &mut report,
    )?;
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
    match repacked.write_error {
        None => Ok(report),
        Some(e) => Err(repack_failed(e, &report)),
    }
}

/// Takes the shared lock (unless held) and refuses to run beside another prune.
fn take_lock(repo: &Repository, opts: &PruneOptions) -> Result<()> {
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
    Ok(())
}

/// Step 1: marks what every snapshot uses; returns the marks and the snapshots seen.
fn mark_snapshots(
    repo: &Repository,
    max_row: u64,
    report: &mut PruneReport,
) -> Result<(Marks, Vec<SnapshotId>)> {
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
    Ok((marks, before))
}

/// The spans in which writers that have not committed may have written packs.
fn uncommitted_windows(repo: &Repository) -> Result<Vec<Window>> {
    let locks = crate::lock::list(repo.backend())?;
    Ok(crate::lock::uncommitted_windows(
        &locks,
        repo.lock_name().as_deref(),
    ))
}

/// Step 2: what to delete and what to rewrite.
fn plan(
    repo: &Repository,
    marks: &Marks,
    max_row: u64,
    windows: &[Window],
    opts: &PruneOptions,
    report: &mut PruneReport,
) -> Result<Vec<Planned>> {
    let grace_start = SystemTime::now()
        .checked_sub(opts.grace)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut protectors: HashSet<String> = HashSet::new();
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
        let modified = repo.backend().modified(FileKind::Pack, &pack.to_hex()).ok();
        let protector = modified.and_then(|m| windows.iter().find(|w| w.contains(m)));
        let young = modified.is_some_and(|m| m > grace_start);
        let fate = if protector.is_some() || young {
            report.packs_young += 1;
            if let Some(w) = protector {
                protectors.insert(w.holder.clone());
            }
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
    report.protected_by = protectors.into_iter().collect();
    report.protected_by.sort();
    let count = |f: Fate| plan.iter().filter(|p| p.fate == f).count() as u64;
    report.packs_deleted = count(Fate::Delete);
    report.packs_repacked = count(Fate::Repack);
    Ok(plan)
}

/// What the repack left for the sweep to know.
struct Repacked {
    /// Packs whose used blobs did not verify: damaged, kept for `repair`.
    unreadable: HashSet<PackId>,
    /// The write that failed, if one did: the prune fails after its sweep.
    write_error: Option<Error>,
}

/// Step 3: copies the used blobs of the packs to rewrite. Never fails: what could not be
/// copied is reported, and the sweep keeps every pack whose used blobs have no durable
/// copy.
fn repack(
    repo: &Repository,
    plan: &[Planned],
    marks: &Marks,
    report: &mut PruneReport,
) -> Repacked {
    let saver = BlobSaver::new(repo);
    let failed: Mutex<Vec<(PackId, Error)>> = Mutex::new(Vec::new());
    plan.par_iter()
        .filter(|p| p.fate == Fate::Repack)
        .for_each(|p| {
            if let Err(e) = copy_used(repo, &saver, &p.pack, marks) {
                lock(&failed).push((p.pack, e));
            }
        });
    let flushed = saver.flush();
    let mut out = Repacked {
        unreadable: HashSet::new(),
        write_error: None,
    };
    for (pack, e) in failed.into_inner().unwrap_or_default() {
        if e.kind() == crate::ErrorKind::Corrupt {
            report.warnings.push(format!(
                "pack {pack} kept, not rewritten: {e} (run `repo check --read-data`, then `repo repair`)"
            ));
            out.unreadable.insert(pack);
        } else {
            report.packs_not_rewritten += 1;
            tracing::debug!("pack {pack} not rewritten: {e}");
            out.write_error.get_or_insert(e);
        }
    }
    if let Err(e) = flushed {
        out.write_error.get_or_insert(e);
    }
    let lost = saver.lost_blobs().len();
    if lost > 0 {
        report.warnings.push(format!(
            "{lost} copied blobs were lost with a pack that could not be written; their packs are kept"
        ));
    }
    report.packs_written = saver.stats().packs;
    report.bytes_written = saver.stats().pack_bytes;
    out
}

/// Marks what the snapshots committed since the mark use (a backup that deduplicated
/// against a condemned pack).
fn mark_late_snapshots(
    repo: &Repository,
    marks: &mut Marks,
    before: &[SnapshotId],
    report: &mut PruneReport,
) -> Result<()> {
    let known: HashSet<SnapshotId> = before.iter().copied().collect();
    for id in snapshot_ids(repo)? {
        if known.contains(&id) {
            continue;
        }
        report.snapshots_during += 1;
        let snap = repo.load_snapshot(&id)?;
        marks.mark_tree(repo, &snap.manifest.root, &id, false)?;
    }
    Ok(())
}

/// Step 4 (exclusive): deletes the planned packs whose needed blobs all have a copy in a
/// pack that stays.
fn sweep(
    repo: &Repository,
    plan: &[Planned],
    marks: &Marks,
    unreadable: &HashSet<PackId>,
    windows: &[Window],
    report: &mut PruneReport,
) -> Result<()> {
    let mut doomed: HashSet<PackId> = plan
        .iter()
        .map(|p| p.pack)
        .filter(|p| !unreadable.contains(p))
        .collect();
    for p in plan {
        let protected = || {
            repo.backend()
                .modified(FileKind::Pack, &p.pack.to_hex())
                .is_ok_and(|m| windows.iter().any(|w| w.contains(m)))
        };
        let keep = if unreadable.contains(&p.pack) {
            report.packs_unreadable += 1;
            true
        } else if protected() {
            report.packs_young += 1;
            true
        } else if let Some(blob) = uncovered_blob(repo, &p.pack, marks, &doomed)? {
            tracing::debug!("pack {} kept: blob {blob} has no copy elsewhere", p.pack);
            if p.fate == Fate::Delete {
                report.packs_kept_in_use += 1;
            }
            true
        } else {
            false
        };
        if keep {
            doomed.remove(&p.pack);
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
    Ok(())
}

/// A blob of `pack` that a snapshot needs and that no indexed pack outside `doomed`
/// holds, if there is one.
fn uncovered_blob(
    repo: &Repository,
    pack: &PackId,
    marks: &Marks,
    doomed: &HashSet<PackId>,
) -> Result<Option<BlobId>> {
    for (row, e) in repo.index().pack_rows(pack)? {
        if !marks.is_set(row) {
            continue;
        }
        let copies = repo.index().packs_of(&e.id)?;
        if !copies.iter().any(|c| c != pack && !doomed.contains(c)) {
            return Ok(Some(e.id));
        }
    }
    Ok(None)
}

/// The error of a prune whose repack could not write, with what it did anyway.
fn repack_failed(e: Error, r: &PruneReport) -> Error {
    let full = matches!(&e, Error::Io { source, .. }
        if source.raw_os_error() == Some(libc::ENOSPC)
            || source.kind() == std::io::ErrorKind::StorageFull);
    let cause = if full {
        "the disk is full".to_owned()
    } else {
        e.to_string()
    };
    let source = match e {
        Error::Io { source, .. } => source,
        other => std::io::Error::other(other.to_string()),
    };
    Error::io(
        format!(
            "prune could not write the packs it rewrites because {cause}: it deleted {} packs \
             ({} freed) and kept {} packs whose used data could not be copied; every snapshot \
             is whole. Free some space and run `repo prune` again",
            r.packs_deleted + r.packs_repacked,
            crate::progress::human_bytes(r.bytes_deleted.saturating_sub(r.bytes_written)),
            r.packs_not_rewritten
        ),
        source,
    )
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
/// packs. A damaged blob is [`crate::ErrorKind::Corrupt`]; a failed write is the saver's
/// I/O error.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Encryption;
    use crate::store::sim::SimFs;
    use crate::test_util::{bytes, files_of, sim_open, sim_repo, small_config, snapshot_of};

    fn opts() -> PruneOptions {
        PruneOptions {
            max_unused: 0.0,
            lock_wait: Duration::ZERO,
            ..PruneOptions::default()
        }
    }

    type Files = Vec<(&'static str, Vec<u8>)>;

    /// Three snapshots over shared and own data in 1 MiB packs; returns them oldest
    /// first with their files.
    fn three(repo: &Repository) -> Vec<(SnapshotId, Files)> {
        let shared = bytes(1, 700 << 10);
        let mut out = Vec::new();
        for (i, name) in ["one", "two", "three"].into_iter().enumerate() {
            let files = vec![
                ("shared", shared.clone()),
                (name, bytes(10 + i as u64, 900 << 10)),
            ];
            out.push((snapshot_of(repo, &files), files));
        }
        out
    }

    fn assert_whole(repo: &Repository, id: &SnapshotId, files: &[(&str, Vec<u8>)]) {
        let got = files_of(repo, id).unwrap();
        for (name, data) in files {
            assert!(got[*name] == *data, "{name} of {id} differs");
        }
    }

    #[test]
    fn forgotten_data_goes_at_once_and_what_is_kept_restores() {
        let (fs, repo) = sim_repo(small_config(Encryption::Aes256Gcm));
        let snaps = three(&repo);
        repo.remove_snapshot(&snaps[0].0).unwrap();
        let before = fs.used_bytes();
        let r = prune(&repo, &opts()).unwrap();
        assert_eq!(r.snapshots, 2);
        assert_eq!(r.packs_young, 0, "{r:?}");
        assert!(r.bytes_freed >= 900 << 10, "{r:?}");
        assert!(fs.used_bytes() < before - (800 << 10));
        drop(repo);
        let repo = sim_open(&fs).unwrap();
        for (id, files) in &snaps[1..] {
            assert_whole(&repo, id, files);
        }
        // Nothing left to do.
        let again = prune(&repo, &opts()).unwrap();
        assert_eq!(
            (again.packs_deleted, again.packs_repacked),
            (0, 0),
            "{again:?}"
        );
        assert_eq!(again.bytes_unused, 0, "{again:?}");
    }

    #[test]
    fn a_dry_run_plans_and_changes_nothing() {
        let (fs, repo) = sim_repo(small_config(Encryption::None));
        let snaps = three(&repo);
        repo.remove_snapshot(&snaps[1].0).unwrap();
        let files = fs.files_under(std::path::Path::new("/repo/data"));
        let r = prune(
            &repo,
            &PruneOptions {
                dry_run: true,
                ..opts()
            },
        )
        .unwrap();
        assert!(r.packs_deleted + r.packs_repacked > 0, "{r:?}");
        assert_eq!(fs.files_under(std::path::Path::new("/repo/data")), files);
    }

    #[test]
    fn a_pack_whose_needed_blob_has_no_copy_that_stays_is_kept() {
        let (_fs, repo) = sim_repo(small_config(Encryption::Aes256Gcm));
        let files = vec![("a", bytes(1, 1000)), ("b", bytes(2, 1000))];
        let snap = snapshot_of(&repo, &files);
        let root = repo.load_snapshot(&snap).unwrap().manifest.root;
        let pack = repo.locate(&root).unwrap().pack;
        let mut marks = Marks::new(repo.index().max_row().unwrap());
        marks.mark_tree(&repo, &root, &snap, false).unwrap();
        // Doomed with no other copy anywhere: uncovered.
        let doomed: HashSet<PackId> = [pack].into_iter().collect();
        assert!(uncovered_blob(&repo, &pack, &marks, &doomed)
            .unwrap()
            .is_some());
        // A copy in another pack that stays covers it.
        let saver = BlobSaver::new(&repo);
        let bytes = repo.backend().read(FileKind::Pack, &pack.to_hex()).unwrap();
        for (_, e) in repo.index().pack_rows(&pack).unwrap() {
            saver
                .add_stored(
                    &e,
                    crate::pack::verified_blob(repo.crypto(), &bytes, &e).unwrap(),
                )
                .unwrap();
        }
        saver.flush().unwrap();
        assert!(uncovered_blob(&repo, &pack, &marks, &doomed)
            .unwrap()
            .is_none());
        // Unless that copy is doomed too.
        // (Every pack: the data pack, the tree pack and the tree pack's copy.)
        let both: HashSet<PackId> = repo.index().packs().unwrap().into_iter().collect();
        assert_eq!(both.len(), 3);
        assert!(uncovered_blob(&repo, &pack, &marks, &both)
            .unwrap()
            .is_some());
    }

    #[test]
    fn a_read_error_while_marking_fails_the_prune_and_deletes_nothing() {
        use crate::store::sim::{Effect, Fault, Op};
        let (fs, repo) = sim_repo(small_config(Encryption::Aes256Gcm));
        let snaps = three(&repo);
        repo.remove_snapshot(&snaps[0].0).unwrap();
        drop(repo);
        let repo = sim_open(&fs).unwrap();
        let packs = repo.backend().list(FileKind::Pack).unwrap();
        fs.reset_faults();
        fs.inject(Fault {
            op: Some(Op::Read),
            nth: 2,
            effect: Effect::Fail {
                errno: libc::EIO,
                sticky: false,
            },
        });
        assert!(prune(&repo, &opts()).is_err());
        assert_eq!(repo.backend().list(FileKind::Pack).unwrap(), packs);
    }

    #[test]
    fn packs_of_an_interrupted_backup_stay_while_its_stale_lock_does() {
        let (fs, repo) = sim_repo(small_config(Encryption::Aes256Gcm));
        let snaps = three(&repo);
        // A backup of another host that died after writing a pack: its lock, not
        // refreshed for an hour (stale), says when it ran.
        let now = chrono::Utc::now();
        let info = crate::lock::LockInfo {
            version: 1,
            kind: LockKind::Shared,
            operation: "backup".into(),
            host: "elsewhere".into(),
            user: "u".into(),
            pid: 1,
            pid_start: None,
            created: now - chrono::Duration::minutes(61),
            refreshed: now - chrono::Duration::minutes(60),
        };
        let orphan = {
            let saver = BlobSaver::new(&repo);
            let (id, _) = saver
                .save(crate::blob::BlobKind::Data, &bytes(99, 200_000))
                .unwrap();
            saver.flush().unwrap();
            repo.locate(&id).unwrap().pack
        };
        let lock = serde_json::to_vec(&info).unwrap();
        repo.backend().write(FileKind::Lock, "dead", &lock).unwrap();
        // Written now: outside the dead backup's window, so it goes...
        let r = prune(&repo, &opts()).unwrap();
        assert!(r.packs_deleted >= 1, "{r:?}");
        assert!(!repo.index().packs().unwrap().contains(&orphan));
        // ...but one written within the window of a backup of this host whose process
        // is gone stays.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let info = crate::lock::LockInfo {
            host: crate::repository::current_host(),
            pid: dead,
            created: now - chrono::Duration::minutes(1),
            refreshed: now - chrono::Duration::minutes(1),
            ..info
        };
        repo.backend()
            .write(FileKind::Lock, "dead", &serde_json::to_vec(&info).unwrap())
            .unwrap();
        let saver = BlobSaver::new(&repo);
        saver
            .save(crate::blob::BlobKind::Data, &bytes(98, 200_000))
            .unwrap();
        saver.flush().unwrap();
        let r = prune(&repo, &opts()).unwrap();
        assert_eq!(r.packs_deleted, 0, "{r:?}");
        assert_eq!(r.packs_young, 1, "{r:?}");
        assert!(r.protected_by[0].contains("backup"), "{r:?}");
        let _ = (fs, snaps);
    }

    #[test]
    fn a_prune_on_a_full_disk_fails_saying_so_and_keeps_every_snapshot_whole() {
        let (fs, repo) = sim_repo(small_config(Encryption::Aes256Gcm));
        let snaps = three(&repo);
        repo.remove_snapshot(&snaps[0].0).unwrap();
        fs.set_capacity(Some(fs.used_bytes() + (300 << 10)));
        let err = prune(&repo, &opts()).unwrap_err();
        assert!(err.to_string().contains("disk is full"), "{err}");
        assert_eq!(err.kind(), crate::ErrorKind::Io);
        fs.set_capacity(None);
        drop(repo);
        let repo = sim_open(&fs).unwrap();
        for (id, files) in &snaps[1..] {
            assert_whole(&repo, id, files);
        }
        let _: SimFs = fs;
    }
}
