//! Test switches: environment variables the end-to-end tests set to reach states a
//! test cannot reach from outside (a kill at every storage step, a trivial key
//! derivation, a lowered extent-list limit). Only debug builds, which is what the test
//! suite runs, obey them; a release build refuses to run while one is set, so none of
//! them can weaken a real installation by accident.
//!
//! - `CAIRN_TESTONLY_WEAK_KDF=1`: new keys use the cheapest argon2 parameters (such
//!   keys protect nothing).
//! - `CAIRN_TESTONLY_CRASH_AT=N`: the process SIGKILLs itself just before its Nth change
//!   to the repository's files ([`cairn_engine::store::crash::KillingFs`]).
//! - `CAIRN_TESTONLY_EXTENTS_INLINE=N`: a file of more than N extents keeps its list in
//!   extent-list blobs (N at most 65,536), so that a few MiB make a "huge" file.

use anyhow::{bail, Result};

const PREFIX: &str = "CAIRN_TESTONLY_";

/// The switches in force.
#[derive(Debug, Default, Clone, Copy)]
pub struct Switches {
    pub weak_kdf: bool,
    pub crash_at: Option<u64>,
    pub extents_inline: Option<usize>,
}

/// Reads the switches; in a release build, fails if any is set.
pub fn switches() -> Result<Switches> {
    let set: Vec<String> = std::env::vars_os()
        .filter_map(|(k, _)| k.into_string().ok())
        .filter(|k| k.starts_with(PREFIX))
        .collect();
    if set.is_empty() {
        return Ok(Switches::default());
    }
    if !cfg!(debug_assertions) {
        bail!(
            "{} set: test switches are for the test suite's debug builds, and this release \
             build refuses to run with one; unset it",
            set.join(", ")
        );
    }
    let number = |name: &str| -> Result<Option<u64>> {
        match std::env::var(format!("{PREFIX}{name}")) {
            Ok(v) => Ok(Some(v.parse().map_err(|_| {
                anyhow::anyhow!("{PREFIX}{name}={v:?}: not a number")
            })?)),
            Err(_) => Ok(None),
        }
    };
    let s = Switches {
        weak_kdf: std::env::var(format!("{PREFIX}WEAK_KDF")).is_ok_and(|v| v == "1"),
        crash_at: number("CRASH_AT")?,
        extents_inline: number("EXTENTS_INLINE")?
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
            .filter(|&n| n > 0 && n <= cairn_engine::tree::EXTENTS_INLINE),
    };
    Ok(s)
}

/// The switches of this process, read once (see [`switches`] for the errors).
pub fn get() -> Switches {
    static S: std::sync::OnceLock<Switches> = std::sync::OnceLock::new();
    *S.get_or_init(|| switches().unwrap_or_default())
}
