//! `repair`: brings a damaged or interrupted repository back to a state `check` accepts,
//! apart from the data that is truly lost, which it records instead of hiding.
//!
//! Under an exclusive lock:
//! 1. incomplete files (`.tmp-*` of a killed writer) are removed;
//! 2. the index is rebuilt from the pack trailers; a pack whose trailer does not read is
//!    moved to `quarantine/` (its blobs cannot be named, so they are lost); every complete
//!    pack is indexed, including those an interrupted backup left behind, which the next
//!    backup then deduplicates against instead of storing again;
//! 3. with `read_data`, every pack is read; one whose content does not match its name has
//!    its blobs verified one by one, the intact ones copied (still sealed) into a new pack,
//!    and the pack moved to `quarantine/`;
//! 4. every snapshot is walked: one that needs a blob the repository no longer has gets a
//!    damage mark (see [`crate::damage`]) naming the blobs and paths; a marked snapshot that
//!    is whole again loses its mark. No snapshot is deleted.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;

use crate::damage;
use crate::error::{IoContext, Result};
use crate::id::{BlobId, Id, PackId, SnapshotId};
use crate::lock::LockKind;
use crate::prune::{snapshot_ids, Marks};
use crate::repository::Repository;
use crate::saver::BlobSaver;
use crate::store::FileKind;

#[derive(Debug, Clone, Copy)]
pub struct RepairOptions {
    /// Read and verify every pack (finds damaged blobs; without it only structure).
    pub read_data: bool,
    pub lock_wait: Duration,
}

/// A snapshot that refers to lost data.
#[derive(Debug, Clone, Serialize)]
pub struct DamagedSnapshot {
    pub snapshot: SnapshotId,
    pub lost_blobs: u64,
    pub paths_total: u64,
    /// The first paths that cannot be restored whole.
    pub paths: Vec<PathBuf>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RepairReport {
    pub incomplete_files_removed: u64,
    pub packs: u64,
    /// Packs whose trailer did not read, moved to `quarantine/`.
    pub packs_unreadable: Vec<PackId>,
    /// Packs with damaged content, salvaged into new packs and moved to `quarantine/`.
    pub packs_damaged: Vec<PackId>,
    pub packs_written: u64,
    pub blobs_salvaged: u64,
    /// Blobs dropped from the repository because they were damaged.
    pub blobs_damaged: Vec<BlobId>,
    /// Packs no snapshot refers to (an interrupted backup's), kept for reuse.
    pub packs_unreferenced: u64,
    pub bytes_unreferenced: u64,
    pub snapshots: u64,
    pub snapshots_damaged: Vec<DamagedSnapshot>,
    pub snapshots_healed: u64,
    pub bytes_read: u64,
    pub duration_ms: u64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Repairs `repo`; see the module docs.
pub fn repair(repo: &Repository, opts: &RepairOptions) -> Result<RepairReport> {
    let started = Instant::now();
    if repo.has_lock() {
        repo.upgrade_lock(opts.lock_wait)?;
    } else {
        repo.lock(LockKind::Exclusive, "repair", opts.lock_wait)?;
    }
    // 1. Incomplete files: nobody else writes while we hold the exclusive lock.
    let mut report = RepairReport {
        incomplete_files_removed: repo
            .backend()
            .remove_incomplete(Duration::ZERO)
            .ctx(|| "removing incomplete files".into())?
            .0,
        ..RepairReport::default()
    };

    // 2. The index, from the trailers.
    repo.index().clear()?;
    let packs: Vec<PackId> = repo
        .backend()
        .list(FileKind::Pack)
        .ctx(|| "listing packs".into())?
        .iter()
        .filter_map(|n| n.parse().ok())
        .collect();
    report.packs = packs.len() as u64;
    let trailers: Vec<_> = packs
        .par_iter()
        .map(|p| (*p, repo.read_pack_trailer(p)))
        .collect();
    let mut readable = Vec::new();
    for (p, t) in trailers {
        match t {
            Ok((size, entries)) => {
                repo.index().add_pack(&p, size, &entries)?;
                readable.push(p);
            }
            // Only damage is quarantined: a read that failed (EIO, a lost mount) says
            // nothing about the pack, and quarantining a good pack loses its blobs.
            Err(e) if e.kind() != crate::ErrorKind::Corrupt => return Err(e),
            Err(e) => {
                tracing::warn!("pack {p}: {e}; moved to quarantine/");
                repo.backend()
                    .quarantine(FileKind::Pack, &p.to_hex())
                    .ctx(|| format!("quarantining pack {p}"))?;
                report.packs_unreadable.push(p);
            }
        }
    }

    // 3. The data.
    if opts.read_data {
        let saver = BlobSaver::new(repo);
        let damaged: Mutex<Vec<(PackId, Vec<BlobId>, u64)>> = Mutex::new(Vec::new());
        let bytes_read = std::sync::atomic::AtomicU64::new(0);
        readable.par_iter().try_for_each(|p| -> Result<()> {
            let bytes = repo
                .backend()
                .read(FileKind::Pack, &p.to_hex())
                .ctx(|| format!("reading pack {p}"))?;
            bytes_read.fetch_add(bytes.len() as u64, std::sync::atomic::Ordering::Relaxed);
            if PackId(Id::hash_of(&bytes)) == *p {
                return Ok(());
            }
            let mut bad = Vec::new();
            let mut good = 0;
            for (_, e) in repo.index().pack_rows(p)? {
                match crate::pack::verified_blob(repo.crypto(), &bytes, &e) {
                    Ok(stored) => {
                        saver.add_stored(&e, stored)?;
                        good += 1;
                    }
                    Err(_) => bad.push(e.id),
                }
            }
            lock(&damaged).push((*p, bad, good));
            Ok(())
        })?;
        saver.flush()?;
        report.bytes_read = bytes_read.into_inner();
        report.packs_written = saver.stats().packs;
        let mut lost: BTreeSet<BlobId> = BTreeSet::new();
        for (p, bad, good) in damaged.into_inner().unwrap_or_default() {
            // The intact blobs are durable in the new packs: the old one can go.
            repo.index().remove_pack(&p)?;
            repo.backend()
                .quarantine(FileKind::Pack, &p.to_hex())
                .ctx(|| format!("quarantining pack {p}"))?;
            tracing::warn!(
                "pack {p}: damaged; {good} blobs salvaged, {} lost; moved to quarantine/",
                bad.len()
            );
            report.packs_damaged.push(p);
            report.blobs_salvaged += good;
            lost.extend(bad);
        }
        for b in lost {
            // Lost only if no other pack holds a copy.
            if !repo.index().contains(&b)? {
                report.blobs_damaged.push(b);
            }
        }
    }

    // 4. Snapshots: record losses, clear healed marks; count unreferenced packs.
    let marks_before = damage::all(repo)?;
    let ids = snapshot_ids(repo)?;
    report.snapshots = ids.len() as u64;
    let mut marks = Marks::new(repo.index().max_row()?);
    let mut whole = std::collections::HashMap::new();
    for id in &ids {
        let snap = match repo.read_snapshot(id) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("snapshot {id} unreadable: {e}");
                continue;
            }
        };
        marks.mark_tree(repo, &snap.manifest.root, id, true)?;
        if damage::is_whole(repo, &snap.manifest.root, &mut whole)?
            && !marks_before.contains_key(id)
        {
            continue;
        }
        let (lost, paths) = damage::scan(repo, &snap.manifest.root)?;
        if lost.is_empty() {
            if marks_before.contains_key(id) {
                damage::clear(repo, id)?;
                report.snapshots_healed += 1;
            }
            continue;
        }
        let mark = damage::mark_of(&lost, &paths);
        damage::write(repo, id, &mark)?;
        report.snapshots_damaged.push(DamagedSnapshot {
            snapshot: *id,
            lost_blobs: lost.len() as u64,
            paths_total: paths.len() as u64,
            paths: paths.into_iter().take(20).collect(),
        });
    }
    damage::forget_orphans(repo)?;
    let mut unreferenced = Vec::new();
    repo.index().scan_by_pack(u64::MAX, &mut |pack, rows| {
        if !rows.iter().any(|(row, _)| marks.is_set(*row)) {
            unreferenced.push(pack);
        }
        Ok(())
    })?;
    report.packs_unreferenced = unreferenced.len() as u64;
    for p in &unreferenced {
        report.bytes_unreferenced += repo.index().pack_size(p)?.unwrap_or(0);
    }
    report.duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::Encryption;
    use crate::store::sim::{Effect, Fault, Op};
    use crate::test_util::{bytes, files_of, sim_open, sim_repo, small_config, snapshot_of};
    use std::path::Path;

    fn opts() -> RepairOptions {
        RepairOptions {
            read_data: true,
            lock_wait: Duration::ZERO,
        }
    }

    fn pack_path(p: &PackId) -> PathBuf {
        let hex = p.to_hex();
        Path::new("/repo/data").join(&hex[..2]).join(&hex)
    }

    #[test]
    fn a_damaged_pack_is_salvaged_quarantined_recorded_and_healed_later() {
        let (fs, repo) = sim_repo(small_config(Encryption::Aes256Gcm));
        let files = vec![("a", bytes(1, 1000)), ("b", bytes(2, 2000))];
        let snap = snapshot_of(&repo, &files);
        let a_blob = repo
            .load_tree(&repo.load_snapshot(&snap).unwrap().manifest.root)
            .unwrap()
            .nodes[0]
            .content[0]
            .blob
            .unwrap();
        let loc = repo.locate(&a_blob).unwrap();
        let path = pack_path(&loc.pack);
        let mut content = fs.files_under(&path).remove(0).1;
        content[loc.offset as usize + 40] ^= 1;
        fs.tamper(&path, content).unwrap();
        drop(repo);
        let repo = sim_open(&fs).unwrap();
        let r = repair(&repo, &opts()).unwrap();
        assert_eq!(r.packs_damaged, vec![loc.pack]);
        assert_eq!(r.blobs_damaged, vec![a_blob]);
        assert!(r.blobs_salvaged >= 1, "{r:?}"); // b (the tree is in a pack of its own)
        assert_eq!(r.snapshots_damaged.len(), 1);
        assert_eq!(r.snapshots_damaged[0].paths, vec![PathBuf::from("/a")]);
        assert!(fs
            .files_under(Path::new("/repo/quarantine"))
            .iter()
            .any(|(p, _)| p.ends_with(loc.pack.to_hex())));
        // What was intact still reads; the lost file does not, and says so.
        assert!(repo.read_blob(&a_blob).is_err());
        drop(repo);
        let repo = sim_open(&fs).unwrap();
        assert!(files_of(&repo, &snap).is_err());
        // The same content backed up again heals the snapshot.
        snapshot_of(&repo, &files[..1]);
        let r = repair(&repo, &opts()).unwrap();
        assert_eq!(r.snapshots_healed, 1, "{r:?}");
        drop(repo);
        let repo = sim_open(&fs).unwrap();
        assert!(files_of(&repo, &snap).unwrap()["a"] == files[0].1);
    }

    #[test]
    fn a_read_error_stops_the_repair_and_quarantines_nothing() {
        let (fs, repo) = sim_repo(small_config(Encryption::None));
        snapshot_of(&repo, &[("a", bytes(1, 300_000)), ("b", bytes(2, 900_000))]);
        drop(repo);
        let repo = sim_open(&fs).unwrap();
        let packs = repo.backend().list(FileKind::Pack).unwrap();
        // Every read from now on fails, as a disk going away would.
        fs.reset_faults();
        fs.inject(Fault {
            op: Some(Op::Read),
            nth: 0,
            effect: Effect::Fail {
                errno: libc::EIO,
                sticky: true,
            },
        });
        let err = repair(&repo, &opts()).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Io, "{err}");
        fs.reset_faults();
        assert_eq!(repo.backend().list(FileKind::Pack).unwrap(), packs);
        assert!(fs.files_under(Path::new("/repo/quarantine")).is_empty());
    }

    #[test]
    fn a_pack_whose_trailer_is_garbage_is_quarantined_and_incomplete_files_go() {
        let (fs, repo) = sim_repo(small_config(Encryption::Aes256Gcm));
        let snap = snapshot_of(&repo, &[("a", bytes(1, 1000))]);
        let pack = repo.index().packs().unwrap()[0];
        let path = pack_path(&pack);
        let mut content = fs.files_under(&path).remove(0).1;
        let n = content.len();
        content[n - 20] ^= 0xff; // inside the sealed trailer
        fs.tamper(&path, content).unwrap();
        let tmp = repo.backend().create(FileKind::Pack).unwrap();
        std::mem::forget(tmp); // a writer killed mid-pack
        drop(repo);
        let repo = sim_open(&fs).unwrap();
        let r = repair(&repo, &opts()).unwrap();
        assert_eq!(r.packs_unreadable, vec![pack]);
        assert_eq!(r.incomplete_files_removed, 1);
        assert_eq!(r.snapshots_damaged.len(), 1);
        assert_eq!(r.snapshots_damaged[0].snapshot, snap);
    }
}
