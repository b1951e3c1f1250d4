//! The CPU stage of a backup and the memory it may hold.
//!
//! Readers (the tree walk's threads, a stream's or an image's reader) fill buffers taken
//! from a [`ReadBudget`], cut them into chunks, and hand the chunks to [`ChunkWorkers`]:
//! threads that hash, deduplicate, compress, encrypt and pack them ([`BlobSaver::save`]).
//! A reader waits for its results on a channel, never inside rayon, so a waiting reader
//! does not pick up another file: at most one file per reader thread is in flight.
//!
//! Bounds: the budget caps the bytes of source data read and not yet saved, for all
//! readers together. A reader waits for budget only while it holds none (it never holds
//! one buffer while waiting for another: read-ahead takes budget only when it is free),
//! and workers never wait for budget, so the wait always ends. The job queue holds at
//! most two jobs a worker; jobs point into budgeted buffers and copy nothing.
//!
//! Buffers of a batch's size are kept and reused rather than freed: large buffers that
//! come and go make the allocator's heap grow with holes it does not give back.

use std::ops::Range;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};

use crate::blob::BlobKind;
use crate::error::{Error, Result};
use crate::id::BlobId;
use crate::saver::BlobSaver;

/// Bytes read and saved together from one source (a file, a stream, an image window).
pub const BATCH_BYTES: usize = 8 << 20;
/// The default budget: the data of four batches.
pub const DEFAULT_BUDGET: usize = 4 * BATCH_BYTES;
/// Batches up to this size are saved on the reader's own thread: sending a small file's
/// one chunk to a worker and waiting for it would cost more than saving it.
const INLINE_BYTES: usize = 1 << 20;
/// Buffers larger than this come from (and go back to) the pool of reused buffers.
const POOLED_ABOVE: usize = 1 << 20;

/// Caps the bytes read and not yet saved; see the module docs.
pub struct ReadBudget {
    limit: usize,
    state: Mutex<BudgetState>,
    freed: Condvar,
}

struct BudgetState {
    /// Bytes charged to live buffers.
    used: usize,
    /// Pooled buffers not in use, each of capacity [`BudgetState::pooled`].
    spare: Vec<Vec<u8>>,
    /// The capacity of pooled buffers.
    pooled: usize,
}

/// A buffer charged to a [`ReadBudget`]; the charge ends when it is dropped.
pub struct ReadBuf<'b> {
    budget: &'b ReadBudget,
    data: Vec<u8>,
    charged: usize,
    pooled: bool,
}

impl ReadBudget {
    /// A budget of `limit` bytes whose pooled buffers hold `batch` bytes.
    #[must_use]
    pub fn new(limit: usize, batch: usize) -> Self {
        Self {
            limit,
            state: Mutex::new(BudgetState {
                used: 0,
                spare: Vec::new(),
                pooled: batch,
            }),
            freed: Condvar::new(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An empty buffer with room for `capacity` bytes, waiting while the budget is
    /// spent. The caller must hold no other buffer of this budget (see module docs). A
    /// request larger than the whole budget is served once nothing else is charged.
    pub fn take(&self, capacity: usize) -> ReadBuf<'_> {
        let mut state = self.state();
        loop {
            if let Some(buf) = self.grant(&mut state, capacity) {
                return buf;
            }
            state = self
                .freed
                .wait(state)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Like [`Self::take`], but `None` instead of waiting.
    pub fn try_take(&self, capacity: usize) -> Option<ReadBuf<'_>> {
        self.grant(&mut self.state(), capacity)
    }

    fn grant(&self, state: &mut BudgetState, capacity: usize) -> Option<ReadBuf<'_>> {
        let pooled = capacity > POOLED_ABOVE && capacity <= state.pooled;
        let charge = if pooled { state.pooled } else { capacity };
        if state.used > 0 && state.used + charge > self.limit {
            return None;
        }
        state.used += charge;
        let data = if pooled {
            state
                .spare
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(state.pooled))
        } else {
            Vec::with_capacity(capacity)
        };
        Some(ReadBuf {
            budget: self,
            data,
            charged: charge,
            pooled,
        })
    }

    /// Bytes charged now (for tests and progress).
    #[must_use]
    pub fn used(&self) -> usize {
        self.state().used
    }
}

impl ReadBuf<'_> {
    /// The buffer to fill. Its capacity is the one asked for: filling beyond it would
    /// allocate outside the budget.
    pub fn vec(&mut self) -> &mut Vec<u8> {
        &mut self.data
    }

    #[must_use]
    pub fn capacity(&self) -> usize {
        self.data.capacity()
    }
}

impl std::ops::Deref for ReadBuf<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for ReadBuf<'_> {
    fn drop(&mut self) {
        let mut state = self.budget.state();
        state.used -= self.charged;
        if self.pooled && self.data.capacity() == state.pooled {
            let mut data = std::mem::take(&mut self.data);
            data.clear();
            state.spare.push(data);
        }
        drop(state);
        self.budget.freed.notify_all();
    }
}

/// What became of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Saved {
    /// All zeros, and the batch asked for zeros to be holes: nothing stored.
    Hole,
    /// A blob, and the bytes it added to the repository (0: deduplicated).
    Blob { id: BlobId, stored: u64 },
}

/// One chunk for a worker.
struct Job<'b> {
    buf: Arc<ReadBuf<'b>>,
    range: Range<usize>,
    /// The chunk's blob id when negotiation computed it already.
    id: Option<BlobId>,
    slot: usize,
    holes: bool,
    reply: mpsc::Sender<(usize, Result<Saved>)>,
}

/// The worker threads of one backup; see the module docs. Dropping it closes their
/// queue, and they finish (the scope they run in waits for them).
pub struct ChunkWorkers<'b, 'r> {
    jobs: crossbeam_channel::Sender<Job<'b>>,
    saver: &'b BlobSaver<'r>,
    budget: &'b ReadBudget,
}

/// The results of one batch, to wait for.
pub struct Pending {
    results: Vec<Option<Result<Saved>>>,
    replies: Option<mpsc::Receiver<(usize, Result<Saved>)>>,
    expected: usize,
}

impl<'b, 'r> ChunkWorkers<'b, 'r> {
    /// Starts `threads` workers (0: one more than the cores, so that a worker waiting
    /// for a pack to reach the disk does not leave a core idle) in `scope`.
    pub fn start<'scope>(
        scope: &'scope std::thread::Scope<'scope, '_>,
        saver: &'b BlobSaver<'r>,
        budget: &'b ReadBudget,
        threads: usize,
    ) -> Self
    where
        'b: 'scope,
        'r: 'scope,
    {
        let threads = if threads == 0 {
            crate::threads::cores() + 1
        } else {
            threads
        };
        let (tx, rx) = crossbeam_channel::bounded::<Job<'b>>(2 * threads);
        for i in 0..threads {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("save-{i}"))
                .spawn_scoped(scope, move || {
                    for job in rx {
                        let Job {
                            buf,
                            range,
                            id,
                            slot,
                            holes,
                            reply,
                        } = job;
                        let result = save_chunk(saver, &buf[range], holes, id);
                        // Let go of the buffer before answering, so that the reader
                        // finds it free once every answer is in.
                        drop(buf);
                        // The reader may have stopped waiting (an error elsewhere).
                        let _ = reply.send((slot, result));
                    }
                });
            if let Err(e) = spawned {
                // Fewer workers than asked: slower, not wrong (none at all is caught
                // when the first batch finds the queue closed).
                tracing::warn!("starting a backup worker thread: {e}");
            }
        }
        Self {
            jobs: tx,
            saver,
            budget,
        }
    }

    #[must_use]
    pub fn budget(&self) -> &'b ReadBudget {
        self.budget
    }

    #[must_use]
    pub fn saver(&self) -> &'b BlobSaver<'r> {
        self.saver
    }

    /// Saves the chunks `ranges` of `buf` as data blobs (all-zero chunks as holes when
    /// `holes`), on the workers or, for a small batch, right here. Returns at once for
    /// work handed to the workers (the queue has room) with results to wait for.
    /// `source_len` is the length of the file or image the batch is part of (0 when
    /// unknown): a batch of a large source is asked about however short it is (the
    /// tail of a large file); a small file's chunks are asked about later, a pack's worth
    /// at a time, by the saver ([`Self::negotiate`]).
    pub fn save(
        &self,
        buf: &Arc<ReadBuf<'b>>,
        ranges: &[Range<usize>],
        holes: bool,
        source_len: u64,
    ) -> Pending {
        let total: usize = ranges.iter().map(ExactSizeIterator::len).sum();
        let large = total > INLINE_BYTES || source_len > INLINE_BYTES as u64;
        let ids = if large && self.saver.negotiates() {
            self.negotiate(buf, ranges, holes)
        } else {
            vec![None; ranges.len()]
        };
        if total <= INLINE_BYTES {
            return Pending {
                results: ranges
                    .iter()
                    .zip(&ids)
                    .map(|(r, id)| Some(save_chunk(self.saver, &buf[r.clone()], holes, *id)))
                    .collect(),
                replies: None,
                expected: 0,
            };
        }
        let (reply, replies) = mpsc::channel();
        let mut expected = 0;
        let mut results: Vec<Option<Result<Saved>>> = (0..ranges.len()).map(|_| None).collect();
        for (slot, (range, id)) in ranges.iter().zip(ids).enumerate() {
            let job = Job {
                buf: buf.clone(),
                range: range.clone(),
                id,
                slot,
                holes,
                reply: reply.clone(),
            };
            match self.jobs.send(job) {
                Ok(()) => expected += 1,
                Err(crossbeam_channel::SendError(job)) => {
                    // No worker is running: save it here.
                    results[slot] = Some(save_chunk(self.saver, &buf[job.range], holes, id));
                }
            }
        }
        Pending {
            results,
            replies: Some(replies),
            expected,
        }
    }
}

impl ChunkWorkers<'_, '_> {
    /// Asks the storage's blob directory about the batch's chunks before they are saved
    /// ([`BlobSaver::ask_before_storing`]); returns each chunk's blob id (`None` for a
    /// hole), so that saving it does not hash it again. Files of 1 MiB or less are not
    /// asked about here (a request each would cost more than sending them): the saver
    /// holds their sealed blobs and asks about a pack's worth at once. Asking first
    /// spares a large file's chunks their compression and encryption too. A failure
    /// here only means the chunks are stored (the saver reports the failure that
    /// matters).
    fn negotiate(
        &self,
        buf: &ReadBuf<'_>,
        ranges: &[Range<usize>],
        holes: bool,
    ) -> Vec<Option<BlobId>> {
        let crypto = self.saver.crypto();
        let ids: Vec<Option<BlobId>> = ranges
            .iter()
            .map(|r| &buf[r.clone()])
            .map(|c| (!(holes && is_zero(c))).then(|| crypto.blob_id(c)))
            .collect();
        let asked: Vec<BlobId> = ids.iter().flatten().copied().collect();
        if let Err(e) = self.saver.ask_before_storing(&asked) {
            tracing::warn!("asking the storage which chunks it has: {e}");
        }
        ids
    }
}

impl Pending {
    /// Waits for every chunk of the batch; results in the order of the ranges.
    pub fn wait(mut self) -> Result<Vec<Saved>> {
        if let Some(replies) = self.replies.take() {
            for _ in 0..self.expected {
                let (slot, result) = replies.recv().map_err(|_| {
                    Error::io(
                        "saving chunks",
                        std::io::Error::other("a backup worker stopped"),
                    )
                })?;
                self.results[slot] = Some(result);
            }
        }
        self.results
            .into_iter()
            .map(|r| {
                r.unwrap_or_else(|| {
                    Err(Error::io(
                        "saving chunks",
                        std::io::Error::other("a chunk was not saved"),
                    ))
                })
            })
            .collect()
    }
}

/// Runs `f` with workers saving through `saver` and the default budget; the workers
/// stop when it returns.
pub fn with_workers<'r, T>(saver: &BlobSaver<'r>, f: impl FnOnce(&ChunkWorkers<'_, 'r>) -> T) -> T {
    let budget = ReadBudget::new(DEFAULT_BUDGET, BATCH_BYTES);
    std::thread::scope(|s| {
        let workers = ChunkWorkers::start(s, saver, &budget, 0);
        let result = f(&workers);
        drop(workers); // closes the queue: the scope can end
        result
    })
}

fn is_zero(data: &[u8]) -> bool {
    data.iter().all(|&b| b == 0)
}

/// Saves one chunk (`id`: its blob id when already computed; a hole has none).
fn save_chunk(
    saver: &BlobSaver<'_>,
    data: &[u8],
    holes: bool,
    id: Option<BlobId>,
) -> Result<Saved> {
    let (id, stored) = match id {
        Some(id) => saver.save_hashed(BlobKind::Data, data, id)?,
        None if holes && is_zero(data) => return Ok(Saved::Hole),
        None => saver.save(BlobKind::Data, data)?,
    };
    Ok(Saved::Blob { id, stored })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_caps_live_buffers_reuses_pooled_ones_and_serves_a_lone_large_request() {
        let budget = ReadBudget::new(4 << 20, 2 << 20);
        let mut a = budget.take(2 << 20);
        a.vec().extend_from_slice(&[1; 100]);
        let a_ptr = a.as_ptr();
        let b = budget.take(2 << 20);
        assert_eq!(budget.used(), 4 << 20);
        // Spent: read-ahead is refused rather than waited for.
        assert!(budget.try_take(2 << 20).is_none());
        assert!(budget.try_take(10).is_none());
        drop(a);
        // The freed buffer comes back, emptied.
        let c = budget.take(3 << 19);
        assert_eq!(c.as_ptr(), a_ptr);
        assert!(c.is_empty());
        assert_eq!(c.capacity(), 2 << 20);
        drop((b, c));
        assert_eq!(budget.used(), 0);
        // Larger than the whole budget: granted when nothing else is charged.
        let big = budget.take(16 << 20);
        assert!(big.capacity() >= 16 << 20);
        assert!(budget.try_take(10).is_none());
        drop(big);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_reader_waiting_for_budget_gets_it_when_another_lets_go() {
        let budget = ReadBudget::new(2 << 20, 2 << 20);
        let held = budget.take(2 << 20);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| budget.take(2 << 20).capacity());
            std::thread::sleep(std::time::Duration::from_millis(50));
            assert!(!waiter.is_finished());
            drop(held);
            assert_eq!(waiter.join().unwrap(), 2 << 20);
        });
    }
}
