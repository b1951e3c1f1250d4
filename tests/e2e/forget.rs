//! `repo forget`: keep rules per group; a dry run removes nothing; data stays.

use std::fs;

use crate::support::*;

#[test]
fn forget_keeps_what_the_rules_name_and_nothing_else() {
    let env = Env::new();
    let (a, b) = (env.path("a"), env.path("b"));
    fs::create_dir_all(&a).unwrap();
    fs::create_dir_all(&b).unwrap();
    let mut ids = Vec::new();
    for i in 0..4 {
        fs::write(a.join("f"), format!("version {i}")).unwrap();
        let tag = if i == 0 { "--tag=golden" } else { "--tag=x" };
        let v = env.json(&["backup", a.to_str().unwrap(), tag]);
        ids.push(v["snapshot"]["id"].as_str().unwrap().to_owned());
    }
    let other = env.backup(&[&b])["id"].as_str().unwrap().to_owned();
    let count = || env.json(&["snapshots"]).as_array().unwrap().len();

    let dry = env.json(&[
        "forget",
        "--keep-last",
        "2",
        "--keep-tag",
        "golden",
        "--dry-run",
    ]);
    assert_eq!(count(), 5, "a dry run removed something");
    let decided: Vec<(String, bool, Vec<String>)> = dry["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["id"].as_str().unwrap().to_owned(),
                s["keep"].as_bool().unwrap(),
                s["reasons"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|r| r.as_str().unwrap().to_owned())
                    .collect(),
            )
        })
        .collect();
    let find = |id: &str| decided.iter().find(|d| d.0 == id).unwrap().clone();
    assert_eq!(find(&ids[0]).2, ["tag golden"]);
    assert!(!find(&ids[1]).1);
    assert_eq!(find(&ids[3]).2, ["last"]);
    // The other path is its own group: its one snapshot is kept.
    assert_eq!(find(&other).2, ["last"]);

    env.ok(&["forget", "--keep-last", "2", "--keep-tag", "golden"]);
    let left: Vec<String> = env
        .json(&["snapshots"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    let mut want = vec![ids[0].clone(), ids[2].clone(), ids[3].clone(), other];
    want.sort();
    let mut got = left.clone();
    got.sort();
    assert_eq!(got, want);
    // What is left restores, and the repository is whole.
    env.ok(&["check", "--read-data"]);
    let t = env.path("t");
    env.ok(&["restore", &ids[0], "--target", t.to_str().unwrap()]);
    assert_eq!(
        fs::read_to_string(under(&t, &a).join("f")).unwrap(),
        "version 0"
    );
    // No rule: refused, nothing removed.
    let out = env.run(&["forget"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(count(), 4);
}

#[test]
fn named_snapshots_are_forgotten_with_a_dry_run_first() {
    let env = Env::new();
    let a = env.path("a");
    fs::create_dir_all(&a).unwrap();
    let mut ids = Vec::new();
    for i in 0..3 {
        fs::write(a.join("f"), format!("version {i}")).unwrap();
        ids.push(env.backup(&[&a])["id"].as_str().unwrap().to_owned());
    }
    let count = || env.json(&["snapshots"]).as_array().unwrap().len();
    // As restic and borg users type it: ids (prefixes), a dry run first.
    let dry = env.json(&["forget", &ids[0][..8], &ids[1], "--dry-run"]);
    assert_eq!(count(), 3, "a dry run removed something");
    let planned: Vec<&str> = dry["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap())
        .collect();
    assert_eq!(planned, [ids[0].as_str(), ids[1].as_str()]);
    assert!(dry["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["keep"] == false && s["reasons"][0] == "named"));
    let out = env.ok(&["forget", &ids[0][..8], &ids[1], "--prune"]);
    assert!(out.contains("removed 2 of 2 snapshots"), "{out}");
    let left: Vec<String> = env
        .json(&["snapshots"])
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(left, [ids[2].clone()]);
    env.ok(&["check", "--read-data"]);
    // `latest` works too; an unknown id, or an ambiguous prefix, removes nothing.
    let out = env.run(&["forget", "latest", "ffffffff"]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("no snapshot with id ffffffff"),
        "{}",
        stderr(&out)
    );
    assert_eq!(count(), 1);
    // Names and keep rules do not mix.
    let out = env.run(&["forget", "latest", "--keep-last", "1"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not both"), "{}", stderr(&out));
    env.ok(&["forget", "latest"]);
    assert_eq!(count(), 0);
}
