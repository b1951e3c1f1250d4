//! What lives on this host, not in the repository: where host state goes, and who and
//! where this process is.
//!
//! Host state (known repositories, recovery sessions, and later schedules, job runs and
//! the index cache) is in `$CAIRN_STATE_DIR`, else `/var/lib/cairn` for root, else
//! `$XDG_STATE_HOME/cairn` (`~/.local/state/cairn`).

use std::path::PathBuf;

/// The state directory (see the module docs).
#[must_use]
pub fn state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("CAIRN_STATE_DIR") {
        return PathBuf::from(d);
    }
    if nix::unistd::geteuid().is_root() {
        return PathBuf::from("/var/lib/cairn");
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(d).join("cairn");
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".local/state/cairn")
}
