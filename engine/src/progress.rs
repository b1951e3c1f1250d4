//! Live counters of a running backup or restore, shared with whoever displays them.
//! The engine only increments; the CLI polls and draws.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Debug, Default)]
pub struct Progress {
    /// Totals from the scanner, once known (`total_known`).
    pub total_files: AtomicU64,
    pub total_bytes: AtomicU64,
    pub total_known: AtomicBool,
    pub files_done: AtomicU64,
    /// Bytes of the source dealt with (read, or skipped as unchanged).
    pub bytes_done: AtomicU64,
    /// Bytes actually read from the source.
    pub bytes_read: AtomicU64,
    /// Bytes added to the repository (after dedup, compression and encryption).
    pub bytes_stored: AtomicU64,
    pub errors: AtomicU64,
    pub current: Mutex<String>,
}

impl Progress {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    #[must_use]
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn set_current(&self, what: &str) {
        if let Ok(mut c) = self.current.try_lock() {
            what.clone_into(&mut c);
        }
    }
}

/// `n` bytes for a message: `1.5 MiB`.
#[must_use]
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}
