//! The OpenAPI 3 document of `/api/v1`, generated from the handlers' `#[utoipa::path]`
//! annotations and the request types' schemas, served at `/api/v1/openapi.json`.
//!
//! Responses of listings and records are documented as JSON objects with a description
//! (their fields are in docs/SERVE.md); requests, errors and security are documented
//! exactly, so that a client generator or a fuzzer (the tests run schemathesis against
//! it) knows what to send and what can come back.

use std::sync::OnceLock;

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::job::{JobDefinition, Retention, Verify};
use crate::operations::{
    CheckRequest, CommitRequest, DbRecovery, PruneRequest, RepairRequest, VmClone, VmRecovery,
};

/// Every error's body.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, for programs: `not_found`, `bad_request`, `invalid`, `unauthorized`,
    /// `read_only`, `conflict`, `busy`, `locked`, `too_large`, `timeout`, `internal`...
    pub code: String,
    /// For people.
    pub message: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "cairn: repo serve",
        description = "The control plane of a cairn site: jobs, schedules, runs, repositories, snapshots, recovery sessions, VMs. Every route but /health, /openapi.json and POST /session needs `Authorization: Bearer <token>` (`repo serve token create`) or the dashboard's session cookie (POST /session), whose changes also need its `X-CSRF-Token` header; a read-only token or session may only read. Every change is written to the audit log."
    ),
    servers((url = "/api/v1")),
    paths(
        super::health,
        super::openapi_json,
        super::list_jobs,
        super::get_job,
        super::add_job,
        super::remove_job,
        super::run_job,
        super::backup_now,
        super::job_events,
        super::list_runs,
        super::get_run,
        super::run_log,
        super::cancel_run,
        super::run_events,
        super::list_schedules,
        super::add_schedule,
        super::preview_schedule,
        super::remove_schedule,
        super::enable_schedule,
        super::disable_schedule,
        super::list_missed,
        super::list_repositories,
        super::list_snapshots,
        super::snapshot_ls,
        super::snapshot_file,
        super::snapshot_restore,
        super::forget_snapshots,
        super::repository_locks,
        super::repository_checks,
        super::repository_growth,
        super::repository_sources,
        super::unlock_repository,
        super::snapshot_diff,
        super::list_recovery,
        super::stop_recovery,
        super::recovery_connection,
        super::list_databases,
        super::list_notifications,
        super::test_notification,
        super::list_tokens,
        super::create_token,
        super::revoke_token,
        super::audit_log,
        super::ops::recover_database,
        super::ops::commit_recovery,
        super::session::login,
        super::session::whoami,
        super::session::logout,
        super::ops::recover_vm,
        super::ops::verify_snapshot,
        super::ops::list_verifications,
        super::ops::get_verification,
        super::ops::verification_stats,
        super::ops::list_vms,
        super::ops::vm_action,
        super::ops::vm_snapshots,
        super::ops::delete_vm_snapshot,
        super::ops::clone_vm,
        super::ops::check,
        super::ops::prune,
        super::ops::repair,
    ),
    components(schemas(
        ErrorBody,
        ErrorDetail,
        JobDefinition,
        super::BackupNow,
        Retention,
        Verify,
        DbRecovery,
        CommitRequest,
        super::session::LoginRequest,
        VmRecovery,
        super::ops::VerifyRequest,
        crate::job::VerifySpec,
        CheckRequest,
        PruneRequest,
        RepairRequest,
        VmClone,
        super::NewSchedule,
        super::RestoreRequest,
        super::UnlockRequest,
        super::ForgetRequest,
    )),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "jobs", description = "Backup templates and running them"),
        (name = "runs", description = "Every run: status, figures, log, live events"),
        (name = "schedules", description = "When jobs run"),
        (name = "repositories", description = "Repositories, snapshots, maintenance"),
        (name = "recovery", description = "Instant recovery sessions"),
        (name = "verification", description = "Backups proved by use: booted, started, restored"),
        (name = "vms", description = "The hypervisor's domains"),
        (name = "daemon", description = "Health, audit log, this document")
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as JSON (made once).
pub fn document() -> &'static str {
    static DOC: OnceLock<String> = OnceLock::new();
    DOC.get_or_init(|| {
        ApiDoc::openapi()
            .to_pretty_json()
            .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    })
}
