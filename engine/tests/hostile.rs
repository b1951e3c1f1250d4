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
