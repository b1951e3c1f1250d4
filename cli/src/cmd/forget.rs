//! `repo forget`: removes the manifests of the snapshots a keep policy does not keep
//! (by host and source), or of the snapshots named; the engine plans
//! (`cairn_engine::forget`), this prints. Data stays until a prune, which frees it at
//! once.

use anyhow::Result;
use cairn_engine::forget::{self, ForgetPlan};
use cairn_engine::lock::LockKind;
use cairn_engine::retention::KeepPolicy;
use serde_json::json;

use crate::args::{ForgetArgs, Global};
use crate::exit;
use crate::format;
use crate::open::Settings;

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
    let group_by = forget::parse_group_by(&a.group_by)?;
    if !a.snapshots.is_empty() && !policy.is_empty() {
        anyhow::bail!("give either snapshots to forget or keep rules, not both");
    }
    let repo = s.open_locked(LockKind::Shared, "forget")?;
    let all = repo.snapshots()?;
    let plan = if a.snapshots.is_empty() {
        forget::plan_policy(&all, &policy, &group_by, &super::engine_filter(&a.filter))?
    } else {
        forget::plan_named(&all, &a.snapshots)?
    };
    if !g.json && !g.quiet {
        print_plan(&plan);
    }
    let removed = if a.dry_run {
        plan.removed().count()
    } else {
        forget::apply(&repo, &plan)?
    };
    let prune = if a.prune {
        if !g.json && !g.quiet {
            println!("pruning:");
        }
        let opts = super::maint::prune_options(s, &a.prune_args, a.dry_run);
        Some(cairn_engine::prune::prune(&repo, &opts)?)
    } else {
        None
    };
    if g.json {
        let mut out = json!({ "dry_run": a.dry_run, "snapshots": plan.decisions });
        if let Some(r) = &prune {
            out["prune"] = json!(r);
        }
        format::print_json(&out);
    } else if !g.quiet {
        println!(
            "{} {removed} of {} snapshots{}",
            if a.dry_run { "would remove" } else { "removed" },
            plan.decisions.len(),
            if a.dry_run {
                " (dry run)"
            } else if a.prune {
                ""
            } else {
                "; their data stays until a prune"
            }
        );
        if let Some(r) = &prune {
            super::maint::print_prune(r);
        }
    }
    if let Some(r) = &prune {
        for w in &r.warnings {
            tracing::warn!("{w}");
        }
    }
    Ok(exit::OK)
}

fn print_plan(plan: &ForgetPlan) {
    let mut group: Option<&str> = None;
    for d in &plan.decisions {
        if group != Some(d.group.as_str()) {
            println!("group {}:", d.group);
            group = Some(&d.group);
        }
        println!(
            "  {} {}  {:<6} {}",
            d.id.short(),
            d.time.format("%Y-%m-%d %H:%M:%S UTC"),
            if d.keep { "keep" } else { "remove" },
            d.reasons.join(", ")
        );
    }
}
