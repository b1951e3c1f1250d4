//! Listing and comparing snapshots: `snapshots`, `ls`, `cat`, `diff`, `stats`, selection.

use std::fs;

use crate::support::*;

fn lines(s: &str) -> Vec<&str> {
    s.lines().collect()
}

#[test]
fn snapshots_are_listed_filtered_and_selected() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"1").unwrap();
    let s = src.to_str().unwrap();
    let a = env.json(&["backup", s, "--host", "alpha", "--tag", "daily"])["snapshot"].clone();
    fs::write(src.join("f"), b"22").unwrap();
    let b = env.json(&["backup", s, "--host", "beta", "--tag", "weekly"])["snapshot"].clone();
    let all = env.json(&["snapshots"]);
    let all = all.as_array().unwrap();
    assert_eq!(all.len(), 2);
    for snap in all {
        for field in ["id", "time", "host", "tags", "paths", "kind", "summary"] {
            assert!(snap.get(field).is_some(), "missing {field} in {snap}");
        }
        assert_eq!(snap["kind"], "tree");
    }
    let alpha = env.json(&["snapshots", "--host", "alpha"]);
    assert_eq!(alpha.as_array().unwrap().len(), 1);
    assert_eq!(alpha[0]["id"], a["id"]);
    // `latest` honours the filters; an id prefix works; bad specs are clear errors.
    let cat = env.ok(&["cat", "latest", &format!("{s}/f"), "--tag", "daily"]);
    assert_eq!(cat, "1");
    let cat = env.ok(&["cat", &b["id"].as_str().unwrap()[..6], &format!("{s}/f")]);
    assert_eq!(cat, "22");
    let out = env.run(&["ls", "zz"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a snapshot"));
    let out = env.run(&["ls", "latest", "--host", "nobody"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no snapshot matches"));
    // Text listing has a header, one line per snapshot and a count.
    let text = env.ok(&["snapshots"]);
    assert_eq!(lines(&text).len(), 4, "{text}");
    assert!(text.contains("alpha") && text.contains("weekly"));
}

#[test]
fn ls_lists_a_snapshot_and_escapes_odd_names() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/file"), b"abc").unwrap();
    fs::write(src.join("new\nline"), b"x").unwrap();
    std::os::unix::fs::symlink("d/file", src.join("link")).unwrap();
    env.backup(&[&src]);
    let s = src.to_str().unwrap();
    let out = env.ok(&["ls", "latest", s]);
    let want = [
        s.to_owned(),
        format!("{s}/d"),
        format!("{s}/d/file"),
        format!("{s}/link"),
        format!("{s}/new\\nline"),
    ];
    assert_eq!(
        lines(&out),
        want.iter().map(String::as_str).collect::<Vec<_>>()
    );
    let long = env.ok(&["ls", "-l", "latest", &format!("{s}/link")]);
    assert!(
        long.starts_with("lrwxrwxrwx") && long.trim_end().ends_with("-> d/file"),
        "{long}"
    );
    let json = env.json(&["ls", "latest", &format!("{s}/d")]);
    assert_eq!(json[1]["type"], "file");
    assert_eq!(json[1]["size"], 3);
    let out = env.run(&["ls", "latest", "/not/there"]);
    assert!(!out.status.success());
}

#[test]
fn diff_shows_added_removed_and_modified() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("gone")).unwrap();
    fs::write(src.join("gone/x"), b"x").unwrap();
    fs::write(src.join("same"), b"s").unwrap();
    fs::write(src.join("changes"), b"v1").unwrap();
    let a = env.backup(&[&src]);
    fs::remove_dir_all(src.join("gone")).unwrap();
    fs::write(src.join("changes"), b"v2!").unwrap();
    fs::write(src.join("new"), b"n").unwrap();
    let b = env.backup(&[&src]);
    let s = src.to_str().unwrap();
    let out = env.ok(&["diff", a["id"].as_str().unwrap(), b["id"].as_str().unwrap()]);
    // Only what lies below src: its ancestors (/tmp) change with every test running
    // beside this one.
    let below = format!("{s}/");
    let mut got: Vec<&str> = lines(&out)
        .into_iter()
        .filter(|l| l.contains(&below))
        .collect();
    got.sort_unstable();
    let mut want = vec![
        format!("+    {s}/new"),
        format!("-    {s}/gone"),
        format!("-    {s}/gone/x"),
        format!("M    {s}/changes"),
    ];
    want.sort();
    assert_eq!(got, want);
    let json = env.json(&["diff", a["id"].as_str().unwrap(), b["id"].as_str().unwrap()]);
    assert!(json
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["change"] == "added"));
}

#[test]
fn stats_and_excludes() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("cache")).unwrap();
    fs::create_dir_all(src.join("keep")).unwrap();
    fs::write(src.join("cache/big"), vec![1u8; 100_000]).unwrap();
    fs::write(src.join("keep/a.tmp"), b"t").unwrap();
    fs::write(src.join("keep/a.txt"), b"k").unwrap();
    let s = src.to_str().unwrap();
    let cache = format!("{s}/cache");
    env.ok(&["backup", s, "--exclude", "*.tmp", "--exclude", &cache]);
    let listing = env.ok(&["ls", "latest", s]);
    assert!(listing.contains("a.txt"));
    assert!(
        !listing.contains("a.tmp") && !listing.contains("cache"),
        "{listing}"
    );
    let st = env.json(&["stats"]);
    assert_eq!(st["snapshots"], 1);
    assert!(st["blobs"].as_u64().unwrap() >= 2);
    assert!(st["stored_bytes"].as_u64().unwrap() > 0);
    let one = env.json(&["stats", "latest"]);
    assert_eq!(one["summary"]["files"], 1);
}
