//! Instant recovery of a database: a backup answering queries in seconds, without a
//! restore.
//!
//! A session stacks three things, each recorded (in [`state`]) before it is made:
//! 1. the data directory, writable, at `sessions/<id>/merged`. By default
//!    ([`Layer::Block`]) a `repo mount --writable-layer` daemon serves the snapshot's
//!    root there, every write copied on write in 64 KiB chunks into `layer/`: a first
//!    query costs what it reads, not the size of the files it touches. With
//!    [`Layer::Overlay`] the repository is mounted read-only at `mnt/` and an overlay
//!    stacks an empty `upper/` on the snapshot (whole files copied up on first write).
//!    Either way the data directory keeps its owner and mode, nothing is copied or
//!    chowned, and the repository is never written;
//! 2. the session's own files in `conf/` (access rules, credentials, the socket);
//! 3. the server, started by a [`ServerRuntime`]: a Docker container of the recorded
//!    version's image, or the host's own binaries.
//!
//! [`stop`] takes them down in reverse order and forgets the session; [`cleanup`] does
//! that for every session whose creator died (killed, a reboot) and for anything labelled
//! or placed as a session that has no record.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_agent::database::{DatabaseMeta, Method};
use cairn_agent::process::pid_alive;
use cairn_engine::snapshot::Snapshot;

use crate::docker::Docker;
use crate::engines::{self, ServerView};
use crate::mounting::{SessionMount, SpawnMount, WritableLayer};
use crate::runtime::{self, Launch, Runtime, ServerRuntime};
use crate::state::{SessionRecord, SessionState, Store};
use crate::{
    chown, mkdir, random_token, remove_session_dir, stop_process, unmount_if_mounted, RecoverError,
};
use cairn_mount::is_mountpoint;

pub struct Request<'a> {
    pub snapshot: &'a Snapshot,
    pub repository: PathBuf,
    pub port: Option<u16>,
    pub image: Option<String>,
    pub writable: bool,
    pub runtime: Runtime,
    /// How long the server may take to answer (crash recovery replays WAL).
    pub timeout: Duration,
    /// What the server writes into.
    pub layer: Layer,
    /// The block layer's copy-on-write chunk in bytes (`None`: 64 KiB).
    pub layer_chunk: Option<u64>,
    /// Starts a `repo mount` daemon of the repository; returns its pid once mounted.
    pub spawn_mount: SpawnMount<'a>,
    /// The verifying process, when this session is a verification's.
    pub verifier: Option<u32>,
}

/// Where a session's writes land (recorded in the session as `block` or `overlay`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layer {
    /// The mount's own writable layer: copy on write in chunks.
    #[default]
    Block,
    /// overlayfs over the read-only mount: whole files copied up on first write.
    Overlay,
}

impl Layer {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::Overlay => "overlay",
        }
    }

    /// `block` or `overlay`.
    pub fn parse(s: &str) -> Result<Self, RecoverError> {
        match s {
            "block" => Ok(Self::Block),
            "overlay" => Ok(Self::Overlay),
            _ => Err(RecoverError::Setup(format!(
                "unknown layer {s:?}: block or overlay"
            ))),
        }
    }
}

fn free_port() -> Result<u16, RecoverError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| RecoverError::Io {
        what: "finding a free port".into(),
        source: e,
    })?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| RecoverError::Io {
            what: "finding a free port".into(),
            source: e,
        })
}

fn overlay_mount(
    lower: &Path,
    upper: &Path,
    work: &Path,
    merged: &Path,
) -> Result<(), RecoverError> {
    for p in [lower, upper, work] {
        let s = p.to_string_lossy();
        if s.contains(':') || s.contains(',') || s.contains('\\') {
            return Err(RecoverError::Setup(format!(
                "{s}: an overlay layer path may not hold ':', ',' or '\\' (set CAIRN_STATE_DIR elsewhere)"
            )));
        }
    }
    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        lower.display(),
        upper.display(),
        work.display()
    );
    let mut cmd = if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("mount");
        c.args(["-t", "overlay", "overlay", "-o", &opts])
            .arg(merged);
        c
    } else {
        let mut c = Command::new("fuse-overlayfs");
        c.arg("-o").arg(&opts).arg(merged);
        c
    };
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| RecoverError::Io {
            what: format!("running {:?} (for the overlay)", cmd.get_program()),
            source: e,
        })?;
    if !out.status.success() {
        return Err(RecoverError::Setup(format!(
            "mounting the overlay at {} failed: {}",
            merged.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(())
}

/// Starts a session; on any failure everything made so far is taken down again.
pub fn start(store: &Store, req: &Request<'_>) -> Result<SessionRecord, RecoverError> {
    let snap = req.snapshot;
    let meta = DatabaseMeta::from_meta(&snap.manifest.meta)
        .filter(|m| m.method == Method::Physical)
        .ok_or_else(|| RecoverError::NotADatabase(snap.id.short()))?;
    let mut runtime = runtime::for_request(req.runtime)?;
    let image = req
        .image
        .clone()
        .unwrap_or_else(|| engines::default_image(&meta));
    runtime.check(&image)?;
    let id = random_token(8).to_lowercase();
    let dir = store.sessions_dir().join(&id);
    let mut rec = SessionRecord {
        id: id.clone(),
        state: SessionState::Starting,
        engine: meta.engine.as_str().into(),
        snapshot: snap.id.to_hex(),
        repository: req.repository.display().to_string(),
        runtime: runtime.name().into(),
        writable: req.writable,
        creator_pid: std::process::id(),
        dir: dir.clone(),
        container: None,
        server_pid: None,
        mount_pid: None,
        port: None,
        user: None,
        password: None,
        database: None,
        created: chrono::Utc::now().to_rfc3339(),
        domain: None,
        uri: None,
        disks: Vec::new(),
        layer: req.layer.as_str().into(),
        lab: None,
        verifier: req.verifier,
    };
    store.put(&rec)?;
    let made = set_up(store, req, &meta, &image, runtime.as_mut(), &mut rec);
    if let Err(e) = made {
        if let Err(e2) = stop_server_and_files(store, &rec, Some(runtime.as_ref())) {
            tracing::warn!("cleaning up the failed session {id}: {e2}");
        }
        return Err(e);
    }
    Ok(rec)
}

fn set_up(
    store: &Store,
    req: &Request<'_>,
    meta: &DatabaseMeta,
    image: &str,
    runtime: &mut dyn ServerRuntime,
    rec: &mut SessionRecord,
) -> Result<(), RecoverError> {
    let dir = rec.dir.clone();
    mkdir(&dir, 0o711)?;
    let (merged, conf) = (dir.join("merged"), dir.join("conf"));
    mkdir(&merged, 0o711)?;
    // 1. the data directory, writable
    let (uid, gid) = match req.layer {
        Layer::Block => block_data_dir(store, req, meta, rec, &merged)?,
        Layer::Overlay => overlay_data_dir(store, req, meta, rec, &merged)?,
    };
    // 2. the session's files, readable by the server's user only.
    let password = random_token(20);
    mkdir(&conf, 0o700)?;
    mkdir(&conf.join("run"), 0o700)?;
    let has_config = merged.join("postgresql.conf").exists();
    engines::write_files(meta, &conf, req.writable, &password, has_config)
        .map_err(|e| RecoverError::io(&conf, e))?;
    for entry in std::fs::read_dir(&conf).map_err(|e| RecoverError::io(&conf, e))? {
        let p = entry.map_err(|e| RecoverError::io(&conf, e))?.path();
        chown(&p, uid, gid)?;
    }
    chown(&conf, uid, gid)?;
    let port = match req.port {
        Some(p) => p,
        None => free_port()?,
    };
    rec.port = Some(port);
    rec.user = Some(engines::session_user(meta));
    rec.password = Some(password.clone());
    rec.database = Some(engines::session_database(meta));
    // 3. the server.
    let view = runtime.view(meta.engine, &merged, &conf, port);
    let launch = Launch {
        meta,
        merged: &merged,
        conf: &conf,
        uid,
        gid,
        command: engines::server_command(meta, &view, req.writable, has_config),
        host_port: port,
        image,
    };
    runtime.launch(store, rec, &launch)?;
    wait_ready(meta, &view, runtime, rec, uid, gid, &password, req.timeout)?;
    if let Some((cmd, env)) = engines::credential_command(meta, &view, &password) {
        let (ok, out) = runtime.client(meta, rec, uid, gid, &cmd, &env)?;
        if !ok {
            return Err(RecoverError::Setup(format!(
                "setting the session's password failed: {}",
                out.trim()
            )));
        }
    }
    rec.state = SessionState::Running;
    store.put(rec)?;
    Ok(())
}

/// The snapshot's root at `merged`, writable through the mount's layer in `layer/`;
/// returns the data directory's owner.
fn block_data_dir(
    store: &Store,
    req: &Request<'_>,
    meta: &DatabaseMeta,
    rec: &mut SessionRecord,
    merged: &Path,
) -> Result<(u32, u32), RecoverError> {
    let layer_dir = rec.layer_dir();
    mkdir(&layer_dir, 0o700)?;
    let snapshot = req.snapshot.id.to_hex();
    let pid = (req.spawn_mount)(&SessionMount {
        mountpoint: merged,
        owner: None,
        writable: Some(WritableLayer {
            layer_dir: &layer_dir,
            snapshot: &snapshot,
            chunk: req.layer_chunk,
        }),
    })
    .map_err(RecoverError::Setup)?;
    rec.mount_pid = Some(pid);
    store.put(rec)?;
    // A snapshot's root is the mount's own directory (root's, 0755); the data
    // directory's owner and mode (0700, which the servers insist on) go into the layer.
    let (uid, gid) = data_dir_owner(meta, merged)?;
    chown(merged, uid, gid)?;
    mkdir(merged, 0o700)?;
    Ok((uid, gid))
}

/// The repository read-only at `mnt/`, and an overlay of the snapshot's root with an
/// empty `upper/` at `merged`; returns the data directory's owner.
fn overlay_data_dir(
    store: &Store,
    req: &Request<'_>,
    meta: &DatabaseMeta,
    rec: &mut SessionRecord,
    merged: &Path,
) -> Result<(u32, u32), RecoverError> {
    let dir = rec.dir.clone();
    let (mnt, upper, work) = (dir.join("mnt"), dir.join("upper"), dir.join("work"));
    for p in [&mnt, &work] {
        mkdir(p, 0o711)?;
    }
    let pid = (req.spawn_mount)(&SessionMount {
        mountpoint: &mnt,
        owner: None,
        writable: None,
    })
    .map_err(RecoverError::Setup)?;
    rec.mount_pid = Some(pid);
    store.put(rec)?;
    let lower = mnt
        .join("snapshots")
        .join(cairn_mount::layout::snapshot_dir_name(req.snapshot));
    let (uid, gid) = data_dir_owner(meta, &lower)?;
    // Its root takes the upper directory's owner and mode.
    mkdir(&upper, 0o700)?;
    chown(&upper, uid, gid)?;
    overlay_mount(&lower, &upper, &work, merged)?;
    Ok((uid, gid))
}

/// The owner of the database's files in `dir`, which must look like its data directory.
fn data_dir_owner(meta: &DatabaseMeta, dir: &Path) -> Result<(u32, u32), RecoverError> {
    let probe = engines::owner_probes(meta.engine)
        .iter()
        .find_map(|f| std::fs::metadata(dir.join(f)).ok())
        .ok_or_else(|| {
            RecoverError::Setup(format!(
                "{} does not look like a {} data directory",
                dir.display(),
                meta.engine.as_str()
            ))
        })?;
    Ok((probe.uid(), probe.gid()))
}

/// Waits until the server answers queries as the session user and its port accepts
/// connections; fails at once when the server exits.
#[allow(clippy::too_many_arguments)]
fn wait_ready(
    meta: &DatabaseMeta,
    view: &ServerView,
    runtime: &mut dyn ServerRuntime,
    rec: &SessionRecord,
    uid: u32,
    gid: u32,
    password: &str,
    timeout: Duration,
) -> Result<(), RecoverError> {
    let (cmd, env) = engines::ready_command(meta, view, password);
    let started = Instant::now();
    loop {
        if !runtime.alive(rec) {
            return Err(RecoverError::NotReady {
                reason: "the server exited".into(),
                log: runtime.log_tail(rec),
            });
        }
        let (ok, out) = runtime.client(meta, rec, uid, gid, &cmd, &env)?;
        if ok && rec.port.is_some_and(port_accepts) {
            return Ok(());
        }
        if started.elapsed() > timeout {
            return Err(RecoverError::NotReady {
                reason: format!(
                    "no answer within {}s (last client output: {})",
                    timeout.as_secs(),
                    out.trim()
                ),
                log: runtime.log_tail(rec),
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn port_accepts(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )
    .is_ok()
}

/// Takes down everything `rec` names, in reverse order, then forgets it. Idempotent:
/// what is already gone is skipped.
pub(crate) fn take_down(
    store: &Store,
    rec: &SessionRecord,
    docker: Option<&Docker>,
) -> Result<(), RecoverError> {
    let runtime = runtime::for_record(rec, docker)?;
    stop_server_and_files(store, rec, runtime.as_deref())
}

fn stop_server_and_files(
    store: &Store,
    rec: &SessionRecord,
    runtime: Option<&dyn ServerRuntime>,
) -> Result<(), RecoverError> {
    if let Some(r) = runtime {
        r.stop(rec)?;
    }
    unmount_if_mounted(&rec.merged())?;
    let mnt = rec.mountpoint();
    if is_mountpoint(&mnt) {
        cairn_mount::unmount(&mnt).map_err(|e| RecoverError::io(&mnt, e))?;
    }
    if let Some(pid) = rec.mount_pid {
        // The daemon exits once its filesystem is gone.
        let start = Instant::now();
        while pid_alive(pid) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if pid_alive(pid) {
            stop_process(
                pid,
                nix::sys::signal::Signal::SIGTERM,
                Duration::from_secs(5),
            );
        }
    }
    remove_session_dir(&rec.dir)?;
    store.remove(&rec.id)
}

/// Runs `sql` in a running session, as its user over the server's own socket, in
/// `database` (default: the session's). Returns (success, output): rows one per line,
/// columns separated by `|` (PostgreSQL) or a tab (MariaDB), then any messages.
pub fn sql(
    rec: &SessionRecord,
    meta: &DatabaseMeta,
    database: Option<&str>,
    sql: &str,
) -> Result<(bool, String), RecoverError> {
    let docker = match rec.container {
        Some(_) => Some(Docker::connect()?),
        None => None,
    };
    let runtime = runtime::for_record(rec, docker.as_ref())?
        .ok_or_else(|| RecoverError::Setup(format!("session {} runs no server", rec.id)))?;
    let port = rec
        .port
        .ok_or_else(|| RecoverError::Setup(format!("session {} has no port", rec.id)))?;
    let merged = rec.merged();
    let view = runtime.view(meta.engine, &merged, &rec.dir.join("conf"), port);
    let (uid, gid) = data_dir_owner(meta, &merged)?;
    let password = rec.password.clone().unwrap_or_default();
    let (mut cmd, env) = engines::ready_command(meta, &view, &password);
    if let Some(last) = cmd.last_mut() {
        sql.clone_into(last);
    }
    match meta.engine {
        cairn_agent::database::Engine::Postgresql => {
            if let (Some(db), Some(at)) = (database, cmd.iter().position(|a| a == "-d")) {
                db.clone_into(&mut cmd[at + 1]);
            }
            cmd.insert(1, "--set=ON_ERROR_STOP=1".into());
        }
        cairn_agent::database::Engine::Mariadb => {
            let at = cmd.len() - 2;
            cmd.insert(at, "--batch".into());
            cmd.insert(at, "--skip-column-names".into());
            if let Some(db) = database {
                cmd.insert(at, format!("--database={db}"));
            }
        }
    }
    runtime.client(meta, rec, uid, gid, &cmd, &env)
}
