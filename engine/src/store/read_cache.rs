//! [`ReadCache`]: a size-bounded cache on local disk of the pack ranges read from a
//! remote backend, so that the mount of a repository in object storage reads each piece
//! of a VM disk or a database over the network once, not at every access.
//!
//! Packs are named by the hash of their bytes, so a cached range of pack `P` is right
//! for any repository that has a pack `P`: one cache directory serves every repository
//! of the host. What comes out of it is authenticated like what comes from storage
//! (blob decryption, keyed hashes): a damaged cache file fails the read it serves, and is
//! dropped.
//!
//! Files: `<dir>/<pack>-<offset>-<len>`, written to a temporary name and renamed.
//! Eviction: least recently used first, whenever the bytes held pass the bound. Several
//! processes may share the directory; each counts what it sees at start and what it adds,
//! so the bound holds within what one process adds between two of its scans.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use super::{Backend, FileKind, NewFile};

/// A backend whose pack reads go through a disk cache.
pub struct ReadCache {
    inner: Arc<dyn Backend>,
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Cached file name -> (size, last use).
    entries: HashMap<String, (u64, u64)>,
    bytes: u64,
    clock: u64,
}

impl ReadCache {
    /// Reads of `inner`'s packs cached in `dir` (made if missing), at most `max_bytes`.
    pub fn new(inner: Arc<dyn Backend>, dir: PathBuf, max_bytes: u64) -> io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut state = State::default();
        let mut found: Vec<(std::time::SystemTime, String, u64)> = Vec::new();
        for entry in std::fs::read_dir(&dir)?.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') {
                let _ = std::fs::remove_file(entry.path()); // a writer killed mid-write
                continue;
            }
            found.push((meta.modified()?, name, meta.len()));
        }
        found.sort();
        for (_, name, size) in found {
            state.clock += 1;
            state.bytes += size;
            state.entries.insert(name, (size, state.clock));
        }
        let cache = Self {
            inner,
            dir,
            max_bytes,
            state: Mutex::new(state),
        };
        cache.evict();
        Ok(cache)
    }

    /// The bytes held now.
    #[must_use]
    pub fn bytes(&self) -> u64 {
        self.state().bytes
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lookup(&self, key: &str, len: usize) -> Option<Vec<u8>> {
        {
            let mut state = self.state();
            state.clock += 1;
            let now = state.clock;
            state.entries.get_mut(key)?.1 = now;
        }
        match std::fs::read(self.dir.join(key)) {
            Ok(bytes) if bytes.len() == len => Some(bytes),
            _ => {
                self.drop_entry(key);
                None
            }
        }
    }

    fn store(&self, key: &str, bytes: &[u8]) {
        if bytes.len() as u64 > self.max_bytes / 4 {
            return; // one read must not empty the cache
        }
        let tmp = self.dir.join(format!(".{key}-{}", std::process::id()));
        let written =
            std::fs::write(&tmp, bytes).and_then(|()| std::fs::rename(&tmp, self.dir.join(key)));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
            return;
        }
        {
            let mut state = self.state();
            state.clock += 1;
            let now = state.clock;
            if let Some((size, _)) = state
                .entries
                .insert(key.to_owned(), (bytes.len() as u64, now))
            {
                state.bytes -= size;
            }
            state.bytes += bytes.len() as u64;
        }
        self.evict();
    }

    fn drop_entry(&self, key: &str) {
        let mut state = self.state();
        if let Some((size, _)) = state.entries.remove(key) {
            state.bytes -= size;
        }
        let _ = std::fs::remove_file(self.dir.join(key));
    }

    /// Removes the least recently used files until the bound holds.
    fn evict(&self) {
        let mut state = self.state();
        if state.bytes <= self.max_bytes {
            return;
        }
        let mut by_age: Vec<(u64, String, u64)> = state
            .entries
            .iter()
            .map(|(k, (size, used))| (*used, k.clone(), *size))
            .collect();
        by_age.sort();
        for (_, key, size) in by_age {
            if state.bytes <= self.max_bytes {
                break;
            }
            state.entries.remove(&key);
            state.bytes -= size;
            let _ = std::fs::remove_file(self.dir.join(&key));
        }
    }
}

impl Backend for ReadCache {
    fn location(&self) -> String {
        self.inner.location()
    }
    fn create_layout(&self) -> io::Result<()> {
        self.inner.create_layout()
    }
    fn read(&self, kind: FileKind, name: &str) -> io::Result<Vec<u8>> {
        self.inner.read(kind, name)
    }
    fn read_at(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        if kind != FileKind::Pack {
            return self.inner.read_at(kind, name, offset, len);
        }
        super::check_name(name)?;
        let key = format!("{name}-{offset}-{len}");
        if let Some(bytes) = self.lookup(&key, len) {
            return Ok(bytes);
        }
        let bytes = self.inner.read_at(kind, name, offset, len)?;
        self.store(&key, &bytes);
        Ok(bytes)
    }
    fn size(&self, kind: FileKind, name: &str) -> io::Result<u64> {
        self.inner.size(kind, name)
    }
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> io::Result<()> {
        self.inner.write(kind, name, data)
    }
    fn create(&self, kind: FileKind) -> io::Result<Box<dyn NewFile + '_>> {
        self.inner.create(kind)
    }
    fn list(&self, kind: FileKind) -> io::Result<Vec<String>> {
        self.inner.list(kind)
    }
    fn pack_shards(&self) -> io::Result<Option<Vec<(String, i64)>>> {
        self.inner.pack_shards()
    }
    fn list_pack_shard(&self, shard: &str) -> io::Result<Vec<String>> {
        self.inner.list_pack_shard(shard)
    }
    fn remove(&self, kind: FileKind, name: &str) -> io::Result<()> {
        self.inner.remove(kind, name)
    }
    fn quarantine(&self, kind: FileKind, name: &str) -> io::Result<()> {
        self.inner.quarantine(kind, name)
    }
    fn modified(&self, kind: FileKind, name: &str) -> io::Result<std::time::SystemTime> {
        self.inner.modified(kind, name)
    }
    fn remove_incomplete(&self, age: std::time::Duration) -> io::Result<(u64, u64)> {
        self.inner.remove_incomplete(age)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sim::SimFs;
    use crate::store::LocalBackend;

    fn backend() -> (Arc<dyn Backend>, SimFs) {
        let fs = SimFs::new();
        let b = LocalBackend::with_fs("/r", Arc::new(fs.clone()));
        b.create_layout().unwrap();
        for (name, byte) in [("aa01", 1u8), ("bb02", 2), ("cc03", 3)] {
            b.write(FileKind::Pack, name, &[byte; 4096]).unwrap();
        }
        (Arc::new(b), fs)
    }

    #[test]
    fn a_range_is_fetched_once_and_the_bound_holds() {
        let (inner, fs) = backend();
        let d = tempfile::tempdir().unwrap();
        let cache = ReadCache::new(inner.clone(), d.path().join("c"), 3000).unwrap();
        assert_eq!(
            cache.read_at(FileKind::Pack, "aa01", 10, 700).unwrap(),
            [1u8; 700]
        );
        // Storage loses the pack: the cached range is still served.
        inner.remove(FileKind::Pack, "aa01").unwrap();
        assert_eq!(
            cache.read_at(FileKind::Pack, "aa01", 10, 700).unwrap(),
            [1u8; 700]
        );
        assert!(cache.read_at(FileKind::Pack, "aa01", 0, 10).is_err());
        for (name, byte) in [("bb02", 2u8), ("cc03", 3)] {
            for off in [0u64, 700, 1400] {
                assert_eq!(
                    cache.read_at(FileKind::Pack, name, off, 700).unwrap(),
                    vec![byte; 700]
                );
            }
        }
        assert!(cache.bytes() <= 3000, "{}", cache.bytes());
        let on_disk: u64 = std::fs::read_dir(d.path().join("c"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(on_disk, cache.bytes());
        // The oldest went first: pack aa01's range is gone with its pack.
        assert!(cache.read_at(FileKind::Pack, "aa01", 10, 700).is_err());
        drop(fs);
    }

    #[test]
    fn a_damaged_cache_file_is_dropped_and_read_again_and_a_new_process_sees_the_cache() {
        let (inner, _fs) = backend();
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("c");
        let cache = ReadCache::new(inner.clone(), dir.clone(), 1 << 20).unwrap();
        cache.read_at(FileKind::Pack, "bb02", 0, 100).unwrap();
        std::fs::write(dir.join("bb02-0-100"), b"short").unwrap();
        assert_eq!(
            cache.read_at(FileKind::Pack, "bb02", 0, 100).unwrap(),
            [2u8; 100]
        );
        drop(cache);
        std::fs::write(dir.join(".bb02-5-5-999"), b"half").unwrap();
        let again = ReadCache::new(inner, dir.clone(), 1 << 20).unwrap();
        assert_eq!(again.bytes(), 100);
        assert!(!dir.join(".bb02-5-5-999").exists());
        assert!(again.read_at(FileKind::Pack, "../x", 0, 1).is_err());
    }
}
