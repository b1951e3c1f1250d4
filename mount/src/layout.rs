//! Names the mount gives to snapshots: `snapshots/<time>-<short id>` and
//! `hosts/<host>/<source>/<time>`, with a `latest` symlink per source.
//!
//! Times are UTC as `2026-11-21T05-32-10`: names sort by time and hold no `:` (which
//! would break an overlayfs `lowerdir=` option built from the path).

use std::collections::BTreeMap;

use cairn_engine::snapshot::Snapshot;

/// `2026-11-21T05-32-10`.
#[must_use]
pub fn time_name(s: &Snapshot) -> String {
    s.manifest.time.format("%Y-%m-%dT%H-%M-%S").to_string()
}

/// The entry of a snapshot under `snapshots/`.
#[must_use]
pub fn snapshot_dir_name(s: &Snapshot) -> String {
    format!("{}-{}", time_name(s), s.id.short())
}

/// A single safe path component made from arbitrary text.
fn component(s: &str) -> String {
    let c: String = s
        .chars()
        .map(|c| if c == '/' || c == '\0' { '-' } else { c })
        .collect();
    match c.as_str() {
        "" | "." | ".." => format!("_{c}"),
        _ => c,
    }
}

/// The source a snapshot belongs to, as a directory name: its name (a stream, an image,
/// a database), or the
/// backed-up paths (`/var/lib/x` -> `var-lib-x`, several joined by `,`, `/` -> `root`).
#[must_use]
pub fn source_name(s: &Snapshot) -> String {
    match &s.manifest.name {
        Some(n) => component(n),
        _ => {
            let parts: Vec<String> = s
                .manifest
                .paths
                .iter()
                .map(|p| {
                    let t = p.trim_matches('/');
                    if t.is_empty() {
                        "root".to_owned()
                    } else {
                        t.replace('/', "-")
                    }
                })
                .collect();
            component(&parts.join(","))
        }
    }
}

/// What the synthetic directories hold, computed from the snapshot list.
#[derive(Debug, Default, Clone)]
pub struct Layout {
    /// `snapshots/` entries -> index into the snapshot list.
    pub snapshots: BTreeMap<String, usize>,
    /// host -> source -> time name -> index (sorted, so the last is the latest).
    pub hosts: BTreeMap<String, BTreeMap<String, BTreeMap<String, usize>>>,
}

impl Layout {
    /// `list` sorted oldest first, as `Repository::snapshots` returns it.
    #[must_use]
    pub fn new(list: &[Snapshot]) -> Self {
        let mut l = Self::default();
        for (i, s) in list.iter().enumerate() {
            l.snapshots.insert(snapshot_dir_name(s), i);
            let times = l
                .hosts
                .entry(component(&s.manifest.host))
                .or_default()
                .entry(source_name(s))
                .or_default();
            let mut name = time_name(s);
            if times.contains_key(&name) {
                name = snapshot_dir_name(s);
            }
            times.insert(name, i);
        }
        l
    }
}
