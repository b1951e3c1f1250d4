//! qemu-img and qemu-nbd as subprocesses: image format detection, a private read-only
//! NBD export of an image file, and conversion of a restored raw image. Arguments are
//! vectors, never shell strings; stderr is kept for the error message.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("{program} could not be run ({source}); install qemu-utils")]
    Missing {
        program: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed: {stderr}")]
    Failed {
        program: &'static str,
        stderr: String,
    },
    #[error("{0}")]
    Other(String),
}

pub type Result<T> = std::result::Result<T, QemuError>;

/// What `qemu-img info` says of an image.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageInfo {
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    #[serde(rename = "format-specific", default)]
    pub format_specific: Option<serde_json::Value>,
}

fn run(program: &'static str, args: &[&std::ffi::OsStr]) -> Result<Vec<u8>> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| QemuError::Missing { program, source })?;
    if !out.status.success() {
        return Err(QemuError::Failed {
            program,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    Ok(out.stdout)
}

/// What `qemu-img info --backing-chain` says of an image and each file it reads from:
/// the image itself first, then its backing files in order. One subprocess for all.
pub fn image_chain(path: &Path) -> Result<Vec<(PathBuf, ImageInfo)>> {
    #[derive(Deserialize)]
    struct Entry {
        filename: PathBuf,
        #[serde(flatten)]
        info: ImageInfo,
    }
    let out = run(
        "qemu-img",
        &[
            "info".as_ref(),
            "--backing-chain".as_ref(),
            "--output=json".as_ref(),
            "--".as_ref(),
            path.as_os_str(),
        ],
    )?;
    let chain: Vec<Entry> = serde_json::from_slice(&out).map_err(|e| {
        QemuError::Other(format!(
            "qemu-img info --backing-chain: unreadable output: {e}"
        ))
    })?;
    if chain.is_empty() {
        return Err(QemuError::Other(format!(
            "qemu-img info --backing-chain: nothing said of {}",
            path.display()
        )));
    }
    Ok(chain.into_iter().map(|e| (e.filename, e.info)).collect())
}

/// A persistent dirty bitmap of a qcow2 image, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    pub name: String,
    /// Marked in use: QEMU had the image open and did not close it cleanly (it was
    /// killed or crashed), so the bitmap may miss writes and must not be trusted.
    pub in_use: bool,
    /// Recording writes.
    pub enabled: bool,
}

/// The persistent bitmaps of a qcow2 image (none for other formats). `force_share`
/// reads an image a running VM has open (its bitmaps then all say "in use").
pub fn bitmaps(path: &Path, force_share: bool) -> Result<Vec<Bitmap>> {
    let mut args: Vec<&std::ffi::OsStr> = vec!["info".as_ref(), "--output=json".as_ref()];
    if force_share {
        args.push("-U".as_ref());
    }
    args.push("--".as_ref());
    args.push(path.as_os_str());
    let out = run("qemu-img", &args)?;
    let info: ImageInfo = serde_json::from_slice(&out)
        .map_err(|e| QemuError::Other(format!("qemu-img info: unreadable output: {e}")))?;
    let list = info
        .format_specific
        .as_ref()
        .and_then(|f| f.get("data"))
        .and_then(|d| d.get("bitmaps"))
        .and_then(serde_json::Value::as_array)
        .cloned()
        .unwrap_or_default();
    Ok(list
        .iter()
        .filter_map(|b| {
            let flags: Vec<&str> = b
                .get("flags")
                .and_then(serde_json::Value::as_array)
                .map(|f| f.iter().filter_map(serde_json::Value::as_str).collect())
                .unwrap_or_default();
            Some(Bitmap {
                name: b.get("name")?.as_str()?.to_owned(),
                in_use: flags.contains(&"in-use"),
                enabled: flags.contains(&"auto"),
            })
        })
        .collect())
}

/// Adds an enabled persistent bitmap `name` to a qcow2 image nobody has open.
pub fn bitmap_add(path: &Path, name: &str) -> Result<()> {
    run(
        "qemu-img",
        &[
            "bitmap".as_ref(),
            "--add".as_ref(),
            "--enable".as_ref(),
            "--".as_ref(),
            path.as_os_str(),
            name.as_ref(),
        ],
    )
    .map(drop)
}

/// Removes the persistent bitmap `name` from a qcow2 image nobody has open.
pub fn bitmap_remove(path: &Path, name: &str) -> Result<()> {
    run(
        "qemu-img",
        &[
            "bitmap".as_ref(),
            "--remove".as_ref(),
            "--".as_ref(),
            path.as_os_str(),
            name.as_ref(),
        ],
    )
    .map(drop)
}

/// Creates an empty image of `format` and `size` bytes.
pub fn create_image(path: &Path, format: &str, size: u64) -> Result<()> {
    run(
        "qemu-img",
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            format.as_ref(),
            "--".as_ref(),
            path.as_os_str(),
            size.to_string().as_ref(),
        ],
    )
    .map(drop)
}

/// Creates a qcow2 image over the backing file `backing` (of format `backing_format`).
pub fn create_overlay(path: &Path, backing: &Path, backing_format: &str) -> Result<()> {
    run(
        "qemu-img",
        &[
            "create".as_ref(),
            "-q".as_ref(),
            "-f".as_ref(),
            "qcow2".as_ref(),
            "-F".as_ref(),
            backing_format.as_ref(),
            "-b".as_ref(),
            backing.as_os_str(),
            "--".as_ref(),
            path.as_os_str(),
        ],
    )
    .map(drop)
}

/// Formats accepted by `repo backup --image`.
pub const FORMATS: [&str; 3] = ["raw", "qcow2", "vmdk"];

/// Converts a raw image into `format` at `dst`.
pub fn convert_raw(src: &Path, dst: &Path, format: &str) -> Result<()> {
    run(
        "qemu-img",
        &[
            "convert".as_ref(),
            "-f".as_ref(),
            "raw".as_ref(),
            "-O".as_ref(),
            format.as_ref(),
            "--".as_ref(),
            src.as_os_str(),
            dst.as_os_str(),
        ],
    )
    .map(drop)
}

/// A `qemu-nbd --read-only` serving one image on a private Unix socket; stopped on drop.
///
/// qemu-nbd runs as our child (not `--fork`ed away), so that stopping it can wait for
/// the whole process to be gone: only then are its files closed and its lock on the
/// image released. A forked-away server is a zombie as soon as its main thread dies,
/// while its I/O threads may still hold the image open; waiting on that state is how an
/// image stayed locked after `repo backup --image` had returned. It is ready once its
/// socket accepts a connection.
pub struct QemuNbd {
    child: std::process::Child,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    stderr: PathBuf,
}

/// How long qemu-nbd may take to listen (a loaded machine starts it slowly).
const START_TIMEOUT: Duration = Duration::from_secs(60);

impl QemuNbd {
    /// Exports `image` (of `format`), with the dirty bitmap `bitmap` when given.
    pub fn start(image: &Path, format: &str, bitmap: Option<&str>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("cairn-nbd-")
            .tempdir()
            .map_err(|e| QemuError::Other(format!("temporary directory: {e}")))?;
        let socket = dir.path().join("nbd.sock");
        let stderr = dir.path().join("qemu-nbd.err");
        let err_file =
            std::fs::File::create(&stderr).map_err(|e| QemuError::Other(e.to_string()))?;
        let mut cmd = Command::new("qemu-nbd");
        cmd.args([
            "--read-only",
            "--persistent",
            "--shared=4",
            "--cache=none",
            "--aio=threads",
            "-f",
            format,
        ])
        .arg("-k")
        .arg(&socket);
        if let Some(b) = bitmap {
            cmd.args(["-B", b]);
        }
        cmd.arg("--")
            .arg(image)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err_file);
        let child = cmd.spawn().map_err(|source| QemuError::Missing {
            program: "qemu-nbd",
            source,
        })?;
        let mut server = Self {
            child,
            socket,
            _dir: dir,
            stderr,
        };
        server.wait_until_listening()?;
        Ok(server)
    }

    /// Waits until the server greets a client; fails if qemu-nbd exits first.
    ///
    /// A connection alone proves nothing: qemu-nbd listens before it opens the image,
    /// so a connect succeeds (the kernel queues it) even when the image then fails to
    /// open. The greeting (`NBDMAGIC`) is sent only once the export exists.
    fn wait_until_listening(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            if self.greets() {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(QemuError::Failed {
                    program: "qemu-nbd",
                    stderr: format!("{status}: {}", self.read_stderr()),
                });
            }
            if start.elapsed() > START_TIMEOUT {
                return Err(QemuError::Other(format!(
                    "qemu-nbd did not listen within {} s: {}",
                    START_TIMEOUT.as_secs(),
                    self.read_stderr()
                )));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Whether a fresh connection to the socket receives the NBD greeting.
    fn greets(&self) -> bool {
        use std::io::Read;
        let Ok(mut c) = std::os::unix::net::UnixStream::connect(&self.socket) else {
            return false;
        };
        let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
        let mut magic = [0u8; 8];
        c.read_exact(&mut magic).is_ok() && &magic == b"NBDMAGIC"
    }

    fn read_stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr)
            .unwrap_or_default()
            .trim()
            .to_owned()
    }

    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether qemu-nbd still runs, and what it said on stderr (for error messages).
    pub fn diagnose(&mut self) -> String {
        let status = match self.child.try_wait() {
            Ok(None) => "qemu-nbd is running".to_owned(),
            Ok(Some(s)) => format!("qemu-nbd has exited ({s})"),
            Err(e) => format!("qemu-nbd's state is unknown ({e})"),
        };
        format!("{status}: {}", self.read_stderr())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // A read-only export has nothing to flush: SIGKILL (qemu-nbd takes seconds to act
        // on SIGTERM). Then wait for the whole process, every thread of it: only then is
        // the image closed and its lock released, and anyone may open it again (the VM
        // started right after a backup). A process in uninterruptible I/O may take a
        // while; we say so rather than return early.
        let _ = self.child.kill();
        let started = Instant::now();
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => return,
                Ok(None) => {}
            }
            if started.elapsed() > Duration::from_secs(5) {
                tracing::warn!(
                    "qemu-nbd (pid {}) has not exited 5 s after SIGKILL; waiting for it to release the image",
                    self.child.id()
                );
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::NbdClient;

    fn have(program: &str) -> bool {
        let found = Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok();
        assert!(
            found || std::env::var_os("CI").is_none(),
            "{program} is missing, and CI must run this test"
        );
        found
    }

    fn qemu_io(image: &Path, command: &str) -> std::process::Output {
        Command::new("qemu-io")
            .args(["-c", command])
            .arg(image)
            .output()
            .unwrap()
    }

    /// The image is released when the server is dropped: a writer that opens it right
    /// then (a VM started after its backup) gets its lock, every time, on the image and
    /// on its backing file, while the server was busy reading when it was stopped.
    #[test]
    fn a_stopped_server_has_released_the_image_and_its_backing_file() {
        if !(have("qemu-img") && have("qemu-nbd") && have("qemu-io")) {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let base = d.path().join("base.qcow2");
        let img = d.path().join("vm.qcow2");
        run(
            "qemu-img",
            &[
                "create".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                base.as_os_str(),
                "64M".as_ref(),
            ],
        )
        .unwrap();
        assert!(qemu_io(&base, "write -P 0x61 0 32M").status.success());
        run(
            "qemu-img",
            &[
                "create".as_ref(),
                "-q".as_ref(),
                "-f".as_ref(),
                "qcow2".as_ref(),
                "-F".as_ref(),
                "qcow2".as_ref(),
                "-b".as_ref(),
                base.as_os_str(),
                img.as_os_str(),
            ],
        )
        .unwrap();
        for round in 0..25 {
            let server = QemuNbd::start(&img, "qcow2", None).unwrap();
            let mut client =
                NbdClient::connect_unix(server.socket(), "", &[], Duration::from_secs(30)).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            for i in 0..(4 + round % 8) {
                client.read(i << 20, &mut buf).unwrap();
            }
            assert!(buf.iter().all(|&b| b == 0x61));
            // Stopped while the client is still connected (an error path), or after it
            // left (the normal one).
            if round % 2 == 0 {
                drop(client);
            }
            drop(server);
            for image in [&img, &base] {
                let out = qemu_io(image, "write -P 0x62 40M 64k");
                assert!(
                    out.status.success(),
                    "round {round}: {} still locked: {}",
                    image.display(),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }

    #[test]
    fn a_server_that_cannot_start_says_why() {
        if !have("qemu-nbd") {
            return;
        }
        let d = tempfile::tempdir().unwrap();
        let missing = d.path().join("nothing.qcow2");
        let err = QemuNbd::start(&missing, "qcow2", None).err().unwrap();
        assert!(err.to_string().contains("nothing.qcow2"), "{err}");
    }
}
