//! A full restore of a VM snapshot as a domain: its disks restored to a directory (qcow2
//! by default), its firmware variables beside them, and a domain defined from the saved
//! XML under the name asked for (a new UUID and new MAC addresses, the network as asked:
//! none by default, so that a copy never collides with the original). Not started.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use cairn_engine::progress::Progress;
use cairn_engine::restore::{restore, RestoreOptions};
use cairn_engine::snapshot::Snapshot;
use cairn_engine::Repository;
use serde::Serialize;

use super::backup::{is_vm_snapshot, read_small_file, saved_xml};
use super::xml::{self, Copy, Network};
use super::{Hypervisor, VmError};
use crate::qemu;

#[derive(Debug, Clone)]
pub struct RestoreVmOptions {
    /// The new domain's name (default: the original's, which must then be free).
    pub name: Option<String>,
    /// Where the disks go.
    pub dir: PathBuf,
    /// `qcow2` (converted, sparse) or `raw` (sparse).
    pub format: String,
    pub network: Network,
}

/// What a VM restore made.
#[derive(Debug, Clone, Serialize)]
pub struct RestoredVm {
    pub domain: String,
    pub disks: Vec<(String, PathBuf)>,
    pub nvram: Option<PathBuf>,
}

/// Restores `snap` as a new domain (see the module docs). Nothing is defined unless
/// every disk restored whole; the files of a failed restore are removed.
pub fn restore_vm(
    repo: &Repository,
    hv: &Hypervisor,
    snap: &Snapshot,
    opts: &RestoreVmOptions,
    progress: &Progress,
) -> Result<RestoredVm, VmError> {
    if !is_vm_snapshot(snap) {
        return Err(VmError::Other(format!(
            "snapshot {} is not a VM's (take one with `repo backup --vm NAME`)",
            snap.id.short()
        )));
    }
    if !matches!(opts.format.as_str(), "qcow2" | "raw") {
        return Err(VmError::Other(format!(
            "disk format {:?}: use qcow2 or raw",
            opts.format
        )));
    }
    let saved = saved_xml(repo, snap)?;
    let original = snap.manifest.source_label();
    let name = opts.name.clone().unwrap_or_else(|| original.clone());
    match hv.vm(&name) {
        Ok(_) => {
            return Err(VmError::Other(format!(
                "a domain named {name} exists already: give the copy another with --name"
            )))
        }
        Err(VmError::NoSuchDomain(_)) => {}
        Err(e) => return Err(e),
    }
    let targets = cairn_engine::backup::disks::disks_of(snap);
    std::fs::create_dir_all(&opts.dir)
        .map_err(|e| VmError::Other(format!("{}: {e}", opts.dir.display())))?;
    let mut made: Vec<PathBuf> = Vec::new();
    let result = (|| {
        let disks = restore_disks(repo, snap, &targets, &name, opts, progress, &mut made)?;
        let nvram = match read_small_file(repo, snap, "nvram.fd")? {
            Some(bytes) => {
                let p = opts.dir.join(format!("{name}_VARS.fd"));
                super::backup::write_file(&p, &bytes)
                    .map_err(|e| VmError::Other(format!("{}: {e}", p.display())))?;
                made.push(p.clone());
                Some(p)
            }
            None => None,
        };
        let copy = Copy {
            name: name.clone(),
            disks: disks.iter().cloned().collect::<HashMap<_, _>>(),
            disk_format: opts.format.clone(),
            nvram: nvram.clone(),
            network: opts.network.clone(),
            console_log: None,
        };
        let xml = xml::copy_xml(&saved, &copy).map_err(|e| VmError::Xml(e, original.clone()))?;
        let vm = hv.define(&xml)?;
        Ok(RestoredVm {
            domain: vm.name().to_owned(),
            disks,
            nvram,
        })
    })();
    if result.is_err() {
        for p in &made {
            let _ = std::fs::remove_file(p);
        }
    }
    result
}

/// Restores each disk to `<dir>/<name>-<target>.<format>`.
fn restore_disks(
    repo: &Repository,
    snap: &Snapshot,
    targets: &[String],
    name: &str,
    opts: &RestoreVmOptions,
    progress: &Progress,
    made: &mut Vec<PathBuf>,
) -> Result<Vec<(String, PathBuf)>, VmError> {
    let staging = tempfile::Builder::new()
        .prefix(".cairn-restore-")
        .tempdir_in(&opts.dir)
        .map_err(|e| VmError::Other(format!("{}: {e}", opts.dir.display())))?;
    let out = restore(
        repo,
        snap,
        &RestoreOptions {
            target: staging.path().to_owned(),
            includes: targets
                .iter()
                .map(|t| PathBuf::from(format!("/{t}.raw")))
                .collect(),
            threads: 0,
            no_sync: opts.format != "raw",
        },
        progress,
    )?;
    if let Some(w) = out.warnings.iter().find(|w| w.lost) {
        return Err(VmError::Other(format!(
            "disk {} did not restore whole ({}): no domain defined",
            w.path.display(),
            w.message
        )));
    }
    let mut disks = Vec::new();
    for t in targets {
        let raw = staging.path().join(format!("{t}.raw"));
        let dest = opts.dir.join(format!("{name}-{t}.{}", opts.format));
        if dest.exists() {
            return Err(VmError::Other(format!("{} exists already", dest.display())));
        }
        if opts.format == "raw" {
            std::fs::rename(&raw, &dest)
                .map_err(|e| VmError::Other(format!("{}: {e}", dest.display())))?;
        } else {
            qemu::convert_raw(&raw, &dest, &opts.format)
                .map_err(|e| VmError::Other(e.to_string()))?;
        }
        made.push(dest.clone());
        disks.push((t.clone(), dest));
    }
    sync(&opts.dir);
    Ok(disks)
}

fn sync(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        let _ = nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f));
    }
}
