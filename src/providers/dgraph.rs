//! Dgraph Cloud: the `export` mutation on a backend's `/admin/slash`, then `exportStatus` polls.
//!
//! Quirks the code relies on (see `provider-apis.md` §2):
//! - GraphQL errors come back in `errors[]` with HTTP 200; they fail the job with their messages,
//!   except an expired or missing ACL access token, which is refreshed (`login` with
//!   `refreshToken`) or obtained again with the password, then the call is retried.
//! - The admin key goes in `X-Auth-Token`; with ACL the access JWT in `X-Dgraph-AccessToken`.
//!   ACL `login` is a *mutation* on `/admin` (not `/admin/slash`).
//! - `exportStatus.status` is `Queued`/`Running` → `Success`/`Failed`; an unknown value is treated
//!   as still running until the source's export timeout.
//! - The `export` answer comes in more than one documented form: as the selection asks
//!   (`export { response exportId taskId }`), as Dgraph Cloud's docs print it (`export` is the
//!   export id string, with `response` and `taskID` beside it), and the legacy synchronous
//!   `export { signedUrls }`. All are accepted; an answer without a task id fails the job rather
//!   than sending the mutation again (the export may be queued, and cannot be found without it).
//! - Files are gzip served as-is from signed URLs (48 h, no auth) and are stored byte for byte,
//!   named after the URL's last path segment (`g01.json.gz`, `g01.schema.gz`, …).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use url::Url;

use crate::error::StepError;
use crate::fields::{self, FieldError};
use crate::http::{status_error, HttpRequest, HttpResponse};
use crate::providers::{
    error_messages, url_file_name, url_with_path, Credentials, Download, Progress, ProviderSettings, ProviderState,
};
use crate::time::Timestamp;

/// How many ACL logins one job may make before giving up.
const MAX_LOGINS: u32 = 4;

const LOGIN: &str = "mutation login($userId: String, $password: String, $namespace: Int, $refreshToken: String) { login(userId: $userId, password: $password, namespace: $namespace, refreshToken: $refreshToken) { response { accessJWT refreshJWT } } }";
const EXPORT: &str = "mutation($format: String, $namespace: Int) { export(format: $format, namespace: $namespace) { response { code message } exportId taskId } }";
const CEREBRO_LOGIN: &str =
    "query Login($email: String!, $password: String!) { login(email: $email, password: $password) { token } }";
const DEPLOYMENTS: &str = "{ deployments { uid name zone url owner jwtToken deploymentMode deploymentType } }";
const STATUS: &str = "query($exportId: String!, $taskId: String!) { exportStatus(exportId: $exportId, taskId: $taskId) { kind lastUpdated signedUrls status } }";

/// A Dgraph source's settings: its fields of the source table. Either one backend (`endpoint`
/// and `api_key_secret`) or, in account mode, every backend of a Dgraph Cloud account
/// (`cerebro_email` and `cerebro_password_secret`); with ACL also a Guardian's login (`user_id`
/// and `password_secret`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DgraphConfig {
    /// The shared base-URL override: when set it is the backend (moved to `endpoint` by
    /// [`ProviderSettings::check`]).
    #[serde(default, deserialize_with = "fields::opt_http_url", skip_serializing_if = "Option::is_none")]
    pub api_base: Option<Url>,
    /// The backend's base URL (`https://<deployment>.cloud.dgraph.io`); `None` in account mode.
    #[serde(default, deserialize_with = "fields::opt_http_url")]
    pub endpoint: Option<Url>,
    /// Name of the Worker secret holding an admin API key; `None` in account mode.
    #[serde(default, deserialize_with = "fields::opt_secret_name")]
    pub api_key_secret: Option<String>,
    /// Account mode: the account's email.
    #[serde(default, deserialize_with = "fields::opt_text")]
    pub cerebro_email: Option<String>,
    /// Account mode: name of the Worker secret holding the account's password.
    #[serde(default, deserialize_with = "fields::opt_secret_name")]
    pub cerebro_password_secret: Option<String>,
    /// Account mode: the management API (default [`DgraphConfig::DEFAULT_CEREBRO_URL`], filled
    /// in by the check).
    #[serde(default, deserialize_with = "fields::opt_http_url")]
    pub cerebro_url: Option<Url>,
    /// Export format.
    #[serde(default)]
    pub format: DgraphFormat,
    /// Namespace to export (`-1`: all, needs a Galaxy guardian); `None`: the user's own.
    #[serde(default)]
    pub namespace: Option<i64>,
    /// ACL login: the Guardian's `userId`.
    #[serde(default, deserialize_with = "fields::opt_text")]
    pub user_id: Option<String>,
    /// ACL login: name of the Worker secret holding the password.
    #[serde(default, deserialize_with = "fields::opt_secret_name")]
    pub password_secret: Option<String>,
    /// ACL login: the namespace to log in to (0: Galaxy).
    #[serde(default)]
    pub login_namespace: i64,
    /// How long a restore may wait for `restoreStatus` to say `OK`, counted from the `restore`
    /// mutation's answer (`restore_timeout_minutes`, 1–10,080; default
    /// [`DgraphConfig::DEFAULT_RESTORE_TIMEOUT`]). Dgraph documents no status but `OK`.
    #[serde(
        default,
        rename = "restore_timeout_minutes",
        skip_serializing_if = "Option::is_none",
        serialize_with = "fields::ser_opt_minutes",
        deserialize_with = "fields::opt_minutes::<_, 1, 10_080>"
    )]
    pub restore_timeout: Option<Duration>,
}

impl DgraphConfig {
    /// The public Cerebro endpoint.
    pub const DEFAULT_CEREBRO_URL: &'static str = "https://cerebro.cloud.dgraph.io/graphql";

    /// A restore's deadline when the source sets no `restore_timeout_minutes`: 6 h.
    pub const DEFAULT_RESTORE_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

    /// How long a restore may wait for `OK`.
    pub fn restore_timeout(&self) -> Duration {
        self.restore_timeout.unwrap_or(Self::DEFAULT_RESTORE_TIMEOUT)
    }

    /// The Cerebro credentials, in account mode.
    pub fn account(&self) -> Option<DgraphAccount<'_>> {
        Some(DgraphAccount {
            cerebro_url: self.cerebro_url.as_ref()?,
            email: self.cerebro_email.as_deref()?,
            password_secret: self.cerebro_password_secret.as_deref()?,
        })
    }

    /// The Guardian's login, for backends with ACL.
    pub fn acl(&self) -> Option<DgraphAcl<'_>> {
        Some(DgraphAcl {
            user_id: self.user_id.as_deref()?,
            password_secret: self.password_secret.as_deref()?,
            login_namespace: self.login_namespace,
        })
    }
}

impl ProviderSettings for DgraphConfig {
    fn default_poll_interval(&self) -> Duration {
        Duration::from_secs(2)
    }

    fn check(&mut self) -> Result<(), FieldError> {
        if let Some(base) = self.api_base.take() {
            self.endpoint = Some(base);
        }
        match (&self.cerebro_email, &self.cerebro_password_secret) {
            (Some(_), Some(_)) => {
                if self.endpoint.is_some() || self.api_key_secret.is_some() {
                    return Err(FieldError::new(
                        "cerebro_email",
                        "account mode (cerebro_email) backs up every backend: leave out endpoint and api_key_secret",
                    ));
                }
                if self.cerebro_url.is_none() {
                    self.cerebro_url = Some(fields::constant_url(Self::DEFAULT_CEREBRO_URL, "cerebro_url")?);
                }
            }
            (Some(_), None) => {
                return Err(FieldError::new("cerebro_password_secret", "is required with cerebro_email (account mode)"))
            }
            (None, Some(_)) => {
                return Err(FieldError::new("cerebro_email", "is required with cerebro_password_secret (account mode)"))
            }
            (None, None) => {
                if self.endpoint.is_none() {
                    return Err(FieldError::new(
                        "endpoint",
                        "is required (the backend URL), or give cerebro_email and cerebro_password_secret for account \
                         mode",
                    ));
                }
                if self.api_key_secret.is_none() {
                    return Err(FieldError::new(
                        "api_key_secret",
                        "is required (the name of the secret holding an admin API key)",
                    ));
                }
            }
        }
        if self.namespace.is_some_and(|n| n < -1) {
            return Err(FieldError::new("namespace", "must be a namespace id, or -1 for every namespace"));
        }
        if self.login_namespace < 0 {
            return Err(FieldError::new("login_namespace", "must be a namespace id"));
        }
        match (&self.user_id, &self.password_secret) {
            (Some(_), None) => Err(FieldError::new("password_secret", "is required with user_id (ACL login)")),
            (None, Some(_)) => Err(FieldError::new("user_id", "is required with password_secret (ACL login)")),
            _ => Ok(()),
        }
    }

    fn secret_names(&self) -> Vec<&str> {
        [&self.api_key_secret, &self.cerebro_password_secret, &self.password_secret]
            .into_iter()
            .filter_map(|name| name.as_deref())
            .collect()
    }

    fn whole_account(&self) -> bool {
        self.account().is_some()
    }
}

/// Cerebro credentials for account mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DgraphAccount<'a> {
    /// The management API (`https://cerebro.cloud.dgraph.io/graphql`).
    pub cerebro_url: &'a Url,
    /// The account's email.
    pub email: &'a str,
    /// Name of the Worker secret holding the account's password.
    pub password_secret: &'a str,
}

/// One backend of an account, as Cerebro lists it; a child job exports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Backend {
    /// Deployment uid.
    pub uid: String,
    /// Deployment name.
    pub name: String,
    /// Base URL (Cerebro gives a bare host; `https://` is added).
    pub url: String,
    /// The deployment's `jwtToken`, its admin key (never shown).
    pub secret_jwt: String,
}

/// A Guardian's credentials for ACL login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DgraphAcl<'a> {
    /// `userId`.
    pub user_id: &'a str,
    /// Name of the Worker secret holding the password.
    pub password_secret: &'a str,
    /// Namespace to log in to (0: Galaxy).
    pub login_namespace: i64,
}

/// Export format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DgraphFormat {
    /// JSON (the default).
    #[default]
    Json,
    /// RDF N-Quads.
    Rdf,
}

impl DgraphFormat {
    fn as_str(self) -> &'static str {
        match self {
            Self::Json => "json",
            Self::Rdf => "rdf",
        }
    }
}

/// Progress of one Dgraph export, persisted with the job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DgraphState {
    /// In account mode: the backend this (child) job exports.
    #[serde(default)]
    pub backend: Option<Backend>,
    /// In account mode: the Cerebro session token (never shown).
    #[serde(default)]
    pub secret_cerebro_token: Option<String>,
    /// ACL access token (never shown).
    pub secret_access_jwt: Option<String>,
    /// ACL refresh token (never shown).
    pub secret_refresh_jwt: Option<String>,
    /// ACL logins made.
    pub logins: u32,
    /// The export's id.
    pub export_id: Option<String>,
    /// The export task's id.
    pub task_id: Option<String>,
    /// The last reported status.
    pub status: Option<String>,
    /// Status polls answered.
    pub polls: u32,
    /// Names of the exported files.
    pub files: Vec<String>,
}

/// Which call the state asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    CerebroLogin,
    Deployments,
    Login,
    Export,
    Status,
}

fn admin_url(endpoint: &Url, slash: bool) -> String {
    url_with_path(endpoint, if slash { &["admin", "slash"] } else { &["admin"] })
}

impl DgraphState {
    /// The backend's URL: this child's backend, or the configured endpoint.
    pub(crate) fn endpoint(&self, cfg: &DgraphConfig) -> Result<Url, StepError> {
        match (&self.backend, &cfg.endpoint) {
            (Some(b), _) => Url::parse(&b.url)
                .map_err(|e| StepError::permanent(format!("backend {} has a bad url {:?}: {e}", b.name, b.url))),
            (None, Some(url)) => Ok(url.clone()),
            (None, None) => Err(StepError::permanent("no Dgraph endpoint configured")),
        }
    }

    /// The admin key: this child's `jwtToken`, or the configured secret.
    pub(crate) fn admin_key(&self, cfg: &DgraphConfig, creds: &Credentials) -> Result<String, StepError> {
        match (&self.backend, &cfg.api_key_secret) {
            (Some(b), _) => Ok(b.secret_jwt.clone()),
            (None, Some(name)) => Ok(creds.get(name)?.expose().to_string()),
            (None, None) => Err(StepError::permanent("no Dgraph admin key configured")),
        }
    }

    /// The `export` mutation got no answer: Dgraph Cloud offers no call to find an export without
    /// the task id that answer carries, so say that a retry may start a second export.
    pub fn create_unanswered(&self, cfg: &DgraphConfig) -> Option<String> {
        (self.stage(cfg) == Stage::Export).then(|| {
            "the export mutation got no answer; Dgraph Cloud can only be asked about an export by the task id \
             that answer carries, so the retry may have started a second export"
                .to_string()
        })
    }

    /// Still signing in (Cerebro login and the deployments list in account mode, then the ACL
    /// login): [`Self::next_request`] asks for that and [`Self::on_response`] folds it in.
    pub(crate) fn signing_in(&self, cfg: &DgraphConfig) -> bool {
        matches!(self.stage(cfg), Stage::CerebroLogin | Stage::Deployments | Stage::Login)
    }

    /// A GraphQL call to the backend's `/admin/slash`, with the admin key and (ACL) the access
    /// token.
    pub(crate) fn slash_call(
        &self,
        cfg: &DgraphConfig,
        creds: &Credentials,
        query: &str,
        variables: Value,
    ) -> Result<HttpRequest, StepError> {
        let url = admin_url(&self.endpoint(cfg)?, true);
        self.keyed(cfg, creds, url, &json!({ "query": query, "variables": variables }))
    }

    fn keyed(
        &self,
        cfg: &DgraphConfig,
        creds: &Credentials,
        url: String,
        body: &Value,
    ) -> Result<HttpRequest, StepError> {
        let mut req = HttpRequest::post_json(url, body).header("x-auth-token", self.admin_key(cfg, creds)?);
        if let Some(jwt) = &self.secret_access_jwt {
            req = req.header("x-dgraph-accesstoken", jwt.clone());
        }
        Ok(req)
    }

    fn stage(&self, cfg: &DgraphConfig) -> Stage {
        if cfg.account().is_some() && self.backend.is_none() {
            if self.secret_cerebro_token.is_none() {
                Stage::CerebroLogin
            } else {
                Stage::Deployments
            }
        } else if cfg.acl().is_some() && self.secret_access_jwt.is_none() {
            Stage::Login
        } else if self.task_id.is_none() {
            Stage::Export
        } else {
            Stage::Status
        }
    }

    /// The next GraphQL call.
    pub fn next_request(&self, cfg: &DgraphConfig, creds: &Credentials) -> Result<HttpRequest, StepError> {
        let stage = self.stage(cfg);
        if let (Some(account), Stage::CerebroLogin | Stage::Deployments) = (cfg.account(), stage) {
            return Ok(match stage {
                Stage::CerebroLogin => HttpRequest::post_json(
                    account.cerebro_url.as_str(),
                    &json!({ "query": CEREBRO_LOGIN, "variables": {
                        "email": account.email, "password": creds.get(account.password_secret)?.expose() } }),
                ),
                _ => HttpRequest::post_json(account.cerebro_url.as_str(), &json!({ "query": DEPLOYMENTS })).header(
                    "authorization",
                    format!("Bearer {}", self.secret_cerebro_token.clone().unwrap_or_default()),
                ),
            });
        }
        let endpoint = self.endpoint(cfg)?;
        let (url, body) = match stage {
            Stage::CerebroLogin | Stage::Deployments => {
                return Err(StepError::permanent("no Dgraph account configured"))
            }
            Stage::Login => {
                let Some(acl) = cfg.acl() else { return Err(StepError::permanent("no ACL configured")) };
                let variables = match &self.secret_refresh_jwt {
                    Some(refresh) => json!({ "refreshToken": refresh }),
                    None => json!({
                        "userId": acl.user_id,
                        "password": creds.get(acl.password_secret)?.expose(),
                        "namespace": acl.login_namespace,
                    }),
                };
                (admin_url(&endpoint, false), json!({ "query": LOGIN, "variables": variables }))
            }
            Stage::Export => {
                let mut variables = json!({ "format": cfg.format.as_str() });
                if let Some(ns) = cfg.namespace {
                    variables["namespace"] = json!(ns);
                }
                (admin_url(&endpoint, true), json!({ "query": EXPORT, "variables": variables }))
            }
            Stage::Status => (
                admin_url(&endpoint, true),
                json!({ "query": STATUS, "variables": { "exportId": self.export_id.clone().unwrap_or_default(), "taskId": self.task_id } }),
            ),
        };
        self.keyed(cfg, creds, url, &body)
    }

    /// Folds one answer in.
    pub fn on_response(
        &mut self,
        cfg: &DgraphConfig,
        resp: &HttpResponse,
        now: Timestamp,
    ) -> Result<Progress, StepError> {
        let stage = self.stage(cfg);
        if stage == Stage::Export {
            if let Some(failed) = unrecognised_export_answer(resp) {
                return Ok(failed);
            }
        }
        let body = graphql_body(resp, now)?;
        if matches!(stage, Stage::CerebroLogin | Stage::Deployments) {
            return self.on_cerebro(stage, &body);
        }
        if let Some(errors) = error_messages(&body) {
            return self.on_errors(cfg, stage, errors);
        }
        let data = body.get("data").filter(|d| d.is_object()).ok_or_else(|| malformed("no data"))?;
        match stage {
            Stage::CerebroLogin | Stage::Deployments => Err(malformed("unexpected Cerebro stage")),
            Stage::Login => {
                let response = data.pointer("/login/response").ok_or_else(|| malformed("login without response"))?;
                let access =
                    response.get("accessJWT").and_then(Value::as_str).ok_or_else(|| malformed("no accessJWT"))?;
                self.secret_access_jwt = Some(access.to_string());
                self.secret_refresh_jwt = response.get("refreshJWT").and_then(Value::as_str).map(str::to_string);
                self.logins += 1;
                Ok(Progress::Pending { poll_after: Some(Duration::ZERO) })
            }
            Stage::Export => Ok(self.on_export(data)),
            Stage::Status => {
                let status = data.get("exportStatus").ok_or_else(|| malformed("no exportStatus"))?;
                self.polls += 1;
                let value = status.get("status").and_then(Value::as_str).unwrap_or("Unknown").to_string();
                self.status = Some(value.clone());
                match value.as_str() {
                    "Success" => {
                        let urls = status.get("signedUrls").and_then(Value::as_array).cloned().unwrap_or_default();
                        self.ready(&urls)
                    }
                    "Failed" => Ok(Progress::Failed(format!(
                        "Dgraph export task {} failed",
                        self.task_id.as_deref().unwrap_or("?")
                    ))),
                    // Queued, Running, and any value Dgraph may add: keep polling until the
                    // source's export timeout.
                    _ => Ok(Progress::Pending { poll_after: None }),
                }
            }
        }
    }

    /// The `export` mutation's answer, in any documented form: the selection's
    /// `export { response exportId taskId }`; the form Dgraph Cloud's docs print, where `export` is
    /// the export id as a string with `response` and `taskID` beside it; or the legacy synchronous
    /// `export { signedUrls }`. Any other answer fails the job: the export may be queued at Dgraph
    /// all the same, and without its task id Ferry can neither follow it nor find it, so it never
    /// sends the mutation a second time.
    fn on_export(&mut self, data: &Value) -> Progress {
        let export = data.get("export");
        if let Some(urls) = export.and_then(|e| e.get("signedUrls")).and_then(Value::as_array) {
            // The legacy synchronous form: the files are ready at once.
            self.status = Some("Success".into());
            self.task_id = Some(String::new());
            return self.ready(urls).unwrap_or_else(|e| Progress::Failed(e.message().to_string()));
        }
        let (holder, export_id) = match export {
            Some(object @ Value::Object(_)) => (object, object.get("exportId")),
            Some(Value::String(_)) => (data, export),
            _ => (data, None),
        };
        let field = |name: &str| holder.get(name).or_else(|| data.get(name));
        let response = field("response");
        let code = response.and_then(|r| r.get("code")).and_then(Value::as_str);
        if let Some(code) = code.filter(|c| *c != "Success") {
            let message = response.and_then(|r| r.get("message")).and_then(Value::as_str).unwrap_or(code);
            return Progress::Failed(format!("Dgraph export was not queued: {message}"));
        }
        let task = ["taskId", "taskID"].iter().find_map(|k| field(k)).and_then(Value::as_str).filter(|t| !t.is_empty());
        let Some(task) = task else {
            let shown: String = data.to_string().chars().take(300).collect();
            return Progress::Failed(format!(
                "Dgraph answered the export mutation in a form Ferry does not recognise (no taskId): {shown}. The \
                 export may be queued at Dgraph all the same; Dgraph Cloud can only be asked about an export by its \
                 task id, so Ferry does not send the mutation again. Check the backend's exports before the next run"
            ));
        };
        self.task_id = Some(task.to_string());
        self.export_id = export_id.and_then(Value::as_str).map(str::to_string);
        self.status = Some("Queued".into());
        Progress::Pending { poll_after: None }
    }

    fn on_cerebro(&mut self, stage: Stage, body: &Value) -> Result<Progress, StepError> {
        let errors = error_messages(body);
        if stage == Stage::CerebroLogin {
            let token = body.pointer("/data/login/token").and_then(Value::as_str);
            return match token {
                Some(t) => {
                    self.secret_cerebro_token = Some(t.to_string());
                    Ok(Progress::Pending { poll_after: Some(Duration::ZERO) })
                }
                None => Ok(Progress::Failed(format!(
                    "Dgraph Cloud login failed: {}",
                    errors.unwrap_or_else(|| "wrong email or password".into())
                ))),
            };
        }
        if let Some(errors) = errors {
            if errors.to_ascii_lowercase().contains("unauthorized") && self.logins < MAX_LOGINS {
                // The Cerebro session expired: log in again.
                self.logins += 1;
                self.secret_cerebro_token = None;
                return Ok(Progress::Pending { poll_after: Some(Duration::ZERO) });
            }
            return Ok(Progress::Failed(format!("Dgraph Cloud deployments failed: {errors}")));
        }
        let list =
            body.pointer("/data/deployments").and_then(Value::as_array).ok_or_else(|| malformed("no deployments"))?;
        let children: Vec<ProviderState> = list
            .iter()
            .filter_map(|d| {
                let url = d.get("url").and_then(Value::as_str)?;
                let url = if url.contains("://") { url.to_string() } else { format!("https://{url}") };
                Some(ProviderState::Dgraph(DgraphState {
                    backend: Some(Backend {
                        uid: d.get("uid").and_then(Value::as_str).unwrap_or("").to_string(),
                        name: d.get("name").and_then(Value::as_str).unwrap_or("").to_string(),
                        url,
                        secret_jwt: d.get("jwtToken").and_then(Value::as_str)?.to_string(),
                    }),
                    ..DgraphState::default()
                }))
            })
            .collect();
        if children.is_empty() {
            return Ok(Progress::Skip("the Dgraph Cloud account has no backend to back up".into()));
        }
        Ok(Progress::Spawn(children))
    }

    /// GraphQL `errors` of an admin call that say the ACL access token expired or was refused:
    /// the token is dropped so that the next call logs in again (`true`), while logins are left.
    pub(crate) fn token_refused(&mut self, cfg: &DgraphConfig, errors: &str) -> bool {
        let lower = errors.to_ascii_lowercase();
        let token_problem = ["expired", "unauthenticated", "accessjwt", "access token", "invalid jwt", "refresh token"]
            .iter()
            .any(|p| lower.contains(p));
        if cfg.acl().is_some() && self.logins < MAX_LOGINS && token_problem {
            self.secret_access_jwt = None;
            return true;
        }
        false
    }

    fn on_errors(&mut self, cfg: &DgraphConfig, stage: Stage, errors: String) -> Result<Progress, StepError> {
        if cfg.acl().is_some() && self.logins < MAX_LOGINS && stage == Stage::Login && self.secret_refresh_jwt.is_some()
        {
            // The refresh token was refused: log in with the password instead.
            self.secret_refresh_jwt = None;
            return Ok(Progress::Pending { poll_after: Some(Duration::ZERO) });
        }
        if stage != Stage::Login && self.token_refused(cfg, &errors) {
            return Ok(Progress::Pending { poll_after: Some(Duration::ZERO) });
        }
        let what = match stage {
            Stage::CerebroLogin | Stage::Deployments => "Dgraph Cloud failed",
            Stage::Login => "Dgraph ACL login failed",
            Stage::Export => "Dgraph export failed",
            Stage::Status => "Dgraph export status failed",
        };
        Ok(Progress::Failed(format!("{what}: {errors}")))
    }

    fn ready(&mut self, urls: &[Value]) -> Result<Progress, StepError> {
        let urls: Vec<&str> = urls.iter().filter_map(Value::as_str).collect();
        if urls.is_empty() {
            return Ok(Progress::Failed("Dgraph reported a successful export without any file".into()));
        }
        let downloads: Vec<Download> = urls
            .iter()
            .enumerate()
            .map(|(i, url)| {
                let name = url_file_name(url);
                let name = if name.is_empty() { format!("file-{}.gz", i + 1) } else { name };
                Download::url(*url, name, "application/gzip", false)
            })
            .collect();
        self.files = downloads.iter().map(|d| d.filename.clone()).collect();
        Ok(Progress::Ready(downloads))
    }

    /// In account mode, the backend this child job exports, by name (by uid when Cerebro gave
    /// no name): the member whose own series its backup belongs to.
    pub fn member(&self) -> Option<String> {
        self.backend.as_ref().map(|b| if b.name.is_empty() { b.uid.clone() } else { b.name.clone() })
    }

    /// What the manifest records.
    pub fn references(&self, cfg: &DgraphConfig) -> Value {
        json!({
            "endpoint": self.endpoint(cfg).ok().map(|u| u.to_string()),
            "backend": self.backend.as_ref().map(|b| json!({ "uid": b.uid, "name": b.name })),
            "format": cfg.format,
            "namespace": cfg.namespace,
            "export_id": self.export_id,
            "task_id": self.task_id,
            "status": self.status,
            "files": self.files,
        })
    }
}

/// The member a manifest's references ([`DgraphState::references`]) name: the backend's name, or
/// its uid when it has none; `None` for a source of one backend.
pub fn member_of(references: &Value) -> Option<String> {
    let backend = references.get("backend")?;
    let name = backend.get("name").and_then(Value::as_str).filter(|n| !n.is_empty());
    name.or_else(|| backend.get("uid").and_then(Value::as_str).filter(|u| !u.is_empty())).map(str::to_string)
}

/// An HTTP answer to the `export` mutation that Ferry would otherwise retry, but that does not say
/// the request went unhandled: a 500, a gateway's 502 or 504 (RFC 9110 §15.6.3, §15.6.5: the
/// request was forwarded and may have been acted on), a 408. (A 503, RFC 9110 §15.6.4, and a 429,
/// RFC 6585 §4, say it was not handled, so asking again is safe; other 4xx are refusals and fail
/// the job as they always did.) The export may be queued all the same, and Dgraph Cloud offers no way to find it
/// without the task id such an answer lacks, so the job fails quoting the answer (bounded) instead
/// of sending the mutation a second time (RFC 9110 §9.2.2: a non-idempotent request is not retried
/// blindly). `None` for answers the ordinary path reads.
fn unrecognised_export_answer(resp: &HttpResponse) -> Option<Progress> {
    if !(resp.status == 408 || (500..600).contains(&resp.status)) || resp.status == 503 {
        return None;
    }
    let status = resp.status;
    let shown = resp.snippet(300);
    Some(Progress::Failed(format!(
        "Dgraph's export mutation was answered HTTP {status}, not by Dgraph: {shown}. The export may be queued at \
         Dgraph all the same; Dgraph Cloud can only be asked about an export by the task id this answer lacks, so \
         Ferry does not send the mutation again. Check the backend's exports before the next run"
    )))
}

fn malformed(what: &str) -> StepError {
    StepError::permanent(format!("Dgraph: received a malformed response ({what})"))
}

/// The JSON body of a GraphQL answer: refused credentials (401/403) fail, other HTTP errors are
/// classified by status, and a body that is not JSON is malformed. GraphQL `errors` come with
/// HTTP 200 and are left to the caller.
pub(crate) fn graphql_body(resp: &HttpResponse, now: Timestamp) -> Result<Value, StepError> {
    if resp.status == 401 || resp.status == 403 {
        return Err(StepError::permanent(format!(
            "Dgraph refused the credentials (HTTP {}): {}",
            resp.status,
            resp.snippet(200)
        )));
    }
    if !(200..300).contains(&resp.status) {
        return Err(status_error(resp, now, format!("Dgraph answered HTTP {}: {}", resp.status, resp.snippet(200))));
    }
    serde_json::from_slice(&resp.body).map_err(|_| {
        StepError::permanent(format!(
            "Dgraph: received a malformed response (HTTP {}): {}",
            resp.status,
            resp.snippet(200)
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn cfg(acl: bool) -> DgraphConfig {
        DgraphConfig {
            endpoint: Some(Url::parse("http://127.0.0.1:9/backends/blue").unwrap()),
            api_key_secret: Some("KEY".into()),
            namespace: Some(-1),
            user_id: acl.then(|| "groot".into()),
            password_secret: acl.then(|| "PW".into()),
            ..DgraphConfig::default()
        }
    }

    fn creds() -> Credentials {
        let mut c = Credentials::new();
        c.insert("KEY", Secret::new("admin-key"));
        c.insert("PW", Secret::new("password"));
        c
    }

    fn now() -> Timestamp {
        Timestamp::from_secs(0)
    }

    fn body(req: &HttpRequest) -> Value {
        serde_json::from_slice(req.body.as_deref().unwrap()).unwrap()
    }

    fn ok(data: Value) -> HttpResponse {
        HttpResponse::json(200, &json!({ "data": data }))
    }

    fn queued() -> HttpResponse {
        ok(
            json!({"export": {"response": {"code": "Success", "message": "Export queued with ID 0x9d2e"}, "exportId": "exports/2026-11-23/0x1-1", "taskId": "0x9d2e"}}),
        )
    }

    fn status(s: &str, urls: &[&str]) -> HttpResponse {
        ok(
            json!({"exportStatus": {"kind": "Export", "lastUpdated": "2026-11-23T00:00:00Z", "signedUrls": urls, "status": s}}),
        )
    }

    #[test]
    fn exports_then_polls_until_success_and_lists_every_file() {
        let (c, mut s) = (cfg(false), DgraphState::default());
        let req = s.next_request(&c, &creds()).unwrap();
        assert_eq!(req.url, "http://127.0.0.1:9/backends/blue/admin/slash");
        assert_eq!(req.header_value("x-auth-token"), Some("admin-key"));
        assert!(req.header_value("x-dgraph-accesstoken").is_none());
        assert_eq!(body(&req)["variables"], json!({"format": "json", "namespace": -1}));
        assert!(body(&req)["query"].as_str().unwrap().contains("export(format: $format, namespace: $namespace)"));
        assert_eq!(s.on_response(&c, &queued(), now()).unwrap(), Progress::Pending { poll_after: None });
        let poll = s.next_request(&c, &creds()).unwrap();
        assert_eq!(body(&poll)["variables"], json!({"exportId": "exports/2026-11-23/0x1-1", "taskId": "0x9d2e"}));
        assert_eq!(s.on_response(&c, &status("Queued", &[]), now()).unwrap(), Progress::Pending { poll_after: None });
        assert_eq!(s.on_response(&c, &status("Running", &[]), now()).unwrap(), Progress::Pending { poll_after: None });
        // Unknown values keep the job polling.
        assert_eq!(s.on_response(&c, &status("Paused", &[]), now()).unwrap(), Progress::Pending { poll_after: None });
        let urls = [
            "https://s3/x/dgraph.r9.u1123.0000/g01.json.gz?sig=1",
            "https://s3/x/dgraph.r9.u1123.0000/g01.schema.gz?sig=2",
            "https://s3/x/dgraph.r9.u1123.0000/g01.gql_schema.gz?sig=3",
        ];
        let Progress::Ready(files) = s.on_response(&c, &status("Success", &urls), now()).unwrap() else { panic!() };
        let names: Vec<&str> = files.iter().map(|d| d.filename.as_str()).collect();
        assert_eq!(names, ["g01.json.gz", "g01.schema.gz", "g01.gql_schema.gz"]);
        assert!(files.iter().all(|d| d.content_type == "application/gzip"));
        let refs = s.references(&c);
        assert_eq!(refs["task_id"], "0x9d2e");
        assert_eq!(refs["status"], "Success");
        assert_eq!(refs["files"][2], "g01.gql_schema.gz");
    }

    #[test]
    fn failed_status_and_graphql_errors_fail_with_their_messages() {
        let (c, mut s) = (cfg(false), DgraphState::default());
        s.on_response(&c, &queued(), now()).unwrap();
        assert_eq!(
            s.on_response(&c, &status("Failed", &[]), now()).unwrap(),
            Progress::Failed("Dgraph export task 0x9d2e failed".into())
        );
        let mut s = DgraphState::default();
        let err = HttpResponse::json(
            200,
            &json!({"errors": [{"message": "Only guardian of galaxy can export all namespaces"}], "data": null}),
        );
        assert_eq!(
            s.on_response(&c, &err, now()).unwrap(),
            Progress::Failed("Dgraph export failed: Only guardian of galaxy can export all namespaces".into())
        );
    }

    #[test]
    fn acl_logs_in_first_and_sends_the_access_token() {
        let (c, mut s) = (cfg(true), DgraphState::default());
        let login = s.next_request(&c, &creds()).unwrap();
        assert_eq!(login.url, "http://127.0.0.1:9/backends/blue/admin");
        assert_eq!(body(&login)["variables"], json!({"userId": "groot", "password": "password", "namespace": 0}));
        let answer = ok(json!({"login": {"response": {"accessJWT": "acc-1", "refreshJWT": "ref-1"}}}));
        assert_eq!(s.on_response(&c, &answer, now()).unwrap(), Progress::Pending { poll_after: Some(Duration::ZERO) });
        let export = s.next_request(&c, &creds()).unwrap();
        assert_eq!(export.header_value("x-dgraph-accesstoken"), Some("acc-1"));
        assert!(!format!("{export:?}").contains("acc-1"), "the access token is redacted from Debug");
    }

    #[test]
    fn expired_access_token_is_refreshed_then_the_password_is_used_if_refresh_fails() {
        let (c, mut s) = (cfg(true), DgraphState::default());
        s.on_response(&c, &ok(json!({"login": {"response": {"accessJWT": "acc-1", "refreshJWT": "ref-1"}}})), now())
            .unwrap();
        s.on_response(&c, &queued(), now()).unwrap();
        let expired = HttpResponse::json(200, &json!({"errors": [{"message": "Token is expired"}]}));
        assert_eq!(s.on_response(&c, &expired, now()).unwrap(), Progress::Pending { poll_after: Some(Duration::ZERO) });
        let refresh = s.next_request(&c, &creds()).unwrap();
        assert_eq!(body(&refresh)["variables"], json!({"refreshToken": "ref-1"}));
        let refused = HttpResponse::json(
            200,
            &json!({"data": {"login": null}, "errors": [{"message": "invalid refresh token"}]}),
        );
        assert_eq!(s.on_response(&c, &refused, now()).unwrap(), Progress::Pending { poll_after: Some(Duration::ZERO) });
        let relogin = s.next_request(&c, &creds()).unwrap();
        assert_eq!(body(&relogin)["variables"]["userId"], "groot");
        s.on_response(&c, &ok(json!({"login": {"response": {"accessJWT": "acc-2", "refreshJWT": "ref-2"}}})), now())
            .unwrap();
        let poll = s.next_request(&c, &creds()).unwrap();
        assert_eq!(poll.header_value("x-dgraph-accesstoken"), Some("acc-2"));
        assert!(body(&poll)["query"].as_str().unwrap().contains("exportStatus"), "resumes polling the same task");
        let shown = crate::providers::redact(serde_json::to_value(&s).unwrap()).to_string();
        assert!(!shown.contains("acc-2") && !shown.contains("ref-2"), "{shown}");
    }

    #[test]
    fn wrong_password_fails_the_job() {
        let (c, mut s) = (cfg(true), DgraphState::default());
        let refused = HttpResponse::json(
            200,
            &json!({"data": {"login": null}, "errors": [{"message": "invalid username or password"}]}),
        );
        assert_eq!(
            s.on_response(&c, &refused, now()).unwrap(),
            Progress::Failed("Dgraph ACL login failed: invalid username or password".into())
        );
    }

    #[test]
    fn legacy_synchronous_export_and_task_id_spelling_are_accepted() {
        let (c, mut s) = (cfg(false), DgraphState::default());
        let legacy = ok(json!({"export": {"signedUrls": ["https://s3/a/g01.rdf.gz"]}}));
        assert!(
            matches!(s.on_response(&c, &legacy, now()).unwrap(), Progress::Ready(f) if f[0].filename == "g01.rdf.gz")
        );
        let mut s = DgraphState::default();
        let doc = ok(json!({"export": {"response": {"code": "Success", "message": "queued"}, "taskID": "0x1"}}));
        s.on_response(&c, &doc, now()).unwrap();
        assert_eq!(s.task_id.as_deref(), Some("0x1"));
    }

    #[test]
    fn the_answer_printed_in_dgraph_clouds_docs_is_followed_by_its_task_and_export_id() {
        let (c, mut s) = (cfg(false), DgraphState::default());
        let docs = ok(json!({
            "export": "exports/2011-12-08/0x18986fd-558223708",
            "response": {"code": "Success", "message": "Export queued with ID 0x9d2e13e8a"},
            "taskID": "0x9d2e13e8a"
        }));
        assert_eq!(s.on_response(&c, &docs, now()).unwrap(), Progress::Pending { poll_after: None });
        assert_eq!(s.task_id.as_deref(), Some("0x9d2e13e8a"));
        assert_eq!(s.export_id.as_deref(), Some("exports/2011-12-08/0x18986fd-558223708"));
        let poll = s.next_request(&c, &creds()).unwrap();
        assert_eq!(
            body(&poll)["variables"],
            json!({"exportId": "exports/2011-12-08/0x18986fd-558223708", "taskId": "0x9d2e13e8a"})
        );
        let refused = ok(json!({"export": "", "response": {"code": "Failure", "message": "export already running"}}));
        assert_eq!(
            DgraphState::default().on_response(&c, &refused, now()).unwrap(),
            Progress::Failed("Dgraph export was not queued: export already running".into())
        );
    }

    #[test]
    fn an_export_answer_without_a_task_id_fails_the_job_and_never_sends_the_export_again() {
        let c = cfg(false);
        for answer in [
            json!({"export": {"response": {"code": "Success", "message": "Export queued"}}}),
            json!({"export": null}),
            json!({"export": "exports/2026-11-23/0x1-1"}),
            json!({"export": {"taskId": ""}}),
        ] {
            let mut s = DgraphState::default();
            let progress = s.on_response(&c, &ok(answer.clone()), now()).unwrap();
            let Progress::Failed(message) = progress else { panic!("{answer}: {progress:?}") };
            assert!(
                message.contains("does not recognise") && message.contains("not send the mutation again"),
                "{message}"
            );
            assert!(s.task_id.is_none());
        }
    }

    #[test]
    fn an_export_mutation_answered_by_a_gateway_error_fails_quoting_it_and_is_never_sent_again() {
        let c = cfg(false);
        let page = b"<html><head><title>504 Gateway Time-out</title></head></html>".to_vec();
        for status in [500, 502, 504, 408] {
            let mut s = DgraphState::default();
            let answer = HttpResponse { status, headers: vec![], body: page.clone() };
            let progress = s.on_response(&c, &answer, now()).unwrap_or_else(|e| panic!("{status}: {e:?}"));
            let Progress::Failed(message) = progress else { panic!("{status}: {progress:?}") };
            assert!(
                message.contains(&format!("HTTP {status}")) && message.contains("504 Gateway Time-out"),
                "{message}"
            );
            assert!(message.contains("not send the mutation again"), "{message}");
            assert!(s.task_id.is_none());
        }
        // The quote is bounded however long the page.
        let long = HttpResponse { status: 502, headers: vec![], body: vec![b'x'; 100_000] };
        let Ok(Progress::Failed(message)) = DgraphState::default().on_response(&c, &long, now()) else { panic!() };
        assert!(message.len() < 1_000, "{}", message.len());
        // 429 and 503 say the request was not handled (RFC 6585 §4, RFC 9110 §15.6.4): retried.
        for status in [429, 503] {
            let e = DgraphState::default().on_response(&c, &HttpResponse::json(status, &json!({})), now()).unwrap_err();
            assert!(e.is_retryable(), "{status}");
        }
        // Once the export is queued, a status poll's gateway error is retried as before.
        let mut polling = DgraphState::default();
        polling.on_response(&c, &queued(), now()).unwrap();
        let e = polling.on_response(&c, &HttpResponse { status: 504, headers: vec![], body: page }, now()).unwrap_err();
        assert!(e.is_retryable());
    }

    #[test]
    fn account_mode_logs_in_lists_deployments_and_spawns_one_job_per_backend() {
        let mut c = cfg(false);
        c.endpoint = None;
        c.api_key_secret = None;
        c.cerebro_url = Some(Url::parse("http://127.0.0.1:9/cerebro/graphql").unwrap());
        c.cerebro_email = Some("ops@acme.com".into());
        c.cerebro_password_secret = Some("PW".into());
        let mut s = DgraphState::default();
        let login = s.next_request(&c, &creds()).unwrap();
        assert_eq!(login.url, "http://127.0.0.1:9/cerebro/graphql");
        assert_eq!(body(&login)["variables"], json!({"email": "ops@acme.com", "password": "password"}));
        s.on_response(&c, &ok(json!({"login": {"token": "cer-1"}})), now()).unwrap();
        let list = s.next_request(&c, &creds()).unwrap();
        assert_eq!(list.header_value("authorization"), Some("Bearer cer-1"));
        let answer = ok(json!({"deployments": [
            {"uid": "0x1", "name": "alpha", "url": "alpha.us-east-1.aws.cloud.dgraph.io", "jwtToken": "jwt-a"},
            {"uid": "0x2", "name": "beta", "url": "http://127.0.0.1:9/backends/beta", "jwtToken": "jwt-b"}]}));
        let Progress::Spawn(children) = s.on_response(&c, &answer, now()).unwrap() else { panic!() };
        assert_eq!(children.len(), 2);
        let ProviderState::Dgraph(alpha) = &children[0] else { panic!() };
        let req = alpha.next_request(&c, &creds()).unwrap();
        assert_eq!(req.url, "https://alpha.us-east-1.aws.cloud.dgraph.io/admin/slash");
        assert_eq!(req.header_value("x-auth-token"), Some("jwt-a"));
        assert_eq!(alpha.references(&c)["backend"]["name"], "alpha");
        assert_eq!(alpha.member().as_deref(), Some("alpha"));
        assert_eq!(member_of(&alpha.references(&c)).as_deref(), Some("alpha"), "the manifest names its member");
        let shown = crate::providers::redact(serde_json::to_value(alpha).unwrap()).to_string();
        assert!(!shown.contains("jwt-a"), "{shown}");
        let mut bad = DgraphState::default();
        let refused = ok(json!({"login": null}));
        assert!(
            matches!(bad.on_response(&c, &refused, now()).unwrap(), Progress::Failed(m) if m.contains("login failed"))
        );
    }

    #[test]
    fn http_errors_are_classified() {
        let (c, mut s) = (cfg(false), DgraphState::default());
        let e = s.on_response(&c, &HttpResponse::json(401, &json!({})), now()).unwrap_err();
        assert!(!e.is_retryable() && e.message().contains("refused the credentials"));
        let e = s.on_response(&c, &HttpResponse::json(503, &json!({})), now()).unwrap_err();
        assert!(e.is_retryable());
        let html = HttpResponse { status: 200, headers: vec![], body: b"<html>502 Bad Gateway</html>".to_vec() };
        let e = s.on_response(&c, &html, now()).unwrap_err();
        assert!(!e.is_retryable() && e.message().contains("malformed"));
        let empty = status("Success", &[]);
        s.task_id = Some("0x1".into());
        assert!(matches!(s.on_response(&c, &empty, now()).unwrap(), Progress::Failed(_)));
    }
}
