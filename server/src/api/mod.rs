//! The REST API under `/api/v1`, and `/metrics`.
//!
//! Ground rules: JSON in and out; every error is `{"error": {"code", "message"}}` with
//! a fitting status (malformed bodies, paths and queries included); a bearer token on
//! every `/api/v1` route but `health`; a read-only token cannot change anything; every
//! change is written to the audit log (who, what, when, the status); request bodies are
//! limited in size, and requests (but the event streams) in time. Handlers do their
//! work (state database, repositories) on blocking threads.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::Stream;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

mod openapi;
mod ops;
mod session;

use crate::auth::{self, AuthError};
use crate::browse::{self, BrowseError};
use crate::config::Limits;
use crate::daemon::Daemon;
use crate::job::JobDefinition;
use crate::login::{self, Principal};
use crate::metrics::Metrics;
use crate::runner::{Observer, RunEvent, RunEventKind, Runner, SubmitError};
use crate::site::{Site, SiteError};
use crate::state::{AuditEntry, RunId, RunQuery, RunStatus, RunTrigger, ScheduleId};

/// Run events for the event streams.
pub struct Hub {
    tx: broadcast::Sender<RunEvent>,
}

impl Hub {
    #[must_use]
    pub fn new() -> Self {
        Self {
            tx: broadcast::channel(1024).0,
        }
    }
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Observer for Hub {
    fn on(&self, e: &RunEvent) {
        // No subscriber is fine.
        let _ = self.tx.send(e.clone());
    }
}

#[derive(Clone)]
struct Ctx {
    site: Arc<Site>,
    runner: Runner,
    metrics: Arc<Metrics>,
    hub: Arc<Hub>,
    verifier: crate::verification::Verifier,
}

/// An API error: a status, a stable code and a message for people.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = openapi::ErrorBody {
            error: openapi::ErrorDetail {
                code: self.code.to_owned(),
                message: self.message,
            },
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<SiteError> for ApiError {
    fn from(e: SiteError) -> Self {
        let m = e.to_string();
        match e {
            SiteError::NoJob(_) | SiteError::NoSchedule(_) => Self::not_found(m),
            SiteError::JobExists(_) => Self::new(StatusCode::CONFLICT, "exists", m),
            SiteError::FromConfig { .. } => Self::new(StatusCode::CONFLICT, "from_config", m),
            SiteError::Invalid(_) | SiteError::Schedule(_) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m)
            }
            SiteError::State(_) => Self::internal(m),
        }
    }
}

impl From<BrowseError> for ApiError {
    fn from(e: BrowseError) -> Self {
        let m = e.to_string();
        match e {
            BrowseError::BadPath(_) => Self::bad_request(m),
            BrowseError::NotFound(_) => Self::not_found(m),
            BrowseError::Conflict(_) => Self::new(StatusCode::CONFLICT, "conflict", m),
            BrowseError::Engine(_) => Self::internal(m),
        }
    }
}

impl From<crate::repos::RepoError> for ApiError {
    fn from(e: crate::repos::RepoError) -> Self {
        match e {
            crate::repos::RepoError::Unknown { .. } => Self::not_found(e.to_string()),
            other => Self::internal(other.to_string()),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let m = e.to_string();
        match e {
            AuthError::Exists(_) => Self::new(StatusCode::CONFLICT, "exists", m),
            AuthError::BadName(_) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m),
            _ => Self::internal(m),
        }
    }
}

impl From<crate::state::StateError> for ApiError {
    fn from(e: crate::state::StateError) -> Self {
        Self::internal(e.to_string())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(e: JsonRejection) -> Self {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_body"
        };
        Self::new(status, code, e.body_text())
    }
}

impl From<PathRejection> for ApiError {
    fn from(e: PathRejection) -> Self {
        Self::bad_request(e.body_text())
    }
}

impl From<QueryRejection> for ApiError {
    fn from(e: QueryRejection) -> Self {
        Self::bad_request(e.body_text())
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Runs `f` on a blocking thread.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> ApiResult<T> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("a worker failed: {e}")))?
}

/// The application: every route, its limits and middleware.
pub fn router(d: &Daemon, limits: &Limits) -> Router {
    let ctx = Ctx {
        site: d.site.clone(),
        runner: d.runner.clone(),
        metrics: d.metrics.clone(),
        hub: d.hub.clone(),
        verifier: d.verifier.clone(),
    };
    let timeout = limits.request_timeout;
    let max_body = limits.max_body_bytes;
    let timed = Router::new()
        .route("/jobs", get(list_jobs).post(add_job))
        .route("/jobs/{name}", get(get_job).delete(remove_job))
        .route("/jobs/{name}/run", post(run_job))
        .route("/backups", post(backup_now))
        .route("/runs", get(list_runs))
        .route("/runs/{id}", get(get_run))
        .route("/runs/{id}/log", get(run_log))
        .route("/runs/{id}/cancel", post(cancel_run))
        .route("/schedules", get(list_schedules).post(add_schedule))
        .route("/schedules/preview", get(preview_schedule))
        .route("/schedules/{id}", axum::routing::delete(remove_schedule))
        .route("/schedules/{id}/enable", post(enable_schedule))
        .route("/schedules/{id}/disable", post(disable_schedule))
        .route("/missed", get(list_missed))
        .route("/repositories", get(list_repositories))
        .route("/repositories/{name}/snapshots", get(list_snapshots))
        .route("/repositories/{name}/snapshots/{id}/ls", get(snapshot_ls))
        .route("/repositories/{name}/forget", post(forget_snapshots))
        .route("/audit", get(audit_log))
        .route("/session", get(session::whoami).delete(session::logout))
        .route("/repositories/{name}/locks", get(repository_locks))
        .route("/repositories/{name}/checks", get(repository_checks))
        .route("/repositories/{name}/growth", get(repository_growth))
        .route("/repositories/{name}/sources", get(repository_sources))
        .route("/repositories/{name}/unlock", post(unlock_repository))
        .route("/repositories/{name}/diff", get(snapshot_diff))
        .route("/recovery", get(list_recovery))
        .route("/recovery/{id}/stop", post(stop_recovery))
        .route("/recovery/{id}/connection", post(recovery_connection))
        .route("/databases", get(list_databases))
        .route("/notifications", get(list_notifications))
        .route("/notifications/{name}/test", post(test_notification))
        .route("/tokens", get(list_tokens).post(create_token))
        .route("/tokens/{name}", axum::routing::delete(revoke_token))
        .route("/verifications", get(ops::list_verifications))
        .route("/verifications/stats", get(ops::verification_stats))
        .route("/verifications/{id}", get(ops::get_verification))
        .route("/vms", get(ops::list_vms))
        .route("/vms/{name}/snapshots", get(ops::vm_snapshots))
        .route(
            "/vms/{name}/snapshots/{snapshot}",
            axum::routing::delete(ops::delete_vm_snapshot),
        )
        .layer(middleware::from_fn(move |req, next| {
            with_timeout(timeout, req, next)
        }));
    // Without the request timeout: streams, downloads and restores take what they take.
    let streams = Router::new()
        .route("/jobs/{name}/events", get(job_events))
        .route("/runs/{id}/events", get(run_events))
        .route(
            "/repositories/{name}/snapshots/{id}/file",
            get(snapshot_file),
        )
        .route(
            "/repositories/{name}/snapshots/{id}/restore",
            post(snapshot_restore),
        )
        // Operations that answer when they are done.
        .route("/recovery/db", post(ops::recover_database))
        .route("/recovery/vm", post(ops::recover_vm))
        .route("/verifications", post(ops::verify_snapshot))
        .route("/recovery/{id}/commit", post(ops::commit_recovery))
        .route("/vms/{name}/{action}", post(ops::vm_action))
        .route("/vms/clone", post(ops::clone_vm))
        .route("/repositories/{name}/check", post(ops::check))
        .route("/repositories/{name}/prune", post(ops::prune))
        .route("/repositories/{name}/repair", post(ops::repair));
    let late: crate::mcp::LateRouter = std::sync::Arc::new(std::sync::OnceLock::new());
    let streams = streams.nest_service("/mcp", crate::mcp::http_service(late.clone()));
    let api = timed
        .merge(streams)
        .layer(middleware::from_fn(move |req, next| {
            refuse_large(max_body, req, next)
        }))
        .layer(middleware::from_fn_with_state(ctx.clone(), authorize))
        .route("/health", get(health))
        .route("/session", post(session::login))
        .route("/openapi.json", get(openapi_json));
    let app = Router::new()
        .nest("/api/v1", api)
        .merge(crate::dashboard::routes())
        .merge(crate::storage::routes(d.site.clone()))
        .route("/metrics", get(metrics))
        .fallback(|| async { ApiError::not_found("no such route") })
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(middleware::from_fn_with_state(ctx.clone(), measure))
        .with_state(ctx);
    let _ = late.set(app.clone());
    app
}

async fn with_timeout(timeout: Duration, req: Request, next: Next) -> Response {
    match tokio::time::timeout(timeout, next.run(req)).await {
        Ok(r) => r,
        Err(_) => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "timeout",
            format!("the request took longer than {}s", timeout.as_secs()),
        )
        .into_response(),
    }
}

/// Refuses a body whose declared length is over the limit before reading any of it
/// (a body without a length is cut at the limit as it is read).
async fn refuse_large(max: usize, req: Request, next: Next) -> Response {
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        let mut r = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the body is over the limit of {max} bytes"),
        )
        .into_response();
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
        return r;
    }
    next.run(req).await
}

/// Counts and times every request, by its route (never its raw path).
async fn measure(State(ctx): State<Ctx>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    ctx.metrics.http_in_flight.inc();
    let resp = next.run(req).await;
    ctx.metrics.http_in_flight.dec();
    ctx.metrics.http(
        &method,
        &route,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

/// Who is asking: checks the token, refuses a read-only one a change, audits changes.
/// Who a request acts as: its bearer token, or else the dashboard session its cookie
/// names.
async fn principal_of(ctx: &Ctx, headers: &axum::http::HeaderMap) -> ApiResult<Principal> {
    let text = |name| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let bearer = text(header::AUTHORIZATION);
    let session = text(header::COOKIE)
        .and_then(|c| login::cookie(&c, login::COOKIE).map(str::to_owned))
        .filter(|c| !c.is_empty());
    let state = ctx.site.state.clone();
    blocking(move || match (bearer, session) {
        (None, Some(cookie)) => Ok(login::session(&state, &cookie, chrono::Utc::now())?),
        (bearer, _) => auth::authenticate(&state, bearer.as_deref())
            .map(|t| Principal {
                name: t.name,
                read_only: t.read_only,
                csrf: None,
                expires: None,
            })
            .map_err(|e| match e {
                AuthError::State(s) => ApiError::internal(s.to_string()),
                other => ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", other.to_string()),
            }),
    })
    .await
}

/// A request made inside this process (the MCP server's calls): who it acts as. An
/// extension, never a header: no request from the network carries one.
#[derive(Clone)]
pub struct InProcess(pub Principal);

async fn authorize(State(ctx): State<Ctx>, mut req: Request, next: Next) -> Response {
    let headers = req.headers().clone();
    let who = match req.extensions().get::<InProcess>() {
        Some(InProcess(p)) => Ok(p.clone()),
        None => principal_of(&ctx, &headers).await,
    };
    let token = match who {
        Ok(t) => t,
        Err(e) => {
            ctx.metrics.auth_failures.inc();
            let mut r = e.into_response();
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
    };
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    // MCP's endpoint takes every message as a POST: its tools refuse changes to
    // read-only tokens themselves and audit their calls of this API as `... via MCP`.
    let mcp = path.trim_start_matches("/api/v1").starts_with("/mcp");
    if mcp && token.csrf.is_some() {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "mcp_token",
            "MCP over HTTP takes a bearer token (repo serve token create), not a dashboard session",
        )
        .into_response();
    }
    let changes = !mcp && !matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    let dry_run = req
        .uri()
        .query()
        .is_some_and(|q| q.split('&').any(|kv| kv == "dry_run=true"));
    let csrf = req
        .headers()
        .get(login::CSRF_HEADER)
        .and_then(|v| v.to_str().ok());
    let forged = changes && !login::csrf_ok(&token, csrf);
    // Logging out is no change to the site: a read-only session may end itself.
    let logout = method == "DELETE" && path.trim_start_matches("/api/v1") == "/session";
    req.extensions_mut().insert(token.clone());
    let resp = if forged {
        ctx.metrics.auth_failures.inc();
        ApiError::new(
            StatusCode::FORBIDDEN,
            "csrf",
            "a change made with a session cookie needs the session's X-CSRF-Token header",
        )
        .into_response()
    } else if changes && token.read_only && !logout {
        ctx.metrics.auth_failures.inc();
        ApiError::new(
            StatusCode::FORBIDDEN,
            "read_only",
            format!(
                "{} {:?} is read-only",
                if token.csrf.is_some() {
                    "the session of"
                } else {
                    "token"
                },
                token.name
            ),
        )
        .into_response()
    } else {
        next.run(req).await
    };
    if changes {
        // Written before the response goes out: a client that got an answer finds its
        // change (or its refused attempt) in the log.
        let entry = AuditEntry {
            at: chrono::Utc::now(),
            token: token.name.clone(),
            action: if dry_run {
                format!("{}.dry_run", action_of(&method, &path))
            } else {
                action_of(&method, &path)
            },
            method,
            path,
            status: resp.status().as_u16(),
        };
        let state = ctx.site.state.clone();
        let metrics = ctx.metrics.clone();
        let _ = blocking(move || {
            state.audit(&entry)?;
            metrics.audit_entries.inc();
            Ok(())
        })
        .await
        .map_err(|e| tracing::error!("writing the audit log: {}", e.message));
    }
    resp
}

/// A short name of what a change did: `jobs.run`, `schedules.delete`, `recovery.db`,
/// `vms.snapshots.delete`.
fn action_of(method: &str, path: &str) -> String {
    let parts: Vec<&str> = path
        .trim_start_matches("/api/v1/")
        .split('/')
        .filter(|p| !p.is_empty())
        .collect();
    let delete = method == "DELETE";
    match parts.as_slice() {
        [what] => format!("{what}.create"),
        [what, _] if delete => format!("{what}.delete"),
        [what, verb] => format!("{what}.{verb}"),
        [what, _, verb, ..] if delete => format!("{what}.{verb}.delete"),
        [what, _, verb, ..] => format!("{what}.{verb}"),
        [] => "unknown".into(),
    }
}

#[utoipa::path(
    get,
    path = "/health",
    tag = "daemon",
    security(()),
    responses(
        (status = 200, description = "The daemon answers: its status and version", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn health() -> Json<Value> {
    Json(json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "daemon",
    security(()),
    responses(
        (status = 200, description = "This document", body = Object),
    ),
)]
async fn openapi_json() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        openapi::document(),
    )
        .into_response()
}

async fn metrics(State(ctx): State<Ctx>) -> Response {
    let text = ctx.metrics.encode();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

// --- jobs --------------------------------------------------------------------------------

#[utoipa::path(
    get,
    path = "/jobs",
    tag = "jobs",
    responses(
        (status = 200, description = "Every job with its definition, origin (config or api), last run and active run", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn list_jobs(State(ctx): State<Ctx>) -> ApiResult<Json<Value>> {
    blocking(move || {
        let jobs = ctx.site.state.jobs()?;
        let mut last_runs = ctx.site.state.last_runs()?;
        let mut out = Vec::with_capacity(jobs.len());
        for j in jobs {
            let last = last_runs.remove(&j.definition.name);
            let active = ctx.runner.busy(&j.definition.name);
            out.push(json!({
                "name": j.definition.name,
                "origin": j.origin,
                "definition": j.definition,
                "updated": j.updated,
                "last_run": last,
                "active_run": active,
            }));
        }
        Ok(Json(json!({ "jobs": out })))
    })
    .await
}

#[utoipa::path(
    get,
    path = "/jobs/{name}",
    tag = "jobs",
    params(
        ("name" = String, Path, description = "The job's name", example = "files"),
    ),
    responses(
        (status = 200, description = "The job, its last ten runs, the active run and its live progress", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn get_job(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = path?;
    blocking(move || {
        let j = ctx
            .site
            .state
            .job(&name)?
            .ok_or_else(|| ApiError::not_found(format!("no job {name:?}")))?;
        let runs = ctx.site.state.runs(&RunQuery {
            job: Some(name.clone()),
            limit: 10,
            ..RunQuery::default()
        })?;
        let active = ctx.runner.busy(&name);
        let live = active.and_then(|id| ctx.runner.live(id));
        Ok(Json(json!({
            "name": name,
            "origin": j.origin,
            "definition": j.definition,
            "runs": runs,
            "active_run": active,
            "progress": live,
        })))
    })
    .await
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
struct AddJobQuery {
    #[serde(default)]
    replace: bool,
    /// Check the definition and answer what a run would do now (each source's visible
    /// problem, the snapshots its retention would forget), storing nothing.
    #[serde(default)]
    dry_run: bool,
}

#[utoipa::path(
    post,
    path = "/jobs",
    tag = "jobs",
    params(
        AddJobQuery,
    ),
    request_body = JobDefinition,
    responses(
        (status = 201, description = "The job as stored", body = Object),
        (status = 200, description = "With dry_run: the definition is valid, and what a run would do now (`plan`)", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn add_job(
    State(ctx): State<Ctx>,
    query: Result<Query<AddJobQuery>, QueryRejection>,
    body: Result<Json<JobDefinition>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Query(q) = query?;
    let Json(job) = body?;
    blocking(move || {
        if q.dry_run {
            ctx.site.check_job(&job)?;
            let repo = ctx.site.repos.handle(&job.repository)?;
            let plan = crate::execute::dry_run(&job, &repo).map_err(ApiError::internal)?;
            return Ok((StatusCode::OK, Json(json!({ "job": job, "plan": plan }))));
        }
        ctx.site.add_job(&job, q.replace)?;
        Ok((StatusCode::CREATED, Json(json!({ "job": job }))))
    })
    .await
}

#[utoipa::path(
    delete,
    path = "/jobs/{name}",
    tag = "jobs",
    params(
        ("name" = String, Path, description = "The job's name"),
    ),
    responses(
        (status = 204, description = "Removed, with its schedules"),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn remove_job(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    let Path(name) = path?;
    blocking(move || {
        ctx.site.remove_job(&name)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

#[utoipa::path(
    post,
    path = "/jobs/{name}/run",
    tag = "jobs",
    params(
        ("name" = String, Path, description = "The job's name"),
    ),
    responses(
        (status = 202, description = "Queued: the run's id", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn run_job(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Path(name) = path?;
    blocking(move || {
        let job = ctx.site.job(&name)?;
        let id = submit(&ctx, &job)?;
        Ok((StatusCode::ACCEPTED, Json(json!({ "run": id }))))
    })
    .await
}

/// Queues a run of `job` asked through the API.
fn submit(ctx: &Ctx, job: &JobDefinition) -> ApiResult<RunId> {
    let name = &job.name;
    ctx.runner
        .submit(job, RunTrigger::Api)
        .map_err(|e| match e {
            SubmitError::Busy { run, .. } => ApiError::new(
                StatusCode::CONFLICT,
                "busy",
                format!("job {name:?} already has run {run} queued or running"),
            ),
            SubmitError::QueueFull(n) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_full",
                format!("the queue is full ({n} runs waiting)"),
            ),
            e => ApiError::internal(e.to_string()),
        })
}

/// A backup without a job: its sources, run now.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct BackupNow {
    /// A repository of the configuration; `default` when not given.
    #[serde(default = "crate::job::default_repository")]
    repository: String,
    /// What to back up, as a job's sources: `paths`, `vm`, `postgres`, `mariadb`,
    /// `image`, `nbd`, `command` (docs/SERVE.md).
    #[schema(value_type = Vec<Object>)]
    source: Vec<cairn_agent::source::Source>,
    #[serde(default)]
    tags: Vec<String>,
}

/// The job name a backup without a job runs and is recorded under.
pub const BACKUP_NOW: &str = "backup-now";

#[utoipa::path(
    post,
    path = "/backups",
    tag = "jobs",
    request_body = BackupNow,
    responses(
        (status = 202, description = "Queued as a run of job `backup-now` (not stored): the run's id", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn backup_now(
    State(ctx): State<Ctx>,
    body: Result<Json<BackupNow>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(b) = body?;
    blocking(move || {
        let job = JobDefinition {
            name: BACKUP_NOW.to_owned(),
            repository: b.repository,
            sources: b.source,
            tags: b.tags,
            host: None,
            retention: None,
            verify: None,
            copy: None,
            notify: Vec::new(),
        };
        ctx.site.check_job(&job)?;
        let id = submit(&ctx, &job)?;
        Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "run": id, "job": BACKUP_NOW })),
        ))
    })
    .await
}

// --- runs --------------------------------------------------------------------------------

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    job: Option<String>,
    status: Option<String>,
    limit: Option<usize>,
    before: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/runs",
    tag = "runs",
    params(
        RunsQuery,
    ),
    responses(
        (status = 200, description = "Runs, newest first", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn list_runs(
    State(ctx): State<Ctx>,
    query: Result<Query<RunsQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = query?;
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(RunStatus::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "status {s:?}: one of queued, running, succeeded, failed, cancelled"
            ))
        })?),
    };
    let limit = q.limit.unwrap_or(100).min(1000);
    blocking(move || {
        let runs = ctx.site.state.runs(&RunQuery {
            job: q.job,
            status,
            limit,
            before: q.before.map(RunId),
        })?;
        Ok(Json(json!({ "runs": runs })))
    })
    .await
}

#[utoipa::path(
    get,
    path = "/runs/{id}",
    tag = "runs",
    params(
        ("id" = i64, Path, description = "The run's id"),
    ),
    responses(
        (status = 200, description = "The run and, while it runs, its live progress", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn get_run(
    State(ctx): State<Ctx>,
    path: Result<Path<i64>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(id) = path?;
    blocking(move || {
        let run = ctx
            .site
            .state
            .run(RunId(id))?
            .ok_or_else(|| ApiError::not_found(format!("no run {id}")))?;
        let live = ctx.runner.live(RunId(id));
        Ok(Json(json!({ "run": run, "progress": live })))
    })
    .await
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    after: Option<i64>,
}

#[utoipa::path(
    get,
    path = "/runs/{id}/log",
    tag = "runs",
    params(
        ("id" = i64, Path, description = "The run's id"),
        LogQuery,
    ),
    responses(
        (status = 200, description = "The run's log lines (structured)", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn run_log(
    State(ctx): State<Ctx>,
    path: Result<Path<i64>, PathRejection>,
    query: Result<Query<LogQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Path(id) = path?;
    let Query(q) = query?;
    blocking(move || {
        if ctx.site.state.run(RunId(id))?.is_none() {
            return Err(ApiError::not_found(format!("no run {id}")));
        }
        let lines = ctx.site.state.log(RunId(id), q.after.unwrap_or(0))?;
        Ok(Json(json!({ "log": lines })))
    })
    .await
}

#[utoipa::path(
    post,
    path = "/runs/{id}/cancel",
    tag = "runs",
    params(
        ("id" = i64, Path, description = "The run's id"),
    ),
    responses(
        (status = 202, description = "Being cancelled", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn cancel_run(
    State(ctx): State<Ctx>,
    path: Result<Path<i64>, PathRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Path(id) = path?;
    blocking(move || {
        let run = ctx
            .site
            .state
            .run(RunId(id))?
            .ok_or_else(|| ApiError::not_found(format!("no run {id}")))?;
        if run.status.is_finished() || !ctx.runner.cancel(RunId(id)) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "finished",
                format!("run {id} is not queued or running here"),
            ));
        }
        Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "run": id, "cancelling": true })),
        ))
    })
    .await
}

fn sse_of(event: &RunEvent) -> SseEvent {
    let name = match &event.kind {
        RunEventKind::Queued { .. } => "queued",
        RunEventKind::Started => "started",
        RunEventKind::Progress(_) => "progress",
        RunEventKind::Message { .. } => "message",
        RunEventKind::Finished { .. } => "finished",
    };
    SseEvent::default()
        .event(name)
        .json_data(event)
        .unwrap_or_else(|_| SseEvent::default().event(name))
}

/// Events of the runs `keep` selects; the stream ends after `last` says so.
fn event_stream(
    rx: broadcast::Receiver<RunEvent>,
    keep: impl Fn(&RunEvent) -> bool + Send + 'static,
    last: impl Fn(&RunEvent) -> bool + Send + 'static,
) -> impl Stream<Item = Result<SseEvent, Infallible>> {
    let keep = Arc::new(keep);
    let last = Arc::new(last);
    futures_util::stream::unfold((rx, false), move |(mut rx, done)| {
        let (keep, last) = (keep.clone(), last.clone());
        async move {
            if done {
                return None;
            }
            loop {
                match rx.recv().await {
                    Ok(e) if keep(&e) => {
                        let end = last(&e);
                        return Some((Ok(sse_of(&e)), (rx, end)));
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let lagged = SseEvent::default()
                            .event("lagged")
                            .data(json!({ "dropped": n }).to_string());
                        return Some((Ok(lagged), (rx, false)));
                    }
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    })
}

#[utoipa::path(
    get,
    path = "/runs/{id}/events",
    tag = "runs",
    params(
        ("id" = i64, Path, description = "The run's id"),
    ),
    responses(
        (status = 200, description = "Server-sent events of the run until it finishes", body = Object, content_type = "text/event-stream"),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn run_events(
    State(ctx): State<Ctx>,
    path: Result<Path<i64>, PathRejection>,
) -> ApiResult<Response> {
    let Path(id) = path?;
    let rx = ctx.hub.tx.subscribe();
    let state = ctx.site.state.clone();
    let run = blocking(move || {
        state
            .run(RunId(id))?
            .ok_or_else(|| ApiError::not_found(format!("no run {id}")))
    })
    .await?;
    if run.status.is_finished() {
        // Nothing more will happen: one event with how it ended.
        let e = RunEvent {
            run: run.id,
            job: run.job.clone(),
            kind: RunEventKind::Finished {
                status: run.status,
                error: run.error.clone(),
                stats: run.stats.clone(),
            },
        };
        let s = futures_util::stream::once(async move { Ok::<_, Infallible>(sse_of(&e)) });
        return Ok(Sse::new(s).into_response());
    }
    let run_id = RunId(id);
    let s = event_stream(
        rx,
        move |e| e.run == run_id,
        |e| matches!(e.kind, RunEventKind::Finished { .. }),
    );
    Ok(Sse::new(s)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

#[utoipa::path(
    get,
    path = "/jobs/{name}/events",
    tag = "jobs",
    params(
        ("name" = String, Path, description = "The job's name"),
    ),
    responses(
        (status = 200, description = "Server-sent events of the job's runs: queued, started, progress, message, finished", body = Object, content_type = "text/event-stream"),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn job_events(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Response> {
    let Path(name) = path?;
    let rx = ctx.hub.tx.subscribe();
    let site = ctx.site.clone();
    let n = name.clone();
    blocking(move || site.job(&n).map_err(ApiError::from)).await?;
    let s = event_stream(rx, move |e| e.job == name, |_| false);
    Ok(Sse::new(s)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

// --- schedules ---------------------------------------------------------------------------

#[utoipa::path(
    get,
    path = "/schedules",
    tag = "schedules",
    responses(
        (status = 200, description = "Every schedule with its next three times", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn list_schedules(State(ctx): State<Ctx>) -> ApiResult<Json<Value>> {
    blocking(move || {
        let all = ctx.site.schedules(chrono::Utc::now(), 3)?;
        Ok(Json(json!({ "schedules": all })))
    })
    .await
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct SchedulePreviewQuery {
    /// A schedule expression: `daily 02:00`, `weekly sun 03:00`, `monthly 15 04:00`,
    /// `every 6h`, a cron expression.
    when: String,
    /// An IANA time zone (UTC by default).
    timezone: Option<String>,
    /// `10m`: the run starts up to this long after its slot.
    jitter: Option<String>,
    /// How many run times (5 by default, 50 at most).
    count: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/schedules/preview",
    tag = "schedules",
    params(SchedulePreviewQuery),
    responses(
        (status = 200, description = "The next run times of the expression (`next`), stored nowhere", body = Object),
        (status = "default", description = "The expression's error, with an example", body = openapi::ErrorBody),
    ),
)]
async fn preview_schedule(
    query: Result<Query<SchedulePreviewQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Query(q) = query?;
    let count = q.count.unwrap_or(5).clamp(1, 50);
    let sched =
        crate::scheduler::schedule_of(&q.when, q.timezone.as_deref(), q.jitter.as_deref(), None)
            .map_err(|e| ApiError::from(SiteError::Schedule(e)))?;
    let next = sched.preview(chrono::Utc::now(), count, &q.when);
    Ok(Json(json!({ "when": q.when, "next": next })))
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewSchedule {
    job: String,
    when: String,
    timezone: Option<String>,
    jitter: Option<String>,
    missed: Option<String>,
    /// `run` (the default) or `verify`: verify the newest snapshot of each of the
    /// job's sources instead of running it.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    action: crate::state::ScheduleAction,
}

#[utoipa::path(
    post,
    path = "/schedules",
    tag = "schedules",
    request_body = NewSchedule,
    responses(
        (status = 201, description = "The schedule as stored", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn add_schedule(
    State(ctx): State<Ctx>,
    body: Result<Json<NewSchedule>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(s) = body?;
    blocking(move || {
        let row = ctx.site.add_schedule(&crate::config::ScheduleConfig {
            job: s.job,
            when: s.when,
            timezone: s.timezone,
            jitter: s.jitter,
            missed: s.missed,
            action: s.action,
        })?;
        Ok((StatusCode::CREATED, Json(json!({ "schedule": row }))))
    })
    .await
}

#[utoipa::path(
    delete,
    path = "/schedules/{id}",
    tag = "schedules",
    params(
        ("id" = i64, Path, description = "The schedule's id"),
    ),
    responses(
        (status = 204, description = "Removed"),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn remove_schedule(
    State(ctx): State<Ctx>,
    path: Result<Path<i64>, PathRejection>,
) -> ApiResult<StatusCode> {
    let Path(id) = path?;
    blocking(move || {
        ctx.site.remove_schedule(ScheduleId(id))?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

async fn set_enabled(ctx: Ctx, id: i64, enabled: bool) -> ApiResult<Json<Value>> {
    blocking(move || {
        ctx.site.enable_schedule(ScheduleId(id), enabled)?;
        Ok(Json(json!({ "schedule": id, "enabled": enabled })))
    })
    .await
}

#[utoipa::path(
    post,
    path = "/schedules/{id}/enable",
    tag = "schedules",
    params(
        ("id" = i64, Path, description = "The schedule's id"),
    ),
    responses(
        (status = 200, description = "Enabled", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn enable_schedule(
    State(ctx): State<Ctx>,
    path: Result<Path<i64>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(id) = path?;
    set_enabled(ctx, id, true).await
}

#[utoipa::path(
    post,
    path = "/schedules/{id}/disable",
    tag = "schedules",
    params(
        ("id" = i64, Path, description = "The schedule's id"),
    ),
    responses(
        (status = 200, description = "Disabled", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn disable_schedule(
    State(ctx): State<Ctx>,
    path: Result<Path<i64>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(id) = path?;
    set_enabled(ctx, id, false).await
}

#[utoipa::path(
    get,
    path = "/missed",
    tag = "schedules",
    responses(
        (status = 200, description = "Slots that passed while the daemon was down, and what was done about them", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn list_missed(State(ctx): State<Ctx>) -> ApiResult<Json<Value>> {
    blocking(move || Ok(Json(json!({ "missed": ctx.site.state.missed(200)? })))).await
}

// --- repositories ------------------------------------------------------------------------

#[utoipa::path(
    get,
    path = "/repositories",
    tag = "repositories",
    responses(
        (status = 200, description = "Every configured repository with its figures (size, snapshots, dedup and compression ratios, locks) or its error", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn list_repositories(State(ctx): State<Ctx>) -> ApiResult<Json<Value>> {
    blocking(move || {
        let mut out = Vec::new();
        for name in ctx.site.repos.names() {
            let path = ctx
                .site
                .repos
                .config(&name)
                .map(|c| c.path.display().to_string());
            let figures = ctx
                .site
                .repos
                .handle(&name)
                .map_err(|e| e.to_string())
                .and_then(|r| crate::repos::Figures::of(&r).map_err(|e| e.to_string()));
            let last_check = ctx.site.state.checks(Some(&name), 1)?.pop();
            out.push(match figures {
                Ok(f) => {
                    json!({ "name": name, "path": path, "status": "ok", "figures": f, "last_check": last_check })
                }
                Err(e) => {
                    json!({ "name": name, "path": path, "status": "error", "error": e, "last_check": last_check })
                }
            });
        }
        Ok(Json(json!({ "repositories": out })))
    })
    .await
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct SnapshotsQuery {
    host: Option<String>,
    tag: Option<String>,
    job: Option<String>,
    limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/repositories/{name}/snapshots",
    tag = "repositories",
    params(
        ("name" = String, Path, description = "A repository of the configuration", example = "default"),
        SnapshotsQuery,
    ),
    responses(
        (status = 200, description = "Snapshots, newest first", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn list_snapshots(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<SnapshotsQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = path?;
    let Query(q) = query?;
    blocking(move || {
        let repo = ctx.site.repos.handle(&name)?;
        let mut tags: Vec<String> = q.tag.into_iter().collect();
        tags.extend(q.job.map(|j| crate::job::job_tag(&j)));
        let filter = cairn_engine::snapshot::SnapshotFilter {
            hosts: q.host.into_iter().collect(),
            tags,
            ..Default::default()
        };
        let all = repo
            .snapshots()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let limit = q.limit.unwrap_or(1000).min(100_000);
        let picked: Vec<Value> = all
            .iter()
            .rev()
            .filter(|s| filter.matches(&s.manifest))
            .take(limit)
            .map(|s| {
                json!({
                    "id": s.id.to_string(),
                    "time": s.manifest.time,
                    "host": s.manifest.host,
                    "kind": s.manifest.kind,
                    "source": s.manifest.source_label(),
                    "database": cairn_agent::database::DatabaseMeta::from_meta(&s.manifest.meta)
                        .map(|d| json!({
                            "engine": d.engine.as_str(),
                            "method": match d.method {
                                cairn_agent::database::Method::Physical => "physical",
                                cairn_agent::database::Method::Logical => "logical",
                            },
                        })),
                    "vm": s.manifest.meta.get(cairn_agent::libvirt::backup::meta::NAME),
                    "tags": s.manifest.tags,
                    "summary": s.manifest.summary,
                })
            })
            .collect();
        Ok(Json(json!({ "snapshots": picked })))
    })
    .await
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct PathQuery {
    path: Option<String>,
}

#[utoipa::path(
    get,
    path = "/repositories/{name}/snapshots/{id}/ls",
    tag = "repositories",
    params(
        ("name" = String, Path, description = "A repository of the configuration", example = "default"),
        ("id" = String, Path, description = "A snapshot id, a unique prefix of one, or latest", example = "latest"),
        PathQuery,
    ),
    responses(
        (status = 200, description = "A directory of the snapshot: names, types, sizes, modes, times", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn snapshot_ls(
    State(ctx): State<Ctx>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<PathQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Path((name, id)) = path?;
    let Query(q) = query?;
    let inside = browse::snapshot_path(q.path.as_deref().unwrap_or("/"))?;
    blocking(move || {
        let repo = ctx.site.repos.handle(&name)?;
        let snap = browse::find(&repo, &id)?;
        let entries = browse::list(&repo, &snap, &inside)?;
        Ok(Json(
            json!({ "snapshot": snap.id.to_string(), "path": inside, "entries": entries }),
        ))
    })
    .await
}

#[utoipa::path(
    get,
    path = "/repositories/{name}/snapshots/{id}/file",
    tag = "repositories",
    params(
        ("name" = String, Path, description = "A repository of the configuration", example = "default"),
        ("id" = String, Path, description = "A snapshot id, a unique prefix of one, or latest", example = "latest"),
        PathQuery,
    ),
    responses(
        (status = 200, description = "The file's bytes", body = String, content_type = "application/octet-stream"),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn snapshot_file(
    State(ctx): State<Ctx>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<PathQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let Path((name, id)) = path?;
    let Query(q) = query?;
    let raw = q
        .path
        .ok_or_else(|| ApiError::bad_request("path: name the file (?path=/etc/hosts)"))?;
    let inside = browse::snapshot_path(&raw)?;
    let site = ctx.site.clone();
    let (repo, node) = blocking(move || {
        let repo = site.repos.handle(&name)?;
        let snap = browse::find(&repo, &id)?;
        let node = browse::file(&repo, &snap, &inside)?;
        Ok((repo, node))
    })
    .await?;
    let size = node.size;
    let file_name = String::from_utf8_lossy(&node.name).replace(['"', '\\', '\r', '\n'], "_");
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        let sent = browse::read_file(&repo, &node, &mut |chunk| {
            tx.blocking_send(Ok(chunk)).is_ok()
        });
        if let Err(e) = sent {
            // The client sees a cut body (its length is short): never wrong bytes.
            let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
        }
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
            (header::CONTENT_LENGTH, size.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{file_name}\""),
            ),
        ],
        body,
    )
        .into_response())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct RestoreRequest {
    target: String,
    #[serde(default)]
    include: Vec<String>,
    /// Only say what the restore would do: files, bytes, and whether the target is
    /// refused (it must be new or an empty directory) with what is in it.
    #[serde(default)]
    dry_run: bool,
}

#[utoipa::path(
    post,
    path = "/repositories/{name}/snapshots/{id}/restore",
    tag = "repositories",
    params(
        ("name" = String, Path, description = "A repository of the configuration"),
        ("id" = String, Path, description = "A snapshot id, a unique prefix of one, or latest"),
    ),
    request_body = RestoreRequest,
    responses(
        (status = 200, description = "What was restored (or, dry, what would be: files, bytes, a conflict)", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn snapshot_restore(
    State(ctx): State<Ctx>,
    path: Result<Path<(String, String)>, PathRejection>,
    body: Result<Json<RestoreRequest>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Path((name, id)) = path?;
    let Json(r) = body?;
    let includes = r
        .include
        .iter()
        .map(|p| browse::snapshot_path(p))
        .collect::<Result<Vec<_>, _>>()?;
    if r.dry_run {
        return blocking(move || {
            let repo = ctx.site.repos.handle(&name)?;
            let snap = browse::find(&repo, &id)?;
            let preview = browse::restore_preview(&repo, &snap, &r.target, &includes)?;
            Ok(Json(
                json!({ "snapshot": snap.id.to_string(), "dry_run": true, "preview": preview }),
            ))
        })
        .await;
    }
    let target = browse::restore_target(&r.target)?;
    blocking(move || {
        let repo = ctx.site.repos.handle(&name)?;
        repo.lock(
            cairn_engine::lock::LockKind::Shared,
            "restore (api)",
            Duration::from_secs(60),
        )
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "locked", e.to_string()))?;
        let snap = browse::find(&repo, &id)?;
        let outcome = browse::restore(&repo, &snap, &target, &includes)?;
        Ok(Json(
            json!({ "snapshot": snap.id.to_string(), "target": target, "restored": outcome }),
        ))
    })
    .await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ForgetRequest {
    snapshots: Vec<String>,
    #[serde(default)]
    dry_run: bool,
}

#[utoipa::path(
    post,
    path = "/repositories/{name}/forget",
    tag = "repositories",
    params(
        ("name" = String, Path, description = "A repository of the configuration"),
    ),
    request_body = ForgetRequest,
    responses(
        (status = 200, description = "What was (or, dry, would be) removed", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn forget_snapshots(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<ForgetRequest>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = path?;
    let Json(r) = body?;
    if r.snapshots.is_empty() {
        return Err(ApiError::bad_request(
            "snapshots: name at least one (id prefixes or latest)",
        ));
    }
    blocking(move || {
        let repo = ctx.site.repos.handle(&name)?;
        repo.lock(
            cairn_engine::lock::LockKind::Shared,
            "forget (api)",
            Duration::from_secs(60),
        )
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, "locked", e.to_string()))?;
        let all = repo
            .snapshots()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let plan = cairn_engine::forget::plan_named(&all, &r.snapshots).map_err(|e| match e {
            cairn_engine::Error::NotFound(m) => ApiError::not_found(m),
            cairn_engine::Error::InvalidInput(m) => ApiError::bad_request(m),
            other => ApiError::internal(other.to_string()),
        })?;
        let removed = if r.dry_run {
            plan.removed().count()
        } else {
            cairn_engine::forget::apply(&repo, &plan)
                .map_err(|e| ApiError::internal(e.to_string()))?
        };
        Ok(Json(
            json!({ "dry_run": r.dry_run, "removed": removed, "snapshots": plan.decisions }),
        ))
    })
    .await
}

#[utoipa::path(
    get,
    path = "/repositories/{name}/locks",
    tag = "repositories",
    params(
        ("name" = String, Path, description = "A repository of the configuration", example = "default"),
    ),
    responses(
        (status = 200, description = "The repository's locks, stale ones marked", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn repository_locks(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = path?;
    blocking(move || {
        let repo = ctx.site.repos.handle(&name)?;
        let locks = cairn_engine::lock::list(repo.backend())
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let out: Vec<Value> = locks
            .iter()
            .map(|l| json!({ "name": l.name, "lock": l.info.as_ref().ok(), "error": l.info.as_ref().err(), "stale": l.stale }))
            .collect();
        Ok(Json(json!({ "locks": out })))
    })
    .await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct UnlockRequest {
    /// Remove every lock, live ones too (default: only stale ones).
    #[serde(default)]
    all: bool,
}

#[utoipa::path(
    post,
    path = "/repositories/{name}/unlock",
    tag = "repositories",
    params(
        ("name" = String, Path, description = "A repository of the configuration", example = "default"),
    ),
    request_body = UnlockRequest,
    responses(
        (status = 200, description = "The locks removed (stale ones, or all with `all`)", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn unlock_repository(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<UnlockRequest>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = path?;
    let Json(r) = body?;
    blocking(move || {
        let repo = ctx.site.repos.handle(&name)?;
        let removed = cairn_engine::lock::unlock(repo.backend(), r.all)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let names: Vec<&str> = removed.iter().map(|l| l.name.as_str()).collect();
        Ok(Json(json!({ "removed": names })))
    })
    .await
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct DiffQuery {
    /// The older snapshot: an id, a unique prefix, or latest.
    from: String,
    /// The newer snapshot.
    to: String,
    /// At most this many changes (default 10000); `truncated` says when there were more.
    limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/repositories/{name}/diff",
    tag = "repositories",
    params(
        ("name" = String, Path, description = "A repository of the configuration", example = "default"),
        DiffQuery,
    ),
    responses(
        (status = 200, description = "The paths added, removed, modified, changed in metadata or type from one snapshot to the other, in path order", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn snapshot_diff(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<DiffQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = path?;
    let Query(q) = query?;
    let limit = q.limit.unwrap_or(10_000);
    blocking(move || {
        let repo = ctx.site.repos.handle(&name)?;
        let from = browse::find(&repo, &q.from)?;
        let to = browse::find(&repo, &q.to)?;
        let mut changes = cairn_engine::diff::diff(&repo, &from.manifest.root, &to.manifest.root)
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let total = changes.len();
        changes.truncate(limit);
        Ok(Json(json!({
            "from": from.id.to_string(),
            "to": to.id.to_string(),
            "total": total,
            "truncated": total > limit,
            "changes": changes,
        })))
    })
    .await
}

/// A recovery session as the API shows it: its connection password left out (the
/// host's `repo recover list` shows it to whoever may read the host state).
/// The host's recovery sessions (the daemon's state directory).
fn recovery_store(ctx: &Ctx) -> ApiResult<cairn_recover::Store> {
    cairn_recover::Store::open(&ctx.site.state_dir).map_err(|e| ApiError::internal(e.to_string()))
}

fn session_view(r: &cairn_recover::SessionRecord) -> Value {
    let mut v = json!(r);
    if let Some(o) = v.as_object_mut() {
        o.remove("password");
        o.insert("layer_bytes".into(), json!(r.layer_bytes()));
    }
    v
}

#[utoipa::path(
    get,
    path = "/recovery",
    tag = "recovery",
    responses(
        (status = 200, description = "Recovery sessions on this host (passwords left out)", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn list_recovery(State(ctx): State<Ctx>) -> ApiResult<Json<Value>> {
    blocking(move || {
        let store = recovery_store(&ctx)?;
        let sessions = store
            .list()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let out: Vec<Value> = sessions.iter().map(session_view).collect();
        Ok(Json(json!({ "sessions": out })))
    })
    .await
}

#[utoipa::path(
    post,
    path = "/recovery/{id}/stop",
    tag = "recovery",
    params(
        ("id" = String, Path, description = "The session's id"),
    ),
    responses(
        (status = 200, description = "The session, taken down", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn stop_recovery(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(id) = path?;
    blocking(move || {
        let store = recovery_store(&ctx)?;
        match cairn_recover::stop(&store, &id) {
            Ok(r) => Ok(Json(json!({ "stopped": session_view(&r) }))),
            Err(cairn_recover::RecoverError::NoSession(_)) => {
                Err(ApiError::not_found(format!("no recovery session {id:?}")))
            }
            Err(e) => Err(ApiError::internal(e.to_string())),
        }
    })
    .await
}

#[utoipa::path(
    post,
    path = "/recovery/{id}/connection",
    tag = "recovery",
    params(
        ("id" = String, Path, description = "The session's id"),
    ),
    responses(
        (status = 200, description = "The session's connection string, password included (`connection`): a change-capable token's, and audited, since listings leave the password out", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn recovery_connection(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(id) = path?;
    blocking(move || {
        let store = recovery_store(&ctx)?;
        let sessions = store
            .list()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        let s = sessions
            .iter()
            .find(|s| s.id == id)
            .ok_or_else(|| ApiError::not_found(format!("no recovery session {id:?}")))?;
        let connection = s.connection_string().ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                format!("recovery session {id:?} is not a database's: it has no connection string"),
            )
        })?;
        Ok(Json(json!({ "id": id, "connection": connection })))
    })
    .await
}

#[utoipa::path(
    get,
    path = "/notifications",
    tag = "daemon",
    responses(
        (status = 200, description = "The notification targets of the configuration a job may name (`notifications`: name, kind, what it hears about); no address, URL or secret", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn list_notifications(State(ctx): State<Ctx>) -> ApiResult<Json<Value>> {
    let out: Vec<Value> = ctx
        .site
        .config
        .notifications
        .iter()
        .map(|(name, t)| {
            let kind = match t.kind {
                crate::config::TargetKind::Email { .. } => "email",
                crate::config::TargetKind::Webhook { .. } => "webhook",
            };
            json!({ "name": name, "kind": kind, "on": t.on })
        })
        .collect();
    Ok(Json(json!({ "notifications": out })))
}

#[utoipa::path(
    post,
    path = "/notifications/{name}/test",
    tag = "daemon",
    params(
        ("name" = String, Path, description = "A notification target of the configuration"),
    ),
    responses(
        (status = 200, description = "A test notice was delivered to the target, once (no retry)", body = Object),
        (status = "default", description = "An error: 404 for an unknown target, 502 `delivery` with the mail server's or webhook's answer", body = openapi::ErrorBody),
    ),
)]
async fn test_notification(
    State(ctx): State<Ctx>,
    axum::Extension(who): axum::Extension<Principal>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = path?;
    if !ctx.site.config.notifications.contains_key(&name) {
        return Err(ApiError::not_found(format!(
            "no notification target {name:?} in {}",
            ctx.site.config_origin
        )));
    }
    blocking(move || {
        let host = cairn_engine::repository::current_host();
        crate::notify::send_test(&ctx.site.config.notifications, &name, &who.name, &host)
            .map_err(|e| ApiError::new(StatusCode::BAD_GATEWAY, "delivery", e.to_string()))?;
        Ok(Json(json!({ "name": name, "delivered": true })))
    })
    .await
}

// --- tokens ------------------------------------------------------------------------------

#[utoipa::path(
    get,
    path = "/tokens",
    tag = "daemon",
    responses(
        (status = 200, description = "The API tokens (`tokens`: name, read_only, created, last_used); never a secret, which is not stored", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn list_tokens(State(ctx): State<Ctx>) -> ApiResult<Json<Value>> {
    blocking(move || Ok(Json(json!({ "tokens": ctx.site.state.tokens()? })))).await
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct NewToken {
    /// 1-64 letters, digits, '-', '_' or '.'.
    name: String,
    /// It may only read.
    #[serde(default)]
    read_only: bool,
}

#[utoipa::path(
    post,
    path = "/tokens",
    tag = "daemon",
    request_body = NewToken,
    responses(
        (status = 201, description = "The token, its secret (`token`) shown this once: only its hash is kept", body = Object),
        (status = "default", description = "An error: 409 `exists`, 422 for a bad name", body = openapi::ErrorBody),
    ),
)]
async fn create_token(
    State(ctx): State<Ctx>,
    body: Result<Json<NewToken>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(t) = body?;
    blocking(move || {
        let secret = auth::create(&ctx.site.state, &t.name, t.read_only)?;
        Ok((
            StatusCode::CREATED,
            Json(json!({ "name": t.name, "read_only": t.read_only, "token": secret })),
        ))
    })
    .await
}

#[utoipa::path(
    delete,
    path = "/tokens/{name}",
    tag = "daemon",
    params(
        ("name" = String, Path, description = "The token's name"),
    ),
    responses(
        (status = 204, description = "Revoked, with the dashboard sessions it opened"),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn revoke_token(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<StatusCode> {
    let Path(name) = path?;
    blocking(move || {
        if ctx.site.state.remove_token(&name)? {
            Ok(StatusCode::NO_CONTENT)
        } else {
            Err(ApiError::not_found(format!("no token {name:?}")))
        }
    })
    .await
}

#[utoipa::path(
    get,
    path = "/databases",
    tag = "recovery",
    responses(
        (status = 200, description = "The database servers of this host a job's source reaches with an empty connection (`databases`: engine, connection, location)", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn list_databases() -> ApiResult<Json<Value>> {
    blocking(move || {
        Ok(Json(
            json!({ "databases": cairn_agent::discover::local_databases() }),
        ))
    })
    .await
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct ChecksQuery {
    /// How many (20 by default, 500 at most).
    limit: Option<usize>,
}

#[utoipa::path(
    get,
    path = "/repositories/{name}/checks",
    tag = "repositories",
    params(
        ("name" = String, Path, description = "A repository of the configuration"),
        ChecksQuery,
    ),
    responses(
        (status = 200, description = "The repository's last checks, newest first (`checks`: at, ok, how, problems, by), through the API or a job's verify, kept across restarts", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn repository_checks(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<ChecksQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = path?;
    let Query(q) = query?;
    ctx.site.repos.known_config(&name)?;
    blocking(move || {
        let limit = q.limit.unwrap_or(20).clamp(1, 500);
        Ok(Json(
            json!({ "checks": ctx.site.state.checks(Some(&name), limit)? }),
        ))
    })
    .await
}

#[utoipa::path(
    get,
    path = "/repositories/{name}/sources",
    tag = "repositories",
    params(
        ("name" = String, Path, description = "A repository of the configuration"),
    ),
    responses(
        (status = 200, description = "What the repository protects (`sources`): one entry per host, source and job (from the `job:NAME` tag), with its number of snapshots and its newest one", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn repository_sources(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = path?;
    blocking(move || {
        let repo = ctx.site.repos.handle(&name)?;
        let all = repo
            .snapshots()
            .map_err(|e| ApiError::internal(e.to_string()))?;
        Ok(Json(
            json!({ "sources": crate::repos::protected_sources(&all) }),
        ))
    })
    .await
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
struct GrowthQuery {
    /// How far back (90 days by default, 3660 at most).
    days: Option<u32>,
}

/// At most this many points in a growth answer: the last sample of each even slice of
/// the period.
const GROWTH_POINTS: usize = 200;

#[utoipa::path(
    get,
    path = "/repositories/{name}/growth",
    tag = "repositories",
    params(
        ("name" = String, Path, description = "A repository of the configuration"),
        GrowthQuery,
    ),
    responses(
        (status = 200, description = "The repository's size over time (`samples`: at, size_bytes, logical_bytes, snapshots; oldest first, 200 at most), sampled after each run", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn repository_growth(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
    query: Result<Query<GrowthQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = path?;
    let Query(q) = query?;
    ctx.site.repos.known_config(&name)?;
    let days = q.days.unwrap_or(90).clamp(1, 3660);
    blocking(move || {
        let now = chrono::Utc::now();
        let since = now - chrono::Duration::days(i64::from(days));
        let all = ctx.site.state.sizes(&name, since)?;
        Ok(Json(json!({
            "since": since,
            "until": now,
            "samples": thin(all, since, now, GROWTH_POINTS),
        })))
    })
    .await
}

/// The last sample of each of `points` even slices of `since..until`.
fn thin(
    all: Vec<crate::state::SizeSample>,
    since: chrono::DateTime<chrono::Utc>,
    until: chrono::DateTime<chrono::Utc>,
    points: usize,
) -> Vec<crate::state::SizeSample> {
    if all.len() <= points {
        return all;
    }
    let span = (until - since).num_milliseconds().max(1);
    let slice_of = |at: chrono::DateTime<chrono::Utc>| {
        let offset = (at - since).num_milliseconds().clamp(0, span - 1);
        usize::try_from(offset * i64::try_from(points).unwrap_or(1) / span).unwrap_or(0)
    };
    let mut out: Vec<crate::state::SizeSample> = Vec::with_capacity(points);
    let mut last_slice = None;
    for s in all {
        let slice = slice_of(s.at);
        if last_slice == Some(slice) {
            if let Some(l) = out.last_mut() {
                *l = s;
            }
        } else {
            out.push(s);
            last_slice = Some(slice);
        }
    }
    out
}

#[utoipa::path(
    get,
    path = "/audit",
    tag = "daemon",
    responses(
        (status = 200, description = "The last 500 changes: who, what, when, the status", body = Object),
        (status = "default", description = "An error", body = openapi::ErrorBody),
    ),
)]
async fn audit_log(State(ctx): State<Ctx>) -> ApiResult<Json<Value>> {
    blocking(move || Ok(Json(json!({ "audit": ctx.site.state.audit_log(500)? })))).await
}

#[cfg(test)]
mod tests {
    use super::{action_of, thin};

    #[test]
    fn actions_are_named_by_what_and_verb() {
        for (method, path, want) in [
            ("POST", "/api/v1/jobs", "jobs.create"),
            ("DELETE", "/api/v1/jobs/nightly", "jobs.delete"),
            ("POST", "/api/v1/jobs/nightly/run", "jobs.run"),
            ("POST", "/api/v1/recovery/db", "recovery.db"),
            ("POST", "/api/v1/vms/clone", "vms.clone"),
            (
                "POST",
                "/api/v1/repositories/default/prune",
                "repositories.prune",
            ),
            (
                "DELETE",
                "/api/v1/vms/web/snapshots/before-upgrade",
                "vms.snapshots.delete",
            ),
            ("POST", "/api/v1/", "unknown"),
        ] {
            assert_eq!(action_of(method, path), want, "{method} {path}");
        }
    }

    #[test]
    fn growth_keeps_the_last_sample_of_each_slice_and_every_sample_when_few() {
        let since = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&chrono::Utc);
        let until = since + chrono::Duration::days(10);
        let sample = |hours: i64, size: u64| crate::state::SizeSample {
            at: since + chrono::Duration::hours(hours),
            size_bytes: size,
            logical_bytes: 0,
            snapshots: 0,
        };
        // One a day for ten days: ten slices of one day keep the last of each.
        let all: Vec<_> = (0..240)
            .map(|h| sample(h, u64::try_from(h).unwrap()))
            .collect();
        let kept = thin(all.clone(), since, until, 10);
        let sizes: Vec<u64> = kept.iter().map(|s| s.size_bytes).collect();
        assert_eq!(sizes, (0..10).map(|d| d * 24 + 23).collect::<Vec<u64>>());
        assert_eq!(thin(all[..5].to_vec(), since, until, 10).len(), 5);
        assert!(thin(Vec::new(), since, until, 10).is_empty());
    }
}
