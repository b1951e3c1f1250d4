//! `repo mount`: snapshots through a real FUSE mount.

use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::process::Command;

use crate::dbserver::{as_postgres, postgres_user, require_postgres, Postgres, PG_BIN};
use crate::support::*;

fn errno_of(r: std::io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn every_file_reads_back_through_the_mount_with_its_metadata() {
    if !require_fuse("mount round trip") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    make_everything(&src);
    let snap = env.backup(&[&src]);
    let m = env.mount();
    let root = m.snapshot(&snap);
    assert_same_tree(&src, &under(&root, &src));
    // Holes are holes: the 1 GiB sparse file reports few blocks.
    let md = fs::metadata(under(&root, &src).join("sparse.img")).unwrap();
    assert_eq!(md.len(), 1 << 30);
    assert!(md.blocks() * 512 < 4 << 20);
    // The hosts/ view and its `latest` link lead to the same snapshot.
    let host = snap["host"].as_str().unwrap();
    let source = src.to_str().unwrap().trim_matches('/').replace('/', "-");
    let latest = m.dir.join("hosts").join(host).join(&source).join("latest");
    assert!(fs::symlink_metadata(&latest)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(
        fs::read(under(&latest, &src).join("small.txt")).unwrap(),
        fs::read(src.join("small.txt")).unwrap()
    );
    // Snapshot names sort by time and hold no ':'.
    let name = root.file_name().unwrap().to_str().unwrap().to_owned();
    assert!(
        !name.contains(':') && name.len() == "2026-11-21T05-32-10-".len() + 8,
        "{name}"
    );
}

#[test]
fn ten_thousand_random_preads_match_the_source() {
    if require_fuse("random reads") {
        random_preads_match_the_source(&[]);
    }
}

#[test]
fn ten_thousand_random_preads_with_direct_io_match_the_source() {
    if require_fuse("random reads with direct I/O") {
        random_preads_match_the_source(&["--direct-io-from", "1"]);
    }
}

/// 10,000 reads of random lengths at random offsets (some past the end) of a file
/// through a mount started with `mount_args`, each compared with the source.
fn random_preads_match_the_source(mount_args: &[&str]) {
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    let len = 48 << 20;
    write_random(&src.join("data"), 11, len);
    let snap = env.backup(&[&src]);
    let m = env.mount_with(mount_args);
    let original = fs::read(src.join("data")).unwrap();
    let f = fs::File::open(under(&m.snapshot(&snap), &src).join("data")).unwrap();
    let mut x: u64 = 0x1234_5678_9abc_def1;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut buf = vec![0u8; 300_000];
    for _ in 0..10_000 {
        let off = (next() % (len as u64 + 1000)) as usize;
        let want = (next() % 300_000) as usize + 1;
        let n = f.read_at(&mut buf[..want], off as u64).unwrap();
        let expect = &original[off.min(len)..(off + want).min(len)];
        assert_eq!(n, expect.len(), "short read at {off}+{want}");
        assert!(buf[..n] == *expect, "content differs at {off}+{want}");
    }
}

/// Bytes of `path` in the page cache, by fincore(1) (util-linux-extra).
fn resident_bytes(path: &std::path::Path) -> u64 {
    let out = Command::new("fincore")
        .args(["--bytes", "--noheadings", "--raw", "--output", "RES"])
        .arg(path)
        .output()
        .expect("fincore (util-linux-extra) runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

#[test]
fn large_files_are_read_with_direct_io_and_still_map_and_run() {
    if !require_fuse("direct I/O for large files") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    write_random(&src.join("big"), 5, 3 << 20);
    fs::write(src.join("small"), b"small file").unwrap();
    // A program of ~35 KiB: run from the mount, it is mapped (exec uses mmap).
    fs::copy("/usr/bin/true", src.join("prog")).unwrap();
    let snap = env.backup(&[&src]);
    let m = env.mount_with(&["--direct-io-from", "16K", "-vv"]);
    let dir = under(&m.snapshot(&snap), &src);
    for f in ["big", "small", "prog"] {
        assert_eq!(hash_file(&dir.join(f)), hash_file(&src.join(f)), "{f}");
    }
    // Read whole, the large file left nothing in the page cache; the small one is
    // there, as every file is without direct I/O. (Linux >= 6.6, where the kernel can
    // map files opened with direct I/O; older kernels keep the page cache for all.)
    let direct = m.log().contains("read with direct I/O");
    assert!(
        direct
            || m.log()
                .contains("every file is read through the page cache"),
        "{}",
        m.log()
    );
    if direct {
        assert_eq!(resident_bytes(&dir.join("big")), 0);
    }
    assert!(resident_bytes(&dir.join("small")) > 0);
    // Mapped and run: a program opened with direct I/O.
    let run = Command::new(dir.join("prog")).status().unwrap();
    assert!(run.success());
    // And a mapping of the large file reads what was backed up.
    let out = Command::new("python3")
        .args([
            "-c",
            "import mmap,sys,hashlib;f=open(sys.argv[1],'rb');\
             print(hashlib.sha256(mmap.mmap(f.fileno(),0,prot=mmap.PROT_READ)).hexdigest())",
        ])
        .arg(dir.join("big"))
        .output()
        .unwrap();
    let want = Command::new("sha256sum")
        .arg(src.join("big"))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        String::from_utf8_lossy(&want.stdout)
            .split_whitespace()
            .next()
            .unwrap()
    );
}

#[test]
fn every_change_is_refused_with_erofs() {
    if !require_fuse("read-only mount") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("d")).unwrap();
    fs::write(src.join("d/f"), b"x").unwrap();
    let snap = env.backup(&[&src]);
    let m = env.mount();
    let d = under(&m.snapshot(&snap), &src).join("d");
    let erofs = Some(libc::EROFS);
    assert_eq!(errno_of(fs::write(d.join("new"), b"y")), erofs);
    assert_eq!(
        errno_of(fs::OpenOptions::new().write(true).open(d.join("f"))),
        erofs
    );
    assert_eq!(errno_of(fs::create_dir(d.join("sub"))), erofs);
    assert_eq!(errno_of(fs::remove_file(d.join("f"))), erofs);
    assert_eq!(errno_of(fs::rename(d.join("f"), d.join("g"))), erofs);
    assert_eq!(
        errno_of(fs::set_permissions(
            d.join("f"),
            fs::Permissions::from_mode(0o777)
        )),
        erofs
    );
    assert_eq!(errno_of(xattr::set(d.join("f"), "user.x", b"1")), erofs);
    assert_eq!(
        errno_of(std::os::unix::fs::symlink("f", d.join("l"))),
        erofs
    );
    assert_eq!(errno_of(fs::create_dir(m.dir.join("snapshots/new"))), erofs);
    // xattr reads are answered (ENODATA), not refused (ENOSYS).
    assert_eq!(
        errno_of(
            xattr::get(d.join("f"), "user.none")
                .and_then(|v| v.ok_or(std::io::Error::from_raw_os_error(libc::ENODATA)))
        ),
        Some(libc::ENODATA)
    );
    assert_eq!(fs::read(d.join("f")).unwrap(), b"x");
}

#[test]
fn a_snapshot_made_while_mounted_shows_up() {
    if !require_fuse("live snapshot list") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"1").unwrap();
    env.backup(&[&src]);
    let m = env.mount();
    assert_eq!(fs::read_dir(m.dir.join("snapshots")).unwrap().count(), 1);
    fs::write(src.join("f"), b"22").unwrap();
    let second = env.backup(&[&src]);
    let start = std::time::Instant::now();
    loop {
        let names: Vec<String> = fs::read_dir(m.dir.join("snapshots"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        if names.len() == 2 {
            break;
        }
        assert!(
            start.elapsed().as_secs() < 5,
            "new snapshot not visible after 5 s: {names:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        fs::read(under(&m.snapshot(&second), &src).join("f")).unwrap(),
        b"22"
    );
}

#[test]
fn unmounting_with_a_file_open_leaves_no_mount_behind() {
    if !require_fuse("unmount") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"held open").unwrap();
    let snap = env.backup(&[&src]);
    let mut m = env.mount();
    let held = fs::File::open(under(&m.snapshot(&snap), &src).join("f")).unwrap();
    let out = env.run(&["umount", m.dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!mounted_at(&m.dir), "still in the mount table");
    // The reader is not cut off: the detached filesystem serves it until it closes.
    let mut buf = [0u8; 9];
    held.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(&buf, b"held open");
    drop(held);
    let start = std::time::Instant::now();
    while m.child.try_wait().unwrap().is_none() {
        assert!(
            start.elapsed().as_secs() < 15,
            "repo mount did not exit after umount and close"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // SIGTERM in the foreground unmounts too.
    let mut m2 = env.mount();
    m2.stop();
    assert!(!mounted_at(&m2.dir));
    assert!(m2.child.try_wait().unwrap().unwrap().success());
    // umount of something that is not a cairn mount is an error.
    assert!(!env
        .run(&["umount", env.dir.path().to_str().unwrap()])
        .status
        .success());
}

#[test]
fn a_damaged_blob_fails_that_read_with_eio_and_the_mount_stays_up() {
    if !require_fuse("damaged data through the mount") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    write_random(&src.join("a"), 1, 2 << 20);
    env.backup(&[&src]);
    let pack = env.data_packs()[0].clone();
    write_random(&src.join("b"), 2, 2 << 20);
    let snap = env.backup(&[&src]);
    let mut bytes = fs::read(&pack).unwrap();
    bytes[5000] ^= 1;
    fs::write(&pack, &bytes).unwrap();
    let m = env.mount();
    let dir = under(&m.snapshot(&snap), &src);
    let err = fs::read(dir.join("a")).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO));
    assert_eq!(hash_file(&dir.join("b")), hash_file(&src.join("b")));
    let log = m.log();
    assert!(
        log.contains("blob") && log.contains("/a"),
        "the log does not name the blob and file: {log}"
    );
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Mounts an overlay (kernel or fuse-overlayfs) and checks reads, writes and metadata.
fn overlay_case(kernel: bool) {
    let env = Env::new();
    let src = env.path("src");
    make_everything(&src);
    let snap = env.backup(&[&src]);
    let m = env.mount();
    let lower = under(&m.snapshot(&snap), &src);
    let (upper, work, merged) = (env.path("upper"), env.path("work"), env.path("merged"));
    for d in [&upper, &work, &merged] {
        fs::create_dir_all(d).unwrap();
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    if kernel {
        run(Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(&merged));
    } else {
        run(Command::new("fuse-overlayfs")
            .args(["-o", &opts])
            .arg(&merged));
    }
    let _guard = UnmountOnDrop(merged.clone());
    // Reads through the overlay equal the source (content, modes, owners, xattrs).
    for f in ["small.txt", "dir/big.bin", "dir/sub/linked2", "new\nline"] {
        assert_eq!(hash_file(&merged.join(f)), hash_file(&src.join(f)), "{f}");
        let (a, b) = (
            fs::metadata(merged.join(f)).unwrap(),
            fs::metadata(src.join(f)).unwrap(),
        );
        assert_eq!(
            (a.mode(), a.uid(), a.gid(), a.len()),
            (b.mode(), b.uid(), b.gid(), b.len()),
            "{f}"
        );
    }
    assert_eq!(
        xattr::get(merged.join("small.txt"), "user.cairn.test").unwrap(),
        Some(b"value".to_vec())
    );
    let getfattr = Command::new("getfattr")
        .args(["-d", "-m", "user."])
        .arg(merged.join("small.txt"))
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&getfattr.stdout).contains("user.cairn.test=\"value\""));
    // Writes land in the upper directory only.
    fs::write(merged.join("small.txt"), b"changed in the overlay").unwrap();
    fs::OpenOptions::new()
        .append(true)
        .open(merged.join("dir/big.bin"))
        .unwrap()
        .write_all(b"tail")
        .unwrap();
    fs::write(merged.join("brand-new"), b"new").unwrap();
    assert_eq!(
        fs::read(upper.join("small.txt")).unwrap(),
        b"changed in the overlay"
    );
    assert!(upper.join("brand-new").exists());
    assert_eq!(
        fs::read(lower.join("small.txt")).unwrap(),
        fs::read(src.join("small.txt")).unwrap()
    );
    assert_eq!(
        hash_file(&lower.join("dir/big.bin")),
        hash_file(&src.join("dir/big.bin"))
    );
    assert!(!lower.join("brand-new").exists());
}

#[test]
fn the_mount_works_as_the_lower_layer_of_a_kernel_overlay() {
    if !require_fuse("kernel overlay") || !require_root("mounting a kernel overlay") {
        return;
    }
    overlay_case(true);
}

#[test]
fn the_mount_works_as_the_lower_layer_of_fuse_overlayfs() {
    if !require_fuse("fuse-overlayfs") {
        return;
    }
    let have = Command::new("fuse-overlayfs")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !require(have, "the fuse-overlayfs test", "fuse-overlayfs") {
        return;
    }
    overlay_case(false);
}

#[test]
fn postgresql_serves_queries_from_an_overlay_of_the_mount() {
    if !require_fuse("PostgreSQL on the mount")
        || !require_root("running PostgreSQL as postgres and a kernel overlay")
    {
        return;
    }
    if !require_postgres() {
        return;
    }
    let env = Env::new();
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let (uid, gid) = postgres_user();
    let src = env.path("src");
    let data = src.join("pgdata");
    fs::create_dir_all(&data).unwrap();
    std::os::unix::fs::chown(&data, Some(uid), Some(gid)).unwrap();
    run(as_postgres(&mut Command::new(format!("{PG_BIN}/initdb")))
        .args(["-A", "trust", "-U", "postgres", "--no-sync", "-D"])
        .arg(&data));
    let pg = Postgres::start(&env, &data, "source");
    pg.sql("CREATE TABLE t AS SELECT generate_series(1, 50000) AS x");
    pg.stop();
    let snap = env.backup(&[&src]);

    let m = env.mount();
    let lower = under(&m.snapshot(&snap), &src).join("pgdata");
    // The mount shows the real owner and mode, which PostgreSQL insists on.
    let md = fs::metadata(&lower).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o777), (uid, 0o700));
    let (upper, work, merged) = (env.path("upper"), env.path("work"), env.path("merged"));
    for d in [&upper, &work, &merged] {
        fs::create_dir_all(d).unwrap();
    }
    // The overlay's root takes owner and mode from the upper directory.
    std::os::unix::fs::chown(&upper, Some(uid), Some(gid)).unwrap();
    fs::set_permissions(&upper, fs::Permissions::from_mode(0o700)).unwrap();
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&merged));
    let _guard = UnmountOnDrop(merged.clone());

    let pg = Postgres::start(&env, &merged, "recovered");
    assert_eq!(pg.sql("SELECT count(*), sum(x) FROM t"), "50000|1250025000");
    // Writes work and land in the overlay.
    pg.sql("INSERT INTO t SELECT generate_series(1, 10); CHECKPOINT");
    assert_eq!(pg.sql("SELECT count(*) FROM t"), "50010");
    let log = pg.stop();
    assert!(!log.contains("Stale file handle"), "{log}");
    assert!(upper.join("base").exists(), "no copy-up happened");
    // The backup is untouched: a second overlay sees the original rows.
    let _ = Command::new("umount").arg(&merged).status();
    fs::remove_dir_all(&upper).unwrap();
    fs::remove_dir_all(&work).unwrap();
    for d in [&upper, &work] {
        fs::create_dir_all(d).unwrap();
    }
    std::os::unix::fs::chown(&upper, Some(uid), Some(gid)).unwrap();
    fs::set_permissions(&upper, fs::Permissions::from_mode(0o700)).unwrap();
    run(Command::new("mount")
        .args(["-t", "overlay", "overlay", "-o", &opts])
        .arg(&merged));
    let pg = Postgres::start(&env, &merged, "again");
    assert_eq!(pg.sql("SELECT count(*) FROM t"), "50000");
    pg.stop();
}
