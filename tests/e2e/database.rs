//! Databases: `repo backup --postgres/--mariadb` against real throwaway servers, and
//! `repo recover db` through the real mount, a kernel overlay and a real Docker engine
//! (or the host's binaries with `--runtime process`).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::dbserver::*;
use crate::support::*;

pub(crate) const PG_IMAGE: &str = "postgres:15";
const MARIADB_IMAGE: &str = "mariadb:10.11";

fn state_dir(env: &Env) -> PathBuf {
    env.path("state")
}

/// `repo` with a private session state directory.
fn rcmd(env: &Env) -> Command {
    let mut c = env.cmd();
    c.env("CAIRN_STATE_DIR", state_dir(env));
    c
}

/// Runs `repo ARGS` with the private state directory, asserts success; returns stdout.
fn rok(env: &Env, args: &[&str]) -> String {
    let out = rcmd(env).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "repo {args:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn rjson(env: &Env, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&rok(env, &a)).unwrap()
}

fn snapshot_count(env: &Env) -> usize {
    env.json(&["snapshots"]).as_array().unwrap().len()
}

/// A query over TCP with the session's credentials, as a client would connect.
pub(crate) fn psql(conn: &str, q: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .args([conn, "-X", "-At", "-c", q])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn mariadb_tcp(session: &Value, q: &str) -> Result<String, String> {
    let out = Command::new("mariadb")
        .arg("--no-defaults")
        .args(["-h", "127.0.0.1", "--protocol=tcp", "-N", "-B"])
        .arg(format!("-P{}", session["port"]))
        .arg(format!("-u{}", session["user"].as_str().unwrap()))
        .env("MYSQL_PWD", session["password"].as_str().unwrap())
        .args(["-e", q])
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8(out.stdout).unwrap().trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Containers labelled with this state directory (running or not).
fn session_containers(env: &Env) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-aq", "--filter"])
        .arg(format!("label=cairn.state={}", state_dir(env).display()))
        .output()
        .unwrap();
    String::from_utf8(out.stdout)
        .unwrap()
        .split_whitespace()
        .map(str::to_owned)
        .collect()
}

fn mounts_under(dir: &Path) -> Vec<String> {
    let want = dir.to_string_lossy().into_owned();
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4).map(str::to_owned))
        .filter(|mp| mp.starts_with(&want))
        .collect()
}

/// Nothing of any session is left: no container, no mount, no session directory, no
/// record.
fn assert_nothing_left(env: &Env) {
    assert!(session_containers(env).is_empty(), "containers left behind");
    assert!(
        mounts_under(&state_dir(env)).is_empty(),
        "mounts left behind: {:?}",
        mounts_under(&state_dir(env))
    );
    let sessions: Vec<_> = fs::read_dir(state_dir(env).join("sessions"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(sessions.is_empty(), "session files left: {sessions:?}");
    assert_eq!(rjson(env, &["recover", "list"]), serde_json::json!([]));
}

/// Stops every session whatever happens in the test.
pub(crate) struct StopAll<'a>(pub(crate) &'a Env);

impl Drop for StopAll<'_> {
    fn drop(&mut self) {
        let _ = rcmd(self.0).args(["recover", "cleanup"]).output();
        let _ = rcmd(self.0).args(["recover", "stop", "--all"]).output();
    }
}

pub(crate) fn pg_ready(what: &str) -> bool {
    require_root(what) && require_fuse(what) && require_postgres()
}

/// pgbench data in the source, backed up; returns (cluster, snapshot json, the
/// accounts' checksum at backup time).
fn pgbench_backup(env: &Env) -> (Postgres, Value, String) {
    let pg = postgres_cluster(env, "source");
    let out = as_postgres(&mut Command::new(format!("{PG_BIN}/pgbench")))
        .args(["-i", "-s", "2", "-q", "-h"])
        .arg(&pg.sock)
        .args(["-p", &pg.port.to_string(), "-U", "postgres", "postgres"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sum_q = "SELECT count(*), sum(abalance), md5(string_agg(aid::text || filler, ',' ORDER BY aid)) FROM pgbench_accounts";
    pg.sql("UPDATE pgbench_accounts SET abalance = aid % 97");
    let before = pg.sql(sum_q);
    let snap = env.json(&["backup", "--postgres", &pg.conn()])["snapshot"].clone();
    (pg, snap, before)
}

const SUM_Q: &str = "SELECT count(*), sum(abalance), md5(string_agg(aid::text || filler, ',' ORDER BY aid)) FROM pgbench_accounts";

#[test]
fn postgres_backup_recovers_in_docker_with_the_backed_up_data() {
    if !pg_ready("PostgreSQL recovery") || !require_docker(PG_IMAGE) {
        return;
    }
    let env = Env::new();
    let _stop = StopAll(&env);
    let (pg, snap, before) = pgbench_backup(&env);
    let meta = &snap["meta"];
    assert_eq!(meta["db.engine"], "postgresql");
    assert_eq!(meta["db.major"], "15");
    assert!(meta["db.version"].as_str().unwrap().starts_with("15."));
    assert!(meta["db.databases"]
        .as_str()
        .unwrap()
        .contains("\"postgres\""));
    assert_eq!(snap["kind"], "tree");
    // The source moves on: changed rows, a dropped table, a new one.
    pg.sql("UPDATE pgbench_accounts SET abalance = abalance + 1; DROP TABLE pgbench_history; CREATE TABLE newer (x int)");
    assert_ne!(pg.sql(SUM_Q), before);

    let id = snap["id"].as_str().unwrap();
    let s = rjson(&env, &["recover", "db", id]);
    assert_eq!(s["runtime"], "docker");
    assert_eq!(s["writable"], false);
    let conn = s["connection"].as_str().unwrap();
    assert!(conn.starts_with("postgresql://postgres:"), "{conn}");
    assert_eq!(psql(conn, SUM_Q).unwrap(), before);
    assert_eq!(
        psql(conn, "SELECT count(*) FROM pgbench_history").unwrap(),
        "0"
    );
    assert!(psql(conn, "SELECT * FROM newer")
        .unwrap_err()
        .contains("does not exist"));
    // Read-only by default.
    let e = psql(conn, "INSERT INTO pgbench_branches VALUES (99, 0, '')").unwrap_err();
    assert!(e.contains("read-only transaction"), "{e}");
    // The password is required over TCP.
    let wrong = conn.replacen(s["password"].as_str().unwrap(), "nope", 1);
    assert!(psql(&wrong, "SELECT 1")
        .unwrap_err()
        .contains("password authentication failed"));
    let list = rjson(&env, &["recover", "list"]);
    assert_eq!(list[0]["id"], s["id"]);
    assert_eq!(list[0]["state"], "running");

    rok(&env, &["recover", "stop", s["id"].as_str().unwrap()]);
    assert_nothing_left(&env);
    assert!(psql(conn, "SELECT 1").is_err(), "the server still answers");
}

#[test]
fn writes_in_a_writable_session_never_reach_the_repository() {
    if !pg_ready("PostgreSQL recovery") || !require_docker(PG_IMAGE) {
        return;
    }
    let env = Env::new();
    let _stop = StopAll(&env);
    let (pg, snap, before) = pgbench_backup(&env);
    drop(pg);
    let id = snap["id"].as_str().unwrap();
    let s = rjson(&env, &["recover", "db", id, "--writable"]);
    let conn = s["connection"].as_str().unwrap();
    psql(conn, "UPDATE pgbench_accounts SET abalance = -1; DROP TABLE pgbench_tellers; CREATE TABLE scratch AS SELECT 1 AS x; CHECKPOINT").unwrap();
    assert_ne!(psql(conn, SUM_Q).unwrap(), before);
    rok(&env, &["recover", "stop", "--all"]);
    assert_nothing_left(&env);
    env.ok(&["check", "--read-data"]);
    // A second session sees the backup as it was.
    let s = rjson(&env, &["recover", "db", id]);
    let conn = s["connection"].as_str().unwrap();
    assert_eq!(psql(conn, SUM_Q).unwrap(), before);
    assert_eq!(
        psql(conn, "SELECT count(*) FROM pgbench_tellers").unwrap(),
        "20"
    );
    assert!(psql(conn, "SELECT * FROM scratch").is_err());
    rok(&env, &["recover", "stop", "--all"]);
    assert_nothing_left(&env);
}

/// `layer_bytes` of session `id` in `repo recover list`.
fn layer_bytes(env: &Env, id: &Value) -> u64 {
    let list = rjson(env, &["recover", "list"]);
    let s = list
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == *id)
        .unwrap();
    s["layer_bytes"].as_u64().unwrap()
}

/// Restarts a session's container and waits until `ready` succeeds again.
fn restart_container(session: &Value, ready: impl Fn() -> bool) {
    let c = session["container"].as_str().unwrap();
    let out = Command::new("docker")
        .args(["restart", c])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = Instant::now();
    while !ready() {
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the server did not come back"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn a_block_layer_session_writes_only_what_changed_keeps_it_across_a_restart_and_passes_amcheck_after_pgbench(
) {
    if !pg_ready("PostgreSQL recovery") || !require_docker(PG_IMAGE) {
        return;
    }
    let env = Env::new();
    let _stop = StopAll(&env);
    let (pg, snap, before) = pgbench_backup(&env);
    drop(pg);
    let id = snap["id"].as_str().unwrap();
    let one_row = "UPDATE pgbench_accounts SET abalance = 12345 WHERE aid = 1; CHECKPOINT";
    // overlayfs, for comparison: the first write to a relation copies all of it up.
    let o = rjson(
        &env,
        &["recover", "db", id, "--writable", "--layer", "overlay"],
    );
    assert_eq!(o["layer"], "overlay");
    psql(o["connection"].as_str().unwrap(), one_row).unwrap();
    let overlay_bytes = layer_bytes(&env, &o["id"]);

    let s = rjson(&env, &["recover", "db", id, "--writable"]);
    assert_eq!(s["layer"], "block");
    let conn = s["connection"].as_str().unwrap().to_owned();
    assert_eq!(psql(&conn, SUM_Q).unwrap(), before);
    psql(&conn, one_row).unwrap();
    let block_bytes = layer_bytes(&env, &s["id"]);
    let accounts: u64 = psql(&conn, "SELECT pg_relation_size('pgbench_accounts')")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        block_bytes < 10 << 20 && overlay_bytes > accounts,
        "layer bytes after a 1-row UPDATE: block {block_bytes}, overlay {overlay_bytes} \
         (the relation: {accounts})"
    );
    eprintln!("layer bytes after a 1-row UPDATE: block {block_bytes}, overlay {overlay_bytes}");
    rok(&env, &["recover", "stop", o["id"].as_str().unwrap()]);

    // An UPDATE and an INSERT persist across a restart of the server in the session.
    psql(&conn, "INSERT INTO pgbench_branches VALUES (99, 0, 'new')").unwrap();
    restart_container(&s, || psql(&conn, "SELECT 1").is_ok());
    assert_eq!(
        psql(&conn, "SELECT abalance FROM pgbench_accounts WHERE aid = 1").unwrap(),
        "12345"
    );
    assert_eq!(
        psql(&conn, "SELECT filler FROM pgbench_branches WHERE bid = 99").unwrap(),
        "new"
    );
    // The session's state becomes a snapshot: files it never changed are not read.
    let committed = rjson(
        &env,
        &[
            "recover",
            "commit",
            s["id"].as_str().unwrap(),
            "--tag",
            "repaired",
        ],
    );
    assert_eq!(committed["parent"], snap["id"]);
    assert_eq!(committed["meta"]["db.engine"], "postgresql");
    assert!(committed["tags"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t == "repaired"));
    let sum = &committed["summary"];
    let (files, unchanged) = (
        sum["files"].as_u64().unwrap(),
        sum["files_unchanged"].as_u64().unwrap(),
    );
    assert!(
        unchanged * 10 >= files * 9,
        "the commit read {} of {files} files",
        files - unchanged
    );
    // Of the files it changed, only the changed ranges are read: far less than the
    // relation it updated a row of.
    let read = sum["bytes_read"].as_u64().unwrap();
    assert!(
        read * 2 < accounts,
        "the commit read {read} bytes (the updated relation: {accounts})"
    );
    eprintln!("commit: {sum}");
    // The server runs again after the commit.
    assert_eq!(psql(&conn, "SELECT 1").unwrap(), "1");
    // Two minutes of pgbench, then every B-tree index passes amcheck.
    let out = Command::new(format!("{PG_BIN}/pgbench"))
        .args(["-n", "-c", "2", "-T", "120", "-M", "prepared", &conn])
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && report.contains("number of failed transactions: 0"),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{report}");
    let checked = psql(
        &conn,
        "CREATE EXTENSION amcheck; SELECT count(bt_index_check(c.oid, true)) FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam \
         WHERE a.amname = 'btree' AND c.relpersistence <> 't'",
    )
    .unwrap();
    assert!(
        checked.lines().last().unwrap().parse::<u32>().unwrap() > 3,
        "{checked}"
    );
    rok(&env, &["recover", "stop", "--all"]);
    assert_nothing_left(&env);
    env.ok(&["check", "--read-data"]);
    // A second session sees the backup as it was.
    let s = rjson(&env, &["recover", "db", id]);
    assert_eq!(
        psql(s["connection"].as_str().unwrap(), SUM_Q).unwrap(),
        before
    );
    rok(&env, &["recover", "stop", "--all"]);
    assert_nothing_left(&env);
    // The committed snapshot restores to the modified state (crash recovery replays
    // what the frozen server had not checkpointed).
    let restored = env.path("restored");
    env.ok(&[
        "restore",
        committed["id"].as_str().unwrap(),
        "--target",
        restored.to_str().unwrap(),
    ]);
    let (uid, gid) = postgres_user();
    std::os::unix::fs::chown(&restored, Some(uid), Some(gid)).unwrap();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&restored, fs::Permissions::from_mode(0o700)).unwrap();
    let pg = Postgres::start(&env, &restored, "committed");
    assert_eq!(
        pg.sql("SELECT abalance FROM pgbench_accounts WHERE aid = 1"),
        "12345"
    );
    assert_eq!(
        pg.sql("SELECT filler FROM pgbench_branches WHERE bid = 99"),
        "new"
    );
}

#[test]
fn killing_repo_during_recovery_then_cleanup_leaves_nothing() {
    if !pg_ready("PostgreSQL recovery") || !require_docker(PG_IMAGE) {
        return;
    }
    let env = Env::new();
    let _stop = StopAll(&env);
    let (pg, snap, _) = pgbench_backup(&env);
    drop(pg);
    let id = snap["id"].as_str().unwrap();
    let mut child = rcmd(&env)
        .args(["recover", "db", id])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Kill it once its container exists (mount, overlay and container are all up).
    let start = Instant::now();
    while session_containers(&env).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no container appeared"
        );
        assert!(child.try_wait().unwrap().is_none(), "repo exited early");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!mounts_under(&state_dir(&env)).is_empty());
    let r = rjson(&env, &["recover", "cleanup"]);
    assert_eq!(r["still_running"], serde_json::json!([]));
    assert_nothing_left(&env);
    // Cleanup also finds what has no record at all.
    let s = rjson(&env, &["recover", "db", id]);
    assert_eq!(s["state"], "running");
    fs::remove_file(state_dir(&env).join("sessions.db")).unwrap();
    // The record is gone but the session is not: a stray container, mounts, files.
    assert!(!session_containers(&env).is_empty());
    let r = rjson(&env, &["recover", "cleanup"]);
    assert_eq!(r["containers_removed"].as_array().unwrap().len(), 1);
    assert_nothing_left(&env);
}

#[test]
fn a_killed_layer_daemon_makes_a_dead_session_that_cleanup_removes() {
    if !pg_ready("PostgreSQL recovery") || !require_docker(PG_IMAGE) {
        return;
    }
    let env = Env::new();
    let _stop = StopAll(&env);
    let (pg, snap, _) = pgbench_backup(&env);
    drop(pg);
    let s = rjson(
        &env,
        &["recover", "db", snap["id"].as_str().unwrap(), "--writable"],
    );
    let conn = s["connection"].as_str().unwrap();
    // Writes in flight when the daemon under the server dies.
    let writer = {
        let conn = conn.to_owned();
        std::thread::spawn(move || {
            psql(&conn, "UPDATE pgbench_accounts SET abalance = abalance + 1").ok();
        })
    };
    std::thread::sleep(Duration::from_millis(200));
    let pid = s["mount_pid"].as_i64().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap()),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    writer.join().unwrap();
    let r = rjson(&env, &["recover", "cleanup"]);
    assert_eq!(r["sessions_removed"], serde_json::json!([s["id"]]), "{r}");
    assert_eq!(r["still_running"], serde_json::json!([]));
    assert_nothing_left(&env);
    env.ok(&["check", "--read-data"]);
}

#[test]
fn a_failing_pg_basebackup_is_a_clear_error_and_no_snapshot() {
    if !require_root("a PostgreSQL cluster") || !require_postgres() {
        return;
    }
    let env = Env::new();
    let pg = postgres_cluster(&env, "source");
    let wrong_port = format!(
        "host={} port=1 user=postgres dbname=postgres",
        pg.sock.display()
    );
    let out = env.run(&["backup", "--postgres", &wrong_port]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("PostgreSQL") && err.contains(".s.PGSQL.1"),
        "{err}"
    );
    let wrong_user = format!(
        "host={} port={} user=nobody_here dbname=postgres",
        pg.sock.display(),
        pg.port
    );
    let out = env.run(&["backup", "--postgres", &wrong_user]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("role \"nobody_here\" does not exist"), "{err}");
    // pg_basebackup itself refused (no replication permission): its stderr is the error.
    pg.sql("CREATE ROLE reader LOGIN");
    let no_repl = format!(
        "host={} port={} user=reader dbname=postgres",
        pg.sock.display(),
        pg.port
    );
    let out = env.run(&["backup", "--postgres", &no_repl]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("pg_basebackup failed"), "{err}");
    assert!(err.contains("replication"), "{err}");
    assert_eq!(snapshot_count(&env), 0);
}

#[test]
fn postgres_logical_dumps_restore_with_pg_restore() {
    if !require_root("a PostgreSQL cluster") || !require_postgres() {
        return;
    }
    let env = Env::new();
    let pg = postgres_cluster(&env, "source");
    pg.sql("CREATE DATABASE shop");
    pg.sql("CREATE ROLE clerk LOGIN");
    let shop = format!(
        "host={} port={} user=postgres dbname=shop",
        pg.sock.display(),
        pg.port
    );
    assert!(Command::new("psql")
        .args([&shop, "-X", "-q", "-c", "CREATE TABLE items AS SELECT g AS id, md5(g::text) AS name FROM generate_series(1, 5000) g"])
        .status()
        .unwrap()
        .success());
    let out = env.json(&["backup", "--postgres", &pg.conn(), "--logical"]);
    assert_eq!(out["snapshots"].as_array().unwrap().len(), 3);
    let snaps = env.json(&["snapshots"]);
    let names: Vec<&str> = snaps
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "postgresql-globals.sql",
            "postgresql-postgres.dump",
            "postgresql-shop.dump"
        ]
    );
    assert!(env
        .ok(&["cat", "latest", "--name", "postgresql-globals.sql"])
        .contains("CREATE ROLE clerk"));
    // The dump restores into a new database with the same rows.
    pg.sql("CREATE DATABASE shop_restored");
    let dump = env.path("shop.dump");
    let out = env
        .cmd()
        .args(["cat", "latest", "--name", "postgresql-shop.dump"])
        .output()
        .unwrap();
    assert!(out.status.success());
    fs::write(&dump, &out.stdout).unwrap();
    let restored = format!(
        "host={} port={} user=postgres dbname=shop_restored",
        pg.sock.display(),
        pg.port
    );
    let r = Command::new(format!("{PG_BIN}/pg_restore"))
        .args(["-d", &restored])
        .arg(&dump)
        .output()
        .unwrap();
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let q = "SELECT count(*), md5(string_agg(name, ',' ORDER BY id)) FROM items";
    let a = Command::new("psql")
        .args([&shop, "-X", "-At", "-c", q])
        .output()
        .unwrap();
    let b = Command::new("psql")
        .args([&restored, "-X", "-At", "-c", q])
        .output()
        .unwrap();
    assert!(a.status.success() && b.status.success());
    assert_eq!(a.stdout, b.stdout);
    assert!(String::from_utf8_lossy(&a.stdout).starts_with("5000|"));
}

#[test]
fn mariadb_physical_backup_recovers_and_logical_dumps_hold_the_rows() {
    if !require_root("a MariaDB server")
        || !require_fuse("MariaDB recovery")
        || !require_docker(MARIADB_IMAGE)
    {
        return;
    }
    let env = Env::new();
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(env.dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
    let _stop = StopAll(&env);
    let m = Mariadb::start(&env, "source");
    m.sql("CREATE DATABASE shop; CREATE TABLE shop.items (id INT PRIMARY KEY, name TEXT) ENGINE=InnoDB; USE shop; INSERT INTO items SELECT seq, MD5(seq) FROM seq_1_to_3000");
    let q = "SELECT COUNT(*), MD5(GROUP_CONCAT(name ORDER BY id)) FROM shop.items";
    let before = m.sql(q);
    let sock = m.sock.display().to_string();
    let snap = env.json(&["backup", "--mariadb", &sock])["snapshot"].clone();
    assert_eq!(snap["meta"]["db.engine"], "mariadb");
    assert_eq!(snap["meta"]["db.major"], "10.11");
    env.json(&["backup", "--mariadb", &sock, "--logical"]);
    let dump = env.ok(&["cat", "latest", "--name", "mariadb-shop.sql"]);
    assert!(dump.contains("CREATE TABLE `items`") && dump.contains("INSERT INTO `items`"));
    m.sql("DELETE FROM shop.items WHERE id > 10");
    assert_ne!(m.sql(q), before);

    let s = rjson(&env, &["recover", "db", snap["id"].as_str().unwrap()]);
    assert_eq!(s["engine"], "mariadb");
    assert_eq!(mariadb_tcp(&s, q).unwrap(), before);
    let e = mariadb_tcp(&s, "INSERT INTO shop.items VALUES (99999, 'x')").unwrap_err();
    assert!(e.contains("read-only") || e.contains("denied"), "{e}");
    rok(&env, &["recover", "stop", "--all"]);
    assert_nothing_left(&env);

    // Writable, on the block layer: an INSERT and an UPDATE persist across a restart of
    // the server, and the table checks out.
    let s = rjson(
        &env,
        &["recover", "db", snap["id"].as_str().unwrap(), "--writable"],
    );
    assert_eq!(s["layer"], "block");
    mariadb_tcp(
        &s,
        "INSERT INTO shop.items VALUES (99999, 'x'); UPDATE shop.items SET name = 'y' WHERE id = 1",
    )
    .unwrap();
    restart_container(&s, || mariadb_tcp(&s, "SELECT 1").is_ok());
    assert_eq!(
        mariadb_tcp(
            &s,
            "SELECT name FROM shop.items WHERE id IN (1, 99999) ORDER BY id"
        )
        .unwrap(),
        "y\nx"
    );
    let check = mariadb_tcp(&s, "CHECK TABLE shop.items").unwrap();
    assert!(check.ends_with("OK"), "{check}");
    rok(&env, &["recover", "stop", "--all"]);
    assert_nothing_left(&env);
    // The repository still has the original.
    let s = rjson(&env, &["recover", "db", snap["id"].as_str().unwrap()]);
    assert_eq!(mariadb_tcp(&s, q).unwrap(), before);
    rok(&env, &["recover", "stop", "--all"]);
    assert_nothing_left(&env);
}

#[test]
fn the_process_runtime_serves_without_docker() {
    if !pg_ready("PostgreSQL recovery") {
        return;
    }
    let env = Env::new();
    let _stop = StopAll(&env);
    let (pg, snap, before) = pgbench_backup(&env);
    drop(pg);
    let s = rjson(
        &env,
        &[
            "recover",
            "db",
            snap["id"].as_str().unwrap(),
            "--runtime",
            "process",
            "--writable",
        ],
    );
    assert_eq!(s["runtime"], "process");
    assert!(s["container"].is_null());
    let pid = s["server_pid"].as_u64().unwrap();
    let conn = s["connection"].as_str().unwrap();
    assert_eq!(psql(conn, SUM_Q).unwrap(), before);
    psql(conn, "CREATE TABLE t AS SELECT 1 AS x").unwrap();
    rok(&env, &["recover", "stop", "--all"]);
    // Gone, or a zombie waiting for PID 1 to reap it.
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    assert!(
        stat.is_empty()
            || stat
                .rsplit_once(')')
                .unwrap()
                .1
                .trim_start()
                .starts_with('Z'),
        "the server still runs: {stat}"
    );
    assert_nothing_left(&env);
}

#[test]
fn recovering_a_snapshot_that_is_not_a_database_is_refused() {
    if !require_root("recovery sessions") {
        return;
    }
    let env = Env::new();
    let src = env.path("src");
    fs::create_dir_all(&src).unwrap();
    fs::write(src.join("f"), b"x").unwrap();
    let snap = env.backup(&[&src]);
    let out = rcmd(&env)
        .args([
            "recover",
            "db",
            snap["id"].as_str().unwrap(),
            "--runtime",
            "process",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("is not a physical database backup"), "{err}");
    assert_eq!(rjson(&env, &["recover", "list"]), serde_json::json!([]));
}

#[test]
fn without_a_connection_string_the_pg_environment_names_the_server() {
    if !require_root("a PostgreSQL cluster") || !require_postgres() {
        return;
    }
    let env = Env::new();
    let pg = postgres_cluster(&env, "source");
    pg.sql("CREATE TABLE marker AS SELECT 42 AS answer");
    let out = env
        .cmd()
        .env("PGHOST", &pg.sock)
        .env("PGPORT", pg.port.to_string())
        .env("PGUSER", "postgres")
        .env("PGDATABASE", "postgres")
        .args(["backup", "--postgres", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["snapshot"]["name"], "postgresql");
    // The data directory is the snapshot's root, WAL and all.
    let ls = env.ok(&["ls", "latest", "--name", "postgresql"]);
    for want in [
        "/PG_VERSION",
        "/backup_label",
        "/pg_wal",
        "/base",
        "/global/pg_control",
    ] {
        assert!(ls.lines().any(|l| l == want), "{want} missing from:\n{ls}");
    }
}

#[test]
fn a_database_recovery_starts_lists_and_stops_through_the_api() {
    use crate::serve::{serve_config, token, Api, Daemon};
    if !pg_ready("PostgreSQL recovery through the API") || !require_docker(PG_IMAGE) {
        return;
    }
    let env = Env::new();
    let _stop = StopAll(&env);
    let (_pg, snap, before) = pgbench_backup(&env);
    let config = serve_config(&env, "");
    let rw = token(&env, &config, "admin", false);
    let ro = token(&env, &config, "viewer", true);
    let d = Daemon::start(&env, &config);
    let admin = Api {
        base: &d.url,
        token: Some(&rw),
    };
    let viewer = Api {
        base: &d.url,
        token: Some(&ro),
    };
    let id = snap["id"].as_str().unwrap();
    let (s, v) = viewer.post(
        "/api/v1/recovery/db",
        &serde_json::json!({ "snapshot": id }),
    );
    assert_eq!(s, 403, "{v}");
    let (s, v) = admin.post(
        "/api/v1/recovery/db",
        &serde_json::json!({ "snapshot": id, "writable": true }),
    );
    assert_eq!(s, 201, "{v}\n{}", d.log());
    // The creator gets the connection string; the database answers with the backed-up
    // rows.
    let conn = v["connection"].as_str().unwrap();
    assert_eq!(psql(conn, SUM_Q).unwrap(), before);
    let session = v["session"]["id"].as_str().unwrap().to_owned();
    assert!(v["session"].get("password").is_none(), "{v}");
    // Listed by the API (without the password) and by the host's CLI.
    let (s, l) = viewer.get("/api/v1/recovery");
    assert_eq!(s, 200);
    assert_eq!(l["sessions"][0]["id"], session.as_str(), "{l}");
    assert!(l["sessions"][0].get("password").is_none(), "{l}");
    assert_eq!(rjson(&env, &["recover", "list"])[0]["id"], session.as_str());
    // A change in the session becomes a snapshot through the API (not with a read-only
    // token, not of a session that does not exist, not with a malformed body).
    psql(
        conn,
        "UPDATE pgbench_accounts SET abalance = 777 WHERE aid = 3",
    )
    .unwrap();
    let commit = format!("/api/v1/recovery/{session}/commit");
    let (s, v) = viewer.post(&commit, &serde_json::json!({}));
    assert_eq!(s, 403, "{v}");
    let (s, v) = admin.post("/api/v1/recovery/nosuch/commit", &serde_json::json!({}));
    assert_eq!(s, 404, "{v}");
    let (s, v) = admin.post(&commit, &serde_json::json!({ "tags": "not-a-list" }));
    assert!(s == 400 || s == 422, "{s} {v}");
    let (s, v) = admin.post(&commit, &serde_json::json!({ "tags": ["fixed"] }));
    assert_eq!(s, 201, "{v}\n{}", d.log());
    assert_eq!(v["snapshot"]["parent"], id, "{v}");
    assert!(
        v["snapshot"]["tags"]
            .as_array()
            .unwrap()
            .iter()
            .any(|t| t == "fixed"),
        "{v}"
    );
    let committed = v["snapshot"]["id"].as_str().unwrap().to_owned();
    assert!(env.ok(&["snapshots"]).contains(&committed[..8]));
    // The server runs again after the commit.
    assert_eq!(
        psql(conn, "SELECT abalance FROM pgbench_accounts WHERE aid = 3").unwrap(),
        "777"
    );
    let (s, v) = admin.post(
        &format!("/api/v1/recovery/{session}/stop"),
        &serde_json::json!({}),
    );
    assert_eq!(s, 200, "{v}");
    assert!(psql(conn, "SELECT 1").is_err(), "the server still answers");
    assert_nothing_left(&env);
    let (s, _) = admin.post(
        &format!("/api/v1/recovery/{session}/stop"),
        &serde_json::json!({}),
    );
    assert_eq!(s, 404);
}
