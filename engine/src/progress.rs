//! Live counters of a running operation (backup, restore, check), and the stream of
//! typed events every consumer reads: the terminal bar, `--progress json` lines, a
//! scheduled run's log and the API's server-sent events.
//!
//! The data path only increments atomics ([`Progress`]); a [`Ticker`] samples them a few
//! times a second into [`Event::Progress`] and hands each event to an [`EventSink`].
//! Operations add [`Event::Message`]s (`Progress::say`). A consumer that wants the
//! operation to stop calls [`Progress::cancel`]: the data path checks it between files
//! and chunks and ends with [`crate::Error::Cancelled`], committing nothing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Whoever consumes an operation's events. Called from the operation's threads: keep it
/// short (send on a channel, draw, append to a buffer).
pub trait EventSink: Send + Sync {
    fn event(&self, event: &Event);
}

/// How much an [`Event::Message`] matters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Info,
    Warn,
    Error,
}

/// One event of a running operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Where the operation stands now.
    Progress(Sample),
    /// Something a user should read (a source read whole and why, a skipped file).
    Message { level: Level, text: String },
}

/// The counters at one moment, with the rate and the time left they imply.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Sample {
    pub elapsed_ms: u64,
    pub files_done: u64,
    /// Totals, once the scanner knows them.
    pub total_files: Option<u64>,
    pub total_bytes: Option<u64>,
    /// Bytes of the source dealt with (read, or skipped as unchanged).
    pub bytes_done: u64,
    /// Bytes actually read from the source.
    pub bytes_read: u64,
    /// Bytes added to the repository (after dedup, compression and encryption).
    pub bytes_stored: u64,
    pub errors: u64,
    /// Bytes dealt with per second since the start.
    pub bytes_per_second: u64,
    /// Seconds left at that rate, once the total is known.
    pub eta_seconds: Option<u64>,
    /// What is being read now (a path, a disk).
    pub current: String,
}

#[derive(Default)]
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
    cancelled: AtomicBool,
    sink: Option<Arc<dyn EventSink>>,
}

impl std::fmt::Debug for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Progress")
            .field("sample", &self.sample(Duration::ZERO))
            .field("cancelled", &self.is_cancelled())
            .finish_non_exhaustive()
    }
}

impl Progress {
    /// Counters whose messages go to `sink` (a [`Ticker`] usually shares it).
    #[must_use]
    pub fn with_sink(sink: Arc<dyn EventSink>) -> Self {
        Self {
            sink: Some(sink),
            ..Self::default()
        }
    }

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

    /// Tells the consumers something. (The operation's caller reports it again in its
    /// own words: this goes to the log at debug level only.)
    pub fn say(&self, level: Level, text: impl Into<String>) {
        let text = text.into();
        tracing::debug!(?level, "{text}");
        if let Some(s) = &self.sink {
            s.event(&Event::Message { level, text });
        }
    }

    /// Asks the operation to stop at its next file or chunk.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    #[must_use]
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// `Err(Cancelled)` once [`Progress::cancel`] was called: the data path's checkpoint.
    pub fn check_cancelled(&self) -> crate::Result<()> {
        if self.is_cancelled() {
            return Err(crate::Error::Cancelled);
        }
        Ok(())
    }

    /// The counters now, `elapsed` after the operation started.
    #[must_use]
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    pub fn sample(&self, elapsed: Duration) -> Sample {
        let known = self.total_known.load(Ordering::Relaxed);
        let bytes_done = Self::get(&self.bytes_done);
        let total_bytes = known.then(|| Self::get(&self.total_bytes));
        let secs = elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            (bytes_done as f64 / secs) as u64
        } else {
            0
        };
        let eta_seconds = match total_bytes {
            Some(t) if rate > 0 => Some(t.saturating_sub(bytes_done) / rate),
            _ => None,
        };
        Sample {
            elapsed_ms: elapsed.as_millis().try_into().unwrap_or(u64::MAX),
            files_done: Self::get(&self.files_done),
            total_files: known.then(|| Self::get(&self.total_files)),
            total_bytes,
            bytes_done,
            bytes_read: Self::get(&self.bytes_read),
            bytes_stored: Self::get(&self.bytes_stored),
            errors: Self::get(&self.errors),
            bytes_per_second: rate,
            eta_seconds,
            current: self.current.lock().map(|c| c.clone()).unwrap_or_default(),
        }
    }
}

/// Samples a [`Progress`] on a thread of its own and hands [`Event::Progress`] to a
/// sink every `interval`, and once more when finished.
pub struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    pub fn start(progress: Arc<Progress>, interval: Duration, sink: Arc<dyn EventSink>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let started = Instant::now();
        let thread = std::thread::spawn(move || {
            loop {
                let last = s.load(Ordering::Relaxed);
                sink.event(&Event::Progress(progress.sample(started.elapsed())));
                if last {
                    break;
                }
                // Sleep in short steps: finishing is prompt whatever the interval.
                let until = Instant::now() + interval;
                while Instant::now() < until && !s.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(20).min(interval));
                }
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops sampling after one last event.
    pub fn finish(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop_now();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect(Mutex<Vec<Event>>);
    impl EventSink for Collect {
        fn event(&self, e: &Event) {
            self.0.lock().unwrap().push(e.clone());
        }
    }

    #[test]
    fn a_sample_has_the_rate_and_the_time_left() {
        let p = Progress::default();
        p.total_bytes.store(1000, Ordering::Relaxed);
        p.total_known.store(true, Ordering::Relaxed);
        p.bytes_done.store(250, Ordering::Relaxed);
        let s = p.sample(Duration::from_secs(5));
        assert_eq!(s.bytes_per_second, 50);
        assert_eq!(s.eta_seconds, Some(15));
        assert_eq!(s.total_bytes, Some(1000));
        let unknown = Progress::default().sample(Duration::from_secs(1));
        assert_eq!((unknown.total_bytes, unknown.eta_seconds), (None, None));
    }

    #[test]
    fn the_ticker_ends_with_the_final_counters_and_messages_reach_the_sink() {
        let sink = Arc::new(Collect::default());
        let p = Arc::new(Progress::with_sink(sink.clone()));
        let t = Ticker::start(p.clone(), Duration::from_secs(3600), sink.clone());
        p.say(Level::Warn, "disk vda read whole");
        Progress::add(&p.files_done, 7);
        t.finish();
        let events = sink.0.lock().unwrap().clone();
        assert!(events.contains(&Event::Message {
            level: Level::Warn,
            text: "disk vda read whole".into()
        }));
        match events.last() {
            Some(Event::Progress(s)) => assert_eq!(s.files_done, 7),
            other => panic!("last event {other:?}"),
        }
    }

    #[test]
    fn cancelling_is_seen_by_the_checkpoint() {
        let p = Progress::default();
        assert!(p.check_cancelled().is_ok());
        p.cancel();
        assert!(matches!(p.check_cancelled(), Err(crate::Error::Cancelled)));
    }
}
