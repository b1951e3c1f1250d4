//! The repositories a daemon or a `repo job run` works on, by name.
//!
//! A job names its repository (`default` unless told). Names map to
//! [`RepositoryConfig`]s from `serve.toml`; `default` may also be given by the command
//! that started us (its `-r` and password). Each repository is opened once, which costs
//! one key derivation; every run then gets a handle of its own
//! (`Repository::another_handle`: the same key, its own index connection and lock).
//!
//! A repository is opened with the site's blob directory attached
//! ([`cairn_engine::store::directed::Directed`]): what a job writes into a repository the
//! daemon also serves (a backup, a prune's repacked packs) is reported to the directory
//! its remote clients ask before they upload, so that they do not send it again.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use cairn_engine::repository::{self, OpenOptions};
use cairn_engine::store::directed::Directed;
use cairn_engine::store::s3::S3Credentials;
use cairn_engine::store::{Backend, BackendOptions, RepositoryUrl};
use cairn_engine::trust::KnownRepositories;
use cairn_engine::Repository;

use crate::config::RepositoryConfig;
use crate::directory::{Directories, ServedDirectory};

/// The name a job uses when it names none.
pub const DEFAULT: &str = "default";

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error("no repository {name:?} is configured (known: {known})")]
    Unknown { name: String, known: String },
    #[error("repository {name:?}: its password: {message}")]
    Password { name: String, message: String },
    #[error("repository {name:?} ({path}): {source}")]
    Open {
        name: String,
        path: String,
        #[source]
        source: cairn_engine::Error,
    },
}

/// Named repositories, opened on first use.
pub struct Repositories {
    configs: BTreeMap<String, RepositoryConfig>,
    open: Mutex<BTreeMap<String, Arc<Repository>>>,
    known: KnownRepositories,
    directories: Arc<Directories>,
}

impl Repositories {
    /// `configs` by name; identities are checked against (and recorded in) `known`;
    /// what is written is reported to `directories`.
    #[must_use]
    pub fn new(
        configs: BTreeMap<String, RepositoryConfig>,
        known: KnownRepositories,
        directories: Arc<Directories>,
    ) -> Self {
        Self {
            configs,
            open: Mutex::new(BTreeMap::new()),
            known,
            directories,
        }
    }

    /// The blob directories of the site's repositories.
    #[must_use]
    pub fn directories(&self) -> &Arc<Directories> {
        &self.directories
    }

    #[must_use]
    pub fn names(&self) -> Vec<String> {
        self.configs.keys().cloned().collect()
    }

    #[must_use]
    pub fn config(&self, name: &str) -> Option<&RepositoryConfig> {
        self.configs.get(name)
    }

    /// A handle of its own on repository `name` (opened once, the first time).
    pub fn handle(&self, name: &str) -> Result<Repository, RepoError> {
        let base = self.base(name)?;
        let config = &self.configs[name];
        let mut opts = repository::options_for(&Self::url(name, config)?);
        opts.known = Some(self.known.clone());
        base.another_handle(&opts)
            .map_err(|source| RepoError::Open {
                name: name.to_owned(),
                path: config.path.display().to_string(),
                source,
            })
    }

    /// Where a configured repository is: `path` is a directory or a URL
    /// (`s3://bucket/prefix?endpoint=…`).
    fn url(name: &str, config: &RepositoryConfig) -> Result<RepositoryUrl, RepoError> {
        let open_error = |source| RepoError::Open {
            name: name.to_owned(),
            path: config.path.display().to_string(),
            source,
        };
        let text = config.path.to_str().ok_or_else(|| {
            open_error(cairn_engine::Error::InvalidInput(
                "the repository's name is not valid UTF-8".into(),
            ))
        })?;
        RepositoryUrl::parse(text)
            .map_err(|e| open_error(cairn_engine::Error::InvalidInput(e.to_string())))
    }

    /// The backend and options of a configured repository (S3 keys from the daemon's
    /// environment).
    fn location(
        &self,
        name: &str,
        config: &RepositoryConfig,
    ) -> Result<(Arc<dyn Backend>, OpenOptions), RepoError> {
        let url = Self::url(name, config)?;
        let open_error = |source| RepoError::Open {
            name: name.to_owned(),
            path: config.path.display().to_string(),
            source,
        };
        let backend_options = BackendOptions {
            s3_credentials: S3Credentials::from_env(),
            ..BackendOptions::default()
        };
        let (storage, mut opts) = repository::at(&url, &backend_options).map_err(open_error)?;
        opts.known = Some(self.known.clone());
        let directory = Arc::new(ServedDirectory {
            directories: self.directories.clone(),
            repository: name.to_owned(),
            storage: storage.clone(),
        });
        let backend: Arc<dyn Backend> = Arc::new(Directed::new(storage, directory));
        Ok((backend, opts))
    }

    /// Repository `name`'s password, read from where its configuration says (for what
    /// must hand it on: a session's background mount).
    pub fn password(&self, name: &str) -> Result<zeroize::Zeroizing<Vec<u8>>, RepoError> {
        self.known_config(name)?
            .read_password()
            .map_err(|message| RepoError::Password {
                name: name.to_owned(),
                message,
            })
    }

    /// Repository `name`'s configuration, or the error that names the known ones.
    pub fn known_config(&self, name: &str) -> Result<&RepositoryConfig, RepoError> {
        self.configs.get(name).ok_or_else(|| RepoError::Unknown {
            name: name.to_owned(),
            known: if self.configs.is_empty() {
                "none".into()
            } else {
                self.names().join(", ")
            },
        })
    }

    fn base(&self, name: &str) -> Result<Arc<Repository>, RepoError> {
        let config = self.known_config(name)?;
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(r) = open.get(name) {
            return Ok(r.clone());
        }
        let password = self.password(name)?;
        let (backend, opts) = self.location(name, config)?;
        let repo =
            Repository::open_with(backend, &opts, &|| Ok(password.clone())).map_err(|source| {
                RepoError::Open {
                    name: name.to_owned(),
                    path: config.path.display().to_string(),
                    source,
                }
            })?;
        let repo = Arc::new(repo);
        open.insert(name.to_owned(), repo.clone());
        Ok(repo)
    }
}

/// A repository's figures, as the API and the metrics show them.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Figures {
    pub size_bytes: u64,
    pub packs: u64,
    pub snapshots: u64,
    /// The sum of every snapshot's size.
    pub logical_bytes: u64,
    /// The unique data, before and after compression.
    pub raw_bytes: u64,
    pub stored_bytes: u64,
    pub locks: u64,
    pub dedup_ratio: f64,
    pub compression_ratio: f64,
}

#[allow(clippy::cast_precision_loss)]
fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

impl Figures {
    /// Reads the index totals, the snapshot list and the locks.
    pub fn of(repo: &Repository) -> cairn_engine::Result<Self> {
        let t = repo.index().totals()?;
        let snaps = repo.snapshots()?;
        let locks = cairn_engine::lock::list(repo.backend())?.len() as u64;
        let logical: u64 = snaps.iter().map(|s| s.manifest.summary.total_bytes).sum();
        Ok(Self {
            size_bytes: t.pack_bytes,
            packs: t.packs,
            snapshots: snaps.len() as u64,
            logical_bytes: logical,
            raw_bytes: t.raw_bytes,
            stored_bytes: t.stored_bytes,
            locks,
            dedup_ratio: ratio(logical, t.raw_bytes),
            compression_ratio: ratio(t.raw_bytes, t.stored_bytes),
        })
    }
}

/// What a repository protects: one entry per host, source and job, with its newest
/// snapshot (the dashboard's overview).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProtectedSource {
    pub host: String,
    /// The snapshots' source: a stream's or a VM's name, or the paths.
    pub source: String,
    pub kind: cairn_engine::snapshot::SnapshotKind,
    /// The job whose tag (`job:NAME`) the snapshots carry, if any.
    pub job: Option<String>,
    pub snapshots: u64,
    pub newest_id: String,
    pub newest_time: chrono::DateTime<chrono::Utc>,
}

/// Groups `snaps` by host, source and job, newest snapshot kept, sorted by host and
/// source.
#[must_use]
pub fn protected_sources(snaps: &[cairn_engine::snapshot::Snapshot]) -> Vec<ProtectedSource> {
    let mut by: BTreeMap<(String, String, Option<String>), ProtectedSource> = BTreeMap::new();
    for s in snaps {
        let m = &s.manifest;
        let job = m
            .tags
            .iter()
            .find_map(|t| t.strip_prefix("job:"))
            .map(str::to_owned);
        let key = (m.host.clone(), m.source_label(), job.clone());
        let e = by.entry(key).or_insert_with(|| ProtectedSource {
            host: m.host.clone(),
            source: m.source_label(),
            kind: m.kind,
            job,
            snapshots: 0,
            newest_id: s.id.to_string(),
            newest_time: m.time,
        });
        e.snapshots += 1;
        if m.time >= e.newest_time {
            e.newest_time = m.time;
            e.newest_id = s.id.to_string();
            e.kind = m.kind;
        }
    }
    by.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_engine::blob::BlobKind;
    use cairn_engine::crypto::Encryption;
    use cairn_engine::keyfile::KdfParams;
    use cairn_engine::saver::BlobSaver;

    #[test]
    fn what_a_sites_own_operation_writes_is_reported_to_the_repositorys_directory() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("repo");
        Repository::init(
            &path,
            b"pw",
            Encryption::Aes256Gcm,
            KdfParams::TEST_ONLY_WEAK,
        )
        .unwrap();
        let configs = BTreeMap::from([(
            DEFAULT.to_owned(),
            RepositoryConfig {
                path,
                inline: Some(zeroize::Zeroizing::new(b"pw".to_vec())),
                ..RepositoryConfig::default()
            },
        )]);
        let directories = Arc::new(Directories::at(&dir.path().join("state")));
        let repos = Repositories::new(
            configs,
            KnownRepositories::at(dir.path().join("known.json")),
            directories.clone(),
        );
        let repo = repos.handle(DEFAULT).unwrap();
        let saver = BlobSaver::new(&repo);
        let (id, _) = saver.save(BlobKind::Data, b"a job's data").unwrap();
        saver.flush().unwrap();
        let rows = directories.find(DEFAULT, &[*id.as_bytes()]).unwrap();
        assert_eq!(rows.len(), 1, "{rows:?}");
        let pack = repo.index().lookup(&id).unwrap().unwrap().pack;
        assert_eq!(&rows[0].1, pack.as_bytes());
    }
}
