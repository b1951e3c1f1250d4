//! Differences between two snapshots' trees: added, removed, modified and type-changed
//! paths. Equal subtrees (same blob id) are skipped without being read.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::Result;
use crate::id::BlobId;
use crate::repository::Repository;
use crate::tree::{Node, NodeKind, Tree};
use crate::walk;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Change {
    Added,
    Removed,
    /// Content changed.
    Modified,
    /// Only metadata (mode, owner, times, xattrs) changed.
    Metadata,
    /// The kind changed (a file became a directory, ...).
    Type,
}

impl Change {
    #[must_use]
    pub fn symbol(self) -> char {
        match self {
            Self::Added => '+',
            Self::Removed => '-',
            Self::Modified => 'M',
            Self::Metadata => 'U',
            Self::Type => 'T',
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiffEntry {
    pub path: PathBuf,
    pub change: Change,
}

/// Lists the changes from tree `a` to tree `b`, in path order.
pub fn diff(repo: &Repository, a: &BlobId, b: &BlobId) -> Result<Vec<DiffEntry>> {
    let mut out = Vec::new();
    diff_trees(repo, Some(a), Some(b), Path::new("/"), &mut out)?;
    Ok(out)
}

fn load(repo: &Repository, id: Option<&BlobId>) -> Result<Tree> {
    id.map_or_else(|| Ok(Tree::default()), |id| repo.load_tree(id))
}

fn all_below(
    repo: &Repository,
    n: &Node,
    p: &Path,
    change: Change,
    out: &mut Vec<DiffEntry>,
) -> Result<()> {
    out.push(DiffEntry {
        path: p.to_owned(),
        change,
    });
    if let Some(sub) = n.subtree {
        walk::walk(repo, &sub, p, &mut |q, _| {
            out.push(DiffEntry {
                path: q.to_owned(),
                change,
            });
            Ok(true)
        })?;
    }
    Ok(())
}

fn diff_trees(
    repo: &Repository,
    a: Option<&BlobId>,
    b: Option<&BlobId>,
    base: &Path,
    out: &mut Vec<DiffEntry>,
) -> Result<()> {
    if a == b {
        return Ok(());
    }
    if base.components().count() > crate::tree::MAX_DEPTH {
        return Err(crate::tree::too_deep(a.or(b).unwrap_or(&BlobId::default())));
    }
    let (ta, tb) = (load(repo, a)?, load(repo, b)?);
    let (mut i, mut j) = (0, 0);
    while i < ta.nodes.len() || j < tb.nodes.len() {
        let na = ta.nodes.get(i);
        let nb = tb.nodes.get(j);
        let order = match (na, nb) {
            (Some(x), Some(y)) => x.name.cmp(&y.name),
            (Some(_), None) => std::cmp::Ordering::Less,
            _ => std::cmp::Ordering::Greater,
        };
        match (order, na, nb) {
            (std::cmp::Ordering::Less, Some(x), _) => {
                all_below(repo, x, &walk::join(base, &x.name), Change::Removed, out)?;
                i += 1;
            }
            (std::cmp::Ordering::Greater, _, Some(y)) => {
                all_below(repo, y, &walk::join(base, &y.name), Change::Added, out)?;
                j += 1;
            }
            (_, Some(x), Some(y)) => {
                let p = walk::join(base, &x.name);
                if x.kind != y.kind {
                    out.push(DiffEntry {
                        path: p.clone(),
                        change: Change::Type,
                    });
                } else if (x.kind == NodeKind::File && (x.content != y.content || x.size != y.size))
                    || (x.kind == NodeKind::Symlink && x.target != y.target)
                {
                    out.push(DiffEntry {
                        path: p.clone(),
                        change: Change::Modified,
                    });
                } else if x.mode != y.mode
                    || x.uid != y.uid
                    || x.gid != y.gid
                    || x.mtime != y.mtime
                    || x.xattrs != y.xattrs
                {
                    out.push(DiffEntry {
                        path: p.clone(),
                        change: Change::Metadata,
                    });
                }
                if x.kind == NodeKind::Dir && y.kind == NodeKind::Dir {
                    diff_trees(repo, x.subtree.as_ref(), y.subtree.as_ref(), &p, out)?;
                }
                i += 1;
                j += 1;
            }
            _ => break,
        }
    }
    Ok(())
}
