//! Subprocesses the sources run (pg_basebackup, pg_dump, mariadb-backup, ...).
//!
//! Always argument vectors, never a shell string. Standard error is captured (its last
//! [`STDERR_KEEP`] bytes) and goes into the error when the program fails. A program whose
//! output is streamed into a backup is read through [`ChildReader`], which reports the
//! program's failure as a read error at the end of its output: the backup then fails
//! instead of saving a snapshot of a half dump.

use std::ffi::OsStr;
use std::io::{self, Read};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Bytes of a program's standard error kept for its error message.
pub const STDERR_KEEP: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot run {program}: {source} (is it installed?)")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("{what} failed ({status}): {stderr}")]
    Failed {
        what: String,
        status: ExitStatus,
        stderr: String,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

fn program_name(cmd: &Command) -> String {
    cmd.get_program().to_string_lossy().into_owned()
}

/// Keeps the tail of a stream (a program's standard error).
fn collect_tail<R: Read + Send + 'static>(mut r: R) -> (Arc<Mutex<Vec<u8>>>, JoinHandle<()>) {
    let buf = Arc::new(Mutex::new(Vec::new()));
    let b = buf.clone();
    let handle = std::thread::spawn(move || {
        let mut chunk = [0u8; 4096];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let mut v = b.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    v.extend_from_slice(&chunk[..n]);
                    if v.len() > 2 * STDERR_KEEP {
                        let cut = v.len() - STDERR_KEEP;
                        v.drain(..cut);
                    }
                }
            }
        }
    });
    (buf, handle)
}

/// The last [`STDERR_KEEP`] bytes of a program's standard error, as text.
fn tail_text(v: &[u8]) -> String {
    let start = v.len().saturating_sub(STDERR_KEEP);
    let text = String::from_utf8_lossy(&v[start..]).trim().to_owned();
    if text.is_empty() {
        "(no error output)".to_owned()
    } else {
        text
    }
}

/// Runs `cmd` to completion with no input; returns its standard output, or an error
/// carrying its standard error.
pub fn run(cmd: &mut Command, what: &str) -> Result<Vec<u8>, ProcessError> {
    let program = program_name(cmd);
    tracing::debug!("running {cmd:?}");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ProcessError::Spawn { program, source })?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        Err(ProcessError::Failed {
            what: what.to_owned(),
            status: out.status,
            stderr: tail_text(&out.stderr),
        })
    }
}

/// The standard output of a running program, as a reader. At the end of the output it
/// waits for the program: a failure (non-zero exit, a signal) is returned as an error
/// from `read`, with the program's standard error. Dropping it early kills the program.
pub struct ChildReader {
    child: Child,
    stdout: ChildStdout,
    stderr: Arc<Mutex<Vec<u8>>>,
    stderr_thread: Option<JoinHandle<()>>,
    what: String,
    finished: bool,
}

impl ChildReader {
    pub fn spawn(cmd: &mut Command, what: &str) -> Result<Self, ProcessError> {
        let program = program_name(cmd);
        tracing::debug!("running {cmd:?}");
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| ProcessError::Spawn { program, source })?;
        let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
            let _ = child.kill();
            let _ = child.wait();
            return Err(ProcessError::Io {
                what: what.to_owned(),
                source: io::Error::other("no pipes to the program"),
            });
        };
        let (stderr, handle) = collect_tail(stderr);
        Ok(Self {
            child,
            stdout,
            stderr,
            stderr_thread: Some(handle),
            what: what.to_owned(),
            finished: false,
        })
    }

    fn finish(&mut self) -> io::Result<()> {
        self.finished = true;
        let status = self.child.wait()?;
        if let Some(h) = self.stderr_thread.take() {
            let _ = h.join();
        }
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(ProcessError::Failed {
                what: self.what.clone(),
                status,
                stderr: tail_text(
                    &self
                        .stderr
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner),
                ),
            }))
        }
    }
}

impl Read for ChildReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.finished || buf.is_empty() {
            return Ok(0);
        }
        let n = self.stdout.read(buf)?;
        if n == 0 {
            self.finish()?;
        }
        Ok(n)
    }
}

impl Drop for ChildReader {
    fn drop(&mut self) {
        if !self.finished {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Whether process `pid` still runs. A zombie counts as gone: it has released its files
/// and locks, and its reaping is up to its parent or init (which may take its time).
#[must_use]
pub fn pid_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit_once(") ")
        .and_then(|(_, rest)| rest.chars().next());
    !matches!(state, None | Some('Z' | 'X'))
}

/// `program` from `dir` if it is there, else from `PATH`.
pub fn tool(dir: Option<&std::path::Path>, program: &str) -> Command {
    match dir.map(|d| d.join(program)).filter(|p| p.is_file()) {
        Some(p) => Command::new(p),
        None => Command::new(OsStr::new(program)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failing_program_fails_the_read_with_its_stderr() {
        let mut r = ChildReader::spawn(
            Command::new("sh").args(["-c", "echo partial; echo 'disk on fire' >&2; exit 3"]),
            "the dump",
        )
        .unwrap();
        let mut out = Vec::new();
        let err = r.read_to_end(&mut out).unwrap_err().to_string();
        assert_eq!(out, b"partial\n");
        assert!(err.contains("the dump failed"), "{err}");
        assert!(err.contains("disk on fire"), "{err}");
    }

    #[test]
    fn a_succeeding_program_reads_to_the_end() {
        let mut r = ChildReader::spawn(Command::new("printf").arg("abc"), "printf").unwrap();
        let mut out = String::new();
        r.read_to_string(&mut out).unwrap();
        assert_eq!(out, "abc");
        let e = run(Command::new("sh").args(["-c", "echo nope >&2; false"]), "x").unwrap_err();
        assert!(e.to_string().contains("nope"));
        let e = run(&mut Command::new("/nonexistent/tool"), "x").unwrap_err();
        assert!(e.to_string().contains("is it installed"));
    }
}
