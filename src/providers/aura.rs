//! Neo4j Aura: an on-demand snapshot through the Aura API, and a logical export of the graph
//! through the Neo4j Query API, written by Ferry as gzip-compressed JSON Lines.
//!
//! Quirks the code relies on (see `provider-apis.md` §3):
//! - The token comes from `POST /oauth/token` (no `/v1`) with Basic client credentials and
//!   `grant_type=client_credentials`. It is cached until a minute before `expires_in` runs out,
//!   and fetched again when a call is refused with 401 or 403 (Aura answers an *expired* token
//!   with 403, not 401).
//! - Snapshots go `Pending → InProgress → Completed | Failed`. The Aura API has **no way to
//!   download a snapshot**, so a snapshot is recorded in the manifest (id, time, status), and the
//!   data itself is copied by the logical export.
//! - The Query API (`POST /db/{db}/query/v2`, Basic auth with a *database* user) answers 202 even
//!   when a statement failed: any non-empty `errors` array is a failure, whatever the status.
//!   Element ids are only promised stable within a transaction; the export is exact for a graph
//!   that is not written to during the export.
//! - **Typed JSON.** Plain JSON (the default) turns temporal values into strings, points into WKT
//!   strings and byte arrays into base64 strings (Query API docs, "Result formats"), so a load of
//!   plain JSON writes strings where dates were. The export asks for typed JSON (`Accept` and
//!   `Content-Type: application/vnd.neo4j.query`): every value comes as `{"$type", "_value"}`
//!   (`Integer` and `Float` as strings, so integers beyond 2^53 and NaN or ±Infinity survive;
//!   `Date`, `Time`, `LocalTime`, `OffsetDateTime`, `ZonedDateTime`, `LocalDateTime`, `Duration`,
//!   `Point` as WKT with its SRID, `Base64`, `List`, `Map`). The file keeps each property's typed
//!   value exactly as the Query API wrote it, and the load sends it back typed.
//! - **Paging by internal id ranges.** Nothing indexes element ids, so `elementId(n) > $after
//!   ORDER BY … LIMIT` scans and sorts the whole graph for every page (AllNodesScan, Filter, Top):
//!   an export cost the square of the graph's size. Pages are `id(n) IN range($from, $to)`
//!   instead, which Neo4j plans as a `NodeByIdSeek` (`DirectedRelationshipByIdSeek` for
//!   relationships): one store read per id asked for (Cypher manual, "Execution plan
//!   operators"). The phase first asks `max(id(n))` (one scan per export) and steps through
//!   `[0, max]` `page_size` ids at a time; ids freed by deletions are holes, so a page may hold
//!   fewer elements, never more. Each phase `EXPLAIN`s its page statement once (the Query API
//!   answers `queryPlan`, "Profile queries" page), and a plan that scans (and sorts) becomes a
//!   warning on the job. `id()` is deprecated in Neo4j 5 but still served; element ids stay the
//!   export's ids.
//!
//! # The export format (`graph.jsonl.gz`)
//! One JSON object per line, gzip-compressed:
//! - first `{"type":"header","format":"ferry-neo4j-jsonl","version":2,"values":"typed-json","database":…,"exported_at":…}`;
//! - every node `{"type":"node","id":…,"labels":[…],"properties":{"k":{"$type":…,"_value":…}}}`;
//! - every relationship `{"type":"relationship","id":…,"rel_type":…,"start":…,"end":…,"properties":{…}}`;
//! - last `{"type":"footer","nodes":N,"relationships":M}`: a file without it is incomplete.
//!
//! Ids are the source database's element ids, used only to connect relationships on restore.
//! Version 1 files (written before typed JSON) hold the plain JSON values; they still load, as
//! plain JSON.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use flate2::write::GzEncoder;
use flate2::Compression;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use url::Url;

use crate::error::StepError;
use crate::fields::{self, FieldError};
use crate::http::{status_error, HttpRequest, HttpResponse};
use crate::providers::{url_with_path, Credentials, Download, Origin, Progress, ProviderSettings};
use crate::time::Timestamp;
use crate::transfer::{CopyState, Generator};

pub mod digest;
pub mod drill;

/// Refetch the token this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);
/// Token refetches allowed after a 401/403 before the job fails.
const MAX_AUTH_RETRIES: u32 = 2;
/// The export's file name in the backup folder.
pub const GRAPH_FILE: &str = "graph.jsonl.gz";

/// The export's format version: 2 is typed JSON paged by id ranges; 1 was plain JSON.
pub const FORMAT_VERSION: u64 = 2;
/// The Query API's typed JSON media type (request parameters and results).
pub const TYPED_JSON: &str = "application/vnd.neo4j.query";
/// Node page: the nodes whose internal id is in `[$from, $to]`, read by id seeks.
pub const NODES_QUERY: &str =
    "MATCH (n) WHERE id(n) IN range($from, $to) RETURN elementId(n) AS id, labels(n) AS labels, properties(n) AS props";
/// Relationship page, by id seeks.
pub const RELATIONSHIPS_QUERY: &str = "MATCH ()-[r]->() WHERE id(r) IN range($from, $to) RETURN elementId(r) AS id, type(r) AS type, elementId(startNode(r)) AS start, elementId(endNode(r)) AS end, properties(r) AS props";
/// The highest node id (once per export).
pub const MAX_NODE_ID: &str = "MATCH (n) RETURN max(id(n)) AS max";
/// The highest relationship id.
pub const MAX_RELATIONSHIP_ID: &str = "MATCH ()-[r]->() RETURN max(id(r)) AS max";
/// The node page of an export begun before (format 1): by element id, which scans every page.
pub const LEGACY_NODES_QUERY: &str = "MATCH (n) WHERE elementId(n) > $after RETURN elementId(n) AS id, labels(n) AS labels, properties(n) AS props ORDER BY id LIMIT $limit";
/// The relationship page of such an export.
pub const LEGACY_RELATIONSHIPS_QUERY: &str = "MATCH ()-[r]->() WHERE elementId(r) > $after RETURN elementId(r) AS id, type(r) AS type, elementId(startNode(r)) AS start, elementId(endNode(r)) AS end, properties(r) AS props ORDER BY id LIMIT $limit";

/// An Aura source's settings: its fields of the source table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuraConfig {
    /// The Aura API (default [`AuraConfig::DEFAULT_API_BASE`], filled in by the check).
    #[serde(default, deserialize_with = "fields::opt_http_url")]
    pub api_base: Option<Url>,
    /// The instance (8 hex characters, lower-cased by the check); or, for every instance of a
    /// tenant (whole-tenant mode), `"*"` or a pattern of instance names where `*` stands for any
    /// text (`"prod-*"`).
    #[serde(deserialize_with = "fields::text")]
    pub instance_id: String,
    /// Whole-tenant mode: the tenant (project) whose instances are backed up.
    #[serde(default, deserialize_with = "fields::opt_text", skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Whole-tenant mode: each instance's database password is in the Worker secret of this
    /// prefix followed by the instance id in capitals (`AURA_PASSWORD_` → `AURA_PASSWORD_2F49C2B3`).
    #[serde(default, deserialize_with = "fields::opt_secret_name", skip_serializing_if = "Option::is_none")]
    pub db_password_secret_prefix: Option<String>,
    /// Name of the Worker secret holding the Aura API client id.
    #[serde(deserialize_with = "fields::secret_name")]
    pub client_id_secret: String,
    /// Name of the Worker secret holding the Aura API client secret.
    #[serde(deserialize_with = "fields::secret_name")]
    pub client_secret_secret: String,
    /// What to back up.
    #[serde(default)]
    pub mode: AuraMode,
    /// The instance's Query API (default `https://<instance>.databases.neo4j.io`, filled in by
    /// the check).
    #[serde(default, deserialize_with = "fields::opt_http_url")]
    pub query_api_base: Option<Url>,
    /// The database to export.
    #[serde(default = "neo4j", deserialize_with = "fields::text")]
    pub database: String,
    /// The database user for the Query API.
    #[serde(default = "neo4j", deserialize_with = "fields::text")]
    pub db_user: String,
    /// Name of the Worker secret holding that user's password.
    #[serde(default, deserialize_with = "fields::opt_secret_name")]
    pub db_password_secret: Option<String>,
    /// Nodes or relationships per Query API page.
    #[serde(default = "default_page_size", deserialize_with = "fields::count::<_, 1, 50_000>")]
    pub page_size: u32,
    /// The database restore drills load into (emptied before and after each drill): on the
    /// source's Query API, or with `drill_instance` on that instance's (default `neo4j` there).
    #[serde(default, deserialize_with = "fields::opt_text")]
    pub drill_database: Option<String>,
    /// Drills into a scratch instance created for each drill (see [`drill`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill_scratch: Option<Box<drill::ScratchSettings>>,
    /// Drills into this spare instance.
    #[serde(default, deserialize_with = "fields::opt_text", skip_serializing_if = "Option::is_none")]
    pub drill_instance: Option<String>,
    /// Name of the Worker secret holding the spare instance's database password.
    #[serde(default, deserialize_with = "fields::opt_secret_name", skip_serializing_if = "Option::is_none")]
    pub drill_password_secret: Option<String>,
    /// The spare instance's database user (default `neo4j`).
    #[serde(default, deserialize_with = "fields::opt_text", skip_serializing_if = "Option::is_none")]
    pub drill_db_user: Option<String>,
    /// The spare instance's Query API (default `https://<drill_instance>.databases.neo4j.io`).
    #[serde(default, deserialize_with = "fields::opt_http_url", skip_serializing_if = "Option::is_none")]
    pub drill_query_api_base: Option<Url>,
}

fn neo4j() -> String {
    "neo4j".into()
}

fn default_page_size() -> u32 {
    1000
}

impl AuraConfig {
    /// The public Aura API.
    pub const DEFAULT_API_BASE: &'static str = "https://api.neo4j.io";

    pub(crate) fn api_base(&self) -> Result<&Url, StepError> {
        self.api_base.as_ref().ok_or_else(|| StepError::permanent("Aura: no api_base configured"))
    }

    /// Whole-tenant mode: `instance_id` is `*` or a pattern of names, and each instance of the
    /// tenant it matches is a member backed up by a job of its own.
    pub fn whole_tenant(&self) -> bool {
        self.instance_id.contains('*')
    }

    /// The checks of whole-tenant mode (in place of the one instance's).
    fn check_whole_tenant(&mut self) -> Result<(), FieldError> {
        if self.tenant_id.is_none() {
            return Err(FieldError::new(
                "tenant_id",
                "is required with instance_id = \"*\" or a pattern (whole-tenant mode)",
            ));
        }
        if self.db_password_secret.is_some() {
            return Err(FieldError::new(
                "db_password_secret",
                "names one instance's password: in whole-tenant mode give db_password_secret_prefix",
            ));
        }
        if self.mode != AuraMode::Snapshot && self.db_password_secret_prefix.is_none() {
            return Err(FieldError::new(
                "db_password_secret_prefix",
                "is required for the logical export of every instance (mode \"logical\" or \"both\")",
            ));
        }
        let drills = [self.drill_scratch.is_some(), self.drill_instance.is_some(), self.drill_database.is_some()];
        if drills.into_iter().any(|d| d) {
            return Err(FieldError::new(
                "instance_id",
                "a whole-tenant source takes no drill settings: drill an instance from a source that names it",
            ));
        }
        Ok(())
    }
}

impl ProviderSettings for AuraConfig {
    /// Aura's own CLI polls every 20 s.
    fn default_poll_interval(&self) -> Duration {
        Duration::from_secs(10)
    }

    fn check(&mut self) -> Result<(), FieldError> {
        if self.api_base.is_none() {
            self.api_base = Some(fields::constant_url(Self::DEFAULT_API_BASE, "api_base")?);
        }
        if self.whole_tenant() {
            return self.check_whole_tenant();
        }
        for (field, set) in [
            ("tenant_id", self.tenant_id.is_some()),
            ("db_password_secret_prefix", self.db_password_secret_prefix.is_some()),
        ] {
            if set {
                return Err(FieldError::new(field, "is for whole-tenant mode only (instance_id = \"*\" or a pattern)"));
            }
        }
        if self.instance_id.len() != 8 || !self.instance_id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(FieldError::new("instance_id", "must be the 8 hex characters of an Aura instance id"));
        }
        self.instance_id.make_ascii_lowercase();
        if self.mode != AuraMode::Snapshot && self.db_password_secret.is_none() {
            return Err(FieldError::new(
                "db_password_secret",
                "is required for the logical export (mode \"logical\" or \"both\")",
            ));
        }
        drill::check(self)?;
        if self.query_api_base.is_none() {
            let url = format!("https://{}.databases.neo4j.io", self.instance_id);
            self.query_api_base = Some(
                Url::parse(&url).map_err(|e| FieldError::new("query_api_base", format!("is not a valid URL ({e})")))?,
            );
        }
        Ok(())
    }

    fn secret_names(&self) -> Vec<&str> {
        let mut names = vec![self.client_id_secret.as_str(), self.client_secret_secret.as_str()];
        names.extend(self.db_password_secret.as_deref());
        names.extend(self.drill_password_secret.as_deref());
        names
    }

    fn whole_account(&self) -> bool {
        self.whole_tenant()
    }
}

/// What an Aura backup consists of.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuraMode {
    /// Only an on-demand snapshot (kept by Aura, recorded in the manifest).
    Snapshot,
    /// Only the logical export into R2.
    Logical,
    /// Both (the default).
    #[default]
    Both,
}

/// One instance of the tenant, as `GET /v1/instances` lists it: a member of a whole-tenant source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Its id: the member's name (stable, unique in the tenant; names need not be).
    pub id: String,
    /// Its name.
    pub name: String,
}

/// Progress of one Aura job, persisted with the job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuraState {
    /// Whole-tenant mode: the instance this (child) job backs up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<Instance>,
    /// The cached bearer token (never shown).
    pub secret_access_token: Option<String>,
    /// When that token expires.
    pub token_expires_at: Option<Timestamp>,
    /// Tokens fetched by this job.
    pub token_fetches: u32,
    /// Consecutive 401/403 answers.
    pub auth_retries: u32,
    /// The snapshot's id.
    pub snapshot_id: Option<String>,
    /// Its latest status.
    pub snapshot_status: Option<String>,
    /// When Aura says it was taken.
    pub snapshot_timestamp: Option<String>,
    /// Its profile (`AdHoc`).
    pub snapshot_profile: Option<String>,
    /// Whether Aura would let it be exported from the console.
    pub snapshot_exportable: Option<bool>,
    /// Snapshot status polls answered.
    pub polls: u32,
    /// When a snapshot POST went unanswered (a timeout or an error status): Aura may have taken
    /// the snapshot anyway, so before creating again the job looks for it in the instance's list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub create_unanswered_at: Option<Timestamp>,
    /// How the snapshot was found: `created`, or `found after an unanswered request`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_origin: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Token,
    ListInstances,
    CreateSnapshot,
    FindSnapshot,
    PollSnapshot,
}

/// How far before an unanswered snapshot POST a listed snapshot may be stamped and still be the
/// one that POST started (clocks differ).
const FIND_SKEW: Duration = Duration::from_secs(120);

/// Aura's error text: `errors[].message` (with `reason`) or the `{"error": …}` variant.
pub(crate) fn aura_error(resp: &HttpResponse) -> String {
    let Ok(body) = serde_json::from_slice::<Value>(&resp.body) else { return resp.snippet(200) };
    if let Some(list) = body.get("errors").and_then(Value::as_array) {
        let parts: Vec<String> = list
            .iter()
            .map(|e| {
                let msg = e.get("message").and_then(Value::as_str).unwrap_or("(no message)");
                match e.get("reason").and_then(Value::as_str) {
                    Some(r) => format!("{msg} ({r})"),
                    None => msg.to_string(),
                }
            })
            .collect();
        if !parts.is_empty() {
            return parts.join("; ");
        }
    }
    match body.get("error").and_then(Value::as_str) {
        Some(e) => e.to_string(),
        None => resp.snippet(200),
    }
}

impl AuraState {
    /// The settings this job backs up with: the source's, or in whole-tenant mode the source's
    /// for this child's instance (its id, its Query API unless the source names one for all, and
    /// its password's secret, the prefix and the id in capitals).
    pub fn member_config<'a>(&self, cfg: &'a AuraConfig) -> std::borrow::Cow<'a, AuraConfig> {
        let Some(instance) = &self.instance else { return std::borrow::Cow::Borrowed(cfg) };
        let mut own = cfg.clone();
        own.instance_id = instance.id.clone();
        if own.query_api_base.is_none() {
            own.query_api_base = Url::parse(&format!("https://{}.databases.neo4j.io", instance.id)).ok();
        }
        if let Some(prefix) = &cfg.db_password_secret_prefix {
            own.db_password_secret = Some(format!("{prefix}{}", instance.id.to_ascii_uppercase()));
        }
        std::borrow::Cow::Owned(own)
    }

    /// Whole-tenant mode: the instance this child job backs up, by id.
    pub fn member(&self) -> Option<String> {
        self.instance.as_ref().map(|i| i.id.clone())
    }

    /// Whether this is the discovery job of a whole-tenant source.
    fn discovers(&self, cfg: &AuraConfig) -> bool {
        cfg.whole_tenant() && self.instance.is_none()
    }

    fn stage_for(&self, cfg: &AuraConfig) -> Stage {
        match self.stage() {
            Stage::Token => Stage::Token,
            _ if self.discovers(cfg) => Stage::ListInstances,
            stage => stage,
        }
    }

    fn stage(&self) -> Stage {
        if self.secret_access_token.is_none() {
            Stage::Token
        } else if self.snapshot_id.is_none() && self.create_unanswered_at.is_some() {
            Stage::FindSnapshot
        } else if self.snapshot_id.is_none() {
            Stage::CreateSnapshot
        } else {
            Stage::PollSnapshot
        }
    }

    fn files(cfg: &AuraConfig) -> Vec<Download> {
        match cfg.mode {
            AuraMode::Snapshot => Vec::new(),
            AuraMode::Logical | AuraMode::Both => vec![Download {
                filename: GRAPH_FILE.into(),
                content_type: "application/gzip".into(),
                origin: Origin::Graph,
            }],
        }
    }

    /// Decides without I/O: a logical-only backup goes straight to the copy, and a token about
    /// to expire is dropped so the next request fetches a fresh one.
    pub fn advance(&mut self, cfg: &AuraConfig, now: Timestamp) -> Option<Progress> {
        if cfg.mode == AuraMode::Logical && !self.discovers(cfg) {
            return Some(Progress::Ready(Self::files(cfg)));
        }
        if let Some(expires) = self.token_expires_at {
            if now.plus(TOKEN_MARGIN) >= expires {
                self.secret_access_token = None;
                self.token_expires_at = None;
            }
        }
        None
    }

    /// The next Aura API call.
    pub fn next_request(&self, cfg: &AuraConfig, creds: &Credentials) -> Result<HttpRequest, StepError> {
        let stage = self.stage_for(cfg);
        let cfg = &*self.member_config(cfg);
        match stage {
            Stage::Token => token_request(cfg, creds),
            Stage::ListInstances => {
                let token = self.secret_access_token.clone().unwrap_or_default();
                let mut url = Url::parse(&url_with_path(cfg.api_base()?, &["v1", "instances"]))
                    .map_err(|e| StepError::permanent(format!("the Aura API URL is invalid: {e}")))?;
                url.query_pairs_mut().append_pair("tenantId", cfg.tenant_id.as_deref().unwrap_or_default());
                Ok(HttpRequest::get(url.to_string()).header("authorization", format!("Bearer {token}")))
            }
            Stage::FindSnapshot => {
                let token = self.secret_access_token.clone().unwrap_or_default();
                let mut url =
                    Url::parse(&url_with_path(cfg.api_base()?, &["v1", "instances", &cfg.instance_id, "snapshots"]))
                        .map_err(|e| StepError::permanent(format!("the Aura API URL is invalid: {e}")))?;
                // The list defaults to today (UTC): ask for the day of the unanswered request.
                let day = self.create_unanswered_at.unwrap_or(Timestamp::from_secs(0)).to_datetime().format("%Y-%m-%d");
                url.query_pairs_mut().append_pair("date", &day.to_string());
                Ok(HttpRequest::get(url.to_string()).header("authorization", format!("Bearer {token}")))
            }
            Stage::CreateSnapshot | Stage::PollSnapshot => {
                let token = self.secret_access_token.clone().unwrap_or_default();
                let path: Vec<&str> = match &self.snapshot_id {
                    None => vec!["v1", "instances", &cfg.instance_id, "snapshots"],
                    Some(sid) => vec!["v1", "instances", &cfg.instance_id, "snapshots", sid],
                };
                let url = url_with_path(cfg.api_base()?, &path);
                let req = match self.snapshot_id {
                    None => HttpRequest { method: crate::http::Method::Post, url, headers: Vec::new(), body: None },
                    Some(_) => HttpRequest::get(url),
                };
                Ok(req.header("authorization", format!("Bearer {token}")).header("content-type", "application/json"))
            }
        }
    }

    /// Folds one answer in.
    pub fn on_response(
        &mut self,
        cfg: &AuraConfig,
        resp: &HttpResponse,
        now: Timestamp,
    ) -> Result<Progress, StepError> {
        let stage = self.stage_for(cfg);
        let cfg = &*self.member_config(cfg);
        if stage == Stage::Token {
            return self.on_token(resp, now);
        }
        if resp.status == 401 || resp.status == 403 {
            if self.auth_retries < MAX_AUTH_RETRIES {
                self.auth_retries += 1;
                self.secret_access_token = None;
                self.token_expires_at = None;
                return Ok(Progress::Pending { poll_after: Some(Duration::ZERO) });
            }
            return Err(StepError::permanent(format!(
                "the Aura API refused the token (HTTP {}): {}",
                resp.status,
                aura_error(resp)
            )));
        }
        if !(200..300).contains(&resp.status) {
            return Err(status_error(
                resp,
                now,
                format!("the Aura API answered HTTP {}: {}", resp.status, aura_error(resp)),
            ));
        }
        self.auth_retries = 0;
        if stage == Stage::FindSnapshot {
            return self.on_snapshot_list(resp);
        }
        if stage == Stage::ListInstances {
            return self.on_instance_list(cfg, resp);
        }
        let body: Value = serde_json::from_slice(&resp.body).map_err(|_| {
            StepError::permanent(format!(
                "Aura API: received a malformed response (HTTP {}): {}",
                resp.status,
                resp.snippet(200)
            ))
        })?;
        let data = body.get("data").filter(|d| d.is_object()).ok_or_else(|| malformed("no data"))?;
        match stage {
            Stage::Token | Stage::FindSnapshot | Stage::ListInstances => unreachable_stage(),
            Stage::CreateSnapshot => {
                let sid = data.get("snapshot_id").and_then(Value::as_str).ok_or_else(|| malformed("no snapshot_id"))?;
                self.snapshot_id = Some(sid.to_string());
                self.snapshot_origin = Some("created".into());
                self.snapshot_status = Some("Pending".into());
                Ok(Progress::Pending { poll_after: None })
            }
            Stage::PollSnapshot => {
                self.polls += 1;
                let status = data.get("status").and_then(Value::as_str).unwrap_or("Unknown").to_string();
                self.snapshot_status = Some(status.clone());
                self.snapshot_timestamp = data.get("timestamp").and_then(Value::as_str).map(str::to_string);
                self.snapshot_profile = data.get("profile").and_then(Value::as_str).map(str::to_string);
                self.snapshot_exportable = data.get("exportable").and_then(Value::as_bool);
                match status.as_str() {
                    "Completed" => Ok(Progress::Ready(Self::files(cfg))),
                    "Failed" => Ok(Progress::Failed(format!(
                        "Aura snapshot {} of instance {} failed",
                        self.snapshot_id.as_deref().unwrap_or("?"),
                        cfg.instance_id
                    ))),
                    _ => Ok(Progress::Pending { poll_after: None }),
                }
            }
        }
    }

    /// The tenant's instances: one child job per instance the pattern selects (by name), each
    /// handed this job's token so that it need not fetch one.
    fn on_instance_list(&mut self, cfg: &AuraConfig, resp: &HttpResponse) -> Result<Progress, StepError> {
        let body: Value = serde_json::from_slice(&resp.body).map_err(|_| malformed("instance list is not JSON"))?;
        let list = body.get("data").and_then(Value::as_array).ok_or_else(|| malformed("instance list has no data"))?;
        let mut children = Vec::new();
        for item in list {
            let Some(id) = item.get("id").and_then(Value::as_str) else {
                return Err(malformed("a listed instance without id"));
            };
            let name = item.get("name").and_then(Value::as_str).unwrap_or_default();
            let tenant = item.get("tenant_id").and_then(Value::as_str);
            // Ferry's own drill instances (`ferry-drill-<job>`) live for one drill: never a member.
            let scratch = name.starts_with(drill::SCRATCH_PREFIX);
            if scratch
                || tenant.is_some_and(|t| Some(t) != cfg.tenant_id.as_deref())
                || !crate::providers::name_matches(&cfg.instance_id, name)
            {
                continue;
            }
            children.push(crate::providers::ProviderState::Aura(AuraState {
                instance: Some(Instance { id: id.to_ascii_lowercase(), name: name.to_string() }),
                secret_access_token: self.secret_access_token.clone(),
                token_expires_at: self.token_expires_at,
                ..AuraState::default()
            }));
        }
        if children.is_empty() {
            return Ok(Progress::Skip(format!(
                "no instance of tenant {} matches {:?}",
                cfg.tenant_id.as_deref().unwrap_or("?"),
                cfg.instance_id
            )));
        }
        Ok(Progress::Spawn(children))
    }

    /// Records that the snapshot POST got no usable answer, so the next step looks for the
    /// snapshot it may have started instead of taking another. Returns what the job should say.
    pub fn create_unanswered(&mut self, now: Timestamp) -> Option<String> {
        if self.snapshot_id.is_some() || self.stage() != Stage::CreateSnapshot {
            return None;
        }
        self.create_unanswered_at = Some(now);
        Some(
            "a snapshot request got no answer; Aura may have taken it, so the instance's snapshots are checked \
              before another is requested"
                .into(),
        )
    }

    /// The instance's snapshot list, after an unanswered POST: adopt an `AdHoc` snapshot taken
    /// since then (the newest), or clear the mark so the next step requests one.
    fn on_snapshot_list(&mut self, resp: &HttpResponse) -> Result<Progress, StepError> {
        let body: Value = serde_json::from_slice(&resp.body).map_err(|_| malformed("snapshot list is not JSON"))?;
        let list = body.get("data").and_then(Value::as_array).ok_or_else(|| malformed("snapshot list has no data"))?;
        let since = self.create_unanswered_at.map(|t| t.minus(FIND_SKEW));
        let taken = |s: &&Value| -> Option<Timestamp> {
            let profile = s.get("profile").and_then(Value::as_str)?;
            let at = Timestamp::parse_rfc3339(s.get("timestamp").and_then(Value::as_str)?)?;
            (profile.eq_ignore_ascii_case("adhoc") && since.is_some_and(|since| at >= since)).then_some(at)
        };
        let found = list.iter().filter(|s| taken(s).is_some()).max_by_key(|s| taken(s));
        self.create_unanswered_at = None;
        if let Some(snapshot) = found {
            if let Some(id) = snapshot.get("snapshot_id").and_then(Value::as_str) {
                self.snapshot_id = Some(id.to_string());
                self.snapshot_status = snapshot.get("status").and_then(Value::as_str).map(str::to_string);
                self.snapshot_origin = Some("found after an unanswered request".into());
            }
        }
        Ok(Progress::Again)
    }

    fn on_token(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<Progress, StepError> {
        let (token, expires_at) = token_answer(resp, now)?;
        self.secret_access_token = Some(token);
        self.token_expires_at = Some(expires_at);
        self.token_fetches += 1;
        Ok(Progress::Pending { poll_after: Some(Duration::ZERO) })
    }

    /// What the manifest records.
    pub fn references(&self, cfg: &AuraConfig) -> Value {
        let snapshot = self.snapshot_id.as_ref().map(|id| {
            json!({
                "snapshot_id": id,
                "status": self.snapshot_status,
                "timestamp": self.snapshot_timestamp,
                "profile": self.snapshot_profile,
                "exportable": self.snapshot_exportable,
                "origin": self.snapshot_origin,
            })
        });
        let cfg = &*self.member_config(cfg);
        json!({
            "instance_id": cfg.instance_id,
            "instance": self.instance,
            "mode": cfg.mode,
            "database": cfg.database,
            "snapshot": snapshot,
        })
    }
}

/// The member a manifest's references ([`AuraState::references`]) name: the instance's id, in
/// whole-tenant mode; `None` for a source of one instance.
pub fn member_of(references: &Value) -> Option<String> {
    references.pointer("/instance/id").and_then(Value::as_str).filter(|n| !n.is_empty()).map(str::to_string)
}

/// `POST /oauth/token` with the source's client credentials (Basic) and a form body.
pub(crate) fn token_request(cfg: &AuraConfig, creds: &Credentials) -> Result<HttpRequest, StepError> {
    let id = creds.get(&cfg.client_id_secret)?.expose();
    let secret = creds.get(&cfg.client_secret_secret)?.expose();
    Ok(HttpRequest {
        method: crate::http::Method::Post,
        url: url_with_path(cfg.api_base()?, &["oauth", "token"]),
        headers: vec![
            ("authorization".into(), format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))),
            ("content-type".into(), "application/x-www-form-urlencoded".into()),
        ],
        body: Some(b"grant_type=client_credentials".to_vec()),
    })
}

/// The token endpoint's answer: the access token and when it expires, or the error in Aura's
/// words (401: the client credentials are wrong, for good; 429 and 5xx: transient).
pub(crate) fn token_answer(resp: &HttpResponse, now: Timestamp) -> Result<(String, Timestamp), StepError> {
    match resp.status {
        200..=299 => {}
        401 => {
            return Err(StepError::permanent(format!(
                "the Aura API refused the client credentials (HTTP 401): {}",
                aura_error(resp)
            )))
        }
        429 | 500..=599 => {
            return Err(status_error(
                resp,
                now,
                format!("the Aura token endpoint answered HTTP {}: {}", resp.status, aura_error(resp)),
            ))
        }
        s => {
            return Err(StepError::permanent(format!(
                "the Aura token endpoint answered HTTP {s}: {}",
                aura_error(resp)
            )))
        }
    }
    let body: Value = serde_json::from_slice(&resp.body).map_err(|_| malformed("token answer is not JSON"))?;
    let token = body.get("access_token").and_then(Value::as_str).ok_or_else(|| malformed("no access_token"))?;
    let lifetime = body.get("expires_in").and_then(Value::as_u64).unwrap_or(3600);
    Ok((token.to_string(), now.plus(Duration::from_secs(lifetime))))
}

/// Whether a token expiring at `expires` should be fetched again before a call at `now`.
pub(crate) fn token_stale(expires: Option<Timestamp>, now: Timestamp) -> bool {
    expires.is_none_or(|at| now.plus(TOKEN_MARGIN) >= at)
}

fn unreachable_stage() -> Result<Progress, StepError> {
    Err(StepError::permanent("internal: token answers are handled before this point"))
}

fn malformed(what: &str) -> StepError {
    StepError::permanent(format!("Aura API: received a malformed response ({what})"))
}

/// The Query API URL of `database` on the source's host and the `Authorization` header of the
/// source's database user (whose password is in the Worker secret `password_secret`).
pub(crate) fn query_endpoint(
    cfg: &AuraConfig,
    creds: &Credentials,
    database: &str,
    password_secret: &str,
) -> Result<(String, String), StepError> {
    let pair = format!("{}:{}", cfg.db_user, creds.get(password_secret)?.expose());
    let base = cfg.query_api_base.as_ref().ok_or_else(|| StepError::permanent("Aura: no query_api_base configured"))?;
    Ok((url_with_path(base, &["db", database, "query", "v2"]), format!("Basic {}", STANDARD.encode(pair))))
}

/// What a logical export reads: where the Query API is and how to log in. Built at copy time.
#[derive(Clone, PartialEq, Eq)]
pub struct GraphExport {
    url: String,
    authorization: String,
    database: String,
    page_size: u32,
    exported_at: Timestamp,
}

impl fmt::Debug for GraphExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GraphExport").field("url", &self.url).field("database", &self.database).finish_non_exhaustive()
    }
}

impl GraphExport {
    /// The export of an Aura source's database.
    pub fn for_config(cfg: &AuraConfig, creds: &Credentials, now: Timestamp) -> Result<Self, StepError> {
        let secret = cfg
            .db_password_secret
            .as_deref()
            .ok_or_else(|| StepError::permanent("db_password_secret is required for the logical export"))?;
        let (url, authorization) = query_endpoint(cfg, creds, &cfg.database, secret)?;
        Ok(Self { url, authorization, database: cfg.database.clone(), page_size: cfg.page_size, exported_at: now })
    }

    /// Starts writing the file.
    pub fn start(&self) -> GraphWriter {
        self.resume(None)
    }

    /// Goes on from where an earlier slice stopped, in a new gzip member (a concatenation of
    /// gzip members is one valid gzip file); the header is written only at the very start. An
    /// export begun by element id paging (its cursor has no id range) goes on that way, in plain
    /// JSON, so its file stays one format.
    pub fn resume(&self, cursor: Option<&GraphCursor>) -> GraphWriter {
        let cursor = cursor.cloned().unwrap_or_default();
        let phase = match cursor.phase.as_str() {
            "relationships" => GraphPhase::Relationships,
            "done" => GraphPhase::Done,
            _ => GraphPhase::Nodes,
        };
        let mut spec = self.clone();
        if let Some(lowered) = cursor.page_size {
            spec.page_size = lowered.clamp(1, self.page_size);
        }
        let ids = if cursor.started { cursor.id_range.clone() } else { Some(IdRange::default()) };
        let typed = ids.is_some();
        let mut writer = GraphWriter {
            spec,
            phase,
            after: cursor.after.clone(),
            ids,
            nodes: cursor.nodes,
            relationships: cursor.relationships,
            labels: cursor.labels.clone(),
            types: cursor.types.clone(),
            // Kept from the start of a typed export only: one begun before they were kept has
            // none, rather than digests of part of its graph.
            values: match (cursor.started, &cursor.values) {
                (false, _) => typed.then(digest::ValueDigests::default),
                (true, Some(v)) => serde_json::from_value(v.clone()).ok(),
                (true, None) => None,
            },
            warnings: cursor.warnings.clone(),
            encoder: GzEncoder::new(Vec::new(), Compression::default()),
            error: None,
        };
        if !cursor.started {
            writer.line(&json!({
                "type": "header", "format": "ferry-neo4j-jsonl", "version": FORMAT_VERSION, "values": "typed-json",
                "database": self.database, "exported_at": self.exported_at,
            }));
        }
        writer
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GraphPhase {
    Nodes,
    Relationships,
    Done,
}

/// What the next request of a phase paged by id ranges asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ask {
    /// `EXPLAIN` of the page statement.
    Plan,
    /// `max(id(x))`.
    Max,
    /// The page `[from, to]`.
    Page(u64, u64),
}

/// The running export: pages through nodes then relationships and gzips JSON Lines as it goes,
/// so memory holds one page and the compressor's window, however large the graph.
pub struct GraphWriter {
    spec: GraphExport,
    phase: GraphPhase,
    after: String,
    /// `None`: an export begun by element id paging (format 1).
    ids: Option<IdRange>,
    nodes: u64,
    relationships: u64,
    labels: BTreeMap<String, u64>,
    types: BTreeMap<String, u64>,
    /// Digests of the typed values written (typed exports only; `None` on an export begun before
    /// they were kept, or in plain JSON).
    values: Option<digest::ValueDigests>,
    warnings: Vec<String>,
    encoder: GzEncoder<Vec<u8>>,
    error: Option<String>,
}

/// A Query API request in typed JSON both ways (`Content-Type` and `Accept`), as the docs'
/// "Result formats" page has it; every parameter must then be typed.
pub fn typed_query(url: &str, authorization: &str, statement: &str, parameters: Value) -> HttpRequest {
    HttpRequest {
        method: crate::http::Method::Post,
        url: url.to_string(),
        headers: vec![
            ("content-type".into(), TYPED_JSON.into()),
            ("accept".into(), TYPED_JSON.into()),
            ("authorization".into(), authorization.to_string()),
        ],
        body: Some(json!({ "statement": statement, "parameters": parameters }).to_string().into_bytes()),
    }
}

/// A typed-JSON Integer (its value is a string).
pub fn typed_integer(n: u64) -> Value {
    json!({ "$type": "Integer", "_value": n.to_string() })
}

/// The text of a typed-JSON String.
pub(crate) fn typed_text(v: &Value) -> Option<&str> {
    (v.get("$type")? == "String").then(|| v.get("_value")?.as_str())?
}

/// The items of a typed-JSON List.
pub(crate) fn typed_list(v: &Value) -> Option<&Vec<Value>> {
    (v.get("$type")? == "List").then(|| v.get("_value")?.as_array())?
}

/// A typed-JSON Integer that is a whole number from 0 up, or Null.
pub(crate) fn typed_count(v: &Value) -> Result<Option<u64>, StepError> {
    match v.get("$type").and_then(Value::as_str) {
        Some("Null") => Ok(None),
        Some("Integer") => v
            .get("_value")
            .and_then(Value::as_str)
            .and_then(|t| t.parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| query_malformed("an id that is not a whole number")),
        _ => Err(query_malformed("max(id) is neither Integer nor Null")),
    }
}

/// A typed-JSON Map whose every entry is itself typed: the properties, kept exactly as sent.
pub(crate) fn typed_properties(v: Option<&Value>) -> Result<Value, StepError> {
    let Some(v) = v else { return Ok(json!({})) };
    let map = (v.get("$type").and_then(Value::as_str) == Some("Map"))
        .then(|| v.get("_value").and_then(Value::as_object))
        .flatten()
        .ok_or_else(|| query_malformed("properties that are not a typed Map"))?;
    if map.values().any(|p| p.get("$type").and_then(Value::as_str).is_none() || p.get("_value").is_none()) {
        return Err(query_malformed("a property without $type and _value"));
    }
    Ok(Value::Object(map.clone()))
}

/// Operators that read a whole store or index, and those that sort.
fn is_scan(op: &str) -> bool {
    op.contains("Scan")
}

fn is_sort(op: &str) -> bool {
    op.contains("Sort") || op.ends_with("Top")
}

/// The warning an `EXPLAIN` answer calls for: a page statement planned as a full scan (with or
/// without a sort) reads the whole graph for every page. `None` when it seeks.
pub fn plan_warning(body: &Value, what: &str) -> Option<String> {
    let mut ops = Vec::new();
    let mut stack: Vec<(&Value, usize)> = body.get("queryPlan").map(|p| (p, 0)).into_iter().collect();
    while let Some((node, depth)) = stack.pop() {
        if let Some(op) = node.get("operatorType").and_then(Value::as_str) {
            ops.push(op.split('@').next().unwrap_or(op).to_string());
        }
        if depth < 64 {
            for child in node.get("children").and_then(Value::as_array).into_iter().flatten() {
                stack.push((child, depth + 1));
            }
        }
    }
    let scan = ops.iter().find(|op| is_scan(op))?;
    let sort = ops.iter().find(|op| is_sort(op)).map(|s| format!(" and a {s}")).unwrap_or_default();
    Some(format!(
        "the {what} page statement is planned with a {scan}{sort} (EXPLAIN: {}): every page reads the whole graph, \
         so this export takes time growing with the square of the graph's size",
        ops.join(" <- ")
    ))
}

impl GraphWriter {
    fn line(&mut self, value: &Value) {
        let mut text = value.to_string();
        text.push('\n');
        if let Err(e) = self.encoder.write_all(text.as_bytes()) {
            self.error = Some(e.to_string());
        }
    }

    fn ask(&self, ids: &IdRange) -> Ask {
        if !ids.explained {
            Ask::Plan
        } else if let Some(max) = ids.max {
            let last = ids.next.saturating_add(u64::from(self.spec.page_size) - 1).min(max);
            Ask::Page(ids.next, last)
        } else {
            Ask::Max
        }
    }

    /// The next query, or `None` when every page has been read.
    pub fn next_request(&self) -> Option<HttpRequest> {
        let (page, max) = match self.phase {
            GraphPhase::Nodes => (NODES_QUERY, MAX_NODE_ID),
            GraphPhase::Relationships => (RELATIONSHIPS_QUERY, MAX_RELATIONSHIP_ID),
            GraphPhase::Done => return None,
        };
        let Some(ids) = &self.ids else { return Some(self.legacy_request()) };
        let (statement, parameters) = match self.ask(ids) {
            Ask::Plan => (
                format!("EXPLAIN {page}"),
                json!({ "from": typed_integer(0), "to": typed_integer(u64::from(self.spec.page_size) - 1) }),
            ),
            Ask::Max => (max.to_string(), json!({})),
            Ask::Page(from, to) => (page.to_string(), json!({ "from": typed_integer(from), "to": typed_integer(to) })),
        };
        Some(typed_query(&self.spec.url, &self.spec.authorization, &statement, parameters))
    }

    fn legacy_request(&self) -> HttpRequest {
        let statement = match self.phase {
            GraphPhase::Relationships => LEGACY_RELATIONSHIPS_QUERY,
            _ => LEGACY_NODES_QUERY,
        };
        let body =
            json!({ "statement": statement, "parameters": { "after": self.after, "limit": self.spec.page_size } });
        HttpRequest::post_json(self.spec.url.clone(), &body)
            .header("accept", "application/json")
            .header("authorization", self.spec.authorization.clone())
    }

    fn next_phase(&mut self) {
        self.phase = match self.phase {
            GraphPhase::Nodes => GraphPhase::Relationships,
            GraphPhase::Relationships | GraphPhase::Done => GraphPhase::Done,
        };
        self.after.clear();
        if self.ids.is_some() {
            self.ids = Some(IdRange::default());
        }
    }

    /// Folds in one answer: a plan, the highest id, or a page whose rows are written.
    pub fn on_response(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<(), StepError> {
        let Some(ids) = self.ids.clone() else { return self.on_legacy_page(resp, now) };
        let body = query_body(resp, now)?;
        match self.ask(&ids) {
            Ask::Plan => {
                let what = if self.phase == GraphPhase::Nodes { "node" } else { "relationship" };
                if let Some(warning) = plan_warning(&body, what) {
                    if !self.warnings.contains(&warning) {
                        self.warnings.push(warning);
                    }
                }
                self.ids = Some(IdRange { explained: true, ..ids });
                Ok(())
            }
            Ask::Max => {
                let rows = rows_of(&body)?;
                let max = match rows.first().and_then(|r| r.get("max")) {
                    Some(v) => typed_count(v)?,
                    None => None,
                };
                match max {
                    Some(max) => self.ids = Some(IdRange { max: Some(max), ..ids }),
                    None => self.next_phase(),
                }
                Ok(())
            }
            Ask::Page(from, to) => {
                for row in rows_of(&body)? {
                    self.typed_row(&row)?;
                }
                let next = to.saturating_add(1);
                if ids.max.is_some_and(|max| next > max) || to < from {
                    self.next_phase();
                } else {
                    self.ids = Some(IdRange { next, ..ids });
                }
                self.take_error()
            }
        }
    }

    fn take_error(&mut self) -> Result<(), StepError> {
        match self.error.take() {
            Some(e) => Err(StepError::permanent(format!("compressing the graph export failed: {e}"))),
            None => Ok(()),
        }
    }

    /// One row of a typed page: the element with its typed properties.
    fn typed_row(&mut self, row: &serde_json::Map<String, Value>) -> Result<(), StepError> {
        let text = |field: &str| -> Result<String, StepError> {
            row.get(field)
                .and_then(typed_text)
                .map(str::to_string)
                .ok_or_else(|| query_malformed(&format!("a row whose {field} is not a String")))
        };
        let id = text("id")?;
        let props = typed_properties(row.get("props"))?;
        match self.phase {
            GraphPhase::Nodes => {
                let labels: Vec<String> = row
                    .get("labels")
                    .and_then(typed_list)
                    .ok_or_else(|| query_malformed("a row whose labels are not a List"))?
                    .iter()
                    .map(|l| {
                        typed_text(l).map(str::to_string).ok_or_else(|| query_malformed("a label that is not a String"))
                    })
                    .collect::<Result<_, _>>()?;
                for label in &labels {
                    *self.labels.entry(label.clone()).or_default() += 1;
                }
                if let (Some(values), Value::Object(map)) = (self.values.as_mut(), &props) {
                    values.add_node(&labels, map);
                }
                self.line(&json!({ "type": "node", "id": id, "labels": labels, "properties": props }));
                self.nodes += 1;
            }
            GraphPhase::Relationships => {
                let rel_type = text("type")?;
                *self.types.entry(rel_type.clone()).or_default() += 1;
                if let (Some(values), Value::Object(map)) = (self.values.as_mut(), &props) {
                    values.add_relationship(&rel_type, map);
                }
                self.line(&json!({
                    "type": "relationship", "id": id, "rel_type": rel_type,
                    "start": text("start")?, "end": text("end")?, "properties": props,
                }));
                self.relationships += 1;
            }
            GraphPhase::Done => {}
        }
        Ok(())
    }

    /// A page of an export begun by element id paging, in plain JSON.
    fn on_legacy_page(&mut self, resp: &HttpResponse, now: Timestamp) -> Result<(), StepError> {
        let rows = query_rows(resp, now)?;
        let count = rows.len();
        for row in rows {
            let id =
                row.get("id").and_then(Value::as_str).ok_or_else(|| query_malformed("a row without id"))?.to_string();
            let props = row.get("props").cloned().unwrap_or_else(|| json!({}));
            match self.phase {
                GraphPhase::Nodes => {
                    let labels = row.get("labels").cloned().unwrap_or_else(|| json!([]));
                    for label in labels.as_array().into_iter().flatten().filter_map(Value::as_str) {
                        *self.labels.entry(label.to_string()).or_default() += 1;
                    }
                    self.line(&json!({ "type": "node", "id": id, "labels": labels, "properties": props }));
                    self.nodes += 1;
                }
                GraphPhase::Relationships => {
                    if let Some(t) = row.get("type").and_then(Value::as_str) {
                        *self.types.entry(t.to_string()).or_default() += 1;
                    }
                    self.line(&json!({
                        "type": "relationship", "id": id, "rel_type": row.get("type"),
                        "start": row.get("start"), "end": row.get("end"), "properties": props,
                    }));
                    self.relationships += 1;
                }
                GraphPhase::Done => {}
            }
            self.after = id;
        }
        if count < self.spec.page_size as usize {
            self.next_phase();
        }
        self.take_error()
    }

    /// What the export warns about so far (the job lists it).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Compressed bytes produced so far (drained).
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(self.encoder.get_mut())
    }

    /// Where the export stands, for the next slice.
    pub fn cursor(&self) -> GraphCursor {
        let phase = match self.phase {
            GraphPhase::Nodes => "nodes",
            GraphPhase::Relationships => "relationships",
            GraphPhase::Done => "done",
        };
        GraphCursor {
            phase: phase.into(),
            after: self.after.clone(),
            nodes: self.nodes,
            relationships: self.relationships,
            started: true,
            page_size: Some(self.spec.page_size),
            labels: self.labels.clone(),
            types: self.types.clone(),
            id_range: self.ids.clone(),
            warnings: self.warnings.clone(),
            values: self.values.as_ref().and_then(|v| serde_json::to_value(v).ok()),
        }
    }

    /// A page was over the Query API response cap: halve the page size and ask again, down to one
    /// element a page. Returns the new size; fails naming `page_size` when one element is too big.
    pub fn shrink_page(&mut self, why: &str) -> Result<u32, StepError> {
        if self.spec.page_size <= 1 {
            return Err(StepError::permanent(format!(
                "a single graph element is over the Query API's response cap ({why}); page_size cannot help"
            )));
        }
        self.spec.page_size = (self.spec.page_size / 2).max(1);
        Ok(self.spec.page_size)
    }

    /// Ends this slice's gzip member without the footer: its last bytes and where to go on.
    pub fn end_member(self) -> Result<(Vec<u8>, GraphCursor), StepError> {
        let cursor = self.cursor();
        if let Some(e) = self.error {
            return Err(StepError::permanent(format!("compressing the graph export failed: {e}")));
        }
        let rest = self
            .encoder
            .finish()
            .map_err(|e| StepError::permanent(format!("compressing the graph export failed: {e}")))?;
        Ok((rest, cursor))
    }

    /// Writes the footer and ends the gzip stream: the last bytes and the counts (the artifact's
    /// `details`: totals, nodes per label, relationships per type).
    pub fn finish(mut self) -> Result<(Vec<u8>, Value), StepError> {
        let (nodes, relationships) = (self.nodes, self.relationships);
        self.line(&json!({ "type": "footer", "nodes": nodes, "relationships": relationships }));
        if let Some(e) = self.error.take() {
            return Err(StepError::permanent(format!("compressing the graph export failed: {e}")));
        }
        let rest = self
            .encoder
            .finish()
            .map_err(|e| StepError::permanent(format!("compressing the graph export failed: {e}")))?;
        let mut details = json!({
            "format": "ferry-neo4j-jsonl", "nodes": nodes, "relationships": relationships,
            "labels": self.labels, "types": self.types,
        });
        if let Some(values) = &self.values {
            details["values"] = serde_json::to_value(values).unwrap_or(Value::Null);
        }
        Ok((rest, details))
    }
}

/// A Query API answer's body, once its `errors` (whatever the status) and status are checked.
pub fn query_body(resp: &HttpResponse, now: Timestamp) -> Result<Value, StepError> {
    let body: Option<Value> = serde_json::from_slice(&resp.body).ok();
    if let Some(errors) =
        body.as_ref().and_then(|b| b.get("errors")).and_then(Value::as_array).filter(|e| !e.is_empty())
    {
        let first = &errors[0];
        let code = first.get("code").and_then(Value::as_str).unwrap_or("");
        let message = first.get("message").and_then(Value::as_str).unwrap_or("(no message)");
        let text = format!("Neo4j Query API error {code}: {message}");
        return Err(if resp.status == 401 || code.starts_with("Neo.ClientError.Security") {
            StepError::permanent(format!("{text} (check db_user and db_password_secret)"))
        } else if code.starts_with("Neo.TransientError") || resp.status >= 500 || resp.status == 429 {
            StepError::Transient { message: text, retry_after: resp.retry_after(now) }
        } else {
            StepError::permanent(text)
        });
    }
    if !(200..300).contains(&resp.status) {
        return Err(status_error(
            resp,
            now,
            format!("the Neo4j Query API answered HTTP {}: {}", resp.status, resp.snippet(200)),
        ));
    }
    body.ok_or_else(|| query_malformed(&resp.snippet(200)))
}

/// The rows of an answer's body as objects keyed by field name.
fn rows_of(body: &Value) -> Result<Vec<serde_json::Map<String, Value>>, StepError> {
    let fields: Vec<String> = body
        .pointer("/data/fields")
        .and_then(Value::as_array)
        .ok_or_else(|| query_malformed("no data.fields"))?
        .iter()
        .filter_map(|f| f.as_str().map(str::to_string))
        .collect();
    let values =
        body.pointer("/data/values").and_then(Value::as_array).ok_or_else(|| query_malformed("no data.values"))?;
    Ok(values
        .iter()
        .filter_map(Value::as_array)
        .map(|row| fields.iter().cloned().zip(row.iter().cloned()).collect())
        .collect())
}

/// The rows of a Query API answer as objects keyed by field name.
pub fn query_rows(resp: &HttpResponse, now: Timestamp) -> Result<Vec<serde_json::Map<String, Value>>, StepError> {
    rows_of(&query_body(resp, now)?)
}

fn query_malformed(what: &str) -> StepError {
    StepError::permanent(format!("Neo4j Query API: received a malformed response ({what})"))
}

/// Where a generated artifact (the Aura graph export) stopped between slices.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphCursor {
    /// `nodes`, `relationships` or `done`.
    pub phase: String,
    /// The last element id read in this phase.
    pub after: String,
    /// Nodes written so far.
    pub nodes: u64,
    /// Relationships written so far.
    pub relationships: u64,
    /// Whether the header line has been written.
    pub started: bool,
    /// The page size in use, when it was lowered because a page was over the response cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u32>,
    /// Nodes written so far per label (the manifest records them; drills compare with them).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub labels: std::collections::BTreeMap<String, u64>,
    /// Relationships written so far per type.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub types: std::collections::BTreeMap<String, u64>,
    /// Where the phase's paging by internal id ranges stands (exports in typed JSON, format 2).
    /// `None` on an export begun by element id paging (format 1), which goes on that way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id_range: Option<IdRange>,
    /// Warnings for the job (a paging statement planned as a scan); the job lists them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The digests of the typed values written so far, per label and type
    /// ([`digest::ValueDigests`], which drills compare with the restored graph).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub values: Option<serde_json::Value>,
}

/// Paging one phase of a graph export by internal id ranges: `id(x) IN range(next, next + size - 1)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdRange {
    /// The first id of the next page.
    pub next: u64,
    /// The highest id in the phase, once asked (`max(id(x))`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<u64>,
    /// Whether the phase's page statement was `EXPLAIN`ed.
    #[serde(default)]
    pub explained: bool,
}

impl Generator for GraphWriter {
    fn next_request(&self) -> Option<HttpRequest> {
        Self::next_request(self)
    }
    fn on_response(&mut self, resp: &crate::http::HttpResponse, now: Timestamp) -> Result<(), StepError> {
        Self::on_response(self, resp, now)
    }
    fn take_output(&mut self) -> Vec<u8> {
        Self::take_output(self)
    }
    fn shrink_page(&mut self, why: &str) -> Result<u32, StepError> {
        Self::shrink_page(self, why)
    }
    fn end_slice(self: Box<Self>, state: &mut CopyState) -> Result<Vec<u8>, StepError> {
        let (rest, cursor) = self.end_member()?;
        state.warnings = cursor.warnings.clone();
        state.set_cursor(&cursor)?;
        Ok(rest)
    }
    fn finish(self: Box<Self>) -> Result<(Vec<u8>, serde_json::Value), StepError> {
        Self::finish(*self)
    }
    fn record_end(&self, state: &mut CopyState) {
        state.warnings = self.cursor().warnings;
    }
}

#[cfg(test)]
mod tests;
