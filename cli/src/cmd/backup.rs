//! `repo backup`: file trees, a stream from standard input, disk images; databases are
//! in [`super::database`].

use std::sync::Arc;

use anyhow::{Context, Result};
use cairn_engine::backup::{
    self, BackupOutcome, ImageBackupOptions, StreamBackupOptions, TreeBackupOptions,
};
use cairn_engine::lock::LockKind;
use cairn_engine::progress::Progress;
use serde_json::json;

use crate::args::{BackupArgs, Global};
use crate::exit;
use crate::format::{self, bytes};
use crate::open::Settings;
use crate::progress::Display;

pub fn run(s: &Settings, g: &Global, a: &BackupArgs) -> Result<u8> {
    let repo = s.open_locked(LockKind::Shared, "backup")?;
    if !a.vm.is_empty() {
        return super::vm::backup(&repo, g, a);
    }
    let progress = Arc::new(Progress::default());
    let display = Display::start(progress.clone(), "backup", !g.quiet && !g.json);
    if a.postgres.is_some() || a.mariadb.is_some() {
        let outcomes = super::database::backup(&repo, a, &progress);
        display.finish();
        let outcomes = outcomes?;
        if g.json {
            // One document: the first snapshot (the physical one) and all of them.
            let all: Vec<_> = outcomes
                .iter()
                .map(|o| format::snapshot_json(&o.snapshot))
                .collect();
            format::print_json(&json!({
                "snapshot": all.first(),
                "snapshots": all,
                "warnings": [],
            }));
            return Ok(exit::OK);
        }
        let mut code = exit::OK;
        for o in outcomes {
            code = code.max(report(g, o));
        }
        return Ok(code);
    }
    let outcome = if let Some(path) = &a.image {
        let name = match &a.name {
            Some(n) => n.clone(),
            None => path
                .file_stem()
                .and_then(|s| s.to_str())
                .context("give --name for this image")?
                .to_owned(),
        };
        // An image unchanged since its last backup (same files, same stat data) is
        // recognised from the parent's record without running qemu-img or qemu-nbd.
        let parent = if a.force {
            None
        } else {
            backup::image_parent(&repo, a.host.as_deref(), &name)?
        };
        let mut source = match parent
            .and_then(|p| cairn_agent::image::ImageFile::unchanged_since(path, &p.manifest.meta))
        {
            Some(s) => s,
            None => cairn_agent::image::ImageFile::inspect(path).map_err(anyhow::Error::msg)?,
        };
        let mut meta = source.meta();
        meta.insert("source_path".to_owned(), path.display().to_string());
        let opts = ImageBackupOptions {
            name,
            host: a.host.clone(),
            tags: a.tag.clone(),
            meta,
            fingerprint: Some(source.fingerprint().to_owned()),
            force: a.force,
            ..Default::default()
        };
        backup::backup_image(&repo, &opts, &mut source, &progress)
    } else if let Some(uri) = &a.nbd {
        let uri = cairn_agent::image::NbdUri::parse(uri).map_err(anyhow::Error::msg)?;
        let mut source = cairn_agent::image::NbdSource::open(&uri, a.bitmap.as_deref())
            .with_context(|| format!("opening NBD {}", uri.describe()))?;
        let mut meta = std::collections::BTreeMap::new();
        meta.insert("source_format".to_owned(), "nbd".to_owned());
        if let Some(b) = &a.bitmap {
            meta.insert("dirty_bitmap".to_owned(), b.clone());
        }
        let opts = ImageBackupOptions {
            name: a.name.clone().unwrap_or_default(),
            host: a.host.clone(),
            tags: a.tag.clone(),
            use_changed_blocks: a.bitmap.is_some(),
            meta,
            ..Default::default()
        };
        backup::backup_image(&repo, &opts, &mut source, &progress)
    } else if a.stdin {
        let opts = StreamBackupOptions {
            name: a.name.clone().unwrap_or_default(),
            host: a.host.clone(),
            tags: a.tag.clone(),
            meta: Default::default(),
        };
        backup::backup_stream(&repo, &opts, std::io::stdin(), &progress)
    } else {
        let parent = match &a.parent {
            Some(p) => Some(super::find_snapshot(&repo, p, &Default::default())?.id),
            None => None,
        };
        let opts = TreeBackupOptions {
            paths: a.paths.clone(),
            excludes: a.exclude.clone(),
            host: a.host.clone(),
            tags: a.tag.clone(),
            parent,
            force: a.force,
            threads: a.read_threads.map_or(0, usize::from),
            ..Default::default()
        };
        backup::backup_tree(&repo, &opts, &progress)
    };
    display.finish();
    let outcome = outcome.context("backup failed; no snapshot was saved")?;
    Ok(report(g, outcome))
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
