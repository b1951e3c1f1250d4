//! The [`Repository`] facade: creating and opening a repository, its keys, snapshots,
//! blobs and index. Commands (backup, restore, ...) are free functions in their own
//! modules that take a `&Repository`.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rayon::prelude::*;
use zeroize::Zeroizing;

use crate::blob;
use crate::cache::RepositoryCache;
use crate::config::Config;
use crate::crypto::{Crypto, Encryption, MasterKey};
use crate::error::{Error, IoContext, Result};
use crate::id::{BlobId, Id, KeyId, PackId, SnapshotId};
use crate::index::{BlobLocation, Index};
use crate::keyfile::{KdfParams, KeyFile};
use crate::lock::{Lock, LockKind};
use crate::pack::{self, FOOTER_LEN};
use crate::snapshot::{Manifest, Snapshot};
use crate::store::{Backend, FileKind, LocalBackend};
use crate::tree::Tree;
use crate::trust::{Identity, KnownRepositories};

/// A pack's size and entries, or why they could not be read.
pub type TrailerResult = Result<(u64, Vec<pack::PackEntry>)>;

/// Supplies the password when one is needed (not for encryption `none`).
pub type PasswordSource<'a> = &'a dyn Fn() -> Result<Zeroizing<Vec<u8>>>;

/// An open repository: config verified, master key unlocked, index in sync.
pub struct Repository {
    /// Where it is, for messages ([`Backend::location`]).
    location: String,
    backend: Arc<dyn Backend>,
    config: Config,
    crypto: Crypto,
    key_id: KeyId,
    index: Index,
    /// The lock this process holds, if it took one (released when the repository is dropped).
    lock: std::sync::Mutex<Option<Lock>>,
    /// Set once `locate` has relisted every pack after a miss.
    relisted: std::sync::atomic::AtomicBool,
    /// The manifests read so far, shared by every handle ([`Self::another_handle`]).
    manifests: Arc<ManifestCache>,
    /// This host's cache of the repository (index, manifests), when it has one.
    cache: Option<RepositoryCache>,
    /// How many extents a file lists inline in its tree ([`crate::tree::EXTENTS_INLINE`];
    /// lowered by tests of the extent-list blobs).
    extents_inline: usize,
    /// The index was not brought in sync at open ([`OpenOptions::lazy_index`]): it
    /// lists what it held, what this handle wrote and what the storage's blob directory
    /// pointed to, not every pack.
    partial_index: bool,
}

/// How to open (or create) a repository, beyond its storage and password.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// The index file (created if missing). `None`: the index of the repository's cache
    /// under [`Self::cache`], or without one an index in memory, filled from the pack
    /// trailers at open.
    pub index: Option<PathBuf>,
    /// The root of this host's repository caches ([`crate::cache`]): the index and the
    /// manifests are kept there, in a directory of the repository's own.
    pub cache: Option<PathBuf>,
    /// An index an older version kept inside a local repository, moved into the cache
    /// at open.
    pub legacy_index: Option<PathBuf>,
    /// This host's record of known repositories: opening checks the repository's
    /// identity against it (and records a new one); creating records it.
    pub known: Option<KnownRepositories>,
    /// Do not read the trailers of every pack the index lacks at open when the storage
    /// has a blob directory ([`crate::store::BlobDirectory`], a repository server):
    /// blobs are looked up there when the index misses them. For a backup of a host
    /// that comes to a large repository with an empty cache; an operation that needs
    /// every pack (prune, check, restore) opens with a full index.
    pub lazy_index: bool,
}

/// Who is doing this, for key files and snapshots.
#[must_use]
pub fn current_host() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

#[must_use]
pub fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::geteuid())
        .ok()
        .flatten()
        .map_or_else(|| nix::unistd::geteuid().to_string(), |u| u.name)
}

/// The backend and options of a repository in a local directory: its path made
/// absolute (so that it names one place, whatever the working directory), the index and
/// manifests in this host's cache ([`crate::cache::default_root`]).
#[must_use]
pub fn local(path: &Path) -> (Arc<dyn Backend>, OpenOptions) {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let opts = OpenOptions {
        cache: crate::cache::default_root(),
        legacy_index: Some(path.join("index.sqlite")),
        ..OpenOptions::default()
    };
    (Arc::new(LocalBackend::new(path)), opts)
}

/// The backend and options of the repository at `url`: [`local`] for a directory; for
/// a remote one, the index and manifests in this host's cache as well.
pub fn at(
    url: &crate::store::RepositoryUrl,
    backend_options: &crate::store::BackendOptions,
) -> Result<(Arc<dyn Backend>, OpenOptions)> {
    if let Some(path) = url.as_local() {
        return Ok(local(path));
    }
    let backend = crate::store::open(url, backend_options).ctx(|| url.to_string())?;
    Ok((backend, options_for(url)))
}

/// The options [`at`] gives, without opening a backend (for another handle).
#[must_use]
pub fn options_for(url: &crate::store::RepositoryUrl) -> OpenOptions {
    match url.as_local() {
        Some(path) => local(path).1,
        None => OpenOptions {
            cache: crate::cache::default_root(),
            ..OpenOptions::default()
        },
    }
}

impl Repository {
    /// Creates a repository in `path` (which must not hold one, and must be empty if it exists).
    pub fn init(
        path: &Path,
        password: &[u8],
        encryption: Encryption,
        kdf: KdfParams,
    ) -> Result<Self> {
        Self::init_with(path, password, Config::new(encryption), kdf)
    }

    /// Like [`Self::init`] with settings of the caller's choice (pack size, chunker,
    /// compression), validated as a reader would.
    pub fn init_with(path: &Path, password: &[u8], config: Config, kdf: KdfParams) -> Result<Self> {
        let (backend, opts) = local(path);
        Self::init_local(path, backend, &opts, password, config, kdf)
    }

    /// [`Self::init_on`] for a local directory, which must be new or empty.
    pub fn init_local(
        path: &Path,
        backend: Arc<dyn Backend>,
        opts: &OpenOptions,
        password: &[u8],
        config: Config,
        kdf: KdfParams,
    ) -> Result<Self> {
        if path.join("config").exists() {
            return Err(Error::InvalidInput(format!(
                "{}: a repository already exists here",
                path.display()
            )));
        }
        if path.exists() {
            let mut entries = std::fs::read_dir(path).ctx(|| path.display().to_string())?;
            if entries.next().is_some() {
                return Err(Error::InvalidInput(format!(
                    "{}: directory is not empty; choose a new or empty directory",
                    path.display()
                )));
            }
        }
        Self::init_on(backend, opts, password, config, kdf)
    }

    /// Creates a repository on `backend`, which must hold none.
    pub fn init_on(
        backend: Arc<dyn Backend>,
        opts: &OpenOptions,
        password: &[u8],
        config: Config,
        kdf: KdfParams,
    ) -> Result<Self> {
        let encryption = config.encryption;
        config.chunker.validate()?;
        let versions = crate::config::OLDEST_FORMAT_VERSION..=crate::config::FORMAT_VERSION;
        if !versions.contains(&config.version) {
            return Err(Error::InvalidInput(format!(
                "format version {} cannot be created: versions {} to {} can",
                config.version,
                versions.start(),
                versions.end()
            )));
        }
        if !(1 << 20..=1 << 30).contains(&config.pack_size) {
            return Err(Error::InvalidInput(
                "pack size must be between 1 MiB and 1 GiB".into(),
            ));
        }
        let location = backend.location();
        if backend.size(FileKind::Config, "config").is_ok() {
            return Err(Error::InvalidInput(format!(
                "{location}: a repository already exists here"
            )));
        }
        backend
            .create_layout()
            .ctx(|| format!("creating repository {location}"))?;
        let key = MasterKey::generate();
        let crypto = Crypto::new(key.clone(), encryption);
        let keyfile = KeyFile::create(
            &key,
            encryption,
            password,
            kdf,
            &current_host(),
            &current_user(),
        )?;
        let key_id = KeyId(Id::random());
        backend
            .write(FileKind::Key, &key_id.to_hex(), &keyfile.to_json())
            .ctx(|| "writing key file".into())?;
        // The config goes last: a repository exists once its config does.
        backend
            .write(FileKind::Config, "config", &config.encode(&crypto))
            .ctx(|| "writing config".into())?;
        if let Some(known) = &opts.known {
            // A new repository here replaces whatever this host knew at this place.
            if let Err(e) = known.accept(&location, &identity_of(&config, &crypto)) {
                tracing::warn!(
                    "the new repository's identity is not recorded on this host ({e}); \
                     its first open records it"
                );
            }
        }
        let cache = open_cache(opts, &config, &location);
        Ok(Self {
            index: open_index(opts, cache.as_ref())?,
            location,
            backend,
            config,
            crypto,
            key_id,
            lock: std::sync::Mutex::new(None),
            relisted: Default::default(),
            manifests: Arc::default(),
            cache,
            extents_inline: crate::tree::EXTENTS_INLINE,
            partial_index: false,
        })
    }

    /// Reads `config` without a key: tells whether `path` is a repository and of which
    /// version, without asking for a password.
    pub fn peek_config(path: &Path) -> Result<Config> {
        Self::peek_config_on(&LocalBackend::new(path))
    }

    /// [`Self::peek_config`] of a repository on any backend.
    pub fn peek_config_on(backend: &dyn Backend) -> Result<Config> {
        let bytes = read_config(backend)?;
        Config::decode_unverified(&bytes)
    }

    /// Opens the repository at `path`, asking `password` only when it is encrypted. The
    /// identity is not checked against this host's known repositories: callers that
    /// face a storage host they do not trust use [`Self::open_with`].
    pub fn open(path: &Path, password: PasswordSource<'_>) -> Result<Self> {
        let (backend, opts) = local(path);
        Self::open_with(backend, &opts, password)
    }

    /// Opens the repository on `backend`: reads and checks `config`, unlocks the master
    /// key with `password` (asked only when the repository is encrypted), checks the
    /// repository's identity against `opts.known`, and brings the index in sync.
    pub fn open_with(
        backend: Arc<dyn Backend>,
        opts: &OpenOptions,
        password: PasswordSource<'_>,
    ) -> Result<Self> {
        let location = backend.location();
        let raw_config = read_config(backend.as_ref())?;
        let config = Config::decode_unverified(&raw_config)?;
        let (key_id, key) = unlock(backend.as_ref(), config.encryption, password)?;
        let crypto = Crypto::new(key, config.encryption);
        Config::verify(&raw_config, &crypto)?;
        if let Some(known) = &opts.known {
            let seen = known.check(&location, &identity_of(&config, &crypto))?;
            if seen == crate::trust::Seen::New {
                tracing::info!(
                    "first use of repository {} on this host: its identity (master key {}) is recorded in {}",
                    location,
                    crate::trust::KeyFingerprint::of(crypto.master_key()),
                    known.path().display()
                );
            }
        }
        let cache = open_cache(opts, &config, &location);
        let backend_has_directory = backend.directory().is_some();
        let repo = Self {
            index: open_index(opts, cache.as_ref())?,
            location,
            backend,
            config,
            crypto,
            key_id,
            lock: std::sync::Mutex::new(None),
            relisted: Default::default(),
            manifests: Arc::default(),
            cache,
            extents_inline: crate::tree::EXTENTS_INLINE,
            partial_index: opts.lazy_index && backend_has_directory,
        };
        if repo.partial_index {
            repo.drop_removed_packs()?;
        } else {
            repo.sync_index()?;
        }
        Ok(repo)
    }

    /// A second handle on the same repository with the same key (no password, no key
    /// derivation) and no lock of its own: for a process that runs several operations
    /// at once, each taking its own lock. `opts.index` names the index to use (the same
    /// file is fine: the index is a cache shared through SQLite).
    pub fn another_handle(&self, opts: &OpenOptions) -> Result<Self> {
        let repo = Self {
            location: self.location.clone(),
            backend: self.backend.clone(),
            config: self.config.clone(),
            crypto: self.crypto.clone(),
            key_id: self.key_id,
            index: open_index(opts, self.cache.as_ref())?,
            lock: std::sync::Mutex::new(None),
            relisted: Default::default(),
            manifests: self.manifests.clone(),
            cache: self.cache.clone(),
            extents_inline: self.extents_inline,
            partial_index: false,
        };
        repo.sync_index()?;
        Ok(repo)
    }

    /// How many extents a file lists inline in its tree before its list goes to
    /// extent-list blobs (format 2).
    #[must_use]
    pub fn extents_inline(&self) -> usize {
        self.extents_inline
    }

    /// Lowers [`Self::extents_inline`] (1 to [`crate::tree::EXTENTS_INLINE`]), so that a
    /// test makes list blobs without a file of millions of chunks. Readers accept any
    /// split, so this changes how new trees are stored, never what they mean.
    pub fn set_extents_inline(&mut self, n: usize) {
        self.extents_inline = n.clamp(1, crate::tree::EXTENTS_INLINE);
    }

    /// Where the repository is, for messages.
    #[must_use]
    pub fn location(&self) -> &str {
        &self.location
    }

    /// This host's cache directory of the repository (index, manifests), if it has one.
    #[must_use]
    pub fn cache_dir(&self) -> Option<&Path> {
        self.cache.as_ref().map(RepositoryCache::dir)
    }

    /// What makes this repository the one a host knew ([`crate::trust`]).
    #[must_use]
    pub fn identity(&self) -> Identity {
        identity_of(&self.config, &self.crypto)
    }

    #[must_use]
    pub fn config(&self) -> &Config {
        &self.config
    }

    #[must_use]
    pub fn crypto(&self) -> &Crypto {
        &self.crypto
    }

    #[must_use]
    pub fn backend(&self) -> &dyn Backend {
        self.backend.as_ref()
    }

    /// The backend, shared (for what outlives a borrow, like a lock's refresher).
    #[must_use]
    pub fn backend_arc(&self) -> Arc<dyn Backend> {
        self.backend.clone()
    }

    // ---- locks ----

    fn held_lock(&self) -> std::sync::MutexGuard<'_, Option<Lock>> {
        self.lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Takes a lock for `operation`, held until [`Self::unlock`] or the repository is
    /// dropped (see [`crate::lock`]). Waits up to `wait` for conflicting holders.
    pub fn lock(&self, kind: LockKind, operation: &str, wait: std::time::Duration) -> Result<()> {
        let mut held = self.held_lock();
        if held.is_some() {
            return Err(Error::InvalidInput(
                "the repository is already locked by this process".into(),
            ));
        }
        *held = Some(Lock::acquire(self.backend.clone(), kind, operation, wait)?);
        Ok(())
    }

    /// The name of the lock this process holds, if any.
    #[must_use]
    pub fn lock_name(&self) -> Option<String> {
        self.held_lock().as_ref().map(|l| l.name().to_owned())
    }

    /// Whether this process holds a lock on the repository.
    #[must_use]
    pub fn has_lock(&self) -> bool {
        self.held_lock().is_some()
    }

    /// Turns our shared lock exclusive (see [`Lock::upgrade`]).
    pub fn upgrade_lock(&self, wait: std::time::Duration) -> Result<()> {
        match self.held_lock().as_ref() {
            Some(l) => l.upgrade(wait),
            None => Err(Error::InvalidInput("no lock to upgrade".into())),
        }
    }

    /// Moves the repository to this program's format version ([`crate::config::FORMAT_VERSION`])
    /// by rewriting `config` with the new version (atomically: a crash leaves the old or
    /// the new file). Nothing else changes: every version's data reads as it did. Programs
    /// that know only the old version refuse the repository afterwards. Call with the
    /// exclusive lock held, so that no program of the old version is using it. Returns the
    /// versions before and after (equal when there was nothing to do).
    pub fn upgrade_format(&mut self) -> Result<(u32, u32)> {
        let from = self.config.version;
        let to = crate::config::FORMAT_VERSION;
        if from >= to {
            return Ok((from, from));
        }
        if !self.has_lock() {
            return Err(Error::InvalidInput(
                "upgrading the format needs the repository's exclusive lock".into(),
            ));
        }
        self.ensure_lock_held()?;
        let mut config = self.config.clone();
        config.version = to;
        let bytes = config.encode(&self.crypto);
        // What readers will see: the same parameters, under a MAC that checks.
        Config::verify(&bytes, &self.crypto)?;
        if Config::decode_unverified(&bytes)? != config {
            return Err(Error::corrupt(
                "config",
                "the upgraded config does not read back",
            ));
        }
        self.backend
            .write(FileKind::Config, "config", &bytes)
            .ctx(|| "writing config".into())?;
        tracing::info!("repository format upgraded from {from} to {to}");
        self.config = config;
        Ok((from, to))
    }

    /// Lets go of our lock, if any.
    pub fn unlock(&self) {
        drop(self.held_lock().take());
    }

    /// Fails when this process took a lock and lost it: nothing may be committed then.
    pub fn ensure_lock_held(&self) -> Result<()> {
        self.held_lock().as_ref().map_or(Ok(()), Lock::ensure_held)
    }

    #[must_use]
    pub fn index(&self) -> &Index {
        &self.index
    }

    /// The key this repository was opened with.
    #[must_use]
    pub fn key_id(&self) -> KeyId {
        self.key_id
    }

    // ---- keys ----

    /// All key files, readable or not.
    pub fn keys(&self) -> Result<Vec<(KeyId, KeyFile)>> {
        let mut out = Vec::new();
        for name in self
            .backend
            .list(FileKind::Key)
            .ctx(|| "listing keys".into())?
        {
            let Ok(id) = name.parse::<KeyId>() else {
                continue;
            };
            let bytes = self
                .backend
                .read(FileKind::Key, &name)
                .ctx(|| format!("reading keys/{name}"))?;
            out.push((id, KeyFile::from_json(&bytes, &id)?));
        }
        Ok(out)
    }

    /// Adds a key file wrapping the master key with `password`.
    pub fn add_key(&self, password: &[u8], kdf: KdfParams) -> Result<KeyId> {
        if self.config.encryption == Encryption::None {
            return Err(Error::InvalidInput(
                "this repository is not encrypted: it has no passwords".into(),
            ));
        }
        let kf = KeyFile::create(
            self.crypto.master_key(),
            self.config.encryption,
            password,
            kdf,
            &current_host(),
            &current_user(),
        )?;
        let id = KeyId(Id::random());
        self.backend
            .write(FileKind::Key, &id.to_hex(), &kf.to_json())
            .ctx(|| "writing key file".into())?;
        Ok(id)
    }

    /// Removes a key file. Refuses to remove the key in use (use `passwd` for that) and
    /// the last key.
    pub fn remove_key(&self, id: &KeyId) -> Result<()> {
        let keys = self.keys()?;
        if !keys.iter().any(|(k, _)| k == id) {
            return Err(Error::NotFound(format!("no key {id}")));
        }
        if *id == self.key_id {
            return Err(Error::InvalidInput(
                "refusing to remove the key in use; open with another password, or use `key passwd`"
                    .into(),
            ));
        }
        self.backend
            .remove(FileKind::Key, &id.to_hex())
            .ctx(|| format!("removing keys/{id}"))
    }

    /// Replaces the key in use by one with a new password.
    pub fn change_password(&mut self, password: &[u8], kdf: KdfParams) -> Result<KeyId> {
        let new = self.add_key(password, kdf)?;
        let old = std::mem::replace(&mut self.key_id, new);
        self.backend
            .remove(FileKind::Key, &old.to_hex())
            .ctx(|| format!("removing keys/{old}"))?;
        Ok(new)
    }

    // ---- snapshots ----

    /// All snapshots, oldest first. Unreadable manifests are reported and skipped.
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        let names = self
            .backend
            .list(FileKind::Snapshot)
            .ctx(|| "listing snapshots".into())?;
        if let Some(cache) = &self.cache {
            cache.retain_manifests(&names.iter().filter_map(|n| n.parse().ok()).collect());
        }
        let mut out: Vec<Snapshot> = names
            .par_iter()
            .filter_map(|name| {
                let id = name.parse::<SnapshotId>().ok()?;
                match self.load_snapshot(&id) {
                    Ok(s) => Some(s),
                    Err(e) => {
                        tracing::warn!("skipping snapshot {id}: {e}");
                        None
                    }
                }
            })
            .collect();
        out.sort_by(|a, b| a.manifest.time.cmp(&b.manifest.time).then(a.id.cmp(&b.id)));
        Ok(out)
    }

    /// A snapshot, from the manifests already read when it is one of them.
    pub fn load_snapshot(&self, id: &SnapshotId) -> Result<Snapshot> {
        if let Some(manifest) = self.manifests.get(id) {
            return Ok(Snapshot { id: *id, manifest });
        }
        if let Some(bytes) = self.cache.as_ref().and_then(|c| c.manifest(id)) {
            // Authenticated like storage's copy; a bad cached copy is dropped and read again.
            if let Ok(manifest) = Manifest::decode(&self.crypto, id, &bytes) {
                self.manifests.put(*id, &manifest);
                return Ok(Snapshot { id: *id, manifest });
            }
            if let Some(cache) = &self.cache {
                cache.forget_manifest(id);
            }
        }
        self.read_snapshot(id)
    }

    /// A snapshot read from storage and authenticated, whether or not it was read
    /// before: what `check` and `repair` use, since they look for damage done since.
    pub fn read_snapshot(&self, id: &SnapshotId) -> Result<Snapshot> {
        let bytes = self
            .backend
            .read(FileKind::Snapshot, &id.to_hex())
            .ctx(|| format!("reading snapshot {id}"))?;
        let manifest = Manifest::decode(&self.crypto, id, &bytes)?;
        self.manifests.put(*id, &manifest);
        if let Some(cache) = &self.cache {
            cache.put_manifest(id, &bytes);
        }
        Ok(Snapshot { id: *id, manifest })
    }

    /// Writes a manifest durably: from now on the snapshot exists.
    pub fn save_snapshot(&self, manifest: &Manifest) -> Result<SnapshotId> {
        let (id, bytes) = manifest.encode(&self.crypto);
        self.backend
            .write(FileKind::Snapshot, &id.to_hex(), &bytes)
            .ctx(|| format!("writing snapshot {id}"))?;
        Ok(id)
    }

    /// Forgets a snapshot: its manifest goes, its data stays (until a prune).
    pub fn remove_snapshot(&self, id: &SnapshotId) -> Result<()> {
        self.manifests.forget(id);
        if let Some(cache) = &self.cache {
            cache.forget_manifest(id);
        }
        self.backend
            .remove(FileKind::Snapshot, &id.to_hex())
            .ctx(|| format!("removing snapshot {id}"))
    }

    // ---- blobs ----

    pub fn locate(&self, id: &BlobId) -> Result<BlobLocation> {
        if let Some(loc) = self.index.lookup(id)? {
            return Ok(loc);
        }
        // A repository server may know where it is: one pack's trailer, not every one.
        if self.learn_from_directory(&[*id])? > 0 {
            if let Some(loc) = self.index.lookup(id)? {
                return Ok(loc);
            }
        }
        // The index is a cache: before calling a blob missing, list every pack once (a
        // shard stamp that failed to show a change must not make a blob unreadable).
        if !self
            .relisted
            .swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            let stored = self
                .backend
                .list(FileKind::Pack)
                .ctx(|| "listing packs".into())?;
            let (added, _) = self.reconcile(stored, self.index.packs()?)?;
            tracing::info!("blob {id} not indexed: relisted every pack, {added} added");
        }
        self.index.lookup(id)?.ok_or_else(|| {
            Error::corrupt(
                format!("blob {id}"),
                "missing from the repository (lost pack?); run `repo index rebuild`, then `repo check`",
            )
        })
    }

    /// Reads, verifies (hash) and decodes one blob.
    pub fn read_blob(&self, id: &BlobId) -> Result<Vec<u8>> {
        self.read_blob_with(id, blob::Verify::Hash)
    }

    /// Reads and decodes one blob, checked as `verify` says.
    pub fn read_blob_with(&self, id: &BlobId, verify: blob::Verify) -> Result<Vec<u8>> {
        let loc = self.locate(id)?;
        let stored = self
            .backend
            .read_at(
                FileKind::Pack,
                &loc.pack.to_hex(),
                loc.offset,
                loc.length as usize,
            )
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::NotFound => Error::corrupt(
                    format!("pack {} (blob {id})", loc.pack),
                    format!("{e}: pack truncated or missing"),
                ),
                _ => Error::io(format!("reading pack {}", loc.pack), e),
            })?;
        blob::decode(
            &self.crypto,
            loc.kind,
            id,
            stored,
            loc.raw_length as usize,
            verify,
        )
    }

    /// Reads, verifies and decodes a tree, with every file's whole extent list (read from
    /// its extent-list blobs where the tree keeps it there).
    pub fn load_tree(&self, id: &BlobId) -> Result<Tree> {
        let mut tree = Tree::decode(&self.read_blob(id)?, id)?;
        tree.fill_content(id, |list| self.read_blob(list))?;
        Ok(tree)
    }

    // ---- index ----

    /// Reads a pack's trailer from storage.
    pub fn read_pack_trailer(&self, pack: &PackId) -> TrailerResult {
        let name = pack.to_hex();
        let what = || format!("pack {pack}");
        let size = self.backend.size(FileKind::Pack, &name).ctx(what)?;
        if size < (pack::HEADER_LEN + FOOTER_LEN) as u64 {
            return Err(Error::corrupt(what(), "shorter than a pack"));
        }
        let header = self
            .backend
            .read_at(FileKind::Pack, &name, 0, pack::HEADER_LEN)
            .ctx(what)?;
        pack::check_header(pack, &header)?;
        let footer = self
            .backend
            .read_at(FileKind::Pack, &name, size - FOOTER_LEN as u64, FOOTER_LEN)
            .ctx(what)?;
        let (start, len) = pack::trailer_span(pack, &footer, size)?;
        let sealed = self
            .backend
            .read_at(FileKind::Pack, &name, start, len)
            .ctx(what)?;
        Ok((
            size,
            pack::parse_trailer(&self.crypto, pack, &sealed, start)?,
        ))
    }

    /// Brings the index in line with the packs in storage. Returns (added, removed) packs.
    ///
    /// Every writer indexes its own packs; what this finds is packs of a writer killed
    /// before it indexed them, packs another machine wrote, and a missing or rebuilt index.
    /// Only the shards whose stamp changed since the index last reconciled them are listed
    /// (a stat per shard on an unchanged repository instead of a listing of every pack).
    pub fn sync_index(&self) -> Result<(usize, usize)> {
        let shards = self
            .backend
            .pack_shards()
            .ctx(|| "listing pack shards".into())?;
        let Some(shards) = shards else {
            let stored = self
                .backend
                .list(FileKind::Pack)
                .ctx(|| "listing packs".into())?;
            let indexed = self.index.packs()?;
            return self.reconcile(stored, indexed);
        };
        let known = self.index.shard_stamps()?;
        // A stamp from the last seconds may not show a change made within the same clock
        // tick afterwards: such shards are listed again next time.
        let settled = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i64)
            - 2_000_000_000;
        let mut stored = Vec::new();
        let mut indexed = Vec::new();
        let mut stamps = Vec::new();
        for (shard, stamp) in &shards {
            if known.get(shard) == Some(stamp) {
                continue;
            }
            let Some(first) = u8::from_str_radix(shard, 16)
                .ok()
                .filter(|_| shard.len() == 2)
            else {
                continue;
            };
            stored.extend(
                self.backend
                    .list_pack_shard(shard)
                    .ctx(|| format!("listing packs in {shard}"))?,
            );
            indexed.extend(self.index.packs_starting_with(first)?);
            stamps.push((shard, (*stamp < settled).then_some(*stamp)));
        }
        for shard in known.keys() {
            if !shards.iter().any(|(s, _)| s == shard) {
                if let Ok(first) = u8::from_str_radix(shard, 16) {
                    indexed.extend(self.index.packs_starting_with(first)?);
                }
                stamps.push((shard, None));
            }
        }
        let counts = self.reconcile(stored, indexed)?;
        let stamps: Vec<(&str, Option<i64>)> =
            stamps.into_iter().map(|(s, v)| (s.as_str(), v)).collect();
        self.index.set_shard_stamps(&stamps)?;
        Ok(counts)
    }

    /// Drops from the index the `indexed` packs not among the `stored` names; returns
    /// both as sets and how many were dropped.
    fn drop_gone(
        &self,
        stored: &[String],
        indexed: Vec<PackId>,
    ) -> Result<(HashSet<PackId>, HashSet<PackId>, usize)> {
        let stored: HashSet<PackId> = stored.iter().filter_map(|n| n.parse().ok()).collect();
        let indexed: HashSet<PackId> = indexed.into_iter().collect();
        let gone: Vec<&PackId> = indexed.difference(&stored).collect();
        for p in &gone {
            self.index.remove_pack(p)?;
        }
        let gone = gone.len();
        Ok((stored, indexed, gone))
    }

    /// Adds the `stored` packs the index lacks and drops the `indexed` ones not stored.
    fn reconcile(&self, stored: Vec<String>, indexed: Vec<PackId>) -> Result<(usize, usize)> {
        let (stored, indexed, gone) = self.drop_gone(&stored, indexed)?;
        let new: Vec<PackId> = stored.difference(&indexed).copied().collect();
        let read: Vec<(PackId, TrailerResult)> = new
            .par_iter()
            .map(|p| (*p, self.read_pack_trailer(p)))
            .collect();
        let mut added = 0;
        for (p, r) in read {
            match r {
                Ok((size, entries)) => {
                    self.index.add_pack(&p, size, &entries)?;
                    added += 1;
                }
                // A damaged pack is left out of the index; `check` reports it.
                Err(e) => tracing::warn!("pack {p} not indexed: {e}"),
            }
        }
        Ok((added, gone))
    }

    /// What a lazy open does instead of [`Self::sync_index`]: drops the packs storage no
    /// longer has (a prune elsewhere: a backup must never deduplicate against them),
    /// one listing, and reads no trailer; the packs the index lacks are learned from
    /// the storage's blob directory when asked for.
    fn drop_removed_packs(&self) -> Result<()> {
        let stored = self
            .backend
            .list(FileKind::Pack)
            .ctx(|| "listing packs".into())?;
        let (stored, _, gone) = self.drop_gone(&stored, self.index.packs()?)?;
        tracing::debug!(
            "index not synced at open ({} packs stored, {gone} gone from the index): the \
             storage's blob directory answers misses",
            stored.len()
        );
        Ok(())
    }

    /// Whether the index was left partial at open ([`OpenOptions::lazy_index`]).
    #[must_use]
    pub fn index_is_partial(&self) -> bool {
        self.partial_index
    }

    /// Asks the storage's blob directory ([`crate::store::BlobDirectory`]) about the
    /// `ids` the index lacks, and indexes each pack it names once that pack's trailer,
    /// read and authenticated here, is in hand. Returns how many of `ids` the index
    /// holds now that it lacked before. An answer its pack's trailer does not bear out
    /// (a lying or stale directory) counts for nothing: that blob is stored again.
    ///
    /// Without a directory, or when it does not answer (an older server, a failure),
    /// nothing is learned and nothing fails: the caller stores what it must.
    pub fn learn_from_directory(&self, ids: &[BlobId]) -> Result<usize> {
        let Some(directory) = self.backend.directory() else {
            return Ok(0);
        };
        let mut missing = Vec::new();
        for id in ids {
            if !self.index.contains(id)? {
                missing.push(*id);
            }
        }
        if missing.is_empty() {
            return Ok(0);
        }
        let answers = match directory.locate(&missing) {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!("the storage's blob directory did not answer ({e}); storing what the index lacks");
                return Ok(0);
            }
        };
        let asked: HashSet<&BlobId> = missing.iter().collect();
        let mut packs = Vec::new();
        for (blob, pack) in &answers {
            if asked.contains(blob)
                && !packs.contains(pack)
                && self.index.pack_size(pack)?.is_none()
            {
                packs.push(*pack);
            }
        }
        let read: Vec<(PackId, TrailerResult)> = packs
            .par_iter()
            .map(|p| (*p, self.read_pack_trailer(p)))
            .collect();
        for (pack, trailer) in read {
            match trailer {
                Ok((size, entries)) => self.index.add_pack(&pack, size, &entries)?,
                Err(e) => tracing::warn!(
                    "pack {pack}, named by the storage's blob directory, not indexed: {e}"
                ),
            }
        }
        let mut learned = 0;
        for id in &missing {
            if self.index.contains(id)? {
                learned += 1;
            }
        }
        let claimed: HashSet<&BlobId> = answers
            .iter()
            .map(|(b, _)| b)
            .filter(|b| asked.contains(b))
            .collect();
        if claimed.len() > learned {
            tracing::warn!(
                "the storage's blob directory named packs for {} blobs their trailers do not list: stored again",
                claimed.len() - learned
            );
        }
        Ok(learned)
    }

    /// Recreates the index from the pack trailers alone.
    pub fn rebuild_index(&self) -> Result<(usize, usize)> {
        self.index.clear()?;
        self.sync_index()
    }
}

fn identity_of(config: &Config, crypto: &Crypto) -> Identity {
    Identity {
        id: config.id,
        encryption: config.encryption,
        key: crate::trust::KeyFingerprint::of(crypto.master_key()),
    }
}

/// The repository's cache on this host, when `opts` names a cache root. A cache that
/// cannot be made is warned about: the repository opens without one (slower, not wrong).
fn open_cache(opts: &OpenOptions, config: &Config, location: &str) -> Option<RepositoryCache> {
    let root = opts.cache.as_ref()?;
    match RepositoryCache::open(root, &config.id, location) {
        Ok(cache) => {
            if let Some(old) = &opts.legacy_index {
                cache.adopt_index(old);
            }
            Some(cache)
        }
        Err(e) => {
            tracing::warn!(
                "no cache for {location} in {} ({e}): the index is kept in memory",
                root.display()
            );
            None
        }
    }
}

fn open_index(opts: &OpenOptions, cache: Option<&RepositoryCache>) -> Result<Index> {
    match (&opts.index, cache) {
        (Some(path), _) => Index::open(path),
        (None, Some(cache)) => Index::open(&cache.index_path()),
        (None, None) => Index::in_memory(),
    }
}

/// The bytes of `config`, or [`Error::NotARepository`] when there is none.
fn read_config(backend: &dyn Backend) -> Result<Vec<u8>> {
    match backend.read(FileKind::Config, "config") {
        Ok(b) => Ok(b),
        Err(e)
            if e.kind() == std::io::ErrorKind::NotFound
                || e.raw_os_error() == Some(libc::ENOTDIR) =>
        {
            Err(Error::NotARepository {
                path: PathBuf::from(backend.location()),
            })
        }
        Err(e) => Err(Error::io(format!("{}/config", backend.location()), e)),
    }
}

/// Finds the key file that `password` opens (asked only for an encrypted repository).
/// A key file of the other kind than the repository's encryption (one that opens
/// without a password in an encrypted repository, or the reverse) is refused: it can
/// only have been planted.
fn unlock(
    backend: &dyn Backend,
    encryption: Encryption,
    password: PasswordSource<'_>,
) -> Result<(KeyId, MasterKey)> {
    let keys = backend.list(FileKind::Key).ctx(|| "listing keys".into())?;
    if keys.is_empty() {
        return Err(Error::corrupt("keys/", "the repository has no key file"));
    }
    let pw = match encryption {
        Encryption::None => Zeroizing::new(Vec::new()),
        Encryption::Aes256Gcm => password()?,
    };
    let expected = match encryption {
        Encryption::None => "none",
        Encryption::Aes256Gcm => "argon2id",
    };
    for name in &keys {
        let Ok(id) = name.parse::<KeyId>() else {
            continue;
        };
        let bytes = backend
            .read(FileKind::Key, name)
            .ctx(|| format!("reading keys/{name}"))?;
        let kf = match KeyFile::from_json(&bytes, &id) {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!("skipping unreadable key file: {e}");
                continue;
            }
        };
        if kf.kdf.algorithm != expected {
            return Err(Error::corrupt(
                format!("keys/{name}"),
                format!(
                    "a key file of kind {:?} in a repository whose encryption needs {expected:?}: \
                     it was not written by cairn and may have been planted to substitute the \
                     master key; nothing was opened (remove it if you know where it came from)",
                    kf.kdf.algorithm
                ),
            ));
        }
        if let Some(k) = kf.unwrap_key(&pw)? {
            return Ok((id, k));
        }
    }
    Err(Error::WrongPassword)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::sim::SimFs;
    use crate::test_util::{bytes, sim_backend, sim_open, sim_repo, small_config, snapshot_of};

    fn open_pw(fs: &SimFs, pw: &'static [u8], opts: &OpenOptions) -> Result<Repository> {
        Repository::open_with(sim_backend(fs), opts, &|| Ok(Zeroizing::new(pw.to_vec())))
    }

    #[test]
    fn manifests_read_once_are_shared_by_handles_but_check_reads_them_again() {
        let (_fs, repo) = sim_repo(small_config(Encryption::Aes256Gcm));
        let id = snapshot_of(&repo, &[("a", bytes(1, 1000))]);
        assert_eq!(repo.snapshots().unwrap().len(), 1);
        // The manifest is damaged behind the repository's back.
        let name = id.to_hex();
        repo.backend().remove(FileKind::Snapshot, &name).unwrap();
        repo.backend()
            .write(FileKind::Snapshot, &name, b"CAIRNSNP garbage")
            .unwrap();
        // Readers keep the manifest they authenticated, in every handle...
        let other = repo.another_handle(&OpenOptions::default()).unwrap();
        assert_eq!(other.snapshots().unwrap()[0].id, id);
        // ...and a check reads it from storage and reports it.
        assert!(repo.read_snapshot(&id).is_err());
        let report = crate::check::check(
            &repo,
            &crate::check::CheckOptions::default(),
            &crate::progress::Progress::default(),
        )
        .unwrap();
        assert!(!report.ok());
        assert!(
            report.problems[0].object.contains(&name),
            "{:?}",
            report.problems
        );
        // A removed snapshot is gone from the listing at once.
        repo.remove_snapshot(&id).unwrap();
        assert!(other.snapshots().unwrap().is_empty());
    }

    #[test]
    fn opening_says_what_is_wrong() {
        let empty = SimFs::new();
        assert_eq!(
            sim_open(&empty).err().unwrap().kind(),
            crate::ErrorKind::NotARepository
        );
        let (fs, repo) = sim_repo(small_config(Encryption::Aes256Gcm));
        drop(repo);
        let err = open_pw(&fs, b"nope", &OpenOptions::default())
            .err()
            .unwrap();
        assert_eq!(err.kind(), crate::ErrorKind::WrongPassword);
        // A newer format is refused before any password is asked.
        let config = fs.files_under(Path::new("/repo/config")).remove(0).1;
        let len = u32::from_le_bytes(config[8..12].try_into().unwrap()) as usize;
        let body = String::from_utf8(config[12..12 + len].to_vec())
            .unwrap()
            .replace("\"version\": 2", "\"version\": 9");
        let mut newer = config[..8].to_vec();
        newer.extend_from_slice(&(body.len() as u32).to_le_bytes());
        newer.extend_from_slice(body.as_bytes());
        newer.extend_from_slice(&config[12 + len..]);
        let future = fs.fork();
        future.tamper(Path::new("/repo/config"), newer).unwrap();
        let asked = std::sync::atomic::AtomicBool::new(false);
        let err = Repository::open_with(sim_backend(&future), &OpenOptions::default(), &|| {
            asked.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok(Zeroizing::new(b"pw".to_vec()))
        })
        .err()
        .unwrap();
        assert_eq!(err.kind(), crate::ErrorKind::UnsupportedVersion, "{err}");
        assert!(!asked.into_inner());
        // No key file at all.
        let keyless = fs.fork();
        for (p, _) in keyless.files_under(Path::new("/repo/keys")) {
            crate::store::fs::Fs::remove_file(&keyless, &p).unwrap();
        }
        assert_eq!(
            sim_open(&keyless).err().unwrap().kind(),
            crate::ErrorKind::Corrupt
        );
    }

    #[test]
    fn a_key_file_that_needs_no_password_in_an_encrypted_repository_is_refused() {
        let (fs, repo) = sim_repo(small_config(Encryption::Aes256Gcm));
        let planted = KeyFile::create(
            &MasterKey::generate(),
            Encryption::None,
            b"",
            KdfParams::TEST_ONLY_WEAK,
            "storage",
            "mallory",
        )
        .unwrap();
        repo.backend()
            .write(FileKind::Key, &"0".repeat(64), &planted.to_json())
            .unwrap();
        drop(repo);
        let err = sim_open(&fs).err().unwrap();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        assert!(err.to_string().contains("planted"), "{err}");
    }

    #[test]
    fn a_known_repository_must_keep_its_identity() {
        let d = tempfile::tempdir().unwrap();
        let opts = OpenOptions {
            known: Some(KnownRepositories::at(d.path().join("known.json"))),
            ..OpenOptions::default()
        };
        let (fs, repo) = sim_repo(small_config(Encryption::Aes256Gcm));
        let identity = repo.identity();
        drop(repo);
        open_pw(&fs, b"pw", &opts).unwrap();
        // Another repository in its place (same location): refused.
        let (other, repo) = sim_repo(small_config(Encryption::Aes256Gcm));
        drop(repo);
        let err = open_pw(&other, b"pw", &opts).err().unwrap();
        assert_eq!(err.kind(), crate::ErrorKind::IdentityChanged, "{err}");
        // Accepted on purpose, it opens; the first one is now the stranger.
        let known = opts.known.as_ref().unwrap();
        let theirs = open_pw(&other, b"pw", &OpenOptions::default())
            .unwrap()
            .identity();
        known.accept("/repo", &theirs).unwrap();
        open_pw(&other, b"pw", &opts).unwrap();
        assert!(open_pw(&fs, b"pw", &opts).is_err());
        assert_ne!(identity, theirs);
    }

    #[test]
    fn packs_written_by_another_process_are_found_and_a_miss_relists_once() {
        let (fs, repo) = sim_repo(small_config(Encryption::Aes256Gcm));
        // "Another process": a second open of the same storage writes a snapshot.
        let other = sim_open(&fs).unwrap();
        let data = bytes(5, 10_000);
        let snap = snapshot_of(&other, &[("f", data.clone())]);
        let root = other.load_snapshot(&snap).unwrap().manifest.root;
        // Our index has never heard of its pack: the read lists the packs and finds it.
        assert!(!repo.index().contains(&root).unwrap());
        let tree = repo.load_tree(&root).unwrap();
        let blob = tree.nodes[0].content[0].blob.unwrap();
        assert_eq!(repo.read_blob(&blob).unwrap(), data);
        // A blob that is nowhere is reported missing, after one listing only.
        let nowhere = BlobId(Id::from_bytes([9; 32]));
        let err = repo.read_blob(&nowhere).unwrap_err();
        assert_eq!(err.kind(), crate::ErrorKind::Corrupt);
        assert!(err.to_string().contains("missing"), "{err}");
        // sync_index picks up what appeared.
        let (added, removed) = sim_open(&fs).unwrap().sync_index().unwrap();
        assert_eq!((added, removed), (0, 0));
    }

    #[test]
    fn the_format_upgrade_needs_the_lock_and_keeps_every_parameter() {
        let mut config = small_config(Encryption::Aes256Gcm);
        config.version = 1;
        let (fs, mut repo) = sim_repo(config.clone());
        assert!(repo.upgrade_format().is_err());
        repo.lock(LockKind::Exclusive, "upgrade", std::time::Duration::ZERO)
            .unwrap();
        assert_eq!(repo.upgrade_format().unwrap(), (1, 2));
        assert_eq!(repo.upgrade_format().unwrap(), (2, 2));
        drop(repo);
        let after = sim_open(&fs).unwrap();
        let c = after.config();
        assert_eq!(c.version, 2);
        assert_eq!(
            (c.id, c.pack_size, c.chunker),
            (config.id, config.pack_size, config.chunker)
        );
    }
}

/// Snapshot manifests already read and authenticated, by id. A snapshot's id is the
/// hash of its manifest, so an id names one manifest forever: what was read once need
/// not be read (nor decrypted) again. A listing still lists the directory, so a removed
/// or a new snapshot is seen at once. Bounded: past [`ManifestCache::MAX`] entries,
/// further manifests are read each time.
#[derive(Debug, Default)]
struct ManifestCache {
    map: std::sync::Mutex<std::collections::HashMap<SnapshotId, Manifest>>,
}

impl ManifestCache {
    /// About 1 KiB each: 100,000 manifests hold ~100 MiB at most.
    const MAX: usize = 100_000;

    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<SnapshotId, Manifest>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, id: &SnapshotId) -> Option<Manifest> {
        self.lock().get(id).cloned()
    }

    fn put(&self, id: SnapshotId, manifest: &Manifest) {
        let mut map = self.lock();
        if map.len() < Self::MAX {
            map.insert(id, manifest.clone());
        }
    }

    fn forget(&self, id: &SnapshotId) {
        self.lock().remove(id);
    }
}
