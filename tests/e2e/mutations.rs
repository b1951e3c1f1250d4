//! A single mutation of a repository file, through the `repo` binary: every command that
//! reads (snapshots, ls, cat, diff, stats, restore, check, mount) ends in a clear error
//! or gives the right bytes. Never a panic (exit 101) or a crash (a signal), never a hang,
//! never exit 0 with wrong bytes. The engine's proptest (engine/tests/mutations.rs)
//! covers many more mutations; this covers the commands.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n.div_ceil(8))
            .flat_map(|_| self.next().to_le_bytes())
            .take(n)
            .collect()
    }
}

/// Runs a command with a time limit; a panic, a crash or a hang fails the test.
fn bounded(what: &str, cmd: &mut Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = std::sync::mpsc::channel();
    // Output is read as it comes (a full pipe would stall the child), on a thread.
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(out) => out.unwrap(),
        Err(_) => {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            panic!("{what}: still running after 120 s (a hang)");
        }
    };
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code().is_some()
            && out.status.code() != Some(101)
            && !err.contains("panicked at"),
        "{what}: crashed ({}): {err}",
        out.status
    );
    if !out.status.success() {
        // The message is on stderr, or (a check's report) on stdout.
        assert!(
            !err.trim().is_empty() || !out.stdout.is_empty(),
            "{what}: failed without a message"
        );
    }
    out
}

/// The files of a source tree: (relative path, content), sorted.
type Files = Vec<(String, Vec<u8>)>;

/// The files of a source tree.
fn tree_of(dir: &Path) -> Files {
    let mut v: Vec<_> = walk_files(dir)
        .into_iter()
        .map(|p| {
            let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
            (rel, fs::read(&p).unwrap())
        })
        .collect();
    v.sort();
    v
}

fn mutate(rng: &mut Rng, content: &mut Vec<u8>) -> String {
    let len = content.len().max(1);
    match rng.below(5) {
        0 => {
            let at = rng.below(len);
            if let Some(b) = content.get_mut(at) {
                *b ^= 1 << rng.below(8);
            }
            format!("bit flipped at {at}")
        }
        1 => {
            let to = rng.below(len);
            content.truncate(to);
            format!("truncated to {to}")
        }
        2 => {
            let n = 1 + rng.below(100);
            content.extend(rng.bytes(n));
            format!("extended by {n}")
        }
        3 => {
            let at = rng.below(len);
            let n = 1 + rng.below(40);
            let g = rng.bytes(n);
            for (i, b) in g.iter().enumerate() {
                if let Some(c) = content.get_mut(at + i) {
                    *c = *b;
                }
            }
            format!("{} bytes of garbage at {at}", g.len())
        }
        _ => {
            let at = rng.below(len) & !3;
            for i in at..(at + 8).min(content.len()) {
                content[i] = 0xff;
            }
            format!("huge field at {at}")
        }
    }
}

fn every_command_reads_a_mutated_repository_safely(encryption: &str, seed: u64) {
    let env = Env::without_repo();
    env.ok(&["init", "--encryption", encryption, "--pack-size", "1M"]);
    let src = env.path("src");
    let mut rng = Rng(seed);
    fs::create_dir_all(src.join("sub")).unwrap();
    for i in 0..6 {
        let n = rng.below(400_000);
        fs::write(
            src.join(if i % 2 == 0 { "sub" } else { "." })
                .join(format!("f{i}")),
            rng.bytes(n),
        )
        .unwrap();
    }
    let first = env.backup(&[&src])["id"].as_str().unwrap().to_owned();
    let first_tree = tree_of(&src);
    fs::write(src.join("f1"), rng.bytes(123_456)).unwrap();
    let second = env.backup(&[&src])["id"].as_str().unwrap().to_owned();
    let second_tree = tree_of(&src);
    let snaps = [(first, first_tree), (second, second_tree)];
    let pristine = env.path("pristine");
    run_ok(Command::new("cp").arg("-a").arg(&env.repo).arg(&pristine));
    // This host's cache of the repository (index, manifests) starts each case as it was.
    let pristine_cache = env.path("pristine-cache");
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(env.cache_dir())
            .arg(&pristine_cache),
    );
    let files: Vec<PathBuf> = walk_files(&pristine)
        .into_iter()
        .filter(|p| !p.to_string_lossy().contains("index.sqlite"))
        .collect();
    let under_target = |t: &Path| t.join(src.strip_prefix("/").unwrap());
    for case in 0..40 {
        // A fresh copy, one file mutated.
        fs::remove_dir_all(&env.repo).unwrap();
        run_ok(Command::new("cp").arg("-a").arg(&pristine).arg(&env.repo));
        fs::remove_dir_all(env.cache_dir()).unwrap();
        run_ok(
            Command::new("cp")
                .arg("-a")
                .arg(&pristine_cache)
                .arg(env.cache_dir()),
        );
        let victim = &files[rng.below(files.len())];
        let rel = victim.strip_prefix(&pristine).unwrap();
        let path = env.repo.join(rel);
        let mut content = fs::read(&path).unwrap();
        let how = mutate(&mut rng, &mut content);
        fs::write(&path, &content).unwrap();
        if case % 2 == 0 {
            // Half the cases without the index: it is rebuilt from the mutated packs.
            env.remove_index();
        }
        let what = |cmd: &str| {
            format!(
                "{encryption} case {case}: {} {how}: repo {cmd}",
                rel.display()
            )
        };
        let run = |args: &[&str]| bounded(&what(&args.join(" ")), env.cmd().args(args));
        run(&["snapshots", "--json"]);
        run(&["stats"]);
        run(&["diff", &snaps[0].0, &snaps[1].0]);
        let mut all_ok = true;
        for (id, tree) in &snaps {
            if !run(&["ls", "-l", id]).status.success() {
                all_ok = false;
            }
            for (file, want) in tree {
                let p = src.join(file);
                let out = run(&["cat", id, p.to_str().unwrap()]);
                if out.status.success() {
                    assert!(
                        out.stdout == *want,
                        "{}: exit 0 with wrong bytes",
                        what(&format!("cat {file}"))
                    );
                } else {
                    all_ok = false;
                }
            }
            let target = env.path("restored");
            let _ = fs::remove_dir_all(&target);
            let out = run(&["restore", id, "--target", target.to_str().unwrap()]);
            match out.status.code() {
                Some(0) => assert_eq!(
                    &tree_of(&under_target(&target)),
                    tree,
                    "{}: exit 0 with a different tree",
                    what("restore")
                ),
                // Partial: every file not named in a warning is exact.
                Some(3) => {
                    all_ok = false;
                    let err = String::from_utf8_lossy(&out.stderr).into_owned();
                    for (file, data) in tree_of(&under_target(&target)) {
                        let want = tree.iter().find(|(f, _)| *f == file).map(|(_, d)| d);
                        assert!(
                            want == Some(&data) || err.contains(&file),
                            "{}: {file} restored wrong and not named: {err}",
                            what("restore")
                        );
                    }
                }
                _ => all_ok = false,
            }
        }
        let check = run(&["check", "--read-data"]);
        if check.status.success() {
            assert!(
                all_ok,
                "{}: exit 0, yet reads failed",
                what("check --read-data")
            );
        }
        if case % 5 == 0 && is_root() && Path::new("/dev/fuse").exists() {
            read_through_the_mount(&env, &snaps, &src, &what("mount"));
        }
    }
}

/// Mounts the (mutated) repository and reads every file: a read that succeeds whole
/// gives the right bytes; one that fails says EIO.
fn read_through_the_mount(env: &Env, snaps: &[(String, Files)], src: &Path, what: &str) {
    let dir = env.path("mnt");
    fs::create_dir_all(&dir).unwrap();
    let log = env.path("mount.log");
    let mut child = env
        .cmd()
        .arg("mount")
        .arg(&dir)
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !mounted_at(&dir) {
        if let Some(status) = child.try_wait().unwrap() {
            let err = fs::read_to_string(&log).unwrap_or_default();
            assert!(
                status.code().is_some() && status.code() != Some(101),
                "{what}: crashed: {err}"
            );
            assert!(!err.trim().is_empty(), "{what}: failed without a message");
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "{what}: never mounted"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for (id, tree) in snaps {
        let Some(snap_dir) = fs::read_dir(dir.join("snapshots"))
            .into_iter()
            .flatten()
            .map(|e| e.unwrap().path())
            .find(|p| p.to_string_lossy().ends_with(&id[..8]))
        else {
            continue; // its manifest is the damaged file
        };
        for (file, want) in tree {
            let p = snap_dir.join(src.strip_prefix("/").unwrap()).join(file);
            match fs::read(&p) {
                Ok(got) => assert!(
                    got == *want,
                    "{what}: {file} read wrong bytes without an error"
                ),
                Err(e) => assert!(
                    e.raw_os_error() == Some(libc::EIO) || e.kind() == std::io::ErrorKind::NotFound,
                    "{what}: {file}: {e}"
                ),
            }
        }
    }
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{what}: the mount did not stop"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!mounted_at(&dir), "{what}: still mounted");
    let err = fs::read_to_string(&log).unwrap_or_default();
    assert!(
        !err.contains("panicked at"),
        "{what}: the mount panicked: {err}"
    );
}

fn run_ok(cmd: &mut Command) {
    assert!(cmd.status().unwrap().success());
}

#[test]
fn a_mutated_encrypted_repository_fails_clearly_or_reads_right() {
    every_command_reads_a_mutated_repository_safely("aes-256-gcm", 0x0BAD_CAFE);
}

#[test]
fn a_mutated_unencrypted_repository_fails_clearly_or_reads_right() {
    every_command_reads_a_mutated_repository_safely("none", 0xFEED_F00D);
}
