//! Source configuration: what to back up, when, and with which credentials.
//!
//! Sources are declared in `wrangler.toml` as the `FERRY_SOURCES` var (an array of tables, or the
//! same as a JSON string). Parsing is strict: an unknown field, a missing field or a bad value is
//! an error that names the source and the field, and a Worker with a bad config refuses to run
//! anything. Secrets are never in the config, only the *names* of the Worker secrets that hold
//! them.
//!
//! A source table is read by serde in three parts, each a type that derives `Deserialize` with
//! `deny_unknown_fields`: the general fields (here), the copy engine's ([`TransferSettings`]) and
//! the provider's own, chosen by `kind` ([`ProviderConfig`], each provider module owning its
//! type and checks). `serde_path_to_error` keeps the path of a bad field (`retry.max_delay_ms`).
//! A [`SourceConfig`] also serializes: a job keeps a snapshot of the one it started with.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::{Map, Value};

use crate::fields::{self, path_error, valid_name, FieldError};
use crate::providers::ProviderConfig;
use crate::replica::ReplicaConfig;
use crate::retention::RetentionPolicy;
use crate::retry::RetryPolicy;
use crate::schedule::Schedule;
use crate::transfer::TransferSettings;

/// Smallest multipart part R2 accepts (every part but the last).
pub const MIN_PART_SIZE: u64 = crate::transfer::MIN_PART_MIB << 20;
/// Largest part Ferry buffers: (parts in flight + 1) parts must fit the isolate's memory budget.
pub const MAX_PART_SIZE: u64 = crate::transfer::MAX_PART_MIB << 20;
/// Default part size: big enough for few parts, small enough to buffer in a 128 MB isolate.
pub const DEFAULT_PART_SIZE: u64 = 8 * 1024 * 1024;

/// The largest `max_age_minutes`: a year and a day.
pub const MAX_AGE_MINUTES: u64 = 366 * 24 * 60;

/// The whole configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Every declared source, in declaration order.
    pub sources: Vec<SourceConfig>,
}

/// One database to back up, with every default filled in. Serialized (with a job, as the
/// snapshot it runs with) in the config's own field names and units.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourceConfig {
    /// Unique, URL- and key-safe name; the R2 prefix and the Durable Object name.
    pub name: String,
    /// When scheduled backups run (UTC).
    pub schedule: Schedule,
    /// When scheduled verifications of the newest backup run (UTC), if at all.
    #[serde(default)]
    pub verify_schedule: Option<Schedule>,
    /// When scheduled restore drills of the newest backup run (UTC), if at all (D1 and Aura).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drill_schedule: Option<Schedule>,
    /// The age past which the newest committed backup is stale (`max_age_minutes`); `None`: two
    /// periods of the schedule, at least an hour (see [`crate::health`]).
    #[serde(
        default,
        rename = "max_age_minutes",
        skip_serializing_if = "Option::is_none",
        serialize_with = "fields::ser_opt_minutes",
        deserialize_with = "fields::opt_minutes::<_, 1, MAX_AGE_MINUTES>"
    )]
    pub max_age: Option<Duration>,
    /// How copies into R2 are cut into parts and slices (`part_size_mib`, `parts_in_flight`,
    /// `slice_max_mib`, `slice_max_seconds`, `slice_max_pages`, `max_stalled_slices`,
    /// `copy_timeout_minutes`).
    pub transfer: TransferSettings,
    /// How transient failures are retried.
    pub retry: RetryPolicy,
    /// How long to wait between status polls of a running export.
    #[serde(
        rename = "poll_interval_ms",
        serialize_with = "fields::ser_millis",
        deserialize_with = "fields::millis::<_, 100, 600_000>"
    )]
    pub poll_interval: Duration,
    /// How long an export may run before the job is failed.
    #[serde(
        rename = "export_timeout_minutes",
        serialize_with = "fields::ser_minutes",
        deserialize_with = "fields::minutes::<_, 1, 10_080>"
    )]
    pub export_timeout: Duration,
    /// The provider and its settings.
    pub provider: ProviderConfig,
    /// Which backups to keep (`retention` table); `None` keeps every backup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention: Option<RetentionPolicy>,
    /// Where a second copy of every committed backup goes (`replica` table); `None`: no copy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replica: Option<ReplicaConfig>,
    /// How long a job of each task may run before it is stopped (`deadline_seconds` table).
    #[serde(default, rename = "deadline_seconds", skip_serializing_if = "Deadlines::is_default")]
    pub deadlines: Deadlines,
    /// The age recipients (`age1…`) every artifact of the source is encrypted to before it
    /// leaves the Worker (`age_recipients`); empty: artifacts are stored as the provider serves
    /// them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub age_recipients: Vec<crate::encryption::Recipient>,
    /// The name of the Worker secret holding the age identity (`AGE-SECRET-KEY-1…`, or an
    /// `age-keygen` key file) that restores and drills decrypt encrypted backups with
    /// (`age_identity_secret`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub age_identity_secret: Option<String>,
}

/// The largest per-task deadline: 30 days.
pub const MAX_DEADLINE_SECONDS: u64 = 30 * 24 * 3600;

/// Per-task deadlines, in seconds (`deadline_seconds = { restore = 7200 }`): how long a job of
/// that task may run, from the moment it leaves the queue, before it is stopped like a cancel
/// (what it started is cleaned up) and fails naming its deadline. An absent task takes its
/// default ([`Deadlines::of`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Deadlines {
    /// A backup: default `export_timeout_minutes + copy_timeout_minutes + 1 h` (31 h).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "opt_deadline")]
    pub export: Option<u64>,
    /// A verification: default 24 h.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "opt_deadline")]
    pub verify: Option<u64>,
    /// A second copy: default `copy_timeout_minutes + 1 h` (25 h).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "opt_deadline")]
    pub replicate: Option<u64>,
    /// A restore: default 48 h.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "opt_deadline")]
    pub restore: Option<u64>,
    /// A restore drill: default 24 h.
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "opt_deadline")]
    pub drill: Option<u64>,
}

impl Deadlines {
    fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The deadline of a job of `task` on `source`, and the field that sets it.
    pub fn of(&self, task: crate::identity::Task, source: &SourceConfig) -> (Duration, &'static str) {
        use crate::identity::Task;
        const HOUR: Duration = Duration::from_secs(3600);
        let (set, default, field) = match task {
            Task::Export => {
                (self.export, source.export_timeout + source.transfer.copy_timeout + HOUR, "deadline_seconds.export")
            }
            Task::Verify => (self.verify, 24 * HOUR, "deadline_seconds.verify"),
            Task::Replicate => (self.replicate, source.transfer.copy_timeout + HOUR, "deadline_seconds.replicate"),
            Task::Restore => (self.restore, 48 * HOUR, "deadline_seconds.restore"),
            Task::Drill => (self.drill, 24 * HOUR, "deadline_seconds.drill"),
        };
        (set.map_or(default, Duration::from_secs), field)
    }
}

/// An optional deadline: whole seconds from 1 to [`MAX_DEADLINE_SECONDS`].
fn opt_deadline<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    struct Secs(u64);
    impl<'de> Deserialize<'de> for Secs {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            fields::secs::<D, 1, MAX_DEADLINE_SECONDS>(d).map(|s| Secs(s.as_secs()))
        }
    }
    Option::<Secs>::deserialize(d).map(|o| o.map(|s| s.0))
}

impl SourceConfig {
    /// The `kind` string of this source.
    pub fn kind(&self) -> &'static str {
        self.provider.kind()
    }

    /// Names of the Worker secrets this source needs.
    pub fn secret_names(&self) -> Vec<&str> {
        let mut names = self.provider.secret_names();
        names.extend(self.age_identity_secret.as_deref());
        names.extend(self.replica.as_ref().and_then(ReplicaConfig::secret_name));
        names
    }
}

impl Config {
    /// The source called `name`.
    pub fn source(&self, name: &str) -> Option<&SourceConfig> {
        self.sources.iter().find(|s| s.name == name)
    }

    /// Parses `FERRY_SOURCES`: an array of source tables, or a JSON string holding one.
    pub fn from_value(value: &Value) -> Result<Self, ConfigError> {
        Self::with_defaults(value, None)
    }

    /// `FERRY_SOURCES` with `FERRY_DEFAULTS`: a table of fields every source shares (its
    /// `age_recipients`, `retention`, `retry`, part sizes, …), which a source that does not set
    /// a field takes. A default of a field only some kinds have is refused, naming it.
    pub fn with_defaults(value: &Value, defaults: Option<&Value>) -> Result<Self, ConfigError> {
        let owned;
        let value = match value {
            Value::String(s) => {
                owned = serde_json::from_str::<Value>(s)
                    .map_err(|e| ConfigError::top(format!("FERRY_SOURCES is not valid JSON: {e}")))?;
                &owned
            }
            other => other,
        };
        let defaults = shared_defaults(defaults)?;
        let items =
            value.as_array().ok_or_else(|| ConfigError::top("FERRY_SOURCES must be an array of source tables"))?;
        let mut sources: Vec<SourceConfig> = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            let item = match (item, &defaults) {
                (Value::Object(table), Some(defaults)) => {
                    let mut table = table.clone();
                    for (k, v) in defaults {
                        table.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                    Value::Object(table)
                }
                _ => item.clone(),
            };
            let source = parse_source(i, &item)?;
            if sources.iter().any(|s| s.name == source.name) {
                return Err(ConfigError::field(&source.name, FieldError::new("name", "is used by another source")));
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

    fn field(source: &str, e: FieldError) -> Self {
        Self { source_name: Some(source.to_string()), field: Some(e.field), problem: e.problem }
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

/// The fields every kind shares, as written in the source table (besides `kind` and the
/// transfer settings).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct General {
    #[serde(deserialize_with = "source_name")]
    name: String,
    schedule: Schedule,
    #[serde(default)]
    verify_schedule: Option<Schedule>,
    #[serde(default)]
    drill_schedule: Option<Schedule>,
    #[serde(default, deserialize_with = "fields::opt_minutes::<_, 1, MAX_AGE_MINUTES>")]
    max_age_minutes: Option<Duration>,
    /// Per kind by default ([`ProviderConfig::default_poll_interval`]).
    #[serde(default, deserialize_with = "fields::opt_millis::<_, 100, 600_000>")]
    poll_interval_ms: Option<Duration>,
    #[serde(default = "default_export_timeout", deserialize_with = "fields::minutes::<_, 1, 10_080>")]
    export_timeout_minutes: Duration,
    #[serde(default)]
    retry: RetryPolicy,
    #[serde(default)]
    deadline_seconds: Deadlines,
    #[serde(default)]
    age_recipients: Vec<crate::encryption::Recipient>,
    #[serde(default, deserialize_with = "fields::opt_secret_name")]
    age_identity_secret: Option<String>,
}

fn default_export_timeout() -> Duration {
    Duration::from_secs(6 * 3600)
}

fn source_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    let name = fields::text(d)?;
    if !valid_name(&name) {
        return Err(serde::de::Error::custom(
            "must be 1-63 characters of a-z, 0-9, '-', '_' or '.', starting with a letter or digit",
        ));
    }
    Ok(name)
}

/// `null` means absent, at any depth (TOML has no null; a JSON config may).
fn without_nulls(map: &Map<String, Value>) -> Map<String, Value> {
    map.iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| match v {
            Value::Object(inner) => (k.clone(), Value::Object(without_nulls(inner))),
            other => (k.clone(), other.clone()),
        })
        .collect()
}

fn parse_source(index: usize, value: &Value) -> Result<SourceConfig, ConfigError> {
    let mut label = format!("#{}", index + 1);
    let Some(table) = value.as_object() else {
        return Err(ConfigError { source_name: Some(label), field: None, problem: "must be a table".into() });
    };
    let mut table = without_nulls(table);
    if let Some(name) = table.get("name").and_then(Value::as_str).map(str::trim).filter(|n| valid_name(n)) {
        label = name.to_string();
    }
    let at = |e: FieldError| ConfigError::field(&label, e);
    let kind = match table.remove("kind") {
        None => return Err(at(FieldError::new("kind", "is required"))),
        Some(Value::String(kind)) => kind.trim().to_string(),
        Some(_) => return Err(at(FieldError::new("kind", "must be a string"))),
    };
    let retention = match table.remove("retention") {
        None => None,
        Some(v) => {
            Some(RetentionPolicy::from_value(&v).map_err(|e| at(FieldError::new(e.path("retention"), e.problem)))?)
        }
    };
    let replica = match table.remove("replica") {
        None => None,
        Some(v) => Some(ReplicaConfig::from_value(&v).map_err(|e| {
            at(if e.field.is_empty() { FieldError::new("replica", e.problem) } else { e.within("replica") })
        })?),
    };
    // Each field goes to the part that declares it; the provider's part gets the rest, so an
    // unknown field is reported by its `deny_unknown_fields`.
    let (general_names, transfer_names) =
        (fields::struct_fields::<General>(), fields::struct_fields::<TransferSettings>());
    let (mut general, mut transfer) = (Map::new(), Map::new());
    let mut provider = Map::new();
    for (key, value) in table {
        let part = if general_names.contains(&key.as_str()) {
            &mut general
        } else if transfer_names.contains(&key.as_str()) {
            &mut transfer
        } else {
            &mut provider
        };
        part.insert(key, value);
    }
    let general: General = read(general).map_err(at)?;
    general.retry.check().map_err(|e| at(e.within("retry")))?;
    let transfer: TransferSettings = read(transfer).map_err(at)?;
    transfer.check().map_err(at)?;
    let sealed_peak = transfer.peak_memory() + crate::transfer::sealed::MEMORY;
    if !general.age_recipients.is_empty() && sealed_peak > crate::transfer::MEMORY_BUDGET {
        return Err(at(FieldError::new(
            "part_size_mib",
            format!(
                "and parts_in_flight need {} MiB with encryption (age_recipients adds {} MiB of pages and \
                 ciphertext), more than the {} MiB a 128 MB isolate can spare; lower part_size_mib or parts_in_flight",
                sealed_peak >> 20,
                crate::transfer::sealed::MEMORY >> 20,
                crate::transfer::MEMORY_BUDGET >> 20
            ),
        )));
    }
    let Some(provider) = ProviderConfig::from_fields(&kind, Value::Object(provider)) else {
        let kinds: Vec<String> = ProviderConfig::KINDS.iter().map(|k| format!("{k:?}")).collect();
        return Err(at(FieldError::new("kind", format!("must be one of {} (got {kind:?})", kinds.join(", ")))));
    };
    let mut provider = provider.map_err(|e| at(path_error(e)))?;
    provider.check().map_err(at)?;
    if general.drill_schedule.is_some() && !matches!(provider, ProviderConfig::D1(_) | ProviderConfig::Aura(_)) {
        return Err(at(FieldError::new(
            "drill_schedule",
            "restore drills are implemented for D1 and Aura sources only",
        )));
    }
    if let (Some(_), ProviderConfig::Aura(aura)) = (&general.drill_schedule, &provider) {
        match crate::providers::aura::drill::drill_target(aura) {
            Err(why) => {
                return Err(at(FieldError::new(
                    "drill_scratch",
                    format!("is required for drills (drill_schedule): {why}"),
                )))
            }
            // A drill into a second database of the instance loads through the Query API with
            // the database user's password (the same rule as `restore::aura::plan`; a test there
            // checks that every drill config accepted here plans).
            Ok(crate::providers::aura::drill::DrillTarget::Database) if aura.db_password_secret.is_none() => {
                return Err(at(FieldError::new(
                    "db_password_secret",
                    "is required for drills into drill_database (drill_schedule): the drill loads the backup \
                     through the Query API as db_user",
                )))
            }
            Ok(_) => {}
        }
    }
    Ok(SourceConfig {
        name: general.name,
        schedule: general.schedule,
        verify_schedule: general.verify_schedule,
        drill_schedule: general.drill_schedule,
        max_age: general.max_age_minutes,
        transfer,
        retry: general.retry,
        poll_interval: general.poll_interval_ms.unwrap_or_else(|| provider.default_poll_interval()),
        export_timeout: general.export_timeout_minutes,
        provider,
        retention,
        replica,
        deadlines: general.deadline_seconds,
        age_recipients: general.age_recipients,
        age_identity_secret: general.age_identity_secret,
    })
}

/// `FERRY_DEFAULTS` (a table, or its JSON text), checked to hold only fields every source has.
fn shared_defaults(defaults: Option<&Value>) -> Result<Option<Map<String, Value>>, ConfigError> {
    let parsed;
    let table = match defaults {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => {
            parsed = serde_json::from_str::<Value>(s)
                .map_err(|e| ConfigError::top(format!("FERRY_DEFAULTS is not valid JSON: {e}")))?;
            &parsed
        }
        Some(other) => other,
    };
    let table = table.as_object().ok_or_else(|| ConfigError::top("FERRY_DEFAULTS must be a table"))?;
    let shared = [fields::struct_fields::<General>(), fields::struct_fields::<TransferSettings>()].concat();
    for key in table.keys() {
        let per_source = matches!(key.as_str(), "name" | "schedule" | "kind");
        let shared = shared.contains(&key.as_str()) || matches!(key.as_str(), "retention" | "replica");
        if per_source || !shared {
            return Err(ConfigError::top(format!(
                "FERRY_DEFAULTS: \"{key}\" is not a field every source has; set it on the sources instead"
            )));
        }
    }
    Ok(Some(without_nulls(table)))
}

fn read<T: for<'de> Deserialize<'de>>(part: Map<String, Value>) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(Value::Object(part)).map_err(path_error)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::aura::AuraMode;
    use crate::providers::d1::DumpOptions;
    use crate::providers::dgraph::DgraphFormat;
    use crate::providers::dxp::DxpAuth;
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
        assert_eq!(d.api_base.as_ref().unwrap().as_str(), "https://api.cloudflare.com/client/v4");
        assert_eq!(d.dump_options, DumpOptions::default());
        assert_eq!(s.max_age, None, "derived from the schedule");
    }

    #[test]
    fn max_age_minutes_is_optional_whole_minutes_from_one() {
        let c = Config::from_value(&json!([d1(json!({ "max_age_minutes": 90 }))])).unwrap();
        assert_eq!(c.sources[0].max_age, Some(Duration::from_secs(90 * 60)));
        for bad in [json!(0), json!(-5), json!("1h"), json!(1.5), json!(MAX_AGE_MINUTES + 1)] {
            let e = err(d1(json!({ "max_age_minutes": bad })));
            assert_eq!(
                (e.source_name.as_deref(), e.field.as_deref()),
                (Some("app-db"), Some("max_age_minutes")),
                "{e}"
            );
        }
    }

    #[test]
    fn a_replica_table_is_optional_and_its_errors_name_the_field() {
        let c = Config::from_value(&json!([d1(json!({}))])).unwrap();
        assert_eq!(c.sources[0].replica, None);
        let c = Config::from_value(&json!([d1(json!({ "replica": { "bucket_binding": "BACKUPS_EU" } }))])).unwrap();
        assert_eq!(c.sources[0].replica.as_ref().and_then(|r| r.bucket_binding()).as_deref(), Some("BACKUPS_EU"));
        for (bad, field) in [
            (json!({ "bucket_binding": "BACKUPS" }), "replica.bucket_binding"),
            (json!({ "bucket_binding": 5 }), "replica.bucket_binding"),
            (json!({ "bucket_binding": "B", "extra": 1 }), "replica.extra"),
            (json!("BACKUPS_EU"), "replica"),
        ] {
            let e = err(d1(json!({ "replica": bad })));
            assert_eq!((e.source_name.as_deref(), e.field.as_deref()), (Some("app-db"), Some(field)), "{e}");
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
        assert_eq!(d.api_base.as_ref().unwrap().as_str(), "http://127.0.0.1:9000/client/v4");
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
        assert!(d.acl().is_none());
        assert_eq!(s.secret_names(), vec!["DGRAPH_KEY"]);
        let s = source(json!({"name": "graph", "kind": "dgraph", "schedule": "0 4 * * *", "endpoint": "https://x.io",
            "api_key_secret": "K", "format": "rdf", "namespace": -1, "user_id": "groot", "password_secret": "P"}))
        .unwrap();
        let ProviderConfig::Dgraph(d) = &s.provider else { panic!() };
        assert_eq!(d.format, DgraphFormat::Rdf);
        assert_eq!(d.namespace, Some(-1));
        assert_eq!(d.acl().map(|a| (a.user_id, a.login_namespace)), Some(("groot", 0)));
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
        assert_eq!(d.account().map(|a| a.cerebro_url.as_str()), Some("https://cerebro.cloud.dgraph.io/graphql"));
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
        assert_eq!(a.api_base.as_ref().unwrap().as_str(), "https://api.neo4j.io/");
        assert_eq!(a.query_api_base.as_ref().unwrap().as_str(), "https://2f49c2b3.databases.neo4j.io/");
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
    fn an_aura_drill_into_drill_database_without_db_password_secret_is_refused_naming_the_field() {
        let aura = json!({"name": "g", "kind": "aura", "schedule": "0 4 * * *", "instance_id": "2f49c2b3",
            "client_id_secret": "A", "client_secret_secret": "B", "mode": "snapshot",
            "drill_schedule": "0 6 * * 1", "drill_database": "drill"});
        let e = err(aura.clone());
        assert_eq!((e.source_name.as_deref(), e.field.as_deref()), (Some("g"), Some("db_password_secret")), "{e}");
        assert!(e.to_string().contains("drill_database"), "{e}");
        let mut with_password = aura;
        with_password["db_password_secret"] = json!("NEO4J_PASSWORD");
        assert!(Config::from_value(&json!([with_password])).is_ok());
    }

    #[test]
    fn deadlines_are_optional_bounded_per_task_and_named_when_wrong() {
        use crate::identity::Task;
        let s = &Config::from_value(&json!([d1(json!({}))])).unwrap().sources[0];
        assert_eq!(s.deadlines, Deadlines::default());
        assert_eq!(s.deadlines.of(Task::Export, s), (Duration::from_secs(31 * 3600), "deadline_seconds.export"));
        assert_eq!(s.deadlines.of(Task::Restore, s).0, Duration::from_secs(48 * 3600));
        assert_eq!(s.deadlines.of(Task::Drill, s).0, Duration::from_secs(24 * 3600));
        assert_eq!(s.deadlines.of(Task::Verify, s).0, Duration::from_secs(24 * 3600));
        assert_eq!(s.deadlines.of(Task::Replicate, s).0, Duration::from_secs(25 * 3600));
        let c = Config::from_value(&json!([d1(json!({"deadline_seconds": {"restore": 20, "drill": 30}}))])).unwrap();
        let s = &c.sources[0];
        assert_eq!(s.deadlines.of(Task::Restore, s), (Duration::from_secs(20), "deadline_seconds.restore"));
        assert_eq!(s.deadlines.of(Task::Drill, s).0, Duration::from_secs(30));
        // A job's snapshot keeps them.
        let back: SourceConfig = serde_json::from_value(serde_json::to_value(s).unwrap()).unwrap();
        assert_eq!(back.deadlines, s.deadlines);
        assert_eq!(
            err(d1(json!({"deadline_seconds": {"restore": 0}}))).field.as_deref(),
            Some("deadline_seconds.restore")
        );
        assert_eq!(
            err(d1(json!({"deadline_seconds": {"backup": 10}}))).field.as_deref(),
            Some("deadline_seconds.backup")
        );
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
        assert_eq!(d.auth().unwrap(), DxpAuth::Basic { user: "ops@acme.com".into(), password_secret: "DXP_PW".into() });
        let s = with(json!({"user_token_secret": "DXP_TOKEN"})).unwrap();
        let ProviderConfig::Dxp(d) = &s.provider else { panic!() };
        assert_eq!(d.auth().unwrap(), DxpAuth::UserToken { secret: "DXP_TOKEN".into() });
        assert_eq!(s.secret_names(), vec!["DXP_TOKEN"]);
        let s = with(json!({"master_token_secret": "LCP"})).unwrap();
        let ProviderConfig::Dxp(d) = &s.provider else { panic!() };
        assert_eq!(d.auth().unwrap(), DxpAuth::MasterToken { secret: "LCP".into() });
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
    fn drill_schedule_is_optional_checked_and_for_d1_and_aura_only() {
        let c = Config::from_value(&json!([d1(json!({"drill_schedule": "0 6 * * 1"}))])).unwrap();
        assert_eq!(c.sources[0].drill_schedule.as_ref().map(|s| s.as_str().to_string()).as_deref(), Some("0 6 * * 1"));
        assert!(Config::from_value(&json!([d1(json!({}))])).unwrap().sources[0].drill_schedule.is_none());
        assert_eq!(err(d1(json!({"drill_schedule": "weekly"}))).field.as_deref(), Some("drill_schedule"));
        let aura = json!({"name": "g", "kind": "aura", "schedule": "0 4 * * *", "instance_id": "2f49c2b3",
            "client_id_secret": "A", "client_secret_secret": "B", "mode": "snapshot", "drill_schedule": "0 6 * * 1"});
        assert_eq!(err(aura.clone()).field.as_deref(), Some("drill_scratch"), "a drill needs somewhere to load");
        let mut with_instance = aura.clone();
        with_instance["drill_scratch"] = json!({"memory": "1GB"});
        assert!(Config::from_value(&json!([with_instance])).unwrap().sources[0].drill_schedule.is_some());
        let mut with_scratch = aura;
        with_scratch["drill_database"] = json!("scratch");
        with_scratch["db_password_secret"] = json!("NEO4J_PASSWORD");
        assert!(Config::from_value(&json!([with_scratch])).unwrap().sources[0].drill_schedule.is_some());
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

    /// The source and the field of a serde error, as shown.
    fn named(v: Value) -> (Option<String>, Option<String>, String) {
        let e = err(v);
        let shown = e.to_string();
        (e.source_name, e.field, shown)
    }

    #[test]
    fn serde_errors_name_the_source_and_the_field_in_the_general_fields() {
        let (source, field, shown) = named(d1(json!({"part_size_mib": "8"})));
        assert_eq!((source.as_deref(), field.as_deref()), (Some("app-db"), Some("part_size_mib")));
        assert_eq!(
            shown,
            "invalid configuration: source \"app-db\": field \"part_size_mib\" has an invalid type: string \"8\", \
             expected a whole number from 5 to 32"
        );
        let (_, field, shown) = named(d1(json!({"poll_interval_ms": true})));
        assert_eq!(field.as_deref(), Some("poll_interval_ms"));
        assert!(shown.contains("expected a whole number from 100 to 600000"), "{shown}");
        let (_, field, _) = named(d1(json!({"verify_schedule": 3})));
        assert_eq!(field.as_deref(), Some("verify_schedule"));
        let (_, field, shown) = named(d1(json!({"export_timeout_minutes": 0})));
        assert_eq!(field.as_deref(), Some("export_timeout_minutes"));
        assert!(shown.ends_with("must be a whole number from 1 to 10080 (got 0)"), "{shown}");
        let (_, field, shown) = named(d1(json!({"kind": 7})));
        assert_eq!((field.as_deref(), shown.ends_with("must be a string")), (Some("kind"), true), "{shown}");
        let (_, field, shown) = named(d1(json!({"kind": "mongo"})));
        assert_eq!(field.as_deref(), Some("kind"));
        assert!(shown.ends_with("must be one of \"d1\", \"dgraph\", \"aura\", \"dxp\" (got \"mongo\")"), "{shown}");
        let mut no_schedule = d1(json!({}));
        no_schedule.as_object_mut().unwrap().remove("schedule");
        assert_eq!(named(no_schedule).1.as_deref(), Some("schedule"));
        let mut no_kind = d1(json!({}));
        no_kind.as_object_mut().unwrap().remove("kind");
        let (_, field, shown) = named(no_kind);
        assert_eq!((field.as_deref(), shown.ends_with("is required")), (Some("kind"), true));
    }

    #[test]
    fn serde_errors_name_the_source_and_the_field_in_retry() {
        let (source, field, shown) = named(d1(json!({"retry": {"attempts": 1}})));
        assert_eq!((source.as_deref(), field.as_deref()), (Some("app-db"), Some("retry.attempts")));
        assert!(shown.ends_with("field \"retry.attempts\" is not a known field"), "{shown}");
        let (_, field, shown) = named(d1(json!({"retry": {"max_attempts": "x"}})));
        assert_eq!(field.as_deref(), Some("retry.max_attempts"));
        assert!(shown.contains("invalid type: string \"x\""), "{shown}");
        let (_, field, shown) = named(d1(json!({"retry": {"base_ms": 0}})));
        assert_eq!(field.as_deref(), Some("retry.base_ms"));
        assert!(shown.ends_with("must be a whole number from 1 to 3600000 (got 0)"), "{shown}");
        let (_, field, shown) = named(d1(json!({"retry": 3})));
        assert_eq!(field.as_deref(), Some("retry"));
        assert!(shown.ends_with("expected a table"), "{shown}");
    }

    #[test]
    fn serde_errors_name_the_source_and_the_field_in_each_providers_fields() {
        let base = |kind: &str, extra: Value| {
            let mut v = json!({"name": format!("{kind}-src"), "kind": kind, "schedule": "0 4 * * *"});
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        let dgraph = |extra: Value| {
            let mut v = base("dgraph", json!({"endpoint": "https://x.io", "api_key_secret": "K"}));
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        let aura = |extra: Value| {
            let mut v = base(
                "aura",
                json!({"instance_id": "2f49c2b3", "client_id_secret": "A", "client_secret_secret": "B", "mode": "snapshot"}),
            );
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        let dxp = |extra: Value| {
            let mut v = base("dxp", json!({"api_base": "https://backup.lfr.cloud", "user_token_secret": "T"}));
            for (k, x) in extra.as_object().unwrap() {
                v[k] = x.clone();
            }
            v
        };
        let cases: Vec<(Value, &str, &str, &str)> = vec![
            // D1: unknown, wrong type, missing, nested.
            (d1(json!({"database": "x"})), "app-db", "database", "is not a known field"),
            (
                d1(json!({"database_id": 5})),
                "app-db",
                "database_id",
                "has an invalid type: integer `5`, expected a string",
            ),
            (d1(json!({"database_id": "  "})), "app-db", "database_id", "must not be empty"),
            (
                d1(json!({"database_id": "prod/*"})),
                "app-db",
                "database_id",
                "a pattern of database names cannot hold '/', '?' or '#'",
            ),
            (
                d1(json!({"database_id": "*", "list_page_size": 5})),
                "app-db",
                "list_page_size",
                "must be a whole number from 10 to 10000 (got 5)",
            ),
            (
                d1(json!({"dump_options": {"no_data": "yes"}})),
                "app-db",
                "dump_options.no_data",
                "has an invalid type: string \"yes\", expected a boolean",
            ),
            (
                d1(json!({"dump_options": {"tables": [1]}})),
                "app-db",
                "dump_options.tables[0]",
                "must be an array of non-empty strings",
            ),
            // Dgraph.
            (dgraph(json!({"endpoint_url": "https://y.io"})), "dgraph-src", "endpoint_url", "is not a known field"),
            (
                dgraph(json!({"namespace": "all"})),
                "dgraph-src",
                "namespace",
                "has an invalid type: string \"all\", expected i64",
            ),
            (
                dgraph(json!({"format": "csv"})),
                "dgraph-src",
                "format",
                "has an unknown variant `csv`, expected `json` or `rdf`",
            ),
            (dgraph(json!({"endpoint": "ftp://x"})), "dgraph-src", "endpoint", "must be an http:// or https:// URL"),
            (
                dgraph(json!({"namespace": -2})),
                "dgraph-src",
                "namespace",
                "must be a namespace id, or -1 for every namespace",
            ),
            // Aura.
            (aura(json!({"snapshot": true})), "aura-src", "snapshot", "is not a known field"),
            (aura(json!({"page_size": 0})), "aura-src", "page_size", "must be a whole number from 1 to 50000 (got 0)"),
            (
                aura(json!({"page_size": "big"})),
                "aura-src",
                "page_size",
                "has an invalid type: string \"big\", expected a whole number from 1 to 50000",
            ),
            (aura(json!({"client_secret_secret": null})), "aura-src", "client_secret_secret", "is required"),
            (
                aura(json!({"mode": "all"})),
                "aura-src",
                "mode",
                "has an unknown variant `all`, expected one of `snapshot`, `logical`, `both`",
            ),
            // DXP.
            (dxp(json!({"bucket": "b"})), "dxp-src", "bucket", "is not a known field"),
            (
                dxp(json!({"user": 1, "password_secret": "P", "user_token_secret": null})),
                "dxp-src",
                "user",
                "has an invalid type: integer `1`, expected a string",
            ),
            (dxp(json!({"api_base": null})), "dxp-src", "api_base", "is required"),
            (
                dxp(json!({"user_token_secret": "not a name"})),
                "dxp-src",
                "user_token_secret",
                "must be the name of a Worker secret (letters, digits, '_'), not the secret itself",
            ),
        ];
        for (value, source, field, problem) in cases {
            let e = err(value.clone());
            assert_eq!(e.source_name.as_deref(), Some(source), "{value}");
            assert_eq!(e.field.as_deref(), Some(field), "{value}: {e}");
            assert_eq!(e.problem, problem, "{value}");
        }
    }

    #[test]
    fn a_source_config_round_trips_through_its_serialized_form() {
        for v in [
            d1(
                json!({"verify_schedule": "0 5 * * 0", "max_age_minutes": 720, "part_size_mib": 16, "slice_max_seconds": 30,
                      "retry": {"max_attempts": 2, "base_ms": 5, "max_delay_ms": 50}, "dump_options": {"tables": ["a"]}}),
            ),
            json!({"name": "g", "kind": "dgraph", "schedule": "0 4 * * *", "cerebro_email": "ops@acme.com",
                   "cerebro_password_secret": "CEREBRO_PW"}),
            json!({"name": "g", "kind": "dgraph", "schedule": "0 4 * * *", "api_base": "https://x.io",
                   "api_key_secret": "K", "user_id": "groot", "password_secret": "P", "format": "rdf", "namespace": -1}),
            json!({"name": "n", "kind": "aura", "schedule": "0 4 * * *", "instance_id": "2F49C2B3",
                   "client_id_secret": "A", "client_secret_secret": "B", "db_password_secret": "C"}),
            json!({"name": "x", "kind": "dxp", "schedule": "0 4 * * *", "api_base": "https://backup.lfr.cloud",
                   "user": "ops@acme.com", "password_secret": "P"}),
        ] {
            let parsed = source(v).unwrap();
            let stored = serde_json::to_value(&parsed).unwrap();
            assert_eq!(stored["provider"]["kind"], parsed.kind());
            let back: SourceConfig = serde_json::from_value(stored.clone()).unwrap();
            assert_eq!(back, parsed, "{stored}");
        }
    }

    #[test]
    fn defaults_per_kind_are_kept() {
        let poll = |v: Value| source(v).unwrap().poll_interval.as_millis();
        assert_eq!(poll(d1(json!({}))), 1000);
        assert_eq!(
            poll(
                json!({"name": "g", "kind": "dgraph", "schedule": "0 4 * * *", "endpoint": "https://x.io", "api_key_secret": "K"})
            ),
            2000
        );
        assert_eq!(
            poll(json!({"name": "n", "kind": "aura", "schedule": "0 4 * * *", "instance_id": "2f49c2b3",
                        "client_id_secret": "A", "client_secret_secret": "B", "mode": "snapshot"})),
            10_000
        );
        assert_eq!(
            poll(
                json!({"name": "x", "kind": "dxp", "schedule": "0 4 * * *", "api_base": "https://b.io", "user_token_secret": "T"})
            ),
            1000
        );
        let s = source(d1(json!({}))).unwrap();
        assert_eq!((s.export_timeout.as_secs(), s.retry), (6 * 3600, RetryPolicy::default()));
        let s = source(json!({"name": "g", "kind": "dgraph", "schedule": "0 4 * * *", "endpoint": "https://e.io",
                              "api_base": "https://override.io", "api_key_secret": "K"}))
        .unwrap();
        let ProviderConfig::Dgraph(d) = &s.provider else { panic!() };
        assert_eq!(
            d.endpoint.as_ref().map(url::Url::as_str),
            Some("https://override.io/"),
            "api_base overrides endpoint"
        );
    }

    #[test]
    fn ferry_defaults_give_every_source_the_shared_fields_it_does_not_set() {
        let recipient = crate::encryption::Identity::from_secret_bytes([5u8; 32]).to_recipient().to_string();
        let sources = json!([
            {"name": "a", "kind": "d1", "schedule": "0 3 * * *", "account_id": "acc", "database_id": "db",
             "token_secret": "D1_TOKEN"},
            {"name": "b", "kind": "d1", "schedule": "0 3 * * *", "account_id": "acc", "database_id": "db",
             "token_secret": "D1_TOKEN", "age_recipients": [], "retention": {"keep_last": 2}}
        ]);
        let defaults =
            json!({"age_recipients": [recipient], "age_identity_secret": "AGE_ID", "retention": {"keep_last": 5}});
        let config = Config::with_defaults(&sources, Some(&defaults)).unwrap();
        assert_eq!(config.sources[0].age_recipients.len(), 1, "a takes the default recipients");
        assert_eq!(config.sources[0].age_identity_secret.as_deref(), Some("AGE_ID"));
        assert!(config.sources[0].secret_names().contains(&"AGE_ID"));
        assert!(config.sources[1].age_recipients.is_empty(), "b's own (empty) list wins");
        assert_ne!(config.sources[0].retention, config.sources[1].retention);
        let text = Value::String(defaults.to_string());
        assert_eq!(Config::with_defaults(&sources, Some(&text)).unwrap(), config, "the JSON text reads the same");
        for bad in [json!({"token_secret": "X"}), json!({"name": "x"}), json!({"schedule": "0 1 * * *"}), json!([1])] {
            let e = Config::with_defaults(&sources, Some(&bad)).unwrap_err().to_string();
            assert!(e.contains("FERRY_DEFAULTS"), "{e}");
        }
    }
}
