//! Restoring a snapshot (or parts of it) into a directory.
//!
//! Each backed-up path is recreated under the target (`/var/lib/x` lands in
//! `TARGET/var/lib/x`). Safety: names come from validated trees (one component each, never
//! `..`), so joined paths stay inside the target; a symlink or file already in the way
//! of a directory is replaced rather than followed, and files are opened with O_NOFOLLOW.
//!
//! Order: directories (pre-order), file contents ([`content`]: each blob read once, in
//! pack order, written in parallel; holes are never written), hard links, symlinks and
//! special files, then metadata (xattrs, owner, mode, times), directories last and
//! deepest first so their times stick. A damaged blob costs the files that use it, which
//! are reported, and nothing else. Unless asked not to, a restore ends with its data on
//! disk ([`writeback`]).

mod content;
pub mod writeback;

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use nix::sys::stat::{utimensat, Mode, SFlag, UtimensatFlags};
use nix::sys::time::TimeSpec;
use rayon::prelude::*;
use serde::Serialize;

use crate::backup::{Warning, Warnings};
use crate::error::{Error, IoContext, Result};
use crate::progress::Progress;
use crate::repository::Repository;
use crate::snapshot::Snapshot;
use crate::tree::{Node, NodeKind};
use crate::walk;
use content::FileToWrite;
use writeback::Writeback;

#[derive(Debug, Clone, Default)]
pub struct RestoreOptions {
    pub target: PathBuf,
    /// Paths inside the snapshot to restore (with everything below them); empty = all.
    pub includes: Vec<PathBuf>,
    /// Threads writing files (0: twice the cores).
    pub threads: usize,
    /// Return as soon as everything is written, without waiting for the data to reach
    /// the disk (and without starting its writeback early).
    pub no_sync: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RestoreOutcome {
    pub files: u64,
    pub dirs: u64,
    pub bytes: u64,
    pub warnings: Vec<Warning>,
}

struct Item {
    /// Path inside the snapshot, absolute.
    path: PathBuf,
    /// Boxed: the list of items grows by doubling, and a node is large.
    node: Box<Node>,
}

fn included(path: &Path, includes: &[PathBuf], is_dir: bool) -> bool {
    includes.is_empty()
        || includes
            .iter()
            .any(|i| path.starts_with(i) || (is_dir && i.starts_with(path)))
}

fn dest(target: &Path, snapshot_path: &Path) -> PathBuf {
    target.join(snapshot_path.strip_prefix("/").unwrap_or(snapshot_path))
}

/// Restores `snap` according to `opts`.
pub fn restore(
    repo: &Repository,
    snap: &Snapshot,
    opts: &RestoreOptions,
    progress: &Progress,
) -> Result<RestoreOutcome> {
    let includes: Vec<PathBuf> = opts
        .includes
        .iter()
        .map(|p| Path::new("/").join(p))
        .collect();
    for i in &includes {
        walk::resolve(repo, &snap.manifest.root, i)?;
    }
    let pool = crate::threads::io_pool(opts.threads, "restore", 0)?;
    let started = std::time::Instant::now();
    let phase = |what: &str| tracing::debug!("restore: {what} done at {:.2?}", started.elapsed());
    let keep = |p: &Path, n: &Node| {
        let keep = included(p, &includes, n.kind == NodeKind::Dir);
        if keep && n.kind == NodeKind::File {
            Progress::add(&progress.total_files, 1);
            Progress::add(&progress.total_bytes, n.size);
        }
        keep
    };
    let make = |path, node| Item {
        path,
        node: Box::new(node),
    };
    let items: Vec<Item> =
        pool.install(|| walk::collect(repo, &snap.manifest.root, Path::new("/"), &keep, &make))?;
    progress
        .total_known
        .store(true, std::sync::atomic::Ordering::Relaxed);

    phase("snapshot tree read");
    let target = &opts.target;
    fs::create_dir_all(target).ctx(|| format!("creating {}", target.display()))?;
    if !fs::metadata(target)
        .ctx(|| target.display().to_string())?
        .is_dir()
    {
        return Err(Error::InvalidInput(format!(
            "{}: not a directory",
            target.display()
        )));
    }
    let mut out = RestoreOutcome::default();
    let warnings = Warnings::default();
    let warn = |path: &Path, message: String, lost: bool| {
        warnings.add(path, message, lost, progress);
    };

    // Directories first, parents before children.
    let mut failed_dirs: Vec<PathBuf> = Vec::new();
    for it in items.iter().filter(|i| i.node.kind == NodeKind::Dir) {
        if failed_dirs.iter().any(|f| it.path.starts_with(f)) {
            continue;
        }
        if let Err(e) = make_dir(&dest(target, &it.path)) {
            warn(&it.path, format!("directory not created: {e}"), true);
            failed_dirs.push(it.path.clone());
        } else {
            out.dirs += 1;
        }
    }
    let live = |it: &&Item| {
        !failed_dirs
            .iter()
            .any(|f| it.path.starts_with(f) && it.path != *f)
    };

    phase("directories created");
    // Files: the first name of each hard-linked inode gets the content.
    let mut first_link: HashMap<(u64, u64), PathBuf> = HashMap::new();
    let mut files = Vec::new();
    let mut links = Vec::new();
    for it in items
        .iter()
        .filter(live)
        .filter(|i| i.node.kind == NodeKind::File)
    {
        let key = (it.node.device, it.node.inode);
        if it.node.links > 1 && it.node.inode != 0 {
            if let Some(first) = first_link.get(&key) {
                links.push((first.clone(), it));
                continue;
            }
            first_link.insert(key, it.path.clone());
        }
        files.push(it);
    }
    let writeback = if opts.no_sync {
        None
    } else {
        Some(Writeback::start(target).ctx(|| target.display().to_string())?)
    };
    let dests: Vec<PathBuf> = files.iter().map(|it| dest(target, &it.path)).collect();
    let to_write: Vec<FileToWrite<'_>> = files
        .iter()
        .zip(&dests)
        .map(|(it, d)| FileToWrite {
            dest: d,
            node: &it.node,
        })
        .collect();
    let written = content::write_files(repo, &to_write, &pool, writeback.as_ref(), progress)?;
    for (it, result) in files.iter().zip(written) {
        match result {
            Ok(problems) => {
                out.bytes += it.node.size;
                for p in problems {
                    warn(&it.path, p, true);
                }
            }
            Err(e) => warn(&it.path, format!("not restored: {e}"), true),
        }
    }
    out.files += files.len() as u64;
    phase("file contents written");
    for (first, it) in &links {
        let to = dest(target, &it.path);
        let _ = remove_non_dir(&to);
        if let Err(e) = fs::hard_link(dest(target, first), &to) {
            warn(&it.path, format!("hard link not created: {e}"), true);
        } else {
            out.files += 1;
        }
    }
    for it in items.iter().filter(live) {
        let to = dest(target, &it.path);
        let r = match it.node.kind {
            NodeKind::Symlink => {
                let _ = remove_non_dir(&to);
                let t = it.node.target.as_deref().unwrap_or_default();
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(t), &to)
            }
            NodeKind::Fifo => {
                let _ = remove_non_dir(&to);
                nix::unistd::mkfifo(&to, Mode::from_bits_truncate(0o600)).map_err(io::Error::from)
            }
            NodeKind::Chardev | NodeKind::Blockdev => {
                let _ = remove_non_dir(&to);
                let kind = if it.node.kind == NodeKind::Chardev {
                    SFlag::S_IFCHR
                } else {
                    SFlag::S_IFBLK
                };
                nix::sys::stat::mknod(&to, kind, Mode::from_bits_truncate(0o600), it.node.rdev)
                    .map_err(io::Error::from)
            }
            NodeKind::Socket => {
                warn(
                    &it.path,
                    "socket not restored (sockets exist only while a program listens)".into(),
                    false,
                );
                continue;
            }
            NodeKind::File | NodeKind::Dir => continue,
        };
        if let Err(e) = r {
            warn(&it.path, format!("not restored: {e}"), true);
        }
    }

    phase("links and special files created");
    // Metadata: everything but directories, then directories deepest first.
    let is_root = nix::unistd::geteuid().is_root();
    let restored_links: std::collections::HashSet<&Path> =
        links.iter().map(|(_, it)| it.path.as_path()).collect();
    pool.install(|| {
        items
            .par_iter()
            .filter(live)
            .filter(|it| it.node.kind != NodeKind::Dir && it.node.kind != NodeKind::Socket)
            .filter(|it| !restored_links.contains(it.path.as_path()))
            .for_each(|it| {
                for p in apply_metadata(&dest(target, &it.path), &it.node, is_root) {
                    warn(&it.path, p, false);
                }
            });
    });
    for it in items
        .iter()
        .filter(live)
        .filter(|i| i.node.kind == NodeKind::Dir)
        .rev()
    {
        for p in apply_metadata(&dest(target, &it.path), &it.node, is_root) {
            warn(&it.path, p, false);
        }
    }
    phase("metadata set");
    if let Some(wb) = writeback {
        wb.finish()
            .ctx(|| format!("syncing {} to disk", target.display()))?;
    }
    phase("synced");
    out.warnings = warnings.into_vec();
    Ok(out)
}

fn remove_non_dir(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "a directory is in the way",
        )),
        Ok(_) => fs::remove_file(p),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

fn make_dir(p: &Path) -> io::Result<()> {
    match fs::symlink_metadata(p) {
        Ok(md) if md.is_dir() => Ok(()),
        Ok(_) => {
            // A file or symlink in the way: replace it, never follow it.
            fs::remove_file(p)?;
            fs::create_dir(p)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir(p),
        Err(e) => Err(e),
    }
}

/// Restores the single file of a stream or image snapshot to the file `to` (content,
/// mode and mtime), sparse; on disk when it returns unless `no_sync`. Returns the
/// problems met (damaged parts).
pub fn restore_single_file(
    repo: &Repository,
    snap: &Snapshot,
    to: &Path,
    no_sync: bool,
    progress: &Progress,
) -> Result<Vec<String>> {
    let tree = repo.load_tree(&snap.manifest.root)?;
    let [node] = tree.nodes.as_slice() else {
        return Err(Error::InvalidInput(format!(
            "snapshot {} holds a file tree, not one image or stream: restore it into a directory",
            snap.id.short()
        )));
    };
    if node.kind != NodeKind::File {
        return Err(Error::corrupt(
            format!("snapshot {}", snap.id),
            "its single entry is not a file",
        ));
    }
    Progress::add(&progress.total_files, 1);
    Progress::add(&progress.total_bytes, node.size);
    progress
        .total_known
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let parent = match to.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let writeback = if no_sync {
        None
    } else {
        Some(Writeback::start(parent).ctx(|| parent.display().to_string())?)
    };
    let pool = crate::threads::io_pool(0, "restore", 0)?;
    let file = FileToWrite { dest: to, node };
    let written = content::write_files(repo, &[file], &pool, writeback.as_ref(), progress)?.pop();
    let problems = written
        .unwrap_or_else(|| Ok(Vec::new()))
        .ctx(|| format!("writing {}", to.display()))?;
    if let Some(wb) = writeback {
        wb.finish()
            .ctx(|| format!("syncing {} to disk", to.display()))?;
    }
    let _ = fs::set_permissions(to, fs::Permissions::from_mode(node.mode));
    let mtime = TimeSpec::new(node.mtime.sec, i64::from(node.mtime.nsec));
    let _ = utimensat(
        None,
        to,
        &TimeSpec::UTIME_OMIT,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    );
    Ok(problems)
}

/// Sets xattrs, owner, mode and times; returns what could not be set.
fn apply_metadata(p: &Path, n: &Node, is_root: bool) -> Vec<String> {
    let mut problems = Vec::new();
    for x in &n.xattrs {
        if let Err(e) = xattr::set(p, std::ffi::OsStr::from_bytes(&x.name), &x.value) {
            problems.push(format!(
                "xattr {} not set: {e}",
                String::from_utf8_lossy(&x.name)
            ));
        }
    }
    if is_root || n.uid == nix::unistd::geteuid().as_raw() {
        if let Err(e) = std::os::unix::fs::lchown(p, Some(n.uid), Some(n.gid)) {
            if is_root {
                problems.push(format!("owner not set: {e}"));
            }
        }
    }
    if n.kind != NodeKind::Symlink {
        if let Err(e) = fs::set_permissions(p, fs::Permissions::from_mode(n.mode)) {
            problems.push(format!("mode not set: {e}"));
        }
    }
    let mtime = TimeSpec::new(n.mtime.sec, i64::from(n.mtime.nsec));
    if let Err(e) = utimensat(
        None,
        p,
        &TimeSpec::UTIME_OMIT,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    ) {
        problems.push(format!("times not set: {e}"));
    }
    problems
}
