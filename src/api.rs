//! The HTTP API's routes and responses, without I/O.
//!
//! `route` turns a method and path into a [`Route`]; the runtime executes it. Bearer tokens are
//! compared in constant time; error bodies are JSON `{"error": …}` and never contain a secret.

use hmac::digest::CtOutput;
use hmac::{Hmac, KeyInit, Mac};
use percent_encoding::percent_decode_str;
use serde_json::{json, Value};
use sha2::Sha256;

use crate::identity::JobId;
use crate::secret::Secret;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `GET /v1/sources`
    ListSources,
    /// `GET /v1/jobs/{id}`
    Job(JobId),
    /// `POST /v1/jobs/{id}/cancel` (bearer): stop the job at its next step, cleaning up.
    CancelJob(JobId),
    /// `GET /v1/sources/{name}/backups`
    Backups(String),
    /// `GET /v1/backups/{key…}`
    Artifact(String),
    /// `GET /v1/sweeps/latest`: the report of the latest daily sweep.
    LatestSweep,
    /// `POST /v1/sources/{name}/exports` (signed webhook, or the API bearer token)
    StartExport(String),
    /// `POST /v1/sources/{name}/verify` (signed webhook or bearer; body may name a backup)
    StartVerify(String),
    /// `POST /v1/sources/{name}/drill` (signed webhook or bearer; body may name a backup): a
    /// restore drill into a scratch database.
    StartDrill(String),
    /// `POST /v1/backups/{source}/{folder}/restore` (bearer): restore a committed backup.
    Restore {
        /// The source.
        source: String,
        /// The backup's folder, `{source}/{folder}/`.
        folder: String,
    },
    /// `GET /metrics` (bearer): Prometheus text exposition.
    Metrics,
    /// `GET /v1/sources/{name}/retention`: the retention plan, without deleting anything.
    Retention(String),
    /// `POST` (`pin: true`) or `DELETE` (`pin: false`) `/v1/backups/{source}/{folder}/pin`.
    Pin {
        /// The backup's folder, `{source}/{folder}/`.
        folder: String,
        /// Pin or unpin.
        pin: bool,
    },
    /// `GET /v1/alerts` (bearer): the destinations, recent delivery attempts, failure counts.
    Alerts,
    /// `GET /`: the dashboard page, no auth (it holds no data; it reads the API with the token).
    Dashboard,
    /// `GET /healthz`: liveness, no auth.
    Health,
    /// Known path, wrong method.
    MethodNotAllowed(&'static str),
    /// Nothing here.
    NotFound,
}

/// Routes a request.
pub fn route(method: &str, path: &str) -> Route {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let get = method.eq_ignore_ascii_case("GET") || method.eq_ignore_ascii_case("HEAD");
    let post = method.eq_ignore_ascii_case("POST");
    let delete = method.eq_ignore_ascii_case("DELETE");
    let only = |ok: bool, allowed: &'static str, r: Route| if ok { r } else { Route::MethodNotAllowed(allowed) };
    match segments.as_slice() {
        [""] => only(get, "GET", Route::Dashboard),
        ["healthz"] => only(get, "GET", Route::Health),
        ["v1", "sources"] => only(get, "GET", Route::ListSources),
        ["metrics"] => only(get, "GET", Route::Metrics),
        ["v1", "sweeps", "latest"] => only(get, "GET", Route::LatestSweep),
        ["v1", "alerts"] => only(get, "GET", Route::Alerts),
        ["v1", "jobs", id] => match JobId::parse(id) {
            Some(id) => only(get, "GET", Route::Job(id)),
            None => Route::NotFound,
        },
        ["v1", "jobs", id, "cancel"] => match JobId::parse(id) {
            Some(id) => only(post, "POST", Route::CancelJob(id)),
            None => Route::NotFound,
        },
        ["v1", "sources", name, "backups"] => only(get, "GET", Route::Backups(decode(name))),
        ["v1", "sources", name, "exports"] => only(post, "POST", Route::StartExport(decode(name))),
        ["v1", "sources", name, "verify"] => only(post, "POST", Route::StartVerify(decode(name))),
        ["v1", "sources", name, "drill"] => only(post, "POST", Route::StartDrill(decode(name))),
        ["v1", "backups", source, folder, "restore"] if !get => {
            let (source, folder) = (decode(source), decode(folder));
            if [&source, &folder].iter().any(|s| s.is_empty() || *s == "." || *s == ".." || s.contains('/')) {
                Route::NotFound
            } else if post {
                Route::Restore { folder: format!("{source}/{folder}/"), source }
            } else {
                Route::MethodNotAllowed("GET, POST")
            }
        }
        ["v1", "sources", name, "retention"] => only(get, "GET", Route::Retention(decode(name))),
        // `GET` of the same path is a file named `pin` (below).
        ["v1", "backups", source, folder, "pin"] if !get => {
            let (source, folder) = (decode(source), decode(folder));
            if [&source, &folder].iter().any(|s| s.is_empty() || *s == "." || *s == ".." || s.contains('/')) {
                Route::NotFound
            } else if post || delete {
                Route::Pin { folder: format!("{source}/{folder}/"), pin: post }
            } else {
                Route::MethodNotAllowed("GET, POST, DELETE")
            }
        }
        ["v1", "backups", rest @ ..] if !rest.is_empty() && rest.iter().all(|s| !s.is_empty()) => {
            let key = rest.iter().map(|s| decode(s)).collect::<Vec<_>>().join("/");
            if key.split('/').any(|s| s == ".." || s == ".") {
                Route::NotFound
            } else {
                only(get, "GET", Route::Artifact(key))
            }
        }
        _ => Route::NotFound,
    }
}

fn decode(segment: &str) -> String {
    percent_decode_str(segment).decode_utf8_lossy().into_owned()
}

/// The shortest `FERRY_API_TOKEN` accepted.
pub const MIN_API_TOKEN_CHARS: usize = 32;

/// Why the configured API token cannot be used, if it cannot: a short token is refused outright
/// rather than protecting the API weakly.
pub fn api_token_problem(token: &Secret) -> Option<String> {
    let n = token.expose().chars().count();
    (n < MIN_API_TOKEN_CHARS).then(|| {
        format!(
            "FERRY_API_TOKEN is too weak: {n} characters, at least {MIN_API_TOKEN_CHARS} are required \
             (openssl rand -hex 32 | wrangler secret put FERRY_API_TOKEN)"
        )
    })
}

/// Checks `Authorization: Bearer <token>` against the configured token in constant time.
pub fn bearer_ok(header: Option<&str>, token: &Secret) -> bool {
    if token.is_empty() {
        return false;
    }
    let Some(presented) = header.and_then(|h| h.strip_prefix("Bearer ")).map(str::trim) else { return false };
    // Compare MACs of both values under a fixed key: equal-length outputs, constant-time equality.
    digest(presented) == digest(token.expose())
}

fn digest(value: &str) -> Option<CtOutput<Hmac<Sha256>>> {
    let mut mac = Hmac::<Sha256>::new_from_slice(b"ferry-bearer-compare").ok()?;
    mac.update(value.as_bytes());
    Some(mac.finalize())
}

/// How a trigger (`POST /v1/sources/{name}/exports` or `/verify`) proves it may start a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TriggerAuth {
    /// `Authorization: Bearer <FERRY_API_TOKEN>` (the dashboard's buttons): no delivery id, so
    /// no replay; the source's single flight still applies.
    Bearer,
    /// A Standard Webhooks signature, whose `webhook-id` makes retries idempotent.
    Webhook,
}

/// Which check a trigger gets: a request carrying any Standard Webhooks header is a webhook
/// delivery (checked as one, whatever else it carries, so a signed sender keeps its replay
/// semantics); otherwise one with an `Authorization` header is judged by the bearer token; a
/// request with neither is a webhook without a signature, refused by the webhook check.
pub fn trigger_auth(webhook_headers_present: bool, authorization: Option<&str>) -> TriggerAuth {
    if !webhook_headers_present && authorization.is_some() {
        TriggerAuth::Bearer
    } else {
        TriggerAuth::Webhook
    }
}

/// A cancel request's body: empty, or `{"reason": "<why>"}`. The bearer token names no person,
/// so the request is recorded as made `by` `"api"`; the reason is the caller's own words, cut to
/// [`MAX_CANCEL_REASON`](crate::job::MAX_CANCEL_REASON) characters. `Err` is the 400's message.
pub fn cancel_request(body: &[u8]) -> Result<(String, Option<String>), String> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(("api".into(), None));
    }
    let value: Value =
        serde_json::from_slice(body).map_err(|_| "the body must be empty or a JSON object".to_string())?;
    let Value::Object(map) = value else { return Err("the body must be empty or a JSON object".into()) };
    if let Some(field) = map.keys().find(|k| k.as_str() != "reason") {
        return Err(format!("unknown field {field:?}: a cancel takes only \"reason\""));
    }
    let reason = match map.get("reason") {
        None | Some(Value::Null) => None,
        Some(Value::String(r)) => {
            let r: String = r.trim().chars().filter(|c| !c.is_control()).take(crate::job::MAX_CANCEL_REASON).collect();
            (!r.is_empty()).then_some(r)
        }
        Some(_) => return Err("field \"reason\" must be a string".into()),
    };
    Ok(("api".into(), reason))
}

/// A JSON error body.
pub fn error_body(message: &str) -> Value {
    json!({ "error": message })
}

/// A request refused with this HTTP status and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// 400 or 404.
    pub status: u16,
    /// What is wrong, naming the parameter or the member.
    pub message: String,
}

impl Refusal {
    fn new(status: u16, message: String) -> Self {
        Self { status, message }
    }
}

/// Whether `source` is in account mode: a Dgraph account (`cerebro_email`) whose backends are
/// its members, each its own series.
pub fn account_mode(source: &crate::config::SourceConfig) -> bool {
    source.provider.whole_account()
}

/// The longest member name `?member=` takes (a Dgraph deployment's name or uid).
pub const MAX_MEMBER_NAME: usize = 256;

/// The `member` filter of `GET /v1/sources/{name}/backups` (`values`: every `member` query
/// value). Only a source in account mode (a Dgraph account's backends) has members; a name that
/// is empty, too long, holds control characters or is given twice is a 400 naming `member`.
pub fn member_filter(source: &str, account_mode: bool, values: &[String]) -> Result<Option<String>, Refusal> {
    let bad = |why: &str| Err(Refusal::new(400, format!("invalid query parameter \"member\": {why}")));
    let value = match values {
        [] => return Ok(None),
        [one] => one,
        _ => return bad("given more than once"),
    };
    if value.is_empty() {
        return bad("empty (name a backend of the account)");
    }
    if value.chars().count() > MAX_MEMBER_NAME {
        return bad(&format!("longer than {MAX_MEMBER_NAME} characters"));
    }
    if value.chars().any(char::is_control) {
        return bad("holds control characters");
    }
    if !account_mode {
        return bad(&format!(
            "source {source:?} is not in account mode, so its backups have no member (only a Dgraph account's \
             backends do)"
        ));
    }
    Ok(Some(value.clone()))
}

/// After a listing filtered by `member` found `matched` backups: when it found none and the
/// member is not one the source judges now (`known`, its health's members), the member is
/// unknown: a 404 naming it. A backend with no backup yet, or one the account no longer lists but
/// whose backups remain, is known.
pub fn unknown_member(source: &str, member: &str, matched: usize, known: &[String]) -> Option<Refusal> {
    if matched > 0 || known.iter().any(|k| k == member) {
        return None;
    }
    let listed = if known.is_empty() { "none yet".to_string() } else { known.join(", ") };
    Some(Refusal::new(
        404,
        format!(
            "source {source:?} has no member named {member:?} (no backup of it, and not among its members: {listed})"
        ),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_the_documented_api() {
        assert_eq!(route("GET", "/v1/sources"), Route::ListSources);
        assert_eq!(route("GET", "/v1/jobs/0123456789abcdef"), Route::Job(JobId::new("0123456789abcdef")));
        assert_eq!(route("GET", "/v1/jobs/nope"), Route::NotFound);
        assert_eq!(route("GET", "/metrics"), Route::Metrics);
        assert_eq!(route("GET", "/v1/alerts"), Route::Alerts);
        assert_eq!(route("POST", "/v1/alerts"), Route::MethodNotAllowed("GET"));
        assert_eq!(route("POST", "/metrics"), Route::MethodNotAllowed("GET"));
        assert_eq!(route("GET", "/v1/sources/app-db/backups"), Route::Backups("app-db".into()));
        assert_eq!(route("POST", "/v1/sources/app-db/exports"), Route::StartExport("app-db".into()));
        assert_eq!(route("POST", "/v1/sources/app-db/verify"), Route::StartVerify("app-db".into()));
        assert_eq!(route("GET", "/v1/sources/app-db/verify"), Route::MethodNotAllowed("POST"));
        assert_eq!(route("POST", "/v1/sources/app-db/drill"), Route::StartDrill("app-db".into()));
        assert_eq!(
            route("POST", "/v1/backups/app-db/2026-11-28T030000Z-0123456789abcdef/restore"),
            Route::Restore { source: "app-db".into(), folder: "app-db/2026-11-28T030000Z-0123456789abcdef/".into() }
        );
        assert_eq!(route("POST", "/v1/backups/app-db/../restore"), Route::NotFound);
        assert_eq!(route("DELETE", "/v1/backups/app-db/f/restore"), Route::MethodNotAllowed("GET, POST"));
        assert_eq!(
            route("GET", "/v1/backups/app-db/2026-11-23T101500Z-0123456789abcdef/x%20y.sql"),
            Route::Artifact("app-db/2026-11-23T101500Z-0123456789abcdef/x y.sql".into())
        );
        assert_eq!(route("GET", "/"), Route::Dashboard);
        assert_eq!(route("HEAD", "/"), Route::Dashboard);
        assert_eq!(route("GET", "/healthz"), Route::Health);
        assert_eq!(route("GET", "/v1/sources/app-db/retention"), Route::Retention("app-db".into()));
        let folder = "app-db/2026-11-23T101500Z-0123456789abcdef/".to_string();
        let pin = "/v1/backups/app-db/2026-11-23T101500Z-0123456789abcdef/pin";
        assert_eq!(route("POST", pin), Route::Pin { folder: folder.clone(), pin: true });
        assert_eq!(route("DELETE", pin), Route::Pin { folder, pin: false });
        assert_eq!(route("GET", pin), Route::Artifact("app-db/2026-11-23T101500Z-0123456789abcdef/pin".into()));
    }

    #[test]
    fn pin_routes_refuse_odd_folders_and_methods() {
        assert_eq!(route("POST", "/v1/sources/app-db/retention"), Route::MethodNotAllowed("GET"));
        assert_eq!(route("PUT", "/v1/backups/app-db/f/pin"), Route::MethodNotAllowed("GET, POST, DELETE"));
        assert_eq!(route("POST", "/v1/backups/app-db/../pin"), Route::NotFound);
        assert_eq!(route("POST", "/v1/backups/app-db/a%2Fb/pin"), Route::NotFound);
        assert_eq!(route("POST", "/v1/backups/app-db//pin"), Route::NotFound);
        assert_eq!(route("POST", "/v1/backups/app-db/f/x/pin"), Route::MethodNotAllowed("GET"));
        assert_eq!(route("GET", "/v1/sweeps/latest"), Route::LatestSweep);
        assert_eq!(route("POST", "/v1/sweeps/latest"), Route::MethodNotAllowed("GET"));
        assert_eq!(route("GET", "/v1/sweeps"), Route::NotFound);
    }

    #[test]
    fn wrong_methods_and_unknown_paths_are_refused() {
        assert_eq!(route("GET", "/v1/sources/app-db/exports"), Route::MethodNotAllowed("POST"));
        assert_eq!(route("DELETE", "/v1/sources"), Route::MethodNotAllowed("GET"));
        assert_eq!(route("GET", "/v2/sources"), Route::NotFound);
        assert_eq!(route("GET", "/v1/backups/"), Route::NotFound);
        assert_eq!(route("GET", "/v1/backups/a//b"), Route::NotFound);
        assert_eq!(route("GET", "/v1/backups/a/../b"), Route::NotFound);
        assert_eq!(route("GET", "/v1/backups/a/%2E%2E/b"), Route::NotFound);
    }

    #[test]
    fn cancel_routes_and_bodies() {
        let id = JobId::new("0123456789abcdef");
        assert_eq!(route("POST", "/v1/jobs/0123456789abcdef/cancel"), Route::CancelJob(id));
        assert_eq!(route("GET", "/v1/jobs/0123456789abcdef/cancel"), Route::MethodNotAllowed("POST"));
        assert_eq!(route("POST", "/v1/jobs/nope/cancel"), Route::NotFound);
        assert_eq!(cancel_request(b""), Ok(("api".into(), None)));
        assert_eq!(cancel_request(br#"{"reason": " wrong backup "}"#), Ok(("api".into(), Some("wrong backup".into()))));
        let long = format!(r#"{{"reason": "{}"}}"#, "x".repeat(5000));
        assert_eq!(cancel_request(long.as_bytes()).unwrap().1.unwrap().len(), crate::job::MAX_CANCEL_REASON);
        assert!(cancel_request(br#"{"reason": 5}"#).unwrap_err().contains("\"reason\""));
        assert!(cancel_request(br#"{"why": "x"}"#).unwrap_err().contains("\"why\""));
        assert!(cancel_request(b"[1]").is_err());
        assert!(cancel_request(b"\xff").is_err());
    }

    #[test]
    fn bearer_tokens_must_match_exactly() {
        let token = Secret::new("t0ken");
        assert!(bearer_ok(Some("Bearer t0ken"), &token));
        for bad in
            [None, Some("t0ken"), Some("Bearer t0ke"), Some("Bearer t0ken2"), Some("Bearer "), Some("Basic t0ken")]
        {
            assert!(!bearer_ok(bad, &token), "{bad:?}");
        }
        assert!(!bearer_ok(Some("Bearer "), &Secret::new("")), "an unset token never matches");
    }

    #[test]
    fn a_trigger_with_webhook_headers_is_a_webhook_and_one_with_only_authorization_is_bearer() {
        assert_eq!(trigger_auth(false, Some("Bearer t0ken")), TriggerAuth::Bearer);
        assert_eq!(trigger_auth(false, Some("Basic x")), TriggerAuth::Bearer, "judged, and refused, as a bearer");
        assert_eq!(trigger_auth(true, Some("Bearer t0ken")), TriggerAuth::Webhook);
        assert_eq!(trigger_auth(true, None), TriggerAuth::Webhook);
        assert_eq!(trigger_auth(false, None), TriggerAuth::Webhook, "refused for its missing signature");
    }

    #[test]
    fn the_member_filter_takes_one_valid_name_of_an_account_mode_source() {
        let one = |v: &str| vec![v.to_string()];
        assert_eq!(member_filter("acct", true, &[]), Ok(None), "no filter");
        assert_eq!(member_filter("acct", true, &one("beta")), Ok(Some("beta".into())));
        assert_eq!(member_filter("acct", true, &one("0x1f")), Ok(Some("0x1f".into())), "a uid names one too");
        for (values, why) in [
            (one(""), "empty"),
            (one(&"b".repeat(MAX_MEMBER_NAME + 1)), "longer than"),
            (one("be\nta"), "control characters"),
            (vec!["alpha".into(), "beta".into()], "more than once"),
        ] {
            let refused = member_filter("acct", true, &values).unwrap_err();
            assert_eq!(refused.status, 400);
            assert!(refused.message.contains("\"member\"") && refused.message.contains(why), "{refused:?}");
        }
        let refused = member_filter("app-db", false, &one("beta")).unwrap_err();
        assert_eq!(refused.status, 400);
        assert!(refused.message.contains("not in account mode") && refused.message.contains("app-db"), "{refused:?}");
    }

    #[test]
    fn only_a_dgraph_account_source_is_in_account_mode() {
        let config = crate::config::Config::from_value(&json!([
            {"name": "acct", "kind": "dgraph", "schedule": "0 3 * * *", "cerebro_email": "ops@acme.com",
             "cerebro_password_secret": "PW"},
            {"name": "one", "kind": "dgraph", "schedule": "0 3 * * *", "endpoint": "https://blue.example",
             "api_key_secret": "KEY"},
        ]))
        .unwrap();
        assert!(account_mode(&config.sources[0]));
        assert!(!account_mode(&config.sources[1]));
    }

    #[test]
    fn an_unknown_member_is_a_404_naming_it_and_a_known_one_without_backups_is_not() {
        let known = vec!["alpha".to_string(), "beta".to_string()];
        let refused = unknown_member("acct", "zeta", 0, &known).unwrap();
        assert_eq!(refused.status, 404);
        assert!(refused.message.contains("\"zeta\"") && refused.message.contains("alpha, beta"), "{refused:?}");
        assert_eq!(unknown_member("acct", "beta", 0, &known), None, "a member without a backup yet");
        assert_eq!(unknown_member("acct", "gone", 2, &known), None, "a former backend whose backups remain");
    }

    #[test]
    fn short_api_tokens_are_refused_naming_the_secret() {
        let problem = api_token_problem(&Secret::new("short-token")).unwrap();
        assert!(problem.contains("FERRY_API_TOKEN") && problem.contains("11 characters"), "{problem}");
        assert!(api_token_problem(&Secret::new("x".repeat(32))).is_none());
    }
}
