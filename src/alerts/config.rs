//! `FERRY_ALERTS`: the notification destinations and the events each one wants.
//!
//! Declared like `FERRY_SOURCES`: an array of tables in `wrangler.toml` (or the same array as a
//! JSON string), parsed strictly by serde with `deny_unknown_fields`; every error names the
//! destination (by `name`, or `#2` for the second table without one) and the field. Secrets are
//! never in the config: a webhook's signing key and a Slack webhook URL (which is itself a
//! credential: whoever has it can post to the channel) are Worker secrets named here.
//!
//! A bad `FERRY_ALERTS` never stops a backup: sources keep running, their events wait in their
//! outbox, and `GET /v1/alerts` answers with the error until it is fixed.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer};
use serde_json::Value;
use url::Url;

use super::delivery::{DeliveryPolicy, DestinationKind};
use super::events::{AlertEvent, Delivery, EventKind};
use crate::config::Config;
use crate::fields::{self, FieldError};
use crate::fields::{path_error, valid_name};

/// The most attempts a destination may ask for; the queue consumer's `max_retries` in
/// `wrangler.toml` (100) stays above it, so Ferry, not the queue, decides when to give up.
pub const MAX_ATTEMPTS: u64 = 50;
/// Attempts by default: with the default first delay of 30 s, doubling, about 4 hours in all.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
/// The first retry's delay by default.
pub const DEFAULT_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Every destination, in declaration order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AlertsConfig {
    /// The destinations.
    pub destinations: Vec<Destination>,
}

/// Where a destination's messages go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// POST the JSON event to `url`, signed with the `whsec_…` key in the secret `secret_secret`.
    Webhook {
        /// The receiver.
        url: Url,
        /// The name of the Worker secret holding the signing key.
        secret_secret: String,
    },
    /// POST a Slack message to the incoming-webhook URL held in the secret `url_secret`.
    Slack {
        /// The name of the Worker secret holding the webhook URL.
        url_secret: String,
    },
}

/// One notification destination.
#[derive(Debug, Clone, PartialEq)]
pub struct Destination {
    /// Unique name: in the API, the metrics and each queued message.
    pub name: String,
    /// Where it goes.
    pub target: Target,
    /// The events it wants.
    pub events: Vec<EventKind>,
    /// Only these sources' events (all sources when `None`).
    pub sources: Option<Vec<String>>,
    /// The dashboard to link to from each message.
    pub dashboard_url: Option<Url>,
    /// How often and how patiently a delivery is retried.
    pub policy: DeliveryPolicy,
}

impl Destination {
    /// Webhook or Slack.
    pub fn kind(&self) -> DestinationKind {
        match self.target {
            Target::Webhook { .. } => DestinationKind::Webhook,
            Target::Slack { .. } => DestinationKind::Slack,
        }
    }

    /// True when this destination wants `event`.
    pub fn wants(&self, event: &AlertEvent) -> bool {
        self.events.contains(&event.kind) && self.sources.as_ref().is_none_or(|names| names.contains(&event.source))
    }
}

impl AlertsConfig {
    /// The destination called `name`.
    pub fn destination(&self, name: &str) -> Option<&Destination> {
        self.destinations.iter().find(|d| d.name == name)
    }

    /// One queued message per destination that wants `event`.
    pub fn deliveries(&self, event: &AlertEvent) -> Vec<Delivery> {
        self.destinations
            .iter()
            .filter(|d| d.wants(event))
            .map(|d| Delivery { destination: d.name.clone(), event: event.clone() })
            .collect()
    }

    /// Checks that every `sources` filter names a configured source (a typo would silently
    /// filter everything out).
    pub fn check_sources(&self, config: &Config) -> Result<(), AlertsConfigError> {
        for d in &self.destinations {
            for (i, name) in d.sources.iter().flatten().enumerate() {
                if config.source(name).is_none() {
                    return Err(AlertsConfigError::field(
                        &d.name,
                        FieldError::new(format!("sources[{i}]"), format!("names no configured source ({name:?})")),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Parses `FERRY_ALERTS`: an array of destination tables, or a JSON string holding one.
    pub fn from_value(value: &Value) -> Result<Self, AlertsConfigError> {
        let owned;
        let value = match value {
            Value::String(s) => {
                owned = serde_json::from_str::<Value>(s)
                    .map_err(|e| AlertsConfigError::top(format!("FERRY_ALERTS is not valid JSON: {e}")))?;
                &owned
            }
            other => other,
        };
        let items = value
            .as_array()
            .ok_or_else(|| AlertsConfigError::top("FERRY_ALERTS must be an array of destination tables"))?;
        let mut destinations: Vec<Destination> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let d = parse_destination(i, item)?;
            if destinations.iter().any(|x| x.name == d.name) {
                return Err(AlertsConfigError::field(
                    &d.name,
                    FieldError::new("name", "is used by another destination"),
                ));
            }
            destinations.push(d);
        }
        Ok(Self { destinations })
    }
}

/// A problem in `FERRY_ALERTS`, naming the destination and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct AlertsConfigError {
    /// The destination's name (or `#index` when it has none), if the problem is inside one.
    pub destination: Option<String>,
    /// The offending field.
    pub field: Option<String>,
    /// What is wrong.
    pub problem: String,
}

impl AlertsConfigError {
    fn top(problem: impl Into<String>) -> Self {
        Self { destination: None, field: None, problem: problem.into() }
    }

    fn field(destination: &str, e: FieldError) -> Self {
        Self { destination: Some(destination.to_string()), field: Some(e.field), problem: e.problem }
    }
}

impl fmt::Display for AlertsConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid FERRY_ALERTS: ")?;
        if let Some(d) = &self.destination {
            write!(f, "destination {d:?}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "field {field:?} ")?;
        }
        f.write_str(&self.problem)
    }
}

/// A destination table as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDestination {
    #[serde(deserialize_with = "destination_name")]
    name: String,
    kind: DestinationKind,
    events: Vec<EventKind>,
    #[serde(default, deserialize_with = "fields::opt_http_url")]
    url: Option<Url>,
    #[serde(default, deserialize_with = "fields::opt_secret_name")]
    secret_secret: Option<String>,
    #[serde(default, deserialize_with = "fields::opt_secret_name")]
    url_secret: Option<String>,
    #[serde(default, deserialize_with = "opt_texts")]
    sources: Option<Vec<String>>,
    #[serde(default, deserialize_with = "fields::opt_http_url")]
    dashboard_url: Option<Url>,
    #[serde(default = "default_max_attempts", deserialize_with = "fields::count::<_, 1, MAX_ATTEMPTS>")]
    max_attempts: u32,
    #[serde(default = "default_retry_delay", deserialize_with = "fields::secs::<_, 1, 3600>")]
    retry_delay_seconds: Duration,
}

fn default_max_attempts() -> u32 {
    DEFAULT_MAX_ATTEMPTS
}

fn default_retry_delay() -> Duration {
    DEFAULT_RETRY_DELAY
}

fn destination_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = fields::text(d)?;
    if !valid_name(&name) {
        return Err(serde::de::Error::custom(
            "must be 1-63 characters of a-z, 0-9, '-', '_' or '.', starting with a letter or digit",
        ));
    }
    Ok(name)
}

fn opt_texts<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    fields::texts(d).map(Some)
}

fn parse_destination(index: usize, value: &Value) -> Result<Destination, AlertsConfigError> {
    let mut label = format!("#{}", index + 1);
    let Some(table) = value.as_object() else {
        return Err(AlertsConfigError { destination: Some(label), field: None, problem: "must be a table".into() });
    };
    if let Some(name) = table.get("name").and_then(Value::as_str).map(str::trim).filter(|n| valid_name(n)) {
        label = name.to_string();
    }
    let at = |e: FieldError| AlertsConfigError::field(&label, e);
    // `null` means absent (TOML has no null; a JSON config may).
    let table: serde_json::Map<String, Value> =
        table.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), v.clone())).collect();
    let raw: RawDestination = serde_path_to_error::deserialize(Value::Object(table)).map_err(|e| at(path_error(e)))?;
    if raw.events.is_empty() {
        return Err(at(FieldError::new(
            "events",
            "must name at least one event (failed, committed, stale, verify_failed, recovered)",
        )));
    }
    if raw.sources.as_ref().is_some_and(Vec::is_empty) {
        return Err(at(FieldError::new("sources", "must name at least one source (leave it out for every source)")));
    }
    let mut events = raw.events.clone();
    events.sort_unstable();
    events.dedup();
    let not_for =
        |field: &str, kind: &str, hint: &str| at(FieldError::new(field, format!("is not used by kind {kind:?}{hint}")));
    let target = match raw.kind {
        DestinationKind::Webhook => {
            if raw.url_secret.is_some() {
                return Err(not_for("url_secret", "webhook", " (a webhook's URL is `url`)"));
            }
            let url = raw.url.ok_or_else(|| at(FieldError::new("url", "is required for kind \"webhook\"")))?;
            let secret_secret = raw.secret_secret.ok_or_else(|| {
                at(FieldError::new(
                    "secret_secret",
                    "is required for kind \"webhook\": the name of a Worker secret holding a whsec_… signing key",
                ))
            })?;
            Target::Webhook { url, secret_secret }
        }
        DestinationKind::Slack => {
            if raw.url.is_some() {
                return Err(not_for(
                    "url",
                    "slack",
                    ": a Slack webhook URL is a credential; put it in a Worker secret and name that in url_secret",
                ));
            }
            if raw.secret_secret.is_some() {
                return Err(not_for("secret_secret", "slack", " (Slack deliveries are not signed)"));
            }
            let url_secret = raw.url_secret.ok_or_else(|| {
                at(FieldError::new(
                    "url_secret",
                    "is required for kind \"slack\": the name of a Worker secret holding the incoming-webhook URL",
                ))
            })?;
            Target::Slack { url_secret }
        }
    };
    Ok(Destination {
        name: raw.name,
        target,
        events,
        sources: raw.sources,
        dashboard_url: raw.dashboard_url,
        policy: DeliveryPolicy { max_attempts: raw.max_attempts, first_delay: raw.retry_delay_seconds },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Result<AlertsConfig, AlertsConfigError> {
        AlertsConfig::from_value(&v)
    }

    fn err(v: Value) -> AlertsConfigError {
        parse(json!([v])).unwrap_err()
    }

    fn hook(extra: Value) -> Value {
        let mut base = json!({"name": "ops", "kind": "webhook", "url": "https://hooks.example.com/ferry",
                              "secret_secret": "OPS_HOOK_SECRET", "events": ["failed", "stale"]});
        for (k, v) in extra.as_object().unwrap() {
            base[k] = v.clone();
        }
        base
    }

    #[test]
    fn parses_a_webhook_and_a_slack_destination_with_defaults() {
        let c = parse(json!([
            hook(json!({})),
            {"name": "team-slack", "kind": "slack", "url_secret": "SLACK_URL", "events": ["recovered", "failed", "failed"],
             "sources": ["app-db"], "dashboard_url": "https://ferry.example.workers.dev/"}
        ]))
        .unwrap();
        let ops = &c.destinations[0];
        assert_eq!(ops.kind(), DestinationKind::Webhook);
        assert_eq!(
            ops.target,
            Target::Webhook {
                url: Url::parse("https://hooks.example.com/ferry").unwrap(),
                secret_secret: "OPS_HOOK_SECRET".into()
            }
        );
        assert_eq!(ops.events, vec![EventKind::Failed, EventKind::Stale]);
        assert_eq!(ops.policy, DeliveryPolicy { max_attempts: DEFAULT_MAX_ATTEMPTS, first_delay: DEFAULT_RETRY_DELAY });
        let slack = c.destination("team-slack").unwrap();
        assert_eq!(slack.target, Target::Slack { url_secret: "SLACK_URL".into() });
        assert_eq!(slack.events, vec![EventKind::Failed, EventKind::Recovered], "sorted, duplicates dropped");
        assert_eq!(slack.sources.as_deref(), Some(&["app-db".to_string()][..]));
        assert_eq!(slack.dashboard_url.as_ref().map(Url::as_str), Some("https://ferry.example.workers.dev/"));
    }

    #[test]
    fn accepts_a_json_string_and_nothing_at_all() {
        let text = serde_json::to_string(&json!([hook(json!({}))])).unwrap();
        assert_eq!(parse(Value::String(text)).unwrap().destinations.len(), 1);
        assert_eq!(parse(json!([])).unwrap(), AlertsConfig::default());
        assert!(parse(Value::String("[{".into())).unwrap_err().to_string().contains("not valid JSON"));
        assert!(parse(json!({"name": "x"})).unwrap_err().to_string().contains("must be an array"));
    }

    #[test]
    fn errors_name_the_destination_and_the_field() {
        let cases = [
            (hook(json!({"events": ["failed", "exploded"]})), "ops", "events[1]", "unknown variant `exploded`"),
            (hook(json!({"events": []})), "ops", "events", "at least one event"),
            (hook(json!({"kind": "email"})), "ops", "kind", "unknown variant `email`"),
            (hook(json!({"url": "ftp://x"})), "ops", "url", "http:// or https://"),
            (hook(json!({"secret_secret": "whsec_abc+def/=="})), "ops", "secret_secret", "not the secret itself"),
            (hook(json!({"colour": "red"})), "ops", "colour", "is not a known field"),
            (hook(json!({"max_attempts": 0})), "ops", "max_attempts", "from 1 to 50"),
            (hook(json!({"retry_delay_seconds": 7200})), "ops", "retry_delay_seconds", "from 1 to 3600"),
            (hook(json!({"sources": []})), "ops", "sources", "at least one source"),
            (hook(json!({"url_secret": "X"})), "ops", "url_secret", "not used by kind \"webhook\""),
            (
                json!({"name": "s", "kind": "slack", "events": ["failed"], "url": "https://hooks.slack.com/services/T/B/x"}),
                "s",
                "url",
                "is a credential",
            ),
            (json!({"name": "s", "kind": "slack", "events": ["failed"]}), "s", "url_secret", "is required"),
            (
                json!({"name": "w", "kind": "webhook", "events": ["failed"], "url": "https://x.io"}),
                "w",
                "secret_secret",
                "is required",
            ),
            (json!({"kind": "webhook", "events": ["failed"]}), "#1", "name", "is required"),
            (
                json!({"name": "Bad Name", "kind": "slack", "events": ["failed"], "url_secret": "S"}),
                "#1",
                "name",
                "1-63 characters",
            ),
        ];
        for (v, dest, field, words) in cases {
            let e = err(v.clone());
            assert_eq!((e.destination.as_deref(), e.field.as_deref()), (Some(dest), Some(field)), "{v}: {e}");
            assert!(e.to_string().contains(words), "{v}: {e}");
            assert!(e.to_string().starts_with("invalid FERRY_ALERTS: destination"), "{e}");
        }
        let dup = parse(json!([hook(json!({})), hook(json!({}))])).unwrap_err();
        assert_eq!((dup.destination.as_deref(), dup.field.as_deref()), (Some("ops"), Some("name")));
    }

    #[test]
    fn a_sources_filter_must_name_configured_sources() {
        let sources = Config::from_value(&json!([{"name": "app-db", "kind": "d1", "schedule": "0 3 * * *",
            "account_id": "a", "database_id": "d", "token_secret": "T"}]))
        .unwrap();
        let ok = parse(json!([hook(json!({"sources": ["app-db"]}))])).unwrap();
        assert_eq!(ok.check_sources(&sources), Ok(()));
        let typo = parse(json!([hook(json!({"sources": ["app-db", "app_db"]}))])).unwrap();
        let e = typo.check_sources(&sources).unwrap_err();
        assert_eq!((e.destination.as_deref(), e.field.as_deref()), (Some("ops"), Some("sources[1]")));
    }
}
