//! One regular file's contents in a writable layer: the snapshot's bytes below
//! `lower_limit`, overridden chunk by chunk by a sparse upper file, and the upper file
//! alone from `lower_limit` on.
//!
//! ```text
//! offset 0 ............................ lower_limit ............ size
//!        | chunk | chunk* | chunk | ... |  upper file only        |
//!          lower   upper    lower
//! ```
//!
//! A chunk (64 KiB by default) marked local in the [`Bitmap`] is read from the upper
//! file; the others from the snapshot. The first write into a chunk that is not local
//! copies the chunk's snapshot bytes into the upper file (unless the write covers them
//! all), then marks it local. A truncate below `lower_limit` lowers it for good: bytes
//! past it never come from the snapshot again (an extension reads zeros). New files have
//! `lower_limit` 0 and are plain sparse files.
//!
//! Durability: chunks marked local since the last [`Content::take_dirty`] are recorded
//! in the layer's store only after the upper file was synced, so that a crash never
//! leaves a chunk marked local whose bytes did not reach the disk.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::time::SystemTime;

use super::LowerRead;
use crate::view::{FsError, FsResult};

/// Which chunks of a file are local (in the upper file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    #[must_use]
    pub fn get(&self, i: u64) -> bool {
        let (w, b) = (usize::try_from(i / 64).unwrap_or(usize::MAX), i % 64);
        self.words.get(w).is_some_and(|x| x & (1 << b) != 0)
    }

    pub fn set(&mut self, i: u64) {
        let (w, b) = (usize::try_from(i / 64).unwrap_or(usize::MAX), i % 64);
        if self.words.len() <= w {
            self.words.resize(w + 1, 0);
        }
        self.words[w] |= 1 << b;
    }

    /// The set chunks, in order.
    pub fn iter(&self) -> impl Iterator<Item = u64> + '_ {
        self.words.iter().enumerate().flat_map(|(w, &x)| {
            (0..64u64)
                .filter(move |b| x & (1 << b) != 0)
                .map(move |b| w as u64 * 64 + b)
        })
    }

    #[must_use]
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }
}

/// The contents and times of one regular file.
#[derive(Debug)]
pub struct Content {
    pub size: u64,
    /// Bytes below this that are not in a local chunk come from the snapshot.
    pub lower_limit: u64,
    pub local: Bitmap,
    /// Chunks marked local since they were last recorded in the store.
    pub dirty: Vec<u64>,
    /// Size, limit or times changed since they were last recorded.
    pub meta_dirty: bool,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    /// The sparse upper file, once anything was written.
    pub upper: Option<File>,
    /// The upper file was created and its directory not synced since.
    pub upper_new: bool,
}

fn io(e: &std::io::Error) -> FsError {
    FsError::Io(e.to_string())
}

impl Content {
    /// A file as the snapshot has it, nothing local yet.
    #[must_use]
    pub fn from_lower(size: u64, mtime: SystemTime, ctime: SystemTime) -> Self {
        Self {
            size,
            lower_limit: size,
            local: Bitmap::default(),
            dirty: Vec::new(),
            meta_dirty: false,
            atime: mtime,
            mtime,
            ctime,
            upper: None,
            upper_new: false,
        }
    }

    /// A new, empty file.
    #[must_use]
    pub fn new_file(now: SystemTime) -> Self {
        Self {
            meta_dirty: true,
            ..Self::from_lower(0, now, now)
        }
    }

    /// Bytes held in the upper file (its allocated blocks).
    #[must_use]
    pub fn upper_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.upper
            .as_ref()
            .and_then(|f| f.metadata().ok())
            .map_or(0, |m| m.blocks() * 512)
    }

    /// Reads `[offset, offset + len)` (less at the end of the file).
    pub fn read(
        &self,
        chunk: u64,
        lower: &dyn LowerRead,
        offset: u64,
        len: u64,
    ) -> FsResult<Vec<u8>> {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return Ok(Vec::new());
        }
        let mut out = vec![0u8; usize::try_from(end - offset).map_err(|_| FsError::Invalid)?];
        let mut pos = offset;
        while pos < end {
            let (stop, from_upper) = self.run(chunk, pos, end);
            let dst = &mut out[idx(pos - offset)..idx(stop - offset)];
            if from_upper {
                self.read_upper(pos, dst)?;
            } else {
                lower.read_lower(pos, dst)?;
            }
            pos = stop;
        }
        Ok(out)
    }

    /// The byte ranges whose contents may differ from the snapshot's file: the local
    /// chunks below `lower_limit`, and everything from there to the size.
    #[must_use]
    pub fn changed_ranges(&self, chunk: u64) -> Vec<std::ops::Range<u64>> {
        let mut out: Vec<std::ops::Range<u64>> = Vec::new();
        let limit = self.lower_limit.min(self.size);
        for c in self.local.iter() {
            let (s, e) = (c * chunk, ((c + 1) * chunk).min(limit));
            if s >= e {
                break;
            }
            match out.last_mut() {
                Some(last) if last.end == s => last.end = e,
                _ => out.push(s..e),
            }
        }
        if limit < self.size {
            match out.last_mut() {
                Some(last) if last.end == limit => last.end = self.size,
                _ => out.push(limit..self.size),
            }
        }
        out
    }

    /// Whether `[offset, offset + len)` (within the file) is served by the snapshot
    /// alone: then a read can hand out the snapshot's bytes without assembling them.
    #[must_use]
    pub fn all_lower(&self, chunk: u64, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len).min(self.size);
        offset < end && {
            let (stop, upper) = self.run(chunk, offset, end);
            !upper && stop == end
        }
    }

    /// The longest run from `pos` (before `end`) served by one side; whether it is the
    /// upper file.
    fn run(&self, chunk: u64, pos: u64, end: u64) -> (u64, bool) {
        if pos >= self.lower_limit {
            return (end, true);
        }
        let local = self.local.get(pos / chunk);
        let mut stop = (pos / chunk + 1) * chunk;
        while stop < end && stop < self.lower_limit && self.local.get(stop / chunk) == local {
            stop += chunk;
        }
        let mut stop = stop.min(end);
        if !local {
            stop = stop.min(self.lower_limit);
        }
        (stop, local)
    }

    /// Fills `dst` from the upper file at `pos`; what lies past its end reads as zeros.
    fn read_upper(&self, pos: u64, dst: &mut [u8]) -> FsResult<()> {
        let Some(f) = &self.upper else {
            dst.fill(0);
            return Ok(());
        };
        let mut done = 0;
        while done < dst.len() {
            match f.read_at(&mut dst[done..], pos + done as u64) {
                Ok(0) => {
                    dst[done..].fill(0);
                    break;
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(&e)),
            }
        }
        Ok(())
    }

    /// Writes `data` at `offset`, copying up the snapshot's bytes of every chunk it only
    /// partly covers. `open_upper` makes the upper file on the first write.
    pub fn write(
        &mut self,
        chunk: u64,
        lower: &dyn LowerRead,
        open_upper: &dyn Fn() -> FsResult<File>,
        offset: u64,
        data: &[u8],
        now: SystemTime,
    ) -> FsResult<()> {
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or(FsError::Invalid)?;
        if data.is_empty() {
            return Ok(());
        }
        self.ensure_upper(open_upper)?;
        if offset < self.lower_limit {
            let last = (end.min(self.lower_limit) - 1) / chunk;
            for c in offset / chunk..=last {
                if self.local.get(c) {
                    continue;
                }
                let (cs, ce) = (c * chunk, ((c + 1) * chunk).min(self.lower_limit));
                if offset > cs || end < ce {
                    self.copy_up(lower, cs, ce)?;
                }
                self.local.set(c);
                self.dirty.push(c);
            }
        }
        self.write_upper(offset, data)?;
        if end > self.size {
            self.size = end;
        }
        self.mtime = now;
        self.ctime = now;
        self.meta_dirty = true;
        Ok(())
    }

    fn ensure_upper(&mut self, open_upper: &dyn Fn() -> FsResult<File>) -> FsResult<()> {
        if self.upper.is_none() {
            self.upper = Some(open_upper()?);
            self.upper_new = true;
        }
        Ok(())
    }

    fn copy_up(&self, lower: &dyn LowerRead, start: u64, end: u64) -> FsResult<()> {
        let mut buf = vec![0u8; idx(end - start)];
        lower.read_lower(start, &mut buf)?;
        self.write_upper(start, &buf)
    }

    fn write_upper(&self, offset: u64, data: &[u8]) -> FsResult<()> {
        let f = self.upper.as_ref().ok_or(FsError::Invalid)?;
        f.write_all_at(data, offset).map_err(|e| io(&e))
    }

    /// Sets the size. Shrinking lowers `lower_limit` for good and cuts the upper file.
    pub fn truncate(&mut self, size: u64, now: SystemTime) -> FsResult<()> {
        if size < self.size {
            self.lower_limit = self.lower_limit.min(size);
            if let Some(f) = &self.upper {
                f.set_len(size).map_err(|e| io(&e))?;
            }
        }
        self.size = size;
        self.mtime = now;
        self.ctime = now;
        self.meta_dirty = true;
        Ok(())
    }

    /// `fallocate` mode 0 or `FALLOC_FL_KEEP_SIZE`: reserves space in the upper file for
    /// what lies past `lower_limit` (the snapshot's bytes need none), and grows the size
    /// unless `keep_size`.
    pub fn allocate(
        &mut self,
        open_upper: &dyn Fn() -> FsResult<File>,
        offset: u64,
        len: u64,
        keep_size: bool,
        now: SystemTime,
    ) -> FsResult<()> {
        let end = offset.checked_add(len).ok_or(FsError::Invalid)?;
        let from = offset.max(self.lower_limit);
        if from < end {
            self.ensure_upper(open_upper)?;
            let f = self.upper.as_ref().ok_or(FsError::Invalid)?;
            let mode = if keep_size || end <= self.size {
                nix::fcntl::FallocateFlags::FALLOC_FL_KEEP_SIZE
            } else {
                nix::fcntl::FallocateFlags::empty()
            };
            nix::fcntl::fallocate(
                std::os::fd::AsRawFd::as_raw_fd(f),
                mode,
                i64::try_from(from).map_err(|_| FsError::Invalid)?,
                i64::try_from(end - from).map_err(|_| FsError::Invalid)?,
            )
            .map_err(|e| FsError::Io(e.to_string()))?;
        }
        if !keep_size && end > self.size {
            self.size = end;
            self.ctime = now;
            self.meta_dirty = true;
        }
        Ok(())
    }

    /// SEEK_DATA (`data`) or SEEK_HOLE from `offset`: the snapshot's holes below
    /// `lower_limit` where no chunk is local, the upper file's above it. Local chunks
    /// count as data.
    pub fn seek(
        &self,
        chunk: u64,
        lower: &dyn LowerRead,
        offset: u64,
        data: bool,
    ) -> FsResult<u64> {
        if offset >= self.size {
            return Err(FsError::NoSuchOffset);
        }
        let mut pos = offset;
        while pos < self.size {
            if pos >= self.lower_limit {
                return self.seek_upper(pos, data);
            }
            let c = pos / chunk;
            let chunk_end = ((c + 1) * chunk).min(self.lower_limit);
            if self.local.get(c) {
                if data {
                    return Ok(pos);
                }
                pos = chunk_end;
                continue;
            }
            // The snapshot's answer, if it falls within this chunk.
            match lower.seek_lower(pos, data) {
                Ok(at) if at < chunk_end => return Ok(at),
                Ok(_) | Err(FsError::NoSuchOffset) => pos = chunk_end,
                Err(e) => return Err(e),
            }
        }
        if data {
            Err(FsError::NoSuchOffset)
        } else {
            Ok(self.size)
        }
    }

    fn seek_upper(&self, pos: u64, data: bool) -> FsResult<u64> {
        let Some(f) = &self.upper else {
            return if data {
                Err(FsError::NoSuchOffset)
            } else {
                Ok(pos)
            };
        };
        let whence = if data {
            nix::unistd::Whence::SeekData
        } else {
            nix::unistd::Whence::SeekHole
        };
        let fd = std::os::fd::AsRawFd::as_raw_fd(f);
        match nix::unistd::lseek(
            fd,
            i64::try_from(pos).map_err(|_| FsError::Invalid)?,
            whence,
        ) {
            Ok(at) => Ok(u64::try_from(at).unwrap_or(0).min(self.size)),
            // Past the upper file's end: a hole up to the size.
            Err(nix::errno::Errno::ENXIO) if data => Err(FsError::NoSuchOffset),
            Err(nix::errno::Errno::ENXIO) => Ok(pos),
            Err(e) => Err(FsError::Io(e.to_string())),
        }
    }

    /// The chunks to record as local, once the upper file was synced.
    pub fn take_dirty(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.dirty)
    }
}

fn idx(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}
