//! `forget`: which snapshots to remove, by a keep policy applied to each group of
//! snapshots (by host and source) or by name, and removing them.
//!
//! Forgetting removes manifests only: the blobs of forgotten snapshots stay until a
//! prune, which frees them at once (see [`crate::prune`]). The plan is computed apart
//! from the removal, so that a dry run shows exactly what the real run does.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::id::SnapshotId;
use crate::repository::Repository;
use crate::retention::{self, Candidate, KeepPolicy};
use crate::snapshot::{self, Snapshot, SnapshotFilter};

/// What makes a group the keep policy applies to separately.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Host,
    Source,
}

impl std::str::FromStr for GroupBy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "host" => Ok(Self::Host),
            "source" => Ok(Self::Source),
            other => Err(Error::InvalidInput(format!(
                "group by {other:?}: use host, source or both"
            ))),
        }
    }
}

/// Parses `host,source`, `host`, `source` or an empty string (one group).
pub fn parse_group_by(s: &str) -> Result<Vec<GroupBy>> {
    s.split(',')
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .map(str::parse)
        .collect()
}

/// The decision on one snapshot.
#[derive(Debug, Clone, Serialize)]
pub struct Decision {
    pub id: SnapshotId,
    pub time: chrono::DateTime<chrono::Utc>,
    pub group: String,
    pub keep: bool,
    /// The rules that keep it (`last`, `daily`, ...), or `named` for a snapshot
    /// forgotten by name.
    pub reasons: Vec<String>,
}

/// What a forget removes, group by group, in the order the groups and snapshots are
/// shown (groups by key, snapshots oldest first).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ForgetPlan {
    pub decisions: Vec<Decision>,
}

impl ForgetPlan {
    /// The snapshots the plan removes.
    pub fn removed(&self) -> impl Iterator<Item = &Decision> {
        self.decisions.iter().filter(|d| !d.keep)
    }
}

fn group_key(s: &Snapshot, by: &[GroupBy]) -> String {
    by.iter()
        .map(|k| match k {
            GroupBy::Host => s.manifest.host.clone(),
            GroupBy::Source => s.manifest.source_label(),
        })
        .collect::<Vec<_>>()
        .join(" / ")
}

/// Applies `policy` to each group of the snapshots `filter` selects (others are left
/// out of the plan, so kept). A policy with no rule is refused: it would remove all.
pub fn plan_policy(
    all: &[Snapshot],
    policy: &KeepPolicy,
    group_by: &[GroupBy],
    filter: &SnapshotFilter,
) -> Result<ForgetPlan> {
    if policy.is_empty() {
        return Err(Error::InvalidInput(
            "no keep rule given: that would remove every snapshot (give --keep-last, \
             --keep-daily, ..., or name the snapshots to forget)"
                .into(),
        ));
    }
    let mut groups: BTreeMap<String, Vec<&Snapshot>> = BTreeMap::new();
    for snap in all.iter().filter(|s| filter.matches(&s.manifest)) {
        groups
            .entry(group_key(snap, group_by))
            .or_default()
            .push(snap);
    }
    let mut plan = ForgetPlan::default();
    for (key, snaps) in groups {
        let cands: Vec<Candidate> = snaps
            .iter()
            .map(|s| Candidate {
                time: s.manifest.time,
                tags: s.manifest.tags.clone(),
            })
            .collect();
        for (snap, reasons) in snaps.iter().zip(retention::apply(policy, &cands)) {
            plan.decisions.push(Decision {
                id: snap.id,
                time: snap.manifest.time,
                group: key.clone(),
                keep: !reasons.is_empty(),
                reasons: reasons.iter().map(ToString::to_string).collect(),
            });
        }
    }
    Ok(plan)
}

/// Forgets the snapshots named by `specs` (id prefixes or `latest`, as elsewhere). Every
/// name must match exactly one snapshot, or nothing is planned.
pub fn plan_named(all: &[Snapshot], specs: &[String]) -> Result<ForgetPlan> {
    let mut plan = ForgetPlan::default();
    for spec in specs {
        let snap = snapshot::select(all, spec, &SnapshotFilter::default())?;
        if plan.decisions.iter().any(|d| d.id == snap.id) {
            continue;
        }
        plan.decisions.push(Decision {
            id: snap.id,
            time: snap.manifest.time,
            group: group_key(snap, &[GroupBy::Host, GroupBy::Source]),
            keep: false,
            reasons: vec!["named".into()],
        });
    }
    Ok(plan)
}

/// Removes the manifests of the snapshots `plan` removes; returns how many.
pub fn apply(repo: &Repository, plan: &ForgetPlan) -> Result<usize> {
    repo.ensure_lock_held()?;
    let mut n = 0;
    for d in plan.removed() {
        repo.remove_snapshot(&d.id)?;
        n += 1;
    }
    Ok(n)
}
