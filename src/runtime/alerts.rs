//! Alerts on the Workers runtime: the queue's producer and consumer, and the attempt record.
//!
//! A source's object hands the events in its outbox to the `ALERTS` queue (one message per
//! destination that wants the event) after a job ends or a tick, within a time limit, and never
//! lets a failure reach the job: an event that cannot be queued stays in the outbox for the next
//! tick and the failure is recorded. The consumer (`#[event(queue)]` in this Worker) sends each
//! message with a time limit, asks the `~alerts` object to record the attempt and decide what
//! next (`crate::alerts::delivery`), then acknowledges it or retries it with the decided delay.
//! Messages are handled concurrently, so one slow receiver does not hold up the others.

use std::time::Duration;

use futures_util::future::join_all;
use serde_json::{json, Value};
use wasm_bindgen::JsValue;
use worker::{
    console_error, console_log, Env, Message, MessageBatch, MessageExt, Method, QueueRetryOptionsBuilder, Request,
    Response, Storage,
};

use super::net::{send_abortable, within};
use super::source_object::call;
use super::{load_config, now, secret};
use crate::alerts::config::Target;
use crate::alerts::delivery::{decide, AttemptReport};
use crate::alerts::payload::request;
use crate::alerts::{AlertEvent, AlertsConfig, AlertsConfigError, AttemptLog, Decision, Delivery, Outcome};
use crate::http::parse_retry_after;
use crate::time::Timestamp;

/// The queue producer binding.
pub(crate) const QUEUE: &str = "ALERTS";
/// The Durable Object (of the SOURCES namespace) that records delivery attempts; source names
/// never contain `~`.
const ALERTS_OBJECT: &str = "~alerts";
const LOG_KEY: &str = "alert-attempts";
/// How long one delivery may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long handing one event to the queue may take.
const ENQUEUE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a message waits when the alerts config cannot be read.
const CONFIG_RETRY_SECONDS: u32 = 300;
/// How much of a receiver's answer is kept.
const ANSWER_CHARS: usize = 300;

/// Parses `FERRY_ALERTS` (none means no destinations) and checks its `sources` filters against
/// `FERRY_SOURCES` when that is valid.
pub(crate) fn load_alerts(env: &Env) -> Result<AlertsConfig, AlertsConfigError> {
    let raw = js_sys::Reflect::get(env.as_ref(), &JsValue::from_str("FERRY_ALERTS")).unwrap_or(JsValue::UNDEFINED);
    if raw.is_undefined() || raw.is_null() {
        return Ok(AlertsConfig::default());
    }
    let value: Value = match raw.as_string() {
        Some(s) => Value::String(s),
        None => serde_wasm_bindgen::from_value(raw).map_err(|e| AlertsConfigError {
            destination: None,
            field: None,
            problem: format!("FERRY_ALERTS could not be read: {e}"),
        })?,
    };
    let alerts = AlertsConfig::from_value(&value)?;
    if let Ok(sources) = load_config(env) {
        alerts.check_sources(&sources)?;
    }
    Ok(alerts)
}

/// Hands events to the queue, one message per destination that wants each; returns the ids of
/// the events that are done with (queued, or wanted by no destination). The others stay in
/// their source's outbox.
pub(crate) async fn enqueue(env: &Env, events: &[AlertEvent]) -> Vec<String> {
    let config = match load_alerts(env) {
        Ok(c) => c,
        Err(e) => {
            console_error!("alerts: {e}; {} event(s) wait in the outbox", events.len());
            return Vec::new();
        }
    };
    let queue = env.queue(QUEUE);
    let mut done = Vec::new();
    for event in events {
        let deliveries = config.deliveries(event);
        if deliveries.is_empty() {
            done.push(event.id.clone());
            continue;
        }
        let queued = match &queue {
            Err(_) => Err(format!("the {QUEUE} queue binding is missing (wrangler.toml [[queues.producers]])")),
            Ok(q) => {
                let bodies: Vec<String> = deliveries.iter().filter_map(|d| serde_json::to_string(d).ok()).collect();
                match within(ENQUEUE_TIMEOUT, q.send_batch(bodies)).await {
                    Some(Ok(())) => Ok(()),
                    Some(Err(e)) => Err(format!("the queue refused it: {e}")),
                    None => Err(format!("the queue did not answer within {} s", ENQUEUE_TIMEOUT.as_secs())),
                }
            }
        };
        match queued {
            Ok(()) => done.push(event.id.clone()),
            Err(error) => {
                console_error!("alerts: {} {} of {}: not queued: {error}", event.kind.as_str(), event.id, event.source);
                for d in &deliveries {
                    let body = json!({
                        "destination": d.destination, "event_id": event.id, "event_type": event.kind.type_name(),
                        "source": event.source, "error": error, "at": now(),
                    });
                    if let Err(e) = call(env, ALERTS_OBJECT, Method::Post, "/alerts/not-queued", Some(&body)).await {
                        console_error!("alerts: recording a failure to queue failed: {e}");
                    }
                }
            }
        }
    }
    done
}

/// The queue consumer: one attempt per message, then ack or retry.
pub(crate) async fn consume(batch: MessageBatch<String>, env: &Env) {
    let config = load_alerts(env);
    let mut attempts = Vec::new();
    for message in batch.iter() {
        match message {
            Ok(m) => attempts.push(attempt(env, &config, m)),
            // Unreadable: nothing can be done with it; the batch's success acknowledges it.
            Err(e) => console_error!("alerts: an unreadable queue message was dropped: {e}"),
        }
    }
    join_all(attempts).await;
}

async fn attempt(env: &Env, config: &Result<AlertsConfig, AlertsConfigError>, message: Message<String>) {
    let Ok(delivery) = serde_json::from_str::<Delivery>(message.body()) else {
        console_error!("alerts: queue message {} is not a delivery; dropped", message.id());
        message.ack();
        return;
    };
    let config = match config {
        Ok(c) => c,
        Err(e) => {
            console_error!("alerts: {e}; delivery of {} retried in {CONFIG_RETRY_SECONDS} s", delivery.event.id);
            message
                .retry_with_options(&QueueRetryOptionsBuilder::new().with_delay_seconds(CONFIG_RETRY_SECONDS).build());
            return;
        }
    };
    let event = &delivery.event;
    let Some(destination) = config.destination(&delivery.destination).filter(|d| d.wants(event)) else {
        console_log!("alerts: {} no longer wants {} {}; dropped", delivery.destination, event.kind.as_str(), event.id);
        message.ack();
        return;
    };
    let secret_name = match &destination.target {
        Target::Webhook { secret_secret, .. } => secret_secret,
        Target::Slack { url_secret } => url_secret,
    };
    let at = now();
    let outcome = match secret(env, secret_name) {
        None => Outcome::Misconfigured { error: format!("the secret {secret_name} is not set") },
        Some(value) => match request(destination, event, &value, at) {
            Ok(req) => post(&req).await,
            Err(error) => Outcome::Misconfigured { error },
        },
    };
    let report = AttemptReport {
        destination: destination.name.clone(),
        kind: destination.kind(),
        policy: destination.policy,
        event_id: event.id.clone(),
        event_type: event.kind.type_name().to_string(),
        source: event.source.clone(),
        at,
        outcome,
    };
    let decision = match record(env, &report).await {
        Ok((n, decision)) => {
            console_log!(
                "alerts: {} {} to {}: attempt {n}: {decision:?}",
                report.event_type,
                event.id,
                destination.name
            );
            decision
        }
        Err(e) => {
            // The record is unavailable: decide as for a first attempt (the queue's max_retries
            // still bounds the retries).
            console_error!("alerts: recording an attempt failed: {e}");
            decide(report.kind, &report.outcome, 1, &report.policy)
        }
    };
    match decision {
        Decision::Delivered | Decision::GiveUp => message.ack(),
        Decision::Retry { delay_seconds } => {
            message.retry_with_options(&QueueRetryOptionsBuilder::new().with_delay_seconds(delay_seconds).build())
        }
    }
}

/// Sends one delivery and reads the start of the answer.
async fn post(req: &crate::http::HttpRequest) -> Outcome {
    match send_abortable(req, DELIVERY_TIMEOUT).await {
        Err(error) => Outcome::Unreachable { error },
        Ok((mut resp, _controller)) => {
            let status = resp.status_code();
            let retry_after_seconds = resp
                .headers()
                .get("retry-after")
                .ok()
                .flatten()
                .and_then(|v| parse_retry_after(&v, now()))
                .map(|d| d.as_secs());
            let body = match within(DELIVERY_TIMEOUT, resp.text()).await {
                Some(Ok(text)) => text.chars().take(ANSWER_CHARS).collect(),
                _ => String::new(),
            };
            Outcome::Answered { status, retry_after_seconds, body }
        }
    }
}

async fn record(env: &Env, report: &AttemptReport) -> Result<(u32, Decision), String> {
    let body = serde_json::to_value(report).map_err(|e| e.to_string())?;
    let (status, value) =
        call(env, ALERTS_OBJECT, Method::Post, "/alerts/attempt", Some(&body)).await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("the alerts object answered HTTP {status}: {value}"));
    }
    let attempt = value["attempt"].as_u64().and_then(|n| u32::try_from(n).ok()).unwrap_or(1);
    let decision = serde_json::from_value(value["decision"].clone()).map_err(|e| e.to_string())?;
    Ok((attempt, decision))
}

/// The attempt log, for the API and the metrics.
pub(crate) async fn attempt_log(env: &Env) -> Result<AttemptLog, String> {
    let (status, value) =
        call(env, ALERTS_OBJECT, Method::Get, "/alerts/log", None).await.map_err(|e| e.to_string())?;
    if status != 200 {
        return Err(format!("the alerts object answered HTTP {status}"));
    }
    serde_json::from_value(value).map_err(|e| e.to_string())
}

/// `GET /v1/alerts`: each destination with its failure and delivery counts and last attempt,
/// and the recent attempts, newest first.
pub(crate) fn view(config: &AlertsConfig, log: &AttemptLog) -> Value {
    let destinations: Vec<Value> = config
        .destinations
        .iter()
        .map(|d| {
            json!({
                "name": d.name,
                "kind": d.kind(),
                "events": d.events,
                "sources": d.sources,
                "dashboard_url": d.dashboard_url.as_ref().map(|u| u.as_str()),
                "max_attempts": d.policy.max_attempts,
                "retry_delay_seconds": d.policy.first_delay.as_secs(),
                "failures": log.failures.get(&d.name).copied().unwrap_or(0),
                "delivered": log.delivered.get(&d.name).copied().unwrap_or(0),
                "last_attempt": log.attempts.iter().rev().find(|a| a.destination == d.name),
            })
        })
        .collect();
    let attempts: Vec<&crate::alerts::delivery::Attempt> = log.attempts.iter().rev().collect();
    json!({ "destinations": destinations, "failures": log.failures, "attempts": attempts })
}

/// Requests to the `~alerts` object (`/alerts/…`).
pub(crate) async fn object_request(storage: &Storage, mut req: Request) -> worker::Result<Response> {
    let path = req.path();
    match (req.method(), path.as_str()) {
        (Method::Get, "/alerts/log") => Response::from_json(&load_log(storage).await?),
        (Method::Post, "/alerts/attempt") => {
            let report: AttemptReport = req.json().await?;
            let mut log = load_log(storage).await?;
            let (attempt, decision) = log.record(&report);
            save_log(storage, &log).await?;
            Response::from_json(&json!({ "attempt": attempt, "decision": decision }))
        }
        (Method::Post, "/alerts/not-queued") => {
            let body: Value = req.json().await?;
            let text = |k: &str| body[k].as_str().unwrap_or_default().to_string();
            let at = body["at"].as_str().and_then(Timestamp::parse_rfc3339).unwrap_or_else(now);
            let mut log = load_log(storage).await?;
            log.not_queued(
                &text("destination"),
                &text("event_id"),
                &text("event_type"),
                &text("source"),
                &text("error"),
                at,
            );
            save_log(storage, &log).await?;
            Response::from_json(&json!({ "recorded": true }))
        }
        _ => Response::error("not found", 404),
    }
}

async fn load_log(storage: &Storage) -> worker::Result<AttemptLog> {
    match storage.get::<String>(LOG_KEY).await? {
        Some(text) => serde_json::from_str(&text).map_err(|e| worker::Error::RustError(format!("alert log: {e}"))),
        None => Ok(AttemptLog::default()),
    }
}

async fn save_log(storage: &Storage, log: &AttemptLog) -> worker::Result<()> {
    let text = serde_json::to_string(log).map_err(|e| worker::Error::RustError(e.to_string()))?;
    storage.put(LOG_KEY, text).await
}
