//! One Durable Object per source: the single-flight lock and the job runner.
//!
//! Triggers only record the job (and the ledger) in one storage write and arm the alarm; the
//! alarm does the work one step at a time, persisting the job after every step, so an evicted or
//! restarted object resumes where it stopped. Cron ticks also "kick" each object, re-arming the
//! alarm of a job in flight should it ever have been lost.

use std::cell::Cell;
use std::time::Duration;

use serde_json::{json, Value};
use wasm_bindgen::JsValue;
use worker::{
    console_error, console_log, durable_object, DurableObject, Env, Method, Request, RequestInit, Response, State,
    Storage,
};

use super::net::within;
use super::objects::Objects;
use super::store::job_key;
use super::{credentials, jitter, load_config, now, random_bytes, store, transfer, BUCKET, SOURCES};
use crate::config::SourceConfig;
use crate::error::StepError;
use crate::identity::{JobId, Task, Trigger};
use crate::job::{after_sleep, Action, AfterSleep, Context, Event, Job, SliceOutcome};
use crate::ledger::{Admission, AlarmAfterEnd, AlarmWork, Ledger, RetentionAfterEnd, TickOutcome, TriggerRequest};
use crate::status::SourceReport;
use crate::sweep::{SourceRecords, LEFTOVER_PREFIX, UPLOAD_PREFIX};
use crate::time::Timestamp;

const LEDGER: &str = "ledger";
const SOURCE: &str = "source";
/// The UTC day (days since the epoch) of the latest tick that made a daily retention pass due.
const RETENTION_DUE: &str = "retention_due";
/// The UTC day whose daily retention pass has run.
const RETENTION_DONE: &str = "retention_done";
/// Set while a retention pass has more steps to run (each alarm invocation runs one bounded
/// step, `crate::index::StepBudget`).
const RETENTION_MORE: &str = "retention_more";
/// How long one retention pass (listing, reading manifests, deleting) may take.
const RETENTION_TIMEOUT: Duration = Duration::from_secs(300);
/// A safety alarm armed before every step and kept armed while it runs: if the isolate dies
/// mid-step, the job resumes this soon after the object comes back.
const WATCHDOG: Duration = Duration::from_secs(15);

fn rust_err(e: impl std::fmt::Display) -> worker::Error {
    worker::Error::RustError(e.to_string())
}

/// How long a running step may hold the object before a later alarm stops waiting for it. An
/// alarm invocation cannot legitimately run longer than 15 minutes, so a step still "running"
/// after 16 is a future that will never resolve (a call without an answer).
const BUSY_LEASE_MS: f64 = 16.0 * 60.0 * 1000.0;
/// How long one storage read or write of the object may take.
const STORAGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long writing a manifest or a verification record, or one clean-up, may take.
const R2_STEP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long handing a source's waiting alerts to the queue may take, in all.
const ALERTS_FLUSH_TIMEOUT: Duration = Duration::from_secs(20);

/// Runs a storage or R2 call with a time limit; a call that does not answer is an error naming it.
pub(super) async fn bounded<T>(
    limit: Duration,
    what: &str,
    fut: impl std::future::Future<Output = worker::Result<T>>,
) -> worker::Result<T> {
    match super::net::within(limit, fut).await {
        Some(result) => result,
        None => Err(rust_err(format!("{what} did not answer within {} s", limit.as_secs()))),
    }
}

/// The Durable Object class (`SOURCES` binding).
#[durable_object]
pub struct SourceObject {
    state: State,
    env: Env,
    /// In memory only: when the step now running started (an instance that restarted is,
    /// rightly, not busy). Held at most for [`BUSY_LEASE_MS`].
    busy_since: Cell<Option<f64>>,
}

impl DurableObject for SourceObject {
    fn new(state: State, env: Env) -> Self {
        Self { state, env, busy_since: Cell::new(None) }
    }

    async fn fetch(&self, mut req: Request) -> worker::Result<Response> {
        if let Some(name) = req.headers().get("x-ferry-source")? {
            self.remember_source(&name).await?;
        }
        let path = req.path();
        match (req.method(), path.as_str()) {
            (Method::Post, "/trigger") => {
                let body: TriggerRequest = req.json().await?;
                self.trigger(body).await
            }
            (Method::Get, "/status") => self.status().await,
            (Method::Post, "/claim") => {
                let body: Value = req.json().await?;
                self.claim(body).await
            }
            (Method::Post, "/tick") => {
                let body: Value = req.json().await?;
                self.tick(body).await
            }
            (Method::Post, "/retire") => {
                let body: Value = req.json().await?;
                self.retire(body).await
            }
            (Method::Post, "/cancel") => {
                let body: Value = req.json().await?;
                self.cancel(body).await
            }
            (Method::Get, "/retired") => json_response(200, &json!({ "sources": self.retired().await? })),
            (Method::Get, "/leftovers") => self.leftovers().await,
            (Method::Post, "/leftovers/settle") => {
                let body: Value = req.json().await?;
                self.settle(body).await
            }
            (Method::Post, "/sweep") => {
                let body: Value = req.json().await?;
                self.sweep(body).await
            }
            (Method::Get, "/sweeps/latest") => super::sweeper::latest(&self.storage()).await,
            // The source's backup index (`runtime::index`).
            (_, p) if p == "/index" || p.starts_with("/index/") => {
                let name = self.source_name().await?.unwrap_or_default();
                super::index::object_request(&self.storage(), &self.env, &name, req).await
            }
            // Only on a `~budget-…` object: one API token's request budget.
            (_, p) if p.starts_with("/budget/") => super::budget::object_request(&self.storage(), req).await,
            // Only on the `~alerts` object: the record of alert delivery attempts.
            (_, p) if p.starts_with("/alerts/") => super::alerts::object_request(&self.storage(), req).await,
            (Method::Get, p) if p.starts_with("/job/") => match JobId::parse(&p["/job/".len()..]) {
                Some(id) => match self.load_job(&id).await? {
                    Some(job) => {
                        let mut shown = job.public_json();
                        if let Some(progress) = job.progress(now()) {
                            shown["progress"] = serde_json::to_value(progress).map_err(rust_err)?;
                        }
                        Response::from_json(&shown)
                    }
                    None => Response::error("no such job", 404),
                },
                None => Response::error("no such job", 404),
            },
            _ => Response::error("not found", 404),
        }
    }

    async fn alarm(&self) -> worker::Result<Response> {
        let started = js_sys::Date::now();
        if let Some(since) = self.busy_since.get() {
            if started - since < BUSY_LEASE_MS {
                // A step is still running in this instance: keep the watchdog armed; the step
                // re-arms the real alarm when it ends.
                self.storage().set_alarm(WATCHDOG).await?;
                return Response::ok("busy");
            }
            console_error!("a step has held this source for over 16 minutes; its lease expired, running again");
        }
        self.busy_since.set(Some(started));
        let result = self.run().await;
        if self.busy_since.get() == Some(started) {
            self.busy_since.set(None);
        }
        // A job that ended left its alerts in the outbox; the next job is already armed.
        self.flush_alerts().await;
        if let Err(e) = &result {
            console_error!("alarm: {e}");
            // Storage or R2 failed outside any step: try again shortly rather than lose the job.
            let _ = self.storage().set_alarm(Duration::from_secs(5)).await;
        }
        Response::ok("ok")
    }
}

impl SourceObject {
    fn storage(&self) -> Storage {
        self.state.storage()
    }

    async fn remember_source(&self, name: &str) -> worker::Result<()> {
        if self.storage().get::<String>(SOURCE).await?.as_deref() != Some(name) {
            self.storage().put(SOURCE, name.to_string()).await?;
        }
        Ok(())
    }

    async fn source_name(&self) -> worker::Result<Option<String>> {
        match self.storage().get::<String>(SOURCE).await? {
            Some(n) => Ok(Some(n)),
            None => Ok(self.state.id().name()),
        }
    }

    async fn load_ledger(&self) -> worker::Result<Ledger> {
        match bounded(STORAGE_TIMEOUT, "reading the ledger", self.storage().get::<String>(LEDGER)).await? {
            Some(text) => serde_json::from_str(&text).map_err(|e| rust_err(format!("ledger: {e}"))),
            None => Ok(Ledger::default()),
        }
    }

    async fn load_job(&self, id: &JobId) -> worker::Result<Option<Job>> {
        match bounded(STORAGE_TIMEOUT, "reading a job", self.storage().get::<String>(&job_key(id))).await? {
            Some(text) => serde_json::from_str(&text).map(Some).map_err(|e| rust_err(format!("job: {e}"))),
            None => Ok(None),
        }
    }

    async fn save_ledger(&self, ledger: &Ledger) -> worker::Result<()> {
        let text = serde_json::to_string(ledger).map_err(rust_err)?;
        bounded(STORAGE_TIMEOUT, "saving the ledger", self.storage().put(LEDGER, text)).await
    }

    /// Writes the job and the ledger together (one implicit transaction).
    async fn save(&self, job: &Job, ledger: Option<&Ledger>) -> worker::Result<()> {
        let mut entries = vec![(job_key(&job.id), serde_json::to_string(job).map_err(rust_err)?)];
        if let Some(l) = ledger {
            entries.push((LEDGER.to_string(), serde_json::to_string(l).map_err(rust_err)?));
        }
        // Two keys: one call, so the job and the ledger change together.
        let batches = crate::transfer::storage_batches(entries);
        bounded(STORAGE_TIMEOUT, "saving the job", store::put_batches(&self.storage(), batches)).await
    }

    fn source_config(&self, name: &str) -> Result<SourceConfig, String> {
        let config = load_config(&self.env).map_err(|e| e.to_string())?;
        config.source(name).cloned().ok_or_else(|| format!("source {name:?} is no longer configured"))
    }

    async fn trigger(&self, req: TriggerRequest) -> worker::Result<Response> {
        let Some(name) = self.source_name().await? else { return Response::error("unknown source", 400) };
        let source = match self.source_config(&name) {
            Ok(s) => s,
            Err(e) => return json_response(500, &json!({ "error": e })),
        };
        let mut ledger = self.load_ledger().await?;
        let backup = match named_backup(&name, &req) {
            Ok(b) => b,
            Err(e) => return json_response(400, &json!({ "error": e })),
        };
        // A restore or drill is checked (confirm field and all) before anything is touched.
        let restore = match req.task {
            Task::Restore | Task::Drill => match crate::restore::plan(req.task, &source, &req.params, backup.clone()) {
                Ok(state) => Some(state),
                Err(e) => return json_response(400, &json!({ "error": e })),
            },
            Task::Export | Task::Verify | Task::Replicate => None,
        };
        match ledger.admit(&req) {
            Admission::Start => {
                let job = self.start(&mut ledger, &source, &req, backup, None, restore).await?;
                json_response(202, &json!({ "job": job.public_json() }))
            }
            Admission::Replay(id) => {
                let job = self.load_job(&id).await?.map(|j| j.public_json());
                let mut resp = json_response(202, &json!({ "job": job, "replayed": true }))?;
                resp.headers_mut().set("idempotent-replayed", "true")?;
                Ok(resp)
            }
            Admission::Busy(id) => json_response(
                409,
                &json!({ "error": format!("source {name:?} already has a job in flight"), "job_id": id }),
            ),
            Admission::AlreadyServed(at) => {
                json_response(200, &json!({ "skipped": format!("the fire time {at} was already served") }))
            }
        }
    }

    /// Creates the job `req` asks for, makes it current and arms its alarm; saves the ledger.
    async fn start(
        &self,
        ledger: &mut Ledger,
        source: &SourceConfig,
        req: &TriggerRequest,
        backup: Option<String>,
        catch_up: Option<String>,
        restore: Option<crate::restore::RestoreState>,
    ) -> worker::Result<Job> {
        let now = now();
        let mut job = Job::with_params(
            JobId::from_random(random_bytes()),
            source,
            req.trigger,
            req.webhook_id.clone(),
            req.scheduled_for,
            req.params.clone(),
            now,
        );
        if req.task == Task::Verify {
            job = job.verify_of(backup);
        }
        // A scheduled drill (or its catch-up) plans itself: a drill needs no confirmation. One
        // that cannot be planned is still a drill job, and fails as one with the reason.
        job = match restore {
            Some(state) => job.restore_of(req.task, state),
            None if matches!(req.task, Task::Drill | Task::Restore) => {
                job.planned(req.task, crate::restore::plan(req.task, source, &req.params, None))
            }
            None => job,
        };
        job.catch_up = catch_up;
        let evicted = ledger.record_start(&job.id, req, now);
        self.save(&job, Some(ledger)).await?;
        if !evicted.is_empty() {
            store::delete_keys(&self.storage(), evicted.iter().map(job_key).collect()).await?;
        }
        self.storage().set_alarm(now.to_datetime()).await?;
        Ok(job)
    }

    /// Starts the catch-up job for fire times missed while the source was busy, if it is free.
    async fn start_catch_up(&self, ledger: &mut Ledger, source: &SourceConfig) -> worker::Result<Option<Job>> {
        let Some((task, fire, note)) = ledger.take_catch_up() else { return Ok(None) };
        let req = TriggerRequest {
            trigger: Trigger::Cron,
            webhook_id: None,
            scheduled_for: Some(fire),
            params: json!({}),
            task,
        };
        self.start(ledger, source, &req, None, Some(note), None).await.map(Some)
    }

    /// A cron tick (see [`Self::process_tick`]), then the alerts it raised or that still wait.
    async fn tick(&self, body: Value) -> worker::Result<Response> {
        let response = self.process_tick(body).await;
        self.flush_alerts().await;
        response
    }

    /// Hands the ledger's waiting alert events to the queue, within a time limit. Failures are
    /// logged (and recorded by `alerts::enqueue`), never returned: alerts cannot fail a job.
    async fn flush_alerts(&self) {
        match within(ALERTS_FLUSH_TIMEOUT, self.try_flush_alerts()).await {
            Some(Ok(())) => {}
            Some(Err(e)) => console_error!("alerts: {e}"),
            None => console_error!("alerts: queuing did not finish within {} s", ALERTS_FLUSH_TIMEOUT.as_secs()),
        }
    }

    async fn try_flush_alerts(&self) -> worker::Result<()> {
        let waiting = self.load_ledger().await?.alerts.outbox;
        if waiting.is_empty() {
            return Ok(());
        }
        let done = super::alerts::enqueue(&self.env, &waiting).await;
        if done.is_empty() {
            return Ok(());
        }
        // Fresh: a trigger or tick may have written the ledger while the queue was called.
        let mut ledger = self.load_ledger().await?;
        ledger.alerts.sent(&done);
        self.save_ledger(&ledger).await
    }

    /// A cron tick: raises `stale` when the source's health is red at the tick's time (once per
    /// episode); starts what is due since the source's last processed tick (one coalesced job),
    /// or keeps it for when the source is free; and makes sure a job in flight has its alarm.
    async fn process_tick(&self, body: Value) -> worker::Result<Response> {
        let (Some(tick), Some(trigger_start)) = (
            body["tick"].as_str().and_then(Timestamp::parse_rfc3339),
            body["trigger_start"].as_str().and_then(Timestamp::parse_rfc3339),
        ) else {
            return Response::error("bad tick", 400);
        };
        let Some(name) = self.source_name().await? else { return Response::error("unknown source", 400) };
        let source = match self.source_config(&name) {
            Ok(s) => s,
            Err(e) => return json_response(500, &json!({ "error": e })),
        };
        let daily_pass = self.note_daily_pass(&source, tick).await?;
        let mut ledger = self.load_ledger().await?;
        let outcome = ledger.tick_with_drills(
            tick,
            trigger_start,
            &source.schedule,
            source.verify_schedule.as_ref(),
            source.drill_schedule.as_ref(),
        );
        if let Some(stale) = ledger.check_stale(&source, tick) {
            console_error!("{name}: stale: {}", stale.reason.as_deref().unwrap_or_default());
        }
        let line = match outcome {
            TickOutcome::Start { task, fires, catch_up } => {
                let req = TriggerRequest {
                    trigger: Trigger::Cron,
                    webhook_id: None,
                    scheduled_for: Some(fires.latest),
                    params: json!({}),
                    task,
                };
                let note = catch_up.as_deref().map(|n| format!(" ({n})")).unwrap_or_default();
                let job = self.start(&mut ledger, &source, &req, None, catch_up.clone(), None).await?;
                return json_response(
                    202,
                    &json!({ "line": format!("due at {}: started {task:?} job {}{note}", fires.latest, job.id) }),
                );
            }
            TickOutcome::Deferred { busy_with, missed } => format!(
                "due at {}: job {busy_with} is still in flight; it runs as a catch-up when that job ends",
                missed.fires.latest
            ),
            TickOutcome::NotDue => "not due".to_string(),
            TickOutcome::AlreadyProcessed(at) => format!("the tick at {at} was already processed"),
        };
        self.save_ledger(&ledger).await?;
        let state = self.kick(&mut ledger).await?;
        if daily_pass && self.storage().get_alarm().await?.is_none() {
            // Idle: the alarm runs the day's retention pass (a job in flight runs it when it ends).
            self.storage().set_alarm(Duration::from_millis(1)).await?;
        }
        json_response(200, &json!({ "line": format!("{line} ({state})") }))
    }

    /// On the one deliveries object: records which source a webhook delivery id started, so the
    /// same signed delivery cannot start another source's job. Ids live for two days, far longer
    /// than a signature's ±5 minute window.
    async fn claim(&self, body: Value) -> worker::Result<Response> {
        let (Some(id), Some(source)) = (body["id"].as_str(), body["source"].as_str()) else {
            return Response::error("bad claim", 400);
        };
        let day = ((js_sys::Date::now() / 86_400_000.0) as i64).max(2);
        for d in [day, day - 1] {
            if let Some(owner) = self.storage().get::<String>(&format!("delivery:{d}:{id}")).await? {
                if owner != source {
                    return json_response(409, &json!({ "owner": owner }));
                }
                return json_response(200, &json!({ "owner": owner }));
            }
        }
        self.storage().put(&format!("delivery:{day}:{id}"), source.to_string()).await?;
        store::delete_prefix(&self.storage(), &format!("delivery:{}:", day - 2)).await?;
        json_response(200, &json!({ "owner": source }))
    }

    /// `POST /v1/jobs/{id}/cancel`, on the job's source: 404 for an unknown job, 409 for one that
    /// has ended; otherwise the request is recorded next to the job (never in its record, which
    /// a running step rewrites) and the job is woken: it stops at its next step.
    async fn cancel(&self, body: Value) -> worker::Result<Response> {
        let Some(id) = body["job_id"].as_str().and_then(JobId::parse) else {
            return Response::error("bad cancel", 400);
        };
        let Some(job) = self.load_job(&id).await? else {
            return json_response(404, &json!({ "error": format!("no job {id}") }));
        };
        if let Err(e) = job.cancellable() {
            return json_response(409, &json!({ "error": e, "job_id": id }));
        }
        let request = json!({ "by": body["by"], "reason": body["reason"] }).to_string();
        bounded(STORAGE_TIMEOUT, "recording the cancel", self.storage().put(&cancel_key(&id), request)).await?;
        self.storage().set_alarm(Duration::from_millis(1)).await?;
        json_response(202, &json!({ "job_id": id, "cancelling": true, "phase": job.phase }))
    }

    /// The cancel request waiting for job `id`, as the event that stops it.
    async fn pending_cancel(&self, id: &JobId) -> worker::Result<Option<Event>> {
        let (storage, key) = (self.storage(), cancel_key(id));
        let read = bounded(STORAGE_TIMEOUT, "reading a cancel request", storage.get::<String>(&key)).await?;
        let Some(text) = read else { return Ok(None) };
        let v: Value = serde_json::from_str(&text).unwrap_or_default();
        let by = v["by"].as_str().unwrap_or("api").to_string();
        Ok(Some(Event::Cancel { by, reason: v["reason"].as_str().map(str::to_string) }))
    }

    /// On the one registry of retired sources: remembers a source name whose job was stopped
    /// because the source left the config, so its jobs stay findable by id.
    async fn retire(&self, body: Value) -> worker::Result<Response> {
        let Some(source) = body["source"].as_str() else { return Response::error("bad retire", 400) };
        let mut names = self.retired().await?;
        if !names.iter().any(|n| n == source) {
            names.push(source.to_string());
            let excess = names.len().saturating_sub(MAX_RETIRED);
            names.drain(..excess);
            self.storage().put(RETIRED_KEY, names).await?;
        }
        json_response(200, &json!({ "retired": source }))
    }

    async fn retired(&self) -> worker::Result<Vec<String>> {
        Ok(self.storage().get::<Vec<String>>(RETIRED_KEY).await?.unwrap_or_default())
    }

    async fn status(&self) -> worker::Result<Response> {
        let ledger = self.load_ledger().await?;
        let last = match ledger.last_job() {
            Some(id) => self.load_job(id).await?,
            None => None,
        };
        let current = match &ledger.current {
            Some(id) if last.as_ref().is_some_and(|j| &j.id == id) => last.clone(),
            Some(id) => self.load_job(id).await?,
            None => None,
        };
        let Some(name) = self.source_name().await? else { return Response::error("unknown source", 400) };
        let source = match self.source_config(&name) {
            Ok(s) => s,
            Err(e) => return json_response(404, &json!({ "error": e })),
        };
        let report = SourceReport::new(&ledger, current.as_ref(), last.as_ref(), &source, now());
        let mut body = serde_json::to_value(&report).map_err(rust_err)?;
        body["current_job_id"] = json!(ledger.current);
        json_response(200, &body)
    }

    /// Makes sure work in flight or queued has its alarm (recovers lost alarms); says which.
    async fn kick(&self, ledger: &mut Ledger) -> worker::Result<&'static str> {
        if ledger.current.is_none() && ledger.start_next().is_some() {
            self.save_ledger(ledger).await?;
        }
        if ledger.current.is_none() && !ledger.missed.is_empty() {
            // A catch-up whose start was lost: the alarm starts it.
            self.storage().set_alarm(Duration::from_millis(1)).await?;
            return Ok("catch-up pending");
        }
        if ledger.current.is_some() && self.storage().get_alarm().await?.is_none() {
            self.storage().set_alarm(Duration::from_millis(1)).await?;
            return Ok("re-armed the alarm of the job in flight");
        }
        Ok(if ledger.current.is_some() { "job in flight" } else { "idle" })
    }

    /// Records that a tick at `tick` makes the day's retention pass due (at most one a UTC day, for
    /// a source with a policy); returns whether a pass is pending.
    async fn note_daily_pass(&self, source: &SourceConfig, tick: Timestamp) -> worker::Result<bool> {
        if source.retention.is_none() {
            return Ok(false);
        }
        let storage = self.storage();
        let done = bounded(STORAGE_TIMEOUT, "reading the retention day", storage.get::<i64>(RETENTION_DONE)).await?;
        let day = crate::retention::utc_day(tick);
        if crate::retention::daily_pass_due(done, tick)
            && bounded(STORAGE_TIMEOUT, "reading the retention day", storage.get::<i64>(RETENTION_DUE)).await?
                != Some(day)
        {
            bounded(STORAGE_TIMEOUT, "noting the retention pass", storage.put(RETENTION_DUE, day)).await?;
        }
        self.daily_pass_pending().await
    }

    /// Whether a tick made a daily retention pass due that has not run.
    async fn daily_pass_pending(&self) -> worker::Result<bool> {
        let storage = self.storage();
        let due = bounded(STORAGE_TIMEOUT, "reading the retention day", storage.get::<i64>(RETENTION_DUE)).await?;
        let done = bounded(STORAGE_TIMEOUT, "reading the retention day", storage.get::<i64>(RETENTION_DONE)).await?;
        let more = bounded(STORAGE_TIMEOUT, "reading the retention step", storage.get::<bool>(RETENTION_MORE)).await?;
        Ok(more == Some(true) || due.is_some_and(|due| done.is_none_or(|done| due > done)))
    }

    /// Leaves a retention pass to the next alarm invocation, a step of its own within its own
    /// per-invocation limits.
    async fn defer_retention(&self) {
        let storage = self.storage();
        let defer = async {
            storage.put(RETENTION_MORE, true).await?;
            storage.set_alarm(Duration::from_millis(1)).await
        };
        if let Err(e) = bounded(STORAGE_TIMEOUT, "deferring the retention pass", defer).await {
            console_error!("retention: deferring the pass failed: {e}; the daily pass runs it");
        }
    }

    /// Applies the source's retention policy (see `runtime::retention`). Never fails and never
    /// holds a job for long: errors are logged, and the pass is bounded by [`RETENTION_TIMEOUT`].
    /// Any pass serves the daily one that is due. With `replica_too` (the daily pass) the replica
    /// bucket gets its pass as well (otherwise it gets one after each replica commits).
    async fn retention_pass(&self, source: &SourceConfig, why: &str, replica_too: bool) {
        let name = &source.name;
        let budget = match super::index::budget(&self.env) {
            Ok(b) => b,
            Err(e) => {
                console_error!("retention of {name} ({why}): not run: {e}");
                return;
            }
        };
        let mut more = false;
        if let (true, Some(_), Some(replica)) = (replica_too, &source.retention, &source.replica) {
            match (super::objects::replica(&self.env, replica), self.env.bucket(BUCKET)) {
                (Ok(copy), Ok(primary)) => more |= self.replica_retention_pass(source, &copy, &primary).await,
                (Err(e), _) => console_error!("retention of {name}'s replica ({why}): {e}"),
                (_, Err(e)) => console_error!("retention of {name}'s replica ({why}): no bucket {BUCKET}: {e}"),
            }
        }
        if source.retention.is_some() {
            match self.env.bucket(BUCKET) {
                Ok(bucket) => match within(
                    RETENTION_TIMEOUT,
                    super::retention::apply(&bucket, &self.storage(), source, now(), budget),
                )
                .await
                {
                    Some(Ok(Some(a))) if a.rebuilding => {
                        more = true;
                        console_log!("retention of {name} ({why}): the backup index is being rebuilt; the pass waits");
                    }
                    Some(Ok(Some(a))) => {
                        more |= a.more;
                        console_log!(
                            "retention of {name} ({why}): kept {}, deleted {} {:?}{}{}{}{}",
                            a.kept,
                            a.deleted.len(),
                            a.deleted,
                            if a.pinned_meanwhile.is_empty() {
                                String::new()
                            } else {
                                format!("; pinned meanwhile, kept: {:?}", a.pinned_meanwhile)
                            },
                            if a.unreadable.is_empty() {
                                String::new()
                            } else {
                                format!("; unreadable manifests, kept: {:?}", a.unreadable)
                            },
                            if a.failed.is_empty() { String::new() } else { format!("; FAILED: {:?}", a.failed) },
                            if a.more { "; more in the next step" } else { "" },
                        );
                    }
                    Some(Ok(None)) => {}
                    Some(Err(e)) => console_error!("retention of {name} ({why}) failed: {e}"),
                    None => console_error!(
                        "retention of {name} ({why}) did not finish within {} s; the next pass goes on",
                        RETENTION_TIMEOUT.as_secs()
                    ),
                },
                Err(e) => console_error!("retention of {name} ({why}): no bucket: {e}"),
            }
        }
        if more {
            // The next alarm invocation runs the next step; the day's pass is not over.
            self.defer_retention().await;
            return;
        }
        let storage = self.storage();
        let settle = async {
            storage.delete(RETENTION_MORE).await?;
            if let Some(due) = storage.get::<i64>(RETENTION_DUE).await? {
                storage.put(RETENTION_DONE, due).await?;
                storage.delete(RETENTION_DUE).await?;
            }
            Ok::<(), worker::Error>(())
        };
        if let Err(e) = bounded(STORAGE_TIMEOUT, "recording the retention pass", settle).await {
            console_error!("retention of {name}: recording the pass failed: {e}");
        }
    }

    /// What the sweeper needs from this source: its open uploads, its failed clean-ups, and the
    /// jobs in flight or queued (whose folders and uploads it must not touch).
    async fn leftovers(&self) -> worker::Result<Response> {
        let ledger = self.load_ledger().await?;
        fn parse<T: serde::de::DeserializeOwned>(entries: Vec<(String, String)>) -> Vec<T> {
            entries.into_iter().filter_map(|(_, text)| serde_json::from_str(&text).ok()).collect()
        }
        let records = SourceRecords {
            source: self.source_name().await?.unwrap_or_default(),
            uploads: parse(store::list_texts(&self.storage(), UPLOAD_PREFIX).await?),
            leftovers: parse(store::list_texts(&self.storage(), LEFTOVER_PREFIX).await?),
            in_flight: ledger.current.iter().chain(ledger.queue.iter()).map(JobId::to_string).collect(),
            in_flight_folders: self.replica_folders_in_flight(&ledger).await,
        };
        Response::from_json(&records)
    }

    /// The folders the replicate jobs in flight or queued write in their replica bucket (named
    /// after the export, not after them).
    async fn replica_folders_in_flight(&self, ledger: &Ledger) -> Vec<String> {
        let mut folders = Vec::new();
        for id in ledger.current.iter().chain(ledger.queue.iter()) {
            if let Ok(Some(job)) = self.load_job(id).await {
                if let Some(replica) = job.replica() {
                    folders.push(replica.folder());
                }
            }
        }
        folders
    }

    /// Forgets the records the sweeper settled (only upload and leftover records).
    async fn settle(&self, body: Value) -> worker::Result<Response> {
        let keys: Vec<String> = body["keys"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect::<Vec<_>>())
            .unwrap_or_default()
            .into_iter()
            .filter(|k| k.starts_with(UPLOAD_PREFIX) || k.starts_with(LEFTOVER_PREFIX))
            .collect();
        store::delete_keys(&self.storage(), keys.clone()).await?;
        json_response(200, &json!({ "settled": keys.len() }))
    }

    /// On the sweeper object: one cron tick of the daily sweep (under the sweeper's lease, see
    /// `runtime::sweeper::tick`).
    async fn sweep(&self, body: Value) -> worker::Result<Response> {
        let now = Timestamp::from_millis(body["now"].as_i64().unwrap_or_else(|| super::now().millis()));
        let sources: Vec<String> = body["sources"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default();
        // Every replica bucket the config names (R2 or S3) is walked after the primary one.
        let replicas: Vec<String> = load_config(&self.env)
            .map(|c| c.sources.iter().filter_map(|s| s.replica.as_ref().map(|r| r.name())).collect())
            .unwrap_or_default();
        let storage = self.storage();
        let tick = super::sweeper::tick(&storage, &self.env, now, sources, replicas);
        let line = super::sweeper::leased(&storage, tick).await;
        json_response(200, &json!({ "line": line }))
    }

    /// Deletes the part records of a job's copies once it has ended (best effort: a leftover is
    /// only a small storage entry).
    async fn forget_part_records(&self, id: &JobId) {
        let prefix = crate::transfer::job_parts_prefix(id.as_str());
        if let Err(e) = store::delete_prefix(&self.storage(), &prefix).await {
            console_error!("job {id}: deleting its part records failed: {e}");
        }
    }

    /// Fails a job that cannot run at all (a replicate job whose bucket is not bound), touching
    /// no bucket, and moves on to the source's next job.
    async fn stop_unrunnable(&self, job: Job, reason: String) -> worker::Result<()> {
        let (failed, _) = job.abandon(reason, now());
        let mut ledger = self.load_ledger().await?;
        ledger.record_finish(&failed.id, None);
        ledger.remember(&failed);
        ledger.start_next();
        self.save(&failed, Some(&ledger)).await?;
        self.forget_part_records(&failed.id).await;
        console_error!("job {}: failed: {}", failed.id, failed.error.as_deref().unwrap_or_default());
        if ledger.current.is_some() || !ledger.missed.is_empty() {
            self.storage().set_alarm(Duration::from_millis(1)).await?;
        }
        Ok(())
    }

    /// Applies the source's retention policy to its replica bucket, after a replica committed:
    /// the same policy, planned from the replica's own manifests (so the copy outlives a lost
    /// primary), with the primary's pins and verification records counting for both. Bounded and
    /// never failing, like [`Self::retention_pass`].
    /// Returns whether more deletions wait for a next step.
    async fn replica_retention_pass(&self, source: &SourceConfig, replica: &Objects, primary: &worker::Bucket) -> bool {
        let name = &source.name;
        let budget = match super::index::budget(&self.env) {
            Ok(b) => b,
            Err(e) => {
                console_error!("retention of {name}'s replica: not run: {e}");
                return false;
            }
        };
        let marks = Objects::from(primary);
        let pass = super::retention::apply_to(replica, Some(&marks), source, now(), budget);
        match within(RETENTION_TIMEOUT, pass).await {
            Some(Ok(Some(a))) => {
                console_log!(
                    "retention of {name}'s replica: kept {}, deleted {} {:?}{}{}",
                    a.kept,
                    a.deleted.len(),
                    a.deleted,
                    if a.failed.is_empty() { String::new() } else { format!("; FAILED: {:?}", a.failed) },
                    if a.more { "; more in the next step" } else { "" },
                );
                return a.more;
            }
            Some(Ok(None)) => {}
            Some(Err(e)) => console_error!("retention of {name}'s replica failed: {e}"),
            None => console_error!(
                "retention of {name}'s replica did not finish within {} s; the next replica's pass goes on",
                RETENTION_TIMEOUT.as_secs()
            ),
        }
        false
    }

    /// Runs the job in flight until it sleeps or ends.
    async fn run(&self) -> worker::Result<()> {
        let mut ledger = self.load_ledger().await?;
        let id = match ledger.on_alarm() {
            AlarmWork::Job(id) => id,
            AlarmWork::CatchUp => {
                // A catch-up is waiting for a free source (its start was lost): start it now.
                if let Some(source) = self.source_name().await?.and_then(|name| self.source_config(&name).ok()) {
                    self.start_catch_up(&mut ledger, &source).await?;
                }
                return Ok(());
            }
            AlarmWork::RetentionIfDue => {
                if self.daily_pass_pending().await? {
                    if let Some(source) = self.source_name().await?.and_then(|name| self.source_config(&name).ok()) {
                        self.retention_pass(&source, "daily pass", true).await;
                    }
                }
                return Ok(());
            }
        };
        let Some(mut job) = self.load_job(&id).await? else {
            console_error!("job {id} has no record; releasing the source");
            ledger.record_finish(&id, None);
            return self.save_ledger(&ledger).await;
        };
        let name = job.source.clone();
        let config = match load_config(&self.env) {
            Ok(c) => c,
            Err(e) => {
                // Without a valid config nothing can run; check again in a minute.
                console_error!("job {id}: {e}");
                self.storage().set_alarm(Duration::from_secs(60)).await?;
                return Ok(());
            }
        };
        let Some(source) = config.source(&name).cloned() else {
            // The source was removed or renamed: stop its job for good, clean up, free the object.
            let reason = format!(
                "source {name:?} is no longer configured (removed or renamed); the job was stopped and its \
                 unfinished files removed"
            );
            let (failed, action) = job.abandon(reason, now());
            ledger.abandoned(&failed);
            self.save(&failed, Some(&ledger)).await?;
            self.forget_part_records(&failed.id).await;
            if let Action::Discard { folder, upload } = action {
                // A replicate job's folder is in its replica bucket: the primary's is a backup.
                let snapshot = failed.config.as_ref().and_then(|c| c.replica.as_ref());
                let target = match failed.bucket_binding() {
                    None => self.env.bucket(BUCKET).map(Objects::R2).map_err(|e| format!("no bucket {BUCKET}: {e}")),
                    Some(name) => super::objects::named_as(&self.env, name, snapshot),
                };
                match target {
                    Ok(bucket) => {
                        if let Err(e) = store::discard(&bucket, &self.storage(), &failed.id, &folder, upload).await {
                            console_error!("job {id}: cleaning {folder} failed: {e}");
                        }
                    }
                    Err(e) => console_error!("job {id}: cleaning {folder}: {e}"),
                }
            }
            console_error!("job {id}: {}", failed.error.as_deref().unwrap_or_default());
            if let Err(e) = retire_source(&self.env, &name).await {
                console_error!("job {id}: recording {name:?} as retired failed: {e}");
            }
            self.storage().delete_alarm().await?;
            return Ok(());
        };
        // Every step runs with the settings the job started with (its snapshot); only the
        // secrets' values are read fresh, by the names in that snapshot.
        let source = job.settings(&source).clone();
        let mut names: Vec<String> = source.secret_names().into_iter().map(str::to_string).collect();
        names.extend(job.provider().map(|p| p.member_secret_names(&source.provider)).unwrap_or_default());
        let creds = credentials(&self.env, &names.iter().map(String::as_str).collect::<Vec<_>>());
        let primary = self.env.bucket(BUCKET)?;
        // Where the job writes: the primary bucket, or a replicate job's replica bucket (as the
        // job's settings describe it).
        let target = match job.bucket_binding() {
            None => Objects::R2(primary.clone()),
            Some(name) => match super::objects::named_as(&self.env, name, source.replica.as_ref()) {
                Ok(objects) => objects,
                Err(reason) => return self.stop_unrunnable(job, reason).await,
            },
        };
        // The manifest the job just wrote, for the replicate job queued after it.
        let mut committed: Option<(String, crate::manifest::Manifest)> = None;
        let mut event = Event::Wake;
        let mut steps = 0;
        let mut sliced = false;
        let seen = ledger.copied.clone();
        loop {
            let now = now();
            if matches!(event, Event::Wake) && job.cancelled.is_none() {
                // A cancel request stops the job at this step.
                if let Some(cancel) = self.pending_cancel(&job.id).await? {
                    event = cancel;
                }
            }
            let cx = Context { now, jitter: jitter(), source: &source, creds: &creds, seen: &seen };
            let (next, action) = job.handle(event, &cx);
            job = next;
            if matches!(action, Action::Spawn(_)) {
                // Persisted below, together with its children, so a crash cannot lose them.
            } else if job.phase.is_terminal() {
                // The core decides what follows (the second copy of a committed export) and how
                // the book closes; the shell stores the follow-up's record first, so the ledger
                // never names a job that does not exist, then the job with the ledger in one write.
                let follow_up = job.replica_after(committed.as_ref(), &source, JobId::from_random(random_bytes()), now);
                if let Some(next) = &follow_up {
                    self.save(next, None).await?;
                }
                // Fresh: a tick may have recorded missed fire times while this job ran.
                ledger = self.load_ledger().await?;
                let replica = follow_up.map(|next| next.head.id);
                let evicted = ledger.close(&mut job, replica.as_ref());
                self.save(&job, Some(&ledger)).await?;
                if !evicted.is_empty() {
                    store::delete_keys(&self.storage(), evicted.iter().map(job_key).collect()).await?;
                }
                if let Some(id) = replica {
                    console_log!("job {}: committed; queued replicate job {id}", job.id);
                }
                self.forget_part_records(&job.id).await;
                if let Err(e) = self.storage().delete(&cancel_key(&job.id)).await {
                    console_error!("job {}: forgetting its cancel request failed: {e}", job.id);
                }
            } else {
                self.save(&job, None).await?;
            }
            if action.may_hang() {
                self.storage().set_alarm(now.plus(WATCHDOG).to_datetime()).await?;
            }
            event = match action {
                Action::Send(req) => super::budget::send(&self.env, &source, &creds, job.budget_need(), &req).await,
                Action::CopySlice(order) => {
                    // One slice per invocation: each gets the platform's budgets afresh.
                    sliced = true;
                    let storage = self.storage();
                    // The slice raises its own limit once its copy turns out unable to resume.
                    let limit = std::cell::Cell::new(order.settings.slice_limit(order.state.no_ranges));
                    let ordered = order.state.clone();
                    let slice = transfer::run_slice(&target, &primary, &storage, &mut job, *order, &limit);
                    let event = match super::net::within_limit(&limit, slice).await {
                        Some(event) => event,
                        None => {
                            // A call inside the slice never answered. Go on from what the slice
                            // persisted; the job's watchdog counts it like any failed slice.
                            let persisted =
                                self.load_job(&id).await?.and_then(|j| j.copy().cloned()).unwrap_or(ordered);
                            let message =
                                format!("a slice did not finish within {} s; it was given up", limit.get().as_secs());
                            Event::Sliced {
                                state: persisted,
                                outcome: SliceOutcome::Failed(StepError::transient(message)),
                            }
                        }
                    };
                    if let Event::Sliced { outcome: SliceOutcome::Finished(artifact), .. } = &event {
                        // Wasm memory never shrinks, so its size is the peak this isolate needed.
                        let wasm_mib = (core::arch::wasm32::memory_size(0) as u64 * 65_536) >> 20;
                        console_log!(
                            "job {}: stored {} ({} bytes, {} parts; wasm memory {} MiB)",
                            job.id,
                            artifact.key,
                            artifact.size,
                            artifact.parts,
                            wasm_mib
                        );
                    }
                    event
                }
                Action::VerifySlice { state, settings } => {
                    sliced = true;
                    let limit = settings.slice_limit(false);
                    let ordered = (*state).clone();
                    match within(limit, super::verify::run_slice(&primary, &job.source, *state, settings)).await {
                        Some(event) => event,
                        None => Event::VerifySliced {
                            state: ordered,
                            outcome: Err(StepError::transient(format!(
                                "a verify slice did not finish within {} s",
                                limit.as_secs()
                            ))),
                        },
                    }
                }
                Action::Restore(io) => {
                    sliced = true;
                    Event::RestoreIo(match *io {
                        crate::restore::Io::GraphLoad(order) => {
                            Ok(super::graph_load::run(&primary, &self.storage(), *order).await)
                        }
                        io => super::restore::perform(&primary, &job.source, io).await,
                    })
                }
                Action::RecordVerification { key, record } => {
                    match within(R2_STEP_TIMEOUT, store::put_json(&primary, &key, &record)).await {
                        Some(Ok(())) => {
                            super::index::record_verification(&self.storage(), &key, &record).await;
                            Event::Recorded
                        }
                        Some(Err(e)) => Event::CommitFailed(e),
                        None => Event::CommitFailed(timed_out("writing the verification record")),
                    }
                }
                Action::Commit { key, mut manifest } => {
                    let storage = self.storage();
                    let written = async {
                        // The job's record keeps no part hashes: its copies' part records have them.
                        store::fill_part_hashes(&storage, job.id.as_str(), &mut manifest).await?;
                        store::write_manifest(&target, &key, &manifest).await
                    };
                    match within(R2_STEP_TIMEOUT, written).await {
                        Some(Ok(())) => {
                            super::index::record_commit(&self.storage(), &key, &manifest).await;
                            committed = Some((key, *manifest));
                            Event::Committed
                        }
                        Some(Err(e)) => Event::CommitFailed(e),
                        None => Event::CommitFailed(timed_out("writing the manifest")),
                    }
                }
                Action::CommitReplica { key, mut manifest } => {
                    let primary_key = manifest.replica_of.manifest_key.clone();
                    let written = async {
                        // The job's record keeps no part hashes: the primary manifest has them.
                        let Some(copied) = store::read_manifest(&primary, &primary_key).await else {
                            return Err(format!("the primary manifest {primary_key} could not be read"));
                        };
                        crate::transfer::copy_part_hashes(&mut manifest.manifest.artifacts, &copied.artifacts);
                        store::put_json(&target, &key, &manifest).await
                    };
                    match within(R2_STEP_TIMEOUT, written).await {
                        Some(Ok(())) => Event::Committed,
                        Some(Err(e)) => Event::CommitFailed(format!("{e} (replica manifest)")),
                        None => Event::CommitFailed(timed_out("writing the replica's manifest")),
                    }
                }
                Action::ProbeReplica(probe) => {
                    // `bucket` is the replica's binding here (a replicate job's only writer).
                    match within(R2_STEP_TIMEOUT, super::replica::probe(&target, &primary, &probe)).await {
                        Some(answer) => Event::ReplicaProbed(answer),
                        None => {
                            Event::ReplicaProbed(Err(StepError::transient(timed_out("probing the replica bucket"))))
                        }
                    }
                }
                Action::Spawn(children) => {
                    let now = super::now();
                    let members: Vec<String> = children.iter().filter_map(|c| c.member()).collect();
                    let mut ids = Vec::with_capacity(children.len());
                    for provider in children {
                        let child = Job::child_of(&job, JobId::from_random(random_bytes()), &source, provider, now);
                        self.save(&child, None).await?;
                        ids.push(child.id.clone());
                    }
                    // The children exist before the parent is recorded as over; a crash in
                    // between re-runs the discovery instead of losing the backends.
                    ledger = self.load_ledger().await?;
                    let evicted = ledger.dispatched(&mut job, &ids, &members);
                    self.save(&job, Some(&ledger)).await?;
                    if !evicted.is_empty() {
                        store::delete_keys(&self.storage(), evicted.iter().map(job_key).collect()).await?;
                    }
                    console_log!("job {}: queued {} jobs, one per backend", job.id, ids.len());
                    break;
                }
                Action::Discard { folder, upload } => {
                    let storage = self.storage();
                    match within(R2_STEP_TIMEOUT, store::discard(&target, &storage, &job.id, &folder, upload)).await {
                        Some(Ok(n)) => console_log!("job {}: failed; removed {n} objects under {folder}", job.id),
                        Some(Err(e)) => console_error!("job {}: failed; cleaning {folder} failed: {e}", job.id),
                        None => console_error!("job {}: failed; cleaning {folder} did not finish in time", job.id),
                    }
                    break;
                }
                Action::Sleep(at) => {
                    steps += 1;
                    let cancel_waiting = job.cancelled.is_none() && self.pending_cancel(&job.id).await?.is_some();
                    match after_sleep(at, now, steps, sliced, cancel_waiting) {
                        AfterSleep::StepNow => Event::Wake,
                        AfterSleep::Alarm(at) => {
                            self.storage().set_alarm(at.to_datetime()).await?;
                            return Ok(());
                        }
                    }
                }
                Action::Done => break,
            };
        }
        match crate::ledger::retention_after(&job, &source) {
            Some(RetentionAfterEnd::Defer) => self.defer_retention().await,
            Some(RetentionAfterEnd::ReplicaPass) if self.replica_retention_pass(&source, &target, &primary).await => {
                self.defer_retention().await
            }
            Some(RetentionAfterEnd::DailyIfDue) if self.daily_pass_pending().await? => self.defer_retention().await,
            Some(RetentionAfterEnd::ReplicaPass | RetentionAfterEnd::DailyIfDue) | None => {}
        }
        // Fresh again: triggers and ticks may have written the ledger during the clean-up's I/O.
        let mut ledger = self.load_ledger().await?;
        if let Some(next) = ledger.start_next() {
            // Queued work (an account's next backend) runs now, in its own job and folder.
            self.save_ledger(&ledger).await?;
            self.storage().set_alarm(Duration::from_millis(1)).await?;
            console_log!("job {} of {name} ended ({:?}); starting queued job {next}", job.id, job.phase);
            return Ok(());
        }
        if let Some(next) = self.start_catch_up(&mut ledger, &source).await? {
            console_log!(
                "job {} of {name} ended ({:?}); started job {}: {}",
                job.id,
                job.phase,
                next.id,
                next.catch_up.as_deref().unwrap_or_default()
            );
            return Ok(());
        }
        if let Some(error) = &job.error {
            console_error!("job {} of {name}: failed: {error}", job.id);
        } else if let Some(note) = &job.note {
            console_log!("job {} of {name}: skipped: {note}", job.id);
        } else {
            console_log!("job {} of {name}: {:?}", job.id, job.phase);
        }
        // A trigger may have started the next job while this one's clean-up ran (R2 I/O): only
        // clear the alarm when nothing is in flight or queued, else wake for that job.
        let latest = self.load_ledger().await?;
        // A retention pass may wait (after a commit, or more steps): the next alarm runs it.
        match latest.alarm_after_end(self.daily_pass_pending().await?) {
            AlarmAfterEnd::WakeNow => self.storage().set_alarm(Duration::from_millis(1)).await?,
            AlarmAfterEnd::Clear => self.storage().delete_alarm().await?,
        }
        Ok(())
    }
}

/// Where a cancel request for job `id` waits until the job takes it.
fn cancel_key(id: &JobId) -> String {
    format!("cancel:{id}")
}

fn timed_out(what: &str) -> String {
    format!("{what} did not finish within {} s", R2_STEP_TIMEOUT.as_secs())
}

/// The manifest key a verify trigger names (`{"backup": "<folder or manifest key>"}`), which must
/// be one of this source's backups; `None` means the newest.
fn named_backup(source: &str, req: &TriggerRequest) -> Result<Option<String>, String> {
    if req.task == Task::Export {
        return Ok(None);
    }
    let Some(named) = req.params.get("backup") else { return Ok(None) };
    let Some(text) = named.as_str() else {
        return Err("\"backup\" must be a string: a backup's folder or manifest key".into());
    };
    let folder = text.strip_suffix(crate::manifest::MANIFEST_NAME).unwrap_or(text).trim_end_matches('/');
    let key = crate::manifest::manifest_key(&format!("{folder}/"));
    if !crate::manifest::is_manifest_key(&key) || !key.starts_with(&format!("{source}/")) {
        return Err(format!("{text:?} is not a backup of {source:?} (expected {source}/<folder>/)"));
    }
    Ok(Some(key))
}

fn json_response(status: u16, body: &Value) -> worker::Result<Response> {
    Ok(Response::from_json(body)?.with_status(status))
}

fn stub_request(name: &str, method: Method, path: &str, body: Option<&Value>) -> worker::Result<Request> {
    let headers = worker::Headers::new();
    headers.set("x-ferry-source", name)?;
    headers.set("content-type", "application/json")?;
    let mut init = RequestInit::new();
    init.with_method(method).with_headers(headers);
    if let Some(b) = body {
        init.with_body(Some(JsValue::from_str(&b.to_string())));
    }
    Request::new_with_init(&format!("https://source{path}"), &init)
}

/// Sends a request to a source's object; returns its status and JSON body.
pub(crate) async fn call(
    env: &Env,
    name: &str,
    method: Method,
    path: &str,
    body: Option<&Value>,
) -> worker::Result<(u16, Value)> {
    let stub = env.durable_object(SOURCES)?.get_by_name(name)?;
    let mut resp = stub.fetch_with_request(stub_request(name, method, path, body)?).await?;
    let status = resp.status_code();
    let text = resp.text().await?;
    let value = serde_json::from_str(&text).unwrap_or_else(|_| json!({ "message": text }));
    Ok((status, value))
}

/// The Durable Object that remembers which source each webhook delivery started (its name cannot
/// be a source's: source names never contain `~`).
const DELIVERIES: &str = "~deliveries";

/// The Durable Object that lists sources removed from the config while a job of theirs ran.
const RETIRED: &str = "~retired";
const RETIRED_KEY: &str = "retired";
/// How many retired source names are remembered.
const MAX_RETIRED: usize = 1000;

/// Records `source` as retired, so `GET /v1/jobs/{id}` still finds its jobs.
async fn retire_source(env: &Env, source: &str) -> worker::Result<()> {
    let (status, _) = call(env, RETIRED, Method::Post, "/retire", Some(&json!({ "source": source }))).await?;
    if status == 200 {
        Ok(())
    } else {
        Err(rust_err(format!("the retired-sources object answered HTTP {status}")))
    }
}

/// Source names that left the config while one of their jobs ran.
pub(crate) async fn retired_sources(env: &Env) -> worker::Result<Vec<String>> {
    let (_, value) = call(env, RETIRED, Method::Get, "/retired", None).await?;
    Ok(value["sources"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_string)).collect())
}

/// Claims a verified delivery id for `source`; `Err(owner)` when another source already has it.
pub(crate) async fn claim_delivery(env: &Env, webhook_id: &str, source: &str) -> worker::Result<Result<(), String>> {
    let body = json!({ "id": webhook_id, "source": source });
    let (status, value) = call(env, DELIVERIES, Method::Post, "/claim", Some(&body)).await?;
    match status {
        200 => Ok(Ok(())),
        409 => Ok(Err(value["owner"].as_str().unwrap_or("another source").to_string())),
        other => Err(rust_err(format!("the deliveries object answered HTTP {other}"))),
    }
}

/// Starts (or replays) a webhook job.
pub(crate) async fn trigger_webhook(
    env: &Env,
    name: &str,
    webhook_id: &str,
    params: Value,
    task: Task,
) -> worker::Result<(u16, Value)> {
    let req = TriggerRequest {
        trigger: Trigger::Webhook,
        webhook_id: Some(webhook_id.to_string()),
        scheduled_for: None,
        params,
        task,
    };
    let body = serde_json::to_value(&req).map_err(rust_err)?;
    call(env, name, Method::Post, "/trigger", Some(&body)).await
}

/// Starts a job asked for with the API bearer token (no delivery id: never a replay).
pub(crate) async fn trigger_api(env: &Env, name: &str, params: Value, task: Task) -> worker::Result<(u16, Value)> {
    let req = TriggerRequest { trigger: Trigger::Api, webhook_id: None, scheduled_for: None, params, task };
    let body = serde_json::to_value(&req).map_err(rust_err)?;
    call(env, name, Method::Post, "/trigger", Some(&body)).await
}

/// Delivers a cron tick to a source's object; returns a line for the log.
pub(crate) async fn tick(env: &Env, name: &str, tick: Timestamp, trigger_start: Timestamp) -> Result<String, String> {
    let body = json!({ "tick": tick, "trigger_start": trigger_start });
    let (status, value) = call(env, name, Method::Post, "/tick", Some(&body)).await.map_err(|e| e.to_string())?;
    let line = value["line"].as_str().or(value["error"].as_str()).unwrap_or("?").to_string();
    match status {
        200 | 202 => Ok(line),
        _ => Err(format!("tick at {tick}: HTTP {status}: {line}")),
    }
}

/// The Durable Object that runs the daily sweep and keeps its state and latest report.
pub(crate) const SWEEPER: &str = "~sweeper";

/// Runs one cron tick of the daily sweep (at most one sweep per UTC day); returns a log line.
pub(crate) async fn sweep(env: &Env, now: Timestamp, sources: &[String]) -> Result<String, String> {
    let body = json!({ "now": now.millis(), "sources": sources });
    let (status, value) = call(env, SWEEPER, Method::Post, "/sweep", Some(&body)).await.map_err(|e| e.to_string())?;
    match status {
        200 => Ok(value["line"].as_str().unwrap_or("?").to_string()),
        _ => Err(format!("the sweeper answered HTTP {status}: {value}")),
    }
}
