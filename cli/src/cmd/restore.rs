//! `repo restore`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Result;
use cairn_engine::progress::Progress;
use cairn_engine::restore::{self, RestoreOptions};
use serde_json::json;

use crate::args::{Filter, Global};
use crate::exit;
use crate::format::{self, bytes};
use crate::open::Settings;
use crate::progress::Display;

pub fn run(
    s: &Settings,
    g: &Global,
    spec: &str,
    target: &Path,
    include: &[PathBuf],
    f: &Filter,
) -> Result<u8> {
    let repo = s.open()?;
    let snap = super::find_snapshot(&repo, spec, f)?;
    let progress = Arc::new(Progress::default());
    let display = Display::start(progress.clone(), "restore", !g.quiet && !g.json);
    let started = std::time::Instant::now();
    let opts = RestoreOptions {
        target: target.to_owned(),
        includes: include.to_vec(),
        threads: 0,
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
