//! Whether a source is backed up as its schedule promises: green, amber or red, and why.
//!
//! The age of the newest committed backup is judged against the source's `max_age` (by default
//! two periods of its schedule, at least an hour): within half of it is green, past it is red
//! (stale), and in between, or when the latest backup or verification failed, amber. The dashboard,
//! `GET /v1/sources`, the metrics and the `stale` alert all read this one judgement.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::history::{JobSummary, MemberJobs};
use crate::identity::Task;
use crate::job::Phase;
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

/// What a source's health is judged against.
#[derive(Debug, Clone, Copy)]
pub struct Watch<'a> {
    /// The source's schedule.
    pub schedule: &'a Schedule,
    /// Its `max_age`, if set.
    pub max_age: Option<Duration>,
    /// What a member is called in the reason (`backend`, `database`).
    pub member_noun: &'a str,
}

/// Judges a source as a whole and, in account mode (a Dgraph account's backends), each member
/// on its own: a member's judgement reads its own latest exports (`members`) with the source's
/// jobs that belong to no member (the discovery jobs, verifications). The source's judgement is
/// then its worst member's, naming that member: one backend's commit cannot turn the source
/// green while another's backups are missing or old. Without members it is [`assess`] of the
/// history.
pub fn assess_source(
    watch: &Watch<'_>,
    history: &[JobSummary],
    members: &BTreeMap<String, MemberJobs>,
    watched_since: Option<Timestamp>,
    now: Timestamp,
) -> (Health, BTreeMap<String, Health>) {
    let Watch { schedule, max_age, member_noun } = *watch;
    if members.is_empty() {
        return (assess(schedule, max_age, history, watched_since, now), BTreeMap::new());
    }
    let shared: Vec<&JobSummary> = history.iter().filter(|h| h.member.is_none()).collect();
    let judged: BTreeMap<String, Health> = members
        .iter()
        .map(|(member, latest)| {
            let mut own: Vec<JobSummary> = shared.iter().map(|h| (*h).clone()).collect();
            for job in [&latest.last_committed, &latest.last_finished].into_iter().flatten() {
                if !own.iter().any(|h| h.id == job.id) {
                    own.push(job.clone());
                }
            }
            own.sort_by_key(|h| h.finished_at);
            // A member is watched from its own first job (older ledgers: the source's start).
            let since = latest.first_seen.or(watched_since);
            (member.clone(), assess(schedule, max_age, &own, since, now))
        })
        .collect();
    let worst = judged
        .iter()
        .max_by_key(|(_, h)| (severity(h.light), std::cmp::Reverse(h.last_backup_at)))
        .map(|(member, h)| Health { reason: format!("{member_noun} {member}: {}", h.reason), ..h.clone() });
    let source = worst.unwrap_or_else(|| assess(schedule, max_age, history, watched_since, now));
    (source, judged)
}

fn severity(light: Light) -> u8 {
    match light {
        Light::Green => 0,
        Light::Amber => 1,
        Light::Red => 2,
    }
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
    use crate::identity::{JobId, Trigger};

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
            member: None,
            warnings: Vec::new(),
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

    /// Judges a Dgraph account's backends, daily, without `max_age`.
    fn assess_backends(
        history: &[JobSummary],
        latest: &BTreeMap<String, MemberJobs>,
        now: Timestamp,
    ) -> (Health, BTreeMap<String, Health>) {
        assess_source(&Watch { schedule: &daily(), max_age: None, member_noun: "backend" }, history, latest, None, now)
    }

    fn member_job(member: &str, phase: Phase, finished: &str, error: Option<&str>) -> JobSummary {
        JobSummary {
            id: JobId::new(format!("{:016x}", finished.len() * 13 + member.len() * 7 + phase as usize)),
            member: Some(member.into()),
            ..job(Task::Export, phase, finished, error)
        }
    }

    fn members(latest: &[(&str, Option<JobSummary>, Option<JobSummary>)]) -> BTreeMap<String, MemberJobs> {
        latest
            .iter()
            .map(|(m, committed, finished)| {
                let jobs =
                    MemberJobs { last_committed: committed.clone(), last_finished: finished.clone(), first_seen: None };
                (m.to_string(), jobs)
            })
            .collect()
    }

    #[test]
    fn in_account_mode_one_backends_commit_does_not_turn_the_source_green() {
        let now = at("2026-11-28T05:00:00Z");
        let fresh = member_job("alpha", Phase::Committed, "2026-11-28T03:05:00Z", None);
        let old = member_job("beta", Phase::Committed, "2026-11-25T03:05:00Z", None);
        let history = [old.clone(), fresh.clone()];
        let latest = members(&[("alpha", Some(fresh.clone()), Some(fresh)), ("beta", Some(old.clone()), Some(old))]);
        let (source, each) = assess_backends(&history, &latest, now);
        assert_eq!(each["alpha"].light, Light::Green);
        assert_eq!(each["beta"].light, Light::Red);
        assert_eq!(source.light, Light::Red, "the worst member's");
        assert!(source.is_stale() && source.reason.starts_with("backend beta: "), "{}", source.reason);
        assert_eq!(source.last_backup_at, Some(at("2026-11-25T03:05:00Z")));
    }

    #[test]
    fn in_account_mode_a_backends_failed_export_makes_the_source_amber_naming_it() {
        let now = at("2026-11-28T05:00:00Z");
        let alpha = member_job("alpha", Phase::Committed, "2026-11-28T03:05:00Z", None);
        let beta_ok = member_job("beta", Phase::Committed, "2026-11-28T03:06:00Z", None);
        let beta_failed = member_job("beta", Phase::Failed, "2026-11-28T04:06:00Z", Some("Dgraph export failed: x"));
        // The history is short and holds only alpha's latest job: beta is judged by its own record.
        let history = [alpha.clone()];
        let latest =
            members(&[("alpha", Some(alpha.clone()), Some(alpha)), ("beta", Some(beta_ok), Some(beta_failed))]);
        let (source, each) = assess_backends(&history, &latest, now);
        assert_eq!(each["alpha"].light, Light::Green);
        assert_eq!(each["beta"].light, Light::Amber);
        assert_eq!(source.reason, "backend beta: the last backup failed: Dgraph export failed: x");
    }

    #[test]
    fn in_account_mode_a_failed_discovery_counts_against_every_backend() {
        let now = at("2026-11-28T05:00:00Z");
        let alpha = member_job("alpha", Phase::Committed, "2026-11-28T03:05:00Z", None);
        let login = job(Task::Export, Phase::Failed, "2026-11-28T04:00:00Z", Some("Dgraph Cloud login failed: no"));
        let latest = members(&[("alpha", Some(alpha.clone()), Some(alpha.clone()))]);
        let (source, each) = assess_backends(&[alpha, login], &latest, now);
        assert_eq!(each["alpha"].light, Light::Amber);
        assert!(source.reason.contains("Dgraph Cloud login failed"), "{}", source.reason);
    }

    #[test]
    fn without_members_the_source_is_one_series() {
        let now = at("2026-11-28T05:00:00Z");
        let history = [job(Task::Export, Phase::Committed, "2026-11-28T03:05:00Z", None)];
        let (source, each) = assess_backends(&history, &BTreeMap::new(), now);
        assert_eq!(source, assess(&daily(), None, &history, None, now));
        assert!(each.is_empty());
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human(Duration::from_secs(42)), "42 s");
        assert_eq!(human(Duration::from_secs(600)), "10 min");
        assert_eq!(human(Duration::from_secs(3 * 3600 + 120)), "3 h 2 min");
        assert_eq!(human(Duration::from_secs(2 * 86_400 + 3600)), "2 d 1 h");
    }
}
