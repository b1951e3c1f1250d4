//! `repo verify`: proof that a backup restores (see `cairn_recover::verify`). The
//! verifications themselves are library calls; this module picks the snapshot, turns
//! the arguments into a request and prints the record.

use std::path::PathBuf;

use anyhow::{Context, Result};
use cairn_recover::mounting::SessionMount;
use cairn_recover::verify::results::{Coverage, Filter as ResultsFilter};
use cairn_recover::verify::{self, Kind, Results, Status, StepResult, Verification};
use cairn_recover::{self as recover, Runtime};
use serde_json::json;

use crate::args::{Filter, Global, RuntimeArg, VerifyCommand};
use crate::exit;
use crate::format;
use crate::open::Settings;

fn results() -> Result<Results> {
    let dir = recover::state_dir();
    Results::open(&dir)
        .with_context(|| format!("opening the verification results in {}", dir.display()))
}

fn repo_path(s: &Settings) -> PathBuf {
    std::fs::canonicalize(&s.repo).unwrap_or_else(|_| s.repo.clone())
}

pub fn run(s: &Settings, g: &Global, cmd: VerifyCommand) -> Result<u8> {
    match cmd {
        VerifyCommand::Vm {
            snapshot,
            test,
            services,
            script,
            host_script,
            timeout,
            service_wait,
            network,
            source,
            connect,
        } => {
            let filter = Filter {
                name: source,
                ..Default::default()
            };
            let snap = {
                let repo = s.open()?;
                super::find_snapshot(&repo, &snapshot, &filter)?
            };
            let guest_script = script
                .map(|f| {
                    std::fs::read_to_string(&f)
                        .with_context(|| format!("reading the script {}", f.display()))
                })
                .transpose()?;
            let store = super::recover::store()?;
            let results = results()?;
            let repo_path = repo_path(s);
            let spawn =
                |m: &SessionMount<'_>| super::recover::spawn_session_mount(s, &repo_path, m);
            let req = verify::vm::VmVerifyRequest {
                snapshot: &snap,
                repository: repo_path.clone(),
                test: verify::vm::VmTest::parse(&test).map_err(anyhow::Error::msg)?,
                services: verify::vm::parse_services(&services).map_err(anyhow::Error::msg)?,
                guest_script,
                host_script,
                timeout,
                service_wait,
                network: match network.as_str() {
                    "lab" => verify::vm::LabNetwork::Lab,
                    other => verify::vm::LabNetwork::Named(other.to_owned()),
                },
                uri: connect,
                spawn_mount: &spawn,
                trigger: "manual".into(),
            };
            let v = verify::vm::run(&store, &results, &req)?;
            Ok(report(g, &v))
        }
        VerifyCommand::Db {
            snapshot,
            queries,
            expect_rows,
            database,
            runtime,
            image,
            timeout,
            filter,
        } => {
            let snap = {
                let repo = s.open()?;
                super::find_snapshot(&repo, &snapshot, &filter)?
            };
            let store = super::recover::store()?;
            let results = results()?;
            let repo_path = repo_path(s);
            let spawn =
                |m: &SessionMount<'_>| super::recover::spawn_session_mount(s, &repo_path, m);
            let req = verify::db::DbVerifyRequest {
                snapshot: &snap,
                repository: repo_path.clone(),
                runtime: match runtime {
                    RuntimeArg::Docker => Runtime::Docker,
                    RuntimeArg::Process => Runtime::Process,
                },
                image,
                timeout,
                queries,
                expect_rows,
                database,
                spawn_mount: &spawn,
                trigger: "manual".into(),
            };
            let v = verify::db::run(&store, &results, &req)?;
            Ok(report(g, &v))
        }
        VerifyCommand::Files {
            snapshot,
            sample,
            scratch,
            filter,
        } => {
            let repo = s.open()?;
            let snap = super::find_snapshot(&repo, &snapshot, &filter)?;
            let results = results()?;
            let req = verify::files::FilesVerifyRequest {
                repo: &repo,
                snapshot: &snap,
                repository: repo_path(s).display().to_string(),
                share: sample,
                scratch: scratch.unwrap_or_else(std::env::temp_dir),
                trigger: "manual".into(),
            };
            let v = verify::files::run(&results, &req)?;
            Ok(report(g, &v))
        }
        VerifyCommand::List {
            kind,
            status,
            snapshot,
            limit,
        } => {
            let f = ResultsFilter {
                kind: kind
                    .map(|k| Kind::parse(&k).with_context(|| format!("{k:?}: vm, db or files")))
                    .transpose()?,
                status: status
                    .map(|x| {
                        Status::parse(&x).with_context(|| {
                            format!("{x:?}: pending, running, passed, failed or warning")
                        })
                    })
                    .transpose()?,
                snapshot,
                limit,
            };
            let list = results()?.list(&f)?;
            if g.json {
                format::print_json(&json!(list));
                return Ok(exit::OK);
            }
            println!(
                "{:>5}  {:<8} {:<5} {:<19} {:<9} {:<20} {:>8}  {:<25}  failed step",
                "id", "status", "kind", "test", "snapshot", "source", "seconds", "created"
            );
            for v in &list {
                println!(
                    "{:>5}  {:<8} {:<5} {:<19} {:<9} {:<20} {:>8}  {:<25}  {}",
                    v.id,
                    v.status.as_str(),
                    v.kind.as_str(),
                    v.test,
                    v.snapshot.get(..8).unwrap_or(&v.snapshot),
                    v.source,
                    v.seconds.map(|x| format!("{x:.1}")).unwrap_or_default(),
                    v.created.get(..19).unwrap_or(&v.created),
                    v.failed_step().unwrap_or("")
                );
            }
            println!("{} verifications", list.len());
            Ok(exit::OK)
        }
        VerifyCommand::Show { id } => {
            let v = results()?
                .get(verify::VerificationId(id))?
                .with_context(|| format!("no verification {id} on this host"))?;
            if g.json {
                format::print_json(&json!(v));
            } else {
                print_verification(&v);
                if !v.log.is_empty() {
                    println!("log:");
                    for line in v.log.lines() {
                        println!("  {line}");
                    }
                }
            }
            Ok(exit::OK)
        }
        VerifyCommand::Stats { stale_days } => stats(s, g, stale_days),
    }
}

/// Prints a finished verification; its exit code.
fn report(g: &Global, v: &Verification) -> u8 {
    if g.json {
        format::print_json(&json!(v));
    } else if !g.quiet || v.status == Status::Failed {
        print_verification(v);
    }
    match v.status {
        Status::Failed => exit::VERIFICATION_FAILED,
        _ => exit::OK,
    }
}

fn print_verification(v: &Verification) {
    println!(
        "verification {} of snapshot {} ({}, {} {}): {}{}",
        v.id,
        v.snapshot.get(..8).unwrap_or(&v.snapshot),
        v.source,
        v.kind.as_str(),
        v.test,
        v.status.as_str(),
        v.seconds
            .map(|x| format!(" in {x:.1}s"))
            .unwrap_or_default()
    );
    for step in &v.steps {
        let mark = match step.result {
            StepResult::Passed => "ok",
            StepResult::Failed => "FAILED",
            StepResult::Warning => "warning",
            StepResult::Skipped => "skipped",
        };
        println!(
            "  {:<22} {:<8} {:>7.1}s  {}",
            step.name,
            mark,
            step.seconds,
            step.detail.lines().next().unwrap_or("")
        );
        for more in step.detail.lines().skip(1) {
            println!("  {:<22} {:<8} {:>8}  {more}", "", "", "");
        }
    }
    if let Some(f) = &v.vm {
        println!(
            "  restored {} booted {}{} ping {} services {}",
            f.vm_restored,
            f.vm_booted,
            f.boot_time_s
                .map(|b| format!(" (in {b:.1}s)"))
                .unwrap_or_default(),
            f.ping_ok.map_or("-".into(), |p| p.to_string()),
            if f.services.is_empty() {
                "-".into()
            } else {
                f.services
                    .iter()
                    .map(|(n, ok)| format!("{n}={}", if *ok { "ok" } else { "FAILED" }))
                    .collect::<Vec<_>>()
                    .join(",")
            }
        );
    }
    if let Some(e) = &v.error {
        println!("  error: {e}");
    }
    if v.status.is_final() && !v.cleanup_done {
        println!("  cleanup did not finish: repo recover cleanup removes what is left");
    }
}

/// `repo verify stats`.
fn stats(s: &Settings, g: &Global, stale_days: u64) -> Result<u8> {
    let results = results()?;
    let st = results.stats()?;
    let last = results.last_by_snapshot()?;
    let cov = Coverage::of(
        &s.open()?.snapshots()?,
        &last,
        stale_days,
        chrono::Utc::now(),
    );
    if g.json {
        let mut out = json!({ "stats": st });
        out.as_object_mut()
            .expect("an object")
            .extend(json!(cov).as_object().expect("an object").clone());
        format::print_json(&out);
        return Ok(exit::OK);
    }
    let (never, stale, failing) = (&cov.never_verified, &cov.stale, &cov.last_failed);
    println!(
        "{} verifications: {} passed, {} failed, {} warning, {} running, {} pending; success rate {}; average {}",
        st.total,
        st.passed,
        st.failed,
        st.warning,
        st.running,
        st.pending,
        st.success_rate
            .map_or("-".into(), |r| format!("{:.1}%", r * 100.0)),
        st.average_seconds
            .map_or("-".into(), |x| format!("{x:.1}s")),
    );
    for (test, t) in &st.by_test {
        println!(
            "  {test:<19} {} total, {} passed, {} failed, average {}",
            t.total,
            t.passed,
            t.failed,
            t.average_seconds.map_or("-".into(), |x| format!("{x:.1}s"))
        );
    }
    if let Some(l) = &st.last {
        println!(
            "last: verification {} of {} {} at {}",
            l.id,
            l.snapshot.get(..8).unwrap_or(&l.snapshot),
            l.status.as_str(),
            l.finished
        );
    }
    println!("{} snapshots never verified", never.len());
    for u in never {
        println!(
            "  {} {} {}",
            &u.snapshot[..8.min(u.snapshot.len())],
            u.source,
            u.time
        );
    }
    println!(
        "{} snapshots not verified for {stale_days} days",
        stale.len()
    );
    for u in stale {
        println!(
            "  {} {} last verified {}",
            &u.snapshot[..8.min(u.snapshot.len())],
            u.source,
            u.last_verified.as_deref().unwrap_or("")
        );
    }
    println!("{} snapshots whose last verification failed", failing.len());
    for u in failing {
        println!(
            "  {} {} failed {}",
            &u.snapshot[..8.min(u.snapshot.len())],
            u.source,
            u.last_verified.as_deref().unwrap_or("")
        );
    }
    Ok(exit::OK)
}
