//! The operations the daemon runs on request beside jobs: instant recovery sessions of
//! a database or a VM from a configured repository's snapshot, the hypervisor's
//! domains, and repository maintenance (check, prune, repair).
//!
//! Each is one call that does the whole thing and returns what it made; the API is a
//! thin layer over them (as `repo recover`, `repo vm` and `repo check` are over the
//! same library calls). Recovery sessions are host state (`cairn_recover::Store`, in the
//! daemon's state directory), so `repo recover list|stop` on the host sees the ones the
//! daemon started, and the other way round.

use std::time::Duration;

use cairn_agent::libvirt::{Hypervisor, VmError, VmSummary};
use cairn_engine::lock::LockKind;
use cairn_recover::{mounting, RecoverError, Runtime, SessionRecord, Store};
use serde::{Deserialize, Serialize};

use crate::browse::{self, BrowseError};
use crate::job::{default_repository, default_true};
use crate::repos::RepoError;
use crate::site::Site;

#[derive(Debug, thiserror::Error)]
pub enum OperationError {
    #[error(transparent)]
    Repo(#[from] RepoError),
    #[error(transparent)]
    Snapshot(#[from] BrowseError),
    #[error(transparent)]
    Recover(#[from] RecoverError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("the repository is locked: {0}")]
    Locked(String),
    #[error("{0}")]
    Engine(#[from] cairn_engine::Error),
}

/// A database recovery: `repo recover db` through the daemon.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DbRecovery {
    /// A repository of the daemon's configuration.
    #[serde(default = "default_repository")]
    pub repository: String,
    /// A snapshot id (or a unique prefix), or `latest`.
    pub snapshot: String,
    /// The port on 127.0.0.1 (a free one when left out).
    pub port: Option<u16>,
    /// The container image (the engine's default when left out).
    pub image: Option<String>,
    /// Writes allowed (they go into the session's layer, never the repository).
    #[serde(default)]
    pub writable: bool,
    /// `docker` (the default) or `process`.
    pub runtime: Option<String>,
    /// How long the server may take to accept connections, in seconds (default 120).
    pub timeout_seconds: Option<u64>,
    /// Where writes land: `block` (the default: the mount's writable layer, copy on
    /// write in 64 KiB chunks) or `overlay` (overlayfs, whole files copied up).
    pub layer: Option<String>,
}

/// A VM recovery: `repo recover vm` through the daemon.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmRecovery {
    #[serde(default = "default_repository")]
    pub repository: String,
    pub snapshot: String,
    /// The new domain's name (`<name>-recovered-<id>` when left out).
    pub name: Option<String>,
    /// `isolated` (the default), `none`, or a libvirt network's name.
    pub network: Option<String>,
    /// Start it (the default) or only define it.
    #[serde(default = "default_true")]
    pub start: bool,
}

fn runtime_of(name: Option<&str>) -> Result<Runtime, OperationError> {
    match name.unwrap_or("docker") {
        "docker" => Ok(Runtime::Docker),
        "process" => Ok(Runtime::Process),
        other => Err(OperationError::Invalid(format!(
            "runtime {other:?}: docker or process"
        ))),
    }
}

/// What a session's mount needs: the repository's path and password.
pub(crate) struct MountSource {
    pub(crate) path: std::path::PathBuf,
    password: zeroize::Zeroizing<Vec<u8>>,
}

impl MountSource {
    fn of(site: &Site, name: &str) -> Result<Self, OperationError> {
        Self::of_repos(&site.repos, name)
    }

    pub(crate) fn of_repos(
        repos: &crate::repos::Repositories,
        name: &str,
    ) -> Result<Self, OperationError> {
        let config = repos.known_config(name)?;
        let password = repos.password(name)?;
        let path = std::fs::canonicalize(&config.path).unwrap_or_else(|_| config.path.clone());
        Ok(Self { path, password })
    }

    pub(crate) fn spawn(&self, m: &mounting::SessionMount<'_>) -> Result<u32, String> {
        let exe = std::env::current_exe().map_err(|e| format!("finding the repo binary: {e}"))?;
        let args = mounting::session_mount_args(&self.path, m);
        mounting::spawn(&exe, &args, Some(&self.password), m.mountpoint)
            .map(|m| m.pid)
            .map_err(|e| format!("mounting the repository: {e}"))
    }
}

fn store(site: &Site) -> Result<Store, OperationError> {
    Ok(Store::open(&site.state_dir)?)
}

/// Starts a database recovery session and returns it once the server accepts
/// connections.
pub fn recover_database(site: &Site, req: &DbRecovery) -> Result<SessionRecord, OperationError> {
    let runtime = runtime_of(req.runtime.as_deref())?;
    let repo = site.repos.handle(&req.repository)?;
    let snap = browse::find(&repo, &req.snapshot)?;
    drop(repo);
    let source = MountSource::of(site, &req.repository)?;
    let layer = cairn_recover::Layer::parse(req.layer.as_deref().unwrap_or("block"))
        .map_err(|e| OperationError::Invalid(e.to_string()))?;
    let spawn = |m: &mounting::SessionMount<'_>| source.spawn(m);
    let request = cairn_recover::Request {
        snapshot: &snap,
        repository: source.path.clone(),
        port: req.port,
        image: req.image.clone(),
        writable: req.writable,
        runtime,
        timeout: Duration::from_secs(req.timeout_seconds.unwrap_or(120)),
        layer,
        layer_chunk: None,
        spawn_mount: &spawn,
        verifier: None,
    };
    Ok(cairn_recover::start(&store(site)?, &request)?)
}

/// What `POST /recovery/{id}/commit` takes.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CommitRequest {
    /// Tags for the new snapshot, besides the original's.
    #[serde(default)]
    pub tags: Vec<String>,
}

/// Backs up writable database session `id`'s current state as a new snapshot of its
/// source, into the configured repository the session was started from.
pub fn commit_recovery(
    site: &Site,
    id: &str,
    req: &CommitRequest,
) -> Result<cairn_engine::snapshot::Snapshot, OperationError> {
    let store = store(site)?;
    let rec = store
        .get(id)?
        .ok_or_else(|| RecoverError::NoSession(id.to_owned()))?;
    let same = |p: &std::path::Path| {
        std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned())
            == std::path::Path::new(&rec.repository)
    };
    let name = site
        .repos
        .names()
        .into_iter()
        .find(|n| site.repos.config(n).is_some_and(|c| same(&c.path)))
        .ok_or_else(|| {
            OperationError::Invalid(format!(
                "session {id} was started from {}, which is no repository of this daemon",
                rec.repository
            ))
        })?;
    let repo = site.repos.handle(&name)?;
    Ok(cairn_recover::commit::commit(&store, &repo, id, &req.tags)?)
}

/// Snapshot `spec` of `repository`, which must be a VM's.
fn vm_snapshot(
    site: &Site,
    repository: &str,
    spec: &str,
) -> Result<(cairn_engine::Repository, cairn_engine::snapshot::Snapshot), OperationError> {
    let repo = site.repos.handle(repository)?;
    let snap = browse::find(&repo, spec)?;
    if !cairn_agent::libvirt::backup::is_vm_snapshot(&snap) {
        return Err(OperationError::Invalid(format!(
            "snapshot {} is not a VM's (take one with `repo backup --vm NAME`)",
            snap.id.short()
        )));
    }
    Ok((repo, snap))
}

/// Starts a VM recovery session: the domain is defined (and started) on overlays of the
/// snapshot's mounted disks.
pub fn recover_vm(site: &Site, req: &VmRecovery) -> Result<SessionRecord, OperationError> {
    let (repo, snap) = vm_snapshot(site, &req.repository, &req.snapshot)?;
    drop(repo);
    let uri = site.config.libvirt_uri.clone();
    let hv = Hypervisor::connect(uri.as_deref())?;
    let network = hv.network(req.network.as_deref().unwrap_or("isolated"))?;
    drop(hv);
    let source = MountSource::of(site, &req.repository)?;
    let spawn = |m: &mounting::SessionMount<'_>| source.spawn(m);
    let request = cairn_recover::vm::VmRequest {
        snapshot: &snap,
        repository: source.path.clone(),
        name: req.name.clone(),
        network,
        start: req.start,
        uri,
        spawn_mount: &spawn,
        lab: None,
        verifier: None,
    };
    Ok(cairn_recover::vm::start(&store(site)?, &request)?)
}

/// The hypervisor's domains.
pub fn list_vms(site: &Site) -> Result<Vec<VmSummary>, OperationError> {
    let hv = Hypervisor::connect(site.config.libvirt_uri.as_deref())?;
    let mut out = Vec::new();
    for vm in hv.vms()? {
        out.push(vm.summary()?);
    }
    Ok(out)
}

/// What can be done to a domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VmAction {
    Start,
    /// A clean shutdown through ACPI, waited for.
    Shutdown,
    /// Pulled plug.
    PowerOff,
    Reboot,
}

/// How long a clean shutdown may take before it is an error.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(120);

/// Runs `action` on domain `name` and returns the domain as it is afterwards.
pub fn vm_action(site: &Site, name: &str, action: VmAction) -> Result<VmSummary, OperationError> {
    let hv = Hypervisor::connect(site.config.libvirt_uri.as_deref())?;
    let vm = hv.vm(name)?;
    match action {
        VmAction::Start => vm.start()?,
        VmAction::Shutdown => vm.stop(false, SHUTDOWN_WAIT)?,
        VmAction::PowerOff => vm.stop(true, SHUTDOWN_WAIT)?,
        VmAction::Reboot => vm.reboot()?,
    }
    Ok(vm.summary()?)
}

/// The domain's libvirt snapshots (names, oldest first).
pub fn vm_snapshots(site: &Site, name: &str) -> Result<Vec<String>, OperationError> {
    let hv = Hypervisor::connect(site.config.libvirt_uri.as_deref())?;
    Ok(hv.vm(name)?.snapshots()?)
}

/// Deletes one of the domain's libvirt snapshots.
pub fn delete_vm_snapshot(site: &Site, name: &str, snapshot: &str) -> Result<(), OperationError> {
    let hv = Hypervisor::connect(site.config.libvirt_uri.as_deref())?;
    let vm = hv.vm(name)?;
    if !vm.snapshots()?.iter().any(|s| s == snapshot) {
        return Err(OperationError::NotFound(format!(
            "domain {name} has no snapshot {snapshot:?}"
        )));
    }
    Ok(vm.delete_snapshot(snapshot)?)
}

/// A full restore of a VM snapshot as a new domain: `repo vm clone`.
#[derive(Debug, Clone, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VmClone {
    #[serde(default = "default_repository")]
    pub repository: String,
    pub snapshot: String,
    /// The new domain's name (it must be free).
    pub name: String,
    /// Where its disks go (`/var/lib/libvirt/images` by default); existing files are
    /// never written over.
    #[schema(value_type = Option<String>)]
    pub to: Option<std::path::PathBuf>,
    /// `none` (the default), `isolated`, or a libvirt network's name.
    pub network: Option<String>,
}

/// Restores `req.snapshot` whole as domain `req.name` (defined, not started).
pub fn clone_vm(
    site: &Site,
    req: &VmClone,
) -> Result<cairn_agent::libvirt::restore::RestoredVm, OperationError> {
    let dir = req
        .to
        .clone()
        .unwrap_or_else(|| std::path::PathBuf::from("/var/lib/libvirt/images"));
    if !dir.is_absolute() {
        return Err(OperationError::Invalid(format!(
            "to {:?}: an absolute directory",
            dir.display()
        )));
    }
    let (repo, snap) = vm_snapshot(site, &req.repository, &req.snapshot)?;
    repo.lock(LockKind::Shared, "clone (api)", LOCK_WAIT)
        .map_err(|e| lock_err(&e))?;
    let hv = Hypervisor::connect(site.config.libvirt_uri.as_deref())?;
    let opts = cairn_agent::libvirt::restore::RestoreVmOptions {
        name: Some(req.name.clone()),
        dir,
        format: "qcow2".into(),
        network: hv.network(req.network.as_deref().unwrap_or("none"))?,
    };
    Ok(cairn_agent::libvirt::restore::restore_vm(
        &repo,
        &hv,
        &snap,
        &opts,
        &cairn_engine::progress::Progress::default(),
    )?)
}

/// A check of a repository.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckRequest {
    /// Read and verify every pack's data (slow), not only the structure.
    #[serde(default)]
    pub read_data: bool,
    /// Only subset `n/m` of the packs' data (with `read_data`), e.g. `1/10`.
    pub subset: Option<String>,
}

impl CheckRequest {
    /// What the check reads, as a job's `verify.check` says it: `metadata`,
    /// `read-data` or `N/M`.
    #[must_use]
    pub fn how(&self) -> String {
        match (&self.subset, self.read_data) {
            (Some(s), _) => s.clone(),
            (None, true) => "read-data".into(),
            (None, false) => "metadata".into(),
        }
    }
}

fn lock_err(e: &cairn_engine::Error) -> OperationError {
    OperationError::Locked(e.to_string())
}

/// How long an operation asked for through the API waits for the repository's lock (a
/// running backup, another prune) before it answers `locked`: a client is waiting.
const LOCK_WAIT: Duration = Duration::from_secs(10);

/// The repositories a prune or a repair of this daemon is working on: a second one of
/// the same repository is refused at once (two prunes would each hold a shared lock and
/// wait for the other's to become exclusive).
static MAINTAINED: std::sync::Mutex<std::collections::BTreeSet<String>> =
    std::sync::Mutex::new(std::collections::BTreeSet::new());

/// Marks `name` as under maintenance until dropped.
struct Maintaining(String);

impl Maintaining {
    fn start(name: &str, what: &str) -> Result<Self, OperationError> {
        let mut set = MAINTAINED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if !set.insert(name.to_owned()) {
            return Err(OperationError::Locked(format!(
                "a prune or repair of repository {name:?} is running; {what} waits for it to end"
            )));
        }
        Ok(Self(name.to_owned()))
    }
}

impl Drop for Maintaining {
    fn drop(&mut self) {
        MAINTAINED
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.0);
    }
}

/// Checks repository `name`: `repo check` through the daemon.
pub fn check(
    site: &Site,
    name: &str,
    req: &CheckRequest,
) -> Result<cairn_engine::check::CheckReport, OperationError> {
    let subset = match &req.subset {
        None => None,
        Some(s) => Some(parse_subset(s)?),
    };
    let repo = site.repos.handle(name)?;
    repo.lock(LockKind::Shared, "check (api)", LOCK_WAIT)
        .map_err(|e| lock_err(&e))?;
    let opts = cairn_engine::check::CheckOptions {
        read_data: req.read_data || subset.is_some(),
        subset,
    };
    Ok(cairn_engine::check::check(
        &repo,
        &opts,
        &cairn_engine::progress::Progress::default(),
    )?)
}

fn parse_subset(s: &str) -> Result<(u32, u32), OperationError> {
    cairn_engine::check::parse_subset(s).map_err(|e| OperationError::Invalid(format!("subset {e}")))
}

/// A prune of a repository.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    /// Plan and report, change nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Rewrite a pack when more than this share (0..=1) of it is unused (default 0.1).
    pub max_unused: Option<f64>,
}

/// Prunes repository `name`: frees what no snapshot uses.
pub fn prune(
    site: &Site,
    name: &str,
    req: &PruneRequest,
) -> Result<cairn_engine::prune::PruneReport, OperationError> {
    let max_unused = req.max_unused.unwrap_or(0.1);
    if !(0.0..=1.0).contains(&max_unused) {
        return Err(OperationError::Invalid(format!(
            "max_unused {max_unused}: a share between 0 and 1"
        )));
    }
    let repo = site.repos.handle(name)?;
    let _busy = Maintaining::start(name, "this prune")?;
    repo.lock(LockKind::Shared, "prune (api)", LOCK_WAIT)
        .map_err(|e| lock_err(&e))?;
    let opts = cairn_engine::prune::PruneOptions {
        max_unused,
        dry_run: req.dry_run,
        lock_wait: LOCK_WAIT,
        ..cairn_engine::prune::PruneOptions::default()
    };
    cairn_engine::prune::prune(&repo, &opts).map_err(|e| match e {
        cairn_engine::Error::Locked(m) => OperationError::Locked(m),
        other => other.into(),
    })
}

/// A repair of a repository.
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RepairRequest {
    /// Read every pack to find damaged blobs (the default); without it only the
    /// structure is looked at.
    #[serde(default = "default_true")]
    pub read_data: bool,
}

/// Repairs repository `name`: rebuilds the index from the packs, marks what is lost.
pub fn repair(
    site: &Site,
    name: &str,
    req: &RepairRequest,
) -> Result<cairn_engine::repair::RepairReport, OperationError> {
    let repo = site.repos.handle(name)?;
    let _busy = Maintaining::start(name, "this repair")?;
    repo.lock(LockKind::Exclusive, "repair (api)", LOCK_WAIT)
        .map_err(|e| lock_err(&e))?;
    let opts = cairn_engine::repair::RepairOptions {
        read_data: req.read_data,
        lock_wait: LOCK_WAIT,
    };
    Ok(cairn_engine::repair::repair(&repo, &opts)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subset_is_n_of_m() {
        assert_eq!(parse_subset("1/10").unwrap(), (1, 10));
        assert_eq!(parse_subset(" 3 / 3 ").unwrap(), (3, 3));
        for bad in ["0/10", "4/3", "1", "a/b", "1/", "/2", "-1/2"] {
            assert!(parse_subset(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn runtimes_are_docker_or_process() {
        assert_eq!(runtime_of(None).unwrap(), Runtime::Docker);
        assert_eq!(runtime_of(Some("process")).unwrap(), Runtime::Process);
        assert!(runtime_of(Some("podman")).is_err());
    }

    #[test]
    fn a_second_maintenance_of_a_repository_is_refused_until_the_first_ends() {
        let first = Maintaining::start("test-repo-a", "this prune").unwrap();
        let e = Maintaining::start("test-repo-a", "this repair")
            .err()
            .unwrap();
        assert!(e.to_string().contains("is running"), "{e}");
        let other = Maintaining::start("test-repo-b", "this prune").unwrap();
        drop(first);
        Maintaining::start("test-repo-a", "this repair").unwrap();
        drop(other);
    }

    #[test]
    fn requests_refuse_unknown_fields() {
        assert!(serde_json::from_str::<PruneRequest>(r#"{"dry_run": true, "x": 1}"#).is_err());
        let r: DbRecovery = serde_json::from_str(r#"{"snapshot": "latest"}"#).unwrap();
        assert_eq!(r.repository, "default");
        assert!(!r.writable);
        let v: VmRecovery = serde_json::from_str(r#"{"snapshot": "latest"}"#).unwrap();
        assert!(v.start);
        let a: VmAction = serde_json::from_str(r#""power_off""#).unwrap();
        assert_eq!(a, VmAction::PowerOff);
    }
}
