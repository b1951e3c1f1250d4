//! A site: one host's configuration, state database and repositories, and the
//! operations on jobs and schedules that the CLI (`repo job`, `repo schedule`), the
//! daemon and the API share.
//!
//! Jobs and schedules come from two places: `serve.toml` (origin `config`, read-only
//! elsewhere; brought into the state database each time a site opens, and removed from
//! it once the file no longer has them) and the CLI or API (origin `api`).

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::{RepositoryConfig, ScheduleConfig, ServeConfig};
use crate::job::JobDefinition;
use crate::repos::{self, Repositories};
use crate::schedule::SpecError;
use crate::scheduler::{self, Decision};
use crate::state::{Origin, ScheduleId, ScheduleRow, State, StateError};

#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error(transparent)]
    State(#[from] StateError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Schedule(#[from] SpecError),
    #[error("no job {0:?}")]
    NoJob(String),
    #[error("no schedule {0}")]
    NoSchedule(ScheduleId),
    #[error("job {0:?} already exists (replace it, or remove it first)")]
    JobExists(String),
    #[error("{what} is defined in {file}: change it there")]
    FromConfig { what: String, file: String },
}

pub type Result<T> = std::result::Result<T, SiteError>;

/// A site, open.
pub struct Site {
    pub config: ServeConfig,
    /// Where the configuration came from (for messages).
    pub config_origin: String,
    pub state: Arc<State>,
    pub repos: Arc<Repositories>,
    pub state_dir: PathBuf,
}

/// A schedule with what it means now.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduleView {
    #[serde(flatten)]
    pub row: ScheduleRow,
    /// The next run starts (jitter included).
    pub next: Vec<DateTime<Utc>>,
}

impl Site {
    /// Opens the site `config` describes. `default` is the repository of the command
    /// that opens it (`-r` and its password), used as `default` when the file does not
    /// name one.
    pub fn open(
        mut config: ServeConfig,
        config_origin: &str,
        default: Option<RepositoryConfig>,
    ) -> Result<Self> {
        if let Some(d) = default {
            config
                .repositories
                .entry(repos::DEFAULT.to_owned())
                .or_insert(d);
        }
        let state_dir = config
            .state_dir
            .clone()
            .unwrap_or_else(cairn_engine::host::state_dir);
        let state = Arc::new(State::open(&state_dir)?);
        let known =
            cairn_engine::trust::KnownRepositories::at(state_dir.join("known-repositories.json"));
        let directories = Arc::new(crate::directory::Directories::at(&state_dir));
        let repos = Arc::new(Repositories::new(
            config.repositories.clone(),
            known,
            directories,
        ));
        let site = Self {
            config,
            config_origin: config_origin.to_owned(),
            state,
            repos,
            state_dir,
        };
        site.bring_in_config()?;
        Ok(site)
    }

    /// Brings the file's jobs and schedules into the state database.
    fn bring_in_config(&self) -> Result<()> {
        let now = Utc::now();
        for job in &self.config.jobs {
            if let Some(existing) = self.state.job(&job.name)? {
                if existing.origin == Origin::Api {
                    return Err(SiteError::Invalid(format!(
                        "{}: job {:?} is also defined through the CLI or API; remove one of them (repo job remove {})",
                        self.config_origin, job.name, job.name
                    )));
                }
            }
            self.state.put_job(job, Origin::Config, now)?;
        }
        let mut ids = Vec::new();
        for s in &self.config.schedules {
            let row = schedule_row_of(s, Origin::Config, None)?;
            ids.push(self.state.add_schedule(&row)?);
        }
        let names: Vec<String> = self.config.jobs.iter().map(|j| j.name.clone()).collect();
        self.state.forget_config_items(&names, &ids)?;
        Ok(())
    }

    // --- jobs -------------------------------------------------------------------------

    /// Adds (or with `replace`, replaces) a job of origin `api`.
    pub fn add_job(&self, job: &JobDefinition, replace: bool) -> Result<()> {
        self.check_job(job)?;
        if let Some(existing) = self.state.job(&job.name)? {
            if existing.origin == Origin::Config {
                return Err(self.defined_in_config(format!("job {:?}", job.name)));
            }
            if !replace {
                return Err(SiteError::JobExists(job.name.clone()));
            }
        }
        self.state.put_job(job, Origin::Api, Utc::now())?;
        Ok(())
    }

    /// What `add_job` would refuse in the definition itself: its fields, and
    /// notification targets and a repository this site does not have.
    pub fn check_job(&self, job: &JobDefinition) -> Result<()> {
        job.validate()
            .map_err(|e| SiteError::Invalid(format!("job {:?}: {e}", job.name)))?;
        if let Some(t) = job
            .notify
            .iter()
            .find(|t| !self.config.notifications.contains_key(*t))
        {
            return Err(SiteError::Invalid(format!(
                "job {:?}: notify: no notification target {t:?} in {}",
                job.name, self.config_origin
            )));
        }
        if self.repos.config(&job.repository).is_none() {
            return Err(SiteError::Invalid(format!(
                "job {:?}: repository: no repository {:?} in {}",
                job.name, job.repository, self.config_origin
            )));
        }
        if let Some(c) = &job.copy {
            if self.repos.config(&c.repository).is_none() {
                return Err(SiteError::Invalid(format!(
                    "job {:?}: copy.repository: no repository {:?} in {}",
                    job.name, c.repository, self.config_origin
                )));
            }
        }
        Ok(())
    }

    pub fn job(&self, name: &str) -> Result<JobDefinition> {
        self.state
            .job(name)?
            .map(|j| j.definition)
            .ok_or_else(|| SiteError::NoJob(name.to_owned()))
    }

    /// Removes a job of origin `api` and its schedules.
    pub fn remove_job(&self, name: &str) -> Result<()> {
        let Some(j) = self.state.job(name)? else {
            return Err(SiteError::NoJob(name.to_owned()));
        };
        if j.origin == Origin::Config {
            return Err(self.defined_in_config(format!("job {name:?}")));
        }
        self.state.remove_job(name)?;
        Ok(())
    }

    fn defined_in_config(&self, what: String) -> SiteError {
        SiteError::FromConfig {
            what,
            file: self.config_origin.clone(),
        }
    }

    // --- schedules --------------------------------------------------------------------

    /// Adds a schedule of job `s.job` made through the CLI or the API (validated; the
    /// job must exist). Its first slot is the next one from now.
    pub fn add_schedule(&self, s: &ScheduleConfig) -> Result<ScheduleRow> {
        self.job(&s.job)?;
        let mut row = schedule_row_of(s, Origin::Api, Some(Utc::now()))?;
        row.id = self.state.add_schedule(&row)?;
        Ok(row)
    }

    fn schedule_row(&self, id: ScheduleId) -> Result<ScheduleRow> {
        self.state.schedule(id)?.ok_or(SiteError::NoSchedule(id))
    }

    pub fn remove_schedule(&self, id: ScheduleId) -> Result<()> {
        let row = self.schedule_row(id)?;
        if row.origin == Origin::Config {
            return Err(self.defined_in_config(format!("schedule {id}")));
        }
        self.state.remove_schedule(id)?;
        Ok(())
    }

    /// Enables or disables a schedule (the file's too: that is the state of the host,
    /// not the definition).
    pub fn enable_schedule(&self, id: ScheduleId, enabled: bool) -> Result<()> {
        self.schedule_row(id)?;
        self.state.set_schedule_enabled(id, enabled)?;
        Ok(())
    }

    /// Every schedule with its next `count` run starts after `now`.
    pub fn schedules(&self, now: DateTime<Utc>, count: usize) -> Result<Vec<ScheduleView>> {
        self.state
            .schedules()?
            .into_iter()
            .map(|row| {
                let s = scheduler::schedule_of_row(&row)?;
                let next = if row.enabled {
                    s.preview(now, count, &scheduler::jitter_seed(&row))
                } else {
                    Vec::new()
                };
                Ok(ScheduleView { row, next })
            })
            .collect()
    }

    /// What the scheduler would decide for each enabled schedule at `now`, changing
    /// nothing. `busy` says whether a job has a run queued or running.
    pub fn due(
        &self,
        now: DateTime<Utc>,
        busy: &dyn Fn(&str) -> bool,
    ) -> Result<Vec<(ScheduleRow, Decision)>> {
        let late = scheduler::late_after(self.config.tick);
        let mut out = Vec::new();
        for row in self.state.schedules()?.into_iter().filter(|r| r.enabled) {
            let s = scheduler::schedule_of_row(&row)?;
            let d = scheduler::decide(&row, &s, now, busy(&row.job), late);
            out.push((row, d));
        }
        Ok(out)
    }
}

/// The row a schedule is stored as (validated), not yet numbered.
fn schedule_row_of(
    s: &ScheduleConfig,
    origin: Origin,
    last_slot: Option<DateTime<Utc>>,
) -> Result<ScheduleRow> {
    let sched = scheduler::schedule_of(
        &s.when,
        s.timezone.as_deref(),
        s.jitter.as_deref(),
        s.missed.as_deref(),
    )?;
    Ok(ScheduleRow {
        id: ScheduleId(0),
        job: s.job.clone(),
        when: s.when.clone(),
        timezone: s.timezone.clone(),
        jitter_secs: sched.jitter.as_secs(),
        missed: sched.missed.to_string(),
        enabled: true,
        origin,
        last_slot,
        action: s.action,
    })
}
