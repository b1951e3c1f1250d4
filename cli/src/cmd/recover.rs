//! `repo recover`: instant recovery sessions (see `cairn_mount::recover`).

use std::ffi::OsString;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cairn_mount::recover::{self, Request, Runtime, SessionRecord, Store};
use serde_json::json;

use crate::args::{Global, RecoverCommand, RuntimeArg};
use crate::exit;
use crate::format;
use crate::open::Settings;

fn store() -> Result<Store> {
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
        "data_dir": r.merged(),
        "created": r.created,
    })
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
            filter,
        } => {
            let repo = s.open()?;
            let snap = super::find_snapshot(&repo, &snapshot, &filter)?;
            drop(repo);
            let store = store()?;
            let repo_path = std::fs::canonicalize(&s.repo).unwrap_or_else(|_| s.repo.clone());
            let spawn = |mnt: &Path| -> Result<u32, String> {
                let mut args: Vec<OsString> = vec!["--repo".into(), repo_path.clone().into()];
                args.extend(["mount".into(), mnt.as_os_str().to_owned()]);
                if nix::unistd::geteuid().is_root() {
                    args.push("--allow-other".into());
                }
                super::mount::spawn_mount_daemon(s, mnt, &args)
                    .map(|(pid, _)| pid)
                    .map_err(|e| format!("mounting the repository: {e:#}"))
            };
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
                spawn_mount: &spawn,
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
                println!("stop it with: repo recover stop {}", rec.id);
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
                    "{:<10} {:<9} {:<11} {:<9} {:<8} {:>6}  connection",
                    "id", "state", "engine", "snapshot", "runtime", "port"
                );
                for r in &list {
                    println!(
                        "{:<10} {:<9} {:<11} {:<9} {:<8} {:>6}  {}",
                        r.id,
                        format!("{:?}", r.state).to_lowercase(),
                        r.engine,
                        &r.snapshot[..8],
                        r.runtime,
                        r.port.map(|p| p.to_string()).unwrap_or_default(),
                        r.connection_string().unwrap_or_default()
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
        RecoverCommand::Cleanup => {
            let store = store()?;
            let r = recover::cleanup(&store)?;
            if g.json {
                format::print_json(&json!({
                    "sessions_removed": r.sessions_removed,
                    "containers_removed": r.containers_removed,
                    "dirs_removed": r.dirs_removed,
                    "still_running": r.still_running,
                }));
            } else {
                println!(
                    "removed {} dead sessions, {} stray containers, {} stray session directories; {} sessions still running",
                    r.sessions_removed.len(),
                    r.containers_removed.len(),
                    r.dirs_removed.len(),
                    r.still_running.len()
                );
            }
            Ok(exit::OK)
        }
    }
}
