//! Reading the source filesystem: metadata of an entry as a [`Node`], extended
//! attributes, user and group names, and the data extents of sparse files.

use std::collections::HashMap;
use std::fs::{File, Metadata};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Mutex;

use nix::errno::Errno;
use nix::unistd::{lseek, Whence};

use crate::tree::{Node, NodeKind, Timestamp, Xattr};

/// Caches uid/gid -> name lookups for one backup.
#[derive(Default)]
pub struct Names {
    users: Mutex<HashMap<u32, Option<String>>>,
    groups: Mutex<HashMap<u32, Option<String>>>,
}

impl Names {
    fn user(&self, uid: u32) -> Option<String> {
        let mut m = self
            .users
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(uid)
            .or_insert_with(|| {
                nix::unistd::User::from_uid(uid.into())
                    .ok()
                    .flatten()
                    .map(|u| u.name)
            })
            .clone()
    }

    fn group(&self, gid: u32) -> Option<String> {
        let mut m = self
            .groups
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        m.entry(gid)
            .or_insert_with(|| {
                nix::unistd::Group::from_gid(gid.into())
                    .ok()
                    .flatten()
                    .map(|g| g.name)
            })
            .clone()
    }
}

pub fn kind_of(md: &Metadata) -> NodeKind {
    let t = md.file_type();
    if t.is_dir() {
        NodeKind::Dir
    } else if t.is_symlink() {
        NodeKind::Symlink
    } else if t.is_fifo() {
        NodeKind::Fifo
    } else if t.is_socket() {
        NodeKind::Socket
    } else if t.is_char_device() {
        NodeKind::Chardev
    } else if t.is_block_device() {
        NodeKind::Blockdev
    } else {
        NodeKind::File
    }
}

fn ts(sec: i64, nsec: i64) -> Timestamp {
    Timestamp {
        sec,
        nsec: u32::try_from(nsec).unwrap_or(0),
    }
}

/// Extended attributes of `path` (not following symlinks). Filesystems without xattr
/// support give none.
pub fn xattrs(path: &Path) -> io::Result<Vec<Xattr>> {
    let names = match xattr::list(path) {
        Ok(n) => n,
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTSUP) | Some(libc::ENODATA)) => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for name in names {
        if let Some(value) = xattr::get(path, &name)? {
            out.push(Xattr {
                name: name.as_bytes().to_vec(),
                value,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// A node with the metadata of `md`; content, subtree and target are filled by the caller.
pub fn node_from_metadata(name: &[u8], md: &Metadata, names: &Names) -> Node {
    let kind = kind_of(md);
    Node {
        name: name.to_vec(),
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        user: names.user(md.uid()),
        group: names.group(md.gid()),
        mtime: ts(md.mtime(), md.mtime_nsec()),
        ctime: ts(md.ctime(), md.ctime_nsec()),
        inode: md.ino(),
        device: md.dev(),
        links: md.nlink(),
        size: if kind == NodeKind::File { md.len() } else { 0 },
        content: Vec::new(),
        content_lists: Vec::new(),
        subtree: None,
        target: None,
        rdev: if matches!(kind, NodeKind::Chardev | NodeKind::Blockdev) {
            md.rdev()
        } else {
            0
        },
        xattrs: Vec::new(),
    }
}

/// The (start, end) byte ranges of `file` that hold data, below `size`, found with
/// SEEK_DATA/SEEK_HOLE; holes between them are never read. Filesystems without hole
/// support report the whole file as data. A file whose `allocated` bytes (st_blocks x
/// 512) cover its size has no hole to skip and is not asked (two system calls saved for
/// most files). Moves the file offset: seek before reading.
pub fn data_extents(file: &File, size: u64, allocated: u64) -> io::Result<Vec<(u64, u64)>> {
    if allocated >= size {
        return Ok(vec![(0, size)]);
    }
    let fd = file.as_raw_fd();
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let at = i64::try_from(pos).map_err(io::Error::other)?;
        let data = match lseek(fd, at, Whence::SeekData) {
            Ok(o) => o.unsigned_abs(),
            Err(Errno::ENXIO) => break,
            Err(Errno::EINVAL) => return Ok(vec![(pos, size)]),
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let at = i64::try_from(data).map_err(io::Error::other)?;
        let hole = match lseek(fd, at, Whence::SeekHole) {
            Ok(o) => o.unsigned_abs().min(size),
            Err(Errno::ENXIO) => size,
            Err(e) => return Err(e.into()),
        };
        if hole <= data {
            return Ok(vec![(0, size)]);
        }
        out.push((data, hole));
        pos = hole;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileExt, MetadataExt};

    #[test]
    fn holes_are_found_unless_the_blocks_cover_the_size() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("sparse");
        let f = File::create(&path).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(&[1; 4096], 0).unwrap();
        f.write_all_at(&[2; 4096], 4 << 20).unwrap();
        f.sync_all().unwrap();
        let f = File::open(&path).unwrap();
        let md = f.metadata().unwrap();
        let allocated = md.blocks() * 512;
        assert!(allocated < md.len());
        let extents = data_extents(&f, md.len(), allocated).unwrap();
        assert_eq!(extents.len(), 2, "{extents:?}");
        assert_eq!(extents[0].0, 0);
        assert!(extents[0].1 < 4 << 20 && extents[1].0 <= 4 << 20 && extents[1].1 > 4 << 20);
        // Blocks covering the size: one extent, the file not asked.
        assert_eq!(
            data_extents(&f, md.len(), md.len()).unwrap(),
            vec![(0, md.len())]
        );
    }
}
