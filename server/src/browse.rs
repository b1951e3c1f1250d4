//! Snapshots through the API: list a directory, read a file, restore to a path on this
//! host, forget. Paths inside a snapshot and restore targets are checked here, before
//! anything is read or written: no `..` anywhere, a target that is absolute and new (or
//! an empty directory), so that a request cannot climb out of a snapshot or write over
//! a host's files.

use std::path::{Component, Path, PathBuf};

use cairn_engine::progress::Progress;
use cairn_engine::snapshot::{self, Snapshot, SnapshotFilter};
use cairn_engine::tree::{Node, NodeKind};
use cairn_engine::walk::{self, Entry};
use cairn_engine::Repository;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum BrowseError {
    #[error("{0}")]
    BadPath(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Engine(#[from] cairn_engine::Error),
}

impl BrowseError {
    fn from_engine(e: cairn_engine::Error) -> Self {
        match e {
            cairn_engine::Error::NotFound(m) => Self::NotFound(m),
            cairn_engine::Error::InvalidInput(m) => Self::BadPath(m),
            other => Self::Engine(other),
        }
    }
}

/// A path inside a snapshot: absolute, without `.`, `..` or empty components.
pub fn snapshot_path(raw: &str) -> Result<PathBuf, BrowseError> {
    let p = Path::new(raw);
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::Prefix(_) => {
                return Err(BrowseError::BadPath(format!(
                    "path {raw:?}: `..` is not allowed"
                )))
            }
        }
    }
    if raw.contains('\0') {
        return Err(BrowseError::BadPath("path: a NUL byte".into()));
    }
    Ok(out)
}

/// Where a restore may write: an absolute path without `..`, that does not exist yet
/// (its parent must) or is an empty directory.
pub fn restore_target(raw: &str) -> Result<PathBuf, BrowseError> {
    let p = PathBuf::from(raw);
    if !p.is_absolute() {
        return Err(BrowseError::BadPath(format!(
            "target {raw:?}: give an absolute path (for example /var/tmp/restore)"
        )));
    }
    if p.components().any(|c| matches!(c, Component::ParentDir)) || raw.contains('\0') {
        return Err(BrowseError::BadPath(format!(
            "target {raw:?}: `..` is not allowed"
        )));
    }
    match std::fs::symlink_metadata(&p) {
        Ok(m) if m.is_dir() => {
            let empty = std::fs::read_dir(&p)
                .map(|mut d| d.next().is_none())
                .unwrap_or(false);
            if !empty {
                return Err(BrowseError::Conflict(format!(
                    "target {raw:?} is not empty: a restore never writes over files"
                )));
            }
        }
        Ok(_) => {
            return Err(BrowseError::Conflict(format!(
                "target {raw:?} exists and is not a directory"
            )))
        }
        Err(_) => {
            let parent = p.parent().unwrap_or(Path::new("/"));
            if !parent.is_dir() {
                return Err(BrowseError::BadPath(format!(
                    "target {raw:?}: its parent {} is not a directory",
                    parent.display()
                )));
            }
        }
    }
    Ok(p)
}

/// The snapshot `spec` (an id prefix or `latest`) names.
pub fn find(repo: &Repository, spec: &str) -> Result<Snapshot, BrowseError> {
    let all = repo.snapshots()?;
    snapshot::select(&all, spec, &SnapshotFilter::default())
        .cloned()
        .map_err(BrowseError::from_engine)
}

/// One entry of a directory listing.
#[derive(Debug, Clone, Serialize)]
pub struct EntryView {
    pub name: String,
    pub path: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub size: u64,
    pub mode: u32,
    pub mtime: Option<chrono::DateTime<chrono::Utc>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

fn view(path: &Path, n: &Node) -> EntryView {
    EntryView {
        name: String::from_utf8_lossy(&n.name).into_owned(),
        path: path.to_string_lossy().into_owned(),
        kind: n.kind.as_str().to_owned(),
        size: n.size,
        mode: n.mode,
        mtime: chrono::DateTime::from_timestamp(n.mtime.sec, n.mtime.nsec),
        target: n
            .target
            .as_ref()
            .map(|t| String::from_utf8_lossy(t).into_owned()),
    }
}

/// The entries of directory `path` of `snap` (one level), or the one entry it names.
pub fn list(
    repo: &Repository,
    snap: &Snapshot,
    path: &Path,
) -> Result<Vec<EntryView>, BrowseError> {
    let entry = walk::resolve(repo, &snap.manifest.root, path).map_err(BrowseError::from_engine)?;
    let Some(tree) = entry.subtree() else {
        let Entry::Node(n) = &entry else {
            return Ok(Vec::new());
        };
        return Ok(vec![view(path, n)]);
    };
    let mut out = Vec::new();
    walk::walk(repo, &tree, path, &mut |p, n| {
        out.push(view(p, n));
        Ok(false)
    })?;
    Ok(out)
}

/// The file `path` of `snap` (its node, whose extents the caller reads).
pub fn file(repo: &Repository, snap: &Snapshot, path: &Path) -> Result<Node, BrowseError> {
    match walk::resolve(repo, &snap.manifest.root, path).map_err(BrowseError::from_engine)? {
        Entry::Node(n) if n.kind == NodeKind::File => Ok(*n),
        _ => Err(BrowseError::BadPath(format!(
            "{}: not a file",
            path.display()
        ))),
    }
}

/// Calls `out` with the file's bytes in order, a blob (or up to 1 MiB of a hole) at a
/// time; stops at the first error `out` returns.
pub fn read_file(
    repo: &Repository,
    node: &Node,
    out: &mut dyn FnMut(Vec<u8>) -> bool,
) -> Result<(), BrowseError> {
    for e in &node.content {
        match e.blob {
            Some(id) => {
                if !out(repo.read_blob(&id)?) {
                    return Ok(());
                }
            }
            None => {
                let mut left = e.len;
                while left > 0 {
                    let n = left.min(1 << 20);
                    if !out(vec![0u8; usize::try_from(n).unwrap_or(0)]) {
                        return Ok(());
                    }
                    left -= n;
                }
            }
        }
    }
    Ok(())
}

/// What a restore of `snap` (or of `includes`) into `raw_target` would do, without
/// writing: how many files and bytes, and whether the target is refused (and what is
/// in it already) — a restore never writes over files.
#[derive(Debug, Clone, Serialize)]
pub struct RestorePreview {
    pub target: String,
    pub files: u64,
    pub bytes: u64,
    /// Why the restore would be refused, if it would.
    pub conflict: Option<String>,
    /// The first entries already in the target (up to [`PREVIEW_EXISTING`]).
    pub existing: Vec<String>,
}

/// How many of a target's entries a preview names.
pub const PREVIEW_EXISTING: usize = 20;

/// Plans a restore for [`RestorePreview`]; bad paths are still errors.
pub fn restore_preview(
    repo: &Repository,
    snap: &Snapshot,
    raw_target: &str,
    includes: &[PathBuf],
) -> Result<RestorePreview, BrowseError> {
    let conflict = match restore_target(raw_target) {
        Ok(_) => None,
        Err(BrowseError::Conflict(m)) => Some(m),
        Err(e) => return Err(e),
    };
    let existing = std::fs::read_dir(raw_target)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .take(PREVIEW_EXISTING)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    let roots = if includes.is_empty() {
        vec![PathBuf::from("/")]
    } else {
        includes.to_vec()
    };
    let (mut files, mut bytes) = (0, 0);
    let mut count = |n: &Node| {
        if n.kind == NodeKind::File {
            files += 1;
            bytes += n.size;
        }
    };
    for root in &roots {
        let entry =
            walk::resolve(repo, &snap.manifest.root, root).map_err(BrowseError::from_engine)?;
        if let Entry::Node(n) = &entry {
            count(n);
        }
        if let Some(tree) = entry.subtree() {
            walk::walk(repo, &tree, root, &mut |_, n| {
                count(n);
                Ok(true)
            })?;
        }
    }
    Ok(RestorePreview {
        target: raw_target.to_owned(),
        files,
        bytes,
        conflict,
        existing,
    })
}

/// Restores `snap` (or the paths `includes` of it) into `target` (checked by
/// [`restore_target`]).
pub fn restore(
    repo: &Repository,
    snap: &Snapshot,
    target: &Path,
    includes: &[PathBuf],
) -> Result<cairn_engine::restore::RestoreOutcome, BrowseError> {
    std::fs::create_dir_all(target)
        .map_err(|e| cairn_engine::Error::io(target.display().to_string(), e))?;
    let opts = cairn_engine::restore::RestoreOptions {
        target: target.to_owned(),
        includes: includes.to_vec(),
        threads: 0,
        no_sync: false,
    };
    cairn_engine::restore::restore(repo, snap, &opts, &Progress::default())
        .map_err(BrowseError::from_engine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_never_climb_out() {
        assert_eq!(
            snapshot_path("etc/hosts").unwrap(),
            PathBuf::from("/etc/hosts")
        );
        assert_eq!(snapshot_path("/./etc//x").unwrap(), PathBuf::from("/etc/x"));
        for bad in ["../etc/passwd", "/etc/../../x", "a/.."] {
            assert!(
                matches!(snapshot_path(bad), Err(BrowseError::BadPath(_))),
                "{bad}"
            );
        }
        let d = tempfile::tempdir().unwrap();
        let new = d.path().join("new");
        assert_eq!(restore_target(new.to_str().unwrap()).unwrap(), new);
        assert!(matches!(
            restore_target("relative/x"),
            Err(BrowseError::BadPath(_))
        ));
        assert!(matches!(
            restore_target(&format!("{}/../x", d.path().display())),
            Err(BrowseError::BadPath(_))
        ));
        std::fs::write(d.path().join("file"), b"x").unwrap();
        assert!(matches!(
            restore_target(d.path().to_str().unwrap()),
            Err(BrowseError::Conflict(_))
        ));
        assert!(matches!(
            restore_target(d.path().join("file").to_str().unwrap()),
            Err(BrowseError::Conflict(_))
        ));
        assert!(matches!(
            restore_target(d.path().join("no/such/dir").to_str().unwrap()),
            Err(BrowseError::BadPath(_))
        ));
    }
}
