//! The filesystem operations a [`super::LocalBackend`] is made of, behind a trait.
//!
//! [`RealFs`] is the operating system's filesystem. [`super::sim::SimFs`] is an in-memory
//! one that models what a power loss keeps (only what was fsynced) and injects errors,
//! so that the backend's write order is tested, not just its happy path.
//!
//! The operations are the few a repository needs, each with the durability rule of a
//! POSIX filesystem: a file's bytes are durable once [`FsFile::sync_all`] returns; a
//! name (a created, renamed or removed entry) is durable once [`Fs::sync_dir`] of its
//! directory returns. Nothing else is promised.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

/// A file being written (created new, never opened twice for writing).
pub trait FsFile: Write + Send {
    /// Makes the bytes written so far durable (fsync).
    fn sync_all(&mut self) -> io::Result<()>;
}

/// A file open for positioned reads.
pub trait ReadAt: Send + Sync {
    /// Reads exactly `buf.len()` bytes at `offset` (`UnexpectedEof` past the end).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// What [`Fs::metadata`] and [`Fs::read_dir`] tell of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    pub is_dir: bool,
    pub is_file: bool,
    pub len: u64,
    pub modified: SystemTime,
    /// Changes whenever an entry is added to or removed from a directory (its
    /// modification time in ns on a real filesystem).
    pub stamp: i64,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    /// Entries whose name is not UTF-8 are not listed: no repository file has one.
    pub name: String,
    pub meta: Meta,
}

/// The filesystem under a local repository. See the module docs for durability.
pub trait Fs: Send + Sync + std::fmt::Debug {
    /// Creates a new file (fails if it exists), mode 0600.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn FsFile>>;
    /// Opens a file for positioned reads.
    fn open(&self, path: &Path) -> io::Result<Arc<dyn ReadAt>>;
    /// Reads a whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Renames a file, replacing `to` if it exists.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Creates a directory and its missing parents, mode 0700.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// Makes a directory's entries durable (fsync of the directory).
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// The entries of a directory.
    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>>;
    /// What a path is.
    fn metadata(&self, path: &Path) -> io::Result<Meta>;
}

/// The operating system's filesystem.
#[derive(Debug, Clone, Copy, Default)]
pub struct RealFs;

struct RealFile(File);

impl Write for RealFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()
    }
}

impl FsFile for RealFile {
    fn sync_all(&mut self) -> io::Result<()> {
        self.0.sync_all()
    }
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

fn meta_of(md: &fs::Metadata) -> Meta {
    Meta {
        is_dir: md.is_dir(),
        is_file: md.is_file(),
        len: md.len(),
        modified: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        stamp: md.mtime() * 1_000_000_000 + md.mtime_nsec(),
    }
}

impl Fs for RealFs {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        Ok(Box::new(RealFile(f)))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn ReadAt>> {
        Ok(Arc::new(File::open(path)?))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut v = Vec::new();
        File::open(path)?.read_to_end(&mut v)?;
        Ok(v)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        DirBuilder::new().mode(0o700).recursive(true).create(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let mut out = Vec::new();
        for e in fs::read_dir(path)? {
            let e = e?;
            let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let md = match e.metadata() {
                Ok(m) => m,
                // Removed between the listing and the stat.
                Err(err) if err.kind() == io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            };
            out.push(DirEntry {
                name,
                meta: meta_of(&md),
            });
        }
        Ok(out)
    }

    fn metadata(&self, path: &Path) -> io::Result<Meta> {
        Ok(meta_of(&fs::metadata(path)?))
    }
}
