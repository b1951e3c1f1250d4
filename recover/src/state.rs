//! The host's record of recovery sessions: a small SQLite database in the state
//! directory (host state, not repository data).
//!
//! The state directory is `$CAIRN_STATE_DIR`, else `/var/lib/cairn` for root, else
//! `$XDG_STATE_HOME/cairn` (`~/.local/state/cairn`). Each session has a directory
//! `sessions/<id>/` there holding its mountpoint, overlay layers and server files, so
//! that everything a session made can be found from its row or, after the row is lost,
//! from the directory alone. A row is written before anything is made and removed only
//! after everything is gone.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::RecoverError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// Being set up by the process `creator_pid`.
    Starting,
    /// Serving.
    Running,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub state: SessionState,
    /// `postgresql` or `mariadb`.
    pub engine: String,
    pub snapshot: String,
    pub repository: String,
    /// `docker` or `process`.
    pub runtime: String,
    pub writable: bool,
    /// The process running `repo recover db` (while starting).
    pub creator_pid: u32,
    /// The session's directory (`sessions/<id>`).
    pub dir: PathBuf,
    pub container: Option<String>,
    /// The server's process (process runtime).
    pub server_pid: Option<u32>,
    /// The `repo mount` daemon serving the repository at `<dir>/mnt`.
    pub mount_pid: Option<u32>,
    pub port: Option<u16>,
    pub user: Option<String>,
    pub password: Option<String>,
    pub database: Option<String>,
    pub created: String,
    /// The libvirt domain of a VM session (`engine` = `vm`).
    #[serde(default)]
    pub domain: Option<String>,
    /// The libvirt URI of a VM session.
    #[serde(default)]
    pub uri: Option<String>,
    /// A VM session's disks (targets), each on `<dir>/<target>.qcow2`.
    #[serde(default)]
    pub disks: Vec<String>,
    /// A database session's writable layer: `block` (the mount's, in `layer/`) or
    /// `overlay` (overlayfs, `upper/`; what every session before the block layer used).
    #[serde(default = "overlay")]
    pub layer: String,
    /// A verification's isolated lab (its network namespace), taken down with the
    /// session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lab: Option<String>,
    /// The process of the verification this session is part of: when it is gone, so is
    /// the session's purpose, and cleanup takes it down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verifier: Option<u32>,
}

fn overlay() -> String {
    "overlay".into()
}

impl SessionRecord {
    /// Whether this is a VM session.
    #[must_use]
    pub fn is_vm(&self) -> bool {
        self.engine == "vm"
    }

    #[must_use]
    pub fn mountpoint(&self) -> PathBuf {
        self.dir.join("mnt")
    }
    #[must_use]
    pub fn merged(&self) -> PathBuf {
        self.dir.join("merged")
    }
    /// The block layer's directory.
    #[must_use]
    pub fn layer_dir(&self) -> PathBuf {
        self.dir.join("layer")
    }
    /// Whether the data directory is the mount's writable layer (no overlay).
    #[must_use]
    pub fn uses_block_layer(&self) -> bool {
        self.layer == "block"
    }

    /// Bytes written into the session's layer so far (for a VM, its qcow2 overlays).
    #[must_use]
    pub fn layer_bytes(&self) -> u64 {
        if self.is_vm() {
            return self
                .disks
                .iter()
                .map(|d| allocated(&self.dir.join(format!("{d}.qcow2"))))
                .sum();
        }
        if self.uses_block_layer() {
            cairn_mount::layer::layer_bytes(&self.layer_dir())
        } else {
            allocated(&self.dir.join("upper"))
        }
    }

    /// How a client connects, once the session runs.
    #[must_use]
    pub fn connection_string(&self) -> Option<String> {
        let (port, user, pw) = (self.port?, self.user.as_ref()?, self.password.as_ref()?);
        let db = self.database.clone().unwrap_or_default();
        Some(match self.engine.as_str() {
            "postgresql" => format!("postgresql://{user}:{pw}@127.0.0.1:{port}/{db}"),
            _ => format!("mariadb://{user}:{pw}@127.0.0.1:{port}/{db}"),
        })
    }
}

/// Bytes allocated to `p` and, for a directory, everything under it.
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(m) = std::fs::symlink_metadata(p) else {
        return 0;
    };
    let own = m.blocks() * 512;
    if !m.is_dir() {
        return own;
    }
    own + std::fs::read_dir(p)
        .map(|rd| rd.flatten().map(|e| allocated(&e.path())).sum::<u64>())
        .unwrap_or(0)
}

/// The state directory (see the module docs).
#[must_use]
pub fn state_dir() -> PathBuf {
    cairn_engine::host::state_dir()
}

pub struct Store {
    conn: Connection,
    dir: PathBuf,
}

fn db_err(e: rusqlite::Error) -> RecoverError {
    RecoverError::State(e.to_string())
}

impl Store {
    pub fn open(dir: &Path) -> Result<Self, RecoverError> {
        use std::os::unix::fs::PermissionsExt;
        let sessions = dir.join("sessions");
        std::fs::create_dir_all(&sessions).map_err(|e| RecoverError::io(&sessions, e))?;
        // Servers run as other users must traverse to their session's files.
        let _ = std::fs::set_permissions(&sessions, std::fs::Permissions::from_mode(0o711));
        let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711));
        let path = dir.join("sessions.db");
        let conn = Connection::open(&path).map_err(db_err)?;
        conn.busy_timeout(Duration::from_secs(10)).map_err(db_err)?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS sessions (
                id TEXT PRIMARY KEY,
                json TEXT NOT NULL
            );",
        )
        .map_err(db_err)?;
        Ok(Self {
            conn,
            dir: dir.to_owned(),
        })
    }

    #[must_use]
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    #[must_use]
    pub fn sessions_dir(&self) -> PathBuf {
        self.dir.join("sessions")
    }

    pub fn put(&self, s: &SessionRecord) -> Result<(), RecoverError> {
        let json = serde_json::to_string(s).map_err(|e| RecoverError::State(e.to_string()))?;
        self.conn
            .execute(
                "INSERT OR REPLACE INTO sessions (id, json) VALUES (?1, ?2)",
                params![s.id, json],
            )
            .map_err(db_err)?;
        Ok(())
    }

    pub fn remove(&self, id: &str) -> Result<(), RecoverError> {
        self.conn
            .execute("DELETE FROM sessions WHERE id = ?1", params![id])
            .map_err(db_err)?;
        Ok(())
    }

    pub fn get(&self, id: &str) -> Result<Option<SessionRecord>, RecoverError> {
        let json: Option<String> = self
            .conn
            .query_row(
                "SELECT json FROM sessions WHERE id = ?1",
                params![id],
                |r| r.get(0),
            )
            .optional()
            .map_err(db_err)?;
        json.map(|j| parse(&j)).transpose()
    }

    pub fn list(&self) -> Result<Vec<SessionRecord>, RecoverError> {
        let mut stmt = self
            .conn
            .prepare("SELECT json FROM sessions")
            .map_err(db_err)?;
        let rows = stmt
            .query_map([], |r| r.get::<_, String>(0))
            .map_err(db_err)?;
        let mut out = Vec::new();
        for r in rows {
            out.push(parse(&r.map_err(db_err)?)?);
        }
        out.sort_by(|a, b| a.created.cmp(&b.created));
        Ok(out)
    }
}

fn parse(json: &str) -> Result<SessionRecord, RecoverError> {
    serde_json::from_str(json)
        .map_err(|e| RecoverError::State(format!("unreadable session record: {e}")))
}
