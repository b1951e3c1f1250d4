//! A backend with a blob directory attached ([`Directed`]): how a repository server's
//! own operations (its scheduled jobs, `repo job run` on that host) open the
//! repositories it serves, so that the packs they write (a prune's repacks, a job's
//! backup) are reported to the directory the server's clients ask, as a remote client
//! reports its packs. Everything else goes to the storage underneath, unchanged.

use std::io;
use std::sync::Arc;

use super::{Backend, BlobDirectory, FileKind, NewFile};

pub struct Directed {
    storage: Arc<dyn Backend>,
    directory: Arc<dyn BlobDirectory>,
}

impl Directed {
    #[must_use]
    pub fn new(storage: Arc<dyn Backend>, directory: Arc<dyn BlobDirectory>) -> Self {
        Self { storage, directory }
    }
}

impl Backend for Directed {
    fn location(&self) -> String {
        self.storage.location()
    }
    fn create_layout(&self) -> io::Result<()> {
        self.storage.create_layout()
    }
    fn read(&self, kind: FileKind, name: &str) -> io::Result<Vec<u8>> {
        self.storage.read(kind, name)
    }
    fn read_at(&self, kind: FileKind, name: &str, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        self.storage.read_at(kind, name, offset, len)
    }
    fn size(&self, kind: FileKind, name: &str) -> io::Result<u64> {
        self.storage.size(kind, name)
    }
    fn write(&self, kind: FileKind, name: &str, data: &[u8]) -> io::Result<()> {
        self.storage.write(kind, name, data)
    }
    fn create(&self, kind: FileKind) -> io::Result<Box<dyn NewFile + '_>> {
        self.storage.create(kind)
    }
    fn list(&self, kind: FileKind) -> io::Result<Vec<String>> {
        self.storage.list(kind)
    }
    fn pack_shards(&self) -> io::Result<Option<Vec<(String, i64)>>> {
        self.storage.pack_shards()
    }
    fn list_pack_shard(&self, shard: &str) -> io::Result<Vec<String>> {
        self.storage.list_pack_shard(shard)
    }
    fn remove(&self, kind: FileKind, name: &str) -> io::Result<()> {
        self.storage.remove(kind, name)
    }
    fn quarantine(&self, kind: FileKind, name: &str) -> io::Result<()> {
        self.storage.quarantine(kind, name)
    }
    fn modified(&self, kind: FileKind, name: &str) -> io::Result<std::time::SystemTime> {
        self.storage.modified(kind, name)
    }
    fn remove_incomplete(&self, age: std::time::Duration) -> io::Result<(u64, u64)> {
        self.storage.remove_incomplete(age)
    }
    fn read_size_hint(&self) -> u64 {
        self.storage.read_size_hint()
    }
    fn uncached(&self) -> Option<&dyn Backend> {
        self.storage.uncached()
    }
    fn directory(&self) -> Option<&dyn BlobDirectory> {
        Some(&*self.directory)
    }
}
