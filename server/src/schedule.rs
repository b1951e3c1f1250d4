//! When a job runs: the schedule forms users type, the times they mean, and the clock
//! they are read against.
//!
//! Forms ([`Spec::parse`]):
//! - `daily 02:00`, `weekly sunday:03:00` (or `weekly sun 03:00`), `monthly 15 04:00`
//!   (a day past the month's end means its last day: `monthly 31` runs on 30 April);
//! - `hourly` or `hourly :15`; `every 15m` (intervals from the Unix epoch, in UTC);
//! - cron expressions of 5 or 6 fields (with seconds), read by `croner`;
//! - Proxmox-style calendar events: `mon..fri 22:30`, `sat,sun 8..20/2:00`, `*:0/15`.
//!
//! Times are wall-clock times in the schedule's time zone (UTC unless given). Across a
//! daylight-saving change, a time that does not exist that day (02:30 when clocks go
//! from 02:00 to 03:00) runs at the first instant after the gap, and a time that
//! happens twice runs once, at the first. A [`Schedule`] adds a random delay (jitter,
//! the same for a given slot whatever restarts happen) and a missed-run policy, applied
//! by the scheduler.
//!
//! The [`Clock`] is injected: tests move time by hand.

use std::fmt;
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Duration;

use chrono::{
    DateTime, Datelike, Days, LocalResult, NaiveDate, NaiveDateTime, NaiveTime, TimeZone, Timelike,
    Utc, Weekday,
};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};

/// What time it is. The daemon uses [`SystemClock`]; tests use [`ManualClock`].
pub trait Clock: Send + Sync {
    fn now(&self) -> DateTime<Utc>;
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }
}

/// A clock that moves only when told.
pub struct ManualClock(Mutex<DateTime<Utc>>);

impl ManualClock {
    #[must_use]
    pub fn new(at: DateTime<Utc>) -> Self {
        Self(Mutex::new(at))
    }

    pub fn set(&self, at: DateTime<Utc>) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = at;
    }

    pub fn advance(&self, by: Duration) {
        let mut t = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        *t += chrono::Duration::from_std(by).unwrap_or(chrono::Duration::MAX);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// A schedule expression that could not be read: what is wrong, and an example.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} (for example: {example})")]
pub struct SpecError {
    pub what: String,
    pub example: &'static str,
}

fn spec_err(what: impl Into<String>, example: &'static str) -> SpecError {
    SpecError {
        what: what.into(),
        example,
    }
}

/// A parsed schedule expression.
#[derive(Clone)]
pub enum Spec {
    /// Every `interval`, on multiples of it since the Unix epoch.
    Every(Duration),
    /// A day of the month (1–31, clamped to the month's last day) at a time.
    Monthly { day: u32, time: NaiveTime },
    /// A cron pattern (daily, weekly, hourly and calendar events become one too).
    Cron(Box<croner::Cron>),
}

impl fmt::Debug for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Every(d) => write!(f, "Every({d:?})"),
            Self::Monthly { day, time } => write!(f, "Monthly({day}, {time})"),
            Self::Cron(c) => write!(f, "Cron({})", c.pattern),
        }
    }
}

const EXAMPLES: &str =
    "daily 02:00 | weekly sunday:03:00 | monthly 15 04:00 | every 6h | mon..fri 22:30 | 0 2 * * *";

fn parse_time(s: &str) -> Result<NaiveTime, SpecError> {
    let mut parts = s.split(':');
    let (h, m, sec) = (parts.next(), parts.next(), parts.next());
    let num = |p: Option<&str>, max: u32| -> Option<u32> {
        p.and_then(|v| v.parse::<u32>().ok()).filter(|v| *v <= max)
    };
    let time = match (num(h, 23), num(m, 59), sec) {
        (Some(h), Some(m), None) => NaiveTime::from_hms_opt(h, m, 0),
        (Some(h), Some(m), Some(_)) => num(sec, 59).and_then(|s| NaiveTime::from_hms_opt(h, m, s)),
        _ => None,
    };
    match (time, parts.next()) {
        (Some(t), None) => Ok(t),
        _ => Err(spec_err(
            format!("{s:?} is not a time of day (HH:MM)"),
            "daily 02:00",
        )),
    }
}

fn parse_weekday(s: &str) -> Result<Weekday, SpecError> {
    let w = s.to_ascii_lowercase();
    let all = [
        ("mon", Weekday::Mon),
        ("tue", Weekday::Tue),
        ("wed", Weekday::Wed),
        ("thu", Weekday::Thu),
        ("fri", Weekday::Fri),
        ("sat", Weekday::Sat),
        ("sun", Weekday::Sun),
    ];
    let full = [
        "monday",
        "tuesday",
        "wednesday",
        "thursday",
        "friday",
        "saturday",
        "sunday",
    ];
    for (i, (short, day)) in all.iter().enumerate() {
        if w == *short || w == full[i] {
            return Ok(*day);
        }
    }
    Err(spec_err(
        format!("{s:?} is not a day of the week"),
        "weekly sunday:03:00",
    ))
}

/// Parses a duration like `90s`, `15m`, `6h`, `1d`.
pub fn parse_duration(s: &str) -> Result<Duration, SpecError> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: u64 = n
        .parse()
        .map_err(|_| spec_err(format!("{s:?} is not a duration"), "every 15m"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => {
            return Err(spec_err(
                format!("{s:?}: a duration is a number and s, m, h or d"),
                "every 15m",
            ))
        }
    };
    Ok(Duration::from_secs(secs))
}

fn cron(pattern: &str, example: &'static str) -> Result<Spec, SpecError> {
    let c = croner::Cron::from_str(pattern).map_err(|e| {
        spec_err(
            format!("{pattern:?} is not a cron expression: {e}"),
            example,
        )
    })?;
    Ok(Spec::Cron(Box::new(c)))
}

/// A calendar event's hour or minute field (`*`, `5`, `8..17`, `0/15`, `1,3`) in cron's
/// syntax.
fn calendar_field(s: &str, max: u32) -> Result<String, SpecError> {
    let bad = || {
        spec_err(
            format!("{s:?} is not an hour or minute (N, A..B, N/STEP, *, lists with ,)"),
            "mon..fri 22:30",
        )
    };
    let mut out = Vec::new();
    for part in s.split(',') {
        let (base, step) = match part.split_once('/') {
            Some((b, st)) => (b, Some(st.parse::<u32>().map_err(|_| bad())?)),
            None => (part, None),
        };
        let base = if base == "*" {
            "*".to_owned()
        } else if let Some((a, b)) = base.split_once("..") {
            let (a, b) = (
                a.parse::<u32>().map_err(|_| bad())?,
                b.parse::<u32>().map_err(|_| bad())?,
            );
            if a > b || b > max {
                return Err(bad());
            }
            format!("{a}-{b}")
        } else {
            let v = base.parse::<u32>().map_err(|_| bad())?;
            if v > max {
                return Err(bad());
            }
            // `0/15` in a calendar event is "from 0, every 15": cron says 0-MAX/15.
            if step.is_some() {
                format!("{v}-{max}")
            } else {
                v.to_string()
            }
        };
        out.push(match step {
            Some(0) => return Err(bad()),
            Some(st) => format!("{base}/{st}"),
            None => base,
        });
    }
    Ok(out.join(","))
}

/// A calendar event's weekday field (`mon..fri`, `sat,sun`) in cron's syntax.
fn calendar_weekdays(s: &str) -> Result<String, SpecError> {
    let mut out = Vec::new();
    for part in s.split(',') {
        match part.split_once("..") {
            Some((a, b)) => {
                let (a, b) = (parse_weekday(a)?, parse_weekday(b)?);
                let (a, b) = (a.num_days_from_sunday(), b.num_days_from_sunday());
                if a <= b {
                    out.push(format!("{a}-{b}"));
                } else {
                    // fri..mon wraps through the weekend.
                    out.push(format!("{a}-6"));
                    out.push(format!("0-{b}"));
                }
            }
            None => out.push(parse_weekday(part)?.num_days_from_sunday().to_string()),
        }
    }
    Ok(out.join(","))
}

fn is_weekday_list(s: &str) -> bool {
    s.split(',')
        .flat_map(|p| p.split(".."))
        .all(|w| parse_weekday(w).is_ok())
}

/// A Proxmox-style calendar event: `[WEEKDAYS] [HOUR:]MINUTE[:SECOND]`.
fn calendar(words: &[&str]) -> Result<Spec, SpecError> {
    let example = "mon..fri 22:30";
    let (days, time) = match words {
        [d, t] => (Some(*d), *t),
        [one] if is_weekday_list(one) => (Some(*one), "00:00"),
        [t] => (None, *t),
        _ => return Err(spec_err("a calendar event is [WEEKDAYS] HH:MM", example)),
    };
    let fields: Vec<&str> = time.split(':').collect();
    let (h, m, sec) = match fields.as_slice() {
        [m] => ("*", *m, "0"),
        [h, m] => (*h, *m, "0"),
        [h, m, s] => (*h, *m, *s),
        _ => return Err(spec_err(format!("{time:?} is not HH:MM"), example)),
    };
    let dow = match days {
        Some(d) => calendar_weekdays(d)?,
        None => "*".to_owned(),
    };
    let pattern = format!(
        "{} {} {} * * {dow}",
        calendar_field(sec, 59)?,
        calendar_field(m, 59)?,
        calendar_field(h, 23)?
    );
    cron(&pattern, example)
}

impl Spec {
    /// Reads a schedule expression (see the module docs for the forms).
    pub fn parse(text: &str) -> Result<Self, SpecError> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let time_cron =
            |t: NaiveTime, rest: &str| format!("{} {} {} {rest}", t.second(), t.minute(), t.hour());
        match words.as_slice() {
            [] => Err(spec_err(
                format!("empty schedule; one of: {EXAMPLES}"),
                "daily 02:00",
            )),
            ["daily", t] => cron(&time_cron(parse_time(t)?, "* * *"), "daily 02:00"),
            ["daily"] => cron("0 0 0 * * *", "daily 02:00"),
            ["hourly"] => cron("0 0 * * * *", "hourly :15"),
            ["hourly", m] => {
                let minute = m
                    .strip_prefix(':')
                    .and_then(|v| v.parse::<u32>().ok())
                    .filter(|v| *v < 60)
                    .ok_or_else(|| spec_err(format!("{m:?} is not :MM"), "hourly :15"))?;
                cron(&format!("0 {minute} * * * *"), "hourly :15")
            }
            ["weekly", d] => {
                let (day, time) = match d.split_once(':') {
                    Some((day, time)) => (day, parse_time(time)?),
                    None => (*d, NaiveTime::MIN),
                };
                let dow = parse_weekday(day)?.num_days_from_sunday();
                cron(
                    &time_cron(time, &format!("* * {dow}")),
                    "weekly sunday:03:00",
                )
            }
            ["weekly", d, t] => {
                let dow = parse_weekday(d)?.num_days_from_sunday();
                cron(
                    &time_cron(parse_time(t)?, &format!("* * {dow}")),
                    "weekly sunday 03:00",
                )
            }
            ["monthly", d, t] => {
                let day = d
                    .parse::<u32>()
                    .ok()
                    .filter(|v| (1..=31).contains(v))
                    .ok_or_else(|| {
                        spec_err(
                            format!("{d:?} is not a day of the month (1-31)"),
                            "monthly 15 04:00",
                        )
                    })?;
                Ok(Self::Monthly {
                    day,
                    time: parse_time(t)?,
                })
            }
            ["monthly", ..] => Err(spec_err(
                "monthly takes a day and a time",
                "monthly 15 04:00",
            )),
            ["every", d] => {
                let d = parse_duration(d)?;
                if d.as_secs() == 0 {
                    return Err(spec_err("an interval of zero", "every 15m"));
                }
                Ok(Self::Every(d))
            }
            ["daily" | "weekly" | "hourly" | "every", ..] => Err(spec_err(
                format!("{text:?} is not a schedule; one of: {EXAMPLES}"),
                "daily 02:00",
            )),
            _ if words.len() == 5 || words.len() == 6 => cron(text, "0 2 * * *"),
            _ => calendar(&words).map_err(|e| {
                if words.len() <= 2 {
                    e
                } else {
                    spec_err(
                        format!("{text:?} is not a schedule; one of: {EXAMPLES}"),
                        "daily 02:00",
                    )
                }
            }),
        }
    }

    /// The first time after `after` this schedule names, in time zone `tz`.
    #[must_use]
    pub fn next_after(&self, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
        match self {
            Self::Every(d) => {
                let step = i64::try_from(d.as_secs()).ok()?;
                let t = after.timestamp();
                let next = (t.div_euclid(step) + 1).checked_mul(step)?;
                DateTime::from_timestamp(next, 0)
            }
            Self::Monthly { day, time } => monthly_next(*day, *time, after, tz),
            Self::Cron(c) => {
                let local = after.with_timezone(&tz);
                c.find_next_occurrence(&local, false)
                    .ok()
                    .map(|t| t.with_timezone(&Utc))
            }
        }
    }

    /// The last time at or before `at` this schedule named, searching back at most
    /// `horizon` (a year for calendar schedules): the slot a scheduler that was down
    /// would have missed.
    #[must_use]
    pub fn last_at_or_before(
        &self,
        at: DateTime<Utc>,
        tz: Tz,
        horizon: chrono::Duration,
    ) -> Option<DateTime<Utc>> {
        let mut from = at - horizon;
        let mut last = None;
        // Walk forward: schedules are at most minutely in practice, and the scheduler
        // asks only about the span since its last look.
        for _ in 0..1_000_000 {
            match self.next_after(from, tz) {
                Some(t) if t <= at => {
                    last = Some(t);
                    from = t;
                }
                _ => break,
            }
        }
        last
    }
}

/// `day` of each month (clamped to its last day) at `time` in `tz`, after `after`.
fn monthly_next(day: u32, time: NaiveTime, after: DateTime<Utc>, tz: Tz) -> Option<DateTime<Utc>> {
    let local = after.with_timezone(&tz).date_naive();
    let (mut y, mut m) = (local.year(), local.month());
    for _ in 0..24 {
        let last = last_day_of_month(y, m)?;
        let date = NaiveDate::from_ymd_opt(y, m, day.min(last))?;
        if let Some(t) = resolve_local(date.and_time(time), tz) {
            if t > after {
                return Some(t);
            }
        }
        (y, m) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    }
    None
}

fn last_day_of_month(y: i32, m: u32) -> Option<u32> {
    let first_next = if m == 12 {
        NaiveDate::from_ymd_opt(y + 1, 1, 1)?
    } else {
        NaiveDate::from_ymd_opt(y, m + 1, 1)?
    };
    first_next.checked_sub_days(Days::new(1)).map(|d| d.day())
}

/// A wall-clock time in `tz` as an instant: the first of two when it happens twice, the
/// first instant after the gap when it does not exist.
fn resolve_local(t: NaiveDateTime, tz: Tz) -> Option<DateTime<Utc>> {
    match tz.from_local_datetime(&t) {
        LocalResult::Single(x) => Some(x.with_timezone(&Utc)),
        LocalResult::Ambiguous(a, b) => Some(a.min(b).with_timezone(&Utc)),
        LocalResult::None => {
            // Inside a gap: the first minute that exists after it.
            let mut probe = t;
            for _ in 0..(24 * 60) {
                probe += chrono::Duration::minutes(1);
                if let LocalResult::Single(x) | LocalResult::Ambiguous(x, _) =
                    tz.from_local_datetime(&probe)
                {
                    return Some(x.with_timezone(&Utc));
                }
            }
            None
        }
    }
}

/// What to do with runs missed while the daemon was down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MissedPolicy {
    /// Run once at start (however many runs were missed), and say so.
    #[default]
    RunOnce,
    /// Do not run; only say so.
    Skip,
}

impl std::fmt::Display for MissedPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::RunOnce => "run-once",
            Self::Skip => "skip",
        })
    }
}

impl FromStr for MissedPolicy {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, SpecError> {
        match s {
            "run-once" => Ok(Self::RunOnce),
            "skip" => Ok(Self::Skip),
            _ => Err(spec_err(
                format!("missed: {s:?} is neither run-once nor skip"),
                "missed = \"run-once\"",
            )),
        }
    }
}

/// A schedule of a job: the expression, its time zone, jitter and missed-run policy.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub spec: Spec,
    pub text: String,
    pub tz: Tz,
    /// A delay up to this long after each slot, the same for a slot whatever happens.
    pub jitter: Duration,
    pub missed: MissedPolicy,
}

impl Schedule {
    /// `tz`: an IANA name (`Europe/Paris`), UTC when absent.
    pub fn new(
        text: &str,
        tz: Option<&str>,
        jitter: Duration,
        missed: MissedPolicy,
    ) -> Result<Self, SpecError> {
        let spec = Spec::parse(text)?;
        let tz = match tz {
            None | Some("") => Tz::UTC,
            Some(name) => name.parse::<Tz>().map_err(|_| {
                spec_err(
                    format!("time zone {name:?} is unknown"),
                    "timezone = \"Europe/Paris\"",
                )
            })?,
        };
        Ok(Self {
            spec,
            text: text.to_owned(),
            tz,
            jitter,
            missed,
        })
    }

    /// The next slot after `after` (before jitter).
    #[must_use]
    pub fn next_slot(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.spec.next_after(after, self.tz)
    }

    /// When the run of `slot` starts: the slot plus its jitter. The jitter is derived
    /// from `seed` (the schedule's id) and the slot, so a restart does not move it.
    #[must_use]
    pub fn start_of(&self, slot: DateTime<Utc>, seed: &str) -> DateTime<Utc> {
        let jitter_ms = u64::try_from(self.jitter.as_millis()).unwrap_or(u64::MAX);
        if jitter_ms == 0 {
            return slot;
        }
        let h = blake3::hash(format!("{seed}/{}", slot.timestamp()).as_bytes());
        let mut b = [0u8; 8];
        b.copy_from_slice(&h.as_bytes()[..8]);
        let offset = u64::from_le_bytes(b) % jitter_ms;
        slot + chrono::Duration::milliseconds(i64::try_from(offset).unwrap_or(0))
    }

    /// The next `count` run starts after `after` (jitter included).
    #[must_use]
    pub fn preview(&self, after: DateTime<Utc>, count: usize, seed: &str) -> Vec<DateTime<Utc>> {
        let mut out = Vec::with_capacity(count);
        let mut t = after;
        while out.len() < count {
            match self.next_slot(t) {
                Some(s) => {
                    out.push(self.start_of(s, seed));
                    t = s;
                }
                None => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next(text: &str, tz: Tz, after: &str) -> DateTime<Utc> {
        Spec::parse(text)
            .unwrap()
            .next_after(utc(after), tz)
            .unwrap()
    }

    fn nexts(text: &str, tz: Tz, after: &str, n: usize) -> Vec<DateTime<Utc>> {
        let s = Schedule {
            spec: Spec::parse(text).unwrap(),
            text: text.into(),
            tz,
            jitter: Duration::ZERO,
            missed: MissedPolicy::RunOnce,
        };
        s.preview(utc(after), n, "x")
    }

    #[test]
    fn the_users_forms_mean_what_they_say() {
        let tz = Tz::UTC;
        assert_eq!(
            next("daily 02:00", tz, "2026-12-01T10:00:00Z"),
            utc("2026-12-02T02:00:00Z")
        );
        assert_eq!(
            next("daily 02:00", tz, "2026-12-01T01:59:59Z"),
            utc("2026-12-01T02:00:00Z")
        );
        // 2026-12-01 is a Tuesday.
        assert_eq!(
            next("weekly sunday:03:00", tz, "2026-12-01T00:00:00Z"),
            utc("2026-12-06T03:00:00Z")
        );
        assert_eq!(
            next("weekly sun 03:00", tz, "2026-12-01T00:00:00Z"),
            utc("2026-12-06T03:00:00Z")
        );
        assert_eq!(
            next("monthly 15 04:00", tz, "2026-12-15T04:00:00Z"),
            utc("2027-01-15T04:00:00Z")
        );
        assert_eq!(
            next("hourly :15", tz, "2026-12-01T10:20:00Z"),
            utc("2026-12-01T11:15:00Z")
        );
        assert_eq!(
            next("every 15m", tz, "2026-12-01T10:20:00Z"),
            utc("2026-12-01T10:30:00Z")
        );
        assert_eq!(
            next("0 2 * * *", tz, "2026-12-01T10:00:00Z"),
            utc("2026-12-02T02:00:00Z")
        );
        assert_eq!(
            next("30 0 2 * * *", tz, "2026-12-01T10:00:00Z"),
            utc("2026-12-02T02:00:30Z")
        );
    }

    #[test]
    fn calendar_events_read_like_proxmox() {
        let tz = Tz::UTC;
        // Friday 2026-12-04 22:30, then Monday 2026-12-07 22:30.
        assert_eq!(
            nexts("mon..fri 22:30", tz, "2026-12-04T12:00:00Z", 2),
            vec![utc("2026-12-04T22:30:00Z"), utc("2026-12-07T22:30:00Z")]
        );
        assert_eq!(
            nexts("*:0/15", tz, "2026-12-01T10:01:00Z", 3),
            vec![
                utc("2026-12-01T10:15:00Z"),
                utc("2026-12-01T10:30:00Z"),
                utc("2026-12-01T10:45:00Z")
            ]
        );
        assert_eq!(
            nexts("sat,sun 8..20/6:00", tz, "2026-12-05T09:00:00Z", 3),
            vec![
                utc("2026-12-05T14:00:00Z"),
                utc("2026-12-05T20:00:00Z"),
                utc("2026-12-06T08:00:00Z")
            ]
        );
        // fri..mon wraps through the weekend.
        assert_eq!(
            next("fri..mon 01:00", tz, "2026-12-01T02:00:00Z"),
            utc("2026-12-04T01:00:00Z")
        );
    }

    #[test]
    fn month_ends_clamp_to_the_last_day() {
        let tz = Tz::UTC;
        assert_eq!(
            nexts("monthly 31 04:00", tz, "2027-01-31T05:00:00Z", 3),
            vec![
                utc("2027-02-28T04:00:00Z"),
                utc("2027-03-31T04:00:00Z"),
                utc("2027-04-30T04:00:00Z")
            ]
        );
        // 2028 is a leap year.
        assert_eq!(
            next("monthly 30 00:00", tz, "2028-02-01T00:00:00Z"),
            utc("2028-02-29T00:00:00Z")
        );
    }

    #[test]
    fn daylight_saving_changes_neither_skip_nor_double_a_run() {
        let paris = Tz::Europe__Paris;
        // 2027-03-28: clocks go from 02:00 to 03:00 in Paris. 02:30 does not exist:
        // the run is at 03:00 local (01:00 UTC), then 02:30 local again the next day.
        for text in ["daily 02:30", "30 2 * * *"] {
            let runs = nexts(text, paris, "2027-03-27T12:00:00Z", 2);
            assert_eq!(runs.len(), 2, "{text}");
            assert_eq!(
                runs[0].date_naive(),
                NaiveDate::from_ymd_opt(2027, 3, 28).unwrap(),
                "{text}: {runs:?}"
            );
            assert!(
                runs[0] >= utc("2027-03-28T01:00:00Z") && runs[0] <= utc("2027-03-28T01:30:00Z"),
                "{text}: {runs:?}"
            );
            assert_eq!(runs[1], utc("2027-03-29T00:30:00Z"), "{text}");
        }
        // 2027-10-31: clocks go from 03:00 back to 02:00. 02:30 happens twice: one run.
        for text in ["daily 02:30", "30 2 * * *"] {
            let runs = nexts(text, paris, "2027-10-30T12:00:00Z", 2);
            assert_eq!(runs[0], utc("2027-10-31T00:30:00Z"), "{text}: {runs:?}");
            assert_eq!(runs[1], utc("2027-11-01T01:30:00Z"), "{text}: {runs:?}");
        }
        // Monthly, on the change day.
        let runs = nexts("monthly 28 02:30", paris, "2027-03-01T00:00:00Z", 1);
        assert_eq!(runs[0], utc("2027-03-28T01:00:00Z"));
    }

    #[test]
    fn a_year_of_daily_runs_across_both_changes_is_365_runs_one_per_day() {
        let runs = nexts(
            "daily 02:30",
            Tz::Europe__Paris,
            "2027-01-01T00:00:00Z",
            365,
        );
        let mut days: Vec<_> = runs
            .iter()
            .map(|t| t.with_timezone(&Tz::Europe__Paris).date_naive())
            .collect();
        days.dedup();
        assert_eq!(days.len(), 365);
        assert_eq!(days[0], NaiveDate::from_ymd_opt(2027, 1, 1).unwrap());
        assert_eq!(days[364], NaiveDate::from_ymd_opt(2027, 12, 31).unwrap());
    }

    #[test]
    fn jitter_stays_within_its_bound_and_does_not_move_on_restart() {
        let s = Schedule::new(
            "every 1h",
            None,
            Duration::from_secs(600),
            MissedPolicy::RunOnce,
        )
        .unwrap();
        let mut seen = std::collections::HashSet::new();
        let mut slot = utc("2026-12-01T00:00:00Z");
        for _ in 0..500 {
            slot = s.next_slot(slot).unwrap();
            let start = s.start_of(slot, "job-a");
            assert!(start >= slot && start < slot + chrono::Duration::seconds(600));
            assert_eq!(start, s.start_of(slot, "job-a"));
            seen.insert((start - slot).num_seconds() / 60);
        }
        // Spread over the window, not stuck at one point.
        assert!(seen.len() >= 8, "{seen:?}");
    }

    #[test]
    fn the_slot_missed_while_down_is_found() {
        let s = Spec::parse("daily 02:00").unwrap();
        let last = s.last_at_or_before(
            utc("2026-12-05T10:00:00Z"),
            Tz::UTC,
            chrono::Duration::days(2),
        );
        assert_eq!(last, Some(utc("2026-12-05T02:00:00Z")));
        let none = s.last_at_or_before(
            utc("2026-12-05T01:00:00Z"),
            Tz::UTC,
            chrono::Duration::hours(20),
        );
        assert_eq!(none, None);
    }

    #[test]
    fn bad_schedules_say_what_is_wrong_with_an_example() {
        for (text, needle) in [
            ("daily 25:00", "not a time of day"),
            ("weekly funday:03:00", "not a day of the week"),
            ("monthly 32 04:00", "not a day of the month"),
            ("every 0m", "zero"),
            ("every 5 minutes", "not a schedule"),
            ("61 * * * *", "not a cron expression"),
            ("", "empty"),
            ("mon..fri 22:75", "not an hour or minute"),
            ("tomorrow at noon please", "not a schedule"),
        ] {
            let e = Spec::parse(text).unwrap_err();
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
            assert!(e.to_string().contains("for example"), "{text:?}: {e}");
        }
        assert!(Schedule::new(
            "daily 02:00",
            Some("Mars/Olympus"),
            Duration::ZERO,
            MissedPolicy::Skip
        )
        .is_err());
    }
}
