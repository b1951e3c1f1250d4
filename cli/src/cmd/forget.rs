//! `repo forget`: applies a keep policy to each group of snapshots (by host and source)
//! and removes the manifests of those it does not keep. Data is not touched: the blobs
//! of forgotten snapshots stay until a prune, so a forget is cheap and, until then,
//! reversible by nobody but also harmful to nothing running.

use std::collections::BTreeMap;

use anyhow::{bail, Result};
use cairn_engine::lock::LockKind;
use cairn_engine::retention::{self, Candidate, KeepPolicy};
use cairn_engine::snapshot::Snapshot;
use serde_json::json;

use crate::args::{ForgetArgs, Global};
use crate::exit;
use crate::format;
use crate::open::Settings;

fn group_key(s: &Snapshot, by: &[&str]) -> String {
    by.iter()
        .map(|k| match *k {
            "host" => s.manifest.host.clone(),
            "source" => s.manifest.source_label(),
            _ => String::new(),
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

pub fn run(s: &Settings, g: &Global, a: &ForgetArgs) -> Result<u8> {
    let policy = KeepPolicy {
        last: a.keep_last,
        hourly: a.keep_hourly,
        daily: a.keep_daily,
        weekly: a.keep_weekly,
        monthly: a.keep_monthly,
        yearly: a.keep_yearly,
        within: a.keep_within,
        tags: a.keep_tag.clone(),
    };
    if policy.is_empty() {
        bail!("no keep rule given: that would remove every snapshot (give --keep-last, --keep-daily, ...)");
    }
    let by: Vec<&str> = a
        .group_by
        .split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .collect();
    if let Some(bad) = by.iter().find(|k| !matches!(**k, "host" | "source")) {
        bail!("--group-by {bad:?}: use host, source or both");
    }
    let repo = s.open_locked(LockKind::Shared, "forget")?;
    let filter = super::engine_filter(&a.filter);
    let mut groups: BTreeMap<String, Vec<Snapshot>> = BTreeMap::new();
    for snap in repo.snapshots()? {
        if filter.matches(&snap.manifest) {
            groups.entry(group_key(&snap, &by)).or_default().push(snap);
        }
    }
    let mut out = Vec::new();
    let mut removed = 0usize;
    for (key, snaps) in &groups {
        let cands: Vec<Candidate> = snaps
            .iter()
            .map(|s| Candidate {
                time: s.manifest.time,
                tags: s.manifest.tags.clone(),
            })
            .collect();
        let decisions = retention::apply(&policy, &cands);
        if !g.json && !g.quiet {
            println!("group {key}:");
        }
        for (snap, reasons) in snaps.iter().zip(&decisions) {
            let keep = !reasons.is_empty();
            let why: Vec<String> = reasons.iter().map(ToString::to_string).collect();
            if !g.json && !g.quiet {
                println!(
                    "  {} {}  {:<6} {}",
                    snap.id.short(),
                    snap.manifest.time.format("%Y-%m-%d %H:%M:%S UTC"),
                    if keep { "keep" } else { "remove" },
                    why.join(", ")
                );
            }
            out.push(json!({
                "id": snap.id.to_hex(), "group": key, "time": snap.manifest.time,
                "keep": keep, "reasons": why,
            }));
            if !keep {
                if !a.dry_run {
                    repo.remove_snapshot(&snap.id)?;
                }
                removed += 1;
            }
        }
    }
    if g.json && a.prune {
        let opts = super::maint::prune_options(s, &a.prune_args, a.dry_run);
        let report = cairn_engine::prune::prune(&repo, &opts)?;
        format::print_json(&json!({ "dry_run": a.dry_run, "snapshots": out, "prune": report }));
        return Ok(exit::OK);
    }
    if g.json {
        format::print_json(&json!({ "dry_run": a.dry_run, "snapshots": out }));
    } else if !g.quiet {
        println!(
            "{} {removed} of {} snapshots{}",
            if a.dry_run { "would remove" } else { "removed" },
            out.len(),
            if a.dry_run {
                " (dry run)"
            } else {
                "; their data stays until a prune"
            }
        );
    }
    if a.prune {
        if !g.json && !g.quiet {
            println!("pruning:");
        }
        let opts = super::maint::prune_options(s, &a.prune_args, a.dry_run);
        return super::maint::prune_open(&repo, g, &opts);
    }
    Ok(exit::OK)
}
