//! Reading a snapshot's tree: resolving a path inside it and walking below a node.
//! Paths inside a snapshot are absolute (`/var/lib/x`), built from raw name bytes.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::id::BlobId;
use crate::repository::Repository;
use crate::tree::{Node, NodeKind};

/// What a path inside a snapshot names: the root directory or a node.
#[derive(Debug, Clone)]
pub enum Entry {
    Root(BlobId),
    Node(Box<Node>),
}

impl Entry {
    /// The tree below this entry, when it is a directory.
    #[must_use]
    pub fn subtree(&self) -> Option<BlobId> {
        match self {
            Self::Root(id) => Some(*id),
            Self::Node(n) => n.subtree,
        }
    }
}

/// Joins a raw name onto a path.
#[must_use]
pub fn join(base: &Path, name: &[u8]) -> PathBuf {
    base.join(OsStr::from_bytes(name))
}

/// Finds `path` (absolute, or relative to `/`) in the tree `root`.
pub fn resolve(repo: &Repository, root: &BlobId, path: &Path) -> Result<Entry> {
    let mut entry = Entry::Root(*root);
    for c in path.components() {
        let name = match c {
            Component::Normal(n) => n.as_bytes(),
            Component::RootDir | Component::CurDir => continue,
            _ => {
                return Err(Error::InvalidInput(format!(
                    "{}: `..` not allowed",
                    path.display()
                )))
            }
        };
        let Some(tree_id) = entry.subtree() else {
            return Err(Error::NotFound(format!(
                "{}: not in the snapshot",
                path.display()
            )));
        };
        let tree = repo.load_tree(&tree_id)?;
        let node = tree
            .nodes
            .into_iter()
            .find(|n| n.name == name)
            .ok_or_else(|| Error::NotFound(format!("{}: not in the snapshot", path.display())))?;
        entry = Entry::Node(Box::new(node));
    }
    Ok(entry)
}

/// Calls `f(path, node)` for every node below the tree `tree` (whose own path is `base`),
/// depth first, parents before children. `f` returns whether to descend into a directory.
pub fn walk(
    repo: &Repository,
    tree: &BlobId,
    base: &Path,
    f: &mut dyn FnMut(&Path, &Node) -> Result<bool>,
) -> Result<()> {
    if base.components().count() > crate::tree::MAX_DEPTH {
        return Err(crate::tree::too_deep(tree));
    }
    let t = repo.load_tree(tree)?;
    for n in &t.nodes {
        let p = join(base, &n.name);
        let descend = f(&p, n)?;
        if descend && n.kind == NodeKind::Dir {
            if let Some(sub) = n.subtree {
                walk(repo, &sub, &p, f)?;
            }
        }
    }
    Ok(())
}

/// Collects `make(path, node)` for every node below the tree `tree` (whose own path is
/// `base`) for which `keep` says yes, in the order of [`walk`] (depth first, parents
/// before children); `keep` also decides whether to descend into a directory. Subtrees
/// are loaded in parallel on the current rayon pool: a large snapshot's thousands of
/// small tree blobs are read many at a time instead of one after the other. Keep `T`
/// small (box a node): each level of the tree moves it once more.
pub fn collect<T: Send>(
    repo: &Repository,
    tree: &BlobId,
    base: &Path,
    keep: &(dyn Fn(&Path, &Node) -> bool + Sync),
    make: &(dyn Fn(PathBuf, Node) -> T + Sync),
) -> Result<Vec<T>> {
    if base.components().count() > crate::tree::MAX_DEPTH {
        return Err(crate::tree::too_deep(tree));
    }
    let t = repo.load_tree(tree)?;
    let parts: Vec<Vec<T>> = t
        .nodes
        .into_par_iter()
        .map(|n| {
            let p = join(base, &n.name);
            if !keep(&p, &n) {
                return Ok(Vec::new());
            }
            let below = match (n.kind, n.subtree) {
                (NodeKind::Dir, Some(sub)) => collect(repo, &sub, &p, keep, make)?,
                _ => Vec::new(),
            };
            let mut v = Vec::with_capacity(1 + below.len());
            v.push(make(p, n));
            v.extend(below);
            Ok(v)
        })
        .collect::<Result<_>>()?;
    let mut out = Vec::with_capacity(parts.iter().map(Vec::len).sum());
    for part in parts {
        out.extend(part);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::{backup_tree, TreeBackupOptions};
    use crate::config::Config;
    use crate::crypto::Encryption;
    use crate::progress::Progress;

    #[test]
    fn collect_gives_the_order_of_walk_and_skips_what_keep_refuses() {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        for dir in ["a/x/y", "a/z", "b", "c/skip/deep"] {
            std::fs::create_dir_all(src.join(dir)).unwrap();
        }
        for (i, f) in [
            "a/1", "a/x/2", "a/x/y/3", "a/z/4", "b/5", "c/6", "c/skip/7", "top",
        ]
        .iter()
        .enumerate()
        {
            std::fs::write(src.join(f), i.to_string()).unwrap();
        }
        let repo = crate::test_util::repo_in(d.path(), Config::new(Encryption::None));
        let opts = TreeBackupOptions {
            paths: vec![src.clone()],
            ..Default::default()
        };
        let snap = backup_tree(&repo, &opts, &Progress::default())
            .unwrap()
            .snapshot;
        let keep = |p: &Path, _: &Node| !p.ends_with("skip");
        let mut walked = Vec::new();
        walk(&repo, &snap.manifest.root, Path::new("/"), &mut |p, n| {
            let k = keep(p, n);
            if k {
                walked.push(p.to_owned());
            }
            Ok(k)
        })
        .unwrap();
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(4)
            .build()
            .unwrap();
        let collected = pool
            .install(|| collect(&repo, &snap.manifest.root, Path::new("/"), &keep, &|p, _| p))
            .unwrap();
        assert_eq!(collected, walked);
        assert!(collected.iter().any(|p| p.ends_with("a/x/y/3")));
        assert!(!collected
            .iter()
            .any(|p| p.to_string_lossy().contains("skip")));
        // Parents come before their children.
        for (i, p) in collected.iter().enumerate() {
            if let Some(parent) = p.parent().filter(|q| q.starts_with(&src)) {
                if parent != src {
                    assert!(collected[..i].iter().any(|q| q == parent), "{p:?}");
                }
            }
        }
    }
}
