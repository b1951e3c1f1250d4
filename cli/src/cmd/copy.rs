//! `repo copy`: snapshots of one repository copied into another (`cairn_engine::copy`).

use anyhow::{Context, Result};
use cairn_engine::copy::copy_snapshots;
use cairn_engine::lock::LockKind;
use cairn_engine::snapshot::{self, Snapshot};
use serde_json::json;
use zeroize::Zeroizing;

use crate::args::{CopyArgs, Global};
use crate::exit;
use crate::format::{self, bytes};
use crate::open::{read_password_file, Settings};

pub fn run(s: &Settings, g: &Global, a: &CopyArgs) -> Result<u8> {
    let source_password = s.password(false)?;
    let from = match &a.from {
        Some(url) => s.other(url, source_password.clone())?,
        None => s.other(&s.repo.to_string_lossy(), source_password.clone())?,
    };
    let to = s.other(&a.to, destination_password(a, source_password)?)?;
    if from.repo == to.repo {
        anyhow::bail!("--to names the repository copied from");
    }
    let source = from
        .open_locked(LockKind::Shared, "copy")
        .with_context(|| format!("the source, {}", from.repo.display()))?;
    let dest = to
        .open_locked(LockKind::Shared, "copy")
        .with_context(|| format!("the destination, {}", to.repo.display()))?;
    let chosen = choose(&source.snapshots()?, a)?;
    if source.config().chunker != dest.config().chunker {
        tracing::warn!(
            "the two repositories cut data differently (chunker parameters): what is copied \
             is stored as it is, but their own backups will not share data"
        );
    }
    let report = copy_snapshots(&source, &dest, &chosen)?;
    if g.json {
        format::print_json(&json!({
            "copied": report.copied.iter().map(|(from, to)| json!({
                "from": from.to_hex(), "to": to.to_hex()
            })).collect::<Vec<_>>(),
            "skipped": report.skipped.iter().map(|id| id.to_hex()).collect::<Vec<_>>(),
            "blobs_read": report.blobs_read,
            "blobs_new": report.blobs_new,
            "bytes_stored": report.bytes_stored,
        }));
    } else if !g.quiet {
        for (from, to) in &report.copied {
            println!("{} copied as {}", from.short(), to.short());
        }
        println!(
            "{} snapshots copied, {} copied before; {} blobs read, {} new ({} stored)",
            report.copied.len(),
            report.skipped.len(),
            report.blobs_read,
            report.blobs_new,
            bytes(report.bytes_stored)
        );
    }
    Ok(exit::OK)
}

/// `--to-password-file`, `REPO_TO_PASSWORD_FILE`, `REPO_TO_PASSWORD`, else the source's.
fn destination_password(a: &CopyArgs, source: Zeroizing<Vec<u8>>) -> Result<Zeroizing<Vec<u8>>> {
    if let Some(f) = &a.to_password_file {
        return read_password_file(f);
    }
    if let Some(f) = std::env::var_os("REPO_TO_PASSWORD_FILE") {
        return read_password_file(std::path::Path::new(&f));
    }
    if let Some(p) = std::env::var_os("REPO_TO_PASSWORD") {
        return Ok(Zeroizing::new(p.into_encoded_bytes()));
    }
    Ok(source)
}

/// The snapshots named, or those the filters select; with `--latest N`, the newest N of
/// each host and source. Oldest first.
fn choose(all: &[Snapshot], a: &CopyArgs) -> Result<Vec<Snapshot>> {
    let filter = super::engine_filter(&a.filter);
    let mut chosen: Vec<Snapshot> = if a.snapshots.is_empty() {
        all.iter()
            .filter(|s| filter.matches(&s.manifest))
            .cloned()
            .collect()
    } else {
        let mut v = Vec::new();
        for spec in &a.snapshots {
            v.push(snapshot::select(all, spec, &filter)?.clone());
        }
        v
    };
    if let Some(n) = a.latest {
        chosen = cairn_engine::copy::newest_of_each_source(chosen, n);
    }
    chosen.sort_by_key(|s| s.manifest.time);
    chosen.dedup_by_key(|s| s.id);
    Ok(chosen)
}
