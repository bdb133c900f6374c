//! Whether a source is backed up as its schedule promises: green, amber or red, and why.
//!
//! The age of the newest committed backup is judged against the source's `max_age` (by default
//! two periods of its schedule, at least an hour): within half of it is green, past it is red
//! (stale), and in between, or when the latest backup or verification failed, amber. The dashboard,
//! `GET /v1/sources`, the metrics and the `stale` alert all read this one judgement.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::job::{Phase, Task};
use crate::ledger::JobSummary;
use crate::schedule::Schedule;
use crate::time::Timestamp;

/// The shortest default `max_age`.
const MIN_MAX_AGE: Duration = Duration::from_secs(3600);

/// A source's state at a glance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Light {
    /// Backed up as scheduled.
    Green,
    /// Needs a look: the latest backup or verification failed, no backup yet, or the newest is
    /// getting old.
    Amber,
    /// Stale: no committed backup within `max_age`.
    Red,
}

/// The judgement with its reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    /// Green, amber or red.
    pub light: Light,
    /// Why, in a sentence.
    pub reason: String,
    /// The age past which the source is stale.
    pub max_age_seconds: u64,
    /// When the newest committed backup finished.
    pub last_backup_at: Option<Timestamp>,
}

impl Health {
    /// True when no committed backup is within `max_age` (the `stale` alert).
    pub fn is_stale(&self) -> bool {
        self.light == Light::Red
    }
}

/// Two periods of `schedule` around `now` (the gap between two consecutive fire times), at
/// least an hour.
pub fn default_max_age(schedule: &Schedule, now: Timestamp) -> Duration {
    let first = schedule.latest_at_or_before(now).or_else(|| schedule.next_after(now));
    let period = first.and_then(|a| schedule.next_after(a).map(|b| b.since(a))).unwrap_or(MIN_MAX_AGE);
    (period * 2).max(MIN_MAX_AGE)
}

/// Judges a source from its finished jobs (oldest first). `watched_since` is when Ferry first
/// knew the source (its first tick or job): a source younger than `max_age` without a backup is
/// amber, not red.
pub fn assess(
    schedule: &Schedule,
    max_age: Option<Duration>,
    history: &[JobSummary],
    watched_since: Option<Timestamp>,
    now: Timestamp,
) -> Health {
    let max_age = max_age.unwrap_or_else(|| default_max_age(schedule, now));
    let exports = || history.iter().rev().filter(|h| h.task == Task::Export);
    let last_backup = exports().find(|h| h.phase == Phase::Committed).map(|h| h.finished_at);
    let last_export = exports().find(|h| matches!(h.phase, Phase::Committed | Phase::Failed));
    let last_verify = history.iter().rev().find(|h| h.task == Task::Verify);
    let judge = |light, reason: String| Health {
        light,
        reason,
        max_age_seconds: max_age.as_secs(),
        last_backup_at: last_backup,
    };
    let Some(at) = last_backup else {
        let young = watched_since.is_none_or(|since| now.since(since) <= max_age);
        let failed = last_export.and_then(|h| h.error.as_deref());
        return match (young, failed) {
            (true, None) => judge(Light::Amber, "no backup yet".into()),
            (true, Some(e)) => judge(Light::Amber, format!("no backup yet; the last attempt failed: {e}")),
            (false, _) => judge(
                Light::Red,
                format!("no committed backup since Ferry began watching it, over {} ago", human(max_age)),
            ),
        };
    };
    let age = now.since(at);
    if age > max_age {
        return judge(
            Light::Red,
            format!("the newest committed backup is {} old, more than max_age ({})", human(age), human(max_age)),
        );
    }
    if let Some(failed) = last_export.filter(|h| h.phase == Phase::Failed) {
        let error = failed.error.as_deref().unwrap_or("no message");
        return judge(Light::Amber, format!("the last backup failed: {error}"));
    }
    if let Some(verify) = last_verify.filter(|h| h.phase == Phase::Failed) {
        let error = verify.error.as_deref().unwrap_or("no message");
        return judge(Light::Amber, format!("the last verification failed: {error}"));
    }
    if age > max_age / 2 {
        return judge(Light::Amber, format!("the newest committed backup is {} old", human(age)));
    }
    judge(Light::Green, format!("the newest committed backup is {} old", human(age)))
}

/// A duration in the largest whole unit that fits: `3 d 4 h`, `5 h 10 min`, `42 s`.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0..=59 => format!("{s} s"),
        60..=3599 => format!("{} min", s / 60),
        3600..=86_399 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        _ => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{JobId, Trigger};

    fn at(s: &str) -> Timestamp {
        Timestamp::parse_rfc3339(s).unwrap()
    }

    fn job(task: Task, phase: Phase, finished: &str, error: Option<&str>) -> JobSummary {
        JobSummary {
            id: JobId::new(format!("{:016x}", finished.len() * 7 + phase as usize)),
            task,
            trigger: Trigger::Cron,
            phase,
            started_at: at(finished),
            finished_at: at(finished),
            bytes: 10,
            error: error.map(str::to_string),
            folder: None,
        }
    }

    fn daily() -> Schedule {
        Schedule::parse("0 3 * * *").unwrap()
    }

    #[test]
    fn the_default_max_age_is_two_periods_of_the_schedule_and_at_least_an_hour() {
        let now = at("2026-11-28T10:00:00Z");
        assert_eq!(default_max_age(&daily(), now), Duration::from_secs(2 * 86_400));
        assert_eq!(default_max_age(&Schedule::parse("*/5 * * * *").unwrap(), now), MIN_MAX_AGE);
        assert_eq!(
            default_max_age(&Schedule::parse("0 0 1 * *").unwrap(), now),
            Duration::from_secs(2 * 30 * 86_400),
            "November"
        );
    }

    #[test]
    fn the_light_follows_the_age_of_the_newest_committed_backup() {
        let history = [job(Task::Export, Phase::Committed, "2026-11-28T03:05:00Z", None)];
        let h = |now| assess(&daily(), None, &history, None, at(now));
        assert_eq!(h("2026-11-28T10:00:00Z").light, Light::Green);
        assert_eq!(h("2026-11-29T10:00:00Z").light, Light::Amber, "older than one period");
        let stale = h("2026-11-30T04:00:00Z");
        assert_eq!(stale.light, Light::Red);
        assert!(stale.is_stale() && stale.reason.contains("more than max_age (2 d 0 h)"), "{}", stale.reason);
        let custom = assess(&daily(), Some(Duration::from_secs(3600)), &history, None, at("2026-11-28T10:00:00Z"));
        assert_eq!(custom.light, Light::Red, "max_age from the config wins");
    }

    #[test]
    fn a_failed_backup_or_verification_is_amber_with_the_providers_words() {
        let mut history = vec![
            job(Task::Export, Phase::Committed, "2026-11-28T03:05:00Z", None),
            job(Task::Export, Phase::Failed, "2026-11-28T04:05:00Z", Some("D1 API error (HTTP 400): no such database")),
        ];
        let now = at("2026-11-28T05:00:00Z");
        let h = assess(&daily(), None, &history, None, now);
        assert_eq!(h.light, Light::Amber);
        assert!(h.reason.contains("no such database"), "{}", h.reason);
        history.push(job(Task::Export, Phase::Committed, "2026-11-28T04:30:00Z", None));
        assert_eq!(assess(&daily(), None, &history, None, now).light, Light::Green, "cleared by the next success");
        history.push(job(Task::Verify, Phase::Failed, "2026-11-28T04:40:00Z", Some("db.sql: sha256 differs")));
        let h = assess(&daily(), None, &history, None, now);
        assert_eq!(h.light, Light::Amber);
        assert!(h.reason.contains("verification failed: db.sql"), "{}", h.reason);
        // Skipped jobs (nothing new at the provider) change nothing.
        history.push(job(Task::Export, Phase::Skipped, "2026-11-28T04:50:00Z", None));
        assert_eq!(assess(&daily(), None, &history, None, now).light, Light::Amber);
    }

    #[test]
    fn a_source_without_any_backup_is_amber_while_young_and_red_once_older_than_max_age() {
        let now = at("2026-11-28T10:00:00Z");
        assert_eq!(assess(&daily(), None, &[], None, now).light, Light::Amber);
        assert_eq!(assess(&daily(), None, &[], Some(at("2026-11-28T01:00:00Z")), now).light, Light::Amber);
        let old = assess(&daily(), None, &[], Some(at("2026-11-20T01:00:00Z")), now);
        assert_eq!(old.light, Light::Red);
        assert_eq!(old.last_backup_at, None);
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human(Duration::from_secs(42)), "42 s");
        assert_eq!(human(Duration::from_secs(600)), "10 min");
        assert_eq!(human(Duration::from_secs(3 * 3600 + 120)), "3 h 2 min");
        assert_eq!(human(Duration::from_secs(2 * 86_400 + 3600)), "2 d 1 h");
    }
}
