//! The libvirt calls the `virt` crate's safe API lacks: pull-mode backup jobs,
//! checkpoints, filesystem freeze and thaw, the guest agent's timeout, and block copy.
//! The one module that calls `virt::sys`; each function here is a safe, typed wrapper
//! that owns what libvirt hands back (strings freed, checkpoint handles freed).

#![allow(unsafe_code)]

use std::ffi::{c_char, CStr, CString};
use std::ptr;

use virt::domain::Domain;
use virt::error::Error;
use virt::sys;

/// A C string for libvirt (our strings never hold a NUL; one that does is refused).
fn cstr(s: &str) -> Result<CString, Error> {
    CString::new(s).map_err(|_| Error::last_error())
}

/// Takes ownership of a string libvirt allocated; `None` for a null pointer.
///
/// # Safety
/// `p` is null or a NUL-terminated string allocated by libvirt, not used afterwards.
unsafe fn owned_string(p: *mut c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    let s = CStr::from_ptr(p).to_string_lossy().into_owned();
    libc::free(p.cast());
    Some(s)
}

fn check(ret: i32) -> Result<i32, Error> {
    if ret < 0 {
        Err(Error::last_error())
    } else {
        Ok(ret)
    }
}

/// Starts a backup job (`virDomainBackupBegin`), creating the checkpoint
/// `checkpoint_xml` at the same instant when given.
pub fn backup_begin(
    dom: &Domain,
    backup_xml: &str,
    checkpoint_xml: Option<&str>,
) -> Result<(), Error> {
    let b = cstr(backup_xml)?;
    let c = checkpoint_xml.map(cstr).transpose()?;
    // SAFETY: the domain pointer is valid while `dom` lives; the strings outlive the call.
    check(unsafe {
        sys::virDomainBackupBegin(
            dom.as_ptr(),
            b.as_ptr(),
            c.as_ref().map_or(ptr::null(), |c| c.as_ptr()),
            0,
        )
    })
    .map(drop)
}

/// The running backup job's XML (`virDomainBackupGetXMLDesc`), `None` when no backup
/// job runs.
pub fn backup_xml(dom: &Domain) -> Option<String> {
    // SAFETY: valid domain; the returned string is ours to free.
    unsafe { owned_string(sys::virDomainBackupGetXMLDesc(dom.as_ptr(), 0)) }
}

/// Ends the domain's job (`virDomainAbortJob`): for a pull-mode backup, stops its NBD
/// server and drops its scratch data.
pub fn abort_job(dom: &Domain) -> Result<(), Error> {
    // SAFETY: valid domain.
    check(unsafe { sys::virDomainAbortJob(dom.as_ptr()) }).map(drop)
}

/// Creates a checkpoint from XML; with `redefine`, only records its metadata (the
/// bitmaps exist already).
pub fn checkpoint_create(dom: &Domain, xml: &str, redefine: bool) -> Result<(), Error> {
    let x = cstr(xml)?;
    let flags = if redefine {
        sys::VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
    } else {
        0
    };
    // SAFETY: valid domain and string; the returned handle is freed at once.
    let cp = unsafe { sys::virDomainCheckpointCreateXML(dom.as_ptr(), x.as_ptr(), flags) };
    if cp.is_null() {
        return Err(Error::last_error());
    }
    // SAFETY: a handle libvirt gave us, freed once.
    unsafe { sys::virDomainCheckpointFree(cp) };
    Ok(())
}

/// The names of the domain's checkpoints.
pub fn checkpoint_names(dom: &Domain) -> Result<Vec<String>, Error> {
    let mut list: *mut sys::virDomainCheckpointPtr = ptr::null_mut();
    // SAFETY: valid domain; libvirt fills `list` with `n` handles we must free.
    let n = check(unsafe { sys::virDomainListAllCheckpoints(dom.as_ptr(), &mut list, 0) })?;
    let mut out = Vec::new();
    for i in 0..n as usize {
        // SAFETY: `i < n` handles are valid; each name is owned by its handle, copied
        // before the handle is freed.
        unsafe {
            let cp = *list.add(i);
            let name = sys::virDomainCheckpointGetName(cp);
            if !name.is_null() {
                out.push(CStr::from_ptr(name).to_string_lossy().into_owned());
            }
            sys::virDomainCheckpointFree(cp);
        }
    }
    if !list.is_null() {
        // SAFETY: the array itself, allocated by libvirt.
        unsafe { libc::free(list.cast()) };
    }
    out.sort();
    Ok(out)
}

/// Runs `f` on the checkpoint `name`; `Ok(None)` when there is none.
fn with_checkpoint<T>(
    dom: &Domain,
    name: &str,
    f: impl FnOnce(sys::virDomainCheckpointPtr) -> Result<T, Error>,
) -> Result<Option<T>, Error> {
    let n = cstr(name)?;
    // SAFETY: valid domain and string.
    let cp = unsafe { sys::virDomainCheckpointLookupByName(dom.as_ptr(), n.as_ptr(), 0) };
    if cp.is_null() {
        let e = Error::last_error();
        return if e.code() == virt::error::ErrorNumber::NoDomainCheckpoint.into() {
            Ok(None)
        } else {
            Err(e)
        };
    }
    let r = f(cp);
    // SAFETY: the handle from the lookup, freed once.
    unsafe { sys::virDomainCheckpointFree(cp) };
    r.map(Some)
}

/// The checkpoint's XML, `None` when there is no such checkpoint.
pub fn checkpoint_xml(dom: &Domain, name: &str) -> Result<Option<String>, Error> {
    with_checkpoint(dom, name, |cp| {
        // SAFETY: a valid handle; the string is ours.
        unsafe { owned_string(sys::virDomainCheckpointGetXMLDesc(cp, 0)) }
            .ok_or_else(Error::last_error)
    })
}

/// Deletes a checkpoint (merging its bitmap into its parent's, as libvirt does), or with
/// `metadata_only` only libvirt's record of it. Missing is fine.
pub fn checkpoint_delete(dom: &Domain, name: &str, metadata_only: bool) -> Result<(), Error> {
    let flags = if metadata_only {
        sys::VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY
    } else {
        0
    };
    with_checkpoint(dom, name, |cp| {
        // SAFETY: a valid handle.
        check(unsafe { sys::virDomainCheckpointDelete(cp, flags) }).map(drop)
    })
    .map(drop)
}

/// Freezes every guest filesystem through the guest agent; returns how many.
pub fn fs_freeze(dom: &Domain) -> Result<u32, Error> {
    // SAFETY: valid domain; no mountpoint list (all of them).
    check(unsafe { sys::virDomainFSFreeze(dom.as_ptr(), ptr::null_mut(), 0, 0) })
        .map(|n| n.unsigned_abs())
}

/// Thaws every guest filesystem; returns how many.
pub fn fs_thaw(dom: &Domain) -> Result<u32, Error> {
    // SAFETY: valid domain; no mountpoint list (all of them).
    check(unsafe { sys::virDomainFSThaw(dom.as_ptr(), ptr::null_mut(), 0, 0) })
        .map(|n| n.unsigned_abs())
}

/// How long libvirt waits for the guest agent (seconds), so that a hung agent cannot
/// hang us.
pub fn agent_timeout(dom: &Domain, seconds: i32) -> Result<(), Error> {
    // SAFETY: valid domain.
    check(unsafe { sys::virDomainAgentSetResponseTimeout(dom.as_ptr(), seconds, 0) }).map(drop)
}

/// Starts copying disk `disk` to `dest_xml` (a `<disk>` element) while the domain runs
/// (`virDomainBlockCopy`, a transient job: the domain stays persistent).
pub fn block_copy(
    dom: &Domain,
    disk: &str,
    dest_xml: &str,
    reuse_existing: bool,
) -> Result<(), Error> {
    let d = cstr(disk)?;
    let x = cstr(dest_xml)?;
    let mut flags = sys::VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB;
    if reuse_existing {
        flags |= sys::VIR_DOMAIN_BLOCK_COPY_REUSE_EXT;
    }
    // SAFETY: valid domain and strings; no typed parameters.
    check(unsafe {
        sys::virDomainBlockCopy(
            dom.as_ptr(),
            d.as_ptr(),
            x.as_ptr(),
            ptr::null_mut(),
            0,
            flags,
        )
    })
    .map(drop)
}

/// The progress of the block job on `disk`: (done, total), `None` when there is none.
pub fn block_job(dom: &Domain, disk: &str) -> Result<Option<(u64, u64)>, Error> {
    let d = cstr(disk)?;
    let mut info = sys::virDomainBlockJobInfo {
        type_: 0,
        bandwidth: 0,
        cur: 0,
        end: 0,
    };
    // SAFETY: valid domain and string; `info` is ours to fill.
    let r =
        check(unsafe { sys::virDomainGetBlockJobInfo(dom.as_ptr(), d.as_ptr(), &mut info, 0) })?;
    Ok((r > 0).then_some((info.cur, info.end)))
}

/// Ends the block job on `disk`; with `pivot`, the domain switches to the copy.
pub fn block_job_abort(dom: &Domain, disk: &str, pivot: bool) -> Result<(), Error> {
    let d = cstr(disk)?;
    let flags = if pivot {
        sys::VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
    } else {
        0
    };
    // SAFETY: valid domain and string.
    check(unsafe { sys::virDomainBlockJobAbort(dom.as_ptr(), d.as_ptr(), flags) }).map(drop)
}
