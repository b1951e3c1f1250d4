//! The isolated lab of a VM verification: a network namespace of its own per
//! verification, `cairn-lab-<token>`, holding the guest's only network card and
//! nothing else.
//!
//! - The guest's card is a tap, `cl-<token>`, that libvirt opens in the host's
//!   namespace (`<interface type='ethernet'>`, `managed='no'`), down, with no address and
//!   on no bridge: from the guest's start until it is moved, it carries nothing.
//! - Once the domain runs, the tap moves into the lab's namespace, which gets
//!   `10.254.0.1/24` on it, and a DHCP server (busybox's `udhcpd`) that leases the
//!   guest its one address, `10.254.0.2`. Every lab uses the same addresses: each is a
//!   namespace of its own.
//! - The namespace has no other interface than its loopback and the tap, no route
//!   beyond `10.254.0.0/24` and no forwarding: the guest reaches the lab's address and
//!   nothing else; production, the host and the internet are not in it.
//! - The checks run inside the namespace: the ping (busybox's `ping` there), TCP and
//!   HTTP from a thread of ours that joined it (`setns`), a host script under
//!   `ip netns exec`.
//!
//! Taking the lab down ([`remove`]) kills what runs in the namespace and deletes it;
//! the tap, a virtual device, goes with it. A lab is named in its session's record
//! before it is made, so `repo recover cleanup` removes one that a killed verification
//! left.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The lab's own address, on the tap.
pub const LAB_ADDRESS: &str = "10.254.0.1";
/// The one address the lab's DHCP server leases: the guest's.
pub const GUEST_ADDRESS: &str = "10.254.0.2";

const NETNS_PREFIX: &str = "cairn-lab-";

/// A lab's names, from a token of its own (recorded in its session's record).
#[derive(Debug, Clone)]
pub struct Lab {
    /// The network namespace.
    pub netns: String,
    /// The guest's tap.
    pub tap: String,
    /// Where its DHCP server's files go (`lab/` in the session's directory).
    pub dir: PathBuf,
}

impl Lab {
    /// The lab named by `token`, its files in `session_dir`.
    #[must_use]
    pub fn named(token: &str, session_dir: &Path) -> Self {
        Self {
            netns: format!("{NETNS_PREFIX}{token}"),
            tap: tap_of(token),
            dir: session_dir.join("lab"),
        }
    }

    /// The lab whose namespace is `netns`.
    #[must_use]
    pub fn of_netns(netns: &str, session_dir: &Path) -> Self {
        Self::named(
            netns.strip_prefix(NETNS_PREFIX).unwrap_or(netns),
            session_dir,
        )
    }
}

fn tap_of(id: &str) -> String {
    let mut t = format!("cl-{id}");
    t.truncate(15);
    t
}

fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running ip (iproute2): {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Checks that a lab can be made here: root, `ip`, and busybox for DHCP and ping.
pub fn check_tools() -> Result<(), String> {
    if !nix::unistd::geteuid().is_root() {
        return Err("the isolated lab (a network namespace) needs root".into());
    }
    ip(&["-V"]).map_err(|e| format!("{e}: install iproute2"))?;
    busybox()?;
    Ok(())
}

fn busybox() -> Result<PathBuf, String> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain([PathBuf::from("/bin"), PathBuf::from("/usr/bin")])
        .map(|d| d.join("busybox"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            "the lab's DHCP server and ping are busybox's (udhcpd, ping): install busybox-static"
                .to_owned()
        })
}

/// Where each lab's owner (the process that made it) is written: `cleanup` of any state
/// directory leaves a lab alone while its owner lives (two verifications of two stores, or
/// a lab not yet claimed by its session's record, are not another's leftovers).
const OWNERS: &str = "/run/cairn-labs";

fn owner_file(netns: &str) -> PathBuf {
    Path::new(OWNERS).join(netns)
}

/// Whether the process that made lab `netns` still runs.
#[must_use]
pub fn owner_alive(netns: &str) -> bool {
    std::fs::read_to_string(owner_file(netns))
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .is_some_and(|pid| Path::new("/proc").join(pid.to_string()).exists())
}

/// Makes the namespace and the tap (down, in the host's namespace, no address).
pub fn create(lab: &Lab) -> Result<(), String> {
    std::fs::create_dir_all(OWNERS)
        .and_then(|()| std::fs::write(owner_file(&lab.netns), std::process::id().to_string()))
        .map_err(|e| format!("{OWNERS}: {e}"))?;
    ip(&["netns", "add", &lab.netns])?;
    ip(&["-n", &lab.netns, "link", "set", "lo", "up"])?;
    ip(&["tuntap", "add", "dev", &lab.tap, "mode", "tap"])?;
    Ok(())
}

/// After the guest started on the tap: moves it into the lab, addresses it and starts
/// the DHCP server there.
pub fn attach(lab: &Lab) -> Result<(), String> {
    ip(&["link", "set", &lab.tap, "netns", &lab.netns])?;
    let cidr = format!("{LAB_ADDRESS}/24");
    ip(&["-n", &lab.netns, "addr", "add", &cidr, "dev", &lab.tap])?;
    ip(&["-n", &lab.netns, "link", "set", &lab.tap, "up"])?;
    start_dhcp(lab)
}

fn start_dhcp(lab: &Lab) -> Result<(), String> {
    let bb = busybox()?;
    std::fs::create_dir_all(&lab.dir).map_err(|e| format!("{}: {e}", lab.dir.display()))?;
    let leases = lab.dir.join("udhcpd.leases");
    std::fs::write(&leases, b"").map_err(|e| format!("{}: {e}", leases.display()))?;
    let conf = lab.dir.join("udhcpd.conf");
    let text = format!(
        "start {GUEST_ADDRESS}\nend {GUEST_ADDRESS}\ninterface {tap}\nmax_leases 1\n\
         lease_file {leases}\npidfile {pid}\noption subnet 255.255.255.0\noption lease 86400\n",
        tap = lab.tap,
        leases = leases.display(),
        pid = lab.dir.join("udhcpd.pid").display(),
    );
    std::fs::write(&conf, text).map_err(|e| format!("{}: {e}", conf.display()))?;
    let log = File::create(lab.dir.join("udhcpd.log")).map_err(|e| e.to_string())?;
    let err = log.try_clone().map_err(|e| e.to_string())?;
    Command::new("ip")
        .args(["netns", "exec", &lab.netns])
        .arg(bb)
        .args(["udhcpd", "-f"])
        .arg(&conf)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(err)
        .spawn()
        .map_err(|e| format!("starting the lab's DHCP server: {e}"))?;
    Ok(())
}

/// Whether the namespace exists.
#[must_use]
pub fn exists(netns: &str) -> bool {
    Path::new("/run/netns").join(netns).exists()
}

/// Kills what runs in the lab, deletes its namespace (the tap with it) and a tap
/// still in the host's namespace. Idempotent.
pub fn remove(netns: &str) -> Result<(), String> {
    let id = netns.strip_prefix(NETNS_PREFIX).unwrap_or(netns);
    if exists(netns) {
        if let Ok(pids) = ip(&["netns", "pids", netns]) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                crate::stop_process(
                    pid,
                    nix::sys::signal::Signal::SIGTERM,
                    Duration::from_secs(3),
                );
            }
        }
        ip(&["netns", "del", netns])?;
    }
    let tap = tap_of(id);
    if Path::new("/sys/class/net").join(&tap).exists() {
        ip(&["link", "del", &tap])?;
    }
    let _ = std::fs::remove_file(owner_file(netns));
    Ok(())
}

/// The labs of this host, by namespace name.
#[must_use]
pub fn list() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(NETNS_PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

/// Runs `f` on a thread that joined the lab's namespace (the sockets it opens are the
/// lab's); with no lab, here.
fn in_lab<T: Send>(netns: Option<&str>, f: impl FnOnce() -> T + Send) -> Result<T, String> {
    let Some(netns) = netns else {
        return Ok(f());
    };
    let path = Path::new("/run/netns").join(netns);
    let ns = File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::thread::scope(|s| {
        s.spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .map_err(|e| format!("joining the lab's namespace: {e}"))?;
            Ok(f())
        })
        .join()
        .map_err(|_| "a lab check panicked".to_owned())?
    })
}

/// A command run in the lab (`ip netns exec`), or here when there is none.
fn lab_command(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// One ICMP echo to `addr` from the lab, answered within a second.
pub fn ping(netns: Option<&str>, addr: &str) -> Result<(), String> {
    let out = lab_command(netns, &busybox()?)
        .args(["ping", "-c", "1", "-W", "1", addr])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running ping: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("no answer to a ping of {addr}"))
    }
}

/// Connects to `addr:port` from the lab.
pub fn tcp(netns: Option<&str>, addr: &str, port: u16, timeout: Duration) -> Result<(), String> {
    let sa: SocketAddr = format!("{addr}:{port}")
        .parse()
        .map_err(|e| format!("{addr}:{port}: {e}"))?;
    in_lab(netns, move || {
        TcpStream::connect_timeout(&sa, timeout)
            .map(drop)
            .map_err(|e| format!("tcp {port}: {e}"))
    })?
}

/// `GET path` over HTTP/1.0 from the lab; the status code.
pub fn http(
    netns: Option<&str>,
    addr: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<u16, String> {
    let sa: SocketAddr = format!("{addr}:{port}")
        .parse()
        .map_err(|e| format!("{addr}:{port}: {e}"))?;
    let request =
        format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: cairn-verify\r\n\r\n");
    in_lab(netns, move || {
        let mut s = TcpStream::connect_timeout(&sa, timeout).map_err(|e| format!("{e}"))?;
        s.set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        s.write_all(request.as_bytes()).map_err(|e| e.to_string())?;
        let mut head = Vec::new();
        let mut buf = [0u8; 512];
        while !head.contains(&b'\n') && head.len() < 4096 {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
                Err(e) => return Err(format!("reading the answer: {e}")),
            }
        }
        status_code(&head)
    })?
}

/// The status of an HTTP answer's first line.
fn status_code(head: &[u8]) -> Result<u16, String> {
    let line = String::from_utf8_lossy(head);
    let first = line.lines().next().unwrap_or("");
    let mut parts = first.split_whitespace();
    match (
        parts.next(),
        parts.next().and_then(|c| c.parse::<u16>().ok()),
    ) {
        (Some(v), Some(code)) if v.starts_with("HTTP/") => Ok(code),
        _ => Err(format!("not an HTTP answer: {first:?}")),
    }
}

/// `GET path` over HTTPS from the lab (curl, certificates not checked: the lab's
/// guest has the production name on its certificate); the status code.
pub fn https(
    netns: Option<&str>,
    addr: &str,
    port: u16,
    path: &str,
    timeout: Duration,
) -> Result<u16, String> {
    let url = format!("https://{addr}:{port}{path}");
    let out = lab_command(netns, Path::new("curl"))
        .args(["-k", "-s", "-o", "/dev/null"])
        .args(["-w", "%{http_code}", "--max-time"])
        .arg(timeout.as_secs().max(1).to_string())
        .arg(&url)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("running curl for https: {e}"))?;
    let code = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    match code.parse::<u16>() {
        Ok(c) if c > 0 => Ok(c),
        _ => Err(format!("{url}: no answer (curl exit {})", out.status)),
    }
}

/// Runs `script` (a file on the host) inside the lab with `CAIRN_VERIFY_ADDRESS` set to
/// the guest's address; (success, output).
pub fn host_script(
    netns: Option<&str>,
    script: &Path,
    addr: &str,
    timeout: Duration,
) -> Result<(bool, String), String> {
    let mut child = lab_command(netns, Path::new("sh"))
        .arg(script)
        .env("CAIRN_VERIFY_ADDRESS", addr)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    let start = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if start.elapsed() > timeout => {
                let _ = child.kill();
                let _ = child.wait();
                return Ok((false, format!("timed out after {}s", timeout.as_secs())));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(e.to_string()),
        }
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), text))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_an_interface_and_lead_back_to_the_tap() {
        let lab = Lab::named("abcdefgh", Path::new("/s"));
        assert_eq!(lab.netns, "cairn-lab-abcdefgh");
        assert!(lab.tap.len() <= 15);
        assert_eq!(Lab::of_netns(&lab.netns, Path::new("/s")).tap, lab.tap);
    }

    #[test]
    fn http_status_lines_are_read_and_garbage_is_not() {
        assert_eq!(status_code(b"HTTP/1.0 200 OK\r\n"), Ok(200));
        assert_eq!(status_code(b"HTTP/1.1 503 Busy\r\n"), Ok(503));
        assert!(status_code(b"SSH-2.0-OpenSSH\r\n").is_err());
        assert!(status_code(b"").is_err());
    }
}
