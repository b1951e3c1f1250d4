//! [`KillingFs`]: the real filesystem, except that the process SIGKILLs itself (no
//! cleanup, as `kill -9` would) just before its Nth change (a file created or synced, a
//! rename, a removal, a directory synced). The end-to-end kill tests run the `repo`
//! binary with it, so that a kill lands on every step of a short run; the CLI installs
//! it only in debug builds (`cli/src/testonly.rs`).
//!
//! It keeps the page cache, so it cannot catch a missing fsync: that is
//! [`super::sim::SimFs`]'s job.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::fs::{DirEntry, Fs, FsFile, Meta, ReadAt, RealFs};

#[derive(Debug)]
pub struct KillingFs {
    left: Arc<AtomicU64>,
}

impl KillingFs {
    /// Kills the process just before the `nth` (1-based) change.
    #[must_use]
    pub fn at(nth: u64) -> Self {
        Self {
            left: Arc::new(AtomicU64::new(nth)),
        }
    }

    fn change(&self) {
        if self.left.fetch_sub(1, Ordering::SeqCst) == 1 {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

struct KillingFile {
    inner: Box<dyn FsFile>,
    left: Arc<AtomicU64>,
}

impl io::Write for KillingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl FsFile for KillingFile {
    fn sync_all(&mut self) -> io::Result<()> {
        KillingFs {
            left: self.left.clone(),
        }
        .change();
        self.inner.sync_all()
    }
}

impl Fs for KillingFs {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        self.change();
        Ok(Box::new(KillingFile {
            inner: RealFs.create_new(path)?,
            left: self.left.clone(),
        }))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn ReadAt>> {
        RealFs.open(path)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        RealFs.read(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.change();
        RealFs.rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        self.change();
        RealFs.remove_file(path)
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        RealFs.create_dir_all(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.change();
        RealFs.sync_dir(path)
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        RealFs.read_dir(path)
    }

    fn metadata(&self, path: &Path) -> io::Result<Meta> {
        RealFs.metadata(path)
    }
}
