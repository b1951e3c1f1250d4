//! `check`: does the repository hold everything its snapshots need, intact?
//!
//! Structure (always): every snapshot manifest decodes; every tree reachable from a
//! snapshot decodes and validates; every blob a tree references is in the index; every
//! pack's trailer reads and agrees with the index. Data (`read_data`, or a subset of the
//! packs): every pack is read whole, its name checked against its BLAKE3 hash, and every
//! blob in it decrypted, decompressed and re-hashed, packs in parallel.
//! The report names each damaged pack and blob, and the snapshots and files that need them.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde::Serialize;

use crate::blob::BlobKind;
use crate::error::Result;
use crate::id::{BlobId, Id, PackId, SnapshotId};
use crate::pack;
use crate::progress::Progress;
use crate::repository::{Repository, TrailerResult};
use crate::store::FileKind;
use crate::tree::NodeKind;
use crate::walk;

#[derive(Debug, Clone, Copy, Default)]
pub struct CheckOptions {
    /// Read and verify the data of the packs.
    pub read_data: bool,
    /// Only the packs of subset `n` of `m` (1-based), e.g. (1, 10).
    pub subset: Option<(u32, u32)>,
}

/// Parses a subset of the packs, `N/M` (1 <= N <= M): what `check --read-data-subset`,
/// a job's `verify.check` and the API accept.
pub fn parse_subset(s: &str) -> std::result::Result<(u32, u32), String> {
    let (n, m) = s
        .split_once('/')
        .ok_or_else(|| format!("{s:?}: give N/M, e.g. 1/10"))?;
    let (n, m): (u32, u32) = (
        n.trim()
            .parse()
            .map_err(|_| format!("{s:?}: N is not a number (N/M, e.g. 1/10)"))?,
        m.trim()
            .parse()
            .map_err(|_| format!("{s:?}: M is not a number (N/M, e.g. 1/10)"))?,
    );
    if n == 0 || m == 0 || n > m {
        return Err(format!("{s:?}: need 1 <= N <= M (N/M, e.g. 1/10)"));
    }
    Ok((n, m))
}

/// One problem found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// What is damaged: `pack <id>`, `blob <id>`, `snapshot <id>`, `tree <id>`.
    pub object: String,
    pub message: String,
}

/// A snapshot file that cannot be restored whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Affected {
    pub snapshot: SnapshotId,
    pub path: PathBuf,
    pub blob: BlobId,
    /// `repair` recorded this snapshot's loss already (a damage mark).
    pub recorded: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckReport {
    pub snapshots: u64,
    pub trees: u64,
    pub blobs_referenced: u64,
    pub packs: u64,
    pub packs_read: u64,
    pub bytes_read: u64,
    pub problems: Vec<Problem>,
    pub affected: Vec<Affected>,
    /// Snapshots carrying a damage mark from `repair`.
    pub snapshots_marked_damaged: u64,
}

impl CheckReport {
    #[must_use]
    pub fn ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Checks `repo`; see the module docs.
pub fn check(repo: &Repository, opts: &CheckOptions, progress: &Progress) -> Result<CheckReport> {
    let mut report = CheckReport::default();
    let mut damaged: HashSet<BlobId> = HashSet::new();

    // Packs: every trailer must read and agree with the index.
    let names = repo
        .backend()
        .list(FileKind::Pack)
        .map_err(|e| crate::Error::io("listing packs", e))?;
    let packs: Vec<PackId> = names.iter().filter_map(|n| n.parse().ok()).collect();
    report.packs = packs.len() as u64;
    let trailers: Vec<(PackId, TrailerResult)> = packs
        .par_iter()
        .map(|p| (*p, repo.read_pack_trailer(p)))
        .collect();
    let mut in_packs: HashMap<BlobId, (PackId, BlobKind)> = HashMap::new();
    for (p, t) in &trailers {
        match t {
            Ok((_, entries)) => {
                for e in entries {
                    in_packs.entry(e.id).or_insert((*p, e.kind));
                }
            }
            Err(e) => report.problems.push(Problem {
                object: format!("pack {p}"),
                message: e.to_string(),
            }),
        }
    }

    // Snapshots and trees: every referenced blob must be somewhere.
    let snapshot_names = repo
        .backend()
        .list(FileKind::Snapshot)
        .map_err(|e| crate::Error::io("listing snapshots", e))?;
    let mut snapshots = Vec::new();
    for n in snapshot_names {
        let Ok(id) = n.parse::<SnapshotId>() else {
            continue;
        };
        match repo.read_snapshot(&id) {
            Ok(s) => snapshots.push(s),
            Err(e) => report.problems.push(Problem {
                object: format!("snapshot {id}"),
                message: e.to_string(),
            }),
        }
    }
    report.snapshots = snapshots.len() as u64;
    let mut seen_trees: HashSet<BlobId> = HashSet::new();
    let mut referenced: BTreeSet<BlobId> = BTreeSet::new();
    let mut bad_trees: Vec<(SnapshotId, BlobId)> = Vec::new();
    for s in &snapshots {
        let mut stack = vec![s.manifest.root];
        while let Some(t) = stack.pop() {
            if !seen_trees.insert(t) {
                continue;
            }
            referenced.insert(t);
            match repo.load_tree(&t) {
                Ok(tree) => {
                    for n in &tree.nodes {
                        referenced.extend(n.content_blobs());
                        if let Some(sub) = n.subtree {
                            stack.push(sub);
                        }
                    }
                }
                Err(e) => {
                    report.problems.push(Problem {
                        object: format!("tree {t}"),
                        message: e.to_string(),
                    });
                    damaged.insert(t);
                    bad_trees.push((s.id, t));
                }
            }
        }
    }
    report.trees = seen_trees.len() as u64;
    report.blobs_referenced = referenced.len() as u64;
    for b in &referenced {
        if !in_packs.contains_key(b) {
            if repo.index().contains(b)? {
                report.problems.push(Problem {
                    object: format!("blob {b}"),
                    message: "in the index but in no pack trailer".into(),
                });
            } else {
                report.problems.push(Problem {
                    object: format!("blob {b}"),
                    message: "missing: in no pack".into(),
                });
            }
            damaged.insert(*b);
        }
    }

    // Data.
    if opts.read_data {
        let chosen: Vec<&(PackId, TrailerResult)> = trailers
            .iter()
            .filter(|(p, t)| t.is_ok() && in_subset(p, opts.subset))
            .collect();
        Progress::add(&progress.total_files, chosen.len() as u64);
        progress
            .total_known
            .store(true, std::sync::atomic::Ordering::Relaxed);
        let results: Vec<(u64, Vec<Problem>, Vec<BlobId>)> = chosen
            .par_iter()
            .map(|(p, t)| {
                let entries = t.as_ref().map(|(_, e)| e.as_slice()).unwrap_or_default();
                let r = read_pack(repo, p, entries);
                Progress::add(&progress.files_done, 1);
                Progress::add(&progress.bytes_done, r.0);
                r
            })
            .collect();
        for (bytes, problems, bad) in results {
            report.packs_read += 1;
            report.bytes_read += bytes;
            report.problems.extend(problems);
            damaged.extend(bad);
        }
    }

    // Who needs the damaged blobs.
    let marks = crate::damage::all(repo)?;
    report.snapshots_marked_damaged = marks.len() as u64;
    if !damaged.is_empty() {
        for s in &snapshots {
            for (sid, t) in &bad_trees {
                if *sid == s.id {
                    report.affected.push(Affected {
                        snapshot: s.id,
                        path: PathBuf::from("/"),
                        blob: *t,
                        recorded: marks.contains_key(&s.id),
                    });
                }
            }
            let _ = walk::walk(repo, &s.manifest.root, Path::new("/"), &mut |p, n| {
                let hit = n
                    .content_blobs()
                    .chain(n.subtree)
                    .find(|b| damaged.contains(b));
                if let Some(b) = hit {
                    report.affected.push(Affected {
                        snapshot: s.id,
                        path: p.to_owned(),
                        blob: b,
                        recorded: marks.contains_key(&s.id),
                    });
                }
                Ok(n.kind == NodeKind::Dir)
            });
        }
    }
    Ok(report)
}

/// Whether pack `p` is in subset `n` of `m`: the first 8 bytes of its id (uniform: it
/// is a hash), as a number, modulo `m`. Any `m` splits the packs into `m` subsets of
/// about equal size.
fn in_subset(p: &PackId, subset: Option<(u32, u32)>) -> bool {
    subset.is_none_or(|(n, m)| {
        let mut first = [0u8; 8];
        first.copy_from_slice(&p.as_bytes()[..8]);
        u64::from_le_bytes(first) % u64::from(m.max(1)) == u64::from(n.saturating_sub(1))
    })
}

/// Reads one pack whole and verifies it; returns bytes read, problems and damaged blobs.
fn read_pack(
    repo: &Repository,
    p: &PackId,
    entries: &[pack::PackEntry],
) -> (u64, Vec<Problem>, Vec<BlobId>) {
    let object = format!("pack {p}");
    let bytes = match repo.backend().read(FileKind::Pack, &p.to_hex()) {
        Ok(b) => b,
        Err(e) => {
            return (
                0,
                vec![Problem {
                    object,
                    message: e.to_string(),
                }],
                entries.iter().map(|e| e.id).collect(),
            );
        }
    };
    let mut problems = Vec::new();
    let mut bad = Vec::new();
    if PackId(Id::hash_of(&bytes)) != *p {
        problems.push(Problem {
            object: object.clone(),
            message: "content does not match its name (damaged)".into(),
        });
    }
    for e in entries {
        let r = pack::verified_blob(repo.crypto(), &bytes, e);
        if let Err(err) = r {
            let message = match err {
                crate::Error::Corrupt { reason, .. } => reason,
                other => other.to_string(),
            };
            problems.push(Problem {
                object: format!("blob {} in pack {p}", e.id),
                message,
            });
            bad.push(e.id);
        }
    }
    (bytes.len() as u64, problems, bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subsets_partition_the_packs_evenly_for_any_count() {
        let packs: Vec<PackId> = (0..20_000u32)
            .map(|i| PackId(Id::hash_of(&i.to_le_bytes())))
            .collect();
        for m in [1u32, 3, 10, 256, 1000] {
            let mut sizes = vec![0u32; m as usize];
            for p in &packs {
                let hits: Vec<u32> = (1..=m).filter(|n| in_subset(p, Some((*n, m)))).collect();
                assert_eq!(hits.len(), 1, "pack in {} subsets of {m}", hits.len());
                sizes[hits[0] as usize - 1] += 1;
            }
            // Every subset is used and none is more than twice the mean (the old rule,
            // the first byte only, left subsets 257..M empty).
            let mean = packs.len() as u32 / m;
            assert!(
                sizes.iter().all(|&s| s > 0 && s < 2 * mean + 10),
                "m={m}: {:?}",
                &sizes[..sizes.len().min(20)]
            );
        }
    }
}

#[cfg(test)]
mod on_repositories {
    use super::*;
    use crate::crypto::Encryption;
    use crate::test_util::{bytes, sim_open, sim_repo, small_config, snapshot_of};

    fn run(repo: &Repository, read_data: bool) -> CheckReport {
        check(
            repo,
            &CheckOptions {
                read_data,
                subset: None,
            },
            &Progress::default(),
        )
        .unwrap()
    }

    #[test]
    fn a_whole_repository_checks_and_damage_is_named_with_the_files_that_need_it() {
        let (fs, repo) = sim_repo(small_config(Encryption::Aes256Gcm));
        let snap = snapshot_of(&repo, &[("a", bytes(1, 5000)), ("b", bytes(2, 5000))]);
        let r = run(&repo, true);
        assert!(r.ok(), "{r:?}");
        assert_eq!((r.snapshots, r.trees, r.blobs_referenced), (1, 1, 3));
        assert_eq!(r.packs_read, 2); // the data and the tree

        // A byte flipped inside blob b: only reading the data finds it.
        let root = repo.load_snapshot(&snap).unwrap().manifest.root;
        let b = repo.load_tree(&root).unwrap().nodes[1].content[0]
            .blob
            .unwrap();
        let loc = repo.locate(&b).unwrap();
        let hex = loc.pack.to_hex();
        let path = std::path::Path::new("/repo/data")
            .join(&hex[..2])
            .join(&hex);
        let mut content = fs.files_under(&path).remove(0).1;
        content[loc.offset as usize + 30] ^= 4;
        fs.tamper(&path, content).unwrap();
        drop(repo);
        let repo = sim_open(&fs).unwrap();
        assert!(run(&repo, false).ok());
        let r = run(&repo, true);
        assert!(!r.ok());
        assert!(r
            .problems
            .iter()
            .any(|p| p.object == format!("blob {b} in pack {}", loc.pack)));
        assert_eq!(r.affected.len(), 1, "{:?}", r.affected);
        assert_eq!(r.affected[0].path, PathBuf::from("/b"));
        assert_eq!(r.affected[0].snapshot, snap);

        // The pack gone: every blob of it is missing, found without reading data.
        fs.tamper(&path, Vec::new()).unwrap();
        drop(repo);
        let repo = sim_open(&fs).unwrap();
        let r = run(&repo, false);
        assert!(
            r.problems.iter().any(|p| p.object.starts_with("pack ")),
            "{r:?}"
        );
        // The data pack (trees have packs of their own): both files lose their data.
        let mut paths: Vec<_> = r.affected.iter().map(|a| a.path.clone()).collect();
        paths.sort();
        assert_eq!(
            paths,
            vec![PathBuf::from("/a"), PathBuf::from("/b")],
            "{:?}",
            r.affected
        );
    }
}
