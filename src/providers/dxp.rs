//! Liferay DXP Cloud: copying a backup service backup (database and volume archives).
//!
//! Quirks the code relies on (see `provider-apis.md` §4):
//! - Auth is HTTP Basic, or `dxpcloud-authorization: Bearer <user token>` (needed when SSO is on,
//!   backup service ≥ 3.2.0), or `Authorization: Bearer <project master token>` (older services).
//! - Which backup: a webhook may name one (`{"backup_id": "dxpcloud-…"}`); otherwise the newest
//!   from `GET /backup/list`. That listing is undocumented (`[3P]`), so every plausible shape is
//!   accepted: `{"backups": [...]}` or a bare array, ids under `backupId`, `id` or `backup_id`,
//!   newest by `createdAt` when every item has one, else by the id's `YYYYMMDDHHmm` suffix, else
//!   the last item; only items whose `status` says they completed ([`COMPLETED`], or no status at
//!   all) are taken, and a listing where none has completed fails the job naming the statuses.
//! - A backup id already copied for this source is skipped (the job ends `skipped`, not failed).
//! - `GET /backup/download/{database,volume}/{id}` stream gzip / tar.gz bytes as-is; the volume
//!   can be many gigabytes, so it goes through the multipart copy with flat memory.
//! - The database archive is `database.gz` from backup service 4.2 and `database.tgz` before
//!   (Liferay, "Downloading and Uploading Backups"): a `HEAD` of its download reads the name the
//!   service serves (`Content-Disposition`), and the archive is stored under it.
//! - A user token is the browser's `access_token` and expires: its 401 fails the job naming the
//!   Worker secret to renew.
//! - From backup service 5.9.0 the REST API may be gone (CLI only): its 404 is reported as such.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use url::Url;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;

use crate::error::StepError;
use crate::fields::{self, FieldError};
use crate::http::{status_error, HttpRequest, HttpResponse};
use crate::providers::{url_with_path, Credentials, Download, Progress, ProviderSettings, StepInput};

/// A DXP source's settings: its fields of the source table, with exactly one of three ways to
/// authenticate (see [`DxpAuth`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DxpConfig {
    /// The backup service, e.g. `https://backup-<project>-<env>.lfr.cloud`.
    #[serde(deserialize_with = "fields::http_url")]
    pub api_base: Url,
    /// Basic auth: the user (email).
    #[serde(default, deserialize_with = "fields::opt_text")]
    pub user: Option<String>,
    /// Basic auth: name of the Worker secret holding the password.
    #[serde(default, deserialize_with = "fields::opt_secret_name")]
    pub password_secret: Option<String>,
    /// Name of the Worker secret holding a user token (SSO projects).
    #[serde(default, deserialize_with = "fields::opt_secret_name")]
    pub user_token_secret: Option<String>,
    /// Name of the Worker secret holding the project master token (backup service < 3.2.0).
    #[serde(default, deserialize_with = "fields::opt_secret_name")]
    pub master_token_secret: Option<String>,
}

impl DxpConfig {
    /// How to authenticate; `None` unless exactly one mode is configured.
    pub fn auth(&self) -> Option<DxpAuth> {
        Some(match (&self.user, &self.password_secret, &self.user_token_secret, &self.master_token_secret) {
            (Some(user), Some(password_secret), None, None) => {
                DxpAuth::Basic { user: user.clone(), password_secret: password_secret.clone() }
            }
            (None, None, Some(secret), None) => DxpAuth::UserToken { secret: secret.clone() },
            (None, None, None, Some(secret)) => DxpAuth::MasterToken { secret: secret.clone() },
            _ => return None,
        })
    }
}

impl ProviderSettings for DxpConfig {
    fn default_poll_interval(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn check(&mut self) -> Result<(), FieldError> {
        if self.auth().is_some() {
            return Ok(());
        }
        Err(match (&self.user, &self.password_secret, &self.user_token_secret, &self.master_token_secret) {
            (Some(_), None, None, None) => FieldError::new("password_secret", "is required with user (Basic auth)"),
            (None, Some(_), None, None) => FieldError::new("user", "is required with password_secret (Basic auth)"),
            (None, None, None, None) => FieldError::new(
                "user_token_secret",
                "or master_token_secret, or user with password_secret, is required",
            ),
            _ => FieldError::new(
                "user_token_secret",
                "conflicts with another auth mode: give exactly one of user+password_secret, user_token_secret, \
                 master_token_secret",
            ),
        })
    }

    fn secret_names(&self) -> Vec<&str> {
        [&self.password_secret, &self.user_token_secret, &self.master_token_secret]
            .into_iter()
            .filter_map(|name| name.as_deref())
            .collect()
    }
}

/// The backup service's three authentication modes (names only, never a secret's value).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum DxpAuth {
    /// HTTP Basic with a user's email and password.
    Basic {
        /// The user (email).
        user: String,
        /// Name of the Worker secret holding the password.
        password_secret: String,
    },
    /// `dxpcloud-authorization: Bearer <user token>` (SSO projects).
    UserToken {
        /// Name of the Worker secret holding the token.
        secret: String,
    },
    /// `Authorization: Bearer <project master token>` (backup service < 3.2.0).
    MasterToken {
        /// Name of the Worker secret holding the token.
        secret: String,
    },
}

/// Progress of one DXP copy, persisted with the job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DxpState {
    /// The backup being copied.
    pub backup_id: Option<String>,
    /// True when the webhook named it; false when it was the newest listed.
    pub requested: bool,
    /// When the service says the backup was made, if it said.
    pub created_at: Option<String>,
    /// How many backups the listing showed.
    pub listed: Option<usize>,
    /// The database archive's name as the service serves it (a `HEAD` of its download):
    /// `database.gz`, or `database.tgz` from a backup service before 4.2.
    #[serde(default)]
    pub database_file: Option<String>,
}

/// The service's words in an answer: its `message`, else the body's start.
pub(crate) fn message_of(resp: &HttpResponse) -> String {
    serde_json::from_slice::<Value>(&resp.body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_string))
        .unwrap_or_else(|| resp.snippet(200))
}

/// A 401 or 403: the credentials are wrong or expired, and asking again will not help. The
/// message names the Worker secret to renew. A user token is the browser's `access_token` cookie
/// (Liferay Cloud, "Authentication"): it expires, and the service's 401 then says so (its exact
/// words are undocumented; any 401 to a user token is reported as possibly expired).
pub(crate) fn credentials_refused(auth: Option<DxpAuth>, resp: &HttpResponse) -> StepError {
    let said = message_of(resp);
    let status = resp.status;
    let text = match auth {
        Some(DxpAuth::UserToken { secret }) if status == 401 => {
            let what = if said.to_ascii_lowercase().contains("expired") {
                "has expired"
            } else {
                "was refused (it may have expired or been revoked)"
            };
            format!(
                "the DXP user token in the Worker secret {secret} {what} (HTTP 401: {said}). Renew it: sign in to \
                 the Liferay Cloud console, copy the access_token cookie and run wrangler secret put {secret}. \
                 User tokens expire, so for unattended backups use user and password_secret (HTTP Basic) where \
                 SSO is off"
            )
        }
        Some(DxpAuth::UserToken { secret }) => {
            format!(
                "the DXP backup service refused the user token in the Worker secret {secret} (HTTP {status}): {said}"
            )
        }
        Some(DxpAuth::MasterToken { secret }) => format!(
            "the DXP backup service refused the project master token in the Worker secret {secret} (HTTP {status}): \
             {said}"
        ),
        Some(DxpAuth::Basic { user, password_secret }) => format!(
            "the DXP backup service refused {user} with the password in the Worker secret {password_secret} (HTTP \
             {status}): {said}"
        ),
        None => format!("the DXP backup service refused the credentials (HTTP {status}): {said}"),
    };
    StepError::permanent(text)
}

/// The database archive's name when the service names none: backup service 4.2 and later serve
/// `database.gz` (Liferay, "Downloading and Uploading Backups").
pub const DEFAULT_DATABASE_FILE: &str = "database.gz";

/// The database archive's name as the service serves it, from a `Content-Disposition`
/// (`attachment; filename="database.tgz"` from a backup service before 4.2): kept when it is a
/// plain `database…` name ending `.gz` or `.tgz`, otherwise `database` with the served extension;
/// [`DEFAULT_DATABASE_FILE`] when there is no usable name.
pub fn database_file_name(headers: &[(String, String)]) -> String {
    let served = crate::transfer::header(headers, "content-disposition").and_then(disposition_filename);
    let Some(served) = served else { return DEFAULT_DATABASE_FILE.to_string() };
    let base = served.rsplit(['/', '\\']).next().unwrap_or_default();
    let lower = base.to_ascii_lowercase();
    let ext = if lower.ends_with(".tgz") || lower.ends_with(".tar.gz") {
        ".tgz"
    } else if lower.ends_with(".gz") {
        ".gz"
    } else {
        return DEFAULT_DATABASE_FILE.to_string();
    };
    let plain = base.len() <= 100
        && lower.starts_with("database")
        && base.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if plain {
        base.to_string()
    } else {
        format!("database{ext}")
    }
}

/// The `filename` (or `filename*=UTF-8''…`) parameter of a `Content-Disposition`.
fn disposition_filename(value: &str) -> Option<String> {
    let mut plain = None;
    for param in value.split(';').skip(1) {
        let (key, raw) = param.split_once('=')?;
        let raw = raw.trim();
        match key.trim().to_ascii_lowercase().as_str() {
            "filename*" => {
                let encoded = raw.split_once("''").map_or(raw, |(_, v)| v);
                return percent_encoding::percent_decode_str(encoded).decode_utf8().ok().map(|s| s.into_owned());
            }
            "filename" => plain = Some(raw.trim_matches('"').to_string()),
            _ => {}
        }
    }
    plain.filter(|name| !name.is_empty())
}

/// Adds the configured credentials to a request.
pub fn authorize(cfg: &DxpConfig, req: HttpRequest, creds: &Credentials) -> Result<HttpRequest, StepError> {
    let auth = cfg.auth().ok_or_else(|| StepError::permanent("DXP: no single auth mode configured"))?;
    Ok(match &auth {
        DxpAuth::Basic { user, password_secret } => {
            let pair = format!("{user}:{}", creds.get(password_secret)?.expose());
            req.header("authorization", format!("Basic {}", STANDARD.encode(pair)))
        }
        DxpAuth::UserToken { secret } => {
            req.header("dxpcloud-authorization", format!("Bearer {}", creds.get(secret)?.expose()))
        }
        DxpAuth::MasterToken { secret } => {
            req.header("authorization", format!("Bearer {}", creds.get(secret)?.expose()))
        }
    })
}

/// The backup service's URL for `path`.
pub(crate) fn endpoint(cfg: &DxpConfig, path: &[&str]) -> String {
    url_with_path(&cfg.api_base, path)
}

/// Backup ids are three dash-separated parts (`dxpcloud-<random>-<YYYYMMDDHHmm>`); anything
/// else from a webhook body is refused.
fn valid_backup_id(id: &str) -> bool {
    (3..=200).contains(&id.len())
        && id.split('-').count() >= 3
        && id.split('-').all(|p| !p.is_empty())
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl DxpState {
    /// Decides without I/O once the backup is known (from the webhook or the listing).
    pub fn advance(&mut self, cfg: &DxpConfig, input: &StepInput<'_>) -> Result<Option<Progress>, StepError> {
        if self.backup_id.is_none() {
            match input.params.get("backup_id") {
                None | Some(Value::Null) => return Ok(None),
                Some(Value::String(id)) if valid_backup_id(id) => {
                    self.backup_id = Some(id.clone());
                    self.requested = true;
                }
                Some(other) => {
                    return Err(StepError::permanent(format!(
                    "the webhook's backup_id {other} is not a DXP Cloud backup id (like dxpcloud-abcdef-202611230300)"
                )))
                }
            }
        }
        Ok(self.decide(cfg, input))
    }

    /// Skip a backup already copied; copy it once the database archive's name is known; `None`
    /// while a request is still needed (the listing, or the `HEAD` that names the archive).
    fn decide(&self, cfg: &DxpConfig, input: &StepInput<'_>) -> Option<Progress> {
        let id = self.backup_id.as_ref()?;
        if input.seen.contains(id) {
            return Some(Progress::Skip(format!("backup {id} was already copied for this source")));
        }
        let database = self.database_file.as_deref()?;
        Some(Progress::Ready(vec![
            Download::url(endpoint(cfg, &["backup", "download", "database", id]), database, "application/gzip", true),
            Download::url(endpoint(cfg, &["backup", "download", "volume", id]), "volume.tgz", "application/gzip", true),
        ]))
    }

    /// `GET /backup/list`, then a `HEAD` of the chosen backup's database download, whose
    /// `Content-Disposition` names the archive as the service serves it.
    pub fn next_request(&self, cfg: &DxpConfig, creds: &Credentials) -> Result<HttpRequest, StepError> {
        let req = match &self.backup_id {
            None => HttpRequest::get(endpoint(cfg, &["backup", "list"])).header("accept", "application/json"),
            Some(id) => HttpRequest::head(endpoint(cfg, &["backup", "download", "database", id])),
        };
        authorize(cfg, req, creds)
    }

    /// Picks the newest backup from the listing, or reads the database archive's name.
    pub fn on_response(
        &mut self,
        cfg: &DxpConfig,
        resp: &HttpResponse,
        input: &StepInput<'_>,
    ) -> Result<Progress, StepError> {
        if let Some(id) = self.backup_id.clone() {
            return self.on_probe(cfg, &id, resp, input);
        }
        match resp.status {
            200..=299 => {}
            401 | 403 => return Err(credentials_refused(cfg.auth(), resp)),
            404 | 410 => {
                return Err(StepError::permanent(format!(
                    "the DXP backup service has no backup list (HTTP {}): {} (from backup service 5.9.0 the REST API may be unavailable; name the backup in the webhook body as {{\"backup_id\": \"…\"}})",
                    resp.status,
                    message_of(resp)
                )))
            }
            _ => return Err(status_error(resp, input.now, format!("the DXP backup service answered HTTP {}: {}", resp.status, message_of(resp)))),
        }
        let body: Value = serde_json::from_slice(&resp.body).map_err(|_| {
            StepError::permanent(format!(
                "the DXP backup list is malformed (HTTP {}): {}",
                resp.status,
                resp.snippet(200)
            ))
        })?;
        let items =
            list_items(&body).ok_or_else(|| StepError::permanent("the DXP backup list has no \"backups\" array"))?;
        self.listed = Some(items.len());
        let Some((id, created)) = newest(items) else {
            if items.is_empty() {
                return Ok(Progress::Skip("the DXP backup service lists no backup".into()));
            }
            let mut seen: Vec<String> = items.iter().map(status_of).collect();
            seen.sort();
            seen.dedup();
            return Ok(Progress::Failed(format!(
                "none of the {} backups the DXP service lists has completed (statuses: {}; accepted: {})",
                items.len(),
                seen.join(", "),
                COMPLETED.join(", ")
            )));
        };
        self.backup_id = Some(id);
        self.created_at = created;
        Ok(self.decide(cfg, input).unwrap_or(Progress::Pending { poll_after: Some(Duration::ZERO) }))
    }

    /// The `HEAD` of the database download: its name as served; a service that offers no `HEAD`
    /// (405, 501) leaves the documented `database.gz`.
    fn on_probe(
        &mut self,
        cfg: &DxpConfig,
        id: &str,
        resp: &HttpResponse,
        input: &StepInput<'_>,
    ) -> Result<Progress, StepError> {
        self.database_file = Some(match resp.status {
            200..=299 => database_file_name(&resp.headers),
            405 | 501 => DEFAULT_DATABASE_FILE.to_string(),
            401 | 403 => return Err(credentials_refused(cfg.auth(), resp)),
            404 | 410 => {
                return Err(StepError::permanent(format!(
                    "the DXP backup service has no database download for backup {id} (HTTP {}): {} (from backup \
                     service 5.9.0 the REST API may be unavailable: lcp backup download is the supported path)",
                    resp.status,
                    message_of(resp)
                )))
            }
            _ => {
                return Err(status_error(
                    resp,
                    input.now,
                    format!("the DXP backup service answered HTTP {}: {}", resp.status, message_of(resp)),
                ))
            }
        });
        Ok(self.decide(cfg, input).unwrap_or(Progress::Pending { poll_after: None }))
    }

    /// What the manifest records.
    pub fn references(&self, cfg: &DxpConfig) -> Value {
        json!({
            "api_base": cfg.api_base.as_str(),
            "backup_id": self.backup_id,
            "requested": self.requested,
            "created_at": self.created_at,
            "database_file": self.database_file,
        })
    }
}

/// The items of a `GET /backup/list` answer, whichever plausible shape it has
/// (`{"backups": [...]}` or a bare array).
pub(crate) fn list_items(body: &Value) -> Option<&Vec<Value>> {
    body.get("backups").and_then(Value::as_array).or_else(|| body.as_array())
}

/// A listed backup's id, under `backupId`, `id` or `backup_id`.
pub(crate) fn item_id(item: &Value) -> Option<&str> {
    ["backupId", "id", "backup_id"].iter().find_map(|k| item.get(*k).and_then(Value::as_str))
}

/// Backup statuses that say a backup completed; any other value (running, pending, started,
/// in progress, failed, …) is passed over, so nothing half-written is ever downloaded. A listing
/// item without a `status` field (older listing shapes have none) counts as completed.
pub const COMPLETED: [&str; 6] = ["success", "succeeded", "successful", "completed", "complete", "done"];

fn status_of(item: &Value) -> String {
    match item.get("status") {
        None | Some(Value::Null) => "(none)".into(),
        Some(Value::String(s)) => s.trim().to_ascii_lowercase(),
        Some(other) => other.to_string(),
    }
}

fn completed(item: &Value) -> bool {
    let status = status_of(item);
    status == "(none)" || COMPLETED.contains(&status.as_str())
}

/// The newest completed backup of a listing: `(id, createdAt)`.
fn newest(items: &[Value]) -> Option<(String, Option<String>)> {
    let candidates: Vec<(String, Option<String>)> = items
        .iter()
        .filter(|item| completed(item))
        .filter_map(|item| {
            let id = item_id(item)?;
            let created =
                ["createdAt", "created_at", "createdDate"].iter().find_map(|k| item.get(*k).and_then(Value::as_str));
            Some((id.to_string(), created.map(str::to_string)))
        })
        .collect();
    if candidates.iter().all(|(_, c)| c.as_deref().and_then(crate::time::Timestamp::parse_rfc3339).is_some()) {
        return candidates
            .into_iter()
            .max_by_key(|(_, c)| c.as_deref().and_then(crate::time::Timestamp::parse_rfc3339));
    }
    let stamp = |id: &str| {
        let last = id.rsplit('-').next().unwrap_or("");
        (last.len() == 12 && last.bytes().all(|b| b.is_ascii_digit())).then(|| last.to_string())
    };
    if candidates.iter().all(|(id, _)| stamp(id).is_some()) {
        return candidates.into_iter().max_by_key(|(id, _)| stamp(id));
    }
    candidates.into_iter().last()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::secret::Secret;
    use crate::time::Timestamp;

    fn source(auth: Value) -> crate::config::SourceConfig {
        let mut v =
            json!({"name": "portal", "kind": "dxp", "schedule": "0 4 * * *", "api_base": "http://127.0.0.1:9/"});
        for (k, x) in auth.as_object().unwrap() {
            v[k] = x.clone();
        }
        Config::from_value(&json!([v])).unwrap().sources.remove(0)
    }

    fn cfg_of(s: &crate::config::SourceConfig) -> &DxpConfig {
        match &s.provider {
            crate::providers::ProviderConfig::Dxp(c) => c,
            _ => panic!(),
        }
    }

    fn creds() -> Credentials {
        let mut c = Credentials::new();
        c.insert("PW", Secret::new("pa:ss"));
        c.insert("TOKEN", Secret::new("tok"));
        c
    }

    fn input<'a>(
        s: &'a crate::config::SourceConfig,
        c: &'a Credentials,
        params: &'a Value,
        seen: &'a [String],
    ) -> StepInput<'a> {
        StepInput { provider: &s.provider, creds: c, now: Timestamp::from_secs(0), params, seen }
    }

    #[test]
    fn each_auth_mode_sets_its_header() {
        let c = creds();
        let basic = source(json!({"user": "ops@acme.com", "password_secret": "PW"}));
        let req = DxpState::default().next_request(cfg_of(&basic), &c).unwrap();
        assert_eq!(req.url, "http://127.0.0.1:9/backup/list");
        assert_eq!(
            req.header_value("authorization"),
            Some(format!("Basic {}", STANDARD.encode("ops@acme.com:pa:ss")).as_str())
        );
        let user = source(json!({"user_token_secret": "TOKEN"}));
        let req = DxpState::default().next_request(cfg_of(&user), &c).unwrap();
        assert_eq!(req.header_value("dxpcloud-authorization"), Some("Bearer tok"));
        assert!(req.header_value("authorization").is_none());
        let master = source(json!({"master_token_secret": "TOKEN"}));
        let req = DxpState::default().next_request(cfg_of(&master), &c).unwrap();
        assert_eq!(req.header_value("authorization"), Some("Bearer tok"));
    }

    #[test]
    fn webhook_backup_id_needs_no_listing_and_gives_both_archives() {
        let s = source(json!({"user_token_secret": "TOKEN"}));
        let c = creds();
        let params = json!({"backup_id": "dxpcloud-lqgqnewltbexuewymq-201910031723"});
        let mut state = DxpState::default();
        let inp = input(&s, &c, &params, &[]);
        assert_eq!(state.advance(cfg_of(&s), &inp).unwrap(), None, "the archive's name is asked for first");
        let head = state.next_request(cfg_of(&s), &c).unwrap();
        assert_eq!(head.method, crate::http::Method::Head);
        assert_eq!(head.url, "http://127.0.0.1:9/backup/download/database/dxpcloud-lqgqnewltbexuewymq-201910031723");
        assert_eq!(head.header_value("dxpcloud-authorization"), Some("Bearer tok"));
        let Progress::Ready(files) = state.on_response(cfg_of(&s), &served("database.gz"), &inp).unwrap() else {
            panic!()
        };
        let names: Vec<&str> = files.iter().map(|f| f.filename.as_str()).collect();
        assert_eq!(names, ["database.gz", "volume.tgz"]);
        assert!(matches!(&files[1].origin, crate::providers::Origin::Url { secret_url, authenticated: true }
            if secret_url == "http://127.0.0.1:9/backup/download/volume/dxpcloud-lqgqnewltbexuewymq-201910031723"));
        assert!(state.requested);
        assert_eq!(state.references(cfg_of(&s))["backup_id"], "dxpcloud-lqgqnewltbexuewymq-201910031723");
    }

    fn served(name: &str) -> HttpResponse {
        HttpResponse {
            status: 200,
            headers: vec![("content-disposition".into(), format!("attachment; filename=\"{name}\""))],
            body: Vec::new(),
        }
    }

    #[test]
    fn the_database_archive_is_stored_under_the_name_the_service_serves() {
        let s = source(json!({"user_token_secret": "TOKEN"}));
        let c = creds();
        let none = json!({});
        let inp = input(&s, &c, &none, &[]);
        let list = HttpResponse::json(200, &json!({"backups": [{"backupId": "dxpcloud-b-202611230300"}]}));
        let mut state = DxpState::default();
        let p = state.on_response(cfg_of(&s), &list, &inp).unwrap();
        assert_eq!(p, Progress::Pending { poll_after: Some(Duration::ZERO) });
        assert_eq!(state.next_request(cfg_of(&s), &c).unwrap().method, crate::http::Method::Head);
        // A backup service before 4.2 serves database.tgz.
        let Progress::Ready(files) = state.on_response(cfg_of(&s), &served("database.tgz"), &inp).unwrap() else {
            panic!()
        };
        assert_eq!(files[0].filename, "database.tgz");
        assert_eq!(state.references(cfg_of(&s))["database_file"], "database.tgz");
        let name = |value: &str| database_file_name(&[("content-disposition".into(), value.into())]);
        assert_eq!(name("attachment; filename=database.gz"), "database.gz");
        assert_eq!(name("attachment; filename*=UTF-8''database.tgz"), "database.tgz");
        assert_eq!(name("attachment; filename=\"../../lportal.tar.gz\""), "database.tgz");
        assert_eq!(name("attachment; filename=\"dump.sql\""), "database.gz");
        assert_eq!(name("inline"), "database.gz");
        assert_eq!(database_file_name(&[]), "database.gz");
        // A service that offers no HEAD keeps the documented name.
        let mut state = DxpState { backup_id: Some("dxpcloud-b-202611230300".into()), ..DxpState::default() };
        let no_head = HttpResponse { status: 405, headers: vec![], body: Vec::new() };
        let Progress::Ready(files) = state.on_response(cfg_of(&s), &no_head, &inp).unwrap() else { panic!() };
        assert_eq!(files[0].filename, "database.gz");
    }

    #[test]
    fn an_expired_user_token_fails_naming_the_secret_to_renew() {
        let c = creds();
        let none = json!({});
        let expired = HttpResponse::json(401, &json!({"message": "Token expired"}));
        let s = source(json!({"user_token_secret": "TOKEN"}));
        let inp = input(&s, &c, &none, &[]);
        for mut state in
            [DxpState::default(), DxpState { backup_id: Some("dxpcloud-b-1".into()), ..DxpState::default() }]
        {
            let e = state.on_response(cfg_of(&s), &expired, &inp).unwrap_err();
            let m = e.message();
            assert!(!e.is_retryable());
            assert!(m.contains("user token in the Worker secret TOKEN has expired (HTTP 401: Token expired)"), "{m}");
            assert!(m.contains("wrangler secret put TOKEN") && m.contains("password_secret"), "{m}");
        }
        let refused = HttpResponse::json(401, &json!({"message": "Unauthorized"}));
        let m = DxpState::default().on_response(cfg_of(&s), &refused, &inp).unwrap_err().message().to_string();
        assert!(m.contains("TOKEN was refused (it may have expired"), "{m}");
        let basic = source(json!({"user": "ops@acme.com", "password_secret": "PW"}));
        let m = DxpState::default()
            .on_response(cfg_of(&basic), &refused, &input(&basic, &c, &none, &[]))
            .unwrap_err()
            .message()
            .to_string();
        assert!(m.contains("refused ops@acme.com with the password in the Worker secret PW (HTTP 401)"), "{m}");
    }

    #[test]
    fn a_bad_backup_id_in_the_webhook_is_refused() {
        let s = source(json!({"user_token_secret": "TOKEN"}));
        let c = creds();
        for bad in [json!({"backup_id": "../../etc"}), json!({"backup_id": 7}), json!({"backup_id": "justone"})] {
            let e = DxpState::default().advance(cfg_of(&s), &input(&s, &c, &bad, &[])).unwrap_err();
            assert!(!e.is_retryable(), "{bad}");
        }
    }

    #[test]
    fn an_already_copied_backup_is_skipped() {
        let s = source(json!({"user_token_secret": "TOKEN"}));
        let c = creds();
        let params = json!({"backup_id": "dxpcloud-abc-202611230300"});
        let seen = vec!["dxpcloud-abc-202611230300".to_string()];
        let p = DxpState::default().advance(cfg_of(&s), &input(&s, &c, &params, &seen)).unwrap();
        assert_eq!(
            p,
            Some(Progress::Skip("backup dxpcloud-abc-202611230300 was already copied for this source".into()))
        );
    }

    #[test]
    fn the_newest_listed_backup_is_chosen_whatever_the_shape() {
        let s = source(json!({"user_token_secret": "TOKEN"}));
        let c = creds();
        let none = json!({});
        let cases = [
            json!({"backups": [{"backupId": "dxpcloud-a-202611210300"}, {"backupId": "dxpcloud-b-202611230300"}]}),
            json!([{"backupId": "dxpcloud-b-202611230300"}, {"backupId": "dxpcloud-a-202611210300"}]),
            json!({"backups": [{"id": "dxpcloud-b-202611230300", "createdAt": "2026-11-23T03:00:00Z"}, {"id": "dxpcloud-a-202611210300", "createdAt": "2026-11-21T03:00:00Z"}]}),
            json!({"backups": [{"backupId": "dxpcloud-a-202611210300"}, {"backupId": "dxpcloud-b-202611230300"}, {"backupId": "dxpcloud-c-202611240300", "status": "failed"}]}),
        ];
        for list in cases {
            let mut state = DxpState::default();
            let p = state.on_response(cfg_of(&s), &HttpResponse::json(200, &list), &input(&s, &c, &none, &[])).unwrap();
            assert!(matches!(p, Progress::Pending { .. }), "{list}");
            assert_eq!(state.backup_id.as_deref(), Some("dxpcloud-b-202611230300"), "{list}");
            assert!(!state.requested);
        }
        let mut state = DxpState::default();
        let p = state
            .on_response(cfg_of(&s), &HttpResponse::json(200, &json!({"backups": []})), &input(&s, &c, &none, &[]))
            .unwrap();
        assert!(matches!(p, Progress::Skip(_)));
    }

    #[test]
    fn only_completed_backups_are_taken_and_none_completed_fails_clearly() {
        let s = source(json!({"user_token_secret": "TOKEN"}));
        let c = creds();
        let none = json!({});
        let list = json!({"backups": [
            {"backupId": "dxpcloud-a-202611210300", "status": "SUCCESS"},
            {"backupId": "dxpcloud-b-202611230300", "status": "running"},
            {"backupId": "dxpcloud-c-202611240300", "status": "pending"},
            {"backupId": "dxpcloud-d-202611250300", "status": "started"},
        ]});
        let mut state = DxpState::default();
        state.on_response(cfg_of(&s), &HttpResponse::json(200, &list), &input(&s, &c, &none, &[])).unwrap();
        assert_eq!(
            state.backup_id.as_deref(),
            Some("dxpcloud-a-202611210300"),
            "running/pending/started are passed over"
        );
        let unfinished = json!({"backups": [{"backupId": "dxpcloud-b-202611230300", "status": "in_progress"},
                                            {"backupId": "dxpcloud-c-202611240300", "status": "queued"}]});
        let p = DxpState::default()
            .on_response(cfg_of(&s), &HttpResponse::json(200, &unfinished), &input(&s, &c, &none, &[]))
            .unwrap();
        let Progress::Failed(message) = p else { panic!("expected a failure, got {p:?}") };
        assert!(message.contains("none of the 2 backups") && message.contains("in_progress, queued"), "{message}");
    }

    #[test]
    fn listing_errors_are_classified_with_the_services_message() {
        let s = source(json!({"user_token_secret": "TOKEN"}));
        let c = creds();
        let none = json!({});
        let inp = input(&s, &c, &none, &[]);
        let e = DxpState::default()
            .on_response(cfg_of(&s), &HttpResponse::json(401, &json!({"message": "Token expired"})), &inp)
            .unwrap_err();
        assert!(!e.is_retryable() && e.message().contains("Token expired"), "{}", e.message());
        let e = DxpState::default()
            .on_response(cfg_of(&s), &HttpResponse::json(404, &json!({"message": "use the lcp CLI"})), &inp)
            .unwrap_err();
        assert!(e.message().contains("5.9.0") && e.message().contains("use the lcp CLI"));
        assert!(DxpState::default()
            .on_response(cfg_of(&s), &HttpResponse::json(503, &json!({})), &inp)
            .unwrap_err()
            .is_retryable());
        let html = HttpResponse { status: 200, headers: vec![], body: b"<html>502</html>".to_vec() };
        let e = DxpState::default().on_response(cfg_of(&s), &html, &inp).unwrap_err();
        assert!(e.message().contains("malformed"));
    }
}
