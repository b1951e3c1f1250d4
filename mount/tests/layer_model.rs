//! Reference-model property test of the writable layer, without FUSE: a random tree is
//! backed up, a writable layer is opened over its snapshot, and random sequences of
//! writes, truncates, creates, renames (also over existing names), links, unlinks,
//! reads, remounts and crashes run against the layer and an in-memory model; every
//! answer and, at the end, the whole tree must agree.
//!
//! A remount syncs (an unmount); a crash does not: afterwards every file whose last
//! change was fsynced must hold exactly what it held then, the namespace must be as it
//! was (namespace changes are committed at once), and the model takes what the layer
//! kept for the rest.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::{Component, Path};
use std::sync::Arc;

use cairn_engine::backup::{backup_tree, TreeBackupOptions};
use cairn_engine::crypto::Encryption;
use cairn_engine::keyfile::KdfParams;
use cairn_engine::progress::Progress;
use cairn_engine::tree::NodeKind;
use cairn_engine::Repository;
use cairn_mount::layer::changes::{FileChanges, CHANGES_XATTR};
use cairn_mount::layer::{Creator, Layer, SetAttr};
use cairn_mount::view::{FsError, ReadData, View, ViewOptions, ROOT_INO};
use proptest::prelude::*;

/// The chunk the test runs with: small, so that sequences cross many chunk edges.
const CHUNK: u64 = 4096;

#[derive(Debug, Clone, PartialEq)]
enum E {
    /// A file: its content's id in [`Model::files`] (hard links share one).
    File(u64),
    Dir,
    Link(Vec<u8>),
}

#[derive(Debug, Clone, Default)]
struct Model {
    tree: BTreeMap<Vec<u8>, E>,
    files: HashMap<u64, Vec<u8>>,
    next: u64,
    /// Files whose last change was fsynced (content id -> content then).
    synced: HashMap<u64, Vec<u8>>,
}

impl Model {
    fn children(&self, dir: &[u8]) -> Vec<Vec<u8>> {
        self.tree
            .keys()
            .filter(|p| parent(p) == dir && !p.is_empty())
            .cloned()
            .collect()
    }
    fn paths_where(&self, f: impl Fn(&E) -> bool) -> Vec<Vec<u8>> {
        self.tree
            .iter()
            .filter(|(_, e)| f(e))
            .map(|(p, _)| p.clone())
            .collect()
    }
}

fn parent(p: &[u8]) -> &[u8] {
    match p.iter().rposition(|b| *b == b'/') {
        Some(i) => &p[..i],
        None => &p[..0],
    }
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        name.to_vec()
    } else {
        [dir, b"/", name].concat()
    }
}

fn name_of(p: &[u8]) -> &[u8] {
    &p[parent(p).len() + usize::from(!parent(p).is_empty())..]
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        file: usize,
        at: u64,
        len: usize,
        byte: u8,
    },
    Truncate {
        file: usize,
        size: u64,
    },
    Allocate {
        file: usize,
        at: u64,
        len: u64,
    },
    Read {
        file: usize,
        at: u64,
        len: u32,
    },
    Seek {
        file: usize,
        at: u64,
        data: bool,
    },
    Create {
        dir: usize,
        name: u8,
    },
    Mkdir {
        dir: usize,
        name: u8,
    },
    Symlink {
        dir: usize,
        name: u8,
    },
    Link {
        file: usize,
        dir: usize,
        name: u8,
    },
    Unlink {
        any: usize,
    },
    Rmdir {
        dir: usize,
    },
    Rename {
        any: usize,
        dir: usize,
        name: u8,
        no_replace: bool,
    },
    Chmod {
        any: usize,
        mode: u32,
    },
    Fsync {
        file: usize,
    },
    Remount,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    let i = || any::<usize>();
    prop_oneof![
        6 => (i(), 0u64..40_000, 1usize..12_000, any::<u8>()).prop_map(|(file, at, len, byte)| Op::Write { file, at, len, byte }),
        2 => (i(), 0u64..40_000).prop_map(|(file, size)| Op::Truncate { file, size }),
        1 => (i(), 0u64..40_000, 1u64..20_000).prop_map(|(file, at, len)| Op::Allocate { file, at, len }),
        3 => (i(), 0u64..45_000, 1u32..20_000).prop_map(|(file, at, len)| Op::Read { file, at, len }),
        2 => (i(), 0u64..45_000, any::<bool>()).prop_map(|(file, at, data)| Op::Seek { file, at, data }),
        2 => (i(), 0u8..6).prop_map(|(dir, name)| Op::Create { dir, name }),
        1 => (i(), 0u8..6).prop_map(|(dir, name)| Op::Mkdir { dir, name }),
        1 => (i(), 0u8..6).prop_map(|(dir, name)| Op::Symlink { dir, name }),
        1 => (i(), i(), 0u8..6).prop_map(|(file, dir, name)| Op::Link { file, dir, name }),
        2 => i().prop_map(|any| Op::Unlink { any }),
        1 => i().prop_map(|dir| Op::Rmdir { dir }),
        3 => (i(), i(), 0u8..6, any::<bool>()).prop_map(|(any, dir, name, no_replace)| Op::Rename { any, dir, name, no_replace }),
        1 => (i(), 0u32..0o777).prop_map(|(any, mode)| Op::Chmod { any, mode }),
        2 => i().prop_map(|file| Op::Fsync { file }),
        1 => Just(Op::Remount),
        1 => Just(Op::Crash),
    ]
}

fn pick(v: &[Vec<u8>], i: usize) -> Option<Vec<u8>> {
    (!v.is_empty()).then(|| v[i % v.len()].clone())
}

fn new_name(n: u8) -> Vec<u8> {
    format!("n{n}").into_bytes()
}

struct Harness {
    view: Arc<View>,
    snapshot: String,
    root_path: Vec<Vec<u8>>,
    layer_dir: std::path::PathBuf,
    layer: Option<Layer>,
}

const WHO: Creator = Creator {
    uid: 0,
    gid: 0,
    mode: 0o644,
};

impl Harness {
    fn open(&mut self) {
        let path: Vec<&[u8]> = self.root_path.iter().map(Vec::as_slice).collect();
        self.layer = Some(
            Layer::open_dir(
                self.view.clone(),
                &self.snapshot,
                &path,
                &self.layer_dir,
                CHUNK,
            )
            .unwrap(),
        );
    }
    fn l(&self) -> &Layer {
        self.layer.as_ref().unwrap()
    }
    fn ino(&self, p: &[u8]) -> Result<u64, FsError> {
        let mut ino = ROOT_INO;
        for c in p.split(|b| *b == b'/').filter(|c| !c.is_empty()) {
            ino = self.l().lookup(ino, c)?.ino;
        }
        Ok(ino)
    }
    fn read_all(&self, p: &[u8]) -> Vec<u8> {
        let fh = self.l().open(self.ino(p).unwrap(), false).unwrap();
        let mut out = Vec::new();
        loop {
            let part = self.l().read(fh, out.len() as u64, 9000).unwrap();
            if part.is_empty() {
                break;
            }
            out.extend_from_slice(&part);
        }
        self.l().release(fh);
        out
    }
    fn with_file<T>(&self, p: &[u8], write: bool, f: impl FnOnce(&Layer, u64) -> T) -> T {
        let fh = self.l().open(self.ino(p).unwrap(), write).unwrap();
        let out = f(self.l(), fh);
        self.l().release(fh);
        out
    }
}

/// Runs one op on both; panics where they disagree.
fn step(h: &mut Harness, m: &mut Model, op: &Op) {
    let files = m.paths_where(|e| matches!(e, E::File(_)));
    let dirs = m.paths_where(|e| *e == E::Dir);
    let all: Vec<Vec<u8>> = m.tree.keys().filter(|p| !p.is_empty()).cloned().collect();
    match op.clone() {
        Op::Write {
            file,
            at,
            len,
            byte,
        } => {
            let Some(p) = pick(&files, file) else { return };
            let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
            h.with_file(&p, true, |l, fh| {
                assert_eq!(l.write(fh, at, &data).unwrap() as usize, len)
            });
            let E::File(id) = m.tree[&p] else {
                unreachable!()
            };
            let c = m.files.get_mut(&id).unwrap();
            let end = at as usize + len;
            if c.len() < end {
                c.resize(end, 0);
            }
            c[at as usize..end].copy_from_slice(&data);
            m.synced.remove(&id);
        }
        Op::Truncate { file, size } => {
            let Some(p) = pick(&files, file) else { return };
            let set = SetAttr {
                size: Some(size),
                ..SetAttr::default()
            };
            assert_eq!(h.l().setattr(h.ino(&p).unwrap(), &set).unwrap().size, size);
            let E::File(id) = m.tree[&p] else {
                unreachable!()
            };
            m.files.get_mut(&id).unwrap().resize(size as usize, 0);
            m.synced.remove(&id);
        }
        Op::Allocate { file, at, len } => {
            let Some(p) = pick(&files, file) else { return };
            h.with_file(&p, true, |l, fh| l.allocate(fh, at, len, false).unwrap());
            let E::File(id) = m.tree[&p] else {
                unreachable!()
            };
            let c = m.files.get_mut(&id).unwrap();
            if c.len() < (at + len) as usize {
                c.resize((at + len) as usize, 0);
                m.synced.remove(&id);
            }
        }
        Op::Read { file, at, len } => {
            let Some(p) = pick(&files, file) else { return };
            let (got, direct) = h.with_file(&p, false, |l, fh| {
                let mut buf = Vec::new();
                let direct = match l.read_into(fh, at, len, &mut buf).unwrap() {
                    ReadData::Zeros(n) => vec![0; n],
                    ReadData::Blob(b, r) => b[r].to_vec(),
                    ReadData::Assembled => buf,
                };
                (l.read(fh, at, len).unwrap(), direct)
            });
            assert!(got == direct, "read and read_into differ");
            let E::File(id) = m.tree[&p] else {
                unreachable!()
            };
            let c = &m.files[&id];
            let lo = (at as usize).min(c.len());
            let hi = (lo + len as usize).min(c.len());
            assert!(
                got == c[lo..hi],
                "read {at}+{len} of {:?}",
                String::from_utf8_lossy(&p)
            );
        }
        Op::Seek { file, at, data } => {
            let Some(p) = pick(&files, file) else { return };
            let got = h.with_file(&p, false, |l, fh| l.seek(fh, at, data));
            let E::File(id) = m.tree[&p] else {
                unreachable!()
            };
            let c = &m.files[&id];
            let zero = |from: u64, to: u64| c[from as usize..to as usize].iter().all(|b| *b == 0);
            match got {
                Err(FsError::NoSuchOffset) => {
                    // Past the end, or (SEEK_DATA) nothing but zeros from `at` on.
                    assert!(
                        at >= c.len() as u64 || (data && zero(at, c.len() as u64)),
                        "seek {at} {data}"
                    );
                }
                Ok(to) if data => {
                    assert!(
                        to >= at && to < c.len() as u64 && zero(at, to),
                        "SEEK_DATA {at} -> {to}"
                    );
                }
                Ok(to) => {
                    assert!(to >= at && to <= c.len() as u64, "SEEK_HOLE {at} -> {to}");
                    assert!(
                        to == c.len() as u64 || c[to as usize] == 0,
                        "SEEK_HOLE {at} -> {to}: data there"
                    );
                }
                Err(e) => panic!("seek: {e}"),
            }
        }
        Op::Create { dir, name } | Op::Mkdir { dir, name } | Op::Symlink { dir, name } => {
            let Some(d) = pick(&dirs, dir).or_else(|| Some(Vec::new())) else {
                return;
            };
            let d = if dir % 3 == 0 { Vec::new() } else { d };
            let n = new_name(name);
            let p = join(&d, &n);
            let parent = h.ino(&d).unwrap();
            let got = match op {
                Op::Create { .. } => h.l().create(parent, &n, WHO).map(|(a, fh)| {
                    h.l().release(fh);
                    a
                }),
                Op::Mkdir { .. } => h.l().mkdir(parent, &n, Creator { mode: 0o755, ..WHO }),
                _ => h.l().symlink(parent, &n, b"some/target", WHO),
            };
            if m.tree.contains_key(&p) {
                assert_eq!(got.unwrap_err(), FsError::Exists);
                return;
            }
            got.unwrap();
            let e = match op {
                Op::Create { .. } => {
                    m.next += 1;
                    m.files.insert(m.next, Vec::new());
                    E::File(m.next)
                }
                Op::Mkdir { .. } => E::Dir,
                _ => E::Link(b"some/target".to_vec()),
            };
            m.tree.insert(p, e);
        }
        Op::Link { file, dir, name } => {
            let Some(src) = pick(&files, file) else {
                return;
            };
            let d = pick(&dirs, dir).unwrap_or_default();
            let p = join(&d, &new_name(name));
            let got = h
                .l()
                .link(h.ino(&src).unwrap(), h.ino(&d).unwrap(), &new_name(name));
            if m.tree.contains_key(&p) {
                assert_eq!(got.unwrap_err(), FsError::Exists);
                return;
            }
            got.unwrap();
            let e = m.tree[&src].clone();
            m.tree.insert(p, e);
        }
        Op::Unlink { any } => {
            let Some(p) = pick(&all, any) else { return };
            let got = h.l().unlink(h.ino(parent(&p)).unwrap(), name_of(&p));
            if m.tree[&p] == E::Dir {
                assert_eq!(got.unwrap_err(), FsError::IsDir);
                return;
            }
            got.unwrap();
            m.tree.remove(&p);
        }
        Op::Rmdir { dir } => {
            let Some(p) = pick(&dirs, dir).filter(|p| !p.is_empty()) else {
                return;
            };
            let got = h.l().rmdir(h.ino(parent(&p)).unwrap(), name_of(&p));
            if !m.children(&p).is_empty() {
                assert_eq!(got.unwrap_err(), FsError::NotEmpty);
                return;
            }
            got.unwrap();
            m.tree.remove(&p);
        }
        Op::Rename {
            any,
            dir,
            name,
            no_replace,
        } => {
            let Some(src) = pick(&all, any) else { return };
            // Half the time onto an existing name, to replace it.
            let dst = if name % 2 == 0 {
                pick(&all, dir).unwrap()
            } else {
                join(&pick(&dirs, dir).unwrap_or_default(), &new_name(name))
            };
            let got = h.l().rename(
                h.ino(parent(&src)).unwrap(),
                name_of(&src),
                h.ino(parent(&dst)).unwrap(),
                name_of(&dst),
                no_replace,
            );
            let want = rename_model(m, &src, &dst, no_replace);
            match want {
                Ok(()) => got.unwrap(),
                Err(e) => assert_eq!(got.unwrap_err(), e, "rename {src:?} -> {dst:?}"),
            }
        }
        Op::Chmod { any, mode } => {
            let Some(p) = pick(&all, any) else { return };
            if matches!(m.tree[&p], E::Link(_)) {
                return;
            }
            let set = SetAttr {
                mode: Some(mode),
                ..SetAttr::default()
            };
            assert_eq!(h.l().setattr(h.ino(&p).unwrap(), &set).unwrap().mode, mode);
        }
        Op::Fsync { file } => {
            let Some(p) = pick(&files, file) else { return };
            h.with_file(&p, true, |l, fh| l.fsync(fh, false).unwrap());
            let E::File(id) = m.tree[&p] else {
                unreachable!()
            };
            m.synced.insert(id, m.files[&id].clone());
        }
        Op::Remount => {
            h.l().sync_all().unwrap();
            h.layer = None;
            h.open();
        }
        Op::Crash => {
            // The daemon dies: nothing is synced, the store keeps what it committed.
            h.layer = None;
            h.open();
            let synced = std::mem::take(&mut m.synced);
            for (p, e) in m.tree.clone() {
                if let E::File(id) = e {
                    let got = h.read_all(&p);
                    if let Some(s) = synced.get(&id) {
                        assert!(
                            got == *s,
                            "fsynced {:?} lost its content",
                            String::from_utf8_lossy(&p)
                        );
                    }
                    m.files.insert(id, got);
                }
            }
            m.synced = synced;
        }
    }
}

/// What a rename does to the model, or the error it must give.
fn rename_model(m: &mut Model, src: &[u8], dst: &[u8], no_replace: bool) -> Result<(), FsError> {
    if src == dst {
        return Ok(());
    }
    let s = m.tree[src].clone();
    if s == E::Dir && (dst.starts_with(src) && dst.get(src.len()) == Some(&b'/')) {
        return Err(FsError::Invalid);
    }
    if let Some(t) = m.tree.get(dst).cloned() {
        if let (E::File(a), E::File(b)) = (&s, &t) {
            if a == b {
                return Ok(()); // two names of one inode
            }
        }
        if no_replace {
            return Err(FsError::Exists);
        }
        match (&s, &t) {
            (E::Dir, E::Dir) if !m.children(dst).is_empty() => return Err(FsError::NotEmpty),
            (E::Dir, E::Dir) => {}
            (E::Dir, _) => return Err(FsError::NotDir),
            (_, E::Dir) => return Err(FsError::IsDir),
            _ => {}
        }
        m.tree.remove(dst);
    }
    let moved: Vec<(Vec<u8>, E)> = m
        .tree
        .range(src.to_vec()..)
        .take_while(|(p, _)| p.starts_with(src))
        .filter(|(p, _)| p.len() == src.len() || p[src.len()] == b'/')
        .map(|(p, e)| (p.clone(), e.clone()))
        .collect();
    for (p, e) in moved {
        m.tree.remove(&p);
        m.tree.insert([dst, &p[src.len()..]].concat(), e);
    }
    Ok(())
}

/// The whole tree through the layer agrees with the model.
/// Where the layer says a file came from and what may differ from there must be true:
/// every byte outside the changed ranges is the origin's at the same offset.
fn check_changes(h: &Harness, ino: u64, content: &[u8], base: &HashMap<Vec<u8>, Vec<u8>>) {
    let raw = match h.l().getxattr(ino, CHANGES_XATTR.as_bytes()) {
        Ok(v) => v,
        Err(FsError::NoData) => return,
        Err(e) => panic!("{CHANGES_XATTR}: {e:?}"),
    };
    let c = FileChanges::decode(&raw).unwrap();
    let origin = base.get(&c.origin).unwrap_or_else(|| {
        panic!(
            "origin {:?} is no base file",
            String::from_utf8_lossy(&c.origin)
        )
    });
    let mut pos = 0usize;
    let mut ranges = c.changed.iter().peekable();
    while pos < content.len() {
        if let Some(r) = ranges.peek() {
            if pos as u64 >= r.end {
                ranges.next();
                continue;
            }
            if pos as u64 >= r.start {
                pos = r.end as usize;
                continue;
            }
        }
        assert_eq!(
            content[pos],
            origin.get(pos).copied().unwrap_or(0),
            "byte {pos} outside the changed ranges {:?} differs from {:?}",
            c.changed,
            String::from_utf8_lossy(&c.origin)
        );
        pos += 1;
    }
}

fn compare(h: &Harness, m: &Model, base: &HashMap<Vec<u8>, Vec<u8>>) {
    let mut seen = BTreeSet::new();
    let mut inos: HashMap<u64, u64> = HashMap::new();
    let mut stack = vec![(Vec::new(), ROOT_INO)];
    while let Some((dir, ino)) = stack.pop() {
        for e in h.l().readdir(ino).unwrap() {
            let p = join(&dir, &e.name);
            let want = m
                .tree
                .get(&p)
                .unwrap_or_else(|| panic!("{:?} is not in the model", String::from_utf8_lossy(&p)));
            let a = h.l().getattr(e.ino).unwrap();
            match want {
                E::Dir => {
                    assert_eq!(a.kind, NodeKind::Dir);
                    stack.push((p.clone(), e.ino));
                }
                E::Link(t) => assert_eq!(&h.l().readlink(e.ino).unwrap(), t),
                E::File(id) => {
                    let c = &m.files[id];
                    assert_eq!(
                        a.size,
                        c.len() as u64,
                        "size of {:?}",
                        String::from_utf8_lossy(&p)
                    );
                    assert!(
                        h.read_all(&p) == *c,
                        "content of {:?}",
                        String::from_utf8_lossy(&p)
                    );
                    check_changes(h, e.ino, c, base);
                    // Hard links are one inode.
                    assert_eq!(*inos.entry(*id).or_insert(e.ino), e.ino);
                }
            }
            seen.insert(p);
        }
    }
    let expected: BTreeSet<Vec<u8>> = m.tree.keys().filter(|p| !p.is_empty()).cloned().collect();
    assert_eq!(seen, expected);
}

/// A base tree: files of up to 40 KiB (several chunks), a sparse one, a directory.
fn base() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    proptest::collection::vec(
        (
            "[a-c]{1,2}(/[a-c]{1,2})?",
            proptest::collection::vec(any::<u8>(), 0..40_000),
        ),
        1..6,
    )
}

/// Writes the base tree; returns its files by path.
fn write_base(src: &Path, files: &[(String, Vec<u8>)], m: &mut Model) -> HashMap<Vec<u8>, Vec<u8>> {
    let mut written = HashMap::new();
    fs::create_dir_all(src.join("d")).unwrap();
    m.tree.insert(Vec::new(), E::Dir);
    m.tree.insert(b"d".to_vec(), E::Dir);
    for (p, data) in files {
        let path = src.join(p);
        if p.contains('/') {
            let d = p.split('/').next().unwrap();
            if m.tree.get(d.as_bytes()).is_some_and(|e| *e != E::Dir) {
                continue;
            }
            fs::create_dir_all(src.join(d)).unwrap();
            m.tree.insert(d.as_bytes().to_vec(), E::Dir);
        }
        if m.tree.contains_key(p.as_bytes()) {
            continue;
        }
        fs::write(&path, data).unwrap();
        written.insert(p.as_bytes().to_vec(), data.clone());
        m.next += 1;
        m.files.insert(m.next, data.clone());
        m.tree.insert(p.as_bytes().to_vec(), E::File(m.next));
    }
    written
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
    #[test]
    fn the_layer_matches_the_model(files in base(), ops in proptest::collection::vec(op(), 1..60)) {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        let mut m = Model::default();
        let base = write_base(&src, &files, &mut m);
        let repo = Repository::init(&d.path().join("repo"), b"pw", Encryption::Aes256Gcm, KdfParams::TEST_ONLY_WEAK).unwrap();
        let opts = TreeBackupOptions { paths: vec![src.clone()], ..Default::default() };
        backup_tree(&repo, &opts, &Progress::default()).unwrap();
        let snap = repo.snapshots().unwrap().remove(0);
        let view = Arc::new(View::new(Arc::new(repo), ViewOptions { cache_bytes: 1 << 20, ..ViewOptions::default() }).unwrap());
        let mut root_path = vec![b"snapshots".to_vec(), cairn_mount::layout::snapshot_dir_name(&snap).into_bytes()];
        for c in src.components() {
            if let Component::Normal(n) = c {
                root_path.push(n.as_encoded_bytes().to_vec());
            }
        }
        let mut h = Harness { view, snapshot: snap.id.to_hex(), root_path, layer_dir: d.path().join("layer"), layer: None };
        h.open();
        for op in &ops {
            step(&mut h, &mut m, op);
        }
        compare(&h, &m, &base);
        h.l().sync_all().unwrap();
        h.layer = None;
        h.open();
        compare(&h, &m, &base);
    }
}

#[test]
fn a_layer_over_another_snapshot_is_refused_and_the_repository_is_not_written() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"original").unwrap();
    let repo = Repository::init(
        &d.path().join("repo"),
        b"pw",
        Encryption::Aes256Gcm,
        KdfParams::TEST_ONLY_WEAK,
    )
    .unwrap();
    let opts = TreeBackupOptions {
        paths: vec![src.clone()],
        ..Default::default()
    };
    backup_tree(&repo, &opts, &Progress::default()).unwrap();
    let snap = repo.snapshots().unwrap().remove(0);
    let view = Arc::new(View::new(Arc::new(repo), ViewOptions::default()).unwrap());
    let dir_name = cairn_mount::layout::snapshot_dir_name(&snap);
    let mut path: Vec<&[u8]> = vec![b"snapshots", dir_name.as_bytes()];
    let comps: Vec<Vec<u8>> = src
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.as_encoded_bytes().to_vec()),
            _ => None,
        })
        .collect();
    path.extend(comps.iter().map(Vec::as_slice));
    let layer_dir = d.path().join("layer");
    let packs_before = count_files(&d.path().join("repo"));
    {
        let l = Layer::open_dir(view.clone(), &snap.id.to_hex(), &path, &layer_dir, CHUNK).unwrap();
        let f = l.lookup(ROOT_INO, b"f").unwrap().ino;
        let fh = l.open(f, true).unwrap();
        l.write(fh, 0, b"CHANGED").unwrap();
        l.fsync(fh, false).unwrap();
        l.release(fh);
        assert!(l.written_bytes() > 0);
    }
    assert_eq!(count_files(&d.path().join("repo")), packs_before);
    let other = "00".repeat(32);
    let e = Layer::open_dir(view, &other, &path, &layer_dir, CHUNK)
        .err()
        .unwrap();
    assert!(e.to_string().contains("this layer is over snapshot"), "{e}");
}

fn count_files(dir: &Path) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| {
            if e.path().is_dir() {
                count_files(&e.path())
            } else {
                usize::from(!e.file_name().to_string_lossy().starts_with("index"))
            }
        })
        .sum()
}

#[test]
fn looking_up_every_name_of_a_directory_decodes_its_tree_once() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..300 {
        fs::write(src.join(format!("f{i:03}")), format!("file {i}")).unwrap();
    }
    let repo = Repository::init(
        &d.path().join("repo"),
        b"pw",
        Encryption::Aes256Gcm,
        KdfParams::TEST_ONLY_WEAK,
    )
    .unwrap();
    let opts = TreeBackupOptions {
        paths: vec![src.clone()],
        ..Default::default()
    };
    backup_tree(&repo, &opts, &Progress::default()).unwrap();
    let snap = repo.snapshots().unwrap().remove(0);
    let view = View::new(Arc::new(repo), ViewOptions::default()).unwrap();
    let dir_name = cairn_mount::layout::snapshot_dir_name(&snap);
    let mut ino = view.lookup(ROOT_INO, b"snapshots").unwrap().ino;
    ino = view.lookup(ino, dir_name.as_bytes()).unwrap().ino;
    for c in src.components() {
        if let Component::Normal(n) = c {
            ino = view.lookup(ino, n.as_encoded_bytes()).unwrap().ino;
        }
    }
    let before = view.trees_decoded();
    for i in 0..300 {
        let a = view.lookup(ino, format!("f{i:03}").as_bytes()).unwrap();
        assert_eq!(a.size, format!("file {i}").len() as u64);
    }
    assert!(view.lookup(ino, b"nope").is_err());
    assert!(
        view.trees_decoded() - before <= 1,
        "{} decodes for 301 lookups in one directory",
        view.trees_decoded() - before
    );
}
