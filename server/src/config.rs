//! `serve.toml`: what the daemon listens on, which repositories it serves, its limits,
//! its notification targets, and jobs and schedules declared in the file.
//!
//! Every field has a default; no file at all is a valid configuration (127.0.0.1:8087,
//! the repository the command line would use, two runs at once). Unknown fields are
//! errors that name the field. The documented example is `docs/SERVE.md`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::job::JobDefinition;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn invalid(path: &Path, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.display().to_string(),
        message: message.into(),
    }
}

/// A repository the daemon serves, and how the daemon finds its password.
#[derive(Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    pub path: PathBuf,
    /// A file whose first line is the password.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// A program (argument vector) that prints it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_command: Option<Vec<String>>,
    /// An environment variable holding it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password_env: Option<String>,
    /// Given by the command line that started the daemon (never written out).
    #[serde(skip)]
    pub inline: Option<Zeroizing<Vec<u8>>>,
}

impl std::fmt::Debug for RepositoryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RepositoryConfig")
            .field("path", &self.path)
            .field("password_file", &self.password_file)
            .field("password_command", &self.password_command)
            .field("password_env", &self.password_env)
            .field("inline", &self.inline.as_ref().map(|_| "(hidden)"))
            .finish()
    }
}

impl RepositoryConfig {
    /// The password now.
    pub fn read_password(&self) -> Result<Zeroizing<Vec<u8>>, String> {
        if let Some(p) = &self.inline {
            return Ok(p.clone());
        }
        if let Some(f) = &self.password_file {
            let text = Zeroizing::new(
                std::fs::read_to_string(f).map_err(|e| format!("{}: {e}", f.display()))?,
            );
            let line = text.lines().next().unwrap_or("");
            return Ok(Zeroizing::new(line.as_bytes().to_vec()));
        }
        if let Some(argv) = &self.password_command {
            let (program, args) = argv
                .split_first()
                .ok_or_else(|| "password_command is empty".to_owned())?;
            let out = std::process::Command::new(program)
                .args(args)
                .stdin(std::process::Stdio::null())
                .output()
                .map_err(|e| format!("running {program}: {e}"))?;
            if !out.status.success() {
                return Err(format!("{program} failed ({})", out.status));
            }
            let text = Zeroizing::new(String::from_utf8_lossy(&out.stdout).into_owned());
            return Ok(Zeroizing::new(
                text.lines().next().unwrap_or("").as_bytes().to_vec(),
            ));
        }
        if let Some(var) = &self.password_env {
            return std::env::var_os(var)
                .map(|v| Zeroizing::new(v.into_encoded_bytes()))
                .ok_or_else(|| format!("the environment variable {var} is not set"));
        }
        Err("no password_file, password_command or password_env".into())
    }
}

/// TLS: a certificate chain and its key, PEM.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub certificate: PathBuf,
    pub key: PathBuf,
}

/// How many runs at once, and how many may wait.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Runs executing at once (one per job in any case).
    pub concurrent_runs: usize,
    /// Runs waiting for a slot; more are refused (and a scheduled one counts as missed).
    pub queue: usize,
    /// The largest request body the API accepts, in bytes.
    pub max_body_bytes: usize,
    /// How long a request may take to arrive and be answered (not SSE streams).
    #[serde(with = "humantime_secs")]
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            concurrent_runs: 2,
            queue: 64,
            max_body_bytes: 1 << 20,
            request_timeout: Duration::from_secs(60),
        }
    }
}

/// How long run history is kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct History {
    /// Runs older than this are removed (with their logs).
    pub keep_days: u32,
    /// At most this many runs per job are kept.
    pub keep_runs_per_job: u32,
}

impl Default for History {
    fn default() -> Self {
        Self {
            keep_days: 90,
            keep_runs_per_job: 1000,
        }
    }
}

/// When a target is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum Trigger {
    Failure,
    Success,
    Missed,
    VerificationFailure,
}

/// A notification target.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum TargetKind {
    Email {
        /// `smtp://host:port` (plain, or STARTTLS when offered), `smtps://host:port`.
        server: String,
        from: String,
        to: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        username: Option<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        password_file: Option<PathBuf>,
        /// `en` or `fr`.
        #[serde(default = "default_language")]
        language: String,
    },
    Webhook {
        url: String,
        /// A file holding the HMAC-SHA256 key: the body's signature goes in
        /// `X-Cairn-Signature: sha256=<hex>`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        secret_file: Option<PathBuf>,
    },
}

fn default_language() -> String {
    "en".into()
}

/// (`deny_unknown_fields` lives on the flattened kind: serde cannot enforce it on a
/// struct with a flattened field, and the kind sees every field the struct does not take.)
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Target {
    #[serde(flatten)]
    pub kind: TargetKind,
    /// What this target hears about; failures and missed runs by default.
    #[serde(default = "default_triggers")]
    pub on: Vec<Trigger>,
    /// A summary of the last day or week of runs: `daily HH:MM` / `weekly DAY:HH:MM`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

fn default_triggers() -> Vec<Trigger> {
    vec![
        Trigger::Failure,
        Trigger::Missed,
        Trigger::VerificationFailure,
    ]
}

/// A schedule declared in the file.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScheduleConfig {
    pub job: String,
    /// `daily 02:00`, `weekly sunday:03:00`, a cron expression, `mon..fri 22:30`.
    pub when: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timezone: Option<String>,
    /// A random delay after each slot: `10m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter: Option<String>,
    /// `run-once` (default) or `skip`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub missed: Option<String>,
    /// `run` (default): run the job; `verify`: verify the newest snapshot of each of
    /// its sources (the job's `[verify.snapshots]` says how).
    #[serde(default)]
    pub action: crate::state::ScheduleAction,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Host state (jobs, runs, tokens, audit log): `/var/lib/cairn` as root, else
    /// `~/.local/state/cairn`, unless given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
    pub repositories: BTreeMap<String, RepositoryConfig>,
    pub limits: Limits,
    pub history: History,
    pub notifications: BTreeMap<String, Target>,
    /// Jobs declared here are read-only through the API.
    #[serde(rename = "job")]
    pub jobs: Vec<JobDefinition>,
    #[serde(rename = "schedule")]
    pub schedules: Vec<ScheduleConfig>,
    /// How often the scheduler looks at the clock when nothing is due sooner.
    #[serde(with = "humantime_secs")]
    pub tick: Duration,
    /// The hypervisor the API's VM operations and VM recoveries use
    /// (`qemu:///system` when left out).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub libvirt_uri: Option<String>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8087)),
            tls: None,
            state_dir: None,
            repositories: BTreeMap::new(),
            limits: Limits::default(),
            history: History::default(),
            notifications: BTreeMap::new(),
            jobs: Vec::new(),
            schedules: Vec::new(),
            tick: Duration::from_secs(30),
            libvirt_uri: None,
        }
    }
}

/// The default configuration file.
pub const DEFAULT_PATH: &str = "/etc/cairn/serve.toml";

impl ServeConfig {
    /// Reads `path`; a missing file at the default path is the default configuration.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let (path, required) = match path {
            Some(p) => (p.to_owned(), true),
            None => (PathBuf::from(DEFAULT_PATH), false),
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Self::default());
            }
            Err(e) => {
                return Err(ConfigError::Read {
                    path: path.display().to_string(),
                    source: e,
                })
            }
        };
        Self::parse(&text, &path)
    }

    /// Reads a configuration's text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|e| invalid(origin, e.to_string()))?;
        config.validate(origin)?;
        Ok(config)
    }

    fn validate(&self, origin: &Path) -> Result<(), ConfigError> {
        if self.limits.concurrent_runs == 0 {
            return Err(invalid(origin, "limits.concurrent_runs: at least 1"));
        }
        for (name, t) in &self.notifications {
            if let Some(d) = &t.digest {
                crate::schedule::Spec::parse(d)
                    .map_err(|e| invalid(origin, format!("notifications.{name}.digest: {e}")))?;
            }
            match &t.kind {
                TargetKind::Email { to, language, .. } => {
                    if to.is_empty() {
                        return Err(invalid(
                            origin,
                            format!("notifications.{name}.to: at least one address"),
                        ));
                    }
                    if language != "en" && language != "fr" {
                        return Err(invalid(
                            origin,
                            format!("notifications.{name}.language: en or fr"),
                        ));
                    }
                }
                TargetKind::Webhook { url, .. } => {
                    if !(url.starts_with("http://") || url.starts_with("https://")) {
                        return Err(invalid(
                            origin,
                            format!("notifications.{name}.url: an http:// or https:// URL"),
                        ));
                    }
                }
            }
        }
        for job in &self.jobs {
            job.validate()
                .map_err(|e| invalid(origin, format!("job {:?}: {e}", job.name)))?;
            for t in &job.notify {
                if !self.notifications.contains_key(t) {
                    return Err(invalid(
                        origin,
                        format!("job {:?}: notify: no notification target {t:?}", job.name),
                    ));
                }
            }
        }
        for (i, s) in self.schedules.iter().enumerate() {
            if !self.jobs.iter().any(|j| j.name == s.job) {
                return Err(invalid(
                    origin,
                    format!(
                        "schedule {}: job {:?} is not declared in this file",
                        i + 1,
                        s.job
                    ),
                ));
            }
            crate::scheduler::schedule_of(
                &s.when,
                s.timezone.as_deref(),
                s.jitter.as_deref(),
                s.missed.as_deref(),
            )
            .map_err(|e| invalid(origin, format!("schedule {} ({}): {e}", i + 1, s.job)))?;
        }
        Ok(())
    }

    /// The state directory in use.
    #[must_use]
    pub fn state_dir(&self) -> PathBuf {
        self.state_dir
            .clone()
            .unwrap_or_else(cairn_engine::host::state_dir)
    }
}

/// Durations as whole seconds, or `30s`/`5m` strings.
mod humantime_secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}s", d.as_secs()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Secs(n) => Ok(Duration::from_secs(n)),
            Raw::Text(t) => crate::schedule::parse_duration(&t).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_file_is_the_default_and_binds_to_localhost() {
        let c = ServeConfig::parse("", Path::new("serve.toml")).unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:8087");
        assert_eq!(c.limits.concurrent_runs, 2);
    }

    #[test]
    fn a_full_file_reads() {
        let text = r#"
listen = "127.0.0.1:9000"
tick = "10s"
[limits]
concurrent_runs = 3
[repositories.main]
path = "/srv/repo"
password_file = "/etc/cairn/main.pass"
[notifications.ops]
type = "email"
server = "smtp://127.0.0.1:2525"
from = "cairn@example.org"
to = ["ops@example.org"]
language = "fr"
on = ["failure", "missed"]
digest = "daily 08:00"
[notifications.hook]
type = "webhook"
url = "http://127.0.0.1:9999/hook"
[[job]]
name = "etc"
repository = "main"
notify = ["ops", "hook"]
[[job.source]]
type = "paths"
paths = ["/etc"]
[job.retention]
keep_daily = 7
[[schedule]]
job = "etc"
when = "daily 02:00"
timezone = "Europe/Paris"
jitter = "10m"
"#;
        let c = ServeConfig::parse(text, Path::new("serve.toml")).unwrap();
        assert_eq!(c.tick, Duration::from_secs(10));
        assert_eq!(c.jobs[0].sources.len(), 1);
        assert_eq!(
            c.notifications["ops"].on,
            vec![Trigger::Failure, Trigger::Missed]
        );
    }

    #[test]
    fn errors_name_the_field() {
        for (text, needle) in [
            ("lissen = \"127.0.0.1:1\"", "lissen"),
            ("[limits]\nconcurrent_runs = 0", "concurrent_runs"),
            ("[[schedule]]\njob = \"x\"\nwhen = \"daily 02:00\"", "job \"x\" is not declared"),
            (
                "[[job]]\nname = \"a\"\nrepository = \"r\"\n[[job.source]]\ntype = \"paths\"\npaths = [\"/etc\"]\n[[schedule]]\njob = \"a\"\nwhen = \"daily 27:00\"",
                "not a time of day",
            ),
            ("[notifications.x]\ntype = \"webhook\"\nurl = \"ftp://h\"", "notifications.x.url"),
            ("[[job]]\nname = \"a\"\nrepository = \"r\"\nsauce = 1", "sauce"),
            ("[notifications.x]\ntype = \"webhook\"\nurl = \"http://h\"\nsecret = \"s\"", "secret"),
            ("[repositories.r]\npath = \"/r\"\npasword_file = \"/p\"", "pasword_file"),
        ] {
            let e = ServeConfig::parse(text, Path::new("serve.toml")).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
