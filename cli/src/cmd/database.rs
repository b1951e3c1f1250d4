//! `repo backup --postgres | --mariadb`: database servers, through cairn-agent.
//!
//! Physical backups make one tree snapshot whose root is a data directory the server
//! starts on; logical backups make one stream snapshot per database (and one of the
//! PostgreSQL globals). Every snapshot records the server's facts in its manifest
//! ([`cairn_agent::database`]). A program that fails fails its snapshot: nothing of a
//! half dump is committed (snapshots already finished in the same run stay).

use std::path::PathBuf;

use anyhow::{Context, Result};
use cairn_agent::database::{DatabaseMeta, Method};
use cairn_agent::mariadb::Mariadb;
use cairn_agent::postgres::Postgres;
use cairn_engine::backup::{
    self, ArchiveBackupOptions, BackupOutcome, StreamBackupOptions, TreeBackupOptions,
};
use cairn_engine::progress::Progress;
use cairn_engine::Repository;

use crate::args::BackupArgs;

pub fn backup(
    repo: &Repository,
    a: &BackupArgs,
    progress: &Progress,
) -> Result<Vec<BackupOutcome>> {
    let method = if a.logical {
        Method::Logical
    } else {
        Method::Physical
    };
    if let Some(conn) = &a.postgres {
        let mut pg =
            Postgres::locate(Some(conn.as_str())).context("finding the PostgreSQL server")?;
        let meta = pg
            .inspect(method)
            .context("asking the PostgreSQL server what it holds")?;
        let name = a.name.clone().unwrap_or_else(|| "postgresql".into());
        match method {
            Method::Physical => {
                let reader = pg.base_backup(&meta)?;
                let opts = ArchiveBackupOptions {
                    name,
                    host: a.host.clone(),
                    tags: a.tag.clone(),
                    meta: meta.to_meta(),
                };
                Ok(vec![backup::backup_tar(repo, &opts, reader, progress)
                    .context(
                        "PostgreSQL physical backup failed; no snapshot was saved",
                    )?])
            }
            Method::Logical => {
                let mut out = Vec::new();
                let globals = pg.dump_globals()?;
                out.push(stream(
                    repo,
                    a,
                    &format!("{name}-globals.sql"),
                    &meta,
                    None,
                    globals,
                    progress,
                )?);
                let names = meta.databases.iter().map(|d| d.name.as_str());
                out.extend(dump_each(
                    repo,
                    a,
                    &meta,
                    &name,
                    "dump",
                    names,
                    |db| Ok(pg.dump(db)?),
                    progress,
                )?);
                Ok(out)
            }
        }
    } else {
        let conn = a.mariadb.as_deref();
        let mut m = Mariadb::locate(conn).context("finding the MariaDB server")?;
        let meta = m
            .inspect(method)
            .context("asking the MariaDB server what it holds")?;
        let name = a.name.clone().unwrap_or_else(|| "mariadb".into());
        match method {
            Method::Physical => {
                let base = std::env::var_os("TMPDIR")
                    .map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
                let scratch = tempfile::Builder::new()
                    .prefix("cairn-mariadb-")
                    .tempdir_in(&base)
                    .with_context(|| format!("making a scratch directory in {}", base.display()))?;
                let copy = scratch.path().join("data");
                m.physical_copy(&copy)
                    .context("MariaDB physical backup failed; no snapshot was saved")?;
                let opts = TreeBackupOptions {
                    paths: vec![copy],
                    host: a.host.clone(),
                    tags: a.tag.clone(),
                    root_name: Some(name),
                    meta: meta.to_meta(),
                    // A fresh copy each time: nothing to compare by inode with the parent.
                    force: true,
                    ..Default::default()
                };
                let outcome = backup::backup_tree(repo, &opts, progress)
                    .context("MariaDB physical backup failed; no snapshot was saved")?;
                Ok(vec![outcome])
            }
            Method::Logical => {
                // The `mysql` schema (users, grants) is not a dump a user restores.
                let names = meta
                    .databases
                    .iter()
                    .map(|d| d.name.as_str())
                    .filter(|d| *d != "mysql");
                dump_each(
                    repo,
                    a,
                    &meta,
                    &name,
                    "sql",
                    names,
                    |db| Ok(m.dump(db)?),
                    progress,
                )
            }
        }
    }
}

/// One stream snapshot `<name>-<db>.<ext>` per database, from `dump(db)`.
#[allow(clippy::too_many_arguments)]
fn dump_each<'d, R: std::io::Read + Send>(
    repo: &Repository,
    a: &BackupArgs,
    meta: &DatabaseMeta,
    name: &str,
    ext: &str,
    databases: impl Iterator<Item = &'d str>,
    dump: impl Fn(&str) -> Result<R>,
    progress: &Progress,
) -> Result<Vec<BackupOutcome>> {
    databases
        .map(|db| {
            let file = format!("{name}-{}.{ext}", db.replace('/', "_"));
            stream(repo, a, &file, meta, Some(db), dump(db)?, progress)
        })
        .collect()
}

fn stream<R: std::io::Read + Send>(
    repo: &Repository,
    a: &BackupArgs,
    file: &str,
    meta: &DatabaseMeta,
    database: Option<&str>,
    reader: R,
    progress: &Progress,
) -> Result<BackupOutcome> {
    let meta = DatabaseMeta {
        database: database.map(str::to_owned),
        ..meta.clone()
    };
    let opts = StreamBackupOptions {
        name: file.to_owned(),
        host: a.host.clone(),
        tags: a.tag.clone(),
        meta: meta.to_meta(),
    };
    backup::backup_stream(repo, &opts, reader, progress)
        .with_context(|| format!("dump {file} failed; no snapshot of it was saved"))
}
