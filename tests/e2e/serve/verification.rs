//! Verifications through the daemon: a job with `[verify] after_backup = true` has
//! each run's snapshot verified (a sample of its files restored and compared), the
//! result in `repo verify list`, the metrics and, when it failed, a mail to a real SMTP
//! server; "verify now" through the API, and its bad requests.

use std::time::{Duration, Instant};

use chrono::Timelike;
use serde_json::{json, Value};

use super::{data_dir, mails, metrics_with, read_mail, serve_config, token, Api, Daemon, Smtp};
use crate::support::*;

/// The first of the host's verifications (newest first) that matches `want` and has
/// ended (a minute at most).
fn verification_where(env: &Env, d: &Daemon, want: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let list = env.json(&["verify", "list"]);
        let ended = |v: &Value| !["pending", "running"].contains(&v["status"].as_str().unwrap());
        if let Some(v) = list
            .as_array()
            .unwrap()
            .iter()
            .find(|v| want(v) && ended(v))
        {
            return v.clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no such verification in {list:#}; {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Flips a byte in the middle of every pack: the structure stays intact (a metadata
/// check passes), the data does not.
/// One byte flipped in the middle of every pack of file data.
fn damage_every_pack(env: &Env) {
    for pack in env.data_packs() {
        let mut bytes = std::fs::read(&pack).unwrap();
        let at = bytes.len() / 2;
        bytes[at] ^= 0x40;
        std::fs::set_permissions(&pack, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        std::fs::write(&pack, &bytes).unwrap();
    }
}

/// A schedule firing once, a few seconds from now (UTC): `action` is `run` or `verify`.
fn once_soon(api: &Api<'_>, job: &str, action: &str) -> Value {
    let t = chrono::Utc::now() + chrono::Duration::seconds(4);
    let when = format!("{} {} {} * * *", t.second(), t.minute(), t.hour());
    let (s, v) = api.post(
        "/api/v1/schedules",
        &json!({ "job": job, "when": when, "timezone": "UTC", "action": action }),
    );
    assert_eq!(s, 201, "{v}");
    v["schedule"]["id"].clone()
}

/// The job's run made by a schedule, once it has ended.
fn scheduled_run(api: &Api<'_>, job: &str, after: usize, d: &Daemon) -> Value {
    let start = Instant::now();
    loop {
        let (_, v) = api.get(&format!("/api/v1/runs?job={job}"));
        let runs = v["runs"].as_array().cloned().unwrap_or_default();
        let ended: Vec<_> = runs
            .iter()
            .filter(|r| r["trigger"] == "schedule")
            .filter(|r| ["succeeded", "failed"].contains(&r["status"].as_str().unwrap_or("")))
            .collect();
        if ended.len() > after {
            return ended[0].clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no scheduled run of {job}: {v}; {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn each_backup_of_a_job_is_verified_into_the_list_the_metrics_and_a_mail_when_it_fails() {
    if !Smtp::available("verification notices by mail") {
        return;
    }
    let env = Env::new();
    let data = data_dir(&env);
    let (smtp, smtp_port, maildir) = Smtp::start(&env);
    let config = serve_config(
        &env,
        &format!(
            r#"
[notifications.mail]
type = "email"
server = "smtp://127.0.0.1:{smtp_port}"
from = "cairn@example.org"
to = ["ops@example.org"]
on = ["verification-failure"]
"#
        ),
    );
    let rw = token(&env, &config, "admin", false);
    let ro = token(&env, &config, "viewer", true);
    let d = Daemon::start(&env, &config);
    let admin = d.api(&rw);
    let job = |name: &str, sample: &str| {
        json!({ "name": name, "notify": ["mail"],
                "source": [{ "type": "paths", "paths": [data] }],
                "verify": { "after_backup": true, "snapshots": { "sample": sample } } })
    };
    // A share that is not one is refused, naming the field.
    let (s, v) = admin.post("/api/v1/jobs", &job("bad", "0%"));
    assert_eq!(s, 422, "{v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("verify.snapshots.sample"),
        "{v}"
    );
    let (s, v) = admin.post("/api/v1/jobs", &job("files", "100%"));
    assert_eq!(s, 201, "{v}");

    // A good run from the schedule: its snapshot verified, and passed.
    let schedule = once_soon(&admin, "files", "run");
    let run = scheduled_run(&admin, "files", 0, &d);
    assert_eq!(run["status"], "succeeded", "{run}");
    let snap = run["stats"]["snapshots"][0].as_str().unwrap().to_owned();
    let passed = verification_where(&env, &d, |v| v["snapshot"] == snap.as_str());
    assert_eq!(passed["status"], "passed", "{passed:#}");
    assert_eq!(passed["trigger"], "after_backup files");
    assert_eq!(passed["kind"], "files");
    assert!(
        passed["steps"][0]["detail"]
            .as_str()
            .unwrap()
            .starts_with("4 of 4 files"),
        "{passed:#}"
    );
    assert_eq!(
        admin
            .call("DELETE", &format!("/api/v1/schedules/{schedule}"), None)
            .0,
        204
    );

    // The data damaged under the index: the next backup (unchanged files, deduplicated)
    // succeeds, its verification cannot restore the sample and fails.
    damage_every_pack(&env);
    let schedule = once_soon(&admin, "files", "run");
    let run = scheduled_run(&admin, "files", 1, &d);
    assert_eq!(run["status"], "succeeded", "{run}");
    let snap2 = run["stats"]["snapshots"][0].as_str().unwrap().to_owned();
    assert_ne!(snap, snap2);
    let failed = verification_where(&env, &d, |v| v["snapshot"] == snap2.as_str());
    assert_eq!(failed["status"], "failed", "{failed:#}");
    assert_eq!(failed["trigger"], "after_backup files");
    let failed_step = failed["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["result"] == "failed")
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .unwrap_or_else(|| panic!("no failed step: {failed:#}"));
    assert!(
        ["restore", "compare"].contains(&failed_step.as_str()),
        "{failed:#}"
    );
    admin.call("DELETE", &format!("/api/v1/schedules/{schedule}"), None);

    // One mail: the failure (a passed verification tells nobody).
    let texts: Vec<String> = mails(&maildir, 1, &d)
        .iter()
        .map(|p| read_mail(p))
        .collect();
    assert_eq!(texts.len(), 1, "{texts:?}");
    let mail = &texts[0];
    let id = failed["id"].to_string();
    assert!(
        mail.contains(&format!(
            "verification {id} of job files: failed verification"
        )),
        "{mail}"
    );
    assert!(
        mail.contains(&snap2) && mail.contains(&failed_step),
        "{mail}"
    );

    // The metrics: by job and result, and the host's totals.
    let text = metrics_with(
        &d.url,
        &[
            "cairn_verifications_total{job_name=\"files\",result=\"passed\"} 1",
            "cairn_verifications_total{job_name=\"files\",result=\"failed\"} 1",
            "cairn_verifications_recorded{status=\"passed\"} 1",
            "cairn_verifications_recorded{status=\"failed\"} 1",
            "cairn_verification_success_ratio 0.5",
        ],
    );
    assert!(
        text.contains("cairn_verification_last_timestamp_seconds{job_name=\"files\"}"),
        "{text}"
    );
    assert!(
        text.contains("cairn_verification_source_last_timestamp_seconds{source="),
        "{text}"
    );

    // A verify schedule: at its slot, the newest snapshot of each of the job's sources
    // is verified (no backup runs).
    let (s, v) = admin.post(
        "/api/v1/schedules",
        &json!({ "job": "files", "when": "daily 02:00", "action": "explode" }),
    );
    assert_eq!(s, 422, "{v}");
    let schedule = once_soon(&admin, "files", "verify");
    let (_, listed) = admin.get("/api/v1/schedules");
    assert!(
        listed.to_string().contains("\"action\":\"verify\""),
        "{listed}"
    );
    let scheduled = verification_where(&env, &d, |v| v["trigger"] == "schedule files");
    assert_eq!(scheduled["snapshot"], snap2.as_str(), "{scheduled:#}");
    assert_eq!(scheduled["status"], "failed", "{scheduled:#}");
    admin.call("DELETE", &format!("/api/v1/schedules/{schedule}"), None);
    let (_, runs) = admin.get("/api/v1/runs?job=files");
    assert_eq!(
        runs["runs"].as_array().unwrap().len(),
        2,
        "a verify schedule runs no backup: {runs}"
    );
    metrics_with(
        &d.url,
        &["cairn_verifications_total{job_name=\"files\",result=\"failed\"} 2"],
    );

    verify_now_through_the_api(&env, &d, (&rw, &ro), &snap);
    drop(smtp);
}

/// "Verify now", the listing, one record, the statistics, and the bad requests.
fn verify_now_through_the_api(env: &Env, d: &Daemon, (rw, ro): (&str, &str), snap: &str) {
    let admin = d.api(rw);
    let (s, v) = admin.post(
        "/api/v1/verifications",
        &json!({ "snapshot": &snap[..12], "how": { "sample": "100%" } }),
    );
    assert_eq!(s, 201, "{v}");
    let now = &v["verification"];
    // The packs are damaged: this restore fails too.
    assert_eq!(now["status"], "failed", "{now:#}");
    assert_eq!(
        (now["trigger"].as_str(), now["snapshot"].as_str()),
        (Some("api"), Some(snap))
    );
    let (s, one) = admin.get(&format!("/api/v1/verifications/{}", now["id"]));
    assert_eq!(s, 200, "{one}");
    assert_eq!(one["verification"]["id"], now["id"]);
    let (_, list) = admin.get("/api/v1/verifications?status=failed&kind=files");
    assert_eq!(list["verifications"].as_array().unwrap().len(), 3, "{list}");
    assert_eq!(list["verifications"][0]["id"], now["id"], "newest first");
    let (_, stats) = admin.get("/api/v1/verifications/stats");
    assert_eq!(
        (
            stats["stats"]["total"].as_u64(),
            stats["stats"]["failed"].as_u64()
        ),
        (Some(4), Some(3)),
        "{stats}"
    );
    // The CLI reads the same results.
    assert_eq!(env.json(&["verify", "list"]).as_array().unwrap().len(), 4);

    let bad = [
        ("GET", "/api/v1/verifications/999999", None, 404),
        ("GET", "/api/v1/verifications/abc", None, 400),
        ("GET", "/api/v1/verifications?status=sunny", None, 400),
        ("GET", "/api/v1/verifications?kind=tape", None, 400),
        (
            "POST",
            "/api/v1/verifications",
            Some(json!({ "snapshot": 5 })),
            422,
        ),
        (
            "POST",
            "/api/v1/verifications",
            Some(json!({ "snapshot": "latest", "how": { "colour": "red" } })),
            422,
        ),
        (
            "POST",
            "/api/v1/verifications",
            Some(json!({ "snapshot": "ffffffffffff" })),
            404,
        ),
        (
            "POST",
            "/api/v1/verifications",
            Some(json!({ "snapshot": "latest", "repository": "elsewhere" })),
            404,
        ),
        (
            "POST",
            "/api/v1/verifications",
            Some(json!({ "snapshot": "latest", "how": { "timeout": "soon" } })),
            422,
        ),
    ];
    for (method, path, body, want) in bad {
        let (s, v) = admin.call(method, path, body.as_ref());
        assert_eq!(s, want, "{method} {path} {body:?}: {v}");
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "{v}"
        );
    }
    // A read-only token reads, and may not verify.
    let viewer = d.api(ro);
    assert_eq!(viewer.get("/api/v1/verifications").0, 200);
    assert_eq!(
        viewer
            .post("/api/v1/verifications", &json!({ "snapshot": "latest" }))
            .0,
        403
    );
    // Nothing of the refused requests was recorded.
    assert_eq!(env.json(&["verify", "list"]).as_array().unwrap().len(), 4);
}
