//! # cairn-recover: instant recovery
//!
//! A backup used before it is restored: a database answering queries ([`db`]), or a
//! virtual machine booting ([`vm`]), on the repository's mount, with a writable layer
//! on top that the repository never sees. Sessions are host state ([`state`]): recorded
//! before anything is made, and taken down, in reverse order, by [`stop`] or, after a
//! crash or a reboot, by [`cleanup`].
//!
//! - [`db`]: PostgreSQL and MariaDB on the mount's writable layer (or an overlay), run by a
//!   [`runtime::ServerRuntime`]: in a container ([`docker`]) or as a host process;
//!   [`engines`] is what differs between the two databases.
//! - [`vm`]: a libvirt domain defined from the snapshot's XML, on qcow2 overlays of its
//!   mounted disks; [`vm::promote`] moves it to real storage while it runs.
//! - [`verify`]: verifications built on both: a VM booted in an isolated lab and
//!   checked, a database checked, a sample of files restored and compared; their
//!   results as host state.

pub mod commit;
pub mod db;
pub mod docker;
pub mod engines;
pub mod mounting;
pub mod runtime;
pub mod state;
pub mod verify;
pub mod vm;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_agent::process::pid_alive;
use cairn_mount::is_mountpoint;

pub use db::{start, Layer, Request};
pub use runtime::{Runtime, ServerRuntime};
pub use state::{state_dir, SessionRecord, SessionState, Store};

use docker::Docker;

#[derive(Debug, thiserror::Error)]
pub enum RecoverError {
    #[error("snapshot {0} is not a physical database backup (take one with `repo backup --postgres` or `--mariadb`)")]
    NotADatabase(String),
    #[error("{0}")]
    Docker(String),
    #[error("session state: {0}")]
    State(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Setup(String),
    #[error("the database did not come up: {reason}\n--- server output ---\n{log}")]
    NotReady { reason: String, log: String },
    #[error("no recovery session {0}")]
    NoSession(String),
}

impl RecoverError {
    pub(crate) fn io(path: &Path, e: std::io::Error) -> Self {
        Self::Io {
            what: path.display().to_string(),
            source: e,
        }
    }
}

pub(crate) fn random_token(bytes: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut raw = vec![0u8; bytes];
    let _ = getrandom::getrandom(&mut raw);
    raw.iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

pub(crate) fn mkdir(p: &Path, mode: u32) -> Result<(), RecoverError> {
    std::fs::create_dir_all(p).map_err(|e| RecoverError::io(p, e))?;
    std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode))
        .map_err(|e| RecoverError::io(p, e))
}

pub(crate) fn chown(p: &Path, uid: u32, gid: u32) -> Result<(), RecoverError> {
    std::os::unix::fs::lchown(p, Some(uid), Some(gid)).map_err(|e| RecoverError::io(p, e))
}

/// Unmounts `p` if something is mounted there (waiting a little for a busy mount,
/// then detaching it lazily).
pub(crate) fn unmount_if_mounted(p: &Path) -> Result<(), RecoverError> {
    if !is_mountpoint(p) {
        return Ok(());
    }
    let root = nix::unistd::geteuid().is_root();
    for _ in 0..20 {
        let ok = if root {
            nix::mount::umount(p).is_ok()
        } else {
            Command::new("fusermount3")
                .arg("-u")
                .arg(p)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if ok || !is_mountpoint(p) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    cairn_mount::unmount(p).map_err(|e| RecoverError::io(p, e))
}

/// Signals the process group of `pid` (the server runs in its own group) and waits for
/// it to go, escalating to SIGKILL after `grace`.
pub(crate) fn stop_process(pid: u32, first: nix::sys::signal::Signal, grace: Duration) {
    use nix::sys::signal::{kill, killpg, Signal};
    let Ok(raw) = i32::try_from(pid) else { return };
    let p = nix::unistd::Pid::from_raw(raw);
    if killpg(p, first).is_err() {
        let _ = kill(p, first);
    }
    let start = Instant::now();
    while pid_alive(pid) {
        if start.elapsed() > grace {
            let _ = killpg(p, Signal::SIGKILL);
            let _ = kill(p, Signal::SIGKILL);
            std::thread::sleep(Duration::from_millis(100));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Our own child: reap it.
    let _ = nix::sys::wait::waitpid(p, Some(nix::sys::wait::WaitPidFlag::WNOHANG));
}

/// Removes a session directory, refusing while anything is still mounted in it.
pub(crate) fn remove_session_dir(dir: &Path) -> Result<(), RecoverError> {
    if !dir.exists() {
        return Ok(());
    }
    for sub in ["merged", "mnt"] {
        if is_mountpoint(&dir.join(sub)) {
            return Err(RecoverError::Setup(format!(
                "{} is still mounted; not removing the session's files",
                dir.join(sub).display()
            )));
        }
    }
    std::fs::remove_dir_all(dir).map_err(|e| RecoverError::io(dir, e))
}

/// Stops one session.
pub fn stop(store: &Store, id: &str) -> Result<SessionRecord, RecoverError> {
    let rec = store
        .get(id)?
        .ok_or_else(|| RecoverError::NoSession(id.to_owned()))?;
    take_down(store, &rec, None)?;
    Ok(rec)
}

/// Whether a session still serves: its creator is still setting it up, or its server,
/// its layer (or overlay) and its mount's daemon are all there.
#[must_use]
pub fn is_live(rec: &SessionRecord, docker: Option<&Docker>) -> bool {
    if let Some(pid) = rec.verifier {
        if pid != std::process::id() && !pid_alive(pid) {
            return false;
        }
    }
    if rec.state == SessionState::Starting {
        return pid_alive(rec.creator_pid) && rec.creator_pid != std::process::id();
    }
    if rec.is_vm() {
        return vm::is_live(rec);
    }
    // A container whose engine cannot be reached counts as gone: taking it down then
    // says why it cannot.
    let server = (rec.container.is_none() || docker.is_some())
        && runtime::for_record(rec, docker)
            .ok()
            .flatten()
            .is_some_and(|mut r| r.alive(rec));
    // A mount whose daemon died stays in the mount table (every access ENOTCONN).
    let mount_alive = rec.mount_pid.is_some_and(pid_alive);
    server
        && mount_alive
        && is_mountpoint(&rec.merged())
        && (rec.uses_block_layer() || is_mountpoint(&rec.mountpoint()))
}

/// What [`cleanup`] did.
#[derive(Debug, Default)]
pub struct Cleanup {
    pub sessions_removed: Vec<String>,
    pub containers_removed: Vec<String>,
    pub dirs_removed: Vec<PathBuf>,
    /// Verification labs (network namespaces) no session claims.
    pub labs_removed: Vec<String>,
    pub still_running: Vec<String>,
}

/// Removes what dead sessions left behind: recorded sessions that no longer serve,
/// labelled containers with no record, and session directories with no record.
pub fn cleanup(store: &Store) -> Result<Cleanup, RecoverError> {
    let mut report = Cleanup::default();
    let docker = Docker::connect().ok();
    let records = store.list()?;
    for rec in &records {
        if is_live(rec, docker.as_ref()) {
            report.still_running.push(rec.id.clone());
            continue;
        }
        take_down(store, rec, docker.as_ref())?;
        report.sessions_removed.push(rec.id.clone());
    }
    let known: Vec<String> = store.list()?.into_iter().map(|r| r.id).collect();
    if let Some(d) = &docker {
        for (cid, sid) in d.session_containers(&store.dir().display().to_string())? {
            if !known.contains(&sid) {
                d.remove(&cid)?;
                report.containers_removed.push(cid);
            }
        }
    }
    let sessions = store.sessions_dir();
    if let Ok(entries) = std::fs::read_dir(&sessions) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if known.contains(&name) {
                continue;
            }
            let dir = e.path();
            unmount_if_mounted(&dir.join("merged"))?;
            let mnt = dir.join("mnt");
            if is_mountpoint(&mnt) {
                cairn_mount::unmount(&mnt).map_err(|e| RecoverError::io(&mnt, e))?;
            }
            remove_session_dir(&dir)?;
            report.dirs_removed.push(dir);
        }
    }
    let claimed: Vec<String> = store.list()?.into_iter().filter_map(|r| r.lab).collect();
    for netns in verify::lab::list() {
        if !claimed.contains(&netns) && !verify::lab::owner_alive(&netns) {
            verify::lab::remove(&netns).map_err(RecoverError::Setup)?;
            report.labs_removed.push(netns);
        }
    }
    Ok(report)
}

/// Takes down everything `rec` names, of either kind, then forgets it.
fn take_down(
    store: &Store,
    rec: &SessionRecord,
    docker: Option<&Docker>,
) -> Result<(), RecoverError> {
    if rec.is_vm() {
        vm::take_down(store, rec)
    } else {
        db::take_down(store, rec, docker)
    }
}
