//! Alerts: telling people when backups fail, go stale, or recover.
//!
//! `FERRY_ALERTS` lists notification destinations, each with the events it wants ([`config`]).
//! Events are decided by the pure core from what a source's Durable Object already knows
//! ([`events`]): a job that ended (`committed`, `failed`, `verify_failed`, `recovered`) or a cron
//! tick that finds the source's health red (`stale`, once per episode). They are kept in the
//! source's ledger (an outbox written in the same storage write as the job's end) and handed to a
//! Cloudflare Queue, one message per destination; the queue's consumer sends each one
//! ([`payload`]: a Standard Webhooks-signed JSON body, or a Slack incoming-webhook message),
//! decides from the answer whether to retry and after how long ([`delivery`]), and records every
//! attempt.
//!
//! Why a queue: delivery must never fail or delay a backup, a receiver that keeps failing must not
//! hold anything up, and retries need durable, delayed redelivery. Queues gives exactly that
//! (at-least-once delivery, per-message `retry` with a delay, redelivery after a crashed
//! consumer), so Ferry keeps only the policy: when to retry, when to give up, and the record.
//! Delivery is at least once; each event's `webhook-id` is derived from the event (not from the
//! attempt or the queue message), so a receiver can drop duplicates.

pub mod config;
pub mod delivery;
pub mod events;
pub mod payload;

pub use config::{AlertsConfig, AlertsConfigError, Destination};
pub use delivery::{AttemptLog, Decision, DeliveryPolicy, DestinationKind, Outcome};
pub use events::{AlertEvent, AlertState, Delivery, EventKind};
