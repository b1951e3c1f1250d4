//! Reference-model property test of the read-only view, without FUSE: random trees are
//! written to disk, backed up, and every lookup, listing, read and link of the view is
//! compared with the model that generated them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Component, Path};
use std::sync::Arc;

use cairn_engine::backup::{backup_tree, TreeBackupOptions};
use cairn_engine::crypto::Encryption;
use cairn_engine::keyfile::KdfParams;
use cairn_engine::progress::Progress;
use cairn_engine::tree::NodeKind;
use cairn_engine::Repository;
use cairn_mount::view::{FsError, View, ViewOptions, ROOT_INO};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum M {
    File(Vec<u8>),
    /// A sparse file: `size` bytes, zero except `data` at `at`.
    Sparse {
        size: u64,
        at: u64,
        data: Vec<u8>,
    },
    Link(String),
    Dir(BTreeMap<String, M>),
}

fn name() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9._ -]{1,12}".prop_filter("not . or ..", |n| n != "." && n != "..")
}

fn tree() -> impl Strategy<Value = BTreeMap<String, M>> {
    let leaf = prop_oneof![
        4 => proptest::collection::vec(any::<u8>(), 0..20_000).prop_map(M::File),
        1 => (1u64..(8 << 20), proptest::collection::vec(any::<u8>(), 1..5000), any::<u64>())
            .prop_map(|(size, data, r)| M::Sparse { at: r % size, size: size + data.len() as u64, data }),
        1 => "[a-z/]{1,20}".prop_map(M::Link),
    ];
    let node = leaf.prop_recursive(3, 40, 6, |inner| {
        proptest::collection::btree_map(name(), inner, 0..6).prop_map(M::Dir)
    });
    proptest::collection::btree_map(name(), node, 1..8)
}

fn write(dir: &Path, entries: &BTreeMap<String, M>) {
    fs::create_dir_all(dir).unwrap();
    for (n, m) in entries {
        let p = dir.join(n);
        match m {
            M::File(d) => fs::write(&p, d).unwrap(),
            M::Sparse { size, at, data } => {
                let f = fs::File::create(&p).unwrap();
                f.set_len(*size).unwrap();
                f.write_all_at(data, *at).unwrap();
            }
            M::Link(t) => std::os::unix::fs::symlink(t, &p).unwrap(),
            M::Dir(sub) => write(&p, sub),
        }
    }
}

fn content(m: &M) -> Vec<u8> {
    match m {
        M::File(d) => d.clone(),
        M::Sparse { size, at, data } => {
            let mut v = vec![0u8; usize::try_from(*size).unwrap()];
            v[*at as usize..*at as usize + data.len()].copy_from_slice(data);
            v
        }
        _ => unreachable!(),
    }
}

fn check(view: &View, ino: u64, model: &BTreeMap<String, M>, seed: u64) {
    let listed: Vec<Vec<u8>> = view
        .readdir(ino)
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    let expected: Vec<Vec<u8>> = model.keys().map(|k| k.as_bytes().to_vec()).collect();
    assert_eq!(listed, expected);
    assert_eq!(
        view.lookup(ino, b"no-such-entry-\xff").unwrap_err(),
        FsError::NotFound
    );
    for (n, m) in model {
        let a = view.lookup(ino, n.as_bytes()).unwrap();
        // A second lookup gives the same inode.
        assert_eq!(view.lookup(ino, n.as_bytes()).unwrap().ino, a.ino);
        match m {
            M::Dir(sub) => {
                assert_eq!(a.kind, NodeKind::Dir);
                check(view, a.ino, sub, seed.wrapping_mul(31).wrapping_add(a.ino));
            }
            M::Link(t) => {
                assert_eq!(a.kind, NodeKind::Symlink);
                assert_eq!(view.readlink(a.ino).unwrap(), t.as_bytes());
            }
            M::File(_) | M::Sparse { .. } => {
                let want = content(m);
                assert_eq!(a.kind, NodeKind::File);
                assert_eq!(a.size, want.len() as u64);
                let fh = view.open(a.ino).unwrap();
                // Whole file in 64 KiB reads, then reads at pseudo-random places.
                let mut got = Vec::new();
                loop {
                    let part = view.read(fh, got.len() as u64, 65536).unwrap();
                    if part.is_empty() {
                        break;
                    }
                    got.extend_from_slice(&part);
                }
                assert!(got == want, "content of {n}");
                let mut x = seed | 1;
                for _ in 0..20 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let off = x % (want.len() as u64 + 10);
                    let len = u32::try_from((x >> 20) % 100_000).unwrap();
                    let part = view.read(fh, off, len).unwrap();
                    let lo = usize::try_from(off).unwrap().min(want.len());
                    let hi = (lo + len as usize).min(want.len());
                    assert!(part == want[lo..hi], "read {off}+{len} of {n}");
                }
                if let M::Sparse { at, data, .. } = m {
                    // SEEK_DATA/SEEK_HOLE find the data region around `at`; zeros before it.
                    let d = view.seek_data_or_hole(fh, 0, true).unwrap();
                    let h = view.seek_data_or_hole(fh, d, false).unwrap();
                    assert!(
                        d <= *at && h >= at + data.len() as u64,
                        "data {d}..{h} vs {at}+{}",
                        data.len()
                    );
                    assert!(want[..usize::try_from(d).unwrap()].iter().all(|&b| b == 0));
                }
                assert_eq!(
                    view.seek_data_or_hole(fh, want.len() as u64, true)
                        .unwrap_err(),
                    FsError::NoSuchOffset
                );
                view.release(fh);
                assert_eq!(view.read(fh, 0, 1).unwrap_err(), FsError::BadHandle);
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn the_view_matches_the_model(model in tree(), seed in any::<u64>()) {
        let d = tempfile::tempdir().unwrap();
        let src = d.path().join("src");
        write(&src, &model);
        let repo = Repository::init(&d.path().join("repo"), b"pw", Encryption::Aes256Gcm, KdfParams::TEST_ONLY_WEAK).unwrap();
        let opts = TreeBackupOptions { paths: vec![src.clone()], ..Default::default() };
        backup_tree(&repo, &opts, &Progress::default()).unwrap();
        let view = View::new(Arc::new(repo), ViewOptions { cache_bytes: 1 << 20, ..ViewOptions::default() }).unwrap();

        let snaps = view.lookup(ROOT_INO, b"snapshots").unwrap();
        let entries = view.readdir(snaps.ino).unwrap();
        prop_assert_eq!(entries.len(), 1);
        let mut ino = entries[0].ino;
        for c in src.components() {
            if let Component::Normal(n) = c {
                ino = view.lookup(ino, n.as_encoded_bytes()).unwrap().ino;
            }
        }
        check(&view, ino, &model, seed);
        // Files are not directories and vice versa.
        prop_assert_eq!(view.readdir(ROOT_INO).unwrap().len(), 2);
        prop_assert_eq!(view.open(ROOT_INO).unwrap_err(), FsError::IsDir);
    }
}
