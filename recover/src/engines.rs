//! What differs between PostgreSQL and MariaDB in a recovery session: the server's
//! command line, the session's own files (access rules, credentials), and the client
//! commands that tell when the server answers queries.
//!
//! Nothing here writes into the backed-up data directory: the session's files live in
//! its `conf/` directory and are named on the server's command line (PostgreSQL's
//! `hba_file`, MariaDB's `init-file`); whatever the server itself writes lands in the
//! overlay's upper layer.

use std::io;
use std::path::Path;

use cairn_agent::database::{DatabaseMeta, Engine};

/// Where the server finds things, as the server sees them (inside the container, or on
/// the host for the process runtime).
pub struct ServerView {
    pub data: String,
    pub conf: String,
    pub port: u16,
    pub listen: &'static str,
}

/// Where the data directory is mounted in a container.
#[must_use]
pub fn container_data_dir(e: Engine) -> &'static str {
    match e {
        Engine::Postgresql => "/var/lib/postgresql/data",
        Engine::Mariadb => "/var/lib/mysql",
    }
}

#[must_use]
pub fn container_port(e: Engine) -> u16 {
    match e {
        Engine::Postgresql => 5432,
        Engine::Mariadb => 3306,
    }
}

/// The image named after the recorded version: `postgres:15`, `mariadb:10.11`.
#[must_use]
pub fn default_image(m: &DatabaseMeta) -> String {
    match m.engine {
        Engine::Postgresql => format!("postgres:{}", m.major),
        Engine::Mariadb => format!("mariadb:{}", m.major),
    }
}

/// Files of the data directory whose owner is the server's user.
#[must_use]
pub fn owner_probes(e: Engine) -> &'static [&'static str] {
    match e {
        Engine::Postgresql => &["PG_VERSION", "global"],
        Engine::Mariadb => &["ibdata1", "mysql"],
    }
}

/// The role the session's clients use.
#[must_use]
pub fn session_user(m: &DatabaseMeta) -> String {
    match m.engine {
        Engine::Postgresql => m.superuser.clone().unwrap_or_else(|| "postgres".into()),
        Engine::Mariadb => "cairn".into(),
    }
}

/// The database a connection string names.
#[must_use]
pub fn session_database(m: &DatabaseMeta) -> String {
    match m.engine {
        Engine::Postgresql => {
            if m.databases.iter().any(|d| d.name == "postgres") || m.databases.is_empty() {
                "postgres".into()
            } else {
                m.databases[0].name.clone()
            }
        }
        Engine::Mariadb => String::new(),
    }
}

fn sql_string(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

fn pg_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Writes the session's files into `conf` (on the host). `has_config`: the data
/// directory holds a `postgresql.conf`.
pub fn write_files(
    m: &DatabaseMeta,
    conf: &Path,
    writable: bool,
    password: &str,
    has_config: bool,
) -> io::Result<()> {
    match m.engine {
        Engine::Postgresql => {
            // Local (socket) connections are trusted: the socket directory is reachable
            // only by the server's user and root. Everything over TCP needs the password.
            std::fs::write(
                conf.join("pg_hba.conf"),
                "# written by cairn for a recovery session\n\
                 local all all trust\n\
                 host all all 0.0.0.0/0 scram-sha-256\n\
                 host all all ::/0 scram-sha-256\n",
            )?;
            std::fs::write(conf.join("pg_ident.conf"), "")?;
            if !has_config {
                std::fs::write(
                    conf.join("postgresql.conf"),
                    "# the backup has no postgresql.conf (it lived outside the data directory)\n",
                )?;
            }
        }
        Engine::Mariadb => {
            let pw = sql_string(password);
            let grants = if writable {
                "ALL PRIVILEGES"
            } else {
                "SELECT, SHOW VIEW, EXECUTE, PROCESS, SHOW DATABASES"
            };
            let mut sql = String::new();
            for host in ["%", "localhost"] {
                sql.push_str(&format!(
                    "CREATE OR REPLACE USER 'cairn'@'{host}' IDENTIFIED BY {pw};\n\
                     GRANT {grants} ON *.* TO 'cairn'@'{host}';\n"
                ));
            }
            if !writable {
                sql.push_str("SET GLOBAL read_only = ON;\n");
            }
            std::fs::write(conf.join("init.sql"), sql)?;
        }
    }
    Ok(())
}

/// The server's program and arguments.
#[must_use]
pub fn server_command(
    m: &DatabaseMeta,
    v: &ServerView,
    writable: bool,
    has_config: bool,
) -> Vec<String> {
    let c = &v.conf;
    match m.engine {
        Engine::Postgresql => {
            let config = if has_config {
                format!("{}/postgresql.conf", v.data)
            } else {
                format!("{c}/postgresql.conf")
            };
            let mut a = vec![
                "postgres".to_owned(),
                "-D".into(),
                v.data.clone(),
                "-c".into(),
                format!("config_file={config}"),
            ];
            for setting in [
                format!("listen_addresses={}", v.listen),
                format!("port={}", v.port),
                format!("unix_socket_directories={c}/run"),
                format!("hba_file={c}/pg_hba.conf"),
                format!("ident_file={c}/pg_ident.conf"),
                "password_encryption=scram-sha-256".into(),
                // Never ship WAL into the production archive, never look for TLS files.
                "archive_mode=off".into(),
                // A new WAL segment is made sparse rather than written full of zeros: a
                // session's layer then holds the WAL it writes, not 16 MiB per segment.
                "wal_init_zero=off".into(),
                // A session is for reading and repairing, not for maintenance: no
                // autovacuum rewriting the pages of every table it finds unvacuumed
                // (freshly loaded tables: 148 MiB of a 2 GiB table at start). VACUUM by
                // hand still works.
                "autovacuum=off".into(),
                "ssl=off".into(),
                "logging_collector=off".into(),
                "log_destination=stderr".into(),
                format!(
                    "default_transaction_read_only={}",
                    if writable { "off" } else { "on" }
                ),
            ] {
                a.push("-c".into());
                a.push(setting);
            }
            a
        }
        Engine::Mariadb => vec![
            "mariadbd".to_owned(),
            "--no-defaults".into(),
            format!("--datadir={}", v.data),
            format!("--port={}", v.port),
            format!("--bind-address={}", v.listen),
            format!("--socket={c}/run/mysqld.sock"),
            format!("--pid-file={c}/run/mysqld.pid"),
            format!("--init-file={c}/init.sql"),
            "--skip-name-resolve".into(),
            "--skip-log-bin".into(),
            // Layers (the mount's and overlayfs): plain fsync, no native AIO.
            "--innodb-flush-method=fsync".into(),
            "--innodb-use-native-aio=0".into(),
        ],
    }
}

/// A client command that succeeds once the server answers queries as the session user.
#[must_use]
pub fn ready_command(
    m: &DatabaseMeta,
    v: &ServerView,
    password: &str,
) -> (Vec<String>, Vec<String>) {
    let c = &v.conf;
    match m.engine {
        Engine::Postgresql => (
            vec![
                "psql".into(),
                "-X".into(),
                "-w".into(),
                "-h".into(),
                format!("{c}/run"),
                "-p".into(),
                v.port.to_string(),
                "-U".into(),
                session_user(m),
                "-d".into(),
                session_database(m),
                "-At".into(),
                "-c".into(),
                "SELECT 1".into(),
            ],
            Vec::new(),
        ),
        Engine::Mariadb => (
            vec![
                "mariadb".into(),
                "--no-defaults".into(),
                "--protocol=socket".into(),
                format!("--socket={c}/run/mysqld.sock"),
                "--user=cairn".into(),
                "-e".into(),
                "SELECT 1".into(),
            ],
            vec![format!("MYSQL_PWD={password}")],
        ),
    }
}

/// A client command that sets the session's password, where the server's own files
/// did not (PostgreSQL: over the trusted socket, allowed to write once).
#[must_use]
pub fn credential_command(
    m: &DatabaseMeta,
    v: &ServerView,
    password: &str,
) -> Option<(Vec<String>, Vec<String>)> {
    match m.engine {
        Engine::Postgresql => {
            let (mut cmd, _) = ready_command(m, v, password);
            let last = cmd.len() - 1;
            cmd[last] = format!(
                "ALTER ROLE {} PASSWORD {}",
                pg_ident(&session_user(m)),
                sql_string(password)
            );
            Some((
                cmd,
                vec!["PGOPTIONS=-c default_transaction_read_only=off".into()],
            ))
        }
        Engine::Mariadb => None,
    }
}
