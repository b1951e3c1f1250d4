//! Disk images: qcow2, raw, sparse raw and VMDK backed up over NBD (qemu-nbd), restored
//! to raw and qcow2, seen through the mount, incrementals with and without a dirty
//! bitmap. Real qemu-img, qemu-nbd and qemu-io.

use std::fs;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::support::*;

fn have_qemu(what: &str) -> bool {
    let ok = ["qemu-img", "qemu-nbd", "qemu-io"].iter().all(|p| {
        Command::new(p)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    require(ok, what, "qemu-img, qemu-nbd and qemu-io (qemu-utils)")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn compare(a: &Path, a_fmt: &str, b: &Path, b_fmt: &str) {
    run(Command::new("qemu-img")
        .args(["compare", "-f", a_fmt, "-F", b_fmt])
        .arg(a)
        .arg(b));
}

/// A 64 MiB raw image with data, a zero run and holes at unaligned places.
fn make_raw(path: &Path, sparse: bool) {
    let f = fs::File::create(path).unwrap();
    f.set_len(64 << 20).unwrap();
    if !sparse {
        f.write_all_at(&vec![0u8; 64 << 20], 0).unwrap();
    }
    f.write_all_at(&random_bytes(1, 3 << 20), 0).unwrap();
    f.write_all_at(&random_bytes(2, 1_000_000), (10 << 20) + 4097)
        .unwrap();
    f.write_all_at(&vec![0x5a; 4096], (40 << 20) - 2048)
        .unwrap();
    f.write_all_at(&random_bytes(3, 1 << 20), (63 << 20) - 12345)
        .unwrap();
}

fn convert(src: &Path, dst: &Path, fmt: &str, opts: &[&str]) {
    let mut c = Command::new("qemu-img");
    c.args(["convert", "-f", "raw", "-O", fmt])
        .args(opts)
        .arg(src)
        .arg(dst);
    run(&mut c);
}

#[test]
fn every_image_format_restores_identically_to_raw_and_qcow2_and_through_the_mount() {
    if !have_qemu("image round trips") || !require_fuse("image mount") {
        return;
    }
    let env = Env::new();
    let raw = env.path("dense.raw");
    make_raw(&raw, false);
    let sparse = env.path("sparse.raw");
    make_raw(&sparse, true);
    let cases: Vec<(PathBuf, &str)> = vec![
        (raw.clone(), "raw"),
        (sparse.clone(), "raw"),
        (env.path("disk.qcow2"), "qcow2"),
        (env.path("mono.vmdk"), "vmdk"),
        (env.path("stream.vmdk"), "vmdk"),
    ];
    convert(&raw, &cases[2].0, "qcow2", &[]);
    convert(
        &raw,
        &cases[3].0,
        "vmdk",
        &["-o", "subformat=monolithicSparse"],
    );
    convert(
        &raw,
        &cases[4].0,
        "vmdk",
        &["-o", "subformat=streamOptimized"],
    );
    let mut snaps = Vec::new();
    for (i, (img, fmt)) in cases.iter().enumerate() {
        let name = format!("img{i}");
        let snap = env.json(&["backup", "--image", img.to_str().unwrap(), "--name", &name])
            ["snapshot"]
            .clone();
        assert_eq!(snap["kind"], "image");
        assert_eq!(snap["summary"]["total_bytes"], 64u64 << 20);
        // Only allocated data is read: about 5 MiB of 64 (all of the dense raw file,
        // whose zeros must be read to be found).
        let read = snap["summary"]["bytes_read"].as_u64().unwrap();
        if i == 0 {
            assert_eq!(read, 64 << 20);
        } else {
            assert!(read < 16 << 20, "{img:?}: {}", snap["summary"]);
        }
        let out_raw = env.path(&format!("{name}.out.raw"));
        env.ok(&[
            "restore",
            snap["id"].as_str().unwrap(),
            "--target",
            out_raw.to_str().unwrap(),
        ]);
        compare(img, fmt, &out_raw, "raw");
        // Zero regions come back as holes.
        assert!(fs::metadata(&out_raw).unwrap().blocks() * 512 < 16 << 20);
        let out_q = env.path(&format!("{name}.out.qcow2"));
        env.ok(&[
            "restore",
            snap["id"].as_str().unwrap(),
            "--target",
            out_q.to_str().unwrap(),
            "--format",
            "qcow2",
        ]);
        assert!(
            run(Command::new("qemu-img").arg("info").arg(&out_q)).contains("file format: qcow2")
        );
        compare(img, fmt, &out_q, "qcow2");
        snaps.push((snap, name, img.clone(), *fmt));
    }

    let m = env.mount();
    for (snap, name, img, fmt) in &snaps {
        let disk = m.snapshot(snap).join(format!("{name}.raw"));
        assert_eq!(fs::metadata(&disk).unwrap().len(), 64 << 20);
        compare(img, fmt, &disk, "raw");
    }
    // A writable disk on top of the backup: writes change the overlay only.
    let (snap, name, img, fmt) = &snaps[2];
    let disk = m.snapshot(snap).join(format!("{name}.raw"));
    let overlay = env.path("overlay.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&disk)
        .arg(&overlay));
    qemu_io(&overlay, &["write -P 0x77 1M 2M"]);
    let differs = Command::new("qemu-img")
        .args(["compare", "-f", "qcow2", "-F", fmt])
        .arg(&overlay)
        .arg(img)
        .output()
        .unwrap();
    assert_eq!(
        differs.status.code(),
        Some(1),
        "the overlay should differ from the source"
    );
    compare(img, fmt, &disk, "raw");
    let read_back = run(Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "read -P 0x77 1M 2M"])
        .arg(&overlay));
    assert!(
        !read_back.contains("Pattern verification failed"),
        "{read_back}"
    );
}

#[test]
fn an_incremental_after_changing_5_percent_of_a_2gib_image_stores_about_that() {
    if !have_qemu("image incrementals") {
        return;
    }
    let env = Env::new();
    let img = env.path("disk.raw");
    write_random(&img, 21, 2 << 30);
    let first = env.json(&["backup", "--image", img.to_str().unwrap()])["snapshot"].clone();
    assert_eq!(first["summary"]["bytes_read"], 2u64 << 30);
    let before = env.repo_bytes();
    // Change 5%: 102 scattered 1 MiB regions, at unaligned offsets.
    let f = fs::OpenOptions::new().write(true).open(&img).unwrap();
    for i in 0..102u64 {
        let at = (i * 20 + 3) * (1 << 20) + 777;
        f.write_all_at(&random_bytes(1000 + i, 1 << 20), at)
            .unwrap();
    }
    drop(f);
    let second = env.json(&["backup", "--image", img.to_str().unwrap()])["snapshot"].clone();
    assert_eq!(second["parent"], first["id"]);
    let growth = env.repo_bytes() - before;
    let changed = 102u64 << 20;
    eprintln!("incremental of a 2 GiB image after 102 MiB of changes added {growth} bytes ({:.1}% of the image)", growth as f64 * 100.0 / f64::from(2u32 << 30));
    // New repositories cut images in 256 KiB chunks: each unaligned 1 MiB change touches
    // five of them (1.25 MiB); plus the image map (the root tree, ~400 KB).
    let chunks_new = 5 * 102 * (256u64 << 10);
    let bytes_new = second["summary"]["bytes_new"].as_u64().unwrap();
    assert!(
        (chunks_new..chunks_new + (1 << 20)).contains(&bytes_new),
        "{bytes_new} new bytes, {chunks_new} of them chunks"
    );
    assert!(
        growth >= changed && growth <= changed * 5 / 4 + (4 << 20),
        "added {growth} bytes for {changed} changed"
    );
    let out = env.path("out.raw");
    env.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    assert_eq!(hash_file(&out), hash_file(&img));
}

/// Runs qemu-io commands (`write -P 0x11 0 1M`, ...) on a qcow2 image.
fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut c = Command::new("qemu-io");
    c.args(["-f", "qcow2"]);
    for cmd in cmds {
        c.args(["-c", cmd]);
    }
    run(c.arg(img));
}

/// A new qcow2 image of `size` holding what `writes` (qemu-io commands) put there.
fn new_qcow2(img: &Path, size: &str, writes: &[&str]) {
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2"])
        .arg(img)
        .arg(size));
    qemu_io(img, writes);
}

/// A read-only qemu-nbd of a qcow2 on `sock`, stopped when dropped. `--fork` returns
/// only once the server listens (a socket file can exist before anyone accepts on it).
struct NbdServer(i32);

impl Drop for NbdServer {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.0),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

fn qemu_nbd(img: &Path, sock: &Path, extra: &[&str]) -> NbdServer {
    let _ = fs::remove_file(sock);
    let pid_file = sock.with_extension("pid");
    run(Command::new("qemu-nbd")
        .args(["--read-only", "--fork", "--persistent", "-f", "qcow2"])
        .args(extra)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg("-k")
        .arg(sock)
        .arg(img));
    NbdServer(
        fs::read_to_string(&pid_file)
            .unwrap()
            .trim()
            .parse()
            .unwrap(),
    )
}

#[test]
fn a_dirty_bitmap_incremental_reads_only_the_dirty_blocks() {
    if !have_qemu("dirty bitmaps") {
        return;
    }
    let env = Env::new();
    let img = env.path("disk.qcow2");
    new_qcow2(
        &img,
        "512M",
        &["write -P 0x11 0 100M", "write -P 0x22 300M 50M"],
    );
    let first = env.json(&["backup", "--image", img.to_str().unwrap()])["snapshot"].clone();
    assert_eq!(first["summary"]["bytes_read"], 150u64 << 20);
    // Track changes from here, then change 3 MiB in three places.
    run(Command::new("qemu-img")
        .args(["bitmap", "--add"])
        .arg(&img)
        .arg("since-first"));
    qemu_io(
        &img,
        &[
            "write -P 0x33 5M 1M",
            "write -P 0x44 310M 1M",
            "write -P 0x55 500M 1M",
        ],
    );
    let sock = env.path("nbd.sock");
    let server = qemu_nbd(&img, &sock, &["-B", "since-first"]);
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let second = env.json(&[
        "backup",
        "--nbd",
        &uri,
        "--bitmap",
        "since-first",
        "--name",
        "disk",
    ])["snapshot"]
        .clone();
    drop(server);
    assert_eq!(second["parent"], first["id"]);
    let read = second["summary"]["bytes_read"].as_u64().unwrap();
    assert!(
        read <= 6 << 20,
        "read {read} bytes for 3 MiB of dirty blocks"
    );
    assert!(
        read >= 3 << 20,
        "read {read} bytes: the dirty blocks were not read"
    );
    let out = env.path("out.raw");
    env.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    compare(&img, "qcow2", &out, "raw");
    // A bitmap the export does not have is a clear error, and no snapshot.
    let server = qemu_nbd(&img, &sock, &[]);
    let out = env.run(&[
        "backup", "--nbd", &uri, "--bitmap", "nope", "--name", "disk",
    ]);
    drop(server);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nope"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 2);
}

#[test]
fn bad_image_sources_are_clear_errors() {
    if !have_qemu("bad image sources") {
        return;
    }
    let env = Env::new();
    let out = env.run(&[
        "backup",
        "--nbd",
        "nbd+unix:///?socket=/nonexistent.sock",
        "--name",
        "x",
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("NBD"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = env.run(&["backup", "--image", "/nonexistent.qcow2"]);
    assert_eq!(out.status.code(), Some(1));
    let out = env.run(&["backup", "--nbd", "http://example/", "--name", "x"]);
    assert!(!out.status.success());
    assert!(env.json(&["snapshots"]).as_array().unwrap().is_empty());
}

#[test]
fn an_nbd_export_over_tcp_is_backed_up() {
    if !have_qemu("NBD over TCP") {
        return;
    }
    let env = Env::new();
    let img = env.path("disk.qcow2");
    new_qcow2(
        &img,
        "64M",
        &["write -P 0x42 1M 2M", "write -P 0x43 60M 1M"],
    );
    // A free port on loopback.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut server = Command::new("qemu-nbd")
        .args([
            "--read-only",
            "--persistent",
            "-f",
            "qcow2",
            "-b",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-x",
            "vda",
        ])
        .arg(&img)
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(start.elapsed().as_secs() < 20, "qemu-nbd did not listen");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let uri = format!("nbd://127.0.0.1:{port}/vda");
    let out = env.run(&["backup", "--nbd", &uri, "--name", "vda", "--json"]);
    let wrong = env.run(&[
        "backup",
        "--nbd",
        &format!("nbd://127.0.0.1:{port}/nope"),
        "--name",
        "vda",
    ]);
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let snap: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(snap["snapshot"]["summary"]["bytes_read"], 3u64 << 20);
    let restored = env.path("out.raw");
    env.ok(&["restore", "latest", "--target", restored.to_str().unwrap()]);
    compare(&img, "qcow2", &restored, "raw");
    // An export the server does not have is refused by name.
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("nope"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
}

#[test]
fn an_unchanged_image_is_not_read_again_and_any_write_is_noticed() {
    if !have_qemu("unchanged images") {
        return;
    }
    let env = Env::new();
    let base = env.path("base.qcow2");
    new_qcow2(&base, "64M", &["write -P 0x61 0 4M"]);
    let img = env.path("vm.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&img));
    qemu_io(&img, &["write -P 0x62 8M 1M"]);
    let backup = |extra: &[&str]| {
        let mut args = vec!["backup", "--image", img.to_str().unwrap()];
        args.extend_from_slice(extra);
        env.json(&args)["snapshot"]["summary"].clone()
    };
    assert_eq!(backup(&[])["bytes_read"], 5u64 << 20);
    let again = backup(&[]);
    assert_eq!(
        (
            again["bytes_read"].as_u64(),
            again["files_unchanged"].as_u64()
        ),
        (Some(0), Some(1))
    );
    // Recognised from the parent's record alone: no qemu-img (nor qemu-nbd) runs.
    let out = env
        .cmd()
        .env("PATH", "/nonexistent")
        .args(["backup", "--image", img.to_str().unwrap(), "--json"])
        .output()
        .unwrap();
    let v: serde_json::Value =
        serde_json::from_str(&succeeded("backup without qemu on PATH", out)).unwrap();
    assert_eq!(v["snapshot"]["summary"]["bytes_read"], 0);
    assert_eq!(backup(&["--force"])["bytes_read"], 5u64 << 20);
    // A write to the image, or to its backing file, is read.
    qemu_io(&img, &["write -P 0x63 20M 1M"]);
    assert!(backup(&[])["bytes_read"].as_u64().unwrap() > 0);
    qemu_io(&base, &["write -P 0x64 30M 1M"]);
    assert!(backup(&[])["bytes_read"].as_u64().unwrap() > 0);
    let out = env.path("out.raw");
    env.ok(&["restore", "latest", "--target", out.to_str().unwrap()]);
    compare(&img, "qcow2", &out, "raw");
}

#[test]
fn init_chunk_sizes_apply_to_files_and_images_and_bad_ones_are_refused() {
    if !have_qemu("image chunk sizes") {
        return;
    }
    let env = Env::without_repo();
    env.ok(&[
        "init",
        "--chunk-sizes",
        "64K,128K,1M",
        "--image-chunk-size",
        "1M",
    ]);
    // 8 MiB of random data: about 64 content-defined chunks of 128 KiB on average
    // (about 16 with the default 512 KiB).
    let src = env.path("src");
    fs::create_dir(&src).unwrap();
    write_random(&src.join("f"), 5, 8 << 20);
    let snap = env.backup(&[&src]);
    let data_blobs = snap["summary"]["blobs_new"].as_u64().unwrap() - 3; // the trees
    assert!((40..=100).contains(&data_blobs), "{data_blobs} chunks");
    // An image of 4 MiB: four chunks of 1 MiB.
    let img = env.path("disk.raw");
    write_random(&img, 6, 4 << 20);
    let snap = env.json(&["backup", "--image", img.to_str().unwrap()])["snapshot"].clone();
    assert_eq!(snap["summary"]["blobs_new"], 5);

    for bad in [
        &["--chunk-sizes", "512K,256K,4M"][..], // min above average
        &["--chunk-sizes", "256K,512K"],        // two sizes
        &["--chunk-sizes", "256K,512K,64M"],    // max beyond 16M
        &["--image-chunk-size", "768K"],        // not a power of two
        &["--image-chunk-size", "32M"],
    ] {
        let env = Env::without_repo();
        let mut args = vec!["init"];
        args.extend_from_slice(bad);
        let out = env.run(&args);
        assert!(!out.status.success(), "{bad:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("chunk"), "{bad:?}: {err}");
        assert!(!env.repo.exists(), "{bad:?} left a repository behind");
    }
}

/// `repo backup --image` returns only once its qemu-nbd has let go of the image and its
/// backing file: a VM (here qemu-io) that opens the image for writing right after the
/// backup gets its lock, every time.
#[test]
fn an_image_is_released_when_its_backup_returns() {
    if !have_qemu("releasing images") {
        return;
    }
    let env = Env::new();
    let base = env.path("base.qcow2");
    new_qcow2(&base, "64M", &["write -P 0x61 0 16M"]);
    let img = env.path("vm.qcow2");
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&img));
    for round in 0..10u32 {
        // A change each round, so that every backup reads the image through qemu-nbd.
        qemu_io(
            &img,
            &[&format!("write -P {} {}M 1M", round + 1, 20 + round)],
        );
        let snap = env.json(&["backup", "--image", img.to_str().unwrap()]);
        assert!(snap["snapshot"]["summary"]["bytes_read"].as_u64().unwrap() > 0);
        // Both writes need the image's write lock (and the backing file's, for the base).
        qemu_io(&img, &["write -P 0x70 40M 64k"]);
        qemu_io(&base, &["write -P 0x71 50M 64k"]);
    }
}
