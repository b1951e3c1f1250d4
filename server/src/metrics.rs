//! `/metrics`: the daemon's figures in the Prometheus text format, kept up to date from
//! events (run events, the scheduler's ticks, HTTP requests, a repository refresh after
//! each run), never computed by scanning a repository on a scrape: a scrape only
//! encodes what is already counted.
//!
//! Labels stay low-cardinality: `job_name`, `repository`, `status`, `route`; never a
//! run or snapshot id. (Not `job`: Prometheus gives every scraped series the scrape
//! job's `job` label, and would rename ours to `exported_job`.) Every metric is documented in docs/METRICS.md. The verification and
//! replication families are named now (and stay at zero) so that dashboards do not
//! change when those features land.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::runner::{Observer, RunEvent, RunEventKind};
use crate::state::{RunId, RunStatus, State};

type FGauge = Gauge<f64, AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabel {
    pub job_name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobStatusLabel {
    pub job_name: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepoLabel {
    pub repository: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RepoResultLabel {
    pub repository: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobResultLabel {
    pub job_name: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TargetLabel {
    pub target: String,
    pub result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabel {
    pub method: String,
    pub route: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct VersionLabel {
    pub version: String,
}

fn duration_histogram() -> Histogram {
    // 1 s to about 9 h.
    Histogram::new(exponential_buckets(1.0, 2.0, 16))
}

fn latency_histogram() -> Histogram {
    // 0.5 ms to about 16 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric the daemon exports.
pub struct Metrics {
    registry: Registry,
    // runs and jobs
    pub runs: Family<JobStatusLabel, Counter>,
    pub runs_running: Gauge,
    pub runs_queued: Gauge,
    pub jobs: Gauge,
    pub job_last_success: Family<JobLabel, FGauge>,
    pub job_last_run: Family<JobLabel, FGauge>,
    pub job_last_duration: Family<JobLabel, FGauge>,
    pub job_last_status: Family<JobLabel, Gauge>,
    pub job_success_ratio: Family<JobLabel, FGauge>,
    pub job_last_bytes_stored: Family<JobLabel, Gauge>,
    pub job_last_files: Family<JobLabel, Gauge>,
    pub job_running: Family<JobLabel, Gauge>,
    pub run_bytes_read: Family<JobLabel, Counter>,
    pub run_bytes_new: Family<JobLabel, Counter>,
    pub run_bytes_stored: Family<JobLabel, Counter>,
    pub run_files: Family<JobLabel, Counter>,
    pub run_duration: Family<JobLabel, Histogram, fn() -> Histogram>,
    pub run_stored_bytes: Family<JobLabel, Histogram, fn() -> Histogram>,
    pub snapshots_created: Family<JobLabel, Counter>,
    pub snapshots_forgotten: Family<JobLabel, Counter>,
    pub run_progress_bytes: Family<JobLabel, Gauge>,
    pub run_progress_rate: Family<JobLabel, Gauge>,
    pub run_progress_eta: Family<JobLabel, Gauge>,
    pub run_warnings: Family<JobLabel, Counter>,
    // schedules
    pub schedules_active: Gauge,
    pub schedules_disabled: Gauge,
    pub missed_runs: Family<JobLabel, Counter>,
    pub schedule_next_run: Family<JobLabel, FGauge>,
    pub scheduler_ticks: Counter,
    // repositories
    pub repo_up: Family<RepoLabel, Gauge>,
    pub repo_size: Family<RepoLabel, Gauge>,
    pub repo_packs: Family<RepoLabel, Gauge>,
    pub repo_snapshots: Family<RepoLabel, Gauge>,
    pub repo_logical_bytes: Family<RepoLabel, Gauge>,
    pub repo_dedup_ratio: Family<RepoLabel, FGauge>,
    pub repo_compression_ratio: Family<RepoLabel, FGauge>,
    pub repo_locks: Family<RepoLabel, Gauge>,
    pub repo_last_check: Family<RepoLabel, FGauge>,
    pub repo_last_check_ok: Family<RepoLabel, Gauge>,
    pub repo_refresh_seconds: Family<RepoLabel, FGauge>,
    // recovery
    pub recovery_sessions: Family<KindLabel, Gauge>,
    // verification and replication (named now; later issues fill them)
    pub verifications: Family<JobResultLabel, Counter>,
    pub verification_last: Family<JobLabel, FGauge>,
    pub verifications_recorded: Family<StatusLabel, Gauge>,
    pub verification_success_ratio: FGauge,
    pub verification_source_last: Family<SourceLabel, FGauge>,
    pub restore_tests: Family<ResultLabel, Counter>,
    pub replications: Family<RepoResultLabel, Counter>,
    pub replication_lag: Family<RepoLabel, FGauge>,
    pub replication_bytes: Family<RepoLabel, Counter>,
    // notifications
    pub notifications: Family<TargetLabel, Counter>,
    // HTTP and the daemon
    pub http_requests: Family<HttpLabel, Counter>,
    pub http_duration: Family<RouteLabel, Histogram, fn() -> Histogram>,
    pub http_in_flight: Gauge,
    pub auth_failures: Counter,
    pub audit_entries: Counter,
    pub start_time: FGauge,
    pub build_info: Family<VersionLabel, Gauge>,
    pub scrapes: Counter,
    // what events need to remember
    started: Mutex<HashSet<RunId>>,
    outcomes: Mutex<HashMap<String, (u64, u64)>>,
}

macro_rules! reg {
    ($r:expr, $name:literal, $help:literal, $m:expr) => {
        $r.register($name, $help, $m.clone())
    };
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    #[must_use]
    #[allow(clippy::too_many_lines)]
    pub fn new() -> Self {
        let mut m = Self {
            registry: Registry::default(),
            runs: Family::default(),
            runs_running: Gauge::default(),
            runs_queued: Gauge::default(),
            jobs: Gauge::default(),
            job_last_success: Family::default(),
            job_last_run: Family::default(),
            job_last_duration: Family::default(),
            job_last_status: Family::default(),
            job_success_ratio: Family::default(),
            job_last_bytes_stored: Family::default(),
            job_last_files: Family::default(),
            job_running: Family::default(),
            run_bytes_read: Family::default(),
            run_bytes_new: Family::default(),
            run_bytes_stored: Family::default(),
            run_files: Family::default(),
            run_duration: Family::new_with_constructor(duration_histogram),
            run_stored_bytes: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(1024.0, 4.0, 14))
            }),
            snapshots_created: Family::default(),
            snapshots_forgotten: Family::default(),
            run_progress_bytes: Family::default(),
            run_progress_rate: Family::default(),
            run_progress_eta: Family::default(),
            run_warnings: Family::default(),
            schedules_active: Gauge::default(),
            schedules_disabled: Gauge::default(),
            missed_runs: Family::default(),
            schedule_next_run: Family::default(),
            scheduler_ticks: Counter::default(),
            repo_up: Family::default(),
            repo_size: Family::default(),
            repo_packs: Family::default(),
            repo_snapshots: Family::default(),
            repo_logical_bytes: Family::default(),
            repo_dedup_ratio: Family::default(),
            repo_compression_ratio: Family::default(),
            repo_locks: Family::default(),
            repo_last_check: Family::default(),
            repo_last_check_ok: Family::default(),
            repo_refresh_seconds: Family::default(),
            recovery_sessions: Family::default(),
            verifications: Family::default(),
            verification_last: Family::default(),
            verifications_recorded: Family::default(),
            verification_success_ratio: FGauge::default(),
            verification_source_last: Family::default(),
            restore_tests: Family::default(),
            replications: Family::default(),
            replication_lag: Family::default(),
            replication_bytes: Family::default(),
            notifications: Family::default(),
            http_requests: Family::default(),
            http_duration: Family::new_with_constructor(latency_histogram),
            http_in_flight: Gauge::default(),
            auth_failures: Counter::default(),
            audit_entries: Counter::default(),
            start_time: FGauge::default(),
            build_info: Family::default(),
            scrapes: Counter::default(),
            started: Mutex::new(HashSet::new()),
            outcomes: Mutex::new(HashMap::new()),
        };
        let r = &mut m.registry;
        reg!(
            r,
            "cairn_runs",
            "Job runs finished, by job and status (succeeded, failed, cancelled)",
            m.runs
        );
        reg!(
            r,
            "cairn_runs_running",
            "Job runs running now",
            m.runs_running
        );
        reg!(
            r,
            "cairn_runs_queued",
            "Job runs waiting for a free slot",
            m.runs_queued
        );
        reg!(r, "cairn_jobs", "Jobs defined", m.jobs);
        reg!(
            r,
            "cairn_job_last_success_timestamp_seconds",
            "When the job's last successful run ended (Unix time)",
            m.job_last_success
        );
        reg!(
            r,
            "cairn_job_last_run_timestamp_seconds",
            "When the job's last run ended, whatever its status (Unix time)",
            m.job_last_run
        );
        reg!(
            r,
            "cairn_job_last_duration_seconds",
            "How long the job's last run took",
            m.job_last_duration
        );
        reg!(
            r,
            "cairn_job_last_status",
            "Whether the job's last run succeeded (1) or not (0)",
            m.job_last_status
        );
        reg!(
            r,
            "cairn_job_success_ratio",
            "Share of the job's recorded runs that succeeded (0..1)",
            m.job_success_ratio
        );
        reg!(
            r,
            "cairn_job_last_stored_bytes",
            "Bytes the job's last run added to its repository",
            m.job_last_bytes_stored
        );
        reg!(
            r,
            "cairn_job_last_files",
            "Files in the job's last run's snapshots",
            m.job_last_files
        );
        reg!(
            r,
            "cairn_job_running",
            "Whether the job has a run going now (1) or not (0)",
            m.job_running
        );
        reg!(
            r,
            "cairn_run_read_bytes",
            "Bytes read from sources by finished runs",
            m.run_bytes_read
        );
        reg!(
            r,
            "cairn_run_new_bytes",
            "Bytes of new data (before compression) found by finished runs",
            m.run_bytes_new
        );
        reg!(
            r,
            "cairn_run_stored_bytes",
            "Bytes added to repositories by finished runs",
            m.run_bytes_stored
        );
        reg!(
            r,
            "cairn_run_files",
            "Files in the snapshots of finished runs",
            m.run_files
        );
        reg!(
            r,
            "cairn_run_duration_seconds",
            "Duration of finished runs",
            m.run_duration
        );
        reg!(
            r,
            "cairn_run_stored_bytes_per_run",
            "Bytes added to the repository per run",
            m.run_stored_bytes
        );
        reg!(
            r,
            "cairn_snapshots_created",
            "Snapshots made by runs",
            m.snapshots_created
        );
        reg!(
            r,
            "cairn_snapshots_forgotten",
            "Snapshots forgotten by runs' retention",
            m.snapshots_forgotten
        );
        reg!(
            r,
            "cairn_run_progress_bytes",
            "Bytes dealt with so far by the job's running run",
            m.run_progress_bytes
        );
        reg!(
            r,
            "cairn_run_progress_rate_bytes_per_second",
            "Rate of the job's running run",
            m.run_progress_rate
        );
        reg!(
            r,
            "cairn_run_progress_eta_seconds",
            "Seconds the job's running run has left, when known (else -1)",
            m.run_progress_eta
        );
        reg!(
            r,
            "cairn_run_warnings",
            "Warnings and errors logged by runs",
            m.run_warnings
        );
        reg!(
            r,
            "cairn_schedules_active",
            "Schedules enabled",
            m.schedules_active
        );
        reg!(
            r,
            "cairn_schedules_disabled",
            "Schedules disabled",
            m.schedules_disabled
        );
        reg!(
            r,
            "cairn_missed_runs",
            "Scheduled runs that did not happen (daemon down, previous run still going)",
            m.missed_runs
        );
        reg!(
            r,
            "cairn_schedule_next_run_timestamp_seconds",
            "When the job's next scheduled run starts (Unix time)",
            m.schedule_next_run
        );
        reg!(
            r,
            "cairn_scheduler_ticks",
            "Times the scheduler looked at the clock",
            m.scheduler_ticks
        );
        reg!(
            r,
            "cairn_repository_up",
            "Whether the repository opened at its last refresh (1) or not (0)",
            m.repo_up
        );
        reg!(
            r,
            "cairn_repository_size_bytes",
            "Bytes of the repository's pack files",
            m.repo_size
        );
        reg!(
            r,
            "cairn_repository_packs",
            "Pack files in the repository",
            m.repo_packs
        );
        reg!(
            r,
            "cairn_repository_snapshots",
            "Snapshots in the repository",
            m.repo_snapshots
        );
        reg!(
            r,
            "cairn_repository_logical_bytes",
            "Sum of the sizes of every snapshot (what restoring them all would write)",
            m.repo_logical_bytes
        );
        reg!(
            r,
            "cairn_repository_dedup_ratio",
            "Logical bytes over the unique data's bytes before compression",
            m.repo_dedup_ratio
        );
        reg!(
            r,
            "cairn_repository_compression_ratio",
            "Unique data's bytes before compression over after",
            m.repo_compression_ratio
        );
        reg!(
            r,
            "cairn_repository_locks",
            "Locks in the repository (running or stale operations)",
            m.repo_locks
        );
        reg!(
            r,
            "cairn_repository_last_check_timestamp_seconds",
            "When the repository was last checked, by a job's verify step or through the API (Unix time)",
            m.repo_last_check
        );
        reg!(
            r,
            "cairn_repository_last_check_ok",
            "Whether that check found no problem (1) or some (0)",
            m.repo_last_check_ok
        );
        reg!(
            r,
            "cairn_repository_refresh_seconds",
            "How long the last refresh of these figures took",
            m.repo_refresh_seconds
        );
        reg!(
            r,
            "cairn_recovery_sessions",
            "Instant recovery sessions running, by kind (database, vm)",
            m.recovery_sessions
        );
        reg!(
            r,
            "cairn_verifications",
            "Verifications of snapshots by this daemon, by job (empty: through the API) and result (passed, failed, warning)",
            m.verifications
        );
        reg!(
            r,
            "cairn_verification_last_timestamp_seconds",
            "When a verification of the job's snapshots last ended (Unix time)",
            m.verification_last
        );
        reg!(
            r,
            "cairn_verifications_recorded",
            "Verifications in this host's results, by status (pending, running, passed, failed, warning)",
            m.verifications_recorded
        );
        reg!(
            r,
            "cairn_verification_success_ratio",
            "Passed (or warned) verifications per ended one, of this host's results",
            m.verification_success_ratio
        );
        reg!(
            r,
            "cairn_verification_source_last_timestamp_seconds",
            "When each source's last verification ended (Unix time), of this host's results",
            m.verification_source_last
        );
        reg!(
            r,
            "cairn_restore_tests",
            "Restore tests by this daemon (file verifications: a sample restored and compared), by result",
            m.restore_tests
        );
        reg!(
            r,
            "cairn_replications",
            "Replications, by repository and result (placeholder)",
            m.replications
        );
        reg!(
            r,
            "cairn_replication_lag_seconds",
            "Age of the newest snapshot not yet replicated (placeholder)",
            m.replication_lag
        );
        reg!(
            r,
            "cairn_replication_bytes",
            "Bytes replicated (placeholder)",
            m.replication_bytes
        );
        reg!(
            r,
            "cairn_notifications",
            "Notifications sent, by target and result (sent, failed)",
            m.notifications
        );
        reg!(
            r,
            "cairn_http_requests",
            "API requests, by method, route and status",
            m.http_requests
        );
        reg!(
            r,
            "cairn_http_request_duration_seconds",
            "API request latency, by route",
            m.http_duration
        );
        reg!(
            r,
            "cairn_http_requests_in_flight",
            "API requests being served",
            m.http_in_flight
        );
        reg!(
            r,
            "cairn_api_auth_failures",
            "API requests refused for a missing, unknown or read-only token",
            m.auth_failures
        );
        reg!(
            r,
            "cairn_audit_entries",
            "Changes written to the audit log",
            m.audit_entries
        );
        reg!(
            r,
            "cairn_daemon_start_timestamp_seconds",
            "When the daemon started (Unix time)",
            m.start_time
        );
        reg!(
            r,
            "cairn_build_info",
            "The daemon's version (always 1)",
            m.build_info
        );
        reg!(r, "cairn_metrics_scrapes", "Scrapes of /metrics", m.scrapes);
        m.build_info
            .get_or_create(&VersionLabel {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        m.start_time.set(unix_now());
        m
    }

    /// The text a scrape returns.
    #[must_use]
    pub fn encode(&self) -> String {
        self.scrapes.inc();
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }

    /// Loads what the history already knows (last runs, success ratios, job count).
    pub fn load(&self, state: &State) -> crate::state::Result<()> {
        // The last check of each repository (the listing is newest first).
        let mut seen = std::collections::BTreeSet::new();
        for c in state.checks(None, 10_000)? {
            if seen.insert(c.repository.clone()) {
                self.checked(&c);
            }
        }
        let jobs = state.jobs()?;
        self.jobs.set(i64::try_from(jobs.len()).unwrap_or(i64::MAX));
        for j in &jobs {
            let label = JobLabel {
                job_name: j.definition.name.clone(),
            };
            self.job_running.get_or_create(&label).set(0);
            if let Some(r) = state.last_run_with(&j.definition.name, RunStatus::Succeeded)? {
                if let Some(end) = r.ended_at {
                    self.job_last_success.get_or_create(&label).set(ts(end));
                }
            }
            let counts = state.job_outcomes(&j.definition.name)?;
            self.outcomes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(j.definition.name.clone(), counts);
            if counts.1 > 0 {
                self.job_success_ratio
                    .get_or_create(&label)
                    .set(ratio(counts.0, counts.1));
            }
        }
        Ok(())
    }

    /// Records a check of a repository (by a job's verify step or through the API; at
    /// the daemon's start, the last one of each from the state database).
    pub fn checked(&self, check: &crate::state::CheckRecord) {
        let label = RepoLabel {
            repository: check.repository.clone(),
        };
        #[allow(clippy::cast_precision_loss)]
        self.repo_last_check
            .get_or_create(&label)
            .set(check.at.timestamp_millis() as f64 / 1000.0);
        self.repo_last_check_ok
            .get_or_create(&label)
            .set(i64::from(check.ok));
    }

    /// Records an HTTP request.
    pub fn http(&self, method: &str, route: &str, status: u16, seconds: f64) {
        self.http_requests
            .get_or_create(&HttpLabel {
                method: method.to_owned(),
                route: route.to_owned(),
                status: status.to_string(),
            })
            .inc();
        self.http_duration
            .get_or_create(&RouteLabel {
                route: route.to_owned(),
            })
            .observe(seconds);
    }

    /// Updates a repository's figures (after a run, and at start).
    pub fn refresh_repository(
        &self,
        name: &str,
        repo: &cairn_engine::Repository,
    ) -> Option<crate::repos::Figures> {
        let started = std::time::Instant::now();
        let label = RepoLabel {
            repository: name.to_owned(),
        };
        let figures = crate::repos::Figures::of(repo);
        match &figures {
            Ok(f) => {
                self.repo_up.get_or_create(&label).set(1);
                self.repo_size
                    .get_or_create(&label)
                    .set(to_i64(f.size_bytes));
                self.repo_packs.get_or_create(&label).set(to_i64(f.packs));
                self.repo_snapshots
                    .get_or_create(&label)
                    .set(to_i64(f.snapshots));
                self.repo_logical_bytes
                    .get_or_create(&label)
                    .set(to_i64(f.logical_bytes));
                self.repo_dedup_ratio
                    .get_or_create(&label)
                    .set(f.dedup_ratio);
                self.repo_compression_ratio
                    .get_or_create(&label)
                    .set(f.compression_ratio);
                self.repo_locks.get_or_create(&label).set(to_i64(f.locks));
            }
            Err(e) => {
                tracing::warn!(
                    repository = name,
                    "refreshing the repository's figures: {e}"
                );
                self.repo_up.get_or_create(&label).set(0);
            }
        }
        self.repo_refresh_seconds
            .get_or_create(&label)
            .set(started.elapsed().as_secs_f64());
        figures.ok()
    }

    fn finished(&self, e: &RunEvent, status: RunStatus, stats: &crate::state::RunStats) {
        let label = JobLabel {
            job_name: e.job.clone(),
        };
        let was_running = self
            .started
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&e.run);
        if was_running {
            self.runs_running.dec();
        } else {
            self.runs_queued.dec();
        }
        self.job_running.get_or_create(&label).set(0);
        self.run_progress_bytes.remove(&label);
        self.run_progress_rate.remove(&label);
        self.run_progress_eta.remove(&label);
        self.runs
            .get_or_create(&JobStatusLabel {
                job_name: e.job.clone(),
                status: status.as_str().to_owned(),
            })
            .inc();
        let now = unix_now();
        self.job_last_run.get_or_create(&label).set(now);
        let ok = status == RunStatus::Succeeded;
        self.job_last_status
            .get_or_create(&label)
            .set(i64::from(ok));
        if ok {
            self.job_last_success.get_or_create(&label).set(now);
        }
        let secs = stats.duration_ms as f64 / 1000.0;
        self.job_last_duration.get_or_create(&label).set(secs);
        self.job_last_bytes_stored
            .get_or_create(&label)
            .set(to_i64(stats.bytes_stored));
        self.job_last_files
            .get_or_create(&label)
            .set(to_i64(stats.files));
        self.run_bytes_read
            .get_or_create(&label)
            .inc_by(stats.bytes_read);
        self.run_bytes_new
            .get_or_create(&label)
            .inc_by(stats.bytes_new);
        self.run_bytes_stored
            .get_or_create(&label)
            .inc_by(stats.bytes_stored);
        self.run_files.get_or_create(&label).inc_by(stats.files);
        if was_running {
            self.run_duration.get_or_create(&label).observe(secs);
            self.run_stored_bytes
                .get_or_create(&label)
                .observe(stats.bytes_stored as f64);
        }
        self.snapshots_created
            .get_or_create(&label)
            .inc_by(stats.snapshots.len() as u64);
        self.snapshots_forgotten
            .get_or_create(&label)
            .inc_by(stats.forgotten);
        if let Some(v) = stats.verified {
            self.verifications
                .get_or_create(&JobResultLabel {
                    job_name: e.job.clone(),
                    result: if v { "ok" } else { "failed" }.to_owned(),
                })
                .inc();
            self.verification_last.get_or_create(&label).set(now);
        }
        let mut outcomes = self
            .outcomes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let o = outcomes.entry(e.job.clone()).or_default();
        o.0 += u64::from(ok);
        o.1 += 1;
        self.job_success_ratio
            .get_or_create(&label)
            .set(ratio(o.0, o.1));
    }
}

impl Metrics {
    /// A verification ended (by `job`, or through the API when empty).
    pub fn verified(&self, job: &str, v: &cairn_recover::verify::Verification) {
        if v.kind == cairn_recover::verify::Kind::Files {
            self.restore_tests
                .get_or_create(&ResultLabel {
                    result: v.status.as_str().to_owned(),
                })
                .inc();
        }
        self.verifications
            .get_or_create(&JobResultLabel {
                job_name: job.to_owned(),
                result: v.status.as_str().to_owned(),
            })
            .inc();
        if !job.is_empty() {
            self.verification_last
                .get_or_create(&JobLabel {
                    job_name: job.to_owned(),
                })
                .set(unix_now());
        }
    }

    /// The totals of the host's verification results.
    pub fn verification_totals(&self, st: &cairn_recover::verify::Stats) {
        for (status, n) in [
            ("pending", st.pending),
            ("running", st.running),
            ("passed", st.passed),
            ("failed", st.failed),
            ("warning", st.warning),
        ] {
            self.verifications_recorded
                .get_or_create(&StatusLabel {
                    status: status.to_owned(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
        if let Some(r) = st.success_rate {
            self.verification_success_ratio.set(r);
        }
        for (source, last) in &st.by_source {
            if let Ok(t) = chrono::DateTime::parse_from_rfc3339(&last.finished) {
                #[allow(clippy::cast_precision_loss)]
                self.verification_source_last
                    .get_or_create(&SourceLabel {
                        source: source.clone(),
                    })
                    .set(t.timestamp_millis() as f64 / 1000.0);
            }
        }
    }
}

impl Observer for Metrics {
    fn on(&self, e: &RunEvent) {
        let label = || JobLabel {
            job_name: e.job.clone(),
        };
        match &e.kind {
            RunEventKind::Queued { .. } => {
                self.runs_queued.inc();
            }
            RunEventKind::Started => {
                self.runs_queued.dec();
                self.runs_running.inc();
                self.job_running.get_or_create(&label()).set(1);
                self.started
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(e.run);
            }
            RunEventKind::Progress(s) => {
                let l = label();
                self.run_progress_bytes
                    .get_or_create(&l)
                    .set(to_i64(s.bytes_done));
                self.run_progress_rate
                    .get_or_create(&l)
                    .set(to_i64(s.bytes_per_second));
                self.run_progress_eta
                    .get_or_create(&l)
                    .set(s.eta_seconds.map_or(-1, to_i64));
            }
            RunEventKind::Message { level, .. } => {
                if *level != cairn_engine::progress::Level::Info {
                    self.run_warnings.get_or_create(&label()).inc();
                }
            }
            RunEventKind::Finished { status, stats, .. } => self.finished(e, *status, stats),
        }
    }
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[allow(clippy::cast_precision_loss)]
fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        return 0.0;
    }
    a as f64 / b as f64
}

#[allow(clippy::cast_precision_loss)]
fn ts(t: chrono::DateTime<chrono::Utc>) -> f64 {
    t.timestamp_millis() as f64 / 1000.0
}

fn unix_now() -> f64 {
    ts(chrono::Utc::now())
}
