//! Cloudflare D1: the REST export (`POST …/d1/database/{id}/export`, polling form).
//!
//! Quirks the code relies on (see `provider-apis.md` §1.3):
//! - The first call has no `current_bookmark`; every later call sends the `at_bookmark` of the
//!   previous answer. An export that is not polled promptly cancels itself, so polls are spaced
//!   by the source's `poll_interval` (1 s by default) and never by a long backoff.
//! - `202` with `status: "active"` means still running; `200` ends it with `status: "complete"`
//!   (`result.signed_url`, valid one hour, no auth) or `"error"` (`error` plus `messages`). Any
//!   other final status is D1 resetting the task. `result: {success: false, error}` is wrangler's
//!   "PollingFailure" shape and fails the export too.
//! - `messages` holds only the lines logged since the previous poll; they are accumulated.
//! - Success is decided by the envelope's `success`, and a non-JSON body (a WAF page) is a
//!   malformed response.
//! - While an export runs, the database serves no queries.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use url::Url;

use crate::error::StepError;
use crate::fields::{self, FieldError};
use crate::http::{status_error, HttpRequest, HttpResponse};
use crate::providers::{url_with_path, Download, Progress, ProviderSettings};
use crate::secret::Secret;
use crate::time::Timestamp;

/// Most log lines kept per job.
const MAX_MESSAGES: usize = 200;

/// A D1 source's settings: its fields of the source table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct D1Config {
    /// Base URL of the Cloudflare API (`…/client/v4`); the public API when not set (filled in
    /// by [`ProviderSettings::check`]).
    #[serde(default, deserialize_with = "fields::opt_http_url")]
    pub api_base: Option<Url>,
    /// Cloudflare account id.
    #[serde(deserialize_with = "fields::text")]
    pub account_id: String,
    /// Database UUID.
    #[serde(deserialize_with = "fields::text")]
    pub database_id: String,
    /// Name of the Worker secret holding an API token with D1 Write.
    #[serde(deserialize_with = "fields::secret_name")]
    pub token_secret: String,
    /// What the dump contains.
    #[serde(default)]
    pub dump_options: DumpOptions,
    /// Days of Time Travel history D1 keeps for this account: 30 on Workers Paid, 7 on Free (D1
    /// limits). The default, 7, holds on every plan; a restore of an older backup imports its
    /// dump instead of sending D1 a bookmark it may no longer have.
    #[serde(default = "default_time_travel_days", deserialize_with = "fields::count::<_, 1, 30>")]
    pub time_travel_days: u32,
}

fn default_time_travel_days() -> u32 {
    7
}

impl D1Config {
    /// The public Cloudflare API.
    pub const DEFAULT_API_BASE: &'static str = "https://api.cloudflare.com/client/v4";

    /// `…/accounts/{account_id}/d1/database/{database_id}/export`.
    pub fn export_url(&self) -> Result<String, StepError> {
        let base = self.api_base.as_ref().ok_or_else(|| StepError::permanent("D1: no api_base configured"))?;
        Ok(url_with_path(base, &["accounts", &self.account_id, "d1", "database", &self.database_id, "export"]))
    }
}

impl ProviderSettings for D1Config {
    /// D1 cancels an export that is not polled promptly.
    fn default_poll_interval(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn check(&mut self) -> Result<(), FieldError> {
        if self.account_id.len() > 32 {
            return Err(FieldError::new("account_id", "must be at most 32 characters"));
        }
        if self.dump_options.no_data && self.dump_options.no_schema {
            return Err(FieldError::new(
                "dump_options.no_schema",
                "cannot be combined with no_data (the dump would be empty)",
            ));
        }
        if self.api_base.is_none() {
            self.api_base = Some(fields::constant_url(Self::DEFAULT_API_BASE, "api_base")?);
        }
        Ok(())
    }

    fn secret_names(&self) -> Vec<&str> {
        vec![self.token_secret.as_str()]
    }
}

/// D1's `dump_options`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields, expecting = "a table")]
pub struct DumpOptions {
    /// Only these tables (empty = all). D1 applies the filter to index and view names too.
    #[serde(deserialize_with = "fields::texts")]
    pub tables: Vec<String>,
    /// Schema only.
    pub no_data: bool,
    /// Data only.
    pub no_schema: bool,
}

/// Progress of one D1 export, persisted with the job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct D1State {
    /// The time-travel bookmark of the export (constant for the task).
    pub at_bookmark: Option<String>,
    /// Export calls answered so far.
    pub polls: u32,
    /// The dump's filename once complete.
    pub filename: Option<String>,
    /// D1's log lines, accumulated across polls.
    pub messages: Vec<String>,
}

impl D1State {
    /// The first export call (the one that starts an export) got no answer: D1 can only be asked
    /// about an export by the bookmark that answer carries, so say that a retry may start a second.
    pub fn create_unanswered(&self) -> Option<String> {
        self.at_bookmark.is_none().then(|| {
            "the request that starts the export got no answer; D1 can only be asked about an export by the \
             bookmark that answer carries, so the retry may have started a second export of the database"
                .to_string()
        })
    }

    /// What the manifest records about this export.
    pub fn references(&self, cfg: &D1Config) -> Value {
        json!({
            "account_id": cfg.account_id,
            "database_id": cfg.database_id,
            "at_bookmark": self.at_bookmark,
            "filename": self.filename,
            "dump_options": cfg.dump_options,
        })
    }
}

/// The longest gap between two polls of an active export. D1 cancels an export that is not
/// polled continually (after making the database unavailable while it ran), and the documented
/// client (wrangler) polls about once a second, so neither a back-off, nor `Retry-After`, nor
/// `poll_interval_ms` may stretch a gap past this.
pub const MAX_POLL_GAP: std::time::Duration = std::time::Duration::from_secs(5);

/// The next export call: start (no bookmark yet) or poll.
pub fn export_request(cfg: &D1Config, state: &D1State, token: &Secret) -> Result<HttpRequest, StepError> {
    let mut body = json!({ "output_format": "polling", "dump_options": cfg.dump_options });
    if let Some(bookmark) = &state.at_bookmark {
        body["current_bookmark"] = Value::String(bookmark.clone());
    }
    Ok(HttpRequest::post_json(cfg.export_url()?, &body).header("authorization", format!("Bearer {}", token.expose())))
}

/// Folds one export answer into the state.
pub fn on_export_response(state: &mut D1State, resp: &HttpResponse, now: Timestamp) -> Result<Progress, StepError> {
    let body = envelope(resp, now, None)?;
    state.polls += 1;
    let result = body.get("result").filter(|r| r.is_object()).ok_or_else(|| malformed("no result"))?;
    if let Some(lines) = result.get("messages").and_then(Value::as_array) {
        let fresh = lines.iter().filter_map(Value::as_str).map(str::to_string);
        state.messages.extend(fresh);
        let excess = state.messages.len().saturating_sub(MAX_MESSAGES);
        state.messages.drain(..excess);
    }
    if result.get("success").and_then(Value::as_bool) == Some(false) {
        let error = result.get("error").and_then(Value::as_str).unwrap_or("unknown error");
        return Ok(Progress::Failed(format!("D1 export failed: {error}")));
    }
    if let Some(b) = result.get("at_bookmark").and_then(Value::as_str) {
        state.at_bookmark = Some(b.to_string());
    }
    if state.at_bookmark.is_none() {
        return Err(malformed("no at_bookmark"));
    }
    match result.get("status").and_then(Value::as_str) {
        Some("active") => Ok(Progress::Pending { poll_after: None }),
        Some("complete") => {
            let file = result.get("result").ok_or_else(|| malformed("complete without result"))?;
            let url = file.get("signed_url").and_then(Value::as_str).ok_or_else(|| malformed("no signed_url"))?;
            let filename = file
                .get("filename")
                .and_then(Value::as_str)
                .filter(|f| !f.is_empty())
                .map_or_else(|| "dump.sql".to_string(), str::to_string);
            state.filename = Some(filename.clone());
            Ok(Progress::Ready(vec![Download::url(url, filename, "application/sql", false)]))
        }
        Some("error") => {
            let error = result.get("error").and_then(Value::as_str).unwrap_or("export failed");
            Ok(Progress::Failed(with_messages(format!("D1 export failed: {error}"), &state.messages)))
        }
        Some(other) => Ok(Progress::Failed(with_messages(
            format!("D1 reset before export completed (status {other:?})"),
            &state.messages,
        ))),
        None => Err(malformed("no status")),
    }
}

/// A Cloudflare envelope's body, once its `success` and the HTTP status say it succeeded; else
/// the error in D1's words (`errors[]`), retryable for 429 and 5xx. `what` names the call in the
/// message (`D1 API error (import, HTTP 400): …`).
pub(crate) fn envelope(resp: &HttpResponse, now: Timestamp, what: Option<&str>) -> Result<Value, StepError> {
    let label = |status: String| what.map_or(status.clone(), |w| format!("{w}, {status}"));
    let parsed: Option<Value> = serde_json::from_slice(&resp.body).ok();
    let Some(body) = parsed.filter(Value::is_object) else {
        let message = match what {
            Some(w) => {
                format!("D1 API ({w}): received a malformed response (HTTP {}): {}", resp.status, resp.snippet(200))
            }
            None => format!("D1 API: received a malformed response (HTTP {}): {}", resp.status, resp.snippet(200)),
        };
        return Err(if resp.status >= 500 || resp.status == 429 {
            status_error(resp, now, message)
        } else {
            StepError::permanent(message)
        });
    };
    let ok = body.get("success").and_then(Value::as_bool).unwrap_or(false);
    if !ok || !(200..300).contains(&resp.status) {
        let message = format!("D1 API error ({}): {}", label(format!("HTTP {}", resp.status)), envelope_errors(&body));
        return Err(if (200..300).contains(&resp.status) {
            StepError::permanent(message)
        } else {
            status_error(resp, now, message)
        });
    }
    Ok(body)
}

fn malformed(what: &str) -> StepError {
    StepError::permanent(format!("D1 API: received a malformed response ({what})"))
}

fn with_messages(error: String, messages: &[String]) -> String {
    if messages.is_empty() {
        error
    } else {
        format!("{error} [D1 messages: {}]", messages.join(" | "))
    }
}

/// `errors[]` of a Cloudflare envelope as one line: `7500: Unknown bookmark; …`.
fn envelope_errors(body: &Value) -> String {
    envelope_error_list(body).unwrap_or_else(|| "no error details".into())
}

/// `errors[]` of a Cloudflare envelope as one line, `None` when it lists none.
pub(crate) fn envelope_error_list(body: &Value) -> Option<String> {
    let errors: Vec<String> = body
        .get("errors")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .map(|e| {
                    let msg = e.get("message").and_then(Value::as_str).unwrap_or("(no message)");
                    match e.get("code").and_then(Value::as_i64) {
                        Some(code) => format!("{code}: {msg}"),
                        None => msg.to_string(),
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    (!errors.is_empty()).then(|| errors.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> D1Config {
        D1Config {
            api_base: Some(Url::parse("http://127.0.0.1:9000/client/v4/").unwrap()),
            account_id: "acc".into(),
            database_id: "db-1".into(),
            token_secret: "T".into(),
            dump_options: DumpOptions { tables: vec!["users".into()], no_data: false, no_schema: false },
            time_travel_days: 7,
        }
    }

    fn now() -> Timestamp {
        Timestamp::from_secs(1_000)
    }

    fn active(messages: &[&str]) -> HttpResponse {
        HttpResponse::json(
            202,
            &json!({"success": true, "errors": [], "messages": [], "result":
                {"success": true, "type": "export", "at_bookmark": "bm-1", "status": "active", "messages": messages}}),
        )
    }

    #[test]
    fn first_request_starts_without_bookmark_and_polls_send_it() {
        let token = Secret::new("tok");
        let mut state = D1State::default();
        let first = export_request(&cfg(), &state, &token).unwrap();
        assert_eq!(first.url, "http://127.0.0.1:9000/client/v4/accounts/acc/d1/database/db-1/export");
        assert_eq!(first.header_value("authorization"), Some("Bearer tok"));
        let body: Value = serde_json::from_slice(first.body.as_deref().unwrap()).unwrap();
        assert_eq!(
            body,
            json!({"output_format": "polling", "dump_options": {"tables": ["users"], "no_data": false, "no_schema": false}})
        );
        on_export_response(&mut state, &active(&[]), now()).unwrap();
        let poll = export_request(&cfg(), &state, &token).unwrap();
        let body: Value = serde_json::from_slice(poll.body.as_deref().unwrap()).unwrap();
        assert_eq!(body["current_bookmark"], "bm-1");
    }

    #[test]
    fn export_url_is_built_from_segments_without_double_slashes() {
        let mut c = cfg();
        c.api_base = Some(Url::parse("https://api.cloudflare.com/client/v4").unwrap());
        c.database_id = "a b/c".into();
        assert_eq!(
            c.export_url().unwrap(),
            "https://api.cloudflare.com/client/v4/accounts/acc/d1/database/a%20b%2Fc/export"
        );
    }

    #[test]
    fn active_then_complete_yields_the_signed_url_and_accumulates_messages() {
        let mut s = D1State::default();
        assert_eq!(
            on_export_response(&mut s, &active(&["Generating x.sql"]), now()).unwrap(),
            Progress::Pending { poll_after: None }
        );
        let done = HttpResponse::json(
            200,
            &json!({"success": true, "result": {"success": true, "type": "export",
            "at_bookmark": "bm-1", "status": "complete", "messages": ["Uploaded part 2", "Finished uploading x.sql in 2 parts."],
            "result": {"filename": "x.sql", "signed_url": "https://r2.example/x.sql?sig=1"}}}),
        );
        let p = on_export_response(&mut s, &done, now()).unwrap();
        assert_eq!(
            p,
            Progress::Ready(vec![Download::url("https://r2.example/x.sql?sig=1", "x.sql", "application/sql", false)])
        );
        assert_eq!(s.polls, 2);
        assert_eq!(s.messages, vec!["Generating x.sql", "Uploaded part 2", "Finished uploading x.sql in 2 parts."]);
        assert_eq!(s.references(&cfg())["at_bookmark"], "bm-1");
        assert_eq!(s.references(&cfg())["filename"], "x.sql");
    }

    #[test]
    fn status_error_fails_with_d1_error_and_messages() {
        let mut s = D1State::default();
        let resp = HttpResponse::json(
            200,
            &json!({"success": true, "result": {"success": true, "at_bookmark": "b",
            "status": "error", "error": "D1 Export error: cannot export databases with Virtual Tables (fts5)",
            "messages": ["Generating x.sql"]}}),
        );
        let Progress::Failed(msg) = on_export_response(&mut s, &resp, now()).unwrap() else { panic!() };
        assert!(msg.contains("cannot export databases with Virtual Tables (fts5)"), "{msg}");
        assert!(msg.contains("Generating x.sql"), "{msg}");
    }

    #[test]
    fn polling_failure_shape_fails_the_export() {
        let mut s = D1State::default();
        let resp = HttpResponse::json(200, &json!({"success": true, "result": {"success": false, "error": "boom"}}));
        assert_eq!(
            on_export_response(&mut s, &resp, now()).unwrap(),
            Progress::Failed("D1 export failed: boom".into())
        );
    }

    #[test]
    fn unknown_final_status_is_a_reset() {
        let mut s = D1State::default();
        let resp =
            HttpResponse::json(200, &json!({"success": true, "result": {"at_bookmark": "b", "status": "cancelled"}}));
        let Progress::Failed(msg) = on_export_response(&mut s, &resp, now()).unwrap() else { panic!() };
        assert!(msg.starts_with("D1 reset before export completed"), "{msg}");
    }

    #[test]
    fn rate_limit_is_transient_with_retry_after() {
        let mut s = D1State::default();
        let resp =
            HttpResponse::json(429, &json!({"success": false, "errors": [{"code": 971, "message": "Please wait"}]}))
                .with_header("Retry-After", "4");
        let err = on_export_response(&mut s, &resp, now()).unwrap_err();
        assert_eq!(
            err,
            StepError::Transient {
                message: "D1 API error (HTTP 429): 971: Please wait".into(),
                retry_after: Some(Duration::from_secs(4))
            }
        );
    }

    #[test]
    fn server_errors_are_transient_and_client_errors_permanent() {
        let mut s = D1State::default();
        let e503 =
            HttpResponse::json(503, &json!({"success": false, "errors": [{"code": 10000, "message": "overloaded"}]}));
        assert!(on_export_response(&mut s, &e503, now()).unwrap_err().is_retryable());
        let e403 = HttpResponse::json(
            403,
            &json!({"success": false, "errors": [{"code": 10000, "message": "Authentication error"}]}),
        );
        let err = on_export_response(&mut s, &e403, now()).unwrap_err();
        assert!(!err.is_retryable());
        assert_eq!(err.message(), "D1 API error (HTTP 403): 10000: Authentication error");
    }

    #[test]
    fn envelope_failure_with_2xx_is_permanent() {
        let mut s = D1State::default();
        let resp = HttpResponse::json(200, &json!({"success": false, "errors": [{"code": 7500, "message": "bad"}]}));
        assert!(!on_export_response(&mut s, &resp, now()).unwrap_err().is_retryable());
    }

    #[test]
    fn non_json_bodies_are_malformed() {
        let mut s = D1State::default();
        let waf = HttpResponse { status: 403, headers: vec![], body: b"<html>Attention Required!</html>".to_vec() };
        let err = on_export_response(&mut s, &waf, now()).unwrap_err();
        assert!(!err.is_retryable());
        assert!(
            err.message().contains("malformed response (HTTP 403): <html>Attention Required!</html>"),
            "{}",
            err.message()
        );
        let gateway = HttpResponse { status: 502, headers: vec![], body: b"<html>Bad gateway</html>".to_vec() };
        assert!(on_export_response(&mut s, &gateway, now()).unwrap_err().is_retryable());
    }

    #[test]
    fn complete_without_signed_url_is_malformed() {
        let mut s = D1State::default();
        let resp = HttpResponse::json(
            200,
            &json!({"success": true, "result": {"at_bookmark": "b", "status": "complete", "result": {"filename": "x"}}}),
        );
        let err = on_export_response(&mut s, &resp, now()).unwrap_err();
        assert!(err.message().contains("no signed_url"));
    }

    #[test]
    fn messages_are_capped() {
        let mut s = D1State { messages: vec!["old".into(); MAX_MESSAGES], ..Default::default() };
        on_export_response(&mut s, &active(&["new"]), now()).unwrap();
        assert_eq!(s.messages.len(), MAX_MESSAGES);
        assert_eq!(s.messages.last().map(String::as_str), Some("new"));
    }
}
