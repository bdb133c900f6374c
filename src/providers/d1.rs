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
//! - A status other than `complete` and `error` is polled again, as wrangler does
//!   (`workers-sdk` `packages/wrangler/src/d1/export.ts`), until `export_timeout_minutes`.
//! - While an export of the database runs (another client's, or ours whose first answer was
//!   lost), D1 refuses a new one ("Cannot start a new export until that completes or times out")
//!   and every query ("Currently processing a long-running export"), `workers-sdk#9578`, `#9519`:
//!   Ferry says so and tries again `busy_retry_seconds` later, never in a tight loop.
//! - Before exporting, the schema is read through the query API: virtual tables (which D1 refuses
//!   to export) and integers beyond 2^53 (which its export rounds) go through [`query`].

pub mod query;

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

/// The name every drill's scratch database starts with (`ferry-drill-<job>`, see
/// `restore::d1`): never a member of a whole-account source.
pub const SCRATCH_PREFIX: &str = "ferry-drill-";

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
    /// Database UUID; or, for every database of the account (whole-account mode), `"*"` or a
    /// pattern of database names where `*` stands for any text (`"prod-*"`).
    #[serde(deserialize_with = "fields::text")]
    pub database_id: String,
    /// Whole-account mode: databases asked for per page of the list call (`per_page`, 10 to
    /// 10,000; default 1,000, the API's own).
    #[serde(default = "default_list_page_size", deserialize_with = "fields::count::<_, 10, 10_000>")]
    pub list_page_size: u32,
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
    /// Rows per query API page when reading a virtual table or exact integers (default 500).
    #[serde(default = "default_query_page_rows", deserialize_with = "fields::count::<_, 1, 100_000>")]
    pub query_page_rows: u32,
    /// Rows one query looks at when scanning a table for integers beyond 2^53 (default 10,000).
    #[serde(default = "default_scan_window_rows", deserialize_with = "fields::count::<_, 1, 1_000_000>")]
    pub scan_window_rows: u32,
    /// Seconds to wait before asking again a database busy with another export (default 120).
    #[serde(default = "default_busy_retry_seconds", deserialize_with = "fields::count::<_, 1, 3_600>")]
    pub busy_retry_seconds: u32,
    /// Cloudflare API requests the token's budget grants per window (default 1,200: Cloudflare's
    /// documented limit per user or token, developers.cloudflare.com/fundamentals/api/reference/limits/).
    #[serde(default = "default_api_budget_requests", deserialize_with = "fields::count::<_, 1, 1_000_000>")]
    pub api_budget_requests: u32,
    /// The budget's window in seconds (default 300: Cloudflare's 5 minutes).
    #[serde(default = "default_api_budget_window_seconds", deserialize_with = "fields::count::<_, 1, 86_400>")]
    pub api_budget_window_seconds: u32,
}

fn default_list_page_size() -> u32 {
    1000
}

fn default_api_budget_requests() -> u32 {
    1200
}

fn default_api_budget_window_seconds() -> u32 {
    300
}

fn default_busy_retry_seconds() -> u32 {
    120
}

fn default_query_page_rows() -> u32 {
    500
}

fn default_scan_window_rows() -> u32 {
    10_000
}

fn default_time_travel_days() -> u32 {
    7
}

impl D1Config {
    /// The public Cloudflare API.
    pub const DEFAULT_API_BASE: &'static str = "https://api.cloudflare.com/client/v4";

    /// Whole-account mode: `database_id` is `*` or a pattern of names, and each database of the
    /// account it matches is a member backed up by a job of its own.
    pub fn whole_account(&self) -> bool {
        self.database_id.contains('*')
    }

    /// Whether a database called `name` is one this source backs up in whole-account mode.
    pub fn selects(&self, name: &str) -> bool {
        crate::providers::name_matches(&self.database_id, name)
    }

    /// `…/accounts/{account_id}/d1/database/{database}/{tail}`.
    fn database_url(&self, database: &str, tail: &str) -> Result<String, StepError> {
        let base = self.api_base.as_ref().ok_or_else(|| StepError::permanent("D1: no api_base configured"))?;
        if self.whole_account() && database == self.database_id {
            return Err(StepError::permanent("D1: a whole-account source names no database of its own"));
        }
        Ok(url_with_path(base, &["accounts", &self.account_id, "d1", "database", database, tail]))
    }

    /// `…/accounts/{account_id}/d1/database/{database_id}/export`.
    pub fn export_url(&self, database: &str) -> Result<String, StepError> {
        self.database_url(database, "export")
    }

    /// `…/accounts/{account_id}/d1/database/{database_id}/query`.
    pub fn query_url(&self, database: &str) -> Result<String, StepError> {
        self.database_url(database, "query")
    }

    /// `…/accounts/{account_id}/d1/database?page=…&per_page=…`: one page of the account's list.
    fn list_url(&self, page: u32) -> Result<String, StepError> {
        let base = self.api_base.as_ref().ok_or_else(|| StepError::permanent("D1: no api_base configured"))?;
        let mut url = Url::parse(&url_with_path(base, &["accounts", &self.account_id, "d1", "database"]))
            .map_err(|e| StepError::permanent(format!("D1: bad list URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("page", &page.to_string())
            .append_pair("per_page", &self.list_page_size.to_string());
        Ok(url.to_string())
    }

    /// The query artifact of a backup of `database` whose plan is `plan`.
    pub fn query_export(
        &self,
        database: &str,
        plan: &query::QueryPlan,
        token: &Secret,
    ) -> Result<query::QueryExport, StepError> {
        Ok(query::QueryExport::new(self.query_url(database)?, bearer(token), plan, self.query_page_rows))
    }
}

fn bearer(token: &Secret) -> String {
    format!("Bearer {}", token.expose())
}

impl ProviderSettings for D1Config {
    /// D1 cancels an export that is not polled promptly.
    fn default_poll_interval(&self) -> Duration {
        Duration::from_secs(1)
    }

    fn check(&mut self) -> Result<(), FieldError> {
        if self.whole_account() && self.database_id.contains(['/', '?', '#']) {
            return Err(FieldError::new("database_id", "a pattern of database names cannot hold '/', '?' or '#'"));
        }
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

    fn whole_account(&self) -> bool {
        D1Config::whole_account(self)
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

/// One database of the account, as the list call names it: a member of a whole-account source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Database {
    /// Its UUID.
    pub uuid: String,
    /// Its name: the member's name (folders, retention, health, metrics, alerts).
    pub name: String,
}

/// Whole-account mode: the list of the account's databases, read page by page.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listing {
    /// The next page to ask for.
    pub page: u32,
    /// The databases the pattern selects, so far.
    pub found: Vec<Database>,
}

/// Most pages of the account's database list one discovery reads (10,000 per page at most: far
/// beyond any account).
const MAX_LIST_PAGES: u32 = 1000;

/// Progress of one D1 export, persisted with the job.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct D1State {
    /// Whole-account mode: the database this (child) job exports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<Database>,
    /// Whole-account mode: the discovery job's reading of the database list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listing: Option<Listing>,
    /// The time-travel bookmark of the export (constant for the task).
    pub at_bookmark: Option<String>,
    /// Export calls answered so far.
    pub polls: u32,
    /// The dump's filename once complete.
    pub filename: Option<String>,
    /// D1's log lines, accumulated across polls.
    pub messages: Vec<String>,
    /// `sqlite_schema` as read before exporting, until the plan is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Vec<query::SchemaObject>>,
    /// What goes through the export and what through the query API (`None` for a job stored
    /// before plans existed, which exports as configured).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<query::QueryPlan>,
}

/// Which call comes next.
enum Stage<'a> {
    List(u32),
    Schema,
    TableList,
    Columns(&'a str),
    Scan(&'a query::ScanTable),
    Export,
}

impl D1State {
    /// The state of a child job that backs up `database` of a whole-account source.
    pub fn member(database: Database) -> Self {
        Self { database: Some(database), ..Self::default() }
    }

    /// The UUID of the database this job exports: its member's, or the configured one.
    pub fn database_id<'a>(&'a self, cfg: &'a D1Config) -> &'a str {
        self.database.as_ref().map_or(cfg.database_id.as_str(), |d| d.uuid.as_str())
    }

    /// Whole-account mode: the name of the database this child job backs up.
    pub fn member_name(&self) -> Option<String> {
        self.database.as_ref().map(|d| d.name.clone())
    }

    fn stage_for(&self, cfg: &D1Config) -> Stage<'_> {
        if cfg.whole_account() && self.database.is_none() {
            return Stage::List(self.listing.as_ref().map_or(1, |l| l.page));
        }
        self.stage()
    }

    fn stage(&self) -> Stage<'_> {
        if self.at_bookmark.is_some() {
            return Stage::Export;
        }
        match (&self.schema, &self.plan) {
            (None, None) => Stage::Schema,
            (Some(_), None) => Stage::TableList,
            (_, Some(plan)) => match plan.scan.get(plan.scan_at) {
                Some(table) if table.columns.is_none() => Stage::Columns(&table.name),
                Some(table) => Stage::Scan(table),
                None => Stage::Export,
            },
        }
    }

    /// Whether the export call is next (the schema is read and scanned).
    pub fn ready_to_export(&self) -> bool {
        matches!(self.stage(), Stage::Export)
    }

    /// A decision without a request: when every selected table is virtual, no export is sent (D1
    /// would refuse it, and an empty table list means every table) and only the query artifact
    /// is copied.
    pub fn advance(&self) -> Option<Progress> {
        let plan = self.plan.as_ref()?;
        (self.ready_to_export() && !plan.export && self.at_bookmark.is_none())
            .then(|| Progress::Ready(vec![query_download()]))
    }

    /// What the job should say about the plan (tables that cannot be captured or checked).
    pub fn notes(&self) -> Vec<String> {
        self.plan.as_ref().map(|p| p.notes.clone()).unwrap_or_default()
    }

    /// The first export call (the one that starts an export) got no answer: D1 can only be asked
    /// about an export by the bookmark that answer carries, so say that a retry may start a second.
    pub fn create_unanswered(&self) -> Option<String> {
        (self.at_bookmark.is_none() && self.ready_to_export()).then(|| {
            "the request that starts the export got no answer; D1 can only be asked about an export by the \
             bookmark that answer carries, so the retry may have started a second export of the database"
                .to_string()
        })
    }

    /// What the manifest records about this export.
    pub fn references(&self, cfg: &D1Config) -> Value {
        json!({
            "account_id": cfg.account_id,
            "database_id": self.database_id(cfg),
            "database": self.database,
            "at_bookmark": self.at_bookmark,
            "filename": self.filename,
            "dump_options": cfg.dump_options,
            "paths": self.plan.as_ref().map(query::QueryPlan::references),
        })
    }
}

/// The generated query artifact, copied before the dump (closest to the export's moment).
fn query_download() -> Download {
    Download {
        filename: query::FILENAME.to_string(),
        content_type: "application/sql".to_string(),
        origin: crate::providers::Origin::D1Query,
    }
}

/// Answers that mean an export of the database is running: D1 refuses a new export and every
/// query until it completes or times out (`workers-sdk#9578`, `#9519`).
const BUSY_MARKERS: [&str; 2] = ["Cannot start a new export", "Currently processing a long-running export"];

/// The retryable error for an answer saying another export of the database is running: asked
/// again `busy_retry_seconds` later.
fn busy(cfg: &D1Config, resp: &HttpResponse) -> Option<StepError> {
    let text = String::from_utf8_lossy(&resp.body);
    let wait = Duration::from_secs(u64::from(cfg.busy_retry_seconds));
    BUSY_MARKERS.iter().any(|m| text.contains(m)).then(|| StepError::Transient {
        message: format!(
            "D1 is running another export of this database (another client's, or one of Ferry's whose answer was \
             lost) and refuses a new export and every query until it completes or times out; Ferry tries again in \
             {} s. D1 said: {}",
            wait.as_secs(),
            resp.snippet(300)
        ),
        retry_after: Some(wait),
    })
}

fn query_request(cfg: &D1Config, state: &D1State, token: &Secret, sql: &str) -> Result<HttpRequest, StepError> {
    let url = cfg.query_url(state.database_id(cfg))?;
    Ok(HttpRequest::post_json(url, &json!({ "sql": sql })).header("authorization", bearer(token)))
}

/// The next call: in whole-account mode the account's database list; else the schema, the scan
/// for integers beyond 2^53, then the export (start or poll).
pub fn next_request(cfg: &D1Config, state: &D1State, token: &Secret) -> Result<HttpRequest, StepError> {
    let query_request = |sql: &str| query_request(cfg, state, token, sql);
    match state.stage_for(cfg) {
        Stage::List(page) => Ok(HttpRequest::get(cfg.list_url(page)?).header("authorization", bearer(token))),
        Stage::Schema => query_request("SELECT type, name, tbl_name, sql FROM sqlite_schema"),
        Stage::TableList => query_request("PRAGMA table_list"),
        Stage::Columns(table) => query_request(&format!("PRAGMA table_info({})", query::ident(table))),
        Stage::Scan(table) => {
            let plan = state.plan.as_ref().ok_or_else(|| StepError::permanent("D1: scan without a plan"))?;
            let columns = table.columns.as_deref().unwrap_or_default();
            let sql = query::scan_sql(&table.name, columns, plan.scan_after.as_deref(), cfg.scan_window_rows);
            query_request(&sql)
        }
        Stage::Export => export_request(cfg, state, token),
    }
}

/// Folds the answer to [`next_request`] into the state.
pub fn on_response(
    cfg: &D1Config,
    state: &mut D1State,
    resp: &HttpResponse,
    now: Timestamp,
) -> Result<Progress, StepError> {
    if let Some(e) = busy(cfg, resp) {
        return Err(e);
    }
    match state.stage_for(cfg) {
        Stage::List(page) => return on_list(cfg, state, page, resp, now),
        Stage::Schema => {
            let rows = query::rows(resp, now, "reading sqlite_schema")?;
            state.schema = Some(query::schema_objects(&rows));
        }
        Stage::TableList => {
            let rows = query::rows(resp, now, "PRAGMA table_list")?;
            let objects = state.schema.take().unwrap_or_default();
            state.plan = Some(query::plan(&objects, &query::shadow_names(&rows), &cfg.dump_options));
        }
        Stage::Columns(_) => {
            let rows = query::rows(resp, now, "PRAGMA table_info")?;
            let columns = query::column_names(&rows);
            if let Some(plan) = state.plan.as_mut() {
                let at = plan.scan_at;
                if columns.is_empty() {
                    // Dropped since the schema was read: nothing to scan.
                    plan.scan_at += 1;
                } else if let Some(table) = plan.scan.get_mut(at) {
                    table.columns = Some(columns);
                    table.rowid_alias = query::rowid_alias(&rows);
                    table.key = query::rowid_key(&rows);
                }
            }
        }
        Stage::Scan(_) => {
            let rows = query::rows(resp, now, "scanning for integers beyond 2^53")?;
            if let Some(plan) = state.plan.as_mut() {
                query::on_scan(plan, &rows, cfg.scan_window_rows)?;
            }
        }
        Stage::Export => return on_export_response(state, resp, now),
    }
    // A step done (its retries start anew): the next query at once.
    Ok(Progress::Pending { poll_after: Some(Duration::ZERO) })
}

/// Folds in one page of the account's database list: the databases the pattern selects are kept,
/// and once a page comes back short (as wrangler pages: a full page means ask for the next), the
/// discovery hands over one child job per database, in the list's order.
fn on_list(
    cfg: &D1Config,
    state: &mut D1State,
    page: u32,
    resp: &HttpResponse,
    now: Timestamp,
) -> Result<Progress, StepError> {
    let body = envelope(resp, now, Some("listing the account's databases"))?;
    let items =
        body.get("result").and_then(Value::as_array).ok_or_else(|| malformed("a database list without result"))?;
    let listing = state.listing.get_or_insert_with(|| Listing { page, found: Vec::new() });
    for item in items {
        let (Some(uuid), Some(name)) =
            (item.get("uuid").and_then(Value::as_str), item.get("name").and_then(Value::as_str))
        else {
            return Err(malformed("a listed database without uuid or name"));
        };
        let known = listing.found.iter().any(|d| d.uuid == uuid);
        // Ferry's own drill databases (`ferry-drill-<job>`) live for one drill: never a member.
        let scratch = name.starts_with(SCRATCH_PREFIX);
        if cfg.selects(name) && !known && !scratch {
            listing.found.push(Database { uuid: uuid.to_string(), name: name.to_string() });
        }
    }
    let full = u32::try_from(items.len()).is_ok_and(|n| n >= cfg.list_page_size);
    if full && page < MAX_LIST_PAGES {
        listing.page = page + 1;
        return Ok(Progress::Pending { poll_after: Some(Duration::ZERO) });
    }
    let found = std::mem::take(&mut listing.found);
    if found.is_empty() {
        return Ok(Progress::Skip(format!("no database of the account matches {:?}", cfg.database_id)));
    }
    Ok(Progress::Spawn(found.into_iter().map(|d| crate::providers::ProviderState::D1(D1State::member(d))).collect()))
}

/// The member a manifest's references ([`D1State::references`]) name: the database's name, in
/// whole-account mode; `None` for a source of one database.
pub fn member_of(references: &Value) -> Option<String> {
    references.pointer("/database/name").and_then(Value::as_str).filter(|n| !n.is_empty()).map(str::to_string)
}

/// The longest gap between two polls of an active export. D1 cancels an export that is not
/// polled continually (after making the database unavailable while it ran), and the documented
/// client (wrangler) polls about once a second, so neither a back-off, nor `Retry-After`, nor
/// `poll_interval_ms` may stretch a gap past this.
pub const MAX_POLL_GAP: std::time::Duration = std::time::Duration::from_secs(5);

/// The next export call: start (no bookmark yet) or poll. With virtual tables, the plan's explicit
/// table list replaces the configured one.
fn export_request(cfg: &D1Config, state: &D1State, token: &Secret) -> Result<HttpRequest, StepError> {
    let mut options = cfg.dump_options.clone();
    if let Some(plan) = state.plan.as_ref().filter(|p| !p.dump_tables.is_empty()) {
        options.tables = plan.dump_tables.clone();
    }
    let mut body = json!({ "output_format": "polling", "dump_options": options });
    if let Some(bookmark) = &state.at_bookmark {
        body["current_bookmark"] = Value::String(bookmark.clone());
    }
    Ok(HttpRequest::post_json(cfg.export_url(state.database_id(cfg))?, &body).header("authorization", bearer(token)))
}

/// Folds one export answer into the state.
fn on_export_response(state: &mut D1State, resp: &HttpResponse, now: Timestamp) -> Result<Progress, StepError> {
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
            let mut files = Vec::new();
            if state.plan.as_ref().is_some_and(query::QueryPlan::needs_artifact) {
                files.push(query_download());
            }
            files.push(Download::url(url, filename, "application/sql", false));
            Ok(Progress::Ready(files))
        }
        Some("error") => {
            let error = result.get("error").and_then(Value::as_str).unwrap_or("export failed");
            Ok(Progress::Failed(with_messages(format!("D1 export failed: {error}"), &state.messages)))
        }
        // Wrangler polls on anything but `complete` and `error`; the export timeout bounds it.
        Some(_) => Ok(Progress::Pending { poll_after: None }),
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
            list_page_size: 1000,
            token_secret: "T".into(),
            dump_options: DumpOptions { tables: vec!["users".into()], no_data: false, no_schema: false },
            time_travel_days: 7,
            query_page_rows: 500,
            scan_window_rows: 2,
            busy_retry_seconds: 120,
            api_budget_requests: 1200,
            api_budget_window_seconds: 300,
        }
    }

    fn all_tables() -> D1Config {
        D1Config { dump_options: DumpOptions::default(), ..cfg() }
    }

    fn answer(rows: Value) -> HttpResponse {
        HttpResponse::json(
            200,
            &json!({"success": true, "errors": [], "messages": [], "result": [{"results": rows, "success": true, "meta": {}}]}),
        )
    }

    fn sql_of(req: &HttpRequest) -> String {
        let body: Value = serde_json::from_slice(req.body.as_deref().unwrap()).unwrap();
        body["sql"].as_str().unwrap_or_default().to_string()
    }

    /// Runs the schema inspection and scan against canned answers; returns the state, ready to export.
    fn inspected(
        cfg: &D1Config,
        schema: Value,
        table_list: Value,
        columns: &[(&str, Value)],
        windows: &[Value],
    ) -> D1State {
        let token = Secret::new("tok");
        let mut s = D1State::default();
        let req = next_request(cfg, &s, &token).unwrap();
        assert!(req.url.ends_with("/accounts/acc/d1/database/db-1/query"), "{}", req.url);
        assert!(sql_of(&req).contains("FROM sqlite_schema"));
        assert_eq!(
            on_response(cfg, &mut s, &answer(schema), now()).unwrap(),
            Progress::Pending { poll_after: Some(Duration::ZERO) }
        );
        assert_eq!(sql_of(&next_request(cfg, &s, &token).unwrap()), "PRAGMA table_list");
        on_response(cfg, &mut s, &answer(table_list), now()).unwrap();
        let mut windows = windows.iter();
        while !s.ready_to_export() {
            let sql = sql_of(&next_request(cfg, &s, &token).unwrap());
            let reply = if let Some(rest) = sql.strip_prefix("PRAGMA table_info(") {
                let name = rest.trim_end_matches(')').trim_matches('"').to_string();
                columns.iter().find(|(t, _)| *t == name).map(|(_, c)| c.clone()).unwrap_or(json!([]))
            } else {
                windows.next().cloned().unwrap_or_else(|| json!([{"n": 0, "last": null}]))
            };
            on_response(cfg, &mut s, &answer(reply), now()).unwrap();
        }
        s
    }

    /// The export's answers, active then complete; the files it hands over.
    fn exported(s: &mut D1State) -> Vec<Download> {
        on_export_response(s, &active(&[]), now()).unwrap();
        let done = HttpResponse::json(
            200,
            &json!({"success": true, "result": {"at_bookmark": "bm-1", "status": "complete",
            "result": {"filename": "x.sql", "signed_url": "https://r2.example/x.sql"}}}),
        );
        let Progress::Ready(files) = on_export_response(s, &done, now()).unwrap() else { panic!() };
        files
    }

    fn fts_schema() -> Value {
        json!([
            {"type": "table", "name": "_cf_KV", "tbl_name": "_cf_KV", "sql": "CREATE TABLE _cf_KV (key TEXT PRIMARY KEY, value BLOB) WITHOUT ROWID"},
            {"type": "table", "name": "docs", "tbl_name": "docs", "sql": "CREATE VIRTUAL TABLE docs USING fts5(title, body)"},
            {"type": "table", "name": "docs_data", "tbl_name": "docs_data", "sql": "CREATE TABLE 'docs_data'(id INTEGER PRIMARY KEY, block BLOB)"},
            {"type": "table", "name": "docs_config", "tbl_name": "docs_config", "sql": "CREATE TABLE 'docs_config'(k PRIMARY KEY, v) WITHOUT ROWID"},
            {"type": "table", "name": "nums", "tbl_name": "nums", "sql": "CREATE TABLE nums (id INTEGER PRIMARY KEY AUTOINCREMENT, big INTEGER, note TEXT)"},
            {"type": "table", "name": "sqlite_sequence", "tbl_name": "sqlite_sequence", "sql": "CREATE TABLE sqlite_sequence(name,seq)"},
            {"type": "index", "name": "nums_big", "tbl_name": "nums", "sql": "CREATE INDEX nums_big ON nums(big)"},
            {"type": "index", "name": "sqlite_autoindex_docs_config_1", "tbl_name": "docs_config", "sql": null},
            {"type": "view", "name": "big_nums", "tbl_name": "big_nums", "sql": "CREATE VIEW big_nums AS SELECT * FROM nums"},
            {"type": "trigger", "name": "nums_touch", "tbl_name": "nums", "sql": "CREATE TRIGGER nums_touch AFTER INSERT ON nums BEGIN SELECT 1; END"}
        ])
    }

    fn fts_table_list() -> Value {
        json!([
            {"schema": "main", "name": "docs", "type": "virtual", "ncol": 2, "wr": 0, "strict": 0},
            {"schema": "main", "name": "docs_data", "type": "shadow", "ncol": 2, "wr": 0, "strict": 0},
            {"schema": "main", "name": "docs_config", "type": "shadow", "ncol": 2, "wr": 1, "strict": 0},
            {"schema": "main", "name": "nums", "type": "table", "ncol": 3, "wr": 0, "strict": 0},
            {"schema": "main", "name": "_cf_KV", "type": "table", "ncol": 2, "wr": 1, "strict": 0},
            {"schema": "temp", "name": "sqlite_temp_schema", "type": "table", "ncol": 5, "wr": 0, "strict": 0}
        ])
    }

    fn nums_columns() -> Value {
        json!([{"cid": 0, "name": "id"}, {"cid": 1, "name": "big"}, {"cid": 2, "name": "note"}])
    }

    #[test]
    fn virtual_tables_and_their_shadow_tables_are_left_out_of_the_export_by_an_explicit_list() {
        let c = all_tables();
        let mut s = inspected(&c, fts_schema(), fts_table_list(), &[("nums", nums_columns())], &[]);
        let req = next_request(&c, &s, &Secret::new("tok")).unwrap();
        assert!(req.url.ends_with("/export"));
        let body: Value = serde_json::from_slice(req.body.as_deref().unwrap()).unwrap();
        assert_eq!(
            body["dump_options"]["tables"],
            json!(["nums", "sqlite_sequence", "nums_big", "big_nums", "nums_touch"]),
            "every table, index, view and trigger but the virtual table, its shadow tables and D1's own"
        );
        let refs = s.references(&c);
        assert_eq!(refs["paths"]["query_tables"], json!(["docs"]));
        assert_eq!(refs["paths"]["dump_tables"][0], "nums");
        // The completed export hands over the query artifact first, then the dump.
        let files = exported(&mut s);
        assert_eq!(files.iter().map(|f| f.filename.as_str()).collect::<Vec<_>>(), ["ferry_query_export.sql", "x.sql"]);
        assert_eq!(files[0].origin, crate::providers::Origin::D1Query);
    }

    #[test]
    fn without_virtual_tables_or_big_integers_the_export_is_as_configured_with_no_query_artifact() {
        let c = cfg();
        let schema = json!([{"type": "table", "name": "users", "tbl_name": "users", "sql": "CREATE TABLE users (id INTEGER PRIMARY KEY, n INTEGER)"}]);
        let list = json!([{"schema": "main", "name": "users", "type": "table"}]);
        let cols = json!([{"name": "id"}, {"name": "n"}]);
        let mut s =
            inspected(&c, schema, list, &[("users", cols)], &[json!([{"n": 1, "last": "1", "f0": 0, "f1": 0}])]);
        let body: Value =
            serde_json::from_slice(next_request(&c, &s, &Secret::new("tok")).unwrap().body.as_deref().unwrap())
                .unwrap();
        assert_eq!(body["dump_options"]["tables"], json!(["users"]));
        let files = exported(&mut s);
        assert_eq!(files.len(), 1);
    }

    #[test]
    fn columns_holding_integers_beyond_2_pow_53_are_found_in_bounded_windows_before_the_export() {
        let c = all_tables();
        // Windows of 2 rows: the first full with a big value in `big`, the second short.
        let windows = [
            json!([{"n": 2, "last": "9", "f0": 0, "f1": 1, "f2": 0}]),
            json!([{"n": 1, "last": "12", "f0": 0, "f1": 0, "f2": 0}]),
        ];
        let token = Secret::new("tok");
        let s = inspected(&c, fts_schema(), fts_table_list(), &[("nums", nums_columns())], &windows);
        let plan = s.plan.as_ref().unwrap();
        assert_eq!(plan.big_columns(), [("nums.big".to_string(), 1)].into_iter().collect());
        assert!(plan.needs_artifact());
        // The scan's second window started after the first one's last rowid.
        let mut probe = D1State {
            plan: Some(query::QueryPlan { scan_at: 0, scan_after: Some("9".into()), ..plan.clone() }),
            ..Default::default()
        };
        probe.plan.as_mut().unwrap().scan[0].big.clear();
        let sql = sql_of(&next_request(&c, &probe, &token).unwrap());
        assert!(sql.contains("WHERE rowid > 9 ORDER BY rowid LIMIT 2"), "{sql}");
    }

    #[test]
    fn when_every_selected_table_is_virtual_no_export_is_sent() {
        let c = D1Config { dump_options: DumpOptions { tables: vec!["docs".into()], ..Default::default() }, ..cfg() };
        let s = inspected(&c, fts_schema(), fts_table_list(), &[], &[]);
        assert_eq!(
            s.advance(),
            Some(Progress::Ready(vec![query_download()])),
            "an empty table list would ask D1 for every table, virtual ones included"
        );
    }

    #[test]
    fn an_export_already_running_is_said_and_retried_minutes_later() {
        for resp in [
            HttpResponse::json(
                200,
                &json!({"success": true, "result": {"success": true, "status": "error",
                "error": "D1 Export error: Currently processing a long-running export. Cannot start a new export until that completes or times out."}}),
            ),
            HttpResponse::json(
                409,
                &json!({"success": false, "errors": [{"code": 7500,
                "message": "Cannot start a new export until that completes or times out"}]}),
            ),
        ] {
            let mut s =
                D1State { plan: Some(query::QueryPlan { export: true, ..Default::default() }), ..Default::default() };
            let err = on_response(&cfg(), &mut s, &resp, now()).unwrap_err();
            let StepError::Transient { message, retry_after } = &err else { panic!("{err:?}") };
            assert_eq!(*retry_after, Some(Duration::from_secs(120)));
            assert!(message.contains("running another export of this database"), "{message}");
            assert!(message.contains("Cannot start a new export"), "{message}");
        }
    }

    #[test]
    fn a_query_refused_during_another_export_is_retried_later() {
        let resp = HttpResponse::json(
            400,
            &json!({"success": false, "errors": [{"code": 7500,
            "message": "D1_ERROR: Currently processing a long-running export."}]}),
        );
        let mut s = D1State::default();
        let err = on_response(&cfg(), &mut s, &resp, now()).unwrap_err();
        assert!(err.is_retryable());
        assert!(s.schema.is_none() && s.plan.is_none());
    }

    #[test]
    fn only_the_export_start_warns_of_a_second_export_when_unanswered() {
        assert_eq!(D1State::default().create_unanswered(), None, "a schema query creates nothing");
        let ready =
            D1State { plan: Some(query::QueryPlan { export: true, ..Default::default() }), ..Default::default() };
        assert!(ready.create_unanswered().is_some());
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
            c.export_url(&c.database_id).unwrap(),
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
    fn an_unknown_status_keeps_polling_as_wrangler_does() {
        let mut s = D1State::default();
        for status in ["queued", "cancelled", "retrying"] {
            let resp =
                HttpResponse::json(200, &json!({"success": true, "result": {"at_bookmark": "b", "status": status}}));
            assert_eq!(on_export_response(&mut s, &resp, now()).unwrap(), Progress::Pending { poll_after: None });
        }
        assert_eq!(s.at_bookmark.as_deref(), Some("b"));
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

    fn whole_account(pattern: &str) -> D1Config {
        D1Config { database_id: pattern.into(), list_page_size: 10, ..all_tables() }
    }

    fn listed(names: &[&str]) -> HttpResponse {
        let result: Vec<Value> = names
            .iter()
            .map(|n| json!({"uuid": format!("uuid-{n}"), "name": n, "created_at": "2026-12-01T00:00:00Z", "version": "production"}))
            .collect();
        HttpResponse::json(
            200,
            &json!({"success": true, "errors": [], "messages": [], "result": result,
                    "result_info": {"page": 1, "per_page": 10, "count": names.len(), "total_count": 99}}),
        )
    }

    #[test]
    fn a_whole_account_source_reads_every_page_of_the_list_and_spawns_one_job_per_matching_database() {
        let c = whole_account("prod-*");
        assert!(c.whole_account());
        let token = Secret::new("tok");
        let mut s = D1State::default();
        let req = next_request(&c, &s, &token).unwrap();
        assert_eq!(req.url, "http://127.0.0.1:9000/client/v4/accounts/acc/d1/database?page=1&per_page=10");
        assert_eq!(req.method, crate::http::Method::Get);
        let first: Vec<String> =
            (0..10).map(|i| if i % 3 == 0 { format!("dev-{i}") } else { format!("prod-{i}") }).collect();
        let first: Vec<&str> = first.iter().map(String::as_str).collect();
        // A full page: the next is asked for at once.
        assert_eq!(
            on_response(&c, &mut s, &listed(&first), now()).unwrap(),
            Progress::Pending { poll_after: Some(Duration::ZERO) }
        );
        assert!(next_request(&c, &s, &token).unwrap().url.ends_with("?page=2&per_page=10"));
        let Progress::Spawn(children) = on_response(&c, &mut s, &listed(&["prod-late", "other"]), now()).unwrap()
        else {
            panic!("a short page ends the list")
        };
        let members: Vec<String> = children.iter().filter_map(crate::providers::ProviderState::member).collect();
        assert_eq!(members, ["prod-1", "prod-2", "prod-4", "prod-5", "prod-7", "prod-8", "prod-late"]);
        // Each child exports its own database, and its manifest names it as the member.
        let crate::providers::ProviderState::D1(child) = &children[6] else { panic!() };
        let req = next_request(&c, child, &token).unwrap();
        assert!(req.url.ends_with("/accounts/acc/d1/database/uuid-prod-late/query"), "{}", req.url);
        let refs = child.references(&c);
        assert_eq!(refs["database_id"], "uuid-prod-late");
        assert_eq!(member_of(&refs).as_deref(), Some("prod-late"));
        assert_eq!(member_of(&D1State::default().references(&cfg())), None, "a source of one database has no member");
    }

    #[test]
    fn a_whole_account_source_whose_pattern_matches_nothing_skips_naming_it() {
        let c = whole_account("prod-*");
        let mut s = D1State::default();
        assert_eq!(
            on_response(&c, &mut s, &listed(&["dev-1"]), now()).unwrap(),
            Progress::Skip("no database of the account matches \"prod-*\"".into())
        );
    }

    #[test]
    fn a_refused_or_malformed_list_is_an_error_naming_the_call() {
        let c = whole_account("*");
        let mut s = D1State::default();
        let refused = HttpResponse::json(
            403,
            &json!({"success": false, "errors": [{"code": 10000, "message": "Authentication error"}], "messages": [], "result": null}),
        );
        let e = on_response(&c, &mut s, &refused, now()).unwrap_err();
        assert!(
            e.to_string().contains("listing the account's databases") && e.to_string().contains("Authentication error"),
            "{e}"
        );
        let nameless = HttpResponse::json(200, &json!({"success": true, "errors": [], "result": [{"uuid": "u"}]}));
        assert!(on_response(&c, &mut s, &nameless, now()).unwrap_err().to_string().contains("without uuid or name"));
    }

    #[test]
    fn a_whole_account_source_never_sends_its_pattern_as_a_database_id() {
        let c = whole_account("*");
        let e = c.export_url(&c.database_id).unwrap_err();
        assert!(e.to_string().contains("names no database"), "{e}");
    }

    #[test]
    fn ferrys_own_drill_databases_are_never_members_of_a_whole_account() {
        let c = whole_account("*");
        let mut s = D1State::default();
        let Progress::Spawn(children) =
            on_response(&c, &mut s, &listed(&["orders", "ferry-drill-0123456789abcdef"]), now()).unwrap()
        else {
            panic!("spawns")
        };
        let members: Vec<String> = children.iter().filter_map(crate::providers::ProviderState::member).collect();
        assert_eq!(members, ["orders"]);
    }
}
