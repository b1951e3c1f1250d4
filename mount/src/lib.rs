//! # cairn-mount: snapshots as a filesystem
//!
//! - [`view`]: the read-only filesystem logic over a repository, plain Rust, testable
//!   without FUSE.
//! - [`layout`]: how snapshots are named (`snapshots/`, `hosts/`).
//! - [`cache`]: the LRU cache of decoded blobs shared by all reads.
//! - [`fuse`]: the thin fuser adapter of the view.
//! - [`layer`]: a writable layer over one directory of a snapshot (copy on write in
//!   fixed chunks), with its own adapter: what recovery sessions run on.
//!
//! [`mount`] starts serving a repository at a mountpoint, [`mount_writable`] one
//! snapshot directory with a writable layer; [`unmount`] detaches either (lazily: a
//! reader holding a file open does not keep the mount in the mount table).

pub mod cache;
pub mod fuse;
pub mod layer;
pub mod layout;
pub mod prefetch;
pub mod trees;
pub mod view;

use std::io;
use std::path::Path;
use std::sync::Arc;

use cairn_engine::Repository;
use fuser::{Config, MountOption, SessionACL};

pub use fuser::BackgroundSession;
pub use view::{View, ViewOptions};

/// [`MountOptions::direct_io_from`] by default: 2 GiB.
pub const DEFAULT_DIRECT_IO_FROM: u64 = 2 << 30;

#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Let users other than the one mounting use the mount (the kernel still enforces
    /// every file's owner and mode: `default_permissions`). Needed when a service
    /// running as another user (PostgreSQL in an overlay) reads it: overlayfs
    /// revalidates lower entries with the caller's credentials, and a refused lookup
    /// surfaces as ESTALE. Non-root users need `user_allow_other` in /etc/fuse.conf.
    pub allow_other: bool,
    pub view: ViewOptions,
    /// Threads serving FUSE requests (default: the cores, at least 2).
    pub threads: usize,
    /// Files of at least this many bytes bypass the kernel's page cache (direct I/O),
    /// where the kernel can still mmap them (see [`fuse`]); `None`: every file uses it.
    /// Default 2 GiB: VM disks and dumps, which are read in long runs and would only
    /// push everything else out of the page cache; not a database's files (PostgreSQL's
    /// are at most 1 GiB), which a server re-reads and the page cache serves best.
    pub direct_io_from: Option<u64>,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            allow_other: false,
            view: ViewOptions::default(),
            // As many as cores: more only contend for them (the prefetch pool absorbs
            // a sequential reader's waits on the disk).
            threads: cairn_engine::threads::cores().max(2),
            direct_io_from: Some(DEFAULT_DIRECT_IO_FROM),
        }
    }
}

/// The FUSE session's configuration: `access` (RO or RW), the kernel checking every
/// owner and mode, other users let in when asked, `opts.threads` request threads.
fn fuse_config(fsname: String, access: MountOption, opts: &MountOptions) -> Config {
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(fsname),
        MountOption::Subtype("cairn".into()),
        access,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::DefaultPermissions,
    ];
    if opts.allow_other {
        config.acl = SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    config
}

/// Mounts `repo` at `mountpoint` and serves it from background threads until the
/// returned session is unmounted or dropped.
pub fn mount(
    repo: Arc<Repository>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> io::Result<fuser::BackgroundSession> {
    let fsname = format!("cairn:{}", repo.location());
    let view = Arc::new(View::new(repo, opts.view.clone()).map_err(io::Error::other)?);
    let config = fuse_config(fsname, MountOption::RO, opts);
    fuser::spawn_mount(
        fuse::CairnFs::new(view, opts.direct_io_from),
        mountpoint,
        &config,
    )
}

/// What [`mount_writable`] serves: a directory of one snapshot, and where its layer is.
#[derive(Debug, Clone)]
pub struct WritableTarget<'a> {
    pub snapshot: &'a cairn_engine::snapshot::Snapshot,
    /// The directory inside the snapshot (empty: its root).
    pub path: &'a Path,
    /// The layer's directory (made if new; an existing one is reopened).
    pub layer_dir: &'a Path,
    /// Copy-on-write chunk of a new layer, in bytes.
    pub chunk: u64,
}

/// Mounts `target`'s snapshot directory at `mountpoint`, writable: every change lands in
/// the layer, never in the repository. Returns the session and the layer (to sync it
/// once the session ended).
pub fn mount_writable(
    repo: Arc<Repository>,
    target: &WritableTarget<'_>,
    mountpoint: &Path,
    opts: &MountOptions,
) -> io::Result<(fuser::BackgroundSession, Arc<layer::Layer>)> {
    let fsname = format!("cairn:{}", repo.location());
    let view = Arc::new(View::new(repo, opts.view.clone()).map_err(io::Error::other)?);
    let dir_name = layout::snapshot_dir_name(target.snapshot);
    let mut path: Vec<&[u8]> = vec![b"snapshots", dir_name.as_bytes()];
    for c in target.path.components() {
        if let std::path::Component::Normal(c) = c {
            path.push(std::os::unix::ffi::OsStrExt::as_bytes(c));
        }
    }
    let layer = layer::Layer::open_dir(
        view,
        &target.snapshot.id.to_hex(),
        &path,
        target.layer_dir,
        target.chunk,
    )
    .map_err(|e| io::Error::other(format!("{}: {e}", target.layer_dir.display())))?;
    let layer = Arc::new(layer);
    let config = fuse_config(fsname, MountOption::RW, opts);
    let session = fuser::spawn_mount(
        layer::fuse::LayerFs::new(layer.clone()),
        mountpoint,
        &config,
    )?;
    Ok((session, layer))
}

/// Detaches the mount at `mountpoint` (lazily, like `umount -l`): it leaves the mount
/// table at once even if a file is still open.
pub fn unmount(mountpoint: &Path) -> io::Result<()> {
    if nix::unistd::geteuid().is_root() {
        return nix::mount::umount2(mountpoint, nix::mount::MntFlags::MNT_DETACH)
            .map_err(io::Error::from);
    }
    let out = std::process::Command::new("fusermount3")
        .args(["-u", "-z", "--"])
        .arg(mountpoint)
        .output()?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "fusermount3 -u failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}

/// Whether a mount at `path` in /proc/self/mountinfo satisfies `pred(fstype, source)`.
fn mounted_where(path: &Path, pred: impl Fn(&str, &str) -> bool) -> bool {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let want = path.to_string_lossy();
    info.lines().any(|l| {
        let Some((mount, fs)) = l.split_once(" - ") else {
            return false;
        };
        let mut fs = fs.split(' ');
        let (fstype, source) = (fs.next().unwrap_or(""), fs.next().unwrap_or(""));
        mount
            .split(' ')
            .nth(4)
            .is_some_and(|mp| unescape(mp) == want)
            && pred(fstype, source)
    })
}

/// Whether `path` is the mountpoint of a cairn filesystem (fstype `fuse*` with a source
/// `cairn:...`).
#[must_use]
pub fn is_mounted(path: &Path) -> bool {
    mounted_where(path, |fstype, source| {
        fstype.starts_with("fuse") && source.starts_with("cairn:")
    })
}

/// Whether anything at all is mounted at `path` (an overlay, any filesystem).
#[must_use]
pub fn is_mountpoint(path: &Path) -> bool {
    mounted_where(path, |_, _| true)
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 4], 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
