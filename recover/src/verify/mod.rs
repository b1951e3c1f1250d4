//! Verification: proof that a backup restores, by using it. Each verification starts
//! the backup the way a recovery would, checks that what runs on it works, records every
//! step with its result and duration, and takes everything down again.
//!
//! - [`vm`]: a VM snapshot booted in an isolated lab ([`lab`]): boot, ping, services, a
//!   script; the SureBackup of Veeam.
//! - [`db`]: a database snapshot started as a recovery session: connections, `amcheck`
//!   (PostgreSQL) or `CHECK TABLE` (MariaDB), row counts, the user's queries.
//! - [`files`]: a sample of a snapshot's files restored into a scratch directory and
//!   compared with what the snapshot recorded.
//!
//! Results are host state ([`results`]): `verifications.sqlite` in the state directory,
//! read by `repo verify list|show|stats` and by `repo serve` (metrics, the dashboard).
//! A verification is recorded before anything is made, and every step as it ends, so a
//! verification whose process died shows where it stopped.

pub mod db;
pub mod files;
pub mod lab;
pub mod results;
pub mod vm;

use std::collections::BTreeMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

pub use results::{Results, Stats};

/// A verification's id (its row in the results).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VerificationId(pub i64);

impl std::fmt::Display for VerificationId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Vm,
    Db,
    Files,
}

impl Kind {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vm => "vm",
            Self::Db => "db",
            Self::Files => "files",
        }
    }

    /// `vm`, `db` or `files`.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "vm" => Some(Self::Vm),
            "db" => Some(Self::Db),
            "files" => Some(Self::Files),
            _ => None,
        }
    }
}

/// Where a verification stands, or how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Asked for (by a schedule, after a backup), not started yet.
    Pending,
    Running,
    Passed,
    Failed,
    /// Passed, with a check that could not run (amcheck not installed) or a doubt.
    Warning,
}

impl Status {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Passed => "passed",
            Self::Failed => "failed",
            Self::Warning => "warning",
        }
    }

    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Pending,
            Self::Running,
            Self::Passed,
            Self::Failed,
            Self::Warning,
        ]
        .into_iter()
        .find(|v| v.as_str() == s)
    }

    /// Whether it has ended.
    #[must_use]
    pub fn is_final(self) -> bool {
        matches!(self, Self::Passed | Self::Failed | Self::Warning)
    }
}

/// One step's result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepResult {
    Passed,
    Failed,
    Warning,
    /// Not run: an earlier step failed.
    Skipped,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Step {
    /// `restore`, `boot`, `ping`, `service ssh`, `amcheck`, ...
    pub name: String,
    pub result: StepResult,
    pub seconds: f64,
    /// What was seen: an address, a boot time, a failing index, the rows of a query.
    pub detail: String,
}

/// What a VM verification found out about the guest.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmFacts {
    pub vm_restored: bool,
    pub vm_booted: bool,
    /// From the domain's start to the guest answering (agent or login prompt).
    pub boot_time_s: Option<f64>,
    pub ping_ok: Option<bool>,
    /// Service -> whether it answered.
    pub services: BTreeMap<String, bool>,
    /// The guest's address in the lab.
    pub address: Option<String>,
    pub domain: Option<String>,
}

/// One verification, as recorded.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verification {
    pub id: VerificationId,
    pub kind: Kind,
    /// The test asked for: `boot`, `boot_ping`, `boot_ping_services`, `full` (VMs);
    /// `db`; `files`.
    pub test: String,
    pub status: Status,
    /// The snapshot's full id.
    pub snapshot: String,
    /// `host:source` of the snapshot, as `repo snapshots` shows it.
    pub source: String,
    pub repository: String,
    /// What asked for it: `manual`, `schedule NAME`, `after_backup JOB`.
    pub trigger: String,
    /// RFC 3339.
    pub created: String,
    pub finished: Option<String>,
    pub seconds: Option<f64>,
    pub steps: Vec<Step>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vm: Option<VmFacts>,
    /// What failed, in a line.
    pub error: Option<String>,
    /// Everything the steps logged.
    pub log: String,
    /// Whether everything made for it is gone again.
    pub cleanup_done: bool,
    /// The process running it (while it runs).
    pub pid: u32,
    /// The recovery session it ran on, if any (its record says what to take down).
    #[serde(default)]
    pub session: Option<String>,
}

impl Verification {
    /// A new record for `kind` on `snapshot`, running in this process.
    #[must_use]
    pub fn new(kind: Kind, test: &str, snapshot: &SnapshotRef, trigger: &str) -> Self {
        Self {
            id: VerificationId(0),
            kind,
            test: test.to_owned(),
            status: Status::Running,
            snapshot: snapshot.id.clone(),
            source: snapshot.source.clone(),
            repository: snapshot.repository.clone(),
            trigger: trigger.to_owned(),
            created: chrono::Utc::now().to_rfc3339(),
            finished: None,
            seconds: None,
            steps: Vec::new(),
            vm: (kind == Kind::Vm).then(VmFacts::default),
            error: None,
            log: String::new(),
            cleanup_done: false,
            pid: std::process::id(),
            session: None,
        }
    }

    /// The first failed step's name.
    #[must_use]
    pub fn failed_step(&self) -> Option<&str> {
        self.steps
            .iter()
            .find(|s| s.result == StepResult::Failed)
            .map(|s| s.name.as_str())
    }
}

/// The snapshot a verification is of.
#[derive(Debug, Clone)]
pub struct SnapshotRef {
    pub id: String,
    pub source: String,
    pub repository: String,
}

impl SnapshotRef {
    #[must_use]
    pub fn of(snap: &cairn_engine::snapshot::Snapshot, repository: &str) -> Self {
        Self {
            id: snap.id.to_hex(),
            source: format!("{}:{}", snap.manifest.host, snap.manifest.source_label()),
            repository: repository.to_owned(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum VerifyError {
    #[error("verification results: {0}")]
    Results(String),
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Recover(#[from] crate::RecoverError),
}

/// Records a verification's steps as they end (each written to the results at once).
pub struct Recorder<'a> {
    results: &'a Results,
    pub v: Verification,
    started: Instant,
}

/// What a step found: its result and what to record of it.
pub type Outcome = (StepResult, String);

impl<'a> Recorder<'a> {
    /// Records `v` (a new id) and starts its clock.
    pub fn begin(results: &'a Results, mut v: Verification) -> Result<Self, VerifyError> {
        v.id = results.insert(&v)?;
        tracing::info!(
            "verification {} of {} ({}) started",
            v.id,
            &v.snapshot[..v.snapshot.len().min(8)],
            v.test
        );
        Ok(Self {
            results,
            v,
            started: Instant::now(),
        })
    }

    #[must_use]
    pub fn id(&self) -> VerificationId {
        self.v.id
    }

    /// Writes the record as it is now.
    pub fn save(&self) -> Result<(), VerifyError> {
        self.results.update(&self.v)
    }

    /// Appends a line to the log.
    pub fn log(&mut self, line: &str) {
        tracing::debug!("verification {}: {line}", self.v.id);
        self.v.log.push_str(line);
        if !line.ends_with('\n') {
            self.v.log.push('\n');
        }
    }

    /// Runs one step and records it; returns whether it did not fail.
    pub fn step(&mut self, name: &str, f: impl FnOnce(&mut Self) -> Outcome) -> bool {
        let t = Instant::now();
        self.log(&format!("-- {name}"));
        let (result, detail) = f(self);
        let seconds = t.elapsed().as_secs_f64();
        self.log(&format!(
            "{name}: {} in {seconds:.1}s{}{detail}",
            match result {
                StepResult::Passed => "passed",
                StepResult::Failed => "FAILED",
                StepResult::Warning => "warning",
                StepResult::Skipped => "skipped",
            },
            if detail.is_empty() { "" } else { ": " }
        ));
        if result == StepResult::Failed && self.v.error.is_none() {
            self.v.error = Some(format!("{name}: {detail}"));
        }
        self.v.steps.push(Step {
            name: name.to_owned(),
            result,
            seconds,
            detail,
        });
        if let Err(e) = self.save() {
            tracing::warn!("recording verification {}: {e}", self.v.id);
        }
        result != StepResult::Failed
    }

    /// Records steps that will not run after a failure.
    pub fn skip(&mut self, names: &[&str]) {
        for n in names {
            self.v.steps.push(Step {
                name: (*n).to_owned(),
                result: StepResult::Skipped,
                seconds: 0.0,
                detail: "an earlier step failed".into(),
            });
        }
    }

    /// Ends the verification: its status from its steps, unless `error` (a failure
    /// outside any step) says otherwise.
    pub fn finish(mut self, cleanup_done: bool) -> Verification {
        let steps = &self.v.steps;
        self.v.status =
            if self.v.error.is_some() || steps.iter().any(|s| s.result == StepResult::Failed) {
                Status::Failed
            } else if steps.iter().any(|s| s.result == StepResult::Warning) {
                Status::Warning
            } else {
                Status::Passed
            };
        self.v.cleanup_done = cleanup_done;
        self.v.seconds = Some(self.started.elapsed().as_secs_f64());
        self.v.finished = Some(chrono::Utc::now().to_rfc3339());
        if let Err(e) = self.save() {
            tracing::warn!("recording verification {}: {e}", self.v.id);
        }
        tracing::info!(
            "verification {} {} in {:.1}s",
            self.v.id,
            self.v.status.as_str(),
            self.v.seconds.unwrap_or(0.0)
        );
        self.v
    }

    /// Fails the verification outside any step (setting up, cleaning up).
    pub fn fail(&mut self, what: &str) {
        self.log(&format!("error: {what}"));
        if self.v.error.is_none() {
            self.v.error = Some(what.to_owned());
        }
    }
}
