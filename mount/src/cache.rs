//! A shared LRU cache of decoded blobs, bounded in bytes, for the mount's reads.
//!
//! Blobs are checked by their AEAD seal, not re-hashed (see [`Verify::Seal`]): the
//! mount's random reads are dominated by decoding whole blobs.
//!
//! Concurrent requests for the same blob load it once: the first caller decodes while
//! the others wait on the blob's slot. Failed loads are not cached (a transient read
//! error may succeed later; a damaged blob fails again, with its error).

use std::sync::{Arc, Mutex, OnceLock};

use cairn_engine::blob::Verify;
use cairn_engine::id::BlobId;
use cairn_engine::{Repository, Result};
use lru::LruCache;

#[derive(Default)]
struct Slot {
    loading: Mutex<()>,
    data: OnceLock<Blob>,
}

/// A decoded blob, shared by the cache and the reads that use it. The decoder's own
/// buffer: putting it in an `Arc<[u8]>` would copy it.
pub type Blob = Arc<Vec<u8>>;

struct Lru {
    map: LruCache<BlobId, Arc<Slot>>,
    bytes: usize,
}

pub struct BlobCache {
    repo: Arc<Repository>,
    lru: Mutex<Lru>,
    capacity: usize,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl BlobCache {
    /// A cache holding at most `capacity` bytes of decoded blobs (at least one blob).
    #[must_use]
    pub fn new(repo: Arc<Repository>, capacity: usize) -> Self {
        Self {
            repo,
            lru: Mutex::new(Lru {
                map: LruCache::unbounded(),
                bytes: 0,
            }),
            capacity,
        }
    }

    #[must_use]
    pub fn repo(&self) -> &Repository {
        &self.repo
    }

    /// Whether the blob is decoded and cached.
    #[must_use]
    pub fn contains(&self, id: &BlobId) -> bool {
        lock(&self.lru)
            .map
            .peek(id)
            .is_some_and(|s| s.data.get().is_some())
    }

    /// The decoded blob, from the cache or the repository.
    pub fn get(&self, id: &BlobId) -> Result<Blob> {
        let slot = {
            let mut l = lock(&self.lru);
            match l.map.get(id) {
                Some(s) => s.clone(),
                None => {
                    let s = Arc::new(Slot::default());
                    l.map.put(*id, s.clone());
                    s
                }
            }
        };
        if let Some(d) = slot.data.get() {
            return Ok(d.clone());
        }
        let _loading = lock(&slot.loading);
        if let Some(d) = slot.data.get() {
            return Ok(d.clone());
        }
        let data: Blob = match self.repo.read_blob_with(id, Verify::Seal) {
            Ok(d) => Arc::new(d),
            Err(e) => {
                let mut l = lock(&self.lru);
                if l.map.peek(id).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
                    l.map.pop(id);
                }
                return Err(e);
            }
        };
        let mut l = lock(&self.lru);
        let _ = slot.data.set(data.clone());
        if l.map.peek(id).is_some_and(|s| Arc::ptr_eq(s, &slot)) {
            l.bytes += data.len();
        }
        while l.bytes > self.capacity && l.map.len() > 1 {
            let Some((_, old)) = l.map.pop_lru() else {
                break;
            };
            if let Some(d) = old.data.get() {
                l.bytes -= d.len();
            }
        }
        Ok(data)
    }
}
