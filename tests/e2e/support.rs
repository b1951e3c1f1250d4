//! Helpers: a scratch repository, running `repo`, making test data, comparing trees.

#![allow(dead_code)]

use std::collections::HashMap;
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;
use serde_json::Value;

pub const PASSWORD: &str = "correct horse battery staple";

pub fn repo_bin() -> &'static str {
    env!("CARGO_BIN_EXE_repo")
}

/// A scratch directory with a repository in `repo/` (created by `init`).
pub struct Env {
    pub dir: tempfile::TempDir,
    pub repo: PathBuf,
    /// More environment for every command (an object store's keys).
    pub extra_env: Vec<(String, String)>,
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
        Self {
            dir,
            repo,
            extra_env: Vec::new(),
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// This host's repository caches (`$HOME/.cache/cairn`: `HOME` is the test's dir).
    pub fn cache_dir(&self) -> PathBuf {
        self.dir.path().join(".cache").join("cairn")
    }

    /// Deletes every index in the cache (the files of the SQLite database); returns how
    /// many files went.
    pub fn remove_index(&self) -> usize {
        let mut removed = 0;
        for entry in std::fs::read_dir(self.cache_dir()).into_iter().flatten() {
            let dir = entry.unwrap().path();
            for f in ["index.sqlite", "index.sqlite-wal", "index.sqlite-shm"] {
                if std::fs::remove_file(dir.join(f)).is_ok() {
                    removed += 1;
                }
            }
        }
        removed
    }

    /// `repo` with this repository and password in its environment, and nothing else
    /// from the user's (no config file, no other password source).
    /// This test's environment on `c` (and nothing of the caller's but `PATH`).
    pub fn environment(&self, c: &mut Command) {
        c.env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.dir.path())
            // Host state (known repositories, sessions) of this test only.
            .env("CAIRN_STATE_DIR", self.dir.path().join("state"))
            .env("REPO_CONFIG", self.dir.path().join("no-config"))
            .env("REPO_REPOSITORY", &self.repo)
            .env("REPO_PASSWORD", PASSWORD)
            .env("CAIRN_TESTONLY_WEAK_KDF", "1")
            .envs(self.extra_env.iter().map(|(k, v)| (k, v)));
    }

    pub fn cmd(&self) -> Command {
        let mut c = Command::new(repo_bin());
        self.environment(&mut c);
        c.stdin(Stdio::null());
        if let Some(filter) = std::env::var_os("REPO_LOG") {
            c.env("REPO_LOG", filter); // for debugging a failing test
        }
        c
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd().args(args).output().unwrap()
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        succeeded(&format!("repo {args:?}"), self.run(args))
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

    /// Complete pack files (not a writer's `.tmp-*`), oldest first.
    /// `check --read-data` finds no problem (every pack read and authenticated).
    pub fn assert_checks_clean(&self) {
        let check = self.json(&["check", "--read-data"]);
        assert_eq!(check["problems"].as_array().unwrap().len(), 0, "{check}");
    }

    /// The latest snapshot, restored into `dir` (under this test's directory), holds
    /// `src` byte for byte.
    pub fn assert_latest_restores(&self, src: &Path, dir: &str) {
        let target = self.path(dir);
        self.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
        assert_same_tree(src, &under(&target, src));
    }

    /// The packs holding file data (not trees: those have packs of their own), as this
    /// host's index knows them, oldest first. (A backup's data and tree packs are
    /// written within the same clock tick: `packs()[0]` may be either.)
    pub fn data_packs(&self) -> Vec<PathBuf> {
        let out = Command::new("python3")
            .args([
                "-c",
                "import glob, sqlite3, sys\n\
                 for f in glob.glob(sys.argv[1] + '/*/index.sqlite'):\n\
                 \x20   for (p,) in sqlite3.connect(f).execute('SELECT DISTINCT lower(hex(pack)) FROM blobs WHERE kind = 0'):\n\
                 \x20       print(p)",
            ])
            .arg(self.cache_dir())
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        let data: std::collections::HashSet<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_owned)
            .collect();
        let packs: Vec<PathBuf> = self
            .packs()
            .into_iter()
            .filter(|p| data.contains(&*p.file_name().unwrap().to_string_lossy()))
            .collect();
        assert!(!packs.is_empty(), "no data pack in the index");
        packs
    }

    pub fn packs(&self) -> Vec<PathBuf> {
        let mut v: Vec<(std::time::SystemTime, PathBuf)> = walk_files(&self.repo.join("data"))
            .into_iter()
            .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .map(|p| (fs::metadata(&p).unwrap().modified().unwrap(), p))
            .collect();
        v.sort();
        v.into_iter().map(|(_, p)| p).collect()
    }
}

/// Where scratch data goes: a real disk (not tmpfs), so sparse files and xattrs behave.
/// Asserts that `what` (a finished command) succeeded; returns its stdout.
pub fn succeeded(what: &str, out: Output) -> String {
    assert!(
        out.status.success(),
        "{what} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A finished command's standard error, as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn scratch_root() -> PathBuf {
    let p = std::env::var_os("CAIRN_TEST_SCRATCH").map_or_else(std::env::temp_dir, PathBuf::from);
    fs::create_dir_all(&p).unwrap();
    p
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// True when the test may run (`available`); in CI a missing requirement is a failure,
/// not a skip.
pub fn require(available: bool, what: &str, missing: &str) -> bool {
    if available {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{what} needs {missing}, and CI must run it"
    );
    eprintln!("SKIPPED (no {missing}): {what}");
    false
}

pub fn require_root(what: &str) -> bool {
    require(is_root(), what, "root")
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

pub fn set_mtime(p: &Path, sec: i64, nsec: i64) {
    let t = TimeSpec::new(sec, nsec);
    utimensat(None, p, &t, &t, UtimensatFlags::NoFollowSymlink).unwrap();
}

/// A tree with every kind of entry the format knows.
pub fn make_everything(src: &Path) {
    fs::create_dir_all(src.join("dir/sub/deeper")).unwrap();
    fs::write(src.join("empty"), b"").unwrap();
    fs::write(src.join("small.txt"), b"hello, cairn\n").unwrap();
    write_random(&src.join("dir/big.bin"), 7, 5 * 1024 * 1024 + 123);
    // Sparse: 1 GiB apparent, three data regions.
    let f = fs::File::create(src.join("sparse.img")).unwrap();
    f.set_len(1 << 30).unwrap();
    use std::os::unix::fs::FileExt;
    f.write_all_at(&random_bytes(1, 4096), 0).unwrap();
    f.write_all_at(&random_bytes(2, 70_000), 300 << 20).unwrap();
    f.write_all_at(b"end", (1 << 30) - 3).unwrap();
    drop(f);
    std::os::unix::fs::symlink("small.txt", src.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("/nonexistent/target", src.join("link-dangling")).unwrap();
    fs::write(src.join("dir/linked"), b"one inode, three names").unwrap();
    fs::hard_link(src.join("dir/linked"), src.join("dir/sub/linked2")).unwrap();
    fs::hard_link(src.join("dir/linked"), src.join("linked3")).unwrap();
    nix::unistd::mkfifo(
        &src.join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o640),
    )
    .unwrap();
    // Names that are not plain text.
    fs::write(src.join("new\nline"), b"n").unwrap();
    fs::write(
        src.join(std::ffi::OsStr::from_bytes(b"bad-\xff\xfe-utf8")),
        b"b",
    )
    .unwrap();
    fs::write(src.join("spaces and ünïcødé"), b"u").unwrap();
    // Modes.
    fs::set_permissions(src.join("small.txt"), fs::Permissions::from_mode(0o640)).unwrap();
    fs::set_permissions(src.join("dir/sub"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::write(src.join("setuid"), b"s").unwrap();
    fs::set_permissions(src.join("setuid"), fs::Permissions::from_mode(0o4755)).unwrap();
    // Extended attributes (user namespace: any filesystem with xattrs, any user).
    xattr::set(src.join("small.txt"), "user.cairn.test", b"value").unwrap();
    xattr::set(src.join("dir"), "user.cairn.dir", b"\x00binary\xff").unwrap();
    if is_root() {
        std::os::unix::fs::chown(src.join("small.txt"), Some(1234), Some(5678)).unwrap();
        std::os::unix::fs::lchown(src.join("link-rel"), Some(4321), Some(8765)).unwrap();
        std::os::unix::fs::chown(src.join("dir/sub/deeper"), Some(65534), Some(65534)).unwrap();
        nix::sys::stat::mknod(
            &src.join("null-dev"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::from_bits_truncate(0o666),
            nix::sys::stat::makedev(1, 3),
        )
        .unwrap();
    }
    // Times last, deepest first, with nanoseconds.
    for (i, p) in [
        "dir/sub/deeper",
        "dir/sub",
        "small.txt",
        "link-rel",
        "fifo",
        "dir",
    ]
    .iter()
    .enumerate()
    {
        set_mtime(&src.join(p), 1_500_000_000 + i as i64 * 1000, 123_456_789);
    }
}

/// True when FUSE can be used; in CI a missing FUSE is a failure, not a skip.
pub fn require_fuse(what: &str) -> bool {
    let ok = Path::new("/dev/fuse").exists()
        && Command::new("fusermount3")
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success());
    require(ok, what, "FUSE (/dev/fuse and fusermount3 from fuse3)")
}

pub fn mounted_at(dir: &Path) -> bool {
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let want = dir.to_string_lossy().replace(' ', "\\040");
    info.lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()) && l.contains(" cairn:"))
}

/// A `repo mount` running in the foreground; unmounted (SIGTERM) when dropped.
pub struct Mounted {
    pub child: std::process::Child,
    pub dir: PathBuf,
    pub log: PathBuf,
}

impl Env {
    pub fn mount(&self) -> Mounted {
        self.mount_with(&[])
    }

    pub fn mount_with(&self, extra: &[&str]) -> Mounted {
        let dir = self.path("mnt");
        fs::create_dir_all(&dir).unwrap();
        let dir = fs::canonicalize(&dir).unwrap();
        let log = self.path("mount.log");
        let child = self
            .cmd()
            .arg("mount")
            .arg(&dir)
            .args(extra)
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let m = Mounted { child, dir, log };
        let start = std::time::Instant::now();
        while !mounted_at(&m.dir) {
            assert!(
                start.elapsed().as_secs() < 30,
                "mount did not come up: {}",
                fs::read_to_string(&m.log).unwrap_or_default()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        m
    }
}

impl Mounted {
    /// The directory of a snapshot under `snapshots/`, from its JSON.
    pub fn snapshot(&self, snap: &Value) -> PathBuf {
        let short = snap["short_id"].as_str().unwrap();
        let entry = fs::read_dir(self.dir.join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .find(|n| n.ends_with(short))
            .unwrap_or_else(|| panic!("snapshot {short} not in the mount"));
        self.dir.join("snapshots").join(entry)
    }

    pub fn stop(&mut self) {
        if self.child.try_wait().unwrap().is_none() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.child.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let start = std::time::Instant::now();
            while self.child.try_wait().unwrap().is_none() && start.elapsed().as_secs() < 10 {
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.stop();
        let _ = self.child.kill();
        if mounted_at(&self.dir) {
            let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
        }
    }
}

/// Lazily unmounts a path (an overlay, a tmpfs) when dropped.
pub struct UnmountOnDrop(pub PathBuf);

impl Drop for UnmountOnDrop {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}
