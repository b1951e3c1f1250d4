//! What the engine's integration tests share: repositories on an in-memory filesystem
//! ([`SimFs`]), source trees with known content, and restores compared byte for byte.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cairn_engine::backup::{backup_tree, TreeBackupOptions};
use cairn_engine::chunker::ChunkerParams;
use cairn_engine::config::Config;
use cairn_engine::crypto::Encryption;
use cairn_engine::id::SnapshotId;
use cairn_engine::keyfile::KdfParams;
use cairn_engine::lock::LockKind;
use cairn_engine::progress::Progress;
use cairn_engine::repository::OpenOptions;
use cairn_engine::restore::{restore, RestoreOptions};
use cairn_engine::snapshot::Snapshot;
use cairn_engine::store::sim::SimFs;
use cairn_engine::store::{Backend, LocalBackend};
use cairn_engine::Repository;
use zeroize::Zeroizing;

/// Where the repository is on the simulated filesystem.
pub const ROOT: &str = "/repo";
pub const PASSWORD: &[u8] = b"pw";

pub fn backend(fs: &SimFs) -> Arc<dyn Backend> {
    Arc::new(LocalBackend::with_fs(ROOT, Arc::new(fs.clone())))
}

/// Opens the repository on `fs`, with an index in memory (rebuilt from the packs: a
/// process that starts after a crash, without the cache).
pub fn open(fs: &SimFs) -> cairn_engine::Result<Repository> {
    Repository::open_with(backend(fs), &OpenOptions::default(), &|| {
        Ok(Zeroizing::new(PASSWORD.to_vec()))
    })
}

/// A config for small tests: 1 MiB packs (the smallest), small chunks, no compression
/// (the data is random anyway).
pub fn small_config(encryption: Encryption) -> Config {
    let mut c = Config::new(encryption);
    c.pack_size = 1 << 20;
    c.compression_level = 0;
    c.chunker = ChunkerParams {
        min_size: 16 << 10,
        avg_size: 32 << 10,
        max_size: 64 << 10,
    };
    c
}

/// A new repository on a new simulated filesystem.
pub fn sim_repo(config: Config) -> (SimFs, Repository) {
    let fs = SimFs::new();
    let repo = Repository::init_on(
        backend(&fs),
        &OpenOptions::default(),
        PASSWORD,
        config,
        KdfParams::TEST_ONLY_WEAK,
    )
    .unwrap();
    (fs, repo)
}

/// Deterministic pseudo-random bytes.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(n + 8);
        while v.len() < n {
            v.extend_from_slice(&self.next().to_le_bytes());
        }
        v.truncate(n);
        v
    }
}

/// The content of a source tree: relative path -> bytes.
pub type Files = BTreeMap<String, Vec<u8>>;

/// A source directory on the real disk whose content a test sets and remembers.
pub struct Source {
    pub dir: PathBuf,
    _tmp: tempfile::TempDir,
}

impl Source {
    pub fn new() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("src");
        std::fs::create_dir(&dir).unwrap();
        Self { dir, _tmp: tmp }
    }

    /// Makes the directory hold exactly `files`.
    pub fn set(&self, files: &Files) {
        std::fs::remove_dir_all(&self.dir).unwrap();
        std::fs::create_dir(&self.dir).unwrap();
        for (rel, data) in files {
            let p = self.dir.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(&p, data).unwrap();
        }
    }

    /// Backs the directory up (under a shared lock, as `repo backup` does).
    pub fn backup(&self, repo: &Repository) -> cairn_engine::Result<Snapshot> {
        if !repo.has_lock() {
            repo.lock(LockKind::Shared, "backup", std::time::Duration::ZERO)?;
        }
        let out = backup_tree(
            repo,
            &TreeBackupOptions {
                paths: vec![self.dir.clone()],
                threads: 2,
                ..TreeBackupOptions::default()
            },
            &Progress::default(),
        );
        repo.unlock();
        Ok(out?.snapshot)
    }
}

/// `n` files of random sizes up to `max` bytes (plus a few empty and tiny ones).
pub fn random_files(rng: &mut Rng, n: usize, max: usize) -> Files {
    let mut f = Files::new();
    for i in 0..n {
        let len = rng.below(max as u64) as usize;
        f.insert(format!("d{}/f{i:02}", i % 3), rng.bytes(len));
    }
    f.insert("empty".into(), Vec::new());
    f.insert("tiny".into(), b"tiny".to_vec());
    f
}

/// Restores `snap` and compares every file with `want` (relative to the source
/// directory `src`); files in `skip` are not compared (lost on purpose). Returns the
/// first difference.
pub fn restores_to(
    repo: &Repository,
    snap: &Snapshot,
    src: &Path,
    want: &Files,
    skip: &[String],
) -> Result<(), String> {
    let target = tempfile::tempdir().unwrap();
    let outcome = restore(
        repo,
        snap,
        &RestoreOptions {
            target: target.path().to_owned(),
            includes: Vec::new(),
            threads: 2,
            no_sync: true,
        },
        &Progress::default(),
    )
    .map_err(|e| format!("restore failed: {e}"))?;
    let base = target.path().join(src.strip_prefix("/").unwrap());
    let mut got = Files::new();
    for entry in walk(&base) {
        let rel = entry
            .strip_prefix(&base)
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        got.insert(rel, std::fs::read(&entry).unwrap());
    }
    for (rel, data) in want {
        if skip.contains(rel) {
            continue;
        }
        match got.get(rel) {
            None => return Err(format!("{rel} is missing from the restore")),
            Some(g) if g != data => {
                return Err(format!(
                    "{rel} differs ({} bytes restored, {} backed up)",
                    g.len(),
                    data.len()
                ))
            }
            Some(_) => {}
        }
    }
    if let Some(extra) = got.keys().find(|k| !want.contains_key(*k)) {
        return Err(format!("{extra} was restored but never backed up"));
    }
    if skip.is_empty() && !outcome.warnings.is_empty() {
        return Err(format!("restore warned: {:?}", outcome.warnings));
    }
    Ok(())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The ids of the snapshots in the repository.
pub fn snapshot_ids(repo: &Repository) -> Vec<SnapshotId> {
    repo.snapshots()
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect()
}
