//! The tool set: each tool's name, what it does, what it changes and returns (its
//! description), its arguments' JSON schema (from a typed struct that also parses
//! them, unknown fields refused), and the API call it makes. `tools/list` is
//! [`definitions`]; a golden copy is reviewed in the tests when it changes.

use std::sync::Arc;

use rmcp::model::{JsonObject, Tool, ToolAnnotations};
use rmcp::schemars::{self, JsonSchema};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::{json, Value};

use super::Call;

/// One tool.
pub struct ToolSpec {
    pub name: &'static str,
    pub description: &'static str,
    /// A change: refused unless the server allows changes.
    pub changes: bool,
    /// It may remove or overwrite something (it takes `dry_run`, true by default).
    pub destructive: bool,
    schema: fn() -> JsonObject,
    /// The API call for these arguments, or what is wrong with them.
    pub call: fn(&Value) -> Result<Call, String>,
}

fn schema<T: JsonSchema>() -> JsonObject {
    let v = serde_json::to_value(schemars::schema_for!(T)).unwrap_or_default();
    match v {
        Value::Object(mut o) => {
            o.remove("$schema");
            o.remove("title");
            o
        }
        _ => JsonObject::new(),
    }
}

fn parse<T: DeserializeOwned>(args: &Value) -> Result<T, String> {
    serde_path_to_error::deserialize(args.clone()).map_err(|e| {
        let at = e.path().to_string();
        if at == "." {
            format!("arguments: {}", e.inner())
        } else {
            format!("argument {at}: {}", e.inner())
        }
    })
}

/// A path segment or query value, percent-encoded.
#[must_use]
pub fn segment(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The repository the arguments name, `default` when none.
#[must_use]
pub fn repository(args: &Value) -> String {
    args.get("repository")
        .and_then(Value::as_str)
        .unwrap_or(crate::job::DEFAULT_REPOSITORY)
        .to_owned()
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let q: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", segment(v))))
        .collect();
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

fn get(path: String) -> Call {
    Call {
        method: "GET",
        path,
        body: None,
    }
}

fn post(path: String, body: Value) -> Call {
    Call {
        method: "POST",
        path,
        body: Some(body),
    }
}

fn yes() -> bool {
    true
}

// --- arguments ------------------------------------------------------------------------

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct NoArguments {}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct RepositoryArg {
    /// A repository of the configuration (`default` when left out).
    repository: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct ListSnapshots {
    /// A repository of the configuration (`default` when left out).
    repository: Option<String>,
    /// Only this host's snapshots.
    host: Option<String>,
    /// Only snapshots with this tag.
    tag: Option<String>,
    /// Only this job's snapshots.
    job: Option<String>,
    /// At most this many, newest first (100 when left out).
    limit: Option<usize>,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct ListFiles {
    repository: Option<String>,
    /// A snapshot id, a unique prefix of one, or `latest`.
    snapshot: String,
    /// An absolute directory in the snapshot (`/` when left out).
    path: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct Diff {
    repository: Option<String>,
    /// The older snapshot (id, prefix or `latest`).
    from: String,
    /// The newer snapshot.
    to: String,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct JobHistory {
    /// Only this job's runs.
    job: Option<String>,
    /// At most this many, newest first (20 when left out).
    limit: Option<usize>,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct Limit {
    /// At most this many (10 when left out).
    limit: Option<usize>,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct VmArg {
    /// A libvirt domain's name.
    vm: String,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct VmStop {
    /// A libvirt domain's name.
    vm: String,
    /// Power it off at once instead of asking the guest to shut down.
    #[serde(default)]
    force: bool,
    /// Only say what would happen (the default); false to act.
    #[serde(default = "yes")]
    dry_run: bool,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct VmSnapshotDelete {
    vm: String,
    /// The libvirt snapshot's name (`vm_snapshots` lists them).
    snapshot: String,
    /// Only say what would happen (the default); false to delete it.
    #[serde(default = "yes")]
    dry_run: bool,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct Verifications {
    /// Only passed, failed, warning, running or pending ones.
    status: Option<String>,
    /// Only vm, db or files ones.
    kind: Option<String>,
    /// At most this many, newest first (20 when left out).
    limit: Option<usize>,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct JobStatus {
    /// A run id, as `run_job` returned it.
    run: Option<i64>,
    /// A task id, as `verify_backup` returned it.
    task: Option<u64>,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct RunJob {
    /// A job's name (`list_jobs`).
    job: String,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct BackupNow {
    repository: Option<String>,
    /// Absolute paths of this host to back up as one file tree.
    #[serde(default)]
    paths: Vec<String>,
    /// Virtual machines by name: every disk, the domain XML, incremental.
    #[serde(default)]
    vms: Vec<String>,
    /// A PostgreSQL server's connection string (`host=/run/postgresql user=postgres`),
    /// backed up physically (`pg_basebackup`).
    postgres: Option<String>,
    /// A MariaDB server (`mariadb://user:password@host:3306`, or empty for the local
    /// socket), backed up physically (`mariadb-backup`).
    mariadb: Option<String>,
    /// Tags for the snapshots.
    #[serde(default)]
    tags: Vec<String>,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct RecoverDatabase {
    repository: Option<String>,
    /// A physical database snapshot (`repo backup --postgres` or `--mariadb`): id,
    /// prefix or `latest`.
    snapshot: String,
    /// Allow writes (they go into the session's layer, never into the backup).
    #[serde(default)]
    writable: bool,
    /// `docker` (the default) or `process`.
    runtime: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct RecoverVm {
    repository: Option<String>,
    /// A VM snapshot (`repo backup --vm`): id, prefix or `latest`.
    snapshot: String,
    /// The new domain's name (`<vm>-recovered-<id>` when left out).
    name: Option<String>,
    /// `isolated` (the default: no route out), `none`, or a libvirt network.
    network: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct Session {
    /// A recovery session's id (`list_recovery_sessions`).
    session: String,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct VerifyBackup {
    repository: Option<String>,
    /// The snapshot: id, prefix or `latest`.
    snapshot: String,
    /// A VM's test: boot, boot_ping (the default), boot_ping_services, full.
    test: Option<String>,
    /// A VM's services: `ssh,http,tcp:5432`.
    services: Option<String>,
    /// How long the guest may take to boot or the database to start: `5m`.
    timeout: Option<String>,
    /// A database's queries, each to return `expect_rows` rows when that is given.
    #[serde(default)]
    queries: Vec<String>,
    expect_rows: Option<u64>,
    /// A file tree's share restored and compared: `10%`.
    sample: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct RestoreFiles {
    repository: Option<String>,
    snapshot: String,
    /// A new (or empty) absolute directory of this host; nothing is ever written over.
    target: String,
    /// Only these absolute paths of the snapshot (everything when empty).
    #[serde(default)]
    include: Vec<String>,
    /// Only say what would be restored and whether the target is refused (the
    /// default); false to restore.
    #[serde(default = "yes")]
    dry_run: bool,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct CloneVm {
    repository: Option<String>,
    /// A VM snapshot: id, prefix or `latest`.
    snapshot: String,
    /// The new domain's name (it must be free).
    name: String,
    /// Where its disks go (`/var/lib/libvirt/images` when left out).
    to: Option<String>,
    /// `none` (the default), `isolated`, or a libvirt network.
    network: Option<String>,
}

#[derive(Deserialize, JsonSchema)]
#[schemars(crate = "rmcp::schemars")]
#[serde(deny_unknown_fields)]
struct Forget {
    repository: Option<String>,
    /// Snapshot ids, prefixes or `latest`.
    snapshots: Vec<String>,
    /// Only say what would be forgotten (the default); false to forget them.
    #[serde(default = "yes")]
    dry_run: bool,
}

// --- the calls ------------------------------------------------------------------------

fn repo(r: &Option<String>) -> String {
    r.clone()
        .unwrap_or_else(|| crate::job::DEFAULT_REPOSITORY.to_owned())
}

fn repo_path(r: &Option<String>) -> String {
    format!("/repositories/{}", segment(&repo(r)))
}

fn list_snapshots(args: &Value) -> Result<Call, String> {
    let a: ListSnapshots = parse(args)?;
    Ok(get(format!(
        "{}/snapshots{}",
        repo_path(&a.repository),
        query(&[
            ("host", a.host),
            ("tag", a.tag),
            ("job", a.job),
            ("limit", Some(a.limit.unwrap_or(100).to_string())),
        ])
    )))
}

fn list_files(args: &Value) -> Result<Call, String> {
    let a: ListFiles = parse(args)?;
    Ok(get(format!(
        "{}/snapshots/{}/ls{}",
        repo_path(&a.repository),
        segment(&a.snapshot),
        query(&[("path", Some(a.path.unwrap_or_else(|| "/".into())))])
    )))
}

fn snapshot_diff(args: &Value) -> Result<Call, String> {
    let a: Diff = parse(args)?;
    Ok(get(format!(
        "{}/diff{}",
        repo_path(&a.repository),
        query(&[
            ("from", Some(a.from)),
            ("to", Some(a.to)),
            ("limit", Some("1000".into()))
        ])
    )))
}

fn job_history(args: &Value) -> Result<Call, String> {
    let a: JobHistory = parse(args)?;
    Ok(get(format!(
        "/runs{}",
        query(&[
            ("job", a.job),
            ("limit", Some(a.limit.unwrap_or(20).to_string())),
        ])
    )))
}

fn recent_failures(args: &Value) -> Result<Call, String> {
    let a: Limit = parse(args)?;
    Ok(get(format!(
        "/runs?status=failed&limit={}",
        a.limit.unwrap_or(10).min(100)
    )))
}

fn vm_snapshots(args: &Value) -> Result<Call, String> {
    let a: VmArg = parse(args)?;
    Ok(get(format!("/vms/{}/snapshots", segment(&a.vm))))
}

fn verification_results(args: &Value) -> Result<Call, String> {
    let a: Verifications = parse(args)?;
    Ok(get(format!(
        "/verifications{}",
        query(&[
            ("status", a.status),
            ("kind", a.kind),
            ("limit", Some(a.limit.unwrap_or(20).to_string())),
        ])
    )))
}

fn job_status(args: &Value) -> Result<Call, String> {
    let a: JobStatus = parse(args)?;
    match (a.run, a.task) {
        (Some(run), None) => Ok(get(format!("/runs/{run}"))),
        (None, Some(_)) => Err("a task is followed in this session, not through the API".into()),
        _ => Err("give either run (from run_job) or task (from verify_backup)".into()),
    }
}

fn run_job(args: &Value) -> Result<Call, String> {
    let a: RunJob = parse(args)?;
    Ok(post(format!("/jobs/{}/run", segment(&a.job)), json!({})))
}

fn backup_now(args: &Value) -> Result<Call, String> {
    let a: BackupNow = parse(args)?;
    let mut sources = Vec::new();
    if !a.paths.is_empty() {
        sources.push(json!({ "type": "paths", "paths": a.paths }));
    }
    if !a.vms.is_empty() {
        sources.push(json!({ "type": "vm", "names": a.vms }));
    }
    if let Some(c) = a.postgres {
        sources.push(json!({ "type": "postgres", "connection": c }));
    }
    if let Some(c) = a.mariadb {
        let c = (!c.is_empty()).then_some(c);
        sources.push(json!({ "type": "mariadb", "connection": c }));
    }
    if sources.is_empty() {
        return Err("name something to back up: paths, vms, postgres or mariadb".into());
    }
    Ok(post(
        "/backups".into(),
        json!({ "repository": repo(&a.repository), "source": sources, "tags": a.tags }),
    ))
}

fn recover_database(args: &Value) -> Result<Call, String> {
    let a: RecoverDatabase = parse(args)?;
    Ok(post(
        "/recovery/db".into(),
        json!({ "repository": repo(&a.repository), "snapshot": a.snapshot,
                "writable": a.writable, "runtime": a.runtime }),
    ))
}

fn recover_vm(args: &Value) -> Result<Call, String> {
    let a: RecoverVm = parse(args)?;
    Ok(post(
        "/recovery/vm".into(),
        json!({ "repository": repo(&a.repository), "snapshot": a.snapshot,
                "name": a.name, "network": a.network }),
    ))
}

fn stop_recovery(args: &Value) -> Result<Call, String> {
    let a: Session = parse(args)?;
    Ok(post(
        format!("/recovery/{}/stop", segment(&a.session)),
        json!({}),
    ))
}

fn verify_backup(args: &Value) -> Result<Call, String> {
    let a: VerifyBackup = parse(args)?;
    Ok(post(
        "/verifications".into(),
        json!({ "repository": repo(&a.repository), "snapshot": a.snapshot, "how": {
            "test": a.test, "services": a.services, "timeout": a.timeout,
            "queries": a.queries, "expect_rows": a.expect_rows, "sample": a.sample,
        }}),
    ))
}

fn restore_files(args: &Value) -> Result<Call, String> {
    let a: RestoreFiles = parse(args)?;
    Ok(post(
        format!(
            "{}/snapshots/{}/restore",
            repo_path(&a.repository),
            segment(&a.snapshot)
        ),
        json!({ "target": a.target, "include": a.include, "dry_run": a.dry_run }),
    ))
}

fn vm_power(action: &'static str) -> impl Fn(&Value) -> Result<Call, String> {
    move |args| {
        let a: VmArg = parse(args)?;
        Ok(post(format!("/vms/{}/{action}", segment(&a.vm)), json!({})))
    }
}

fn vm_start(args: &Value) -> Result<Call, String> {
    vm_power("start")(args)
}

fn vm_reboot(args: &Value) -> Result<Call, String> {
    vm_power("reboot")(args)
}

/// A dry run is answered from the domain list (see `McpServer::run`).
fn vm_stop(args: &Value) -> Result<Call, String> {
    let a: VmStop = parse(args)?;
    let action = if a.force { "power_off" } else { "shutdown" };
    if a.dry_run {
        return Ok(get("/vms".into()));
    }
    Ok(post(format!("/vms/{}/{action}", segment(&a.vm)), json!({})))
}

/// A dry run is answered from the domain's snapshot list (see `McpServer::run`).
fn vm_snapshot_delete(args: &Value) -> Result<Call, String> {
    let a: VmSnapshotDelete = parse(args)?;
    if a.dry_run {
        return Ok(get(format!("/vms/{}/snapshots", segment(&a.vm))));
    }
    Ok(Call {
        method: "DELETE",
        path: format!("/vms/{}/snapshots/{}", segment(&a.vm), segment(&a.snapshot)),
        body: None,
    })
}

fn clone_vm(args: &Value) -> Result<Call, String> {
    let a: CloneVm = parse(args)?;
    Ok(post(
        "/vms/clone".into(),
        json!({ "repository": repo(&a.repository), "snapshot": a.snapshot, "name": a.name,
                "to": a.to, "network": a.network }),
    ))
}

fn forget_snapshots(args: &Value) -> Result<Call, String> {
    let a: Forget = parse(args)?;
    if a.snapshots.is_empty() {
        return Err("snapshots: name at least one (an id, a prefix or latest)".into());
    }
    Ok(post(
        format!("{}/forget", repo_path(&a.repository)),
        json!({ "snapshots": a.snapshots, "dry_run": a.dry_run }),
    ))
}

fn fixed(path: &'static str) -> impl Fn(&Value) -> Result<Call, String> {
    move |args| {
        parse::<NoArguments>(args)?;
        Ok(get(path.into()))
    }
}

fn list_repositories(args: &Value) -> Result<Call, String> {
    fixed("/repositories")(args)
}
fn list_jobs(args: &Value) -> Result<Call, String> {
    fixed("/jobs")(args)
}
fn next_runs(args: &Value) -> Result<Call, String> {
    fixed("/schedules")(args)
}
fn list_vms(args: &Value) -> Result<Call, String> {
    fixed("/vms")(args)
}
fn list_recovery_sessions(args: &Value) -> Result<Call, String> {
    fixed("/recovery")(args)
}
fn repository_health(args: &Value) -> Result<Call, String> {
    let a: RepositoryArg = parse(args)?;
    Ok(get(format!("{}/locks", repo_path(&a.repository))))
}

macro_rules! tool {
    ($name:literal, $args:ty, $call:expr, changes: $changes:expr, destructive: $destructive:expr, $description:literal) => {
        ToolSpec {
            name: $name,
            description: $description,
            changes: $changes,
            destructive: $destructive,
            schema: schema::<$args>,
            call: $call,
        }
    };
}

/// Every tool, read tools first.
pub static TOOLS: &[ToolSpec] = &[
    tool!("list_repositories", NoArguments, list_repositories, changes: false, destructive: false,
        "The repositories of this host's configuration, each with its size, snapshot count, deduplication and compression ratios, and last check. Changes nothing."),
    tool!("list_snapshots", ListSnapshots, list_snapshots, changes: false, destructive: false,
        "A repository's snapshots, newest first: id, time, host, source, kind (files, stream, image), database or VM, tags, sizes. Filters: host, tag, job. Changes nothing."),
    tool!("list_files", ListFiles, list_files, changes: false, destructive: false,
        "One directory of a snapshot: names, types, sizes, modes and times. The path must be absolute and inside the snapshot. Changes nothing."),
    tool!("snapshot_diff", Diff, snapshot_diff, changes: false, destructive: false,
        "What changed from one snapshot to another: paths added, removed and modified, with sizes (at most 1000 changes). Changes nothing."),
    tool!("repository_health", RepositoryArg, repository_health, changes: false, destructive: false,
        "A repository's health: size and ratios, its locks (stale ones marked) and its last checks with their results. Changes nothing."),
    tool!("list_jobs", NoArguments, list_jobs, changes: false, destructive: false,
        "The backup jobs: sources, repository, retention, verification, notifications, and each job's last run. Changes nothing."),
    tool!("job_history", JobHistory, job_history, changes: false, destructive: false,
        "Runs of the jobs (or of one job), newest first: status, trigger, times, bytes read and stored, snapshots made, error. Changes nothing."),
    tool!("next_runs", NoArguments, next_runs, changes: false, destructive: false,
        "Every schedule with its job, expression, time zone, whether it runs or verifies, and its next run times. Changes nothing."),
    tool!("recent_failures", Limit, recent_failures, changes: false, destructive: false,
        "The most recent failed runs, each with its error and the last 20 lines of its log. Changes nothing."),
    tool!("list_vms", NoArguments, list_vms, changes: false, destructive: false,
        "The hypervisor's virtual machines: state, disks, last backup and whether changed-block tracking is on. Changes nothing."),
    tool!("vm_snapshots", VmArg, vm_snapshots, changes: false, destructive: false,
        "A virtual machine's libvirt snapshots, by name. Changes nothing."),
    tool!("list_recovery_sessions", NoArguments, list_recovery_sessions, changes: false, destructive: false,
        "Instant recovery sessions running on this host (databases and VMs): id, snapshot, address, bytes written. Passwords are not shown. Changes nothing."),
    tool!("verification_results", Verifications, verification_results, changes: false, destructive: false,
        "Verifications of backups (VMs booted, databases started and checked, file samples restored), newest first, every step with its result and duration. Changes nothing."),
    tool!("job_status", JobStatus, job_status, changes: false, destructive: false,
        "Where a long operation is: a run started by run_job (by run id: queued, running, succeeded, failed, with its stats) or a verification started by verify_backup (by task id: running, done with its record, or failed). Changes nothing."),
    tool!("run_job", RunJob, run_job, changes: true, destructive: false,
        "Runs a backup job now (its sources, then its retention and verification). Returns the run id at once; follow it with job_status. Adds snapshots; its retention may forget old ones as the job defines."),
    tool!("backup_now", BackupNow, backup_now, changes: true, destructive: false,
        "Backs up now, without a job: paths of this host, virtual machines by name, a PostgreSQL or MariaDB server. Returns the run id at once (recorded as job backup-now); follow it with job_status. Adds snapshots; forgets nothing."),
    tool!("recover_database", RecoverDatabase, recover_database, changes: true, destructive: false,
        "Starts a database snapshot as a running server on this host in seconds (instant recovery, read-only unless writable). Returns the session with its connection details (host, port, user, password). Nothing is written to the backup; stop it with stop_recovery."),
    tool!("recover_vm", RecoverVm, recover_vm, changes: true, destructive: false,
        "Boots a VM snapshot as a new domain on overlays of its backed-up disks, on an isolated network by default. Returns the session and the domain's name. Stop it with stop_recovery."),
    tool!("stop_recovery", Session, stop_recovery, changes: true, destructive: false,
        "Stops a recovery session: its server or domain, its writable layer and its mount are removed. Changes made in the session are lost."),
    tool!("verify_backup", VerifyBackup, verify_backup, changes: true, destructive: false,
        "Proves a snapshot restores by using it: a VM is booted in an isolated lab and pinged and its services checked, a database is started and checked (amcheck, row counts, queries), a file tree's sample is restored and compared. Returns a task id at once; job_status gives the result with every step."),
    tool!("restore_files", RestoreFiles, restore_files, changes: true, destructive: true,
        "Restores a snapshot (or some of its paths) into a new or empty directory of this host; never writes over files. dry_run (default true) says what would be restored and whether the target is refused."),
    tool!("vm_start", VmArg, vm_start, changes: true, destructive: false,
        "Starts a virtual machine of the hypervisor. Returns its state."),
    tool!("vm_stop", VmStop, vm_stop, changes: true, destructive: true,
        "Stops a virtual machine: a clean shutdown asked of the guest, or with force an immediate power-off. dry_run (default true) only says what would happen."),
    tool!("vm_reboot", VmArg, vm_reboot, changes: true, destructive: false,
        "Reboots a running virtual machine (asked of the guest). Returns its state."),
    tool!("vm_snapshot_delete", VmSnapshotDelete, vm_snapshot_delete, changes: true, destructive: true,
        "Deletes one of a virtual machine's libvirt snapshots (not a backup). dry_run (default true) only says whether it exists and would be deleted."),
    tool!("clone_vm_from_backup", CloneVm, clone_vm, changes: true, destructive: false,
        "Restores a VM snapshot whole as a new domain with its own disks (defined, not started; new name, UUID and MACs). Existing files are never written over."),
    tool!("forget_snapshots", Forget, forget_snapshots, changes: true, destructive: true,
        "Forgets snapshots (their data is freed by the next prune). dry_run (default true) lists what would be forgotten; false forgets them."),
];

/// The tool named `name`.
#[must_use]
pub fn find(name: &str) -> Option<&'static ToolSpec> {
    TOOLS.iter().find(|t| t.name == name)
}

/// `tools/list`: every tool with its schema and hints.
#[must_use]
pub fn definitions() -> Vec<Tool> {
    TOOLS
        .iter()
        .map(|t| {
            Tool::new(t.name, t.description, Arc::new((t.schema)())).annotate(
                ToolAnnotations::new()
                    .read_only(!t.changes)
                    .destructive(t.destructive)
                    .open_world(false),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_tool_has_an_object_schema_and_refuses_unknown_arguments() {
        for t in TOOLS {
            let s = (t.schema)();
            assert_eq!(s.get("type"), Some(&json!("object")), "{}", t.name);
            let e = (t.call)(&json!({ "colour": "red" })).unwrap_err();
            assert!(
                e.contains("colour") || e.contains("missing"),
                "{}: {e}",
                t.name
            );
        }
    }

    #[test]
    fn destructive_tools_dry_run_unless_told_not_to() {
        let forget = forget_snapshots(&json!({ "snapshots": ["latest"] })).unwrap();
        assert_eq!(forget.body.unwrap()["dry_run"], true);
        let forget =
            forget_snapshots(&json!({ "snapshots": ["latest"], "dry_run": false })).unwrap();
        assert_eq!(forget.body.unwrap()["dry_run"], false);
        assert_eq!(vm_stop(&json!({ "vm": "web" })).unwrap().method, "GET");
        assert_eq!(
            vm_snapshot_delete(&json!({ "vm": "web", "snapshot": "s1" }))
                .unwrap()
                .method,
            "GET"
        );
        let restore = restore_files(&json!({ "snapshot": "latest", "target": "/tmp/x" })).unwrap();
        assert_eq!(restore.body.unwrap()["dry_run"], true);
        for t in TOOLS.iter().filter(|t| t.destructive) {
            assert!(t.changes, "{}", t.name);
            assert!(
                (t.schema)()["properties"].get("dry_run").is_some(),
                "{}",
                t.name
            );
        }
    }

    #[test]
    fn names_in_paths_are_encoded() {
        let c = list_files(&json!({ "snapshot": "../x", "path": "/a b?c" })).unwrap();
        assert_eq!(
            c.path,
            "/repositories/default/snapshots/..%2Fx/ls?path=%2Fa%20b%3Fc"
        );
        assert!(job_status(&json!({})).is_err());
        assert!(list_snapshots(&json!({ "limit": "ten" }))
            .unwrap_err()
            .contains("limit"));
    }
}
