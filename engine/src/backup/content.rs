//! Chunking a reader and saving its chunks: the data path of every backup.
//!
//! Content is read into a buffer of up to [`BATCH_BYTES`] taken from the backup's
//! [`ReadBudget`], cut with FastCDC, and the chunks of one buffer are saved by the
//! [`ChunkWorkers`] while this thread reads the next buffer (when the budget has room
//! for it). The bytes after the last cut start the next buffer, so boundaries are those
//! of the whole stream. A small file gets a buffer of its own size.

use std::io::{self, Read};
use std::ops::Range;
use std::sync::Arc;

use super::pipeline::{ChunkWorkers, ReadBuf, Saved, BATCH_BYTES};
use crate::chunker::{cut, ChunkerParams};
use crate::error::Error;
use crate::progress::Progress;
use crate::tree::Extent;

/// Why reading content stopped.
#[derive(Debug)]
pub enum ContentError {
    /// The source could not be read (the file, the stream): the caller decides.
    Source(io::Error),
    /// The repository failed: the backup must stop.
    Repo(Error),
}

/// Appends up to `want` bytes from `r` to `buf` (whose capacity is at least `want`);
/// returns whether the source ended.
fn fill<R: Read>(r: &mut R, buf: &mut Vec<u8>, want: usize) -> io::Result<bool> {
    let want = want.saturating_sub(buf.len());
    let got = r.take(want as u64).read_to_end(buf)?;
    Ok(got < want)
}

/// Chunks all of `reader` and appends one extent per chunk to `out`. `size_hint` (the
/// expected length) sizes the first buffer. Returns the bytes read.
pub fn save_content<R: Read>(
    workers: &ChunkWorkers<'_, '_>,
    params: ChunkerParams,
    mut reader: R,
    size_hint: u64,
    progress: &Progress,
    out: &mut Vec<Extent>,
) -> Result<u64, ContentError> {
    let budget = workers.budget();
    let cap = BATCH_BYTES.max(2 * params.max_size as usize);
    // One byte more than expected, so that a file of the expected size ends in one read.
    let first = usize::try_from(size_hint)
        .unwrap_or(usize::MAX)
        .saturating_add(1)
        .min(cap);
    let mut cur = budget.take(first);
    let mut eof = fill(&mut reader, cur.vec(), first).map_err(ContentError::Source)?;
    let mut total = 0u64;
    while !cur.is_empty() {
        progress.check_cancelled().map_err(ContentError::Repo)?;
        let ends = cut(&cur, params, eof);
        let consumed = ends.last().copied().unwrap_or(0);
        let starts = std::iter::once(0).chain(ends.iter().copied());
        let ranges: Vec<Range<usize>> = starts
            .zip(ends.iter().copied())
            .map(|(a, b)| a..b)
            .collect();
        let shared = Arc::new(cur);
        let pending = workers.save(&shared, &ranges, false, size_hint);
        // Read ahead while the workers save, when the budget has room.
        let mut ahead: Option<(ReadBuf<'_>, io::Result<bool>)> = None;
        if !eof {
            if let Some(mut next) = budget.try_take(cap) {
                next.vec().extend_from_slice(&shared[consumed..]);
                let filled = fill(&mut reader, next.vec(), cap);
                ahead = Some((next, filled));
            }
        }
        let saved = pending.wait().map_err(ContentError::Repo)?;
        for (r, s) in ranges.iter().zip(saved) {
            let blob = match s {
                Saved::Blob { id, stored } => {
                    Progress::add(&progress.bytes_stored, stored);
                    Some(id)
                }
                Saved::Hole => None,
            };
            out.push(Extent {
                blob,
                len: r.len() as u64,
            });
        }
        total += consumed as u64;
        Progress::add(&progress.bytes_read, consumed as u64);
        Progress::add(&progress.bytes_done, consumed as u64);
        if eof {
            break;
        }
        // Every worker let go of the buffer before it answered.
        let Ok(mut done) = Arc::try_unwrap(shared) else {
            return Err(ContentError::Repo(Error::io(
                "saving chunks",
                io::Error::other("a chunk buffer is still in use"),
            )));
        };
        match ahead {
            Some((next, filled)) => {
                drop(done);
                cur = next;
                eof = filled.map_err(ContentError::Source)?;
            }
            None => {
                // No read-ahead: the tail moves to the front and the buffer fills again.
                done.vec().drain(..consumed);
                eof = fill(&mut reader, done.vec(), cap).map_err(ContentError::Source)?;
                cur = done;
            }
        }
    }
    Ok(total)
}
