//! Finding the repository and the password: flags, environment, the config file, a prompt.
//! The password is held in zeroizing memory and never logged or printed.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use std::sync::Arc;

use cairn_engine::keyfile::KdfParams;
use cairn_engine::lock::LockKind;
use cairn_engine::repository::OpenOptions;
use cairn_engine::store::read_cache::ReadCache;
use cairn_engine::store::remote::RemoteOptions;
use cairn_engine::store::s3::S3Credentials;
use cairn_engine::store::{Backend, BackendOptions, LocalBackend, RepositoryUrl};
use cairn_engine::trust::KnownRepositories;
use cairn_engine::Repository;
use zeroize::Zeroizing;

use crate::args::Global;

/// Set in the environment of a `repo mount --daemon` child that reads its password
/// from standard input.
pub use cairn_recover::mounting::PASSWORD_STDIN_ENV as DAEMON_PASSWORD_STDIN;

/// Settings from `$REPO_CONFIG` or `~/.config/cairn/config` (lines `key = value`).
#[derive(Debug, Default)]
pub struct FileConfig {
    pub repository: Option<PathBuf>,
    pub password_file: Option<PathBuf>,
    pub password_command: Option<String>,
    /// Keys of an `s3://` repository, when not in the environment.
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<Zeroizing<String>>,
    /// Bound of the disk cache of a remote repository's pack reads (`4G`, `0`: none).
    pub read_cache_size: Option<String>,
    /// A file holding the storage token of an `https://` repository.
    pub token_file: Option<PathBuf>,
    /// A PEM certificate to trust for an `https://` repository (its server's CA).
    pub ca_certificate: Option<PathBuf>,
}

pub fn config_path() -> Option<PathBuf> {
    std::env::var_os("REPO_CONFIG")
        .map(PathBuf::from)
        .or_else(|| dirs::config_dir().map(|d| d.join("cairn").join("config")))
}

fn load_file_config() -> Result<FileConfig> {
    let mut c = FileConfig::default();
    let Some(path) = config_path() else {
        return Ok(c);
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(c),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            bail!("{}:{}: expected `key = value`", path.display(), n + 1);
        };
        let v = v.trim().trim_matches('"').to_owned();
        match k.trim() {
            "repository" => c.repository = Some(v.into()),
            "password_file" => c.password_file = Some(v.into()),
            "password_command" => c.password_command = Some(v),
            "s3_access_key_id" => c.s3_access_key_id = Some(v),
            "s3_secret_access_key" => c.s3_secret_access_key = Some(Zeroizing::new(v)),
            "read_cache_size" => c.read_cache_size = Some(v),
            "token_file" => c.token_file = Some(v.into()),
            "ca_certificate" => c.ca_certificate = Some(v.into()),
            other => bail!("{}:{}: unknown setting {other:?}", path.display(), n + 1),
        }
    }
    Ok(c)
}

/// The repository used when none is named: under the user's data directory.
pub fn default_repository() -> Option<PathBuf> {
    dirs::data_dir().map(|d| d.join("cairn").join("repository"))
}

/// The default bound of a remote repository's read cache: 4 GiB.
pub const DEFAULT_READ_CACHE: u64 = 4 << 30;

pub struct Settings {
    /// The repository as the user named it (a path or a URL).
    pub repo: PathBuf,
    /// Where it is.
    pub url: RepositoryUrl,
    pub lock_wait: std::time::Duration,
    file: FileConfig,
    password_file: Option<PathBuf>,
    /// A password settled by the caller (the other repository of a copy).
    password_given: Option<Zeroizing<Vec<u8>>>,
}

impl Settings {
    /// The same settings for another repository (`repo copy`'s other side), whose
    /// password is `password`.
    pub fn other(&self, repo: &str, password: Zeroizing<Vec<u8>>) -> Result<Self> {
        Ok(Self {
            repo: PathBuf::from(repo),
            url: RepositoryUrl::parse(repo)?,
            lock_wait: self.lock_wait,
            file: FileConfig {
                repository: None,
                password_file: None,
                password_command: None,
                s3_access_key_id: self.file.s3_access_key_id.clone(),
                s3_secret_access_key: self.file.s3_secret_access_key.clone(),
                read_cache_size: self.file.read_cache_size.clone(),
                token_file: self.file.token_file.clone(),
                ca_certificate: self.file.ca_certificate.clone(),
            },
            password_file: None,
            password_given: Some(password),
        })
    }

    pub fn new(g: &Global) -> Result<Self> {
        let file = load_file_config()?;
        let repo = g
            .repo
            .clone()
            .or_else(|| std::env::var_os("REPO_REPOSITORY").map(PathBuf::from))
            .or_else(|| file.repository.clone())
            .or_else(default_repository)
            .context("no repository given: use --repo or REPO_REPOSITORY")?;
        let url = RepositoryUrl::parse(
            repo.to_str()
                .context("the repository's name is not valid UTF-8")?,
        )?;
        Ok(Self {
            repo,
            url,
            lock_wait: g.lock_wait,
            file,
            password_file: g.password_file.clone(),
            password_given: None,
        })
    }

    /// The password, from the first source that is set.
    pub fn password(&self, confirm: bool) -> Result<Zeroizing<Vec<u8>>> {
        if let Some(p) = &self.password_given {
            return Ok(p.clone());
        }
        if std::env::var_os(DAEMON_PASSWORD_STDIN).is_some() {
            // A `--daemon` child: the parent hands the password over a pipe.
            let mut line = Zeroizing::new(String::new());
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from the parent")?;
            return Ok(Zeroizing::new(
                line.trim_end_matches('\n').as_bytes().to_vec(),
            ));
        }
        if let Some(f) = &self.password_file {
            return read_password_file(f);
        }
        if let Some(f) = std::env::var_os("REPO_PASSWORD_FILE") {
            return read_password_file(Path::new(&f));
        }
        if let Some(p) = std::env::var_os("REPO_PASSWORD") {
            return Ok(Zeroizing::new(p.into_encoded_bytes()));
        }
        if let Ok(cmd) = std::env::var("REPO_PASSWORD_COMMAND") {
            return run_password_command(&cmd);
        }
        if let Some(f) = &self.file.password_file {
            return read_password_file(f);
        }
        if let Some(cmd) = &self.file.password_command {
            return run_password_command(cmd);
        }
        prompt("Password: ", confirm)
    }

    /// The repository's backend and how to open it: a local directory or an object
    /// store, its identity checked against (and recorded in) this host's known
    /// repositories.
    pub fn location(&self) -> Result<(Arc<dyn Backend>, OpenOptions)> {
        let (backend, mut opts) =
            cairn_engine::repository::at(&self.url, &self.backend_options()?)?;
        let switches = crate::testonly::get();
        let backend: Arc<dyn Backend> = match switches.crash_at {
            Some(n) if self.url.as_local().is_some() => Arc::new(LocalBackend::with_fs(
                backend.location(),
                Arc::new(cairn_engine::store::crash::KillingFs::at(n)),
            )),
            _ => backend,
        };
        let backend = match (self.url.as_local(), &opts.cache) {
            (None, Some(root)) => self.with_read_cache(backend, root)?,
            _ => backend,
        };
        opts.known = Some(KnownRepositories::of_this_host());
        Ok((backend, opts))
    }

    /// A remote repository's pack reads through a disk cache (`<cache>/packs`) of
    /// `$REPO_READ_CACHE_SIZE`, else the config file's `read_cache_size`, else
    /// [`DEFAULT_READ_CACHE`] bytes; `0` turns it off.
    fn with_read_cache(&self, backend: Arc<dyn Backend>, root: &Path) -> Result<Arc<dyn Backend>> {
        let size = std::env::var("REPO_READ_CACHE_SIZE")
            .ok()
            .or_else(|| self.file.read_cache_size.clone());
        let bytes = match size {
            Some(text) => crate::args::parse_size(&text)
                .map_err(|e| anyhow::anyhow!("read cache size {text:?}: {e}"))?,
            None => DEFAULT_READ_CACHE,
        };
        if bytes == 0 {
            return Ok(backend);
        }
        let dir = root.join("packs");
        let cache = ReadCache::new(backend, dir.clone(), bytes)
            .with_context(|| format!("the read cache in {}", dir.display()))?;
        Ok(Arc::new(cache))
    }

    /// S3 keys from the environment (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`), else
    /// from the config file.
    fn backend_options(&self) -> Result<BackendOptions> {
        let from_file = || {
            Some(S3Credentials {
                access_key_id: self.file.s3_access_key_id.clone()?,
                secret_access_key: self.file.s3_secret_access_key.clone()?,
                session_token: None,
            })
        };
        Ok(BackendOptions {
            s3_credentials: S3Credentials::from_env().or_else(from_file),
            remote: self.remote_options()?,
        })
    }

    /// The storage token (`REPO_TOKEN`, `REPO_TOKEN_FILE`, the config file's
    /// `token_file`) and the CA to trust (`REPO_CA_CERT`, `ca_certificate`) of an
    /// `https://` repository. Read only for one.
    fn remote_options(&self) -> Result<RemoteOptions> {
        if !matches!(self.url, RepositoryUrl::Remote(_)) {
            return Ok(RemoteOptions::default());
        }
        let token_file = std::env::var_os("REPO_TOKEN_FILE")
            .map(PathBuf::from)
            .or_else(|| self.file.token_file.clone());
        let token = match (std::env::var("REPO_TOKEN").ok(), token_file) {
            (Some(t), _) => Some(Zeroizing::new(t)),
            (None, Some(f)) => {
                let raw = read_password_file(&f)?;
                Some(Zeroizing::new(
                    String::from_utf8(raw.to_vec()).context("the token file is not text")?,
                ))
            }
            (None, None) => None,
        };
        let ca = std::env::var_os("REPO_CA_CERT")
            .map(PathBuf::from)
            .or_else(|| self.file.ca_certificate.clone());
        let ca_certificate = match ca {
            Some(path) => {
                Some(std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?)
            }
            None => None,
        };
        Ok(RemoteOptions {
            token,
            ca_certificate,
        })
    }

    /// Reads the repository's config without a password: whether it is one, and how.
    pub fn peek_config(&self) -> Result<cairn_engine::config::Config> {
        let (backend, _) = self.location()?;
        Ok(Repository::peek_config_on(backend.as_ref())?)
    }

    pub fn open(&self) -> Result<Repository> {
        self.open_trusting(true)
    }

    /// Opens the repository; with `check_identity` false, without comparing its
    /// identity with what this host knows (`repo trust` does that itself).
    pub fn open_trusting(&self, check_identity: bool) -> Result<Repository> {
        self.open_with(check_identity, false)
    }

    /// Opens the repository for a backup, locked: on a repository server the index is
    /// not brought in sync at open (the server's blob directory answers what it lacks),
    /// so a host new to a large repository does not read every pack's trailer first.
    pub fn open_for_backup(&self) -> Result<Repository> {
        let repo = self.open_with(true, true)?;
        repo.lock(LockKind::Shared, "backup", self.lock_wait)?;
        Ok(repo)
    }

    fn open_with(&self, check_identity: bool, lazy_index: bool) -> Result<Repository> {
        let pw = || {
            self.password(false)
                .map_err(|e| cairn_engine::Error::InvalidInput(format!("{e:#}")))
        };
        let (backend, mut opts) = self.location()?;
        if !check_identity {
            opts.known = None;
        }
        opts.lazy_index = lazy_index;
        let mut repo = Repository::open_with(backend, &opts, &pw)?;
        if let Some(n) = crate::testonly::get().extents_inline {
            repo.set_extents_inline(n);
        }
        Ok(repo)
    }

    /// Opens the repository and takes a lock for `operation` (see `cairn_engine::lock`).
    pub fn open_locked(&self, kind: LockKind, operation: &str) -> Result<Repository> {
        let repo = self.open()?;
        repo.lock(kind, operation, self.lock_wait)?;
        Ok(repo)
    }

    /// Like [`Self::open_locked`] with a shared lock for an operation that only reads: on
    /// a repository this process cannot write (read-only medium, another user's), it goes
    /// on without a lock, with a warning.
    pub fn open_for_reading(&self, operation: &str) -> Result<Repository> {
        let repo = self.open()?;
        match repo.lock(LockKind::Shared, operation, self.lock_wait) {
            Ok(()) => {}
            Err(cairn_engine::Error::Io { source, .. })
                if source.kind() == std::io::ErrorKind::PermissionDenied
                    || source.raw_os_error() == Some(libc::EROFS) =>
            {
                tracing::warn!(
                    "cannot write a lock in {} ({source}): reading without one; a prune \
                     running elsewhere could delete data under this {operation}",
                    self.repo.display()
                );
            }
            Err(e) => return Err(e.into()),
        }
        Ok(repo)
    }
}

pub fn prompt(label: &str, confirm: bool) -> Result<Zeroizing<Vec<u8>>> {
    if !std::io::stdin().is_terminal() {
        bail!("no password given: set REPO_PASSWORD_FILE, REPO_PASSWORD or REPO_PASSWORD_COMMAND, or run on a terminal");
    }
    let first = Zeroizing::new(rpassword::prompt_password(label).context("reading the password")?);
    if confirm {
        let again =
            Zeroizing::new(rpassword::prompt_password("Repeat: ").context("reading the password")?);
        if *first != *again {
            bail!("the passwords differ");
        }
    }
    if first.is_empty() {
        bail!("empty password refused");
    }
    Ok(Zeroizing::new(first.as_bytes().to_vec()))
}

pub fn read_password_file(path: &Path) -> Result<Zeroizing<Vec<u8>>> {
    let raw = Zeroizing::new(
        std::fs::read(path).with_context(|| format!("reading password file {}", path.display()))?,
    );
    let line = raw.split(|&b| b == b'\n').next().unwrap_or_default();
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    if line.is_empty() {
        bail!("password file {} is empty", path.display());
    }
    Ok(Zeroizing::new(line.to_vec()))
}

fn run_password_command(cmd: &str) -> Result<Zeroizing<Vec<u8>>> {
    let argv =
        shell_words::split(cmd).context("REPO_PASSWORD_COMMAND: cannot split into arguments")?;
    let (prog, args) = argv
        .split_first()
        .context("REPO_PASSWORD_COMMAND is empty")?;
    let out = std::process::Command::new(prog)
        .args(args)
        .stdin(std::process::Stdio::inherit())
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running password command {prog:?}"))?;
    if !out.status.success() {
        bail!("password command {prog:?} failed ({})", out.status);
    }
    let raw = Zeroizing::new(out.stdout);
    let line = raw.split(|&b| b == b'\n').next().unwrap_or_default();
    if line.is_empty() {
        bail!("password command {prog:?} printed no password");
    }
    Ok(Zeroizing::new(line.to_vec()))
}

/// Argon2 cost for new keys (trivial under the debug-only test switch
/// `CAIRN_TESTONLY_WEAK_KDF`, see [`crate::testonly`]).
pub fn kdf_params() -> KdfParams {
    if crate::testonly::get().weak_kdf {
        KdfParams::TEST_ONLY_WEAK
    } else {
        KdfParams::DEFAULT
    }
}
