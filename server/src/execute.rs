//! One run of a job, start to end, as a library call: back up each source, apply the
//! retention (forget, then prune), verify. The runner, `repo job run` and the API all
//! call [`execute`]; what it says goes to the [`Progress`]'s sink (the run's log).
//!
//! A source that fails does not stop the others: their snapshots stay, the run fails
//! and names what failed, and the retention is skipped (a failed night must never make
//! the forget drop a good old snapshot in favour of nothing). A cancel stops at the next
//! file or chunk and commits nothing of the source being read.

use std::time::{Duration, Instant};

use cairn_agent::source::{self, Labels, Source};
use cairn_engine::forget::{self, GroupBy};
use cairn_engine::lock::LockKind;
use cairn_engine::progress::{Level, Progress};
use cairn_engine::snapshot::SnapshotFilter;
use cairn_engine::{ErrorKind, Repository};

use crate::job::{job_tag, JobDefinition};
use crate::state::RunStats;

/// How a run ended when it did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cancelled")]
    Cancelled { stats: RunStats },
    #[error("{error}")]
    Failed { error: String, stats: RunStats },
}

impl RunError {
    #[must_use]
    pub fn stats(&self) -> &RunStats {
        match self {
            Self::Cancelled { stats } | Self::Failed { stats, .. } => stats,
        }
    }
}

/// Options of a run that are not part of the job.
#[derive(Debug, Clone, Copy)]
pub struct RunOptions {
    /// How long to wait for another process's exclusive lock (a prune).
    pub lock_wait: Duration,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            lock_wait: Duration::from_secs(3600),
        }
    }
}

/// Opens another repository of the site by name (the destination of a job's `copy`).
pub type OpenRepository<'a> = &'a dyn Fn(&str) -> Result<Repository, String>;

/// Runs `job` once against `repo` (a handle of this run's own: it takes the locks);
/// `open` opens the repository its `copy` names.
pub fn execute(
    job: &JobDefinition,
    repo: &Repository,
    progress: &Progress,
    opts: RunOptions,
    open: OpenRepository<'_>,
) -> Result<RunStats, RunError> {
    let started = Instant::now();
    let mut stats = RunStats::default();
    let fail = |error: String, mut stats: RunStats| {
        stats.duration_ms = elapsed_ms(started);
        RunError::Failed { error, stats }
    };
    if let Err(e) = repo.lock(
        LockKind::Shared,
        &format!("job {}", job.name),
        opts.lock_wait,
    ) {
        return Err(fail(format!("locking the repository: {e}"), stats));
    }
    let failures = backup_sources(job, repo, progress, &mut stats);
    if progress.is_cancelled() {
        stats.duration_ms = elapsed_ms(started);
        return Err(RunError::Cancelled { stats });
    }
    if !failures.is_empty() {
        let error = format!(
            "{} of {} sources failed: {}",
            failures.len(),
            job.sources.len(),
            failures.join("; ")
        );
        if job.retention.is_some() {
            progress.say(Level::Warn, "retention skipped: the run failed");
        }
        return Err(fail(error, stats));
    }
    if let Err(e) = apply_retention(job, repo, progress, opts, &mut stats) {
        return Err(fail(format!("retention: {e}"), stats));
    }
    if let Err(e) = verify(job, repo, progress, &mut stats) {
        return Err(fail(e, stats));
    }
    if let Err(e) = copy(job, repo, progress, opts, open, &mut stats) {
        return Err(fail(format!("copy: {e}"), stats));
    }
    stats.duration_ms = elapsed_ms(started);
    Ok(stats)
}

fn elapsed_ms(since: Instant) -> u64 {
    since.elapsed().as_millis().try_into().unwrap_or(u64::MAX)
}

/// The labels every snapshot of the job carries.
#[must_use]
pub fn labels(job: &JobDefinition) -> Labels {
    Labels {
        host: job.host.clone(),
        tags: job.snapshot_tags(),
        ..Labels::default()
    }
}

/// Backs up every source in turn; returns what failed, one line each.
fn backup_sources(
    job: &JobDefinition,
    repo: &Repository,
    progress: &Progress,
    stats: &mut RunStats,
) -> Vec<String> {
    let labels = labels(job);
    let mut failures = Vec::new();
    for source in &job.sources {
        if progress.is_cancelled() {
            break;
        }
        progress.say(Level::Info, format!("backing up {}", source.describe()));
        match source::backup(repo, source, &labels, progress) {
            Ok(made) => {
                for o in &made.outcomes {
                    add_snapshot(stats, o);
                    progress.say(
                        Level::Info,
                        format!(
                            "snapshot {} of {}: {} files, {} new",
                            o.snapshot.id.short(),
                            o.snapshot.manifest.source_label(),
                            o.snapshot.manifest.summary.files,
                            cairn_engine::progress::human_bytes(
                                o.snapshot.manifest.summary.bytes_stored
                            )
                        ),
                    );
                    for w in &o.warnings {
                        progress.say(Level::Warn, format!("{}: {}", w.path.display(), w.message));
                    }
                }
                for f in &made.failures {
                    failures.push(format!("{}: {}", f.what, f.error));
                    progress.say(Level::Error, format!("{}: {}", f.what, f.error));
                }
            }
            Err(e) if is_cancel(&e) => break,
            Err(e) => {
                let line = format!("{}: {e}", source.describe());
                progress.say(Level::Error, line.clone());
                failures.push(line);
            }
        }
    }
    failures
}

fn is_cancel(e: &source::SourceError) -> bool {
    e.engine().is_some_and(|e| e.kind() == ErrorKind::Cancelled)
}

fn add_snapshot(stats: &mut RunStats, o: &cairn_engine::backup::BackupOutcome) {
    let s = &o.snapshot.manifest.summary;
    stats.files += s.files;
    stats.total_bytes += s.total_bytes;
    stats.bytes_read += s.bytes_read;
    stats.bytes_new += s.bytes_new;
    stats.bytes_stored += s.bytes_stored;
    stats.snapshots.push(o.snapshot.id.to_string());
}

/// Forgets what the job's keep policy does not keep (its own snapshots only, by host
/// and source), then prunes if asked.
fn apply_retention(
    job: &JobDefinition,
    repo: &Repository,
    progress: &Progress,
    opts: RunOptions,
    stats: &mut RunStats,
) -> Result<(), String> {
    let Some(retention) = &job.retention else {
        return Ok(());
    };
    let policy = retention.policy()?;
    let all = repo.snapshots().map_err(|e| e.to_string())?;
    let filter = SnapshotFilter {
        tags: vec![job_tag(&job.name)],
        ..SnapshotFilter::default()
    };
    let plan = forget::plan_policy(&all, &policy, &[GroupBy::Host, GroupBy::Source], &filter)
        .map_err(|e| e.to_string())?;
    let removed = forget::apply(repo, &plan).map_err(|e| e.to_string())?;
    stats.forgotten = removed as u64;
    progress.say(
        Level::Info,
        format!(
            "retention: forgot {removed} of {} snapshots",
            plan.decisions.len()
        ),
    );
    if retention.prune && removed > 0 {
        let report = cairn_engine::prune::prune(
            repo,
            &cairn_engine::prune::PruneOptions {
                lock_wait: opts.lock_wait,
                ..Default::default()
            },
        )
        .map_err(|e| format!("prune: {e}"))?;
        for w in &report.warnings {
            progress.say(Level::Warn, w.clone());
        }
        progress.say(
            Level::Info,
            format!(
                "prune: freed {}",
                cairn_engine::progress::human_bytes(report.bytes_freed)
            ),
        );
    }
    Ok(())
}

/// Checks the repository as the job asks.
fn verify(
    job: &JobDefinition,
    repo: &Repository,
    progress: &Progress,
    stats: &mut RunStats,
) -> Result<(), String> {
    let Some(v) = &job.verify else {
        return Ok(());
    };
    let opts = v.options()?;
    progress.say(Level::Info, format!("verifying ({})", v.check));
    let report = cairn_engine::check::check(repo, &opts, &Progress::default())
        .map_err(|e| format!("verify: {e}"))?;
    stats.verified = Some(report.ok());
    if !report.ok() {
        for p in report.problems.iter().take(20) {
            progress.say(Level::Error, format!("verify: {}: {}", p.object, p.message));
        }
        return Err(format!(
            "verify: {} problems found in the repository",
            report.problems.len()
        ));
    }
    progress.say(Level::Info, "verify: no problem found");
    Ok(())
}

/// Copies the job's snapshots (the newest `latest` of each source, or all) to the
/// repository its `copy` names; those copied before are skipped.
fn copy(
    job: &JobDefinition,
    repo: &Repository,
    progress: &Progress,
    opts: RunOptions,
    open: OpenRepository<'_>,
    stats: &mut RunStats,
) -> Result<(), String> {
    let Some(c) = &job.copy else {
        return Ok(());
    };
    let to = open(&c.repository).map_err(|e| format!("repository {:?}: {e}", c.repository))?;
    to.lock(
        LockKind::Shared,
        &format!("copy of job {}", job.name),
        opts.lock_wait,
    )
    .map_err(|e| format!("locking repository {:?}: {e}", c.repository))?;
    let filter = SnapshotFilter {
        tags: vec![job_tag(&job.name)],
        ..SnapshotFilter::default()
    };
    let mut chosen: Vec<_> = repo
        .snapshots()
        .map_err(|e| e.to_string())?
        .into_iter()
        .filter(|s| filter.matches(&s.manifest))
        .collect();
    if let Some(n) = c.latest {
        chosen = cairn_engine::copy::newest_of_each_source(chosen, n);
    }
    progress.say(
        Level::Info,
        format!("copying {} snapshots to {:?}", chosen.len(), c.repository),
    );
    let report =
        cairn_engine::copy::copy_snapshots(repo, &to, &chosen).map_err(|e| e.to_string())?;
    stats.copied = report.copied.len() as u64;
    progress.say(
        Level::Info,
        format!(
            "copy: {} snapshots copied to {:?} ({} copied before), {} blobs new, {} stored",
            report.copied.len(),
            c.repository,
            report.skipped.len(),
            report.blobs_new,
            cairn_engine::progress::human_bytes(report.bytes_stored)
        ),
    );
    Ok(())
}

/// What a run would do, without doing it: every source checked as far as it can be
/// without reading it, and the snapshots the retention would forget now.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct DryRun {
    pub sources: Vec<DrySource>,
    /// Snapshot ids the retention would forget if run now (before this run's own).
    pub would_forget: Vec<String>,
    pub would_prune: bool,
    pub verify: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct DrySource {
    pub source: String,
    /// Why it would fail, if it visibly would.
    pub problem: Option<String>,
}

/// Plans a run of `job` on `repo` (read only: no lock is written).
pub fn dry_run(job: &JobDefinition, repo: &Repository) -> Result<DryRun, String> {
    let sources = job
        .sources
        .iter()
        .map(|s| DrySource {
            source: s.describe(),
            problem: visible_problem(s),
        })
        .collect();
    let mut plan = DryRun {
        sources,
        verify: job.verify.as_ref().map(|v| v.check.clone()),
        ..DryRun::default()
    };
    if let Some(r) = &job.retention {
        let all = repo.snapshots().map_err(|e| e.to_string())?;
        let filter = SnapshotFilter {
            tags: vec![job_tag(&job.name)],
            ..SnapshotFilter::default()
        };
        let p = forget::plan_policy(
            &all,
            &r.policy()?,
            &[GroupBy::Host, GroupBy::Source],
            &filter,
        )
        .map_err(|e| e.to_string())?;
        plan.would_forget = p.removed().map(|d| d.id.to_string()).collect();
        plan.would_prune = r.prune;
    }
    Ok(plan)
}

/// What is visibly wrong with a source before reading it: a path or image that is not
/// there.
fn visible_problem(s: &Source) -> Option<String> {
    match s {
        Source::Paths { paths, .. } => paths
            .iter()
            .find(|p| std::fs::symlink_metadata(p).is_err())
            .map(|p| format!("{} does not exist", p.display())),
        Source::Image { path, .. } => {
            (!path.exists()).then(|| format!("{} does not exist", path.display()))
        }
        _ => None,
    }
}
