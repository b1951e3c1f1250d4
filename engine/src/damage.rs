//! Damage marks: `damage/<snapshot id>`, written by `repair` for a snapshot that refers to
//! data the repository lost. The snapshot itself is never rewritten or deleted: what it
//! still has restores, and a later backup that stores the same content again (blob ids are
//! content hashes) makes it whole; the next `repair` then removes the mark.
//!
//! File: `seal(JSON mark, "cairn.damage.v1" | snapshot id)` (paths are secret like trees).

use std::collections::{BTreeSet, HashMap};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::id::{BlobId, SnapshotId};
use crate::repository::Repository;
use crate::store::FileKind;

const AAD: &[u8] = b"cairn.damage.v1";
/// At most this many paths are recorded per mark.
const MAX_PATHS: usize = 1000;

/// What a snapshot lost.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamageMark {
    pub time: DateTime<Utc>,
    /// Blobs (data or trees) the snapshot needs and the repository does not have.
    pub lost_blobs: Vec<String>,
    /// Paths that cannot be restored whole (a directory when its tree is lost), at most
    /// 1000.
    pub paths: Vec<String>,
    /// How many paths there are in all.
    pub paths_total: u64,
}

fn aad(id: &SnapshotId) -> Vec<u8> {
    let mut a = AAD.to_vec();
    a.extend_from_slice(id.as_bytes());
    a
}

/// Writes (replaces) the mark of `snap`.
pub fn write(repo: &Repository, snap: &SnapshotId, mark: &DamageMark) -> Result<()> {
    let json = serde_json::to_vec(mark)
        .map_err(|e| Error::InvalidInput(format!("encoding damage mark: {e}")))?;
    let sealed = repo.crypto().seal(&json, &aad(snap));
    repo.backend()
        .write(FileKind::Damage, &snap.to_hex(), &sealed)
        .ctx(|| format!("writing damage/{snap}"))
}

/// Removes the mark of `snap` (missing is fine).
pub fn clear(repo: &Repository, snap: &SnapshotId) -> Result<()> {
    repo.backend()
        .remove(FileKind::Damage, &snap.to_hex())
        .ctx(|| format!("removing damage/{snap}"))
}

/// Opens and parses the mark of `snap` (the bytes of `damage/<snap>`).
pub fn decode(
    crypto: &crate::crypto::Crypto,
    snap: &SnapshotId,
    sealed: &[u8],
) -> Result<DamageMark> {
    let what = || format!("damage/{snap}");
    let plain = crypto.open(sealed, &aad(snap), &what)?;
    serde_json::from_slice::<DamageMark>(&plain).map_err(|e| Error::corrupt(what(), e.to_string()))
}

/// Every mark, by snapshot (marks that do not decode are reported and skipped).
pub fn all(repo: &Repository) -> Result<HashMap<SnapshotId, DamageMark>> {
    let mut out = HashMap::new();
    for name in repo
        .backend()
        .list(FileKind::Damage)
        .ctx(|| "listing damage marks".into())?
    {
        let Ok(id) = name.parse::<SnapshotId>() else {
            continue;
        };
        let sealed = repo
            .backend()
            .read(FileKind::Damage, &name)
            .ctx(|| format!("reading damage/{name}"))?;
        match decode(repo.crypto(), &id, &sealed) {
            Ok(m) => {
                out.insert(id, m);
            }
            Err(e) => tracing::warn!("skipping damage mark: {e}"),
        }
    }
    Ok(out)
}

/// Whether any snapshot carries a mark (cheap: a directory listing).
pub fn any(repo: &Repository) -> Result<bool> {
    Ok(!repo
        .backend()
        .list(FileKind::Damage)
        .ctx(|| "listing damage marks".into())?
        .is_empty())
}

/// Removes the marks of snapshots that no longer exist.
pub fn forget_orphans(repo: &Repository) -> Result<u64> {
    let snaps: BTreeSet<String> = repo
        .backend()
        .list(FileKind::Snapshot)
        .ctx(|| "listing snapshots".into())?
        .into_iter()
        .collect();
    let mut n = 0;
    for name in repo
        .backend()
        .list(FileKind::Damage)
        .ctx(|| "listing damage marks".into())?
    {
        if !snaps.contains(&name) {
            repo.backend()
                .remove(FileKind::Damage, &name)
                .ctx(|| format!("removing damage/{name}"))?;
            n += 1;
        }
    }
    Ok(n)
}

/// Whether everything below the tree `t` is in the index (trees also decode). `memo`
/// remembers the answer per tree, so snapshots sharing subtrees cost one walk.
pub fn is_whole(repo: &Repository, t: &BlobId, memo: &mut HashMap<BlobId, bool>) -> Result<bool> {
    is_whole_at(repo, t, memo, 0)
}

fn is_whole_at(
    repo: &Repository,
    t: &BlobId,
    memo: &mut HashMap<BlobId, bool>,
    depth: usize,
) -> Result<bool> {
    if let Some(w) = memo.get(t) {
        return Ok(*w);
    }
    if depth > crate::tree::MAX_DEPTH {
        return Ok(false);
    }
    let tree = if repo.index().contains(t)? {
        repo.load_tree(t).ok()
    } else {
        None
    };
    let mut whole = tree.is_some();
    if let Some(tree) = tree {
        for n in &tree.nodes {
            for b in n.content_blobs() {
                if !repo.index().contains(&b)? {
                    whole = false;
                }
            }
            if let Some(sub) = n.subtree {
                if !is_whole_at(repo, &sub, memo, depth + 1)? {
                    whole = false;
                }
            }
        }
    }
    memo.insert(*t, whole);
    Ok(whole)
}

/// Walks a snapshot without stopping at losses: the blobs it needs that the index lacks
/// or that do not decode (trees), and the paths that need them.
pub fn scan(repo: &Repository, root: &BlobId) -> Result<(BTreeSet<BlobId>, Vec<PathBuf>)> {
    let mut lost = BTreeSet::new();
    let mut paths = Vec::new();
    let mut stack: Vec<(BlobId, PathBuf)> = vec![(*root, PathBuf::from("/"))];
    while let Some((t, path)) = stack.pop() {
        let tree = if repo.index().contains(&t)? {
            repo.load_tree(&t).ok()
        } else {
            None
        };
        let Some(tree) = tree else {
            lost.insert(t);
            paths.push(path);
            continue;
        };
        for n in &tree.nodes {
            let p = path.join(std::ffi::OsStr::from_bytes(&n.name));
            let mut hit = false;
            for b in n.content_blobs() {
                if !repo.index().contains(&b)? {
                    lost.insert(b);
                    hit = true;
                }
            }
            if hit {
                paths.push(p.clone());
            }
            if let Some(sub) = n.subtree {
                stack.push((sub, p));
            }
        }
    }
    paths.sort();
    Ok((lost, paths))
}

/// The mark for a scan's result.
#[must_use]
pub fn mark_of(lost: &BTreeSet<BlobId>, paths: &[PathBuf]) -> DamageMark {
    DamageMark {
        time: Utc::now(),
        lost_blobs: lost.iter().map(BlobId::to_hex).collect(),
        paths: paths
            .iter()
            .take(MAX_PATHS)
            .map(|p: &PathBuf| Path::new(p).to_string_lossy().into_owned())
            .collect(),
        paths_total: paths.len() as u64,
    }
}
