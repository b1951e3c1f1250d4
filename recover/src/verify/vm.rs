//! Verifying a VM backup by booting it: an instant recovery of the snapshot (overlays on
//! the mount, a new domain) in an isolated lab ([`super::lab`]), then, as the test asks:
//!
//! - `boot`: the guest agent answers, or the serial console prints a login prompt
//!   (guests without an agent); a kernel panic or a guest that powers off fails at once;
//! - `boot_ping`: and the guest answers a ping from the lab;
//! - `boot_ping_services`: and every service answers (a TCP connect; for http and https
//!   a request whose status is below 400);
//! - `full`: and a script passes: inside the guest through the agent (`guest-exec`), or
//!   on the host inside the lab against the guest's address.
//!
//! Every step's result and duration is recorded; the session (domain, lab, overlays,
//! mount) is taken down after, whatever happened. A verification killed on the way
//! leaves a session record naming all of it, which `repo recover cleanup` removes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::Engine as _;
use cairn_agent::libvirt::xml::Network;
use cairn_agent::libvirt::{Hypervisor, Vm};
use cairn_engine::snapshot::Snapshot;

use super::lab::{self, Lab, GUEST_ADDRESS};
use super::{Kind, Outcome, Recorder, Results, SnapshotRef, StepResult, Verification, VerifyError};
use crate::mounting::SpawnMount;
use crate::state::Store;

/// How far a VM verification goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmTest {
    Boot,
    BootPing,
    BootPingServices,
    Full,
}

impl VmTest {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s {
            "boot" => Ok(Self::Boot),
            "boot_ping" => Ok(Self::BootPing),
            "boot_ping_services" => Ok(Self::BootPingServices),
            "full" => Ok(Self::Full),
            _ => Err(format!(
                "unknown test {s:?}: boot, boot_ping, boot_ping_services or full"
            )),
        }
    }

    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Boot => "boot",
            Self::BootPing => "boot_ping",
            Self::BootPingServices => "boot_ping_services",
            Self::Full => "full",
        }
    }

    fn pings(self) -> bool {
        self != Self::Boot
    }

    fn checks_services(self) -> bool {
        matches!(self, Self::BootPingServices | Self::Full)
    }
}

/// A service to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// As the user named it (`ssh`, `http`, `tcp:5432`).
    pub name: String,
    pub port: u16,
    pub probe: Probe,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    Tcp,
    Http { path: String },
    Https { path: String },
}

/// Parses `ssh,http,https,tcp:5432,http:8080/health,https:8443`.
pub fn parse_services(list: &str) -> Result<Vec<Service>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse_service)
        .collect()
}

fn parse_service(s: &str) -> Result<Service, String> {
    let (scheme, rest) = s.split_once(':').unwrap_or((s, ""));
    let (port, path) = match rest.find('/') {
        Some(i) => (&rest[..i], rest[i..].to_owned()),
        None => (rest, "/".to_owned()),
    };
    let port = if port.is_empty() {
        None
    } else {
        Some(
            port.parse::<u16>()
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| format!("{s:?}: {port:?} is not a port"))?,
        )
    };
    let (default, probe) = match scheme {
        "ssh" => (Some(22), Probe::Tcp),
        "tcp" => (None, Probe::Tcp),
        "http" => (Some(80), Probe::Http { path }),
        "https" => (Some(443), Probe::Https { path }),
        "smtp" => (Some(25), Probe::Tcp),
        "rdp" => (Some(3389), Probe::Tcp),
        "postgresql" | "postgres" => (Some(5432), Probe::Tcp),
        "mysql" | "mariadb" => (Some(3306), Probe::Tcp),
        _ => {
            return Err(format!(
                "unknown service {s:?}: ssh, http, https, smtp, rdp, postgresql, mysql, or tcp:PORT, http:PORT/PATH, https:PORT/PATH"
            ))
        }
    };
    let port = port
        .or(default)
        .ok_or_else(|| format!("{s:?}: give the port (tcp:PORT)"))?;
    Ok(Service {
        name: s.to_owned(),
        port,
        probe,
    })
}

/// Where the copy's network card goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabNetwork {
    /// A lab of its own (a network namespace): the default.
    Lab,
    /// A libvirt network without forwarding, for sites that keep one for tests; the
    /// checks run from the host, to the address the guest agent reports.
    Named(String),
}

pub struct VmVerifyRequest<'a> {
    pub snapshot: &'a Snapshot,
    pub repository: PathBuf,
    pub test: VmTest,
    pub services: Vec<Service>,
    /// A script run inside the guest (sh) through its agent.
    pub guest_script: Option<String>,
    /// A script run on the host inside the lab, `CAIRN_VERIFY_ADDRESS` the guest's.
    pub host_script: Option<PathBuf>,
    /// How long the guest may take to boot.
    pub timeout: Duration,
    /// How long the ping and each service may take to answer once the guest booted.
    pub service_wait: Duration,
    pub network: LabNetwork,
    pub uri: Option<String>,
    pub spawn_mount: SpawnMount<'a>,
    /// What asked for it (`manual`, `schedule NAME`, `after_backup JOB`).
    pub trigger: String,
}

/// Checks a request before anything is made.
pub fn check_request(req: &VmVerifyRequest<'_>) -> Result<(), VerifyError> {
    if req.test.checks_services() && req.services.is_empty() && req.test != VmTest::Full {
        return Err(VerifyError::Setup(
            "boot_ping_services checks services: give --services (ssh,http,tcp:PORT,...)".into(),
        ));
    }
    if req.test == VmTest::Full && req.guest_script.is_none() && req.host_script.is_none() {
        return Err(VerifyError::Setup(
            "full runs a script: give --script FILE (run in the guest) or --host-script FILE (run in the lab)".into(),
        ));
    }
    if req.test != VmTest::Full && (req.guest_script.is_some() || req.host_script.is_some()) {
        return Err(VerifyError::Setup(
            "scripts run in the full test only (--test full)".into(),
        ));
    }
    if req.network == LabNetwork::Lab {
        lab::check_tools().map_err(VerifyError::Setup)?;
    }
    Ok(())
}

/// Verifies a VM snapshot; the verification's record (also when it failed: a failure is
/// a result, not an error). Errors are for what kept it from being recorded at all.
pub fn run(
    store: &Store,
    results: &Results,
    req: &VmVerifyRequest<'_>,
) -> Result<Verification, VerifyError> {
    check_request(req)?;
    let snap = SnapshotRef::of(req.snapshot, &req.repository.display().to_string());
    let mut r = Recorder::begin(
        results,
        Verification::new(Kind::Vm, req.test.as_str(), &snap, &req.trigger),
    )?;
    let mut session: Option<String> = None;
    let mut vm_run = VmRun::default();
    let ok = steps(store, req, &mut r, &mut session, &mut vm_run);
    if !ok {
        let mut later = vec!["boot"];
        if req.test.pings() {
            later.push("ping");
        }
        let done: Vec<String> = r.v.steps.iter().map(|s| s.name.clone()).collect();
        later.retain(|n| !done.iter().any(|d| d == n));
        r.skip(&later);
    }
    let cleaned = match &session {
        Some(id) => r.step("cleanup", |_| match crate::stop(store, id) {
            Ok(_) => (
                StepResult::Passed,
                "domain, lab, overlays and mount removed".into(),
            ),
            Err(e) => (StepResult::Failed, e.to_string()),
        }),
        None => true,
    };
    Ok(r.finish(cleaned))
}

#[derive(Default)]
struct VmRun {
    address: Option<String>,
    netns: Option<String>,
}

/// The steps up to cleanup; false when one failed.
fn steps(
    store: &Store,
    req: &VmVerifyRequest<'_>,
    r: &mut Recorder<'_>,
    session: &mut Option<String>,
    run: &mut VmRun,
) -> bool {
    let mut domain = None;
    let restored = r.step("restore", |_| match restore(store, req) {
        Ok((rec, name)) => {
            *session = Some(rec.id.clone());
            run.netns.clone_from(&rec.lab);
            domain = Some(name.clone());
            (
                StepResult::Passed,
                format!("session {}, domain {name} on overlays of the mount", rec.id),
            )
        }
        Err(e) => (StepResult::Failed, e.to_string()),
    });
    r.v.session.clone_from(session);
    if let Some(f) = r.v.vm.as_mut() {
        f.vm_restored = restored;
        f.domain.clone_from(&domain);
    }
    let Some(domain) = domain.filter(|_| restored) else {
        return false;
    };
    let vm = match Hypervisor::connect(req.uri.as_deref()).and_then(|hv| hv.vm(&domain)) {
        Ok(vm) => vm,
        Err(e) => {
            r.fail(&e.to_string());
            return false;
        }
    };
    let console = store
        .sessions_dir()
        .join(session.as_deref().unwrap_or_default())
        .join("console.log");
    let netns = run.netns.clone();
    let booted = r.step("boot", |r| boot(r, &vm, netns.as_deref(), &console, req));
    if !booted {
        return false;
    }
    run.address = match &req.network {
        LabNetwork::Lab => Some(GUEST_ADDRESS.to_owned()),
        LabNetwork::Named(_) => agent_address(&vm, req.service_wait),
    };
    if let Some(f) = r.v.vm.as_mut() {
        f.address.clone_from(&run.address);
    }
    let netns = run.netns.as_deref();
    let Some(addr) = run.address.clone() else {
        r.step("ping", |_| {
            (
                StepResult::Failed,
                "the guest's address is unknown (its agent did not report one)".into(),
            )
        });
        return false;
    };
    if req.test.pings() {
        let ok = r.step("ping", |_| ping(netns, &addr, req.service_wait));
        if let Some(f) = r.v.vm.as_mut() {
            f.ping_ok = Some(ok);
        }
        if !ok {
            return false;
        }
    }
    let mut all = true;
    if req.test.checks_services() {
        for s in &req.services {
            let ok = r.step(&format!("service {}", s.name), |_| {
                service(netns, &addr, s, req.service_wait)
            });
            if let Some(f) = r.v.vm.as_mut() {
                f.services.insert(s.name.clone(), ok);
            }
            all &= ok;
        }
    }
    if req.test == VmTest::Full {
        if let Some(script) = &req.guest_script {
            all &= r.step("script in the guest", |_| {
                guest_script(&vm, script, req.timeout)
            });
        }
        if let Some(file) = &req.host_script {
            all &= r.step("script on the host", |_| {
                match lab::host_script(netns, file, &addr, req.timeout) {
                    Ok((true, out)) => (StepResult::Passed, excerpt(&out)),
                    Ok((false, out)) => (StepResult::Failed, excerpt(&out)),
                    Err(e) => (StepResult::Failed, e),
                }
            });
        }
    }
    all
}

/// The recovery session, defined and not started (the lab must exist first), and the
/// lab's namespace and tap made.
fn restore(
    store: &Store,
    req: &VmVerifyRequest<'_>,
) -> Result<(crate::SessionRecord, String), VerifyError> {
    let hv =
        Hypervisor::connect(req.uri.as_deref()).map_err(|e| VerifyError::Setup(e.to_string()))?;
    // The lab is named in the session's first record, before the session has an id:
    // its names come from a token of its own.
    let token = crate::random_token(8).to_lowercase();
    let (network, lab) = match &req.network {
        LabNetwork::Lab => {
            let lab = Lab::named(&token, Path::new(""));
            (Network::Tap(lab.tap.clone()), Some(lab))
        }
        LabNetwork::Named(n) => (Network::Named(n.clone()), None),
    };
    let original = req.snapshot.manifest.source_label();
    let vreq = crate::vm::VmRequest {
        snapshot: req.snapshot,
        repository: req.repository.clone(),
        name: Some(format!("{original}-verify-{token}")),
        network,
        start: false,
        uri: Some(hv.uri().to_owned()),
        spawn_mount: req.spawn_mount,
        lab: lab.clone(),
        verifier: Some(std::process::id()),
    };
    let rec = crate::vm::start(store, &vreq)?;
    if let Some(lab) = &lab {
        if let Err(e) = lab::create(lab) {
            if let Err(e2) = crate::stop(store, &rec.id) {
                tracing::warn!("taking down session {} after its lab failed: {e2}", rec.id);
            }
            return Err(VerifyError::Setup(format!("making the lab: {e}")));
        }
    }
    let name = rec.domain.clone().unwrap_or_default();
    Ok((rec, name))
}

/// Starts the domain, puts its card in the lab, and waits for the guest.
fn boot(
    r: &mut Recorder<'_>,
    vm: &Vm,
    netns: Option<&str>,
    console: &std::path::Path,
    req: &VmVerifyRequest<'_>,
) -> Outcome {
    let started = Instant::now();
    if let Err(e) = vm.start() {
        return (StepResult::Failed, e.to_string());
    }
    if let Some(ns) = netns {
        let lab = Lab::of_netns(ns, console.parent().unwrap_or(console));
        if let Err(e) = lab::attach(&lab) {
            return (StepResult::Failed, format!("the lab: {e}"));
        }
    }
    loop {
        let text = std::fs::read_to_string(console).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| l.contains("Kernel panic")) {
            r.log(&console_tail(&text));
            return (
                StepResult::Failed,
                format!("the guest's kernel panicked: {}", line.trim()),
            );
        }
        if !vm.is_active().unwrap_or(false) {
            r.log(&console_tail(&text));
            return (
                StepResult::Failed,
                "the guest powered off while booting".into(),
            );
        }
        let how = if text.to_lowercase().contains("login:") {
            Some("a login prompt on the serial console")
        } else if vm.agent_answers(Duration::from_secs(1)) {
            Some("the guest agent answered")
        } else {
            None
        };
        if let Some(how) = how {
            let secs = started.elapsed().as_secs_f64();
            if let Some(f) = r.v.vm.as_mut() {
                f.vm_booted = true;
                f.boot_time_s = Some(secs);
            }
            return (StepResult::Passed, format!("booted in {secs:.1}s ({how})"));
        }
        if started.elapsed() > req.timeout {
            r.log(&console_tail(&text));
            return (
                StepResult::Failed,
                format!(
                    "no login prompt and no guest agent within {}s (timeout)",
                    req.timeout.as_secs()
                ),
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The last lines of the console, for the log.
fn console_tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(15);
    format!("console (last lines):\n{}", lines[from..].join("\n"))
}

fn ping(netns: Option<&str>, addr: &str, wait: Duration) -> Outcome {
    let start = Instant::now();
    let mut tries = 0;
    loop {
        tries += 1;
        match lab::ping(netns, addr) {
            Ok(()) => return (StepResult::Passed, format!("{addr} answered (try {tries})")),
            Err(e) if start.elapsed() > wait => {
                return (
                    StepResult::Failed,
                    format!("{e}, {tries} tries in {}s", wait.as_secs()),
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

fn service(netns: Option<&str>, addr: &str, s: &Service, wait: Duration) -> Outcome {
    let start = Instant::now();
    let each = Duration::from_secs(3);
    loop {
        let got = match &s.probe {
            Probe::Tcp => lab::tcp(netns, addr, s.port, each).map(|()| "connected".to_owned()),
            Probe::Http { path } => http_status(lab::http(netns, addr, s.port, path, each)),
            Probe::Https { path } => http_status(lab::https(netns, addr, s.port, path, each)),
        };
        match got {
            Ok(detail) => return (StepResult::Passed, format!("{addr}:{}: {detail}", s.port)),
            Err(e) if start.elapsed() > wait => {
                return (
                    StepResult::Failed,
                    format!("{addr}:{}: {e} (for {}s)", s.port, wait.as_secs()),
                )
            }
            Err(_) => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

fn http_status(got: Result<u16, String>) -> Result<String, String> {
    match got {
        Ok(code) if code < 400 => Ok(format!("HTTP {code}")),
        Ok(code) => Err(format!("HTTP {code}")),
        Err(e) => Err(e),
    }
}

/// Runs `script` with sh inside the guest through its agent, waiting up to `timeout`.
fn guest_script(vm: &Vm, script: &str, timeout: Duration) -> Outcome {
    let cmd = serde_json::json!({
        "execute": "guest-exec",
        "arguments": {"path": "/bin/sh", "arg": ["-c", script], "capture-output": true}
    });
    let answer = match vm.agent_command(&cmd.to_string(), Duration::from_secs(10)) {
        Ok(a) => a,
        Err(e) => return (StepResult::Failed, e.to_string()),
    };
    let Some(pid) = serde_json::from_str::<serde_json::Value>(&answer)
        .ok()
        .and_then(|v| v["return"]["pid"].as_i64())
    else {
        return (
            StepResult::Failed,
            format!("the agent's answer to guest-exec: {answer}"),
        );
    };
    let start = Instant::now();
    let status = serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}});
    loop {
        let s = vm
            .agent_command(&status.to_string(), Duration::from_secs(10))
            .ok()
            .and_then(|a| serde_json::from_str::<serde_json::Value>(&a).ok());
        if let Some(ret) = s.as_ref().map(|v| &v["return"]) {
            if ret["exited"].as_bool() == Some(true) {
                let decode = |k: &str| {
                    ret[k]
                        .as_str()
                        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                        .map(|b| String::from_utf8_lossy(&b).into_owned())
                        .unwrap_or_default()
                };
                let out = format!("{}{}", decode("out-data"), decode("err-data"));
                let code = ret["exitcode"].as_i64().unwrap_or(-1);
                let detail = format!("exit {code}: {}", excerpt(&out));
                let result = if code == 0 {
                    StepResult::Passed
                } else {
                    StepResult::Failed
                };
                return (result, detail);
            }
        }
        if start.elapsed() > timeout {
            return (
                StepResult::Failed,
                format!("the script did not end within {}s", timeout.as_secs()),
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// The end of a script's output, for the step's detail.
fn excerpt(out: &str) -> String {
    let t = out.trim();
    let from = t.len().saturating_sub(600);
    let from = (from..t.len())
        .find(|i| t.is_char_boundary(*i))
        .unwrap_or(0);
    t[from..].to_owned()
}

/// The first IPv4 address (not loopback) the guest agent reports.
fn agent_address(vm: &Vm, wait: Duration) -> Option<String> {
    let start = Instant::now();
    loop {
        let answer = vm
            .agent_command(
                r#"{"execute":"guest-network-get-interfaces"}"#,
                Duration::from_secs(5),
            )
            .ok()
            .and_then(|a| serde_json::from_str::<serde_json::Value>(&a).ok());
        let found = answer.as_ref().and_then(|v| {
            v["return"].as_array()?.iter().find_map(|i| {
                i["ip-addresses"].as_array()?.iter().find_map(|a| {
                    let ip = a["ip-address"].as_str()?;
                    (a["ip-address-type"] == "ipv4" && !ip.starts_with("127."))
                        .then(|| ip.to_owned())
                })
            })
        });
        if found.is_some() || start.elapsed() > wait {
            return found;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_parse_with_their_ports_and_paths() {
        let s = parse_services("ssh, http,tcp:5432,https:8443/health,http:8080").unwrap();
        let got: Vec<(u16, &Probe)> = s.iter().map(|s| (s.port, &s.probe)).collect();
        assert_eq!(
            got,
            [
                (22, &Probe::Tcp),
                (80, &Probe::Http { path: "/".into() }),
                (5432, &Probe::Tcp),
                (
                    8443,
                    &Probe::Https {
                        path: "/health".into()
                    }
                ),
                (8080, &Probe::Http { path: "/".into() }),
            ]
        );
        for bad in ["tcp", "tcp:0", "tcp:99999", "gopher", "http:eighty"] {
            assert!(parse_services(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tests_parse_and_a_full_test_needs_a_script() {
        assert_eq!(VmTest::parse("boot_ping").unwrap(), VmTest::BootPing);
        assert!(VmTest::parse("reboot").is_err());
        assert!(VmTest::Full.checks_services() && !VmTest::Boot.pings());
    }
}
