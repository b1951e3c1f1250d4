//! Backing up block images (VM disks) read through a [`BlockSource`].
//!
//! The image is cut in fixed chunks aligned on multiples of the chunk size (the
//! parent snapshot's, else the repository's: 256 KiB in new repositories), so that offset -> chunk is a division for the mount and for changed-block
//! tracking. Regions the source reports as holes or zeros are not read; a chunk that
//! reads as all zeros is stored as a hole. With changed-block tracking (a dirty bitmap),
//! chunks not marked dirty are taken from the parent snapshot without being read.
//!
//! The snapshot's root tree holds one file, `<name>.raw`, whose extents are the chunks.

use std::collections::BTreeMap;
use std::io;
use std::time::Instant;

use std::sync::Arc;

use chrono::Utc;

use super::pipeline::{with_workers, ReadBuf, Saved, BATCH_BYTES};
use super::BackupOutcome;
use crate::error::{Error, Result};
use crate::id::BlobId;
use crate::progress::Progress;
use crate::repository::{current_host, Repository};
use crate::saver::BlobSaver;
use crate::snapshot::{Manifest, Snapshot, SnapshotKind, Summary};
use crate::tree::{is_valid_name, Extent};

/// The most chunks an image is cut into. Its map (the snapshot's one-file tree, ~53
/// bytes a chunk) must fit in one blob ([`crate::blob::MAX_BLOB_LEN`]): images larger than
/// this many chunks of the configured size get larger chunks (a 1 TiB image 1 MiB ones).
pub const MAX_IMAGE_CHUNKS: u64 = 1 << 20;

/// Bytes of the image described, read and saved together.
const WINDOW: u64 = BATCH_BYTES as u64;

/// A run of the image and whether it may hold data (`false`: reads as zeros).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockRegion {
    pub offset: u64,
    pub length: u64,
    pub data: bool,
}

/// Where an image's blocks come from (an NBD export, in practice).
pub trait BlockSource: Send {
    /// Guest-visible size in bytes.
    fn size(&self) -> u64;
    /// Describes `[offset, offset + len)` from `offset` on, in order; may describe less
    /// than asked (the caller asks again from where the answer ends), never nothing.
    fn map(&mut self, offset: u64, len: u64) -> io::Result<Vec<BlockRegion>>;
    /// Changed-block tracking: which parts of `[offset, offset + len)` changed since the
    /// parent backup (`data = true`: changed). `None`: unknown, read everything.
    fn changed(&mut self, _offset: u64, _len: u64) -> io::Result<Option<Vec<BlockRegion>>> {
        Ok(None)
    }
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

#[derive(Debug, Clone, Default)]
pub struct ImageBackupOptions {
    /// The image's name: the snapshot's source, and `<name>.raw` inside it.
    pub name: String,
    pub host: Option<String>,
    pub tags: Vec<String>,
    /// Fixed chunk size; `None`: the parent snapshot's (so that unchanged chunks
    /// deduplicate and changed-block tracking applies), or for a first backup the
    /// repository's (`Config::image_chunk_size`).
    pub chunk_size: Option<u64>,
    /// Take unchanged chunks from the parent (needs a source with changed-block tracking).
    pub use_changed_blocks: bool,
    /// Facts to record (source format, path, ...).
    pub meta: BTreeMap<String, String>,
    /// Identifies the source's content without reading it (an image file's and its
    /// backing files' metadata). When the parent recorded the same, nothing is read:
    /// the new snapshot shares the parent's chunks.
    pub fingerprint: Option<String>,
    /// Read everything even when the fingerprint matches.
    pub force: bool,
}

/// What one chunk is, once looked at.
#[derive(Clone, Copy)]
pub(crate) enum Chunk {
    Hole,
    Blob(BlobId),
}

/// A chunk of a window: known already (a hole, or the parent's), or to be saved from
/// the window's buffer (an index into its ranges).
#[derive(Clone, Copy)]
enum Slot {
    Known(Chunk),
    Save(usize),
}

/// One window of the image, read.
struct Window<'b> {
    slots: Vec<Slot>,
    /// Where the chunks to save lie in `buf`.
    ranges: Vec<std::ops::Range<usize>>,
    buf: ReadBuf<'b>,
}

type WindowParts = (Vec<Slot>, Vec<std::ops::Range<usize>>);

impl<'b> Window<'b> {
    /// A window read into `buf` by `read`.
    fn read(
        mut buf: ReadBuf<'b>,
        read: impl FnOnce(&mut Vec<u8>) -> Result<WindowParts>,
    ) -> Result<Self> {
        let (slots, ranges) = read(buf.vec())?;
        Ok(Self { slots, ranges, buf })
    }
}

/// The regions of `[start, end)`, asking the source as often as needed.
fn describe(
    start: u64,
    end: u64,
    mut ask: impl FnMut(u64, u64) -> io::Result<Vec<BlockRegion>>,
) -> io::Result<Vec<BlockRegion>> {
    let mut out = Vec::new();
    let mut at = start;
    while at < end {
        let regions = ask(at, end - at)?;
        let mut progressed = false;
        for r in regions {
            if r.offset != at || r.length == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "the source described regions out of order",
                ));
            }
            let len = r.length.min(end - at);
            out.push(BlockRegion {
                offset: at,
                length: len,
                data: r.data,
            });
            at += len;
            progressed = true;
            if at >= end {
                break;
            }
        }
        if !progressed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "the source described nothing",
            ));
        }
    }
    Ok(out)
}

fn overlaps(regions: &[BlockRegion], a: u64, b: u64) -> impl Iterator<Item = &BlockRegion> {
    regions
        .iter()
        .filter(move |r| r.offset < b && r.offset + r.length > a)
}

/// The parent's chunk map of its image file `file` (the first file when `None`), when
/// that image has the same size and was cut in chunks of `chunk` bytes (the parent's
/// `chunk_key` entry in its meta says so).
pub(crate) fn parent_chunks(
    repo: &Repository,
    parent: &Snapshot,
    file: Option<&[u8]>,
    chunk_key: &str,
    size: u64,
    chunk: u64,
) -> Result<Option<Vec<Chunk>>> {
    if parent
        .manifest
        .meta
        .get(chunk_key)
        .and_then(|c| c.parse().ok())
        != Some(chunk)
    {
        return Ok(None);
    }
    let tree = repo.load_tree(&parent.manifest.root)?;
    let node = match file {
        None => tree.nodes.first(),
        Some(name) => tree.nodes.iter().find(|n| n.name == name),
    };
    let Some(node) = node.filter(|n| n.size == size) else {
        return Ok(None);
    };
    let mut out = Vec::new();
    for e in &node.content {
        match e.blob {
            Some(id) => out.push(Chunk::Blob(id)),
            None => out.extend(std::iter::repeat_n(
                Chunk::Hole,
                usize::try_from(e.len.div_ceil(chunk)).unwrap_or(0),
            )),
        }
    }
    Ok((out.len() as u64 == size.div_ceil(chunk)).then_some(out))
}

/// Backs up a block image.
/// The snapshot a backup of image `name` from `host` (default: this host) would
/// compare with: the newest image snapshot of that name and host.
pub fn image_parent(repo: &Repository, host: Option<&str>, name: &str) -> Result<Option<Snapshot>> {
    let host = host.map_or_else(current_host, str::to_owned);
    super::latest_named(repo, SnapshotKind::Image, &host, name)
}

pub fn backup_image(
    repo: &Repository,
    opts: &ImageBackupOptions,
    source: &mut dyn BlockSource,
    progress: &Progress,
) -> Result<BackupOutcome> {
    let started = Instant::now();
    let file_name = format!("{}.raw", opts.name);
    if !is_valid_name(file_name.as_bytes()) || opts.name.is_empty() {
        return Err(Error::InvalidInput(format!(
            "image name {:?} must be a single file name",
            opts.name
        )));
    }
    let host = opts.host.clone().unwrap_or_else(current_host);
    let size = source.size();

    let parent = super::latest_named(repo, SnapshotKind::Image, &host, &opts.name)?;
    let parent_chunk = parent
        .as_ref()
        .and_then(|p| p.manifest.meta.get("chunk_size"))
        .and_then(|c| c.parse::<u64>().ok());
    let chunk = choose_chunk(repo, &opts.name, size, opts.chunk_size, parent_chunk)?;
    if let (Some(p), Some(fp), false) = (&parent, &opts.fingerprint, opts.force) {
        let same_size = p
            .manifest
            .meta
            .get("virtual_size")
            .and_then(|v| v.parse::<u64>().ok())
            == Some(size);
        if same_size && p.manifest.meta.get("fingerprint") == Some(fp) {
            return unchanged(repo, opts, p, host, started);
        }
    }
    let parent_map = match (&parent, opts.use_changed_blocks) {
        (Some(p), true) => parent_chunks(repo, p, None, "chunk_size", size, chunk)?,
        _ => None,
    };
    if opts.use_changed_blocks && parent_map.is_none() {
        tracing::warn!(
            "no usable parent image of {:?}: reading all of it",
            opts.name
        );
    }
    let saver = BlobSaver::new(repo);
    let (content, bytes_read) = read_image(
        &saver,
        &opts.name,
        source,
        chunk,
        parent_map.as_deref(),
        progress,
    )?;
    let now = Utc::now();
    let (root, stored) =
        super::save_single_file_tree(&saver, file_name.into_bytes(), size, content, now)?;
    Progress::add(&progress.bytes_stored, stored);
    saver.flush()?;
    let stats = saver.stats();
    let mut meta = opts.meta.clone();
    if let Some(fp) = &opts.fingerprint {
        meta.insert("fingerprint".into(), fp.clone());
    }
    meta.insert("virtual_size".into(), size.to_string());
    meta.insert("chunk_size".into(), chunk.to_string());
    if parent_map.is_some() {
        meta.insert("changed_block_tracking".into(), "yes".into());
    }
    let summary = Summary {
        files: 1,
        total_bytes: size,
        bytes_read,
        blobs_new: stats.blobs_new,
        bytes_new: stats.bytes_new,
        bytes_stored: stats.bytes_stored,
        duration_ms: super::elapsed_ms(started),
        ..Summary::default()
    };
    let manifest = Manifest {
        time: now,
        parent: parent.map(|p| p.id),
        summary,
        meta,
        ..Manifest::named(
            SnapshotKind::Image,
            &opts.name,
            host,
            opts.tags.clone(),
            root,
        )
    };
    super::commit(repo, manifest, Vec::new())
}

/// The chunk size of an image of `size` bytes: the one asked for, else the parent's
/// (so that unchanged chunks deduplicate and changed-block tracking applies), else the
/// repository's; never so small that the image has more than [`MAX_IMAGE_CHUNKS`].
pub(crate) fn choose_chunk(
    repo: &Repository,
    name: &str,
    size: u64,
    requested: Option<u64>,
    parent: Option<u64>,
) -> Result<u64> {
    let parent = parent.filter(|&c| crate::config::valid_image_chunk(c));
    // The image map is one blob: large images get larger chunks, so that it fits.
    let least = size
        .div_ceil(MAX_IMAGE_CHUNKS)
        .next_power_of_two()
        .max(64 << 10);
    let chunk = match requested {
        Some(c) if c < least => {
            return Err(Error::InvalidInput(format!(
                "image {name:?}: chunks of {c} bytes are too small for {size} bytes (at most {} \
                 chunks; at least {least} bytes each)",
                MAX_IMAGE_CHUNKS
            )))
        }
        Some(c) => c,
        None => parent
            .unwrap_or(u64::from(repo.config().image_chunk_size))
            .max(least),
    };
    if !crate::config::valid_image_chunk(chunk) {
        return Err(Error::InvalidInput(if chunk > 16 << 20 {
            format!("image {name:?} is too large: {size} bytes would need chunks over 16 MiB")
        } else {
            "image chunk size must be a power of two from 64 KiB to 16 MiB".into()
        }));
    }
    Ok(chunk)
}

/// Reads a whole image from `source` in chunks of `chunk` bytes and saves them; returns
/// its extents (one per chunk holding data, consecutive holes merged) and the bytes
/// read. With `parent_map` and a source that tracks changed blocks, unchanged chunks are
/// the parent's, not read.
pub(crate) fn read_image(
    saver: &BlobSaver<'_>,
    name: &str,
    source: &mut dyn BlockSource,
    chunk: u64,
    parent_map: Option<&[Chunk]>,
    progress: &Progress,
) -> Result<(Vec<Extent>, u64)> {
    let size = source.size();
    let src_err = |e: io::Error| Error::io(format!("reading image {name:?}"), e);
    Progress::add(&progress.total_bytes, size);
    Progress::add(&progress.total_files, 1);
    progress
        .total_known
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let window = WINDOW.max(chunk);
    let window_bytes = usize::try_from(window).unwrap_or(usize::MAX);
    let mut chunks: Vec<Chunk> =
        Vec::with_capacity(usize::try_from(size.div_ceil(chunk)).unwrap_or(0));
    let mut bytes_read = 0u64;
    // Reads one window: chunks known without reading, and the others into `v`; returns
    // the window's slots and where its chunks to save lie in `v`.
    let mut read_window =
        |start: u64, source: &mut dyn BlockSource, v: &mut Vec<u8>| -> Result<WindowParts> {
            let end = (start + window).min(size);
            let map = describe(start, end, |a, l| source.map(a, l)).map_err(src_err)?;
            let changed = match &parent_map {
                Some(_) => match source.changed(start, end - start).map_err(src_err)? {
                    Some(_) => Some(
                        describe(start, end, |a, l| {
                            source.changed(a, l).and_then(|c| {
                                c.ok_or_else(|| io::Error::other("changed-block tracking stopped"))
                            })
                        })
                        .map_err(src_err)?,
                    ),
                    None => None,
                },
                None => None,
            };
            let mut slots = Vec::new();
            let mut ranges = Vec::new();
            // Runs of consecutive chunks to save: contiguous in the image and in `v`
            // (image start, image end, start in `v`), read with one request per data
            // region rather than one per chunk.
            let mut runs: Vec<(u64, u64, usize)> = Vec::new();
            let mut a = start;
            while a < end {
                let b = (a + chunk).min(end);
                let index = usize::try_from(a / chunk).unwrap_or(usize::MAX);
                if let (Some(ch), Some(pm)) = (&changed, parent_map) {
                    if overlaps(ch, a, b).all(|r| !r.data) {
                        slots.push(Slot::Known(pm[index]));
                        Progress::add(&progress.bytes_done, b - a);
                        a = b;
                        continue;
                    }
                }
                if overlaps(&map, a, b).all(|r| !r.data) {
                    slots.push(Slot::Known(Chunk::Hole));
                    Progress::add(&progress.bytes_done, b - a);
                } else {
                    // The chunk's place in the buffer, zeroed: what no data region
                    // covers reads as zeros.
                    let at = v.len();
                    v.resize(at + usize::try_from(b - a).unwrap_or(0), 0);
                    match runs.last_mut() {
                        Some(run) if run.1 == a => run.1 = b,
                        _ => runs.push((a, b, at)),
                    }
                    slots.push(Slot::Save(ranges.len()));
                    ranges.push(at..v.len());
                }
                a = b;
            }
            for &(ra, rb, at) in &runs {
                for r in overlaps(&map, ra, rb).filter(|r| r.data) {
                    let (da, db) = (r.offset.max(ra), (r.offset + r.length).min(rb));
                    let from = at + usize::try_from(da - ra).unwrap_or(0);
                    let to = at + usize::try_from(db - ra).unwrap_or(0);
                    source.read(da, &mut v[from..to]).map_err(src_err)?;
                    bytes_read += db - da;
                    Progress::add(&progress.bytes_read, db - da);
                }
            }
            Ok((slots, ranges))
        };

    with_workers(saver, |workers| -> Result<()> {
        let budget = workers.budget();
        let mut start = 0u64;
        let mut current = if size > 0 {
            Some(Window::read(budget.take(window_bytes), |v| {
                read_window(0, source, v)
            })?)
        } else {
            None
        };
        while let Some(w) = current.take() {
            progress.check_cancelled()?;
            let next_start = start + window;
            let shared = Arc::new(w.buf);
            let pending = workers.save(&shared, &w.ranges, true, size);
            // Read the next window while the workers save this one, budget allowing.
            let mut ahead = None;
            if next_start < size {
                if let Some(buf) = budget.try_take(window_bytes) {
                    ahead = Some(Window::read(buf, |v| read_window(next_start, source, v)));
                }
            }
            let saved = pending.wait()?;
            for slot in &w.slots {
                chunks.push(match *slot {
                    Slot::Known(c) => c,
                    Slot::Save(i) => {
                        Progress::add(&progress.bytes_done, w.ranges[i].len() as u64);
                        match saved[i] {
                            Saved::Hole => Chunk::Hole,
                            Saved::Blob { id, stored } => {
                                Progress::add(&progress.bytes_stored, stored);
                                Chunk::Blob(id)
                            }
                        }
                    }
                });
            }
            // The workers let go of the buffer before answering: this frees its budget.
            drop(shared);
            start = next_start;
            current = match ahead {
                Some(next) => Some(next?),
                None if start < size => Some(Window::read(budget.take(window_bytes), |v| {
                    read_window(start, source, v)
                })?),
                None => None,
            };
        }
        Ok(())
    })?;

    // Extents: one per chunk holding data; consecutive holes merged.
    let mut content: Vec<Extent> = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let a = i as u64 * chunk;
        let len = chunk.min(size - a);
        match (c, content.last_mut()) {
            (Chunk::Hole, Some(Extent { blob: None, len: l })) => *l += len,
            (Chunk::Hole, _) => content.push(Extent { blob: None, len }),
            (Chunk::Blob(id), _) => content.push(Extent {
                blob: Some(*id),
                len,
            }),
        }
    }
    Progress::add(&progress.files_done, 1);
    Ok((content, bytes_read))
}

/// A snapshot of an image whose fingerprint matches its parent's: the same root, and
/// nothing read.
fn unchanged(
    repo: &Repository,
    opts: &ImageBackupOptions,
    parent: &Snapshot,
    host: String,
    started: Instant,
) -> Result<BackupOutcome> {
    let mut meta = parent.manifest.meta.clone();
    meta.extend(opts.meta.clone());
    meta.remove("changed_block_tracking");
    let summary = Summary {
        files: 1,
        files_unchanged: 1,
        total_bytes: parent.manifest.summary.total_bytes,
        duration_ms: super::elapsed_ms(started),
        ..Summary::default()
    };
    let manifest = Manifest {
        parent: Some(parent.id),
        summary,
        meta,
        ..Manifest::named(
            SnapshotKind::Image,
            &opts.name,
            host,
            opts.tags.clone(),
            parent.manifest.root,
        )
    };
    super::commit(repo, manifest, Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::crypto::Encryption;

    fn test_repo() -> (tempfile::TempDir, Repository) {
        let d = tempfile::tempdir().unwrap();
        let repo = crate::test_util::repo_in(d.path(), Config::new(Encryption::Aes256Gcm));
        (d, repo)
    }

    /// A test image: `Some(bytes)`, all of it data, or `None`, all of it a hole of
    /// `size` bytes (never read).
    struct TestImage {
        size: u64,
        data: Option<Vec<u8>>,
    }

    impl TestImage {
        fn data(bytes: Vec<u8>) -> Self {
            Self {
                size: bytes.len() as u64,
                data: Some(bytes),
            }
        }
        fn sparse(size: u64) -> Self {
            Self { size, data: None }
        }
    }

    impl BlockSource for TestImage {
        fn size(&self) -> u64 {
            self.size
        }
        fn map(&mut self, offset: u64, len: u64) -> io::Result<Vec<BlockRegion>> {
            Ok(vec![BlockRegion {
                offset,
                length: len,
                data: self.data.is_some(),
            }])
        }
        fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let data = self
                .data
                .as_ref()
                .ok_or_else(|| io::Error::other("a hole is never read"))?;
            let at = usize::try_from(offset).unwrap();
            buf.copy_from_slice(&data[at..at + buf.len()]);
            Ok(())
        }
    }

    #[test]
    fn the_largest_image_map_fits_in_one_blob_and_large_images_get_larger_chunks() {
        // The worst case: every chunk holds data.
        let extent = Extent {
            blob: Some(BlobId(crate::id::Id::from_bytes([0xab; 32]))),
            len: 16 << 20,
        };
        let node = crate::tree::Node {
            content: vec![extent; usize::try_from(MAX_IMAGE_CHUNKS).unwrap()],
            ..crate::tree::Node::new(b"disk.raw".to_vec(), crate::tree::NodeKind::File)
        };
        let map = crate::tree::Tree { nodes: vec![node] }.encode();
        assert!(map.len() < crate::blob::MAX_BLOB_LEN, "{} bytes", map.len());

        let (_d, repo) = test_repo();
        let chunk_of = |size: u64, chunk: Option<u64>| {
            let opts = ImageBackupOptions {
                name: format!("img{size}"),
                chunk_size: chunk,
                ..Default::default()
            };
            backup_image(
                &repo,
                &opts,
                &mut TestImage::sparse(size),
                &Progress::default(),
            )
            .map(|o| o.snapshot.manifest.meta["chunk_size"].clone())
        };
        assert_eq!(chunk_of(100 << 30, None).unwrap(), "262144");
        assert_eq!(chunk_of(1 << 40, None).unwrap(), "1048576");
        assert_eq!(chunk_of(3 << 40, None).unwrap(), "4194304");
        let small = chunk_of(1 << 40, Some(256 << 10)).unwrap_err().to_string();
        assert!(small.contains("too small"), "{small}");
        let huge = chunk_of(64 << 40, None).unwrap_err().to_string();
        assert!(huge.contains("too large"), "{huge}");
    }

    #[test]
    fn an_image_keeps_its_parents_chunk_size_and_a_new_one_takes_the_repositorys() {
        let (_d, repo) = test_repo();
        assert_eq!(repo.config().image_chunk_size, 256 << 10);
        let mut x = 7u64;
        let data: Vec<u8> = (0..5 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let backup = |name: &str, chunk: Option<u64>| {
            let opts = ImageBackupOptions {
                name: name.into(),
                chunk_size: chunk,
                ..Default::default()
            };
            backup_image(
                &repo,
                &opts,
                &mut TestImage::data(data.clone()),
                &Progress::default(),
            )
            .unwrap()
            .snapshot
            .manifest
        };
        // An image first backed up in 1 MiB chunks (a repository from before 256 KiB)...
        let first = backup("vm", Some(1 << 20));
        assert_eq!(first.meta["chunk_size"], "1048576");
        // ...stays in 1 MiB chunks: of unchanged data, only the root tree (stamped with
        // the backup's time) is new.
        let second = backup("vm", None);
        assert_eq!(second.meta["chunk_size"], "1048576");
        assert_eq!(second.summary.blobs_new, 1);
        // A new image takes the repository's size: 20 chunks of 256 KiB, and its tree.
        let other = backup("other", None);
        assert_eq!(other.meta["chunk_size"], "262144");
        assert_eq!(other.summary.blobs_new, 21);
        // An explicit size that is not a power of two is refused.
        let opts = ImageBackupOptions {
            name: "bad".into(),
            chunk_size: Some(3 << 20),
            ..Default::default()
        };
        assert!(backup_image(
            &repo,
            &opts,
            &mut TestImage::data(data.clone()),
            &Progress::default()
        )
        .is_err());
    }
}
