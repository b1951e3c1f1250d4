//! What this host has to back up, found without connecting to anything: the database
//! servers a source with an empty connection would reach (the `PG*` environment or
//! the local PostgreSQL cluster; the local MariaDB socket). Libvirt domains are listed
//! by [`crate::libvirt`]. The dashboard's job form offers these to tick.

use std::path::Path;

use serde::Serialize;

use crate::database::Engine;
use crate::postgres::Postgres;

/// The sockets a local MariaDB server listens on, in Debian's and upstream's layouts.
const MARIADB_SOCKETS: &[&str] = &["/run/mysqld/mysqld.sock", "/var/run/mysqld/mysqld.sock"];

/// A database server found on this host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LocalDatabase {
    /// `postgresql` or `mariadb`.
    pub engine: &'static str,
    /// The source's connection: empty, since the server is the one an empty connection
    /// reaches.
    pub connection: String,
    /// Where it is, for people: a connection string or a socket.
    pub location: String,
}

/// The database servers a job on this host can back up without naming a connection.
#[must_use]
pub fn local_databases() -> Vec<LocalDatabase> {
    let mut found = Vec::new();
    if let Ok(pg) = Postgres::locate(None) {
        found.push(LocalDatabase {
            engine: Engine::Postgresql.as_str(),
            connection: String::new(),
            location: pg.target(),
        });
    }
    if let Some(sock) = MARIADB_SOCKETS.iter().find(|s| Path::new(s).exists()) {
        found.push(LocalDatabase {
            engine: Engine::Mariadb.as_str(),
            connection: String::new(),
            location: (*sock).to_owned(),
        });
    }
    found
}
