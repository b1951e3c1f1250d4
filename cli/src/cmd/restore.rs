//! `repo restore`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Result};
use cairn_engine::progress::Progress;
use cairn_engine::restore::{self, RestoreOptions};
use cairn_engine::snapshot::{Snapshot, SnapshotKind};
use cairn_engine::Repository;
use serde_json::json;

use crate::args::{Filter, Global};
use crate::exit;
use crate::format::{self, bytes};
use crate::open::Settings;
use crate::progress::Display;

/// What to restore, and where.
pub struct Request<'a> {
    pub spec: &'a str,
    pub target: &'a Path,
    pub include: &'a [PathBuf],
    /// Image format of a file target (`raw`, `qcow2`).
    pub format: Option<&'a str>,
    /// Do not wait for the data to reach the disk.
    pub no_sync: bool,
}

pub fn run(s: &Settings, g: &Global, req: &Request<'_>, f: &Filter) -> Result<u8> {
    let repo = s.open_for_reading("restore")?;
    let snap = super::find_snapshot(&repo, req.spec, f)?;
    let (target, include) = (req.target, req.include);
    let disk_set = snap.manifest.meta.contains_key("disks");
    if snap.manifest.kind == SnapshotKind::Image && !target.is_dir() && !disk_set {
        return image(&repo, g, &snap, req);
    }
    if disk_set && target.exists() && !target.is_dir() {
        bail!(
            "snapshot {} holds a VM's disks: restore it to a directory, or as a domain with `--vm`",
            snap.id.short()
        );
    }
    if req.format.is_some() {
        bail!("--format applies to an image snapshot restored to a file");
    }
    let progress = Arc::new(Progress::default());
    let display = Display::start(progress.clone(), "restore", !g.quiet && !g.json);
    let started = std::time::Instant::now();
    let opts = RestoreOptions {
        target: target.to_owned(),
        includes: include.to_vec(),
        threads: 0,
        no_sync: req.no_sync,
    };
    let out = restore::restore(&repo, &snap, &opts, &progress);
    display.finish();
    let out = out?;
    let lost = out.warnings.iter().filter(|w| w.lost).count();
    if g.json {
        format::print_json(&json!({
            "snapshot": snap.id.to_hex(),
            "target": target,
            "files": out.files,
            "dirs": out.dirs,
            "bytes": out.bytes,
            "seconds": started.elapsed().as_secs_f64(),
            "warnings": out.warnings.iter().map(|w| json!({
                "path": format::json_path(&w.path), "message": w.message, "lost": w.lost,
            })).collect::<Vec<_>>(),
        }));
    } else {
        for w in &out.warnings {
            eprintln!("warning: {}: {}", format::path(&w.path), w.message);
        }
        if !g.quiet {
            println!(
                "restored snapshot {} to {}: {} files, {} dirs, {} in {:.1}s",
                snap.id.short(),
                target.display(),
                out.files,
                out.dirs,
                bytes(out.bytes),
                started.elapsed().as_secs_f64()
            );
        }
    }
    if lost > 0 {
        eprintln!("{lost} entries were not restored completely (see the warnings above)");
        return Ok(exit::PARTIAL);
    }
    Ok(exit::OK)
}

/// Restores an image snapshot to a file: sparse raw, or qcow2 through `qemu-img convert`.
fn image(repo: &Repository, g: &Global, snap: &Snapshot, req: &Request<'_>) -> Result<u8> {
    let target = req.target;
    let format = req
        .format
        .unwrap_or(if target.extension().is_some_and(|e| e == "qcow2") {
            "qcow2"
        } else {
            "raw"
        });
    let progress = Arc::new(Progress::default());
    let display = Display::start(progress.clone(), "restore", !g.quiet && !g.json);
    let started = std::time::Instant::now();
    let result =
        cairn_agent::source::restore_image(repo, snap, target, format, req.no_sync, &progress);
    display.finish();
    let problems = result?;
    for p in &problems {
        eprintln!("warning: {}: {p}", target.display());
    }
    let size = snap.manifest.summary.total_bytes;
    if g.json {
        format::print_json(&json!({
            "snapshot": snap.id.to_hex(), "target": target, "format": format, "bytes": size,
            "seconds": started.elapsed().as_secs_f64(), "problems": problems,
        }));
    } else if !g.quiet {
        println!(
            "restored image {} to {} ({format}, {}) in {:.1}s",
            snap.id.short(),
            target.display(),
            bytes(size),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(if problems.is_empty() {
        exit::OK
    } else {
        exit::PARTIAL
    })
}
