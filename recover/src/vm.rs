//! Instant recovery of a virtual machine: a VM snapshot booting in seconds, without a
//! restore.
//!
//! A session stacks, each recorded before it is made:
//! 1. the repository mounted read-only at `sessions/<id>/mnt`, every file shown as owned
//!    by QEMU's user (`repo mount --owner`), so that QEMU reads the disk images a root
//!    backup recorded;
//! 2. per disk, a qcow2 overlay `sessions/<id>/<target>.qcow2` whose backing file is the
//!    mounted `<target>.raw`: every write of the guest lands in the overlay, never in the
//!    repository, and a second session sees the original;
//! 3. a libvirt domain defined from the snapshot's `domain.xml`: a new name and UUID, the
//!    disks on the overlays, no network unless asked (the copy must not collide with the
//!    original), new MAC addresses, its serial console logged to the session directory,
//!    and no relabelling (`<seclabel type='none' model='dac'/>`: the files are the
//!    session's, already QEMU's);
//! 4. the domain started.
//!
//! [`take_down`] undoes it (domain, a verification's lab, overlays, mount); [`promote`] copies the running
//! copy's disks to real storage (block copy, then pivot) so that the session can end and
//! the VM keeps running on its own disks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cairn_agent::libvirt::backup::is_vm_snapshot;
use cairn_agent::libvirt::xml::{self, Copy, Network};
use cairn_agent::libvirt::{Hypervisor, VmError};
use cairn_agent::process::pid_alive;
use cairn_agent::qemu;
use cairn_engine::snapshot::Snapshot;
use cairn_mount::is_mountpoint;

use crate::mounting::{SessionMount, SpawnMount};
use crate::state::{SessionRecord, SessionState, Store};
use crate::{mkdir, random_token, remove_session_dir, stop_process, RecoverError};

/// What to recover, and how.
pub struct VmRequest<'a> {
    pub snapshot: &'a Snapshot,
    pub repository: PathBuf,
    /// The copy's name (default: `<original>-recovered-<session>`).
    pub name: Option<String>,
    pub network: Network,
    /// Define and start it (or only define it).
    pub start: bool,
    /// The libvirt URI (default `qemu:///system`).
    pub uri: Option<String>,
    /// Mounts the repository for the session.
    pub spawn_mount: SpawnMount<'a>,
    /// A verification's lab, recorded with the session (the verifier makes it).
    pub lab: Option<crate::verify::lab::Lab>,
    /// The verifying process, when this session is a verification's.
    pub verifier: Option<u32>,
}

fn vm_err(e: VmError) -> RecoverError {
    RecoverError::Setup(e.to_string())
}

/// QEMU's user under `qemu:///system` (root when there is no such user).
fn qemu_user() -> (u32, u32) {
    nix::unistd::User::from_name("libvirt-qemu")
        .ok()
        .flatten()
        .map_or((0, 0), |u| (u.uid.as_raw(), u.gid.as_raw()))
}

/// Starts a VM session; on any failure everything made so far is taken down again.
pub fn start(store: &Store, req: &VmRequest<'_>) -> Result<SessionRecord, RecoverError> {
    let snap = req.snapshot;
    if !is_vm_snapshot(snap) {
        return Err(RecoverError::Setup(format!(
            "snapshot {} is not a VM's (take one with `repo backup --vm NAME`)",
            snap.id.short()
        )));
    }
    let hv = Hypervisor::connect(req.uri.as_deref()).map_err(vm_err)?;
    let id = random_token(8).to_lowercase();
    let original = snap.manifest.source_label();
    let name = req
        .name
        .clone()
        .unwrap_or_else(|| format!("{original}-recovered-{id}"));
    match hv.vm(&name) {
        Ok(_) => {
            return Err(RecoverError::Setup(format!(
                "a domain named {name} exists already: choose another with --name"
            )))
        }
        Err(VmError::NoSuchDomain(_)) => {}
        Err(e) => return Err(vm_err(e)),
    }
    let dir = store.sessions_dir().join(&id);
    let mut rec = SessionRecord {
        id: id.clone(),
        state: SessionState::Starting,
        engine: "vm".into(),
        snapshot: snap.id.to_hex(),
        repository: req.repository.display().to_string(),
        runtime: "libvirt".into(),
        writable: true,
        creator_pid: std::process::id(),
        dir: dir.clone(),
        container: None,
        server_pid: None,
        mount_pid: None,
        port: None,
        user: None,
        password: None,
        database: None,
        created: chrono::Utc::now().to_rfc3339(),
        domain: None,
        uri: Some(hv.uri().to_owned()),
        disks: Vec::new(),
        layer: "qcow2".into(),
        lab: req.lab.as_ref().map(|l| l.netns.clone()),
        verifier: req.verifier,
    };
    store.put(&rec)?;
    match set_up(store, req, &hv, &name, &mut rec) {
        Ok(()) => Ok(rec),
        Err(e) => {
            if let Err(e2) = take_down(store, &rec) {
                tracing::warn!("cleaning up the failed session {id}: {e2}");
            }
            Err(e)
        }
    }
}

fn set_up(
    store: &Store,
    req: &VmRequest<'_>,
    hv: &Hypervisor,
    name: &str,
    rec: &mut SessionRecord,
) -> Result<(), RecoverError> {
    let dir = rec.dir.clone();
    mkdir(&dir, 0o711)?;
    let mnt = dir.join("mnt");
    mkdir(&mnt, 0o711)?;
    let owner = qemu_user();
    // 1. the repository, read-only, its files QEMU's.
    let pid = (req.spawn_mount)(&SessionMount {
        mountpoint: &mnt,
        owner: Some(owner),
        writable: None,
    })
    .map_err(RecoverError::Setup)?;
    rec.mount_pid = Some(pid);
    store.put(rec)?;
    let snap_dir = mnt
        .join("snapshots")
        .join(cairn_mount::layout::snapshot_dir_name(req.snapshot));
    let saved = std::fs::read_to_string(snap_dir.join("domain.xml"))
        .map_err(|e| RecoverError::io(&snap_dir.join("domain.xml"), e))?;
    let def = xml::parse(&saved).map_err(|e| RecoverError::Setup(e.to_string()))?;
    // 2. an overlay per disk of the snapshot.
    let targets = cairn_engine::backup::disks::disks_of(req.snapshot);
    let mut overlays = HashMap::new();
    for t in &targets {
        let backing = snap_dir.join(format!("{t}.raw"));
        let overlay = dir.join(format!("{t}.qcow2"));
        qemu::create_overlay(&overlay, &backing, "raw")
            .map_err(|e| RecoverError::Setup(e.to_string()))?;
        crate::chown(&overlay, owner.0, owner.1)?;
        overlays.insert(t.clone(), overlay);
        rec.disks.push(t.clone());
    }
    store.put(rec)?;
    let nvram = match std::fs::read(snap_dir.join("nvram.fd")) {
        Ok(bytes) => {
            let p = dir.join("nvram.fd");
            std::fs::write(&p, bytes).map_err(|e| RecoverError::io(&p, e))?;
            crate::chown(&p, owner.0, owner.1)?;
            Some(p)
        }
        Err(_) => None,
    };
    if def.nvram.is_some() && nvram.is_none() {
        tracing::warn!(
            "{name}: the snapshot holds no firmware variables; the copy starts with fresh ones"
        );
    }
    // 3. the domain.
    let console = dir.join("console.log");
    let copy = Copy {
        name: name.to_owned(),
        disks: overlays,
        disk_format: "qcow2".into(),
        nvram,
        network: req.network.clone(),
        console_log: Some(console),
    };
    let xml = xml::copy_xml(&saved, &copy).map_err(|e| RecoverError::Setup(e.to_string()))?;
    let xml = without_relabelling(&xml);
    let t = Instant::now();
    let vm = hv.define(&xml).map_err(vm_err)?;
    tracing::debug!("{name}: defined in {:.1}s", t.elapsed().as_secs_f64());
    rec.domain = Some(vm.name().to_owned());
    store.put(rec)?;
    // 4. started.
    if req.start {
        let t = Instant::now();
        vm.start().map_err(vm_err)?;
        tracing::debug!("{name}: started in {:.1}s", t.elapsed().as_secs_f64());
    }
    rec.state = SessionState::Running;
    store.put(rec)?;
    Ok(())
}

/// The domain XML with libvirt's file relabelling off: the session's files are QEMU's
/// already, and the mounted backing files cannot be relabelled (read-only).
fn without_relabelling(xml: &str) -> String {
    let label = "<seclabel type='none' model='dac'/>";
    match xml.rfind("</domain>") {
        Some(at) if !xml.contains("model='dac'") && !xml.contains("model=\"dac\"") => {
            format!("{}{label}\n{}", &xml[..at], &xml[at..])
        }
        _ => xml.to_owned(),
    }
}

/// Whether a VM session still stands: its mount serves and its domain is defined.
#[must_use]
pub fn is_live(rec: &SessionRecord) -> bool {
    let mounted = is_mountpoint(&rec.mountpoint()) && rec.mount_pid.is_some_and(pid_alive);
    let defined = rec.domain.as_ref().is_some_and(|d| {
        Hypervisor::connect(rec.uri.as_deref())
            .and_then(|hv| hv.vm(d))
            .is_ok()
    });
    mounted && defined
}

/// Takes down the domain, the overlays and the mount of a VM session, then forgets it.
/// Idempotent: what is gone already is skipped.
pub(crate) fn take_down(store: &Store, rec: &SessionRecord) -> Result<(), RecoverError> {
    if let Some(name) = &rec.domain {
        let hv = Hypervisor::connect(rec.uri.as_deref()).map_err(vm_err)?;
        match hv.vm(name) {
            Ok(vm) => vm.undefine().map_err(vm_err)?,
            Err(VmError::NoSuchDomain(_)) => {}
            Err(e) => return Err(vm_err(e)),
        }
    }
    if let Some(lab) = &rec.lab {
        crate::verify::lab::remove(lab).map_err(RecoverError::Setup)?;
    }
    unmount_session(rec)?;
    remove_session_dir(&rec.dir)?;
    store.remove(&rec.id)
}

fn unmount_session(rec: &SessionRecord) -> Result<(), RecoverError> {
    let mnt = rec.mountpoint();
    if is_mountpoint(&mnt) {
        cairn_mount::unmount(&mnt).map_err(|e| RecoverError::io(&mnt, e))?;
    }
    if let Some(pid) = rec.mount_pid {
        let start = Instant::now();
        while pid_alive(pid) && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
        }
        if pid_alive(pid) {
            stop_process(
                pid,
                nix::sys::signal::Signal::SIGTERM,
                Duration::from_secs(5),
            );
        }
    }
    Ok(())
}

/// What [`promote`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Promoted {
    pub domain: String,
    /// Disk target -> its new file.
    pub disks: Vec<(String, PathBuf)>,
    pub seconds: f64,
}

/// Copies the running session's disks to `to` (qcow2, one per disk) while the VM runs,
/// switches the VM to them (pivot), records them in its persistent definition, and ends
/// the session without touching the VM: it keeps running on its own disks.
pub fn promote(
    store: &Store,
    id: &str,
    to: &Path,
    timeout: Duration,
) -> Result<Promoted, RecoverError> {
    let started = Instant::now();
    let rec = store
        .get(id)?
        .ok_or_else(|| RecoverError::NoSession(id.to_owned()))?;
    let name = rec
        .domain
        .clone()
        .filter(|_| rec.is_vm())
        .ok_or_else(|| RecoverError::Setup(format!("session {id} is not a VM's")))?;
    let hv = Hypervisor::connect(rec.uri.as_deref()).map_err(vm_err)?;
    let vm = hv.vm(&name).map_err(vm_err)?;
    if !vm.is_active().map_err(vm_err)? {
        return Err(RecoverError::Setup(format!(
            "{name} is not running: start it (`repo vm start {name}`), or restore the snapshot instead"
        )));
    }
    mkdir(to, 0o755)?;
    let owner = qemu_user();
    let mut disks = Vec::new();
    for t in &rec.disks {
        let size = vm.disk_capacity(t).map_err(vm_err)?;
        let dest = to.join(format!("{name}-{t}.qcow2"));
        if dest.exists() {
            return Err(RecoverError::Setup(format!(
                "{} exists already",
                dest.display()
            )));
        }
        qemu::create_image(&dest, "qcow2", size).map_err(|e| RecoverError::Setup(e.to_string()))?;
        crate::chown(&dest, owner.0, owner.1)?;
        let dest_xml = format!(
            "<disk type='file'><source file='{}'/><driver type='qcow2'/></disk>",
            dest.display()
        );
        vm.block_copy(t, &dest_xml).map_err(vm_err)?;
        disks.push((t.clone(), dest));
    }
    // Wait until every copy mirrors its disk, then switch them all.
    for (t, _) in &disks {
        vm.block_copy_wait(t, timeout).map_err(vm_err)?;
    }
    for (t, _) in &disks {
        vm.block_copy_pivot(t).map_err(vm_err)?;
    }
    // The persistent definition names the new files too (the copy was a transient job).
    let live = vm.xml(false).map_err(vm_err)?;
    hv.define(&live).map_err(vm_err)?;
    // The session ends; the domain is no longer its to remove.
    unmount_session(&rec)?;
    remove_session_dir(&rec.dir)?;
    store.remove(&rec.id)?;
    Ok(Promoted {
        domain: name,
        disks,
        seconds: started.elapsed().as_secs_f64(),
    })
}
