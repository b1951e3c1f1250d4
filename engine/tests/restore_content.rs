//! A restore reads each blob once however often the snapshot uses it, and writes every
//! file byte for byte: duplicated files, a block repeated within a file, holes (left as
//! holes), empty files, and more files than are kept open at once.
//!
//! One test in this binary: it measures the bytes this process reads (`rchar`).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use cairn_engine::backup::{backup_tree, TreeBackupOptions};
use cairn_engine::config::Config;
use cairn_engine::crypto::Encryption;
use cairn_engine::keyfile::KdfParams;
use cairn_engine::progress::Progress;
use cairn_engine::restore::{restore, RestoreOptions};
use cairn_engine::Repository;

/// Bytes this process has read through read(2) and its kin, page cache or not.
fn bytes_read() -> u64 {
    let io = fs::read_to_string("/proc/self/io").unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .unwrap()
        .parse()
        .unwrap()
}

fn random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn same_tree(a: &Path, b: &Path) {
    for e in fs::read_dir(a).unwrap() {
        let e = e.unwrap();
        let other = b.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            same_tree(&e.path(), &other);
        } else {
            assert!(
                fs::read(e.path()).unwrap() == fs::read(&other).unwrap(),
                "{} differs",
                other.display()
            );
        }
    }
}

#[test]
fn each_blob_is_read_once_and_every_file_restores_byte_for_byte() {
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src");
    fs::create_dir_all(src.join("dup")).unwrap();
    fs::create_dir_all(src.join("many")).unwrap();
    // 40 copies of one 2 MiB file: 80 MiB of content, 2 MiB of blobs.
    let block = random(1, 2 << 20);
    for i in 0..40 {
        fs::write(src.join("dup").join(i.to_string()), &block).unwrap();
    }
    // A block repeated within a file.
    fs::write(src.join("repeat"), random(2, 1 << 20).repeat(6)).unwrap();
    // Holes: data, 3 MiB hole, data, 2 MiB trailing hole.
    let holes = fs::File::create(src.join("holes")).unwrap();
    holes.write_all_at(&random(3, 1 << 20), 0).unwrap();
    holes.write_all_at(&random(4, 1 << 20), 4 << 20).unwrap();
    holes.set_len(7 << 20).unwrap();
    drop(holes);
    fs::write(src.join("empty"), b"").unwrap();
    // More files than the restore keeps open.
    for i in 0..600u64 {
        fs::write(
            src.join("many").join(i.to_string()),
            random(100 + i, 1000 + i as usize * 7),
        )
        .unwrap();
    }

    let repo_path = d.path().join("repo");
    let repo = Repository::init_with(
        &repo_path,
        b"pw",
        Config::new(Encryption::Aes256Gcm),
        KdfParams::TEST_ONLY_WEAK,
    )
    .unwrap();
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
    let stored: u64 = fs::read_dir(repo_path.join("data"))
        .unwrap()
        .flat_map(|s| fs::read_dir(s.unwrap().path()).unwrap())
        .map(|p| p.unwrap().metadata().unwrap().len())
        .sum();

    let target = d.path().join("out");
    let before = bytes_read();
    let out = restore(
        &repo,
        &snap,
        &RestoreOptions {
            target: target.clone(),
            ..Default::default()
        },
        &Progress::default(),
    )
    .unwrap();
    let read = bytes_read() - before;
    assert!(out.warnings.is_empty(), "{:?}", out.warnings);
    assert_eq!(out.files, 40 + 1 + 1 + 1 + 600);

    // Reading each use of a blob would read 80 MiB for `dup` alone.
    assert!(
        read < stored + (2 << 20),
        "the restore read {read} bytes from a repository of {stored} bytes"
    );
    let restored = target.join(src.strip_prefix("/").unwrap());
    same_tree(&src, &restored);
    let md = fs::metadata(restored.join("holes")).unwrap();
    assert_eq!(md.len(), 7 << 20);
    assert!(
        md.blocks() * 512 < 3 << 20,
        "holes were written: {} bytes allocated",
        md.blocks() * 512
    );
}
