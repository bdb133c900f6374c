//! Ferry: a Cloudflare Worker that backs up managed databases into R2.
//!
//! # Layout
//!
//! Everything outside `runtime` is a pure core: no I/O, no clock, no `worker` types. Time comes in
//! as a [`time::Timestamp`] argument, and requests go out as [`http::HttpRequest`] values, so the
//! whole protocol, state machine and policy is tested natively with `cargo test`.
//!
//! - [`config`]: the `FERRY_SOURCES` declaration, parsed strictly by serde, errors naming source
//!   and field; [`fields`]: the serde helpers and checks its parts share.
//! - [`identity`]: the names every module shares for a job (`JobId`, `Trigger`, `Task`); it sits
//!   at the bottom of the module graph, which has no circles (`tests/module_graph.rs` checks it).
//! - [`health`]: green, amber or red: the age of the newest backup against the schedule, judged
//!   from [`history`], the few fields a source keeps of each finished job.
//! - [`schedule`]: cron expressions (`croner`) and which sources are due in a trigger's window.
//! - [`webhook`]: Standard Webhooks signature verification for on-demand exports, and signing.
//! - [`alerts`]: `FERRY_ALERTS` destinations, the events a job's end or a tick raises, the signed
//!   webhook and Slack payloads, and the retry decision and record of each delivery attempt.
//! - [`job`]: the job engine, `(job, event, context) → (job, action)`: an envelope every job
//!   shares and one state machine per task (export, verify, replicate, restore and drill), each in
//!   its own module; it sits above what the tasks use (providers, verify, replica, restore).
//! - [`ledger`]: a source's bookkeeping: single flight, webhook replay, cron idempotency.
//! - [`budget`]: the Cloudflare API's request budget per API token: grant, or wait until when.
//! - [`providers`]: one module per provider protocol (`providers::d1`), behind one small enum;
//!   a whole-account source (a Dgraph account, a D1 account, an Aura tenant) discovers its
//!   members and spawns one job per member.
//! - [`transfer`]: sliced, resumable copies: the persisted state of a copy and how a resumed
//!   download's answer is judged (`Range`, `If-Range`, validators); a file Ferry writes itself
//!   (the Aura graph, D1's query artifact) is a `Generator` its provider implements; an
//!   encrypted copy is one too (`transfer::sealed`), wrapping a download or another generator.
//! - [`verify`]: the verify job's progress and outcome: read a backup back, re-hash, compare.
//! - [`status`]: one source's report (job in flight, progress, health, history) and [`metrics`].
//! - [`manifest`]: the R2 layout and the manifest written last as the commit marker.
//! - [`retention`]: which backups a source keeps (restic's `forget` rules, pins, verification)
//!   and why; the plan the runtime applies, manifest first.
//! - [`restore`]: restore and drill jobs, one phase machine per provider (D1 import, Time
//!   Travel and drills; Aura snapshot restore, graph load and drills; DXP upload; Dgraph restore
//!   of its own backups); [`dump`]: the MD5 and row counts of a D1 dump recorded while copying.
//! - [`replica`]: the second copy: a source's `replica` table, what a replicate job copies and
//!   checks, and the replica's manifest.
//! - [`s3`]: an S3-compatible store (AWS, B2, MinIO…): SigV4-signed requests, its XML answers.
//! - [`index`]: the per-source backup index (Durable Object storage) and the per-invocation
//!   limits (subrequests, CPU) every listing, retention pass and rebuild step stays within.
//! - [`sweep`]: the daily orphan sweep: which open uploads to abort and which uncommitted folders
//!   to delete, never a committed backup or a job in flight.
//! - [`api`]: routes and auth checks of the HTTP API.
//! - [`dashboard`]: the page served at `/` (inline HTML, CSS and JS) and its security headers.
//! - [`encryption`]: client-side encryption in the standard age v1 format (X25519 recipients):
//!   header, streaming and resumable STREAM payload, so `age -d` opens any encrypted backup;
//!   restores read any plaintext range of such a file by its window of whole chunks.
//! - [`http`], [`error`], [`retry`], [`secret`], [`time`]: values shared by the above.
//! - `runtime` (wasm32 only): the thin shell over `worker`. It executes the core's actions with
//!   `Fetch`, keeps each source's jobs in a Durable Object, arms alarms and streams into R2.

#![warn(missing_docs)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod alerts;
pub mod api;
pub mod budget;
pub mod config;
pub mod dashboard;
pub mod dump;
pub mod encryption;
pub mod error;
pub mod fields;
pub mod health;
pub mod history;
pub mod http;
pub mod identity;
pub mod index;
pub mod job;
pub mod ledger;
pub mod manifest;
pub mod metrics;
pub mod providers;
pub mod replica;
pub mod restore;
pub mod retention;
pub mod retry;
pub mod s3;
pub mod schedule;
pub mod secret;
pub mod status;
pub mod sweep;
pub mod time;
pub mod transfer;
pub mod verify;
pub mod webhook;

#[cfg(target_arch = "wasm32")]
mod runtime;
