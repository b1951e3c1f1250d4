//! Files of many chunks keep their list of chunks in extent-list blobs (format 2), and
//! every reader gets the whole list back: restore, cat, diff, the mount, check, and a
//! prune that must keep the list blobs of the snapshots it keeps. The inline limit is
//! lowered (`CAIRN_TESTONLY_EXTENTS_INLINE`) so that a few MiB make a "huge" file.

use std::fs;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

use serde_json::Value;

use crate::support::*;

/// Small chunks, so that a 3 MiB file is ~190 of them.
const CHUNKS: &str = "4K,16K,64K";

fn init(env: &Env, extra: &[&str]) {
    let mut args = vec!["init", "--chunk-sizes", CHUNKS];
    args.extend_from_slice(extra);
    env.ok(&args);
}

/// Backs up `src` with at most `inline` extents listed in a tree.
fn backup_inline(env: &Env, src: &Path, inline: &str) -> Value {
    let out = env
        .cmd()
        .env("CAIRN_TESTONLY_EXTENTS_INLINE", inline)
        .args(["backup", src.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let out = succeeded("backup", out);
    serde_json::from_str::<Value>(&out).unwrap()["snapshot"].clone()
}

fn blobs(env: &Env) -> u64 {
    env.json(&["stats"])["blobs"].as_u64().unwrap()
}

/// Blobs a backup of `src` stores in a new format-2 repository with the normal inline
/// limit (so without list blobs, for files this small).
fn blobs_with_lists_inline(src: &Path) -> u64 {
    let inline = Env::without_repo();
    init(&inline, &[]);
    inline.backup(&[src]);
    blobs(&inline)
}

/// A big random file, a sparse one (data, a 1 MiB hole, data) and a small one.
fn make_source(src: &Path) {
    fs::create_dir_all(src).unwrap();
    write_random(&src.join("big"), 1, 3 << 20);
    let mut f = fs::File::create(src.join("sparse")).unwrap();
    f.write_all(&random_bytes(2, 600 << 10)).unwrap();
    f.seek(SeekFrom::Current(1 << 20)).unwrap();
    f.write_all(&random_bytes(3, 600 << 10)).unwrap();
    fs::write(src.join("small"), b"small").unwrap();
}

fn assert_restores(env: &Env, snap: &Value, src: &Path) {
    let target = env.path("restored");
    let _ = fs::remove_dir_all(&target);
    let id = snap["id"].as_str().unwrap();
    env.ok(&["restore", id, "--target", target.to_str().unwrap()]);
    for f in ["big", "sparse", "small"] {
        assert_eq!(
            hash_file(&under(&target, src).join(f)),
            hash_file(&src.join(f)),
            "{f} of snapshot {id}"
        );
    }
}

#[test]
fn a_file_of_many_chunks_is_listed_in_list_blobs_and_reads_back_everywhere() {
    let env = Env::without_repo();
    init(&env, &[]);
    let src = env.path("src");
    make_source(&src);
    let first = backup_inline(&env, &src, "8");
    // The same backup into a repository that lists every extent inline stores fewer
    // blobs: the difference is the list blobs.
    let without = blobs_with_lists_inline(&src);
    assert!(
        blobs(&env) > without + 20,
        "{} blobs with list blobs, {without} without",
        blobs(&env)
    );

    assert_restores(&env, &first, &src);
    let id1 = first["id"].as_str().unwrap().to_owned();
    let cat = env
        .cmd()
        .args(["cat", &id1, src.join("big").to_str().unwrap()])
        .output()
        .unwrap();
    assert!(cat.status.success());
    assert_eq!(blake3::hash(&cat.stdout), hash_file(&src.join("big")));
    env.ok(&["check", "--read-data"]);

    // A change in the middle of the big file: one list blob changes, the others are
    // shared with the first snapshot.
    let mut f = fs::OpenOptions::new()
        .write(true)
        .open(src.join("big"))
        .unwrap();
    f.seek(SeekFrom::Start(1 << 20)).unwrap();
    f.write_all(&random_bytes(9, 100 << 10)).unwrap();
    drop(f);
    let second = backup_inline(&env, &src, "8");
    let id2 = second["id"].as_str().unwrap().to_owned();
    let diff = env.ok(&["diff", &id1, &id2]);
    assert!(diff.contains("big"), "{diff}");
    assert!(!diff.contains("sparse"), "{diff}");

    if require_fuse("reading a file of list blobs through the mount") {
        let m = env.mount();
        let dir = under(&m.snapshot(&second), &src);
        for f in ["big", "sparse", "small"] {
            assert_eq!(hash_file(&dir.join(f)), hash_file(&src.join(f)), "{f}");
        }
        assert_eq!(
            fs::metadata(dir.join("big")).unwrap().len(),
            fs::metadata(src.join("big")).unwrap().len()
        );
    }

    // Forget the first snapshot and prune everything it alone used: the second keeps
    // its list blobs, and an unchanged backup after that stores nothing new.
    env.ok(&["forget", "--keep-last", "1"]);
    let left: Vec<Value> = env.json(&["snapshots"]).as_array().unwrap().clone();
    assert_eq!(left.len(), 1);
    assert_eq!(left[0]["id"].as_str(), Some(id2.as_str()));
    env.ok(&["prune", "--grace", "0", "--max-unused", "0%"]);
    env.ok(&["check", "--read-data"]);
    assert_restores(&env, &second, &src);
    // (Only trees of the directories above the source may be new: their times moved.)
    let again = &backup_inline(&env, &src, "8")["summary"];
    assert_eq!(again["files_unchanged"], 3, "{again}");
    assert_eq!(again["bytes_read"], 0, "{again}");
    assert!(
        again["blobs_new"].as_u64().unwrap() < again["dirs"].as_u64().unwrap(),
        "{again}"
    );
}

#[test]
fn a_format_1_repository_keeps_lists_inline_until_upgraded() {
    let env = Env::without_repo();
    init(&env, &["--format-version", "1"]);
    // The config's body is JSON between a binary header and MAC.
    let cfg = String::from_utf8_lossy(&fs::read(env.repo.join("config")).unwrap()).into_owned();
    assert!(cfg.contains("\"version\": 1"), "{cfg}");
    let src = env.path("src");
    make_source(&src);
    let snap = backup_inline(&env, &src, "8");
    // No list blobs in format 1, whatever the limit.
    assert_eq!(blobs(&env), blobs_with_lists_inline(&src));
    assert_restores(&env, &snap, &src);
    env.ok(&["check", "--read-data"]);

    // Upgraded, it is format 2: the next backup moves the long lists into list blobs
    // (the big file's ~190 extents make ~24 of them), and both snapshots read back.
    let up = env.json(&["upgrade"]);
    assert_eq!((up["from"].as_u64(), up["to"].as_u64()), (Some(1), Some(2)));
    let cfg = String::from_utf8_lossy(&fs::read(env.repo.join("config")).unwrap()).into_owned();
    assert!(cfg.contains("\"version\": 2"), "{cfg}");
    assert_eq!(env.json(&["upgrade"])["upgraded"], false);
    let after = backup_inline(&env, &src, "8");
    assert_eq!(after["summary"]["files_unchanged"], 3);
    assert!(
        after["summary"]["blobs_new"].as_u64().unwrap() > 20,
        "{after}"
    );
    env.ok(&["check", "--read-data"]);
    assert_restores(&env, &snap, &src);
    assert_restores(&env, &after, &src);
    // A version this program cannot create is refused.
    let bad = Env::without_repo();
    let out = bad.run(&["init", "--format-version", "3"]);
    assert_eq!(out.status.code(), Some(2));
}
