//! Instant recovery of a database: a backup answering queries in seconds, without a
//! restore.
//!
//! A session stacks four things, each recorded (in [`state`]) before it is made:
//! 1. the repository mounted read-only (a `repo mount` daemon) at `sessions/<id>/mnt`;
//! 2. an overlay at `merged/`, the snapshot's data directory as the lower layer and an
//!    empty `upper/` whose owner and mode (the data directory's, 0700) the overlay's root
//!    takes: nothing is copied or chowned, and every write lands in `upper/`;
//! 3. the session's own files in `conf/` (access rules, credentials, the socket);
//! 4. the server: a Docker container (bollard) running the image of the recorded version
//!    as the data directory's owner, port published on 127.0.0.1, or with the process
//!    runtime the host's own binaries.
//!
//! [`stop`] takes them down in reverse order and forgets the session; [`cleanup`] does
//! that for every session whose creator died (killed, a reboot) and for anything labelled
//! or placed as a session that has no record.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use cairn_agent::database::{DatabaseMeta, Engine, Method};
use cairn_agent::process::pid_alive;
use cairn_engine::snapshot::Snapshot;

use crate::docker::{ContainerSpec, Docker, LABEL_SESSION, LABEL_STATE};
use crate::engines::{self, ServerView};
use crate::state::{SessionRecord, SessionState, Store};
use crate::{
    chown, mkdir, random_token, remove_session_dir, stop_process, unmount_if_mounted, RecoverError,
};
use cairn_mount::is_mountpoint;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Docker,
    Process,
}

impl Runtime {
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Docker => "docker",
            Self::Process => "process",
        }
    }
}

pub struct Request<'a> {
    pub snapshot: &'a Snapshot,
    pub repository: PathBuf,
    pub port: Option<u16>,
    pub image: Option<String>,
    pub writable: bool,
    pub runtime: Runtime,
    /// How long the server may take to answer (crash recovery replays WAL).
    pub timeout: Duration,
    /// Starts a `repo mount` daemon of the repository at the given mountpoint; returns
    /// its pid once mounted.
    pub spawn_mount: &'a dyn Fn(&Path) -> Result<u32, String>,
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
    let docker = match req.runtime {
        Runtime::Docker => Some(Docker::connect()?),
        Runtime::Process => None,
    };
    let image = req
        .image
        .clone()
        .unwrap_or_else(|| engines::default_image(&meta));
    if let Some(d) = &docker {
        if !d.image_exists(&image) {
            return Err(RecoverError::Docker(format!(
                "image {image} is not on this host: build it (scripts/build-db-images.sh makes \
                 it from the host's own installation), pull it, or name another with --image"
            )));
        }
    }
    let id = random_token(8).to_lowercase();
    let dir = store.sessions_dir().join(&id);
    let mut rec = SessionRecord {
        id: id.clone(),
        state: SessionState::Starting,
        engine: meta.engine.as_str().into(),
        snapshot: snap.id.to_hex(),
        repository: req.repository.display().to_string(),
        runtime: req.runtime.as_str().into(),
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
    };
    store.put(&rec)?;
    match set_up(store, req, &meta, &image, docker.as_ref(), &mut rec) {
        Ok(()) => Ok(rec),
        Err(e) => {
            if let Err(e2) = take_down(store, &rec, docker.as_ref()) {
                tracing::warn!("cleaning up the failed session {id}: {e2}");
            }
            Err(e)
        }
    }
}

fn set_up(
    store: &Store,
    req: &Request<'_>,
    meta: &DatabaseMeta,
    image: &str,
    docker: Option<&Docker>,
    rec: &mut SessionRecord,
) -> Result<(), RecoverError> {
    let dir = rec.dir.clone();
    mkdir(&dir, 0o711)?;
    let (mnt, upper, work, merged, conf) = (
        dir.join("mnt"),
        dir.join("upper"),
        dir.join("work"),
        dir.join("merged"),
        dir.join("conf"),
    );
    for p in [&mnt, &work, &merged] {
        mkdir(p, 0o711)?;
    }
    // 1. the repository, read-only
    let pid = (req.spawn_mount)(&mnt).map_err(RecoverError::Setup)?;
    rec.mount_pid = Some(pid);
    store.put(rec)?;
    let lower = mnt
        .join("snapshots")
        .join(cairn_mount::layout::snapshot_dir_name(req.snapshot));
    let probe = engines::owner_probes(meta.engine)
        .iter()
        .find_map(|f| std::fs::metadata(lower.join(f)).ok())
        .ok_or_else(|| {
            RecoverError::Setup(format!(
                "{} does not look like a {} data directory",
                lower.display(),
                meta.engine.as_str()
            ))
        })?;
    let (uid, gid) = (probe.uid(), probe.gid());
    // 2. the overlay: its root takes the upper directory's owner and mode.
    mkdir(&upper, 0o700)?;
    chown(&upper, uid, gid)?;
    overlay_mount(&lower, &upper, &work, &merged)?;
    // 3. the session's files, readable by the server's user only.
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
    // 4. the server.
    let view;
    let mut child = None;
    let user = format!("{uid}:{gid}");
    if let Some(d) = docker {
        view = ServerView {
            data: engines::container_data_dir(meta.engine).into(),
            conf: "/cairn".into(),
            port: engines::container_port(meta.engine),
            listen: if meta.engine == Engine::Postgresql {
                "*"
            } else {
                "0.0.0.0"
            },
        };
        let mut cmd = engines::server_command(meta, &view, req.writable, has_config);
        let program = cmd.remove(0);
        let mut labels = HashMap::new();
        labels.insert(LABEL_SESSION.to_owned(), rec.id.clone());
        labels.insert(LABEL_STATE.to_owned(), store.dir().display().to_string());
        let spec = ContainerSpec {
            name: format!("cairn-recover-{}", rec.id),
            image: image.to_owned(),
            user: user.clone(),
            entrypoint: vec![program],
            args: cmd,
            binds: vec![
                format!("{}:{}", merged.display(), view.data),
                format!("{}:{}", conf.display(), view.conf),
            ],
            port: format!("{}/tcp", view.port),
            host_port: port,
            labels,
        };
        rec.container = Some(spec.name.clone());
        store.put(rec)?;
        let cid = d.run(&spec)?;
        rec.container = Some(cid);
        store.put(rec)?;
    } else {
        view = ServerView {
            data: merged.display().to_string(),
            conf: conf.display().to_string(),
            port,
            listen: "127.0.0.1",
        };
        let cmd = engines::server_command(meta, &view, req.writable, has_config);
        let program = host_program(meta, &cmd[0]);
        let log = conf.join("server.log");
        let log_file = std::fs::File::create(&log).map_err(|e| RecoverError::io(&log, e))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| RecoverError::io(&log, e))?;
        let c = Command::new(&program)
            .args(&cmd[1..])
            .current_dir(&conf)
            .uid(uid)
            .gid(gid)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(|e| RecoverError::Io {
                what: format!("starting {}", program.display()),
                source: e,
            })?;
        rec.server_pid = Some(c.id());
        store.put(rec)?;
        child = Some(c);
    }
    wait_ready(
        meta,
        &view,
        docker,
        rec,
        &user,
        uid,
        gid,
        &password,
        req.timeout,
        child.as_mut(),
    )?;
    if let Some((cmd, env)) = engines::credential_command(meta, &view, &password) {
        let (ok, out) = client(meta, docker, rec, &user, uid, gid, &cmd, &env)?;
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

/// The host's binary for `name` (the process runtime): PostgreSQL's of the recorded
/// major version, else whatever `PATH` finds.
fn host_program(meta: &DatabaseMeta, name: &str) -> PathBuf {
    let candidates = match meta.engine {
        Engine::Postgresql => vec![PathBuf::from(format!(
            "/usr/lib/postgresql/{}/bin/{name}",
            meta.major
        ))],
        Engine::Mariadb => vec![
            PathBuf::from(format!("/usr/sbin/{name}")),
            PathBuf::from(format!("/usr/bin/{name}")),
        ],
    };
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

/// Runs a client command where the server runs; returns (success, output).
#[allow(clippy::too_many_arguments)]
fn client(
    meta: &DatabaseMeta,
    docker: Option<&Docker>,
    rec: &SessionRecord,
    user: &str,
    uid: u32,
    gid: u32,
    cmd: &[String],
    env: &[String],
) -> Result<(bool, String), RecoverError> {
    if let (Some(d), Some(cid)) = (docker, &rec.container) {
        let (code, out) = d.exec(cid, user, cmd, env)?;
        return Ok((code == 0, out));
    }
    let mut c = Command::new(host_program(meta, &cmd[0]));
    c.args(&cmd[1..]).uid(uid).gid(gid).current_dir("/");
    for kv in env {
        if let Some((k, v)) = kv.split_once('=') {
            c.env(k, v);
        }
    }
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| RecoverError::Io {
            what: format!("running {}", cmd[0]),
            source: e,
        })?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

fn server_log(docker: Option<&Docker>, rec: &SessionRecord) -> String {
    if let (Some(d), Some(cid)) = (docker, &rec.container) {
        return d.logs(cid);
    }
    let log = std::fs::read_to_string(rec.dir.join("conf/server.log")).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

#[allow(clippy::too_many_arguments)]
fn wait_ready(
    meta: &DatabaseMeta,
    view: &ServerView,
    docker: Option<&Docker>,
    rec: &SessionRecord,
    user: &str,
    uid: u32,
    gid: u32,
    password: &str,
    timeout: Duration,
    mut child: Option<&mut std::process::Child>,
) -> Result<(), RecoverError> {
    let (cmd, env) = engines::ready_command(meta, view, password);
    let started = Instant::now();
    let mut last;
    loop {
        let alive = match (docker, &rec.container, child.as_deref_mut()) {
            (Some(d), Some(cid), _) => d.running(cid).unwrap_or(false),
            (_, _, Some(c)) => matches!(c.try_wait(), Ok(None)),
            _ => false,
        };
        if !alive {
            return Err(RecoverError::NotReady {
                reason: "the server exited".into(),
                log: server_log(docker, rec),
            });
        }
        let (ok, out) = client(meta, docker, rec, user, uid, gid, &cmd, &env)?;
        if ok {
            // And the published port accepts connections.
            if let Some(port) = rec.port {
                if std::net::TcpStream::connect_timeout(
                    &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                    Duration::from_secs(2),
                )
                .is_ok()
                {
                    return Ok(());
                }
            }
        }
        last = out;
        if started.elapsed() > timeout {
            return Err(RecoverError::NotReady {
                reason: format!(
                    "no answer within {}s (last client output: {})",
                    timeout.as_secs(),
                    last.trim()
                ),
                log: server_log(docker, rec),
            });
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// Takes down everything `rec` names, in reverse order, then forgets it. Idempotent:
/// what is already gone is skipped.
pub(crate) fn take_down(
    store: &Store,
    rec: &SessionRecord,
    docker: Option<&Docker>,
) -> Result<(), RecoverError> {
    if let Some(cid) = &rec.container {
        let owned;
        let d = match docker {
            Some(d) => d,
            None => {
                owned = Docker::connect()?;
                &owned
            }
        };
        d.remove(cid)?;
    }
    if let Some(pid) = rec.server_pid {
        if pid_alive(pid) {
            // PostgreSQL: SIGINT is a fast shutdown; MariaDB shuts down on SIGTERM.
            let sig = if rec.engine == "postgresql" {
                nix::sys::signal::Signal::SIGINT
            } else {
                nix::sys::signal::Signal::SIGTERM
            };
            stop_process(pid, sig, Duration::from_secs(30));
        }
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
