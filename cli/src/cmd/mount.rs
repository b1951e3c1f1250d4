//! `repo mount` and `repo umount`.
//!
//! In the foreground, SIGINT, SIGTERM and SIGHUP are blocked in every thread and taken
//! by the main thread with `sigwait`, which then unmounts (lazily) and waits for the
//! session to end. An unmount from outside (`repo umount`, `fusermount3 -u`) ends the
//! session, whose watcher thread then wakes the main thread. `--daemon` starts the same
//! command again in a new process group, hands it the password over a pipe, and
//! returns once the filesystem is mounted.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use cairn_engine::crypto::Encryption;
use cairn_engine::Repository;
use cairn_mount::{MountOptions, ViewOptions};
use nix::sys::signal::{SigSet, Signal};

use crate::args::Global;
use crate::exit;
use crate::open::Settings;

/// What `repo mount` was asked for.
pub struct Request {
    pub daemon: bool,
    pub allow_other: bool,
    /// Bytes of decoded blobs to keep.
    pub cache_size: u64,
    /// Request threads; `None`: the default.
    pub threads: Option<u16>,
    /// Files of at least this size are read with direct I/O (`Some(None)`: none);
    /// `None`: the default.
    pub direct_io_from: Option<Option<u64>>,
    /// Every file shown as owned by this (uid, gid).
    pub owner: Option<(u32, u32)>,
    /// One snapshot directory, writable through a layer.
    pub writable: Option<Writable>,
}

/// `--writable-layer DIR --snapshot S [--dir PATH] [--chunk-size N]`.
pub struct Writable {
    pub dir: std::path::PathBuf,
    pub snapshot: String,
    pub path: std::path::PathBuf,
    pub chunk: u64,
}

pub fn mount(s: &Settings, g: &Global, mountpoint: &Path, req: &Request) -> Result<u8> {
    if !mountpoint.is_dir() {
        bail!(
            "{}: not a directory (create it first)",
            mountpoint.display()
        );
    }
    let mountpoint =
        std::fs::canonicalize(mountpoint).with_context(|| mountpoint.display().to_string())?;
    if cairn_mount::is_mounted(&mountpoint) {
        bail!(
            "{}: a cairn filesystem is already mounted there",
            mountpoint.display()
        );
    }
    if req.daemon {
        return spawn_daemon(s, &mountpoint);
    }
    let signals = SigSet::from_iter([Signal::SIGINT, Signal::SIGTERM, Signal::SIGHUP]);
    signals.thread_block().context("blocking signals")?;
    let repo: Arc<Repository> = Arc::new(s.open_for_reading("mount")?);
    let defaults = MountOptions::default();
    let opts = MountOptions {
        allow_other: req.allow_other,
        view: ViewOptions {
            cache_bytes: usize::try_from(req.cache_size).unwrap_or(usize::MAX),
            owner: req.owner,
            ..ViewOptions::default()
        },
        threads: req.threads.map_or(defaults.threads, usize::from),
        direct_io_from: req.direct_io_from.unwrap_or(defaults.direct_io_from),
    };
    let (session, layer) = match &req.writable {
        None => (cairn_mount::mount(repo, &mountpoint, &opts), None),
        Some(w) => mount_layer(repo, w, &mountpoint, &opts)?,
    };
    let session = session.with_context(|| {
        format!(
            "mounting at {} (is fuse3 installed and /dev/fuse usable?)",
            mountpoint.display()
        )
    })?;
    if !g.quiet {
        eprintln!(
            "mounted at {}; Ctrl-C or `repo umount {}` unmounts",
            mountpoint.display(),
            mountpoint.display()
        );
    }
    let (done_tx, done_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let r = session.join();
        let _ = done_tx.send(r);
        // Wake the main thread's sigwait.
        let _ = nix::sys::signal::kill(nix::unistd::getpid(), Signal::SIGTERM);
    });
    let _ = signals.wait();
    if cairn_mount::is_mounted(&mountpoint) {
        cairn_mount::unmount(&mountpoint)
            .with_context(|| format!("unmounting {}", mountpoint.display()))?;
    }
    match done_rx.recv_timeout(Duration::from_secs(5)) {
        Ok(Err(e)) => tracing::warn!("filesystem session ended with: {e}"),
        Ok(Ok(())) => {}
        // A reader still holds a file open: the mount is detached already; leaving
        // ends the connection.
        Err(_) => tracing::info!("files still open at unmount; closing the connection"),
    }
    if let Some(layer) = layer {
        // What the kernel's last requests left (the session may end before `destroy`).
        layer
            .sync_all()
            .with_context(|| format!("syncing the writable layer of {}", mountpoint.display()))?;
    }
    if !g.quiet {
        eprintln!("unmounted {}", mountpoint.display());
    }
    Ok(exit::OK)
}

type Mounted = (
    std::io::Result<cairn_mount::BackgroundSession>,
    Option<Arc<cairn_mount::layer::Layer>>,
);

/// Mounts one snapshot directory with a writable layer.
fn mount_layer(
    repo: Arc<Repository>,
    w: &Writable,
    mountpoint: &Path,
    opts: &MountOptions,
) -> Result<Mounted> {
    let snapshot = super::find_snapshot(&repo, &w.snapshot, &crate::args::Filter::default())?;
    std::fs::create_dir_all(&w.dir).with_context(|| w.dir.display().to_string())?;
    let target = cairn_mount::WritableTarget {
        snapshot: &snapshot,
        path: &w.path,
        layer_dir: &w.dir,
        chunk: w.chunk,
    };
    Ok(
        match cairn_mount::mount_writable(repo, &target, mountpoint, opts) {
            Ok((session, layer)) => (Ok(session), Some(layer)),
            Err(e) => (Err(e), None),
        },
    )
}

fn spawn_daemon(s: &Settings, mountpoint: &Path) -> Result<u8> {
    let args: Vec<std::ffi::OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--daemon")
        .collect();
    let (pid, log) = spawn_mount_daemon(s, mountpoint, &args)?;
    println!(
        "mounted at {} (pid {pid}, log {})",
        mountpoint.display(),
        log.display()
    );
    Ok(exit::OK)
}

/// Starts `repo ARGS` (a foreground mount of `mountpoint`) in a new process group,
/// hands it the password over a pipe, and returns its pid and log file once the
/// filesystem is mounted.
pub fn spawn_mount_daemon(
    s: &Settings,
    mountpoint: &Path,
    args: &[std::ffi::OsString],
) -> Result<(u32, std::path::PathBuf)> {
    let encrypted = s.peek_config()?.encryption != Encryption::None;
    let password = if encrypted {
        Some(s.password(false)?)
    } else {
        None
    };
    let exe = std::env::current_exe().context("finding the repo binary")?;
    let m = cairn_recover::mounting::spawn(
        &exe,
        args,
        password.as_deref().map(Vec::as_slice),
        mountpoint,
    )?;
    Ok((m.pid, m.log))
}

pub fn umount(mountpoint: &Path) -> Result<u8> {
    let mp = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_owned());
    if !cairn_mount::is_mounted(&mp) {
        bail!("{}: no cairn filesystem is mounted there", mp.display());
    }
    cairn_mount::unmount(&mp).with_context(|| format!("unmounting {}", mp.display()))?;
    // The serving process notices and exits.
    Ok(exit::OK)
}

/// `--owner`: a user name, or UID[:GID] (the user's group when GID is left out).
pub fn parse_owner(s: &str) -> Result<(u32, u32)> {
    let (user, group) = match s.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (s, None),
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(n) => (
            n,
            nix::unistd::User::from_uid(n.into())
                .ok()
                .flatten()
                .map_or(n, |u| u.gid.as_raw()),
        ),
        Err(_) => {
            let u = nix::unistd::User::from_name(user)
                .ok()
                .flatten()
                .with_context(|| format!("--owner: no user {user:?}"))?;
            (u.uid.as_raw(), u.gid.as_raw())
        }
    };
    let gid = match group {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => nix::unistd::Group::from_name(g)
                .ok()
                .flatten()
                .with_context(|| format!("--owner: no group {g:?}"))?
                .gid
                .as_raw(),
        },
    };
    Ok((uid, gid))
}
