//! `repo`: the command-line interface of cairn. Thin: parses arguments, finds the
//! repository and password, calls the engine, prints text or JSON, maps errors to
//! documented exit codes.

mod args;
mod cmd;
mod format;
mod open;
mod progress;
mod testonly;

use std::process::ExitCode;
use std::sync::OnceLock;

use clap::Parser;

use cairn_engine::ErrorKind;

/// Exit codes (documented in `repo --help` and README).
pub mod exit {
    pub const OK: u8 = 0;
    pub const ERROR: u8 = 1;
    pub const PARTIAL: u8 = 3;
    pub const VERIFICATION_FAILED: u8 = 4;
    pub const NO_REPOSITORY: u8 = 10;
    pub const LOCKED: u8 = 11;
    pub const WRONG_PASSWORD: u8 = 12;
    pub const UNSUPPORTED_VERSION: u8 = 13;
    pub const DAMAGED: u8 = 14;
    pub const IDENTITY_CHANGED: u8 = 15;
}

static PROGRESS: OnceLock<progress::ProgressMode> = OnceLock::new();

/// `--progress`, for every command's display.
pub(crate) fn progress_mode() -> progress::ProgressMode {
    PROGRESS.get().copied().unwrap_or_default()
}

fn exit_code_of(e: &anyhow::Error) -> u8 {
    for cause in e.chain() {
        if let Some(engine) = cause.downcast_ref::<cairn_engine::Error>() {
            return match engine.kind() {
                ErrorKind::NotARepository => exit::NO_REPOSITORY,
                ErrorKind::WrongPassword => exit::WRONG_PASSWORD,
                ErrorKind::UnsupportedVersion => exit::UNSUPPORTED_VERSION,
                ErrorKind::Corrupt => exit::DAMAGED,
                ErrorKind::Locked => exit::LOCKED,
                ErrorKind::IdentityChanged => exit::IDENTITY_CHANGED,
                _ => exit::ERROR,
            };
        }
    }
    exit::ERROR
}

fn main() -> ExitCode {
    let cli = args::Cli::parse();
    let level = match (cli.global.quiet, cli.global.verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, _) => "debug",
    };
    let _ = PROGRESS.set(cli.global.progress);
    let filter = tracing_subscriber::EnvFilter::try_from_env("REPO_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},fuser=error")));
    match cli.global.log_format {
        args::LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_target(false)
            .without_time()
            .init(),
        args::LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .init(),
    }
    if let Err(e) = testonly::switches() {
        eprintln!("error: {}", describe(&e));
        return ExitCode::from(exit::ERROR);
    }
    match cmd::run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            ExitCode::from(exit_code_of(&e))
        }
    }
}

/// An error and its causes, `: `-separated, each cause left out when the message before
/// it already says it (an engine error shows its I/O cause in its own message).
fn describe(e: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in e.chain() {
        let part = cause.to_string();
        if text.contains(&part) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&part);
    }
    text
}
