//! Chunking a reader and saving its chunks: the data path of every backup.
//!
//! Content is read into a buffer of up to [`BATCH_BYTES`], cut with FastCDC, and the
//! chunks of one buffer are hashed, compressed and encrypted in parallel (rayon) while
//! the next buffer is read on the calling thread (`rayon::in_place_scope`). The bytes after the last cut are carried
//! into the next buffer, so boundaries are those of the whole stream. Memory: two
//! buffers per file in flight; a small file gets a buffer of its own size.

use std::io::{self, Read};

use rayon::prelude::*;

use crate::blob::BlobKind;
use crate::chunker::{cut, ChunkerParams};
use crate::error::Error;
use crate::progress::Progress;
use crate::saver::BlobSaver;
use crate::tree::Extent;

/// Bytes read ahead and saved together.
pub const BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Why reading content stopped.
#[derive(Debug)]
pub enum ContentError {
    /// The source could not be read (the file, the stream): the caller decides.
    Source(io::Error),
    /// The repository failed: the backup must stop.
    Repo(Error),
}

/// Appends up to `want` bytes from `r` to `buf`; returns whether the source ended.
fn fill<R: Read>(r: &mut R, buf: &mut Vec<u8>, want: usize) -> io::Result<bool> {
    let want = want.saturating_sub(buf.len());
    let got = r.take(want as u64).read_to_end(buf)?;
    Ok(got < want)
}

/// Chunks all of `reader` and appends one extent per chunk to `out`. `size_hint` (the
/// expected length) sizes the first buffer. Returns the bytes read.
pub fn save_content<R: Read>(
    saver: &BlobSaver<'_>,
    params: ChunkerParams,
    mut reader: R,
    size_hint: u64,
    progress: &Progress,
    out: &mut Vec<Extent>,
) -> Result<u64, ContentError> {
    let cap = BATCH_BYTES.max(2 * params.max_size as usize);
    // One byte more than expected, so that a file of the expected size ends in one read.
    let first = usize::try_from(size_hint)
        .unwrap_or(usize::MAX)
        .saturating_add(1)
        .min(cap);
    let mut cur = Vec::with_capacity(first);
    let mut eof = fill(&mut reader, &mut cur, first).map_err(ContentError::Source)?;
    let mut total = 0u64;
    while !cur.is_empty() {
        let ends = cut(&cur, params, eof);
        let consumed = ends.last().copied().unwrap_or(0);
        let mut next = Vec::new();
        if !eof {
            next.reserve(cap);
            next.extend_from_slice(&cur[consumed..]);
        }
        let starts = std::iter::once(0).chain(ends.iter().copied());
        let ranges: Vec<(usize, usize)> = starts.zip(ends.iter().copied()).collect();
        // The chunks are saved on the pool while this thread reads the next buffer (so
        // the reader need not be `Send`: a tar entry is not).
        let mut saved: Option<Result<Vec<Extent>, Error>> = None;
        let filled = rayon::in_place_scope(|scope| {
            let (cur, ranges, slot) = (&cur, &ranges, &mut saved);
            scope.spawn(move |_| {
                *slot = Some(
                    ranges
                        .par_iter()
                        .map(|&(a, b)| {
                            let (id, stored) = saver.save(BlobKind::Data, &cur[a..b])?;
                            Progress::add(&progress.bytes_stored, stored);
                            Ok(Extent {
                                blob: Some(id),
                                len: (b - a) as u64,
                            })
                        })
                        .collect::<Result<Vec<Extent>, Error>>(),
                );
            });
            if eof {
                Ok(true)
            } else {
                fill(&mut reader, &mut next, cap)
            }
        });
        // The scope ran the job (or re-raised its panic): `None` cannot happen, and must
        // never turn into a file with no content.
        let saved = saved.unwrap_or_else(|| {
            Err(Error::io(
                "saving chunks",
                io::Error::other("the saving task did not run"),
            ))
        });
        let saved = saved.map_err(ContentError::Repo)?;
        total += consumed as u64;
        Progress::add(&progress.bytes_read, consumed as u64);
        Progress::add(&progress.bytes_done, consumed as u64);
        out.extend(saved);
        if eof {
            break;
        }
        eof = filled.map_err(ContentError::Source)?;
        cur = next;
    }
    Ok(total)
}
