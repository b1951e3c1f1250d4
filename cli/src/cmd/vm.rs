//! `repo backup --vm` and `repo vm ...`: virtual machines through libvirt (see
//! `cairn_agent::libvirt`). Each command is one library call and its output.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use cairn_agent::libvirt::backup::{self, VmBackupReport};
use cairn_agent::libvirt::restore::{restore_vm, RestoreVmOptions};
use cairn_agent::libvirt::Hypervisor;
use cairn_agent::source::SourceBackup;
use cairn_engine::progress::Progress;
use serde_json::json;

use crate::args::{Global, VmCommand};
use crate::exit;
use crate::format::{self, bytes};
use crate::open::Settings;
use crate::progress::Display;

/// Prints what `repo backup --vm NAME... | --vm all` made: one snapshot per domain. A
/// domain that failed did not stop the others; the exit code says one did.
pub fn report_backup(g: &Global, made: &SourceBackup) -> Result<u8> {
    if g.json {
        let snapshots: Vec<_> = made
            .outcomes
            .iter()
            .map(|o| format::snapshot_json(&o.snapshot))
            .collect();
        format::print_json(&json!({
            "snapshot": snapshots.first(),
            "snapshots": snapshots,
            "vms": made.vms,
            "failed": made.failures.iter().map(|f| json!({ "vm": f.what, "error": f.error })).collect::<Vec<_>>(),
        }));
    } else {
        for f in &made.failures {
            eprintln!("error: {}: {}", f.what, f.error);
        }
        if !g.quiet {
            for (o, r) in made.outcomes.iter().zip(&made.vms) {
                print_report(&o.snapshot, r);
            }
        }
    }
    if !made.failures.is_empty() {
        bail!(
            "{} of {} domains were not backed up (see above); no snapshot was made of them",
            made.failures.len(),
            made.failures.len() + made.outcomes.len()
        );
    }
    Ok(exit::OK)
}

fn print_report(snap: &cairn_engine::snapshot::Snapshot, r: &VmBackupReport) {
    let sum = &snap.manifest.summary;
    println!(
        "snapshot {} of {} saved ({}, {}): {} read, {} new ({} stored) in {:.1}s",
        snap.id.short(),
        r.vm,
        if r.running { "running" } else { "stopped" },
        r.consistency,
        bytes(sum.bytes_read),
        bytes(sum.bytes_new),
        bytes(sum.bytes_stored),
        sum.duration_ms as f64 / 1000.0
    );
    for d in &r.disks {
        println!(
            "  {}: {} of {} read{}{}",
            d.target,
            bytes(d.bytes_read),
            bytes(d.size),
            if d.incremental {
                " (changed blocks only)"
            } else {
                ""
            },
            d.note
                .as_ref()
                .map(|n| format!(" — read whole: {n}"))
                .unwrap_or_default()
        );
    }
    if !r.skipped.is_empty() {
        println!(
            "  not backed up (removable drives): {}",
            r.skipped.join(", ")
        );
    }
}

pub fn run(s: &Settings, g: &Global, cmd: VmCommand) -> Result<u8> {
    match cmd {
        VmCommand::List { connect } => list(s, g, connect.as_deref()),
        VmCommand::Start { name, connect } => {
            Hypervisor::connect(connect.as_deref())?
                .vm(&name)?
                .start()?;
            done(g, &format!("started {name}"))
        }
        VmCommand::Stop {
            name,
            force,
            wait,
            connect,
        } => {
            Hypervisor::connect(connect.as_deref())?
                .vm(&name)?
                .stop(force, wait)?;
            done(g, &format!("stopped {name}"))
        }
        VmCommand::Reboot { name, connect } => {
            Hypervisor::connect(connect.as_deref())?
                .vm(&name)?
                .reboot()?;
            done(g, &format!("rebooting {name}"))
        }
        VmCommand::Snapshots { name, connect } => {
            let snaps = Hypervisor::connect(connect.as_deref())?
                .vm(&name)?
                .snapshots()?;
            if g.json {
                format::print_json(&json!(snaps));
            } else {
                for sn in &snaps {
                    println!("{sn}");
                }
                if snaps.is_empty() && !g.quiet {
                    println!("{name} has no libvirt snapshots");
                }
            }
            Ok(exit::OK)
        }
        VmCommand::SnapshotDelete {
            name,
            snapshot,
            connect,
        } => {
            Hypervisor::connect(connect.as_deref())?
                .vm(&name)?
                .delete_snapshot(&snapshot)?;
            done(g, &format!("deleted snapshot {snapshot} of {name}"))
        }
        VmCommand::Clone {
            snapshot,
            name,
            to,
            network,
            connect,
        } => clone(
            s,
            g,
            &snapshot,
            &Default::default(),
            Some(name),
            to,
            &network,
            connect.as_deref(),
        ),
        VmCommand::Cleanup { connect } => {
            let hv = Hypervisor::connect(connect.as_deref())?;
            let mut ended = Vec::new();
            for vm in hv.vms()? {
                match backup::end_stale_job(&vm) {
                    Ok(true) => ended.push(vm.name().to_owned()),
                    Ok(false) => {}
                    Err(e) => eprintln!("warning: {e}"),
                }
            }
            if g.json {
                format::print_json(&json!({ "jobs_ended": ended }));
            } else if !g.quiet {
                println!(
                    "ended {} stale backup jobs{}",
                    ended.len(),
                    if ended.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", ended.join(", "))
                    }
                );
            }
            Ok(exit::OK)
        }
    }
}

fn done(g: &Global, what: &str) -> Result<u8> {
    if g.json {
        format::print_json(&json!({ "done": what }));
    } else if !g.quiet {
        println!("{what}");
    }
    Ok(exit::OK)
}

/// `repo vm list`: libvirt's domains with what the repository knows of them.
fn list(s: &Settings, g: &Global, connect: Option<&str>) -> Result<u8> {
    let hv = Hypervisor::connect(connect)?;
    let repo = match s.open() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!("without the repository ({e:#}): no snapshot information");
            None
        }
    };
    let mut rows = Vec::new();
    for vm in hv.vms()? {
        let summary = vm.summary()?;
        let last = match &repo {
            Some(r) => cairn_engine::backup::disk_set_parent(r, None, vm.name())?
                .filter(backup::is_vm_snapshot),
            None => None,
        };
        let ready = backup::tracking_ready(&vm, last.as_ref()).unwrap_or(false);
        let age = last
            .as_ref()
            .map(|l| (chrono::Utc::now() - l.manifest.time).num_seconds().max(0));
        rows.push(json!({
            "name": summary.name,
            "uuid": summary.uuid,
            "state": summary.state,
            "persistent": summary.persistent,
            "disks": summary.disks,
            "last_snapshot": last.as_ref().map(|l| l.id.to_hex()),
            "last_snapshot_time": last.as_ref().map(|l| l.manifest.time.to_rfc3339()),
            "last_snapshot_age_seconds": age,
            "changed_block_tracking_ready": ready,
        }));
    }
    if g.json {
        format::print_json(&json!(rows));
        return Ok(exit::OK);
    }
    println!(
        "{:<24} {:<10} {:<24} {:<10} {:>10}  cbt",
        "name", "state", "disks", "last", "age"
    );
    for r in &rows {
        let disks: Vec<String> = r["disks"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|d| {
                format!(
                    "{}:{}",
                    d["target"].as_str().unwrap_or(""),
                    d["format"].as_str().unwrap_or("-")
                )
            })
            .collect();
        println!(
            "{:<24} {:<10} {:<24} {:<10} {:>10}  {}",
            r["name"].as_str().unwrap_or(""),
            r["state"].as_str().unwrap_or(""),
            disks.join(","),
            r["last_snapshot"]
                .as_str()
                .map_or("-", |s| s.get(..8).unwrap_or(s)),
            r["last_snapshot_age_seconds"]
                .as_i64()
                .map_or("-".into(), age),
            if r["changed_block_tracking_ready"] == true {
                "ready"
            } else {
                "-"
            }
        );
    }
    Ok(exit::OK)
}

fn age(secs: i64) -> String {
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

/// `repo vm clone` and `repo restore --vm`: a full restore defined as a new domain.
#[allow(clippy::too_many_arguments)]
pub fn clone(
    s: &Settings,
    g: &Global,
    snapshot: &str,
    filter: &crate::args::Filter,
    name: Option<String>,
    to: Option<PathBuf>,
    network: &str,
    connect: Option<&str>,
) -> Result<u8> {
    let repo = s.open_for_reading("restore")?;
    let snap = super::find_snapshot(&repo, snapshot, filter)?;
    let hv = Hypervisor::connect(connect)?;
    let network = hv.network(network)?;
    let opts = RestoreVmOptions {
        name,
        dir: to.unwrap_or_else(|| PathBuf::from("/var/lib/libvirt/images")),
        format: "qcow2".into(),
        network,
    };
    let progress = Arc::new(Progress::default());
    let display = Display::start(progress.clone(), "restore", !g.quiet && !g.json);
    let started = std::time::Instant::now();
    let r = restore_vm(&repo, &hv, &snap, &opts, &progress);
    display.finish();
    let r = r?;
    if g.json {
        format::print_json(&json!({ "restored": r, "seconds": started.elapsed().as_secs_f64() }));
    } else if !g.quiet {
        println!(
            "defined {} from snapshot {} in {:.1}s: {}; start it with: repo vm start {}",
            r.domain,
            snap.id.short(),
            started.elapsed().as_secs_f64(),
            r.disks
                .iter()
                .map(|(t, p)| format!("{t} on {}", p.display()))
                .collect::<Vec<_>>()
                .join(", "),
            r.domain
        );
    }
    let _ = Duration::ZERO;
    Ok(exit::OK)
}
