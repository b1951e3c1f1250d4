//! Backing up a set of block images and a few small files as one snapshot: what a VM is
//! to the engine (its disks, its definition, its firmware variables), without the
//! engine knowing what a VM is.
//!
//! The snapshot is an image snapshot (`SnapshotKind::Image`) named after the set, whose
//! root tree holds one `<disk>.raw` per image and the small files as they are. Every
//! image is cut and read as [`super::image`] does, on its own: its chunk size is its
//! parent's (the same disk in the set's last snapshot), so unchanged chunks deduplicate,
//! and with changed-block tracking the chunks its source reports unchanged are the
//! parent's, not read. The manifest's `disks` lists the images, and `disk.<name>.*`
//! records each one's size, chunk size and whether changed blocks were used.

use std::collections::BTreeMap;
use std::time::Instant;

use chrono::Utc;

use super::image::{choose_chunk, parent_chunks, read_image, BlockSource};
use super::BackupOutcome;
use crate::blob::BlobKind;
use crate::error::{Error, Result};
use crate::progress::Progress;
use crate::repository::{current_host, current_user, Repository};
use crate::saver::BlobSaver;
use crate::snapshot::{Manifest, Snapshot, SnapshotKind, Summary};
use crate::tree::{is_valid_name, Extent, Node, NodeKind, Timestamp, Tree};

/// One image of the set.
pub struct DiskInput<'s> {
    /// The disk's name (`vda`): stored as `<name>.raw`.
    pub name: String,
    pub source: &'s mut dyn BlockSource,
    /// The source reports changed blocks since the parent's copy of this disk: take the
    /// others from the parent. When the parent has no usable copy (another size, no
    /// such disk), the whole disk is read and [`DiskOutcome::changed_blocks`] says so.
    pub changed_blocks: bool,
}

#[derive(Debug, Clone, Default)]
pub struct DiskSetOptions {
    /// The set's name: the snapshot's source (a VM's name).
    pub name: String,
    pub host: Option<String>,
    pub tags: Vec<String>,
    /// Small files stored beside the images (a domain's XML), by name.
    pub files: Vec<(String, Vec<u8>)>,
    /// Facts to record in the manifest.
    pub meta: BTreeMap<String, String>,
}

/// What the backup did with one disk.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DiskOutcome {
    pub name: String,
    pub size: u64,
    pub bytes_read: u64,
    /// Only what changed since the parent was read.
    pub changed_blocks: bool,
}

/// The snapshot a backup of the set `name` from `host` (default: this host) compares
/// with: its newest snapshot.
pub fn disk_set_parent(
    repo: &Repository,
    host: Option<&str>,
    name: &str,
) -> Result<Option<Snapshot>> {
    let host = host.map_or_else(current_host, str::to_owned);
    Ok(super::latest_named(repo, SnapshotKind::Image, &host, name)?
        .filter(|s| s.manifest.meta.contains_key("disks")))
}

/// The names of the disks a set's snapshot holds.
#[must_use]
pub fn disks_of(snap: &Snapshot) -> Vec<String> {
    snap.manifest
        .meta
        .get("disks")
        .map(|d| {
            d.split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// Backs up the disks and files of a set as one snapshot (see the module docs). No
/// snapshot is made unless every disk was read whole.
pub fn backup_disk_set(
    repo: &Repository,
    opts: &DiskSetOptions,
    disks: Vec<DiskInput<'_>>,
    progress: &Progress,
) -> Result<(BackupOutcome, Vec<DiskOutcome>)> {
    let started = Instant::now();
    check_names(opts, &disks)?;
    let host = opts.host.clone().unwrap_or_else(current_host);
    let parent = disk_set_parent(repo, Some(&host), &opts.name)?;
    let saver = BlobSaver::new(repo);
    let now = Utc::now();
    let stamp = Timestamp {
        sec: now.timestamp(),
        nsec: now.timestamp_subsec_nanos(),
    };
    let mut nodes = Vec::new();
    let mut outcomes = Vec::new();
    let mut meta = opts.meta.clone();
    let mut total = 0u64;
    for disk in disks {
        let (node, outcome, chunk) = back_up_disk(
            repo,
            &saver,
            parent.as_ref(),
            &opts.name,
            disk,
            stamp,
            progress,
        )?;
        meta.insert(
            format!("disk.{}.size", outcome.name),
            outcome.size.to_string(),
        );
        meta.insert(
            format!("disk.{}.chunk_size", outcome.name),
            chunk.to_string(),
        );
        meta.insert(
            format!("disk.{}.changed_blocks", outcome.name),
            if outcome.changed_blocks { "yes" } else { "no" }.into(),
        );
        total += outcome.size;
        nodes.push(node);
        outcomes.push(outcome);
    }
    for (name, data) in &opts.files {
        let (id, _) = saver.save(BlobKind::Data, data)?;
        total += data.len() as u64;
        nodes.push(Node {
            mode: 0o600,
            mtime: stamp,
            ctime: stamp,
            size: data.len() as u64,
            content: if data.is_empty() {
                Vec::new()
            } else {
                vec![Extent {
                    blob: Some(id),
                    len: data.len() as u64,
                }]
            },
            ..owned(Node::new(name.as_bytes().to_vec(), NodeKind::File))
        });
    }
    meta.insert(
        "disks".into(),
        outcomes
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(","),
    );
    let mut tree = Tree { nodes };
    tree.sort();
    let (root, stored) = saver.save_tree(tree)?;
    Progress::add(&progress.bytes_stored, stored);
    saver.flush()?;
    let stats = saver.stats();
    let summary = Summary {
        files: (outcomes.len() + opts.files.len()) as u64,
        total_bytes: total,
        bytes_read: outcomes.iter().map(|d| d.bytes_read).sum(),
        blobs_new: stats.blobs_new,
        bytes_new: stats.bytes_new,
        bytes_stored: stats.bytes_stored,
        duration_ms: super::elapsed_ms(started),
        ..Summary::default()
    };
    let manifest = Manifest {
        time: now,
        parent: parent.map(|p| p.id),
        summary,
        meta,
        ..Manifest::named(
            SnapshotKind::Image,
            &opts.name,
            host,
            opts.tags.clone(),
            root,
        )
    };
    Ok((super::commit(repo, manifest, Vec::new())?, outcomes))
}

fn check_names(opts: &DiskSetOptions, disks: &[DiskInput<'_>]) -> Result<()> {
    if opts.name.is_empty() {
        return Err(Error::InvalidInput("a disk set needs a name".into()));
    }
    if disks.is_empty() {
        return Err(Error::InvalidInput(format!(
            "{}: no disk to back up",
            opts.name
        )));
    }
    let mut seen = std::collections::HashSet::new();
    let names = disks
        .iter()
        .map(|d| format!("{}.raw", d.name))
        .chain(opts.files.iter().map(|(n, _)| n.clone()));
    for n in names {
        if !is_valid_name(n.as_bytes()) || n.contains(',') || !seen.insert(n.clone()) {
            return Err(Error::InvalidInput(format!(
                "{}: {n:?} is not a usable name in a disk set (one file name each, no commas, no duplicates)",
                opts.name
            )));
        }
    }
    Ok(())
}

/// A node owned by the user running the backup, as every file of a backup is.
fn owned(n: Node) -> Node {
    Node {
        uid: nix::unistd::geteuid().as_raw(),
        gid: nix::unistd::getegid().as_raw(),
        user: Some(current_user()),
        ..n
    }
}

/// Reads one disk; returns its node, what was done, and its chunk size.
fn back_up_disk(
    repo: &Repository,
    saver: &BlobSaver<'_>,
    parent: Option<&Snapshot>,
    set: &str,
    disk: DiskInput<'_>,
    stamp: Timestamp,
    progress: &Progress,
) -> Result<(Node, DiskOutcome, u64)> {
    let file = format!("{}.raw", disk.name);
    let size = disk.source.size();
    let chunk_key = format!("disk.{}.chunk_size", disk.name);
    let parent_chunk = parent
        .and_then(|p| p.manifest.meta.get(&chunk_key))
        .and_then(|c| c.parse::<u64>().ok());
    let chunk = choose_chunk(
        repo,
        &format!("{set}/{}", disk.name),
        size,
        None,
        parent_chunk,
    )?;
    let parent_map = match (parent, disk.changed_blocks) {
        (Some(p), true) => parent_chunks(repo, p, Some(file.as_bytes()), &chunk_key, size, chunk)?,
        _ => None,
    };
    if disk.changed_blocks && parent_map.is_none() {
        tracing::warn!(
            "{set}: disk {} has no usable copy in the last snapshot (new, resized or \
             re-chunked): reading all of it",
            disk.name
        );
    }
    let (content, bytes_read) = read_image(
        saver,
        &format!("{set}/{}", disk.name),
        disk.source,
        chunk,
        parent_map.as_deref(),
        progress,
    )?;
    let node = Node {
        mode: 0o600,
        mtime: stamp,
        ctime: stamp,
        size,
        content,
        ..owned(Node::new(file.into_bytes(), NodeKind::File))
    };
    let outcome = DiskOutcome {
        name: disk.name,
        size,
        bytes_read,
        changed_blocks: parent_map.is_some(),
    };
    Ok((node, outcome, chunk))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backup::image::BlockRegion;
    use crate::config::Config;
    use crate::crypto::Encryption;
    use std::io;

    /// An image in memory that reports as changed exactly the ranges written since it
    /// was last marked clean.
    struct MemDisk {
        data: Vec<u8>,
        dirty: Vec<(u64, u64)>,
        track: bool,
        reads: u64,
    }

    impl MemDisk {
        fn new(len: usize, seed: u8) -> Self {
            Self {
                data: (0..len)
                    .map(|i| (i as u8).wrapping_mul(seed) ^ seed)
                    .collect(),
                dirty: Vec::new(),
                track: false,
                reads: 0,
            }
        }
        fn write(&mut self, at: usize, bytes: &[u8]) {
            self.data[at..at + bytes.len()].copy_from_slice(bytes);
            self.dirty.push((at as u64, bytes.len() as u64));
        }
    }

    impl BlockSource for MemDisk {
        fn size(&self) -> u64 {
            self.data.len() as u64
        }
        fn map(&mut self, offset: u64, len: u64) -> io::Result<Vec<BlockRegion>> {
            Ok(vec![BlockRegion {
                offset,
                length: len,
                data: true,
            }])
        }
        fn changed(&mut self, offset: u64, len: u64) -> io::Result<Option<Vec<BlockRegion>>> {
            if !self.track {
                return Ok(None);
            }
            // In 64 KiB blocks, as a dirty bitmap would say.
            let end = offset + len;
            let mut out: Vec<BlockRegion> = Vec::new();
            let mut at = offset;
            while at < end {
                let next = ((at / (64 << 10)) + 1) * (64 << 10);
                let b = next.min(end);
                let dirty = self.dirty.iter().any(|(a, l)| *a < b && a + l > at);
                match out.last_mut() {
                    Some(r) if r.data == dirty => r.length += b - at,
                    _ => out.push(BlockRegion {
                        offset: at,
                        length: b - at,
                        data: dirty,
                    }),
                }
                at = b;
            }
            Ok(Some(out))
        }
        fn read(&mut self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
            let at = usize::try_from(offset).unwrap();
            buf.copy_from_slice(&self.data[at..at + buf.len()]);
            self.reads += buf.len() as u64;
            Ok(())
        }
    }

    fn restored(repo: &Repository, snap: &Snapshot, file: &str) -> Vec<u8> {
        let tree = repo.load_tree(&snap.manifest.root).unwrap();
        let node = tree
            .nodes
            .iter()
            .find(|n| n.name == file.as_bytes())
            .unwrap();
        let mut out = Vec::new();
        for e in &node.content {
            match e.blob {
                Some(b) => out.extend(repo.read_blob(&b).unwrap()),
                None => out.resize(out.len() + e.len as usize, 0),
            }
        }
        out
    }

    #[test]
    fn a_set_of_disks_and_files_is_one_snapshot_and_an_incremental_reads_what_changed() {
        let d = tempfile::tempdir().unwrap();
        let repo = crate::test_util::repo_in(d.path(), Config::new(Encryption::Aes256Gcm));
        let mut vda = MemDisk::new(24 << 20, 7);
        let mut vdb = MemDisk::new(3 << 20, 11);
        let opts = DiskSetOptions {
            name: "web".into(),
            files: vec![("domain.xml".into(), b"<domain/>".to_vec())],
            ..DiskSetOptions::default()
        };
        let run = |vda: &mut MemDisk, vdb: &mut MemDisk, cbt: bool| {
            backup_disk_set(
                &repo,
                &opts,
                vec![
                    DiskInput {
                        name: "vda".into(),
                        source: vda,
                        changed_blocks: cbt,
                    },
                    DiskInput {
                        name: "vdb".into(),
                        source: vdb,
                        changed_blocks: cbt,
                    },
                ],
                &Progress::default(),
            )
            .unwrap()
        };
        let (first, outcomes) = run(&mut vda, &mut vdb, true);
        assert_eq!(outcomes.iter().filter(|o| o.changed_blocks).count(), 0);
        assert_eq!(disks_of(&first.snapshot), ["vda", "vdb"]);
        assert_eq!(restored(&repo, &first.snapshot, "domain.xml"), b"<domain/>");
        // Two 64 KiB writes to vda: with tracking, only the chunks holding them are read.
        vda.track = true;
        vdb.track = true;
        vda.reads = 0;
        vda.write(5 << 20, &[1; 64 << 10]);
        vda.write(20 << 20, &[2; 64 << 10]);
        let (second, outcomes) = run(&mut vda, &mut vdb, true);
        assert!(outcomes.iter().all(|o| o.changed_blocks), "{outcomes:?}");
        assert!(
            vda.reads <= 2 * (256 << 10),
            "read {} bytes of vda",
            vda.reads
        );
        assert_eq!(outcomes[1].bytes_read, 0);
        assert_eq!(second.snapshot.manifest.parent, Some(first.snapshot.id));
        assert!(restored(&repo, &second.snapshot, "vda.raw") == vda.data);
        assert!(restored(&repo, &second.snapshot, "vdb.raw") == vdb.data);
        // The first snapshot is still what it was.
        assert!(restored(&repo, &first.snapshot, "vda.raw") != vda.data);
        // A disk grown: read whole, and said so.
        let mut bigger = MemDisk::new(4 << 20, 11);
        bigger.track = true;
        let (_, outcomes) = run(&mut vda, &mut bigger, true);
        assert!(!outcomes[1].changed_blocks);
        assert_eq!(outcomes[1].bytes_read, 4 << 20);
    }

    #[test]
    fn names_that_would_collide_or_escape_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let repo = crate::test_util::repo_in(d.path(), Config::new(Encryption::None));
        let mut a = MemDisk::new(1 << 20, 1);
        for (disk, file) in [("../x", "f"), ("vda", "vda.raw"), ("a,b", "f")] {
            let err = backup_disk_set(
                &repo,
                &DiskSetOptions {
                    name: "vm".into(),
                    files: vec![(file.into(), Vec::new())],
                    ..DiskSetOptions::default()
                },
                vec![DiskInput {
                    name: disk.into(),
                    source: &mut a,
                    changed_blocks: false,
                }],
                &Progress::default(),
            )
            .unwrap_err();
            assert_eq!(err.kind(), crate::ErrorKind::InvalidInput, "{err}");
        }
        assert!(repo.snapshots().unwrap().is_empty());
    }
}
