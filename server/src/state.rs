//! The daemon's host state: `serve.sqlite` in the state directory, beside the recovery
//! sessions. Jobs, schedules (and the last slot each one handled), runs with their logs,
//! missed runs, API tokens (hashed) and the audit log.
//!
//! Never the only copy of a repository fact: snapshots live in the repository, and a run
//! records their ids only. One connection behind a mutex; every call is short.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use chrono::{DateTime, Utc};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::job::JobDefinition;

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("{path}: {source}")]
    Db {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StateError>;

/// A run's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(transparent)]
pub struct RunId(pub i64);

impl std::fmt::Display for RunId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A schedule's id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(transparent)]
pub struct ScheduleId(pub i64);

impl std::fmt::Display for ScheduleId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Where a job or schedule was defined: the configuration file's are read-only.
/// What a schedule does at its slots: run its job (a backup, then retention and
/// checks), or verify the newest snapshot of each of the job's sources (`repo verify`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleAction {
    #[default]
    Run,
    Verify,
}

impl ScheduleAction {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Run => "run",
            Self::Verify => "verify",
        }
    }

    /// `run` or `verify`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "run" => Some(Self::Run),
            "verify" => Some(Self::Verify),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Config,
    Api,
}

impl Origin {
    fn as_str(self) -> &'static str {
        match self {
            Self::Config => "config",
            Self::Api => "api",
        }
    }
    fn parse(s: &str) -> Self {
        if s == "config" {
            Self::Config
        } else {
            Self::Api
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl RunStatus {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }

    #[must_use]
    pub fn is_finished(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
}

/// What started a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunTrigger {
    Schedule,
    /// A run missed while the daemon was down, made up at start.
    Missed,
    Api,
    Cli,
}

impl RunTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Schedule => "schedule",
            Self::Missed => "missed",
            Self::Api => "api",
            Self::Cli => "cli",
        }
    }
    fn parse(s: &str) -> Self {
        match s {
            "schedule" => Self::Schedule,
            "missed" => Self::Missed,
            "cli" => Self::Cli,
            _ => Self::Api,
        }
    }
}

/// The figures of a finished run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunStats {
    pub files: u64,
    pub total_bytes: u64,
    pub bytes_read: u64,
    pub bytes_new: u64,
    pub bytes_stored: u64,
    pub duration_ms: u64,
    /// Snapshot ids made (hex).
    pub snapshots: Vec<String>,
    /// Snapshots removed by the retention policy.
    pub forgotten: u64,
    /// Whether the verification asked for found the repository sound.
    pub verified: Option<bool>,
    /// Snapshots copied to the job's `copy` repository by this run.
    #[serde(default)]
    pub copied: u64,
}

impl RunStats {
    /// Bytes of the sources per byte added (1.0 when nothing was read).
    #[must_use]
    #[allow(clippy::cast_precision_loss)]
    pub fn dedup_ratio(&self) -> f64 {
        if self.bytes_new == 0 {
            return if self.total_bytes == 0 {
                1.0
            } else {
                self.total_bytes as f64
            };
        }
        self.total_bytes as f64 / self.bytes_new as f64
    }

    /// New bytes per byte stored (after compression).
    #[must_use]
    #[allow(clippy::cast_precision_loss)]
    pub fn compression_ratio(&self) -> f64 {
        if self.bytes_stored == 0 {
            return 1.0;
        }
        self.bytes_new as f64 / self.bytes_stored as f64
    }

    /// Bytes read per second.
    #[must_use]
    #[allow(clippy::cast_precision_loss)]
    pub fn rate(&self) -> f64 {
        if self.duration_ms == 0 {
            return 0.0;
        }
        self.bytes_read as f64 * 1000.0 / self.duration_ms as f64
    }
}

/// One run as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Run {
    pub id: RunId,
    pub job: String,
    pub trigger: RunTrigger,
    pub status: RunStatus,
    pub queued_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub ended_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub stats: RunStats,
    /// The process executing it (the daemon, or a `repo job run`).
    pub pid: Option<u32>,
}

/// One line of a run's log.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogLine {
    pub seq: i64,
    pub at: DateTime<Utc>,
    pub level: String,
    pub message: String,
}

/// A job as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredJob {
    pub definition: JobDefinition,
    pub origin: Origin,
    pub updated: DateTime<Utc>,
}

/// A schedule as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScheduleRow {
    pub id: ScheduleId,
    pub job: String,
    pub when: String,
    pub timezone: Option<String>,
    pub jitter_secs: u64,
    pub missed: String,
    pub enabled: bool,
    pub origin: Origin,
    /// The last slot handled (run, or recorded as missed).
    pub last_slot: Option<DateTime<Utc>>,
    /// A run of the job (the default), or a verification of its newest snapshots.
    #[serde(default)]
    pub action: ScheduleAction,
}

/// A run that should have happened and did not.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Missed {
    pub schedule: ScheduleId,
    pub job: String,
    pub slot: DateTime<Utc>,
    pub reason: String,
    pub recorded: DateTime<Utc>,
}

/// What a storage token may do with its repository (`crate::storage`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StorageMode {
    /// Everything: backup, forget, prune, repair, keys.
    Full,
    /// Add data and snapshots, never delete or rewrite them (and take locks): what a
    /// backed-up host gets, so that its compromise cannot destroy its backups.
    AppendOnly,
    /// Read, and take locks (restore, mount, check).
    Read,
}

impl StorageMode {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::AppendOnly => "append-only",
            Self::Read => "read",
        }
    }

    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "full" => Some(Self::Full),
            "append-only" => Some(Self::AppendOnly),
            "read" => Some(Self::Read),
            _ => None,
        }
    }
}

/// A token for one repository's storage, as stored (its hash only).
#[derive(Debug, Clone, Serialize)]
pub struct StorageTokenRow {
    pub name: String,
    pub repository: String,
    pub mode: StorageMode,
    /// Bytes of new files the token may add in all; `None`: no bound.
    pub quota: Option<u64>,
    /// Bytes of new files it added.
    pub used: u64,
    pub created: DateTime<Utc>,
    pub last_used: Option<DateTime<Utc>>,
}

/// An API token as stored (its hash only).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenRow {
    pub name: String,
    pub read_only: bool,
    pub created: DateTime<Utc>,
    pub last_used: Option<DateTime<Utc>>,
}

/// A dashboard user (`repo serve user add`); `hash` is the argon2id hash of the password.
#[derive(Debug, Clone, Serialize)]
pub struct UserRow {
    pub name: String,
    #[serde(skip)]
    pub hash: String,
    pub read_only: bool,
    pub created: DateTime<Utc>,
}

/// An open dashboard session; `hash` is the BLAKE3 hash of its cookie's value.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub hash: String,
    /// The token's name, or `user:NAME`.
    pub principal: String,
    pub read_only: bool,
    pub csrf: String,
    pub created: DateTime<Utc>,
    pub expires: DateTime<Utc>,
}

/// One entry of the audit log: who changed what, when.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditEntry {
    pub at: DateTime<Utc>,
    pub token: String,
    pub method: String,
    pub path: String,
    pub action: String,
    pub status: u16,
}

/// One check of a repository (through the API, the dashboard or a job's verify step).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckRecord {
    pub repository: String,
    pub at: DateTime<Utc>,
    pub ok: bool,
    /// `metadata`, `read-data` or `N/M`.
    pub how: String,
    /// Problems found (`None` when the check's report was not kept: a job's verify).
    pub problems: Option<u64>,
    /// Who asked: a token, `user:NAME`, or `job:NAME`.
    pub by: String,
}

/// A repository's size at one time: the points of its growth chart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SizeSample {
    pub at: DateTime<Utc>,
    pub size_bytes: u64,
    pub logical_bytes: u64,
    pub snapshots: u64,
}

/// How long size samples are kept (one per run; a listing thins them).
pub const SIZE_SAMPLES_KEPT_DAYS: i64 = 400;

/// Which runs a listing shows.
#[derive(Debug, Clone, Default)]
pub struct RunQuery {
    pub job: Option<String>,
    pub status: Option<RunStatus>,
    pub limit: usize,
    /// Runs with an id below this (for paging, newest first).
    pub before: Option<RunId>,
}

pub struct State {
    conn: Mutex<Connection>,
    path: PathBuf,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY,
    definition TEXT NOT NULL,
    origin TEXT NOT NULL,
    updated INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS schedules (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    spec TEXT NOT NULL,
    timezone TEXT,
    jitter_secs INTEGER NOT NULL DEFAULT 0,
    missed TEXT NOT NULL DEFAULT 'run-once',
    enabled INTEGER NOT NULL DEFAULT 1,
    origin TEXT NOT NULL,
    last_slot INTEGER,
    action TEXT NOT NULL DEFAULT 'run'
);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job TEXT NOT NULL,
    trigger TEXT NOT NULL,
    status TEXT NOT NULL,
    queued_at INTEGER NOT NULL,
    started_at INTEGER,
    ended_at INTEGER,
    error TEXT,
    stats TEXT NOT NULL DEFAULT '{}',
    pid INTEGER
);
CREATE INDEX IF NOT EXISTS runs_by_job ON runs (job, id);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status);
CREATE TABLE IF NOT EXISTS run_log (
    run INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    at INTEGER NOT NULL,
    level TEXT NOT NULL,
    message TEXT NOT NULL,
    PRIMARY KEY (run, seq)
);
CREATE TABLE IF NOT EXISTS missed (
    schedule INTEGER NOT NULL,
    job TEXT NOT NULL,
    slot INTEGER NOT NULL,
    reason TEXT NOT NULL,
    recorded INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS storage_tokens (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    repository TEXT NOT NULL,
    mode TEXT NOT NULL,
    quota INTEGER,
    used INTEGER NOT NULL DEFAULT 0,
    created INTEGER NOT NULL,
    last_used INTEGER
);
CREATE TABLE IF NOT EXISTS tokens (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL UNIQUE,
    read_only INTEGER NOT NULL,
    created INTEGER NOT NULL,
    last_used INTEGER
);
CREATE TABLE IF NOT EXISTS audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at INTEGER NOT NULL,
    token TEXT NOT NULL,
    method TEXT NOT NULL,
    path TEXT NOT NULL,
    action TEXT NOT NULL,
    status INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS checks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    repository TEXT NOT NULL,
    at INTEGER NOT NULL,
    ok INTEGER NOT NULL,
    how TEXT NOT NULL,
    problems INTEGER,
    by TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS checks_by_repository ON checks (repository, id);
CREATE TABLE IF NOT EXISTS repo_sizes (
    repository TEXT NOT NULL,
    at INTEGER NOT NULL,
    size_bytes INTEGER NOT NULL,
    logical_bytes INTEGER NOT NULL,
    snapshots INTEGER NOT NULL,
    PRIMARY KEY (repository, at)
);
CREATE TABLE IF NOT EXISTS users (
    name TEXT PRIMARY KEY,
    hash TEXT NOT NULL,
    read_only INTEGER NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    hash TEXT PRIMARY KEY,
    principal TEXT NOT NULL,
    read_only INTEGER NOT NULL,
    csrf TEXT NOT NULL,
    created INTEGER NOT NULL,
    expires INTEGER NOT NULL
);
";

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_millis(v).unwrap_or_default()
}

fn opt_ms(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.map(from_ms)
}

fn user_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<UserRow> {
    Ok(UserRow {
        name: r.get(0)?,
        hash: r.get(1)?,
        read_only: r.get(2)?,
        created: from_ms(r.get(3)?),
    })
}

/// Brings a state database made by an older `repo` up to this one's tables: columns
/// added since are added with their defaults.
fn migrate(c: &Connection) -> rusqlite::Result<()> {
    let has_action = c
        .prepare("SELECT 1 FROM pragma_table_info('schedules') WHERE name = 'action'")?
        .exists([])?;
    if !has_action {
        c.execute_batch("ALTER TABLE schedules ADD COLUMN action TEXT NOT NULL DEFAULT 'run'")?;
    }
    Ok(())
}

impl State {
    /// Opens (creating) `serve.sqlite` in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        let path = dir.join("serve.sqlite");
        let err = |source| StateError::Db {
            path: path.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| StateError::Corrupt(format!("{}: {e}", dir.display())))?;
        let conn = Connection::open(&path).map_err(err)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(err)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(err)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(err)?;
        conn.execute_batch(SCHEMA).map_err(err)?;
        migrate(&conn).map_err(err)?;
        Ok(Self {
            conn: Mutex::new(conn),
            path,
        })
    }

    #[must_use]
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let conn = self
            .conn
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&conn).map_err(|source| StateError::Db {
            path: self.path.display().to_string(),
            source,
        })
    }

    // --- jobs -------------------------------------------------------------------------

    pub fn put_job(&self, job: &JobDefinition, origin: Origin, now: DateTime<Utc>) -> Result<()> {
        let text = serde_json::to_string(job).map_err(|e| StateError::Corrupt(e.to_string()))?;
        self.with(|c| {
            c.execute(
                "INSERT INTO jobs (name, definition, origin, updated) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (name) DO UPDATE SET definition = ?2, origin = ?3, updated = ?4",
                params![job.name, text, origin.as_str(), ms(now)],
            )
            .map(|_| ())
        })
    }

    fn job_of(row: &rusqlite::Row<'_>) -> rusqlite::Result<(String, String, i64)> {
        Ok((row.get(0)?, row.get(1)?, row.get(2)?))
    }

    fn decode_job((def, origin, updated): (String, String, i64)) -> Result<StoredJob> {
        let definition: JobDefinition = serde_json::from_str(&def)
            .map_err(|e| StateError::Corrupt(format!("a stored job does not read: {e}")))?;
        Ok(StoredJob {
            definition,
            origin: Origin::parse(&origin),
            updated: from_ms(updated),
        })
    }

    pub fn job(&self, name: &str) -> Result<Option<StoredJob>> {
        let raw = self.with(|c| {
            c.query_row(
                "SELECT definition, origin, updated FROM jobs WHERE name = ?1",
                [name],
                Self::job_of,
            )
            .optional()
        })?;
        raw.map(Self::decode_job).transpose()
    }

    pub fn jobs(&self) -> Result<Vec<StoredJob>> {
        let raw = self.with(|c| {
            let mut st = c.prepare("SELECT definition, origin, updated FROM jobs ORDER BY name")?;
            let rows = st.query_map([], Self::job_of)?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        raw.into_iter().map(Self::decode_job).collect()
    }

    /// Removes a job and its schedules; whether it existed.
    pub fn remove_job(&self, name: &str) -> Result<bool> {
        self.with(|c| {
            c.execute("DELETE FROM schedules WHERE job = ?1", [name])?;
            Ok(c.execute("DELETE FROM jobs WHERE name = ?1", [name])? > 0)
        })
    }

    /// Removes the configuration's jobs and schedules that are no longer in it.
    pub fn forget_config_items(&self, jobs: &[String], schedules: &[ScheduleId]) -> Result<()> {
        self.with(|c| {
            let mut st = c.prepare("SELECT name FROM jobs WHERE origin = 'config'")?;
            let names: Vec<String> = st
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for n in names.iter().filter(|n| !jobs.contains(n)) {
                c.execute("DELETE FROM jobs WHERE name = ?1", [n])?;
            }
            let mut st = c.prepare("SELECT id FROM schedules WHERE origin = 'config'")?;
            let ids: Vec<i64> = st
                .query_map([], |r| r.get(0))?
                .collect::<rusqlite::Result<_>>()?;
            for id in ids
                .iter()
                .filter(|id| !schedules.contains(&ScheduleId(**id)))
            {
                c.execute("DELETE FROM schedules WHERE id = ?1", [id])?;
            }
            Ok(())
        })
    }

    // --- schedules --------------------------------------------------------------------

    /// Adds a schedule, or (for the configuration's) finds the same one already there.
    pub fn add_schedule(&self, s: &ScheduleRow) -> Result<ScheduleId> {
        self.with(|c| {
            if s.origin == Origin::Config {
                let existing: Option<i64> = c
                    .query_row(
                        "SELECT id FROM schedules WHERE origin = 'config' AND job = ?1 AND spec = ?2
                         AND IFNULL(timezone, '') = IFNULL(?3, '') AND jitter_secs = ?4 AND missed = ?5
                         AND action = ?6",
                        params![s.job, s.when, s.timezone, s.jitter_secs, s.missed, s.action.as_str()],
                        |r| r.get(0),
                    )
                    .optional()?;
                if let Some(id) = existing {
                    return Ok(ScheduleId(id));
                }
            }
            c.execute(
                "INSERT INTO schedules (job, spec, timezone, jitter_secs, missed, enabled, origin, last_slot, action)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
                params![
                    s.job,
                    s.when,
                    s.timezone,
                    s.jitter_secs,
                    s.missed,
                    s.enabled,
                    s.origin.as_str(),
                    s.last_slot.map(ms),
                    s.action.as_str()
                ],
            )?;
            Ok(ScheduleId(c.last_insert_rowid()))
        })
    }

    pub fn schedules(&self) -> Result<Vec<ScheduleRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, job, spec, timezone, jitter_secs, missed, enabled, origin, last_slot, action
                 FROM schedules ORDER BY id",
            )?;
            let rows = st.query_map([], |r| {
                Ok(ScheduleRow {
                    id: ScheduleId(r.get(0)?),
                    job: r.get(1)?,
                    when: r.get(2)?,
                    timezone: r.get(3)?,
                    jitter_secs: r.get(4)?,
                    missed: r.get(5)?,
                    enabled: r.get(6)?,
                    origin: Origin::parse(&r.get::<_, String>(7)?),
                    last_slot: opt_ms(r.get(8)?),
                    action: ScheduleAction::parse(&r.get::<_, String>(9)?).unwrap_or_default(),
                })
            })?;
            rows.collect()
        })
    }

    pub fn schedule(&self, id: ScheduleId) -> Result<Option<ScheduleRow>> {
        Ok(self.schedules()?.into_iter().find(|s| s.id == id))
    }

    pub fn remove_schedule(&self, id: ScheduleId) -> Result<bool> {
        self.with(|c| Ok(c.execute("DELETE FROM schedules WHERE id = ?1", [id.0])? > 0))
    }

    pub fn set_schedule_enabled(&self, id: ScheduleId, enabled: bool) -> Result<bool> {
        self.with(|c| {
            Ok(c.execute(
                "UPDATE schedules SET enabled = ?2 WHERE id = ?1",
                params![id.0, enabled],
            )? > 0)
        })
    }

    pub fn set_last_slot(&self, id: ScheduleId, slot: DateTime<Utc>) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE schedules SET last_slot = ?2 WHERE id = ?1",
                params![id.0, ms(slot)],
            )
            .map(|_| ())
        })
    }

    pub fn record_missed(&self, m: &Missed) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO missed (schedule, job, slot, reason, recorded) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![m.schedule.0, m.job, ms(m.slot), m.reason, ms(m.recorded)],
            )
            .map(|_| ())
        })
    }

    pub fn missed(&self, limit: usize) -> Result<Vec<Missed>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT schedule, job, slot, reason, recorded FROM missed ORDER BY recorded DESC, rowid DESC LIMIT ?1",
            )?;
            let rows = st.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                Ok(Missed {
                    schedule: ScheduleId(r.get(0)?),
                    job: r.get(1)?,
                    slot: from_ms(r.get(2)?),
                    reason: r.get(3)?,
                    recorded: from_ms(r.get(4)?),
                })
            })?;
            rows.collect()
        })
    }

    pub fn missed_count(&self) -> Result<u64> {
        self.with(|c| c.query_row("SELECT COUNT(*) FROM missed", [], |r| r.get::<_, i64>(0)))
            .map(|n| u64::try_from(n).unwrap_or(0))
    }

    // --- runs -------------------------------------------------------------------------

    pub fn create_run(&self, job: &str, trigger: RunTrigger, now: DateTime<Utc>) -> Result<RunId> {
        self.with(|c| {
            c.execute(
                "INSERT INTO runs (job, trigger, status, queued_at) VALUES (?1, ?2, 'queued', ?3)",
                params![job, trigger.as_str(), ms(now)],
            )?;
            Ok(RunId(c.last_insert_rowid()))
        })
    }

    pub fn start_run(&self, id: RunId, pid: u32, now: DateTime<Utc>) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE runs SET status = 'running', started_at = ?2, pid = ?3 WHERE id = ?1",
                params![id.0, ms(now), pid],
            )
            .map(|_| ())
        })
    }

    pub fn finish_run(
        &self,
        id: RunId,
        status: RunStatus,
        error: Option<&str>,
        stats: &RunStats,
        now: DateTime<Utc>,
    ) -> Result<()> {
        let stats = serde_json::to_string(stats).map_err(|e| StateError::Corrupt(e.to_string()))?;
        self.with(|c| {
            c.execute(
                "UPDATE runs SET status = ?2, error = ?3, stats = ?4, ended_at = ?5 WHERE id = ?1",
                params![id.0, status.as_str(), error, stats, ms(now)],
            )
            .map(|_| ())
        })
    }

    fn run_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<Run> {
        let stats: String = r.get(8)?;
        Ok(Run {
            id: RunId(r.get(0)?),
            job: r.get(1)?,
            trigger: RunTrigger::parse(&r.get::<_, String>(2)?),
            status: RunStatus::parse(&r.get::<_, String>(3)?).unwrap_or(RunStatus::Failed),
            queued_at: from_ms(r.get(4)?),
            started_at: opt_ms(r.get(5)?),
            ended_at: opt_ms(r.get(6)?),
            error: r.get(7)?,
            stats: serde_json::from_str(&stats).unwrap_or_default(),
            pid: r.get(9)?,
        })
    }

    const RUN_COLUMNS: &'static str =
        "id, job, trigger, status, queued_at, started_at, ended_at, error, stats, pid";

    pub fn run(&self, id: RunId) -> Result<Option<Run>> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {} FROM runs WHERE id = ?1", Self::RUN_COLUMNS),
                [id.0],
                Self::run_of,
            )
            .optional()
        })
    }

    /// Runs, newest first.
    pub fn runs(&self, q: &RunQuery) -> Result<Vec<Run>> {
        let limit = if q.limit == 0 {
            100
        } else {
            q.limit.min(10_000)
        };
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {} FROM runs
                 WHERE (?1 IS NULL OR job = ?1) AND (?2 IS NULL OR status = ?2) AND (?3 IS NULL OR id < ?3)
                 ORDER BY id DESC LIMIT ?4",
                Self::RUN_COLUMNS
            ))?;
            let rows = st.query_map(
                params![
                    q.job,
                    q.status.map(RunStatus::as_str),
                    q.before.map(|b| b.0),
                    i64::try_from(limit).unwrap_or(100)
                ],
                Self::run_of,
            )?;
            rows.collect()
        })
    }

    /// The last run of `job` that ended with `status`.
    pub fn last_run_with(&self, job: &str, status: RunStatus) -> Result<Option<Run>> {
        Ok(self
            .runs(&RunQuery {
                job: Some(job.to_owned()),
                status: Some(status),
                limit: 1,
                before: None,
            })?
            .into_iter()
            .next())
    }

    /// The newest run of every job that has one, by job, in one query.
    pub fn last_runs(&self) -> Result<std::collections::HashMap<String, Run>> {
        self.with(|c| {
            let mut st = c.prepare(&format!(
                "SELECT {} FROM runs WHERE id IN (SELECT MAX(id) FROM runs GROUP BY job)",
                Self::RUN_COLUMNS
            ))?;
            let rows = st.query_map([], Self::run_of)?;
            rows.map(|r| r.map(|run| (run.job.clone(), run))).collect()
        })
    }

    /// The newest run of `job`.
    pub fn last_run(&self, job: &str) -> Result<Option<Run>> {
        Ok(self
            .runs(&RunQuery {
                job: Some(job.to_owned()),
                limit: 1,
                ..RunQuery::default()
            })?
            .into_iter()
            .next())
    }

    /// Counts of runs by status.
    pub fn run_counts(&self) -> Result<Vec<(RunStatus, u64)>> {
        self.with(|c| {
            let mut st = c.prepare("SELECT status, COUNT(*) FROM runs GROUP BY status")?;
            let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            let v: Vec<(String, i64)> = rows.collect::<rusqlite::Result<_>>()?;
            Ok(v.into_iter()
                .filter_map(|(s, n)| Some((RunStatus::parse(&s)?, u64::try_from(n).unwrap_or(0))))
                .collect())
        })
    }

    /// How many of a job's recorded runs succeeded, and how many finished.
    pub fn job_outcomes(&self, job: &str) -> Result<(u64, u64)> {
        self.with(|c| {
            c.query_row(
                "SELECT COUNT(*) FILTER (WHERE status = 'succeeded'),
                        COUNT(*) FILTER (WHERE status IN ('succeeded', 'failed', 'cancelled'))
                 FROM runs WHERE job = ?1",
                [job],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
        })
        .map(|(a, b)| (u64::try_from(a).unwrap_or(0), u64::try_from(b).unwrap_or(0)))
    }

    /// Marks runs left queued or running by a daemon that died as failed; returns them.
    /// `alive` says whether a pid is still running (a `repo job run` of its own).
    pub fn fail_interrupted(
        &self,
        now: DateTime<Utc>,
        alive: &dyn Fn(u32) -> bool,
    ) -> Result<Vec<RunId>> {
        let open = self.with(|c| {
            let mut st = c.prepare(
                "SELECT id, pid, status FROM runs WHERE status IN ('queued', 'running') ORDER BY id",
            )?;
            let rows = st.query_map([], |r| {
                Ok((
                    r.get::<_, i64>(0)?,
                    r.get::<_, Option<u32>>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })?;
            rows.collect::<rusqlite::Result<Vec<_>>>()
        })?;
        let me = std::process::id();
        let mut failed = Vec::new();
        for (id, pid, status) in open {
            let still = match pid {
                Some(p) if p != me => alive(p),
                _ => false,
            };
            if still && status == "running" {
                continue;
            }
            let reason = if status == "running" {
                "interrupted: the process running it stopped (a crash, a kill, a reboot)"
            } else {
                "never started: the daemon stopped while it was queued"
            };
            self.with(|c| {
                c.execute(
                    "UPDATE runs SET status = 'failed', error = ?2, ended_at = ?3 WHERE id = ?1",
                    params![id, reason, ms(now)],
                )
            })?;
            failed.push(RunId(id));
        }
        Ok(failed)
    }

    /// Removes runs older than `keep_days` and all but the newest `keep_per_job` of each
    /// job (finished runs only), with their logs; returns how many.
    pub fn prune_history(
        &self,
        now: DateTime<Utc>,
        keep_days: u32,
        keep_per_job: u32,
    ) -> Result<usize> {
        let cutoff = ms(now - chrono::Duration::days(i64::from(keep_days)));
        self.with(|c| {
            let tx = c.unchecked_transaction()?;
            let mut n = tx.execute(
                "DELETE FROM runs WHERE status IN ('succeeded', 'failed', 'cancelled') AND queued_at < ?1",
                [cutoff],
            )?;
            n += tx.execute(
                "DELETE FROM runs WHERE status IN ('succeeded', 'failed', 'cancelled') AND id IN (
                   SELECT id FROM (SELECT id, ROW_NUMBER() OVER (PARTITION BY job ORDER BY id DESC) AS k FROM runs
                                 WHERE status IN ('succeeded', 'failed', 'cancelled'))
                   WHERE k > ?1)",
                [i64::from(keep_per_job)],
            )?;
            tx.execute("DELETE FROM run_log WHERE run NOT IN (SELECT id FROM runs)", [])?;
            tx.execute("DELETE FROM missed WHERE recorded < ?1", [cutoff])?;
            tx.commit()?;
            Ok(n)
        })
    }

    pub fn append_log(
        &self,
        run: RunId,
        at: DateTime<Utc>,
        level: &str,
        message: &str,
    ) -> Result<i64> {
        self.with(|c| {
            let seq: i64 = c.query_row(
                "SELECT IFNULL(MAX(seq), 0) + 1 FROM run_log WHERE run = ?1",
                [run.0],
                |r| r.get(0),
            )?;
            c.execute(
                "INSERT INTO run_log (run, seq, at, level, message) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![run.0, seq, ms(at), level, message],
            )?;
            Ok(seq)
        })
    }

    pub fn log(&self, run: RunId, after: i64) -> Result<Vec<LogLine>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT seq, at, level, message FROM run_log WHERE run = ?1 AND seq > ?2 ORDER BY seq",
            )?;
            let rows = st.query_map(params![run.0, after], |r| {
                Ok(LogLine {
                    seq: r.get(0)?,
                    at: from_ms(r.get(1)?),
                    level: r.get(2)?,
                    message: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    // --- tokens and audit -------------------------------------------------------------

    pub fn add_token(
        &self,
        name: &str,
        hash: &str,
        read_only: bool,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO tokens (name, hash, read_only, created) VALUES (?1, ?2, ?3, ?4)",
                params![name, hash, read_only, ms(now)],
            )?;
            Ok(n > 0)
        })
    }

    /// The token with this hash, marking it used.
    pub fn use_token(&self, hash: &str, now: DateTime<Utc>) -> Result<Option<TokenRow>> {
        self.with(|c| {
            let row = c
                .query_row(
                    "SELECT name, read_only, created, last_used FROM tokens WHERE hash = ?1",
                    [hash],
                    |r| {
                        Ok(TokenRow {
                            name: r.get(0)?,
                            read_only: r.get(1)?,
                            created: from_ms(r.get(2)?),
                            last_used: opt_ms(r.get(3)?),
                        })
                    },
                )
                .optional()?;
            if row.is_some() {
                c.execute(
                    "UPDATE tokens SET last_used = ?2 WHERE hash = ?1",
                    params![hash, ms(now)],
                )?;
            }
            Ok(row)
        })
    }

    #[allow(clippy::too_many_arguments)]
    pub fn add_storage_token(
        &self,
        name: &str,
        hash: &str,
        repository: &str,
        mode: StorageMode,
        quota: Option<u64>,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        self.with(|c| {
            let taken: bool = c
                .prepare("SELECT 1 FROM tokens WHERE name = ?1")?
                .exists([name])?;
            if taken {
                return Ok(false);
            }
            let n = c.execute(
                "INSERT OR IGNORE INTO storage_tokens (name, hash, repository, mode, quota, created) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![name, hash, repository, mode.as_str(), quota.map(|q| q as i64), ms(now)],
            )?;
            Ok(n > 0)
        })
    }

    fn storage_token_of(r: &rusqlite::Row<'_>) -> rusqlite::Result<StorageTokenRow> {
        let mode: String = r.get(2)?;
        Ok(StorageTokenRow {
            name: r.get(0)?,
            repository: r.get(1)?,
            mode: StorageMode::parse(&mode).unwrap_or(StorageMode::Read),
            quota: r.get::<_, Option<i64>>(3)?.map(|q| q as u64),
            used: r.get::<_, i64>(4)? as u64,
            created: from_ms(r.get(5)?),
            last_used: opt_ms(r.get(6)?),
        })
    }

    /// The storage token with this hash, marking it used.
    pub fn use_storage_token(
        &self,
        hash: &str,
        now: DateTime<Utc>,
    ) -> Result<Option<StorageTokenRow>> {
        self.with(|c| {
            let row = c
                .query_row(
                    "SELECT name, repository, mode, quota, used, created, last_used \
                     FROM storage_tokens WHERE hash = ?1",
                    [hash],
                    Self::storage_token_of,
                )
                .optional()?;
            if row.is_some() {
                c.execute(
                    "UPDATE storage_tokens SET last_used = ?2 WHERE hash = ?1",
                    params![hash, ms(now)],
                )?;
            }
            Ok(row)
        })
    }

    /// Counts `bytes` more against a storage token's quota; false (and nothing counted)
    /// when they would pass it.
    pub fn charge_storage(&self, name: &str, bytes: u64) -> Result<bool> {
        self.with(|c| {
            let n = c.execute(
                "UPDATE storage_tokens SET used = used + ?2 \
                 WHERE name = ?1 AND (quota IS NULL OR used + ?2 <= quota)",
                params![name, bytes as i64],
            )?;
            Ok(n > 0)
        })
    }

    /// Gives back what [`Self::charge_storage`] counted for a write that failed.
    pub fn refund_storage(&self, name: &str, bytes: u64) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE storage_tokens SET used = MAX(0, used - ?2) WHERE name = ?1",
                params![name, bytes as i64],
            )?;
            Ok(())
        })
    }

    pub fn storage_tokens(&self) -> Result<Vec<StorageTokenRow>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT name, repository, mode, quota, used, created, last_used \
                 FROM storage_tokens ORDER BY name",
            )?;
            let rows = st.query_map([], Self::storage_token_of)?;
            rows.collect()
        })
    }

    pub fn tokens(&self) -> Result<Vec<TokenRow>> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT name, read_only, created, last_used FROM tokens ORDER BY name")?;
            let rows = st.query_map([], |r| {
                Ok(TokenRow {
                    name: r.get(0)?,
                    read_only: r.get(1)?,
                    created: from_ms(r.get(2)?),
                    last_used: opt_ms(r.get(3)?),
                })
            })?;
            rows.collect()
        })
    }

    pub fn remove_token(&self, name: &str) -> Result<bool> {
        // The dashboard sessions the token opened end with it.
        self.with(|c| {
            c.execute("DELETE FROM sessions WHERE principal = ?1", [name])?;
            let storage = c.execute("DELETE FROM storage_tokens WHERE name = ?1", [name])?;
            Ok(c.execute("DELETE FROM tokens WHERE name = ?1", [name])? + storage > 0)
        })
    }

    // --- dashboard users and sessions --------------------------------------------------

    pub fn add_user(
        &self,
        name: &str,
        hash: &str,
        read_only: bool,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        self.with(|c| {
            let n = c.execute(
                "INSERT OR IGNORE INTO users (name, hash, read_only, created) VALUES (?1, ?2, ?3, ?4)",
                params![name, hash, read_only, ms(now)],
            )?;
            Ok(n > 0)
        })
    }

    pub fn user(&self, name: &str) -> Result<Option<UserRow>> {
        self.with(|c| {
            c.query_row(
                "SELECT name, hash, read_only, created FROM users WHERE name = ?1",
                [name],
                user_row,
            )
            .optional()
        })
    }

    pub fn users(&self) -> Result<Vec<UserRow>> {
        self.with(|c| {
            let mut st =
                c.prepare("SELECT name, hash, read_only, created FROM users ORDER BY name")?;
            let rows = st.query_map([], user_row)?;
            rows.collect()
        })
    }

    pub fn remove_user(&self, name: &str) -> Result<bool> {
        self.with(|c| Ok(c.execute("DELETE FROM users WHERE name = ?1", [name])? > 0))
    }

    /// Records a session (and forgets the ones that have ended).
    pub fn add_session(&self, s: &SessionRow) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM sessions WHERE expires <= ?1", [ms(s.created)])?;
            c.execute(
                "INSERT INTO sessions (hash, principal, read_only, csrf, created, expires) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![s.hash, s.principal, s.read_only, s.csrf, ms(s.created), ms(s.expires)],
            )
            .map(|_| ())
        })
    }

    pub fn session(&self, hash: &str) -> Result<Option<SessionRow>> {
        self.with(|c| {
            c.query_row(
                "SELECT hash, principal, read_only, csrf, created, expires FROM sessions WHERE hash = ?1",
                [hash],
                |r| {
                    Ok(SessionRow {
                        hash: r.get(0)?,
                        principal: r.get(1)?,
                        read_only: r.get(2)?,
                        csrf: r.get(3)?,
                        created: from_ms(r.get(4)?),
                        expires: from_ms(r.get(5)?),
                    })
                },
            )
            .optional()
        })
    }

    pub fn end_session(&self, hash: &str) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM sessions WHERE hash = ?1", [hash])
                .map(|_| ())
        })
    }

    pub fn end_sessions_of(&self, principal: &str) -> Result<()> {
        self.with(|c| {
            c.execute("DELETE FROM sessions WHERE principal = ?1", [principal])
                .map(|_| ())
        })
    }

    pub fn audit(&self, e: &AuditEntry) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO audit (at, token, method, path, action, status) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![ms(e.at), e.token, e.method, e.path, e.action, e.status],
            )
            .map(|_| ())
        })
    }

    pub fn record_check(&self, c: &CheckRecord) -> Result<()> {
        self.with(|conn| {
            conn.execute(
                "INSERT INTO checks (repository, at, ok, how, problems, by) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    c.repository,
                    ms(c.at),
                    c.ok,
                    c.how,
                    c.problems.map(|n| i64::try_from(n).unwrap_or(i64::MAX)),
                    c.by
                ],
            )
            .map(|_| ())
        })
    }

    /// The last `limit` checks of `repository` (every repository's with `None`), newest
    /// first.
    pub fn checks(&self, repository: Option<&str>, limit: usize) -> Result<Vec<CheckRecord>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT repository, at, ok, how, problems, by FROM checks \
                 WHERE ?1 IS NULL OR repository = ?1 ORDER BY id DESC LIMIT ?2",
            )?;
            let rows = st.query_map(
                params![repository, i64::try_from(limit).unwrap_or(i64::MAX)],
                |r| {
                    Ok(CheckRecord {
                        repository: r.get(0)?,
                        at: from_ms(r.get(1)?),
                        ok: r.get(2)?,
                        how: r.get(3)?,
                        problems: r
                            .get::<_, Option<i64>>(4)?
                            .map(|n| u64::try_from(n).unwrap_or(0)),
                        by: r.get(5)?,
                    })
                },
            )?;
            rows.collect()
        })
    }

    /// Records `repository`'s size (after a run); samples older than
    /// [`SIZE_SAMPLES_KEPT_DAYS`] go.
    pub fn record_size(&self, repository: &str, s: &SizeSample) -> Result<()> {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        let oldest = s.at - chrono::Duration::days(SIZE_SAMPLES_KEPT_DAYS);
        self.with(|c| {
            c.execute(
                "INSERT OR REPLACE INTO repo_sizes (repository, at, size_bytes, logical_bytes, snapshots) \
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![
                    repository,
                    ms(s.at),
                    n(s.size_bytes),
                    n(s.logical_bytes),
                    n(s.snapshots)
                ],
            )?;
            c.execute(
                "DELETE FROM repo_sizes WHERE repository = ?1 AND at < ?2",
                params![repository, ms(oldest)],
            )
            .map(|_| ())
        })
    }

    /// `repository`'s size samples since `since`, oldest first.
    pub fn sizes(&self, repository: &str, since: DateTime<Utc>) -> Result<Vec<SizeSample>> {
        let u = |v: i64| u64::try_from(v).unwrap_or(0);
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT at, size_bytes, logical_bytes, snapshots FROM repo_sizes \
                 WHERE repository = ?1 AND at >= ?2 ORDER BY at",
            )?;
            let rows = st.query_map(params![repository, ms(since)], |r| {
                Ok(SizeSample {
                    at: from_ms(r.get(0)?),
                    size_bytes: u(r.get(1)?),
                    logical_bytes: u(r.get(2)?),
                    snapshots: u(r.get(3)?),
                })
            })?;
            rows.collect()
        })
    }

    pub fn audit_log(&self, limit: usize) -> Result<Vec<AuditEntry>> {
        self.with(|c| {
            let mut st = c.prepare(
                "SELECT at, token, method, path, action, status FROM audit ORDER BY id DESC LIMIT ?1",
            )?;
            let rows = st.query_map([i64::try_from(limit).unwrap_or(i64::MAX)], |r| {
                Ok(AuditEntry {
                    at: from_ms(r.get(0)?),
                    token: r.get(1)?,
                    method: r.get(2)?,
                    path: r.get(3)?,
                    action: r.get(4)?,
                    status: r.get(5)?,
                })
            })?;
            rows.collect()
        })
    }

    /// A small persistent value (the last digest sent, say).
    pub fn meta(&self, key: &str) -> Result<Option<String>> {
        self.with(|c| {
            c.query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
                .optional()
        })
    }

    pub fn set_meta(&self, key: &str, value: &str) -> Result<()> {
        self.with(|c| {
            c.execute(
                "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT (key) DO UPDATE SET value = ?2",
                params![key, value],
            )
            .map(|_| ())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> DateTime<Utc> {
        DateTime::parse_from_rfc3339("2026-12-01T10:00:00Z")
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn checks_are_listed_newest_first_and_size_samples_kept_for_400_days() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::open(dir.path()).unwrap();
        for (i, ok) in [true, false, true].into_iter().enumerate() {
            s.record_check(&CheckRecord {
                repository: if i == 1 { "b".into() } else { "a".into() },
                at: now() + chrono::Duration::minutes(i64::try_from(i).unwrap()),
                ok,
                how: "metadata".into(),
                problems: Some(u64::from(!ok)),
                by: "admin".into(),
            })
            .unwrap();
        }
        let a = s.checks(Some("a"), 10).unwrap();
        assert_eq!(a.len(), 2);
        assert!(a[0].at > a[1].at);
        assert_eq!(s.checks(None, 10).unwrap().len(), 3);
        assert_eq!(s.checks(Some("b"), 10).unwrap()[0].problems, Some(1));
        assert!(s.checks(Some("c"), 10).unwrap().is_empty());
        // Every sample stays, up to 400 days: a later one removes those older.
        for m in [0, 5, 11, 30, 33] {
            let sample = SizeSample {
                at: now() + chrono::Duration::minutes(m),
                size_bytes: u64::try_from(m).unwrap() * 1000,
                logical_bytes: 0,
                snapshots: 1,
            };
            s.record_size("a", &sample).unwrap();
        }
        let sizes: Vec<u64> = s
            .sizes("a", now())
            .unwrap()
            .iter()
            .map(|x| x.size_bytes)
            .collect();
        assert_eq!(sizes, [0, 5000, 11000, 30000, 33000]);
        assert!(s.sizes("b", now()).unwrap().is_empty());
        let late = SizeSample {
            at: now()
                + chrono::Duration::days(SIZE_SAMPLES_KEPT_DAYS)
                + chrono::Duration::minutes(20),
            size_bytes: 1,
            logical_bytes: 0,
            snapshots: 1,
        };
        s.record_size("a", &late).unwrap();
        let left: Vec<u64> = s
            .sizes("a", now())
            .unwrap()
            .iter()
            .map(|x| x.size_bytes)
            .collect();
        assert_eq!(left, [30000, 33000, 1]);
    }

    #[test]
    fn runs_interrupted_by_a_dead_daemon_are_failed_never_left_running() {
        let d = tempfile::tempdir().unwrap();
        let s = State::open(d.path()).unwrap();
        let a = s.create_run("a", RunTrigger::Schedule, now()).unwrap();
        s.start_run(a, 999_999, now()).unwrap();
        let b = s.create_run("b", RunTrigger::Api, now()).unwrap();
        let c = s.create_run("c", RunTrigger::Cli, now()).unwrap();
        s.start_run(c, 4242, now()).unwrap();
        let failed = s.fail_interrupted(now(), &|pid| pid == 4242).unwrap();
        assert_eq!(failed, vec![a, b]);
        let ra = s.run(a).unwrap().unwrap();
        assert_eq!(ra.status, RunStatus::Failed);
        assert!(ra.error.unwrap().contains("interrupted"));
        assert_eq!(s.run(c).unwrap().unwrap().status, RunStatus::Running);
    }

    #[test]
    fn history_keeps_the_newest_runs_of_each_job() {
        let d = tempfile::tempdir().unwrap();
        let s = State::open(d.path()).unwrap();
        let old = now() - chrono::Duration::days(100);
        for i in 0..10 {
            let t = if i < 2 { old } else { now() };
            let id = s.create_run("a", RunTrigger::Schedule, t).unwrap();
            s.append_log(id, t, "info", "x").unwrap();
            s.finish_run(id, RunStatus::Succeeded, None, &RunStats::default(), t)
                .unwrap();
        }
        let running = s.create_run("a", RunTrigger::Schedule, old).unwrap();
        let removed = s.prune_history(now(), 90, 5).unwrap();
        assert_eq!(removed, 5);
        let left = s
            .runs(&RunQuery {
                job: Some("a".into()),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(left.len(), 6, "five finished and the unfinished one");
        assert!(left.iter().any(|r| r.id == running));
    }

    #[test]
    fn configuration_schedules_are_found_again_not_duplicated() {
        let d = tempfile::tempdir().unwrap();
        let s = State::open(d.path()).unwrap();
        let row = ScheduleRow {
            id: ScheduleId(0),
            job: "a".into(),
            when: "daily 02:00".into(),
            timezone: None,
            jitter_secs: 0,
            missed: "run-once".into(),
            enabled: true,
            origin: Origin::Config,
            last_slot: None,
            action: ScheduleAction::Run,
        };
        let first = s.add_schedule(&row).unwrap();
        s.set_last_slot(first, now()).unwrap();
        assert_eq!(s.add_schedule(&row).unwrap(), first);
        assert_eq!(s.schedules().unwrap()[0].last_slot, Some(now()));
        // The same slots verifying is another schedule.
        let verify = ScheduleRow {
            action: ScheduleAction::Verify,
            ..row.clone()
        };
        let second = s.add_schedule(&verify).unwrap();
        assert_ne!(second, first);
        assert_eq!(
            s.schedule(second).unwrap().unwrap().action,
            ScheduleAction::Verify
        );
        s.forget_config_items(&[], &[]).unwrap();
        assert!(s.schedules().unwrap().is_empty());
    }

    #[test]
    fn a_state_database_without_schedule_actions_gains_them_as_runs() {
        let d = tempfile::tempdir().unwrap();
        {
            let c = Connection::open(d.path().join("serve.sqlite")).unwrap();
            c.execute_batch(
                "CREATE TABLE schedules (id INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT NOT NULL,
                 spec TEXT NOT NULL, timezone TEXT, jitter_secs INTEGER NOT NULL DEFAULT 0,
                 missed TEXT NOT NULL DEFAULT 'run-once', enabled INTEGER NOT NULL DEFAULT 1,
                 origin TEXT NOT NULL, last_slot INTEGER);
                 INSERT INTO schedules (job, spec, origin) VALUES ('old', 'daily 02:00', 'api');",
            )
            .unwrap();
        }
        let s = State::open(d.path()).unwrap();
        let rows = s.schedules().unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].job.as_str(), rows[0].action),
            ("old", ScheduleAction::Run)
        );
        drop(s);
        // Opening it again changes nothing.
        assert_eq!(State::open(d.path()).unwrap().schedules().unwrap().len(), 1);
    }
}
