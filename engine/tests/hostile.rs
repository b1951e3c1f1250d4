//! A snapshot crafted to escape the restore target (names `..`, `/`, duplicates) is
//! refused as damaged, and nothing is written outside the target.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;

use cairn_engine::blob::BlobKind;
use cairn_engine::crypto::Encryption;
use cairn_engine::keyfile::KdfParams;
use cairn_engine::progress::Progress;
use cairn_engine::restore::{restore, RestoreOptions};
use cairn_engine::saver::BlobSaver;
use cairn_engine::snapshot::{Manifest, Snapshot, SnapshotKind, Summary};
use cairn_engine::tree::{Extent, Node, NodeKind, Tree};
use cairn_engine::{ErrorKind, Repository};

fn file(name: &[u8], saver: &BlobSaver<'_>) -> Node {
    let data = b"pwned";
    let (id, _) = saver.save(BlobKind::Data, data).unwrap();
    Node {
        mode: 0o644,
        size: data.len() as u64,
        content: vec![Extent {
            blob: Some(id),
            len: data.len() as u64,
        }],
        ..Node::new(name.to_vec(), NodeKind::File)
    }
}

fn dir(name: &[u8], subtree: cairn_engine::id::BlobId) -> Node {
    Node {
        mode: 0o755,
        subtree: Some(subtree),
        ..Node::new(name.to_vec(), NodeKind::Dir)
    }
}

/// A scratch directory with an empty encrypted repository in `repo/`.
fn fresh_repo() -> (tempfile::TempDir, Repository) {
    let d = tempfile::tempdir().unwrap();
    let repo = Repository::init(
        &d.path().join("repo"),
        b"pw",
        Encryption::Aes256Gcm,
        KdfParams::TEST_ONLY_WEAK,
    )
    .unwrap();
    (d, repo)
}

/// Saves `root_nodes` as the root tree of a new snapshot, bypassing every check a
/// real backup would make (as an attacker writing the repository would).
fn craft(repo: &Repository, build: impl FnOnce(&BlobSaver<'_>) -> Vec<Node>) -> Snapshot {
    let saver = BlobSaver::new(repo);
    let nodes = build(&saver);
    let (root, _) = saver
        .save(BlobKind::Tree, &Tree { nodes }.encode())
        .unwrap();
    saver.flush().unwrap();
    let manifest = Manifest {
        time: chrono::Utc::now(),
        host: "evil".into(),
        user: "evil".into(),
        kind: SnapshotKind::Tree,
        paths: vec!["/x".into()],
        name: None,
        tags: vec![],
        parent: None,
        root,
        summary: Summary::default(),
        meta: BTreeMap::new(),
    };
    let id = repo.save_snapshot(&manifest).unwrap();
    Snapshot { id, manifest }
}

fn assert_refused(repo: &Repository, snap: &Snapshot, base: &Path) {
    let target = base.join("target/inner");
    let err = restore(
        repo,
        snap,
        &RestoreOptions {
            target: target.clone(),
            ..Default::default()
        },
        &Progress::default(),
    )
    .expect_err("a hostile snapshot was restored");
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    // Nothing anywhere but (at most) the empty target.
    let mut found = Vec::new();
    for e in walk(base) {
        if !e.starts_with(base.join("repo")) && e != base.join("target") && e != target {
            found.push(e);
        }
    }
    assert!(found.is_empty(), "written: {found:?}");
}

fn walk(p: &Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(p).unwrap().flatten() {
        out.push(e.path());
        if e.file_type().unwrap().is_dir() {
            out.extend(walk(&e.path()));
        }
    }
    out
}

#[test]
fn names_that_escape_the_target_are_refused() {
    for evil in [&b".."[..], b"../../escaped", b"/abs", b".", b"a\0b", b""] {
        let (d, repo) = fresh_repo();
        let snap = craft(&repo, |s| vec![file(evil, s)]);
        assert_refused(&repo, &snap, d.path());
    }
}

#[test]
fn a_directory_named_dotdot_deep_in_the_tree_is_refused() {
    let (d, repo) = fresh_repo();
    let snap = craft(&repo, |s| {
        let inner = Tree {
            nodes: vec![file(b"..", s)],
        };
        let (sub, _) = s.save(BlobKind::Tree, &inner.encode()).unwrap();
        vec![dir(b"ok", sub)]
    });
    assert_refused(&repo, &snap, d.path());
}

#[test]
fn duplicate_names_are_refused() {
    // A symlink `a -> /` beside a directory `a` would let `a/etc/...` escape.
    let (d, repo) = fresh_repo();
    let snap = craft(&repo, |s| {
        let inner = Tree {
            nodes: vec![file(b"passwd", s)],
        };
        let (sub, _) = s.save(BlobKind::Tree, &inner.encode()).unwrap();
        let link = Node {
            target: Some(b"/".to_vec()),
            ..Node::new(b"a".to_vec(), NodeKind::Symlink)
        };
        vec![link, dir(b"a", sub)]
    });
    assert_refused(&repo, &snap, d.path());
}

/// A tar archive with entries named exactly as given (no checks: an attacker's).
/// (path, type, content, link target) of one archive entry.
type RawEntry<'a> = (&'a [u8], tar::EntryType, &'a [u8], &'a [u8]);

fn raw_tar(entries: &[RawEntry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (path, kind, data, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.as_old_mut().name[..path.len()].copy_from_slice(path);
        h.as_old_mut().linkname[..link.len()].copy_from_slice(link);
        h.set_entry_type(*kind);
        h.set_mode(0o644);
        h.set_size(data.len() as u64);
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(data);
        out.resize(out.len().div_ceil(512) * 512, 0);
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn tar_backup(repo: &Repository, archive: &[u8]) -> cairn_engine::Result<()> {
    let opts = cairn_engine::backup::ArchiveBackupOptions {
        name: "postgresql".into(),
        ..Default::default()
    };
    cairn_engine::backup::backup_tar(repo, &opts, archive, &Progress::default()).map(|_| ())
}

#[test]
fn hostile_archives_fail_the_backup_and_save_no_snapshot() {
    use tar::EntryType::{Link, Regular, Symlink};
    let (_d, repo) = fresh_repo();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "dotdot",
            raw_tar(&[(b"base/../../etc/passwd", Regular, b"x", b"")]),
        ),
        ("absolute", raw_tar(&[(b"/etc/passwd", Regular, b"x", b"")])),
        (
            "link to nothing",
            raw_tar(&[(b"a", Link, b"", b"never-seen")]),
        ),
        (
            "link out",
            raw_tar(&[(b"a", Regular, b"x", b""), (b"b", Link, b"", b"../a")]),
        ),
        // The header promises more bytes than the archive holds.
        ("truncated", {
            let mut t = raw_tar(&[(b"big", Regular, &[7u8; 4096], b"")]);
            t.truncate(512 + 1000);
            t
        }),
    ];
    for (what, archive) in cases {
        let e = tar_backup(&repo, &archive).expect_err(what);
        assert!(
            matches!(e.kind(), ErrorKind::InvalidInput | ErrorKind::Io),
            "{what}: {e}"
        );
    }
    assert!(repo.snapshots().unwrap().is_empty());
    // A symlink may point anywhere (it is data, restored as a link); a good archive with
    // a hard link saves both names with one content.
    let good = raw_tar(&[
        (b"./PG_VERSION", Regular, b"15\n", b""),
        (b"./pg_wal/", tar::EntryType::Directory, b"", b""),
        (b"./link", Symlink, b"", b"/etc/passwd"),
        (b"./again", Link, b"", b"PG_VERSION"),
    ]);
    tar_backup(&repo, &good).unwrap();
    let snap = &repo.snapshots().unwrap()[0];
    let root = repo.load_tree(&snap.manifest.root).unwrap();
    let names: Vec<String> = root.nodes.iter().map(Node::display_name).collect();
    assert_eq!(names, ["PG_VERSION", "again", "link", "pg_wal"]);
    assert_eq!(root.nodes[0].content, root.nodes[1].content);
    assert_eq!(root.nodes[0].links, 2);
    assert_eq!(root.nodes[1].inode, root.nodes[0].inode);
}
