//! [`LocalBackend`]: a repository in a directory, on the filesystem of an [`Fs`].

use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::fs::{Fs, FsFile, ReadAt, RealFs};
use super::{check_name, Backend, FileKind, NewFile};

/// A repository in a local directory. Directories are created 0700, files 0600.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    root: PathBuf,
    fs: Arc<dyn Fs>,
    /// Packs opened lately, most recent last: reading many blobs of one pack (a restore,
    /// the mount) opens it once, and the kernel's readahead sees one sequential reader.
    open_packs: Arc<Mutex<OpenPacks>>,
}

/// Pack name and open handle, least recently used first.
struct OpenPacks(Vec<(String, Arc<dyn ReadAt>)>);

impl std::fmt::Debug for OpenPacks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} open packs", self.0.len())
    }
}

/// How many pack files [`LocalBackend`] keeps open for reading.
const OPEN_PACKS: usize = 32;

const TMP_PREFIX: &str = ".tmp-";

impl LocalBackend {
    /// A repository at `root` on the operating system's filesystem.
    #[must_use]
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self::with_fs(root, Arc::new(RealFs))
    }

    /// A repository at `root` on `fs` (an in-memory filesystem in tests).
    #[must_use]
    pub fn with_fs(root: impl Into<PathBuf>, fs: Arc<dyn Fs>) -> Self {
        Self {
            root: root.into(),
            fs,
            open_packs: Arc::new(Mutex::new(OpenPacks(Vec::new()))),
        }
    }

    fn open_packs(&self) -> MutexGuard<'_, OpenPacks> {
        self.open_packs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// An open handle on a pack, from the cache or newly opened.
    fn open_pack(&self, name: &str) -> io::Result<Arc<dyn ReadAt>> {
        {
            let mut open = self.open_packs();
            if let Some(i) = open.0.iter().position(|(n, _)| n == name) {
                let entry = open.0.remove(i);
                let f = entry.1.clone();
                open.0.push(entry);
                return Ok(f);
            }
        }
        let f = self.fs.open(&self.path(FileKind::Pack, name))?;
        let mut open = self.open_packs();
        if open.0.len() >= OPEN_PACKS {
            open.0.remove(0);
        }
        open.0.push((name.to_owned(), f.clone()));
        Ok(f)
    }

    fn forget_open(&self, kind: FileKind, name: &str) {
        if kind == FileKind::Pack {
            self.open_packs().0.retain(|(n, _)| n != name);
        }
    }

    #[must_use]
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The filesystem the repository is on.
    #[must_use]
    pub fn fs(&self) -> &Arc<dyn Fs> {
        &self.fs
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

    fn exists(&self, path: &Path) -> bool {
        self.fs.metadata(path).is_ok()
    }

    /// Makes `dir` (and its parents) where missing; the new names are made durable with
    /// the first file committed in it (its commit syncs `dir`, and the parent here).
    fn ensure_dir(&self, dir: &Path) -> io::Result<()> {
        if self.exists(dir) {
            return Ok(());
        }
        self.fs.create_dir_all(dir)?;
        if let Some(parent) = dir.parent() {
            self.fs.sync_dir(parent)?;
        }
        Ok(())
    }
}

/// [`Backend::create`] of [`LocalBackend`]: a temporary file, renamed on commit.
struct LocalNewFile<'b> {
    backend: &'b LocalBackend,
    kind: FileKind,
    /// `None` once committed.
    file: Option<std::io::BufWriter<Box<dyn FsFile>>>,
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
        let fs = &self.backend.fs;
        let path = self.backend.path(self.kind, name);
        let dir = path.parent().unwrap_or(&self.backend.root).to_path_buf();
        // Crash safety: the data is durable (fsync) before its name exists (rename), and
        // the name is durable (fsync of the directory) before commit returns. A crash
        // leaves either no file or the whole file, plus at worst a `.tmp-*` file that
        // nothing refers to, `list` never shows and `remove_incomplete` deletes.
        let result = (|| {
            let mut file = file.into_inner().map_err(io::IntoInnerError::into_error)?;
            file.sync_all()?;
            drop(file);
            self.backend.ensure_dir(&dir)?;
            fs.rename(&self.tmp, &path)?;
            fs.sync_dir(&dir)
        })();
        if result.is_err() {
            let _ = fs.remove_file(&self.tmp);
        }
        result
    }
}

impl Drop for LocalNewFile<'_> {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            // Never committed (an error, or the backup stopped): nothing refers to it.
            let _ = self.backend.fs.remove_file(&self.tmp);
        }
    }
}

impl Backend for LocalBackend {
    fn location(&self) -> String {
        self.root.display().to_string()
    }

    /// Creates the directory layout of a new repository.
    fn create_layout(&self) -> io::Result<()> {
        self.fs.create_dir_all(&self.root)?;
        for kind in [
            FileKind::Key,
            FileKind::Pack,
            FileKind::Snapshot,
            FileKind::Lock,
        ] {
            self.fs.create_dir_all(&self.root.join(kind.dir()))?;
        }
        for i in 0..=255u8 {
            self.fs
                .create_dir_all(&self.root.join("data").join(format!("{i:02x}")))?;
        }
        self.fs.sync_dir(&self.root.join("data"))?;
        self.fs.sync_dir(&self.root)?;
        if let Some(parent) = self.root.parent().filter(|p| !p.as_os_str().is_empty()) {
            // The repository's own name, made by create_dir_all, must survive a crash too.
            self.fs.sync_dir(parent)?;
        }
        Ok(())
    }

    fn read(&self, kind: FileKind, name: &str) -> io::Result<Vec<u8>> {
        check_name(name)?;
        self.fs.read(&self.path(kind, name))
    }

    fn read_at(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        check_name(name)?;
        let f = if kind == FileKind::Pack {
            self.open_pack(name)?
        } else {
            self.fs.open(&self.path(kind, name))?
        };
        let mut v = vec![0u8; len];
        f.read_exact_at(&mut v, offset)?;
        Ok(v)
    }

    fn size(&self, kind: FileKind, name: &str) -> io::Result<u64> {
        check_name(name)?;
        Ok(self.fs.metadata(&self.path(kind, name))?.len)
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
        self.ensure_dir(&dir)?;
        let tmp = dir.join(format!("{TMP_PREFIX}{}-{n}", std::process::id()));
        let file = self.fs.create_new(&tmp)?;
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
        let mut out = Vec::new();
        for e in self.fs.read_dir(&self.root.join("data"))? {
            if e.meta.is_dir && !e.name.starts_with('.') {
                out.push((e.name, e.meta.stamp));
            }
        }
        Ok(Some(out))
    }

    fn list_pack_shard(&self, shard: &str) -> io::Result<Vec<String>> {
        check_name(shard)?;
        match self.fs.read_dir(&self.root.join("data").join(shard)) {
            Ok(entries) => Ok(visible_names(entries)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(e),
        }
    }

    fn list(&self, kind: FileKind) -> io::Result<Vec<String>> {
        let mut out = Vec::new();
        match kind {
            FileKind::Config => {
                if self.exists(&self.path(kind, "config")) {
                    out.push("config".to_owned());
                }
            }
            FileKind::Pack => {
                for sub in self.fs.read_dir(&self.root.join("data"))? {
                    if sub.meta.is_dir {
                        out.extend(self.list_pack_shard(&sub.name)?);
                    }
                }
            }
            _ => match self.fs.read_dir(&self.root.join(kind.dir())) {
                Ok(entries) => out = visible_names(entries),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            },
        }
        out.sort();
        Ok(out)
    }

    fn remove(&self, kind: FileKind, name: &str) -> io::Result<()> {
        check_name(name)?;
        self.forget_open(kind, name);
        let path = self.path(kind, name);
        match self.fs.remove_file(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other?,
        }
        // Durable before the caller goes on (a prune deletes the index row first, then
        // the file: either order of loss after a crash is safe, but a removal that
        // silently comes back is confusing).
        self.fs.sync_dir(path.parent().unwrap_or(&self.root))
    }

    fn quarantine(&self, kind: FileKind, name: &str) -> io::Result<()> {
        check_name(name)?;
        self.forget_open(kind, name);
        let dir = self.root.join("quarantine");
        self.ensure_dir(&dir)?;
        let from = self.path(kind, name);
        self.fs.rename(&from, &dir.join(name))?;
        self.fs.sync_dir(&dir)?;
        self.fs.sync_dir(from.parent().unwrap_or(&self.root))
    }

    fn modified(&self, kind: FileKind, name: &str) -> io::Result<std::time::SystemTime> {
        check_name(name)?;
        Ok(self.fs.metadata(&self.path(kind, name))?.modified)
    }

    fn remove_incomplete(&self, age: std::time::Duration) -> io::Result<(u64, u64)> {
        let now = std::time::SystemTime::now();
        let mut dirs = vec![
            self.root.clone(),
            self.root.join("data"),
            self.root.join("snapshots"),
            self.root.join("keys"),
            self.root.join("locks"),
            self.root.join("damage"),
        ];
        for i in 0..=255u8 {
            dirs.push(self.root.join("data").join(format!("{i:02x}")));
        }
        let (mut count, mut bytes) = (0, 0);
        for dir in dirs {
            let Ok(entries) = self.fs.read_dir(&dir) else {
                continue;
            };
            let mut removed = false;
            for e in entries {
                if !e.name.starts_with(TMP_PREFIX) || !e.meta.is_file {
                    continue;
                }
                let old = now.duration_since(e.meta.modified).is_ok_and(|d| d >= age);
                if old {
                    self.fs.remove_file(&dir.join(&e.name))?;
                    removed = true;
                    count += 1;
                    bytes += e.meta.len;
                }
            }
            if removed {
                self.fs.sync_dir(&dir)?;
            }
        }
        Ok((count, bytes))
    }
}

fn visible_names(entries: Vec<super::fs::DirEntry>) -> Vec<String> {
    entries
        .into_iter()
        .filter(|e| !e.name.starts_with('.') && e.meta.is_file)
        .map(|e| e.name)
        .collect()
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
        let mode = std::fs::metadata(d.path().join("r/data/ab/abcd"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let mode = std::fs::metadata(d.path().join("r"))
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
            std::fs::read_dir(d.path().join("r/data"))
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
        let mode = std::fs::metadata(d.path().join("r/data/ab/abcd"))
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

/// The durability half of the contract, on a filesystem that loses what was not synced:
/// whatever an operation did is still there after a power loss right after it returned.
#[cfg(test)]
mod durability {
    use super::super::sim::SimFs;
    use super::*;

    fn backend(fs: &SimFs) -> LocalBackend {
        LocalBackend::with_fs("/r", Arc::new(fs.clone()))
    }

    #[test]
    fn every_operation_survives_a_power_loss_once_it_returned() {
        let fs = SimFs::new();
        let b = backend(&fs);
        b.create_layout().unwrap();
        b.write(FileKind::Snapshot, "s1", b"one").unwrap();
        b.write(FileKind::Snapshot, "s2", b"two").unwrap();
        let mut f = b.create(FileKind::Pack).unwrap();
        f.write_all(&[7u8; 300 << 10]).unwrap();
        f.commit("abcd").unwrap();
        b.write(FileKind::Config, "config", b"v1").unwrap();
        b.write(FileKind::Config, "config", b"v2").unwrap();
        b.write(FileKind::Lock, ".tmp-1-1", b"half").unwrap_err(); // not a name
        let after = backend(&fs.power_loss());
        assert_eq!(after.read(FileKind::Snapshot, "s1").unwrap(), b"one");
        assert_eq!(after.read(FileKind::Pack, "abcd").unwrap().len(), 300 << 10);
        assert_eq!(after.read(FileKind::Config, "config").unwrap(), b"v2");

        // A removal stays done: a forgotten snapshot must not come back after its data
        // was pruned.
        b.remove(FileKind::Snapshot, "s1").unwrap();
        b.quarantine(FileKind::Pack, "abcd").unwrap();
        let after = backend(&fs.power_loss());
        assert_eq!(
            after.list(FileKind::Snapshot).unwrap(),
            vec!["s2".to_string()]
        );
        assert!(after.list(FileKind::Pack).unwrap().is_empty());
        assert_eq!(
            fs.power_loss()
                .read(Path::new("/r/quarantine/abcd"))
                .unwrap()
                .len(),
            300 << 10
        );
    }

    #[test]
    fn an_uncommitted_file_is_never_seen_and_incomplete_files_are_removed_for_good() {
        let fs = SimFs::new();
        let b = backend(&fs);
        b.create_layout().unwrap();
        let mut f = b.create(FileKind::Pack).unwrap();
        f.write_all(b"half a pack").unwrap();
        f.flush().unwrap();
        std::mem::forget(f); // a killed writer: no drop, the temporary file stays
        assert!(b.list(FileKind::Pack).unwrap().is_empty());
        assert_eq!(b.remove_incomplete(std::time::Duration::ZERO).unwrap().0, 1);
        let after = backend(&fs.power_loss());
        assert_eq!(
            after
                .remove_incomplete(std::time::Duration::ZERO)
                .unwrap()
                .0,
            0
        );
    }
}
