//! Getting restored data onto the disk while the restore runs, and knowing it is there
//! when the restore ends.
//!
//! The kernel starts writing dirty pages back only once they pass a share of memory (10%
//! by default) or grow old (30 s): without help, a restore of a few GB leaves all of it
//! in the page cache, and whoever syncs next waits for the whole of it. [`Writeback`]
//! runs a thread that syncs the target's filesystem each time [`STEP`] more bytes have
//! been written, so the disk writes alongside the decoding, and [`Writeback::finish`]
//! syncs once more: a restore that returns is on disk.

use std::fs::File;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::thread::JoinHandle;

/// Bytes written between two background syncs.
const STEP: u64 = 64 << 20;

/// The background syncing of one restore's filesystem.
pub struct Writeback {
    /// A directory or file on the target's filesystem.
    anchor: File,
    written: AtomicU64,
    kick: Option<SyncSender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Writeback {
    /// Starts the thread for the filesystem holding `anchor` (which must exist).
    pub fn start(anchor: &Path) -> io::Result<Self> {
        let anchor = File::open(anchor)?;
        let (kick, kicked) = sync_channel::<()>(1);
        let fs = anchor.try_clone()?;
        let thread = std::thread::Builder::new()
            .name("restore-writeback".into())
            .spawn(move || {
                while kicked.recv().is_ok() {
                    if let Err(e) = syncfs(&fs) {
                        tracing::debug!("background sync: {e}");
                    }
                }
            })?;
        Ok(Self {
            anchor,
            written: AtomicU64::new(0),
            kick: Some(kick),
            thread: Some(thread),
        })
    }

    /// Counts `bytes` written; each [`STEP`] bytes, asks for a sync (unless one is
    /// already waiting).
    pub fn wrote(&self, bytes: u64) {
        let before = self.written.fetch_add(bytes, Ordering::Relaxed);
        if (before + bytes) / STEP != before / STEP {
            if let Some(k) = &self.kick {
                let _ = k.try_send(());
            }
        }
    }

    /// Stops the thread and syncs everything written: after `Ok`, the data is durable.
    pub fn finish(mut self) -> io::Result<()> {
        self.stop();
        syncfs(&self.anchor)
    }

    fn stop(&mut self) {
        drop(self.kick.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Writeback {
    fn drop(&mut self) {
        self.stop();
    }
}

fn syncfs(f: &File) -> io::Result<()> {
    nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(f)).map_err(io::Error::from)
}
