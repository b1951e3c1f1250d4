//! Job runs: a queue, a global limit on runs at once, one run per job at a time, and
//! cancel. Each run executes on a worker thread of its own (never on an async runtime
//! worker), is recorded in the host state from queued to finished, writes its log
//! there, and tells [`Observer`]s (metrics, server-sent events, notifications) what
//! happens, as it happens.
//!
//! A run that panics is recorded as failed with the panic's message: a worker never
//! dies with a run left "running".

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use cairn_engine::progress::{Event, EventSink, Level, Progress, Sample, Ticker};
use serde::Serialize;

use crate::execute::{self, RunError, RunOptions};
use crate::job::JobDefinition;
use crate::repos::Repositories;
use crate::schedule::Clock;
use crate::state::{RunId, RunStats, RunStatus, RunTrigger, State};

/// Something that happened to a run.
#[derive(Debug, Clone, Serialize)]
pub struct RunEvent {
    pub run: RunId,
    pub job: String,
    #[serde(flatten)]
    pub kind: RunEventKind,
}

#[derive(Debug, Clone, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum RunEventKind {
    Queued {
        trigger: RunTrigger,
    },
    Started,
    Progress(Sample),
    Message {
        level: Level,
        text: String,
    },
    Finished {
        status: RunStatus,
        error: Option<String>,
        stats: RunStats,
    },
}

/// Hears about every run's events, in order for each run. Called on the run's threads,
/// and for `Queued` with the queue held: keep it short and never call the runner back.
pub trait Observer: Send + Sync {
    fn on(&self, event: &RunEvent);
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("job {job:?} already has run {run} queued or running")]
    Busy { job: String, run: RunId },
    #[error("the queue is full ({0} runs waiting)")]
    QueueFull(usize),
    #[error("the runner is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    State(#[from] crate::state::StateError),
}

/// How the runner works.
#[derive(Debug, Clone, Copy)]
pub struct RunnerOptions {
    pub concurrent_runs: usize,
    pub queue: usize,
    pub run: RunOptions,
    /// How often a running job's progress is sampled into events.
    pub progress_interval: Duration,
}

impl Default for RunnerOptions {
    fn default() -> Self {
        Self {
            concurrent_runs: 2,
            queue: 64,
            run: RunOptions::default(),
            progress_interval: Duration::from_secs(1),
        }
    }
}

struct Waiting {
    id: RunId,
    job: JobDefinition,
}

struct Active {
    job: String,
    progress: Arc<Progress>,
    last: Arc<Mutex<Option<Sample>>>,
}

#[derive(Default)]
struct Queue {
    waiting: VecDeque<Waiting>,
    running: HashMap<RunId, Active>,
    stopping: bool,
}

struct Inner {
    state: Arc<State>,
    repos: Arc<Repositories>,
    clock: Arc<dyn Clock>,
    opts: RunnerOptions,
    observers: Vec<Arc<dyn Observer>>,
    queue: Mutex<Queue>,
    changed: Condvar,
}

/// The runner (cheap to clone: every clone is the same runner).
#[derive(Clone)]
pub struct Runner {
    inner: Arc<Inner>,
    workers: Arc<Mutex<Vec<std::thread::JoinHandle<()>>>>,
}

impl Runner {
    /// Starts `opts.concurrent_runs` workers.
    #[must_use]
    pub fn start(
        state: Arc<State>,
        repos: Arc<Repositories>,
        clock: Arc<dyn Clock>,
        opts: RunnerOptions,
        observers: Vec<Arc<dyn Observer>>,
    ) -> Self {
        let inner = Arc::new(Inner {
            state,
            repos,
            clock,
            opts,
            observers,
            queue: Mutex::new(Queue::default()),
            changed: Condvar::new(),
        });
        let workers = (0..opts.concurrent_runs.max(1))
            .map(|i| {
                let inner = inner.clone();
                std::thread::Builder::new()
                    .name(format!("run-worker-{i}"))
                    .spawn(move || worker(&inner))
                    .expect("spawning a run worker")
            })
            .collect();
        Self {
            inner,
            workers: Arc::new(Mutex::new(workers)),
        }
    }

    /// Queues a run of `job`; refused while the job has one queued or running.
    pub fn submit(&self, job: &JobDefinition, trigger: RunTrigger) -> Result<RunId, SubmitError> {
        let mut q = self.inner.lock();
        if q.stopping {
            return Err(SubmitError::ShuttingDown);
        }
        if let Some(run) = busy_run(&q, &job.name) {
            return Err(SubmitError::Busy {
                job: job.name.clone(),
                run,
            });
        }
        if q.waiting.len() >= self.inner.opts.queue {
            return Err(SubmitError::QueueFull(q.waiting.len()));
        }
        let id = self
            .inner
            .state
            .create_run(&job.name, trigger, self.inner.clock.now())?;
        tracing::info!(job = %job.name, run = %id, trigger = trigger.as_str(), "run queued");
        // Told before a worker can see the run: `Queued` always comes before `Started`.
        self.inner.tell(&RunEvent {
            run: id,
            job: job.name.clone(),
            kind: RunEventKind::Queued { trigger },
        });
        q.waiting.push_back(Waiting {
            id,
            job: job.clone(),
        });
        drop(q);
        self.inner.changed.notify_all();
        Ok(id)
    }

    /// Whether job `name` has a run queued or running, and which.
    #[must_use]
    pub fn busy(&self, name: &str) -> Option<RunId> {
        busy_run(&self.inner.lock(), name)
    }

    /// Cancels run `id`: a queued run is dropped (recorded cancelled), a running one is
    /// asked to stop at its next file or chunk. False if it is neither.
    pub fn cancel(&self, id: RunId) -> bool {
        let mut q = self.inner.lock();
        if let Some(a) = q.running.get(&id) {
            tracing::info!(job = %a.job, run = %id, "cancelling a running run");
            a.progress.cancel();
            return true;
        }
        let Some(pos) = q.waiting.iter().position(|w| w.id == id) else {
            return false;
        };
        let w = q.waiting.remove(pos).expect("position is in range");
        drop(q);
        self.inner.finish(
            id,
            &w.job.name,
            RunStatus::Cancelled,
            Some("cancelled before it started"),
            &RunStats::default(),
        );
        true
    }

    /// The runs queued and running now: (run, job, running?).
    #[must_use]
    pub fn active(&self) -> Vec<(RunId, String, bool)> {
        let q = self.inner.lock();
        let mut v: Vec<_> = q
            .running
            .iter()
            .map(|(id, a)| (*id, a.job.clone(), true))
            .collect();
        v.sort_by_key(|r| r.0);
        v.extend(q.waiting.iter().map(|w| (w.id, w.job.name.clone(), false)));
        v
    }

    /// The latest progress of a running run.
    #[must_use]
    pub fn live(&self, id: RunId) -> Option<Sample> {
        let q = self.inner.lock();
        let a = q.running.get(&id)?;
        let last = a.last.lock().ok()?.clone();
        last
    }

    /// Waits until nothing is queued or running (tests, `repo job run`).
    pub fn wait_idle(&self) {
        let mut q = self.inner.lock();
        while !(q.waiting.is_empty() && q.running.is_empty()) {
            q = self
                .inner
                .changed
                .wait(q)
                .unwrap_or_else(std::sync::PoisonError::into_inner);
        }
    }

    /// Stops: queued runs are cancelled, running ones asked to stop, workers joined.
    pub fn shutdown(&self) {
        let waiting: Vec<Waiting> = {
            let mut q = self.inner.lock();
            q.stopping = true;
            for a in q.running.values() {
                a.progress.cancel();
            }
            q.waiting.drain(..).collect()
        };
        for w in waiting {
            self.inner.finish(
                w.id,
                &w.job.name,
                RunStatus::Cancelled,
                Some("the daemon stopped before it started"),
                &RunStats::default(),
            );
        }
        self.inner.changed.notify_all();
        let workers: Vec<_> = self
            .workers
            .lock()
            .map(|mut w| w.drain(..).collect())
            .unwrap_or_default();
        for w in workers {
            let _ = w.join();
        }
    }
}

fn busy_run(q: &Queue, name: &str) -> Option<RunId> {
    q.running
        .iter()
        .find(|(_, a)| a.job == name)
        .map(|(id, _)| *id)
        .or_else(|| q.waiting.iter().find(|w| w.job.name == name).map(|w| w.id))
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Queue> {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn tell(&self, event: &RunEvent) {
        for o in &self.observers {
            o.on(event);
        }
    }

    /// Records the end of a run and tells the observers.
    fn finish(
        &self,
        id: RunId,
        job: &str,
        status: RunStatus,
        error: Option<&str>,
        stats: &RunStats,
    ) {
        if let Err(e) = self
            .state
            .finish_run(id, status, error, stats, self.clock.now())
        {
            tracing::error!(job, run = %id, "recording the end of the run: {e}");
        }
        tracing::info!(job, run = %id, status = status.as_str(), error, "run finished");
        self.tell(&RunEvent {
            run: id,
            job: job.to_owned(),
            kind: RunEventKind::Finished {
                status,
                error: error.map(str::to_owned),
                stats: stats.clone(),
            },
        });
    }
}

fn worker(inner: &Arc<Inner>) {
    loop {
        let (next, progress, sink) = {
            let mut q = inner.lock();
            loop {
                if q.stopping {
                    return;
                }
                if let Some(w) = q.waiting.pop_front() {
                    let last = Arc::new(Mutex::new(None));
                    let sink = Arc::new(RunSink {
                        inner: inner.clone(),
                        run: w.id,
                        job: w.job.name.clone(),
                        repository: w.job.repository.clone(),
                        last: last.clone(),
                    });
                    let progress = Arc::new(Progress::with_sink(sink.clone()));
                    q.running.insert(
                        w.id,
                        Active {
                            job: w.job.name.clone(),
                            progress: progress.clone(),
                            last,
                        },
                    );
                    break (w, progress, sink);
                }
                q = inner
                    .changed
                    .wait(q)
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
            }
        };
        run_one(inner, &next, &progress, sink);
        inner.lock().running.remove(&next.id);
        inner.changed.notify_all();
    }
}

/// The sink of one run: messages to its log and the observers, samples to the
/// observers and the live view.
struct RunSink {
    inner: Arc<Inner>,
    run: RunId,
    job: String,
    repository: String,
    last: Arc<Mutex<Option<Sample>>>,
}

impl EventSink for RunSink {
    fn event(&self, event: &Event) {
        let kind = match event {
            Event::Progress(s) => {
                if let Ok(mut l) = self.last.lock() {
                    *l = Some(s.clone());
                }
                RunEventKind::Progress(s.clone())
            }
            Event::Message { level, text } => {
                let lvl = match level {
                    Level::Info => "info",
                    Level::Warn => "warn",
                    Level::Error => "error",
                };
                match level {
                    Level::Info => {
                        tracing::info!(job = %self.job, run = %self.run, repository = %self.repository, "{text}")
                    }
                    Level::Warn => {
                        tracing::warn!(job = %self.job, run = %self.run, repository = %self.repository, "{text}")
                    }
                    Level::Error => {
                        tracing::error!(job = %self.job, run = %self.run, repository = %self.repository, "{text}")
                    }
                }
                if let Err(e) =
                    self.inner
                        .state
                        .append_log(self.run, self.inner.clock.now(), lvl, text)
                {
                    tracing::error!(run = %self.run, "writing the run's log: {e}");
                }
                RunEventKind::Message {
                    level: *level,
                    text: text.clone(),
                }
            }
        };
        self.inner.tell(&RunEvent {
            run: self.run,
            job: self.job.clone(),
            kind,
        });
    }
}

fn run_one(inner: &Arc<Inner>, w: &Waiting, progress: &Arc<Progress>, sink: Arc<RunSink>) {
    let job = &w.job;
    if let Err(e) = inner
        .state
        .start_run(w.id, std::process::id(), inner.clock.now())
    {
        tracing::error!(job = %job.name, run = %w.id, "recording the start: {e}");
    }
    inner.tell(&RunEvent {
        run: w.id,
        job: job.name.clone(),
        kind: RunEventKind::Started,
    });
    let ticker = Ticker::start(progress.clone(), inner.opts.progress_interval, sink);
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let repo = inner
            .repos
            .handle(&job.repository)
            .map_err(|e| RunError::Failed {
                error: e.to_string(),
                stats: RunStats::default(),
            })?;
        let open = |name: &str| inner.repos.handle(name).map_err(|e| e.to_string());
        execute::execute(job, &repo, progress, inner.opts.run, &open)
    }));
    ticker.finish();
    match result {
        Ok(Ok(stats)) => inner.finish(w.id, &job.name, RunStatus::Succeeded, None, &stats),
        Ok(Err(RunError::Cancelled { stats })) => inner.finish(
            w.id,
            &job.name,
            RunStatus::Cancelled,
            Some("cancelled"),
            &stats,
        ),
        Ok(Err(RunError::Failed { error, stats })) => {
            inner.finish(w.id, &job.name, RunStatus::Failed, Some(&error), &stats);
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                .unwrap_or_else(|| "a panic".into());
            inner.finish(
                w.id,
                &job.name,
                RunStatus::Failed,
                Some(&format!("internal error: {what}")),
                &RunStats::default(),
            );
        }
    }
}
