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

/// What someone who can write the repository's storage, and knows no password, can do
/// to it: plant a key file that opens without a password (holding a master key of
/// their own) and re-MAC `config` with that key, optionally turning encryption off.
struct Planted {
    mac_key: [u8; 32],
}

impl Planted {
    fn into(env: &Env, encryption_off: bool) -> Self {
        let mut key = [0u8; 96];
        for (i, b) in key.iter_mut().enumerate() {
            *b = (i as u8).wrapping_mul(37) ^ 0x5a;
        }
        let mut mac_key = [0u8; 32];
        mac_key.copy_from_slice(&key[64..]);
        let keyfile = serde_json::json!({
            "version": 1,
            "created": "2026-01-01T00:00:00Z",
            "host": "storage",
            "user": "mallory",
            "kdf": { "algorithm": "none", "salt": "" },
            "data": hex(&key),
        });
        fs::write(
            env.repo.join("keys").join("0".repeat(64)),
            serde_json::to_vec(&keyfile).unwrap(),
        )
        .unwrap();
        // config: magic (8) | body length u32 LE | JSON body | keyed BLAKE3 MAC (32).
        let config = fs::read(env.repo.join("config")).unwrap();
        let len = u32::from_le_bytes(config[8..12].try_into().unwrap()) as usize;
        let mut body: serde_json::Value = serde_json::from_slice(&config[12..12 + len]).unwrap();
        if encryption_off {
            body["encryption"] = "none".into();
        }
        let body = serde_json::to_vec_pretty(&body).unwrap();
        let mut out = config[..8].to_vec();
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&body);
        let mac = blake3::keyed_hash(&mac_key, &out);
        out.extend_from_slice(mac.as_bytes());
        fs::write(env.repo.join("config"), out).unwrap();
        Self { mac_key }
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Every file of the repository with its content, to show that a refused command wrote
/// nothing.
fn repo_files(env: &Env) -> Vec<(std::path::PathBuf, Vec<u8>)> {
    let mut v: Vec<_> = walk_files(&env.repo)
        .into_iter()
        .filter(|p| !p.to_string_lossy().contains("index.sqlite"))
        .map(|p| {
            let c = fs::read(&p).unwrap();
            (p, c)
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_planted_key_that_opens_without_a_password_is_refused_even_on_a_new_host() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("secret"), b"attack at dawn").unwrap();
    env.backup(&[&src]);
    let planted = Planted::into(&env, false);
    let before = repo_files(&env);
    // This host, and a host that never saw the repository: both refuse, as damage.
    for state in [None, Some(env.path("other-host-state"))] {
        let mut c = env.cmd();
        if let Some(s) = &state {
            c.env("CAIRN_STATE_DIR", s);
        }
        let out = c.args(["backup", src.to_str().unwrap()]).output().unwrap();
        assert_eq!(out.status.code(), Some(14), "{state:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("planted") && err.contains("keys/0000"),
            "{err}"
        );
    }
    assert_eq!(
        repo_files(&env),
        before,
        "a refused command wrote to the repository"
    );
    let _ = planted.mac_key;
    // Removing the planted key is not enough: the config's MAC is the attacker's.
    fs::remove_file(env.repo.join("keys").join("0".repeat(64))).unwrap();
    let out = env.run(&["snapshots"]);
    assert_eq!(out.status.code(), Some(14), "{}", stderr(&out));
    assert!(stderr(&out).contains("MAC mismatch"), "{}", stderr(&out));
}

#[test]
fn a_repository_whose_encryption_was_turned_off_is_refused_where_it_is_known() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("secret"), b"attack at dawn").unwrap();
    env.backup(&[&src]);
    let known = env.ok(&["trust"]);
    assert!(known.contains("unchanged"), "{known}");
    Planted::into(&env, true);
    let before = repo_files(&env);
    // The key file now matches the config (both say: no encryption), so the repository
    // opens with the planted key; this host knew it encrypted, under another key.
    for args in [
        &["backup", src.to_str().unwrap()][..],
        &["snapshots"][..],
        &["restore", "latest", "--target", "/nonexistent"][..],
    ] {
        let out = env.run(args);
        assert_eq!(out.status.code(), Some(15), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(
            err.contains("encryption was aes-256-gcm, now none") && err.contains("master key was"),
            "{err}"
        );
        assert!(err.contains("repo trust --accept"), "{err}");
    }
    assert_eq!(
        repo_files(&env),
        before,
        "a refused command wrote to the repository"
    );
    // `repo trust` shows the change and exits 15; accepting it is a deliberate act.
    let out = env.run(&["trust"]);
    assert_eq!(out.status.code(), Some(15));
    assert!(String::from_utf8_lossy(&out.stdout).contains("CHANGED"));
    env.ok(&["trust", "--accept"]);
    env.ok(&["snapshots"]);
    let listed = env.json(&["trust", "--list"]);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["encryption"], "none");
}

#[test]
fn a_repository_recreated_by_init_is_accepted_and_a_moved_one_is_still_known() {
    let env = Env::new();
    let first = env.json(&["trust", "--list"]);
    assert_eq!(
        first.as_array().unwrap().len(),
        1,
        "init records it: {first}"
    );
    // Re-created on purpose by this host: init replaces what was known here.
    fs::remove_dir_all(&env.repo).unwrap();
    env.ok(&["init"]);
    env.ok(&["snapshots"]);
    // Moved: the same repository (same id and key) elsewhere is fine.
    let moved = env.path("moved");
    fs::rename(&env.repo, &moved).unwrap();
    env.cmd()
        .args(["--repo", moved.to_str().unwrap(), "snapshots"])
        .output()
        .map(|o| assert!(o.status.success(), "{}", stderr(&o)))
        .unwrap();
    // A different repository at the old place, made behind this host's back (another
    // host's init, a restore from elsewhere), is refused until accepted.
    let other = Env::new();
    fs::rename(&other.repo, &env.repo).unwrap();
    let out = env.run(&["snapshots"]);
    assert_eq!(out.status.code(), Some(15), "{}", stderr(&out));
    assert!(stderr(&out).contains("its id was"), "{}", stderr(&out));
}
