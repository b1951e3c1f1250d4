//! Helpers: a scratch repository, running `repo`, making test data, comparing trees.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use serde_json::Value;

pub const PASSWORD: &str = "correct horse battery staple";

pub fn repo_bin() -> &'static str {
    env!("CARGO_BIN_EXE_repo")
}

/// A scratch directory with a repository in `repo/` (created by `init`).
pub struct Env {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
}

impl Env {
    pub fn new() -> Self {
        let env = Self::without_repo();
        env.ok(&["init"]);
        env
    }

    pub fn without_repo() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("cairn-e2e-")
            .tempdir_in(scratch_root())
            .unwrap();
        let repo = dir.path().join("repo");
        Self { dir, repo }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `repo` with this repository and password in its environment, and nothing else
    /// from the user's (no config file, no other password source).
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(repo_bin());
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            .env("REPO_CONFIG", self.dir.path().join("no-config"))
            .env("REPO_REPOSITORY", &self.repo)
            .env("REPO_PASSWORD", PASSWORD)
            .env("CAIRN_TESTONLY_WEAK_KDF", "1")
            .stdin(Stdio::null());
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "repo {args:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    pub fn json(&self, args: &[&str]) -> Value {
        let mut a = args.to_vec();
        a.push("--json");
        serde_json::from_str(&self.ok(&a)).unwrap()
    }

    /// Backs up `paths` and returns the JSON of the new snapshot.
    pub fn backup(&self, paths: &[&Path]) -> Value {
        let mut args = vec!["backup".to_owned()];
        args.extend(paths.iter().map(|p| p.to_str().unwrap().to_owned()));
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        self.json(&a)["snapshot"].clone()
    }

    pub fn repo_bytes(&self) -> u64 {
        dir_bytes(&self.repo.join("data")) + dir_bytes(&self.repo.join("snapshots"))
    }

    /// Pack files, oldest first.
    pub fn packs(&self) -> Vec<PathBuf> {
        let mut v: Vec<(std::time::SystemTime, PathBuf)> = walk_files(&self.repo.join("data"))
            .into_iter()
            .map(|p| (fs::metadata(&p).unwrap().modified().unwrap(), p))
            .collect();
        v.sort();
        v.into_iter().map(|(_, p)| p).collect()
    }
}

/// Where scratch data goes: a real disk (not tmpfs), so sparse files and xattrs behave.
pub fn scratch_root() -> PathBuf {
    let p = std::env::var_os("CAIRN_TEST_SCRATCH").map_or_else(std::env::temp_dir, PathBuf::from);
    fs::create_dir_all(&p).unwrap();
    p
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// True when the test may run; in CI a missing requirement is a failure, not a skip.
pub fn require_root(what: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{what} needs root, and CI must run it"
    );
    eprintln!("SKIPPED (not root): {what}");
    false
}

pub fn dir_bytes(p: &Path) -> u64 {
    walk_files(p)
        .iter()
        .map(|f| fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum()
}

pub fn walk_files(p: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(p) {
        for e in rd.flatten() {
            let t = e.file_type().unwrap();
            if t.is_dir() {
                out.extend(walk_files(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

/// Deterministic pseudo-random bytes (xorshift), fast enough for gigabytes.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

pub fn write_random(path: &Path, seed: u64, len: usize) {
    let mut f = fs::File::create(path).unwrap();
    let mut done = 0;
    let mut s = seed;
    while done < len {
        let n = (len - done).min(16 << 20);
        f.write_all(&random_bytes(s, n)).unwrap();
        s += 1;
        done += n;
    }
}

pub fn hash_file(p: &Path) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update_reader(fs::File::open(p).unwrap()).unwrap();
    h.finalize()
}

/// Asserts that `b` is a faithful copy of `a`: same entries, kinds, content, modes,
/// owners, mtimes, symlink targets, xattrs, device numbers, and the same hard-link
/// grouping.
pub fn assert_same_tree(a: &Path, b: &Path) {
    let mut links_a: HashMap<u64, PathBuf> = HashMap::new();
    let mut links_b: HashMap<u64, PathBuf> = HashMap::new();
    compare(a, b, Path::new(""), &mut links_a, &mut links_b);
}

fn compare(
    a: &Path,
    b: &Path,
    rel: &Path,
    la: &mut HashMap<u64, PathBuf>,
    lb: &mut HashMap<u64, PathBuf>,
) {
    let ma = fs::symlink_metadata(a).unwrap();
    let mb = fs::symlink_metadata(b)
        .unwrap_or_else(|e| panic!("{}: missing in the copy: {e}", rel.display()));
    let ta = ma.file_type();
    let tb = mb.file_type();
    let what = rel.display();
    assert_eq!(
        (
            ta.is_dir(),
            ta.is_file(),
            ta.is_symlink(),
            ta.is_fifo(),
            ta.is_char_device(),
            ta.is_block_device()
        ),
        (
            tb.is_dir(),
            tb.is_file(),
            tb.is_symlink(),
            tb.is_fifo(),
            tb.is_char_device(),
            tb.is_block_device()
        ),
        "{what}: kind"
    );
    assert_eq!((ma.uid(), ma.gid()), (mb.uid(), mb.gid()), "{what}: owner");
    if !ta.is_symlink() {
        assert_eq!(ma.mode(), mb.mode(), "{what}: mode");
    }
    assert_eq!(
        (ma.mtime(), ma.mtime_nsec()),
        (mb.mtime(), mb.mtime_nsec()),
        "{what}: mtime"
    );
    let xa = xattrs(a);
    assert_eq!(xa, xattrs(b), "{what}: xattrs");
    if ta.is_symlink() {
        assert_eq!(
            fs::read_link(a).unwrap(),
            fs::read_link(b).unwrap(),
            "{what}: target"
        );
    } else if ta.is_file() {
        assert_eq!(ma.len(), mb.len(), "{what}: size");
        assert_eq!(hash_file(a), hash_file(b), "{what}: content");
        if ma.nlink() > 1 {
            let first_a = la.entry(ma.ino()).or_insert_with(|| rel.to_owned()).clone();
            let first_b = lb.entry(mb.ino()).or_insert_with(|| rel.to_owned()).clone();
            assert_eq!(first_a, first_b, "{what}: hard-link grouping");
        }
    } else if ta.is_char_device() || ta.is_block_device() {
        assert_eq!(ma.rdev(), mb.rdev(), "{what}: device number");
    } else if ta.is_dir() {
        let names = |p: &Path| {
            let mut v: Vec<_> = fs::read_dir(p)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            v.sort();
            v
        };
        let na = names(a);
        assert_eq!(na, names(b), "{what}: entries");
        for n in na {
            compare(&a.join(&n), &b.join(&n), &rel.join(&n), la, lb);
        }
    }
}

fn xattrs(p: &Path) -> Vec<(std::ffi::OsString, Option<Vec<u8>>)> {
    let mut v: Vec<_> = xattr::list(p)
        .map(|names| {
            names
                .map(|n| {
                    let val = xattr::get(p, &n).ok().flatten();
                    (n, val)
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Where a backed-up absolute path lands under a restore target.
pub fn under(target: &Path, abs: &Path) -> PathBuf {
    target.join(abs.strip_prefix("/").unwrap())
}
