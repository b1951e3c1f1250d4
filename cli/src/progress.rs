//! Progress of backup and restore on a terminal: files, bytes read, bytes new, rate and
//! ETA, drawn from the engine's event stream ([`cairn_engine::progress::Ticker`]); or,
//! with `--progress json`, each event as a JSON line on standard error.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_engine::progress::{Event, EventSink, Progress, Sample, Ticker};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::format::bytes;

/// Where progress goes (`--progress`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum ProgressMode {
    /// A bar on a terminal, nothing otherwise
    #[default]
    Auto,
    /// Nothing
    None,
    /// One JSON object per event on standard error
    Json,
}

pub struct Display {
    ticker: Option<Ticker>,
    bar: Option<Arc<Bar>>,
}

/// The bar: redrawn from each progress event.
struct Bar {
    bar: ProgressBar,
    verb: &'static str,
}

impl EventSink for Bar {
    fn event(&self, e: &Event) {
        match e {
            Event::Progress(s) => {
                self.bar.set_message(line(s, self.verb));
                self.bar.tick();
            }
            Event::Message { text, .. } => self.bar.println(text),
        }
    }
}

/// JSON lines on standard error.
struct JsonLines(Mutex<std::io::Stderr>);

impl EventSink for JsonLines {
    fn event(&self, e: &Event) {
        if let (Ok(mut err), Ok(text)) = (self.0.lock(), serde_json::to_string(e)) {
            let _ = writeln!(err, "{text}");
        }
    }
}

impl Display {
    /// Starts showing `progress`: a bar on stderr when it is a terminal and `enabled`,
    /// JSON lines when `mode` says so.
    pub fn start(progress: Arc<Progress>, verb: &'static str, enabled: bool) -> Self {
        Self::with_mode(progress, verb, enabled, crate::progress_mode())
    }

    fn with_mode(
        progress: Arc<Progress>,
        verb: &'static str,
        enabled: bool,
        mode: ProgressMode,
    ) -> Self {
        match mode {
            ProgressMode::Json => Self {
                ticker: Some(Ticker::start(
                    progress,
                    Duration::from_secs(1),
                    Arc::new(JsonLines(Mutex::new(std::io::stderr()))),
                )),
                bar: None,
            },
            ProgressMode::Auto if enabled && std::io::stderr().is_terminal() => {
                let pb = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(5));
                pb.set_style(
                    ProgressStyle::with_template("{spinner} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                );
                let bar = Arc::new(Bar { bar: pb, verb });
                Self {
                    ticker: Some(Ticker::start(
                        progress,
                        Duration::from_millis(200),
                        bar.clone(),
                    )),
                    bar: Some(bar),
                }
            }
            _ => Self {
                ticker: None,
                bar: None,
            },
        }
    }

    pub fn finish(mut self) {
        if let Some(t) = self.ticker.take() {
            t.finish();
        }
        if let Some(b) = self.bar.take() {
            b.bar.finish_and_clear();
        }
    }
}

fn line(s: &Sample, verb: &str) -> String {
    let (files, total) = match (s.total_files, s.total_bytes) {
        (Some(f), Some(b)) => (format!("{}/{f}", s.files_done), format!("/{}", bytes(b))),
        _ => (s.files_done.to_string(), String::new()),
    };
    let eta = s
        .eta_seconds
        .map(|t| format!("  ETA {}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60))
        .unwrap_or_default();
    let errors = match s.errors {
        0 => String::new(),
        n => format!("  {n} errors"),
    };
    let stored = if verb == "backup" {
        format!("  new {}", bytes(s.bytes_stored))
    } else {
        String::new()
    };
    format!(
        "{verb}: files {files}  {}{total}{stored}  {}/s{eta}{errors}  {}",
        bytes(s.bytes_done),
        bytes(s.bytes_per_second),
        tail(&s.current, 40)
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
