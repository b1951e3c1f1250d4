//! Where a recovered database server runs: one [`ServerRuntime`] per place.
//!
//! A database session ([`crate::db`]) prepares the same things whatever runs the server
//! (the overlay, the session's files, a port); the runtime decides how the server sees
//! them ([`ServerRuntime::view`]), starts it, tells whether it still runs, runs client
//! commands beside it, shows its log and stops it.
//!
//! - [`DockerRuntime`]: a container of the recorded version's image, running as the data
//!   directory's owner, its port published on 127.0.0.1 only;
//! - [`ProcessRuntime`]: the host's own binaries, as a process group of its own.
//!
//! A VM session ([`crate::vm`]) is the other kind of session; libvirt is its runtime.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use cairn_agent::database::{DatabaseMeta, Engine};
use cairn_agent::process::pid_alive;

use crate::docker::{ContainerSpec, Docker, LABEL_SESSION, LABEL_STATE};
use crate::engines::{self, ServerView};
use crate::state::{SessionRecord, Store};
use crate::{stop_process, RecoverError};

/// Which runtime a user asked for (`--runtime`); recorded in the session.
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

/// What every runtime is given to start a server.
pub struct Launch<'a> {
    pub meta: &'a DatabaseMeta,
    /// The overlay holding the data directory, and the session's own files, on the host.
    pub merged: &'a Path,
    pub conf: &'a Path,
    /// The data directory's owner: the server runs as them.
    pub uid: u32,
    pub gid: u32,
    /// The server's program and arguments, as [`ServerRuntime::view`] sees things.
    pub command: Vec<String>,
    /// The port on 127.0.0.1 clients connect to.
    pub host_port: u16,
    /// The container image (Docker only).
    pub image: &'a str,
}

/// One place a database server can run.
pub trait ServerRuntime {
    /// The name recorded in the session (`docker`, `process`).
    fn name(&self) -> &'static str;

    /// Checks, before anything is made, that the server can be started at all.
    fn check(&self, _image: &str) -> Result<(), RecoverError> {
        Ok(())
    }

    /// How the server sees its data directory, its files and its port.
    fn view(&self, engine: Engine, merged: &Path, conf: &Path, host_port: u16) -> ServerView;

    /// Starts the server, recording in `rec` (and in `store`, before it exists) what
    /// [`ServerRuntime::stop`] needs to find it again.
    fn launch(
        &mut self,
        store: &Store,
        rec: &mut SessionRecord,
        launch: &Launch<'_>,
    ) -> Result<(), RecoverError>;

    /// Whether the server still runs.
    fn alive(&mut self, rec: &SessionRecord) -> bool;

    /// Runs a client command where the server runs; returns (success, output).
    fn client(
        &self,
        meta: &DatabaseMeta,
        rec: &SessionRecord,
        uid: u32,
        gid: u32,
        cmd: &[String],
        env: &[String],
    ) -> Result<(bool, String), RecoverError>;

    /// The end of the server's log, for error messages.
    fn log_tail(&self, rec: &SessionRecord) -> String;

    /// Stops the server if it still runs; what is already gone is skipped.
    fn stop(&self, rec: &SessionRecord) -> Result<(), RecoverError>;

    /// Freezes every process of the server (`paused`), or lets them run again: while
    /// frozen, nothing writes into the data directory.
    fn pause(&self, rec: &SessionRecord, paused: bool) -> Result<(), RecoverError>;
}

/// The runtime a new session asked for.
pub fn for_request(kind: Runtime) -> Result<Box<dyn ServerRuntime>, RecoverError> {
    Ok(match kind {
        Runtime::Docker => Box::new(DockerRuntime::new(Docker::connect()?)),
        Runtime::Process => Box::new(ProcessRuntime::default()),
    })
}

/// The runtime that runs a recorded session's server, if anything of it was started.
/// Docker is reached only when the session has a container.
pub fn for_record<'d>(
    rec: &SessionRecord,
    docker: Option<&'d Docker>,
) -> Result<Option<Box<dyn ServerRuntime + 'd>>, RecoverError> {
    if rec.container.is_some() {
        return Ok(Some(match docker {
            Some(d) => Box::new(DockerRuntime::borrowed(d)),
            None => Box::new(DockerRuntime::new(Docker::connect()?)),
        }));
    }
    if rec.server_pid.is_some() {
        return Ok(Some(Box::new(ProcessRuntime::default())));
    }
    Ok(None)
}

enum DockerHandle<'d> {
    Owned(Docker),
    Borrowed(&'d Docker),
}

/// A server in a container.
pub struct DockerRuntime<'d> {
    docker: DockerHandle<'d>,
}

impl DockerRuntime<'static> {
    #[must_use]
    pub fn new(docker: Docker) -> Self {
        Self {
            docker: DockerHandle::Owned(docker),
        }
    }
}

impl<'d> DockerRuntime<'d> {
    #[must_use]
    pub fn borrowed(docker: &'d Docker) -> Self {
        Self {
            docker: DockerHandle::Borrowed(docker),
        }
    }

    /// The engine this runtime talks to.
    #[must_use]
    pub fn docker(&self) -> &Docker {
        match &self.docker {
            DockerHandle::Owned(d) => d,
            DockerHandle::Borrowed(d) => d,
        }
    }
}

fn user_spec(uid: u32, gid: u32) -> String {
    format!("{uid}:{gid}")
}

impl ServerRuntime for DockerRuntime<'_> {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn check(&self, image: &str) -> Result<(), RecoverError> {
        if self.docker().image_exists(image) {
            return Ok(());
        }
        Err(RecoverError::Docker(format!(
            "image {image} is not on this host: build it (scripts/build-db-images.sh makes \
             it from the host's own installation), pull it, or name another with --image"
        )))
    }

    fn view(&self, engine: Engine, _merged: &Path, _conf: &Path, _host_port: u16) -> ServerView {
        ServerView {
            data: engines::container_data_dir(engine).into(),
            conf: "/cairn".into(),
            port: engines::container_port(engine),
            listen: if engine == Engine::Postgresql {
                "*"
            } else {
                "0.0.0.0"
            },
        }
    }

    fn launch(
        &mut self,
        store: &Store,
        rec: &mut SessionRecord,
        l: &Launch<'_>,
    ) -> Result<(), RecoverError> {
        let view = self.view(l.meta.engine, l.merged, l.conf, l.host_port);
        let mut args = l.command.clone();
        let program = args.remove(0);
        let mut labels = HashMap::new();
        labels.insert(LABEL_SESSION.to_owned(), rec.id.clone());
        labels.insert(LABEL_STATE.to_owned(), store.dir().display().to_string());
        let spec = ContainerSpec {
            name: format!("cairn-recover-{}", rec.id),
            image: l.image.to_owned(),
            user: user_spec(l.uid, l.gid),
            entrypoint: vec![program],
            args,
            binds: vec![
                format!("{}:{}", l.merged.display(), view.data),
                format!("{}:{}", l.conf.display(), view.conf),
            ],
            port: format!("{}/tcp", view.port),
            host_port: l.host_port,
            labels,
        };
        // Recorded by name first: a crash between create and the id still finds it.
        rec.container = Some(spec.name.clone());
        store.put(rec)?;
        let cid = self.docker().run(&spec)?;
        rec.container = Some(cid);
        store.put(rec)
    }

    fn alive(&mut self, rec: &SessionRecord) -> bool {
        rec.container
            .as_deref()
            .and_then(|cid| self.docker().running(cid))
            .unwrap_or(false)
    }

    fn client(
        &self,
        _meta: &DatabaseMeta,
        rec: &SessionRecord,
        uid: u32,
        gid: u32,
        cmd: &[String],
        env: &[String],
    ) -> Result<(bool, String), RecoverError> {
        let cid = rec
            .container
            .as_deref()
            .ok_or_else(|| RecoverError::Setup("the session has no container".into()))?;
        let (code, out) = self.docker().exec(cid, &user_spec(uid, gid), cmd, env)?;
        Ok((code == 0, out))
    }

    fn log_tail(&self, rec: &SessionRecord) -> String {
        rec.container
            .as_deref()
            .map(|cid| self.docker().logs(cid))
            .unwrap_or_default()
    }

    fn stop(&self, rec: &SessionRecord) -> Result<(), RecoverError> {
        match &rec.container {
            Some(cid) => self.docker().remove(cid),
            None => Ok(()),
        }
    }

    fn pause(&self, rec: &SessionRecord, paused: bool) -> Result<(), RecoverError> {
        let cid = rec
            .container
            .as_deref()
            .ok_or_else(|| RecoverError::Setup("the session has no container".into()))?;
        self.docker().pause(cid, paused)
    }
}

/// A server run from the host's own binaries.
#[derive(Default)]
pub struct ProcessRuntime {
    /// The server, when this process started it: `alive` then also notices a zombie.
    child: Option<Child>,
}

/// The host's binary for `name`: PostgreSQL's of the recorded major version, else
/// whatever `PATH` finds.
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

impl ServerRuntime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    fn view(&self, _engine: Engine, merged: &Path, conf: &Path, host_port: u16) -> ServerView {
        ServerView {
            data: merged.display().to_string(),
            conf: conf.display().to_string(),
            port: host_port,
            listen: "127.0.0.1",
        }
    }

    fn launch(
        &mut self,
        store: &Store,
        rec: &mut SessionRecord,
        l: &Launch<'_>,
    ) -> Result<(), RecoverError> {
        let program = host_program(l.meta, &l.command[0]);
        let log = l.conf.join("server.log");
        let log_file = std::fs::File::create(&log).map_err(|e| RecoverError::io(&log, e))?;
        let log_err = log_file
            .try_clone()
            .map_err(|e| RecoverError::io(&log, e))?;
        let child = Command::new(&program)
            .args(&l.command[1..])
            .current_dir(l.conf)
            .uid(l.uid)
            .gid(l.gid)
            .stdin(Stdio::null())
            .stdout(log_file)
            .stderr(log_err)
            .process_group(0)
            .spawn()
            .map_err(|e| RecoverError::Io {
                what: format!("starting {}", program.display()),
                source: e,
            })?;
        rec.server_pid = Some(child.id());
        self.child = Some(child);
        store.put(rec)
    }

    fn alive(&mut self, rec: &SessionRecord) -> bool {
        match (&mut self.child, rec.server_pid) {
            (Some(c), _) => matches!(c.try_wait(), Ok(None)),
            (None, Some(pid)) => pid_alive(pid),
            (None, None) => false,
        }
    }

    fn client(
        &self,
        meta: &DatabaseMeta,
        _rec: &SessionRecord,
        uid: u32,
        gid: u32,
        cmd: &[String],
        env: &[String],
    ) -> Result<(bool, String), RecoverError> {
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

    fn log_tail(&self, rec: &SessionRecord) -> String {
        let log = std::fs::read_to_string(rec.dir.join("conf/server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    fn stop(&self, rec: &SessionRecord) -> Result<(), RecoverError> {
        let Some(pid) = rec.server_pid else {
            return Ok(());
        };
        if pid_alive(pid) {
            // PostgreSQL: SIGINT is a fast shutdown; MariaDB shuts down on SIGTERM.
            let sig = if rec.engine == "postgresql" {
                nix::sys::signal::Signal::SIGINT
            } else {
                nix::sys::signal::Signal::SIGTERM
            };
            stop_process(pid, sig, Duration::from_secs(30));
        }
        Ok(())
    }

    fn pause(&self, rec: &SessionRecord, paused: bool) -> Result<(), RecoverError> {
        use nix::sys::signal::{killpg, Signal};
        let pid = rec
            .server_pid
            .and_then(|p| i32::try_from(p).ok())
            .ok_or_else(|| RecoverError::Setup("the session has no server process".into()))?;
        // The server runs in a process group of its own: every backend stops with it.
        let sig = if paused {
            Signal::SIGSTOP
        } else {
            Signal::SIGCONT
        };
        killpg(nix::unistd::Pid::from_raw(pid), sig)
            .map_err(|e| RecoverError::Setup(format!("signalling the server's processes: {e}")))
    }
}
