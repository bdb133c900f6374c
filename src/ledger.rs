//! What a source's Durable Object remembers between jobs.
//!
//! One Durable Object per source is the single-flight lock: [`Ledger::admit`] decides whether a
//! trigger starts a job, conflicts with the one in flight, replays an earlier webhook delivery or
//! repeats a cron fire time already served. It is pure; the Durable Object persists it together
//! with the job in one write.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::job::{JobId, Task, Trigger};
use crate::time::Timestamp;

/// How many finished jobs a source keeps for `GET /v1/jobs/{id}`.
pub const MAX_JOBS: usize = 50;
/// How long a webhook delivery id is remembered. Signatures older than five minutes are refused
/// anyway, so a day is ample.
pub const WEBHOOK_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// A webhook delivery that started a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeenWebhook {
    /// `webhook-id`.
    pub id: String,
    /// The job it started.
    pub job: JobId,
    /// When it arrived.
    pub at: Timestamp,
}

/// A source's job bookkeeping.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ledger {
    /// The job in flight, if any.
    pub current: Option<JobId>,
    /// Known jobs, oldest first.
    pub jobs: Vec<JobId>,
    /// Recent webhook deliveries.
    pub webhooks: Vec<SeenWebhook>,
    /// The latest schedule fire time a cron job was started for.
    pub last_scheduled_for: Option<Timestamp>,
    /// The latest `verify_schedule` fire time a verify job was started for.
    #[serde(default)]
    pub last_verify_scheduled_for: Option<Timestamp>,
    /// Dedupe keys of committed jobs (e.g. DXP backup ids), newest last.
    #[serde(default)]
    pub copied: Vec<String>,
    /// Jobs waiting to run after the current one (a Dgraph account's backends), in order.
    #[serde(default)]
    pub queue: Vec<JobId>,
}

/// How many dedupe keys a source remembers.
pub const MAX_COPIED: usize = 1000;

/// A request to start a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerRequest {
    /// Cron or webhook.
    pub trigger: Trigger,
    /// The verified `webhook-id`, for webhooks.
    pub webhook_id: Option<String>,
    /// The schedule fire time being served, for cron.
    pub scheduled_for: Option<Timestamp>,
    /// Parameters from the webhook body (`{}` when none).
    #[serde(default)]
    pub params: serde_json::Value,
    /// Export (a backup) or verify (check one).
    #[serde(default)]
    pub task: Task,
}

/// The ledger's decision on a trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Start a new job.
    Start,
    /// Another job is in flight.
    Busy(JobId),
    /// This webhook delivery already started this job.
    Replay(JobId),
    /// A cron job for this fire time (or a later one) was already started.
    AlreadyServed(Timestamp),
}

impl Ledger {
    /// Decides what a trigger does. Replays win over conflicts, so a retried delivery always
    /// gets its own job back.
    pub fn admit(&self, req: &TriggerRequest) -> Admission {
        if let Some(id) = &req.webhook_id {
            if let Some(seen) = self.webhooks.iter().find(|w| &w.id == id) {
                return Admission::Replay(seen.job.clone());
            }
        }
        let last_served = match req.task {
            Task::Export => self.last_scheduled_for,
            Task::Verify => self.last_verify_scheduled_for,
        };
        if let (Some(for_time), Some(last)) = (req.scheduled_for, last_served) {
            if for_time <= last {
                return Admission::AlreadyServed(last);
            }
        }
        match (&self.current, self.queue.first()) {
            (Some(job), _) | (None, Some(job)) => Admission::Busy(job.clone()),
            (None, None) => Admission::Start,
        }
    }

    /// Records a started job; returns the ids of old jobs whose records can be deleted.
    pub fn record_start(&mut self, job: &JobId, req: &TriggerRequest, now: Timestamp) -> Vec<JobId> {
        self.current = Some(job.clone());
        self.jobs.push(job.clone());
        if let Some(id) = &req.webhook_id {
            self.webhooks.push(SeenWebhook { id: id.clone(), job: job.clone(), at: now });
        }
        if let Some(t) = req.scheduled_for {
            let served = match req.task {
                Task::Export => &mut self.last_scheduled_for,
                Task::Verify => &mut self.last_verify_scheduled_for,
            };
            *served = Some(served.map_or(t, |last| last.max(t)));
        }
        self.webhooks.retain(|w| now.since(w.at) <= WEBHOOK_MEMORY);
        self.evict()
    }

    /// Forgets the oldest finished jobs beyond [`MAX_JOBS`]; returns their ids so their records
    /// can be deleted. The job in flight and queued jobs are never evicted, however many there are.
    fn evict(&mut self) -> Vec<JobId> {
        let mut excess = self.jobs.len().saturating_sub(MAX_JOBS);
        let (current, queue) = (self.current.clone(), self.queue.clone());
        let mut evicted = Vec::new();
        self.jobs.retain(|id| {
            let live = current.as_ref() == Some(id) || queue.contains(id);
            if excess > 0 && !live {
                excess -= 1;
                evicted.push(id.clone());
                false
            } else {
                true
            }
        });
        evicted
    }

    /// Marks `job` as no longer in flight, remembering what it copied (`dedupe_key`).
    pub fn record_finish(&mut self, job: &JobId, dedupe_key: Option<String>) {
        if self.current.as_ref() == Some(job) {
            self.current = None;
        }
        if let Some(key) = dedupe_key {
            if !self.copied.contains(&key) {
                self.copied.push(key);
                let excess = self.copied.len().saturating_sub(MAX_COPIED);
                self.copied.drain(..excess);
            }
        }
    }

    /// Queues jobs to run after the current one.
    pub fn enqueue(&mut self, jobs: &[JobId]) -> Vec<JobId> {
        self.queue.extend(jobs.iter().cloned());
        self.jobs.extend(jobs.iter().cloned());
        self.evict()
    }

    /// Makes the next queued job current, if the source is free.
    pub fn start_next(&mut self) -> Option<JobId> {
        if self.current.is_some() || self.queue.is_empty() {
            return None;
        }
        let next = self.queue.remove(0);
        self.current = Some(next.clone());
        Some(next)
    }

    /// The most recent job.
    pub fn last_job(&self) -> Option<&JobId> {
        self.jobs.last()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn webhook(id: &str) -> TriggerRequest {
        TriggerRequest {
            trigger: Trigger::Webhook,
            webhook_id: Some(id.into()),
            scheduled_for: None,
            params: serde_json::json!({}),
            task: Task::Export,
        }
    }

    fn cron(at: i64) -> TriggerRequest {
        TriggerRequest {
            trigger: Trigger::Cron,
            webhook_id: None,
            scheduled_for: Some(Timestamp::from_secs(at)),
            params: serde_json::json!({}),
            task: Task::Export,
        }
    }

    fn id(n: u8) -> JobId {
        JobId::from_random([n; 8])
    }

    #[test]
    fn first_trigger_starts_and_second_conflicts_while_in_flight() {
        let mut l = Ledger::default();
        assert_eq!(l.admit(&webhook("a")), Admission::Start);
        l.record_start(&id(1), &webhook("a"), Timestamp::from_secs(0));
        assert_eq!(l.admit(&webhook("b")), Admission::Busy(id(1)));
        assert_eq!(l.admit(&cron(60)), Admission::Busy(id(1)));
        l.record_finish(&id(1), None);
        assert_eq!(l.admit(&webhook("b")), Admission::Start);
        assert_eq!(l.last_job(), Some(&id(1)));
    }

    #[test]
    fn same_webhook_id_replays_the_first_job_even_when_busy_or_finished() {
        let mut l = Ledger::default();
        l.record_start(&id(1), &webhook("a"), Timestamp::from_secs(0));
        assert_eq!(l.admit(&webhook("a")), Admission::Replay(id(1)));
        l.record_finish(&id(1), None);
        assert_eq!(l.admit(&webhook("a")), Admission::Replay(id(1)));
    }

    #[test]
    fn webhook_ids_are_forgotten_after_a_day() {
        let mut l = Ledger::default();
        l.record_start(&id(1), &webhook("a"), Timestamp::from_secs(0));
        l.record_finish(&id(1), None);
        l.record_start(&id(2), &webhook("b"), Timestamp::from_secs(24 * 3600 + 1));
        assert_eq!(l.webhooks.len(), 1);
        assert_eq!(l.webhooks[0].id, "b");
    }

    #[test]
    fn a_cron_fire_time_is_served_once() {
        let mut l = Ledger::default();
        l.record_start(&id(1), &cron(600), Timestamp::from_secs(600));
        l.record_finish(&id(1), None);
        assert_eq!(l.admit(&cron(600)), Admission::AlreadyServed(Timestamp::from_secs(600)));
        assert_eq!(l.admit(&cron(300)), Admission::AlreadyServed(Timestamp::from_secs(600)));
        assert_eq!(l.admit(&cron(660)), Admission::Start);
        // A webhook is never refused for cron reasons.
        assert_eq!(l.admit(&webhook("x")), Admission::Start);
    }

    #[test]
    fn old_jobs_are_evicted_beyond_the_cap() {
        let mut l = Ledger::default();
        let mut evicted = Vec::new();
        for n in 0..(MAX_JOBS as u8 + 2) {
            evicted.extend(l.record_start(&id(n), &webhook(&n.to_string()), Timestamp::from_secs(0)));
            l.record_finish(&id(n), None);
        }
        assert_eq!(evicted, vec![id(0), id(1)]);
        assert_eq!(l.jobs.len(), MAX_JOBS);
    }

    #[test]
    fn dedupe_keys_of_committed_jobs_are_remembered_once() {
        let mut l = Ledger::default();
        l.record_start(&id(1), &webhook("a"), Timestamp::from_secs(0));
        l.record_finish(&id(1), Some("dxpcloud-abc-202611230000".into()));
        l.record_start(&id(2), &webhook("b"), Timestamp::from_secs(0));
        l.record_finish(&id(2), Some("dxpcloud-abc-202611230000".into()));
        assert_eq!(l.copied, vec!["dxpcloud-abc-202611230000".to_string()]);
    }

    #[test]
    fn queued_jobs_run_one_after_another_and_keep_the_source_busy() {
        let mut l = Ledger::default();
        l.record_start(&id(1), &webhook("a"), Timestamp::from_secs(0));
        l.enqueue(&[id(2), id(3)]);
        l.record_finish(&id(1), None);
        assert_eq!(l.admit(&webhook("b")), Admission::Busy(id(2)), "queued work keeps the source busy");
        assert_eq!(l.start_next(), Some(id(2)));
        assert_eq!(l.start_next(), None, "one at a time");
        l.record_finish(&id(2), None);
        assert_eq!(l.start_next(), Some(id(3)));
        l.record_finish(&id(3), None);
        assert_eq!(l.start_next(), None);
        assert_eq!(l.admit(&webhook("b")), Admission::Start);
        assert_eq!(l.last_job(), Some(&id(3)));
    }

    #[test]
    fn finishing_another_job_does_not_clear_the_current_one() {
        let mut l = Ledger::default();
        l.record_start(&id(1), &webhook("a"), Timestamp::from_secs(0));
        l.record_finish(&id(9), None);
        assert_eq!(l.current, Some(id(1)));
    }

    #[test]
    fn verify_fire_times_are_served_apart_from_export_fire_times() {
        let mut l = Ledger::default();
        let verify = TriggerRequest { task: Task::Verify, ..cron(60) };
        l.record_start(&id(1), &cron(60), Timestamp::from_secs(0));
        l.record_finish(&id(1), None);
        assert_eq!(l.admit(&verify), Admission::Start, "an export at 60 does not serve the verify at 60");
        l.record_start(&id(2), &verify, Timestamp::from_secs(0));
        l.record_finish(&id(2), None);
        assert_eq!(l.admit(&verify), Admission::AlreadyServed(Timestamp::from_secs(60)));
        assert_eq!(l.admit(&cron(120)), Admission::Start);
    }

    #[test]
    fn an_account_of_200_backends_keeps_every_queued_job_until_it_ran() {
        let mut l = Ledger::default();
        l.record_start(&id(0), &webhook("a"), Timestamp::from_secs(0));
        let backends: Vec<JobId> = (0..200u32).map(|n| JobId::new(format!("{n:016x}"))).collect();
        l.record_finish(&id(0), None);
        let evicted = l.enqueue(&backends);
        assert!(evicted.iter().all(|e| !backends.contains(e)), "a queued job was evicted");
        let mut ran = Vec::new();
        while let Some(next) = l.start_next() {
            assert!(l.jobs.contains(&next), "the running job is still known");
            ran.push(next.clone());
            l.record_finish(&next, None);
            l.evict();
        }
        assert_eq!(ran, backends, "each backend ran once, in order");
        assert!(l.jobs.len() <= MAX_JOBS, "finished jobs are trimmed again once the queue drains");
    }
}
