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
/// Started with `--fork`, whose parent exits only once the server listens: that is the
/// readiness signal (a socket file can exist before anyone accepts on it).
pub struct QemuNbd {
    pid: nix::unistd::Pid,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    stderr: PathBuf,
}

impl QemuNbd {
    /// Exports `image` (of `format`), with the dirty bitmap `bitmap` when given.
    pub fn start(image: &Path, format: &str, bitmap: Option<&str>) -> Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("cairn-nbd-")
            .tempdir()
            .map_err(|e| QemuError::Other(format!("temporary directory: {e}")))?;
        let socket = dir.path().join("nbd.sock");
        let pid_file = dir.path().join("qemu-nbd.pid");
        let stderr = dir.path().join("qemu-nbd.err");
        let err_file =
            std::fs::File::create(&stderr).map_err(|e| QemuError::Other(e.to_string()))?;
        let mut cmd = Command::new("qemu-nbd");
        cmd.args([
            "--read-only",
            "--fork",
            "--persistent",
            "--shared=4",
            "--cache=none",
            "--aio=threads",
            "-f",
            format,
        ])
        .arg("--pid-file")
        .arg(&pid_file)
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
        let status = cmd.status().map_err(|source| QemuError::Missing {
            program: "qemu-nbd",
            source,
        })?;
        let read_err = || {
            std::fs::read_to_string(&stderr)
                .unwrap_or_default()
                .trim()
                .to_owned()
        };
        if !status.success() {
            return Err(QemuError::Failed {
                program: "qemu-nbd",
                stderr: format!("{status}: {}", read_err()),
            });
        }
        let pid = std::fs::read_to_string(&pid_file)
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .ok_or_else(|| {
                QemuError::Other(format!("qemu-nbd wrote no pid file: {}", read_err()))
            })?;
        Ok(Self {
            pid: nix::unistd::Pid::from_raw(pid),
            socket,
            _dir: dir,
            stderr,
        })
    }

    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether the server still runs (a zombie counts as gone).
    fn alive(&self) -> bool {
        u32::try_from(self.pid.as_raw()).is_ok_and(crate::process::pid_alive)
    }

    /// Whether qemu-nbd still runs, and what it said on stderr (for error messages).
    pub fn diagnose(&mut self) -> String {
        let status = if self.alive() {
            "qemu-nbd is running"
        } else {
            "qemu-nbd has exited"
        };
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("{status}: {}", err.trim())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        // A read-only export has nothing to flush: SIGKILL (qemu-nbd takes seconds to act
        // on SIGTERM). Wait until it is gone, so its lock on the image is released before
        // anyone opens the image again.
        let _ = nix::sys::signal::kill(self.pid, nix::sys::signal::Signal::SIGKILL);
        let start = Instant::now();
        while self.alive() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}
