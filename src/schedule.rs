//! Cron schedules and which sources are due when the Worker's trigger fires.
//!
//! Cloudflare fires the Worker's own cron trigger (for example every five minutes); each source
//! has its own standard 5-field schedule, evaluated in UTC by `croner`. A source is due in a run
//! when one of its fire times falls in the window `(previous trigger fire, this trigger fire]`, so
//! any number of sources with any schedules are served by one trigger and none runs twice.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use croner::parser::{CronParser, Seconds, Year};
use croner::Cron;

use crate::time::Timestamp;

/// A parsed 5-field cron expression (minute hour day-of-month month day-of-week), UTC. It is
/// read and written as the expression's text.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Schedule {
    expr: String,
    cron: Cron,
}

/// Why a cron expression was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a valid 5-field cron expression ({0})")]
pub struct ScheduleError(String);

impl Schedule {
    /// Parses a standard 5-field expression; seconds and years are refused.
    pub fn parse(expr: &str) -> Result<Self, ScheduleError> {
        let parser = CronParser::builder().seconds(Seconds::Disallowed).year(Year::Disallowed).build();
        let fields = expr.split_whitespace().count();
        if fields != 5 {
            return Err(ScheduleError(format!("expected 5 fields, found {fields}")));
        }
        let cron = parser.parse(expr.trim()).map_err(|e| ScheduleError(e.to_string()))?;
        Ok(Self { expr: expr.trim().to_string(), cron })
    }

    /// The expression as written.
    pub fn as_str(&self) -> &str {
        &self.expr
    }

    /// The first fire time strictly after `t`.
    pub fn next_after(&self, t: Timestamp) -> Option<Timestamp> {
        self.cron.find_next_occurrence(&t.to_datetime(), false).ok().map(Timestamp::from_datetime)
    }

    /// The latest fire time at or before `t`.
    pub fn latest_at_or_before(&self, t: Timestamp) -> Option<Timestamp> {
        // Fire times are whole minutes; search from the whole second so sub-second noise in `t`
        // cannot move the answer.
        let dt: DateTime<Utc> = Timestamp::from_secs(t.secs()).to_datetime();
        self.cron.find_previous_occurrence(&dt, true).ok().map(Timestamp::from_datetime)
    }

    /// The fire times in `(after, until]`: the earliest, the latest and how many (counted up to
    /// `cap`), or `None` when there is none.
    pub fn fires_between(&self, after: Timestamp, until: Timestamp, cap: u32) -> Option<Fires> {
        let latest = self.fires_in(after, until)?;
        let earliest = self.next_after(after).filter(|t| *t <= latest).unwrap_or(latest);
        let mut count = 1;
        let mut t = earliest;
        while count < cap {
            match self.next_after(t) {
                Some(next) if next <= latest => {
                    count += 1;
                    t = next;
                }
                _ => break,
            }
        }
        Some(Fires { earliest, latest, count })
    }

    /// The latest fire time in the half-open window `(after, until]`, if any.
    pub fn fires_in(&self, after: Timestamp, until: Timestamp) -> Option<Timestamp> {
        self.latest_at_or_before(until).filter(|fire| *fire > after)
    }
}

impl fmt::Debug for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Schedule({:?})", self.expr)
    }
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        self.expr == other.expr
    }
}

impl TryFrom<String> for Schedule {
    type Error = ScheduleError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<Schedule> for String {
    fn from(s: Schedule) -> Self {
        s.expr
    }
}

impl FromStr for Schedule {
    type Err = ScheduleError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

/// Fire times found in a window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Fires {
    /// The first.
    pub earliest: Timestamp,
    /// The last.
    pub latest: Timestamp,
    /// How many (at most the cap asked for).
    pub count: u32,
}

/// The window a trigger run covers: `(start, end]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// Exclusive start: the trigger's previous fire time.
    pub start: Timestamp,
    /// Inclusive end: the time this run was scheduled for.
    pub end: Timestamp,
}

impl Window {
    /// The window for a run of the Worker trigger `trigger` scheduled at `scheduled`.
    ///
    /// The start is the trigger's latest fire time strictly before `scheduled` (a run started by
    /// hand between two ticks covers the time since the last tick). When the trigger expression
    /// cannot be parsed the window falls back to the preceding minute.
    pub fn for_trigger(trigger: &str, scheduled: Timestamp) -> Self {
        let start = Schedule::parse(trigger)
            .ok()
            .and_then(|s| {
                let just_before = Timestamp::from_millis(scheduled.millis() - 1);
                s.latest_at_or_before(just_before)
            })
            .unwrap_or_else(|| Timestamp::from_millis(scheduled.millis() - 60_000));
        Self { start, end: scheduled }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        Timestamp::parse_rfc3339(s).unwrap()
    }

    #[test]
    fn parses_standard_five_field_expressions() {
        for e in ["* * * * *", "*/5 * * * *", "0 3 * * *", "15 2 1 * MON", "0 0 1 1 *", "0 12 * * 1-5"] {
            assert!(Schedule::parse(e).is_ok(), "{e}");
        }
    }

    #[test]
    fn refuses_seconds_years_and_garbage() {
        for e in ["", "* * * *", "0 * * * * *", "0 0 0 1 1 * 2026", "61 * * * *", "every day", "* * 32 * *"] {
            assert!(Schedule::parse(e).is_err(), "{e:?} should be refused");
        }
    }

    #[test]
    fn next_after_is_strictly_later() {
        let s = Schedule::parse("0 3 * * *").unwrap();
        assert_eq!(s.next_after(at("2026-11-23T03:00:00Z")), Some(at("2026-11-24T03:00:00Z")));
        assert_eq!(s.next_after(at("2026-11-23T02:59:59Z")), Some(at("2026-11-23T03:00:00Z")));
    }

    #[test]
    fn window_of_an_exact_tick_is_the_previous_tick_to_this_one() {
        let w = Window::for_trigger("*/5 * * * *", at("2026-11-23T10:05:00Z"));
        assert_eq!(w.start, at("2026-11-23T10:00:00Z"));
        assert_eq!(w.end, at("2026-11-23T10:05:00Z"));
    }

    #[test]
    fn window_of_a_manual_run_starts_at_the_last_tick() {
        let w = Window::for_trigger("*/5 * * * *", at("2026-11-23T10:07:23.456Z"));
        assert_eq!(w.start, at("2026-11-23T10:05:00Z"));
    }

    #[test]
    fn unparsable_trigger_falls_back_to_one_minute() {
        let w = Window::for_trigger("nonsense", at("2026-11-23T10:07:00Z"));
        assert_eq!(w.start, at("2026-11-23T10:06:00Z"));
    }

    #[test]
    fn source_is_due_only_when_it_fires_inside_the_window() {
        let w = Window::for_trigger("*/5 * * * *", at("2026-11-23T03:00:00Z"));
        let daily = Schedule::parse("0 3 * * *").unwrap();
        let hourly_at_half = Schedule::parse("30 * * * *").unwrap();
        let every_minute = Schedule::parse("* * * * *").unwrap();
        let every_two = Schedule::parse("*/2 * * * *").unwrap();
        assert_eq!(daily.fires_in(w.start, w.end), Some(at("2026-11-23T03:00:00Z")));
        assert_eq!(hourly_at_half.fires_in(w.start, w.end), None);
        assert_eq!(every_minute.fires_in(w.start, w.end), Some(at("2026-11-23T03:00:00Z")));
        // Fires at 02:56 and 02:58 as well; the latest fire time in the window is reported.
        assert_eq!(every_two.fires_in(w.start, w.end), Some(at("2026-11-23T03:00:00Z")));
        // The window's start is exclusive: 02:55 belonged to the previous run.
        let five = Schedule::parse("55 2 * * *").unwrap();
        assert_eq!(five.fires_in(w.start, w.end), None);
    }

    #[test]
    fn a_schedule_between_ticks_is_caught_by_the_next_tick() {
        // Trigger every 5 minutes, source at 02:57: due in the 03:00 run, not in the 02:55 one.
        let s = Schedule::parse("57 2 * * *").unwrap();
        let run_0255 = Window::for_trigger("*/5 * * * *", at("2026-11-23T02:55:00Z"));
        let run_0300 = Window::for_trigger("*/5 * * * *", at("2026-11-23T03:00:00Z"));
        assert_eq!(s.fires_in(run_0255.start, run_0255.end), None);
        assert_eq!(s.fires_in(run_0300.start, run_0300.end), Some(at("2026-11-23T02:57:00Z")));
    }

    #[test]
    fn sub_second_noise_does_not_change_due_ness() {
        let s = Schedule::parse("0 3 * * *").unwrap();
        assert_eq!(s.latest_at_or_before(at("2026-11-23T03:00:00.999Z")), Some(at("2026-11-23T03:00:00Z")));
    }

    #[test]
    fn day_of_month_and_day_of_week_are_ored_like_vixie_cron() {
        // 2026-11-23 is a Monday; the 1st of the month is not.
        let s = Schedule::parse("0 0 1 * MON").unwrap();
        assert_eq!(s.latest_at_or_before(at("2026-11-23T00:00:00Z")), Some(at("2026-11-23T00:00:00Z")));
    }
}
