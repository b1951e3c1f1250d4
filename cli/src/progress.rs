//! The progress display of backup and restore on a terminal: files, bytes read, bytes
//! new, rate and ETA, redrawn a few times a second from the engine's counters.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cairn_engine::progress::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::format::bytes;

pub struct Display {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Display {
    /// Starts drawing `progress` on stderr when it is a terminal and `enabled`.
    pub fn start(progress: Arc<Progress>, verb: &'static str, enabled: bool) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        if !enabled || !std::io::stderr().is_terminal() {
            return Self { stop, thread: None };
        }
        let s = stop.clone();
        let thread = std::thread::spawn(move || {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(5));
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            let started = Instant::now();
            while !s.load(Ordering::Relaxed) {
                bar.set_message(line(&progress, verb, started.elapsed()));
                bar.tick();
                std::thread::sleep(Duration::from_millis(200));
            }
            bar.finish_and_clear();
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    pub fn finish(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[allow(
    clippy::cast_precision_loss,
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss
)]
fn line(p: &Progress, verb: &str, elapsed: Duration) -> String {
    let g = Progress::get;
    let done = g(&p.bytes_done);
    let rate = done as f64 / elapsed.as_secs_f64().max(0.001);
    let known = p.total_known.load(Ordering::Relaxed);
    let (files, total) = if known {
        (
            format!("{}/{}", g(&p.files_done), g(&p.total_files)),
            format!("/{}", bytes(g(&p.total_bytes))),
        )
    } else {
        (g(&p.files_done).to_string(), String::new())
    };
    let eta = if known && rate > 0.0 {
        let left = g(&p.total_bytes).saturating_sub(done) as f64 / rate;
        let s = left as u64;
        format!("  ETA {}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
    } else {
        String::new()
    };
    let errors = match g(&p.errors) {
        0 => String::new(),
        n => format!("  {n} errors"),
    };
    let current = p.current.lock().map(|c| c.clone()).unwrap_or_default();
    let stored = if verb == "backup" {
        format!("  new {}", bytes(g(&p.bytes_stored)))
    } else {
        String::new()
    };
    format!(
        "{verb}: files {files}  {}{total}{stored}  {}/s{eta}{errors}  {}",
        bytes(done),
        bytes(rate as u64),
        tail(&current, 40)
    )
}

fn tail(s: &str, n: usize) -> String {
    let count = s.chars().count();
    if count <= n {
        s.to_owned()
    } else {
        format!("…{}", s.chars().skip(count - n).collect::<String>())
    }
}
