//! The control plane end to end: `repo job` and `repo schedule` from the CLI, then
//! `repo serve` as a real process on a 127.0.0.1 port: tokens, runs through the API
//! into a real repository, live events, the audit log, /metrics checked by promtool
//! and scraped by a real Prometheus, bad requests, a schedule a few seconds ahead on the
//! real clock, and a daemon killed with -9 in the middle of a run.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::support::*;

mod operations;
mod storage;
mod verification;

fn write_job(env: &Env, name: &str, body: &str) -> String {
    let p = env.path(&format!("{name}.toml"));
    std::fs::write(&p, format!("name = {name:?}\n{body}")).unwrap();
    p.display().to_string()
}

pub(crate) fn paths_body(data: &Path) -> String {
    format!(
        "[[source]]\ntype = \"paths\"\npaths = [{:?}]\n",
        data.display().to_string()
    )
}

pub(crate) fn data_dir(env: &Env) -> std::path::PathBuf {
    let data = env.path("data");
    std::fs::create_dir_all(&data).unwrap();
    for i in 0..4 {
        write_random(&data.join(format!("f{i}")), i, 50_000 + i as usize * 7_000);
    }
    data
}

#[test]
fn a_job_copies_its_snapshots_to_another_repository_after_each_run() {
    let mut env = Env::new();
    let data = data_dir(&env);
    let offsite = env.path("offsite");
    env.ok(&["-r", offsite.to_str().unwrap(), "init"]);
    let config = serve_config(
        &env,
        &format!(
            "[repositories.offsite]\npath = {:?}\npassword_env = \"REPO_PASSWORD\"\n",
            offsite.display().to_string()
        ),
    );
    env.extra_env
        .push(("CAIRN_SERVE_CONFIG".into(), config.display().to_string()));

    // A copy to the job's own repository, or to one the site does not have: refused,
    // naming the field.
    for (name, to, says) in [
        ("own", "default", "own repository"),
        ("nowhere", "elsewhere", "no repository \"elsewhere\""),
    ] {
        let file = write_job(
            &env,
            name,
            &format!("{}[copy]\nrepository = {to:?}\n", paths_body(&data)),
        );
        let out = env.run(&["job", "add", "--file", &file]);
        assert!(!out.status.success());
        assert!(stderr(&out).contains("copy.repository"), "{}", stderr(&out));
        assert!(stderr(&out).contains(says), "{}", stderr(&out));
    }

    // Each run copies what the destination lacks: the newest 2 of the job's snapshots.
    let file = write_job(
        &env,
        "etc",
        &format!(
            "{}[copy]\nrepository = \"offsite\"\nlatest = 2\n",
            paths_body(&data)
        ),
    );
    env.ok(&["job", "add", "--file", &file]);
    let r1 = env.json(&["job", "run", "etc"]);
    assert_eq!(r1["status"], "succeeded", "{r1}");
    assert_eq!(r1["stats"]["copied"], 1, "{r1}");
    write_random(&data.join("f0"), 77, 60_000);
    let r2 = env.json(&["job", "run", "etc"]);
    assert_eq!(r2["stats"]["copied"], 1, "{r2}");
    let at_offsite = |env: &Env| -> Vec<Value> {
        env.json(&["-r", offsite.to_str().unwrap(), "snapshots"])
            .as_array()
            .unwrap()
            .clone()
    };
    let copies = at_offsite(&env);
    assert_eq!(copies.len(), 2, "{copies:?}");
    let target = env.path("restored");
    env.ok(&[
        "-r",
        offsite.to_str().unwrap(),
        "restore",
        "latest",
        "--target",
        target.to_str().unwrap(),
    ]);
    assert_same_tree(&data, &under(&target, &data));
    let log = env.ok(&["job", "log", &r2["id"].to_string()]);
    assert!(log.contains("1 snapshots copied to \"offsite\""), "{log}");

    // The destination gone: the run fails and says why; its backup is kept here.
    std::fs::rename(&offsite, env.path("offsite-away")).unwrap();
    let out = env.run(&["--json", "job", "run", "etc"]);
    let r3: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    assert_eq!(r3["status"], "failed", "{r3} {}", stderr(&out));
    assert!(
        r3["error"].as_str().unwrap_or("").starts_with("copy: "),
        "{r3}"
    );
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 3);
}

#[test]
fn jobs_and_schedules_are_managed_and_run_from_the_command_line() {
    let env = Env::new();
    let data = data_dir(&env);

    // A job file with a mistake names the field and shows an example.
    let bad = write_job(
        &env,
        "etc",
        "[[source]]\ntype = \"paths\"\npath = [\"/etc\"]\n",
    );
    let out = env.run(&["job", "add", "--file", &bad]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("path"), "{}", stderr(&out));

    let file = write_job(
        &env,
        "etc",
        &format!(
            "tags = [\"nightly\"]\n{}[retention]\nkeep_last = 1\n",
            paths_body(&data)
        ),
    );
    env.ok(&["job", "add", "--file", &file]);
    let again = env.run(&["job", "add", "--file", &file]);
    assert!(
        stderr(&again).contains("already exists"),
        "{}",
        stderr(&again)
    );
    let list = env.json(&["job", "list"]);
    assert_eq!(list[0]["name"], "etc");
    assert!(env.ok(&["job", "show", "etc"]).contains("keep_last = 1"));

    // Run it twice: recorded, tagged, the retention keeps one.
    let r1 = env.json(&["job", "run", "etc"]);
    assert_eq!(r1["status"], "succeeded", "{r1}");
    assert_eq!(r1["stats"]["files"], 4);
    assert_eq!(r1["trigger"], "cli");
    // With JSON logs, every line a run logs carries its job, run and repository.
    let out = env.run(&["--log-format", "json", "-v", "--json", "job", "run", "etc"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let r2: Value = serde_json::from_slice(&out.stdout).unwrap();
    let logged: Vec<Value> = stderr(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|_| panic!("not a JSON log line: {l}")))
        .collect();
    assert!(
        logged.iter().any(|l| l["job"] == "etc"
            && l["repository"] == "default"
            && l["run"].as_str().and_then(|r| r.parse::<i64>().ok()) == r2["id"].as_i64()
            && l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("backing up"))),
        "{logged:?}"
    );
    assert_eq!(r2["stats"]["forgotten"], 1);
    let snaps = env.json(&["snapshots"]);
    let snaps = snaps.as_array().unwrap();
    assert_eq!(snaps.len(), 1);
    let tags = snaps[0]["tags"].as_array().unwrap();
    assert!(tags.contains(&json!("job:etc")) && tags.contains(&json!("nightly")));
    let target = env.path("restored");
    env.ok(&["restore", "latest", "--target", target.to_str().unwrap()]);
    assert_same_tree(&data, &under(&target, &data));
    let runs = env.json(&["job", "runs", "etc"]);
    assert_eq!(runs.as_array().unwrap().len(), 2);
    let log = env.ok(&["job", "log", &r2["id"].to_string()]);
    assert!(log.contains("retention: forgot 1"), "{log}");

    // A dry run of a job whose source vanished says so and fails.
    let gone = write_job(&env, "gone", &paths_body(&env.path("nowhere")));
    env.ok(&["job", "add", "--file", &gone]);
    let dry = env.run(&["job", "run", "gone", "--dry-run"]);
    assert!(!dry.status.success());
    let text = String::from_utf8_lossy(&dry.stdout).to_string();
    assert!(text.contains("nowhere does not exist"), "{text}");
    let real = env.run(&["job", "run", "gone"]);
    assert!(!real.status.success());

    // Schedules: a malformed one is refused with an example, a good one previews.
    let out = env.run(&["schedule", "add", "etc", "daily 27:00"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("for example"), "{}", stderr(&out));
    let out = env.run(&["schedule", "add", "nojob", "daily 02:00"]);
    assert!(
        stderr(&out).contains("no job \"nojob\""),
        "{}",
        stderr(&out)
    );
    let added = env.json(&[
        "schedule",
        "add",
        "etc",
        "daily 02:00",
        "--timezone",
        "Europe/Paris",
    ]);
    let id = added["schedule"]["id"].to_string();
    let next = env.json(&["schedule", "next", &id, "--count", "4"]);
    let next = next.as_array().unwrap();
    assert_eq!(next.len(), 4);
    for t in next {
        let at = chrono::DateTime::parse_from_rfc3339(t["at"].as_str().unwrap()).unwrap();
        let paris = at.with_timezone(&chrono_tz_paris());
        assert_eq!(paris.format("%H:%M").to_string(), "02:00", "{t}");
    }
    assert!(env.ok(&["schedule", "due"]).contains("nothing is due"));
    env.ok(&["schedule", "disable", &id]);
    assert_eq!(env.json(&["schedule", "list"])[0]["enabled"], false);
    env.ok(&["schedule", "enable", &id]);
    env.ok(&["schedule", "remove", &id]);
    assert!(env
        .json(&["schedule", "list"])
        .as_array()
        .unwrap()
        .is_empty());

    // A CLI backup saved as a job.
    env.ok(&[
        "backup",
        data.to_str().unwrap(),
        "--tag",
        "manual",
        "--save-as",
        "adhoc",
    ]);
    let shown = env.ok(&["job", "show", "adhoc"]);
    assert!(
        shown.contains("manual") && shown.contains("paths"),
        "{shown}"
    );
    let r = env.json(&["job", "run", "adhoc"]);
    assert_eq!(r["status"], "succeeded");
    env.ok(&["job", "remove", "adhoc"]);
    assert!(!env.run(&["job", "show", "adhoc"]).status.success());
}

/// Paris, without the chrono-tz crate in this test: CET/CEST by the EU rule.
fn chrono_tz_paris() -> chrono::FixedOffset {
    // The test's next four 02:00 slots fall within days of now; use the offset of now.
    let now = chrono::Utc::now();
    let summer = {
        use chrono::Datelike;
        let y = now.year();
        let last_sunday = |m: u32| {
            let mut d = chrono::NaiveDate::from_ymd_opt(y, m, 31).unwrap();
            while d.weekday() != chrono::Weekday::Sun {
                d = d.pred_opt().unwrap();
            }
            d.and_hms_opt(1, 0, 0).unwrap().and_utc()
        };
        now >= last_sunday(3) && now < last_sunday(10)
    };
    chrono::FixedOffset::east_opt(if summer { 7200 } else { 3600 }).unwrap()
}

/// A child killed and waited for when dropped, a failing test's included.
pub(crate) struct Reaped(pub(crate) Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `repo serve` on a free 127.0.0.1 port, its stderr in a file.
pub(crate) struct Daemon {
    child: Child,
    pub url: String,
    log: std::path::PathBuf,
}

impl Daemon {
    pub(crate) fn start(env: &Env, config: &Path) -> Self {
        Self::start_with(env, config, &[])
    }

    /// With more environment variables (the `PG*` ones of a test's cluster).
    pub(crate) fn start_with(env: &Env, config: &Path, vars: &[(&str, &str)]) -> Self {
        Self::start_on(env, config, "127.0.0.1:0", vars)
    }

    /// Listening on `listen` (a port of the test's choice: a restart keeps its URL).
    pub(crate) fn start_on(env: &Env, config: &Path, listen: &str, vars: &[(&str, &str)]) -> Self {
        static STARTS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = STARTS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = env.path(&format!("serve-{n}.log"));
        let mut child = env
            .cmd()
            .args([
                "serve",
                "--listen",
                listen,
                "--config",
                config.to_str().unwrap(),
            ])
            .envs(vars.iter().copied())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut seen = String::new();
        let url = loop {
            let mut line = String::new();
            assert!(
                err.read_line(&mut line).unwrap() > 0,
                "repo serve exited before listening: {seen}"
            );
            seen.push_str(&line);
            if let Some(u) = line.trim().strip_prefix("repo serve: listening on ") {
                break u.to_owned();
            }
        };
        // Keep draining stderr into the log file.
        let mut file = std::fs::File::create(&log).unwrap();
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut err, &mut file);
        });
        Self { child, url, log }
    }

    pub(crate) fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub(crate) fn stop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "repo serve stopped with {status}: {}",
                    self.log()
                );
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "repo serve ignored SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// A client of this daemon with `token`.
    pub(crate) fn api<'a>(&'a self, token: &'a str) -> Api<'a> {
        Api {
            base: &self.url,
            token: Some(token),
        }
    }

    pub(crate) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) struct Api<'a> {
    pub(crate) base: &'a str,
    pub(crate) token: Option<&'a str>,
}

impl Api<'_> {
    pub(crate) fn call(&self, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
        let mut req =
            ureq::request(method, &format!("{}{path}", self.base)).timeout(Duration::from_secs(30));
        if let Some(t) = self.token {
            req = req.set("Authorization", &format!("Bearer {t}"));
        }
        let res = match body {
            Some(b) => req.send_json(b.clone()),
            None => req.call(),
        };
        let resp = match res {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
        };
        let status = resp.status();
        let text = resp.into_string().unwrap();
        let v = if text.is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&text)
                .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text}"))
        };
        (status, v)
    }
    pub(crate) fn get(&self, path: &str) -> (u16, Value) {
        self.call("GET", path, None)
    }
    pub(crate) fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.call("POST", path, Some(body))
    }
}

pub(crate) fn token(env: &Env, config: &Path, name: &str, read_only: bool) -> String {
    let mut args = vec![
        "serve",
        "--config",
        config.to_str().unwrap(),
        "token",
        "create",
        "--name",
        name,
    ];
    if read_only {
        args.push("--read-only");
    }
    env.ok(&args).trim().to_owned()
}

pub(crate) fn wait_run(api: &Api<'_>, id: &Value, until: &[&str]) -> Value {
    let start = Instant::now();
    loop {
        let (status, v) = api.get(&format!("/api/v1/runs/{id}"));
        assert_eq!(status, 200, "{v}");
        if until.contains(&v["run"]["status"].as_str().unwrap()) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "run {id} stuck: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn serve_config(env: &Env, extra: &str) -> std::path::PathBuf {
    let p = env.path("serve.toml");
    std::fs::write(&p, format!("tick = \"1s\"\n{extra}")).unwrap();
    p
}

#[test]
fn the_daemon_runs_jobs_through_its_api_counts_them_and_refuses_bad_requests() {
    let env = Env::new();
    let data = data_dir(&env);
    let config = serve_config(&env, "");
    let rw = token(&env, &config, "admin", false);
    let ro = token(&env, &config, "viewer", true);
    let mut d = Daemon::start(&env, &config);
    let anon = Api {
        base: &d.url,
        token: None,
    };
    let admin = Api {
        base: &d.url,
        token: Some(&rw),
    };
    let viewer = Api {
        base: &d.url,
        token: Some(&ro),
    };

    assert_eq!(anon.get("/api/v1/health").0, 200);
    let (s, v) = anon.get("/api/v1/jobs");
    assert_eq!(s, 401);
    assert_eq!(v["error"]["code"], "unauthorized");
    let (s, _) = Api {
        base: &d.url,
        token: Some("cairn_0000"),
    }
    .get("/api/v1/jobs");
    assert_eq!(s, 401);

    let job = json!({
        "name": "files",
        "source": [{ "type": "paths", "paths": [data] }],
        "retention": { "keep_last": 2 },
    });
    let (s, v) = viewer.post("/api/v1/jobs", &job);
    assert_eq!((s, v["error"]["code"].as_str()), (403, Some("read_only")));
    let (s, v) = admin.post("/api/v1/jobs", &job);
    assert_eq!(s, 201, "{v}");
    let (s, v) = admin.post("/api/v1/jobs", &json!({ "name": "x", "sauce": 1 }));
    assert_eq!(s, 422, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("sauce"),
        "{v}"
    );
    let (s, v) = admin.post(
        "/api/v1/jobs",
        &json!({ "name": "bad name!", "source": [{ "type": "paths", "paths": ["/etc"] }] }),
    );
    assert_eq!(s, 422, "{v}");

    // Malformed and oversized bodies, unknown routes, bad paths and queries.
    let raw = |body: &[u8]| match ureq::post(&format!("{}/api/v1/jobs", d.url))
        .set("Authorization", &format!("Bearer {rw}"))
        .set("Content-Type", "application/json")
        .send_bytes(body)
    {
        Ok(r) => (r.status(), r.into_string().unwrap()),
        Err(ureq::Error::Status(c, r)) => (c, r.into_string().unwrap()),
        Err(e) => panic!("{e}"),
    };
    let (s, body) = raw(b"{\"name\": ");
    assert_eq!(s, 400, "{body}");
    assert!(body.contains("\"code\":\"bad_body\""), "{body}");
    // An oversized body is refused from its length, before it is read.
    let reply = {
        use std::io::Write;
        let mut c = std::net::TcpStream::connect(d.url.trim_start_matches("http://")).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        write!(
            c,
            "POST /api/v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {rw}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{{",
            3 << 20
        )
        .unwrap();
        let mut buf = vec![0u8; 4096];
        let n = c.read(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).to_string()
    };
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert_eq!(admin.get("/api/v1/nothing").0, 404);
    assert_eq!(admin.get("/api/v1/runs/notanumber").0, 400);
    assert_eq!(admin.get("/api/v1/runs?status=sleeping").0, 400);
    assert_eq!(admin.get("/api/v1/runs/424242").0, 404);
    assert_eq!(
        admin.get("/api/v1/repositories/..%2F..%2Fetc/snapshots").0,
        404
    );

    // A run through the API, to the end, with its log and live events.
    let (s, v) = admin.post("/api/v1/jobs/files/run", &json!({}));
    assert_eq!(s, 202, "{v}");
    let id = v["run"].clone();
    let done = wait_run(&admin, &id, &["succeeded", "failed", "cancelled"]);
    assert_eq!(done["run"]["status"], "succeeded", "{done}");
    assert_eq!(done["run"]["stats"]["files"], 4);
    assert_eq!(done["run"]["trigger"], "api");
    let (_, log) = viewer.get(&format!("/api/v1/runs/{id}/log"));
    assert!(log["log"].as_array().unwrap().len() >= 2, "{log}");
    let events = ureq::get(&format!("{}/api/v1/runs/{id}/events", d.url))
        .set("Authorization", &format!("Bearer {ro}"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        events.contains("event: finished") && events.contains("succeeded"),
        "{events}"
    );
    let (_, snaps) = viewer.get("/api/v1/repositories/default/snapshots?job=files");
    assert_eq!(snaps["snapshots"].as_array().unwrap().len(), 1, "{snaps}");
    let (_, repos) = viewer.get("/api/v1/repositories");
    assert_eq!(
        repos["repositories"][0]["figures"]["snapshots"], 1,
        "{repos}"
    );

    // Browse, download, restore and forget through the API.
    let snap_id = snaps["snapshots"][0]["id"].as_str().unwrap().to_owned();
    let base = format!("/api/v1/repositories/default/snapshots/{snap_id}");
    let inside = data.to_str().unwrap();
    let (s, ls) = viewer.get(&format!("{base}/ls?path={inside}"));
    assert_eq!(s, 200, "{ls}");
    let names: Vec<&str> = ls["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["f0", "f1", "f2", "f3"]);
    let file = ureq::get(&format!("{}{base}/file?path={inside}/f2", d.url))
        .set("Authorization", &format!("Bearer {ro}"))
        .call()
        .unwrap();
    let mut got = Vec::new();
    file.into_reader().read_to_end(&mut got).unwrap();
    assert_eq!(
        got,
        std::fs::read(data.join("f2")).unwrap(),
        "the download differs"
    );
    for bad in ["../../etc/passwd", "/etc/../../x"] {
        let (s, v) = viewer.get(&format!("{base}/file?path={bad}"));
        assert_eq!(s, 400, "{bad}: {v}");
    }
    assert_eq!(viewer.get(&format!("{base}/ls?path=/no/such")).0, 404);
    assert_eq!(
        viewer
            .get("/api/v1/repositories/default/snapshots/ffffffffff/ls")
            .0,
        404
    );
    let target = env.path("api-restore");
    let (s, v) = viewer.post(&format!("{base}/restore"), &json!({ "target": target }));
    assert_eq!(s, 403, "{v}");
    let (s, v) = admin.post(&format!("{base}/restore"), &json!({ "target": target }));
    assert_eq!(s, 200, "{v}");
    assert_same_tree(&data, &under(&target, &data));
    let (s, v) = admin.post(&format!("{base}/restore"), &json!({ "target": target }));
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{v}"
    );
    let (s, _) = admin.post(
        &format!("{base}/restore"),
        &json!({ "target": "relative/dir" }),
    );
    assert_eq!(s, 400);
    let (s, _) = admin.post(
        &format!("{base}/restore"),
        &json!({ "target": format!("{}/../x", env.path("a").display()) }),
    );
    assert_eq!(s, 400);
    let (s, v) = admin.post(
        "/api/v1/repositories/default/forget",
        &json!({ "snapshots": [snap_id], "dry_run": true }),
    );
    assert_eq!((s, v["removed"].as_u64()), (200, Some(1)), "{v}");
    assert_eq!(
        admin
            .post(
                "/api/v1/repositories/default/forget",
                &json!({ "snapshots": ["0000000000"] })
            )
            .0,
        404
    );
    assert_eq!(
        viewer.get("/api/v1/repositories/default/snapshots").1["snapshots"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let (s, locks) = viewer.get("/api/v1/repositories/default/locks");
    assert_eq!(s, 200, "{locks}");
    assert!(locks["locks"].as_array().unwrap().is_empty(), "{locks}");
    let (s, rec) = viewer.get("/api/v1/recovery");
    assert_eq!(
        (s, rec["sessions"].as_array().map(Vec::len)),
        (200, Some(0)),
        "{rec}"
    );
    assert_eq!(admin.post("/api/v1/recovery/nope/stop", &json!({})).0, 404);

    // The audit log says who changed what.
    let (_, audit) = viewer.get("/api/v1/audit");
    let entries = audit["audit"].as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["token"] == "admin" && e["action"] == "jobs.run" && e["status"] == 202),
        "{audit}"
    );
    // The read-only token's attempts to change things are there too, refused.
    let by_viewer: Vec<_> = entries.iter().filter(|e| e["token"] == "viewer").collect();
    assert!(!by_viewer.is_empty(), "{audit}");
    assert!(by_viewer.iter().all(|e| e["status"] == 403), "{audit}");

    // Metrics: the run is counted; promtool accepts the format.
    // (Metrics follow events: a run's end is counted just after it is recorded, a
    // repository's figures once its refresh thread is done. Wait for them.)
    let metrics = metrics_with(
        &d.url,
        &[
            "cairn_runs_total{job_name=\"files\",status=\"succeeded\"} 1",
            "cairn_recovery_sessions{kind=\"database\"} 0",
            "cairn_repository_snapshots{repository=\"default\"} 1",
        ],
    );
    let families = metrics.lines().filter(|l| l.starts_with("# TYPE ")).count();
    assert!(families >= 40, "only {families} metrics");
    if require(
        which("promtool"),
        "promtool check metrics",
        "the prometheus package",
    ) {
        let mut p = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(&mut p.stdin.take().unwrap(), metrics.as_bytes()).unwrap();
        let out = p.wait_with_output().unwrap();
        // promtool exits 1 on lint findings as well as on errors; errors say "error".
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!said.to_lowercase().contains("error"), "promtool: {said}");
    }
    check_dashboard(&metrics, &env);
    d.stop();
}

/// The shipped Grafana dashboard: well formed, every panel's queries valid PromQL
/// (promtool checks them as recording rules) over metrics the daemon exports.
fn check_dashboard(metrics: &str, env: &Env) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dashboards/cairn.json");
    let d: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    assert!(d["title"].is_string() && d["uid"].is_string() && d["schemaVersion"].is_u64());
    let exported: std::collections::HashSet<String> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .flat_map(|n| {
            ["", "_total", "_bucket", "_sum", "_count"].map(|suffix| format!("{n}{suffix}"))
        })
        .collect();
    let mut exprs = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for p in d["panels"].as_array().unwrap() {
        assert!(
            ids.insert(p["id"].as_u64().unwrap()),
            "duplicate panel id: {p}"
        );
        assert!(p["type"].is_string() && p["title"].is_string(), "{p}");
        for k in ["x", "y", "w", "h"] {
            assert!(p["gridPos"][k].is_u64(), "{p}");
        }
        for t in p["targets"].as_array().unwrap() {
            let e = t["expr"].as_str().unwrap().to_owned();
            let mut rest = e.as_str();
            while let Some(i) = rest.find("cairn_") {
                let name: String = rest[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                assert!(
                    exported.contains(&name),
                    "the dashboard queries {name}, which is not exported"
                );
                rest = &rest[i + name.len()..];
            }
            exprs.push(e);
        }
    }
    assert!(exprs.len() >= 20);
    if require(
        which("promtool"),
        "the dashboard's PromQL",
        "the prometheus package",
    ) {
        let rules = env.path("dashboard-rules.yml");
        let mut text = String::from("groups:\n  - name: dashboard\n    rules:\n");
        for (i, e) in exprs.iter().enumerate() {
            text.push_str(&format!(
                "      - record: dashboard:q{i}\n        expr: {}\n",
                serde_json::to_string(e).unwrap()
            ));
        }
        std::fs::write(&rules, text).unwrap();
        let out = Command::new("promtool")
            .arg("check")
            .arg("rules")
            .arg(&rules)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The daemon's metrics once they contain every line of `want` (a minute at most).
fn metrics_with(url: &str, want: &[&str]) -> String {
    let start = Instant::now();
    loop {
        let text = ureq::get(&format!("{url}/metrics"))
            .call()
            .unwrap()
            .into_string()
            .unwrap();
        if want.iter().all(|w| text.contains(w)) {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the metrics never showed {want:?}: {text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

pub(crate) fn which(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn a_real_prometheus_scrapes_the_daemon_and_answers_a_query() {
    if !require(
        which("prometheus"),
        "a Prometheus scrape",
        "the prometheus package",
    ) {
        return;
    }
    let env = Env::new();
    let data = data_dir(&env);
    let config = serve_config(&env, "");
    let rw = token(&env, &config, "admin", false);
    let d = Daemon::start(&env, &config);
    let admin = Api {
        base: &d.url,
        token: Some(&rw),
    };
    let job = json!({ "name": "scraped", "source": [{ "type": "paths", "paths": [data] }] });
    assert_eq!(admin.post("/api/v1/jobs", &job).0, 201);
    let (_, v) = admin.post("/api/v1/jobs/scraped/run", &json!({}));
    wait_run(&admin, &v["run"], &["succeeded"]);

    let target = d.url.trim_start_matches("http://").to_owned();
    let prom_port = free_port();
    let prom_dir = env.path("prometheus");
    std::fs::create_dir_all(&prom_dir).unwrap();
    let prom_config = prom_dir.join("prometheus.yml");
    std::fs::write(
        &prom_config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: cairn\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let mut prom = Reaped(
        Command::new("prometheus")
            .arg(format!("--config.file={}", prom_config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                prom_dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let query = format!(
        "http://127.0.0.1:{prom_port}/api/v1/query?query=cairn_runs_total%7Bjob_name%3D%22scraped%22%2Cstatus%3D%22succeeded%22%7D"
    );
    let start = Instant::now();
    let answer = loop {
        if let Ok(r) = ureq::get(&query).call() {
            let v: Value = serde_json::from_str(&r.into_string().unwrap()).unwrap();
            if v["data"]["result"]
                .as_array()
                .is_some_and(|a| !a.is_empty())
            {
                break v;
            }
        }
        if start.elapsed() > Duration::from_secs(90) {
            let _ = prom.0.kill();
            let mut err = String::new();
            let _ = prom.0.stderr.take().unwrap().read_to_string(&mut err);
            panic!("Prometheus never had the metric: {err}");
        }
        std::thread::sleep(Duration::from_millis(300));
    };
    drop(prom);
    assert_eq!(answer["data"]["result"][0]["value"][1], "1", "{answer}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_schedule_a_few_seconds_ahead_runs_on_the_real_clock() {
    let env = Env::new();
    let data = data_dir(&env);
    let config = serve_config(&env, "");
    let file = write_job(&env, "soon", &paths_body(&data));
    env.ok(&[
        "job",
        "add",
        "--file",
        &file,
        "--config",
        config.to_str().unwrap(),
    ]);
    // Every third second (cron with seconds).
    env.ok(&[
        "schedule",
        "add",
        "soon",
        "*/3 * * * * *",
        "--config",
        config.to_str().unwrap(),
    ]);
    let rw = token(&env, &config, "admin", false);
    let d = Daemon::start(&env, &config);
    let admin = Api {
        base: &d.url,
        token: Some(&rw),
    };
    let start = Instant::now();
    loop {
        let (_, v) = admin.get("/api/v1/runs?job=soon&status=succeeded");
        if let Some(r) = v["runs"].as_array().and_then(|a| a.first()) {
            assert_eq!(r["trigger"], "schedule", "{r}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no scheduled run: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_daemon_killed_mid_run_fails_the_run_on_restart_and_the_next_run_works() {
    let env = Env::new();
    let data = data_dir(&env);
    let config = serve_config(&env, "");
    let rw = token(&env, &config, "admin", false);
    let mut d = Daemon::start(&env, &config);
    let endless = json!({
        "name": "endless",
        "source": [{ "type": "command", "name": "stream",
                     "argv": ["/bin/sh", "-c", "while true; do head -c 1048576 /dev/urandom; sleep 0.05; done"] }],
    });
    let run_id = {
        let admin = Api {
            base: &d.url,
            token: Some(&rw),
        };
        let (s, v) = admin.post("/api/v1/jobs", &endless);
        assert_eq!(s, 201, "{v}");
        let (_, v) = admin.post("/api/v1/jobs/endless/run", &json!({}));
        let id = v["run"].clone();
        let start = Instant::now();
        loop {
            let (_, r) = admin.get(&format!("/api/v1/runs/{id}"));
            if r["progress"]["bytes_read"]
                .as_u64()
                .is_some_and(|b| b > 2 << 20)
            {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(60), "never ran: {r}");
            std::thread::sleep(Duration::from_millis(100));
        }
        id
    };
    d.kill9();

    let d = Daemon::start(&env, &config);
    let admin = Api {
        base: &d.url,
        token: Some(&rw),
    };
    let (_, r) = admin.get(&format!("/api/v1/runs/{run_id}"));
    assert_eq!(r["run"]["status"], "failed", "{r}");
    assert!(
        r["run"]["error"].as_str().unwrap().contains("interrupted"),
        "{r}"
    );
    // The killed daemon's lock is stale: `repo locks` says so, and the next run works.
    let locks = env.json(&["locks"]);
    assert!(
        locks
            .as_array()
            .unwrap()
            .iter()
            .any(|l| !l["stale"].is_null()),
        "the killed run's lock is not seen as stale: {locks}"
    );
    let job = json!({ "name": "endless", "source": [{ "type": "paths", "paths": [data] }] });
    let (s, v) = admin.post("/api/v1/jobs?replace=true", &job);
    assert_eq!(s, 201, "{v}");
    let (s, v) = admin.post("/api/v1/jobs/endless/run", &json!({}));
    assert_eq!(s, 202, "{v}");
    let done = wait_run(&admin, &v["run"], &["succeeded", "failed"]);
    assert_eq!(done["run"]["status"], "succeeded", "{done}");
    assert_eq!(env.json(&["check"])["ok"], true);
}

/// A webhook receiver on 127.0.0.1: every request's headers and body.
pub(crate) struct Receiver {
    pub(crate) url: String,
    pub(crate) got: std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

impl Receiver {
    pub(crate) fn start() -> Self {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let g = got.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut s) = stream else { continue };
                let mut reader = BufReader::new(s.try_clone().unwrap());
                let mut head = String::new();
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    head.push_str(&line);
                }
                let mut body = vec![0u8; len];
                let _ = reader.read_exact(&mut body);
                g.lock()
                    .unwrap()
                    .push((head, String::from_utf8_lossy(&body).to_string()));
                let _ = std::io::Write::write_all(
                    &mut s,
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        Self { url, got }
    }
}

/// A real SMTP server (aiosmtpd) on a free 127.0.0.1 port, delivering into a maildir.
pub(crate) struct Smtp(#[allow(dead_code)] Reaped);

impl Smtp {
    /// Whether one can run here (a missing one fails loudly in CI).
    pub(crate) fn available(what: &str) -> bool {
        require(
            Path::new("/usr/lib/python3/dist-packages/aiosmtpd").exists(),
            what,
            "python3-aiosmtpd",
        )
    }

    /// The server, its port and its maildir.
    pub(crate) fn start(env: &Env) -> (Self, u16, std::path::PathBuf) {
        let maildir = env.path("maildir");
        let port = free_port();
        let child = Command::new("/usr/bin/python3")
            .args(["-m", "aiosmtpd", "-n", "-l", &format!("127.0.0.1:{port}")])
            .args(["-c", "aiosmtpd.handlers.Mailbox", maildir.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Self(Reaped(child));
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "the SMTP server did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        (server, port, maildir)
    }
}

/// The mails delivered into `maildir` once there are at least `n` (a minute at most).
pub(crate) fn mails(maildir: &Path, n: usize, d: &Daemon) -> Vec<std::path::PathBuf> {
    let start = Instant::now();
    loop {
        let files: Vec<_> = std::fs::read_dir(maildir.join("new"))
            .map(|r| r.map(|e| e.unwrap().path()).collect())
            .unwrap_or_default();
        if files.len() >= n {
            return files;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "mails: {files:?}; {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A mail's subject, its plain text and its HTML.
pub(crate) fn read_mail(p: &Path) -> String {
    let out = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import email,sys\nfrom email import policy\nm=email.message_from_file(open(sys.argv[1]),policy=policy.default)\nprint(m['subject'])\nprint(m.get_body(('plain',)).get_content())\nprint(m.get_body(('html',)).get_content())",
        ])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn failures_and_successes_are_mailed_in_french_and_posted_signed_to_a_webhook() {
    if !Smtp::available("notifications by mail") {
        return;
    }
    let env = Env::new();
    let data = data_dir(&env);
    let (smtp, smtp_port, maildir) = Smtp::start(&env);
    let hook = Receiver::start();
    let secret = env.path("hook.secret");
    std::fs::write(&secret, "s3cret\n").unwrap();
    let config = serve_config(
        &env,
        &format!(
            r#"
[notifications.mail]
type = "email"
server = "smtp://127.0.0.1:{smtp_port}"
from = "cairn@example.org"
to = ["ops@example.org"]
language = "fr"
on = ["failure", "success"]

[notifications.hook]
type = "webhook"
url = "{}"
secret_file = "{}"
on = ["failure"]
"#,
            hook.url,
            secret.display()
        ),
    );
    let rw = token(&env, &config, "admin", false);
    let d = Daemon::start(&env, &config);
    let admin = Api {
        base: &d.url,
        token: Some(&rw),
    };
    let good = json!({ "name": "good", "notify": ["mail", "hook"],
                       "source": [{ "type": "paths", "paths": [data] }] });
    let bad = json!({ "name": "bad", "notify": ["mail", "hook"],
                      "source": [{ "type": "paths", "paths": [env.path("vanished")] }] });
    let nowhere = json!({ "name": "x", "notify": ["pager"], "source": [{ "type": "paths", "paths": [data] }] });
    assert_eq!(admin.post("/api/v1/jobs", &nowhere).0, 422);
    for j in [&good, &bad] {
        let (s, v) = admin.post("/api/v1/jobs", j);
        assert_eq!(s, 201, "{v}");
    }
    let (_, g) = admin.post("/api/v1/jobs/good/run", &json!({}));
    wait_run(&admin, &g["run"], &["succeeded"]);
    let (_, b) = admin.post("/api/v1/jobs/bad/run", &json!({}));
    wait_run(&admin, &b["run"], &["failed"]);

    // Two mails (a success and a failure), in French.
    let texts: Vec<String> = mails(&maildir, 2, &d)
        .iter()
        .map(|p| read_mail(p))
        .collect();
    let failed = texts
        .iter()
        .find(|t| t.contains("tâche bad a échoué"))
        .unwrap_or_else(|| panic!("{texts:?}"));
    assert!(
        failed.contains("Erreur: ") && failed.contains("vanished"),
        "{failed}"
    );
    assert!(failed.contains("<table>"), "no HTML part: {failed}");
    assert!(
        texts.iter().any(|t| t.contains("tâche good a réussi")),
        "{texts:?}"
    );

    // One webhook call (failures only), signed.
    let start = Instant::now();
    while hook.got.lock().unwrap().is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no webhook call: {}",
            d.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(500));
    let got = hook.got.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    let (head, body) = &got[0];
    let v: Value = serde_json::from_str(body).unwrap();
    assert_eq!(v["event"], "run.failed");
    assert_eq!(v["job"], "bad");
    let sig = head
        .lines()
        .find_map(|l| {
            l.strip_prefix("x-cairn-signature: ")
                .or_else(|| l.strip_prefix("X-Cairn-Signature: "))
        })
        .unwrap_or_else(|| panic!("no signature: {head}"));
    assert_eq!(sig.trim(), cairn_server::notify::signature("s3cret", body));
    metrics_with(
        &d.url,
        &["cairn_notifications_total{target=\"mail\",result=\"sent\"} 2"],
    );
    drop(smtp);
}

#[test]
fn the_daemon_serves_tls_with_a_certificate_and_names_a_bad_one() {
    let env = Env::new();
    let cert = env.path("cert.pem");
    let key = env.path("key.pem");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .unwrap();
    assert!(out.status.success(), "openssl: {}", stderr(&out));
    let config = serve_config(
        &env,
        &format!(
            "[tls]\ncertificate = {:?}\nkey = {:?}\n",
            cert.display().to_string(),
            key.display().to_string()
        ),
    );
    let d = Daemon::start(&env, &config);
    assert!(d.url.starts_with("https://127.0.0.1:"), "{}", d.url);
    let health = Command::new("curl")
        .args(["-sS", "--max-time", "20", "--cacert"])
        .arg(&cert)
        .arg(format!("{}/api/v1/health", d.url))
        .output()
        .unwrap();
    assert!(health.status.success(), "curl: {}", stderr(&health));
    assert!(String::from_utf8_lossy(&health.stdout).contains("\"status\":\"ok\""));
    // Plain HTTP to the TLS port gets no API answer.
    let plain = d.url.replace("https://", "http://");
    assert!(ureq::get(&format!("{plain}/api/v1/health"))
        .timeout(Duration::from_secs(10))
        .call()
        .is_err());

    // A certificate that is not there: the daemon says which and exits.
    let bad = serve_config(
        &env,
        "[tls]\ncertificate = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n",
    );
    let out = env
        .cmd()
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--config",
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("/nonexistent/cert.pem"),
        "{}",
        stderr(&out)
    );
}
