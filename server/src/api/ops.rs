//! The API's operations beside jobs: starting recovery sessions, the hypervisor's
//! domains, and check, prune and repair of a repository. Each handler is one call of
//! [`crate::operations`] on a blocking thread. They answer when the operation is done
//! (a recovery when its database accepts connections or its VM is started), so they run
//! without the request timeout.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use serde_json::{json, Value};

use super::{blocking, session_view, ApiError, ApiResult, Ctx};
use crate::operations::{
    self, CheckRequest, CommitRequest, DbRecovery, OperationError, PruneRequest, RepairRequest,
    VmAction, VmClone, VmRecovery,
};

impl From<OperationError> for ApiError {
    fn from(e: OperationError) -> Self {
        use cairn_agent::libvirt::VmError;
        use cairn_recover::RecoverError;
        match e {
            OperationError::Repo(r) => r.into(),
            OperationError::Snapshot(b) => b.into(),
            OperationError::Invalid(m) => Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m),
            OperationError::NotFound(m) => Self::not_found(m),
            OperationError::Locked(m) => Self::new(StatusCode::CONFLICT, "locked", m),
            OperationError::Vm(v) => {
                let m = v.to_string();
                match v {
                    VmError::NoSuchDomain(_) => Self::not_found(m),
                    VmError::AlreadyRunning(_) | VmError::NotRunning(_) => {
                        Self::new(StatusCode::CONFLICT, "vm_state", m)
                    }
                    VmError::Unreachable { .. } => {
                        Self::new(StatusCode::SERVICE_UNAVAILABLE, "hypervisor", m)
                    }
                    _ => Self::new(StatusCode::BAD_GATEWAY, "hypervisor", m),
                }
            }
            OperationError::Recover(r) => {
                let m = r.to_string();
                match r {
                    RecoverError::NotADatabase(_) => {
                        Self::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m)
                    }
                    RecoverError::NoSession(_) => Self::not_found(m),
                    RecoverError::Docker(_) => {
                        Self::new(StatusCode::SERVICE_UNAVAILABLE, "docker", m)
                    }
                    _ => Self::new(StatusCode::BAD_GATEWAY, "recovery", m),
                }
            }
            OperationError::Engine(e) => Self::internal(e.to_string()),
        }
    }
}

/// Start a database recovery session.
#[utoipa::path(
    post,
    path = "/recovery/db",
    tag = "recovery",
    request_body = DbRecovery,
    responses(
        (status = 201, description = "The session, its database accepting connections, and its connection string: the only answer that holds the password (listings leave it out)", body = Object),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn recover_database(
    State(ctx): State<Ctx>,
    body: Result<Json<DbRecovery>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(req) = body?;
    blocking(move || {
        let rec = operations::recover_database(&ctx.site, &req)?;
        Ok((
            StatusCode::CREATED,
            Json(json!({ "session": session_view(&rec), "connection": rec.connection_string() })),
        ))
    })
    .await
}

/// Back up a writable database session's current state as a new snapshot.
#[utoipa::path(
    post,
    path = "/recovery/{id}/commit",
    tag = "recovery",
    params(("id" = String, Path, description = "The session's id")),
    request_body = CommitRequest,
    responses(
        (status = 201, description = "The new snapshot of the session's source (its parent: the session's snapshot); the server was frozen for the backup and runs again", body = Object),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn commit_recovery(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<CommitRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Path(id) = path?;
    let Json(req) = body?;
    blocking(move || {
        let snap = operations::commit_recovery(&ctx.site, &id, &req)?;
        Ok((
            StatusCode::CREATED,
            Json(json!({ "snapshot": {
                "id": snap.id.to_string(),
                "time": snap.manifest.time,
                "parent": snap.manifest.parent.map(|p| p.to_string()),
                "source": snap.manifest.source_label(),
                "tags": snap.manifest.tags,
                "summary": snap.manifest.summary,
            }})),
        ))
    })
    .await
}

/// Start a VM recovery session.
#[utoipa::path(
    post,
    path = "/recovery/vm",
    tag = "recovery",
    request_body = VmRecovery,
    responses(
        (status = 201, description = "The session, its domain defined and (unless told) started", body = Object),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn recover_vm(
    State(ctx): State<Ctx>,
    body: Result<Json<VmRecovery>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(req) = body?;
    blocking(move || {
        let rec = operations::recover_vm(&ctx.site, &req)?;
        Ok((
            StatusCode::CREATED,
            Json(json!({ "session": session_view(&rec), "domain": rec.domain })),
        ))
    })
    .await
}

/// The hypervisor's domains.
#[utoipa::path(
    get,
    path = "/vms",
    tag = "vms",
    responses(
        (status = 200, description = "Every domain: name, UUID, state, disks", body = Object),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn list_vms(State(ctx): State<Ctx>) -> ApiResult<Json<Value>> {
    blocking(move || Ok(Json(json!({ "vms": operations::list_vms(&ctx.site)? })))).await
}

/// Start, shut down, power off or reboot a domain.
#[utoipa::path(
    post,
    path = "/vms/{name}/{action}",
    tag = "vms",
    params(
        ("name" = String, Path, description = "The domain's name"),
        ("action" = String, Path, description = "start, shutdown, power_off or reboot"),
    ),
    responses(
        (status = 200, description = "The domain afterwards", body = Object),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn vm_action(
    State(ctx): State<Ctx>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path((name, action)) = path?;
    let action: VmAction = serde_json::from_value(Value::String(action.clone())).map_err(|_| {
        ApiError::not_found(format!(
            "no VM action {action:?}: start, shutdown, power_off or reboot"
        ))
    })?;
    blocking(move || {
        let vm = operations::vm_action(&ctx.site, &name, action)?;
        Ok(Json(json!({ "vm": vm, "done": action })))
    })
    .await
}

/// The domain's libvirt snapshots.
#[utoipa::path(
    get,
    path = "/vms/{name}/snapshots",
    tag = "vms",
    params(
        ("name" = String, Path, description = "The domain's name"),
    ),
    responses(
        (status = 200, description = "Their names, oldest first", body = Object),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn vm_snapshots(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = path?;
    blocking(move || {
        let snapshots = operations::vm_snapshots(&ctx.site, &name)?;
        Ok(Json(json!({ "vm": name, "snapshots": snapshots })))
    })
    .await
}

/// Delete one of the domain's libvirt snapshots.
#[utoipa::path(
    delete,
    path = "/vms/{name}/snapshots/{snapshot}",
    tag = "vms",
    params(
        ("name" = String, Path, description = "The domain's name"),
        ("snapshot" = String, Path, description = "The libvirt snapshot's name"),
    ),
    responses(
        (status = 204, description = "Deleted"),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn delete_vm_snapshot(
    State(ctx): State<Ctx>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> ApiResult<StatusCode> {
    let Path((name, snapshot)) = path?;
    blocking(move || {
        operations::delete_vm_snapshot(&ctx.site, &name, &snapshot)?;
        Ok(StatusCode::NO_CONTENT)
    })
    .await
}

/// Restore a VM snapshot whole as a new domain (defined, not started).
#[utoipa::path(
    post,
    path = "/vms/clone",
    tag = "vms",
    request_body = VmClone,
    responses(
        (status = 201, description = "The new domain and where its disks are", body = Object),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn clone_vm(
    State(ctx): State<Ctx>,
    body: Result<Json<VmClone>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(req) = body?;
    blocking(move || {
        let r = operations::clone_vm(&ctx.site, &req)?;
        Ok((StatusCode::CREATED, Json(json!({ "restored": r }))))
    })
    .await
}

/// Check a repository's structure (and, asked, its data).
#[utoipa::path(
    post,
    path = "/repositories/{name}/check",
    tag = "repositories",
    params(
        ("name" = String, Path, description = "A repository of the configuration"),
    ),
    request_body = CheckRequest,
    responses(
        (status = 200, description = "The check's report: `ok`, the problems found", body = Object),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn check(
    State(ctx): State<Ctx>,
    axum::Extension(who): axum::Extension<crate::login::Principal>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<CheckRequest>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = path?;
    let Json(req) = body?;
    blocking(move || {
        let report = operations::check(&ctx.site, &name, &req)?;
        let check = crate::state::CheckRecord {
            repository: name,
            at: chrono::Utc::now(),
            ok: report.ok(),
            how: req.how(),
            problems: Some(report.problems.len() as u64),
            by: who.name,
        };
        ctx.site.state.record_check(&check)?;
        ctx.metrics.checked(&check);
        Ok(Json(json!({ "ok": report.ok(), "report": report })))
    })
    .await
}

/// Free what no snapshot uses.
#[utoipa::path(
    post,
    path = "/repositories/{name}/prune",
    tag = "repositories",
    params(
        ("name" = String, Path, description = "A repository of the configuration"),
    ),
    request_body = PruneRequest,
    responses(
        (status = 200, description = "What was (or, dry, would be) deleted and rewritten", body = Object),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn prune(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<PruneRequest>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = path?;
    let Json(req) = body?;
    blocking(move || {
        Ok(Json(
            json!({ "report": operations::prune(&ctx.site, &name, &req)? }),
        ))
    })
    .await
}

/// Rebuild the index from the packs and mark what is lost.
#[utoipa::path(
    post,
    path = "/repositories/{name}/repair",
    tag = "repositories",
    params(
        ("name" = String, Path, description = "A repository of the configuration"),
    ),
    request_body = RepairRequest,
    responses(
        (status = 200, description = "What was found and rebuilt", body = Object),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn repair(
    State(ctx): State<Ctx>,
    path: Result<Path<String>, PathRejection>,
    body: Result<Json<RepairRequest>, JsonRejection>,
) -> ApiResult<Json<Value>> {
    let Path(name) = path?;
    let Json(req) = body?;
    blocking(move || {
        Ok(Json(
            json!({ "report": operations::repair(&ctx.site, &name, &req)? }),
        ))
    })
    .await
}

/// A verification asked for through the API: which snapshot, and how (what is not
/// given takes `repo verify`'s defaults).
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    /// A repository of the configuration; `default` when not given.
    #[serde(default = "default_repository")]
    pub repository: String,
    /// A snapshot id (or its prefix), or `latest`.
    pub snapshot: String,
    #[serde(default)]
    pub how: crate::job::VerifySpec,
}

fn default_repository() -> String {
    "default".into()
}

/// Verify a snapshot now: a VM's boots in a lab, a database's starts and is checked, a
/// file tree's sample is restored and compared.
#[utoipa::path(
    post,
    path = "/verifications",
    tag = "verification",
    request_body = VerifyRequest,
    responses(
        (status = 201, description = "The verification, done: its status (a failure is a result), every step timed", body = Object),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn verify_snapshot(
    State(ctx): State<Ctx>,
    body: Result<Json<VerifyRequest>, JsonRejection>,
) -> ApiResult<(StatusCode, Json<Value>)> {
    let Json(req) = body?;
    blocking(move || {
        let v = ctx
            .verifier
            .verify(&req.repository, &req.snapshot, &req.how, None, "api")?;
        Ok((StatusCode::CREATED, Json(json!({ "verification": v }))))
    })
    .await
}

/// Which verifications a listing shows.
#[derive(Debug, serde::Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(super) struct VerificationQuery {
    /// vm, db or files.
    kind: Option<String>,
    /// pending, running, passed, failed or warning.
    status: Option<String>,
    /// A snapshot id or its prefix.
    snapshot: Option<String>,
    /// At most this many, newest first (100 when not given).
    limit: Option<usize>,
}

/// The host's verifications, newest first.
#[utoipa::path(
    get,
    path = "/verifications",
    tag = "verification",
    params(VerificationQuery),
    responses(
        (status = 200, description = "The verifications, each with its steps", body = Object),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn list_verifications(
    State(ctx): State<Ctx>,
    query: Result<Query<VerificationQuery>, QueryRejection>,
) -> ApiResult<Json<Value>> {
    use cairn_recover::verify::{results::Filter, Kind, Status};
    let Query(q) = query?;
    let kind = match q.kind.as_deref() {
        None => None,
        Some(k) => Some(
            Kind::parse(k)
                .ok_or_else(|| ApiError::bad_request(format!("kind {k:?}: vm, db or files")))?,
        ),
    };
    let status = match q.status.as_deref() {
        None => None,
        Some(s) => Some(Status::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "status {s:?}: pending, running, passed, failed or warning"
            ))
        })?),
    };
    let filter = Filter {
        kind,
        status,
        snapshot: q.snapshot,
        limit: q.limit.unwrap_or(100),
    };
    blocking(move || {
        Ok(Json(
            json!({ "verifications": ctx.verifier.list(&filter)? }),
        ))
    })
    .await
}

/// One verification with its steps and log.
#[utoipa::path(
    get,
    path = "/verifications/{id}",
    tag = "verification",
    params(("id" = i64, Path, description = "The verification's id")),
    responses(
        (status = 200, description = "The verification", body = Object),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn get_verification(
    State(ctx): State<Ctx>,
    path: Result<Path<i64>, PathRejection>,
) -> ApiResult<Json<Value>> {
    let Path(id) = path?;
    blocking(move || Ok(Json(json!({ "verification": ctx.verifier.get(id)? })))).await
}

/// Totals, success rate, average duration by test, the last verification, and the
/// backups never verified or not lately.
#[utoipa::path(
    get,
    path = "/verifications/stats",
    tag = "verification",
    responses(
        (status = 200, description = "The host's verification statistics", body = Object),
        (status = "default", body = super::openapi::ErrorBody),
    ),
)]
pub(super) async fn verification_stats(State(ctx): State<Ctx>) -> ApiResult<Json<Value>> {
    blocking(move || Ok(Json(json!({ "stats": ctx.verifier.stats()? })))).await
}
