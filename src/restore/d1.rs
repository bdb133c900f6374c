//! D1 restores and drills, as a phase machine driven by the job engine.
//!
//! - **Import** (`provider-apis.md` §1.5; the protocol of `cloudflare-typescript`
//!   `src/resources/d1/database.ts` `import` and wrangler's `d1/execute.ts`): a committed
//!   backup's dump goes into a named target database. The target must be empty (its
//!   `sqlite_schema` is read first) unless the request says `"replace": true`. The dump is first
//!   rewritten into one D1 accepts ([`super::d1_sql`]: oversized `INSERT`s split, indexes, views
//!   and triggers after every table, with `replace` each object dropped just before it is
//!   created) and staged in R2 as numbered chunks, in bounded steps of the source's
//!   `part_size_mib`, the MD5 computed as they are written: D1's `init` needs it up front. Then
//!   `init` with that MD5 as `etag` → `PUT` the chunks, streamed out of R2 as one body, to
//!   `upload_url` → `ingest` → `poll` until `complete`; the staged chunks are deleted at the end,
//!   also when the import failed. D1 blocks the target database while it imports, and an import
//!   that fails leaves it as it was.
//! - **Extra SQL artifacts**: any artifact of the backup whose `details.d1_import` is
//!   `"after_dump"` (virtual tables' rows, exact big integers, written by the export) is staged
//!   right after the dump, before the held-back indexes, views and triggers
//!   ([`extra_inputs`] is the one place that decides it).
//! - **Time travel** (§1.6): the source database goes back to the `at_bookmark` its backup's
//!   manifest recorded, only when the manifest's `database_id` is the source's and the backup is
//!   within `time_travel_days` (7 by default: D1 keeps 30 days on Workers Paid, 7 on Free).
//!   Otherwise, or when D1 refuses the bookmark, the restore imports the dump into the named
//!   target database when one was given (and confirmed), and fails saying so when not.
//! - **Drill**: a scratch database `ferry-drill-<job id>` is created (its name recorded before the
//!   create goes out, so a lost answer or D1's 7502 "name taken" leads to a look-up by that name,
//!   never a second database), the newest backup (or the one named) is imported into it, every
//!   table's row count is compared with the counts recorded while the dump was copied, what the
//!   backup read through the query API (virtual tables' rows, integers beyond 2^53) is read back a
//!   page per step and compared print for print ([`DrillCheck`]), the scratch database is deleted
//!   (also when something failed), and the outcome is written next to the backup as `drill.json`.
//!   A difference fails the drill, naming the table (and column).
//!
//! Anything that overwrites data needs `confirm` to name every database it may write (a string,
//! or a list when there are two: Time Travel with an import fallback), checked by [`plan`] before
//! a job exists.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::d1_sql::{Input, Staging};
use super::{param_text, Answer, Io, IoDone, Next, Piece, RestoreCx, Restorer, DRILL_NAME};
use crate::error::StepError;
use crate::http::{HttpRequest, HttpResponse};
use crate::identity::{JobId, Task};
use crate::manifest::{Artifact, Manifest};
use crate::providers::d1::query::{CheckProgress, DrillCheck, Fingerprint};
use crate::providers::d1::D1Config;
use crate::providers::{url_with_path, ProviderConfig};

use crate::secret::Secret;
use crate::time::Timestamp;
/// Most D1 log lines kept per restore.
const MAX_MESSAGES: usize = 100;
pub use crate::providers::d1::query::AFTER_DUMP;
/// Where a restore stages its rewritten dump, under its own folder.
const STAGING_DIR: &str = "restore-staging/";
/// What a target database may hold and still count as empty: SQLite's and D1's own tables.
const USER_OBJECTS: &str = "SELECT type, name FROM sqlite_schema WHERE name NOT LIKE 'sqlite\\_%' ESCAPE '\\' \
     AND name NOT LIKE '\\_cf\\_%' ESCAPE '\\' ORDER BY name LIMIT 20";

/// What a restore job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Import the dump into a named database.
    Import,
    /// Restore the source database to the backup's bookmark.
    TimeTravel,
    /// Import into a scratch database, compare row counts, delete it.
    Drill,
}

/// Where a restore stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Read the backup's manifest.
    ReadManifest,
    /// Drills: read the dump back from R2 for its MD5 (a drill tests what R2 holds now).
    Digest,
    /// Create the drill's scratch database.
    CreateScratch,
    /// Make sure the named target database exists before anything is sent to it.
    CheckTarget,
    /// Read what the target database holds: an import goes only into an empty one, unless
    /// `replace`.
    Inspect,
    /// Rewrite the dump into one D1 accepts and stage it in R2, one bounded step at a time.
    Stage,
    /// Ask D1 for an upload URL (`init`).
    Init,
    /// Stream the dump from R2 to the upload URL.
    Upload,
    /// Tell D1 to import the uploaded file (`ingest`).
    Ingest,
    /// Ask D1 how the import goes (`poll`).
    Poll,
    /// Delete the staged chunks (after the import, or after a failure).
    Cleanup,
    /// Count the rows of the n-th table of the manifest's counts.
    Count(usize),
    /// Read back one page of the n-th of the backup's query checks (virtual tables' rows, exact
    /// integers beyond 2^53) from the scratch database.
    Check(usize),
    /// Find the scratch database by its name: a create whose answer was lost made it already.
    FindScratch,
    /// Delete the drill's scratch database.
    DeleteScratch,
    /// Restore the source database to the bookmark.
    TimeTravel,
    /// Write the drill's record next to the backup.
    Record,
    /// Nothing more to do.
    Done,
}

/// The backup's dump, as its manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpRef {
    /// The backup's folder, with trailing slash.
    pub folder: String,
    /// The dump's R2 key.
    pub key: String,
    /// Its size in bytes (of its plaintext, when it is encrypted).
    pub size: u64,
    /// An encrypted dump: the size of the age file R2 holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<u64>,
    /// Its MD5, the import's `etag`.
    pub md5: String,
    /// Rows per table recorded while it was copied.
    pub row_counts: BTreeMap<String, u64>,
    /// The time-travel bookmark of the export.
    pub at_bookmark: Option<String>,
    /// When the backup finished.
    pub finished_at: Timestamp,
    /// The database the backup was taken of, as its manifest records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_id: Option<String>,
    /// Extra SQL artifacts imported right after the dump, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub extra: Vec<Input>,
    /// What the backup read through the query API, for a drill to read back and compare.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<DrillCheck>,
}

/// A restore's persisted state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct D1Restore {
    /// What it does.
    pub mode: Mode,
    /// The backup's manifest key; the newest backup when `None` (drills).
    pub manifest_key: Option<String>,
    /// The database the dump goes into (the drill's scratch database once created).
    pub target: Option<String>,
    /// The dump, once the manifest was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dump: Option<DumpRef>,
    /// Where it stands.
    pub step: Step,
    /// D1's upload URL (a credential: blanked once the job ends, hidden from the API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_upload_url: Option<String>,
    /// The file name D1's `init` gave.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_filename: Option<String>,
    /// The import's bookmark, sent with every poll.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub import_bookmark: Option<String>,
    /// Rows counted in the scratch database, per table.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub counted: BTreeMap<String, u64>,
    /// The read-back of the query check under way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checking: Option<CheckProgress>,
    /// The scratch database's prints, per query check read back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checked: Vec<Vec<Fingerprint>>,
    /// Why the drill failed; the scratch database is deleted and the record written first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// D1's log lines.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<String>,
    /// What D1 answered at the end (the import's `result`, time travel's answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Drills: how the dump in R2 differs from the one copied (MD5, size), when it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub altered: Option<String>,
    /// Notes for the reader (a time travel that fell back to an import).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// Drop the dump's objects before creating them (`"replace": true`); without it a target
    /// that holds anything is refused.
    #[serde(default)]
    pub replace: bool,
    /// The databases `confirm` named (an import fallback must be among them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub confirmed: Vec<String>,
    /// The source database, which Time Travel restores in place.
    #[serde(default)]
    pub source_database: String,
    /// Days of Time Travel history (the source's `time_travel_days`).
    #[serde(default = "default_window_days")]
    pub window_days: u32,
    /// The staged import, once begun.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub staging: Option<Staging>,
    /// Rows per query API page when a drill reads back its checks (the source's
    /// `query_page_rows`).
    #[serde(default = "default_page_rows")]
    pub page_rows: u32,
    /// Drills: the scratch database's name, recorded before its create goes out, so a lost
    /// answer is followed by a look-up by that name, never a blind second create.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scratch: Option<String>,
    /// Look-ups of the scratch database by name so far.
    #[serde(default)]
    pub lookups: u32,
    /// Drills: how far the stepped MD5 of the dump in R2 has read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<crate::dump::Md5Progress>,
}

fn default_page_rows() -> u32 {
    500
}

/// Look-ups of a scratch database by its name before a drill gives up.
const MAX_LOOKUPS: u32 = 3;

fn default_window_days() -> u32 {
    7
}

/// The ids `confirm` names: a string, or a list of strings.
fn confirmations(params: &Value) -> Vec<String> {
    match params.get("confirm") {
        Some(Value::String(s)) => vec![s.trim().to_string()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).map(|s| s.trim().to_string()).collect(),
        _ => Vec::new(),
    }
    .into_iter()
    .filter(|s| !s.is_empty())
    .collect()
}

/// Checks a restore or drill request and makes the restore's state: `Err` is the 400 the caller
/// gets (nothing was touched). `backup` is the manifest key the route named (drills: optional).
pub fn plan(task: Task, cfg: &D1Config, params: &Value, backup: Option<String>) -> Result<D1Restore, String> {
    let target = param_text(params, "/target/database_id");
    if params.get("target").is_some() && target.is_none() {
        return Err("\"target\" must be {\"database_id\": \"<uuid of the database to import into>\"}".into());
    }
    let confirmed = confirmations(params);
    let replace = match params.get("replace") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err("\"replace\" must be true or false".into()),
    };
    let mut state = D1Restore {
        mode: Mode::Import,
        manifest_key: backup,
        target: target.clone(),
        dump: None,
        step: Step::ReadManifest,
        secret_upload_url: None,
        import_filename: None,
        import_bookmark: None,
        counted: BTreeMap::new(),
        checking: None,
        checked: Vec::new(),
        failure: None,
        messages: Vec::new(),
        result: None,
        altered: None,
        notes: Vec::new(),
        replace,
        confirmed: confirmed.clone(),
        source_database: cfg.database_id.clone(),
        window_days: cfg.time_travel_days,
        staging: None,
        page_rows: cfg.query_page_rows.max(1),
        scratch: None,
        lookups: 0,
        digest: None,
    };
    let names = |id: &str| confirmed.iter().any(|c| c == id);
    match task {
        Task::Drill => {
            if target.is_some() || replace {
                return Err(
                    "a drill imports into a scratch database of its own; it takes no \"target\" or \"replace\"".into(),
                );
            }
            state.mode = Mode::Drill;
            state.target = None;
            Ok(state)
        }
        Task::Restore => {
            if state.manifest_key.is_none() {
                return Err("a restore needs the backup to restore (POST /v1/backups/{source}/{folder}/restore)".into());
            }
            match params.get("mode").and_then(Value::as_str).unwrap_or("import") {
                "import" => {
                    let Some(target) = target else {
                        return Err(
                            "an import needs \"target\": {\"database_id\": \"<uuid>\"}, the database the dump \
                                    goes into (D1 blocks it while importing)"
                                .into(),
                        );
                    };
                    if !names(&target) {
                        return Err(format!(
                            "importing overwrites data in database {target}: repeat its id in \"confirm\" to go on"
                        ));
                    }
                    Ok(state)
                }
                "time_travel" if cfg.whole_account() => {
                    // Which database the backup is of is read from its manifest: it must be
                    // confirmed then, before anything is written (`time_travel_or_fallback`).
                    if confirmed.is_empty() {
                        return Err(
                            "time travel overwrites the backup's database in place: name its id in \"confirm\" \
                                    to go on"
                                .into(),
                        );
                    }
                    state.mode = Mode::TimeTravel;
                    Ok(state)
                }
                "time_travel" => {
                    let source = cfg.database_id.as_str();
                    // Each database the job may write is named twice: Time Travel writes the
                    // source, its import fallback writes the target.
                    let expected = match &target {
                        Some(t) if t != source => format!("\"confirm\": [{source:?}, {t:?}]"),
                        _ => format!("\"confirm\": {source:?}"),
                    };
                    if !names(source) {
                        return Err(format!(
                            "time travel overwrites the source database {source} in place: name it in \"confirm\" \
                             to go on ({expected})"
                        ));
                    }
                    if let Some(t) = target.as_deref().filter(|t| !names(t)) {
                        return Err(format!(
                            "past D1's Time Travel window this restore falls back to importing into database {t}, \
                             which overwrites it: name it in \"confirm\" too ({expected})"
                        ));
                    }
                    state.mode = Mode::TimeTravel;
                    Ok(state)
                }
                other => Err(format!("unknown \"mode\" {other:?}: use \"import\" or \"time_travel\"")),
            }
        }
        Task::Export | Task::Verify | Task::Replicate => Err("not a restore".into()),
    }
}

fn db_url(cfg: &D1Config, tail: &[&str]) -> Result<String, StepError> {
    let base = cfg.api_base.as_ref().ok_or_else(|| StepError::permanent("D1: no api_base configured"))?;
    let mut segments = vec!["accounts", cfg.account_id.as_str(), "d1", "database"];
    segments.extend_from_slice(tail);
    Ok(url_with_path(base, &segments))
}

fn authed(req: HttpRequest, token: &Secret) -> HttpRequest {
    req.header("authorization", format!("Bearer {}", token.expose()))
}

impl D1Restore {
    /// The restore failed with `message`: staged chunks are deleted first, and a drill deletes its
    /// scratch database and records the outcome (`true`, the job goes on); anything else fails
    /// now (`false`).
    fn cleanup_first(&mut self, message: String) -> bool {
        if self.step == Step::Cleanup {
            // The chunks stay for the daily sweep (they are under the job's own folder).
            self.notes.push(format!("deleting the staged import failed ({message}); the daily sweep removes it"));
            self.staging = None;
            self.step = self.after_cleanup();
            return true;
        }
        if self.staging.is_some() && !matches!(self.step, Step::Record | Step::Done) {
            self.failure = Some(match self.failure.take() {
                Some(prior) => format!("{prior}; {message}"),
                None => message,
            });
            self.step = Step::Cleanup;
            return true;
        }
        if self.mode != Mode::Drill || self.dump.is_none() {
            return false;
        }
        match self.step {
            Step::Record | Step::Done => false,
            Step::DeleteScratch => {
                let scratch = self.target.clone().unwrap_or_default();
                let deleting = format!("deleting the scratch database {scratch} failed: {message}");
                self.failure = Some(match self.failure.take() {
                    Some(prior) => format!("{prior}; {deleting}"),
                    None => deleting,
                });
                self.step = Step::Record;
                true
            }
            _ => {
                self.failure = Some(message);
                self.step = if self.target.is_some() { Step::DeleteScratch } else { Step::Record };
                true
            }
        }
    }

    /// What follows the staged chunks' deletion.
    fn after_cleanup(&mut self) -> Step {
        match (&self.failure, self.mode) {
            (Some(_), Mode::Drill) if self.target.is_some() => Step::DeleteScratch,
            (Some(_), Mode::Drill) => Step::Record,
            (Some(_), _) => Step::Done,
            (None, Mode::Drill) if self.dump.as_ref().is_some_and(|d| d.row_counts.is_empty()) => self.after_counts(),
            (None, Mode::Drill) => Step::Count(0),
            (None, _) => Step::Done,
        }
    }

    /// What follows the row counts: the query checks, one by one, then the comparison.
    fn after_counts(&mut self) -> Step {
        if self.dump.as_ref().is_some_and(|d| !d.checks.is_empty()) {
            self.checking = Some(CheckProgress::default());
            return Step::Check(0);
        }
        self.failure = self.compare();
        Step::DeleteScratch
    }

    /// The drill's scratch database's name.
    pub fn scratch_name(job: &JobId) -> String {
        format!("{}{job}", crate::providers::d1::SCRATCH_PREFIX)
    }

    /// The staging in progress, or a fresh one: the dump, then the extra artifacts, under a
    /// folder of the job's own (Ferry's layout, stamped with when staging began, so the daily
    /// sweep removes what a lost job left).
    fn staging_or_new(&self, source: &str, job: &JobId, now: Timestamp) -> Result<Staging, StepError> {
        if let Some(s) = &self.staging {
            return Ok(s.clone());
        }
        let dump = self.dump.as_ref().ok_or_else(|| StepError::permanent("the backup's manifest was not read"))?;
        let mut inputs = vec![Input { key: dump.key.clone(), size: dump.size, sealed: dump.sealed }];
        inputs.extend(dump.extra.iter().cloned());
        let prefix = format!("{}{STAGING_DIR}", crate::manifest::folder(source, now, job));
        Ok(Staging::new(inputs, prefix, self.replace))
    }

    /// The staged file's MD5 (D1's `etag`), once staged.
    fn staged_md5(&self) -> Result<String, StepError> {
        let staging = self.staging.as_ref().filter(|s| s.done).ok_or_else(|| StepError::permanent("nothing staged"))?;
        staging.final_md5().map_err(|e| StepError::permanent(e.to_string()))
    }

    /// The next request or R2 order.
    fn next_with(
        &self,
        cfg: &D1Config,
        token: &Secret,
        creds: &crate::providers::Credentials,
        job: &JobId,
        now: Timestamp,
        source: &crate::config::SourceConfig,
    ) -> Result<Next, StepError> {
        let dump = || self.dump.as_ref().ok_or_else(|| StepError::permanent("the backup's manifest was not read"));
        let target = || self.target.as_deref().ok_or_else(|| StepError::permanent("no target database"));
        // An encrypted backup's files are read with the source's age identity.
        let identity = match (self.dump.as_ref().and_then(|d| d.sealed), &source.age_identity_secret) {
            (Some(_), Some(name)) => Some(creds.get(name)?),
            _ => None,
        };
        Ok(match self.step {
            Step::ReadManifest => Next::Io(Io::ReadManifest { key: self.manifest_key.clone() }),
            Step::Digest => {
                let dump = dump()?;
                Next::Io(Io::Digest {
                    key: dump.key.clone(),
                    from: self.digest.clone().unwrap_or_else(crate::dump::Md5Progress::start),
                    step_bytes: crate::dump::DIGEST_STEP_BYTES,
                    sealed: dump.sealed.map(|cipher_size| (cipher_size, dump.size)),
                    identity: identity.cloned(),
                })
            }
            Step::CreateScratch => Next::Send(authed(
                HttpRequest::post_json(db_url(cfg, &[])?, &json!({ "name": Self::scratch_name(job) })),
                token,
            )),
            Step::FindScratch => {
                let mut url = url::Url::parse(&db_url(cfg, &[])?).map_err(|e| StepError::permanent(e.to_string()))?;
                url.query_pairs_mut().append_pair("name", &Self::scratch_name(job));
                Next::Send(authed(HttpRequest::get(url.to_string()), token))
            }
            Step::Check(i) => {
                let Some(check) = dump()?.checks.get(i) else {
                    return Err(StepError::permanent("no such check to read back"));
                };
                let progress = self.checking.clone().unwrap_or_default();
                let sql = check.next_sql(&progress, self.page_rows);
                Next::Send(authed(
                    HttpRequest::post_json(db_url(cfg, &[target()?, "query"])?, &json!({ "sql": sql })),
                    token,
                ))
            }
            Step::CheckTarget => Next::Send(authed(HttpRequest::get(db_url(cfg, &[target()?])?), token)),
            Step::Inspect => Next::Send(authed(
                HttpRequest::post_json(db_url(cfg, &[target()?, "query"])?, &json!({ "sql": USER_OBJECTS })),
                token,
            )),
            Step::Stage => Next::Io(Io::Stage {
                staging: Box::new(self.staging_or_new(&source.name, job, now)?),
                step_bytes: source.transfer.part_size,
                identity: identity.cloned(),
            }),
            Step::Init => Next::Send(authed(
                HttpRequest::post_json(
                    db_url(cfg, &[target()?, "import"])?,
                    &json!({ "action": "init", "etag": self.staged_md5()? }),
                ),
                token,
            )),
            Step::Upload => {
                let url = self.secret_upload_url.clone().ok_or_else(|| StepError::permanent("no upload URL"))?;
                let staging = self.staging.as_ref().ok_or_else(|| StepError::permanent("nothing staged"))?;
                let pieces = staging
                    .chunks
                    .iter()
                    .enumerate()
                    .map(|(i, size)| Piece::Object { key: staging.chunk_key(i), size: *size })
                    .collect();
                // The presigned URL carries its own authorization: no token goes with it.
                let request = HttpRequest::put(url).header("content-type", "application/sql");
                Next::Io(Io::PostPieces { request, pieces })
            }
            Step::Ingest => Next::Send(authed(
                HttpRequest::post_json(
                    db_url(cfg, &[target()?, "import"])?,
                    &json!({ "action": "ingest", "etag": self.staged_md5()?, "filename": self.import_filename }),
                ),
                token,
            )),
            Step::Poll => Next::Send(authed(
                HttpRequest::post_json(
                    db_url(cfg, &[target()?, "import"])?,
                    &json!({ "action": "poll", "current_bookmark": self.import_bookmark }),
                ),
                token,
            )),
            Step::Count(i) => {
                let Some(table) = dump()?.row_counts.keys().nth(i) else {
                    return Err(StepError::permanent("no such table to count"));
                };
                let sql = format!("SELECT count(*) AS n FROM {}", super::d1_sql::quote_name(table));
                Next::Send(authed(
                    HttpRequest::post_json(db_url(cfg, &[target()?, "query"])?, &json!({ "sql": sql })),
                    token,
                ))
            }
            Step::DeleteScratch => Next::Send(authed(HttpRequest::delete(db_url(cfg, &[target()?])?), token)),
            Step::Cleanup => Next::Io(Io::DeleteObjects {
                keys: self
                    .staging
                    .as_ref()
                    // One past the last recorded chunk: a step may have written it before it was recorded.
                    .map(|s| (0..=s.chunks.len()).map(|i| s.chunk_key(i)).collect())
                    .unwrap_or_default(),
            }),
            Step::TimeTravel => {
                let bookmark = dump()?.at_bookmark.clone().unwrap_or_default();
                let mut url = url::Url::parse(&db_url(cfg, &[&self.source_database, "time_travel", "restore"])?)
                    .map_err(|e| StepError::permanent(e.to_string()))?;
                url.query_pairs_mut().append_pair("bookmark", &bookmark);
                Next::Send(authed(HttpRequest::post_json(url.to_string(), &json!({})), token))
            }
            Step::Record => Next::Io(Io::Record {
                key: format!("{}{DRILL_NAME}", dump()?.folder),
                record: self.drill_record(job, now),
            }),
            Step::Done => Next::Finished(match &self.failure {
                Some(f) => Err(f.clone()),
                None => Ok(self.summary()),
            }),
        })
    }

    fn summary(&self) -> String {
        let folder = self.dump.as_ref().map_or("?", |d| d.folder.as_str());
        let target = self.target.as_deref().unwrap_or("?");
        match self.mode {
            Mode::Import => format!("imported backup {folder} into database {target}"),
            Mode::TimeTravel => {
                let b = self.dump.as_ref().and_then(|d| d.at_bookmark.as_deref()).unwrap_or("?");
                format!("restored the source database to bookmark {b} (backup {folder})")
            }
            Mode::Drill => format!(
                "drill of backup {folder} passed: {} tables, row counts equal; {} read back value for value \
                 (virtual tables' rows, integers beyond 2^53); scratch database deleted",
                self.counted.len(),
                self.checked.len()
            ),
        }
    }

    /// The drill's record, as written next to the backup.
    pub fn drill_record(&self, job: &JobId, now: Timestamp) -> Value {
        let expected = self.dump.as_ref().map(|d| d.row_counts.clone()).unwrap_or_default();
        let tables: BTreeMap<&String, Value> =
            expected.iter().map(|(t, n)| (t, json!({ "backup": n, "restored": self.counted.get(t) }))).collect();
        let checks: Vec<Value> = self
            .dump
            .iter()
            .flat_map(|d| d.checks.iter().enumerate())
            .map(|(i, c)| {
                json!({
                    "table": c.table, "kind": c.kind, "columns": c.columns,
                    "backup": c.prints, "restored": self.checked.get(i),
                })
            })
            .collect();
        json!({
            "job_id": job,
            "at": now,
            "passed": self.failure.is_none(),
            "backup": self.dump.as_ref().map(|d| d.folder.clone()),
            "scratch_database": self.target,
            "tables": tables,
            "checks": checks,
            "error": self.failure,
            "altered": self.altered,
        })
    }

    /// Folds in what an R2 order gave.
    fn fold(&mut self, done: IoDone, now: Timestamp) -> Result<Answer, StepError> {
        match (self.step, done) {
            (Step::ReadManifest, IoDone::Manifest(key, manifest)) => {
                self.dump = Some(dump_of(&key, &manifest)?);
                self.manifest_key = Some(key);
                self.step = match self.mode {
                    Mode::Drill => Step::Digest,
                    Mode::Import => Step::CheckTarget,
                    Mode::TimeTravel => self.time_travel_or_fallback(now)?,
                };
                Ok(Answer::Continue)
            }
            (Step::Stage, IoDone::Staged(staging)) => {
                if staging.done {
                    self.notes.push(format!(
                        "the rewritten dump was staged in {} ({} chunks, {} bytes, {} statements) and is deleted \
                         after the import",
                        staging.prefix,
                        staging.chunks.len(),
                        staging.size(),
                        staging.rewrite.written
                    ));
                    if staging.rewrite.split_rows > 0 {
                        self.notes.push(format!(
                            "{} rows over D1's {}-byte statement limit were imported in pieces",
                            staging.rewrite.split_rows,
                            super::d1_sql::D1_MAX_STATEMENT
                        ));
                    }
                    self.step = Step::Init;
                }
                self.staging = Some(*staging);
                Ok(Answer::Continue)
            }
            (Step::Upload, IoDone::Posted(answer)) => {
                // Sending the same file again is harmless: a lost answer is retried.
                let resp = answer.map_err(StepError::transient)?;
                let (status, body) = (resp.status, resp.snippet(300));
                if status != 200 {
                    let msg = format!("uploading the dump to D1 was refused (HTTP {status}): {body}");
                    return Err(if status >= 500 || status == 429 {
                        StepError::transient(msg)
                    } else {
                        StepError::permanent(msg)
                    });
                }
                let md5 = self.staged_md5()?;
                let etag = resp.header("etag").map(str::to_string);
                let got = etag.as_deref().map(|e| e.trim().trim_start_matches("W/").trim_matches('"').to_string());
                if got.as_deref() != Some(md5.as_str()) {
                    return Err(StepError::permanent(format!(
                        "D1's upload answered ETag {:?}, not the staged dump's MD5 {md5}: the upload is not the dump",
                        etag.unwrap_or_default()
                    )));
                }
                self.step = Step::Ingest;
                Ok(Answer::Continue)
            }
            (Step::Cleanup, IoDone::Deleted) => {
                self.staging = None;
                self.step = self.after_cleanup();
                Ok(Answer::Continue)
            }
            (Step::Digest, IoDone::DigestPart(progress)) => {
                self.digest = Some(progress);
                Ok(Answer::Continue)
            }
            (Step::Digest, IoDone::Digest { md5, size }) => {
                self.digest = None;
                let dump = self.dump.as_mut().ok_or_else(|| StepError::permanent("the manifest was not read"))?;
                if dump.md5 != md5 || dump.size != size {
                    self.altered = Some(format!(
                        "the dump in R2 is not the one copied: {size} bytes with MD5 {md5}, the manifest records {} \
                         bytes with MD5 {}",
                        dump.size, dump.md5
                    ));
                    // The drill imports what R2 holds, so the counts show what a restore would lose.
                    dump.md5 = md5;
                    dump.size = size;
                }
                self.step = Step::CreateScratch;
                Ok(Answer::Continue)
            }
            (Step::Record, IoDone::Recorded) => {
                self.step = Step::Done;
                Ok(Answer::Continue)
            }
            (step, done) => Err(StepError::permanent(format!("unexpected {done:?} at {step:?}"))),
        }
    }

    /// Time travel to the backup's bookmark, or (past D1's window) an import into the target.
    fn time_travel_or_fallback(&mut self, now: Timestamp) -> Result<Step, StepError> {
        let dump = self.dump.as_ref().ok_or_else(|| StepError::permanent("the backup's manifest was not read"))?;
        if dump.at_bookmark.is_none() {
            return self.fallback("the backup's manifest records no at_bookmark".into());
        }
        // Time Travel restores a database in place: only the database the bookmark is of.
        match dump.database_id.as_deref() {
            // A whole-account source: the backup's own database, once it is confirmed.
            Some(id) if self.source_database.contains('*') => {
                if !self.confirmed.iter().any(|c| c == id) {
                    return Err(StepError::permanent(format!(
                        "time travel overwrites database {id}, the one this backup was taken of, in place: name it \
                         in \"confirm\" to go on"
                    )));
                }
                self.source_database = id.to_string();
            }
            Some(id) if id == self.source_database => {}
            Some(id) => {
                let why = format!(
                    "the backup was taken of database {id}, not of the source database {}: its bookmark \
                     cannot restore that database",
                    self.source_database
                );
                return self.fallback(why);
            }
            None => return self.fallback("the backup's manifest does not record its database_id".into()),
        }
        let window = Duration::from_secs(u64::from(self.window_days) * 86_400);
        if now.since(dump.finished_at) > window {
            return self.fallback(format!(
                "the backup finished at {}, more than {} days ago, past D1's Time Travel window \
                 (time_travel_days = {}; D1 keeps 30 days on Workers Paid, 7 on Free)",
                dump.finished_at, self.window_days, self.window_days
            ));
        }
        Ok(Step::TimeTravel)
    }

    fn fallback(&mut self, why: String) -> Result<Step, StepError> {
        match &self.target {
            Some(t) if !self.confirmed.contains(t) => Err(StepError::permanent(format!(
                "{why}; the import into database {t} it would fall back to was not confirmed"
            ))),
            Some(t) => {
                self.notes.push(format!("{why}; importing the dump into database {t} instead"));
                self.mode = Mode::Import;
                Ok(Step::CheckTarget)
            }
            None => Err(StepError::permanent(format!(
                "{why}: restore this backup by importing its dump into a named database instead \
                 (\"mode\": \"import\", \"target\": {{\"database_id\": …}}), or give a \"target\" to fall back to"
            ))),
        }
    }

    /// Folds in D1's answer to the last request.
    fn answer(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<Answer, StepError> {
        let step = self.step;
        if step == Step::TimeTravel && (400..500).contains(&resp.status) && resp.status != 429 {
            let why = format!("D1 refused the bookmark (HTTP {}): {}", resp.status, envelope_errors(resp));
            self.step = self.fallback(why)?;
            return Ok(Answer::Continue);
        }
        if step == Step::CreateScratch && name_taken(resp) {
            // D1 answers 7502 "A database with that name already exists" (workers-sdk#2143): an
            // earlier create of this drill arrived and its answer was lost. Find it by its name.
            self.lookups += 1;
            self.step = Step::FindScratch;
            return Ok(Answer::Continue);
        }
        if step == Step::CheckTarget && resp.status == 404 {
            let target = self.target.as_deref().unwrap_or("?");
            return Err(StepError::permanent(format!(
                "the target database {target} does not exist in this account (D1: {}); nothing was imported",
                envelope_errors(resp)
            )));
        }
        let result = envelope(resp, now, step)?;
        match step {
            Step::CheckTarget => {
                self.step = Step::Inspect;
                Ok(Answer::Continue)
            }
            Step::Inspect => {
                let rows = result
                    .pointer("/0/results")
                    .and_then(Value::as_array)
                    .ok_or_else(|| malformed("query: no result[0].results"))?;
                let objects: Vec<String> = rows
                    .iter()
                    .map(|r| {
                        let field = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                        format!("{} {:?}", field("type"), field("name"))
                    })
                    .collect();
                let target = self.target.clone().unwrap_or_default();
                if !objects.is_empty() {
                    if !self.replace {
                        return Err(StepError::permanent(format!(
                            "database {target} is not empty (it holds {}): import into an empty database, or \
                             add \"replace\": true to drop the backup's tables, views, indexes and triggers \
                             there first (its other objects stay); nothing was imported",
                            objects.join(", ")
                        )));
                    }
                    self.notes.push(format!(
                        "database {target} held {}: the backup's objects were dropped and created again in the \
                         same import",
                        objects.join(", ")
                    ));
                }
                self.step = Step::Stage;
                Ok(Answer::Continue)
            }
            Step::CreateScratch => {
                let uuid = result.get("uuid").and_then(Value::as_str).ok_or_else(|| malformed("create: no uuid"))?;
                self.target = Some(uuid.to_string());
                self.step = Step::Stage;
                Ok(Answer::Continue)
            }
            Step::Init | Step::Ingest | Step::Poll => self.on_import(&result, step),
            Step::Count(i) => {
                let n = result
                    .pointer("/0/results/0/n")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| malformed("query: no count in result[0].results[0].n"))?;
                let table = self.dump.as_ref().and_then(|d| d.row_counts.keys().nth(i).cloned()).unwrap_or_default();
                self.counted.insert(table, n);
                let tables = self.dump.as_ref().map_or(0, |d| d.row_counts.len());
                self.step = if i + 1 < tables { Step::Count(i + 1) } else { self.after_counts() };
                Ok(Answer::Continue)
            }
            Step::Check(i) => {
                let rows = result
                    .pointer("/0/results")
                    .and_then(Value::as_array)
                    .ok_or_else(|| malformed("query: no result[0].results"))?;
                let rows: Vec<serde_json::Map<String, Value>> =
                    rows.iter().filter_map(Value::as_object).cloned().collect();
                let check = self.dump.as_ref().and_then(|d| d.checks.get(i).cloned());
                let check = check.ok_or_else(|| StepError::permanent("no such check to read back"))?;
                let mut progress = self.checking.take().unwrap_or_default();
                let finished = check.fold(&mut progress, &rows, self.page_rows)?;
                if !finished {
                    self.checking = Some(progress);
                    return Ok(Answer::Continue);
                }
                self.checked.push(progress.prints);
                let total = self.dump.as_ref().map_or(0, |d| d.checks.len());
                if i + 1 < total {
                    self.checking = Some(CheckProgress::default());
                    self.step = Step::Check(i + 1);
                } else {
                    self.failure = self.compare();
                    self.step = Step::DeleteScratch;
                }
                Ok(Answer::Continue)
            }
            Step::FindScratch => {
                let name = self.scratch.clone().unwrap_or_default();
                let found = result
                    .as_array()
                    .and_then(|dbs| dbs.iter().find(|d| d.get("name").and_then(Value::as_str) == Some(name.as_str())))
                    .and_then(|d| d.get("uuid").and_then(Value::as_str));
                let Some(found) = found else {
                    // The create never arrived: ask again, a few times at most.
                    if self.lookups >= MAX_LOOKUPS {
                        return Err(StepError::permanent(format!(
                            "the scratch database {name} could not be created: D1 answered that the name is taken \
                             or did not answer, and listing databases by that name finds none ({} look-ups)",
                            self.lookups
                        )));
                    }
                    self.step = Step::CreateScratch;
                    return Ok(Answer::Continue);
                };
                self.target = Some(found.to_string());
                self.notes.push(format!(
                    "the scratch database {name} was created by an earlier request whose answer was lost; the drill                      adopted it ({found})"
                ));
                self.step = Step::Stage;
                Ok(Answer::Continue)
            }
            Step::DeleteScratch => {
                self.step = Step::Record;
                Ok(Answer::Continue)
            }
            Step::TimeTravel => {
                self.result = Some(result);
                self.step = Step::Done;
                Ok(Answer::Continue)
            }
            Step::ReadManifest
            | Step::Digest
            | Step::Stage
            | Step::Upload
            | Step::Cleanup
            | Step::Record
            | Step::Done => Err(StepError::permanent(format!("an answer came at {step:?}, where none was asked for"))),
        }
    }

    fn on_import(&mut self, result: &Value, step: Step) -> Result<Answer, StepError> {
        if let Some(lines) = result.get("messages").and_then(Value::as_array) {
            self.messages.extend(lines.iter().filter_map(Value::as_str).map(str::to_string));
            let excess = self.messages.len().saturating_sub(MAX_MESSAGES);
            self.messages.drain(..excess);
        }
        if let Some(b) = result.get("at_bookmark").and_then(Value::as_str) {
            self.import_bookmark = Some(b.to_string());
        }
        if step == Step::Init {
            if let Some(url) = result.get("upload_url").and_then(Value::as_str) {
                self.secret_upload_url = Some(url.to_string());
                self.import_filename = result.get("filename").and_then(Value::as_str).map(str::to_string);
                self.step = Step::Upload;
                return Ok(Answer::Continue);
            }
            // D1 has the file already: the answer is a polling answer.
        }
        if result.get("success").and_then(Value::as_bool) == Some(false) {
            let error = result.get("error").and_then(Value::as_str).unwrap_or("unknown error");
            return Err(StepError::permanent(self.with_messages(format!("D1 import failed: {error}"))));
        }
        match result.get("status").and_then(Value::as_str) {
            Some("active") => {
                self.step = Step::Poll;
                Ok(Answer::Pending)
            }
            Some("complete") => {
                self.result = result.get("result").cloned();
                self.step = if self.staging.is_some() { Step::Cleanup } else { self.after_cleanup() };
                Ok(Answer::Continue)
            }
            Some("error") => {
                let error = result
                    .get("error")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .or_else(|| {
                        result
                            .get("errors")
                            .and_then(Value::as_array)
                            .map(|e| e.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("\n"))
                    })
                    .unwrap_or_else(|| "import failed".into());
                Err(StepError::permanent(self.with_messages(format!("D1 import failed: {error}"))))
            }
            Some(other) => Err(StepError::permanent(
                self.with_messages(format!("D1 reset before execute completed (status {other:?})")),
            )),
            None if step == Step::Init => Err(malformed("init: neither upload_url nor status")),
            None => Err(malformed("import: no status")),
        }
    }

    fn with_messages(&self, error: String) -> String {
        if self.messages.is_empty() {
            error
        } else {
            format!("{error} [D1 messages: {}]", self.messages.join(" | "))
        }
    }

    /// The drill's finding: `None` when every table has the rows the backup recorded.
    fn compare(&self) -> Option<String> {
        let dump = self.dump.as_ref()?;
        let diffs: Vec<String> = dump
            .row_counts
            .iter()
            .filter(|(t, n)| self.counted.get(*t) != Some(*n))
            .map(|(t, n)| {
                let got = self.counted.get(t).map_or("no".to_string(), u64::to_string);
                format!("table {t:?}: {got} rows restored, {n} in the backup")
            })
            .collect();
        let mut findings = diffs;
        for (i, check) in dump.checks.iter().enumerate() {
            match self.checked.get(i) {
                Some(got) => findings.extend(check.finding(got)),
                None => findings.push(format!("table {:?}: not read back", check.table)),
            }
        }
        findings.extend(self.altered.clone());
        (!findings.is_empty()).then(|| format!("drill of backup {} failed: {}", dump.folder, findings.join("; ")))
    }
}

impl Restorer for D1Restore {
    fn next(&self, cx: &RestoreCx<'_>) -> Result<Next, StepError> {
        let ProviderConfig::D1(cfg) = &cx.source.provider else {
            return Err(StepError::permanent("a D1 restore of a source that is no longer a D1 source"));
        };
        let token = cx.creds.get(&cfg.token_secret)?;
        self.next_with(cfg, token, cx.creds, cx.job, cx.now, cx.source)
    }

    fn on_response(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<Answer, StepError> {
        self.answer(resp, now)
    }

    fn on_io(&mut self, done: IoDone, now: Timestamp) -> Result<Answer, StepError> {
        self.fold(done, now)
    }

    fn sending(&mut self, job: &JobId) {
        if self.step == Step::CreateScratch {
            self.scratch = Some(Self::scratch_name(job));
        }
    }

    fn fail_after_cleanup(&mut self, message: String) -> bool {
        self.cleanup_first(message)
    }

    fn unanswered(&mut self, _message: &str) -> Option<String> {
        // The create may have arrived: look for the scratch database by its name before asking
        // again (a second create would find the name taken).
        if self.step == Step::CreateScratch && self.scratch.is_some() {
            self.lookups += 1;
            self.step = Step::FindScratch;
        }
        None
    }

    fn backup_folder(&self) -> Option<String> {
        self.dump.as_ref().map(|d| d.folder.clone())
    }
}

/// How old a scratch database of no job in flight must be before the daily sweep deletes it: a
/// drill may be creating one while the sweep reads which jobs are in flight.
pub const SCRATCH_GRACE: Duration = Duration::from_secs(3600);

/// The daily sweep's question to a D1 source's account: its databases named like a drill's
/// scratch database (`GET …/d1/database?name=ferry-drill-`, a name search as in
/// `cloudflare-typescript` `database.list`).
pub fn scratch_list_request(cfg: &D1Config, token: &Secret) -> Result<HttpRequest, StepError> {
    let mut url = url::Url::parse(&db_url(cfg, &[])?).map_err(|e| StepError::permanent(e.to_string()))?;
    url.query_pairs_mut().append_pair("name", crate::providers::d1::SCRATCH_PREFIX).append_pair("per_page", "100");
    Ok(authed(HttpRequest::get(url.to_string()), token))
}

/// The deletion of a leftover scratch database.
pub fn scratch_delete_request(cfg: &D1Config, token: &Secret, uuid: &str) -> Result<HttpRequest, StepError> {
    Ok(authed(HttpRequest::delete(db_url(cfg, &[uuid])?), token))
}

/// From the listing's answer: the scratch databases (`ferry-drill-<job id>`, uuid and name) whose
/// job is not in flight (`live`: job ids) and that were created over [`SCRATCH_GRACE`] ago. A
/// drill deletes its own; these are what a lost job left. Anything else is never named.
pub fn scratch_leftovers(
    resp: &HttpResponse,
    live: &std::collections::BTreeSet<String>,
    now: Timestamp,
) -> Result<Vec<(String, String)>, StepError> {
    let body = crate::providers::d1::envelope(resp, now, Some("listing scratch databases"))?;
    let listed = body.get("result").and_then(Value::as_array).cloned().unwrap_or_default();
    Ok(listed
        .iter()
        .filter_map(|db| {
            let name = db.get("name").and_then(Value::as_str)?;
            let uuid = db.get("uuid").and_then(Value::as_str)?;
            let job = name.strip_prefix(crate::providers::d1::SCRATCH_PREFIX)?;
            let ours = job.len() == 16 && job.bytes().all(|b| b.is_ascii_hexdigit());
            let created = db.get("created_at").and_then(Value::as_str).and_then(Timestamp::parse_rfc3339);
            let old = created.is_some_and(|c| now.since(c) > SCRATCH_GRACE);
            (ours && old && !live.contains(job)).then(|| (uuid.to_string(), name.to_string()))
        })
        .collect())
}

/// The dump of a D1 backup, from its manifest.
fn dump_of(key: &str, manifest: &Manifest) -> Result<DumpRef, StepError> {
    let folder = crate::manifest::folder_of(key).unwrap_or_default().to_string();
    let sql: Vec<_> = manifest
        .artifacts
        .iter()
        .filter(|a| crate::dump::Tally::applies_to(plain_name(a)) && !imported_after_dump(a))
        .collect();
    let mut extra = extra_inputs(manifest);
    let artifact = match sql.as_slice() {
        [one] => *one,
        // Every table was virtual: no export was sent, and the query artifact is the whole backup.
        [] if !extra.is_empty() => {
            extra.remove(0);
            let Some(first) = manifest.artifacts.iter().find(|a| imported_after_dump(a)) else {
                return Err(StepError::permanent(format!("backup {folder} holds no .sql dump to restore")));
            };
            first
        }
        [] => return Err(StepError::permanent(format!("backup {folder} holds no .sql dump to restore"))),
        _ => return Err(StepError::permanent(format!("backup {folder} holds more than one .sql dump"))),
    };
    let inside = Inside::of(artifact);
    let md5 = inside.md5.clone().ok_or_else(|| {
        StepError::permanent(format!(
            "backup {folder} records no MD5 of its dump (it was made before Ferry recorded one), so what R2 holds \
             cannot be checked against it: take a new backup"
        ))
    })?;
    Ok(DumpRef {
        folder,
        key: artifact.key.clone(),
        size: inside.size,
        sealed: inside.sealed,
        md5,
        row_counts: inside.row_counts.unwrap_or_default(),
        at_bookmark: manifest.provider.get("at_bookmark").and_then(Value::as_str).map(str::to_string),
        finished_at: manifest.finished_at,
        database_id: manifest.provider.get("database_id").and_then(Value::as_str).map(str::to_string),
        extra,
        checks: drill_checks(manifest),
    })
}

/// What an artifact holds, for a restore: its plaintext when it is encrypted
/// (`details.encryption.plaintext`), else what R2 holds.
struct Inside {
    size: u64,
    sealed: Option<u64>,
    md5: Option<String>,
    row_counts: Option<BTreeMap<String, u64>>,
}

impl Inside {
    fn of(artifact: &Artifact) -> Self {
        let plain = artifact.details.as_ref().and_then(|d| d.pointer("/encryption/plaintext"));
        match plain {
            None => Self {
                size: artifact.size,
                sealed: None,
                md5: artifact.md5.clone(),
                row_counts: artifact.row_counts.clone(),
            },
            Some(p) => Self {
                size: p.get("size").and_then(Value::as_u64).unwrap_or_default(),
                sealed: Some(artifact.size),
                md5: p.get("md5").and_then(Value::as_str).map(str::to_string),
                row_counts: p.get("row_counts").cloned().and_then(|v| serde_json::from_value(v).ok()),
            },
        }
    }
}

/// An artifact's file name as the provider named it (an encrypted one is stored as `<name>.age`).
fn plain_name(artifact: &Artifact) -> &str {
    match crate::transfer::sealed::is_encrypted(artifact) {
        true => artifact.filename.strip_suffix(crate::transfer::sealed::SUFFIX).unwrap_or(&artifact.filename),
        false => &artifact.filename,
    }
}

/// What the backup's query artifact says a drill must read back (`details.drill_checks`; none in
/// a backup made before Ferry recorded them).
fn drill_checks(manifest: &Manifest) -> Vec<DrillCheck> {
    manifest
        .artifacts
        .iter()
        .filter(|a| imported_after_dump(a))
        .filter_map(|a| a.details.as_ref()?.get("drill_checks").cloned())
        .filter_map(|v| serde_json::from_value::<Vec<DrillCheck>>(v).ok())
        .flatten()
        .collect()
}

/// Whether an artifact is SQL to import after the dump (`details.d1_import = "after_dump"`, as
/// the export's query artifact is marked).
fn imported_after_dump(artifact: &Artifact) -> bool {
    artifact.details.as_ref().and_then(|d| d.get("d1_import")).and_then(Value::as_str) == Some(AFTER_DUMP)
}

/// The hook for SQL a backup carries besides D1's dump (virtual tables' rows, exact big
/// integers): every artifact marked [`AFTER_DUMP`], in manifest order, is staged right after the
/// dump and before the held-back indexes, views and triggers, through the same rewriter.
pub fn extra_inputs(manifest: &Manifest) -> Vec<Input> {
    manifest
        .artifacts
        .iter()
        .filter(|a| imported_after_dump(a))
        .map(|a| {
            let inside = Inside::of(a);
            Input { key: a.key.clone(), size: inside.size, sealed: inside.sealed }
        })
        .collect()
}

/// Whether D1 refused a create because the name is taken: code 7502, "A database with that
/// name already exists" (wrangler maps the code to that message, workers-sdk#2143).
fn name_taken(resp: &HttpResponse) -> bool {
    if !(400..500).contains(&resp.status) {
        return false;
    }
    let body: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    body.get("errors").and_then(Value::as_array).is_some_and(|errors| {
        errors.iter().any(|e| {
            e.get("code").and_then(Value::as_u64) == Some(7502)
                || e.get("message").and_then(Value::as_str).is_some_and(|m| m.contains("already exists"))
        })
    })
}

fn malformed(what: &str) -> StepError {
    StepError::permanent(format!("D1 API: received a malformed response ({what})"))
}

fn envelope_errors(resp: &HttpResponse) -> String {
    let body: Value = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    crate::providers::d1::envelope_error_list(&body).unwrap_or_else(|| resp.snippet(200))
}

/// The `result` of a Cloudflare envelope, or the error in D1's words.
fn envelope(resp: &HttpResponse, now: Timestamp, step: Step) -> Result<Value, StepError> {
    let what = match step {
        Step::CreateScratch => "creating the scratch database",
        Step::CheckTarget => "looking up the target database",
        Step::Inspect => "reading what the target database holds",
        Step::Init | Step::Ingest | Step::Poll => "import",
        Step::Count(_) => "counting rows",
        Step::Check(_) => "reading back what the backup read through the query API",
        Step::FindScratch => "finding the scratch database by its name",
        Step::DeleteScratch => "deleting the scratch database",
        Step::TimeTravel => "time travel restore",
        _ => "request",
    };
    // D1 may answer a delete with an empty body.
    let not_json = || !serde_json::from_slice::<Value>(&resp.body).is_ok_and(|v| v.is_object());
    if step == Step::DeleteScratch && (200..300).contains(&resp.status) && not_json() {
        return Ok(Value::Null);
    }
    let body = crate::providers::d1::envelope(resp, now, Some(what))?;
    Ok(body.get("result").cloned().unwrap_or(Value::Null))
}
