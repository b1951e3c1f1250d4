//! The fuser adapter: translates FUSE requests into [`View`] calls and errors into
//! errnos. Every request that would change anything gets EROFS. Content never changes,
//! so entries, attributes and file pages are cached by the kernel for a long time;
//! the synthetic directories (`snapshots/`, `hosts/...`) for a second only.
//!
//! Large files (VM disks, dumps: [`crate::MountOptions::direct_io_from`]) are opened
//! with direct I/O instead: reads go to us without passing through the kernel's page
//! cache. A sequential read then costs one copy fewer and no page-cache bookkeeping
//! (1.3 -> 1.9 GB/s on the benchmark's VM disk), and the blob cache still serves
//! re-reads. Only on kernels that can still mmap such files
//! (`FUSE_DIRECT_IO_ALLOW_MMAP`, Linux 6.6): without it a program could not be run or
//! mapped from a large file, so every file keeps the page cache there.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use cairn_engine::tree::NodeKind;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyCreate, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite,
    ReplyXattr, Request, TimeOrNow,
};

use crate::view::{Attr, DirEntry, FsError, ReadData, View};

/// Kernel cache lifetime of snapshot contents (immutable).
const CONTENT_TTL: Duration = Duration::from_secs(24 * 3600);
/// Kernel cache lifetime of the synthetic directories (they gain snapshots).
const LISTING_TTL: Duration = Duration::from_secs(1);
/// Largest read the kernel sends (and read-ahead it may do).
pub const MAX_READ: u32 = 1 << 20;

/// Replies to reads of holes. Never written: its pages stay the kernel's shared zero
/// page, so a hole costs no allocation, no zeroing and no cache misses.
static ZEROS: [u8; MAX_READ as usize] = [0; MAX_READ as usize];

thread_local! {
    /// Where a request thread assembles a read that spans extents; reused.
    static ASSEMBLY: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

pub struct CairnFs {
    view: Arc<View>,
    /// Files of at least this many bytes are opened with direct I/O; `None`: none.
    direct_io_from: Option<u64>,
}

impl CairnFs {
    #[must_use]
    pub fn new(view: Arc<View>, direct_io_from: Option<u64>) -> Self {
        Self {
            view,
            direct_io_from,
        }
    }
}

pub(crate) fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

pub(crate) fn file_type(k: NodeKind) -> FileType {
    match k {
        NodeKind::File => FileType::RegularFile,
        NodeKind::Dir => FileType::Directory,
        NodeKind::Symlink => FileType::Symlink,
        NodeKind::Fifo => FileType::NamedPipe,
        NodeKind::Socket => FileType::Socket,
        NodeKind::Chardev => FileType::CharDevice,
        NodeKind::Blockdev => FileType::BlockDevice,
    }
}

pub(crate) fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: a.mtime,
        kind: file_type(a.kind),
        perm: u16::try_from(a.mode & 0o7777).unwrap_or(0),
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: u32::try_from(a.rdev).unwrap_or(0),
        blksize: 128 * 1024,
        flags: 0,
    }
}

impl CairnFs {
    fn ttl(&self, ino: u64) -> Duration {
        if self.view.is_content(ino) {
            CONTENT_TTL
        } else {
            LISTING_TTL
        }
    }
}

impl Filesystem for CairnFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_readahead(MAX_READ);
        if let Some(from) = self.direct_io_from {
            if config
                .add_capabilities(fuser::InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP)
                .is_ok()
            {
                tracing::debug!("files of {from} bytes or more are read with direct I/O");
            } else {
                tracing::info!(
                    "this kernel cannot mmap files opened with direct I/O (Linux < 6.6): \
                     every file is read through the page cache"
                );
                self.direct_io_from = None;
            }
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.view.lookup(parent.0, name.as_bytes()) {
            Ok(a) => reply.entry(&self.ttl(a.ino), &file_attr(&a), Generation(1)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.view.getattr(ino.0) {
            Ok(a) => reply.attr(&self.ttl(ino.0), &file_attr(&a)),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.view.readlink(ino.0) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::from_i32(libc::EROFS));
        }
        match self.view.open(ino.0) {
            Ok(fh) => {
                let direct = self
                    .direct_io_from
                    .is_some_and(|from| self.view.open_size(fh).is_ok_and(|size| size >= from));
                let flags = if direct {
                    FopenFlags::FOPEN_DIRECT_IO
                } else {
                    FopenFlags::FOPEN_KEEP_CACHE
                };
                reply.opened(FileHandle(fh), flags);
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        reply_read(reply, |buf| self.view.read_into(fh.0, offset, size, buf));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.view.release(fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        reply: ReplyDirectory,
    ) {
        match self.view.readdir(ino.0) {
            Ok(entries) => {
                reply_listing(reply, ino.0, self.view.parent_of(ino.0), &entries, offset)
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        reply_seek(reply, offset, whence, |off, data| {
            self.view.seek_data_or_hole(fh.0, off, data)
        });
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        // No file flags (FS_IOC_GETFLAGS during an overlay copy-up) and no other ioctls.
        reply.error(Errno::from_i32(libc::ENOTTY));
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.view.getxattr(ino.0, name.as_bytes()) {
            Ok(v) => xattr_reply(reply, &v, size),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.view.listxattr(ino.0) {
            Ok(names) => xattr_names_reply(reply, &names, size),
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: fuser::AccessFlags, reply: ReplyEmpty) {
        if mask.contains(fuser::AccessFlags::W_OK) {
            return reply.error(Errno::from_i32(libc::EROFS));
        }
        match self.view.getattr(ino.0) {
            Ok(_) => reply.ok(),
            Err(e) => reply.error(errno(&e)),
        }
    }

    // ---- everything that would change the filesystem: EROFS ----

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::from_i32(libc::EROFS));
    }

    fn mknod(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _r: u32,
        reply: ReplyEntry,
    ) {
        reply.error(Errno::from_i32(libc::EROFS));
    }

    fn mkdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _m: u32, _u: u32, reply: ReplyEntry) {
        reply.error(Errno::from_i32(libc::EROFS));
    }

    fn unlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::from_i32(libc::EROFS));
    }

    fn rmdir(&self, _req: &Request, _p: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::from_i32(libc::EROFS));
    }

    fn symlink(&self, _req: &Request, _p: INodeNo, _n: &OsStr, _l: &Path, reply: ReplyEntry) {
        reply.error(Errno::from_i32(libc::EROFS));
    }

    fn rename(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _np: INodeNo,
        _nn: &OsStr,
        _f: fuser::RenameFlags,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::from_i32(libc::EROFS));
    }

    fn link(&self, _req: &Request, _i: INodeNo, _np: INodeNo, _nn: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::from_i32(libc::EROFS));
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _wf: fuser::WriteFlags,
        _flags: OpenFlags,
        _lo: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::from_i32(libc::EROFS));
    }

    fn create(
        &self,
        _req: &Request,
        _p: INodeNo,
        _n: &OsStr,
        _m: u32,
        _u: u32,
        _f: i32,
        reply: ReplyCreate,
    ) {
        reply.error(Errno::from_i32(libc::EROFS));
    }

    fn setxattr(
        &self,
        _req: &Request,
        _i: INodeNo,
        _n: &OsStr,
        _v: &[u8],
        _f: i32,
        _p: u32,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::from_i32(libc::EROFS));
    }

    fn removexattr(&self, _req: &Request, _i: INodeNo, _n: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::from_i32(libc::EROFS));
    }
}

/// Replies to a `read` with what `read` gives, assembled (when it must be) in this
/// request thread's reused buffer; holes come from the shared zero page.
pub(crate) fn reply_read(
    reply: ReplyData,
    read: impl FnOnce(&mut Vec<u8>) -> Result<ReadData, FsError>,
) {
    ASSEMBLY.with(|cell| {
        let mut buf = cell.borrow_mut();
        match read(&mut buf) {
            Ok(ReadData::Zeros(n)) if n <= ZEROS.len() => reply.data(&ZEROS[..n]),
            Ok(ReadData::Zeros(n)) => reply.data(&vec![0; n]),
            Ok(ReadData::Blob(blob, range)) => reply.data(&blob[range]),
            Ok(ReadData::Assembled) => reply.data(&buf),
            Err(e) => reply.error(errno(&e)),
        }
    });
}

/// Replies to an `lseek`: SEEK_DATA and SEEK_HOLE through `seek(offset, data)`;
/// SEEK_SET/CUR/END are the kernel's business.
pub(crate) fn reply_seek(
    reply: ReplyLseek,
    offset: i64,
    whence: i32,
    seek: impl FnOnce(u64, bool) -> Result<u64, FsError>,
) {
    let data = match whence {
        libc::SEEK_DATA => true,
        libc::SEEK_HOLE => false,
        _ => return reply.error(Errno::from_i32(libc::EINVAL)),
    };
    let Ok(off) = u64::try_from(offset) else {
        return reply.error(Errno::from_i32(libc::ENXIO));
    };
    match seek(off, data) {
        Ok(o) => reply.offset(i64::try_from(o).unwrap_or(i64::MAX)),
        Err(e) => reply.error(errno(&e)),
    }
}

/// Replies to a `readdir` from `offset` with `.`, `..` and `entries`.
pub(crate) fn reply_listing(
    mut reply: ReplyDirectory,
    ino: u64,
    parent: u64,
    entries: &[DirEntry],
    offset: u64,
) {
    let dots = [
        (ino, FileType::Directory, OsStr::new(".")),
        (parent, FileType::Directory, OsStr::new("..")),
    ];
    let all = dots.into_iter().chain(
        entries
            .iter()
            .map(|e| (e.ino, file_type(e.kind), OsStr::from_bytes(&e.name))),
    );
    for (i, (child, kind, name)) in all
        .enumerate()
        .skip(usize::try_from(offset).unwrap_or(usize::MAX))
    {
        if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
            break;
        }
    }
    reply.ok();
}

/// Replies to a `listxattr` with `names`, each NUL-terminated.
pub(crate) fn xattr_names_reply(reply: ReplyXattr, names: &[Vec<u8>], size: u32) {
    let mut buf = Vec::new();
    for n in names {
        buf.extend_from_slice(n);
        buf.push(0);
    }
    xattr_reply(reply, &buf, size);
}

pub(crate) fn xattr_reply(reply: ReplyXattr, data: &[u8], size: u32) {
    let len = u32::try_from(data.len()).unwrap_or(u32::MAX);
    if size == 0 {
        reply.size(len);
    } else if len <= size {
        reply.data(data);
    } else {
        reply.error(Errno::from_i32(libc::ERANGE));
    }
}
