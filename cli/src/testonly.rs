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
    let vars: Vec<(String, String)> = std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().unwrap_or_default())))
        .filter(|(k, _)| k.starts_with(PREFIX))
        .collect();
    parse(&vars, !cfg!(debug_assertions))
}

/// The switches `vars` (the `CAIRN_TESTONLY_*` variables set) give a build that is a
/// release build or not.
fn parse(vars: &[(String, String)], release: bool) -> Result<Switches> {
    if vars.is_empty() {
        return Ok(Switches::default());
    }
    if release {
        let names: Vec<&str> = vars.iter().map(|(k, _)| k.as_str()).collect();
        bail!(
            "{} set: test switches are for the test suite's debug builds, and this release \
             build refuses to run with one; unset it",
            names.join(", ")
        );
    }
    let get = |name: &str| {
        vars.iter()
            .find(|(k, _)| k.strip_prefix(PREFIX) == Some(name))
            .map(|(_, v)| v.as_str())
    };
    let number = |name: &str| -> Result<Option<u64>> {
        get(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| anyhow::anyhow!("{PREFIX}{name}={v:?}: not a number"))
            })
            .transpose()
    };
    Ok(Switches {
        weak_kdf: get("WEAK_KDF") == Some("1"),
        crash_at: number("CRASH_AT")?,
        extents_inline: number("EXTENTS_INLINE")?
            .map(|n| usize::try_from(n).unwrap_or(usize::MAX))
            .filter(|&n| n > 0 && n <= cairn_engine::tree::EXTENTS_INLINE),
    })
}

/// The switches of this process, read once (see [`switches`] for the errors).
pub fn get() -> Switches {
    static S: std::sync::OnceLock<Switches> = std::sync::OnceLock::new();
    *S.get_or_init(|| switches().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn a_release_build_refuses_every_switch_and_a_debug_build_reads_them() {
        let weak = vars(&[("CAIRN_TESTONLY_WEAK_KDF", "1")]);
        let err = parse(&weak, true).unwrap_err().to_string();
        assert!(
            err.contains("CAIRN_TESTONLY_WEAK_KDF") && err.contains("refuses"),
            "{err}"
        );
        // Even one this program does not know.
        assert!(parse(&vars(&[("CAIRN_TESTONLY_X", "")]), true).is_err());
        assert!(parse(&[], true).unwrap().crash_at.is_none());
        let s = parse(
            &vars(&[
                ("CAIRN_TESTONLY_WEAK_KDF", "1"),
                ("CAIRN_TESTONLY_CRASH_AT", "7"),
                ("CAIRN_TESTONLY_EXTENTS_INLINE", "64"),
            ]),
            false,
        )
        .unwrap();
        assert!(s.weak_kdf);
        assert_eq!(s.crash_at, Some(7));
        assert_eq!(s.extents_inline, Some(64));
        assert!(parse(&vars(&[("CAIRN_TESTONLY_CRASH_AT", "soon")]), false).is_err());
    }
}
