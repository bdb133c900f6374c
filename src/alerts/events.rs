//! Which alert events happen: decided from a finished job, or from a tick's health judgement.
//!
//! A source's [`AlertState`] lives in its ledger and is written in the same storage write as the
//! job's end or the tick, together with the events it raised (the outbox), so an event is never
//! decided twice nor lost to a crash between deciding and sending:
//! - every export that ends `failed` raises one `failed`, with the provider's error text;
//! - every export that ends `committed` raises one `committed`;
//! - every replicate job (the second copy) or restore that ends `failed` raises one `failed` too,
//!   its `job.task` being `replicate` or `restore`; it does not make the exports count as failing;
//! - a verify job that ends `failed` raises one `verify_failed`;
//! - a tick whose health is red (no committed backup within `max_age`) raises `stale` once per
//!   episode: the episode starts there and ends with the next committed backup;
//! - the first success after trouble raises one `recovered`, saying what it recovered from: a
//!   committed export after failed exports or a stale episode, a passed verification after a
//!   failed one.
//!
//! Skipped and dispatched jobs (nothing new to copy, a Dgraph account's fan-out) raise nothing.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::health::Health;
use crate::history::JobSummary;
use crate::identity::Task;
use crate::job::Phase;
use crate::time::Timestamp;

/// Events kept at most while they wait to be queued; the oldest are dropped beyond this.
pub const MAX_OUTBOX: usize = 100;

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A backup was committed.
    Committed,
    /// A backup failed.
    Failed,
    /// The first success after failures, a stale episode or a failed verification.
    Recovered,
    /// No committed backup within the source's `max_age`.
    Stale,
    /// A verification found a backup damaged, or could not read it.
    VerifyFailed,
}

impl EventKind {
    /// The `type` of the webhook payload.
    pub fn type_name(self) -> &'static str {
        match self {
            Self::Committed => "ferry.backup.committed",
            Self::Failed => "ferry.backup.failed",
            Self::Recovered => "ferry.backup.recovered",
            Self::Stale => "ferry.backup.stale",
            Self::VerifyFailed => "ferry.verify.failed",
        }
    }

    /// The name used in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Committed => "committed",
            Self::Failed => "failed",
            Self::Recovered => "recovered",
            Self::Stale => "stale",
            Self::VerifyFailed => "verify_failed",
        }
    }
}

/// One event of one source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertEvent {
    /// Derived from the event, never from an attempt: the `webhook-id` of every delivery and
    /// retry of it (`msg_` and 32 hex digits).
    pub id: String,
    /// What happened.
    pub kind: EventKind,
    /// When it happened: the job's end, or the tick that found the source stale.
    pub at: Timestamp,
    /// The source's name.
    pub source: String,
    /// Its provider kind (`d1`, `dgraph`, `aura`, `dxp`).
    pub source_kind: String,
    /// The job it is about (not for `stale`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<JobSummary>,
    /// The health judgement's reason (`stale`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The source's `max_age` in seconds (`stale`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_seconds: Option<u64>,
    /// When the newest committed backup finished (`stale`), if there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_backup_at: Option<Timestamp>,
    /// What a `recovered` event recovered from (`failed`, `stale`, `verify_failed`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recovered_from: Vec<EventKind>,
}

impl AlertEvent {
    fn new(kind: EventKind, at: Timestamp, source: &str, source_kind: &str, key: &str) -> Self {
        Self {
            id: event_id(source, kind, key),
            kind,
            at,
            source: source.to_string(),
            source_kind: source_kind.to_string(),
            job: None,
            reason: None,
            max_age_seconds: None,
            last_backup_at: None,
            recovered_from: Vec::new(),
        }
    }
}

/// One queued message: an event for one destination.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// The destination's name.
    pub destination: String,
    /// The event.
    pub event: AlertEvent,
}

/// `msg_` and the first 32 hex digits of SHA-256 over the source, the kind and what the event is
/// about (a job id, an episode's start): the same event always gets the same id, and the id
/// contains no `.` (Standard Webhooks signs `id.timestamp.body`).
fn event_id(source: &str, kind: EventKind, key: &str) -> String {
    let digest = Sha256::digest(format!("{source}\n{}\n{key}", kind.as_str()).as_bytes());
    format!("msg_{}", &hex::encode(digest)[..32])
}

/// A source's alert bookkeeping, kept in its ledger.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertState {
    /// The latest export failed, and none has committed since.
    #[serde(default)]
    pub failing: bool,
    /// The latest verification failed, and none has passed since.
    #[serde(default)]
    pub verify_failing: bool,
    /// The stale episode under way: when it was raised. Cleared by the next committed backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stale_since: Option<Timestamp>,
    /// Events decided but not yet handed to the queue, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outbox: Vec<AlertEvent>,
}

impl AlertState {
    /// The events a finished job raises (also added to the outbox). Call once per job.
    pub fn job_ended(&mut self, source: &str, source_kind: &str, job: &JobSummary) -> Vec<AlertEvent> {
        let of_job = |kind| {
            let mut e = AlertEvent::new(kind, job.finished_at, source, source_kind, job.id.as_str());
            e.job = Some(job.clone());
            e
        };
        let mut raised = Vec::new();
        match (job.task, job.phase) {
            (Task::Export, Phase::Committed) => {
                raised.push(of_job(EventKind::Committed));
                let mut from = Vec::new();
                if self.failing {
                    from.push(EventKind::Failed);
                }
                if self.stale_since.is_some() {
                    from.push(EventKind::Stale);
                }
                if !from.is_empty() {
                    let mut recovered = of_job(EventKind::Recovered);
                    recovered.recovered_from = from;
                    raised.push(recovered);
                }
                self.failing = false;
                self.stale_since = None;
            }
            (Task::Export, Phase::Failed) => {
                raised.push(of_job(EventKind::Failed));
                self.failing = true;
            }
            // A second copy that failed is reported like a failed backup (`job.task` says
            // `replicate`), without marking the source's exports as failing.
            // So is a restore that failed (`job.task` says `restore`): refused credentials, a
            // refused upload, a target that cannot be written.
            (Task::Replicate | Task::Restore, Phase::Failed) => raised.push(of_job(EventKind::Failed)),
            (Task::Verify, Phase::Failed) => {
                raised.push(of_job(EventKind::VerifyFailed));
                self.verify_failing = true;
            }
            (Task::Verify, Phase::Verified) if self.verify_failing => {
                let mut recovered = of_job(EventKind::Recovered);
                recovered.recovered_from = vec![EventKind::VerifyFailed];
                raised.push(recovered);
                self.verify_failing = false;
            }
            _ => {}
        }
        self.queue(&raised);
        raised
    }

    /// The `stale` event a tick at `at` raises, given the source's health then: one when the
    /// health is red and no stale episode is under way (also added to the outbox).
    pub fn ticked(&mut self, source: &str, source_kind: &str, health: &Health, at: Timestamp) -> Option<AlertEvent> {
        if !health.is_stale() || self.stale_since.is_some() {
            return None;
        }
        self.stale_since = Some(at);
        let mut e = AlertEvent::new(EventKind::Stale, at, source, source_kind, &at.millis().to_string());
        e.reason = Some(health.reason.clone());
        e.max_age_seconds = Some(health.max_age_seconds);
        e.last_backup_at = health.last_backup_at;
        self.queue(std::slice::from_ref(&e));
        Some(e)
    }

    /// Forgets the outbox's events that were handed to the queue.
    pub fn sent(&mut self, ids: &[String]) {
        self.outbox.retain(|e| !ids.contains(&e.id));
    }

    fn queue(&mut self, events: &[AlertEvent]) {
        self.outbox.extend(events.iter().cloned());
        let excess = self.outbox.len().saturating_sub(MAX_OUTBOX);
        self.outbox.drain(..excess);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::Light;
    use crate::identity::{JobId, Trigger};

    fn job(n: u8, task: Task, phase: Phase) -> JobSummary {
        JobSummary {
            id: JobId::from_random([n; 8]),
            task,
            trigger: Trigger::Cron,
            phase,
            started_at: Timestamp::from_secs(i64::from(n) * 100),
            finished_at: Timestamp::from_secs(i64::from(n) * 100 + 50),
            bytes: 10,
            error: (phase == Phase::Failed).then(|| "D1 API error (HTTP 400): no such database".to_string()),
            folder: (phase == Phase::Committed).then(|| format!("app-db/f{n}/")),
            member: None,
            warnings: Vec::new(),
        }
    }

    fn health(light: Light) -> Health {
        Health {
            light,
            reason: "the newest committed backup is 3 h old".into(),
            max_age_seconds: 3600,
            last_backup_at: None,
        }
    }

    fn kinds(events: &[AlertEvent]) -> Vec<EventKind> {
        events.iter().map(|e| e.kind).collect()
    }

    #[test]
    fn a_failed_replica_raises_failed_naming_the_task_and_leaves_the_exports_healthy() {
        let mut s = AlertState::default();
        let raised = s.job_ended("app-db", "d1", &job(1, Task::Replicate, Phase::Failed));
        assert_eq!(kinds(&raised), vec![EventKind::Failed]);
        assert_eq!(raised[0].job.as_ref().map(|j| j.task), Some(Task::Replicate));
        assert!(!s.failing);
        assert!(s.job_ended("app-db", "d1", &job(2, Task::Replicate, Phase::Committed)).is_empty());
        assert_eq!(
            kinds(&s.job_ended("app-db", "d1", &job(3, Task::Export, Phase::Committed))),
            vec![EventKind::Committed]
        );
    }

    #[test]
    fn a_failed_restore_raises_failed_naming_the_task_and_leaves_the_exports_healthy() {
        let mut s = AlertState::default();
        let raised = s.job_ended("portal", "dxp", &job(1, Task::Restore, Phase::Failed));
        assert_eq!(kinds(&raised), vec![EventKind::Failed]);
        assert_eq!(raised[0].job.as_ref().map(|j| j.task), Some(Task::Restore));
        assert!(!s.failing, "a restore is not a backup: the exports are not failing");
    }

    #[test]
    fn each_failed_job_raises_exactly_one_failed_with_the_providers_words() {
        let mut s = AlertState::default();
        let mut ids = Vec::new();
        for n in 1..=3 {
            let raised = s.job_ended("app-db", "d1", &job(n, Task::Export, Phase::Failed));
            assert_eq!(kinds(&raised), vec![EventKind::Failed]);
            let e = &raised[0];
            assert_eq!(
                e.job.as_ref().and_then(|j| j.error.as_deref()),
                Some("D1 API error (HTTP 400): no such database")
            );
            assert_eq!((e.source.as_str(), e.source_kind.as_str()), ("app-db", "d1"));
            ids.push(e.id.clone());
        }
        ids.dedup();
        assert_eq!(ids.len(), 3, "one distinct event per job");
        assert_eq!(s.outbox.len(), 3);
    }

    #[test]
    fn the_first_commit_after_failures_raises_committed_then_one_recovered() {
        let mut s = AlertState::default();
        s.job_ended("app-db", "d1", &job(1, Task::Export, Phase::Failed));
        s.job_ended("app-db", "d1", &job(2, Task::Export, Phase::Failed));
        let raised = s.job_ended("app-db", "d1", &job(3, Task::Export, Phase::Committed));
        assert_eq!(kinds(&raised), vec![EventKind::Committed, EventKind::Recovered]);
        assert_eq!(raised[1].recovered_from, vec![EventKind::Failed]);
        assert_ne!(raised[0].id, raised[1].id);
        let next = s.job_ended("app-db", "d1", &job(4, Task::Export, Phase::Committed));
        assert_eq!(kinds(&next), vec![EventKind::Committed], "recovered once");
    }

    #[test]
    fn stale_is_raised_once_per_episode_and_cleared_by_the_next_commit() {
        let mut s = AlertState::default();
        let at = |m: i64| Timestamp::from_secs(m * 60);
        assert_eq!(s.ticked("app-db", "d1", &health(Light::Amber), at(5)), None);
        let first = s.ticked("app-db", "d1", &health(Light::Red), at(10)).unwrap();
        assert_eq!(first.kind, EventKind::Stale);
        assert_eq!(
            (first.reason.as_deref(), first.max_age_seconds),
            (Some("the newest committed backup is 3 h old"), Some(3600))
        );
        for m in [15, 20, 25] {
            assert_eq!(s.ticked("app-db", "d1", &health(Light::Red), at(m)), None, "same episode at minute {m}");
        }
        // A failed export does not end the episode.
        s.job_ended("app-db", "d1", &job(1, Task::Export, Phase::Failed));
        assert_eq!(s.ticked("app-db", "d1", &health(Light::Red), at(30)), None);
        let raised = s.job_ended("app-db", "d1", &job(2, Task::Export, Phase::Committed));
        assert_eq!(kinds(&raised), vec![EventKind::Committed, EventKind::Recovered]);
        assert_eq!(raised[1].recovered_from, vec![EventKind::Failed, EventKind::Stale]);
        let second = s.ticked("app-db", "d1", &health(Light::Red), at(200)).unwrap();
        assert_ne!(second.id, first.id, "a new episode is a new event");
        assert_eq!(
            kinds(&s.outbox),
            vec![EventKind::Stale, EventKind::Failed, EventKind::Committed, EventKind::Recovered, EventKind::Stale]
        );
    }

    #[test]
    fn verifications_raise_verify_failed_and_recover_on_the_next_pass() {
        let mut s = AlertState::default();
        assert!(s.job_ended("app-db", "d1", &job(1, Task::Verify, Phase::Verified)).is_empty());
        assert_eq!(
            kinds(&s.job_ended("app-db", "d1", &job(2, Task::Verify, Phase::Failed))),
            vec![EventKind::VerifyFailed]
        );
        let raised = s.job_ended("app-db", "d1", &job(3, Task::Verify, Phase::Verified));
        assert_eq!(kinds(&raised), vec![EventKind::Recovered]);
        assert_eq!(raised[0].recovered_from, vec![EventKind::VerifyFailed]);
        assert!(!s.failing, "a failed verification is not a failed backup");
    }

    #[test]
    fn skipped_and_dispatched_jobs_raise_nothing_and_change_nothing() {
        let mut s = AlertState::default();
        s.job_ended("app-db", "d1", &job(1, Task::Export, Phase::Failed));
        let before = s.clone();
        assert!(s.job_ended("app-db", "d1", &job(2, Task::Export, Phase::Skipped)).is_empty());
        assert!(s.job_ended("app-db", "d1", &job(3, Task::Export, Phase::Dispatched)).is_empty());
        assert_eq!(s, before);
    }

    #[test]
    fn event_ids_are_stable_distinct_and_dot_free() {
        let a = event_id("app.db", EventKind::Failed, "0101010101010101");
        assert_eq!(a, event_id("app.db", EventKind::Failed, "0101010101010101"));
        assert_ne!(a, event_id("app.db", EventKind::Recovered, "0101010101010101"));
        assert_ne!(a, event_id("app-db", EventKind::Failed, "0101010101010101"));
        assert!(a.starts_with("msg_") && a.len() == 36 && !a.contains('.'), "{a}");
    }

    #[test]
    fn the_outbox_is_bounded_and_sent_events_leave_it() {
        let mut s = AlertState::default();
        for n in 0..=(MAX_OUTBOX as u8 + 4) {
            s.job_ended("app-db", "d1", &job(n, Task::Export, Phase::Failed));
        }
        assert_eq!(s.outbox.len(), MAX_OUTBOX);
        assert_eq!(s.outbox[0].job.as_ref().unwrap().id, JobId::from_random([5; 8]), "the oldest were dropped");
        let first_two: Vec<String> = s.outbox.iter().take(2).map(|e| e.id.clone()).collect();
        s.sent(&first_two);
        assert_eq!(s.outbox.len(), MAX_OUTBOX - 2);
    }
}
