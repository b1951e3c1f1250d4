//! [`SimFs`]: an in-memory filesystem for tests that models a power loss and injects
//! faults. Under a [`super::LocalBackend`] it is the in-memory backend of the engine's
//! tests, and the fault-injecting one.
//!
//! - **Durability** follows POSIX, pessimistically: a file's bytes survive a power loss
//!   only up to its last `sync_all`; an entry created, renamed or removed in a directory
//!   survives only once that directory was synced. [`SimFs::power_loss`] returns the
//!   filesystem as a reboot would find it: every file at its last synced content, every
//!   directory at its last synced entries. A missing or misplaced fsync in the backend
//!   shows up as a snapshot that refers to a pack that is gone.
//! - **Faults** ([`Fault`]): the k-th operation of a kind (read, write, sync, rename,
//!   remove, ...) fails with an errno, once or from then on; or the power goes at the
//!   k-th operation (it and everything after fail with `EIO`, as a process that died
//!   would do nothing more). A capacity makes writes fail with `ENOSPC` once the files
//!   hold that many bytes, until something is removed: a full disk.
//!
//! Operations are counted ([`SimFs::ops`]), so a test can run an operation once to learn
//! how many steps it takes, then once per step with a fault there.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Write};
use std::path::{Component, Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::SystemTime;

use super::fs::{DirEntry, Fs, FsFile, Meta, ReadAt};

/// The kinds of operation a [`Fault`] can aim at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// Creating a file.
    Create,
    /// Writing bytes into a file being created.
    Write,
    /// `fsync` of a file.
    Sync,
    /// `fsync` of a directory.
    SyncDir,
    Rename,
    Remove,
    Mkdir,
    /// Reading a file (whole or at an offset), or opening it.
    Read,
    /// Listing a directory or asking for metadata.
    Stat,
}

impl Op {
    /// Every kind, for tests that aim at each.
    pub const ALL: [Op; 9] = [
        Op::Create,
        Op::Write,
        Op::Sync,
        Op::SyncDir,
        Op::Rename,
        Op::Remove,
        Op::Mkdir,
        Op::Read,
        Op::Stat,
    ];

    /// Whether the operation changes the filesystem.
    #[must_use]
    pub fn changes(self) -> bool {
        !matches!(self, Op::Read | Op::Stat)
    }
}

/// What happens at a fault point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// The operation fails with this errno; with `sticky`, every later operation of the
    /// same kind too.
    Fail { errno: i32, sticky: bool },
    /// The power goes: this operation and every later one fail with `EIO`, and
    /// [`SimFs::power_loss`] gives what survives.
    PowerLoss,
}

/// A fault: `effect` at the `nth` (0-based) operation of kind `op`, or of any kind when
/// `op` is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub op: Option<Op>,
    pub nth: u64,
    pub effect: Effect,
}

#[derive(Debug, Clone)]
enum Node {
    File {
        data: Vec<u8>,
        /// What a power loss keeps: the content at the last sync.
        durable: Vec<u8>,
        modified: SystemTime,
    },
    Dir {
        entries: BTreeMap<String, u64>,
        /// What a power loss keeps: the entries at the last sync of the directory.
        durable: BTreeMap<String, u64>,
        modified: SystemTime,
        stamp: i64,
    },
}

#[derive(Debug, Clone)]
struct State {
    nodes: HashMap<u64, Node>,
    next_node: u64,
    next_stamp: i64,
    /// Operations so far, in all and by kind.
    ops: u64,
    ops_by_kind: HashMap<Op, u64>,
    faults: Vec<Fault>,
    /// Kinds failing from now on (sticky faults), with their errno.
    failing: HashMap<Op, i32>,
    powered_off: bool,
    capacity: Option<u64>,
    /// The kind of every operation counted, when recording.
    log: Option<Vec<Op>>,
    /// Operations that changed something (a fault that hits none leaves the filesystem
    /// as it was).
    changes: u64,
}

const ROOT: u64 = 0;

/// See the module docs. Cloning shares the filesystem; [`SimFs::fork`] copies it.
#[derive(Debug, Clone)]
pub struct SimFs {
    state: Arc<Mutex<State>>,
}

impl Default for SimFs {
    fn default() -> Self {
        Self::new()
    }
}

fn errno(e: i32) -> io::Error {
    io::Error::from_raw_os_error(e)
}

fn not_found(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::NotFound,
        format!("{}: no such file or directory", path.display()),
    )
}

/// The names of a path's components below the root (`.` skipped; `..` refused).
fn parts(path: &Path) -> io::Result<Vec<String>> {
    let mut out = Vec::new();
    for c in path.components() {
        match c {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => return Err(errno(libc::EINVAL)),
            Component::Normal(n) => {
                out.push(n.to_str().ok_or_else(|| errno(libc::EINVAL))?.to_owned())
            }
        }
    }
    Ok(out)
}

impl State {
    /// Counts an operation and applies the faults aimed at it.
    fn op(&mut self, op: Op) -> io::Result<()> {
        if self.powered_off {
            return Err(errno(libc::EIO));
        }
        let nth_any = self.ops;
        let nth = *self.ops_by_kind.get(&op).unwrap_or(&0);
        if let Some(log) = &mut self.log {
            log.push(op);
        }
        self.ops += 1;
        *self.ops_by_kind.entry(op).or_default() += 1;
        if let Some(&e) = self.failing.get(&op) {
            return Err(errno(e));
        }
        let hit = self.faults.iter().find(|f| match f.op {
            None => f.nth == nth_any,
            Some(k) => k == op && f.nth == nth,
        });
        match hit.map(|f| f.effect) {
            None => {
                if op.changes() {
                    self.changes += 1;
                }
                Ok(())
            }
            Some(Effect::PowerLoss) => {
                self.powered_off = true;
                Err(errno(libc::EIO))
            }
            Some(Effect::Fail { errno: e, sticky }) => {
                if sticky {
                    self.failing.insert(op, e);
                }
                Err(errno(e))
            }
        }
    }

    fn stamp(&mut self) -> i64 {
        self.next_stamp += 1;
        self.next_stamp
    }

    fn lookup(&self, path: &Path) -> io::Result<u64> {
        let mut at = ROOT;
        for name in parts(path)? {
            match self.nodes.get(&at) {
                Some(Node::Dir { entries, .. }) => {
                    at = *entries.get(&name).ok_or_else(|| not_found(path))?;
                }
                _ => return Err(errno(libc::ENOTDIR)),
            }
        }
        Ok(at)
    }

    /// The directory holding `path` and the last name.
    fn parent_of(&self, path: &Path) -> io::Result<(u64, String)> {
        let mut p = parts(path)?;
        let name = p.pop().ok_or_else(|| errno(libc::EINVAL))?;
        let dir = self.lookup(&p.iter().collect::<PathBuf>())?;
        match self.nodes.get(&dir) {
            Some(Node::Dir { .. }) => Ok((dir, name)),
            _ => Err(errno(libc::ENOTDIR)),
        }
    }

    fn entries_mut(&mut self, dir: u64) -> io::Result<&mut BTreeMap<String, u64>> {
        let stamp = self.stamp();
        match self.nodes.get_mut(&dir) {
            Some(Node::Dir {
                entries,
                modified,
                stamp: s,
                ..
            }) => {
                *modified = SystemTime::now();
                *s = stamp;
                Ok(entries)
            }
            _ => Err(errno(libc::ENOTDIR)),
        }
    }

    /// Bytes of the files a listing reaches (what `df` would count: a removed file's
    /// space is free at once, whether or not its directory was synced).
    fn used_bytes(&self) -> u64 {
        let mut total = 0;
        let mut seen = std::collections::HashSet::new();
        let mut stack = vec![ROOT];
        while let Some(id) = stack.pop() {
            if !seen.insert(id) {
                continue;
            }
            match self.nodes.get(&id) {
                Some(Node::File { data, .. }) => total += data.len() as u64,
                Some(Node::Dir { entries, .. }) => stack.extend(entries.values().copied()),
                None => {}
            }
        }
        total
    }

    fn meta(&self, id: u64) -> io::Result<Meta> {
        match self.nodes.get(&id) {
            Some(Node::File { data, modified, .. }) => Ok(Meta {
                is_dir: false,
                is_file: true,
                len: data.len() as u64,
                modified: *modified,
                stamp: 0,
            }),
            Some(Node::Dir {
                modified, stamp, ..
            }) => Ok(Meta {
                is_dir: true,
                is_file: false,
                len: 0,
                modified: *modified,
                stamp: *stamp,
            }),
            None => Err(errno(libc::ENOENT)),
        }
    }

    /// Drops the nodes no directory reaches (after a power loss).
    fn collect_garbage(&mut self) {
        let mut reachable = std::collections::HashSet::new();
        let mut stack = vec![ROOT];
        while let Some(id) = stack.pop() {
            if !reachable.insert(id) {
                continue;
            }
            if let Some(Node::Dir { entries, .. }) = self.nodes.get(&id) {
                stack.extend(entries.values().copied());
            }
        }
        self.nodes.retain(|id, _| reachable.contains(id));
    }
}

impl SimFs {
    /// An empty filesystem (a root directory) with no faults.
    #[must_use]
    pub fn new() -> Self {
        let now = SystemTime::now();
        let mut nodes = HashMap::new();
        nodes.insert(
            ROOT,
            Node::Dir {
                entries: BTreeMap::new(),
                durable: BTreeMap::new(),
                modified: now,
                stamp: 0,
            },
        );
        Self {
            state: Arc::new(Mutex::new(State {
                nodes,
                next_node: 1,
                next_stamp: 1,
                ops: 0,
                ops_by_kind: HashMap::new(),
                faults: Vec::new(),
                failing: HashMap::new(),
                powered_off: false,
                capacity: None,
                log: None,
                changes: 0,
            })),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of this filesystem as it is now (faults and counts reset): the same
    /// starting point for many runs.
    #[must_use]
    pub fn fork(&self) -> Self {
        let s = self.state().clone();
        let fs = Self {
            state: Arc::new(Mutex::new(s)),
        };
        fs.reset_faults();
        fs
    }

    /// What a reboot after a power loss now would find: files at their synced content,
    /// directories at their synced entries. Faults and counts reset, power on.
    #[must_use]
    pub fn power_loss(&self) -> Self {
        let mut s = self.state().clone();
        let now = SystemTime::now();
        let mut stamps = s.next_stamp;
        for node in s.nodes.values_mut() {
            match node {
                Node::File { data, durable, .. } => data.clone_from(durable),
                Node::Dir {
                    entries,
                    durable,
                    modified,
                    stamp,
                } => {
                    entries.clone_from(durable);
                    // What the entries' stamps said before is gone with them.
                    *modified = now;
                    stamps += 1;
                    *stamp = stamps;
                }
            }
        }
        s.next_stamp = stamps + 1;
        s.collect_garbage();
        let fs = Self {
            state: Arc::new(Mutex::new(s)),
        };
        fs.reset_faults();
        fs
    }

    /// Arms a fault (several may be armed).
    pub fn inject(&self, fault: Fault) {
        self.state().faults.push(fault);
    }

    /// Removes every fault, sticky failures and the power loss; counts restart at 0.
    pub fn reset_faults(&self) {
        let mut s = self.state();
        s.faults.clear();
        s.failing.clear();
        s.powered_off = false;
        s.ops = 0;
        s.ops_by_kind.clear();
        s.log = None;
        s.changes = 0;
    }

    /// Starts recording the kind of every operation (from the next one on).
    pub fn record(&self) {
        self.state().log = Some(Vec::new());
    }

    /// The operations recorded since [`Self::record`], in order: the fault points of a
    /// run.
    #[must_use]
    pub fn recorded(&self) -> Vec<Op> {
        self.state().log.clone().unwrap_or_default()
    }

    /// Writes fail with `ENOSPC` once files hold `bytes` (`None`: no limit).
    pub fn set_capacity(&self, bytes: Option<u64>) {
        self.state().capacity = bytes;
    }

    /// Bytes the files hold now.
    #[must_use]
    pub fn used_bytes(&self) -> u64 {
        self.state().used_bytes()
    }

    /// Operations counted since the last reset, in all.
    #[must_use]
    pub fn ops(&self) -> u64 {
        self.state().ops
    }

    /// Operations of one kind counted since the last reset.
    #[must_use]
    pub fn ops_of(&self, op: Op) -> u64 {
        *self.state().ops_by_kind.get(&op).unwrap_or(&0)
    }

    /// Whether any operation that changes the filesystem went through since the last
    /// reset (an operation that then fails, like a write past the capacity, may count).
    #[must_use]
    pub fn changed(&self) -> bool {
        self.state().changes > 0
    }

    /// Whether a power loss was injected and happened.
    #[must_use]
    pub fn powered_off(&self) -> bool {
        self.state().powered_off
    }

    /// Every file under `dir` with its content, for tests that damage or compare one
    /// (uncounted, fault-free).
    #[must_use]
    pub fn files_under(&self, dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
        let s = self.state();
        let mut out = Vec::new();
        let Ok(start) = s.lookup(dir) else {
            return out;
        };
        let mut stack = vec![(dir.to_path_buf(), start)];
        while let Some((path, id)) = stack.pop() {
            match s.nodes.get(&id) {
                Some(Node::File { data, .. }) => out.push((path, data.clone())),
                Some(Node::Dir { entries, .. }) => {
                    for (name, child) in entries {
                        stack.push((path.join(name), *child));
                    }
                }
                None => {}
            }
        }
        out.sort();
        out
    }

    /// Replaces a file's content, durably (uncounted, fault-free): what a storage host
    /// or a damaged disk does behind the repository's back.
    pub fn tamper(&self, path: &Path, content: Vec<u8>) -> io::Result<()> {
        let mut s = self.state();
        let id = s.lookup(path)?;
        match s.nodes.get_mut(&id) {
            Some(Node::File { data, durable, .. }) => {
                durable.clone_from(&content);
                *data = content;
                Ok(())
            }
            _ => Err(errno(libc::EISDIR)),
        }
    }
}

/// A file being written on a [`SimFs`].
struct SimFile {
    fs: SimFs,
    node: u64,
}

impl Write for SimFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut s = self.fs.state();
        s.op(Op::Write)?;
        if let Some(cap) = s.capacity {
            if s.used_bytes() + buf.len() as u64 > cap {
                return Err(errno(libc::ENOSPC));
            }
        }
        match s.nodes.get_mut(&self.node) {
            Some(Node::File { data, modified, .. }) => {
                data.extend_from_slice(buf);
                *modified = SystemTime::now();
                Ok(buf.len())
            }
            // Removed while open: written into nothing, as into an unlinked file.
            _ => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl FsFile for SimFile {
    fn sync_all(&mut self) -> io::Result<()> {
        let mut s = self.fs.state();
        s.op(Op::Sync)?;
        if let Some(Node::File { data, durable, .. }) = s.nodes.get_mut(&self.node) {
            durable.clone_from(data);
        }
        Ok(())
    }
}

/// A file open for reading on a [`SimFs`]: reads see its current content.
struct SimReader {
    fs: SimFs,
    node: u64,
}

impl ReadAt for SimReader {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut s = self.fs.state();
        s.op(Op::Read)?;
        match s.nodes.get(&self.node) {
            Some(Node::File { data, .. }) => {
                let start = usize::try_from(offset).map_err(|_| errno(libc::EINVAL))?;
                let src = start
                    .checked_add(buf.len())
                    .and_then(|end| data.get(start..end))
                    .ok_or_else(|| {
                        io::Error::new(io::ErrorKind::UnexpectedEof, "read past the end")
                    })?;
                buf.copy_from_slice(src);
                Ok(())
            }
            _ => Err(errno(libc::EBADF)),
        }
    }
}

impl Fs for SimFs {
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn FsFile>> {
        let mut s = self.state();
        s.op(Op::Create)?;
        let (dir, name) = s.parent_of(path)?;
        if let Some(Node::Dir { entries, .. }) = s.nodes.get(&dir) {
            if entries.contains_key(&name) {
                return Err(errno(libc::EEXIST));
            }
        }
        let id = s.next_node;
        s.next_node += 1;
        s.nodes.insert(
            id,
            Node::File {
                data: Vec::new(),
                durable: Vec::new(),
                modified: SystemTime::now(),
            },
        );
        s.entries_mut(dir)?.insert(name, id);
        Ok(Box::new(SimFile {
            fs: self.clone(),
            node: id,
        }))
    }

    fn open(&self, path: &Path) -> io::Result<Arc<dyn ReadAt>> {
        let mut s = self.state();
        s.op(Op::Read)?;
        let id = s.lookup(path)?;
        match s.nodes.get(&id) {
            Some(Node::File { .. }) => Ok(Arc::new(SimReader {
                fs: self.clone(),
                node: id,
            })),
            _ => Err(errno(libc::EISDIR)),
        }
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let mut s = self.state();
        s.op(Op::Read)?;
        let id = s.lookup(path)?;
        match s.nodes.get(&id) {
            Some(Node::File { data, .. }) => Ok(data.clone()),
            _ => Err(errno(libc::EISDIR)),
        }
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut s = self.state();
        s.op(Op::Rename)?;
        let (src_dir, src_name) = s.parent_of(from)?;
        let (dst_dir, dst_name) = s.parent_of(to)?;
        let id = s.lookup(from)?;
        if matches!(s.nodes.get(&id), Some(Node::Dir { .. })) {
            return Err(errno(libc::EISDIR));
        }
        s.entries_mut(src_dir)?.remove(&src_name);
        s.entries_mut(dst_dir)?.insert(dst_name, id);
        s.collect_garbage_volatile();
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state();
        s.op(Op::Remove)?;
        let (dir, name) = s.parent_of(path)?;
        let id = s.lookup(path)?;
        if matches!(s.nodes.get(&id), Some(Node::Dir { .. })) {
            return Err(errno(libc::EISDIR));
        }
        s.entries_mut(dir)?.remove(&name);
        s.collect_garbage_volatile();
        Ok(())
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state();
        s.op(Op::Mkdir)?;
        let mut at = ROOT;
        for name in parts(path)? {
            let existing = match s.nodes.get(&at) {
                Some(Node::Dir { entries, .. }) => entries.get(&name).copied(),
                _ => return Err(errno(libc::ENOTDIR)),
            };
            at = match existing {
                Some(id) => id,
                None => {
                    let id = s.next_node;
                    s.next_node += 1;
                    let stamp = s.stamp();
                    s.nodes.insert(
                        id,
                        Node::Dir {
                            entries: BTreeMap::new(),
                            durable: BTreeMap::new(),
                            modified: SystemTime::now(),
                            stamp,
                        },
                    );
                    s.entries_mut(at)?.insert(name, id);
                    id
                }
            };
        }
        if matches!(s.nodes.get(&at), Some(Node::Dir { .. })) {
            Ok(())
        } else {
            Err(errno(libc::EEXIST))
        }
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut s = self.state();
        s.op(Op::SyncDir)?;
        let id = s.lookup(path)?;
        match s.nodes.get_mut(&id) {
            Some(Node::Dir {
                entries, durable, ..
            }) => {
                durable.clone_from(entries);
                Ok(())
            }
            _ => Err(errno(libc::ENOTDIR)),
        }
    }

    fn read_dir(&self, path: &Path) -> io::Result<Vec<DirEntry>> {
        let mut s = self.state();
        s.op(Op::Stat)?;
        let id = s.lookup(path)?;
        let Some(Node::Dir { entries, .. }) = s.nodes.get(&id) else {
            return Err(errno(libc::ENOTDIR));
        };
        entries
            .iter()
            .map(|(name, child)| {
                Ok(DirEntry {
                    name: name.clone(),
                    meta: s.meta(*child)?,
                })
            })
            .collect()
    }

    fn metadata(&self, path: &Path) -> io::Result<Meta> {
        let mut s = self.state();
        s.op(Op::Stat)?;
        let id = s.lookup(path)?;
        s.meta(id)
    }
}

impl State {
    /// After an entry goes: a node no entry names, volatile or durable, is gone (an
    /// open file keeps writing into nothing). Nodes still named by a durable entry stay
    /// for a power loss to bring back.
    fn collect_garbage_volatile(&mut self) {
        let mut named = std::collections::HashSet::new();
        named.insert(ROOT);
        for node in self.nodes.values() {
            if let Node::Dir {
                entries, durable, ..
            } = node
            {
                named.extend(entries.values().copied());
                named.extend(durable.values().copied());
            }
        }
        self.nodes.retain(|id, _| named.contains(id));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_file(fs: &SimFs, path: &str, data: &[u8], sync: bool) {
        let mut f = fs.create_new(Path::new(path)).unwrap();
        f.write_all(data).unwrap();
        if sync {
            f.sync_all().unwrap();
        }
    }

    #[test]
    fn a_power_loss_keeps_only_what_was_synced() {
        let fs = SimFs::new();
        fs.create_dir_all(Path::new("/r/d")).unwrap();
        fs.sync_dir(Path::new("/")).unwrap();
        fs.sync_dir(Path::new("/r")).unwrap();
        write_file(&fs, "/r/d/synced", b"one", true);
        write_file(&fs, "/r/d/unsynced", b"two", false);
        fs.sync_dir(Path::new("/r/d")).unwrap();
        write_file(&fs, "/r/d/unnamed", b"three", true); // data synced, name not
        fs.rename(Path::new("/r/d/synced"), Path::new("/r/d/moved"))
            .unwrap();
        let after = fs.power_loss();
        let names: Vec<String> = after
            .read_dir(Path::new("/r/d"))
            .unwrap()
            .into_iter()
            .map(|e| e.name)
            .collect();
        // The rename was not synced: the old name is back; the unnamed file is gone.
        assert_eq!(names, ["synced", "unsynced"]);
        assert_eq!(after.read(Path::new("/r/d/synced")).unwrap(), b"one");
        // Named durably, but its bytes were never synced.
        assert_eq!(after.read(Path::new("/r/d/unsynced")).unwrap(), b"");
        // The live filesystem is unchanged.
        assert_eq!(fs.read(Path::new("/r/d/moved")).unwrap(), b"one");
        assert!(fs.read(Path::new("/r/d/synced")).is_err());
    }

    #[test]
    fn faults_hit_the_nth_operation_and_power_loss_stops_everything() {
        let fs = SimFs::new();
        fs.inject(Fault {
            op: Some(Op::Create),
            nth: 1,
            effect: Effect::Fail {
                errno: libc::ENOSPC,
                sticky: false,
            },
        });
        write_file(&fs, "/a", b"x", true);
        let err = fs.create_new(Path::new("/b")).err().unwrap();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        write_file(&fs, "/c", b"x", true);
        assert_eq!(fs.ops_of(Op::Create), 3);

        fs.inject(Fault {
            op: None,
            nth: fs.ops(),
            effect: Effect::PowerLoss,
        });
        assert!(fs.read(Path::new("/a")).is_err());
        assert!(fs.powered_off());
        assert_eq!(
            fs.read(Path::new("/c")).unwrap_err().raw_os_error(),
            Some(libc::EIO)
        );
    }

    #[test]
    fn a_full_disk_refuses_writes_until_something_is_removed() {
        let fs = SimFs::new();
        fs.set_capacity(Some(10));
        write_file(&fs, "/a", &[1; 8], true);
        let mut f = fs.create_new(Path::new("/b")).unwrap();
        let err = f.write_all(&[2; 4]).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC));
        fs.remove_file(Path::new("/a")).unwrap();
        f.write_all(&[2; 4]).unwrap();
    }
}
