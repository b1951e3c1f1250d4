//! Repository maintenance: `prune` (also after `forget --prune`), `repair`, `locks`,
//! `unlock`.

use anyhow::Result;
use cairn_engine::lock::{self, LockKind};
use cairn_engine::prune::{PruneOptions, PruneReport};
use cairn_engine::repair::RepairOptions;
use cairn_engine::Repository;
use serde_json::json;

use crate::args::{Global, PruneOptionsArgs};
use crate::exit;
use crate::format::{self, bytes};
use crate::open::Settings;

pub fn prune_options(s: &Settings, a: &PruneOptionsArgs, dry_run: bool) -> PruneOptions {
    PruneOptions {
        max_unused: a.max_unused,
        grace: a.grace,
        dry_run,
        lock_wait: s.lock_wait,
    }
}

pub fn prune(s: &Settings, g: &Global, a: &PruneOptionsArgs, dry_run: bool) -> Result<u8> {
    let repo = s.open_locked(LockKind::Shared, "prune")?;
    prune_open(&repo, g, &prune_options(s, a, dry_run))
}

/// Prunes an open (shared-locked) repository and prints the report.
pub fn prune_open(repo: &Repository, g: &Global, opts: &PruneOptions) -> Result<u8> {
    let r = cairn_engine::prune::prune(repo, opts)?;
    for w in &r.warnings {
        tracing::warn!("{w}");
    }
    if g.json {
        format::print_json(&json!(r));
    } else if !g.quiet {
        print_prune(&r);
    }
    Ok(exit::OK)
}

pub fn print_prune(r: &PruneReport) {
    println!(
        "{} snapshots use {} of {} blobs; {} of {} in {} packs unused",
        r.snapshots,
        r.blobs_used,
        r.blobs,
        bytes(r.bytes_unused),
        bytes(r.bytes_total),
        r.packs
    );
    let verb = if r.dry_run { "would " } else { "" };
    println!(
        "{verb}delete {} unused packs, rewrite {} packs{}",
        r.packs_deleted,
        r.packs_repacked,
        if r.dry_run {
            String::new()
        } else {
            format!(
                " into {} ({} written)",
                r.packs_written,
                bytes(r.bytes_written)
            )
        }
    );
    if r.packs_young > 0 {
        println!(
            "left {} packs with unused data alone: a backup that has not committed may need them{}",
            r.packs_young,
            if r.protected_by.is_empty() {
                " (or they are within --grace)".to_owned()
            } else {
                format!(" ({})", r.protected_by.join("; "))
            }
        );
    }
    if r.packs_kept_in_use > 0 {
        println!(
            "kept {} packs holding data that snapshots need and that has no copy elsewhere \
             ({} snapshots were committed during the prune)",
            r.packs_kept_in_use, r.snapshots_during
        );
    }
    if r.packs_unreadable > 0 {
        println!(
            "kept {} damaged packs (see the warnings)",
            r.packs_unreadable
        );
    }
    println!(
        "{}freed {} ({} blobs removed); {} unused left; {:.1} s",
        if r.dry_run { "would have " } else { "" },
        bytes(r.bytes_freed),
        r.blobs_removed,
        bytes(r.bytes_unused_left),
        r.duration_ms as f64 / 1000.0
    );
}

pub fn repair(s: &Settings, g: &Global, no_read_data: bool) -> Result<u8> {
    let repo = s.open_locked(LockKind::Exclusive, "repair")?;
    let r = cairn_engine::repair::repair(
        &repo,
        &RepairOptions {
            read_data: !no_read_data,
            lock_wait: s.lock_wait,
        },
    )?;
    if g.json {
        format::print_json(&json!(r));
    } else if !g.quiet {
        println!(
            "index rebuilt from {} packs{}",
            r.packs,
            if no_read_data {
                String::new()
            } else {
                format!(" ({} read and verified)", bytes(r.bytes_read))
            }
        );
        for p in &r.packs_unreadable {
            println!("pack {p}: trailer unreadable, its blobs are lost; moved to quarantine/");
        }
        for p in &r.packs_damaged {
            println!("pack {p}: damaged; intact blobs salvaged, pack moved to quarantine/");
        }
        if !r.packs_damaged.is_empty() {
            println!(
                "salvaged {} blobs into {} new packs; {} blobs lost",
                r.blobs_salvaged,
                r.packs_written,
                r.blobs_damaged.len()
            );
        }
        for b in &r.blobs_damaged {
            println!("lost: blob {b}");
        }
        if r.packs_unreferenced > 0 {
            println!(
                "{} packs ({}) that no snapshot uses (an interrupted backup's) are indexed: \
                 the next backup reuses them, a prune after the grace period deletes them",
                r.packs_unreferenced,
                bytes(r.bytes_unreferenced)
            );
        }
        if r.incomplete_files_removed > 0 {
            println!(
                "removed {} incomplete files of interrupted writers",
                r.incomplete_files_removed
            );
        }
        for d in &r.snapshots_damaged {
            println!(
                "snapshot {} marked damaged: {} blobs lost, {} paths not restorable whole:",
                d.snapshot.short(),
                d.lost_blobs,
                d.paths_total
            );
            for p in &d.paths {
                println!("  {}", format::path(p));
            }
        }
        if r.snapshots_healed > 0 {
            println!(
                "{} snapshots are whole again: marks removed",
                r.snapshots_healed
            );
        }
        if r.snapshots_damaged.is_empty() {
            println!("all {} snapshots are whole", r.snapshots);
        }
    }
    Ok(exit::OK)
}

pub fn locks(s: &Settings, g: &Global) -> Result<u8> {
    s.peek_config()?;
    let (backend, _) = s.location()?;
    let all = lock::list(backend.as_ref())?;
    if g.json {
        format::print_json(&json!(all
            .iter()
            .map(|e| json!({
                "name": e.name,
                "lock": e.info.as_ref().ok(),
                "error": e.info.as_ref().err(),
                "stale": e.stale,
            }))
            .collect::<Vec<_>>()));
    } else {
        for e in &all {
            match &e.stale {
                Some(why) => println!("{}  {}  STALE: {why}", short_name(&e.name), e.describe()),
                None => println!("{}  {}", short_name(&e.name), e.describe()),
            }
        }
        if all.is_empty() && !g.quiet {
            println!("no locks");
        }
    }
    Ok(exit::OK)
}

pub fn unlock(s: &Settings, g: &Global, all: bool) -> Result<u8> {
    s.peek_config()?;
    let (backend, _) = s.location()?;
    let removed = lock::unlock(backend.as_ref(), all)?;
    if g.json {
        format::print_json(&json!(removed
            .iter()
            .map(|e| json!({ "name": e.name, "stale": e.stale }))
            .collect::<Vec<_>>()));
    } else if !g.quiet {
        for e in &removed {
            println!(
                "removed {}{}",
                e.describe(),
                e.stale
                    .as_ref()
                    .map(|w| format!(" (stale: {w})"))
                    .unwrap_or_default()
            );
        }
        let left = lock::list(backend.as_ref())?.len();
        println!("{} locks removed, {left} left", removed.len());
    }
    Ok(exit::OK)
}

/// The first 8 characters of a lock file's name (any name: a lock file can be anything).
fn short_name(name: &str) -> String {
    name.chars().take(8).collect()
}

#[cfg(test)]
mod tests {
    #[test]
    fn lock_names_of_any_characters_are_shortened_without_panicking() {
        assert_eq!(super::short_name("0123456789abcdef"), "01234567");
        assert_eq!(super::short_name("ab"), "ab");
        assert_eq!(super::short_name("ééééééééé"), "éééééééé");
        assert_eq!(super::short_name(""), "");
    }
}
