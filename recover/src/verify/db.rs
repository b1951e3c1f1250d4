//! Verifying a database backup by starting it: an instant recovery session of the
//! snapshot (writable: its writes land in the session's layer and go with it), then:
//!
//! 1. `connect`: the server accepts a connection and says its version;
//! 2. `databases`: every database accepts a connection;
//! 3. `amcheck` (PostgreSQL): every valid B-tree index checked with `bt_index_check`,
//!    heap entries included, in every database (a warning where the server has no
//!    amcheck); `check tables` (MariaDB): `CHECK TABLE` on every table;
//! 4. `row counts`: the tables and their rows, as the catalogue estimates them
//!    (`pg_class.reltuples`, `information_schema.tables`), into the log;
//! 5. `query N`: each of the user's queries, its row count against `--expect-rows`; a
//!    mismatch shows the rows.
//!
//! The session is stopped after, whatever happened.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use cairn_agent::database::{DatabaseMeta, Engine, Method};
use cairn_engine::snapshot::Snapshot;

use super::{Kind, Outcome, Recorder, Results, SnapshotRef, StepResult, Verification, VerifyError};
use crate::mounting::SpawnMount;
use crate::state::{SessionRecord, Store};
use crate::{Layer, Request, Runtime};

pub struct DbVerifyRequest<'a> {
    pub snapshot: &'a Snapshot,
    pub repository: PathBuf,
    pub runtime: Runtime,
    pub image: Option<String>,
    /// How long the server may take to come up.
    pub timeout: Duration,
    /// The user's queries, run in `database`.
    pub queries: Vec<String>,
    /// Rows each query must return.
    pub expect_rows: Option<u64>,
    /// Where the queries run (default: the session's database).
    pub database: Option<String>,
    pub spawn_mount: SpawnMount<'a>,
    pub trigger: String,
}

/// Verifies a database snapshot; its record (a failure is a result, not an error).
pub fn run(
    store: &Store,
    results: &Results,
    req: &DbVerifyRequest<'_>,
) -> Result<Verification, VerifyError> {
    let meta = DatabaseMeta::from_meta(&req.snapshot.manifest.meta)
        .filter(|m| m.method == Method::Physical)
        .ok_or_else(|| crate::RecoverError::NotADatabase(req.snapshot.id.short()))?;
    let snap = SnapshotRef::of(req.snapshot, &req.repository.display().to_string());
    let mut r = Recorder::begin(
        results,
        Verification::new(Kind::Db, "db", &snap, &req.trigger),
    )?;
    let mut session: Option<SessionRecord> = None;
    let started = r.step("start", |_| {
        let t = Instant::now();
        let sreq = Request {
            snapshot: req.snapshot,
            repository: req.repository.clone(),
            port: None,
            image: req.image.clone(),
            writable: true,
            runtime: req.runtime,
            timeout: req.timeout,
            layer: Layer::Block,
            layer_chunk: None,
            spawn_mount: req.spawn_mount,
            verifier: Some(std::process::id()),
        };
        match crate::start(store, &sreq) {
            Ok(rec) => {
                let detail = format!(
                    "session {} ({}, {}) answering in {:.1}s",
                    rec.id,
                    meta.engine.as_str(),
                    rec.runtime,
                    t.elapsed().as_secs_f64()
                );
                session = Some(rec);
                (StepResult::Passed, detail)
            }
            Err(e) => (StepResult::Failed, e.to_string()),
        }
    });
    r.v.session = session.as_ref().map(|s| s.id.clone());
    if let (true, Some(rec)) = (started, session.as_ref()) {
        checks(&mut r, rec, &meta, req);
    } else {
        r.skip(&["connect", "databases"]);
    }
    let cleaned = match &session {
        Some(rec) => r.step("cleanup", |_| match crate::stop(store, &rec.id) {
            Ok(_) => (StepResult::Passed, "server, layer and mount removed".into()),
            Err(e) => (StepResult::Failed, e.to_string()),
        }),
        None => true,
    };
    Ok(r.finish(cleaned))
}

/// Every check after the start; stops at the first that leaves nothing to check.
fn checks(
    r: &mut Recorder<'_>,
    rec: &SessionRecord,
    meta: &DatabaseMeta,
    req: &DbVerifyRequest<'_>,
) {
    let q = |db: Option<&str>, sql: &str| -> Result<String, String> {
        match crate::db::sql(rec, meta, db, sql) {
            Ok((true, out)) => Ok(out),
            Ok((false, out)) => Err(out.trim().to_owned()),
            Err(e) => Err(e.to_string()),
        }
    };
    let connected = r.step("connect", |_| match q(None, "SELECT version()") {
        Ok(v) => (
            StepResult::Passed,
            v.lines().next().unwrap_or("").to_owned(),
        ),
        Err(e) => (StepResult::Failed, e),
    });
    if !connected {
        return;
    }
    let mut names = Vec::new();
    r.step("databases", |_| match list_databases(meta.engine, &q) {
        Ok(dbs) => {
            let bad: Vec<String> = dbs
                .iter()
                .filter_map(|d| q(Some(d), "SELECT 1").err().map(|e| format!("{d}: {e}")))
                .collect();
            names = dbs;
            if bad.is_empty() {
                (
                    StepResult::Passed,
                    format!("{} connect: {}", names.len(), names.join(", ")),
                )
            } else {
                (StepResult::Failed, bad.join("; "))
            }
        }
        Err(e) => (StepResult::Failed, e),
    });
    match meta.engine {
        Engine::Postgresql => {
            r.step("amcheck", |r| amcheck(r, &names, &q));
        }
        Engine::Mariadb => {
            r.step("check tables", |r| check_tables(r, &q));
        }
    }
    r.step("row counts", |r| row_counts(r, meta.engine, &names, &q));
    for (i, sql) in req.queries.iter().enumerate() {
        r.step(&format!("query {}", i + 1), |_| {
            user_query(req.database.as_deref(), sql, req.expect_rows, &q)
        });
    }
}

type Query<'a> = dyn Fn(Option<&str>, &str) -> Result<String, String> + 'a;

fn rows(out: &str) -> Vec<&str> {
    out.lines().filter(|l| !l.trim().is_empty()).collect()
}

fn list_databases(engine: Engine, q: &Query<'_>) -> Result<Vec<String>, String> {
    let sql = match engine {
        Engine::Postgresql => "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1",
        Engine::Mariadb => "SHOW DATABASES",
    };
    Ok(rows(&q(None, sql)?)
        .into_iter()
        .map(str::to_owned)
        .collect())
}

/// The indexes amcheck checks in one database, each in its own exception block: one
/// damaged index is reported and the others are still checked.
const AMCHECK_SQL: &str = "DO $$ DECLARE r record; n int := 0; BEGIN \
  FOR r IN SELECT c.oid, c.oid::regclass::text AS name FROM pg_index i \
    JOIN pg_class c ON c.oid = i.indexrelid JOIN pg_am a ON a.oid = c.relam \
    WHERE a.amname = 'btree' AND c.relpersistence <> 't' AND i.indisvalid AND i.indisready \
  LOOP \
    n := n + 1; \
    BEGIN PERFORM bt_index_check(r.oid, true); \
    EXCEPTION WHEN OTHERS THEN RAISE WARNING 'cairn-amcheck-failed % %', r.name, SQLERRM; END; \
  END LOOP; \
  RAISE WARNING 'cairn-amcheck-checked %', n; END $$";

fn amcheck(r: &mut Recorder<'_>, dbs: &[String], q: &Query<'_>) -> Outcome {
    let (mut checked, mut failed, mut missing) = (0u64, Vec::new(), Vec::new());
    for db in dbs {
        if let Err(e) = q(Some(db), "CREATE EXTENSION IF NOT EXISTS amcheck") {
            if e.contains("not available") || e.contains("could not open extension") {
                missing.push(db.clone());
                continue;
            }
            return (StepResult::Failed, format!("{db}: {e}"));
        }
        let out = match q(Some(db), AMCHECK_SQL) {
            Ok(out) => out,
            Err(e) => return (StepResult::Failed, format!("{db}: {e}")),
        };
        for line in out.lines() {
            if let Some(rest) = line.split("cairn-amcheck-failed ").nth(1) {
                failed.push(format!("{db}: {rest}"));
            } else if let Some(n) = line.split("cairn-amcheck-checked ").nth(1) {
                checked += n.trim().parse::<u64>().unwrap_or(0);
            }
        }
    }
    for f in &failed {
        r.log(&format!("amcheck: {f}"));
    }
    if !failed.is_empty() {
        return (
            StepResult::Failed,
            format!(
                "{} of {checked} indexes damaged: {}",
                failed.len(),
                failed.join("; ")
            ),
        );
    }
    if !missing.is_empty() {
        return (
            StepResult::Warning,
            format!(
                "amcheck is not installed on the server: not checked in {}",
                missing.join(", ")
            ),
        );
    }
    (
        StepResult::Passed,
        format!("{checked} B-tree indexes in {} databases intact", dbs.len()),
    )
}

fn check_tables(r: &mut Recorder<'_>, q: &Query<'_>) -> Outcome {
    let list = match q(
        None,
        "SELECT CONCAT('`', REPLACE(table_schema, '`', '``'), '`.`', REPLACE(table_name, '`', '``'), '`') \
         FROM information_schema.tables WHERE table_type = 'BASE TABLE' \
         AND table_schema NOT IN ('information_schema', 'performance_schema')",
    ) {
        Ok(out) => out,
        Err(e) => return (StepResult::Failed, e),
    };
    let tables: Vec<&str> = rows(&list);
    if tables.is_empty() {
        return (StepResult::Passed, "no tables".into());
    }
    let mut bad = Vec::new();
    for chunk in tables.chunks(100) {
        let out = match q(None, &format!("CHECK TABLE {}", chunk.join(", "))) {
            Ok(out) => out,
            Err(e) => return (StepResult::Failed, e),
        };
        // Table, Op, Msg_type, Msg_text: a table is fine when its status is OK.
        for line in rows(&out) {
            let cols: Vec<&str> = line.split('\t').collect();
            if let [table, _, kind, text] = cols.as_slice() {
                let ok = (*kind == "status" && *text == "OK")
                    || *kind == "note"
                    || (*kind == "status" && text.contains("doesn't support check"));
                if !ok {
                    bad.push(format!("{table}: {kind} {text}"));
                }
            }
        }
    }
    for b in &bad {
        r.log(&format!("check table: {b}"));
    }
    if bad.is_empty() {
        (StepResult::Passed, format!("{} tables OK", tables.len()))
    } else {
        (StepResult::Failed, bad.join("; "))
    }
}

fn row_counts(r: &mut Recorder<'_>, engine: Engine, dbs: &[String], q: &Query<'_>) -> Outcome {
    let mut lines = Vec::new();
    match engine {
        Engine::Postgresql => {
            for db in dbs {
                let out = match q(
                    Some(db),
                    "SELECT n.nspname || '.' || c.relname, greatest(c.reltuples, 0)::bigint \
                     FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE c.relkind IN ('r', 'p') \
                     AND n.nspname NOT IN ('pg_catalog', 'information_schema') \
                     AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1",
                ) {
                    Ok(out) => out,
                    Err(e) => return (StepResult::Failed, format!("{db}: {e}")),
                };
                lines.extend(rows(&out).into_iter().map(|l| format!("{db}.{l}")));
            }
        }
        Engine::Mariadb => {
            let out = match q(
                None,
                "SELECT CONCAT(table_schema, '.', table_name), IFNULL(table_rows, 0) \
                 FROM information_schema.tables WHERE table_type = 'BASE TABLE' \
                 AND table_schema NOT IN ('information_schema', 'performance_schema', 'mysql', 'sys') \
                 ORDER BY 1",
            ) {
                Ok(out) => out,
                Err(e) => return (StepResult::Failed, e),
            };
            lines.extend(rows(&out).into_iter().map(|l| l.replace('\t', "|")));
        }
    }
    let total: u64 = lines
        .iter()
        .filter_map(|l| l.rsplit('|').next()?.trim().parse::<u64>().ok())
        .sum();
    r.log(&format!(
        "tables and rows (estimated):\n{}",
        lines.join("\n")
    ));
    (
        StepResult::Passed,
        format!(
            "{} table{}, about {total} rows",
            lines.len(),
            if lines.len() == 1 { "" } else { "s" }
        ),
    )
}

fn user_query(db: Option<&str>, sql: &str, expect: Option<u64>, q: &Query<'_>) -> Outcome {
    let out = match q(db, sql) {
        Ok(out) => out,
        Err(e) => return (StepResult::Failed, format!("{sql}: {e}")),
    };
    let got = rows(&out);
    let shown: Vec<&str> = got.iter().take(20).copied().collect();
    let more = if got.len() > shown.len() {
        format!("\n... {} more", got.len() - shown.len())
    } else {
        String::new()
    };
    let n = got.len() as u64;
    match expect {
        Some(want) if want != n => (
            StepResult::Failed,
            format!(
                "{sql}: {n} rows, expected {want}; the rows:\n{}{more}",
                shown.join("\n")
            ),
        ),
        _ => (
            StepResult::Passed,
            format!("{sql}: {n} rows\n{}{more}", shown.join("\n")),
        ),
    }
}
