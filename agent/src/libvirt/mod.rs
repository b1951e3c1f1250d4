//! Virtual machines through libvirt: domains by name, their state, disks and XML, the
//! hypervisor operations a user names (start, stop, reboot, snapshots), and backing them
//! up ([`backup`]). Everything libvirt's safe Rust API lacks goes through [`ffi`], the
//! one module that calls `virt::sys`.

pub mod backup;
pub mod ffi;
pub mod restore;
pub mod xml;

use std::time::{Duration, Instant};

use serde::Serialize;
use virt::connect::Connect;
use virt::domain::{Domain, DomainState};

pub use xml::{DiskDef, DomainDef};

/// The URI used when none is given.
pub const DEFAULT_URI: &str = "qemu:///system";

/// What went wrong talking to libvirt, in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(
        "libvirt at {uri} is not reachable ({message}): is libvirtd running (`libvirtd -d`), \
         and may this user connect?"
    )]
    Unreachable { uri: String, message: String },
    #[error("no domain named {0:?} (see `repo vm list`)")]
    NoSuchDomain(String),
    #[error("{0} is already running")]
    AlreadyRunning(String),
    #[error("{0} is not running")]
    NotRunning(String),
    #[error("{vm}: disk {disk} cannot be backed up: {why}; no snapshot was made")]
    UnreadableDisk {
        vm: String,
        disk: String,
        why: String,
    },
    #[error("{vm}: the guest agent did not answer ({why}); --quiesce needs it to freeze the filesystems")]
    NoAgent { vm: String, why: String },
    #[error("{vm}: {what}: {message}")]
    Libvirt {
        vm: String,
        what: String,
        message: String,
    },
    #[error("{vm}: {0}", vm = .1)]
    Xml(xml::XmlError, String),
    #[error(transparent)]
    Engine(#[from] cairn_engine::Error),
    #[error("{0}")]
    Other(String),
}

impl VmError {
    fn libvirt(vm: &str, what: &str, e: &virt::error::Error) -> Self {
        Self::Libvirt {
            vm: vm.to_owned(),
            what: what.to_owned(),
            message: e.message().to_owned(),
        }
    }
}

/// An open connection to a hypervisor.
pub struct Hypervisor {
    conn: Connect,
    uri: String,
}

/// A domain, by name.
pub struct Vm {
    dom: Domain,
    name: String,
}

/// What `repo vm list` shows of a domain.
#[derive(Debug, Clone, Serialize)]
pub struct VmSummary {
    pub name: String,
    pub uuid: Option<String>,
    pub state: String,
    pub persistent: bool,
    pub disks: Vec<DiskSummary>,
}

#[derive(Debug, Clone, Serialize)]
pub struct DiskSummary {
    pub target: String,
    pub device: String,
    pub kind: String,
    pub source: Option<String>,
    pub format: Option<String>,
}

impl Hypervisor {
    /// Connects to `uri` (`qemu:///system` when `None`).
    pub fn connect(uri: Option<&str>) -> Result<Self, VmError> {
        let uri = uri.unwrap_or(DEFAULT_URI).to_owned();
        // libvirt prints its errors to stderr unless told otherwise.
        virt::error::clear_error_callback();
        match Connect::open(Some(&uri)) {
            Ok(conn) => Ok(Self { conn, uri }),
            Err(e) => Err(VmError::Unreachable {
                uri,
                message: e.message().to_owned(),
            }),
        }
    }

    #[must_use]
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The domain called `name`.
    pub fn vm(&self, name: &str) -> Result<Vm, VmError> {
        match self.conn.lookup_domain_by_name(name) {
            Ok(dom) => Ok(Vm {
                dom,
                name: name.to_owned(),
            }),
            Err(e) if e.code() == virt::error::ErrorNumber::NoDomain.into() => {
                Err(VmError::NoSuchDomain(name.to_owned()))
            }
            Err(e) => Err(VmError::libvirt(name, "looking it up", &e)),
        }
    }

    /// Every domain (running or defined), by name.
    pub fn vms(&self) -> Result<Vec<Vm>, VmError> {
        let doms = self
            .conn
            .list_all_domains(0)
            .map_err(|e| VmError::libvirt("libvirt", "listing domains", &e))?;
        let mut out: Vec<Vm> = doms
            .into_iter()
            .filter_map(|dom| {
                let name = dom.name().ok()?;
                Some(Vm { dom, name })
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// The name of a libvirt network with no forwarding and no address on the host: its
    /// guests reach each other and nothing else (the bridge is not routed, the host has
    /// no address on it). Made and started on first use: `cairn-isolated`.
    pub fn isolated_network(&self) -> Result<String, VmError> {
        const NAME: &str = "cairn-isolated";
        let err = |what: &str, e: &virt::error::Error| VmError::libvirt(NAME, what, e);
        let net = match self.conn.lookup_network_by_name(NAME) {
            Ok(n) => n,
            Err(_) => {
                let xml = format!(
                    "<network><name>{NAME}</name><bridge name='virbr-cairn' stp='off'/></network>"
                );
                self.conn
                    .define_network_xml(&xml)
                    .map_err(|e| err("defining the isolated network", &e))?
            }
        };
        if !net.is_active().unwrap_or(false) {
            net.create()
                .map_err(|e| err("starting the isolated network", &e))?;
        }
        Ok(NAME.to_owned())
    }

    /// The network a recovered or cloned domain gets, from what a user typed: `none` (no
    /// card), `isolated` ([`Self::isolated_network`]) or a libvirt network's name.
    pub fn network(&self, choice: &str) -> Result<xml::Network, VmError> {
        Ok(match choice {
            "none" => xml::Network::None,
            "isolated" => xml::Network::Named(self.isolated_network()?),
            other => xml::Network::Named(other.to_owned()),
        })
    }

    /// Defines a domain from XML (persistent).
    pub fn define(&self, xml: &str) -> Result<Vm, VmError> {
        let dom = self
            .conn
            .define_domain_xml(xml)
            .map_err(|e| VmError::libvirt("libvirt", "defining a domain", &e))?;
        let name = dom
            .name()
            .map_err(|e| VmError::libvirt("libvirt", "naming the new domain", &e))?;
        Ok(Vm { dom, name })
    }
}

impl Vm {
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn domain(&self) -> &Domain {
        &self.dom
    }

    fn err(&self, what: &str, e: &virt::error::Error) -> VmError {
        VmError::libvirt(&self.name, what, e)
    }

    /// Whether it runs (paused counts as running: its disks are open).
    pub fn is_active(&self) -> Result<bool, VmError> {
        self.dom
            .is_active()
            .map_err(|e| self.err("reading its state", &e))
    }

    /// Its state in one word: running, paused, shut off, crashed, ...
    pub fn state(&self) -> Result<String, VmError> {
        let (state, _) = self
            .dom
            .state()
            .map_err(|e| self.err("reading its state", &e))?;
        Ok(match state {
            virt::enumutil::Enum::Known(s) => match s {
                DomainState::Running => "running",
                DomainState::Blocked => "blocked",
                DomainState::Paused => "paused",
                DomainState::Shutdown => "shutting down",
                DomainState::Shutoff => "shut off",
                DomainState::Crashed => "crashed",
                DomainState::PMSuspended => "suspended",
                DomainState::NoState => "no state",
            }
            .to_owned(),
            virt::enumutil::Enum::Unknown(n) => format!("state {n}"),
        })
    }

    /// Its XML: the persistent definition (`inactive`) or the running one.
    pub fn xml(&self, inactive: bool) -> Result<String, VmError> {
        let flags = if inactive {
            virt::sys::VIR_DOMAIN_XML_INACTIVE
        } else {
            0
        };
        self.dom
            .xml_desc(flags)
            .map_err(|e| self.err("reading its XML", &e))
    }

    /// Its definition, parsed.
    pub fn definition(&self) -> Result<DomainDef, VmError> {
        xml::parse(&self.xml(false)?).map_err(|e| VmError::Xml(e, self.name.clone()))
    }

    pub fn summary(&self) -> Result<VmSummary, VmError> {
        let def = self.definition()?;
        Ok(VmSummary {
            name: self.name.clone(),
            uuid: def.uuid,
            state: self.state()?,
            persistent: self.dom.is_persistent().unwrap_or(false),
            disks: def
                .disks
                .iter()
                .map(|d| DiskSummary {
                    target: d.target.clone(),
                    device: d.device.clone(),
                    kind: d.kind.clone(),
                    source: d.source.as_ref().map(|p| p.display().to_string()),
                    format: d.format.clone(),
                })
                .collect(),
        })
    }

    pub fn start(&self) -> Result<(), VmError> {
        if self.is_active()? {
            return Err(VmError::AlreadyRunning(self.name.clone()));
        }
        self.dom
            .create()
            .map(drop)
            .map_err(|e| self.err("starting it", &e))
    }

    /// Asks the guest to shut down (ACPI, and the guest agent when it answers) and waits
    /// up to `wait` for it to go; with `force`, pulls the plug instead.
    pub fn stop(&self, force: bool, wait: Duration) -> Result<(), VmError> {
        if !self.is_active()? {
            return Err(VmError::NotRunning(self.name.clone()));
        }
        if force {
            return self.dom.destroy().map_err(|e| self.err("stopping it", &e));
        }
        let _ = ffi::agent_timeout(&self.dom, 10);
        let agent = self
            .dom
            .shutdown_flags(virt::sys::VIR_DOMAIN_SHUTDOWN_GUEST_AGENT);
        if agent.is_err() {
            self.dom
                .shutdown_flags(virt::sys::VIR_DOMAIN_SHUTDOWN_ACPI_POWER_BTN)
                .map_err(|e| self.err("asking it to shut down", &e))?;
        }
        let started = Instant::now();
        while self.is_active()? {
            if started.elapsed() > wait {
                return Err(VmError::Other(format!(
                    "{} did not shut down within {} s; `repo vm stop --force` pulls the plug",
                    self.name,
                    wait.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        Ok(())
    }

    pub fn reboot(&self) -> Result<(), VmError> {
        if !self.is_active()? {
            return Err(VmError::NotRunning(self.name.clone()));
        }
        self.dom.reboot(0).map_err(|e| self.err("rebooting it", &e))
    }

    /// Removes the definition (with its checkpoint and snapshot metadata, and its
    /// firmware variables); stops it first if it runs.
    pub fn undefine(&self) -> Result<(), VmError> {
        if self.is_active()? {
            self.dom
                .destroy()
                .map_err(|e| self.err("stopping it", &e))?;
        }
        let flags = virt::sys::VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | virt::sys::VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | virt::sys::VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | virt::sys::VIR_DOMAIN_UNDEFINE_NVRAM;
        self.dom
            .undefine_flags(flags)
            .map_err(|e| self.err("undefining it", &e))
    }

    /// libvirt's own snapshots of the domain (not cairn's), by name.
    pub fn snapshots(&self) -> Result<Vec<String>, VmError> {
        let snaps = self
            .dom
            .list_all_snapshots(0)
            .map_err(|e| self.err("listing its snapshots", &e))?;
        let mut names: Vec<String> = snaps.iter().filter_map(|s| s.name().ok()).collect();
        names.sort();
        Ok(names)
    }

    pub fn delete_snapshot(&self, name: &str) -> Result<(), VmError> {
        let snap = Domain::lookup_snapshot_by_name(&self.dom, name, 0)
            .map_err(|_| VmError::Other(format!("{} has no snapshot {name:?}", self.name)))?;
        snap.delete(0)
            .map_err(|e| self.err("deleting its snapshot", &e))
    }

    /// Runs a command of the QEMU guest agent (JSON in, JSON out), waiting at most
    /// `timeout`.
    pub fn agent_command(&self, json: &str, timeout: Duration) -> Result<String, VmError> {
        let secs = i32::try_from(timeout.as_secs()).unwrap_or(i32::MAX).max(1);
        self.dom
            .qemu_agent_command(json, secs, 0)
            .map_err(|e| self.err("talking to its guest agent", &e))
    }

    /// Whether the guest agent answers a ping within `timeout`.
    #[must_use]
    pub fn agent_answers(&self, timeout: Duration) -> bool {
        self.agent_command(r#"{"execute":"guest-ping"}"#, timeout)
            .is_ok()
    }

    /// The size the guest sees of disk `disk`.
    pub fn disk_capacity(&self, disk: &str) -> Result<u64, VmError> {
        self.dom
            .block_info(disk, 0)
            .map(|b| b.capacity)
            .map_err(|e| self.err(&format!("reading the size of disk {disk}"), &e))
    }

    /// Starts copying disk `disk` to the (pre-created) file `dest_xml` describes, while
    /// the domain runs.
    pub fn block_copy(&self, disk: &str, dest_xml: &str) -> Result<(), VmError> {
        ffi::block_copy(&self.dom, disk, dest_xml, true)
            .map_err(|e| self.err(&format!("copying disk {disk}"), &e))
    }

    /// Waits until the copy of `disk` mirrors it (ready to pivot).
    pub fn block_copy_wait(&self, disk: &str, timeout: Duration) -> Result<(), VmError> {
        let started = Instant::now();
        loop {
            match ffi::block_job(&self.dom, disk) {
                Ok(Some((cur, end))) if end > 0 && cur == end => return Ok(()),
                Ok(Some(_)) => {}
                Ok(None) => {
                    return Err(VmError::Other(format!(
                        "{}: the copy of disk {disk} stopped before it was complete",
                        self.name
                    )))
                }
                Err(e) => return Err(self.err(&format!("following the copy of {disk}"), &e)),
            }
            if started.elapsed() > timeout {
                let _ = ffi::block_job_abort(&self.dom, disk, false);
                return Err(VmError::Other(format!(
                    "{}: copying disk {disk} took more than {} s; the copy was cancelled",
                    self.name,
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Switches `disk` to its finished copy.
    pub fn block_copy_pivot(&self, disk: &str) -> Result<(), VmError> {
        ffi::block_job_abort(&self.dom, disk, true)
            .map_err(|e| self.err(&format!("switching disk {disk} to its copy"), &e))?;
        // The pivot completes asynchronously: wait until the job is gone.
        let started = Instant::now();
        while ffi::block_job(&self.dom, disk).ok().flatten().is_some() {
            if started.elapsed() > Duration::from_secs(60) {
                return Err(VmError::Other(format!(
                    "{}: disk {disk} did not switch to its copy",
                    self.name
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// A command to QEMU's monitor (HMP text with `hmp`), for tests and diagnostics.
    pub fn monitor_command(&self, cmd: &str, hmp: bool) -> Result<String, VmError> {
        let flags = if hmp {
            virt::sys::VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
        } else {
            0
        };
        self.dom
            .qemu_monitor_command(cmd, flags)
            .map_err(|e| self.err("talking to its monitor", &e))
    }
}
