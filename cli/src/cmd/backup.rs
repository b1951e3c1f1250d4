//! `repo backup`: file trees, or a stream from standard input.

use std::sync::Arc;

use anyhow::{Context, Result};
use cairn_engine::backup::{self, BackupOutcome, StreamBackupOptions, TreeBackupOptions};
use cairn_engine::progress::Progress;
use serde_json::json;

use crate::args::{BackupArgs, Global};
use crate::exit;
use crate::format::{self, bytes};
use crate::open::Settings;
use crate::progress::Display;

pub fn run(s: &Settings, g: &Global, a: &BackupArgs) -> Result<u8> {
    let repo = s.open()?;
    let progress = Arc::new(Progress::default());
    let display = Display::start(progress.clone(), "backup", !g.quiet && !g.json);
    let outcome = if a.stdin {
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
            threads: 0,
        };
        backup::backup_tree(&repo, &opts, &progress)
    };
    display.finish();
    let BackupOutcome { snapshot, warnings } =
        outcome.context("backup failed; no snapshot was saved")?;
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
        return Ok(exit::PARTIAL);
    }
    Ok(exit::OK)
}
