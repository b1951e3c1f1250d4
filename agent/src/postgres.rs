//! PostgreSQL as a backup source: the server to talk to, what it holds, and the
//! programs that copy it out.
//!
//! - Physical: `pg_basebackup -D - -F tar -X fetch` streams the data directory with the
//!   WAL needed to make it consistent; the engine ingests the tar as a tree.
//! - Logical: `pg_dump -Fc -Z0` per database (uncompressed, so it deduplicates), plus
//!   `pg_dumpall --globals-only` for roles and tablespaces.
//!
//! The connection is a libpq string or URI from the user, the usual `PG*` variables, or,
//! with neither, the local cluster found with `pg_lsclusters` (Debian) or the default
//! socket; as root, the programs then run as the cluster's owner so that peer
//! authentication over the Unix socket lets them in. Tools of the server's major version
//! are preferred (`/usr/lib/postgresql/<major>/bin`).

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::database::{DatabaseMeta, DatabaseSize, Engine, Method, Tablespace};
use crate::process::{self, ChildReader, ProcessError};

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("no PostgreSQL server found on this host: give a connection string (repo backup --postgres 'host=... port=... user=...')")]
    NotFound,
    #[error("unexpected answer from the server: {0}")]
    Protocol(String),
    #[error("tablespaces outside the data directory are not supported by physical backups yet ({0}); use --logical")]
    Tablespaces(String),
}

/// A server to back up, and how to reach it.
#[derive(Debug, Clone)]
pub struct Postgres {
    /// libpq connection string or URI; `None`: the `PG*` environment decides.
    conn: Option<String>,
    /// Run the programs as this user and group (peer authentication as root).
    run_as: Option<(u32, u32)>,
    /// Directory with the server's version of the programs, once known.
    bin_dir: Option<PathBuf>,
}

fn pg_env_set() -> bool {
    ["PGHOST", "PGPORT", "PGSERVICE", "PGDATABASE", "PGUSER"]
        .iter()
        .any(|v| std::env::var_os(v).is_some())
}

/// Adds (or replaces) the database of a connection string or URI.
#[must_use]
pub fn with_dbname(conn: &str, db: &str) -> String {
    if let Some(pos) = conn.find("://") {
        let scheme = &conn[..pos];
        if scheme == "postgresql" || scheme == "postgres" {
            let rest = &conn[pos + 3..];
            let (before_q, query) = match rest.find('?') {
                Some(q) => (&rest[..q], &rest[q..]),
                None => (rest, ""),
            };
            let authority = before_q.split('/').next().unwrap_or("");
            let enc: String = db
                .bytes()
                .map(|b| {
                    if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                        (b as char).to_string()
                    } else {
                        format!("%{b:02X}")
                    }
                })
                .collect();
            return format!("{scheme}://{authority}/{enc}{query}");
        }
    }
    let quoted = db.replace('\\', "\\\\").replace('\'', "\\'");
    // In a key=value string the last value of a keyword wins.
    format!("{conn} dbname='{quoted}'")
}

impl Postgres {
    /// The server `conn` names, or the local one.
    pub fn locate(conn: Option<&str>) -> Result<Self, PgError> {
        if let Some(c) = conn.filter(|c| !c.trim().is_empty()) {
            return Ok(Self {
                conn: Some(c.to_owned()),
                run_as: None,
                bin_dir: None,
            });
        }
        if pg_env_set() {
            return Ok(Self {
                conn: None,
                run_as: None,
                bin_dir: None,
            });
        }
        Self::local().ok_or(PgError::NotFound)
    }

    /// Where it connects, for people: the connection string, or the `PG*` variables
    /// set (values of `PGPASSWORD` are never shown).
    #[must_use]
    pub fn target(&self) -> String {
        if let Some(c) = &self.conn {
            return c.clone();
        }
        ["PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE"]
            .iter()
            .filter_map(|v| std::env::var(v).ok().map(|x| format!("{v}={x}")))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The local cluster: the first online one `pg_lsclusters` lists, else the default
    /// socket.
    fn local() -> Option<Self> {
        let root = nix::unistd::geteuid().is_root();
        let owner_ids = |user: &str| {
            nix::unistd::User::from_name(user)
                .ok()
                .flatten()
                .map(|u| (u.uid.as_raw(), u.gid.as_raw()))
        };
        if let Ok(out) = process::run(
            Command::new("pg_lsclusters").arg("--no-header"),
            "pg_lsclusters",
        ) {
            for line in String::from_utf8_lossy(&out).lines() {
                // ver cluster port status owner datadir logfile
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.len() >= 6 && f[3].starts_with("online") {
                    let (major, port, owner) = (f[0], f[2], f[4]);
                    return Some(Self {
                        conn: Some(format!(
                            "host=/var/run/postgresql port={port} user={owner} dbname=postgres"
                        )),
                        run_as: if root { owner_ids(owner) } else { None },
                        bin_dir: Some(PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"))),
                    });
                }
            }
        }
        let socket = Path::new("/var/run/postgresql/.s.PGSQL.5432");
        let md = std::fs::metadata(socket).ok()?;
        let owner = nix::unistd::User::from_uid(md.uid().into())
            .ok()
            .flatten()?;
        Some(Self {
            conn: Some(format!(
                "host=/var/run/postgresql port=5432 user={} dbname=postgres",
                owner.name
            )),
            run_as: if root {
                Some((owner.uid.as_raw(), owner.gid.as_raw()))
            } else {
                None
            },
            bin_dir: None,
        })
    }

    fn command(&self, program: &str) -> Command {
        let mut c = process::tool(self.bin_dir.as_deref(), program);
        c.current_dir("/");
        if let Some((uid, gid)) = self.run_as {
            c.uid(uid).gid(gid);
        }
        // Never wait for a password prompt.
        c.env("PGCONNECT_TIMEOUT", "15");
        c
    }

    fn conn_args(&self, c: &mut Command, db: Option<&str>) {
        match (&self.conn, db) {
            (Some(conn), Some(db)) => c.arg("-d").arg(with_dbname(conn, db)),
            (Some(conn), None) => c.arg("-d").arg(conn),
            (None, Some(db)) => c.env("PGDATABASE", db),
            (None, None) => c,
        };
    }

    /// Rows of a query, fields split (ASCII unit and record separators, so names with
    /// tabs or newlines survive).
    fn query(&self, sql: &str) -> Result<Vec<Vec<String>>, PgError> {
        let mut c = self.command("psql");
        c.args(["-X", "-w", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1"])
            .args(["-F", "\u{1f}", "-R", "\u{1e}"]);
        self.conn_args(&mut c, None);
        c.arg("-c").arg(sql);
        let out = process::run(&mut c, "psql (asking the server what it holds)")?;
        Ok(split_rows(&out))
    }

    /// Version, databases and their sizes, tablespaces, the bootstrap superuser; and,
    /// from now on, the server's version of the programs.
    pub fn inspect(&mut self, method: Method) -> Result<DatabaseMeta, PgError> {
        let row = self
            .query(
                "SELECT current_setting('server_version'), current_setting('server_version_num'), \
                 (SELECT rolname FROM pg_roles WHERE oid = 10)",
            )?
            .into_iter()
            .next()
            .filter(|r| r.len() == 3)
            .ok_or_else(|| PgError::Protocol("no version row".into()))?;
        let num: u32 = row[1]
            .parse()
            .map_err(|_| PgError::Protocol(format!("server_version_num {:?}", row[1])))?;
        let major = if num >= 100_000 {
            (num / 10_000).to_string()
        } else {
            format!("{}.{}", num / 10_000, (num / 100) % 100)
        };
        if self.bin_dir.is_none() {
            let dir = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
            if dir.is_dir() {
                self.bin_dir = Some(dir);
            }
        }
        let databases = self
            .query(
                "SELECT datname, pg_database_size(oid) FROM pg_database \
                 WHERE datallowconn AND NOT datistemplate ORDER BY datname",
            )?
            .into_iter()
            .filter(|r| r.len() == 2)
            .map(|r| DatabaseSize {
                bytes: r[1].parse().unwrap_or(0),
                name: r[0].clone(),
            })
            .collect();
        let tablespaces = self
            .query(
                "SELECT spcname, pg_tablespace_location(oid) FROM pg_tablespace ORDER BY spcname",
            )?
            .into_iter()
            .filter(|r| r.len() == 2)
            .map(|r| Tablespace {
                name: r[0].clone(),
                location: r[1].clone(),
            })
            .collect();
        Ok(DatabaseMeta {
            engine: Engine::Postgresql,
            method,
            version: row[0].clone(),
            major,
            superuser: Some(row[2].clone()),
            databases,
            tablespaces,
            database: None,
        })
    }

    /// The data directory as a tar stream (after [`Self::inspect`]).
    pub fn base_backup(&self, meta: &DatabaseMeta) -> Result<ChildReader, PgError> {
        let outside: Vec<String> = meta
            .tablespaces
            .iter()
            .filter(|t| !t.location.is_empty())
            .map(|t| format!("{} at {}", t.name, t.location))
            .collect();
        if !outside.is_empty() {
            return Err(PgError::Tablespaces(outside.join(", ")));
        }
        let mut c = self.command("pg_basebackup");
        self.conn_args(&mut c, None);
        c.args(["-D", "-", "-F", "tar", "-X", "fetch", "-c", "fast", "-w"])
            .args(["-l", "cairn"]);
        Ok(ChildReader::spawn(&mut c, "pg_basebackup")?)
    }

    /// One database as a custom-format dump (uncompressed: the repository compresses).
    pub fn dump(&self, db: &str) -> Result<ChildReader, PgError> {
        let mut c = self.command("pg_dump");
        self.conn_args(&mut c, Some(db));
        c.args(["-w", "-Fc", "-Z", "0"]);
        Ok(ChildReader::spawn(&mut c, &format!("pg_dump of {db}"))?)
    }

    /// Roles and tablespaces (role passwords only for a superuser).
    pub fn dump_globals(&self) -> Result<ChildReader, PgError> {
        let superuser = self
            .query("SELECT rolsuper FROM pg_roles WHERE rolname = current_user")?
            .first()
            .is_some_and(|r| r.first().map(String::as_str) == Some("t"));
        let mut c = self.command("pg_dumpall");
        self.conn_args(&mut c, None);
        c.args(["-w", "--globals-only"]);
        if !superuser {
            c.arg("--no-role-passwords");
        }
        Ok(ChildReader::spawn(&mut c, "pg_dumpall --globals-only")?)
    }
}

/// Rows of psql's unaligned output with 0x1f between fields and 0x1e between records.
fn split_rows(out: &[u8]) -> Vec<Vec<String>> {
    let text = String::from_utf8_lossy(out);
    text.trim_end_matches('\n')
        .split('\u{1e}')
        .filter(|r| !r.is_empty())
        .map(|r| r.split('\u{1f}').map(str::to_owned).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dbname_is_added_to_strings_and_uris() {
        assert_eq!(
            with_dbname("host=/tmp port=5 dbname=x", "my db"),
            "host=/tmp port=5 dbname=x dbname='my db'"
        );
        assert_eq!(
            with_dbname("postgresql://u@h:5/old?sslmode=disable", "a/b"),
            "postgresql://u@h:5/a%2Fb?sslmode=disable"
        );
        assert_eq!(with_dbname("postgres://h", "d"), "postgres://h/d");
    }

    #[test]
    fn rows_split_on_separators() {
        assert_eq!(
            split_rows(b"a\x1fb\x1ec\td\x1fe\n"),
            vec![
                vec!["a".to_owned(), "b".to_owned()],
                vec!["c\td".to_owned(), "e".to_owned()]
            ]
        );
        assert!(split_rows(b"").is_empty());
    }
}
