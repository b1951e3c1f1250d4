//! Backing up a tar stream as a file tree (a `pg_basebackup` data directory).
//!
//! The archive is read once, front to back, as it arrives on a pipe: each regular file's
//! content goes through the same chunking and saving as a file on disk, and the entries'
//! metadata are gathered into an in-memory directory tree (a few hundred bytes per entry)
//! that is written bottom-up at the end. The snapshot's root is the archive's root.
//!
//! An archive is input from another program and is treated as hostile: an entry whose
//! path leaves the root (`..`, an absolute path), a name that cannot be a file name, or
//! a hard link to an entry not seen before fails the backup with an error naming the
//! entry. A later entry for the same path replaces the earlier one (as tar extracts).

use std::collections::{BTreeMap, HashMap};
use std::io::Read;
use std::time::Instant;

use chrono::Utc;
use tar::EntryType;

use super::content::{save_content, ContentError};
use super::pipeline::{with_workers, ChunkWorkers};
use super::BackupOutcome;
use crate::error::{Error, Result};
use crate::id::BlobId;
use crate::progress::Progress;
use crate::repository::{current_host, current_user, Repository};
use crate::saver::BlobSaver;
use crate::snapshot::{Manifest, SnapshotKind, Summary};
use crate::tree::{is_valid_name, Node, NodeKind, Timestamp, Tree};

#[derive(Debug, Clone, Default)]
pub struct ArchiveBackupOptions {
    /// The source name of the snapshot (`postgresql`, ...).
    pub name: String,
    pub host: Option<String>,
    pub tags: Vec<String>,
    pub meta: BTreeMap<String, String>,
}

#[derive(Default)]
struct DirBuild {
    node: Option<Node>,
    entries: BTreeMap<Vec<u8>, Item>,
}

enum Item {
    Dir(DirBuild),
    Leaf(Node),
}

/// The components of an entry's path, or an error if it leaves the root.
fn components(raw: &[u8]) -> Result<Vec<Vec<u8>>> {
    let shown = || String::from_utf8_lossy(raw).into_owned();
    if raw.first() == Some(&b'/') {
        return Err(Error::InvalidInput(format!(
            "archive entry {:?} has an absolute path",
            shown()
        )));
    }
    let mut out = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                return Err(Error::InvalidInput(format!(
                    "archive entry {:?} leaves the archive's root",
                    shown()
                )))
            }
            p if !is_valid_name(p) => {
                return Err(Error::InvalidInput(format!(
                    "archive entry {:?} has a name that is not a file name",
                    shown()
                )))
            }
            p => out.push(p.to_vec()),
        }
    }
    if out.len() > crate::tree::MAX_DEPTH {
        return Err(Error::InvalidInput(format!(
            "archive entry {:.80?}… is nested more than {} directories deep",
            shown(),
            crate::tree::MAX_DEPTH
        )));
    }
    Ok(out)
}

impl DirBuild {
    /// The directory at `path`, made (with `template`'s owner) where missing.
    fn dir_mut(&mut self, path: &[Vec<u8>], template: &Node) -> &mut DirBuild {
        let mut d = self;
        for name in path {
            let item = d
                .entries
                .entry(name.clone())
                .or_insert_with(|| Item::Dir(DirBuild::default()));
            if let Item::Leaf(_) = item {
                *item = Item::Dir(DirBuild::default());
            }
            let Item::Dir(sub) = item else {
                unreachable!("made a directory just above")
            };
            if sub.node.is_none() {
                sub.node = Some(Node {
                    mode: 0o700,
                    ..implicit_dir(name, template)
                });
            }
            d = sub;
        }
        d
    }

    fn leaf_mut(&mut self, path: &[Vec<u8>]) -> Option<&mut Node> {
        let (last, dirs) = path.split_last()?;
        let mut d = self;
        for name in dirs {
            match d.entries.get_mut(name)? {
                Item::Dir(sub) => d = sub,
                Item::Leaf(_) => return None,
            }
        }
        match d.entries.get_mut(last)? {
            Item::Leaf(n) => Some(n),
            Item::Dir(_) => None,
        }
    }
}

fn implicit_dir(name: &[u8], template: &Node) -> Node {
    Node {
        uid: template.uid,
        gid: template.gid,
        user: template.user.clone(),
        group: template.group.clone(),
        mtime: template.mtime,
        ctime: template.mtime,
        ..Node::new(name.to_vec(), NodeKind::Dir)
    }
}

/// Writes `dir`'s subtrees, then its own tree; returns the tree's id.
fn save_dir(saver: &BlobSaver<'_>, dir: DirBuild, progress: &Progress) -> Result<BlobId> {
    let mut nodes = Vec::with_capacity(dir.entries.len());
    for (name, item) in dir.entries {
        match item {
            Item::Leaf(n) => nodes.push(n),
            Item::Dir(sub) => {
                let mut node = sub
                    .node
                    .clone()
                    .unwrap_or_else(|| Node::new(name.clone(), NodeKind::Dir));
                node.name = name;
                node.subtree = Some(save_dir(saver, sub, progress)?);
                nodes.push(node);
            }
        }
    }
    let mut tree = Tree { nodes };
    tree.sort();
    let (id, stored) = saver.save_tree(tree)?;
    Progress::add(&progress.bytes_stored, stored);
    Ok(id)
}

/// Reads every entry of the tar stream `reader`, saving file contents; returns the
/// tree built (not yet saved) and the counts.
fn read_entries<R: Read>(
    workers: &ChunkWorkers<'_, '_>,
    params: crate::chunker::ChunkerParams,
    reader: R,
    progress: &Progress,
) -> Result<(DirBuild, Summary)> {
    let mut root = DirBuild::default();
    let mut summary = Summary::default();
    // Synthetic inode numbers tie hard-linked entries together.
    let mut inodes: HashMap<Vec<Vec<u8>>, u64> = HashMap::new();
    let mut next_inode = 1u64;

    let mut archive = tar::Archive::new(reader);
    let entries = archive
        .entries()
        .map_err(|e| Error::io("reading the archive", e))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| Error::io("reading the archive", e))?;
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let path = components(&raw_path)?;
        let h = entry.header();
        let kind = match h.entry_type() {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => NodeKind::File,
            EntryType::Directory => NodeKind::Dir,
            EntryType::Symlink => NodeKind::Symlink,
            EntryType::Link => NodeKind::File,
            EntryType::Char => NodeKind::Chardev,
            EntryType::Block => NodeKind::Blockdev,
            EntryType::Fifo => NodeKind::Fifo,
            // Extension headers are consumed by the reader; anything else is skipped.
            other => {
                tracing::warn!("archive entry {shown:?}: type {other:?} skipped");
                continue;
            }
        };
        let bad = |what: &str| Error::InvalidInput(format!("archive entry {shown:?}: {what}"));
        let mtime = Timestamp {
            sec: i64::try_from(h.mtime().unwrap_or(0)).unwrap_or(0),
            nsec: 0,
        };
        let name = path.last().cloned().unwrap_or_default();
        let mut node = Node {
            mode: h.mode().map_err(|_| bad("bad mode"))? & 0o7777,
            // Empty numeric fields (some writers leave them so) read as 0.
            uid: u32::try_from(h.uid().unwrap_or(0)).map_err(|_| bad("uid out of range"))?,
            gid: u32::try_from(h.gid().unwrap_or(0)).map_err(|_| bad("gid out of range"))?,
            user: h.username().ok().flatten().map(str::to_owned),
            group: h.groupname().ok().flatten().map(str::to_owned),
            mtime,
            ctime: mtime,
            ..Node::new(name.clone(), kind)
        };
        let is_link = h.entry_type() == EntryType::Link;
        match kind {
            NodeKind::Dir => {
                node.mode = if node.mode == 0 { 0o700 } else { node.mode };
                summary.dirs += 1;
                if path.is_empty() {
                    root.node = Some(node);
                } else {
                    let d = root.dir_mut(&path, &node);
                    d.node = Some(node);
                }
                continue;
            }
            _ if path.is_empty() => return Err(bad("only a directory can be the root")),
            NodeKind::File if is_link => {
                let target_raw = entry
                    .link_name_bytes()
                    .ok_or_else(|| bad("hard link without a target"))?
                    .into_owned();
                let target = components(&target_raw)?;
                let ino = *inodes.entry(target.clone()).or_insert_with(|| {
                    next_inode += 1;
                    next_inode
                });
                let t = root
                    .leaf_mut(&target)
                    .filter(|t| t.kind == NodeKind::File)
                    .ok_or_else(|| bad("hard link to an entry not in the archive before it"))?;
                t.inode = ino;
                t.links += 1;
                node = Node {
                    name: name.clone(),
                    ..t.clone()
                };
                // Every name of the file carries the final link count.
                let links = node.links;
                for (p, &i) in &inodes {
                    if i == ino {
                        if let Some(other) = root.leaf_mut(p) {
                            other.links = links;
                        }
                    }
                }
                inodes.insert(path.clone(), ino);
            }
            NodeKind::File => {
                let size = h.size().map_err(|_| bad("bad size"))?;
                let mut extents = Vec::new();
                let got = save_content(workers, params, &mut entry, size, progress, &mut extents)
                    .map_err(|e| match e {
                    ContentError::Source(e) => {
                        Error::io(format!("reading archive entry {shown:?}"), e)
                    }
                    ContentError::Repo(e) => e,
                })?;
                if got != size {
                    return Err(bad("the archive ended inside this file"));
                }
                node.size = size;
                node.content = extents;
                summary.files += 1;
                summary.total_bytes += size;
                summary.bytes_read += size;
            }
            NodeKind::Symlink => {
                node.target = Some(
                    entry
                        .link_name_bytes()
                        .ok_or_else(|| bad("symbolic link without a target"))?
                        .into_owned(),
                );
            }
            NodeKind::Chardev | NodeKind::Blockdev => {
                let major = h.device_major().ok().flatten().unwrap_or(0);
                let minor = h.device_minor().ok().flatten().unwrap_or(0);
                node.rdev = libc::makedev(major, minor);
            }
            NodeKind::Fifo | NodeKind::Socket => {}
        }
        let (_, parents) = path.split_last().ok_or_else(|| bad("empty path"))?;
        let d = root.dir_mut(parents, &node);
        d.entries.insert(name, Item::Leaf(node));
    }

    Ok((root, summary))
}

/// Reads the tar stream `reader` to its end and stores it as a tree snapshot named
/// `opts.name` whose root is the archive's root. A read error or a hostile entry fails
/// the backup: no snapshot of half an archive.
pub fn backup_tar<R: Read + Send>(
    repo: &Repository,
    opts: &ArchiveBackupOptions,
    reader: R,
    progress: &Progress,
) -> Result<BackupOutcome> {
    let started = Instant::now();
    let host = opts.host.clone().unwrap_or_else(current_host);
    let saver = BlobSaver::new(repo);
    let params = repo.config().chunker;
    let (root, mut summary) = with_workers(&saver, |workers| {
        read_entries(workers, params, reader, progress)
    })?;
    let root_id = save_dir(&saver, root, progress)?;
    saver.flush()?;
    let stats = saver.stats();
    summary.blobs_new = stats.blobs_new;
    summary.bytes_new = stats.bytes_new;
    summary.bytes_stored = stats.bytes_stored;
    summary.duration_ms = super::elapsed_ms(started);
    let parent = super::latest_named(repo, SnapshotKind::Tree, &host, &opts.name)?.map(|s| s.id);
    let manifest = Manifest {
        time: Utc::now(),
        host,
        user: current_user(),
        kind: SnapshotKind::Tree,
        paths: Vec::new(),
        name: Some(opts.name.clone()),
        tags: opts.tags.clone(),
        parent,
        root: root_id,
        summary,
        meta: opts.meta.clone(),
    };
    super::commit(repo, manifest, Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_lexical_and_never_leave_the_root() {
        assert_eq!(
            components(b"./base/1/123").unwrap(),
            vec![b"base".to_vec(), b"1".to_vec(), b"123".to_vec()]
        );
        assert!(components(b"./").unwrap().is_empty());
        assert!(components(b"a/../../etc").is_err());
        assert!(components(b"/etc/passwd").is_err());
        assert!(components(b"..").is_err());
        // Deep enough to overflow the stack of the recursive tree writer: refused.
        let deep = b"a/".repeat(crate::tree::MAX_DEPTH + 1);
        let err = components(&deep).unwrap_err();
        assert!(err.to_string().contains("nested more than"), "{err}");
        assert_eq!(
            components(&b"a/".repeat(crate::tree::MAX_DEPTH))
                .unwrap()
                .len(),
            crate::tree::MAX_DEPTH
        );
    }
}
