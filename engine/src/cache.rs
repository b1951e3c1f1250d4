//! A host's cache of one repository: what this host keeps so as not to ask storage again.
//! Never inside the repository (SQLite over NFS or an object store is unsafe, and a
//! repository shared by many hosts would have them fight over one index).
//!
//! Layout, under a cache root (`$REPO_CACHE_DIR`, else `~/.cache/cairn`):
//!
//! ```text
//! <repository id>-<hash of its location>/
//!     location             the repository's location, for a human who looks
//!     index.sqlite         the blob index (crate::index), rebuilt from pack trailers if lost
//!     snapshots/<id>       sealed manifests as storage holds them (content-addressed)
//! ```
//!
//! The directory is keyed by the repository's id *and* its location: a repository
//! copied elsewhere (`cp -a`, a bucket synced to a disk) has the same id but other
//! contents from then on, and must not share an index with its original.
//!
//! Everything here is a copy of what storage holds: deleting the cache costs time, never
//! data. A cached manifest is authenticated on every use like one read from storage.

use std::io;
use std::path::{Path, PathBuf};

use crate::id::{RepoId, SnapshotId};

/// The environment variable that moves every repository's cache.
pub const CACHE_DIR_ENV: &str = "REPO_CACHE_DIR";

/// Where this host keeps its repository caches: `$REPO_CACHE_DIR`, else the user's cache
/// directory (`~/.cache/cairn`). `None` when neither is known (no home directory).
#[must_use]
pub fn default_root() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os(CACHE_DIR_ENV).filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(dir));
    }
    let home = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(home.join("cairn"))
}

/// One repository's cache directory on this host.
#[derive(Debug, Clone)]
pub struct RepositoryCache {
    dir: PathBuf,
}

impl RepositoryCache {
    /// The cache of repository `id` at `location` under `root`, made if missing (0700:
    /// manifests are sealed, but names and sizes are nobody else's business).
    pub fn open(root: &Path, id: &RepoId, location: &str) -> io::Result<Self> {
        let dir = root.join(Self::dir_name(id, location));
        std::fs::create_dir_all(dir.join("snapshots"))?;
        set_private(root)?;
        set_private(&dir)?;
        let note = dir.join("location");
        if std::fs::read_to_string(&note).ok().as_deref() != Some(location) {
            std::fs::write(&note, location)?;
        }
        Ok(Self { dir })
    }

    /// The directory name of a repository's cache.
    #[must_use]
    pub fn dir_name(id: &RepoId, location: &str) -> String {
        let place = blake3::hash(location.as_bytes());
        format!("{}-{}", id.0.to_hex(), &place.to_hex()[..12])
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The blob index's file.
    #[must_use]
    pub fn index_path(&self) -> PathBuf {
        self.dir.join("index.sqlite")
    }

    fn manifest_path(&self, id: &SnapshotId) -> PathBuf {
        self.dir.join("snapshots").join(id.to_hex())
    }

    /// A manifest's sealed bytes, if cached.
    #[must_use]
    pub fn manifest(&self, id: &SnapshotId) -> Option<Vec<u8>> {
        std::fs::read(self.manifest_path(id)).ok()
    }

    /// Keeps a manifest's sealed bytes (best effort: a cache that cannot be written is
    /// only slower).
    pub fn put_manifest(&self, id: &SnapshotId, bytes: &[u8]) {
        let path = self.manifest_path(id);
        let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
        let result = std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            tracing::debug!("manifest {id} not cached: {e}");
        }
    }

    /// Drops a manifest (its snapshot was forgotten, or its copy failed to authenticate).
    pub fn forget_manifest(&self, id: &SnapshotId) {
        let _ = std::fs::remove_file(self.manifest_path(id));
    }

    /// Drops the cached manifests of snapshots storage no longer lists (forgotten by
    /// another host).
    pub fn retain_manifests(&self, listed: &std::collections::HashSet<SnapshotId>) {
        let Ok(entries) = std::fs::read_dir(self.dir.join("snapshots")) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let keep = name
                .to_str()
                .and_then(|n| n.parse::<SnapshotId>().ok())
                .is_some_and(|id| listed.contains(&id));
            if !keep {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Moves an index that an older version kept inside a local repository
    /// (`<repository>/index.sqlite`) into this cache, unless the cache has one already.
    /// Failing to move it only costs a rebuild from the pack trailers.
    pub fn adopt_index(&self, old: &Path) {
        let new = self.index_path();
        if !old.exists() {
            return;
        }
        if !new.exists() {
            let copied = std::fs::copy(old, &new).and_then(|_| {
                for ext in ["-wal", "-shm"] {
                    let from = PathBuf::from(format!("{}{ext}", old.display()));
                    if from.exists() {
                        std::fs::copy(&from, format!("{}{ext}", new.display()))?;
                    }
                }
                Ok(())
            });
            if let Err(e) = copied {
                tracing::debug!("the old index in {} was not moved: {e}", old.display());
                for ext in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{ext}", new.display()));
                }
                return;
            }
            tracing::info!(
                "the index moved out of the repository, to {}",
                new.display()
            );
        }
        for ext in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{ext}", old.display()));
        }
    }
}

fn set_private(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(dir)?;
    if meta.permissions().mode() & 0o077 != 0 {
        // A cache root that is someone's shared directory (`/tmp`) is left alone.
        if meta.permissions().mode() & 0o1000 == 0 {
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Id;

    #[test]
    fn one_directory_per_repository_and_place() {
        let d = tempfile::tempdir().unwrap();
        let id = RepoId(Id::random());
        let a = RepositoryCache::open(d.path(), &id, "/srv/a").unwrap();
        let again = RepositoryCache::open(d.path(), &id, "/srv/a").unwrap();
        let copy = RepositoryCache::open(d.path(), &id, "/srv/copy-of-a").unwrap();
        assert_eq!(a.dir(), again.dir());
        assert_ne!(a.dir(), copy.dir());
        assert_eq!(
            std::fs::read_to_string(a.dir().join("location")).unwrap(),
            "/srv/a"
        );
        let s = SnapshotId(Id::random());
        assert!(a.manifest(&s).is_none());
        a.put_manifest(&s, b"sealed");
        assert_eq!(a.manifest(&s).unwrap(), b"sealed");
        assert!(copy.manifest(&s).is_none());
        a.retain_manifests(&std::collections::HashSet::new());
        assert!(a.manifest(&s).is_none());
    }

    #[test]
    fn an_old_index_inside_the_repository_is_moved_out() {
        let d = tempfile::tempdir().unwrap();
        let repo = d.path().join("repo");
        std::fs::create_dir(&repo).unwrap();
        std::fs::write(repo.join("index.sqlite"), b"old index").unwrap();
        std::fs::write(repo.join("index.sqlite-wal"), b"wal").unwrap();
        let cache =
            RepositoryCache::open(&d.path().join("cache"), &RepoId(Id::random()), "r").unwrap();
        cache.adopt_index(&repo.join("index.sqlite"));
        assert_eq!(std::fs::read(cache.index_path()).unwrap(), b"old index");
        assert!(!repo.join("index.sqlite").exists());
        assert!(!repo.join("index.sqlite-wal").exists());
    }
}
