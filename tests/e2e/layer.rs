//! `repo mount --writable-layer`: a snapshot directory, writable, through real FUSE: a
//! kill -9 of the daemon in the middle of writes loses nothing that was fsynced, and
//! fio's own verification of random I/O (buffered and O_DIRECT) holds, also after a
//! remount.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::*;

fn layer_mount(env: &Env, src: &Path, layer: &Path) -> Mounted {
    let (layer, dir) = (layer.to_str().unwrap(), src.to_str().unwrap());
    env.mount_with(&[
        "--writable-layer",
        layer,
        "--snapshot",
        "latest",
        "--dir",
        dir,
    ])
}

/// Waits until nothing is mounted at `dir` any more, detaching a dead FUSE mount.
fn gone(dir: &Path) {
    let start = Instant::now();
    while mounted_at(dir) {
        let _ = Command::new("umount").arg("-l").arg(dir).status();
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} stays mounted",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn next(x: &mut u64) -> u64 {
    *x ^= *x << 13;
    *x ^= *x >> 7;
    *x ^= *x << 17;
    *x
}

#[test]
fn fsynced_writes_survive_a_kill_of_the_layer_daemon_and_the_repository_is_untouched() {
    if !require_fuse("writable layer") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(src.join("dir")).unwrap();
    write_random(&src.join("data"), 7, 6 << 20);
    fs::write(src.join("dir/small"), b"small file").unwrap();
    env.backup(&[&src]);
    let layer = env.path("layer");
    let mut m = layer_mount(&env, &src, &layer);
    let mnt = m.dir.clone();

    // Random writes into a file of the snapshot and a new one, a rename over an existing
    // name and a hard link, each step fsynced: this is what must survive.
    let mut data = fs::read(src.join("data")).unwrap();
    let mut created = Vec::new();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(mnt.join("data"))
        .unwrap();
    let g = fs::File::create(mnt.join("dir/new")).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for _ in 0..300 {
        let at = (next(&mut x) % (7 << 20)) as usize;
        let piece = random_bytes(next(&mut x), 1 + (next(&mut x) % 150_000) as usize);
        f.write_all_at(&piece, at as u64).unwrap();
        if data.len() < at + piece.len() {
            data.resize(at + piece.len(), 0);
        }
        data[at..at + piece.len()].copy_from_slice(&piece);
        let at2 = (next(&mut x) % (1 << 20)) as usize;
        g.write_all_at(&piece[..piece.len().min(9000)], at2 as u64)
            .unwrap();
        if created.len() < at2 + piece.len().min(9000) {
            created.resize(at2 + piece.len().min(9000), 0);
        }
        created[at2..at2 + piece.len().min(9000)].copy_from_slice(&piece[..piece.len().min(9000)]);
    }
    f.sync_all().unwrap();
    g.sync_all().unwrap();
    fs::write(mnt.join("dir/replacement"), b"replaced").unwrap();
    fs::rename(mnt.join("dir/replacement"), mnt.join("dir/small")).unwrap();
    fs::hard_link(mnt.join("dir/new"), mnt.join("linked")).unwrap();
    fs::File::open(mnt.join("dir")).unwrap().sync_all().unwrap();
    drop((f, g));

    // Then a writer that never fsyncs, killed with the daemon in the middle.
    let scratch = mnt.join("unsynced");
    let writer = std::thread::spawn(move || {
        let Ok(h) = fs::File::create(&scratch) else {
            return 0u64;
        };
        let mut n = 0u64;
        while h.write_all_at(&[7u8; 65536], n * 65536).is_ok() {
            n += 1;
        }
        n
    });
    std::thread::sleep(Duration::from_millis(300));
    m.child.kill().unwrap(); // SIGKILL
    m.child.wait().unwrap();
    let written = writer.join().unwrap();
    assert!(written > 0, "the writer never wrote");
    gone(&mnt);

    let m = layer_mount(&env, &src, &layer);
    assert!(
        fs::read(m.dir.join("data")).unwrap() == data,
        "fsynced writes to a snapshot file were lost"
    );
    assert!(
        fs::read(m.dir.join("dir/new")).unwrap() == created,
        "a new file's fsynced writes were lost"
    );
    assert_eq!(fs::read(m.dir.join("dir/small")).unwrap(), b"replaced");
    assert!(fs::read(m.dir.join("linked")).unwrap() == created);
    let size = fs::metadata(m.dir.join("unsynced")).map_or(0, |md| md.len());
    assert!(size <= written * 65536);
    drop(m);
    gone(&mnt);
    // The repository never saw any of it.
    env.ok(&["check", "--read-data"]);
    let ro = env.mount();
    let original = under(&ro.snapshot(&env.json(&["snapshots"])[0]), &src);
    assert_eq!(
        hash_file(&original.join("data")),
        hash_file(&src.join("data"))
    );
    assert_eq!(fs::read(original.join("dir/small")).unwrap(), b"small file");
    assert!(!original.join("linked").exists());
}

fn require_fio() -> bool {
    let ok = Command::new("fio")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    require(ok, "fio verification", "fio (Debian's fio)")
}

/// Runs fio's random-write job with verification on `file`; `verify_only` re-reads what
/// an earlier run of the same job wrote.
fn fio(file: &Path, direct: bool, verify_only: bool) {
    let mut c = Command::new("fio");
    c.arg(format!("--name=layer{}", u8::from(direct)))
        .arg(format!("--filename={}", file.display()))
        .args([
            "--size=24m",
            "--rw=randwrite",
            "--ioengine=psync",
            "--verify=crc32c",
        ])
        .args([
            "--verify_fatal=1",
            "--do_verify=1",
            "--randseed=42",
            "--fsync=32",
        ])
        .arg(if direct {
            "--bsrange=4k-256k"
        } else {
            "--bsrange=512-192k"
        })
        .arg(format!("--direct={}", u8::from(direct)));
    if verify_only {
        c.arg("--verify_only");
    }
    let out = c.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("verify: bad"),
        "fio failed:\n{text}"
    );
}

#[test]
fn fio_verifies_random_io_through_a_writable_layer_before_and_after_a_remount() {
    if !require_fuse("writable layer") || !require_fio() {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    // fio writes over files of the snapshot: every partial chunk is copied up first.
    write_random(&src.join("buffered"), 3, 24 << 20);
    write_random(&src.join("direct"), 4, 24 << 20);
    env.backup(&[&src]);
    let layer: PathBuf = env.path("layer");
    let m = layer_mount(&env, &src, &layer);
    fio(&m.dir.join("buffered"), false, false);
    fio(&m.dir.join("direct"), true, false);
    let dir = m.dir.clone();
    drop(m);
    gone(&dir);
    let m = layer_mount(&env, &src, &layer);
    fio(&m.dir.join("buffered"), false, true);
    fio(&m.dir.join("direct"), true, true);
}
