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
//! Reads of blobs go by aligned blocks of [`BLOCK`] bytes (a pack's header and its tail,
//! what indexing reads, go as asked): a read fetches the blocks it covers that
//! are not cached, each run of missing blocks in one ranged request. A restore reading a
//! pack's blobs one after the other then costs a request per block, not per blob (against
//! restic on one S3 server, per-blob reads made a restore 18 times the requests), and
//! the mount's small random reads fetch a block each, which its neighbours then share.
//!
//! Files: `<dir>/<pack>-<block number>`, and `<dir>/<pack>@<offset>+<length>` for what is
//! read as asked; written to a temporary name and renamed.
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
    /// Pack sizes asked of storage (the last block of a pack is short).
    sizes: Mutex<HashMap<String, u64>>,
}

/// The unit of what is fetched and cached: 4 MiB (a restore reads a 16 MiB pack in 4
/// requests; a random read of the mount fetches its neighbours with it).
pub const BLOCK: u64 = 4 << 20;
/// Reads at a pack's start shorter than this (its header) are fetched as asked.
const EXACT_BELOW: usize = 4096;
/// Reads ending this close to a pack's end (its footer and trailer) too.
const EXACT_TAIL: u64 = 64;

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
            sizes: Mutex::default(),
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

    fn pack_size(&self, name: &str) -> io::Result<u64> {
        if let Some(size) = self
            .sizes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(name)
        {
            return Ok(*size);
        }
        let size = self.inner.size(FileKind::Pack, name)?;
        self.sizes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), size);
        Ok(size)
    }

    /// Bytes `offset..offset + len` of pack `name`, by blocks.
    fn read_pack(&self, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let size = self.pack_size(name)?;
        let end = offset + len as u64;
        if end > size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("pack {name}: {len} bytes at {offset}, past its end ({size})"),
            ));
        }
        // A pack's header, footer and trailer (what indexing a pack reads: small at its
        // start, or ending at its end) are fetched as asked: a block each would multiply
        // what a cold index costs to build. Everything else goes by blocks, small trees
        // included: trees have packs of their own, and a block brings hundreds of them
        // (one request per small tree made an unchanged re-backup of /usr 5,638 GETs).
        if (offset == 0 && len < EXACT_BELOW) || end + EXACT_TAIL >= size {
            let key = format!("{name}@{offset}+{len}");
            if let Some(bytes) = self.lookup(&key, len) {
                return Ok(bytes);
            }
            let bytes = self.inner.read_at(FileKind::Pack, name, offset, len)?;
            self.store(&key, &bytes);
            return Ok(bytes);
        }
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let block_len = |b: u64| (size - b * BLOCK).min(BLOCK) as usize;
        let mut blocks: Vec<Option<Vec<u8>>> = (first..=last)
            .map(|b| self.lookup(&format!("{name}-{b}"), block_len(b)))
            .collect();
        // Each run of missing blocks in one request.
        let mut i = 0;
        while i < blocks.len() {
            if blocks[i].is_some() {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < blocks.len() && blocks[j].is_none() {
                j += 1;
            }
            let (from, to) = (first + i as u64, first + j as u64 - 1);
            let run_len: usize = (from..=to).map(block_len).sum();
            let bytes = self
                .inner
                .read_at(FileKind::Pack, name, from * BLOCK, run_len)?;
            for (k, b) in (from..=to).enumerate() {
                let start = k * BLOCK as usize;
                let block = bytes[start..start + block_len(b)].to_vec();
                self.store(&format!("{name}-{b}"), &block);
                blocks[i + k] = Some(block);
            }
            i = j;
        }
        let mut out = Vec::with_capacity(len);
        for (k, block) in blocks.into_iter().enumerate() {
            let block = block.unwrap_or_default();
            let block_start = (first + k as u64) * BLOCK;
            let from = offset.saturating_sub(block_start) as usize;
            let to = ((end - block_start) as usize).min(block.len());
            out.extend_from_slice(&block[from..to]);
        }
        Ok(out)
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
        if bytes.len() as u64 > self.max_bytes / 2 {
            return; // a cache too small for two blocks keeps none
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
        if len == 0 {
            return Ok(Vec::new());
        }
        self.read_pack(name, offset, len)
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
    fn directory(&self) -> Option<&dyn super::BlobDirectory> {
        self.inner.directory()
    }
    fn read_size_hint(&self) -> u64 {
        self.inner.read_size_hint()
    }
    fn uncached(&self) -> Option<&dyn Backend> {
        Some(self.inner.as_ref())
    }
    fn list_pack_shard(&self, shard: &str) -> io::Result<Vec<String>> {
        self.inner.list_pack_shard(shard)
    }
    fn remove(&self, kind: FileKind, name: &str) -> io::Result<()> {
        if kind == FileKind::Pack {
            self.sizes
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(name);
        }
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

    /// A backend that counts the reads that reach it.
    struct Counting(Arc<dyn Backend>, std::sync::atomic::AtomicUsize);

    impl Counting {
        fn reads(&self) -> usize {
            self.1.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    impl Backend for Counting {
        fn location(&self) -> String {
            self.0.location()
        }
        fn read(&self, kind: FileKind, name: &str) -> io::Result<Vec<u8>> {
            self.0.read(kind, name)
        }
        fn read_at(
            &self,
            kind: FileKind,
            name: &str,
            offset: u64,
            len: usize,
        ) -> io::Result<Vec<u8>> {
            self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.0.read_at(kind, name, offset, len)
        }
        fn size(&self, kind: FileKind, name: &str) -> io::Result<u64> {
            self.0.size(kind, name)
        }
        fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> io::Result<()> {
            self.0.write(kind, name, data)
        }
        fn list(&self, kind: FileKind) -> io::Result<Vec<String>> {
            self.0.list(kind)
        }
        fn remove(&self, kind: FileKind, name: &str) -> io::Result<()> {
            self.0.remove(kind, name)
        }
        fn quarantine(&self, kind: FileKind, name: &str) -> io::Result<()> {
            self.0.quarantine(kind, name)
        }
        fn modified(&self, kind: FileKind, name: &str) -> io::Result<std::time::SystemTime> {
            self.0.modified(kind, name)
        }
        fn remove_incomplete(&self, age: std::time::Duration) -> io::Result<(u64, u64)> {
            self.0.remove_incomplete(age)
        }
    }

    #[test]
    fn reads_go_by_blocks_fetched_once_and_the_bound_holds() {
        let fs = SimFs::new();
        let local = LocalBackend::with_fs("/r", Arc::new(fs.clone()));
        local.create_layout().unwrap();
        // 3.5 blocks of a known pattern: byte i is i % 251.
        let b = BLOCK as usize;
        let end = 3 * b + b / 2;
        let pack: Vec<u8> = (0..end).map(|i| (i % 251) as u8).collect();
        local.write(FileKind::Pack, "aa01", &pack).unwrap();
        let inner = Arc::new(Counting(Arc::new(local), Default::default()));
        let d = tempfile::tempdir().unwrap();
        let cache = ReadCache::new(inner.clone(), d.path().join("c"), 3 * BLOCK).unwrap();
        let want = |o: usize, n: usize| pack[o..o + n].to_vec();
        let read = |o: usize, n: usize| cache.read_at(FileKind::Pack, "aa01", o as u64, n);
        // Blobs read one after the other: one request for the blocks they span.
        assert_eq!(read(10, 7000).unwrap(), want(10, 7000));
        assert_eq!(inner.reads(), 1);
        assert_eq!(read(7010, 5000).unwrap(), want(7010, 5000));
        assert_eq!(inner.reads(), 1, "the block was fetched again");
        // Across blocks 0 to 2: block 0 cached, 1 and 2 in one request.
        assert_eq!(read(1000, 2 * b + 10).unwrap(), want(1000, 2 * b + 10));
        assert_eq!(inner.reads(), 2);
        // The short last block, and past the end.
        let tail = end - 5000;
        assert_eq!(read(tail, 4900).unwrap(), want(tail, 4900));
        assert!(read(tail, 5001).is_err());
        assert_eq!(inner.reads(), 3);
        // The trailer (up to the end) and small reads are fetched as asked, once.
        assert_eq!(read(end - 40, 40).unwrap(), want(end - 40, 40));
        assert_eq!(read(0, 16).unwrap(), want(0, 16));
        assert_eq!(read(0, 16).unwrap(), want(0, 16));
        assert_eq!(read(end - 40, 40).unwrap(), want(end - 40, 40));
        assert_eq!(inner.reads(), 5);
        assert!(cache.bytes() <= 3 * BLOCK, "{}", cache.bytes());
        let on_disk: u64 = std::fs::read_dir(d.path().join("c"))
            .unwrap()
            .map(|e| e.unwrap().metadata().unwrap().len())
            .sum();
        assert_eq!(on_disk, cache.bytes());
        // Storage loses the pack: what is cached is still served, the rest fails.
        inner.remove(FileKind::Pack, "aa01").unwrap();
        assert_eq!(read(tail, 4900).unwrap(), want(tail, 4900));
        assert!(read(10, 5000).is_err(), "evicted block 0 served");
    }

    #[test]
    fn a_damaged_cache_file_is_dropped_and_read_again_and_a_new_process_sees_the_cache() {
        let fs = SimFs::new();
        let local = LocalBackend::with_fs("/r", Arc::new(fs.clone()));
        local.create_layout().unwrap();
        local.write(FileKind::Pack, "bb02", &[2u8; 8192]).unwrap();
        let inner: Arc<dyn Backend> = Arc::new(local);
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("c");
        let cache = ReadCache::new(inner.clone(), dir.clone(), 1 << 30).unwrap();
        cache.read_at(FileKind::Pack, "bb02", 0, 5000).unwrap();
        std::fs::write(dir.join("bb02-0"), b"short").unwrap();
        assert_eq!(
            cache.read_at(FileKind::Pack, "bb02", 0, 5000).unwrap(),
            [2u8; 5000]
        );
        drop(cache);
        std::fs::write(dir.join(".bb02-5-999"), b"half").unwrap();
        let again = ReadCache::new(inner, dir.clone(), 1 << 30).unwrap();
        assert_eq!(again.bytes(), 8192);
        assert!(!dir.join(".bb02-5-999").exists());
        assert!(again.read_at(FileKind::Pack, "../x", 0, 1).is_err());
    }
}
