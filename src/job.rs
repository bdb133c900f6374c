//! The job engine: one job of one source, as a state machine.
//!
//! Every job is an [`Envelope`] (id, source, task, trigger, phase, times, tries, error, warnings:
//! what every task shares) and its task's own state, a [`Work`]. Each task is its own machine in
//! its own module, with its own state type:
//!
//! - [`export`]: a backup: `queued → exporting → transferring → committed | failed`;
//! - [`verify`]: read a committed backup back and check every hash: `verifying → verified`;
//! - [`replica`]: copy a committed backup into the replica bucket: `transferring → committed`;
//! - [`restore`]: a restore or a drill, driven by its provider's phase machine: `restoring →
//!   restored`.
//!
//! Exports and replicate jobs copy files with the same sliced, resumable engine ([`copying`]).
//!
//! The transition function [`Job::handle`] takes the job, one [`Event`] and a [`Context`] (now, a
//! random number for jitter, the source's config and credentials) and returns the next job and
//! one [`Action`] for the runtime to perform: send a request, copy a file into R2, write the
//! manifest, sleep until a time, or nothing. The engine here owns what every task shares: the
//! queue, the task's deadline, retries with backoff, cancel and the clean-up of a failure; it
//! hands every other step and event to the task's module (`tasks!` registers them). The
//! runtime persists the job after every step, so a job resumes wherever it was after the Worker
//! or its Durable Object restarts; a spurious or repeated wake-up is a no-op.
//!
//! Only `committed` is a backup. `failed` carries the provider's own message, and a job that
//! fails after it began copying hands its folder back for deletion, so a failure never leaves
//! something that looks like a backup.

use std::ops::{Deref, DerefMut};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::SourceConfig;
use crate::error::StepError;
use crate::http::{HttpRequest, HttpResponse};
use crate::manifest::{self, Artifact, Manifest};
use crate::providers::aura::GraphExport;
use crate::providers::{Credentials, ProviderState, StepInput};
use crate::replica::ReplicaManifest;
use crate::restore::{Io, IoDone};
use crate::time::Timestamp;
use crate::transfer::{CopyState, ResumePoints, TransferSettings};
use crate::verify::{Verification, VerifyState};

pub use crate::identity::{JobId, Task, Trigger};
pub use copying::Copying;
pub use export::Export;
pub use replica::Replicate;
pub use restore::Restoring;
pub use verify::Verifying;
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

/// One job, as persisted in the source's Durable Object: the envelope every task shares and the
/// task's own state. Both are stored flat in one JSON object, `task` naming the task (a job
/// stored without it is an export), as the HTTP API shows it. The envelope's fields read
/// through the job (`job.phase`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// What every job has.
    #[serde(flatten)]
    pub head: Envelope,
    /// What the job does, with that task's own state.
    #[serde(flatten)]
    pub work: Work,
}

impl Deref for Job {
    type Target = Envelope;
    fn deref(&self) -> &Envelope {
        &self.head
    }
}

impl DerefMut for Job {
    fn deref_mut(&mut self) -> &mut Envelope {
        &mut self.head
    }
}

/// What every job has, whatever its task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// Id.
    pub id: JobId,
    /// Source name.
    pub source: String,
    /// Provider kind.
    pub kind: String,
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
    /// Why the job was skipped, or what a finished restore says.
    #[serde(default)]
    pub note: Option<String>,
    /// The trigger's parameters (a webhook's JSON body; `{}` for cron).
    #[serde(default)]
    pub params: serde_json::Value,
    /// The job that queued this one (an account's export; a replicate job's export).
    #[serde(default)]
    pub parent: Option<JobId>,
    /// The jobs this one queued (account mode; a committed export's replicate job).
    #[serde(default)]
    pub children: Vec<JobId>,
    /// Set on a cron job that serves fire times missed while the source was busy or no tick ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub catch_up: Option<String>,
    /// What the job wants its reader to know that is not an error (a duplicate export that may
    /// exist at the provider after an unanswered request).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The source's settings when the job was created (secret *names*, never values). Every
    /// step runs with these, so a config edited mid-job cannot send the old bookmark to another
    /// database or describe the artifact with settings it was not made with. `None` for a job
    /// stored before snapshots existed, or whose snapshot cannot be read: it runs with the
    /// current config.
    #[serde(default, deserialize_with = "snapshot", skip_serializing_if = "Option::is_none")]
    pub config: Option<SourceConfig>,
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

/// The tasks a job can have, one line each: the [`Task`] that names it, and the module whose
/// machine runs it. Each module has a state type (serialized flat into the job) and
///
/// - `START`: the phase the job enters when it leaves the queue;
/// - `step(job, cx)`: the job's next step once it is due (a wake-up in a running phase);
/// - `on_event(job, event, cx)`: any other event (an answer, a slice's end, a commit).
///
/// A task's state is read and changed through the accessors [`Work`] gets for it.
macro_rules! tasks {
    ($($task:ident => $module:ident :: $state:ident),+ $(,)?) => {
        /// What a job does, with that task's own state (see each module).
        #[derive(Debug, Clone, PartialEq, Serialize)]
        #[serde(tag = "task", rename_all = "snake_case")]
        pub enum Work {
            $(
                #[doc = concat!("[`Task::", stringify!($task), "`], run by [`", stringify!($module), "`].")]
                $task($module::$state),
            )+
        }

        impl Work {
            /// Which task this is.
            pub fn task(&self) -> Task {
                match self {
                    $(Self::$task(_) => Task::$task,)+
                }
            }
        }

        impl Job {
            fn start_phase(&self) -> Phase {
                match self.work.task() {
                    $(Task::$task => $module::START,)+
                }
            }

            fn task_step(self, cx: &Context<'_>) -> (Self, Action) {
                match self.work.task() {
                    $(Task::$task => $module::step(self, cx),)+
                }
            }

            fn task_event(self, event: Event, cx: &Context<'_>) -> (Self, Action) {
                match self.work.task() {
                    $(Task::$task => $module::on_event(self, event, cx),)+
                }
            }
        }

        /// A job's task state, read from its flat record: `task` says which (an export when it
        /// is missing, as jobs were stored before other tasks existed).
        impl<'de> Deserialize<'de> for Work {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                use serde::de::Error;
                let mut map = serde_json::Map::<String, serde_json::Value>::deserialize(d)?;
                let task = match map.remove("task") {
                    Some(value) => Task::deserialize(value).map_err(D::Error::custom)?,
                    None => Task::Export,
                };
                let value = serde_json::Value::Object(map);
                match task {
                    $(Task::$task => {
                        $module::$state::deserialize(value).map(Self::$task).map_err(D::Error::custom)
                    })+
                }
            }
        }
    };
}

tasks! {
    Export => export::Export,
    Verify => verify::Verifying,
    Replicate => replica::Replicate,
    Restore => restore::Restoring,
    Drill => restore::Restoring,
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

/// Steps taken back to back in one invocation before the job yields to a fresh alarm.
pub const MAX_INLINE_STEPS: u32 = 16;

impl Action {
    /// Whether performing it does I/O that may never return (a request, a slice, an R2 write):
    /// the runtime arms a watchdog alarm first, so a step cut off mid-way is taken again from
    /// the persisted job.
    pub fn may_hang(&self) -> bool {
        match self {
            Self::Send(_)
            | Self::CopySlice(_)
            | Self::Commit { .. }
            | Self::CommitReplica { .. }
            | Self::VerifySlice { .. }
            | Self::RecordVerification { .. }
            | Self::Restore(_)
            | Self::ProbeReplica(_) => true,
            Self::Discard { .. } | Self::Spawn(_) | Self::Sleep(_) | Self::Done => false,
        }
    }
}

/// What the runtime does with a [`Action::Sleep`] ([`after_sleep`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterSleep {
    /// Take the next step in this invocation.
    StepNow,
    /// Arm the alarm for this time and end the invocation.
    Alarm(Timestamp),
}

/// Whether the job's next step, due `at`, runs in this invocation: when it is due, fewer than
/// [`MAX_INLINE_STEPS`] steps ran (`steps`, this one included) and no slice ran (each slice
/// gets an invocation's budgets afresh); at once whenever a cancel request waits. Otherwise the
/// alarm wakes it, never in the past.
pub fn after_sleep(at: Timestamp, now: Timestamp, steps: u32, sliced: bool, cancel_waiting: bool) -> AfterSleep {
    if cancel_waiting || (at <= now && steps < MAX_INLINE_STEPS && !sliced) {
        AfterSleep::StepNow
    } else {
        AfterSleep::Alarm(at.max(now))
    }
}

/// Where the bytes of a copy come from./// Where the bytes of a copy come from.
#[derive(Debug, Clone, PartialEq)]
pub enum CopySource {
    /// The body of this GET.
    Http(HttpRequest),
    /// A graph Ferry reads page by page and writes itself.
    Graph(Box<GraphExport>),
    /// D1 tables and values Ferry reads page by page through the query API and writes as SQL.
    D1Query(Box<crate::providers::d1::query::QueryExport>),
    /// Any of the others' bytes, encrypted to the source's age recipients on the way
    /// ([`crate::transfer::sealed`]).
    Sealed {
        /// Where the plaintext comes from (a download or a generated file).
        plain: Box<CopySource>,
        /// Who can read the file.
        recipients: Vec<crate::encryption::Recipient>,
        /// Whether the plaintext is a SQL dump whose MD5 and row counts are recorded.
        tally: bool,
    },
    /// An object of the primary R2 bucket (a replicate job), read by ranges.
    R2 {
        /// Its key.
        key: String,
        /// Its size as the primary manifest records it.
        size: u64,
    },
}

impl CopySource {
    /// The resume points of a copy from this source ([`ResumePoints`]: when its state is saved):
    /// every settled part for bytes read from an offset (a download, a replica's ranged reads of
    /// the primary object), only a slice's end for a file Ferry generates page by page from a
    /// cursor (the Aura graph export, D1's query artifact).
    pub fn resume_points(&self) -> ResumePoints {
        match self {
            Self::Http(_) | Self::R2 { .. } => ResumePoints::EveryPart,
            Self::Graph(_) | Self::D1Query(_) | Self::Sealed { .. } => ResumePoints::SliceEnd,
        }
    }
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
    /// A new export job, due at once.
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

    /// A new export job with trigger parameters (a webhook's JSON body), due at once.
    pub fn with_params(
        id: JobId,
        source: &SourceConfig,
        trigger: Trigger,
        webhook_id: Option<String>,
        scheduled_for: Option<Timestamp>,
        params: serde_json::Value,
        now: Timestamp,
    ) -> Self {
        let head = Envelope {
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
            catch_up: None,
            warnings: Vec::new(),
            config: Some(source.clone()),
            running_since: None,
            cancelled: None,
            stopping_since: None,
        };
        Self { head, work: Work::Export(Export::new(ProviderState::new(&source.provider))) }
    }

    /// What the job does.
    pub fn task(&self) -> Task {
        self.work.task()
    }

    /// The settings this job runs with: its snapshot, or `current` for a job stored without one.
    pub fn settings<'a>(&'a self, current: &'a SourceConfig) -> &'a SourceConfig {
        self.config.as_ref().unwrap_or(current)
    }

    /// The job's R2 folder (a replicate job's is its backup's, in the replica bucket).
    pub fn folder(&self) -> String {
        if let Work::Replicate(r) = &self.work {
            if let Some(replica) = &r.replica {
                return replica.folder();
            }
        }
        manifest::folder(&self.source, self.started_at, &self.id)
    }

    /// The R2 binding the job writes into: a replicate job's replica bucket, else the primary
    /// (`None`). A failed job's folder is cleaned there, and only there.
    pub fn bucket_binding(&self) -> Option<&str> {
        self.replica().map(|r| r.binding.as_str())
    }

    /// What the job's next request asks of the API token's budget ([`crate::budget`]): a poll of
    /// a running export that its provider cancels when left unpolled (D1) may use the whole
    /// window; anything else leaves room for such polls.
    pub fn budget_need(&self) -> crate::budget::Need {
        let polled = self.phase == Phase::Exporting && self.provider().is_some_and(|p| p.max_poll_gap().is_some());
        if polled {
            crate::budget::Need::Poll
        } else {
            crate::budget::Need::Start
        }
    }

    /// The copy of an export or a replicate job.
    pub fn copying(&self) -> Option<&Copying> {
        match &self.work {
            Work::Export(e) => Some(&e.copying),
            Work::Replicate(r) => Some(&r.copying),
            Work::Verify(_) | Work::Restore(_) | Work::Drill(_) => None,
        }
    }

    /// The copy of an export or a replicate job, to change.
    pub fn copying_mut(&mut self) -> Option<&mut Copying> {
        match &mut self.work {
            Work::Export(e) => Some(&mut e.copying),
            Work::Replicate(r) => Some(&mut r.copying),
            Work::Verify(_) | Work::Restore(_) | Work::Drill(_) => None,
        }
    }

    /// The files this job stored so far (an export's or a replicate job's).
    pub fn artifacts(&self) -> &[Artifact] {
        self.copying().map_or(&[], |c| c.artifacts.as_slice())
    }

    /// The file being copied, as the copy left it.
    pub fn copy(&self) -> Option<&CopyState> {
        self.copying().and_then(|c| c.copy.as_ref())
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

    /// How far the copy has come at `now` (see [`Copying::progress`]); `None` unless copying.
    pub fn progress(&self, now: Timestamp) -> Option<CopyProgress> {
        if self.phase != Phase::Transferring {
            return None;
        }
        match &self.work {
            Work::Export(e) => Some(e.copying.progress(e.downloads.len(), None, now)),
            Work::Replicate(r) => {
                let files = r.replica.as_ref().map_or(&[][..], |r| r.manifest.artifacts.as_slice());
                // A replica knows every size from the primary manifest.
                Some(r.copying.progress(files.len(), Some(files.iter().map(|a| a.size).sum()), now))
            }
            Work::Verify(_) | Work::Restore(_) | Work::Drill(_) => None,
        }
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
        let (limit, field) = source.deadlines.of(self.task(), source);
        (self.running_since.unwrap_or(self.started_at).plus(limit), limit, field)
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

    /// What the engine handles for every task (a wake-up, a cancel, the API budget's wait);
    /// every other event is the task's.
    fn transition(mut self, event: Event, cx: &Context<'_>) -> (Self, Action) {
        self.updated_at = cx.now;
        match (self.phase, event) {
            (_, Event::Wake) => self.wake(cx),
            (phase, Event::Cancel { by, reason }) if !phase.is_terminal() => self.cancel(by, reason, cx),
            (phase, Event::Throttled(until)) if !phase.is_terminal() => {
                self.next_step_at = Some(until);
                (self, Action::Sleep(until))
            }
            (phase, _) if phase.is_terminal() => (self, Action::Done),
            (_, event) => self.task_event(event, cx),
        }
    }

    /// Nothing to do for this event (one that does not belong to the current phase, such as a
    /// duplicate delivery after a restart): carry on from the persisted state.
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
                restore::give_up(&mut self);
                return self
                    .fail(format!("{message}; its clean-up did not finish within {limit} and was given up"), cx.now);
            }
        } else if self.phase != Phase::Queued {
            let (due, limit, field) = self.deadline(cx.source);
            if cx.now >= due {
                let task = serde_json::to_value(self.task()).ok().and_then(|v| v.as_str().map(str::to_string));
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
            self.phase = self.start_phase();
            if self.phase == Phase::Transferring {
                if let Some(copying) = self.copying_mut() {
                    copying.transfer_started_at = Some(cx.now);
                }
            }
        }
        self.task_step(cx)
    }

    /// Adds warnings the job does not carry yet.
    fn note_all(&mut self, warnings: Vec<String>) {
        for warning in warnings {
            if !self.warnings.contains(&warning) {
                self.warnings.push(warning);
            }
        }
    }

    /// The step went well: the next one is due now.
    fn step_succeeded(mut self, now: Timestamp) -> (Self, Action) {
        self.retries = 0;
        self.last_error = None;
        self.next_step_at = Some(now);
        (self, Action::Sleep(now))
    }

    /// The job waits for something outside (a provider still working) until `at`: not a failure.
    fn wait_until(mut self, at: Timestamp) -> (Self, Action) {
        self.retries = 0;
        self.last_error = None;
        self.next_step_at = Some(at);
        (self, Action::Sleep(at))
    }

    /// The job reached its task's successful end in `phase`.
    fn succeed(mut self, phase: Phase, now: Timestamp) -> (Self, Action) {
        self.phase = phase;
        self.finished_at.get_or_insert(now);
        self.next_step_at = None;
        self.retries = 0;
        self.last_error = None;
        (self, Action::Done)
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
        match (&self.work, self.phase) {
            (Work::Export(e), Phase::Exporting) => e.provider.max_poll_gap().map_or(wait, |cap| wait.min(cap)),
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
        if self.phase == Phase::Restoring && restore::clean_up_first(&mut self, &message) {
            self.stopping_since = Some(cx.now);
            return self.cleaning_up(message, cx.now);
        }
        self.fail(message, cx.now)
    }

    /// A restore runs its clean-up steps before it ends with `message` (kept as its last error
    /// meanwhile): the first is due now.
    fn cleaning_up(self, message: String, now: Timestamp) -> (Self, Action) {
        let (mut job, action) = self.step_succeeded(now);
        job.last_error = Some(message);
        (job, action)
    }

    /// The job fails with `message` (ends `cancelled` when a cancel asked for it). A job that
    /// began copying forgets its files and hands back its folder and open upload for deletion.
    fn fail(mut self, message: String, now: Timestamp) -> (Self, Action) {
        let copying = self.phase == Phase::Transferring;
        self.phase = if self.cancelled.is_some() { Phase::Cancelled } else { Phase::Failed };
        self.stopping_since = None;
        self.error = Some(message);
        self.finished_at = Some(now);
        self.next_step_at = None;
        // A replicate job cleans up only in a bucket proven not to be the primary: its folder
        // there is the primary's backup.
        let may_clean = match &self.work {
            Work::Replicate(r) => r.replica.as_ref().is_some_and(|r| r.identity == crate::replica::Identity::Distinct),
            _ => true,
        };
        if let Work::Export(e) = &mut self.work {
            e.downloads.clear();
        }
        let Some(copy) = self.copying_mut() else { return (self, Action::Done) };
        let was_copying = copying || copy.transfer_started_at.is_some();
        copy.artifacts.clear();
        let upload = copy.copy.take().and_then(|c| c.upload_id.map(|id| (c.key, id)));
        let action =
            if was_copying && may_clean { Action::Discard { folder: self.folder(), upload } } else { Action::Done };
        (self, action)
    }
}

#[cfg(test)]
impl Job {
    /// The export's state, to set up a test (panics for another task).
    pub(crate) fn export_mut(&mut self) -> &mut Export {
        match &mut self.work {
            Work::Export(e) => e,
            other => panic!("not an export: {:?}", other.task()),
        }
    }

    /// The export's state, read by a test (panics for another task).
    pub(crate) fn export(&self) -> &Export {
        match &self.work {
            Work::Export(e) => e,
            other => panic!("not an export: {:?}", other.task()),
        }
    }

    /// The copy's state, to set up a test (panics for a task that does not copy).
    pub(crate) fn copying_for_test(&mut self) -> &mut Copying {
        self.copying_mut().expect("a copying task")
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

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

mod copying;
pub mod export;
pub mod replica;
pub mod restore;
#[cfg(test)]
mod tests;
pub mod verify;
