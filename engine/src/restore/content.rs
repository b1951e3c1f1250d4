//! Writing the contents of restored files.
//!
//! Every blob is read once, however many files and offsets use it. The blobs wanted are
//! looked up in the index first, then fetched pack by pack in storage order: blobs that
//! lie close together in a pack come in one read (a [`ReadRange`]). Ranges are decoded and
//! written in parallel with positioned writes, so one large file (a disk image) uses
//! every core as well as many small ones do. Holes are never written: a file whose
//! content ends in a hole gets its length from `set_len`.
//!
//! Memory: the plan is built and executed in batches of at most [`BATCH_BLOBS`] distinct
//! blobs (about 150 bytes each), and each worker holds one range of at most the
//! storage's read size ([`crate::store::Backend::read_size_hint`]: 1 MiB on a local
//! disk, 8 MiB in object storage; a single larger blob is read alone) plus its decoded
//! blob. A blob used in two batches is read twice.
//!
//! Ranges are read from the storage under any read cache ([`crate::store::Backend::uncached`]):
//! a restore reads each blob once, and caching what it reads would only write it twice.
//!
//! Files are created on their first write and closed after their last; at most
//! [`OPEN_FILES`] stay open between writes. A damaged or missing blob costs the bytes it
//! covers (left as zeros, reported per file) and nothing else: when a read covering
//! several blobs fails, each of its blobs is read alone.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rayon::prelude::*;

use super::writeback::Writeback;
use crate::blob::{self, Verify};
use crate::error::Result;
use crate::id::{BlobId, PackId};
use crate::index::BlobLocation;
use crate::progress::Progress;
use crate::repository::Repository;
use crate::store::FileKind;
use crate::tree::Node;

/// Distinct blobs planned and fetched together (a pack's blobs wanted by two batches
/// cost two reads of it: over object storage, two requests).
const BATCH_BLOBS: usize = 128 * 1024;
/// Unwanted bytes a read may cover to join two wanted blobs of a pack (at least; an
/// eighth of the storage's read size when that is more: over object storage a request
/// costs more than a MiB read for nothing).
const MAX_GAP: u64 = 128 << 10;
/// Files kept open between writes (a file is closed after its last write regardless).
const OPEN_FILES: usize = 256;

/// A regular file to restore: where it goes and what it holds.
pub(super) struct FileToWrite<'a> {
    pub dest: &'a Path,
    pub node: &'a Node,
}

/// What became of one file: the problems with parts of it (damaged blobs, its content
/// is otherwise complete), or the error that stopped it.
pub(super) type Written = io::Result<Vec<String>>;

/// Writes the content of `files` (created or truncated), in parallel on `pool`.
/// Returns one result per file, in order.
pub(super) fn write_files(
    repo: &Repository,
    files: &[FileToWrite<'_>],
    pool: &rayon::ThreadPool,
    writeback: Option<&Writeback>,
    progress: &Progress,
) -> Result<Vec<Written>> {
    let states: Vec<FileState<'_>> = files.iter().map(FileState::new).collect();
    let writer = Writer {
        repo,
        files: &states,
        open_files: AtomicUsize::new(0),
        writeback,
        progress,
    };
    let mut batch = Batch::default();
    for (i, f) in files.iter().enumerate() {
        let file = u32::try_from(i).map_err(|_| {
            crate::Error::InvalidInput("more than 4 billion files in one restore".into())
        })?;
        let mut offset = 0;
        for e in &f.node.content {
            if let Some(id) = e.blob {
                batch.add(
                    id,
                    Use {
                        file,
                        offset,
                        len: e.len,
                    },
                );
            }
            offset += e.len;
        }
        if batch.wanted.len() >= BATCH_BLOBS {
            writer.run(std::mem::take(&mut batch), pool)?;
        }
    }
    writer.run(batch, pool)?;
    // Files no write reached (empty, all holes, or every blob lost) and files with lost
    // parts still need their full length.
    let results = pool.install(|| {
        states
            .par_iter()
            .map(|s| {
                let written = s.finish();
                if s.node.content.iter().all(|e| e.blob.is_none()) {
                    Progress::add(&progress.files_done, 1);
                }
                written
            })
            .collect()
    });
    Ok(results)
}

/// One place a blob's content goes.
#[derive(Debug, Clone, Copy)]
struct Use {
    file: u32,
    offset: u64,
    len: u64,
}

/// A blob to fetch and everywhere it goes.
struct Wanted {
    id: BlobId,
    uses: Vec<Use>,
}

/// Distinct blobs wanted, in the order first met.
#[derive(Default)]
struct Batch {
    wanted: Vec<Wanted>,
    position: HashMap<BlobId, usize>,
}

impl Batch {
    fn add(&mut self, id: BlobId, u: Use) {
        let i = *self.position.entry(id).or_insert_with(|| {
            self.wanted.push(Wanted {
                id,
                uses: Vec::with_capacity(1),
            });
            self.wanted.len() - 1
        });
        self.wanted[i].uses.push(u);
    }
}

/// Blobs of one pack fetched with one read: `start..end` of the pack.
struct ReadRange {
    pack: PackId,
    start: u64,
    end: u64,
    /// Indices into the located blobs, in offset order.
    blobs: std::ops::Range<usize>,
}

/// Groups located blobs (sorted by pack and offset) into reads of at most `max_range`
/// bytes (unless one blob is longer).
fn read_ranges(located: &[(BlobLocation, Wanted)], max_range: u64) -> Vec<ReadRange> {
    let max_gap = MAX_GAP.max(max_range / 8);
    let mut ranges: Vec<ReadRange> = Vec::new();
    for (i, (loc, _)) in located.iter().enumerate() {
        let end = loc.offset + u64::from(loc.length);
        if let Some(r) = ranges.last_mut() {
            if r.pack == loc.pack
                && loc.offset >= r.end
                && loc.offset - r.end <= max_gap
                && end - r.start <= max_range
            {
                r.end = end;
                r.blobs.end = i + 1;
                continue;
            }
        }
        ranges.push(ReadRange {
            pack: loc.pack,
            start: loc.offset,
            end,
            blobs: i..i + 1,
        });
    }
    ranges
}

/// The shared state of one [`write_files`] call.
struct Writer<'a> {
    repo: &'a Repository,
    files: &'a [FileState<'a>],
    open_files: AtomicUsize,
    writeback: Option<&'a Writeback>,
    progress: &'a Progress,
}

impl Writer<'_> {
    /// Locates a batch's blobs, then fetches and writes them.
    fn run(&self, batch: Batch, pool: &rayon::ThreadPool) -> Result<()> {
        let mut located = Vec::with_capacity(batch.wanted.len());
        for w in batch.wanted {
            match self.repo.locate(&w.id) {
                Ok(loc) => located.push((loc, w)),
                Err(e @ crate::Error::Corrupt { .. }) => self.lose(&w, &e.to_string()),
                Err(e) => return Err(e),
            }
        }
        located.sort_unstable_by_key(|(a, _)| (a.pack, a.offset));
        let ranges = read_ranges(&located, self.repo.backend().read_size_hint());
        pool.install(|| {
            ranges
                .par_iter()
                .for_each(|r| self.fetch(r, &located[r.blobs.clone()]));
        });
        Ok(())
    }

    /// Reads one range and writes its blobs; falls back to reading blob by blob when
    /// the range cannot be read whole (a truncated pack loses only what is missing).
    fn fetch(&self, range: &ReadRange, blobs: &[(BlobLocation, Wanted)]) {
        if let Some(first) = blobs.first().and_then(|(_, w)| w.uses.first()) {
            self.progress
                .set_current(&self.files[first.file as usize].dest.to_string_lossy());
        }
        let storage = self.repo.backend();
        let read = storage.uncached().unwrap_or(storage).read_at(
            FileKind::Pack,
            &range.pack.to_hex(),
            range.start,
            usize::try_from(range.end - range.start).unwrap_or(usize::MAX),
        );
        let Ok(mut stored) = read else {
            for (_, w) in blobs {
                match self.repo.read_blob(&w.id) {
                    Ok(plain) => self.place(w, &plain),
                    Err(e) => self.lose(w, &e.to_string()),
                }
            }
            return;
        };
        for (loc, w) in blobs {
            let at = usize::try_from(loc.offset - range.start).unwrap_or(usize::MAX);
            let slice = &mut stored[at..at + loc.length as usize];
            match blob::decode_in_place(
                self.repo.crypto(),
                loc.kind,
                &w.id,
                slice,
                loc.raw_length as usize,
                Verify::Hash,
            ) {
                Ok(plain) => self.place(w, &plain),
                Err(e) => self.lose(w, &e.to_string()),
            }
        }
    }

    /// Writes a blob's content everywhere it goes.
    fn place(&self, w: &Wanted, plain: &[u8]) {
        for u in &w.uses {
            let file = &self.files[u.file as usize];
            if plain.len() as u64 != u.len {
                file.lose(
                    u,
                    &format!("blob {} has the wrong length", w.id),
                    self.progress,
                );
            } else {
                match file.handle(&self.open_files) {
                    Ok(Some(f)) => match f.write_all_at(plain, u.offset) {
                        Ok(()) => {
                            Progress::add(&self.progress.bytes_done, u.len);
                            if let Some(wb) = self.writeback {
                                wb.wrote(u.len);
                            }
                        }
                        Err(e) => file.fail(e),
                    },
                    Ok(None) => {}
                    Err(e) => file.fail(e),
                }
            }
            file.done_with(u.len, &self.open_files, self.progress);
        }
    }

    /// Records a blob that could not be had as lost in every place it goes.
    fn lose(&self, w: &Wanted, why: &str) {
        for u in &w.uses {
            let file = &self.files[u.file as usize];
            file.lose(u, &format!("damaged: {why}"), self.progress);
            file.done_with(u.len, &self.open_files, self.progress);
        }
    }
}

/// A file being written.
struct FileState<'a> {
    dest: &'a Path,
    node: &'a Node,
    /// Bytes of blob extents neither written nor given up yet.
    remaining: AtomicU64,
    inner: Mutex<Inner>,
}

struct Inner {
    handle: Handle,
    /// Parts lost (left as zeros): then the writes may not reach the end, and the
    /// length must be set.
    problems: Vec<String>,
    error: Option<io::Error>,
}

enum Handle {
    /// Not created yet.
    Unopened,
    Open(Arc<File>),
    /// Created, and closed between writes.
    Closed,
}

impl<'a> FileState<'a> {
    fn new(f: &FileToWrite<'a>) -> Self {
        let blob_bytes = f
            .node
            .content
            .iter()
            .filter(|e| e.blob.is_some())
            .map(|e| e.len)
            .sum();
        Self {
            dest: f.dest,
            node: f.node,
            remaining: AtomicU64::new(blob_bytes),
            inner: Mutex::new(Inner {
                handle: Handle::Unopened,
                problems: Vec::new(),
                error: None,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The open file, created on first use; `None` once the file has failed.
    fn handle(&self, open_files: &AtomicUsize) -> io::Result<Option<Arc<File>>> {
        let mut inner = self.lock();
        if inner.error.is_some() {
            return Ok(None);
        }
        let file = match &inner.handle {
            Handle::Open(f) => return Ok(Some(f.clone())),
            Handle::Unopened => {
                let f = create(self.dest)?;
                // The writes extend the file, except over a trailing hole.
                if self.node.content.last().is_some_and(|e| e.blob.is_none()) {
                    f.set_len(self.node.size)?;
                }
                f
            }
            Handle::Closed => reopen(self.dest)?,
        };
        let file = Arc::new(file);
        inner.handle = Handle::Open(file.clone());
        open_files.fetch_add(1, Ordering::Relaxed);
        Ok(Some(file))
    }

    /// Accounts for `len` bytes written or given up; closes the file after its last
    /// bytes, or when too many files are open.
    fn done_with(&self, len: u64, open_files: &AtomicUsize, progress: &Progress) {
        let left = self.remaining.fetch_sub(len, Ordering::AcqRel) - len;
        if left == 0 || open_files.load(Ordering::Relaxed) > OPEN_FILES {
            let mut inner = self.lock();
            if matches!(inner.handle, Handle::Open(_)) {
                inner.handle = Handle::Closed;
                open_files.fetch_sub(1, Ordering::Relaxed);
            }
        }
        if left == 0 {
            Progress::add(&progress.files_done, 1);
        }
    }

    fn lose(&self, u: &Use, why: &str, progress: &Progress) {
        let (start, end) = (u.offset, u.offset + u.len);
        let mut inner = self.lock();
        inner
            .problems
            .push(format!("bytes {start}..{end} are zeros: {why}"));
        Progress::add(&progress.bytes_done, u.len);
    }

    fn fail(&self, e: io::Error) {
        let mut inner = self.lock();
        if inner.error.is_none() {
            inner.error = Some(e);
        }
    }

    /// After every write: creates the file if nothing did, sets its length if a lost
    /// part may have left it short, and says what became of it.
    fn finish(&self) -> Written {
        let mut inner = self.lock();
        if let Some(e) = inner.error.take() {
            return Err(e);
        }
        match inner.handle {
            Handle::Unopened => create(self.dest)?.set_len(self.node.size)?,
            _ if !inner.problems.is_empty() => reopen(self.dest)?.set_len(self.node.size)?,
            _ => {}
        }
        inner.handle = Handle::Closed;
        Ok(std::mem::take(&mut inner.problems))
    }
}

/// Creates (or truncates) a file to restore into. Never follows a symlink in the way:
/// it is replaced, as is a directory.
fn create(to: &Path) -> io::Result<File> {
    let open = || {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(to)
    };
    match open() {
        Err(e)
            if e.raw_os_error() == Some(libc::ELOOP) || e.raw_os_error() == Some(libc::EISDIR) =>
        {
            if fs::symlink_metadata(to)?.is_dir() {
                fs::remove_dir_all(to)?;
            } else {
                fs::remove_file(to)?;
            }
            open()
        }
        r => r,
    }
}

/// Opens a file this restore created and closed, to write more of it.
fn reopen(to: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blob::BlobKind;
    use crate::id::Id;

    fn loc(pack: u8, offset: u64, length: u32) -> (BlobLocation, Wanted) {
        let mut p = [0u8; 32];
        p[0] = pack;
        (
            BlobLocation {
                pack: PackId(Id::from_bytes(p)),
                kind: BlobKind::Data,
                offset,
                length,
                raw_length: length,
            },
            Wanted {
                id: BlobId(Id::from_bytes([offset as u8; 32])),
                uses: Vec::new(),
            },
        )
    }

    #[test]
    fn a_file_closed_between_writes_is_reopened_without_losing_them() {
        let d = tempfile::tempdir().unwrap();
        let dest = d.path().join("f");
        let id = BlobId(Id::from_bytes([1; 32]));
        let node = Node {
            size: 12,
            content: vec![
                crate::tree::Extent {
                    blob: Some(id),
                    len: 4,
                },
                crate::tree::Extent { blob: None, len: 4 },
                crate::tree::Extent {
                    blob: Some(id),
                    len: 4,
                },
            ],
            ..Node::new(b"f".to_vec(), crate::tree::NodeKind::File)
        };
        let state = FileState::new(&FileToWrite {
            dest: &dest,
            node: &node,
        });
        let progress = Progress::default();
        // More files open than allowed: the file is closed after its first write...
        let open_files = AtomicUsize::new(OPEN_FILES);
        let u = Use {
            file: 0,
            offset: 0,
            len: 4,
        };
        state
            .handle(&open_files)
            .unwrap()
            .unwrap()
            .write_all_at(b"abcd", 0)
            .unwrap();
        state.done_with(4, &open_files, &progress);
        assert!(matches!(state.lock().handle, Handle::Closed));
        assert_eq!(open_files.load(Ordering::Relaxed), OPEN_FILES);
        // ...reopened for the second, which loses nothing; the last write closes it.
        state
            .handle(&open_files)
            .unwrap()
            .unwrap()
            .write_all_at(b"wxyz", 8)
            .unwrap();
        state.done_with(4, &open_files, &progress);
        assert!(matches!(state.lock().handle, Handle::Closed));
        assert_eq!(state.finish().unwrap(), Vec::<String>::new());
        assert_eq!(fs::read(&dest).unwrap(), b"abcd\0\0\0\0wxyz");
        assert_eq!(Progress::get(&progress.files_done), 1);

        // A lost part leaves zeros at full length and is reported.
        let state = FileState::new(&FileToWrite {
            dest: &dest,
            node: &node,
        });
        state.lose(&u, "gone", &progress);
        state.done_with(4, &open_files, &progress);
        state.lose(&Use { offset: 8, ..u }, "gone", &progress);
        state.done_with(4, &open_files, &progress);
        let problems = state.finish().unwrap();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[1].starts_with("bytes 8..12 are zeros"));
        assert_eq!(fs::read(&dest).unwrap(), vec![0; 12]);
    }

    #[test]
    fn close_blobs_of_a_pack_are_read_together() {
        const MAX_RANGE: u64 = 1 << 20;
        let located = vec![
            loc(1, 0, 1000),
            loc(1, 1000, 1000),
            loc(1, 2000 + MAX_GAP, 10), // gap of exactly MAX_GAP: joined
            loc(1, 2010 + 2 * MAX_GAP + 1, 10), // one byte too far: a new read
            loc(2, 2010 + 2 * MAX_GAP + 11, 10), // another pack: a new read
            loc(2, 2010 + 2 * MAX_GAP + 21, MAX_RANGE as u32), // adjacent, but too long
        ];
        let r = read_ranges(&located, MAX_RANGE);
        let spans: Vec<_> = r
            .iter()
            .map(|r| (r.start, r.end, r.blobs.clone()))
            .collect();
        assert_eq!(
            spans,
            vec![
                (0, 2010 + MAX_GAP, 0..3),
                (2010 + 2 * MAX_GAP + 1, 2010 + 2 * MAX_GAP + 11, 3..4),
                (2010 + 2 * MAX_GAP + 11, 2010 + 2 * MAX_GAP + 21, 4..5),
                (
                    2010 + 2 * MAX_GAP + 21,
                    2010 + 2 * MAX_GAP + 21 + MAX_RANGE,
                    5..6
                ),
            ]
        );
    }
}
