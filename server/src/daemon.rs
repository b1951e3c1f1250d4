//! `repo serve`: one tokio runtime owned here, at the top; the API on it; the runner's
//! workers and the scheduler on threads of their own (engine work never runs on a tokio
//! worker).
//!
//! At start, runs that a previous daemon left queued or running are marked failed
//! (never left "running"), the history is trimmed, and the metrics are loaded from it.
//! The scheduler looks at the clock when something is due, and at least every `tick`.

use std::net::SocketAddr;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::api::{self, Hub};
use crate::metrics::{JobLabel, Metrics};
use crate::notify::Notifier;
use crate::runner::{Observer, Runner, RunnerOptions, SubmitError};
use crate::schedule::Clock;
use crate::scheduler;
use crate::site::Site;
use crate::state::{Missed, ScheduleAction};
use crate::verification::Background;

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    State(#[from] crate::state::StateError),
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Tls(String),
    #[error("mcp: {0}")]
    Mcp(String),
}

/// A started daemon's parts (without its HTTP listener): what the API serves.
pub struct Daemon {
    pub site: Arc<Site>,
    pub runner: Runner,
    pub metrics: Arc<Metrics>,
    pub hub: Arc<Hub>,
    pub notifier: Arc<Notifier>,
    /// Verifications of snapshots (the API's, and after a job's backups).
    pub verifier: crate::verification::Verifier,
    pub clock: Arc<dyn Clock>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    scheduler: Option<std::thread::JoinHandle<()>>,
}

impl Daemon {
    /// Recovers from a previous daemon's end, starts the runner and the scheduler.
    pub fn start(site: Site, clock: Arc<dyn Clock>) -> Result<Self, DaemonError> {
        let now = clock.now();
        let failed = site.state.fail_interrupted(now, &pid_alive)?;
        for id in &failed {
            tracing::warn!(run = %id, "run left unfinished by a previous daemon: marked failed");
        }
        let trimmed = site.state.prune_history(
            now,
            site.config.history.keep_days,
            site.config.history.keep_runs_per_job,
        )?;
        if trimmed > 0 {
            tracing::info!("history: {trimmed} old runs removed");
        }
        Self::parts(site, clock, true)
    }

    /// The daemon's parts inside another program (`repo mcp`): a runner for the runs
    /// it is asked for, no scheduler (`repo serve` keeps the schedules), and nothing of
    /// the state's other runs touched (a daemon may be running them).
    pub fn embedded(site: Site, clock: Arc<dyn Clock>) -> Result<Self, DaemonError> {
        Self::parts(site, clock, false)
    }

    fn parts(site: Site, clock: Arc<dyn Clock>, schedules: bool) -> Result<Self, DaemonError> {
        let site = Arc::new(site);
        let metrics = Arc::new(Metrics::new());
        metrics.load(&site.state)?;
        let hub = Arc::new(Hub::new());
        let refresher = Arc::new(RepoRefresher {
            site: site.clone(),
            metrics: metrics.clone(),
        });
        let notifier = Notifier::start(
            site.config.notifications.clone(),
            site.state.clone(),
            metrics.clone(),
        );
        let verifier = crate::verification::Verifier {
            repos: site.repos.clone(),
            state_dir: site.state_dir.clone(),
            libvirt_uri: site.config.libvirt_uri.clone(),
            metrics: Some(metrics.clone()),
            notifier: Some(notifier.clone()),
        };
        verifier.refresh_metrics();
        let background = Background::new(verifier.clone(), site.state.clone());
        let observers: Vec<Arc<dyn Observer>> = vec![
            metrics.clone(),
            hub.clone(),
            refresher.clone(),
            notifier.clone(),
            background.clone(),
        ];
        let runner = Runner::start(
            site.state.clone(),
            site.repos.clone(),
            clock.clone(),
            RunnerOptions {
                concurrent_runs: site.config.limits.concurrent_runs,
                queue: site.config.limits.queue,
                ..RunnerOptions::default()
            },
            observers,
        );
        refresher.refresh_all();
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let scheduler = if schedules {
            let (site, runner, metrics, notifier, clock, stop) = (
                site.clone(),
                runner.clone(),
                metrics.clone(),
                notifier.clone(),
                clock.clone(),
                stop.clone(),
            );
            let verifications = background.clone();
            std::thread::Builder::new()
                .name("scheduler".into())
                .spawn(move || {
                    let parts = Parts {
                        site: &site,
                        runner: &runner,
                        metrics: &metrics,
                        notifier: &notifier,
                        verifications: &verifications,
                    };
                    scheduler_loop(&parts, clock.as_ref(), &stop);
                })
                .map(Some)?
        } else {
            None
        };
        Ok(Self {
            site,
            runner,
            metrics,
            hub,
            notifier,
            verifier,
            clock,
            stop,
            scheduler,
        })
    }

    /// Stops the scheduler, cancels what runs, waits for the workers.
    pub fn stop(mut self) {
        {
            let (lock, cv) = &*self.stop;
            *lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = true;
            cv.notify_all();
        }
        if let Some(t) = self.scheduler.take() {
            let _ = t.join();
        }
        self.runner.shutdown();
        self.notifier.stop();
    }
}

/// Runs the daemon until SIGINT or SIGTERM.
pub fn run(site: Site, listen: Option<SocketAddr>) -> Result<(), DaemonError> {
    let addr = listen.unwrap_or(site.config.listen);
    let limits = site.config.limits.clone();
    let daemon = Daemon::start(site, Arc::new(crate::schedule::SystemClock))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("api")
        .enable_all()
        .build()?;
    let app = api::router(&daemon, &limits);
    let tls = daemon.site.config.tls.clone();
    let served = rt.block_on(async move {
        let listener = std::net::TcpListener::bind(addr)
            .map_err(|source| DaemonError::Listen { addr, source })?;
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(%local, scheme, "repo serve: listening");
        eprintln!("repo serve: listening on {scheme}://{local}");
        match tls {
            None => {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown_signal())
                    .await?;
            }
            Some(t) => {
                // ring, not aws-lc: nothing to build with cmake, one provider per process.
                let _ = rustls::crypto::ring::default_provider().install_default();
                let config =
                    axum_server::tls_rustls::RustlsConfig::from_pem_file(&t.certificate, &t.key)
                        .await
                        .map_err(|e| {
                            DaemonError::Tls(format!(
                                "tls: certificate {} / key {}: {e}",
                                t.certificate.display(),
                                t.key.display()
                            ))
                        })?;
                let handle = axum_server::Handle::new();
                let h = handle.clone();
                tokio::spawn(async move {
                    shutdown_signal().await;
                    h.graceful_shutdown(Some(Duration::from_secs(10)));
                });
                axum_server::from_tcp_rustls(listener, config)
                    .handle(handle)
                    .serve(app.into_make_service())
                    .await?;
            }
        }
        Ok::<_, DaemonError>(())
    });
    tracing::info!("repo serve: stopping");
    daemon.stop();
    rt.shutdown_timeout(Duration::from_secs(5));
    served
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// What a tick works with.
pub struct Parts<'a> {
    pub site: &'a Site,
    pub runner: &'a Runner,
    pub metrics: &'a Metrics,
    pub notifier: &'a Notifier,
    /// Where a verify schedule's slots go.
    pub verifications: &'a Background,
}

fn scheduler_loop(parts: &Parts<'_>, clock: &dyn Clock, stop: &(Mutex<bool>, Condvar)) {
    let site = parts.site;
    loop {
        let now = clock.now();
        let next = match tick(parts, now) {
            Ok(next) => next,
            Err(e) => {
                tracing::error!("scheduler: {e}");
                None
            }
        };
        let mut wait = site.config.tick;
        if let Some(n) = next {
            let until = (n - clock.now()).to_std().unwrap_or(Duration::ZERO);
            wait = wait.min(until + Duration::from_millis(50));
        }
        let (lock, cv) = stop;
        let stopped = lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *stopped {
            return;
        }
        let (stopped, _) = cv
            .wait_timeout(stopped, wait)
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *stopped {
            return;
        }
    }
}

/// One look at the clock: records missed slots, enqueues what is due, updates the
/// schedule metrics; returns when the next thing is due.
pub fn tick(parts: &Parts<'_>, now: DateTime<Utc>) -> crate::state::Result<Option<DateTime<Utc>>> {
    let Parts {
        site,
        runner,
        metrics,
        notifier,
        verifications,
    } = *parts;
    metrics.scheduler_ticks.inc();
    notifier.digests(now);
    let rows = site.state.schedules()?;
    let late = scheduler::late_after(site.config.tick);
    let mut parsed = Vec::new();
    for row in rows {
        let sched = match scheduler::schedule_of_row(&row) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(schedule = %row.id, job = %row.job, "schedule does not parse: {e}");
                continue;
            }
        };
        if !row.enabled {
            parsed.push((row, sched));
            continue;
        }
        let Some(job) = site.state.job(&row.job)?.map(|j| j.definition) else {
            tracing::warn!(schedule = %row.id, job = %row.job, "schedule of a job that does not exist");
            continue;
        };
        let busy = match row.action {
            ScheduleAction::Run => runner.busy(&job.name).is_some(),
            ScheduleAction::Verify => verifications.busy(&job.name),
        };
        let d = scheduler::decide(&row, &sched, now, busy, late);
        for (slot, reason) in &d.missed {
            tracing::warn!(schedule = %row.id, job = %job.name, %slot, "missed run: {reason}");
            site.state.record_missed(&Missed {
                schedule: row.id,
                job: job.name.clone(),
                slot: *slot,
                reason: reason.clone(),
                recorded: now,
            })?;
            metrics
                .missed_runs
                .get_or_create(&JobLabel {
                    job_name: job.name.clone(),
                })
                .inc();
            notifier.missed(&job.name, *slot, reason);
        }
        let mut row = row;
        if let Some(slot) = d.last_slot {
            // Stored before the run is queued: a crash in between never runs it twice.
            site.state.set_last_slot(row.id, slot)?;
            row.last_slot = Some(slot);
        }
        match (d.run, row.action) {
            (None, _) => {}
            (Some(trigger), ScheduleAction::Run) => match runner.submit(&job, trigger) {
                Ok(_) | Err(SubmitError::Busy { .. }) => {}
                Err(e) => {
                    tracing::error!(job = %job.name, "could not queue the scheduled run: {e}")
                }
            },
            (Some(_), ScheduleAction::Verify) => match verifications.verify_newest(&job) {
                Ok(n) => tracing::info!(
                    schedule = %row.id, job = %job.name, "verifying the newest snapshot of {n} sources"
                ),
                Err(e) => {
                    tracing::warn!(schedule = %row.id, job = %job.name, "scheduled verification: {e}")
                }
            },
        }
        parsed.push((row, sched));
    }
    let active = parsed.iter().filter(|(r, _)| r.enabled).count();
    metrics
        .schedules_active
        .set(i64::try_from(active).unwrap_or(i64::MAX));
    metrics
        .schedules_disabled
        .set(i64::try_from(parsed.len() - active).unwrap_or(i64::MAX));
    metrics
        .jobs
        .set(i64::try_from(site.state.jobs()?.len()).unwrap_or(i64::MAX));
    count_recovery_sessions(site, metrics);
    for (row, sched) in parsed.iter().filter(|(r, _)| r.enabled) {
        if let Some(slot) = sched.next_slot(row.last_slot.unwrap_or(now)) {
            let start = sched.start_of(slot, &scheduler::jitter_seed(row));
            #[allow(clippy::cast_precision_loss)]
            metrics
                .schedule_next_run
                .get_or_create(&JobLabel {
                    job_name: row.job.clone(),
                })
                .set(start.timestamp_millis() as f64 / 1000.0);
        }
    }
    Ok(scheduler::next_due(&parsed, now))
}

/// Recovery sessions by kind (`database`, `vm`), from the host state they are kept in.
fn count_recovery_sessions(site: &Site, metrics: &Metrics) {
    let Ok(sessions) = cairn_recover::Store::open(&site.state_dir).and_then(|s| s.list()) else {
        return;
    };
    let vms = sessions.iter().filter(|s| s.is_vm()).count();
    for (kind, n) in [("database", sessions.len() - vms), ("vm", vms)] {
        metrics
            .recovery_sessions
            .get_or_create(&crate::metrics::KindLabel { kind: kind.into() })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

/// Refreshes a repository's metrics after each run of a job on it, on a thread of its
/// own (the figures read the index and the snapshot list, never on a scrape).
struct RepoRefresher {
    site: Arc<Site>,
    metrics: Arc<Metrics>,
}

impl RepoRefresher {
    fn refresh(&self, name: String) {
        let (site, metrics) = (self.site.clone(), self.metrics.clone());
        std::thread::spawn(move || match site.repos.handle(&name) {
            Ok(repo) => {
                let Some(f) = metrics.refresh_repository(&name, &repo) else {
                    return;
                };
                // A point of the repository's growth chart.
                let sample = crate::state::SizeSample {
                    at: chrono::Utc::now(),
                    size_bytes: f.size_bytes,
                    logical_bytes: f.logical_bytes,
                    snapshots: f.snapshots,
                };
                if let Err(e) = site.state.record_size(&name, &sample) {
                    tracing::error!(repository = %name, "recording its size: {e}");
                }
            }
            Err(e) => {
                tracing::warn!(repository = %name, "{e}");
                metrics
                    .repo_up
                    .get_or_create(&crate::metrics::RepoLabel { repository: name })
                    .set(0);
            }
        });
    }

    fn refresh_all(&self) {
        for name in self.site.repos.names() {
            self.refresh(name);
        }
    }
}

impl Observer for RepoRefresher {
    fn on(&self, e: &crate::runner::RunEvent) {
        if let crate::runner::RunEventKind::Finished { stats, .. } = &e.kind {
            if let Ok(Some(job)) = self.site.state.job(&e.job) {
                if let Some(v) = stats.verified {
                    let check = crate::state::CheckRecord {
                        repository: job.definition.repository.clone(),
                        at: chrono::Utc::now(),
                        ok: v,
                        how: job
                            .definition
                            .verify
                            .as_ref()
                            .map_or_else(|| "metadata".to_owned(), |c| c.check.clone()),
                        problems: None,
                        by: crate::job::job_tag(&e.job),
                    };
                    if let Err(err) = self.site.state.record_check(&check) {
                        tracing::error!("recording the check of run {}: {err}", e.run);
                    }
                    self.metrics.checked(&check);
                }
                self.refresh(job.definition.repository);
            }
        }
    }
}
