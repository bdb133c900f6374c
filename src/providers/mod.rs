//! The providers Ferry exports from, behind one small protocol.
//!
//! Every provider is a little state machine persisted with the job. At each step it either
//! decides something without I/O ([`ProviderState::advance`]) or names the next request
//! ([`ProviderState::next_request`]) and folds the answer in ([`ProviderState::on_response`]).
//! When the export is ready it hands over the files to copy into R2: plain downloads, or a file
//! Ferry generates itself (the Aura graph export). The job engine (`job.rs`) owns everything
//! else: retries, deadlines, the copy and the manifest.
//!
//! Provider state may hold short-lived credentials (access tokens) between steps; such fields
//! are named `secret_*` and are removed from everything the API shows (see [`redact`]).
//!
//! Each provider module also owns its settings: a serde-derived config type with its own
//! checks ([`ProviderSettings`]), registered by one line in [`ProviderConfig`].

pub mod aura;
pub mod d1;
pub mod dgraph;
pub mod dxp;

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

use crate::error::StepError;
use crate::fields::FieldError;
use crate::http::{HttpRequest, HttpResponse};
use crate::secret::Secret;
use crate::time::Timestamp;

/// What every provider's settings type offers the config besides its serde derive.
pub trait ProviderSettings {
    /// The poll interval when the source sets no `poll_interval_ms`.
    fn default_poll_interval(&self) -> Duration;
    /// The checks serde cannot express (fields that depend on each other), run once after the
    /// fields are read; it may fill in defaults derived from other fields.
    fn check(&mut self) -> Result<(), FieldError>;
    /// Names of the Worker secrets the source needs (never their values).
    fn secret_names(&self) -> Vec<&str>;
    /// Whether the source backs up every database of an account (Dgraph's account mode, D1's
    /// `database_id = "*"`): each is a member with its own job, folder, retention, health,
    /// alerts and metrics.
    fn whole_account(&self) -> bool {
        false
    }
}

/// Declares [`ProviderConfig`]: one line per provider, `"kind" => Variant(module::Config)`.
macro_rules! providers {
    ($($(#[$doc:meta])* $kind:literal => $variant:ident($config:ty),)*) => {
        /// A source's provider and its settings, one variant per `kind`. Stored with a job as its
        /// snapshot, tagged by `kind`.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        #[serde(tag = "kind")]
        pub enum ProviderConfig {
            $($(#[$doc])* #[serde(rename = $kind)] $variant($config),)*
        }

        impl ProviderConfig {
            /// Every `kind`, in registration order.
            pub const KINDS: &'static [&'static str] = &[$($kind),*];

            /// Reads the provider's own fields of a source of `kind` (`None` for an unknown
            /// kind); errors keep the path of the offending field.
            pub fn from_fields(
                kind: &str,
                fields: Value,
            ) -> Option<Result<Self, serde_path_to_error::Error<serde_json::Error>>> {
                match kind {
                    $($kind => Some(serde_path_to_error::deserialize(fields).map(Self::$variant)),)*
                    _ => None,
                }
            }

            /// The `kind` string.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(Self::$variant(_) => $kind,)*
                }
            }

            fn settings(&self) -> &dyn ProviderSettings {
                match self {
                    $(Self::$variant(c) => c,)*
                }
            }

            fn settings_mut(&mut self) -> &mut dyn ProviderSettings {
                match self {
                    $(Self::$variant(c) => c,)*
                }
            }
        }
    };
}

providers! {
    /// Cloudflare D1 (REST export).
    "d1" => D1(d1::D1Config),
    /// Dgraph Cloud (`/admin/slash` export).
    "dgraph" => Dgraph(dgraph::DgraphConfig),
    /// Neo4j Aura (snapshots and a logical export over the Query API).
    "aura" => Aura(aura::AuraConfig),
    /// Liferay DXP Cloud (backup service downloads).
    "dxp" => Dxp(dxp::DxpConfig),
}

impl ProviderConfig {
    /// See [`ProviderSettings::default_poll_interval`].
    pub fn default_poll_interval(&self) -> Duration {
        self.settings().default_poll_interval()
    }

    /// See [`ProviderSettings::check`].
    pub fn check(&mut self) -> Result<(), FieldError> {
        self.settings_mut().check()
    }

    /// See [`ProviderSettings::secret_names`].
    pub fn secret_names(&self) -> Vec<&str> {
        self.settings().secret_names()
    }

    /// See [`ProviderSettings::whole_account`].
    pub fn whole_account(&self) -> bool {
        self.settings().whole_account()
    }

    /// What one member of a whole-account source is called in messages.
    pub fn member_noun(&self) -> &'static str {
        match self {
            Self::Dgraph(_) => "backend",
            Self::D1(_) => "database",
            Self::Aura(_) => "instance",
            Self::Dxp(_) => "member",
        }
    }
}

/// The Worker secrets a step may use, by secret name.
#[derive(Debug, Clone, Default)]
pub struct Credentials(BTreeMap<String, Secret>);

impl Credentials {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a secret.
    pub fn insert(&mut self, name: impl Into<String>, value: Secret) {
        self.0.insert(name.into(), value);
    }

    /// The secret called `name`, or a permanent error naming it.
    pub fn get(&self, name: &str) -> Result<&Secret, StepError> {
        self.0.get(name).filter(|s| !s.is_empty()).ok_or_else(|| {
            StepError::permanent(format!("the Worker secret {name} is not set (wrangler secret put {name})"))
        })
    }
}

/// Where the bytes of a file come from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "from", rename_all = "snake_case")]
pub enum Origin {
    /// A GET. Signed URLs are credentials: never shown in API responses.
    Url {
        /// The URL.
        secret_url: String,
        /// Whether the GET needs the provider's credentials (signed URLs do not).
        authenticated: bool,
    },
    /// The Neo4j graph, read through the Query API and written by Ferry as gzip JSON Lines.
    Graph,
    /// What D1's export cannot carry (virtual tables, exact integers beyond 2^53), read through
    /// D1's query API and written by Ferry as SQL (see [`d1::query`]).
    D1Query,
}

/// A finished export file to copy into R2.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Download {
    /// The provider's file name, used as the object's name in the backup folder.
    pub filename: String,
    /// Content type to store.
    pub content_type: String,
    /// Where its bytes come from.
    pub origin: Origin,
}

impl Download {
    /// A file behind a URL.
    pub fn url(url: impl Into<String>, filename: impl Into<String>, content_type: &str, authenticated: bool) -> Self {
        Self {
            filename: filename.into(),
            content_type: content_type.into(),
            origin: Origin::Url { secret_url: url.into(), authenticated },
        }
    }
}

/// What a provider step means for the job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// A step that is not progress: take the next step now, but keep counting the retries of
    /// the step it stands in for (a look-up after an unanswered create must not reset them).
    Again,
    /// Not done; ask again after `poll_after` (or the source's poll interval).
    Pending {
        /// Provider-specific delay; `None` means the source's `poll_interval`.
        poll_after: Option<Duration>,
    },
    /// The export is complete: copy these files (possibly none, e.g. a snapshot-only backup).
    Ready(Vec<Download>),
    /// The provider reported that the export failed, with its own words.
    Failed(String),
    /// Nothing to back up this time (for example the newest backup was already copied).
    Skip(String),
    /// This job only discovered work: run one job (and folder) per state, one after another.
    Spawn(Vec<ProviderState>),
}

/// What a step may consult besides the provider's state.
#[derive(Debug, Clone, Copy)]
pub struct StepInput<'a> {
    /// The provider's settings (the job's snapshot of them).
    pub provider: &'a ProviderConfig,
    /// Its secrets.
    pub creds: &'a Credentials,
    /// Now.
    pub now: Timestamp,
    /// The trigger's parameters (the webhook body, or `{}`).
    pub params: &'a Value,
    /// Dedupe keys of what this source already copied (see [`ProviderState::dedupe_key`]).
    pub seen: &'a [String],
}

/// Per-provider protocol state, persisted with the job.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProviderState {
    /// Cloudflare D1.
    D1(d1::D1State),
    /// Dgraph Cloud.
    Dgraph(dgraph::DgraphState),
    /// Neo4j Aura.
    Aura(aura::AuraState),
    /// Liferay DXP Cloud.
    Dxp(dxp::DxpState),
}

impl ProviderState {
    /// Fresh state for a new job of a source with these settings.
    pub fn new(provider: &ProviderConfig) -> Self {
        match provider {
            ProviderConfig::D1(_) => Self::D1(d1::D1State::default()),
            ProviderConfig::Dgraph(_) => Self::Dgraph(dgraph::DgraphState::default()),
            ProviderConfig::Aura(_) => Self::Aura(aura::AuraState::default()),
            ProviderConfig::Dxp(_) => Self::Dxp(dxp::DxpState::default()),
        }
    }

    /// In account mode, the member this job backs up (a Dgraph account's backend, a D1
    /// account's database): its own series for retention, health and metrics. `None` for a
    /// source of one database.
    pub fn member(&self) -> Option<String> {
        match self {
            Self::Dgraph(state) => state.member(),
            Self::D1(state) => state.member_name(),
            Self::Aura(state) => state.member(),
            Self::Dxp(_) => None,
        }
    }

    /// A decision that needs no request, if one is due now.
    pub fn advance(&mut self, input: &StepInput<'_>) -> Result<Option<Progress>, StepError> {
        match (self, input.provider) {
            (Self::Aura(state), ProviderConfig::Aura(cfg)) => Ok(state.advance(cfg, input.now)),
            (Self::Dxp(state), ProviderConfig::Dxp(cfg)) => state.advance(cfg, input),
            (Self::D1(state), ProviderConfig::D1(_)) => Ok(state.advance()),
            _ => Ok(None),
        }
    }

    /// The next request of the export protocol.
    pub fn next_request(&self, input: &StepInput<'_>) -> Result<HttpRequest, StepError> {
        let creds = input.creds;
        match (self, input.provider) {
            (Self::D1(state), ProviderConfig::D1(cfg)) => d1::next_request(cfg, state, creds.get(&cfg.token_secret)?),
            (Self::Dgraph(state), ProviderConfig::Dgraph(cfg)) => state.next_request(cfg, creds),
            (Self::Aura(state), ProviderConfig::Aura(cfg)) => state.next_request(cfg, creds),
            (Self::Dxp(state), ProviderConfig::Dxp(cfg)) => state.next_request(cfg, creds),
            _ => Err(mismatch()),
        }
    }

    /// Folds the answer to [`ProviderState::next_request`] into the state.
    pub fn on_response(&mut self, input: &StepInput<'_>, resp: &HttpResponse) -> Result<Progress, StepError> {
        let now = input.now;
        match (self, input.provider) {
            (Self::D1(state), ProviderConfig::D1(cfg)) => d1::on_response(cfg, state, resp, now),
            (Self::Dgraph(state), ProviderConfig::Dgraph(cfg)) => state.on_response(cfg, resp, now),
            (Self::Aura(state), ProviderConfig::Aura(cfg)) => state.on_response(cfg, resp, now),
            (Self::Dxp(state), ProviderConfig::Dxp(cfg)) => state.on_response(cfg, resp, input),
            _ => Err(mismatch()),
        }
    }

    /// The logical export of an Aura source's graph (its member's, in whole-tenant mode), read
    /// at copy time.
    pub fn graph_export(
        &self,
        provider: &ProviderConfig,
        creds: &Credentials,
        now: Timestamp,
    ) -> Result<aura::GraphExport, StepError> {
        match (self, provider) {
            (Self::Aura(state), ProviderConfig::Aura(cfg)) => {
                aura::GraphExport::for_config(&state.member_config(cfg), creds, now)
            }
            _ => Err(StepError::permanent("only Aura sources have a graph to export")),
        }
    }

    /// The Worker secrets this job needs besides its source's ([`ProviderSettings::secret_names`]):
    /// in Aura's whole-tenant mode, its instance's database password.
    pub fn member_secret_names(&self, provider: &ProviderConfig) -> Vec<String> {
        match (self, provider) {
            (Self::Aura(state), ProviderConfig::Aura(cfg)) if state.instance.is_some() => {
                state.member_config(cfg).db_password_secret.iter().cloned().collect()
            }
            _ => Vec::new(),
        }
    }

    /// The D1 query artifact of this export (see [`d1::query`]), read at copy time.
    pub fn query_export(
        &self,
        provider: &ProviderConfig,
        creds: &Credentials,
    ) -> Result<d1::query::QueryExport, StepError> {
        match (self, provider) {
            (Self::D1(state), ProviderConfig::D1(cfg)) => {
                let plan =
                    state.plan.as_ref().ok_or_else(|| StepError::permanent("D1: a query artifact without its plan"))?;
                cfg.query_export(state.database_id(cfg), plan, creds.get(&cfg.token_secret)?)
            }
            _ => Err(StepError::permanent("only D1 sources have a query artifact")),
        }
    }

    /// What the job should say once the export is ready (tables the provider cannot capture).
    pub fn notes(&self) -> Vec<String> {
        match self {
            Self::D1(state) => state.notes(),
            Self::Dgraph(_) | Self::Aura(_) | Self::Dxp(_) => Vec::new(),
        }
    }

    /// The GET that fetches one finished file behind a URL.
    pub fn download_request(
        &self,
        provider: &ProviderConfig,
        url: &str,
        authenticated: bool,
        creds: &Credentials,
    ) -> Result<HttpRequest, StepError> {
        let req = HttpRequest::get(url.to_string());
        if !authenticated {
            return Ok(req);
        }
        match provider {
            ProviderConfig::Dxp(cfg) => dxp::authorize(cfg, req, creds),
            ProviderConfig::D1(cfg) => {
                Ok(req.header("authorization", format!("Bearer {}", creds.get(&cfg.token_secret)?.expose())))
            }
            ProviderConfig::Dgraph(_) | ProviderConfig::Aura(_) => Ok(req),
        }
    }

    /// The provider's references for the manifest (ids, bookmarks, filenames, snapshots).
    pub fn references(&self, provider: &ProviderConfig) -> Value {
        let refs = match (self, provider) {
            (Self::D1(state), ProviderConfig::D1(cfg)) => state.references(cfg),
            (Self::Dgraph(state), ProviderConfig::Dgraph(cfg)) => state.references(cfg),
            (Self::Aura(state), ProviderConfig::Aura(cfg)) => state.references(cfg),
            (Self::Dxp(state), ProviderConfig::Dxp(cfg)) => state.references(cfg),
            _ => Value::Null,
        };
        redact(refs)
    }

    /// The longest gap allowed between two polls of a running export, if the provider cancels
    /// exports that are not polled continually: D1 does, once an export has its bookmark (see
    /// [`d1::MAX_POLL_GAP`]).
    pub fn max_poll_gap(&self) -> Option<Duration> {
        match self {
            Self::D1(state) if state.at_bookmark.is_some() => Some(d1::MAX_POLL_GAP),
            Self::D1(_) | Self::Dgraph(_) | Self::Aura(_) | Self::Dxp(_) => None,
        }
    }

    /// Whether the provider can issue fresh download URLs for the same export when one expires
    /// mid-copy: D1 answers the same bookmark's status with a new signed URL, Dgraph's
    /// `exportStatus` lists new signed URLs for the task. DXP downloads are not signed.
    pub fn can_renew_urls(&self) -> bool {
        match self {
            Self::D1(state) => state.at_bookmark.is_some(),
            Self::Dgraph(state) => state.task_id.is_some(),
            Self::Aura(_) | Self::Dxp(_) => false,
        }
    }

    /// Called when the last request went unanswered (a timeout, a lost connection or a retryable
    /// error status). If that request creates something (D1's first export call, Dgraph's
    /// `export` mutation, Aura's snapshot POST), the provider may have created it anyway: Aura
    /// looks for the snapshot before asking again; D1 and Dgraph offer no way to find an export
    /// without the answer, so the retry may start a second one. Returns what the job should say.
    pub fn create_unanswered(&mut self, input: &StepInput<'_>) -> Option<String> {
        match (self, input.provider) {
            (Self::Aura(state), _) => state.create_unanswered(input.now),
            (Self::D1(state), _) => state.create_unanswered(),
            (Self::Dgraph(state), ProviderConfig::Dgraph(cfg)) => state.create_unanswered(cfg),
            _ => None,
        }
    }

    /// What identifies the provider's artifact, so a source never copies it twice (DXP backup
    /// ids); `None` for providers that produce a fresh export every time.
    pub fn dedupe_key(&self) -> Option<String> {
        match self {
            Self::Dxp(state) => state.backup_id.clone(),
            Self::D1(_) | Self::Dgraph(_) | Self::Aura(_) => None,
        }
    }
}

fn mismatch() -> StepError {
    StepError::permanent("the job's provider state does not match the source's kind (was the source's kind changed?)")
}

/// The warnings a generated artifact's `details` carry (`details.warnings`), for its job.
pub fn artifact_warnings(artifact: &crate::manifest::Artifact) -> Vec<String> {
    artifact
        .details
        .as_ref()
        .and_then(|d| d.get("warnings"))
        .and_then(Value::as_array)
        .map(|list| list.iter().filter_map(Value::as_str).map(str::to_string).collect())
        .unwrap_or_default()
}

/// Removes every `secret_*` field, at any depth, from a JSON value shown to users.
pub fn redact(mut value: Value) -> Value {
    fn walk(v: &mut Value) {
        match v {
            Value::Object(map) => {
                map.retain(|k, _| !k.starts_with("secret_"));
                map.values_mut().for_each(walk);
            }
            Value::Array(items) => items.iter_mut().for_each(walk),
            _ => {}
        }
    }
    walk(&mut value);
    value
}

/// The first GraphQL/Aura-style error messages of a JSON body, joined; `None` when there are none.
pub(crate) fn error_messages(body: &Value) -> Option<String> {
    let list = body.get("errors")?.as_array()?;
    let messages: Vec<String> = list
        .iter()
        .map(|e| match e.get("message").and_then(Value::as_str) {
            Some(m) => m.to_string(),
            None => e.to_string(),
        })
        .collect();
    (!messages.is_empty()).then(|| messages.join("; "))
}

/// `base` with `segments` appended, each percent-encoded, never doubling a trailing slash.
pub(crate) fn url_with_path(base: &Url, segments: &[&str]) -> String {
    let mut url = base.clone();
    if let Ok(mut segs) = url.path_segments_mut() {
        segs.pop_if_empty().extend(segments);
    }
    url.to_string()
}

/// Whether `name` matches `pattern`, where each `*` stands for any text (possibly none) and every
/// other character for itself.
pub(crate) fn name_matches(pattern: &str, name: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = name.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else { return rest.is_empty() };
    for part in middle {
        match rest.find(part) {
            Some(at) => rest = &rest[at + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// The last path segment of a URL (without query), for file names.
pub(crate) fn url_file_name(url: &str) -> String {
    let path = url.split(['?', '#']).next().unwrap_or("");
    path.rsplit('/').next().unwrap_or("").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn redact_removes_secret_fields_at_any_depth() {
        let v = json!({"a": 1, "secret_token": "x", "list": [{"secret_url": "u", "b": 2}], "o": {"secret_jwt": "j"}});
        assert_eq!(redact(v), json!({"a": 1, "list": [{"b": 2}], "o": {}}));
    }

    #[test]
    fn url_file_name_takes_the_last_segment_without_query() {
        assert_eq!(url_file_name("https://s3/x/dgraph.r1.u0101.0000/g01.json.gz?X-Amz=1"), "g01.json.gz");
        assert_eq!(url_file_name("https://s3/"), "");
    }

    #[test]
    fn error_messages_joins_graphql_errors() {
        assert_eq!(error_messages(&json!({"errors": [{"message": "a"}, {"message": "b"}]})), Some("a; b".into()));
        assert_eq!(error_messages(&json!({"errors": []})), None);
        assert_eq!(error_messages(&json!({"data": 1})), None);
    }

    #[test]
    fn database_patterns_match_names_where_a_star_stands_for_any_text() {
        for (pattern, name, expected) in [
            ("*", "anything", true),
            ("*", "", true),
            ("prod-*", "prod-orders", true),
            ("prod-*", "prod-", true),
            ("prod-*", "staging-orders", false),
            ("*-eu", "orders-eu", true),
            ("*-eu", "orders-eu-2", false),
            ("a*b*c", "aXbYc", true),
            ("a*b*c", "abc", true),
            ("a*b*c", "acb", false),
            ("ab*ab", "ab", false),
            ("ab*ab", "abab", true),
        ] {
            assert_eq!(name_matches(pattern, name), expected, "{pattern:?} against {name:?}");
        }
    }
}
