//! The host's record of verifications: `verifications.sqlite` in the state directory,
//! one row per verification (its indexed facts, and the whole record as JSON), written by
//! `repo verify` and `repo serve` alike.
//!
//! A row says `running` while its process lives; read back after that process died
//! (killed, a reboot), it says `failed`, with the step it stopped in.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;

use cairn_agent::process::pid_alive;

use super::{Kind, Status, Verification, VerificationId, VerifyError};

pub struct Results {
    conn: Connection,
    path: PathBuf,
}

fn db_err(path: &Path) -> impl Fn(rusqlite::Error) -> VerifyError + '_ {
    move |e| VerifyError::Results(format!("{}: {e}", path.display()))
}

/// Which verifications to list.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub kind: Option<Kind>,
    pub status: Option<Status>,
    /// A snapshot id or its prefix.
    pub snapshot: Option<String>,
    /// Newest first, at most this many (0: all).
    pub limit: usize,
}

impl Results {
    /// Opens (creating) the results in the state directory `dir`.
    pub fn open(dir: &Path) -> Result<Self, VerifyError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| VerifyError::Results(format!("{}: {e}", dir.display())))?;
        let path = dir.join("verifications.sqlite");
        let err = db_err(&path);
        let conn = Connection::open(&path).map_err(&err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(&err)?;
        conn.execute_batch(
            "PRAGMA journal_mode = WAL;
             CREATE TABLE IF NOT EXISTS verifications (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                kind TEXT NOT NULL,
                status TEXT NOT NULL,
                snapshot TEXT NOT NULL,
                source TEXT NOT NULL,
                created TEXT NOT NULL,
                json TEXT NOT NULL
             );
             CREATE INDEX IF NOT EXISTS verifications_snapshot ON verifications (snapshot);",
        )
        .map_err(&err)?;
        drop(err);
        Ok(Self { conn, path })
    }

    fn err(&self) -> impl Fn(rusqlite::Error) -> VerifyError + '_ {
        db_err(&self.path)
    }

    /// Records a new verification; returns its id.
    pub fn insert(&self, v: &Verification) -> Result<VerificationId, VerifyError> {
        self.conn
            .execute(
                "INSERT INTO verifications (kind, status, snapshot, source, created, json)
                 VALUES (?1, ?2, ?3, ?4, ?5, '{}')",
                params![
                    v.kind.as_str(),
                    v.status.as_str(),
                    v.snapshot,
                    v.source,
                    v.created
                ],
            )
            .map_err(self.err())?;
        let id = VerificationId(self.conn.last_insert_rowid());
        let mut with_id = v.clone();
        with_id.id = id;
        self.update(&with_id)?;
        Ok(id)
    }

    /// Rewrites a verification's record.
    pub fn update(&self, v: &Verification) -> Result<(), VerifyError> {
        let json = serde_json::to_string(v).map_err(|e| VerifyError::Results(e.to_string()))?;
        self.conn
            .execute(
                "UPDATE verifications SET status = ?2, json = ?3 WHERE id = ?1",
                params![v.id.0, v.status.as_str(), json],
            )
            .map_err(self.err())?;
        Ok(())
    }

    pub fn get(&self, id: VerificationId) -> Result<Option<Verification>, VerifyError> {
        let json: Option<String> = self
            .conn
            .query_row(
                "SELECT json FROM verifications WHERE id = ?1",
                params![id.0],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.err())?;
        json.map(|j| self.parse(&j)).transpose()
    }

    /// Verifications, newest first.
    pub fn list(&self, f: &Filter) -> Result<Vec<Verification>, VerifyError> {
        let mut sql = String::from("SELECT json FROM verifications WHERE 1 = 1");
        let mut args: Vec<String> = Vec::new();
        if let Some(k) = f.kind {
            args.push(k.as_str().into());
            sql.push_str(&format!(" AND kind = ?{}", args.len()));
        }
        if let Some(s) = f.snapshot.as_ref() {
            args.push(format!("{}%", s.replace(['%', '_'], "")));
            sql.push_str(&format!(" AND snapshot LIKE ?{}", args.len()));
        }
        sql.push_str(" ORDER BY id DESC");
        let mut stmt = self.conn.prepare(&sql).map_err(self.err())?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args.iter()), |r| {
                r.get::<_, String>(0)
            })
            .map_err(self.err())?;
        let mut out = Vec::new();
        for r in rows {
            let v = self.parse(&r.map_err(self.err())?)?;
            // The status filter applies after a dead runner's row reads as failed.
            if f.status.is_some_and(|s| s != v.status) {
                continue;
            }
            out.push(v);
            if f.limit > 0 && out.len() >= f.limit {
                break;
            }
        }
        Ok(out)
    }

    /// The newest verification of each snapshot (full id) that has one.
    pub fn last_by_snapshot(&self) -> Result<BTreeMap<String, Verification>, VerifyError> {
        let mut out = BTreeMap::new();
        for v in self.list(&Filter::default())?.into_iter().rev() {
            out.insert(v.snapshot.clone(), v);
        }
        Ok(out)
    }

    fn parse(&self, json: &str) -> Result<Verification, VerifyError> {
        let mut v: Verification = serde_json::from_str(json).map_err(|e| {
            VerifyError::Results(format!(
                "{}: an unreadable verification record: {e}",
                self.path.display()
            ))
        })?;
        if v.status == Status::Running && v.pid != std::process::id() && !pid_alive(v.pid) {
            let at = v.steps.last().map_or_else(
                || "before its first step".to_owned(),
                |s| format!("after {}", s.name),
            );
            v.status = Status::Failed;
            v.error.get_or_insert_with(|| {
                format!(
                    "the verifying process ({}) died {at}; `repo recover cleanup` removes what it left",
                    v.pid
                )
            });
        }
        Ok(v)
    }

    /// Totals over every verification recorded.
    pub fn stats(&self) -> Result<Stats, VerifyError> {
        Ok(Stats::of(&self.list(&Filter::default())?))
    }
}

/// Totals of a set of verifications.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Stats {
    pub total: u64,
    pub passed: u64,
    pub failed: u64,
    pub warning: u64,
    pub running: u64,
    pub pending: u64,
    /// Passed (with or without warnings) out of those that ended; `None` before any did.
    pub success_rate: Option<f64>,
    pub average_seconds: Option<f64>,
    /// By test (`boot`, `db`, `files`, ...).
    pub by_test: BTreeMap<String, TestStats>,
    /// The newest that ended.
    pub last: Option<LastVerification>,
    /// Per source (`host:source`): the newest that ended.
    pub by_source: BTreeMap<String, LastVerification>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct TestStats {
    pub total: u64,
    pub passed: u64,
    pub failed: u64,
    pub average_seconds: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LastVerification {
    pub id: VerificationId,
    pub snapshot: String,
    pub status: Status,
    pub finished: String,
}

fn average(sum: f64, n: u64) -> Option<f64> {
    #[allow(clippy::cast_precision_loss)]
    (n > 0).then(|| sum / n as f64)
}

impl Stats {
    /// Totals of `list` (newest first, as [`Results::list`] gives them).
    #[must_use]
    pub fn of(list: &[Verification]) -> Self {
        let mut s = Self::default();
        let (mut secs, mut ended) = (0.0, 0u64);
        let mut test_secs: BTreeMap<String, (f64, u64)> = BTreeMap::new();
        for v in list {
            s.total += 1;
            let t = s.by_test.entry(v.test.clone()).or_default();
            t.total += 1;
            match v.status {
                Status::Passed => s.passed += 1,
                Status::Failed => s.failed += 1,
                Status::Warning => s.warning += 1,
                Status::Running => s.running += 1,
                Status::Pending => s.pending += 1,
            }
            match v.status {
                Status::Passed | Status::Warning => t.passed += 1,
                Status::Failed => t.failed += 1,
                _ => {}
            }
            if !v.status.is_final() {
                continue;
            }
            if let Some(x) = v.seconds {
                secs += x;
                ended += 1;
                let e = test_secs.entry(v.test.clone()).or_default();
                e.0 += x;
                e.1 += 1;
            }
            let last = LastVerification {
                id: v.id,
                snapshot: v.snapshot.clone(),
                status: v.status,
                finished: v.finished.clone().unwrap_or_else(|| v.created.clone()),
            };
            if s.last.is_none() {
                s.last = Some(last.clone());
            }
            s.by_source.entry(v.source.clone()).or_insert(last);
        }
        let done = s.passed + s.warning + s.failed;
        #[allow(clippy::cast_precision_loss)]
        {
            s.success_rate = (done > 0).then(|| (s.passed + s.warning) as f64 / done as f64);
        }
        s.average_seconds = average(secs, ended);
        for (test, (sum, n)) in test_secs {
            if let Some(t) = s.by_test.get_mut(&test) {
                t.average_seconds = average(sum, n);
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::verify::{Recorder, SnapshotRef, StepResult};

    fn snap(id: &str) -> SnapshotRef {
        SnapshotRef {
            id: id.into(),
            source: "h:db".into(),
            repository: "/r".into(),
        }
    }

    #[test]
    fn steps_decide_the_status_and_stats_count_them() {
        let dir = tempfile::tempdir().unwrap();
        let results = Results::open(dir.path()).unwrap();
        let mut r = Recorder::begin(
            &results,
            Verification::new(Kind::Db, "db", &snap("aa11"), "manual"),
        )
        .unwrap();
        assert!(r.step("connect", |_| (StepResult::Passed, String::new())));
        assert!(!r.step("amcheck", |_| (StepResult::Failed, "index x".into())));
        let v = r.finish(true);
        assert_eq!(v.status, Status::Failed);
        assert_eq!(v.failed_step(), Some("amcheck"));
        let mut r = Recorder::begin(
            &results,
            Verification::new(Kind::Files, "files", &snap("bb22"), "manual"),
        )
        .unwrap();
        r.step("compare", |_| (StepResult::Warning, "no files".into()));
        r.finish(true);
        let got = results.get(v.id).unwrap().unwrap();
        assert_eq!(got.steps.len(), 2);
        assert_eq!(got.error.as_deref(), Some("amcheck: index x"));
        let s = results.stats().unwrap();
        assert_eq!((s.total, s.failed, s.warning), (2, 1, 1));
        assert_eq!(s.success_rate, Some(0.5));
        assert_eq!(s.by_test["db"].failed, 1);
        assert_eq!(s.last.unwrap().snapshot, "bb22");
        let only = results
            .list(&Filter {
                status: Some(Status::Failed),
                ..Filter::default()
            })
            .unwrap();
        assert_eq!(only.len(), 1);
    }

    #[test]
    fn a_running_row_whose_process_died_reads_as_failed() {
        let dir = tempfile::tempdir().unwrap();
        let results = Results::open(dir.path()).unwrap();
        let mut v = Verification::new(Kind::Vm, "boot", &snap("cc33"), "manual");
        // A pid that cannot be alive.
        v.pid = u32::MAX - 1;
        let id = results.insert(&v).unwrap();
        let got = results.get(id).unwrap().unwrap();
        assert_eq!(got.status, Status::Failed);
        assert!(got.error.unwrap().contains("died before its first step"));
    }
}

/// A repository's snapshot that has no recent passing verification.
#[derive(Debug, Clone, Serialize)]
pub struct Unverified {
    pub snapshot: String,
    /// `host:source`.
    pub source: String,
    /// When the snapshot was taken (RFC 3339).
    pub time: String,
    /// The last verification's end, when there was one.
    pub last_verified: Option<String>,
}

/// Which of a repository's snapshots verification has not covered.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Coverage {
    /// Never verified.
    pub never_verified: Vec<Unverified>,
    /// Last verified (and not failed) longer than `stale_days` ago.
    pub stale: Vec<Unverified>,
    pub stale_days: u64,
    /// Their last verification failed.
    pub last_failed: Vec<Unverified>,
}

impl Coverage {
    /// Sorts `snapshots` by their last verification in `last` (by snapshot id, as
    /// [`Results::last_by_snapshot`] gives it), as of `now`.
    #[must_use]
    pub fn of(
        snapshots: &[cairn_engine::snapshot::Snapshot],
        last: &BTreeMap<String, Verification>,
        stale_days: u64,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Self {
        let cutoff =
            now - chrono::Duration::days(i64::try_from(stale_days.min(1 << 40)).unwrap_or(0));
        let mut c = Self {
            stale_days,
            ..Self::default()
        };
        for snap in snapshots {
            let r = super::SnapshotRef::of(snap, "");
            let entry = |last_verified| Unverified {
                snapshot: r.id.clone(),
                source: r.source.clone(),
                time: snap.manifest.time.to_rfc3339(),
                last_verified,
            };
            let Some(v) = last.get(&r.id) else {
                c.never_verified.push(entry(None));
                continue;
            };
            let ended = v
                .finished
                .as_deref()
                .and_then(|f| chrono::DateTime::parse_from_rfc3339(f).ok());
            if v.status == Status::Failed {
                c.last_failed.push(entry(v.finished.clone()));
            } else if ended.is_some_and(|e| e < cutoff) {
                c.stale.push(entry(v.finished.clone()));
            }
        }
        c
    }
}
