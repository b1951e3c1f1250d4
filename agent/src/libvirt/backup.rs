//! Backing up a domain: every disk in one snapshot (`<target>.raw`), with the domain's
//! XML (`domain.xml`) and its UEFI variables (`nvram.fd`) when it has them.
//!
//! **A running domain** is read through libvirt's pull-mode backup: a backup job
//! (`virDomainBackupBegin`) exports each disk as it was when the job began over NBD on
//! a private Unix socket, and creates a checkpoint at that instant. With the guest agent
//! answering, the filesystems are frozen for that instant and thawed right after (also
//! on error); without it, the backup is crash-consistent and says so. The job is ended
//! (`virDomainAbortJob`) on success, on error and when we are interrupted; a job left by
//! a process that was killed is ended by the next backup or `repo vm cleanup`.
//!
//! **A stopped domain**'s disk files are read through qemu-nbd.
//!
//! **Changed-block tracking** survives power-off and host reboot: checkpoints are
//! libvirt's, their bitmaps persistent in the qcow2 files. An incremental reads only
//! the blocks the parent snapshot's checkpoint bitmap marks (pull mode: the export's
//! `qemu:dirty-bitmap:` context; stopped: the qcow2 bitmap through qemu-nbd). A disk is
//! read whole, with a message, when the checkpoint is gone, its bitmap is missing or
//! marked in use (QEMU was killed with the image open), the disk is raw, new or resized,
//! or `--full`. After a snapshot commits, the checkpoints before the one it made are
//! deleted, so the chain stays one long.
//!
//! Checkpoints (and bitmaps) this module makes are named `cairn-<time>-<random>`; others
//! are left alone. libvirt cannot create a checkpoint of a stopped domain: for those the
//! bitmap is added with `qemu-img bitmap` and the checkpoint's metadata redefined.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use cairn_engine::backup::disks::disks_of;
use cairn_engine::backup::{
    backup_disk_set, disk_set_parent, BackupOutcome, BlockSource, DiskInput, DiskSetOptions,
};
use cairn_engine::progress::Progress;
use cairn_engine::snapshot::Snapshot;
use cairn_engine::Repository;
use serde::Serialize;

use super::{ffi, xml, DiskDef, DomainDef, Hypervisor, Vm, VmError};
use crate::image::{Endpoint, NbdSource, NbdUri};
use crate::qemu;

/// Whether to freeze the guest's filesystems for the backup's instant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Quiesce {
    /// When the guest agent answers; crash-consistent otherwise.
    #[default]
    Auto,
    /// The agent must answer: fail otherwise (`--quiesce`).
    Required,
}

#[derive(Debug, Clone, Default)]
pub struct VmBackupOptions {
    pub quiesce: Quiesce,
    /// Read every disk whole, whatever the bitmaps say.
    pub full: bool,
    pub tags: Vec<String>,
    pub host: Option<String>,
}

/// What one disk's backup did.
#[derive(Debug, Clone, Serialize)]
pub struct DiskReport {
    pub target: String,
    pub size: u64,
    pub bytes_read: u64,
    /// Only the blocks changed since the parent's checkpoint were read.
    pub incremental: bool,
    /// Why it was read whole, when changed-block tracking was expected.
    pub note: Option<String>,
}

/// What a VM backup did.
#[derive(Debug, Clone, Serialize)]
pub struct VmBackupReport {
    pub vm: String,
    pub running: bool,
    /// `frozen` (the guest agent froze N filesystems) or `crash-consistent` and why.
    pub consistency: String,
    /// The checkpoint made for the next incremental, if any disk can have one.
    pub checkpoint: Option<String>,
    pub disks: Vec<DiskReport>,
    /// Disks of the domain not in the backup (CD-ROMs, floppies).
    pub skipped: Vec<String>,
}

/// The meta keys a VM snapshot records.
pub mod meta {
    pub const NAME: &str = "vm.name";
    pub const UUID: &str = "vm.uuid";
    pub const CHECKPOINT: &str = "vm.checkpoint";
    pub const CONSISTENCY: &str = "vm.consistency";
    pub const RUNNING: &str = "vm.running";
    pub const URI: &str = "vm.uri";
    /// `disk.<target>.format` (qcow2, raw) and `disk.<target>.source` (the file).
    pub fn disk(target: &str, what: &str) -> String {
        format!("disk.{target}.{what}")
    }
}

/// Whether a snapshot is a VM's.
#[must_use]
pub fn is_vm_snapshot(s: &Snapshot) -> bool {
    s.manifest.meta.contains_key(meta::NAME)
}

/// Backs up the domain `name` (see the module docs).
pub fn backup_vm(
    repo: &Repository,
    hv: &Hypervisor,
    name: &str,
    opts: &VmBackupOptions,
    progress: &Progress,
) -> Result<(BackupOutcome, VmBackupReport), VmError> {
    let vm = hv.vm(name)?;
    end_stale_job(&vm)?;
    let def = vm.definition()?;
    let (disks, skipped) = plan_disks(&def)?;
    let parent = disk_set_parent(repo, opts.host.as_deref(), name)?.filter(is_vm_snapshot);
    let running = vm.is_active()?;
    let checkpoint = new_checkpoint_name();
    let base = Base {
        parent_checkpoint: usable_checkpoint(&vm, parent.as_ref(), opts.full),
        parent_disks: parent.as_ref().map(disks_of).unwrap_or_default(),
        full: opts.full,
    };
    let mut set = DiskSetOptions {
        name: name.to_owned(),
        host: opts.host.clone(),
        tags: opts.tags.clone(),
        files: domain_files(&vm, &def)?,
        meta: BTreeMap::new(),
    };
    set.meta.insert(meta::NAME.into(), name.to_owned());
    if let Some(u) = &def.uuid {
        set.meta.insert(meta::UUID.into(), u.clone());
    }
    set.meta.insert(meta::URI.into(), hv.uri().to_owned());
    set.meta.insert(meta::RUNNING.into(), running.to_string());
    for d in &disks {
        set.meta
            .insert(meta::disk(&d.target, "format"), format_of(d).to_owned());
        if let Some(s) = &d.source {
            set.meta
                .insert(meta::disk(&d.target, "source"), s.display().to_string());
        }
    }
    let run = if running {
        backup_running(repo, &vm, &disks, &base, &checkpoint, opts, set, progress)?
    } else {
        backup_stopped(repo, &vm, &disks, &base, &checkpoint, set, progress)?
    };
    let Run {
        outcome,
        consistency,
        made_checkpoint,
        disks: reports,
    } = run;
    if made_checkpoint {
        shorten_chain(&vm, &disks, &checkpoint, running);
    }
    Ok((
        outcome,
        VmBackupReport {
            vm: name.to_owned(),
            running,
            consistency,
            checkpoint: made_checkpoint.then_some(checkpoint),
            disks: reports,
            skipped,
        },
    ))
}

/// What the parent gives an incremental.
struct Base {
    /// The parent snapshot's checkpoint, when it still exists in libvirt.
    parent_checkpoint: Result<String, String>,
    parent_disks: Vec<String>,
    full: bool,
}

impl Base {
    /// Whether `disk` can be read incrementally; if not, why (`None`: no parent at all,
    /// nothing to say).
    fn incremental(&self, disk: &DiskDef) -> Result<&str, Option<String>> {
        if self.full {
            return Err(Some("--full".into()));
        }
        let cp = match &self.parent_checkpoint {
            Ok(cp) => cp,
            Err(why) if why.is_empty() => return Err(None),
            Err(why) => return Err(Some(why.clone())),
        };
        if format_of(disk) != "qcow2" {
            return Err(Some(format!(
                "a {} disk has no bitmap to track changes",
                format_of(disk)
            )));
        }
        if !self.parent_disks.contains(&disk.target) {
            return Err(Some("a disk the last snapshot does not have".into()));
        }
        Ok(cp)
    }
}

/// What one backup run made.
struct Run {
    outcome: BackupOutcome,
    consistency: String,
    made_checkpoint: bool,
    disks: Vec<DiskReport>,
}

fn format_of(d: &DiskDef) -> &str {
    d.format.as_deref().unwrap_or("raw")
}

/// The disks to back up, and the names of the drives left out. A disk whose data this
/// host cannot read (a network disk) fails the backup: a snapshot without it would look
/// whole.
fn plan_disks(def: &DomainDef) -> Result<(Vec<DiskDef>, Vec<String>), VmError> {
    let mut disks = Vec::new();
    let mut skipped = Vec::new();
    for d in &def.disks {
        if !d.backed_up() {
            skipped.push(d.target.clone());
            continue;
        }
        let why = match (d.kind.as_str(), &d.source) {
            ("file" | "block", Some(_)) => None,
            ("file" | "block", None) => Some("it has no source".to_owned()),
            ("network", _) => Some(format!(
                "it is a network disk ({}), which this host does not read",
                d.protocol.as_deref().unwrap_or("unknown protocol")
            )),
            (other, _) => Some(format!("disks of type {other:?} are not supported")),
        };
        if let Some(why) = why {
            return Err(VmError::UnreadableDisk {
                vm: def.name.clone(),
                disk: d.target.clone(),
                why,
            });
        }
        if !matches!(format_of(d), "qcow2" | "raw") {
            return Err(VmError::UnreadableDisk {
                vm: def.name.clone(),
                disk: d.target.clone(),
                why: format!("its format {:?} is not qcow2 or raw", format_of(d)),
            });
        }
        disks.push(d.clone());
    }
    if disks.is_empty() {
        return Err(VmError::Other(format!(
            "{} has no disk to back up",
            def.name
        )));
    }
    Ok((disks, skipped))
}

/// The domain's persistent XML and its firmware variables, stored beside the disks.
fn domain_files(vm: &Vm, def: &DomainDef) -> Result<Vec<(String, Vec<u8>)>, VmError> {
    let mut files = vec![("domain.xml".to_owned(), vm.xml(true)?.into_bytes())];
    if let Some(nvram) = &def.nvram {
        match std::fs::read(nvram) {
            Ok(bytes) => files.push(("nvram.fd".to_owned(), bytes)),
            // A domain defined but never started has none yet.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(VmError::Other(format!(
                    "{}: reading its firmware variables {}: {e}",
                    def.name,
                    nvram.display()
                )))
            }
        }
    }
    Ok(files)
}

/// The parent's checkpoint if libvirt still has it; else why not (empty: no parent).
fn usable_checkpoint(vm: &Vm, parent: Option<&Snapshot>, full: bool) -> Result<String, String> {
    let Some(parent) = parent else {
        return Err(String::new());
    };
    if full {
        return Err("--full".into());
    }
    let Some(cp) = parent.manifest.meta.get(meta::CHECKPOINT) else {
        return Err("the last snapshot made no checkpoint".into());
    };
    match ffi::checkpoint_xml(vm.domain(), cp) {
        Ok(Some(_)) => Ok(cp.clone()),
        Ok(None) => Err(format!(
            "its checkpoint {cp} is gone from libvirt (deleted, or the domain was redefined)"
        )),
        Err(e) => Err(format!(
            "libvirt cannot read its checkpoint {cp}: {}",
            e.message()
        )),
    }
}

fn new_checkpoint_name() -> String {
    let rand = cairn_engine::id::Id::random().to_hex();
    format!(
        "cairn-{}-{}",
        chrono::Utc::now().format("%Y%m%dT%H%M%S"),
        &rand[..8]
    )
}

// ---- a running domain ----

/// Where a backup job's NBD socket and scratch files live: a directory QEMU (running as
/// its own user) can write, named after our pid so that a job left by a killed process
/// is recognised as stale.
struct JobDir(PathBuf);

const JOB_PREFIX: &str = "cairn-backup-";

impl JobDir {
    fn root() -> PathBuf {
        std::env::temp_dir().join("cairn-vm-jobs")
    }

    fn create(vm: &str) -> Result<Self, VmError> {
        use std::os::unix::fs::PermissionsExt;
        let root = Self::root();
        let io = |e: std::io::Error| VmError::Other(format!("{}: {e}", root.display()));
        std::fs::create_dir_all(&root).map_err(io)?;
        // Traversable by QEMU's user, listable by nobody else.
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o711)).map_err(io)?;
        let dir = root.join(format!("{JOB_PREFIX}{}-{vm}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir(&dir).map_err(io)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
        if let Ok(Some(user)) = nix::unistd::User::from_name("libvirt-qemu") {
            nix::unistd::chown(&dir, Some(user.uid), Some(user.gid))
                .map_err(|e| VmError::Other(format!("{}: {e}", dir.display())))?;
        }
        Ok(Self(dir))
    }
}

impl Drop for JobDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A backup job: ended when dropped, whatever happened.
struct Job<'v> {
    vm: &'v Vm,
}

impl Drop for Job<'_> {
    fn drop(&mut self) {
        if let Err(e) = ffi::abort_job(self.vm.domain()) {
            tracing::warn!("{}: ending the backup job: {}", self.vm.name(), e.message());
        }
    }
}

/// Frozen filesystems: thawed when dropped, however the backup start went.
struct Frozen<'v> {
    vm: &'v Vm,
}

impl Drop for Frozen<'_> {
    fn drop(&mut self) {
        for attempt in 0..3 {
            match ffi::fs_thaw(self.vm.domain()) {
                Ok(_) => return,
                Err(e) if attempt == 2 => tracing::error!(
                    "{}: THAWING THE GUEST'S FILESYSTEMS FAILED ({}): they may still be frozen; \
                     run `virsh domfsthaw {}`",
                    self.vm.name(),
                    e.message(),
                    self.vm.name()
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }
}

/// Freezes the guest's filesystems through its agent, or says why the backup will be
/// crash-consistent.
fn freeze<'v>(vm: &'v Vm, quiesce: Quiesce) -> Result<(Option<Frozen<'v>>, String), VmError> {
    // A guest whose agent hangs must not hang the backup.
    let _ = ffi::agent_timeout(vm.domain(), 10);
    let why = if vm.agent_answers(Duration::from_secs(10)) {
        match ffi::fs_freeze(vm.domain()) {
            Ok(n) => return Ok((Some(Frozen { vm }), format!("frozen ({n} filesystems)"))),
            Err(e) => format!("freezing failed: {}", e.message()),
        }
    } else {
        "the guest agent does not answer".to_owned()
    };
    if quiesce == Quiesce::Required {
        return Err(VmError::NoAgent {
            vm: vm.name().to_owned(),
            why,
        });
    }
    tracing::warn!("{}: crash-consistent backup: {why}", vm.name());
    Ok((None, format!("crash-consistent ({why})")))
}

#[allow(clippy::too_many_arguments)]
fn backup_running(
    repo: &Repository,
    vm: &Vm,
    disks: &[DiskDef],
    base: &Base,
    checkpoint: &str,
    opts: &VmBackupOptions,
    mut set: DiskSetOptions,
    progress: &Progress,
) -> Result<Run, VmError> {
    let dir = JobDir::create(vm.name())?;
    let socket = dir.0.join("nbd.sock");
    let mut plan: Vec<(DiskDef, Option<String>, Option<String>)> = disks
        .iter()
        .map(|d| match base.incremental(d) {
            Ok(cp) => (d.clone(), Some(cp.to_owned()), None),
            Err(note) => (d.clone(), None, note),
        })
        .collect();
    let bitmapped: Vec<&str> = disks
        .iter()
        .filter(|d| format_of(d) == "qcow2")
        .map(|d| d.target.as_str())
        .collect();
    let checkpoint_xml =
        (!bitmapped.is_empty()).then(|| checkpoint_definition(checkpoint, &bitmapped, None));
    let (consistency, job) = loop {
        let backup_xml = pull_backup_xml(&socket, &dir.0, &plan, &vm.definition()?);
        let (frozen, consistency) = freeze(vm, opts.quiesce)?;
        let begun = ffi::backup_begin(vm.domain(), &backup_xml, checkpoint_xml.as_deref());
        drop(frozen);
        match begun {
            Ok(()) => break (consistency, Job { vm }),
            // An incremental libvirt refuses (a bitmap marked inconsistent after QEMU was
            // killed, a bitmap removed behind its back): read those disks whole.
            Err(e) if plan.iter().any(|p| p.1.is_some()) => {
                let why = format!(
                    "libvirt refused the incremental backup ({}): reading the disk whole",
                    e.message()
                );
                tracing::warn!("{}: {why}", vm.name());
                for p in &mut plan {
                    if p.1.take().is_some() {
                        p.2 = Some(why.clone());
                    }
                }
            }
            Err(e) => return Err(VmError::libvirt(vm.name(), "starting the backup job", &e)),
        }
    };
    let exported = exports(vm)?;
    let mut sources = Vec::new();
    for (d, cp, _) in &plan {
        let (export, bitmap) = exported
            .iter()
            .find(|e| e.0 == d.target)
            .map(|e| (e.1.clone(), e.2.clone()))
            .unwrap_or_else(|| (d.target.clone(), None));
        let bitmap = if cp.is_some() {
            Some(bitmap.unwrap_or_else(|| format!("backup-{}", d.target)))
        } else {
            None
        };
        let uri = NbdUri {
            endpoint: Endpoint::Unix(socket.clone()),
            export,
        };
        let src = NbdSource::open(&uri, bitmap.as_deref()).map_err(|e| {
            VmError::Other(format!(
                "{}: reading disk {} from the backup job: {e}",
                vm.name(),
                d.target
            ))
        })?;
        sources.push(src);
    }
    set.meta
        .insert(meta::CONSISTENCY.into(), consistency.clone());
    if checkpoint_xml.is_some() {
        set.meta
            .insert(meta::CHECKPOINT.into(), checkpoint.to_owned());
    }
    let (outcome, reports) = commit(repo, &plan, &mut sources, set, progress)?;
    drop(sources);
    drop(job);
    drop(dir);
    Ok(Run {
        outcome,
        consistency,
        made_checkpoint: checkpoint_xml.is_some(),
        disks: reports,
    })
}

/// A pull-mode backup of every disk in `plan` (incremental where it names a checkpoint).
fn pull_backup_xml(
    socket: &Path,
    dir: &Path,
    plan: &[(DiskDef, Option<String>, Option<String>)],
    def: &DomainDef,
) -> String {
    let mut x = format!(
        "<domainbackup mode='pull'><server transport='unix' socket='{}'/><disks>",
        esc(&socket.display().to_string())
    );
    for d in &def.disks {
        match plan.iter().find(|p| p.0.target == d.target) {
            Some((_, cp, _)) => {
                x.push_str(&format!(
                    "<disk name='{}' backup='yes' type='file'",
                    esc(&d.target)
                ));
                if let Some(cp) = cp {
                    x.push_str(&format!(
                        " backupmode='incremental' incremental='{}'",
                        esc(cp)
                    ));
                } else {
                    x.push_str(" backupmode='full'");
                }
                x.push_str(&format!(
                    "><scratch file='{}'/></disk>",
                    esc(&dir
                        .join(format!("scratch-{}.qcow2", d.target))
                        .display()
                        .to_string())
                ));
            }
            None => x.push_str(&format!("<disk name='{}' backup='no'/>", esc(&d.target))),
        }
    }
    x.push_str("</disks></domainbackup>");
    x
}

/// A checkpoint of the disks `bitmapped` (bitmaps named after it).
fn checkpoint_definition(name: &str, bitmapped: &[&str], created: Option<i64>) -> String {
    let mut x = format!("<domaincheckpoint><name>{}</name>", esc(name));
    if let Some(t) = created {
        x.push_str(&format!("<creationTime>{t}</creationTime>"));
    }
    x.push_str("<disks>");
    for d in bitmapped {
        if created.is_some() {
            x.push_str(&format!(
                "<disk name='{0}' checkpoint='bitmap' bitmap='{1}'/>",
                esc(d),
                esc(name)
            ));
        } else {
            x.push_str(&format!("<disk name='{}' checkpoint='bitmap'/>", esc(d)));
        }
    }
    x.push_str("</disks></domaincheckpoint>");
    x
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

/// What the running job exports: (disk, export name, dirty-bitmap name).
fn exports(vm: &Vm) -> Result<Vec<(String, String, Option<String>)>, VmError> {
    let Some(job) = ffi::backup_xml(vm.domain()) else {
        return Err(VmError::Other(format!(
            "{}: the backup job is gone",
            vm.name()
        )));
    };
    let root = xmltree::Element::parse(job.as_bytes())
        .map_err(|e| VmError::Other(format!("{}: the backup job's XML: {e}", vm.name())))?;
    let mut out = Vec::new();
    if let Some(disks) = root.get_child("disks") {
        for d in disks
            .children
            .iter()
            .filter_map(xmltree::XMLNode::as_element)
        {
            let (Some(name), Some(export)) =
                (d.attributes.get("name"), d.attributes.get("exportname"))
            else {
                continue;
            };
            out.push((
                name.clone(),
                export.clone(),
                d.attributes.get("exportbitmap").cloned(),
            ));
        }
    }
    Ok(out)
}

/// Ends a backup job a killed cairn process left on the domain (its socket directory
/// names a process that is gone). A job of another tool is reported, not touched.
pub fn end_stale_job(vm: &Vm) -> Result<bool, VmError> {
    let Some(job) = ffi::backup_xml(vm.domain()) else {
        return Ok(false);
    };
    let Some(pid) = job
        .split(JOB_PREFIX)
        .nth(1)
        .and_then(|rest| rest.split('-').next())
        .and_then(|p| p.parse::<u32>().ok())
    else {
        return Err(VmError::Other(format!(
            "{}: a backup job of another program runs on it; wait for it to end",
            vm.name()
        )));
    };
    if pid != std::process::id() && crate::process::pid_alive(pid) {
        return Err(VmError::Other(format!(
            "{}: another backup (process {pid}) is running on it",
            vm.name()
        )));
    }
    tracing::warn!(
        "{}: ending a backup job left by process {pid}, which is gone",
        vm.name()
    );
    ffi::abort_job(vm.domain())
        .map_err(|e| VmError::libvirt(vm.name(), "ending a stale backup job", &e))?;
    let _ =
        std::fs::remove_dir_all(JobDir::root().join(format!("{JOB_PREFIX}{pid}-{}", vm.name())));
    Ok(true)
}

// ---- a stopped domain ----

fn backup_stopped(
    repo: &Repository,
    vm: &Vm,
    disks: &[DiskDef],
    base: &Base,
    checkpoint: &str,
    mut set: DiskSetOptions,
    progress: &Progress,
) -> Result<Run, VmError> {
    let mut plan: Vec<(DiskDef, Option<String>, Option<String>)> = Vec::new();
    for d in disks {
        let path = d.source.clone().unwrap_or_default();
        match base.incremental(d) {
            Ok(cp) => {
                let bitmaps =
                    qemu::bitmaps(&path, false).map_err(|e| VmError::Other(e.to_string()))?;
                match bitmaps.iter().find(|b| b.name == cp) {
                    Some(b) if b.in_use => plan.push((
                        d.clone(),
                        None,
                        Some(format!(
                            "its bitmap {cp} is marked in use: QEMU did not close the disk \
                             cleanly (killed or crashed), so it may miss writes; reading the disk whole"
                        )),
                    )),
                    Some(_) => plan.push((d.clone(), Some(cp.to_owned()), None)),
                    None => plan.push((
                        d.clone(),
                        None,
                        Some(format!("its bitmap {cp} is gone from the disk; reading it whole")),
                    )),
                }
            }
            Err(note) => plan.push((d.clone(), None, note)),
        }
    }
    for (d, _, note) in &plan {
        if let Some(n) = note {
            tracing::warn!("{}: disk {}: {n}", vm.name(), d.target);
        }
    }
    // The next incremental's bitmap, added before reading: nothing writes a stopped
    // domain's disks meanwhile (qemu-nbd holds them while we read).
    let bitmapped: Vec<&DiskDef> = disks.iter().filter(|d| format_of(d) == "qcow2").collect();
    let mut added: Vec<PathBuf> = Vec::new();
    for d in &bitmapped {
        let path = d.source.clone().unwrap_or_default();
        if let Err(e) = qemu::bitmap_add(&path, checkpoint) {
            for p in &added {
                let _ = qemu::bitmap_remove(p, checkpoint);
            }
            return Err(VmError::Other(format!(
                "{}: disk {}: {e}",
                vm.name(),
                d.target
            )));
        }
        added.push(path);
    }
    let result = (|| {
        let mut sources = Vec::new();
        for (d, cp, _) in &plan {
            let path = d.source.clone().unwrap_or_default();
            sources.push(
                NbdSource::of_image(&path, format_of(d), cp.as_deref()).map_err(|e| {
                    VmError::Other(format!("{}: disk {}: {e}", vm.name(), d.target))
                })?,
            );
        }
        set.meta.insert(meta::CONSISTENCY.into(), "stopped".into());
        if !bitmapped.is_empty() {
            set.meta
                .insert(meta::CHECKPOINT.into(), checkpoint.to_owned());
        }
        commit(repo, &plan, &mut sources, set, progress)
    })();
    let (outcome, reports) = match result {
        Ok(r) => r,
        Err(e) => {
            for p in &added {
                let _ = qemu::bitmap_remove(p, checkpoint);
            }
            return Err(e);
        }
    };
    if !bitmapped.is_empty() {
        let targets: Vec<&str> = bitmapped.iter().map(|d| d.target.as_str()).collect();
        let xml = checkpoint_definition(checkpoint, &targets, Some(chrono::Utc::now().timestamp()));
        if let Err(e) = ffi::checkpoint_create(vm.domain(), &xml, true) {
            tracing::warn!(
                "{}: recording checkpoint {checkpoint} in libvirt failed ({}): the next backup reads every disk whole",
                vm.name(),
                e.message()
            );
        }
    }
    Ok(Run {
        outcome,
        consistency: "stopped".into(),
        made_checkpoint: !bitmapped.is_empty(),
        disks: reports,
    })
}

// ---- both ----

/// Reads every disk of `plan` from `sources` into one snapshot.
fn commit(
    repo: &Repository,
    plan: &[(DiskDef, Option<String>, Option<String>)],
    sources: &mut [NbdSource],
    set: DiskSetOptions,
    progress: &Progress,
) -> Result<(BackupOutcome, Vec<DiskReport>), VmError> {
    let inputs: Vec<DiskInput<'_>> = plan
        .iter()
        .zip(sources.iter_mut())
        .map(|((d, cp, _), src)| DiskInput {
            name: d.target.clone(),
            source: src as &mut dyn BlockSource,
            changed_blocks: cp.is_some(),
        })
        .collect();
    let (outcome, disks) = backup_disk_set(repo, &set, inputs, progress)?;
    let reports = plan
        .iter()
        .zip(disks)
        .map(|((_, cp, note), o)| DiskReport {
            target: o.name,
            size: o.size,
            bytes_read: o.bytes_read,
            incremental: o.changed_blocks,
            note: if cp.is_some() && !o.changed_blocks {
                Some(
                    "the last snapshot's copy of the disk is unusable (resized?): read whole"
                        .into(),
                )
            } else {
                note.clone()
            },
        })
        .collect();
    Ok((outcome, reports))
}

/// Deletes every cairn checkpoint (and, for a stopped domain, its bitmaps) but `keep`.
fn shorten_chain(vm: &Vm, disks: &[DiskDef], keep: &str, running: bool) {
    let names = match ffi::checkpoint_names(vm.domain()) {
        Ok(n) => n,
        Err(e) => {
            tracing::warn!("{}: listing checkpoints: {}", vm.name(), e.message());
            return;
        }
    };
    for name in names
        .iter()
        .filter(|n| n.starts_with("cairn-") && *n != keep)
    {
        let r = if running {
            ffi::checkpoint_delete(vm.domain(), name, false)
        } else {
            for d in disks.iter().filter(|d| format_of(d) == "qcow2") {
                if let Some(p) = &d.source {
                    let _ = qemu::bitmap_remove(p, name);
                }
            }
            ffi::checkpoint_delete(vm.domain(), name, true)
        };
        if let Err(e) = r {
            tracing::warn!(
                "{}: deleting old checkpoint {name}: {}",
                vm.name(),
                e.message()
            );
        }
    }
    // Bitmaps of ours that libvirt never knew (a stopped backup that failed midway).
    if !running {
        for d in disks.iter().filter(|d| format_of(d) == "qcow2") {
            let Some(p) = &d.source else { continue };
            if let Ok(list) = qemu::bitmaps(p, false) {
                for b in list
                    .iter()
                    .filter(|b| b.name.starts_with("cairn-") && b.name != keep)
                {
                    let _ = qemu::bitmap_remove(p, &b.name);
                }
            }
        }
    }
}

/// Whether the domain's changed-block tracking is ready for the next backup: the last
/// snapshot's checkpoint exists, and (stopped) its bitmaps are there and consistent.
pub fn tracking_ready(vm: &Vm, last: Option<&Snapshot>) -> Result<bool, VmError> {
    let Ok(cp) = usable_checkpoint(vm, last, false) else {
        return Ok(false);
    };
    if vm.is_active()? {
        return Ok(true);
    }
    let def = vm.definition()?;
    for d in def
        .disks
        .iter()
        .filter(|d| d.backed_up() && format_of(d) == "qcow2")
    {
        let Some(p) = &d.source else { continue };
        let ok = qemu::bitmaps(p, false)
            .map(|b| b.iter().any(|b| b.name == cp && !b.in_use))
            .unwrap_or(false);
        if !ok {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Writes `text` atomically to `path` (a copy of firmware variables, a domain XML).
pub fn write_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

/// The XML of a domain saved in a VM snapshot.
pub fn saved_xml(repo: &Repository, snap: &Snapshot) -> Result<String, VmError> {
    let bytes = read_small_file(repo, snap, "domain.xml")?.ok_or_else(|| {
        VmError::Other(format!(
            "snapshot {} holds no domain.xml: not a VM's",
            snap.id.short()
        ))
    })?;
    String::from_utf8(bytes).map_err(|_| VmError::Other("domain.xml is not UTF-8".into()))
}

/// A small file of a snapshot's root (the domain XML, the firmware variables).
pub fn read_small_file(
    repo: &Repository,
    snap: &Snapshot,
    name: &str,
) -> Result<Option<Vec<u8>>, VmError> {
    let tree = repo.load_tree(&snap.manifest.root)?;
    let Some(node) = tree.nodes.iter().find(|n| n.name == name.as_bytes()) else {
        return Ok(None);
    };
    if node.size > 64 << 20 {
        return Err(VmError::Other(format!(
            "{name} in the snapshot is too large"
        )));
    }
    let mut out = Vec::new();
    for e in &node.content {
        match e.blob {
            Some(b) => out.extend(repo.read_blob(&b)?),
            None => out.resize(out.len() + usize::try_from(e.len).unwrap_or(0), 0),
        }
    }
    Ok(Some(out))
}

/// The definition saved in a VM snapshot, parsed.
pub fn saved_definition(repo: &Repository, snap: &Snapshot) -> Result<DomainDef, VmError> {
    let x = saved_xml(repo, snap)?;
    xml::parse(&x).map_err(|e| VmError::Xml(e, snap.manifest.source_label()))
}
