//! Deciding, at each look at the clock, which schedules are due: the slot to run, the
//! slots missed (the daemon was down; the job's previous run was still going) and the
//! missed-run policy. Pure: the state and the clock are given, the caller enqueues.
//!
//! Rules:
//! - a new schedule starts counting from now (no backfill of the past);
//! - a slot is due once its start (slot + jitter) has passed;
//! - when several slots passed since the last look, or the only one is late by more
//!   than `late_after`, the daemon was not running: every such slot is recorded as
//!   missed, and with `missed = run-once` one run is made up now (never one per slot);
//! - a due slot whose job already has a run queued or running is recorded as missed and
//!   not run: never two runs of a job at once.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::schedule::{parse_duration, MissedPolicy, Schedule, SpecError};
use crate::state::{RunTrigger, ScheduleRow};

/// A schedule from its stored (or configured) fields.
pub fn schedule_of(
    when: &str,
    timezone: Option<&str>,
    jitter: Option<&str>,
    missed: Option<&str>,
) -> Result<Schedule, SpecError> {
    let jitter = match jitter {
        Some(j) if !j.is_empty() => parse_duration(j)?,
        _ => Duration::ZERO,
    };
    let missed = match missed {
        Some(m) if !m.is_empty() => m.parse()?,
        _ => MissedPolicy::RunOnce,
    };
    Schedule::new(when, timezone, jitter, missed)
}

/// The schedule a stored row describes.
pub fn schedule_of_row(row: &ScheduleRow) -> Result<Schedule, SpecError> {
    let jitter = format!("{}s", row.jitter_secs);
    schedule_of(
        &row.when,
        row.timezone.as_deref(),
        Some(&jitter),
        Some(&row.missed),
    )
}

/// The seed of a schedule's jitter.
#[must_use]
pub fn jitter_seed(row: &ScheduleRow) -> String {
    format!("schedule-{}-{}", row.id, row.job)
}

/// What one look decided for one schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Enqueue a run of the job, started by this trigger.
    pub run: Option<RunTrigger>,
    /// Slots that should have run and did not, with why.
    pub missed: Vec<(DateTime<Utc>, String)>,
    /// The slot handled last, to store (None: nothing changed).
    pub last_slot: Option<DateTime<Utc>>,
}

impl Decision {
    fn nothing() -> Self {
        Self {
            run: None,
            missed: Vec::new(),
            last_slot: None,
        }
    }
}

/// How late a slot may be handled and still count as on time.
#[must_use]
pub fn late_after(tick: Duration) -> Duration {
    tick * 2 + Duration::from_secs(60)
}

/// Decides for one schedule at `now`. `busy`: the job has a run queued or running.
#[must_use]
pub fn decide(
    row: &ScheduleRow,
    schedule: &Schedule,
    now: DateTime<Utc>,
    busy: bool,
    late_after: Duration,
) -> Decision {
    let Some(last) = row.last_slot else {
        // New: count from now.
        return Decision {
            last_slot: Some(now),
            ..Decision::nothing()
        };
    };
    let seed = jitter_seed(row);
    let mut due = Vec::new();
    let mut t = last;
    while let Some(slot) = schedule.next_slot(t) {
        if schedule.start_of(slot, &seed) > now || due.len() >= 10_000 {
            break;
        }
        due.push(slot);
        t = slot;
    }
    let Some(&latest) = due.last() else {
        return Decision::nothing();
    };
    let late = chrono::Duration::from_std(late_after).unwrap_or(chrono::Duration::MAX);
    let latest_on_time = now - schedule.start_of(latest, &seed) <= late;
    let mut d = Decision {
        last_slot: Some(latest),
        ..Decision::nothing()
    };
    if busy {
        d.missed = due
            .into_iter()
            .map(|s| {
                (
                    s,
                    "the previous run of the job was still queued or running".to_owned(),
                )
            })
            .collect();
        return d;
    }
    let down = "the daemon was not running at the time".to_owned();
    if latest_on_time {
        d.missed = due[..due.len() - 1]
            .iter()
            .map(|s| (*s, down.clone()))
            .collect();
        d.run = Some(RunTrigger::Schedule);
        return d;
    }
    d.missed = due.iter().map(|s| (*s, down.clone())).collect();
    if schedule.missed == MissedPolicy::RunOnce {
        d.run = Some(RunTrigger::Missed);
    }
    d
}

/// The time of the next thing due among `rows`, for the scheduler's sleep.
#[must_use]
pub fn next_due(rows: &[(ScheduleRow, Schedule)], now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    rows.iter()
        .filter(|(r, _)| r.enabled)
        .filter_map(|(r, s)| {
            let from = r.last_slot.unwrap_or(now);
            s.next_slot(from)
                .map(|slot| s.start_of(slot, &jitter_seed(r)))
        })
        .min()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Origin, ScheduleId};

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn row(when: &str, last: Option<&str>, missed: &str) -> (ScheduleRow, Schedule) {
        let r = ScheduleRow {
            id: ScheduleId(1),
            job: "j".into(),
            when: when.into(),
            timezone: None,
            jitter_secs: 0,
            missed: missed.into(),
            enabled: true,
            origin: Origin::Api,
            last_slot: last.map(utc),
            action: crate::state::ScheduleAction::Run,
        };
        let s = schedule_of_row(&r).unwrap();
        (r, s)
    }

    const LATE: Duration = Duration::from_secs(120);

    #[test]
    fn a_new_schedule_does_not_run_the_past() {
        let (r, s) = row("daily 02:00", None, "run-once");
        let d = decide(&r, &s, utc("2026-12-01T10:00:00Z"), false, LATE);
        assert_eq!(d.run, None);
        assert_eq!(d.last_slot, Some(utc("2026-12-01T10:00:00Z")));
    }

    #[test]
    fn a_slot_runs_once_when_due_and_not_again() {
        let (mut r, s) = row("daily 02:00", Some("2026-12-01T10:00:00Z"), "run-once");
        assert_eq!(
            decide(&r, &s, utc("2026-12-02T01:59:59Z"), false, LATE).run,
            None
        );
        let d = decide(&r, &s, utc("2026-12-02T02:00:05Z"), false, LATE);
        assert_eq!(d.run, Some(RunTrigger::Schedule));
        assert!(d.missed.is_empty());
        r.last_slot = d.last_slot;
        assert_eq!(
            decide(&r, &s, utc("2026-12-02T02:00:35Z"), false, LATE).run,
            None
        );
    }

    #[test]
    fn runs_missed_while_down_are_made_up_once_and_reported() {
        // Down from before the 2nd's run until the 5th at 10:00: three slots missed.
        let (r, s) = row("daily 02:00", Some("2026-12-01T02:00:00Z"), "run-once");
        let d = decide(&r, &s, utc("2026-12-05T10:00:00Z"), false, LATE);
        assert_eq!(d.run, Some(RunTrigger::Missed));
        assert_eq!(d.missed.len(), 4);
        assert_eq!(d.last_slot, Some(utc("2026-12-05T02:00:00Z")));
        let (r, s) = row("daily 02:00", Some("2026-12-01T02:00:00Z"), "skip");
        let d = decide(&r, &s, utc("2026-12-05T10:00:00Z"), false, LATE);
        assert_eq!(d.run, None);
        assert_eq!(d.missed.len(), 4);
    }

    #[test]
    fn back_just_in_time_runs_on_schedule_and_reports_the_earlier_ones() {
        let (r, s) = row("daily 02:00", Some("2026-12-01T02:00:00Z"), "run-once");
        let d = decide(&r, &s, utc("2026-12-03T02:00:30Z"), false, LATE);
        assert_eq!(d.run, Some(RunTrigger::Schedule));
        assert_eq!(d.missed.len(), 1);
        assert_eq!(d.missed[0].0, utc("2026-12-02T02:00:00Z"));
    }

    #[test]
    fn never_two_runs_of_a_job_at_once() {
        let (r, s) = row("every 1m", Some("2026-12-01T10:00:00Z"), "run-once");
        let d = decide(&r, &s, utc("2026-12-01T10:01:01Z"), true, LATE);
        assert_eq!(d.run, None);
        assert_eq!(d.missed.len(), 1);
        assert!(d.missed[0].1.contains("still"));
        assert_eq!(d.last_slot, Some(utc("2026-12-01T10:01:00Z")));
    }

    #[test]
    fn a_jittered_slot_waits_for_its_start() {
        let (mut r, _) = row("daily 02:00", Some("2026-12-01T10:00:00Z"), "run-once");
        r.jitter_secs = 3600;
        let s = schedule_of_row(&r).unwrap();
        let start = s.start_of(utc("2026-12-02T02:00:00Z"), &jitter_seed(&r));
        assert!(start > utc("2026-12-02T02:00:00Z") && start < utc("2026-12-02T03:00:00Z"));
        let before = start - chrono::Duration::seconds(1);
        assert_eq!(decide(&r, &s, before, false, LATE).run, None);
        assert_eq!(
            decide(&r, &s, start, false, LATE).run,
            Some(RunTrigger::Schedule)
        );
        assert_eq!(
            next_due(&[(r.clone(), s.clone())], utc("2026-12-01T12:00:00Z")),
            Some(start)
        );
    }
}
