//! The read-only view of a repository as a filesystem, without FUSE: inode numbers,
//! lookups, directory listings, attributes, symlinks, xattrs and reads. The fuser
//! adapter ([`crate::fuse`]) only translates; tests drive this directly.
//!
//! ```text
//! /snapshots/<time>-<short id>/<backed-up paths...>
//! /hosts/<host>/<source>/<time>/<backed-up paths...>
//! /hosts/<host>/<source>/latest -> <time of the newest>
//! ```
//!
//! Inode numbers are allocated on first sight of a (parent, name) and never reused or
//! changed while mounted; files that are hard links of each other in a snapshot share
//! one inode. The snapshot list is re-read (at most every `refresh`) when a synthetic
//! directory is listed or searched, so new backups appear without remounting.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use cairn_engine::id::{BlobId, SnapshotId};
use cairn_engine::snapshot::Snapshot;
use cairn_engine::tree::{Node, NodeKind, Timestamp, Tree};
use cairn_engine::Repository;

use crate::cache::{Blob, BlobCache};
use crate::layout::Layout;
use crate::prefetch::Prefetcher;
use crate::trees::DecodedTrees;

/// Errors of filesystem operations, each with the errno it stands for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FsError {
    #[error("no such entry")]
    NotFound,
    #[error("not a directory")]
    NotDir,
    #[error("is a directory")]
    IsDir,
    #[error("invalid argument")]
    Invalid,
    #[error("no such attribute")]
    NoData,
    #[error("bad file handle")]
    BadHandle,
    #[error("read-only file system")]
    ReadOnly,
    #[error("no data or hole at or after the offset")]
    NoSuchOffset,
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    #[error("file name too long")]
    NameTooLong,
    #[error("operation not permitted")]
    NotPermitted,
    #[error("operation not supported")]
    Unsupported,
    #[error("I/O error: {0}")]
    Io(String),
}

impl FsError {
    #[must_use]
    pub fn errno(&self) -> i32 {
        match self {
            Self::NotFound => libc::ENOENT,
            Self::NotDir => libc::ENOTDIR,
            Self::IsDir => libc::EISDIR,
            Self::Invalid => libc::EINVAL,
            Self::NoData => libc::ENODATA,
            Self::BadHandle => libc::EBADF,
            Self::ReadOnly => libc::EROFS,
            Self::NoSuchOffset => libc::ENXIO,
            Self::Exists => libc::EEXIST,
            Self::NotEmpty => libc::ENOTEMPTY,
            Self::NameTooLong => libc::ENAMETOOLONG,
            Self::NotPermitted => libc::EPERM,
            Self::Unsupported => libc::EOPNOTSUPP,
            Self::Io(_) => libc::EIO,
        }
    }
}

pub type FsResult<T> = Result<T, FsError>;

pub const ROOT_INO: u64 = 1;

/// What [`View::read_into`] read.
#[derive(Debug)]
pub enum ReadData {
    /// This many zero bytes (a hole).
    Zeros(usize),
    /// A part of one decoded blob.
    Blob(Blob, std::ops::Range<usize>),
    /// The bytes are in the caller's buffer.
    Assembled,
}

/// Attributes of an inode, in plain types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: u64,
    pub kind: NodeKind,
    pub size: u64,
    /// 512-byte blocks holding data (holes take none).
    pub blocks: u64,
    /// Permission bits (`& 0o7777`).
    pub mode: u32,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
    pub rdev: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub ino: u64,
    pub name: Vec<u8>,
    pub kind: NodeKind,
}

#[derive(Clone)]
enum Kind {
    Root,
    SnapshotsDir,
    HostsDir,
    Host(String),
    Source(String, String),
    Latest(String),
    SnapshotRoot(Arc<Snapshot>),
    Node {
        root: u64,
        snapshot: SnapshotId,
        node: Arc<Node>,
    },
}

#[derive(Clone)]
struct Inode {
    parent: u64,
    name: Vec<u8>,
    kind: Kind,
}

#[derive(Default)]
struct Table {
    inodes: Vec<Inode>,
    by_name: HashMap<(u64, Vec<u8>), u64>,
    by_link: HashMap<(u64, u64, u64), u64>,
}

struct Catalog {
    list: Vec<Arc<Snapshot>>,
    layout: Layout,
    loaded: Option<Instant>,
}

struct OpenFile {
    ino: u64,
    snapshot: SnapshotId,
    node: Arc<Node>,
    /// Start offset of each extent, and the file size at the end.
    starts: Vec<u64>,
    /// Where the last read ended (to detect sequential reading).
    last_end: AtomicU64,
}

#[derive(Debug, Clone)]
pub struct ViewOptions {
    /// Bytes of decoded blobs kept in memory.
    pub cache_bytes: usize,
    /// How stale the snapshot list may be.
    pub refresh: Duration,
    /// Bytes fetched ahead of a sequential reader.
    pub readahead_bytes: u64,
    /// Every snapshot entry shown as owned by this (uid, gid) instead of its recorded
    /// owner: a VM recovery session's QEMU, which runs as its own user, reads the disk
    /// images that a root backup recorded as root's. Modes are kept.
    pub owner: Option<(u32, u32)>,
}

impl Default for ViewOptions {
    fn default() -> Self {
        Self {
            cache_bytes: 128 << 20,
            refresh: Duration::from_secs(1),
            readahead_bytes: 8 << 20,
            owner: None,
        }
    }
}

pub struct View {
    repo: Arc<Repository>,
    cache: Arc<BlobCache>,
    table: RwLock<Table>,
    catalog: Mutex<Catalog>,
    files: RwLock<HashMap<u64, Arc<OpenFile>>>,
    next_fh: AtomicU64,
    prefetch: Prefetcher,
    /// Trees decoded lately (a lookup per name must not decode its directory again).
    trees: Mutex<DecodedTrees>,
    trees_decoded: AtomicU64,
    opts: ViewOptions,
    started: SystemTime,
    owner: (u32, u32),
}

fn to_time(t: Timestamp) -> SystemTime {
    let d = Duration::new(t.sec.unsigned_abs(), t.nsec);
    if t.sec >= 0 {
        SystemTime::UNIX_EPOCH + d
    } else {
        SystemTime::UNIX_EPOCH - d
    }
}

pub(crate) fn read_lock<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn write_lock<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl View {
    pub fn new(repo: Arc<Repository>, opts: ViewOptions) -> cairn_engine::Result<Self> {
        let cache = Arc::new(BlobCache::new(repo.clone(), opts.cache_bytes));
        let root = Inode {
            parent: ROOT_INO,
            name: Vec::new(),
            kind: Kind::Root,
        };
        let view = Self {
            cache: cache.clone(),
            repo,
            table: RwLock::new(Table {
                inodes: vec![root],
                ..Table::default()
            }),
            catalog: Mutex::new(Catalog {
                list: Vec::new(),
                layout: Layout::default(),
                loaded: None,
            }),
            files: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            prefetch: Prefetcher::new(cache.clone(), 4, 8),
            trees: Mutex::new(DecodedTrees::new(opts.cache_bytes / 2)),
            trees_decoded: AtomicU64::new(0),
            opts,
            started: SystemTime::now(),
            owner: (
                nix::unistd::geteuid().as_raw(),
                nix::unistd::getegid().as_raw(),
            ),
        };
        view.refresh(true);
        Ok(view)
    }

    /// Re-reads the snapshot list if it is older than the refresh interval (or `force`).
    fn refresh(&self, force: bool) {
        let mut c = lock(&self.catalog);
        if !force && c.loaded.is_some_and(|t| t.elapsed() < self.opts.refresh) {
            return;
        }
        // New snapshots bring new packs: index them first.
        if let Err(e) = self.repo.sync_index() {
            tracing::warn!("index not refreshed: {e}");
        }
        match self.repo.snapshots() {
            Ok(list) => {
                c.layout = Layout::new(&list);
                c.list = list.into_iter().map(Arc::new).collect();
            }
            Err(e) => tracing::warn!("snapshot list not refreshed: {e}"),
        }
        c.loaded = Some(Instant::now());
    }

    fn inode(&self, ino: u64) -> FsResult<Inode> {
        let i = usize::try_from(ino.wrapping_sub(1)).map_err(|_| FsError::NotFound)?;
        read_lock(&self.table)
            .inodes
            .get(i)
            .cloned()
            .ok_or(FsError::NotFound)
    }

    /// The inode for `name` in `parent`, made on first sight.
    fn intern(&self, parent: u64, name: &[u8], kind: Kind) -> u64 {
        let mut t = write_lock(&self.table);
        let key = (parent, name.to_vec());
        if let Some(&ino) = t.by_name.get(&key) {
            if let (Kind::Latest(_), Some(slot)) = (&kind, t.inodes.get_mut(ino as usize - 1)) {
                slot.kind = kind; // `latest` moves on; everything else is immutable
            }
            return ino;
        }
        let link_key = match &kind {
            Kind::Node { root, node, .. } if node.kind == NodeKind::File && node.links > 1 => {
                Some((*root, node.device, node.inode))
            }
            _ => None,
        };
        if let Some(&ino) = link_key.as_ref().and_then(|k| t.by_link.get(k)) {
            t.by_name.insert(key, ino);
            return ino;
        }
        t.inodes.push(Inode {
            parent,
            name: name.to_vec(),
            kind,
        });
        let ino = t.inodes.len() as u64;
        t.by_name.insert(key, ino);
        if let Some(k) = link_key {
            t.by_link.insert(k, ino);
        }
        ino
    }

    /// The path of an inode inside the mount, for log lines.
    fn path_of(&self, mut ino: u64) -> PathBuf {
        let t = read_lock(&self.table);
        let mut parts = Vec::new();
        while ino != ROOT_INO {
            let Some(i) = t.inodes.get(ino as usize - 1) else {
                break;
            };
            parts.push(String::from_utf8_lossy(&i.name).into_owned());
            ino = i.parent;
        }
        let mut p = PathBuf::from("/");
        for part in parts.iter().rev() {
            p.push(part);
        }
        p
    }

    fn tree(&self, id: &BlobId) -> FsResult<Arc<Tree>> {
        if let Some(t) = lock(&self.trees).get(id) {
            return Ok(t);
        }
        let bytes = self.cache.get(id).map_err(|e| {
            tracing::error!("tree {id} unreadable: {e}");
            FsError::Io(e.to_string())
        })?;
        let tree = Tree::decode(&bytes, id).map(Arc::new).map_err(|e| {
            tracing::error!("tree {id} unreadable: {e}");
            FsError::Io(e.to_string())
        })?;
        self.trees_decoded.fetch_add(1, Ordering::Relaxed);
        lock(&self.trees).put(*id, tree.clone());
        Ok(tree)
    }

    /// How many times a tree blob was decoded (each is a CBOR parse of the whole
    /// directory): what the decoded-tree cache saves.
    #[must_use]
    pub fn trees_decoded(&self) -> u64 {
        self.trees_decoded.load(Ordering::Relaxed)
    }

    /// Children of a directory inode: (name, kind of the child inode, node kind).
    fn children(&self, ino: u64, inode: &Inode) -> FsResult<Vec<(Vec<u8>, Kind, NodeKind)>> {
        let dir = NodeKind::Dir;
        let out = match &inode.kind {
            Kind::Root => vec![
                (b"snapshots".to_vec(), Kind::SnapshotsDir, dir),
                (b"hosts".to_vec(), Kind::HostsDir, dir),
            ],
            Kind::SnapshotsDir => {
                self.refresh(false);
                let c = lock(&self.catalog);
                c.layout
                    .snapshots
                    .iter()
                    .map(|(n, &i)| {
                        (
                            n.as_bytes().to_vec(),
                            Kind::SnapshotRoot(c.list[i].clone()),
                            dir,
                        )
                    })
                    .collect()
            }
            Kind::HostsDir => {
                self.refresh(false);
                let c = lock(&self.catalog);
                c.layout
                    .hosts
                    .keys()
                    .map(|h| (h.as_bytes().to_vec(), Kind::Host(h.clone()), dir))
                    .collect()
            }
            Kind::Host(h) => {
                self.refresh(false);
                let c = lock(&self.catalog);
                let sources = c.layout.hosts.get(h).ok_or(FsError::NotFound)?;
                sources
                    .keys()
                    .map(|s| {
                        (
                            s.as_bytes().to_vec(),
                            Kind::Source(h.clone(), s.clone()),
                            dir,
                        )
                    })
                    .collect()
            }
            Kind::Source(h, s) => {
                self.refresh(false);
                let c = lock(&self.catalog);
                let times = c
                    .layout
                    .hosts
                    .get(h)
                    .and_then(|x| x.get(s))
                    .ok_or(FsError::NotFound)?;
                let mut v: Vec<_> = times
                    .iter()
                    .map(|(t, &i)| {
                        (
                            t.as_bytes().to_vec(),
                            Kind::SnapshotRoot(c.list[i].clone()),
                            dir,
                        )
                    })
                    .collect();
                if let Some(last) = times.keys().next_back() {
                    v.push((
                        b"latest".to_vec(),
                        Kind::Latest(last.clone()),
                        NodeKind::Symlink,
                    ));
                }
                v
            }
            Kind::SnapshotRoot(snap) => self.tree_children(ino, snap.id, &snap.manifest.root)?,
            Kind::Node {
                root,
                snapshot,
                node,
            } => match node.subtree {
                Some(sub) => self.tree_children(*root, *snapshot, &sub)?,
                None => return Err(FsError::NotDir),
            },
            Kind::Latest(_) => return Err(FsError::NotDir),
        };
        Ok(out)
    }

    fn tree_children(
        &self,
        root: u64,
        snapshot: SnapshotId,
        tree: &BlobId,
    ) -> FsResult<Vec<(Vec<u8>, Kind, NodeKind)>> {
        let t = self.tree(tree)?;
        Ok(t.nodes
            .iter()
            .map(|n| {
                (
                    n.name.clone(),
                    Kind::Node {
                        root,
                        snapshot,
                        node: Arc::new(self.whole_node(tree, n)),
                    },
                    n.kind,
                )
            })
            .collect())
    }

    /// `n` of the tree `tree` with its whole extent list: read from its extent-list blobs
    /// when the tree keeps it there. A list that cannot be read is logged and left empty,
    /// and opening the file fails (its siblings stay listable).
    fn whole_node(&self, tree: &BlobId, n: &Node) -> Node {
        let mut n = n.clone();
        if let Err(e) = n.fill_content(tree, |list| self.cache.get(list)) {
            tracing::error!("{e}");
        }
        n
    }

    /// The root inode of a snapshot root's contents (for hard-link keys).
    fn root_of(ino: u64, inode: &Inode) -> u64 {
        match &inode.kind {
            Kind::Node { root, .. } => *root,
            _ => ino,
        }
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        let p = self.inode(parent)?;
        let root = Self::root_of(parent, &p);
        let found = match &p.kind {
            // Trees are sorted: search without materialising every child.
            Kind::SnapshotRoot(_) | Kind::Node { .. } => {
                let (tree_id, snapshot) = match &p.kind {
                    Kind::SnapshotRoot(s) => (s.manifest.root, s.id),
                    Kind::Node { node, snapshot, .. } => {
                        (node.subtree.ok_or(FsError::NotDir)?, *snapshot)
                    }
                    _ => return Err(FsError::NotDir),
                };
                let t = self.tree(&tree_id)?;
                let i = t
                    .nodes
                    .binary_search_by(|n| n.name.as_slice().cmp(name))
                    .map_err(|_| FsError::NotFound)?;
                Kind::Node {
                    root,
                    snapshot,
                    node: Arc::new(self.whole_node(&tree_id, &t.nodes[i])),
                }
            }
            _ => self
                .children(parent, &p)?
                .into_iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, k, _)| k)
                .ok_or(FsError::NotFound)?,
        };
        let ino = self.intern(parent, name, found);
        self.getattr(ino)
    }

    pub fn readdir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        let inode = self.inode(ino)?;
        let children = self.children(ino, &inode)?;
        Ok(children
            .into_iter()
            .map(|(name, kind, node_kind)| DirEntry {
                ino: self.intern(ino, &name, kind),
                name,
                kind: node_kind,
            })
            .collect())
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let inode = self.inode(ino)?;
        let synthetic = |kind: NodeKind, mode: u32, size: u64| Attr {
            ino,
            kind,
            size,
            blocks: 0,
            mode,
            nlink: if kind == NodeKind::Dir { 2 } else { 1 },
            uid: self.owner.0,
            gid: self.owner.1,
            mtime: self.started,
            ctime: self.started,
            rdev: 0,
        };
        Ok(match &inode.kind {
            Kind::Root | Kind::SnapshotsDir | Kind::HostsDir | Kind::Host(_) | Kind::Source(..) => {
                synthetic(NodeKind::Dir, 0o555, 0)
            }
            Kind::Latest(t) => synthetic(NodeKind::Symlink, 0o777, t.len() as u64),
            Kind::SnapshotRoot(s) => {
                let t: SystemTime = s.manifest.time.into();
                Attr {
                    uid: 0,
                    gid: 0,
                    mode: 0o755,
                    mtime: t,
                    ctime: t,
                    ..synthetic(NodeKind::Dir, 0o755, 0)
                }
            }
            Kind::Node { node, .. } => {
                let mut a = node_attr(ino, node);
                if let Some((uid, gid)) = self.opts.owner {
                    a.uid = uid;
                    a.gid = gid;
                }
                a
            }
        })
    }

    /// Whether `ino` is snapshot content (immutable) rather than a synthetic directory.
    #[must_use]
    pub fn is_content(&self, ino: u64) -> bool {
        matches!(
            self.inode(ino).map(|i| i.kind),
            Ok(Kind::SnapshotRoot(_) | Kind::Node { .. })
        )
    }

    /// The parent directory's inode (the root's parent is the root).
    #[must_use]
    pub fn parent_of(&self, ino: u64) -> u64 {
        self.inode(ino).map_or(ROOT_INO, |i| i.parent)
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        match self.inode(ino)?.kind {
            Kind::Latest(t) => Ok(t.into_bytes()),
            Kind::Node { node, .. } => node.target.clone().ok_or(FsError::Invalid),
            _ => Err(FsError::Invalid),
        }
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<Vec<u8>>> {
        Ok(match self.inode(ino)?.kind {
            Kind::Node { node, .. } => node.xattrs.iter().map(|x| x.name.clone()).collect(),
            _ => Vec::new(),
        })
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        match self.inode(ino)?.kind {
            Kind::Node { node, .. } => node
                .xattrs
                .iter()
                .find(|x| x.name == name)
                .map(|x| x.value.clone())
                .ok_or(FsError::NoData),
            _ => Err(FsError::NoData),
        }
    }

    /// Opens a file for reading; returns a handle for [`Self::read`].
    pub fn open(&self, ino: u64) -> FsResult<u64> {
        let (snapshot, node) = match self.inode(ino)?.kind {
            Kind::Node { snapshot, node, .. } if node.kind == NodeKind::File => (snapshot, node),
            Kind::Node { node, .. } if node.kind == NodeKind::Dir => return Err(FsError::IsDir),
            Kind::Node { .. } | Kind::Latest(_) => return Err(FsError::Invalid),
            _ => return Err(FsError::IsDir),
        };
        if node.content.is_empty() && !node.content_lists.is_empty() {
            return Err(FsError::Io(
                "the file's list of chunks is unreadable".into(),
            ));
        }
        let mut starts = Vec::with_capacity(node.content.len() + 1);
        let mut at = 0u64;
        for e in &node.content {
            starts.push(at);
            at += e.len;
        }
        starts.push(at);
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let f = OpenFile {
            ino,
            snapshot,
            node,
            starts,
            last_end: AtomicU64::new(0),
        };
        write_lock(&self.files).insert(fh, Arc::new(f));
        Ok(fh)
    }

    /// SEEK_DATA / SEEK_HOLE over an open file: the next data or hole offset at or after
    /// `offset` (holes are the extents without a blob, and the end of the file).
    pub fn seek_data_or_hole(&self, fh: u64, offset: u64, data: bool) -> FsResult<u64> {
        let f = read_lock(&self.files)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let size = *f.starts.last().unwrap_or(&0);
        if offset >= size {
            return Err(FsError::NoSuchOffset);
        }
        let mut i = f.starts.partition_point(|&s| s <= offset) - 1;
        while i < f.node.content.len() {
            if f.node.content[i].blob.is_some() == data {
                return Ok(offset.max(f.starts[i]));
            }
            i += 1;
        }
        if data {
            Err(FsError::NoSuchOffset)
        } else {
            Ok(size)
        }
    }

    /// The size of the file open as `fh`.
    pub fn open_size(&self, fh: u64) -> FsResult<u64> {
        read_lock(&self.files)
            .get(&fh)
            .map(|f| *f.starts.last().unwrap_or(&0))
            .ok_or(FsError::BadHandle)
    }

    pub fn release(&self, fh: u64) {
        write_lock(&self.files).remove(&fh);
    }

    /// Reads up to `size` bytes at `offset` (fewer only at the end of the file).
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let mut buf = Vec::new();
        Ok(match self.read_into(fh, offset, size, &mut buf)? {
            ReadData::Zeros(n) => vec![0; n],
            ReadData::Blob(blob, range) => blob[range].to_vec(),
            ReadData::Assembled => buf,
        })
    }

    /// Like [`Self::read`], without copying what need not be copied: a read within one
    /// hole is [`ReadData::Zeros`], a read within one blob a slice of the cached blob;
    /// only a read across extents is assembled, in `buf` (reused from call to call, so
    /// that it costs no allocation).
    pub fn read_into(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        buf: &mut Vec<u8>,
    ) -> FsResult<ReadData> {
        let f = read_lock(&self.files)
            .get(&fh)
            .cloned()
            .ok_or(FsError::BadHandle)?;
        let file_size = *f.starts.last().unwrap_or(&0);
        let end = offset.saturating_add(u64::from(size)).min(file_size);
        if offset >= end {
            return Ok(ReadData::Zeros(0));
        }
        // The extent holding `offset`: the last one starting at or before it.
        let first = f.starts.partition_point(|&s| s <= offset) - 1;
        let mut i = first;
        let mut pos = offset;
        let mut single = None;
        buf.clear();
        while pos < end {
            let (start, e) = (f.starts[i], f.node.content[i]);
            let stop = end.min(start + e.len);
            let (a, b) = (
                usize::try_from(pos - start).unwrap_or(0),
                usize::try_from(stop - start).unwrap_or(0),
            );
            let piece = match e.blob {
                Some(id) => {
                    let data = self.cache.get(&id).map_err(|err| {
                        tracing::error!(
                            "snapshot {}: {}: blob {id}: {err}",
                            f.snapshot.short(),
                            self.path_of(f.ino).display()
                        );
                        FsError::Io(err.to_string())
                    })?;
                    if data.get(a..b).is_none() {
                        return Err(FsError::Io(format!("blob {id} shorter than its extent")));
                    }
                    ReadData::Blob(data, a..b)
                }
                None => ReadData::Zeros(b - a),
            };
            if i == first && stop == end {
                single = Some(piece);
            } else {
                match piece {
                    ReadData::Blob(data, r) => buf.extend_from_slice(&data[r]),
                    ReadData::Zeros(n) => buf.resize(buf.len() + n, 0),
                    ReadData::Assembled => {}
                }
            }
            pos = stop;
            i += 1;
        }
        let sequential = f.last_end.swap(end, Ordering::Relaxed) == offset;
        if sequential {
            self.read_ahead(&f, i);
        }
        Ok(single.unwrap_or(ReadData::Assembled))
    }

    /// Fetches the blobs of the extents from `first` on, up to the read-ahead window,
    /// in the background.
    fn read_ahead(&self, f: &OpenFile, first: usize) {
        let mut ahead = 0u64;
        for e in f.node.content.iter().skip(first) {
            if ahead >= self.opts.readahead_bytes {
                break;
            }
            ahead += e.len;
            if let Some(id) = e.blob {
                self.prefetch.request(id);
            }
        }
    }
}

fn node_attr(ino: u64, n: &Node) -> Attr {
    let data: u64 = n
        .content
        .iter()
        .filter(|e| e.blob.is_some())
        .map(|e| e.len)
        .sum();
    Attr {
        ino,
        kind: n.kind,
        size: match n.kind {
            NodeKind::Symlink => n.target.as_ref().map_or(0, |t| t.len() as u64),
            _ => n.size,
        },
        blocks: data.div_ceil(512),
        mode: n.mode & 0o7777,
        nlink: u32::try_from(n.links.max(1)).unwrap_or(u32::MAX),
        uid: n.uid,
        gid: n.gid,
        mtime: to_time(n.mtime),
        ctime: to_time(n.ctime),
        rdev: n.rdev,
    }
}
