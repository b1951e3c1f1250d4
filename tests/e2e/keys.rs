//! Passwords, keys, encryption and file modes.

use std::fs;
use std::os::unix::fs::PermissionsExt;

use crate::support::*;

#[test]
fn several_passwords_open_one_repository_and_keys_can_be_managed() {
    let env = Env::new();
    let pwfile = env.path("second");
    fs::write(&pwfile, "second password\n").unwrap();
    let added = env.json(&[
        "key",
        "add",
        "--new-password-file",
        pwfile.to_str().unwrap(),
    ]);
    let added_id = added["id"].as_str().unwrap().to_owned();
    // Both passwords open it.
    env.ok(&["snapshots"]);
    let by_file = env
        .cmd()
        .env_remove("REPO_PASSWORD")
        .args(["--password-file", pwfile.to_str().unwrap(), "snapshots"])
        .output()
        .unwrap();
    assert!(by_file.status.success());
    let keys = env.json(&["key", "list"]);
    assert_eq!(keys.as_array().unwrap().len(), 2);
    let current: Vec<_> = keys
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["current"] == true)
        .collect();
    assert_eq!(current.len(), 1);
    let first_id = current[0]["id"].as_str().unwrap().to_owned();
    // The key in use cannot be removed.
    let refused = env.run(&["key", "remove", &first_id[..8]]);
    assert!(!refused.status.success());
    // Opened with the second password, the first key can go.
    let removed = env
        .cmd()
        .env_remove("REPO_PASSWORD")
        .env("REPO_PASSWORD_FILE", &pwfile)
        .args(["key", "remove", &first_id[..8]])
        .output()
        .unwrap();
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    assert_eq!(env.run(&["snapshots"]).status.code(), Some(12));
    // passwd replaces the key in use.
    let third = env.path("third");
    fs::write(&third, "third").unwrap();
    let out = env
        .cmd()
        .env("REPO_PASSWORD", "second password")
        .args([
            "key",
            "passwd",
            "--new-password-file",
            third.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        env.cmd()
            .env("REPO_PASSWORD", "second password")
            .arg("snapshots")
            .output()
            .unwrap()
            .status
            .code(),
        Some(12)
    );
    assert!(env
        .cmd()
        .env("REPO_PASSWORD", "third")
        .arg("snapshots")
        .output()
        .unwrap()
        .status
        .success());
    let keys = env
        .cmd()
        .env("REPO_PASSWORD", "third")
        .args(["key", "list", "--json"])
        .output()
        .unwrap();
    let keys: serde_json::Value = serde_json::from_slice(&keys.stdout).unwrap();
    assert_eq!(keys.as_array().unwrap().len(), 1);
    assert_ne!(keys[0]["id"], added_id);
}

#[test]
fn every_password_source_works() {
    let env = Env::new();
    let pwfile = env.path("pw");
    fs::write(&pwfile, format!("{PASSWORD}\n")).unwrap();
    let base = || {
        let mut c = env.cmd();
        c.env_remove("REPO_PASSWORD");
        c
    };
    assert!(base()
        .env("REPO_PASSWORD_FILE", &pwfile)
        .arg("snapshots")
        .output()
        .unwrap()
        .status
        .success());
    assert!(base()
        .args(["--password-file", pwfile.to_str().unwrap(), "snapshots"])
        .output()
        .unwrap()
        .status
        .success());
    let cmd = format!("cat '{}'", pwfile.display());
    assert!(base()
        .env("REPO_PASSWORD_COMMAND", &cmd)
        .arg("snapshots")
        .output()
        .unwrap()
        .status
        .success());
    // A config file naming repository and password file.
    let cfg = env.path("config");
    fs::write(
        &cfg,
        format!(
            "repository = {}\npassword_file = {}\n",
            env.repo.display(),
            pwfile.display()
        ),
    )
    .unwrap();
    let out = base()
        .env_remove("REPO_REPOSITORY")
        .env("REPO_CONFIG", &cfg)
        .arg("snapshots")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No source and no terminal: a clear error, not a hang.
    let out = base().arg("snapshots").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no password given"));
    // A failing password command is reported.
    let out = base()
        .env("REPO_PASSWORD_COMMAND", "false")
        .arg("snapshots")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("password command"));
}

#[test]
fn repository_files_are_owner_only_and_contents_are_encrypted() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    let marker = "CAIRN-PLAINTEXT-MARKER-0123456789";
    fs::write(src.join(marker), marker.repeat(1000)).unwrap();
    env.backup(&[&src]);
    for f in walk_files(&env.repo) {
        let mode = fs::metadata(&f).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode & 0o077, 0, "{} is mode {mode:o}", f.display());
        if !f.to_string_lossy().contains("index.sqlite") {
            let bytes = fs::read(&f).unwrap();
            let hay = String::from_utf8_lossy(&bytes);
            assert!(
                !hay.contains(marker) && !hay.contains("CAIRN-PLAINTEXT"),
                "{} holds plaintext",
                f.display()
            );
        }
    }
    let mut dirs = vec![env.repo.clone()];
    while let Some(d) = dirs.pop() {
        assert_eq!(
            fs::metadata(&d).unwrap().permissions().mode() & 0o077,
            0,
            "{}",
            d.display()
        );
        for e in fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                dirs.push(e.path());
            }
        }
    }
}

#[test]
fn an_unencrypted_repository_needs_no_password() {
    let env = Env::without_repo();
    let out = env
        .cmd()
        .env_remove("REPO_PASSWORD")
        .args(["init", "--encryption", "none"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"plain but verified").unwrap();
    let b = env
        .cmd()
        .env_remove("REPO_PASSWORD")
        .args(["backup", src.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(b.status.success());
    let target = env.path("out");
    let r = env
        .cmd()
        .env_remove("REPO_PASSWORD")
        .args(["restore", "latest", "--target", target.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(r.status.success());
    assert_eq!(
        fs::read(under(&target, &src).join("f")).unwrap(),
        b"plain but verified"
    );
    // key add makes no sense here.
    assert!(!env
        .cmd()
        .env_remove("REPO_PASSWORD")
        .args(["key", "add", "--new-password-file", "/dev/null"])
        .output()
        .unwrap()
        .status
        .success());
}
