//! `repo mcp` driven by a real MCP client: the official Python SDK
//! (tests/e2e/mcp_client.py) over the child-process stdio transport. The tool list is
//! compared with a reviewed golden copy; a session lists snapshots, runs a job and
//! follows it, recovers a PostgreSQL snapshot and queries it with the details the tool
//! returned, stops it; read-only mode refuses every change tool; destructive tools
//! dry-run by default; malformed input gets errors, never a crash or a stuck process.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::database::{pg_ready, StopAll, PG_IMAGE};
use crate::dbserver::{postgres_cluster, require_docker};
use crate::support::*;

const PYTHON: &str = "/var/cache/cairn/venv/bin/python";
const GOLDEN: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/mcp-tools.json");

fn client_ready(what: &str) -> bool {
    let ok = Command::new(PYTHON)
        .args(["-c", "import mcp.client.stdio"])
        .output()
        .is_ok_and(|o| o.status.success());
    require(
        ok,
        what,
        "the mcp Python SDK in /var/cache/cairn/venv (scripts/install-deps.sh --test)",
    )
}

/// Runs `script` in one MCP session against `repo mcp --config CONFIG [extra]`.
fn session(env: &Env, config: &Path, extra: &[&str], script: &Value) -> Value {
    let file = env.path("mcp-script.json");
    std::fs::write(&file, script.to_string()).unwrap();
    let client = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/mcp_client.py");
    let mut c = Command::new(PYTHON);
    env.environment(&mut c);
    c.arg(client)
        .arg(&file)
        .args(["--", repo_bin(), "mcp", "--config"])
        .arg(config)
        .args(extra);
    let out = c.output().unwrap();
    assert!(
        out.status.success(),
        "the MCP session failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn step<'a>(t: &'a Value, i: usize, tool: &str) -> &'a Value {
    let s = &t["transcript"][i];
    assert_eq!(s["step"], tool, "step {i}: {s:#}");
    s
}

fn ok<'a>(t: &'a Value, i: usize, tool: &str) -> &'a Value {
    let s = step(t, i, tool);
    assert_eq!(s["is_error"], false, "{tool}: {s:#}");
    &s["result"]
}

fn config_with_job(env: &Env, data: &Path) -> PathBuf {
    let p = env.path("serve.toml");
    std::fs::write(
        &p,
        format!(
            "[[job]]\nname = \"files\"\n[[job.source]]\ntype = \"paths\"\npaths = [{:?}]\n",
            data.display().to_string()
        ),
    )
    .unwrap();
    p
}

#[test]
fn an_assistant_lists_runs_recovers_and_stops_through_mcp() {
    if !client_ready("the MCP server") || !pg_ready("MCP recovery") || !require_docker(PG_IMAGE) {
        return;
    }
    let env = Env::new();
    let _stop = StopAll(&env);
    let data = env.path("data");
    std::fs::create_dir_all(&data).unwrap();
    write_random(&data.join("a"), 1, 10_000);
    let pg = postgres_cluster(&env, "mcp");
    pg.sql("CREATE TABLE orders (id int PRIMARY KEY, total int); INSERT INTO orders SELECT g, g * 2 FROM generate_series(1, 300) g");
    let snap = env.json(&["backup", "--postgres", &pg.conn()])["snapshot"]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    drop(pg);
    let config = config_with_job(&env, &data);
    let script = json!([
        { "list": true },
        { "call": "list_snapshots", "args": {} },
        { "call": "run_job", "args": { "job": "files" }, "save": { "run": "run" } },
        { "call": "job_status", "args": { "run": "$run" },
          "until": { "key": "run.status", "in": ["succeeded", "failed", "cancelled"] },
          "save": { "made": "run.stats.snapshots.0" } },
        { "call": "verify_backup", "args": { "snapshot": "$made", "sample": "100%" },
          "save": { "task": "task" } },
        { "call": "job_status", "args": { "task": "$task" },
          "until": { "key": "state", "in": ["done", "failed"] } },
        { "call": "recover_database", "args": { "snapshot": &snap[..12] },
          "save": { "session": "session.id", "connection": "connection" } },
        { "run": ["psql", "$connection", "-XAtc", "SELECT count(*), sum(total) FROM orders"] },
        { "call": "list_recovery_sessions", "args": {} },
        { "call": "stop_recovery", "args": { "session": "$session" } },
        { "call": "forget_snapshots", "args": { "snapshots": [&snap[..12]] } },
        { "call": "list_vms", "args": {} },
        { "call": "vm_snapshots", "args": { "vm": "no-such-vm" } },
        { "call": "list_files", "args": { "snapshot": "latest", "path": "/../etc" } },
        { "call": "list_snapshots", "args": { "limit": "ten" } },
        { "call": "no_such_tool", "args": {} },
    ]);
    let t = session(&env, &config, &["--allow-changes"], &script);
    let kept = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("mcp-transcript.json");
    std::fs::write(
        &kept,
        serde_json::to_string_pretty(&t["transcript"]).unwrap(),
    )
    .unwrap();
    eprintln!("MCP transcript: {}", kept.display());

    // The tools, as reviewed (set CAIRN_BLESS=1 to write a changed list).
    let tools = serde_json::to_string_pretty(&t["tools"]).unwrap() + "\n";
    if std::env::var_os("CAIRN_BLESS").is_some() {
        std::fs::write(GOLDEN, &tools).unwrap();
    }
    let golden = std::fs::read_to_string(GOLDEN).unwrap_or_default();
    assert!(
        tools == golden,
        "tools/list changed: review it and bless it (CAIRN_BLESS=1); now:\n{tools}"
    );

    let snaps = ok(&t, 1, "list_snapshots");
    assert!(
        snaps["snapshots"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["id"] == snap.as_str()),
        "{snaps:#}"
    );
    let run = ok(&t, 3, "job_status");
    assert_eq!(run["run"]["status"], "succeeded", "{run:#}");
    assert_eq!(
        run["run"]["stats"]["snapshots"].as_array().unwrap().len(),
        1
    );
    // The verification ran in the background; job_status gave its record.
    let started = ok(&t, 4, "verify_backup");
    assert_eq!(started["state"], "running", "{started:#}");
    let verified = ok(&t, 5, "job_status");
    assert_eq!(verified["state"], "done", "{verified:#}");
    assert_eq!(
        verified["result"]["verification"]["status"], "passed",
        "{verified:#}"
    );

    // The recovered database answers with the details the tool returned.
    let rec = ok(&t, 6, "recover_database");
    let url = rec["connection"].as_str().unwrap();
    assert!(url.starts_with("postgresql://"), "{rec:#}");
    let query = &t["transcript"][7];
    assert_eq!(
        (
            query["code"].as_i64(),
            query["stdout"].as_str().map(str::trim)
        ),
        (Some(0), Some("300|90300")),
        "{query:#}"
    );
    let listed = ok(&t, 8, "list_recovery_sessions");
    assert!(
        !listed.to_string().contains(url.split('@').next().unwrap()),
        "no password in the listing: {listed}"
    );
    ok(&t, 9, "stop_recovery");
    assert!(env
        .json(&["recover", "list"])
        .as_array()
        .unwrap()
        .is_empty());

    // Forget dry-runs by default: the snapshot is still there.
    let plan = ok(&t, 10, "forget_snapshots");
    assert!(plan.to_string().contains(&snap[..8]), "{plan:#}");
    assert!(env.ok(&["snapshots"]).contains(&snap[..8]));

    ok(&t, 11, "list_vms");
    // Bad arguments: tool errors with the API's or the parser's message.
    for (i, tool, needle) in [
        (12, "vm_snapshots", "no-such-vm"),
        (13, "list_files", ".."),
        (14, "list_snapshots", "limit"),
        (15, "no_such_tool", "no tool"),
    ] {
        let s = step(&t, i, tool);
        assert_eq!(s["is_error"], true, "{s:#}");
        assert!(s["result"].to_string().contains(needle), "{s:#}");
    }

    // Every change went to the audit log as MCP's.
    let rows = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import sqlite3,sys\nfor r in sqlite3.connect(sys.argv[1]).execute('SELECT token, action, status FROM audit ORDER BY id'): print('|'.join(map(str, r)))",
        ])
        .arg(env.dir.path().join("state/serve.sqlite"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&rows.stdout);
    for want in [
        "via MCP|jobs.run|202",
        "via MCP|recovery.db|201",
        "via MCP|recovery.stop|200",
        "via MCP|repositories.forget|200",
    ] {
        assert!(text.contains(want), "{want} not in the audit log:\n{text}");
    }
}

#[test]
fn read_only_mcp_reads_everything_refuses_every_change_tool_and_dry_runs_hold() {
    if !client_ready("the MCP server") {
        return;
    }
    let env = Env::new();
    let data = env.path("data");
    std::fs::create_dir_all(&data).unwrap();
    write_random(&data.join("a"), 2, 1_000);
    let first = env.backup(&[&data])["id"].as_str().unwrap().to_owned();
    write_random(&data.join("b"), 3, 2_000);
    env.backup(&[&data]);
    let config = config_with_job(&env, &data);

    // Every read tool, read-only.
    let dir = data.to_str().unwrap();
    let t = session(
        &env,
        &config,
        &[],
        &json!([
            { "call": "list_repositories", "args": {} },
            { "call": "list_files", "args": { "snapshot": "latest", "path": dir } },
            { "call": "snapshot_diff", "args": { "from": &first[..10], "to": "latest" } },
            { "call": "repository_health", "args": {} },
            { "call": "list_jobs", "args": {} },
            { "call": "job_history", "args": { "job": "files" } },
            { "call": "next_runs", "args": {} },
            { "call": "recent_failures", "args": {} },
            { "call": "verification_results", "args": {} },
            { "call": "repository_health", "args": { "repository": "elsewhere" } },
        ]),
    );
    let repos = ok(&t, 0, "list_repositories");
    assert_eq!(repos["repositories"][0]["status"], "ok", "{repos:#}");
    let files = ok(&t, 1, "list_files").to_string();
    assert!(
        files.contains("\"a\"") && files.contains("\"b\""),
        "{files}"
    );
    let diff = ok(&t, 2, "snapshot_diff").to_string();
    assert!(diff.contains("/b") && !diff.contains("data/a\""), "{diff}");
    let health = ok(&t, 3, "repository_health");
    assert!(
        health["locks"].is_array() && health["checks"].is_array(),
        "{health:#}"
    );
    assert!(ok(&t, 4, "list_jobs").to_string().contains("files"));
    assert!(ok(&t, 5, "job_history")["runs"].is_array());
    assert!(ok(&t, 6, "next_runs")["schedules"].is_array());
    assert!(ok(&t, 7, "recent_failures")["runs"].is_array());
    assert!(ok(&t, 8, "verification_results")["verifications"].is_array());
    let elsewhere = step(&t, 9, "repository_health");
    assert_eq!(elsewhere["is_error"], true, "{elsewhere:#}");
    assert!(elsewhere["result"].to_string().contains("elsewhere"));
    let changes = [
        ("run_job", json!({ "job": "files" })),
        ("backup_now", json!({ "paths": ["/tmp"] })),
        ("recover_database", json!({ "snapshot": "latest" })),
        ("recover_vm", json!({ "snapshot": "latest" })),
        ("stop_recovery", json!({ "session": "x" })),
        ("verify_backup", json!({ "snapshot": "latest" })),
        (
            "restore_files",
            json!({ "snapshot": "latest", "target": "/tmp/x" }),
        ),
        ("vm_start", json!({ "vm": "x" })),
        ("vm_stop", json!({ "vm": "x" })),
        ("vm_reboot", json!({ "vm": "x" })),
        ("vm_snapshot_delete", json!({ "vm": "x", "snapshot": "s" })),
        (
            "clone_vm_from_backup",
            json!({ "snapshot": "latest", "name": "x" }),
        ),
        (
            "forget_snapshots",
            json!({ "snapshots": ["latest"], "dry_run": false }),
        ),
    ];
    let script: Vec<Value> = changes
        .iter()
        .map(|(tool, args)| json!({ "call": tool, "args": args }))
        .collect();
    let t = session(&env, &config, &[], &json!(script));
    for (i, (tool, _)) in changes.iter().enumerate() {
        let s = step(&t, i, tool);
        assert_eq!(s["is_error"], true, "{s:#}");
        assert!(s["result"].to_string().contains("--allow-changes"), "{s:#}");
    }
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 2);

    // With changes allowed, a restore and a forget still only say what they would do.
    let target = env.path("restored");
    let t = session(
        &env,
        &config,
        &["--allow-changes"],
        &json!([
            { "call": "restore_files", "args": { "snapshot": "latest", "target": target } },
            { "call": "forget_snapshots", "args": { "snapshots": ["latest"] } },
            { "call": "vm_stop", "args": { "vm": "no-such-vm" } },
        ]),
    );
    let restore = ok(&t, 0, "restore_files");
    assert!(restore.to_string().contains("dry_run"), "{restore:#}");
    assert!(!target.exists(), "a dry run restored");
    ok(&t, 1, "forget_snapshots");
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 2);
    let stop = step(&t, 2, "vm_stop");
    assert_eq!(stop["is_error"], true, "{stop:#}");
}

#[test]
fn repo_serve_offers_the_tools_over_http_as_the_requests_token() {
    if !client_ready("MCP over HTTP") {
        return;
    }
    use crate::serve::{data_dir, serve_config, token, Daemon};
    let env = Env::new();
    let data = data_dir(&env);
    env.backup(&[&data]);
    let config = serve_config(
        &env,
        &format!(
            "[[job]]\nname = \"files\"\n[[job.source]]\ntype = \"paths\"\npaths = [{:?}]\n",
            data.display().to_string()
        ),
    );
    let rw = token(&env, &config, "admin", false);
    let ro = token(&env, &config, "viewer", true);
    let d = Daemon::start(&env, &config);
    let url = format!("{}/api/v1/mcp", d.url);
    let over_http = |token: &str, script: Value| {
        let file = env.path("mcp-http.json");
        std::fs::write(&file, script.to_string()).unwrap();
        let client = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/e2e/mcp_client.py");
        let out = Command::new(PYTHON)
            .arg(client)
            .arg(&file)
            .args(["--http", &url, token])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            d.log()
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    // A read-only token: every tool listed, reads work, changes refused naming it.
    let t = over_http(
        &ro,
        json!([
            { "list": true },
            { "call": "list_snapshots", "args": {} },
            { "call": "run_job", "args": { "job": "files" } },
        ]),
    );
    assert_eq!(t["tools"].as_array().unwrap().len(), 27);
    assert_eq!(
        ok(&t, 1, "list_snapshots")["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let refused = step(&t, 2, "run_job");
    assert_eq!(refused["is_error"], true, "{refused:#}");
    assert!(
        refused["result"].to_string().contains("viewer via MCP"),
        "{refused:#}"
    );
    // A token that may change things runs the job, audited as its own via MCP.
    let t = over_http(
        &rw,
        json!([
            { "call": "run_job", "args": { "job": "files" }, "save": { "run": "run" } },
            { "call": "job_status", "args": { "run": "$run" },
              "until": { "key": "run.status", "in": ["succeeded", "failed"] } },
            { "call": "backup_now", "args": { "paths": [data], "tags": ["asked"] },
              "save": { "now": "run" } },
            { "call": "job_status", "args": { "run": "$now" },
              "until": { "key": "run.status", "in": ["succeeded", "failed"] } },
            { "call": "backup_now", "args": {} },
            { "call": "backup_now", "args": { "paths": ["relative/path"] } },
        ]),
    );
    assert_eq!(ok(&t, 1, "job_status")["run"]["status"], "succeeded");
    let now = ok(&t, 3, "job_status");
    assert_eq!(now["run"]["status"], "succeeded", "{now:#}");
    assert_eq!(now["run"]["job"], "backup-now", "{now:#}");
    let tagged = env.json(&["snapshots", "--tag", "asked"]);
    assert_eq!(tagged.as_array().unwrap().len(), 1, "{tagged:#}");
    for (i, needle) in [(4, "name something"), (5, "paths")] {
        let s = step(&t, i, "backup_now");
        assert_eq!(s["is_error"], true, "{s:#}");
        assert!(s["result"].to_string().contains(needle), "{s:#}");
    }
    let admin = d.api(&rw);
    let (_, audit) = admin.get("/api/v1/audit");
    assert!(audit.to_string().contains("admin via MCP"), "{audit}");
    // Without a token there is no MCP.
    let anon = ureq::post(&url)
        .set("content-type", "application/json")
        .send_string(r#"{"jsonrpc":"2.0","id":1,"method":"tools/list"}"#);
    assert!(matches!(anon, Err(ureq::Error::Status(401, _))), "{anon:?}");
}

#[test]
fn an_assistant_lists_a_vms_snapshots_and_deletes_one_only_when_told() {
    use crate::vm::{have_libvirt, virsh_ok, vm_env, TestVm};
    if !client_ready("MCP and VMs") || !have_libvirt("MCP and VMs") {
        return;
    }
    let env = vm_env();
    let vm = TestVm::define("mcp", 0);
    virsh_ok(&["snapshot-create-as", &vm.name, "before-upgrade"]);
    let config = env.path("serve.toml");
    std::fs::write(&config, "").unwrap();
    let name = vm.name.as_str();
    let t = session(
        &env,
        &config,
        &["--allow-changes"],
        &json!([
            { "call": "list_vms", "args": {} },
            { "call": "vm_snapshots", "args": { "vm": name } },
            { "call": "vm_snapshot_delete", "args": { "vm": name, "snapshot": "before-upgrade" } },
            { "call": "vm_snapshots", "args": { "vm": name } },
            { "call": "vm_snapshot_delete", "args": { "vm": name, "snapshot": "no-such" } },
            { "call": "vm_stop", "args": { "vm": name } },
            { "call": "vm_snapshot_delete",
              "args": { "vm": name, "snapshot": "before-upgrade", "dry_run": false } },
            { "call": "vm_snapshots", "args": { "vm": name } },
        ]),
    );
    let vms = ok(&t, 0, "list_vms");
    assert!(vms.to_string().contains(name), "{vms:#}");
    let listed = ok(&t, 1, "vm_snapshots").to_string();
    assert!(listed.contains("before-upgrade"), "{listed}");
    let plan = ok(&t, 2, "vm_snapshot_delete");
    assert_eq!(plan["dry_run"], true, "{plan:#}");
    assert!(ok(&t, 3, "vm_snapshots")
        .to_string()
        .contains("before-upgrade"));
    let missing = step(&t, 4, "vm_snapshot_delete");
    assert_eq!(missing["is_error"], true, "{missing:#}");
    let stop = ok(&t, 5, "vm_stop");
    assert!(stop["would"].as_str().unwrap().contains("shut"), "{stop:#}");
    ok(&t, 6, "vm_snapshot_delete");
    assert!(
        !ok(&t, 7, "vm_snapshots")
            .to_string()
            .contains("before-upgrade"),
        "{t:#}"
    );
}

/// A JSON-RPC line to the server.
fn send(stdin: &mut std::process::ChildStdin, line: &str) {
    stdin.write_all(line.as_bytes()).unwrap();
    stdin.write_all(b"\n").unwrap();
    stdin.flush().unwrap();
}

#[test]
fn malformed_requests_get_errors_and_a_closed_stdin_ends_the_server() {
    let env = Env::new();
    let config = env.path("serve.toml");
    std::fs::write(&config, "").unwrap();
    let mut c = Command::new(repo_bin());
    env.environment(&mut c);
    let mut child = c
        .args(["mcp", "--config"])
        .arg(&config)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut read = || {
        let mut l = String::new();
        out.read_line(&mut l).unwrap();
        serde_json::from_str::<Value>(&l).unwrap_or_else(|e| panic!("{e}: {l:?}"))
    };
    send(
        &mut stdin,
        r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#,
    );
    assert!(read()["result"]["serverInfo"].is_object());
    send(
        &mut stdin,
        r#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#,
    );
    // Wrong argument types and a huge argument: tool errors, the server goes on.
    send(
        &mut stdin,
        r#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"list_snapshots","arguments":{"limit":[1,2]}}}"#,
    );
    let r = read();
    assert_eq!(r["result"]["isError"], true, "{r}");
    let huge = "x".repeat(400_000);
    send(
        &mut stdin,
        &json!({"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"list_files","arguments":{"snapshot": huge}}}).to_string(),
    );
    let r = read();
    assert_eq!(r["result"]["isError"], true, "{r}");
    assert!(r.to_string().contains("at most"), "{r}");
    // Not JSON at all, then an unknown method: the server answers what it can and
    // stays up.
    send(&mut stdin, "{this is not json");
    send(
        &mut stdin,
        r#"{"jsonrpc":"2.0","id":4,"method":"tools/frobnicate"}"#,
    );
    let mut r = read();
    if r.get("id") != Some(&json!(4)) {
        r = read();
    }
    assert!(r["error"]["message"].is_string(), "{r}");
    send(
        &mut stdin,
        r#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"list_repositories","arguments":{}}}"#,
    );
    let r = read();
    assert_eq!(r["id"], 5, "{r}");
    assert_eq!(r["result"]["isError"], false, "{r}");
    // A call in flight, then stdin closed: the server exits by itself, cleanly.
    send(
        &mut stdin,
        r#"{"jsonrpc":"2.0","id":6,"method":"tools/call","params":{"name":"list_snapshots","arguments":{}}}"#,
    );
    drop(stdin);
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "repo mcp did not exit after its stdin closed"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}
