//! `repo check`: structure and data, and what it names when something is damaged.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use crate::support::*;

/// `a` in the first pack, `b` in the second; two snapshots, both holding `a`.
fn two_snapshots(env: &Env) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    write_random(&src.join("a"), 1, 2 << 20);
    env.backup(&[&src]);
    let first_pack = env.data_packs()[0].clone();
    write_random(&src.join("b"), 2, 2 << 20);
    env.backup(&[&src]);
    (src, first_pack)
}

#[test]
fn a_healthy_repository_checks_clean() {
    let env = Env::new();
    two_snapshots(&env);
    for args in [
        &["check"][..],
        &["check", "--read-data"],
        &["check", "--read-data-subset", "1/2"],
    ] {
        let out = env.run(args);
        assert_eq!(
            out.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stdout)
        );
    }
    let j = env.json(&["check", "--read-data"]);
    assert_eq!(j["ok"], true);
    assert_eq!(j["snapshots"], 2);
    assert_eq!(j["packs_read"], j["packs"]);
    assert!(j["problems"].as_array().unwrap().is_empty());
    // Bad subsets are usage errors.
    assert_eq!(
        env.run(&["check", "--read-data-subset", "0/3"])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        env.run(&["check", "--read-data-subset", "4/3"])
            .status
            .code(),
        Some(2)
    );
}

#[test]
fn read_data_names_the_damaged_pack_blob_and_files() {
    let env = Env::new();
    let (src, pack) = two_snapshots(&env);
    let mut bytes = fs::read(&pack).unwrap();
    bytes[5000] ^= 0x10;
    fs::set_permissions(&pack, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&pack, &bytes).unwrap();
    // The structure is intact: only reading the data finds it.
    assert_eq!(env.run(&["check"]).status.code(), Some(0));
    let out = env.run(&["check", "--read-data", "--json"]);
    assert_eq!(out.status.code(), Some(14));
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pack_name = pack.file_name().unwrap().to_str().unwrap();
    let problems = j["problems"].to_string();
    assert!(problems.contains(pack_name), "{problems}");
    let affected: Vec<String> = j["affected"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["path"].as_str().unwrap().to_owned())
        .collect();
    let a = src.join("a").to_str().unwrap().to_owned();
    assert_eq!(
        affected,
        vec![a.clone(), a],
        "both snapshots need a, none needs b"
    );
}

#[test]
fn a_truncated_or_missing_pack_fails_the_structure_check() {
    let env = Env::new();
    let (src, pack) = two_snapshots(&env);
    let f = fs::OpenOptions::new().write(true).open(&pack).unwrap();
    f.set_len(100).unwrap();
    drop(f);
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(14));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains(pack.file_name().unwrap().to_str().unwrap()),
        "{text}"
    );
    assert!(
        text.contains(&format!("{}", src.join("a").display())),
        "{text}"
    );
    fs::remove_file(&pack).unwrap();
    let out = env.run(&["check"]);
    assert_eq!(out.status.code(), Some(14));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        text.contains("missing") && text.contains(&format!("{}", src.join("a").display())),
        "{text}"
    );
    assert!(
        !text.contains(&format!("{}", src.join("b").display())),
        "{text}"
    );
}
