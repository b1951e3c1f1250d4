//! `repo backup`: the arguments become a [`Source`] and [`Labels`], one library call
//! ([`cairn_agent::source::backup`]) makes the snapshots, and this prints them.

use std::sync::Arc;

use anyhow::{Context, Result};
use cairn_agent::source::{self, Labels, Source, SourceBackup};
use cairn_engine::backup::BackupOutcome;
use cairn_engine::progress::Progress;
use serde_json::json;

use crate::args::{BackupArgs, Global};
use crate::exit;
use crate::format::{self, bytes};
use crate::open::Settings;
use crate::progress::Display;

/// The source the arguments name.
pub fn source_of(a: &BackupArgs) -> Result<Source> {
    Ok(if !a.vm.is_empty() {
        Source::Vm {
            names: a.vm.clone(),
            connect: a.connect.clone(),
            quiesce: a.quiesce,
        }
    } else if let Some(conn) = &a.postgres {
        Source::Postgres {
            connection: conn.clone(),
            logical: a.logical,
            name: a.name.clone(),
        }
    } else if let Some(conn) = &a.mariadb {
        Source::Mariadb {
            connection: Some(conn.clone()).filter(|c| !c.is_empty()),
            logical: a.logical,
            name: a.name.clone(),
        }
    } else if let Some(path) = &a.image {
        Source::Image {
            path: path.clone(),
            name: a.name.clone(),
        }
    } else if let Some(uri) = &a.nbd {
        Source::Nbd {
            uri: uri.clone(),
            name: a.name.clone().context("give --name for the NBD export")?,
            bitmap: a.bitmap.clone(),
        }
    } else if a.stdin {
        Source::Stdin {
            name: a.name.clone().context("give --name for the stream")?,
        }
    } else {
        Source::Paths {
            paths: a.paths.clone(),
            excludes: a.exclude.clone(),
        }
    })
}

/// What every snapshot carries.
pub fn labels_of(a: &BackupArgs) -> Labels {
    Labels {
        host: a.host.clone(),
        tags: a.tag.clone(),
        force: a.force,
        full: a.full,
        parent: None,
        threads: a.read_threads.map_or(0, usize::from),
    }
}

pub fn run(s: &Settings, g: &Global, a: &BackupArgs) -> Result<u8> {
    let source = source_of(a)?;
    let mut labels = labels_of(a);
    if let Some(name) = &a.save_as {
        save_as_job(s, g, a, name, &source)?;
        labels.tags.push(cairn_server::job::job_tag(name));
    }
    let repo = s.open_for_backup()?;
    if let Some(p) = &a.parent {
        labels.parent = Some(super::find_snapshot(&repo, p, &Default::default())?.id);
    }
    let progress = Arc::new(Progress::default());
    let display = Display::start(progress.clone(), "backup", !g.quiet && !g.json);
    let made = source::backup(&repo, &source, &labels, &progress);
    display.finish();
    let made = made?;
    match source {
        Source::Vm { .. } => super::vm::report_backup(g, &made),
        Source::Paths { .. }
        | Source::Image { .. }
        | Source::Nbd { .. }
        | Source::Stdin { .. }
        | Source::Command { .. } => match made.outcomes.into_iter().next() {
            Some(o) => Ok(report(g, o)),
            None => anyhow::bail!("backup made no snapshot"),
        },
        Source::Postgres { .. } | Source::Mariadb { .. } => Ok(report_many(g, made)),
    }
}

/// `--save-as NAME`: the backup's source, tags and host become job NAME (of the
/// default repository), saved before the backup runs as its first run.
fn save_as_job(
    s: &Settings,
    g: &Global,
    a: &BackupArgs,
    name: &str,
    source: &Source,
) -> Result<()> {
    let job = cairn_server::job::JobDefinition {
        name: name.to_owned(),
        repository: cairn_server::repos::DEFAULT.to_owned(),
        sources: vec![source.clone()],
        tags: a.tag.clone(),
        host: a.host.clone(),
        retention: None,
        verify: None,
        copy: None,
        notify: Vec::new(),
    };
    let site = super::jobs::open_site(
        s,
        &crate::args::SiteArgs {
            config: a.config.clone(),
        },
        false,
    )?;
    site.add_job(&job, false)?;
    if !g.quiet && !g.json {
        eprintln!("job {name} saved (repo job show {name}); backing up as its first run");
    }
    Ok(())
}

/// Several snapshots of one source (a physical backup, or one dump per database).
fn report_many(g: &Global, made: SourceBackup) -> u8 {
    if g.json {
        // One document: the first snapshot (the physical one) and all of them.
        let all: Vec<_> = made
            .outcomes
            .iter()
            .map(|o| format::snapshot_json(&o.snapshot))
            .collect();
        format::print_json(&json!({
            "snapshot": all.first(),
            "snapshots": all,
            "warnings": [],
        }));
        return exit::OK;
    }
    let mut code = exit::OK;
    for o in made.outcomes {
        code = code.max(report(g, o));
    }
    code
}

/// Prints what a backup saved; returns the exit code it deserves.
pub fn report(g: &Global, outcome: BackupOutcome) -> u8 {
    let BackupOutcome { snapshot, warnings } = outcome;
    let sum = &snapshot.manifest.summary;
    if g.json {
        format::print_json(&json!({
            "snapshot": format::snapshot_json(&snapshot),
            "warnings": warnings.iter().map(|w| json!({
                "path": format::json_path(&w.path), "message": w.message, "lost": w.lost,
            })).collect::<Vec<_>>(),
        }));
    } else {
        for w in &warnings {
            eprintln!("warning: {}: {}", format::path(&w.path), w.message);
        }
        if !g.quiet {
            println!(
                "snapshot {} saved: {} files ({} unchanged), {} dirs, {} in all, {} read, {} new ({} stored) in {:.1}s",
                snapshot.id.short(),
                sum.files,
                sum.files_unchanged,
                sum.dirs,
                bytes(sum.total_bytes),
                bytes(sum.bytes_read),
                bytes(sum.bytes_new),
                bytes(sum.bytes_stored),
                sum.duration_ms as f64 / 1000.0
            );
        }
    }
    if sum.errors > 0 {
        eprintln!(
            "{} entries could not be read and are missing from the snapshot",
            sum.errors
        );
        return exit::PARTIAL;
    }
    exit::OK
}
