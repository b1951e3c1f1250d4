//! The dashboard end to end: the session API with cookies and CSRF tokens over plain
//! HTTP, then the pages in a real headless chromium against a real `repo serve` and
//! repository (login, overview, "run now" to 100 %, snapshots, languages, a read-only
//! login, a forged change, a session that ends). Screenshots of each page in each
//! language go to `target/tmp/dashboard-screenshots/`.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use serde_json::{json, Value};

use crate::serve::{data_dir, serve_config, token, wait_run, Api, Daemon};
use crate::support::*;
use crate::webdriver::{browser_ready, Browser};

fn add_user(env: &Env, config: &std::path::Path, name: &str, password: &str, read_only: bool) {
    use std::io::Write;
    let mut args = vec![
        "serve",
        "--config",
        config.to_str().unwrap(),
        "user",
        "add",
        name,
    ];
    if read_only {
        args.push("--read-only");
    }
    args.push("--password-stdin");
    let mut child = env
        .cmd()
        .args(&args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A call with a cookie and optionally a CSRF token; returns status, body and the
/// response's Set-Cookie.
fn call(
    base: &str,
    method: &str,
    path: &str,
    cookie: Option<&str>,
    csrf: Option<&str>,
    body: Option<Value>,
) -> (u16, Value, Option<String>) {
    let mut req = ureq::request(method, &format!("{base}{path}")).timeout(Duration::from_secs(30));
    if let Some(c) = cookie {
        req = req.set("Cookie", &format!("cairn_session={c}"));
    }
    if let Some(t) = csrf {
        req = req.set("X-CSRF-Token", t);
    }
    let res = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    let resp = match res {
        Ok(r) => r,
        Err(ureq::Error::Status(_, r)) => r,
        Err(e) => panic!("{method} {path}: {e}"),
    };
    let status = resp.status();
    let set_cookie = resp.header("set-cookie").map(str::to_owned);
    let text = resp.into_string().unwrap();
    let v = serde_json::from_str(&text).unwrap_or(Value::Null);
    (status, v, set_cookie)
}

fn cookie_value(set_cookie: &str) -> String {
    set_cookie
        .split(';')
        .next()
        .unwrap()
        .strip_prefix("cairn_session=")
        .unwrap()
        .to_owned()
}

struct Site {
    config: PathBuf,
    rw: String,
    ro: String,
    d: Daemon,
}

/// A daemon with tokens `admin` and `viewer` (read-only), user alice, and job `files`.
fn site(env: &Env) -> Site {
    let data = data_dir(env);
    let config = serve_config(env, "");
    let rw = token(env, &config, "admin", false);
    let ro = token(env, &config, "viewer", true);
    add_user(env, &config, "alice", "correct horse battery", false);
    let d = Daemon::start(env, &config);
    let admin = Api {
        base: &d.url,
        token: Some(&rw),
    };
    let job = json!({ "name": "files", "source": [{ "type": "paths", "paths": [data] }] });
    assert_eq!(admin.post("/api/v1/jobs", &job).0, 201);
    Site { config, rw, ro, d }
}

#[test]
fn a_login_opens_a_cookie_session_whose_changes_need_its_csrf_token() {
    let env = Env::new();
    let Site { config, rw, ro, d } = site(&env);
    let admin = Api {
        base: &d.url,
        token: Some(&rw),
    };
    let base = d.url.as_str();

    // Malformed and wrong logins: clear errors, no cookie.
    for (body, want) in [
        (json!({}), 400),
        (json!({ "user": "alice" }), 400),
        (
            json!({ "token": "x", "user": "alice", "password": "p" }),
            400,
        ),
        (json!({ "user": "alice", "password": "wrong horse" }), 401),
        (
            json!({ "user": "nobody", "password": "correct horse battery" }),
            401,
        ),
        (json!({ "token": "cairn_0000" }), 401),
        (json!({ "password": 5 }), 422),
    ] {
        let (s, v, c) = call(
            base,
            "POST",
            "/api/v1/session",
            None,
            None,
            Some(body.clone()),
        );
        assert!(s == want || (want == 422 && s == 400), "{body}: {s} {v}");
        assert!(c.is_none(), "{body} set a cookie");
        assert!(v["error"]["message"].is_string(), "{v}");
    }
    let (_, v, _) = call(
        base,
        "POST",
        "/api/v1/session",
        None,
        None,
        Some(json!({ "user": "nobody", "password": "x" })),
    );
    assert_eq!(v["error"]["message"], "wrong user name or password");

    // The right password: a cookie only scripts of the page cannot read, sent to this
    // site alone.
    let (s, v, c) = call(
        base,
        "POST",
        "/api/v1/session",
        None,
        None,
        Some(json!({ "user": "alice", "password": "correct horse battery" })),
    );
    assert_eq!(s, 201, "{v}");
    let set = c.unwrap();
    for flag in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(set.contains(flag), "{set}");
    }
    let cookie = cookie_value(&set);
    let csrf = v["csrf"].as_str().unwrap().to_owned();
    assert_eq!(v["name"], "user:alice");
    let (s, who, _) = call(base, "GET", "/api/v1/session", Some(&cookie), None, None);
    assert_eq!((s, &who["csrf"]), (200, &v["csrf"]), "{who}");
    let (s, _, _) = call(base, "GET", "/api/v1/jobs", Some(&cookie), None, None);
    assert_eq!(s, 200);

    // A change without the CSRF token (what a forged cross-site request would be), or
    // with a wrong one, is refused and changes nothing; with it, it runs.
    for t in [None, Some("0123")] {
        let (s, v, _) = call(
            base,
            "POST",
            "/api/v1/jobs/files/run",
            Some(&cookie),
            t,
            Some(json!({})),
        );
        assert_eq!(s, 403, "{v}");
        assert_eq!(v["error"]["code"], "csrf");
    }
    assert!(admin.get("/api/v1/runs").1["runs"]
        .as_array()
        .unwrap()
        .is_empty());
    let (s, v, _) = call(
        base,
        "POST",
        "/api/v1/jobs/files/run",
        Some(&cookie),
        Some(&csrf),
        Some(json!({})),
    );
    assert_eq!(s, 202, "{v}");
    wait_run(&admin, &v["run"], &["succeeded"]);
    let audit = admin.get("/api/v1/audit").1;
    assert!(
        audit["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["token"] == "user:alice" && e["status"] == 202),
        "{audit}"
    );

    // A read-only token's session reads and cannot change, even with its CSRF token;
    // it may log out.
    let (s, v, c) = call(
        base,
        "POST",
        "/api/v1/session",
        None,
        None,
        Some(json!({ "token": ro })),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["read_only"], true);
    let ro_cookie = cookie_value(&c.unwrap());
    let ro_csrf = v["csrf"].as_str().unwrap().to_owned();
    let (s, v, _) = call(
        base,
        "POST",
        "/api/v1/jobs/files/run",
        Some(&ro_cookie),
        Some(&ro_csrf),
        Some(json!({})),
    );
    assert_eq!(s, 403, "{v}");
    assert_eq!(v["error"]["code"], "read_only");
    let (s, _, c) = call(
        base,
        "DELETE",
        "/api/v1/session",
        Some(&ro_cookie),
        Some(&ro_csrf),
        None,
    );
    assert_eq!(s, 200);
    assert!(c.unwrap().contains("Max-Age=0"));
    let (s, v, _) = call(base, "GET", "/api/v1/session", Some(&ro_cookie), None, None);
    assert_eq!(s, 401, "{v}");
    assert_eq!(v["error"]["code"], "session_expired");

    // Removing the user ends their session.
    let out = env.run(&[
        "serve",
        "--config",
        config.to_str().unwrap(),
        "user",
        "remove",
        "alice",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (s, _, _) = call(base, "GET", "/api/v1/jobs", Some(&cookie), None, None);
    assert_eq!(s, 401);
    // A short password is refused when the user is made.
    let out = env.run(&[
        "serve",
        "--config",
        config.to_str().unwrap(),
        "user",
        "add",
        "bob",
        "--password-stdin",
    ]);
    assert!(!out.status.success());
}

fn screenshots() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots")
}

fn log_in(b: &Browser, user: &str, password: &str) {
    b.type_into("#user", user);
    b.type_into("#password", password);
    b.click("#login-submit");
}

#[test]
fn the_dashboard_works_in_a_real_browser_in_english_and_french() {
    if !browser_ready("the dashboard in a browser") {
        return;
    }
    let env = Env::new();
    let Site { config, rw, ro, d } = site(&env);
    let admin = Api {
        base: &d.url,
        token: Some(&rw),
    };
    let shots = screenshots();
    let b = Browser::start(1280, 900);

    // A wrong password says so and keeps what was typed in the user field.
    b.go(&format!("{}/", d.url));
    b.find("#login");
    b.screenshot(&shots.join("en-login.png"));
    log_in(&b, "alice", "wrong horse");
    b.wait_text("#login-error", "wrong user name or password");
    assert_eq!(b.value("#user"), "alice");
    log_in(&b, "alice", "correct horse battery");
    b.wait_text("#who-name", "user:alice");
    b.wait_text("main h1", "Overview");
    assert!(b.text("main").contains("files"), "{}", b.page_text());
    b.screenshot(&shots.join("en-overview.png"));

    // Run the job from its page and watch it reach 100 %.
    b.click("#nav-jobs");
    b.click("button.run-now");
    b.wait_text("#run-progress", "succeeded");
    b.wait_text("#run-progress .percent", "100");
    b.screenshot(&shots.join("en-run.png"));
    let runs = admin.get("/api/v1/runs").1;
    assert_eq!(runs["runs"][0]["status"], "succeeded", "{runs}");

    // The snapshot it made is listed, and the filter narrows the list.
    b.click("#nav-snapshots");
    b.wait_text("main", "Snapshots: 1");
    let id = env.json(&["snapshots"])[0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    b.wait_text("main table", &id[..8]);
    b.type_into("#snap-filter", "no-such-tag");
    b.wait_text("main", "No snapshot matches");
    b.screenshot(&shots.join("en-snapshots.png"));

    // A second run: the repository's growth has two points, drawn on the overview.
    run_files(&admin);
    let start = std::time::Instant::now();
    while admin.get("/api/v1/repositories/default/growth").1["samples"]
        .as_array()
        .unwrap()
        .len()
        < 2
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no second size sample"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    b.click("#nav-overview");
    b.find("svg.growth");
    let alt = b
        .run_async("arguments[0](document.querySelector('svg.growth').getAttribute('aria-label'))");
    assert!(
        alt.as_str().unwrap().starts_with("Repository size: "),
        "{alt}"
    );
    // The protected source: the data folder, by job `files`, its newest snapshot a
    // link into it.
    let data = env.path("data");
    b.wait_text("main table", data.to_str().unwrap());
    let href = b.run_async("arguments[0](document.querySelector('a.newest').getAttribute('href'))");
    assert!(href.as_str().unwrap().contains(&newest_id(&env)), "{href}");
    b.screenshot(&shots.join("en-overview.png"));

    // French, remembered across a reload; each page in French; then English again.
    b.click("#nav-settings");
    b.screenshot(&shots.join("en-settings.png"));
    b.click("#language option[value='fr']");
    b.wait_text("#nav-overview", "Vue d’ensemble");
    b.refresh();
    b.wait_text("#nav-overview", "Vue d’ensemble");
    for (page, file) in [
        ("overview", "fr-overview.png"),
        ("jobs", "fr-jobs.png"),
        ("runs", "fr-runs.png"),
        ("snapshots", "fr-snapshots.png"),
        ("settings", "fr-settings.png"),
    ] {
        b.click(&format!("#nav-{page}"));
        b.find("main h1");
        std::thread::sleep(Duration::from_millis(300));
        b.screenshot(&shots.join(file));
    }
    b.wait_text("main", "Langue");
    b.click("#language option[value='en']");
    b.wait_text("#nav-overview", "Overview");
    for (page, file) in [("jobs", "en-jobs.png"), ("runs", "en-runs.png")] {
        b.click(&format!("#nav-{page}"));
        b.find("main h1");
        std::thread::sleep(Duration::from_millis(300));
        b.screenshot(&shots.join(file));
    }

    // A change the page did not sign (no CSRF token) is refused by the API.
    let forged = b.run_async(
        "const done = arguments[0]; fetch('/api/v1/jobs/files/run', {method: 'POST', \
         headers: {'Content-Type': 'application/json'}, body: '{}', credentials: 'same-origin'})\
         .then(r => r.json().then(v => done([r.status, v.error && v.error.code])));",
    );
    assert_eq!(forged, json!([403, "csrf"]));

    // A read-only token sees no change button, and the API refuses its change anyway.
    b.click("#logout");
    b.find("#login");
    b.type_into("#token", &ro);
    b.click("#login-submit");
    b.find("#read-only");
    b.click("#nav-jobs");
    b.wait_text("main h1", "Jobs");
    b.wait_text("main table", "files");
    assert_eq!(
        b.count("button.run-now"),
        0,
        "a read-only session sees run buttons"
    );
    let refused = b.run_async(
        "const done = arguments[0]; fetch('/api/v1/session').then(r => r.json()).then(s => \
         fetch('/api/v1/jobs/files/run', {method: 'POST', headers: {'Content-Type': \
         'application/json', 'X-CSRF-Token': s.csrf}, body: '{}'})).then(r => r.json().then(\
         v => done([r.status, v.error && v.error.code])));",
    );
    assert_eq!(refused, json!([403, "read_only"]));

    // A session that ends (here: its token revoked) goes back to the login page.
    let out = env.run(&[
        "serve",
        "--config",
        config.to_str().unwrap(),
        "token",
        "revoke",
        "viewer",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The next call the page makes finds out: the one of a navigation, or the task
    // bar's refresh every 5 s, whichever comes first (so the navigation is by address,
    // not a click on a link the logout may already have taken away).
    b.run_async("location.hash = '#/runs'; arguments[0](true)");
    b.find("#login");
    b.wait_text("#login-error", "log in again");
}

/// Runs job `files` through the API and waits for its success.
fn run_files(admin: &Api<'_>) {
    let (s, v) = admin.post("/api/v1/jobs/files/run", &json!({}));
    assert_eq!(s, 202, "{v}");
    wait_run(admin, &v["run"], &["succeeded"]);
}

/// The checksum the page computes of a download (`h = h * 31 + byte`, 32 bits).
fn page_checksum(bytes: &[u8]) -> u32 {
    bytes
        .iter()
        .fold(0u32, |h, &b| h.wrapping_mul(31).wrapping_add(u32::from(b)))
}

#[test]
fn in_the_browser_snapshots_are_browsed_downloaded_restored_compared_forgotten_and_pruned() {
    if !browser_ready("the dashboard's snapshot pages in a browser") {
        return;
    }
    let env = Env::new();
    let Site { rw, d, .. } = site(&env);
    let admin = d.api(&rw);
    let data = env.path("data");
    // Two snapshots: f1 rewritten and f9 added between them.
    run_files(&admin);
    write_random(&data.join("f1"), 99, 60_000);
    write_random(&data.join("f9"), 98, 1_000);
    run_files(&admin);
    let mut snaps: Vec<Value> = env.json(&["snapshots"]).as_array().unwrap().clone();
    snaps.sort_by_key(|s| s["time"].as_str().unwrap().to_owned());
    let old = snaps[0]["id"].as_str().unwrap().to_owned();
    let new = snaps[1]["id"].as_str().unwrap().to_owned();
    let repo = admin.get("/api/v1/repositories").1["repositories"][0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let shots = screenshots();
    let b = Browser::start(1280, 900);
    b.go(&format!("{}/", d.url));
    b.type_into("#token", &rw);
    b.click("#login-submit");
    b.find("#who-name");

    // The list: the free-text filter narrows it to one.
    b.click("#nav-snapshots");
    b.wait_text("main", "Snapshots: 2");
    b.type_into("#snap-filter", &old[..10]);
    b.wait_text("#snap-shown", "Showing 1 of 1");
    b.type_into("#snap-filter", "");
    b.wait_text("#snap-shown", "Showing 2 of 2");

    // Comparing the two names what changed, and only that.
    b.click(&format!("input.pick[value='{old}']"));
    b.click(&format!("input.pick[value='{new}']"));
    b.click("#snap-compare");
    b.wait_text(
        "main h1",
        &format!("From snapshot {} to {}", &old[..8], &new[..8]),
    );
    let summary = b.text("#diff-summary");
    assert!(
        summary.contains("added: 1") && summary.contains("modified: 1"),
        "{summary}"
    );
    let changes = b.text("main table");
    assert!(
        changes.contains("/data/f9")
            && changes.contains("/data/f1")
            && !changes.contains("/data/f2"),
        "{changes}"
    );
    b.screenshot(&shots.join("en-diff.png"));

    // The browser: into the data folder from its parent, modes and a download whose
    // bytes are the file's.
    let parent = data.parent().unwrap().to_str().unwrap();
    b.go(&format!(
        "{}/#/browse/{repo}/{new}/{}",
        d.url,
        parent.replace('/', "%2F")
    ));
    b.click("a.dir[href$='%2Fdata']");
    b.wait_text("nav.crumbs", "data");
    b.wait_text("main table", "f9");
    assert!(b.text("main table").contains("-rw-"), "{}", b.page_text());
    b.screenshot(&shots.join("en-browse.png"));
    let got = b.run_async(
        "const done = arguments[0]; const a = [...document.querySelectorAll('a.download')]\
         .find(a => a.download === 'f1'); fetch(a.href).then(r => r.arrayBuffer()).then(buf => {\
         const v = new Uint8Array(buf); let h = 0; for (const x of v) h = (Math.imul(h, 31) + x) >>> 0;\
         done([v.length, h]); });",
    );
    let f1 = std::fs::read(data.join("f1")).unwrap();
    assert_eq!(got, json!([f1.len(), page_checksum(&f1)]));

    // A restore of f1: into a folder that holds files, the preview names the conflict and
    // the restore stays disabled; into a new one, it restores the same bytes.
    b.click("input.pick[value$='/f1']");
    b.type_into("#restore-target", data.to_str().unwrap());
    b.click("#restore-preview");
    b.wait_text("#restore-conflict", "not empty");
    assert_eq!(b.count("#restore-go:disabled"), 1);
    let target = env.path("restored");
    b.type_into("#restore-target", target.to_str().unwrap());
    b.click("#restore-preview");
    b.wait_text("#restore-result", "No conflict");
    assert!(
        b.text("#restore-result").contains("1 files"),
        "{}",
        b.page_text()
    );
    b.click("#restore-go");
    b.wait_text("#restore-done", "Restored 1 files");
    assert_eq!(std::fs::read(under(&target, &data).join("f1")).unwrap(), f1);
    assert!(
        !under(&target, &data).join("f2").exists(),
        "restored more than f1"
    );

    // Forget the older snapshot: a dry run first, which removes nothing.
    b.click("#nav-snapshots");
    b.wait_text("main", "Snapshots: 2");
    b.click(&format!("input.pick[value='{old}']"));
    b.click("#snap-forget");
    b.wait_text("#forget-preview", "would remove these 1 snapshots");
    assert!(b.text("#forget-preview").contains(&old[..8]));
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 2);
    b.click("#forget-confirm");
    b.wait_text("#forget-preview", "1 snapshots forgotten");
    let left = env.json(&["snapshots"]);
    assert_eq!(left.as_array().unwrap().len(), 1, "{left}");
    assert_eq!(left[0]["id"], new.as_str());
    b.wait_text("main", "Snapshots: 1");

    // Health: a stale lock is marked and removed; a check passes; the prune's preview
    // deletes nothing, then the prune frees the forgotten data.
    let lock_name = "0".repeat(64);
    let an_hour_ago = chrono::Utc::now() - chrono::Duration::hours(1);
    std::fs::write(
        env.repo.join("locks").join(&lock_name),
        json!({ "version": 1, "kind": "exclusive", "operation": "prune", "host": "elsewhere",
                "user": "x", "pid": 1, "created": an_hour_ago, "refreshed": an_hour_ago })
        .to_string(),
    )
    .unwrap();
    b.click("#nav-health");
    b.wait_text("main .locks", "stale");
    b.wait_text(".last-check", "Never checked");
    b.screenshot(&shots.join("en-health.png"));
    b.click("button.unlock");
    b.wait_text("main .result", "1 stale locks removed");
    assert!(!env.repo.join("locks").join(&lock_name).exists());
    b.wait_text("main .locks", "No lock");
    b.click("button.check");
    b.wait_text(".check-result", "no problem");
    // The check is kept: the page says so, and the API says who asked and what was
    // read.
    b.wait_text(".last-check", "by admin");
    let checks = admin.get("/api/v1/repositories/default/checks").1;
    assert_eq!(checks["checks"][0]["ok"], true, "{checks}");
    assert_eq!(checks["checks"][0]["how"], "metadata", "{checks}");
    assert_eq!(checks["checks"][0]["problems"], 0, "{checks}");
    assert_eq!(admin.get("/api/v1/repositories/nosuch/checks").0, 404);
    let packs = env.packs().len();
    b.click("button.prune-preview");
    b.wait_text(".prune-plan", "Would free");
    assert_eq!(
        env.packs().len(),
        packs,
        "the preview changed the repository"
    );
    b.click("button.prune-go");
    b.wait_text(".prune-done", "Pruned");

    // The same pages in French.
    b.click("#nav-settings");
    b.select("#language", "fr");
    b.wait_text("main h1", "Réglages");
    b.go(&format!(
        "{}/#/browse/{repo}/{new}/{}",
        d.url,
        data.to_str().unwrap().replace('/', "%2F")
    ));
    b.wait_text("main table", "f9");
    b.screenshot(&shots.join("fr-browse.png"));
    b.click("#nav-health");
    b.wait_text(".last-check", "par admin");
    b.screenshot(&shots.join("fr-health.png"));
    b.click("#nav-snapshots");
    b.wait_text("main", "Instantanés");
    b.screenshot(&shots.join("fr-snapshots-list.png"));
    env.ok(&["check", "--read-data"]);
    let out = env.ok(&[
        "restore",
        "latest",
        "--target",
        env.path("after").to_str().unwrap(),
    ]);
    drop(out);
    assert_eq!(
        std::fs::read(under(&env.path("after"), &data).join("f9")).unwrap(),
        std::fs::read(data.join("f9")).unwrap()
    );
}

#[test]
fn the_calls_the_snapshot_and_health_pages_make_refuse_bad_input_and_read_only_tokens() {
    let env = Env::new();
    let Site { rw, ro, d, .. } = site(&env);
    let (admin, viewer) = (d.api(&rw), d.api(&ro));
    run_files(&admin);
    let repo = admin.get("/api/v1/repositories").1["repositories"][0]["name"]
        .as_str()
        .unwrap()
        .to_owned();
    let base = format!("/api/v1/repositories/{repo}");

    // A diff of a snapshot with itself is empty; unknown snapshots and missing or
    // unknown parameters are refused with a message.
    let (s, v) = admin.get(&format!("{base}/diff?from=latest&to=latest"));
    assert_eq!((s, &v["total"]), (200, &json!(0)), "{v}");
    for (query, want) in [
        ("from=latest&to=ffffffff", 404),
        ("from=latest", 400),
        ("from=latest&to=latest&limit=-1", 400),
        ("from=latest&to=latest&colour=red", 400),
    ] {
        let (s, v) = admin.get(&format!("{base}/diff?{query}"));
        assert_eq!(s, want, "{query}: {v}");
        assert!(v["error"]["message"].is_string(), "{query}: {v}");
    }
    let (s, _) = admin.get("/api/v1/repositories/nope/diff?from=latest&to=latest");
    assert_eq!(s, 404);

    // A restore's dry run writes nothing, says what it would restore and names a
    // conflict; paths that climb out are refused as before.
    let data = env.path("data");
    let target = env.path("never-written");
    let (s, v) = admin.post(
        &format!("{base}/snapshots/latest/restore"),
        &json!({ "target": target, "dry_run": true }),
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["preview"]["files"], 4, "{v}");
    assert!(v["preview"]["conflict"].is_null(), "{v}");
    assert!(!target.exists(), "a dry run made the target");
    let (s, v) = admin.post(
        &format!("{base}/snapshots/latest/restore"),
        &json!({ "target": data, "dry_run": true }),
    );
    assert_eq!(s, 200, "{v}");
    assert!(
        v["preview"]["conflict"]
            .as_str()
            .unwrap()
            .contains("not empty"),
        "{v}"
    );
    assert_eq!(v["preview"]["existing"].as_array().unwrap().len(), 4, "{v}");
    for body in [
        json!({ "target": "relative", "dry_run": true }),
        json!({ "target": target, "include": ["/../etc"], "dry_run": true }),
        json!({ "target": target, "dry_run": "yes" }),
    ] {
        let (s, v) = admin.post(&format!("{base}/snapshots/latest/restore"), &body);
        assert!(s == 400 || s == 422, "{body}: {s} {v}");
    }
    let (s, v) = admin.post(
        &format!("{base}/snapshots/latest/restore"),
        &json!({ "target": target, "include": ["/no/such/path"], "dry_run": true }),
    );
    assert_eq!(s, 404, "{v}");

    // Unlock: refused to a read-only token; a live lock stays unless `all`.
    let (s, v) = viewer.post(&format!("{base}/unlock"), &json!({}));
    assert_eq!((s, &v["error"]["code"]), (403, &json!("read_only")), "{v}");
    let now = chrono::Utc::now();
    let lock = env.repo.join("locks").join("1".repeat(64));
    std::fs::write(
        &lock,
        json!({ "version": 1, "kind": "shared", "operation": "backup", "host": "elsewhere",
                "user": "x", "pid": 1, "created": now, "refreshed": now })
        .to_string(),
    )
    .unwrap();
    let (s, v) = admin.post(&format!("{base}/unlock"), &json!({}));
    assert_eq!((s, &v["removed"]), (200, &json!([])), "{v}");
    assert!(lock.exists());
    let (s, v) = admin.post(&format!("{base}/unlock"), &json!({ "all": 1 }));
    assert!(s == 400 || s == 422, "{v}");
    let (s, v) = admin.post(&format!("{base}/unlock"), &json!({ "all": true }));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["removed"].as_array().unwrap().len(), 1, "{v}");
    assert!(!lock.exists());
}

#[test]
fn the_job_forms_calls_preview_schedules_dry_run_jobs_and_list_what_a_host_has() {
    let env = Env::new();
    let data = data_dir(&env);
    let config = serve_config(
        &env,
        "[notifications.hook]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/secret-path\"\n",
    );
    let rw = token(&env, &config, "admin", false);
    let ro = token(&env, &config, "viewer", true);
    let d = Daemon::start_with(
        &env,
        &config,
        &[("PGHOST", "/run/nowhere-sock"), ("PGPORT", "5499")],
    );
    let (admin, viewer) = (d.api(&rw), d.api(&ro));

    // The next five runs of a schedule, stored nowhere: 03:15 UTC on five days running.
    let (s, v) = viewer.get("/api/v1/schedules/preview?when=daily%2003:15&count=5");
    assert_eq!(s, 200, "{v}");
    let next: Vec<chrono::DateTime<chrono::Utc>> =
        serde_json::from_value(v["next"].clone()).unwrap();
    assert_eq!(next.len(), 5, "{v}");
    for (a, b) in next.iter().zip(next.iter().skip(1)) {
        assert_eq!(*b - *a, chrono::Duration::days(1), "{v}");
    }
    assert!(
        next.iter()
            .all(|t| t.format("%H:%M:%S").to_string() == "03:15:00"),
        "{v}"
    );
    let (s, v) = viewer
        .get("/api/v1/schedules/preview?when=weekly%20sun%2003:00&timezone=Europe/Paris&count=2");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["next"].as_array().unwrap().len(), 2);
    // Bad expressions, zones and queries: the error says what and gives an example.
    for (q, want) in [
        ("when=daily%2027:00", "for example"),
        ("when=floppy", "for example"),
        ("when=daily%2002:00&timezone=Mars/Olympus", "time zone"),
        ("when=daily&count=lots", ""),
        ("count=3", ""),
    ] {
        let (s, v) = viewer.get(&format!("/api/v1/schedules/preview?{q}"));
        assert!(s == 400 || s == 422, "{q}: {s} {v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains(want), "{q}: {m}");
    }
    assert_eq!(admin.get("/api/v1/schedules").1["schedules"], json!([]));

    // A dry run checks the definition, names the field of what is wrong, and stores
    // nothing; with snapshots of the job, it names what the retention would forget.
    let job = |retention: Value, repository: &str, notify: Value| {
        json!({ "name": "nightly", "repository": repository, "notify": notify,
                "source": [{ "type": "paths", "paths": [data] }], "retention": retention })
    };
    for (body, want) in [
        (
            job(json!({ "prune": true }), "default", json!([])),
            "retention: no keep rule",
        ),
        (
            job(json!({ "keep_within": "soon" }), "default", json!([])),
            "retention.keep_within",
        ),
        (
            job(json!({ "keep_daily": 1 }), "elsewhere", json!([])),
            "repository: no repository \"elsewhere\"",
        ),
        (
            job(json!({ "keep_daily": 1 }), "default", json!(["pager"])),
            "notify: no notification target \"pager\"",
        ),
        (
            json!({ "name": "a b", "source": [{ "type": "paths", "paths": [data] }] }),
            "name:",
        ),
        (
            json!({ "name": "x", "source": [{ "type": "paths", "paths": ["rel"] }] }),
            "source 1: paths:",
        ),
    ] {
        let (s, v) = admin.post("/api/v1/jobs?dry_run=true", &body);
        assert_eq!(s, 422, "{body}: {v}");
        let m = v["error"]["message"].as_str().unwrap();
        assert!(m.contains(want), "{body}: {m}");
    }
    let good = job(json!({ "keep_last": 1 }), "default", json!(["hook"]));
    let (s, v) = admin.post("/api/v1/jobs?dry_run=true", &good);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["plan"]["would_forget"], json!([]), "{v}");
    assert_eq!(
        admin.get("/api/v1/jobs/nightly").0,
        404,
        "a dry run stored the job"
    );
    let (s, _) = viewer.post("/api/v1/jobs?dry_run=true", &good);
    assert_eq!(s, 403);
    let mut stored = good.clone();
    stored.as_object_mut().unwrap().remove("retention");
    assert_eq!(admin.post("/api/v1/jobs", &stored).0, 201);
    for _ in 0..2 {
        let (s, v) = admin.post("/api/v1/jobs/nightly/run", &json!({}));
        assert_eq!(s, 202, "{v}");
        wait_run(&admin, &v["run"], &["succeeded"]);
    }
    // Two snapshots of the job: keeping the last one would forget the older, and only
    // that (the dry run forgets nothing).
    let mut snaps: Vec<Value> = env.json(&["snapshots"]).as_array().unwrap().clone();
    snaps.sort_by_key(|s| s["time"].as_str().unwrap().to_owned());
    assert_eq!(snaps.len(), 2);
    let (s, v) = admin.post("/api/v1/jobs?dry_run=true", &good);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["plan"]["would_forget"], json!([snaps[0]["id"]]), "{v}");
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 2);
    let audit = admin.get("/api/v1/audit").1;
    assert!(
        audit["audit"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "jobs.create.dry_run"),
        "{audit}"
    );

    // What the host has: the daemon's PG* server (its socket named, no password); the
    // notification targets by name and kind, never their URL.
    let (s, v) = viewer.get("/api/v1/databases");
    assert_eq!(s, 200, "{v}");
    let pg = v["databases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["engine"] == "postgresql")
        .cloned();
    let pg = pg.unwrap_or_else(|| panic!("{v}"));
    assert_eq!(pg["connection"], "");
    assert!(
        pg["location"]
            .as_str()
            .unwrap()
            .contains("PGHOST=/run/nowhere-sock"),
        "{v}"
    );
    let (s, v) = viewer.get("/api/v1/notifications");
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        v["notifications"],
        json!([{ "name": "hook", "kind": "webhook", "on": ["failure", "missed", "verification-failure"] }])
    );
    assert!(!v.to_string().contains("secret-path"), "{v}");

    // A session's connection: refused to a read-only token, unknown ids named.
    let (s, v) = viewer.post("/api/v1/recovery/nosuch/connection", &json!({}));
    assert_eq!((s, &v["error"]["code"]), (403, &json!("read_only")), "{v}");
    let (s, v) = admin.post("/api/v1/recovery/nosuch/connection", &json!({}));
    assert_eq!(s, 404, "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("nosuch"),
        "{v}"
    );
}

#[test]
fn in_the_browser_a_job_made_in_the_form_backs_up_a_database_that_recovers_from_the_page() {
    use crate::database::{pg_ready, psql, StopAll, PG_IMAGE};
    use crate::dbserver::{postgres_cluster, require_docker};
    if !browser_ready("the job form and recovery in a browser")
        || !pg_ready("a database recovered from the dashboard")
        || !require_docker(PG_IMAGE)
    {
        return;
    }
    let env = Env::new();
    let _stop = StopAll(&env);
    let data = data_dir(&env);
    let pg = postgres_cluster(&env, "shop");
    pg.sql("CREATE TABLE orders (id int PRIMARY KEY, total numeric); INSERT INTO orders SELECT g, g * 1.5 FROM generate_series(1, 500) g");
    let config = serve_config(&env, "");
    let rw = token(&env, &config, "admin", false);
    add_user(&env, &config, "alice", "correct horse battery", false);
    let port = pg.port.to_string();
    let d = Daemon::start_with(
        &env,
        &config,
        &[
            ("PGHOST", pg.sock.to_str().unwrap()),
            ("PGPORT", &port),
            ("PGUSER", "postgres"),
        ],
    );
    let admin = d.api(&rw);
    let shots = screenshots();
    let b = Browser::start(1280, 1400);
    b.go(&format!("{}/", d.url));
    log_in(&b, "alice", "correct horse battery");
    b.find("#who-name");

    // The form lists the daemon's PostgreSQL server to tick.
    b.click("#nav-jobs");
    b.click("#new-job");
    b.wait_text("main h1", "New job");
    b.wait_text("#db-choices", "PostgreSQL");
    b.type_into("#job-name", "shop");
    b.click("#db-postgresql");
    b.type_into("#job-paths", data.to_str().unwrap());

    // The schedule's next five runs appear as it is typed, each at the typed time.
    b.select("#sched-kind", "daily");
    b.type_into("#sched-time", "03:15");
    let times = |b: &Browser| -> Vec<String> {
        let v = b.run_async(
            "arguments[0]([...document.querySelectorAll('#sched-preview time')].map(t => t.getAttribute('datetime')))",
        );
        serde_json::from_value(v).unwrap()
    };
    let start = std::time::Instant::now();
    while !(times(&b).len() == 5 && times(&b).iter().all(|t| t.contains("T03:15:00"))) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "preview: {:?}; {}",
            times(&b),
            b.page_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    b.screenshot(&shots.join("en-job-form.png"));

    // Bad input: an expression that means nothing and a negative count are named
    // beside their fields, and what was typed stays.
    b.select("#sched-kind", "cron");
    b.type_into("#sched-cron", "61 25 * * *");
    b.wait_text("#err-schedule", "for example");
    assert_eq!(b.count("#sched-preview li"), 0);
    b.type_into("#keep-daily", "-3");
    b.click("#job-save");
    b.wait_text("#err-retention", "keep_daily");
    b.wait_text("#err-schedule", "for example");
    assert_eq!(b.value("#sched-cron"), "61 25 * * *");
    assert_eq!(b.value("#job-name"), "shop");
    assert_eq!(b.value("#job-paths"), data.to_str().unwrap());
    assert_eq!(
        admin.get("/api/v1/jobs/shop").0,
        404,
        "saved with bad fields"
    );
    b.select("#sched-kind", "daily");
    b.wait_text("#sched-preview", ":");
    b.type_into("#keep-daily", "7");
    // A relative path: the API's error, beside the paths.
    b.type_into("#job-paths", "relative/dir");
    b.click("#job-save");
    b.wait_text("#err-source", "paths");
    assert_eq!(b.value("#job-paths"), "relative/dir");
    assert_eq!(
        admin.get("/api/v1/jobs/shop").0,
        404,
        "saved with a relative path"
    );
    b.type_into("#job-paths", data.to_str().unwrap());
    b.click("#retention-preview");
    b.wait_text("#would-forget", "would forget no snapshot");
    b.click("#job-save");
    b.wait_text("main h1", "Job shop");
    b.wait_text("main", "daily 03:15");
    b.screenshot(&shots.join("en-job.png"));
    // Its schedule disabled and enabled again from its page.
    b.click("button.toggle-schedule");
    b.wait_text("main table", "disabled");
    assert_eq!(
        admin.get("/api/v1/schedules").1["schedules"][0]["enabled"],
        false
    );
    b.click("button.toggle-schedule");
    b.wait_text("main table", "enabled");
    assert_eq!(
        admin.get("/api/v1/schedules").1["schedules"][0]["enabled"],
        true
    );
    let (_, sched) = admin.get("/api/v1/schedules");
    assert_eq!(sched["schedules"][0]["when"], "daily 03:15", "{sched}");
    let (_, job) = admin.get("/api/v1/jobs/shop");
    let kinds: Vec<&str> = job["definition"]["source"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds, ["postgres", "paths"], "{job}");
    assert_eq!(job["definition"]["retention"]["keep_daily"], 7, "{job}");

    // Run it from its page: the run reaches 100 %.
    b.click("#job-run-now");
    b.wait_text_within("#run-progress", "succeeded", Duration::from_secs(120));
    b.wait_text("#run-progress", "100");

    // The database snapshot recovers from the snapshots page: its server answers with
    // the rows that were backed up.
    b.click("#nav-snapshots");
    b.click("a.recover");
    b.wait_text("main h1", "Instant recovery of postgresql");
    b.screenshot(&shots.join("en-recover.png"));
    b.click("#rec-start");
    b.wait_text_within("#rec-status", "Up after", Duration::from_secs(180));
    b.screenshot(&shots.join("en-recovered.png"));
    let conn = b.value("#rec-connection");
    assert!(conn.starts_with("postgresql://"), "{conn}");
    let q = "SELECT count(*), sum(total) FROM orders";
    assert_eq!(psql(&conn, q).unwrap(), "500|187875.0", "{}", d.log());

    // The task bar shows the session on every page; its copy button gets the same
    // connection string; its stop button ends the session.
    b.click("#nav-overview");
    b.wait_text("#taskbar", "postgresql");
    assert!(
        !b.text("#taskbar")
            .contains(conn.split('@').next().unwrap().rsplit(':').next().unwrap()),
        "the bar shows the password"
    );
    b.click("#taskbar button.copy-connection");
    b.wait_text("#taskbar", "Copied");
    assert_eq!(b.value("#taskbar input.connection"), conn);
    b.screenshot(&shots.join("en-taskbar.png"));
    b.click("#taskbar button.stop");
    let start = std::time::Instant::now();
    while !admin.get("/api/v1/recovery").1["sessions"]
        .as_array()
        .unwrap()
        .is_empty()
    {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the session is still listed"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(psql(&conn, q).is_err(), "the stopped server still answers");
    let audit = admin.get("/api/v1/audit").1;
    assert!(audit.to_string().contains("recovery.connection"), "{audit}");

    // In French: the form and the job page.
    b.click("#nav-settings");
    b.select("#language", "fr");
    b.wait_text("main h1", "Réglages");
    b.go(&format!("{}/#/job-form/shop", d.url));
    b.wait_text("main h1", "Tâche shop : modifier");
    assert_eq!(b.value("#sched-time"), "03:15");
    assert_eq!(b.value("#keep-daily"), "7");
    let start = std::time::Instant::now();
    while times(&b).len() != 5 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            b.page_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    b.screenshot(&shots.join("fr-job-form.png"));
    // A change saved: the schedule is replaced, the definition kept otherwise.
    b.type_into("#sched-time", "04:30");
    b.click("#job-save");
    b.wait_text("main h1", "Tâche shop");
    b.wait_text("main", "daily 04:30");
    let (_, sched) = admin.get("/api/v1/schedules");
    let whens: Vec<&str> = sched["schedules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["when"].as_str().unwrap())
        .collect();
    assert_eq!(whens, ["daily 04:30"], "{sched}");
    assert_eq!(
        admin.get("/api/v1/jobs/shop").1["definition"]["retention"]["keep_daily"],
        7
    );
    b.go(&format!("{}/#/snapshots", d.url));
    b.click("a.recover");
    b.wait_text("main h1", "Restauration instantanée de postgresql");
    b.screenshot(&shots.join("fr-recover.png"));
    // Deleted after a confirmation; its snapshots stay.
    b.go(&format!("{}/#/jobs/shop", d.url));
    b.click("#delete-job");
    b.wait_text("#job-msg", "Supprimer la tâche shop");
    assert_eq!(
        admin.get("/api/v1/jobs/shop").0,
        200,
        "deleted before the confirmation"
    );
    b.click("#delete-job-confirm");
    b.wait_text("main h1", "Tâches");
    assert_eq!(admin.get("/api/v1/jobs/shop").0, 404);
    assert_eq!(admin.get("/api/v1/schedules").1["schedules"], json!([]));
    assert_eq!(env.json(&["snapshots"]).as_array().unwrap().len(), 2);
}

/// A port of 127.0.0.1 nothing listens on.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn in_the_browser_settings_create_and_revoke_tokens_and_test_notification_targets() {
    use crate::serve::Receiver;
    let hook = Receiver::start();
    let env = Env::new();
    let config = serve_config(
        &env,
        &format!(
            "[notifications.hook]\ntype = \"webhook\"\nurl = \"{}\"\n[notifications.dead]\ntype = \"webhook\"\nurl = \"http://127.0.0.1:{}/gone\"\n",
            hook.url,
            closed_port()
        ),
    );
    let rw = token(&env, &config, "admin", false);
    let ro = token(&env, &config, "viewer", true);
    let d = Daemon::start(&env, &config);
    let (admin, viewer) = (d.api(&rw), d.api(&ro));

    // Over HTTP: the listing has no secret; a read-only token may not create; names
    // are checked; a created token works until it is revoked.
    let (s, v) = viewer.get("/api/v1/tokens");
    assert_eq!(s, 200, "{v}");
    let names: Vec<&str> = v["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["admin", "viewer"]);
    assert!(
        !v.to_string().contains(&rw[6..]) && !v.to_string().contains("hash"),
        "{v}"
    );
    let (s, v) = viewer.post("/api/v1/tokens", &json!({ "name": "sneaky" }));
    assert_eq!((s, &v["error"]["code"]), (403, &json!("read_only")), "{v}");
    for (body, want) in [
        (json!({ "name": "a b" }), 422),
        (json!({ "name": "admin" }), 409),
        (json!({ "name": "x", "read_only": "yes" }), 422),
        (json!({}), 422),
    ] {
        let (s, v) = admin.post("/api/v1/tokens", &body);
        assert_eq!(s, want, "{body}: {v}");
    }
    let (s, v) = admin.post(
        "/api/v1/tokens",
        &json!({ "name": "ci", "read_only": true }),
    );
    assert_eq!(s, 201, "{v}");
    let ci = v["token"].as_str().unwrap().to_owned();
    assert_eq!(d.api(&ci).get("/api/v1/session").1["read_only"], true);
    assert_eq!(admin.call("DELETE", "/api/v1/tokens/ci", None).0, 204);
    assert_eq!(d.api(&ci).get("/api/v1/session").0, 401);
    assert_eq!(admin.call("DELETE", "/api/v1/tokens/ci", None).0, 404);

    // A test notification: delivered to a listening webhook (event `test`, sent by
    // whom); a target that does not answer says why; an unknown one is named.
    let (s, v) = admin.post("/api/v1/notifications/hook/test", &json!({}));
    assert_eq!((s, &v["delivered"]), (200, &json!(true)), "{v}");
    let body: Value = serde_json::from_str(&hook.got.lock().unwrap()[0].1).unwrap();
    assert_eq!(
        (&body["event"], &body["by"]),
        (&json!("test"), &json!("admin")),
        "{body}"
    );
    let (s, v) = admin.post("/api/v1/notifications/dead/test", &json!({}));
    assert_eq!((s, &v["error"]["code"]), (502, &json!("delivery")), "{v}");
    assert!(
        v["error"]["message"].as_str().unwrap().contains("/gone"),
        "{v}"
    );
    assert_eq!(
        admin
            .post("/api/v1/notifications/nosuch/test", &json!({}))
            .0,
        404
    );
    assert_eq!(
        viewer.post("/api/v1/notifications/hook/test", &json!({})).0,
        403
    );
    assert_eq!(hook.got.lock().unwrap().len(), 1);

    if !browser_ready("the settings page in a browser") {
        return;
    }
    let shots = screenshots();
    let b = Browser::start(1280, 900);
    b.go(&format!("{}/", d.url));
    b.type_into("#token", &rw);
    b.click("#login-submit");
    b.find("#who-name");
    b.click("#nav-settings");
    b.wait_text("#tokens", "viewer");
    // Create: the secret shows once, and it is a working token.
    b.type_into("#token-name", "backup-host");
    b.click("#token-create");
    b.find("#token-secret");
    let secret = b.value("#token-secret");
    assert_eq!(
        d.api(&secret).get("/api/v1/session").1["name"],
        "backup-host"
    );
    b.wait_text("#tokens", "backup-host");
    // A bad name: the API's error, and the name typed stays.
    b.type_into("#token-name", "no spaces");
    b.click("#token-create");
    b.wait_text("#token-msg", "token name");
    assert_eq!(b.value("#token-name"), "no spaces");
    // The test buttons.
    b.click("button.send-test[data-target='hook']");
    b.wait_text("main", "Delivered");
    b.click("button.send-test[data-target='dead']");
    b.wait_text("main", "/gone");
    assert_eq!(hook.got.lock().unwrap().len(), 2);
    b.screenshot(&shots.join("en-settings-tokens.png"));
    // Revoke: gone from the list, and refused by the API.
    b.click("button.revoke[data-token='backup-host']");
    let start = std::time::Instant::now();
    while b.text("#tokens").contains("backup-host") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            b.page_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(d.api(&secret).get("/api/v1/session").0, 401);

    // On a phone-sized screen every page fits its width (tables scroll in their box).
    b.resize(390, 844);
    for page in [
        "overview",
        "jobs",
        "job-form",
        "runs",
        "snapshots",
        "health",
        "settings",
    ] {
        b.go(&format!("{}/#/{page}", d.url));
        b.find(&format!("main[data-ready='{page}']"));
        let widths =
            b.run_async("arguments[0]([document.documentElement.scrollWidth, window.innerWidth])");
        assert!(
            widths[0].as_u64().unwrap() <= widths[1].as_u64().unwrap(),
            "#/{page} overflows a phone's width: {widths}"
        );
        if page == "job-form" || page == "overview" {
            b.screenshot(&shots.join(format!("en-phone-{page}.png")));
        }
    }
    b.resize(1280, 900);

    // A read-only session sees the lists and no button that changes anything.
    b.click("#logout");
    b.type_into("#token", &ro);
    b.click("#login-submit");
    b.find("#read-only");
    b.click("#nav-settings");
    b.wait_text("#tokens", "viewer");
    assert_eq!(
        b.count("#token-form") + b.count("button.revoke") + b.count("button.send-test"),
        0
    );
    b.go(&format!("{}/#/job-form", d.url));
    b.wait_text("main", "read-only");
    b.click("#nav-jobs");
    b.wait_text("main h1", "Jobs");
    assert_eq!(b.count("#new-job"), 0);
}

#[test]
fn checks_and_the_growth_of_a_repository_are_kept_across_a_restart_of_the_daemon() {
    let env = Env::new();
    let Site {
        config, rw, mut d, ..
    } = site(&env);
    let admin = d.api(&rw);
    run_files(&admin);
    write_random(&env.path("data").join("f7"), 7, 300_000);
    run_files(&admin);
    let (s, v) = admin.post(
        "/api/v1/repositories/default/check",
        &json!({ "read_data": true }),
    );
    assert_eq!((s, &v["ok"]), (200, &json!(true)), "{v}");
    let start = std::time::Instant::now();
    let grown = loop {
        let g = admin.get("/api/v1/repositories/default/growth").1;
        if g["samples"].as_array().unwrap().len() >= 2 {
            break g;
        }
        assert!(start.elapsed() < Duration::from_secs(30), "{g}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let sizes: Vec<u64> = grown["samples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["size_bytes"].as_u64().unwrap())
        .collect();
    assert!(sizes[1] > sizes[0], "the second run added data: {grown}");
    d.stop();

    let d = Daemon::start(&env, &config);
    let admin = d.api(&rw);
    let (s, v) = admin.get("/api/v1/repositories/default/checks");
    assert_eq!(s, 200, "{v}");
    let c = &v["checks"][0];
    assert_eq!(
        (&c["ok"], &c["how"], &c["by"], &c["problems"]),
        (
            &json!(true),
            &json!("read-data"),
            &json!("admin"),
            &json!(0)
        ),
        "{v}"
    );
    assert_eq!(
        admin.get("/api/v1/repositories").1["repositories"][0]["last_check"]["how"],
        "read-data"
    );
    let metrics = ureq::get(&format!("{}/metrics", d.url))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        metrics.contains("cairn_repository_last_check_ok{repository=\"default\"} 1"),
        "{metrics}"
    );
    // What the repository protects: one source, by job `files`, its newest snapshot.
    let (s, v) = admin.get("/api/v1/repositories/default/sources");
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["sources"].as_array().unwrap().len(), 1, "{v}");
    let p = &v["sources"][0];
    assert_eq!(
        (&p["job"], &p["snapshots"], &p["kind"], &p["newest_id"]),
        (
            &json!("files"),
            &json!(2),
            &json!("tree"),
            &json!(newest_id(&env))
        ),
        "{v}"
    );
    assert_eq!(p["source"], env.path("data").to_str().unwrap(), "{v}");
    assert_eq!(admin.get("/api/v1/repositories/nosuch/sources").0, 404);
    let g = admin.get("/api/v1/repositories/default/growth?days=1").1;
    assert!(g["samples"].as_array().unwrap().len() >= 2, "{g}");
    for q in ["days=abc", "days=-1", "colour=red"] {
        let (s, v) = admin.get(&format!("/api/v1/repositories/default/growth?{q}"));
        assert_eq!(s, 400, "{q}: {v}");
    }
    assert_eq!(admin.get("/api/v1/repositories/nosuch/growth").0, 404);
}

/// The id of the repository's newest snapshot.
fn newest_id(env: &Env) -> String {
    let all = env.json(&["snapshots"]);
    let newest = all
        .as_array()
        .unwrap()
        .iter()
        .max_by_key(|s| s["time"].as_str().unwrap().to_owned())
        .unwrap();
    newest["id"].as_str().unwrap().to_owned()
}

#[test]
fn in_the_browser_a_snapshot_is_verified_from_its_row_and_the_health_page_shows_the_results() {
    if !browser_ready("verifications in the dashboard") {
        return;
    }
    let env = Env::new();
    let Site { rw, ro, d, .. } = site(&env);
    let admin = d.api(&rw);
    let shots = screenshots();
    let b = Browser::start(1280, 900);
    b.go(&format!("{}/", d.url));
    b.type_into("#token", &rw);
    b.click("#login-submit");
    b.find("#who-name");

    // The job form: "verify each backup" ticked and saved; the next run's snapshot is
    // verified after it.
    b.go(&format!("{}/#/job-form/files", d.url));
    b.click("#verify-after");
    b.click("#job-save");
    let start = std::time::Instant::now();
    while admin.get("/api/v1/jobs/files").1["definition"]["verify"]["after_backup"] != true {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "not saved: {}",
            b.page_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    run_files(&admin);
    let snap = newest_id(&env);
    let start = std::time::Instant::now();
    loop {
        let list = env.json(&["verify", "list"]);
        let after = list
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["trigger"] == "after_backup files" && v["snapshot"] == snap.as_str())
            .cloned();
        if let Some(v) = after.filter(|v| v["status"] != "running" && v["status"] != "pending") {
            assert_eq!(v["status"], "passed", "{v:#}");
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no verification after the backup: {list:#}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    // "Verify" on the snapshot's row: a sample restored and compared, every step shown.
    b.go(&format!("{}/#/snapshots", d.url));
    b.wait_text("main", "Snapshots: 1");
    let button = format!("button.verify[data-snapshot='{snap}']");
    b.click(&button);
    b.wait_text("#verify-result .verify-status", "passed");
    let steps = b.text("#verify-result table");
    assert!(
        steps.contains("restore") && steps.contains("compare") && steps.contains("cleanup"),
        "{steps}"
    );
    b.screenshot(&shots.join("en-verify-now.png"));

    // The packs gone: the same snapshot's verification fails, the step named.
    for pack in env.packs() {
        std::fs::remove_file(pack).unwrap();
    }
    b.go(&format!("{}/#/snapshots", d.url));
    b.wait_text("main", "Snapshots: 1");
    b.click(&button);
    b.wait_text("#verify-result .verify-status", "failed");
    assert_eq!(
        b.count("#verify-result .verification[data-status='failed']"),
        1
    );

    // The health page: both, the totals and the failed step.
    b.go(&format!("{}/#/health", d.url));
    b.wait_text(
        "section.verifications .verify-totals",
        "3 verifications: 2 passed, 1 failed; success rate 67 %",
    );
    let rows = b.text("section.verifications table");
    assert!(
        rows.contains(&snap[..8])
            && rows.contains("api")
            && rows.contains("after_backup files")
            && rows.contains("files files"),
        "{rows}"
    );
    b.screenshot(&shots.join("en-verifications.png"));

    // A read-only session sees the results and no button.
    b.go(&format!("{}/", d.url));
    b.click("#logout");
    b.type_into("#token", &ro);
    b.click("#login-submit");
    b.find("#who-name");
    b.go(&format!("{}/#/snapshots", d.url));
    b.wait_text("main", "Snapshots: 1");
    assert_eq!(b.count("button.verify"), 0);
    b.go(&format!("{}/#/health", d.url));
    b.wait_text("section.verifications .verify-totals", "3 verifications");
}
