//! Saving blobs during a backup: dedup, compress, encrypt, pack, index.
//!
//! Callers on many threads call [`BlobSaver::save`]. A blob is stored once per
//! repository: an id already indexed (durable in a pack) or already taken by this run is
//! skipped. The compression and encryption happen on the caller's thread, into a buffer
//! that thread reuses for every blob; only appending to the open pack takes a lock. The
//! open pack is a file being written ([`crate::store::NewFile`]): blobs go to it as
//! they come, and a pack is never held in memory (by a local backend; a remote one
//! keeps a pack in memory until it sends it).
//!
//! Trees go to packs of their own, apart from data: what a backup reads of its parent,
//! a listing or the mount's directories then comes from a few packs, not from a block of
//! data around every tree (over object storage, a request and 4 MiB per tree). A full pack is finished (trailer,
//! fsync, rename) by the thread that filled it, outside the lock, and indexed only once
//! durable.
//!
//! **Asking before sending.** Over storage that keeps a blob directory (a repository
//! server: [`crate::store::BlobDirectory`]), a data pack is not written blob by blob:
//! its sealed blobs are held in memory until a pack's worth is ready, then the directory
//! is asked once about those not asked about yet ([`Self::ask_before_storing`] asks
//! about a large file's chunks before they are even encoded), and the blobs another
//! pack holds, by that pack's own trailer, are dropped before the rest are written. So
//! a host new to a repository does not send again the small files other hosts stored:
//! one question per pack, not one per file. Such a blob's `save` has already returned
//! the bytes it would have added; [`SaverStats`] counts it as not stored.
//!
//! **Fail-stop.** A blob is acknowledged (its `save` returns) once it is in the open
//! pack, before that pack is durable. If the pack is then lost (a write, fsync or rename
//! fails: a full disk), every blob acknowledged into it is lost with it. From then on
//! every call fails, [`BlobSaver::flush`] included, so that nothing that refers to those
//! blobs can be committed, and [`BlobSaver::lost_blobs`] names them. A caller that only
//! copies blobs (a prune's repack) must check, before it deletes an original, that its
//! copy is in an indexed pack: indexed means durable.
//!
//! Memory: the encoding buffer of each calling thread (the largest blob it encoded, at
//! most a chunk plus zstd's bound), each open pack's write buffer (256 KiB) and entries
//! (49 bytes a blob), the held blobs (a pack's size, with a blob directory), and the
//! ids of the blobs in packs not yet indexed: an id leaves that set once its pack is
//! indexed, so memory does not grow with the input.

use std::cell::RefCell;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use crate::blob::{self, BlobKind};
use crate::error::{IoContext, Result};
use crate::id::BlobId;
use crate::pack::{FinishedPack, PackEntry, PackWriter};
use crate::repository::Repository;
use crate::store::{FileKind, NewFile};
use crate::tree::Tree;

/// What a run added to the repository.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SaverStats {
    /// Blobs stored by this run (not those the blob directory found in other packs).
    pub blobs_new: u64,
    pub bytes_new: u64,
    pub bytes_stored: u64,
    pub packs: u64,
    /// Bytes of the pack files written.
    pub pack_bytes: u64,
    /// Blobs encoded for a pack, then found in another host's pack by asking the
    /// storage's blob directory: not stored.
    pub blobs_found: u64,
}

type OpenPack<'r> = PackWriter<Box<dyn NewFile + 'r>>;

pub struct BlobSaver<'r> {
    repo: &'r Repository,
    taken: Mutex<HashSet<BlobId>>,
    /// The open pack of each kind of blob ([`slot`]): data, trees.
    open: [Mutex<Option<OpenPack<'r>>>; 2],
    /// Data blobs waiting to be asked about, with a blob directory (module docs).
    held: Mutex<Held>,
    blobs_new: AtomicU64,
    bytes_new: AtomicU64,
    bytes_stored: AtomicU64,
    /// What `blobs_new`, `bytes_new` and `bytes_stored` counted of blobs then found in
    /// other packs (subtracted in [`BlobSaver::stats`]).
    found_blobs: AtomicU64,
    found_bytes: AtomicU64,
    found_stored: AtomicU64,
    packs: AtomicU64,
    pack_bytes: AtomicU64,
    /// Set once a pack holding acknowledged blobs was lost (see the module docs).
    lost: Mutex<Option<Lost>>,
}

/// Sealed data blobs not yet in a pack, with the bytes they add up to.
#[derive(Default)]
struct Held {
    blobs: Vec<HeldBlob>,
    bytes: u64,
}

struct HeldBlob {
    id: BlobId,
    sealed: Vec<u8>,
    raw_length: usize,
    /// The directory was asked about it before it was encoded (a large file's chunk).
    asked: bool,
}

/// Why a saver stopped, and what it lost.
struct Lost {
    /// Blobs acknowledged into packs that never became durable.
    blobs: Vec<BlobId>,
    kind: std::io::ErrorKind,
    errno: Option<i32>,
    message: String,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The open pack a blob of `kind` goes to.
fn slot(kind: BlobKind) -> usize {
    match kind {
        BlobKind::Data => 0,
        BlobKind::Tree => 1,
    }
}

thread_local! {
    /// Where this thread encodes blobs; reused, so that saving allocates nothing.
    static ENCODED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl<'r> BlobSaver<'r> {
    #[must_use]
    pub fn new(repo: &'r Repository) -> Self {
        Self {
            repo,
            taken: Mutex::new(HashSet::new()),
            open: [Mutex::new(None), Mutex::new(None)],
            held: Mutex::default(),
            blobs_new: AtomicU64::new(0),
            bytes_new: AtomicU64::new(0),
            bytes_stored: AtomicU64::new(0),
            found_blobs: AtomicU64::new(0),
            found_bytes: AtomicU64::new(0),
            found_stored: AtomicU64::new(0),
            packs: AtomicU64::new(0),
            pack_bytes: AtomicU64::new(0),
            lost: Mutex::new(None),
        }
    }

    /// Fails once the saver has lost a pack (see the module docs).
    fn ensure_whole(&self) -> Result<()> {
        match &*lock(&self.lost) {
            None => Ok(()),
            Some(l) => {
                let source = match l.errno {
                    Some(e) => std::io::Error::from_raw_os_error(e),
                    None => std::io::Error::new(l.kind, l.message.clone()),
                };
                Err(crate::Error::io(
                    format!(
                        "an earlier pack write failed ({}), losing {} blobs saved into it; \
                         nothing more is saved",
                        l.message,
                        l.blobs.len()
                    ),
                    source,
                ))
            }
        }
    }

    /// Records the loss of a pack whose acknowledged blobs are `entries`; returns the
    /// error for the caller that saw it happen.
    fn lose(&self, entries: &[PackEntry], e: std::io::Error, what: &str) -> crate::Error {
        let ids: Vec<BlobId> = entries.iter().map(|e| e.id).collect();
        self.lose_ids(&ids, e, what)
    }

    /// [`Self::lose`] of blobs named by id.
    fn lose_ids(&self, ids: &[BlobId], e: std::io::Error, what: &str) -> crate::Error {
        let mut lost = lock(&self.lost);
        let l = lost.get_or_insert_with(|| Lost {
            blobs: Vec::new(),
            kind: e.kind(),
            errno: e.raw_os_error(),
            message: e.to_string(),
        });
        l.blobs.extend_from_slice(ids);
        drop(lost);
        // Those ids are no longer "in a pack of this run".
        let mut taken = lock(&self.taken);
        for id in ids {
            taken.remove(id);
        }
        drop(taken);
        tracing::error!(
            "{what} failed ({e}): {} blobs saved into it are lost; stopping",
            ids.len()
        );
        crate::Error::io(
            format!("{what} ({} blobs saved into it lost with it)", ids.len()),
            e,
        )
    }

    /// The blobs acknowledged into packs that were lost (empty while the saver is whole).
    #[must_use]
    pub fn lost_blobs(&self) -> Vec<BlobId> {
        lock(&self.lost)
            .as_ref()
            .map(|l| l.blobs.clone())
            .unwrap_or_default()
    }

    /// The keys blob ids are computed with.
    pub(crate) fn crypto(&self) -> &crate::crypto::Crypto {
        self.repo.crypto()
    }

    /// Whether the storage keeps a blob directory to ask before storing
    /// ([`Self::ask_before_storing`]).
    #[must_use]
    pub fn negotiates(&self) -> bool {
        self.repo.backend().directory().is_some()
    }

    /// Known-chunk negotiation: asks the storage's blob directory about the blobs `ids`
    /// (the callers' [`crate::crypto::Crypto::blob_id`] of what they are about to save)
    /// that neither the index nor this run holds, so that what another host stored (or
    /// what a partial index does not list) is not sent again. One request for the lot;
    /// nothing is asked when the index has them all. The blobs the directory names
    /// count as stored only once their packs' trailers say so
    /// ([`Repository::learn_from_directory`]).
    pub fn ask_before_storing(&self, ids: &[BlobId]) -> Result<()> {
        if !self.negotiates() {
            return Ok(());
        }
        let unknown: Vec<BlobId> = {
            let taken = lock(&self.taken);
            ids.iter()
                .filter(|id| !taken.contains(id))
                .copied()
                .collect()
        };
        self.repo.learn_from_directory(&unknown)?;
        Ok(())
    }

    /// Stores `data` unless the repository has it. Returns its id and the bytes it added
    /// to the repository (0 when deduplicated).
    ///
    /// A blob larger than the format allows ([`blob::MAX_BLOB_LEN`]) is refused: stored,
    /// it would make its pack's trailer, and every snapshot using it, unreadable.
    pub fn save(&self, kind: BlobKind, data: &[u8]) -> Result<(BlobId, u64)> {
        self.save_as(kind, data, None)
    }

    /// [`Self::save`] of a blob whose id the caller computed already (to ask the blob
    /// directory about it): the id must be `blob_id(data)`.
    pub(crate) fn save_hashed(
        &self,
        kind: BlobKind,
        data: &[u8],
        id: BlobId,
    ) -> Result<(BlobId, u64)> {
        debug_assert_eq!(id, self.repo.crypto().blob_id(data));
        self.save_as(kind, data, Some(id))
    }

    fn save_as(
        &self,
        kind: BlobKind,
        data: &[u8],
        hashed: Option<BlobId>,
    ) -> Result<(BlobId, u64)> {
        if data.len() > blob::MAX_BLOB_LEN {
            return Err(crate::Error::InvalidInput(format!(
                "a {} of {} MiB is more than one blob may hold ({} MiB)",
                match kind {
                    BlobKind::Data => "chunk",
                    BlobKind::Tree => "directory listing",
                },
                data.len() >> 20,
                blob::MAX_BLOB_LEN >> 20
            )));
        }
        self.ensure_whole()?;
        let id = hashed.unwrap_or_else(|| self.repo.crypto().blob_id(data));
        if !lock(&self.taken).insert(id) {
            return Ok((id, 0)); // in a pack of this run that is not indexed yet
        }
        if self.repo.index().contains(&id)? {
            lock(&self.taken).remove(&id);
            return Ok((id, 0));
        }
        let level = self.repo.config().compression_level;
        let stored_len = ENCODED
            .with(|cell| {
                let mut buf = cell.borrow_mut();
                let n = blob::encode_into(self.repo.crypto(), kind, &id, data, level, &mut buf);
                let sealed = &buf[..n];
                if kind == BlobKind::Data && self.negotiates() {
                    let asked = hashed.is_some();
                    self.hold(HeldBlob {
                        id,
                        sealed: sealed.to_vec(),
                        raw_length: data.len(),
                        asked,
                    })
                } else {
                    self.append(id, kind, sealed, data.len())
                }
                .map(|()| n)
            })
            .inspect_err(|_| {
                // Not in any pack: a later save of the same content must store it.
                lock(&self.taken).remove(&id);
            })? as u64;
        self.blobs_new.fetch_add(1, Ordering::Relaxed);
        self.bytes_new
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        self.bytes_stored.fetch_add(stored_len, Ordering::Relaxed);
        Ok((id, stored_len))
    }

    /// Stores a directory's tree (already sorted), moving long extent lists into list
    /// blobs first ([`Tree::move_out_long_content`]). Returns the tree's id and the bytes
    /// it and its list blobs added.
    ///
    /// A repository of format 1 has no list blobs: every list stays in its tree, as
    /// before, and a tree that outgrows a blob is refused with a message saying why.
    pub fn save_tree(&self, mut tree: Tree) -> Result<(BlobId, u64)> {
        let mut stored = 0;
        let version = self.repo.config().version;
        let lists = version >= crate::config::EXTENT_LISTS_VERSION;
        if lists {
            tree.move_out_long_content(self.repo.extents_inline(), |list| {
                let (id, n) = self.save(BlobKind::Tree, list)?;
                stored += n;
                Ok(id)
            })?;
        }
        let (id, n) = self
            .save(BlobKind::Tree, &tree.encode())
            .map_err(|e| match e {
                crate::Error::InvalidInput(m) if !lists => crate::Error::InvalidInput(format!(
                    "{m}: this repository (format version {version}) keeps every file's \
                         list of chunks in its directory's listing, so about 1.2 million chunks \
                         fit in one directory (a file of about 600 GiB); `repo upgrade` moves it \
                         to format 2, which does not have that limit"
                )),
                e => e,
            })?;
        Ok((id, stored + n))
    }

    /// Appends an already stored (sealed) blob as it is, without deduplication: a repack
    /// copying a blob out of a pack that is about to go. The caller verified it.
    pub fn add_stored(&self, entry: &PackEntry, stored: &[u8]) -> Result<()> {
        self.ensure_whole()?;
        self.append(entry.id, entry.kind, stored, entry.raw_length as usize)
    }

    /// Adds a stored blob to the open pack of its kind (starting one if needed);
    /// finishes the pack when full.
    fn append(&self, id: BlobId, kind: BlobKind, stored: &[u8], raw_length: usize) -> Result<()> {
        let full = {
            let mut open = lock(&self.open[slot(kind)]);
            // Checked under the lock: a pack lost by another thread may have held blobs
            // this call would otherwise join.
            self.ensure_whole()?;
            let pack = match &mut *open {
                Some(p) => p,
                None => {
                    let file = self
                        .repo
                        .backend()
                        .create(FileKind::Pack)
                        .ctx(|| "starting a pack".into())?;
                    open.insert(PackWriter::new(file).ctx(|| "writing a pack".into())?)
                }
            };
            if let Err(e) = pack.add(id, kind, stored, raw_length) {
                // The pack is unusable, and with it what it acknowledged: fail-stop.
                let lost = pack.entries().to_vec();
                *open = None;
                return Err(self.lose(&lost, e, "writing a pack"));
            }
            if pack.len() >= u64::from(self.repo.config().pack_size) {
                open.take()
            } else {
                None
            }
        };
        if let Some(pack) = full {
            self.write_pack(pack)?;
        }
        Ok(())
    }

    /// Holds a sealed data blob back from the packs (with a blob directory: see the
    /// module docs); settles the held blobs once they fill a pack.
    fn hold(&self, blob: HeldBlob) -> Result<()> {
        let full = {
            let mut held = lock(&self.held);
            // Under the lock, as in `append`: a lost pack stops every later blob.
            self.ensure_whole()?;
            held.bytes += blob.sealed.len() as u64;
            held.blobs.push(blob);
            (held.bytes >= u64::from(self.repo.config().pack_size))
                .then(|| std::mem::take(&mut *held))
        };
        match full {
            Some(held) => self.settle(held),
            None => Ok(()),
        }
    }

    /// Asks the blob directory about the held blobs not asked about yet, drops those
    /// the index now has (another pack holds them, by its trailer), and writes the rest
    /// as one pack.
    fn settle(&self, held: Held) -> Result<()> {
        let unasked: Vec<BlobId> = held
            .blobs
            .iter()
            .filter(|b| !b.asked)
            .map(|b| b.id)
            .collect();
        if let Err(e) = self.repo.learn_from_directory(&unasked) {
            tracing::warn!("asking the storage which blobs it has: {e}");
        }
        let (found, keep): (Vec<HeldBlob>, Vec<HeldBlob>) = held
            .blobs
            .into_iter()
            .partition(|b| matches!(self.repo.index().contains(&b.id), Ok(true)));
        self.forget_found(&found);
        if keep.is_empty() {
            return Ok(());
        }
        let ids: Vec<BlobId> = keep.iter().map(|b| b.id).collect();
        let mut pack = self
            .repo
            .backend()
            .create(FileKind::Pack)
            .and_then(PackWriter::new)
            .map_err(|e| self.lose_ids(&ids, e, "starting a pack"))?;
        for b in &keep {
            pack.add(b.id, BlobKind::Data, &b.sealed, b.raw_length)
                .map_err(|e| self.lose_ids(&ids, e, "writing a pack"))?;
        }
        drop(keep);
        self.write_pack(pack)
    }

    /// Blobs found in other packs after they were acknowledged: indexed now, so no
    /// longer this run's to store, and not counted as stored.
    fn forget_found(&self, found: &[HeldBlob]) {
        if found.is_empty() {
            return;
        }
        let mut taken = lock(&self.taken);
        for b in found {
            taken.remove(&b.id);
        }
        drop(taken);
        let raw: usize = found.iter().map(|b| b.raw_length).sum();
        let sealed: usize = found.iter().map(|b| b.sealed.len()).sum();
        self.found_blobs
            .fetch_add(found.len() as u64, Ordering::Relaxed);
        self.found_bytes.fetch_add(raw as u64, Ordering::Relaxed);
        self.found_stored
            .fetch_add(sealed as u64, Ordering::Relaxed);
        tracing::debug!(
            "{} blobs ({raw} bytes) found in other packs: not sent",
            found.len()
        );
    }

    /// Finishes a pack, makes it durable under its id, then indexes it.
    fn write_pack(&self, pack: OpenPack<'r>) -> Result<()> {
        let acknowledged = pack.entries().to_vec();
        let FinishedPack {
            id,
            len,
            entries,
            out,
        } = match pack.finish(self.repo.crypto()) {
            Ok(f) => f,
            Err(e) => return Err(self.lose(&acknowledged, e, "writing a pack")),
        };
        if let Err(e) = out.commit(&id.to_hex()) {
            return Err(self.lose(&acknowledged, e, &format!("writing pack {id}")));
        }
        if let Err(e) = self.repo.index().add_pack(&id, len, &entries) {
            // Durable but not indexed: the next open indexes it (the index is a cache),
            // but this run cannot vouch for its blobs.
            let err = std::io::Error::other(e.to_string());
            return Err(self.lose(&acknowledged, err, &format!("indexing pack {id}")));
        }
        // Tell the storage's blob directory (a repository server) what the pack holds,
        // so that other hosts need not send it again. Only an optimisation: the pack is
        // durable and indexed whatever the answer.
        if let Some(directory) = self.repo.backend().directory() {
            let blobs: Vec<BlobId> = entries.iter().map(|e| e.id).collect();
            if let Err(e) = directory.report(&id, &blobs) {
                tracing::warn!("pack {id} not reported to the storage's blob directory: {e}");
            }
        }
        // Indexed: from now on the index answers for these blobs.
        let mut taken = lock(&self.taken);
        for e in &entries {
            taken.remove(&e.id);
        }
        drop(taken);
        self.packs.fetch_add(1, Ordering::Relaxed);
        self.pack_bytes.fetch_add(len, Ordering::Relaxed);
        Ok(())
    }

    /// Writes the last, partly filled packs (data first, then trees). Call before
    /// referring to the saved blobs from a snapshot.
    pub fn flush(&self) -> Result<()> {
        self.ensure_whole()?;
        let held = std::mem::take(&mut *lock(&self.held));
        if !held.blobs.is_empty() {
            self.settle(held)?;
        }
        for open in &self.open {
            self.ensure_whole()?;
            let Some(pack) = lock(open).take() else {
                continue;
            };
            if pack.is_empty() {
                continue; // dropped: its file goes with it
            }
            self.write_pack(pack)?;
        }
        Ok(())
    }

    #[must_use]
    pub fn stats(&self) -> SaverStats {
        let less = |counted: &AtomicU64, found: &AtomicU64| {
            counted
                .load(Ordering::Relaxed)
                .saturating_sub(found.load(Ordering::Relaxed))
        };
        SaverStats {
            blobs_new: less(&self.blobs_new, &self.found_blobs),
            bytes_new: less(&self.bytes_new, &self.found_bytes),
            bytes_stored: less(&self.bytes_stored, &self.found_stored),
            packs: self.packs.load(Ordering::Relaxed),
            pack_bytes: self.pack_bytes.load(Ordering::Relaxed),
            blobs_found: self.found_blobs.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::crypto::Encryption;

    #[test]
    fn memory_for_ids_is_bounded_by_the_packs_in_flight_and_dedup_holds() {
        let d = tempfile::tempdir().unwrap();
        let mut config = Config::new(Encryption::Aes256Gcm);
        config.pack_size = 1 << 20;
        let repo = crate::test_util::repo_in(d.path(), config);
        let saver = BlobSaver::new(&repo);
        // Incompressible 64 KiB blobs, so that 16 of them fill a pack.
        let blob = |i: u32| -> Vec<u8> {
            let mut x = u64::from(i).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            (0..(64 << 10) / 8)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_le_bytes()
                })
                .collect()
        };
        // 200 blobs of 64 KiB: 12.5 packs of 1 MiB.
        for i in 0..200 {
            saver.save(BlobKind::Data, &blob(i)).unwrap();
            // Only the ids of the open pack are remembered (16 blobs fill one).
            assert!(
                lock(&saver.taken).len() <= 17,
                "{}",
                lock(&saver.taken).len()
            );
        }
        // Saving them again stores nothing: the index or the open pack answers.
        for i in 0..200 {
            assert_eq!(saver.save(BlobKind::Data, &blob(i)).unwrap().1, 0);
        }
        saver.flush().unwrap();
        assert!(lock(&saver.taken).is_empty());
        assert_eq!(saver.stats().blobs_new, 200);
        assert_eq!(repo.index().totals().unwrap().blobs, 200);

        // A blob over the format's limit is refused, not stored: readers would reject
        // its pack.
        let big = vec![7u8; blob::MAX_BLOB_LEN + 1];
        let err = saver.save(BlobKind::Tree, &big).unwrap_err();
        assert!(
            matches!(&err, crate::Error::InvalidInput(m) if m.contains("directory listing of 64 MiB")),
            "{err}"
        );
        saver.flush().unwrap();
        assert_eq!(saver.stats().blobs_new, 200);
        // Exactly at the limit is fine.
        saver.save(BlobKind::Tree, &big[1..]).unwrap();
        saver.flush().unwrap();
        assert_eq!(repo.index().totals().unwrap().blobs, 201);
    }
}

#[cfg(test)]
mod tree_tests {
    use super::*;
    use crate::config::Config;
    use crate::crypto::Encryption;
    use crate::tree::{Extent, Node, NodeKind, EXTENTS_INLINE};

    /// A tree of one file of `n` one-byte extents, alternately data and holes (the data
    /// blobs need not exist: only the lists are read back).
    #[test]
    fn trees_go_to_packs_of_their_own() {
        let (_fs, repo) =
            crate::test_util::sim_repo(crate::test_util::small_config(Encryption::Aes256Gcm));
        let files: Vec<(String, Vec<u8>)> = (0..40)
            .map(|i| (format!("f{i}"), crate::test_util::bytes(i, 100_000)))
            .collect();
        let named: Vec<(&str, Vec<u8>)> =
            files.iter().map(|(n, d)| (n.as_str(), d.clone())).collect();
        crate::test_util::snapshot_of(&repo, &named);
        let packs = repo.index().packs().unwrap();
        let mut kinds = Vec::new();
        for p in &packs {
            let rows = repo.index().pack_rows(p).unwrap();
            let data = rows
                .iter()
                .filter(|(_, e)| e.kind == BlobKind::Data)
                .count();
            assert!(
                data == 0 || data == rows.len(),
                "pack {p} mixes data and trees"
            );
            kinds.push(data > 0);
        }
        assert!(kinds.contains(&true) && kinds.contains(&false), "{kinds:?}");
    }

    fn long_file(n: usize) -> Tree {
        let content: Vec<Extent> = (0..n)
            .map(|i| Extent {
                blob: (i % 2 == 0)
                    .then(|| BlobId(crate::id::Id::from_bytes([(i % 251) as u8; 32]))),
                len: 1,
            })
            .collect();
        Tree {
            nodes: vec![Node {
                size: n as u64,
                content,
                ..Node::new(b"huge".to_vec(), NodeKind::File)
            }],
        }
    }

    #[test]
    fn a_long_extent_list_goes_to_list_blobs_in_format_2_and_stays_inline_in_format_1() {
        let n = 2 * EXTENTS_INLINE + 5;
        let want = long_file(n);
        for version in [2, 1] {
            let d = tempfile::tempdir().unwrap();
            let mut config = Config::new(Encryption::Aes256Gcm);
            config.version = version;
            let repo = crate::test_util::repo_in(d.path(), config);
            let saver = BlobSaver::new(&repo);
            let (id, stored) = saver.save_tree(want.clone()).unwrap();
            saver.flush().unwrap();
            // The tree as stored: the list in three blobs (format 2), or inline.
            let raw = Tree::decode(&repo.read_blob(&id).unwrap(), &id).unwrap();
            let lists = if version == 2 { 3 } else { 0 };
            assert_eq!(raw.nodes[0].content_lists.len(), lists, "format {version}");
            assert_eq!(raw.nodes[0].content.is_empty(), version == 2);
            assert_eq!(saver.stats().blobs_new, 1 + lists as u64);
            assert!(stored > 0);
            // Loaded: the whole list, in order, and the list blobs named for prune and
            // check.
            let loaded = repo.load_tree(&id).unwrap();
            assert_eq!(loaded.nodes[0].content, want.nodes[0].content);
            assert_eq!(
                loaded.nodes[0].content_blobs().count(),
                lists + n.div_ceil(2)
            );
            // Saved again (an unchanged file in the next backup): the same tree, nothing
            // new stored.
            let saver = BlobSaver::new(&repo);
            assert_eq!(saver.save_tree(loaded).unwrap(), (id, 0));
        }
    }

    #[test]
    fn a_short_extent_list_stays_inline() {
        let d = tempfile::tempdir().unwrap();
        let repo = crate::test_util::repo_in(d.path(), Config::new(Encryption::None));
        let saver = BlobSaver::new(&repo);
        let (id, _) = saver.save_tree(long_file(EXTENTS_INLINE)).unwrap();
        saver.flush().unwrap();
        let raw = Tree::decode(&repo.read_blob(&id).unwrap(), &id).unwrap();
        assert!(raw.nodes[0].content_lists.is_empty());
        assert_eq!(raw.nodes[0].content.len(), EXTENTS_INLINE);
    }
}

#[cfg(test)]
mod negotiation {
    use std::sync::Arc;

    use super::*;
    use crate::crypto::Encryption;
    use crate::keyfile::KdfParams;
    use crate::repository::OpenOptions;
    use crate::store::sim::SimFs;
    use crate::store::Backend;
    use crate::test_util::{bytes, sim_backend, small_config, WithDirectory};

    fn blob(i: u64) -> Vec<u8> {
        bytes(i, 64 << 10)
    }

    fn lazy(dir: &Arc<WithDirectory>, index: &std::path::Path) -> Repository {
        let opts = OpenOptions {
            index: Some(index.to_owned()),
            lazy_index: true,
            ..OpenOptions::default()
        };
        Repository::open_with(dir.clone(), &opts, &|| {
            Ok(zeroize::Zeroizing::new(b"pw".to_vec()))
        })
        .unwrap()
    }

    #[test]
    fn a_host_new_to_the_repository_asks_stores_only_what_no_pack_holds_and_believes_only_trailers()
    {
        let fs = SimFs::new();
        let (dir, a) = host_a_stores_64(&fs);
        assert_eq!(dir.rows.lock().unwrap().len(), 64);
        let packs = a.index().packs().unwrap();
        assert!(packs.len() >= 4, "{packs:?}");
        let id = |i: u64| a.crypto().blob_id(&blob(i));

        // Host B opens lazily with an empty index: no trailer read at open.
        let scratch = tempfile::tempdir().unwrap();
        let index = scratch.path().join("index.sqlite");
        let asked_before = dir.sizes_asked();
        let b = lazy(&dir, &index);
        assert!(b.index_is_partial());
        assert_eq!(dir.sizes_asked(), asked_before);
        assert!(b.index().packs().unwrap().is_empty());

        // B saves 8 of A's blobs and 4 new ones: asks once, reads the trailer of the one
        // pack that holds the 8, stores the 4.
        let saver = BlobSaver::new(&b);
        let chunks: Vec<Vec<u8>> = (0..8).chain(100..104).map(blob).collect();
        let ids: Vec<BlobId> = chunks.iter().map(|c| b.crypto().blob_id(c)).collect();
        saver.ask_before_storing(&ids).unwrap();
        assert_eq!(dir.sizes_asked() - asked_before, 1);
        for c in &chunks {
            saver.save(BlobKind::Data, c).unwrap();
        }
        saver.flush().unwrap();
        assert_eq!(saver.stats().blobs_new, 4);

        // A blob the partial index lacks is read through the directory: one more
        // trailer, not a listing of every pack.
        let asked = dir.sizes_asked();
        assert_eq!(b.read_blob(&id(63)).unwrap(), blob(63));
        assert!(
            dir.sizes_asked() - asked <= 2,
            "{}",
            dir.sizes_asked() - asked
        );
        assert!(b.index().packs().unwrap().len() < packs.len() + 1);

        // A lying directory (pack 0 named for a blob it does not hold) is not believed:
        // the blob is stored.
        let liar = b.crypto().blob_id(&blob(200));
        dir.rows.lock().unwrap().push((liar, packs[0]));
        let saver = BlobSaver::new(&b);
        saver.ask_before_storing(&[liar]).unwrap();
        assert!(saver.save(BlobKind::Data, &blob(200)).unwrap().1 > 0);
        saver.flush().unwrap();

        // A pack removed since (a prune elsewhere) leaves the index at the next lazy
        // open, though the directory still names it: its blobs are stored again, never
        // deduplicated against a pack that is gone.
        let first = id(0);
        let holder = a.index().lookup(&first).unwrap().unwrap().pack;
        dir.remove(FileKind::Pack, &holder.to_hex()).unwrap();
        let again = lazy(&dir, &index);
        assert!(!again.index().contains(&first).unwrap());
        let saver = BlobSaver::new(&again);
        saver.ask_before_storing(&[first]).unwrap();
        assert!(saver.save(BlobKind::Data, &blob(0)).unwrap().1 > 0);
        saver.flush().unwrap();
        assert_eq!(again.read_blob(&first).unwrap(), blob(0));
    }

    /// Host A stores 64 blobs of 64 KiB (4 packs of 1 MiB, each reported); returns the
    /// directory and A.
    fn host_a_stores_64(fs: &SimFs) -> (Arc<WithDirectory>, Repository) {
        let dir = Arc::new(WithDirectory::over(sim_backend(fs)));
        let a = Repository::init_on(
            dir.clone(),
            &OpenOptions::default(),
            b"pw",
            small_config(Encryption::Aes256Gcm),
            KdfParams::TEST_ONLY_WEAK,
        )
        .unwrap();
        let saver = BlobSaver::new(&a);
        for i in 0..64 {
            saver.save(BlobKind::Data, &blob(i)).unwrap();
        }
        saver.flush().unwrap();
        drop(saver);
        (dir, a)
    }

    #[test]
    fn small_blobs_saved_without_asking_are_asked_about_once_a_pack_and_only_the_new_are_sent() {
        let fs = SimFs::new();
        let (dir, a) = host_a_stores_64(&fs);
        let a_packs = a.index().packs().unwrap();
        let scratch = tempfile::tempdir().unwrap();
        let b = lazy(&dir, &scratch.path().join("index.sqlite"));
        // B saves 24 of A's blobs among 8 new ones, one at a time (small files: nobody
        // asked first): a pack's worth is held, asked about in one question, and only
        // the new blobs are written.
        let saver = BlobSaver::new(&b);
        let mine: Vec<u64> = (0..24).chain(100..108).collect();
        let locates = dir.locates();
        let mut acknowledged = Vec::new();
        for i in &mine {
            acknowledged.push(saver.save(BlobKind::Data, &blob(*i)).unwrap().0);
        }
        saver.flush().unwrap();
        let stats = saver.stats();
        assert_eq!((stats.blobs_new, stats.blobs_found), (8, 24), "{stats:?}");
        // 32 blobs of 64 KiB are two packs' worth: two questions, not 32.
        assert_eq!(dir.locates() - locates, 2);
        // What B wrote: its packs hold only the 8 new blobs.
        let b_packs: Vec<_> = b
            .index()
            .packs()
            .unwrap()
            .into_iter()
            .filter(|p| !a_packs.contains(p))
            .collect();
        let written: usize = b_packs
            .iter()
            .map(|p| b.index().pack_rows(p).unwrap().len())
            .sum();
        assert_eq!(written, 8);
        assert!(stats.bytes_stored < 9 * (64 << 10), "{stats:?}");
        // Every acknowledged blob reads back, wherever it ended up.
        for (i, id) in mine.iter().zip(&acknowledged) {
            assert_eq!(b.read_blob(id).unwrap(), blob(*i));
        }
        assert!(saver.lost_blobs().is_empty());
    }

    #[test]
    fn held_blobs_lost_with_their_pack_stop_the_saver_and_are_named() {
        use crate::store::sim::{Effect, Fault, Op};
        let fs = SimFs::new();
        let (dir, _a) = host_a_stores_64(&fs);
        let scratch = tempfile::tempdir().unwrap();
        let b = lazy(&dir, &scratch.path().join("index.sqlite"));
        let saver = BlobSaver::new(&b);
        let (first, _) = saver.save(BlobKind::Data, &blob(100)).unwrap();
        // The held blobs' pack fails at its fsync.
        fs.reset_faults();
        fs.inject(Fault {
            op: Some(Op::Sync),
            nth: 0,
            effect: Effect::Fail {
                errno: libc::ENOSPC,
                sticky: false,
            },
        });
        let err = (101..140)
            .find_map(|i| saver.save(BlobKind::Data, &blob(i)).err())
            .expect("a pack's worth was held, and its write failed");
        assert!(err.to_string().contains("lost with it"), "{err}");
        assert!(saver.lost_blobs().contains(&first));
        assert!(saver.save(BlobKind::Data, &blob(100)).is_err());
        assert!(saver.flush().is_err());
        assert!(!b.index().contains(&first).unwrap());
    }

    #[test]
    fn a_repack_copies_blobs_without_asking_even_when_the_directory_names_their_pack() {
        // A prune's repack copies a blob out of a pack about to be deleted: were it
        // asked about, the directory would name that very pack, and the copy would be
        // dropped for a pack that is going.
        let fs = SimFs::new();
        let (dir, a) = host_a_stores_64(&fs);
        let pack = a.index().packs().unwrap()[0];
        let rows = a.index().pack_rows(&pack).unwrap();
        let bytes = dir.read(FileKind::Pack, &pack.to_hex()).unwrap();
        let locates = dir.locates();
        let saver = BlobSaver::new(&a);
        for (_, e) in &rows {
            let sealed = crate::pack::verified_blob(a.crypto(), &bytes, e).unwrap();
            saver.add_stored(e, sealed).unwrap();
        }
        saver.flush().unwrap();
        assert_eq!(dir.locates(), locates);
        assert!(saver.stats().packs >= 1);
    }

    #[test]
    fn without_a_directory_a_lazy_open_is_a_full_one() {
        let fs = SimFs::new();
        let opts = OpenOptions {
            lazy_index: true,
            ..OpenOptions::default()
        };
        drop(
            Repository::init_on(
                sim_backend(&fs),
                &OpenOptions::default(),
                b"pw",
                small_config(Encryption::Aes256Gcm),
                KdfParams::TEST_ONLY_WEAK,
            )
            .unwrap(),
        );
        let repo = Repository::open_with(sim_backend(&fs), &opts, &|| {
            Ok(zeroize::Zeroizing::new(b"pw".to_vec()))
        })
        .unwrap();
        assert!(!repo.index_is_partial());
    }
}
