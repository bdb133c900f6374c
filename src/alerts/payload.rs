//! What a delivery sends: a signed JSON event for webhooks, a readable message for Slack.
//!
//! **Webhook.** `POST` of `{"type": "ferry.backup.failed", "timestamp": …, "data": {…}}` with the
//! Standard Webhooks headers (`webhook-id`, `webhook-timestamp`, `webhook-signature`), signed
//! with the destination's own `whsec_…` key by [`crate::webhook::signed_headers`], the same code
//! that verifies Ferry's incoming webhooks; receivers verify Ferry the way Ferry verifies them.
//! `data` holds the source, its kind, the job (id, task, trigger, phase, times, bytes, the error
//! in the provider's words, the backup folder), for `stale` the reason and `max_age_seconds`, for
//! `recovered` what it recovered from, and `dashboard_url` when the destination has one.
//!
//! **Slack.** An incoming-webhook message as Slack documents it: `text` (the notification and
//! fallback text, required when `blocks` are used) and `blocks` of `section` blocks with `mrkdwn`
//! text, each under Slack's 3,000-character limit. Every value from outside (source names,
//! provider error text) has `&`, `<` and `>` escaped as Slack asks, so an error message cannot
//! turn into a link or a mention.

use serde_json::{json, Map, Value};
use url::Url;

use super::config::{Destination, Target};
use super::events::{AlertEvent, EventKind};
use crate::http::HttpRequest;
use crate::secret::Secret;
use crate::time::Timestamp;
use crate::webhook::{signed_headers, WebhookError, WebhookSecret};

/// Slack's limit on a section block's text.
const SLACK_SECTION_MAX: usize = 3000;
/// How much of a provider's error text a Slack message quotes.
const SLACK_ERROR_MAX: usize = 1500;

/// The dashboard's page for a source: the dashboard URL with `#source=<name>`.
pub fn dashboard_link(base: &Url, source: &str) -> String {
    let mut url = base.clone();
    let name: String = url::form_urlencoded::byte_serialize(source.as_bytes()).collect();
    url.set_fragment(Some(&format!("source={name}")));
    url.to_string()
}

/// The webhook payload.
pub fn webhook_body(event: &AlertEvent, dashboard: Option<&Url>) -> Value {
    let mut data = Map::new();
    let mut put = |k: &str, v: Value| {
        if !v.is_null() {
            data.insert(k.to_string(), v);
        }
    };
    put("source", json!(event.source));
    put("kind", json!(event.source_kind));
    if let Some(job) = &event.job {
        put("job_id", json!(job.id));
        put("task", json!(job.task));
        put("trigger", json!(job.trigger));
        put("phase", json!(job.phase));
        put("started_at", json!(job.started_at));
        put("finished_at", json!(job.finished_at));
        put("bytes", json!(job.bytes));
        put("error", json!(job.error));
        put("folder", json!(job.folder));
        if !job.warnings.is_empty() {
            put("warnings", json!(job.warnings));
        }
    }
    put("reason", json!(event.reason));
    put("max_age_seconds", json!(event.max_age_seconds));
    put("last_backup_at", json!(event.last_backup_at));
    if !event.recovered_from.is_empty() {
        put("recovered_from", json!(event.recovered_from));
    }
    put("dashboard_url", json!(dashboard.map(|d| dashboard_link(d, &event.source))));
    json!({ "type": event.kind.type_name(), "timestamp": event.at, "data": data })
}

/// `&`, `<` and `>` as Slack's documented entities; nothing else is escaped.
pub fn slack_escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// Cuts `text` to at most `max` characters, with an ellipsis when cut.
fn cut(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_string();
    }
    let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
    s.push('…');
    s
}

fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// The Slack message.
pub fn slack_body(event: &AlertEvent, dashboard: Option<&Url>) -> Value {
    let source = slack_escape(&event.source);
    let kind = slack_escape(&event.source_kind);
    let job = event.job.as_ref();
    let error = job.and_then(|j| j.error.as_deref()).map(|e| slack_escape(&cut(e, SLACK_ERROR_MAX)));
    let (icon, headline) = match event.kind {
        EventKind::Failed if job.is_some_and(|j| j.task == crate::identity::Task::Replicate) => {
            (":x:", format!("Second copy (replica) of a backup of {source} ({kind}) failed"))
        }
        EventKind::Failed => (":x:", format!("Backup of {source} ({kind}) failed")),
        EventKind::Committed => {
            let size = job.map(|j| human_bytes(j.bytes)).unwrap_or_default();
            (":white_check_mark:", format!("Backup of {source} ({kind}) committed, {size}"))
        }
        EventKind::Stale => (":warning:", format!("{source} ({kind}) is stale: no committed backup within max_age")),
        EventKind::VerifyFailed => (":x:", format!("Verification of a backup of {source} ({kind}) failed")),
        EventKind::Recovered => {
            let from: Vec<&str> = event.recovered_from.iter().map(|k| k.as_str()).collect();
            (":large_green_circle:", format!("{source} ({kind}) recovered (was {})", from.join(", ")))
        }
    };
    let mut text = format!("{icon} Ferry: {headline}");
    if let Some(e) = &error {
        text.push_str(&format!(": {}", cut(e, 300)));
    }
    let mut blocks = vec![section(format!("{icon} *{headline}*"))];
    if let Some(e) = &error {
        let quoted: Vec<String> = e.lines().map(|l| format!("&gt; {l}")).collect();
        blocks.push(section(format!("*Error, in the provider's words:*\n{}", quoted.join("\n"))));
    }
    if let Some(reason) = &event.reason {
        blocks.push(section(slack_escape(reason)));
    }
    let warnings: Vec<String> = job
        .map(|j| j.warnings.iter().map(|w| format!("• {}", slack_escape(&cut(w, 300)))).collect())
        .unwrap_or_default();
    if !warnings.is_empty() {
        text.push_str(&format!(" ({} warning{})", warnings.len(), if warnings.len() == 1 { "" } else { "s" }));
        blocks.push(section(format!("*Warnings:*\n{}", warnings.join("\n"))));
    }
    let mut details = Vec::new();
    if let Some(j) = job {
        details.push(format!("*Job:* `{}` ({}, {})", j.id, label(&j.task), label(&j.trigger)));
        if let Some(folder) = &j.folder {
            details.push(format!("*Backup:* `{}`", slack_escape(folder)));
        }
    }
    details.push(format!("*When:* {}", event.at));
    if let Some(d) = dashboard {
        // Inside `<url|label>` a `|` would end the URL; the link is percent-encoded apart from it.
        let link = slack_escape(&dashboard_link(d, &event.source).replace('|', "%7C"));
        details.push(format!("<{link}|Open {source} in the Ferry dashboard>"));
    }
    blocks.push(section(details.join("\n")));
    json!({ "text": cut(&text, SLACK_SECTION_MAX), "blocks": blocks })
}

fn section(text: String) -> Value {
    json!({ "type": "section", "text": { "type": "mrkdwn", "text": cut(&text, SLACK_SECTION_MAX) } })
}

fn label(value: &impl serde::Serialize) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// The request that delivers `event` to `destination` at `now`. `secret` is the value of the
/// secret the destination names (the signing key, or Slack's URL); `Err` says what is wrong with
/// it, which no retry can fix.
pub fn request(
    destination: &Destination,
    event: &AlertEvent,
    secret: &Secret,
    now: Timestamp,
) -> Result<HttpRequest, String> {
    let dashboard = destination.dashboard_url.as_ref();
    match &destination.target {
        Target::Webhook { url, secret_secret } => {
            let key = WebhookSecret::parse(secret).map_err(|e| match e {
                WebhookError::WeakSecret(n) => {
                    format!("the secret {secret_secret} is too weak: {n} bytes, at least 24 are required")
                }
                _ => format!("the secret {secret_secret} is not a valid whsec_<base64> key"),
            })?;
            let body = webhook_body(event, dashboard).to_string().into_bytes();
            let headers = signed_headers(&key, &event.id, now, &body)
                .map_err(|_| format!("the secret {secret_secret} cannot sign"))?;
            let mut req = HttpRequest {
                method: crate::http::Method::Post,
                url: url.to_string(),
                headers: vec![("content-type".into(), "application/json".into())],
                body: Some(body),
            };
            req.headers.extend(headers);
            Ok(req.header("user-agent", "Ferry-Alerts/1"))
        }
        Target::Slack { url_secret } => {
            let url = Url::parse(secret.expose().trim())
                .ok()
                .filter(|u| matches!(u.scheme(), "https" | "http") && u.host_str().is_some())
                .ok_or_else(|| format!("the secret {url_secret} does not hold a Slack webhook URL"))?;
            Ok(HttpRequest::post_json(url.to_string(), &slack_body(event, dashboard))
                .header("user-agent", "Ferry-Alerts/1"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::config::AlertsConfig;
    use crate::alerts::events::AlertState;
    use crate::health::{Health, Light};
    use crate::history::JobSummary;
    use crate::identity::{JobId, Task, Trigger};
    use crate::job::Phase;
    use crate::webhook::{verify, WebhookHeaders};

    const KEY: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn failed_event(error: &str) -> AlertEvent {
        let mut s = AlertState::default();
        let job = JobSummary {
            id: JobId::new("0123456789abcdef"),
            task: Task::Export,
            trigger: Trigger::Cron,
            phase: Phase::Failed,
            started_at: Timestamp::from_secs(1_800_000_000),
            finished_at: Timestamp::from_secs(1_800_000_060),
            bytes: 0,
            error: Some(error.to_string()),
            folder: None,
            member: None,
            warnings: Vec::new(),
        };
        s.job_ended("app-db", "d1", &job).remove(0)
    }

    #[test]
    fn a_failed_second_copy_says_so_in_both_payloads() {
        let mut s = AlertState::default();
        let mut job = failed_event("x").job.unwrap();
        job.task = Task::Replicate;
        job.error = Some("replica of app-db/f/db.sql: SHA-256 differs".into());
        let event = s.job_ended("app-db", "d1", &job).remove(0);
        let now = Timestamp::from_secs(1_800_000_100);
        let req = request(&destinations().destinations[0], &event, &Secret::new(KEY), now).unwrap();
        let payload: Value = serde_json::from_slice(&req.body.unwrap()).unwrap();
        assert_eq!(
            (payload["type"].as_str(), payload["data"]["task"].as_str()),
            (Some("ferry.backup.failed"), Some("replicate"))
        );
        let slack = slack_body(&event, None);
        let text = slack["text"].as_str().unwrap();
        assert!(text.contains("Second copy (replica) of a backup of app-db (d1) failed"), "{text}");
    }

    #[test]
    fn a_committed_backup_with_warnings_names_them_in_both_payloads() {
        let mut s = AlertState::default();
        let mut job = failed_event("x").job.unwrap();
        job.phase = Phase::Committed;
        job.error = None;
        job.warnings = vec!["integers beyond 2^53 in ledger.amount: D1's export rounds them".into()];
        let event = s.job_ended("app-db", "d1", &job).remove(0);
        let payload = webhook_body(&event, None);
        assert_eq!(payload["type"], "ferry.backup.committed");
        assert_eq!(
            payload["data"]["warnings"],
            json!(["integers beyond 2^53 in ledger.amount: D1's export rounds them"])
        );
        let slack = slack_body(&event, None);
        assert!(slack["text"].as_str().unwrap().ends_with("(1 warning)"), "{slack}");
        assert!(slack.to_string().contains("ledger.amount"), "{slack}");
        job.warnings.clear();
        let quiet = s.job_ended("app-db", "d1", &job).remove(0);
        assert!(webhook_body(&quiet, None)["data"].get("warnings").is_none(), "no warnings, no field");
        assert!(!slack_body(&quiet, None).to_string().contains("Warnings"));
    }

    fn destinations() -> AlertsConfig {
        AlertsConfig::from_value(&json!([
            {"name": "ops", "kind": "webhook", "url": "https://hooks.example.com/in", "secret_secret": "OPS_KEY",
             "events": ["failed"], "dashboard_url": "https://ferry.example.dev/"},
            {"name": "chat", "kind": "slack", "url_secret": "SLACK_URL", "events": ["failed"],
             "dashboard_url": "https://ferry.example.dev/"}
        ]))
        .unwrap()
    }

    #[test]
    fn a_webhook_delivery_is_signed_so_the_receiver_can_verify_it() {
        let event = failed_event("D1 API error (HTTP 400): no such database");
        let now = Timestamp::from_secs(1_800_000_100);
        let req = request(&destinations().destinations[0], &event, &Secret::new(KEY), now).unwrap();
        assert_eq!(req.url, "https://hooks.example.com/in");
        let h = |n: &str| req.header_value(n);
        assert_eq!(h("webhook-id"), Some(event.id.as_str()), "the event's id, stable across retries");
        assert_eq!(h("webhook-timestamp"), Some("1800000100"), "the attempt's time");
        let body = req.body.clone().unwrap();
        let key = WebhookSecret::parse(&Secret::new(KEY)).unwrap();
        let headers = WebhookHeaders {
            id: h("webhook-id"),
            timestamp: h("webhook-timestamp"),
            signature: h("webhook-signature"),
        };
        assert!(verify(&key, headers, &body, now).is_ok());
        let payload: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(payload["type"], "ferry.backup.failed");
        assert_eq!(payload["timestamp"], "2027-01-15T08:01:00.000Z");
        let data = &payload["data"];
        assert_eq!(data["source"], "app-db");
        assert_eq!(data["kind"], "d1");
        assert_eq!(data["job_id"], "0123456789abcdef");
        assert_eq!(data["phase"], "failed");
        assert_eq!(data["error"], "D1 API error (HTTP 400): no such database");
        assert_eq!(data["dashboard_url"], "https://ferry.example.dev/#source=app-db");
        assert!(data.get("folder").is_none() && data.get("reason").is_none(), "absent fields are left out: {data}");
        // A retry an hour later: same id, fresh timestamp and signature.
        let later = request(
            &destinations().destinations[0],
            &event,
            &Secret::new(KEY),
            now.plus(std::time::Duration::from_secs(3600)),
        )
        .unwrap();
        assert_eq!(later.header_value("webhook-id"), h("webhook-id"));
        assert_ne!(later.header_value("webhook-signature"), h("webhook-signature"));
    }

    #[test]
    fn a_stale_event_carries_the_reason_and_max_age() {
        let mut s = AlertState::default();
        let health = Health {
            light: Light::Red,
            reason: "no committed backup since…".into(),
            max_age_seconds: 3600,
            last_backup_at: Some(Timestamp::from_secs(0)),
        };
        let e = s.ticked("app-db", "d1", &health, Timestamp::from_secs(7200)).unwrap();
        let body = webhook_body(&e, None);
        assert_eq!(body["type"], "ferry.backup.stale");
        assert_eq!(body["data"]["reason"], "no committed backup since…");
        assert_eq!(body["data"]["max_age_seconds"], 3600);
        assert_eq!(body["data"]["last_backup_at"], "1970-01-01T00:00:00.000Z");
        assert!(body["data"].get("job_id").is_none() && body["data"].get("dashboard_url").is_none());
    }

    #[test]
    fn a_slack_message_has_the_documented_shape_and_escapes_outside_text() {
        let event = failed_event("HTTP 401: <html>Unauthorized & forbidden</html>\nsecond line");
        let url = "https://hooks.slack.com/services/T000/B000/XXXX";
        let req = request(&destinations().destinations[1], &event, &Secret::new(url), Timestamp::from_secs(0)).unwrap();
        assert_eq!(req.url, url);
        assert_eq!(req.header_value("content-type"), Some("application/json"));
        assert!(req.header_value("webhook-signature").is_none());
        let body: Value = serde_json::from_slice(req.body.as_ref().unwrap()).unwrap();
        let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["blocks", "text"]);
        let text = body["text"].as_str().unwrap();
        assert!(text.contains("app-db") && text.contains("&lt;html&gt;Unauthorized &amp; forbidden"), "{text}");
        let blocks = body["blocks"].as_array().unwrap();
        assert!(!blocks.is_empty() && blocks.len() <= 50);
        for b in blocks {
            assert_eq!(b["type"], "section");
            assert_eq!(b["text"]["type"], "mrkdwn");
            let t = b["text"]["text"].as_str().unwrap();
            assert!(!t.is_empty() && t.chars().count() <= 3000);
            // Outside text never opens a control sequence: the only `<` starts the dashboard link.
            assert_eq!(t.matches('<').count(), t.matches("<https://ferry.example.dev/").count(), "{t}");
        }
        let all: Vec<&str> = blocks.iter().map(|b| b["text"]["text"].as_str().unwrap()).collect();
        let all = all.join("\n");
        assert!(all.contains("&gt; HTTP 401: &lt;html&gt;") && all.contains("&gt; second line"), "{all}");
        assert!(all.contains("<https://ferry.example.dev/#source=app-db|Open app-db in the Ferry dashboard>"), "{all}");
        assert!(all.contains("`0123456789abcdef`"), "{all}");
    }

    #[test]
    fn long_errors_are_cut_to_slacks_limits() {
        let event = failed_event(&"x".repeat(10_000));
        let body = slack_body(&event, None);
        for b in body["blocks"].as_array().unwrap() {
            assert!(b["text"]["text"].as_str().unwrap().chars().count() <= 3000);
        }
        assert!(body["text"].as_str().unwrap().chars().count() <= 3000);
    }

    #[test]
    fn bad_secrets_are_named_and_never_printed() {
        let event = failed_event("boom");
        let d = destinations();
        let e = request(&d.destinations[0], &event, &Secret::new("whsec_AA=="), Timestamp::from_secs(0)).unwrap_err();
        assert!(e.contains("OPS_KEY") && e.contains("too weak"), "{e}");
        let e = request(&d.destinations[0], &event, &Secret::new("not base64!"), Timestamp::from_secs(0)).unwrap_err();
        assert!(e.contains("OPS_KEY") && !e.contains("not base64!"), "{e}");
        let e =
            request(&d.destinations[1], &event, &Secret::new("xoxb-not-a-url"), Timestamp::from_secs(0)).unwrap_err();
        assert!(e.contains("SLACK_URL") && !e.contains("xoxb"), "{e}");
    }

    #[test]
    fn the_dashboard_link_names_the_source() {
        let base = Url::parse("https://ferry.example.dev/ops?x=1").unwrap();
        assert_eq!(dashboard_link(&base, "app db"), "https://ferry.example.dev/ops?x=1#source=app+db");
    }
}
