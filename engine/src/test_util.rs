//! What the crate's unit tests share: scratch repositories (on disk, or on the
//! in-memory [`SimFs`]) and snapshots made straight from bytes.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::blob::BlobKind;
use crate::config::Config;
use crate::crypto::Encryption;
use crate::id::SnapshotId;
use crate::keyfile::KdfParams;
use crate::repository::OpenOptions;
use crate::saver::BlobSaver;
use crate::snapshot::{Manifest, SnapshotKind, Summary};
use crate::store::sim::SimFs;
use crate::store::{Backend, BlobDirectory, FileKind, LocalBackend};
use crate::tree::{Extent, Node, NodeKind, Tree};
use crate::Repository;

/// A repository in `dir/repo` made with `config`, its key derived cheaply.
pub fn repo_in(dir: &std::path::Path, config: Config) -> Repository {
    Repository::init_with(&dir.join("repo"), b"pw", config, KdfParams::TEST_ONLY_WEAK).unwrap()
}

pub fn sim_backend(fs: &SimFs) -> Arc<dyn Backend> {
    Arc::new(LocalBackend::with_fs("/repo", Arc::new(fs.clone())))
}

/// 1 MiB packs (the smallest), no compression.
pub fn small_config(encryption: Encryption) -> Config {
    let mut c = Config::new(encryption);
    c.pack_size = 1 << 20;
    c.compression_level = 0;
    c
}

/// A new repository on a new in-memory filesystem (index in memory).
pub fn sim_repo(config: Config) -> (SimFs, Repository) {
    let fs = SimFs::new();
    let repo = Repository::init_on(
        sim_backend(&fs),
        &OpenOptions::default(),
        b"pw",
        config,
        KdfParams::TEST_ONLY_WEAK,
    )
    .unwrap();
    (fs, repo)
}

/// Opens the repository on `fs` as a new process would (index rebuilt from the packs).
pub fn sim_open(fs: &SimFs) -> crate::Result<Repository> {
    Repository::open_with(sim_backend(fs), &OpenOptions::default(), &|| {
        Ok(zeroize::Zeroizing::new(b"pw".to_vec()))
    })
}

/// Deterministic bytes, different for each `seed`.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// A snapshot of one directory holding `files` (name, content), each file one blob,
/// saved and committed as a backup would.
pub fn snapshot_of(repo: &Repository, files: &[(&str, Vec<u8>)]) -> SnapshotId {
    let saver = BlobSaver::new(repo);
    let mut nodes = Vec::new();
    for (name, data) in files {
        let (id, _) = saver.save(BlobKind::Data, data).unwrap();
        nodes.push(Node {
            mode: 0o644,
            size: data.len() as u64,
            content: vec![Extent {
                blob: Some(id),
                len: data.len() as u64,
            }],
            ..Node::new(name.as_bytes().to_vec(), NodeKind::File)
        });
    }
    let mut tree = Tree { nodes };
    tree.sort();
    let (root, _) = saver.save_tree(tree).unwrap();
    saver.flush().unwrap();
    let manifest = Manifest {
        time: chrono::Utc::now(),
        host: "test".into(),
        user: "test".into(),
        kind: SnapshotKind::Tree,
        paths: vec!["/data".into()],
        name: None,
        tags: Vec::new(),
        parent: None,
        root,
        summary: Summary::default(),
        meta: BTreeMap::new(),
    };
    repo.save_snapshot(&manifest).unwrap()
}

/// The content of every file of a snapshot made by [`snapshot_of`], by name.
pub fn files_of(repo: &Repository, id: &SnapshotId) -> crate::Result<BTreeMap<String, Vec<u8>>> {
    let snap = repo.load_snapshot(id)?;
    let tree = repo.load_tree(&snap.manifest.root)?;
    let mut out = BTreeMap::new();
    for n in &tree.nodes {
        let mut data = Vec::new();
        for e in &n.content {
            if let Some(b) = e.blob {
                data.extend(repo.read_blob(&b)?);
            }
        }
        out.insert(String::from_utf8_lossy(&n.name).into_owned(), data);
    }
    Ok(out)
}

/// A backend with a blob directory in memory over another, as a repository server keeps
/// one: for the tests of known-chunk negotiation. Tests plant false rows in `rows` by
/// hand; `pack_sizes_asked` counts the packs whose size was asked (every trailer read
/// starts with it).
pub struct WithDirectory {
    pub inner: Arc<dyn Backend>,
    pub rows: std::sync::Mutex<Vec<(crate::id::BlobId, crate::id::PackId)>>,
    pub pack_sizes_asked: std::sync::atomic::AtomicUsize,
    /// Questions asked ([`BlobDirectory::locate`] calls).
    pub locates: std::sync::atomic::AtomicUsize,
}

impl WithDirectory {
    pub fn over(inner: Arc<dyn Backend>) -> Self {
        Self {
            inner,
            rows: std::sync::Mutex::default(),
            pack_sizes_asked: std::sync::atomic::AtomicUsize::new(0),
            locates: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    pub fn locates(&self) -> usize {
        self.locates.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn sizes_asked(&self) -> usize {
        self.pack_sizes_asked
            .load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl Backend for WithDirectory {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn create_layout(&self) -> std::io::Result<()> {
        self.inner.create_layout()
    }
    fn read(&self, kind: FileKind, name: &str) -> std::io::Result<Vec<u8>> {
        self.inner.read(kind, name)
    }
    fn read_at(
        &self,
        kind: FileKind,
        name: &str,
        offset: u64,
        len: usize,
    ) -> std::io::Result<Vec<u8>> {
        self.inner.read_at(kind, name, offset, len)
    }
    fn size(&self, kind: FileKind, name: &str) -> std::io::Result<u64> {
        if kind == FileKind::Pack {
            self.pack_sizes_asked
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        self.inner.size(kind, name)
    }
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> std::io::Result<()> {
        self.inner.write(kind, name, data)
    }
    fn list(&self, kind: FileKind) -> std::io::Result<Vec<String>> {
        self.inner.list(kind)
    }
    fn remove(&self, kind: FileKind, name: &str) -> std::io::Result<()> {
        self.inner.remove(kind, name)
    }
    fn quarantine(&self, kind: FileKind, name: &str) -> std::io::Result<()> {
        self.inner.quarantine(kind, name)
    }
    fn modified(&self, kind: FileKind, name: &str) -> std::io::Result<std::time::SystemTime> {
        self.inner.modified(kind, name)
    }
    fn remove_incomplete(&self, age: std::time::Duration) -> std::io::Result<(u64, u64)> {
        self.inner.remove_incomplete(age)
    }
    fn directory(&self) -> Option<&dyn BlobDirectory> {
        Some(self)
    }
}

impl BlobDirectory for WithDirectory {
    fn report(&self, pack: &crate::id::PackId, blobs: &[crate::id::BlobId]) -> std::io::Result<()> {
        let mut rows = self.rows.lock().unwrap();
        rows.extend(blobs.iter().map(|b| (*b, *pack)));
        Ok(())
    }
    fn locate(
        &self,
        ids: &[crate::id::BlobId],
    ) -> std::io::Result<Vec<(crate::id::BlobId, crate::id::PackId)>> {
        self.locates
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let rows = self.rows.lock().unwrap();
        Ok(rows
            .iter()
            .filter(|(b, _)| ids.contains(b))
            .copied()
            .collect())
    }
}
