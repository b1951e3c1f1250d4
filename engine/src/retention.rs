//! Retention: which snapshots of one group (host and source) a keep policy keeps, and
//! the rule that kept each.
//!
//! Rules, as restic and borg users know them: `last N` keeps the N newest; `hourly`,
//! `daily`, `weekly` (ISO weeks), `monthly`, `yearly N` keep the newest snapshot of each
//! of the N newest periods that hold a snapshot; `within D` keeps every snapshot no older
//! than D before the newest; `tags` keeps every snapshot carrying one of them. A snapshot
//! is kept if any rule keeps it. Periods are UTC calendar periods. Equal times are broken
//! by position (the earlier entry counts as newer), so decisions are deterministic.

use chrono::{DateTime, Datelike, Duration, Timelike, Utc};

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeepPolicy {
    pub last: u32,
    pub hourly: u32,
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
    pub yearly: u32,
    pub within: Option<Duration>,
    pub tags: Vec<String>,
}

impl KeepPolicy {
    /// A policy with no rule would remove everything: callers refuse it.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.last == 0
            && self.hourly == 0
            && self.daily == 0
            && self.weekly == 0
            && self.monthly == 0
            && self.yearly == 0
            && self.within.is_none()
            && self.tags.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Period {
    Hour,
    Day,
    Week,
    Month,
    Year,
}

/// Why a snapshot is kept.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    Last,
    Period(Period),
    Within,
    Tag(String),
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Last => write!(f, "last"),
            Self::Period(Period::Hour) => write!(f, "hourly"),
            Self::Period(Period::Day) => write!(f, "daily"),
            Self::Period(Period::Week) => write!(f, "weekly"),
            Self::Period(Period::Month) => write!(f, "monthly"),
            Self::Period(Period::Year) => write!(f, "yearly"),
            Self::Within => write!(f, "within"),
            Self::Tag(t) => write!(f, "tag {t}"),
        }
    }
}

/// One snapshot as retention sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub time: DateTime<Utc>,
    pub tags: Vec<String>,
}

/// The calendar period holding `t`.
#[must_use]
pub fn period_key(p: Period, t: DateTime<Utc>) -> (i32, u32, u32, u32) {
    match p {
        Period::Hour => (t.year(), t.ordinal(), t.hour(), 0),
        Period::Day => (t.year(), t.ordinal(), 0, 0),
        Period::Week => {
            let w = t.iso_week();
            (w.year(), w.week(), 0, 0)
        }
        Period::Month => (t.year(), t.month(), 0, 0),
        Period::Year => (t.year(), 0, 0, 0),
    }
}

/// For each candidate (in the given order), the reasons it is kept; empty: removed.
#[must_use]
pub fn apply(policy: &KeepPolicy, snaps: &[Candidate]) -> Vec<Vec<Reason>> {
    let mut out = vec![Vec::new(); snaps.len()];
    // Newest first; among equal times the earlier entry first.
    let mut order: Vec<usize> = (0..snaps.len()).collect();
    order.sort_by(|&a, &b| snaps[b].time.cmp(&snaps[a].time).then(a.cmp(&b)));
    for &i in order.iter().take(policy.last as usize) {
        out[i].push(Reason::Last);
    }
    for (period, n) in [
        (Period::Hour, policy.hourly),
        (Period::Day, policy.daily),
        (Period::Week, policy.weekly),
        (Period::Month, policy.monthly),
        (Period::Year, policy.yearly),
    ] {
        let mut last_key = None;
        let mut kept = 0;
        for &i in &order {
            if kept >= n {
                break;
            }
            let key = period_key(period, snaps[i].time);
            if last_key != Some(key) {
                out[i].push(Reason::Period(period));
                last_key = Some(key);
                kept += 1;
            }
        }
    }
    if let (Some(d), Some(&newest)) = (policy.within, order.first()) {
        let cutoff = snaps[newest].time - d;
        for (i, s) in snaps.iter().enumerate() {
            if s.time >= cutoff {
                out[i].push(Reason::Within);
            }
        }
    }
    for (i, s) in snaps.iter().enumerate() {
        for t in &policy.tags {
            if s.tags.contains(t) {
                out[i].push(Reason::Tag(t.clone()));
            }
        }
    }
    for r in &mut out {
        r.sort();
    }
    out
}

/// Parses `7d`, `12h`, `2w`, `1y6m`, `90m` (y = 365 days, m = 30 days, w, d, h).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let mut total = Duration::zero();
    let mut num = String::new();
    if s.trim().is_empty() {
        return Err("empty duration".into());
    }
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            num.push(c);
            continue;
        }
        let n: i64 = num
            .parse()
            .map_err(|_| format!("{s:?}: a number must come before {c:?}"))?;
        num.clear();
        let unit = match c {
            'y' => Duration::days(365),
            'm' => Duration::days(30),
            'w' => Duration::weeks(1),
            'd' => Duration::days(1),
            'h' => Duration::hours(1),
            _ => return Err(format!("{s:?}: unknown unit {c:?} (use y, m, w, d, h)")),
        };
        total += unit * i32::try_from(n).map_err(|_| format!("{s:?}: too large"))?;
    }
    if !num.is_empty() {
        return Err(format!("{s:?}: give a unit after {num} (y, m, w, d, h)"));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use chrono::TimeZone;
    use proptest::prelude::*;

    use super::*;

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(secs, 0).single().unwrap()
    }

    /// The reference: for each period rule, the N newest distinct periods, and in each
    /// the newest snapshot (first by position among equal times); computed by grouping,
    /// not by scanning.
    #[allow(clippy::needless_range_loop)] // the reference reads best with plain indices
    fn reference(policy: &KeepPolicy, snaps: &[Candidate]) -> Vec<BTreeSet<Reason>> {
        let mut out = vec![BTreeSet::new(); snaps.len()];
        let newer = |a: usize, b: usize| {
            (snaps[a].time, std::cmp::Reverse(a)) > (snaps[b].time, std::cmp::Reverse(b))
        };
        // last N: those with fewer than N snapshots newer than them
        for i in 0..snaps.len() {
            let newer_count = (0..snaps.len()).filter(|&j| j != i && newer(j, i)).count();
            if newer_count < policy.last as usize {
                out[i].insert(Reason::Last);
            }
        }
        for (period, n) in [
            (Period::Hour, policy.hourly),
            (Period::Day, policy.daily),
            (Period::Week, policy.weekly),
            (Period::Month, policy.monthly),
            (Period::Year, policy.yearly),
        ] {
            let mut groups: BTreeMap<(i32, u32, u32, u32), usize> = BTreeMap::new();
            for i in 0..snaps.len() {
                let k = period_key(period, snaps[i].time);
                let best = groups.entry(k).or_insert(i);
                if newer(i, *best) {
                    *best = i;
                }
            }
            for (_, &i) in groups.iter().rev().take(n as usize) {
                out[i].insert(Reason::Period(period));
            }
        }
        if let Some(d) = policy.within {
            if let Some(max) = snaps.iter().map(|s| s.time).max() {
                for (i, s) in snaps.iter().enumerate() {
                    if max - s.time <= d {
                        out[i].insert(Reason::Within);
                    }
                }
            }
        }
        for (i, s) in snaps.iter().enumerate() {
            for t in &policy.tags {
                if s.tags.contains(t) {
                    out[i].insert(Reason::Tag(t.clone()));
                }
            }
        }
        out
    }

    fn histories() -> impl Strategy<Value = Vec<Candidate>> {
        // Up to 60 snapshots over ~3 years, clustered so periods repeat; a few tags.
        prop::collection::vec(
            (
                0i64..100_000_000,
                prop::collection::vec(prop::sample::select(vec!["a", "b", "c"]), 0..2),
            ),
            0..60,
        )
        .prop_map(|v| {
            v.into_iter()
                .map(|(t, tags)| Candidate {
                    time: at(1_700_000_000 + (t / 1000) * 1000),
                    tags: tags.into_iter().map(str::to_owned).collect(),
                })
                .collect()
        })
    }

    fn policies() -> impl Strategy<Value = KeepPolicy> {
        (
            0u32..5,
            0u32..5,
            0u32..8,
            0u32..5,
            0u32..13,
            0u32..4,
            prop::option::of(0i64..20_000_000),
            prop::collection::vec(prop::sample::select(vec!["a", "b"]), 0..2),
        )
            .prop_map(
                |(last, hourly, daily, weekly, monthly, yearly, within, tags)| KeepPolicy {
                    last,
                    hourly,
                    daily,
                    weekly,
                    monthly,
                    yearly,
                    within: within.map(Duration::seconds),
                    tags: tags.into_iter().map(str::to_owned).collect(),
                },
            )
    }

    proptest! {
        #[test]
        fn keep_rules_match_the_reference(snaps in histories(), policy in policies()) {
            let got: Vec<BTreeSet<Reason>> =
                apply(&policy, &snaps).into_iter().map(|r| r.into_iter().collect()).collect();
            prop_assert_eq!(got, reference(&policy, &snaps));
        }

        #[test]
        fn any_rule_keeps_the_newest(snaps in histories(), policy in policies()) {
            prop_assume!(!snaps.is_empty());
            let p = KeepPolicy { tags: Vec::new(), ..policy };
            prop_assume!(!p.is_empty());
            let kept = apply(&p, &snaps);
            let newest = (0..snaps.len())
                .max_by(|&a, &b| snaps[a].time.cmp(&snaps[b].time).then(b.cmp(&a)))
                .unwrap();
            prop_assert!(!kept[newest].is_empty());
        }
    }

    #[test]
    fn daily_keeps_the_last_of_each_day() {
        let day = 86_400;
        let snaps: Vec<Candidate> = [0, 3600, day, day + 60, 3 * day]
            .iter()
            .map(|&s| Candidate {
                time: at(1_700_006_400 + s),
                tags: vec![],
            })
            .collect();
        let p = KeepPolicy {
            daily: 2,
            ..KeepPolicy::default()
        };
        let kept: Vec<bool> = apply(&p, &snaps).iter().map(|r| !r.is_empty()).collect();
        assert_eq!(kept, [false, false, false, true, true]);
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("7d").unwrap(), Duration::days(7));
        assert_eq!(parse_duration("1y6m").unwrap(), Duration::days(365 + 180));
        assert_eq!(parse_duration("36h").unwrap(), Duration::hours(36));
        assert!(parse_duration("7").is_err());
        assert!(parse_duration("3x").is_err());
        assert!(parse_duration("").is_err());
    }
}
