//! Deduplication and the blob index.

use std::fs;
use std::io::Write;

use crate::support::*;

#[test]
fn an_unchanged_1gib_tree_adds_less_than_1mib_and_is_not_read_again() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    for i in 0..64 {
        write_random(&src.join(format!("f{i:02}")), i, 16 << 20);
    }
    let first = env.backup(&[&src]);
    assert_eq!(first["summary"]["bytes_read"], 1u64 << 30);
    let before = env.repo_bytes();
    let second = env.backup(&[&src]);
    let growth = env.repo_bytes() - before;
    assert!(growth < 1 << 20, "second backup added {growth} bytes");
    assert_eq!(second["summary"]["files_unchanged"], 64);
    assert_eq!(second["summary"]["bytes_read"], 0);
    assert_eq!(second["parent"], first["id"]);
    // --force reads everything again, and still stores nothing new.
    let before = env.repo_bytes();
    let forced = env.json(&["backup", "--force", src.to_str().unwrap()])["snapshot"].clone();
    assert_eq!(forced["summary"]["bytes_read"], 1u64 << 30);
    // No new data; at most the small trees of the directories above it (/tmp changes
    // while other tests run).
    assert!(
        forced["summary"]["bytes_new"].as_u64().unwrap() < 64 << 10,
        "{}",
        forced["summary"]
    );
    assert!(env.repo_bytes() - before < 1 << 20);
}

#[test]
fn inserting_one_byte_at_the_start_of_256mib_adds_less_than_3_percent() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    let file = src.join("big");
    write_random(&file, 5, 256 << 20);
    env.backup(&[&src]);
    let before = env.repo_bytes();
    let old = fs::read(&file).unwrap();
    let mut f = fs::File::create(&file).unwrap();
    f.write_all(b"!").unwrap();
    f.write_all(&old).unwrap();
    drop(f);
    env.backup(&[&src]);
    let growth = env.repo_bytes() - before;
    let limit = (256u64 << 20) * 3 / 100;
    assert!(growth < limit, "added {growth} bytes (limit {limit})");
}

#[test]
fn a_changed_file_is_the_only_one_read() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("d")).unwrap();
    for i in 0..20 {
        fs::write(src.join(format!("d/f{i}")), format!("file {i}")).unwrap();
    }
    env.backup(&[&src]);
    fs::write(src.join("d/f7"), b"changed, and longer").unwrap();
    let s = env.backup(&[&src]);
    assert_eq!(s["summary"]["files"], 20);
    assert_eq!(s["summary"]["files_unchanged"], 19);
    assert_eq!(s["summary"]["bytes_read"], 19);
}

#[test]
fn the_index_can_be_deleted_and_rebuilt_and_every_snapshot_still_restores() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    write_random(&src.join("a"), 1, 3 << 20);
    fs::write(src.join("b"), b"version 1").unwrap();
    let s1 = env.backup(&[&src]);
    let copy1 = env.path("copy1");
    fs::create_dir_all(&copy1).unwrap();
    fs::copy(src.join("a"), copy1.join("a")).unwrap();
    fs::copy(src.join("b"), copy1.join("b")).unwrap();
    fs::write(src.join("b"), b"version 2, longer").unwrap();
    write_random(&src.join("c"), 2, 2 << 20);
    let s2 = env.backup(&[&src]);

    assert!(env.remove_index() > 0, "no index in the cache");
    let out = env.json(&["index", "rebuild"]);
    assert!(out["blobs"].as_u64().unwrap() > 3);
    for (snap, expect) in [(&s1, &copy1), (&s2, &src)] {
        let target = env.path(&format!("restore-{}", snap["short_id"].as_str().unwrap()));
        env.ok(&[
            "restore",
            snap["id"].as_str().unwrap(),
            "--target",
            target.to_str().unwrap(),
        ]);
        let got = under(&target, &src);
        for name in ["a", "b", "c"] {
            let want = expect.join(name);
            if want.exists() {
                assert_eq!(hash_file(&want), hash_file(&got.join(name)), "{name}");
            } else {
                assert!(!got.join(name).exists());
            }
        }
    }
    // Without an explicit rebuild, opening the repository re-creates the index too.
    assert!(env.remove_index() > 0, "no index in the cache");
    let target = env.path("restore-again");
    env.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_same_tree(&src, &under(&target, &src));
}
