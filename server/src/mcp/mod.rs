//! The MCP server: a small, described tool set an assistant operates backups,
//! recoveries, verifications and VMs with (`repo mcp` on stdio).
//!
//! Every tool is one call of the REST API (`crate::api`), made in-process through the
//! same router `repo serve` answers with: the same validation, the same error messages,
//! the same read-only refusals, and the same audit log, where the caller is recorded as
//! `via MCP`. The tool set ([`tools`]) only names, describes and maps; no operation
//! lives here.
//!
//! Safety: the server is read-only unless started with changes allowed; a change tool
//! called read-only is refused with a tool error naming the flag. Destructive tools
//! (forget, a libvirt snapshot's deletion, stopping a VM, a restore) take `dry_run`,
//! true unless the caller says false, and then only say what they would do. Long
//! operations (a job's run, a verification) return an id at once; `job_status` follows
//! them. An error is a tool error with the API's message, never a crash of the server.

pub mod tools;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use axum::body::Body;
use axum::Router;
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ListToolsResult,
    PaginatedRequestParams, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, ServiceExt};
use serde_json::{json, Value};
use tower::ServiceExt as _;

use crate::daemon::{Daemon, DaemonError};
use crate::login::Principal;
use crate::site::Site;

/// Who the API sees MCP's calls as (the audit log's `token` column).
pub const PRINCIPAL: &str = "via MCP";

/// Arguments larger than this are refused before they are parsed further.
const MAX_ARGUMENTS_BYTES: usize = 256 * 1024;

/// An API call a tool makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: &'static str,
    /// Under `/api/v1`, with its query string.
    pub path: String,
    pub body: Option<Value>,
}

/// A verification started by `verify_backup`, followed by `job_status`.
#[derive(Debug, Clone)]
enum Task {
    Running,
    Done(Value),
    Failed(String),
}

/// The API's router, set once it is built (it serves the MCP endpoint itself).
pub type LateRouter = Arc<OnceLock<Router>>;

/// The MCP server over the API's router.
#[derive(Clone)]
pub struct McpServer {
    router: LateRouter,
    /// Who calls act as on stdio; over HTTP, the request's token (with ` via MCP`).
    stdio: Principal,
    tasks: Arc<Mutex<HashMap<u64, Task>>>,
    next_task: Arc<AtomicU64>,
}

impl McpServer {
    /// Over `daemon`'s API, for stdio; changes allowed or not.
    #[must_use]
    pub fn new(daemon: &Daemon, allow_changes: bool) -> Self {
        let limits = daemon.site.config.limits.clone();
        let router = Arc::new(OnceLock::new());
        let _ = router.set(crate::api::router(daemon, &limits));
        Self::over(router, allow_changes)
    }

    /// Over a router set later (the API's own MCP endpoint).
    #[must_use]
    pub fn over(router: LateRouter, allow_changes: bool) -> Self {
        Self {
            router,
            stdio: Principal {
                name: PRINCIPAL.to_owned(),
                read_only: !allow_changes,
                csrf: None,
                expires: None,
            },
            tasks: Arc::new(Mutex::new(HashMap::new())),
            next_task: Arc::new(AtomicU64::new(1)),
        }
    }

    /// Who a request acts as: the HTTP request's token when the tools are served by
    /// `repo serve`, else the stdio principal.
    fn principal(&self, context: &RequestContext<RoleServer>) -> Principal {
        context
            .extensions
            .get::<axum::http::request::Parts>()
            .and_then(|p| p.extensions.get::<Principal>())
            .map_or_else(
                || self.stdio.clone(),
                |p| Principal {
                    name: format!("{} via MCP", p.name),
                    read_only: p.read_only,
                    csrf: None,
                    expires: None,
                },
            )
    }

    /// One API call as `who`: the response's JSON, or the API's message.
    pub async fn api(&self, who: &Principal, call: &Call) -> Result<Value, String> {
        let router = self
            .router
            .get()
            .cloned()
            .ok_or("the API is not ready yet")?;
        let mut req = axum::http::Request::builder()
            .method(call.method)
            .uri(format!("/api/v1{}", call.path))
            .header("content-type", "application/json")
            .body(match &call.body {
                Some(b) => Body::from(b.to_string()),
                None => Body::empty(),
            })
            .map_err(|e| format!("the request: {e}"))?;
        req.extensions_mut()
            .insert(crate::api::InProcess(who.clone()));
        let resp = router
            .oneshot(req)
            .await
            .map_err(|e| format!("the API: {e}"))?;
        let status = resp.status();
        let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
            .await
            .map_err(|e| format!("the API's answer: {e}"))?;
        let value: Value = if bytes.is_empty() {
            json!({})
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| json!(String::from_utf8_lossy(&bytes)))
        };
        if status.is_success() {
            Ok(value)
        } else {
            Err(value["error"]["message"]
                .as_str()
                .map_or_else(|| format!("{status}: {value}"), str::to_owned))
        }
    }

    /// Runs tool `name` with `args`: its result, or a message for a tool error.
    pub async fn run(&self, who: &Principal, name: &str, args: Value) -> Result<Value, String> {
        let tool = tools::find(name).ok_or_else(|| {
            format!(
                "no tool {name:?}: the tools are {}",
                tools::TOOLS
                    .iter()
                    .map(|t| t.name)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
        if tool.changes && who.read_only {
            return Err(if who.name == PRINCIPAL {
                format!("{name} changes things and this server is read-only: start it as `repo mcp --allow-changes`")
            } else {
                format!(
                    "{name} changes things and {} is read-only: use a token that may change things",
                    who.name
                )
            });
        }
        let dry_run = args.get("dry_run") != Some(&Value::Bool(false));
        match name {
            "vm_stop" | "vm_snapshot_delete" if dry_run => self.vm_dry_run(who, name, &args).await,
            "verify_backup" => self.start_verification(who, args),
            "job_status" => self.job_status(who, &args).await,
            "recent_failures" => self.recent_failures(who, &args).await,
            "repository_health" => self.repository_health(who, &args).await,
            _ => {
                let call = (tool.call)(&args)?;
                self.api(who, &call).await
            }
        }
    }

    /// What `vm_stop` or `vm_snapshot_delete` would do, from the domain's listing.
    async fn vm_dry_run(&self, who: &Principal, name: &str, args: &Value) -> Result<Value, String> {
        let call = (tools::find(name).ok_or("no such tool")?.call)(args)?;
        let listed = self.api(who, &call).await?;
        let vm = args["vm"].as_str().unwrap_or_default();
        if name == "vm_stop" {
            let domain = listed["vms"]
                .as_array()
                .and_then(|l| l.iter().find(|d| d["name"] == vm))
                .ok_or_else(|| format!("no VM named {vm:?} on this hypervisor (list_vms)"))?;
            let how = if args["force"] == true {
                "power off at once"
            } else {
                "ask the guest to shut down"
            };
            return Ok(json!({
                "dry_run": true,
                "would": format!("{how}: VM {vm}, now {}", domain["state"].as_str().unwrap_or("?")),
                "next": "call vm_stop again with dry_run: false to do it",
            }));
        }
        let snapshot = args["snapshot"].as_str().unwrap_or_default();
        let names = listed["snapshots"].as_array().cloned().unwrap_or_default();
        if !names.iter().any(|n| n == snapshot || n["name"] == snapshot) {
            return Err(format!(
                "VM {vm} has no libvirt snapshot {snapshot:?}: it has {}",
                serde_json::to_string(&names).unwrap_or_default()
            ));
        }
        Ok(json!({
            "dry_run": true,
            "would": format!("delete libvirt snapshot {snapshot} of VM {vm} (backups are not touched)"),
            "next": "call vm_snapshot_delete again with dry_run: false to do it",
        }))
    }

    /// `verify_backup`: the verification in the background; its task id at once.
    fn start_verification(&self, who: &Principal, args: Value) -> Result<Value, String> {
        let call = (tools::find("verify_backup").ok_or("no verify_backup")?.call)(&args)?;
        let id = self.next_task.fetch_add(1, Ordering::Relaxed);
        self.set_task(id, Task::Running);
        let (me, who) = (self.clone(), who.clone());
        tokio::spawn(async move {
            let done = match me.api(&who, &call).await {
                Ok(v) => Task::Done(v),
                Err(e) => Task::Failed(e),
            };
            me.set_task(id, done);
        });
        Ok(json!({
            "task": id,
            "state": "running",
            "next": "call job_status with this task id until its state is done or failed",
        }))
    }

    fn set_task(&self, id: u64, t: Task) {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(id, t);
    }

    /// `job_status`: a run (the API's record) or a verification task.
    async fn job_status(&self, who: &Principal, args: &Value) -> Result<Value, String> {
        if let Some(task) = args.get("task").and_then(Value::as_u64) {
            let t = self
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .get(&task)
                .cloned()
                .ok_or_else(|| format!("no task {task} in this session"))?;
            return Ok(match t {
                Task::Running => json!({ "task": task, "state": "running" }),
                Task::Done(v) => json!({ "task": task, "state": "done", "result": v }),
                Task::Failed(e) => json!({ "task": task, "state": "failed", "error": e }),
            });
        }
        let call = (tools::find("job_status").ok_or("no job_status")?.call)(args)?;
        self.api(who, &call).await
    }

    /// `recent_failures`: failed runs, each with the end of its log.
    async fn recent_failures(&self, who: &Principal, args: &Value) -> Result<Value, String> {
        let call = (tools::find("recent_failures")
            .ok_or("no recent_failures")?
            .call)(args)?;
        let mut runs = self.api(who, &call).await?;
        if let Some(list) = runs["runs"].as_array_mut() {
            for run in list {
                let Some(id) = run["id"].as_i64() else {
                    continue;
                };
                let log = self
                    .api(
                        who,
                        &Call {
                            method: "GET",
                            path: format!("/runs/{id}/log"),
                            body: None,
                        },
                    )
                    .await
                    .unwrap_or_default();
                let lines = log["lines"].as_array().cloned().unwrap_or_default();
                let tail: Vec<Value> = lines.iter().rev().take(20).rev().cloned().collect();
                run["log_tail"] = json!(tail);
            }
        }
        Ok(runs)
    }

    /// `repository_health`: figures and last check, locks, recent checks.
    async fn repository_health(&self, who: &Principal, args: &Value) -> Result<Value, String> {
        // Its arguments checked as the tool's own.
        (tools::find("repository_health")
            .ok_or("no repository_health")?
            .call)(args)?;
        let name = tools::repository(args);
        let repos = self
            .api(
                who,
                &Call {
                    method: "GET",
                    path: "/repositories".into(),
                    body: None,
                },
            )
            .await?;
        let repo = repos["repositories"]
            .as_array()
            .and_then(|l| l.iter().find(|r| r["name"] == name.as_str()).cloned())
            .ok_or_else(|| format!("no repository {name:?} in the configuration"))?;
        let enc = tools::segment(&name);
        let locks = self
            .api(
                who,
                &Call {
                    method: "GET",
                    path: format!("/repositories/{enc}/locks"),
                    body: None,
                },
            )
            .await?;
        let checks = self
            .api(
                who,
                &Call {
                    method: "GET",
                    path: format!("/repositories/{enc}/checks?limit=5"),
                    body: None,
                },
            )
            .await?;
        Ok(json!({
            "repository": repo,
            "locks": locks["locks"],
            "checks": checks["checks"],
        }))
    }
}

impl ServerHandler for McpServer {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build()).with_instructions(
            if !self.stdio.read_only {
                "cairn backups: read and change tools. Destructive tools default to dry_run: true; \
                 call them again with dry_run: false to act. Long operations return an id for job_status."
            } else {
                "cairn backups, read-only: change tools are refused (the server was not started with --allow-changes)."
            },
        )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(tools::definitions()))
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let who = self.principal(&context);
        let args = Value::Object(request.arguments.unwrap_or_default());
        let size = args.to_string().len();
        let outcome = if size > MAX_ARGUMENTS_BYTES {
            Err(format!(
                "the arguments are {size} bytes: at most {MAX_ARGUMENTS_BYTES} are taken"
            ))
        } else {
            self.run(&who, &request.name, args).await
        };
        Ok(CallToolResponse::Complete(match outcome {
            Ok(v) => CallToolResult::success(vec![ContentBlock::text(
                serde_json::to_string_pretty(&v).unwrap_or_default(),
            )]),
            Err(e) => CallToolResult::error(vec![ContentBlock::text(e)]),
        }))
    }
}

/// `repo mcp`: the tools on stdin/stdout until the client closes stdin. Runs the
/// site's runner in this process (no scheduler: `repo serve` keeps the schedules).
pub fn serve_stdio(site: Site, allow_changes: bool) -> Result<(), DaemonError> {
    let daemon = Daemon::embedded(site, Arc::new(crate::schedule::SystemClock))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("mcp")
        .enable_all()
        .build()?;
    let server = McpServer::new(&daemon, allow_changes);
    let served = rt.block_on(async move {
        let running = server
            .serve(rmcp::transport::stdio())
            .await
            .map_err(|e| DaemonError::Mcp(e.to_string()))?;
        running
            .waiting()
            .await
            .map_err(|e| DaemonError::Mcp(e.to_string()))?;
        Ok::<_, DaemonError>(())
    });
    daemon.stop();
    rt.shutdown_timeout(std::time::Duration::from_secs(2));
    served
}

/// The tools over MCP's streamable HTTP transport, for `repo serve` (`/api/v1/mcp`):
/// each session's calls act as the request's token, so a read-only token gets the
/// read-only tool set. Served behind the API's token check.
pub fn http_service(
    router: LateRouter,
) -> rmcp::transport::streamable_http_server::StreamableHttpService<
    McpServer,
    rmcp::transport::streamable_http_server::session::local::LocalSessionManager,
> {
    use rmcp::transport::streamable_http_server::{
        session::local::LocalSessionManager, StreamableHttpServerConfig, StreamableHttpService,
    };
    StreamableHttpService::new(
        // Changes are decided per request by its token; the stdio principal is unused.
        move || Ok(McpServer::over(router.clone(), false)),
        Arc::new(LocalSessionManager::default()),
        // Every request carries a bearer token (checked before it gets here), which a
        // page a browser was lured to cannot send: no Host allow-list is needed.
        StreamableHttpServerConfig::default().disable_allowed_hosts(),
    )
}
