//! Source configuration: what to back up, when, and with which credentials.
//!
//! Sources are declared in `wrangler.toml` as the `FERRY_SOURCES` var (an array of tables, or the
//! same as a JSON string). Parsing is strict: an unknown field, a missing field or a bad value is
//! an error that names the source and the field, and a Worker with a bad config refuses to run
//! anything. Secrets are never in the config, only the *names* of the Worker secrets that hold
//! them.

use std::collections::BTreeSet;
use std::fmt;
use std::time::Duration;

use serde_json::{Map, Value};
use url::Url;

use crate::providers::aura::{AuraConfig, AuraMode};
use crate::providers::d1::{D1Config, DumpOptions};
use crate::providers::dgraph::{DgraphAccount, DgraphAcl, DgraphConfig, DgraphFormat};
use crate::providers::dxp::{DxpAuth, DxpConfig};
use crate::retry::RetryPolicy;
use crate::schedule::Schedule;
use crate::transfer::{TransferSettings, MEMORY_BUDGET};

/// Smallest multipart part R2 accepts (every part but the last).
pub const MIN_PART_SIZE: u64 = 5 * 1024 * 1024;
/// Largest part Ferry buffers: (parts in flight + 1) parts must fit the isolate's memory budget.
pub const MAX_PART_SIZE: u64 = 32 * 1024 * 1024;
/// Default part size: big enough for few parts, small enough to buffer in a 128 MB isolate.
pub const DEFAULT_PART_SIZE: u64 = 8 * 1024 * 1024;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Every declared source, in declaration order.
    pub sources: Vec<SourceConfig>,
}

/// One database to back up.
#[derive(Debug, Clone, PartialEq)]
pub struct SourceConfig {
    /// Unique, URL- and key-safe name; the R2 prefix and the Durable Object name.
    pub name: String,
    /// When scheduled backups run (UTC).
    pub schedule: Schedule,
    /// When scheduled verifications of the newest backup run (UTC), if at all.
    pub verify_schedule: Option<Schedule>,
    /// The age past which the newest committed backup is stale (`max_age_minutes`); `None`: two
    /// periods of the schedule, at least an hour (see [`crate::health`]).
    pub max_age: Option<Duration>,
    /// How copies into R2 are cut into parts and slices (`part_size_mib`, `parts_in_flight`,
    /// `slice_max_mib`, `slice_max_seconds`, `slice_max_pages`, `max_stalled_slices`,
    /// `copy_timeout_minutes`).
    pub transfer: TransferSettings,
    /// How transient failures are retried.
    pub retry: RetryPolicy,
    /// How long to wait between status polls of a running export.
    pub poll_interval: Duration,
    /// How long an export may run before the job is failed.
    pub export_timeout: Duration,
    /// The provider and its settings.
    pub provider: ProviderConfig,
}

/// Provider-specific settings, one variant per `kind`.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderConfig {
    /// Cloudflare D1 (REST export).
    D1(D1Config),
    /// Dgraph Cloud (`/admin/slash` export).
    Dgraph(DgraphConfig),
    /// Neo4j Aura (snapshots and a logical export over the Query API).
    Aura(AuraConfig),
    /// Liferay DXP Cloud (backup service downloads).
    Dxp(DxpConfig),
}

impl SourceConfig {
    /// The `kind` string of this source.
    pub fn kind(&self) -> &'static str {
        match self.provider {
            ProviderConfig::D1(_) => "d1",
            ProviderConfig::Dgraph(_) => "dgraph",
            ProviderConfig::Aura(_) => "aura",
            ProviderConfig::Dxp(_) => "dxp",
        }
    }

    /// Names of the Worker secrets this source needs.
    pub fn secret_names(&self) -> Vec<&str> {
        match &self.provider {
            ProviderConfig::D1(d1) => vec![d1.token_secret.as_str()],
            ProviderConfig::Dgraph(d) => {
                let mut names: Vec<&str> = d.api_key_secret.iter().map(String::as_str).collect();
                names.extend(d.account.as_ref().map(|a| a.password_secret.as_str()));
                names.extend(d.acl.as_ref().map(|a| a.password_secret.as_str()));
                names
            }
            ProviderConfig::Aura(a) => {
                let mut names = vec![a.client_id_secret.as_str(), a.client_secret_secret.as_str()];
                names.extend(a.db_password_secret.as_deref());
                names
            }
            ProviderConfig::Dxp(d) => vec![match &d.auth {
                DxpAuth::Basic { password_secret, .. } => password_secret.as_str(),
                DxpAuth::UserToken { secret } | DxpAuth::MasterToken { secret } => secret.as_str(),
            }],
        }
    }
}

impl Config {
    /// The source called `name`.
    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// Parses `FERRY_SOURCES`: an array of source tables, or a JSON string holding one.
    pub fn from_value(value: &Value) -> Result<Self, ConfigError> {
        let owned;
        let value = match value {
            Value::String(s) => {
                owned = serde_json::from_str::<Value>(s)
                    .map_err(|e| ConfigError::top(format!("FERRY_SOURCES is not valid JSON: {e}")))?;
                &owned
            }
            other => other,
        };
        let items =
            value.as_array().ok_or_else(|| ConfigError::top("FERRY_SOURCES must be an array of source tables"))?;
        let mut sources: Vec<SourceConfig> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let source = parse_source(i, item)?;
            if sources.iter().any(|s| s.name == source.name) {
                return Err(ConfigError::field(&source.name, "name", "is used by another source"));
            }
            sources.push(source);
        }
        Ok(Self { sources })
    }
}

/// A configuration problem, naming the source and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The source's name (or `#index` when it has none), if the problem is inside one.
    pub source_name: Option<String>,
    /// The offending field.
    pub field: Option<String>,
    /// What is wrong.
    pub problem: String,
}

impl ConfigError {
    fn top(problem: impl Into<String>) -> Self {
        Self { source_name: None, field: None, problem: problem.into() }
    }

    fn field(source: &str, field: &str, problem: impl Into<String>) -> Self {
        Self { source_name: Some(source.to_string()), field: Some(field.to_string()), problem: problem.into() }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid configuration: ")?;
        if let Some(s) = &self.source_name {
            write!(f, "source {s:?}: ")?;
        }
        if let Some(field) = &self.field {
            write!(f, "field {field:?} ")?;
        }
        f.write_str(&self.problem)
    }
}

/// Reads fields of one table, remembering which were used so leftovers can be refused.
struct Fields<'a> {
    source: String,
    prefix: &'static str,
    map: &'a Map<String, Value>,
    used: BTreeSet<&'static str>,
}

impl<'a> Fields<'a> {
    fn new(source: String, prefix: &'static str, map: &'a Map<String, Value>) -> Self {
        Self { source, prefix, map, used: BTreeSet::new() }
    }

    fn path(&self, key: &str) -> String {
        format!("{}{}", self.prefix, key)
    }

    fn err(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::field(&self.source, &self.path(key), problem)
    }

    fn raw(&mut self, key: &'static str) -> Option<&'a Value> {
        self.used.insert(key);
        self.map.get(key).filter(|v| !v.is_null())
    }

    fn string(&mut self, key: &'static str) -> Result<Option<String>, ConfigError> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.trim().is_empty() => Err(self.err(key, "must not be empty")),
            Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
            Some(_) => Err(self.err(key, "must be a string")),
        }
    }

    fn required_string(&mut self, key: &'static str) -> Result<String, ConfigError> {
        self.string(key)?.ok_or_else(|| self.err(key, "is required"))
    }

    fn bool(&mut self, key: &'static str) -> Result<Option<bool>, ConfigError> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(_) => Err(self.err(key, "must be true or false")),
        }
    }

    fn uint(&mut self, key: &'static str, min: u64, max: u64) -> Result<Option<u64>, ConfigError> {
        match self.raw(key) {
            None => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if (min..=max).contains(&n) => Ok(Some(n)),
                _ => Err(self.err(key, format!("must be a whole number from {min} to {max}"))),
            },
        }
    }

    fn strings(&mut self, key: &'static str) -> Result<Vec<String>, ConfigError> {
        match self.raw(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| match v.as_str() {
                    Some(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
                    _ => Err(self.err(key, "must be an array of non-empty strings")),
                })
                .collect(),
            Some(_) => Err(self.err(key, "must be an array of strings")),
        }
    }

    fn table(&mut self, key: &'static str) -> Result<Option<&'a Map<String, Value>>, ConfigError> {
        match self.raw(key) {
            None => Ok(None),
            Some(Value::Object(m)) => Ok(Some(m)),
            Some(_) => Err(self.err(key, "must be a table")),
        }
    }

    fn url(&mut self, key: &'static str) -> Result<Option<Url>, ConfigError> {
        let Some(s) = self.string(key)? else { return Ok(None) };
        let url = Url::parse(&s).map_err(|e| self.err(key, format!("is not a valid URL ({e})")))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(self.err(key, "must be an http:// or https:// URL"));
        }
        Ok(Some(url))
    }

    /// Fails on any field that no reader asked for.
    fn finish(self) -> Result<(), ConfigError> {
        match self.map.keys().find(|k| !self.used.contains(k.as_str())) {
            Some(k) => Err(self.err(k, "is not a known field")),
            None => Ok(()),
        }
    }
}

fn valid_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    (1..=63).contains(&bytes.len())
        && bytes[0].is_ascii_alphanumeric()
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.'))
}

fn valid_secret_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

fn parse_source(index: usize, value: &Value) -> Result<SourceConfig, ConfigError> {
    let label = format!("#{}", index + 1);
    let map = value.as_object().ok_or_else(|| ConfigError {
        source_name: Some(label.clone()),
        field: None,
        problem: "must be a table".into(),
    })?;
    let mut f = Fields::new(label, "", map);
    let name = f.required_string("name")?;
    if !valid_name(&name) {
        return Err(
            f.err("name", "must be 1-63 characters of a-z, 0-9, '-', '_' or '.', starting with a letter or digit")
        );
    }
    f.source = name.clone();
    let kind = f.required_string("kind")?;
    let schedule_text = f.required_string("schedule")?;
    let schedule = Schedule::parse(&schedule_text).map_err(|e| f.err("schedule", format!("is {e}")))?;
    let verify_schedule = match f.string("verify_schedule")? {
        Some(text) => Some(Schedule::parse(&text).map_err(|e| f.err("verify_schedule", format!("is {e}")))?),
        None => None,
    };
    let max_age = f.uint("max_age_minutes", 1, 366 * 24 * 60)?.map(|m| Duration::from_secs(60 * m));
    let transfer = parse_transfer(&mut f)?;
    // D1 cancels an export that is not polled promptly; Aura's own CLI polls every 20 s.
    let default_poll = match kind.as_str() {
        "aura" => 10_000,
        "dgraph" => 2_000,
        _ => 1_000,
    };
    let poll_interval = Duration::from_millis(f.uint("poll_interval_ms", 100, 600_000)?.unwrap_or(default_poll));
    let export_timeout = Duration::from_secs(60 * f.uint("export_timeout_minutes", 1, 7 * 24 * 60)?.unwrap_or(6 * 60));
    let retry = match f.table("retry")? {
        None => RetryPolicy::default(),
        Some(m) => parse_retry(&f.source, m)?,
    };
    let api_base = f.url("api_base")?;
    let provider = match kind.as_str() {
        "d1" => ProviderConfig::D1(parse_d1(&mut f, api_base)?),
        "dgraph" => ProviderConfig::Dgraph(parse_dgraph(&mut f, api_base)?),
        "aura" => ProviderConfig::Aura(parse_aura(&mut f, api_base)?),
        "dxp" => ProviderConfig::Dxp(parse_dxp(&mut f, api_base)?),
        other => {
            return Err(f.err("kind", format!("must be one of \"d1\", \"dgraph\", \"aura\", \"dxp\" (got {other:?})")))
        }
    };
    f.finish()?;
    Ok(SourceConfig {
        name,
        schedule,
        verify_schedule,
        max_age,
        transfer,
        retry,
        poll_interval,
        export_timeout,
        provider,
    })
}

fn parse_transfer(f: &mut Fields<'_>) -> Result<TransferSettings, ConfigError> {
    let d = TransferSettings::default();
    let part_size = f.uint("part_size_mib", MIN_PART_SIZE >> 20, MAX_PART_SIZE >> 20)?.map_or(d.part_size, |m| m << 20);
    let parts_in_flight = f.uint("parts_in_flight", 1, 16)?.map_or(d.parts_in_flight, |n| n as u32);
    let slice_bytes = f.uint("slice_max_mib", MIN_PART_SIZE >> 20, 1 << 20)?.map_or(d.slice_bytes, |m| m << 20);
    // An alarm may run 15 minutes of wall clock; a slice stays well inside that.
    let slice_time = f.uint("slice_max_seconds", 1, 600)?.map_or(d.slice_time, Duration::from_secs);
    let slice_pages = f.uint("slice_max_pages", 1, 5000)?.map_or(d.slice_pages, |n| n as u32);
    let max_stalled_slices = f.uint("max_stalled_slices", 1, 1000)?.map_or(d.max_stalled_slices, |n| n as u32);
    let copy_timeout =
        f.uint("copy_timeout_minutes", 1, 7 * 24 * 60)?.map_or(d.copy_timeout, |m| Duration::from_secs(60 * m));
    let settings = TransferSettings {
        part_size,
        parts_in_flight,
        slice_bytes,
        slice_time,
        slice_pages,
        max_stalled_slices,
        copy_timeout,
        ..d
    };
    if settings.peak_memory() > MEMORY_BUDGET {
        return Err(f.err(
            "part_size_mib",
            format!(
                "and parts_in_flight need {} MiB of buffers ((parts_in_flight + 1) x part_size_mib + {} MiB), more \
                 than the {} MiB a 128 MB isolate can spare; lower part_size_mib or parts_in_flight",
                settings.peak_memory() >> 20,
                crate::transfer::MEMORY_OVERHEAD >> 20,
                MEMORY_BUDGET >> 20
            ),
        ));
    }
    Ok(settings)
}

fn parse_retry(source: &str, map: &Map<String, Value>) -> Result<RetryPolicy, ConfigError> {
    let mut f = Fields::new(source.to_string(), "retry.", map);
    let d = RetryPolicy::default();
    let max_attempts = f.uint("max_attempts", 0, 100)?.map_or(d.max_attempts, |n| n as u32);
    let base = f.uint("base_ms", 1, 3_600_000)?.map_or(d.base, Duration::from_millis);
    let max_delay = f.uint("max_delay_ms", 1, 86_400_000)?.map_or(d.max_delay, Duration::from_millis);
    if max_delay < base {
        return Err(f.err("max_delay_ms", "must not be smaller than retry.base_ms"));
    }
    f.finish()?;
    Ok(RetryPolicy { max_attempts, base, max_delay })
}

fn secret_name(f: &mut Fields<'_>, key: &'static str) -> Result<Option<String>, ConfigError> {
    match f.string(key)? {
        Some(name) if !valid_secret_name(&name) => {
            Err(f.err(key, "must be the name of a Worker secret (letters, digits, '_'), not the secret itself"))
        }
        other => Ok(other),
    }
}

fn required_secret_name(f: &mut Fields<'_>, key: &'static str) -> Result<String, ConfigError> {
    secret_name(f, key)?.ok_or_else(|| f.err(key, "is required"))
}

fn default_url(f: &Fields<'_>, key: &str, url: &str) -> Result<Url, ConfigError> {
    Url::parse(url).map_err(|e| f.err(key, format!("is not a valid URL ({e})")))
}

fn parse_dgraph(f: &mut Fields<'_>, api_base: Option<Url>) -> Result<DgraphConfig, ConfigError> {
    let endpoint = f.url("endpoint")?;
    let endpoint = api_base.or(endpoint);
    let api_key_secret = secret_name(f, "api_key_secret")?;
    let cerebro_email = f.string("cerebro_email")?;
    let cerebro_password_secret = secret_name(f, "cerebro_password_secret")?;
    let cerebro_url = f.url("cerebro_url")?;
    let account = match (cerebro_email, cerebro_password_secret) {
        (Some(email), Some(password_secret)) => {
            if endpoint.is_some() || api_key_secret.is_some() {
                return Err(f.err(
                    "cerebro_email",
                    "account mode (cerebro_email) backs up every backend: leave out endpoint and api_key_secret",
                ));
            }
            let cerebro_url = match cerebro_url {
                Some(u) => u,
                None => default_url(f, "cerebro_url", DgraphAccount::DEFAULT_CEREBRO_URL)?,
            };
            Some(DgraphAccount { cerebro_url, email, password_secret })
        }
        (Some(_), None) => {
            return Err(f.err("cerebro_password_secret", "is required with cerebro_email (account mode)"))
        }
        (None, Some(_)) => {
            return Err(f.err("cerebro_email", "is required with cerebro_password_secret (account mode)"))
        }
        (None, None) => {
            if endpoint.is_none() {
                return Err(f.err(
                    "endpoint",
                    "is required (the backend URL), or give cerebro_email and cerebro_password_secret for account mode",
                ));
            }
            if api_key_secret.is_none() {
                return Err(f.err("api_key_secret", "is required (the name of the secret holding an admin API key)"));
            }
            None
        }
    };
    let format = match f.string("format")?.as_deref() {
        None | Some("json") => DgraphFormat::Json,
        Some("rdf") => DgraphFormat::Rdf,
        Some(other) => return Err(f.err("format", format!("must be \"json\" or \"rdf\" (got {other:?})"))),
    };
    let namespace = match f.raw("namespace") {
        None => None,
        Some(v) => match v.as_i64() {
            Some(n) if n >= -1 => Some(n),
            _ => return Err(f.err("namespace", "must be a namespace id, or -1 for every namespace")),
        },
    };
    let user_id = f.string("user_id")?;
    let password_secret = secret_name(f, "password_secret")?;
    let login_namespace = match f.raw("login_namespace") {
        None => 0,
        Some(v) => v.as_i64().filter(|n| *n >= 0).ok_or_else(|| f.err("login_namespace", "must be a namespace id"))?,
    };
    let acl = match (user_id, password_secret) {
        (Some(user_id), Some(password_secret)) => Some(DgraphAcl { user_id, password_secret, login_namespace }),
        (None, None) => None,
        (Some(_), None) => return Err(f.err("password_secret", "is required with user_id (ACL login)")),
        (None, Some(_)) => return Err(f.err("user_id", "is required with password_secret (ACL login)")),
    };
    Ok(DgraphConfig { endpoint, api_key_secret, account, format, namespace, acl })
}

fn parse_aura(f: &mut Fields<'_>, api_base: Option<Url>) -> Result<AuraConfig, ConfigError> {
    let instance_id = f.required_string("instance_id")?;
    if instance_id.len() != 8 || !instance_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(f.err("instance_id", "must be the 8 hex characters of an Aura instance id"));
    }
    let client_id_secret = required_secret_name(f, "client_id_secret")?;
    let client_secret_secret = required_secret_name(f, "client_secret_secret")?;
    let mode = match f.string("mode")?.as_deref() {
        None | Some("both") => AuraMode::Both,
        Some("snapshot") => AuraMode::Snapshot,
        Some("logical") => AuraMode::Logical,
        Some(other) => {
            return Err(f.err("mode", format!("must be \"snapshot\", \"logical\" or \"both\" (got {other:?})")))
        }
    };
    let api_base = match api_base {
        Some(u) => u,
        None => default_url(f, "api_base", AuraConfig::DEFAULT_API_BASE)?,
    };
    let query_api_base = match f.url("query_api_base")? {
        Some(u) => u,
        None => default_url(
            f,
            "query_api_base",
            &format!("https://{}.databases.neo4j.io", instance_id.to_ascii_lowercase()),
        )?,
    };
    let database = f.string("database")?.unwrap_or_else(|| "neo4j".into());
    let db_user = f.string("db_user")?.unwrap_or_else(|| "neo4j".into());
    let db_password_secret = secret_name(f, "db_password_secret")?;
    if mode != AuraMode::Snapshot && db_password_secret.is_none() {
        return Err(f.err("db_password_secret", "is required for the logical export (mode \"logical\" or \"both\")"));
    }
    let page_size = f.uint("page_size", 1, 50_000)?.unwrap_or(1000) as u32;
    Ok(AuraConfig {
        api_base,
        instance_id: instance_id.to_ascii_lowercase(),
        client_id_secret,
        client_secret_secret,
        mode,
        query_api_base,
        database,
        db_user,
        db_password_secret,
        page_size,
    })
}

fn parse_dxp(f: &mut Fields<'_>, api_base: Option<Url>) -> Result<DxpConfig, ConfigError> {
    let api_base = api_base.ok_or_else(|| {
        f.err("api_base", "is required: the backup service URL, e.g. https://backup-<project>-<env>.lfr.cloud")
    })?;
    let user = f.string("user")?;
    let password_secret = secret_name(f, "password_secret")?;
    let user_token_secret = secret_name(f, "user_token_secret")?;
    let master_token_secret = secret_name(f, "master_token_secret")?;
    let auth = match (user, password_secret, user_token_secret, master_token_secret) {
        (Some(user), Some(password_secret), None, None) => DxpAuth::Basic { user, password_secret },
        (None, None, Some(secret), None) => DxpAuth::UserToken { secret },
        (None, None, None, Some(secret)) => DxpAuth::MasterToken { secret },
        (Some(_), None, None, None) => return Err(f.err("password_secret", "is required with user (Basic auth)")),
        (None, Some(_), None, None) => return Err(f.err("user", "is required with password_secret (Basic auth)")),
        (None, None, None, None) => {
            return Err(f.err("user_token_secret", "or master_token_secret, or user with password_secret, is required"))
        }
        _ => return Err(f.err("user_token_secret", "conflicts with another auth mode: give exactly one of user+password_secret, user_token_secret, master_token_secret")),
    };
    Ok(DxpConfig { api_base, auth })
}

fn parse_d1(f: &mut Fields<'_>, api_base: Option<Url>) -> Result<D1Config, ConfigError> {
    let account_id = f.required_string("account_id")?;
    if account_id.len() > 32 {
        return Err(f.err("account_id", "must be at most 32 characters"));
    }
    let database_id = f.required_string("database_id")?;
    let token_secret = f.required_string("token_secret")?;
    if !valid_secret_name(&token_secret) {
        return Err(
            f.err("token_secret", "must be the name of a Worker secret (letters, digits, '_'), not the token itself")
        );
    }
    let dump_options = match f.table("dump_options")? {
        None => DumpOptions::default(),
        Some(m) => {
            let mut d = Fields::new(f.source.clone(), "dump_options.", m);
            let opts = DumpOptions {
                tables: d.strings("tables")?,
                no_data: d.bool("no_data")?.unwrap_or(false),
                no_schema: d.bool("no_schema")?.unwrap_or(false),
            };
            if opts.no_data && opts.no_schema {
                return Err(d.err("no_schema", "cannot be combined with no_data (the dump would be empty)"));
            }
            d.finish()?;
            opts
        }
    };
    let api_base = match api_base {
        Some(url) => url,
        None => Url::parse(D1Config::DEFAULT_API_BASE).map_err(|e| f.err("api_base", e.to_string()))?,
    };
    Ok(D1Config { api_base, account_id, database_id, token_secret, dump_options })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d1(extra: Value) -> Value {
        let mut base = json!({
            "name": "app-db", "kind": "d1", "schedule": "0 3 * * *",
            "account_id": "acc", "database_id": "db-uuid", "token_secret": "D1_TOKEN"
        });
        if let (Some(b), Some(e)) = (base.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                b.insert(k.clone(), v.clone());
            }
        }
        base
    }

    fn err(v: Value) -> ConfigError {
        Config::from_value(&json!([v])).unwrap_err()
    }

    #[test]
    fn parses_a_minimal_d1_source_with_defaults() {
        let c = Config::from_value(&json!([d1(json!({}))])).unwrap();
        let s = &c.sources[0];
        assert_eq!(s.name, "app-db");
        assert_eq!(s.kind(), "d1");
        assert_eq!(s.schedule.as_str(), "0 3 * * *");
        assert_eq!(s.transfer.part_size, DEFAULT_PART_SIZE);
        assert_eq!(s.secret_names(), vec!["D1_TOKEN"]);
        let ProviderConfig::D1(d) = &s.provider else { panic!() };
        assert_eq!(d.api_base.as_str(), "https://api.cloudflare.com/client/v4");
        assert_eq!(d.dump_options, DumpOptions::default());
        assert_eq!(s.max_age, None, "derived from the schedule");
    }

    #[test]
    fn max_age_minutes_is_optional_and_bounded() {
        let c = Config::from_value(&json!([d1(json!({ "max_age_minutes": 90 }))])).unwrap();
        assert_eq!(c.sources[0].max_age, Some(Duration::from_secs(90 * 60)));
        for bad in [json!(0), json!(-5), json!("1h"), json!(1.5)] {
            let e = err(d1(json!({ "max_age_minutes": bad })));
            assert_eq!(e.field.as_deref(), Some("max_age_minutes"), "{e}");
        }
    }

    #[test]
    fn accepts_the_config_as_a_json_string() {
        let text = serde_json::to_string(&json!([d1(json!({}))])).unwrap();
        assert_eq!(Config::from_value(&Value::String(text)).unwrap().sources.len(), 1);
        let e = Config::from_value(&Value::String("[{".into())).unwrap_err();
        assert!(e.to_string().contains("not valid JSON"), "{e}");
    }

    #[test]
    fn parses_every_optional_field() {
        let c = Config::from_value(&json!([d1(json!({
            "api_base": "http://127.0.0.1:9000/client/v4",
            "part_size_mib": 5, "poll_interval_ms": 250, "export_timeout_minutes": 10,
            "retry": {"max_attempts": 3, "base_ms": 10, "max_delay_ms": 100},
            "dump_options": {"tables": ["users", "orders"], "no_data": true}
        }))]))
        .unwrap();
        let s = &c.sources[0];
        assert_eq!(s.transfer.part_size, 5 * 1024 * 1024);
        assert_eq!(s.poll_interval, Duration::from_millis(250));
        assert_eq!(s.export_timeout, Duration::from_secs(600));
        assert_eq!(
            s.retry,
            RetryPolicy { max_attempts: 3, base: Duration::from_millis(10), max_delay: Duration::from_millis(100) }
        );
        let ProviderConfig::D1(d) = &s.provider else { panic!() };
        assert_eq!(d.api_base.as_str(), "http://127.0.0.1:9000/client/v4");
        assert_eq!(d.dump_options.tables, vec!["users", "orders"]);
        assert!(d.dump_options.no_data && !d.dump_options.no_schema);
    }

    #[test]
    fn missing_field_names_source_and_field() {
        let mut v = d1(json!({}));
        v.as_object_mut().unwrap().remove("database_id");
        let e = err(v);
        assert_eq!(e.source_name.as_deref(), Some("app-db"));
        assert_eq!(e.field.as_deref(), Some("database_id"));
        assert_eq!(e.to_string(), "invalid configuration: source \"app-db\": field \"database_id\" is required");
    }

    #[test]
    fn bad_schedule_is_named() {
        let e = err(d1(json!({"schedule": "every night"})));
        assert_eq!(e.field.as_deref(), Some("schedule"));
        assert!(e.to_string().contains("5-field cron"), "{e}");
    }

    #[test]
    fn unknown_fields_are_refused_by_name() {
        let e = err(d1(json!({"shedule": "* * * * *"})));
        assert_eq!(e.field.as_deref(), Some("shedule"));
        let e = err(d1(json!({"dump_options": {"tabels": ["x"]}})));
        assert_eq!(e.field.as_deref(), Some("dump_options.tabels"));
        let e = err(d1(json!({"retry": {"attempts": 1}})));
        assert_eq!(e.field.as_deref(), Some("retry.attempts"));
    }

    fn source(v: Value) -> Result<SourceConfig, ConfigError> {
        Config::from_value(&json!([v])).map(|mut c| c.sources.remove(0))
    }

    #[test]
    fn parses_dgraph_sources_with_and_without_acl() {
        let s = source(json!({"name": "graph", "kind": "dgraph", "schedule": "0 4 * * *",
            "endpoint": "https://blue-sky.us-east-1.aws.cloud.dgraph.io", "api_key_secret": "DGRAPH_KEY"}))
        .unwrap();
        let ProviderConfig::Dgraph(d) = &s.provider else { panic!() };
        assert_eq!(d.format, DgraphFormat::Json);
        assert_eq!(d.namespace, None);
        assert!(d.acl.is_none());
        assert_eq!(s.secret_names(), vec!["DGRAPH_KEY"]);
        let s = source(json!({"name": "graph", "kind": "dgraph", "schedule": "0 4 * * *", "endpoint": "https://x.io",
            "api_key_secret": "K", "format": "rdf", "namespace": -1, "user_id": "groot", "password_secret": "P"}))
        .unwrap();
        let ProviderConfig::Dgraph(d) = &s.provider else { panic!() };
        assert_eq!(d.format, DgraphFormat::Rdf);
        assert_eq!(d.namespace, Some(-1));
        assert_eq!(d.acl.as_ref().map(|a| (a.user_id.as_str(), a.login_namespace)), Some(("groot", 0)));
        assert_eq!(s.secret_names(), vec!["K", "P"]);
        let e = source(json!({"name": "graph", "kind": "dgraph", "schedule": "0 4 * * *", "endpoint": "https://x.io",
            "api_key_secret": "K", "user_id": "groot"}))
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("password_secret"));
        let e = source(json!({"name": "graph", "kind": "dgraph", "schedule": "0 4 * * *", "api_key_secret": "K"}))
            .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("endpoint"));
        let e = source(json!({"name": "graph", "kind": "dgraph", "schedule": "0 4 * * *", "endpoint": "https://x.io",
            "api_key_secret": "K", "format": "csv"}))
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("format"));
        let s = source(json!({"name": "graph", "kind": "dgraph", "schedule": "0 4 * * *",
            "cerebro_email": "ops@acme.com", "cerebro_password_secret": "CEREBRO_PW"}))
        .unwrap();
        let ProviderConfig::Dgraph(d) = &s.provider else { panic!() };
        assert_eq!(d.account.as_ref().map(|a| a.cerebro_url.as_str()), Some("https://cerebro.cloud.dgraph.io/graphql"));
        assert_eq!(s.secret_names(), vec!["CEREBRO_PW"]);
        let e = source(json!({"name": "graph", "kind": "dgraph", "schedule": "0 4 * * *", "endpoint": "https://x.io",
            "cerebro_email": "ops@acme.com", "cerebro_password_secret": "CEREBRO_PW"}))
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("cerebro_email"));
    }

    #[test]
    fn parses_aura_sources_with_defaults_and_modes() {
        let s = source(json!({"name": "g", "kind": "aura", "schedule": "0 4 * * *", "instance_id": "2F49C2B3",
            "client_id_secret": "AURA_ID", "client_secret_secret": "AURA_SECRET", "db_password_secret": "NEO_PW"}))
        .unwrap();
        let ProviderConfig::Aura(a) = &s.provider else { panic!() };
        assert_eq!(a.mode, AuraMode::Both);
        assert_eq!(a.instance_id, "2f49c2b3");
        assert_eq!(a.api_base.as_str(), "https://api.neo4j.io/");
        assert_eq!(a.query_api_base.as_str(), "https://2f49c2b3.databases.neo4j.io/");
        assert_eq!((a.database.as_str(), a.db_user.as_str(), a.page_size), ("neo4j", "neo4j", 1000));
        assert_eq!(s.secret_names(), vec!["AURA_ID", "AURA_SECRET", "NEO_PW"]);
        let snap = source(json!({"name": "g", "kind": "aura", "schedule": "0 4 * * *", "instance_id": "2f49c2b3",
            "client_id_secret": "A", "client_secret_secret": "B", "mode": "snapshot"}))
        .unwrap();
        let ProviderConfig::Aura(a) = &snap.provider else { panic!() };
        assert_eq!(a.mode, AuraMode::Snapshot);
        let e = source(json!({"name": "g", "kind": "aura", "schedule": "0 4 * * *", "instance_id": "2f49c2b3",
            "client_id_secret": "A", "client_secret_secret": "B", "mode": "logical"}))
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("db_password_secret"));
        let e = source(json!({"name": "g", "kind": "aura", "schedule": "0 4 * * *", "instance_id": "xyz",
            "client_id_secret": "A", "client_secret_secret": "B", "mode": "snapshot"}))
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("instance_id"));
    }

    #[test]
    fn parses_dxp_sources_with_exactly_one_auth_mode() {
        let base = json!({"name": "portal", "kind": "dxp", "schedule": "0 4 * * *", "api_base": "https://backup-acme-prd.lfr.cloud"});
        let with = |extra: Value| {
            let mut v = base.clone();
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            source(v)
        };
        let s = with(json!({"user": "ops@acme.com", "password_secret": "DXP_PW"})).unwrap();
        let ProviderConfig::Dxp(d) = &s.provider else { panic!() };
        assert_eq!(d.auth, DxpAuth::Basic { user: "ops@acme.com".into(), password_secret: "DXP_PW".into() });
        let s = with(json!({"user_token_secret": "DXP_TOKEN"})).unwrap();
        let ProviderConfig::Dxp(d) = &s.provider else { panic!() };
        assert_eq!(d.auth, DxpAuth::UserToken { secret: "DXP_TOKEN".into() });
        assert_eq!(s.secret_names(), vec!["DXP_TOKEN"]);
        let s = with(json!({"master_token_secret": "LCP"})).unwrap();
        let ProviderConfig::Dxp(d) = &s.provider else { panic!() };
        assert_eq!(d.auth, DxpAuth::MasterToken { secret: "LCP".into() });
        assert_eq!(with(json!({})).unwrap_err().field.as_deref(), Some("user_token_secret"));
        assert_eq!(with(json!({"user": "u"})).unwrap_err().field.as_deref(), Some("password_secret"));
        assert!(with(json!({"user_token_secret": "A", "master_token_secret": "B"})).is_err());
        let mut no_base = base.clone();
        no_base.as_object_mut().unwrap().remove("api_base");
        no_base["user_token_secret"] = json!("T");
        assert_eq!(source(no_base).unwrap_err().field.as_deref(), Some("api_base"));
    }

    #[test]
    fn unknown_kind_is_refused() {
        let e = err(d1(json!({"kind": "mongo"})));
        assert_eq!(e.field.as_deref(), Some("kind"));
    }

    #[test]
    fn buffers_that_cannot_fit_the_isolate_are_refused_naming_both_fields() {
        let e = err(d1(json!({"part_size_mib": 32, "parts_in_flight": 3})));
        assert_eq!(e.field.as_deref(), Some("part_size_mib"));
        assert!(e.to_string().contains("parts_in_flight"), "{e}");
        let ok = Config::from_value(&json!([d1(json!({"part_size_mib": 16, "parts_in_flight": 4}))])).unwrap();
        assert_eq!(ok.sources[0].transfer.parts_in_flight, 4);
    }

    #[test]
    fn verify_schedule_is_optional_and_checked() {
        let c = Config::from_value(&json!([d1(json!({"verify_schedule": "0 5 * * 0"}))])).unwrap();
        assert_eq!(c.sources[0].verify_schedule.as_ref().map(|s| s.as_str().to_string()).as_deref(), Some("0 5 * * 0"));
        assert!(Config::from_value(&json!([d1(json!({}))])).unwrap().sources[0].verify_schedule.is_none());
        assert_eq!(err(d1(json!({"verify_schedule": "weekly"}))).field.as_deref(), Some("verify_schedule"));
    }

    #[test]
    fn slice_knobs_are_read_and_bounded() {
        let c = Config::from_value(&json!([d1(json!({
            "slice_max_mib": 5, "slice_max_seconds": 2, "max_stalled_slices": 3, "copy_timeout_minutes": 30
        }))]))
        .unwrap();
        let t = c.sources[0].transfer;
        assert_eq!((t.slice_bytes, t.slice_time.as_secs(), t.max_stalled_slices), (5 << 20, 2, 3));
        assert_eq!(t.copy_timeout.as_secs(), 1800);
        assert_eq!(err(d1(json!({"slice_max_seconds": 0}))).field.as_deref(), Some("slice_max_seconds"));
        assert_eq!(err(d1(json!({"parts_in_flight": 0}))).field.as_deref(), Some("parts_in_flight"));
    }

    #[test]
    fn part_size_must_respect_r2_rules() {
        assert_eq!(err(d1(json!({"part_size_mib": 4}))).field.as_deref(), Some("part_size_mib"));
        assert_eq!(err(d1(json!({"part_size_mib": 6000}))).field.as_deref(), Some("part_size_mib"));
        assert_eq!(err(d1(json!({"part_size_mib": 33}))).field.as_deref(), Some("part_size_mib"));
        assert_eq!(err(d1(json!({"part_size_mib": "8"}))).field.as_deref(), Some("part_size_mib"));
    }

    #[test]
    fn token_secret_must_be_a_secret_name_not_a_token() {
        let e = err(d1(json!({"token_secret": "Bearer abc.def"})));
        assert_eq!(e.field.as_deref(), Some("token_secret"));
    }

    #[test]
    fn api_base_must_be_http_url() {
        assert_eq!(err(d1(json!({"api_base": "ftp://x"}))).field.as_deref(), Some("api_base"));
        assert_eq!(err(d1(json!({"api_base": "not a url"}))).field.as_deref(), Some("api_base"));
    }

    #[test]
    fn no_data_with_no_schema_is_refused() {
        let e = err(d1(json!({"dump_options": {"no_data": true, "no_schema": true}})));
        assert_eq!(e.field.as_deref(), Some("dump_options.no_schema"));
    }

    #[test]
    fn duplicate_and_malformed_names_are_refused() {
        let e = Config::from_value(&json!([d1(json!({})), d1(json!({}))])).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("name"));
        assert!(e.to_string().contains("another source"));
        for bad in ["", "App", "a/b", "-x", "x y"] {
            assert_eq!(err(d1(json!({"name": bad}))).field.as_deref(), Some("name"), "{bad:?}");
        }
    }

    #[test]
    fn a_source_without_a_name_is_named_by_position() {
        let mut v = d1(json!({}));
        v.as_object_mut().unwrap().remove("name");
        let e = Config::from_value(&json!([d1(json!({"name": "ok"})), v])).unwrap_err();
        assert_eq!(e.source_name.as_deref(), Some("#2"));
        assert_eq!(e.field.as_deref(), Some("name"));
    }

    #[test]
    fn top_level_must_be_an_array() {
        let e = Config::from_value(&json!({"name": "x"})).unwrap_err();
        assert!(e.to_string().contains("array"));
        assert_eq!(e.source_name, None);
    }

    #[test]
    fn retry_max_delay_must_not_undercut_base() {
        let e = err(d1(json!({"retry": {"base_ms": 1000, "max_delay_ms": 10}})));
        assert_eq!(e.field.as_deref(), Some("retry.max_delay_ms"));
    }
}
