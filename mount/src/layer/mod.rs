//! A writable layer over one directory of a snapshot, without FUSE: what a recovery
//! session's database writes into, block by block, while the repository stays untouched.
//! The fuser adapter ([`fuse`]) only translates; tests drive this directly.
//!
//! - [`content`]: one file's bytes, the snapshot's below a limit with local chunks on
//!   top (copy on write in fixed chunks, 64 KiB by default), an upper file above it;
//! - [`store`]: the layer's durable record (`layer.sqlite`), so that the layer survives
//!   an unmount, a remount, and a kill of the daemon.
//!
//! The namespace: an unchanged directory lists what the snapshot has (through the
//! [`View`]); the first change inside a directory *materialises* it: its whole listing
//! is recorded in the layer and is the truth from then on (no whiteouts). Every inode
//! the layer records ("tracked") keeps its path in the snapshot (`origin`), through
//! which a remounted layer finds the snapshot's bytes again. Ownership and modes are the
//! snapshot's; nothing is chowned or copied to open a session.
//!
//! Locks, always taken in this order and never the other way: the namespace
//! (`state`), then a file's content, then the store.

pub mod changes;
pub mod content;
pub mod fuse;
pub mod store;

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::SystemTime;

use cairn_engine::tree::NodeKind;

use crate::view::{
    lock, read_lock, write_lock, Attr, DirEntry, FsError, FsResult, ReadData, View, ROOT_INO,
};
use content::Content;
use store::{Identity, NodeRow, Store};

/// The default copy-on-write chunk: 64 KiB, qcow2's cluster. A PostgreSQL page (8 KiB)
/// written into a chunk not yet local copies at most 56 KiB more; measured, a 1-row
/// UPDATE and its checkpoint add 0.3 MiB to a session's layer (docs/RECOVERY.md).
pub const DEFAULT_CHUNK: u64 = 64 << 10;

/// Where the layer's bytes come from below a file's limit: the snapshot.
pub trait LowerRead {
    /// Fills `dst` with the snapshot's bytes at `pos` (zeros past its end).
    fn read_lower(&self, pos: u64, dst: &mut [u8]) -> FsResult<()>;
    /// SEEK_DATA / SEEK_HOLE in the snapshot's file.
    fn seek_lower(&self, pos: u64, data: bool) -> FsResult<u64>;
}

/// One file's contents, shared by its handles.
pub struct FileData {
    id: u64,
    /// The snapshot's file (a view inode), if the file came from there.
    lower: Option<u64>,
    lower_fh: OnceLock<u64>,
    content: RwLock<Content>,
}

struct LowerFile<'a> {
    view: &'a View,
    file: &'a FileData,
}

impl LowerFile<'_> {
    fn fh(&self) -> FsResult<Option<u64>> {
        let Some(ino) = self.file.lower else {
            return Ok(None);
        };
        if let Some(fh) = self.file.lower_fh.get() {
            return Ok(Some(*fh));
        }
        let fh = self.view.open(ino)?;
        if let Err(fh) = self.file.lower_fh.set(fh) {
            self.view.release(fh); // another thread opened it first
        }
        Ok(self.file.lower_fh.get().copied())
    }
}

impl LowerRead for LowerFile<'_> {
    fn read_lower(&self, pos: u64, dst: &mut [u8]) -> FsResult<()> {
        let Some(fh) = self.fh()? else {
            dst.fill(0);
            return Ok(());
        };
        let mut done = 0usize;
        while done < dst.len() {
            let want = u32::try_from((dst.len() - done).min(1 << 20)).unwrap_or(1 << 20);
            let got = self.view.read(fh, pos + done as u64, want)?;
            if got.is_empty() {
                dst[done..].fill(0);
                break;
            }
            dst[done..done + got.len()].copy_from_slice(&got);
            done += got.len();
        }
        Ok(())
    }

    fn seek_lower(&self, pos: u64, data: bool) -> FsResult<u64> {
        match self.fh()? {
            Some(fh) => self.view.seek_data_or_hole(fh, pos, data),
            None if data => Err(FsError::NoSuchOffset),
            None => Ok(pos),
        }
    }
}

/// Attributes other than a file's size and times (those are its [`Content`]'s).
#[derive(Debug, Clone)]
struct Meta {
    kind: NodeKind,
    mode: u32,
    uid: u32,
    gid: u32,
    nlink: u32,
    rdev: u64,
    atime: SystemTime,
    mtime: SystemTime,
    ctime: SystemTime,
    target: Option<Vec<u8>>,
}

struct Node {
    meta: Meta,
    /// The directory it was found or made in (for `..`).
    parent: u64,
    /// Its path in the snapshot, relative to the layer's root.
    origin: Option<Vec<u8>>,
    /// Its view inode.
    lower: Option<u64>,
    tracked: bool,
    /// A changed directory's whole listing.
    entries: Option<BTreeMap<Vec<u8>, u64>>,
    file: Option<Arc<FileData>>,
    /// Open handles (an unlinked file lives until the last is released).
    open: u32,
}

#[derive(Default)]
struct State {
    nodes: HashMap<u64, Node>,
    /// View inode -> ours.
    by_lower: HashMap<u64, u64>,
    /// Snapshot path -> ours, for tracked nodes that came from the snapshot.
    by_origin: HashMap<Vec<u8>, u64>,
    next_ino: u64,
}

/// Attribute changes of a `setattr`.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SystemTime>,
    pub mtime: Option<SystemTime>,
}

/// Who creates a node, and with which permission bits (umask applied).
#[derive(Debug, Clone, Copy)]
pub struct Creator {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

/// An unlink done in memory, for the store's transaction.
struct Unlinked {
    parent: u64,
    name: Vec<u8>,
    child: u64,
    /// No name and no handle holds the inode any more.
    gone: bool,
    child_row: NodeRow,
}

impl Unlinked {
    fn record(&self, c: &store::Changes<'_>) -> FsResult<()> {
        c.remove_entry(self.parent, &self.name)?;
        if self.gone {
            c.remove_node(self.child)
        } else {
            c.put_node(&self.child_row)
        }
    }
}

struct Handle {
    ino: u64,
    file: Arc<FileData>,
}

/// Space of the filesystem holding the layer (what `statfs` reports).
#[derive(Debug, Clone, Copy)]
pub struct Space {
    pub blocks: u64,
    pub bfree: u64,
    pub bavail: u64,
    pub files: u64,
    pub ffree: u64,
    pub bsize: u32,
}

pub struct Layer {
    view: Arc<View>,
    dir: PathBuf,
    chunk: u64,
    state: RwLock<State>,
    store: Mutex<Store>,
    handles: RwLock<HashMap<u64, Handle>>,
    next_fh: AtomicU64,
}

fn io_err(what: &Path, e: &std::io::Error) -> FsError {
    FsError::Io(format!("{}: {e}", what.display()))
}

fn join(origin: &[u8], name: &[u8]) -> Vec<u8> {
    if origin.is_empty() {
        name.to_vec()
    } else {
        [origin, b"/", name].concat()
    }
}

fn check_name(name: &[u8]) -> FsResult<()> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') {
        return Err(FsError::Invalid);
    }
    if name.len() > 255 {
        return Err(FsError::NameTooLong);
    }
    Ok(())
}

/// Bytes written into the layer directory `dir`: the upper files' allocated blocks and
/// the store.
#[must_use]
pub fn layer_bytes(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let blocks = |d: &Path| -> u64 {
        std::fs::read_dir(d)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| e.metadata().ok())
                    .filter(std::fs::Metadata::is_file)
                    .map(|m| m.blocks() * 512)
                    .sum()
            })
            .unwrap_or(0)
    };
    blocks(dir) + blocks(&dir.join("data"))
}

impl Layer {
    /// Opens the layer in `dir` (made if empty) over `path` (components from the
    /// view's root, e.g. `snapshots/<name>/var/lib/postgresql`) of snapshot `snapshot`.
    pub fn open_dir(
        view: Arc<View>,
        snapshot: &str,
        path: &[&[u8]],
        dir: &Path,
        chunk: u64,
    ) -> FsResult<Self> {
        let data = dir.join("data");
        std::fs::create_dir_all(&data).map_err(|e| io_err(&data, &e))?;
        let want = Identity {
            snapshot: snapshot.to_owned(),
            path: path
                .iter()
                .skip(2)
                .map(|c| String::from_utf8_lossy(c).into_owned())
                .collect::<Vec<_>>()
                .join("/"),
            chunk: chunk.max(4096),
        };
        let (store, identity) = Store::open(dir, &want)?;
        let mut lower_root = ROOT_INO;
        for c in path {
            lower_root = view.lookup(lower_root, c)?.ino;
        }
        let root_attr = view.getattr(lower_root)?;
        if root_attr.kind != NodeKind::Dir {
            return Err(FsError::NotDir);
        }
        let layer = Self {
            view,
            dir: dir.to_owned(),
            chunk: identity.chunk,
            state: RwLock::new(State {
                next_ino: ROOT_INO + 1,
                ..State::default()
            }),
            store: Mutex::new(store),
            handles: RwLock::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
        };
        layer.load(lower_root, &root_attr)?;
        Ok(layer)
    }

    /// The chunk size of copy on write.
    #[must_use]
    pub fn chunk(&self) -> u64 {
        self.chunk
    }

    fn data_path(&self, id: u64) -> PathBuf {
        self.dir.join("data").join(id.to_string())
    }

    /// Reads the store into memory: the root, every tracked node, every changed
    /// directory's listing; removes what an earlier run left unlinked.
    fn load(&self, lower_root: u64, root_attr: &Attr) -> FsResult<()> {
        let (rows, entries) = lock(&self.store).load()?;
        let mut st = write_lock(&self.state);
        let root = self.node_from_lower(ROOT_INO, lower_root, root_attr, b"", ROOT_INO);
        st.nodes.insert(ROOT_INO, root);
        st.by_lower.insert(lower_root, ROOT_INO);
        let mut gone = Vec::new();
        for row in rows {
            st.next_ino = st.next_ino.max(row.id + 1);
            if row.nlink == 0 && row.kind != NodeKind::Dir {
                gone.push(row.id);
                continue;
            }
            let node = self.node_from_row(&row, lower_root)?;
            if let Some(o) = &row.origin {
                st.by_origin.insert(o.clone(), row.id);
            }
            if let Some(l) = node.lower {
                st.by_lower.insert(l, row.id);
            }
            st.nodes.insert(row.id, node);
        }
        for (dir, name, child) in entries {
            if let Some(e) = st.nodes.get_mut(&dir).and_then(|d| d.entries.as_mut()) {
                e.insert(name, child);
            }
        }
        drop(st);
        if !gone.is_empty() {
            lock(&self.store).change(|c| gone.iter().try_for_each(|id| c.remove_node(*id)))?;
            for id in gone {
                let _ = std::fs::remove_file(self.data_path(id));
            }
        }
        Ok(())
    }

    fn node_from_lower(&self, ino: u64, lower: u64, a: &Attr, origin: &[u8], parent: u64) -> Node {
        let file = (a.kind == NodeKind::File).then(|| {
            Arc::new(FileData {
                id: ino,
                lower: Some(lower),
                lower_fh: OnceLock::new(),
                content: RwLock::new(Content::from_lower(a.size, a.mtime, a.ctime)),
            })
        });
        let target = if a.kind == NodeKind::Symlink {
            self.view.readlink(lower).ok()
        } else {
            None
        };
        Node {
            meta: Meta {
                kind: a.kind,
                mode: a.mode,
                uid: a.uid,
                gid: a.gid,
                nlink: if a.kind == NodeKind::Dir { 1 } else { a.nlink },
                rdev: a.rdev,
                atime: a.mtime,
                mtime: a.mtime,
                ctime: a.ctime,
                target,
            },
            parent,
            origin: Some(origin.to_vec()),
            lower: Some(lower),
            tracked: false,
            entries: None,
            file,
            open: 0,
        }
    }

    /// A tracked node from its row; finds its snapshot inode through its origin.
    fn node_from_row(&self, row: &NodeRow, lower_root: u64) -> FsResult<Node> {
        let lower = match &row.origin {
            Some(_) if row.id == ROOT_INO => Some(lower_root),
            Some(o) => Some(self.resolve_origin(lower_root, o)?),
            None => None,
        };
        let file = if row.kind == NodeKind::File {
            let mut c = Content::from_lower(row.size, row.mtime, row.ctime);
            c.lower_limit = row.lower_limit;
            c.atime = row.atime;
            for ch in lock(&self.store).chunks(row.id)? {
                c.local.set(ch);
            }
            let p = self.data_path(row.id);
            if p.exists() {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&p)
                    .map_err(|e| io_err(&p, &e))?;
                // Writes past the recorded size that were never fsynced (the daemon
                // died): gone, so that a later extension reads zeros there.
                if f.metadata().map_err(|e| io_err(&p, &e))?.len() > row.size {
                    f.set_len(row.size).map_err(|e| io_err(&p, &e))?;
                }
                c.upper = Some(f);
            }
            Some(Arc::new(FileData {
                id: row.id,
                lower: lower.filter(|_| row.lower_limit > 0),
                lower_fh: OnceLock::new(),
                content: RwLock::new(c),
            }))
        } else {
            None
        };
        Ok(Node {
            meta: Meta {
                kind: row.kind,
                mode: row.mode,
                uid: row.uid,
                gid: row.gid,
                nlink: row.nlink,
                rdev: row.rdev,
                atime: row.atime,
                mtime: row.mtime,
                ctime: row.ctime,
                target: row.target.clone(),
            },
            parent: row.parent,
            origin: row.origin.clone(),
            lower,
            tracked: true,
            entries: row.materialized.then(BTreeMap::new),
            file,
            open: 0,
        })
    }

    fn resolve_origin(&self, root: u64, origin: &[u8]) -> FsResult<u64> {
        origin
            .split(|b| *b == b'/')
            .filter(|c| !c.is_empty())
            .try_fold(root, |ino, c| self.view.lookup(ino, c).map(|a| a.ino))
    }

    fn row(id: u64, n: &Node) -> NodeRow {
        let (size, lower_limit, times) = match &n.file {
            Some(f) => {
                let c = read_lock(&f.content);
                (c.size, c.lower_limit, [c.atime, c.mtime, c.ctime])
            }
            None => (0, 0, [n.meta.atime, n.meta.mtime, n.meta.ctime]),
        };
        NodeRow {
            id,
            parent: n.parent,
            kind: n.meta.kind,
            mode: n.meta.mode,
            uid: n.meta.uid,
            gid: n.meta.gid,
            nlink: n.meta.nlink,
            rdev: n.meta.rdev,
            atime: times[0],
            mtime: times[1],
            ctime: times[2],
            target: n.meta.target.clone(),
            origin: n.origin.clone(),
            materialized: n.entries.is_some(),
            size,
            lower_limit,
        }
    }

    fn attr(&self, ino: u64, n: &Node) -> Attr {
        let (size, times) = match &n.file {
            Some(f) => {
                let c = read_lock(&f.content);
                (c.size, [c.mtime, c.ctime])
            }
            None => (
                n.meta.target.as_ref().map_or(0, |t| t.len() as u64),
                [n.meta.mtime, n.meta.ctime],
            ),
        };
        Attr {
            ino,
            kind: n.meta.kind,
            size,
            blocks: size.div_ceil(512),
            mode: n.meta.mode,
            nlink: n.meta.nlink,
            uid: n.meta.uid,
            gid: n.meta.gid,
            mtime: times[0],
            ctime: times[1],
            rdev: n.meta.rdev,
        }
    }

    fn node(st: &State, ino: u64) -> FsResult<&Node> {
        st.nodes.get(&ino).ok_or(FsError::NotFound)
    }

    fn node_mut(st: &mut State, ino: u64) -> FsResult<&mut Node> {
        st.nodes.get_mut(&ino).ok_or(FsError::NotFound)
    }

    /// Our inode for a snapshot entry `name` (view attributes `a`) of the unchanged
    /// directory `parent`, made on first sight.
    fn adopt(&self, st: &mut State, parent: u64, name: &[u8], a: &Attr) -> FsResult<u64> {
        if let Some(&ino) = st.by_lower.get(&a.ino) {
            return Ok(ino);
        }
        let origin = join(
            Self::node(st, parent)?
                .origin
                .as_deref()
                .unwrap_or_default(),
            name,
        );
        if let Some(&ino) = st.by_origin.get(&origin) {
            st.by_lower.insert(a.ino, ino);
            if let Some(n) = st.nodes.get_mut(&ino) {
                n.lower = Some(a.ino);
            }
            return Ok(ino);
        }
        let ino = st.next_ino;
        st.next_ino += 1;
        let node = self.node_from_lower(ino, a.ino, a, &origin, parent);
        st.nodes.insert(ino, node);
        st.by_lower.insert(a.ino, ino);
        Ok(ino)
    }

    fn find(&self, st: &mut State, parent: u64, name: &[u8]) -> FsResult<u64> {
        let p = Self::node(st, parent)?;
        if p.meta.kind != NodeKind::Dir {
            return Err(FsError::NotDir);
        }
        if let Some(e) = &p.entries {
            return e.get(name).copied().ok_or(FsError::NotFound);
        }
        let lower = p.lower.ok_or(FsError::NotFound)?;
        let a = self.view.lookup(lower, name)?;
        self.adopt(st, parent, name, &a)
    }

    pub fn lookup(&self, parent: u64, name: &[u8]) -> FsResult<Attr> {
        let mut st = write_lock(&self.state);
        let ino = self.find(&mut st, parent, name)?;
        Ok(self.attr(ino, Self::node(&st, ino)?))
    }

    pub fn getattr(&self, ino: u64) -> FsResult<Attr> {
        let st = read_lock(&self.state);
        Ok(self.attr(ino, Self::node(&st, ino)?))
    }

    /// The parent directory's inode (the root's parent is the root).
    #[must_use]
    pub fn parent_of(&self, ino: u64) -> u64 {
        read_lock(&self.state)
            .nodes
            .get(&ino)
            .map_or(ROOT_INO, |n| n.parent)
    }

    pub fn readdir(&self, ino: u64) -> FsResult<Vec<DirEntry>> {
        let mut st = write_lock(&self.state);
        self.listing(&mut st, ino)?
            .into_iter()
            .map(|(name, child)| {
                Ok(DirEntry {
                    kind: Self::node(&st, child)?.meta.kind,
                    ino: child,
                    name,
                })
            })
            .collect()
    }

    fn listing(&self, st: &mut State, ino: u64) -> FsResult<Vec<(Vec<u8>, u64)>> {
        let d = Self::node(st, ino)?;
        if d.meta.kind != NodeKind::Dir {
            return Err(FsError::NotDir);
        }
        if let Some(e) = &d.entries {
            return Ok(e.iter().map(|(k, v)| (k.clone(), *v)).collect());
        }
        let lower = d.lower.ok_or(FsError::NotFound)?;
        let mut out = Vec::new();
        for e in self.view.readdir(lower)? {
            let a = self.view.getattr(e.ino)?;
            let child = self.adopt(st, ino, &e.name, &a)?;
            out.push((e.name, child));
        }
        Ok(out)
    }

    pub fn readlink(&self, ino: u64) -> FsResult<Vec<u8>> {
        let st = read_lock(&self.state);
        Self::node(&st, ino)?
            .meta
            .target
            .clone()
            .ok_or(FsError::Invalid)
    }

    pub fn listxattr(&self, ino: u64) -> FsResult<Vec<Vec<u8>>> {
        match self.lower_of(ino)? {
            Some(l) => self.view.listxattr(l),
            None => Ok(Vec::new()),
        }
    }

    pub fn getxattr(&self, ino: u64, name: &[u8]) -> FsResult<Vec<u8>> {
        if name == changes::CHANGES_XATTR.as_bytes() {
            return self.changes_of(ino);
        }
        match self.lower_of(ino)? {
            Some(l) => self.view.getxattr(l, name),
            None => Err(FsError::NoData),
        }
    }

    /// A file's [`changes::FileChanges`] against its origin, encoded.
    fn changes_of(&self, ino: u64) -> FsResult<Vec<u8>> {
        let st = read_lock(&self.state);
        let n = Self::node(&st, ino)?;
        let (Some(f), Some(origin)) = (&n.file, &n.origin) else {
            return Err(FsError::NoData);
        };
        if f.lower.is_none() {
            return Err(FsError::NoData);
        }
        let changed = read_lock(&f.content).changed_ranges(self.chunk);
        Ok(changes::FileChanges {
            origin: origin.clone(),
            changed,
        }
        .encode())
    }

    fn lower_of(&self, ino: u64) -> FsResult<Option<u64>> {
        Ok(Self::node(&read_lock(&self.state), ino)?.lower)
    }

    // ---- tracking: what a change records first ----

    /// Records `ino` in the store if it is not yet.
    fn track(&self, st: &mut State, ino: u64) -> FsResult<()> {
        let n = Self::node_mut(st, ino)?;
        if n.tracked {
            return Ok(());
        }
        let row = Self::row(ino, n);
        lock(&self.store).change(|c| c.put_node(&row))?;
        n.tracked = true;
        if let Some(o) = n.origin.clone() {
            st.by_origin.insert(o, ino);
        }
        Ok(())
    }

    /// Records a directory's whole listing (and every entry of it), from which on it is
    /// the layer's: the first change inside a directory does this.
    fn materialize(&self, st: &mut State, dir: u64) -> FsResult<()> {
        if Self::node(st, dir)?.entries.is_some() {
            return Ok(());
        }
        let listing = self.listing(st, dir)?;
        let mut rows = Vec::new();
        for (_, child) in &listing {
            let n = Self::node(st, *child)?;
            if !n.tracked {
                rows.push(Self::row(*child, n));
            }
        }
        let d = Self::node_mut(st, dir)?;
        d.tracked = true;
        d.entries = Some(listing.iter().cloned().collect());
        let dir_row = Self::row(dir, d);
        lock(&self.store).change(|c| {
            c.put_node(&dir_row)?;
            for r in &rows {
                c.put_node(r)?;
            }
            for (name, child) in &listing {
                c.put_entry(dir, name, *child)?;
            }
            Ok(())
        })?;
        if let Some(o) = Self::node(st, dir)?.origin.clone() {
            st.by_origin.insert(o, dir);
        }
        for (_, child) in &listing {
            let n = Self::node_mut(st, *child)?;
            n.tracked = true;
            if let Some(o) = n.origin.clone() {
                st.by_origin.insert(o, *child);
            }
        }
        Ok(())
    }

    /// Saves a tracked node's row as it is now.
    fn save(&self, st: &State, inos: &[u64]) -> FsResult<()> {
        let rows: Vec<NodeRow> = inos
            .iter()
            .filter_map(|i| st.nodes.get(i).map(|n| Self::row(*i, n)))
            .collect();
        lock(&self.store).change(|c| rows.iter().try_for_each(|r| c.put_node(r)))
    }

    // ---- namespace changes ----

    fn make(
        &self,
        parent: u64,
        name: &[u8],
        kind: NodeKind,
        who: Creator,
        rdev: u64,
        target: Option<Vec<u8>>,
    ) -> FsResult<Attr> {
        check_name(name)?;
        let mut st = write_lock(&self.state);
        if Self::node(&st, parent)?.meta.kind != NodeKind::Dir {
            return Err(FsError::NotDir);
        }
        self.materialize(&mut st, parent)?;
        if Self::node(&st, parent)?
            .entries
            .as_ref()
            .is_some_and(|e| e.contains_key(name))
        {
            return Err(FsError::Exists);
        }
        let now = SystemTime::now();
        let ino = st.next_ino;
        st.next_ino += 1;
        let file = (kind == NodeKind::File).then(|| {
            Arc::new(FileData {
                id: ino,
                lower: None,
                lower_fh: OnceLock::new(),
                content: RwLock::new(Content::new_file(now)),
            })
        });
        let node = Node {
            meta: Meta {
                kind,
                mode: who.mode & 0o7777,
                uid: who.uid,
                gid: who.gid,
                nlink: 1,
                rdev,
                atime: now,
                mtime: now,
                ctime: now,
                target,
            },
            parent,
            origin: None,
            lower: None,
            tracked: true,
            entries: (kind == NodeKind::Dir).then(BTreeMap::new),
            file,
            open: 0,
        };
        let row = Self::row(ino, &node);
        let p = Self::node_mut(&mut st, parent)?;
        p.meta.mtime = now;
        p.meta.ctime = now;
        let prow = Self::row(parent, p);
        lock(&self.store).change(|c| {
            c.put_node(&row)?;
            c.put_node(&prow)?;
            c.put_entry(parent, name, ino)
        })?;
        if let Some(e) = Self::node_mut(&mut st, parent)?.entries.as_mut() {
            e.insert(name.to_vec(), ino);
        }
        let attr = self.attr(ino, &node);
        st.nodes.insert(ino, node);
        Ok(attr)
    }

    pub fn mknod(
        &self,
        parent: u64,
        name: &[u8],
        kind: NodeKind,
        who: Creator,
        rdev: u64,
    ) -> FsResult<Attr> {
        self.make(parent, name, kind, who, rdev, None)
    }

    pub fn mkdir(&self, parent: u64, name: &[u8], who: Creator) -> FsResult<Attr> {
        self.make(parent, name, NodeKind::Dir, who, 0, None)
    }

    pub fn symlink(&self, parent: u64, name: &[u8], target: &[u8], who: Creator) -> FsResult<Attr> {
        let who = Creator { mode: 0o777, ..who };
        self.make(
            parent,
            name,
            NodeKind::Symlink,
            who,
            0,
            Some(target.to_vec()),
        )
    }

    /// Makes a regular file and opens it.
    pub fn create(&self, parent: u64, name: &[u8], who: Creator) -> FsResult<(Attr, u64)> {
        let attr = self.make(parent, name, NodeKind::File, who, 0, None)?;
        let fh = self.open(attr.ino, true)?;
        Ok((attr, fh))
    }

    pub fn link(&self, ino: u64, new_parent: u64, new_name: &[u8]) -> FsResult<Attr> {
        check_name(new_name)?;
        let mut st = write_lock(&self.state);
        if Self::node(&st, ino)?.meta.kind == NodeKind::Dir {
            return Err(FsError::NotPermitted);
        }
        self.materialize(&mut st, new_parent)?;
        if Self::node(&st, new_parent)?
            .entries
            .as_ref()
            .is_some_and(|e| e.contains_key(new_name))
        {
            return Err(FsError::Exists);
        }
        self.track(&mut st, ino)?;
        let now = SystemTime::now();
        let n = Self::node_mut(&mut st, ino)?;
        n.meta.nlink += 1;
        n.meta.ctime = now;
        if let Some(f) = &n.file {
            write_lock(&f.content).ctime = now;
        }
        let row = Self::row(ino, n);
        lock(&self.store).change(|c| {
            c.put_node(&row)?;
            c.put_entry(new_parent, new_name, ino)
        })?;
        if let Some(e) = Self::node_mut(&mut st, new_parent)?.entries.as_mut() {
            e.insert(new_name.to_vec(), ino);
        }
        Ok(self.attr(ino, Self::node(&st, ino)?))
    }

    pub fn unlink(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.remove(parent, name, false)
    }

    pub fn rmdir(&self, parent: u64, name: &[u8]) -> FsResult<()> {
        self.remove(parent, name, true)
    }

    fn remove(&self, parent: u64, name: &[u8], dir: bool) -> FsResult<()> {
        let mut st = write_lock(&self.state);
        let child = self.find(&mut st, parent, name)?;
        self.check_kind(&mut st, child, dir)?;
        self.materialize(&mut st, parent)?;
        let now = SystemTime::now();
        let unlinked = Self::unlink_in_memory(&mut st, parent, name, child, now)?;
        let prow = Self::row(parent, Self::node(&st, parent)?);
        lock(&self.store).change(|c| {
            unlinked.record(c)?;
            c.put_node(&prow)
        })?;
        if unlinked.gone {
            self.forget(&mut st, child);
        }
        Ok(())
    }

    /// That `ino` may go (removed, or replaced by a rename) as a directory (`dir`) or as
    /// anything else: `EISDIR`, `ENOTDIR`, or `ENOTEMPTY` for a directory with entries.
    fn check_kind(&self, st: &mut State, ino: u64, dir: bool) -> FsResult<()> {
        let is_dir = Self::node(st, ino)?.meta.kind == NodeKind::Dir;
        match (dir, is_dir) {
            (false, true) => Err(FsError::IsDir),
            (true, false) => Err(FsError::NotDir),
            (true, true) if !self.listing(st, ino)?.is_empty() => Err(FsError::NotEmpty),
            _ => Ok(()),
        }
    }

    /// Takes `name` (inode `child`) out of the materialised `parent` in memory; what the
    /// store must do the same is returned, for the caller's transaction.
    fn unlink_in_memory(
        st: &mut State,
        parent: u64,
        name: &[u8],
        child: u64,
        now: SystemTime,
    ) -> FsResult<Unlinked> {
        let c = Self::node_mut(st, child)?;
        c.meta.nlink = c.meta.nlink.saturating_sub(1);
        if c.meta.kind == NodeKind::Dir {
            c.meta.nlink = 0;
        }
        c.meta.ctime = now;
        if let Some(f) = &c.file {
            write_lock(&f.content).ctime = now;
        }
        let gone = c.meta.nlink == 0 && c.open == 0;
        let child_row = Self::row(child, c);
        let p = Self::node_mut(st, parent)?;
        if let Some(e) = p.entries.as_mut() {
            e.remove(name);
        }
        p.meta.mtime = now;
        p.meta.ctime = now;
        Ok(Unlinked {
            parent,
            name: name.to_vec(),
            child,
            gone,
            child_row,
        })
    }

    /// Drops an inode that no name and no handle holds any more.
    fn forget(&self, st: &mut State, ino: u64) {
        if let Some(n) = st.nodes.remove(&ino) {
            if let Some(o) = &n.origin {
                // Its snapshot path must not bring it back.
                st.by_origin.remove(o);
            }
            if let Some(f) = n.file {
                let _ = std::fs::remove_file(self.data_path(f.id));
                if let Some(fh) = f.lower_fh.get() {
                    self.view.release(*fh);
                }
            }
        }
    }

    /// Moves `name` of `parent` to `new_name` of `new_parent`, replacing what is there
    /// (unless `no_replace`), atomically: one transaction of the store.
    pub fn rename(
        &self,
        parent: u64,
        name: &[u8],
        new_parent: u64,
        new_name: &[u8],
        no_replace: bool,
    ) -> FsResult<()> {
        check_name(new_name)?;
        let mut st = write_lock(&self.state);
        let src = self.find(&mut st, parent, name)?;
        let target = match self.find(&mut st, new_parent, new_name) {
            Ok(t) => Some(t),
            Err(FsError::NotFound) => None,
            Err(e) => return Err(e),
        };
        if target == Some(src) {
            return Ok(()); // the same inode under both names: nothing to do
        }
        let src_dir = Self::node(&st, src)?.meta.kind == NodeKind::Dir;
        if src_dir && self.is_ancestor(&st, src, new_parent) {
            return Err(FsError::Invalid);
        }
        if let Some(t) = target {
            if no_replace {
                return Err(FsError::Exists);
            }
            self.check_kind(&mut st, t, src_dir)?;
        }
        self.materialize(&mut st, parent)?;
        self.materialize(&mut st, new_parent)?;
        self.track(&mut st, src)?;
        let now = SystemTime::now();
        let replaced = match target {
            Some(t) => Some(Self::unlink_in_memory(
                &mut st, new_parent, new_name, t, now,
            )?),
            None => None,
        };
        let s = Self::node_mut(&mut st, src)?;
        s.meta.ctime = now;
        if src_dir {
            s.parent = new_parent;
        }
        for p in [parent, new_parent] {
            let d = Self::node_mut(&mut st, p)?;
            d.meta.mtime = now;
            d.meta.ctime = now;
        }
        let rows: Vec<NodeRow> = [src, parent, new_parent]
            .iter()
            .map(|i| Self::node(&st, *i).map(|n| Self::row(*i, n)))
            .collect::<FsResult<_>>()?;
        lock(&self.store).change(|c| {
            if let Some(u) = &replaced {
                u.record(c)?;
            }
            c.remove_entry(parent, name)?;
            c.put_entry(new_parent, new_name, src)?;
            rows.iter().try_for_each(|r| c.put_node(r))
        })?;
        if let Some(u) = replaced.filter(|u| u.gone) {
            self.forget(&mut st, u.child);
        }
        if let Some(e) = Self::node_mut(&mut st, parent)?.entries.as_mut() {
            e.remove(name);
        }
        if let Some(e) = Self::node_mut(&mut st, new_parent)?.entries.as_mut() {
            e.insert(new_name.to_vec(), src);
        }
        Ok(())
    }

    /// Whether `dir` is `of` or one of its ancestors.
    fn is_ancestor(&self, st: &State, dir: u64, mut of: u64) -> bool {
        loop {
            if of == dir {
                return true;
            }
            match st.nodes.get(&of) {
                Some(n) if of != ROOT_INO => of = n.parent,
                _ => return false,
            }
        }
    }

    pub fn setattr(&self, ino: u64, set: &SetAttr) -> FsResult<Attr> {
        let file = {
            let mut st = write_lock(&self.state);
            self.track(&mut st, ino)?;
            let now = SystemTime::now();
            let n = Self::node_mut(&mut st, ino)?;
            if let Some(m) = set.mode {
                n.meta.mode = m & 0o7777;
            }
            if let Some(u) = set.uid {
                n.meta.uid = u;
            }
            if let Some(g) = set.gid {
                n.meta.gid = g;
            }
            n.meta.ctime = now;
            if let Some(t) = set.atime {
                n.meta.atime = t;
            }
            if let Some(t) = set.mtime {
                n.meta.mtime = t;
            }
            if n.file.is_none() && set.size.is_some() {
                return Err(if n.meta.kind == NodeKind::Dir {
                    FsError::IsDir
                } else {
                    FsError::Invalid
                });
            }
            self.save(&st, &[ino])?;
            Self::node(&st, ino)?.file.clone()
        };
        if let Some(f) = file {
            let mut c = write_lock(&f.content);
            let now = SystemTime::now();
            if let Some(size) = set.size {
                c.truncate(size, now)?;
            }
            c.ctime = now;
            if let Some(t) = set.atime {
                c.atime = t;
            }
            if let Some(t) = set.mtime {
                c.mtime = t;
            }
            // A shrink is recorded at once, before anything reads past the new size.
            self.save_content(&f, &mut c, false)?;
        }
        self.getattr(ino)
    }

    // ---- files ----

    /// Opens a regular file; `write` records it in the layer first.
    pub fn open(&self, ino: u64, write: bool) -> FsResult<u64> {
        let mut st = write_lock(&self.state);
        let n = Self::node(&st, ino)?;
        let file = match (&n.file, n.meta.kind) {
            (Some(f), _) => f.clone(),
            (None, NodeKind::Dir) => return Err(FsError::IsDir),
            (None, _) => return Err(FsError::Invalid),
        };
        if write {
            self.track(&mut st, ino)?;
        }
        Self::node_mut(&mut st, ino)?.open += 1;
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        write_lock(&self.handles).insert(fh, Handle { ino, file });
        Ok(fh)
    }

    fn handle(&self, fh: u64) -> FsResult<(u64, Arc<FileData>)> {
        read_lock(&self.handles)
            .get(&fh)
            .map(|h| (h.ino, h.file.clone()))
            .ok_or(FsError::BadHandle)
    }

    fn lower<'a>(&'a self, file: &'a FileData) -> LowerFile<'a> {
        LowerFile {
            view: &self.view,
            file,
        }
    }

    fn open_upper(&self, id: u64) -> impl Fn() -> FsResult<File> + '_ {
        move || {
            let p = self.data_path(id);
            OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .open(&p)
                .map_err(|e| io_err(&p, &e))
        }
    }

    pub fn read(&self, fh: u64, offset: u64, size: u32) -> FsResult<Vec<u8>> {
        let (_, f) = self.handle(fh)?;
        let c = read_lock(&f.content);
        c.read(self.chunk, &self.lower(&f), offset, u64::from(size))
    }

    /// Like [`Self::read`], without copying what need not be: a read the snapshot alone
    /// serves is the view's ([`View::read_into`]: a slice of a cached blob, or zeros);
    /// any other is assembled in `buf`.
    pub fn read_into(
        &self,
        fh: u64,
        offset: u64,
        size: u32,
        buf: &mut Vec<u8>,
    ) -> FsResult<ReadData> {
        let (_, f) = self.handle(fh)?;
        let c = read_lock(&f.content);
        let lower = self.lower(&f);
        if c.all_lower(self.chunk, offset, u64::from(size)) {
            if let Some(lfh) = lower.fh()? {
                let len = u64::from(size).min(c.size - offset);
                let len = u32::try_from(len).unwrap_or(size);
                return self.view.read_into(lfh, offset, len, buf);
            }
        }
        *buf = c.read(self.chunk, &lower, offset, u64::from(size))?;
        Ok(ReadData::Assembled)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> FsResult<u32> {
        let (_, f) = self.handle(fh)?;
        let mut c = write_lock(&f.content);
        c.write(
            self.chunk,
            &self.lower(&f),
            &self.open_upper(f.id),
            offset,
            data,
            SystemTime::now(),
        )?;
        u32::try_from(data.len()).map_err(|_| FsError::Invalid)
    }

    /// `fallocate`: mode 0 or `FALLOC_FL_KEEP_SIZE`; other modes are not supported.
    pub fn allocate(&self, fh: u64, offset: u64, len: u64, keep_size: bool) -> FsResult<()> {
        let (_, f) = self.handle(fh)?;
        let mut c = write_lock(&f.content);
        c.allocate(
            &self.open_upper(f.id),
            offset,
            len,
            keep_size,
            SystemTime::now(),
        )
    }

    pub fn seek(&self, fh: u64, offset: u64, data: bool) -> FsResult<u64> {
        let (_, f) = self.handle(fh)?;
        let c = read_lock(&f.content);
        c.seek(self.chunk, &self.lower(&f), offset, data)
    }

    /// Makes the file's data durable, then its local chunks and size in the store
    /// (`fsync` and `fdatasync`: a size change is needed to read the data back, so both
    /// record it; a change of times alone waits for `fsync`).
    pub fn fsync(&self, fh: u64, datasync: bool) -> FsResult<()> {
        let (_, f) = self.handle(fh)?;
        let mut c = write_lock(&f.content);
        self.sync_file(&f, &mut c, datasync)
    }

    fn sync_file(&self, f: &FileData, c: &mut Content, datasync: bool) -> FsResult<()> {
        if let Some(u) = &c.upper {
            u.sync_data().map_err(|e| FsError::Io(e.to_string()))?;
            if c.upper_new {
                let d = self.dir.join("data");
                File::open(&d)
                    .and_then(|d| d.sync_all())
                    .map_err(|e| io_err(&d, &e))?;
                c.upper_new = false;
            }
        }
        if c.dirty.is_empty() && (datasync || !c.meta_dirty) {
            // Nothing the data needs; still make earlier metadata changes durable.
            return lock(&self.store).sync();
        }
        self.save_content(f, c, true)
    }

    /// Records a file's size, limit, times and newly local chunks (`durably`: synced).
    fn save_content(&self, f: &FileData, c: &mut Content, durably: bool) -> FsResult<()> {
        let dirty = c.take_dirty();
        let (size, limit, times) = (c.size, c.lower_limit, [c.atime, c.mtime, c.ctime]);
        let chunk = self.chunk;
        let apply = |tx: &store::Changes<'_>| {
            tx.put_content(f.id, size, limit, times, chunk)?;
            let keep: Vec<u64> = dirty
                .iter()
                .copied()
                .filter(|ch| ch * chunk < limit)
                .collect();
            tx.add_chunks(f.id, &keep)
        };
        let mut store = lock(&self.store);
        let r = if durably {
            store.change_durably(apply)
        } else {
            store.change(apply)
        };
        match r {
            Ok(()) => {
                c.meta_dirty = false;
                Ok(())
            }
            Err(e) => {
                c.dirty.extend(dirty);
                Err(e)
            }
        }
    }

    /// Syncs every file and records everything (unmount).
    pub fn sync_all(&self) -> FsResult<()> {
        let files: Vec<Arc<FileData>> = {
            let st = read_lock(&self.state);
            st.nodes
                .values()
                .filter(|n| n.tracked)
                .filter_map(|n| n.file.clone())
                .collect()
        };
        for f in files {
            let mut c = write_lock(&f.content);
            if c.meta_dirty || !c.dirty.is_empty() || c.upper_new {
                self.sync_file(&f, &mut c, false)?;
            }
        }
        lock(&self.store).sync()
    }

    /// `fsync` of a directory: every namespace change so far becomes durable.
    pub fn fsync_dir(&self) -> FsResult<()> {
        lock(&self.store).sync()
    }

    pub fn release(&self, fh: u64) {
        let Some(h) = write_lock(&self.handles).remove(&fh) else {
            return;
        };
        let mut st = write_lock(&self.state);
        let Some(n) = st.nodes.get_mut(&h.ino) else {
            return;
        };
        n.open = n.open.saturating_sub(1);
        if n.open == 0 && n.meta.nlink == 0 {
            if let Err(e) = lock(&self.store).change(|c| c.remove_node(h.ino)) {
                tracing::warn!("forgetting an unlinked file of the layer: {e}");
            }
            self.forget(&mut st, h.ino);
        }
    }

    /// The size of the file open as `fh`.
    pub fn open_size(&self, fh: u64) -> FsResult<u64> {
        let (_, f) = self.handle(fh)?;
        let size = read_lock(&f.content).size;
        Ok(size)
    }

    /// Space on the filesystem holding the layer.
    pub fn space(&self) -> FsResult<Space> {
        let s = nix::sys::statvfs::statvfs(&self.dir).map_err(|e| FsError::Io(e.to_string()))?;
        Ok(Space {
            blocks: s.blocks(),
            bfree: s.blocks_free(),
            bavail: s.blocks_available(),
            files: s.files(),
            ffree: s.files_free(),
            bsize: u32::try_from(s.fragment_size()).unwrap_or(4096),
        })
    }

    /// Bytes written into the layer so far.
    #[must_use]
    pub fn written_bytes(&self) -> u64 {
        layer_bytes(&self.dir)
    }
}
