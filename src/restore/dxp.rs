//! Liferay DXP Cloud restores: a committed backup's database and volume archives go back to the
//! source's backup service as a new backup of type `Uploaded` (`provider-apis.md` §4.2, §4.4).
//!
//! - `POST /backup/upload` takes `multipart/form-data` with the file fields `database`
//!   (`database.gz`, or `.tgz` for backup service < 4.2) and `volume` (`volume.tgz`); both are
//!   required, so a backup missing either fails before anything is sent. The body is streamed out
//!   of R2 ([`Io::PostPieces`]): its length is known from the manifest, so it carries a
//!   `Content-Length`. The boundary holds the job's random id (the archives were stored before it
//!   existed) and a digest of it.
//! - An upload overwrites nothing, so no `confirm` is asked: restoring the `Uploaded` backup is
//!   done in the console (Backups → the Uploaded backup → Restore to…, Admin role); the service
//!   documents no restore API.
//! - At most one upload per minute: a `429` is waited out (its `Retry-After`, else 60 s) and the
//!   upload sent again, at most [`MAX_THROTTLED`] times in a row; a job never sends two uploads
//!   within 60 s itself.
//! - An upload is never sent twice by mistake: before each upload the undocumented
//!   `GET /backup/list` is read (the ids it lists are the baseline). An upload whose answer was
//!   lost (a timeout, a dropped connection, a 5xx, or an isolate reset mid-upload) is looked for
//!   in the list, a new `Uploaded` backup not in the baseline, before uploading again, waiting
//!   until a minute after it started when it is not listed yet; without a list to look in, the job
//!   fails saying so. After a 2xx the list is read again (best effort) for the new backup's id.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::{param_text, Answer, Io, IoDone, Next, Piece, RestoreCx, Restorer};
use crate::error::StepError;
use crate::http::{status_error, HttpRequest, HttpResponse, Method};
use crate::identity::{JobId, Task};
use crate::manifest::Manifest;
use crate::providers::dxp::{
    authorize, credentials_refused, endpoint, item_id, list_items, message_of, DxpAuth, DxpConfig, DxpState,
};
use crate::providers::{Credentials, ProviderConfig};
use crate::time::Timestamp;

/// The service takes at most one upload per minute.
pub const UPLOAD_INTERVAL: Duration = Duration::from_secs(60);
/// An upload cleared by a listing is sent at once; a cleared upload found older than this was
/// interrupted (the isolate was reset, the runtime's watchdog is 15 s) and is looked for first.
const ARM_FRESH: Duration = Duration::from_secs(10);
/// `429`s in a row before the job gives up.
pub const MAX_THROTTLED: u32 = 10;
/// Looks at the list for the new backup after a 2xx before settling for a note.
const CONFIRM_LOOKS: u32 = 5;
/// The wait after a `429` without `Retry-After`, and the longest honoured.
const MAX_WAIT: Duration = Duration::from_secs(15 * 60);
/// How far a listed `createdAt` may precede the upload's start on our clock (no baseline).
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Where a restore stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Read the backup's manifest.
    ReadManifest,
    /// List the backups (the baseline; an unanswered upload looked for), then upload.
    Upload,
    /// Look for the new `Uploaded` backup in the list.
    Confirm,
    /// Nothing more to do.
    Done,
}

/// One archive of the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Archive {
    /// Its R2 key.
    pub key: String,
    /// Its file name (`database.gz`, `volume.tgz`).
    pub filename: String,
    /// Its size in bytes.
    pub size: u64,
}

/// The backup's two archives.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Archives {
    /// The backup's folder, with trailing slash.
    pub folder: String,
    /// The database archive.
    pub database: Archive,
    /// The volume archive.
    pub volume: Archive,
}

/// A DXP restore's persisted state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DxpRestore {
    /// The backup's manifest key.
    pub manifest_key: Option<String>,
    /// Where it stands.
    pub step: Step,
    /// The archives, once the manifest was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub archives: Option<Archives>,
    /// The backup ids listed before the first upload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub baseline: Option<BTreeSet<String>>,
    /// Why the backup list could not be read, when it could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub list_unavailable: Option<String>,
    /// When a listing cleared the upload to go (cleared by its answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub armed_at: Option<Timestamp>,
    /// When an upload started whose fate is unknown (it may have been taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_doubt_since: Option<Timestamp>,
    /// When this job last sent an upload the service may have taken (not refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_upload_at: Option<Timestamp>,
    /// `429`s in a row.
    #[serde(default)]
    pub throttled: u32,
    /// Looks at the list after the upload was accepted.
    #[serde(default)]
    pub confirm_looks: u32,
    /// The new `Uploaded` backup's id, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_id: Option<String>,
    /// Notes for the reader.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// How the source authenticates (secret names only), so that a refused credential is named
    /// as the backup path names it (an expired user token, the secret to renew).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth: Option<DxpAuth>,
}

/// Checks a restore request: `Err` is the 400 the caller gets (nothing was touched).
pub fn plan(task: Task, cfg: &DxpConfig, params: &Value, backup: Option<String>) -> Result<DxpRestore, String> {
    match task {
        Task::Restore => {}
        Task::Drill => {
            return Err("DXP Cloud sources have no restore drill: a restore uploads the backup to the backup \
                        service as a new Uploaded backup, restored from the console"
                .into())
        }
        Task::Export | Task::Verify | Task::Replicate => return Err("not a restore".into()),
    }
    let Some(manifest_key) = backup else {
        return Err("a restore needs the backup to restore (POST /v1/backups/{source}/{folder}/restore)".into());
    };
    if params.get("target").is_some() {
        return Err(format!(
            "a DXP restore uploads to the source's own backup service ({}); it takes no \"target\"",
            cfg.api_base
        ));
    }
    match param_text(params, "/mode").as_deref() {
        None | Some("upload") => {}
        Some(other) => return Err(format!("unknown \"mode\" {other:?}: a DXP restore is an \"upload\"")),
    }
    Ok(DxpRestore {
        manifest_key: Some(manifest_key),
        step: Step::ReadManifest,
        archives: None,
        baseline: None,
        list_unavailable: None,
        armed_at: None,
        in_doubt_since: None,
        last_upload_at: None,
        throttled: 0,
        confirm_looks: 0,
        backup_id: None,
        notes: Vec::new(),
        auth: cfg.auth(),
    })
}

/// The multipart boundary of `job`'s upload: its random id and a digest of it (46 characters).
pub fn boundary(job: &JobId) -> String {
    let digest = Sha256::digest(format!("ferry dxp upload {job}").as_bytes());
    format!("ferry-{job}-{}", &hex::encode(digest)[..24])
}

/// A file name safe inside a quoted `filename=`, else `fallback`.
fn safe_filename(name: &str, fallback: &str) -> String {
    let ok = !name.is_empty()
        && name.len() <= 100
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        name.to_string()
    } else {
        fallback.to_string()
    }
}

fn part_head(boundary: &str, field: &str, archive: &Archive, fallback: &str) -> String {
    let filename = safe_filename(&archive.filename, fallback);
    let lower = filename.to_ascii_lowercase();
    let content_type =
        if lower.ends_with(".gz") || lower.ends_with(".tgz") { "application/gzip" } else { "application/octet-stream" };
    format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n\
         Content-Type: {content_type}\r\n\r\n"
    )
}

/// The upload's body: the `database` part, then the `volume` part, the archives streamed from R2.
pub fn form_pieces(boundary: &str, archives: &Archives) -> Vec<Piece> {
    vec![
        Piece::Text(part_head(boundary, "database", &archives.database, "database.gz")),
        Piece::Object { key: archives.database.key.clone(), size: archives.database.size },
        Piece::Text(format!("\r\n{}", part_head(boundary, "volume", &archives.volume, "volume.tgz"))),
        Piece::Object { key: archives.volume.key.clone(), size: archives.volume.size },
        Piece::Text(format!("\r\n--{boundary}--\r\n")),
    ]
}

/// The two archives of a DXP backup, from its manifest.
fn archives_of(key: &str, manifest: &Manifest) -> Result<Archives, StepError> {
    let folder = crate::manifest::folder_of(key).unwrap_or_default().to_string();
    let find = |prefix: &str, endings: &[&str]| {
        manifest.artifacts.iter().find(|a| {
            let name = a.filename.to_ascii_lowercase();
            name.starts_with(prefix) && endings.iter().any(|e| name.ends_with(e))
        })
    };
    let database = find("database", &[".gz", ".tgz"]);
    let volume = find("volume", &[".tgz", ".tar.gz"]);
    let mut missing = Vec::new();
    if database.is_none() {
        missing.push("the database archive (database.gz or database.tgz)");
    }
    if volume.is_none() {
        missing.push("the volume archive (volume.tgz)");
    }
    let (Some(database), Some(volume)) = (database, volume) else {
        let held: Vec<&str> = manifest.artifacts.iter().map(|a| a.filename.as_str()).collect();
        return Err(StepError::permanent(format!(
            "backup {folder} lacks {}: the DXP backup service needs both the database and the volume to accept \
             an upload; nothing was uploaded (the backup holds: {})",
            missing.join(" and "),
            if held.is_empty() { "nothing".to_string() } else { held.join(", ") }
        )));
    };
    let archive =
        |a: &crate::manifest::Artifact| Archive { key: a.key.clone(), filename: a.filename.clone(), size: a.size };
    Ok(Archives { folder, database: archive(database), volume: archive(volume) })
}

/// A listing's items; `Ok(Err(why))` when the list is unavailable (absent, malformed); `Err` for
/// refused credentials (permanent) and the service's busy answers (transient).
fn listing(
    resp: &HttpResponse,
    auth: Option<&DxpAuth>,
    now: Timestamp,
) -> Result<Result<Vec<Value>, String>, StepError> {
    match resp.status {
        200..=299 => {}
        401 | 403 => return Err(credentials_refused(auth.cloned(), resp)),
        408 | 429 | 500..=599 => {
            return Err(status_error(
                resp,
                now,
                format!("listing the DXP backups answered HTTP {}: {}", resp.status, message_of(resp)),
            ))
        }
        status => return Ok(Err(format!("HTTP {status}: {}", message_of(resp)))),
    }
    let body: Option<Value> = serde_json::from_slice(&resp.body).ok();
    match body.as_ref().and_then(list_items) {
        Some(items) => Ok(Ok(items.clone())),
        None => Ok(Err(format!("a malformed answer (HTTP {}): {}", resp.status, resp.snippet(120)))),
    }
}

fn is_uploaded(item: &Value) -> bool {
    match item.get("type").or_else(|| item.get("backupType")) {
        None | Some(Value::Null) => true,
        Some(t) => t.as_str().is_some_and(|t| t.eq_ignore_ascii_case("uploaded")),
    }
}

impl DxpRestore {
    /// The newest listed `Uploaded` backup that is not in the baseline (without one: created
    /// since `since`, give or take the clocks' skew).
    fn new_upload(&self, items: &[Value], since: Timestamp) -> Option<String> {
        let earliest = since.minus(CLOCK_SKEW);
        items
            .iter()
            .rev()
            .filter(|item| is_uploaded(item))
            .filter_map(|item| {
                let id = item_id(item)?;
                let fresh = match &self.baseline {
                    Some(known) => !known.contains(id),
                    None => ["createdAt", "created_at", "createdDate"]
                        .iter()
                        .find_map(|k| item.get(*k).and_then(Value::as_str))
                        .and_then(Timestamp::parse_rfc3339)
                        .is_some_and(|created| created >= earliest),
                };
                fresh.then(|| id.to_string())
            })
            .next()
    }

    /// Clears an upload to go now, or waits out the minute since the last one.
    fn arm(&mut self, now: Timestamp) -> Answer {
        if let Some(last) = self.last_upload_at {
            let at = last.plus(UPLOAD_INTERVAL);
            if now < at {
                self.armed_at = None;
                return Answer::WaitUntil(at);
            }
        }
        self.armed_at = Some(now);
        self.in_doubt_since = Some(now);
        Answer::Continue
    }

    /// The listing before an upload.
    fn on_check(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<Answer, StepError> {
        match listing(resp, self.auth.as_ref(), now)? {
            Ok(items) => {
                self.list_unavailable = None;
                if let Some(since) = self.in_doubt_since {
                    if let Some(id) = self.new_upload(&items, since) {
                        self.notes.push(format!(
                            "the upload started at {since} got no answer; the backup list shows the new Uploaded \
                             backup {id}, so it was not uploaded again"
                        ));
                        self.backup_id = Some(id);
                        self.armed_at = None;
                        self.in_doubt_since = None;
                        self.step = Step::Done;
                        return Ok(Answer::Continue);
                    }
                    let settled = since.plus(UPLOAD_INTERVAL);
                    if now < settled {
                        // Not listed yet: look again once the service's minute has passed.
                        self.armed_at = None;
                        return Ok(Answer::WaitUntil(settled));
                    }
                    self.in_doubt_since = None;
                }
                if self.baseline.is_none() {
                    self.baseline = Some(items.iter().filter_map(item_id).map(str::to_string).collect());
                }
            }
            Err(why) => {
                if let Some(since) = self.in_doubt_since {
                    return Err(StepError::permanent(format!(
                        "the upload started at {since} got no answer, so the service may have taken it, and the \
                         backup list (GET /backup/list) to check is unavailable ({why}): look for a new Uploaded \
                         backup on the console's Backups page before restoring again (Ferry does not upload twice)"
                    )));
                }
                if self.list_unavailable.is_none() {
                    self.notes.push(format!(
                        "the backup list (GET /backup/list) is unavailable ({why}): the new backup is not confirmed"
                    ));
                }
                self.list_unavailable = Some(why);
            }
        }
        Ok(self.arm(now))
    }

    /// The upload's answer.
    fn on_posted(&mut self, posted: Result<HttpResponse, String>, now: Timestamp) -> Result<Answer, StepError> {
        let started = self.armed_at.take().or(self.in_doubt_since).unwrap_or(now);
        let resp = match posted {
            Ok(resp) => resp,
            Err(why) => {
                self.last_upload_at = Some(started);
                return Err(StepError::transient(format!(
                    "the upload to the DXP backup service got no answer ({why}); the backup list is checked \
                     before uploading again"
                )));
            }
        };
        let message = message_of(&resp);
        match resp.status {
            200..=299 => {
                self.last_upload_at = Some(started);
                self.in_doubt_since = None;
                self.throttled = 0;
                let answered: Option<Value> = serde_json::from_slice(&resp.body).ok();
                self.backup_id = answered.as_ref().and_then(item_id).map(str::to_string);
                self.step = Step::Confirm;
                Ok(Answer::Continue)
            }
            429 => {
                self.in_doubt_since = None;
                self.throttled += 1;
                if self.throttled > MAX_THROTTLED {
                    return Err(StepError::permanent(format!(
                        "the DXP backup service refused the upload {} times in a row (HTTP 429): {message}",
                        self.throttled
                    )));
                }
                let wait = resp.retry_after(now).unwrap_or(UPLOAD_INTERVAL).min(MAX_WAIT);
                self.notes.push(format!(
                    "the service refused an upload at {now} (HTTP 429: {message}); waited {} s",
                    wait.as_secs()
                ));
                Ok(Answer::WaitUntil(now.plus(wait)))
            }
            408 | 500..=599 => {
                // A gateway may answer so after the service took the upload: look before resending.
                self.last_upload_at = Some(started);
                Err(status_error(
                    &resp,
                    now,
                    format!("the DXP backup service answered the upload with HTTP {}: {message}", resp.status),
                ))
            }
            401 | 403 => {
                self.in_doubt_since = None;
                Err(credentials_refused(self.auth.clone(), &resp))
            }
            status => {
                self.in_doubt_since = None;
                Err(StepError::permanent(format!(
                    "the DXP backup service refused the upload (HTTP {status}): {message}"
                )))
            }
        }
    }

    /// The listing after an accepted upload: best effort, never fails the restore.
    fn on_confirm(&mut self, resp: &HttpResponse, now: Timestamp) -> Answer {
        let since = self.last_upload_at.unwrap_or(now);
        match listing(resp, self.auth.as_ref(), now) {
            Ok(Ok(items)) => {
                let named =
                    self.backup_id.clone().filter(|id| items.iter().any(|item| item_id(item) == Some(id.as_str())));
                if let Some(id) = named.or_else(|| self.new_upload(&items, since)) {
                    self.backup_id = Some(id);
                    self.step = Step::Done;
                    return Answer::Continue;
                }
                self.confirm_looks += 1;
                if self.confirm_looks < CONFIRM_LOOKS {
                    return Answer::Pending;
                }
                self.notes.push(format!(
                    "the service accepted the upload, but the backup list did not show it after {} looks",
                    self.confirm_looks
                ));
            }
            Ok(Err(why)) => self.notes.push(format!(
                "the service accepted the upload; the backup list (GET /backup/list) is unavailable to confirm it \
                 ({why})"
            )),
            Err(e) => {
                self.notes.push(format!("the service accepted the upload; confirming it failed: {}", e.message()))
            }
        }
        self.step = Step::Done;
        Answer::Continue
    }

    fn summary(&self, cfg: &DxpConfig) -> String {
        let Some(a) = &self.archives else { return "nothing was uploaded".into() };
        let host = cfg.api_base.host_str().unwrap_or("?");
        let which = match &self.backup_id {
            Some(id) => format!("the new Uploaded backup {id}"),
            None => "a new Uploaded backup".into(),
        };
        let mut note = format!(
            "uploaded backup {} ({} {} bytes, {} {} bytes) to the DXP backup service {host} as {which}; nothing was \
             overwritten: to restore it, open the console's Backups page, pick {which} and choose Restore to… \
             (Admin role)",
            a.folder, a.database.filename, a.database.size, a.volume.filename, a.volume.size
        );
        for n in &self.notes {
            note.push_str("; ");
            note.push_str(n);
        }
        note
    }

    fn next_with(&self, cfg: &DxpConfig, creds: &Credentials, job: &JobId, now: Timestamp) -> Result<Next, StepError> {
        let list = || DxpState::default().next_request(cfg, creds).map(Next::Send);
        match self.step {
            Step::ReadManifest => Ok(Next::Io(Io::ReadManifest { key: self.manifest_key.clone() })),
            Step::Upload => {
                let fresh = self.armed_at.is_some_and(|at| now >= at && now.since(at) < ARM_FRESH);
                if !fresh {
                    return list();
                }
                let archives =
                    self.archives.as_ref().ok_or_else(|| StepError::permanent("the backup's manifest was not read"))?;
                let boundary = boundary(job);
                let request = HttpRequest {
                    method: Method::Post,
                    url: endpoint(cfg, &["backup", "upload"]),
                    headers: vec![
                        ("content-type".into(), format!("multipart/form-data; boundary={boundary}")),
                        ("accept".into(), "application/json".into()),
                    ],
                    body: None,
                };
                Ok(Next::Io(Io::PostPieces {
                    request: authorize(cfg, request, creds)?,
                    pieces: form_pieces(&boundary, archives),
                }))
            }
            Step::Confirm => list(),
            Step::Done => Ok(Next::Finished(Ok(self.summary(cfg)))),
        }
    }
}

impl Restorer for DxpRestore {
    fn next(&self, cx: &RestoreCx<'_>) -> Result<Next, StepError> {
        let ProviderConfig::Dxp(cfg) = &cx.source.provider else {
            return Err(StepError::permanent("a DXP restore of a source that is no longer a DXP source"));
        };
        self.next_with(cfg, cx.creds, cx.job, cx.now)
    }

    fn on_response(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<Answer, StepError> {
        match self.step {
            Step::Upload => self.on_check(resp, now),
            Step::Confirm => Ok(self.on_confirm(resp, now)),
            step => Err(StepError::permanent(format!("an answer came at {step:?}, where none was asked for"))),
        }
    }

    fn on_io(&mut self, done: IoDone, now: Timestamp) -> Result<Answer, StepError> {
        match (self.step, done) {
            (Step::ReadManifest, IoDone::Manifest(key, manifest)) => {
                self.archives = Some(archives_of(&key, &manifest)?);
                self.manifest_key = Some(key);
                self.step = Step::Upload;
                Ok(Answer::Continue)
            }
            (Step::Upload, IoDone::Posted(posted)) => self.on_posted(posted, now),
            (step, done) => Err(StepError::permanent(format!("unexpected {done:?} at {step:?}"))),
        }
    }

    fn backup_folder(&self) -> Option<String> {
        self.archives.as_ref().map(|a| a.folder.clone())
    }
}
