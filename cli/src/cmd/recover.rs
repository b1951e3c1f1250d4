//! `repo recover`: instant recovery sessions (see `cairn_recover`).

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cairn_recover::mounting::SessionMount;
use cairn_recover::{self as recover, Request, Runtime, SessionRecord, Store};
use serde_json::json;

use crate::args::{Global, LayerArg, RecoverCommand, RuntimeArg};
use crate::exit;
use crate::format;
use crate::open::Settings;

pub(super) fn store() -> Result<Store> {
    let dir = recover::state_dir();
    Store::open(&dir).with_context(|| format!("opening the session state in {}", dir.display()))
}

fn session_json(r: &SessionRecord) -> serde_json::Value {
    json!({
        "id": r.id,
        "state": r.state,
        "engine": r.engine,
        "snapshot": r.snapshot,
        "repository": r.repository,
        "runtime": r.runtime,
        "writable": r.writable,
        "container": r.container,
        "server_pid": r.server_pid,
        "mount_pid": r.mount_pid,
        "port": r.port,
        "user": r.user,
        "password": r.password,
        "database": r.database,
        "connection": r.connection_string(),
        "data_dir": if r.is_vm() { None } else { Some(r.merged()) },
        "domain": r.domain,
        "disks": r.disks,
        "dir": r.dir,
        "created": r.created,
        "layer": r.layer,
        "layer_bytes": r.layer_bytes(),
    })
}

/// Starts a session's mount of the repository at `repo_path` in the background.
pub(super) fn spawn_session_mount(
    s: &Settings,
    repo_path: &Path,
    m: &SessionMount<'_>,
) -> Result<u32, String> {
    let args = recover::mounting::session_mount_args(repo_path, m);
    super::mount::spawn_mount_daemon(s, m.mountpoint, &args)
        .map(|(pid, _)| pid)
        .map_err(|e| format!("mounting the repository: {e:#}"))
}

pub fn run(s: &Settings, g: &Global, cmd: RecoverCommand) -> Result<u8> {
    match cmd {
        RecoverCommand::Db {
            snapshot,
            port,
            image,
            writable,
            runtime,
            timeout,
            layer,
            chunk_size,
            filter,
        } => {
            if chunk_size.is_some() && matches!(layer, LayerArg::Overlay) {
                bail!("--chunk-size is the block layer's; overlayfs copies whole files");
            }
            let repo = s.open()?;
            let snap = super::find_snapshot(&repo, &snapshot, &filter)?;
            drop(repo);
            let store = store()?;
            let repo_path = std::fs::canonicalize(&s.repo).unwrap_or_else(|_| s.repo.clone());
            let spawn = |m: &SessionMount<'_>| spawn_session_mount(s, &repo_path, m);
            let started = Instant::now();
            let req = Request {
                snapshot: &snap,
                repository: repo_path.clone(),
                port,
                image,
                writable,
                runtime: match runtime {
                    RuntimeArg::Docker => Runtime::Docker,
                    RuntimeArg::Process => Runtime::Process,
                },
                timeout: Duration::from_secs(timeout),
                layer: match layer {
                    LayerArg::Block => recover::Layer::Block,
                    LayerArg::Overlay => recover::Layer::Overlay,
                },
                layer_chunk: chunk_size,
                spawn_mount: &spawn,
                verifier: None,
            };
            let rec = recover::start(&store, &req)?;
            let secs = started.elapsed().as_secs_f64();
            if g.json {
                let mut v = session_json(&rec);
                v["seconds_to_ready"] = json!(secs);
                format::print_json(&v);
            } else {
                println!(
                    "session {} ready in {secs:.1}s: {} of snapshot {} on 127.0.0.1:{} ({}{})",
                    rec.id,
                    rec.engine,
                    &rec.snapshot[..8],
                    rec.port.unwrap_or(0),
                    if rec.writable {
                        "writable"
                    } else {
                        "read-only"
                    },
                    match &rec.container {
                        Some(c) => format!(", container {}", &c[..c.len().min(12)]),
                        None => String::new(),
                    }
                );
                println!(
                    "user {} password {}",
                    rec.user.as_deref().unwrap_or(""),
                    rec.password.as_deref().unwrap_or("")
                );
                println!("{}", rec.connection_string().unwrap_or_default());
                println!(
                    "writes land in its {} layer ({} so far): {}",
                    rec.layer,
                    format::bytes(rec.layer_bytes()),
                    if rec.uses_block_layer() {
                        rec.layer_dir()
                    } else {
                        rec.dir.join("upper")
                    }
                    .display()
                );
                println!("stop it with: repo recover stop {}", rec.id);
            }
            Ok(exit::OK)
        }
        RecoverCommand::Vm {
            snapshot,
            name,
            source,
            hosts,
            network,
            no_start,
            connect,
        } => {
            let filter = crate::args::Filter {
                hosts,
                name: source,
                ..Default::default()
            };
            vm(s, g, &snapshot, name, &network, no_start, connect, &filter)
        }
        RecoverCommand::Promote { id, to, timeout } => {
            let store = store()?;
            let p = recover::vm::promote(&store, &id, &to, timeout)?;
            if g.json {
                format::print_json(&json!(p));
            } else if !g.quiet {
                println!(
                    "{} now runs on its own disks ({}) after {:.1}s; session {id} ended",
                    p.domain,
                    p.disks
                        .iter()
                        .map(|(t, f)| format!("{t}: {}", f.display()))
                        .collect::<Vec<_>>()
                        .join(", "),
                    p.seconds
                );
            }
            Ok(exit::OK)
        }
        RecoverCommand::List => {
            let store = store()?;
            let list = store.list()?;
            if g.json {
                format::print_json(&json!(list.iter().map(session_json).collect::<Vec<_>>()));
            } else {
                println!(
                    "{:<10} {:<9} {:<11} {:<9} {:<8} {:>6} {:>8} {:>10}  connection",
                    "id", "state", "engine", "snapshot", "runtime", "port", "layer", "written"
                );
                for r in &list {
                    println!(
                        "{:<10} {:<9} {:<11} {:<9} {:<8} {:>6} {:>8} {:>10}  {}",
                        r.id,
                        format!("{:?}", r.state).to_lowercase(),
                        r.engine,
                        r.snapshot.get(..8).unwrap_or(&r.snapshot),
                        r.runtime,
                        r.port.map(|p| p.to_string()).unwrap_or_default(),
                        r.layer,
                        format::bytes(r.layer_bytes()),
                        match &r.domain {
                            Some(d) => format!("domain {d} (virsh console {d})"),
                            None => r.connection_string().unwrap_or_default(),
                        }
                    );
                }
                println!("{} sessions", list.len());
            }
            Ok(exit::OK)
        }
        RecoverCommand::Stop { id, all } => {
            let store = store()?;
            let ids: Vec<String> = if all {
                store.list()?.into_iter().map(|r| r.id).collect()
            } else {
                vec![id.unwrap_or_default()]
            };
            let mut failed = 0;
            for id in &ids {
                match recover::stop(&store, id) {
                    Ok(_) => {
                        if !g.quiet {
                            println!("stopped session {id}");
                        }
                    }
                    Err(e) => {
                        eprintln!("error: session {id}: {e}");
                        failed += 1;
                    }
                }
            }
            if failed > 0 {
                bail!("{failed} sessions could not be stopped");
            }
            Ok(exit::OK)
        }
        RecoverCommand::Commit { id, tags } => {
            let store = store()?;
            let repo = s.open()?;
            let started = Instant::now();
            let snap = recover::commit::commit(&store, &repo, &id, &tags)?;
            if g.json {
                format::print_json(&format::snapshot_json(&snap));
            } else {
                println!(
                    "session {id} committed as snapshot {} in {:.1}s ({} read, {} stored)",
                    snap.id.short(),
                    started.elapsed().as_secs_f64(),
                    format::bytes(snap.manifest.summary.bytes_read),
                    format::bytes(snap.manifest.summary.bytes_stored),
                );
            }
            Ok(exit::OK)
        }
        RecoverCommand::Cleanup => {
            let store = store()?;
            let r = recover::cleanup(&store)?;
            if g.json {
                format::print_json(&json!({
                    "sessions_removed": r.sessions_removed,
                    "containers_removed": r.containers_removed,
                    "dirs_removed": r.dirs_removed,
                    "labs_removed": r.labs_removed,
                    "still_running": r.still_running,
                }));
            } else {
                println!(
                    "removed {} dead sessions, {} stray containers, {} stray session directories, {} stray verification labs; {} sessions still running",
                    r.sessions_removed.len(),
                    r.containers_removed.len(),
                    r.dirs_removed.len(),
                    r.labs_removed.len(),
                    r.still_running.len()
                );
            }
            Ok(exit::OK)
        }
    }
}

/// `repo recover vm`.
#[allow(clippy::too_many_arguments)]
fn vm(
    s: &Settings,
    g: &Global,
    snapshot: &str,
    name: Option<String>,
    network: &str,
    no_start: bool,
    connect: Option<String>,
    filter: &crate::args::Filter,
) -> Result<u8> {
    let repo = s.open()?;
    let snap = super::find_snapshot(&repo, snapshot, filter)?;
    drop(repo);
    let hv = cairn_agent::libvirt::Hypervisor::connect(connect.as_deref())?;
    let network = hv.network(network)?;
    let store = store()?;
    let repo_path = std::fs::canonicalize(&s.repo).unwrap_or_else(|_| s.repo.clone());
    let spawn = |m: &SessionMount<'_>| spawn_session_mount(s, &repo_path, m);
    let started = Instant::now();
    let req = recover::vm::VmRequest {
        snapshot: &snap,
        repository: repo_path.clone(),
        name,
        network,
        start: !no_start,
        uri: connect,
        spawn_mount: &spawn,
        lab: None,
        verifier: None,
    };
    let rec = recover::vm::start(&store, &req)?;
    let secs = started.elapsed().as_secs_f64();
    let domain = rec.domain.clone().unwrap_or_default();
    if g.json {
        let mut v = session_json(&rec);
        v["seconds_to_start"] = json!(secs);
        format::print_json(&v);
    } else {
        println!(
            "session {} {} in {secs:.1}s: domain {domain}, snapshot {} on overlays in {}",
            rec.id,
            if no_start { "defined" } else { "started" },
            rec.snapshot.get(..8).unwrap_or(&rec.snapshot),
            rec.dir.display()
        );
        println!(
            "console: virsh console {domain} (log: {})",
            rec.dir.join("console.log").display()
        );
        println!(
            "stop it with: repo recover stop {}; keep it with: repo recover promote {} --to DIR",
            rec.id, rec.id
        );
    }
    Ok(exit::OK)
}
