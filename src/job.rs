//! The export job: one backup of one source, as a state machine.
//!
//! A job moves `queued → exporting → transferring → committed | failed`. Its transition function
//! [`Job::handle`] takes the job, one [`Event`] and a [`Context`] (now, a random number for jitter,
//! the source's config and credentials) and returns the next job and one [`Action`] for the
//! runtime to perform: send a request, copy a file into R2, write the manifest, sleep until a
//! time, or nothing. The runtime persists the job after every step, so a job resumes wherever it
//! was after the Worker or its Durable Object restarts; a spurious or repeated wake-up is a no-op.
//!
//! Only `committed` is a backup. `failed` carries the provider's own message, and a job that
//! fails after it began copying hands its folder back for deletion, so a failure never leaves
//! something that looks like a backup.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::SourceConfig;
use crate::error::StepError;
use crate::http::{HttpRequest, HttpResponse};
use crate::manifest::{self, Artifact, Manifest};
use crate::providers::aura::GraphExport;
use crate::providers::{Credentials, Download, Origin, Progress, ProviderState, StepInput};
use crate::replica::{ReplicaManifest, ReplicaState};
use crate::restore::{Answer, Io, IoDone, Next as RestoreNext, RestoreCx, RestoreState};
use crate::time::Timestamp;
use crate::transfer::{CopyState, TransferSettings};
use crate::verify::{Verification, VerifyState};

pub use crate::identity::{JobId, Task, Trigger};

/// A running copy's progress, for the API and the dashboard.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CopyProgress {
    /// Bytes stored so far.
    pub bytes_copied: u64,
    /// All bytes to copy, when known.
    pub bytes_total: Option<u64>,
    /// Average rate since copying began.
    pub bytes_per_second: Option<u64>,
    /// Time left at that rate, when the total is known.
    pub eta_seconds: Option<u64>,
    /// The file being copied.
    pub file: Option<String>,
    /// Files stored.
    pub files_done: usize,
    /// Files to store.
    pub files_total: usize,
}

/// Where a job is. Only `Committed` is a usable backup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Recorded, not started. Not a backup yet.
    Queued,
    /// The provider is producing the export. Not a backup yet.
    Exporting,
    /// Files are being copied into R2. Not a backup yet.
    Transferring,
    /// Every file and the manifest are in R2.
    Committed,
    /// Stopped for good; `error` says why.
    Failed,
    /// Nothing to back up (for example that backup was already copied); `note` says why.
    Skipped,
    /// It discovered the work and queued one job per part of it (a Dgraph account's backends);
    /// `children` lists them. Not a backup itself.
    Dispatched,
    /// A verify job is reading a backup back from R2.
    Verifying,
    /// A verify job found every file as its manifest says.
    Verified,
    /// A restore or drill job is talking to the provider or streaming a dump.
    Restoring,
    /// A restore finished, or a drill passed.
    Restored,
    /// Stopped on request (`POST /v1/jobs/{id}/cancel`) after cleaning up what it started;
    /// `cancelled` says who asked and why. Never a backup.
    Cancelled,
}

impl Phase {
    /// True once the job will do nothing more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Committed
                | Self::Failed
                | Self::Skipped
                | Self::Dispatched
                | Self::Verified
                | Self::Restored
                | Self::Cancelled
        )
    }
}

/// One export job, as persisted in the source's Durable Object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// Id.
    pub id: JobId,
    /// Source name.
    pub source: String,
    /// Provider kind.
    pub kind: String,
    /// What the job does (export, or verify a backup).
    #[serde(default)]
    pub task: Task,
    /// What started it.
    pub trigger: Trigger,
    /// The webhook delivery id, for webhook jobs.
    pub webhook_id: Option<String>,
    /// The schedule fire time this job serves, for cron jobs.
    pub scheduled_for: Option<Timestamp>,
    /// Where it is.
    pub phase: Phase,
    /// When it was recorded.
    pub started_at: Timestamp,
    /// When it last changed.
    pub updated_at: Timestamp,
    /// When it committed or failed (while committing: when the last file landed).
    pub finished_at: Option<Timestamp>,
    /// When the next step is due (`None` once terminal).
    pub next_step_at: Option<Timestamp>,
    /// Steps with I/O started so far (requests, copies, commits).
    pub attempts: u32,
    /// Consecutive failed tries of the current step.
    pub retries: u32,
    /// The latest transient error while retrying.
    pub last_error: Option<String>,
    /// Why the job failed.
    pub error: Option<String>,
    /// Why the job was skipped.
    #[serde(default)]
    pub note: Option<String>,
    /// The trigger's parameters (a webhook's JSON body; `{}` for cron).
    #[serde(default)]
    pub params: serde_json::Value,
    /// The job that queued this one (account mode).
    #[serde(default)]
    pub parent: Option<JobId>,
    /// The jobs this one queued (account mode; a committed export's replicate job).
    #[serde(default)]
    pub children: Vec<JobId>,
    /// The provider's protocol state and references.
    pub provider: ProviderState,
    /// Files the provider produced, to copy in order.
    pub downloads: Vec<Download>,
    /// Files already stored in R2 (in `downloads` order).
    pub artifacts: Vec<Artifact>,
    /// The copy in progress: the next file's resumable state, persisted after every part.
    #[serde(default)]
    pub copy: Option<CopyState>,
    /// When the provider's files were ready and copying began.
    #[serde(default)]
    pub transfer_started_at: Option<Timestamp>,
    /// Set on a cron job that serves fire times missed while the source was busy or no tick ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<String>,
    /// What the job wants its reader to know that is not an error (a duplicate export that may
    /// exist at the provider after an unanswered request).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// Every time a copy went back to byte 0, with the file and the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restarts: Vec<String>,
    /// A signed download URL expired mid-copy: the job is back in `exporting` only to ask the
    /// provider for fresh URLs, then resumes the copy where it stopped.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub renewing: bool,
    /// Fresh download URLs obtained so far.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub renewals: u32,
    /// The copy's offset when its URL was last renewed: refused again there, the URL was not
    /// the problem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_at_offset: Option<u64>,
    /// A verify job's progress.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<VerifyState>,
    /// A verify job's outcome, as recorded next to the backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verification: Option<Verification>,
    /// A restore or drill job's state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreState>,
    /// The source's settings when the job was created (secret *names*, never values). Every
    /// step runs with these, so a config edited mid-job cannot send the old bookmark to another
    /// database or describe the artifact with settings it was not made with. `None` for a job
    /// stored before snapshots existed, or whose snapshot cannot be read: it runs with the
    /// current config.
    #[serde(default, deserialize_with = "snapshot", skip_serializing_if = "Option::is_none")]
    pub config: Option<SourceConfig>,
    /// A replicate job's backup: the primary manifest and the replica bucket's binding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaState>,
    /// When the job left the queue: its task's deadline counts from here (`started_at` for a
    /// job stored before this existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running_since: Option<Timestamp>,
    /// Who asked to cancel the job, and why; it then ends `cancelled`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled: Option<Cancellation>,
    /// Since when the job is cleaning up before it stops (after a cancel or its deadline): it
    /// takes no new work, and a clean-up running past [`CLEANUP_LIMIT`] is given up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopping_since: Option<Timestamp>,
}

/// A cancel request, as recorded on the job. The API bearer token names no person, so `by` says
/// which door the request came through (`"api"`), and `reason` is the caller's own words.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancellation {
    /// Who asked: `"api"` (the bearer token, also the dashboard's button).
    pub by: String,
    /// Why, as the caller said (at most [`MAX_CANCEL_REASON`] characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the job took the request.
    pub at: Timestamp,
}

/// The longest cancel `reason` kept.
pub const MAX_CANCEL_REASON: usize = 200;

/// How long a stopping job (cancelled, or past its deadline) may spend cleaning up before it is
/// given up: what is left (staged objects, a scratch database named after the job) is the daily
/// sweep's.
pub const CLEANUP_LIMIT: Duration = Duration::from_secs(15 * 60);

/// Reads a job's config snapshot; one this version cannot read is dropped rather than making
/// the whole job unreadable (the job then runs with the current config).
fn snapshot<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SourceConfig>, D::Error> {
    let value = Option::<serde_json::Value>::deserialize(d)?;
    Ok(value.and_then(|v| serde_json::from_value(v).ok()))
}

/// Something that happened, fed into [`Job::handle`].
// One event per step, moved once: its size does not matter, boxing would only add noise.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// The alarm fired (or a trigger asked the job to proceed).
    Wake,
    /// The answer to the last [`Action::Send`].
    Response(HttpResponse),
    /// The last [`Action::Send`] never got an answer (network error, timeout).
    Unreachable(String),
    /// The last [`Action::CopySlice`] ended, with the copy's state as it left it.
    Sliced {
        /// The copy's progress (also persisted by the runtime after every part).
        state: CopyState,
        /// How the slice ended.
        outcome: SliceOutcome,
    },
    /// The manifest of the last [`Action::Commit`] is stored.
    Committed,
    /// Writing the manifest failed.
    CommitFailed(String),
    /// The last [`Action::VerifySlice`] ended.
    VerifySliced {
        /// Where the verification stands.
        state: VerifyState,
        /// `Ok(true)` when every file was read, `Ok(false)` when the slice used its budget.
        outcome: Result<bool, StepError>,
    },
    /// The verification record of the last [`Action::RecordVerification`] is stored.
    Recorded,
    /// The last [`Action::Restore`] ended.
    RestoreIo(Result<IoDone, StepError>),
    /// Stop the job at this step: clean up what it started, then end `cancelled`.
    Cancel {
        /// Who asked (see [`Cancellation::by`]).
        by: String,
        /// Why, as the caller said.
        reason: Option<String>,
    },
    /// The last [`Action::ProbeReplica`] ended: what the probe showed, or why it could not run.
    ReplicaProbed(Result<crate::replica::ProbeAnswer, StepError>),
    /// The last [`Action::Send`] was held back by the API token's request budget
    /// ([`crate::budget`]): nothing was sent; the same step is taken again at this time, and no
    /// retry is counted.
    Throttled(Timestamp),
}

/// What the runtime must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this request, then feed back `Response` or `Unreachable`.
    Send(HttpRequest),
    /// Copy the next slice of a file into R2, then feed back `Sliced`.
    CopySlice(Box<SliceOrder>),
    /// Write the manifest (last), then feed back `Committed` or `CommitFailed`.
    Commit {
        /// Where the manifest goes.
        key: String,
        /// What it says.
        manifest: Box<Manifest>,
    },
    /// The job failed after it began copying: delete everything under this folder (stored
    /// files, unfinished staging objects) so nothing half-written remains. Nothing follows.
    Discard {
        /// The job's R2 folder, with trailing slash.
        folder: String,
        /// The open multipart upload to abort, as `(key, upload_id)`.
        upload: Option<(String, String)>,
    },
    /// Create one queued job per provider state (children of this job, which is over).
    Spawn(Vec<ProviderState>),
    /// Perform a restore's R2 work (read a manifest, stream a dump to an upload URL, write a
    /// drill's record), then feed back `RestoreIo`.
    Restore(Box<Io>),
    /// Read the next slice of a backup back from R2, then feed back `VerifySliced`.
    VerifySlice {
        /// Where the verification stands.
        state: Box<VerifyState>,
        /// The source's slice budget.
        settings: TransferSettings,
    },
    /// Store a verification outcome next to its backup, then feed back `Recorded` (or
    /// `CommitFailed`).
    RecordVerification {
        /// Where the record goes.
        key: String,
        /// What it says.
        record: Verification,
    },
    /// Write a replica's manifest (last) into the replica bucket, then feed back `Committed` or
    /// `CommitFailed`.
    CommitReplica {
        /// Where the manifest goes (the primary manifest's key).
        key: String,
        /// What it says.
        manifest: Box<ReplicaManifest>,
    },
    /// Prove the replica bucket is not the primary one (see [`crate::replica::ReplicaProbe`]),
    /// then feed back `ReplicaProbed`.
    ProbeReplica(crate::replica::ReplicaProbe),
    /// Nothing to do until this time: arm the alarm and feed back `Wake` then.
    Sleep(Timestamp),
    /// The job is over.
    Done,
}

/// Where the bytes of a copy come from.
#[derive(Debug, Clone, PartialEq)]
pub enum CopySource {
    /// The body of this GET.
    Http(HttpRequest),
    /// A graph Ferry reads page by page and writes itself.
    Graph(Box<GraphExport>),
    /// D1 tables and values Ferry reads page by page through the query API and writes as SQL.
    D1Query(Box<crate::providers::d1::query::QueryExport>),
    /// An object of the primary R2 bucket (a replicate job), read by ranges.
    R2 {
        /// Its key.
        key: String,
        /// Its size as the primary manifest records it.
        size: u64,
    },
}

/// One slice of a file's copy from the provider into R2.
#[derive(Debug, Clone, PartialEq)]
pub struct SliceOrder {
    /// Where its bytes come from.
    pub source: CopySource,
    /// Where the copy stands (the target key is `state.key`).
    pub state: CopyState,
    /// The provider's file name.
    pub filename: String,
    /// Content type to store.
    pub content_type: String,
    /// Part size, parallelism and the slice's budget.
    pub settings: TransferSettings,
}

/// How a slice ended.
#[derive(Debug, Clone, PartialEq)]
pub enum SliceOutcome {
    /// The slice used its budget; the copy goes on in the next one.
    Paused,
    /// Every byte is stored and the object is complete at its key.
    Finished(Artifact),
    /// The slice failed; the state keeps every part stored before the failure.
    Failed(StepError),
    /// The signed download URL was refused as expired (or revoked); the state is kept.
    UrlExpired(String),
}

/// The inputs of a transition besides the event.
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The current time.
    pub now: Timestamp,
    /// A random number in `[0, 1)` for backoff jitter.
    pub jitter: f64,
    /// The source's current configuration. A job runs with its own snapshot when it has one
    /// ([`Job::settings`]); this is for jobs stored before snapshots existed.
    pub source: &'a SourceConfig,
    /// The secrets the source names (read fresh for every step).
    pub creds: &'a Credentials,
    /// Dedupe keys of what this source already copied.
    pub seen: &'a [String],
}

impl<'a> Context<'a> {
    fn input(&self, params: &'a serde_json::Value) -> StepInput<'a> {
        StepInput { provider: &self.source.provider, creds: self.creds, now: self.now, params, seen: self.seen }
    }
}

impl Job {
    /// A new job, due at once.
    pub fn new(
        id: JobId,
        source: &SourceConfig,
        trigger: Trigger,
        webhook_id: Option<String>,
        scheduled_for: Option<Timestamp>,
        now: Timestamp,
    ) -> Self {
        Self::with_params(id, source, trigger, webhook_id, scheduled_for, serde_json::json!({}), now)
    }

    /// A new job with trigger parameters (a webhook's JSON body), due at once.
    pub fn with_params(
        id: JobId,
        source: &SourceConfig,
        trigger: Trigger,
        webhook_id: Option<String>,
        scheduled_for: Option<Timestamp>,
        params: serde_json::Value,
        now: Timestamp,
    ) -> Self {
        Self {
            id,
            source: source.name.clone(),
            kind: source.kind().to_string(),
            trigger,
            webhook_id,
            scheduled_for,
            phase: Phase::Queued,
            started_at: now,
            updated_at: now,
            finished_at: None,
            next_step_at: Some(now),
            attempts: 0,
            retries: 0,
            last_error: None,
            error: None,
            note: None,
            params,
            parent: None,
            children: Vec::new(),
            provider: ProviderState::new(&source.provider),
            downloads: Vec::new(),
            artifacts: Vec::new(),
            copy: None,
            transfer_started_at: None,
            catch_up: None,
            warnings: Vec::new(),
            restarts: Vec::new(),
            renewing: false,
            renewals: 0,
            renewed_at_offset: None,
            verify: None,
            verification: None,
            restore: None,
            task: Task::Export,
            config: Some(source.clone()),
            replica: None,
            running_since: None,
            cancelled: None,
            stopping_since: None,
        }
    }

    /// The settings this job runs with: its snapshot, or `current` for a job stored without one.
    pub fn settings<'a>(&'a self, current: &'a SourceConfig) -> &'a SourceConfig {
        self.config.as_ref().unwrap_or(current)
    }

    /// The job's R2 folder.
    pub fn folder(&self) -> String {
        if let Some(replica) = &self.replica {
            return replica.folder();
        }
        manifest::folder(&self.source, self.started_at, &self.id)
    }

    /// The job as shown by the HTTP API: signed URLs and access tokens (`secret_*` fields) are
    /// credentials and are left out.
    ///
    /// A copy in progress shows how many parts are stored (`parts_stored`) and the offset; its
    /// hash state is the engine's. The config snapshot shows the settings the job runs with,
    /// without the `*_secret` fields that name the Worker secrets.
    pub fn public_json(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or(serde_json::Value::Null);
        if let Some(copy) = value.get_mut("copy").and_then(serde_json::Value::as_object_mut) {
            copy.remove("hash_state");
        }
        if let Some(provider) = value.pointer_mut("/config/provider").and_then(serde_json::Value::as_object_mut) {
            provider.retain(|k, _| !k.ends_with("_secret"));
        }
        crate::providers::redact(value)
    }

    /// How far the copy has come at `now`: bytes stored (finished files and the file in flight),
    /// the total when it is known (the file in flight is the last one and its length was
    /// declared), the average rate since copying began, and the time left at that rate.
    pub fn progress(&self, now: Timestamp) -> Option<CopyProgress> {
        if self.phase != Phase::Transferring {
            return None;
        }
        let done: u64 = self.artifacts.iter().map(|a| a.size).sum();
        let current = self.copy.as_ref();
        let copied = done + current.map_or(0, |c| c.offset);
        let files_total = self.replica.as_ref().map_or(self.downloads.len(), |r| r.manifest.artifacts.len());
        let last_file = files_total > 0 && self.artifacts.len() + 1 >= files_total;
        let length = current.and_then(|c| c.validators.as_ref()).and_then(|v| v.length);
        let total = match (last_file, length) {
            // A replica knows every size from the primary manifest.
            _ if self.replica.is_some() => {
                self.replica.as_ref().map(|r| r.manifest.artifacts.iter().map(|a| a.size).sum())
            }
            (true, Some(len)) => Some(done + len),
            _ if files_total > 0 && self.artifacts.len() == files_total => Some(done),
            _ => None,
        };
        let elapsed = self.transfer_started_at.map(|t| now.since(t).as_secs_f64()).unwrap_or(0.0);
        let rate = (elapsed >= 1.0 && copied > 0).then(|| copied as f64 / elapsed);
        let eta = match (total, rate) {
            (Some(total), Some(rate)) if rate > 0.0 => Some((total.saturating_sub(copied) as f64 / rate).ceil() as u64),
            _ => None,
        };
        Some(CopyProgress {
            bytes_copied: copied,
            bytes_total: total,
            bytes_per_second: rate.map(|r| r.round() as u64),
            eta_seconds: eta,
            file: current.map(|c| c.key.rsplit('/').next().unwrap_or_default().to_string()),
            files_done: self.artifacts.len(),
            files_total,
        })
    }

    /// Stops the job for good from outside the state machine (its source was removed): it fails
    /// with `reason`, and a job that began copying hands back its folder and open upload.
    pub fn abandon(self, reason: String, now: Timestamp) -> (Self, Action) {
        if self.phase.is_terminal() {
            return (self, Action::Done);
        }
        let (mut job, action) = self.fail(reason, now);
        job.forget_credentials();
        (job, action)
    }

    /// A job that verifies the backup whose manifest is `manifest_key` (the newest when `None`).
    pub fn verify_of(mut self, manifest_key: Option<String>) -> Self {
        self.task = Task::Verify;
        self.verify = Some(VerifyState::new(manifest_key));
        self
    }

    /// A job that restores (or drills) as `state` says; `task` is `Restore` or `Drill`.
    pub fn restore_of(mut self, task: Task, state: RestoreState) -> Self {
        self.task = task;
        self.restore = Some(state);
        self
    }

    /// A job of `task` (`Restore` or `Drill`) as its plan came out: the restore's state, or why
    /// it cannot be planned. One that cannot is still a job of its task (never an export): it
    /// fails at its first step with the reason.
    pub fn planned(mut self, task: Task, plan: Result<RestoreState, String>) -> Self {
        match plan {
            Ok(state) => self.restore_of(task, state),
            Err(reason) => {
                self.task = task;
                self.restore = None;
                let what = if task == Task::Drill { "the drill" } else { "the restore" };
                self.error = Some(format!("{what} could not start: {reason}"));
                self
            }
        }
    }

    /// Whether a cancel request can be taken: `Err` (the API's 409) once the job has ended.
    pub fn cancellable(&self) -> Result<(), String> {
        if self.phase.is_terminal() {
            let phase = serde_json::to_value(self.phase).ok().and_then(|v| v.as_str().map(str::to_string));
            return Err(format!("job {} has already ended ({})", self.id, phase.unwrap_or_default()));
        }
        Ok(())
    }

    /// When this job's task deadline falls, and the field that sets it.
    pub fn deadline(&self, source: &SourceConfig) -> (Timestamp, Duration, &'static str) {
        let (limit, field) = source.deadlines.of(self.task, source);
        (self.running_since.unwrap_or(self.started_at).plus(limit), limit, field)
    }

    /// A queued child of `parent` that exports the part described by `provider`.
    pub fn child_of(parent: &Self, id: JobId, source: &SourceConfig, provider: ProviderState, now: Timestamp) -> Self {
        let mut job = Self::with_params(id, source, parent.trigger, None, None, parent.params.clone(), now);
        job.provider = provider;
        job.parent = Some(parent.id.clone());
        job
    }

    /// What this job copied that must not be copied again, once it committed.
    pub fn dedupe_key(&self) -> Option<String> {
        (self.phase == Phase::Committed).then(|| self.provider.dedupe_key()).flatten()
    }

    /// The transition function: `(job, event, context) → (job, action)`. The job runs with its
    /// own snapshot of the source's settings, whatever the context's current config says.
    pub fn handle(self, event: Event, cx: &Context<'_>) -> (Self, Action) {
        let snapshot = self.config.clone();
        let cx = Context { source: snapshot.as_ref().unwrap_or(cx.source), ..*cx };
        let (mut job, action) = self.transition(event, &cx);
        if job.phase.is_terminal() {
            job.forget_credentials();
        }
        // No sleep outlasts the task's deadline (or a stopping job's clean-up limit): the job
        // wakes then and is stopped.
        let action = match action {
            Action::Sleep(at) if !job.phase.is_terminal() => {
                let limit = match job.stopping_since {
                    Some(since) => since.plus(CLEANUP_LIMIT),
                    None => job.deadline(cx.source).0,
                };
                let at = at.min(limit.max(cx.now));
                job.next_step_at = Some(at);
                Action::Sleep(at)
            }
            other => other,
        };
        (job, action)
    }

    /// A finished job keeps no live credential: every `secret_*` value (access tokens, JWTs,
    /// signed download URLs) is blanked, so storage holds nothing that still opens the source.
    pub fn forget_credentials(&mut self) {
        fn blank(v: &mut serde_json::Value) {
            match v {
                serde_json::Value::Object(map) => {
                    for (k, val) in map.iter_mut() {
                        if k.starts_with("secret_") && val.is_string() {
                            *val = serde_json::Value::String(String::new());
                        } else {
                            blank(val);
                        }
                    }
                }
                serde_json::Value::Array(items) => items.iter_mut().for_each(blank),
                _ => {}
            }
        }
        let Ok(mut value) = serde_json::to_value(&*self) else { return };
        blank(&mut value);
        if let Ok(job) = serde_json::from_value(value) {
            *self = job;
        }
    }

    fn transition(mut self, event: Event, cx: &Context<'_>) -> (Self, Action) {
        self.updated_at = cx.now;
        match (self.phase, event) {
            (_, Event::Wake) => self.wake(cx),
            (Phase::Exporting, Event::Response(resp)) => self.on_response(&resp, cx),
            (Phase::Exporting | Phase::Transferring, Event::Unreachable(msg)) => {
                self.unanswered(cx);
                self.retry(StepError::transient(msg), cx)
            }
            (Phase::Transferring, Event::Sliced { state, outcome }) => self.on_slice(state, outcome, cx),
            (Phase::Transferring, Event::ReplicaProbed(answer)) => self.on_probe(answer, cx),
            (Phase::Transferring, Event::Committed) => {
                self.phase = Phase::Committed;
                self.next_step_at = None;
                self.retries = 0;
                self.last_error = None;
                (self, Action::Done)
            }
            (Phase::Transferring | Phase::Verifying, Event::CommitFailed(msg)) => {
                self.retry(StepError::transient(msg), cx)
            }
            (Phase::Verifying, Event::VerifySliced { state, outcome }) => self.on_verify_slice(state, outcome, cx),
            (Phase::Verifying, Event::Recorded) => self.on_recorded(cx.now),
            (Phase::Restoring, Event::Response(resp)) => {
                let answer = match self.restore.as_mut() {
                    Some(state) => state.on_response(&resp, cx.now),
                    None => Err(StepError::permanent("restore job without its state")),
                };
                self.on_restore(answer, cx)
            }
            (Phase::Restoring, Event::RestoreIo(done)) => {
                let answer = match (self.restore.as_mut(), done) {
                    (Some(state), Ok(done)) => state.on_io(done, cx.now),
                    (_, Err(e)) => Err(e),
                    (None, _) => Err(StepError::permanent("restore job without its state")),
                };
                self.on_restore(answer, cx)
            }
            (Phase::Restoring, Event::Unreachable(msg)) => match self.restore.as_mut().and_then(|s| s.unanswered(&msg))
            {
                Some(reason) => self.restore_failed(StepError::permanent(reason), cx),
                None => self.restore_failed(StepError::transient(msg), cx),
            },
            (phase, Event::Cancel { by, reason }) if !phase.is_terminal() => self.cancel(by, reason, cx),
            (phase, Event::Throttled(until)) if !phase.is_terminal() => {
                self.next_step_at = Some(until);
                (self, Action::Sleep(until))
            }
            // An answer that does not belong to the current phase (a duplicate delivery after a
            // restart): ignore it and carry on from the persisted state.
            (_, _) => self.idle(cx.now),
        }
    }

    fn idle(self, now: Timestamp) -> (Self, Action) {
        if self.phase.is_terminal() {
            return (self, Action::Done);
        }
        let at = self.next_step_at.unwrap_or(now);
        (self, Action::Sleep(at))
    }

    fn wake(mut self, cx: &Context<'_>) -> (Self, Action) {
        if self.phase.is_terminal() {
            return (self, Action::Done);
        }
        if let Some(since) = self.stopping_since {
            if cx.now.since(since) > CLEANUP_LIMIT {
                let message = self.error.clone().or_else(|| self.last_error.clone()).unwrap_or_default();
                let limit = humanize(CLEANUP_LIMIT);
                // Nothing more is sent: the staged objects and a scratch database named after the
                // job are the daily sweep's.
                self.stopping_since = None;
                self.restore = None;
                return self
                    .fail(format!("{message}; its clean-up did not finish within {limit} and was given up"), cx.now);
            }
        } else if !self.phase.is_terminal() && self.phase != Phase::Queued {
            let (due, limit, field) = self.deadline(cx.source);
            if cx.now >= due {
                let task = serde_json::to_value(self.task).ok().and_then(|v| v.as_str().map(str::to_string));
                let message = format!(
                    "the {} job did not finish within its deadline of {} ({field})",
                    task.unwrap_or_default(),
                    humanize(limit)
                );
                return self.stop(message, cx);
            }
        }
        if let Some(at) = self.next_step_at {
            if at > cx.now {
                return (self, Action::Sleep(at));
            }
        }
        if self.phase == Phase::Queued {
            if let Some(reason) = self.error.take() {
                // A restore or drill that could not be planned ([`Job::planned`]).
                return self.fail(reason, cx.now);
            }
            self.running_since = Some(cx.now);
            self.phase = match self.task {
                Task::Export => Phase::Exporting,
                Task::Verify => Phase::Verifying,
                Task::Replicate => {
                    self.transfer_started_at = Some(cx.now);
                    Phase::Transferring
                }
                Task::Restore | Task::Drill => Phase::Restoring,
            };
        }
        match self.phase {
            Phase::Exporting => {
                if !self.renewing && cx.now.since(self.started_at) > cx.source.export_timeout {
                    let limit = humanize(cx.source.export_timeout);
                    return self.fail(format!("the export did not finish within {limit}"), cx.now);
                }
                let decided = self.provider.advance(&cx.input(&self.params));
                match decided {
                    Ok(Some(progress)) => return self.apply(progress, cx),
                    Ok(None) => {}
                    Err(e) => return self.step_failed(e, cx),
                }
                match self.provider.next_request(&cx.input(&self.params)) {
                    Ok(req) => {
                        self.attempts += 1;
                        (self, Action::Send(req))
                    }
                    Err(e) => self.step_failed(e, cx),
                }
            }
            Phase::Transferring if self.task == Task::Replicate => self.replica_step(cx),
            Phase::Transferring => match self.downloads.get(self.artifacts.len()).cloned() {
                Some(download) => self.slice(&download, cx),
                None => self.commit(cx),
            },
            Phase::Verifying => self.verify_step(cx),
            Phase::Restoring => self.restore_step(cx),
            Phase::Queued
            | Phase::Committed
            | Phase::Failed
            | Phase::Skipped
            | Phase::Dispatched
            | Phase::Verified
            | Phase::Restored
            | Phase::Cancelled => self.idle(cx.now),
        }
    }

    /// Orders the next slice of the current file's copy, unless the watchdog says stop.
    fn slice(mut self, download: &Download, cx: &Context<'_>) -> (Self, Action) {
        let settings = cx.source.transfer;
        let mut state = match self.copy.take() {
            Some(state) => state,
            None => {
                let taken: Vec<&str> = self.artifacts.iter().map(|a| a.key.rsplit('/').next().unwrap_or("")).collect();
                let key = format!("{}{}", self.folder(), manifest::object_name(&download.filename, &taken));
                CopyState::new(key, self.artifacts.len() as u32, cx.now)
            }
        };
        if let Some(why) = self.copy_stopped(&state, &download.filename, cx) {
            self.copy = Some(state);
            return self.fail(why, cx.now);
        }
        let prepared = match &download.origin {
            Origin::Url { secret_url, authenticated } => self
                .provider
                .download_request(&cx.source.provider, secret_url, *authenticated, cx.creds)
                .map(CopySource::Http),
            Origin::Graph => {
                cx.source.provider.graph_export(cx.creds, state.started_at).map(|g| CopySource::Graph(Box::new(g)))
            }
            Origin::D1Query => {
                self.provider.query_export(&cx.source.provider, cx.creds).map(|q| CopySource::D1Query(Box::new(q)))
            }
        };
        let source = match prepared {
            Ok(s) => s,
            Err(e) => {
                self.copy = Some(state);
                return self.step_failed(e, cx);
            }
        };
        // Counted before the slice runs: a slice cut off without storing a part counts as stalled.
        state.slices += 1;
        state.stalled += 1;
        self.attempts += 1;
        self.copy = Some(state.clone());
        let order = SliceOrder {
            source,
            state,
            filename: download.filename.clone(),
            content_type: download.content_type.clone(),
            settings,
        };
        (self, Action::CopySlice(Box::new(order)))
    }

    /// Why the copy must stop for good before its next slice (its watchdogs), if it must.
    fn copy_stopped(&self, state: &CopyState, filename: &str, cx: &Context<'_>) -> Option<String> {
        let settings = cx.source.transfer;
        let copying_since = self.transfer_started_at.unwrap_or(state.started_at);
        if cx.now.since(copying_since) > settings.copy_timeout {
            let limit = humanize(settings.copy_timeout);
            return Some(format!("copying did not finish within {limit} (copy_timeout_minutes)"));
        }
        if state.stalled >= settings.max_stalled_slices {
            let n = state.stalled;
            let last = self.last_error.as_deref().map(|e| format!("; last error: {e}")).unwrap_or_default();
            return Some(format!(
                "the copy of {filename} made no progress in {n} consecutive slices (no part stored); giving up \
                 (max_stalled_slices){last}"
            ));
        }
        if state.restarts > settings.max_restarts {
            let why = state.last_restart.clone().unwrap_or_default();
            return Some(format!(
                "the copy of {filename} had to restart from zero more than {} times; last: {why}",
                settings.max_restarts
            ));
        }
        None
    }

    fn on_slice(mut self, state: CopyState, outcome: SliceOutcome, cx: &Context<'_>) -> (Self, Action) {
        let progressed = state.stalled == 0;
        let before = self.copy.as_ref().map_or(0, |c| c.restarts);
        if state.restarts > before {
            let file = self.downloads.get(self.artifacts.len()).map_or("?", |d| d.filename.as_str());
            let why = state.last_restart.as_deref().unwrap_or("no reason given");
            self.restarts.push(format!(
                "{file}: restarted from byte 0 ({} of {}): {why}",
                state.restarts - before,
                state.restarts
            ));
        }
        for warning in &state.warnings {
            if !self.warnings.contains(warning) {
                self.warnings.push(warning.clone());
            }
        }
        self.copy = Some(state);
        match outcome {
            SliceOutcome::Paused => {
                self.retries = 0;
                self.last_error = None;
                self.next_step_at = Some(cx.now);
                (self, Action::Sleep(cx.now))
            }
            SliceOutcome::Finished(artifact) => {
                if let Some(Err(why)) = self.replica.as_ref().map(|r| r.check(self.artifacts.len(), &artifact)) {
                    // Its upload is complete: the folder's deletion removes the object.
                    self.copy = None;
                    return self.fail(why, cx.now);
                }
                self.copy = None;
                self.note_all(crate::providers::artifact_warnings(&artifact));
                // The part hashes stay in the copy's part records (`CopyState::part_key`), out of
                // the job's record, which stays small whatever the part count; the runtime puts
                // them into the manifest when it writes it.
                let mut artifact = artifact;
                artifact.part_sha256 = Vec::new();
                self.artifacts.push(artifact);
                self.step_succeeded(cx.now)
            }
            SliceOutcome::UrlExpired(answer) => {
                let file = self.downloads.get(self.artifacts.len()).map_or("?", |d| d.filename.as_str()).to_string();
                if !self.provider.can_renew_urls() {
                    return self.fail(
                        format!(
                            "the signed URL of {file} expired mid-copy and this export cannot issue a new one \
                             ({answer}); the copy must fit the URL's lifetime"
                        ),
                        cx.now,
                    );
                }
                let offset = self.copy.as_ref().map_or(0, |c| c.offset);
                if self.renewed_at_offset == Some(offset) {
                    return self.fail(format!("{answer} (a freshly issued URL was refused too)"), cx.now);
                }
                if self.renewals >= MAX_RENEWALS {
                    return self
                        .fail(format!("the signed URL of {file} expired {MAX_RENEWALS} times ({answer})"), cx.now);
                }
                self.renewing = true;
                self.renewed_at_offset = Some(offset);
                self.phase = Phase::Exporting;
                self.step_succeeded(cx.now)
            }
            SliceOutcome::Failed(err) => {
                if progressed {
                    // Parts were stored before the failure: the copy is moving, start counting anew.
                    self.retries = 0;
                }
                self.step_failed(err, cx)
            }
        }
    }

    fn commit(mut self, cx: &Context<'_>) -> (Self, Action) {
        let now = cx.now;
        let folder = self.folder();
        self.finished_at = Some(now);
        self.attempts += 1;
        let manifest = Manifest {
            source: self.source.clone(),
            kind: self.kind.clone(),
            job_id: self.id.clone(),
            trigger: self.trigger,
            started_at: self.started_at,
            scheduled_for: self.scheduled_for,
            finished_at: now,
            provider: self.provider.references(&cx.source.provider),
            artifacts: self.artifacts.clone(),
        };
        (self, Action::Commit { key: manifest::manifest_key(&folder), manifest: Box::new(manifest) })
    }

    /// The next verify step: a slice to read, or the record once every file was read.
    fn verify_step(mut self, cx: &Context<'_>) -> (Self, Action) {
        let mut state = self.verify.take().unwrap_or_else(|| VerifyState::new(None));
        if state.done() {
            let record = state.verification(&self.id, cx.now);
            let key = crate::verify::verification_key(state.manifest_key.as_deref().unwrap_or_default());
            self.verify = Some(state);
            self.attempts += 1;
            return (self, Action::RecordVerification { key, record });
        }
        state.slices += 1;
        self.attempts += 1;
        self.verify = Some(state.clone());
        (self, Action::VerifySlice { state: Box::new(state), settings: cx.source.transfer })
    }

    fn on_verify_slice(
        mut self,
        state: VerifyState,
        outcome: Result<bool, StepError>,
        cx: &Context<'_>,
    ) -> (Self, Action) {
        let progressed = self.verify.as_ref().is_none_or(|v| v.bytes_read < state.bytes_read || v.index < state.index);
        self.verify = Some(state);
        match outcome {
            Ok(_) => self.step_succeeded(cx.now),
            Err(e) => {
                if progressed {
                    self.retries = 0;
                }
                self.step_failed(e, cx)
            }
        }
    }

    fn on_recorded(mut self, now: Timestamp) -> (Self, Action) {
        let Some(state) = self.verify.clone() else { return self.idle(now) };
        let record = state.verification(&self.id, now);
        self.verification = Some(record.clone());
        if record.mismatches.is_empty() {
            self.phase = Phase::Verified;
            self.finished_at = Some(now);
            self.next_step_at = None;
            self.retries = 0;
            self.last_error = None;
            return (self, Action::Done);
        }
        let backup = state.manifest_key.as_deref().and_then(crate::manifest::folder_of).unwrap_or("?").to_string();
        self.fail(format!("backup {backup} failed verification: {}", record.mismatches.join("; ")), now)
    }

    /// The next restore step: a request, R2 work, or the end.
    fn restore_step(mut self, cx: &Context<'_>) -> (Self, Action) {
        let Some(mut state) = self.restore.take() else {
            return self.fail("restore job without its state".into(), cx.now);
        };
        let next = state.next(&RestoreCx { source: cx.source, creds: cx.creds, job: &self.id, now: cx.now });
        if matches!(next, Ok(RestoreNext::Send(_))) {
            state.sending(&self.id);
        }
        self.restore = Some(state);
        match next {
            Ok(RestoreNext::Send(req)) => {
                self.attempts += 1;
                (self, Action::Send(req))
            }
            Ok(RestoreNext::Io(Io::Record { .. })) if self.cancelled.is_some() => {
                // A cancelled drill found nothing about the backup: no record goes next to it.
                let answer = match self.restore.as_mut() {
                    Some(state) => state.on_io(IoDone::Recorded, cx.now),
                    None => Err(StepError::permanent("restore job without its state")),
                };
                self.on_restore(answer, cx)
            }
            Ok(RestoreNext::Io(io)) => {
                self.attempts += 1;
                (self, Action::Restore(Box::new(io)))
            }
            Ok(RestoreNext::Finished(Ok(note))) => {
                self.phase = Phase::Restored;
                self.note = Some(note);
                self.finished_at = Some(cx.now);
                self.next_step_at = None;
                self.retries = 0;
                self.last_error = None;
                (self, Action::Done)
            }
            Ok(RestoreNext::Finished(Err(message))) => self.fail(message, cx.now),
            Err(e) => self.restore_failed(e, cx),
        }
    }

    fn on_restore(mut self, answer: Result<Answer, StepError>, cx: &Context<'_>) -> (Self, Action) {
        match answer {
            Ok(Answer::Continue) => self.step_succeeded(cx.now),
            Ok(Answer::Pending) => {
                self.retries = 0;
                self.last_error = None;
                let at = cx.now.plus(cx.source.poll_interval);
                self.next_step_at = Some(at);
                (self, Action::Sleep(at))
            }
            Ok(Answer::WaitUntil(at)) => {
                self.retries = 0;
                self.last_error = None;
                let at = at.max(cx.now);
                self.next_step_at = Some(at);
                (self, Action::Sleep(at))
            }
            Err(e) => self.restore_failed(e, cx),
        }
    }

    /// A restore step failed: retried while the error is transient and tries are left; then a
    /// drill deletes its scratch database and records the outcome before the job fails.
    fn restore_failed(mut self, err: StepError, cx: &Context<'_>) -> (Self, Action) {
        if err.is_retryable() && self.retries < cx.source.retry.max_attempts {
            return self.retry(err, cx);
        }
        let message = if err.is_retryable() {
            format!("{} (gave up after {} tries)", err.message(), self.retries + 1)
        } else {
            err.message().to_string()
        };
        if self.restore.as_mut().is_some_and(|s| s.fail_after_cleanup(message.clone())) {
            let (mut job, action) = self.step_succeeded(cx.now);
            job.last_error = Some(message);
            return (job, action);
        }
        self.fail(message, cx.now)
    }

    fn on_response(mut self, resp: &HttpResponse, cx: &Context<'_>) -> (Self, Action) {
        let answer = self.provider.on_response(&cx.input(&self.params), resp);
        match answer {
            Ok(progress) => self.apply(progress, cx),
            Err(e) => {
                if e.is_retryable() {
                    self.unanswered(cx);
                }
                self.step_failed(e, cx)
            }
        }
    }

    /// The last request got no usable answer: if it created something at the provider, the
    /// provider decides how to avoid a duplicate, and the job records what it says.
    fn unanswered(&mut self, cx: &Context<'_>) {
        if self.phase != Phase::Exporting || self.renewing {
            return;
        }
        if let Some(warning) = self.provider.create_unanswered(&cx.input(&self.params)) {
            if !self.warnings.contains(&warning) {
                self.warnings.push(warning);
            }
        }
    }

    fn apply(mut self, progress: Progress, cx: &Context<'_>) -> (Self, Action) {
        match progress {
            Progress::Pending { poll_after } => {
                self.retries = 0;
                self.last_error = None;
                let at = cx.now.plus(self.capped(poll_after.unwrap_or(cx.source.poll_interval)));
                self.next_step_at = Some(at);
                (self, Action::Sleep(at))
            }
            Progress::Ready(downloads) if self.renewing => {
                // Same files, fresh URLs: the copy resumes at its persisted offset.
                for d in &mut self.downloads {
                    match downloads.iter().find(|fresh| fresh.filename == d.filename) {
                        Some(fresh) => d.origin = fresh.origin.clone(),
                        None => {
                            let name = d.filename.clone();
                            return self
                                .fail(format!("the provider no longer lists {name} while renewing its URL"), cx.now);
                        }
                    }
                }
                self.renewing = false;
                self.renewals += 1;
                self.phase = Phase::Transferring;
                self.step_succeeded(cx.now)
            }
            Progress::Ready(downloads) => {
                self.note_all(self.provider.notes());
                self.phase = Phase::Transferring;
                self.transfer_started_at = Some(cx.now);
                self.downloads = downloads;
                self.step_succeeded(cx.now)
            }
            Progress::Again => {
                self.next_step_at = Some(cx.now);
                (self, Action::Sleep(cx.now))
            }
            Progress::Failed(message) => self.fail(message, cx.now),
            Progress::Skip(reason) => {
                self.phase = Phase::Skipped;
                self.note = Some(reason);
                self.finished_at = Some(cx.now);
                self.next_step_at = None;
                (self, Action::Done)
            }
            Progress::Spawn(children) => {
                self.phase = Phase::Dispatched;
                self.note = Some(format!("queued {} jobs, one per backend", children.len()));
                self.finished_at = Some(cx.now);
                self.next_step_at = None;
                (self, Action::Spawn(children))
            }
        }
    }

    /// Adds warnings the job does not carry yet.
    fn note_all(&mut self, warnings: Vec<String>) {
        for warning in warnings {
            if !self.warnings.contains(&warning) {
                self.warnings.push(warning);
            }
        }
    }

    fn step_succeeded(mut self, now: Timestamp) -> (Self, Action) {
        self.retries = 0;
        self.last_error = None;
        self.next_step_at = Some(now);
        (self, Action::Sleep(now))
    }

    fn step_failed(self, err: StepError, cx: &Context<'_>) -> (Self, Action) {
        if err.is_retryable() {
            self.retry(err, cx)
        } else {
            let message = err.message().to_string();
            self.fail(message, cx.now)
        }
    }

    fn retry(mut self, err: StepError, cx: &Context<'_>) -> (Self, Action) {
        self.retries += 1;
        let policy = cx.source.retry;
        if self.retries > policy.max_attempts {
            let tries = self.retries;
            return self.fail(format!("{} (gave up after {tries} tries)", err.message()), cx.now);
        }
        let hint = match &err {
            StepError::Transient { retry_after, .. } => *retry_after,
            StepError::Permanent { .. } => None,
        };
        let delay = self.capped(policy.delay_with_hint(self.retries, cx.jitter, hint));
        let at = cx.now.plus(delay);
        self.last_error = Some(err.message().to_string());
        self.next_step_at = Some(at);
        (self, Action::Sleep(at))
    }

    /// A wait, shortened to the provider's limit on the gap between two polls while its export
    /// runs (D1 cancels an export that is not polled continually), whatever the error or
    /// `Retry-After` said. Past the cap the poll is sent anyway.
    fn capped(&self, wait: Duration) -> Duration {
        match (self.phase, self.provider.max_poll_gap()) {
            (Phase::Exporting, Some(cap)) => wait.min(cap),
            _ => wait,
        }
    }

    /// A cancel request: recorded, then the job stops at this step as [`Job::stop`] says and ends
    /// `cancelled`. A second request while it cleans up changes nothing.
    fn cancel(mut self, by: String, reason: Option<String>, cx: &Context<'_>) -> (Self, Action) {
        if self.cancelled.is_some() {
            return self.idle(cx.now);
        }
        let reason = reason.map(|r| r.chars().take(MAX_CANCEL_REASON).collect::<String>());
        let message = match &reason {
            Some(r) => format!("cancelled by {by}: {r}"),
            None => format!("cancelled by {by}"),
        };
        self.cancelled = Some(Cancellation { by, reason, at: cx.now });
        if self.stopping_since.is_some() {
            // Already cleaning up after its deadline: it ends `cancelled` when that is done.
            return self.idle(cx.now);
        }
        self.stop(message, cx)
    }

    /// Stops the job with `message` (a cancel, or its deadline): it takes no new work and cleans
    /// up what it started. A restore or drill runs its own clean-up steps first (staged objects
    /// deleted, a drill's scratch database or instance deleted, its record written), then ends;
    /// any other job ends now, a copy's open upload aborted and its folder deleted.
    fn stop(mut self, message: String, cx: &Context<'_>) -> (Self, Action) {
        if self.phase == Phase::Restoring {
            if let Some(state) = self.restore.as_mut() {
                if state.fail_after_cleanup(message.clone()) {
                    self.stopping_since = Some(cx.now);
                    let (mut job, action) = self.step_succeeded(cx.now);
                    job.last_error = Some(message);
                    return (job, action);
                }
            }
        }
        self.fail(message, cx.now)
    }

    fn fail(mut self, message: String, now: Timestamp) -> (Self, Action) {
        let was_copying = self.phase == Phase::Transferring || self.transfer_started_at.is_some();
        self.phase = if self.cancelled.is_some() { Phase::Cancelled } else { Phase::Failed };
        self.stopping_since = None;
        self.error = Some(message);
        self.finished_at = Some(now);
        self.next_step_at = None;
        self.downloads.clear();
        self.artifacts.clear();
        let upload = self.copy.take().and_then(|c| c.upload_id.map(|id| (c.key, id)));
        // A replicate job cleans up only in a bucket proven not to be the primary: its folder
        // there is the primary's backup.
        let may_clean = self.replica.as_ref().is_none_or(|r| r.identity == crate::replica::Identity::Distinct);
        let action =
            if was_copying && may_clean { Action::Discard { folder: self.folder(), upload } } else { Action::Done };
        (self, action)
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// How many times one job may ask the provider for fresh download URLs.
pub const MAX_RENEWALS: u32 = 10;

fn humanize(d: Duration) -> String {
    let s = d.as_secs();
    if s.is_multiple_of(3600) {
        format!("{} h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{} min", s / 60)
    } else {
        format!("{s} s")
    }
}

mod replica;
#[cfg(test)]
mod tests;
