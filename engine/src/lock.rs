//! Repository locks: `locks/<lock id>`, one small JSON file per process that uses the
//! repository.
//!
//! - **Shared** locks are taken by everything that writes or reads data (backup, restore,
//!   check, mount, forget, the mark phase of prune). Any number coexist.
//! - **Exclusive** locks are taken by what deletes data (the sweep of prune, repair, index
//!   rebuild). One exists only while no other live lock does.
//!
//! Taking a lock = write our file, then list the others; on a conflict, take ours back,
//! wait and retry until the deadline. Two racing takers can both back off, never both win.
//! A lock records host, user, pid (with the process's start time, so a reused pid is not
//! mistaken for the owner) and when it was created and last refreshed; a thread rewrites
//! it every [`REFRESH_EVERY`]. A lock is **stale** when its process is gone (same host) or
//! it was not refreshed for [`STALE_AFTER`]. Stale locks do not block anyone; they are
//! reported, and `repo unlock` removes them. A holder whose file disappeared (removed by
//! `unlock` as stale) learns it at its next refresh and refuses to commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::error::{Error, IoContext, Result};
use crate::id::Id;
use crate::repository::{current_host, current_user};
use crate::store::{Backend, FileKind};

/// How often a holder rewrites its lock file.
pub const REFRESH_EVERY: Duration = Duration::from_secs(300);
/// A lock not refreshed for this long is stale.
pub const STALE_AFTER: Duration = Duration::from_secs(1800);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LockKind {
    Shared,
    Exclusive,
}

/// The content of a lock file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockInfo {
    pub version: u32,
    pub kind: LockKind,
    /// What the holder is doing: `backup`, `prune`, `mount`, ...
    pub operation: String,
    pub host: String,
    pub user: String,
    pub pid: u32,
    /// The process's start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    #[serde(default)]
    pub pid_start: Option<u64>,
    pub created: DateTime<Utc>,
    pub refreshed: DateTime<Utc>,
}

impl LockInfo {
    fn describe(&self) -> String {
        format!(
            "{} lock by `{}` (pid {} on {}, user {}, since {})",
            match self.kind {
                LockKind::Shared => "shared",
                LockKind::Exclusive => "exclusive",
            },
            self.operation,
            self.pid,
            self.host,
            self.user,
            self.created.format("%Y-%m-%d %H:%M:%S UTC")
        )
    }
}

/// A lock file found in the repository.
#[derive(Debug, Clone)]
pub struct LockEntry {
    /// File name in `locks/`.
    pub name: String,
    /// Its content, or why it could not be read.
    pub info: std::result::Result<LockInfo, String>,
    /// Why it is stale, if it is.
    pub stale: Option<String>,
}

impl LockEntry {
    #[must_use]
    pub fn describe(&self) -> String {
        match &self.info {
            Ok(i) => i.describe(),
            Err(e) => format!("unreadable lock {}: {e}", self.name),
        }
    }
}

/// Start time of a live process, `None` when there is no such (non-zombie) process.
fn process_start(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold anything.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); field 22 is starttime.
    if fields.first() == Some(&"Z") || fields.first() == Some(&"X") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Why `info` is stale at `now`, or `None` when its holder may be alive.
#[must_use]
pub fn staleness(info: &LockInfo, now: DateTime<Utc>) -> Option<String> {
    if info.host == current_host() {
        match process_start(info.pid) {
            None => return Some(format!("process {} on this host is gone", info.pid)),
            Some(start) if info.pid_start.is_some_and(|s| s != start) => {
                return Some(format!(
                    "process {} on this host is gone (its pid was reused)",
                    info.pid
                ))
            }
            Some(_) => {}
        }
    }
    let age = now.signed_duration_since(info.refreshed);
    let limit = chrono::Duration::from_std(STALE_AFTER).unwrap_or(chrono::Duration::MAX);
    (age > limit).then(|| {
        format!(
            "not refreshed for {} min (stale after {} min)",
            age.num_minutes(),
            limit.num_minutes()
        )
    })
}

/// Every lock file of the repository, with its staleness.
pub fn list(backend: &dyn Backend) -> Result<Vec<LockEntry>> {
    let now = Utc::now();
    let mut out = Vec::new();
    for name in backend
        .list(FileKind::Lock)
        .ctx(|| "listing locks".into())?
    {
        let info = match backend.read(FileKind::Lock, &name) {
            Ok(bytes) => serde_json::from_slice::<LockInfo>(&bytes).map_err(|e| e.to_string()),
            // Removed between list and read: its holder let go.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => Err(e.to_string()),
        };
        let stale = match &info {
            Ok(i) => staleness(i, now),
            // A file that is not a lock blocks nobody but is worth removing.
            Err(_) => Some("unreadable".to_owned()),
        };
        out.push(LockEntry { name, info, stale });
    }
    Ok(out)
}

/// Whether a holder doing `operation` may write packs that no snapshot refers to yet
/// (a backup before it commits, a prune's or repair's copies). Readers and `forget` do
/// not; an operation this program does not know is assumed to.
#[must_use]
pub fn may_add_data(operation: &str) -> bool {
    !matches!(
        operation,
        "mount" | "restore" | "check" | "forget" | "verify"
    )
}

/// Room for the clocks of a lock's writer on another host and of the storage to
/// disagree. A lock of this host needs none: its times and the files' times come from
/// one clock.
pub const CLOCK_MARGIN: Duration = Duration::from_secs(60);

/// A span of time in which a writer that has not committed (running, or interrupted:
/// its lock is stale but still there) may have written packs. A prune leaves the packs
/// written within it alone, so that the writer's snapshot, or the next backup that
/// reuses an interrupted one's packs, finds them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub from: std::time::SystemTime,
    /// `None` while the writer runs.
    pub until: Option<std::time::SystemTime>,
    /// Who, for messages.
    pub holder: String,
}

impl Window {
    #[must_use]
    pub fn contains(&self, t: std::time::SystemTime) -> bool {
        t >= self.from && self.until.is_none_or(|u| t <= u)
    }
}

/// The [`Window`]s of every lock in `entries` but the one named `own`: from each
/// writer's start to now for a live one, to its last refresh plus [`REFRESH_EVERY`] for a
/// stale one; widened by [`CLOCK_MARGIN`] on both sides for another host's.
#[must_use]
pub fn uncommitted_windows(entries: &[LockEntry], own: Option<&str>) -> Vec<Window> {
    let to_system = |t: DateTime<Utc>| std::time::SystemTime::from(t);
    let here = current_host();
    entries
        .iter()
        .filter(|e| Some(e.name.as_str()) != own)
        .filter_map(|e| {
            let info = e.info.as_ref().ok()?;
            if !may_add_data(&info.operation) {
                return None;
            }
            let margin = if info.host == here {
                Duration::ZERO
            } else {
                CLOCK_MARGIN
            };
            let from = to_system(info.created)
                .checked_sub(margin)
                .unwrap_or(std::time::UNIX_EPOCH);
            let until = e
                .stale
                .as_ref()
                .map(|_| to_system(info.refreshed) + REFRESH_EVERY + margin);
            Some(Window {
                from,
                until,
                holder: e.describe(),
            })
        })
        .collect()
}

/// Removes stale locks (or every lock with `all`). Returns what was removed.
pub fn unlock(backend: &dyn Backend, all: bool) -> Result<Vec<LockEntry>> {
    let mut removed = Vec::new();
    for entry in list(backend)? {
        if all || entry.stale.is_some() {
            backend
                .remove(FileKind::Lock, &entry.name)
                .ctx(|| format!("removing locks/{}", entry.name))?;
            removed.push(entry);
        }
    }
    Ok(removed)
}

struct Shared {
    backend: Arc<dyn Backend>,
    name: String,
    info: Mutex<LockInfo>,
    lost: AtomicBool,
}

impl Shared {
    fn info(&self) -> std::sync::MutexGuard<'_, LockInfo> {
        self.info
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self, info: &LockInfo) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(info)
            .map_err(|e| Error::InvalidInput(format!("encoding lock: {e}")))?;
        self.backend
            .write(FileKind::Lock, &self.name, &bytes)
            .ctx(|| format!("writing locks/{}", self.name))
    }

    /// Rewrites the file with a new refresh time; notices when it was taken away.
    fn refresh(&self) {
        let mut info = self.info();
        match self.backend.size(FileKind::Lock, &self.name) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::error!(
                    "our lock locks/{} was removed by someone else; this run will not commit",
                    self.name
                );
                self.lost.store(true, Ordering::SeqCst);
                return;
            }
            _ => {}
        }
        info.refreshed = Utc::now();
        if let Err(e) = self.write(&info) {
            tracing::warn!("refreshing lock: {e}");
        }
    }

    /// The live locks of others that conflict with holding `kind`.
    fn conflicts(&self, kind: LockKind) -> Result<Vec<LockEntry>> {
        let mut out = Vec::new();
        for e in list(self.backend.as_ref())? {
            if e.name == self.name {
                continue;
            }
            if let Some(why) = &e.stale {
                static WARNED: Mutex<Vec<String>> = Mutex::new(Vec::new());
                let mut warned = WARNED
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if warned.contains(&e.name) {
                    continue;
                }
                warned.push(e.name.clone());
                tracing::warn!(
                    "ignoring stale lock: {} ({why}); `repo unlock` removes it",
                    e.describe()
                );
                continue;
            }
            let theirs = e.info.as_ref().map(|i| i.kind).ok();
            if kind == LockKind::Exclusive || theirs == Some(LockKind::Exclusive) {
                out.push(e);
            }
        }
        Ok(out)
    }
}

/// A lock held by this process; released (file removed) on drop.
pub struct Lock {
    shared: Arc<Shared>,
    stop: Option<mpsc::Sender<()>>,
    refresher: Option<std::thread::JoinHandle<()>>,
}

fn backoff(attempt: u32) -> Duration {
    // 100 ms growing to 2 s, with jitter so that two racing takers desynchronise.
    let base = 100u64.saturating_mul(1 << attempt.min(4)).min(2000);
    let jitter = u64::from(Id::random().as_bytes()[0]) * base / 512;
    Duration::from_millis(base / 2 + jitter)
}

fn locked_error(kind: LockKind, operation: &str, holders: &[LockEntry], waited: Duration) -> Error {
    let list: Vec<String> = holders.iter().map(LockEntry::describe).collect();
    Error::Locked(format!(
        "cannot take a{} lock for `{operation}` after waiting {} s: the repository is in use by {}",
        if kind == LockKind::Exclusive {
            "n exclusive"
        } else {
            " shared"
        },
        waited.as_secs(),
        list.join("; ")
    ))
}

impl Lock {
    /// Takes a lock of `kind` for `operation`, waiting up to `wait` for conflicting
    /// holders to finish.
    pub fn acquire(
        backend: Arc<dyn Backend>,
        kind: LockKind,
        operation: &str,
        wait: Duration,
    ) -> Result<Self> {
        let now = Utc::now();
        let pid = std::process::id();
        let info = LockInfo {
            version: 1,
            kind,
            operation: operation.to_owned(),
            host: current_host(),
            user: current_user(),
            pid,
            pid_start: process_start(pid),
            created: now,
            refreshed: now,
        };
        let shared = Arc::new(Shared {
            backend,
            name: Id::random().to_hex(),
            info: Mutex::new(info),
            lost: AtomicBool::new(false),
        });
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            let info = shared.info().clone();
            shared.write(&info)?;
            let conflicts = match shared.conflicts(kind) {
                Ok(c) => c,
                Err(e) => {
                    let _ = shared.backend.remove(FileKind::Lock, &shared.name);
                    return Err(e);
                }
            };
            if conflicts.is_empty() {
                break;
            }
            let _ = shared.backend.remove(FileKind::Lock, &shared.name);
            if started.elapsed() >= wait {
                return Err(locked_error(kind, operation, &conflicts, started.elapsed()));
            }
            if attempt == 0 {
                tracing::info!(
                    "waiting for the repository: in use by {}",
                    conflicts[0].describe()
                );
            }
            std::thread::sleep(backoff(attempt));
            attempt += 1;
        }
        let (tx, rx) = mpsc::channel::<()>();
        let s = shared.clone();
        let refresher = std::thread::Builder::new()
            .name("cairn-lock".into())
            .spawn(move || {
                while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(REFRESH_EVERY) {
                    s.refresh();
                }
            })
            .map_err(|e| Error::io("starting the lock refresher", e))?;
        Ok(Self {
            shared,
            stop: Some(tx),
            refresher: Some(refresher),
        })
    }

    /// Turns a shared lock into an exclusive one, waiting up to `wait` for every other
    /// live lock to go. New shared takers are not kept out while we wait (backups come
    /// first); they are only kept out while we hold it.
    pub fn upgrade(&self, wait: Duration) -> Result<()> {
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            self.set_kind(LockKind::Exclusive)?;
            let conflicts = self.shared.conflicts(LockKind::Exclusive)?;
            if conflicts.is_empty() {
                return Ok(());
            }
            self.set_kind(LockKind::Shared)?;
            if started.elapsed() >= wait {
                let op = self.shared.info().operation.clone();
                return Err(locked_error(
                    LockKind::Exclusive,
                    &op,
                    &conflicts,
                    started.elapsed(),
                ));
            }
            if attempt == 0 {
                tracing::info!(
                    "waiting for the repository to be free: in use by {}",
                    conflicts[0].describe()
                );
            }
            std::thread::sleep(backoff(attempt));
            attempt += 1;
        }
    }

    fn set_kind(&self, kind: LockKind) -> Result<()> {
        let mut info = self.shared.info();
        info.kind = kind;
        info.refreshed = Utc::now();
        self.shared.write(&info)
    }

    /// Fails when the lock was taken away (removed as stale by someone else).
    pub fn ensure_held(&self) -> Result<()> {
        if self.shared.lost.load(Ordering::SeqCst) {
            return Err(Error::Locked(format!(
                "our lock locks/{} was removed while we held it (by `repo unlock`?); \
                 refusing to commit, since a prune may have deleted data this run relies on",
                self.shared.name
            )));
        }
        Ok(())
    }

    /// The lock file's name in `locks/`.
    #[must_use]
    pub fn name(&self) -> &str {
        &self.shared.name
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.refresher.take() {
            let _ = t.join();
        }
        if let Err(e) = self
            .shared
            .backend
            .remove(FileKind::Lock, &self.shared.name)
        {
            tracing::warn!("removing our lock locks/{}: {e}", self.shared.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::LocalBackend;

    fn backend() -> (tempfile::TempDir, Arc<dyn Backend>) {
        let d = tempfile::tempdir().unwrap();
        let b = LocalBackend::new(d.path().join("r"));
        b.create_layout().unwrap();
        (d, Arc::new(b))
    }

    fn foreign(kind: LockKind, host: &str, pid: u32, refreshed: DateTime<Utc>) -> Vec<u8> {
        serde_json::to_vec(&LockInfo {
            version: 1,
            kind,
            operation: "backup".into(),
            host: host.into(),
            user: "someone".into(),
            pid,
            pid_start: None,
            created: refreshed,
            refreshed,
        })
        .unwrap()
    }

    #[test]
    fn shared_locks_coexist_and_exclusive_waits_for_them() {
        let (_d, b) = backend();
        let a = Lock::acquire(b.clone(), LockKind::Shared, "backup", Duration::ZERO).unwrap();
        let c = Lock::acquire(b.clone(), LockKind::Shared, "backup", Duration::ZERO).unwrap();
        assert_eq!(list(b.as_ref()).unwrap().len(), 2);
        let err = Lock::acquire(b.clone(), LockKind::Exclusive, "prune", Duration::ZERO)
            .err()
            .unwrap();
        assert!(err.to_string().contains("shared lock by `backup`"), "{err}");
        // The loser took its file back.
        assert_eq!(list(b.as_ref()).unwrap().len(), 2);
        assert!(a.upgrade(Duration::ZERO).is_err());
        drop(c);
        a.upgrade(Duration::ZERO).unwrap();
        assert!(Lock::acquire(b.clone(), LockKind::Shared, "backup", Duration::ZERO).is_err());
        drop(a);
        assert!(list(b.as_ref()).unwrap().is_empty());
        Lock::acquire(b.clone(), LockKind::Exclusive, "prune", Duration::ZERO).unwrap();
    }

    #[test]
    fn waiting_taker_gets_the_lock_when_the_holder_lets_go() {
        let (_d, b) = backend();
        let x = Lock::acquire(b.clone(), LockKind::Exclusive, "prune", Duration::ZERO).unwrap();
        let b2 = b.clone();
        let t = std::thread::spawn(move || {
            Lock::acquire(b2, LockKind::Shared, "backup", Duration::from_secs(20)).map(|_| ())
        });
        std::thread::sleep(Duration::from_millis(300));
        drop(x);
        t.join().unwrap().unwrap();
    }

    #[test]
    fn dead_and_old_locks_are_stale_and_unlock_removes_only_them() {
        let (_d, b) = backend();
        // A process of this host that no longer exists.
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        b.write(
            FileKind::Lock,
            "dead",
            &foreign(LockKind::Exclusive, &current_host(), dead, Utc::now()),
        )
        .unwrap();
        // Another host, silent for two hours.
        b.write(
            FileKind::Lock,
            "old",
            &foreign(
                LockKind::Exclusive,
                "elsewhere",
                1,
                Utc::now() - chrono::Duration::hours(2),
            ),
        )
        .unwrap();
        // Another host, refreshed a minute ago: alive as far as we can tell.
        b.write(
            FileKind::Lock,
            "live",
            &foreign(
                LockKind::Shared,
                "elsewhere",
                1,
                Utc::now() - chrono::Duration::minutes(1),
            ),
        )
        .unwrap();
        b.write(FileKind::Lock, "junk", b"not json").unwrap();
        let all = list(b.as_ref()).unwrap();
        let stale = |n: &str| all.iter().find(|e| e.name == n).unwrap().stale.clone();
        assert!(stale("dead").unwrap().contains("is gone"));
        assert!(stale("old").unwrap().contains("not refreshed"));
        assert!(stale("live").is_none());
        assert!(stale("junk").is_some());
        // Stale exclusive locks do not block a shared taker; the live shared one blocks
        // an exclusive taker.
        drop(Lock::acquire(b.clone(), LockKind::Shared, "backup", Duration::ZERO).unwrap());
        assert!(Lock::acquire(b.clone(), LockKind::Exclusive, "prune", Duration::ZERO).is_err());
        let removed = unlock(b.as_ref(), false).unwrap();
        let mut names: Vec<_> = removed.iter().map(|e| e.name.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["dead", "junk", "old"]);
        assert_eq!(list(b.as_ref()).unwrap().len(), 1);
    }

    #[test]
    fn writers_that_have_not_committed_protect_the_time_they_ran() {
        let now = Utc::now();
        let entry = |name: &str, op: &str, host: &str, created, refreshed, stale: bool| LockEntry {
            name: name.into(),
            info: Ok(LockInfo {
                version: 1,
                kind: LockKind::Shared,
                operation: op.into(),
                host: host.into(),
                user: "u".into(),
                pid: 1,
                pid_start: None,
                created,
                refreshed,
            }),
            stale: stale.then(|| "gone".to_owned()),
        };
        let min = chrono::Duration::minutes;
        let here = current_host();
        let entries = vec![
            entry("own", "prune", &here, now - min(1), now, false),
            entry("live", "backup", &here, now - min(10), now, false),
            entry("dead", "backup", &here, now - min(60), now - min(50), true),
            entry(
                "far",
                "backup",
                "elsewhere",
                now - min(120),
                now - min(118),
                true,
            ),
            entry("reader", "mount", &here, now - min(500), now, false),
        ];
        let w = uncommitted_windows(&entries, Some("own"));
        assert_eq!(w.len(), 3, "{w:?}");
        let at = |d: chrono::Duration| std::time::SystemTime::from(now - d);
        let covered = |t| w.iter().filter(|w| w.contains(t)).count();
        // The live backup: from its start on.
        assert_eq!(covered(at(min(5))), 1);
        assert_eq!(covered(at(min(11))), 0);
        // The dead one: while it ran, up to its last refresh and one refresh period.
        assert_eq!(covered(at(min(55))), 1);
        assert_eq!(covered(at(min(46))), 1);
        assert_eq!(covered(at(min(44))), 0);
        // Another host's: the same, widened by the clock margin.
        assert_eq!(covered(at(min(120) + chrono::Duration::seconds(30))), 1);
        // Readers protect nothing.
        assert_eq!(covered(at(min(400))), 0);
    }

    #[test]
    fn a_holder_whose_lock_was_removed_knows() {
        let (_d, b) = backend();
        let l = Lock::acquire(b.clone(), LockKind::Shared, "backup", Duration::ZERO).unwrap();
        l.ensure_held().unwrap();
        b.remove(FileKind::Lock, l.name()).unwrap();
        l.shared.refresh();
        assert!(l.ensure_held().is_err());
    }
}
