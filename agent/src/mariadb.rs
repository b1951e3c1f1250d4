//! MariaDB as a backup source.
//!
//! - Physical: `mariadb-backup --backup` into a scratch directory, then `--prepare`, so the
//!   copy is a data directory the server starts on as is; the caller backs that directory
//!   up as the snapshot's root and removes it. The copy is given the owner of the
//!   server's data directory (it is ours, a fresh copy: nothing of the server's changes).
//! - Logical: `mariadb-dump --single-transaction` per database.
//!
//! Connection: `mariadb://USER[:PASSWORD]@HOST[:PORT][?socket=PATH]` (or `mysql://`), a
//! socket path, or nothing: the client's own defaults (`~/.my.cnf`, `MYSQL_*`), or on a
//! Debian host as root `/etc/mysql/debian.cnf`, else root over the default socket
//! (unix_socket authentication). A password never goes on a command line (`MYSQL_PWD`).

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::database::{DatabaseMeta, DatabaseSize, Engine, Method};
use crate::process::{self, ChildReader, ProcessError};

#[derive(Debug, thiserror::Error)]
pub enum MariaError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("connection {0:?}: give mariadb://USER[:PASSWORD]@HOST[:PORT][?socket=PATH] or a socket path")]
    BadConn(String),
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, Default)]
pub struct Mariadb {
    /// `--defaults-file=...`: must come first on every command line.
    defaults_file: Option<PathBuf>,
    args: Vec<OsString>,
    password: Option<String>,
    /// The server's data directory (for the owner of a physical copy).
    datadir: Option<PathBuf>,
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 3 <= b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("");
            if let Ok(v) = u8::from_str_radix(hex, 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Mariadb {
    pub fn locate(conn: Option<&str>) -> Result<Self, MariaError> {
        let mut m = Self::default();
        match conn.map(str::trim).filter(|c| !c.is_empty()) {
            Some(c) if c.starts_with('/') => {
                m.args.push(format!("--socket={c}").into());
            }
            Some(c) => {
                let rest = c
                    .strip_prefix("mariadb://")
                    .or_else(|| c.strip_prefix("mysql://"))
                    .ok_or_else(|| MariaError::BadConn(c.to_owned()))?;
                let (main, query) = rest.split_once('?').unwrap_or((rest, ""));
                let main = main.trim_end_matches('/');
                let (userinfo, hostport) = match main.rsplit_once('@') {
                    Some((u, h)) => (Some(u), h),
                    None => (None, main),
                };
                if let Some(u) = userinfo {
                    let (user, pw) = match u.split_once(':') {
                        Some((a, b)) => (a, Some(b)),
                        None => (u, None),
                    };
                    m.args
                        .push(format!("--user={}", percent_decode(user)).into());
                    m.password = pw.map(percent_decode);
                }
                if !hostport.is_empty() {
                    let (host, port) = match hostport.rsplit_once(':') {
                        Some((h, p)) if p.parse::<u16>().is_ok() => (h, Some(p)),
                        _ => (hostport, None),
                    };
                    m.args.push(format!("--host={host}").into());
                    if let Some(p) = port {
                        m.args.push(format!("--port={p}").into());
                        m.args.push("--protocol=tcp".into());
                    }
                }
                for kv in query.split('&').filter(|kv| !kv.is_empty()) {
                    match kv.split_once('=') {
                        Some(("socket", p)) => {
                            m.args
                                .push(format!("--socket={}", percent_decode(p)).into());
                        }
                        _ => return Err(MariaError::BadConn(c.to_owned())),
                    }
                }
            }
            None => {
                let debian = Path::new("/etc/mysql/debian.cnf");
                let env_set = [
                    "MYSQL_HOST",
                    "MYSQL_TCP_PORT",
                    "MYSQL_UNIX_PORT",
                    "MYSQL_PWD",
                ]
                .iter()
                .any(|v| std::env::var_os(v).is_some());
                if !env_set && std::fs::File::open(debian).is_ok() {
                    m.defaults_file = Some(debian.to_owned());
                } else if !env_set && nix::unistd::geteuid().is_root() {
                    m.args.push("--user=root".into());
                }
            }
        }
        Ok(m)
    }

    fn command(&self, program: &str) -> Command {
        let mut c = Command::new(program);
        c.current_dir("/");
        if let Some(f) = &self.defaults_file {
            c.arg(format!("--defaults-file={}", f.display()));
        }
        c.args(&self.args);
        if let Some(pw) = &self.password {
            c.env("MYSQL_PWD", pw);
        }
        c
    }

    fn query(&self, sql: &str) -> Result<Vec<Vec<String>>, MariaError> {
        let mut c = self.command("mariadb");
        c.args(["--batch", "--skip-column-names", "--raw", "-e", sql]);
        let out = process::run(&mut c, "mariadb (asking the server what it holds)")?;
        Ok(String::from_utf8_lossy(&out)
            .lines()
            .map(|l| l.split('\t').map(str::to_owned).collect())
            .collect())
    }

    pub fn inspect(&mut self, method: Method) -> Result<DatabaseMeta, MariaError> {
        let row = self
            .query("SELECT VERSION(), @@datadir")?
            .into_iter()
            .next()
            .filter(|r| r.len() == 2)
            .ok_or_else(|| MariaError::Protocol("no version row".into()))?;
        let version = row[0].clone();
        let major = version.split('.').take(2).collect::<Vec<_>>().join(".");
        self.datadir = Some(PathBuf::from(&row[1]));
        let databases = self
            .query(
                "SELECT s.schema_name, COALESCE(SUM(t.data_length + t.index_length), 0) \
                 FROM information_schema.schemata s \
                 LEFT JOIN information_schema.tables t ON t.table_schema = s.schema_name \
                 WHERE s.schema_name NOT IN ('information_schema', 'performance_schema', 'sys') \
                 GROUP BY s.schema_name ORDER BY s.schema_name",
            )?
            .into_iter()
            .filter(|r| r.len() == 2)
            .map(|r| DatabaseSize {
                bytes: r[1].parse().unwrap_or(0),
                name: r[0].clone(),
            })
            .collect();
        Ok(DatabaseMeta {
            engine: Engine::Mariadb,
            method,
            version,
            major,
            superuser: None,
            databases,
            tablespaces: Vec::new(),
            database: None,
        })
    }

    /// Copies and prepares the data directory into `target` (which must not exist),
    /// owned like the server's data directory when that is on this host.
    pub fn physical_copy(&self, target: &Path) -> Result<(), MariaError> {
        let mut c = self.command("mariadb-backup");
        c.arg("--backup")
            .arg(format!("--target-dir={}", target.display()));
        process::run(&mut c, "mariadb-backup --backup")?;
        let mut c = Command::new("mariadb-backup");
        c.current_dir("/")
            .arg("--prepare")
            .arg(format!("--target-dir={}", target.display()));
        process::run(&mut c, "mariadb-backup --prepare")?;
        if let Some(md) = self
            .datadir
            .as_ref()
            .and_then(|d| std::fs::metadata(d).ok())
        {
            chown_tree(target, md.uid(), md.gid()).map_err(|source| MariaError::Io {
                what: format!("giving {} the data directory's owner", target.display()),
                source,
            })?;
        }
        Ok(())
    }

    pub fn dump(&self, db: &str) -> Result<ChildReader, MariaError> {
        let mut c = self.command("mariadb-dump");
        c.args([
            "--single-transaction",
            "--routines",
            "--events",
            "--triggers",
            "--hex-blob",
            "--databases",
        ])
        .arg(db);
        Ok(ChildReader::spawn(
            &mut c,
            &format!("mariadb-dump of {db}"),
        )?)
    }
}

/// Gives every entry below `dir` (ours: a fresh copy) the owner `uid:gid`.
fn chown_tree(dir: &Path, uid: u32, gid: u32) -> std::io::Result<()> {
    std::os::unix::fs::lchown(dir, Some(uid), Some(gid))?;
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            chown_tree(&e.path(), uid, gid)?;
        } else {
            std::os::unix::fs::lchown(e.path(), Some(uid), Some(gid))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_parse_into_client_options() {
        let m = Mariadb::locate(Some("mariadb://bob:p%40ss@db.example:3307")).unwrap();
        assert_eq!(
            m.args,
            vec![
                OsString::from("--user=bob"),
                "--host=db.example".into(),
                "--port=3307".into(),
                "--protocol=tcp".into()
            ]
        );
        assert_eq!(m.password.as_deref(), Some("p@ss"));
        let m = Mariadb::locate(Some("/run/my.sock")).unwrap();
        assert_eq!(m.args, vec![OsString::from("--socket=/run/my.sock")]);
        let m = Mariadb::locate(Some("mysql://root@localhost?socket=/tmp/s")).unwrap();
        assert!(m.args.contains(&"--socket=/tmp/s".into()));
        assert!(Mariadb::locate(Some("postgres://x")).is_err());
        assert!(Mariadb::locate(Some("mariadb://h?evil=1")).is_err());
    }
}
