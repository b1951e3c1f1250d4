//! Reading a snapshot's tree: resolving a path inside it and walking below a node.
//! Paths inside a snapshot are absolute (`/var/lib/x`), built from raw name bytes.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

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
