//! The daemon's OpenAPI document, fuzzed by schemathesis against the running daemon,
//! and the operations beside jobs: check, prune and repair through the API.

use std::process::Command;

use serde_json::{json, Value};

use super::*;

/// schemathesis, in the venv `scripts/install-deps.sh --test` makes.
fn schemathesis() -> Option<std::path::PathBuf> {
    let venv = std::env::var_os("CAIRN_TEST_VENV")
        .map_or_else(|| "/var/cache/cairn/venv".into(), std::path::PathBuf::from);
    let bin = venv.join("bin/schemathesis");
    bin.exists().then_some(bin)
}

/// A daemon on the env's repository with one job that has run once.
fn daemon_with_a_run(env: &Env) -> (Daemon, String, String) {
    let data = data_dir(env);
    let config = serve_config(env, "");
    let rw = token(env, &config, "admin", false);
    let ro = token(env, &config, "viewer", true);
    let d = Daemon::start(env, &config);
    let admin = Api {
        base: &d.url,
        token: Some(&rw),
    };
    let job = json!({ "name": "files", "source": [{ "type": "paths", "paths": [data] }] });
    assert_eq!(admin.post("/api/v1/jobs", &job).0, 201);
    let (s, v) = admin.post("/api/v1/jobs/files/run", &json!({}));
    assert_eq!(s, 202, "{v}");
    wait_run(&admin, &v["run"], &["succeeded"]);
    (d, rw, ro)
}

/// One schemathesis run over the routes `filter` selects, with `token`: valid and
/// invalid requests from the document; no 5xx, and every answer's status, content type
/// and body as documented. A fixed seed: the same cases every run. Returns how many
/// cases ran, all of which passed.
fn run_schemathesis(
    env: &Env,
    st: &std::path::Path,
    d: &Daemon,
    token: &str,
    filter: (&str, &str),
) -> u64 {
    let report = env.path(&format!("schemathesis{}", filter.0.len()));
    let out = Command::new(st)
        .args(["run", &format!("{}/api/v1/openapi.json", d.url)])
        .args(["--url", &format!("{}/api/v1", d.url)])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .args([
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
        ])
        .args([filter.0, filter.1])
        .args(["--phases", "examples,coverage,fuzzing"])
        .args(["--max-examples", "30", "--seed", "20261202", "--workers", "2"])
        .args(["--request-timeout", "30", "--no-color"])
        .args(["--report-dir", report.to_str().unwrap()])
        .env("SCHEMATHESIS_HOOKS", "")
        // Its example database goes there, not into the source tree.
        .current_dir(env.path(""))
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "schemathesis found problems:\n{text}\n--- daemon ---\n{}",
        d.log()
    );
    let summary = text
        .lines()
        .skip_while(|l| !l.contains("SUMMARY"))
        .collect::<Vec<_>>()
        .join("\n");
    eprintln!("schemathesis ({} {}):\n{summary}", filter.0, filter.1);
    // "Test cases: N generated, N passed": every case.
    let counts: Vec<u64> = summary
        .lines()
        .skip_while(|l| !l.starts_with("Test cases:"))
        .nth(1)
        .unwrap_or_default()
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|n| n.parse().ok())
        .collect();
    assert!(counts.len() == 2 && counts[0] == counts[1], "{summary}");
    counts[0]
}

#[test]
fn the_openapi_document_names_every_route_and_schemathesis_finds_no_server_error() {
    let st = schemathesis();
    if !require(
        st.is_some(),
        "schemathesis against the API",
        "schemathesis in /var/cache/cairn/venv (scripts/install-deps.sh --test)",
    ) {
        return;
    }
    let env = Env::new();
    let (d, rw, ro) = daemon_with_a_run(&env);
    let anon = Api {
        base: &d.url,
        token: None,
    };
    // The document needs no token, and names every route the router has.
    let (s, doc) = anon.get("/api/v1/openapi.json");
    assert_eq!(s, 200, "{doc}");
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    let paths = doc["paths"].as_object().unwrap();
    for p in [
        "/jobs",
        "/jobs/{name}/run",
        "/runs/{id}/events",
        "/schedules/{id}/enable",
        "/repositories/{name}/snapshots/{id}/file",
        "/repositories/{name}/snapshots/{id}/restore",
        "/repositories/{name}/check",
        "/repositories/{name}/prune",
        "/repositories/{name}/repair",
        "/recovery/db",
        "/recovery/vm",
        "/recovery/{id}/stop",
        "/recovery/{id}/commit",
        "/recovery/{id}/connection",
        "/schedules/preview",
        "/databases",
        "/notifications",
        "/notifications/{name}/test",
        "/tokens",
        "/tokens/{name}",
        "/repositories/{name}/checks",
        "/repositories/{name}/growth",
        "/repositories/{name}/sources",
        "/vms",
        "/vms/{name}/{action}",
        "/vms/{name}/snapshots",
        "/vms/{name}/snapshots/{snapshot}",
        "/vms/clone",
        "/verifications",
        "/verifications/{id}",
        "/verifications/stats",
        "/backups",
    ] {
        assert!(paths.contains_key(p), "{p} is not in the document");
    }
    let operations: usize = paths.values().map(|m| m.as_object().unwrap().len()).sum();
    assert_eq!(operations, 61, "operations documented");
    assert_eq!(
        doc["components"]["securitySchemes"]["bearer"]["scheme"],
        "bearer"
    );
    let job_schema = &doc["components"]["schemas"]["JobDefinition"];
    assert!(
        job_schema["required"]
            .as_array()
            .unwrap()
            .contains(&json!("name")),
        "{job_schema}"
    );

    // A restore writes into any new absolute path of this host, and schemathesis reuses
    // the examples of same-named parameters (`default`, `latest`) across operations: with
    // a write token it could fill /0 or /etc/x; a backup without a job could read / whole.
    // So those two routes are fuzzed with the read-only token (every answer a documented
    // 403) and every other route with the write one; their bad input is tested in mod.rs
    // and mcp.rs.
    let st = st.unwrap();
    let write = run_schemathesis(
        &env,
        &st,
        &d,
        &rw,
        ("--exclude-path-regex", "/restore$|^/backups$"),
    );
    assert!(write >= 500, "{write} cases");
    let read = run_schemathesis(
        &env,
        &st,
        &d,
        &ro,
        ("--include-path-regex", "/restore$|^/backups$"),
    );
    assert!(read >= 10, "{read} cases");
    // The daemon is still whole: it answers and its run is there.
    let admin = Api {
        base: &d.url,
        token: Some(&rw),
    };
    let (s, v) = admin.get("/api/v1/runs?job=files");
    assert_eq!(s, 200);
    assert_eq!(v["runs"][0]["status"], "succeeded", "{v}");
    env.ok(&["check"]);
}

#[test]
fn check_prune_and_repair_run_through_the_api_and_a_read_only_token_cannot() {
    let env = Env::new();
    let (d, rw, ro) = daemon_with_a_run(&env);
    let admin = Api {
        base: &d.url,
        token: Some(&rw),
    };
    let viewer = Api {
        base: &d.url,
        token: Some(&ro),
    };
    let (s, v) = admin.post("/api/v1/repositories/default/check", &json!({}));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    let (s, v) = admin.post(
        "/api/v1/repositories/default/check",
        &json!({ "read_data": true }),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["ok"], true, "{v}");
    // The check is in the metrics.
    let m = metrics_with(
        &d.url,
        &["cairn_repository_last_check_ok{repository=\"default\"} 1"],
    );
    assert!(m.contains("cairn_repository_last_check_timestamp_seconds{repository=\"default\"}"));

    // Damage found by a data check: flip a byte in a pack.
    let pack = env
        .packs()
        .into_iter()
        .max_by_key(|p| std::fs::metadata(p).unwrap().len())
        .unwrap();
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[100] ^= 0xff;
    std::fs::write(&pack, &bytes).unwrap();
    let (s, v) = admin.post(
        "/api/v1/repositories/default/check",
        &json!({ "read_data": true }),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["ok"], false, "{v}");
    assert!(
        !v["report"]["problems"].as_array().unwrap().is_empty(),
        "{v}"
    );
    metrics_with(
        &d.url,
        &["cairn_repository_last_check_ok{repository=\"default\"} 0"],
    );

    // Bad input, refused before anything runs.
    let (s, v) = admin.post(
        "/api/v1/repositories/default/check",
        &json!({ "subset": "3/2" }),
    );
    assert_eq!(s, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .to_lowercase()
            .contains("n/m"),
        "{v}"
    );
    let (s, v) = admin.post("/api/v1/repositories/default/check", &json!({ "deep": 1 }));
    assert_eq!(s, 422, "{v}");
    let (s, v) = admin.post("/api/v1/repositories/nope/prune", &json!({}));
    assert_eq!(s, 404, "{v}");
    let (s, v) = admin.post(
        "/api/v1/repositories/default/prune",
        &json!({ "max_unused": 2.0 }),
    );
    assert_eq!(s, 422, "{v}");
    let (s, v) = viewer.post("/api/v1/repositories/default/repair", &json!({}));
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["error"]["code"], "read_only");

    // Repair marks what the damage took; a dry prune then reports, changing nothing.
    let (s, v) = admin.post("/api/v1/repositories/default/repair", &json!({}));
    assert_eq!(s, 200, "{v}");
    let packs_before = env.packs().len();
    let (s, v) = admin.post(
        "/api/v1/repositories/default/prune",
        &json!({ "dry_run": true }),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["report"]["dry_run"], true, "{v}");
    assert_eq!(env.packs().len(), packs_before);
    let (s, v) = admin.post("/api/v1/repositories/default/prune", &json!({}));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["report"]["dry_run"], false, "{v}");
    // Every change is audited, the refused one too.
    let (_, a) = admin.get("/api/v1/audit");
    let actions: Vec<(String, u64)> = a["audit"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["action"].as_str().unwrap().to_owned(),
                e["status"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(
        actions.contains(&("repositories.check".into(), 200)),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("repositories.repair".into(), 403)),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("repositories.repair".into(), 200)),
        "{actions:?}"
    );
    assert!(
        actions.contains(&("repositories.prune".into(), 200)),
        "{actions:?}"
    );
    // No lock is left behind.
    let (_, l) = admin.get("/api/v1/repositories/default/locks");
    assert_eq!(l["locks"], Value::Array(vec![]), "{l}");
}

#[test]
fn vm_routes_name_a_missing_domain_and_a_bad_action() {
    if !require(
        which("virsh") && is_root(),
        "the API's VM routes",
        "libvirtd (scripts/start-services.sh), as root",
    ) {
        return;
    }
    let env = Env::new();
    let config = serve_config(&env, "");
    let rw = token(&env, &config, "admin", false);
    let d = Daemon::start(&env, &config);
    let admin = Api {
        base: &d.url,
        token: Some(&rw),
    };
    let (s, v) = admin.get("/api/v1/vms");
    assert_eq!(s, 200, "{v}");
    assert!(v["vms"].is_array(), "{v}");
    let (s, v) = admin.post("/api/v1/vms/cairn-no-such-vm/start", &json!({}));
    assert_eq!(s, 404, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("no domain named"),
        "{v}"
    );
    let (s, v) = admin.post("/api/v1/vms/anything/explode", &json!({}));
    assert_eq!(s, 404, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("power_off"),
        "{v}"
    );
    // A recovery of a snapshot that is not there, and of one that is not a VM's.
    let (s, v) = admin.post("/api/v1/recovery/vm", &json!({ "snapshot": "deadbeef" }));
    assert_eq!(s, 404, "{v}");
    let data = data_dir(&env);
    env.ok(&["backup", data.to_str().unwrap()]);
    let (s, v) = admin.post("/api/v1/recovery/vm", &json!({ "snapshot": "latest" }));
    assert_eq!(s, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is not a VM's"),
        "{v}"
    );
    let (s, v) = admin.post("/api/v1/recovery/db", &json!({ "snapshot": "latest" }));
    assert_eq!(s, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("not a physical database backup"),
        "{v}"
    );
    let (s, v) = admin.post(
        "/api/v1/recovery/db",
        &json!({ "snapshot": "latest", "runtime": "podman" }),
    );
    assert_eq!(s, 422, "{v}");
}
