//! Where an Aura restore drill loads a backup, and the Aura API calls that make and remove a
//! scratch instance for it. Pure: settings, request bodies and the reading of answers.
//!
//! Aura does not let Cypher create or drop databases (Cypher manual, "Cypher and Aura"), and only
//! Business Critical and Virtual Dedicated Cloud have more than one database per instance (Aura
//! docs, "Multiple databases"). So a drill goes into one of:
//! - **a scratch instance** (`drill_scratch = {}`), every tier: created for the drill with
//!   `POST /v1/instances` (aura-cli `instance create`: body `{version, region, memory, name, type,
//!   tenant_id, cloud_provider}`, answer 202 `{data: {id, connection_url, username, password,
//!   tenant_id, cloud_provider, region, type, name}}`; the generated password is shown in this
//!   answer only, Aura docs "Create an instance"), awaited while `creating` (aura-cli
//!   `api/poll.go` `PollInstance`, statuses in `api/response.go`), loaded through its Query API
//!   (the `connection_url`'s host), and removed with `DELETE /v1/instances/{id}` (aura-cli
//!   `instance delete`: 202, the instance `destroying`; 409 `ongoing-database-operation` while it
//!   is busy). Its name is `ferry-drill-<job id>`, so a create whose answer was lost is found again
//!   in `GET /v1/instances` (aura-cli `instance list`: `id, name, tenant_id, cloud_provider`)
//!   instead of being sent again (Aura API docs, "Overview": retrying a create "may end up with
//!   duplicate instances" and extra charges).
//! - **a spare instance** (`drill_instance = "<id>"` with `drill_password_secret`): its database
//!   (`drill_database`, default `neo4j`) is emptied and loaded.
//! - **a database of the source instance** (`drill_database` alone): Business Critical and VDC.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use url::Url;

use super::AuraConfig;
use crate::error::StepError;
use crate::fields::{self, FieldError};

/// Instance types `POST /v1/instances` takes (aura-cli `instance create`).
pub const INSTANCE_TYPES: &[&str] =
    &["free-db", "professional-db", "business-critical", "enterprise-db", "professional-ds", "enterprise-ds"];
/// Memory sizes it takes.
pub const MEMORY_SIZES: &[&str] =
    &["1GB", "2GB", "4GB", "8GB", "16GB", "24GB", "32GB", "48GB", "64GB", "128GB", "192GB", "256GB", "384GB", "512GB"];
/// Cloud providers it takes.
pub const CLOUD_PROVIDERS: &[&str] = &["gcp", "aws", "azure"];
/// Neo4j versions it takes.
pub const VERSIONS: &[&str] = &["4", "5"];
/// The database a new instance has.
pub const SCRATCH_DATABASE: &str = "neo4j";

/// `drill_scratch`: a scratch instance per drill. Every field left out is taken from the source
/// instance (`GET /v1/instances/{id}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScratchSettings {
    /// The tenant (project) to create it in.
    #[serde(default, deserialize_with = "fields::opt_text", skip_serializing_if = "Option::is_none")]
    pub tenant_id: Option<String>,
    /// Its memory (`1GB` … `512GB`).
    #[serde(default, deserialize_with = "fields::opt_text", skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Its region.
    #[serde(default, deserialize_with = "fields::opt_text", skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Its type (`professional-db`, …).
    #[serde(rename = "type", default, deserialize_with = "fields::opt_text", skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// Its cloud provider (`gcp`, `aws`, `azure`).
    #[serde(default, deserialize_with = "fields::opt_text", skip_serializing_if = "Option::is_none")]
    pub cloud_provider: Option<String>,
    /// Its Neo4j version (`5` by default, as aura-cli).
    #[serde(default = "five", deserialize_with = "fields::text")]
    pub version: String,
    /// How long it may stay `creating`, and how long a delete refused as busy is retried.
    #[serde(
        default = "default_create_timeout",
        deserialize_with = "fields::minutes::<_, 1, 1440>",
        serialize_with = "fields::ser_minutes"
    )]
    pub create_timeout_minutes: Duration,
}

fn five() -> String {
    "5".into()
}

fn default_create_timeout() -> Duration {
    Duration::from_secs(30 * 60)
}

fn one_of(field: &str, value: Option<&String>, allowed: &[&str]) -> Result<(), FieldError> {
    match value {
        Some(v) if !allowed.contains(&v.as_str()) => {
            Err(FieldError::new(field, format!("must be one of {} (got {v:?})", allowed.join(", "))))
        }
        _ => Ok(()),
    }
}

fn instance_id_ok(id: &str) -> bool {
    id.len() == 8 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The drill settings' checks (called by the source's check, after `instance_id`): which target,
/// its fields, and the defaults they imply.
pub fn check(cfg: &mut AuraConfig) -> Result<(), FieldError> {
    if let Some(s) = &cfg.drill_scratch {
        if cfg.drill_instance.is_some() || cfg.drill_database.is_some() {
            return Err(FieldError::new(
                "drill_scratch",
                "cannot be combined with drill_instance or drill_database: a drill loads into one place",
            ));
        }
        one_of("drill_scratch.memory", s.memory.as_ref(), MEMORY_SIZES)?;
        one_of("drill_scratch.type", s.instance_type.as_ref(), INSTANCE_TYPES)?;
        one_of("drill_scratch.cloud_provider", s.cloud_provider.as_ref(), CLOUD_PROVIDERS)?;
        one_of("drill_scratch.version", Some(&s.version), VERSIONS)?;
    }
    match cfg.drill_instance.as_mut() {
        Some(id) => {
            if !instance_id_ok(id) {
                return Err(FieldError::new("drill_instance", "must be the 8 hex characters of an Aura instance id"));
            }
            id.make_ascii_lowercase();
            if *id == cfg.instance_id {
                return Err(FieldError::new(
                    "drill_instance",
                    "must not be the backed-up instance: a drill empties the database it loads into",
                ));
            }
            if cfg.drill_password_secret.is_none() {
                return Err(FieldError::new(
                    "drill_password_secret",
                    "is required with drill_instance: the name of the Worker secret holding the spare instance's \
                     database password",
                ));
            }
            if cfg.drill_query_api_base.is_none() {
                let url = format!("https://{id}.databases.neo4j.io");
                cfg.drill_query_api_base = Some(
                    Url::parse(&url)
                        .map_err(|e| FieldError::new("drill_query_api_base", format!("is not a valid URL ({e})")))?,
                );
            }
        }
        None => {
            for (field, set) in [
                ("drill_password_secret", cfg.drill_password_secret.is_some()),
                ("drill_db_user", cfg.drill_db_user.is_some()),
                ("drill_query_api_base", cfg.drill_query_api_base.is_some()),
            ] {
                if set {
                    return Err(FieldError::new(field, "is for a spare instance: set drill_instance too"));
                }
            }
            if cfg.drill_database.as_deref().is_some_and(|d| d.eq_ignore_ascii_case(&cfg.database)) {
                return Err(FieldError::new(
                    "drill_database",
                    "must not be the backed-up database: a drill empties it",
                ));
            }
        }
    }
    Ok(())
}

/// Where a drill loads the backup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum DrillTarget {
    /// A database of the source instance (`drill_database`).
    Database,
    /// A spare instance (`drill_instance`).
    Spare {
        /// Its id.
        instance_id: String,
    },
    /// A scratch instance created for the drill and deleted after it (`drill_scratch`).
    Scratch,
}

/// Where the source's drills load, or why it has none (the 400 a drill request gets).
pub fn drill_target(cfg: &AuraConfig) -> Result<DrillTarget, String> {
    if cfg.drill_scratch.is_some() {
        Ok(DrillTarget::Scratch)
    } else if let Some(id) = &cfg.drill_instance {
        Ok(DrillTarget::Spare { instance_id: id.clone() })
    } else if cfg.drill_database.is_some() {
        Ok(DrillTarget::Database)
    } else {
        Err("an Aura drill needs somewhere to load the backup: drill_scratch = {} (a scratch instance created for \
             each drill and deleted after it; every tier), drill_instance (a spare instance) or drill_database (a \
             second database of the instance; Business Critical and Virtual Dedicated Cloud only)"
            .into())
    }
}

/// The scratch instance's name: found again by it after a lost create answer.
pub fn scratch_name(job_id: &str) -> String {
    format!("{SCRATCH_PREFIX}{job_id}")
}

/// The name every drill's scratch instance starts with.
pub const SCRATCH_PREFIX: &str = "ferry-drill-";

fn malformed(what: &str) -> StepError {
    StepError::permanent(format!("Aura API: received a malformed response ({what})"))
}

/// The `POST /v1/instances` body: the settings' values, else the source instance's (its
/// `GET /v1/instances/{id}` `data`).
pub fn create_body(settings: &ScratchSettings, source: &Value, name: &str) -> Result<Value, StepError> {
    let pick = |own: &Option<String>, field: &str, setting: &str| -> Result<String, StepError> {
        own.clone().or_else(|| source.get(field).and_then(Value::as_str).map(str::to_string)).ok_or_else(|| {
            StepError::permanent(format!(
                "the source instance's details have no {field}: set drill_scratch.{setting} for the drill's scratch \
                 instance"
            ))
        })
    };
    Ok(json!({
        "version": settings.version,
        "region": pick(&settings.region, "region", "region")?,
        "memory": pick(&settings.memory, "memory", "memory")?,
        "name": name,
        "type": pick(&settings.instance_type, "type", "type")?,
        "tenant_id": pick(&settings.tenant_id, "tenant_id", "tenant_id")?,
        "cloud_provider": pick(&settings.cloud_provider, "cloud_provider", "cloud_provider")?,
    }))
}

/// A created instance, from the create answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Created {
    /// Its id.
    pub id: String,
    /// Its Query API, from `connection_url`.
    pub query_api_base: String,
    /// Its database user.
    pub username: String,
    /// The generated password (shown in this answer only).
    pub password: String,
}

/// Reads the create answer's `data`.
pub fn created(body: &Value) -> Result<Created, StepError> {
    let text = |field: &str| -> Result<String, StepError> {
        body.pointer(&format!("/data/{field}"))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .ok_or_else(|| malformed(&format!("the created instance has no {field}")))
    };
    let id = text("id")?;
    if !instance_id_ok(&id) {
        return Err(malformed("the created instance's id is not 8 hex characters"));
    }
    Ok(Created {
        query_api_base: query_api_base(&text("connection_url")?)?,
        username: text("username")?,
        password: text("password")?,
        id,
    })
}

/// The Query API base of an instance from its `connection_url`: the same host (and port), over
/// HTTPS for the encrypted schemes Aura hands out (`neo4j+s://<id>.databases.neo4j.io` →
/// `https://<id>.databases.neo4j.io`, where Aura serves the Query API), over HTTP for the
/// unencrypted ones.
pub fn query_api_base(connection_url: &str) -> Result<String, StepError> {
    let bad = || malformed(&format!("connection_url {connection_url:?} is not a neo4j:// or neo4j+s:// URL"));
    let url = Url::parse(connection_url).map_err(|_| bad())?;
    let scheme = match url.scheme() {
        "neo4j+s" | "neo4j+ssc" | "bolt+s" | "bolt+ssc" | "https" => "https",
        "neo4j" | "bolt" | "http" => "http",
        _ => return Err(bad()),
    };
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or_else(bad)?;
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let base = format!("{scheme}://{host}{port}");
    Url::parse(&base).map_err(|_| bad())?;
    Ok(base)
}

/// The ids of the instances named `name` in a `GET /v1/instances` answer.
pub fn named(body: &Value, name: &str) -> Result<Vec<String>, StepError> {
    let list = body.get("data").and_then(Value::as_array).ok_or_else(|| malformed("the instance list has no data"))?;
    Ok(list
        .iter()
        .filter(|i| i.get("name").and_then(Value::as_str) == Some(name))
        .filter_map(|i| i.get("id").and_then(Value::as_str).map(str::to_string))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn aura(extra: Value) -> Result<AuraConfig, String> {
        let mut table = json!({"name": "g", "kind": "aura", "schedule": "0 3 * * *", "instance_id": "2f49c2b3",
            "client_id_secret": "A", "client_secret_secret": "B", "db_password_secret": "P"});
        for (k, v) in extra.as_object().unwrap() {
            table[k] = v.clone();
        }
        match Config::from_value(&json!([table])) {
            Ok(mut c) => match c.sources.remove(0).provider {
                crate::providers::ProviderConfig::Aura(a) => Ok(a),
                _ => unreachable!(),
            },
            Err(e) => Err(e.to_string()),
        }
    }

    #[test]
    fn drill_settings_name_the_field_that_is_wrong() {
        let cases = [
            (json!({"drill_scratch": {"memory": "3GB"}}), "\"drill_scratch.memory\""),
            (json!({"drill_scratch": {"type": "huge-db"}}), "\"drill_scratch.type\""),
            (json!({"drill_scratch": {"cloud_provider": "ibm"}}), "\"drill_scratch.cloud_provider\""),
            (json!({"drill_scratch": {"version": "6"}}), "\"drill_scratch.version\""),
            (json!({"drill_scratch": {"create_timeout_minutes": 0}}), "\"drill_scratch.create_timeout_minutes\""),
            (json!({"drill_scratch": {"colour": "red"}}), "colour"),
            (json!({"drill_scratch": {}, "drill_database": "x"}), "\"drill_scratch\""),
            (json!({"drill_instance": "zz"}), "\"drill_instance\""),
            (json!({"drill_instance": "2F49C2B3", "drill_password_secret": "S"}), "\"drill_instance\""),
            (json!({"drill_instance": "aaaabbbb"}), "\"drill_password_secret\""),
            (json!({"drill_password_secret": "S"}), "\"drill_password_secret\""),
            (json!({"drill_query_api_base": "http://x.test"}), "\"drill_query_api_base\""),
            (json!({"drill_database": "neo4j"}), "\"drill_database\""),
        ];
        for (extra, field) in cases {
            let e = aura(extra.clone()).unwrap_err();
            assert!(e.contains(field), "{extra}: {e}");
        }
    }

    #[test]
    fn a_spare_instance_gets_its_query_api_by_default_and_may_use_the_same_database_name() {
        let cfg = aura(json!({"drill_instance": "AAAABBBB", "drill_password_secret": "S", "drill_database": "neo4j"}))
            .unwrap();
        assert_eq!(cfg.drill_instance.as_deref(), Some("aaaabbbb"));
        assert_eq!(cfg.drill_query_api_base.unwrap().as_str(), "https://aaaabbbb.databases.neo4j.io/");
        assert_eq!(drill_target(&aura(json!({"drill_scratch": {}})).unwrap()), Ok(DrillTarget::Scratch));
        assert!(drill_target(&aura(json!({})).unwrap()).unwrap_err().contains("drill_scratch"));
    }

    #[test]
    fn the_create_body_takes_the_settings_then_the_source_instances_details() {
        let settings = ScratchSettings {
            tenant_id: None,
            memory: Some("1GB".into()),
            region: None,
            instance_type: None,
            cloud_provider: None,
            version: "5".into(),
            create_timeout_minutes: default_create_timeout(),
        };
        let source = json!({"id": "2f49c2b3", "tenant_id": "t", "cloud_provider": "aws", "region": "us-east-1",
            "type": "professional-db", "memory": "8GB"});
        let body = create_body(&settings, &source, "ferry-drill-0123456789abcdef").unwrap();
        assert_eq!(
            body,
            json!({"version": "5", "region": "us-east-1", "memory": "1GB", "name": "ferry-drill-0123456789abcdef",
                "type": "professional-db", "tenant_id": "t", "cloud_provider": "aws"})
        );
        let e = create_body(&settings, &json!({"tenant_id": "t"}), "n").unwrap_err();
        assert!(e.message().contains("drill_scratch.region"), "{}", e.message());
    }

    #[test]
    fn the_query_api_is_the_connection_urls_host() {
        assert_eq!(
            query_api_base("neo4j+s://db1d1234.databases.neo4j.io").unwrap(),
            "https://db1d1234.databases.neo4j.io"
        );
        assert_eq!(query_api_base("neo4j://127.0.0.1:7001").unwrap(), "http://127.0.0.1:7001");
        for bad in ["YOUR_CONNECTION_URL", "ftp://x", "neo4j+s://", ""] {
            assert!(query_api_base(bad).is_err(), "{bad}");
        }
        let ok = json!({"data": {"id": "db1d1234", "connection_url": "neo4j+s://db1d1234.databases.neo4j.io",
            "username": "neo4j", "password": "letMeIn123!"}});
        let c = created(&ok).unwrap();
        assert_eq!((c.id.as_str(), c.password.as_str()), ("db1d1234", "letMeIn123!"));
        assert!(created(&json!({"data": {"id": "db1d1234"}})).is_err());
        assert!(created(&json!({"data": "x"})).is_err());
        let list = json!({"data": [{"id": "aaaaaaaa", "name": "ferry-drill-x"}, {"id": "bbbbbbbb", "name": "prod"}]});
        assert_eq!(named(&list, "ferry-drill-x").unwrap(), vec!["aaaaaaaa".to_string()]);
        assert!(named(&json!({}), "x").is_err());
    }
}
