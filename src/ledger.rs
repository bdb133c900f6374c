//! What a source's Durable Object remembers between jobs.
//!
//! One Durable Object per source is the single-flight lock: [`Ledger::admit`] decides whether a
//! trigger starts a job, conflicts with the one in flight, replays an earlier webhook delivery or
//! repeats a cron fire time already served. It is pure; the Durable Object persists it together
//! with the job in one write.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::alerts::{AlertEvent, AlertState};
use crate::config::SourceConfig;
use crate::history::{JobSummary, MemberJobs};
use crate::identity::{JobId, Task, Trigger};
use crate::job::{Job, Phase};
use crate::schedule::{Fires, Schedule};
use crate::time::Timestamp;

/// Most fire times counted into one catch-up (more are served by the same one job anyway).
const MAX_COUNTED_FIRES: u32 = 10_000;

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
    /// The latest `drill_schedule` fire time a drill was started for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_drill_scheduled_for: Option<Timestamp>,
    /// Dedupe keys of committed jobs (e.g. DXP backup ids), newest last.
    #[serde(default)]
    pub copied: Vec<String>,
    /// Jobs waiting to run after the current one (a Dgraph account's backends), in order.
    #[serde(default)]
    pub queue: Vec<JobId>,
    /// The last cron tick this source processed: the next tick's window starts here, so a tick
    /// Cloudflare skipped or delayed loses no fire time.
    #[serde(default)]
    pub last_tick: Option<Timestamp>,
    /// Fire times that came due while the source was busy, waiting (coalesced) for it to be free.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub missed: Vec<Missed>,
    /// The latest finished jobs, oldest first (health, metrics and the dashboard read them).
    #[serde(default)]
    pub history: Vec<JobSummary>,
    /// How many jobs ended in each phase (`committed`, `failed`, …), since the first.
    #[serde(default)]
    pub outcomes: BTreeMap<Phase, u64>,
    /// When Ferry first knew this source (its first tick or job).
    #[serde(default)]
    pub watched_since: Option<Timestamp>,
    /// Alert bookkeeping: the stale episode, whether it is failing, events waiting to be queued.
    #[serde(default)]
    pub alerts: AlertState,
    /// In account mode, each member's latest export jobs (a Dgraph account's backends), by
    /// member: health, staleness and metrics judge every member on its own, and the history is
    /// too short to hold them for a large account.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub members: BTreeMap<String, MemberJobs>,
}

/// How many finished jobs [`Ledger::history`] keeps.
pub const MAX_HISTORY: usize = 40;

/// What a source's alarm does once its job ended ([`Ledger::alarm_after_end`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlarmAfterEnd {
    /// Wake again at once: there is work.
    WakeNow,
    /// Clear it: the source is idle until a trigger or a tick.
    Clear,
}

/// What a source's alarm works on when it fires ([`Ledger::on_alarm`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlarmWork {
    /// Start the missed fire time waiting for a free source (its start was lost).
    CatchUp,
    /// Take the next step of the job in flight.
    Job(JobId),
    /// Nothing in flight: run the daily retention pass if one is due.
    RetentionIfDue,
}

/// What retention does after a job ended ([`retention_after`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetentionAfterEnd {
    /// A committed export of a source with `retention`: a pass in an alarm invocation of its
    /// own (this one has spent subrequests on the job).
    Defer,
    /// A committed replicate job: thin the replica now, deferring the rest if it needs more steps.
    ReplicaPass,
    /// Anything else: defer the daily pass if it is due.
    DailyIfDue,
}

/// What retention does after `job` ended.
pub fn retention_after(job: &Job, source: &SourceConfig) -> Option<RetentionAfterEnd> {
    if job.phase == Phase::Committed && job.task() == Task::Export {
        source.retention.is_some().then_some(RetentionAfterEnd::Defer)
    } else if job.replica_committed() {
        Some(RetentionAfterEnd::ReplicaPass)
    } else {
        Some(RetentionAfterEnd::DailyIfDue)
    }
}

/// Fire times of one schedule that could not start a job when they came due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Missed {
    /// Export (the `schedule`) or verify (the `verify_schedule`).
    pub task: Task,
    /// Which fire times.
    pub fires: Fires,
}

/// What one cron tick means for a source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TickOutcome {
    /// This tick, or a later one, was processed already.
    AlreadyProcessed(Timestamp),
    /// No fire time of the source fell since its last processed tick.
    NotDue,
    /// Start a job serving `fires.latest`; `catch_up` says why it serves more than this tick's
    /// own fire time, when it does.
    Start {
        /// Export or verify.
        task: Task,
        /// The fire times it serves.
        fires: Fires,
        /// The note for the job, for a catch-up.
        catch_up: Option<String>,
    },
    /// The source is busy: the due fire times wait, coalesced, and run when it is free.
    Deferred {
        /// The job in flight.
        busy_with: JobId,
        /// What waits.
        missed: Missed,
    },
}

/// The note of a catch-up job.
fn catch_up_note(fires: &Fires, why: &str) -> String {
    if fires.count == 1 {
        format!("catch-up: the fire time {} {why}; this job serves it", fires.latest)
    } else {
        format!(
            "catch-up: {} fire times from {} to {} {why}; this one job serves them all",
            fires.count, fires.earliest, fires.latest
        )
    }
}

/// How many dedupe keys a source remembers.
pub const MAX_COPIED: usize = 1000;

/// A request to start a job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TriggerRequest {
    /// Cron, webhook or API.
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
            Task::Replicate => None,
            Task::Drill => self.last_drill_scheduled_for,
            Task::Restore => None,
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

    /// Processes the cron tick scheduled at `tick`, whose trigger last fired at `trigger_start`.
    /// The window is `(last processed tick, tick]` (the trigger's own window the first time), so
    /// missed or late ticks lose nothing; several fire times in it start one coalesced job. A
    /// busy source keeps what is due in [`Ledger::missed`] for [`Ledger::take_catch_up`]. When both
    /// schedules are due, the export runs and the verification waits for it.
    pub fn tick(
        &mut self,
        tick: Timestamp,
        trigger_start: Timestamp,
        schedule: &Schedule,
        verify_schedule: Option<&Schedule>,
    ) -> TickOutcome {
        self.tick_with_drills(tick, trigger_start, schedule, verify_schedule, None)
    }

    /// [`Ledger::tick`] with a `drill_schedule` too (restore drills, after exports and verifications).
    pub fn tick_with_drills(
        &mut self,
        tick: Timestamp,
        trigger_start: Timestamp,
        schedule: &Schedule,
        verify_schedule: Option<&Schedule>,
        drill_schedule: Option<&Schedule>,
    ) -> TickOutcome {
        if let Some(last) = self.last_tick.filter(|last| *last >= tick) {
            return TickOutcome::AlreadyProcessed(last);
        }
        let start = self.last_tick.unwrap_or(trigger_start);
        self.last_tick = Some(tick);
        self.watched_since.get_or_insert(tick);
        let due: Vec<Missed> = [
            schedule.fires_between(start, tick, MAX_COUNTED_FIRES).map(|fires| Missed { task: Task::Export, fires }),
            verify_schedule
                .and_then(|v| v.fires_between(start, tick, MAX_COUNTED_FIRES))
                .map(|fires| Missed { task: Task::Verify, fires }),
            drill_schedule
                .and_then(|d| d.fires_between(start, tick, MAX_COUNTED_FIRES))
                .map(|fires| Missed { task: Task::Drill, fires }),
        ]
        .into_iter()
        .flatten()
        .collect();
        let Some(first) = due.first().copied() else { return TickOutcome::NotDue };
        if let Some(busy_with) = self.current.clone().or_else(|| self.queue.first().cloned()) {
            due.iter().for_each(|m| self.defer(*m));
            return TickOutcome::Deferred { busy_with, missed: first };
        }
        due.iter().skip(1).for_each(|m| self.defer(*m));
        let fires = first.fires;
        let catch_up = if fires.earliest <= trigger_start {
            Some(catch_up_note(&fires, "came due while no trigger ran (a missed or late tick)"))
        } else if fires.count > 1 {
            Some(catch_up_note(&fires, "came due since the last tick"))
        } else {
            None
        };
        TickOutcome::Start { task: first.task, fires, catch_up }
    }

    fn defer(&mut self, m: Missed) {
        match self.missed.iter_mut().find(|x| x.task == m.task) {
            Some(x) => {
                x.fires.earliest = x.fires.earliest.min(m.fires.earliest);
                x.fires.latest = x.fires.latest.max(m.fires.latest);
                x.fires.count = x.fires.count.saturating_add(m.fires.count);
            }
            None => self.missed.push(m),
        }
    }

    /// When the source is free: the fire times it missed while busy, as one job to start now
    /// (exports first), with its note.
    pub fn take_catch_up(&mut self) -> Option<(Task, Timestamp, String)> {
        if self.current.is_some() || !self.queue.is_empty() || self.missed.is_empty() {
            return None;
        }
        let at = self.missed.iter().position(|m| m.task == Task::Export).unwrap_or(0);
        let m = self.missed.remove(at);
        Some((m.task, m.fires.latest, catch_up_note(&m.fires, "came due while the source was busy")))
    }

    /// Records a started job; returns the ids of old jobs whose records can be deleted.
    pub fn record_start(&mut self, job: &JobId, req: &TriggerRequest, now: Timestamp) -> Vec<JobId> {
        self.watched_since.get_or_insert(now);
        self.current = Some(job.clone());
        self.jobs.push(job.clone());
        if let Some(id) = &req.webhook_id {
            self.webhooks.push(SeenWebhook { id: id.clone(), job: job.clone(), at: now });
        }
        let served = match req.task {
            Task::Export => Some(&mut self.last_scheduled_for),
            Task::Verify => Some(&mut self.last_verify_scheduled_for),
            Task::Drill => Some(&mut self.last_drill_scheduled_for),
            // Queued by the runtime after a commit, or asked for by hand: no fire time to serve.
            Task::Replicate | Task::Restore => None,
        };
        if let (Some(t), Some(served)) = (req.scheduled_for, served) {
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

    /// Records how a job ended, for health, metrics and the dashboard, and the alert events it
    /// raises (into [`AlertState::outbox`]); once per job.
    pub fn remember(&mut self, job: &Job) {
        let Some(summary) = JobSummary::of(job) else { return };
        if self.history.iter().any(|h| h.id == summary.id) {
            return;
        }
        self.alerts.job_ended(&job.source, &job.kind, &summary);
        *self.outcomes.entry(summary.phase).or_default() += 1;
        if let (Some(member), Task::Export, Phase::Committed | Phase::Failed) =
            (&summary.member, summary.task, summary.phase)
        {
            let latest = self.members.entry(member.clone()).or_default();
            latest.first_seen.get_or_insert(summary.started_at);
            if summary.phase == Phase::Committed {
                latest.last_committed = Some(summary.clone());
            }
            latest.last_finished = Some(summary.clone());
        }
        self.history.push(summary);
        let excess = self.history.len().saturating_sub(MAX_HISTORY);
        self.history.drain(..excess);
    }

    /// Keeps the members an account lists now (a discovery found them) and forgets the others
    /// (a backend deleted from the account no longer counts towards the source's health).
    pub fn keep_members(&mut self, listed: &[String]) {
        self.members.retain(|m, _| listed.contains(m));
    }

    /// The source's health at `now` and, in account mode, each member's (see
    /// [`crate::health::assess_source`]).
    pub fn health(
        &self,
        source: &SourceConfig,
        now: Timestamp,
    ) -> (crate::health::Health, BTreeMap<String, crate::health::Health>) {
        let watch = crate::health::Watch {
            schedule: &source.schedule,
            max_age: source.max_age,
            member_noun: source.provider.member_noun(),
        };
        crate::health::assess_source(&watch, &self.history, &self.members, self.watched_since, now)
    }

    /// At a cron tick at `at`: judges the source's health then and raises `stale` (into the
    /// outbox) when it is red and no stale episode is under way. Judging at the tick's own time
    /// keeps the decision a function of its inputs (a late or replayed tick judges its moment).
    /// In account mode the source is stale when one of its members is.
    pub fn check_stale(&mut self, source: &SourceConfig, at: Timestamp) -> Option<AlertEvent> {
        let (health, _) = self.health(source, at);
        self.alerts.ticked(&source.name, source.kind(), &health, at)
    }

    /// The latest committed export.
    pub fn last_backup(&self) -> Option<&JobSummary> {
        self.history.iter().rev().find(|h| h.task == Task::Export && h.phase == Phase::Committed)
    }

    /// What the source's alarm does once its job ended and nothing else started in this
    /// invocation: wake again at once while a job is in flight, queued or missed (a trigger may
    /// have written them during the clean-up's I/O) or a retention pass waits, else clear it.
    pub fn alarm_after_end(&self, retention_waits: bool) -> AlarmAfterEnd {
        if self.current.is_some() || !self.queue.is_empty() || !self.missed.is_empty() || retention_waits {
            AlarmAfterEnd::WakeNow
        } else {
            AlarmAfterEnd::Clear
        }
    }

    /// What the source's alarm works on: a catch-up waiting for a free source first, then the
    /// job in flight, else a retention pass if one is due.
    pub fn on_alarm(&self) -> AlarmWork {
        match &self.current {
            None if !self.missed.is_empty() => AlarmWork::CatchUp,
            None => AlarmWork::RetentionIfDue,
            Some(id) => AlarmWork::Job(id.clone()),
        }
    }

    /// Closes the book on `job`, which discovered an account's members (`members`) and queued
    /// one child job each (`children`, whose records the shell stored first): the job is over
    /// and remembered, its children are named on it and queued, and members the account no
    /// longer lists stop counting. Returns the jobs evicted from a full queue, as
    /// [`Ledger::close`] does.
    pub fn dispatched(&mut self, job: &mut Job, children: &[JobId], members: &[String]) -> Vec<JobId> {
        job.children = children.to_vec();
        self.record_finish(&job.id, None);
        self.remember(job);
        self.keep_members(members);
        self.enqueue(children)
    }

    /// Closes the book on `job`, stopped because its source is no longer configured: the source
    /// is free, the job remembered, and nothing queued behind it runs.
    pub fn abandoned(&mut self, job: &Job) {
        self.record_finish(&job.id, None);
        self.remember(job);
        self.queue.clear();
    }

    /// Closes the source's book on `job`, which has ended: the source is free, the job's end is
    /// remembered (history, outcome counts, alerts), and the job that follows it (its replicate
    /// job, whose record the shell stored first) is queued and named among its children. The
    /// shell then writes the job and the ledger in one call, and deletes the records of the jobs
    /// returned (evicted from a full queue).
    pub fn close(&mut self, job: &mut Job, follow_up: Option<&JobId>) -> Vec<JobId> {
        self.record_finish(&job.id, job.dedupe_key());
        self.remember(job);
        match follow_up {
            Some(id) => {
                job.children.push(id.clone());
                self.enqueue(std::slice::from_ref(id))
            }
            None => Vec::new(),
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
    fn an_api_trigger_has_no_delivery_id_so_it_is_never_replayed_but_still_single_flight() {
        let api = TriggerRequest { trigger: Trigger::Api, webhook_id: None, ..webhook("unused") };
        let mut l = Ledger::default();
        assert_eq!(l.admit(&api), Admission::Start);
        l.record_start(&id(1), &api, Timestamp::from_secs(0));
        assert!(l.webhooks.is_empty(), "nothing to replay by");
        assert_eq!(l.admit(&api), Admission::Busy(id(1)));
        assert_eq!(l.admit(&webhook("a")), Admission::Busy(id(1)));
        l.record_finish(&id(1), None);
        assert_eq!(l.admit(&api), Admission::Start, "a second press starts a second job");
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

    fn at(s: &str) -> Timestamp {
        Timestamp::parse_rfc3339(s).unwrap()
    }

    #[test]
    fn the_alarm_starts_a_waiting_catch_up_first_then_the_job_in_flight_else_a_due_retention_pass() {
        let mut l = Ledger::default();
        assert_eq!(l.on_alarm(), AlarmWork::RetentionIfDue, "an idle source");
        l.record_start(&id(1), &webhook("a"), Timestamp::from_secs(0));
        assert_eq!(l.on_alarm(), AlarmWork::Job(id(1)));
        let fires = Fires { earliest: Timestamp::from_secs(60), latest: Timestamp::from_secs(60), count: 1 };
        l.missed.push(Missed { task: Task::Export, fires });
        assert_eq!(l.on_alarm(), AlarmWork::Job(id(1)), "a missed fire time waits for the job in flight");
        l.record_finish(&id(1), None);
        assert_eq!(l.on_alarm(), AlarmWork::CatchUp, "then it starts");
    }

    #[test]
    fn a_dispatching_job_ends_with_its_children_named_and_queued_and_unlisted_members_forgotten() {
        let mut l = Ledger::default();
        l.remember(&backend_job(7, "gone", Phase::Committed, at("2026-11-28T03:00:00Z")));
        assert!(l.members.contains_key("gone"));
        let mut parent = Job::new(id(1), &d1_source(60), Trigger::Cron, None, None, at("2026-11-29T03:00:00Z"));
        l.record_start(&id(1), &cron(60), at("2026-11-29T03:00:00Z"));
        parent.phase = Phase::Dispatched;
        parent.finished_at = Some(at("2026-11-29T03:00:05Z"));
        let evicted = l.dispatched(&mut parent, &[id(2), id(3)], &["alpha".to_string()]);
        assert!(evicted.is_empty());
        assert_eq!(parent.children, vec![id(2), id(3)], "the parent names its children");
        assert_eq!(l.current, None, "the source is free for the first child");
        assert_eq!(l.queue, vec![id(2), id(3)]);
        assert_eq!(l.history.last().map(|h| (h.id.clone(), h.phase)), Some((id(1), Phase::Dispatched)));
        assert!(!l.members.contains_key("gone"), "a member the account no longer lists stops counting");
        assert_eq!(l.start_next(), Some(id(2)));
    }

    #[test]
    fn a_job_abandoned_with_its_source_frees_the_source_and_runs_nothing_queued_behind_it() {
        let mut l = Ledger::default();
        l.record_start(&id(1), &webhook("a"), Timestamp::from_secs(0));
        l.enqueue(&[id(2)]);
        let mut job = finished(id(1), Phase::Failed, at("2026-11-28T09:00:00Z"));
        job.error = Some("source \"app-db\" is no longer configured".into());
        l.abandoned(&job);
        assert_eq!((l.current.clone(), l.queue.clone()), (None, vec![]));
        assert_eq!(l.history.last().map(|h| h.id.clone()), Some(id(1)), "its end is remembered");
        assert_eq!(l.start_next(), None);
    }

    fn d1_source(max_age_minutes: u64) -> SourceConfig {
        let c = crate::config::Config::from_value(&serde_json::json!([{
            "name": "app-db", "kind": "d1", "schedule": "0 3 * * *", "account_id": "a", "database_id": "d",
            "token_secret": "T", "max_age_minutes": max_age_minutes
        }]))
        .unwrap();
        c.sources[0].clone()
    }

    fn finished(id: JobId, phase: Phase, at: Timestamp) -> Job {
        let mut job = Job::new(id, &d1_source(60), Trigger::Cron, None, None, at);
        job.phase = phase;
        job.finished_at = Some(at);
        job.error = (phase == Phase::Failed).then(|| "no such database".to_string());
        job
    }

    #[test]
    fn closing_a_job_frees_the_source_remembers_it_and_queues_its_follow_up_as_its_child() {
        let mut l = Ledger::default();
        l.enqueue(&[id(1)]);
        assert_eq!(l.start_next(), Some(id(1)));
        let mut job = finished(id(1), Phase::Committed, at("2026-11-28T09:00:00Z"));
        assert_eq!(l.close(&mut job, Some(&id(2))), Vec::<JobId>::new());
        assert_eq!(l.current, None, "the source is free");
        assert_eq!(l.history.last().map(|h| &h.id), Some(&id(1)));
        assert_eq!((l.queue.clone(), job.children.clone()), (vec![id(2)], vec![id(2)]));
        assert_eq!(l.start_next(), Some(id(2)), "the replicate job runs next");
        let mut replica = finished(id(2), Phase::Failed, at("2026-11-28T09:05:00Z"));
        l.close(&mut replica, None);
        assert!(l.queue.is_empty() && l.current.is_none() && replica.children.is_empty());
        // A full book: the follow-up evicts the oldest finished job, whose record the shell deletes.
        let last = MAX_JOBS as u8;
        for n in 3..=last {
            assert!(l.enqueue(&[id(n)]).is_empty());
            l.start_next();
            let mut job = finished(id(n), Phase::Committed, at("2026-11-28T10:00:00Z"));
            let follow_up = id(last + 1);
            let evicted = l.close(&mut job, (n == last).then_some(&follow_up));
            assert_eq!(evicted, if n == last { vec![id(1)] } else { vec![] }, "job {n}");
        }
    }

    #[test]
    fn after_a_jobs_end_retention_runs_in_its_own_invocation_and_the_alarm_clears_only_when_idle() {
        let mut with_retention = d1_source(60);
        with_retention.retention =
            Some(serde_json::from_value(serde_json::json!({"keep_last": 3})).expect("a retention policy"));
        let committed = finished(id(1), Phase::Committed, at("2026-11-28T09:00:00Z"));
        assert_eq!(retention_after(&committed, &with_retention), Some(RetentionAfterEnd::Defer));
        assert_eq!(retention_after(&committed, &d1_source(60)), None, "no retention table: nothing is deleted");
        let failed = finished(id(2), Phase::Failed, at("2026-11-28T09:00:00Z"));
        assert_eq!(retention_after(&failed, &with_retention), Some(RetentionAfterEnd::DailyIfDue));
        let mut replica = committed.clone();
        replica.work =
            crate::job::Work::Replicate(crate::job::Replicate { replica: None, copying: Default::default() });
        assert_eq!(retention_after(&replica, &d1_source(60)), Some(RetentionAfterEnd::ReplicaPass));

        let mut l = Ledger::default();
        assert_eq!(l.alarm_after_end(false), AlarmAfterEnd::Clear);
        assert_eq!(l.alarm_after_end(true), AlarmAfterEnd::WakeNow, "a retention pass waits");
        l.enqueue(&[id(3)]);
        assert_eq!(l.alarm_after_end(false), AlarmAfterEnd::WakeNow, "a queued job");
        l.start_next();
        assert_eq!(l.alarm_after_end(false), AlarmAfterEnd::WakeNow, "a job in flight");
    }

    #[test]
    fn a_finished_jobs_summary_carries_its_warnings_bounded() {
        let mut job = finished(id(1), Phase::Committed, at("2026-11-28T09:00:00Z"));
        assert!(JobSummary::of(&job).unwrap().warnings.is_empty());
        job.warnings = (0..12).map(|i| format!("warning {i}: {}", "x".repeat(600))).collect();
        let summary = JobSummary::of(&job).unwrap();
        assert_eq!(summary.warnings.len(), crate::history::MAX_SUMMARY_WARNINGS);
        assert!(summary.warnings.iter().all(|w| w.chars().count() == 500));
        assert!(summary.warnings[0].starts_with("warning 0: "));
        let mut running = job.clone();
        running.phase = Phase::Exporting;
        assert!(JobSummary::of(&running).is_none(), "a job in flight has no summary");
    }

    fn backend_job(n: u8, backend: &str, phase: Phase, at: Timestamp) -> Job {
        let mut job = finished(id(n), phase, at);
        job.export_mut().provider = crate::providers::ProviderState::Dgraph(crate::providers::dgraph::DgraphState {
            backend: Some(crate::providers::dgraph::Backend {
                uid: format!("0x{n}"),
                name: backend.into(),
                url: format!("https://{backend}.example"),
                secret_jwt: "jwt".into(),
            }),
            ..Default::default()
        });
        job
    }

    #[test]
    fn in_account_mode_each_backend_keeps_its_latest_jobs_past_the_history_and_stale_names_it() {
        let mut l = Ledger::default();
        let source = d1_source(60);
        l.remember(&backend_job(1, "beta", Phase::Committed, at("2026-11-28T09:00:00Z")));
        l.remember(&backend_job(2, "beta", Phase::Failed, at("2026-11-28T09:30:00Z")));
        for n in 0..(MAX_HISTORY as u8 + 5) {
            l.remember(&backend_job(10 + n, "alpha", Phase::Committed, at("2026-11-28T10:50:00Z")));
        }
        assert!(l.history.iter().all(|h| h.member.as_deref() == Some("alpha")), "beta fell out of the history");
        let beta = &l.members["beta"];
        assert_eq!(beta.last_committed.as_ref().map(|h| h.id.clone()), Some(id(1)));
        assert_eq!(beta.last_finished.as_ref().map(|h| h.phase), Some(Phase::Failed));
        // alpha committed 11 minutes ago; beta's newest backup is two hours old: the source is stale.
        l.alerts.outbox.clear();
        let stale = l.check_stale(&source, at("2026-11-28T11:01:00Z")).expect("stale");
        assert!(stale.reason.as_deref().unwrap().starts_with("database beta: "), "{stale:?}");
        // A backend the account no longer lists stops counting.
        l.keep_members(&["alpha".to_string()]);
        assert_eq!(l.members.keys().collect::<Vec<_>>(), ["alpha"]);
        let (health, _) = l.health(&source, at("2026-11-28T11:00:00Z"));
        assert_eq!(health.light, crate::health::Light::Green);
    }

    #[test]
    fn a_new_backends_grace_counts_from_its_first_job_not_from_the_sources_start() {
        let mut l = Ledger { watched_since: Some(at("2026-11-01T00:00:00Z")), ..Ledger::default() };
        let source = d1_source(60);
        l.remember(&backend_job(1, "alpha", Phase::Committed, at("2026-11-28T10:00:00Z")));
        // A backend the account lists from today on: its first backup failed.
        l.remember(&backend_job(2, "delta", Phase::Failed, at("2026-11-28T10:05:00Z")));
        let (health, members) = l.health(&source, at("2026-11-28T10:30:00Z"));
        assert_eq!(members["delta"].light, crate::health::Light::Amber, "{:?}", members["delta"]);
        assert!(members["delta"].reason.starts_with("no backup yet"), "{:?}", members["delta"]);
        assert_eq!(health.light, crate::health::Light::Amber);
        assert!(l.check_stale(&source, at("2026-11-28T10:30:00Z")).is_none(), "not stale within its grace");
        // Past max_age since its first job, still without a backup: red, and stale.
        let (_, members) = l.health(&source, at("2026-11-28T11:10:00Z"));
        assert_eq!(members["delta"].light, crate::health::Light::Red, "{:?}", members["delta"]);
        // A later job does not move the start of the grace.
        l.remember(&backend_job(3, "delta", Phase::Failed, at("2026-11-28T11:00:00Z")));
        let (_, members) = l.health(&source, at("2026-11-28T11:10:00Z"));
        assert_eq!(members["delta"].light, crate::health::Light::Red, "{:?}", members["delta"]);
    }

    #[test]
    fn a_job_remembered_twice_raises_its_alert_once() {
        let mut l = Ledger::default();
        let job = finished(id(1), Phase::Failed, at("2026-11-28T10:00:00Z"));
        l.remember(&job);
        l.remember(&job);
        let kinds: Vec<_> = l.alerts.outbox.iter().map(|e| e.kind).collect();
        assert_eq!(kinds, vec![crate::alerts::EventKind::Failed]);
        assert_eq!(l.alerts.outbox[0].source, "app-db");
        assert_eq!(l.alerts.outbox[0].source_kind, "d1");
    }

    #[test]
    fn ticks_judge_staleness_at_their_own_time_against_max_age_minutes() {
        let mut l = Ledger::default();
        let source = d1_source(60);
        l.remember(&finished(id(1), Phase::Committed, at("2026-11-28T10:00:00Z")));
        l.alerts.outbox.clear();
        assert_eq!(l.check_stale(&source, at("2026-11-28T10:59:00Z")), None);
        let stale = l.check_stale(&source, at("2026-11-28T11:01:00Z")).unwrap();
        assert!(stale.reason.as_deref().unwrap().contains("more than max_age (1 h 0 min)"), "{stale:?}");
        assert_eq!(l.check_stale(&source, at("2026-11-28T11:06:00Z")), None, "once per episode");
        l.remember(&finished(id(2), Phase::Committed, at("2026-11-28T11:10:00Z")));
        assert_eq!(l.check_stale(&source, at("2026-11-28T11:15:00Z")), None, "fresh again");
        assert!(l.check_stale(&source, at("2026-11-28T12:11:00Z")).is_some(), "a new episode");
        let kinds: Vec<_> = l.alerts.outbox.iter().map(|e| e.kind.as_str()).collect();
        assert_eq!(kinds, ["stale", "committed", "recovered", "stale"]);
    }

    fn hourly() -> Schedule {
        Schedule::parse("0 * * * *").unwrap()
    }

    #[test]
    fn a_tick_starts_the_job_of_its_own_fire_time_once() {
        let mut l = Ledger::default();
        let out = l.tick(at("2026-11-28T10:00:00Z"), at("2026-11-28T09:55:00Z"), &hourly(), None);
        let TickOutcome::Start { task, fires, catch_up } = out else { panic!("{out:?}") };
        assert_eq!((task, fires.latest, fires.count, catch_up), (Task::Export, at("2026-11-28T10:00:00Z"), 1, None));
        assert_eq!(
            l.tick(at("2026-11-28T10:00:00Z"), at("2026-11-28T09:55:00Z"), &hourly(), None),
            TickOutcome::AlreadyProcessed(at("2026-11-28T10:00:00Z")),
            "the same tick delivered twice starts nothing"
        );
        assert_eq!(
            l.tick(at("2026-11-28T10:05:00Z"), at("2026-11-28T10:00:00Z"), &hourly(), None),
            TickOutcome::NotDue
        );
    }

    #[test]
    fn ticks_cloudflare_skipped_are_caught_up_by_one_coalesced_job_that_says_so() {
        let mut l = Ledger::default();
        l.tick(at("2026-11-28T07:55:00Z"), at("2026-11-28T07:50:00Z"), &hourly(), None);
        // No tick ran from 07:55 until 11:05: fire times 08:00, 09:00, 10:00 and 11:00 were missed.
        let out = l.tick(at("2026-11-28T11:05:00Z"), at("2026-11-28T11:00:00Z"), &hourly(), None);
        let TickOutcome::Start { fires, catch_up, .. } = out else { panic!("{out:?}") };
        assert_eq!(
            (fires.earliest, fires.latest, fires.count),
            (at("2026-11-28T08:00:00Z"), at("2026-11-28T11:00:00Z"), 4)
        );
        let note = catch_up.unwrap();
        assert!(note.starts_with("catch-up: 4 fire times") && note.contains("missed or late tick"), "{note}");
    }

    #[test]
    fn fire_times_due_while_busy_wait_and_run_as_one_catch_up_when_the_source_is_free() {
        let mut l = Ledger::default();
        l.record_start(&id(1), &webhook("long"), at("2026-11-28T09:30:00Z"));
        for h in ["10", "11", "12"] {
            let tick = at(&format!("2026-11-28T{h}:00:00Z"));
            let out = l.tick(tick, tick.minus(std::time::Duration::from_secs(300)), &hourly(), None);
            assert!(matches!(out, TickOutcome::Deferred { ref busy_with, .. } if *busy_with == id(1)), "{out:?}");
        }
        assert_eq!(l.take_catch_up(), None, "nothing starts while the job runs");
        l.record_finish(&id(1), None);
        let (task, fire, note) = l.take_catch_up().unwrap();
        assert_eq!((task, fire), (Task::Export, at("2026-11-28T12:00:00Z")));
        assert!(note.contains("3 fire times") && note.contains("busy"), "{note}");
        assert_eq!(l.take_catch_up(), None, "served once");
    }

    #[test]
    fn a_verification_due_with_an_export_waits_for_it_instead_of_being_dropped() {
        let mut l = Ledger::default();
        let daily_verify = Schedule::parse("0 10 * * *").unwrap();
        let out = l.tick(at("2026-11-28T10:00:00Z"), at("2026-11-28T09:55:00Z"), &hourly(), Some(&daily_verify));
        assert!(matches!(out, TickOutcome::Start { task: Task::Export, .. }), "{out:?}");
        l.record_start(&id(1), &cron(0), at("2026-11-28T10:00:00Z"));
        l.record_finish(&id(1), None);
        let (task, fire, _) = l.take_catch_up().unwrap();
        assert_eq!((task, fire), (Task::Verify, at("2026-11-28T10:00:00Z")));
    }

    #[test]
    fn a_drill_schedule_starts_a_drill_once_per_fire_time_and_waits_behind_an_export() {
        let mut l = Ledger::default();
        let yearly = Schedule::parse("0 0 1 1 *").unwrap();
        let drills = Schedule::parse("0 10 * * *").unwrap();
        let out =
            l.tick_with_drills(at("2026-11-28T10:00:00Z"), at("2026-11-28T09:55:00Z"), &yearly, None, Some(&drills));
        let TickOutcome::Start { task, fires, .. } = out else { panic!("{out:?}") };
        assert_eq!((task, fires.latest), (Task::Drill, at("2026-11-28T10:00:00Z")));
        let req = TriggerRequest { task: Task::Drill, scheduled_for: Some(at("2026-11-28T10:00:00Z")), ..cron(0) };
        l.record_start(&id(1), &req, at("2026-11-28T10:00:00Z"));
        l.record_finish(&id(1), None);
        assert_eq!(l.admit(&req), Admission::AlreadyServed(at("2026-11-28T10:00:00Z")), "one drill per fire time");
        let out =
            l.tick_with_drills(at("2026-11-29T10:00:00Z"), at("2026-11-29T09:55:00Z"), &hourly(), None, Some(&drills));
        assert!(matches!(out, TickOutcome::Start { task: Task::Export, .. }), "{out:?}");
        l.record_start(&id(2), &cron(0), at("2026-11-29T10:00:00Z"));
        l.record_finish(&id(2), None);
        let (task, fire, _) = l.take_catch_up().unwrap();
        assert_eq!((task, fire), (Task::Drill, at("2026-11-29T10:00:00Z")));
    }

    #[test]
    fn the_first_tick_uses_the_trigger_window_and_an_old_ledger_upgrades() {
        let old: Ledger = serde_json::from_value(serde_json::json!({
            "current": null, "jobs": [], "webhooks": [], "last_scheduled_for": "2026-11-28T09:00:00.000Z"
        }))
        .unwrap();
        assert_eq!((old.last_tick, old.missed.len()), (None, 0));
        let mut l = old;
        assert_eq!(
            l.tick(at("2026-11-28T09:30:00Z"), at("2026-11-28T09:25:00Z"), &hourly(), None),
            TickOutcome::NotDue
        );
        assert_eq!(l.last_tick, Some(at("2026-11-28T09:30:00Z")));
    }
}
