//! The Docker engine through bollard, behind a small blocking facade (each call runs on
//! a private current-thread tokio runtime: the CLI is synchronous).
//!
//! Containers of recovery sessions carry the labels `cairn.session=<id>` and
//! `cairn.state=<state dir>`, so that `repo recover cleanup` finds them without a record.

use std::collections::HashMap;
use std::future::Future;

use bollard::exec::{CreateExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, HostConfig, PortBinding};
use bollard::query_parameters::{
    CreateContainerOptions, ListContainersOptions, LogsOptions, RemoveContainerOptions,
};
use bollard::Docker as Client;
use futures_util::StreamExt;

use crate::RecoverError;

pub const LABEL_SESSION: &str = "cairn.session";
pub const LABEL_STATE: &str = "cairn.state";

pub struct Docker {
    rt: tokio::runtime::Runtime,
    client: Client,
}

/// What a session's container runs.
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    /// `uid:gid`.
    pub user: String,
    pub entrypoint: Vec<String>,
    pub args: Vec<String>,
    /// `host path:container path[:ro]`.
    pub binds: Vec<String>,
    /// Container port (`5432/tcp`) published on 127.0.0.1:`host_port`.
    pub port: String,
    pub host_port: u16,
    pub labels: HashMap<String, String>,
}

fn err(what: &str, e: impl std::fmt::Display) -> RecoverError {
    RecoverError::Docker(format!("{what}: {e}"))
}

impl Docker {
    /// Connects to the local engine (`DOCKER_HOST` or /var/run/docker.sock) and agrees on
    /// an API version.
    pub fn connect() -> Result<Self, RecoverError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| err("starting the Docker client", e))?;
        let client = Client::connect_with_defaults().map_err(|e| {
            err(
                "connecting to the Docker engine (is dockerd running? --runtime process runs without it)",
                e,
            )
        })?;
        let client = rt
            .block_on(async {
                let c = client.negotiate_version().await?;
                c.ping().await?;
                Ok::<_, bollard::errors::Error>(c)
            })
            .map_err(|e| {
                err(
                    "the Docker engine does not answer (is dockerd running? --runtime process runs without it)",
                    e,
                )
            })?;
        Ok(Self { rt, client })
    }

    fn block<F: Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    pub fn image_exists(&self, image: &str) -> bool {
        self.block(self.client.inspect_image(image)).is_ok()
    }

    /// Creates and starts the container; returns its id.
    pub fn run(&self, spec: &ContainerSpec) -> Result<String, RecoverError> {
        let mut ports = HashMap::new();
        ports.insert(
            spec.port.clone(),
            Some(vec![PortBinding {
                host_ip: Some("127.0.0.1".into()),
                host_port: Some(spec.host_port.to_string()),
            }]),
        );
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            user: Some(spec.user.clone()),
            entrypoint: Some(spec.entrypoint.clone()),
            cmd: Some(spec.args.clone()),
            labels: Some(spec.labels.clone()),
            exposed_ports: Some(vec![spec.port.clone()]),
            host_config: Some(HostConfig {
                binds: Some(spec.binds.clone()),
                port_bindings: Some(ports),
                // Room for shared memory (PostgreSQL's parallel workers).
                shm_size: Some(256 << 20),
                ..Default::default()
            }),
            ..Default::default()
        };
        let opts = CreateContainerOptions {
            name: Some(spec.name.clone()),
            ..Default::default()
        };
        let created = self
            .block(self.client.create_container(Some(opts), body))
            .map_err(|e| err(&format!("creating container {}", spec.name), e))?;
        self.block(self.client.start_container(&created.id, None))
            .map_err(|e| err(&format!("starting container {}", spec.name), e))?;
        Ok(created.id)
    }

    /// Whether the container runs; `None` if it does not exist.
    pub fn running(&self, id: &str) -> Option<bool> {
        let c = self.block(self.client.inspect_container(id, None)).ok()?;
        Some(c.state.and_then(|s| s.running).unwrap_or(false))
    }

    /// The last lines of the container's output.
    pub fn logs(&self, id: &str) -> String {
        let opts = LogsOptions {
            stdout: true,
            stderr: true,
            tail: "40".into(),
            ..Default::default()
        };
        self.block(async {
            let mut s = self.client.logs(id, Some(opts));
            let mut out = String::new();
            while let Some(Ok(chunk)) = s.next().await {
                out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
            }
            out
        })
    }

    /// Runs a command in the container; returns (exit code, output).
    pub fn exec(
        &self,
        id: &str,
        user: &str,
        cmd: &[String],
        env: &[String],
    ) -> Result<(i64, String), RecoverError> {
        self.block(async {
            let created = self
                .client
                .create_exec(
                    id,
                    CreateExecOptions {
                        cmd: Some(cmd.to_vec()),
                        env: Some(env.to_vec()),
                        user: Some(user.to_owned()),
                        attach_stdout: Some(true),
                        attach_stderr: Some(true),
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| err("exec in the container", e))?;
            let mut out = String::new();
            if let StartExecResults::Attached { mut output, .. } = self
                .client
                .start_exec(&created.id, None)
                .await
                .map_err(|e| err("exec in the container", e))?
            {
                while let Some(Ok(chunk)) = output.next().await {
                    out.push_str(&String::from_utf8_lossy(&chunk.into_bytes()));
                }
            }
            let code = self
                .client
                .inspect_exec(&created.id)
                .await
                .map_err(|e| err("exec in the container", e))?
                .exit_code
                .unwrap_or(-1);
            Ok((code, out))
        })
    }

    /// Freezes (`paused`) or thaws every process of a container.
    pub fn pause(&self, id: &str, paused: bool) -> Result<(), RecoverError> {
        let r = if paused {
            self.block(self.client.pause_container(id))
        } else {
            self.block(self.client.unpause_container(id))
        };
        r.map_err(|e| {
            err(
                &format!(
                    "{} container {id}",
                    if paused { "pausing" } else { "unpausing" }
                ),
                e,
            )
        })
    }

    /// Removes the container (killing it first); a missing container is fine.
    pub fn remove(&self, id: &str) -> Result<(), RecoverError> {
        let opts = RemoveContainerOptions {
            force: true,
            v: true,
            ..Default::default()
        };
        match self.block(self.client.remove_container(id, Some(opts))) {
            Ok(()) => Ok(()),
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => Ok(()),
            Err(e) => Err(err(&format!("removing container {id}"), e)),
        }
    }

    /// Containers (running or not) labelled as sessions of the state directory `state`:
    /// (container id, session id).
    pub fn session_containers(&self, state: &str) -> Result<Vec<(String, String)>, RecoverError> {
        let mut filters = HashMap::new();
        filters.insert("label".to_owned(), vec![format!("{LABEL_STATE}={state}")]);
        let opts = ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        };
        let list = self
            .block(self.client.list_containers(Some(opts)))
            .map_err(|e| err("listing containers", e))?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                let session = c.labels.as_ref()?.get(LABEL_SESSION)?.clone();
                Some((c.id?, session))
            })
            .collect())
    }
}
