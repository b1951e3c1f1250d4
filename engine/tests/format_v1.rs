//! Repositories written by format version 1 stay readable: a committed fixture
//! (`fixtures/v1`) opens, lists and restores byte for byte.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};

use cairn_engine::backup::{backup_tree, TreeBackupOptions};
use cairn_engine::progress::Progress;
use cairn_engine::restore::{restore, RestoreOptions};
use cairn_engine::snapshot::SnapshotKind;
use cairn_engine::Repository;
use zeroize::Zeroizing;

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &to.join(e.file_name()));
        } else {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// The fixture's directory, and a scratch directory holding a copy of its repository
/// (in `repo/`, also returned).
fn fixture_copy() -> (PathBuf, tempfile::TempDir, PathBuf) {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/v1");
    let d = tempfile::tempdir().unwrap();
    let repo_dir = d.path().join("repo");
    copy_dir(&fixture.join("repo"), &repo_dir);
    (fixture, d, repo_dir)
}

/// The fixture's files under `restored` are those under `src`, byte for byte.
fn assert_same_files(restored: &Path, src: &Path) {
    for f in ["dir/hello.txt", "dir/random.bin", "sparse"] {
        assert_eq!(
            fs::read(restored.join(f)).unwrap(),
            fs::read(src.join(f)).unwrap(),
            "{f}"
        );
    }
}

/// Restores `snap` into `target`, asserting nothing was lost.
fn restore_into(repo: &Repository, snap: &cairn_engine::snapshot::Snapshot, target: &Path) {
    let out = restore(
        repo,
        snap,
        &RestoreOptions {
            target: target.to_owned(),
            ..Default::default()
        },
        &Progress::default(),
    )
    .unwrap();
    assert!(out.warnings.iter().all(|w| !w.lost), "{:?}", out.warnings);
}

/// Restores the fixture's tree snapshot (one of `snaps`) into `target`; returns where its
/// backed-up directory landed.
fn restore_tree_snapshot(
    repo: &Repository,
    snaps: &[cairn_engine::snapshot::Snapshot],
    target: &Path,
) -> PathBuf {
    let tree = snaps
        .iter()
        .find(|s| s.manifest.kind == SnapshotKind::Tree)
        .unwrap();
    restore_into(repo, tree, target);
    target.join(tree.manifest.paths[0].trim_start_matches('/'))
}

#[test]
fn the_v1_fixture_opens_and_restores_byte_for_byte() {
    let (fixture, d, repo_dir) = fixture_copy();
    let pw = || Ok(Zeroizing::new(b"fixture".to_vec()));
    let repo = Repository::open(&repo_dir, &pw).unwrap();
    assert_eq!(repo.config().version, 1);
    // Written before the config recorded image chunks, and with the chunker of its
    // day: it keeps both (new defaults apply to new repositories only).
    assert_eq!(repo.config().image_chunk_size, 1 << 20);
    assert_eq!(repo.config().chunker.avg_size, 1 << 20);
    let snaps = repo.snapshots().unwrap();
    assert_eq!(snaps.len(), 2);

    let restored = restore_tree_snapshot(&repo, &snaps, &d.path().join("out"));
    assert_same_files(&restored, &fixture.join("src"));
    assert_eq!(
        fs::read_link(restored.join("link")).unwrap(),
        Path::new("dir/hello.txt")
    );

    let stream = snaps
        .iter()
        .find(|s| s.manifest.kind == SnapshotKind::Stream)
        .unwrap();
    let out2 = d.path().join("out2");
    restore_into(&repo, stream, &out2);
    assert_eq!(
        fs::read(out2.join("stream.txt")).unwrap(),
        b"stream content v1"
    );
}

#[test]
fn this_program_backs_up_into_a_v1_repository_and_leaves_it_v1() {
    let (fixture, d, repo_dir) = fixture_copy();
    let config_before = fs::read(repo_dir.join("config")).unwrap();
    let pw = || Ok(Zeroizing::new(b"fixture".to_vec()));
    let repo = Repository::open(&repo_dir, &pw).unwrap();
    let src = fixture.join("src");
    let snap = backup_tree(
        &repo,
        &TreeBackupOptions {
            paths: vec![src.clone()],
            ..Default::default()
        },
        &Progress::default(),
    )
    .unwrap()
    .snapshot;
    drop(repo);
    // The config is untouched: older programs still open the repository.
    assert_eq!(fs::read(repo_dir.join("config")).unwrap(), config_before);
    let repo = Repository::open(&repo_dir, &pw).unwrap();
    assert_eq!(repo.config().version, 1);
    let target = d.path().join("out");
    restore_into(&repo, &snap, &target);
    let restored = target.join(src.strip_prefix("/").unwrap());
    assert_same_files(&restored, &src);
}

#[test]
fn the_v1_fixture_upgrades_to_the_current_format_and_still_restores() {
    let (fixture, d, repo_dir) = fixture_copy();
    let pw = || Ok(Zeroizing::new(b"fixture".to_vec()));
    let mut repo = Repository::open(&repo_dir, &pw).unwrap();
    // Only under the exclusive lock.
    assert!(repo.upgrade_format().is_err());
    repo.lock(
        cairn_engine::lock::LockKind::Exclusive,
        "upgrade",
        std::time::Duration::ZERO,
    )
    .unwrap();
    assert_eq!(
        repo.upgrade_format().unwrap(),
        (1, cairn_engine::config::FORMAT_VERSION)
    );
    drop(repo);
    let repo = Repository::open(&repo_dir, &pw).unwrap();
    assert_eq!(repo.config().version, cairn_engine::config::FORMAT_VERSION);
    // Every other parameter is kept.
    assert_eq!(repo.config().chunker.avg_size, 1 << 20);
    let snaps = repo.snapshots().unwrap();
    let restored = restore_tree_snapshot(&repo, &snaps, &d.path().join("out"));
    assert_same_files(&restored, &fixture.join("src"));
}
