//! Chunking a reader and saving its chunks: the data path of every backup.
//!
//! Batches of chunks (up to [`BATCH_BYTES`]) are saved in parallel while the next batch
//! is read (`rayon::join`), so reading overlaps hashing, compression and encryption.
//! Memory: two batches per file in flight.

use std::io::Read;

use rayon::prelude::*;

use crate::blob::BlobKind;
use crate::chunker::{Chunker, ChunkerParams};
use crate::error::Error;
use crate::progress::Progress;
use crate::saver::BlobSaver;
use crate::tree::Extent;

/// Bytes of chunks read ahead and saved together.
pub const BATCH_BYTES: usize = 16 * 1024 * 1024;

/// Why reading content stopped.
#[derive(Debug)]
pub enum ContentError {
    /// The source could not be read (the file, the stream): the caller decides.
    Source(std::io::Error),
    /// The repository failed: the backup must stop.
    Repo(Error),
}

fn next_batch<R: Read>(chunks: &mut Chunker<R>) -> Result<Vec<Vec<u8>>, std::io::Error> {
    let mut batch = Vec::new();
    let mut bytes = 0;
    while bytes < BATCH_BYTES {
        match chunks.next() {
            Some(c) => {
                let c = c?;
                bytes += c.len();
                batch.push(c);
            }
            None => break,
        }
    }
    Ok(batch)
}

/// Chunks all of `reader` and appends one extent per chunk to `out`. Returns the bytes read.
pub fn save_content<R: Read + Send>(
    saver: &BlobSaver<'_>,
    params: ChunkerParams,
    reader: R,
    progress: &Progress,
    out: &mut Vec<Extent>,
) -> Result<u64, ContentError> {
    let mut chunks = Chunker::new(reader, params);
    let mut total = 0u64;
    let mut batch = next_batch(&mut chunks).map_err(ContentError::Source)?;
    while !batch.is_empty() {
        let (saved, next) = rayon::join(
            || {
                batch
                    .par_iter()
                    .map(|c| {
                        let (id, stored) = saver.save(BlobKind::Data, c)?;
                        Progress::add(&progress.bytes_stored, stored);
                        Ok(Extent {
                            blob: Some(id),
                            len: c.len() as u64,
                        })
                    })
                    .collect::<Result<Vec<Extent>, Error>>()
            },
            || next_batch(&mut chunks),
        );
        let saved = saved.map_err(ContentError::Repo)?;
        let n: u64 = saved.iter().map(|e| e.len).sum();
        total += n;
        Progress::add(&progress.bytes_read, n);
        Progress::add(&progress.bytes_done, n);
        out.extend(saved);
        batch = next.map_err(ContentError::Source)?;
    }
    Ok(total)
}
