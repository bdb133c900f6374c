//! Dgraph Cloud restores: a dedicated backend goes back to one of Dgraph's own backups, on its
//! `/admin/slash` (`provider-apis.md` §2.6).
//!
//! Ferry's backups of a Dgraph source are exports (`g01.json.gz`, `g01.schema.gz`, …); loading
//! those back needs Dgraph's live loader, which speaks gRPC, and a Worker cannot (see
//! `scripts/dgraph_live_load.py`). What a Worker can do is ask Dgraph Cloud to restore one of the
//! backups it keeps itself (dedicated backends only: a full backup weekly, an incremental one
//! every 4 h). The steps:
//!
//! 1. read the Ferry backup's manifest (when it finished; in account mode which deployment it is);
//! 2. sign in as the export does (Cerebro login and the deployments list in account mode, then
//!    the ACL login when configured);
//! 3. `listBackups` and choose the newest Dgraph backup taken at or before the Ferry backup
//!    finished, or the one the request names (`"dgraph_backup": {"folder", "num"}`); none → the
//!    job fails listing what exists (nothing was touched: listing is a read);
//! 4. `restore(uid, backupFolder, backupNum)`, `uid` being the source deployment's;
//! 5. poll `restoreStatus(restoreId)` until `OK`; a non-empty `errors` fails the job with those
//!    messages; any other status (only `OK` is documented) keeps polling until the restore's
//!    deadline, `restore_timeout_minutes` after Dgraph accepted it (default 6 h), then the job
//!    fails saying the restore may still be running.
//!
//! A restore replaces all data of the backend: the request must repeat the deployment's uid, or
//! the name the configuration uses for the backend (the source's name; in account mode the
//! deployment's name), in `confirm`. In endpoint mode Ferry cannot look the uid up, so the request
//! gives it (`"deployment_uid"`) and [`plan`] checks `confirm` (a 400). In account mode the
//! deployment is the one the backup's manifest names, so `confirm` is checked against it right
//! after the manifest is read, before any call to Dgraph.
//!
//! The restore mutation is never sent twice blindly: when it gets no answer (or one that is not
//! Dgraph's), Dgraph Cloud offers no way to find a restore without the `restoreId` that answer
//! carries, so the job fails saying a restore may have started.

use chrono::DateTime;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::{param_text, Answer, Io, IoDone, Next, RestoreCx, Restorer};
use crate::error::StepError;
use crate::http::HttpResponse;
use crate::identity::Task;
use crate::manifest::Manifest;
use crate::providers::dgraph::{graphql_body, DgraphConfig, DgraphState};
use crate::providers::{error_messages, Progress, ProviderState};
use crate::time::Timestamp;

const LIST_BACKUPS: &str = "query { listBackups { response { type backupNum folder timestamp } errors { message } } }";
const RESTORE: &str = "mutation($uid: String!, $backupFolder: String, $backupNum: Int) { restore(uid: $uid, backupFolder: $backupFolder, backupNum: $backupNum) { response { code message restoreId } errors { message } } }";
const RESTORE_STATUS: &str =
    "query($restoreId: Int!) { restoreStatus(restoreId: $restoreId) { response { status errors } } }";
/// Most backups named when none qualifies.
const MAX_LISTED: usize = 20;

/// Where a restore stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Read the Ferry backup's manifest.
    ReadManifest,
    /// Sign in if needed, then `listBackups`.
    ListBackups,
    /// Send the `restore` mutation.
    Restore,
    /// Poll `restoreStatus`.
    Status,
    /// Nothing more to do.
    Done,
}

/// One of Dgraph's own backups, as `listBackups` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DgraphBackup {
    /// The backup series' folder.
    pub folder: String,
    /// Its number in the series.
    pub num: i64,
    /// `full` or `incremental` (empty when a request named it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
    /// When it was taken, as Dgraph wrote it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub timestamp: String,
}

impl DgraphBackup {
    fn describe(&self) -> String {
        let mut text = format!("{} #{}", self.folder, self.num);
        if !self.kind.is_empty() || !self.timestamp.is_empty() {
            text.push_str(&format!(" ({}, taken {})", self.kind, self.timestamp));
        }
        text
    }
}

/// A restore's persisted state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DgraphRestore {
    /// The Ferry backup's manifest key.
    pub manifest_key: Option<String>,
    /// What the request's `confirm` said.
    pub confirm: String,
    /// The source deployment's uid: given (endpoint mode) or from the manifest (account mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployment_uid: Option<String>,
    /// The Dgraph backup the request named, if it named one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested: Option<DgraphBackup>,
    /// The source's settings when the job started.
    pub config: Box<DgraphConfig>,
    /// Sign-in state (tokens; in account mode the deployment), shared with the export.
    pub auth: Box<DgraphState>,
    /// Where it stands.
    pub step: Step,
    /// The Ferry backup's folder, once the manifest was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folder: Option<String>,
    /// When the Ferry backup finished.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// The Dgraph backup restored, once chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen: Option<DgraphBackup>,
    /// Why it was chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chosen_because: Option<String>,
    /// The restore's id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_id: Option<i64>,
    /// When Dgraph accepted the restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_started_at: Option<Timestamp>,
    /// The last `restoreStatus`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// `restoreStatus` answers.
    #[serde(default)]
    pub polls: u32,
}

/// Checks a restore request and makes the restore's state: `Err` is the 400 the caller gets.
pub fn plan(task: Task, cfg: &DgraphConfig, params: &Value, backup: Option<String>) -> Result<DgraphRestore, String> {
    match task {
        Task::Restore => {}
        Task::Drill => {
            return Err("drills are not available for Dgraph sources: Ferry's Dgraph backups are exports, loaded \
                        back with Dgraph's live loader over gRPC (scripts/dgraph_live_load.py)"
                .into())
        }
        Task::Export | Task::Verify | Task::Replicate => return Err("not a restore".into()),
    }
    let Some(manifest_key) = backup else {
        return Err("a restore needs the backup to restore (POST /v1/backups/{source}/{folder}/restore)".into());
    };
    let source = manifest_key.split('/').next().unwrap_or_default().to_string();
    let uid = param_text(params, "/deployment_uid");
    if params.get("deployment_uid").is_some() && uid.is_none() {
        return Err("\"deployment_uid\" must be the deployment's uid (a string such as \"0xf0ffe9\")".into());
    }
    let requested = match params.get("dgraph_backup") {
        None | Some(Value::Null) => None,
        Some(v) => {
            let folder = v.get("folder").and_then(Value::as_str).map(str::trim).filter(|s| !s.is_empty());
            let num = v.get("num").and_then(Value::as_i64).filter(|n| *n >= 0);
            match (folder, num) {
                (Some(folder), Some(num)) => Some(DgraphBackup {
                    folder: folder.to_string(),
                    num,
                    kind: String::new(),
                    timestamp: String::new(),
                }),
                _ => {
                    return Err("\"dgraph_backup\" must be {\"folder\": \"<folder>\", \"num\": <backupNum>}, \
                                one of the backups listBackups lists"
                        .into())
                }
            }
        }
    };
    let confirm = param_text(params, "/confirm");
    if cfg.account().is_none() {
        let endpoint = cfg.endpoint.as_ref().map_or("?".to_string(), |u| u.to_string());
        let Some(uid) = uid.clone() else {
            return Err(format!(
                "a Dgraph restore needs \"deployment_uid\": the uid of the deployment behind {endpoint} whose \
                 Dgraph backups are restored (Dgraph's restore names it; in endpoint mode Ferry cannot look it up)"
            ));
        };
        if confirm.as_deref() != Some(uid.as_str()) && confirm.as_deref() != Some(source.as_str()) {
            return Err(format!(
                "a restore replaces all data of the Dgraph backend {endpoint}: repeat its deployment uid {uid:?} \
                 or the source's name {source:?} in \"confirm\" to go on"
            ));
        }
    }
    let Some(confirm) = confirm else {
        return Err("a restore replaces all data of the Dgraph backend: repeat its deployment uid or name (as the \
                    backup's manifest records it under provider.backend) in \"confirm\" to go on"
            .into());
    };
    Ok(DgraphRestore {
        manifest_key: Some(manifest_key),
        confirm,
        deployment_uid: uid,
        requested,
        config: Box::new(cfg.clone()),
        auth: Box::default(),
        step: Step::ReadManifest,
        folder: None,
        finished_at: None,
        chosen: None,
        chosen_because: None,
        restore_id: None,
        restore_started_at: None,
        status: None,
        polls: 0,
    })
}

/// A timestamp as `listBackups` writes it (`2021-04-15T18:00:58+0000`) or RFC 3339.
pub(crate) fn parse_backup_time(s: &str) -> Option<Timestamp> {
    Timestamp::parse_rfc3339(s).or_else(|| {
        DateTime::parse_from_str(s.trim(), "%Y-%m-%dT%H:%M:%S%.f%z")
            .ok()
            .map(|d| Timestamp::from_datetime(d.with_timezone(&chrono::Utc)))
    })
}

/// The backups of a `listBackups` answer: an array of series, each an array of backups.
fn backups_of(response: &Value) -> Vec<DgraphBackup> {
    let series = response.as_array().map(Vec::as_slice).unwrap_or_default();
    series
        .iter()
        .flat_map(|s| match s {
            Value::Array(items) => items.clone(),
            other => vec![other.clone()],
        })
        .filter_map(|b| {
            Some(DgraphBackup {
                folder: b.get("folder").and_then(Value::as_str)?.to_string(),
                num: b.get("backupNum").and_then(Value::as_i64)?,
                kind: b.get("type").and_then(Value::as_str).unwrap_or_default().to_string(),
                timestamp: b.get("timestamp").and_then(Value::as_str).unwrap_or_default().to_string(),
            })
        })
        .collect()
}

/// The messages of an in-payload `errors` list (objects with `message`, or strings).
fn payload_errors(errors: Option<&Value>) -> Option<String> {
    let list = errors?.as_array()?;
    let messages: Vec<String> = list
        .iter()
        .map(|e| match e {
            Value::String(s) => s.clone(),
            other => other.get("message").and_then(Value::as_str).map_or_else(|| other.to_string(), str::to_string),
        })
        .collect();
    (!messages.is_empty()).then(|| messages.join("; "))
}

fn listed(backups: &[DgraphBackup]) -> String {
    if backups.is_empty() {
        return "Dgraph lists no backups".into();
    }
    let mut names: Vec<String> = backups.iter().take(MAX_LISTED).map(DgraphBackup::describe).collect();
    if backups.len() > MAX_LISTED {
        names.push(format!("and {} more", backups.len() - MAX_LISTED));
    }
    format!("Dgraph has: {}", names.join("; "))
}

fn malformed(what: &str) -> StepError {
    StepError::permanent(format!("Dgraph: received a malformed response ({what})"))
}

impl DgraphRestore {
    fn backend_text(&self) -> String {
        match (&self.auth.backend, &self.config.endpoint) {
            (Some(b), _) => format!("{} ({})", b.name, b.url),
            (None, Some(url)) => url.to_string(),
            (None, None) => "?".into(),
        }
    }

    fn uid(&self) -> Result<&str, StepError> {
        self.deployment_uid.as_deref().ok_or_else(|| StepError::permanent("no deployment uid"))
    }

    /// The manifest is read: remember the backup, and in account mode the deployment, checked
    /// against `confirm`.
    fn on_manifest(&mut self, key: String, manifest: &Manifest) -> Result<Answer, StepError> {
        self.folder = crate::manifest::folder_of(&key).map(str::to_string);
        self.finished_at = Some(manifest.finished_at);
        self.manifest_key = Some(key);
        if self.config.account().is_some() {
            let backend = manifest.provider.get("backend").filter(|b| b.is_object());
            let uid = backend.and_then(|b| b.get("uid")).and_then(Value::as_str).unwrap_or_default();
            let name = backend.and_then(|b| b.get("name")).and_then(Value::as_str).unwrap_or_default();
            if uid.is_empty() {
                return Err(StepError::permanent(
                    "the backup's manifest names no deployment (provider.backend.uid); nothing was touched",
                ));
            }
            if let Some(given) = &self.deployment_uid {
                if given != uid {
                    return Err(StepError::permanent(format!(
                        "this backup is of deployment {uid} ({name}), not {given}; nothing was touched"
                    )));
                }
            }
            if self.confirm != uid && self.confirm != name {
                return Err(StepError::permanent(format!(
                    "a restore replaces all data of deployment {name} ({uid}): repeat its uid or name in \
                     \"confirm\" to go on; nothing was touched"
                )));
            }
            self.deployment_uid = Some(uid.to_string());
        }
        self.step = Step::ListBackups;
        Ok(Answer::Continue)
    }

    /// An answer to a sign-in call (Cerebro, deployments, ACL login).
    fn on_sign_in(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<Answer, StepError> {
        match self.auth.on_response(&self.config, resp, now)? {
            Progress::Pending { .. } | Progress::Again => Ok(Answer::Continue),
            Progress::Failed(message) | Progress::Skip(message) => Err(StepError::permanent(message)),
            Progress::Spawn(children) => {
                let uid = self.uid()?.to_string();
                let mut names = Vec::new();
                for child in children {
                    let ProviderState::Dgraph(state) = child else { continue };
                    let Some(backend) = state.backend else { continue };
                    if backend.uid == uid {
                        self.auth.backend = Some(backend);
                        return Ok(Answer::Continue);
                    }
                    names.push(format!("{} ({})", backend.name, backend.uid));
                }
                Err(StepError::permanent(format!(
                    "the Dgraph Cloud account has no deployment with uid {uid} (it has: {})",
                    if names.is_empty() { "none".into() } else { names.join(", ") }
                )))
            }
            Progress::Ready(_) => Err(malformed("a sign-in answer carried files")),
        }
    }

    fn choose(&mut self, backups: &[DgraphBackup]) -> Result<(), StepError> {
        let finished = self.finished_at.ok_or_else(|| StepError::permanent("the backup's manifest was not read"))?;
        let ferry = self.folder.clone().unwrap_or_default();
        if let Some(wanted) = &self.requested {
            let found = backups.iter().find(|b| b.folder == wanted.folder && b.num == wanted.num);
            let Some(found) = found else {
                return Err(StepError::permanent(format!(
                    "Dgraph has no backup {} #{} to restore; {}",
                    wanted.folder,
                    wanted.num,
                    listed(backups)
                )));
            };
            self.chosen = Some(found.clone());
            self.chosen_because = Some("named by the request".into());
            return Ok(());
        }
        let best = backups
            .iter()
            .filter_map(|b| parse_backup_time(&b.timestamp).map(|t| (t, b)))
            .filter(|(t, _)| *t <= finished)
            .max_by(|(ta, a), (tb, b)| ta.cmp(tb).then(a.num.cmp(&b.num)));
        let Some((_, best)) = best else {
            return Err(StepError::permanent(format!(
                "no Dgraph backup was taken at or before Ferry backup {ferry} finished ({finished}); name one \
                 with \"dgraph_backup\": {{\"folder\", \"num\"}}; {}; nothing was touched",
                listed(backups)
            )));
        };
        self.chosen = Some(best.clone());
        self.chosen_because =
            Some(format!("the newest Dgraph backup taken at or before Ferry backup {ferry} finished ({finished})"));
        Ok(())
    }

    fn on_admin(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<Answer, StepError> {
        let step = self.step;
        let body = match graphql_body(resp, now) {
            Ok(body) => body,
            // Refused before it ran (credentials, rate limit): nothing started.
            Err(e) if step == Step::Restore && !matches!(resp.status, 401 | 403 | 429) => {
                return Err(StepError::permanent(format!(
                    "{}; a restore may have started: Dgraph Cloud can only be asked about a restore by the \
                     restoreId its answer carries, so Ferry does not send it again. Check the backend's data before \
                     restoring again",
                    e.message()
                )))
            }
            Err(e) => return Err(e),
        };
        if let Some(errors) = error_messages(&body) {
            if self.auth.token_refused(&self.config, &errors) {
                return Ok(Answer::Continue);
            }
            let what = match step {
                Step::ListBackups => "Dgraph listBackups failed (nothing was touched)",
                Step::Restore => "Dgraph refused the restore",
                _ => "Dgraph restoreStatus failed",
            };
            return Err(StepError::permanent(format!("{what}: {errors}")));
        }
        let data = body.get("data").filter(|d| d.is_object()).ok_or_else(|| malformed("no data"))?;
        match step {
            Step::ListBackups => {
                let list =
                    data.get("listBackups").filter(|l| l.is_object()).ok_or_else(|| malformed("no listBackups"))?;
                if let Some(errors) = payload_errors(list.get("errors")) {
                    return Err(StepError::permanent(format!(
                        "Dgraph listBackups failed (nothing was touched): {errors}"
                    )));
                }
                let backups = backups_of(list.get("response").unwrap_or(&Value::Null));
                self.choose(&backups)?;
                self.step = Step::Restore;
                Ok(Answer::Continue)
            }
            Step::Restore => {
                let restore = data.get("restore").filter(|r| r.is_object()).ok_or_else(|| {
                    StepError::permanent(
                        "Dgraph's answer to the restore mutation carries no restore (a restore may have started; \
                         check the backend before restoring again)",
                    )
                })?;
                if let Some(errors) = payload_errors(restore.get("errors")) {
                    return Err(StepError::permanent(format!("Dgraph refused the restore: {errors}")));
                }
                let response = restore.get("response").unwrap_or(&Value::Null);
                let code = response.get("code").and_then(Value::as_str).unwrap_or("Success");
                let message = response.get("message").and_then(Value::as_str).unwrap_or_default();
                if code != "Success" {
                    return Err(StepError::permanent(format!("Dgraph refused the restore ({code}): {message}")));
                }
                let id = response
                    .get("restoreId")
                    .and_then(|v| v.as_i64().or_else(|| v.as_str().and_then(|s| s.trim().parse::<i64>().ok())));
                let Some(id) = id else {
                    return Err(StepError::permanent(format!(
                        "Dgraph started the restore ({message}) but gave no restoreId to follow it: check the \
                         backend's data"
                    )));
                };
                self.restore_id = Some(id);
                self.restore_started_at = Some(now);
                self.status = Some("started".into());
                self.step = Step::Status;
                Ok(Answer::Pending)
            }
            Step::Status => {
                let response = data
                    .pointer("/restoreStatus/response")
                    .filter(|r| r.is_object())
                    .ok_or_else(|| malformed("no restoreStatus.response"))?;
                self.polls += 1;
                let status = response.get("status").and_then(Value::as_str).unwrap_or("Unknown").to_string();
                self.status = Some(status.clone());
                if let Some(errors) = payload_errors(response.get("errors")) {
                    return Err(StepError::permanent(format!(
                        "Dgraph restore {} failed (status {status}): {errors}",
                        self.restore_id.unwrap_or_default()
                    )));
                }
                if status == "OK" {
                    self.step = Step::Done;
                    Ok(Answer::Continue)
                } else {
                    // Any other status: still restoring, until restore_timeout_minutes.
                    Ok(Answer::Pending)
                }
            }
            Step::ReadManifest | Step::Done => {
                Err(StepError::permanent(format!("an answer came at {step:?}, where none was asked for")))
            }
        }
    }

    fn summary(&self) -> String {
        let chosen = self.chosen.as_ref().map_or("?".into(), DgraphBackup::describe);
        format!(
            "restored Dgraph backup {chosen} of deployment {} into {} (restore {}), chosen as {}",
            self.deployment_uid.as_deref().unwrap_or("?"),
            self.backend_text(),
            self.restore_id.unwrap_or_default(),
            self.chosen_because.as_deref().unwrap_or("?"),
        )
    }
}

impl Restorer for DgraphRestore {
    fn next(&self, cx: &RestoreCx<'_>) -> Result<Next, StepError> {
        let cfg = &self.config;
        match self.step {
            Step::ReadManifest => return Ok(Next::Io(Io::ReadManifest { key: self.manifest_key.clone() })),
            Step::Done => return Ok(Next::Finished(Ok(self.summary()))),
            Step::ListBackups | Step::Restore | Step::Status => {}
        }
        if self.auth.signing_in(cfg) {
            return Ok(Next::Send(self.auth.next_request(cfg, cx.creds)?));
        }
        let req = match self.step {
            Step::ListBackups => self.auth.slash_call(cfg, cx.creds, LIST_BACKUPS, json!({}))?,
            Step::Restore => {
                let chosen = self.chosen.as_ref().ok_or_else(|| StepError::permanent("no Dgraph backup chosen"))?;
                let variables = json!({ "uid": self.uid()?, "backupFolder": chosen.folder, "backupNum": chosen.num });
                self.auth.slash_call(cfg, cx.creds, RESTORE, variables)?
            }
            _ => {
                let started = self.restore_started_at.unwrap_or(cx.now);
                let budget = cfg.restore_timeout();
                if cx.now.since(started) > budget {
                    return Ok(Next::Finished(Err(format!(
                        "Dgraph restore {} did not report OK within {} min (the source's restore_timeout_minutes); \
                         last status {:?}, after {} polls. Dgraph documents no status but OK, so Ferry stops \
                         waiting: the restore may still be running on the backend, check its data before \
                         restoring again",
                        self.restore_id.unwrap_or_default(),
                        budget.as_secs() / 60,
                        self.status.as_deref().unwrap_or("?"),
                        self.polls
                    ))));
                }
                self.auth.slash_call(cfg, cx.creds, RESTORE_STATUS, json!({ "restoreId": self.restore_id }))?
            }
        };
        Ok(Next::Send(req))
    }

    fn on_response(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<Answer, StepError> {
        if matches!(self.step, Step::ReadManifest | Step::Done) {
            return Err(StepError::permanent(format!("an answer came at {:?}, where none was asked for", self.step)));
        }
        if self.auth.signing_in(&self.config) {
            return self.on_sign_in(resp, now);
        }
        self.on_admin(resp, now)
    }

    fn on_io(&mut self, done: IoDone, _now: Timestamp) -> Result<Answer, StepError> {
        match (self.step, done) {
            (Step::ReadManifest, IoDone::Manifest(key, manifest)) => self.on_manifest(key, &manifest),
            (step, done) => Err(StepError::permanent(format!("unexpected {done:?} at {step:?}"))),
        }
    }

    fn unanswered(&mut self, message: &str) -> Option<String> {
        (self.step == Step::Restore && !self.auth.signing_in(&self.config)).then(|| {
            format!(
                "the restore mutation got no answer ({message}); a restore may have started: Dgraph Cloud can only \
                 be asked about a restore by the restoreId that answer carries, so Ferry does not send it again. \
                 Check the backend's data before restoring again"
            )
        })
    }

    fn backup_folder(&self) -> Option<String> {
        self.folder.clone()
    }
}
