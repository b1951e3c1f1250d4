//! Backups restore byte for byte, with their metadata.

use std::fs;
use std::os::unix::fs::MetadataExt;

use crate::support::*;

#[test]
fn a_tree_with_every_kind_of_entry_restores_identically() {
    let env = Env::new();
    let src = env.path("src");
    make_everything(&src);
    let snap = env.backup(&[&src]);
    let sum = &snap["summary"];
    // Holes are not read: 1 GiB apparent, ~5.2 MiB of data in all.
    assert!(sum["bytes_read"].as_u64().unwrap() < 8 << 20, "{sum}");
    assert_eq!(sum["errors"], 0);
    assert_eq!(snap["paths"][0], src.to_str().unwrap());

    let target = env.path("restore");
    env.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    let copy = under(&target, &src);
    assert_same_tree(&src, &copy);
    // Sparse files stay sparse.
    let md = fs::metadata(copy.join("sparse.img")).unwrap();
    assert_eq!(md.len(), 1 << 30);
    assert!(
        md.blocks() * 512 < 4 << 20,
        "restored sparse file allocates {} bytes",
        md.blocks() * 512
    );
    // The directories above the backed-up path carry their real metadata.
    let parent_md = fs::metadata(under(&target, env.dir.path())).unwrap();
    assert_eq!(
        parent_md.mode() & 0o7777,
        fs::metadata(env.dir.path()).unwrap().mode() & 0o7777
    );
}

#[test]
fn restore_include_restores_only_that_path() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("keep/inner")).unwrap();
    fs::create_dir_all(src.join("skip")).unwrap();
    fs::write(src.join("keep/inner/a"), b"a").unwrap();
    fs::write(src.join("skip/b"), b"b").unwrap();
    fs::write(src.join("top"), b"t").unwrap();
    env.backup(&[&src]);
    let target = env.path("out");
    let include = src.join("keep");
    env.ok(&[
        "restore",
        "latest",
        "--target",
        target.to_str().unwrap(),
        "--include",
        include.to_str().unwrap(),
    ]);
    let copy = under(&target, &src);
    assert_eq!(fs::read(copy.join("keep/inner/a")).unwrap(), b"a");
    assert!(!copy.join("skip").exists());
    assert!(!copy.join("top").exists());
    let missing = env.run(&[
        "restore",
        "latest",
        "--target",
        target.to_str().unwrap(),
        "--include",
        "/no/such/path",
    ]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not in the snapshot"));
}

#[test]
fn a_stream_backs_up_from_stdin_and_comes_back_by_cat_and_restore() {
    use std::io::Write;
    let env = Env::new();
    let data = random_bytes(99, 20 * 1024 * 1024 + 5);
    let mut child = env
        .cmd()
        .args([
            "backup", "--stdin", "--name", "db.sql", "--tag", "nightly", "--json",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(&data).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["snapshot"]["kind"], "stream");
    assert_eq!(v["snapshot"]["name"], "db.sql");
    assert_eq!(v["snapshot"]["summary"]["total_bytes"], data.len() as u64);

    let cat = env
        .cmd()
        .args(["cat", "latest", "--name", "db.sql"])
        .output()
        .unwrap();
    assert!(cat.status.success());
    assert!(cat.stdout == data, "cat differs from the stream");
    let target = env.path("out");
    env.ok(&[
        "restore",
        "latest",
        "--tag",
        "nightly",
        "--target",
        target.to_str().unwrap(),
    ]);
    assert!(fs::read(target.join("db.sql")).unwrap() == data);

    let bad = env
        .cmd()
        .args(["backup", "--stdin", "--name", "../x"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

#[test]
fn backup_paths_are_recorded_absolute_and_clean() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("x")).unwrap();
    fs::write(src.join("x/f"), b"f").unwrap();
    let messy = format!("{}/x/../x/./", src.display());
    let snap = env.json(&["backup", &messy])["snapshot"].clone();
    assert_eq!(snap["paths"][0], src.join("x").to_str().unwrap());
}
