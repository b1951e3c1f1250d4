//! Decoding blobs ahead of a sequential reader, on threads that sleep when idle.
//!
//! Plain threads blocked on a channel, not a rayon pool: idle rayon workers spin and
//! yield before they sleep, and with a request arriving every fraction of a millisecond
//! they kept both cores of the benchmark machine busy doing nothing, while the FUSE
//! request threads waited for a core (the sequential read's CPU time varied from 4 to
//! 10 s between identical runs).
//!
//! A blob is queued once: one queued or being decoded is not asked again. When the
//! queue is full, a request is dropped: the reader will decode the blob itself.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use cairn_engine::id::BlobId;

use crate::cache::BlobCache;

pub struct Prefetcher {
    queue: Option<crossbeam_channel::Sender<BlobId>>,
    /// Blobs queued or being decoded.
    pending: Arc<Mutex<HashSet<BlobId>>>,
    cache: Arc<BlobCache>,
    threads: Vec<JoinHandle<()>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Prefetcher {
    /// `threads` decoding threads, at most `depth` blobs queued.
    #[must_use]
    pub fn new(cache: Arc<BlobCache>, threads: usize, depth: usize) -> Self {
        let (tx, rx) = crossbeam_channel::bounded::<BlobId>(depth);
        let pending: Arc<Mutex<HashSet<BlobId>>> = Arc::default();
        let mut handles = Vec::new();
        for i in 0..threads {
            let (rx, cache, pending) = (rx.clone(), cache.clone(), pending.clone());
            let spawned = std::thread::Builder::new()
                .name(format!("prefetch-{i}"))
                .spawn(move || {
                    for id in rx {
                        // An error is the reader's to report when it needs the blob.
                        let _ = cache.get(&id);
                        lock(&pending).remove(&id);
                    }
                });
            match spawned {
                Ok(h) => handles.push(h),
                Err(e) => tracing::warn!("starting a prefetch thread: {e}"),
            }
        }
        Self {
            queue: (!handles.is_empty()).then_some(tx),
            pending,
            cache,
            threads: handles,
        }
    }

    /// Asks for `id` to be decoded into the cache, unless it is there, on its way, or
    /// the queue is full.
    pub fn request(&self, id: BlobId) {
        let Some(queue) = &self.queue else { return };
        if self.cache.contains(&id) {
            return;
        }
        let mut pending = lock(&self.pending);
        if !pending.insert(id) {
            return;
        }
        if queue.try_send(id).is_err() {
            pending.remove(&id);
        }
    }
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        drop(self.queue.take());
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_engine::blob::BlobKind;
    use cairn_engine::crypto::Encryption;
    use cairn_engine::keyfile::KdfParams;
    use cairn_engine::saver::BlobSaver;
    use cairn_engine::Repository;

    #[test]
    fn a_requested_blob_is_decoded_once_into_the_cache() {
        let d = tempfile::tempdir().unwrap();
        let repo = Repository::init(
            &d.path().join("repo"),
            b"pw",
            Encryption::Aes256Gcm,
            KdfParams::TEST_ONLY_WEAK,
        )
        .unwrap();
        let saver = BlobSaver::new(&repo);
        let ids: Vec<BlobId> = (0..20u8)
            .map(|i| saver.save(BlobKind::Data, &[i; 5000]).unwrap().0)
            .collect();
        saver.flush().unwrap();
        drop(saver);
        let cache = Arc::new(BlobCache::new(Arc::new(repo), 1 << 20));
        let p = Prefetcher::new(cache.clone(), 2, 4);
        for id in &ids {
            p.request(*id);
            p.request(*id); // queued or decoded already: not queued again
        }
        // Up to 4 wait in the queue (more were dropped); once they are decoded, every
        // request is served.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while std::time::Instant::now() < deadline && !ids.iter().all(|id| cache.contains(id)) {
            for id in &ids {
                p.request(*id);
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(ids.iter().all(|id| cache.contains(id)));
        assert!(lock(&p.pending).is_empty());
        assert_eq!(cache.get(&ids[3]).unwrap().as_slice(), &[3u8; 5000][..]);
        drop(p); // joins its threads
    }
}
