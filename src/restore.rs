//! Restore jobs and restore drills: each provider's restore is a phase machine of its own,
//! driven by the job engine like an export.
//!
//! | provider | restore | drill |
//! |---|---|---|
//! | D1 ([`d1`]) | import a dump into a named database; Time Travel to the backup's bookmark | import into a scratch database, compare row counts per table |
//! | Aura ([`aura`]) | the instance back to the backup's snapshot; the graph export loaded into an empty named database | load into a scratch instance created for the drill (then deleted), a spare instance or `drill_database`, compare nodes per label and relationships per type |
//! | DXP Cloud ([`dxp`]) | upload the database and volume archives to the backup service as a new `Uploaded` backup (overwrites nothing; restored from the console) | none |
//! | Dgraph ([`dgraph`]) | a dedicated backend goes back to Dgraph's own backup taken at or before the Ferry backup finished (`listBackups` → `restore` → `restoreStatus`); the exports Ferry holds load back with the live loader (gRPC, outside the Worker: `scripts/dgraph_live_load.py`) | none |
//!
//! Anything that overwrites data needs a `confirm` field repeating the target's name, checked
//! by [`plan`] before a job exists. Everything here is pure: requests go out as
//! [`HttpRequest`]s and R2 work as [`Io`] orders the runtime performs (`runtime/restore.rs`).
//! A provider's restore registers with one line in `restorers!`.

pub mod aura;
pub mod d1;
pub mod d1_sql;
pub mod dgraph;
pub mod dxp;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::SourceConfig;
use crate::error::StepError;
use crate::http::{HttpRequest, HttpResponse};
use crate::identity::{JobId, Task};
use crate::manifest::Manifest;
use crate::providers::{Credentials, ProviderConfig};
use crate::time::Timestamp;

/// The record a drill writes next to the backup it drilled.
pub const DRILL_NAME: &str = "drill.json";

/// What the runtime must do with R2 for a restore, then feed back as [`IoDone`].
#[derive(Debug, Clone, PartialEq)]
pub enum Io {
    /// Read the manifest at this key (the source's newest when `None`).
    ReadManifest {
        /// The manifest's key.
        key: Option<String>,
    },
    /// One bounded step of staging a rewritten D1 dump ([`d1_sql::Staging::step`]): read the
    /// range [`d1_sql::Staging::next_read`] names, step, write the chunk it gives.
    Stage {
        /// Where the staging stands.
        staging: Box<d1_sql::Staging>,
        /// Bytes of input the step reads at most (the source's part size).
        step_bytes: u64,
        /// The age identity an encrypted input is read with (never persisted).
        identity: Option<crate::secret::Secret>,
    },
    /// Delete these R2 objects (a staged import's chunks); missing ones count as deleted.
    DeleteObjects {
        /// Their keys.
        keys: Vec<String>,
    },
    /// Read the R2 object `key` from `from.offset`, at most `step_bytes` (streamed), and give its
    /// MD5 and size when it ended, or how far it got ([`IoDone::DigestPart`]).
    Digest {
        /// The dump's key.
        key: String,
        /// Where the previous steps stopped.
        from: crate::dump::Md5Progress,
        /// Bytes this step reads at most.
        step_bytes: u64,
        /// An encrypted dump: the size of the age file and of its plaintext; the MD5 is of the
        /// plaintext, read with `identity`.
        sealed: Option<(u64, u64)>,
        /// The age identity (never persisted).
        identity: Option<crate::secret::Secret>,
    },
    /// One bounded step of scanning or loading an Aura graph export (`runtime/graph_load.rs`).
    GraphLoad(Box<aura::GraphLoadOrder>),
    /// Send `request` (its method, URL and headers: a `POST`, or D1's `PUT`) with a body made of
    /// `pieces` in order,
    /// R2 objects streamed, never held whole; the body's length is known and sent as
    /// `Content-Length` (a `multipart/form-data` upload).
    PostPieces {
        /// The request, without a body.
        request: HttpRequest,
        /// The body's pieces.
        pieces: Vec<Piece>,
    },
    /// Write the drill's record.
    Record {
        /// Where.
        key: String,
        /// What.
        record: Value,
    },
}

/// A piece of an [`Io::PostPieces`] body.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// These bytes.
    Text(String),
    /// The R2 object `key`, which must hold `size` bytes.
    Object {
        /// Its key.
        key: String,
        /// Its size.
        size: u64,
    },
}

impl Piece {
    /// Its length in the body.
    pub fn length(&self) -> u64 {
        match self {
            Self::Text(t) => t.len() as u64,
            Self::Object { size, .. } => *size,
        }
    }
}

/// What an [`Io`] order gave.
#[derive(Debug, Clone, PartialEq)]
pub enum IoDone {
    /// The manifest and its key.
    Manifest(String, Box<Manifest>),
    /// Where the staging stands after a step (its chunk is written).
    Staged(Box<d1_sql::Staging>),
    /// The objects are deleted.
    Deleted,
    /// The MD5 and size of what R2 holds.
    Digest {
        /// Lower-case hex MD5.
        md5: String,
        /// Bytes.
        size: u64,
    },
    /// A step of [`Io::Digest`] read this far; the next step goes on from here.
    DigestPart(crate::dump::Md5Progress),
    /// The record is stored.
    Recorded,
    /// Where a graph scan or load stands after a step, and the error that ended it early.
    GraphLoaded {
        /// The cursor, persisted whatever happened.
        cursor: Box<aura::LoadCursor>,
        /// Why the step stopped before its bound, if it failed.
        error: Option<StepError>,
    },
    /// The answer to an [`Io::PostPieces`] (its body cut to a few KiB), or why none came once
    /// the request may have gone out (a failure before anything was sent is an `Err`).
    Posted(Result<HttpResponse, String>),
}

/// The next thing a restore does.
#[derive(Debug, Clone, PartialEq)]
pub enum Next {
    /// Send this request, then feed back the answer.
    Send(HttpRequest),
    /// Perform this R2 work.
    Io(Io),
    /// Finished: succeeded (with a note) or failed (with the provider's words or the drill's
    /// finding).
    Finished(Result<String, String>),
}

/// What an answer did.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// Go on at once.
    Continue,
    /// The provider is still working: poll again after the source's poll interval.
    Pending,
    /// Wait until then (a provider's rate limit), then go on.
    WaitUntil(Timestamp),
}

/// What a restore step sees besides its own state.
pub struct RestoreCx<'a> {
    /// The job's source, as configured when the job started.
    pub source: &'a SourceConfig,
    /// The Worker secrets.
    pub creds: &'a Credentials,
    /// The job.
    pub job: &'a JobId,
    /// The time.
    pub now: Timestamp,
}

/// One provider's restore machine.
pub trait Restorer {
    /// The next request or R2 order.
    fn next(&self, cx: &RestoreCx<'_>) -> Result<Next, StepError>;
    /// The request [`Restorer::next`] just named goes out, and the job is persisted with this
    /// state first: a machine marks a request that must not be sent again blindly after a restart
    /// that lost its answer (Aura: an instance create).
    fn sending(&mut self, _job: &JobId) {}
    /// Folds in the provider's answer to the last request.
    fn on_response(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<Answer, StepError>;
    /// Folds in what an R2 order gave.
    fn on_io(&mut self, done: IoDone, now: Timestamp) -> Result<Answer, StepError>;
    /// The restore failed with `message`: a drill cleans up and records the outcome first
    /// (`true`, the job goes on); anything else fails now (`false`).
    fn fail_after_cleanup(&mut self, _message: String) -> bool {
        false
    }
    /// The backup folder restored (with trailing slash), once known.
    fn backup_folder(&self) -> Option<String>;
    /// The last request got no answer (`message` says why; also a 5xx): `Some(reason)` fails the
    /// job now, for a request that must not be sent twice; `None` retries it (a machine may first
    /// change its step, to look before asking again).
    fn unanswered(&mut self, _message: &str) -> Option<String> {
        None
    }
}

/// Declares [`RestoreState`]: one line per provider, `"kind" => Variant(module::State)`, where
/// `module::plan(task, &config, params, backup)` checks a request.
macro_rules! restorers {
    ($($kind:literal => $variant:ident($module:ident::$state:ident),)*) => {
        /// A restore's persisted state, tagged by the provider's kind.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "provider")]
        pub enum RestoreState {
            $(#[allow(missing_docs)] #[serde(rename = $kind)] $variant($module::$state),)*
        }

        impl RestoreState {
            fn machine(&self) -> &dyn Restorer {
                match self {
                    $(Self::$variant(s) => s,)*
                }
            }

            fn machine_mut(&mut self) -> &mut dyn Restorer {
                match self {
                    $(Self::$variant(s) => s,)*
                }
            }
        }

        /// Checks a restore or drill request and makes the restore's state: `Err` is the 400 the
        /// caller gets (nothing was touched). `backup` is the manifest key the route named (drills:
        /// optional; the newest backup when absent).
        pub fn plan(task: Task, source: &SourceConfig, params: &Value, backup: Option<String>) -> Result<RestoreState, String> {
            if !matches!(task, Task::Restore | Task::Drill) {
                return Err("not a restore".into());
            }
            match &source.provider {
                $(ProviderConfig::$variant(cfg) => $module::plan(task, cfg, params, backup).map(RestoreState::$variant),)*
                #[allow(unreachable_patterns)]
                _ => Err(format!(
                    "restore is not implemented for {} sources ({:?})",
                    source.kind(),
                    source.name
                )),
            }
        }
    };
}

restorers! {
    "d1" => D1(d1::D1Restore),
    "aura" => Aura(aura::AuraRestore),
    "dxp" => Dxp(dxp::DxpRestore),
    "dgraph" => Dgraph(dgraph::DgraphRestore),
}

impl RestoreState {
    /// See [`Restorer::next`].
    pub fn next(&self, cx: &RestoreCx<'_>) -> Result<Next, StepError> {
        self.machine().next(cx)
    }

    /// See [`Restorer::sending`].
    pub fn sending(&mut self, job: &JobId) {
        self.machine_mut().sending(job)
    }

    /// See [`Restorer::on_response`].
    pub fn on_response(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<Answer, StepError> {
        self.machine_mut().on_response(resp, now)
    }

    /// See [`Restorer::on_io`].
    pub fn on_io(&mut self, done: IoDone, now: Timestamp) -> Result<Answer, StepError> {
        self.machine_mut().on_io(done, now)
    }

    /// See [`Restorer::fail_after_cleanup`].
    pub fn fail_after_cleanup(&mut self, message: String) -> bool {
        self.machine_mut().fail_after_cleanup(message)
    }

    /// See [`Restorer::unanswered`].
    pub fn unanswered(&mut self, message: &str) -> Option<String> {
        self.machine_mut().unanswered(message)
    }

    /// See [`Restorer::backup_folder`].
    pub fn backup_folder(&self) -> Option<String> {
        self.machine().backup_folder()
    }
}

/// The trimmed, non-empty text at `pointer` in a request's body.
pub(crate) fn param_text(params: &Value, pointer: &str) -> Option<String> {
    params.pointer(pointer).and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty()).map(str::to_string)
}

/// Anything that overwrites `what` must repeat `name` in the request's `confirm` field.
pub(crate) fn confirmed(params: &Value, name: &str, what: &str) -> Result<(), String> {
    if param_text(params, "/confirm").as_deref() == Some(name) {
        Ok(())
    } else {
        Err(format!("restoring overwrites {what}: repeat {name:?} in \"confirm\" to go on"))
    }
}

#[cfg(test)]
mod aura_tests;
#[cfg(test)]
mod d1_tests;
#[cfg(test)]
mod dgraph_tests;
#[cfg(test)]
mod driver;
#[cfg(test)]
mod dxp_tests;
