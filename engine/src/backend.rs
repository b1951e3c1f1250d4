//! Storage backends: where the repository's files live.
//!
//! The trait is small and synchronous. Contract of every implementation:
//! - `write` is atomic and durable when it returns: readers see the whole file or none,
//!   and a crash after the return cannot lose it. Files are immutable once written
//!   (except `Config`, written at init and replaced whole by a format upgrade).
//! - `create` starts a file written in pieces ([`NewFile`]) and named only once complete
//!   (a pack, named by the hash of its bytes): the same guarantees hold from
//!   [`NewFile::commit`] on, and a file never committed is never seen.
//! - `read_at` returns exactly `len` bytes or an error (`UnexpectedEof` for a short file).
//! - `list` returns the names (no directories) of every complete file of a kind.
//! - Nothing is cached here: caching is a decorator's job.
//!
//! [`LocalBackend`] keeps a repository in a local directory.

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// The kinds of file a repository holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FileKind {
    Config,
    Key,
    Pack,
    Snapshot,
    Lock,
    /// Damage marks written by `repair` (`damage/<snapshot id>`).
    Damage,
}

impl FileKind {
    #[must_use]
    pub fn dir(self) -> &'static str {
        match self {
            Self::Config => "",
            Self::Key => "keys",
            Self::Pack => "data",
            Self::Snapshot => "snapshots",
            Self::Lock => "locks",
            Self::Damage => "damage",
        }
    }
}

/// A place to keep a repository's files. See the module docs for the contract.
pub trait Backend: Send + Sync {
    /// Human-readable location, for messages.
    fn location(&self) -> String;
    /// Reads a whole file.
    fn read(&self, kind: FileKind, name: &str) -> io::Result<Vec<u8>>;
    /// Reads `len` bytes at `offset`.
    fn read_at(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>>;
    /// Size of a file in bytes.
    fn size(&self, kind: FileKind, name: &str) -> io::Result<u64>;
    /// Writes a whole file atomically and durably (see module docs).
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> io::Result<()>;
    /// Starts a file of `kind` to be written in pieces and named at the end. The default
    /// keeps the pieces in memory and calls [`Backend::write`] on commit; a backend that
    /// can stream to storage does so, and memory stays flat whatever the file's size.
    fn create(&self, kind: FileKind) -> io::Result<Box<dyn NewFile + '_>> {
        Ok(Box::new(BufferedFile {
            backend: self,
            kind,
            data: Vec::new(),
        }))
    }
    /// Names of all files of a kind.
    fn list(&self, kind: FileKind) -> io::Result<Vec<String>>;
    /// Packs are spread over shards (`data/XX/`, XX the first byte of the id in hex).
    /// Each shard with a stamp that changes whenever a pack is added to or removed from
    /// it (a local directory's modification time, in ns), so that a reader can list only
    /// the shards that changed since it last looked. `None`: no such stamps; list all.
    fn pack_shards(&self) -> io::Result<Option<Vec<(String, i64)>>> {
        Ok(None)
    }
    /// The packs of one shard named by [`Backend::pack_shards`].
    fn list_pack_shard(&self, shard: &str) -> io::Result<Vec<String>> {
        Ok(self
            .list(FileKind::Pack)?
            .into_iter()
            .filter(|n| n.starts_with(shard))
            .collect())
    }
    /// Removes a file; removing a missing file is not an error.
    fn remove(&self, kind: FileKind, name: &str) -> io::Result<()>;
    /// Moves a damaged file out of the repository's view (kept for forensics), into
    /// `quarantine/` for a local repository.
    fn quarantine(&self, kind: FileKind, name: &str) -> io::Result<()>;
    /// When a file was written.
    fn modified(&self, kind: FileKind, name: &str) -> io::Result<std::time::SystemTime>;
    /// Removes incomplete files (a writer killed mid-write) older than `age`; returns how
    /// many and their bytes.
    fn remove_incomplete(&self, age: std::time::Duration) -> io::Result<(u64, u64)>;
}

/// A file being written whose name is known only when it is complete. Dropping it
/// without [`NewFile::commit`] discards it.
pub trait NewFile: Write + Send {
    /// Makes the file durable and visible as `name`, atomically (see module docs).
    fn commit(self: Box<Self>, name: &str) -> io::Result<()>;
}

/// [`Backend::create`] for a backend that cannot stream: the bytes wait in memory.
struct BufferedFile<'b, B: Backend + ?Sized> {
    backend: &'b B,
    kind: FileKind,
    data: Vec<u8>,
}

impl<B: Backend + ?Sized> Write for BufferedFile<'_, B> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.data.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<B: Backend + ?Sized> NewFile for BufferedFile<'_, B> {
    fn commit(self: Box<Self>, name: &str) -> io::Result<()> {
        self.backend.write(self.kind, name, &self.data)
    }
}

/// A repository in a local directory. Directories are created 0700, files 0600.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    root: PathBuf,
    /// Packs opened lately, most recent last: reading many blobs of one pack (a restore,
    /// the mount) opens it once, and the kernel's readahead sees one sequential reader.
    open_packs: std::sync::Arc<std::sync::Mutex<OpenPacks>>,
}

/// Pack name and open handle, least recently used first.
type OpenPacks = Vec<(String, std::sync::Arc<File>)>;

/// How many pack files [`LocalBackend`] keeps open for reading.
const OPEN_PACKS: usize = 32;

const TMP_PREFIX: &str = ".tmp-";

impl LocalBackend {
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self {
            root: root.into(),
            open_packs: Default::default(),
        }
    }

    fn open_packs(&self) -> std::sync::MutexGuard<'_, OpenPacks> {
        self.open_packs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// An open handle on a pack, from the cache or newly opened.
    fn open_pack(&self, name: &str) -> io::Result<std::sync::Arc<File>> {
        {
            let mut open = self.open_packs();
            if let Some(i) = open.iter().position(|(n, _)| n == name) {
                let entry = open.remove(i);
                let f = entry.1.clone();
                open.push(entry);
                return Ok(f);
            }
        }
        let f = std::sync::Arc::new(File::open(self.path(FileKind::Pack, name))?);
        let mut open = self.open_packs();
        if open.len() >= OPEN_PACKS {
            open.remove(0);
        }
        open.push((name.to_owned(), f.clone()));
        Ok(f)
    }

    fn forget_open(&self, kind: FileKind, name: &str) {
        if kind == FileKind::Pack {
            self.open_packs().retain(|(n, _)| n != name);
        }
    }

    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates the directory layout of a new repository.
    pub fn create_layout(&self) -> io::Result<()> {
        let mut b = DirBuilder::new();
        b.mode(0o700).recursive(true);
        b.create(&self.root)?;
        for kind in [
            FileKind::Key,
            FileKind::Pack,
            FileKind::Snapshot,
            FileKind::Lock,
        ] {
            b.create(self.root.join(kind.dir()))?;
        }
        for i in 0..=255u8 {
            b.create(self.root.join("data").join(format!("{i:02x}")))?;
        }
        fsync_dir(&self.root.join("data"))?;
        fsync_dir(&self.root)
    }

    fn path(&self, kind: FileKind, name: &str) -> PathBuf {
        match kind {
            FileKind::Config => self.root.join("config"),
            // Packs are spread over 256 directories by their first hex byte.
            FileKind::Pack => self
                .root
                .join("data")
                .join(name.get(..2).unwrap_or("00"))
                .join(name),
            _ => self.root.join(kind.dir()).join(name),
        }
    }
}

/// Test hook for crash tests: with `CAIRN_TESTONLY_CRASH_AT=N` in the environment, the
/// process kills itself with SIGKILL (no cleanup, as `kill -9` would) at the Nth crash
/// point of the storage layer: before every write, remove or quarantine, and inside a write
/// once the temporary file is durable but not yet renamed.
fn crash_point() {
    static LEFT: std::sync::OnceLock<Option<std::sync::atomic::AtomicU64>> =
        std::sync::OnceLock::new();
    let left = LEFT.get_or_init(|| {
        std::env::var("CAIRN_TESTONLY_CRASH_AT")
            .ok()
            .and_then(|v| v.parse().ok())
            .map(std::sync::atomic::AtomicU64::new)
    });
    if let Some(left) = left {
        if left.fetch_sub(1, std::sync::atomic::Ordering::SeqCst) == 1 {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
        }
    }
}

/// [`Backend::create`] of [`LocalBackend`]: a temporary file, renamed on commit.
struct LocalNewFile<'b> {
    backend: &'b LocalBackend,
    kind: FileKind,
    /// `None` once committed.
    file: Option<std::io::BufWriter<File>>,
    tmp: PathBuf,
}

impl Write for LocalNewFile<'_> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        match &mut self.file {
            Some(f) => f.write(data),
            None => Err(io::Error::other("file already committed")),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.as_mut().map_or(Ok(()), Write::flush)
    }
}

impl NewFile for LocalNewFile<'_> {
    fn commit(mut self: Box<Self>, name: &str) -> io::Result<()> {
        check_name(name)?;
        let file = self
            .file
            .take()
            .ok_or_else(|| io::Error::other("file already committed"))?;
        let path = self.backend.path(self.kind, name);
        let dir = path.parent().unwrap_or(&self.backend.root).to_path_buf();
        // Crash safety: the data is durable (fsync) before its name exists (rename), and
        // the name is durable (fsync of the directory) before commit returns. A crash
        // leaves either no file or the whole file, plus at worst a `.tmp-*` file that
        // nothing refers to, `list` never shows and `remove_incomplete` deletes.
        let result = (|| {
            let file = file.into_inner().map_err(io::IntoInnerError::into_error)?;
            file.sync_all()?;
            crash_point();
            if !dir.exists() {
                DirBuilder::new().mode(0o700).recursive(true).create(&dir)?;
            }
            fs::rename(&self.tmp, &path)?;
            fsync_dir(&dir)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&self.tmp);
        }
        result
    }
}

impl Drop for LocalNewFile<'_> {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            // Never committed (an error, or the backup stopped): nothing refers to it.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn check_name(name: &str) -> io::Result<()> {
    if name.is_empty() || name.contains('/') || name.starts_with('.') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("invalid repository file name {name:?}"),
        ));
    }
    Ok(())
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    fn read(&self, kind: FileKind, name: &str) -> io::Result<Vec<u8>> {
        check_name(name)?;
        let mut f = File::open(self.path(kind, name))?;
        let mut v = Vec::new();
        f.read_to_end(&mut v)?;
        Ok(v)
    }

    fn read_at(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        check_name(name)?;
        let f = if kind == FileKind::Pack {
            self.open_pack(name)?
        } else {
            std::sync::Arc::new(File::open(self.path(kind, name))?)
        };
        let mut v = vec![0u8; len];
        f.read_exact_at(&mut v, offset)?;
        Ok(v)
    }

    fn size(&self, kind: FileKind, name: &str) -> io::Result<u64> {
        check_name(name)?;
        Ok(fs::metadata(self.path(kind, name))?.len())
    }

    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> io::Result<()> {
        check_name(name)?;
        let mut f = self.create(kind)?;
        f.write_all(data)?;
        f.commit(name)
    }

    fn create(&self, kind: FileKind) -> io::Result<Box<dyn NewFile + '_>> {
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // The temporary file waits in the kind's directory. A pack is named by its hash,
        // so its shard is unknown until the end: its temporary file waits in `data/`
        // itself, which `list` never reads as a pack.
        let dir = self.root.join(kind.dir());
        if !dir.exists() {
            DirBuilder::new().mode(0o700).recursive(true).create(&dir)?;
        }
        let tmp = dir.join(format!("{TMP_PREFIX}{}-{n}", std::process::id()));
        crash_point();
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        // Packs are written a blob at a time: a large buffer saves system calls. Other
        // files are written whole, once.
        let buffer = if kind == FileKind::Pack {
            256 << 10
        } else {
            8 << 10
        };
        Ok(Box::new(LocalNewFile {
            backend: self,
            kind,
            file: Some(std::io::BufWriter::with_capacity(buffer, file)),
            tmp,
        }))
    }

    fn pack_shards(&self) -> io::Result<Option<Vec<(String, i64)>>> {
        use std::os::unix::fs::MetadataExt;
        let mut out = Vec::new();
        for sub in fs::read_dir(self.root.join("data"))? {
            let sub = sub?;
            let Some(name) = sub.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let md = sub.metadata()?;
            if md.is_dir() && !name.starts_with('.') {
                out.push((name, md.mtime() * 1_000_000_000 + md.mtime_nsec()));
            }
        }
        Ok(Some(out))
    }

    fn list_pack_shard(&self, shard: &str) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        let entries = match fs::read_dir(self.root.join("data").join(shard)) {
            Ok(e) => e,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
            Err(e) => return Err(e),
        };
        for e in entries {
            if let Some(n) = e?.file_name().to_str() {
                if !n.starts_with('.') {
                    out.push(n.to_owned());
                }
            }
        }
        Ok(out)
    }

    fn list(&self, kind: FileKind) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        let visible = |n: &str| !n.starts_with('.');
        match kind {
            FileKind::Config => {
                if self.path(kind, "config").exists() {
                    out.push("config".to_owned());
                }
            }
            FileKind::Pack => {
                for sub in fs::read_dir(self.root.join("data"))? {
                    let sub = sub?;
                    if !sub.file_type()?.is_dir() {
                        continue;
                    }
                    for e in fs::read_dir(sub.path())? {
                        let e = e?;
                        if let Some(n) = e.file_name().to_str() {
                            if visible(n) {
                                out.push(n.to_owned());
                            }
                        }
                    }
                }
            }
            _ => {
                let dir = self.root.join(kind.dir());
                let entries = match fs::read_dir(&dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
                    Err(e) => return Err(e),
                };
                for e in entries {
                    let e = e?;
                    if let Some(n) = e.file_name().to_str() {
                        if visible(n) {
                            out.push(n.to_owned());
                        }
                    }
                }
            }
        }
        out.sort();
        Ok(out)
    }

    fn remove(&self, kind: FileKind, name: &str) -> io::Result<()> {
        check_name(name)?;
        crash_point();
        self.forget_open(kind, name);
        match fs::remove_file(self.path(kind, name)) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    fn quarantine(&self, kind: FileKind, name: &str) -> io::Result<()> {
        check_name(name)?;
        crash_point();
        self.forget_open(kind, name);
        let dir = self.root.join("quarantine");
        DirBuilder::new().mode(0o700).recursive(true).create(&dir)?;
        fs::rename(self.path(kind, name), dir.join(name))?;
        fsync_dir(&dir)
    }

    fn modified(&self, kind: FileKind, name: &str) -> io::Result<std::time::SystemTime> {
        check_name(name)?;
        fs::metadata(self.path(kind, name))?.modified()
    }

    fn remove_incomplete(&self, age: std::time::Duration) -> io::Result<(u64, u64)> {
        let now = std::time::SystemTime::now();
        let mut dirs = vec![
            self.root.clone(),
            self.root.join("data"),
            self.root.join("snapshots"),
            self.root.join("keys"),
            self.root.join("locks"),
        ];
        for i in 0..=255u8 {
            dirs.push(self.root.join("data").join(format!("{i:02x}")));
        }
        let (mut count, mut bytes) = (0, 0);
        for dir in dirs {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries {
                let e = e?;
                if !e.file_name().to_string_lossy().starts_with(TMP_PREFIX) {
                    continue;
                }
                let meta = e.metadata()?;
                let old = meta
                    .modified()
                    .ok()
                    .and_then(|m| now.duration_since(m).ok())
                    .is_some_and(|d| d >= age);
                if meta.is_file() && old {
                    fs::remove_file(e.path())?;
                    count += 1;
                    bytes += meta.len();
                }
            }
        }
        Ok((count, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn write_read_list_modes() {
        let d = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(d.path().join("r"));
        b.create_layout().unwrap();
        b.write(FileKind::Pack, "abcd", b"hello").unwrap();
        assert_eq!(b.read(FileKind::Pack, "abcd").unwrap(), b"hello");
        assert_eq!(b.read_at(FileKind::Pack, "abcd", 1, 3).unwrap(), b"ell");
        assert!(b.read_at(FileKind::Pack, "abcd", 3, 3).is_err());
        assert_eq!(b.list(FileKind::Pack).unwrap(), vec!["abcd".to_string()]);
        let mode = fs::metadata(d.path().join("r/data/ab/abcd"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = fs::metadata(d.path().join("r"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        assert!(b.read(FileKind::Snapshot, "../config").is_err());
    }

    #[test]
    fn a_created_file_is_invisible_until_committed_and_gone_if_dropped() {
        let d = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(d.path().join("r"));
        b.create_layout().unwrap();
        let temps = || {
            fs::read_dir(d.path().join("r/data"))
                .unwrap()
                .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_file())
                .count()
        };
        let mut f = b.create(FileKind::Pack).unwrap();
        f.write_all(b"hello ").unwrap();
        f.write_all(&[7u8; 300 << 10]).unwrap(); // beyond the write buffer
        assert_eq!(temps(), 1);
        assert!(b.list(FileKind::Pack).unwrap().is_empty());
        f.commit("abcd").unwrap();
        assert_eq!(temps(), 0);
        assert_eq!(b.list(FileKind::Pack).unwrap(), vec!["abcd".to_string()]);
        let got = b.read(FileKind::Pack, "abcd").unwrap();
        assert_eq!(&got[..6], b"hello ");
        assert_eq!(got.len(), 6 + (300 << 10));
        let mode = fs::metadata(d.path().join("r/data/ab/abcd"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // Dropped before commit: nothing is left, nothing is listed.
        let mut f = b.create(FileKind::Pack).unwrap();
        f.write_all(b"half").unwrap();
        drop(f);
        assert_eq!(temps(), 0);
        assert_eq!(b.list(FileKind::Pack).unwrap().len(), 1);
        // A bad name is refused at commit, and the file is not left behind.
        let f = b.create(FileKind::Pack).unwrap();
        assert!(f.commit("../x").is_err());
        assert_eq!(temps(), 0);
    }
}
