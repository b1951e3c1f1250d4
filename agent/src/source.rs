//! One backup of one source, whatever it is: the operation `repo backup`, a scheduled
//! job and the API all run.
//!
//! A [`Source`] says what to read (paths, a disk image, an NBD export, a database
//! server, VMs by name, a program's output, standard input); [`Labels`] what every
//! snapshot of it carries; [`backup`] chooses the reader, makes the snapshots and
//! reports them. A source that makes several snapshots (logical dumps, several VMs) keeps
//! those that finished when a later one fails, and reports the failure.
//!
//! Sources are data (serde): a job definition names them in TOML or JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use cairn_engine::backup::{
    self, ArchiveBackupOptions, BackupOutcome, ImageBackupOptions, StreamBackupOptions,
    TreeBackupOptions,
};
use cairn_engine::id::SnapshotId;
use cairn_engine::progress::{Level, Progress};
use cairn_engine::Repository;
use serde::{Deserialize, Serialize};

use crate::database::{DatabaseMeta, Method};
use crate::image::{ImageFile, NbdSource, NbdUri};
use crate::libvirt::backup::{backup_vm, Quiesce, VmBackupOptions, VmBackupReport};
use crate::libvirt::{Hypervisor, VmError};
use crate::mariadb::{MariaError, Mariadb};
use crate::postgres::{PgError, Postgres};
use crate::process::{ChildReader, ProcessError};

/// What to back up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    /// Files and directories: one tree snapshot.
    Paths {
        paths: Vec<PathBuf>,
        /// Glob patterns left out.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        excludes: Vec<String>,
    },
    /// A disk image file (qcow2, raw, VMDK): one image snapshot.
    Image {
        path: PathBuf,
        /// The snapshot's name; the file's stem by default.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// An NBD export, optionally read through a dirty bitmap.
    Nbd {
        uri: String,
        name: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        bitmap: Option<String>,
    },
    /// A PostgreSQL server: a physical backup (one tree snapshot) or logical dumps (one
    /// stream snapshot per database, and the globals).
    Postgres {
        connection: String,
        #[serde(default)]
        logical: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// A MariaDB server (the local one when `connection` is not given).
    Mariadb {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connection: Option<String>,
        #[serde(default)]
        logical: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        name: Option<String>,
    },
    /// libvirt domains by name, or `all`: one snapshot per domain.
    Vm {
        names: Vec<String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        connect: Option<String>,
        /// The guest agent must freeze the filesystems.
        #[serde(default)]
        quiesce: bool,
    },
    /// The standard output of a program (an argument vector, never a shell string): one
    /// stream snapshot; the program failing fails the snapshot.
    Command { name: String, argv: Vec<String> },
    /// Standard input: one stream snapshot (the command line only).
    Stdin { name: String },
}

impl Source {
    /// A short description for logs and messages: `paths /etc, /home`, `vm web1`.
    #[must_use]
    pub fn describe(&self) -> String {
        match self {
            Self::Paths { paths, .. } => format!(
                "paths {}",
                paths
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Self::Image { path, .. } => format!("image {}", path.display()),
            Self::Nbd { uri, .. } => format!("nbd {uri}"),
            Self::Postgres { logical, .. } => {
                format!(
                    "postgres ({})",
                    if *logical { "logical" } else { "physical" }
                )
            }
            Self::Mariadb { logical, .. } => {
                format!(
                    "mariadb ({})",
                    if *logical { "logical" } else { "physical" }
                )
            }
            Self::Vm { names, .. } => format!("vm {}", names.join(", ")),
            Self::Command { name, .. } => format!("command {name}"),
            Self::Stdin { name } => format!("stdin {name}"),
        }
    }

    /// What is wrong with this source before anything runs (a job definition is checked
    /// with it when it is saved). `Err` names the field.
    pub fn validate(&self) -> Result<(), String> {
        let need = |ok: bool, what: &str| if ok { Ok(()) } else { Err(what.to_owned()) };
        match self {
            Self::Paths { paths, .. } => need(
                !paths.is_empty() && paths.iter().all(|p| p.is_absolute()),
                "paths: give at least one absolute path, e.g. paths = [\"/etc\"]",
            ),
            Self::Image { path, .. } => need(
                path.is_absolute(),
                "path: an absolute path to the image, e.g. path = \"/var/lib/libvirt/images/a.qcow2\"",
            ),
            Self::Nbd { uri, name, .. } => {
                NbdUri::parse(uri).map_err(|e| format!("uri: {e}"))?;
                need(!name.is_empty(), "name: the snapshot's name, e.g. name = \"disk0\"")
            }
            // An empty connection: the PG* environment, else the local cluster.
            Self::Postgres { .. } | Self::Mariadb { .. } => Ok(()),
            Self::Vm { names, .. } => need(
                !names.is_empty() && names.iter().all(|n| !n.is_empty()),
                "names: domain names or \"all\", e.g. names = [\"web1\"]",
            ),
            Self::Command { name, argv } => {
                need(!name.is_empty(), "name: the stream's name, e.g. name = \"ldap.ldif\"")?;
                need(
                    !argv.is_empty() && Path::new(&argv[0]).is_absolute(),
                    "argv: the program as an absolute path and its arguments, e.g. argv = [\"/usr/sbin/slapcat\"]",
                )
            }
            Self::Stdin { .. } => Err(
                "type: stdin is for the command line; a job reads a program's output with type = \"command\""
                    .into(),
            ),
        }
    }
}

/// What every snapshot of a backup carries, and how hard to look.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Labels {
    /// The host recorded in the snapshots (this host's name by default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// Read everything again: no unchanged-file or unchanged-image shortcut.
    #[serde(default)]
    pub force: bool,
    /// VMs: read every disk whole, whatever the bitmaps say.
    #[serde(default)]
    pub full: bool,
    /// Paths: compare with this snapshot rather than the latest of the same paths.
    #[serde(skip)]
    pub parent: Option<SnapshotId>,
    /// Paths: reader threads (0: automatic).
    #[serde(skip)]
    pub threads: usize,
}

/// What a backup of a source made.
#[derive(Debug, Default)]
pub struct SourceBackup {
    pub outcomes: Vec<BackupOutcome>,
    /// One report per VM backed up.
    pub vms: Vec<VmBackupReport>,
    /// Parts that failed while others were saved (a VM of several).
    pub failures: Vec<PartFailure>,
}

/// One part of a source that failed (the others' snapshots stay).
#[derive(Debug, Clone, Serialize)]
pub struct PartFailure {
    pub what: String,
    pub error: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("{context}: {source}")]
    Engine {
        context: String,
        #[source]
        source: cairn_engine::Error,
    },
    #[error("{context}: {source}")]
    Postgres {
        context: &'static str,
        #[source]
        source: PgError,
    },
    #[error("{context}: {source}")]
    Mariadb {
        context: &'static str,
        #[source]
        source: MariaError,
    },
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("{0}")]
    Image(String),
    #[error(transparent)]
    Process(#[from] ProcessError),
    #[error("{0}")]
    Invalid(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl SourceError {
    /// The engine's error underneath, if any (for exit codes).
    #[must_use]
    pub fn engine(&self) -> Option<&cairn_engine::Error> {
        match self {
            Self::Engine { source, .. } => Some(source),
            _ => None,
        }
    }
}

fn engine(context: impl Into<String>) -> impl FnOnce(cairn_engine::Error) -> SourceError {
    let context = context.into();
    move |source| SourceError::Engine { context, source }
}

/// Backs up `source` into `repo` (which the caller holds a shared lock on).
pub fn backup(
    repo: &Repository,
    source: &Source,
    labels: &Labels,
    progress: &Progress,
) -> Result<SourceBackup, SourceError> {
    let one = |o: BackupOutcome| SourceBackup {
        outcomes: vec![o],
        ..SourceBackup::default()
    };
    match source {
        Source::Paths { paths, excludes } => {
            paths_backup(repo, paths, excludes, labels, progress).map(one)
        }
        Source::Image { path, name } => {
            image_backup(repo, path, name.as_deref(), labels, progress).map(one)
        }
        Source::Nbd { uri, name, bitmap } => {
            nbd_backup(repo, uri, name, bitmap.as_deref(), labels, progress).map(one)
        }
        Source::Postgres {
            connection,
            logical,
            name,
        } => postgres_backup(
            repo,
            connection,
            *logical,
            name.as_deref(),
            labels,
            progress,
        )
        .map(|outcomes| SourceBackup {
            outcomes,
            ..SourceBackup::default()
        }),
        Source::Mariadb {
            connection,
            logical,
            name,
        } => mariadb_backup(
            repo,
            connection.as_deref(),
            *logical,
            name.as_deref(),
            labels,
            progress,
        )
        .map(|outcomes| SourceBackup {
            outcomes,
            ..SourceBackup::default()
        }),
        Source::Vm {
            names,
            connect,
            quiesce,
        } => vm_backup(repo, names, connect.as_deref(), *quiesce, labels, progress),
        Source::Command { name, argv } => {
            command_backup(repo, name, argv, labels, progress).map(one)
        }
        Source::Stdin { name } => stream(
            repo,
            name,
            labels,
            BTreeMap::new(),
            std::io::stdin(),
            progress,
        )
        .map_err(engine("backup failed; no snapshot was saved"))
        .map(one),
    }
}

fn paths_backup(
    repo: &Repository,
    paths: &[PathBuf],
    excludes: &[String],
    labels: &Labels,
    progress: &Progress,
) -> Result<BackupOutcome, SourceError> {
    let opts = TreeBackupOptions {
        paths: paths.to_vec(),
        excludes: excludes.to_vec(),
        host: labels.host.clone(),
        tags: labels.tags.clone(),
        parent: labels.parent,
        force: labels.force,
        threads: labels.threads,
        ..Default::default()
    };
    backup::backup_tree(repo, &opts, progress)
        .map_err(engine("backup failed; no snapshot was saved"))
}

/// A disk image. One unchanged since its last backup (same files, same stat data) is
/// recognised from the parent's record without running qemu-img or qemu-nbd.
fn image_backup(
    repo: &Repository,
    path: &Path,
    name: Option<&str>,
    labels: &Labels,
    progress: &Progress,
) -> Result<BackupOutcome, SourceError> {
    let name = match name {
        Some(n) => n.to_owned(),
        None => path
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| {
                SourceError::Invalid(format!("{}: give the image a name", path.display()))
            })?
            .to_owned(),
    };
    let parent = if labels.force {
        None
    } else {
        backup::image_parent(repo, labels.host.as_deref(), &name)
            .map_err(engine("finding the image's last backup"))?
    };
    let mut source = match parent.and_then(|p| ImageFile::unchanged_since(path, &p.manifest.meta)) {
        Some(s) => {
            progress.say(
                Level::Info,
                format!("{}: unchanged since its last backup", path.display()),
            );
            s
        }
        None => ImageFile::inspect(path).map_err(SourceError::Image)?,
    };
    let mut meta = source.meta();
    meta.insert("source_path".to_owned(), path.display().to_string());
    let opts = ImageBackupOptions {
        name,
        host: labels.host.clone(),
        tags: labels.tags.clone(),
        meta,
        fingerprint: Some(source.fingerprint().to_owned()),
        force: labels.force,
        ..Default::default()
    };
    backup::backup_image(repo, &opts, &mut source, progress)
        .map_err(engine("backup failed; no snapshot was saved"))
}

fn nbd_backup(
    repo: &Repository,
    uri: &str,
    name: &str,
    bitmap: Option<&str>,
    labels: &Labels,
    progress: &Progress,
) -> Result<BackupOutcome, SourceError> {
    let uri = NbdUri::parse(uri).map_err(SourceError::Invalid)?;
    let mut source = NbdSource::open(&uri, bitmap).map_err(|e| SourceError::Io {
        context: format!("opening NBD {}", uri.describe()),
        source: std::io::Error::other(e.to_string()),
    })?;
    let mut meta = BTreeMap::new();
    meta.insert("source_format".to_owned(), "nbd".to_owned());
    if let Some(b) = bitmap {
        meta.insert("dirty_bitmap".to_owned(), b.to_owned());
    }
    let opts = ImageBackupOptions {
        name: name.to_owned(),
        host: labels.host.clone(),
        tags: labels.tags.clone(),
        use_changed_blocks: bitmap.is_some(),
        meta,
        ..Default::default()
    };
    backup::backup_image(repo, &opts, &mut source, progress)
        .map_err(engine("backup failed; no snapshot was saved"))
}

fn method(logical: bool) -> Method {
    if logical {
        Method::Logical
    } else {
        Method::Physical
    }
}

/// PostgreSQL: the physical backup (a `pg_basebackup` tar, ingested as the data
/// directory), or `pg_dump` of each database and `pg_dumpall --globals-only`.
fn postgres_backup(
    repo: &Repository,
    conn: &str,
    logical: bool,
    name: Option<&str>,
    labels: &Labels,
    progress: &Progress,
) -> Result<Vec<BackupOutcome>, SourceError> {
    let pg_err = |context| move |source| SourceError::Postgres { context, source };
    let mut pg = Postgres::locate(Some(conn)).map_err(pg_err("finding the PostgreSQL server"))?;
    let meta = pg
        .inspect(method(logical))
        .map_err(pg_err("asking the PostgreSQL server what it holds"))?;
    let name = name.unwrap_or("postgresql");
    if !logical {
        let reader = pg.base_backup(&meta).map_err(pg_err(
            "PostgreSQL physical backup failed; no snapshot was saved",
        ))?;
        let opts = ArchiveBackupOptions {
            name: name.to_owned(),
            host: labels.host.clone(),
            tags: labels.tags.clone(),
            meta: meta.to_meta(),
        };
        return backup::backup_tar(repo, &opts, reader, progress)
            .map(|o| vec![o])
            .map_err(engine(
                "PostgreSQL physical backup failed; no snapshot was saved",
            ));
    }
    let mut out = Vec::new();
    let globals = pg
        .dump_globals()
        .map_err(pg_err("dumping the PostgreSQL globals"))?;
    out.push(dump_stream(
        repo,
        labels,
        &format!("{name}-globals.sql"),
        &meta,
        None,
        globals,
        progress,
    )?);
    for db in meta.databases.iter().map(|d| d.name.as_str()) {
        let file = format!("{name}-{}.dump", db.replace('/', "_"));
        let reader = pg.dump(db).map_err(pg_err("starting pg_dump"))?;
        out.push(dump_stream(
            repo,
            labels,
            &file,
            &meta,
            Some(db),
            reader,
            progress,
        )?);
    }
    Ok(out)
}

/// MariaDB: a `mariadb-backup` copy prepared in a scratch directory and saved as the
/// data directory, or `mariadb-dump` of each database but `mysql` (users and grants are
/// not a dump a user restores).
fn mariadb_backup(
    repo: &Repository,
    conn: Option<&str>,
    logical: bool,
    name: Option<&str>,
    labels: &Labels,
    progress: &Progress,
) -> Result<Vec<BackupOutcome>, SourceError> {
    let m_err = |context| move |source| SourceError::Mariadb { context, source };
    let mut m = Mariadb::locate(conn).map_err(m_err("finding the MariaDB server"))?;
    let meta = m
        .inspect(method(logical))
        .map_err(m_err("asking the MariaDB server what it holds"))?;
    let name = name.unwrap_or("mariadb");
    if !logical {
        let base =
            std::env::var_os("TMPDIR").map_or_else(|| PathBuf::from("/var/tmp"), PathBuf::from);
        let scratch = tempfile::Builder::new()
            .prefix("cairn-mariadb-")
            .tempdir_in(&base)
            .map_err(|e| SourceError::Io {
                context: format!("making a scratch directory in {}", base.display()),
                source: e,
            })?;
        let copy = scratch.path().join("data");
        m.physical_copy(&copy).map_err(m_err(
            "MariaDB physical backup failed; no snapshot was saved",
        ))?;
        let opts = TreeBackupOptions {
            paths: vec![copy],
            host: labels.host.clone(),
            tags: labels.tags.clone(),
            root_name: Some(name.to_owned()),
            meta: meta.to_meta(),
            // A fresh copy each time: nothing to compare by inode with the parent.
            force: true,
            ..Default::default()
        };
        return backup::backup_tree(repo, &opts, progress)
            .map(|o| vec![o])
            .map_err(engine(
                "MariaDB physical backup failed; no snapshot was saved",
            ));
    }
    let mut out = Vec::new();
    for db in meta
        .databases
        .iter()
        .map(|d| d.name.as_str())
        .filter(|d| *d != "mysql")
    {
        let file = format!("{name}-{}.sql", db.replace('/', "_"));
        let reader = m.dump(db).map_err(m_err("starting mariadb-dump"))?;
        out.push(dump_stream(
            repo,
            labels,
            &file,
            &meta,
            Some(db),
            reader,
            progress,
        )?);
    }
    Ok(out)
}

fn dump_stream<R: std::io::Read + Send>(
    repo: &Repository,
    labels: &Labels,
    file: &str,
    meta: &DatabaseMeta,
    database: Option<&str>,
    reader: R,
    progress: &Progress,
) -> Result<BackupOutcome, SourceError> {
    let meta = DatabaseMeta {
        database: database.map(str::to_owned),
        ..meta.clone()
    };
    stream(repo, file, labels, meta.to_meta(), reader, progress).map_err(engine(format!(
        "dump {file} failed; no snapshot of it was saved"
    )))
}

fn stream<R: std::io::Read + Send>(
    repo: &Repository,
    name: &str,
    labels: &Labels,
    meta: BTreeMap<String, String>,
    reader: R,
    progress: &Progress,
) -> cairn_engine::Result<BackupOutcome> {
    let opts = StreamBackupOptions {
        name: name.to_owned(),
        host: labels.host.clone(),
        tags: labels.tags.clone(),
        meta,
    };
    backup::backup_stream(repo, &opts, reader, progress)
}

/// VMs by name (or `all`): one snapshot each; one that fails does not stop the others.
fn vm_backup(
    repo: &Repository,
    names: &[String],
    connect: Option<&str>,
    quiesce: bool,
    labels: &Labels,
    progress: &Progress,
) -> Result<SourceBackup, SourceError> {
    let hv = Hypervisor::connect(connect)?;
    let names: Vec<String> = if names.iter().any(|n| n == "all") {
        hv.vms()?.iter().map(|v| v.name().to_owned()).collect()
    } else {
        names.to_vec()
    };
    if names.is_empty() {
        return Err(SourceError::Invalid(format!(
            "no domain to back up on {}",
            hv.uri()
        )));
    }
    let opts = VmBackupOptions {
        quiesce: if quiesce {
            Quiesce::Required
        } else {
            Quiesce::Auto
        },
        full: labels.full,
        tags: labels.tags.clone(),
        host: labels.host.clone(),
    };
    let mut out = SourceBackup::default();
    for name in &names {
        progress.set_current(name);
        match backup_vm(repo, &hv, name, &opts, progress) {
            Ok((outcome, report)) => {
                for d in &report.disks {
                    if let Some(note) = &d.note {
                        progress.say(
                            Level::Warn,
                            format!("{name}: {} read whole: {note}", d.target),
                        );
                    }
                }
                out.outcomes.push(outcome);
                out.vms.push(report);
            }
            Err(e) => {
                progress.say(Level::Error, format!("{name}: {e}"));
                out.failures.push(PartFailure {
                    what: name.clone(),
                    error: e.to_string(),
                });
            }
        }
    }
    Ok(out)
}

/// A program's standard output as a stream; its failure fails the snapshot.
fn command_backup(
    repo: &Repository,
    name: &str,
    argv: &[String],
    labels: &Labels,
    progress: &Progress,
) -> Result<BackupOutcome, SourceError> {
    let (program, args) = argv
        .split_first()
        .ok_or_else(|| SourceError::Invalid("argv: the program to run is missing".into()))?;
    let mut cmd = Command::new(program);
    cmd.args(args);
    let reader = ChildReader::spawn(&mut cmd, program)?;
    let mut meta = BTreeMap::new();
    meta.insert("source_command".to_owned(), shell_words::join(argv));
    stream(repo, name, labels, meta, reader, progress).map_err(engine(format!(
        "{program} failed; no snapshot of its output was saved"
    )))
}

/// A snapshot of `source` restored as a disk image file in `format` (`raw`, `qcow2`):
/// sparse raw written by the engine, anything else converted by `qemu-img`. Returns the
/// problems met (a missing blob zero-filled, say).
pub fn restore_image(
    repo: &Repository,
    snapshot: &cairn_engine::snapshot::Snapshot,
    target: &Path,
    format: &str,
    no_sync: bool,
    progress: &Progress,
) -> Result<Vec<String>, SourceError> {
    let raw = if format == "raw" {
        target.to_owned()
    } else {
        target.with_extension("cairn-restore.raw")
    };
    // A raw file that is only a step towards another format need not reach the disk.
    let no_sync_raw = no_sync || format != "raw";
    let problems =
        cairn_engine::restore::restore_single_file(repo, snapshot, &raw, no_sync_raw, progress)
            .map_err(engine(format!("restoring to {}", raw.display())))?;
    if format != "raw" {
        let converted = crate::qemu::convert_raw(&raw, target, format);
        let _ = std::fs::remove_file(&raw);
        converted.map_err(|e| SourceError::Image(format!("converting to {format}: {e}")))?;
        if !no_sync {
            std::fs::File::open(target)
                .and_then(|f| f.sync_all())
                .map_err(|e| SourceError::Io {
                    context: format!("syncing {} to disk", target.display()),
                    source: e,
                })?;
        }
    }
    Ok(problems)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_read_from_toml_and_refuse_unknown_fields() {
        let s: Source = toml_like(r#"{"type":"paths","paths":["/etc"],"excludes":["*.tmp"]}"#);
        assert_eq!(
            s,
            Source::Paths {
                paths: vec!["/etc".into()],
                excludes: vec!["*.tmp".into()]
            }
        );
        let bad =
            serde_json::from_str::<Source>(r#"{"type":"paths","paths":["/etc"],"exclude":[]}"#);
        assert!(bad.unwrap_err().to_string().contains("exclude"));
        let unknown = serde_json::from_str::<Source>(r#"{"type":"tape"}"#);
        assert!(unknown.is_err());
    }

    fn toml_like(json: &str) -> Source {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn validation_names_the_field_and_shows_an_example() {
        let e = Source::Paths {
            paths: vec!["relative".into()],
            excludes: vec![],
        }
        .validate()
        .unwrap_err();
        assert!(e.starts_with("paths:") && e.contains("e.g."), "{e}");
        let e = Source::Command {
            name: "x".into(),
            argv: vec!["slapcat".into()],
        }
        .validate()
        .unwrap_err();
        assert!(e.starts_with("argv:"), "{e}");
        assert!(Source::Stdin { name: "x".into() }.validate().is_err());
        assert!(Source::Vm {
            names: vec!["all".into()],
            connect: None,
            quiesce: false
        }
        .validate()
        .is_ok());
    }
}
