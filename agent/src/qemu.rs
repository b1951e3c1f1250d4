//! qemu-img and qemu-nbd as subprocesses: image format detection, a private read-only
//! NBD export of an image file, and conversion of a restored raw image. Arguments are
//! vectors, never shell strings; stderr is kept for the error message.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// Detects an image's format and virtual size.
pub fn image_info(path: &Path) -> Result<ImageInfo> {
    let out = run(
        "qemu-img",
        &[
            "info".as_ref(),
            "--output=json".as_ref(),
            "--".as_ref(),
            path.as_os_str(),
        ],
    )?;
    serde_json::from_slice(&out)
        .map_err(|e| QemuError::Other(format!("qemu-img info: unreadable output: {e}")))
}

/// The files an image reads from: itself and its backing files, in order.
pub fn backing_chain(path: &Path) -> Result<Vec<PathBuf>> {
    #[derive(Deserialize)]
    struct Entry {
        filename: PathBuf,
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
    Ok(chain.into_iter().map(|e| e.filename).collect())
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
pub struct QemuNbd {
    child: Child,
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
        let stderr = dir.path().join("qemu-nbd.err");
        let err_file =
            std::fs::File::create(&stderr).map_err(|e| QemuError::Other(e.to_string()))?;
        let mut cmd = Command::new("qemu-nbd");
        cmd.args([
            "--read-only",
            "--shared=4",
            "--cache=none",
            "--aio=threads",
            "-f",
            format,
            "-k",
        ])
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
        let mut me = Self {
            child,
            socket,
            _dir: dir,
            stderr,
        };
        let start = Instant::now();
        while !me.socket.exists() {
            if let Ok(Some(status)) = me.child.try_wait() {
                let msg = std::fs::read_to_string(&me.stderr).unwrap_or_default();
                return Err(QemuError::Failed {
                    program: "qemu-nbd",
                    stderr: format!("{status}: {}", msg.trim()),
                });
            }
            if start.elapsed() > Duration::from_secs(30) {
                return Err(QemuError::Other(
                    "qemu-nbd did not open its socket within 30 s".into(),
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(me)
    }

    #[must_use]
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Whether qemu-nbd has exited, and what it said on stderr (for error messages).
    pub fn diagnose(&mut self) -> String {
        let status = match self.child.try_wait() {
            Ok(Some(s)) => format!("qemu-nbd exited ({s})"),
            _ => "qemu-nbd is running".to_owned(),
        };
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("{status}: {}", err.trim())
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
