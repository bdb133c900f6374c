//! After each attempt: retry or not, after how long, and the record of every attempt.
//!
//! **Retries.** A 2xx answer is a delivery. Anything else is retried through the queue with a
//! delay that doubles from the destination's `retry_delay_seconds` (a `Retry-After` longer than
//! that is honoured), up to its `max_attempts`; then Ferry gives up and records it. Following
//! Standard Webhooks, a webhook receiver's every non-2xx answer is retried; Slack's 4xx answers
//! (`invalid_payload`, `no_service`, `channel_is_archived`, …) are permanent and given up at once,
//! except 408 and 429. A destination whose secret is missing or unusable is given up at once too:
//! no retry can fix it.
//!
//! **The record.** One Durable Object (`~alerts`) keeps an [`AttemptLog`]: the latest
//! [`MAX_ATTEMPTS_KEPT`] attempts (destination, event id and type, attempt number, status or
//! error, time, what happened next), each destination's failed attempts since the first (the
//! `ferry_notification_failures_total` counter) and its deliveries, and the attempt count of each
//! delivery still under way. The queue in this `worker` release does not expose a message's
//! attempt count, so the log counts them: an attempt's number is one more than that delivery's
//! recorded attempts.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::time::Timestamp;

/// How a destination is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DestinationKind {
    /// A generic HTTPS endpoint; each delivery is signed with Standard Webhooks.
    Webhook,
    /// A Slack incoming webhook.
    Slack,
}

/// The longest delay a queued message can be retried after (Cloudflare Queues: 12 hours).
pub const MAX_DELAY: Duration = Duration::from_secs(12 * 3600);
/// Attempts the log keeps.
pub const MAX_ATTEMPTS_KEPT: usize = 200;
/// Deliveries under way whose attempt counts are kept (the oldest are forgotten beyond this).
const MAX_PENDING: usize = 1000;

/// How a destination's deliveries are retried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// The delay before the first retry; each next one doubles.
    #[serde(with = "secs")]
    pub first_delay: Duration,
}

mod secs {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

/// How an attempt went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Outcome {
    /// The receiver answered.
    Answered {
        /// Its HTTP status.
        status: u16,
        /// Its `Retry-After`, in seconds, when it sent one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_seconds: Option<u64>,
        /// The start of its answer (Slack says what is wrong here).
        #[serde(default)]
        body: String,
    },
    /// No answer: a network error or a timeout.
    Unreachable {
        /// What went wrong.
        error: String,
    },
    /// The destination cannot be sent to as configured (a missing or unusable secret).
    Misconfigured {
        /// What is wrong.
        error: String,
    },
}

/// What to do with the message after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "next")]
pub enum Decision {
    /// Delivered: acknowledge it.
    Delivered,
    /// Retry it after this delay.
    Retry {
        /// Seconds to wait.
        delay_seconds: u32,
    },
    /// Stop: acknowledge it without delivery.
    GiveUp,
}

/// The decision after attempt number `attempt` (1 for the first) went as `outcome`.
pub fn decide(kind: DestinationKind, outcome: &Outcome, attempt: u32, policy: &DeliveryPolicy) -> Decision {
    let retry_after = match outcome {
        Outcome::Answered { status: 200..=299, .. } => return Decision::Delivered,
        Outcome::Misconfigured { .. } => return Decision::GiveUp,
        Outcome::Answered { status, .. }
            if kind == DestinationKind::Slack && (400..500).contains(status) && !matches!(status, 408 | 429) =>
        {
            return Decision::GiveUp
        }
        Outcome::Answered { retry_after_seconds, .. } => retry_after_seconds.map(Duration::from_secs),
        Outcome::Unreachable { .. } => None,
    };
    if attempt >= policy.max_attempts {
        return Decision::GiveUp;
    }
    let doubled = policy.first_delay.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
    let delay = doubled.max(retry_after.unwrap_or_default()).min(MAX_DELAY);
    Decision::Retry { delay_seconds: u32::try_from(delay.as_secs()).unwrap_or(u32::MAX) }
}

/// What the queue consumer reports after one attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptReport {
    /// The destination's name.
    pub destination: String,
    /// Its kind.
    pub kind: DestinationKind,
    /// Its retry policy.
    pub policy: DeliveryPolicy,
    /// The event's id (`webhook-id`).
    pub event_id: String,
    /// The event's type (`ferry.backup.failed`).
    pub event_type: String,
    /// The event's source.
    pub source: String,
    /// When the attempt was made.
    pub at: Timestamp,
    /// How it went.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// One recorded attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// The destination's name.
    pub destination: String,
    /// The event's id (`webhook-id`).
    pub event_id: String,
    /// The event's type.
    pub event_type: String,
    /// The event's source.
    pub source: String,
    /// 1 for the first attempt of this delivery; 0 for an event that could not be queued.
    pub attempt: u32,
    /// When.
    pub at: Timestamp,
    /// The receiver's HTTP status, when it answered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// What went wrong, when something did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `delivered`, `retry` (with `delay_seconds`), `give_up`, or `not_queued`.
    pub next: String,
    /// The delay before the retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay_seconds: Option<u32>,
}

/// The record of deliveries, kept by the `~alerts` Durable Object.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptLog {
    /// The latest attempts, oldest first.
    #[serde(default)]
    pub attempts: Vec<Attempt>,
    /// Failed attempts per destination, since the first (a counter: never decreases).
    #[serde(default)]
    pub failures: BTreeMap<String, u64>,
    /// Deliveries per destination, since the first.
    #[serde(default)]
    pub delivered: BTreeMap<String, u64>,
    /// Attempts so far of deliveries under way, by `destination event_id`, oldest first.
    #[serde(default)]
    pending: Vec<(String, u32)>,
}

impl AttemptLog {
    /// Records an attempt; returns its number and what to do next.
    pub fn record(&mut self, report: &AttemptReport) -> (u32, Decision) {
        let key = format!("{} {}", report.destination, report.event_id);
        let at = self.pending.iter().position(|(k, _)| *k == key);
        let attempt = at.map_or(0, |i| self.pending[i].1).saturating_add(1);
        let decision = decide(report.kind, &report.outcome, attempt, &report.policy);
        match (decision, at) {
            (Decision::Retry { .. }, Some(i)) => self.pending[i].1 = attempt,
            (Decision::Retry { .. }, None) => {
                self.pending.push((key, attempt));
                let excess = self.pending.len().saturating_sub(MAX_PENDING);
                self.pending.drain(..excess);
            }
            (_, Some(i)) => {
                self.pending.remove(i);
            }
            (_, None) => {}
        }
        let (status, error) = match &report.outcome {
            Outcome::Answered { status, body, .. } if !(200..300).contains(status) => {
                let said = body.trim();
                (
                    Some(*status),
                    Some(if said.is_empty() { format!("HTTP {status}") } else { format!("HTTP {status}: {said}") }),
                )
            }
            Outcome::Answered { status, .. } => (Some(*status), None),
            Outcome::Unreachable { error } | Outcome::Misconfigured { error } => (None, Some(error.clone())),
        };
        if decision == Decision::Delivered {
            *self.delivered.entry(report.destination.clone()).or_default() += 1;
        } else {
            *self.failures.entry(report.destination.clone()).or_default() += 1;
        }
        let (next, delay_seconds) = match decision {
            Decision::Delivered => ("delivered", None),
            Decision::Retry { delay_seconds } => ("retry", Some(delay_seconds)),
            Decision::GiveUp => ("give_up", None),
        };
        self.push(Attempt {
            destination: report.destination.clone(),
            event_id: report.event_id.clone(),
            event_type: report.event_type.clone(),
            source: report.source.clone(),
            attempt,
            at: report.at,
            status,
            error,
            next: next.into(),
            delay_seconds,
        });
        (attempt, decision)
    }

    /// Records that an event for `destination` could not be handed to the queue (it stays in its
    /// source's outbox and is queued again at the next tick). Counts as a failure.
    pub fn not_queued(
        &mut self,
        destination: &str,
        event_id: &str,
        event_type: &str,
        source: &str,
        error: &str,
        at: Timestamp,
    ) {
        *self.failures.entry(destination.to_string()).or_default() += 1;
        self.push(Attempt {
            destination: destination.to_string(),
            event_id: event_id.to_string(),
            event_type: event_type.to_string(),
            source: source.to_string(),
            attempt: 0,
            at,
            status: None,
            error: Some(error.to_string()),
            next: "not_queued".into(),
            delay_seconds: None,
        });
    }

    fn push(&mut self, attempt: Attempt) {
        self.attempts.push(attempt);
        let excess = self.attempts.len().saturating_sub(MAX_ATTEMPTS_KEPT);
        self.attempts.drain(..excess);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(max_attempts: u32) -> DeliveryPolicy {
        DeliveryPolicy { max_attempts, first_delay: Duration::from_secs(30) }
    }

    fn answered(status: u16) -> Outcome {
        Outcome::Answered { status, retry_after_seconds: None, body: String::new() }
    }

    fn report(destination: &str, event: &str, outcome: Outcome) -> AttemptReport {
        AttemptReport {
            destination: destination.into(),
            kind: DestinationKind::Webhook,
            policy: DeliveryPolicy { max_attempts: 3, first_delay: Duration::from_secs(1) },
            event_id: event.into(),
            event_type: "ferry.backup.failed".into(),
            source: "app-db".into(),
            at: Timestamp::from_secs(100),
            outcome,
        }
    }

    #[test]
    fn a_2xx_is_delivered_and_anything_else_from_a_webhook_is_retried_with_doubling_delays() {
        let w = DestinationKind::Webhook;
        assert_eq!(decide(w, &answered(204), 1, &policy(5)), Decision::Delivered);
        let delays: Vec<Decision> = (1..=4).map(|n| decide(w, &answered(500), n, &policy(5))).collect();
        assert_eq!(delays, [30, 60, 120, 240].map(|s| Decision::Retry { delay_seconds: s }));
        assert_eq!(decide(w, &answered(500), 5, &policy(5)), Decision::GiveUp, "the last attempt");
        assert_eq!(decide(w, &answered(404), 1, &policy(5)), Decision::Retry { delay_seconds: 30 });
        let down = Outcome::Unreachable { error: "request to hooks.example.com timed out after 10 s".into() };
        assert_eq!(decide(w, &down, 2, &policy(5)), Decision::Retry { delay_seconds: 60 });
    }

    #[test]
    fn retry_after_is_honoured_and_delays_are_capped_at_the_queues_limit() {
        let busy = Outcome::Answered { status: 429, retry_after_seconds: Some(600), body: String::new() };
        assert_eq!(decide(DestinationKind::Slack, &busy, 1, &policy(5)), Decision::Retry { delay_seconds: 600 });
        let long = DeliveryPolicy { max_attempts: 50, first_delay: Duration::from_secs(3600) };
        assert_eq!(
            decide(DestinationKind::Webhook, &answered(503), 49, &long),
            Decision::Retry { delay_seconds: 43_200 }
        );
    }

    #[test]
    fn slacks_4xx_and_misconfigured_destinations_are_given_up_at_once() {
        let s = DestinationKind::Slack;
        for status in [400, 403, 404, 410] {
            assert_eq!(decide(s, &answered(status), 1, &policy(5)), Decision::GiveUp, "{status}");
        }
        assert_eq!(decide(s, &answered(408), 1, &policy(5)), Decision::Retry { delay_seconds: 30 });
        assert_eq!(decide(s, &answered(502), 1, &policy(5)), Decision::Retry { delay_seconds: 30 });
        let bad = Outcome::Misconfigured { error: "the secret SLACK_URL is not set".into() };
        assert_eq!(decide(DestinationKind::Webhook, &bad, 1, &policy(5)), Decision::GiveUp);
    }

    #[test]
    fn the_log_numbers_each_deliverys_attempts_and_counts_failures_per_destination() {
        let mut log = AttemptLog::default();
        assert_eq!(log.record(&report("flaky", "msg_a", answered(500))), (1, Decision::Retry { delay_seconds: 1 }));
        assert_eq!(log.record(&report("ok", "msg_a", answered(200))), (1, Decision::Delivered), "per destination");
        assert_eq!(log.record(&report("flaky", "msg_a", answered(500))), (2, Decision::Retry { delay_seconds: 2 }));
        assert_eq!(log.record(&report("flaky", "msg_b", answered(500))), (1, Decision::Retry { delay_seconds: 1 }));
        assert_eq!(log.record(&report("flaky", "msg_a", answered(500))), (3, Decision::GiveUp));
        assert_eq!(log.failures.get("flaky"), Some(&4));
        assert_eq!(log.failures.get("ok"), None);
        assert_eq!(log.delivered.get("ok"), Some(&1));
        let last = log.attempts.last().unwrap();
        assert_eq!((last.attempt, last.status, last.next.as_str()), (3, Some(500), "give_up"));
        assert_eq!(last.error.as_deref(), Some("HTTP 500"));
        // A finished delivery is forgotten: the same event again starts from 1.
        assert_eq!(log.record(&report("flaky", "msg_a", answered(200))).0, 1);
    }

    #[test]
    fn the_log_keeps_the_latest_attempts_and_records_events_that_were_not_queued() {
        let mut log = AttemptLog::default();
        for n in 0..(MAX_ATTEMPTS_KEPT + 10) {
            log.record(&report("ok", &format!("msg_{n}"), answered(200)));
        }
        log.not_queued(
            "ops",
            "msg_x",
            "ferry.backup.failed",
            "app-db",
            "the ALERTS queue binding is missing",
            Timestamp::from_secs(1),
        );
        assert_eq!(log.attempts.len(), MAX_ATTEMPTS_KEPT);
        assert_eq!(log.attempts[0].event_id, "msg_11");
        let last = log.attempts.last().unwrap();
        assert_eq!((last.attempt, last.next.as_str()), (0, "not_queued"));
        assert_eq!(log.failures.get("ops"), Some(&1));
        let round: AttemptLog = serde_json::from_value(serde_json::to_value(&log).unwrap()).unwrap();
        assert_eq!(round, log);
    }

    #[test]
    fn a_report_round_trips_as_the_consumer_sends_it() {
        let r = report("flaky", "msg_a", Outcome::Unreachable { error: "timed out".into() });
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(v["outcome"], "unreachable");
        assert_eq!(v["policy"]["first_delay"], 1);
        assert_eq!(serde_json::from_value::<AttemptReport>(v).unwrap(), r);
    }
}
