//! Bad input gets a clear error and loses nothing.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::support::*;

#[test]
fn a_wrong_password_is_refused_with_its_exit_code_and_is_never_echoed() {
    let env = Env::new();
    let out = env
        .cmd()
        .env("REPO_PASSWORD", "hunter2-wrong")
        .args(["snapshots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(12));
    let err = stderr(&out);
    assert!(err.contains("wrong password"), "{err}");
    assert!(!err.contains("hunter2"), "the password leaked into: {err}");
}

#[test]
fn a_path_that_is_not_a_repository_says_so() {
    let env = Env::without_repo();
    fs::create_dir_all(&env.repo).unwrap();
    let out = env.run(&["snapshots"]);
    assert_eq!(out.status.code(), Some(10));
    assert!(
        stderr(&out).contains("not a cairn repository"),
        "{}",
        stderr(&out)
    );
    let file = env.path("plainfile");
    fs::write(&file, b"x").unwrap();
    let out = env
        .cmd()
        .env("REPO_REPOSITORY", &file)
        .args(["snapshots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(10));
    // A config that is not ours is damage, not a crash.
    fs::write(env.repo.join("config"), b"garbage").unwrap();
    let out = env.run(&["snapshots"]);
    assert_eq!(out.status.code(), Some(14), "{}", stderr(&out));
    // init refuses to overwrite anything.
    let out = env.run(&["init"]);
    assert!(!out.status.success());
    assert_eq!(fs::read(env.repo.join("config")).unwrap(), b"garbage");
}

#[test]
fn a_repository_of_a_newer_format_is_refused_before_any_password() {
    let env = Env::new();
    let cfg = env.repo.join("config");
    let mut bytes = fs::read(&cfg).unwrap();
    let needle = b"\"version\": ";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .expect("version field");
    assert!(bytes[at + needle.len()].is_ascii_digit());
    bytes[at + needle.len()] = b'9';
    fs::write(&cfg, &bytes).unwrap();
    let out = env
        .cmd()
        .env_remove("REPO_PASSWORD")
        .args(["snapshots"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(13), "{}", stderr(&out));
    assert!(stderr(&out).contains("newer"), "{}", stderr(&out));
}

#[test]
fn a_tampered_config_fails_its_mac() {
    let env = Env::new();
    let cfg = env.repo.join("config");
    let text = String::from_utf8(
        fs::read(&cfg)
            .unwrap()
            .split_last_chunk::<32>()
            .unwrap()
            .0
            .to_vec(),
    )
    .unwrap_or_default();
    let mut bytes = fs::read(&cfg).unwrap();
    let pos = text.find("\"compression_level\": 3").unwrap() + "\"compression_level\": ".len();
    bytes[pos] = b'9';
    fs::write(&cfg, &bytes).unwrap();
    let out = env.run(&["snapshots"]);
    assert_eq!(out.status.code(), Some(14));
    assert!(stderr(&out).contains("MAC"), "{}", stderr(&out));
}

/// Two files whose data lives in different packs: `a` in the first, `b` in the second.
fn two_packs(env: &Env) -> (std::path::PathBuf, std::path::PathBuf) {
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    write_random(&src.join("a"), 1, 2 << 20);
    env.backup(&[&src]);
    let first = env.data_packs()[0].clone();
    write_random(&src.join("b"), 2, 2 << 20);
    env.backup(&[&src]);
    (src, first)
}

fn restore_reports_only_a(env: &Env, src: &Path) {
    let target = env.path("out");
    let out = env.run(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{}", src.join("a").display())),
        "the damaged file is not named: {err}"
    );
    assert!(
        !err.contains(&format!("{}", src.join("b").display())),
        "{err}"
    );
    assert_eq!(
        hash_file(&src.join("b")),
        hash_file(&under(&target, src).join("b"))
    );
}

#[test]
fn a_bit_flip_in_a_pack_costs_only_the_file_that_uses_it() {
    let env = Env::new();
    let (src, pack) = two_packs(&env);
    let mut bytes = fs::read(&pack).unwrap();
    bytes[5000] ^= 0x01;
    fs::set_permissions(&pack, fs::Permissions::from_mode(0o600)).unwrap();
    fs::write(&pack, &bytes).unwrap();
    restore_reports_only_a(&env, &src);
}

#[test]
fn a_truncated_pack_costs_only_the_file_that_uses_it() {
    let env = Env::new();
    let (src, pack) = two_packs(&env);
    let f = fs::OpenOptions::new().write(true).open(&pack).unwrap();
    f.set_len(f.metadata().unwrap().len() / 2).unwrap();
    drop(f);
    restore_reports_only_a(&env, &src);
    // The same after the index is rebuilt from what the packs say.
    env.ok(&["index", "rebuild"]);
    let _ = fs::remove_dir_all(env.path("out"));
    restore_reports_only_a(&env, &src);
}

#[test]
fn an_unreadable_file_is_warned_counted_and_the_rest_committed() {
    if !require_root("running repo as another user") {
        return;
    }
    let env = Env::without_repo();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let src = env.path("src");
    fs::create_dir_all(src.join("locked")).unwrap();
    fs::write(src.join("readable"), b"r").unwrap();
    fs::write(src.join("secret"), b"s").unwrap();
    fs::write(src.join("locked/inside"), b"i").unwrap();
    fs::set_permissions(src.join("secret"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::set_permissions(src.join("locked"), fs::Permissions::from_mode(0o700)).unwrap();
    fs::create_dir_all(&env.repo).unwrap();
    nix::unistd::chown(&env.repo, Some(65534.into()), Some(65534.into())).unwrap();
    let as_nobody = |args: &[&str]| {
        let mut c = env.cmd();
        c.uid(65534).gid(65534).args(args);
        c.output().unwrap()
    };
    assert!(as_nobody(&["init"]).status.success());
    let out = as_nobody(&["backup", src.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains("secret") && err.contains("ermission denied"),
        "{err}"
    );
    assert!(err.contains("locked"), "{err}");
    let ls = as_nobody(&["ls", "latest"]);
    let listing = String::from_utf8_lossy(&ls.stdout);
    assert!(listing.contains("/readable"), "{listing}");
    assert!(!listing.contains("/secret"), "{listing}");
}

#[test]
fn a_full_disk_fails_the_backup_without_a_half_snapshot() {
    if !require_root("mounting a small tmpfs") {
        return;
    }
    let env = Env::without_repo();
    fs::create_dir_all(&env.repo).unwrap();
    let st = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=12m", "tmpfs"])
        .arg(&env.repo)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs failed");
    let _guard = UnmountOnDrop(env.repo.clone());
    env.ok(&["init"]);
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("small"), b"fits").unwrap();
    let first = env.backup(&[&src]);
    write_random(&src.join("big"), 3, 40 << 20);
    let out = env.run(&["backup", src.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains("No space left") && err.contains("no snapshot was saved"),
        "{err}"
    );
    // The repository still opens, holds only the first snapshot, and it restores.
    let snaps = env.json(&["snapshots"]);
    assert_eq!(snaps.as_array().unwrap().len(), 1);
    assert_eq!(snaps[0]["id"], first["id"]);
    let leftovers: Vec<_> = walk_files(&env.repo)
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let target = env.path("out");
    env.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_eq!(
        fs::read(under(&target, &src).join("small")).unwrap(),
        b"fits"
    );
}

#[test]
fn a_file_changing_during_the_backup_is_reported_and_the_snapshot_commits() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("steady"), b"steady").unwrap();
    let busy = src.join("busy.log");
    write_random(&busy, 4, 128 << 20);
    let stop = AtomicBool::new(false);
    let out = std::thread::scope(|s| {
        s.spawn(|| {
            let mut f = fs::OpenOptions::new().append(true).open(&busy).unwrap();
            while !stop.load(Ordering::Relaxed) {
                use std::io::Write;
                f.write_all(b"more log\n").unwrap();
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
        });
        let out = env.run(&["backup", src.to_str().unwrap()]);
        stop.store(true, Ordering::Relaxed);
        out
    });
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("changed while being read"),
        "{}",
        stderr(&out)
    );
    let target = env.path("out");
    env.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_eq!(
        fs::read(under(&target, &src).join("steady")).unwrap(),
        b"steady"
    );
    let restored = fs::metadata(under(&target, &src).join("busy.log"))
        .unwrap()
        .len();
    assert!(restored >= 128 << 20);
}

#[test]
fn restore_never_follows_a_symlink_planted_in_the_target() {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("etc")).unwrap();
    fs::write(src.join("etc/passwd"), b"from the backup").unwrap();
    env.backup(&[&src]);
    // The target already holds a symlink where a restored directory goes.
    let outside = env.path("outside");
    fs::create_dir_all(&outside).unwrap();
    let target = env.path("out");
    let planted = under(&target, &src);
    fs::create_dir_all(&planted).unwrap();
    std::os::unix::fs::symlink(&outside, planted.join("etc")).unwrap();
    env.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert!(
        fs::read_dir(&outside).unwrap().next().is_none(),
        "restore wrote through the symlink"
    );
    assert!(fs::symlink_metadata(planted.join("etc")).unwrap().is_dir());
    assert_eq!(
        fs::read(planted.join("etc/passwd")).unwrap(),
        b"from the backup"
    );
}
