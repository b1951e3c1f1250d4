//! Starting the repository's mount as a background process: what `repo mount --daemon`,
//! `repo recover` and `repo serve`'s recovery sessions all do.
//!
//! The mount is the `repo` binary itself (`repo --repo PATH mount DIR ...`) in a process
//! group of its own, so that it outlives the command (or the request) that started it.
//! Its password goes over a pipe, never on a command line or in the environment.

use std::ffi::OsString;
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::RecoverError;

/// Set in the environment of a background mount that reads its password from standard
/// input (one line).
pub const PASSWORD_STDIN_ENV: &str = "CAIRN_DAEMON_PASSWORD_STDIN";

/// glibc malloc settings of a background mount: at most two arenas, and blobs (128 KiB
/// and more) always in their own mappings, returned to the system when freed. With
/// glibc's defaults (an arena per thread, a threshold that grows after the first free)
/// freed blob buffers pile up: a session's daemon peaked at 152 MB with a 64 MiB cache,
/// 96 MB with these (docs/RECOVERY.md).
const MALLOC_TUNABLES: &str = "glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=131072";

/// How long a mount may take to come up.
const MOUNT_WAIT: Duration = Duration::from_secs(60);

/// A background mount that is up.
#[derive(Debug, Clone)]
pub struct MountDaemon {
    pub pid: u32,
    /// Its standard error.
    pub log: PathBuf,
}

/// A session's mount of the repository.
#[derive(Debug, Clone, Copy)]
pub struct SessionMount<'a> {
    pub mountpoint: &'a Path,
    /// Every file shown as owned by this (uid, gid) (a VM session's QEMU).
    pub owner: Option<(u32, u32)>,
    /// One snapshot's root, writable through a layer (a database session's data
    /// directory); `None`: every snapshot, read-only.
    pub writable: Option<WritableLayer<'a>>,
}

/// A writable layer's directory and the snapshot (full id) it is over.
#[derive(Debug, Clone, Copy)]
pub struct WritableLayer<'a> {
    pub layer_dir: &'a Path,
    pub snapshot: &'a str,
    /// The copy-on-write chunk in bytes (`None`: the mount's default, 64 KiB).
    pub chunk: Option<u64>,
}

/// Starts a session's mount; returns the daemon's pid once mounted.
pub type SpawnMount<'a> = &'a dyn Fn(&SessionMount<'_>) -> Result<u32, String>;

/// Memory for decoded blobs of a session's mount: sessions are many and short-lived.
/// With it a session's daemon peaked at 84-98 MB on a 2 GiB database (docs/RECOVERY.md).
pub const SESSION_CACHE: &str = "64M";

/// The arguments of `repo` for a session's mount of `repository`: readable by other
/// users when we are root (the database or QEMU runs as another user), with a small
/// cache.
#[must_use]
pub fn session_mount_args(repository: &Path, m: &SessionMount<'_>) -> Vec<OsString> {
    let mut args: Vec<OsString> = vec!["--repo".into(), repository.as_os_str().to_owned()];
    args.extend(["mount".into(), m.mountpoint.as_os_str().to_owned()]);
    args.extend(["--cache-size".into(), SESSION_CACHE.into()]);
    if let Some((uid, gid)) = m.owner {
        args.extend(["--owner".into(), format!("{uid}:{gid}").into()]);
    }
    if let Some(w) = m.writable {
        args.extend([
            "--writable-layer".into(),
            w.layer_dir.as_os_str().to_owned(),
        ]);
        args.extend(["--snapshot".into(), w.snapshot.into()]);
        if let Some(c) = w.chunk {
            args.extend(["--chunk-size".into(), c.to_string().into()]);
        }
    }
    if nix::unistd::geteuid().is_root() {
        args.push("--allow-other".into());
    }
    args
}

/// Starts `exe ARGS` (a foreground mount of `mountpoint`) in a new process group, hands
/// it `password` (or an empty line for an unencrypted repository) over a pipe, and
/// returns once the filesystem is mounted; a mount that exits or does not come up within
/// a minute is an error that quotes its log.
pub fn spawn(
    exe: &Path,
    args: &[OsString],
    password: Option<&[u8]>,
    mountpoint: &Path,
) -> Result<MountDaemon, RecoverError> {
    let log = std::env::temp_dir().join(format!(
        "cairn-mount-{}-{}.log",
        std::process::id(),
        unique()
    ));
    let log_file = std::fs::File::create(&log).map_err(|e| RecoverError::io(&log, e))?;
    let tunables = match std::env::var("GLIBC_TUNABLES") {
        Ok(t) if !t.is_empty() => format!("{t}:{MALLOC_TUNABLES}"),
        _ => MALLOC_TUNABLES.to_owned(),
    };
    let mut child = Command::new(exe)
        .args(args)
        .env(PASSWORD_STDIN_ENV, "1")
        .env("GLIBC_TUNABLES", tunables)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .map_err(|e| RecoverError::io(exe, e))?;
    if let Some(mut stdin) = child.stdin.take() {
        let sent = password
            .map_or(Ok(()), |pw| stdin.write_all(pw))
            .and_then(|()| stdin.write_all(b"\n"));
        if let Err(e) = sent {
            let _ = child.kill();
            let _ = child.wait();
            return Err(RecoverError::Setup(format!(
                "handing the password to the background mount: {e}"
            )));
        }
    }
    let started = Instant::now();
    while started.elapsed() < MOUNT_WAIT {
        if cairn_mount::is_mounted(mountpoint) {
            let pid = child.id();
            // Reaped when it ends (after an unmount), so that a long-lived parent such as
            // `repo serve` keeps no zombie that would look alive.
            std::thread::spawn(move || child.wait());
            return Ok(MountDaemon { pid, log });
        }
        if let Ok(Some(status)) = child.try_wait() {
            let msg = std::fs::read_to_string(&log).unwrap_or_default();
            return Err(RecoverError::Setup(format!(
                "the background mount exited ({status}): {}",
                msg.trim()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    Err(RecoverError::Setup(format!(
        "the background mount did not come up within a minute; see {}",
        log.display()
    )))
}

/// Tells this process's mounts' logs apart.
fn unique() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
