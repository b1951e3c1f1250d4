//! Verifications through the daemon: a snapshot of a configured repository proved by
//! use (`cairn_recover::verify`: a VM's booted in a lab, a database's started and
//! checked, a file tree's sample restored), on request (the API's "verify now") or
//! after each backup of a job whose `[verify]` says `after_backup = true`, and at a
//! verify schedule's slots ([`Background`], an observer of the runner and a servant of
//! the scheduler). Each result goes to the host's
//! verification results, the metrics and, when it failed, the job's notification
//! targets.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_agent::database::{DatabaseMeta, Method};
use cairn_engine::snapshot::Snapshot;
use cairn_recover::verify::{self, Results, Status, Verification};
use cairn_recover::{mounting, Runtime, Store};

use crate::job::{JobDefinition, VerifySpec};
use crate::metrics::Metrics;
use crate::notify::Notifier;
use crate::operations::{MountSource, OperationError};
use crate::repos::Repositories;
use crate::runner::{Observer, RunEvent, RunEventKind};
use crate::state::{RunStatus, State};

/// What a verification needs of the site.
#[derive(Clone)]
pub struct Verifier {
    pub repos: Arc<Repositories>,
    pub state_dir: PathBuf,
    pub libvirt_uri: Option<String>,
    pub metrics: Option<Arc<Metrics>>,
    pub notifier: Option<Arc<Notifier>>,
}

/// `5m`, `90s`, `1h`, `30` (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: give a duration, e.g. 5m or 90s"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("{s:?}: the unit is s, m or h")),
    };
    Ok(Duration::from_secs(secs))
}

/// `10%` or `10` as a share.
fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s.trim().trim_end_matches('%').parse().map_err(|_| {
        format!("sample: {s:?} is not a percentage (for example: sample = \"10%\")")
    })?;
    Ok(v / 100.0)
}

impl VerifySpec {
    /// What is wrong with it, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(t) = &self.test {
            verify::vm::VmTest::parse(t).map_err(|e| format!("test: {e}"))?;
        }
        if let Some(s) = &self.services {
            verify::vm::parse_services(s).map_err(|e| format!("services: {e}"))?;
        }
        if let Some(t) = &self.timeout {
            parse_duration(t).map_err(|e| format!("timeout: {e}"))?;
        }
        if let Some(s) = &self.sample {
            let v = parse_share(s)?;
            if !(v > 0.0 && v <= 1.0) {
                return Err(format!(
                    "sample: {s:?} must be more than 0% and at most 100%"
                ));
            }
        }
        Ok(())
    }

    fn timeout(&self, default: Duration) -> Duration {
        self.timeout
            .as_deref()
            .and_then(|t| parse_duration(t).ok())
            .unwrap_or(default)
    }
}

impl Verifier {
    fn results(&self) -> Result<Results, OperationError> {
        Results::open(&self.state_dir).map_err(|e| OperationError::Invalid(e.to_string()))
    }

    /// Verifies snapshot `spec` (an id prefix or `latest`) of `repository`, for `job`
    /// when a job's backup or schedule asked; the record (a failure is a result: see
    /// its status).
    pub fn verify(
        &self,
        repository: &str,
        spec: &str,
        how: &VerifySpec,
        job: Option<&str>,
        trigger: &str,
    ) -> Result<Verification, OperationError> {
        how.validate().map_err(OperationError::Invalid)?;
        let repo = self.repos.handle(repository)?;
        let snap = crate::browse::find(&repo, spec)?;
        let results = self.results()?;
        let v = if cairn_agent::libvirt::backup::is_vm_snapshot(&snap) {
            drop(repo);
            self.verify_vm(repository, &snap, how, trigger, &results)?
        } else if DatabaseMeta::from_meta(&snap.manifest.meta)
            .is_some_and(|m| m.method == Method::Physical)
        {
            drop(repo);
            self.verify_db(repository, &snap, how, trigger, &results)?
        } else {
            let share = how
                .sample
                .as_deref()
                .map_or(Ok(0.1), parse_share)
                .map_err(OperationError::Invalid)?;
            let req = verify::files::FilesVerifyRequest {
                repo: &repo,
                snapshot: &snap,
                repository: self.repository_path(repository)?.display().to_string(),
                share,
                scratch: std::env::temp_dir(),
                trigger: trigger.to_owned(),
            };
            verify::files::run(&results, &req).map_err(verify_error)?
        };
        self.tell(&v, job.unwrap_or(""));
        Ok(v)
    }

    fn repository_path(&self, repository: &str) -> Result<PathBuf, OperationError> {
        let c = self.repos.known_config(repository)?;
        Ok(std::fs::canonicalize(&c.path).unwrap_or_else(|_| c.path.clone()))
    }

    fn verify_vm(
        &self,
        repository: &str,
        snap: &Snapshot,
        how: &VerifySpec,
        trigger: &str,
        results: &Results,
    ) -> Result<Verification, OperationError> {
        let source = MountSource::of_repos(&self.repos, repository)?;
        let spawn = |m: &mounting::SessionMount<'_>| source.spawn(m);
        let test = verify::vm::VmTest::parse(how.test.as_deref().unwrap_or("boot_ping"))
            .map_err(OperationError::Invalid)?;
        let req = verify::vm::VmVerifyRequest {
            snapshot: snap,
            repository: source.path.clone(),
            test,
            services: verify::vm::parse_services(how.services.as_deref().unwrap_or(""))
                .map_err(OperationError::Invalid)?,
            guest_script: how.script.clone(),
            host_script: None,
            timeout: how.timeout(Duration::from_secs(300)),
            service_wait: Duration::from_secs(30),
            network: match how.network.as_deref() {
                None | Some("lab") => verify::vm::LabNetwork::Lab,
                Some(name) => verify::vm::LabNetwork::Named(name.to_owned()),
            },
            uri: self.libvirt_uri.clone(),
            spawn_mount: &spawn,
            trigger: trigger.to_owned(),
        };
        let store = Store::open(&self.state_dir)?;
        verify::vm::run(&store, results, &req).map_err(verify_error)
    }

    fn verify_db(
        &self,
        repository: &str,
        snap: &Snapshot,
        how: &VerifySpec,
        trigger: &str,
        results: &Results,
    ) -> Result<Verification, OperationError> {
        let source = MountSource::of_repos(&self.repos, repository)?;
        let spawn = |m: &mounting::SessionMount<'_>| source.spawn(m);
        let req = verify::db::DbVerifyRequest {
            snapshot: snap,
            repository: source.path.clone(),
            runtime: Runtime::Docker,
            image: None,
            timeout: how.timeout(Duration::from_secs(600)),
            queries: how.queries.clone(),
            expect_rows: how.expect_rows,
            database: None,
            spawn_mount: &spawn,
            trigger: trigger.to_owned(),
        };
        let store = Store::open(&self.state_dir)?;
        verify::db::run(&store, results, &req).map_err(verify_error)
    }

    /// The host's results as they are now into the metrics' totals.
    pub fn refresh_metrics(&self) {
        let Some(m) = &self.metrics else { return };
        match self.results().and_then(|r| {
            r.stats()
                .map_err(|e| OperationError::Invalid(e.to_string()))
        }) {
            Ok(st) => m.verification_totals(&st),
            Err(e) => tracing::warn!("the verification results: {e}"),
        }
    }

    /// The host's verifications (newest first).
    pub fn list(&self, f: &verify::results::Filter) -> Result<Vec<Verification>, OperationError> {
        self.results()?
            .list(f)
            .map_err(|e| OperationError::Invalid(e.to_string()))
    }

    pub fn get(&self, id: i64) -> Result<Verification, OperationError> {
        self.results()?
            .get(verify::VerificationId(id))
            .map_err(|e| OperationError::Invalid(e.to_string()))?
            .ok_or_else(|| OperationError::NotFound(format!("no verification {id}")))
    }

    pub fn stats(&self) -> Result<verify::Stats, OperationError> {
        self.results()?
            .stats()
            .map_err(|e| OperationError::Invalid(e.to_string()))
    }

    /// The metrics and, for a failure, the notification (to the job's targets, when a
    /// job's backup or schedule asked for it).
    fn tell(&self, v: &Verification, job: &str) {
        if let Some(m) = &self.metrics {
            m.verified(job, v);
        }
        self.refresh_metrics();
        if v.status == Status::Failed && !job.is_empty() {
            if let Some(n) = &self.notifier {
                n.verification_failed(job, v);
            }
        }
    }
}

fn verify_error(e: verify::VerifyError) -> OperationError {
    match e {
        verify::VerifyError::Recover(r) => OperationError::Recover(r),
        other => OperationError::Invalid(other.to_string()),
    }
}

/// Verifications in the background, one batch at a time per job: after each
/// successful run of a job whose `[verify]` says `after_backup = true` (as an observer
/// of the runner, which must not wait), and at a verify schedule's slots (the newest
/// snapshot of each of the job's sources).
pub struct Background {
    verifier: Verifier,
    state: Arc<State>,
    threads: Mutex<Vec<Batch>>,
}

/// One job's verifications on a thread of their own.
struct Batch {
    job: String,
    thread: std::thread::JoinHandle<Vec<Outcome>>,
}

/// What became of one snapshot's verification in the background.
#[derive(Debug)]
pub struct Outcome {
    pub job: String,
    pub snapshot: String,
    /// The record, or why there is none (the snapshot could not be verified at all).
    pub result: Result<Verification, String>,
}

/// Why a verify schedule's slot verified nothing.
#[derive(Debug, thiserror::Error)]
pub enum NotStarted {
    #[error("the job's previous verifications still run")]
    Busy,
    #[error("the job has no snapshots to verify yet")]
    NoSnapshots,
    #[error("{0}")]
    Failed(String),
}

impl Background {
    #[must_use]
    pub fn new(verifier: Verifier, state: Arc<State>) -> Arc<Self> {
        Arc::new(Self {
            verifier,
            state,
            threads: Mutex::new(Vec::new()),
        })
    }

    /// Waits for the verifications started so far (`repo job run` before it exits);
    /// what became of those not yet collected.
    pub fn wait(&self) -> Vec<Outcome> {
        let batches: Vec<_> = self
            .threads
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        batches
            .into_iter()
            .flat_map(|b| b.thread.join().unwrap_or_default())
            .collect()
    }

    /// Whether verifications of `job` still run.
    pub fn busy(&self, job: &str) -> bool {
        self.threads
            .lock()
            .is_ok_and(|t| t.iter().any(|b| b.job == job && !b.thread.is_finished()))
    }

    /// A verify schedule's slot: the newest snapshot of each of `job`'s sources, in
    /// the background; how many.
    pub fn verify_newest(&self, job: &JobDefinition) -> Result<usize, NotStarted> {
        if self.busy(&job.name) {
            return Err(NotStarted::Busy);
        }
        let repo = self
            .verifier
            .repos
            .handle(&job.repository)
            .map_err(|e| NotStarted::Failed(e.to_string()))?;
        let snaps = repo
            .snapshots()
            .map_err(|e| NotStarted::Failed(e.to_string()))?;
        let newest: Vec<String> = crate::repos::protected_sources(&snaps)
            .into_iter()
            .filter(|p| p.job.as_deref() == Some(job.name.as_str()))
            .map(|p| p.newest_id)
            .collect();
        if newest.is_empty() {
            return Err(NotStarted::NoSnapshots);
        }
        let n = newest.len();
        let how = job
            .verify
            .as_ref()
            .map(|v| v.snapshots.clone())
            .unwrap_or_default();
        self.spawn(job, newest, how, format!("schedule {}", job.name));
        Ok(n)
    }

    /// Verifies `snapshots` of `job`'s repository one after the other, on a thread.
    fn spawn(&self, job: &JobDefinition, snapshots: Vec<String>, how: VerifySpec, trigger: String) {
        let (verifier, name, repository) = (
            self.verifier.clone(),
            job.name.clone(),
            job.repository.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("verify".into())
            .spawn(move || {
                let mut outcomes = Vec::new();
                for id in &snapshots {
                    let result = verifier.verify(&repository, id, &how, Some(&name), &trigger);
                    match &result {
                        Ok(r) => tracing::info!(
                            job = %name, snapshot = %id, verification = %r.id,
                            status = r.status.as_str(), %trigger, "verified"
                        ),
                        Err(err) => tracing::error!(
                            job = %name, snapshot = %id, %trigger, "verification not done: {err}"
                        ),
                    }
                    outcomes.push(Outcome {
                        job: name.clone(),
                        snapshot: id.clone(),
                        result: result.map_err(|e| e.to_string()),
                    });
                }
                outcomes
            });
        match spawned {
            Ok(thread) => {
                if let Ok(mut t) = self.threads.lock() {
                    t.retain(|b| !b.thread.is_finished());
                    t.push(Batch {
                        job: job.name.clone(),
                        thread,
                    });
                }
            }
            Err(err) => tracing::error!(job = %job.name, "starting the verification: {err}"),
        }
    }
}

impl Observer for Background {
    fn on(&self, e: &RunEvent) {
        let RunEventKind::Finished {
            status: RunStatus::Succeeded,
            stats,
            ..
        } = &e.kind
        else {
            return;
        };
        let Ok(Some(job)) = self.state.job(&e.job) else {
            return;
        };
        let Some(v) = job.definition.verify.clone().filter(|v| v.after_backup) else {
            return;
        };
        if stats.snapshots.is_empty() {
            return;
        }
        tracing::info!(job = %e.job, run = %e.run, "verifying the run's snapshots");
        self.spawn(
            &job.definition,
            stats.snapshots.clone(),
            v.snapshots,
            format!("after_backup {}", e.job),
        );
    }
}
