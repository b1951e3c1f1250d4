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
    b.click("#nav-runs");
    b.find("#login");
    b.wait_text("#login-error", "log in again");
}
