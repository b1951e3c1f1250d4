//! Job definitions: the backup templates a schedule or a user runs. A job names its
//! sources, the repository, tags, retention (forget with a keep policy, then prune),
//! what to verify afterwards, and who hears about it.
//!
//! Every snapshot a job makes carries the tag `job:<name>`: its retention applies to
//! those snapshots only (grouped by host and source), never to another job's.

use serde::{Deserialize, Serialize};

use cairn_agent::source::Source;
use cairn_engine::retention::KeepPolicy;

/// The repository a job uses when it names none.
pub const DEFAULT_REPOSITORY: &str = "default";

pub(crate) fn default_repository() -> String {
    DEFAULT_REPOSITORY.to_owned()
}

pub(crate) fn default_true() -> bool {
    true
}

/// A job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct JobDefinition {
    pub name: String,
    /// A repository of the daemon's configuration.
    #[serde(default = "default_repository")]
    pub repository: String,
    /// What it backs up, each an object with a `type`: `paths`, `vm`, `postgres`,
    /// `mariadb`, `image`, `nbd`, `command` (docs/SERVE.md).
    #[serde(rename = "source", alias = "sources")]
    #[schema(value_type = Vec<Object>)]
    pub sources: Vec<Source>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The host recorded in the snapshots (this host's name by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<Retention>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verify>,
    /// After a successful run, copy the job's snapshots to another repository.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub copy: Option<CopyTo>,
    /// Notification targets of the daemon's configuration.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notify: Vec<String>,
}

/// Keep rules applied after each successful run, to this job's snapshots.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    #[serde(default)]
    pub keep_last: u32,
    #[serde(default)]
    pub keep_hourly: u32,
    #[serde(default)]
    pub keep_daily: u32,
    #[serde(default)]
    pub keep_weekly: u32,
    #[serde(default)]
    pub keep_monthly: u32,
    #[serde(default)]
    pub keep_yearly: u32,
    /// `7d`, `2w`, `1y6m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep_tags: Vec<String>,
    /// Prune after forgetting (the default): the forgotten data is freed at once.
    #[serde(default = "default_true")]
    pub prune: bool,
}

impl Retention {
    pub fn policy(&self) -> Result<KeepPolicy, String> {
        let within = match &self.keep_within {
            Some(w) => Some(cairn_engine::retention::parse_duration(w).map_err(|e| {
                format!("retention.keep_within: {e} (for example: keep_within = \"30d\")")
            })?),
            None => None,
        };
        let p = KeepPolicy {
            last: self.keep_last,
            hourly: self.keep_hourly,
            daily: self.keep_daily,
            weekly: self.keep_weekly,
            monthly: self.keep_monthly,
            yearly: self.keep_yearly,
            within,
            tags: self.keep_tags.clone(),
        };
        if p.is_empty() {
            return Err(
                "retention: no keep rule would remove every snapshot (for example: keep_daily = 7)"
                    .into(),
            );
        }
        Ok(p)
    }
}

/// Where a job's snapshots are copied after each successful run (`repo copy`): another
/// repository of the site (a second disk, a bucket at another site, a repository
/// server). Each snapshot is copied once; the destination stores only what it lacks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CopyTo {
    /// A repository of the daemon's configuration.
    pub repository: String,
    /// Only the newest N snapshots of each host and source (every one of the job's when
    /// absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latest: Option<usize>,
}

/// What to check after a successful run: the repository (`check`), and with
/// `after_backup` the snapshots the run made, proved by use (`repo verify`: a VM's
/// booted in a lab, a database's started and checked, a tree's sample restored).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Verify {
    /// `metadata` (the structure: trees, index, packs' trailers), `read-data` (every
    /// pack read and authenticated) or `N/M` (subset N of M of the packs read).
    #[serde(default = "default_check")]
    pub check: String,
    /// Verify each snapshot the run made, after the run.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub after_backup: bool,
    /// How its snapshots are verified (`[verify.snapshots]`).
    #[serde(default, skip_serializing_if = "VerifySpec::is_default")]
    pub snapshots: VerifySpec,
}

/// How a snapshot is verified; what is not given takes `repo verify`'s defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifySpec {
    /// A VM's test: boot, boot_ping (the default), boot_ping_services, full.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test: Option<String>,
    /// A VM's services: `ssh,http,tcp:5432,https:8443/health`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub services: Option<String>,
    /// For `full`: a shell script run inside the guest (its text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
    /// How long a guest may take to boot or a database to accept connections: `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    /// A database's queries, each to return `expect_rows` rows when that is given.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub queries: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expect_rows: Option<u64>,
    /// A file tree's share restored and compared: `10%` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sample: Option<String>,
    /// Where a VM's copy is connected: `lab` (the default: a network namespace of its
    /// own), or the name of a libvirt network without forwarding that the site keeps
    /// for tests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
}

fn default_check() -> String {
    "metadata".into()
}

impl VerifySpec {
    fn is_default(&self) -> bool {
        self == &Self::default()
    }
}

impl Verify {
    /// The engine's check options this asks for.
    pub fn options(&self) -> Result<cairn_engine::check::CheckOptions, String> {
        let c = self.check.as_str();
        if c == "metadata" {
            return Ok(cairn_engine::check::CheckOptions::default());
        }
        if c == "read-data" {
            return Ok(cairn_engine::check::CheckOptions {
                read_data: true,
                subset: None,
            });
        }
        let bad = || {
            format!("verify.check: {c:?} is not metadata, read-data or N/M (for example: check = \"1/10\")")
        };
        let (n, m) = cairn_engine::check::parse_subset(c).map_err(|_| bad())?;
        Ok(cairn_engine::check::CheckOptions {
            read_data: true,
            subset: Some((n, m)),
        })
    }
}

/// The tag every snapshot of job `name` carries.
#[must_use]
pub fn job_tag(name: &str) -> String {
    format!("job:{name}")
}

impl JobDefinition {
    /// What is wrong with the definition, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        if self.name.is_empty()
            || self.name.len() > 64
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "name: {:?} must be 1-64 letters, digits, '-', '_' or '.' (for example: name = \"nightly-etc\")",
                self.name
            ));
        }
        if self.sources.is_empty() {
            return Err("source: a job needs at least one (for example: [[job.source]] type = \"paths\" paths = [\"/etc\"])".into());
        }
        for (i, s) in self.sources.iter().enumerate() {
            s.validate().map_err(|e| format!("source {}: {e}", i + 1))?;
        }
        if let Some(r) = &self.retention {
            r.policy()?;
        }
        if let Some(c) = &self.copy {
            if c.repository == self.repository {
                return Err(format!(
                    "copy.repository: {:?} is the job's own repository; name another (for example: [copy] repository = \"offsite\")",
                    c.repository
                ));
            }
            if c.latest == Some(0) {
                return Err(
                    "copy.latest: at least 1 (or leave it out to copy every snapshot of the job)"
                        .into(),
                );
            }
        }
        if let Some(v) = &self.verify {
            v.options()?;
            v.snapshots
                .validate()
                .map_err(|e| format!("verify.snapshots.{e}"))?;
        }
        Ok(())
    }

    /// Reads one job from TOML (the `repo job add --file` format: the fields of a
    /// `[[job]]` table at the top level).
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let job: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        job.validate()?;
        Ok(job)
    }

    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// The tags of this job's snapshots: its own and `job:<name>`.
    #[must_use]
    pub fn snapshot_tags(&self) -> Vec<String> {
        let mut t = self.tags.clone();
        t.push(job_tag(&self.name));
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const JOB: &str = r#"
name = "nightly"
tags = ["nightly"]
notify = ["ops"]

[[source]]
type = "paths"
paths = ["/etc", "/home"]
excludes = ["*.tmp"]

[[source]]
type = "vm"
names = ["mainserver", "onlyoffice"]

[[source]]
type = "postgres"
connection = "host=/run/postgresql user=postgres"

[retention]
keep_daily = 7
keep_weekly = 4
keep_monthly = 12

[verify]
check = "1/10"
"#;

    #[test]
    fn a_job_reads_from_toml_and_round_trips() {
        let job = JobDefinition::from_toml(JOB).unwrap();
        assert_eq!(job.repository, "default");
        assert_eq!(job.sources.len(), 3);
        assert!(job.retention.as_ref().unwrap().prune);
        assert_eq!(
            job.verify.as_ref().unwrap().options().unwrap().subset,
            Some((1, 10))
        );
        let again = JobDefinition::from_toml(&job.to_toml()).unwrap();
        assert_eq!(job, again);
        assert!(job.snapshot_tags().contains(&"job:nightly".to_owned()));
    }

    #[test]
    fn bad_jobs_name_the_field() {
        for (text, needle) in [
            ("name = \"a b\"\n[[source]]\ntype = \"paths\"\npaths = [\"/etc\"]", "name:"),
            ("name = \"a\"\nsource = []", "source:"),
            ("name = \"a\"\n[[source]]\ntype = \"paths\"\npaths = [\"etc\"]", "source 1: paths:"),
            ("name = \"a\"\n[[source]]\ntype = \"paths\"\npaths = [\"/etc\"]\n[retention]\nprune = true", "no keep rule"),
            ("name = \"a\"\n[[source]]\ntype = \"paths\"\npaths = [\"/etc\"]\n[verify]\ncheck = \"3/2\"", "verify.check"),
            ("name = \"a\"\n[[source]]\ntype = \"paths\"\npaths = [\"/etc\"]\ncolour = \"red\"", "colour"),
            ("name = \"a\"\n[[source]]\ntype = \"floppy\"", "floppy"),
            ("name = \"a\"\n[[source]]\ntype = \"stdin\"\nname = \"x\"", "stdin is for the command line"),
        ] {
            let e = JobDefinition::from_toml(text).unwrap_err();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
