//! `repo job` and `repo schedule`: the site's jobs and schedules
//! (`cairn_server::site`), and running a job here (`cairn_server::runner`).

use std::io::Read;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use cairn_engine::progress::Level;
use cairn_recover::verify::Status;
use cairn_server::config::{RepositoryConfig, ScheduleConfig, ServeConfig};
use cairn_server::execute;
use cairn_server::job::JobDefinition;
use cairn_server::runner::{Observer, RunEvent, RunEventKind, Runner, RunnerOptions};
use cairn_server::schedule::SystemClock;
use cairn_server::site::Site;
use cairn_server::state::{
    Run, RunId, RunQuery, RunStatus, RunTrigger, ScheduleAction, ScheduleId,
};
use cairn_server::verification::{Background, Outcome, Verifier};
use chrono::Utc;
use serde_json::json;

use crate::args::{Global, JobCommand, ScheduleCommand, SiteArgs};
use crate::exit;
use crate::format::{self, bytes};
use crate::open::Settings;

/// Opens the site; `password`: read the default repository's password now (to run).
pub fn open_site(s: &Settings, site: &SiteArgs, password: bool) -> Result<Site> {
    let config = ServeConfig::load(site.config.as_deref())?;
    let origin = site.config.as_ref().map_or_else(
        || cairn_server::config::DEFAULT_PATH.to_owned(),
        |p| p.display().to_string(),
    );
    let default = RepositoryConfig {
        path: s.repo.clone(),
        inline: if password {
            Some(s.password(false)?)
        } else {
            None
        },
        ..RepositoryConfig::default()
    };
    Ok(Site::open(config, &origin, Some(default))?)
}

pub fn job(s: &Settings, g: &Global, site: &SiteArgs, c: &JobCommand) -> Result<u8> {
    let needs_password = matches!(c, JobCommand::Run { .. });
    let site = open_site(s, site, needs_password)?;
    match c {
        JobCommand::Add { file, replace } => {
            let text = if file.as_os_str() == "-" {
                let mut t = String::new();
                std::io::stdin().read_to_string(&mut t)?;
                t
            } else {
                std::fs::read_to_string(file)
                    .with_context(|| format!("reading {}", file.display()))?
            };
            let job = JobDefinition::from_toml(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            site.add_job(&job, *replace)?;
            if !g.quiet {
                println!("job {} saved", job.name);
            }
            Ok(exit::OK)
        }
        JobCommand::List => list_jobs(&site, g),
        JobCommand::Show { name } => show_job(&site, g, name),
        JobCommand::Remove { name } => {
            site.remove_job(name)?;
            if !g.quiet {
                println!("job {name} removed (its snapshots stay)");
            }
            Ok(exit::OK)
        }
        JobCommand::Run { name, dry_run } => {
            let job = site.job(name)?;
            if *dry_run {
                dry_run_job(&site, g, &job)
            } else {
                run_job(&site, g, &job)
            }
        }
        JobCommand::Runs { job, limit } => {
            let runs = site.state.runs(&RunQuery {
                job: job.clone(),
                limit: *limit,
                ..RunQuery::default()
            })?;
            print_runs(g, &runs);
            Ok(exit::OK)
        }
        JobCommand::Log { run } => {
            let id = RunId(*run);
            if site.state.run(id)?.is_none() {
                bail!("no run {run}");
            }
            let lines = site.state.log(id, 0)?;
            if g.json {
                format::print_json(&json!(lines));
            } else {
                for l in lines {
                    println!(
                        "{} {:<5} {}",
                        l.at.format("%Y-%m-%d %H:%M:%S"),
                        l.level,
                        l.message
                    );
                }
            }
            Ok(exit::OK)
        }
    }
}

fn list_jobs(site: &Site, g: &Global) -> Result<u8> {
    let jobs = site.state.jobs()?;
    let mut last_runs = site.state.last_runs()?;
    let rows: Vec<_> = jobs
        .iter()
        .map(|j| (j, last_runs.remove(&j.definition.name)))
        .collect();
    if g.json {
        format::print_json(&json!(rows
            .iter()
            .map(|(j, last)| json!({
                "name": j.definition.name,
                "origin": j.origin,
                "repository": j.definition.repository,
                "sources": j.definition.sources.iter().map(cairn_agent::source::Source::describe).collect::<Vec<_>>(),
                "last_run": last,
            }))
            .collect::<Vec<_>>()));
        return Ok(exit::OK);
    }
    if rows.is_empty() {
        println!(
            "no jobs (add one: repo job add --file job.toml, or repo backup ... --save-as NAME)"
        );
    }
    for (j, last) in rows {
        let last = last.map_or_else(
            || "never run".to_owned(),
            |r| {
                format!(
                    "last run {} {}",
                    r.queued_at.format("%Y-%m-%d %H:%M"),
                    r.status.as_str()
                )
            },
        );
        let sources: Vec<_> = j.definition.sources.iter().map(|s| s.describe()).collect();
        println!(
            "{:<20} {:<8} {}  ({last})",
            j.definition.name,
            format!("{:?}", j.origin).to_lowercase(),
            sources.join("; ")
        );
    }
    Ok(exit::OK)
}

fn show_job(site: &Site, g: &Global, name: &str) -> Result<u8> {
    let job = site.job(name)?;
    let runs = site.state.runs(&RunQuery {
        job: Some(name.to_owned()),
        limit: 5,
        ..RunQuery::default()
    })?;
    if g.json {
        format::print_json(&json!({ "job": job, "runs": runs }));
        return Ok(exit::OK);
    }
    print!("{}", job.to_toml());
    if !runs.is_empty() {
        println!("\n# last runs");
        print_runs(g, &runs);
    }
    Ok(exit::OK)
}

fn print_runs(g: &Global, runs: &[Run]) {
    if g.json {
        format::print_json(&json!(runs));
        return;
    }
    for r in runs {
        let took = match (r.started_at, r.ended_at) {
            (Some(a), Some(b)) => format!("{:.1}s", (b - a).num_milliseconds() as f64 / 1000.0),
            _ => "-".into(),
        };
        println!(
            "{:>6} {:<16} {} {:<9} {:>8} {:>10} new  {}",
            r.id,
            r.job,
            r.queued_at.format("%Y-%m-%d %H:%M:%S"),
            r.status.as_str(),
            took,
            bytes(r.stats.bytes_stored),
            r.error.as_deref().unwrap_or("")
        );
    }
}

/// Prints a run's messages as they come.
struct Printer {
    quiet: bool,
}

impl Observer for Printer {
    fn on(&self, e: &RunEvent) {
        if let RunEventKind::Message { level, text } = &e.kind {
            match level {
                Level::Info if !self.quiet => eprintln!("{text}"),
                Level::Info => {}
                Level::Warn => eprintln!("warning: {text}"),
                Level::Error => eprintln!("error: {text}"),
            }
        }
    }
}

fn run_job(site: &Site, g: &Global, job: &JobDefinition) -> Result<u8> {
    let verifier = Verifier {
        repos: site.repos.clone(),
        state_dir: site.state_dir.clone(),
        libvirt_uri: site.config.libvirt_uri.clone(),
        metrics: None,
        notifier: None,
    };
    let after_backup = Background::new(verifier, site.state.clone());
    let runner = Runner::start(
        site.state.clone(),
        site.repos.clone(),
        Arc::new(SystemClock),
        RunnerOptions {
            concurrent_runs: 1,
            ..RunnerOptions::default()
        },
        vec![
            Arc::new(Printer {
                quiet: g.quiet || g.json,
            }),
            after_backup.clone(),
        ],
    );
    let id = runner.submit(job, RunTrigger::Cli)?;
    runner.wait_idle();
    runner.shutdown();
    let verified = after_backup.wait();
    let run = site.state.run(id)?.context("the run's record vanished")?;
    let verified_ok = verified
        .iter()
        .all(|o| o.result.as_ref().is_ok_and(|v| v.status != Status::Failed));
    if g.json {
        let verifications: Vec<_> = verified
            .iter()
            .map(|o| match &o.result {
                Ok(v) => json!(v),
                Err(e) => json!({ "snapshot": o.snapshot, "error": e }),
            })
            .collect();
        let mut out = json!(run);
        out["verifications"] = json!(verifications);
        format::print_json(&out);
    } else if !g.quiet || run.status != RunStatus::Succeeded {
        let s = &run.stats;
        println!(
            "run {} of {}: {}{}; {} files, {} read, {} new ({} stored), {} snapshots, {} forgotten",
            run.id,
            run.job,
            run.status.as_str(),
            run.error
                .as_deref()
                .map(|e| format!(" ({e})"))
                .unwrap_or_default(),
            s.files,
            bytes(s.bytes_read),
            bytes(s.bytes_new),
            bytes(s.bytes_stored),
            s.snapshots.len(),
            s.forgotten
        );
    }
    if !g.json {
        print_verified(&verified);
    }
    Ok(if run.status != RunStatus::Succeeded {
        exit::ERROR
    } else if !verified_ok {
        exit::VERIFICATION_FAILED
    } else {
        exit::OK
    })
}

/// One line per verification made after the run's backups.
fn print_verified(verified: &[Outcome]) {
    for o in verified {
        match &o.result {
            Ok(v) => println!(
                "verification {} of snapshot {}: {} ({:.1} s)",
                v.id,
                o.snapshot,
                v.status.as_str(),
                v.seconds.unwrap_or_default()
            ),
            Err(e) => println!("verification of snapshot {}: not done: {e}", o.snapshot),
        }
    }
}

fn dry_run_job(site: &Site, g: &Global, job: &JobDefinition) -> Result<u8> {
    let repo = site.repos.handle(&job.repository)?;
    let plan = execute::dry_run(job, &repo).map_err(anyhow::Error::msg)?;
    if g.json {
        format::print_json(&json!(plan));
    } else {
        println!(
            "job {} would back up into repository {}:",
            job.name, job.repository
        );
        for s in &plan.sources {
            match &s.problem {
                Some(p) => println!("  {}  (would fail: {p})", s.source),
                None => println!("  {}", s.source),
            }
        }
        if job.retention.is_some() {
            println!(
                "then forget {} snapshots now outside the keep rules{}",
                plan.would_forget.len(),
                if plan.would_prune { ", and prune" } else { "" }
            );
        }
        if let Some(v) = &plan.verify {
            println!("then verify ({v})");
        }
    }
    Ok(if plan.sources.iter().any(|s| s.problem.is_some()) {
        exit::ERROR
    } else {
        exit::OK
    })
}

pub fn schedule(s: &Settings, g: &Global, site: &SiteArgs, c: &ScheduleCommand) -> Result<u8> {
    let site = open_site(s, site, false)?;
    let now = Utc::now();
    match c {
        ScheduleCommand::Add {
            job,
            when,
            timezone,
            jitter,
            missed,
            verify,
        } => {
            let row = site.add_schedule(&ScheduleConfig {
                job: job.clone(),
                when: when.clone(),
                timezone: timezone.clone(),
                jitter: jitter.clone(),
                missed: missed.clone(),
                action: if *verify {
                    ScheduleAction::Verify
                } else {
                    ScheduleAction::Run
                },
            })?;
            let next = site
                .schedules(now, 3)?
                .into_iter()
                .find(|v| v.row.id == row.id)
                .map(|v| v.next)
                .unwrap_or_default();
            if g.json {
                format::print_json(&json!({ "schedule": row, "next": next }));
            } else if !g.quiet {
                let what = match row.action {
                    ScheduleAction::Run => "job",
                    ScheduleAction::Verify => "verify the newest snapshots of job",
                };
                println!("schedule {} added: {what} {job}, {when}", row.id);
                for t in next {
                    println!("  next: {}", t.format("%Y-%m-%d %H:%M:%S UTC"));
                }
            }
            Ok(exit::OK)
        }
        ScheduleCommand::List => {
            let all = site.schedules(now, 1)?;
            if g.json {
                format::print_json(&json!(all));
                return Ok(exit::OK);
            }
            if all.is_empty() {
                println!("no schedules (add one: repo schedule add JOB 'daily 02:00')");
            }
            for v in all {
                let r = &v.row;
                println!(
                    "{:>4} {:<16} {:<6} {:<22} {:<14} {:<8} {:<6} next {}",
                    r.id,
                    r.job,
                    r.action.as_str(),
                    r.when,
                    r.timezone.as_deref().unwrap_or("UTC"),
                    if r.enabled { "enabled" } else { "disabled" },
                    format!("{:?}", r.origin).to_lowercase(),
                    v.next.first().map_or_else(
                        || "-".into(),
                        |t| t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
                    )
                );
            }
            Ok(exit::OK)
        }
        ScheduleCommand::Remove { id } => {
            site.remove_schedule(ScheduleId(*id))?;
            Ok(exit::OK)
        }
        ScheduleCommand::Enable { id } => {
            site.enable_schedule(ScheduleId(*id), true)?;
            Ok(exit::OK)
        }
        ScheduleCommand::Disable { id } => {
            site.enable_schedule(ScheduleId(*id), false)?;
            Ok(exit::OK)
        }
        ScheduleCommand::Due => {
            let busy = |job: &str| {
                site.state
                    .last_run(job)
                    .ok()
                    .flatten()
                    .is_some_and(|r| !r.status.is_finished())
            };
            let due = site.due(now, &busy)?;
            if g.json {
                format::print_json(&json!(due
                    .iter()
                    .map(|(r, d)| json!({
                        "schedule": r.id, "job": r.job, "run": d.run,
                        "missed": d.missed.iter().map(|(t, why)| json!({"slot": t, "reason": why})).collect::<Vec<_>>(),
                    }))
                    .collect::<Vec<_>>()));
                return Ok(exit::OK);
            }
            let mut any = false;
            for (r, d) in due {
                if let Some(t) = d.run {
                    any = true;
                    println!(
                        "schedule {} would run job {} now ({})",
                        r.id,
                        r.job,
                        t.as_str()
                    );
                }
                for (slot, why) in &d.missed {
                    any = true;
                    println!(
                        "schedule {} missed job {} at {}: {why}",
                        r.id,
                        r.job,
                        slot.format("%Y-%m-%d %H:%M:%S UTC")
                    );
                }
            }
            if !any {
                println!("nothing is due");
            }
            Ok(exit::OK)
        }
        ScheduleCommand::Next { id, count } => {
            let all = site.schedules(now, *count)?;
            let mut times: Vec<(chrono::DateTime<Utc>, ScheduleId, String)> = all
                .iter()
                .filter(|v| id.is_none_or(|i| v.row.id == ScheduleId(i)))
                .flat_map(|v| v.next.iter().map(|t| (*t, v.row.id, v.row.job.clone())))
                .collect();
            if let Some(i) = id {
                if !all.iter().any(|v| v.row.id == ScheduleId(*i)) {
                    bail!("no schedule {i}");
                }
            }
            times.sort();
            times.truncate(*count);
            if g.json {
                format::print_json(&json!(times
                    .iter()
                    .map(|(t, s, j)| json!({"at": t, "schedule": s, "job": j}))
                    .collect::<Vec<_>>()));
            } else {
                for (t, s, j) in times {
                    println!(
                        "{}  schedule {s}  job {j}",
                        t.format("%Y-%m-%d %H:%M:%S UTC")
                    );
                }
            }
            Ok(exit::OK)
        }
    }
}
